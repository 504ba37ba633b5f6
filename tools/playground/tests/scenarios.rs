//! The playground decides as the modules do: scenario files of envoy/scenarios run through
//! the playground's `sequence` (natively, the same code the page runs) must meet their own
//! expectations and give the transcript the harness gives running the built modules.

// A failed assertion, or an unwrap or index in the functions below, is how a test fails.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use anyhow::{bail, Context, Result};
use host_tests::scenario::{
    parse_duration, run_in_harness, step_label, upstream_line, Answer, Modules, Scenario, Seen,
    StepRecord, Transcript,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One per plugin and one chain: sequences with waits, replays, failures and flag routing.
const FILES: &[&str] = &[
    "rl-02-quota-headers-count-down.yaml",
    "rl-07-refill-rate.yaml",
    "rl-04-shadow-mode.yaml",
    "fr-01-route-header-from-targeting.yaml",
    "fr-07-sticky-fractional-rollout.yaml",
    "fr-02-forged-headers-are-removed.yaml",
    "id-01-replay-byte-for-byte.yaml",
    "id-03-reused-key-other-body-422.yaml",
    "id-06-5xx-releases-the-key.yaml",
    "cf-01-503-gets-the-kept-answer.yaml",
    "cf-14-circuit-opens-and-probe-closes.yaml",
    "chain-04-edge-chain-in-readme-order.yaml",
    "chain-05-fallback-keyed-by-flag-variant.yaml",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn upstream_json(a: &Answer) -> Result<Value> {
    Ok(json!({
        "status": a.status,
        "headers": a.headers,
        "body": a.full_body(),
        "latencyMs": a.delay()?.as_millis() as u64,
        "reset": a.reset,
    }))
}

/// The scenario as the page would describe it: the chain, then each request with the
/// application's answer for its path at that point of the scenario.
fn playground_input(s: &Scenario) -> Result<(Value, Vec<usize>)> {
    if s.direct_response.is_some() || !s.clusters.is_empty() {
        bail!("direct responses and clusters are not part of the playground");
    }
    let chain: Vec<Value> = s
        .chain
        .iter()
        .filter(|f| f.is_wasm())
        .map(|f| json!({ "plugin": f.plugin, "config": f.config_string() }))
        .collect();
    let routes = |m: &BTreeMap<String, Answer>| -> Result<Value> {
        let mut out = serde_json::Map::new();
        for (path, a) in m {
            out.insert(path.clone(), upstream_json(a)?);
        }
        Ok(Value::Object(out))
    };
    let mut requests = Vec::new();
    // Per step: how many responses it records.
    let mut counts = Vec::new();
    for step in &s.steps {
        if let Some(send) = &step.send {
            let times = step.times.unwrap_or(1);
            requests.push(json!({
                "method": send.wire_method(),
                "path": send.path,
                "headers": send.wire_headers(),
                "body": send.body,
                "from": send.from.clone().unwrap_or_else(|| "127.0.0.1".into()),
                "times": times,
            }));
            counts.push(times);
            continue;
        }
        counts.push(0);
        if let Some(w) = &step.wait {
            requests.push(json!({ "waitMs": parse_duration(w)?.as_millis() as u64 }));
        } else if let Some(d) = step.upstream_down {
            requests.push(json!({ "upstreamDown": d }));
        } else if let Some(a) = &step.answer {
            requests.push(json!({ "answer": routes(a)? }));
        } else {
            bail!("step {} is not part of the playground", step_label(step));
        }
    }
    let rewrites: Vec<Value> = s
        .rewrites
        .iter()
        .map(|r| json!({ "header": r.header, "value": r.value, "prefix": r.prefix, "rewrite": r.rewrite }))
        .collect();
    let input = json!({
        "chain": chain,
        "routeTimeoutMs": s.route_timeout().as_millis() as u64,
        "recordHeaders": s.recorded_headers(),
        "upstream": routes(&s.upstream)?,
        "rewrites": rewrites,
        "requests": requests,
    });
    Ok((input, counts))
}

/// The playground's answers as a harness transcript.
fn playground_transcript(s: &Scenario) -> Result<Transcript> {
    let (input, counts) = playground_input(s)?;
    let out: Value = serde_json::from_str(&edge_playground::sequence(&input.to_string()))?;
    if let Some(e) = out.get("error") {
        bail!("sequence failed: {e}");
    }
    let errors = out["errors"].as_array().context("errors")?;
    if !errors.is_empty() {
        return Ok(Transcript {
            refused: Some(Value::Array(errors.clone()).to_string()),
            steps: Vec::new(),
        });
    }
    let mut responses = out["requests"].as_array().context("requests")?.iter();
    let recorded = s.recorded_headers();
    let mut t = Transcript::default();
    for (step, n) in s.steps.iter().zip(counts) {
        let mut rec = StepRecord {
            label: step_label(step),
            responses: Vec::new(),
            upstream: Vec::new(),
            calls: Vec::new(),
        };
        for r in responses.by_ref().take(n) {
            let resp = &r["response"];
            let status = resp["status"].as_u64().context("status")? as u16;
            let body = resp["body"].as_str().unwrap_or_default();
            let headers = &resp["recorded"];
            rec.responses.push(Seen::new(
                status,
                &recorded,
                |h| headers.get(h).and_then(Value::as_str),
                body.as_bytes(),
            ));
            let up = &r["upstream"];
            if up.is_null() {
                continue;
            }
            let seen: Vec<(String, Option<String>)> = s
                .upstream_headers
                .iter()
                .map(|h| {
                    let v = up["headers"].as_array().and_then(|hs| {
                        hs.iter()
                            .find(|p| p[0].as_str() == Some(h.as_str()))
                            .and_then(|p| p[1].as_str().map(str::to_string))
                    });
                    (h.clone(), v)
                })
                .collect();
            rec.upstream.push(upstream_line(
                up["method"].as_str().unwrap_or_default(),
                up["path"].as_str().unwrap_or_default(),
                &seen,
                up["bodyBytes"].as_u64().unwrap_or(0) as usize,
            ));
        }
        rec.upstream.sort();
        t.steps.push(rec);
    }
    Ok(t)
}

#[test]
fn scenarios_meet_their_expectations_in_the_playground() {
    let mut failures = Vec::new();
    for name in FILES {
        let s = Scenario::from_file(root().join("envoy/scenarios").join(name)).unwrap();
        let t = playground_transcript(&s)
            .with_context(|| name.to_string())
            .unwrap();
        let unmet = s.check(&t);
        if !unmet.is_empty() {
            failures.push(format!("{name}:\n  {}\n{}", unmet.join("\n  "), t.render()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_playground_and_the_harness_give_the_same_transcript() {
    let mut modules = Modules::new(root().join("dist"));
    let mut differ = Vec::new();
    for name in FILES {
        let s = Scenario::from_file(root().join("envoy/scenarios").join(name)).unwrap();
        let harness = run_in_harness(&s, &mut modules)
            .with_context(|| format!("{name} in the harness (./build.sh build first)"))
            .unwrap();
        let playground = playground_transcript(&s)
            .with_context(|| name.to_string())
            .unwrap();
        if harness.normalised() != playground.normalised() {
            differ.push(format!(
                "{name}\n--- harness\n{}--- playground\n{}",
                harness.normalised(),
                playground.normalised()
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
