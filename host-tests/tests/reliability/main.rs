//! Reliability: fuzzing, floods and races through the harness, for every plugin.
//!
//! `./build.sh test` runs a short deterministic pass of each. `./build.sh fuzz [SECONDS]` and
//! `./build.sh stress` run the long ones, through these environment variables:
//! - `FUZZ_SECONDS`: fuzz each plugin for this long with fresh seeds (default: a fixed set
//!   of `FUZZ_CASES` seeds, 60);
//! - `FLOOD_KEYS`: distinct keys per flood (default 20,000; the stress run uses 1,000,000);
//! - `RACE_TRIALS`: trials per race (default 500; the stress run uses 10,000).
//!
//! A failing fuzz case is written to `tests/reliability/regressions/<plugin>-<seed>.json`, and
//! that plugin's fuzz test replays every such file first.

#[path = "../common/mod.rs"]
mod common;
mod edge;
mod flood;
mod fuzz;
mod gen;
mod oracle;
mod race;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use host_tests::{Edge, Module, Plugin, Upstream, UpstreamRequest};

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

pub fn module(name: &str) -> Module {
    common::plugin_module(name)
}

/// `plugin` (from dist/) with `config` on two workers, in front of `upstream`.
pub fn two_workers(
    plugin: &str,
    config: impl Into<Vec<u8>>,
    upstream: impl FnMut(&UpstreamRequest) -> Upstream + 'static,
) -> Edge {
    Edge::builder()
        .plugin(Plugin::new(&module(plugin), config))
        .workers(2)
        .upstream(upstream)
        .build()
        .unwrap_or_else(|e| panic!("{plugin} does not load: {e:#}"))
}

fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reliability/regressions")
}

/// The saved failing cases of `plugin` (`regressions/<plugin>-<seed>.json`).
fn saved_cases(plugin: &str) -> Vec<(PathBuf, gen::Case)> {
    let Ok(entries) = std::fs::read_dir(regressions_dir()) else {
        return Vec::new();
    };
    let prefix = format!("{plugin}-");
    let mut out: Vec<(PathBuf, gen::Case)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let case: gen::Case =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, case)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn fuzz_plugin(plugin: &str) {
    let module = module(plugin);
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok());
    let cases = env_u64("FUZZ_CASES", 60);
    // A fresh run explores new seeds; the short pass is the same every time.
    let first_seed = if budget.is_some() {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    } else {
        0
    };
    let started = Instant::now();
    let mut tally = fuzz::Tally::default();
    // Cases that once failed come first: each must stay fixed.
    for (path, case) in saved_cases(plugin) {
        tally.cases += 1;
        match fuzz::run(&case, &module) {
            Ok(o) => {
                tally.requests += o.requests;
                tally.checked += o.checked;
            }
            Err(why) => tally
                .failures
                .push((case, format!("{} fails again: {why}", path.display()))),
        }
    }
    let mut seed = first_seed;
    loop {
        let done = match budget {
            Some(secs) => started.elapsed() >= Duration::from_secs_f64(secs),
            None => tally.cases >= cases,
        };
        if done {
            break;
        }
        let case = fuzz::generate(plugin, seed);
        seed = seed.wrapping_add(1);
        tally.cases += 1;
        match fuzz::run(&case, &module) {
            Ok(o) => {
                tally.requests += o.requests;
                tally.rejected += u64::from(o.rejected);
                tally.checked += o.checked;
            }
            Err(why) => {
                let (case, why) = shrink(case, why, &module);
                save_failure(plugin, case.seed, &case, &why, "");
                tally.failures.push((case, why));
                if tally.failures.len() >= 3 {
                    break;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("fuzz {}", fuzz::tally_line(plugin, &tally, secs));
    assert!(
        tally.failures.is_empty(),
        "{plugin}: {} failing case(s); first: {}",
        tally.failures.len(),
        tally.failures.first().map_or("", |f| f.1.as_str())
    );
    assert!(
        tally.checked > 0,
        "{plugin}: no case reached a decision the invariants check"
    );
}

/// Drops every op the failure does not need (one at a time, keeping a drop while the case
/// still fails), so the saved regression is the short story of the bug.
fn shrink(mut case: gen::Case, mut why: String, module: &Module) -> (gen::Case, String) {
    let mut i = 0;
    while i < case.ops.len() {
        let mut smaller = case.clone();
        smaller.ops.remove(i);
        match fuzz::run(&smaller, module) {
            Err(w) => {
                case = smaller;
                why = w;
            }
            Ok(_) => i += 1,
        }
    }
    (case, why)
}

#[test]
fn fuzz_rate_limit() {
    fuzz_plugin("rate_limit");
}

#[test]
fn fuzz_flag_router() {
    fuzz_plugin("flag_router");
}

#[test]
fn fuzz_cached_fallback() {
    fuzz_plugin("cached_fallback");
}

#[test]
fn fuzz_idempotency() {
    fuzz_plugin("idempotency");
}

#[test]
fn flood_rate_limit() {
    flood::rate_limit(env_u64("FLOOD_KEYS", 20_000));
}

#[test]
fn flood_idempotency() {
    flood::idempotency(env_u64("FLOOD_KEYS", 20_000));
}

#[test]
fn flood_cached_fallback() {
    flood::cached_fallback(env_u64("FLOOD_KEYS", 20_000));
}

#[test]
fn race_rate_limit_last_token() {
    race::rate_limit(env_u64("RACE_TRIALS", 500));
}

#[test]
fn race_idempotency_claim() {
    race::idempotency(env_u64("RACE_TRIALS", 500));
}

#[test]
fn race_circuit_breaker_probe() {
    race::circuit(env_u64("RACE_TRIALS", 500));
}

/// Saves a failing case under `regressions/<name>-<seed>.json`, where the next run of that
/// fuzzer replays it first, and says so (with `detail`, more lines about the case).
pub(crate) fn save_failure(
    name: &str,
    seed: u64,
    case: &impl serde::Serialize,
    why: &str,
    detail: &str,
) {
    let dir = regressions_dir();
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{name}-{seed}.json"));
    if let Ok(text) = serde_json::to_string(case) {
        let _ = std::fs::write(&file, text);
    }
    eprintln!(
        "FAILED {name} seed {seed}: {why}{detail}\n  saved as {}",
        file.display()
    );
}
