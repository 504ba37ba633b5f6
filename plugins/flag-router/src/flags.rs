//! flagd flag definitions: the same JSON as a flagd flag-definition file, compiled once (at
//! load for inline flags, per fetch for a remote source) and evaluated per request.

use crate::logic::{Expr, MAX_NODES};
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use edge_core::{ConfigError, Node, Obj};
use serde_json::{Map, Value};

/// Entries sorted by name, found by binary search: a flag set's flags and a flag's variants.
/// They are read from JSON objects, whose keys arrive sorted, so each insert appends; a
/// `BTreeMap` per value type compiled its own insert, search and drop (about 3 KB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByName<V>(Vec<(String, V)>);

impl<V> Default for ByName<V> {
    fn default() -> Self {
        ByName(Vec::new())
    }
}

impl<V> ByName<V> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(name))
    }

    /// Sets `name` to `value`, returning the value it replaces.
    pub fn insert(&mut self, name: String, value: V) -> Option<V> {
        match self.find(&name) {
            Ok(i) => self
                .0
                .get_mut(i)
                .map(|e| core::mem::replace(&mut e.1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    pub fn get_key_value(&self, name: &str) -> Option<(&String, &V)> {
        let (k, v) = self.0.get(self.find(name).ok()?)?;
        Some((k, v))
    }

    pub fn get(&self, name: &str) -> Option<&V> {
        self.get_key_value(name).map(|(_, v)| v)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

/// One compiled flag.
#[derive(Default)]
pub struct Flag {
    pub enabled: bool,
    /// Variant name → the header value it becomes.
    pub variants: ByName<String>,
    pub default_variant: Option<String>,
    pub targeting: Option<Expr>,
    /// Why a fetched flag could not be compiled (`flags.NAME.FIELD: why`). flagd answers such a
    /// flag with an error and serves the rest of the file, so it resolves `Error` alone.
    pub broken: Option<String>,
}

/// A compiled flag set, replaced as a whole when a new document arrives.
#[derive(Default)]
pub struct FlagSet {
    pub flags: ByName<Flag>,
}

/// Why a variant was chosen (flagd's reasons), or why none was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No targeting: the default variant.
    Static,
    /// Targeting chose the variant.
    TargetingMatch,
    /// Targeting returned null: the default variant.
    Default,
    /// The flag is DISABLED: no header.
    Disabled,
    /// No such flag: no header.
    NotFound,
    /// Targeting failed or chose an unknown variant: no header.
    Error,
}

/// The result of evaluating one flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution<'a> {
    pub reason: Reason,
    pub variant: Option<&'a str>,
    pub value: Option<&'a str>,
    pub error: Option<String>,
}

/// A variant's value as a header: strings as they are, anything else as JSON text.
fn header_value(n: Node<'_>) -> Result<String, ConfigError> {
    let text = match n.value {
        Value::String(s) => s.clone(),
        other => edge_json::to_text(other),
    };
    if text.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(n.err("a header value cannot hold control characters"));
    }
    Ok(text)
}

impl FlagSet {
    /// Reads a `flags` object, compiling targeting against flagd's `$evaluators`. Any bad flag
    /// refuses the set: inline flags are Envoy configuration, and a typo there must fail
    /// `envoy --mode validate`.
    pub fn read(flags: Node<'_>, evaluators: &Map<String, Value>) -> Result<FlagSet, ConfigError> {
        FlagSet::read_with(flags, evaluators, false)
    }

    /// [`FlagSet::read`], but a flag that cannot be compiled becomes a broken flag instead of
    /// refusing the set, as flagd serves a file: one bad flag does not sink the others. A set
    /// past the node budget is still refused whole (which flags broke would depend on order).
    fn read_with(
        flags: Node<'_>,
        evaluators: &Map<String, Value>,
        per_flag: bool,
    ) -> Result<FlagSet, ConfigError> {
        let mut set = FlagSet::default();
        let map = flags
            .value
            .as_object()
            .ok_or_else(|| flags.err("expected an object"))?;
        // Every key is allowed: this only gives each flag's errors its path.
        let names: Vec<&str> = map.keys().map(String::as_str).collect();
        let holder = flags.obj(&names)?;
        let mut nodes = 0;
        for name in map.keys() {
            let flag = match holder.req(name, |n| read_flag(n, evaluators, &mut nodes)) {
                Ok(flag) => flag,
                Err(e) if per_flag && nodes <= MAX_NODES => Flag {
                    broken: Some(e.to_string()),
                    ..Flag::default()
                },
                Err(e) => return Err(e),
            };
            set.flags.insert(name.clone(), flag);
        }
        Ok(set)
    }

    /// Reads `$evaluators` from an object (absent = none).
    pub fn evaluators(o: &Obj<'_>) -> Result<Map<String, Value>, ConfigError> {
        Ok(o.opt("$evaluators", |n| {
            n.value
                .as_object()
                .cloned()
                .ok_or_else(|| n.err("expected an object"))
        })?
        .unwrap_or_default())
    }

    /// Reads a flagd flag-definition document (`flags`, `$evaluators`, `$schema`, `metadata`).
    /// A document of the wrong shape is refused; a bad flag inside it only breaks that flag.
    pub fn from_document(bytes: &[u8]) -> Result<FlagSet, ConfigError> {
        let doc = edge_core::parse_json(bytes)?;
        let o = Node::root(&doc).obj(&["$schema", "flags", "$evaluators", "metadata"])?;
        // What flagd itself ignores when it evaluates.
        o.ignore(&["$schema", "metadata"]);
        let evaluators = FlagSet::evaluators(&o)?;
        o.req("flags", |n| FlagSet::read_with(n, &evaluators, true))
    }

    /// Evaluates `key` for a request whose context is `data` (see [`crate::policy`]).
    pub fn resolve<'a>(&'a self, key: &str, data: &Value) -> Resolution<'a> {
        let none = |reason, error| Resolution {
            reason,
            variant: None,
            value: None,
            error,
        };
        let Some(flag) = self.flags.get(key) else {
            return none(Reason::NotFound, None);
        };
        if let Some(why) = &flag.broken {
            return none(Reason::Error, Some(why.clone()));
        }
        if !flag.enabled {
            return none(Reason::Disabled, None);
        }
        let chosen = match &flag.targeting {
            // flagd: a flag without targeting resolves STATIC to its default variant, and
            // DEFAULT (with no variant) when it has none.
            None if flag.default_variant.is_some() => {
                Ok((flag.default_variant.as_deref(), Reason::Static))
            }
            None => Ok((None, Reason::Default)),
            Some(expr) => match expr.eval(data) {
                Ok(Value::Null) => Ok((flag.default_variant.as_deref(), Reason::Default)),
                Ok(Value::String(s)) => flag
                    .variants
                    .get_key_value(s.as_str())
                    .map(|(k, _)| (Some(k.as_str()), Reason::TargetingMatch))
                    .ok_or_else(|| format!("targeting chose unknown variant {}", brief(&s))),
                // flagd turns a boolean result into the variant named "true"/"false".
                Ok(Value::Bool(b)) => {
                    let name = if b { "true" } else { "false" };
                    flag.variants
                        .get_key_value(name)
                        .map(|(k, _)| (Some(k.as_str()), Reason::TargetingMatch))
                        .ok_or_else(|| format!("targeting chose unknown variant \"{name}\""))
                }
                Ok(other) => Err(format!(
                    "targeting returned {}, not a variant name",
                    describe(&other)
                )),
                Err(e) => Err(e),
            },
        };
        match chosen {
            Ok((Some(v), reason)) => Resolution {
                reason,
                variant: Some(v),
                value: flag.variants.get(v).map(String::as_str),
                error: None,
            },
            Ok((None, reason)) => none(reason, None),
            Err(e) => none(Reason::Error, Some(e)),
        }
    }
}

fn read_flag(
    n: Node<'_>,
    evaluators: &Map<String, Value>,
    nodes: &mut usize,
) -> Result<Flag, ConfigError> {
    let o = n.obj(&[
        "state",
        "variants",
        "defaultVariant",
        "targeting",
        "metadata",
    ])?;
    o.ignore(&["metadata"]);
    let enabled = o.req("state", |n| {
        n.one_of(&[("ENABLED", true), ("DISABLED", false)])
    })?;
    // Inserted one by one, not collected: a JSON object's keys are unique already, and
    // `collect` would link a stable sort (about 5 KB) for nothing.
    let mut variants = ByName::default();
    for (k, v) in o.entries("variants", |k, n| Ok((k.to_string(), header_value(n)?)))? {
        variants.insert(k, v);
    }
    if variants.is_empty() {
        return Err(o.err("variants", "must name at least one variant"));
    }
    let default_variant = o.opt("defaultVariant", |n| {
        let v = n.str()?;
        if variants.contains_key(v) {
            Ok(v.to_string())
        } else {
            Err(n.err(format!("\"{v}\" is not one of the variants")))
        }
    })?;
    let targeting = o.opt("targeting", |n| {
        match n.value.as_object() {
            Some(m) if m.is_empty() => return Ok(None),
            Some(_) => {}
            // flagd's schema: targeting is a JsonLogic object.
            None => return Err(n.err("must be a JsonLogic object")),
        }
        Expr::compile_within(n.value, evaluators, nodes)
            .map(Some)
            .map_err(|e| n.err(e))
    })?;
    Ok(Flag {
        enabled,
        variants,
        default_variant,
        targeting: targeting.flatten(),
        broken: None,
    })
}

/// A string for a log line, cut to 64 characters: a rule can return a value of megabytes, and
/// an error is built on every request that gets it.
fn brief(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("\"{s}\""),
        Some((end, _)) => format!("\"{}…\" ({} bytes)", s.get(..end).unwrap_or(""), s.len()),
    }
}

/// A value for a log line by its kind and size, never its whole text.
fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(m) => format!("an object of {} members", m.len()),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => brief(s),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` flags whose targeting `$ref`s one evaluator of about 1,000 nodes.
    fn doc(n: usize) -> Vec<u8> {
        let big: Vec<serde_json::Value> =
            (0..500).map(|i| serde_json::json!({"+": [i, 1]})).collect();
        let flags: Map<String, Value> = (0..n)
            .map(|i| {
                let flag = serde_json::json!({"state": "ENABLED", "variants": {"a": "A"},
                    "defaultVariant": "a", "targeting": {"$ref": "big"}});
                (format!("f{i}"), flag)
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "$evaluators": {"big": {"max": big}},
            "flags": flags,
        }))
        .unwrap()
    }

    fn set(flags: Value) -> FlagSet {
        let doc = serde_json::json!({ "flags": flags });
        FlagSet::from_document(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn names_are_found_in_any_insertion_order_and_replaced_once() {
        let mut m = ByName::default();
        for (k, v) in [("b", 1), ("a", 2), ("c", 3), ("b", 4)] {
            m.insert(k.to_string(), v);
        }
        assert_eq!(
            m.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!((m.get("b"), m.get("d"), m.len()), (Some(&4), None, 3));
        assert!(m.contains_key("c") && !m.contains_key(""));
    }

    #[test]
    fn reasons_are_flagds_static_default_and_targeting_match() {
        let flags = set(serde_json::json!({
            "fixed": {"state": "ENABLED", "variants": {"a": "A"}, "defaultVariant": "a"},
            "none": {"state": "ENABLED", "variants": {"a": "A"}},
            "none-targeted": {"state": "ENABLED", "variants": {"a": "A"},
                "targeting": {"if": [{"var": "beta"}, "a", null]}},
        }));
        let ctx = serde_json::json!({});
        let r = flags.resolve("fixed", &ctx);
        assert_eq!((r.reason, r.variant), (Reason::Static, Some("a")));
        // No defaultVariant and no targeting: DEFAULT with no variant, not STATIC.
        let r = flags.resolve("none", &ctx);
        assert_eq!((r.reason, r.variant), (Reason::Default, None));
        let r = flags.resolve("none-targeted", &ctx);
        assert_eq!((r.reason, r.variant), (Reason::Default, None));
        let r = flags.resolve("none-targeted", &serde_json::json!({"beta": true}));
        assert_eq!((r.reason, r.variant), (Reason::TargetingMatch, Some("a")));
    }

    #[test]
    fn an_error_names_a_large_result_without_copying_it() {
        let huge = "x".repeat(4 << 20);
        let flags = set(serde_json::json!({
            "s": {"state": "ENABLED", "variants": {"a": "A"}, "targeting": {"if": [true, huge]}},
            "list": {"state": "ENABLED", "variants": {"a": "A"},
                "targeting": {"merge": [[1, 2, 3], [4]]}},
        }));
        let ctx = serde_json::json!({});
        let e = flags.resolve("s", &ctx).error.unwrap();
        assert!(e.len() < 200, "{} bytes", e.len());
        assert!(e.contains("4194304 bytes"), "{e}");
        let e = flags.resolve("list", &ctx).error.unwrap();
        assert_eq!(
            e,
            "targeting returned an array of 4 items, not a variant name"
        );
    }

    #[test]
    fn a_fetched_flag_that_cannot_compile_errors_alone() {
        let ok = serde_json::json!({"state": "ENABLED", "variants": {"on": "v2", "off": "v1"},
            "defaultVariant": "off", "targeting": {"if": [{"var": "beta"}, "on", null]}});
        let broken = |targeting: Value| {
            serde_json::json!({"state": "ENABLED", "variants": {"on": "v2"},
                "defaultVariant": "on", "targeting": targeting})
        };
        let flags = set(serde_json::json!({
            "ok": ok,
            "regex": broken(serde_json::json!({"regex": ["a", "b"]})),
            "missing-ref": broken(serde_json::json!({"$ref": "nope"})),
            "string": broken(serde_json::json!("on")),
            "arity": broken(serde_json::json!({"!": [1, 2]})),
            "bad-default": {"state": "ENABLED", "variants": {"on": "v2"}, "defaultVariant": "x"},
        }));
        let r = flags.resolve("ok", &serde_json::json!({"beta": true}));
        assert_eq!((r.reason, r.value), (Reason::TargetingMatch, Some("v2")));
        for (name, field, why) in [
            ("regex", "targeting", "unknown operator \"regex\""),
            ("missing-ref", "targeting", "nope"),
            ("string", "targeting", "must be a JsonLogic object"),
            ("arity", "targeting", "!"),
            ("bad-default", "defaultVariant", "not one of the variants"),
        ] {
            let r = flags.resolve(name, &serde_json::json!({}));
            assert_eq!((r.reason, r.value), (Reason::Error, None), "{name}");
            let e = r.error.unwrap_or_default();
            assert!(e.starts_with(&format!("flags.{name}.{field}: ")), "{e}");
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_document_of_the_wrong_shape_is_refused_whole() {
        for doc in [
            &b"not json"[..],
            br#"{"flags": 7}"#,
            br#"[]"#,
            br#"{"flags": {}, "$evaluators": 1}"#,
        ] {
            assert!(FlagSet::from_document(doc).is_err(), "{doc:?}");
        }
    }

    #[test]
    fn inline_flags_refuse_a_bad_flag_at_load() {
        let flags = serde_json::json!({"f": {"state": "ENABLED", "variants": {"a": "A"},
            "targeting": {"regex": ["a", "b"]}}});
        let Err(e) = FlagSet::read(Node::root(&flags), &Map::new()) else {
            panic!("an unknown operator was accepted inline");
        };
        assert!(e.to_string().contains("unknown operator \"regex\""), "{e}");
    }

    #[test]
    fn a_file_shares_one_node_budget_across_its_flags() {
        assert!(FlagSet::from_document(&doc(50)).is_ok());
        let Err(err) = FlagSet::from_document(&doc(200)) else {
            panic!("200 flags of 1,000 nodes each were accepted");
        };
        let err = err.to_string();
        assert!(err.contains("100000 nodes"), "{err}");
    }
}
