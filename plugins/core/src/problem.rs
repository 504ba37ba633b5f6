//! RFC 9457 `application/problem+json` bodies, the one error format every plugin answers with.
//! Written by hand: a JSON serializer for five members is not worth its size in every module.

use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A local reply a plugin's policy decides on: plain data, sent by `edge_host::host::answer`.
/// Header values are bytes, so a stored response is replayed exactly as the upstream sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// A problem+json reply with extra headers (e.g. `retry-after`).
    pub fn problem(status: u32, headers: Vec<(String, Vec<u8>)>, body: Vec<u8>) -> Reply {
        let mut all = vec![("content-type".to_string(), CONTENT_TYPE.as_bytes().to_vec())];
        all.extend(headers);
        Reply {
            status,
            headers: all,
            body,
        }
    }

    /// The first value of header `name` (tests and logs).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        first_header(&self.headers, name)
    }
}

/// The first value of header `name` in `headers` (names compared case-insensitively).
pub fn first_header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Whole seconds a client is told to wait for `wait_ns`: rounded up, and at least 1 (a
/// `Retry-After: 0` invites an immediate retry that would fail the same way).
pub fn retry_after_secs(wait_ns: u64) -> u64 {
    wait_ns.div_ceil(1_000_000_000).max(1)
}

/// The `retry-after` header of a reply that asks the client to come back in `secs` seconds.
pub fn retry_after(secs: u64) -> (String, Vec<u8>) {
    ("retry-after".to_string(), secs.to_string().into_bytes())
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A problem body with `type`, `title`, `status`, `detail` and extension members given as
/// (name, JSON text) pairs.
pub fn problem_json(
    kind: &str,
    title: &str,
    status: u32,
    detail: &str,
    extra: &[(&str, String)],
) -> Vec<u8> {
    let mut out = format!(
        "{{\"type\":{},\"title\":{},\"status\":{status},\"detail\":{}",
        json_string(kind),
        json_string(title),
        json_string(detail)
    );
    for (name, json) in extra {
        out.push(',');
        out.push_str(&json_string(name));
        out.push(':');
        out.push_str(json);
    }
    out.push('}');
    out.into_bytes()
}

/// A JSON list of strings.
pub fn json_string_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(json_string).collect();
    format!("[{}]", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_never_zero() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1_000_000_000), 1);
        assert_eq!(retry_after_secs(1_000_000_001), 2);
        assert_eq!(retry_after(30), ("retry-after".to_string(), b"30".to_vec()));
    }

    #[test]
    fn has_the_standard_members_and_extensions() {
        let body = problem_json(
            "about:blank",
            "Too Many Requests",
            429,
            "say \"when\"\n\u{1}",
            &[("violated-policies", json_string_list(["a", "b\\c"]))],
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(v["title"], "Too Many Requests");
        assert_eq!(v["detail"], "say \"when\"\n\u{1}");
        assert_eq!(v["violated-policies"], serde_json::json!(["a", "b\\c"]));
    }
}
