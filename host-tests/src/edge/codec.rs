//! Envoy's HTTP/1.1 codec as far as plugins can tell: it writes header values as they are,
//! so a value a plugin set with CR or LF in it reaches the peer as more than one header line
//! (header injection), and the peer parses what it reads.

use crate::state::HeaderMap;

/// The header map the peer parses from what Envoy's HTTP/1.1 codec writes: a value holding
/// line breaks ends at the first one, and each later line that reads `name: value` is a header
/// of its own (lines that do not are dropped, as a lenient parser does).
pub(super) fn as_http1_peer_sees(headers: &HeaderMap) -> HeaderMap {
    if !headers
        .iter()
        .any(|(_, value)| value.iter().any(|b| *b == b'\n' || *b == b'\r'))
    {
        return headers.clone();
    }
    let mut out = HeaderMap::with_capacity(headers.len() + 1);
    for (name, value) in headers {
        let mut lines = value
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
        let first = lines.next().unwrap_or_default();
        out.push((name.clone(), first.to_vec()));
        for line in lines {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let (injected, rest) = line.split_at(colon);
            let injected = injected.trim_ascii();
            if injected.is_empty() {
                continue;
            }
            let value = rest.get(1..).unwrap_or_default().trim_ascii();
            out.push((injected.to_ascii_lowercase(), value.to_vec()));
        }
    }
    out
}

/// The body an HTTP/1.1 client reads: with a `content-length` the codec passed on, exactly
/// that many bytes (a plugin that changed the body without fixing the length loses the rest),
/// and fewer bytes than it promises leave the response cut short (`true`).
pub(super) fn as_http1_client_reads(headers: &HeaderMap, mut body: Vec<u8>) -> (Vec<u8>, bool) {
    let length = headers
        .iter()
        .find(|(name, _)| name == b"content-length")
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
        .and_then(|value| value.trim().parse::<usize>().ok());
    match length {
        Some(n) if body.len() > n => {
            body.truncate(n);
            (body, false)
        }
        Some(n) => {
            let short = body.len() < n;
            (body, short)
        }
        None => (body, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_with_crlf_becomes_two_headers() {
        let map: HeaderMap = vec![
            (b":status".to_vec(), b"200".to_vec()),
            (b"x-a".to_vec(), b"one\r\nX-Injected: two".to_vec()),
        ];
        let seen = as_http1_peer_sees(&map);
        assert_eq!(
            seen,
            vec![
                (b":status".to_vec(), b"200".to_vec()),
                (b"x-a".to_vec(), b"one".to_vec()),
                (b"x-injected".to_vec(), b"two".to_vec()),
            ]
        );
    }
}
