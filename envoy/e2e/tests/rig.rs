//! The rig itself, against a real Envoy with no plugins: if these fail, plugin e2e results mean
//! nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Result;
use edge_e2e::{client, Envoy, Script, Substitutions, TestUpstream, READY_TIMEOUT};

fn plain_envoy(upstream: &TestUpstream) -> Result<Envoy> {
    Envoy::start("plain.yaml", &Substitutions::upstream(upstream))
}

#[test]
fn envoy_without_plugins_proxies_to_the_upstream() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route(
        "/down",
        Script::json(r#"{"error":"maintenance"}"#).with_status(503),
    );
    let envoy = plain_envoy(&upstream)?;

    let res = envoy.request("GET", "/hello?x=1", &[("x-test-id", "abc")], b"")?;
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "upstream saw GET /hello?x=1");
    let seen = upstream.requests_to("/hello");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/hello?x=1");
    assert_eq!(seen[0].header("x-test-id"), Some("abc"));

    let res = envoy.get("/down")?;
    assert_eq!(res.status, 503);
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(res.text(), r#"{"error":"maintenance"}"#);

    let total = envoy.stat("cluster.backend.upstream_rq_total")?;
    assert!(total >= Some(1), "upstream_rq_total = {total:?}");
    Ok(())
}

#[test]
fn request_bodies_reach_the_upstream_intact() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let envoy = plain_envoy(&upstream)?;

    let res = envoy.request(
        "POST",
        "/orders",
        &[("content-type", "application/json")],
        b"{\"n\":1}",
    )?;
    assert_eq!(res.status, 200);
    // A chunked request body, which Envoy forwards chunked.
    let res = envoy.request(
        "PUT",
        "/orders/2",
        &[("transfer-encoding", "chunked")],
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )?;
    assert_eq!(res.status, 200);

    assert_eq!(upstream.requests_to("/orders")[0].body, b"{\"n\":1}");
    let put = &upstream.requests_to("/orders/2")[0];
    assert_eq!(
        (put.method.as_str(), put.body_text().as_str()),
        ("PUT", "abcde")
    );
    Ok(())
}

#[test]
fn config_with_missing_module_fails_fast_with_envoys_error() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let started = Instant::now();
    let err = Envoy::start(
        "e2e/tests/fixtures/missing-module.yaml",
        &Substitutions::upstream(&upstream),
    )
    .err()
    .expect("Envoy must refuse a config whose wasm module is missing");
    let err = format!("{err:#}");
    assert!(
        started.elapsed() < READY_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("exited before becoming ready"), "{err}");
    // Envoy 1.40: "error initializing configuration '...': Invalid path: <dist>/does_not_exist.wasm"
    assert!(err.contains("Invalid path: "), "{err}");
    assert!(err.contains("/dist/does_not_exist.wasm"), "{err}");
    Ok(())
}

#[test]
fn upstream_reset_surfaces_as_503_from_envoy() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route("/crash", Script::reset());
    let envoy = plain_envoy(&upstream)?;

    let res = envoy.get("/crash")?;
    assert_eq!(res.status, 503);
    assert!(res.text().contains("reset"), "{}", res.text());
    assert_eq!(upstream.requests_to("/crash").len(), 1);
    // The next request on a fresh upstream connection is served normally.
    assert_eq!(envoy.get("/fine")?.status, 200);
    Ok(())
}

#[test]
fn reset_script_aborts_the_connection_with_a_tcp_rst() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route("/crash", Script::reset());
    let mut conn = TcpStream::connect(upstream.addr())?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /crash HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let err = conn
        .read(&mut [0u8; 16])
        .expect_err("a reset, not an answer or a clean close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    Ok(())
}

#[test]
fn upstream_serves_a_document_that_changes_while_running() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route("/flags.json", Script::json(r#"{"v":1}"#));
    let envoy = plain_envoy(&upstream)?;
    assert_eq!(envoy.get("/flags.json")?.text(), r#"{"v":1}"#);

    upstream.route("/flags.json", Script::json(r#"{"v":2}"#));
    assert_eq!(envoy.get("/flags.json")?.text(), r#"{"v":2}"#);
    assert_eq!(
        client::get(&upstream.url("/flags.json"))?.text(),
        r#"{"v":2}"#
    );

    upstream.unroute("/flags.json");
    assert_eq!(
        envoy.get("/flags.json")?.text(),
        "upstream saw GET /flags.json"
    );
    assert_eq!(upstream.requests_to("/flags.json").len(), 4);
    upstream.clear();
    assert!(upstream.requests().is_empty());
    Ok(())
}

#[test]
fn chunked_and_delayed_answers_arrive_whole_through_envoy() -> Result<()> {
    let upstream = TestUpstream::start()?;
    let body = "0123456789".repeat(10);
    upstream.route(
        "/stream",
        Script::text(body.clone()).chunked(4, Duration::from_millis(50)),
    );
    upstream.route(
        "/slow",
        Script::status(204).with_delay(Duration::from_millis(300)),
    );
    let envoy = plain_envoy(&upstream)?;

    let started = Instant::now();
    let res = envoy.get("/stream")?;
    assert_eq!((res.status, res.text()), (200, body));
    assert!(started.elapsed() >= Duration::from_millis(150));

    let started = Instant::now();
    assert_eq!(envoy.get("/slow")?.status, 204);
    assert!(started.elapsed() >= Duration::from_millis(300));
    Ok(())
}

#[test]
fn two_envoys_run_side_by_side() -> Result<()> {
    let (a, b) = (TestUpstream::start()?, TestUpstream::start()?);
    let (envoy_a, envoy_b) = (plain_envoy(&a)?, plain_envoy(&b)?);
    assert_ne!(envoy_a.listener_port(), envoy_b.listener_port());
    assert_ne!(envoy_a.admin_port(), envoy_b.admin_port());

    assert_eq!(envoy_a.get("/a")?.status, 200);
    assert_eq!(envoy_b.get("/b")?.status, 200);
    assert_eq!(a.requests().len(), 1);
    assert_eq!(b.requests().len(), 1);
    assert_eq!(
        (a.requests()[0].path.as_str(), b.requests()[0].path.as_str()),
        ("/a", "/b")
    );
    Ok(())
}

#[test]
fn upstream_keeps_connections_alive_and_stops_on_drop() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route(
        "/slow",
        Script::status(200).with_delay(Duration::from_secs(60)),
    );
    let mut conn = TcpStream::connect(upstream.addr())?;
    conn.write_all(b"GET /one HTTP/1.1\r\nhost: x\r\n\r\nGET /two HTTP/1.1\r\nhost: x\r\n\r\n")?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains("upstream saw GET /two") {
        let n = conn.read(&mut buf)?;
        assert_ne!(n, 0, "connection closed after {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), 2);

    // A request stuck in a 60 s delay must not hold up the drop.
    conn.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")?;
    upstream.wait_for_requests_to("/slow", 1, Duration::from_secs(5))?;
    let started = Instant::now();
    drop(upstream);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        started.elapsed()
    );
    // Closed, not left hanging until the read timeout.
    let after = conn.read(&mut buf);
    assert!(
        matches!(&after, Ok(0))
            || after
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "after drop: {after:?}"
    );
    Ok(())
}

#[test]
fn responder_answers_per_request_before_the_routes() -> Result<()> {
    // A fixed address, as the demo uses; port 0 keeps the test parallel-safe.
    let upstream = TestUpstream::start_on("127.0.0.1:0")?;
    upstream.route("/routed", Script::status(204));
    upstream.route("/orders", Script::status(500));
    let count = std::sync::atomic::AtomicU32::new(0);
    upstream.respond_with(move |req| {
        (req.method == "POST" && req.path_only() == "/orders").then(|| {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            Script::json(format!(r#"{{"id":{n},"bytes":{}}}"#, req.body.len())).with_status(201)
        })
    });

    let post = |body: &[u8]| client::request("POST", &upstream.url("/orders"), &[], body);
    assert_eq!(post(b"abc")?.text(), r#"{"id":1,"bytes":3}"#);
    let second = post(b"")?;
    assert_eq!(
        (second.status, second.text()),
        (201, r#"{"id":2,"bytes":0}"#.into())
    );
    // `None` falls through to the routes, then to the echo.
    assert_eq!(client::get(&upstream.url("/orders"))?.status, 500);
    assert_eq!(client::get(&upstream.url("/routed"))?.status, 204);
    assert_eq!(
        client::get(&upstream.url("/x"))?.text(),
        "upstream saw GET /x"
    );
    assert_eq!(upstream.requests_to("/orders").len(), 3);
    Ok(())
}

#[test]
fn a_stopped_upstream_keeps_its_port_refusing_until_it_serves_again() -> Result<()> {
    let upstream = TestUpstream::start()?;
    upstream.route("/up", Script::status(204));
    let addr = upstream.addr();
    let held = upstream.stop_keeping_port()?;
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert!(
        std::net::TcpListener::bind(addr).is_err(),
        "no other socket can take the held port"
    );
    let again = TestUpstream::start_held(held)?;
    again.route("/up", Script::status(204));
    assert_eq!(
        client::request("GET", &again.url("/up"), &[], b"")?.status,
        204
    );
    assert_eq!(again.addr(), addr);
    Ok(())
}
