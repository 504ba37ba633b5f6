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

use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::time::Duration;

use edge_core::metrics;
use edge_core::stored::StoredResponse;
use edge_core::{ConfigError, Node};
#[cfg(test)]
use serde_json::json;
use serde_json::Value;

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

/// The seed of record hashes with etcd: every Envoy of the fleet must hash a key alike, so
/// it comes from the prefix (FNV-1a), not from one process's randomness.
pub fn fleet_seed(prefix: &str) -> u64 {
    prefix.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The etcd key of a record: `prefix` then the record's hash in hex.
pub fn record_key(prefix: &str, hash: u64) -> String {
    format!("{prefix}{hash:016x}")
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as etcd's gateway writes keys and values. Written out here
/// (rather than a crate's generic engine) for the module's size.
fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            let c = if k <= chunk.len() {
                B64.get(((n >> shift) & 63) as usize)
                    .copied()
                    .unwrap_or(b'=')
            } else {
                b'='
            };
            out.push(char::from(c));
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` for anything else.
fn unb64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = ((acc << 6) | u32::from(v)) & 0xff_ffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    // Leftover bits must be zero padding (at most 4 of them).
    (bits < 6 && acc & ((1 << bits) - 1) == 0).then_some(out)
}

/// Whether `hay` contains `needle` (a plain scan: `str::contains` pulls in the two-way
/// searcher).
fn has(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// `POST /v3/lease/grant`: a lease of `ttl_secs`, granted once per VM per interval and
/// attached to every claim of that interval.
pub fn lease_grant(ttl_secs: u64) -> String {
    format!(r#"{{"TTL":"{ttl_secs}"}}"#)
}

/// A transaction on one key: `compare` (without the key), then `success` if it holds, else
/// a read of the key. Written by hand rather than through `serde_json::Value`: base64 and
/// numbers need no escaping, and the module stays small.
fn txn(k: &str, compare: &str, success: &str) -> String {
    format!(
        r#"{{"compare":[{{"key":"{k}",{compare}}}],"success":[{success}],"failure":[{{"request_range":{{"key":"{k}"}}}}]}}"#
    )
}

fn put(k: &str, record: &EtcdRecord, lease: i64) -> String {
    format!(
        r#"{{"request_put":{{"key":"{k}","value":"{}","lease":"{lease}"}}}}"#,
        b64(&record.encode())
    )
}

/// `POST /v3/kv/txn`: insert the in-flight record if the key is free, else read it.
pub fn claim(key: &str, record: &EtcdRecord, lease: i64) -> String {
    let k = b64(key.as_bytes());
    txn(
        &k,
        r#""target":"CREATE","create_revision":"0""#,
        &put(&k, record, lease),
    )
}

/// `POST /v3/kv/txn`: replace the claim made at `claim_revision` with the completed record,
/// under a lease for `ttl`; if the key changed since, read what is there.
pub fn complete(key: &str, record: &EtcdRecord, claim_revision: i64, lease: i64) -> String {
    let k = b64(key.as_bytes());
    txn(
        &k,
        &format!(r#""target":"MOD","mod_revision":"{claim_revision}""#),
        &put(&k, record, lease),
    )
}

/// `POST /v3/kv/txn`: delete the key only if it is still the claim made at `claim_revision`
/// (a 5xx or a reset releases the key; someone else's later record stays).
pub fn release(key: &str, claim_revision: i64) -> String {
    let k = b64(key.as_bytes());
    txn(
        &k,
        &format!(r#""target":"MOD","mod_revision":"{claim_revision}""#),
        &format!(r#"{{"request_delete_range":{{"key":"{k}"}}}}"#),
    )
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
    // The config's parser: one copy of serde_json's tree builder in the module.
    let v = edge_core::parse_json(body).map_err(|_| ProtocolError::Malformed)?;
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
        Some(s) => unb64(s).ok_or(ProtocolError::Malformed)?,
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

/// `store.etcd`: where the fleet's records are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The Envoy cluster (HTTP/1.1) of the members' client URLs.
    pub cluster: String,
    /// Namespaces the record keys in etcd.
    pub prefix: String,
    /// How long one request to etcd may take.
    pub timeout: Duration,
    /// How many times a failed request is sent again.
    pub retries: u32,
    pub failure_mode: FailureMode,
}

impl EtcdConfig {
    /// Reads `store` (`{"etcd": {...}}`); `None` is the local store.
    pub fn read_store(n: Node<'_>) -> Result<Option<EtcdConfig>, ConfigError> {
        let store = n.obj(&["local", "etcd"])?;
        let local = store.opt("local", |n| n.obj(&[]).map(|_| ()))?.is_some();
        let etcd = store.opt("etcd", EtcdConfig::read)?;
        match (local, etcd) {
            (true, Some(_)) => Err(n.err("give one store, `local` or `etcd`")),
            (false, None) => Err(n.err("give a store: `etcd` (or `local`, the default)")),
            (_, etcd) => Ok(etcd),
        }
    }

    fn read(n: Node<'_>) -> Result<EtcdConfig, ConfigError> {
        let o = n.obj(&["cluster", "prefix", "timeout", "retries", "failureMode"])?;
        let cluster = o.req("cluster", |n| {
            let c = n.str()?;
            if c.is_empty() {
                Err(n.err("must name an Envoy cluster"))
            } else {
                Ok(c.to_string())
            }
        })?;
        let prefix = o
            .opt("prefix", |n| {
                let p = n.str()?;
                if p.is_empty() || p.len() > 256 || !p.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                    Err(n.err("must be 1 to 256 printable ASCII characters without spaces"))
                } else {
                    Ok(p.to_string())
                }
            })?
            .unwrap_or_else(|| "idempotency/".into());
        let timeout = o
            .opt("timeout", |n| {
                n.duration_in(
                    (Duration::from_millis(1), "1ms"),
                    (Duration::from_secs(60), "60s"),
                )
            })?
            .unwrap_or(Duration::from_millis(500));
        let retries = o
            .opt("retries", |n| n.u64_in(0, 5))?
            .map_or(1, |r| u32::try_from(r).unwrap_or(1));
        let failure_mode = o
            .opt("failureMode", |n| {
                n.one_of(&[("closed", FailureMode::Closed), ("open", FailureMode::Open)])
            })?
            .unwrap_or(FailureMode::Closed);
        Ok(EtcdConfig {
            cluster,
            prefix,
            timeout,
            retries,
            failure_mode,
        })
    }

    /// The longest a keyed request waits for etcd before its failure mode applies.
    pub fn give_up_after(&self) -> Duration {
        self.timeout.saturating_mul(1 + self.retries)
    }
}

/// The store's own counters, `idempotency.<name>`, defined only with the etcd store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreCounter {
    /// A request to etcd that got no answer within `timeout`.
    Timeouts,
    /// A request to etcd that failed otherwise (unreachable, refused, malformed answer).
    Errors,
    /// A request sent again after a failure.
    Retries,
    /// A keyed request forwarded without a record (`failureMode: "open"`).
    Unguarded,
    /// Leases granted.
    Leases,
}

impl metrics::Counter for StoreCounter {
    const ALL: &'static [StoreCounter] = &[
        StoreCounter::Timeouts,
        StoreCounter::Errors,
        StoreCounter::Retries,
        StoreCounter::Unguarded,
        StoreCounter::Leases,
    ];

    fn name(self) -> &'static str {
        match self {
            StoreCounter::Timeouts => "store_timeouts",
            StoreCounter::Errors => "store_errors",
            StoreCounter::Retries => "store_retries",
            StoreCounter::Unguarded => "unguarded",
            StoreCounter::Leases => "leases_granted",
        }
    }
}

impl Failure {
    /// The counter a failed request to etcd adds to.
    pub fn counter(&self) -> StoreCounter {
        match self {
            Failure::Timeout => StoreCounter::Timeouts,
            _ => StoreCounter::Errors,
        }
    }
}

/// The most of a response body kept in etcd, whatever `maxBodyBytes` says: a record travels
/// base64 in one request, and etcd refuses requests over 1.5 MiB by default.
pub const MAX_KEPT_BODY: u64 = 1 << 20;

/// What etcd being unusable does to a keyed request (`failureMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// 503 problem+json with `retry-after`, nothing forwarded (the default: a request never
    /// runs unguarded).
    Closed,
    /// Forwarded without a record, and counted: availability over exactly-once.
    Open,
}

/// Why a callout to etcd gave no usable answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer within `timeout` (Envoy's 504 `upstream request timeout`).
    Timeout,
    /// No member could be reached (Envoy's 503 for a refused or reset connection, no healthy
    /// member, or a callout that failed without headers).
    Unreachable,
    /// The lease a request was attached to is gone (etcd restored or the lease expired early):
    /// a new one is granted and the request sent again.
    LeaseGone,
    /// etcd or something in between answered, but not with a usable answer.
    Error(String),
}

impl Failure {
    /// What happened, for the log and a 503's detail.
    pub fn describe(&self, timeout: Duration, attempts: u32) -> String {
        match self {
            Failure::Timeout => format!(
                "etcd did not answer within {} ms ({attempts} attempts)",
                // In u64: a u128 formatter would be in the module for this one message.
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
            ),
            Failure::Unreachable => "no etcd member could be reached".into(),
            Failure::LeaseGone => "etcd lost this proxy's lease".into(),
            Failure::Error(e) => format!("etcd failed: {e}"),
        }
    }

    /// Whether sending the same request again may help. A claim is safe to resend (its owner
    /// token recognises its own record), and so are completion and release (they compare the
    /// claim's revision). A refusal that would be refused again (too large) is not retried.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Timeout | Failure::Unreachable | Failure::LeaseGone => true,
            Failure::Error(e) => !has(e, "too large") && !has(e, "space exceeded"),
        }
    }
}

/// Reads a callout's outcome: `status` is the answer's `:status` (`None`: failed without
/// one), `body` its body. A 200 is etcd's answer (still to be parsed); anything else is why
/// there is none.
pub fn outcome(status: Option<u16>, body: &[u8]) -> Result<&[u8], Failure> {
    let text = || String::from_utf8_lossy(body.get(..body.len().min(160)).unwrap_or_default());
    match status {
        None => Err(Failure::Unreachable),
        Some(200) => Ok(body),
        Some(504) if body.starts_with(b"upstream request timeout") => Err(Failure::Timeout),
        Some(_) if body.starts_with(b"{") => match json_of(body) {
            Err(ProtocolError::Refused(e)) if has(&e, "lease not found") => Err(Failure::LeaseGone),
            Err(ProtocolError::Refused(e)) => Err(Failure::Error(e)),
            _ => Err(Failure::Error(format!("etcd answered {}", text()))),
        },
        Some(503) => Err(Failure::Unreachable),
        Some(s) => Err(Failure::Error(format!("HTTP {s}: {}", text()))),
    }
}

/// Reads a protocol error as a failure of the store.
impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Failure {
        match e {
            ProtocolError::Malformed => Failure::Error("a malformed answer".into()),
            ProtocolError::Refused(e) if has(&e, "lease not found") => Failure::LeaseGone,
            ProtocolError::Refused(e) => Failure::Error(e),
        }
    }
}

/// How many times one operation is sent: once, plus `retries` for a retryable failure, so a
/// failing etcd gets its answer within `(1 + retries) × timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    pub made: u32,
    pub retries: u32,
}

impl Attempts {
    pub fn new(retries: u32) -> Attempts {
        Attempts { made: 1, retries }
    }

    /// After `failure`: whether to send again (and counts the attempt).
    pub fn again(&mut self, failure: &Failure) -> bool {
        if failure.retryable() && self.made <= self.retries {
            self.made += 1;
            true
        } else {
            false
        }
    }
}

/// What a keyed request gets when the store failed it: refused (closed), or forwarded
/// unguarded (open). Only a claim may go on unguarded; a completion or release that fails
/// has nothing left to decide (the claim's lease ends it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    Refuse,
    ForwardUnguarded,
}

pub fn on_failure(mode: FailureMode) -> Unusable {
    match mode {
        FailureMode::Closed => Unusable::Refuse,
        FailureMode::Open => Unusable::ForwardUnguarded,
    }
}

/// What a lease is for: claims (covering `inFlightTimeout`) or completed records (`ttl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKind {
    Claim,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    id: i64,
    granted_at_ns: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    lease: Option<Lease>,
    /// A record was attached to it: worth renewing.
    used: bool,
    /// A grant is on its way, sent at this time.
    granting_since_ns: Option<u64>,
}

/// One VM's leases: one for claims and one for completed records, each granted once per
/// interval and attached to every record written in it, so a request pays no grant. A lease
/// used until `interval` after its grant must outlive what it holds by as much, so it is
/// granted for `hold + interval`: a claim lives from `inFlightTimeout` to `inFlightTimeout +
/// interval`, a record from `ttl` to `ttl + interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leases {
    interval_ns: u64,
    claim_hold_ns: u64,
    done_hold_ns: u64,
    /// How long a grant may be on its way before another is sent.
    grant_timeout_ns: u64,
    claim: Slot,
    done: Slot,
}

const SECOND_NS: u64 = 1_000_000_000;

impl Leases {
    /// The interval is a quarter of `inFlightTimeout`, between 1 s and 60 s: claims outlive
    /// their timeout by at most a quarter of it.
    pub fn new(in_flight_timeout_ns: u64, ttl_ns: u64, grant_timeout_ns: u64) -> Leases {
        Leases {
            interval_ns: (in_flight_timeout_ns / 4).clamp(SECOND_NS, 60 * SECOND_NS),
            claim_hold_ns: in_flight_timeout_ns,
            done_hold_ns: ttl_ns,
            grant_timeout_ns,
            claim: Slot::default(),
            done: Slot::default(),
        }
    }

    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    fn slot(&self, kind: LeaseKind) -> &Slot {
        match kind {
            LeaseKind::Claim => &self.claim,
            LeaseKind::Done => &self.done,
        }
    }

    fn slot_mut(&mut self, kind: LeaseKind) -> &mut Slot {
        match kind {
            LeaseKind::Claim => &mut self.claim,
            LeaseKind::Done => &mut self.done,
        }
    }

    /// The TTL to ask for, in whole seconds (rounded up).
    pub fn ttl_secs(&self, kind: LeaseKind) -> u64 {
        let hold = match kind {
            LeaseKind::Claim => self.claim_hold_ns,
            LeaseKind::Done => self.done_hold_ns,
        };
        hold.saturating_add(self.interval_ns).div_ceil(SECOND_NS)
    }

    /// The lease to attach now, if one granted less than an interval ago is at hand.
    pub fn usable(&self, kind: LeaseKind, now_ns: u64) -> Option<i64> {
        let l = self.slot(kind).lease?;
        (now_ns.saturating_sub(l.granted_at_ns) < self.interval_ns).then_some(l.id)
    }

    /// [`Leases::usable`], noting the lease as used (so the tick renews it).
    pub fn take(&mut self, kind: LeaseKind, now_ns: u64) -> Option<i64> {
        let id = self.usable(kind, now_ns)?;
        self.slot_mut(kind).used = true;
        Some(id)
    }

    /// The tick's question: whether to renew `kind` now. A claim lease is wanted from the
    /// start, so the first keyed request pays no grant; after that, a lease is renewed only
    /// if records were attached to it, so an idle VM grants nothing (and completed records'
    /// long leases are not piled up in etcd).
    pub fn renew(&mut self, kind: LeaseKind, now_ns: u64) -> bool {
        let slot = self.slot(kind);
        let wanted = match slot.lease {
            None => kind == LeaseKind::Claim,
            Some(_) => slot.used,
        };
        wanted && self.start_grant(kind, now_ns)
    }

    /// Whether to send a grant now: the lease is missing or past half its interval (so the
    /// next one is there before this one stops being usable), and no grant is on its way
    /// (one sent longer than the grant timeout ago counts as lost). Marks it as sent.
    pub fn start_grant(&mut self, kind: LeaseKind, now_ns: u64) -> bool {
        let (interval, timeout) = (self.interval_ns, self.grant_timeout_ns);
        let slot = self.slot_mut(kind);
        let fresh = slot
            .lease
            .is_some_and(|l| now_ns.saturating_sub(l.granted_at_ns) < interval / 2);
        let on_its_way = slot
            .granting_since_ns
            .is_some_and(|t| now_ns.saturating_sub(t) < timeout);
        if fresh || on_its_way {
            return false;
        }
        slot.granting_since_ns = Some(now_ns);
        true
    }

    /// A grant was answered: `ttl_secs` is what etcd granted (it may raise a short TTL, never
    /// lower it; a lease shorter than asked is not used, as it would end claims early).
    pub fn granted(&mut self, kind: LeaseKind, id: i64, ttl_secs: u64, sent_at_ns: u64) {
        let wanted = self.ttl_secs(kind);
        let slot = self.slot_mut(kind);
        slot.granting_since_ns = None;
        if ttl_secs >= wanted {
            slot.lease = Some(Lease {
                id,
                granted_at_ns: sent_at_ns,
            });
            slot.used = false;
        }
    }

    /// A grant failed: the next request or tick sends another.
    pub fn grant_failed(&mut self, kind: LeaseKind) {
        self.slot_mut(kind).granting_since_ns = None;
    }

    /// etcd no longer knows lease `id`: it is not attached again.
    pub fn forget(&mut self, id: i64) {
        for slot in [&mut self.claim, &mut self.done] {
            if slot.lease.is_some_and(|l| l.id == id) {
                slot.lease = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

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
    fn base64_is_the_standard_alphabet_with_padding() {
        for (plain, coded) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff, 0xbf], "+/+/"),
        ] {
            assert_eq!(b64(plain), coded);
            assert_eq!(unb64(coded).as_deref(), Some(plain));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unb64(&b64(&all)), Some(all));
        assert_eq!(unb64("Zm9v!"), None);
        assert_eq!(unb64("Zh=="), None, "stray bits");
        assert!(has(
            "etcdserver: requested lease not found",
            "lease not found"
        ));
        assert!(!has("lease", "lease not found"));
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
        let value = unb64(body["success"][0]["request_put"]["value"].as_str().unwrap()).unwrap();
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

    #[test]
    fn callout_outcomes_are_told_apart_and_only_some_are_retried() {
        assert_eq!(outcome(Some(200), b"{}"), Ok(&b"{}"[..]));
        assert_eq!(outcome(None, b""), Err(Failure::Unreachable));
        assert_eq!(
            outcome(Some(504), b"upstream request timeout"),
            Err(Failure::Timeout)
        );
        assert_eq!(
            outcome(
                Some(503),
                b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            ),
            Err(Failure::Unreachable)
        );
        assert_eq!(
            outcome(Some(503), b"no healthy upstream"),
            Err(Failure::Unreachable)
        );
        let gone = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert_eq!(outcome(Some(404), gone), Err(Failure::LeaseGone));
        let big = br#"{"error":"etcdserver: request is too large","code":3}"#;
        let e = outcome(Some(400), big).unwrap_err();
        assert_eq!(e, Failure::Error("etcdserver: request is too large".into()));
        assert!(!e.retryable());
        let e = outcome(Some(500), b"<html>oops</html>").unwrap_err();
        assert!(
            matches!(&e, Failure::Error(m) if m.contains("500")),
            "{e:?}"
        );
        assert!(e.retryable());
        assert!(Failure::Timeout.retryable() && Failure::Unreachable.retryable());
        assert!(Failure::from(ProtocolError::Malformed).retryable());
    }

    #[test]
    fn an_operation_is_sent_at_most_one_plus_retries_times() {
        let mut a = Attempts::new(1);
        assert!(a.again(&Failure::Timeout));
        assert!(!a.again(&Failure::Timeout), "1 + 1 attempts");
        assert_eq!(a.made, 2);
        let mut none = Attempts::new(0);
        assert!(!none.again(&Failure::Unreachable));
        let mut refused = Attempts::new(3);
        assert!(!refused.again(&Failure::Error("etcdserver: request is too large".into())));
        assert_eq!(on_failure(FailureMode::Closed), Unusable::Refuse);
        assert_eq!(on_failure(FailureMode::Open), Unusable::ForwardUnguarded);
    }

    #[test]
    fn leases_are_granted_once_per_interval_and_outlive_what_they_hold() {
        const S: u64 = SECOND_NS;
        let mut l = Leases::new(30 * S, 3600 * S, S);
        assert_eq!(l.interval_ns(), 7_500_000_000);
        assert_eq!(l.ttl_secs(LeaseKind::Claim), 38, "30 s + 7.5 s, rounded up");
        assert_eq!(l.ttl_secs(LeaseKind::Done), 3608);
        assert_eq!(l.usable(LeaseKind::Claim, 0), None);
        assert!(l.start_grant(LeaseKind::Claim, 0));
        assert!(
            !l.start_grant(LeaseKind::Claim, S / 2),
            "one grant on its way"
        );
        l.granted(LeaseKind::Claim, 77, 38, 0);
        assert_eq!(l.usable(LeaseKind::Claim, 7 * S), Some(77));
        assert_eq!(l.usable(LeaseKind::Claim, 8 * S), None, "past its interval");
        assert_eq!(l.usable(LeaseKind::Done, S), None, "each kind its own");
        assert!(!l.start_grant(LeaseKind::Claim, 3 * S), "fresh");
        assert!(
            l.start_grant(LeaseKind::Claim, 4 * S),
            "renewed at half its interval"
        );
        l.grant_failed(LeaseKind::Claim);
        assert_eq!(
            l.usable(LeaseKind::Claim, 5 * S),
            Some(77),
            "the old one still serves"
        );
        assert!(l.start_grant(LeaseKind::Claim, 5 * S));
        assert!(
            l.start_grant(LeaseKind::Claim, 7 * S),
            "a lost grant is sent again"
        );
        l.granted(LeaseKind::Claim, 78, 10, 7 * S);
        assert_eq!(
            l.usable(LeaseKind::Claim, 7 * S),
            Some(77),
            "too short: unused"
        );
        l.forget(77);
        assert_eq!(l.usable(LeaseKind::Claim, 7 * S), None);
        let mut idle = Leases::new(30 * S, 3600 * S, S);
        assert!(
            idle.renew(LeaseKind::Claim, 0),
            "a claim lease from the start"
        );
        assert!(
            !idle.renew(LeaseKind::Done, 0),
            "a record lease only on demand"
        );
        idle.granted(LeaseKind::Claim, 5, 38, 0);
        assert!(!idle.renew(LeaseKind::Claim, 5 * S), "unused: not renewed");
        assert_eq!(idle.take(LeaseKind::Claim, 5 * S), Some(5));
        assert!(idle.renew(LeaseKind::Claim, 5 * S), "used: renewed");
        assert_ne!(fleet_seed("idempotency/"), fleet_seed("pay/"));
        let short = Leases::new(2 * S, 60 * S, S);
        assert_eq!(short.interval_ns(), S, "at least a second");
        assert_eq!(short.ttl_secs(LeaseKind::Claim), 3);
    }

    fn store(json: &str) -> Result<Option<EtcdConfig>, String> {
        let v: Value = serde_json::from_str(json).unwrap();
        EtcdConfig::read_store(Node::at(&v, "store")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_store_option_is_read_with_its_defaults_and_bad_values_named() {
        let c = store(r#"{"etcd":{"cluster":"etcd"}}"#).unwrap().unwrap();
        assert_eq!(
            c,
            EtcdConfig {
                cluster: "etcd".into(),
                prefix: "idempotency/".into(),
                timeout: Duration::from_millis(500),
                retries: 1,
                failure_mode: FailureMode::Closed,
            }
        );
        assert_eq!(c.give_up_after(), Duration::from_secs(1));
        let c = store(
            r#"{"etcd":{"cluster":"kv","prefix":"pay/","timeout":"50ms","retries":0,"failureMode":"open"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.retries, c.failure_mode), (0, FailureMode::Open));
        assert_eq!(store(r#"{"local":{}}"#), Ok(None));
        for (bad, needle) in [
            (r#"{"etcd":{}}"#, "store.etcd.cluster: required"),
            (
                r#"{"etcd":{"cluster":""}}"#,
                "store.etcd.cluster: must name",
            ),
            (
                r#"{"etcd":{"cluster":"e","timeout":"0s"}}"#,
                "store.etcd.timeout: must be between",
            ),
            (
                r#"{"etcd":{"cluster":"e","retries":9}}"#,
                "store.etcd.retries: must be between 0 and 5",
            ),
            (
                r#"{"etcd":{"cluster":"e","prefix":"a b"}}"#,
                "store.etcd.prefix:",
            ),
            (
                r#"{"etcd":{"cluster":"e","failureMode":"maybe"}}"#,
                "store.etcd.failureMode:",
            ),
            (
                r#"{"etcd":{"cluster":"e","tls":true}}"#,
                "unknown field `tls`",
            ),
            (r#"{"redis":{}}"#, "store: unknown field `redis`"),
            (r#"{}"#, "store: give a store"),
            (
                r#"{"local":{},"etcd":{"cluster":"e"}}"#,
                "store: give one store",
            ),
        ] {
            let e = store(bad).unwrap_err();
            assert!(e.starts_with(needle) || e.contains(needle), "{bad}: {e}");
        }
    }
}
