//! Configuration errors that name the field, so Envoy's log says exactly what to fix
//! (`rules[2].limit.requests: must be > 0`) and the plugin refuses the config at load.

use crate::duration::parse_duration;
use serde_json::{Map, Value};
use std::fmt;
use std::time::Duration;

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

/// Parses a plugin configuration into a JSON tree to be read with [`Node`]. Every plugin reads
/// its config this way rather than through `#[derive(Deserialize)]`: the tree walk names the
/// exact path of any bad field and costs a fraction of the module size of derived code.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new(
            "configuration",
            "missing: the filter needs a JSON configuration",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| ConfigError::from_json(&e))
}

/// A value in the config tree and its JSON path, for errors that name the field.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    pub value: &'a Value,
    path: &'a str,
}

/// An object whose fields were checked against the allowed names.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl<'a> Node<'a> {
    /// The root of a configuration (its path is `configuration` in errors).
    pub fn root(value: &'a Value) -> Node<'a> {
        Node { value, path: "" }
    }

    /// A value read from elsewhere, reported under `path`.
    pub fn at(value: &'a Value, path: &'a str) -> Node<'a> {
        Node { value, path }
    }

    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "configuration"
        } else {
            self.path
        }
    }

    pub fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path(), message)
    }

    fn expected(&self, what: &str) -> ConfigError {
        self.err(format!("expected {what}, found {}", kind(self.value)))
    }

    /// This value as an object with only the `allowed` fields.
    pub fn obj(&self, allowed: &[&str]) -> Result<Obj<'a>, ConfigError> {
        let map = self
            .value
            .as_object()
            .ok_or_else(|| self.expected("an object"))?;
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(self.err(format!(
                "unknown field `{k}`, expected one of {}",
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(Obj {
            map,
            path: self.path.to_string(),
        })
    }

    pub fn str(&self) -> Result<&'a str, ConfigError> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    pub fn bool(&self) -> Result<bool, ConfigError> {
        self.value
            .as_bool()
            .ok_or_else(|| self.expected("true or false"))
    }

    pub fn u64(&self) -> Result<u64, ConfigError> {
        self.value
            .as_u64()
            .ok_or_else(|| self.expected("a whole number >= 0"))
    }

    /// A duration string (`"250ms"`, `"60s"`, `"5m"`, `"24h"`).
    pub fn duration(&self) -> Result<Duration, ConfigError> {
        parse_duration(self.str()?).map_err(|e| self.err(e))
    }

    /// A duration in nanoseconds, what plugins compare clocks with; one too long to count in
    /// u64 nanoseconds (584 years) is an error, not silently capped.
    pub fn duration_ns(&self) -> Result<u64, ConfigError> {
        u64::try_from(self.duration()?.as_nanos())
            .map_err(|_| self.err("is too long (at most 584 years)"))
    }

    /// [`Node::duration_ns`] that must be longer than zero.
    pub fn positive_duration_ns(&self) -> Result<u64, ConfigError> {
        self.positive_duration()?;
        self.duration_ns()
    }

    /// A whole number in `lo..=hi` (sizes, counts), the bounds named in the error.
    pub fn u64_in(&self, lo: u64, hi: u64) -> Result<u64, ConfigError> {
        let v = self.u64()?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(self.err(format!("must be between {lo} and {hi}, got {v}")))
        }
    }

    /// An HTTP status between `lo` and `hi`; `what` names the kind in the error
    /// (`"200 is not an error status (400-599)"`).
    pub fn status_in(&self, lo: u16, hi: u16, what: &str) -> Result<u16, ConfigError> {
        let s = self.u64()?;
        match u16::try_from(s) {
            Ok(v) if (lo..=hi).contains(&v) => Ok(v),
            _ => Err(self.err(format!("{s} is not {what} ({lo}-{hi})"))),
        }
    }

    /// A duration that must be longer than zero (windows, intervals, timeouts).
    pub fn positive_duration(&self) -> Result<Duration, ConfigError> {
        let d = self.duration()?;
        if d.is_zero() {
            Err(self.err("must be longer than 0"))
        } else {
            Ok(d)
        }
    }

    /// A duration in `lo..=hi`, the bounds named in the error as written (`"1s"`, `"24h"`).
    pub fn duration_in(
        &self,
        lo: (Duration, &str),
        hi: (Duration, &str),
    ) -> Result<Duration, ConfigError> {
        let d = self.duration()?;
        if (lo.0..=hi.0).contains(&d) {
            Ok(d)
        } else {
            Err(self.err(format!("must be between {} and {}", lo.1, hi.1)))
        }
    }

    /// A URL path, which must start with `/`.
    pub fn url_path(&self) -> Result<String, ConfigError> {
        let p = self.str()?;
        if p.starts_with('/') {
            Ok(p.to_string())
        } else {
            Err(self.err(format!("\"{p}\" must start with /")))
        }
    }

    /// An HTTP header name (an RFC 9110 token), lower-cased as Envoy keeps them.
    pub fn header_name(&self) -> Result<String, ConfigError> {
        self.header_named(self.str()?.trim())
    }

    /// `name` (e.g. an object key this node holds the value of) as a header name: a name no
    /// request can carry would silently never match, or key every client alike.
    pub fn header_named(&self, name: &str) -> Result<String, ConfigError> {
        let h = name.to_ascii_lowercase();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if h.is_empty() || !h.bytes().all(token) {
            return Err(self.err(format!("\"{name}\" is not a header name")));
        }
        Ok(h)
    }

    /// One of the given words.
    pub fn one_of(&self, words: &[&str]) -> Result<usize, ConfigError> {
        let s = self.str()?;
        words.iter().position(|w| *w == s).ok_or_else(|| {
            self.err(format!(
                "unknown value \"{s}\", expected one of {}",
                words
                    .iter()
                    .map(|w| format!("\"{w}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }
}

/// The byte limits of a plugin that keeps responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteLimits {
    /// `maxTotalBytes`: kept bodies across workers (at most 4 GiB: lengths are stored as u32).
    pub max_total: u64,
    /// `maxBodyBytes`: one body (at most `max_total` and 64 MiB, the most a worker copies).
    pub max_body: u64,
    /// `maxBufferedBytes`: bodies a worker holds in copies at once (at least `max_body`).
    pub max_buffered: u64,
}

/// The most `maxBufferedBytes` may be: a wasm32 VM has 4 GiB of memory in all.
pub const MAX_BUFFERED_BYTES_LIMIT: u64 = 1 << 30;

impl<'a> Obj<'a> {
    fn child_path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// Runs `read` on field `name` if present (`null` counts as absent).
    /// `maxTotalBytes`, `maxBodyBytes` and `maxBufferedBytes`, each bounded by the others.
    pub fn byte_limits(&self, default_total: u64) -> Result<ByteLimits, ConfigError> {
        let body_limit = crate::stored::MAX_BODY_BYTES_LIMIT;
        let max_total = self
            .opt("maxTotalBytes", |n| n.u64_in(1, u64::from(u32::MAX)))?
            .unwrap_or(default_total);
        // A body over maxTotalBytes could never be kept; a buffer under maxBodyBytes could
        // never hold one: the bounds say so.
        let max_body = self
            .opt("maxBodyBytes", |n| n.u64_in(1, body_limit.min(max_total)))?
            .unwrap_or((1 << 20).min(max_total));
        let max_buffered = self
            .opt("maxBufferedBytes", |n| {
                n.u64_in(max_body, MAX_BUFFERED_BYTES_LIMIT)
            })?
            .unwrap_or((32 << 20).max(max_body));
        Ok(ByteLimits {
            max_total,
            max_body,
            max_buffered,
        })
    }

    pub fn opt<T>(
        &self,
        name: &str,
        read: impl FnOnce(Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => {
                let path = self.child_path(name);
                read(Node { value, path: &path }).map(Some)
            }
        }
    }

    /// Runs `read` on field `name`, which must be present.
    pub fn req<T>(
        &self,
        name: &str,
        read: impl FnOnce(Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        self.opt(name, read)?
            .ok_or_else(|| ConfigError::new(self.child_path(name), "required field is missing"))
    }

    /// Runs `read` on each element of list field `name` (absent = empty list).
    pub fn list<T>(
        &self,
        name: &str,
        mut read: impl FnMut(Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        self.opt(name, |n| {
            let items = n.value.as_array().ok_or_else(|| n.expected("a list"))?;
            items
                .iter()
                .enumerate()
                .map(|(i, value)| {
                    let path = format!("{}[{i}]", n.path);
                    read(Node { value, path: &path })
                })
                .collect()
        })
        .map(Option::unwrap_or_default)
    }

    /// Runs `read` on each value of object field `name`, with its key (absent = empty).
    pub fn entries<T>(
        &self,
        name: &str,
        mut read: impl FnMut(&str, Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        self.opt(name, |n| {
            let map = n.value.as_object().ok_or_else(|| n.expected("an object"))?;
            map.iter()
                .map(|(k, value)| {
                    let path = format!("{}.{k}", n.path);
                    read(k, Node { value, path: &path })
                })
                .collect()
        })
        .map(Option::unwrap_or_default)
    }

    /// Reads list field `name` of HTTP methods (upper-cased). Absent: `default`; present, it
    /// must not be empty. A non-empty `allowed` limits the methods accepted, naming `why`.
    pub fn methods(
        &self,
        name: &str,
        default: &[&str],
        allowed: &[&str],
        why: &str,
    ) -> Result<Vec<String>, ConfigError> {
        let methods = self.list(name, |n| {
            let m = n.str()?.to_ascii_uppercase();
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(n.err(format!("\"{m}\" is not an HTTP method")));
            }
            if !allowed.is_empty() && !allowed.contains(&m.as_str()) {
                return Err(n.err(format!("\"{m}\" cannot be covered: {why}")));
            }
            Ok(m)
        })?;
        if self.has(name) && methods.is_empty() {
            return Err(self.err(
                name,
                "must list at least one method (omit it for the default)",
            ));
        }
        Ok(if methods.is_empty() {
            default.iter().map(|m| m.to_string()).collect()
        } else {
            methods
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| !v.is_null())
    }

    /// An error about field `name` of this object.
    pub fn err(&self, name: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.child_path(name), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(json: &str) -> Result<ByteLimits, String> {
        let v = parse_json(json.as_bytes()).map_err(|e| e.to_string())?;
        let o = Node::root(&v)
            .obj(&["maxTotalBytes", "maxBodyBytes", "maxBufferedBytes"])
            .map_err(|e| e.to_string())?;
        o.byte_limits(64 << 20).map_err(|e| e.to_string())
    }

    #[test]
    fn byte_limits_bound_each_other() {
        assert_eq!(
            limits("{}"),
            Ok(ByteLimits {
                max_total: 64 << 20,
                max_body: 1 << 20,
                max_buffered: 32 << 20
            })
        );
        // A small store lowers the body default; a large body raises the buffer default.
        assert_eq!(limits(r#"{"maxTotalBytes":1000}"#).unwrap().max_body, 1000);
        assert_eq!(
            limits(r#"{"maxBodyBytes":67108864}"#).unwrap().max_buffered,
            64 << 20
        );
        for (json, field) in [
            (
                r#"{"maxTotalBytes":1000,"maxBodyBytes":1001}"#,
                "maxBodyBytes: must be between 1 and 1000,",
            ),
            (
                r#"{"maxBodyBytes":67108865}"#,
                "maxBodyBytes: must be between 1 and 67108864,",
            ),
            (
                r#"{"maxBodyBytes":2000,"maxBufferedBytes":1999}"#,
                "maxBufferedBytes: must be between 2000 and",
            ),
            (
                r#"{"maxBufferedBytes":1073741825}"#,
                "maxBufferedBytes: must be between",
            ),
            (
                r#"{"maxTotalBytes":4294967296}"#,
                "maxTotalBytes: must be between",
            ),
        ] {
            let e = limits(json).unwrap_err();
            assert!(e.starts_with(field), "{json}: {e}");
        }
    }

    #[test]
    fn message_leads_with_the_field() {
        let e = ConfigError::new("rules[2].limit.requests", "must be > 0");
        assert_eq!(e.to_string(), "rules[2].limit.requests: must be > 0");
    }

    fn read(json: &str) -> Result<Vec<(String, u64, Option<Duration>)>, ConfigError> {
        let v = parse_json(json.as_bytes())?;
        let root = Node::root(&v).obj(&["rules"])?;
        root.list("rules", |n| {
            let o = n.obj(&["name", "requests", "window"])?;
            Ok((
                o.req("name", |n| n.str().map(str::to_string))?,
                o.req("requests", |n| n.u64())?,
                o.opt("window", |n| n.duration())?,
            ))
        })
    }

    #[test]
    fn fields_are_read_with_their_values() {
        let r = read(
            r#"{"rules":[{"name":"a","requests":3,"window":"2s"},{"name":"b","requests":0}]}"#,
        )
        .unwrap();
        assert_eq!(r[0], ("a".into(), 3, Some(Duration::from_secs(2))));
        assert_eq!(r[1], ("b".into(), 0, None));
        assert_eq!(read(r#"{}"#).unwrap(), vec![]);
    }

    #[test]
    fn errors_name_the_path_of_the_field() {
        let e = |json: &str| read(json).unwrap_err().to_string();
        assert_eq!(
            e(r#"{"rules":[{"name":"a","requests":1},{"name":"b","requests":"x"}]}"#),
            "rules[1].requests: expected a whole number >= 0, found a string"
        );
        assert_eq!(
            e(r#"{"rules":[{"name":"a","requets":1}]}"#),
            "rules[0]: unknown field `requets`, expected one of `name`, `requests`, `window`"
        );
        assert_eq!(
            e(r#"{"rules":[{"requests":1}]}"#),
            "rules[0].name: required field is missing"
        );
        assert_eq!(
            e(r#"{"rules":[{"name":"a","requests":1,"window":"5"}]}"#),
            "rules[0].window: \"5\" has no unit (use ms, s, m or h)"
        );
        assert_eq!(
            e(r#"{"rules":{}}"#),
            "rules: expected a list, found an object"
        );
        assert_eq!(e("[]"), "configuration: expected an object, found a list");
        assert!(e("  ").starts_with("configuration: missing"));
        assert!(e("{").starts_with("configuration: EOF"));
    }

    #[test]
    fn shared_field_kinds_check_their_values() {
        let read = |v: serde_json::Value| {
            let n = Node::root(&v);
            (
                n.positive_duration().map_err(|e| e.message),
                n.url_path().map_err(|e| e.message),
                n.header_name().map_err(|e| e.message),
            )
        };
        assert_eq!(
            read(serde_json::json!("0s")).0,
            Err("must be longer than 0".into())
        );
        assert_eq!(read(serde_json::json!("2s")).0, Ok(Duration::from_secs(2)));
        assert_eq!(read(serde_json::json!("/f")).1, Ok("/f".into()));
        assert!(read(serde_json::json!("f.json")).1.is_err());
        assert_eq!(read(serde_json::json!("X-Route")).2, Ok("x-route".into()));
        assert!(read(serde_json::json!("x route")).2.is_err());
        assert!(read(serde_json::json!("")).2.is_err());
    }

    #[test]
    fn words_are_checked_against_the_choices() {
        let v = serde_json::json!("log");
        let e = Node::root(&v).one_of(&["enforce", "shadow"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration: unknown value \"log\", expected one of \"enforce\", \"shadow\""
        );
    }
}
