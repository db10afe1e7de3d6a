//! The pieces the filters' decisions are built from; none of them knows a filter.

pub mod auth;
pub mod authority;
pub mod config;
pub mod edits;
pub mod json;
pub mod jwt;
pub mod pattern;
pub mod reply;
pub mod rs256;
#[cfg(test)]
mod wycheproof;
