//! Behaviours a plugin nobody here wrote runs into, each as Envoy 1.40 shows it: gRPC local
//! replies, Envoy's own errors to gRPC clients, a response body over the buffer limit after the
//! headers went on, the main thread's VM, CR/LF in a header value, and state other filters set.
mod common;
use common::*;
use host_tests::{details, Edge, Plugin, Request, Upstream};
use std::time::Duration;

fn grpc_status(res: &host_tests::Response) -> (u16, Option<&str>, Option<&str>, Option<&str>) {
    (
        res.status,
        res.header("content-type"),
        res.header("grpc-status"),
        res.header("grpc-message"),
    )
}

#[test]
fn a_grpc_reply_to_a_grpc_request_is_trailers_only_with_its_status() -> anyhow::Result<()> {
    let mut edge = probe_edge("actions=grpc-reply").build()?;
    let res = edge.send(Request::grpc("/probe.Service/Ping", b"ping"))?;
    assert_eq!(
        grpc_status(&res),
        (200, Some("application/grpc"), Some("10"), Some("msg"))
    );
    assert!(res.body.is_empty(), "the message is in grpc-message only");
    assert_eq!(res.header("content-length"), None);
    assert!(edge.upstream_requests().is_empty());
    Ok(())
}

#[test]
fn a_grpc_reply_to_a_plain_request_is_the_message_as_text() -> anyhow::Result<()> {
    // Envoy answers in gRPC form only when the request is gRPC (its content-type).
    let mut edge = probe_edge("actions=grpc-reply").build()?;
    let res = edge.get("/")?;
    assert_eq!(
        (res.status, res.header("grpc-status"), res.body_str()),
        (200, None, "msg")
    );
    Ok(())
}

#[test]
fn envoy_answers_a_grpc_client_in_grpc_when_the_upstream_fails() -> anyhow::Result<()> {
    let mut edge = probe_edge("actions=none")
        .route_timeout(Duration::from_secs(1))
        .upstream(|req| match req.path() {
            "/refused.Service/M" => Upstream::Refused,
            "/reset.Service/M" => Upstream::Reset,
            _ => Upstream::Hang,
        })
        .build()?;
    for path in ["/refused.Service/M", "/reset.Service/M", "/slow.Service/M"] {
        let res = edge.send(Request::grpc(path, b""))?;
        let (status, content_type, code, message) = grpc_status(&res);
        assert_eq!(
            (status, content_type, code),
            (200, Some("application/grpc"), Some("14")),
            "{path}"
        );
        assert!(message.is_some_and(|m| m.starts_with("upstream")), "{path}");
        assert!(res.body.is_empty(), "{path}");
        // The plugin sees Envoy's reply as the client will.
        assert_eq!(res.header("x-probe-status"), Some("200"), "{path}");
    }
    // A plain client still gets the plain 503.
    let res = edge.get("/refused.Service/M")?;
    assert_eq!((res.status, res.header("grpc-status")), (503, None));
    Ok(())
}

#[test]
fn a_response_body_over_the_limit_after_the_headers_went_resets_the_stream() -> anyhow::Result<()> {
    let big = vec![b'x'; 2 * 1024 * 1024];
    let mut edge = probe_edge("actions=resp-buffer")
        .upstream(move |_| Upstream::ok(big.clone()))
        .build()?;
    let res = edge.get("/big")?;
    assert!(
        res.reset,
        "the client had the 200 headers: only a reset is left"
    );
    assert_eq!(res.status, 200);
    assert_eq!(res.details, details::RESPONSE_TOO_LARGE);
    assert!(res.body.is_empty(), "the probe held the body");
    Ok(())
}

#[test]
fn an_upstream_body_reaches_the_plugin_in_reads_of_at_most_16_kib() -> anyhow::Result<()> {
    let body = vec![b'x'; 40 * 1024];
    let mut edge = probe_edge("actions=none")
        .upstream(move |_| Upstream::ok(body.clone()))
        .build()?;
    let res = edge.get("/")?;
    assert_eq!(res.body.len(), 40 * 1024);
    let sizes = lines(&edge, "response body size=");
    assert_eq!(
        sizes,
        [
            "response body size=16384 eos=false",
            "response body size=16384 eos=false",
            "response body size=8192 eos=true"
        ]
    );
    Ok(())
}

#[test]
fn every_plugin_also_runs_on_the_main_thread_which_takes_no_streams() -> anyhow::Result<()> {
    let mut edge = probe_edge("tick=1000").workers(2).build()?;
    assert_eq!(
        lines(&edge, "vm started").len(),
        3,
        "2 workers + main thread"
    );
    assert_eq!(lines(&edge, "configured with").len(), 3);
    let main = edge.worker_count();
    assert_eq!(main, 2);
    assert!(edge.logs().iter().any(|l| l.worker == main));
    for _ in 0..4 {
        assert!(edge.get("/")?.worker < main);
    }
    edge.advance(Duration::from_millis(1500))?;
    let ticks: Vec<usize> = edge
        .logs()
        .into_iter()
        .filter(|l| l.message == "tick 1")
        .map(|l| l.worker)
        .collect();
    assert_eq!(ticks.len(), 3, "each root context ticks: {ticks:?}");
    assert!(ticks.contains(&main));
    Ok(())
}

#[test]
fn a_header_value_with_crlf_reaches_the_client_as_two_headers() -> anyhow::Result<()> {
    let mut edge = probe_edge("actions=crlf").build()?;
    let res = edge.get("/")?;
    assert_eq!(res.header("x-crlf"), Some("a"));
    assert_eq!(res.header("x-injected"), Some("b"), "header injection");
    assert!(
        edge.abi_misuse()
            .iter()
            .any(|m| m.contains("x-crlf") && m.contains("header injection")),
        "{:?}",
        edge.abi_misuse()
    );
    // HTTP/2 has no line-based framing to break out of.
    let res = edge.send(Request::get("/").http2())?;
    assert_eq!(res.header("x-injected"), None);
    Ok(())
}

#[test]
fn a_property_another_filter_set_is_what_the_plugin_reads() -> anyhow::Result<()> {
    let mut edge = probe_edge("actions=prop-of").build()?;
    let path = "metadata/filter_metadata/envoy.filters.http.lua/tenant";
    edge.send(Request::get("/").header("x-probe-path", path).property(
        &[
            "metadata",
            "filter_metadata",
            "envoy.filters.http.lua",
            "tenant",
        ],
        "acme",
    ))?;
    edge.send(Request::get("/").header("x-probe-path", path))?;
    let seen: Vec<Option<&str>> = edge
        .upstream_requests()
        .iter()
        .map(|r| r.header("x-prop-of"))
        .collect();
    assert_eq!(seen, [Some("acme"), Some("<none>")]);
    Ok(())
}

#[test]
fn the_router_adds_its_headers_and_the_application_frames_its_body() -> anyhow::Result<()> {
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&probe(), "actions=headers"))
        .upstream(|req| match req.path() {
            "/chunked" => Upstream::ok("").chunks(vec![b"a".to_vec(), b"b".to_vec()]),
            _ => Upstream::ok("hello").delay(Duration::from_millis(30)),
        })
        .build()?;
    let res = edge.get("/")?;
    assert_eq!(res.header("content-length"), Some("5"));
    assert_eq!(res.header("x-envoy-upstream-service-time"), Some("30"));
    let res = edge.get("/chunked")?;
    assert_eq!(res.header("content-length"), None);
    assert_eq!(res.body_str(), "ab");
    // Envoy's connection manager sets x-forwarded-proto before it generates x-request-id.
    let names = edge.upstream_requests()[0]
        .header("x-names")
        .unwrap_or_default()
        .to_string();
    let at = |n: &str| names.split(',').position(|x| x == n);
    let (proto, id) = (at("x-forwarded-proto"), at("x-request-id"));
    assert!(proto.is_some() && id.is_some(), "both are sent: {names}");
    assert!(proto < id, "{names}");
    Ok(())
}

#[test]
fn a_body_changed_without_its_content_length_reaches_the_client_cut_to_it() -> anyhow::Result<()> {
    // The probe wraps the body in brackets and keeps the application's content-length: 5.
    let mut edge = probe_edge("actions=resp-buffer")
        .upstream(|_| Upstream::ok("hello"))
        .build()?;
    let res = edge.get("/")?;
    assert_eq!((res.body_str(), res.reset), ("[hell", false));
    Ok(())
}
