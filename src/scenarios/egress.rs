//! envoy/egress.yaml: a DNS stand-in that resolves destinations to loopback addresses, HTTPS
//! stand-ins for them with certificates from a test CA, and the CA bundle Envoy trusts (the
//! system bundle plus that CA).

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;

use crate::certs::{Ca, LeafSpec};
use crate::server::{Listen, Server};
use crate::tls;

pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Fixed ports of the shipped YAML.
pub mod ports {
    pub const EGRESS: u16 = 10080;
    pub const DNS: u16 = 10053;
}

/// The CA the destination stand-ins' certificates come from, added to the system bundle in
/// `<run_dir>/egress/ca-bundle.pem`.
pub fn install(run_dir: &Path) -> Result<Ca> {
    let ca = Ca::new("egress destinations test CA")?;
    let system = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
    crate::certs::write_pem(&run_dir.join("egress"), "ca-bundle.pem", &format!("{system}\n{}", ca.pem))?;
    Ok(ca)
}

/// A loopback address of its own for each destination of each test (127.x.y.z all reach the
/// loopback interface), so that every stand-in can listen on port 443.
pub fn next_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Ipv4Addr::new(127, 100 + (pid % 100) as u8, (pid / 100 % 200) as u8 + (n / 250) as u8, (n % 250) as u8 + 2)
}

/// An HTTPS destination: `ip:port` with a certificate from `ca` for `names`.
pub async fn destination(server: &str, ip: Ipv4Addr, port: u16, ca: &Ca, names: &[&str]) -> Result<Server> {
    let config = tls::server(&ca.issue(&LeafSpec::server(names))?, &[], &["http/1.1"])?;
    Server::echo(server, Listen { ip: Some(ip), port, tls: Some(config), close_each: false }).await
}
