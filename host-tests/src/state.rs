//! Host state. `HostShared` is what Envoy shares between worker threads of one process (clock,
//! shared data, queues, metrics, clusters); `VmState` is one VM's own state (its contexts and
//! the effects a callback asked for); `Exchange` is one HTTP stream seen by every filter.

use crate::abi::{LogLevel, MetricType, Status};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{Index, IndexMut};
use std::rc::Rc;
use std::time::Duration;

/// Header pairs in order; names are stored lower-cased, values as raw bytes.
pub type HeaderMap = Vec<(Vec<u8>, Vec<u8>)>;

/// Which VM: (worker index, plugin index in the chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmRef {
    pub worker: usize,
    pub plugin: usize,
}

/// One line a plugin logged (through `proxy_log` or WASI stdout/stderr).
#[derive(Clone, Debug)]
pub struct LogRecord {
    pub worker: usize,
    pub plugin: String,
    pub level: LogLevel,
    pub message: String,
}

/// A request a plugin sent with `proxy_http_call`.
#[derive(Clone, Debug)]
pub struct CalloutRequest {
    pub cluster: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    pub timeout: Option<Duration>,
}

impl CalloutRequest {
    /// First value of a header (names are lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
}

/// How a scripted cluster answers a callout.
#[derive(Clone, Debug)]
pub enum CalloutReply {
    /// A response after `delay` (headers must include `:status`).
    Response {
        headers: HeaderMap,
        body: Vec<u8>,
        trailers: HeaderMap,
        delay: Duration,
    },
    /// The connection is refused or reset after `delay`: as in Envoy 1.40, the plugin gets
    /// Envoy's local 503 reply (`upstream connect error or disconnect/reset before headers`).
    Fail { delay: Duration },
    /// No answer: the callout's own timeout fires (and never, when the timeout is 0).
    Hang,
}

impl CalloutReply {
    /// A response with a status, headers and body, answered at once.
    pub fn ok(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Self {
        let mut h: HeaderMap = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        h.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase().into_bytes(), v.as_bytes().to_vec())),
        );
        CalloutReply::Response {
            headers: h,
            body: body.into(),
            trailers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// The same reply, delivered after `d` of host time.
    pub fn after(self, d: Duration) -> Self {
        match self {
            CalloutReply::Response {
                headers,
                body,
                trailers,
                ..
            } => CalloutReply::Response {
                headers,
                body,
                trailers,
                delay: d,
            },
            CalloutReply::Fail { .. } => CalloutReply::Fail { delay: d },
            CalloutReply::Hang => CalloutReply::Hang,
        }
    }
}

/// A gRPC message a plugin sent (unary call or on a stream).
#[derive(Clone, Debug)]
pub struct GrpcRequest {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: HeaderMap,
    pub message: Vec<u8>,
    pub stream: bool,
}

/// A scripted gRPC answer: status 0 delivers `message`; any other status closes the call.
#[derive(Clone, Debug)]
pub struct GrpcReply {
    pub status: u32,
    pub message: Vec<u8>,
    pub delay: Duration,
}

impl GrpcReply {
    /// A successful reply carrying `message`, answered at once.
    pub fn ok(message: impl Into<Vec<u8>>) -> Self {
        GrpcReply {
            status: 0,
            message: message.into(),
            delay: Duration::ZERO,
        }
    }

    /// A failed call: the plugin sees `proxy_on_grpc_close` with this gRPC status.
    pub fn error(status: u32, message: &str) -> Self {
        GrpcReply {
            status,
            message: message.as_bytes().to_vec(),
            delay: Duration::ZERO,
        }
    }
}

pub type CalloutHandler = Box<dyn FnMut(&CalloutRequest) -> CalloutReply>;
pub type GrpcHandler = Box<dyn FnMut(&GrpcRequest) -> GrpcReply>;
pub type ForeignFn = Box<dyn FnMut(&[u8]) -> Result<Vec<u8>, Status>>;

/// A stat a plugin defined; Envoy shows it as `wasmcustom.<name>`.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: String,
    pub kind: MetricType,
    pub value: u64,
    pub samples: Vec<u64>,
}

pub(crate) struct Queue {
    pub vm_id: String,
    pub name: String,
    pub owner: (VmRef, u32),
    pub items: VecDeque<Vec<u8>>,
}

/// Something the host delivers later, in time order.
#[derive(Clone, Debug)]
pub(crate) enum EventKind {
    QueueReady { queue: u32 },
    Callout { token: u32, reply: CalloutReply },
    Grpc { token: u32, reply: GrpcReply },
}

#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub due_ns: u64,
    pub seq: u64,
    pub target: (VmRef, u32),
    pub kind: EventKind,
}

/// Seeded xorshift generator: deterministic per test, enough for `random_get`.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// One vm_id's shared data: key → (value, cas).
pub(crate) type SharedScope = HashMap<Vec<u8>, (Vec<u8>, u32)>;

/// State shared by every VM of one `Edge` (Envoy: one process, all workers).
pub(crate) struct HostShared {
    pub realtime_ns: u64,
    pub monotonic_ns: u64,
    pub rng: Rng,
    pub shared_data: HashMap<String, SharedScope>,
    pub next_cas: u32,
    /// While set, shared-data calls fail with this status (fault injection).
    pub shared_data_fault: Option<crate::abi::Status>,
    /// Status every `proxy_send_local_response` fails with (`None`: replies are sent).
    pub local_reply_fault: Option<crate::abi::Status>,
    /// Compare-and-swaps still to lose to a twin write (see `Edge::stage_races`).
    pub staged_races: u32,
    pub races_run: u32,
    pub queues: Vec<Queue>,
    pub metrics: Vec<Metric>,
    /// (name, id) → index into `metrics`.
    pub metric_ids: HashMap<(String, u32), u32>,
    pub clusters: BTreeMap<String, CalloutHandler>,
    pub grpc_clusters: BTreeMap<String, GrpcHandler>,
    pub foreign: BTreeMap<String, ForeignFn>,
    pub callouts: Vec<CalloutRequest>,
    pub grpc_sent: Vec<GrpcRequest>,
    pub events: Vec<Event>,
    pub seq: u64,
    pub logs: Vec<LogRecord>,
    pub echo_logs: bool,
    pub misuse: Vec<String>,
    pub log_level: LogLevel,
    pub buffer_limit: usize,
}

impl HostShared {
    pub fn new(seed: u64, start_realtime_ns: u64) -> Self {
        HostShared {
            realtime_ns: start_realtime_ns,
            monotonic_ns: 1_000_000_000,
            rng: Rng::new(seed),
            shared_data: HashMap::new(),
            next_cas: 1,
            shared_data_fault: None,
            local_reply_fault: None,
            staged_races: 0,
            races_run: 0,
            queues: Vec::new(),
            metrics: Vec::new(),
            metric_ids: HashMap::new(),
            clusters: BTreeMap::new(),
            grpc_clusters: BTreeMap::new(),
            foreign: BTreeMap::new(),
            callouts: Vec::new(),
            grpc_sent: Vec::new(),
            events: Vec::new(),
            seq: 0,
            logs: Vec::new(),
            echo_logs: std::env::var_os("EDGE_HARNESS_LOG").is_some(),
            misuse: Vec::new(),
            log_level: LogLevel::Info,
            buffer_limit: 1024 * 1024,
        }
    }

    pub fn schedule(&mut self, delay_ns: u64, target: (VmRef, u32), kind: EventKind) {
        self.seq += 1;
        self.events.push(Event {
            due_ns: self.monotonic_ns.saturating_add(delay_ns),
            seq: self.seq,
            target,
            kind,
        });
    }

    /// Cas values come from one counter that skips 0, as in proxy-wasm-cpp-host.
    pub fn take_cas(&mut self) -> u32 {
        let cas = self.next_cas;
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        cas
    }

    pub fn log(&mut self, worker: usize, plugin: &str, level: LogLevel, message: String) {
        if self.echo_logs {
            eprintln!("[worker {worker}] {plugin} {level:?}: {message}");
        }
        self.logs.push(LogRecord {
            worker,
            plugin: plugin.to_string(),
            level,
            message,
        });
    }
}

/// What the configuration said about one plugin (Envoy's PluginConfig + VmConfig).
#[derive(Clone, Debug)]
pub struct PluginInfo {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub vm_config: Vec<u8>,
    pub config: Vec<u8>,
    pub fail_open: bool,
    pub env: Vec<(String, String)>,
}

/// A direction of an HTTP stream: the request on its way up, the response on its way down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    Request,
    Response,
}

/// One value for each direction of a stream.
#[derive(Clone, Debug, Default)]
pub(crate) struct PerDirection<T> {
    pub request: T,
    pub response: T,
}

impl<T> Index<Direction> for PerDirection<T> {
    type Output = T;
    fn index(&self, direction: Direction) -> &T {
        match direction {
            Direction::Request => &self.request,
            Direction::Response => &self.response,
        }
    }
}

impl<T> IndexMut<Direction> for PerDirection<T> {
    fn index_mut(&mut self, direction: Direction) -> &mut T {
        match direction {
            Direction::Request => &mut self.request,
            Direction::Response => &mut self.response,
        }
    }
}

/// The four header maps of a stream (ABI map types 0 to 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamMap {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
}

impl StreamMap {
    /// The stream map an ABI map type names (`None` for callout and gRPC maps).
    pub fn from_abi(map_type: u32) -> Option<StreamMap> {
        match map_type {
            crate::abi::map::REQUEST_HEADERS => Some(StreamMap::RequestHeaders),
            crate::abi::map::REQUEST_TRAILERS => Some(StreamMap::RequestTrailers),
            crate::abi::map::RESPONSE_HEADERS => Some(StreamMap::ResponseHeaders),
            crate::abi::map::RESPONSE_TRAILERS => Some(StreamMap::ResponseTrailers),
            _ => None,
        }
    }

    pub fn headers(direction: Direction) -> StreamMap {
        match direction {
            Direction::Request => StreamMap::RequestHeaders,
            Direction::Response => StreamMap::ResponseHeaders,
        }
    }

    pub fn trailers(direction: Direction) -> StreamMap {
        match direction {
            Direction::Request => StreamMap::RequestTrailers,
            Direction::Response => StreamMap::ResponseTrailers,
        }
    }
}

/// One value for each header map of a stream.
#[derive(Clone, Debug, Default)]
pub(crate) struct PerMap<T> {
    pub request_headers: T,
    pub request_trailers: T,
    pub response_headers: T,
    pub response_trailers: T,
}

impl<T> Index<StreamMap> for PerMap<T> {
    type Output = T;
    fn index(&self, map: StreamMap) -> &T {
        match map {
            StreamMap::RequestHeaders => &self.request_headers,
            StreamMap::RequestTrailers => &self.request_trailers,
            StreamMap::ResponseHeaders => &self.response_headers,
            StreamMap::ResponseTrailers => &self.response_trailers,
        }
    }
}

impl<T> IndexMut<StreamMap> for PerMap<T> {
    fn index_mut(&mut self, map: StreamMap) -> &mut T {
        match map {
            StreamMap::RequestHeaders => &mut self.request_headers,
            StreamMap::RequestTrailers => &mut self.request_trailers,
            StreamMap::ResponseHeaders => &mut self.response_headers,
            StreamMap::ResponseTrailers => &mut self.response_trailers,
        }
    }
}

/// Downstream connection facts, as Envoy's stream info reports them.
#[derive(Clone, Debug)]
pub struct Peer {
    pub source: String,
    pub destination: String,
}

/// One HTTP stream as every filter of the chain sees it.
pub(crate) struct Exchange {
    pub maps: PerMap<HeaderMap>,
    /// Body data waiting at, or buffered by, each filter (indexed by chain position), per direction.
    pub data: PerDirection<Vec<Vec<u8>>>,
    pub peer: Peer,
    pub start_ns: u64,
    pub response_code: Option<u16>,
    pub code_details: String,
    pub response_flags: u64,
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub protocol: String,
    pub connection_id: u64,
}

pub(crate) type ExchangeRef = Rc<RefCell<Exchange>>;

/// A stream context of one VM, bound to its exchange.
pub(crate) struct Binding {
    pub exchange: ExchangeRef,
    pub filter: usize,
    /// Which of the four header maps this filter may touch now (Envoy drops its pointer to a
    /// map once the filter lets the headers go).
    pub open: PerMap<bool>,
    /// The body buffer visible now: Some(direction) inside a body callback or while buffering.
    pub body: Option<Direction>,
    pub log_phase: bool,
}

impl Binding {
    /// Envoy drops the filter's pointers to the request maps and body (the request is over for
    /// it, or it continued).
    pub fn let_go_of_request(&mut self) {
        self.open.request_headers = false;
        self.open.request_trailers = false;
        if self.body == Some(Direction::Request) {
            self.body = None;
        }
    }
}

/// What a callback asked the host to do once it returns.
#[derive(Clone, Debug)]
pub(crate) enum Effect {
    Continue { context: u32, direction: Direction },
    Close { context: u32 },
    LocalReply { context: u32, reply: LocalReply },
    Done { context: u32 },
}

/// A reply a plugin asked for with `proxy_send_local_response`.
#[derive(Clone, Debug)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: HeaderMap,
    pub grpc_status: i32,
}

/// What a callout or gRPC response callback may read.
#[derive(Default)]
pub(crate) struct CallbackBuffers {
    pub call_headers: Option<HeaderMap>,
    pub call_trailers: Option<HeaderMap>,
    pub call_body: Option<Vec<u8>>,
    pub grpc_initial: Option<HeaderMap>,
    pub grpc_trailing: Option<HeaderMap>,
    pub grpc_message: Option<Vec<u8>>,
    pub call_data: Option<Vec<u8>>,
    pub plugin_config: bool,
}

pub(crate) struct GrpcState {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: HeaderMap,
    pub context: u32,
}

/// One VM's state: what wasmtime keeps in its `Store`.
pub(crate) struct VmState {
    pub host: Rc<RefCell<HostShared>>,
    pub me: VmRef,
    pub plugin: Rc<PluginInfo>,
    pub root_context: u32,
    pub next_context: u32,
    pub active: u32,
    pub effective: u32,
    pub bindings: HashMap<u32, Binding>,
    pub buffers: CallbackBuffers,
    pub tick_period_ms: u64,
    pub next_tick_ns: Option<u64>,
    pub next_token: u32,
    pub http_calls: HashMap<u32, u32>,
    pub grpc: HashMap<u32, GrpcState>,
    pub effects: Vec<Effect>,
    pub status: (u32, Vec<u8>),
    pub failed: bool,
    pub starting: bool,
    pub exit_code: Option<u32>,
    /// Calls per `env` import, and guest allocations the host made to hand data over: each is
    /// a crossing between the host and the VM, which Envoy pays for.
    pub hostcalls: BTreeMap<&'static str, u64>,
    /// The callbacks made while tracing (`Edge::start_trace`), with their hostcalls.
    pub trace: Option<Vec<crate::trace::TracedCallback>>,
}

impl VmState {
    pub fn log(&self, level: LogLevel, message: String) {
        self.host
            .borrow_mut()
            .log(self.me.worker, &self.plugin.name, level, message);
    }

    pub fn misuse(&self, what: String) {
        let msg = format!(
            "worker {} plugin {}: {what}",
            self.me.worker, self.plugin.name
        );
        self.host.borrow_mut().misuse.push(msg);
    }

    pub fn is_context(&self, id: u32) -> bool {
        id == self.root_context || self.bindings.contains_key(&id)
    }
}

/// First value of `name` (lower-case) in a header map, as text.
pub fn header_value<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    map.iter()
        .find(|(k, _)| k.as_slice() == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}
