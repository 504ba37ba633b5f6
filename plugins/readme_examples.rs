//! The check every plugin's `tests/docs.rs` runs on its README, so that the reference cannot
//! drift from what the plugin accepts. A plugin's JSON examples are files under `examples/`; the
//! README shows each one in a ```` ```json ```` block right after a marker line
//! `<!-- example: examples/NAME.json -->`. Included by path (`#[cfg(test)] #[macro_use]
//! #[path = ...] mod`), since it is test code only and no plugin should depend on a crate for
//! it; the `cfg(test)`, always true in a test, lets clippy's test allowances (unwrap, panic)
//! apply to it. [`readme_test!`] then writes the test.
//!
//! - Every marked block is its file, byte for byte, and every file is shown at least once.
//! - `examples/*.json` are configurations the plugin accepts. One it accepts with warnings (a
//!   deprecated form) has them quoted in a ```` ```text ```` block right after its block; one
//!   without that block must give no warning.
//! - `examples/rejected/*.json` are configurations it refuses, and the README quotes the
//!   refusal (the error Envoy logs) word for word in a ```` ```text ```` block right after the
//!   example's block.

use std::fs;
use std::path::Path;

const MARKER: &str = "<!-- example: ";

/// `readme_test!(parse, warnings)`: the test that runs [`check`] on the calling crate, with its
/// configuration parser and what it warns about for a parsed configuration.
macro_rules! readme_test {
    ($parse:path, $warnings:expr) => {
        #[test]
        fn the_readme_shows_the_example_files_and_the_plugin_reads_them() {
            readme_examples::check(env!("CARGO_MANIFEST_DIR"), |json| {
                $parse(json).map($warnings).map_err(|e| e.to_string())
            });
        }
    };
}

/// Runs the checks above on the README of the crate at `crate_dir`; `parse` is the plugin's
/// configuration parser, returning the warnings it logs for an accepted configuration or the
/// error it logs for a refused one.
pub fn check(crate_dir: &str, parse: impl Fn(&[u8]) -> Result<Vec<String>, String>) {
    let readme = fs::read_to_string(Path::new(crate_dir).join("README.md")).unwrap();
    let shown = marked_blocks(&readme);
    assert!(!shown.is_empty(), "the README marks no example");
    for example in &shown {
        let name = &example.name;
        let file = fs::read_to_string(Path::new(crate_dir).join(name))
            .unwrap_or_else(|e| panic!("the README shows {name}, which cannot be read: {e}"));
        assert_eq!(
            example.json, file,
            "the README's block for {name} differs from the file"
        );
    }
    for (dir, accepted) in [("examples", true), ("examples/rejected", false)] {
        for name in json_files(crate_dir, dir) {
            let Some(example) = shown.iter().find(|shown| shown.name == name) else {
                panic!(
                    "{name} is not shown in the README (add `{MARKER}{name} -->` before its block)"
                )
            };
            let text = fs::read(Path::new(crate_dir).join(&name)).unwrap();
            let logged = match (parse(&text), accepted) {
                (Ok(warnings), true) => warnings,
                (Err(e), true) => panic!("{name} is refused: {e}"),
                (Ok(_), false) => panic!("{name} is accepted, but it is under examples/rejected/"),
                (Err(e), false) => vec![e],
            };
            let quoted = (!logged.is_empty()).then(|| logged.join("\n") + "\n");
            assert_eq!(
                example.then_text, quoted,
                "the ```text block after {name} must quote what the plugin logs for it"
            );
        }
    }
}

/// A README block marked as an example file.
pub struct Shown {
    /// The path after the marker, relative to the crate.
    pub name: String,
    /// The block's text, a newline after each line (as the file is).
    pub json: String,
    /// The ```` ```text ```` block that follows it, if one does before any other text.
    pub then_text: Option<String>,
}

/// Every marked block of `readme`, in order.
pub fn marked_blocks(readme: &str) -> Vec<Shown> {
    let mut out = Vec::new();
    let mut lines = readme.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let name = name
            .strip_suffix("-->")
            .unwrap_or_else(|| panic!("marker without `-->`: {line}"))
            .trim()
            .to_string();
        assert_eq!(
            lines.next().map(str::trim_end),
            Some("```json"),
            "the marker for {name} must be followed by a ```json line"
        );
        let json = fence_body(&mut lines);
        while lines.peek().is_some_and(|l| l.trim().is_empty()) {
            lines.next();
        }
        let then_text = lines
            .next_if(|l| l.trim_end() == "```text")
            .map(|_| fence_body(&mut lines));
        out.push(Shown {
            name,
            json,
            then_text,
        });
    }
    out
}

/// The lines up to the closing fence, each followed by a newline.
fn fence_body<'a>(lines: &mut impl Iterator<Item = &'a str>) -> String {
    let mut body = String::new();
    for line in lines.by_ref() {
        if line.trim_end() == "```" {
            break;
        }
        body.push_str(line);
        body.push('\n');
    }
    body
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
