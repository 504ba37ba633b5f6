//! Fleet-wide limits in real Envoys: two Envoy 1.40 processes (two workers each) with
//! `envoy/rate-limit-global.yaml`, in front of one application, asking one rate limit service
//! (`envoy/ratelimit-service`, started from its binary) that counts in one real Redis. A limit
//! holds for the fleet, not per proxy; each failure mode does what it says while Redis or the
//! service is hung or dead, and everything recovers without restarting Envoy.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edge_e2e::{Envoy, Response, Substitutions, TestUpstream};
use edge_engines::{Process, Redis};

const CONFIG: &str = "rate-limit-global.yaml";
/// The service's limit for the test key: 10 an hour (the proxies' own buckets allow 100 a
/// minute, so only the service can limit here).
const LIMIT: usize = 10;

/// The service's configuration: envoyproxy/ratelimit's format, for the plugin's descriptor
/// `rule=per-key, x-api-key=<key>`.
const LIMITS: &str = r#"
domain: edge
descriptors:
  - key: rule
    value: per-key
    descriptors:
      - key: x-api-key
        rate_limit: { unit: hour, requests_per_unit: 10 }
"#;

/// The binary `cargo test --workspace` builds beside this test.
fn service_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary location")?;
    let bin = dir.join("ratelimit-service");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p ratelimit-service` (./build.sh test does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A rate limit service process on a free port, stopped when dropped.
struct Service {
    process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(redis: &Redis) -> Result<Service> {
        Service::start_on(redis, 0)
    }

    /// On `port` (0: a free one), as a restarted service comes back where Envoy looks for it.
    fn start_on(redis: &Redis, port: u16) -> Result<Service> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("limits.yaml");
        std::fs::write(&config, LIMITS)?;
        let log = dir.path().join("service.log");
        let args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--redis".into(),
            redis.url(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--timeout".into(),
            "200".into(),
        ];
        let mut process = Process::spawn(&service_binary()?.display().to_string(), &args, &log)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("listening on 127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                return Ok(Service {
                    process,
                    port: digits.parse()?,
                    _dir: dir,
                });
            }
            if process.exited() || Instant::now() > deadline {
                bail!("the rate limit service did not start: {}", process.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An Envoy of the fleet, its rules' failure mode set to `failure_mode` and their call
/// timeout to `timeout` (the file's 50 ms is tight for a test machine under load: a call
/// that times out is decided by the failure mode, which would blur what is counted).
fn envoy_with(
    upstream: &TestUpstream,
    service_port: u16,
    failure_mode: &str,
    timeout: &str,
) -> Result<Envoy> {
    let subs = Substitutions::upstream(upstream)
        .replace("port_value: 18081", format!("port_value: {service_port}"))
        .replace(r#""timeout": "50ms""#, format!(r#""timeout": "{timeout}""#))
        .replace(
            r#""failureMode": "local""#,
            format!(r#""failureMode": "{failure_mode}""#),
        );
    Envoy::start_with(CONFIG, &subs, &["--concurrency", "2"])
}

fn envoy(upstream: &TestUpstream, service_port: u16, failure_mode: &str) -> Result<Envoy> {
    envoy_with(upstream, service_port, failure_mode, "2s")
}

fn api(envoy: &Envoy, key: &str) -> Result<Response> {
    envoy.request("GET", "/api/orders", &[("x-api-key", key)], b"")
}

#[test]
fn a_limit_holds_for_the_fleet_not_per_proxy() -> Result<()> {
    let redis = Redis::start()?;
    let service = Service::start(&redis)?;
    let upstream = TestUpstream::start()?;
    let a = envoy(&upstream, service.port, "local")?;
    let b = envoy(&upstream, service.port, "local")?;

    // 40 requests at once for one key, half through each Envoy.
    let answers: Vec<Response> = thread::scope(|s| {
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let envoy = if i % 2 == 0 { &a } else { &b };
                s.spawn(move || api(envoy, "k1"))
            })
            .collect();
        calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| bail!("request thread panicked"))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let admitted = answers.iter().filter(|r| r.status == 200).count();
    let limited = answers.iter().filter(|r| r.status == 429).count();
    assert_eq!(
        (admitted, limited),
        (LIMIT, 40 - LIMIT),
        "the fleet admits the limit once"
    );
    assert_eq!(upstream.requests_to("/api/orders").len(), LIMIT);

    // Both proxies tell clients the service's quota.
    for envoy in [&a, &b] {
        let over = api(envoy, "k1")?;
        assert_eq!(over.status, 429);
        assert_eq!(
            over.header("ratelimit-policy"),
            Some("\"per-key\";q=10;w=3600")
        );
        let retry: u64 = over.header("retry-after").context("retry-after")?.parse()?;
        assert!((1..=3600).contains(&retry), "retry-after {retry}");
        assert_eq!(
            over.header("content-type"),
            Some("application/problem+json")
        );
    }
    // Another key has its own count.
    let other = api(&a, "k2")?;
    assert_eq!(other.status, 200);
    let remaining = other.header("ratelimit").context("ratelimit")?;
    assert!(remaining.starts_with("\"per-key\";r=9;t="), "{remaining}");
    assert!(
        a.stat("wasmcustom.rate_limit.per-key.global_checked")?
            .unwrap_or(0)
            > 0
    );
    Ok(())
}

/// `n` requests as `key` on `envoy`, each answered within `within`; their statuses.
fn statuses_within(envoy: &Envoy, key: &str, n: usize, within: Duration) -> Result<Vec<u16>> {
    (0..n)
        .map(|_| {
            let started = Instant::now();
            let r = api(envoy, key)?;
            let took = started.elapsed();
            if took > within {
                bail!("answered {} after {took:?}, more than {within:?}", r.status);
            }
            Ok(r.status)
        })
        .collect()
}

#[test]
fn each_failure_mode_applies_while_redis_or_the_service_fails_and_recovers() -> Result<()> {
    let mut redis = Redis::start()?;
    let mut service = Service::start(&redis)?;
    let upstream = TestUpstream::start()?;
    let local = envoy_with(&upstream, service.port, "local", "500ms")?;
    let open = envoy_with(&upstream, service.port, "open", "500ms")?;
    let closed = envoy_with(&upstream, service.port, "closed", "500ms")?;
    // Each call gives up after 500 ms: an answer comes within twice that either way.
    let bound = Duration::from_secs(1);

    // A key the service has used up: limited by every proxy while the service works.
    for _ in 0..LIMIT {
        api(&local, "used")?;
    }
    assert_eq!(api(&local, "used")?.status, 429);

    // Redis hangs: the service cannot answer in time, each proxy's failure mode decides.
    redis.process().pause();
    // `local`: this proxy's bucket decides and is charged; `open`: the token is given back,
    // so the outage costs the client nothing.
    let remaining = |envoy: &Envoy| -> Result<Vec<String>> {
        (0..3)
            .map(|_| {
                let r = api(envoy, "bucket")?;
                Ok(r.header("ratelimit").unwrap_or("none").to_string())
            })
            .collect()
    };
    let local_left = remaining(&local)?;
    assert_eq!(local_left.len(), 3);
    assert_ne!(
        local_left[0], local_left[2],
        "local mode charges the bucket: {local_left:?}"
    );
    let open_left = remaining(&open)?;
    assert_eq!(
        open_left[0], open_left[2],
        "open mode gives the token back: {open_left:?}"
    );
    assert_eq!(
        statuses_within(&local, "fresh-1", 3, bound)?,
        [200, 200, 200]
    );
    assert_eq!(
        statuses_within(&open, "fresh-1", 3, bound)?,
        [200, 200, 200]
    );
    assert_eq!(
        statuses_within(&closed, "fresh-1", 3, bound)?,
        [503, 503, 503]
    );
    redis.process().resume();

    // Redis is back: the fleet limits again, no restart.
    let deadline = Instant::now() + Duration::from_secs(5);
    while api(&closed, "recovered")?.status == 503 {
        if Instant::now() > deadline {
            bail!("the closed proxy still answers 503 after Redis came back");
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        api(&closed, "used")?.status,
        429,
        "the count survived the outage"
    );

    // Redis dies: the service answers UNAVAILABLE at once, the same failure modes apply; a
    // Redis started again on its port brings limits back, no restart of Envoy or the service.
    let redis_port = redis.port();
    redis.process().kill();
    assert_eq!(statuses_within(&local, "fresh-r", 2, bound)?, [200, 200]);
    assert_eq!(statuses_within(&open, "fresh-r", 2, bound)?, [200, 200]);
    assert_eq!(statuses_within(&closed, "fresh-r", 2, bound)?, [503, 503]);
    let redis = Redis::start_on(redis_port)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while api(&closed, "after-redis")?.status == 503 {
        if Instant::now() > deadline {
            bail!("the closed proxy still answers 503 after Redis was started again");
        }
        thread::sleep(Duration::from_millis(100));
    }

    // The service hangs, then dies: timeouts, then refused connections; the same answers.
    service.process.pause();
    assert_eq!(statuses_within(&local, "fresh-2", 2, bound)?, [200, 200]);
    assert_eq!(statuses_within(&closed, "fresh-2", 2, bound)?, [503, 503]);
    assert!(
        local
            .stat("wasmcustom.rate_limit.per-key.global_timeouts")?
            .unwrap_or(0)
            >= 2
    );
    let errors_before = closed
        .stat("wasmcustom.rate_limit.per-key.global_errors")?
        .unwrap_or(0);
    service.process.kill();
    assert_eq!(statuses_within(&open, "fresh-3", 2, bound)?, [200, 200]);
    assert_eq!(statuses_within(&closed, "fresh-3", 2, bound)?, [503, 503]);
    assert!(
        closed
            .stat("wasmcustom.rate_limit.per-key.global_errors")?
            .unwrap_or(0)
            >= errors_before + 2,
        "refused connections to a dead service count as errors"
    );

    // The service comes back on its port: limits again, still without restarting Envoy.
    let _back = Service::start_on(&redis, service.port)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while api(&closed, "after")?.status == 503 {
        if Instant::now() > deadline {
            bail!("the closed proxy still answers 503 after the service came back");
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Counting works again (Redis restarted empty: a fresh key is used up anew).
    for _ in 0..LIMIT {
        api(&local, "again")?;
    }
    assert_eq!(api(&local, "again")?.status, 429);
    Ok(())
}
