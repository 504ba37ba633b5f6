//! The README is the plugin's reference: its examples are the files in `examples/`, the plugin
//! accepts them (or refuses them with the error the README quotes), and what the README says
//! they mean holds.

use rate_limit::config::{Config, Mode};

#[cfg(test)]
#[path = "../../readme_examples.rs"]
mod readme_examples;

const README: &str = include_str!("../README.md");

fn parse(json: &str) -> Config {
    Config::parse(json.as_bytes()).unwrap()
}

#[test]
fn the_readme_shows_the_example_files_and_the_plugin_reads_them() {
    readme_examples::check(env!("CARGO_MANIFEST_DIR"), README, |json| {
        Config::parse(json).map(drop).map_err(|e| e.to_string())
    });
}

#[test]
fn the_full_example_allows_a_burst_of_20_refilled_at_100_a_minute() {
    let c = parse(include_str!("../examples/api-per-client.json"));
    let limit = &c.rules[0].limit;
    assert_eq!((limit.burst, limit.requests), (20, 100));
    assert_eq!(limit.window_ns, 60_000_000_000);
}

#[test]
fn the_minimal_example_takes_the_documented_defaults() {
    let c = parse(include_str!("../examples/per-client-ip.json"));
    let rule = &c.rules[0];
    // Without `burst`: 10 at once, then one a second.
    assert_eq!(rule.limit.burst, rule.limit.requests);
    assert_eq!(rule.limit.window_ns / rule.limit.requests, 1_000_000_000);
    assert_eq!((rule.status, rule.max_keys), (429, 65_536));
    assert!(c.response_headers);
    assert_eq!(c.mode, Mode::Enforce);
}
