//! The control service's state: the store, what it holds in memory, the xDS resources made of
//! it, and the route table the filters poll.
//!
//! Ordering, so that a route never names a cluster an Envoy does not have:
//! - a new customer's functions enter the route table only once every connected Envoy has
//!   acknowledged its cluster and its CA (the customer is then *published*); an Envoy that
//!   connects later receives every cluster before its listener serves;
//! - a removed customer's functions leave the route table at once, and its cluster and CA leave
//!   xDS `removal_delay` later, when every filter has polled the table without them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::etcd::{Change, Shared};
use crate::functions::Functions;
use crate::metrics::Metrics;
use crate::model::{check_name, Address, ApiError, Customer, Function, FunctionRules, Invalid};
use crate::resources::{ca_secret_name, Resources, CLUSTER, SECRET};
use crate::routes::{self, FullTable, Log, Routes, Since};
use crate::store::Store;

/// What one Envoy (one ADS stream) has acknowledged: type -> name -> version.
#[derive(Debug, Default)]
pub struct Acks {
    pub node: String,
    /// The address the stream comes from.
    pub client: Option<std::net::IpAddr>,
    /// Whether it takes every cluster (a wildcard subscription), rather than those it asks for
    /// (on-demand CDS, where a route may name a cluster the Envoy fetches when a request needs it).
    pub all_clusters: bool,
    pub acked: HashMap<&'static str, HashMap<String, String>>,
    /// When the oldest response it has not acknowledged was sent (`None`: none outstanding).
    pub unacked_since: Option<Instant>,
    /// Whether it was said (once) that publication no longer waits for it.
    pub lagging: bool,
}

/// How long publication waits for an Envoy to acknowledge what it was sent: one that never
/// reads, or has stopped, must not hold every other Envoy's new routes back.
pub const ACK_WAIT: Duration = Duration::from_secs(5);

impl Acks {
    /// Behind by more than `ACK_WAIT`: publication goes on without it.
    fn lagging(&self) -> bool {
        self.unacked_since.is_some_and(|t| t.elapsed() > ACK_WAIT)
    }

    fn has(&self, type_url: &str, name: &str, version: &str) -> bool {
        self.acked.get(type_url).and_then(|m| m.get(name)).is_some_and(|v| v == version)
    }
}

struct State {
    /// The local store; `None` with the shared one (etcd), whose revisions number the routes.
    store: Option<Store>,
    /// With the shared store: the revision being applied.
    revision: u64,
    /// The customers' names: the rest of them is in the xDS resources and the store.
    customers: BTreeSet<String>,
    functions: Functions,
    /// Customers waiting for publication (every other customer is published): few, if any.
    pending: HashSet<String>,
    /// Removed customers whose cluster is still served: name -> removal number.
    removing: HashMap<String, u64>,
    /// With the shared store: every customer as stored, so that reads are served from what the
    /// replica holds, etcd reachable or not (the local store reads its file).
    details: HashMap<String, Customer>,
    routes: Routes,
}

impl State {
    /// Whether the routes of `customer` (a stored customer) are in the table.
    fn visible(&self, customer: &str) -> bool {
        self.pending.is_empty() || !self.pending.contains(customer)
    }
}

pub struct Control {
    state: Mutex<State>,
    /// The route table's version, for the watchers to wait on.
    route_version: watch::Sender<u64>,
    resources: watch::Sender<Arc<Resources>>,
    streams: Mutex<HashMap<u64, Arc<Mutex<Acks>>>>,
    next_stream: AtomicU64,
    /// Numbers the removals, so that a delayed removal acts only if it is still the last one.
    removals: AtomicU64,
    pub metrics: Metrics,
    rules: FunctionRules,
    removal_delay: Duration,
    /// The shared store, when the replicas share one (etcd).
    shared: Option<Arc<Shared>>,
    /// The platform's client certificate chain and key, as last set.
    platform_client: Mutex<Option<(String, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The local store (every write path but the shared store's has one).
fn local(state: &mut State) -> Result<&mut Store, ApiError> {
    state.store.as_mut().ok_or_else(|| ApiError::Internal("no local store".into()))
}

impl Control {
    /// Loads the store. Every stored customer counts as published: the Envoys that had it
    /// still have it, and one that (re)connects gets it before its listener serves.
    pub fn open(store: Store, rules: FunctionRules, removal_delay: Duration) -> Result<Arc<Control>, String> {
        let contents = store.load()?;
        let mut resources = Resources::default();
        for (name, customer) in &contents.customers {
            let address = customer.check().map_err(|e| format!("stored customer {name}: {e}"))?;
            resources.put_customer(name, customer, &address);
        }
        let mut functions = Functions::new(rules.groups());
        store.functions(|name, _, f| drop(functions.put(&name, &f)))?;
        let routes = Routes::load(&contents);
        // The log as the store's functions say (the same, unless a change was cut short).
        let edits = functions.reconcile(|each| store.logged_routes(each), |_| true)?;
        let mut state = State {
            store: Some(store),
            revision: 0,
            customers: contents.customers.into_keys().collect(),
            functions,
            pending: HashSet::new(),
            removing: HashMap::new(),
            details: HashMap::new(),
            routes,
        };
        if let Some(store) = &mut state.store {
            state.routes.apply(Log::Store(store), edits)?;
        }
        Ok(Control::new(state, resources, rules, removal_delay, None))
    }

    fn new(
        state: State,
        resources: Resources,
        rules: FunctionRules,
        removal_delay: Duration,
        shared: Option<Arc<Shared>>,
    ) -> Arc<Control> {
        let control = Control {
            route_version: watch::Sender::new(state.routes.version()),
            metrics: Metrics::default(),
            state: Mutex::new(state),
            resources: watch::Sender::new(Arc::new(resources)),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            removals: AtomicU64::new(0),
            rules,
            removal_delay,
            shared,
            platform_client: Mutex::new(None),
        };
        control.published_routes(&lock(&control.state));
        control.gauges(&lock(&control.state));
        Arc::new(control)
    }

    /// A replica of the shared store: loads its snapshot and follows its changes (spawned).
    /// The route table's history is etcd's cluster id, its versions etcd's revisions: the same
    /// on every replica.
    pub async fn open_shared(
        shared: Arc<Shared>,
        rules: FunctionRules,
        removal_delay: Duration,
    ) -> Result<Arc<Control>, String> {
        // The lease lives while the snapshot loads (a million functions outlast its TTL).
        tokio::spawn(shared.clone().keep_alive());
        let (state, resources, now) = Control::snapshot(&shared, &rules).await?;
        let from = state.revision;
        let control = Control::new(state, resources, rules, removal_delay, Some(shared.clone()));
        let follower = control.clone();
        let replaying = shared.clone();
        tokio::spawn(async move {
            let mut from = from;
            loop {
                let why =
                    shared.follow(from as i64, |revision, changes| follower.apply(revision as u64, changes)).await;
                eprintln!("edgewise-control: etcd: {why}");
                // Compacted past what this replica holds: start again from a snapshot (watchers
                // behind it fetch the whole table).
                match Control::snapshot(&shared, &follower.rules).await {
                    Ok((state, resources, _)) => {
                        from = state.revision;
                        follower.reload(state, resources);
                    }
                    Err(e) => {
                        eprintln!("edgewise-control: etcd: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        // Serving once the replay has caught up with the store as it was at the start.
        while !replaying.caught_up_within(now, Duration::from_secs(10)).await {
            eprintln!("edgewise-control: etcd: still replaying the changes up to revision {now}");
        }
        Ok(control)
    }

    /// The shared store's contents as a state of their own, its route log empty at their
    /// revision (the table at that revision is where it starts).
    async fn snapshot(shared: &Shared, rules: &FunctionRules) -> Result<(State, Resources, i64), String> {
        let empty = |revision: u64| State {
            store: None,
            revision,
            customers: BTreeSet::new(),
            functions: Functions::new(rules.groups()),
            pending: HashSet::new(),
            removing: HashMap::new(),
            details: HashMap::new(),
            routes: Routes::at(shared.cluster, revision),
        };
        let (mut state, mut resources) = (empty(0), Resources::default());
        let mut published = HashSet::new();
        let (revision, now) = shared
            .snapshot(|change| match change {
                None => (state, resources, published) = (empty(0), Resources::default(), HashSet::new()),
                Some(Change::Customer(name, Some(customer))) => {
                    if let Ok(address) = customer.check() {
                        state.customers.insert(name.clone());
                        state.pending.insert(name.clone());
                        state.details.insert(name.clone(), customer.clone());
                        resources.put_customer(&name, &customer, &address);
                    }
                }
                Some(Change::Function(name, Some((_, function)))) => drop(state.functions.put(&name, &function)),
                Some(Change::Published(name)) => drop(published.insert(name)),
                Some(Change::Customer(_, None) | Change::Function(_, None)) => {}
            })
            .await?;
        let revision = revision as u64;
        state.pending.retain(|c| !published.contains(c));
        state.revision = revision;
        state.routes = Routes::at(shared.cluster, revision);
        Ok((state, resources, now))
    }

    fn reload(self: &Arc<Self>, state: State, resources: Resources) {
        let mut held = lock(&self.state);
        *held = state;
        self.resources.send_replace(Arc::new(resources));
        self.set_platform_client_again();
        self.published_routes(&held);
        self.gauges(&held);
    }

    /// One revision of the shared store, applied as the local store's writes are.
    fn apply(self: &Arc<Self>, revision: u64, changes: Vec<Change>) {
        let Some(shared) = &self.shared else { return };
        let mut state = lock(&self.state);
        state.revision = revision;
        for change in changes {
            match change {
                Change::Customer(name, Some(customer)) => match customer.check() {
                    Ok(address) => {
                        shared.forget(&name);
                        self.customer_stored(&mut state, &name, &customer, &address);
                    }
                    Err(e) => eprintln!("edgewise-control: etcd: customer {name:?} refused: {}", e.reason),
                },
                Change::Customer(name, None) => {
                    shared.forget(&name);
                    if state.customers.contains(&name) {
                        self.customer_gone(&mut state, &name);
                    }
                }
                Change::Function(name, Some((key, function))) => {
                    if state.customers.contains(&function.customer) {
                        self.function_stored(&mut state, &name, &key, &function);
                    }
                }
                Change::Function(name, None) => self.function_gone(&mut state, &name),
                Change::Published(name) => {
                    if state.pending.remove(&name) {
                        let edits =
                            state.functions.of_customer(&name).iter().map(|(_, k, f)| routes::put(k, f)).collect();
                        self.publish(&mut state, edits);
                    }
                }
            }
        }
        self.gauges(&state);
        drop(state);
        self.gate();
    }

    /// Waits until this replica has applied `revision` (a write of its own), so that what the
    /// API answered is what a read of it sees.
    async fn caught_up(&self, revision: i64) {
        if let Some(shared) = &self.shared {
            shared.caught_up(revision).await;
        }
    }

    /// How long the shared store has been out of reach, past the bound after which this
    /// replica stops serving what it holds.
    pub fn stale(&self) -> Option<Duration> {
        self.shared.as_ref().and_then(|s| s.stale())
    }

    pub fn resources(&self) -> watch::Receiver<Arc<Resources>> {
        self.resources.subscribe()
    }

    /// The whole route table, or `Err(cursor)` when `etag` names its version.
    pub fn routes(&self, etag: Option<&[u8]>) -> Result<FullTable, String> {
        let state = lock(&self.state);
        let version = state.routes.version();
        let tag = format!("\"{version}\"");
        if etag == Some(tag.as_bytes()) {
            return Err(state.routes.cursor());
        }
        let mut body = format!("{{\"version\":{version},\"routes\":[");
        state.functions.page(None, usize::MAX, |c| state.visible(c), &mut body);
        body.push_str("]}");
        Ok(FullTable { version, cursor: state.routes.cursor(), etag: tag, body: body.into() })
    }

    /// A page of the table: at most `limit` routes after the page token `after`
    /// (`{"version": N, "routes": [...], "next": "<token>"}`, no `next` on the last page), and
    /// the cursor to watch from.
    pub fn routes_page(&self, after: Option<&str>, limit: usize) -> Result<(String, hyper::body::Bytes), String> {
        let after = after.map(routes::read_page_token).transpose()?;
        let state = lock(&self.state);
        let mut body = format!("{{\"version\":{},\"routes\":[", state.routes.version());
        let visible = |c: &str| state.visible(c);
        let next = state.functions.page(after, limit.clamp(1, routes::MAX_PAGE), visible, &mut body);
        body.push(']');
        if let Some(next) = next {
            body.push_str(&format!(",\"next\":\"{}\"", routes::page_token(next)));
        }
        body.push_str("}\n");
        Ok((state.routes.cursor(), body.into()))
    }

    /// What a watcher at `cursor` is owed.
    pub fn routes_since(&self, cursor: &str) -> Since {
        lock(&self.state).routes.since(cursor)
    }

    /// The route table's version, changing with it.
    pub fn route_version(&self) -> watch::Receiver<u64> {
        self.route_version.subscribe()
    }

    /// Adds or replaces a customer; true when it is new.
    pub async fn put_customer(&self, name: &str, customer: Customer) -> Result<bool, ApiError> {
        check_name("name", name)?;
        let address = customer.check()?;
        if let Some(shared) = &self.shared {
            let (created, revision) = shared.put_customer(name, &customer).await?;
            self.caught_up(revision).await;
            return Ok(created);
        }
        let mut state = lock(&self.state);
        local(&mut state)?.put_customer(name, &customer).map_err(ApiError::Internal)?;
        let created = self.customer_stored(&mut state, name, &customer, &address);
        drop(state);
        self.gate();
        Ok(created)
    }

    fn customer_stored(&self, state: &mut State, name: &str, customer: &Customer, address: &Address) -> bool {
        let created = state.customers.insert(name.to_string());
        if created {
            state.pending.insert(name.to_string());
        }
        if state.store.is_none() {
            state.details.insert(name.to_string(), customer.clone());
        }
        state.removing.remove(name);
        self.resources.send_modify(|r| Arc::make_mut(r).put_customer(name, customer, address));
        self.gauges(state);
        created
    }

    /// Removes a customer and its functions; how many functions went with it.
    pub async fn delete_customer(self: &Arc<Self>, name: &str) -> Result<usize, ApiError> {
        if let Some(shared) = &self.shared {
            let functions = lock(&self.state).functions.count_of(name);
            let revision = shared.delete_customer(name).await?;
            self.caught_up(revision).await;
            return Ok(functions);
        }
        let mut state = lock(&self.state);
        if !state.customers.contains(name) {
            return Err(ApiError::NotFound(format!("no customer {name:?}")));
        }
        local(&mut state)?.delete_customer(name).map_err(ApiError::Internal)?;
        Ok(self.customer_gone(&mut state, name))
    }

    /// A customer gone from the store: its routes leave the table now, its cluster and CA
    /// `removal_delay` later. How many functions went with it.
    fn customer_gone(self: &Arc<Self>, state: &mut State, name: &str) -> usize {
        state.customers.remove(name);
        state.details.remove(name);
        let gone = state.functions.of_customer(name);
        let was_published = !state.pending.remove(name);
        let mut edits = Vec::new();
        for (function, key, f) in &gone {
            state.functions.remove(function);
            if was_published {
                edits.push(routes::delete(key, f));
            }
        }
        self.publish(state, edits);
        self.gauges(state);
        let (control, name) = (self.clone(), name.to_string());
        let removal = self.removals.fetch_add(1, Ordering::Relaxed) + 1;
        state.removing.insert(name.clone(), removal);
        tokio::spawn(async move {
            tokio::time::sleep(control.removal_delay).await;
            // Unless it came back (and maybe went again) meanwhile.
            let mut state = lock(&control.state);
            if state.removing.get(&name) == Some(&removal) {
                state.removing.remove(&name);
                control.resources.send_modify(|r| Arc::make_mut(r).remove_customer(&name));
            }
        });
        gone.len()
    }

    pub async fn put_function(&self, name: &str, function: Function) -> Result<bool, ApiError> {
        check_name("name", name)?;
        let key = self.rules.key(&function)?;
        if let Some(shared) = &self.shared {
            let (created, revision) = shared.put_function(name, &key, &function).await?;
            self.caught_up(revision).await;
            return Ok(created);
        }
        let mut state = lock(&self.state);
        if !state.customers.contains(&function.customer) {
            return Err(ApiError::Invalid(Invalid {
                field: "customer".into(),
                reason: format!("{:?} is no customer", function.customer),
            }));
        }
        if let Some(other) = state.functions.owner_of(&key).filter(|other| *other != name) {
            return Err(ApiError::Conflict(format!("function {other:?} already has this match ({key})")));
        }
        local(&mut state)?.put_function(name, &key, &function).map_err(ApiError::Internal)?;
        Ok(self.function_stored(&mut state, name, &key, &function))
    }

    fn function_stored(&self, state: &mut State, name: &str, key: &str, function: &Function) -> bool {
        let visible = state.visible(&function.customer);
        let old = state.functions.put(name, function);
        let created = old.is_none();
        let mut edits = Vec::new();
        let mut unchanged = false;
        if let Some((old_key, old_function)) = old {
            let was_visible = state.visible(&old_function.customer);
            unchanged = was_visible && visible && old_key == key && old_function == *function;
            if was_visible && (old_key != key || !visible) {
                edits.push(routes::delete(&old_key, &old_function));
            }
        }
        if visible && !unchanged {
            edits.push(routes::put(key, function));
        }
        self.publish(state, edits);
        self.gauges(state);
        created
    }

    pub async fn delete_function(&self, name: &str) -> Result<(), ApiError> {
        if let Some(shared) = &self.shared {
            let revision = shared.delete_function(name).await?;
            self.caught_up(revision).await;
            return Ok(());
        }
        let mut state = lock(&self.state);
        if !state.functions.contains(name) {
            return Err(ApiError::NotFound(format!("no function {name:?}")));
        }
        local(&mut state)?.delete_function(name).map_err(ApiError::Internal)?;
        self.function_gone(&mut state, name);
        Ok(())
    }

    fn function_gone(&self, state: &mut State, name: &str) {
        if let Some((key, function)) = state.functions.remove(name) {
            if state.visible(&function.customer) {
                self.publish(state, vec![routes::delete(&key, &function)]);
            }
        }
        self.gauges(state);
    }

    /// (customer, published) of every customer, or of one, as stored.
    pub fn customers(&self, only: Option<&str>) -> Result<Vec<(String, Customer, bool)>, ApiError> {
        let mut state = lock(&self.state);
        let stored = match state.store.as_mut() {
            Some(store) => store.customers(only).map_err(ApiError::Internal)?,
            None => {
                let mut held: Vec<(String, Customer)> = state
                    .details
                    .iter()
                    .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
                    .map(|(name, c)| (name.clone(), c.clone()))
                    .collect();
                held.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                held
            }
        };
        Ok(stored.into_iter().map(|(n, c)| (n.clone(), c, !state.pending.contains(&n))).collect())
    }

    /// How many customers and functions there are.
    pub fn counts(&self) -> (usize, usize) {
        let state = lock(&self.state);
        (state.customers.len(), state.functions.len())
    }

    pub fn functions(&self, only: Option<&str>) -> Vec<(String, Function)> {
        let state = lock(&self.state);
        match only {
            Some(name) => state.functions.get(name).map(|f| (name.to_string(), f)).into_iter().collect(),
            None => {
                let mut all: Vec<(String, Function)> = state.functions.all().map(|(n, f)| (n.to_string(), f)).collect();
                all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                all
            }
        }
    }

    pub fn set_platform_client(&self, chain: &str, key: &str) {
        *lock(&self.platform_client) = Some((chain.to_string(), key.to_string()));
        self.resources.send_modify(|r| Arc::make_mut(r).put_platform_client(chain, key));
    }

    fn set_platform_client_again(&self) {
        if let Some((chain, key)) = lock(&self.platform_client).clone() {
            self.resources.send_modify(|r| Arc::make_mut(r).put_platform_client(&chain, &key));
        }
    }

    /// A new ADS stream from `client`: its id and what it acknowledges; or, when `client`
    /// already holds `per_client` streams, how many it holds.
    pub fn register_stream(
        &self,
        client: Option<std::net::IpAddr>,
        per_client: usize,
    ) -> Result<(u64, Arc<Mutex<Acks>>), usize> {
        let mut streams = lock(&self.streams);
        let held = streams.values().filter(|s| client.is_some() && lock(s).client == client).count();
        if held >= per_client {
            return Err(held);
        }
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let acks = Arc::new(Mutex::new(Acks { client, ..Acks::default() }));
        streams.insert(id, acks.clone());
        self.metrics.xds_streams.store(streams.len() as u64, Ordering::Relaxed);
        Ok((id, acks))
    }

    pub fn unregister_stream(&self, id: u64) {
        let mut streams = lock(&self.streams);
        streams.remove(&id);
        self.metrics.xds_streams.store(streams.len() as u64, Ordering::Relaxed);
        drop(streams);
        // An Envoy that left no longer holds anything back.
        self.gate();
    }

    /// Publishes the customers every connected Envoy has (cluster and CA, current versions).
    pub fn gate(&self) {
        let mut state = lock(&self.state);
        let pending: Vec<String> = state.pending.iter().cloned().collect();
        if pending.is_empty() {
            return;
        }
        let resources = self.resources.borrow().clone();
        let streams: Vec<Arc<Mutex<Acks>>> = lock(&self.streams).values().cloned().collect();
        let mut newly = Vec::new();
        for customer in pending {
            let (Some(cluster), Some(ca)) =
                (resources.clusters.get(&customer), resources.secrets.get(&ca_secret_name(&customer)))
            else {
                continue;
            };
            let everywhere = streams.iter().all(|s| {
                let mut acks = lock(s);
                if acks.all_clusters && acks.lagging() && !acks.lagging {
                    acks.lagging = true;
                    eprintln!(
                        "edgewise-control: {:?} has not acknowledged its updates for {} s; publication goes on without it",
                        acks.node,
                        ACK_WAIT.as_secs()
                    );
                }
                !acks.all_clusters
                    || acks.lagging()
                    || (acks.has(CLUSTER, &customer, &cluster.version) && acks.has(SECRET, &ca.name, &ca.version))
            });
            if everywhere {
                newly.push((customer, format!("{}/{}", cluster.version, ca.version)));
            }
        }
        if let Some(shared) = &self.shared {
            // Across replicas: this replica says so in the store; the customer is published
            // once every live replica has.
            let everywhere = shared.acknowledged_everywhere(newly.clone());
            drop(state);
            let shared = shared.clone();
            tokio::spawn(async move {
                for (customer, versions) in newly {
                    shared.acknowledge(&customer, &versions).await;
                }
                for customer in everywhere {
                    shared.publish(&customer).await;
                }
            });
            return;
        }
        let newly: Vec<String> = newly.into_iter().map(|(c, _)| c).collect();
        for customer in &newly {
            state.pending.remove(customer);
        }
        let edits: Vec<routes::Edit> = newly
            .iter()
            .flat_map(|c| state.functions.of_customer(c))
            .map(|(_, key, f)| routes::put(&key, &f))
            .collect();
        self.publish(&mut state, edits);
        self.gauges(&state);
    }

    /// Whether a stored customer waits for publication.
    fn unpublished(&self) -> bool {
        let state = lock(&self.state);
        !state.pending.is_empty()
    }

    /// The gauges of what the state holds.
    fn gauges(&self, state: &State) {
        let m = &self.metrics;
        m.customers.store(state.customers.len() as u64, Ordering::Relaxed);
        m.functions.store(state.functions.len() as u64, Ordering::Relaxed);
        m.published.store((state.customers.len() - state.pending.len()) as u64, Ordering::Relaxed);
    }

    /// Applies `edits` to the route table (logged in the store first) and wakes its watchers.
    fn publish(&self, state: &mut State, edits: Vec<routes::Edit>) {
        let State { routes, store, revision, .. } = state;
        let log = match store {
            Some(store) => Log::Store(store),
            None => Log::Revision(*revision),
        };
        match routes.apply(log, edits) {
            Ok(Some(_)) => self.published_routes(state),
            Ok(None) => {}
            // The functions are stored: the next start reconciles the log with them.
            Err(e) => eprintln!("edgewise-control: route changes not logged: {e}"),
        }
        self.gauges(state);
    }

    fn published_routes(&self, state: &State) {
        let version = state.routes.version();
        self.metrics.routes_version.store(version, Ordering::Relaxed);
        // The functions of customers not published yet are not in the table.
        let waiting: usize = state.pending.iter().map(|c| state.functions.count_of(c)).sum();
        let routes = state.functions.len() - waiting;
        self.metrics.routes.store(routes as u64, Ordering::Relaxed);
        self.route_version.send_replace(version);
    }
}

/// Runs the publication rule again while a customer waits for it, so that one held back by an
/// Envoy that stopped acknowledging goes out once that Envoy is `ACK_WAIT` behind.
pub async fn recheck_publication(control: Arc<Control>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if control.unpublished() {
            control.gate();
        }
        let lagging = lock(&control.streams).values().filter(|s| lock(s).lagging()).count();
        control.metrics.xds_lagging.store(lagging as u64, Ordering::Relaxed);
    }
}
