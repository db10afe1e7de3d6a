//! The checks of the fuzz targets, one function per target: `fuzz/fuzz_targets/<name>.rs` hands
//! its input to the function of that name (cargo-fuzz, nightly: `make fuzz`), and
//! `tests/fuzz_corpus.rs` runs every file of `fuzz/corpus/<name>/` (and `fuzz/artifacts/<name>/`)
//! through the same function on stable (`make test`), so the corpora are regression tests.
//!
//! Built with the `fuzzing` feature only; no filter enables it. Every check takes raw bytes and
//! panics on a discrepancy only: a panic in the code under test, or an answer its reference does
//! not give (serde_json for the JSON reader and the configuration readers, regex-lite for
//! patterns, the `rsa` and `p256` crates for signatures, plain re-statements of what the
//! authority helpers promise).

// A check exists to panic on a discrepancy, and the fixed keys and documents it uses parse.
#![allow(clippy::panic, clippy::expect_used)]

mod configs;
mod hosts;
mod json;
mod query;
mod rs256;
mod tokens;

pub use configs::{configs, route_table};
pub use hosts::{authority, pattern};
pub use json::json_differential;
pub use query::route_query;
pub use rs256::rs256_differential;
pub use tokens::{discovery, jwks, jwt, FIXED_JWKS};

/// Every target: its name (of the fuzz target, its corpus and artifacts directories) and check.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("json_differential", json_differential),
    ("jwt", jwt),
    ("jwks", jwks),
    ("discovery", discovery),
    ("pattern", pattern),
    ("authority", authority),
    ("route_table", route_table),
    ("route_query", route_query),
    ("configs", configs),
    ("rs256_differential", rs256_differential),
];

/// Input bytes for a failure message: as text where they are UTF-8.
fn shown(data: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(data))
}
