//! Stored responses, shared by the plugins that keep an answer to serve again later (cached
//! fallback, idempotency): a compact binary form for shared data, the hop-by-hop headers that
//! must never be replayed, and the `Cache-Control` directives that decide what may be kept.

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

pub fn is_hop_by_hop(name: &str) -> bool {
    // Opaque to the optimiser, so the search stays a loop: unrolled over the constant names it
    // took 5 KB of every module that keeps responses.
    let names: &[&str] = std::hint::black_box(HOP_BY_HOP);
    name.starts_with(':') || names.iter().any(|h| name.eq_ignore_ascii_case(h))
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

impl StoredResponse {
    /// Appends a body chunk of `len` bytes, read by `read` only when it still fits under
    /// `max`: false (and the copy so far dropped) when it does not, so an oversized chunk is
    /// never even copied into the VM.
    pub fn append(&mut self, len: usize, max: u64, read: impl FnOnce() -> Vec<u8>) -> bool {
        let total = u64::try_from(self.body.len().saturating_add(len)).unwrap_or(u64::MAX);
        if total > max {
            self.body = Vec::new();
            return false;
        }
        if len > 0 {
            self.body.extend_from_slice(&read());
        }
        true
    }

    /// The bytes kept in shared data (hop-by-hop headers are dropped here).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 64);
        out.push(MAGIC);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.stored_at_ns.to_le_bytes());
        let kept: Vec<&(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(k, _)| !is_hop_by_hop(k))
            .collect();
        out.extend_from_slice(&u32::try_from(kept.len()).unwrap_or(0).to_le_bytes());
        for (k, v) in kept {
            put(&mut out, k.as_bytes());
            put(&mut out, v);
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
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// The `Cache-Control` directives that decide whether a response may be kept and served stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
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

    #[test]
    fn a_chunk_over_the_cap_is_never_read() {
        let mut r = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: Vec::new(),
            stored_at_ns: 0,
        };
        assert!(r.append(3, 5, || b"abc".to_vec()));
        assert!(!r.append(3, 5, || panic!("read past the cap")));
        assert!(r.body.is_empty(), "the partial copy is dropped");
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
