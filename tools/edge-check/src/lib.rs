//! `edge-check`: reads an Envoy YAML, checks the configuration of every edge plugin filter with
//! the plugin's own parser, then lints the filter chain around them. What CI runs before a
//! config reaches an Envoy that would refuse it, or run it in a way the plugins do not expect.

pub mod json_pos;
mod lints;
mod plugins;
mod yaml;

use saphyr::{LoadableYamlNode, MarkedYaml};
use serde_json::json;
use std::fmt;

pub use plugins::Plugin;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Envoy refuses the config, or the chain cannot work as the plugins document.
    Error,
    /// The chain runs, but not the way its author most likely meant.
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem, at a line of the YAML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    /// The plugin the finding is about, when it is about one.
    pub plugin: Option<Plugin>,
    /// A field path in the plugin's JSON configuration (`rules[0].limit.requests`), or the
    /// Envoy field the finding is about (`http_filters[2]`).
    pub path: String,
    pub severity: Severity,
    pub message: String,
}

impl Finding {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "file": self.file,
            "line": self.line,
            "plugin": self.plugin.map(Plugin::name),
            "path": self.path,
            "severity": self.severity.as_str(),
            "message": self.message,
        })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: ",
            self.file,
            self.line,
            self.severity.as_str()
        )?;
        if let Some(p) = self.plugin {
            write!(f, "{}: ", p.name())?;
        }
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A file that cannot be checked (it is not YAML).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks one Envoy YAML text; `file` names it in the findings. Findings come in line order.
pub fn check(file: &str, text: &str) -> Result<Vec<Finding>, Unreadable> {
    let docs = MarkedYaml::load_from_str(text)
        .map_err(|e| Unreadable(format!("{file}: not YAML: {e}")))?;
    let mut out = Vec::new();
    for doc in &docs {
        lints::document(file, text, doc, &mut out);
    }
    out.sort_by_key(|f| f.line);
    Ok(out)
}

/// Checks one plugin's JSON configuration on its own (what the `value` of its filter holds):
/// the plugin's parser, with the error at its line of `text`. No chain lints: they need the
/// Envoy YAML around it.
pub fn check_plugin(plugin: Plugin, file: &str, text: &str) -> Vec<Finding> {
    let Err(e) = plugins::parse(plugin, text.as_bytes()) else {
        return Vec::new();
    };
    let line = match serde_json::from_str::<serde_json::Value>(text) {
        Err(syntax) if !text.trim().is_empty() => syntax.line(),
        _ => json_pos::line_of(text, &e.field).unwrap_or(1),
    };
    vec![Finding {
        file: file.to_string(),
        line,
        plugin: Some(plugin),
        path: e.field,
        severity: Severity::Error,
        message: format!("{}: Envoy refuses this configuration", e.message),
    }]
}
