//! Request keys as users configure them (`[{"source":"clientIp"},{"header":"x-api-key"}]`) and
//! their seeded 64-bit hash, the name of a bucket or record in shared state.

use crate::request::RequestView;
use crate::ConfigError;
use serde::Deserialize;
use std::hash::{Hash, Hasher};

/// One configured key part, as written in JSON: exactly one of `source`, `header`, `cookie`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPartSpec {
    pub source: Option<String>,
    pub header: Option<String>,
    pub cookie: Option<String>,
}

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
    /// Validates a spec; `field` is its JSON path for the error.
    pub fn compile(spec: &KeyPartSpec, field: &str) -> Result<KeyPart, ConfigError> {
        match (&spec.source, &spec.header, &spec.cookie) {
            (Some(s), None, None) => match s.as_str() {
                "clientIp" => Ok(KeyPart::ClientIp),
                "path" => Ok(KeyPart::Path),
                "method" => Ok(KeyPart::Method),
                other => Err(ConfigError::new(
                    format!("{field}.source"),
                    format!("unknown source \"{other}\" (use clientIp, path or method)"),
                )),
            },
            (None, Some(h), None) if !h.trim().is_empty() => {
                Ok(KeyPart::Header(h.trim().to_ascii_lowercase()))
            }
            (None, None, Some(c)) if !c.trim().is_empty() => {
                Ok(KeyPart::Cookie(c.trim().to_string()))
            }
            (None, Some(_), None) => Err(ConfigError::new(
                format!("{field}.header"),
                "must be a header name",
            )),
            (None, None, Some(_)) => Err(ConfigError::new(
                format!("{field}.cookie"),
                "must be a cookie name",
            )),
            _ => Err(ConfigError::new(
                field,
                "give exactly one of \"source\", \"header\" or \"cookie\"",
            )),
        }
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

/// Compiles a list of key part specs (`field` is the list's JSON path).
pub fn compile_key(specs: &[KeyPartSpec], field: &str) -> Result<Vec<KeyPart>, ConfigError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| KeyPart::compile(s, &format!("{field}[{i}]")))
        .collect()
}

/// The 64-bit hash of `namespace` and the key's parts, mixed with `seed` so a client cannot
/// craft keys that collide with someone else's bucket without knowing the seed. An absent part
/// hashes like an empty one. Never returns 0, which slot tables use for "empty".
pub fn key_hash(seed: u64, namespace: &str, parts: &[KeyPart], req: &impl RequestView) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    seed.hash(&mut h);
    namespace.hash(&mut h);
    for part in parts {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        part.value(req).unwrap_or_default().hash(&mut h);
    }
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestParts;

    fn spec(json: &str) -> KeyPartSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn parts_compile_from_json_and_name_the_field_when_wrong() {
        assert_eq!(
            KeyPart::compile(&spec(r#"{"header":"X-Api-Key"}"#), "k").unwrap(),
            KeyPart::Header("x-api-key".into())
        );
        let e = KeyPart::compile(&spec(r#"{"source":"ip"}"#), "rules[0].key[1]").unwrap_err();
        assert_eq!(e.field, "rules[0].key[1].source");
        let e = KeyPart::compile(&spec(r#"{"source":"path","header":"x"}"#), "k[0]").unwrap_err();
        assert!(e.to_string().starts_with("k[0]: give exactly one"), "{e}");
        assert!(serde_json::from_str::<KeyPartSpec>(r#"{"hedaer":"x"}"#).is_err());
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
