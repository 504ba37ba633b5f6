//! edge-check in the page: an Envoy YAML gets every finding the CLI prints; one plugin's JSON
//! gets its parser's verdict, at the line of the field it names.

use crate::input::str_of;
use edge_check::{Finding, Plugin};
use serde_json::{json, Value};

pub fn run(input: &Value) -> Result<Value, String> {
    let text = str_of(input, "text").unwrap_or_default();
    let kind = str_of(input, "kind").unwrap_or("auto");
    let file = str_of(input, "file").unwrap_or("pasted");
    let plugin = match kind {
        "auto" => guess(text),
        "envoy" => None,
        name => Some(Plugin::by_name(name).ok_or_else(|| format!("kind: unknown plugin {name}"))?),
    };
    let (kind, findings) = match plugin {
        Some(p) => (p.name(), edge_check::check_plugin(p, file, text)),
        None => match edge_check::check(file, text) {
            Ok(f) => ("envoy", f),
            Err(e) => {
                return Ok(json!({ "kind": "envoy", "findings": [], "unreadable": e.to_string() }))
            }
        },
    };
    let findings: Vec<Value> = findings.iter().map(Finding::to_json).collect();
    Ok(json!({ "kind": kind, "findings": findings, "unreadable": null }))
}

/// Which plugin a pasted JSON object configures, by the fields only that plugin has (`None`
/// for YAML, and for JSON that names no plugin's field: it is then read as an Envoy config,
/// which JSON also is).
fn guess(text: &str) -> Option<Plugin> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return None;
    }
    const FIELDS: [(Plugin, &[&str]); 4] = [
        (Plugin::RateLimit, &["rules"]),
        (
            Plugin::FlagRouter,
            &[
                "flags",
                "targetingKey",
                "context",
                "headers",
                "$evaluators",
                "source",
            ],
        ),
        (
            Plugin::CachedFallback,
            &[
                "failOn",
                "circuitBreaker",
                "staticFallback",
                "maxStale",
                "key",
            ],
        ),
        (
            Plugin::Idempotency,
            &[
                "header",
                "ttl",
                "inFlightTimeout",
                "storeStatuses",
                "fingerprint",
                "scope",
                "required",
                "store",
                "maxKeyLength",
            ],
        ),
    ];
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else {
        // Broken JSON: the first field that names a plugin decides, so the error comes from
        // that plugin's parser (with the JSON's own line).
        return FIELDS
            .iter()
            .filter_map(|(p, fields)| {
                fields
                    .iter()
                    .filter_map(|f| text.find(&format!("\"{f}\"")))
                    .min()
                    .map(|at| (at, *p))
            })
            .min()
            .map(|(_, p)| p);
    };
    if o.contains_key("static_resources") || o.contains_key("admin") {
        return None;
    }
    FIELDS
        .iter()
        .find(|(_, fields)| fields.iter().any(|f| o.contains_key(*f)))
        .map(|(p, _)| *p)
}
