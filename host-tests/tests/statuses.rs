//! Error statuses for bad arguments and malformed input, as Envoy returns them; the host
//! answers with a status and never panics itself.
mod common;
use common::*;
use host_tests::{Edge, Plugin};

#[test]
fn bad_arguments_get_envoys_statuses() -> anyhow::Result<()> {
    let edge = Edge::builder()
        .plugin(Plugin::new(&wat("statuses")?, ""))
        .build()?;
    // The main thread's VM starts first; the worker's VM after it finds its shared data.
    let main = edge.worker_count();
    let got: Vec<String> = edge
        .logs()
        .into_iter()
        .filter(|l| l.worker == main)
        .map(|l| l.message)
        .collect();
    let expected = [
        "mt=02", // unknown map type
        "rc=02", // request headers from the root context
        "pp=00", // pairs of an unavailable map: Ok, empty
        "bp=06", // pointer out of bounds
        "bl=06", // length past the end of memory
        "rs=06", // return slot out of bounds
        "bt=02", // unknown buffer type
        "pc=01", // plugin configuration outside on_configure
        "sm=01", // shared data missing
        "sn=00", // a new key accepts any cas
        "ss=08", // a stale cas on an existing key
        "qr=01", // unknown queue
        "qd=01", // dequeue from an unknown queue
        "md=02", // unknown metric type
        "mi=01", // unknown metric id
        "ec=02", // unknown effective context
        "ff=01", // unknown foreign function
        "hc=02", // unknown cluster
        "gp=01", // unknown property
        "cs=02", // unknown stream type
        "cu=12", // continue the upstream stream: unimplemented
    ];
    assert_eq!(got, expected);
    Ok(())
}
