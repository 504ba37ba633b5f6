//! Global rules of dist/rate_limit.wasm against a scripted rate limit service (a gRPC cluster
//! of the harness answering `ShouldRateLimit`): what the service is asked, what its answers
//! make of a request, the per-VM deny cache, and each failure mode while it fails.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::plugin_module;
use host_tests::{Edge, GrpcReply, Plugin, Request, Upstream};
use prost::Message;
use rate_limit::global::{
    DescriptorStatus, ProtoDuration, RateLimit, RateLimitRequest, RateLimitResponse,
};

/// One rule: 5 per minute per `x-api-key` in this proxy, and the service (cluster `ratelimit`,
/// domain `edge`) for the fleet.
fn config(failure_mode: &str) -> String {
    format!(
        r#"{{"rules":[{{"name":"per-key","match":{{"pathPrefix":"/api/"}},
            "key":[{{"header":"x-api-key"}}],"limit":{{"requests":5,"window":"1m"}},
            "global":{{"cluster":"ratelimit","domain":"edge","timeout":"50ms",
                       "failureMode":"{failure_mode}"}}}}]}}"#
    )
}

fn edge(
    failure_mode: &str,
    service: impl FnMut(&host_tests::GrpcRequest) -> GrpcReply + 'static,
) -> Result<Edge> {
    Edge::builder()
        .plugin(Plugin::new(
            &plugin_module("rate_limit"),
            config(failure_mode),
        ))
        .workers(1)
        .grpc_cluster("ratelimit", service)
        .upstream(|_| Upstream::ok("hello"))
        .build()
}

/// An answer as envoyproxy/ratelimit sends it: code (1 OK, 2 OVER_LIMIT), a minute's limit,
/// what remains and the seconds to the window's end.
fn answer(code: i32, limit: u32, remaining: u32, reset: i64) -> GrpcReply {
    GrpcReply::ok(
        RateLimitResponse {
            overall_code: code,
            statuses: vec![DescriptorStatus {
                code,
                current_limit: Some(RateLimit {
                    requests_per_unit: limit,
                    unit: 2,
                    name: String::new(),
                }),
                limit_remaining: remaining,
                duration_until_reset: Some(ProtoDuration {
                    seconds: reset,
                    nanos: 0,
                }),
            }],
        }
        .encode_to_vec(),
    )
}

fn api(key: &str) -> Request {
    Request::get("/api/orders").header("x-api-key", key)
}

#[test]
fn the_service_is_asked_with_the_rules_descriptor_and_its_quota_reaches_the_client() -> Result<()> {
    let mut edge = edge("local", |_| answer(1, 100, 42, 30))?;
    let res = edge.send(api("k1"))?;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("ratelimit-policy"),
        Some("\"per-key\";q=100;w=60")
    );
    assert_eq!(res.header("ratelimit"), Some("\"per-key\";r=42;t=30"));
    let sent = edge.grpc_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].cluster, "ratelimit");
    assert_eq!(
        (sent[0].service.as_str(), sent[0].method.as_str()),
        (
            "envoy.service.ratelimit.v3.RateLimitService",
            "ShouldRateLimit"
        )
    );
    let asked = RateLimitRequest::decode(sent[0].message.as_slice())?;
    assert_eq!(asked.domain, "edge");
    assert_eq!(asked.hits_addend, 1);
    let entries: Vec<(&str, &str)> = asked.descriptors[0]
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(entries, [("rule", "per-key"), ("x-api-key", "k1")]);
    assert_eq!(edge.metric("rate_limit.per-key.global_checked"), Some(1));
    // A request no rule matches asks nothing.
    edge.send(Request::get("/health"))?;
    assert_eq!(edge.grpc_sent().len(), 1);
    Ok(())
}

#[test]
fn a_client_the_service_limits_gets_429_and_is_remembered_until_the_reset() -> Result<()> {
    let mut edge = edge("local", |_| answer(2, 100, 0, 30))?;
    let res = edge.send(api("k1"))?;
    assert_eq!(res.status, 429);
    assert_eq!(res.header("retry-after"), Some("30"));
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    assert_eq!(res.header("ratelimit"), Some("\"per-key\";r=0;t=30"));
    assert!(edge.upstream_requests().is_empty());
    // The same client again: answered from this VM's memory, no call.
    edge.advance(Duration::from_secs(10))?;
    let again = edge.send(api("k1"))?;
    assert_eq!(again.status, 429);
    assert_eq!(again.header("retry-after"), Some("20"));
    assert_eq!(edge.grpc_sent().len(), 1);
    assert_eq!(edge.metric("rate_limit.per-key.deny_cache_hits"), Some(1));
    assert_eq!(edge.metric("rate_limit.per-key.global_over_limit"), Some(1));
    // Another client is asked about.
    edge.send(api("k2"))?;
    assert_eq!(edge.grpc_sent().len(), 2);
    // After the reset the client is asked about again.
    edge.advance(Duration::from_secs(21))?;
    edge.send(api("k1"))?;
    assert_eq!(edge.grpc_sent().len(), 3);
    Ok(())
}

#[test]
fn an_answer_without_statuses_limits_with_the_rules_window() -> Result<()> {
    // Limitador answers OVER_LIMIT without DescriptorStatus.
    let bare = RateLimitResponse {
        overall_code: 2,
        statuses: Vec::new(),
    };
    let mut edge = edge("local", move |_| GrpcReply::ok(bare.encode_to_vec()))?;
    let res = edge.send(api("k1"))?;
    assert_eq!(res.status, 429);
    assert_eq!(res.header("retry-after"), Some("60"));
    Ok(())
}

#[test]
fn a_client_over_the_limit_in_this_proxy_costs_no_call() -> Result<()> {
    let mut edge = edge("local", |_| answer(1, 100, 99, 30))?;
    for _ in 0..5 {
        assert_eq!(edge.send(api("k1"))?.status, 200);
    }
    assert_eq!(edge.send(api("k1"))?.status, 429);
    assert_eq!(edge.grpc_sent().len(), 5);
    Ok(())
}

#[test]
fn each_failure_mode_applies_while_the_service_fails() -> Result<()> {
    // local: this proxy's bucket decides: 5 pass, the 6th is limited.
    let mut local = edge("local", |_| GrpcReply::error(14, "upstream connect error"))?;
    let statuses: Vec<u16> = (0..6)
        .map(|_| local.send(api("k1")).map(|r| r.status))
        .collect::<Result<_>>()?;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    assert_eq!(local.metric("rate_limit.per-key.global_errors"), Some(5));
    assert!(local.logged("rate limit service failed"));

    // open: the outage limits nothing (the local tokens are given back).
    let mut open = edge("open", |_| GrpcReply::error(13, "internal"))?;
    for _ in 0..8 {
        assert_eq!(open.send(api("k1"))?.status, 200);
    }

    // closed: 503, nothing reaches the application.
    let mut closed = edge("closed", |_| GrpcReply::error(14, "upstream connect error"))?;
    let res = closed.send(api("k1"))?;
    assert_eq!(res.status, 503);
    assert!(closed.upstream_requests().is_empty());
    Ok(())
}

#[test]
fn a_slow_service_is_a_timeout_and_a_garbage_answer_an_error() -> Result<()> {
    // The rule's timeout is 50 ms; an answer after it is Envoy's timeout (14, "upstream
    // request timeout"), counted as such, and `local` decides.
    let mut slow = edge("local", |_| GrpcReply {
        delay: Duration::from_millis(200),
        ..answer(2, 100, 0, 30)
    })?;
    let id = slow.begin(api("k1"))?;
    slow.advance(Duration::from_millis(100))?;
    let res = slow.finish(id)?;
    assert_eq!(res.status, 200, "the late OVER_LIMIT is not used");
    assert_eq!(slow.metric("rate_limit.per-key.global_timeouts"), Some(1));

    let mut garbage = edge("closed", |_| GrpcReply::ok(vec![0xff, 0xff, 0xff]))?;
    assert_eq!(garbage.send(api("k1"))?.status, 503);
    assert_eq!(garbage.metric("rate_limit.per-key.global_errors"), Some(1));
    Ok(())
}

#[test]
fn a_bad_global_part_is_refused_naming_the_field() {
    for (global, field) in [
        (r#"{"domain":"edge"}"#, "rules[0].global.cluster"),
        (
            r#"{"cluster":"c","domain":"edge","timeout":"1m"}"#,
            "rules[0].global.timeout",
        ),
        (
            r#"{"cluster":"c","domain":"edge","failureMode":"deny"}"#,
            "rules[0].global.failureMode",
        ),
    ] {
        let config = format!(
            r#"{{"rules":[{{"name":"r","key":[],"limit":{{"requests":1,"window":"1s"}},"global":{global}}}]}}"#
        );
        common::assert_rejected(
            Edge::builder().plugin(Plugin::new(&plugin_module("rate_limit"), config)),
            field,
        );
    }
}

#[test]
fn checking_every_request_with_the_service_holds_the_vm_memory_steady() -> Result<()> {
    // Every request here is one gRPC call. The module once kept each call's token for the
    // VM's life (4 bytes a request); tens of thousands of calls would show it in pages.
    let config = r#"{"rules":[{"name":"per-key","match":{"pathPrefix":"/api/"},
        "key":[{"header":"x-api-key"}],"limit":{"requests":1000000000,"window":"1s"},
        "global":{"cluster":"ratelimit","domain":"edge","timeout":"50ms"}}]}"#;
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&plugin_module("rate_limit"), config))
        .workers(1)
        .grpc_cluster("ratelimit", |_| answer(1, 1_000_000, 999_999, 30))
        .upstream(|_| Upstream::ok("hello"))
        .build()?;
    for _ in 0..2_000 {
        assert_eq!(edge.send(api("k1"))?.status, 200);
    }
    let warm = edge.memory_pages(0, 0);
    for _ in 0..40_000 {
        edge.send(api("k1"))?;
    }
    assert_eq!(
        edge.grpc_sent().len(),
        42_000,
        "every request asked the service"
    );
    assert_eq!(
        edge.memory_pages(0, 0),
        warm,
        "pages after 2,000 and after 42,000 checks"
    );
    Ok(())
}
