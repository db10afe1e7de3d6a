//! The control service's state: the store, what it holds in memory, the xDS resources made of
//! it, and the route table the filters poll.
//!
//! Ordering, so that a route never names a cluster an Envoy does not have:
//! - a new customer's functions enter the route table only once every connected Envoy has
//!   acknowledged its cluster and its CA (the customer is then *published*); an Envoy that
//!   connects later receives every cluster before its listener serves;
//! - a removed customer's functions leave the route table at once, and its cluster and CA leave
//!   xDS `removal_delay` later, when every filter has polled the table without them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::domains::{check_domain, Certificate, Domain, DomainRequest, Domains};
use crate::etcd::{Change, Shared};
use crate::functions::Functions;
use crate::metrics::Metrics;
use crate::model::{check_name, Address, ApiError, Customer, Function, FunctionRules, Invalid};
use crate::resources::{ca_secret_name, Resources, CLUSTER, SECRET};
use crate::routes::{self, FullTable, Line, Log, Routes, Since};
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
    /// Custom domains (the local store only).
    domains: Domains,
    /// The custom domains' routes in the table: domain -> route JSON.
    domain_routes: BTreeMap<String, String>,
    /// HTTP-01 challenges being answered: token -> (domain, key authorization).
    challenges: HashMap<String, (String, String)>,
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
    /// Wakes the ACME worker (a domain added, or its function changed).
    pub acme_wake: tokio::sync::Notify,
    /// Custom domains held at most (`--max-domains`).
    pub max_domains: std::sync::atomic::AtomicUsize,
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
        let mut functions = Functions::new(rules.decoder());
        store.functions(|name, _, f| drop(functions.put(&name, &f)))?;
        let routes = Routes::load(&contents);
        // The log as the store's functions say (the same, unless a change was cut short);
        // custom domains' routes (keys with a dot) are reconciled with the domains below.
        let mut domain_routes = BTreeMap::new();
        let edits = functions.reconcile(
            |each| {
                store.logged_routes(|key, json| {
                    if is_domain_key(&key) {
                        domain_routes.insert(key, json);
                    } else {
                        each(key, json);
                    }
                })
            },
            |_| true,
        )?;
        let domains: Domains = store.domains()?.into_iter().collect();
        let now = unix_now();
        for (name, domain) in domains.iter() {
            if let Some(c) = domain.valid_certificate(now) {
                resources.put_domain_certificate(name, &c.chain, &c.key);
            }
        }
        let mut state = State {
            store: Some(store),
            revision: 0,
            customers: contents.customers.into_keys().collect(),
            functions,
            pending: HashSet::new(),
            removing: HashMap::new(),
            details: HashMap::new(),
            routes,
            domains,
            domain_routes,
            challenges: HashMap::new(),
        };
        let mut edits = edits;
        edits.extend(domain_edits(&mut state, None));
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
            acme_wake: tokio::sync::Notify::new(),
            max_domains: std::sync::atomic::AtomicUsize::new(MAX_DOMAINS),
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
            functions: Functions::new(rules.decoder()),
            pending: HashSet::new(),
            removing: HashMap::new(),
            details: HashMap::new(),
            routes: Routes::at(shared.cluster, revision),
            domains: Domains::default(),
            domain_routes: BTreeMap::new(),
            challenges: HashMap::new(),
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
                Some(Change::Domain(name, Some(domain))) => {
                    if let Some(c) = domain.valid_certificate(unix_now()) {
                        resources.put_domain_certificate(&name, &c.chain, &c.key);
                    }
                    state.domains.insert(name, domain);
                }
                Some(Change::Challenge(token, Some(answer))) => drop(state.challenges.insert(token, answer)),
                Some(
                    Change::Customer(_, None)
                    | Change::Function(_, None)
                    | Change::Domain(_, None)
                    | Change::Challenge(_, None),
                ) => {}
            })
            .await?;
        let revision = revision as u64;
        state.pending.retain(|c| !published.contains(c));
        state.revision = revision;
        state.routes = Routes::at(shared.cluster, revision);
        // The domains' routes as the table at this revision has them (no edits: it starts here).
        drop(domain_edits(&mut state, None));
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
                Change::Domain(name, domain) => self.domain_stored(&mut state, &name, domain),
                Change::Challenge(token, answer) => match answer {
                    Some(answer) => drop(state.challenges.insert(token, answer)),
                    None => drop(state.challenges.remove(&token)),
                },
                Change::Published(name) => {
                    if state.pending.remove(&name) {
                        let functions = state.functions.of_customer(&name);
                        let edits = functions.iter().map(|(_, k, f)| routes::put(k, f)).collect();
                        let names: Vec<String> = functions.into_iter().map(|(n, _, _)| n).collect();
                        self.publish(&mut state, edits, &names);
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
        push_domain_routes(&state, &mut body);
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
        if next.is_none() {
            // The custom domains (thousands, not millions) go with the last page.
            push_domain_routes(&state, &mut body);
        }
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

    /// A streamed watch's next line from `cursor` (see `Routes::line_since`).
    pub fn line_since(&self, cursor: &str) -> Result<Option<Line>, String> {
        lock(&self.state).routes.line_since(cursor)
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
        let names: Vec<String> = gone.iter().map(|(n, _, _)| n.clone()).collect();
        self.publish(state, edits, &names);
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
        // The function and its route log entries: one transaction, one sync.
        let store = local(&mut state)?;
        store.begin().map_err(ApiError::Internal)?;
        if let Err(e) = store.put_function(name, &key, &function) {
            store.rollback();
            return Err(ApiError::Internal(e));
        }
        let created = self.function_stored(&mut state, name, &key, &function);
        // Failing here, memory is ahead of the disk: the next start reconciles the log with
        // the functions stored, as when the log alone fails.
        local(&mut state)?.commit().map_err(ApiError::Internal)?;
        Ok(created)
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
        self.publish(state, edits, &[name.to_string()]);
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
        let store = local(&mut state)?;
        store.begin().map_err(ApiError::Internal)?;
        if let Err(e) = store.delete_function(name) {
            store.rollback();
            return Err(ApiError::Internal(e));
        }
        self.function_gone(&mut state, name);
        local(&mut state)?.commit().map_err(ApiError::Internal)
    }

    fn function_gone(&self, state: &mut State, name: &str) {
        if let Some((key, function)) = state.functions.remove(name) {
            if state.visible(&function.customer) {
                self.publish(state, vec![routes::delete(&key, &function)], &[name.to_string()]);
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
        let functions: Vec<(String, String, Function)> =
            newly.iter().flat_map(|c| state.functions.of_customer(c)).collect();
        let edits = functions.iter().map(|(_, key, f)| routes::put(key, f)).collect();
        let names: Vec<String> = functions.into_iter().map(|(n, _, _)| n).collect();
        self.publish(&mut state, edits, &names);
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

    /// Applies `edits` to the route table (logged in the store first), with those of the custom
    /// domains of `functions` (the functions the edits put, moved or removed), and wakes its
    /// watchers.
    fn publish(&self, state: &mut State, mut edits: Vec<routes::Edit>, functions: &[String]) {
        let domains: Vec<String> = functions.iter().flat_map(|f| state.domains.of_function(f)).cloned().collect();
        for domain in domains {
            edits.extend(domain_edits(state, Some(&domain)));
        }
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

/// Custom domains held at most, by default.
pub const MAX_DOMAINS: usize = 100_000;

/// Whether a route key is a custom domain's (function keys hold no dot).
fn is_domain_key(key: &str) -> bool {
    key.contains('.')
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A custom domain's route as the filter reads it: its function's cluster and Host.
fn domain_route_json(domain: &str, f: &Function) -> String {
    serde_json::json!({ "domain": domain, "cluster": f.customer, "host": f.host }).to_string()
}

/// The edits that make the custom domains' routes in the table what their functions say (the
/// domain `only`, or all): a domain whose function exists, of a published customer, is routed.
fn domain_edits(state: &mut State, only: Option<&str>) -> Vec<routes::Edit> {
    let mut edits = Vec::new();
    let names: Vec<String> = match only {
        Some(name) => vec![name.to_string()],
        None => state.domains.keys().chain(state.domain_routes.keys()).cloned().collect(),
    };
    for name in names {
        let want = state
            .domains
            .get(&name)
            .and_then(|d| state.functions.get(&d.function))
            .filter(|f| state.visible(&f.customer))
            .map(|f| domain_route_json(&name, &f));
        let have = state.domain_routes.get(&name);
        if want.as_ref() == have {
            continue;
        }
        match want {
            Some(json) => {
                edits.push(routes::Edit { key: name.clone(), put: true, json: json.clone() });
                state.domain_routes.insert(name, json);
            }
            None => {
                let json = serde_json::json!({ "domain": name }).to_string();
                edits.push(routes::Edit { key: name.clone(), put: false, json });
                state.domain_routes.remove(&name);
            }
        }
    }
    edits
}

/// The custom domains' routes, appended to a list of routes.
fn push_domain_routes(state: &State, body: &mut String) {
    for json in state.domain_routes.values() {
        if !body.ends_with('[') {
            body.push(',');
        }
        body.push_str(json);
    }
}

/// The ACME worker's view of a domain due for a certificate.
pub struct Due {
    pub domain: String,
    pub failures: u32,
}

impl Control {
    /// What `request` makes of the domain `name` as it stands (`current`): the domain to store,
    /// `None` when nothing changes.
    fn domain_change(
        &self,
        state: &State,
        name: &str,
        request: &DomainRequest,
        current: Option<&Domain>,
    ) -> Result<Option<Domain>, ApiError> {
        let Some(function) = state.functions.get(&request.function) else {
            return Err(ApiError::Invalid(Invalid {
                field: "function".into(),
                reason: format!("{:?} is no function", request.function),
            }));
        };
        match current {
            Some(d) if d.function == request.function => Ok(None),
            Some(d) => {
                let owner = state.functions.get(&d.function).map(|f| f.customer);
                if owner.as_deref() != Some(function.customer.as_str()) {
                    return Err(ApiError::Conflict(format!(
                        "{name} is the custom domain of function {:?}, of another customer",
                        d.function
                    )));
                }
                Ok(Some(Domain { function: request.function.clone(), ..d.clone() }))
            }
            None => {
                let max = self.max_domains.load(Ordering::Relaxed);
                if state.domains.len() >= max {
                    return Err(ApiError::Conflict(format!(
                        "{} custom domains already: at most {max} (--max-domains)",
                        state.domains.len()
                    )));
                }
                Ok(Some(Domain::new(&request.function)))
            }
        }
    }

    /// Adds a custom domain routed to `request.function`, or moves it to another function of
    /// the same customer; true when it is new.
    pub async fn put_domain(&self, domain: &str, request: DomainRequest) -> Result<bool, ApiError> {
        let name = check_domain(domain, self.rules.domain())?;
        if let Some(shared) = &self.shared {
            for _ in 0..8 {
                let (current, seen) = shared.domain(&name).await?;
                let change = self.domain_change(&lock(&self.state), &name, &request, current.as_ref())?;
                let Some(change) = change else { return Ok(false) };
                if let Some(revision) = shared.write_domain(&name, Some(&change), seen).await? {
                    self.caught_up(revision).await;
                    self.acme_wake.notify_one();
                    return Ok(current.is_none());
                }
            }
            return Err(ApiError::Conflict(format!("{name} kept changing under this write: try again")));
        }
        let mut state = lock(&self.state);
        let current = state.domains.get(&name).cloned();
        let Some(change) = self.domain_change(&state, &name, &request, current.as_ref())? else {
            return Ok(false);
        };
        local(&mut state)?.put_domain(&name, &change).map_err(ApiError::Internal)?;
        self.domain_stored(&mut state, &name, Some(change));
        drop(state);
        self.acme_wake.notify_one();
        Ok(current.is_none())
    }

    /// A domain stored (or gone): its route follows at once, its certificate is served (or no
    /// longer: an Envoy then refuses the name's handshakes).
    fn domain_stored(&self, state: &mut State, name: &str, domain: Option<Domain>) {
        let certificate = domain.as_ref().and_then(|d| d.valid_certificate(unix_now()).cloned());
        match domain {
            Some(d) => state.domains.insert(name.to_string(), d),
            None => {
                state.domains.remove(name);
                state.challenges.retain(|_, (d, _)| d != name);
            }
        }
        let edits = domain_edits(state, Some(name));
        self.publish(state, edits, &[]);
        self.metrics.domains.store(state.domains.len() as u64, Ordering::Relaxed);
        // Only a change copies the resources (the streams hold the version they sent).
        let wanted = certificate.map(|c| crate::resources::certificate(name, &c.chain, &c.key));
        self.resources.send_if_modified(|r| match wanted {
            Some(secret) if r.secrets.get(name).is_none_or(|have| have.version != secret.version) => {
                Arc::make_mut(r).secrets.insert(name.to_string(), secret);
                true
            }
            None if r.secrets.contains_key(name) => {
                Arc::make_mut(r).remove_domain_certificate(name);
                true
            }
            _ => false,
        });
    }

    /// Removes a custom domain.
    pub async fn delete_domain(&self, domain: &str) -> Result<(), ApiError> {
        let name = domain.strip_suffix('.').unwrap_or(domain).to_ascii_lowercase();
        if let Some(shared) = &self.shared {
            for _ in 0..8 {
                let (current, seen) = shared.domain(&name).await?;
                if current.is_none() {
                    return Err(ApiError::NotFound(format!("no custom domain {name:?}")));
                }
                if let Some(revision) = shared.write_domain(&name, None, seen).await? {
                    self.caught_up(revision).await;
                    return Ok(());
                }
            }
            return Err(ApiError::Conflict(format!("{name} kept changing under this write: try again")));
        }
        let mut state = lock(&self.state);
        if !state.domains.contains_key(&name) {
            return Err(ApiError::NotFound(format!("no custom domain {name:?}")));
        }
        local(&mut state)?.delete_domain(&name).map_err(ApiError::Internal)?;
        self.domain_stored(&mut state, &name, None);
        Ok(())
    }

    /// Every custom domain, or one, as the API shows it.
    pub fn domains(&self, only: Option<&str>) -> Vec<serde_json::Value> {
        let state = lock(&self.state);
        let now = unix_now();
        // Routed: its function exists, of a published customer.
        let view = |(name, d): (&String, &Domain)| d.view(name, now, state.domain_routes.contains_key(name));
        match only.map(|d| d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase()) {
            Some(name) => state.domains.get_key_value(&name).map(view).into_iter().collect(),
            None => state.domains.iter().map(view).collect(),
        }
    }

    /// The key authorization for an HTTP-01 challenge `token`, if `host` is the domain it is for.
    pub fn challenge(&self, token: &str, host: &str) -> Option<String> {
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h).to_ascii_lowercase();
        let state = lock(&self.state);
        let answer = state.challenges.get(token).filter(|(domain, _)| *domain == host);
        answer.map(|(_, key_authorization)| key_authorization.clone())
    }

    /// Answers (`Some`) or withdraws an HTTP-01 challenge, on every replica.
    pub async fn set_challenge(&self, token: &str, answer: Option<(&str, &str)>) -> Result<(), String> {
        if let Some(shared) = &self.shared {
            // Every replica serves it once its watch brings it (the ingress retries another
            // replica on a 404 meanwhile).
            shared.put_challenge(token, answer).await?;
        }
        let mut state = lock(&self.state);
        match answer {
            Some((domain, key_authorization)) => {
                state.challenges.insert(token.into(), (domain.into(), key_authorization.into()))
            }
            None => state.challenges.remove(token),
        };
        Ok(())
    }

    /// Whether this replica runs the ACME orders: the one replica of the local store; of the
    /// shared store's replicas, the one that holds the lead.
    pub async fn leads_acme(&self) -> bool {
        match &self.shared {
            Some(shared) => shared.lead("acme").await,
            None => true,
        }
    }

    /// At most `limit` domains due for a certificate now (none yet, or in the last third of its
    /// lifetime), past their back-off, but those in `busy`.
    pub fn domains_due(&self, limit: usize, busy: &HashSet<String>) -> Vec<Due> {
        let state = lock(&self.state);
        let (now, now_ms) = (unix_now(), unix_now_ms());
        state
            .domains
            .iter()
            // A domain whose function is gone keeps its entry (and its certificate until it
            // expires) but is not renewed: it routes nowhere.
            .filter(|(name, d)| {
                d.renewal_due(now)
                    && d.next_attempt_ms <= now_ms
                    && !busy.contains(*name)
                    && state.functions.contains(&d.function)
            })
            .take(limit)
            .map(|(name, d)| Due { domain: name.clone(), failures: d.failures })
            .collect()
    }

    /// Records the outcome of an order for `domain`: `update` changes the domain as stored
    /// (unless it was removed meanwhile), then the change is served.
    async fn update_domain(&self, domain: &str, update: impl Fn(&mut Domain)) -> Result<(), String> {
        if let Some(shared) = &self.shared {
            for _ in 0..8 {
                let (current, seen) = shared.domain(domain).await.map_err(|e| format!("{e:?}"))?;
                let Some(mut d) = current else { return Ok(()) };
                update(&mut d);
                if let Some(revision) =
                    shared.write_domain(domain, Some(&d), seen).await.map_err(|e| format!("{e:?}"))?
                {
                    // Applied here before the worker looks for due domains again.
                    self.caught_up(revision).await;
                    return Ok(());
                }
            }
            return Err(format!("{domain} kept changing under this write"));
        }
        let mut state = lock(&self.state);
        let Some(mut d) = state.domains.get(domain).cloned() else { return Ok(()) };
        update(&mut d);
        local(&mut state).map_err(|e| format!("{e:?}"))?.put_domain(domain, &d)?;
        self.domain_stored(&mut state, domain, Some(d));
        Ok(())
    }

    /// A certificate obtained: stored, then served.
    pub async fn domain_issued(&self, domain: &str, certificate: Certificate) -> Result<(), String> {
        self.update_domain(domain, |d| {
            (d.certificate, d.error, d.failures, d.next_attempt_ms) = (Some(certificate.clone()), None, 0, 0);
        })
        .await?;
        self.metrics.acme(true);
        Ok(())
    }

    /// An attempt failed: said in the status, retried after `retry_in`. A certificate still
    /// valid keeps being served.
    pub async fn domain_failed(&self, domain: &str, error: &str, retry_in: Duration) -> Result<(), String> {
        let next = unix_now_ms() + retry_in.as_millis() as u64;
        self.update_domain(domain, |d| {
            d.error = Some(error.into());
            d.failures = d.failures.saturating_add(1);
            d.next_attempt_ms = next;
        })
        .await?;
        self.metrics.acme(false);
        Ok(())
    }

    /// A secret kept in the store (the ACME account).
    pub async fn secret(&self, key: &str) -> Result<Option<String>, String> {
        if let Some(shared) = &self.shared {
            return shared.secret(key).await;
        }
        let mut state = lock(&self.state);
        local(&mut state).map_err(|e| format!("{e:?}"))?.secret(key)
    }

    pub async fn put_secret(&self, key: &str, value: &str) -> Result<(), String> {
        if let Some(shared) = &self.shared {
            return shared.put_secret(key, value).await;
        }
        let mut state = lock(&self.state);
        local(&mut state).map_err(|e| format!("{e:?}"))?.put_secret(key, value)
    }
}
