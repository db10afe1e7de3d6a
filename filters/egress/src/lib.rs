//! Filter `egress`: `FOO.egress.local[:port]` -> `FOO` for allowlisted destinations. The policy
//! is `edgewise_core::egress`'s; this crate reads `:authority`, applies the decision, and counts
//! requests, responses and upstream latency per allowlist entry (so the number of metrics is
//! bounded by the allowlist, whatever hosts are asked for).
//!
//! The rest of the egress path is Envoy's: the dynamic forward proxy resolves `FOO`, RBAC refuses
//! private and reserved upstream addresses unless this filter marked the destination as allowed
//! to be private, and the cluster originates TLS to `FOO` with SNI and certificate checks.

use edgewise_core::egress::{Decision, Denial, Policy};
use edgewise_core::generic::reply::header_text;
use edgewise_host::{ConfigError, Counter, Filter, Flow, Histogram, Hooks, Setup, Stream};

/// Set on every allowed request (overwriting whatever a client sent): the allowlist entry's label,
/// prefixed with `private:` when the destination may resolve to a private address. The RBAC
/// policy in envoy/egress.yaml lets only the prefixed ones reach private addresses, and the local
/// reply mapper uses the header to tell an RBAC denial from other 403s. It never leaves Envoy.
const DEST_HEADER: &str = "x-edgewise-egress-destination";

pub struct Egress {
    policy: Policy,
    denied: [Counter; Denial::ALL.len()],
    destinations: Vec<Destination>,
}

/// Metrics of one allowlist entry.
struct Destination {
    requests: Counter,
    /// 1xx .. 5xx
    responses: [Counter; 5],
    upstream_ms: Histogram,
}

/// The allowlist entry a request went out under, and when.
#[derive(Default)]
pub struct Sent {
    destination: Option<usize>,
    started_ms: u64,
}

impl Filter for Egress {
    const NAME: &'static str = "egress";
    const HOOKS: Hooks = Hooks { response_headers: true, background: false };
    type PerStream = Sent;

    fn configure(config: &[u8], setup: &mut dyn Setup) -> Result<Self, ConfigError> {
        let policy = Policy::from_json(config)?;
        let p = "edgewise.egress";
        let destinations = policy
            .labels()
            .map(|label| Destination {
                requests: setup.counter(&format!("{p}.dest.{label}.requests")),
                responses: [1, 2, 3, 4, 5].map(|c| setup.counter(&format!("{p}.dest.{label}.responses.{c}xx"))),
                upstream_ms: setup.histogram(&format!("{p}.dest.{label}.upstream_ms")),
            })
            .collect();
        let denied = Denial::ALL.map(|d| setup.counter(&format!("{p}.denied.{}", d.name())));
        Ok(Egress { policy, denied, destinations })
    }

    fn on_request_headers<S: Stream>(&self, s: &mut S, sent: &mut Sent) -> Flow {
        let decided = {
            let authority = s.request_header(":authority");
            match header_text(":authority", authority.as_deref()) {
                Ok(authority) => match self.policy.decide(authority.unwrap_or_default()) {
                    Decision::Allow(allowed) => Ok((allowed.authority, allowed.marker, allowed.entry)),
                    Decision::Deny(denial, reply) => Err((denial, reply)),
                },
                Err(reply) => Err((Denial::InvalidDestination, reply)),
            }
        };
        match decided {
            Ok((authority, marker, entry)) => {
                s.set_request_header(":authority", authority.as_str().as_bytes());
                s.set_request_header(DEST_HEADER, marker.as_bytes());
                if let Some(d) = self.destinations.get(entry) {
                    s.increment(d.requests);
                }
                *sent = Sent { destination: Some(entry), started_ms: s.now_ms() };
                Flow::Continue
            }
            Err((denial, reply)) => {
                if let Some(&c) = self.denied.get(denial as usize) {
                    s.increment(c);
                }
                s.reply(&reply, &[])
            }
        }
    }

    fn on_response_headers<S: Stream>(&self, s: &mut S, sent: &mut Sent) {
        let Some(d) = sent.destination.and_then(|i| self.destinations.get(i)) else {
            return;
        };
        let class = s.response_status().map_or(5, |s| usize::from(s / 100));
        if let Some(&c) = class.checked_sub(1).and_then(|i| d.responses.get(i)) {
            s.increment(c);
        }
        s.record(d.upstream_ms, s.now_ms().saturating_sub(sent.started_ms));
    }
}

#[cfg(target_arch = "wasm32")]
edgewise_proxy_wasm::export!(Egress);

#[cfg(test)]
mod tests;
