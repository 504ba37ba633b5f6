//! The edge plugins' way to the proxy-wasm host: the hostcall translations (each status turned
//! into a value, never a trap), shared data as edge-core's `SlotStore`, the logger, counters
//! and the key seed. `ffi` holds the workspace's only `unsafe`.

pub mod ffi;
pub mod host;
pub mod logger;
pub mod metrics;
pub mod shared_data;
