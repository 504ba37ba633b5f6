//! The flag-router configuration: where context values come from, which flags become which
//! headers, the bootstrap flags and the optional remote flag source.

use crate::flags::FlagSet;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::time::Duration;
use edge_core::key::KeyPart;
use edge_core::{parse_json, ConfigError, Node};
use serde_json::Value;

/// What a context value's request text becomes: flagd contexts hold typed values, and a rule
/// such as `{">=": [{"var": "age"}, 18]}` means a number, not the text `"18"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    String,
    Number,
    Boolean,
}

impl ValueType {
    /// The value, or `None` when the text does not parse as this type (the attribute is then
    /// left absent, as if the request had not sent it).
    pub fn parse(self, text: String) -> Option<Value> {
        match self {
            ValueType::String => Some(Value::String(text)),
            ValueType::Boolean => match text.trim() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            // A JSON number, read by the configuration's own JSON parser: Rust's float
            // parsing would add a tenth to the module's size.
            ValueType::Number => match parse_json(text.as_bytes()) {
                Ok(n @ Value::Number(_)) => Some(n),
                _ => None,
            },
        }
    }
}

/// One attribute of the evaluation context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    /// The configured name, for logs.
    pub name: String,
    /// The name split on dots: `user.name` is `{"user": {"name": ...}}`, where `var` finds it.
    pub path: Vec<String>,
    pub part: KeyPart,
    pub kind: ValueType,
}

/// A key part with an optional `type` (`string`, `number`, `boolean`).
fn typed_part(n: Node<'_>) -> Result<(KeyPart, ValueType), ConfigError> {
    let Some(m) = n.value.as_object() else {
        return Ok((KeyPart::read(n)?, ValueType::String));
    };
    // So that an unknown field's error lists `type` too; `KeyPart::read` reads the rest.
    const FIELDS: [&str; 4] = ["source", "header", "cookie", "type"];
    n.obj(&FIELDS)?.ignore(&FIELDS);
    let Some(t) = m.get("type") else {
        return Ok((KeyPart::read(n)?, ValueType::String));
    };
    let path = format!("{}.type", n.path());
    let kind = Node::at(t, &path).one_of(&[
        ("string", ValueType::String),
        ("number", ValueType::Number),
        ("boolean", ValueType::Boolean),
    ])?;
    // Inserting into a new map, not cloning and removing: the module already holds
    // `insert` (the JSON parser's), and `remove` would add kilobytes.
    let mut rest = serde_json::Map::new();
    for (k, v) in m.iter().filter(|(k, _)| *k != "type") {
        rest.insert(k.clone(), v.clone());
    }
    let rest = Value::Object(rest);
    Ok((KeyPart::read(Node::at(&rest, n.path()))?, kind))
}

/// Where the flag document is fetched from, through an Envoy cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub poll_interval: Duration,
    pub timeout: Duration,
}

impl Source {
    /// The poll timer's period for the host (the configuration bounds it to 1s-24h).
    pub fn poll_ms(&self) -> u32 {
        u32::try_from(self.poll_interval.as_millis()).unwrap_or(u32::MAX)
    }

    /// The fetch timeout for the host (at most 1h by the configuration).
    pub fn timeout_ms(&self) -> u32 {
        u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX)
    }
}

pub struct Config {
    pub targeting_key: Option<KeyPart>,
    /// Where each context attribute comes from, in configuration order.
    pub context: Vec<Attribute>,
    /// Flag key → request header it sets (lower-case).
    pub headers: Vec<(String, String)>,
    pub flags: FlagSet,
    pub source: Option<Source>,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let json = parse_json(bytes)?;
        let o = Node::root(&json).obj(&[
            "targetingKey",
            "context",
            "headers",
            "flags",
            "$evaluators",
            "source",
        ])?;
        let targeting_key = o.opt("targetingKey", |n| match typed_part(n)? {
            (part, ValueType::String) => Ok(part),
            _ => Err(ConfigError::new(
                format!("{}.type", n.path()),
                "flagd's targetingKey is a string: only \"string\"",
            )),
        })?;
        let context = o.entries("context", |k, n| {
            let path: Vec<String> = k.split('.').map(str::to_string).collect();
            let first = path.first().map(String::as_str).unwrap_or("");
            if first == "targetingKey" || first.starts_with("$flagd") {
                return Err(n.err("is set by the evaluator; use the top-level targetingKey"));
            }
            if path.iter().any(String::is_empty) {
                return Err(n.err("a dotted name needs a name between every two dots"));
            }
            let (part, kind) = typed_part(n)?;
            Ok(Attribute {
                name: k.to_string(),
                path,
                part,
                kind,
            })
        })?;
        // `user` and `user.name` cannot both be set: one is a string, the other an object.
        for a in &context {
            if let Some(b) = context
                .iter()
                .find(|b| b.path.len() > a.path.len() && b.path.starts_with(&a.path))
            {
                return Err(o.err(
                    &format!("context.{}", b.name),
                    format!("is inside \"{}\", which is also set", a.name),
                ));
            }
        }
        let headers = o.entries("headers", |k, n| Ok((k.to_string(), n.header_name()?)))?;
        if headers.is_empty() {
            return Err(o.err("headers", "required: map at least one flag to a header"));
        }
        if let Some((k, h)) = headers
            .iter()
            .find(|(k, h)| headers.iter().any(|(k2, h2)| h2 == h && k2 != k))
        {
            return Err(o.err(
                "headers",
                format!("\"{h}\" is set by more than one flag (\"{k}\")"),
            ));
        }
        let evaluators = FlagSet::evaluators(&o)?;
        let flags = o
            .opt("flags", |n| FlagSet::read(n, &evaluators))?
            .unwrap_or_default();
        let source = o.opt("source", |n| {
            let s = n.obj(&["cluster", "authority", "path", "pollInterval", "timeout"])?;
            let cluster = s.req("cluster", |n| {
                let c = n.str()?;
                if c.is_empty() {
                    Err(n.err("must name an Envoy cluster"))
                } else {
                    Ok(c.to_string())
                }
            })?;
            Ok(Source {
                authority: s
                    .opt("authority", |n| n.str().map(str::to_string))?
                    .unwrap_or_else(|| cluster.clone()),
                cluster,
                path: s.req("path", |n| n.url_path())?,
                poll_interval: s
                    .opt("pollInterval", |n| {
                        n.duration_in(
                            (Duration::from_secs(1), "1s"),
                            (Duration::from_secs(86_400), "24h"),
                        )
                    })?
                    .unwrap_or(Duration::from_secs(30)),
                timeout: s
                    .opt("timeout", |n| {
                        n.duration_in(
                            (Duration::from_millis(1), "1ms"),
                            (Duration::from_secs(3_600), "1h"),
                        )
                    })?
                    .unwrap_or(Duration::from_secs(5)),
            })
        })?;
        if source.is_none() {
            if let Some((k, _)) = headers.iter().find(|(k, _)| !flags.flags.contains_key(k)) {
                return Err(ConfigError::new(
                    format!("headers.{k}"),
                    "no such flag in `flags` (and no `source` to fetch it from)",
                ));
            }
        }
        Ok(Config {
            targeting_key,
            context,
            headers,
            flags,
            source,
        })
    }
}
