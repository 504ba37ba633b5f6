//! Cached fallback: keeps the last good response per request key in shared data and serves it
//! when the upstream fails (status, reset, timeout), with a circuit breaker across workers.
#![doc = include_str!("../README.md")]

pub mod circuit;
pub mod config;
#[cfg(feature = "host")]
pub mod filter;
pub mod policy;

#[cfg(feature = "host")]
edge_host::host::main!(filter::FallbackRoot);
