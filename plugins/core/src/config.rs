//! Configuration errors that name the field, so Envoy's log says exactly what to fix
//! (`rules[2].limit.requests: must be > 0`) and the plugin refuses the config at load.

use crate::duration::parse_duration;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
#[cfg(any(test, debug_assertions))]
use alloc::vec;
use alloc::vec::Vec;
#[cfg(debug_assertions)]
use core::cell::{Cell, RefCell};
use core::fmt;
use core::time::Duration;
use serde_json::{Map, Value};

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

impl ConfigError {
    /// The same error with its field named within `section` of a combined configuration
    /// (`idempotency.maxEntries`; a whole-configuration error names the section itself).
    pub fn in_section(mut self, section: &str) -> ConfigError {
        self.field = if self.field == "configuration" {
            section.to_string()
        } else {
            format!("{section}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl core::error::Error for ConfigError {}

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
    edge_json::from_slice(bytes).map_err(|e| ConfigError::from_json(&e))
}

/// A value in the config tree and its JSON path, for errors that name the field.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    pub value: &'a Value,
    path: &'a str,
}

/// An object whose fields were checked against the allowed names before any is read, so a
/// misspelt field is named even when it is a required one.
///
/// The allowed list and the reader must agree: in debug builds (every native test) the object
/// records the fields its reader asks for, and an object read without an error that was never
/// asked for an allowed field, or was asked for one not allowed, fails when it is dropped. A
/// field that is accepted on purpose and not read says so with [`Obj::ignore`].
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    #[cfg(debug_assertions)]
    audit: Audit<'a>,
}

/// What a reader asked of an object (debug builds only: release modules carry none of it).
#[cfg(debug_assertions)]
struct Audit<'a> {
    allowed: &'a [&'a str],
    asked: RefCell<Vec<bool>>,
    strays: RefCell<Vec<String>>,
    failed: Cell<bool>,
}

/// A failing test's unwinding must not panic again here.
#[cfg(debug_assertions)]
fn panicking() -> bool {
    #[cfg(not(target_arch = "wasm32"))]
    return std::thread::panicking();
    #[cfg(target_arch = "wasm32")]
    false
}

#[cfg(debug_assertions)]
impl Drop for Obj<'_> {
    fn drop(&mut self) {
        let a = &self.audit;
        if a.failed.get() || panicking() {
            return;
        }
        let asked = a.asked.borrow();
        let never: Vec<&str> = a
            .allowed
            .iter()
            .zip(asked.iter())
            .filter(|(_, asked)| !**asked)
            .map(|(f, _)| *f)
            .collect();
        let strays = a.strays.borrow();
        assert!(
            never.is_empty() && strays.is_empty(),
            "config reader of `{}`: allowed but never read {never:?}, read but not allowed {strays:?}",
            if self.path.is_empty() { "configuration" } else { &self.path }
        );
    }
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

    #[inline(never)]
    fn expected(&self, what: &str) -> ConfigError {
        self.err(format!("expected {what}, found {}", kind(self.value)))
    }

    /// This value as an object with only the `allowed` fields (each of which its reader
    /// must read, see [`Obj`]).
    pub fn obj<'b>(&self, allowed: &'b [&'b str]) -> Result<Obj<'b>, ConfigError>
    where
        'a: 'b,
    {
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
            #[cfg(debug_assertions)]
            audit: Audit {
                allowed,
                asked: RefCell::new(vec![false; allowed.len()]),
                strays: RefCell::new(Vec::new()),
                failed: Cell::new(false),
            },
        })
    }

    #[inline(never)]
    pub fn str(&self) -> Result<&'a str, ConfigError> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    #[inline(never)]
    pub fn bool(&self) -> Result<bool, ConfigError> {
        self.value
            .as_bool()
            .ok_or_else(|| self.expected("true or false"))
    }

    #[inline(never)]
    pub fn u64(&self) -> Result<u64, ConfigError> {
        self.value
            .as_u64()
            .ok_or_else(|| self.expected("a whole number >= 0"))
    }

    /// A duration string (`"250ms"`, `"60s"`, `"5m"`, `"24h"`).
    #[inline(never)]
    pub fn duration(&self) -> Result<Duration, ConfigError> {
        parse_duration(self.str()?).map_err(|e| self.err(e))
    }

    /// A duration in nanoseconds, what plugins compare clocks with; one too long to count in
    /// u64 nanoseconds (584 years) is an error, not silently capped.
    #[inline(never)]
    pub fn duration_ns(&self) -> Result<u64, ConfigError> {
        u64::try_from(self.duration()?.as_nanos())
            .map_err(|_| self.err("is too long (at most 584 years)"))
    }

    /// [`Node::duration_ns`] that must be longer than zero.
    #[inline(never)]
    pub fn positive_duration_ns(&self) -> Result<u64, ConfigError> {
        self.positive_duration()?;
        self.duration_ns()
    }

    /// A whole number in `lo..=hi` (sizes, counts), the bounds named in the error.
    #[inline(never)]
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
    #[inline(never)]
    pub fn status_in(&self, lo: u16, hi: u16, what: &str) -> Result<u16, ConfigError> {
        let s = self.u64()?;
        match u16::try_from(s) {
            Ok(v) if (lo..=hi).contains(&v) => Ok(v),
            _ => Err(self.err(format!("{s} is not {what} ({lo}-{hi})"))),
        }
    }

    /// A duration that must be longer than zero (windows, intervals, timeouts).
    #[inline(never)]
    pub fn positive_duration(&self) -> Result<Duration, ConfigError> {
        let d = self.duration()?;
        if d.is_zero() {
            Err(self.err("must be longer than 0"))
        } else {
            Ok(d)
        }
    }

    /// A duration in `lo..=hi`, the bounds named in the error as written (`"1s"`, `"24h"`).
    #[inline(never)]
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
    #[inline(never)]
    pub fn url_path(&self) -> Result<String, ConfigError> {
        let p = self.str()?;
        if p.starts_with('/') {
            Ok(p.to_string())
        } else {
            Err(self.err(format!("\"{p}\" must start with /")))
        }
    }

    /// An HTTP header name (an RFC 9110 token), lower-cased as Envoy keeps them.
    #[inline(never)]
    pub fn header_name(&self) -> Result<String, ConfigError> {
        self.header_named(self.str()?.trim())
    }

    /// `name` (e.g. an object key this node holds the value of) as a header name: a name no
    /// request can carry would silently never match, or key every client alike.
    #[inline(never)]
    pub fn header_named(&self, name: &str) -> Result<String, ConfigError> {
        let h = name.to_ascii_lowercase();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if h.is_empty() || !h.bytes().all(token) {
            return Err(self.err(format!("\"{name}\" is not a header name")));
        }
        Ok(h)
    }

    /// One of the given words, as the choice it names: `choices` pairs each word with its
    /// value (`[("enforce", Mode::Enforce), ("shadow", Mode::Shadow)]`).
    pub fn one_of<T: Clone>(&self, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let s = self.str()?;
        match choices.iter().find(|(w, _)| *w == s) {
            Some((_, v)) => Ok(v.clone()),
            None => Err(self.unknown(s, &choices.iter().map(|(w, _)| *w).collect::<Vec<_>>())),
        }
    }

    /// The error for a word not among `words` (the part of [`Node::one_of`] that is the same
    /// for every type, compiled once).
    fn unknown(&self, s: &str, words: &[&str]) -> ConfigError {
        self.err(format!(
            "unknown value \"{s}\", expected one of {}",
            words
                .iter()
                .map(|w| format!("\"{w}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
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

/// HTTP status ranges (`storeStatuses`): `(first, last)` pairs, both included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statuses(pub Vec<(u16, u16)>);

impl Statuses {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// What a status list may hold: statuses in `lo..=hi` (`what` names them in errors, "a
/// success status").
pub struct StatusBounds<'a> {
    pub lo: u16,
    pub hi: u16,
    pub what: &'a str,
}

/// A status list as read, with the warning to log when it was written in the deprecated form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusList {
    pub statuses: Statuses,
    pub deprecated: Option<String>,
}

/// `s` split at the first `sep` (a byte search: the module carries no `char` searcher for it).
fn split_at_byte(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == sep)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
}

/// One term of a status list: a status (`404`), a class (`4xx`), or a range of either
/// (`200-299`, `2xx-4xx`), within `lo..=hi`.
fn status_term(term: &str, lo: u16, hi: u16) -> Result<(u16, u16), String> {
    let bound = |t: &str, high: bool| {
        let t = t.trim();
        let n = match t.as_bytes() {
            [d @ b'0'..=b'9', x, y]
                if x.eq_ignore_ascii_case(&b'x') && y.eq_ignore_ascii_case(&b'x') =>
            {
                Some(u16::from(d - b'0') * 100 + if high { 99 } else { 0 })
            }
            [_, _, _] => t.parse::<u16>().ok(),
            _ => None,
        };
        match n {
            None => Err(format!("\"{t}\" is not a status (NNN) or class (Nxx)")),
            Some(n) if !(lo..=hi).contains(&n) => Err(format!("\"{t}\" is outside {lo}-{hi}")),
            Some(n) => Ok(n),
        }
    };
    let (a, b) = split_at_byte(term, b'-').unwrap_or((term, term));
    let range = (bound(a, false)?, bound(b, true)?);
    if range.0 > range.1 {
        return Err(format!("\"{}\" is an empty range", term.trim()));
    }
    Ok(range)
}

/// `path[i]`, out of line: shared by every list reader.
#[inline(never)]
fn item_path(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// `path.key`, out of line: shared by every object reader.
#[inline(never)]
fn key_path(path: &str, key: &str) -> String {
    format!("{path}.{key}")
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

    /// Records that the reader asked for `name` (debug builds).
    fn ask(&self, name: &str) {
        #[cfg(debug_assertions)]
        {
            let a = &self.audit;
            match a.allowed.iter().position(|f| *f == name) {
                Some(i) => {
                    if let Some(asked) = a.asked.borrow_mut().get_mut(i) {
                        *asked = true;
                    }
                }
                None => a.strays.borrow_mut().push(name.to_string()),
            }
        }
        #[cfg(not(debug_assertions))]
        let _ = name;
    }

    /// Marks the read as failed: an object left half read is not audited (debug builds).
    fn failed(&self) {
        #[cfg(debug_assertions)]
        self.audit.failed.set(true);
    }

    fn noted<T>(&self, r: Result<T, ConfigError>) -> Result<T, ConfigError> {
        if r.is_err() {
            self.failed();
        }
        r
    }

    /// Fields that are allowed and deliberately not read (a flagd file's `metadata`).
    pub fn ignore(&self, names: &[&str]) {
        for name in names {
            self.ask(name);
        }
    }

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

    /// Runs `read` on field `name` if present (`null` counts as absent).
    pub fn opt<T>(
        &self,
        name: &str,
        read: impl FnOnce(Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        match self.field(name) {
            None => Ok(None),
            Some((value, path)) => self.noted(read(Node { value, path: &path }).map(Some)),
        }
    }

    /// Field `name` and its path, unless absent or `null`. Out of line: what every reader
    /// shares (the lookup, the path) is compiled once, not once per field read.
    #[inline(never)]
    fn field(&self, name: &str) -> Option<(&'a Value, String)> {
        self.ask(name);
        match self.map.get(name) {
            None | Some(Value::Null) => None,
            Some(value) => Some((value, self.child_path(name))),
        }
    }

    /// Runs `read` on field `name`, which must be present.
    pub fn req<T>(
        &self,
        name: &str,
        read: impl FnOnce(Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        self.opt(name, read)?
            .ok_or_else(|| self.err(name, "required field is missing"))
    }

    /// Runs `read` on each element of list field `name` (absent = empty list).
    pub fn list<T>(
        &self,
        name: &str,
        mut read: impl FnMut(Node<'_>) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        // A plain loop: `collect` into a `Result` compiles an iterator adapter per reader.
        self.opt(name, |n| {
            let items = n.value.as_array().ok_or_else(|| n.expected("a list"))?;
            let mut out = Vec::with_capacity(items.len());
            for (i, value) in items.iter().enumerate() {
                let path = item_path(n.path, i);
                out.push(read(Node { value, path: &path })?);
            }
            Ok(out)
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
            let mut out = Vec::with_capacity(map.len());
            for (k, value) in map {
                let path = key_path(n.path, k);
                out.push(read(k, Node { value, path: &path })?);
            }
            Ok(out)
        })
        .map(Option::unwrap_or_default)
    }

    /// Reads status list field `name` (`storeStatuses`) within `bounds`: a list whose items
    /// are statuses (`404`), classes (`"2xx"`) or ranges of either (`"200-299"`,
    /// `"2xx-4xx"`). A list, because that is how Envoy takes statuses (a route's
    /// `retriable_status_codes: [503, 504]`, a health check's `expected_statuses`): in YAML a
    /// list of numbers and ranges, each checked and named on its own (`storeStatuses[1]`).
    /// The older form, one string of comma-separated terms (`"2xx-4xx, 409"`), is still read
    /// (its errors naming the field, as they did), with a deprecation warning to log.
    pub fn statuses(
        &self,
        name: &str,
        bounds: &StatusBounds<'_>,
        refuse: impl Fn((u16, u16)) -> Option<&'static str>,
    ) -> Result<Option<StatusList>, ConfigError> {
        let (lo, hi) = (bounds.lo, bounds.hi);
        self.opt(name, |n| {
            let mut out = Vec::new();
            match n.value {
                Value::Array(items) => {
                    for (i, value) in items.iter().enumerate() {
                        let path = format!("{}[{i}]", n.path);
                        let item = Node { value, path: &path };
                        let range = match value {
                            Value::Number(_) => {
                                let s = item.status_in(lo, hi, bounds.what)?;
                                (s, s)
                            }
                            Value::String(t) => status_term(t, lo, hi).map_err(|m| item.err(m))?,
                            _ => return Err(item.expected("a status or a range of statuses")),
                        };
                        if let Some(why) = refuse(range) {
                            return Err(item.err(why));
                        }
                        out.push(range);
                    }
                }
                Value::String(text) => {
                    // The terms as a list would write them, for the warning.
                    let mut shown = String::new();
                    for t in text.split([',']) {
                        let range = status_term(t, lo, hi).map_err(|m| n.err(m))?;
                        if let Some(why) = refuse(range) {
                            return Err(n.err(why));
                        }
                        out.push(range);
                        if !shown.is_empty() {
                            shown.push_str("\", \"");
                        }
                        shown.push_str(t.trim());
                    }
                    return Ok(StatusList {
                        statuses: Statuses(out),
                        deprecated: Some(format!(
                            "{}: a string of statuses is deprecated and will be refused in a \
                             later release; write a list: [\"{shown}\"]",
                            n.path()
                        )),
                    });
                }
                _ => return Err(n.err("expected a list of statuses")),
            }
            if out.is_empty() {
                return Err(n.err("must list at least one status"));
            }
            Ok(StatusList {
                statuses: Statuses(out),
                deprecated: None,
            })
        })
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
        self.ask(name);
        self.map.get(name).is_some_and(|v| !v.is_null())
    }

    /// An error about field `name` of this object.
    pub fn err(&self, name: &str, message: impl Into<String>) -> ConfigError {
        self.failed();
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
        let choices = [("enforce", 1), ("shadow", 2)];
        let v = serde_json::json!("shadow");
        assert_eq!(Node::root(&v).one_of(&choices), Ok(2));
        let v = serde_json::json!("log");
        let e = Node::root(&v).one_of(&choices).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration: unknown value \"log\", expected one of \"enforce\", \"shadow\""
        );
    }

    fn statuses(json: &str) -> Result<StatusList, String> {
        let v = parse_json(json.as_bytes()).map_err(|e| e.to_string())?;
        let o = Node::root(&v).obj(&["s"]).map_err(|e| e.to_string())?;
        let bounds = StatusBounds {
            lo: 200,
            hi: 399,
            what: "a success status",
        };
        o.statuses("s", &bounds, |r| {
            (r == (206, 206)).then_some("206 cannot be kept: partial")
        })
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "absent".to_string())
    }

    #[test]
    fn status_lists_take_numbers_classes_and_ranges() {
        let l = statuses(r#"{"s":[200, "3xx", "201-204", " 2XX-2xx "]}"#).unwrap();
        assert_eq!(
            l.statuses,
            Statuses(vec![(200, 200), (300, 399), (201, 204), (200, 299)])
        );
        assert_eq!(l.deprecated, None);
        assert!(l.statuses.contains(350) && !l.statuses.contains(400));
        for (json, want) in [
            (
                r#"{"s":[200, 500]}"#,
                "s[1]: 500 is not a success status (200-399)",
            ),
            (r#"{"s":["500"]}"#, "s[0]: \"500\" is outside 200-399"),
            (
                r#"{"s":["3xx-2xx"]}"#,
                "s[0]: \"3xx-2xx\" is an empty range",
            ),
            (
                r#"{"s":["20x"]}"#,
                "s[0]: \"20x\" is not a status (NNN) or class (Nxx)",
            ),
            (
                r#"{"s":["2xx-1x"]}"#,
                "s[0]: \"1x\" is not a status (NNN) or class (Nxx)",
            ),
            (r#"{"s":[206]}"#, "s[0]: 206 cannot be kept: partial"),
            (r#"{"s":["206"]}"#, "s[0]: 206 cannot be kept: partial"),
            (r#"{"s":[]}"#, "s: must list at least one status"),
            (r#"{"s":{}}"#, "s: expected a list of statuses"),
            (
                r#"{"s":[true]}"#,
                "s[0]: expected a status or a range of statuses, found a boolean",
            ),
        ] {
            assert_eq!(statuses(json).unwrap_err(), want, "{json}");
        }
    }

    #[test]
    fn a_string_of_statuses_is_read_as_before_with_a_deprecation() {
        let l = statuses(r#"{"s":"2xx-3xx, 204"}"#).unwrap();
        assert_eq!(l.statuses, Statuses(vec![(200, 399), (204, 204)]));
        assert_eq!(
            l.deprecated.as_deref(),
            Some(
                "s: a string of statuses is deprecated and will be refused in a later release; \
                 write a list: [\"2xx-3xx\", \"204\"]"
            )
        );
        // Its errors name the field, as they always did.
        assert_eq!(
            statuses(r#"{"s":"2xx-9xx"}"#).unwrap_err(),
            "s: \"9xx\" is outside 200-399"
        );
        assert_eq!(
            statuses(r#"{"s":"2xx, 206"}"#).unwrap_err(),
            "s: 206 cannot be kept: partial"
        );
        assert_eq!(
            statuses(r#"{"s":""}"#).unwrap_err(),
            "s: \"\" is not a status (NNN) or class (Nxx)"
        );
    }

    /// Reads `{"a": .., "b": ..}` allowing `allowed`, asking for `asked` only.
    fn audited(allowed: &[&str], asked: &[&str], json: &str) -> Result<(), ConfigError> {
        let v = parse_json(json.as_bytes())?;
        let o = Node::root(&v).obj(allowed)?;
        for name in asked {
            o.opt(name, |n| n.u64())?;
        }
        Ok(())
    }

    #[test]
    #[should_panic(expected = "allowed but never read [\"b\"]")]
    fn an_allowed_field_nobody_reads_fails_in_tests() {
        let _ = audited(&["a", "b"], &["a"], r#"{"a":1}"#);
    }

    #[test]
    #[should_panic(expected = "read but not allowed [\"c\"]")]
    fn a_read_of_a_field_not_allowed_fails_in_tests() {
        let _ = audited(&["a"], &["a", "c"], r#"{"a":1}"#);
    }

    #[test]
    fn a_reader_that_asks_for_every_field_passes_and_a_failed_read_is_not_audited() {
        assert_eq!(audited(&["a", "b"], &["a", "b"], r#"{"a":1}"#), Ok(()));
        // The reader stops at the bad `a`: `b`, never reached, is not held against it.
        let e = audited(&["a", "b"], &["a", "b"], r#"{"a":"x"}"#).unwrap_err();
        assert!(e.to_string().starts_with("a: expected a whole number"));
        // An unknown field is still named before anything is read.
        let e = audited(&["a"], &["a"], r#"{"a":"x","z":1}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration: unknown field `z`, expected one of `a`"
        );
    }
}

/// The sections of a combined configuration (`edge.wasm`'s), in the order its stages run.
pub const SECTIONS: [&str; 4] = ["rateLimit", "flagRouter", "idempotency", "cachedFallback"];

/// The bytes of each named section of a combined configuration (`None` where absent), or why
/// the configuration is refused.
pub fn split_sections(raw: &[u8], names: &[&str]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let text = if raw.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        raw
    };
    let value = edge_json::from_slice(text).map_err(|e| format!("configuration: not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!(
            "configuration: must be an object of sections ({})",
            names.join(", ")
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(format!(
            "{unknown}: unknown section; the sections are {}",
            names.join(", ")
        ));
    }
    names
        .iter()
        .map(|name| match map.get(*name) {
            None => Ok(None),
            Some(v) => edge_json::to_vec(v)
                .map(Some)
                .map_err(|e| format!("{name}: {e}")),
        })
        .collect()
}

#[cfg(test)]
mod section_tests {
    use super::*;

    const NAMES: [&str; 2] = ["rateLimit", "idempotency"];

    #[test]
    fn sections_are_split_and_absent_ones_are_off() {
        let s = split_sections(br#"{"idempotency": {"routes": []}}"#, &NAMES).unwrap();
        assert_eq!(s[0], None);
        assert_eq!(s[1].as_deref(), Some(&br#"{"routes":[]}"#[..]));
        assert_eq!(split_sections(b"  ", &NAMES).unwrap(), vec![None, None]);
    }

    #[test]
    fn an_unknown_section_or_a_non_object_is_refused_by_name() {
        let e = split_sections(br#"{"rateLimits": {}}"#, &NAMES).unwrap_err();
        assert_eq!(
            e,
            "rateLimits: unknown section; the sections are rateLimit, idempotency"
        );
        let e = split_sections(b"[1]", &NAMES).unwrap_err();
        assert!(e.starts_with("configuration: must be an object"), "{e}");
        let e = split_sections(b"{", &NAMES).unwrap_err();
        assert!(e.starts_with("configuration: not JSON"), "{e}");
    }
}
