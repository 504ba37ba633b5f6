//! Configuration errors that name the field, so Envoy's log says exactly what to fix
//! (`rules[2].limit.requests: must be > 0`) and the plugin refuses the config at load.

use serde::de::DeserializeOwned;
use std::fmt;

/// A rejected configuration: the JSON path of the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A JSON syntax or shape error from serde; its message already names the field or token.
    pub fn from_json(err: &serde_json::Error) -> Self {
        ConfigError::new("configuration", err.to_string())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Parses a plugin configuration; a type or unknown-field error names the JSON path of the
/// field (`rules[0].limit.requests: invalid type: string "10", expected u64`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            "configuration",
            "missing: the filter needs a JSON configuration",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." || path == "?" {
            "configuration".to_string()
        } else {
            path
        };
        ConfigError::new(field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_leads_with_the_field() {
        let e = ConfigError::new("rules[2].limit.requests", "must be > 0");
        assert_eq!(e.to_string(), "rules[2].limit.requests: must be > 0");
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limit {
        requests: u64,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct C {
        rules: Vec<Limit>,
    }

    #[test]
    fn json_errors_name_the_path() {
        let e = parse_json::<C>(br#"{"rules":[{"requests":1},{"requests":"x"}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[1].requests", "{e}");
        let e = parse_json::<C>(br#"{"rules":[{"requets":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `requets`"), "{e}");
        let e = parse_json::<C>(b"  ").unwrap_err();
        assert!(e.to_string().starts_with("configuration: missing"), "{e}");
        let e = parse_json::<C>(b"{").unwrap_err();
        assert_eq!(e.field, "configuration", "{e}");
    }
}
