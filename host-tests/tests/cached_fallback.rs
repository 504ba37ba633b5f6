//! dist/cached_fallback.wasm in the harness, on two workers sharing one store, as in Envoy:
//! what a client gets when the upstream fails after a good answer, what is never kept, the
//! circuit breaker's calls to the upstream, and the bounds.
mod common;
use anyhow::Result;
use common::assert_rejected;
use host_tests::{Callback, Edge, EdgeBuilder, Module, Plugin, Request, Response, Step, Upstream};
use std::time::Duration;

fn module() -> Module {
    common::plugin_module("cached_fallback")
}

fn edge(config: &str) -> EdgeBuilder {
    Edge::builder()
        .plugin(Plugin::new(&module(), config).name("cached-fallback"))
        .workers(2)
        .route_timeout(Duration::from_secs(1))
}

const API: &str = r#"{"routes":[{"pathPrefix":"/api/"}]}"#;
const RECS: &str = r#"{"items":["a","b"]}"#;

fn good() -> Upstream {
    Upstream::ok(RECS)
        .header("content-type", "application/json")
        .header("x-version", "1")
}

fn recs(worker: usize) -> Request {
    Request::get("/api/recs?page=1").worker(worker)
}

/// The stored copy, as a client must see it.
fn assert_stale(res: &Response, fwd_status: u16, detail: &str) {
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.body_str(), RECS);
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(res.header("x-version"), Some("1"));
    assert_eq!(
        res.header("cache-status").map(str::to_string),
        Some(format!(
            "cached-fallback; hit; fwd=stale; fwd-status={fwd_status}; detail={detail}"
        ))
    );
}

/// An edge whose upstream answered `recs` once, with the copy kept.
fn primed(config: &str) -> Result<Edge> {
    let mut edge = edge(config).upstream(|_| good()).build()?;
    let first = edge.send(recs(0))?;
    assert_eq!((first.status, first.header("cache-status")), (200, None));
    assert_eq!(edge.metric("cached_fallback.stored"), Some(1));
    Ok(edge)
}

#[test]
fn a_503_after_a_200_gets_the_stored_copy_with_cache_status_and_age() -> Result<()> {
    let mut edge = primed(API)?;
    edge.advance(Duration::from_secs(7))?;
    edge.set_upstream(|_| Upstream::status(503).body("upstream down"));
    // Stored by worker 0, served by worker 1: the store is shared.
    let res = edge.send(recs(1))?;
    assert_stale(&res, 503, "upstream-status");
    assert_eq!(res.header("age"), Some("7"));
    assert_eq!(edge.upstream_requests().len(), 2, "the upstream was asked");
    assert_eq!(edge.metric("cached_fallback.served_stale"), Some(1));
    // Another page was never stored: its error goes through.
    let other = edge.send(Request::get("/api/recs?page=2"))?;
    assert_eq!((other.status, other.body_str()), (503, "upstream down"));
    Ok(())
}

#[test]
fn reset_refused_and_timeout_as_envoy_reports_them_get_the_stored_copy() -> Result<()> {
    let mut edge = primed(API)?;
    edge.set_upstream(|_| Upstream::Reset);
    assert_stale(&edge.send(recs(0))?, 503, "upstream-reset");
    edge.set_upstream(|_| Upstream::Refused);
    assert_stale(&edge.send(recs(1))?, 503, "connection-failure");
    edge.set_upstream(|_| Upstream::Hang);
    assert_stale(&edge.send(recs(0))?, 504, "timeout");
    assert_eq!(edge.metric("cached_fallback.served_stale"), Some(3));
    Ok(())
}

#[test]
fn failure_kinds_left_out_of_fail_on_pass_through() -> Result<()> {
    let mut edge = primed(
        r#"{"routes":[{"pathPrefix":"/api/"}],
            "failOn":{"statuses":[502],"upstreamReset":false,"timeout":false}}"#,
    )?;
    edge.set_upstream(|_| Upstream::Reset);
    let res = edge.send(recs(0))?;
    assert_eq!((res.status, res.header("cache-status")), (503, None));
    assert!(res.body_str().contains("reset"), "Envoy's own reply");
    edge.set_upstream(|_| Upstream::status(503));
    assert_eq!(edge.send(recs(1))?.status, 503, "503 is not listed");
    edge.set_upstream(|_| Upstream::status(502));
    assert_stale(&edge.send(recs(1))?, 502, "upstream-status");
    Ok(())
}

#[test]
fn an_entry_older_than_max_stale_gives_the_static_fallback() -> Result<()> {
    let mut edge = primed(
        r#"{"routes":[{"pathPrefix":"/api/"}],"maxStale":"60s",
            "staticFallback":{"status":503,"headers":{"content-type":"application/json"},
                              "body":"{\"error\":\"temporarily unavailable\"}"}}"#,
    )?;
    edge.set_upstream(|_| Upstream::status(500));
    edge.advance(Duration::from_secs(60))?;
    assert_stale(&edge.send(recs(1))?, 500, "upstream-status");
    edge.advance(Duration::from_secs(1))?;
    let res = edge.send(recs(0))?;
    assert_eq!(res.status, 503);
    assert_eq!(res.body_str(), r#"{"error":"temporarily unavailable"}"#);
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(
        res.header("cache-status"),
        Some("cached-fallback; fwd=stale; fwd-status=500; detail=upstream-status")
    );
    // Never stored at all: the static answer too.
    let res = edge.send(Request::get("/api/other"))?;
    assert_eq!(
        res.header("cache-status"),
        Some("cached-fallback; fwd=uri-miss; fwd-status=500; detail=upstream-status")
    );
    assert_eq!(edge.metric("cached_fallback.served_static"), Some(2));
    Ok(())
}

#[test]
fn stale_if_error_shorter_than_max_stale_wins() -> Result<()> {
    let mut edge = edge(API)
        .upstream(|_| good().header("cache-control", "max-age=1, stale-if-error=10"))
        .build()?;
    edge.send(recs(0))?;
    edge.set_upstream(|_| Upstream::status(503));
    edge.advance(Duration::from_secs(10))?;
    assert_eq!(edge.send(recs(0))?.status, 200);
    edge.advance(Duration::from_secs(1))?;
    assert_eq!(edge.send(recs(0))?.status, 503);
    Ok(())
}

#[test]
fn with_nothing_stored_the_error_passes_through_untouched() -> Result<()> {
    let mut edge = edge(API)
        .upstream(|_| {
            Upstream::status(502)
                .header("x-upstream", "yes")
                .body("bad gateway")
        })
        .build()?;
    let res = edge.send(recs(0))?;
    assert_eq!((res.status, res.body_str()), (502, "bad gateway"));
    assert_eq!(res.header("x-upstream"), Some("yes"));
    assert_eq!(res.header("cache-status"), None);
    assert_eq!(edge.metric("cached_fallback.passed_through"), Some(1));
    Ok(())
}

#[test]
fn responses_that_must_not_be_stored_are_never_replayed() -> Result<()> {
    let cases: [(&str, Request, Upstream); 6] = [
        (
            "no-store",
            recs(0),
            good().header("cache-control", "no-store"),
        ),
        (
            "private",
            recs(0),
            good().header("cache-control", "private"),
        ),
        (
            "authorization",
            recs(0).header("authorization", "Bearer secret"),
            good(),
        ),
        ("set-cookie", recs(0), good().header("set-cookie", "sid=1")),
        ("vary *", recs(0), good().header("vary", "*")),
        (
            "must-revalidate",
            recs(0),
            good().header("cache-control", "max-age=60, must-revalidate"),
        ),
    ];
    for (what, req, answer) in cases {
        let mut edge = edge(API).upstream(move |_| answer.clone()).build()?;
        assert_eq!(edge.send(req.clone())?.status, 200, "{what}");
        assert_eq!(
            edge.metric("cached_fallback.store_skipped"),
            Some(1),
            "{what}"
        );
        edge.set_upstream(|_| Upstream::status(503).body("down"));
        let res = edge.send(req.worker(1))?;
        assert_eq!((res.status, res.body_str()), (503, "down"), "{what}");
        assert_eq!(edge.metric("cached_fallback.stored"), Some(0), "{what}");
    }
    // Authorization with `public` may be kept.
    let mut edge = edge(API)
        .upstream(|_| good().header("cache-control", "public, max-age=60"))
        .build()?;
    edge.send(recs(0).header("authorization", "Bearer secret"))?;
    edge.set_upstream(|_| Upstream::status(503));
    assert_eq!(
        edge.send(recs(1).header("authorization", "Bearer secret"))?
            .status,
        200
    );
    Ok(())
}

#[test]
fn a_body_streamed_in_many_chunks_is_stored_intact_and_a_large_one_not_at_all() -> Result<()> {
    let pieces: Vec<Vec<u8>> = (0..40u8)
        .map(|i| vec![b'a' + i % 26; 1 + usize::from(i) * 7])
        .collect();
    let whole: Vec<u8> = pieces.concat();
    let config = format!(
        r#"{{"routes":[{{"pathPrefix":"/api/"}}],"maxBodyBytes":{}}}"#,
        whole.len()
    );
    let streamed = pieces.clone();
    let mut edge = edge(&config)
        .upstream(move |req| {
            let mut p = streamed.clone();
            if req.path() == "/api/big" {
                p.push(b"!".to_vec()); // one byte over maxBodyBytes
            }
            Upstream::status(200).chunks(p)
        })
        .build()?;
    assert_eq!(
        edge.send(recs(0))?.body,
        whole,
        "the client gets every chunk"
    );
    let big = edge.send(Request::get("/api/big"))?;
    assert_eq!(big.body.len(), whole.len() + 1, "never delayed or cut");
    assert_eq!(edge.metric("cached_fallback.stored"), Some(1));
    assert_eq!(edge.metric("cached_fallback.store_skipped"), Some(1));
    edge.set_upstream(|_| Upstream::status(503));
    let res = edge.send(recs(1))?;
    assert_eq!((res.status, res.body.len()), (200, whole.len()));
    assert!(res.body == whole, "stored intact");
    assert_eq!(edge.send(Request::get("/api/big"))?.status, 503);
    Ok(())
}

#[test]
fn vary_headers_and_listed_key_headers_keep_answers_apart() -> Result<()> {
    let mut edge = edge(r#"{"routes":[{"pathPrefix":"/api/"}],"key":{"headers":["x-tenant"]}}"#)
        .upstream(|req| {
            let lang = req.header("accept-language").unwrap_or("none").to_string();
            let tenant = req.header("x-tenant").unwrap_or("none").to_string();
            Upstream::ok(format!("{tenant}:{lang}")).header("vary", "Accept-Language")
        })
        .build()?;
    let ask = |lang: &str, tenant: &str| {
        recs(0)
            .header("accept-language", lang)
            .header("x-tenant", tenant)
    };
    for (lang, tenant) in [("nl", "t1"), ("en", "t1"), ("nl", "t2")] {
        edge.send(ask(lang, tenant))?;
    }
    assert_eq!(edge.metric("cached_fallback.stored"), Some(3));
    edge.set_upstream(|_| Upstream::status(503));
    for (lang, tenant) in [("nl", "t1"), ("en", "t1"), ("nl", "t2")] {
        let res = edge.send(ask(lang, tenant).worker(1))?;
        assert_eq!(res.body_str(), format!("{tenant}:{lang}"));
        assert_eq!(res.header("vary"), Some("Accept-Language"));
    }
    assert_eq!(edge.send(ask("fr", "t1"))?.status, 503, "no such variant");
    assert_eq!(edge.send(ask("en", "t2"))?.status, 503, "no such variant");
    Ok(())
}

#[test]
fn uncovered_paths_and_methods_are_left_alone() -> Result<()> {
    let mut edge = edge(r#"{"routes":[{"pathPrefix":"/api/"}],"methods":["GET"]}"#).build()?;
    edge.send(Request::get("/other"))?;
    edge.send(Request::new("HEAD", "/api/recs"))?;
    edge.send(Request::post("/api/recs"))?;
    assert_eq!(edge.metric("cached_fallback.stored"), Some(0));
    edge.set_upstream(|_| Upstream::status(503));
    assert_eq!(edge.send(Request::get("/other"))?.status, 503);
    assert_eq!(edge.send(Request::new("HEAD", "/api/recs"))?.status, 503);
    assert_eq!(edge.metric("cached_fallback.passed_through"), Some(0));
    Ok(())
}

const CIRCUIT: &str = r#"{"routes":[{"pathPrefix":"/api/"}],
    "circuitBreaker":{"failures":3,"window":"10s","openFor":"30s"}}"#;

/// A primed edge whose upstream now fails, after `failures` failed requests (each served from
/// the store): the circuit is open.
fn open_circuit() -> Result<Edge> {
    let mut edge = primed(CIRCUIT)?;
    edge.set_upstream(|_| Upstream::status(503));
    for i in 0..3 {
        assert_stale(&edge.send(recs(i % 2))?, 503, "upstream-status");
    }
    assert_eq!(edge.metric("cached_fallback.circuit_opened"), Some(1));
    Ok(edge)
}

fn assert_circuit_hit(res: &Response) {
    assert_eq!((res.status, res.body_str()), (200, RECS));
    assert_eq!(
        res.header("cache-status"),
        Some("cached-fallback; hit; detail=circuit-open")
    );
}

#[test]
fn the_circuit_opens_after_n_failures_and_answers_without_the_upstream() -> Result<()> {
    let mut edge = open_circuit()?;
    let asked = edge.upstream_requests().len();
    assert_eq!(asked, 4);
    for i in 0..6 {
        assert_circuit_hit(&edge.send(recs(i % 2))?);
    }
    // Nothing stored for this one: the circuit answers 503 itself.
    let res = edge.send(Request::get("/api/unknown"))?;
    assert_eq!(res.status, 503);
    assert_eq!(res.header("retry-after"), Some("30"));
    assert_eq!(
        res.header("cache-status"),
        Some("cached-fallback; detail=circuit-open")
    );
    assert_eq!(
        edge.upstream_requests().len(),
        asked,
        "no request reached the upstream while the circuit was open"
    );
    assert_eq!(
        edge.metric("cached_fallback.circuit_short_circuited"),
        Some(7)
    );
    assert_eq!(edge.metric("cached_fallback.served_stale"), Some(3 + 6));
    Ok(())
}

#[test]
fn failures_spread_over_windows_do_not_open_the_circuit() -> Result<()> {
    let mut edge = primed(CIRCUIT)?;
    edge.set_upstream(|_| Upstream::status(503));
    for _ in 0..4 {
        edge.send(recs(0))?;
        edge.send(recs(1))?;
        edge.advance(Duration::from_secs(10))?;
    }
    assert_eq!(edge.metric("cached_fallback.circuit_opened"), Some(0));
    assert_eq!(edge.upstream_requests().len(), 9);
    Ok(())
}

#[test]
fn after_open_for_one_probe_reaches_the_upstream_a_failure_reopens_a_success_closes() -> Result<()>
{
    let mut edge = open_circuit()?;
    edge.advance(Duration::from_secs(30))?;
    // Two requests in flight at once on both workers: only one is let through.
    let probe = edge.begin(recs(0))?;
    let other = edge.begin(recs(1))?;
    assert_eq!(edge.step(probe)?, Step::Ran(Callback::RequestHeaders));
    assert_eq!(edge.step(other)?, Step::Ran(Callback::RequestHeaders));
    assert_circuit_hit(&edge.finish(other)?);
    let res = edge.finish(probe)?;
    assert_stale(&res, 503, "upstream-status");
    assert_eq!(edge.upstream_requests().len(), 5, "the probe went through");
    assert_eq!(edge.metric("cached_fallback.circuit_opened"), Some(2));
    assert_circuit_hit(&edge.send(recs(1))?);
    assert_eq!(edge.upstream_requests().len(), 5, "reopened");

    edge.advance(Duration::from_secs(30))?;
    edge.set_upstream(|_| Upstream::ok("fresh"));
    assert_eq!(
        edge.send(recs(1))?.body_str(),
        "fresh",
        "the probe succeeded"
    );
    for i in 0..4 {
        assert_eq!(edge.send(recs(i % 2))?.body_str(), "fresh");
    }
    assert_eq!(edge.upstream_requests().len(), 10, "closed: all forwarded");
    Ok(())
}

#[test]
fn a_worker_that_loses_the_probe_race_inside_its_callback_answers_locally() -> Result<()> {
    let mut edge = open_circuit()?;
    edge.advance(Duration::from_secs(30))?;
    // The other worker becomes the probe between this worker's read and its write.
    edge.stage_races(1);
    assert_circuit_hit(&edge.send(recs(0))?);
    assert_eq!(edge.races_run(), 1, "the plugin must compare-and-swap");
    assert_eq!(
        edge.upstream_requests().len(),
        4,
        "only one probe, and it was not this one"
    );
    Ok(())
}

#[test]
fn a_probe_that_never_reports_does_not_wedge_the_circuit() -> Result<()> {
    let mut edge = open_circuit()?;
    edge.advance(Duration::from_secs(30))?;
    // The probe is let through, and then nothing is heard of it for another openFor.
    let probe = edge.begin(recs(0))?;
    assert_eq!(edge.step(probe)?, Step::Ran(Callback::RequestHeaders));
    assert_circuit_hit(&edge.send(recs(1))?);
    edge.advance(Duration::from_secs(30))?;
    // Another request takes over as the probe; it succeeds and closes the circuit.
    edge.set_upstream(|_| Upstream::ok("fresh"));
    assert_eq!(edge.send(recs(1))?.body_str(), "fresh");
    assert_eq!(edge.send(recs(0))?.body_str(), "fresh", "closed");
    // The first probe's late answer changes nothing.
    assert_eq!(edge.finish(probe)?.body_str(), "fresh");
    assert_eq!(edge.send(recs(1))?.body_str(), "fresh");
    Ok(())
}

#[test]
fn a_probe_answered_with_a_status_that_is_no_failure_closes_the_circuit() -> Result<()> {
    let mut edge = open_circuit()?;
    edge.advance(Duration::from_secs(30))?;
    edge.set_upstream(|_| Upstream::status(404));
    assert_eq!(edge.send(recs(0))?.status, 404, "the upstream is up");
    assert_eq!(edge.send(recs(1))?.status, 404, "closed again");
    assert_eq!(edge.upstream_requests().len(), 6);
    Ok(())
}

#[test]
fn a_probe_without_a_verdict_hands_the_probe_back_at_once() -> Result<()> {
    let mut edge = primed(
        r#"{"routes":[{"pathPrefix":"/api/"}],"failOn":{"timeout":false},
            "circuitBreaker":{"failures":1,"openFor":"30s"}}"#,
    )?;
    edge.set_upstream(|_| Upstream::status(503));
    edge.send(recs(0))?;
    assert_eq!(edge.metric("cached_fallback.circuit_opened"), Some(1));
    edge.advance(Duration::from_secs(30))?;
    // The probe times out, which this config does not count: no verdict.
    edge.set_upstream(|_| Upstream::Hang);
    assert_eq!(edge.send(recs(0))?.status, 504);
    let asked = edge.upstream_requests().len();
    // The next request is the new probe, at once (not after another openFor).
    edge.set_upstream(|_| good());
    assert_eq!(edge.send(recs(1))?.header("cache-status"), None);
    assert_eq!(edge.upstream_requests().len(), asked + 1);
    Ok(())
}

#[test]
fn bounds_hold_under_many_distinct_urls() -> Result<()> {
    let mut edge = edge(r#"{"maxEntries":16,"maxTotalBytes":4096}"#)
        .upstream(|req| Upstream::ok(vec![b'x'; 200]).header("x-path", req.path()))
        .build()?;
    for i in 0..500 {
        edge.send(Request::get(&format!("/u/{i}")))?;
        edge.advance(Duration::from_millis(10))?;
    }
    let (keys, bytes) = edge.shared_data_usage("");
    // 16 index slots, 16 body keys, the byte count, the seed and the circuit.
    assert!(keys <= 2 * 16 + 3, "keys: {keys}");
    assert!(bytes <= 4096 + 16 * 128 + 256, "bytes: {bytes}");
    let stored = edge.metric("cached_fallback.stored").unwrap_or(0);
    assert!(
        stored > 400,
        "most were stored, evicting older ones: {stored}"
    );
    edge.set_upstream(|_| Upstream::status(503));
    assert_eq!(
        edge.send(Request::get("/u/499"))?.status,
        200,
        "the newest is kept"
    );
    assert_eq!(
        edge.send(Request::get("/u/0"))?.status,
        503,
        "the oldest made room"
    );
    Ok(())
}

#[test]
fn a_broken_store_never_breaks_requests() -> Result<()> {
    let mut edge = primed(CIRCUIT)?;
    edge.fail_shared_data(Some(host_tests::abi::Status::InternalFailure));
    assert_eq!(edge.send(recs(0))?.status, 200);
    edge.set_upstream(|_| Upstream::status(503).body("down"));
    assert_eq!(edge.send(recs(1))?.body_str(), "down");
    assert!(!edge.vm_failed(0, 0) && !edge.vm_failed(1, 0));
    Ok(())
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    for (config, field) in [
        (r#"{"methods":["POST"]}"#, "methods[0]"),
        (r#"{"failOn":{"statuses":[200]}}"#, "failOn.statuses[0]"),
        (r#"{"maxStale":"soon"}"#, "maxStale"),
        (
            r#"{"circuitBreaker":{"window":"0s"}}"#,
            "circuitBreaker.window",
        ),
        (
            r#"{"staticFallback":{"status":42}}"#,
            "staticFallback.status",
        ),
        (r#"{"maxentries":1}"#, "unknown field `maxentries`"),
    ] {
        assert_rejected(edge(config), field);
    }
}

/// Wasm instructions (fuel) per request, printed for the README: run with `--nocapture`.
#[test]
fn instructions_per_request_on_the_store_and_serve_paths() -> Result<()> {
    let mut edge = edge(
        r#"{"routes":[{"pathPrefix":"/api/"}],"key":{"headers":["accept-language"]},
            "circuitBreaker":{"failures":1000,"openFor":"30s"}}"#,
    )
    .upstream(|_| good().header("cache-control", "max-age=60"))
    .build()?;
    // Warm up both workers (first allocations), then measure steady state.
    for w in 0..2 {
        edge.send(Request::get(&format!("/api/warm{w}")).worker(w))?;
    }
    let store = edge.send(recs(0).header("accept-language", "nl"))?;
    let uncovered = edge.send(Request::get("/other").worker(0))?;
    edge.set_upstream(|_| Upstream::status(503));
    let serve = edge.send(recs(0).header("accept-language", "nl"))?;
    assert_eq!(serve.status, 200);
    println!(
        "cached-fallback fuel per request: store path {}, serve path {}, uncovered {}",
        store.fuel, serve.fuel, uncovered.fuel
    );
    for (k, c) in edge.costs(0) {
        println!("  {k}: {} calls, {} fuel", c.calls, c.fuel);
    }
    assert!(store.fuel < 150_000 && serve.fuel < 150_000 && uncovered.fuel < 10_000);
    Ok(())
}

#[test]
fn store_statuses_as_a_string_still_load_and_say_they_are_deprecated() -> Result<()> {
    let warning = "cached-fallback: storeStatuses: a string of statuses is deprecated";
    let listed = edge(r#"{"storeStatuses":["2xx", 301]}"#).build()?;
    assert!(!listed.logged(warning), "a list is the current syntax");
    let old = edge(r#"{"storeStatuses":"2xx, 301"}"#).build()?;
    assert!(old.logged(warning));
    assert!(old.logged("write a list: [\"2xx\", \"301\"]"));
    Ok(())
}
