//! A request sequence through a chain of the plugins' policy cores, with a controlled clock.
//!
//! The policies decide (their own `policy.rs`, over an in-memory [`MemoryStore`] with shared
//! data's rules); what is here is the order Envoy calls them in, as each plugin's `filter.rs`
//! does it: request callbacks top to bottom, response callbacks bottom to top; a local reply
//! during the request travels the response path from its filter back to the first; one sent
//! while the response is processed goes straight to the client; then every filter's log
//! callback. Bodies arrive whole, as Envoy's buffer filter after idempotency makes them.
//!
//! Not emulated: a rate limit service (each request says what it answers a rule's `global`
//! part: `rls` = `ok`, `over_limit`, `timeout` or `unavailable`, the default, when its
//! `failureMode` applies; the deny cache works as in the plugin), idempotency's etcd store (records are kept
//! in shared data, as without `store`), flag polling (a flag file given is the fetched one),
//! and concurrent requests (each request completes before the next is sent).

use crate::flags::{reason_name, request_of};
use crate::input::{headers_of, str_of, text_of, u64_of};
use edge_core::headers::HeaderEdits;
use edge_core::problem::Reply;
use edge_core::request::HeaderList;
use edge_core::store::MemoryStore;
use edge_core::{RequestParts, RequestView};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The clock's start: 2026-01-01T00:00:00Z, in nanoseconds since the epoch.
pub const BASE_TIME_NS: u64 = 1_767_225_600 * 1_000_000_000;

const MS: u64 = 1_000_000;
/// Envoy's default route timeout.
const DEFAULT_ROUTE_TIMEOUT_MS: u64 = 15_000;
/// The most requests one sequence may send (`times` included): the page stays responsive.
const MAX_REQUESTS: u64 = 2_000;

/// `response.code_details` as Envoy 1.40 reports them (the harness's list).
const VIA_UPSTREAM: &str = "via_upstream";
const RESET: &str = "upstream_reset_before_response_started{connection_termination}";
const REFUSED: &str = "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}";
const TIMEOUT: &str = "response_timeout";
/// A proxy-wasm plugin's local reply gives no details.
const PLUGIN_REPLY: &str = "";

enum Policy {
    RateLimit {
        limiter: rate_limit::policy::Limiter,
        denied: Vec<rate_limit::global::DenyCache>,
    },
    FlagRouter {
        config: flag_router::config::Config,
        flags: flag_router::flags::FlagSet,
    },
    Idempotency(idempotency::policy::Idempotency),
    CachedFallback(cached_fallback::policy::Fallback),
}

struct Filter {
    name: &'static str,
    policy: Policy,
}

/// What a filter holds for one request between its callbacks (the glue's stream context).
enum Held {
    Nothing,
    /// Rate limit: the quota headers to add to the response.
    Quota(HeaderEdits),
    Claim(idempotency::policy::Claim),
    Fallback {
        req: Box<RequestParts>,
        base: u64,
        probe: Option<u64>,
        answered: bool,
        pending: Option<Box<cached_fallback::policy::Pending>>,
    },
}

/// The answer as it travels back to the client.
struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    details: String,
    /// Who made it: `upstream`, `envoy` or a plugin's name.
    by: String,
}

impl Response {
    /// A plugin's local reply as Envoy sends it: a body gets `content-type: text/plain`
    /// unless the reply names one, and its `content-length`.
    fn from_reply(r: Reply, by: &str) -> Response {
        let mut headers = r.headers;
        if !r.body.is_empty() {
            if !headers.iter().any(|(k, _)| k == "content-type") {
                headers.push(("content-type".into(), b"text/plain".to_vec()));
            }
            headers.retain(|(k, _)| k != "content-length");
            headers.push((
                "content-length".into(),
                r.body.len().to_string().into_bytes(),
            ));
        }
        Response {
            status: u16::try_from(r.status).unwrap_or(500),
            headers,
            body: r.body,
            details: PLUGIN_REPLY.into(),
            by: by.into(),
        }
    }
}

/// One policy decision, for the page.
struct Note {
    plugin: &'static str,
    phase: &'static str,
    decision: String,
    detail: String,
    headers: Vec<Value>,
}

impl Note {
    fn new(plugin: &'static str, phase: &'static str, decision: impl Into<String>) -> Note {
        Note {
            plugin,
            phase,
            decision: decision.into(),
            detail: String::new(),
            headers: Vec::new(),
        }
    }

    fn detail(mut self, d: impl Into<String>) -> Note {
        self.detail = d.into();
        self
    }

    fn edits<S: AsRef<str>>(mut self, on: &str, e: &HeaderEdits<S>) -> Note {
        for r in &e.remove {
            if !e.set.iter().any(|(k, _)| k.as_ref() == r.as_ref()) {
                self.headers
                    .push(json!({ "on": on, "name": r.as_ref(), "value": null }));
            }
        }
        for (k, v) in &e.set {
            self.headers
                .push(json!({ "on": on, "name": k.as_ref(), "value": v.as_ref() }));
        }
        self
    }

    fn to_json(&self) -> Value {
        json!({
            "plugin": self.plugin,
            "phase": self.phase,
            "decision": self.decision,
            "detail": self.detail,
            "headers": self.headers,
        })
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A header list the simulation edits: a request's (`HeaderList`) or a response's pairs.
trait Headers {
    /// Drops every header named `name`, its case ignored.
    fn drop_named(&mut self, name: &str);
    /// Appends a header.
    fn append(&mut self, name: String, value: &[u8]);
}

impl Headers for HeaderList {
    fn drop_named(&mut self, name: &str) {
        self.retain(|k, _| !k.eq_ignore_ascii_case(name.as_bytes()));
    }

    fn append(&mut self, name: String, value: &[u8]) {
        self.push(&name, value);
    }
}

impl Headers for Vec<(String, Vec<u8>)> {
    fn drop_named(&mut self, name: &str) {
        self.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn append(&mut self, name: String, value: &[u8]) {
        self.push((name, value.to_vec()));
    }
}

/// Applies edits as the glue does: every removal, then each set replacing its name.
fn apply<S: AsRef<str>>(headers: &mut impl Headers, e: &HeaderEdits<S>) {
    for r in &e.remove {
        headers.drop_named(r.as_ref());
    }
    for (k, v) in &e.set {
        let k = k.as_ref().to_ascii_lowercase();
        headers.drop_named(&k);
        headers.append(k, v.as_ref().as_bytes());
    }
}

/// A configuration error, with the line of the field in the JSON the page shows.
fn config_error(index: usize, plugin: &str, text: &str, e: &edge_core::ConfigError) -> Value {
    let line = match serde_json::from_str::<Value>(text) {
        Err(syntax) if !text.trim().is_empty() => syntax.line(),
        _ => edge_check::json_pos::line_of(text, &e.field).unwrap_or(1),
    };
    json!({ "filter": index, "plugin": plugin, "path": e.field, "line": line, "message": e.message })
}

fn load(chain: &[Value], flagd: Option<&str>, errors: &mut Vec<Value>) -> Vec<Filter> {
    let mut out = Vec::new();
    for (i, f) in chain.iter().enumerate() {
        let name = str_of(f, "plugin").unwrap_or_default();
        let text = text_of(f, "config").unwrap_or_default();
        let bytes = text.as_bytes();
        // The namespace and seed are the module's (root id = plugin name); any fixed seed
        // decides alike, since it only keys the hashes.
        let policy = match name {
            "rate_limit" => rate_limit::config::Config::parse(bytes).map(|c| {
                let denied = c
                    .rules
                    .iter()
                    .map(|r| {
                        rate_limit::global::DenyCache::new(
                            r.global.as_ref().map_or(0, |g| g.deny_cache_size),
                        )
                    })
                    .collect();
                Policy::RateLimit {
                    limiter: rate_limit::policy::Limiter::new(c, "rate_limit/rate_limit/", 1),
                    denied,
                }
            }),
            "flag_router" => flag_router::config::Config::parse(bytes).and_then(|mut config| {
                let flags = match flagd.filter(|t| !t.trim().is_empty()) {
                    Some(doc) => flag_router::flags::FlagSet::from_document(doc.as_bytes())
                        .map_err(|e| {
                            edge_core::ConfigError::new(
                                format!("flag file: {}", e.field),
                                e.message,
                            )
                        })?,
                    None => std::mem::take(&mut config.flags),
                };
                Ok(Policy::FlagRouter { config, flags })
            }),
            "idempotency" => idempotency::config::Config::parse(bytes).map(|c| {
                Policy::Idempotency(idempotency::policy::Idempotency::new(
                    c,
                    "idempotency/idempotency/",
                    1,
                ))
            }),
            "cached_fallback" => cached_fallback::config::Config::parse(bytes).map(|c| {
                Policy::CachedFallback(cached_fallback::policy::Fallback::new(
                    c,
                    "cached_fallback/cached_fallback/",
                    1,
                ))
            }),
            other => {
                errors.push(json!({ "filter": i, "plugin": other, "path": "plugin", "line": 1,
                    "message": "not one of rate_limit, flag_router, idempotency, cached_fallback" }));
                continue;
            }
        };
        match policy {
            Ok(policy) => out.push(Filter {
                name: match name {
                    "rate_limit" => "rate_limit",
                    "flag_router" => "flag_router",
                    "idempotency" => "idempotency",
                    _ => "cached_fallback",
                },
                policy,
            }),
            Err(e) => errors.push(config_error(i, name, &text, &e)),
        }
    }
    out
}

/// What the rate limit service answers a global rule's call (there is no service here: the
/// request says, `unavailable` when it does not).
#[derive(Clone, Copy)]
enum Rls {
    Ok,
    OverLimit,
    Timeout,
    Unavailable,
}

impl Rls {
    fn answer(self) -> rate_limit::policy::GlobalAnswer {
        use rate_limit::global::{Answer, Failure};
        use rate_limit::policy::GlobalAnswer;
        match self {
            Rls::Ok => GlobalAnswer::Service(Answer::Allowed(None)),
            Rls::OverLimit => GlobalAnswer::Service(Answer::Limited(None)),
            Rls::Timeout => GlobalAnswer::Failed(Failure::Timeout),
            Rls::Unavailable => GlobalAnswer::Failed(Failure::Error),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Rls::Ok => "the rate limit service (as the request's rls says) allowed it",
            Rls::OverLimit => "the rate limit service (as the request's rls says) limited it",
            Rls::Timeout => "the rate limit service timed out (the request's rls): each global rule's failureMode decided",
            Rls::Unavailable => "the rate limit service failed (rls unavailable, the default): each global rule's failureMode decided",
        }
    }
}

/// A route of Envoy's that sends a request with `header: value` under `prefix` to `rewrite`
/// instead (how a flag's route header picks the application's path, as envoy/edge.yaml does).
struct Rewrite {
    header: String,
    value: String,
    prefix: String,
    rewrite: String,
}

/// How the application answers one request.
#[derive(Clone, Debug, Default)]
struct Upstream {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<String>,
    latency_ms: u64,
    reset: bool,
    down: bool,
}

fn upstream_of(v: &Value) -> Result<Upstream, String> {
    Ok(Upstream {
        status: u16::try_from(u64_of(v, "status")?.unwrap_or(200)).unwrap_or(200),
        headers: headers_of(v, "headers")?,
        body: text_of(v, "body"),
        latency_ms: u64_of(v, "latencyMs")?.unwrap_or(0),
        reset: v.get("reset").and_then(Value::as_bool).unwrap_or(false),
        down: v.get("down").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The answer for `path` in a `{"/exact": ..., "/prefix*": ...}` map: exact first (query
/// ignored), then the longest prefix; as the scenario files route.
fn routed<'a>(routes: &'a BTreeMap<String, Upstream>, path: &str) -> Option<&'a Upstream> {
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    routes.get(bare).or_else(|| routes.get(path)).or_else(|| {
        routes
            .iter()
            .filter_map(|(p, a)| {
                bare.starts_with(p.strip_suffix('*')?)
                    .then_some((p.len(), a))
            })
            .max_by_key(|(n, _)| *n)
            .map(|(_, a)| a)
    })
}

fn envoy_failure(status: u16, body: &str, details: &str) -> Response {
    Response {
        status,
        headers: vec![
            ("content-length".into(), body.len().to_string().into_bytes()),
            ("content-type".into(), b"text/plain".to_vec()),
        ],
        body: body.as_bytes().to_vec(),
        details: details.into(),
        by: "envoy".into(),
    }
}

pub fn run(input: &Value) -> Result<Value, String> {
    let mut errors = Vec::new();
    let chain = input
        .get("chain")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let flagd = text_of(input, "flagd");
    let filters = load(&chain, flagd.as_deref(), &mut errors);
    if !errors.is_empty() {
        return Ok(json!({ "errors": errors, "requests": [], "tokens": [] }));
    }
    let route_timeout_ms = u64_of(input, "routeTimeoutMs")?.unwrap_or(DEFAULT_ROUTE_TIMEOUT_MS);
    let mut routes = BTreeMap::new();
    if let Some(Value::Object(m)) = input.get("upstream") {
        for (path, a) in m {
            routes.insert(
                path.clone(),
                upstream_of(a).map_err(|e| format!("upstream {path}: {e}"))?,
            );
        }
    }
    let recorded: Vec<String> = input
        .get("recordHeaders")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default();

    let mut rewrites = Vec::new();
    for (i, r) in input
        .get("rewrites")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = |k: &str| {
            str_of(r, k)
                .map(str::to_string)
                .ok_or_else(|| format!("rewrites[{i}].{k}: expected text"))
        };
        rewrites.push(Rewrite {
            header: field("header")?.to_ascii_lowercase(),
            value: field("value")?,
            prefix: field("prefix")?,
            rewrite: field("rewrite")?,
        });
    }
    let mut sim = Sim {
        filters,
        store: MemoryStore::new(),
        now: BASE_TIME_NS,
        route_timeout_ms,
        routes,
        recorded,
        rewrites,
        down: false,
        rls: Rls::Unavailable,
        tokens: BTreeMap::new(),
    };
    let mut out = Vec::new();
    let steps = input
        .get("requests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut sent = 0u64;
    for (i, step) in steps.iter().enumerate() {
        let wait = u64_of(step, "waitMs").map_err(|e| format!("requests[{i}]: {e}"))?;
        sim.now = sim.now.saturating_add(wait.unwrap_or(0).saturating_mul(MS));
        // Items without a path change the scene: new application answers, the application
        // down or back, or only the clock.
        if step.get("path").is_none() {
            if let Some(Value::Object(m)) = step.get("answer") {
                for (path, a) in m {
                    let a =
                        upstream_of(a).map_err(|e| format!("requests[{i}].answer {path}: {e}"))?;
                    sim.routes.insert(path.clone(), a);
                }
            }
            if let Some(down) = step.get("upstreamDown").and_then(Value::as_bool) {
                sim.down = down;
            }
            continue;
        }
        let times = u64_of(step, "times")
            .map_err(|e| format!("requests[{i}]: {e}"))?
            .unwrap_or(1);
        let upstream = match step.get("upstream") {
            Some(u) if !u.is_null() => {
                Some(upstream_of(u).map_err(|e| format!("requests[{i}].upstream: {e}"))?)
            }
            _ => None,
        };
        sim.rls = match str_of(step, "rls").unwrap_or("unavailable") {
            "ok" => Rls::Ok,
            "over_limit" => Rls::OverLimit,
            "timeout" => Rls::Timeout,
            "unavailable" => Rls::Unavailable,
            other => {
                return Err(format!(
                    "requests[{i}].rls: {other} is not ok, over_limit, timeout or unavailable"
                ))
            }
        };
        let body = text_of(step, "body").unwrap_or_default();
        for _ in 0..times {
            sent += 1;
            if sent > MAX_REQUESTS {
                return Err(format!("more than {MAX_REQUESTS} requests: send fewer"));
            }
            let req = request_of(step).map_err(|e| format!("requests[{i}]: {e}"))?;
            let mut r = sim.send(req, body.as_bytes(), upstream.as_ref());
            if let Some(o) = r.as_object_mut() {
                o.insert("step".into(), json!(i));
            }
            out.push(r);
        }
    }
    let tokens: Vec<Value> = sim.tokens.into_values().collect();
    Ok(json!({ "errors": [], "requests": out, "tokens": tokens }))
}

struct Sim {
    filters: Vec<Filter>,
    store: MemoryStore,
    now: u64,
    route_timeout_ms: u64,
    routes: BTreeMap<String, Upstream>,
    recorded: Vec<String>,
    rewrites: Vec<Rewrite>,
    /// The application refuses connections.
    down: bool,
    /// How the rate limit service answers the request being sent.
    rls: Rls,
    /// Per rate limit rule (`filter/rule`): the remaining tokens after each request it matched.
    tokens: BTreeMap<(usize, usize), Value>,
}

impl Sim {
    fn ms(&self) -> f64 {
        (self.now - BASE_TIME_NS) as f64 / MS as f64
    }

    fn send(&mut self, mut req: RequestParts, body: &[u8], upstream: Option<&Upstream>) -> Value {
        let sent_at = self.ms();
        let method = req.method.clone();
        let path = req.path.clone();
        if !body.is_empty() || matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
            req.headers.retain(|k, _| k != b"content-length");
            req.headers
                .push("content-length", body.len().to_string().as_bytes());
        }
        let mut notes = Vec::new();
        let mut held: Vec<Held> = self.filters.iter().map(|_| Held::Nothing).collect();
        let mut replied = None;
        for i in 0..self.filters.len() {
            let Some(slot) = held.get_mut(i) else {
                break;
            };
            if let Some(reply) = self.request(i, &mut req, body, slot, &mut notes) {
                replied = Some((i, reply));
                break;
            }
        }
        let mut reached = Value::Null;
        let (mut resp, back_from) = match replied {
            Some((i, r)) => (r, Some(i)),
            None => {
                let (r, seen) = self.exchange(&req, body, upstream);
                reached = seen;
                (r, self.filters.len().checked_sub(1))
            }
        };
        // The response path: from the filter that answered (or the last) back to the first,
        // until one replaces the answer (that reply goes straight to the client).
        if let Some(last) = back_from {
            for i in (0..=last).rev() {
                let Some(slot) = held.get_mut(i) else {
                    continue;
                };
                if let Some(r) = self.response(i, &mut resp, slot, &mut notes) {
                    resp = r;
                    break;
                }
            }
        }
        for (i, slot) in held.iter_mut().enumerate() {
            self.log(i, slot, &mut notes);
        }
        let recorded: Map<String, Value> = self
            .recorded
            .iter()
            .map(|h| {
                let v = resp
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(h))
                    .map(|(_, v)| Value::String(text(v)));
                (h.clone(), v.unwrap_or(Value::Null))
            })
            .collect();
        json!({
            "sentAtMs": sent_at,
            "doneAtMs": self.ms(),
            "method": method,
            "path": path,
            "decisions": notes.iter().map(Note::to_json).collect::<Vec<_>>(),
            "upstream": reached,
            "response": {
                "status": resp.status,
                "headers": resp.headers.iter().map(|(k, v)| json!([k, text(v)])).collect::<Vec<_>>(),
                "recorded": recorded,
                "body": text(&resp.body),
                "by": resp.by,
                "details": resp.details,
            },
        })
    }

    /// The application's side: what it received, and its answer (or Envoy's, for a reset,
    /// a refused connection or the route timeout). The clock moves by the latency.
    fn exchange(
        &mut self,
        req: &RequestParts,
        body: &[u8],
        given: Option<&Upstream>,
    ) -> (Response, Value) {
        let mut path = text(&req.raw_path());
        for r in &self.rewrites {
            if req
                .header(&r.header)
                .is_some_and(|v| v == r.value.as_bytes())
            {
                if let Some(rest) = path.strip_prefix(r.prefix.as_str()) {
                    path = format!("{}{rest}", r.rewrite);
                    break;
                }
            }
        }
        let method = text(&req.method());
        let headers: Vec<Value> = req
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(b":"))
            .map(|(k, v)| json!([text(k), text(v)]))
            .collect();
        let seen = json!({
            "method": method,
            "path": path,
            "headers": headers,
            "bodyBytes": body.len(),
        });
        let answer = given
            .cloned()
            .or_else(|| routed(&self.routes, &path).cloned());
        let answer = match answer {
            None if self.down => Some(Upstream::default()),
            a => a,
        };
        let Some(a) = answer else {
            let text = format!("upstream saw {method} {path}");
            return (
                Response {
                    status: 200,
                    headers: vec![
                        ("content-type".into(), b"text/plain".to_vec()),
                        ("content-length".into(), text.len().to_string().into_bytes()),
                        ("x-envoy-upstream-service-time".into(), b"0".to_vec()),
                    ],
                    body: text.into_bytes(),
                    details: VIA_UPSTREAM.into(),
                    by: "upstream".into(),
                },
                seen,
            );
        };
        if a.down || self.down {
            let r = envoy_failure(503, "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure", REFUSED);
            return (r, Value::Null);
        }
        if a.reset {
            let r = envoy_failure(503, "upstream connect error or disconnect/reset before headers. reset reason: connection termination", RESET);
            return (r, seen);
        }
        if a.latency_ms >= self.route_timeout_ms {
            self.now = self
                .now
                .saturating_add(self.route_timeout_ms.saturating_mul(MS));
            return (
                envoy_failure(504, "upstream request timeout", TIMEOUT),
                seen,
            );
        }
        self.now = self.now.saturating_add(a.latency_ms.saturating_mul(MS));
        let body = a
            .body
            .clone()
            .unwrap_or_else(|| format!("upstream saw {method} {path}"))
            .into_bytes();
        let mut headers: Vec<(String, Vec<u8>)> = a
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        let bodiless = matches!(a.status, 100..=199 | 204 | 304);
        if !bodiless && !headers.iter().any(|(k, _)| k == "content-length") {
            headers.push(("content-length".into(), body.len().to_string().into_bytes()));
        }
        headers.push((
            "x-envoy-upstream-service-time".into(),
            a.latency_ms.to_string().into_bytes(),
        ));
        (
            Response {
                status: a.status,
                headers,
                body,
                details: VIA_UPSTREAM.into(),
                by: "upstream".into(),
            },
            seen,
        )
    }

    /// Filter `i`'s request callbacks; `Some` is its local reply.
    fn request(
        &mut self,
        i: usize,
        req: &mut RequestParts,
        body: &[u8],
        held: &mut Held,
        notes: &mut Vec<Note>,
    ) -> Option<Response> {
        let now = self.now;
        let at_ms = self.ms();
        let store = &self.store;
        let f = self.filters.get_mut(i)?;
        let name = f.name;
        match &mut f.policy {
            Policy::RateLimit { limiter, denied } => {
                use rate_limit::policy::{Action, GlobalAnswer, Outcome};
                let d = limiter.check(req, now, store);
                let mut parts = Vec::new();
                for r in &d.results {
                    let rule = limiter.config.rules.get(r.rule);
                    let rule_name = rule.map_or("?", |x| x.name.as_str());
                    let outcome = match r.outcome {
                        Outcome::Allowed => "allowed",
                        Outcome::Limited => "limited",
                        Outcome::ShadowLimited => "shadow-limited",
                        Outcome::StoreError => "store error",
                    };
                    parts.push(format!(
                        "rule {rule_name}: {outcome}, {} left{}",
                        r.remaining,
                        if r.overflow { " (overflow bucket)" } else { "" }
                    ));
                    let limit = rule.map_or(0, |x| x.limit.burst);
                    let series = self.tokens.entry((i, r.rule)).or_insert_with(
                        || json!({ "filter": i, "rule": rule_name, "burst": limit, "points": [] }),
                    );
                    if let Some(points) = series.get_mut("points").and_then(Value::as_array_mut) {
                        points.push(
                            json!({ "atMs": at_ms, "remaining": r.remaining, "outcome": outcome }),
                        );
                    }
                }
                let mut action = d.action;
                if let Some(pending) = d.pending {
                    let mut calls = 0;
                    let answers: Vec<GlobalAnswer> = limiter
                        .plan(&pending, denied, now)
                        .into_iter()
                        .map(|ask| match ask {
                            rate_limit::policy::Ask::Known(a) => a,
                            rate_limit::policy::Ask::Call { .. } => {
                                calls += 1;
                                self.rls.answer()
                            }
                        })
                        .collect();
                    let settled = limiter.settle(pending, &answers, now, store);
                    for (rule, key, denial) in settled.remember {
                        if let Some(c) = denied.get_mut(rule) {
                            c.remember(key, denial);
                        }
                    }
                    action = settled.action;
                    parts.push(if calls > 0 {
                        self.rls.describe()
                    } else {
                        "the deny cache still holds this client: no call to the rate limit service"
                    }.into());
                }
                let detail = if parts.is_empty() {
                    "no rule matched".to_string()
                } else {
                    parts.join("; ")
                };
                match action {
                    Action::Continue { upstream, response } => {
                        let word = if d.results.is_empty() {
                            "no rule"
                        } else {
                            "allowed"
                        };
                        notes.push(
                            Note::new(name, "request", word)
                                .detail(detail)
                                .edits("request", &upstream),
                        );
                        apply(&mut req.headers, &upstream);
                        *held = Held::Quota(response);
                        None
                    }
                    Action::Reply(reply) => {
                        notes.push(
                            Note::new(name, "request", format!("answered {}", reply.status))
                                .detail(detail),
                        );
                        Some(Response::from_reply(reply, name))
                    }
                }
            }
            Policy::FlagRouter { config, flags } => {
                let d = flag_router::policy::decide(config, flags, req, now / 1_000_000_000);
                let parts: Vec<String> = d
                    .evaluations
                    .iter()
                    .map(|e| {
                        let mut s = format!(
                            "{} → {} ({})",
                            e.flag,
                            e.variant.unwrap_or("no variant"),
                            reason_name(e.reason)
                        );
                        if let Some(err) = &e.error {
                            s.push_str(": ");
                            s.push_str(err);
                        }
                        s
                    })
                    .collect();
                notes.push(
                    Note::new(name, "request", "evaluated")
                        .detail(parts.join("; "))
                        .edits("request", &d.edits),
                );
                apply(&mut req.headers, &d.edits);
                None
            }
            Policy::Idempotency(policy) => {
                use idempotency::policy::{Begin, BodyPlan, Feed, Identify};
                let refuse = |p: idempotency::policy::Problem, detail: &str| {
                    let reply = p.reply(&policy.config.header, detail);
                    (
                        format!("answered {}", p.status()),
                        detail.to_string(),
                        reply,
                    )
                };
                let key = match policy.identify(&*req) {
                    Identify::Skip => {
                        let why = if policy.covered(&*req) {
                            "no key, and keys are optional"
                        } else {
                            "not a covered route or method"
                        };
                        notes.push(Note::new(name, "request", "passed").detail(why));
                        return None;
                    }
                    Identify::Refuse(p, detail) => {
                        let (word, detail, reply) = refuse(p, &detail);
                        notes.push(Note::new(name, "request", word).detail(detail));
                        return Some(Response::from_reply(reply, name));
                    }
                    Identify::Key(k) => k,
                };
                let content_length = RequestView::header(&*req, "content-length");
                let fingerprint = match policy.body_plan(body.is_empty(), content_length.as_deref())
                {
                    BodyPlan::Decide(fp) => Ok(fp),
                    BodyPlan::Refuse(p, detail) => Err((p, detail)),
                    BodyPlan::Read(_) if policy.held(store, key, now) => Err((
                        idempotency::policy::Problem::InFlight,
                        "the first request with this key has not completed yet; retry later"
                            .to_string(),
                    )),
                    BodyPlan::Read(mut reading) => {
                        match reading.feed(body.len(), true, |start, len| {
                            body.get(start..start.saturating_add(len))
                                .unwrap_or_default()
                                .to_vec()
                        }) {
                            Feed::Done(fp) => Ok(Some(fp)),
                            Feed::Refuse(p, detail) => Err((p, detail)),
                            Feed::More => Ok(Some(reading.finish())),
                        }
                    }
                };
                let fingerprint = match fingerprint {
                    Ok(fp) => fp,
                    Err((p, detail)) => {
                        let (word, detail, reply) = refuse(p, &detail);
                        notes.push(Note::new(name, "request", word).detail(detail));
                        return Some(Response::from_reply(reply, name));
                    }
                };
                match policy.begin(store, key, fingerprint, now) {
                    Begin::Forward(claim) => {
                        notes.push(
                            Note::new(name, "request", "forwarded")
                                .detail("first request with this key: claimed until its response"),
                        );
                        *held = Held::Claim(claim);
                        None
                    }
                    Begin::Replay(reply) => {
                        notes.push(Note::new(name, "request", "replayed").detail(format!(
                            "the stored {} answer, not the application",
                            reply.status
                        )));
                        Some(Response::from_reply(reply, name))
                    }
                    Begin::Refuse(p, detail) => {
                        let (word, detail, reply) = refuse(p, &detail);
                        notes.push(Note::new(name, "request", word).detail(detail));
                        Some(Response::from_reply(reply, name))
                    }
                }
            }
            Policy::CachedFallback(policy) => {
                use cached_fallback::policy::{Covered, RequestAction};
                if !policy.covers(&*req) {
                    notes.push(
                        Note::new(name, "request", "passed")
                            .detail("not a covered route or method"),
                    );
                    return None;
                }
                let captured = req.clone();
                let base = policy.base_key(&captured);
                let d = policy.on_request(
                    Covered {
                        req: &captured,
                        base,
                    },
                    now,
                    store,
                );
                let errors = store_errors(&d.errors);
                match d.action {
                    RequestAction::Forward { probe } => {
                        let (word, why) = if probe.is_some() {
                            (
                                "probe",
                                "the circuit is half-open: this request tests the upstream",
                            )
                        } else {
                            ("forwarded", "circuit closed")
                        };
                        notes.push(
                            Note::new(name, "request", word).detail(format!("{why}{errors}")),
                        );
                        *held = Held::Fallback {
                            req: Box::new(captured),
                            base,
                            probe,
                            answered: false,
                            pending: None,
                        };
                        None
                    }
                    RequestAction::Answer { reply, served } => {
                        notes.push(
                            Note::new(name, "request", format!("answered {}", reply.status))
                                .detail(format!("circuit open: {}{errors}", served_word(served))),
                        );
                        *held = Held::Fallback {
                            req: Box::new(captured),
                            base,
                            probe: None,
                            answered: true,
                            pending: None,
                        };
                        Some(Response::from_reply(reply, name))
                    }
                }
            }
        }
    }

    /// Filter `i`'s response callbacks; `Some` replaces the answer (sent straight on).
    fn response(
        &mut self,
        i: usize,
        resp: &mut Response,
        held: &mut Held,
        notes: &mut Vec<Note>,
    ) -> Option<Response> {
        let now = self.now;
        let store = &self.store;
        let f = self.filters.get(i)?;
        let name = f.name;
        match (&f.policy, held) {
            (Policy::RateLimit { .. }, Held::Quota(edits)) => {
                if !edits.is_empty() {
                    notes.push(
                        Note::new(name, "response", "quota headers").edits("response", &*edits),
                    );
                    apply(&mut resp.headers, &*edits);
                }
                None
            }
            (Policy::Idempotency(policy), held @ Held::Claim(_)) => {
                use idempotency::policy::{Completion, Fate};
                let Held::Claim(claim) = std::mem::replace(held, Held::Nothing) else {
                    return None;
                };
                match policy.response_fate(resp.status, Some(&resp.details)) {
                    Fate::Release(why) => {
                        let released = policy.release(store, &claim).unwrap_or(false);
                        notes.push(Note::new(name, "response", "key released").detail(format!(
                            "{why}{}",
                            if released {
                                ""
                            } else {
                                " (it was already taken over)"
                            }
                        )));
                    }
                    Fate::Keep => {
                        let mut copy = policy.copy(resp.status, resp.headers.clone());
                        if resp.body.is_empty() {
                            copy.end();
                        } else {
                            let _ = copy.body(resp.body.len(), true, || resp.body.clone());
                        }
                        let word = match policy.complete(store, &claim, copy.finish(), now) {
                            Ok(Completion::Stored) => "kept for replay",
                            Ok(Completion::StoredWithoutResponse) => {
                                "completed without its response (too large to keep): repeats get 409"
                            }
                            Ok(Completion::Lost) => "lost: its claim had expired",
                            Err(_) => "not recorded: the store failed",
                        };
                        notes.push(
                            Note::new(name, "response", word)
                                .detail(format!("status {} is in storeStatuses", resp.status)),
                        );
                    }
                }
                None
            }
            (
                Policy::CachedFallback(policy),
                Held::Fallback {
                    req,
                    base,
                    probe,
                    answered: false,
                    pending,
                },
            ) => {
                use cached_fallback::policy::{Answer, Covered, ResponseAction};
                let headers = if policy.wants_headers(resp.status, Some(&resp.details)) {
                    resp.headers.clone()
                } else {
                    Vec::new()
                };
                let answer = Answer {
                    status: resp.status,
                    details: Some(&resp.details),
                    headers,
                };
                let d =
                    policy.on_response(Covered { req, base: *base }, *probe, answer, now, store);
                if d.settled {
                    *probe = None;
                }
                let opened = if d.circuit_opened {
                    "; the circuit opened"
                } else {
                    ""
                };
                let errors = store_errors(&d.errors);
                match d.action {
                    ResponseAction::Replace { reply, served } => {
                        notes.push(
                            Note::new(name, "response", format!("replaced with {}", reply.status))
                                .detail(format!(
                                    "{} ({} {}){opened}{errors}",
                                    served_word(served),
                                    resp.status,
                                    if resp.details.is_empty() {
                                        "-"
                                    } else {
                                        &resp.details
                                    }
                                )),
                        );
                        return Some(Response::from_reply(reply, name));
                    }
                    ResponseAction::PassThrough => notes.push(
                        Note::new(name, "response", "passed through").detail(format!(
                            "a failure, with nothing kept to serve{opened}{errors}"
                        )),
                    ),
                    ResponseAction::Collect(mut p) => {
                        if resp.body.is_empty() {
                            p.copy.end();
                        } else if let Some(why) =
                            p.copy.body(resp.body.len(), true, || resp.body.clone())
                        {
                            notes
                                .push(Note::new(name, "response", "not kept").detail(why.reason()));
                            return None;
                        }
                        *pending = Some(p);
                    }
                    ResponseAction::Skipped(why) => notes.push(
                        Note::new(name, "response", "not kept")
                            .detail(format!("{}{errors}", why.reason())),
                    ),
                    ResponseAction::Ignore => {
                        if !opened.is_empty() {
                            notes.push(Note::new(name, "response", "circuit opened"));
                        }
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// Filter `i`'s log callback, after the client has the whole answer.
    fn log(&mut self, i: usize, held: &mut Held, notes: &mut Vec<Note>) {
        let now = self.now;
        let store = &self.store;
        let Some(f) = self.filters.get(i) else {
            return;
        };
        let name = f.name;
        match (&f.policy, std::mem::replace(held, Held::Nothing)) {
            (Policy::Idempotency(policy), Held::Claim(claim)) => {
                // The answer never reached its response callbacks (replaced on the way).
                if let idempotency::policy::Fate::Release(why) = policy.cut_short(false) {
                    let _ = policy.release(store, &claim);
                    notes.push(Note::new(name, "log", "key released").detail(why));
                }
            }
            (Policy::CachedFallback(policy), Held::Fallback { probe, pending, .. }) => {
                if let Some(token) = probe {
                    let _ = policy.abandon_probe(token, now, store);
                    notes.push(Note::new(name, "log", "probe handed back"));
                }
                if let Some(p) = pending {
                    let word = match policy.store(*p, store) {
                        Ok(true) => "kept",
                        Ok(false) => "not kept",
                        Err(_) => "not kept: the store failed",
                    };
                    notes.push(
                        Note::new(name, "log", word).detail("the last good answer for this key"),
                    );
                }
            }
            _ => {}
        }
    }
}

fn served_word(s: cached_fallback::policy::Served) -> &'static str {
    match s {
        cached_fallback::policy::Served::Stale => "the kept answer",
        cached_fallback::policy::Served::Static => "the static fallback",
        cached_fallback::policy::Served::Unavailable => "nothing kept: 503",
    }
}

fn store_errors(errors: &[edge_core::StoreError]) -> String {
    match errors.first() {
        Some(e) => format!("; shared data failed ({e}): decided as if empty"),
        None => String::new(),
    }
}
