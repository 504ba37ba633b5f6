//! dist/idempotency.wasm with its records in etcd, as a fleet runs it: a 3-member etcd cluster
//! started by the rig and two Envoy processes (distinct `--base-id`, two workers each) in front
//! of one application. Checks that concurrent duplicates split across both proxies execute
//! once, that either proxy replays the first answer byte for byte, that losing a follower or
//! the leader never runs a request twice, that a hung etcd gets 503 within
//! `(1 + retries) × timeout` while keyless requests go on, that the fleet recovers without a
//! restart, and that a claim's lease ending frees its key.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edge_e2e::{wait_until, Envoy, Response, Script, Substitutions, TestUpstream};
use edge_engines::Etcd;

const CONFIG: &str = "idempotency-etcd.yaml";
/// The config's etcd member markers, in order.
const MEMBER_MARKERS: [&str; 3] = [
    "port_value: 2379 }",
    "port_value: 22379 }",
    "port_value: 32379 }",
];
const STAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Distinct `--base-id`s for every Envoy this test binary starts.
static BASE_ID: AtomicU32 = AtomicU32::new(0);

/// Executions per idempotency key, as the application saw them.
type Made = Arc<Mutex<BTreeMap<String, usize>>>;

struct Fleet {
    envoys: Vec<Envoy>,
    made: Made,
    upstream: TestUpstream,
    etcd: Etcd,
}

/// The application: each payment gets the next id; it answers after `delay` (or after `slow`
/// for the key `stuck`) in three pieces.
fn payments_app(upstream: &TestUpstream, delay: Duration) -> Made {
    let made: Made = Arc::default();
    let seen = Arc::clone(&made);
    upstream.respond_with(move |req| {
        if req.path_only() != "/payments" {
            return None;
        }
        let key = req
            .header("idempotency-key")
            .unwrap_or_default()
            .to_string();
        let wait = if key == "stuck" {
            Duration::from_millis(4500)
        } else {
            delay
        };
        let n = {
            let mut m = seen.lock().unwrap_or_else(|p| p.into_inner());
            *m.entry(key).or_default() += 1;
            m.values().sum::<usize>()
        };
        Some(
            Script::status(201)
                .with_header("content-type", "application/json")
                .with_header("x-payment-id", format!("pay_{n}"))
                .with_body(format!(
                    "{{\"id\":\"pay_{n}\",\"charged\":{}}}",
                    req.body_text()
                ))
                .with_delay(wait)
                .chunked(3, Duration::from_millis(10)),
        )
    });
    made
}

fn subs(upstream: &TestUpstream, etcd: &Etcd, tweaks: &[(&str, &str)]) -> Substitutions {
    let ports = etcd.client_ports();
    let mut s = Substitutions::upstream(upstream);
    for (i, marker) in MEMBER_MARKERS.iter().enumerate() {
        // A smaller cluster fills the three endpoints with its members again.
        let port = ports.get(i % ports.len().max(1)).copied().unwrap_or(0);
        s = s.replace(*marker, format!("port_value: {port} }}"));
    }
    for (from, to) in tweaks {
        s = s.replace(*from, *to);
    }
    s
}

fn start_envoy(subs: &Substitutions) -> Result<Envoy> {
    let base = 500 + (std::process::id() % 1000) * 16 + BASE_ID.fetch_add(1, Ordering::SeqCst);
    Envoy::start_with(
        CONFIG,
        subs,
        &["--concurrency", "2", "--base-id", &base.to_string()],
    )
}

fn fleet(members: usize, delay: Duration, tweaks: &[(&str, &str)]) -> Result<Fleet> {
    let etcd = Etcd::start(members)?;
    let upstream = TestUpstream::start()?;
    let made = payments_app(&upstream, delay);
    let subs = subs(&upstream, &etcd, tweaks);
    let envoys = vec![start_envoy(&subs)?, start_envoy(&subs)?];
    Ok(Fleet {
        envoys,
        made,
        upstream,
        etcd,
    })
}

fn pay(envoy: &Envoy, key: &str, body: &str) -> Result<Response> {
    envoy.request(
        "POST",
        "/payments",
        &[
            ("idempotency-key", key),
            ("authorization", "Bearer alice"),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
}

impl Fleet {
    fn executions(&self, key: &str) -> usize {
        let m = self.made.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key).copied().unwrap_or(0)
    }

    fn most_executions(&self) -> usize {
        let m = self.made.lock().unwrap_or_else(|p| p.into_inner());
        m.values().copied().max().unwrap_or(0)
    }

    /// `n` concurrent POSTs with one key, alternating between the two Envoys.
    fn burst(&self, key: &str, n: usize) -> Result<Vec<Response>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let envoy = &self.envoys[i % 2];
                    s.spawn(move || pay(envoy, key, "{\"amount\":1000}"))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
                })
                .collect()
        })
    }

    fn stat(&self, name: &str) -> Result<u64> {
        let mut total = 0;
        for e in &self.envoys {
            total += e.stat(name)?.unwrap_or(0);
        }
        Ok(total)
    }
}

/// Every answer to a burst is the one execution's 201 (first or replayed) or a 409.
fn check_burst(answers: &[Response]) -> Response {
    let first: Vec<&Response> = answers
        .iter()
        .filter(|r| r.status == 201 && r.header("idempotent-replayed").is_none())
        .collect();
    assert_eq!(
        first.len(),
        1,
        "one original answer: {:?}",
        statuses(answers)
    );
    let original = first[0].clone();
    for r in answers {
        match r.status {
            409 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.header("content-type"), Some("application/problem+json"));
            }
            201 => assert_eq!(r.body, original.body),
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    original
}

fn statuses(answers: &[Response]) -> Vec<u16> {
    answers.iter().map(|r| r.status).collect()
}

fn assert_replay_of(again: &Response, original: &Response) {
    assert_eq!(again.status, original.status);
    assert_eq!(again.body, original.body, "byte for byte");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    for h in ["x-payment-id", "content-type"] {
        assert_eq!(again.header(h), original.header(h), "{h}");
    }
}

#[test]
fn duplicates_split_across_two_envoys_execute_once_and_either_replays() -> Result<()> {
    let f = fleet(3, Duration::from_millis(300), &[])?;
    for round in 0..3 {
        let key = format!("order-{round}");
        let answers = f.burst(&key, 20)?;
        assert_eq!(
            f.executions(&key),
            1,
            "round {round}: {:?}",
            statuses(&answers)
        );
        let original = check_burst(&answers);
        // A retry reaching either proxy gets the kept answer.
        for envoy in &f.envoys {
            assert_replay_of(&pay(envoy, &key, "{\"amount\":1000}")?, &original);
        }
        let other = pay(&f.envoys[round % 2], &key, "{\"amount\":1}")?;
        assert_eq!(other.status, 422, "another body with the same key");
    }
    // Concurrent duplicates were answered from their headers: none opened an upstream request.
    assert_eq!(f.stat("cluster.backend.upstream_rq_total")?, 3);
    assert_eq!(f.upstream.requests_to("/payments").len(), 3);
    assert_eq!(f.stat("wasmcustom.idempotency.forwarded")?, 3);
    Ok(())
}

#[test]
fn without_a_buffer_filter_concurrent_duplicates_still_never_reach_the_application() -> Result<()> {
    let buffer = "                  - name: envoy.filters.http.buffer
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
                      max_request_bytes: 1048576
";
    let f = fleet(1, Duration::from_millis(400), &[(buffer, "")])?;
    let answers = f.burst("no-buffer", 20)?;
    check_burst(&answers);
    assert_eq!(f.executions("no-buffer"), 1);
    let in_flight = answers.iter().filter(|r| r.status == 409).count();
    assert!(in_flight > 0, "{:?}", statuses(&answers));
    // A 409 for a key in flight is sent from the request's headers: only the first request's
    // headers went upstream. (A duplicate of a completed key has its body read first.)
    let replays = answers.iter().filter(|r| r.status == 201).count() - 1;
    assert_eq!(
        f.stat("cluster.backend.upstream_rq_total")?,
        1 + replays as u64
    );
    Ok(())
}

#[test]
fn a_follower_killed_leaves_every_key_executed_once() -> Result<()> {
    let mut f = fleet(3, Duration::from_millis(200), &[])?;
    let leader = f.etcd.leader()?;
    let follower = (leader + 1) % 3;
    f.etcd.members[follower].kill();
    let mut answered = 0;
    let mut unavailable = 0;
    for round in 0..5 {
        let key = format!("after-follower-{round}");
        let answers = f.burst(&key, 20)?;
        // A claim whose every attempt went to the dead member gets 503 (Envoy still sends it
        // some callouts in the first seconds); no key ever runs twice.
        assert!(
            answers.iter().all(|r| matches!(r.status, 201 | 409 | 503)),
            "{:?}",
            statuses(&answers)
        );
        let ran = f.executions(&key);
        assert!(ran <= 1, "{key} ran {ran} times");
        unavailable += answers.iter().filter(|r| r.status == 503).count();
        if answers.iter().any(|r| r.status == 201) {
            assert_eq!(ran, 1);
            answered += 1;
        }
    }
    assert!(answered >= 4, "{answered} of 5 keys ran");
    // Seen: 1 to 14. In some runs one of the two proxies kept sending about a third of its
    // callouts to the dead member for seconds although it was flagged failed (health check
    // and outlier detection), not yet explained; the bound catches a fleet that stops serving.
    assert!(unavailable <= 20, "{unavailable} of 100 requests got 503");
    Ok(())
}

#[test]
fn the_leader_killed_gives_a_short_burst_of_503s_and_no_double_execution() -> Result<()> {
    let mut f = fleet(3, Duration::ZERO, &[])?;
    let leader = f.etcd.leader()?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut answers: Vec<(Duration, u16)> = Vec::new();
    let begun = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let load = s.spawn(|| -> Result<Vec<(Duration, u16)>> {
            let mut seen = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                // Each key is sent to one proxy, then retried at the other.
                let key = format!("k{i}");
                for envoy in &f.envoys {
                    let r = pay(envoy, &key, "{}")?;
                    seen.push((begun.elapsed(), r.status));
                }
                i += 1;
            }
            Ok(seen)
        });
        std::thread::sleep(Duration::from_millis(700));
        f.etcd.members[leader].kill();
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, Ordering::SeqCst);
        answers = load
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        Ok(())
    })?;
    assert_eq!(f.most_executions(), 1, "no key ran twice");
    let failed: Vec<&(Duration, u16)> = answers.iter().filter(|(_, s)| *s == 503).collect();
    assert!(
        answers.iter().all(|(_, s)| matches!(s, 201 | 409 | 503)),
        "{answers:?}"
    );
    if let (Some(first), Some(last)) = (failed.first(), failed.last()) {
        assert!(
            last.0 - first.0 < Duration::from_secs(3),
            "503s from {:?} to {:?}",
            first.0,
            last.0
        );
    }
    // After the election, requests are served again.
    let tail = answers.iter().rev().take(10);
    assert!(
        tail.clone().all(|(_, s)| *s != 503),
        "still failing at the end: {:?}",
        tail.collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn a_hung_etcd_gets_503_in_bounded_time_and_the_fleet_recovers_without_restart() -> Result<()> {
    let mut f = fleet(3, Duration::ZERO, &[])?;
    assert_eq!(pay(&f.envoys[0], "before", "{}")?.status, 201);
    for m in &mut f.etcd.members {
        if let Some(p) = m.process() {
            p.pause();
        }
    }
    let executed = f.upstream.requests_to("/payments").len();
    for envoy in &f.envoys {
        let t0 = Instant::now();
        let r = pay(envoy, "during", "{}")?;
        let took = t0.elapsed();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        // (1 + retries) × timeout = 2 × 500 ms, and Envoy's own share.
        assert!(took < Duration::from_millis(1400), "503 after {took:?}");
        // Keyless requests do not wait for etcd.
        let t0 = Instant::now();
        let get = envoy.get("/status")?;
        assert_eq!(get.status, 200);
        assert!(t0.elapsed() < Duration::from_millis(300));
    }
    assert_eq!(
        f.upstream.requests_to("/payments").len(),
        executed,
        "nothing forwarded unguarded"
    );
    assert!(f.stat("wasmcustom.idempotency.store_timeouts")? >= 2);
    for m in &mut f.etcd.members {
        if let Some(p) = m.process() {
            p.resume();
        }
    }
    // Recovery, with the same Envoy processes.
    for (i, envoy) in f.envoys.iter().enumerate() {
        let key = format!("after-{i}");
        let r = wait_until(Duration::from_secs(10), "etcd to serve again", || {
            let r = pay(envoy, &key, "{}")?;
            Ok((r.status != 503).then_some(r))
        })?;
        assert_eq!(r.status, 201);
        assert_eq!(f.executions(&key), 1);
    }
    Ok(())
}

#[test]
fn a_claim_whose_lease_ends_frees_its_key() -> Result<()> {
    let f = fleet(
        1,
        Duration::ZERO,
        &[(r#""inFlightTimeout": "30s""#, r#""inFlightTimeout": "2s""#)],
    )?;
    std::thread::scope(|s| -> Result<()> {
        let first = s.spawn(|| pay(&f.envoys[0], "stuck", "{}"));
        wait_until(STAT_TIMEOUT, "the first request to run", || {
            Ok((f.executions("stuck") == 1).then_some(()))
        })?;
        let t0 = Instant::now();
        let dup = pay(&f.envoys[1], "stuck", "{}")?;
        assert_eq!(dup.status, 409, "{}", dup.text());
        // The claim's lease covers inFlightTimeout (2 s) and ends within an interval (1 s) more.
        let freed = wait_until(Duration::from_secs(4), "the key to be claimable", || {
            let r = pay(&f.envoys[1], "stuck", "{}")?;
            Ok((r.status != 409).then_some(r))
        })?;
        let after = t0.elapsed();
        assert!(
            after >= Duration::from_millis(1500),
            "freed after {after:?}"
        );
        assert_eq!(f.executions("stuck"), 2, "{}", freed.status);
        let first = first
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        assert_eq!(first.status, 201);
        Ok(())
    })?;
    f.envoys[0]
        .wait_for_stat("wasmcustom.idempotency.lost", 1, STAT_TIMEOUT)
        .context("the first request's completion found its key taken")?;
    Ok(())
}
