//! Text built on the request path without `format!`: the formatting machinery costs hundreds
//! of wasm instructions per call, where these cost tens.

use alloc::borrow::ToOwned;
use alloc::string::String;
use alloc::vec::Vec;
/// A header value as a whole number (`content-length`, `age`, `:status`), surrounding
/// whitespace allowed; `None` when it is not one.
pub fn parse_u64(value: &[u8]) -> Option<u64> {
    core::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Bytes from the host as text: valid UTF-8 (nearly always) keeps its buffer; anything else
/// has its bad sequences replaced. `String::from_utf8_lossy` alone would walk the bytes in
/// chunks and then copy them.
pub fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Borrowed bytes as an owned text, as [`into_text`] does.
pub fn to_text(bytes: &[u8]) -> String {
    match core::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// `prefix` followed by `n` in decimal: a store key such as `rate_limit/1/api/42`.
pub fn key(prefix: &str, n: u64) -> String {
    let mut s = String::with_capacity(prefix.len() + 20);
    s.push_str(prefix);
    push_decimal(&mut s, n);
    s
}

/// Appends `n` in decimal.
pub fn push_decimal(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    if let Ok(t) = core::str::from_utf8(digits.get(at..).unwrap_or_default()) {
        s.push_str(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn header_numbers_are_whole_numbers_or_none() {
        assert_eq!(parse_u64(b" 42 "), Some(42));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"-1",
            b"4 2",
            b"1e3",
            b"18446744073709551616",
            b"\xff",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimal_matches_display_at_the_edges() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(key("p/", n), format!("p/{n}"));
        }
    }
}
