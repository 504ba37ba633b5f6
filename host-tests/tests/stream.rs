//! Header maps, bodies, pauses and properties of one stream.
mod common;
use common::*;
use host_tests::{Request, Upstream};

#[test]
fn header_names_are_lower_cased_and_edits_reach_the_upstream() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    let res = edge.send(
        Request::get("/h")
            .header("x-probe", "headers")
            .header("X-Replaced", "old")
            .header("x-removed", "gone"),
    )?;
    assert_eq!(res.status, 200);
    let up = &edge.upstream_requests()[0];
    assert_eq!(up.header("x-added"), Some("1"));
    assert_eq!(up.header("x-replaced"), Some("new"));
    assert_eq!(up.header("x-removed"), None);
    let names = up.header("x-names").unwrap();
    assert!(
        names.starts_with(":authority,:path,:method,:scheme,x-probe,x-replaced"),
        "{names}"
    );
    assert_eq!(
        up.header("x-missing"),
        Some("1"),
        "a missing header is NotFound"
    );
    let size: Vec<&str> = up.header("x-map-size").unwrap().split(':').collect();
    assert_eq!(size[0], "0");
    assert!(size[1].parse::<usize>()? > 50, "map size is the byte size");
    Ok(())
}

#[test]
fn request_headers_are_unreachable_once_the_filter_continues() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    edge.send(Request::post("/p").header("x-probe", "after").body("abc"))?;
    assert_eq!(
        lines(&edge, "get after continue"),
        ["get after continue: 2"]
    );
    Ok(())
}

#[test]
fn properties_use_envoys_encodings() -> anyhow::Result<()> {
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&probe(), "").name("my-probe").root_id("rid"))
        .build()?;
    edge.send(
        Request::get("/p?q=1")
            .header("x-probe", "props")
            .from("10.1.2.3:5555"),
    )?;
    let up = &edge.upstream_requests()[0];
    assert_eq!(up.header("x-prop-source"), Some("10.1.2.3:5555"));
    assert_eq!(up.header("x-prop-source-port"), Some("5555"));
    assert_eq!(up.header("x-prop-path"), Some("/p?q=1"));
    assert_eq!(up.header("x-prop-method"), Some("GET"));
    assert_eq!(up.header("x-prop-host"), Some("example.com"));
    assert_eq!(up.header("x-prop-plugin"), Some("my-probe"));
    assert_eq!(up.header("x-prop-root"), Some("rid"));
    assert_eq!(
        up.header("x-prop-id").map(str::len),
        Some(36),
        "x-request-id is a uuid"
    );
    assert_eq!(
        up.header("x-prop-code"),
        Some("<none>"),
        "no response code yet"
    );
    assert_eq!(up.header("x-prop-nope"), Some("<none>"));
    Ok(())
}
use host_tests::{Edge, Plugin};

#[test]
fn pause_on_body_buffers_until_the_end_and_reports_total_sizes() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    let res = edge.send(Request::post("/b").header("x-probe", "buffer").chunks(vec![
        b"abc".to_vec(),
        b"def".to_vec(),
        b"ghi".to_vec(),
    ]))?;
    assert_eq!(res.status, 200);
    assert_eq!(
        lines(&edge, "request body"),
        [
            "request body size=3 eos=false status_size=3",
            "request body size=6 eos=false status_size=6",
            "request body size=9 eos=true status_size=9"
        ]
    );
    assert_eq!(edge.upstream_requests()[0].body, b"ABCDEFGHI");
    Ok(())
}

#[test]
fn streamed_chunks_without_pause_arrive_one_by_one() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    edge.send(
        Request::post("/b")
            .chunks(vec![b"ab".to_vec(), b"cd".to_vec()])
            .trailer("t", "1"),
    )?;
    assert_eq!(
        lines(&edge, "request body"),
        [
            "request body size=2 eos=false status_size=2",
            "request body size=2 eos=false status_size=2"
        ]
    );
    assert_eq!(lines(&edge, "request trailers"), ["request trailers n=1"]);
    assert_eq!(edge.upstream_requests()[0].body, b"abcd");
    Ok(())
}

#[test]
fn buffering_past_the_limit_answers_413() -> anyhow::Result<()> {
    let mut edge = probe_edge("").buffer_limit(8).build()?;
    let res = edge.send(Request::post("/b").header("x-probe", "buffer").chunks(vec![
        vec![b'a'; 5],
        vec![b'b'; 5],
        vec![b'c'; 5],
    ]))?;
    assert_eq!(res.status, 413);
    assert_eq!(res.details, "request_payload_too_large");
    assert!(edge.upstream_requests().is_empty());
    Ok(())
}

#[test]
fn set_buffer_bytes_at_zero_prepends() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    edge.send(
        Request::post("/b")
            .header("x-probe", "prepend")
            .body("body"),
    )?;
    assert_eq!(edge.upstream_requests()[0].body, b">>body");
    Ok(())
}

#[test]
fn response_body_can_be_buffered_and_rewritten() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .upstream(|_| Upstream::status(200).chunks(vec![b"12".to_vec(), b"34".to_vec()]))
        .build()?;
    let res = edge.send(Request::get("/r").header("x-probe", "resp-buffer"))?;
    assert_eq!(res.body_str(), "[1234]");
    assert_eq!(
        lines(&edge, "response body"),
        [
            "response body size=2 eos=false",
            "response body size=4 eos=true"
        ]
    );
    Ok(())
}

#[test]
fn pause_on_headers_holds_body_callbacks_until_continue() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .cluster("flags", |_| host_tests::CalloutReply::ok(200, &[], "{}"))
        .build()?;
    let id = edge.begin(
        Request::post("/c")
            .header("x-probe", "callout")
            .chunks(vec![b"xyz".to_vec(), b"uvw".to_vec()]),
    )?;
    assert_eq!(
        edge.step(id)?,
        host_tests::Step::Ran(host_tests::Callback::RequestHeaders)
    );
    assert_eq!(
        edge.step(id)?,
        host_tests::Step::Waiting,
        "body waits behind the paused headers"
    );
    assert!(lines(&edge, "request body").is_empty());
    let res = edge.finish(id)?;
    assert_eq!(res.status, 200);
    assert_eq!(
        lines(&edge, "request body"),
        ["request body size=6 eos=true status_size=6"]
    );
    assert_eq!(
        edge.upstream_requests()[0].header("x-callout"),
        Some("200:{}:0:")
    );
    Ok(())
}

#[test]
fn whole_header_map_can_be_replaced_and_is_lower_cased() -> anyhow::Result<()> {
    let mut edge = probe_edge("").build()?;
    edge.send(
        Request::get("/m")
            .header("x-probe", "pairs")
            .header("x-drop", "1"),
    )?;
    let up = &edge.upstream_requests()[0];
    assert_eq!(up.header("x-drop"), None);
    assert_eq!(up.header("x-whole"), Some("map"));
    assert_eq!(up.path(), "/m");
    Ok(())
}

#[test]
fn properties_a_plugin_sets_read_back_and_log_level_is_reported() -> anyhow::Result<()> {
    let mut edge = probe_edge("")
        .log_level(host_tests::abi::LogLevel::Debug)
        .build()?;
    edge.send(Request::get("/m").header("x-probe", "setprop,loglevel"))?;
    let up = &edge.upstream_requests()[0];
    assert_eq!(up.header("x-setprop"), Some("m1"));
    assert_eq!(up.header("x-log-level"), Some("Debug"));
    Ok(())
}
