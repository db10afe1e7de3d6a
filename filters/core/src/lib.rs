//! The decisions of the edgewise filters as plain Rust.
//!
//! Nothing here knows about proxy-wasm: the filter crates read headers and properties, call into
//! this crate, and apply what it decides. That keeps the logic unit-tested natively (and, by
//! `make test`, compiled to wasm32-wasip1 and run under Node's WASI, the code Envoy runs).

pub mod auth;
pub mod authority;
pub mod config;
pub mod connector;
pub mod egress;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod json;
pub mod jwt;
pub mod mesh;
pub mod pattern;
pub mod reply;
pub mod rs256;
pub mod serverless;
pub mod tunnel;
#[cfg(test)]
mod wycheproof;
