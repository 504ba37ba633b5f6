//! Request keys as users configure them (`[{"source":"clientIp"},{"header":"x-api-key"}]`) and
//! their seeded 64-bit hash, the name of a bucket or record in shared state.

use crate::config::Node;
use crate::request::RequestView;
use crate::siphash::SipHasher24;
use crate::store::{get_or_create, SlotStore, StoreError};
use crate::ConfigError;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;

/// Where a key part comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPart {
    ClientIp,
    Path,
    Method,
    Header(String),
    Cookie(String),
}

impl KeyPart {
    /// Reads one part: an object with exactly one of `source`, `header`, `cookie`.
    pub fn read(n: Node<'_>) -> Result<KeyPart, ConfigError> {
        let o = n.obj(&["source", "header", "cookie"])?;
        let given = ["source", "header", "cookie"]
            .iter()
            .filter(|f| o.has(f))
            .count();
        if given != 1 {
            return Err(n.err("give exactly one of \"source\", \"header\" or \"cookie\""));
        }
        let name = |n: Node<'_>| -> Result<String, ConfigError> {
            let s = n.str()?.trim();
            if s.is_empty() {
                Err(n.err("must not be empty"))
            } else {
                Ok(s.to_string())
            }
        };
        const SOURCES: [(&str, KeyPart); 3] = [
            ("clientIp", KeyPart::ClientIp),
            ("path", KeyPart::Path),
            ("method", KeyPart::Method),
        ];
        if let Some(part) = o.opt("source", |n| n.one_of(&SOURCES))? {
            return Ok(part);
        }
        if let Some(h) = o.opt("header", |n| n.header_name())? {
            return Ok(KeyPart::Header(h));
        }
        Ok(KeyPart::Cookie(o.req("cookie", name)?))
    }

    /// The part's value in `req`; `None` when absent.
    pub fn value(&self, req: &impl RequestView) -> Option<Vec<u8>> {
        match self {
            KeyPart::ClientIp => req.client_ip().map(String::into_bytes),
            KeyPart::Path => Some(req.path()),
            KeyPart::Method => Some(req.method()),
            KeyPart::Header(name) => req.header(name),
            KeyPart::Cookie(name) => req.cookie(name),
        }
    }
}

/// The 64-bit hash of `namespace` and the key's parts, mixed with `seed` so a client cannot
/// craft keys that collide with someone else's bucket without knowing the seed. An absent part
/// hashes like an empty one. Never returns 0, which slot tables use for "empty".
pub fn key_hash(seed: u64, namespace: &str, parts: &[KeyPart], req: &impl RequestView) -> u64 {
    KeyHasher::new(seed, namespace).parts(parts, req).finish()
}

/// The one way plugins turn request data into a store key: SipHash-2-4 keyed by the seed (see
/// [`key_hash`]), so the same key names the same bucket or record in every module build of a
/// fleet; every piece length-prefixed so ("ab","c") and ("a","bc") differ, never 0. Pieces are
/// bytes as the client sent them: no lossy text conversion can make two requests share a key.
pub struct KeyHasher(SipHasher24);

impl KeyHasher {
    pub fn new(seed: u64, namespace: &str) -> KeyHasher {
        KeyHasher(SipHasher24::new(seed, 0)).bytes(namespace.as_bytes())
    }

    /// Adds one piece of bytes.
    pub fn bytes(mut self, piece: &[u8]) -> KeyHasher {
        self.0.write(&(piece.len() as u64).to_le_bytes());
        self.0.write(piece);
        self
    }

    /// Adds a number (another hash, a version).
    pub fn number(mut self, n: u64) -> KeyHasher {
        self.0.write(&n.to_le_bytes());
        self
    }

    /// Adds each configured key part of `req` (an absent part hashes like an empty one).
    pub fn parts(self, parts: &[KeyPart], req: &impl RequestView) -> KeyHasher {
        parts.iter().fold(self, |h, part| {
            h.bytes(&part.value(req).unwrap_or_default())
        })
    }

    /// Adds header `name` (lower-case) and all its values in order.
    pub fn header_values<'a>(
        self,
        name: &str,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> KeyHasher {
        let values: Vec<&[u8]> = values.into_iter().collect();
        let mut h = self.bytes(name.as_bytes()).number(values.len() as u64);
        for v in values {
            h = h.bytes(v);
        }
        h
    }

    pub fn finish(&self) -> u64 {
        self.0.finish().max(1)
    }
}

/// The seed every worker uses (kept at `key` in the store, created from `random` by whichever
/// worker comes first). When the store fails, this worker uses `random` and says why: its keys
/// then hash apart from the other workers' until a reload.
pub fn shared_seed(store: &impl SlotStore, key: &str, random: u64) -> (u64, Option<StoreError>) {
    match get_or_create(store, key, &random.to_le_bytes()) {
        Ok(e) => (crate::store::read_u64(&e.value, 0).unwrap_or(random), None),
        Err(e) => (random, Some(e)),
    }
}

#[cfg(test)]
mod seed_tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn the_first_seed_written_is_everyones() {
        let s = MemoryStore::new();
        assert_eq!(shared_seed(&s, "ns/seed", 7), (7, None));
        assert_eq!(shared_seed(&s, "ns/seed", 9), (7, None));
        s.broken.set(true);
        assert!(matches!(shared_seed(&s, "ns/seed", 9), (9, Some(_))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestParts;
    use alloc::vec;

    fn part(json: &str) -> Result<KeyPart, String> {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let o = crate::config::Node::root(&v).obj(&["k"]).unwrap();
        o.req("k", KeyPart::read).map_err(|e| e.to_string())
    }

    #[test]
    fn parts_are_read_from_json_and_name_the_field_when_wrong() {
        assert_eq!(
            part(r#"{"k":{"header":"X-Api-Key"}}"#),
            Ok(KeyPart::Header("x-api-key".into()))
        );
        assert_eq!(
            part(r#"{"k":{"source":"clientIp"}}"#),
            Ok(KeyPart::ClientIp)
        );
        assert_eq!(
            part(r#"{"k":{"cookie":"sid"}}"#),
            Ok(KeyPart::Cookie("sid".into()))
        );
        assert!(part(r#"{"k":{"source":"ip"}}"#)
            .unwrap_err()
            .starts_with("k.source: unknown value \"ip\""));
        assert!(part(r#"{"k":{"source":"path","header":"x"}}"#)
            .unwrap_err()
            .starts_with("k: give exactly one"));
        assert!(part(r#"{"k":{"hedaer":"x"}}"#)
            .unwrap_err()
            .contains("unknown field `hedaer`"));
        assert!(part(r#"{"k":{"header":" "}}"#)
            .unwrap_err()
            .starts_with("k.header: \"\" is not a header name"));
        // A name no request can carry would key every client alike.
        assert!(part(r#"{"k":{"header":"x api-key"}}"#)
            .unwrap_err()
            .starts_with("k.header: \"x api-key\" is not a header name"));
    }

    #[test]
    fn keys_separate_clients_and_parts() {
        let parts = vec![KeyPart::ClientIp, KeyPart::Header("x-api-key".into())];
        let a = RequestParts::new("GET", "/")
            .from_ip("10.0.0.1:1")
            .header("x-api-key", "k");
        let b = RequestParts::new("GET", "/")
            .from_ip("10.0.0.2:1")
            .header("x-api-key", "k");
        let a_other_port = RequestParts::new("POST", "/x")
            .from_ip("10.0.0.1:2")
            .header("x-api-key", "k");
        assert_ne!(key_hash(1, "r", &parts, &a), key_hash(1, "r", &parts, &b));
        assert_eq!(
            key_hash(1, "r", &parts, &a),
            key_hash(1, "r", &parts, &a_other_port)
        );
        assert_ne!(key_hash(1, "r", &parts, &a), key_hash(2, "r", &parts, &a));
        assert_ne!(key_hash(1, "r", &parts, &a), key_hash(1, "s", &parts, &a));

        let two = vec![KeyPart::Header("a".into()), KeyPart::Header("b".into())];
        let ab_c = RequestParts::new("GET", "/")
            .header("a", "ab")
            .header("b", "c");
        let a_bc = RequestParts::new("GET", "/")
            .header("a", "a")
            .header("b", "bc");
        assert_ne!(key_hash(0, "", &two, &ab_c), key_hash(0, "", &two, &a_bc));
    }

    #[test]
    fn an_absent_header_is_the_empty_value() {
        let parts = vec![KeyPart::Header("x-api-key".into())];
        let absent = RequestParts::new("GET", "/");
        let empty = RequestParts::new("GET", "/").header("x-api-key", "");
        assert_eq!(
            key_hash(0, "", &parts, &absent),
            key_hash(0, "", &parts, &empty)
        );
    }
}

#[cfg(test)]
mod hasher_tests {
    use super::KeyHasher;
    use alloc::format;

    #[test]
    fn pieces_are_bytes_and_length_prefixed() {
        let k = |pieces: &[&[u8]]| {
            pieces
                .iter()
                .fold(KeyHasher::new(7, "ns"), |h, p| h.bytes(p))
                .finish()
        };
        // Two paths that differ only in invalid UTF-8 bytes (one lossy text for both).
        assert_ne!(k(&[b"/a\xff"]), k(&[b"/a\xfe"]));
        assert_ne!(k(&[b"ab", b"c"]), k(&[b"a", b"bc"]));
        assert_eq!(k(&[b"x"]), k(&[b"x"]));
        assert_ne!(KeyHasher::new(8, "ns").bytes(b"x").finish(), k(&[b"x"]));
        let one = KeyHasher::new(1, "n")
            .header_values("a", [&b"x,y"[..]])
            .finish();
        let two = KeyHasher::new(1, "n")
            .header_values("a", [&b"x"[..], b"y"])
            .finish();
        assert_ne!(one, two);
    }

    /// The hash names etcd records that every Envoy of a fleet shares, so it is pinned: a
    /// change here orphans every record a running fleet holds.
    #[test]
    #[allow(deprecated)]
    fn the_hash_is_siphash_2_4_of_the_length_prefixed_pieces_in_every_build() {
        use std::hash::Hasher;
        let mut oracle = std::hash::SipHasher::new_with_keys(0x5eed, 0);
        for piece in [&b"idempotency"[..], b"order-42"] {
            oracle.write(&(piece.len() as u64).to_le_bytes());
            oracle.write(piece);
        }
        oracle.write(&7u64.to_le_bytes());
        let ours = KeyHasher::new(0x5eed, "idempotency")
            .bytes(b"order-42")
            .number(7)
            .finish();
        assert_eq!(ours, oracle.finish());
        assert_eq!(format!("{ours:016x}"), PINNED);
    }

    const PINNED: &str = "81693dfc7cfef663";
}
