//! A path's crossings without its policy: replays, per callback, the hostcalls a plugin made
//! for one request in the harness (same kinds, sizes and order, recorded by
//! `host-tests/benches/plugins.rs`) and returns the recorded action. What it adds to bare Envoy
//! is the measured cost of those crossings; `bench/README.md`, "The floor".
//!
//! Configuration: `{"traces": {"NAME": [callback, ...], ...}, "burn": N, "spread": {PREFIX:
//! COUNT, ...}}`. With several traces, a stream takes the one named by its `x-replay` request
//! header, read by the first request header read the trace makes anyway. A shared-data key that
//! is a spread prefix and a number (a table's slot) is replayed, per stream, as that prefix and
//! one of COUNT numbers, every one written once at configure time: Envoy's shared data then
//! holds as many entries as the plugin's table did, and each stream reaches one it picks. `burn` runs N rounds of [`burn`] per request, to measure
//! what a plugin's wasm instruction costs in the same Envoy run.

#![no_std]

use alloc::string::ToString;
extern crate alloc;

// The plugins' allocator, callback dispatch and hostcall imports: a replay's guest
// allocations and crossings cost what the plugins' do.
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use edge_host::ffi as host;
use edge_host::host::{Action, Context, HttpContext, RootContext};
use serde_json::Value;

// The modules are `no_std`: hashbrown's maps, keyed as the plugins' own name maps are.
type HashMap<K, V> = edge_host::host::FnvMap<K, V>;
type HashSet<K> = edge_host::host::FnvSet<K>;

/// The header that names a request's trace in a set.
const SELECTOR: &str = "x-replay";

/// The callbacks a trace records, in the order of [`Stream::seen`].
const CALLBACKS: [&str; 10] = [
    "proxy_on_context_create",
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_log",
    "proxy_on_done",
    "proxy_on_delete",
];

/// The ABI's numbers: header map types 0-3 (request headers and trailers, response headers
/// and trailers), buffer types 0-1 (request and response body), metric types 0-2.
enum Op {
    HeaderGet(u32, String),
    HeaderPairs(u32),
    HeaderSet(u32, String, Vec<u8>, bool),
    HeaderRemove(u32, String),
    Property(Vec<String>),
    SharedGet(Key),
    SharedSet(Key, Vec<u8>, bool),
    Define(u32, String),
    Increment(u32, i64),
    Record(u32, u64),
    GetMetric(u32),
    BufferGet(u32, usize, usize),
    BufferSet(u32, usize, usize, Vec<u8>),
    Reply(u32, Vec<(String, String)>, Vec<u8>),
    Resume(i64),
    Time,
}

struct Callback {
    kind: usize,
    returned: u32,
    ops: Vec<Op>,
}

/// A shared-data key: as recorded, or one of a spread's entries, picked per stream.
enum Key {
    Fixed(String),
    /// The index of a spread in [`Replay::spreads`].
    Spread(usize),
}

/// One request's callbacks, by kind: `by_kind[k]` lists the callbacks of kind `k` in order.
struct Trace {
    name: String,
    by_kind: Vec<Vec<Callback>>,
}

struct Replay {
    traces: Vec<Trace>,
    burn: u64,
    /// Counter `replay_unrecorded`: callbacks without a recorded counterpart.
    unrecorded: u32,
    /// The cas each shared-data key last read had, for writes that gave one.
    cas: RefCell<HashMap<String, u32>>,
    /// Key prefixes and how many numbered entries each spreads over.
    spreads: Vec<(String, u32)>,
    /// The state of the generator that picks a stream's entries (xorshift).
    seed: Cell<u64>,
}

const REQUEST_HEADERS: u32 = 0;

fn map_type(n: i64) -> Option<u32> {
    u32::try_from(n).ok().filter(|m| *m <= 3)
}

fn buffer_type(n: i64) -> Option<u32> {
    u32::try_from(n).ok().filter(|b| *b <= 1)
}

fn metric_type(n: i64) -> u32 {
    u32::try_from(n).ok().filter(|k| *k <= 2).unwrap_or(0)
}

fn int(v: &Value, k: &str) -> i64 {
    v.get(k).and_then(Value::as_i64).unwrap_or(0)
}

fn string(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn filler(len: i64) -> Vec<u8> {
    vec![b'r'; usize::try_from(len).unwrap_or(0)]
}

/// Turns the recorded calls into ops; prepares, once, what they read: metrics defined,
/// shared-data keys written with values of the recorded lengths. A read that found nothing
/// reads a key nobody writes, so that it finds nothing here too.
fn ops(
    calls: &[Value],
    metrics: &mut HashMap<(String, i64), u32>,
    written: &mut HashSet<String>,
    spreads: &[(String, u32)],
) -> Vec<Op> {
    // A recorded key that is a spread's prefix and a number stands for any of its entries.
    let key_of = |key: String| -> Key {
        let prefix = key.trim_end_matches(|c: char| c.is_ascii_digit());
        match spreads.iter().position(|(p, _)| p == prefix) {
            Some(i) if prefix.len() < key.len() => Key::Spread(i),
            _ => Key::Fixed(key),
        }
    };
    let mut out = Vec::new();
    let mut metric = |name: String, kind: i64| -> u32 {
        *metrics
            .entry((name.clone(), kind))
            .or_insert_with(|| host::define_metric(metric_type(kind), &name).unwrap_or(0))
    };
    for c in calls {
        let map = || map_type(int(c, "map"));
        let op = match c.get("op").and_then(Value::as_str).unwrap_or_default() {
            "get_header_map_value" => map().map(|m| Op::HeaderGet(m, string(c, "name"))),
            "get_header_map_pairs" => map().map(Op::HeaderPairs),
            "replace_header_map_value" | "add_header_map_value" => map().map(|m| {
                let add = c.get("op").and_then(Value::as_str) == Some("add_header_map_value");
                Op::HeaderSet(m, string(c, "name"), filler(int(c, "len")), add)
            }),
            "remove_header_map_value" => map().map(|m| Op::HeaderRemove(m, string(c, "name"))),
            "get_property" => {
                let path = c.get("path").and_then(Value::as_array).map(|p| {
                    p.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                });
                path.map(Op::Property)
            }
            "get_shared_data" => {
                let key = string(c, "key");
                if string(c, "status") == "ok" {
                    let key = key_of(key);
                    let entries = match &key {
                        Key::Fixed(k) => vec![k.clone()],
                        Key::Spread(i) => spreads.get(*i).map_or(Vec::new(), |(p, n)| {
                            (0..*n).map(|at| format!("{p}{at}")).collect()
                        }),
                    };
                    let value = filler(int(c, "len"));
                    for k in entries {
                        if !written.contains(&k) {
                            let _ = host::set_shared_data(&k, &value, 0);
                            written.insert(k);
                        }
                    }
                    Some(Op::SharedGet(key))
                } else {
                    Some(Op::SharedGet(Key::Fixed(format!("{key}\u{1}"))))
                }
            }
            "set_shared_data" => Some(Op::SharedSet(
                key_of(string(c, "key")),
                filler(int(c, "len")),
                c.get("cas").and_then(Value::as_bool).unwrap_or(false),
            )),
            "define_metric" => Some(Op::Define(metric_type(int(c, "kind")), string(c, "name"))),
            "increment_metric" => Some(Op::Increment(
                metric(string(c, "name"), int(c, "kind")),
                int(c, "value"),
            )),
            "record_metric" => Some(Op::Record(
                metric(string(c, "name"), int(c, "kind")),
                u64::try_from(int(c, "value")).unwrap_or(0),
            )),
            "get_metric" => Some(Op::GetMetric(metric(string(c, "name"), int(c, "kind")))),
            "get_buffer_bytes" => buffer_type(int(c, "buffer")).map(|b| {
                let start = usize::try_from(int(c, "start")).unwrap_or(0);
                Op::BufferGet(b, start, usize::try_from(int(c, "max")).unwrap_or(0))
            }),
            "set_buffer_bytes" => buffer_type(int(c, "buffer")).map(|b| {
                let start = usize::try_from(int(c, "start")).unwrap_or(0);
                let size = usize::try_from(int(c, "size")).unwrap_or(0);
                Op::BufferSet(b, start, size, filler(int(c, "len")))
            }),
            "send_local_response" => {
                let headers = c
                    .get("headers")
                    .and_then(Value::as_array)
                    .map(|hs| {
                        hs.iter()
                            .filter_map(|h| {
                                let k = h.get(0).and_then(Value::as_str)?;
                                let v = h.get(1).and_then(Value::as_str)?;
                                Some((k.to_string(), v.to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let status = u32::try_from(int(c, "status")).unwrap_or(500);
                Some(Op::Reply(status, headers, filler(int(c, "body"))))
            }
            "continue_stream" => Some(Op::Resume(int(c, "target"))),
            "get_current_time_nanoseconds" => Some(Op::Time),
            // Guest allocations follow from the data-returning calls; nothing else is on a
            // plugin's request path.
            _ => None,
        };
        out.extend(op);
    }
    out
}

fn parse(config: &[u8]) -> Option<Replay> {
    let v: Value = serde_json::from_slice(config).ok()?;
    let mut metrics = HashMap::default();
    let mut written = HashSet::default();
    let spreads: Vec<(String, u32)> = v
        .get("spread")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(p, n)| Some((p.clone(), u32::try_from(n.as_u64()?).ok()?)))
                .filter(|(_, n)| *n > 1)
                .collect()
        })
        .unwrap_or_default();
    let mut traces = Vec::new();
    for (name, callbacks) in v.get("traces")?.as_object()? {
        let mut by_kind: Vec<Vec<Callback>> = CALLBACKS.iter().map(|_| Vec::new()).collect();
        for cb in callbacks.as_array()? {
            let export = cb
                .get("callback")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(kind) = CALLBACKS.iter().position(|c| *c == export) else {
                continue;
            };
            let calls = cb
                .get("calls")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            let callback = Callback {
                kind,
                returned: u32::try_from(int(cb, "returned")).unwrap_or(0),
                ops: ops(calls, &mut metrics, &mut written, &spreads),
            };
            if let Some(list) = by_kind.get_mut(callback.kind) {
                list.push(callback);
            }
        }
        traces.push(Trace {
            name: name.clone(),
            by_kind,
        });
    }
    Some(Replay {
        traces,
        burn: u64::try_from(int(&v, "burn")).unwrap_or(0),
        unrecorded: host::define_counter("replay_unrecorded").unwrap_or(0),
        cas: RefCell::new(HashMap::default()),
        spreads,
        seed: Cell::new(0x9e37_79b9_7f4a_7c15),
    })
}

/// What a plugin's own code does, of a known size: parsing a small JSON document into values
/// (loads, stores, branches, calls and allocations over a few KB), `rounds` times. A tight
/// loop over locals would run many times faster per wasm instruction than plugin code does.
fn burn(rounds: u64) -> usize {
    let mut total = 0;
    for _ in 0..rounds {
        let doc = core::hint::black_box(BURN_DOCUMENT);
        if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(doc) {
            total += o.len();
        }
    }
    total
}

/// Shaped like the plugins' records and configurations.
const BURN_DOCUMENT: &str = r#"{"rules":[{"name":"api","match":{"pathPrefix":"/api/"},
"key":[{"source":"clientIp"},{"header":"x-tenant"}],"limit":{"requests":100,"window":"1s"}}],
"record":{"status":200,"headers":[["content-type","application/json"],["x-request-id",
"6f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b"]],"body":"eyJpdGVtcyI6WzEsMiwzXX0=","stored":1733541234,
"fingerprint":"9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47c02190ecf1e430635ab"},
"flags":{"new-checkout":{"state":"ENABLED","variants":{"v1":"v1","v2":"v2"},
"defaultVariant":"v1","targeting":{"if":[{"==":[{"var":"tier"},"beta"]},"v2",
{"fractional":[["v1",80],["v2",20]]}]}}},"tokens":[12.5,99,0.25,-3,1e3,true,false,null]}"#;

/// What a replayed call answered does not matter: only that Envoy did the work.
fn ignore<T>(_: T) {}

#[derive(Default)]
struct Root {
    replay: Option<Rc<Replay>>,
}

struct Stream {
    replay: Rc<Replay>,
    trace: usize,
    selected: bool,
    seen: [usize; CALLBACKS.len()],
    /// The entry of each spread this stream reaches, picked at its first use: a plugin reads
    /// and writes one slot of its table per request.
    picks: Vec<Option<String>>,
}

impl Stream {
    /// Runs the next recorded callback of `kind`; returns its recorded result (`None`: no
    /// such callback was recorded, and the callback does what the trait's default does).
    fn run(&mut self, kind: usize) -> Option<u32> {
        let replay = self.replay.clone();
        let n = self.seen.get(kind).copied().unwrap_or(0);
        if let Some(s) = self.seen.get_mut(kind) {
            *s += 1;
        }
        let mut at = 0;
        let mut returned = None;
        loop {
            let Some(cb) = replay
                .traces
                .get(self.trace)
                .and_then(|t| t.by_kind.get(kind))
                .and_then(|l| l.get(n))
            else {
                // A callback Envoy made that the harness did not record (Envoy may split a
                // body in two, say): counted, so the bench can tell the replay is incomplete.
                if returned.is_none() {
                    ignore(host::increment_metric(replay.unrecorded, 1));
                }
                return returned;
            };
            returned = Some(cb.returned);
            let Some(op) = cb.ops.get(at) else {
                return returned;
            };
            at += 1;
            if !self.selected && self.selects(op) {
                continue;
            }
            self.apply(&replay, op);
        }
    }

    /// The first request header read of a set's stream reads the selector instead and picks
    /// the trace to go on with (at the same place: the traces agree up to here).
    fn selects(&mut self, op: &Op) -> bool {
        self.selected = true;
        if self.replay.traces.len() < 2 {
            return false;
        }
        let name = match op {
            Op::HeaderGet(REQUEST_HEADERS, _) => host::get_header(REQUEST_HEADERS, SELECTOR),
            Op::HeaderPairs(REQUEST_HEADERS) => host::get_header_pairs_raw(REQUEST_HEADERS)
                .and_then(|m| host::find_pair(&m, SELECTOR).flatten().map(<[u8]>::to_vec)),
            _ => {
                self.selected = false;
                return false;
            }
        };
        if let Some(name) = name {
            if let Some(i) = self
                .replay
                .traces
                .iter()
                .position(|t| t.name.as_bytes() == name)
            {
                self.trace = i;
            }
        }
        true
    }

    /// The key `key` stands for in this stream. A spread's entry is picked and its key built
    /// once per stream: the replay's own instructions count in the floor.
    fn key<'s>(&'s mut self, replay: &Replay, key: &'s Key) -> &'s str {
        let i = match key {
            Key::Fixed(k) => return k,
            Key::Spread(i) => *i,
        };
        if self.picks.len() <= i {
            self.picks.resize(i + 1, None);
        }
        let Some(slot) = self.picks.get_mut(i) else {
            return "";
        };
        slot.get_or_insert_with(|| {
            let Some((prefix, n)) = replay.spreads.get(i) else {
                return String::new();
            };
            let mut x = replay.seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            replay.seed.set(x);
            edge_core::text::key(prefix, x % u64::from(*n))
        })
    }

    fn apply(&mut self, replay: &Replay, op: &Op) {
        match op {
            Op::HeaderGet(m, name) => ignore(host::get_header(*m, name)),
            Op::HeaderPairs(m) => ignore(host::get_header_pairs_raw(*m)),
            Op::HeaderSet(m, name, value, false) => ignore(host::set_header(*m, name, Some(value))),
            Op::HeaderSet(m, name, value, true) => {
                ignore(host::replayed::add_header(*m, name, value))
            }
            Op::HeaderRemove(m, name) => ignore(host::set_header(*m, name, None)),
            Op::Property(path) => ignore(host::get_property(
                &path.iter().map(String::as_str).collect::<Vec<_>>(),
            )),
            Op::SharedGet(key) => {
                let key = self.key(replay, key);
                let (status, _, cas) = host::get_shared_data(key);
                if status == host::OK {
                    replay.cas.borrow_mut().insert(key.to_string(), cas);
                }
            }
            Op::SharedSet(key, value, with_cas) => {
                let key = self.key(replay, key);
                let cas = replay.cas.borrow_mut().remove(key).filter(|_| *with_cas);
                let _ = host::set_shared_data(key, value, cas.unwrap_or(0));
            }
            Op::Define(kind, name) => ignore(host::define_metric(*kind, name)),
            Op::Increment(id, by) => ignore(host::increment_metric(*id, *by)),
            Op::Record(id, value) => ignore(host::replayed::record_metric(*id, *value)),
            Op::GetMetric(id) => ignore(host::replayed::get_metric(*id)),
            Op::BufferGet(b, start, max) => ignore(host::get_buffer(*b, *start, *max)),
            Op::BufferSet(b, start, size, value) => {
                ignore(host::replayed::set_buffer(*b, *start, *size, value))
            }
            Op::Reply(status, headers, body) => {
                let headers: Vec<(&str, &[u8])> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_bytes()))
                    .collect();
                let _ = host::send_local_response(*status, &headers, body);
            }
            Op::Resume(0) => ignore(host::continue_stream(host::STREAM_REQUEST)),
            Op::Resume(_) => ignore(host::continue_stream(host::STREAM_RESPONSE)),
            Op::Time => ignore(host::current_time_ns()),
        }
    }

    fn action(&mut self, kind: usize) -> Action {
        match self.run(kind) {
            Some(1) => Action::Pause,
            _ => Action::Continue,
        }
    }
}

impl Context for Root {}

impl Context for Stream {}

impl Drop for Stream {
    fn drop(&mut self) {
        self.run(9);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let action = self.action(1);
        if self.replay.burn > 0 {
            core::hint::black_box(burn(self.replay.burn));
        }
        action
    }
    fn on_http_request_body(&mut self, _: usize, _: bool) -> Action {
        self.action(2)
    }
    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        self.action(3)
    }
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.action(4)
    }
    fn on_http_response_body(&mut self, _: usize, _: bool) -> Action {
        self.action(5)
    }
    fn on_http_response_trailers(&mut self, _: usize) -> Action {
        self.action(6)
    }
    fn on_log(&mut self) {
        self.run(7);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config =
            host::get_buffer(host::PLUGIN_CONFIGURATION, 0, usize::MAX).unwrap_or_default();
        self.replay = parse(&config).map(Rc::new);
        self.replay.is_some()
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        let replay = self.replay.clone()?;
        let mut stream = Stream {
            replay,
            trace: 0,
            selected: false,
            seen: [0; CALLBACKS.len()],
            picks: Vec::new(),
        };
        stream.run(0);
        Some(Box::new(stream))
    }
}

edge_host::host::main!(Root);
