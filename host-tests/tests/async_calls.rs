//! HTTP and gRPC callouts, shared queues and timers: asynchronous work delivered by the host.
mod common;
use common::*;
use host_tests::{CalloutReply, GrpcReply, Request};
use std::time::Duration;

#[test]
fn callout_reply_resumes_the_paused_request() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .cluster("flags", |req| {
            assert_eq!(req.header(":path"), Some("/flags.json"));
            CalloutReply::ok(200, &[("etag", "v1")], "flags-body").after(Duration::from_millis(30))
        })
        .build()?;
    let t0 = edge.now_ns();
    let res = edge.send(Request::get("/x").header("x-probe", "callout"))?;
    assert_eq!(res.status, 200);
    assert_eq!(
        edge.upstream_requests()[0].header("x-callout"),
        Some("200:flags-body:0:")
    );
    assert_eq!(
        edge.now_ns() - t0,
        30_000_000,
        "the clock moved to the reply"
    );
    assert_eq!(edge.callouts().len(), 1);
    Ok(())
}

#[test]
fn callout_to_an_unknown_cluster_is_refused() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    edge.send(Request::get("/x").header("x-probe", "callout"))?;
    assert_eq!(
        edge.upstream_requests()[0].header("x-callout"),
        Some("error:BadArgument")
    );
    Ok(())
}

#[test]
fn failed_callout_gets_envoys_local_503_reply() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .cluster("flags", |_| CalloutReply::Fail {
            delay: Duration::ZERO,
        })
        .build()?;
    edge.send(Request::get("/x").header("x-probe", "callout"))?;
    let got = edge.upstream_requests()[0]
        .header("x-callout")
        .unwrap_or("");
    assert!(got.starts_with("503:upstream connect error"), "{got}");
    Ok(())
}

#[test]
fn callout_that_never_answers_gets_504_at_its_timeout() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .cluster("flags", |_| CalloutReply::Hang)
        .build()?;
    let t0 = edge.now_ns();
    edge.send(Request::get("/x").header("x-probe", "callout"))?;
    let got = edge.upstream_requests()[0]
        .header("x-callout")
        .unwrap()
        .to_string();
    assert!(got.starts_with("504:upstream request timeout"), "{got}");
    assert_eq!(edge.now_ns() - t0, 2_000_000_000, "the probe's 2 s timeout");
    Ok(())
}

#[test]
fn grpc_call_round_trips_and_failures_close_with_their_status() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .grpc_cluster("grpc", |req| {
            assert_eq!(
                (req.service.as_str(), req.method.as_str()),
                ("probe.Service", "Ping")
            );
            GrpcReply::ok("pong")
        })
        .build()?;
    edge.send(Request::get("/x").header("x-probe", "grpc"))?;
    assert_eq!(edge.upstream_requests()[0].header("x-grpc"), Some("0:pong"));
    assert_eq!(edge.grpc_sent()[0].message, b"ping");

    let mut down = probe_edge("")
        .grpc_cluster("grpc", |_| GrpcReply::error(14, "unavailable"))
        .build()?;
    down.send(Request::get("/x").header("x-probe", "grpc"))?;
    assert_eq!(
        down.upstream_requests()[0].header("x-grpc"),
        Some("14:unavailable"),
        "a failed call closes with its status and message"
    );

    // The probe's call has a 1 s timeout: an answer after it is Envoy's timeout, status 14
    // with "upstream request timeout{response_timeout}" (what Envoy 1.40 reports, seen from
    // a rate limit callout), never the late answer.
    let mut slow = probe_edge("")
        .grpc_cluster("grpc", |_| GrpcReply {
            delay: std::time::Duration::from_secs(2),
            ..GrpcReply::ok("late")
        })
        .build()?;
    let id = slow.begin(Request::get("/x").header("x-probe", "grpc"))?;
    slow.advance(std::time::Duration::from_millis(1_500))?;
    slow.finish(id)?;
    assert_eq!(
        slow.upstream_requests()[0].header("x-grpc"),
        Some("14:upstream request timeout{response_timeout}")
    );
    Ok(())
}

#[test]
fn root_context_callout_at_configure_is_answered_to_the_root() -> anyhow::Result<()> {
    let mut edge = probe_edge("fetch=/flags.json")
        .cluster("flags", |_| CalloutReply::ok(200, &[], "abc"))
        .build()?;
    edge.run_pending()?;
    // One worker and Envoy's main thread: each VM's root context fetches at configure.
    assert_eq!(
        lines(&edge, "root callout"),
        ["root callout 4 headers=1 body=3"; 2]
    );
    Ok(())
}

#[test]
fn tick_timers_follow_the_host_clock_on_every_worker() -> anyhow::Result<()> {
    let mut edge = probe_edge("tick=1000").workers(2).build()?;
    edge.advance(Duration::from_millis(3500))?;
    assert_eq!(
        edge.metric("probe_ticks"),
        Some(9),
        "3 ticks on each of 2 workers and on the main thread"
    );
    Ok(())
}

#[test]
fn queue_notifications_reach_the_registering_root_asynchronously() -> anyhow::Result<()> {
    let mut edge = probe_edge("queue").build()?;
    edge.send(Request::get("/x").header("x-probe", "enqueue"))?;
    assert!(
        lines(&edge, "dequeued").is_empty(),
        "never inside the enqueuing callback"
    );
    edge.run_pending()?;
    assert_eq!(lines(&edge, "dequeued"), ["dequeued hello"]);
    Ok(())
}

#[test]
fn metrics_follow_per_type_rules() -> anyhow::Result<()> {
    let mut edge = probe_edge("").workers(2).build()?;
    for _ in 0..3 {
        edge.send(Request::get("/x").header("x-probe", "metrics"))?;
    }
    assert_eq!(
        edge.metric("probe_requests"),
        Some(3),
        "counters add across workers"
    );
    assert_eq!(
        edge.metric("probe_gauge"),
        Some(40),
        "a gauge record sets, increment adds"
    );
    assert_eq!(edge.histogram("probe_hist"), [7, 7, 7]);
    assert_eq!(
        lines(&edge, "metric zero increment: Err(BadArgument)").len(),
        3
    );
    Ok(())
}

#[test]
fn foreign_functions_are_served_by_the_test() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .foreign("echo", |args| Ok([args, b"!"].concat()))
        .build()?;
    edge.send(Request::get("/x").header("x-probe", "foreign"))?;
    assert_eq!(
        edge.upstream_requests()[0].header("x-foreign"),
        Some("abc!")
    );
    Ok(())
}

#[test]
fn grpc_streams_send_and_cancel_once() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .grpc_cluster("grpc", |_| GrpcReply::ok(""))
        .build()?;
    edge.send(Request::get("/x").header("x-probe", "grpc-stream"))?;
    // Stream tokens carry tag 2; a second cancel finds nothing.
    assert_eq!(
        edge.upstream_requests()[0].header("x-grpc-stream"),
        Some("2:Ok(()):Err(NotFound)")
    );
    let sent = edge.grpc_sent();
    assert_eq!(
        (
            sent[0].method.as_str(),
            sent[0].message.as_slice(),
            sent[0].stream
        ),
        ("Watch", &b"hello"[..], true)
    );
    Ok(())
}
