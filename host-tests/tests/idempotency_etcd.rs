//! dist/idempotency.wasm with `store.etcd`, offline: the `etcd` cluster answers with scripted
//! replies to the plugin's `/v3/kv/txn` and `/v3/lease/grant` requests (kept in a table of
//! the keys it was sent, so later replies return earlier records as etcd would), with faults
//! injected per request: lost replies, error statuses, timeouts, malformed JSON. Real etcd
//! runs in envoy/e2e/tests/idempotency_etcd.rs.
mod common;
use anyhow::Result;
use common::assert_rejected;
use host_tests::{
    CalloutReply, CalloutRequest, Edge, EdgeBuilder, Module, Plugin, Request, Upstream,
};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

fn module() -> Module {
    common::plugin_module("idempotency")
}

const FLEET: &str = r#"{"routes":[{"pathPrefix":"/payments"}],"required":true,
    "ttl":"1h","inFlightTimeout":"30s",
    "store":{"etcd":{"cluster":"etcd","timeout":"500ms","retries":1}}}"#;

/// What the scripted etcd does with one request.
#[derive(Clone, Debug)]
enum Fault {
    /// Applies it and answers.
    None,
    /// Applies it, but the answer is lost (the callout times out).
    LostReply,
    /// Does not apply it and never answers.
    Hang,
    /// Answers this status and body without applying it.
    Answer(u16, &'static str),
}

/// etcd's key-value table as the plugin's requests leave it: key (base64) → value
/// (base64), create and mod revisions.
#[derive(Default)]
struct Kv {
    keys: BTreeMap<String, (String, i64, i64)>,
    revision: i64,
    leases: i64,
    faults: VecDeque<Fault>,
    /// Leases up to this id are gone (as after a restore from a backup).
    revoked_upto: i64,
    /// The paths of the requests received, in order.
    seen: Vec<String>,
}

fn revision(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

impl Kv {
    fn header(&self) -> Value {
        json!({"cluster_id": "1", "member_id": "2", "revision": self.revision.to_string(), "raft_term": "2"})
    }

    fn range(&self, key: &str) -> Value {
        match self.keys.get(key) {
            Some((value, create, modr)) => json!({"response_range": {"header": self.header(),
                "kvs": [{"key": key, "create_revision": create.to_string(),
                "mod_revision": modr.to_string(), "version": "1", "value": value}], "count": "1"}}),
            None => json!({"response_range": {"header": self.header()}}),
        }
    }

    fn txn(&mut self, body: &Value) -> Value {
        let c = &body["compare"][0];
        let key = c["key"].as_str().unwrap_or_default().to_string();
        let current = self.keys.get(&key);
        let holds = match c["target"].as_str() {
            Some("CREATE") => current.is_none() && revision(&c["create_revision"]) == 0,
            Some("MOD") => current.is_some_and(|(_, _, m)| *m == revision(&c["mod_revision"])),
            other => panic!("compare target {other:?}"),
        };
        if !holds {
            return json!({"header": self.header(), "responses": [self.range(&key)]});
        }
        let op = &body["success"][0];
        if let Some(put) = op.get("request_put") {
            assert!(
                revision(&put["lease"]) > 0,
                "every record has a lease: {put}"
            );
            self.revision += 1;
            let create = current.map_or(self.revision, |(_, c, _)| *c);
            let value = put["value"].as_str().unwrap_or_default().to_string();
            self.keys.insert(key, (value, create, self.revision));
        } else if op.get("request_delete_range").is_some() {
            self.revision += 1;
            self.keys.remove(&key);
        }
        json!({"header": self.header(), "succeeded": true, "responses": [{}]})
    }

    fn handle(&mut self, req: &CalloutRequest) -> CalloutReply {
        let path = req.header(":path").unwrap_or_default().to_string();
        assert_eq!(req.header(":method"), Some("POST"));
        assert_eq!(req.timeout, Some(Duration::from_millis(500)));
        self.seen.push(path.clone());
        // Faults are scripted for transactions; lease grants (whose timing the ticks decide)
        // are answered.
        let fault = if path == "/v3/kv/txn" {
            self.faults.pop_front().unwrap_or(Fault::None)
        } else {
            Fault::None
        };
        let body: Value = serde_json::from_slice(&req.body).expect("a JSON request");
        let answer = |v: Value| {
            CalloutReply::ok(200, &[("content-type", "application/json")], v.to_string())
        };
        match fault {
            Fault::Hang => return CalloutReply::Hang,
            Fault::Answer(status, text) => return CalloutReply::ok(status, &[], text),
            Fault::None | Fault::LostReply => {}
        }
        let reply = match path.as_str() {
            "/v3/lease/grant" => {
                self.leases += 1;
                answer(
                    json!({"header": self.header(), "ID": (7_000 + self.leases).to_string(), "TTL": body["TTL"]}),
                )
            }
            "/v3/kv/txn" => {
                let lease = revision(&body["success"][0]["request_put"]["lease"]);
                if lease != 0 && lease <= self.revoked_upto {
                    return CalloutReply::ok(
                        404,
                        &[("content-type", "application/json")],
                        r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
                    );
                }
                answer(self.txn(&body))
            }
            other => panic!("unexpected etcd path {other}"),
        };
        if matches!(fault, Fault::LostReply) {
            CalloutReply::Hang
        } else {
            reply
        }
    }

    fn txns(&self) -> usize {
        self.seen.iter().filter(|p| *p == "/v3/kv/txn").count()
    }
}

fn edge(config: &str) -> (EdgeBuilder, Rc<RefCell<Kv>>) {
    let kv = Rc::new(RefCell::new(Kv::default()));
    let etcd = Rc::clone(&kv);
    let made = Rc::new(RefCell::new(0u32));
    let b = Edge::builder()
        .plugin(Plugin::new(&module(), config).name("idempotency"))
        .workers(2)
        .cluster("etcd", move |req| etcd.borrow_mut().handle(req))
        .upstream(move |req| {
            *made.borrow_mut() += 1;
            let n = *made.borrow();
            Upstream::status(201)
                .header("content-type", "application/json")
                .header("x-payment-id", &format!("pay_{n}"))
                .chunks(vec![
                    format!("{{\"id\":\"pay_{n}\",").into_bytes(),
                    format!("\"bytes\":{}}}", req.body.len()).into_bytes(),
                ])
        });
    (b, kv)
}

fn pay(key: &str, body: &str) -> Request {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header("authorization", "Bearer alice")
        .header("content-type", "application/json")
        .body(body.as_bytes().to_vec())
}

fn problem_type(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["type"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_key_runs_once_then_replays_from_the_record_etcd_returns() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    let first = edge.send(pay("k1", "{\"amount\":10}").worker(0))?;
    assert_eq!(first.status, 201);
    // A claim and a completion, each one transaction (the leases came from the ticks).
    assert_eq!(kv.borrow().txns(), 2);
    let again = edge.send(pay("k1", "{\"amount\":10}").worker(1))?;
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body, "byte for byte");
    assert_eq!(again.header("x-payment-id"), Some("pay_1"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let other = edge.send(pay("k1", "{\"amount\":99}"))?;
    assert_eq!(other.status, 422);
    assert_eq!(
        problem_type(other.body_str()),
        "urn:edge-plugins:idempotency:key-reused"
    );
    assert_eq!(edge.upstream_requests().len(), 1);
    assert_eq!(edge.metric("idempotency.forwarded"), Some(1));
    assert_eq!(edge.metric("idempotency.stored"), Some(1));
    assert_eq!(edge.metric("idempotency.replayed"), Some(1));
    Ok(())
}

#[test]
fn a_key_in_flight_gets_409_from_the_headers_on_the_other_worker() -> Result<()> {
    let (b, _kv) = edge(FLEET);
    let mut edge = b.build()?;
    let a = edge.begin(pay("k1", "{}").worker(0))?;
    run_until_upstream(&mut edge, a)?;
    let b = edge.begin(pay("k1", "{\"other\":1}").worker(1))?;
    let dup = answered_from_headers(&mut edge, b)?;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.header("retry-after"), Some("1"));
    assert_eq!(
        problem_type(dup.body_str()),
        "urn:edge-plugins:idempotency:request-in-flight"
    );
    assert_eq!(edge.finish(a)?.status, 201);
    assert_eq!(edge.upstream_requests().len(), 1);
    Ok(())
}

#[test]
fn a_lost_claim_reply_sent_again_finds_its_own_record_and_goes_on() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    edge.advance(Duration::from_millis(10))?;
    kv.borrow_mut().faults.push_back(Fault::LostReply);
    let t0 = edge.now_ns();
    let r = edge.send(pay("k1", "{}"))?;
    assert_eq!(r.status, 201, "{}", r.body_str());
    assert_eq!(
        edge.upstream_requests().len(),
        1,
        "never a second execution"
    );
    assert!(
        edge.now_ns() - t0 >= 500_000_000,
        "the first attempt timed out"
    );
    assert_eq!(edge.metric("idempotency.store_timeouts"), Some(1));
    assert_eq!(edge.metric("idempotency.store_retries"), Some(1));
    assert_eq!(edge.metric("idempotency.conflict_409"), Some(0));
    // The record is complete: a duplicate replays.
    assert_eq!(
        edge.send(pay("k1", "{}"))?.header("idempotent-replayed"),
        Some("true")
    );
    Ok(())
}

#[test]
fn a_hung_etcd_gets_503_after_one_plus_retries_timeouts_and_nothing_is_forwarded() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    edge.advance(Duration::from_millis(10))?;
    kv.borrow_mut().faults.extend([Fault::Hang, Fault::Hang]);
    let t0 = edge.now_ns();
    let r = edge.send(pay("k1", "{}"))?;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        problem_type(r.body_str()),
        "urn:edge-plugins:idempotency:store-unavailable"
    );
    assert_eq!(edge.now_ns() - t0, 1_000_000_000, "(1 + 1) × 500 ms");
    assert!(edge.upstream_requests().is_empty());
    assert_eq!(edge.metric("idempotency.store_timeouts"), Some(2));
    assert_eq!(edge.metric("idempotency.unavailable_503"), Some(1));
    // Recovered: the next request runs.
    assert_eq!(edge.send(pay("k2", "{}"))?.status, 201);
    Ok(())
}

#[test]
fn error_statuses_and_malformed_answers_are_retried_then_fail_closed() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    edge.advance(Duration::from_millis(10))?;
    kv.borrow_mut().faults.extend([
        Fault::Answer(
            503,
            "upstream connect error or disconnect/reset before headers",
        ),
        Fault::Answer(200, "<html>bad gateway</html>"),
    ]);
    let r = edge.send(pay("k1", "{}"))?;
    assert_eq!(r.status, 503);
    assert_eq!(edge.metric("idempotency.store_errors"), Some(2));
    assert!(edge.upstream_requests().is_empty());
    // One failure, then an answer: the retry serves it.
    kv.borrow_mut().faults.push_back(Fault::Answer(
        500,
        r#"{"error":"etcdserver: leader changed","code":14}"#,
    ));
    assert_eq!(edge.send(pay("k2", "{}"))?.status, 201);
    // A refusal that would be refused again is not retried.
    let before = kv.borrow().txns();
    kv.borrow_mut().faults.push_back(Fault::Answer(
        400,
        r#"{"error":"etcdserver: request is too large","code":3}"#,
    ));
    assert_eq!(edge.send(pay("k3", "{}"))?.status, 503);
    assert_eq!(kv.borrow().txns(), before + 1);
    Ok(())
}

#[test]
fn fail_open_forwards_unguarded_and_counts_it() -> Result<()> {
    let open = FLEET.replace(r#""retries":1"#, r#""retries":0,"failureMode":"open""#);
    let (b, kv) = edge(&open);
    let mut edge = b.build()?;
    edge.advance(Duration::from_millis(10))?;
    kv.borrow_mut().faults.push_back(Fault::Hang);
    let r = edge.send(pay("k1", "{}"))?;
    assert_eq!(r.status, 201);
    assert_eq!(edge.upstream_requests().len(), 1);
    assert_eq!(edge.metric("idempotency.unguarded"), Some(1));
    assert!(edge.logged("forwarded without a record"));
    Ok(())
}

#[test]
fn a_5xx_releases_the_key_and_a_keyless_request_makes_no_call() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    edge.advance(Duration::from_millis(10))?;
    let calls = kv.borrow().seen.len();
    assert_eq!(edge.get("/payments")?.status, 201);
    let other = edge.send(Request::post("/other").body(b"{}".to_vec()))?;
    assert_eq!(other.status, 201);
    assert_eq!(edge.upstream_requests().len(), 2);
    assert_eq!(
        kv.borrow().seen.len(),
        calls,
        "requests without a key pay nothing"
    );
    edge.set_upstream(|_| Upstream::status(503).body("busy"));
    assert_eq!(edge.send(pay("k1", "{}"))?.status, 503);
    assert!(kv.borrow().keys.is_empty(), "released");
    assert_eq!(edge.metric("idempotency.released"), Some(1));
    edge.set_upstream(|_| Upstream::status(201).body("ok"));
    let retry = edge.send(pay("k1", "{}"))?;
    assert_eq!(
        (retry.status, retry.header("idempotent-replayed")),
        (201, None)
    );
    Ok(())
}

#[test]
fn a_response_too_large_to_keep_is_recorded_without_it_and_gets_409() -> Result<()> {
    let small = FLEET.replace(r#""ttl":"1h""#, r#""ttl":"1h","maxBodyBytes":16"#);
    let (b, _kv) = edge(&small);
    let mut edge = b.build()?;
    edge.set_upstream(|_| Upstream::status(200).body(vec![b'x'; 64]));
    assert_eq!(edge.send(pay("k1", "{}"))?.status, 200);
    let dup = edge.send(pay("k1", "{}"))?;
    assert_eq!(dup.status, 409);
    assert_eq!(
        problem_type(dup.body_str()),
        "urn:edge-plugins:idempotency:response-not-kept"
    );
    Ok(())
}

#[test]
fn leases_are_granted_per_interval_not_per_request() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    edge.advance(Duration::from_millis(10))?;
    for i in 0..10 {
        assert_eq!(edge.send(pay(&format!("k{i}"), "{}"))?.status, 201);
    }
    let grants = kv
        .borrow()
        .seen
        .iter()
        .filter(|p| *p == "/v3/lease/grant")
        .count();
    // One claim lease per VM (main thread and two workers) and a record lease per worker.
    assert!((1..=5).contains(&grants), "{grants} grants for 10 requests");
    assert_eq!(kv.borrow().txns(), 20, "one claim and one completion each");
    Ok(())
}

#[test]
fn bad_store_options_are_refused_naming_the_field() {
    for (config, field) in [
        (r#"{"store":{"etcd":{}}}"#, "store.etcd.cluster"),
        (
            r#"{"store":{"etcd":{"cluster":"etcd","timeout":"2m"}}}"#,
            "store.etcd.timeout",
        ),
        (
            r#"{"store":{"etcd":{"cluster":"etcd","retries":-1}}}"#,
            "store.etcd.retries",
        ),
        (
            r#"{"store":{"etcd":{"cluster":"etcd","failureMode":"sometimes"}}}"#,
            "store.etcd.failureMode",
        ),
        (r#"{"store":{"consul":{}}}"#, "store"),
    ] {
        let b = Edge::builder().plugin(Plugin::new(&module(), config).name("idempotency"));
        assert_rejected(b, field);
    }
}

/// The callbacks a stream runs until it ends.
fn callbacks_to_end(
    edge: &mut Edge,
    id: host_tests::FlightId,
) -> Result<Vec<host_tests::Callback>> {
    let mut ran = Vec::new();
    for _ in 0..100 {
        match edge.step(id)? {
            host_tests::Step::Ran(c) => ran.push(c),
            host_tests::Step::Waiting => edge.advance(Duration::from_millis(1))?,
            host_tests::Step::Done => break,
        }
    }
    Ok(ran)
}

#[test]
fn with_the_local_store_too_a_key_in_flight_gets_409_before_its_body_is_read() -> Result<()> {
    let local = r#"{"routes":[{"pathPrefix":"/payments"}],"required":true}"#;
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&module(), local).name("idempotency"))
        .workers(2)
        .upstream(|_| Upstream::status(201).body("ok"))
        .build()?;
    let a = edge.begin(pay("k1", "{}").worker(0))?;
    run_until_upstream(&mut edge, a)?;
    let b = edge.begin(pay("k1", "{}").worker(1))?;
    let dup = answered_from_headers(&mut edge, b)?;
    assert_eq!(dup.status, 409);
    assert_eq!(
        problem_type(dup.body_str()),
        "urn:edge-plugins:idempotency:request-in-flight"
    );
    assert_eq!(edge.finish(a)?.status, 201);
    assert_eq!(edge.upstream_requests().len(), 1);
    Ok(())
}

#[test]
fn a_lease_etcd_no_longer_knows_is_replaced_and_the_claim_sent_again() -> Result<()> {
    let (b, kv) = edge(FLEET);
    let mut edge = b.build()?;
    assert_eq!(edge.send(pay("k0", "{}").worker(0))?.status, 201);
    // etcd restored from a backup: every lease granted so far is gone.
    {
        let mut kv = kv.borrow_mut();
        kv.revoked_upto = 7_000 + kv.leases;
    }
    let txns = kv.borrow().txns();
    let r = edge.send(pay("k1", "{}").worker(0))?;
    assert_eq!(r.status, 201, "{}", r.body_str());
    // Both leases (claims' and records') were gone: each write is refused once, then sent
    // again under a new lease.
    assert_eq!(kv.borrow().txns(), txns + 4);
    assert_eq!(edge.upstream_requests().len(), 2);
    assert_eq!(edge.metric("idempotency.store_retries"), Some(2));
    assert_eq!(
        edge.send(pay("k1", "{}"))?.header("idempotent-replayed"),
        Some("true")
    );
    Ok(())
}

/// Runs stream `a` until its request has reached the upstream stage (its claim is in flight).
fn run_until_upstream(edge: &mut Edge, a: host_tests::FlightId) -> Result<()> {
    while edge.upstream_requests().is_empty() {
        if !matches!(edge.step(a)?, host_tests::Step::Ran(_)) {
            edge.advance(Duration::from_millis(1))?;
        }
    }
    Ok(())
}

/// Runs the duplicate `b` to its answer, which must come from its headers: no body callback.
fn answered_from_headers(edge: &mut Edge, b: host_tests::FlightId) -> Result<host_tests::Response> {
    let ran = callbacks_to_end(edge, b)?;
    assert!(
        !ran.contains(&host_tests::Callback::RequestBody),
        "answered from the headers: {ran:?}"
    );
    edge.finish(b)
}
