//! Local replies and upstream failures: which response callbacks run, with which details.
mod common;
use common::*;
use host_tests::{details, Edge, Plugin, Request, Upstream};

fn chain(actions: [&str; 3]) -> anyhow::Result<Edge> {
    let p = probe();
    let mut b = Edge::builder();
    for (i, a) in actions.iter().enumerate() {
        b = b.plugin(Plugin::new(&p, format!("actions={a}")).name(&format!("p{i}")));
    }
    b.build()
}

fn plugins_that_saw_response(edge: &Edge) -> Vec<String> {
    edge.logs()
        .into_iter()
        .filter(|l| l.message.starts_with("response headers"))
        .map(|l| l.plugin)
        .collect()
}

#[test]
fn local_reply_runs_its_own_response_callbacks_and_those_before_it() -> anyhow::Result<()> {
    let mut edge = chain(["none", "local", "none"])?;
    let res = edge.get("/x")?;
    assert_eq!(res.status, 418);
    assert_eq!(res.body_str(), "teapot");
    assert_eq!(res.header("x-local"), Some("yes"));
    assert_eq!(res.details, "");
    assert_eq!(
        res.header("x-probe-status"),
        Some("418"),
        "seen by the plugin's own callback"
    );
    assert_eq!(
        plugins_that_saw_response(&edge),
        ["p1", "p0"],
        "reverse order, p2 never ran"
    );
    assert!(edge.upstream_requests().is_empty());
    assert_eq!(
        lines(&edge, "log ctx").len(),
        2,
        "on_log for the filters that saw the stream"
    );
    Ok(())
}

#[test]
fn upstream_response_runs_response_callbacks_in_reverse_chain_order() -> anyhow::Result<()> {
    let mut edge = chain(["none", "none", "none"])?;
    let res = edge.get("/x")?;
    assert_eq!(res.status, 200);
    assert_eq!(res.details, details::VIA_UPSTREAM);
    assert_eq!(plugins_that_saw_response(&edge), ["p2", "p1", "p0"]);
    Ok(())
}

#[test]
fn local_reply_during_the_response_replaces_it_directly() -> anyhow::Result<()> {
    let mut edge = chain(["none", "resp-local", "none"])?;
    let res = edge.get("/x")?;
    assert_eq!(res.status, 299);
    assert_eq!(res.body_str(), "replaced");
    assert_eq!(
        plugins_that_saw_response(&edge),
        ["p2", "p1"],
        "p0 is skipped"
    );
    Ok(())
}

#[test]
fn upstream_failures_reach_response_callbacks_as_envoys_local_replies() -> anyhow::Result<()> {
    for (up, status, det) in [
        (Upstream::Reset, 503, details::RESET),
        (Upstream::Refused, 503, details::REFUSED),
        (Upstream::Hang, 504, details::TIMEOUT),
        (Upstream::status(503), 503, details::VIA_UPSTREAM),
    ] {
        let reply = up.clone();
        let mut edge = probe_edge("").upstream(move |_| reply.clone()).build()?;
        let res = edge.get("/x")?;
        assert_eq!(res.status, status, "{up:?}");
        assert_eq!(res.header("x-probe-details"), Some(det), "{up:?}");
        assert_eq!(res.details, det);
    }
    Ok(())
}

#[test]
fn slow_upstream_advances_the_clock_and_times_out_at_the_route_timeout() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .route_timeout(std::time::Duration::from_secs(2))
        .upstream(|r| {
            let d = if r.path() == "/slow" { 3 } else { 1 };
            Upstream::ok("late").delay(std::time::Duration::from_secs(d))
        })
        .build()?;
    let t0 = edge.now_ns();
    assert_eq!(edge.get("/fast")?.status, 200);
    assert_eq!(edge.now_ns() - t0, 1_000_000_000);
    assert_eq!(edge.get("/slow")?.status, 504);
    Ok(())
}

#[test]
fn plugin_can_reset_the_stream() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    let res = edge.send(Request::get("/x").header("x-probe", "close"))?;
    assert!(res.reset);
    assert_eq!((res.status, res.details.as_str()), (0, details::WASM_CLOSE));
    assert!(edge.upstream_requests().is_empty());
    Ok(())
}

#[test]
fn a_head_request_gets_headers_only_from_the_upstream_and_from_local_replies() -> anyhow::Result<()>
{
    // Seen in Envoy 1.40 (envoy/scenarios/cf-18-*): the upstream codec reads no body for HEAD,
    // and a local reply to HEAD is sent as headers only.
    let mut edge = probe_edge("")
        .upstream(|_| Upstream::status(503).body("down"))
        .build()?;
    let res = edge.send(Request::new("HEAD", "/x"))?;
    assert_eq!((res.status, res.body_str()), (503, ""));
    let headers = lines(&edge, "response headers");
    assert!(!headers.is_empty(), "the probe saw the response headers");
    assert!(
        headers.iter().all(|l| l.ends_with("eos=true")),
        "the headers end the stream"
    );
    assert!(lines(&edge, "response body").is_empty());

    let mut edge = chain(["none", "local", "none"])?;
    let res = edge.send(Request::new("HEAD", "/x"))?;
    assert_eq!((res.status, res.body_str()), (418, ""));
    assert_eq!(res.header("x-local"), Some("yes"));
    assert!(lines(&edge, "response body").is_empty());
    Ok(())
}
