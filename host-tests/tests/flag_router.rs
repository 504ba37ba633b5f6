//! dist/flag_router.wasm in the harness: headers from flags, sticky rollouts on every worker,
//! and the polled flag source as the kill switch.
mod common;
use anyhow::Result;
use common::assert_rejected;
use host_tests::{CalloutReply, Edge, EdgeBuilder, Module, Plugin, Request};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

fn module() -> Module {
    common::plugin_module("flag_router")
}

fn edge(config: &str) -> EdgeBuilder {
    Edge::builder()
        .plugin(Plugin::new(&module(), config).name("flag-router"))
        .workers(2)
}

const INLINE: &str = r#"{
  "targetingKey": { "header": "x-user-id" },
  "context": { "tier": { "header": "x-tier" } },
  "headers": { "new-checkout": "x-route-checkout", "search-v2": "x-route-search" },
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": "v2", "off": "v1" },
      "defaultVariant": "off",
      "targeting": { "if": [ { "==": [ { "var": "tier" }, "beta" ] }, "on",
                     { "fractional": [ ["on", 50], ["off", 50] ] } ] }
    },
    "search-v2": { "state": "DISABLED", "variants": { "on": true, "off": false }, "defaultVariant": "on" }
  }
}"#;

/// What the upstream saw in `header` for the last request.
fn seen(edge: &Edge, header: &str) -> Option<String> {
    edge.upstream_requests()
        .last()
        .and_then(|r| r.header(header).map(str::to_string))
}

/// A header the flags set is set once (a set replaces whatever the client sent) and never
/// removed first: one crossing per mapped header, a removal only for those no flag sets.
#[test]
fn each_mapped_header_costs_one_edit() -> Result<()> {
    let mut edge = edge(INLINE).workers(1).build()?;
    for _ in 0..3 {
        edge.send(
            Request::get("/checkout")
                .header("x-user-id", "u1")
                .header("x-route-checkout", "forged"),
        )?;
    }
    let calls = edge.hostcalls(0);
    // new-checkout sets x-route-checkout; the disabled search-v2 clears x-route-search.
    assert_eq!(
        calls.get("proxy_replace_header_map_value"),
        Some(&3),
        "{calls:?}"
    );
    assert_eq!(
        calls.get("proxy_remove_header_map_value"),
        Some(&3),
        "{calls:?}"
    );
    assert_ne!(seen(&edge, "x-route-checkout").as_deref(), Some("forged"));
    assert_eq!(seen(&edge, "x-route-search"), None);
    Ok(())
}

#[test]
fn a_forged_route_header_is_replaced_by_the_flags_answer() -> Result<()> {
    let mut edge = edge(INLINE).build()?;
    edge.send(
        Request::get("/checkout")
            .header("x-tier", "beta")
            .header("x-route-checkout", "forged")
            .header("x-route-search", "forged"),
    )?;
    assert_eq!(seen(&edge, "x-route-checkout").as_deref(), Some("v2"));
    assert_eq!(
        seen(&edge, "x-route-search"),
        None,
        "a disabled flag sets no header"
    );
    assert_eq!(edge.metric("flag_router.new-checkout.variant.on"), Some(1));
    assert_eq!(edge.metric("flag_router.search-v2.disabled"), Some(1));
    Ok(())
}

#[test]
fn a_user_gets_the_same_variant_on_every_worker_and_the_split_follows_the_weights() -> Result<()> {
    let mut edge = edge(INLINE).build()?;
    let mut v2 = 0;
    for i in 0..200 {
        let user = format!("user-{i}");
        let mut answers = Vec::new();
        for w in 0..2 {
            edge.send(Request::get("/").header("x-user-id", &user).worker(w))?;
            answers.push(seen(&edge, "x-route-checkout"));
        }
        assert_eq!(answers[0], answers[1], "{user} moved between workers");
        v2 += usize::from(answers[0].as_deref() == Some("v2"));
    }
    assert!((70..=130).contains(&v2), "{v2} of 200 in a 50% rollout");
    // Every request counted under the variant it got, with both outcomes interleaved.
    let counted = |v| edge.metric(&format!("flag_router.new-checkout.variant.{v}"));
    assert_eq!(counted("on"), Some(2 * v2 as u64));
    assert_eq!(counted("off"), Some(2 * (200 - v2) as u64));
    Ok(())
}

/// A flag file server: serves `doc` with an ETag that changes with it, answers 304 to a
/// matching If-None-Match, and can be switched to fail.
#[derive(Clone, Default)]
struct FlagServer {
    doc: Rc<RefCell<String>>,
    mode: Rc<RefCell<&'static str>>,
    requests: Rc<RefCell<Vec<Option<String>>>>,
}

impl FlagServer {
    fn new(doc: &str) -> Self {
        let s = FlagServer::default();
        *s.doc.borrow_mut() = doc.to_string();
        *s.mode.borrow_mut() = "ok";
        s
    }
    fn reply(&self, req: &host_tests::CalloutRequest) -> CalloutReply {
        self.requests
            .borrow_mut()
            .push(req.header("if-none-match").map(str::to_string));
        let doc = self.doc.borrow().clone();
        let etag = format!("\"{}\"", doc.len());
        match *self.mode.borrow() {
            "down" => CalloutReply::Fail {
                delay: Duration::ZERO,
            },
            "500" => CalloutReply::ok(500, &[], "oops"),
            "garbage" => CalloutReply::ok(200, &[("etag", "\"g\"")], "{\"flags\": 7}"),
            _ if req.header("if-none-match") == Some(etag.as_str()) => {
                CalloutReply::ok(304, &[("etag", &etag)], "")
            }
            _ => CalloutReply::ok(
                200,
                &[("etag", &etag), ("content-type", "application/json")],
                doc,
            ),
        }
    }
}

fn served(state: &str) -> String {
    format!(
        r#"{{"flags":{{"new-checkout":{{"state":"{state}","variants":{{"on":"canary","off":"stable"}},"defaultVariant":"on"}}}}}}"#
    )
}

const REMOTE: &str = r#"{
  "headers": { "new-checkout": "x-route-checkout" },
  "flags": { "new-checkout": { "state": "ENABLED", "variants": { "on": "bootstrap" }, "defaultVariant": "on" } },
  "source": { "cluster": "flags", "authority": "flags.internal", "path": "/flags.json", "pollInterval": "5s", "timeout": "1s" }
}"#;

fn remote(server: &FlagServer) -> Result<Edge> {
    let s = server.clone();
    edge(REMOTE)
        .cluster("flags", move |req| s.reply(req))
        .build()
}

#[test]
fn the_source_is_fetched_at_start_and_polled_with_etag() -> Result<()> {
    let server = FlagServer::new(&served("ENABLED"));
    let mut edge = remote(&server)?;
    edge.run_pending()?;
    edge.get("/")?;
    assert_eq!(seen(&edge, "x-route-checkout").as_deref(), Some("canary"));
    let callout = &edge.callouts()[0];
    assert_eq!(callout.header(":path"), Some("/flags.json"));
    assert_eq!(callout.header(":authority"), Some("flags.internal"));
    assert_eq!(callout.timeout, Some(Duration::from_secs(1)));
    edge.advance(Duration::from_secs(5))?;
    let etags = server.requests.borrow().clone();
    // Two workers and Envoy's main thread: three VMs, each fetching at start and polling.
    assert!(
        etags.len() >= 6,
        "each VM fetches at start and on every poll: {etags:?}"
    );
    assert!(
        etags.iter().skip(3).all(|e| e.is_some()),
        "later polls are conditional: {etags:?}"
    );
    assert!(edge.metric("flag_router.source_fetches") >= Some(6));
    assert_eq!(
        edge.metric("flag_router.source_updates"),
        Some(3),
        "304s are not updates"
    );
    Ok(())
}

#[test]
fn flipping_the_served_flag_to_disabled_moves_traffic_within_one_poll() -> Result<()> {
    let server = FlagServer::new(&served("ENABLED"));
    let mut edge = remote(&server)?;
    edge.run_pending()?;
    edge.send(Request::get("/").worker(0))?;
    assert_eq!(seen(&edge, "x-route-checkout").as_deref(), Some("canary"));
    *server.doc.borrow_mut() = served("DISABLED");
    edge.advance(Duration::from_secs(5))?;
    for w in 0..2 {
        edge.send(Request::get("/").worker(w))?;
        assert_eq!(
            seen(&edge, "x-route-checkout"),
            None,
            "worker {w} still routes to canary"
        );
    }
    // The new file's outcomes count under their own names, the old file's stay as they were.
    assert_eq!(edge.metric("flag_router.new-checkout.disabled"), Some(2));
    assert_eq!(edge.metric("flag_router.new-checkout.variant.on"), Some(1));
    Ok(())
}

#[test]
fn a_failed_or_invalid_fetch_keeps_the_last_good_flags() -> Result<()> {
    let server = FlagServer::new(&served("ENABLED"));
    let mut edge = remote(&server)?;
    edge.run_pending()?;
    for mode in ["down", "500", "garbage"] {
        *server.mode.borrow_mut() = mode;
        edge.advance(Duration::from_secs(5))?;
        edge.get("/")?;
        assert_eq!(
            seen(&edge, "x-route-checkout").as_deref(),
            Some("canary"),
            "after {mode}"
        );
    }
    assert_eq!(
        edge.metric("flag_router.source_errors"),
        Some(9),
        "3 failures on 2 workers and the main thread"
    );
    assert!(edge.logged("keeping the last good flags"));
    assert!(!edge.vm_failed(0, 0) && !edge.vm_failed(1, 0));
    Ok(())
}

#[test]
fn inline_flags_serve_until_the_first_good_fetch() -> Result<()> {
    let server = FlagServer::new(&served("ENABLED"));
    *server.mode.borrow_mut() = "down";
    let mut edge = remote(&server)?;
    edge.run_pending()?;
    edge.get("/")?;
    assert_eq!(
        seen(&edge, "x-route-checkout").as_deref(),
        Some("bootstrap")
    );
    *server.mode.borrow_mut() = "ok";
    edge.advance(Duration::from_secs(5))?;
    edge.get("/")?;
    assert_eq!(seen(&edge, "x-route-checkout").as_deref(), Some("canary"));
    Ok(())
}

#[test]
fn bad_configs_are_rejected_at_load_naming_the_field() {
    for (config, field) in [
        (r#"{"headers":{}}"#, "headers: required"),
        (r#"{"headers":{"f":"x-f"}}"#, "headers.f: no such flag"),
        (
            r#"{"headers":{"f":"x-f"},"flags":{"f":{"state":"ENABLED","variants":{"a":"A"},"targeting":{"regex":[1]}}}}"#,
            "flags.f.targeting: unknown operator",
        ),
        (
            r#"{"headers":{"f":"x-f"},"source":{"cluster":"flags","path":"/f","timeout":"soon"}}"#,
            "source.timeout:",
        ),
    ] {
        assert_rejected(edge(config), field);
    }
}
