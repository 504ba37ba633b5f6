//! Shared helpers for the harness's own tests.
#![allow(dead_code)]

use anyhow::Result;
use host_tests::{module_path, Edge, EdgeBuilder, Module, Plugin};

/// The probe module (built by ./build.sh into target/modules/).
pub fn probe() -> Module {
    Module::from_file(module_path("probe")).expect("probe module (run ./build.sh first)")
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
