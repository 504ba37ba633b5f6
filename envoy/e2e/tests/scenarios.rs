//! Every scenario in `envoy/scenarios/` runs in the harness and in Envoy 1.40; each transcript
//! must meet the scenario's expectations, and the two transcripts must be identical.
//! `SCENARIO=<part of a file name>` runs only the matching files; `EDGE_SCENARIO_FILES` (paths
//! joined as in `PATH`) runs those files instead of the directory: how `./build.sh scenario
//! --envoy FILE...` runs a user's own files and modules in both hosts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use edge_e2e::scenario::run_in_envoy;
use host_tests::scenario::{files_in, run_in_harness, Modules, Scenario, Transcript};

/// Envoys started at once: each compiles its modules in V8 at start, and CI has 2 cores.
const ENVOYS_AT_ONCE: usize = 3;

fn report(name: &str, runner: &str, s: &Scenario, t: &Transcript, problems: &mut Vec<String>) {
    let wrong = s.check(t);
    if !wrong.is_empty() {
        problems.push(format!(
            "{name} [{runner}]:\n  {}\n--- transcript\n{}",
            wrong.join("\n  "),
            t.render()
        ));
    }
}

#[test]
fn every_scenario_agrees_in_the_harness_and_in_envoy() -> anyhow::Result<()> {
    let root = edge_e2e::workspace_root();
    let filter = std::env::var("SCENARIO").unwrap_or_default();
    let own_files = std::env::var_os("EDGE_SCENARIO_FILES").is_some();
    let files: Vec<PathBuf> = match std::env::var_os("EDGE_SCENARIO_FILES") {
        Some(list) => std::env::split_paths(&list).collect(),
        None => files_in(root.join("envoy/scenarios"))?,
    }
    .into_iter()
    .filter(|f| f.to_string_lossy().contains(&filter))
    .collect();
    assert!(!files.is_empty(), "no scenario matches {filter:?}");
    let mut scenarios = Vec::new();
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        scenarios.push((name, Scenario::from_file(f)?));
    }

    // Envoy runs in a small pool of threads while the harness runs here.
    let queue = Arc::new(Mutex::new(scenarios.clone()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let pool: Vec<_> = (0..ENVOYS_AT_ONCE)
        .map(|_| {
            let queue = Arc::clone(&queue);
            let results = Arc::clone(&results);
            std::thread::spawn(move || loop {
                let next = queue.lock().map(|mut q| q.pop()).ok().flatten();
                let Some((name, s)) = next else { break };
                let t = run_in_envoy(&s);
                if let Ok(mut r) = results.lock() {
                    r.push((name, t));
                }
            })
        })
        .collect();

    let mut modules = Modules::new(root.join("dist"));
    let mut harness = Vec::new();
    for (name, s) in &scenarios {
        harness.push((name.clone(), run_in_harness(s, &mut modules)));
    }
    for p in pool {
        p.join()
            .map_err(|_| anyhow::anyhow!("an Envoy runner panicked"))?;
    }
    let envoy = std::mem::take(&mut *results.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);

    let mut problems = Vec::new();
    let mut table = Vec::new();
    for ((name, s), (_, h)) in scenarios.iter().zip(harness) {
        let e = envoy
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_ref().map_err(|e| format!("{e:#}")));
        let h = h.map_err(|e| format!("{e:#}"));
        match (&h, e) {
            (Ok(h), Some(Ok(e))) => {
                report(name, "harness", s, h, &mut problems);
                report(name, "envoy", s, e, &mut problems);
                let agree = h.normalised() == e.normalised();
                if own_files {
                    println!("== {name} (harness)\n{}", h.render());
                }
                if !agree {
                    problems.push(format!(
                        "{name}: the harness and Envoy disagree\n--- harness\n{}--- envoy\n{}",
                        h.render(),
                        e.render()
                    ));
                }
                table.push(format!(
                    "{name}: harness {} envoy {} agree {}",
                    if s.check(h).is_empty() { "ok" } else { "FAIL" },
                    if s.check(e).is_empty() { "ok" } else { "FAIL" },
                    if agree { "yes" } else { "NO" }
                ));
            }
            (h, e) => {
                problems.push(format!(
                    "{name}: a runner failed: harness {h:?}, envoy {e:?}"
                ));
                table.push(format!("{name}: runner error"));
            }
        }
    }
    println!("{}", table.join("\n"));
    assert!(problems.is_empty(), "\n{}", problems.join("\n\n"));
    Ok(())
}
