//! Feature-flag header routing: flagd flag definitions evaluated at the edge, the result sent
//! upstream as request headers that Envoy's routes match on.
#![doc = include_str!("../README.md")]
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod config;
#[cfg(feature = "host")]
pub mod filter;
pub mod flags;
pub mod logic;
pub mod policy;
pub mod source;

// The module's entry point; `edge.wasm` links this crate as one of its stages instead.
#[cfg(all(feature = "module", target_family = "wasm"))]
edge_host::host::main!(filter::FlagRouterRoot);
