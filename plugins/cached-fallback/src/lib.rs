//! Cached fallback: keeps the last good response per request key in shared data and serves it
//! when the upstream fails (status, reset, timeout), with a circuit breaker across workers.
#![doc = include_str!("../README.md")]

pub mod circuit;
pub mod config;
pub mod filter;
pub mod policy;

proxy_wasm::main! {{
    edge_host::logger::init();
    proxy_wasm::set_root_context(|_| Box::new(filter::FallbackRoot::default()));
}}
