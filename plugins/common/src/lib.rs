//! Mechanisms every edge plugin shares, written once: durations and configuration errors that
//! name the offending field. Pure Rust (no hostcalls), so everything here is unit-tested natively.

pub mod config;
pub mod duration;

pub use config::ConfigError;
pub use duration::parse_duration;
