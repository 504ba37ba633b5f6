//! Rate limiting: token buckets per client key, exact across Envoy's worker threads.
#![doc = include_str!("../README.md")]

pub mod bucket;
pub mod config;
pub mod filter;
pub mod policy;

proxy_wasm::main! {{
    edge_host::logger::init();
    proxy_wasm::set_root_context(|_| Box::new(filter::RateLimitRoot::default()));
}}
