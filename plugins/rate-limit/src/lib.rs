//! Rate limiting: token buckets per client key, exact across Envoy's worker threads.
#![doc = include_str!("../README.md")]
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod bucket;
pub mod config;
#[cfg(feature = "host")]
pub mod filter;
pub mod global;
pub mod policy;

// The module's entry point; `edge.wasm` links this crate as one of its stages instead.
#[cfg(all(feature = "module", target_family = "wasm"))]
edge_host::host::main!(filter::RateLimitRoot);
