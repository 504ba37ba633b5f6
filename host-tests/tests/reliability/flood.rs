//! Floods: `n` distinct client keys, URLs or idempotency keys against each stateful plugin on 2
//! workers. Shared data (keys and bytes) must stay within what the configuration bounds, sampled
//! throughout, and a hot client must stay limited throughout.

use std::time::Instant;

use host_tests::{Edge, Request, Upstream};

use crate::two_workers;

/// Highest shared-data use seen, sampled every `every` requests.
struct Peak {
    keys: usize,
    bytes: usize,
}

impl Peak {
    fn sample(&mut self, edge: &Edge) {
        let (keys, bytes) = edge.shared_data_usage("");
        self.keys = self.keys.max(keys);
        self.bytes = self.bytes.max(bytes);
    }
}

fn report(
    plugin: &str,
    n: u64,
    peak: &Peak,
    started: Instant,
    bound_keys: usize,
    bound_bytes: usize,
) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "flood {plugin:<16} {n:>8} distinct keys in {secs:.1}s ({:.0} requests/s): peak {} shared-data keys (bound {bound_keys}), {} bytes (bound {bound_bytes})",
        n as f64 / secs.max(1e-9),
        peak.keys,
        peak.bytes
    );
    assert!(
        peak.keys <= bound_keys,
        "{plugin}: {} keys > {bound_keys}",
        peak.keys
    );
    assert!(
        peak.bytes <= bound_bytes,
        "{plugin}: {} bytes > {bound_bytes}",
        peak.bytes
    );
}

/// One rule, `maxKeys` 1,000 buckets of about 80 bytes: at most 1,000 slots plus the seed, and
/// the hot client (every 10th request) gets its 5 requests and then only 429s.
pub fn rate_limit(n: u64) {
    const MAX_KEYS: usize = 1000;
    let config = format!(
        r#"{{"rules":[{{"name":"api","match":{{"pathPrefix":"/"}},"key":[{{"header":"x-api-key"}}],"limit":{{"requests":5,"window":"1h"}},"maxKeys":{MAX_KEYS}}}]}}"#
    );
    let mut edge = two_workers("rate_limit", config, |_| Upstream::ok("ok"));
    let started = Instant::now();
    let mut peak = Peak { keys: 0, bytes: 0 };
    let mut hot_admitted = 0;
    for i in 0..n {
        let res = edge
            .send(Request::get("/api/x").header("x-api-key", &format!("flood-{i}")))
            .expect("a flood request");
        assert!(matches!(res.status, 200 | 429), "status {}", res.status);
        if i % 10 == 0 {
            let hot = edge
                .send(Request::get("/api/x").header("x-api-key", "hot"))
                .expect("a hot request");
            if hot.status == 200 {
                hot_admitted += 1;
            }
            assert!(
                hot_admitted <= 5,
                "the hot client was admitted {hot_admitted} times by request {i}"
            );
        }
        if i % 100 == 0 {
            peak.sample(&edge);
            edge.clear_records();
        }
    }
    peak.sample(&edge);
    assert_eq!(hot_admitted, 5, "the hot client's first 5 requests pass");
    report(
        "rate_limit",
        n,
        &peak,
        started,
        MAX_KEYS + 2,
        (MAX_KEYS + 2) * 160,
    );
}

/// `maxEntries` 1,000 records and `maxTotalBytes` 256 KiB: at most 2 × 1,000 + 2 keys, and the
/// kept responses within the byte budget plus the index slots.
pub fn idempotency(n: u64) {
    const MAX_ENTRIES: usize = 1000;
    const MAX_BYTES: usize = 256 * 1024;
    let config = format!(
        r#"{{"routes":[{{"pathPrefix":"/pay"}}],"header":"idempotency-key","scope":[],"maxEntries":{MAX_ENTRIES},"maxTotalBytes":{MAX_BYTES},"maxBodyBytes":4096}}"#
    );
    let body = "r".repeat(700);
    let mut edge = two_workers("idempotency", config, move |_| Upstream::ok(body.clone()));
    let started = Instant::now();
    let mut peak = Peak { keys: 0, bytes: 0 };
    for i in 0..n {
        let res = edge
            .send(
                Request::post("/pay")
                    .header("idempotency-key", &format!("key-{i}"))
                    .body("{\"amount\":1}"),
            )
            .expect("a flood request");
        assert_eq!(res.status, 200, "{}", res.body_str());
        if i % 100 == 0 {
            peak.sample(&edge);
            edge.clear_records();
        }
    }
    peak.sample(&edge);
    // Still working after the flood: the newest key replays instead of running again.
    let replay = edge
        .send(
            Request::post("/pay")
                .header("idempotency-key", &format!("key-{}", n - 1))
                .body("{\"amount\":1}"),
        )
        .expect("a replay");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // The kept answers fill the byte budget rather than staying far below it; index slots
    // add a small record (state, times, fingerprint) each.
    assert!(
        peak.bytes >= MAX_BYTES * 9 / 10,
        "only {} bytes kept",
        peak.bytes
    );
    report(
        "idempotency",
        n,
        &peak,
        started,
        2 * MAX_ENTRIES + 2,
        MAX_BYTES + MAX_ENTRIES * 100,
    );
}

/// `maxEntries` 1,000 and `maxTotalBytes` 256 KiB of answers, whatever the number of URLs.
pub fn cached_fallback(n: u64) {
    const MAX_ENTRIES: usize = 1000;
    const MAX_BYTES: usize = 256 * 1024;
    let config = format!(
        r#"{{"routes":[{{"pathPrefix":"/api/"}}],"maxEntries":{MAX_ENTRIES},"maxTotalBytes":{MAX_BYTES},"maxBodyBytes":4096}}"#
    );
    let body = "c".repeat(700);
    let mut edge = two_workers("cached_fallback", config, move |_| {
        Upstream::ok(body.clone()).header("cache-control", "max-age=60")
    });
    let started = Instant::now();
    let mut peak = Peak { keys: 0, bytes: 0 };
    for i in 0..n {
        let res = edge
            .send(Request::get(&format!("/api/item/{i}")))
            .expect("a flood request");
        assert_eq!(res.status, 200);
        if i % 100 == 0 {
            peak.sample(&edge);
            edge.clear_records();
        }
    }
    peak.sample(&edge);
    // The latest answers are still served from the store when the application fails.
    edge.set_upstream(|_| Upstream::status(503));
    let last = edge
        .send(Request::get(&format!("/api/item/{}", n - 1)))
        .expect("a request");
    assert_eq!(last.status, 200, "the newest answer survives the flood");
    assert!(
        peak.bytes >= MAX_BYTES * 9 / 10,
        "only {} bytes kept",
        peak.bytes
    );
    report(
        "cached_fallback",
        n,
        &peak,
        started,
        2 * MAX_ENTRIES + 3,
        MAX_BYTES + MAX_ENTRIES * 100,
    );
}
