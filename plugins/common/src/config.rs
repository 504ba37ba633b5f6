//! Configuration errors that name the field, so Envoy's log says exactly what to fix
//! (`rules[2].limit.requests: must be > 0`) and the plugin refuses the config at load.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_leads_with_the_field() {
        let e = ConfigError::new("rules[2].limit.requests", "must be > 0");
        assert_eq!(e.to_string(), "rules[2].limit.requests: must be > 0");
    }

    #[test]
    fn json_errors_keep_serdes_detail() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            mode: String,
        }
        let err = serde_json::from_str::<C>(r#"{"mdoe":"x"}"#).unwrap_err();
        let e = ConfigError::from_json(&err);
        assert!(e.to_string().contains("unknown field `mdoe`"), "{e}");
    }
}
