//! The request-level API: a filter chain of plugins on N workers in front of an emulated
//! upstream. Request callbacks run in chain order, response callbacks in reverse; pauses,
//! buffering, local replies and upstream failures follow Envoy's filter manager.

use crate::abi::{action, LogLevel};
use crate::state::{
    Binding, CalloutHandler, CalloutReply, CalloutRequest, Effect, EventKind, Exchange,
    ExchangeRef, ForeignFn, GrpcHandler, GrpcRequest, HeaderMap, HostShared, LocalReply, LogRecord,
    Peer, PluginInfo, VmRef, REQ, RESP,
};
use crate::vm::{CallbackCost, Module, Outcome, Vm};
use anyhow::{bail, Result};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Envoy's `response.flags` bits for the upstream failures the harness emulates.
pub mod flags {
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
}

/// `response.code_details` values Envoy 1.40 reports.
pub mod details {
    pub const VIA_UPSTREAM: &str = "via_upstream";
    pub const RESET: &str = "upstream_reset_before_response_started{connection_termination}";
    pub const REFUSED: &str = "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}";
    pub const TIMEOUT: &str = "response_timeout";
    pub const WASM_FAIL: &str = "wasm_fail_stream";
    pub const WASM_CLOSE: &str = "wasm_close_stream";
    pub const REQUEST_TOO_LARGE: &str = "request_payload_too_large";
    pub const RESPONSE_TOO_LARGE: &str = "response_payload_too_large";
}

/// A plugin in the chain: a compiled module plus what Envoy's config says about it.
#[derive(Clone)]
pub struct Plugin {
    module: Module,
    info: PluginInfo,
}

impl Plugin {
    /// `config` is the plugin configuration (Envoy: `configuration` as a StringValue).
    pub fn new(module: &Module, config: impl Into<Vec<u8>>) -> Plugin {
        Plugin {
            module: module.clone(),
            info: PluginInfo {
                name: module.name().to_string(),
                root_id: String::new(),
                vm_id: String::new(),
                vm_config: Vec::new(),
                config: config.into(),
                fail_open: false,
                env: Vec::new(),
            },
        }
    }
    /// Envoy's `name` of the plugin (the `plugin_name` property).
    pub fn name(mut self, name: &str) -> Self {
        self.info.name = name.into();
        self
    }
    pub fn root_id(mut self, id: &str) -> Self {
        self.info.root_id = id.into();
        self
    }
    /// Envoy's `vm_config.vm_id`: shared data and queues are scoped by it.
    pub fn vm_id(mut self, id: &str) -> Self {
        self.info.vm_id = id.into();
        self
    }
    pub fn vm_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.info.vm_config = config.into();
        self
    }
    /// Envoy's `fail_open`: after a trap, pass traffic through instead of answering 503.
    pub fn fail_open(mut self, yes: bool) -> Self {
        self.info.fail_open = yes;
        self
    }
    /// An environment variable visible through WASI (`vm_config.environment_variables`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.info.env.push((key.into(), value.into()));
        self
    }
}

/// What the emulated upstream received.
#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    pub worker: usize,
}

impl UpstreamRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::state::header_value(&self.headers, name)
    }
    pub fn method(&self) -> &str {
        self.header(":method").unwrap_or("")
    }
    pub fn path(&self) -> &str {
        self.header(":path").unwrap_or("")
    }
}

/// How the emulated upstream answers.
#[derive(Clone, Debug)]
pub enum Upstream {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        chunks: Vec<Vec<u8>>,
        trailers: Vec<(String, String)>,
        delay: Duration,
    },
    /// The connection is reset before response headers (Envoy: 503, UC).
    Reset,
    /// The connection is refused (Envoy: 503, UF).
    Refused,
    /// No answer: Envoy's route timeout fires (504, UT).
    Hang,
}

impl Upstream {
    pub fn ok(body: impl Into<Vec<u8>>) -> Upstream {
        Upstream::status(200).body(body)
    }
    pub fn status(status: u16) -> Upstream {
        Upstream::Respond {
            status,
            headers: Vec::new(),
            chunks: Vec::new(),
            trailers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Upstream {
        if let Upstream::Respond { headers, .. } = &mut self {
            headers.push((k.to_ascii_lowercase(), v.into()));
        }
        self
    }
    pub fn body(self, body: impl Into<Vec<u8>>) -> Upstream {
        let body = body.into();
        self.chunks(if body.is_empty() { vec![] } else { vec![body] })
    }
    /// The body streamed in these pieces (each reaches the filters as its own data callback).
    pub fn chunks(mut self, pieces: Vec<Vec<u8>>) -> Upstream {
        if let Upstream::Respond { chunks, .. } = &mut self {
            *chunks = pieces;
        }
        self
    }
    pub fn trailer(mut self, k: &str, v: &str) -> Upstream {
        if let Upstream::Respond { trailers, .. } = &mut self {
            trailers.push((k.to_ascii_lowercase(), v.into()));
        }
        self
    }
    /// Answer after `d` of host time (the clock advances; timers and callouts due meanwhile run).
    pub fn delay(mut self, d: Duration) -> Upstream {
        if let Upstream::Respond { delay, .. } = &mut self {
            *delay = d;
        }
        self
    }
}

type UpstreamFn = Box<dyn FnMut(&UpstreamRequest) -> Upstream>;

/// A request to send through the chain.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub headers: HeaderMap,
    pub chunks: Vec<Vec<u8>>,
    pub trailers: HeaderMap,
    pub worker: Option<usize>,
    pub source: Option<String>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            authority: "example.com".into(),
            headers: Vec::new(),
            chunks: Vec::new(),
            trailers: Vec::new(),
            worker: None,
            source: None,
        }
    }
    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }
    pub fn post(path: &str) -> Request {
        Request::new("POST", path)
    }
    pub fn header(mut self, k: &str, v: &str) -> Request {
        self.headers
            .push((k.to_ascii_lowercase().into_bytes(), v.as_bytes().to_vec()));
        self
    }
    /// A header with arbitrary bytes (names are still lower-cased, as Envoy's codec does).
    pub fn header_bytes(mut self, k: &[u8], v: &[u8]) -> Request {
        self.headers.push((k.to_ascii_lowercase(), v.to_vec()));
        self
    }
    pub fn authority(mut self, a: &str) -> Request {
        self.authority = a.into();
        self
    }
    pub fn body(self, body: impl Into<Vec<u8>>) -> Request {
        let body = body.into();
        self.chunks(if body.is_empty() { vec![] } else { vec![body] })
    }
    /// The body streamed in these pieces.
    pub fn chunks(mut self, chunks: Vec<Vec<u8>>) -> Request {
        self.chunks = chunks;
        self
    }
    pub fn trailer(mut self, k: &str, v: &str) -> Request {
        self.trailers
            .push((k.to_ascii_lowercase().into_bytes(), v.as_bytes().to_vec()));
        self
    }
    /// Run on this worker (default: round robin, like new connections in Envoy).
    pub fn worker(mut self, w: usize) -> Request {
        self.worker = Some(w);
        self
    }
    /// The downstream address, `ip:port` (default `127.0.0.1:40000`).
    pub fn from(mut self, addr: &str) -> Request {
        self.source = Some(addr.into());
        self
    }
}

/// What the downstream client got.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    /// Envoy's `response.code_details` (`via_upstream`, a plugin's local reply details, ...).
    pub details: String,
    /// The stream was reset (a plugin closed it) instead of answered.
    pub reset: bool,
    pub worker: usize,
    /// Wasm fuel (≈ instructions) every plugin spent on this stream, callbacks included.
    pub fuel: u64,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::state::header_value(&self.headers, name)
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<non-utf8 body>")
    }
}

/// Identifies a stream started with [`Edge::begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlightId(u64);

/// What one [`Edge::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ran one guest callback (its export name) or the upstream exchange ("upstream").
    Ran(&'static str),
    /// Nothing can run until a continue (callout, timer, queue) arrives.
    Waiting,
    /// The stream is over; [`Edge::finish`] returns its response.
    Done,
}

/// Which part of a direction a callback handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Headers,
    Body,
    Trailers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    NotYet,
    Ready,
    Paused,
    Done,
}

/// Iteration state of one direction across the chain (positions follow `order`).
struct Dir {
    order: Vec<usize>,
    hdr: Vec<Stage>,
    fresh: Vec<bool>,
    eos_in: Vec<bool>,
    eos_told: Vec<bool>,
    buffering: Vec<bool>,
    trl: Vec<Stage>,
    has_body: bool,
    has_trailers: bool,
    source: VecDeque<Vec<u8>>,
    fed_all: bool,
    out: Vec<u8>,
    out_headers: bool,
    out_end: bool,
}

impl Dir {
    fn new(order: Vec<usize>, chunks: Vec<Vec<u8>>, has_trailers: bool) -> Dir {
        let n = order.len();
        let mut d = Dir {
            order,
            hdr: vec![Stage::NotYet; n],
            fresh: vec![false; n],
            eos_in: vec![false; n],
            eos_told: vec![false; n],
            buffering: vec![false; n],
            trl: vec![Stage::NotYet; n],
            has_body: !chunks.is_empty(),
            has_trailers,
            source: chunks.into(),
            fed_all: false,
            out: Vec::new(),
            out_headers: false,
            out_end: false,
        };
        if let Some(h) = d.hdr.first_mut() {
            *h = Stage::Ready;
        } else {
            d.out_headers = true;
        }
        d
    }

    fn headers_end_stream(&self) -> bool {
        !self.has_body && !self.has_trailers
    }

    fn done(&self) -> bool {
        self.out_headers && (self.out_end || self.headers_end_stream())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Request,
    Upstream,
    Response,
    Log,
    Complete,
}

struct Flight {
    worker: usize,
    ex: ExchangeRef,
    contexts: Vec<u32>,
    /// Filters that no longer run for this stream (their VM failed with fail_open).
    skipped: Vec<bool>,
    dirs: [Dir; 2],
    phase: Phase,
    replied: bool,
    reset: bool,
    fuel: u64,
    response: Option<Response>,
}

impl Flight {
    /// The response the client gets, from the exchange as it stands (a reset carries no
    /// status, headers or trailers).
    fn downstream(&self, body: Vec<u8>, reset: bool) -> Response {
        let ex = self.ex.borrow();
        let (status, headers, trailers) = if reset {
            (0, Vec::new(), Vec::new())
        } else {
            (
                header_status(&ex.maps[2]).unwrap_or(0),
                ex.maps[2].clone(),
                ex.maps[3].clone(),
            )
        };
        Response {
            status,
            headers,
            body,
            trailers,
            details: ex.code_details.clone(),
            reset,
            worker: self.worker,
            fuel: 0,
        }
    }
}

/// Builds an [`Edge`]: plugins in chain order, workers, upstream and clusters.
pub struct EdgeBuilder {
    plugins: Vec<Plugin>,
    workers: usize,
    seed: u64,
    start_ns: u64,
    upstream: UpstreamFn,
    clusters: Vec<(String, CalloutHandler)>,
    grpc: Vec<(String, GrpcHandler)>,
    foreign: Vec<(String, ForeignFn)>,
    buffer_limit: usize,
    route_timeout: Duration,
    log_level: LogLevel,
}

impl EdgeBuilder {
    /// Adds a plugin at the end of the chain.
    pub fn plugin(mut self, p: Plugin) -> Self {
        self.plugins.push(p);
        self
    }
    /// Number of worker threads (VMs per plugin) sharing shared data and queues.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }
    /// Seed of `random_get` (and of generated request ids).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Wall-clock time at start, ns since the Unix epoch.
    pub fn start_time_ns(mut self, ns: u64) -> Self {
        self.start_ns = ns;
        self
    }
    /// The upstream's behaviour (default: 200 with body `ok`).
    pub fn upstream(mut self, f: impl FnMut(&UpstreamRequest) -> Upstream + 'static) -> Self {
        self.upstream = Box::new(f);
        self
    }
    /// A cluster plugins may `proxy_http_call`; unknown clusters get BadArgument.
    pub fn cluster(
        mut self,
        name: &str,
        f: impl FnMut(&CalloutRequest) -> CalloutReply + 'static,
    ) -> Self {
        self.clusters.push((name.into(), Box::new(f)));
        self
    }
    /// A gRPC cluster for `proxy_grpc_call` / `proxy_grpc_stream`.
    pub fn grpc_cluster(
        mut self,
        name: &str,
        f: impl FnMut(&GrpcRequest) -> crate::state::GrpcReply + 'static,
    ) -> Self {
        self.grpc.push((name.into(), Box::new(f)));
        self
    }
    /// A function plugins reach with `proxy_call_foreign_function`.
    pub fn foreign(
        mut self,
        name: &str,
        f: impl FnMut(&[u8]) -> Result<Vec<u8>, crate::abi::Status> + 'static,
    ) -> Self {
        self.foreign.push((name.into(), Box::new(f)));
        self
    }
    /// Envoy's per-stream buffer limit (default 1 MiB): over it, 413 or 500.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }
    /// Envoy's route timeout (default 15 s).
    pub fn route_timeout(mut self, d: Duration) -> Self {
        self.route_timeout = d;
        self
    }
    /// The level `proxy_get_log_level` reports (default info).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Starts every VM on every worker: `_initialize`, `proxy_on_context_create` (root),
    /// `proxy_on_vm_start`, `proxy_on_configure`. A rejected configuration is an error carrying
    /// the plugin's logged reason.
    pub fn build(self) -> Result<Edge> {
        let mut shared = HostShared::new(self.seed, self.start_ns);
        shared.buffer_limit = self.buffer_limit;
        shared.log_level = self.log_level;
        shared.clusters.extend(self.clusters);
        shared.grpc_clusters.extend(self.grpc);
        shared.foreign.extend(self.foreign);
        let host = Rc::new(RefCell::new(shared));
        let plugins: Vec<Rc<PluginInfo>> = self
            .plugins
            .iter()
            .map(|p| Rc::new(p.info.clone()))
            .collect();
        let mut workers = Vec::new();
        for w in 0..self.workers {
            let mut vms = Vec::new();
            for (i, p) in self.plugins.iter().enumerate() {
                let me = VmRef {
                    worker: w,
                    plugin: i,
                };
                vms.push(Vm::start(&p.module, host.clone(), me, plugins[i].clone())?);
            }
            workers.push(vms);
        }
        let mut edge = Edge {
            host,
            plugins,
            workers,
            upstream: self.upstream,
            upstream_log: Vec::new(),
            flights: HashMap::new(),
            owners: HashMap::new(),
            next_flight: 1,
            next_worker: 0,
            route_timeout: self.route_timeout,
        };
        edge.apply_all_effects();
        Ok(edge)
    }
}

/// A proxy-wasm host that behaves like Envoy: plugins chained on N workers in front of an
/// emulated upstream, with one shared-data store, queue set, clock and metric set.
pub struct Edge {
    host: Rc<RefCell<HostShared>>,
    plugins: Vec<Rc<PluginInfo>>,
    workers: Vec<Vec<Vm>>,
    upstream: UpstreamFn,
    upstream_log: Vec<UpstreamRequest>,
    flights: HashMap<u64, Flight>,
    owners: HashMap<(usize, usize, u32), u64>,
    next_flight: u64,
    next_worker: usize,
    route_timeout: Duration,
}

impl Edge {
    /// Starts describing an edge; `.build()` loads every plugin.
    #[allow(clippy::new_ret_no_self)]
    pub fn builder() -> EdgeBuilder {
        EdgeBuilder {
            plugins: Vec::new(),
            workers: 1,
            seed: 1,
            start_ns: 1_767_225_600_000_000_000, // 2026-01-01T00:00:00Z
            upstream: Box::new(|_| Upstream::ok("ok")),
            clusters: Vec::new(),
            grpc: Vec::new(),
            foreign: Vec::new(),
            buffer_limit: 1024 * 1024,
            route_timeout: Duration::from_secs(15),
            log_level: LogLevel::Info,
        }
    }

    /// Sends a request through the whole lifecycle and returns the downstream response:
    /// `proxy_on_context_create`, `proxy_on_request_headers|body|trailers` in chain order, the
    /// upstream, `proxy_on_response_headers|body|trailers` in reverse, then `proxy_on_log`,
    /// `proxy_on_done`, `proxy_on_delete`. Runs due events (`proxy_on_http_call_response`,
    /// `proxy_on_tick`, `proxy_on_queue_ready`, gRPC callbacks) first and whenever the stream
    /// waits on a pause.
    pub fn send(&mut self, req: Request) -> Result<Response> {
        self.run_pending()?;
        let id = self.begin(req)?;
        self.finish(id)
    }

    /// Shorthand for `send(Request::get(path))`.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.send(Request::get(path))
    }

    /// Creates a stream without running any callback: drive it with [`Edge::step`] to
    /// interleave streams of different workers at callback boundaries.
    pub fn begin(&mut self, req: Request) -> Result<FlightId> {
        let n = self.plugins.len();
        let worker = match req.worker {
            Some(w) if w < self.workers.len() => w,
            Some(w) => bail!("no worker {w}: the edge has {}", self.workers.len()),
            None => {
                let w = self.next_worker % self.workers.len();
                self.next_worker += 1;
                w
            }
        };
        let id = self.next_flight;
        self.next_flight += 1;
        let mut headers: HeaderMap = vec![
            (b":authority".to_vec(), req.authority.clone().into_bytes()),
            (b":path".to_vec(), req.path.clone().into_bytes()),
            (b":method".to_vec(), req.method.clone().into_bytes()),
            (b":scheme".to_vec(), b"http".to_vec()),
        ];
        headers.extend(req.headers.iter().cloned());
        if !headers.iter().any(|(k, _)| k == b"x-request-id") {
            let mut r = [0u8; 16];
            self.host.borrow_mut().rng.fill(&mut r);
            headers.push((b"x-request-id".to_vec(), uuid(&r).into_bytes()));
        }
        headers.push((b"x-forwarded-proto".to_vec(), b"http".to_vec()));
        let ex = Exchange {
            maps: [headers, req.trailers.clone(), Vec::new(), Vec::new()],
            data: [vec![Vec::new(); n], vec![Vec::new(); n]],
            peer: Peer {
                source: req
                    .source
                    .clone()
                    .unwrap_or_else(|| "127.0.0.1:40000".into()),
                destination: "127.0.0.1:10000".into(),
            },
            start_ns: self.host.borrow().realtime_ns,
            response_code: None,
            code_details: String::new(),
            response_flags: 0,
            properties: HashMap::new(),
            request_bytes: req.chunks.iter().map(|c| c.len() as u64).sum(),
            response_bytes: 0,
            protocol: "HTTP/1.1".into(),
            connection_id: id,
        };
        let order: Vec<usize> = (0..n).collect();
        let request_dir = Dir::new(order, req.chunks.clone(), !req.trailers.is_empty());
        let flight = Flight {
            worker,
            ex: Rc::new(RefCell::new(ex)),
            contexts: vec![0; n],
            skipped: (0..n)
                .map(|p| self.workers[worker][p].store.data().failed && self.plugins[p].fail_open)
                .collect(),
            dirs: [request_dir, Dir::new(Vec::new(), Vec::new(), false)],
            phase: Phase::Request,
            replied: false,
            reset: false,
            fuel: 0,
            response: None,
        };
        self.flights.insert(id, flight);
        Ok(FlightId(id))
    }

    /// Runs the next single callback of a stream (one `proxy_on_*` export of one filter, or
    /// the upstream exchange) and says which; streams of different workers can be interleaved.
    pub fn step(&mut self, id: FlightId) -> Result<Step> {
        loop {
            let Some(f) = self.flights.get(&id.0) else {
                bail!("unknown stream {id:?}");
            };
            match f.phase {
                Phase::Request | Phase::Response => {
                    let dir = if f.phase == Phase::Request { REQ } else { RESP };
                    if let Some(name) = self.pump(id.0, dir)? {
                        return Ok(Step::Ran(name));
                    }
                    let f = self.flight(id.0)?;
                    if f.phase == Phase::Request || f.phase == Phase::Response {
                        let d = &mut f.dirs[dir];
                        if feed(d, &f.ex, dir) {
                            continue;
                        }
                        if d.done() {
                            f.phase = if dir == REQ {
                                Phase::Upstream
                            } else {
                                Phase::Log
                            };
                            continue;
                        }
                        return Ok(Step::Waiting);
                    }
                }
                Phase::Upstream => {
                    self.exchange_upstream(id.0)?;
                    return Ok(Step::Ran("upstream"));
                }
                Phase::Log => {
                    self.end_stream(id.0)?;
                    return Ok(Step::Ran("proxy_on_log"));
                }
                Phase::Complete => return Ok(Step::Done),
            }
        }
    }

    /// Runs `a` on worker 0 and `b` on worker 1 one callback at a time, `next(n)` choosing
    /// which (0 or 1) runs the n-th step (a stream with no callback left yields to the
    /// other), then finishes both: how races between workers are staged.
    pub fn interleave(
        &mut self,
        a: Request,
        b: Request,
        mut next: impl FnMut(usize) -> usize,
    ) -> Result<[Response; 2]> {
        let ids = [self.begin(a.worker(0))?, self.begin(b.worker(1))?];
        let mut idle = [false, false];
        let mut n = 0;
        while !(idle[0] && idle[1]) {
            let k = next(n).min(1);
            n += 1;
            let which = if idle[k] { 1 - k } else { k };
            if !matches!(self.step(ids[which])?, Step::Ran(_)) {
                idle[which] = true;
            }
        }
        let [x, y] = ids;
        Ok([self.finish(x)?, self.finish(y)?])
    }

    /// Drives a stream to its end (running events while it waits) and returns its response.
    pub fn finish(&mut self, id: FlightId) -> Result<Response> {
        let mut waited_ns = 0u64;
        loop {
            match self.step(id)? {
                Step::Ran(_) => {}
                Step::Done => break,
                Step::Waiting => {
                    let before = self.host.borrow().monotonic_ns;
                    if !self.run_next_event()? || waited_ns > 300_000_000_000 {
                        bail!(
                            "stream stalled: a plugin paused it and nothing continues it\n{}",
                            self.describe(id.0)
                        );
                    }
                    waited_ns += self.host.borrow().monotonic_ns - before;
                }
            }
        }
        self.take_response(id.0)
    }

    /// Forgets an ended stream and hands back its response.
    fn take_response(&mut self, id: u64) -> Result<Response> {
        let f = self
            .flights
            .remove(&id)
            .ok_or_else(|| anyhow::anyhow!("unknown stream"))?;
        self.owners.retain(|_, v| *v != id);
        f.response
            .ok_or_else(|| anyhow::anyhow!("stream ended without a response"))
    }

    /// The client goes away (or the upstream resets mid-response): the stream ends where it
    /// stands, and as in Envoy every filter that saw it gets `proxy_on_log`, `proxy_on_done`
    /// and `proxy_on_delete`, with no further header or body callbacks.
    pub fn reset(&mut self, id: FlightId) -> Result<Response> {
        let f = self.flight(id.0)?;
        if f.phase != Phase::Complete {
            f.reset = true;
            self.end_stream(id.0)?;
        }
        self.take_response(id.0)
    }

    // ---- time and events --------------------------------------------------------------

    /// Moves the host clock forward, running in time order what falls due: `proxy_on_tick`,
    /// `proxy_on_http_call_response`, `proxy_on_queue_ready`, `proxy_on_grpc_receive|close`.
    pub fn advance(&mut self, d: Duration) -> Result<()> {
        let target = self.host.borrow().monotonic_ns + d.as_nanos() as u64;
        while let Some(due) = self.next_due() {
            if due > target {
                break;
            }
            self.run_next_event()?;
        }
        let mut host = self.host.borrow_mut();
        let now = host.monotonic_ns;
        if target > now {
            host.realtime_ns += target - now;
            host.monotonic_ns = target;
        }
        Ok(())
    }

    /// Delivers every event already due (no clock movement).
    pub fn run_pending(&mut self) -> Result<()> {
        let now = self.host.borrow().monotonic_ns;
        while let Some(due) = self.next_due() {
            if due > now {
                break;
            }
            self.run_next_event()?;
        }
        Ok(())
    }

    fn next_due(&self) -> Option<u64> {
        let events = self.host.borrow().events.iter().map(|e| e.due_ns).min();
        let ticks = self
            .workers
            .iter()
            .flatten()
            .filter(|vm| !vm.store.data().failed)
            .filter_map(|vm| vm.store.data().next_tick_ns)
            .min();
        match (events, ticks) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the earliest event, moving the clock to it. `false` when nothing is scheduled.
    fn run_next_event(&mut self) -> Result<bool> {
        let Some(due) = self.next_due() else {
            return Ok(false);
        };
        {
            let mut host = self.host.borrow_mut();
            if due > host.monotonic_ns {
                let dt = due - host.monotonic_ns;
                host.realtime_ns += dt;
                host.monotonic_ns = due;
            }
        }
        let event = {
            let mut host = self.host.borrow_mut();
            let best = host
                .events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.due_ns <= due)
                .min_by_key(|(_, e)| (e.due_ns, e.seq))
                .map(|(i, _)| i);
            best.map(|i| host.events.remove(i))
        };
        match event {
            Some(e) => self.deliver(e.target, e.kind)?,
            None => {
                // A tick: fire every root context whose timer is due.
                let mut due_vms = Vec::new();
                for (w, vms) in self.workers.iter().enumerate() {
                    for (p, vm) in vms.iter().enumerate() {
                        let s = vm.store.data();
                        if !s.failed && s.next_tick_ns.is_some_and(|t| t <= due) {
                            due_vms.push((w, p));
                        }
                    }
                }
                for (w, p) in due_vms {
                    let vm = &mut self.workers[w][p];
                    let s = vm.store.data_mut();
                    s.next_tick_ns = Some(due + s.tick_period_ms.max(1) * 1_000_000);
                    let root = s.root_context;
                    let _ = vm.call("proxy_on_tick", root, &[root]);
                    self.apply_effects(w, p);
                }
            }
        }
        Ok(true)
    }

    fn deliver(&mut self, (vm_ref, context): (VmRef, u32), kind: EventKind) -> Result<()> {
        let (w, p) = (vm_ref.worker, vm_ref.plugin);
        let vm = &mut self.workers[w][p];
        match kind {
            EventKind::QueueReady { queue } => {
                let _ = vm.call("proxy_on_queue_ready", context, &[context, queue]);
            }
            EventKind::Callout { token, reply } => {
                vm.store.data_mut().http_calls.remove(&token);
                let (headers, body, trailers, status) = match reply {
                    CalloutReply::Response {
                        headers,
                        body,
                        trailers,
                        ..
                    } => (Some(headers), body, Some(trailers), (0, Vec::new())),
                    // Envoy 1.40 answers a refused or reset callout with its own 503 reply, not
                    // with a failure (seen in the real-Envoy rig).
                    CalloutReply::Fail { .. } => (
                        Some(vec![
                            (b":status".to_vec(), b"503".to_vec()),
                            (b"content-type".to_vec(), b"text/plain".to_vec()),
                        ]),
                        b"upstream connect error or disconnect/reset before headers. reset reason: connection failure".to_vec(),
                        Some(Vec::new()),
                        (0, Vec::new()),
                    ),
                    CalloutReply::Hang => (
                        Some(vec![
                            (b":status".to_vec(), b"504".to_vec()),
                            (b"content-type".to_vec(), b"text/plain".to_vec()),
                        ]),
                        b"upstream request timeout".to_vec(),
                        Some(Vec::new()),
                        (0, Vec::new()),
                    ),
                };
                let nh = headers.as_ref().map_or(0, Vec::len) as u32;
                let nt = trailers.as_ref().map_or(0, Vec::len) as u32;
                let body_len = body.len() as u32;
                {
                    let s = vm.store.data_mut();
                    s.status = status;
                    s.buffers.call_headers = headers;
                    s.buffers.call_trailers = trailers;
                    s.buffers.call_body = Some(body);
                }
                let _ = vm.call(
                    "proxy_on_http_call_response",
                    context,
                    &[context, token, nh, body_len, nt],
                );
                let s = vm.store.data_mut();
                s.buffers.call_headers = None;
                s.buffers.call_trailers = None;
                s.buffers.call_body = None;
            }
            EventKind::Grpc { token, reply } => {
                let s = vm.store.data_mut();
                if !s.grpc.contains_key(&token) {
                    return Ok(());
                }
                if reply.status == 0 {
                    let len = reply.message.len() as u32;
                    s.buffers.grpc_message = Some(reply.message);
                    let _ = vm.call("proxy_on_grpc_receive", context, &[context, token, len]);
                    vm.store.data_mut().buffers.grpc_message = None;
                } else {
                    s.grpc.remove(&token);
                    s.status = (reply.status, reply.message);
                    let _ = vm.call(
                        "proxy_on_grpc_close",
                        context,
                        &[context, token, reply.status],
                    );
                }
            }
        }
        self.apply_effects(w, p);
        Ok(())
    }

    // ---- the filter-chain driver ------------------------------------------------------

    fn flight(&mut self, id: u64) -> Result<&mut Flight> {
        self.flights
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("unknown stream {id}"))
    }

    /// Runs at most one callback of `dir` for the stream; `None` when nothing can run now.
    fn pump(&mut self, id: u64, dir: usize) -> Result<Option<&'static str>> {
        let limit = self.host.borrow().buffer_limit;
        let f = self.flight(id)?;
        let n = f.dirs[dir].order.len();
        for pos in 0..n {
            let d = &f.dirs[dir];
            let filter = d.order[pos];
            if d.hdr[pos] == Stage::Ready {
                let eos = d.headers_end_stream();
                let name = if dir == REQ {
                    "proxy_on_request_headers"
                } else {
                    "proxy_on_response_headers"
                };
                let count = f.ex.borrow().maps[if dir == REQ { 0 } else { 2 }].len() as u32;
                self.run_filter(id, dir, pos, name, &[count, u32::from(eos)])?;
                return Ok(Some(name));
            }
            if d.hdr[pos] != Stage::Done {
                return Ok(None);
            }
            if d.has_body && (d.fresh[pos] || (d.eos_in[pos] && !d.eos_told[pos])) {
                let len = f.ex.borrow().data[dir][filter].len();
                if d.buffering[pos] && len > limit {
                    self.overflow(id, dir, pos)?;
                    return Ok(Some("buffer limit"));
                }
                let eos = d.eos_in[pos] && !d.has_trailers;
                let name = if dir == REQ {
                    "proxy_on_request_body"
                } else {
                    "proxy_on_response_body"
                };
                self.run_filter(id, dir, pos, name, &[len as u32, u32::from(eos)])?;
                return Ok(Some(name));
            }
            if d.buffering[pos] || (d.has_body && !d.eos_in[pos]) {
                return Ok(None);
            }
            if d.has_trailers {
                match d.trl[pos] {
                    Stage::Ready => {
                        let name = if dir == REQ {
                            "proxy_on_request_trailers"
                        } else {
                            "proxy_on_response_trailers"
                        };
                        let count = f.ex.borrow().maps[if dir == REQ { 1 } else { 3 }].len() as u32;
                        self.run_filter(id, dir, pos, name, &[count])?;
                        return Ok(Some(name));
                    }
                    Stage::Done => {}
                    _ => return Ok(None),
                }
            }
        }
        Ok(None)
    }

    /// Runs one stream callback of the filter at `pos` and applies its result and effects.
    fn run_filter(
        &mut self,
        id: u64,
        dir: usize,
        pos: usize,
        name: &'static str,
        args: &[u32],
    ) -> Result<()> {
        let f = self.flight(id)?;
        let filter = f.dirs[dir].order[pos];
        let worker = f.worker;
        let kind = match name {
            "proxy_on_request_headers" | "proxy_on_response_headers" => Part::Headers,
            "proxy_on_request_body" | "proxy_on_response_body" => Part::Body,
            _ => Part::Trailers,
        };
        if f.skipped[filter] {
            self.advance_filter(id, dir, pos, kind, true)?;
            return Ok(());
        }
        let failed = self.workers[worker][filter].store.data().failed;
        if failed {
            // A failed VM without fail_open answers every stream with 503.
            self.fail_stream(id, dir, pos)?;
            return Ok(());
        }
        let ctx = self.ensure_context(id, filter)?;
        let map_index = match (dir, kind) {
            (REQ, Part::Trailers) => 1,
            (REQ, _) => 0,
            (_, Part::Trailers) => 3,
            _ => 2,
        };
        {
            let vm = &mut self.workers[worker][filter];
            let b = vm
                .store
                .data_mut()
                .bindings
                .get_mut(&ctx)
                .ok_or_else(|| anyhow::anyhow!("missing binding"))?;
            match kind {
                Part::Body => b.body = Some(dir),
                Part::Headers | Part::Trailers => b.open[map_index] = true,
            }
        }
        let mut call_args = vec![ctx];
        call_args.extend_from_slice(args);
        let out = self.workers[worker][filter].call(name, ctx, &call_args);
        let fuel = self.workers[worker][filter].last_fuel;
        self.flight(id)?.fuel += fuel;
        match out {
            Outcome::Trapped(_) => {
                if self.plugins[filter].fail_open {
                    self.flight(id)?.skipped[filter] = true;
                    self.advance_filter(id, dir, pos, kind, true)?;
                } else {
                    self.fail_stream(id, dir, pos)?;
                }
                self.apply_effects(worker, filter);
            }
            Outcome::Returned(r) => {
                // A local reply forces the callback to stop, whatever it returned.
                let replied = self.workers[worker][filter]
                    .store
                    .data()
                    .effects
                    .iter()
                    .any(|e| matches!(e, Effect::LocalReply { .. }));
                let go = !replied && r.unwrap_or(action::CONTINUE) == action::CONTINUE;
                self.advance_filter(id, dir, pos, kind, go)?;
                self.apply_effects(worker, filter);
            }
        }
        Ok(())
    }

    /// Moves the direction's iteration past the callback just run (`go`) or stops it there.
    fn advance_filter(
        &mut self,
        id: u64,
        dir: usize,
        pos: usize,
        kind: Part,
        go: bool,
    ) -> Result<()> {
        let f = self.flight(id)?;
        let worker = f.worker;
        let filter = f.dirs[dir].order[pos];
        let ctx = f.contexts[filter];
        let ex = f.ex.clone();
        let d = &mut f.dirs[dir];
        match kind {
            Part::Headers => {
                if go {
                    d.hdr[pos] = Stage::Done;
                    pass_headers(d, pos);
                } else {
                    d.hdr[pos] = Stage::Paused;
                }
            }
            Part::Body => {
                d.fresh[pos] = false;
                if d.eos_in[pos] {
                    d.eos_told[pos] = true;
                }
                if go {
                    d.buffering[pos] = false;
                    pass_data(d, &ex, dir, pos);
                } else {
                    d.buffering[pos] = true;
                }
            }
            Part::Trailers => {
                if go {
                    d.trl[pos] = Stage::Done;
                    pass_trailers(d, pos);
                } else {
                    d.trl[pos] = Stage::Paused;
                }
            }
        }
        let (hdr_done, buffering) = (d.hdr[pos] == Stage::Done, d.buffering[pos]);
        // Envoy lets go of the header map once the filter continues past its headers.
        if ctx != 0 {
            if let Some(b) = self.workers[worker][filter]
                .store
                .data_mut()
                .bindings
                .get_mut(&ctx)
            {
                let (h, t) = if dir == REQ { (0, 1) } else { (2, 3) };
                if hdr_done {
                    b.open[h] = false;
                }
                if kind == Part::Trailers && go {
                    b.open[t] = false;
                }
                if kind == Part::Body && !buffering {
                    b.body = None;
                }
            }
        }
        Ok(())
    }

    fn ensure_context(&mut self, id: u64, filter: usize) -> Result<u32> {
        let f = self.flight(id)?;
        if f.contexts[filter] != 0 {
            return Ok(f.contexts[filter]);
        }
        let worker = f.worker;
        let ex = f.ex.clone();
        let vm = &mut self.workers[worker][filter];
        let s = vm.store.data_mut();
        let ctx = s.next_context;
        s.next_context += 1;
        let root = s.root_context;
        s.bindings.insert(
            ctx,
            Binding {
                exchange: ex,
                filter,
                open: [false; 4],
                body: None,
                log_phase: false,
            },
        );
        let _ = vm.call("proxy_on_context_create", ctx, &[ctx, root]);
        let fuel = vm.last_fuel;
        self.owners.insert((worker, filter, ctx), id);
        let f = self.flight(id)?;
        f.contexts[filter] = ctx;
        f.fuel += fuel;
        Ok(ctx)
    }

    /// Envoy's failStream: a 503 local reply with details `wasm_fail_stream`.
    fn fail_stream(&mut self, id: u64, dir: usize, pos: usize) -> Result<()> {
        let f = self.flight(id)?;
        let filter = f.dirs[dir].order[pos];
        f.skipped[filter] = true;
        let reply = LocalReply {
            status: 503,
            details: details::WASM_FAIL.into(),
            body: Vec::new(),
            headers: Vec::new(),
            grpc_status: -1,
        };
        self.local_reply(id, dir, filter, reply, 0)
    }

    fn overflow(&mut self, id: u64, dir: usize, pos: usize) -> Result<()> {
        let f = self.flight(id)?;
        let filter = f.dirs[dir].order[pos];
        let (status, det, body) = if dir == REQ {
            (413, details::REQUEST_TOO_LARGE, "Payload Too Large")
        } else {
            (500, details::RESPONSE_TOO_LARGE, "Internal Server Error")
        };
        let reply = LocalReply {
            status,
            details: det.into(),
            body: body.as_bytes().to_vec(),
            headers: Vec::new(),
            grpc_status: -1,
        };
        self.local_reply(id, dir, filter, reply, 0)
    }

    /// A local reply from `filter`. During the request it travels the response path from that
    /// filter back to the first; once the response has started it replaces it directly.
    fn local_reply(
        &mut self,
        id: u64,
        dir: usize,
        filter: usize,
        reply: LocalReply,
        flags: u64,
    ) -> Result<()> {
        let host = self.host.clone();
        let f = self
            .flights
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("unknown stream {id}"))?;
        if f.phase == Phase::Log || f.phase == Phase::Complete {
            return Ok(());
        }
        // Envoy answers a HEAD request with the reply's headers only (content-length kept):
        // no filter sees its body, and neither does the client.
        let head = crate::state::header_value(&f.ex.borrow().maps[0], ":method") == Some("HEAD");
        let mut headers: HeaderMap =
            vec![(b":status".to_vec(), reply.status.to_string().into_bytes())];
        headers.extend(reply.headers.iter().cloned());
        if !reply.body.is_empty() {
            if !headers.iter().any(|(k, _)| k == b"content-type") {
                headers.push((b"content-type".to_vec(), b"text/plain".to_vec()));
            }
            headers.push((
                b"content-length".to_vec(),
                reply.body.len().to_string().into_bytes(),
            ));
        }
        {
            let mut ex = f.ex.borrow_mut();
            ex.response_code = Some(reply.status);
            ex.code_details = reply.details.clone();
            ex.response_flags = flags;
            ex.response_bytes = reply.body.len() as u64;
        }
        if f.replied && dir == REQ {
            host.borrow_mut().misuse.push(format!(
                "stream {id}: a second local reply from plugin {filter}"
            ));
        }
        if dir == RESP || f.replied {
            // Response already under way: Envoy sends the reply straight to the client.
            {
                let mut ex = f.ex.borrow_mut();
                ex.maps[2] = headers;
                ex.maps[3].clear();
            }
            let body = if head { Vec::new() } else { reply.body };
            f.response = Some(f.downstream(body, false));
            f.phase = Phase::Log;
            return Ok(());
        }
        f.replied = true;
        f.ex.borrow_mut().maps[2] = headers;
        let order: Vec<usize> = (0..=filter).rev().collect();
        let chunks = if reply.body.is_empty() || head {
            vec![]
        } else {
            vec![reply.body]
        };
        f.dirs[RESP] = Dir::new(order, chunks, false);
        f.phase = Phase::Response;
        self.close_request_maps(id)?;
        Ok(())
    }

    /// When a request ends early, no filter may touch the request maps any more.
    fn close_request_maps(&mut self, id: u64) -> Result<()> {
        let f = self.flight(id)?;
        let worker = f.worker;
        let ctxs = f.contexts.clone();
        for (filter, ctx) in ctxs.into_iter().enumerate() {
            if ctx == 0 {
                continue;
            }
            if let Some(b) = self.workers[worker][filter]
                .store
                .data_mut()
                .bindings
                .get_mut(&ctx)
            {
                b.open[0] = false;
                b.open[1] = false;
                if b.body == Some(REQ) {
                    b.body = None;
                }
            }
        }
        Ok(())
    }

    fn exchange_upstream(&mut self, id: u64) -> Result<()> {
        let f = self.flight(id)?;
        let worker = f.worker;
        let req = {
            let ex = f.ex.borrow();
            UpstreamRequest {
                headers: ex.maps[0].clone(),
                body: f.dirs[REQ].out.clone(),
                trailers: ex.maps[1].clone(),
                worker,
            }
        };
        self.upstream_log.push(req.clone());
        let answer = (self.upstream)(&req);
        let n = self.plugins.len();
        let order: Vec<usize> = (0..n).rev().collect();
        let timeout = self.route_timeout;
        let (status, headers, chunks, trailers, det, flags_set) = match answer {
            Upstream::Respond {
                status,
                headers,
                chunks,
                trailers,
                delay,
            } if delay < timeout => {
                if !delay.is_zero() {
                    self.advance(delay)?;
                }
                (status, headers, chunks, trailers, details::VIA_UPSTREAM, 0)
            }
            Upstream::Respond { .. } | Upstream::Hang => {
                self.advance(timeout)?;
                let body = b"upstream request timeout".to_vec();
                (
                    504,
                    text_headers(&body),
                    vec![body],
                    vec![],
                    details::TIMEOUT,
                    flags::UPSTREAM_REQUEST_TIMEOUT,
                )
            }
            Upstream::Reset => {
                let body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination".to_vec();
                (
                    503,
                    text_headers(&body),
                    vec![body],
                    vec![],
                    details::RESET,
                    flags::UPSTREAM_CONNECTION_TERMINATION,
                )
            }
            Upstream::Refused => {
                let body = b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure".to_vec();
                (
                    503,
                    text_headers(&body),
                    vec![body],
                    vec![],
                    details::REFUSED,
                    flags::UPSTREAM_CONNECTION_FAILURE,
                )
            }
        };
        // A response to HEAD has no body (the upstream codec reads none, and Envoy's own
        // replies send headers only): filters get the headers with end of stream.
        let (chunks, trailers) = if req.method() == "HEAD" {
            (Vec::new(), Vec::new())
        } else {
            (chunks, trailers)
        };
        let f = self.flight(id)?;
        if f.phase != Phase::Upstream {
            return Ok(()); // a plugin replied while the clock moved
        }
        let mut map: HeaderMap = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        map.extend(
            headers
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes())),
        );
        {
            let mut ex = f.ex.borrow_mut();
            ex.maps[2] = map;
            ex.maps[3] = trailers
                .iter()
                .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes()))
                .collect();
            ex.response_code = Some(status);
            ex.code_details = det.into();
            ex.response_flags = flags_set;
            ex.response_bytes = chunks.iter().map(|c| c.len() as u64).sum();
        }
        f.dirs[RESP] = Dir::new(order, chunks, !trailers.is_empty());
        f.phase = Phase::Response;
        self.close_request_maps(id)?;
        Ok(())
    }

    /// Access-log phase then teardown: on_log for each filter, then on_done and on_delete.
    fn end_stream(&mut self, id: u64) -> Result<()> {
        let f = self.flight(id)?;
        let worker = f.worker;
        if f.response.is_none() {
            let body = std::mem::take(&mut f.dirs[RESP].out);
            f.response = Some(f.downstream(body, f.reset));
        }
        let ctxs = f.contexts.clone();
        for (filter, ctx) in ctxs.iter().enumerate() {
            if *ctx == 0 || self.workers[worker][filter].store.data().failed {
                continue;
            }
            let vm = &mut self.workers[worker][filter];
            if let Some(b) = vm.store.data_mut().bindings.get_mut(ctx) {
                b.log_phase = true;
                b.open = [false; 4];
                b.body = None;
            }
            let _ = vm.call("proxy_on_log", *ctx, &[*ctx]);
            let fuel = vm.last_fuel;
            self.flight(id)?.fuel += fuel;
            self.apply_effects(worker, filter);
        }
        for (filter, ctx) in ctxs.iter().enumerate() {
            if *ctx == 0 {
                continue;
            }
            let vm = &mut self.workers[worker][filter];
            if !vm.store.data().failed {
                let _ = vm.call("proxy_on_done", *ctx, &[*ctx]);
                let _ = vm.call("proxy_on_delete", *ctx, &[*ctx]);
            }
            vm.store.data_mut().bindings.remove(ctx);
            let _ = vm.store.data_mut().effects.drain(..);
        }
        let f = self.flight(id)?;
        let fuel = f.fuel;
        if let Some(r) = f.response.as_mut() {
            r.fuel = fuel;
        }
        f.phase = Phase::Complete;
        Ok(())
    }

    fn apply_all_effects(&mut self) {
        for w in 0..self.workers.len() {
            for p in 0..self.plugins.len() {
                self.apply_effects(w, p);
            }
        }
    }

    /// Acts on what the last callback of VM (w, p) asked for: continue, close, local reply.
    fn apply_effects(&mut self, w: usize, p: usize) {
        let effects: Vec<Effect> = self.workers[w][p]
            .store
            .data_mut()
            .effects
            .drain(..)
            .collect();
        for e in effects {
            let ctx = match &e {
                Effect::Continue { context, .. }
                | Effect::Close { context, .. }
                | Effect::LocalReply { context, .. }
                | Effect::Done { context } => *context,
            };
            let Some(&id) = self.owners.get(&(w, p, ctx)) else {
                continue;
            };
            let _ = self.apply_effect(id, p, e);
        }
    }

    fn apply_effect(&mut self, id: u64, filter: usize, e: Effect) -> Result<()> {
        let f = self.flight(id)?;
        match e {
            Effect::Continue { dir, .. } => {
                let active = match f.phase {
                    Phase::Request => dir == REQ,
                    Phase::Response => dir == RESP,
                    _ => false,
                };
                if !active {
                    return Ok(());
                }
                let Some(pos) = f.dirs[dir].order.iter().position(|x| *x == filter) else {
                    return Ok(());
                };
                let d = &f.dirs[dir];
                if d.hdr[pos] == Stage::Paused {
                    self.advance_filter(id, dir, pos, Part::Headers, true)?;
                    let f = self.flight(id)?;
                    let d = &mut f.dirs[dir];
                    // Data held behind the paused headers now reaches this filter.
                    if !f.ex.borrow().data[dir][filter].is_empty() {
                        d.fresh[pos] = true;
                    }
                } else if d.buffering[pos] {
                    let ex = f.ex.clone();
                    let d = &mut f.dirs[dir];
                    d.buffering[pos] = false;
                    pass_data(d, &ex, dir, pos);
                    self.release_body(id, filter)?;
                } else if d.trl[pos] == Stage::Paused {
                    self.advance_filter(id, dir, pos, Part::Trailers, true)?;
                }
            }
            Effect::Close { .. } => {
                if matches!(f.phase, Phase::Log | Phase::Complete) {
                    return Ok(());
                }
                f.reset = true;
                {
                    // Envoy names the reset unless something already explained the stream.
                    let mut ex = f.ex.borrow_mut();
                    if ex.code_details.is_empty() {
                        ex.code_details = details::WASM_CLOSE.into();
                    }
                }
                f.response = Some(f.downstream(Vec::new(), true));
                f.phase = Phase::Log;
            }
            Effect::LocalReply { reply, .. } => {
                let dir = if f.phase == Phase::Response {
                    RESP
                } else {
                    REQ
                };
                self.local_reply(id, dir, filter, reply, 0)?;
            }
            Effect::Done { .. } => {}
        }
        Ok(())
    }

    /// The filter let its buffered body go: Envoy no longer shows it that buffer.
    fn release_body(&mut self, id: u64, filter: usize) -> Result<()> {
        let f = self.flight(id)?;
        let (worker, ctx) = (f.worker, f.contexts[filter]);
        if let Some(b) = self.workers[worker][filter]
            .store
            .data_mut()
            .bindings
            .get_mut(&ctx)
        {
            b.body = None;
        }
        Ok(())
    }

    fn describe(&self, id: u64) -> String {
        let Some(f) = self.flights.get(&id) else {
            return String::new();
        };
        let mut out = format!("phase {:?}", f.phase);
        for (dir, name) in [(REQ, "request"), (RESP, "response")] {
            let d = &f.dirs[dir];
            for (pos, filter) in d.order.iter().enumerate() {
                let plugin = &self.plugins[*filter].name;
                if d.hdr[pos] == Stage::Paused {
                    out += &format!("; {plugin} paused the {name} headers");
                }
                if d.buffering[pos] && d.eos_told[pos] {
                    out += &format!("; {plugin} holds the whole {name} body");
                }
            }
        }
        out
    }

    // ---- inspection -------------------------------------------------------------------

    /// Every request the upstream received, in order.
    pub fn upstream_requests(&self) -> &[UpstreamRequest] {
        &self.upstream_log
    }

    /// Forgets the recorded upstream requests and log lines, so a long run (a flood of a
    /// million requests) keeps constant memory.
    pub fn clear_records(&mut self) {
        self.upstream_log.clear();
        self.host.borrow_mut().logs.clear();
    }

    /// Replaces the upstream's behaviour.
    pub fn set_upstream(&mut self, f: impl FnMut(&UpstreamRequest) -> Upstream + 'static) {
        self.upstream = Box::new(f);
    }

    /// Replaces (or adds) a callout cluster's behaviour.
    pub fn set_cluster(
        &mut self,
        name: &str,
        f: impl FnMut(&CalloutRequest) -> CalloutReply + 'static,
    ) {
        self.host
            .borrow_mut()
            .clusters
            .insert(name.into(), Box::new(f));
    }

    /// Every `proxy_http_call` request plugins made, in order.
    pub fn callouts(&self) -> Vec<CalloutRequest> {
        self.host.borrow().callouts.clone()
    }

    /// Every gRPC message plugins sent.
    pub fn grpc_sent(&self) -> Vec<GrpcRequest> {
        self.host.borrow().grpc_sent.clone()
    }

    /// Everything plugins logged.
    pub fn logs(&self) -> Vec<LogRecord> {
        self.host.borrow().logs.clone()
    }

    /// True when some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.host
            .borrow()
            .logs
            .iter()
            .any(|l| l.message.contains(needle))
    }

    /// A metric's value by the name the plugin defined (Envoy: `wasmcustom.<name>`).
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.host
            .borrow()
            .metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }

    /// Samples recorded into a histogram.
    pub fn histogram(&self, name: &str) -> Vec<u64> {
        self.host
            .borrow()
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .flat_map(|m| m.samples.clone())
            .collect()
    }

    /// A shared-data value and its cas, in the scope of `vm_id`.
    pub fn shared_data(&self, vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.host
            .borrow()
            .shared_data
            .get(vm_id)
            .and_then(|m| m.get(key))
            .cloned()
    }

    /// Every shared-data key in the scope of `vm_id` with the size of its value, sorted: how
    /// a test checks what a plugin keeps, not what the plugin says it keeps.
    pub fn shared_data_sizes(&self, vm_id: &str) -> Vec<(Vec<u8>, usize)> {
        let host = self.host.borrow();
        let mut out: Vec<(Vec<u8>, usize)> = host
            .shared_data
            .get(vm_id)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.len())).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Makes every shared-data get and set fail with `status` (`None` heals the store): how
    /// a plugin's `failureMode` is tested. Envoy itself fails these calls only on bad input.
    pub fn fail_shared_data(&mut self, status: Option<crate::abi::Status>) {
        self.host.borrow_mut().shared_data_fault = status;
    }

    /// Makes every local reply a plugin sends fail with `status` (`None`: replies go out
    /// again), to test what a plugin does with a request whose answer the host refused.
    pub fn fail_local_replies(&mut self, status: Option<crate::abi::Status>) {
        self.host.borrow_mut().local_reply_fault = status;
    }

    /// Stages the race Envoy's worker threads run *inside* a callback, between a plugin's read
    /// and its write, which interleaving at callback boundaries cannot reach: each of the next
    /// `n` compare-and-swaps that would succeed instead finds that another worker made the very
    /// same write first (the value lands, with a new cas) and gets CasMismatch. A plugin that
    /// re-reads and decides again stays exact; one that ignores the mismatch double-spends.
    pub fn stage_races(&mut self, n: u32) {
        self.host.borrow_mut().staged_races = n;
    }

    /// How many staged races have been run (0 means the plugin never compare-and-swapped).
    pub fn races_run(&self) -> u32 {
        self.host.borrow().races_run
    }

    /// Number of shared-data keys and their total bytes (key + value) in `vm_id`'s scope.
    pub fn shared_data_usage(&self, vm_id: &str) -> (usize, usize) {
        self.host
            .borrow()
            .shared_data
            .get(vm_id)
            .map(|m| (m.len(), m.iter().map(|(k, v)| k.len() + v.0.len()).sum()))
            .unwrap_or((0, 0))
    }

    /// Whether the VM of `plugin` on `worker` has trapped.
    pub fn vm_failed(&self, worker: usize, plugin: usize) -> bool {
        self.workers[worker][plugin].store.data().failed
    }

    /// Fuel spent per callback export, summed over every worker's VM of `plugin`.
    pub fn costs(&self, plugin: usize) -> BTreeMap<&'static str, CallbackCost> {
        let mut out: BTreeMap<&'static str, CallbackCost> = BTreeMap::new();
        for vms in &self.workers {
            for (k, v) in &vms[plugin].costs {
                let e = out.entry(k).or_default();
                e.calls += v.calls;
                e.fuel += v.fuel;
            }
        }
        out
    }

    /// Calls per hostcall (and host-made guest allocations), summed over every worker's VM of
    /// `plugin`: the crossings between Envoy and the VM that a request costs.
    pub fn hostcalls(&self, plugin: usize) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = BTreeMap::new();
        for vms in &self.workers {
            for (k, v) in &vms[plugin].store.data().hostcalls {
                *out.entry(k).or_default() += v;
            }
        }
        out
    }

    /// Places where a plugin used the ABI in a way Envoy would refuse or ignore.
    pub fn abi_misuse(&self) -> Vec<String> {
        self.host.borrow().misuse.clone()
    }

    /// Host clock: wall time in ns since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.host.borrow().realtime_ns
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Memory pages (64 KiB) of the VM of `plugin` on `worker`.
    pub fn memory_pages(&mut self, worker: usize, plugin: usize) -> u64 {
        self.workers[worker][plugin].memory_pages()
    }
}

fn text_headers(body: &[u8]) -> Vec<(String, String)> {
    vec![
        ("content-length".into(), body.len().to_string()),
        ("content-type".into(), "text/plain".into()),
    ]
}

fn header_status(map: &HeaderMap) -> Option<u16> {
    crate::state::header_value(map, ":status").and_then(|s| s.parse().ok())
}

/// Headers passed position `pos`: the next filter may run them, or the sink receives them.
fn pass_headers(d: &mut Dir, pos: usize) {
    match d.hdr.get_mut(pos + 1) {
        Some(next) => *next = Stage::Ready,
        None => d.out_headers = true,
    }
}

/// Body data (and end of stream) moves from `pos` to the next position or the sink.
fn pass_data(d: &mut Dir, ex: &ExchangeRef, dir: usize, pos: usize) {
    let filter = d.order[pos];
    let data = std::mem::take(&mut ex.borrow_mut().data[dir][filter]);
    let eos = d.eos_in[pos];
    match d.order.get(pos + 1).copied() {
        Some(next) => {
            if !data.is_empty() {
                ex.borrow_mut().data[dir][next].extend_from_slice(&data);
                d.fresh[pos + 1] = true;
            }
            if eos {
                d.eos_in[pos + 1] = true;
                if d.has_trailers {
                    d.trl[pos] = if d.trl[pos] == Stage::NotYet {
                        Stage::Ready
                    } else {
                        d.trl[pos]
                    };
                }
            }
        }
        None => {
            d.out.extend_from_slice(&data);
            if eos {
                if d.has_trailers {
                    if d.trl[pos] == Stage::NotYet {
                        d.trl[pos] = Stage::Ready;
                    }
                } else {
                    d.out_end = true;
                }
            }
        }
    }
    if eos && d.has_trailers && d.trl[pos] == Stage::NotYet {
        d.trl[pos] = Stage::Ready;
    }
}

fn pass_trailers(d: &mut Dir, pos: usize) {
    match d.trl.get_mut(pos + 1) {
        Some(next) => *next = Stage::Ready,
        None => d.out_end = true,
    }
}

/// Feeds the next source chunk into the first position once the chain has absorbed the last.
/// Returns whether anything was fed.
fn feed(d: &mut Dir, ex: &ExchangeRef, dir: usize) -> bool {
    if d.fed_all || !d.has_body && !d.has_trailers {
        return false;
    }
    let Some(&first) = d.order.first() else {
        // No filters: everything goes straight through.
        while let Some(c) = d.source.pop_front() {
            d.out.extend_from_slice(&c);
        }
        d.fed_all = true;
        d.out_end = true;
        return true;
    };
    // A filter that is buffering sees each new chunk in its own callback; behind paused
    // headers Envoy just accumulates, and the filter gets it all at once after the continue.
    if d.fresh[0] && d.hdr[0] != Stage::Paused {
        return false;
    }
    match d.source.pop_front() {
        Some(chunk) => {
            ex.borrow_mut().data[dir][first].extend_from_slice(&chunk);
            d.fresh[0] = true;
            if d.source.is_empty() {
                d.eos_in[0] = true;
                d.fed_all = true;
            }
            true
        }
        None => {
            d.fed_all = true;
            d.eos_in[0] = true;
            if !d.has_body && d.has_trailers {
                d.trl[0] = Stage::Ready;
            }
            true
        }
    }
}

fn uuid(r: &[u8; 16]) -> String {
    let h: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
