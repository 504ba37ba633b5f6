//! envoyproxy/ratelimit's YAML configuration: a `domain` and a tree of `descriptors`, each a
//! `key` with an optional `value`, an optional `rate_limit` and children. A request's descriptor
//! (a list of entries) walks the tree one entry per level, preferring the node with the entry's
//! key and value, then a `value` ending in `*` that prefixes it, then the node with the key
//! alone (any value); the limit applies only if the node reached by the *last* entry has one.
//! These are the lookup rules of envoyproxy/ratelimit, so a configuration written for it means
//! the same here.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRoot {
    domain: Option<String>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    key: Option<String>,
    #[serde(default)]
    value: String,
    rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
    #[serde(default)]
    shadow_mode: bool,
    /// Accepted for compatibility; this service keeps no per-value metrics.
    #[serde(default, rename = "detailed_metric")]
    _detailed_metric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    #[serde(default)]
    requests_per_unit: u32,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: String,
    /// Accepted for compatibility with envoyproxy/ratelimit; not applied here.
    #[serde(default, rename = "replaces")]
    _replaces: Vec<YamlReplaces>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlReplaces {
    #[serde(rename = "name")]
    _name: String,
}

/// A window unit, as envoyproxy/ratelimit counts it (a month is 30 days, a year 365).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    fn parse(s: &str) -> Option<Unit> {
        Some(match s.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => return None,
        })
    }

    /// The window's length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 604_800,
            Unit::Month => 2_592_000,
            Unit::Year => 31_536_000,
        }
    }
}

/// What a matched descriptor is held to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Never limited, never counted.
    Unlimited { name: String },
    /// At most `requests` per `unit` window; in shadow mode counted and reported, never enforced.
    Counted {
        name: String,
        requests: u32,
        unit: Unit,
        shadow: bool,
    },
}

#[derive(Debug, Default)]
struct Node {
    limit: Option<Limit>,
    /// Children by `key` or `key_value`.
    children: BTreeMap<String, Node>,
    /// Children whose composite key ends in `*`, in file order.
    wildcards: Vec<String>,
}

/// A loaded configuration.
#[derive(Debug)]
pub struct Config {
    pub domain: String,
    root: Node,
}

impl Config {
    /// Parses a configuration file's text; an error names the line (YAML errors) or the field
    /// path (`descriptors[0].descriptors[1].rate_limit.unit: ...`).
    pub fn parse(text: &str) -> Result<Config> {
        let root: YamlRoot = serde_yaml::from_str(text).context("invalid configuration")?;
        let domain = root.domain.unwrap_or_default();
        if domain.is_empty() {
            bail!("domain: must be a non-empty string");
        }
        let mut node = Node::default();
        load(&mut node, &domain, &root.descriptors, "descriptors")?;
        Ok(Config { domain, root: node })
    }

    /// The limit for a request descriptor of this domain, with the key its counter is kept
    /// under, or `None` when the configuration has no limit for it.
    pub fn limit_for(&self, entries: &[(String, String)]) -> Option<&Limit> {
        let mut level = &self.root;
        let mut found = None;
        for (i, (key, value)) in entries.iter().enumerate() {
            let exact = format!("{key}_{value}");
            let next = level
                .children
                .get(&exact)
                .or_else(|| {
                    level
                        .wildcards
                        .iter()
                        .find(|w| exact.starts_with(w.trim_end_matches('*')))
                        .and_then(|w| level.children.get(w))
                })
                .or_else(|| level.children.get(key.as_str()));
            let Some(next) = next else { break };
            if i + 1 == entries.len() {
                found = next.limit.as_ref();
            }
            if next.children.is_empty() {
                break;
            }
            level = next;
        }
        found
    }
}

fn load(node: &mut Node, parent: &str, list: &[YamlDescriptor], path: &str) -> Result<()> {
    for (i, d) in list.iter().enumerate() {
        let here = format!("{path}[{i}]");
        let key = d.key.clone().unwrap_or_default();
        if key.is_empty() {
            bail!("{here}.key: a descriptor needs a non-empty key");
        }
        let composite = if d.value.is_empty() {
            key.clone()
        } else {
            format!("{key}_{}", d.value)
        };
        let full = format!("{parent}.{composite}");
        if node.children.contains_key(&composite) {
            bail!("{here}: duplicate descriptor composite key '{full}'");
        }
        let limit = match &d.rate_limit {
            None => None,
            Some(r) => Some(rate_limit(r, d.shadow_mode, &format!("{here}.rate_limit"))?),
        };
        let mut child = Node {
            limit,
            ..Node::default()
        };
        load(
            &mut child,
            &full,
            &d.descriptors,
            &format!("{here}.descriptors"),
        )?;
        if composite.ends_with('*') {
            node.wildcards.push(composite.clone());
        }
        node.children.insert(composite, child);
    }
    Ok(())
}

fn rate_limit(r: &YamlRateLimit, shadow: bool, path: &str) -> Result<Limit> {
    let unit = r.unit.as_deref().map(|u| (u, Unit::parse(u)));
    if r.unlimited {
        if let Some((_, Some(_))) = unit {
            bail!("{path}.unit: should not specify rate limit unit when unlimited");
        }
        return Ok(Limit::Unlimited {
            name: r.name.clone(),
        });
    }
    let unit = match unit {
        Some((_, Some(u))) => u,
        Some((u, None)) => bail!(
            "{path}.unit: invalid rate limit unit '{u}' (second, minute, hour, day, week, month or year)"
        ),
        None => bail!("{path}.unit: missing (second, minute, hour, day, week, month or year)"),
    };
    Ok(Limit::Counted {
        name: r.name.clone(),
        requests: r.requests_per_unit,
        unit,
        shadow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const EDGE: &str = r#"
domain: edge
descriptors:
  - key: rule
    value: per-key
    descriptors:
      - key: x-api-key
        rate_limit: { unit: minute, requests_per_unit: 100 }
      - key: x-api-key
        value: vip
        rate_limit: { unit: minute, requests_per_unit: 1000 }
      - key: x-api-key
        value: "test-*"
        rate_limit: { unit: second, requests_per_unit: 1 }
        shadow_mode: true
  - key: rule
    value: open
    rate_limit: { unlimited: true }
"#;

    fn counted(requests: u32, unit: Unit, shadow: bool) -> Limit {
        Limit::Counted {
            name: String::new(),
            requests,
            unit,
            shadow,
        }
    }

    #[test]
    fn a_descriptor_finds_the_most_specific_node_of_its_last_entry() {
        let c = Config::parse(EDGE).unwrap();
        assert_eq!(c.domain, "edge");
        let rule = ("rule", "per-key");
        assert_eq!(
            c.limit_for(&entries(&[rule, ("x-api-key", "k1")])),
            Some(&counted(100, Unit::Minute, false))
        );
        assert_eq!(
            c.limit_for(&entries(&[rule, ("x-api-key", "vip")])),
            Some(&counted(1000, Unit::Minute, false))
        );
        assert_eq!(
            c.limit_for(&entries(&[rule, ("x-api-key", "test-7")])),
            Some(&counted(1, Unit::Second, true))
        );
        assert_eq!(
            c.limit_for(&entries(&[("rule", "open")])),
            Some(&Limit::Unlimited {
                name: String::new()
            })
        );
    }

    #[test]
    fn a_limit_applies_only_at_the_depth_of_the_request() {
        let c = Config::parse(EDGE).unwrap();
        // Shorter than the tree: the rule node has no limit of its own.
        assert_eq!(c.limit_for(&entries(&[("rule", "per-key")])), None);
        // Longer than the tree: envoyproxy/ratelimit applies nothing.
        let deep = entries(&[("rule", "per-key"), ("x-api-key", "k"), ("extra", "x")]);
        assert_eq!(c.limit_for(&deep), None);
        assert_eq!(c.limit_for(&entries(&[("rule", "other")])), None);
        assert_eq!(c.limit_for(&[]), None);
    }

    #[test]
    fn the_readme_example_is_the_example_file_and_means_what_it_says() {
        let file = include_str!("../examples/limits.yaml");
        let readme = include_str!("../README.md");
        assert!(
            readme.contains(&format!(
                "<!-- example: examples/limits.yaml -->\n```yaml\n{file}```"
            )),
            "the README's example differs from examples/limits.yaml"
        );
        let c = Config::parse(file).unwrap();
        let limit = |key: &str| c.limit_for(&entries(&[("rule", "per-key"), ("x-api-key", key)]));
        assert_eq!(limit("any"), Some(&counted(100, Unit::Minute, false)));
        assert_eq!(
            limit("partner-1"),
            Some(&counted(1000, Unit::Minute, false))
        );
        assert_eq!(limit("test-9"), Some(&counted(1, Unit::Second, true)));
        assert!(matches!(
            c.limit_for(&entries(&[("rule", "internal")])),
            Some(Limit::Unlimited { .. })
        ));
    }

    fn error(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn errors_name_the_field_or_the_line() {
        assert!(error("descriptors: []").contains("domain: must be"));
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n");
        assert!(
            e.contains("descriptors[0].rate_limit.unit: invalid rate limit unit 'fortnight'"),
            "{e}"
        );
        let e = error("domain: d\ndescriptors:\n  - key: a\n  - key: a\n");
        assert!(
            e.contains("descriptors[1]: duplicate descriptor composite key 'd.a'"),
            "{e}"
        );
        let e = error("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - value: x\n");
        assert!(e.contains("descriptors[0].descriptors[0].key"), "{e}");
        let e = error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n");
        assert!(e.contains("should not specify rate limit unit"), "{e}");
        let e = error("domain: d\ndescriptors:\n  - key: a\n    ratelimit: {unit: second}\n");
        assert!(e.contains("unknown field `ratelimit`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }
}
