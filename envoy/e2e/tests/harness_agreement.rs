//! The same probe chain in the harness and in Envoy 1.40 must agree on what the client gets,
//! which filters' response callbacks run, and the `response.code_details` they see.

use edge_e2e::{Envoy, Script, Substitutions, TestUpstream};
use host_tests::{Edge, Module, Plugin, Request, Upstream};
use std::time::Duration;

/// What a scenario produced, in a form both runners can report.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u16,
    body: String,
    details: Option<String>,
    /// Plugins whose on_response_headers ran, in order.
    saw_response: Vec<String>,
}

fn harness_edge() -> anyhow::Result<Edge> {
    let probe = Module::from_file(host_tests::module_path("probe"))?;
    Edge::builder()
        .plugin(Plugin::new(&probe, "actions=none").name("p0"))
        .plugin(Plugin::new(&probe, "").name("p1"))
        .plugin(Plugin::new(&probe, "actions=none").name("p2"))
        .route_timeout(Duration::from_secs(2))
        .upstream(|r| match r.path() {
            "/reset" => Upstream::Reset,
            p if p.starts_with("/refused") => Upstream::Refused,
            "/slow" => Upstream::ok("late").delay(Duration::from_secs(3)),
            p => Upstream::ok(format!("upstream saw GET {p}")),
        })
        .build()
}

fn in_harness(edge: &mut Edge, path: &str, probe: &str) -> anyhow::Result<Outcome> {
    let before = edge.logs().len();
    let res = edge.send(Request::get(path).header("x-probe", probe))?;
    let saw = edge.logs()[before..]
        .iter()
        .filter(|l| l.message.starts_with("response headers"))
        .map(|l| l.plugin.clone())
        .collect();
    Ok(Outcome {
        status: res.status,
        body: res.body_str().to_string(),
        details: res.header("x-probe-details").map(str::to_string),
        saw_response: saw,
    })
}

fn in_envoy(envoy: &Envoy, path: &str, probe: &str) -> anyhow::Result<Outcome> {
    let before = envoy.log().len();
    let res = envoy.request("GET", path, &[("x-probe", probe)], b"")?;
    // Plugin log lines are written as the callbacks run; give the log a moment to flush.
    std::thread::sleep(Duration::from_millis(300));
    let log = envoy.log();
    let saw = log[before..]
        .lines()
        .filter(|l| l.contains(": response headers"))
        .filter_map(|l| l.split("wasm log ").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    Ok(Outcome {
        status: res.status,
        body: res.text(),
        details: res.header("x-probe-details").map(str::to_string),
        saw_response: saw,
    })
}

#[test]
fn harness_and_envoy_agree_on_local_replies_and_upstream_failures() -> anyhow::Result<()> {
    let up = TestUpstream::start()?;
    up.route("/reset", Script::reset());
    up.route(
        "/slow",
        Script::text("late").with_delay(Duration::from_secs(3)),
    );
    let subs = Substitutions::upstream(&up).replace(
        "filename: target/modules/",
        format!(
            "filename: {}/",
            edge_e2e::workspace_root().join("target/modules").display()
        ),
    );
    // One worker: the comparison reads the order of the filters' log lines, which is only
    // a total order within one worker thread.
    let envoy = Envoy::start_with(
        "e2e/tests/fixtures/probe-chain.yaml",
        &subs,
        &["--concurrency", "1"],
    )?;
    let mut edge = harness_edge()?;
    let cases = [
        ("/ok", "none"),
        ("/local", "local"),
        ("/resp-local", "resp-local"),
        ("/reset", "none"),
        ("/refused/x", "none"),
        ("/slow", "none"),
    ];
    let mut disagreements = Vec::new();
    for (path, probe) in cases {
        let h = in_harness(&mut edge, path, probe)?;
        let e = in_envoy(&envoy, path, probe)?;
        if h != e {
            disagreements.push(format!(
                "{path} ({probe}):\n  harness {h:?}\n  envoy   {e:?}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    Ok(())
}
