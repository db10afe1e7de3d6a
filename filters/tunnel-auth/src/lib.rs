//! Filter `tunnel-auth`, on the reverse-tunnel hub: authenticates the caller's JWT, authorizes
//! the cluster named in the path, and selects that cluster's tunnel by setting the selection
//! header itself (a client's own value never survives). The decisions are
//! `edgewise_core::tunnel_auth`'s; keys are fetched and shared by `edgewise_host::jwks`.
//!
//! Unlike cloud-connector, requests are not paused while keys are fetched: a hub caller is a
//! person or a CI job that retries, so a missing key set answers 503 at once and an unknown kid
//! 401 (after scheduling one refetch per cooldown).

use std::time::Duration;

use edgewise_core::generic::auth::TokenCache;
use edgewise_core::generic::reply::{header_text, Reply};
use edgewise_core::tunnel_auth::{Decision, Hub, Outcome};
use edgewise_host::jwks::Keys;
use edgewise_host::per_thread::PerThread;
use edgewise_host::{Background, ConfigError, Counter, Fetched, Filter, Flow, Hooks, Setup, Stream};

#[derive(Clone)]
struct Work {
    cache: TokenCache,
    cluster: String,
    path: String,
}

pub struct TunnelAuth {
    hub: Hub,
    keys: Keys,
    /// Each worker's verified tokens and the target of its request in hand: no lock between
    /// workers, no allocation per request once warm.
    work: PerThread<Work>,
    outcomes: [Counter; Outcome::ALL.len()],
}

/// What a request decided to forward leaves for applying: copies of its target (natively the
/// path is Envoy's own, and editing the headers would invalidate it).
enum Next {
    Forward,
    Deny { outcome: Outcome, reply: Reply, www_authenticate: Option<&'static str> },
    UnknownKid { issuer: usize, reply: Reply },
}

impl TunnelAuth {
    fn handle<S: Stream>(&self, s: &mut S, work: &mut Work) -> Flow {
        let hub = &self.hub;
        let now_ms = s.now_ms();
        let next = {
            let (path, authorization) = (s.request_header(":path"), s.request_header("authorization"));
            match (header_text(":path", path.as_deref()), header_text("authorization", authorization.as_deref())) {
                (Ok(path), Ok(authorization)) => {
                    let path = path.unwrap_or_default();
                    let Work { cache, cluster: to_cluster, path: to_path } = work;
                    let mut decide = || hub.decide(path, authorization, &self.keys.keyring(), cache, now_ms / 1000);
                    let decision = match decide() {
                        // Another worker may have fetched the keys since this one's last tick.
                        Decision::Deny { outcome: Outcome::KeysUnavailable, .. }
                            if (0..hub.verifier.issuers.len())
                                .fold(false, |synced, i| self.keys.sync(s, i) | synced) =>
                        {
                            decide()
                        }
                        decision => decision,
                    };
                    match decision {
                        Decision::Forward { cluster, path } => {
                            to_cluster.clear();
                            to_cluster.push_str(cluster);
                            to_path.clear();
                            to_path.push_str(&path);
                            Next::Forward
                        }
                        Decision::Deny { outcome, reply, www_authenticate } => {
                            Next::Deny { outcome, reply, www_authenticate }
                        }
                        Decision::UnknownKid { issuer, reply } => Next::UnknownKid { issuer, reply },
                    }
                }
                (Err(reply), _) | (_, Err(reply)) => {
                    Next::Deny { outcome: Outcome::BadRequest, reply, www_authenticate: None }
                }
            }
        };
        let count = |s: &S, o: Outcome| {
            if let Some(&c) = self.outcomes.get(o as usize) {
                s.increment(c);
            }
        };
        match next {
            Next::Forward => {
                count(s, Outcome::Allowed);
                let remove: &[&str] = if hub.forward_authorization {
                    &[hub.cluster_header.as_str()]
                } else {
                    &[hub.cluster_header.as_str(), "authorization"]
                };
                s.edit_request_headers(
                    remove,
                    &[(":path", work.path.as_bytes()), (&hub.cluster_header, work.cluster.as_bytes())],
                );
                Flow::Continue
            }
            Next::Deny { outcome, reply, www_authenticate } => {
                count(s, outcome);
                match www_authenticate {
                    Some(w) => s.reply(&reply, &[("www-authenticate", w)]),
                    None => s.reply(&reply, &[]),
                }
            }
            Next::UnknownKid { issuer, reply } => {
                count(s, Outcome::Unauthenticated);
                self.keys.refetch_for_unknown_kid(s, issuer, now_ms);
                s.reply(&reply, &[("www-authenticate", "Bearer error=\"invalid_token\"")])
            }
        }
    }
}

impl Filter for TunnelAuth {
    const NAME: &'static str = "tunnel-auth";
    const HOOKS: Hooks = Hooks { response_headers: false, background: true };
    type PerStream = ();

    fn configure(config: &[u8], setup: &mut dyn Setup) -> Result<Self, ConfigError> {
        let hub = Hub::from_json(config)?;
        Ok(TunnelAuth {
            keys: Keys::new(setup, "tunnel_auth", &hub.verifier.issuers, &hub.jwks),
            work: PerThread::new(Work {
                cache: TokenCache::new(hub.token_cache_size),
                cluster: String::with_capacity(64),
                path: String::with_capacity(256),
            }),
            outcomes: Outcome::ALL.map(|o| setup.counter(&format!("edgewise.tunnel_auth.requests.{}", o.name()))),
            hub,
        })
    }

    fn on_request_headers<S: Stream>(&self, s: &mut S, _: &mut ()) -> Flow {
        self.work.with(|work| self.handle(s, work))
    }

    fn tick_period(&self) -> Option<Duration> {
        Some(Duration::from_millis(200))
    }

    fn on_tick<B: Background>(&self, bg: &mut B) {
        self.keys.on_tick(bg);
    }

    fn on_fetched<B: Background>(&self, bg: &mut B, id: u64, response: &Fetched) {
        self.keys.on_fetched(bg, id, response);
    }
}

#[cfg(target_arch = "wasm32")]
edgewise_proxy_wasm::export!(TunnelAuth);

#[cfg(test)]
mod tests;
