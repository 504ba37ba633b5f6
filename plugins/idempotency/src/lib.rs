//! Idempotency keys: the first request with a key is forwarded, duplicates get its stored
//! response (or 409 while it runs, 422 for a different payload), exactly once across workers.
#![doc = include_str!("../README.md")]
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod config;
pub mod etcd;
#[cfg(feature = "host")]
pub mod filter;
#[cfg(feature = "host")]
pub mod fleet;
pub mod policy;
pub mod record;

// The module's entry point; `edge.wasm` links this crate as one of its stages instead.
#[cfg(all(feature = "module", target_family = "wasm"))]
edge_host::host::main!(filter::IdempotencyRoot);
