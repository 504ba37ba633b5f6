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
//! - The `## Fields` table names exactly the fields the parser allows, in every object the
//!   test probes: a field added to the parser, or one the README lists that it no longer takes,
//!   fails the test.

use std::fs;
use std::path::Path;

const MARKER: &str = "<!-- example: ";

/// `readme_test!(parse, [warnings,] [(prefix, probe), ...])`: the tests that run [`check`] and
/// [`check_fields`] on the calling crate, with its configuration parser, what it warns about
/// for a parsed configuration (nothing when not given) and the nested objects to probe.
macro_rules! readme_test {
    ($parse:path, [$(($prefix:expr, $probe:expr)),* $(,)?]) => {
        readme_test!($parse, |_| Vec::new(), [$(($prefix, $probe)),*]);
    };
    ($parse:path, $warnings:expr, [$(($prefix:expr, $probe:expr)),* $(,)?]) => {
        fn parse_for_readme(json: &[u8]) -> Result<Vec<String>, String> {
            $parse(json).map($warnings).map_err(|e| e.to_string())
        }

        #[test]
        fn the_readme_shows_the_example_files_and_the_plugin_reads_them() {
            readme_examples::check(env!("CARGO_MANIFEST_DIR"), parse_for_readme);
        }

        #[test]
        fn the_readme_lists_exactly_the_fields_the_plugin_reads() {
            readme_examples::check_fields(
                env!("CARGO_MANIFEST_DIR"),
                parse_for_readme,
                &[("", r#"{"zzz":1}"#), $(($prefix, $probe)),*],
            );
        }
    };
}

/// For each `(prefix, probe)`: `probe` is a configuration with an unknown field `zzz` in the
/// object the README's fields table writes as `prefix` (`""` for the top level, probed by
/// [`readme_test!`] always; `"rules[]."`, `"source."`), so the parser's refusal lists the fields
/// that object allows; they must be the table's fields under `prefix` (a nested field,
/// `rules[].limit.window`, names `limit`).
pub fn check_fields(
    crate_dir: &str,
    parse: impl Fn(&[u8]) -> Result<Vec<String>, String>,
    probes: &[(&str, &str)],
) {
    let readme = fs::read_to_string(Path::new(crate_dir).join("README.md")).unwrap();
    let documented = documented_fields(&readme);
    for (prefix, probe) in probes {
        let error = parse(probe.as_bytes()).expect_err("a probe has an unknown field");
        let (_, allowed) = error
            .split_once("unknown field `zzz`, expected one of ")
            .unwrap_or_else(|| panic!("{probe} was refused for another reason: {error}"));
        let mut allowed: Vec<&str> = allowed.split(", ").map(|f| f.trim_matches('`')).collect();
        let mut listed: Vec<&str> = documented
            .iter()
            .filter_map(|f| f.strip_prefix(prefix))
            .map(|rest| rest.split(['.', '[']).next().unwrap_or(rest))
            .collect();
        allowed.sort_unstable();
        listed.sort_unstable();
        listed.dedup();
        assert_eq!(
            listed, allowed,
            "the README's fields under {prefix:?} (left) are not what the parser allows (right)"
        );
    }
}

/// The first column of the `## Fields` table: `rules[].limit.window` and the like.
fn documented_fields(readme: &str) -> Vec<String> {
    readme
        .split("\n## ")
        .find(|section| section.starts_with("Fields\n"))
        .expect("a `## Fields` section")
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|cell| cell.split_once('`'))
        .map(|(field, _)| field.to_string())
        .collect()
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
