//! Our plugins as they appear in an Envoy config: which wasm filter is which plugin, and its
//! configuration read by the plugin's own parser.

use crate::json_pos;
use crate::yaml::{self, Node};
use edge_core::ConfigError;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// The plugins, in the README's order (rate limit first, cached fallback last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Plugin {
    RateLimit,
    FlagRouter,
    Idempotency,
    CachedFallback,
}

impl Plugin {
    pub const ALL: [Plugin; 4] = [
        Plugin::RateLimit,
        Plugin::FlagRouter,
        Plugin::Idempotency,
        Plugin::CachedFallback,
    ];

    /// The module's name, its `root_id` in our configs and its file `<name>.wasm`.
    pub fn name(self) -> &'static str {
        match self {
            Plugin::RateLimit => "rate_limit",
            Plugin::FlagRouter => "flag_router",
            Plugin::Idempotency => "idempotency",
            Plugin::CachedFallback => "cached_fallback",
        }
    }

    /// The plugin whose module name is `name` (`rate_limit`, ...).
    pub fn by_name(name: &str) -> Option<Plugin> {
        Plugin::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The module file names it when it is one of ours (it is what runs), else the `root_id`.
    fn of_wasm(config: &Node<'_>) -> Option<Plugin> {
        let file = yaml::str_at(config, &["vm_config", "code", "local", "filename"])
            .and_then(|f| f.rsplit(['/', '\\']).next())
            .and_then(|f| f.strip_suffix(".wasm"))
            .and_then(Plugin::by_name);
        file.or_else(|| yaml::str_at(config, &["root_id"]).and_then(Plugin::by_name))
    }

    fn parse(self, json: &[u8]) -> Result<Parsed, ConfigError> {
        Ok(match self {
            Plugin::RateLimit => Parsed::RateLimit(rate_limit::config::Config::parse(json)?),
            Plugin::FlagRouter => Parsed::FlagRouter(flag_router::config::Config::parse(json)?),
            Plugin::Idempotency => Parsed::Idempotency(idempotency::config::Config::parse(json)?),
            Plugin::CachedFallback => {
                cached_fallback::config::Config::parse(json)?;
                Parsed::CachedFallback
            }
        })
    }
}

/// `plugin`'s parser on a JSON configuration, for [`crate::check_plugin`].
pub fn parse(plugin: Plugin, json: &[u8]) -> Result<(), ConfigError> {
    plugin.parse(json).map(|_| ())
}

/// A configuration the plugin accepted, kept where a lint reads it.
pub enum Parsed {
    RateLimit(rate_limit::config::Config),
    FlagRouter(flag_router::config::Config),
    Idempotency(idempotency::config::Config),
    CachedFallback,
}

/// One of our wasm filters in a chain.
pub struct Filter {
    pub plugin: Plugin,
    /// Its line: that of its `name`.
    pub line: usize,
    /// Its position in `http_filters`.
    pub index: usize,
    /// The JSON text of its configuration and where it sits in the YAML.
    json: Option<JsonText>,
    pub config: Result<Parsed, ConfigError>,
    /// The line of the configuration's `value` (the filter's line when there is none).
    pub config_line: usize,
}

struct JsonText {
    text: String,
    /// YAML line of the text's first line, when the text's lines are the YAML's lines (a
    /// literal block scalar, `value: |`), so a line inside it maps to one of the file.
    first_line: Option<usize>,
    /// The line of `value:`.
    value_line: usize,
}

impl Filter {
    /// Reads a `http_filters` entry; `None` when it is not one of our plugins.
    pub fn read(source: &str, entry: &Node<'_>, index: usize) -> Option<Filter> {
        if !yaml::is_filter(entry, "envoy.filters.http.wasm", WASM_TYPE) {
            return None;
        }
        let config = yaml::path(entry, &["typed_config", "config"])?;
        let plugin = Plugin::of_wasm(config)?;
        let line = yaml::entry(entry, "name").map_or(yaml::line(entry), |(k, _)| yaml::line(k));
        let value = yaml::path(config, &["configuration"]).and_then(|c| yaml::entry(c, "value"));
        let json = value.map(|(key, value)| {
            let literal = literal_block(source, key);
            JsonText {
                text: value.data.as_str().unwrap_or_default().to_string(),
                first_line: literal.then(|| yaml::line(key) + 1),
                // A block's node starts at its text; the reader looks for `value: |`.
                value_line: if literal {
                    yaml::line(key)
                } else {
                    yaml::line(value)
                },
            }
        });
        let config_line = json.as_ref().map_or(line, |j| j.value_line);
        let parsed = match value {
            Some((_, v)) if v.data.as_str().is_none() => Err(ConfigError::new(
                "configuration",
                "the StringValue's `value` must be a string holding the JSON configuration",
            )),
            _ => plugin.parse(json.as_ref().map_or(&[][..], |j| j.text.as_bytes())),
        };
        Some(Filter {
            plugin,
            line,
            index,
            json,
            config: parsed,
            config_line,
        })
    }

    /// The YAML line of a field of the configuration (`path` as the plugins name it), or of
    /// the configuration when the field has no line of its own in the file.
    pub fn line_of(&self, path: &str) -> usize {
        self.json
            .as_ref()
            .and_then(|j| Some(j.first_line? + json_pos::line_of(&j.text, path)? - 1))
            .unwrap_or(self.config_line)
    }

    /// The YAML line where the configuration's JSON breaks, when it does.
    pub fn syntax_error_line(&self) -> Option<usize> {
        let j = self.json.as_ref()?;
        if j.text.trim().is_empty() {
            return None;
        }
        let err = serde_json::from_str::<serde_json::Value>(&j.text).err()?;
        Some(j.first_line.map_or(j.value_line, |f| f + err.line() - 1))
    }
}

/// Whether the scalar after `key:` is a literal block (`|`, `|-`, `|2`...), whose lines are
/// the text's lines one for one.
fn literal_block(source: &str, key: &Node<'_>) -> bool {
    let Some(text) = source.lines().nth(yaml::line(key).saturating_sub(1)) else {
        return false;
    };
    let after_key: String = text.chars().skip(key.span.start.col()).collect();
    after_key
        .split_once(':')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('|'))
}
