//! The check every plugin's `tests/docs.rs` runs on its README, so that the reference cannot
//! drift from what the plugin accepts. A plugin's JSON examples are files under `examples/`; the
//! README shows each one in a ```` ```json ```` block right after a marker line
//! `<!-- example: examples/NAME.json -->`. Included by path (`#[path]`), since it is test code
//! only and no plugin should depend on a crate for it.
//!
//! - Every marked block is its file, byte for byte, and every file is shown at least once.
//! - `examples/*.json` are configurations the plugin accepts.
//! - `examples/rejected/*.json` are configurations it refuses, and the README quotes the
//!   refusal (the error Envoy logs) word for word.

use std::fs;
use std::path::Path;

const MARKER: &str = "<!-- example: ";

/// Runs the checks above for the crate at `crate_dir` with its README text; `parse` is the
/// plugin's configuration parser, returning the error message a refusal logs.
pub fn check(crate_dir: &str, readme: &str, parse: impl Fn(&[u8]) -> Result<(), String>) {
    let shown = marked_blocks(readme);
    assert!(!shown.is_empty(), "the README marks no example");
    for (name, block) in &shown {
        let file = fs::read_to_string(Path::new(crate_dir).join(name))
            .unwrap_or_else(|e| panic!("the README shows {name}, which cannot be read: {e}"));
        assert_eq!(block, &file, "the README's block for {name} differs from the file");
    }
    for (dir, accepted) in [("examples", true), ("examples/rejected", false)] {
        for name in json_files(crate_dir, dir) {
            assert!(
                shown.iter().any(|(shown, _)| *shown == name),
                "{name} is not shown in the README (add `{MARKER}{name} -->` before its block)"
            );
            let text = fs::read(Path::new(crate_dir).join(&name)).unwrap();
            match (parse(&text), accepted) {
                (Ok(()), true) => {}
                (Err(e), true) => panic!("{name} is refused: {e}"),
                (Ok(()), false) => panic!("{name} is accepted, but it is under examples/rejected/"),
                (Err(e), false) => assert!(
                    readme.contains(&e),
                    "the README does not quote the refusal of {name}: {e}"
                ),
            }
        }
    }
}

/// Every marked block as (path after the marker, the block's text with a newline per line).
pub fn marked_blocks(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let name = name
            .strip_suffix("-->")
            .unwrap_or_else(|| panic!("marker without `-->`: {line}"))
            .trim();
        assert_eq!(
            lines.next().map(str::trim_end),
            Some("```json"),
            "the marker for {name} must be followed by a ```json line"
        );
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.trim_end() == "```" {
                break;
            }
            block.push_str(line);
            block.push('\n');
        }
        out.push((name.to_string(), block));
    }
    out
}

/// `dir/*.json` under the crate, as paths relative to it, sorted.
fn json_files(crate_dir: &str, dir: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(Path::new(crate_dir).join(dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    names.sort();
    names
}
