//! Flags in the page: a flagd flag file evaluated by the flag router's own evaluator, for an
//! evaluation context as JSON, or for a request whose headers the plugin's configuration maps
//! into the context (then exactly the router's per-request decision, headers included); and
//! the variant split over synthetic users, so a rollout percentage can be seen.

use crate::input::{headers_of, str_of, text_of, u64_of};
use edge_core::key::KeyPart;
use edge_core::{ConfigError, RequestParts};
use flag_router::config::Config;
use flag_router::flags::{FlagSet, Reason, Resolution};
use flag_router::policy::{context, decide};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Users in a split unless the input says otherwise, and the most it may say.
const DEFAULT_USERS: u64 = 1000;
const MAX_USERS: u64 = 100_000;

/// flagd's names for the reasons (what its SDKs report).
pub fn reason_name(r: Reason) -> &'static str {
    match r {
        Reason::Static => "STATIC",
        Reason::TargetingMatch => "TARGETING_MATCH",
        Reason::Default => "DEFAULT",
        Reason::Disabled => "DISABLED",
        Reason::NotFound => "FLAG_NOT_FOUND",
        Reason::Error => "ERROR",
    }
}

/// An input that does not parse, with the field its parser named and that field's line.
fn config_error(source: &str, text: &str, e: &ConfigError) -> Value {
    let line = match serde_json::from_str::<Value>(text) {
        Err(syntax) if !text.trim().is_empty() => syntax.line(),
        _ => edge_check::json_pos::line_of(text, &e.field).unwrap_or(1),
    };
    json!({ "source": source, "path": e.field, "line": line, "message": e.message })
}

fn result(flag: &str, header: Option<&str>, r: &Resolution<'_>) -> Value {
    json!({
        "flag": flag,
        "header": header,
        "variant": r.variant,
        "value": r.value,
        "reason": reason_name(r.reason),
        "error": r.error,
    })
}

/// The counts of one flag's outcomes over the synthetic users, largest first.
#[derive(Default)]
struct Tally(BTreeMap<(String, Option<String>), u64>);

impl Tally {
    fn add(&mut self, variant: Option<&str>, reason: Reason, value: Option<&str>) {
        let label = variant.map_or_else(
            || format!("(none: {})", reason_name(reason)),
            str::to_string,
        );
        *self
            .0
            .entry((label, value.map(str::to_string)))
            .or_default() += 1;
    }

    fn to_json(&self, flag: &str, users: u64) -> Value {
        let mut rows: Vec<_> = self.0.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let rows: Vec<Value> = rows
            .into_iter()
            .map(|((variant, value), n)| {
                json!({
                    "variant": variant,
                    "value": value,
                    "count": n,
                    "percent": (*n as f64) * 100.0 / (users.max(1) as f64),
                })
            })
            .collect();
        json!({ "flag": flag, "variants": rows })
    }
}

pub fn run(input: &Value) -> Result<Value, String> {
    let users = u64_of(input, "users")?
        .unwrap_or(DEFAULT_USERS)
        .min(MAX_USERS);
    let now_secs = u64_of(input, "nowSecs")?.unwrap_or(crate::BASE_TIME_NS / 1_000_000_000);
    let flagd = text_of(input, "flagd").filter(|t| !t.trim().is_empty());
    let mut errors = Vec::new();
    let document = match flagd
        .as_deref()
        .map(|t| (t, FlagSet::from_document(t.as_bytes())))
    {
        Some((t, Ok(set))) => {
            // A fetched file's bad flag breaks that flag alone (it then resolves ERROR); the
            // page still points at it.
            for why in set.flags.values().filter_map(|f| f.broken.as_deref()) {
                let (field, message) = why.split_once(": ").unwrap_or(("", why));
                let e =
                    ConfigError::new(field, format!("{message} (this flag alone resolves ERROR)"));
                errors.push(config_error("flagd", t, &e));
            }
            Some(set)
        }
        Some((t, Err(e))) => {
            errors.push(config_error("flagd", t, &e));
            None
        }
        None => None,
    };
    let mut out = match str_of(input, "mode").unwrap_or("context") {
        "context" => by_context(input, document, users, now_secs, &mut errors)?,
        "request" => by_request(input, document, users, now_secs, &mut errors)?,
        other => return Err(format!("mode: {other} is neither context nor request")),
    };
    if let Some(o) = out.as_object_mut() {
        o.insert("errors".into(), Value::Array(errors));
        o.insert("users".into(), json!(users));
    }
    Ok(out)
}

/// The flagd context with `$flagd` as the router adds it per flag (flagd's own properties).
fn with_flagd(ctx: &Map<String, Value>, flag: &str, now_secs: u64) -> Value {
    let mut data = ctx.clone();
    data.insert(
        "$flagd".into(),
        json!({ "flagKey": flag, "timestamp": now_secs }),
    );
    Value::Object(data)
}

fn by_context(
    input: &Value,
    document: Option<FlagSet>,
    users: u64,
    now_secs: u64,
    errors: &mut Vec<Value>,
) -> Result<Value, String> {
    let text = text_of(input, "context").unwrap_or_default();
    let ctx = if text.trim().is_empty() {
        Map::new()
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                errors.push(json!({ "source": "context", "path": "", "line": 1,
                    "message": "the evaluation context must be a JSON object" }));
                Map::new()
            }
            Err(e) => {
                errors.push(json!({ "source": "context", "path": "", "line": e.line(),
                    "message": e.to_string() }));
                Map::new()
            }
        }
    };
    let Some(set) = document else {
        if errors.is_empty() {
            errors.push(json!({ "source": "flagd", "path": "", "line": 1,
                "message": "paste a flagd flag file (its `flags` object)" }));
        }
        return Ok(json!({ "results": [], "split": [], "context": ctx }));
    };
    let results: Vec<Value> = set
        .flags
        .keys()
        .map(|k| result(k, None, &set.resolve(k, &with_flagd(&ctx, k, now_secs))))
        .collect();
    let mut split = Vec::new();
    for k in set.flags.keys() {
        let mut tally = Tally::default();
        let mut user = ctx.clone();
        for i in 0..users {
            user.insert("targetingKey".into(), Value::String(format!("user-{i}")));
            let r = set.resolve(k, &with_flagd(&user, k, now_secs));
            tally.add(r.variant, r.reason, r.value);
        }
        split.push(tally.to_json(k, users));
    }
    Ok(json!({
        "results": results,
        "split": split,
        "context": ctx,
        "splitBy": "targetingKey user-0 … user-N in the context above",
    }))
}

/// The request the page describes, as the plugins read one.
pub fn request_of(r: &Value) -> Result<RequestParts, String> {
    let method = str_of(r, "method")
        .unwrap_or("GET")
        .trim()
        .to_ascii_uppercase();
    let path = str_of(r, "path").unwrap_or("/").trim().to_string();
    let mut req = RequestParts::new(&method, &path);
    req.headers.push(":authority", b"edge.test");
    for (k, v) in headers_of(r, "headers")? {
        req.headers.push(&k, v.as_bytes());
    }
    let from = str_of(r, "from").unwrap_or("127.0.0.1");
    Ok(req.from_ip(&format!("{from}:40000")))
}

/// The same request from the `i`-th synthetic user: another value of the part that
/// `targetingKey` reads. `None` when that part cannot vary (path, method) or is not set.
fn as_user(base: &RequestParts, part: Option<&KeyPart>, i: u64) -> Option<RequestParts> {
    let mut req = base.clone();
    let id = format!("user-{i}");
    match part? {
        KeyPart::Header(h) => {
            req.headers.retain(|k, _| k != h.as_bytes());
            req.headers.push(h, id.as_bytes());
        }
        KeyPart::Cookie(c) => {
            let others = req
                .headers
                .get("cookie")
                .map(|v| String::from_utf8_lossy(v).into_owned());
            req.headers.retain(|k, _| k != b"cookie");
            let cookie = match others {
                Some(o) if !o.trim().is_empty() => format!("{c}={id}; {o}"),
                _ => format!("{c}={id}"),
            };
            req.headers.push("cookie", cookie.as_bytes());
        }
        KeyPart::ClientIp => {
            req.client_ip = Some(format!(
                "10.{}.{}.{}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            ));
        }
        KeyPart::Path | KeyPart::Method => return None,
    }
    Some(req)
}

fn by_request(
    input: &Value,
    document: Option<FlagSet>,
    users: u64,
    now_secs: u64,
    errors: &mut Vec<Value>,
) -> Result<Value, String> {
    let text = text_of(input, "router").unwrap_or_default();
    let mut config = match Config::parse(text.as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            errors.push(config_error("router", &text, &e));
            return Ok(json!({ "results": [], "split": [] }));
        }
    };
    // A flag file given here is what a fetch from `source` would bring: it replaces the
    // inline flags, as a good fetch does.
    let from_file = document.is_some();
    let set = document.unwrap_or_else(|| std::mem::take(&mut config.flags));
    let req = request_of(input.get("request").unwrap_or(&Value::Null))?;
    let d = decide(&config, &set, &req, now_secs);
    let results: Vec<Value> = d
        .evaluations
        .iter()
        .map(|e| {
            let header = config
                .headers
                .iter()
                .find(|(f, _)| f == e.flag)
                .map(|(_, h)| h.as_str());
            let value = e
                .variant
                .and_then(|v| set.flags.get(e.flag).and_then(|f| f.variants.get(v)))
                .map(String::as_str);
            json!({
                "flag": e.flag,
                "header": header,
                "variant": e.variant,
                "value": value,
                "reason": reason_name(e.reason),
                "error": e.error,
            })
        })
        .collect();
    let type_errors: Vec<Value> = d
        .type_errors
        .iter()
        .map(|a| json!({ "attribute": a.name, "message": flag_router::policy::type_warning(a) }))
        .collect();
    let set_headers: Vec<Value> = d.edits.set.iter().map(|(k, v)| json!([k, v])).collect();
    let mut ignored = Vec::new();
    let ctx = context(&config, &req, &mut ignored);

    let mut split = Vec::new();
    let part = config.targeting_key.as_ref();
    let varies = as_user(&req, part, 0).is_some();
    for (flag, _) in &config.headers {
        let mut tally = Tally::default();
        for i in 0..if varies { users } else { 0 } {
            let Some(user) = as_user(&req, part, i) else {
                break;
            };
            let one = decide(&config, &set, &user, now_secs);
            if let Some(e) = one.evaluations.iter().find(|e| e.flag == flag) {
                let value = e
                    .variant
                    .and_then(|v| set.flags.get(e.flag).and_then(|f| f.variants.get(v)))
                    .map(String::as_str);
                tally.add(e.variant, e.reason, value);
            }
        }
        split.push(tally.to_json(flag, users));
    }
    let split_by = match part {
        Some(KeyPart::Header(h)) => format!("header {h}: user-0 … user-N"),
        Some(KeyPart::Cookie(c)) => format!("cookie {c}: user-0 … user-N"),
        Some(KeyPart::ClientIp) => "client IP 10.0.0.0 … (one per user)".to_string(),
        Some(_) => {
            "nothing: the targetingKey's part (path or method) is the same for every user".into()
        }
        None => "nothing: the configuration has no targetingKey, so every user is the same request"
            .into(),
    };
    Ok(json!({
        "results": results,
        "split": split,
        "splitBy": split_by,
        "context": ctx,
        "typeErrors": type_errors,
        "headers": { "remove": d.edits.remove, "set": set_headers },
        "flagsFrom": if from_file { "flag file" } else { "inline flags" },
    }))
}
