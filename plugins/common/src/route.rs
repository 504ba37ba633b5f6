//! Request matching shared by every plugin's `match`/`routes`: `pathPrefix`, `path` (exact),
//! `methods`, `headers` (exact value). Omitted conditions match anything.

use crate::request::RequestView;
use crate::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;

/// A route condition as written in JSON.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub path_prefix: Option<String>,
    pub path: Option<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, String>>,
}

/// A validated [`RouteSpec`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    path_prefix: Option<String>,
    path: Option<String>,
    methods: Vec<String>,
    headers: Vec<(String, String)>,
}

impl Route {
    pub fn compile(spec: &RouteSpec, field: &str) -> Result<Route, ConfigError> {
        for (name, p) in [("pathPrefix", &spec.path_prefix), ("path", &spec.path)] {
            if let Some(p) = p {
                if !p.starts_with('/') {
                    return Err(ConfigError::new(
                        format!("{field}.{name}"),
                        format!("\"{p}\" must start with /"),
                    ));
                }
            }
        }
        let methods = spec.methods.clone().unwrap_or_default();
        if spec.methods.is_some() && methods.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.methods"),
                "must list at least one method (omit it to match any)",
            ));
        }
        if let Some(m) = methods
            .iter()
            .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(ConfigError::new(
                format!("{field}.methods"),
                format!("\"{m}\" is not an HTTP method"),
            ));
        }
        Ok(Route {
            path_prefix: spec.path_prefix.clone(),
            path: spec.path.clone(),
            methods: methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            headers: spec
                .headers
                .iter()
                .flatten()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        })
    }

    /// True when every given condition holds.
    pub fn matches(&self, req: &impl RequestView) -> bool {
        if self.path_prefix.is_some() || self.path.is_some() {
            let path = req.path();
            if let Some(p) = &self.path_prefix {
                if !path.starts_with(p.as_bytes()) {
                    return false;
                }
            }
            if let Some(p) = &self.path {
                if path != p.as_bytes() {
                    return false;
                }
            }
        }
        if !self.methods.is_empty() {
            let m = req.method();
            if !self.methods.iter().any(|x| x.as_bytes() == m.as_slice()) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(k, v)| req.header(k).as_deref() == Some(v.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestParts;

    fn route(json: &str) -> Route {
        Route::compile(&serde_json::from_str(json).unwrap(), "match").unwrap()
    }

    #[test]
    fn every_given_condition_must_hold() {
        let r =
            route(r#"{"pathPrefix":"/api/","methods":["get","POST"],"headers":{"X-Tier":"free"}}"#);
        let ok = RequestParts::new("GET", "/api/x?q=1").header("x-tier", "free");
        assert!(r.matches(&ok));
        assert!(!r.matches(&RequestParts::new("GET", "/api/x")));
        assert!(!r.matches(&RequestParts::new("PUT", "/api/x").header("x-tier", "free")));
        assert!(!r.matches(&RequestParts::new("GET", "/apix").header("x-tier", "free")));
        assert!(!r.matches(&RequestParts::new("GET", "/api/").header("x-tier", "paid")));
        assert!(route("{}").matches(&RequestParts::new("DELETE", "/anything")));
    }

    #[test]
    fn exact_path_ignores_the_query() {
        let r = route(r#"{"path":"/login"}"#);
        assert!(r.matches(&RequestParts::new("POST", "/login?next=/")));
        assert!(!r.matches(&RequestParts::new("POST", "/login/x")));
    }

    #[test]
    fn bad_conditions_name_the_field() {
        let bad = |json: &str| {
            Route::compile(&serde_json::from_str(json).unwrap(), "rules[1].match")
                .unwrap_err()
                .to_string()
        };
        assert!(bad(r#"{"pathPrefix":"api"}"#).starts_with("rules[1].match.pathPrefix:"));
        assert!(bad(r#"{"methods":[]}"#).starts_with("rules[1].match.methods:"));
        assert!(bad(r#"{"methods":["G T"]}"#).contains("not an HTTP method"));
    }
}
