//! The few reads the checks make on a YAML tree, each keeping the node's line.

use saphyr::{MarkedYaml, YamlData};

pub type Node<'i> = MarkedYaml<'i>;

/// The line (1-based) where a node starts.
pub fn line(n: &Node<'_>) -> usize {
    n.span.start.line()
}

/// The key and the value of a mapping entry.
pub fn entry<'a, 'i>(n: &'a Node<'i>, key: &str) -> Option<(&'a Node<'i>, &'a Node<'i>)> {
    n.data
        .as_mapping()?
        .iter()
        .find(|(k, _)| k.data.as_str() == Some(key))
}

pub fn get<'a, 'i>(n: &'a Node<'i>, key: &str) -> Option<&'a Node<'i>> {
    entry(n, key).map(|(_, v)| v)
}

/// Follows a chain of mapping keys.
pub fn path<'a, 'i>(n: &'a Node<'i>, keys: &[&str]) -> Option<&'a Node<'i>> {
    keys.iter().try_fold(n, |n, k| get(n, k))
}

pub fn str_at<'a>(n: &'a Node<'_>, keys: &[&str]) -> Option<&'a str> {
    path(n, keys)?.data.as_str()
}

/// Whether an `http_filters` entry is the Envoy filter `name` (`envoy.filters.http.wasm`),
/// by its name or, as Envoy itself picks filters, by the type of its `typed_config`.
pub fn is_filter(entry: &Node<'_>, name: &str, type_url: &str) -> bool {
    str_at(entry, &["name"]) == Some(name)
        || str_at(entry, &["typed_config", "@type"]) == Some(type_url)
}

/// A sequence's items; nothing for anything else.
pub fn items<'a, 'i>(n: Option<&'a Node<'i>>) -> &'a [Node<'i>] {
    match n.map(|n| &n.data) {
        Some(YamlData::Sequence(s)) => s,
        _ => &[],
    }
}

/// A scalar as Envoy's JSON mapping would read a number: an integer, or a string of digits.
pub fn integer(n: &Node<'_>) -> Option<i64> {
    n.data
        .as_integer()
        .or_else(|| n.data.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A scalar as text, as Envoy reads a string field written as a number or a boolean.
pub fn text(n: &Node<'_>) -> Option<String> {
    let d = &n.data;
    d.as_str()
        .map(str::to_string)
        .or_else(|| d.as_integer().map(|i| i.to_string()))
        .or_else(|| d.as_bool().map(|b| b.to_string()))
        .or_else(|| d.as_floating_point().map(|f| f.to_string()))
}

/// Every mapping in the tree, depth first, in document order.
pub fn mappings<'a, 'i>(n: &'a Node<'i>, out: &mut Vec<&'a Node<'i>>) {
    match &n.data {
        YamlData::Mapping(m) => {
            out.push(n);
            for v in m.values() {
                mappings(v, out);
            }
        }
        YamlData::Sequence(s) => {
            for v in s {
                mappings(v, out);
            }
        }
        _ => {}
    }
}
