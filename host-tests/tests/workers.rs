//! Several workers sharing one shared-data store; traps and failure policies; fuel.
mod common;
use common::*;
use host_tests::{Callback, Edge, Plugin, Request, Step};

#[test]
fn shared_data_counter_is_exact_across_workers() -> anyhow::Result<()> {
    let mut edge = probe_edge("").workers(3).build()?;
    for _ in 0..30 {
        edge.send(Request::get("/x").header("x-probe", "shared"))?;
    }
    let (value, _cas) = edge.shared_data("", b"probe.counter").unwrap();
    assert_eq!(value, b"30");
    let workers: std::collections::BTreeSet<usize> = (0..3)
        .map(|w| edge.send(Request::get("/").worker(w)).unwrap().worker)
        .collect();
    assert_eq!(workers.len(), 3);
    Ok(())
}

#[test]
fn interleaved_workers_racing_on_one_cas_lose_exactly_once() -> anyhow::Result<()> {
    let mut edge = probe_edge("").workers(2).build()?;
    edge.send(Request::get("/seed").header("x-probe", "cas-read"))?; // creates the key
    let a = edge.begin(Request::get("/a").header("x-probe", "cas-read").worker(0))?;
    let b = edge.begin(Request::get("/b").header("x-probe", "cas-read").worker(1))?;
    // Both read the same cas before either writes.
    assert_eq!(edge.step(a)?, Step::Ran(Callback::RequestHeaders));
    assert_eq!(edge.step(b)?, Step::Ran(Callback::RequestHeaders));
    let ra = edge.finish(a)?;
    let rb = edge.finish(b)?;
    assert_eq!(
        (ra.header("x-cas"), rb.header("x-cas")),
        (Some("ok"), Some("mismatch"))
    );
    assert_eq!(edge.shared_data("", b"probe.race").unwrap().0, b"2");
    Ok(())
}

#[test]
fn trap_fails_this_and_later_streams_with_503_when_fail_closed() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    let res = edge.send(Request::get("/x").header("x-probe", "trap"))?;
    assert_eq!(
        (res.status, res.details.as_str()),
        (503, "wasm_fail_stream")
    );
    assert!(edge.vm_failed(0, 0));
    assert!(edge.logged("Function: proxy_on_request_headers failed"));
    let later = edge.get("/fine")?;
    assert_eq!(
        (later.status, later.details.as_str()),
        (503, "wasm_fail_stream")
    );
    assert!(edge.upstream_requests().is_empty());
    Ok(())
}

#[test]
fn trap_with_fail_open_passes_traffic_through() -> anyhow::Result<()> {
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&probe(), "").fail_open(true))
        .build()?;
    assert_eq!(
        edge.send(Request::get("/x").header("x-probe", "trap"))?
            .status,
        200
    );
    assert_eq!(edge.get("/y")?.status, 200);
    assert_eq!(edge.upstream_requests().len(), 2);
    Ok(())
}

#[test]
fn trap_on_one_worker_leaves_the_others_running() -> anyhow::Result<()> {
    let mut edge = probe_edge("").workers(2).build()?;
    edge.send(Request::get("/x").header("x-probe", "trap").worker(0))?;
    assert!(edge.vm_failed(0, 0) && !edge.vm_failed(1, 0));
    assert_eq!(edge.send(Request::get("/y").worker(1))?.status, 200);
    Ok(())
}

#[test]
fn fuel_per_request_is_recorded_and_deterministic() -> anyhow::Result<()> {
    let run = || -> anyhow::Result<u64> {
        let mut edge = probe_edge("").build()?;
        Ok(edge
            .send(Request::get("/x").header("x-probe", "headers"))?
            .fuel)
    };
    let fuel = run()?;
    assert!(fuel > 1000, "{fuel}");
    assert_eq!(fuel, run()?);
    let mut edge = probe_edge("").build()?;
    edge.get("/x")?;
    let costs = edge.costs(0);
    assert_eq!(costs["proxy_on_request_headers"].calls, 1);
    assert!(costs["proxy_on_response_headers"].fuel > 0);
    Ok(())
}
