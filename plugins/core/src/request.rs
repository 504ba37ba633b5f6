//! What a policy may read from a request, behind a trait so policies are tested natively: the
//! filter glue implements [`RequestView`] over hostcalls, tests use [`RequestParts`].

use crate::ip;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;

/// The parts of a request a policy decides on. Header names are lower-case.
pub trait RequestView {
    fn header(&self, name: &str) -> Option<Vec<u8>>;
    fn method(&self) -> Vec<u8>;
    /// `:path` as sent, query included.
    fn raw_path(&self) -> Vec<u8>;
    /// The downstream address without its port, in canonical form (see [`client_ip`]).
    fn client_ip(&self) -> Option<String>;

    /// The path without its query string: what route rules and path keys use, so `?x=1`
    /// cannot dodge a per-path limit.
    fn path(&self) -> Vec<u8> {
        without_query(&self.raw_path()).to_vec()
    }

    /// Whether the method passes `test` (see [`RequestView::path_is`]).
    fn method_is(&self, test: &dyn Fn(&[u8]) -> bool) -> bool {
        test(&self.method())
    }

    /// Whether the path without its query passes `test`: route matching reads it for every
    /// rule of every request, and a view that holds the bytes lends them instead of copying.
    /// (`dyn`: one body per view, not one per caller, in every module.)
    fn path_is(&self, test: &dyn Fn(&[u8]) -> bool) -> bool {
        test(&self.path())
    }

    /// The first cookie named `name` in the `cookie` header.
    fn cookie(&self, name: &str) -> Option<Vec<u8>> {
        let header = self.header("cookie")?;
        header
            .split(|&b| b == b';')
            .filter_map(|pair| {
                let eq = pair.iter().position(|&b| b == b'=')?;
                let (k, v) = pair.split_at(eq);
                (k.trim_ascii() == name.as_bytes()).then(|| v.get(1..).unwrap_or(&[]).to_vec())
            })
            .next()
            .map(|v| v.trim_ascii().to_vec())
    }
}

/// The address Envoy reports (`1.2.3.4:5678`, `[2001:db8::1]:443`) as the client's IP alone, in
/// canonical text form so one client is one key however the address is spelled (IPv4-mapped
/// IPv6 becomes IPv4). Anything that is not an IP (a pipe, say) is kept as is.
pub fn client_ip(address: &str) -> Option<String> {
    let a = address.trim();
    if a.is_empty() {
        return None;
    }
    // What Envoy reports for IPv4 clients, `1.2.3.4:5678`, is already canonical: the parser
    // rejects any other spelling (leading zeros, fewer parts), so the text is kept as is.
    if let Some((host, port)) = a.rsplit_once(':') {
        if !host.contains(':')
            && port.bytes().all(|b| b.is_ascii_digit())
            && ip::v4(host.as_bytes()).is_some()
        {
            return Some(host.to_string());
        }
    }
    let b = a.as_bytes();
    if ip::v4(b).is_some() {
        return Some(a.to_string());
    }
    if let Some(groups) = ip::bracketed_v6(b).or_else(|| ip::v6(b)) {
        return Some(ip::v6_text(groups));
    }
    // `[1.2.3.4]`, `[::1]`
    let inner = a.trim_start_matches('[').trim_end_matches(']');
    if ip::v4(inner.as_bytes()).is_some() {
        return Some(inner.to_string());
    }
    Some(ip::v6(inner.as_bytes()).map_or_else(|| a.to_string(), ip::v6_text))
}

/// A request as plain data, for unit tests and for tools that replay requests.
#[derive(Clone, Debug, Default)]
pub struct RequestParts {
    pub method: String,
    pub path: String,
    pub headers: HeaderList,
    pub client_ip: Option<String>,
}

/// Header pairs in one buffer: the host's serialised map kept as it came, or pairs pushed one
/// by one. A request's headers, kept until its response, then cost two allocations rather
/// than two per header. Names and values are bytes, compared as bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderList {
    bytes: Vec<u8>,
    /// Per pair, in order: where its name and its value are in `bytes` (start, length).
    at: Vec<[usize; 4]>,
}

/// One pair of a serialised header map, and where its name and value start in the bytes.
pub struct SerializedPair<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    pub name_at: usize,
    pub value_at: usize,
}

/// Walks the proxy-wasm ABI's serialised header map (a count, then (name length, value length)
/// pairs, then each name and value followed by a NUL), handing `each` the pairs in order until
/// it returns false. `None` when the bytes stop holding what the count says before then (the
/// last NUL may be missing); empty bytes are an empty map. The one reader of the format: the
/// shared read of a request, single header lookups and whole decodes all walk with it.
pub fn walk_serialized<'a>(
    bytes: &'a [u8],
    mut each: impl FnMut(SerializedPair<'a>) -> bool,
) -> Option<()> {
    if bytes.is_empty() {
        return Some(());
    }
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let n = word(0)?;
    let mut sizes = 4usize;
    let mut at = sizes.checked_add(n.checked_mul(8)?)?;
    for _ in 0..n {
        let (k, v) = (word(sizes)?, word(sizes.checked_add(4)?)?);
        sizes += 8;
        let name = bytes.get(at..at.checked_add(k)?)?;
        let value_at = at.checked_add(k)?.checked_add(1)?;
        let value = bytes.get(value_at..value_at.checked_add(v)?)?;
        let pair = SerializedPair {
            name,
            value,
            name_at: at,
            value_at,
        };
        at = value_at.checked_add(v)?.checked_add(1)?;
        if !each(pair) {
            break;
        }
    }
    Some(())
}

/// The pair count a serialised header map announces, capped: room to reserve before a walk.
pub fn serialized_count(bytes: &[u8]) -> usize {
    let n = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes);
    usize::try_from(n).unwrap_or(0).min(256)
}

impl HeaderList {
    /// The host's serialised header map (see [`walk_serialized`]), kept as is and indexed in
    /// place. `None` when the bytes do not hold what the count says.
    pub fn from_serialized(bytes: Vec<u8>) -> Option<HeaderList> {
        let mut index = Vec::with_capacity(serialized_count(&bytes));
        walk_serialized(&bytes, |p| {
            index.push([p.name_at, p.name.len(), p.value_at, p.value.len()]);
            true
        })?;
        Some(HeaderList { bytes, at: index })
    }

    /// Appends a pair.
    pub fn push(&mut self, name: &str, value: &[u8]) {
        let name_at = self.bytes.len();
        self.bytes.extend_from_slice(name.as_bytes());
        let value_at = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.at.push([name_at, name.len(), value_at, value.len()]);
    }

    /// Drops every pair named `name` (their bytes stay until the list does).
    pub fn remove(&mut self, name: &str) {
        self.retain(|k, _| k != name.as_bytes());
    }

    /// Keeps the pairs `keep` accepts (name, value), in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) {
        let bytes = &self.bytes;
        self.at.retain(|p| {
            keep(
                slice(bytes, p[0], p[1]).unwrap_or_default(),
                slice(bytes, p[2], p[3]).unwrap_or_default(),
            )
        });
    }

    /// Each pair, in order: (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.at.iter().map(|p| {
            (
                slice(&self.bytes, p[0], p[1]).unwrap_or_default(),
                slice(&self.bytes, p[2], p[3]).unwrap_or_default(),
            )
        })
    }

    /// The first value of `name` (names as the host gives them: lowercase).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// Every value of `name`, its case ignored, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

fn slice(bytes: &[u8], start: usize, len: usize) -> Option<&[u8]> {
    bytes.get(start..start.checked_add(len)?)
}

impl RequestParts {
    pub fn new(method: &str, path: &str) -> Self {
        RequestParts {
            method: method.into(),
            path: path.into(),
            ..Default::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push(&name.to_ascii_lowercase(), value.as_bytes());
        self
    }

    pub fn from_ip(mut self, address: &str) -> Self {
        self.client_ip = client_ip(address);
        self
    }
}

impl RequestView for RequestParts {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.get(name).map(<[u8]>::to_vec)
    }
    // Captured pseudo-headers win: they are the client's exact bytes, where `method` and
    // `path` are text for logs and tests.
    fn method(&self) -> Vec<u8> {
        self.header(":method")
            .unwrap_or_else(|| self.method.as_bytes().to_vec())
    }
    fn raw_path(&self) -> Vec<u8> {
        self.header(":path")
            .unwrap_or_else(|| self.path.as_bytes().to_vec())
    }
    fn client_ip(&self) -> Option<String> {
        self.client_ip.clone()
    }
    fn method_is(&self, test: &dyn Fn(&[u8]) -> bool) -> bool {
        test(
            self.headers
                .get(":method")
                .unwrap_or(self.method.as_bytes()),
        )
    }
    fn path_is(&self, test: &dyn Fn(&[u8]) -> bool) -> bool {
        test(without_query(
            self.headers.get(":path").unwrap_or(self.path.as_bytes()),
        ))
    }
}

/// A `:path` up to its query string.
pub fn without_query(raw: &[u8]) -> &[u8] {
    match raw.iter().position(|&b| b == b'?') {
        Some(q) => raw.get(..q).unwrap_or(raw),
        None => raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    #[test]
    fn lent_method_and_path_are_the_ones_read() {
        // Text fields only, pseudo-headers that win over them, queries and bare `?`s.
        let mut cases = vec![
            RequestParts::new("GET", "/a/b?x=1"),
            RequestParts::new("POST", "/?"),
            RequestParts::new("", ""),
        ];
        let mut captured = RequestParts::new("GET", "/text");
        captured.headers.push(":method", b"PUT");
        captured.headers.push(":path", b"/bytes?q");
        cases.push(captured);
        for r in &cases {
            assert!(r.method_is(&|m| m == r.method().as_slice()), "{r:?}");
            assert!(r.path_is(&|p| p == r.path().as_slice()), "{r:?}");
            assert!(!r.path_is(&|p| p.contains(&b'?')), "{r:?}");
        }
        assert!(cases[3].path_is(&|p| p == b"/bytes"));
    }

    #[test]
    fn client_ip_drops_the_port_for_ipv4_and_ipv6() {
        assert_eq!(client_ip("10.0.0.7:51234").as_deref(), Some("10.0.0.7"));
        assert_eq!(
            client_ip("[2001:DB8:0:0::1]:443").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            client_ip("[::ffff:10.0.0.7]:80").as_deref(),
            Some("10.0.0.7")
        );
        assert_eq!(client_ip("2001:db8::1").as_deref(), Some("2001:db8::1"));
        assert_eq!(client_ip("10.0.0.7").as_deref(), Some("10.0.0.7"));
        assert_eq!(client_ip("").as_deref(), None);
        assert_eq!(client_ip("@pipe").as_deref(), Some("@pipe"));
    }

    /// What `client_ip` answered when it read addresses with `core::net`.
    fn client_ip_by_std(address: &str) -> Option<String> {
        use core::net::{IpAddr, SocketAddr};
        let a = address.trim();
        if a.is_empty() {
            return None;
        }
        if let Some((host, port)) = a.rsplit_once(':') {
            if !host.contains(':')
                && port.bytes().all(|b| b.is_ascii_digit())
                && host.parse::<core::net::Ipv4Addr>().is_ok()
            {
                return Some(host.to_string());
            }
        }
        let ip = a
            .parse::<SocketAddr>()
            .map(|s| s.ip())
            .or_else(|_| a.parse::<IpAddr>())
            .or_else(|_| {
                a.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
            });
        Some(match ip {
            Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            },
            Ok(ip) => ip.to_string(),
            Err(_) => a.to_string(),
        })
    }

    #[test]
    fn one_client_is_one_key_as_std_net_reads_it() {
        for s in crate::ip::tests::corpus() {
            for a in [
                s.clone(),
                format!("{s}:8080"),
                format!("[{s}]:443"),
                format!("[{s}%2]:443"),
                format!("[{s}]"),
                format!("[[{s}]]"),
                format!(" {s}\t"),
                format!("[{s}]:99999"),
            ] {
                assert_eq!(client_ip(&a), client_ip_by_std(&a), "{a:?}");
            }
        }
    }

    #[test]
    fn captured_pseudo_headers_keep_the_exact_bytes() {
        let mut r = RequestParts::new("GET", "/a\u{fffd}");
        r.headers.push(":path", b"/a\xff?q");
        assert_eq!(r.raw_path(), b"/a\xff?q");
        assert_eq!(r.path(), b"/a\xff");
    }

    /// The ABI's serialised map of `a: xy`, `ok: ` and `a: 2`.
    fn serialized() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&3u32.to_le_bytes());
        for n in [1u32, 2, 2, 0, 1, 1] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(b"a\0xy\0ok\0\0a\x002\0");
        b
    }

    #[test]
    fn a_serialised_header_map_is_read_in_place_and_a_cut_one_is_refused() {
        let b = serialized();
        let list = HeaderList::from_serialized(b.clone()).unwrap();
        let pairs: Vec<(&[u8], &[u8])> = list.iter().collect();
        assert_eq!(pairs, [(&b"a"[..], &b"xy"[..]), (b"ok", b""), (b"a", b"2")]);
        assert_eq!(list.get("a"), Some(&b"xy"[..]));
        assert_eq!(list.get("A"), None, "the host's names are lowercase");
        assert_eq!(list.values("A").collect::<Vec<_>>(), [&b"xy"[..], b"2"]);
        for cut in 1..b.len() - 1 {
            assert_eq!(
                HeaderList::from_serialized(b[..cut].to_vec()),
                None,
                "cut at {cut}"
            );
        }
        assert_eq!(HeaderList::from_serialized(vec![255; 4]), None);
        assert!(HeaderList::from_serialized(Vec::new()).unwrap().is_empty());
        assert_eq!((serialized_count(&b), serialized_count(&[])), (3, 0));
        assert_eq!(
            serialized_count(&[255; 4]),
            256,
            "a claimed count reserves at most 256"
        );
    }

    #[test]
    fn pushed_and_removed_pairs_read_as_a_list() {
        let mut list = HeaderList::from_serialized(serialized()).unwrap();
        list.remove("a");
        list.push("x-new", b"1");
        list.push("ok", b"again");
        let pairs: Vec<(&[u8], &[u8])> = list.iter().collect();
        assert_eq!(
            pairs,
            [(&b"ok"[..], &b""[..]), (b"x-new", b"1"), (b"ok", b"again")]
        );
        assert_eq!(list.len(), 3);
        assert_eq!(list.get("a"), None);
    }

    #[test]
    fn path_ignores_the_query_and_cookies_are_found_by_name() {
        let r = RequestParts::new("GET", "/api/x?page=2").header("cookie", "a=1; country=NL ;b=2");
        assert_eq!(r.path(), b"/api/x");
        assert_eq!(r.cookie("country"), Some(b"NL".to_vec()));
        assert_eq!(r.cookie("a"), Some(b"1".to_vec()));
        assert_eq!(r.cookie("c"), None);
    }
}
