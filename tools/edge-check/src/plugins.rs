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

    /// The plugin whose section of `edge.wasm`'s configuration is `section`.
    fn by_section(section: &str) -> Option<Plugin> {
        let at = edge_core::config::SECTIONS
            .iter()
            .position(|s| *s == section)?;
        Plugin::ALL.get(at).copied()
    }
}

/// What a wasm filter runs: one of our plugins, or all of them as `edge.wasm`'s stages.
enum Module {
    One(Plugin),
    Edge,
}

impl Module {
    /// The module file names it when it is one of ours (it is what runs), else the `root_id`.
    fn of_wasm(config: &Node<'_>) -> Option<Module> {
        let by_name = |name: &str| match name {
            "edge" => Some(Module::Edge),
            _ => Plugin::by_name(name).map(Module::One),
        };
        let file = yaml::str_at(config, &["vm_config", "code", "local", "filename"])
            .and_then(|f| f.rsplit(['/', '\\']).next())
            .and_then(|f| f.strip_suffix(".wasm"))
            .and_then(by_name);
        file.or_else(|| yaml::str_at(config, &["root_id"]).and_then(by_name))
    }
}

impl Plugin {
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
    /// The error is about `edge.wasm`'s configuration as a whole (its sections), not `plugin`'s.
    pub whole: bool,
    /// The plugin's section, in `edge.wasm`'s configuration.
    pub section: Option<&'static str>,
}

#[derive(Clone)]
struct JsonText {
    text: String,
    /// YAML line of the text's first line, when the text's lines are the YAML's lines (a
    /// literal block scalar, `value: |`), so a line inside it maps to one of the file.
    first_line: Option<usize>,
    /// The line of `value:`.
    value_line: usize,
}

impl Filter {
    /// Reads a `http_filters` entry: one filter per plugin it runs (`edge.wasm`: one per
    /// section its configuration has), none when it is not ours.
    pub fn read(source: &str, entry: &Node<'_>, index: usize) -> Vec<Filter> {
        Self::read_module(source, entry, index).unwrap_or_default()
    }

    fn read_module(source: &str, entry: &Node<'_>, index: usize) -> Option<Vec<Filter>> {
        if !yaml::is_filter(entry, "envoy.filters.http.wasm", WASM_TYPE) {
            return None;
        }
        let config = yaml::path(entry, &["typed_config", "config"])?;
        let module = Module::of_wasm(config)?;
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
        let not_text = value.is_some_and(|(_, v)| v.data.as_str().is_none());
        let text = json.as_ref().map_or(&[][..], |j| j.text.as_bytes());
        let filter = |plugin, config| Filter {
            plugin,
            line,
            index,
            json: json.clone(),
            config,
            config_line,
            whole: false,
            section: None,
        };
        if not_text {
            let plugin = match module {
                Module::One(p) => p,
                Module::Edge => Plugin::RateLimit,
            };
            return Some(vec![Filter {
                whole: matches!(module, Module::Edge),
                ..filter(
                    plugin,
                    Err(ConfigError::new(
                        "configuration",
                        "the StringValue's `value` must be a string holding the JSON configuration",
                    )),
                )
            }]);
        }
        let plugin = match module {
            Module::One(plugin) => return Some(vec![filter(plugin, plugin.parse(text))]),
            Module::Edge => Plugin::RateLimit,
        };
        let sections = match edge_core::config::split_sections(text, &edge_core::config::SECTIONS) {
            Ok(s) => s,
            // Not one plugin's: the finding names no plugin (see `whole`).
            Err(why) => {
                let (field, message) = why.split_once(": ").unwrap_or(("configuration", &why));
                return Some(vec![Filter {
                    whole: true,
                    ..filter(plugin, Err(ConfigError::new(field, message)))
                }]);
            }
        };
        Some(
            edge_core::config::SECTIONS
                .iter()
                .zip(sections)
                .filter_map(|(section, bytes)| {
                    let plugin = Plugin::by_section(section)?;
                    let parsed = plugin.parse(&bytes?).map_err(|e| e.in_section(section));
                    Some(Filter {
                        section: Some(section),
                        ..filter(plugin, parsed)
                    })
                })
                .collect(),
        )
    }

    /// `path` (as the plugin names its fields) within the whole configuration: under the
    /// plugin's section in `edge.wasm`'s.
    pub fn path(&self, path: &str) -> String {
        match self.section {
            Some(section) => format!("{section}.{path}"),
            None => path.to_string(),
        }
    }

    /// The YAML line of a field of the configuration (`path` as in [`Filter::path`]), or of
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
