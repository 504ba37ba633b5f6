//! Per request: strip the mapped headers a client sent, build the flagd evaluation context,
//! resolve each mapped flag and say which headers to set. Pure: no hostcalls.

use crate::config::{Attribute, Config, ValueType};
use crate::flags::{FlagSet, Reason};
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use edge_core::headers::HeaderEdits;
use edge_core::metrics::Counter;
use edge_core::text::into_text as text;
use edge_core::RequestView;
use serde_json::{Map, Value};

/// One flag's outcome, for metrics and the debug log. Borrows from the configuration and the
/// flag set: a request allocates nothing for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation<'a> {
    pub flag: &'a str,
    pub variant: Option<&'a str>,
    pub reason: Reason,
    pub error: Option<String>,
}

impl Evaluation<'_> {
    /// The debug log line (built only when debug logging is on).
    pub fn describe(&self) -> String {
        let mut line = format!(
            "flag {} variant {} reason {:?}",
            self.flag,
            self.variant.unwrap_or("-"),
            self.reason
        );
        if let Some(e) = &self.error {
            line.push_str(" error: ");
            line.push_str(e);
        }
        line
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Every mapped header ends without the value a client sent (a client never picks its own
    /// route): the resolved flags' values are set (a set replaces every value the header had),
    /// and the headers no flag sets are removed.
    pub edits: HeaderEdits<&'a str>,
    pub evaluations: Vec<Evaluation<'a>>,
    /// Attributes the request sent that do not parse as their `type` (left absent).
    pub type_errors: Vec<&'a Attribute>,
}

/// The context's counter, defined when an attribute has a `type` other than string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextCounter {
    TypeErrors,
}

impl Counter for ContextCounter {
    const ALL: &'static [ContextCounter] = &[ContextCounter::TypeErrors];

    fn name(self) -> &'static str {
        "context_type_errors"
    }
}

/// The warning for an attribute whose request value does not parse as its `type`.
pub fn type_warning(a: &Attribute) -> String {
    let kind = match a.kind {
        ValueType::String => "string",
        ValueType::Number => "number",
        ValueType::Boolean => "boolean",
    };
    format!(
        "context attribute {} from the request is not a {kind}; left absent",
        a.name
    )
}

/// Turns evaluations into counter names and warnings. A broken flag warns once per worker,
/// then only at debug: it must not flood the log at request rate. The set is bounded by the
/// flag names.
#[derive(Default)]
pub struct Reporter {
    warned: alloc::collections::BTreeSet<String>,
    /// The last counter name, rebuilt in place: no allocation per request.
    name: String,
}

/// Appends a name part Envoy's stat tags do not split on.
fn push_stat_part(out: &mut String, s: &str) {
    // Flag and variant names are nearly always clean already: one copy, no per-char pushes.
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        out.push_str(s);
        return;
    }
    out.extend(s.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    }));
}

impl Reporter {
    /// The counter to increment for `e`: `flag_router.<flag>.<outcome>`.
    pub fn counter(&mut self, e: &Evaluation<'_>) -> &str {
        let name = &mut self.name;
        name.clear();
        name.push_str("flag_router.");
        push_stat_part(name, e.flag);
        match (e.variant, e.reason) {
            (Some(v), _) => {
                name.push_str(".variant.");
                push_stat_part(name, v);
            }
            (None, Reason::Disabled) => name.push_str(".disabled"),
            (None, Reason::NotFound) => name.push_str(".not_found"),
            (None, Reason::Error) => name.push_str(".error"),
            (None, _) => name.push_str(".no_default"),
        }
        name
    }

    /// A new flag file replaced the flags: a flag that fails again warns again.
    pub fn flags_replaced(&mut self) {
        self.warned.clear();
    }

    /// A warning, the first time a flag fails on this worker (since the flags last changed).
    pub fn warning(&mut self, e: &Evaluation<'_>) -> Option<String> {
        match &e.error {
            Some(err) if !self.warned.contains(e.flag) => {
                self.warned.insert(e.flag.to_string());
                Some(format!("flag {} failed to evaluate: {err}", e.flag))
            }
            _ => None,
        }
    }
}

/// Sets `v` at `path`, creating the objects on the way. The configuration refuses an attribute
/// inside another, so every step on the way is an object.
fn insert_at(data: &mut Map<String, Value>, path: &[String], v: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut m = data;
    for p in parents {
        if !m.contains_key(p) {
            m.insert(p.clone(), Value::Object(Map::new()));
        }
        let Some(Value::Object(inner)) = m.get_mut(p) else {
            return;
        };
        m = inner;
    }
    m.insert(last.clone(), v);
}

/// The evaluation context: configured attributes that are present (dotted names nested, values
/// of their `type`), and `targetingKey`. A value that does not parse as its type stays absent
/// and its attribute is pushed to `errors`.
pub fn context<'a>(
    config: &'a Config,
    req: &impl RequestView,
    errors: &mut Vec<&'a Attribute>,
) -> Map<String, Value> {
    let mut data = Map::new();
    for a in &config.context {
        let Some(v) = a.part.value(req) else {
            continue;
        };
        match a.kind.parse(text(v)) {
            Some(v) => insert_at(&mut data, &a.path, v),
            None => errors.push(a),
        }
    }
    if let Some(v) = config.targeting_key.as_ref().and_then(|p| p.value(req)) {
        data.insert("targetingKey".into(), Value::String(text(v)));
    }
    data
}

pub fn decide<'a>(
    config: &'a Config,
    flags: &'a FlagSet,
    req: &impl RequestView,
    now_secs: u64,
) -> Decision<'a> {
    let mut type_errors = Vec::new();
    let mut data = context(config, req, &mut type_errors);
    let mut d = Decision {
        edits: HeaderEdits {
            remove: Vec::new(),
            set: Vec::with_capacity(config.headers.len()),
        },
        evaluations: Vec::with_capacity(config.headers.len()),
        type_errors,
    };
    for (flag, header) in &config.headers {
        let mut flagd = Map::new();
        flagd.insert("flagKey".into(), Value::String(flag.clone()));
        flagd.insert("timestamp".into(), Value::from(now_secs));
        data.insert("$flagd".into(), Value::Object(flagd));
        let ctx = Value::Object(core::mem::take(&mut data));
        let r = flags.resolve(flag, &ctx);
        if let Value::Object(m) = ctx {
            data = m;
        }
        if let Some(value) = r.value {
            d.edits.set.push((header.as_str(), value));
        }
        d.evaluations.push(Evaluation {
            flag: flag.as_str(),
            variant: r.variant,
            reason: r.reason,
            error: r.error,
        });
    }
    // Removing a header that is then set would be one more crossing for the same result.
    for (_, header) in &config.headers {
        let h = header.as_str();
        if !d.edits.set.iter().any(|(s, _)| *s == h) && !d.edits.remove.contains(&h) {
            d.edits.remove.push(h);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::Expr;
    use edge_core::RequestParts;

    const CONFIG: &str = r#"{
      "targetingKey": { "header": "x-user-id" },
      "context": {
        "email":   { "header": "x-user-email" },
        "tier":    { "header": "x-tier" },
        "country": { "cookie": "country" },
        "path":    { "source": "path" }
      },
      "headers": { "new-checkout": "x-route-checkout", "search-v2": "x-route-search", "dark": "x-dark" },
      "flags": {
        "new-checkout": {
          "state": "ENABLED",
          "variants": { "on": "v2", "off": "v1" },
          "defaultVariant": "off",
          "targeting": { "if": [ { "==": [ { "var": "tier" }, "beta" ] }, "on",
                         { "fractional": [ ["on", 10], ["off", 90] ] } ] }
        },
        "search-v2": {
          "state": "DISABLED",
          "variants": { "on": true, "off": false },
          "defaultVariant": "off"
        },
        "dark": {
          "state": "ENABLED",
          "variants": { "on": 1, "off": 0 },
          "defaultVariant": "off",
          "targeting": { "if": [ { "$ref": "is-staff" }, "on", null ] }
        }
      },
      "$evaluators": { "is-staff": { "ends_with": [ { "var": "email" }, "@example.com" ] } }
    }"#;

    fn config() -> Config {
        Config::parse(CONFIG.as_bytes()).unwrap()
    }

    fn header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
        d.edits.get(name)
    }

    #[test]
    fn targeting_picks_variants_and_values_become_headers() {
        let c = config();
        let beta = RequestParts::new("GET", "/")
            .header("x-tier", "beta")
            .header("x-user-id", "u1");
        let d = decide(&c, &c.flags, &beta, 0);
        assert_eq!(header(&d, "x-route-checkout"), Some("v2"));
        assert_eq!(d.evaluations[1].reason, Reason::TargetingMatch);
        let staff = RequestParts::new("GET", "/").header("x-user-email", "ann@example.com");
        let d = decide(&c, &c.flags, &staff, 0);
        assert_eq!(header(&d, "x-dark"), Some("1"), "numbers become JSON text");
        let other = RequestParts::new("GET", "/").header("x-user-email", "bob@other.org");
        let d = decide(&c, &c.flags, &other, 0);
        assert_eq!(
            header(&d, "x-dark"),
            Some("0"),
            "null from targeting is the default"
        );
        assert_eq!(
            d.evaluations
                .iter()
                .find(|e| e.flag == "dark")
                .unwrap()
                .reason,
            Reason::Default
        );
    }

    #[test]
    fn every_mapped_header_is_set_or_removed_and_disabled_flags_set_none() {
        let c = config();
        let req = RequestParts::new("GET", "/")
            .header("x-route-search", "client's")
            .header("x-dark", "client's");
        let d = decide(&c, &c.flags, &req, 0);
        // The disabled flag sets nothing: its header is removed; the others are set, which
        // replaces what the client sent, and are not removed first.
        assert_eq!(d.edits.remove, ["x-route-search"]);
        let mut set: Vec<&str> = d.edits.set.iter().map(|(h, _)| *h).collect();
        set.sort_unstable();
        assert_eq!(set, ["x-dark", "x-route-checkout"]);
        assert_eq!(header(&d, "x-route-search"), None);
        let e = d
            .evaluations
            .iter()
            .find(|e| e.flag == "search-v2")
            .unwrap();
        assert_eq!((e.reason, e.variant), (Reason::Disabled, None));
    }

    #[test]
    fn fractional_rollout_is_sticky_per_user_and_near_the_weights() {
        let c = config();
        let mut on = 0;
        for i in 0..2000 {
            let user = format!("user-{i}");
            let req = RequestParts::new("GET", "/").header("x-user-id", &user);
            let first = decide(&c, &c.flags, &req, 0);
            let again = decide(&c, &c.flags, &req, 999);
            assert_eq!(
                header(&first, "x-route-checkout"),
                header(&again, "x-route-checkout")
            );
            on += usize::from(header(&first, "x-route-checkout") == Some("v2"));
        }
        assert!((120..=280).contains(&on), "{on} of 2000 in the 10% bucket");
        // Without a targeting key fractional yields null: the default variant.
        let d = decide(&c, &c.flags, &RequestParts::new("GET", "/"), 0);
        assert_eq!(header(&d, "x-route-checkout"), Some("v1"));
    }

    #[test]
    fn absent_context_values_are_absent_not_empty() {
        let c = config();
        let ctx = context(
            &c,
            &RequestParts::new("GET", "/p?q=1").header("cookie", "country=NL"),
            &mut Vec::new(),
        );
        assert_eq!(ctx.get("country"), Some(&Value::from("NL")));
        assert_eq!(ctx.get("path"), Some(&Value::from("/p")));
        assert!(!ctx.contains_key("email"));
        assert!(!ctx.contains_key("targetingKey"));
    }

    #[test]
    fn dotted_names_nest_and_typed_values_parse_or_stay_absent() {
        let c = Config::parse(
            br#"{"headers":{"f":"x-f"},
                "targetingKey":{"header":"x-user-id","type":"string"},
                "context":{"user.name":{"header":"x-user-name"},"user.age":{"header":"x-age","type":"number"},
                    "beta":{"cookie":"beta","type":"boolean"},"tier":{"header":"x-tier","type":"string"}},
                "flags":{"f":{"state":"ENABLED","variants":{"adult":"A","minor":"M"},
                    "targeting":{"if":[{">=":[{"var":"user.age"},18]},"adult",
                        {"if":[{"<":[{"var":"user.age"},18]},"minor",null]}]}}}}"#,
        )
        .unwrap();
        let req = RequestParts::new("GET", "/")
            .header("x-user-name", "ann")
            .header("x-age", "42")
            .header("x-tier", "7")
            .header("cookie", "beta=true");
        let mut errors = Vec::new();
        let ctx = Value::Object(context(&c, &req, &mut errors));
        assert_eq!(
            ctx,
            serde_json::json!({"user": {"name": "ann", "age": 42}, "beta": true, "tier": "7"})
        );
        assert!(errors.is_empty());
        let found = Expr::compile(&serde_json::json!({"var": "user.name"}), &Map::new()).unwrap();
        assert_eq!(found.eval(&ctx), Ok(Value::from("ann")));
        let d = decide(&c, &c.flags, &req, 0);
        assert_eq!(header(&d, "x-f"), Some("A"));
        // "12.5" is a number; "twelve", "inf" and "yes" are not of their type: absent, named.
        let young = RequestParts::new("GET", "/").header("x-age", "12.5");
        assert_eq!(header(&decide(&c, &c.flags, &young, 0), "x-f"), Some("M"));
        for (age, beta) in [("twelve", "yes"), ("inf", "TRUE")] {
            let req = RequestParts::new("GET", "/")
                .header("x-age", age)
                .header("cookie", &format!("beta={beta}"));
            let d = decide(&c, &c.flags, &req, 0);
            let names: Vec<&str> = d.type_errors.iter().map(|a| a.name.as_str()).collect();
            assert_eq!(names, ["beta", "user.age"]);
            let mut errors = Vec::new();
            let ctx = context(&c, &req, &mut errors);
            assert!(
                !ctx.contains_key("user"),
                "no empty object for an absent value"
            );
            assert!(!ctx.contains_key("beta"));
        }
        assert_eq!(
            type_warning(d_first(&c)),
            "context attribute user.age from the request is not a number; left absent"
        );
    }

    fn d_first(c: &Config) -> &Attribute {
        c.context.iter().find(|a| a.name == "user.age").unwrap()
    }

    #[test]
    fn context_types_and_dotted_names_are_checked_at_load() {
        let err = |extra: &str| {
            Config::parse(
                format!(
                    r#"{{"headers":{{"f":"x-f"}},"flags":{{"f":{{"state":"ENABLED","variants":{{"a":"A"}}}}}},{extra}}}"#
                )
                .as_bytes(),
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        let e = err(r#""context":{"age":{"header":"x-age","type":"int"}}"#);
        assert!(e.starts_with("context.age.type: unknown value"), "{e}");
        let e = err(r#""targetingKey":{"header":"x-id","type":"number"}"#);
        assert!(
            e.starts_with("targetingKey.type: flagd's targetingKey is a string"),
            "{e}"
        );
        let e = err(r#""context":{"age":{"header":"x-age","type":"number","zzz":1}}"#);
        assert!(e.starts_with("context.age"), "{e}");
        let e = err(r#""context":{"user":{"header":"x-u"},"user.name":{"header":"x-n"}}"#);
        assert!(
            e.starts_with("context.user.name: is inside \"user\""),
            "{e}"
        );
        let e = err(r#""context":{"user..name":{"header":"x-n"}}"#);
        assert!(e.starts_with("context.user..name:"), "{e}");
        let e = err(r#""context":{"targetingKey.x":{"header":"x-n"}}"#);
        assert!(
            e.starts_with("context.targetingKey.x: is set by the evaluator"),
            "{e}"
        );
        assert_eq!(
            err(r#""context":{"a.b.c":{"source":"path","type":"string"}}"#),
            ""
        );
    }

    #[test]
    fn a_targeting_error_leaves_the_header_absent() {
        let c = Config::parse(
            br#"{"headers":{"f":"x-f"},"flags":{"f":{"state":"ENABLED","variants":{"a":"A"},
                "defaultVariant":"a","targeting":{"if":[true,"nope"]}}}}"#,
        )
        .unwrap();
        let d = decide(&c, &c.flags, &RequestParts::new("GET", "/"), 0);
        assert_eq!(header(&d, "x-f"), None);
        assert_eq!(d.evaluations[0].reason, Reason::Error);
        assert!(d.evaluations[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("nope"));
    }

    #[test]
    fn reports_name_the_counter_and_warn_once_per_broken_flag() {
        let mut r = Reporter::default();
        let ok = Evaluation {
            flag: "new.checkout",
            variant: Some("on v2"),
            reason: Reason::TargetingMatch,
            error: None,
        };
        assert_eq!(r.counter(&ok), "flag_router.new_checkout.variant.on_v2");
        assert_eq!(r.warning(&ok), None);
        let broken = Evaluation {
            flag: "f",
            variant: None,
            reason: Reason::Error,
            error: Some("boom".into()),
        };
        assert_eq!(r.counter(&broken), "flag_router.f.error");
        assert_eq!(
            r.warning(&broken).as_deref(),
            Some("flag f failed to evaluate: boom")
        );
        assert_eq!(r.warning(&broken), None, "warned once");
        r.flags_replaced();
        assert!(r.warning(&broken).is_some(), "new flags, a new warning");
        assert!(broken.describe().contains("boom"), "then at debug");
        assert_eq!(
            ok.describe(),
            "flag new.checkout variant on v2 reason TargetingMatch"
        );
        for (reason, name) in [
            (Reason::Disabled, "disabled"),
            (Reason::NotFound, "not_found"),
            (Reason::Default, "no_default"),
        ] {
            let e = Evaluation {
                flag: "f",
                variant: None,
                reason,
                error: None,
            };
            assert_eq!(r.counter(&e), format!("flag_router.f.{name}"));
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = |json: &str| {
            Config::parse(json.as_bytes())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let flag = r#""flags":{"f":{"state":"ENABLED","variants":{"a":"A"},"defaultVariant":"a"}}"#;
        assert!(err(&format!(r#"{{"headers":{{}},{flag}}}"#)).starts_with("headers: required"));
        assert!(err(&format!(r#"{{"headers":{{"g":"x-g"}},{flag}}}"#))
            .starts_with("headers.g: no such flag"));
        assert!(err(&format!(r#"{{"headers":{{"f":"x f"}},{flag}}}"#)).starts_with("headers.f:"));
        assert!(err(
            r#"{"headers":{"f":"x-f"},"flags":{"f":{"state":"ON","variants":{"a":"A"}}}}"#
        )
        .starts_with("flags.f.state: unknown value"));
        assert!(err(r#"{"headers":{"f":"x-f"},"flags":{"f":{"state":"ENABLED","variants":{"a":"A"},"defaultVariant":"b"}}}"#)
            .starts_with("flags.f.defaultVariant:"));
        assert!(err(r#"{"headers":{"f":"x-f"},"flags":{"f":{"state":"ENABLED","variants":{"a":"A"},"targeting":{"regex":["a","b"]}}}}"#)
            .starts_with("flags.f.targeting:"));
        assert!(err(&format!(r#"{{"headers":{{"f":"x-f"}},{flag},"source":{{"cluster":"flags","path":"flags.json"}}}}"#))
            .starts_with("source.path:"));
        for (field, value) in [
            ("pollInterval", "0s"),
            ("pollInterval", "999ms"),
            ("pollInterval", "25h"),
            ("timeout", "0s"),
            ("timeout", "2h"),
        ] {
            let e = err(&format!(
                r#"{{"headers":{{"f":"x-f"}},{flag},"source":{{"cluster":"c","path":"/f","{field}":"{value}"}}}}"#
            ));
            assert!(
                e.starts_with(&format!("source.{field}: must be between")),
                "{e}"
            );
        }
        assert!(err(&format!(
            r#"{{"headers":{{"f":"x-f"}},{flag},"context":{{"targetingKey":{{"header":"a"}}}}}}"#
        ))
        .starts_with("context.targetingKey:"));
    }

    #[test]
    fn with_a_source_flags_may_arrive_later() {
        let c = Config::parse(
            br#"{"headers":{"f":"x-f"},"source":{"cluster":"flags","path":"/flags.json"}}"#,
        )
        .unwrap();
        let s = c.source.as_ref().unwrap();
        assert_eq!(
            (s.authority.as_str(), s.poll_ms(), s.timeout_ms()),
            ("flags", 30_000, 5_000)
        );
        let d = decide(&c, &c.flags, &RequestParts::new("GET", "/"), 0);
        assert_eq!(d.evaluations[0].reason, Reason::NotFound);
    }
}
