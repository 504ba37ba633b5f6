//! Cached fallback: keeps the last good response per request key in shared data and serves it
//! when the upstream fails (status, reset, timeout), with a circuit breaker across workers.
#![doc = include_str!("../README.md")]
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod circuit;
pub mod config;
#[cfg(feature = "host")]
pub mod filter;
pub mod policy;

// The module's entry point; `edge.wasm` links this crate as one of its stages instead.
#[cfg(all(feature = "module", target_family = "wasm"))]
edge_host::host::main!(filter::FallbackRoot);
