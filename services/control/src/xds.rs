//! Delta xDS over one ADS stream per Envoy: clusters (every one, or those asked for: on-demand
//! CDS) and secrets (by name).
//!
//! Each stream remembers, per type, what it subscribed to and which version of each resource it
//! sent; a change of the resources, or a new subscription, sends only what differs. An ACK
//! records what that Envoy now has (which orders the route table: `Control::gate`); a NACK is
//! logged and counted, and Envoy keeps what it had.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource as XdsResource,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::control::{Acks, Control};
use crate::metrics::Xds;
use crate::resources::{is_domain_secret, Resource, Resources, CLUSTER, SECRET};

/// Resources per response, and their bytes: a large initial push goes out in pieces that no gRPC
/// message limit refuses and that bound what a stream whose Envoy does not read holds (a piece
/// in HTTP/2's buffers, one queued, one being built: ~200 KiB however many customers there are).
const BATCH: usize = 1000;
const BATCH_BYTES: usize = 64 * 1024;
/// Responses queued for one stream; past it the stream waits for its Envoy to read.
const QUEUED: usize = 1;
/// How long a response may wait for room in that queue: an Envoy that reads nothing for this
/// long loses its stream (it reconnects and is sent what it lacks) rather than pin memory.
const SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Responses sent and not acknowledged; an Envoy this far behind loses its stream too.
const UNACKED: usize = 1024;

pub struct Ads {
    pub control: Arc<Control>,
    /// ADS streams one client address may hold (an Envoy holds one).
    pub streams_per_client: usize,
    /// Set when the service stops: the streams end, so that the server can.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

type SotwStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("edgewise-control serves delta xDS only: set ads_config.api_type to DELTA_GRPC"))
    }

    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let client = request.remote_addr().map(|a| a.ip());
        let (id, acks) = self.control.register_stream(client, self.streams_per_client).map_err(|held| {
            Status::resource_exhausted(format!(
                "{held} ADS streams from this address already: at most {} (an Envoy needs one)",
                self.streams_per_client
            ))
        })?;
        let (tx, rx) = mpsc::channel(QUEUED);
        let (control, mut stop) = (self.control.clone(), self.stop.clone());
        tokio::spawn(async move {
            let mut stream =
                Stream { control: control.clone(), acks, types: HashMap::new(), pending: HashMap::new(), nonce: 0, tx };
            let node = tokio::select! {
                node = stream.serve(request.into_inner()) => node,
                _ = stop.wait_for(|s| *s) => lock(&stream.acks).node.clone(),
            };
            control.unregister_stream(id);
            eprintln!("edgewise-control: ADS stream of {node:?} ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[derive(Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// name -> version the client has (sent by us, or declared at reconnection).
    sent: HashMap<String, String>,
    /// Whether anything was sent: the first request gets an answer even when there is
    /// nothing to send (an Envoy's listeners wait for the first clusters).
    answered: bool,
}

/// A response not yet acknowledged: what it set and removed.
struct Pending {
    type_url: &'static str,
    sent: Instant,
    set: Vec<Arc<Resource>>,
    removed: Vec<String>,
}

struct Stream {
    control: Arc<Control>,
    acks: Arc<Mutex<Acks>>,
    types: HashMap<&'static str, Subscription>,
    pending: HashMap<String, Pending>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

fn known_type(type_url: &str) -> Option<&'static str> {
    [CLUSTER, SECRET].into_iter().find(|t| *t == type_url)
}

impl Stream {
    /// Serves until the Envoy goes away; its node id.
    async fn serve(&mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) -> String {
        let mut resources = self.control.resources();
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        let current = resources.borrow_and_update().clone();
                        if self.request(request, &current).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                changed = resources.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = resources.borrow_and_update().clone();
                    for type_url in [CLUSTER, SECRET] {
                        if self.push(type_url, &current, Vec::new()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        lock(&self.acks).node.clone()
    }

    async fn request(&mut self, request: DeltaDiscoveryRequest, resources: &Resources) -> Result<(), ()> {
        if let Some(node) = &request.node {
            let mut acks = lock(&self.acks);
            if acks.node.is_empty() {
                acks.node = node.id.clone();
                eprintln!("edgewise-control: ADS stream of {:?} (cluster {:?})", node.id, node.cluster);
            }
        }
        let Some(type_url) = known_type(&request.type_url) else {
            // Nothing of that type is served (e.g. endpoints: clusters carry theirs).
            return Ok(());
        };
        if !request.response_nonce.is_empty() {
            self.acknowledged(type_url, &request);
        }
        let first = !self.types.contains_key(type_url);
        let sub = self.types.entry(type_url).or_default();
        // Envoy's first cluster request names nothing: the legacy wildcard.
        if first && type_url == CLUSTER && request.resource_names_subscribe.is_empty() {
            sub.wildcard = true;
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name.clone());
                // Named in a subscription: answered even if the client might have it.
                sub.sent.remove(name);
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(name);
                sub.sent.remove(name);
            }
        }
        if !request.initial_resource_versions.is_empty() {
            let mut acks = lock(&self.acks);
            let acked = acks.acked.entry(type_url).or_default();
            for (name, version) in &request.initial_resource_versions {
                sub.sent.insert(name.clone(), version.clone());
                acked.insert(name.clone(), version.clone());
            }
        }
        if type_url == CLUSTER && sub.wildcard {
            lock(&self.acks).all_clusters = true;
        }
        // On-demand clusters (ODCDS) and domain certificates (asked for by SNI) that do not
        // exist: said at once, so that the request or handshake waiting for one fails now
        // rather than at its timeout.
        let on_demand = |n: &&String| type_url == CLUSTER || is_domain_secret(n);
        let all = resources.of(type_url);
        let absent = |n: &&String| n.as_str() != "*" && !all.is_some_and(|a| a.contains_key(*n));
        let missing = request.resource_names_subscribe.iter().filter(on_demand).filter(absent).cloned().collect();
        self.push(type_url, resources, missing).await
    }

    fn acknowledged(&mut self, type_url: &'static str, request: &DeltaDiscoveryRequest) {
        let Some(pending) = self.pending.remove(&request.response_nonce) else {
            return;
        };
        self.outstanding();
        if pending.type_url != type_url {
            return;
        }
        if let Some(error) = &request.error_detail {
            self.control.metrics.xds(type_url, Xds::Nack);
            let node = lock(&self.acks).node.clone();
            eprintln!("edgewise-control: {node:?} rejected {type_url} ({}): {}", pending.set.len(), error.message);
            return;
        }
        self.control.metrics.xds(type_url, Xds::Ack);
        {
            let mut acks = lock(&self.acks);
            let acked = acks.acked.entry(type_url).or_default();
            for r in pending.set {
                acked.insert(r.name.clone(), r.version.clone());
            }
            for name in pending.removed {
                acked.remove(&name);
            }
        }
        self.control.gate();
    }

    /// Sends what this client lacks of `type_url`: new and changed resources it subscribes to,
    /// and the removal of the clusters and domain certificates it has that are gone (and of
    /// `missing`). A customer's secret is never removed from under a cluster: the client
    /// unsubscribes when nothing uses it.
    async fn push(&mut self, type_url: &'static str, resources: &Resources, missing: Vec<String>) -> Result<(), ()> {
        let (Some(sub), Some(all)) = (self.types.get_mut(type_url), resources.of(type_url)) else {
            return Ok(());
        };
        let mut changed = Vec::new();
        let mut wanted = |name: &String, r: &Arc<Resource>| {
            if sub.sent.get(name) != Some(&r.version) {
                changed.push(r.clone());
            }
        };
        if sub.wildcard {
            all.iter().for_each(|(name, r)| wanted(name, r));
        } else {
            sub.names.iter().filter_map(|n| all.get_key_value(n)).for_each(|(name, r)| wanted(name, r));
        }
        let gone = |n: &&String| (type_url == CLUSTER || is_domain_secret(n)) && !all.contains_key(*n);
        let mut removed: Vec<String> = sub.sent.keys().filter(gone).cloned().collect();
        for name in missing {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        if changed.is_empty() && removed.is_empty() && sub.answered {
            return Ok(());
        }
        sub.answered = true;
        for r in &changed {
            sub.sent.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            sub.sent.remove(name);
        }
        let batches = batches(&changed);
        let last = batches.len() - 1;
        let mut removed = Some(removed);
        for (i, batch) in batches.into_iter().enumerate() {
            // Removals go with the last piece.
            let removed = if i == last { removed.take().unwrap_or_default() } else { Vec::new() };
            if self.pending.len() >= UNACKED {
                self.control.metrics.xds_stalled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "edgewise-control: {:?} acknowledged none of {UNACKED} updates; its stream ends",
                    lock(&self.acks).node
                );
                return Err(());
            }
            self.nonce += 1;
            let nonce = self.nonce.to_string();
            self.pending.insert(
                nonce.clone(),
                Pending { type_url, sent: Instant::now(), set: batch.to_vec(), removed: removed.clone() },
            );
            let response = DeltaDiscoveryResponse {
                type_url: type_url.to_string(),
                resources: batch
                    .iter()
                    .map(|r| XdsResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.any(type_url)),
                        ..Default::default()
                    })
                    .collect(),
                removed_resources: removed,
                nonce,
                ..Default::default()
            };
            self.control.metrics.xds(type_url, Xds::Response);
            self.control.metrics.xds_resources(type_url, batch.len());
            self.outstanding();
            match self.tx.send_timeout(Ok(response), SEND_WAIT).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    self.control.metrics.xds_stalled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!(
                        "edgewise-control: {:?} read none of its updates for {} s; its stream ends",
                        lock(&self.acks).node,
                        SEND_WAIT.as_secs()
                    );
                    return Err(());
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(()),
            }
        }
        Ok(())
    }

    /// Records since when the oldest response not yet acknowledged waits.
    fn outstanding(&self) {
        let oldest = self.pending.values().map(|p| p.sent).min();
        let mut acks = lock(&self.acks);
        acks.unacked_since = oldest;
        if oldest.is_none() {
            acks.lagging = false;
        }
    }
}

/// `changed` in pieces of at most `BATCH` resources and about `BATCH_BYTES` (a resource larger
/// than that goes alone); at least one piece, empty when nothing changed (removals still go).
fn batches(changed: &[Arc<Resource>]) -> Vec<&[Arc<Resource>]> {
    let mut pieces = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in changed.iter().enumerate() {
        let size = r.body.len() + r.name.len() + r.version.len();
        if i > start && (i - start >= BATCH || bytes + size > BATCH_BYTES) {
            pieces.push(changed.get(start..i).unwrap_or_default());
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    pieces.push(changed.get(start..).unwrap_or_default());
    pieces
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
