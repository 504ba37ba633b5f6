//! The Istio manifests of `envoy/istio/` against what they claim: each `WasmPlugin`'s
//! `pluginConfig`, turned into JSON the way Istio hands it to the plugin, equals the
//! configuration of the matching `envoy/*.yaml` and is accepted by the plugin in the harness;
//! the four run in the README's order; `failStrategy` is the documented one and agrees with
//! the Envoy files' `failure_policy`; and the README's table of ABI features is what the plugins
//! call (the top-level README's table).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use host_tests::{module_path, CalloutReply, Edge, Module, Plugin, Request, Upstream};
use serde_json::Value;

/// The modules in the README's order, with the Envoy file that configures each alone.
const PLUGINS: [(&str, &str); 4] = [
    ("rate_limit", "rate-limit"),
    ("flag_router", "flag-router"),
    ("idempotency", "idempotency"),
    ("cached_fallback", "cached-fallback"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    Ok(serde_json::to_value(doc)?)
}

fn manifest(module: &str) -> Result<Value> {
    yaml(&root().join(format!("envoy/istio/{module}.yaml")))
}

/// A `google.protobuf.Struct` number is a double, and Istio writes the struct with protojson,
/// which prints a double the way JavaScript does: integral values without a fraction, the
/// exponent form below 1e-6 and from 1e21.
fn protojson_number(n: f64) -> String {
    let abs = n.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let s = format!("{n:e}");
        match s.split_once('e') {
            Some((m, e)) if e.starts_with('-') => format!("{m}e-{:0>2}", &e[1..]),
            Some((m, e)) => format!("{m}e+{e:0>2}"),
            None => s,
        }
    } else if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n}")
    }
}

/// `pluginConfig` as the JSON text Istio gives the plugin (the struct's keys sorted).
fn istio_json(v: &Value) -> String {
    match v {
        Value::Number(n) => protojson_number(n.as_f64().unwrap_or(f64::NAN)),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(istio_json).collect();
            format!("[{}]", parts.join(","))
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), istio_json(&map[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        other => other.to_string(),
    }
}

/// The same value with every number a double, as a `Struct` holds it: what "equal" means
/// between a YAML manifest and an Envoy file's JSON.
fn as_struct(v: &Value) -> Value {
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.iter().map(as_struct).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), as_struct(v))).collect())
        }
        other => other.clone(),
    }
}

/// Every `envoy.filters.http.wasm` filter config of an Envoy file.
fn wasm_filters(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(map) => {
            if map.get("name").and_then(Value::as_str) == Some("envoy.filters.http.wasm") {
                out.push(map["typed_config"]["config"].clone());
            }
            map.values().for_each(|v| wasm_filters(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| wasm_filters(v, out)),
        _ => {}
    }
}

/// The plugin's filter config in `envoy/<file>.yaml`.
fn envoy_filter(file: &str, module: &str) -> Result<Value> {
    let mut filters = Vec::new();
    wasm_filters(
        &yaml(&root().join(format!("envoy/{file}.yaml")))?,
        &mut filters,
    );
    filters
        .into_iter()
        .find(|f| f["root_id"] == module)
        .with_context(|| format!("envoy/{file}.yaml has no filter with root_id {module}"))
}

/// Rows of the markdown table in `readme` (relative to the repository) whose header line
/// starts with `header`, and that header's cells.
fn readme_table(readme: &str, header: &str) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let text = fs::read_to_string(root().join(readme))?;
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_string())
            .collect()
    };
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(header));
    let head = cells(
        lines
            .next()
            .with_context(|| format!("no table {header:?} in {readme}"))?,
    );
    let rows: Vec<Vec<String>> = lines
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(cells)
        .collect();
    ensure!(
        !rows.is_empty(),
        "the table {header:?} in {readme} has no rows"
    );
    Ok((head, rows))
}

#[test]
fn plugin_config_as_istio_sends_it_is_the_envoy_files_configuration() -> Result<()> {
    for (module, file) in PLUGINS {
        let spec = &manifest(module)?["spec"];
        let sent = istio_json(&spec["pluginConfig"]);
        let filter = envoy_filter(file, module)?;
        let envoy_text = filter["configuration"]["value"]
            .as_str()
            .context("configuration.value")?;
        let envoy: Value = serde_json::from_str(envoy_text)?;
        let istio: Value = serde_json::from_str(&sent)?;
        assert_eq!(
            as_struct(&istio),
            as_struct(&envoy),
            "envoy/istio/{module}.yaml pluginConfig differs from envoy/{file}.yaml"
        );
    }
    Ok(())
}

#[test]
fn every_manifest_points_at_its_image_in_readme_order() -> Result<()> {
    let mut last_priority = i64::MAX;
    let mut phases = BTreeSet::new();
    for (module, _) in PLUGINS {
        let m = manifest(module)?;
        assert_eq!(m["apiVersion"], "extensions.istio.io/v1alpha1", "{module}");
        assert_eq!(m["kind"], "WasmPlugin", "{module}");
        let spec = &m["spec"];
        assert_eq!(
            spec["url"],
            format!("oci://REGISTRY/REPO/{module}:VERSION"),
            "{module}"
        );
        assert_eq!(spec["sha256"], "SHA256", "{module}");
        assert_eq!(spec["pluginName"], module, "{module}: the root id");
        assert_eq!(spec["type"], "HTTP", "{module}");
        phases.insert(spec["phase"].as_str().unwrap_or_default().to_string());
        let priority = spec["priority"].as_i64().context("priority")?;
        assert!(
            priority < last_priority,
            "{module}: priority {priority} does not run after the plugin before it"
        );
        last_priority = priority;
    }
    assert_eq!(
        phases.len(),
        1,
        "one phase keeps the four together: {phases:?}"
    );
    Ok(())
}

#[test]
fn fail_strategy_is_the_documented_one_and_the_envoy_files_agree() -> Result<()> {
    let (_, rows) = readme_table("envoy/istio/README.md", "| module |")?;
    for (module, file) in PLUGINS {
        let row = rows
            .iter()
            .find(|r| r[0] == module)
            .with_context(|| format!("{module} is not in the README's table"))?;
        let documented = row.last().cloned().unwrap_or_default();
        let strategy = manifest(module)?["spec"]["failStrategy"].clone();
        assert_eq!(strategy, documented.as_str(), "{module}");
        // Envoy spells Istio's FAIL_CLOSE as FAIL_CLOSED.
        let envoy_policy = envoy_filter(file, module)?["failure_policy"].clone();
        let expected = if documented == "FAIL_OPEN" {
            "FAIL_OPEN"
        } else {
            "FAIL_CLOSED"
        };
        assert_eq!(
            envoy_policy, expected,
            "envoy/{file}.yaml failure_policy for {module}"
        );
    }
    Ok(())
}

/// The ABI features a hostcall belongs to, as the README's table names them.
fn feature(hostcall: &str) -> Option<&'static str> {
    Some(match hostcall {
        "proxy_get_shared_data" | "proxy_set_shared_data" => "shared data",
        "proxy_register_shared_queue"
        | "proxy_resolve_shared_queue"
        | "proxy_enqueue_shared_queue"
        | "proxy_dequeue_shared_queue" => "shared queues",
        "proxy_http_call" => "HTTP callouts",
        "proxy_grpc_call" | "proxy_grpc_stream" => "gRPC callouts",
        "proxy_set_tick_period_milliseconds" => "timers",
        "proxy_get_property" | "proxy_set_property" => "properties",
        "proxy_define_metric" | "proxy_increment_metric" | "proxy_record_metric" => "metrics",
        "proxy_send_local_response" => "local replies",
        _ => return None,
    })
}

/// Runs a plugin with `config` over traffic that takes each of its paths, and returns the ABI
/// features it called.
fn features_used(module: &str, config: &str) -> Result<BTreeSet<&'static str>> {
    let wasm = Module::from_file(module_path(module))
        .with_context(|| format!("dist/{module}.wasm (run ./build.sh first)"))?;
    let mut edge = Edge::builder()
        .plugin(Plugin::new(&wasm, config).root_id(module))
        .workers(2)
        .cluster("flags", |_| {
            CalloutReply::ok(200, &[], r#"{"flags":{}}"#.as_bytes().to_vec())
        })
        .upstream(|_| Upstream::ok("hello"))
        .build()
        .with_context(|| format!("{module} refused the configuration Istio sends"))?;
    for path in [
        "/", "/api/a", "/api/a", "/api/a", "/api/a", "/api/a", "/api/a",
    ] {
        edge.send(Request::get(path).header("x-api-key", "k"))?;
    }
    for _ in 0..2 {
        edge.send(
            Request::post("/payments")
                .header("idempotency-key", "order-1")
                .header("authorization", "Bearer a")
                .body("{}"),
        )?;
    }
    edge.set_upstream(|_| Upstream::status(503));
    for _ in 0..3 {
        edge.send(Request::get("/api/a"))?;
    }
    edge.advance(std::time::Duration::from_secs(3))?;
    let mut used = BTreeSet::new();
    for (call, count) in edge.hostcalls(0) {
        if count > 0 {
            used.extend(feature(call));
        }
    }
    Ok(used)
}

/// The features the README's ABI table marks "yes" for `module`.
fn listed_features<'a>(
    header: &'a [String],
    rows: &'a [Vec<String>],
    module: &str,
) -> Result<BTreeSet<&'a str>> {
    let row = rows
        .iter()
        .find(|r| r[0] == module)
        .with_context(|| format!("{module} is not in the ABI table"))?;
    Ok(header
        .iter()
        .zip(row)
        .skip(1)
        .filter(|(_, cell)| cell.as_str() == "yes")
        .map(|(h, _)| h.as_str())
        .collect())
}

#[test]
fn each_plugin_accepts_what_istio_sends_and_calls_the_features_the_readme_lists() -> Result<()> {
    let (header, rows) = readme_table("README.md", "| plugin | shared data |")?;
    for (module, _) in PLUGINS {
        let config = istio_json(&manifest(module)?["spec"]["pluginConfig"]);
        let used = features_used(module, &config)?;
        let listed = listed_features(&header, &rows, module)?;
        assert_eq!(
            used.iter().copied().collect::<BTreeSet<&str>>(),
            listed,
            "{module}: features called vs the README's ABI table"
        );
    }
    Ok(())
}

/// A host that lacks a feature a plugin never calls still loads the plugin: each module imports
/// only the ABI functions of the features the README's table lists for it, and of those the
/// README says a configuration adds (a global rate limit rule: gRPC callouts; idempotency's
/// etcd store: HTTP callouts and timers; the flag router's `clientIp` key part: properties).
#[test]
fn each_module_imports_only_the_features_it_can_call() -> Result<()> {
    let (header, rows) = readme_table("README.md", "| plugin | shared data |")?;
    for (module, _) in PLUGINS {
        let wasm = Module::from_file(module_path(module))
            .with_context(|| format!("dist/{module}.wasm (run ./build.sh first)"))?;
        let mut allowed = listed_features(&header, &rows, module)?;
        match module {
            "rate_limit" => allowed.insert("gRPC callouts"),
            "idempotency" => allowed.insert("HTTP callouts") | allowed.insert("timers"),
            "flag_router" => allowed.insert("properties"),
            _ => false,
        };
        let imports = wasm.imports();
        let imported: BTreeSet<&str> = imports
            .iter()
            .filter_map(|i| i.strip_prefix("env."))
            .filter_map(feature)
            .collect();
        let beyond: Vec<&&str> = imported.difference(&allowed).collect();
        assert!(
            beyond.is_empty(),
            "{module} imports the functions of {beyond:?}, which it never calls: {imports:?}"
        );
    }
    Ok(())
}

#[test]
fn numbers_are_written_as_protojson_writes_doubles() {
    assert_eq!(protojson_number(100.0), "100");
    assert_eq!(protojson_number(134217728.0), "134217728");
    assert_eq!(protojson_number(0.25), "0.25");
    assert_eq!(protojson_number(1e21), "1e+21");
    assert_eq!(protojson_number(1e-7), "1e-07");
    assert_eq!(
        istio_json(&serde_json::json!({"b": [1, 2.5], "a": "x"})),
        r#"{"a":"x","b":[1,2.5]}"#
    );
}

#[test]
fn the_buffer_patch_holds_every_body_idempotency_fingerprints() -> Result<()> {
    let patch = yaml(&root().join("envoy/istio/idempotency-buffer.yaml"))?;
    let filter = &patch["spec"]["configPatches"][0]["patch"];
    assert_eq!(filter["operation"], "INSERT_BEFORE");
    assert_eq!(filter["value"]["name"], "envoy.filters.http.buffer");
    let buffer = filter["value"]["typed_config"]["max_request_bytes"]
        .as_u64()
        .context("max_request_bytes")?;
    let plugin = &manifest("idempotency")?["spec"]["pluginConfig"];
    let max_body = plugin["maxBodyBytes"].as_u64().context("maxBodyBytes")?;
    assert!(
        buffer >= max_body,
        "the buffer ({buffer}) must hold maxBodyBytes ({max_body})"
    );
    Ok(())
}
