//! A scenario as the soak drives it: its classes, the Envoys and stand-ins it reads, its chaos
//! and what that chaos must visibly do.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::chaos::Chaos;
use super::class::Class;
use crate::envoy::{self, Envoy};

/// An Envoy whose RSS is sampled and whose counters are read.
pub struct Watched {
    pub role: &'static str,
    pub envoy: Arc<Envoy>,
    /// Counters compared with what was sent (by their name without `wasmcustom.`).
    pub prefixes: Vec<String>,
    /// The wasm plugin name and the native filter name (None: the Envoy runs no filter).
    pub plugin: Option<(&'static str, &'static str)>,
}

impl Watched {
    /// An Envoy running a filter (`plugin`: its wasm plugin name, `filter`: its native name).
    pub fn filter(
        role: &'static str,
        envoy: Arc<Envoy>,
        prefixes: &[&str],
        plugin: &'static str,
        filter: &'static str,
    ) -> Self {
        let prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        Watched { role, envoy, prefixes, plugin: Some((plugin, filter)) }
    }

    /// An Envoy running none of the filters: only its RSS is watched.
    pub fn plain(role: &'static str, envoy: Arc<Envoy>) -> Self {
        Watched { role, envoy, prefixes: Vec::new(), plugin: None }
    }
}

/// A change the chaos should cause, read from an Envoy's stats.
pub struct Effect {
    pub what: &'static str,
    pub role: &'static str,
    pub stat: Sel,
    /// The chaos event kind that must have moved it (when such events happened).
    pub requires: &'static str,
}

pub enum Sel {
    Exact(String),
    Suffix(&'static str),
}

impl Effect {
    /// `stat` (as the filter names it) must move once events of kind `requires` happened.
    pub fn stat(what: &'static str, role: &'static str, stat: &str, requires: &'static str) -> Effect {
        Effect { what, role, stat: Sel::Exact(envoy::stat(stat)), requires }
    }

    /// The Envoy must rebuild a TLS context from SDS once certificates rotated.
    pub fn tls_rebuilt(what: &'static str, role: &'static str) -> Effect {
        Effect { what, role, stat: Sel::Suffix(".ssl_context_update_by_sds"), requires: "rotations" }
    }
}

pub type StandIn = Box<dyn Fn() -> u64 + Send + Sync>;
pub type ChaosFn = Box<dyn FnOnce(Arc<Chaos>, Instant) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;
/// Counter deltas and expected counts in, (counted, expected) out.
pub type RelationFn = Box<dyn Fn(&BTreeMap<String, u64>, &BTreeMap<String, u64>) -> (u64, u64) + Send + Sync>;

pub struct Scenario {
    pub name: &'static str,
    pub about: String,
    pub classes: Vec<Class>,
    pub watched: Vec<Watched>,
    pub stand_ins: Vec<(String, StandIn)>,
    pub(crate) chaos_fn: Mutex<Option<ChaosFn>>,
    pub chaos: Arc<Chaos>,
    pub chaos_about: String,
    pub effects: Vec<Effect>,
    /// Counters checked against others instead of against what was sent: (what, relation).
    pub relations: Vec<(String, RelationFn)>,
    /// Counter keys left out of the exact comparison (checked by a relation).
    pub relational: Vec<String>,
    _keep: Vec<Box<dyn Any + Send + Sync>>,
}

impl Scenario {
    pub fn new(name: &'static str, about: &str, classes: Vec<Class>, watched: Vec<Watched>) -> Scenario {
        Scenario {
            name,
            about: about.to_string(),
            classes,
            watched,
            stand_ins: Vec::new(),
            chaos_fn: Mutex::new(None),
            chaos: Arc::new(Chaos::default()),
            chaos_about: String::new(),
            effects: Vec::new(),
            relations: Vec::new(),
            relational: Vec::new(),
            _keep: Vec::new(),
        }
    }

    /// A stand-in whose request count is compared as `stand-in: <name>`.
    pub fn stand_in(mut self, name: &str, count: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.stand_ins.push((name.to_string(), Box::new(count)));
        self
    }

    /// The chaos, started with the load and given its deadline; `about` says what it does.
    pub fn chaos<F, Fut>(mut self, about: &str, chaos: F) -> Self
    where
        F: FnOnce(Arc<Chaos>, Instant) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.chaos_fn = Mutex::new(Some(Box::new(move |c, deadline| Box::pin(chaos(c, deadline)))));
        self.chaos_about = about.to_string();
        self
    }

    /// Why the scenario has no chaos.
    pub fn no_chaos(mut self, why: &str) -> Self {
        self.chaos_about = why.to_string();
        self
    }

    pub fn effects(mut self, effects: Vec<Effect>) -> Self {
        self.effects = effects;
        self
    }

    /// Checks counters against each other: `left_out` leaves the exact comparison, `f` gives
    /// (counted, expected).
    pub fn relation(
        mut self,
        what: &str,
        left_out: &[&str],
        f: impl Fn(&BTreeMap<String, u64>, &BTreeMap<String, u64>) -> (u64, u64) + Send + Sync + 'static,
    ) -> Self {
        self.relations.push((what.to_string(), Box::new(f)));
        self.relational.extend(left_out.iter().map(|k| k.to_string()));
        self
    }

    /// Keeps `it` alive as long as the scenario (a stand-in, a CA, a temporary file).
    pub fn keep(mut self, it: impl Any + Send + Sync) -> Self {
        self._keep.push(Box::new(it));
        self
    }
}

/// The key of a counter of the Envoy in `role`.
pub fn key(role: &str, metric: &str) -> String {
    format!("{role}: {metric}")
}
