//! `edge-check [--format text|json] FILE...`: exit 0 when every file is clean, 1 when any has
//! findings, 2 when a file cannot be read or is not YAML.

use std::process::ExitCode;

const USAGE: &str = "usage: edge-check [--format text|json] ENVOY_YAML...";

fn main() -> ExitCode {
    let mut json = false;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--format" => match args.next().as_deref() {
                Some("json") => json = true,
                Some("text") => json = false,
                _ => return usage("--format takes text or json"),
            },
            "--format=json" => json = true,
            "--format=text" => json = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            a if a.starts_with('-') && a != "-" => return usage(&format!("unknown option {a}")),
            _ => files.push(arg),
        }
    }
    if files.is_empty() {
        return usage("give one or more Envoy YAML files");
    }

    let mut findings = Vec::new();
    let mut unreadable = false;
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("edge-check: {file}: {e}");
                unreadable = true;
                continue;
            }
        };
        match edge_check::check(file, &text) {
            Ok(found) => {
                if !json && found.is_empty() {
                    println!("{file}: ok");
                }
                for f in &found {
                    if !json {
                        println!("{f}");
                    }
                }
                findings.extend(found);
            }
            Err(e) => {
                eprintln!("edge-check: {e}");
                unreadable = true;
            }
        }
    }
    if json {
        let all: Vec<_> = findings.iter().map(edge_check::Finding::to_json).collect();
        println!("{}", serde_json::Value::Array(all));
    }
    if unreadable {
        ExitCode::from(2)
    } else if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("edge-check: {problem}\n{USAGE}");
    ExitCode::from(2)
}
