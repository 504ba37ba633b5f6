//! Mechanisms every edge plugin shares, written once: configuration parsing with errors that
//! name the field, durations, request matching and keys, the cross-worker slot store (and its
//! bounded read-modify-write), stored responses with Cache-Control, and problem+json replies.
//! Everything but `ffi`, `host` and `shared_data` is pure Rust, unit-tested natively; those
//! three are the only hostcall translations, and `ffi` holds the only `unsafe`.

pub mod config;
pub mod duration;
pub mod ffi;
pub mod host;
pub mod key;
pub mod logger;
pub mod metrics;
pub mod problem;
pub mod request;
pub mod route;
pub mod sha256;
pub mod shared_data;
pub mod store;
pub mod stored;
pub mod table;
pub mod text;
pub mod throttle;

pub use config::{parse_json, ConfigError, Node, Obj};
pub use duration::parse_duration;
pub use request::{RequestParts, RequestView};
pub use store::{SlotStore, StoreError};
