//! Harness speed: request lifecycles per second through one plugin on one core (the VM reused
//! across streams, as Envoy does) and the cost of starting a VM from a compiled module.
//! Run by `./build.sh bench`; prints one line per figure.

use host_tests::{module_path, Edge, Module, Plugin, Request};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // EDGE_BENCH_MODULE compares builds of the probe (e.g. opt-level "s" against 3).
    let path = std::env::var("EDGE_BENCH_MODULE").map_or_else(|_| module_path("probe"), Into::into);
    let module = Module::from_file(path)?;

    let starts = 300;
    let t = Instant::now();
    for _ in 0..starts {
        let edge = Edge::builder().plugin(Plugin::new(&module, "")).build()?;
        std::hint::black_box(&edge);
    }
    let start_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(starts);

    let mut edge = Edge::builder().plugin(Plugin::new(&module, "")).build()?;
    for _ in 0..1000 {
        edge.send(Request::get("/warm"))?;
    }
    let n = 50_000u32;
    let t = Instant::now();
    let mut fuel = 0;
    for _ in 0..n {
        let req = Request::get("/api/items").header("x-probe", "headers,props,shared");
        fuel = edge.send(req)?.fuel;
    }
    let rate = f64::from(n) / t.elapsed().as_secs_f64();
    println!(
        "harness: {rate:.0} request lifecycles/s through one plugin on one core (target >= 20000)"
    );
    println!("harness: {start_us:.0} us to start a VM from a compiled module (target <= 1000)");
    println!("harness: {fuel} wasm fuel units per probe lifecycle");
    Ok(())
}
