//! The one way a plugin's glue reaches the host: every hostcall it makes, each status turned
//! into a value (the SDK's wrappers trap on a status they do not expect), the counters, shared
//! data as a [`SlotStore`](edge_core::SlotStore), and the context traits the glue implements.
//! Policies never import this module (a plugin built without its `host` feature cannot), so a
//! hostcall cannot creep into them.

use crate::ffi;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use edge_core::headers::HeaderEdits;
use edge_core::request::{client_ip, HeaderList, RequestView};

pub use crate::dispatch::{Action, Context, HttpContext, RootContext, Status};
pub use crate::metrics::{Counters, FnvMap, FnvSet, NamedCounters};
pub use crate::shared_data::SharedData;

/// Wires a plugin's root context into the module's entry point: `main!(filter::Root)` in
/// lib.rs, `Root: Default`; `main!("rateLimit" => A, "idempotency" => B)` for one filter of
/// several stages (see [`crate::pipeline`]), each configured by its section. Installs the logger
/// first, so configure-time lines are kept.
pub use crate::__edge_main as main;

/// What [`main!`] runs when the VM starts.
#[doc(hidden)]
pub fn start(root: crate::dispatch::NewRoot) {
    ffi::call_ctors();
    crate::logger::init();
    crate::dispatch::set_root(root);
}

/// The request being filtered, read through hostcalls. Meaningful only during
/// `on_http_request_headers` (later, Envoy refuses request-header reads: they read as absent).
pub struct HostRequest;

impl RequestView for HostRequest {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        // Any status but OK (including Envoy's BadArgument outside the request-header phase)
        // reads as "absent" instead of trapping.
        crate::bus::request_header(name)
    }
    fn method(&self) -> Vec<u8> {
        self.header(":method").unwrap_or_default()
    }
    fn raw_path(&self) -> Vec<u8> {
        self.header(":path").unwrap_or_default()
    }
    fn client_ip(&self) -> Option<String> {
        let raw = crate::bus::client_address()?;
        client_ip(&String::from_utf8_lossy(&raw))
    }
    fn method_is(&self, test: &dyn Fn(&[u8]) -> bool) -> bool {
        crate::bus::request_header_is(":method", &|m| test(m.unwrap_or_default()))
    }
    fn path_is(&self, test: &dyn Fn(&[u8]) -> bool) -> bool {
        crate::bus::request_header_is(":path", &|p| {
            test(edge_core::request::without_query(p.unwrap_or_default()))
        })
    }
}

/// Reads the request headers with one hostcall for the rest of this callback (while the
/// guard lives), where a decision needs several of them; see [`HostRequest`].
pub use crate::bus::{read_request_once, ReadOnce};

/// The host's wall clock in nanoseconds since the epoch (0 if the host cannot say).
pub fn now_ns() -> u64 {
    crate::bus::now_ns()
}

/// Adds `n` to counter `id` (defined at configure time); a refusal is ignored, never a trap.
pub(crate) fn count(id: u32, n: u64) {
    let _ = ffi::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
}

/// The plugin's configuration bytes (empty when none was given); in a combined filter, the
/// section of the stage being configured.
pub(crate) fn plugin_configuration() -> Vec<u8> {
    if let Some((_, bytes)) = crate::bus::section() {
        return bytes;
    }
    ffi::get_buffer(ffi::PLUGIN_CONFIGURATION, 0, usize::MAX).unwrap_or_default()
}

/// The filter's `root_id` (empty when not configured).
fn root_id() -> String {
    ffi::get_property(&["plugin_root_id"])
        .map(edge_core::text::into_text)
        .unwrap_or_default()
}

/// A header of the response to this root context's callout (`None` when absent or unreadable).
pub fn callout_response_header(name: &str) -> Option<String> {
    ffi::get_header(ffi::HTTP_CALL_RESPONSE_HEADERS, name).map(edge_core::text::into_text)
}

/// Every header of the response being filtered (empty when unreadable).
pub fn response_headers() -> Vec<(String, Vec<u8>)> {
    ffi::get_header_pairs(ffi::RESPONSE_HEADERS).unwrap_or_default()
}

/// The response's status and every header, in one read (the pairs hold `:status`): for a
/// plugin that needs both, one crossing instead of two.
pub fn response_status_and_headers() -> (Option<u16>, Vec<(String, Vec<u8>)>) {
    let headers = response_headers();
    let status = headers
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| edge_core::text::parse_u64(v))
        .and_then(|s| u16::try_from(s).ok());
    (status, headers)
}

/// Every header of the request being filtered, pseudo-headers included (empty when
/// unreadable: outside `on_http_request_headers`, Envoy refuses the read).
pub fn request_headers() -> HeaderList {
    crate::bus::request_headers().unwrap_or_default()
}

/// `len` bytes of the request body buffered so far, from `start` (empty when unreadable).
pub fn request_body(start: usize, len: usize) -> Vec<u8> {
    ffi::get_buffer(ffi::REQUEST_BODY, start, len).unwrap_or_default()
}

/// The body of the response to this root context's callout (empty when unreadable).
pub fn callout_response_body(size: usize) -> Vec<u8> {
    ffi::get_buffer(ffi::HTTP_CALL_RESPONSE_BODY, 0, size).unwrap_or_default()
}

/// The bytes of the current response body chunk.
pub fn response_body_chunk(size: usize) -> Vec<u8> {
    ffi::get_buffer(ffi::RESPONSE_BODY, 0, size).unwrap_or_default()
}

/// A property as text (`None` when absent or unreadable), e.g. `["response", "code_details"]`.
pub fn property(path: &[&str]) -> Option<String> {
    ffi::get_property(path).map(edge_core::text::into_text)
}

/// Sends a local reply (any header value bytes). False when the host refused it (the SDK's
/// wrapper would trap instead), e.g. when the response has already started.
fn send_response(status: u32, headers: &[(&str, &[u8])], body: &[u8]) -> bool {
    ffi::send_local_response(status, headers, body) == ffi::OK
}

/// Logs a warning through `throttle` (see [`edge_core::throttle`]): at most one line per interval
/// per worker, with the number held back since the last one.
pub fn warn_throttled(throttle: &edge_core::throttle::Throttle, line: impl FnOnce() -> String) {
    if let Some(held) = throttle.pass(now_ns()) {
        if held > 0 {
            log::warn!("{} ({held} more like it not logged)", line());
        } else {
            log::warn!("{}", line());
        }
    }
}

/// Sends a policy's reply; a refusal is logged (as `plugin`) and reported as false, and the
/// stream then goes on untouched instead of trapping.
fn send_reply(plugin: &str, r: &edge_core::problem::Reply) -> bool {
    let headers: Vec<(&str, &[u8])> = r
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let sent = send_response(r.status, &headers, &r.body);
    if !sent {
        log::warn!("{plugin}: the host refused a local reply ({})", r.status);
    }
    sent
}

/// Answers with `r` and pauses the stream; when the host refuses the reply (logged), the
/// plugin's `if_refused` applies: `Continue` where forwarding the request is safe, `Pause`
/// where it must not reach the upstream unguarded.
pub fn answer(plugin: &str, r: &edge_core::problem::Reply, if_refused: Action) -> Action {
    if send_reply(plugin, r) {
        Action::Pause
    } else {
        if_refused
    }
}

/// Reads and parses the plugin configuration at configure time, following the host's log
/// level first; a rejection is logged as `<plugin>: configuration rejected: <field>: <why>`
/// (the line Envoy shows and the tests look for) and is `None`.
pub fn load_config<C>(
    plugin: &str,
    parse: impl FnOnce(&[u8]) -> Result<C, edge_core::ConfigError>,
) -> Option<C> {
    // Envoy's level for the `wasm` component, read at configure time: debug lines cost
    // nothing unless Envoy would print them.
    crate::logger::follow_host_level();
    match parse(&plugin_configuration()) {
        Ok(c) => Some(c),
        Err(e) => {
            // In a combined filter the field is named within its section.
            let e = match crate::bus::section() {
                Some((section, _)) => e.in_section(section),
                None => e,
            };
            log::error!("{plugin}: configuration rejected: {e}");
            None
        }
    }
}

/// The shared-data namespace of this plugin instance (`<prefix>/<root id>/`: two instances
/// of a plugin in one Envoy keep apart) and the key seed every worker shares.
pub fn namespace_and_seed(plugin: &str, prefix: &str) -> (String, u64) {
    let namespace = format!("{prefix}/{}/", root_id());
    let random = getrandom::u64().unwrap_or_else(|_| {
        log::warn!("{plugin}: the host gave no randomness; the key seed comes from the clock");
        now_ns() ^ 0x243f_6a88_85a3_08d3
    });
    let seed = worker_seed(plugin, &namespace, random);
    (namespace, seed)
}

/// The key seed every worker shares, kept at `<namespace>seed`; when shared data fails, this
/// worker's own `random` (logged: its keys then hash apart until a reload).
fn worker_seed(plugin: &str, namespace: &str, random: u64) -> u64 {
    let (seed, failed) = edge_core::key::shared_seed(
        &crate::shared_data::SharedData,
        &format!("{namespace}seed"),
        random,
    );
    if let Some(e) = failed {
        log::warn!("{plugin}: cannot share the key seed ({e}); using this worker's own");
    }
    seed
}

/// Applies a policy's edits to the request. False when the host refused any of them (the
/// caller logs: a header the plugin promised to strip may still be there).
pub fn edit_request_headers<S: AsRef<str>>(edits: &HeaderEdits<S>) -> bool {
    edit_headers(ffi::REQUEST_HEADERS, edits)
}

/// Applies a policy's edits to the response; false when the host refused any of them.
pub fn edit_response_headers<S: AsRef<str>>(edits: &HeaderEdits<S>) -> bool {
    edit_headers(ffi::RESPONSE_HEADERS, edits)
}

/// Removes, then sets, in header map `map`: every plugin's header edits in one place. A
/// refusal (e.g. after the headers went on) is a `false`, where the SDK's wrapper would trap.
fn edit_headers<S: AsRef<str>>(map: u32, edits: &HeaderEdits<S>) -> bool {
    let mut all = true;
    let request = map == ffi::REQUEST_HEADERS;
    for name in &edits.remove {
        if request && crate::bus::request_header_absent(name.as_ref()) {
            continue;
        }
        let ok = ffi::set_header(map, name.as_ref(), None) == ffi::OK;
        if ok && request {
            crate::bus::edited_request_header(name.as_ref(), None);
        }
        all &= ok;
    }
    for (name, value) in &edits.set {
        let value = value.as_ref().as_bytes();
        let ok = ffi::set_header(map, name.as_ref(), Some(value)) == ffi::OK;
        if ok && request {
            crate::bus::edited_request_header(name.as_ref(), Some(value));
        }
        all &= ok;
    }
    all
}

/// Starts the root context's periodic `on_tick`; the host's status when it refuses.
pub fn set_tick_period_ms(ms: u32) -> Result<(), u32> {
    if crate::bus::hold_tick(ms) {
        return Ok(());
    }
    match ffi::set_tick_period_ms(ms) {
        ffi::OK => Ok(()),
        status => Err(status),
    }
}

/// Sends an HTTP callout to `cluster`; its answer arrives in the root context's
/// `on_http_call_response` with the returned token.
pub fn dispatch_http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    timeout: core::time::Duration,
) -> Result<u32, Status> {
    http_call(cluster, headers, &[], timeout)
}

/// Like [`dispatch_http_call`], with a request body, from whichever context runs: called
/// from a stream, the answer comes back to that stream's `on_http_call_response`, and is
/// dropped if the stream has ended by then.
pub fn http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: &[u8],
    timeout: core::time::Duration,
) -> Result<u32, Status> {
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    let token = ffi::http_call(cluster, &pairs, body, millis(timeout)).map_err(Status::from_raw)?;
    crate::dispatch::started_http(token);
    crate::bus::started_call(token);
    Ok(token)
}

fn millis(timeout: core::time::Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

/// The `:status` of the answer to this context's callout; `None` when the callout failed
/// without one (Envoy delivers a failure with no headers).
pub fn callout_status() -> Option<u16> {
    let raw = ffi::get_header(ffi::HTTP_CALL_RESPONSE_HEADERS, ":status")?;
    edge_core::text::parse_u64(&raw).and_then(|s| u16::try_from(s).ok())
}

/// Sends a unary gRPC callout to `cluster` from whichever context runs; its answer comes back
/// to that context's `on_grpc_call_response`.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    message: &[u8],
    timeout: core::time::Duration,
) -> Result<u32, Status> {
    let token = ffi::grpc_call(cluster, service, method, message, millis(timeout))
        .map_err(Status::from_raw)?;
    crate::dispatch::started_grpc(token);
    crate::bus::started_call(token);
    Ok(token)
}

/// The message of this context's successful gRPC answer.
pub fn grpc_response(size: usize) -> Vec<u8> {
    ffi::get_buffer(ffi::GRPC_RECEIVE_BUFFER, 0, size).unwrap_or_default()
}

/// The status code and message of this context's failed gRPC call (Envoy reports a callout
/// timeout as 14 "upstream request timeout").
pub fn grpc_status() -> (u32, String) {
    ffi::status()
}

/// Lets a paused request go on; false when the host refused (the SDK's wrapper would trap).
pub fn resume_request() -> bool {
    if crate::bus::hold_resume(true) {
        return true;
    }
    ffi::continue_stream(ffi::STREAM_REQUEST) == ffi::OK
}

/// Lets a paused response go on; false when the host refused.
pub fn resume_response() -> bool {
    if crate::bus::hold_resume(false) {
        return true;
    }
    ffi::continue_stream(ffi::STREAM_RESPONSE) == ffi::OK
}

/// 16 random bytes from the host (WASI `random_get`), e.g. a claim's owner token; the clock
/// and a per-VM counter stand in when the host gives none, which keeps tokens distinct
/// within the VM.
pub fn random_token() -> [u8; 16] {
    use core::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; 16];
    if getrandom::fill(&mut out).is_err() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let (a, b) = out.split_at_mut(8);
        a.copy_from_slice(&now_ns().to_le_bytes());
        b.copy_from_slice(&n.to_le_bytes());
    }
    out
}
