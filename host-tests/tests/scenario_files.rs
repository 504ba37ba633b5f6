//! Scenario files for any module: a module by path, declared clusters (HTTP and gRPC), gRPC
//! requests, a route's direct response, and a loud failure for an undeclared cluster.
use host_tests::scenario::{run_in_harness, Modules, Scenario};
use std::path::PathBuf;

/// Writes `yaml` as a scenario file next to a copy-free reference to the probe module.
fn scenario(name: &str, yaml: &str) -> anyhow::Result<Scenario> {
    let dir = std::env::temp_dir().join(format!("host-tests-scenarios-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let probe = host_tests::module_path("probe");
    let text = yaml.replace("PROBE", &probe.display().to_string());
    let file: PathBuf = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, text)?;
    Scenario::from_file(&file)
}

fn run(s: &Scenario) -> anyhow::Result<String> {
    let mut modules = Modules::new("dist");
    let t = run_in_harness(s, &mut modules)?;
    let wrong = s.check(&t);
    assert!(wrong.is_empty(), "{wrong:?}\n{}", t.render());
    Ok(t.render())
}

#[test]
fn a_module_by_path_takes_its_names_from_the_file_stem() -> anyhow::Result<()> {
    let s = scenario(
        "stem",
        r#"
about: names default to the stem
chain:
  - module: PROBE
    config_text: "actions=props"
upstream_headers: [x-prop-plugin, x-prop-root]
steps:
  - send: { path: / }
    reached: ["GET / [x-prop-plugin=probe x-prop-root=probe]"]
"#,
    )?;
    assert_eq!(s.chain[0].vm_id(), "probe");
    run(&s)?;
    Ok(())
}

#[test]
fn a_call_to_an_undeclared_cluster_fails_the_scenario() -> anyhow::Result<()> {
    let s = scenario(
        "undeclared",
        r#"
about: the probe calls the grpc cluster, which the file does not declare
chain:
  - module: PROBE
    config_text: "actions=grpc"
steps:
  - send: { path: / }
"#,
    )?;
    let err = run_in_harness(&s, &mut Modules::new("dist")).expect_err("must fail");
    let text = format!("{err:#}");
    assert!(text.contains("undeclared cluster \"grpc\""), "{text}");
    Ok(())
}

#[test]
fn declared_clusters_answer_http_and_grpc_calls_and_are_recorded() -> anyhow::Result<()> {
    let s = scenario(
        "clusters",
        r#"
about: scripted HTTP and gRPC clusters
chain:
  - module: PROBE
    config_text: ""
clusters:
  flags:
    /flags.json: { status: 200, body: "doc" }
  grpc:
    grpc: true
    /probe.Service/Ping: { grpc_status: 7, grpc_message: "denied" }
upstream_headers: [x-callout, x-grpc]
steps:
  - send: { path: /a, headers: [[x-probe, callout]] }
    reached: ["GET /a [x-callout=200:doc:0: x-grpc=-]"]
  - send: { path: /b, headers: [[x-probe, grpc]] }
    reached: ["GET /b [x-callout=- x-grpc=7:denied]"]
"#,
    )?;
    let t = run(&s)?;
    assert!(t.contains("call flags <- GET /flags.json"), "{t}");
    Ok(())
}

#[test]
fn grpc_requests_and_direct_responses_run_as_in_envoy() -> anyhow::Result<()> {
    let s = scenario(
        "direct",
        r#"
about: a gRPC client and a route that answers itself
chain:
  - module: PROBE
    config_text: "actions=none"
direct_response: { status: 503, body: "maintenance" }
steps:
  - send: { path: /a.B/C, grpc: true }
    expect: { status: 200, headers: { grpc-status: "14", grpc-message: maintenance }, body: "" }
    reached: []
  - send: { path: /page }
    expect: { status: 503, body: maintenance }
    reached: []
"#,
    )?;
    run(&s)?;
    Ok(())
}
