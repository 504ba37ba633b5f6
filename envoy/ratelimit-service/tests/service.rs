//! The service against a real Redis (Debian's `redis-server`, started per test on a free
//! loopback port and stopped by its guard, `edge_engines::Redis`): exact counting under concurrent calls, the statuses
//! it answers, window expiry, shadow mode, and gRPC UNAVAILABLE while Redis is hung or dead,
//! with recovery and no restart. The binary itself: its address line, a bad file, SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use edge_engines::Redis;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit, Code};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratelimit_service::{config::Config, Service};
use tonic::transport::Channel;

/// The service in this process on a free port, and a client for it.
async fn serve(
    config: &str,
    redis: &Redis,
    timeout: Duration,
) -> Result<RateLimitServiceClient<Channel>> {
    let service = Service::connect(Config::parse(config)?, &redis.url(), timeout).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok(RateLimitServiceClient::connect(format!("http://{addr}")).await?)
}

fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: descriptors
            .iter()
            .map(|entries| RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                ..RateLimitDescriptor::default()
            })
            .collect(),
        hits_addend: 1,
    }
}

async fn call(
    client: &mut RateLimitServiceClient<Channel>,
    key: &str,
) -> Result<RateLimitResponse, tonic::Status> {
    let r = request("edge", &[&[("rule", "per-key"), ("x-api-key", key)]]);
    client.should_rate_limit(r).await.map(|r| r.into_inner())
}

const PER_KEY: &str = r#"
domain: edge
descriptors:
  - key: rule
    value: per-key
    descriptors:
      - key: x-api-key
        rate_limit: { unit: hour, requests_per_unit: 10 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_admit_exactly_the_limit() -> Result<()> {
    let redis = Redis::start()?;
    let client = serve(PER_KEY, &redis, Duration::from_secs(2)).await?;
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { call(&mut c, "k1").await })
        })
        .collect();
    let mut admitted = 0;
    for c in calls {
        let r = c.await??;
        if r.overall_code == Code::Ok as i32 {
            admitted += 1;
        } else {
            assert_eq!(r.overall_code, Code::OverLimit as i32);
        }
    }
    assert_eq!(admitted, 10, "exactly the limit is admitted");
    let mut c = client.clone();
    let other = call(&mut c, "k2").await?;
    assert_eq!(
        other.overall_code,
        Code::Ok as i32,
        "another key is unaffected"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_descriptor_gets_its_limit_remaining_and_reset() -> Result<()> {
    let redis = Redis::start()?;
    let config = PER_KEY.replace("requests_per_unit: 10", "requests_per_unit: 2");
    let mut client = serve(&config, &redis, Duration::from_secs(2)).await?;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = call(&mut client, "k").await?;
        let s = &r.statuses[0];
        let limit = s.current_limit.as_ref().context("current_limit")?;
        assert_eq!(limit.requests_per_unit, 2);
        assert_eq!(limit.unit, rate_limit::Unit::Hour as i32);
        let reset = s.duration_until_reset.as_ref().context("reset")?;
        assert!((0..=3600).contains(&reset.seconds), "{reset:?}");
        remaining.push((s.code, s.limit_remaining, r.overall_code));
    }
    let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
    assert_eq!(remaining, [(ok, 1, ok), (ok, 0, ok), (over, 0, over)]);

    // Two descriptors: one without a limit is OK with none; the request is over if either is.
    let r = client
        .should_rate_limit(request(
            "edge",
            &[
                &[("rule", "unknown")],
                &[("rule", "per-key"), ("x-api-key", "k")],
            ],
        ))
        .await?
        .into_inner();
    assert_eq!(r.statuses.len(), 2);
    assert_eq!(
        (r.statuses[0].code, r.statuses[0].current_limit.is_none()),
        (ok, true)
    );
    assert_eq!((r.statuses[1].code, r.overall_code), (over, over));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_window_admits_again_and_old_counters_expire() -> Result<()> {
    let redis = Redis::start()?;
    let config = PER_KEY.replace(
        "unit: hour, requests_per_unit: 10",
        "unit: second, requests_per_unit: 1",
    );
    let mut client = serve(&config, &redis, Duration::from_secs(2)).await?;
    // Start early in a second, so both calls fall in one window.
    loop {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        if now.subsec_millis() < 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&mut client, "w").await?.overall_code, Code::Ok as i32);
    assert_eq!(
        call(&mut client, "w").await?.overall_code,
        Code::OverLimit as i32
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(call(&mut client, "w").await?.overall_code, Code::Ok as i32);
    // Each window's counter carries an expiry, so Redis does not keep old windows.
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("ratelimit:*")
        .query_async(&mut conn)
        .await?;
    assert!(!keys.is_empty());
    for key in keys {
        let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut conn).await?;
        assert!((0..=1).contains(&ttl), "{key}: ttl {ttl}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_counts_and_never_limits() -> Result<()> {
    let redis = Redis::start()?;
    let config = PER_KEY.replace(
        "requests_per_unit: 10 }",
        "requests_per_unit: 1 }\n        shadow_mode: true",
    );
    let mut client = serve(&config, &redis, Duration::from_secs(2)).await?;
    for _ in 0..3 {
        let r = call(&mut client, "s").await?;
        assert_eq!(r.overall_code, Code::Ok as i32);
    }
    let r = call(&mut client, "s").await?;
    assert_eq!(r.statuses[0].limit_remaining, 0, "it was counted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_or_dead_redis_is_unavailable_and_recovery_needs_no_restart() -> Result<()> {
    let mut redis = Redis::start()?;
    let timeout = Duration::from_millis(250);
    let mut client = serve(PER_KEY, &redis, timeout).await?;
    assert_eq!(call(&mut client, "r").await?.overall_code, Code::Ok as i32);

    redis.process().pause();
    let started = Instant::now();
    let err = call(&mut client, "r").await.expect_err("hung redis");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        started.elapsed() < timeout * 8,
        "answered after {:?}",
        started.elapsed()
    );
    redis.process().resume();
    assert_eq!(call(&mut client, "r").await?.overall_code, Code::Ok as i32);

    let port = redis.port();
    redis.process().kill();
    let err = call(&mut client, "r").await.expect_err("dead redis");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    let _again = Redis::start_on(port)?;
    let mut recovered = false;
    for _ in 0..20 {
        if call(&mut client, "r").await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the service reconnects to a restarted Redis");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_domain_is_not_limited_and_no_descriptor_is_an_error() -> Result<()> {
    let redis = Redis::start()?;
    let mut client = serve(PER_KEY, &redis, Duration::from_secs(2)).await?;
    let r = client
        .should_rate_limit(request("other", &[&[("rule", "per-key")]]))
        .await?
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    let err = client
        .should_rate_limit(request("edge", &[]))
        .await
        .expect_err("no descriptors");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    Ok(())
}

/// The binary, as `envoy/e2e` and users start it.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_its_address_serves_and_stops_on_sigterm() -> Result<()> {
    let redis = Redis::start()?;
    let dir = redis.dir().join("service");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("config.yaml");
    std::fs::write(&file, PER_KEY)?;
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_ratelimit-service"))
            .arg("--config")
            .arg(&file)
            .args(["--redis", &redis.url(), "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line {line:?}"))?
        .to_string();
    let mut client = RateLimitServiceClient::connect(format!("http://{addr}")).await?;
    assert_eq!(call(&mut client, "b").await?.overall_code, Code::Ok as i32);
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");

    std::fs::write(
        &file,
        "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight}\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_ratelimit-service"))
        .arg("--config")
        .arg(&file)
        .args(["--redis", &redis.url(), "--listen", "127.0.0.1:0"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("descriptors[0].rate_limit.unit"), "{err}");
    Ok(())
}
