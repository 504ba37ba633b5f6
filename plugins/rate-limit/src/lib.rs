//! Rate limiting: token buckets per client key, exact across Envoy's worker threads.
#![doc = include_str!("../README.md")]

pub mod bucket;
pub mod config;
#[cfg(feature = "host")]
pub mod filter;
pub mod global;
pub mod policy;

#[cfg(feature = "host")]
edge_host::host::main!(filter::RateLimitRoot);
