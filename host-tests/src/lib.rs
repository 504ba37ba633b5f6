//! A proxy-wasm (ABI 0.2.1) host on wasmtime that behaves like Envoy 1.40, for testing plugins
//! without a proxy.
//!
//! The host is stateful, like Envoy: tests send requests through a chain of plugins and then
//! look at what the client got, what the upstream saw, and the host's state (shared data,
//! metrics, logs). Nothing is global: each [`Edge`] owns its VMs, clock and stores, so tests
//! run in parallel.
//!
//! ```no_run
//! use host_tests::{Edge, Module, Plugin, Request, Upstream};
//! # fn main() -> anyhow::Result<()> {
//! let module = Module::from_file("dist/rate_limit.wasm")?;
//! let mut edge = Edge::builder()
//!     .plugin(Plugin::new(&module, r#"{"rules":[]}"#))
//!     .workers(2)
//!     .upstream(|_req| Upstream::ok("hello"))
//!     .build()?;
//! let res = edge.send(Request::get("/api").header("x-api-key", "k1"))?;
//! assert_eq!(res.status, 200);
//! # Ok(()) }
//! ```

pub mod abi;
mod edge;
mod hostcalls;
pub mod scenario;
mod state;
mod vm;
mod wasi;

pub use edge::{
    details, flags, Callback, Edge, EdgeBuilder, FlightId, Plugin, Request, Response, Step,
    Upstream, UpstreamRequest,
};
pub use state::{
    CalloutReply, CalloutRequest, GrpcReply, GrpcRequest, HeaderMap, LocalReply, LogRecord,
};
pub use vm::{CallbackCost, Module};

/// Path of a module built by `./build.sh`: `dist/<name>.wasm` for shipped plugins,
/// `target/modules/<name>.wasm` for test-only modules.
pub fn module_path(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let dist = root.join("dist").join(format!("{name}.wasm"));
    if dist.exists() {
        return dist;
    }
    root.join("target")
        .join("modules")
        .join(format!("{name}.wasm"))
}
