//! Records in etcd, for a fleet of Envoys: the v3 JSON gateway's requests and answers
//! (`/v3/kv/txn`, `/v3/lease/grant`), and what each answer means for a keyed request. Pure:
//! the glue sends these bodies through an HTTP callout and hands the reply back here.
//!
//! A claim is one transaction: put the record if the key was never created
//! (`create_revision == 0`), attached to a lease; otherwise return the existing record in the
//! same round trip. Every record carries its claim's owner token, so a claim whose reply was
//! lost and is sent again recognises its own record and goes on, instead of answering 409 to
//! itself. Completing and releasing compare the key's `mod_revision` with the claim's, so a
//! request only ever changes the record it claimed.
//!
//! Keys and values are base64 in the gateway's JSON; int64 fields are JSON strings; `false`
//! and zero fields are left out of answers.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use edge_core::stored::StoredResponse;
use serde_json::{json, Value};

use crate::record::{Meta, State};

/// The record's format version, first byte of every value we write.
const VERSION: u8 = 1;

/// What the plugin keeps under a key in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdRecord {
    /// Which claim wrote it.
    pub owner: [u8; 16],
    pub meta: Meta,
    /// The response to replay, once completed with one.
    pub response: Option<StoredResponse>,
}

impl EtcdRecord {
    pub fn encode(&self) -> Vec<u8> {
        let meta = self.meta.encode();
        let mut out = Vec::with_capacity(18 + meta.len());
        out.push(VERSION);
        out.extend_from_slice(&self.owner);
        out.push(u8::try_from(meta.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&meta);
        if let Some(r) = &self.response {
            out.extend_from_slice(&r.encode());
        }
        out
    }

    /// `None` for a value that is not a record of ours (another writer's key under our prefix).
    pub fn decode(bytes: &[u8]) -> Option<EtcdRecord> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION {
            return None;
        }
        let owner: [u8; 16] = rest.get(..16)?.try_into().ok()?;
        let (&meta_len, rest) = rest.get(16..)?.split_first()?;
        let meta = Meta::decode(rest.get(..usize::from(meta_len))?)?;
        let tail = rest.get(usize::from(meta_len)..)?;
        let response = if tail.is_empty() {
            None
        } else {
            Some(StoredResponse::decode(tail)?)
        };
        if meta.state == State::Done && response.is_none() {
            return None;
        }
        Some(EtcdRecord {
            owner,
            meta,
            response,
        })
    }
}

/// The etcd key of a record: `prefix` then the record's hash in hex.
pub fn record_key(prefix: &str, hash: u64) -> String {
    format!("{prefix}{hash:016x}")
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// `POST /v3/lease/grant`: a lease of `ttl_secs`, granted once per VM per interval and
/// attached to every claim of that interval.
pub fn lease_grant(ttl_secs: u64) -> String {
    json!({ "TTL": ttl_secs.to_string() }).to_string()
}

/// `POST /v3/kv/txn`: insert the in-flight record if the key is free, else read it.
pub fn claim(key: &str, record: &EtcdRecord, lease: i64) -> String {
    let k = b64(key.as_bytes());
    json!({
        "compare": [{ "key": k, "target": "CREATE", "create_revision": "0" }],
        "success": [{ "request_put": { "key": k, "value": b64(&record.encode()), "lease": lease.to_string() } }],
        "failure": [{ "request_range": { "key": k } }],
    })
    .to_string()
}

/// `POST /v3/kv/txn`: replace the claim made at `claim_revision` with the completed record,
/// under a lease for `ttl`; if the key changed since, read what is there.
pub fn complete(key: &str, record: &EtcdRecord, claim_revision: i64, lease: i64) -> String {
    let k = b64(key.as_bytes());
    json!({
        "compare": [{ "key": k, "target": "MOD", "mod_revision": claim_revision.to_string() }],
        "success": [{ "request_put": { "key": k, "value": b64(&record.encode()), "lease": lease.to_string() } }],
        "failure": [{ "request_range": { "key": k } }],
    })
    .to_string()
}

/// `POST /v3/kv/txn`: delete the key only if it is still the claim made at `claim_revision`
/// (a 5xx or a reset releases the key; someone else's later record stays).
pub fn release(key: &str, claim_revision: i64) -> String {
    let k = b64(key.as_bytes());
    json!({
        "compare": [{ "key": k, "target": "MOD", "mod_revision": claim_revision.to_string() }],
        "success": [{ "request_delete_range": { "key": k } }],
        "failure": [{ "request_range": { "key": k } }],
    })
    .to_string()
}

/// Why an answer could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// Not the JSON of a txn or lease answer (a proxy's error page, a truncated body).
    Malformed,
    /// etcd answered an error (`{"error": ..., "code": N}`), e.g. a request too large.
    Refused(String),
}

/// A transaction's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Txn {
    /// The compare held: the write is in, at this revision.
    Succeeded { revision: i64 },
    /// The compare failed; the key's current value (`None`: no key, or not a record of ours)
    /// and its `mod_revision`.
    Failed {
        record: Option<EtcdRecord>,
        mod_revision: i64,
        exists: bool,
    },
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn json_of(body: &[u8]) -> Result<Value, ProtocolError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ProtocolError::Malformed)?;
    if let Some(error) = v.get("error").and_then(Value::as_str) {
        return Err(ProtocolError::Refused(error.chars().take(200).collect()));
    }
    Ok(v)
}

/// Reads a `/v3/kv/txn` answer.
pub fn parse_txn(body: &[u8]) -> Result<Txn, ProtocolError> {
    let v = json_of(body)?;
    let revision = v
        .get("header")
        .and_then(|h| h.get("revision"))
        .and_then(int)
        .ok_or(ProtocolError::Malformed)?;
    if v.get("succeeded").and_then(Value::as_bool) == Some(true) {
        return Ok(Txn::Succeeded { revision });
    }
    let kv = v
        .get("responses")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .and_then(|r| r.get("response_range"))
        .and_then(|r| r.get("kvs"))
        .and_then(Value::as_array)
        .and_then(|kvs| kvs.first());
    let Some(kv) = kv else {
        return Ok(Txn::Failed {
            record: None,
            mod_revision: 0,
            exists: false,
        });
    };
    let mod_revision = kv
        .get("mod_revision")
        .and_then(int)
        .ok_or(ProtocolError::Malformed)?;
    let value = match kv.get("value").and_then(Value::as_str) {
        Some(s) => B64.decode(s).map_err(|_| ProtocolError::Malformed)?,
        None => Vec::new(),
    };
    Ok(Txn::Failed {
        record: EtcdRecord::decode(&value),
        mod_revision,
        exists: true,
    })
}

/// Reads a `/v3/lease/grant` answer: the lease id and the TTL granted.
pub fn parse_lease(body: &[u8]) -> Result<(i64, u64), ProtocolError> {
    let v = json_of(body)?;
    let id = v.get("ID").and_then(int).ok_or(ProtocolError::Malformed)?;
    let ttl = v.get("TTL").and_then(int).ok_or(ProtocolError::Malformed)?;
    Ok((id, u64::try_from(ttl).unwrap_or(0)))
}

/// What a claim's answer means for the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// This request owns the key (claimed now, or found its own claim after a lost reply):
    /// forward it, then complete or release at `revision`.
    Proceed { revision: i64 },
    /// Another request holds the key and is still running: 409.
    InFlight,
    /// Completed with the same fingerprint: replay this response.
    Replay(StoredResponse),
    /// Completed, but for another body: 422.
    Mismatch,
    /// Completed without a response kept: 409, never a second execution.
    DoneWithoutResponse,
    /// The key holds something that is not a record of ours: the store is not usable for it.
    Foreign,
    /// The compare failed but no key is there (it expired between the compare and the read,
    /// which one transaction rules out): try the claim again.
    Retry,
}

/// Decides a claim from its transaction answer. `fingerprint` is the request's, when
/// fingerprints are on and the body was read.
pub fn claimed(txn: Txn, owner: &[u8; 16], fingerprint: Option<&[u8; 32]>) -> Claimed {
    let (record, mod_revision, exists) = match txn {
        Txn::Succeeded { revision } => return Claimed::Proceed { revision },
        Txn::Failed {
            record,
            mod_revision,
            exists,
        } => (record, mod_revision, exists),
    };
    let Some(record) = record else {
        return if exists {
            Claimed::Foreign
        } else {
            Claimed::Retry
        };
    };
    match record.meta.state {
        State::InFlight if &record.owner == owner => Claimed::Proceed {
            revision: mod_revision,
        },
        State::InFlight => Claimed::InFlight,
        State::DoneWithoutResponse => Claimed::DoneWithoutResponse,
        State::Done => {
            let same = match (record.meta.fingerprint, fingerprint) {
                (Some(kept), Some(sent)) => &kept == sent,
                // Fingerprints off, or not recorded: the key alone decides.
                _ => true,
            };
            match (same, record.response) {
                (true, Some(r)) => Claimed::Replay(r),
                (true, None) => Claimed::DoneWithoutResponse,
                (false, _) => Claimed::Mismatch,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 16] = [7; 16];
    const OTHER: [u8; 16] = [9; 16];

    fn record(owner: [u8; 16], state: State, fp: Option<[u8; 32]>) -> EtcdRecord {
        let response = (state == State::Done).then(|| StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: b"{\"id\":1}".to_vec(),
            stored_at_ns: 5,
        });
        EtcdRecord {
            owner,
            meta: Meta {
                state,
                fingerprint: fp,
            },
            response,
        }
    }

    /// An answer as etcd 3.4's gateway writes it when the compare fails.
    fn failed_with(value: &[u8], mod_revision: i64) -> Vec<u8> {
        json!({
            "header": {"cluster_id": "1", "member_id": "2", "revision": "9", "raft_term": "2"},
            "responses": [{"response_range": {"header": {"revision": "9"}, "kvs": [{
                "key": b64(b"k"), "create_revision": "3", "mod_revision": mod_revision.to_string(),
                "version": "1", "value": b64(value), "lease": "7587899399757893383"}], "count": "1"}}]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn records_round_trip_and_foreign_values_are_not_ours() {
        for r in [
            record(ME, State::InFlight, None),
            record(ME, State::Done, Some([1; 32])),
            record(OTHER, State::DoneWithoutResponse, None),
        ] {
            assert_eq!(EtcdRecord::decode(&r.encode()), Some(r));
        }
        assert_eq!(EtcdRecord::decode(b"hello"), None);
        assert_eq!(EtcdRecord::decode(&[]), None);
        let mut truncated = record(ME, State::Done, None).encode();
        truncated.truncate(truncated.len() - 3);
        assert_eq!(EtcdRecord::decode(&truncated), None);
    }

    #[test]
    fn a_claim_is_one_insert_if_absent_that_reads_back_on_failure() {
        let body: Value =
            serde_json::from_str(&claim("idem/k", &record(ME, State::InFlight, None), 42)).unwrap();
        assert_eq!(body["compare"][0]["target"], "CREATE");
        assert_eq!(body["compare"][0]["create_revision"], "0");
        assert_eq!(body["success"][0]["request_put"]["lease"], "42");
        assert_eq!(body["failure"][0]["request_range"]["key"], b64(b"idem/k"));
        let value = B64
            .decode(body["success"][0]["request_put"]["value"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            EtcdRecord::decode(&value),
            Some(record(ME, State::InFlight, None))
        );
        let done: Value =
            serde_json::from_str(&complete("k", &record(ME, State::Done, None), 12, 43)).unwrap();
        assert_eq!(done["compare"][0]["target"], "MOD");
        assert_eq!(done["compare"][0]["mod_revision"], "12");
        let gone: Value = serde_json::from_str(&release("k", 12)).unwrap();
        assert_eq!(gone["success"][0]["request_delete_range"]["key"], b64(b"k"));
        assert_eq!(lease_grant(30), r#"{"TTL":"30"}"#);
    }

    #[test]
    fn answers_as_etcd_writes_them_are_read() {
        let ok = br#"{"header":{"cluster_id":"1","member_id":"2","revision":"2","raft_term":"2"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"2"}}}]}"#;
        assert_eq!(parse_txn(ok), Ok(Txn::Succeeded { revision: 2 }));
        let r = record(OTHER, State::InFlight, None);
        assert_eq!(
            parse_txn(&failed_with(&r.encode(), 4)),
            Ok(Txn::Failed {
                record: Some(r),
                mod_revision: 4,
                exists: true
            })
        );
        let empty = br#"{"header":{"revision":"5"},"responses":[{"response_range":{"header":{"revision":"5"}}}]}"#;
        assert_eq!(
            parse_txn(empty),
            Ok(Txn::Failed {
                record: None,
                mod_revision: 0,
                exists: false
            })
        );
        let lease = br#"{"header":{"revision":"1"},"ID":"7587899399757893381","TTL":"30"}"#;
        assert_eq!(parse_lease(lease), Ok((7587899399757893381, 30)));
        assert_eq!(
            parse_txn(b"<html>bad gateway</html>"),
            Err(ProtocolError::Malformed)
        );
        assert_eq!(
            parse_txn(br#"{"header":{}}"#),
            Err(ProtocolError::Malformed)
        );
        let refused = br#"{"error":"etcdserver: request is too large","message":"x","code":3}"#;
        assert_eq!(
            parse_txn(refused),
            Err(ProtocolError::Refused(
                "etcdserver: request is too large".into()
            ))
        );
    }

    fn decide(found: EtcdRecord, fp: Option<&[u8; 32]>) -> Claimed {
        claimed(
            parse_txn(&failed_with(&found.encode(), 4)).unwrap(),
            &ME,
            fp,
        )
    }

    #[test]
    fn a_claim_decides_409_replay_422_or_goes_on_with_its_own_record() {
        assert_eq!(
            claimed(Txn::Succeeded { revision: 8 }, &ME, None),
            Claimed::Proceed { revision: 8 }
        );
        assert_eq!(
            decide(record(ME, State::InFlight, None), None),
            Claimed::Proceed { revision: 4 },
            "a lost reply retried finds its own claim"
        );
        assert_eq!(
            decide(record(OTHER, State::InFlight, None), None),
            Claimed::InFlight
        );
        let done = record(OTHER, State::Done, Some([1; 32]));
        assert!(matches!(
            decide(done.clone(), Some(&[1; 32])),
            Claimed::Replay(r) if r.status == 201 && r.body == b"{\"id\":1}"
        ));
        assert_eq!(decide(done.clone(), Some(&[2; 32])), Claimed::Mismatch);
        assert!(matches!(decide(done, None), Claimed::Replay(_)));
        assert_eq!(
            decide(record(OTHER, State::DoneWithoutResponse, None), None),
            Claimed::DoneWithoutResponse
        );
        let foreign = claimed(parse_txn(&failed_with(b"not ours", 4)).unwrap(), &ME, None);
        assert_eq!(foreign, Claimed::Foreign);
        let vanished = Txn::Failed {
            record: None,
            mod_revision: 0,
            exists: false,
        };
        assert_eq!(claimed(vanished, &ME, None), Claimed::Retry);
    }
}
