//! What every edge plugin's policy uses, written once and free of any host: configuration
//! parsing with errors that name the field, durations, request matching and keys, the
//! cross-worker slot store as a trait (and its bounded read-modify-write), the record table,
//! stored responses with Cache-Control, problem+json replies, hashing and log throttling.
//! Nothing here makes a hostcall, so all of it is unit-tested natively; the host side of these
//! mechanisms lives in edge-host.

#![no_std]

extern crate alloc;
// Native builds (tests, the tools) keep std: debug builds check config readers with it.
#[cfg(not(target_arch = "wasm32"))]
extern crate std;

pub mod config;
pub mod duration;
pub mod headers;
pub mod ip;
pub mod key;
pub mod metrics;
pub mod problem;
pub mod request;
pub mod route;
pub mod sha256;
pub mod siphash;
pub mod store;
pub mod stored;
pub mod table;
pub mod text;
pub mod throttle;

pub use config::{parse_json, ConfigError, Node, Obj};
pub use duration::parse_duration;
pub use request::{RequestParts, RequestView};
pub use store::{SlotStore, StoreError};
