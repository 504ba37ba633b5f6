//! dist/rate_limit.wasm in a real Envoy 1.40 on two workers, with the config users read
//! (`envoy/rate-limit.yaml`: rule `api-per-client`, 5 requests per 2 s per client IP and
//! `x-api-key`). Checks what an over-quota client gets, what reaches the upstream, the counters
//! Envoy shows, the refill, and that Envoy refuses a bad rule.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use edge_e2e::{Envoy, Response, Substitutions, TestUpstream};
use serde_json::{json, Value};

const CONFIG: &str = "rate-limit.yaml";
const RULE: &str = "api-per-client";
/// `"requests": 5` (and the default burst, equal to it) in envoy/rate-limit.yaml.
const LIMIT: usize = 5;
/// `"window": "2s"` in envoy/rate-limit.yaml.
const WINDOW: Duration = Duration::from_secs(2);
/// One token comes back every WINDOW / LIMIT. A burst that takes longer than this may see a
/// refilled token, so the exact counts below assume each burst is faster (it takes a few ms).
const REFILL: Duration = Duration::from_millis(400);
const STAT_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings LIMIT and WINDOW stand for, as written in the config.
const SETTINGS: [&str; 2] = ["\"requests\": 5", "\"window\": \"2s\""];

/// Fails when the config no longer has the settings this file's constants assume.
fn check_settings() -> Result<()> {
    let text = std::fs::read_to_string(edge_e2e::workspace_root().join("envoy").join(CONFIG))?;
    for setting in SETTINGS {
        ensure!(
            text.matches(setting).count() == 1,
            "envoy/{CONFIG} no longer says {setting} once: update LIMIT, WINDOW and REFILL here"
        );
    }
    Ok(())
}

fn rate_limit_envoy(upstream: &TestUpstream) -> Result<Envoy> {
    check_settings()?;
    Envoy::start_with(
        CONFIG,
        &Substitutions::upstream(upstream),
        &["--concurrency", "2"],
    )
}

/// `GET /api/orders` as the client with API key `key` (every request comes from 127.0.0.1).
fn api(envoy: &Envoy, key: &str) -> Result<Response> {
    envoy.request("GET", "/api/orders", &[("x-api-key", key)], b"")
}

/// `n` requests in a row as `key`; fails when they took long enough for a token to come back.
fn burst(envoy: &Envoy, key: &str, n: usize) -> Result<Vec<Response>> {
    let started = Instant::now();
    let responses = (0..n)
        .map(|_| api(envoy, key))
        .collect::<Result<Vec<_>>>()?;
    let took = started.elapsed();
    ensure!(
        took < REFILL,
        "a burst of {n} took {took:?}, longer than one token's refill ({REFILL:?}): the machine \
         is too loaded for exact counts"
    );
    Ok(responses)
}

fn statuses(responses: &[Response]) -> Vec<u16> {
    responses.iter().map(|r| r.status).collect()
}

/// `LIMIT` 200s, then `rejected` 429s.
fn limit_then_429s(rejected: usize) -> Vec<u16> {
    let mut expected = vec![200; LIMIT];
    expected.resize(LIMIT + rejected, 429);
    expected
}

fn counter(outcome: &str) -> String {
    format!("wasmcustom.rate_limit.{RULE}.{outcome}")
}

#[test]
fn burst_over_the_limit_gets_429_with_retry_after_ratelimit_headers_and_problem_json() -> Result<()>
{
    let upstream = TestUpstream::start()?;
    let envoy = rate_limit_envoy(&upstream)?;

    let rejected = 3;
    let responses = burst(&envoy, "k1", LIMIT + rejected)?;
    assert_eq!(statuses(&responses), limit_then_429s(rejected));

    // Allowed answers say what is left.
    let policy = format!("\"{RULE}\";q=5;w=2");
    for (i, res) in responses[..LIMIT].iter().enumerate() {
        assert_eq!(res.header("ratelimit-policy"), Some(policy.as_str()));
        let state = res.header("ratelimit").context("no ratelimit header")?;
        let left = LIMIT - 1 - i;
        assert!(
            state.starts_with(&format!("\"{RULE}\";r={left};t=")),
            "answer {i}: ratelimit: {state}"
        );
    }

    let res = &responses[LIMIT];
    // One token every 400 ms: the next one is at most a second away.
    assert_eq!(res.header("retry-after"), Some("1"));
    assert_eq!(res.header("ratelimit-policy"), Some(policy.as_str()));
    assert_eq!(
        res.header("ratelimit"),
        Some(format!("\"{RULE}\";r=0;t=1").as_str())
    );
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    let body: Value = serde_json::from_slice(&res.body)
        .with_context(|| format!("429 body is not JSON: {}", res.text()))?;
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], json!([RULE]));
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains(RULE)),
        "{body}"
    );

    // Rejected requests never reach the application.
    assert_eq!(upstream.requests_to("/api/orders").len(), LIMIT);

    // Envoy shows the plugin's counters under `wasmcustom.`.
    envoy.wait_for_stat(&counter("limited"), rejected as u64, STAT_TIMEOUT)?;
    let stats = envoy.stats()?;
    let prefix = format!("wasmcustom.rate_limit.{RULE}.");
    let ours: Vec<(&str, u64)> = stats.with_prefix(&prefix).collect();
    assert_eq!(
        ours,
        [
            (counter("allowed").as_str(), LIMIT as u64),
            (counter("limited").as_str(), rejected as u64),
            (counter("shadow_limited").as_str(), 0),
            (counter("store_errors").as_str(), 0),
        ]
    );

    // Paths outside the rule are neither limited nor annotated.
    let health = envoy.get("/health")?;
    assert_eq!(health.status, 200);
    assert_eq!(health.header("ratelimit"), None);
    Ok(())
}

#[test]
fn requests_are_allowed_again_after_waiting_out_the_window() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let envoy = rate_limit_envoy(&upstream)?;

    assert_eq!(
        statuses(&burst(&envoy, "k1", LIMIT + 1)?),
        limit_then_429s(1)
    );
    std::thread::sleep(WINDOW);
    // A whole window later the bucket is full again, and no fuller.
    assert_eq!(
        statuses(&burst(&envoy, "k1", LIMIT + 1)?),
        limit_then_429s(1)
    );

    assert_eq!(upstream.requests_to("/api/orders").len(), 2 * LIMIT);
    envoy.wait_for_stat(&counter("limited"), 2, STAT_TIMEOUT)?;
    assert_eq!(envoy.stat(&counter("allowed"))?, Some(2 * LIMIT as u64));
    assert_eq!(envoy.stat(&counter("limited"))?, Some(2));
    Ok(())
}

#[test]
fn each_api_key_has_its_own_bucket() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let envoy = rate_limit_envoy(&upstream)?;

    assert_eq!(
        statuses(&burst(&envoy, "k1", LIMIT + 1)?),
        limit_then_429s(1)
    );
    // Same client IP, another key: a full bucket of its own, while k1 stays limited.
    assert_eq!(
        statuses(&burst(&envoy, "k2", LIMIT + 1)?),
        limit_then_429s(1)
    );
    assert_eq!(api(&envoy, "k1")?.status, 429);

    let keys: Vec<Option<String>> = upstream
        .requests_to("/api/orders")
        .iter()
        .map(|r| r.header("x-api-key").map(str::to_string))
        .collect();
    let seen = |k: &str| keys.iter().filter(|x| x.as_deref() == Some(k)).count();
    assert_eq!(
        (seen("k1"), seen("k2"), keys.len()),
        (LIMIT, LIMIT, 2 * LIMIT)
    );
    envoy.wait_for_stat(&counter("limited"), 3, STAT_TIMEOUT)?;
    assert_eq!(envoy.stat(&counter("allowed"))?, Some(2 * LIMIT as u64));
    assert_eq!(envoy.stat(&counter("limited"))?, Some(3));
    Ok(())
}

#[test]
fn the_limit_is_exact_while_both_workers_take_the_burst() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let envoy = rate_limit_envoy(&upstream)?;

    // One connection per request: the kernel spreads them over both workers (SO_REUSEPORT),
    // whose VMs share one bucket through shared data.
    let rejected = 15;
    assert_eq!(
        statuses(&burst(&envoy, "k1", LIMIT + rejected)?),
        limit_then_429s(rejected)
    );
    let per_worker = envoy.connections_per_worker(2)?;
    // All 20 on one worker happens with probability 2^-19; then this test proves less.
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "connections per worker: {per_worker:?}"
    );
    assert_eq!(upstream.requests_to("/api/orders").len(), LIMIT);
    envoy.wait_for_stat(&counter("limited"), rejected as u64, STAT_TIMEOUT)?;
    assert_eq!(envoy.stat(&counter("allowed"))?, Some(LIMIT as u64));
    assert_eq!(envoy.stat(&counter("limited"))?, Some(rejected as u64));
    Ok(())
}

#[test]
fn envoy_refuses_a_zero_request_limit_and_the_log_names_the_field() -> Result<()> {
    let upstream = TestUpstream::start()?;
    check_settings()?;
    let subs = Substitutions::upstream(&upstream).replace(SETTINGS[0], "\"requests\": 0");

    edge_e2e::assert_refused(
        || Envoy::start_with(CONFIG, &subs, &["--concurrency", "2"]),
        "rate_limit",
        "rules[0].limit.requests: must be > 0",
    )
}
