//! Runs scenario files in the harness and prints each transcript: an offline dry run of a
//! plugin chain, a module or a config before it ships.
//!
//! ```text
//! edge-scenario [--dist DIR] [--module NAME=FILE.wasm] [--config NAME=FILE.json] SCENARIO.yaml...
//! ```
//!
//! `--module` runs another build of a plugin; `--config` replaces a plugin's configuration
//! with a file's text (e.g. the one about to be deployed). Exits 1 when an expectation fails,
//! 2 on a usage or file error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use host_tests::scenario::{run_in_harness, Modules, Scenario};

const USAGE: &str = "usage: edge-scenario [--dist DIR] [--module NAME=FILE.wasm] [--config NAME=FILE.json] SCENARIO.yaml...";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("edge-scenario: {e:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn pair(arg: Option<String>, flag: &str) -> Result<(String, String)> {
    let arg = arg.with_context(|| format!("{flag} needs NAME=FILE"))?;
    let (k, v) = arg
        .split_once('=')
        .with_context(|| format!("{flag} {arg:?}: expected NAME=FILE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn run() -> Result<bool> {
    let mut dist = PathBuf::from("dist");
    let mut modules: HashMap<String, String> = HashMap::new();
    let mut configs: HashMap<String, String> = HashMap::new();
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dist" => dist = args.next().context("--dist needs a directory")?.into(),
            "--module" => {
                let (k, v) = pair(args.next(), "--module")?;
                modules.insert(k, v);
            }
            "--config" => {
                let (k, v) = pair(args.next(), "--config")?;
                let text = std::fs::read_to_string(&v).with_context(|| format!("reading {v}"))?;
                configs.insert(k, text);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(true);
            }
            f if f.starts_with('-') => bail!("unknown option {f}"),
            f => files.push(PathBuf::from(f)),
        }
    }
    if files.is_empty() {
        bail!("no scenario file given");
    }
    let mut cache = Modules::new(dist);
    for (name, file) in &modules {
        cache.set_file(name, file);
    }
    let mut all_ok = true;
    for file in files {
        let mut s = Scenario::from_file(&file)?;
        for f in &mut s.chain {
            let Some(name) = f.plugin.clone() else {
                continue;
            };
            if let Some(text) = configs.get(&name) {
                f.config_text = Some(text.clone());
            }
        }
        println!("== {} — {}", file.display(), s.about);
        let t = run_in_harness(&s, &mut cache)?;
        print!("{}", t.render());
        let wrong = s.check(&t);
        if wrong.is_empty() {
            println!("ok: every expectation holds");
        } else {
            all_ok = false;
            for w in wrong {
                println!("FAILED: {w}");
            }
        }
        println!();
    }
    Ok(all_ok)
}
