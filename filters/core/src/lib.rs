//! The decisions of the edgewise filters as plain Rust.
//!
//! One module per filter, named after it, holds what that filter decides; `generic` holds the
//! pieces they are built from and that know no filter (JSON, host patterns, authorities,
//! signatures, JWTs, bearer authentication, replies). Nothing here knows about a host: the filter
//! crates read headers and properties, call into this crate, and apply what it decides. That keeps
//! the logic unit-tested natively (and, by `make test`, compiled to wasm32-wasip1 and run under
//! Node's WASI, the code Envoy runs).

// The JSON readers derived in this crate name it by its crate name, as they would elsewhere.
extern crate self as edgewise_core;

pub mod cloud_connector;
pub mod egress;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod generic;
pub mod mesh_identity;
pub mod serverless;
pub mod tunnel_auth;
