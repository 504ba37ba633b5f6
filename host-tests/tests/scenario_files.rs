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
    reached: ["GET /b [x-callout=- x-grpc=7:denied{via_upstream}]"]
"#,
    )?;
    let t = run(&s)?;
    assert!(t.contains("call flags <- GET /flags.json"), "{t}");
    assert!(t.contains("call grpc <- POST /probe.Service/Ping"), "{t}");
    Ok(())
}

/// What the probe reads (`x-grpc=<status>:<message>`) when the scripted gRPC server answers
/// its call with `answer` (Envoy 1.40's wording, as `envoy/scenarios/any-1*.yaml` show).
fn grpc_seen(answer: &str) -> anyhow::Result<String> {
    let s = scenario(
        "grpc-failures",
        &format!(
            r#"
about: a failed gRPC call as the plugin reads it
chain:
  - module: PROBE
    config_text: "actions=grpc"
clusters:
  grpc:
    grpc: true
    {answer}
upstream_headers: [x-grpc]
steps:
  - send: {{ path: / }}
"#
        ),
    )?;
    let t = run(&s)?;
    let line = t
        .lines()
        .find(|l| l.contains("app <- GET /"))
        .unwrap_or_default();
    Ok(line
        .split("x-grpc=")
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches(']')
        .to_string())
}

#[test]
fn a_grpc_server_failure_reaches_the_plugin_as_envoy_hands_it_over() -> anyhow::Result<()> {
    assert_eq!(
        grpc_seen(r#"/probe.Service/Ping: { grpc_status: 7, grpc_message: "no: 5% ä" }"#)?,
        "7:no: 5%25 %C3%A4{via_upstream}"
    );
    assert_eq!(
        grpc_seen("/probe.Service/Ping: { grpc_status: 9 }")?,
        "9:via_upstream"
    );
    assert_eq!(
        grpc_seen("/probe.Service/Other: { body: x }")?,
        "12:unknown method{via_upstream}"
    );
    assert_eq!(
        grpc_seen("/probe.Service/Ping: { reset: true }")?,
        "14:upstream connect error or disconnect/reset before headers. reset reason: remote \
         reset{upstream_reset_before_response_started{remote_reset}}"
    );
    assert_eq!(grpc_seen("/probe.Service/Ping: { body: pong }")?, "0:pong");
    Ok(())
}

#[test]
fn an_http2_request_has_the_clients_header_order_and_a_chunked_body_upstream() -> anyhow::Result<()>
{
    let s = scenario(
        "h2",
        r#"
about: what a plugin and the application see of an HTTP/2 request
chain:
  - module: PROBE
    config_text: "actions=headers"
upstream_headers: [x-names, transfer-encoding, content-length]
steps:
  - send: { method: POST, path: /a, protocol: h2, body: abcdef, chunks: 3 }
    reached: ["POST /a [x-names=:method,:scheme,:authority,:path,x-forwarded-proto,x-request-id transfer-encoding=chunked content-length=-] body=6B"]
  - send: { method: POST, path: /b, body: abcdef, chunks: 3 }
    reached: ["POST /b [x-names=:authority,:path,:method,:scheme,x-forwarded-proto,x-request-id transfer-encoding=chunked content-length=-] body=6B"]
  - send: { method: POST, path: /c, protocol: h2, body: abc }
    reached: ["POST /c [x-names=:method,:scheme,:authority,:path,content-length,x-forwarded-proto,x-request-id transfer-encoding=- content-length=3] body=3B"]
"#,
    )?;
    run(&s)?;
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
