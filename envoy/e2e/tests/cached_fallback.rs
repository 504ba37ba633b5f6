//! dist/cached_fallback.wasm in a real Envoy 1.40 on two workers, with the config users read
//! (`envoy/cached-fallback.yaml`: /api/ covered, route timeout 1 s, circuit opening after 5
//! failures in 30 s for 2 s). The upstream answers 200, then 503, resets, is stopped
//! (connection refused), then hangs past the route timeout: each time the client gets the stored
//! answer with its headers. Then the circuit opens and the upstream sees nothing until the probe.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use edge_e2e::{Envoy, Response, Script, Substitutions, TestUpstream};

const CONFIG: &str = "cached-fallback.yaml";
const RECS: &str = r#"{"items":["a","b"]}"#;
const STAT_TIMEOUT: Duration = Duration::from_secs(5);
/// `"openFor": "2s"` in envoy/cached-fallback.yaml.
const OPEN_FOR: Duration = Duration::from_secs(2);
/// The settings the constants and the failure count below stand for.
const SETTINGS: [&str; 3] = [
    "\"failures\": 5, \"window\": \"30s\", \"openFor\": \"2s\"",
    "cluster: backend, timeout: 1s",
    "\"pathPrefix\": \"/api/\"",
];

fn check_settings() -> Result<()> {
    let text = std::fs::read_to_string(edge_e2e::workspace_root().join("envoy").join(CONFIG))?;
    for setting in SETTINGS {
        ensure!(
            text.matches(setting).count() == 1,
            "envoy/{CONFIG} no longer says {setting} once: update this test"
        );
    }
    Ok(())
}

fn start(upstream: &TestUpstream) -> Result<Envoy> {
    check_settings()?;
    Envoy::start_with(
        CONFIG,
        &Substitutions::upstream(upstream),
        &["--concurrency", "2"],
    )
}

fn good() -> Script {
    Script::json(RECS).with_header("x-version", "1")
}

fn counter(name: &str) -> String {
    format!("wasmcustom.cached_fallback.{name}")
}

/// The answer kept from the first request, as the client must see it.
fn assert_stale(res: &Response, cache_status: &str) {
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.text(), RECS);
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(res.header("x-version"), Some("1"));
    assert!(
        res.header("age").is_some_and(|a| a.parse::<u64>().is_ok()),
        "{res:?}"
    );
    assert_eq!(res.header("cache-status"), Some(cache_status), "{res:?}");
}

fn stale_status(fwd_status: u16, detail: &str) -> String {
    format!("cached-fallback; hit; fwd=stale; fwd-status={fwd_status}; detail={detail}")
}

/// Envoy with the upstream's first answer to /api/recs kept.
fn primed(upstream: &TestUpstream) -> Result<Envoy> {
    upstream.route("/api/recs", good());
    let envoy = start(upstream)?;
    let first = envoy.get("/api/recs")?;
    assert_eq!((first.status, first.text().as_str()), (200, RECS));
    assert_eq!(first.header("cache-status"), None);
    // Kept once the stream has ended (after the client has it).
    envoy.wait_for_stat(&counter("stored"), 1, STAT_TIMEOUT)?;
    Ok(envoy)
}

#[test]
fn the_stored_answer_replaces_a_503_a_reset_a_refused_connection_and_a_timeout() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let envoy = primed(&upstream)?;

    upstream.route("/api/recs", Script::status(503).with_body("down"));
    assert_stale(
        &envoy.get("/api/recs")?,
        &stale_status(503, "upstream-status"),
    );

    upstream.route("/api/recs", Script::reset());
    assert_stale(
        &envoy.get("/api/recs")?,
        &stale_status(503, "upstream-reset"),
    );

    // Stopped (its port kept, so no other test can take it): Envoy's connection is refused.
    let held = upstream.stop_keeping_port()?;
    assert_stale(
        &envoy.get("/api/recs")?,
        &stale_status(503, "connection-failure"),
    );

    // Back on the same port, hanging past the route timeout (1 s).
    let upstream = TestUpstream::start_held(held)?;
    upstream.route("/*", good().with_delay(Duration::from_secs(5)));
    let asked = Instant::now();
    let res = envoy.get("/api/recs")?;
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "waited for the route timeout"
    );
    assert_stale(&res, &stale_status(504, "timeout"));
    assert_eq!(upstream.requests_to("/api/recs").len(), 1, "it was asked");

    // Never kept: the static fallback, for every kind of failure.
    let other = envoy.get("/api/other")?;
    assert_eq!(other.status, 503);
    assert_eq!(other.text(), r#"{"error":"temporarily unavailable"}"#);
    assert_eq!(other.header("content-type"), Some("application/json"));
    assert_eq!(
        other.header("cache-status"),
        Some("cached-fallback; fwd=uri-miss; fwd-status=504; detail=timeout")
    );
    // Outside /api/, the failure is Envoy's own.
    let outside = envoy.get("/health")?;
    assert_eq!(
        (outside.status, outside.header("cache-status")),
        (504, None)
    );

    envoy.wait_for_stat(&counter("served_static"), 1, STAT_TIMEOUT)?;
    let stats = envoy.stats()?;
    assert_eq!(stats.get(&counter("served_stale")), Some(4));
    assert_eq!(stats.get(&counter("served_static")), Some(1));
    // Five failures in 30 s (four for /api/recs, one for /api/other) opened the circuit.
    assert_eq!(stats.get(&counter("circuit_opened")), Some(1));
    Ok(())
}

#[test]
fn the_circuit_opens_after_five_failures_and_the_upstream_sees_nothing_until_the_probe(
) -> Result<()> {
    let upstream = TestUpstream::start()?;
    let envoy = primed(&upstream)?;
    upstream.route("/api/recs", Script::status(503));
    for _ in 0..5 {
        assert_stale(
            &envoy.get("/api/recs")?,
            &stale_status(503, "upstream-status"),
        );
    }
    envoy.wait_for_stat(&counter("circuit_opened"), 1, STAT_TIMEOUT)?;
    let asked = upstream.requests().len();
    assert_eq!(asked, 6);

    let open = "cached-fallback; hit; detail=circuit-open";
    for _ in 0..8 {
        assert_stale(&envoy.get("/api/recs")?, open);
    }
    let other = envoy.get("/api/other")?;
    assert_eq!(other.status, 503);
    assert_eq!(
        other.header("cache-status"),
        Some("cached-fallback; detail=circuit-open")
    );
    assert_eq!(
        upstream.requests().len(),
        asked,
        "nothing reached the upstream while the circuit was open"
    );
    envoy.wait_for_stat(&counter("circuit_short_circuited"), 9, STAT_TIMEOUT)?;

    // After openFor, one request probes; the upstream has recovered, so the circuit closes.
    std::thread::sleep(OPEN_FOR + Duration::from_millis(200));
    upstream.route("/api/recs", Script::json("fresh"));
    let probe = envoy.get("/api/recs")?;
    assert_eq!((probe.status, probe.text().as_str()), (200, "fresh"));
    assert_eq!(probe.header("cache-status"), None);
    assert_eq!(upstream.requests().len(), asked + 1, "exactly the probe");
    for _ in 0..4 {
        assert_eq!(envoy.get("/api/recs")?.text(), "fresh");
    }
    assert_eq!(
        upstream.requests().len(),
        asked + 5,
        "closed: every request forwarded"
    );
    Ok(())
}

#[test]
fn envoy_refuses_a_bad_circuit_breaker_window() -> Result<()> {
    let upstream = TestUpstream::start()?;
    check_settings()?;
    let subs =
        Substitutions::upstream(&upstream).replace("\"window\": \"30s\"", "\"window\": \"0s\"");
    edge_e2e::assert_refused(
        || Envoy::start_with(CONFIG, &subs, &["--concurrency", "2"]),
        "cached_fallback",
        "circuitBreaker.window: must be longer than 0",
    )
}
