//! A minimal blocking HTTP/1.1 client: one connection per request, so each call is independent
//! and a test never sees a response meant for another.

use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};

use socket2::{Domain, Socket, Type};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::http::{self, Framing};

/// Long enough for Envoy's own timeouts (route default 15 s is not reached by the rig's scripts)
/// to show up as a status rather than a client error, short enough that a hang fails the test.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header fields in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header, name compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        http::header(&self.headers, name)
    }

    /// Every value of a header, in order (for repeated fields such as `set-cookie`).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET url` with no extra headers.
pub fn get(url: &str) -> Result<Response> {
    request("GET", url, &[], b"")
}

/// Sends one request to an `http://host:port/path` URL and reads the whole response.
///
/// `host`, `connection: close` and (when there is a body, or for POST/PUT/PATCH) `content-length`
/// are added unless `headers` has them.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Response> {
    let (authority, path) = split_url(url)?;
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))?;
    send(
        addr,
        authority,
        method,
        path,
        headers,
        body,
        DEFAULT_TIMEOUT,
    )
    .with_context(|| format!("{method} {url}"))
}

/// Splits `http://authority/path` into its authority and path (`/` when absent).
fn split_url(url: &str) -> Result<(&str, &str)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("only http:// URLs are supported, got {url:?}");
    };
    Ok(match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    })
}

pub(crate) fn send(
    addr: SocketAddr,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    send_from(
        addr,
        None,
        authority,
        method,
        path,
        headers,
        &[body],
        timeout,
    )
}

/// Like [`send`], from a given local address (any 127.0.0.0/8 address on loopback) and with
/// the body as given pieces: more than one piece goes out with chunked encoding, each piece
/// written on its own.
#[allow(clippy::too_many_arguments)]
pub fn send_from(
    addr: SocketAddr,
    from: Option<IpAddr>,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    pieces: &[&[u8]],
    timeout: Duration,
) -> Result<Response> {
    let stream = connect(addr, from, timeout)?;
    write_request(&stream, authority, method, path, headers, pieces)?;

    let mut reader = BufReader::new(&stream);
    loop {
        let head = http::read_head(&mut reader)?.context("connection closed before a response")?;
        let status: u16 = head
            .start_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", head.start_line))?;
        // Interim responses (100 Continue) precede the real one.
        if (100..200).contains(&status) {
            continue;
        }
        let body = http::read_body(&mut reader, Framing::of_response(&head, method, status)?)?;
        return Ok(Response {
            status,
            headers: head.headers,
            body,
        });
    }
}

/// A connection to `addr` from `from` (any 127.0.0.0/8 address on loopback), with `timeout`
/// for the connect and every read and write.
pub(crate) fn connect(
    addr: SocketAddr,
    from: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = from {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect_timeout(&addr.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Writes an HTTP/1.1 request as the rig's client sends it (`host`, `connection: close`, the
/// length, or chunked framing for more than one piece, each chunk written on its own).
pub(crate) fn write_request(
    stream: &TcpStream,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    pieces: &[&[u8]],
) -> Result<()> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let body_len: usize = pieces.iter().map(|p| p.len()).sum();
    let chunked = pieces.iter().filter(|p| !p.is_empty()).count() > 1;
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("host: {authority}\r\n"));
    }
    if !has("connection") {
        out.push_str("connection: close\r\n");
    }
    let wants_length = body_len > 0 || matches!(method, "POST" | "PUT" | "PATCH");
    if chunked {
        if !has("transfer-encoding") {
            out.push_str("transfer-encoding: chunked\r\n");
        }
    } else if wants_length && !has("content-length") && !has("transfer-encoding") {
        out.push_str(&format!("content-length: {body_len}\r\n"));
    }
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut w = stream;
    w.write_all(out.as_bytes())?;
    if chunked {
        for piece in pieces.iter().filter(|p| !p.is_empty()) {
            http::write_chunk(&mut w, piece)?;
            w.flush()?;
            // Separate reads at the proxy: each piece is its own body callback.
            std::thread::sleep(Duration::from_millis(10));
        }
        http::write_last_chunk(&mut w)?;
    } else {
        for piece in pieces {
            w.write_all(piece)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_splits_into_authority_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:80/a?b").unwrap(),
            ("127.0.0.1:80", "/a?b")
        );
        assert_eq!(split_url("http://h:1").unwrap(), ("h:1", "/"));
        assert!(split_url("https://h/").is_err());
    }
}
