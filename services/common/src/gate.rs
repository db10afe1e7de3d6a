//! Who gets a connection: a bound on the connections a port holds, and on those one client
//! address holds, counted for `/metrics` and `/readyz`.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long after refusing a connection for the port's limit `/readyz` still says so.
const SATURATED_FOR: Duration = Duration::from_secs(5);

/// The limits of one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_client: usize,
    /// The whole request head must arrive within this, counted from the connection or, on a
    /// kept-alive connection, from the end of the previous response (HTTP ports).
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            max_per_client: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    pub const FLAGS: &'static str = "[--max-connections 4096] [--max-connections-per-client 64]";

    /// Takes `flag` if it is one of the limits' (`--max-connections`,
    /// `--max-connections-per-client`), reading its value with `value`; false if it is not.
    pub fn take_flag(&mut self, flag: &str, value: impl FnOnce() -> Result<String, String>) -> Result<bool, String> {
        let target = match flag {
            "--max-connections" => &mut self.max_connections,
            "--max-connections-per-client" => &mut self.max_per_client,
            _ => return Ok(false),
        };
        let v = value()?;
        *target = match v.parse() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{flag} {v:?}: a number of connections above 0")),
        };
        Ok(true)
    }

    /// These limits with at most `max` connections (the share of the open-file limit a port gets).
    pub fn within(self, max: usize) -> Limits {
        let max_connections = self.max_connections.min(max).max(1);
        Limits { max_connections, max_per_client: self.max_per_client.min(max_connections), ..self }
    }
}

/// Why a connection was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The port holds its limit of connections.
    Full,
    /// The client's address holds its limit.
    Client,
}

/// Why a connection the gate let in was closed by the service.
#[derive(Clone, Copy)]
pub enum Closed {
    HeaderTimeout = 0,
    IdleTimeout = 1,
}

/// One port's connections.
pub struct Gate {
    pub port: &'static str,
    pub limits: Limits,
    state: Mutex<State>,
    refused: [AtomicU64; 2],
    closed: [AtomicU64; 2],
    accepted: AtomicU64,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last refusal for the port's limit, plus one (0: never).
    last_full: AtomicU64,
}

#[derive(Default)]
struct State {
    open: usize,
    clients: HashMap<IpAddr, usize>,
}

/// A connection let in: counted until dropped.
pub struct Permit {
    gate: Arc<Gate>,
    client: IpAddr,
}

impl Gate {
    pub fn new(port: &'static str, limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            port,
            limits,
            state: Mutex::default(),
            refused: Default::default(),
            closed: Default::default(),
            accepted: AtomicU64::new(0),
            epoch: Instant::now(),
            last_full: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a connection from `client` in, or says why not.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Permit, Refusal> {
        let mut state = self.state();
        let refusal = if state.open >= self.limits.max_connections {
            Some(Refusal::Full)
        } else if state.clients.get(&client).is_some_and(|n| *n >= self.limits.max_per_client) {
            Some(Refusal::Client)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(state);
            if let Some(c) = self.refused.get(refusal as usize) {
                c.fetch_add(1, Relaxed);
            }
            if refusal == Refusal::Full {
                let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.last_full.store(ms.saturating_add(1), Relaxed);
            }
            return Err(refusal);
        }
        state.open += 1;
        *state.clients.entry(client).or_default() += 1;
        drop(state);
        self.accepted.fetch_add(1, Relaxed);
        Ok(Permit { gate: self.clone(), client })
    }

    pub fn open(&self) -> usize {
        self.state().open
    }

    pub fn closed(&self, why: Closed) {
        if let Some(c) = self.closed.get(why as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Why the port refuses connections to any client (at its limit now, or refused one for it
    /// in the last seconds); `None` when it takes them. A client held to its own limit does not
    /// count: one address must not make the service unready for every other.
    pub fn saturated(&self) -> Option<String> {
        let open = self.open();
        let last = self.last_full.load(Relaxed);
        let recent = last > 0 && self.epoch.elapsed().as_millis() < u128::from(last - 1) + SATURATED_FOR.as_millis();
        (open >= self.limits.max_connections || recent).then(|| {
            format!(
                "the {} port refuses connections: {open} open, its limit is {}",
                self.port, self.limits.max_connections
            )
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        state.open = state.open.saturating_sub(1);
        if let Some(n) = state.clients.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.clients.remove(&self.client);
            }
        }
    }
}

/// `/readyz` of a service: `Err(why)` when a port refuses connections to every client.
pub fn readiness(gates: &[Arc<Gate>]) -> Result<(), String> {
    let refusing: Vec<String> = gates.iter().filter_map(|g| g.saturated()).collect();
    if refusing.is_empty() {
        Ok(())
    } else {
        Err(refusing.join("; "))
    }
}

/// The connection metrics of `gates`, as `<prefix>_connections...` in Prometheus' text format.
pub fn render(prefix: &str, gates: &[Arc<Gate>], out: &mut String) {
    let _ = writeln!(out, "# HELP {prefix}_connections Connections open, by port.\n# TYPE {prefix}_connections gauge");
    for g in gates {
        let _ = writeln!(out, "{prefix}_connections{{port=\"{}\"}} {}", g.port, g.open());
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_limit Connections a port holds at most.\n# TYPE {prefix}_connections_limit gauge"
    );
    for g in gates {
        let _ = writeln!(out, "{prefix}_connections_limit{{port=\"{}\"}} {}", g.port, g.limits.max_connections);
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_accepted_total Connections let in, by port.\n\
         # TYPE {prefix}_connections_accepted_total counter"
    );
    for g in gates {
        let _ =
            writeln!(out, "{prefix}_connections_accepted_total{{port=\"{}\"}} {}", g.port, g.accepted.load(Relaxed));
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_refused_total Connections refused: the port at its limit (limit), or the \
         client's address at its own (client_limit).\n# TYPE {prefix}_connections_refused_total counter"
    );
    for g in gates {
        for (reason, c) in ["limit", "client_limit"].iter().zip(&g.refused) {
            let _ = writeln!(
                out,
                "{prefix}_connections_refused_total{{port=\"{}\",reason=\"{reason}\"}} {}",
                g.port,
                c.load(Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_closed_total Connections the service closed: no complete request head in \
         time (header_timeout), no byte moving either way (idle_timeout).\n\
         # TYPE {prefix}_connections_closed_total counter"
    );
    for g in gates {
        for (reason, c) in ["header_timeout", "idle_timeout"].iter().zip(&g.closed) {
            let _ = writeln!(
                out,
                "{prefix}_connections_closed_total{{port=\"{}\",reason=\"{reason}\"}} {}",
                g.port,
                c.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_client: usize) -> Limits {
        Limits { max_connections: max, max_per_client: per_client, ..Limits::default() }
    }

    #[test]
    fn a_client_is_held_to_its_share_and_the_port_to_its_limit() -> Result<(), Refusal> {
        let gate = Gate::new("http", limits(3, 2));
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into(), [127, 0, 0, 4].into());
        let a1 = gate.admit(a)?;
        let _a2 = gate.admit(a)?;
        assert_eq!(gate.admit(a).err(), Some(Refusal::Client));
        assert_eq!(gate.saturated(), None, "one client at its limit leaves the service ready");
        let _b1 = gate.admit(b)?;
        assert_eq!(gate.admit(c).err(), Some(Refusal::Full));
        assert!(gate.saturated().is_some_and(|s| s.contains("3 open, its limit is 3")));
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _c1 = gate.admit(c)?;
        let mut out = String::new();
        render("svc", std::slice::from_ref(&gate), &mut out);
        assert!(out.contains("svc_connections{port=\"http\"} 3\n"), "{out}");
        assert!(out.contains("svc_connections_refused_total{port=\"http\",reason=\"limit\"} 1\n"), "{out}");
        assert!(out.contains("svc_connections_refused_total{port=\"http\",reason=\"client_limit\"} 1\n"), "{out}");
        assert!(out.contains("svc_connections_accepted_total{port=\"http\"} 4\n"), "{out}");
        Ok(())
    }

    #[test]
    fn limits_from_flags_and_within_the_open_file_share() {
        let mut l = Limits::default();
        assert_eq!(l.take_flag("--max-connections", || Ok("100".into())), Ok(true));
        assert_eq!(l.take_flag("--max-connections-per-client", || Ok("500".into())), Ok(true));
        assert_eq!(l.take_flag("--db", || Ok("x".into())), Ok(false));
        assert!(l.take_flag("--max-connections", || Ok("0".into())).is_err_and(|e| e.contains("--max-connections")));
        assert!(l.take_flag("--max-connections", || Ok("many".into())).is_err());
        let within = l.within(40);
        assert_eq!((within.max_connections, within.max_per_client), (40, 40));
        assert_eq!(Limits::default().within(10_000).max_connections, 4096);
    }
}
