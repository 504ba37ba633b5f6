//! What a policy may read from a request, behind a trait so policies are tested natively: the
//! filter glue implements [`RequestView`] over hostcalls, tests use [`RequestParts`].

use std::net::{IpAddr, SocketAddr};

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
        let mut p = self.raw_path();
        if let Some(q) = p.iter().position(|&b| b == b'?') {
            p.truncate(q);
        }
        p
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
            && host.parse::<std::net::Ipv4Addr>().is_ok()
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

/// A request as plain data, for unit tests and for tools that replay requests.
#[derive(Clone, Debug, Default)]
pub struct RequestParts {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub client_ip: Option<String>,
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
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    pub fn from_ip(mut self, address: &str) -> Self {
        self.client_ip = client_ip(address);
        self
    }
}

impl RequestView for RequestParts {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn captured_pseudo_headers_keep_the_exact_bytes() {
        let mut r = RequestParts::new("GET", "/a\u{fffd}");
        r.headers.push((":path".into(), b"/a\xff?q".to_vec()));
        assert_eq!(r.raw_path(), b"/a\xff?q");
        assert_eq!(r.path(), b"/a\xff");
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
