//! The harness's public vocabulary: plugins, requests, what the upstream does and what the
//! client gets, and what one step of a stream ran.

use crate::state::{header_value, Direction, HeaderMap, PluginInfo};
use crate::vm::Module;
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
    pub const DIRECT_RESPONSE: &str = "direct_response";
    pub const WASM_CLOSE: &str = "wasm_close_stream";
    pub const REQUEST_TOO_LARGE: &str = "request_payload_too_large";
    pub const RESPONSE_TOO_LARGE: &str = "response_payload_too_large";
}

/// A plugin in the chain: a compiled module plus what Envoy's config says about it.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) module: Module,
    pub(crate) info: PluginInfo,
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
        header_value(&self.headers, name)
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
    /// The route answers itself (Envoy's `direct_response`): no application is asked, and
    /// the router adds no `x-envoy-upstream-service-time`.
    Direct { status: u16, body: Vec<u8> },
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

/// The emulated upstream's behaviour.
pub(crate) type UpstreamFn = Box<dyn FnMut(&UpstreamRequest) -> Upstream>;

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
    /// Properties set before the chain runs (path segments joined by NUL, value bytes).
    pub properties: Vec<(Vec<u8>, Vec<u8>)>,
    /// The downstream protocol: `HTTP/1.1` (default) or `HTTP/2`.
    pub protocol: String,
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
            properties: Vec::new(),
            protocol: "HTTP/1.1".into(),
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
    /// A property as a filter before the chain (Lua, ext_authz, a native filter) or the
    /// listener would have set it: dynamic metadata (`["metadata", "filter_metadata",
    /// "envoy.filters.http.lua", "key"]`), filter state, or any path. The plugin's
    /// `proxy_get_property` of that path returns `value` as given (encode integers as 8-byte
    /// little-endian, as Envoy does); it wins over the host's own value of the same path.
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Request {
        self.properties
            .push((path.join("\0").into_bytes(), value.into()));
        self
    }
    /// A gRPC request as a gRPC client sends it: `POST`, `content-type: application/grpc`,
    /// `te: trailers`, and `message` in gRPC's length-prefixed framing. Envoy then answers
    /// every local reply (a plugin's, its own) in gRPC form: `200` with `grpc-status`.
    pub fn grpc(path: &str, message: &[u8]) -> Request {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(framed)
    }
    /// Over HTTP/2 (`request.protocol` is `HTTP/2`; header values are not split on line
    /// breaks, as the HTTP/1.1 codec's writes are).
    pub fn http2(mut self) -> Request {
        self.protocol = "HTTP/2".into();
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
    /// The stream was reset instead of completed: a plugin closed it (no status, no headers),
    /// or a filter buffered more response body than the buffer limit after the headers had
    /// gone to the client (status and headers as the client got them, the body cut short).
    pub reset: bool,
    pub worker: usize,
    /// Wasm fuel (≈ instructions) every plugin spent on this stream, callbacks included.
    pub fuel: u64,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<non-utf8 body>")
    }
}

/// Identifies a stream started with [`Edge::begin`](crate::Edge::begin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlightId(pub(crate) u64);

/// What one [`Edge::step`](crate::Edge::step) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ran one guest callback of one filter, or one host stage of the stream.
    Ran(Callback),
    /// Nothing can run until a continue (callout, timer, queue) arrives.
    Waiting,
    /// The stream is over; [`Edge::finish`](crate::Edge::finish) returns its response.
    Done,
}

/// What a step of a stream ran: a filter's stream callback, or a stage the host runs itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Callback {
    /// `proxy_on_request_headers`
    RequestHeaders,
    /// `proxy_on_request_body`
    RequestBody,
    /// `proxy_on_request_trailers`
    RequestTrailers,
    /// `proxy_on_response_headers`
    ResponseHeaders,
    /// `proxy_on_response_body`
    ResponseBody,
    /// `proxy_on_response_trailers`
    ResponseTrailers,
    /// The exchange with the upstream (no guest callback).
    Upstream,
    /// A buffering filter held more than the buffer limit, and Envoy answered 413 or 500 for it
    /// (no guest callback).
    BufferLimit,
    /// The access-log phase and teardown: `proxy_on_log`, then `proxy_on_done` and
    /// `proxy_on_delete`, for every filter that saw the stream.
    Log,
}

impl Callback {
    /// The stream callback of `part` in `direction`.
    pub(crate) fn of(direction: Direction, part: Part) -> Callback {
        match (direction, part) {
            (Direction::Request, Part::Headers) => Callback::RequestHeaders,
            (Direction::Request, Part::Body) => Callback::RequestBody,
            (Direction::Request, Part::Trailers) => Callback::RequestTrailers,
            (Direction::Response, Part::Headers) => Callback::ResponseHeaders,
            (Direction::Response, Part::Body) => Callback::ResponseBody,
            (Direction::Response, Part::Trailers) => Callback::ResponseTrailers,
        }
    }

    /// The guest export this step calls first (`None` for the host's own stages).
    pub fn export(self) -> Option<&'static str> {
        Some(match self {
            Callback::RequestHeaders => "proxy_on_request_headers",
            Callback::RequestBody => "proxy_on_request_body",
            Callback::RequestTrailers => "proxy_on_request_trailers",
            Callback::ResponseHeaders => "proxy_on_response_headers",
            Callback::ResponseBody => "proxy_on_response_body",
            Callback::ResponseTrailers => "proxy_on_response_trailers",
            Callback::Log => "proxy_on_log",
            Callback::Upstream | Callback::BufferLimit => return None,
        })
    }
}

/// Which part of a direction a stream callback handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Headers,
    Body,
    Trailers,
}
