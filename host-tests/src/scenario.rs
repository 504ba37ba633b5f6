//! Scenario files: one description of a plugin chain, a scripted upstream and a request
//! sequence with expected answers, run by two runners — this harness ([`run_in_harness`]) and
//! real Envoy (`edge_e2e::scenario`) — that produce the same normalised [`Transcript`].
//!
//! The format (YAML) is documented in `envoy/scenarios/README.md`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{CalloutReply, Edge, GrpcReply, Module, Plugin, Request, Upstream};

/// A parsed scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows, one sentence.
    pub about: String,
    /// Filters in order; the router comes last implicitly.
    pub chain: Vec<Filter>,
    /// Envoy's route timeout (default 15s).
    #[serde(default)]
    pub route_timeout: Option<String>,
    /// Routes `x-route-<name>: <value>` requests to `<prefix>` rewrites, as the flag router's
    /// configs do in Envoy: `{header: x-route-checkout, value: v2, prefix: /checkout, rewrite: /v2/checkout}`.
    #[serde(default)]
    pub rewrites: Vec<Rewrite>,
    /// The application's answers by path (exact, or a prefix ending in `*`; longest wins).
    #[serde(default)]
    pub upstream: BTreeMap<String, Answer>,
    /// The `flags` cluster's answers (plugins' background fetches), same form.
    #[serde(default)]
    pub flags: BTreeMap<String, Answer>,
    /// More clusters plugins may call, by name: HTTP ones answer by path (as `flags`), gRPC
    /// ones (`grpc: true`) by `/package.Service/Method`. A call to a cluster the file does
    /// not declare fails the scenario.
    #[serde(default)]
    pub clusters: BTreeMap<String, Cluster>,
    /// The route answers itself (Envoy's `direct_response`) instead of the application.
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    /// Upstream request headers to record in the transcript.
    #[serde(default)]
    pub upstream_headers: Vec<String>,
    /// Expected: the chain is refused at load, with an error containing this text.
    #[serde(default)]
    pub load_error: Option<String>,
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Why the harness copies an Envoy oddity here, if it does (shown in the transcript).
    #[serde(default)]
    pub note: Option<String>,
    /// The directory of the file: `module` paths are relative to it.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// A callout cluster of a scenario: `{grpc: true}` or not, and answers by path (HTTP) or by
/// `/package.Service/Method` (gRPC).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Cluster {
    #[serde(default)]
    pub grpc: bool,
    #[serde(flatten)]
    pub answers: BTreeMap<String, CallAnswer>,
}

/// How a cluster answers one path or gRPC method.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallAnswer {
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub delay: Option<String>,
    #[serde(default)]
    pub reset: bool,
    /// gRPC: the call's status (0, the default, delivers `body` as the reply message).
    #[serde(default)]
    pub grpc_status: u32,
    #[serde(default)]
    pub grpc_message: String,
}

impl CallAnswer {
    /// The same answer in the form of the application's and `flags`' answers.
    pub fn as_answer(&self) -> Answer {
        Answer {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            chunks: None,
            delay: self.delay.clone(),
            reset: self.reset,
            repeat: None,
        }
    }
}

/// Envoy's `direct_response` on the route: this status and body, no application.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// A module of `dist/` (`rate_limit`, ...); its filter name and root id.
    #[serde(default)]
    pub plugin: Option<String>,
    /// Any module, by path relative to the scenario file (`name`, `root_id` and `vm_id`
    /// default to the file's stem).
    #[serde(default)]
    pub module: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub root_id: Option<String>,
    #[serde(default)]
    pub vm_id: Option<String>,
    /// The plugin configuration as YAML (sent as JSON text).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// The configuration as raw text instead (for malformed JSON).
    #[serde(default)]
    pub config_text: Option<String>,
    /// Envoy's buffer filter with this `max_request_bytes` (the harness passes bodies whole).
    #[serde(default)]
    pub buffer: Option<u64>,
}

impl Filter {
    /// The filter's name (`plugin`, else `name`, else the module file's stem).
    pub fn filter_name(&self) -> Option<String> {
        if let Some(name) = self.name.clone().or_else(|| self.plugin.clone()) {
            return Some(name);
        }
        let module = self.module.as_ref()?;
        Path::new(module)
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
    }

    /// `root_id` as configured, else the filter's name.
    pub fn root_id(&self) -> Option<String> {
        self.root_id.clone().or_else(|| self.filter_name())
    }

    /// `vm_id` as configured; a `module` filter defaults to its name, a `plugin` to none.
    pub fn vm_id(&self) -> String {
        match (&self.vm_id, &self.module) {
            (Some(id), _) => id.clone(),
            (None, Some(_)) => self.filter_name().unwrap_or_default(),
            (None, None) => String::new(),
        }
    }

    /// The wasm file of a `module` filter, resolved against the scenario's directory.
    pub fn module_file(&self, dir: &Path) -> Option<PathBuf> {
        self.module.as_ref().map(|m| dir.join(m))
    }

    /// Whether the filter is a wasm plugin (not Envoy's buffer filter).
    pub fn is_wasm(&self) -> bool {
        self.plugin.is_some() || self.module.is_some()
    }

    /// The plugin's configuration text.
    pub fn config_string(&self) -> String {
        match (&self.config_text, &self.config) {
            (Some(text), _) => text.clone(),
            (None, Some(v)) => v.to_string(),
            (None, None) => String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    pub header: String,
    pub value: String,
    pub prefix: String,
    pub rewrite: String,
}

/// How the upstream (or the flags cluster) answers one path.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
    /// Send the body in this many chunks (chunked encoding).
    #[serde(default)]
    pub chunks: Option<usize>,
    /// Answer after this long (`300ms`); past the route timeout the client gets 504.
    #[serde(default)]
    pub delay: Option<String>,
    /// Reset the connection instead of answering.
    #[serde(default)]
    pub reset: bool,
    /// The body is `body` repeated this many times (a large body without a large file).
    #[serde(default)]
    pub repeat: Option<usize>,
}

fn ok() -> u16 {
    200
}

impl Answer {
    /// The whole body: `body`, `repeat` times.
    pub fn full_body(&self) -> String {
        self.body.repeat(self.repeat.unwrap_or(1))
    }

    /// The body split into the scripted number of chunks (at least one byte each).
    pub fn body_chunks(&self) -> Vec<Vec<u8>> {
        let full = self.full_body();
        let body = full.as_bytes();
        if body.is_empty() {
            return Vec::new();
        }
        let n = self.chunks.unwrap_or(1).clamp(1, body.len());
        let size = body.len().div_ceil(n);
        body.chunks(size).map(<[u8]>::to_vec).collect()
    }

    pub fn delay(&self) -> Result<Duration> {
        self.delay
            .as_deref()
            .map_or(Ok(Duration::ZERO), parse_duration)
    }
}

/// One request of a step.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: String,
    /// Send the body in this many chunks (chunked encoding).
    #[serde(default)]
    pub chunks: Option<usize>,
    /// The client's address (a 127.0.0.0/8 address: Envoy's client binds it).
    #[serde(default)]
    pub from: Option<String>,
    /// `h1` (default) or `h2`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Dynamic metadata a filter before the chain sets, `{namespace: {key: text}}`: the
    /// plugin reads it at `metadata.filter_metadata.<namespace>.<key>`. In Envoy a Lua filter
    /// first in the chain sets it (from a header it removes).
    #[serde(default)]
    pub metadata: BTreeMap<String, BTreeMap<String, String>>,
    /// A gRPC request: `POST`, `content-type: application/grpc`, `te: trailers`, the body as
    /// one length-prefixed gRPC message.
    #[serde(default)]
    pub grpc: bool,
}

fn get() -> String {
    "GET".into()
}

impl Send {
    /// The body as sent: for a gRPC request, framed as one gRPC message.
    pub fn wire_body(&self) -> Vec<u8> {
        if !self.grpc {
            return self.body.clone().into_bytes();
        }
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        framed.extend_from_slice(self.body.as_bytes());
        framed
    }

    /// The headers as sent: a gRPC request's own come first.
    pub fn wire_headers(&self) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        if self.grpc {
            headers.push(("content-type".to_string(), "application/grpc".to_string()));
            headers.push(("te".to_string(), "trailers".to_string()));
        }
        headers.extend(self.headers.iter().cloned());
        headers
    }

    /// The method as sent (`POST` for gRPC).
    pub fn wire_method(&self) -> String {
        if self.grpc {
            "POST".into()
        } else {
            self.method.clone()
        }
    }

    pub fn body_chunks(&self) -> Vec<Vec<u8>> {
        if self.grpc {
            return vec![self.wire_body()];
        }
        Answer {
            body: self.body.clone(),
            chunks: self.chunks,
            ..Answer::default()
        }
        .body_chunks()
    }

    fn label(&self) -> String {
        let mut label = format!("{} {}", self.wire_method(), self.path);
        if self.grpc {
            label.push_str(" (gRPC)");
        }
        if self.protocol.as_deref() == Some("h2") {
            label.push_str(" (h2)");
        }
        label
    }
}

/// What one response must be; headers map to a value or `null` (absent).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub headers: BTreeMap<String, Option<String>>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_contains: Option<String>,
    /// `true`: the stream is reset after the response headers (the body cut short).
    #[serde(default)]
    pub reset: Option<bool>,
}

/// One step: exactly one of `send`, `together`, `wait`, `answer`, `upstream_down`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// One request, sent `times` times in a row.
    #[serde(default)]
    pub send: Option<Send>,
    #[serde(default)]
    pub times: Option<usize>,
    /// Requests in flight at once.
    #[serde(default)]
    pub together: Option<Vec<Send>>,
    /// Let time pass (`1500ms`): the harness advances its clock, Envoy's runner sleeps.
    #[serde(default)]
    pub wait: Option<String>,
    /// Replaces upstream answers from here on (same form as `upstream`).
    #[serde(default)]
    pub answer: Option<BTreeMap<String, Answer>>,
    /// Replaces flag-file answers from here on.
    #[serde(default)]
    pub flags: Option<BTreeMap<String, Answer>>,
    /// `true`: the application stops listening (connections refused); `false`: it is back.
    #[serde(default)]
    pub upstream_down: Option<bool>,
    /// For a single response (also each of `times`).
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Statuses in order (`times`) or as a multiset (`together`).
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
    /// Requests the application received during this step, `METHOD /path`, in any order.
    #[serde(default)]
    pub reached: Option<Vec<String>>,
}

/// Our plugins in the README's order, with their sections in `edge.wasm`'s configuration.
pub const EDGE_SECTIONS: [(&str, &str); 4] = [
    ("rate_limit", "rateLimit"),
    ("flag_router", "flagRouter"),
    ("idempotency", "idempotency"),
    ("cached_fallback", "cachedFallback"),
];

impl Scenario {
    /// The same scenario with its chain of our plugins in the README's order (rate limit,
    /// flag router, idempotency, Envoy's buffer filters, cached fallback), and whether that
    /// moved anything; `None` when the chain holds anything else, a plugin twice, or raw
    /// configuration text.
    pub fn in_readme_order(&self) -> Option<(Scenario, bool)> {
        let mut plugins: Vec<(usize, &Filter)> = Vec::new();
        let mut buffers = Vec::new();
        for f in &self.chain {
            if f.buffer.is_some() {
                buffers.push(f.clone());
                continue;
            }
            let plain = f.module.is_none()
                && f.name.is_none()
                && f.root_id.is_none()
                && f.vm_id.is_none()
                && f.config_text.is_none();
            let plugin = f.plugin.as_deref()?;
            let at = EDGE_SECTIONS.iter().position(|(p, _)| *p == plugin)?;
            if !plain || plugins.iter().any(|(a, _)| *a == at) {
                return None;
            }
            plugins.push((at, f));
        }
        if plugins.is_empty() {
            return None;
        }
        plugins.sort_by_key(|(at, _)| *at);
        let mut chain: Vec<Filter> = plugins
            .iter()
            .filter(|(at, _)| *at < 3)
            .map(|(_, f)| (*f).clone())
            .collect();
        chain.extend(buffers);
        chain.extend(
            plugins
                .iter()
                .filter(|(at, _)| *at == 3)
                .map(|(_, f)| (*f).clone()),
        );
        let key = |c: &[Filter]| -> Vec<String> {
            c.iter()
                .map(|f| {
                    f.plugin
                        .clone()
                        .unwrap_or_else(|| format!("{:?}", f.buffer))
                })
                .collect()
        };
        let moved = key(&chain) != key(&self.chain);
        Some((
            Scenario {
                chain,
                ..self.clone()
            },
            moved,
        ))
    }

    /// The same scenario with its chain of our plugins as one `edge.wasm` filter: each
    /// plugin's configuration its section, Envoy's buffer filters after it. `edge.wasm` runs
    /// its stages in the README's order whatever order the chain had (see
    /// [`Scenario::in_readme_order`]).
    pub fn as_one_filter(&self) -> Option<Scenario> {
        let (ordered, _) = self.in_readme_order()?;
        let mut sections = serde_json::Map::new();
        let mut buffers = Vec::new();
        for f in ordered.chain {
            match (&f.plugin, f.buffer) {
                (_, Some(_)) => buffers.push(f),
                (Some(plugin), None) => {
                    let (_, section) = EDGE_SECTIONS.iter().find(|(p, _)| p == plugin)?;
                    sections.insert(
                        section.to_string(),
                        f.config.clone().unwrap_or(serde_json::Value::Null),
                    );
                }
                (None, None) => return None,
            }
        }
        let mut chain = vec![Filter {
            plugin: Some("edge".into()),
            module: None,
            name: None,
            root_id: None,
            vm_id: None,
            config: Some(serde_json::Value::Object(sections)),
            config_text: None,
            buffer: None,
        }];
        chain.extend(buffers);
        Some(Scenario {
            chain,
            ..self.clone()
        })
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Scenario> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut s: Scenario =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        s.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        s.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        for (i, f) in self.chain.iter().enumerate() {
            let kinds = [f.plugin.is_some(), f.module.is_some(), f.buffer.is_some()];
            if kinds.iter().filter(|k| **k).count() != 1 {
                bail!("chain[{i}]: give one of `plugin`, `module` or `buffer`");
            }
        }
        for (name, cluster) in &self.clusters {
            if name == "flags" && !self.flags.is_empty() {
                bail!("clusters.flags: give the flags cluster once (`flags` or `clusters.flags`)");
            }
            for (path, answer) in &cluster.answers {
                if cluster.grpc && (path.matches('/').count() != 2 || !path.starts_with('/')) {
                    bail!("clusters.{name}: {path:?} is not /package.Service/Method");
                }
                if let Some(d) = &answer.delay {
                    parse_duration(d).with_context(|| format!("clusters.{name}.{path}.delay"))?;
                }
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            for send in s.send.iter().chain(s.together.iter().flatten()) {
                if !matches!(send.protocol.as_deref(), None | Some("h1") | Some("h2")) {
                    bail!("steps[{i}]: protocol is h1 or h2");
                }
                let text = send.metadata.iter().flat_map(|(namespace, entries)| {
                    entries
                        .iter()
                        .flat_map(move |(k, v)| [namespace.as_str(), k.as_str(), v.as_str()])
                });
                if text.into_iter().any(|t| t.contains(['|', ';', '\r', '\n'])) {
                    bail!("steps[{i}]: metadata text may not hold `|`, `;` or line breaks");
                }
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            let kinds = [
                s.send.is_some(),
                s.together.is_some(),
                s.wait.is_some(),
                s.answer.is_some() || s.flags.is_some(),
                s.upstream_down.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                bail!("steps[{i}]: give exactly one of send, together, wait, answer/flags, upstream_down");
            }
            if let Some(w) = &s.wait {
                parse_duration(w).with_context(|| format!("steps[{i}].wait"))?;
            }
        }
        if let Some(t) = &self.route_timeout {
            parse_duration(t).context("route_timeout")?;
        }
        Ok(())
    }

    pub fn route_timeout(&self) -> Duration {
        self.route_timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(15))
    }

    /// Response headers every runner records: every header any expectation names.
    pub fn recorded_headers(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .steps
            .iter()
            .filter_map(|s| s.expect.as_ref())
            .flat_map(|e| e.headers.keys().map(|k| k.to_ascii_lowercase()))
            .collect();
        names.into_iter().collect()
    }

    /// Checks a runner's transcript against the expectations; returns what differs.
    pub fn check(&self, t: &Transcript) -> Vec<String> {
        let mut wrong = Vec::new();
        match (&self.load_error, &t.refused) {
            (Some(want), Some(got)) => {
                if !got.contains(want.as_str()) {
                    wrong.push(format!("refused at load, but without {want:?}: {got}"));
                }
                return wrong;
            }
            (Some(want), None) => {
                wrong.push(format!("loaded; expected a refusal naming {want:?}"));
                return wrong;
            }
            (None, Some(got)) => {
                wrong.push(format!("refused at load: {got}"));
                return wrong;
            }
            (None, None) => {}
        }
        for (i, (step, rec)) in self.steps.iter().zip(&t.steps).enumerate() {
            let at = |what: String| format!("step {} ({}): {what}", i + 1, rec.label);
            if let Some(e) = &step.expect {
                for r in &rec.responses {
                    for w in expect_one(e, r) {
                        wrong.push(at(w));
                    }
                }
            }
            if let Some(want) = &step.statuses {
                let mut got: Vec<u16> = rec.responses.iter().map(|r| r.status).collect();
                let mut want = want.clone();
                if step.together.is_some() {
                    got.sort_unstable();
                    want.sort_unstable();
                }
                if got != want {
                    wrong.push(at(format!("statuses {got:?}, expected {want:?}")));
                }
            }
            if let Some(want) = &step.reached {
                if !reached_matches(want, &rec.upstream) {
                    let mut want = want.clone();
                    want.sort();
                    wrong.push(at(format!(
                        "the application received {:?}, expected {want:?}",
                        rec.upstream
                    )));
                }
            }
        }
        if t.steps.len() != self.steps.len() {
            wrong.push(format!(
                "ran {} of {} steps",
                t.steps.len(),
                self.steps.len()
            ));
        }
        wrong
    }
}

/// `METHOD /path` of an application line (`METHOD /path [h=v ...] body=<n>B`).
fn request_line(line: &str) -> &str {
    let end = [line.find(" ["), line.find(" body=")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(line.len());
    &line[..end]
}

/// Whether the application's lines are the expected ones, in any order: an expected entry
/// written as `METHOD /path` matches that request whatever its recorded headers and body; one
/// with `[h=v ...]` or `body=<n>B` must match the whole line.
fn reached_matches(want: &[String], got: &[String]) -> bool {
    if want.len() != got.len() {
        return false;
    }
    let mut used = vec![false; got.len()];
    let full = |w: &str| w.contains(" [") || w.contains(" body=");
    // Whole-line expectations first, so a loose one cannot take the line they need.
    let mut order: Vec<&String> = want.iter().collect();
    order.sort_by_key(|w| !full(w));
    for w in order {
        let found = got.iter().enumerate().position(|(i, g)| {
            !used[i]
                && if full(w) {
                    g == w
                } else {
                    request_line(g) == w
                }
        });
        match found {
            Some(i) => used[i] = true,
            None => return false,
        }
    }
    true
}

fn expect_one(e: &Expect, r: &Seen) -> Vec<String> {
    let mut wrong = Vec::new();
    if let Some(s) = e.status {
        if r.status != s {
            wrong.push(format!(
                "status {}, expected {s} (body {:?})",
                r.status, r.body
            ));
        }
    }
    for (name, want) in &e.headers {
        let got = r
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.clone());
        if &got != want {
            wrong.push(format!("header {name}: {got:?}, expected {want:?}"));
        }
    }
    if let Some(b) = &e.body {
        if &r.body != b {
            wrong.push(format!("body {:?}, expected {b:?}", r.body));
        }
    }
    if let Some(want) = e.reset {
        if r.reset != want {
            wrong.push(format!(
                "reset after the headers: {}, expected {want}",
                r.reset
            ));
        }
    }
    if let Some(b) = &e.body_contains {
        if !r.body.contains(b.as_str()) {
            wrong.push(format!("body {:?} lacks {b:?}", r.body));
        }
    }
    wrong
}

/// `250ms`, `1.5s`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| t.split_at(i))
        .with_context(|| format!("{text:?} has no unit (ms, s, m)"))?;
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => bail!("{text:?}: unknown unit {unit:?} (ms, s, m)"),
    };
    if !(0.0..=3600.0).contains(&secs) {
        bail!("{text:?} is out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What a client saw, normalised: status, the recorded headers (absent as `None`), body text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    pub status: u16,
    pub headers: Vec<(String, Option<String>)>,
    pub body: String,
    /// The stream was reset after the response headers (the body cut short).
    pub reset: bool,
}

impl Seen {
    /// The same response, reset after its headers.
    pub fn reset_after_headers(mut self) -> Seen {
        self.reset = true;
        self
    }

    /// What a runner records of a response: its status, the `recorded` headers (present or
    /// not) and the body as text. Both runners build it here, so they compare alike.
    pub fn new<'a>(
        status: u16,
        recorded: &[String],
        header: impl Fn(&str) -> Option<&'a str>,
        body: &[u8],
    ) -> Seen {
        Seen {
            status,
            headers: recorded
                .iter()
                .map(|h| (h.clone(), header(h).map(str::to_string)))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
            reset: false,
        }
    }
}

/// One step's record: responses (sorted for `together`) and the application's requests
/// (sorted), each `METHOD /path [header=value ...] body=<n>B`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRecord {
    pub label: String,
    pub responses: Vec<Seen>,
    pub upstream: Vec<String>,
    /// Calls plugins made to the clusters under `clusters:` (`NAME <- METHOD /path`), sorted;
    /// the first step also has those made at load.
    pub calls: Vec<String>,
}

/// A runner's normalised account of a scenario: identical across runners when they agree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    /// Set when the chain was refused at load (the runner's message).
    pub refused: Option<String>,
    pub steps: Vec<StepRecord>,
}

impl Transcript {
    /// The text two runners must agree on: a load refusal compares as a refusal (the two hosts
    /// word it differently; [`Scenario::check`] looks for the plugin's reason in each).
    pub fn normalised(&self) -> String {
        let mut out = String::new();
        if self.refused.is_some() {
            out.push_str("refused at load\n");
        }
        for (i, s) in self.steps.iter().enumerate() {
            let _ = writeln!(out, "{:>2}. {}", i + 1, s.label);
            for r in &s.responses {
                let _ = write!(out, "    -> {}", r.status);
                for (k, v) in &r.headers {
                    match v {
                        Some(v) => {
                            let _ = write!(out, " {k}={v:?}");
                        }
                        None => {
                            let _ = write!(out, " {k}=-");
                        }
                    }
                }
                let _ = write!(out, " body={:?}", short(&r.body));
                if r.reset {
                    out.push_str(" then reset");
                }
                out.push('\n');
            }
            for u in &s.upstream {
                let _ = writeln!(out, "    app <- {u}");
            }
            for c in &s.calls {
                let _ = writeln!(out, "    call {c}");
            }
        }
        out
    }

    /// The normalised text, plus the refusal message.
    pub fn render(&self) -> String {
        match &self.refused {
            Some(msg) => format!("refused at load: {msg}\n"),
            None => self.normalised(),
        }
    }
}

fn short(body: &str) -> String {
    if body.len() <= 160 {
        return body.to_string();
    }
    let mut end = 160;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &body[..end], body.len())
}

/// Formats what the application received, the same way in both runners.
pub fn upstream_line(
    method: &str,
    path: &str,
    headers: &[(String, Option<String>)],
    body_len: usize,
) -> String {
    let mut line = format!("{method} {path}");
    if !headers.is_empty() {
        line.push_str(" [");
        let parts: Vec<String> = headers
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("-")))
            .collect();
        line.push_str(&parts.join(" "));
        line.push(']');
    }
    if body_len > 0 {
        let _ = write!(line, " body={body_len}B");
    }
    line
}

/// Finds the answer for a path: exact match (query ignored) first, then the longest `*` prefix.
pub fn answer_for<'a>(routes: &'a BTreeMap<String, Answer>, target: &str) -> Option<&'a Answer> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if let Some(a) = routes.get(path).or_else(|| routes.get(target)) {
        return Some(a);
    }
    routes
        .iter()
        .filter_map(|(p, a)| {
            let prefix = p.strip_suffix('*')?;
            path.starts_with(prefix).then_some((prefix.len(), a))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, a)| a)
}

/// Compiled modules by name, loaded once from a directory (`dist/`).
pub struct Modules {
    dir: PathBuf,
    files: HashMap<String, PathBuf>,
    loaded: HashMap<String, Module>,
}

impl Modules {
    pub fn new(dir: impl Into<PathBuf>) -> Modules {
        Modules {
            dir: dir.into(),
            files: HashMap::new(),
            loaded: HashMap::new(),
        }
    }

    /// Loads plugin `name` from `file` instead of the directory.
    pub fn set_file(&mut self, name: &str, file: impl Into<PathBuf>) {
        self.loaded.remove(name);
        self.files.insert(name.to_string(), file.into());
    }

    /// A module by file (a scenario's `module:`), loaded once.
    pub fn get_file(&mut self, file: &Path) -> Result<Module> {
        let key = format!("file:{}", file.display());
        if let Some(m) = self.loaded.get(&key) {
            return Ok(m.clone());
        }
        let m = Module::from_file(file)?;
        self.loaded.insert(key, m.clone());
        Ok(m)
    }

    pub fn get(&mut self, name: &str) -> Result<Module> {
        if let Some(m) = self.loaded.get(name) {
            return Ok(m.clone());
        }
        let path = match self.files.get(name) {
            Some(file) => file.clone(),
            None => self.dir.join(format!("{name}.wasm")),
        };
        let m = Module::from_file(&path)?;
        self.loaded.insert(name.to_string(), m.clone());
        Ok(m)
    }
}

struct Script {
    upstream: BTreeMap<String, Answer>,
    flags: BTreeMap<String, Answer>,
    down: bool,
    /// Upstream requests so far, and which of them were refused: the router sent them, but
    /// an application that is down never received them (Envoy's runner records none).
    sent: usize,
    refused: BTreeSet<usize>,
}

const AUTHORITY: &str = "edge.test";

/// Runs a scenario in the harness: 2 workers (new requests alternate, as Envoy's connections
/// do), the clock advanced for `wait`s and delays.
pub fn run_in_harness(s: &Scenario, modules: &mut Modules) -> Result<Transcript> {
    let script = Rc::new(RefCell::new(Script {
        upstream: s.upstream.clone(),
        flags: s.flags.clone(),
        down: false,
        sent: 0,
        refused: BTreeSet::new(),
    }));
    let timeout = s.route_timeout();
    let mut b = Edge::builder().workers(2).route_timeout(timeout);
    for f in &s.chain {
        if !f.is_wasm() {
            continue;
        }
        let m = match (&f.plugin, f.module_file(&s.dir)) {
            (_, Some(file)) => modules.get_file(&file)?,
            (Some(name), None) => modules.get(name)?,
            (None, None) => continue,
        };
        let name = f.filter_name().unwrap_or_default();
        let root_id = f.root_id().unwrap_or_default();
        b = b.plugin(
            Plugin::new(&m, f.config_string())
                .name(&name)
                .root_id(&root_id)
                .vm_id(&f.vm_id()),
        );
    }
    let up = script.clone();
    let rewrites = s.rewrites.clone();
    let direct = s.direct_response.clone();
    b = b.upstream(move |req| {
        if let Some(d) = &direct {
            return Upstream::Direct {
                status: d.status,
                body: d.body.clone().into_bytes(),
            };
        }
        let mut sc = up.borrow_mut();
        sc.sent += 1;
        if sc.down {
            let n = sc.sent - 1;
            sc.refused.insert(n);
            return Upstream::Refused;
        }
        let path = rewritten(req.path(), |h| req.header(h).map(str::to_string), &rewrites);
        match answer_for(&sc.upstream, &path) {
            None => Upstream::ok(format!("upstream saw {} {path}", req.method()))
                .header("content-type", "text/plain"),
            Some(a) if a.reset => Upstream::Reset,
            Some(a) => {
                let mut u = Upstream::status(a.status).chunks(a.body_chunks());
                for (k, v) in &a.headers {
                    u = u.header(k, v);
                }
                u.delay(a.delay().unwrap_or_default())
            }
        }
    });
    for (name, cluster) in &s.clusters {
        if cluster.grpc {
            let answers = cluster.answers.clone();
            b = b.grpc_cluster(name, move |req| {
                let method = format!("/{}/{}", req.service, req.method);
                let delay = |a: &CallAnswer| {
                    a.delay
                        .as_deref()
                        .and_then(|d| parse_duration(d).ok())
                        .unwrap_or_default()
                };
                let failed = |status: u32, message: &str| {
                    GrpcReply::error(status, &grpc_message_seen(message))
                };
                match answers.get(&method) {
                    None => failed(UNKNOWN_METHOD.0, UNKNOWN_METHOD.1),
                    Some(a) if a.reset => GrpcReply {
                        delay: delay(a),
                        ..GrpcReply::error(14, GRPC_RESET_SEEN)
                    },
                    Some(a) if a.grpc_status == 0 => GrpcReply {
                        delay: delay(a),
                        ..GrpcReply::ok(a.body.clone())
                    },
                    Some(a) => GrpcReply {
                        delay: delay(a),
                        ..failed(a.grpc_status, &a.grpc_message)
                    },
                }
            });
        } else {
            let routes: BTreeMap<String, Answer> = cluster
                .answers
                .iter()
                .map(|(path, a)| (path.clone(), a.as_answer()))
                .collect();
            b = b.cluster(name, move |req| {
                call_reply(answer_for(&routes, req.header(":path").unwrap_or("/")))
            });
        }
    }
    let fl = script.clone();
    if !s.clusters.contains_key("flags") {
        b = b.cluster("flags", move |req| {
            let sc = fl.borrow();
            call_reply(answer_for(&sc.flags, req.header(":path").unwrap_or("/")))
        });
    }
    let mut edge = match b.build() {
        Ok(e) => e,
        Err(e) => {
            return Ok(Transcript {
                refused: Some(format!("{e:#}")),
                steps: Vec::new(),
            })
        }
    };
    // Envoy runs its fetch-at-load callouts before the listener takes traffic.
    edge.run_pending()?;
    let recorded = s.recorded_headers();
    let mut t = Transcript::default();
    let mut calls_before = 0;
    let mut grpc_before = 0;
    for step in &s.steps {
        let before = edge.upstream_requests().len();
        let mut rec = StepRecord {
            label: String::new(),
            responses: Vec::new(),
            upstream: Vec::new(),
            calls: Vec::new(),
        };
        if let Some(send) = &step.send {
            let n = step.times.unwrap_or(1);
            rec.label = if n > 1 {
                format!("{} ×{n}", send.label())
            } else {
                send.label()
            };
            for _ in 0..n {
                let req = harness_request(send);
                let res = edge.send(req)?;
                rec.responses.push(seen(&res, &recorded));
            }
        } else if let Some(group) = &step.together {
            rec.label = format!("together: {}", labels(group));
            let mut ids = Vec::new();
            for send in group {
                ids.push(edge.begin(harness_request(send))?);
            }
            // Interleave at callback boundaries until every stream waits or is done.
            loop {
                let mut ran = false;
                for id in &ids {
                    if let crate::Step::Ran(_) = edge.step(*id)? {
                        ran = true;
                    }
                }
                if !ran {
                    break;
                }
            }
            for id in ids {
                let res = edge.finish(id)?;
                rec.responses.push(seen(&res, &recorded));
            }
            rec.responses.sort();
        } else if let Some(w) = &step.wait {
            rec.label = format!("wait {w}");
            edge.advance(parse_duration(w)?)?;
        } else if let Some(down) = step.upstream_down {
            rec.label = if down {
                "application down"
            } else {
                "application up"
            }
            .into();
            script.borrow_mut().down = down;
        } else {
            rec.label = "new answers".into();
            let mut sc = script.borrow_mut();
            if let Some(a) = &step.answer {
                sc.upstream.extend(a.clone());
            }
            if let Some(f) = &step.flags {
                sc.flags.extend(f.clone());
            }
        }
        if let Some(call) = edge
            .abi_misuse()
            .iter()
            .find(|m| m.contains(crate::hostcalls::UNDECLARED))
        {
            bail!(
                "step {} ({}): a plugin made a {call}; declare the cluster under `clusters:` \
                 (Envoy refuses the call the same way, so the scenario would test nothing)",
                t.steps.len() + 1,
                rec.label
            );
        }
        let refused = script.borrow().refused.clone();
        for (i, u) in edge.upstream_requests().iter().enumerate().skip(before) {
            if refused.contains(&i) || s.direct_response.is_some() {
                continue;
            }
            let headers = s
                .upstream_headers
                .iter()
                .map(|h| (h.clone(), u.header(h).map(str::to_string)))
                .collect::<Vec<_>>();
            let path = rewritten(u.path(), |h| u.header(h).map(str::to_string), &s.rewrites);
            rec.upstream
                .push(upstream_line(u.method(), &path, &headers, u.body.len()));
        }
        rec.upstream.sort();
        let callouts = edge.callouts();
        for c in callouts.iter().skip(calls_before) {
            if s.clusters.contains_key(&c.cluster) {
                rec.calls.push(call_line(
                    &c.cluster,
                    c.header(":method").unwrap_or(""),
                    c.header(":path").unwrap_or(""),
                ));
            }
        }
        calls_before = callouts.len();
        // A gRPC call is one HTTP/2 request to its cluster: `POST /package.Service/Method`.
        let grpc = edge.grpc_sent();
        for g in grpc.iter().skip(grpc_before).filter(|g| !g.stream) {
            if s.clusters.contains_key(&g.cluster) {
                let path = format!("/{}/{}", g.service, g.method);
                rec.calls.push(call_line(&g.cluster, "POST", &path));
            }
        }
        grpc_before = grpc.len();
        rec.calls.sort();
        t.steps.push(rec);
    }
    Ok(t)
}

/// How a scenario's gRPC server answers a method it does not have: gRPC's UNIMPLEMENTED.
pub const UNKNOWN_METHOD: (u32, &str) = (12, "unknown method");

/// What a plugin reads (`proxy_get_status`) when a scenario's gRPC server resets the call's
/// stream before answering: Envoy 1.40's router answers the call 14 with this message.
const GRPC_RESET_SEEN: &str = "upstream connect error or disconnect/reset before headers. \
     reset reason: remote reset{upstream_reset_before_response_started{remote_reset}}";

/// `grpc-message` as a gRPC server writes it: percent-encoded outside printable ASCII, and
/// `%` itself.
pub fn grpc_message_on_the_wire(message: &str) -> String {
    let mut out = String::new();
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The message a plugin reads for a call a gRPC server failed with `message`: Envoy 1.40
/// hands over the header as it came (not percent-decoded) with its response details,
/// `{via_upstream}`, appended; without a message, the details alone (`via_upstream`).
fn grpc_message_seen(message: &str) -> String {
    if message.is_empty() {
        return "via_upstream".into();
    }
    format!("{}{{via_upstream}}", grpc_message_on_the_wire(message))
}

/// A call to a scenario's cluster as both runners record it.
pub fn call_line(cluster: &str, method: &str, path: &str) -> String {
    format!("{cluster} <- {method} {path}")
}

/// A scripted HTTP cluster's answer: unrouted paths are 404, `reset` a failed connection.
fn call_reply(answer: Option<&Answer>) -> CalloutReply {
    match answer {
        None => CalloutReply::Response {
            headers: vec![(b":status".to_vec(), b"404".to_vec())],
            body: Vec::new(),
            trailers: Vec::new(),
            delay: Duration::ZERO,
        },
        Some(a) if a.reset => CalloutReply::Fail {
            delay: a.delay().unwrap_or_default(),
        },
        Some(a) => {
            let mut headers = vec![(b":status".to_vec(), a.status.to_string().into_bytes())];
            for (k, v) in &a.headers {
                headers.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
            CalloutReply::Response {
                headers,
                body: a.body.clone().into_bytes(),
                trailers: Vec::new(),
                delay: a.delay().unwrap_or_default(),
            }
        }
    }
}

fn labels(group: &[Send]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in group {
        *counts.entry(s.label()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(l, n)| if n > 1 { format!("{l} ×{n}") } else { l })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The label `send` steps get, shared with Envoy's runner.
pub fn step_label(step: &Step) -> String {
    if let Some(send) = &step.send {
        let n = step.times.unwrap_or(1);
        if n > 1 {
            return format!("{} ×{n}", send.label());
        }
        return send.label();
    }
    if let Some(group) = &step.together {
        return format!("together: {}", labels(group));
    }
    if let Some(w) = &step.wait {
        return format!("wait {w}");
    }
    if let Some(down) = step.upstream_down {
        return if down {
            "application down"
        } else {
            "application up"
        }
        .into();
    }
    "new answers".into()
}

/// The path the router sends upstream: a configured rewrite applies when its header matches
/// (Envoy's route table does this after the plugins ran; the harness has no route table, so
/// the runner applies it from the request headers the plugins may have set).
fn rewritten(path: &str, header: impl Fn(&str) -> Option<String>, rewrites: &[Rewrite]) -> String {
    for r in rewrites {
        if header(&r.header).as_deref() == Some(r.value.as_str()) {
            if let Some(rest) = path.strip_prefix(r.prefix.as_str()) {
                return format!("{}{rest}", r.rewrite);
            }
        }
    }
    path.to_string()
}

fn harness_request(send: &Send) -> Request {
    let method = send.wire_method();
    let body = send.wire_body();
    let mut req = Request::new(&method, &send.path)
        .authority(AUTHORITY)
        .chunks(send.body_chunks());
    if send.protocol.as_deref() == Some("h2") {
        req = req.http2();
    }
    if !body.is_empty() || matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
        if send.chunks.unwrap_or(1) > 1 && !send.grpc {
            // HTTP/2 has no chunked encoding: the pieces are DATA frames, with no length.
            if send.protocol.as_deref() != Some("h2") {
                req = req.header("transfer-encoding", "chunked");
            }
        } else {
            req = req.header("content-length", &body.len().to_string());
        }
    }
    for (k, v) in &send.wire_headers() {
        req = req.header(k, v);
    }
    if let Some(ip) = &send.from {
        req = req.from(&format!("{ip}:40000"));
    }
    for (namespace, entries) in &send.metadata {
        for (key, value) in entries {
            req = req.property(
                &["metadata", "filter_metadata", namespace, key],
                value.as_bytes(),
            );
        }
    }
    req
}

fn seen(res: &crate::Response, recorded: &[String]) -> Seen {
    // A header missing from the headers may be a trailer (`grpc-status` after a body).
    let header = |h: &str| {
        res.header(h)
            .or_else(|| crate::state::header_value(&res.trailers, h))
    };
    let seen = Seen::new(res.status, recorded, header, &res.body);
    // A reset after the headers shows as the headers, then the reset (the body cut short
    // is not compared: how much of it got out is a matter of timing in Envoy).
    if res.reset && res.status != 0 {
        return Seen {
            body: String::new(),
            ..seen
        }
        .reset_after_headers();
    }
    seen
}

/// Every `*.yaml` in a directory, sorted.
pub fn files_in(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_routes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        let mut routes = BTreeMap::new();
        routes.insert(
            "/api/*".to_string(),
            Answer {
                status: 201,
                ..Answer::default()
            },
        );
        routes.insert(
            "/api/x".to_string(),
            Answer {
                status: 202,
                ..Answer::default()
            },
        );
        assert_eq!(answer_for(&routes, "/api/x?q=1").unwrap().status, 202);
        assert_eq!(answer_for(&routes, "/api/y").unwrap().status, 201);
        assert!(answer_for(&routes, "/other").is_none());
    }

    #[test]
    fn reached_lines_match_loosely_or_whole() {
        let got = vec!["GET /a [x-h=v1]".to_string(), "POST /p body=2B".to_string()];
        let want = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(reached_matches(&want(&["POST /p", "GET /a"]), &got));
        assert!(reached_matches(
            &want(&["GET /a [x-h=v1]", "POST /p body=2B"]),
            &got
        ));
        assert!(!reached_matches(
            &want(&["GET /a [x-h=v2]", "POST /p"]),
            &got
        ));
        assert!(!reached_matches(&want(&["GET /a"]), &got));
        assert!(!reached_matches(
            &want(&["POST /p body=3B", "GET /a"]),
            &got
        ));
    }

    #[test]
    fn bodies_split_into_the_scripted_chunks() {
        let a = Answer {
            body: "abcdefg".into(),
            chunks: Some(3),
            ..Answer::default()
        };
        assert_eq!(
            a.body_chunks(),
            vec![b"abc".to_vec(), b"def".to_vec(), b"g".to_vec()]
        );
    }
}
