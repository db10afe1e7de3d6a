//! The soak harness behind `make soak` (`src/bin/edgewise-soak.rs`): every scenario under a
//! bounded load of valid, invalid and hostile requests while its chaos runs. Every answer is
//! classified against the answers its request's class allows (and what each allowed answer adds
//! to the filters' counters and to the stand-ins' request counts); Envoy's RSS is sampled;
//! afterwards the counters are compared with what was sent, and VM failures are read.
//!
//! - [`request`]: the requests a class makes, and how answers are named;
//! - [`class`]: classes and their allowed answers, and the hostile classes every listener gets;
//! - [`scenario`]: a scenario's classes, watched Envoys, stand-ins, chaos and its effects;
//! - [`chaos`]: the chaos log and the pieces chaos is made of;
//! - [`load`]: the weighted load and the counter snapshots;
//! - [`rss`]: memory and CPU sampling;
//! - [`report`]: the checks after the load and a scenario's section of bench/soak.md;
//! - [`builds`]: one build per child process, and the whole run's report.

pub mod builds;
pub mod chaos;
pub mod class;
pub mod load;
pub mod report;
pub mod request;
pub mod rss;
pub mod scenario;

pub use builds::main;
pub use chaos::{issuer_chaos, nap, secs, tls_updates, Chaos};
pub use class::{
    answer, body, counters, invalid, ok, seen_header, valid, Allowed, Bound, Class, Hostile, Kind, Make, Target,
    Upstream,
};
pub use request::{Get, Got, Req};
pub use scenario::{key, Effect, Scenario, Watched};

use std::time::Duration;

/// How long a request may take before it counts as a timeout (an unexpected answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
