//! IP addresses as text, read and written by hand rather than through `core::net`: its generic
//! parser and its `Display` took 5-6 KB of every module that keys on the client's address.
//! Same grammar as `core::net` (the tests hold the two to the same answers), so a client is one
//! key however its address is spelled.

use alloc::string::String;
/// A dotted quad as `core::net::Ipv4Addr` reads it: four decimal parts of one to three digits,
/// each at most 255, with no leading zero (`01.2.3.4` is refused, as an octal reading would
/// make it another address).
pub fn v4(s: &[u8]) -> Option<[u8; 4]> {
    // One pass over the bytes: every request keyed on its client reads one.
    let mut out = [0u8; 4];
    let (mut part, mut value, mut digits) = (0usize, 0u16, 0u8);
    for &b in s {
        if b == b'.' {
            if digits == 0 {
                return None;
            }
            *out.get_mut(part)? = u8::try_from(value).ok()?;
            (part, value, digits) = (part + 1, 0, 0);
        } else if b.is_ascii_digit() {
            // A leading zero; with it, more than three digits could not stay under 256.
            if digits == 1 && value == 0 {
                return None;
            }
            value = value * 10 + u16::from(b - b'0');
            digits += 1;
            if value > 255 {
                return None;
            }
        } else {
            return None;
        }
    }
    if digits == 0 || part != 3 {
        return None;
    }
    *out.get_mut(3)? = u8::try_from(value).ok()?;
    Some(out)
}

/// Decimal digits only, at least one, without overflowing a u32.
fn decimal(p: &[u8]) -> Option<u32> {
    if p.is_empty() {
        return None;
    }
    p.iter().try_fold(0u32, |v, &b| {
        let d = char::from(b).to_digit(10)?;
        v.checked_mul(10)?.checked_add(d)
    })
}

/// An IPv6 address's eight groups, as `core::net::Ipv6Addr` reads them: groups of one to four
/// hex digits, at most one `::` standing for one or more zero groups, and a dotted quad in
/// place of the last two groups.
pub fn v6(s: &[u8]) -> Option<[u16; 8]> {
    let mut g = [0u16; 8];
    let Some(at) = s.windows(2).position(|w| w == b"::") else {
        return (groups(s, &mut g, true)? == 8).then_some(g);
    };
    let (head, tail) = (s.get(..at)?, s.get(at + 2..)?);
    // A dotted quad only ends an address, so never before `::`.
    let n = groups(head, &mut g, false)?;
    let mut t = [0u16; 8];
    let m = groups(tail, &mut t, true)?;
    // `::` stands for at least one group.
    if n + m > 7 {
        return None;
    }
    for (slot, v) in g.iter_mut().skip(8 - m).zip(t) {
        *slot = v;
    }
    Some(g)
}

/// Reads `:`-separated groups into `out`; an empty part is no group.
fn groups(part: &[u8], out: &mut [u16; 8], quad_last: bool) -> Option<usize> {
    if part.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    let mut pieces = part.split(|&b| b == b':').peekable();
    while let Some(p) = pieces.next() {
        if quad_last && pieces.peek().is_none() && p.contains(&b'.') {
            let [a, b, c, d] = v4(p)?;
            *out.get_mut(n)? = u16::from_be_bytes([a, b]);
            *out.get_mut(n + 1)? = u16::from_be_bytes([c, d]);
            return Some(n + 2);
        }
        if p.is_empty() || p.len() > 4 {
            return None;
        }
        let v = p.iter().try_fold(0u16, |v, &b| {
            Some(v << 4 | u16::try_from(char::from(b).to_digit(16)?).ok()?)
        })?;
        *out.get_mut(n)? = v;
        n += 1;
    }
    Some(n)
}

/// `[address]:port` or `[address%scope]:port`, as `core::net::SocketAddrV6` reads it (a
/// decimal scope, a port that fits 16 bits).
pub fn bracketed_v6(s: &[u8]) -> Option<[u16; 8]> {
    let inner = s.strip_prefix(b"[")?;
    let close = inner.iter().position(|&b| b == b']')?;
    let (addr, rest) = inner.split_at(close);
    let port = rest.strip_prefix(b"]:")?;
    u16::try_from(decimal(port)?).ok()?;
    let addr = match addr.iter().position(|&b| b == b'%') {
        Some(p) => {
            let (a, scope) = addr.split_at(p);
            decimal(scope.get(1..)?)?;
            a
        }
        None => addr,
    };
    v6(addr)
}

/// The canonical text of an IPv6 address (RFC 5952, as `core::net` writes it: lower-case hex,
/// the longest run of two or more zero groups, the first of equals, as `::`); an IPv4-mapped
/// address (`::ffff:a.b.c.d`) as its IPv4 text, since it is that client.
pub fn v6_text(g: [u16; 8]) -> String {
    let mut out = String::with_capacity(39);
    if let [0, 0, 0, 0, 0, 0xffff, hi, lo] = g {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        push_v4(&mut out, [a, b, c, d]);
        return out;
    }
    let (mut best, mut best_len, mut run) = (0, 0, 0);
    for (i, &v) in g.iter().enumerate() {
        run = if v == 0 { run + 1 } else { 0 };
        if run > best_len {
            (best, best_len) = (i + 1 - run, run);
        }
    }
    let mut i = 0;
    while i < 8 {
        if best_len > 1 && i == best {
            out.push_str("::");
            i += best_len;
            continue;
        }
        if i > 0 && !out.ends_with(':') {
            out.push(':');
        }
        let v = g.get(i).copied().unwrap_or(0);
        let digits = (16 - v.leading_zeros()).div_ceil(4).max(1);
        for k in (0..digits).rev() {
            let nibble = u32::from(v >> (4 * k) & 0xf);
            out.push(char::from_digit(nibble, 16).unwrap_or('0'));
        }
        i += 1;
    }
    out
}

/// Dotted-quad text.
pub fn push_v4(out: &mut String, o: [u8; 4]) {
    for (i, b) in o.into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if b >= 100 {
            out.push(char::from(b'0' + b / 100));
        }
        if b >= 10 {
            out.push(char::from(b'0' + b / 10 % 10));
        }
        out.push(char::from(b'0' + b % 10));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

    fn ours(s: &str) -> Option<String> {
        if let Some(o) = v4(s.as_bytes()) {
            let mut t = String::new();
            push_v4(&mut t, o);
            return Some(t);
        }
        v6(s.as_bytes()).map(v6_text)
    }

    fn std_text(s: &str) -> Option<String> {
        match s.parse::<IpAddr>().ok()? {
            IpAddr::V6(v6) => Some(match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            }),
            ip => Some(ip.to_string()),
        }
    }

    /// A deterministic corpus of address-like text: valid addresses in every spelling, and
    /// near misses (a digit too many, a stray colon, a bad quad).
    pub(crate) fn corpus() -> Vec<String> {
        let mut out: Vec<String> = [
            "",
            "::",
            "::1",
            "1::",
            ":",
            ":::",
            "1:::2",
            "::ffff:1.2.3.4",
            "::1.2.3.4",
            "1.2.3.4",
            "01.2.3.4",
            "0.0.0.0",
            "255.255.255.255",
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "1.2.3.4:80",
            "1:2:3:4:5:6:7:8",
            "1:2:3:4:5:6:7:8:9",
            "1:2:3:4:5:6:7::",
            "::2:3:4:5:6:7:8",
            "1:2:3:4:5:6:1.2.3.4",
            "1:2:3:4:5:1.2.3.4",
            "1:2:3:4:5:6::1.2.3.4",
            "1.2.3.4::",
            "1::2::3",
            "12345::",
            "fFfF::",
            "::g",
            "0:0:0:0:0:0:0:0",
            "0:0:1:0:0:1:0:0",
            "1:0:0:2:0:0:0:3",
            "2001:db8:0:0:1:0:0:1",
            "2001:DB8::",
            "::ffff:0:0",
            "::ffff:ffff:ffff",
            "0:0:0:0:0:ffff:a00:7",
            "+1.2.3.4",
            "1.2.3.+4",
            "１.2.3.4",
            "::1%2",
            "[::1]",
            " 1.2.3.4",
            "0::0:0:0:0:0:0:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            let mut g = [0u16; 8];
            for (i, slot) in g.iter_mut().enumerate() {
                // Mostly zeros and small values, so zero runs of every length appear.
                *slot = match (r >> (i * 3)) & 7 {
                    0..=3 => 0,
                    4 => 1,
                    5 => 0xffff,
                    _ => (next() & 0xffff) as u16,
                };
            }
            let addr = Ipv6Addr::from(g);
            let mut s = match r >> 60 {
                0..=5 => addr.to_string(),
                6..=9 => g
                    .iter()
                    .map(|v| format!("{v:x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
                10..=11 => g
                    .iter()
                    .map(|v| format!("{v:04X}"))
                    .collect::<Vec<_>>()
                    .join(":"),
                12..=13 => {
                    let [a, b] = g[6].to_be_bytes();
                    let [c, d] = g[7].to_be_bytes();
                    let head: Vec<String> = g[..6].iter().map(|v| format!("{v:x}")).collect();
                    format!("{}:{a}.{b}.{c}.{d}", head.join(":"))
                }
                _ => Ipv4Addr::from((r >> 8) as u32).to_string(),
            };
            // A near miss now and then: one byte changed, dropped or doubled.
            if r & 0xf0 == 0 && !s.is_empty() {
                let at = (next() as usize) % s.len();
                if s.is_char_boundary(at) {
                    let c = b":.0f%g]"[(next() % 7) as usize] as char;
                    match next() % 3 {
                        0 => s.insert(at, c),
                        1 => {
                            s.remove(at);
                        }
                        _ => s.replace_range(at..at + 1, &c.to_string()),
                    }
                }
            }
            out.push(s);
        }
        out
    }

    #[test]
    fn reads_and_writes_addresses_as_std_net_does() {
        for s in corpus() {
            assert_eq!(ours(&s), std_text(&s), "{s:?}");
        }
    }

    #[test]
    fn reads_bracketed_socket_addresses_as_std_net_does() {
        for s in corpus() {
            for text in [
                format!("[{s}]:443"),
                format!("[{s}%3]:0"),
                format!("[{s}]:65536"),
                format!("[{s}%x]:1"),
                format!("[{s}]"),
            ] {
                let std = text.parse::<SocketAddrV6>().ok().map(|a| a.ip().segments());
                assert_eq!(bracketed_v6(text.as_bytes()), std, "{text:?}");
            }
        }
    }

    #[test]
    fn writes_the_canonical_forms_of_rfc_5952() {
        let t = |s: &str| v6_text(v6(s.as_bytes()).unwrap());
        assert_eq!(t("2001:DB8:0:0:0:0:0:1"), "2001:db8::1");
        // The first of two equal runs; a single zero group stays a zero.
        assert_eq!(t("1:0:0:2:0:0:3:4"), "1::2:0:0:3:4");
        assert_eq!(t("1:0:2:3:4:5:6:7"), "1:0:2:3:4:5:6:7");
        assert_eq!(t("0:0:0:0:0:0:0:0"), "::");
        assert_eq!(t("::ffff:10.0.0.7"), "10.0.0.7");
    }
}
