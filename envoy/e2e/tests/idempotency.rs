//! dist/idempotency.wasm in a real Envoy 1.40 on two workers, with the config users read
//! (`envoy/idempotency.yaml`: keys required on POST/PATCH /payments, scoped by
//! `authorization`, body fingerprints, and Envoy's buffer filter after the plugin). Checks that
//! twenty concurrent POSTs with one key execute once, that later retries replay the response
//! byte for byte, that a reused key with another body gets 422, that a 5xx releases the key,
//! and that Envoy refuses a bad config.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use edge_e2e::{Envoy, Response, Script, Substitutions, TestUpstream};
use serde_json::Value;

const CONFIG: &str = "idempotency.yaml";
const STAT_TIMEOUT: Duration = Duration::from_secs(5);

fn start(upstream: &TestUpstream) -> Result<Envoy> {
    Envoy::start_with(
        CONFIG,
        &Substitutions::upstream(upstream),
        &["--concurrency", "2"],
    )
}

fn pay(envoy: &Envoy, key: &str, who: &str, body: &str) -> Result<Response> {
    envoy.request(
        "POST",
        "/payments",
        &[
            ("idempotency-key", key),
            ("authorization", who),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
}

/// The application: each payment it makes gets the next id; it takes `delay` to answer and
/// streams its body in three pieces.
fn payments_app(upstream: &TestUpstream, delay: Duration) -> Arc<AtomicUsize> {
    let made = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&made);
    upstream.respond_with(move |req| {
        (req.path_only() == "/payments").then(|| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            Script::status(201)
                .with_header("content-type", "application/json")
                .with_header("x-payment-id", format!("pay_{n}"))
                .with_body(format!(
                    "{{\"id\":\"pay_{n}\",\"charged\":{}}}",
                    req.body_text()
                ))
                .with_delay(delay)
                .chunked(3, Duration::from_millis(20))
        })
    });
    made
}

fn upstream_requests_started(envoy: &Envoy) -> Result<u64> {
    Ok(envoy
        .stat("cluster.backend.upstream_rq_total")?
        .unwrap_or(0))
}

#[test]
fn twenty_concurrent_posts_with_one_key_reach_the_application_once() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let made = payments_app(&upstream, Duration::from_millis(500));
    let envoy = Arc::new(start(&upstream)?);
    let body = "{\"amount\":1000}";
    let answers: Vec<Response> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let envoy = Arc::clone(&envoy);
                s.spawn(move || pay(&envoy, "order-17", "Bearer alice", body))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    assert_eq!(
        made.load(Ordering::SeqCst),
        1,
        "the application charged once"
    );
    // The duplicates raced across both workers (a per-worker lock would have let two through).
    let per_worker = envoy.connections_per_worker(2)?;
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "connections per worker: {per_worker:?}"
    );
    assert_eq!(upstream.requests_to("/payments").len(), 1);
    let first: Vec<&Response> = answers
        .iter()
        .filter(|r| r.status == 201 && r.header("idempotent-replayed").is_none())
        .collect();
    assert_eq!(first.len(), 1, "one original answer");
    let original = first[0];
    for r in &answers {
        match r.status {
            409 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.header("content-type"), Some("application/problem+json"));
            }
            201 => assert_eq!(r.body, original.body),
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    // A later retry gets the kept response, byte for byte, from either worker.
    for _ in 0..4 {
        let again = pay(&envoy, "order-17", "Bearer alice", body)?;
        assert_eq!(again.status, 201);
        assert_eq!(again.body, original.body);
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.header("x-payment-id"), Some("pay_1"));
        assert_eq!(again.header("content-type"), Some("application/json"));
    }
    // With the buffer filter after the plugin, duplicates never opened an upstream request.
    assert_eq!(upstream_requests_started(&envoy)?, 1);
    let replayed = 4 + answers.iter().filter(|r| r.status == 201).count() as u64 - 1;
    let conflicts = answers.iter().filter(|r| r.status == 409).count() as u64;
    envoy.wait_for_stat("wasmcustom.idempotency.replayed", replayed, STAT_TIMEOUT)?;
    assert_eq!(envoy.stat("wasmcustom.idempotency.forwarded")?, Some(1));
    assert_eq!(
        envoy.stat("wasmcustom.idempotency.conflict_409")?,
        Some(conflicts)
    );
    Ok(())
}

#[test]
fn a_reused_key_with_another_body_gets_422_and_another_client_is_not_served() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let made = payments_app(&upstream, Duration::ZERO);
    let envoy = start(&upstream)?;
    let first = pay(&envoy, "k1", "Bearer alice", "{\"amount\":10}")?;
    assert_eq!(first.status, 201);
    let changed = pay(&envoy, "k1", "Bearer alice", "{\"amount\":99}")?;
    assert_eq!(changed.status, 422);
    let p: Value = serde_json::from_slice(&changed.body).context("422 body")?;
    assert_eq!(p["status"], 422);
    assert!(p["type"].is_string() && p["title"].is_string() && p["detail"].is_string());
    // Bob's request with the same key is his own.
    let bob = pay(&envoy, "k1", "Bearer bob", "{\"amount\":10}")?;
    assert_eq!((bob.status, bob.header("idempotent-replayed")), (201, None));
    assert_ne!(bob.body, first.body);
    assert_eq!(made.load(Ordering::SeqCst), 2);
    assert_eq!(upstream_requests_started(&envoy)?, 2);
    Ok(())
}

#[test]
fn a_5xx_releases_the_key_and_missing_keys_get_400() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route("/payments", Script::status(503).with_body("busy"));
    let envoy = start(&upstream)?;
    assert_eq!(pay(&envoy, "k1", "Bearer alice", "{}")?.status, 503);
    let made = payments_app(&upstream, Duration::ZERO);
    let retry = pay(&envoy, "k1", "Bearer alice", "{}")?;
    assert_eq!(
        (retry.status, retry.header("idempotent-replayed")),
        (201, None)
    );
    assert_eq!(made.load(Ordering::SeqCst), 1);
    envoy.wait_for_stat("wasmcustom.idempotency.released", 1, STAT_TIMEOUT)?;

    let missing = envoy.request("POST", "/payments", &[], b"{}")?;
    assert_eq!(missing.status, 400);
    assert_eq!(
        missing.header("content-type"),
        Some("application/problem+json")
    );
    let p: Value = serde_json::from_slice(&missing.body)?;
    assert_eq!(p["title"], "idempotency-key is missing");
    // Not covered: a GET reaches the application, and its answer is the application's.
    let before = upstream_requests_started(&envoy)?;
    let get = envoy.get("/payments")?;
    assert_eq!(upstream_requests_started(&envoy)?, before + 1);
    assert_ne!(get.header("content-type"), Some("application/problem+json"));
    assert_eq!(get.header("idempotent-replayed"), None);
    Ok(())
}

#[test]
fn envoy_refuses_a_bad_configuration_naming_the_field() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let subs = Substitutions::upstream(&upstream).replace(
        r#""storeStatuses": ["2xx-4xx"]"#,
        r#""storeStatuses": ["2xx-9xx"]"#,
    );
    edge_e2e::assert_refused(
        || Envoy::start_with(CONFIG, &subs, &["--concurrency", "2"]),
        "idempotency",
        "storeStatuses[0]: \"9xx\" is outside 100-599",
    )
}

#[test]
fn the_edge_chain_runs_a_repeated_payment_once() -> Result<()> {
    // envoy/edge.yaml: keys required on /payments, scoped by `authorization` (absent here,
    // so every client without one shares a scope).
    let upstream = TestUpstream::start()?;
    let made = payments_app(&upstream, Duration::ZERO);
    let envoy = Envoy::start_with(
        "edge.yaml",
        &Substitutions::upstream(&upstream),
        &["--concurrency", "2"],
    )?;
    let post = |body: &str| {
        envoy.request(
            "POST",
            "/payments",
            &[("idempotency-key", "\"order-1\"")],
            body.as_bytes(),
        )
    };
    let first = post("{\"amount\":10}")?;
    assert_eq!(first.status, 201, "{}", first.text());
    let again = post("{\"amount\":10}")?;
    assert_eq!(
        (again.status, again.body.clone()),
        (201, first.body.clone())
    );
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(post("{\"amount\":99}")?.status, 422);
    assert_eq!(envoy.request("POST", "/payments", &[], b"{}")?.status, 400);
    assert_eq!(made.load(Ordering::SeqCst), 1);
    Ok(())
}
