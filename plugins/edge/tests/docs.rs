//! The README is `edge.wasm`'s reference: its examples are the files in `examples/`, read as
//! the filter reads them at load (refused ones with the error it logs), and the full example
//! is what envoy/edge-single.yaml runs: envoy/edge.yaml's four configurations as sections.

#[cfg(test)]
#[allow(unused)]
#[path = "../../readme_examples.rs"]
mod readme_examples;

#[test]
fn the_readme_shows_the_example_files_and_the_filter_reads_them() {
    readme_examples::check(env!("CARGO_MANIFEST_DIR"), edge::check);
}

/// The JSON configurations in an Envoy YAML file, in filter order.
#[cfg(test)]
fn configurations(yaml: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "value: |" {
            continue;
        }
        let indent = lines.peek().map_or(0, |l| l.len() - l.trim_start().len());
        let mut text = String::new();
        while let Some(l) = lines.next_if(|l| l.len() - l.trim_start().len() >= indent) {
            text.push_str(l);
            text.push('\n');
        }
        out.push(serde_json::from_str(&text).unwrap());
    }
    out
}

#[test]
fn the_full_example_is_edge_single_yaml_and_edge_yamls_four_configurations() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../envoy/");
    let example: serde_json::Value =
        serde_json::from_str(include_str!("../examples/edge.json")).unwrap();
    let single =
        configurations(&std::fs::read_to_string(format!("{root}edge-single.yaml")).unwrap());
    assert_eq!(single, std::slice::from_ref(&example));
    let chain = configurations(&std::fs::read_to_string(format!("{root}edge.yaml")).unwrap());
    let sections: Vec<serde_json::Value> =
        edge::SECTIONS.iter().map(|s| example[*s].clone()).collect();
    assert_eq!(chain, sections);
}
