//! The shared store: etcd v3, for several replicas of edgewise-control. Every replica follows
//! one watch of the store's prefix and applies each revision to its memory (`Control::apply`),
//! so all replicas hold the same state at the same revision, and the route table's versions are
//! the store's revisions: a watcher moving to another replica continues from its cursor. A
//! write is one transaction whose compares make it atomic (a match taken twice, a function of a
//! customer deleted meanwhile: refused, not raced); the API answers once its own replica has
//! applied it.
//!
//! Keys under the prefix:
//! - `customers/<name>`: the customer (JSON); its create revision is its *generation*;
//! - `functions/<bucket>/<name>` (the bucket: two hex digits of a hash of the name):
//!   `{"key", "generation", "function"}`: a function counts only while its
//!   customer's generation is the one it was stored under, so deleting a customer is one small
//!   transaction whatever its size, and its functions are removed after it (`owned/`);
//! - `matches/<route key>`: the function holding the match (uniqueness);
//! - `owned/<customer>/<function>`: the generation, to find a deleted customer's functions;
//! - `published/<customer>`: the customer's routes are in the table;
//! - `replicas/<id>` and `acks/<customer>/<id>`, under each replica's lease: the replicas alive,
//!   and which of them have every connected Envoy holding the customer's cluster and CA (the
//!   value: their versions). A customer is published once every live replica has acknowledged
//!   it; a replica that dies takes its entries with it when its lease ends;
//! - `domains/<name>`: a custom domain (JSON: its function, certificate and key, ACME state);
//! - `secrets/<name>`: what the service keeps for itself (the ACME account);
//! - `challenges/<token>` (under the lease of the replica whose order it is): an HTTP-01 answer,
//!   which any replica serves; `leaders/acme`: the replica that runs the ACME orders.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, GetResponse, KeyValue,
    PutOptions, Txn, TxnOp, TxnResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::domains::Domain;
use crate::model::{ApiError, Customer, Function};

/// How long a replica's lease outlives its last keep-alive: a replica that dies holds
/// publication back at most this long.
const LEASE_TTL: i64 = 6;
/// A replica that has not reached etcd for this long stops serving the route table and says so
/// in /readyz: what it holds may be stale (`--etcd-stale-ms`).
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// Revisions replayed at start, so that a recent cursor of another replica continues here (a
/// watcher that is current is seconds behind; an older one fetches the whole table).
const REPLAY: i64 = 1_000;
/// The largest message read from etcd: a watch answer carries many revisions at once.
const MAX_MESSAGE: usize = 64 << 20;
/// Keys read in one range request.
const PAGE: i64 = 1_000;
/// Attempts of one write whose compares failed (another replica wrote the same keys meanwhile).
const ATTEMPTS: usize = 8;
/// How long a request waits for the members to answer again when none does (their leader died
/// and they elect another) before the API answers 503: as long as etcd itself holds a proposal
/// by default (5 s and two election timeouts of 1 s).
const ELECTION_WAIT: Duration = Duration::from_secs(7);

#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// CA of etcd's server certificates, and this client's certificate and key.
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
    pub stale_after: Duration,
}

#[derive(Serialize, Deserialize)]
struct StoredFunction {
    key: String,
    generation: i64,
    function: Function,
}

/// One key's change, as the control applies it.
#[derive(Debug)]
pub enum Change {
    Customer(String, Option<Customer>),
    /// A function put (its route key and itself) or gone.
    Function(String, Option<(String, Function)>),
    Published(String),
    Domain(String, Option<Domain>),
    /// An HTTP-01 answer: token -> (domain, key authorization), or gone.
    Challenge(String, Option<(String, String)>),
}

/// What the replicas have said about publication: the live ones, and each customer's acks.
#[derive(Default)]
struct View {
    generations: HashMap<String, i64>,
    replicas: BTreeSet<String>,
    acks: HashMap<String, HashMap<String, String>>,
}

pub struct Shared {
    /// One client per endpoint, and the one in use: etcd's client does not move to another
    /// member when one is down, so the store does (as etcd's own Go client: pinned to one,
    /// the next when a member fails a request: `member_failed`).
    clients: Vec<Client>,
    endpoint: AtomicUsize,
    prefix: String,
    pub replica: String,
    pub cluster: u64,
    lease: Mutex<i64>,
    view: Mutex<View>,
    /// Acks this replica wrote: customer -> versions.
    written: Mutex<HashMap<String, String>>,
    /// Customers whose publication this replica has asked for.
    publishing: Mutex<HashSet<String>>,
    /// The last revision applied to memory.
    applied: watch::Sender<i64>,
    /// When etcd last answered.
    contact: Mutex<Instant>,
    stale_after: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unavailable(e: etcd_client::Error) -> ApiError {
    ApiError::Unavailable(format!("etcd: {e}"))
}

/// The end of the range of keys starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Shared {
    /// Connects as a replica: registered under a lease of its own.
    pub async fn connect(options: &EtcdOptions) -> Result<Arc<Shared>, String> {
        let shared = Shared::connect_only(options).await?;
        let all = options.endpoints.join(",");
        let granted = shared.call(|c| async move { c.lease_client().grant(LEASE_TTL, None).await }).await;
        let lease = granted.map_err(|e| format!("--etcd {all}: a lease: {e}"))?.id();
        *lock(&shared.lease) = lease;
        shared.register(lease).await.map_err(|e| format!("--etcd {all}: registering the replica: {e}"))?;
        Ok(shared)
    }

    /// Connects without joining the replicas (`seed`).
    pub async fn connect_only(options: &EtcdOptions) -> Result<Arc<Shared>, String> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if options.ca.is_some() || options.identity.is_some() {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &options.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &options.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            connect = connect.with_tls(tls);
        }
        if options.endpoints.is_empty() {
            return Err("--etcd names no endpoint".into());
        }
        let mut clients = Vec::new();
        for endpoint in &options.endpoints {
            // One endpoint: connected when first used, so a member down at start is no error.
            let client = Client::connect([endpoint], Some(connect.clone())).await;
            clients.push(client.map_err(|e| format!("--etcd {endpoint}: {e}"))?);
        }
        let replica = format!("{:016x}", crate::store::new_history());
        let mut shared = Shared {
            clients,
            endpoint: AtomicUsize::new(0),
            prefix: options.prefix.clone(),
            replica,
            cluster: 0,
            lease: Mutex::new(0),
            view: Mutex::new(View::default()),
            written: Mutex::new(HashMap::new()),
            publishing: Mutex::new(HashSet::new()),
            applied: watch::Sender::new(0),
            contact: Mutex::new(Instant::now()),
            stale_after: options.stale_after,
        };
        let all = options.endpoints.join(",");
        let status = shared.get(&options.prefix, Some(GetOptions::new().with_count_only())).await;
        shared.cluster = status.map_err(|e| format!("--etcd {all}: {e}"))?.header().map_or(0, |h| h.cluster_id());
        Ok(Arc::new(shared))
    }

    /// Fills an empty store with published customers and their functions, many to a
    /// transaction, several transactions at once (a benchmark's million). The caller has checked
    /// them (`FunctionRules::key` made each function's route key).
    pub async fn seed(
        self: &Arc<Self>,
        customers: Vec<(String, Customer)>,
        functions: Vec<(String, String, Function)>,
    ) -> Result<(), String> {
        // etcd's default --max-txn-ops is 128.
        const OPS: usize = 120;
        let mut batches: Vec<Vec<TxnOp>> = Vec::new();
        for chunk in customers.chunks(OPS / 2) {
            let mut ops = Vec::new();
            for (name, customer) in chunk {
                ops.push(TxnOp::put(self.key(&["customers", name]), to_json(customer)?, None));
                ops.push(TxnOp::put(self.key(&["published", name]), "", None));
            }
            batches.push(ops);
        }
        self.run_batches(batches).await?;
        let mut generations = HashMap::new();
        let now = self.get(&self.prefix, Some(GetOptions::new().with_count_only())).await.map_err(|e| e.to_string())?;
        let now = now.header().map_or(0, |h| h.revision());
        self.range(&self.key(&["customers", ""]), now, |kv| {
            let name = String::from_utf8_lossy(kv.key()).rsplit('/').next().unwrap_or_default().to_string();
            generations.insert(name, kv.create_revision());
        })
        .await?;
        let mut batches = Vec::new();
        for chunk in functions.chunks(OPS / 3) {
            let mut ops = Vec::new();
            for (name, key, function) in chunk {
                let generation = *generations.get(&function.customer).ok_or(format!("{name}: no customer"))?;
                let stored = StoredFunction { key: key.clone(), generation, function: function.clone() };
                ops.push(TxnOp::put(self.function_key(name), to_json(&stored)?, None));
                ops.push(TxnOp::put(self.key(&["matches", key]), name.as_str(), None));
                ops.push(TxnOp::put(self.key(&["owned", &function.customer, name]), generation.to_string(), None));
            }
            batches.push(ops);
        }
        self.run_batches(batches).await
    }

    async fn run_batches(self: &Arc<Self>, batches: Vec<Vec<TxnOp>>) -> Result<(), String> {
        let mut running = tokio::task::JoinSet::new();
        for ops in batches {
            if running.len() >= 16 {
                if let Some(done) = running.join_next().await {
                    done.map_err(|e| e.to_string())??;
                }
            }
            let shared = self.clone();
            running
                .spawn(async move { shared.txn(Txn::new().and_then(ops)).await.map(drop).map_err(|e| e.to_string()) });
        }
        while let Some(done) = running.join_next().await {
            done.map_err(|e| e.to_string())??;
        }
        Ok(())
    }

    /// Runs `op` on the endpoint in use; when that member fails it (`member_failed`), on the
    /// next one. When every member failed it, the members are tried again, pausing 100 ms and
    /// doubling, for `ELECTION_WAIT`: a leader's death is an election, not an outage.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut tried = 0;
        loop {
            let i = self.endpoint.load(Ordering::Relaxed) % self.clients.len();
            let Some(client) = self.clients.get(i) else {
                return Err(etcd_client::Error::InvalidArgs("no etcd endpoint".into()));
            };
            match op(client.clone()).await {
                Err(e) if member_failed(&e) => {
                    self.next_endpoint(i);
                    tried += 1;
                    if tried % self.clients.len() == 0 {
                        if started.elapsed() + pause > ELECTION_WAIT {
                            return Err(e);
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
                Err(e) => return Err(e),
                Ok(done) => {
                    self.touched();
                    return Ok(done);
                }
            }
        }
    }

    fn next_endpoint(&self, from: usize) {
        let _ =
            self.endpoint.compare_exchange(from, (from + 1) % self.clients.len(), Ordering::Relaxed, Ordering::Relaxed);
    }

    async fn get(&self, key: &str, options: Option<GetOptions>) -> Result<GetResponse, etcd_client::Error> {
        self.call(|mut c| {
            let options = options.clone();
            async move { c.get(key, options).await }
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, etcd_client::Error> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// A function's key: `functions/<bucket>/<name>`.
    fn function_key(&self, name: &str) -> String {
        self.key(&["functions", &function_bucket(name), name])
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                key.push('/');
            }
            key.push_str(part);
        }
        key
    }

    /// Puts this replica's key under `lease`: the revision written.
    async fn register(&self, lease: i64) -> Result<i64, etcd_client::Error> {
        let put = PutOptions::new().with_lease(lease);
        let key = self.key(&["replicas", &self.replica]);
        let done = self.txn(Txn::new().and_then([TxnOp::put(key, "", Some(put))])).await?;
        Ok(Self::revision_of(done.header()))
    }

    fn touched(&self) {
        *lock(&self.contact) = Instant::now();
    }

    /// How long since etcd last answered, when that is longer than the bound.
    pub fn stale(&self) -> Option<Duration> {
        let since = lock(&self.contact).elapsed();
        (since > self.stale_after).then_some(since)
    }

    pub fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Waits (a bounded time) until this replica has applied `revision`: the API answers a
    /// write once a read of this replica sees it.
    pub async fn caught_up(&self, revision: i64) {
        self.caught_up_within(revision, Duration::from_secs(5)).await;
    }

    /// Waits until this replica has applied `revision`, at most `limit`: whether it has.
    pub async fn caught_up_within(&self, revision: i64, limit: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        let caught_up = tokio::time::timeout(limit, applied.wait_for(|r| *r >= revision)).await.is_ok();
        caught_up
    }

    /// Every customer, function and publication at a revision a little behind the current one
    /// (`REPLAY` revisions, or the oldest etcd keeps), so that the watch from it replays the
    /// recent route changes as every other replica logged them.
    ///
    /// The contents go to `each` as they are read, a page at a time (a million functions are
    /// never all in one message or one vector); `None` first when it starts over (a revision
    /// compacted while it read). Returns the revision read, and one at which this replica wrote
    /// (its registration, again): once the watch has brought that, it has caught up.
    pub async fn snapshot(&self, mut each: impl FnMut(Option<Change>)) -> Result<(i64, i64), String> {
        let now = self.get(&self.prefix, Some(GetOptions::new().with_count_only())).await;
        let now = now.map_err(|e| format!("etcd: {e}"))?.header().map_or(0, |h| h.revision());
        let mut revision = (now - REPLAY).max(1);
        loop {
            each(None);
            match self.read_all(revision, &mut each).await {
                Ok(()) => {
                    let lease = *lock(&self.lease);
                    let written = self.register(lease).await.map_err(|e| format!("etcd: {e}"))?;
                    return Ok((revision, written.max(now)));
                }
                // Compacted: the oldest revision kept is later.
                Err(e) if e.contains("compacted") && revision < now => revision = now,
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_all(&self, revision: i64, each: &mut impl FnMut(Option<Change>)) -> Result<(), String> {
        let mut view = View::default();
        // The functions bucket by bucket: etcd 3.4 walks a whole range's index for every page
        // of it, so paging a million keys in one range costs a million steps a page.
        let buckets = (0..=u8::MAX).map(|b| self.key(&["functions", &format!("{b:02x}"), ""]));
        let ranges = [self.key(&["customers", ""])]
            .into_iter()
            .chain(buckets)
            .chain(["published", "replicas", "acks", "domains", "challenges"].map(|kind| self.key(&[kind, ""])));
        for start in ranges {
            self.range(&start, revision, |kv| {
                if let Some(change) = self.read(&mut view, EventType::Put, kv) {
                    each(Some(change));
                }
            })
            .await?;
        }
        *lock(&self.view) = view;
        Ok(())
    }

    async fn range(&self, prefix: &str, revision: i64, mut each: impl FnMut(&KeyValue)) -> Result<(), String> {
        let end = range_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_revision(revision).with_limit(PAGE);
            let page = self
                .call(|c| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { c.kv_client().max_decoding_message_size(MAX_MESSAGE).get(from, Some(options)).await }
                })
                .await
                .map_err(|e| format!("etcd: {e}"))?;
            for item in page.kvs() {
                each(item);
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    /// Follows the store from `revision` (exclusive), giving each revision's changes to `apply`
    /// in order; reconnects when the watch breaks. Returns when etcd no longer has the next
    /// revision (compacted): the caller must load a snapshot again.
    pub async fn follow(&self, mut revision: i64, mut apply: impl FnMut(i64, Vec<Change>)) -> String {
        loop {
            let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(revision + 1);
            let watching = self.endpoint.load(Ordering::Relaxed) % self.clients.len();
            let watch = self.call(|c| {
                let options = options.clone();
                async move {
                    let mut watch = c.watch_client().max_decoding_message_size(MAX_MESSAGE);
                    watch.watch(self.prefix.as_str(), Some(options)).await
                }
            });
            let mut stream = match watch.await {
                Ok(stream) => stream,
                Err(e) => {
                    eprintln!("edgewise-control: etcd watch: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let message = match stream.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("edgewise-control: etcd watch broke: {e}; resuming after revision {revision}");
                        self.next_endpoint(watching);
                        break;
                    }
                };
                self.touched();
                if message.compact_revision() > 0 && message.compact_revision() > revision + 1 {
                    return format!(
                        "revision {} was compacted (etcd keeps {} on); reloading",
                        revision + 1,
                        message.compact_revision()
                    );
                }
                if message.canceled() {
                    // A member that lost its leader cancels its watches: another one.
                    eprintln!("edgewise-control: etcd watch canceled: {}", message.cancel_reason());
                    self.next_endpoint(watching);
                    break;
                }
                if message.created() {
                    // Its revision is the store's now, not what the watch has sent. (So are
                    // etcd 3.4's answers to a progress request: not relied upon.)
                    continue;
                }
                let mut batch: Vec<Change> = Vec::new();
                let mut at = 0;
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    let r = kv.mod_revision();
                    if r != at && at != 0 {
                        apply(at, std::mem::take(&mut batch));
                        revision = at;
                        self.applied.send_replace(at);
                    }
                    at = r;
                    let mut view = lock(&self.view);
                    if let Some(change) = self.read(&mut view, event.event_type(), kv) {
                        batch.push(change);
                    }
                }
                if at != 0 {
                    apply(at, batch);
                    revision = at;
                    self.applied.send_replace(at);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One key's event, as a change for the control (or kept in the view).
    fn read(&self, view: &mut View, kind: EventType, kv: &KeyValue) -> Option<Change> {
        let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&self.prefix)?;
        let put = matches!(kind, EventType::Put);
        let (collection, rest) = key.split_once('/')?;
        match collection {
            "customers" => {
                if !put {
                    view.generations.remove(rest);
                    view.acks.remove(rest);
                    return Some(Change::Customer(rest.to_string(), None));
                }
                match serde_json::from_slice::<Customer>(kv.value()) {
                    Ok(customer) => {
                        view.generations.insert(rest.to_string(), kv.create_revision());
                        Some(Change::Customer(rest.to_string(), Some(customer)))
                    }
                    Err(e) => {
                        eprintln!("edgewise-control: etcd: customer {rest:?} unreadable ({e}); skipped");
                        None
                    }
                }
            }
            "functions" => {
                // `<bucket>/<name>`, the bucket the name's own (`function_key`).
                let (bucket, rest) = rest.split_once('/')?;
                if bucket != function_bucket(rest) {
                    eprintln!("edgewise-control: etcd: function key {key:?} is not in its bucket; skipped");
                    return None;
                }
                let stored = put.then(|| serde_json::from_slice::<StoredFunction>(kv.value())).transpose();
                let stored = stored.unwrap_or_else(|e| {
                    eprintln!("edgewise-control: etcd: function {rest:?} unreadable ({e}); skipped");
                    None
                });
                // A function of a deleted (or since re-created) customer is gone.
                let live = stored
                    .filter(|s| view.generations.get(&s.function.customer) == Some(&s.generation))
                    .map(|s| (s.key, s.function));
                Some(Change::Function(rest.to_string(), live))
            }
            "published" => put.then(|| Change::Published(rest.to_string())),
            "domains" => {
                let domain = put.then(|| serde_json::from_slice::<Domain>(kv.value())).transpose();
                match domain {
                    Ok(domain) => Some(Change::Domain(rest.to_string(), domain)),
                    Err(e) => {
                        eprintln!("edgewise-control: etcd: domain {rest:?} unreadable ({e}); skipped");
                        None
                    }
                }
            }
            "challenges" => {
                let answer = put.then(|| serde_json::from_slice::<(String, String)>(kv.value()).ok()).flatten();
                Some(Change::Challenge(rest.to_string(), answer))
            }
            "replicas" => {
                if put {
                    view.replicas.insert(rest.to_string());
                } else {
                    view.replicas.remove(rest);
                }
                None
            }
            "acks" => {
                let (customer, replica) = rest.split_once('/')?;
                let acks = view.acks.entry(customer.to_string()).or_default();
                if put {
                    acks.insert(replica.to_string(), String::from_utf8_lossy(kv.value()).into_owned());
                } else {
                    acks.remove(replica);
                }
                None
            }
            _ => None,
        }
    }

    fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
        header.map_or(0, etcd_client::ResponseHeader::revision)
    }

    /// A custom domain as stored, and its key's mod revision (0: absent).
    pub async fn domain(&self, name: &str) -> Result<(Option<Domain>, i64), ApiError> {
        let found = self.get(&self.key(&["domains", name]), None).await.map_err(unavailable)?;
        let Some(kv) = found.kvs().first() else { return Ok((None, 0)) };
        let domain =
            serde_json::from_slice(kv.value()).map_err(|e| ApiError::Internal(format!("domain {name}: {e}")))?;
        Ok((Some(domain), kv.mod_revision()))
    }

    /// Writes a custom domain (`None`: deletes it) if its key is still at `seen` (a mod
    /// revision; 0: absent): the revision written, or `None` when it changed meanwhile.
    pub async fn write_domain(&self, name: &str, domain: Option<&Domain>, seen: i64) -> Result<Option<i64>, ApiError> {
        let key = self.key(&["domains", name]);
        let op = match domain {
            Some(d) => {
                TxnOp::put(key.clone(), serde_json::to_vec(d).map_err(|e| ApiError::Internal(e.to_string()))?, None)
            }
            None => TxnOp::delete(key.clone(), None),
        };
        let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, seen)]).and_then([op]);
        let done = self.txn(txn).await.map_err(unavailable)?;
        Ok(done.succeeded().then(|| Self::revision_of(done.header())))
    }

    pub async fn secret(&self, name: &str) -> Result<Option<String>, String> {
        let found = self.get(&self.key(&["secrets", name]), None).await.map_err(|e| format!("etcd: {e}"))?;
        Ok(found.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    pub async fn put_secret(&self, name: &str, value: &str) -> Result<(), String> {
        let put = TxnOp::put(self.key(&["secrets", name]), value, None);
        self.txn(Txn::new().and_then([put])).await.map(drop).map_err(|e| format!("etcd: {e}"))
    }

    /// Publishes an HTTP-01 answer to every replica (`None`: withdraws it), under this replica's
    /// lease: one that dies takes its answers with it.
    pub async fn put_challenge(&self, token: &str, answer: Option<(&str, &str)>) -> Result<(), String> {
        let key = self.key(&["challenges", token]);
        let op = match answer {
            Some(answer) => {
                let value = serde_json::to_vec(&answer).map_err(|e| e.to_string())?;
                TxnOp::put(key, value, Some(PutOptions::new().with_lease(*lock(&self.lease))))
            }
            None => TxnOp::delete(key, None),
        };
        self.txn(Txn::new().and_then([op])).await.map(drop).map_err(|e| format!("etcd: {e}"))
    }

    /// Whether this replica leads `role` (one replica at a time, under its lease): takes the
    /// lead when nobody holds it.
    pub async fn lead(&self, role: &str) -> bool {
        let key = self.key(&["leaders", role]);
        let lease = *lock(&self.lease);
        let take = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), self.replica.clone(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        match self.txn(take).await {
            Ok(done) if done.succeeded() => true,
            Ok(done) => done.op_responses().into_iter().any(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => {
                    get.kvs().first().is_some_and(|kv| kv.value() == self.replica.as_bytes())
                }
                _ => false,
            }),
            Err(_) => false,
        }
    }

    /// Puts a customer: (created, revision).
    pub async fn put_customer(&self, name: &str, customer: &Customer) -> Result<(bool, i64), ApiError> {
        let key = self.key(&["customers", name]);
        let json = serde_json::to_vec(customer).map_err(|e| ApiError::Internal(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), json.clone(), None)])
            .or_else([TxnOp::put(key, json, None)]);
        let done = self.txn(txn).await.map_err(unavailable)?;
        Ok((done.succeeded(), Self::revision_of(done.header())))
    }

    /// Deletes a customer (its functions go with it: their generation ended), then removes its
    /// functions' keys: (revision of the deletion).
    pub async fn delete_customer(&self, name: &str) -> Result<i64, ApiError> {
        let key = self.key(&["customers", name]);
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Greater, 0)]).and_then([
            TxnOp::delete(key, None),
            TxnOp::delete(self.key(&["published", name]), None),
            TxnOp::delete(self.key(&["acks", name, ""]), Some(DeleteOptions::new().with_prefix())),
        ]);
        let done = self.txn(txn).await.map_err(unavailable)?;
        if !done.succeeded() {
            return Err(ApiError::NotFound(format!("no customer {name:?}")));
        }
        let revision = Self::revision_of(done.header());
        if let Err(e) = self.remove_functions_of(name, revision).await {
            // Harmless: they no longer count and their matches are free; deleting a customer of
            // this name again removes them too (it removes every older generation's).
            eprintln!("edgewise-control: removing the functions of deleted customer {name:?}: {e}");
        }
        Ok(revision)
    }

    /// Removes the keys of the functions a customer had before `revision` (their generation
    /// is over), one small transaction each.
    pub async fn remove_functions_of(&self, customer: &str, revision: i64) -> Result<(), String> {
        let mut owned = Vec::new();
        self.range(&self.key(&["owned", customer, ""]), revision, |kv| {
            if let Some(name) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.rsplit('/').next()) {
                owned.push(name.to_string());
            }
        })
        .await?;
        for name in owned {
            let key = self.function_key(&name);
            let current = self.get(&key, None).await.map_err(|e| e.to_string())?;
            let mut ops = vec![TxnOp::delete(self.key(&["owned", customer, &name]), None)];
            let mut compares = Vec::new();
            if let Some(item) = current.kvs().first() {
                let stored: Option<StoredFunction> = serde_json::from_slice(item.value()).ok();
                let gone = stored.as_ref().is_some_and(|s| s.function.customer == customer && s.generation < revision);
                if !gone {
                    // Stored again under this customer since: its index entry is current, kept.
                    // Moved to another customer: only the index entry goes.
                    if stored.is_some_and(|s| s.function.customer == customer) {
                        continue;
                    }
                } else if let Some(s) = stored {
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, item.mod_revision()));
                    ops.push(TxnOp::delete(key, None));
                    let matched = self.key(&["matches", &s.key]);
                    // The match, unless another function holds it now.
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::value(matched.clone(), CompareOp::Equal, name.as_bytes())])
                            .and_then([TxnOp::delete(matched, None)]),
                    ));
                }
            }
            self.txn(Txn::new().when(compares).and_then(ops)).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Puts a function whose route key is `key`: (created, revision). Refused when its customer
    /// does not exist or another function holds the match, checked in the transaction itself.
    pub async fn put_function(&self, name: &str, key: &str, function: &Function) -> Result<(bool, i64), ApiError> {
        let (own, matched) = (self.function_key(name), self.key(&["matches", key]));
        let customer_key = self.key(&["customers", &function.customer]);
        for _ in 0..ATTEMPTS {
            let read = Txn::new().and_then([
                TxnOp::get(customer_key.clone(), None),
                TxnOp::get(matched.clone(), None),
                TxnOp::get(own.clone(), None),
            ]);
            let read = self.txn(read).await.map_err(unavailable)?;
            let [customer, holder, old] = first_of(&read);
            let Some(customer) = customer else {
                return Err(ApiError::Invalid(crate::model::Invalid {
                    field: "customer".into(),
                    reason: format!("{:?} is no customer", function.customer),
                }));
            };
            let generation = customer.create_revision();
            let old_stored: Option<StoredFunction> = old.as_ref().and_then(|o| serde_json::from_slice(o.value()).ok());
            if let Some(holder) = &holder {
                if holder.value() != name.as_bytes() && self.holds(holder.value(), key).await? {
                    let other = String::from_utf8_lossy(holder.value());
                    return Err(ApiError::Conflict(format!("function {other:?} already has this match ({key})")));
                }
            }
            let stored = StoredFunction { key: key.to_string(), generation, function: function.clone() };
            let json = serde_json::to_vec(&stored).map_err(|e| ApiError::Internal(e.to_string()))?;
            let mut ops = vec![
                TxnOp::put(own.clone(), json, None),
                TxnOp::put(matched.clone(), name, None),
                TxnOp::put(self.key(&["owned", &function.customer, name]), generation.to_string(), None),
            ];
            if let Some(old) = &old_stored {
                if old.key != key {
                    let old_match = self.key(&["matches", &old.key]);
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::value(old_match.clone(), CompareOp::Equal, name.as_bytes())])
                            .and_then([TxnOp::delete(old_match, None)]),
                    ));
                }
                if old.function.customer != function.customer {
                    ops.push(TxnOp::delete(self.key(&["owned", &old.function.customer, name]), None));
                }
            }
            let compares = vec![
                Compare::mod_revision(customer_key.clone(), CompareOp::Equal, customer.mod_revision()),
                Compare::mod_revision(
                    matched.clone(),
                    CompareOp::Equal,
                    holder.as_ref().map_or(0, KeyValue::mod_revision),
                ),
                Compare::mod_revision(own.clone(), CompareOp::Equal, old.as_ref().map_or(0, KeyValue::mod_revision)),
            ];
            let done = self.txn(Txn::new().when(compares).and_then(ops)).await.map_err(unavailable)?;
            if done.succeeded() {
                let live = old_stored.is_some_and(|o| self.generation(&o.function.customer) == Some(o.generation));
                return Ok((!live, Self::revision_of(done.header())));
            }
        }
        Err(ApiError::Unavailable(format!("function {name:?}: the store kept changing under the write; try again")))
    }

    /// Whether the function `holder` still holds the match `key` (it exists, under its
    /// customer's current generation).
    async fn holds(&self, holder: &[u8], key: &str) -> Result<bool, ApiError> {
        let name = String::from_utf8_lossy(holder);
        let got = self.get(&self.function_key(&name), None).await.map_err(unavailable)?;
        let Some(item) = got.kvs().first() else { return Ok(false) };
        let Ok(stored) = serde_json::from_slice::<StoredFunction>(item.value()) else { return Ok(false) };
        let customer = self.get(&self.key(&["customers", &stored.function.customer]), None).await;
        let customer = customer.map_err(unavailable)?;
        Ok(stored.key == key && customer.kvs().first().is_some_and(|c| c.create_revision() == stored.generation))
    }

    fn generation(&self, customer: &str) -> Option<i64> {
        lock(&self.view).generations.get(customer).copied()
    }

    /// Deletes a function: the revision. `NotFound` when it does not exist (or its customer is gone).
    pub async fn delete_function(&self, name: &str) -> Result<i64, ApiError> {
        let own = self.function_key(name);
        let not_found = || ApiError::NotFound(format!("no function {name:?}"));
        for _ in 0..ATTEMPTS {
            let got = self.get(&own, None).await.map_err(unavailable)?;
            let Some(item) = got.kvs().first() else { return Err(not_found()) };
            let Ok(stored) = serde_json::from_slice::<StoredFunction>(item.value()) else { return Err(not_found()) };
            let customer = self.key(&["customers", &stored.function.customer]);
            let matched = self.key(&["matches", &stored.key]);
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(own.clone(), CompareOp::Equal, item.mod_revision()),
                    Compare::create_revision(customer, CompareOp::Equal, stored.generation),
                ])
                .and_then([
                    TxnOp::delete(own.clone(), None),
                    TxnOp::delete(self.key(&["owned", &stored.function.customer, name]), None),
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::value(matched.clone(), CompareOp::Equal, name.as_bytes())])
                            .and_then([TxnOp::delete(matched, None)]),
                    ),
                ]);
            let done = self.txn(txn).await.map_err(unavailable)?;
            if done.succeeded() {
                return Ok(Self::revision_of(done.header()));
            }
            if self.generation(&stored.function.customer) != Some(stored.generation) {
                return Err(not_found());
            }
        }
        Err(ApiError::Unavailable(format!("function {name:?}: the store kept changing under the write; try again")))
    }

    /// Records that every Envoy of this replica holds `customer`'s cluster and CA at
    /// `versions`, under the lease.
    pub async fn acknowledge(&self, customer: &str, versions: &str) {
        if lock(&self.written).get(customer).is_some_and(|v| v == versions) {
            return;
        }
        let lease = *lock(&self.lease);
        let put = PutOptions::new().with_lease(lease);
        let key = self.key(&["acks", customer, &self.replica]);
        // Only while the customer exists: an ack must not outlive it.
        let txn = Txn::new()
            .when([Compare::version(self.key(&["customers", customer]), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(key, versions, Some(put))]);
        match self.txn(txn).await {
            Ok(_) => {
                lock(&self.written).insert(customer.to_string(), versions.to_string());
            }
            Err(e) => eprintln!("edgewise-control: etcd: acknowledging {customer:?}: {e}"),
        }
    }

    /// Customers among `pending` that every live replica has acknowledged at `versions(c)`.
    pub fn acknowledged_everywhere(&self, pending: Vec<(String, String)>) -> Vec<String> {
        let view = lock(&self.view);
        pending
            .into_iter()
            .filter(|(customer, versions)| {
                let acks = view.acks.get(customer);
                !view.replicas.is_empty()
                    && view.replicas.iter().all(|r| acks.and_then(|a| a.get(r)).is_some_and(|v| v == versions))
            })
            .map(|(customer, _)| customer)
            .collect()
    }

    /// Publishes a customer (its routes enter the table), once, if it still exists.
    pub async fn publish(&self, customer: &str) {
        if !lock(&self.publishing).insert(customer.to_string()) {
            return;
        }
        let published = self.key(&["published", customer]);
        let txn = Txn::new()
            .when([
                Compare::version(self.key(&["customers", customer]), CompareOp::Greater, 0),
                Compare::version(published.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(published, "", None)]);
        if let Err(e) = self.txn(txn).await {
            eprintln!("edgewise-control: etcd: publishing {customer:?}: {e}");
        }
        lock(&self.publishing).remove(customer);
    }

    /// Forgets what this replica acknowledged of a customer that changed or went.
    pub fn forget(&self, customer: &str) {
        lock(&self.written).remove(customer);
    }

    /// Keeps the replica's lease alive; when it was lost (etcd unreachable longer than its
    /// TTL), takes a new one and registers again, and its acks are written again.
    pub async fn keep_alive(self: Arc<Self>) {
        loop {
            let lease = *lock(&self.lease);
            let at = self.endpoint.load(Ordering::Relaxed) % self.clients.len();
            let kept = match self.call(|c| async move { c.lease_client().keep_alive(lease).await }).await {
                Ok((mut keeper, mut responses)) => loop {
                    if keeper.keep_alive().await.is_err() {
                        break false;
                    }
                    match tokio::time::timeout(Duration::from_secs(2), responses.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => self.touched(),
                        // The lease is gone (it expired while this replica was cut off).
                        Ok(Ok(Some(_))) => break true,
                        _ => break false,
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                },
                Err(_) => false,
            };
            if !kept {
                self.next_endpoint(at);
            }
            if kept || self.stale().is_some() {
                let granted = self.call(|c| async move { c.lease_client().grant(LEASE_TTL, None).await }).await;
                if let Ok(granted) = granted {
                    let id = granted.id();
                    if self.register(id).await.is_ok() {
                        *lock(&self.lease) = id;
                        lock(&self.written).clear();
                        eprintln!("edgewise-control: etcd: replica {} registered again", self.replica);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Whether a request that failed so may be sent to another member: the member was not reached,
/// had no leader, or went away (or timed out) with the request. In the last case etcd may have
/// acted on it; every request here may be sent again: reads, puts of the same content, and
/// transactions whose compares fail when the first one took (a `PUT` then answers 200 rather
/// than 201, a `DELETE` 404).
fn member_failed(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown)
        }
        _ => false,
    }
}

/// The bucket of a function's key: two hex digits of the FNV-1a hash of its name, so that a
/// million functions load in ranges of about 4,000.
fn function_bucket(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{:02x}", (hash ^ (hash >> 32)) as u8)
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| e.to_string())
}

/// The first key-value of each of a transaction's three reads.
fn first_of(response: &etcd_client::TxnResponse) -> [Option<KeyValue>; 3] {
    let mut out = [None, None, None];
    for (slot, op) in out.iter_mut().zip(response.op_responses()) {
        if let etcd_client::TxnOpResponse::Get(got) = op {
            *slot = got.kvs().first().cloned();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::range_end;

    #[test]
    fn a_function_s_bucket_is_fixed_by_its_name() {
        // Stored keys: the bucket of a name must never change between versions.
        let buckets: Vec<String> =
            ["hello", "f0", "", "\u{e9}t\u{e9}"].iter().map(|n| super::function_bucket(n)).collect();
        assert_eq!(buckets, ["4d", "ec", "c1", "59"]);
        let spread: std::collections::HashSet<String> =
            (0..10_000).map(|i| super::function_bucket(&format!("f{i}"))).collect();
        assert_eq!(spread.len(), 256, "every bucket used");
    }

    #[test]
    fn a_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(range_end("/a/"), b"/a0");
        assert_eq!(range_end("ab"), b"ac");
        assert_eq!(range_end("a\u{7f}"), b"a\x80");
        assert_eq!(range_end(""), [0]);
    }
}
