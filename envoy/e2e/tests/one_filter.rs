//! `edge.wasm` in Envoy 1.40: the chain-* scenarios and one scenario per plugin, with their
//! chain as one `edge.wasm` filter, give in Envoy the transcript the harness gives (which
//! host-tests' one_filter test holds equal to the four-filter chain in the README's order),
//! and meet the file's expectations where the file's chain is in that order.

use edge_e2e::scenario::run_in_envoy;
use host_tests::scenario::{files_in, run_in_harness, Modules, Scenario};

/// Besides every chain-* file: one per plugin, each with callouts, state or replies that the
/// pipeline must route to the right stage.
const PER_PLUGIN: [&str; 4] = [
    "rl-01",
    "fr-04-kill-switch-through-polling",
    "id-02-concurrent-duplicates-run-once",
    "cf-14-circuit-opens-and-probe-closes",
];

#[test]
fn edge_wasm_answers_in_envoy_as_in_the_harness() -> anyhow::Result<()> {
    let root = edge_e2e::workspace_root();
    let filter = std::env::var("SCENARIO").unwrap_or_default();
    let mut modules = Modules::new(root.join("dist"));
    let mut problems = Vec::new();
    let mut ran = Vec::new();
    for file in files_in(root.join("envoy/scenarios"))? {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let chosen = name.starts_with("chain-") || PER_PLUGIN.iter().any(|p| name.starts_with(p));
        if !chosen || !name.contains(&filter) {
            continue;
        }
        let s = Scenario::from_file(&file)?;
        let (Some(one), Some((_, moved))) = (s.as_one_filter(), s.in_readme_order()) else {
            continue;
        };
        let harness = run_in_harness(&one, &mut modules)?;
        let envoy = run_in_envoy(&one)?;
        let wrong = if moved { Vec::new() } else { one.check(&envoy) };
        if !wrong.is_empty() || envoy.render() != harness.render() {
            problems.push(format!(
                "{name}: {wrong:?}\n--- harness\n{}\n--- envoy\n{}",
                harness.render(),
                envoy.render()
            ));
        }
        ran.push(name);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    if filter.is_empty() {
        assert!(ran.len() >= 9, "only {ran:?} ran");
    }
    Ok(())
}
