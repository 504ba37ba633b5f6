#![doc = include_str!("../README.md")]

pub mod abi;
mod edge;
mod hostcalls;
pub mod scenario;
mod state;
mod trace;
mod vm;
mod wasi;

pub use edge::{
    details, flags, Callback, Edge, EdgeBuilder, FlightId, Plugin, Request, Response, Step,
    Upstream, UpstreamRequest,
};
pub use state::{
    CalloutReply, CalloutRequest, GrpcReply, GrpcRequest, HeaderMap, LocalReply, LogRecord,
};
pub use trace::TracedCallback;
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
