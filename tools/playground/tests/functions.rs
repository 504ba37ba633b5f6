//! The engine's functions as the page calls them: JSON text in, JSON text out, and an answer
//! (never a trap) for any input.

// A failed assertion, or an unwrap or index below, is how a test fails.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use serde_json::{json, Value};

fn call(f: fn(&str) -> String, input: Value) -> Value {
    serde_json::from_str(&f(&input.to_string())).unwrap()
}

#[test]
fn a_plugin_json_is_recognised_and_its_error_is_at_the_field_line() {
    let text = "{\n  \"rules\": [\n    {\n      \"name\": \"a\",\n      \"limit\": { \"requests\": 5, \"window\": \"2\" }\n    }\n  ]\n}";
    let out = call(edge_playground::check, json!({ "text": text }));
    assert_eq!(out["kind"], "rate_limit");
    let f = &out["findings"][0];
    assert_eq!(f["path"], "rules[0].limit.window");
    assert_eq!(f["line"], 5);
    assert_eq!(out["findings"].as_array().unwrap().len(), 1);

    let broken = call(
        edge_playground::check,
        json!({ "text": "{\n \"rules\": [\n  { \"name\": \"a\", }\n ]\n}" }),
    );
    assert_eq!(broken["findings"][0]["line"], 3, "{broken}");
}

#[test]
fn the_split_counts_every_synthetic_user_once() {
    let flagd = json!({ "flags": { "f": {
        "state": "ENABLED", "variants": { "a": "1", "b": "2", "c": "3" }, "defaultVariant": "a",
        "targeting": { "fractional": [ ["a", 10], ["b", 30], ["c", 60] ] } } } });
    let out = call(
        edge_playground::flags,
        json!({ "mode": "context", "flagd": flagd.to_string(), "users": 3000 }),
    );
    let rows = out["split"][0]["variants"].as_array().unwrap();
    let count = |v: &str| {
        rows.iter().find(|r| r["variant"] == v).unwrap()["count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(count("a") + count("b") + count("c"), 3000);
    // flagd's buckets: the largest share gets the most users, roughly in proportion.
    assert!(
        count("c") > count("b") && count("b") > count("a"),
        "{rows:?}"
    );
    assert!((1600..2000).contains(&count("c")), "{rows:?}");
}

#[test]
fn the_rate_limit_tokens_refill_with_the_clock() {
    let out = call(
        edge_playground::sequence,
        json!({
            "chain": [{ "plugin": "rate_limit",
                        "config": { "rules": [{ "name": "r", "limit": { "requests": 2, "window": "2s" } }] } }],
            "requests": [
                { "path": "/a", "times": 3 },
                { "waitMs": 1000 },
                { "path": "/a" }
            ]
        }),
    );
    let statuses: Vec<u64> = out["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["response"]["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 429, 200]);
    let points = out["tokens"][0]["points"].as_array().unwrap();
    let remaining: Vec<u64> = points
        .iter()
        .map(|p| p["remaining"].as_u64().unwrap())
        .collect();
    assert_eq!(remaining, [1, 0, 0, 0]);
    assert_eq!(points[3]["atMs"], 1000.0);
}

#[test]
fn malformed_inputs_get_an_error_answer() {
    for input in [
        "",
        "[",
        "{\"requests\": 5}",
        "{\"text\": 7, \"kind\": \"nope\"}",
    ] {
        for f in [
            edge_playground::check,
            edge_playground::flags,
            edge_playground::sequence,
        ] {
            let out: Value = serde_json::from_str(&f(input)).unwrap();
            assert!(out.is_object(), "{input:?}: {out}");
        }
    }
    let out: Value = serde_json::from_str(&edge_playground::check("[")).unwrap();
    assert!(out["error"].as_str().unwrap().contains("not JSON"));
}

#[test]
fn a_global_rule_follows_what_the_request_says_the_service_answers() {
    let config = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../plugins/rate-limit/examples/global-per-key.json"
    ))
    .unwrap();
    let send =
        |rls: &str| json!({ "path": "/api/a", "headers": [["x-api-key", "k1"]], "rls": rls });
    let out = call(
        edge_playground::sequence,
        json!({
            "chain": [{ "plugin": "rate_limit", "config": config }],
            "requests": [send("ok"), send("unavailable"), send("timeout"), send("over_limit"), send("ok")]
        }),
    );
    let answers: Vec<(u64, String)> = out["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["response"]["status"].as_u64().unwrap(),
                r["decisions"][0]["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let statuses: Vec<u64> = answers.iter().map(|a| a.0).collect();
    // failureMode local: while the service fails, this proxy's bucket (with tokens) decides;
    // once the service limited the client, the deny cache answers without a call.
    assert_eq!(statuses, [200, 200, 200, 429, 429], "{answers:?}");
    assert!(answers[1].1.contains("failureMode"), "{answers:?}");
    assert!(answers[2].1.contains("timed out"), "{answers:?}");
    assert!(answers[4].1.contains("deny cache"), "{answers:?}");
}
