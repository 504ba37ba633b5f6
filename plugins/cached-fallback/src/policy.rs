//! The cached-fallback decisions: which requests are covered, what their key is, whether a
//! response may be kept, whether an answer is a failure, and what replaces it. Pure: requests
//! come in as [`RequestParts`] (captured by the glue at request time), state as a
//! [`SlotStore`], time as nanoseconds.
//!
//! # State layout (namespace `cached_fallback/<root_id>/`)
//! - an [`edge_core::table::Table`] of `maxEntries` records with at most `maxTotalBytes` of
//!   bodies. A response without `Vary` is one record under the request's base key (method,
//!   host, path, query, listed headers). A response with `Vary` is two: under the base key a
//!   record naming the `Vary` headers (no body), and under the variant key (base key plus the
//!   request's values of those headers) the response. A lookup reads the base record and, if it
//!   names `Vary` headers, the variant's.
//! - `circuit`: the circuit breaker's [`State`] (21 bytes).
//! - `seed`: the 64-bit key seed, random per Envoy, so clients cannot craft colliding keys.

use crate::circuit::{self, Admit, State};
use crate::config::{Config, FailOn};
use alloc::borrow::Cow;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use edge_core::key::KeyHasher;
use edge_core::metrics;
use edge_core::problem::{problem_json, retry_after, retry_after_secs, Reply};
use edge_core::request::{RequestParts, RequestView};
use edge_core::store::{update, update_or_create};
use edge_core::stored::{CacheControl, Copied, CopyBudget, ResponseCopy, StoredResponse};
use edge_core::table::{Claim, Found, Record, Table};
use edge_core::{SlotStore, StoreError};

/// Read-modify-write attempts on the circuit before the store counts as failing.
pub const ATTEMPTS: u32 = 16;
/// A response that varies on more request headers than this is not kept.
pub const MAX_VARY_NAMES: usize = 16;
const NS_PER_SEC: u64 = 1_000_000_000;
const KIND_RESPONSE: u8 = 1;
const KIND_VARY: u8 = 2;

/// The counters, `cached_fallback.<name>` (Envoy: `wasmcustom.cached_fallback.<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Stored,
    StoreSkipped,
    ServedStale,
    ServedStatic,
    PassedThrough,
    CircuitOpened,
    CircuitShortCircuited,
}

impl metrics::Counter for Counter {
    const ALL: &'static [Counter] = &[
        Counter::Stored,
        Counter::StoreSkipped,
        Counter::ServedStale,
        Counter::ServedStatic,
        Counter::PassedThrough,
        Counter::CircuitOpened,
        Counter::CircuitShortCircuited,
    ];

    fn name(self) -> &'static str {
        match self {
            Counter::Stored => "stored",
            Counter::StoreSkipped => "store_skipped",
            Counter::ServedStale => "served_stale",
            Counter::ServedStatic => "served_static",
            Counter::PassedThrough => "passed_through",
            Counter::CircuitOpened => "circuit_opened",
            Counter::CircuitShortCircuited => "circuit_short_circuited",
        }
    }
}

impl Served {
    /// The counter of what was served (a 503 for want of anything counts nothing).
    pub fn counter(self) -> Option<Counter> {
        match self {
            Served::Stale => Some(Counter::ServedStale),
            Served::Static => Some(Counter::ServedStatic),
            Served::Unavailable => None,
        }
    }
}

/// A covered request as the glue captured it, and its base key.
#[derive(Clone, Copy)]
pub struct Covered<'a> {
    pub req: &'a RequestParts,
    pub base: u64,
}

/// The upstream's answer as the response-headers phase sees it: its status, Envoy's
/// `response.code_details`, and its headers (read only when the answer may be kept: a copy
/// to keep takes them over, so they are not copied again).
pub struct Answer<'a> {
    pub status: u16,
    pub details: Option<&'a str>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why an answer was replaced: the `detail` of `Cache-Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A status listed in `failOn.statuses`, from the upstream.
    Status,
    /// The upstream reset the stream before answering.
    Reset,
    /// Envoy could not connect (refused, connect timeout, no healthy host, overflow).
    ConnectionFailure,
    /// The route's timeout fired.
    Timeout,
    /// The circuit is open: the request was answered without the upstream.
    CircuitOpen,
}

impl Reason {
    pub fn detail(self) -> &'static str {
        match self {
            Reason::Status => "upstream-status",
            Reason::Reset => "upstream-reset",
            Reason::ConnectionFailure => "connection-failure",
            Reason::Timeout => "timeout",
            Reason::CircuitOpen => "circuit-open",
        }
    }
}

/// What an answer says about the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Failure(Reason),
    /// The upstream answered, and not with a failure.
    Success,
    /// Nothing about the upstream: another filter's local reply, or a failure kind that
    /// `failOn` leaves alone.
    Neutral,
}

/// Classifies an answer by its status and Envoy's `response.code_details`: `via_upstream` is
/// the upstream's own status; `upstream_reset_before_response_started{…}` a reset or (with
/// `connection_failure`, `connection_timeout`, `overflow`) a failure to connect;
/// `no_healthy_upstream` too; `…timeout` (`response_timeout`, `upstream_per_try_timeout`) the
/// route timeout. Other local replies are [`Verdict::Neutral`], including those with empty
/// details (Envoy reports `""` for a filter's reply that gave none, as proxy-wasm plugins'
/// replies usually do: another plugin's 429 is not the upstream's). Without the property (a
/// host that does not report it) the status decides.
pub fn classify(fail_on: &FailOn, status: u16, details: Option<&str>) -> Verdict {
    let d = details.unwrap_or("via_upstream");
    if edge_core::route::from_upstream(details) {
        return if fail_on.statuses.contains(&status) {
            Verdict::Failure(Reason::Status)
        } else {
            Verdict::Success
        };
    }
    let gate = |on: bool, r: Reason| {
        if on {
            Verdict::Failure(r)
        } else {
            Verdict::Neutral
        }
    };
    if d.starts_with("upstream_reset_before_response_started") || d == "no_healthy_upstream" {
        let connect = d == "no_healthy_upstream"
            || ["connection_failure", "connection_timeout", "overflow"]
                .iter()
                .any(|w| contains(d, w));
        let reason = if connect {
            Reason::ConnectionFailure
        } else {
            Reason::Reset
        };
        return gate(fail_on.upstream_reset, reason);
    }
    if contains(d, "timeout") {
        return gate(fail_on.timeout, Reason::Timeout);
    }
    Verdict::Neutral
}

/// Substring search over bytes (`str::contains` brings a two-way searcher into the module).
fn contains(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Why a response with a storable status was not kept (the `store_skipped` counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    /// `must-revalidate`, `proxy-revalidate` or `no-cache`: it could never be served stale.
    NoStale,
    TooManyVary,
    TooLarge,
    /// No room could be made, or the store failed.
    NotWritten,
}

impl Skip {
    pub fn reason(self) -> &'static str {
        match self {
            Skip::NoStore => "no-store",
            Skip::Private => "private",
            Skip::Authorization => "authorization",
            Skip::SetCookie => "set-cookie",
            Skip::VaryStar => "vary-star",
            Skip::NoStale => "must-revalidate",
            Skip::TooManyVary => "too-many-vary",
            Skip::TooLarge => "too-large",
            Skip::NotWritten => "not-written",
        }
    }
}

fn values<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Comma-separated list items of every value of `name`, trimmed and lower-cased, one at a
/// time (a caller that stops early never converts the rest).
fn list_items<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = String> + 'a {
    values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|item| String::from_utf8_lossy(item.trim_ascii()).to_ascii_lowercase())
        .filter(|s| !s.is_empty())
}

/// What a storable response needs to be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storable {
    /// The `Vary` header names, sorted, lower-case.
    pub vary: Vec<String>,
    pub stale_if_error: Option<u64>,
}

/// RFC 9111's rules for a shared cache, plus this plugin's own: may this response to this
/// request be kept? (The status was checked by the caller.)
pub fn storability(
    req: &RequestParts,
    response: &[(String, Vec<u8>)],
    max_body: u64,
) -> Result<Storable, Skip> {
    let cc = CacheControl::parse(values(response, "cache-control"));
    if cc.no_store || CacheControl::parse(req.headers.values("cache-control")).no_store {
        return Err(Skip::NoStore);
    }
    if cc.private {
        return Err(Skip::Private);
    }
    if req.header("authorization").is_some() && !cc.public && cc.s_maxage.is_none() {
        return Err(Skip::Authorization);
    }
    if values(response, "set-cookie").next().is_some() {
        return Err(Skip::SetCookie);
    }
    // Sorted and without duplicates, so one resource's variants always hash the same way
    // (kept sorted by insertion: a general sort costs the module 6 KB).
    let mut vary: Vec<String> = Vec::new();
    for name in list_items(response, "vary") {
        if name == "*" {
            return Err(Skip::VaryStar);
        }
        if let Err(at) = vary.binary_search(&name) {
            vary.insert(at, name);
        }
        // Checked as names come, so a huge Vary costs 17 names, not a quadratic sort.
        if vary.len() > MAX_VARY_NAMES {
            return Err(Skip::TooManyVary);
        }
    }
    if cc.must_revalidate || cc.no_cache {
        return Err(Skip::NoStale);
    }
    let declared = values(response, "content-length")
        .next()
        .and_then(edge_core::text::parse_u64);
    if declared.is_some_and(|n| n > max_body) {
        return Err(Skip::TooLarge);
    }
    Ok(Storable {
        vary,
        stale_if_error: cc.stale_if_error,
    })
}

/// What was served instead of the upstream's answer (for the counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// A stored response.
    Stale,
    /// `staticFallback`.
    Static,
    /// The circuit is open and there was nothing to serve: a 503.
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestDecision {
    pub action: RequestAction,
    /// Store failures, for the warning log; the decision was made as if nothing were stored.
    pub errors: Vec<StoreError>,
}

/// What the request phase does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestAction {
    /// Forward it; `probe` is its token when it is the circuit's half-open probe.
    Forward { probe: Option<u64> },
    /// Answer it now (the circuit is open).
    Answer { reply: Reply, served: Served },
}

/// A response being copied as it streams, to be kept when it is complete.
#[derive(Debug, PartialEq, Eq)]
pub struct Pending {
    /// The record's key: the base key, or the variant key when it varies.
    pub key: u64,
    pub base: u64,
    pub vary: Vec<String>,
    pub stale_if_error: Option<u64>,
    pub copy: ResponseCopy,
    /// When its headers arrived: its time of receipt (RFC 9111's `response_time`), from which
    /// the kept copy's `Age` counts, however long its body then takes.
    pub received_ns: u64,
}

/// What the response-headers phase does.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseAction {
    /// Replace the failed answer.
    Replace { reply: Reply, served: Served },
    /// A failure with nothing to serve: the answer goes through untouched.
    PassThrough,
    /// Copy the body as it streams, then keep it.
    Collect(Box<Pending>),
    /// A storable status that may not be kept.
    Skipped(Skip),
    /// Nothing to do (a status that is neither kept nor a failure, another filter's reply).
    Ignore,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ResponseDecision {
    pub action: ResponseAction,
    /// This answer opened the circuit (the `circuit_opened` counter).
    pub circuit_opened: bool,
    /// The answer told the circuit something (a probe's outcome is then settled).
    pub settled: bool,
    /// Store failures, for the warning log; the decision was made as if nothing were stored.
    pub errors: Vec<StoreError>,
}

/// A lookup's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit {
        response: StoredResponse,
        age_secs: u64,
    },
    /// There is an entry, older than `maxStale` or its `stale-if-error`.
    TooOld,
    Miss,
}

/// The compiled policy: a config plus where its state lives.
pub struct Fallback {
    pub config: Config,
    table: Table,
    /// This worker's response copies together.
    budget: CopyBudget,
    circuit_key: String,
    seed: u64,
}

fn meta_response(stale_if_error: Option<u64>) -> Vec<u8> {
    let mut m = vec![KIND_RESPONSE];
    m.extend_from_slice(&stale_if_error.unwrap_or(u64::MAX).to_le_bytes());
    m
}

fn meta_vary(names: &[String]) -> Vec<u8> {
    let mut m = vec![KIND_VARY];
    m.extend_from_slice(names.join(",").as_bytes());
    m
}

enum Meta {
    Response { stale_if_error: Option<u64> },
    Vary(Vec<String>),
}

fn read_meta(m: &[u8]) -> Option<Meta> {
    match *m.first()? {
        KIND_RESPONSE => {
            let s = u64::from_le_bytes(m.get(1..9)?.try_into().ok()?);
            Some(Meta::Response {
                stale_if_error: (s != u64::MAX).then_some(s),
            })
        }
        KIND_VARY => {
            let names = String::from_utf8_lossy(m.get(1..)?);
            Some(Meta::Vary(names.split(',').map(str::to_string).collect()))
        }
        _ => None,
    }
}

/// `Cache-Status` (RFC 9211) for an answer this plugin made.
pub fn cache_status(hit: bool, fwd: Option<(&str, u16)>, reason: Reason) -> String {
    let mut s = String::from("cached-fallback");
    if hit {
        s.push_str("; hit");
    }
    if let Some((why, status)) = fwd {
        s.push_str("; fwd=");
        s.push_str(why);
        s.push_str("; fwd-status=");
        s.push_str(&status.to_string());
    }
    s.push_str("; detail=");
    s.push_str(reason.detail());
    s
}

impl Fallback {
    /// `namespace` prefixes every store key (`cached_fallback/<root_id>/`); `seed` keys the
    /// hash of request keys (see `edge_core::key::shared_seed`).
    pub fn new(config: Config, namespace: &str, seed: u64) -> Fallback {
        Fallback {
            table: Table::new(namespace, config.max_entries, config.max_total_bytes),
            budget: CopyBudget::new(config.max_buffered_bytes),
            circuit_key: format!("{namespace}circuit"),
            config,
            seed,
        }
    }

    /// Whether `routes` and `methods` cover the request.
    pub fn covers(&self, req: &impl RequestView) -> bool {
        edge_core::route::covers(&self.config.methods, &self.config.routes, req)
    }

    /// The key of method, host, path (with the query if `key.query`) and the listed headers,
    /// all as the client's bytes.
    pub fn base_key(&self, req: &RequestParts) -> u64 {
        // Read in place: this runs on every covered request. As `RequestView` reads them,
        // the captured pseudo-headers win over the text fields.
        let h = &req.headers;
        let host = h
            .get(":authority")
            .or_else(|| h.get("host"))
            .unwrap_or_default();
        let host = if host.iter().any(u8::is_ascii_uppercase) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let method = h.get(":method").unwrap_or(req.method.as_bytes());
        let raw_path = h.get(":path").unwrap_or(req.path.as_bytes());
        let path = if self.config.key.query {
            raw_path
        } else {
            edge_core::request::without_query(raw_path)
        };
        let h = KeyHasher::new(self.seed, "cached_fallback")
            .bytes(method)
            .bytes(&host)
            .bytes(path);
        self.config
            .key
            .headers
            .iter()
            .fold(h, |h, name| h.header_values(name, req.headers.values(name)))
            .finish()
    }

    /// The key of one variant of a response that varies on `names`.
    pub fn variant_key(&self, base: u64, names: &[String], req: &RequestParts) -> u64 {
        names
            .iter()
            .fold(
                KeyHasher::new(self.seed, "cached_fallback/variant").number(base),
                |h, name| h.header_values(name, req.headers.values(name)),
            )
            .finish()
    }

    /// How old an entry may be, given its `stale-if-error`.
    pub fn stale_limit_ns(&self, stale_if_error: Option<u64>) -> u64 {
        let own = stale_if_error.map_or(u64::MAX, |s| s.saturating_mul(NS_PER_SEC));
        self.config.max_stale_ns.min(own)
    }

    /// Whether an entry stored at `at_ns` may still be served at `now`.
    pub fn usable(&self, at_ns: u64, stale_if_error: Option<u64>, now: u64) -> bool {
        now.saturating_sub(at_ns) <= self.stale_limit_ns(stale_if_error)
    }

    /// The stored response for the request, if one may be served at `now`.
    pub fn lookup(
        &self,
        req: &RequestParts,
        base: u64,
        now: u64,
        store: &impl SlotStore,
    ) -> Result<Lookup, StoreError> {
        let Some(found) = self.table.find(store, base)? else {
            return Ok(Lookup::Miss);
        };
        let (found, stale_if_error) = match read_meta(&found.record.meta) {
            Some(Meta::Response { stale_if_error }) => (found, stale_if_error),
            Some(Meta::Vary(names)) => {
                let key = self.variant_key(base, &names, req);
                let Some(v) = self.table.find(store, key)? else {
                    return Ok(Lookup::Miss);
                };
                match read_meta(&v.record.meta) {
                    Some(Meta::Response { stale_if_error }) => (v, stale_if_error),
                    _ => return Ok(Lookup::Miss),
                }
            }
            None => return Ok(Lookup::Miss),
        };
        if !self.usable(found.record.at_ns, stale_if_error, now) {
            return Ok(Lookup::TooOld);
        }
        let Some(response) = self
            .table
            .body(store, &found)?
            .and_then(|b| StoredResponse::decode(&b))
        else {
            // Claimed but not written yet, or replaced meanwhile.
            return Ok(Lookup::Miss);
        };
        let upstream_age = response
            .header("age")
            .and_then(edge_core::text::parse_u64)
            .unwrap_or(0);
        let age_secs = now
            .saturating_sub(found.record.at_ns)
            .checked_div(NS_PER_SEC)
            .unwrap_or(0)
            .saturating_add(upstream_age);
        Ok(Lookup::Hit { response, age_secs })
    }

    /// The answer that replaces a failure (`why`: its reason and the forwarded status, `None`
    /// when the circuit kept the request from the upstream), or `None` for "pass it through".
    fn fallback(
        &self,
        at: Covered<'_>,
        (reason, fwd): (Reason, Option<u16>),
        now: u64,
        store: &impl SlotStore,
        errors: &mut Vec<StoreError>,
    ) -> Option<(Reply, Served)> {
        let found = self
            .lookup(at.req, at.base, now, store)
            .unwrap_or_else(|e| {
                errors.push(e);
                Lookup::Miss
            });
        let too_old = match found {
            Lookup::Hit { response, age_secs } => {
                let status_line = cache_status(true, fwd.map(|s| ("stale", s)), reason);
                return Some((stale_reply(response, age_secs, &status_line), Served::Stale));
            }
            Lookup::TooOld => true,
            Lookup::Miss => false,
        };
        let fwd = fwd.map(|s| (if too_old { "stale" } else { "uri-miss" }, s));
        let status_line = cache_status(false, fwd, reason);
        let s = self.config.static_fallback.as_ref()?;
        let mut headers: Vec<(String, Vec<u8>)> = s
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        headers.push(("cache-status".into(), status_line.into_bytes()));
        Some((
            Reply {
                status: u32::from(s.status),
                headers,
                body: s.body.clone(),
            },
            Served::Static,
        ))
    }

    /// The request phase: with the circuit open, the answer; else forward (maybe as probe).
    pub fn on_request(&self, at: Covered<'_>, now: u64, store: &impl SlotStore) -> RequestDecision {
        let mut errors = Vec::new();
        let action = self.admit(at, now, store, &mut errors);
        RequestDecision { action, errors }
    }

    fn admit(
        &self,
        at: Covered<'_>,
        now: u64,
        store: &impl SlotStore,
        errors: &mut Vec<StoreError>,
    ) -> RequestAction {
        let Some(b) = self.config.circuit_breaker else {
            return RequestAction::Forward { probe: None };
        };
        // One read when nothing changes (a closed circuit); a write only when admitting
        // changes the state, retried on a lost race with the decision made again.
        let mut decided = Admit::Pass;
        let admitted = update_or_create(
            store,
            &self.circuit_key,
            &State::default().encode(),
            ATTEMPTS,
            |v| {
                let (a, next) = circuit::admit(&b, State::decode(v), now);
                decided = a;
                next.map(|s| s.encode())
            },
        )
        .map(|_| decided);
        let retry_after_ns = match admitted {
            Ok(Admit::Pass) => return RequestAction::Forward { probe: None },
            Ok(Admit::Probe(token)) => return RequestAction::Forward { probe: Some(token) },
            Ok(Admit::Reject { retry_after_ns }) => retry_after_ns,
            Err(e) => {
                // Without the circuit's state, the upstream decides.
                errors.push(e);
                return RequestAction::Forward { probe: None };
            }
        };
        if let Some((reply, served)) =
            self.fallback(at, (Reason::CircuitOpen, None), now, store, errors)
        {
            return RequestAction::Answer { reply, served };
        }
        RequestAction::Answer {
            reply: Reply::problem(
                503,
                vec![
                    retry_after(retry_after_secs(retry_after_ns)),
                    (
                        "cache-status".into(),
                        cache_status(false, None, Reason::CircuitOpen).into_bytes(),
                    ),
                ],
                problem_json(
                    "about:blank",
                    "Service Unavailable",
                    503,
                    "the upstream is failing and no earlier response is stored; retry later",
                    &[],
                ),
            ),
            served: Served::Unavailable,
        }
    }

    /// Whether the response phase needs the response headers (only to keep the response).
    pub fn wants_headers(&self, status: u16, details: Option<&str>) -> bool {
        classify(&self.config.fail_on, status, details) == Verdict::Success
            && self.config.stores_status(status)
    }

    /// The response-headers phase of the covered request `at` (the circuit's probe when
    /// `probe` is its token): report to the circuit, then replace a failure, start copying a
    /// response to keep, or leave it.
    pub fn on_response(
        &self,
        at: Covered<'_>,
        probe: Option<u64>,
        answer: Answer<'_>,
        now: u64,
        store: &impl SlotStore,
    ) -> ResponseDecision {
        let Covered { req, base } = at;
        let Answer {
            status,
            details,
            headers,
        } = answer;
        let verdict = classify(&self.config.fail_on, status, details);
        let mut errors = Vec::new();
        let mut circuit_opened = false;
        let settled = verdict != Verdict::Neutral;
        if let Some(b) = self.config.circuit_breaker {
            let failure = matches!(verdict, Verdict::Failure(_));
            // Only failures and the probe's outcome can change the state.
            if settled && (failure || probe.is_some()) {
                let initial = State::default().encode();
                let r = update_or_create(store, &self.circuit_key, &initial, ATTEMPTS, |v| {
                    let (next, opened) = circuit::report(&b, State::decode(v), now, failure, probe);
                    circuit_opened = opened;
                    next.map(|s| s.encode())
                });
                if let Err(e) = r {
                    errors.push(e);
                }
            }
        }
        let action = match verdict {
            Verdict::Failure(reason) => {
                match self.fallback(at, (reason, Some(status)), now, store, &mut errors) {
                    Some((reply, served)) => ResponseAction::Replace { reply, served },
                    None => ResponseAction::PassThrough,
                }
            }
            Verdict::Success if self.config.stores_status(status) => {
                match storability(req, &headers, self.config.max_body_bytes) {
                    Ok(s) => {
                        let key = if s.vary.is_empty() {
                            base
                        } else {
                            self.variant_key(base, &s.vary, req)
                        };
                        ResponseAction::Collect(Box::new(Pending {
                            key,
                            base,
                            vary: s.vary,
                            stale_if_error: s.stale_if_error,
                            copy: ResponseCopy::new(
                                status,
                                headers,
                                self.config.max_body_bytes,
                                self.budget.clone(),
                            ),
                            received_ns: now,
                        }))
                    }
                    Err(skip) => ResponseAction::Skipped(skip),
                }
            }
            Verdict::Success | Verdict::Neutral => ResponseAction::Ignore,
        };
        ResponseDecision {
            action,
            circuit_opened,
            settled,
            errors,
        }
    }

    /// The probe's stream ended without reporting: let the next request probe.
    pub fn abandon_probe(
        &self,
        probe: u64,
        now: u64,
        store: &impl SlotStore,
    ) -> Result<(), StoreError> {
        let Some(b) = self.config.circuit_breaker else {
            return Ok(());
        };
        update(store, &self.circuit_key, ATTEMPTS, |v| {
            circuit::abandon(&b, State::decode(v), now, probe).map(|s| s.encode())
        })?;
        Ok(())
    }

    /// Keeps the copied response at `now` when it arrived whole (one cut short or given up
    /// is not a good answer). False when it is not kept: not whole, no room could be made, or
    /// a concurrent writer won the slot.
    /// Keeps a whole copy as of its receipt (`Pending::received_ns`), not as of the end of
    /// its body.
    pub fn store(&self, pending: Pending, store: &impl SlotStore) -> Result<bool, StoreError> {
        let now = pending.received_ns;
        let Copied::Whole(mut response) = pending.copy.finish() else {
            return Ok(false);
        };
        if !pending.vary.is_empty() && !self.mark_vary(pending.base, &pending.vary, now, store)? {
            return Ok(false);
        }
        response.stored_at_ns = now;
        let record = Record::new(
            pending.key,
            now,
            false,
            meta_response(pending.stale_if_error),
        );
        let Some(found) = self.slot_for(&record, store, true)? else {
            return Ok(false);
        };
        Ok(self
            .table
            .put_body(store, &found, record, &response.encode())?
            .is_some())
    }

    /// The record for `record.key`: the existing one, or a newly claimed slot. A caller
    /// that only overwrites it takes it as the request's lookup read it (`to_write`): the
    /// write proves it current; one that decides on its content reads it afresh.
    fn slot_for(
        &self,
        record: &Record,
        store: &impl SlotStore,
        to_write: bool,
    ) -> Result<Option<Found>, StoreError> {
        let claim = if to_write {
            self.table.claim_to_write(store, record.clone(), |_| true)?
        } else {
            self.table.claim(store, record.clone(), |_| true)?
        };
        Ok(match claim {
            Claim::Won(f) | Claim::Exists(f) => Some(f),
            Claim::Full => None,
        })
    }

    /// Makes the base record name `names` as the response's `Vary` headers. The base record is
    /// rewritten when it says something else, and refreshed (so eviction, oldest first, does
    /// not take it before its variants) once it is half `maxStale` old.
    fn mark_vary(
        &self,
        base: u64,
        names: &[String],
        now: u64,
        store: &impl SlotStore,
    ) -> Result<bool, StoreError> {
        let meta = meta_vary(names);
        let record = Record::new(base, now, false, meta.clone());
        let Some(found) = self.slot_for(&record, store, false)? else {
            return Ok(false);
        };
        let current = found.record.meta == meta
            && now.saturating_sub(found.record.at_ns) <= self.config.max_stale_ns / 2;
        if current {
            return Ok(true);
        }
        Ok(self.table.put_body(store, &found, record, &[])?.is_some())
    }

    /// Body bytes held now (for tests and logs).
    pub fn used_bytes(&self, store: &impl SlotStore) -> Result<u64, StoreError> {
        self.table.used_bytes(store)
    }
}

/// The stored response with `Age` and `Cache-Status` (appended to any the upstream sent).
fn stale_reply(response: StoredResponse, age_secs: u64, status_line: &str) -> Reply {
    let mut cache_status = Vec::new();
    for (_, v) in response
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cache-status"))
    {
        cache_status.extend_from_slice(v);
        cache_status.extend_from_slice(b", ");
    }
    cache_status.extend_from_slice(status_line.as_bytes());
    response.into_reply(vec![
        ("age", age_secs.to_string().into_bytes()),
        ("cache-status", cache_status),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::store::MemoryStore;
    use edge_core::stored::Dropped;

    const S: u64 = NS_PER_SEC;
    const T0: u64 = 1_000 * S;

    fn fallback(json: &str) -> Fallback {
        Fallback::new(Config::parse(json.as_bytes()).unwrap(), "cf/", 42)
    }

    fn get(path: &str) -> RequestParts {
        RequestParts::new("GET", path).header(":authority", "example.com")
    }

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Runs the response phase for a 200 with `headers` and `body`, and stores it.
    fn keep(
        f: &Fallback,
        req: &RequestParts,
        headers: &[(&str, &str)],
        body: &[u8],
        now: u64,
        s: &MemoryStore,
    ) -> bool {
        let base = f.base_key(req);
        let d = f.on_response(
            Covered { req, base },
            None,
            Answer {
                status: 200,
                details: Some("via_upstream"),
                headers: hdrs(headers),
            },
            now,
            s,
        );
        let ResponseAction::Collect(mut p) = d.action else {
            return false;
        };
        assert_eq!(p.copy.body(body.len(), true, || body.to_vec()), None);
        assert!(f.store(*p, s).unwrap());
        true
    }

    fn fail(
        f: &Fallback,
        req: &RequestParts,
        status: u16,
        details: &str,
        now: u64,
        s: &MemoryStore,
    ) -> ResponseDecision {
        f.on_response(
            Covered {
                req,
                base: f.base_key(req),
            },
            None,
            Answer {
                status,
                details: Some(details),
                headers: Vec::new(),
            },
            now,
            s,
        )
    }

    /// The request phase of `req` (its store failures added to `errors`).
    fn on_request(
        f: &Fallback,
        req: &RequestParts,
        now: u64,
        s: &MemoryStore,
        errors: &mut Vec<StoreError>,
    ) -> RequestAction {
        let d = f.on_request(
            Covered {
                req,
                base: f.base_key(req),
            },
            now,
            s,
        );
        errors.extend(d.errors);
        d.action
    }

    #[test]
    fn counters_keep_their_names() {
        assert_eq!(
            metrics::names::<Counter>(&["cached_fallback"]),
            [
                "cached_fallback.stored",
                "cached_fallback.store_skipped",
                "cached_fallback.served_stale",
                "cached_fallback.served_static",
                "cached_fallback.passed_through",
                "cached_fallback.circuit_opened",
                "cached_fallback.circuit_short_circuited",
            ]
        );
    }

    fn replaced(d: &ResponseDecision) -> &Reply {
        match &d.action {
            ResponseAction::Replace { reply, .. } => reply,
            other => panic!("expected a replacement, got {other:?}"),
        }
    }

    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| core::str::from_utf8(v).ok())
    }

    #[test]
    fn storability_follows_rfc_9111_for_shared_caches() {
        let req = get("/a");
        let auth = get("/a").header("authorization", "Bearer x");
        let ok = |req: &RequestParts, h: &[(&str, &str)]| storability(req, &hdrs(h), 100);
        assert!(ok(&req, &[("content-type", "text/plain")]).is_ok());
        assert_eq!(
            ok(&req, &[("cache-control", "max-age=5, No-Store")]),
            Err(Skip::NoStore)
        );
        assert_eq!(
            ok(&req, &[("cache-control", "private")]),
            Err(Skip::Private)
        );
        assert_eq!(ok(&auth, &[]), Err(Skip::Authorization));
        assert!(ok(&auth, &[("cache-control", "public")]).is_ok());
        assert!(ok(&auth, &[("cache-control", "s-maxage=60")]).is_ok());
        assert_eq!(ok(&req, &[("set-cookie", "sid=1")]), Err(Skip::SetCookie));
        assert_eq!(ok(&req, &[("vary", "accept, *")]), Err(Skip::VaryStar));
        let names = |n: usize| {
            (0..n)
                .map(|i| format!("x-h{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(
            ok(&req, &[("vary", &names(16))]).map(|s| s.vary.len()),
            Ok(16)
        );
        assert_eq!(ok(&req, &[("vary", &names(17))]), Err(Skip::TooManyVary));
        // A repeated name is one name.
        let repeated = format!("{}, X-H0", names(16));
        assert_eq!(
            ok(&req, &[("vary", &repeated)]).map(|s| s.vary.len()),
            Ok(16)
        );
        let huge = names(20_000);
        assert_eq!(ok(&req, &[("vary", &huge)]), Err(Skip::TooManyVary));
        assert_eq!(
            ok(&req, &[("cache-control", "must-revalidate")]),
            Err(Skip::NoStale)
        );
        assert_eq!(
            ok(&req, &[("cache-control", "no-cache")]),
            Err(Skip::NoStale)
        );
        assert_eq!(ok(&req, &[("content-length", "101")]), Err(Skip::TooLarge));
        assert!(ok(&req, &[("content-length", "100")]).is_ok());
        let no_store_request = get("/a").header("cache-control", "no-store");
        assert_eq!(ok(&no_store_request, &[]), Err(Skip::NoStore));
        let s = ok(
            &req,
            &[
                ("vary", "Accept-Language, accept"),
                ("vary", "accept"),
                ("cache-control", "stale-if-error=30"),
            ],
        )
        .unwrap();
        assert_eq!(s.vary, ["accept", "accept-language"]);
        assert_eq!(s.stale_if_error, Some(30));
    }

    #[test]
    fn failures_are_told_apart_by_envoys_code_details() {
        let f = Config::parse(b"{}").unwrap().fail_on;
        let v = |status, d: &str| classify(&f, status, Some(d));
        assert_eq!(v(503, "via_upstream"), Verdict::Failure(Reason::Status));
        assert_eq!(v(501, "via_upstream"), Verdict::Success);
        assert_eq!(v(200, "via_upstream"), Verdict::Success);
        assert_eq!(classify(&f, 502, None), Verdict::Failure(Reason::Status));
        // Another filter's local reply without details, e.g. the rate limiter's 429.
        let with_429 = Config::parse(br#"{"failOn":{"statuses":[429]}}"#)
            .unwrap()
            .fail_on;
        assert_eq!(classify(&with_429, 429, Some("")), Verdict::Neutral);
        assert_eq!(
            classify(&with_429, 429, Some("via_upstream")),
            Verdict::Failure(Reason::Status)
        );
        for (status, details, reason) in [
            (
                503,
                "upstream_reset_before_response_started{connection_termination}",
                Reason::Reset,
            ),
            (
                503,
                "upstream_reset_before_response_started{remote_reset}",
                Reason::Reset,
            ),
            (
                503,
                "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
                Reason::ConnectionFailure,
            ),
            (503, "no_healthy_upstream", Reason::ConnectionFailure),
            (504, "response_timeout", Reason::Timeout),
            (504, "upstream_per_try_timeout", Reason::Timeout),
        ] {
            assert_eq!(v(status, details), Verdict::Failure(reason), "{details}");
            // Each kind is counted only while its `failOn` switch is on.
            let switch = if reason == Reason::Timeout {
                "timeout"
            } else {
                "upstreamReset"
            };
            let off = Config::parse(format!(r#"{{"failOn":{{"{switch}":false}}}}"#).as_bytes())
                .unwrap()
                .fail_on;
            assert_eq!(
                classify(&off, status, Some(details)),
                Verdict::Neutral,
                "{switch} off: {details}"
            );
        }
        // Another filter's local reply says nothing about the upstream.
        assert_eq!(v(503, "wasm_fail_stream"), Verdict::Neutral);
        assert_eq!(v(429, "rate_limited"), Verdict::Neutral);
    }

    #[test]
    fn keys_separate_method_host_path_query_and_listed_headers() {
        let f = fallback(r#"{"key":{"headers":["accept-language"]}}"#);
        let k = |r: &RequestParts| f.base_key(r);
        // The client's path bytes, as captured: two paths one lossy text would merge.
        let raw = |p: &[u8]| {
            let mut r = get("/a");
            r.headers.push(":path", p);
            r
        };
        assert_ne!(k(&raw(b"/a\xff")), k(&raw(b"/a\xfe")));
        let a = get("/p?x=1").header("accept-language", "nl");
        assert_eq!(
            k(&a),
            k(&get("/p?x=1")
                .header("accept-language", "nl")
                .header("x-other", "1"))
        );
        assert_ne!(k(&a), k(&get("/p?x=2").header("accept-language", "nl")));
        assert_ne!(k(&a), k(&get("/p?x=1").header("accept-language", "en")));
        assert_ne!(k(&a), k(&get("/p?x=1")));
        let head = RequestParts::new("HEAD", "/p?x=1")
            .header(":authority", "example.com")
            .header("accept-language", "nl");
        assert_ne!(k(&a), k(&head));
        let other_host = RequestParts::new("GET", "/p?x=1")
            .header(":authority", "other.example")
            .header("accept-language", "nl");
        assert_ne!(k(&a), k(&other_host));
        let upper_host = RequestParts::new("GET", "/p?x=1")
            .header(":authority", "EXAMPLE.com")
            .header("accept-language", "nl");
        assert_eq!(k(&a), k(&upper_host), "host names are case-insensitive");
        // Without the query in the key, ?x=1 and ?x=2 are one entry.
        let nq = fallback(r#"{"key":{"query":false}}"#);
        assert_eq!(nq.base_key(&get("/p?x=1")), nq.base_key(&get("/p?x=2")));
        // Another seed, other keys.
        let other = Fallback::new(Config::parse(b"{}").unwrap(), "cf/", 43);
        assert_ne!(
            other.base_key(&get("/p")),
            fallback("{}").base_key(&get("/p"))
        );
        // Variants differ by the Vary headers' values only.
        let names = vec!["accept".to_string()];
        let base = k(&a);
        let v1 = f.variant_key(base, &names, &get("/p").header("accept", "text/html"));
        let v2 = f.variant_key(
            base,
            &names,
            &get("/p").header("accept", "application/json"),
        );
        assert_ne!(v1, v2);
        assert_eq!(
            v1,
            f.variant_key(base, &names, &get("/q").header("accept", "text/html"))
        );
    }

    #[test]
    fn staleness_is_bounded_by_max_stale_or_a_smaller_stale_if_error() {
        let f = fallback(r#"{"maxStale":"60s"}"#);
        assert_eq!(f.stale_limit_ns(None), 60 * S);
        assert_eq!(f.stale_limit_ns(Some(10)), 10 * S);
        assert_eq!(f.stale_limit_ns(Some(600)), 60 * S, "the smaller wins");
        assert_eq!(f.stale_limit_ns(Some(u64::MAX)), 60 * S);
        assert!(f.usable(T0, None, T0 + 60 * S));
        assert!(!f.usable(T0, None, T0 + 60 * S + 1));
        assert!(f.usable(T0, Some(0), T0));
        assert!(!f.usable(T0, Some(0), T0 + 1));
        assert!(
            f.usable(T0, None, T0 - S),
            "a clock that went back counts as age 0"
        );
    }

    /// RFC 9111 counts a copy's age from its receipt: however long its body takes, the copy is
    /// kept as of its headers (the store takes no clock of its own).
    #[test]
    fn a_copy_is_kept_as_of_its_headers_not_the_end_of_its_body() {
        let f = fallback("{}");
        let s = MemoryStore::new();
        let req = get("/slow");
        let d = f.on_response(
            Covered {
                req: &req,
                base: f.base_key(&req),
            },
            None,
            Answer {
                status: 200,
                details: Some("via_upstream"),
                headers: hdrs(&[("content-type", "text/plain")]),
            },
            T0,
            &s,
        );
        let ResponseAction::Collect(mut p) = d.action else {
            panic!("a 200 is collected: {:?}", d.action);
        };
        assert_eq!(p.copy.body(4, true, || b"slow".to_vec()), None);
        assert!(f.store(*p, &s).unwrap());
        let later = fail(&f, &req, 503, "via_upstream", T0 + 10 * S, &s);
        assert_eq!(header(replaced(&later), "age"), Some("10"));
    }

    #[test]
    fn a_kept_response_replaces_a_later_failure_with_age_and_cache_status() {
        let f = fallback("{}");
        let s = MemoryStore::new();
        let req = get("/a");
        let a = keep(
            &f,
            &req,
            &[
                ("content-type", "text/plain"),
                ("connection", "close"),
                ("age", "3"),
            ],
            b"hello",
            T0,
            &s,
        );
        assert!(a, "a 200 is collected");
        let d = fail(&f, &req, 503, "via_upstream", T0 + 10 * S, &s);
        let r = replaced(&d);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(header(r, "content-type"), Some("text/plain"));
        assert_eq!(
            header(r, "connection"),
            None,
            "hop-by-hop headers are not kept"
        );
        assert_eq!(
            header(r, "age"),
            Some("13"),
            "the upstream's age plus the time kept"
        );
        assert_eq!(
            header(r, "cache-status"),
            Some("cached-fallback; hit; fwd=stale; fwd-status=503; detail=upstream-status")
        );
        let reset = fail(
            &f,
            &req,
            503,
            "upstream_reset_before_response_started{remote_reset}",
            T0,
            &s,
        );
        assert!(header(replaced(&reset), "cache-status")
            .unwrap()
            .ends_with("detail=upstream-reset"));
        let timeout = fail(&f, &req, 504, "response_timeout", T0, &s);
        assert!(header(replaced(&timeout), "cache-status")
            .unwrap()
            .ends_with("fwd-status=504; detail=timeout"));
    }

    #[test]
    fn too_old_serves_static_and_nothing_passes_through() {
        let f = fallback(
            r#"{"maxStale":"60s","staticFallback":{"headers":{"content-type":"application/json"},"body":"{}"}}"#,
        );
        let s = MemoryStore::new();
        let req = get("/a");
        keep(&f, &req, &[], b"old", T0, &s);
        let d = fail(&f, &req, 502, "via_upstream", T0 + 61 * S, &s);
        assert!(matches!(
            d.action,
            ResponseAction::Replace {
                served: Served::Static,
                ..
            }
        ));
        let r = replaced(&d);
        assert_eq!((r.status, r.body.as_slice()), (503, &b"{}"[..]));
        assert_eq!(
            header(r, "cache-status"),
            Some("cached-fallback; fwd=stale; fwd-status=502; detail=upstream-status")
        );
        let d = fail(&f, &get("/never"), 502, "via_upstream", T0, &s);
        assert_eq!(
            header(replaced(&d), "cache-status"),
            Some("cached-fallback; fwd=uri-miss; fwd-status=502; detail=upstream-status")
        );
        // Without staticFallback (and nothing stored), the failure goes through.
        let bare = fallback("{}");
        let s = MemoryStore::new();
        assert_eq!(
            fail(&bare, &req, 502, "via_upstream", T0, &s).action,
            ResponseAction::PassThrough
        );
        assert_eq!(
            fail(&bare, &req, 404, "via_upstream", T0, &s).action,
            ResponseAction::Ignore
        );
    }

    #[test]
    fn stale_if_error_shortens_the_window() {
        let f = fallback("{}");
        let s = MemoryStore::new();
        let req = get("/a");
        keep(
            &f,
            &req,
            &[("cache-control", "max-age=1, stale-if-error=5")],
            b"x",
            T0,
            &s,
        );
        assert!(matches!(
            f.lookup(&req, f.base_key(&req), T0 + 5 * S, &s).unwrap(),
            Lookup::Hit { .. }
        ));
        assert_eq!(
            f.lookup(&req, f.base_key(&req), T0 + 6 * S, &s).unwrap(),
            Lookup::TooOld
        );
    }

    /// The copy a 200 from the upstream starts, at T0.
    fn collect(f: &Fallback, req: &RequestParts, s: &MemoryStore) -> Box<Pending> {
        let d = f.on_response(
            Covered {
                req,
                base: f.base_key(req),
            },
            None,
            Answer {
                status: 200,
                details: Some("via_upstream"),
                headers: Vec::new(),
            },
            T0,
            s,
        );
        match d.action {
            ResponseAction::Collect(p) => p,
            other => panic!("a 200 is collected: {other:?}"),
        }
    }

    #[test]
    fn a_response_that_did_not_complete_is_not_kept() {
        let f = fallback("{}");
        let s = MemoryStore::new();
        let req = get("/a");
        let mut p = collect(&f, &req, &s);
        assert_eq!(p.copy.body(4, false, || b"half".to_vec()), None);
        assert!(!f.store(*p, &s).unwrap());
        assert!(!matches!(
            f.lookup(&req, f.base_key(&req), T0, &s).unwrap(),
            Lookup::Hit { .. }
        ));
        assert_eq!(f.used_bytes(&s).unwrap(), 0);
    }

    #[test]
    fn variants_are_kept_apart_by_the_response_vary_headers() {
        let f = fallback("{}");
        let s = MemoryStore::new();
        let html = get("/a").header("accept", "text/html");
        let json = get("/a").header("accept", "application/json");
        keep(&f, &html, &[("vary", "Accept")], b"<p>", T0, &s);
        keep(&f, &json, &[("vary", "Accept")], b"{}", T0, &s);
        let body = |req: &RequestParts| match f.lookup(req, f.base_key(req), T0, &s).unwrap() {
            Lookup::Hit { response, .. } => Some(response.body),
            _ => None,
        };
        assert_eq!(body(&html), Some(b"<p>".to_vec()));
        assert_eq!(body(&json), Some(b"{}".to_vec()));
        assert_eq!(body(&get("/a").header("accept", "text/plain")), None);
        // The resource stops varying: the plain response replaces the vary record.
        keep(&f, &html, &[], b"plain", T0 + S, &s);
        assert_eq!(body(&json), Some(b"plain".to_vec()));
    }

    #[test]
    fn bodies_over_max_body_bytes_are_dropped_while_streaming() {
        let f = fallback(r#"{"maxBodyBytes":4}"#);
        let s = MemoryStore::new();
        let req = get("/a");
        let mut p = collect(&f, &req, &s);
        assert_eq!(p.copy.body(2, false, || b"ab".to_vec()), None);
        assert_eq!(p.copy.body(2, false, || b"cd".to_vec()), None);
        assert_eq!(
            p.copy.body(1, true, || panic!("read over maxBodyBytes")),
            Some(Dropped::TooLarge)
        );
        assert!(!f.store(*p, &s).unwrap());
        assert_eq!(f.budget.available(), f.config.max_buffered_bytes, "freed");
    }

    #[test]
    fn concurrent_copies_stay_within_max_buffered_bytes() {
        let f = fallback(r#"{"maxBodyBytes":6,"maxBufferedBytes":10}"#);
        let s = MemoryStore::new();
        let (mut a, mut b) = (collect(&f, &get("/a"), &s), collect(&f, &get("/b"), &s));
        assert_eq!(a.copy.body(6, false, || vec![1; 6]), None);
        assert_eq!(
            b.copy.body(6, false, || panic!("read over the budget")),
            Some(Dropped::OverBudget)
        );
        assert_eq!(a.copy.body(0, true, Vec::new), None);
        assert!(f.store(*a, &s).unwrap());
        assert!(!f.store(*b, &s).unwrap());
        assert_eq!(f.budget.available(), 10);
    }

    #[test]
    fn bytes_and_entries_stay_bounded_under_many_urls() {
        let f = fallback(r#"{"maxEntries":8,"maxTotalBytes":2000}"#);
        let s = MemoryStore::new();
        for i in 0..300 {
            keep(
                &f,
                &get(&format!("/u/{i}")),
                &[],
                &[b'x'; 100],
                T0 + i * S,
                &s,
            );
            assert!(f.used_bytes(&s).unwrap() <= 2000);
        }
        assert!(s.len() <= 2 * 8 + 1 + 1, "keys: {}", s.len());
        let last = get("/u/299");
        assert!(matches!(
            f.lookup(&last, f.base_key(&last), T0 + 300 * S, &s)
                .unwrap(),
            Lookup::Hit { .. }
        ));
    }

    #[test]
    fn the_circuit_opens_answers_locally_probes_and_closes() {
        let f = fallback(
            r#"{"circuitBreaker":{"failures":2,"window":"10s","openFor":"30s"},"staticFallback":{"body":"down"}}"#,
        );
        let s = MemoryStore::new();
        let req = get("/a");
        let base = f.base_key(&req);
        let mut errs = Vec::new();
        keep(&f, &req, &[], b"good", T0, &s);
        assert!(!fail(&f, &req, 503, "via_upstream", T0 + S, &s).circuit_opened);
        assert!(fail(&f, &req, 503, "via_upstream", T0 + 2 * S, &s).circuit_opened);
        // Open: answered from the store without the upstream, or with the static answer.
        match on_request(&f, &req, T0 + 3 * S, &s, &mut errs) {
            RequestAction::Answer {
                reply,
                served: Served::Stale,
            } => {
                assert_eq!(reply.body, b"good");
                assert_eq!(
                    header(&reply, "cache-status"),
                    Some("cached-fallback; hit; detail=circuit-open")
                );
            }
            other => panic!("{other:?}"),
        }
        let other = get("/b");
        match on_request(&f, &other, T0 + 3 * S, &s, &mut errs) {
            RequestAction::Answer {
                reply,
                served: Served::Static,
            } => assert_eq!(reply.body, b"down"),
            other => panic!("{other:?}"),
        }
        // After openFor: one probe, the others still answered locally.
        let t = T0 + 32 * S;
        let RequestAction::Forward { probe: Some(token) } = on_request(&f, &req, t, &s, &mut errs)
        else {
            panic!()
        };
        assert!(matches!(
            on_request(&f, &req, t, &s, &mut errs),
            RequestAction::Answer { .. }
        ));
        let d = f.on_response(
            Covered { req: &req, base },
            Some(token),
            Answer {
                status: 200,
                details: Some("via_upstream"),
                headers: Vec::new(),
            },
            t,
            &s,
        );
        assert!(d.settled);
        assert_eq!(
            on_request(&f, &req, t, &s, &mut errs),
            RequestAction::Forward { probe: None }
        );
        assert!(errs.is_empty());
    }

    #[test]
    fn with_the_circuit_open_and_nothing_to_serve_the_answer_is_a_503_with_retry_after() {
        let f = fallback(r#"{"circuitBreaker":{"failures":1,"openFor":"30s"}}"#);
        let s = MemoryStore::new();
        let req = get("/a");
        assert!(fail(&f, &req, 500, "via_upstream", T0, &s).circuit_opened);
        let RequestAction::Answer {
            reply,
            served: Served::Unavailable,
        } = on_request(&f, &req, T0 + 10 * S, &s, &mut Vec::new())
        else {
            panic!()
        };
        assert_eq!(reply.status, 503);
        assert_eq!(header(&reply, "retry-after"), Some("20"));
        assert_eq!(
            header(&reply, "cache-status"),
            Some("cached-fallback; detail=circuit-open")
        );
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let f = fallback(r#"{"circuitBreaker":{"failures":1,"openFor":"30s"}}"#);
        let s = MemoryStore::new();
        let req = get("/a");
        let base = f.base_key(&req);
        fail(&f, &req, 500, "via_upstream", T0, &s);
        let RequestAction::Forward { probe: Some(token) } =
            on_request(&f, &req, T0 + 30 * S, &s, &mut Vec::new())
        else {
            panic!()
        };
        // Another filter answered it: nothing learnt about the upstream.
        let d = f.on_response(
            Covered { req: &req, base },
            Some(token),
            Answer {
                status: 429,
                details: Some("rate_limited"),
                headers: Vec::new(),
            },
            T0 + 30 * S,
            &s,
        );
        assert!(!d.settled);
        f.abandon_probe(token, T0 + 31 * S, &s).unwrap();
        assert!(matches!(
            on_request(&f, &req, T0 + 31 * S, &s, &mut Vec::new()),
            RequestAction::Forward { probe: Some(_) }
        ));
    }

    #[test]
    fn a_broken_store_forwards_and_passes_through() {
        let f = fallback(r#"{"circuitBreaker":{},"staticFallback":{}}"#);
        let s = MemoryStore::new();
        s.broken.set(true);
        let req = get("/a");
        let mut errs = Vec::new();
        assert_eq!(
            on_request(&f, &req, T0, &s, &mut errs),
            RequestAction::Forward { probe: None }
        );
        assert_eq!(errs.len(), 1);
        let d = fail(&f, &req, 503, "via_upstream", T0, &s);
        assert!(matches!(
            d.action,
            ResponseAction::Replace {
                served: Served::Static,
                ..
            }
        ));
        assert!(!d.errors.is_empty());
    }
}
