//! `ratelimit-service --config FILE --redis redis://HOST:PORT --listen HOST:PORT [--timeout MS]`
//!
//! Serves `envoy.service.ratelimit.v3.RateLimitService` (gRPC over HTTP/2, plaintext) until
//! SIGINT or SIGTERM. `--listen 127.0.0.1:0` picks a free port; the address bound is printed
//! as `listening on HOST:PORT`, so a test or a script can read it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ratelimit_service::{config::Config, Service};

const USAGE: &str = "usage: ratelimit-service --config FILE --redis redis://HOST:PORT --listen HOST:PORT [--timeout MS]";

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ratelimit-service: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ratelimit-service: {e:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<()> {
    let (mut config, mut redis, mut listen, mut timeout) = (None, None, None, 250u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => config = Some(value),
            "--redis" => redis = Some(value),
            "--listen" => listen = Some(value),
            "--timeout" => timeout = value.parse().context("--timeout: milliseconds")?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let path = config.context("--config is required")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let config = Config::parse(&text).with_context(|| path.clone())?;
    let redis = redis.context("--redis is required")?;
    let service = Service::connect(config, &redis, Duration::from_millis(timeout)).await?;
    let listener = tokio::net::TcpListener::bind(listen.context("--listen is required")?).await?;
    println!("listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        // Without TCP_NODELAY, Nagle's algorithm and the client's delayed ACK hold small
        // answers back for tens of milliseconds.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown(),
        )
        .await?;
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
