//! Request matching shared by every plugin's `match`/`routes`: `pathPrefix`, `path` (exact),
//! `methods`, `headers` (exact value). Omitted conditions match anything.

use crate::config::Node;
use crate::request::RequestView;
use crate::ConfigError;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;

/// A validated route condition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    path_prefix: Option<String>,
    path: Option<String>,
    methods: Vec<String>,
    headers: Vec<(String, String)>,
}

impl Route {
    /// Reads `{"pathPrefix", "path", "methods", "headers"}`, all optional.
    pub fn read(n: Node<'_>) -> Result<Route, ConfigError> {
        let o = n.obj(&["pathPrefix", "path", "methods", "headers"])?;
        // Omitted: any method.
        let methods = o.methods("methods", &[], &[], "")?;
        Ok(Route {
            path_prefix: o.opt("pathPrefix", |n| n.url_path())?,
            path: o.opt("path", |n| n.url_path())?,
            methods,
            headers: o.entries("headers", |k, n| {
                Ok((n.header_named(k)?, n.str()?.to_string()))
            })?,
        })
    }

    /// True when every given condition holds.
    pub fn matches(&self, req: &impl RequestView) -> bool {
        if (self.path_prefix.is_some() || self.path.is_some())
            && !req.path_is(&|path| {
                self.path_prefix
                    .as_ref()
                    .is_none_or(|p| path.starts_with(p.as_bytes()))
                    && self.path.as_ref().is_none_or(|p| path == p.as_bytes())
            })
        {
            return false;
        }
        if !self.methods.is_empty()
            && !req.method_is(&|m| self.methods.iter().any(|x| x.as_bytes() == m))
        {
            return false;
        }
        self.headers
            .iter()
            .all(|(k, v)| req.header(k).as_deref() == Some(v.as_bytes()))
    }
}

/// Whether a request is one a plugin covers: its method is listed and a route matches (no
/// routes: every path).
pub fn covers(methods: &[String], routes: &[Route], req: &impl RequestView) -> bool {
    req.method_is(&|m| methods.iter().any(|x| x.as_bytes() == m))
        && (routes.is_empty() || routes.iter().any(|r| r.matches(req)))
}

/// Whether an answer is the upstream's own, by Envoy's `response.code_details`. Envoy reports
/// `""` for a filter's local reply that gave no details (proxy-wasm plugins' replies usually
/// do), so only `via_upstream` counts; a host that does not report the property at all leaves
/// the status to decide.
pub fn from_upstream(details: Option<&str>) -> bool {
    details.is_none_or(|d| d == "via_upstream")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestParts;
    use alloc::format;

    fn read(json: &str) -> Result<Route, ConfigError> {
        let v: serde_json::Value = serde_json::from_str(&format!(r#"{{"match":{json}}}"#)).unwrap();
        let o = Node::root(&v).obj(&["match"])?;
        o.req("match", Route::read)
    }

    fn route(json: &str) -> Route {
        read(json).unwrap()
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
    fn a_header_condition_must_name_a_header() {
        let e = read(r#"{"headers":{"x tier":"free"}}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("match.headers.x tier: \"x tier\" is not a header name"),
            "{e}"
        );
    }

    #[test]
    fn exact_path_ignores_the_query() {
        let r = route(r#"{"path":"/login"}"#);
        assert!(r.matches(&RequestParts::new("POST", "/login?next=/")));
        assert!(!r.matches(&RequestParts::new("POST", "/login/x")));
    }

    #[test]
    fn bad_conditions_name_the_field() {
        let bad = |json: &str| read(json).unwrap_err().to_string();
        assert!(bad(r#"{"pathPrefix":"api"}"#).starts_with("match.pathPrefix:"));
        assert!(bad(r#"{"methods":[]}"#).starts_with("match.methods:"));
        assert!(bad(r#"{"methods":["GET",1]}"#).starts_with("match.methods[1]: expected a string"));
        assert!(bad(r#"{"headers":{"x":1}}"#).starts_with("match.headers.x:"));
        assert!(bad(r#"{"methods":["G T"]}"#).contains("not an HTTP method"));
    }

    #[test]
    fn only_via_upstream_or_no_property_is_the_upstreams_answer() {
        assert!(from_upstream(Some("via_upstream")));
        assert!(from_upstream(None));
        assert!(
            !from_upstream(Some("")),
            "another filter's reply without details"
        );
        assert!(!from_upstream(Some("response_timeout")));
    }
}
