//! `edge-check` as CI runs it: the shipped configs are clean, each broken fixture gives its one
//! finding at its line, in text and in JSON, with the documented exit codes.

// A failed assertion, or an unwrap in the functions below, is how a test fails.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the binary from the repository root, as `./build.sh check` does.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-check"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json_findings(out: &Output) -> Vec<Value> {
    match serde_json::from_str(&stdout(out)).unwrap() {
        Value::Array(a) => a,
        other => panic!("not a JSON array: {other}"),
    }
}

#[test]
fn every_config_in_envoy_is_clean() {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("envoy/{n}"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for file in &files {
        let out = run(&[file]);
        assert_eq!(code(&out), 0, "{file}: {}", stdout(&out));
        assert_eq!(stdout(&out), format!("{file}: ok\n"));
        let out = run(&["--format", "json", file]);
        assert_eq!(code(&out), 0);
        assert!(json_findings(&out).is_empty());
    }
}

/// Each fixture: (file, line, plugin, path, severity, words of the message).
const FIXTURES: &[(&str, u64, &str, &str, &str, &str)] = &[
    (
        "bad-plugin-field.yaml",
        92,
        "rate_limit",
        "rules[0].limit.requests",
        "error",
        "must be > 0",
    ),
    (
        "malformed-json.yaml",
        97,
        "cached_fallback",
        "configuration",
        "error",
        "expected `,` or `}` at line 6 column 3 of the JSON in the `value` at line 91",
    ),
    (
        "missing-buffer.yaml",
        66,
        "idempotency",
        "http_filters[0]",
        "error",
        "no envoy.filters.http.buffer after idempotency",
    ),
    (
        "rls-cluster-without-http2.yaml",
        69,
        "rate_limit",
        "rules[0].global.cluster",
        "error",
        "\"ratelimit\" (the cluster at line 94) speaks HTTP/1.1",
    ),
    (
        "small-buffer.yaml",
        100,
        "idempotency",
        "maxBodyBytes",
        "error",
        "max_request_bytes 65536 is below idempotency's maxBodyBytes 1048576",
    ),
    (
        "undefined-etcd-cluster.yaml",
        80,
        "idempotency",
        "store.etcd.cluster",
        "error",
        "\"etcd-members\" is not a cluster of static_resources.clusters",
    ),
    (
        "undefined-rls-cluster.yaml",
        69,
        "rate_limit",
        "rules[0].global.cluster",
        "error",
        "\"rate-limit-service\" is not a cluster of static_resources.clusters",
    ),
    (
        "undefined-flags-cluster.yaml",
        114,
        "flag_router",
        "source.cluster",
        "error",
        "\"flag-files\" is not a cluster of static_resources.clusters",
    ),
    (
        "unproducible-route-value.yaml",
        80,
        "flag_router",
        "flags.new-checkout.variants",
        "warning",
        "x-route-checkout exactly \"v3\", which no variant of flag \"new-checkout\" produces \
         (its variants: off=v1, on=v2)",
    ),
    (
        "wrong-order.yaml",
        105,
        "idempotency",
        "http_filters[1]",
        "warning",
        "idempotency (line 105) runs before flag_router (line 132)",
    ),
];

fn fixture(name: &str) -> String {
    format!("tools/edge-check/tests/fixtures/{name}")
}

#[test]
fn each_broken_fixture_gives_its_one_finding_at_its_line() {
    for &(name, line, plugin, path, severity, words) in FIXTURES {
        let file = fixture(name);
        let out = run(&["--format", "json", &file]);
        assert_eq!(code(&out), 1, "{name}");
        let found = json_findings(&out);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        let f = &found[0];
        assert_eq!(f["file"], file.as_str(), "{name}");
        assert_eq!(f["line"], line, "{name}: {f}");
        assert_eq!(f["plugin"], plugin, "{name}");
        assert_eq!(f["path"], path, "{name}");
        assert_eq!(f["severity"], severity, "{name}");
        let message = f["message"].as_str().unwrap();
        assert!(message.contains(words), "{name}: {message}");

        // The text form says the same, one line per finding.
        let out = run(&[&file]);
        assert_eq!(code(&out), 1);
        assert_eq!(
            stdout(&out),
            format!("{file}:{line}: {severity}: {plugin}: {path}: {message}\n")
        );
    }
}

#[test]
fn several_files_report_together_and_clean_ones_do_not_hide_findings() {
    let mut args = vec!["--format".to_string(), "json".to_string()];
    args.push("envoy/edge.yaml".into());
    args.extend(FIXTURES.iter().map(|f| fixture(f.0)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&args);
    assert_eq!(code(&out), 1);
    let found = json_findings(&out);
    let files: Vec<&str> = found.iter().map(|f| f["file"].as_str().unwrap()).collect();
    let expected: Vec<String> = FIXTURES.iter().map(|f| fixture(f.0)).collect();
    assert_eq!(files, expected);
}

#[test]
fn an_unreadable_file_exits_2() {
    let out = run(&["envoy/no-such-file.yaml"]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("envoy/no-such-file.yaml"));

    let dir = std::env::temp_dir().join(format!("edge-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "static_resources:\n  clusters: [ { name: a\n").unwrap();
    let broken = broken.to_str().unwrap();
    // Unreadable wins over findings: the run did not check everything.
    let out = run(&["--format", "json", broken, &fixture("wrong-order.yaml")]);
    assert_eq!(code(&out), 2);
    assert_eq!(json_findings(&out).len(), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not YAML"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(code(&run(&[])), 2);
    assert_eq!(code(&run(&["--format", "xml", "envoy/edge.yaml"])), 2);
    assert_eq!(code(&run(&["--frobnicate", "envoy/edge.yaml"])), 2);
}
