//! Feature-flag header routing: flagd flag definitions evaluated at the edge, the result sent
//! upstream as request headers that Envoy's routes match on.
#![doc = include_str!("../README.md")]

pub mod config;
pub mod filter;
pub mod flags;
pub mod logic;
pub mod policy;
pub mod source;

proxy_wasm::main! {{
    edge_host::logger::init();
    proxy_wasm::set_root_context(|_| Box::new(filter::FlagRouterRoot::default()));
}}
