//! dist/rate_limit.wasm in the harness, on two workers sharing one store, as in Envoy.
mod common;
use anyhow::Result;
use common::assert_rejected;
use host_tests::{Callback, Edge, EdgeBuilder, Module, Plugin, Request, Step};
use std::time::Duration;

fn module() -> Module {
    common::plugin_module("rate_limit")
}

fn edge(config: &str) -> EdgeBuilder {
    Edge::builder()
        .plugin(Plugin::new(&module(), config).name("rate-limit"))
        .workers(2)
}

const PER_CLIENT: &str = r#"{"rules":[{"name":"api-per-client",
    "match":{"pathPrefix":"/api/"},
    "key":[{"source":"clientIp"},{"header":"x-api-key"}],
    "limit":{"requests":100,"window":"60s","burst":20}}]}"#;

fn api(ip: &str) -> Request {
    Request::get("/api/orders")
        .from(ip)
        .header("x-api-key", "k1")
}

#[test]
fn exactly_burst_requests_pass_across_both_workers_then_429() -> Result<()> {
    let mut edge = edge(PER_CLIENT).build()?;
    let mut statuses = Vec::new();
    for i in 0..30 {
        statuses.push(edge.send(api("10.1.1.1:4000").worker(i % 2))?.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(
        edge.upstream_requests().len(),
        20,
        "limited requests never reach the upstream"
    );
    assert_eq!(edge.metric("rate_limit.api-per-client.allowed"), Some(20));
    assert_eq!(edge.metric("rate_limit.api-per-client.limited"), Some(10));
    // Another client, and a path outside the rule, are unaffected.
    assert_eq!(edge.send(api("10.1.1.2:4000"))?.status, 200);
    assert_eq!(
        edge.send(Request::get("/health").from("10.1.1.1:4000"))?
            .status,
        200
    );
    Ok(())
}

#[test]
fn a_worker_that_loses_the_last_token_inside_its_callback_answers_429() -> Result<()> {
    let mut edge =
        edge(r#"{"rules":[{"name":"one","limit":{"requests":1,"window":"60s"}}]}"#).build()?;
    // The other worker takes the last token between this worker's read and its write.
    edge.stage_races(1);
    let res = edge.send(Request::get("/pay").worker(0))?;
    assert_eq!(edge.races_run(), 1, "the plugin must compare-and-swap");
    assert_eq!(
        res.status, 429,
        "the other worker already took the only token"
    );
    assert!(edge.upstream_requests().is_empty());
    assert_eq!(edge.send(Request::get("/pay").worker(1))?.status, 429);
    Ok(())
}

#[test]
fn lost_races_on_both_workers_never_admit_more_than_the_limit() -> Result<()> {
    let mut edge =
        edge(r#"{"rules":[{"name":"five","limit":{"requests":5,"window":"60s"}}]}"#).build()?;
    edge.stage_races(3);
    let mut admitted = 0;
    for i in 0..12 {
        admitted += usize::from(edge.send(Request::get("/").worker(i % 2))?.status == 200);
    }
    assert_eq!(edge.races_run(), 3);
    // Each lost race is a token another worker spent: together exactly the limit.
    assert_eq!(admitted + 3, 5);
    assert_eq!(edge.upstream_requests().len(), admitted);
    Ok(())
}

/// Buckets are shared by the workers (not one per VM). The race inside a callback is the job of
/// the two tests above: at callback boundaries each read-modify-write is whole.
#[test]
fn streams_of_both_workers_interleaved_at_callbacks_admit_one() -> Result<()> {
    let mut edge =
        edge(r#"{"rules":[{"name":"one","limit":{"requests":1,"window":"60s"}}]}"#).build()?;
    let a = edge.begin(Request::get("/pay").worker(0))?;
    let b = edge.begin(Request::get("/pay").worker(1))?;
    assert_eq!(edge.step(a)?, Step::Ran(Callback::RequestHeaders));
    assert_eq!(edge.step(b)?, Step::Ran(Callback::RequestHeaders));
    let mut got = [edge.finish(a)?.status, edge.finish(b)?.status];
    got.sort();
    assert_eq!(got, [200, 429]);
    assert_eq!(edge.upstream_requests().len(), 1);
    Ok(())
}

#[test]
fn a_limited_response_has_retry_after_ietf_headers_and_problem_json() -> Result<()> {
    let mut edge = edge(PER_CLIENT).build()?;
    for _ in 0..20 {
        edge.send(api("10.1.1.1:4000"))?;
    }
    let res = edge.send(api("10.1.1.1:4000"))?;
    assert_eq!(res.status, 429);
    // 100 per 60 s is one token every 600 ms.
    assert_eq!(res.header("retry-after"), Some("1"));
    assert_eq!(
        res.header("ratelimit-policy"),
        Some("\"api-per-client\";q=100;w=60")
    );
    assert_eq!(res.header("ratelimit"), Some("\"api-per-client\";r=0;t=1"));
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    let body: serde_json::Value = serde_json::from_slice(&res.body)?;
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(
        body["violated-policies"],
        serde_json::json!(["api-per-client"])
    );
    Ok(())
}

#[test]
fn allowed_responses_say_what_is_left() -> Result<()> {
    let mut edge = edge(PER_CLIENT).build()?;
    let res = edge.send(api("10.1.1.1:4000"))?;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("ratelimit-policy"),
        Some("\"api-per-client\";q=100;w=60")
    );
    assert_eq!(res.header("ratelimit"), Some("\"api-per-client\";r=19;t=1"));
    let res = edge.send(Request::get("/other"))?;
    assert_eq!(
        res.header("ratelimit"),
        None,
        "unmatched requests get no quota headers"
    );
    Ok(())
}

#[test]
fn the_bucket_refills_at_the_configured_rate() -> Result<()> {
    let mut edge =
        edge(r#"{"rules":[{"name":"r","limit":{"requests":2,"window":"1s"}}]}"#).build()?;
    let run = |edge: &mut Edge, n: usize| -> Result<usize> {
        let mut ok = 0;
        for _ in 0..n {
            ok += usize::from(edge.get("/")?.status == 200);
        }
        Ok(ok)
    };
    assert_eq!(run(&mut edge, 5)?, 2);
    edge.advance(Duration::from_millis(499))?;
    assert_eq!(run(&mut edge, 5)?, 0, "half a token is not a token");
    edge.advance(Duration::from_millis(1))?;
    assert_eq!(run(&mut edge, 5)?, 1);
    edge.advance(Duration::from_secs(60))?;
    assert_eq!(run(&mut edge, 5)?, 2, "the bucket holds at most its burst");
    Ok(())
}

#[test]
fn shadow_mode_forwards_everything_marks_what_it_would_limit_and_counts() -> Result<()> {
    let mut edge =
        edge(r#"{"mode":"shadow","rules":[{"name":"s","limit":{"requests":1,"window":"60s"}}]}"#)
            .build()?;
    let first = edge.send(Request::get("/").header("x-ratelimit-shadow", "forged"))?;
    let second = edge.send(Request::get("/"))?;
    assert_eq!((first.status, second.status), (200, 200));
    let seen = edge.upstream_requests();
    assert_eq!(
        seen[0].header("x-ratelimit-shadow"),
        None,
        "a client cannot forge the marker"
    );
    assert_eq!(seen[1].header("x-ratelimit-shadow"), Some("s"));
    assert_eq!(second.header("ratelimit"), None);
    assert_eq!(edge.metric("rate_limit.s.shadow_limited"), Some(1));
    assert_eq!(edge.metric("rate_limit.s.allowed"), Some(1));
    Ok(())
}

#[test]
fn a_configured_status_replaces_429() -> Result<()> {
    let mut edge = edge(
        r#"{"status":503,"rules":[{"name":"a","limit":{"requests":1,"window":"60s"}},
            {"name":"b","match":{"path":"/b"},"status":420,"limit":{"requests":1,"window":"60s"}}]}"#,
    )
    .build()?;
    edge.get("/a")?;
    assert_eq!(edge.get("/a")?.status, 503);
    let mut edge = edge_with_b_only()?;
    edge.get("/b")?;
    assert_eq!(edge.get("/b")?.status, 420);
    Ok(())
}

fn edge_with_b_only() -> Result<Edge> {
    edge(r#"{"rules":[{"name":"b","match":{"path":"/b"},"status":420,"limit":{"requests":1,"window":"60s"}}]}"#)
        .build()
}

#[test]
fn a_flood_of_new_keys_is_bounded_and_the_hot_client_stays_limited() -> Result<()> {
    let mut edge = edge(
        r#"{"rules":[{"name":"ip","key":[{"source":"clientIp"}],
            "limit":{"requests":5,"window":"60s"},"maxKeys":256}]}"#,
    )
    .build()?;
    for _ in 0..5 {
        assert_eq!(
            edge.send(Request::get("/").from("192.0.2.1:1"))?.status,
            200
        );
    }
    for i in 0..5_000u32 {
        let ip = format!("[2001:db8::{:x}:{:x}]:443", i >> 16, i & 0xffff);
        edge.send(Request::get("/").from(&ip))?;
        if i % 500 == 0 {
            let hot = edge.send(Request::get("/").from("192.0.2.1:2"))?;
            assert_eq!(hot.status, 429, "the hot client escaped after {i} new keys");
        }
    }
    let (keys, bytes) = edge.shared_data_usage("");
    // 256 slots, the overflow bucket and the hash seed.
    assert!(keys <= 258, "{keys} shared-data keys");
    assert!(bytes < 258 * 80, "{bytes} bytes");
    Ok(())
}

#[test]
fn ipv6_clients_have_one_bucket_however_the_address_is_written() -> Result<()> {
    let mut edge = edge(
        r#"{"rules":[{"name":"ip","key":[{"source":"clientIp"}],"limit":{"requests":1,"window":"60s"}}]}"#,
    )
    .build()?;
    assert_eq!(
        edge.send(Request::get("/").from("[2001:db8::1]:1000"))?
            .status,
        200
    );
    assert_eq!(
        edge.send(Request::get("/").from("[2001:DB8:0:0::1]:2000"))?
            .status,
        429
    );
    assert_eq!(
        edge.send(Request::get("/").from("[2001:db8::2]:1000"))?
            .status,
        200
    );
    Ok(())
}

#[test]
fn bad_configs_are_rejected_at_load_naming_the_field() {
    for (config, field) in [
        (r#"{"rules":[]}"#, "rules: must list at least one rule"),
        (
            r#"{"rules":[{"name":"a","limit":{"requests":0,"window":"1s"}}]}"#,
            "rules[0].limit.requests:",
        ),
        (
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1 minute"}}]}"#,
            "rules[0].limit.window:",
        ),
        (
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"},"maxKeys":0}]}"#,
            "rules[0].maxKeys:",
        ),
        (
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"},"key":[{"source":"ip"}]}]}"#,
            "rules[0].key[0].source:",
        ),
        (
            r#"{"failureMode":"open","rules":[{"name":"a","limit":{"requests":1,"window":"1s"}}]}"#,
            "failureMode:",
        ),
        (
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"}}],"extra":1}"#,
            "unknown field `extra`",
        ),
        ("", "configuration: missing"),
        ("{not json", "configuration:"),
    ] {
        assert_rejected(edge(config), field);
    }
}

#[test]
fn each_decision_is_logged_at_debug() -> Result<()> {
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&module(), PER_CLIENT).name("rate-limit"))
        .log_level(proxy_wasm_level_debug())
        .build()?;
    edge.send(api("10.1.1.1:4000"))?;
    assert!(
        edge.logged("rate-limit: api-per-client key="),
        "{:?}",
        edge.logs()
    );
    Ok(())
}

fn proxy_wasm_level_debug() -> host_tests::abi::LogLevel {
    host_tests::abi::LogLevel::Debug
}

#[test]
fn failure_mode_allow_serves_and_deny_answers_503_when_the_store_fails() -> Result<()> {
    use host_tests::abi::Status;
    let rule = r#""rules":[{"name":"r","limit":{"requests":1,"window":"60s"}}]"#;
    let mut allow = edge(&format!("{{{rule}}}")).build()?;
    allow.fail_shared_data(Some(Status::InternalFailure));
    for _ in 0..200 {
        assert_eq!(allow.get("/")?.status, 200);
    }
    assert_eq!(allow.metric("rate_limit.r.store_errors"), Some(200));
    // One line per worker per 10 s says it; the log does not grow with the request rate.
    let lines = allow
        .logs()
        .iter()
        .filter(|l| l.message.contains("store failed"))
        .count();
    assert_eq!(lines, 2, "one warning per worker");
    allow.advance(std::time::Duration::from_secs(11))?;
    assert_eq!(allow.get("/")?.status, 200);
    assert!(
        allow.logged("more like it not logged"),
        "the next one counts the rest"
    );
    assert!(!allow.vm_failed(0, 0) && !allow.vm_failed(1, 0), "no trap");
    // The store heals: limiting resumes.
    allow.fail_shared_data(None);
    assert_eq!(allow.get("/")?.status, 200);
    assert_eq!(allow.get("/")?.status, 429);

    let mut deny = edge(&format!(r#"{{"failureMode":"deny",{rule}}}"#)).build()?;
    deny.fail_shared_data(Some(Status::InternalFailure));
    let res = deny.get("/")?;
    assert_eq!(res.status, 503);
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    assert!(deny.upstream_requests().is_empty());
    Ok(())
}

#[test]
fn a_rule_rejecting_a_request_does_not_use_up_the_other_rules_quota() -> Result<()> {
    let mut edge = edge(
        r#"{"rules":[
            {"name":"global","limit":{"requests":3,"window":"60s"}},
            {"name":"per-key","key":[{"header":"x-api-key"}],"limit":{"requests":1,"window":"60s"}}]}"#,
    )
    .build()?;
    let key = |k: &str| Request::get("/").header("x-api-key", k);
    assert_eq!(edge.send(key("a"))?.status, 200);
    for _ in 0..5 {
        let res = edge.send(key("a"))?;
        assert_eq!(res.status, 429);
        let body: serde_json::Value = serde_json::from_slice(&res.body)?;
        assert_eq!(body["violated-policies"], serde_json::json!(["per-key"]));
    }
    assert_eq!(edge.send(key("b"))?.status, 200);
    assert_eq!(edge.send(key("c"))?.status, 200);
    let res = edge.send(key("d"))?;
    assert_eq!(res.status, 429);
    assert_eq!(
        res.header("ratelimit"),
        Some("\"global\";r=0;t=20, \"per-key\";r=1;t=0")
    );
    Ok(())
}

#[test]
fn binary_header_values_are_keys_like_any_other_and_never_trap() -> Result<()> {
    let mut edge = edge(PER_CLIENT).build()?;
    let odd = |v: &[u8]| {
        Request::get("/api/orders")
            .from("10.1.1.1:4000")
            .header_bytes(b"x-api-key", v)
    };
    let mut statuses = Vec::new();
    for _ in 0..21 {
        statuses.push(edge.send(odd(b"\xff\xfe\x00k"))?.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert_eq!(statuses.last(), Some(&429));
    // Another binary key is another client.
    assert_eq!(edge.send(odd(b"\xff\xfd"))?.status, 200);
    assert!(!edge.vm_failed(0, 0) && !edge.vm_failed(1, 0));
    Ok(())
}

/// Envoy calls into the VM only for exported callbacks, and each call costs about 1 µs: the
/// shipped module exports just those the limiter uses (build.sh trims the rest).
#[test]
fn a_request_crosses_into_the_vm_only_where_the_limiter_acts() -> Result<()> {
    let mut edge = edge(PER_CLIENT).build()?;
    let calls = |e: &Edge| -> std::collections::BTreeMap<&'static str, u64> {
        e.costs(0).into_iter().map(|(k, c)| (k, c.calls)).collect()
    };
    let before = calls(&edge);
    let res = edge.send(api("10.1.1.2:4000").body("{}"))?;
    assert_eq!(res.status, 200);
    assert!(
        res.header("ratelimit").is_some(),
        "response headers still set"
    );
    let after = calls(&edge);
    let crossed: Vec<&str> = after
        .iter()
        .filter(|(k, n)| before.get(*k) != Some(*n))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(
        crossed,
        [
            "proxy_on_context_create",
            "proxy_on_delete",
            "proxy_on_request_headers",
            "proxy_on_response_headers"
        ]
    );
    Ok(())
}

#[test]
fn a_limited_request_whose_reply_the_host_refuses_is_held_not_forwarded() -> Result<()> {
    let mut edge =
        edge(r#"{"rules":[{"name":"one","limit":{"requests":1,"window":"1h"}}]}"#).build()?;
    assert_eq!(edge.send(Request::get("/a"))?.status, 200);
    edge.fail_local_replies(Some(host_tests::abi::Status::InternalFailure));
    let held = edge.send(Request::get("/a"));
    let err = held.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("stalled"), "the request was answered: {err}");
    assert_eq!(edge.upstream_requests().len(), 1, "it reached the upstream");
    Ok(())
}
