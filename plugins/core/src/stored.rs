//! Stored responses, shared by the plugins that keep an answer to serve again later (cached
//! fallback, idempotency): a compact binary form for shared data, the hop-by-hop headers that
//! must never be replayed, and the `Cache-Control` directives that decide what may be kept.

use crate::problem::Reply;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::cell::Cell;

/// Headers that describe one connection, not the response (RFC 9110 section 7.6.1), plus
/// Envoy's per-hop additions: never stored, never replayed.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "content-length",
    "date",
    "x-envoy-upstream-service-time",
];

/// Bit `n` set when a name of `HOP_BY_HOP` is `n` bytes long (all are shorter than 64).
const HOP_BY_HOP_LENGTHS: u64 = {
    let mut mask = 0u64;
    let mut i = 0;
    while i < HOP_BY_HOP.len() {
        #[allow(clippy::indexing_slicing)]
        // evaluated at compile time: out of bounds fails the build
        let n = HOP_BY_HOP[i].len();
        assert!(n < 64);
        mask |= 1 << n;
        i += 1;
    }
    mask
};

pub fn is_hop_by_hop(name: &str) -> bool {
    if name.starts_with(':') {
        return true;
    }
    // Most names have a length no hop-by-hop name has: refused without a comparison.
    if name.len() >= 64 || HOP_BY_HOP_LENGTHS >> name.len() & 1 == 0 {
        return false;
    }
    // Opaque to the optimiser, so the search stays a loop: unrolled over the constant names it
    // took 5 KB of every module that keeps responses.
    let names: &[&str] = core::hint::black_box(HOP_BY_HOP);
    names.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// A response as kept in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// When it was stored (wall clock, nanoseconds).
    pub stored_at_ns: u64,
}

const MAGIC: u8 = 1;

/// The largest response body a plugin copies to keep (`maxBodyBytes` may not exceed it): a
/// worker holds each copy in its VM's memory until the response ends.
pub const MAX_BODY_BYTES_LIMIT: u64 = 64 << 20;

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

/// The response body bytes one worker holds in copies at once, across all its streams. Each
/// copy is bounded by `maxBodyBytes`, but clients choose how many run concurrently: without
/// this bound enough of them exhaust the VM's memory, and a failed allocation traps it.
#[derive(Clone, Debug)]
pub struct CopyBudget(Rc<Cell<u64>>);

impl CopyBudget {
    pub fn new(max_bytes: u64) -> CopyBudget {
        CopyBudget(Rc::new(Cell::new(max_bytes)))
    }

    /// Bytes still free.
    pub fn available(&self) -> u64 {
        self.0.get()
    }

    fn take(&self, n: u64) -> bool {
        let left = self.0.get();
        if n > left {
            return false;
        }
        self.0.set(left - n);
        true
    }

    fn give(&self, n: u64) {
        self.0.set(self.0.get().saturating_add(n));
    }
}

/// Why a response copy was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The body is larger than `maxBodyBytes`.
    TooLarge,
    /// The worker's copies together would exceed `maxBufferedBytes`.
    OverBudget,
}

impl Dropped {
    /// Why, for the log.
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::TooLarge => "body over maxBodyBytes",
            Dropped::OverBudget => "this worker already holds maxBufferedBytes of response copies",
        }
    }
}

/// How a copied response ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Copied {
    /// All of it arrived.
    Whole(StoredResponse),
    /// It was given up on the way.
    Dropped(Dropped),
    /// The stream ended before the response did (client gone, upstream reset mid-body): what
    /// arrived is not the answer.
    CutShort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyState {
    Copying,
    Whole,
    Dropped(Dropped),
}

/// A response being copied as it streams, to be kept once it is whole. Its body bytes are
/// held against the worker's [`CopyBudget`] until it is finished or dropped.
#[derive(Debug)]
pub struct ResponseCopy {
    response: StoredResponse,
    max_body: u64,
    budget: CopyBudget,
    held: u64,
    state: CopyState,
}

impl ResponseCopy {
    /// Starts a copy of a response with `status` and `headers`.
    pub fn new(
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        max_body: u64,
        budget: CopyBudget,
    ) -> ResponseCopy {
        ResponseCopy {
            response: StoredResponse {
                status,
                headers,
                body: Vec::new(),
                stored_at_ns: 0,
            },
            max_body,
            budget,
            held: 0,
            state: CopyState::Copying,
        }
    }

    /// A body chunk of `len` bytes (`end`: the last), read by `read` only when it still fits
    /// under `maxBodyBytes` and the budget, so an oversized chunk is never copied into the VM.
    /// Returns why the copy was given up, the moment it is.
    pub fn body(
        &mut self,
        len: usize,
        end: bool,
        read: impl FnOnce() -> Vec<u8>,
    ) -> Option<Dropped> {
        if self.state != CopyState::Copying {
            return None;
        }
        let n = u64::try_from(len).unwrap_or(u64::MAX);
        let why = if self.held.saturating_add(n) > self.max_body {
            Some(Dropped::TooLarge)
        } else if !self.budget.take(n) {
            Some(Dropped::OverBudget)
        } else {
            None
        };
        if let Some(why) = why {
            self.release();
            self.state = CopyState::Dropped(why);
            return Some(why);
        }
        self.held = self.held.saturating_add(n);
        if len > 0 {
            let chunk = read();
            self.response
                .body
                .extend_from_slice(chunk.get(..len).unwrap_or(&chunk));
        }
        if end {
            self.state = CopyState::Whole;
        }
        None
    }

    /// The response ended (the headers ended the stream, or trailers arrived).
    pub fn end(&mut self) {
        if self.state == CopyState::Copying {
            self.state = CopyState::Whole;
        }
    }

    /// How the copy ended (its bytes go back to the budget).
    pub fn finish(mut self) -> Copied {
        let copied = match self.state {
            CopyState::Whole => Copied::Whole(core::mem::take(&mut self.response)),
            CopyState::Dropped(why) => Copied::Dropped(why),
            CopyState::Copying => Copied::CutShort,
        };
        self.release();
        copied
    }

    fn release(&mut self) {
        self.budget.give(core::mem::take(&mut self.held));
        self.response.body = Vec::new();
    }
}

/// Copies are equal when they hold the same response in the same state (the budget they
/// draw on is the worker's, not theirs).
impl PartialEq for ResponseCopy {
    fn eq(&self, other: &ResponseCopy) -> bool {
        (&self.response, self.max_body, self.held, self.state)
            == (&other.response, other.max_body, other.held, other.state)
    }
}

impl Eq for ResponseCopy {}

impl Drop for ResponseCopy {
    fn drop(&mut self) {
        self.release();
    }
}

impl StoredResponse {
    /// The stored response as a reply: its status, headers (with `set` replacing any of the
    /// same names) and body.
    pub fn into_reply(self, set: Vec<(&str, Vec<u8>)>) -> Reply {
        let mut headers = self.headers;
        headers.retain(|(k, _)| !set.iter().any(|(s, _)| k.eq_ignore_ascii_case(s)));
        headers.extend(set.into_iter().map(|(k, v)| (k.to_string(), v)));
        Reply {
            status: u32::from(self.status),
            headers,
            body: self.body,
        }
    }

    /// The bytes kept in shared data (hop-by-hop headers are dropped here).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 64);
        out.push(MAGIC);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.stored_at_ns.to_le_bytes());
        // The count of kept headers is written once they are.
        let count_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut kept = 0u32;
        for (k, v) in self.headers.iter().filter(|(k, _)| !is_hop_by_hop(k)) {
            put(&mut out, k.as_bytes());
            put(&mut out, v);
            kept += 1;
        }
        if let Some(count) = out.get_mut(count_at..count_at + 4) {
            count.copy_from_slice(&kept.to_le_bytes());
        }
        put(&mut out, &self.body);
        out
    }

    /// `None` for anything that is not an encoded response (never a panic).
    pub fn decode(bytes: &[u8]) -> Option<StoredResponse> {
        let mut r = Reader(bytes);
        if r.take(1)? != [MAGIC] {
            return None;
        }
        let status = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        let stored_at_ns = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let n = r.u32()?;
        let mut headers = Vec::new();
        for _ in 0..n {
            let k = String::from_utf8(r.bytes()?.to_vec()).ok()?;
            headers.push((k, r.bytes()?.to_vec()));
        }
        let body = r.bytes()?.to_vec();
        r.0.is_empty().then_some(StoredResponse {
            status,
            headers,
            body,
            stored_at_ns,
        })
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        crate::problem::first_header(&self.headers, name)
    }
}

/// The `Cache-Control` directives that decide whether a response may be kept and served stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub s_maxage: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl CacheControl {
    /// Parses every `Cache-Control` value given (directives are case-insensitive; unknown ones
    /// are ignored, a malformed number ignores its directive).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in values {
            for d in value.split(|&b| b == b',') {
                let d = String::from_utf8_lossy(d.trim_ascii()).to_ascii_lowercase();
                let (name, arg) = match d.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (d.as_str(), None),
                };
                let num = || arg.and_then(|a| a.parse::<u64>().ok());
                match name {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "s-maxage" => cc.s_maxage = num().or(cc.s_maxage),
                    "stale-if-error" => cc.stale_if_error = num().or(cc.stale_if_error),
                    _ => {}
                }
            }
        }
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn copy(max_body: u64, budget: &CopyBudget) -> ResponseCopy {
        ResponseCopy::new(200, Vec::new(), max_body, budget.clone())
    }

    #[test]
    fn a_chunk_over_the_cap_is_never_read() {
        let budget = CopyBudget::new(100);
        let mut c = copy(5, &budget);
        assert_eq!(c.body(3, false, || b"abc".to_vec()), None);
        assert_eq!(budget.available(), 97);
        assert_eq!(
            c.body(3, false, || panic!("read past the cap")),
            Some(Dropped::TooLarge)
        );
        assert_eq!(budget.available(), 100, "the partial copy is given back");
        assert_eq!(c.body(1, true, || panic!("read after the drop")), None);
        assert_eq!(c.finish(), Copied::Dropped(Dropped::TooLarge));
    }

    #[test]
    fn copies_together_stay_within_the_workers_budget() {
        let budget = CopyBudget::new(10);
        let (mut a, mut b) = (copy(8, &budget), copy(8, &budget));
        assert_eq!(a.body(6, false, || vec![1; 6]), None);
        assert_eq!(
            b.body(6, false, || panic!("read over the budget")),
            Some(Dropped::OverBudget)
        );
        assert_eq!(b.finish(), Copied::Dropped(Dropped::OverBudget));
        // A copy that ends gives its bytes back, even one never finished (its stream gone).
        drop(a);
        assert_eq!(budget.available(), 10);
        let mut c = copy(8, &budget);
        assert_eq!(c.body(4, false, || vec![2; 4]), None);
        assert_eq!(c.body(4, true, || vec![3; 4]), None);
        let Copied::Whole(r) = c.finish() else {
            panic!("a whole response")
        };
        assert_eq!(r.body, [2, 2, 2, 2, 3, 3, 3, 3]);
        assert_eq!(budget.available(), 10);
    }

    #[test]
    fn only_a_response_that_ended_is_whole() {
        let budget = CopyBudget::new(100);
        let mut c = copy(50, &budget);
        assert_eq!(c.body(4, false, || b"half".to_vec()), None);
        assert_eq!(c.finish(), Copied::CutShort);
        let mut t = copy(50, &budget);
        assert_eq!(t.body(4, false, || b"body".to_vec()), None);
        t.end();
        assert!(matches!(t.finish(), Copied::Whole(r) if r.body == b"body"));
        let mut headers_only = ResponseCopy::new(204, Vec::new(), 50, budget.clone());
        headers_only.end();
        assert!(matches!(headers_only.finish(), Copied::Whole(r) if r.status == 204));
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn a_reply_from_a_stored_response_replaces_the_headers_it_sets() {
        let r = sample().into_reply(vec![("X-Bin", b"new".to_vec()), ("age", b"3".to_vec())]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"ok\":true}");
        let values = |name: &str| -> Vec<&[u8]> {
            r.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
                .collect()
        };
        assert_eq!(values("x-bin"), [b"new"]);
        assert_eq!(values("age"), [b"3"]);
        assert_eq!(values("content-type"), [b"application/json"]);
    }

    fn sample() -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("connection".into(), b"keep-alive".to_vec()),
                ("x-bin".into(), vec![0, 255, 10]),
                ("Transfer-Encoding".into(), b"chunked".to_vec()),
            ],
            body: b"{\"ok\":true}".to_vec(),
            stored_at_ns: 42,
        }
    }

    #[test]
    fn every_hop_by_hop_name_is_one_in_any_case_and_others_are_not() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
            assert!(
                is_hop_by_hop(&name.to_ascii_uppercase()),
                "{name} in capitals"
            );
        }
        assert!(is_hop_by_hop(":status"));
        for name in [
            "content-type",
            "etag",
            "dates",
            "tee",
            "x-envoy-upstream-service",
            "",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
        assert!(!is_hop_by_hop(&"x".repeat(64)));
    }

    #[test]
    fn round_trips_without_hop_by_hop_headers() {
        let back = StoredResponse::decode(&sample().encode()).unwrap();
        assert_eq!(back.status, 200);
        assert_eq!(back.body, b"{\"ok\":true}");
        assert_eq!(back.stored_at_ns, 42);
        assert_eq!(back.header("content-type"), Some(&b"application/json"[..]));
        assert_eq!(back.header("x-bin"), Some(&[0u8, 255, 10][..]));
        assert_eq!(back.header("connection"), None);
        assert_eq!(back.header("transfer-encoding"), None);
    }

    #[test]
    fn truncated_or_foreign_bytes_decode_to_nothing() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert_eq!(StoredResponse::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(StoredResponse::decode(&longer), None);
        assert_eq!(StoredResponse::decode(b"\x02anything"), None);
    }

    #[test]
    fn cache_control_directives_are_found_in_any_case_and_value() {
        let cc = CacheControl::parse([
            &b"Public, S-MaxAge=60"[..],
            &b"stale-if-error=\"300\", must-revalidate, x-custom=1"[..],
        ]);
        assert!(cc.public && cc.must_revalidate && !cc.no_store && !cc.private);
        assert_eq!((cc.s_maxage, cc.stale_if_error), (Some(60), Some(300)));
        let cc = CacheControl::parse([&b"no-store,private, stale-if-error=soon"[..]]);
        assert!(cc.no_store && cc.private);
        assert_eq!(cc.stale_if_error, None);
    }
}
