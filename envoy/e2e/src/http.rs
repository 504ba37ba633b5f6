//! HTTP/1.1 framing shared by the test upstream and the client: just enough of RFC 9112 (start
//! line, headers, Content-Length and chunked bodies) to talk to Envoy in both directions.

use std::io::{BufRead, Read, Write};

use anyhow::{bail, Context, Result};

/// Upper bound on a message head, so a confused peer cannot make a test allocate without limit.
const MAX_HEAD: u64 = 64 * 1024;

/// A message's start line and headers; names lower-cased, order and repeats kept.
#[derive(Debug)]
pub(crate) struct Head {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Whether a comma-separated header (`connection`, `transfer-encoding`) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// First value of `name` (compared case-insensitively) in a header list.
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads one line (without its CRLF), bounded by `limit` bytes; `None` at a clean end of stream.
fn read_line(r: &mut impl BufRead, limit: u64) -> Result<Option<String>> {
    let mut line = Vec::new();
    let n = r.by_ref().take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        bail!("line longer than {limit} bytes or cut short by the peer");
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Reads a message head. `Ok(None)` means the peer closed before sending anything, which is how a
/// keep-alive connection normally ends.
pub(crate) fn read_head(r: &mut impl BufRead) -> Result<Option<Head>> {
    let mut budget = MAX_HEAD;
    let mut start_line = None;
    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(r, budget)? else {
            if start_line.is_none() {
                return Ok(None);
            }
            bail!("connection closed inside a message head");
        };
        budget = budget.saturating_sub(line.len() as u64 + 2);
        if line.is_empty() {
            // RFC 9112 §2.2: ignore empty lines before the start line.
            if start_line.is_some() {
                break;
            }
            continue;
        }
        if start_line.is_none() {
            start_line = Some(line);
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("malformed header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(start_line.map(|start_line| Head {
        start_line,
        headers,
    }))
}

/// How the body of a message is delimited (RFC 9112 §6.3).
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Framing {
    /// Framing of a request body: requests without length information have none.
    pub fn of_request(head: &Head) -> Result<Framing> {
        Self::from_headers(head, Framing::Empty)
    }

    /// Framing of a response body to a request with `method`.
    pub fn of_response(head: &Head, method: &str, status: u16) -> Result<Framing> {
        if method.eq_ignore_ascii_case("HEAD") || status < 200 || status == 204 || status == 304 {
            return Ok(Framing::Empty);
        }
        Self::from_headers(head, Framing::UntilClose)
    }

    fn from_headers(head: &Head, otherwise: Framing) -> Result<Framing> {
        if head.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        match head.header("content-length") {
            Some(v) => Ok(Framing::Length(
                v.parse()
                    .with_context(|| format!("bad content-length {v:?}"))?,
            )),
            None => Ok(otherwise),
        }
    }
}

/// Reads a whole body as framed.
pub(crate) fn read_body(r: &mut impl BufRead, framing: Framing) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            r.take(n).read_to_end(&mut body)?;
            if (body.len() as u64) < n {
                bail!("body cut short: {} of {n} bytes", body.len());
            }
        }
        Framing::UntilClose => {
            r.read_to_end(&mut body)?;
        }
        Framing::Chunked => loop {
            let line = read_line(r, 1024)?.context("connection closed inside a chunked body")?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16)
                .with_context(|| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailer fields, if any, end with an empty line; they are not kept.
                while !read_line(r, MAX_HEAD)?
                    .context("connection closed inside chunked trailers")?
                    .is_empty()
                {}
                break;
            }
            let before = body.len();
            r.take(size).read_to_end(&mut body)?;
            if ((body.len() - before) as u64) < size {
                bail!("chunk cut short");
            }
            if !read_line(r, 2)?.is_some_and(|l| l.is_empty()) {
                bail!("chunk not followed by CRLF");
            }
        },
    }
    Ok(body)
}

/// Writes one chunk of a chunked body; an empty `data` would end the body, so it is skipped.
pub(crate) fn write_chunk(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\r\n");
    w.write_all(&frame)
}

/// Writes the terminating zero-length chunk with no trailers.
pub(crate) fn write_last_chunk(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(b"0\r\n\r\n")
}

/// Reason phrase for a status line; clients ignore it, but it makes logs readable.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn chunked_body_with_extensions_and_trailers_is_joined() {
        let mut r =
            Cursor::new(b"4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\nNEXT".to_vec());
        assert_eq!(read_body(&mut r, Framing::Chunked).unwrap(), b"Wikipedia");
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn head_keeps_header_order_and_lowercases_names() {
        let mut r =
            Cursor::new(b"\r\nGET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n".to_vec());
        let head = read_head(&mut r).unwrap().unwrap();
        assert_eq!(head.start_line, "GET /a?b=1 HTTP/1.1");
        assert_eq!(
            head.headers,
            [("host", "x"), ("x-a", "1"), ("x-a", "2")].map(|(n, v)| (n.into(), v.into()))
        );
        assert!(read_head(&mut r).unwrap().is_none());
    }

    #[test]
    fn short_content_length_body_is_an_error() {
        let mut r = Cursor::new(b"abc".to_vec());
        assert!(read_body(&mut r, Framing::Length(5)).is_err());
    }
}
