//! The flag-router configuration: where context values come from, which flags become which
//! headers, the bootstrap flags and the optional remote flag source.

use crate::flags::FlagSet;
use edge_core::key::KeyPart;
use edge_core::{parse_json, ConfigError, Node};
use std::time::Duration;

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
    /// Context attribute name → where its value comes from.
    pub context: Vec<(String, KeyPart)>,
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
        let targeting_key = o.opt("targetingKey", KeyPart::read)?;
        let context = o.entries("context", |k, n| {
            if k == "targetingKey" || k.starts_with("$flagd") {
                return Err(n.err("is set by the evaluator; use the top-level targetingKey"));
            }
            Ok((k.to_string(), KeyPart::read(n)?))
        })?;
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
