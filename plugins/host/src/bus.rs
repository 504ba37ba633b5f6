//! What the pipeline and the stages' hostcalls share while one callback runs: the VM is
//! single-threaded and a callback runs to its end, so a thread-local is the callback's scope.
//! Each piece is armed by the pipeline around the call that needs it and read by `host`:
//! the request's headers read once for every stage, the callouts a stage starts, a stage's
//! own section of a combined configuration, its timer and its resume.

use crate::ffi;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::cell::RefCell;
use edge_core::request::HeaderList;

/// A value read from the host at most once while armed.
#[derive(Clone, Default)]
enum Once<T> {
    #[default]
    Off,
    Unread,
    Read(T),
}

impl<T> Once<T> {
    fn arm(on: bool) -> Once<T> {
        if on {
            Once::Unread
        } else {
            Once::Off
        }
    }
}

/// The request's headers as one read returned them (serialised pairs, decoded only where
/// needed), and the edits stages made since, latest last.
#[derive(Clone, Default)]
struct Snapshot {
    raw: Option<Vec<u8>>,
    edits: Vec<(String, Option<Vec<u8>>)>,
}

impl Snapshot {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.header_ref(name).map(<[u8]>::to_vec)
    }

    /// The latest edit of `name`, else its value as read.
    fn header_ref(&self, name: &str) -> Option<&[u8]> {
        if let Some((_, v)) = self.edits.iter().rev().find(|(k, _)| k == name) {
            return v.as_deref();
        }
        ffi::find_pair(self.raw.as_deref()?, name)?
    }

    fn list(&self) -> Option<HeaderList> {
        let mut list = HeaderList::from_serialized(self.raw.clone()?)?;
        for (name, value) in &self.edits {
            list.remove(name);
            if let Some(v) = value {
                list.push(name, v);
            }
        }
        Some(list)
    }
}

struct Bus {
    /// Armed during request headers.
    request: Once<Snapshot>,
    client_address: Once<Option<Vec<u8>>>,
    /// Callouts started by the stage now running; recorded only in a pipeline, which hands
    /// them to their stage (a separate module's SDK routes answers itself, and would only
    /// pile them up).
    tokens: Vec<u32>,
    record_tokens: bool,
    section: Option<(&'static str, Vec<u8>)>,
    tick_ms: Option<u32>,
    /// Resumes are held for the pipeline: `Some(None)` holding, none asked yet.
    resume: Option<Option<bool>>,
    /// The host's clock, read once per pipeline callback when armed.
    now: Once<u64>,
}

impl Bus {
    const fn new() -> Bus {
        Bus {
            request: Once::Off,
            client_address: Once::Off,
            tokens: Vec::new(),
            record_tokens: false,
            section: None,
            tick_ms: None,
            resume: None,
            now: Once::Off,
        }
    }
}

crate::local::vm_local! {
    // Const-initialised: every access is a plain static's, with no lazy-init check (the bus
    // is reached several times per stage per callback).
    static BUS: RefCell<Bus> = const { RefCell::new(Bus::new()) };
}

fn with<R>(f: impl FnOnce(&mut Bus) -> R) -> R {
    BUS.with(|b| f(&mut b.borrow_mut()))
}

/// Arms (or drops) the one read of the request's headers and client address that every stage
/// of this callback shares.
pub fn snapshot_request(on: bool) {
    with(|b| {
        b.request = Once::arm(on);
        b.client_address = Once::arm(on);
    });
}

/// Arms the shared read of the request for as long as the guard lives, unless something
/// already has (a pipeline's callback): a separate module's glue takes one where its decision
/// needs several request headers, so they cost one crossing.
pub fn read_request_once() -> ReadOnce {
    let armed_here = with(|b| {
        if matches!(b.request, Once::Off) {
            b.request = Once::Unread;
            b.client_address = Once::Unread;
            true
        } else {
            false
        }
    });
    ReadOnce(armed_here)
}

/// See [`read_request_once`].
pub struct ReadOnce(bool);

impl Drop for ReadOnce {
    fn drop(&mut self) {
        if self.0 {
            snapshot_request(false);
        }
    }
}

fn snapshot<R>(f: impl FnOnce(&Snapshot) -> R) -> Option<R> {
    if with(|b| matches!(b.request, Once::Unread)) {
        let raw = ffi::get_header_pairs_raw(ffi::REQUEST_HEADERS);
        with(|b| {
            b.request = Once::Read(Snapshot {
                raw,
                edits: Vec::new(),
            })
        });
    }
    with(|b| match &b.request {
        Once::Read(s) => Some(f(s)),
        _ => None,
    })
}

/// Whether the shared read, when already taken, shows `name` absent (as the map is now): a
/// removal of it would be a crossing for nothing.
pub fn request_header_absent(name: &str) -> bool {
    with(|b| match &b.request {
        Once::Read(s) => match s.edits.iter().rev().find(|(k, _)| k == name) {
            Some((_, v)) => v.is_none(),
            None => s
                .raw
                .as_deref()
                .is_some_and(|raw| ffi::find_pair(raw, name) == Some(None)),
        },
        _ => false,
    })
}

/// A request header (the first value), from the shared read when armed.
pub fn request_header(name: &str) -> Option<Vec<u8>> {
    match snapshot(|s| s.header(name)) {
        Some(v) => v,
        None => ffi::get_header(ffi::REQUEST_HEADERS, name),
    }
}

/// Whether a request header passes `test`, read from the shared read when armed (no copy),
/// else from the host. `test` runs while the bus is borrowed: callers pass policy code
/// (route matching), which cannot reach the host.
pub fn request_header_is(name: &str, test: &dyn Fn(Option<&[u8]>) -> bool) -> bool {
    if snapshot(|_| ()).is_some() {
        return with(|b| match &b.request {
            Once::Read(s) => test(s.header_ref(name)),
            _ => test(None),
        });
    }
    test(ffi::get_header(ffi::REQUEST_HEADERS, name).as_deref())
}

/// Every request header, from the shared read when armed.
pub fn request_headers() -> Option<HeaderList> {
    match snapshot(Snapshot::list) {
        Some(v) => v,
        None => HeaderList::from_serialized(ffi::get_header_pairs_raw(ffi::REQUEST_HEADERS)?),
    }
}

/// The `source.address` property, read once per request-headers callback when armed.
pub fn client_address() -> Option<Vec<u8>> {
    let cached = with(|b| b.client_address.clone());
    match cached {
        Once::Read(v) => v,
        Once::Unread => {
            let v = ffi::get_property(&["source", "address"]);
            with(|b| b.client_address = Once::Read(v.clone()));
            v
        }
        Once::Off => ffi::get_property(&["source", "address"]),
    }
}

/// Keeps the shared read equal to the map after a stage's edit that the host accepted.
pub fn edited_request_header(name: &str, value: Option<&[u8]>) {
    with(|b| {
        if let Once::Read(s) = &mut b.request {
            s.edits.push((name.to_string(), value.map(<[u8]>::to_vec)));
        }
    });
}

/// Arms (or drops) one read of the clock for every stage of this callback: the stages of one
/// callback decide at one instant, as the chain's filters would within a microsecond.
pub fn one_clock(on: bool) {
    with(|b| b.now = Once::arm(on));
}

/// The host's clock in nanoseconds, from the callback's one read when armed.
pub fn now_ns() -> u64 {
    match with(|b| b.now.clone()) {
        Once::Read(t) => t,
        Once::Unread => {
            let t = ffi::current_time_ns().unwrap_or(0);
            with(|b| b.now = Once::Read(t));
            t
        }
        Once::Off => ffi::current_time_ns().unwrap_or(0),
    }
}

/// From now on, callouts are recorded for the pipeline to route (see [`start_tokens`]).
pub fn record_tokens() {
    with(|b| b.record_tokens = true);
}

/// Records a callout token for the stage now running, in a pipeline.
pub fn started_call(token: u32) {
    with(|b| {
        if b.record_tokens {
            b.tokens.push(token);
        }
    });
}

/// Starts recording the callouts of the stage about to run, forgetting any that no pipeline
/// took (one a stage started from a callback the pipeline does not route, such as `on_log`,
/// whose answer the dispatcher drops once the stream is gone). A callback runs one stage at a
/// time, so these windows never nest; at most one window's tokens are ever held.
pub fn start_tokens() {
    with(|b| b.tokens.clear());
}

/// Hands `to` each token the running stage recorded since [`start_tokens`] and forgets them.
/// A stage that started no callout (nearly every call) costs a read of a length.
pub fn take_tokens(mut to: impl FnMut(u32)) {
    with(|b| {
        if !b.tokens.is_empty() {
            b.tokens.drain(..).for_each(&mut to);
        }
    });
}

/// Gives the stage about to be configured its section (and holds its timer request).
pub fn configuring(section: &'static str, bytes: Vec<u8>) {
    with(|b| {
        b.section = Some((section, bytes));
        b.tick_ms = None;
    });
}

/// Ends a stage's configuration: the tick period it asked for.
pub fn done_configuring() -> Option<u32> {
    with(|b| {
        b.section = None;
        b.tick_ms.take()
    })
}

/// The section a stage is being configured with, when the filter is combined.
pub fn section() -> Option<(&'static str, Vec<u8>)> {
    with(|b| b.section.clone())
}

/// A stage's timer request while configuring a combined filter: held (true) for the pipeline,
/// which sets one host timer for every stage.
pub fn hold_tick(ms: u32) -> bool {
    with(|b| {
        if b.section.is_some() {
            b.tick_ms = Some(ms);
            true
        } else {
            false
        }
    })
}

/// Starts (`true`) holding a stage's resumes for the pipeline, or stops and says which one
/// was asked: `Some(true)` the request, `Some(false)` the response.
pub fn intercept_resume(on: bool) -> Option<bool> {
    with(|b| {
        let asked = b.resume.flatten();
        b.resume = on.then_some(None);
        if on {
            None
        } else {
            asked
        }
    })
}

/// A stage's resume while the pipeline holds them: recorded (true), not sent.
pub fn hold_resume(request: bool) -> bool {
    with(|b| match &mut b.resume {
        Some(asked) => {
            *asked = Some(request);
            true
        }
        None => false,
    })
}

/// Sends a resume to the host; false when refused.
pub fn resume(request: bool) -> bool {
    let stream = if request {
        ffi::STREAM_REQUEST
    } else {
        ffi::STREAM_RESPONSE
    };
    let sent = ffi::continue_stream(stream) == ffi::OK;
    if !sent {
        log::warn!("edge: the host refused to resume a stream");
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn the_shared_read_hands_the_headers_with_every_edit_a_stage_made() {
        let raw = ffi::encode_pairs(&[(":path", b"/a"), ("x-route", b"forged"), ("x-gone", b"1")]);
        let snapshot = Snapshot {
            raw: Some(raw),
            edits: vec![
                ("x-route".into(), Some(b"v2".to_vec())),
                ("x-gone".into(), None),
                ("x-new".into(), Some(b"yes".to_vec())),
            ],
        };
        let list = snapshot.list().unwrap();
        let pairs: Vec<(&[u8], &[u8])> = list.iter().collect();
        assert_eq!(
            pairs,
            [
                (&b":path"[..], &b"/a"[..]),
                (b"x-route", b"v2"),
                (b"x-new", b"yes")
            ]
        );
        assert_eq!(snapshot.header("x-route"), Some(b"v2".to_vec()));
        assert_eq!(snapshot.header("x-gone"), None);
    }

    fn held() -> usize {
        with(|b| b.tokens.len())
    }

    #[test]
    fn a_separate_module_keeps_no_callout_tokens() {
        // Each test runs on its own thread: its own bus.
        for token in 0..1000 {
            started_call(token);
        }
        assert_eq!(
            held(),
            0,
            "a module without a pipeline would grow by every callout"
        );
    }

    #[test]
    fn a_pipeline_gets_each_stage_its_own_tokens_and_holds_no_others() {
        record_tokens();
        start_tokens();
        started_call(1);
        started_call(2);
        let mut got = Vec::new();
        take_tokens(|t| got.push(t));
        assert_eq!(got, [1, 2]);
        start_tokens();
        take_tokens(|t| got.push(t));
        assert_eq!(got, [1, 2], "a stage that started nothing gets nothing");
        // Callouts from a callback no window covers (a stage's `on_log`) are dropped by the
        // next window: nothing piles up.
        for token in 0..1000 {
            started_call(token);
        }
        start_tokens();
        started_call(7);
        take_tokens(|t| got.push(t));
        assert_eq!(got, [1, 2, 7]);
        assert_eq!(held(), 0);
    }
}
