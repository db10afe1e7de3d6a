//! The edgewise end-to-end harness: real Envoy started from the shipped YAML, real TLS with
//! certificates made at run time, and stand-in servers that report what they saw.
//!
//! Used by the tests in `tests/` and by the `edgewise-demo` binary behind `make run`.

pub mod bench;
pub mod callgrind;
pub mod certs;
pub mod client;
pub mod control;
pub mod dns;
pub mod envoy;
pub mod etcd;
pub mod flood;
pub mod h2raw;
pub mod hostile;
pub mod idp;
pub mod native;
pub mod oci;
pub mod pebble;
pub mod ratelimit;
pub mod scale;
pub mod scenarios;
pub mod server;
pub mod service;
pub mod soak;
pub mod tls;
pub mod watchers;

use std::path::PathBuf;

/// The repository root (the shipped YAML lives in `envoy/` below it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where build.rs puts the freshly built `.wasm` modules.
pub fn filters_dir() -> PathBuf {
    PathBuf::from(env!("EDGEWISE_FILTERS_DIR"))
}

/// bench/noop-module's library: a dynamic module whose hooks do nothing (built by build.rs).
pub fn noop_module() -> PathBuf {
    PathBuf::from(env!("EDGEWISE_NOOP_MODULE"))
}

/// Installs the process-wide rustls crypto provider (ring). Safe to call repeatedly.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A TCP port free on 127.0.0.1 right now (for configs that name the same port twice, such as an
/// admin address that a cluster also points at).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
