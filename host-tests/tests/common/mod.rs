//! Shared helpers for the harness's own tests.
#![allow(dead_code)]

use anyhow::Result;
use host_tests::{module_path, Edge, EdgeBuilder, Module, Plugin};

/// The probe module (built by ./build.sh into target/modules/).
pub fn probe() -> Module {
    Module::from_file(module_path("probe")).expect("probe module (run ./build.sh first)")
}

/// A shipped plugin module, `dist/<name>.wasm`.
pub fn plugin_module(name: &str) -> Module {
    Module::from_file(module_path(name))
        .unwrap_or_else(|e| panic!("dist/{name}.wasm: {e:#} (run ./build.sh build first)"))
}

pub fn wat(name: &str) -> Result<Module> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("wat")
        .join(format!("{name}.wat"));
    Module::from_bytes(name, &std::fs::read(path)?)
}

/// An edge with one probe plugin configured with `config`.
pub fn probe_edge(config: &str) -> EdgeBuilder {
    Edge::builder().plugin(Plugin::new(&probe(), config))
}

/// Log lines of plugin `name` containing `needle`.
pub fn lines(edge: &Edge, needle: &str) -> Vec<String> {
    edge.logs()
        .into_iter()
        .filter(|l| l.message.contains(needle))
        .map(|l| l.message)
        .collect()
}

/// Asserts that loading `edge` fails because the plugin rejected its configuration, with
/// `needle` (typically the field path) in the reason.
pub fn assert_rejected(edge: EdgeBuilder, needle: &str) {
    let err = match edge.build() {
        Ok(_) => panic!("the configuration was accepted; expected a rejection naming {needle:?}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("rejected its configuration"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}
