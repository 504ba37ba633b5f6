//! The decisions: which requests are covered, what their key is, and what a request with a
//! key gets (forwarded under a claim, 409, 422, or the stored response), over the shared record
//! table. No hostcalls: the glue reads inputs and acts on the answers.

use crate::config::Config;
use crate::record::{age, Age, Meta, State};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use edge_core::key::{KeyHasher, KeyPart};
use edge_core::metrics;
use edge_core::problem::{problem_json, retry_after, Reply};
use edge_core::sha256::Sha256;
use edge_core::stored::{Copied, CopyBudget, ResponseCopy, StoredResponse};
use edge_core::table::{Claim as TableClaim, Found, Record, Table};
use edge_core::{RequestView, SlotStore, StoreError};

/// The header marking a replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Reads a key header: the structured-field string form (`"abc"`, with `\"` and `\\`
/// escapes) or the bare form (`abc`). Printable ASCII only, 1 to `max_len` characters.
pub fn parse_key(raw: &[u8], max_len: usize) -> Result<Vec<u8>, String> {
    let raw = raw.trim_ascii();
    let key = match raw.strip_prefix(b"\"") {
        Some(inner) => {
            let Some(inner) = inner.strip_suffix(b"\"") else {
                return Err("a quoted key must end with a quote".into());
            };
            let mut out = Vec::with_capacity(inner.len());
            let mut it = inner.iter();
            while let Some(&b) = it.next() {
                match b {
                    b'\\' => match it.next() {
                        Some(&e @ (b'"' | b'\\')) => out.push(e),
                        _ => return Err("a quoted key may escape only \\\" and \\\\".into()),
                    },
                    b'"' => return Err("a quoted key has an unescaped quote inside".into()),
                    _ => out.push(b),
                }
            }
            out
        }
        None => raw.to_vec(),
    };
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if key.len() > max_len {
        return Err(format!("the key is longer than {max_len} characters"));
    }
    if !key.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err("the key has characters outside printable ASCII".into());
    }
    Ok(key)
}

/// The counters, `idempotency.<name>` (in Envoy: `wasmcustom.idempotency.<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Forwarded,
    Replayed,
    Stored,
    Released,
    Evicted,
    Conflict409,
    Mismatch422,
    Rejected400,
    Rejected413,
    Unavailable503,
    Lost,
    Unrecorded,
}

impl metrics::Counter for Counter {
    const ALL: &'static [Counter] = &[
        Counter::Forwarded,
        Counter::Replayed,
        Counter::Stored,
        Counter::Released,
        Counter::Evicted,
        Counter::Conflict409,
        Counter::Mismatch422,
        Counter::Rejected400,
        Counter::Rejected413,
        Counter::Unavailable503,
        Counter::Lost,
        Counter::Unrecorded,
    ];

    fn name(self) -> &'static str {
        match self {
            Counter::Forwarded => "forwarded",
            Counter::Replayed => "replayed",
            Counter::Stored => "stored",
            Counter::Released => "released",
            Counter::Evicted => "evicted",
            Counter::Conflict409 => "conflict_409",
            Counter::Mismatch422 => "mismatch_422",
            Counter::Rejected400 => "rejected_400",
            Counter::Rejected413 => "rejected_413",
            Counter::Unavailable503 => "unavailable_503",
            Counter::Lost => "lost",
            Counter::Unrecorded => "unrecorded",
        }
    }
}

/// Why a request is refused before it reaches the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    Missing,
    Invalid,
    TooLarge,
    InFlight,
    Mismatch,
    Unreplayable,
    Unavailable,
}

impl Problem {
    pub fn status(self) -> u32 {
        match self {
            Problem::Missing | Problem::Invalid => 400,
            Problem::TooLarge => 413,
            Problem::InFlight | Problem::Unreplayable => 409,
            Problem::Mismatch => 422,
            Problem::Unavailable => 503,
        }
    }

    /// The counter it adds to.
    pub fn counter(self) -> Counter {
        match self {
            Problem::Missing | Problem::Invalid => Counter::Rejected400,
            Problem::TooLarge => Counter::Rejected413,
            Problem::InFlight | Problem::Unreplayable => Counter::Conflict409,
            Problem::Mismatch => Counter::Mismatch422,
            Problem::Unavailable => Counter::Unavailable503,
        }
    }

    /// The problem+json reply; `detail` says what exactly, `header` names the key header.
    pub fn reply(self, header: &str, detail: &str) -> Reply {
        let (kind, title) = match self {
            Problem::Missing => ("key-missing", format!("{header} is missing")),
            Problem::Invalid => ("key-invalid", format!("{header} is invalid")),
            Problem::TooLarge => (
                "body-too-large",
                "Request body too large to fingerprint".to_string(),
            ),
            Problem::InFlight => (
                "request-in-flight",
                format!("A request is outstanding for this {header}"),
            ),
            Problem::Mismatch => ("key-reused", format!("{header} is already used")),
            Problem::Unreplayable => (
                "response-not-kept",
                format!("The request with this {header} completed; its response was not kept"),
            ),
            Problem::Unavailable => (
                "store-unavailable",
                "Idempotency records are unavailable".to_string(),
            ),
        };
        let status = self.status();
        let mut headers = Vec::new();
        if matches!(self, Problem::InFlight | Problem::Unavailable) {
            headers.push(retry_after(1));
        }
        Reply::problem(
            status,
            headers,
            problem_json(
                &format!("urn:edge-plugins:idempotency:{kind}"),
                &title,
                status,
                detail,
                &[],
            ),
        )
    }
}

/// What to do with a request before its body is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identify {
    /// Not covered, or covered without a key while keys are optional: pass it on untouched.
    Skip,
    Refuse(Problem, String),
    /// The record key (a hash of scope, method, path and idempotency key).
    Key(u64),
}

/// A request's claim on its key, held until its response is kept or the claim is released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    found: Found,
    fingerprint: Option<[u8; 32]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    Forward(Claim),
    Replay(Reply),
    Refuse(Problem, String),
}

/// What becomes of a claimed request's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Keep,
    /// Give the key back, for this reason (logged).
    Release(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    Stored,
    /// Kept as completed without its response (too large, or no room could be made).
    StoredWithoutResponse,
    /// The claim had been abandoned (past `inFlightTimeout`) and taken by a retry.
    Lost,
}

/// Claims retried after clearing a record that was over its time.
const ATTEMPTS: u32 = 4;

pub struct Idempotency {
    pub config: Config,
    table: Table,
    /// This worker's response copies together.
    budget: CopyBudget,
    seed: u64,
    parts: Vec<KeyPart>,
}

impl Idempotency {
    /// `namespace` prefixes the shared-data keys; `seed` keys record hashes (shared by every
    /// worker, see `edge_core::key::shared_seed`).
    pub fn new(config: Config, namespace: &str, seed: u64) -> Idempotency {
        let mut parts = config.scope.clone();
        parts.push(KeyPart::Method);
        Idempotency {
            table: Table::new(namespace, config.max_entries, config.max_total_bytes),
            budget: CopyBudget::new(config.max_buffered_bytes),
            seed,
            parts,
            config,
        }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn covered(&self, req: &impl RequestView) -> bool {
        edge_core::route::covers(&self.config.methods, &self.config.routes, req)
    }

    pub fn identify(&self, req: &impl RequestView) -> Identify {
        if !self.covered(req) {
            return Identify::Skip;
        }
        let header = &self.config.header;
        let Some(raw) = req.header(header) else {
            return if self.config.required {
                Identify::Refuse(
                    Problem::Missing,
                    format!("{} {} requires the {header} header", m(req), p(req)),
                )
            } else {
                Identify::Skip
            };
        };
        match parse_key(&raw, self.config.max_key_length) {
            Err(why) => Identify::Refuse(Problem::Invalid, why),
            Ok(key) => {
                // The full path, query included: another URL is another operation.
                let h = KeyHasher::new(self.seed, "idempotency")
                    .parts(&self.parts, req)
                    .bytes(&req.raw_path())
                    .bytes(&key);
                Identify::Key(h.finish())
            }
        }
    }

    fn meta_of(r: &Record) -> Option<Meta> {
        Meta::decode(&r.meta)
    }

    /// Whether another key's record may make room for a new claim: completed ones (the
    /// oldest go first) and abandoned claims; never a live claim.
    fn evictable(&self, r: &Record, now_ns: u64) -> bool {
        match Self::meta_of(r) {
            None => true,
            Some(m) => {
                m.state != State::InFlight
                    || age(
                        m.state,
                        r.at_ns,
                        now_ns,
                        0,
                        self.config.in_flight_timeout_ns,
                    ) == Age::Over
            }
        }
    }

    /// Whether a live claim holds `key` now. A duplicate of a request in flight is answered
    /// 409 from its headers, before they go on, so it never reaches the upstream even without
    /// a buffer filter after the plugin; a duplicate of a completed request still needs its
    /// body read (for the fingerprint). A store that cannot be read says no: `begin` decides.
    pub fn held(&self, store: &impl SlotStore, key: u64, now_ns: u64) -> bool {
        let Ok(Some(found)) = self.table.find(store, key) else {
            return false;
        };
        Self::meta_of(&found.record).is_some_and(|m| {
            m.state == State::InFlight
                && age(
                    m.state,
                    found.record.at_ns,
                    now_ns,
                    0,
                    self.config.in_flight_timeout_ns,
                ) == Age::Live
        })
    }

    /// The request with record key `key` and body fingerprint `fingerprint` is ready to go.
    pub fn begin(
        &self,
        store: &impl SlotStore,
        key: u64,
        fingerprint: Option<[u8; 32]>,
        now_ns: u64,
    ) -> Begin {
        match self.try_begin(store, key, fingerprint, now_ns) {
            Ok(b) => b,
            Err(e) => Begin::Refuse(Problem::Unavailable, e.to_string()),
        }
    }

    fn try_begin(
        &self,
        store: &impl SlotStore,
        key: u64,
        fingerprint: Option<[u8; 32]>,
        now_ns: u64,
    ) -> Result<Begin, StoreError> {
        let meta = Meta {
            state: State::InFlight,
            fingerprint,
        };
        for _ in 0..ATTEMPTS {
            let record = Record::new(key, now_ns, false, meta.encode());
            let found = match self
                .table
                .claim(store, record, |r| self.evictable(r, now_ns))?
            {
                TableClaim::Won(found) => return Ok(Begin::Forward(Claim { found, fingerprint })),
                TableClaim::Full => {
                    return Ok(Begin::Refuse(
                        Problem::Unavailable,
                        "every record slot for this key holds a request in flight".into(),
                    ))
                }
                TableClaim::Exists(found) => found,
            };
            let Some(theirs) = Self::meta_of(&found.record) else {
                self.table.release(store, &found)?;
                continue;
            };
            let c = &self.config;
            if age(
                theirs.state,
                found.record.at_ns,
                now_ns,
                c.ttl_ns,
                c.in_flight_timeout_ns,
            ) == Age::Over
            {
                self.table.release(store, &found)?;
                continue;
            }
            if theirs.state == State::InFlight {
                return Ok(Begin::Refuse(
                    Problem::InFlight,
                    "the first request with this key has not completed yet; retry later".into(),
                ));
            }
            if let (true, Some(a), Some(b)) = (c.fingerprint, theirs.fingerprint, fingerprint) {
                if a != b {
                    return Ok(Begin::Refuse(
                        Problem::Mismatch,
                        "this key was used for a request with a different body".into(),
                    ));
                }
            }
            if theirs.state == State::DoneWithoutResponse {
                return Ok(Begin::Refuse(
                    Problem::Unreplayable,
                    "the response was too large to keep; use a new key to repeat the request"
                        .into(),
                ));
            }
            match self
                .table
                .body(store, &found)?
                .and_then(|b| StoredResponse::decode(&b))
            {
                Some(r) => return Ok(Begin::Replay(replay(r))),
                // Another worker is between writing the record and its body.
                None if now_ns.saturating_sub(found.record.at_ns) < c.in_flight_timeout_ns => {
                    return Ok(Begin::Refuse(
                        Problem::InFlight,
                        "the first request with this key is completing; retry later".into(),
                    ))
                }
                None => {
                    self.table.release(store, &found)?;
                }
            }
        }
        Err(StoreError("records for this key kept changing".into()))
    }

    /// What to do with the claimed request's response, from its status and Envoy's
    /// `response.code_details`: keep it only when the upstream itself answered with a status
    /// in `storeStatuses`. A local reply (Envoy's 503 for a reset, its 504, another filter's
    /// 429) says nothing about whether the request ran, so the key is given back.
    pub fn response_fate(&self, status: u16, details: Option<&str>) -> Fate {
        if !edge_core::route::from_upstream(details) {
            Fate::Release("local reply")
        } else if self.config.store_statuses.contains(status) {
            Fate::Keep
        } else {
            Fate::Release("status not in storeStatuses")
        }
    }

    /// What a stream that ends before its response is complete (client gone, upstream reset
    /// mid-body) does with its claim. With no kept answer started, nothing says the
    /// application ran, so the key goes back and a retry runs. Once the application's own
    /// answer with a kept status has begun, it did run: the key stays, completed without its
    /// response, and a retry gets 409 instead of charging twice.
    pub fn cut_short(&self, answer_started: bool) -> Fate {
        if answer_started {
            Fate::Keep
        } else {
            Fate::Release("the stream ended before any response")
        }
    }

    /// Whether a declared `content-length` already exceeds `maxBodyBytes` (answer 413 before
    /// reading anything).
    pub fn declared_too_large(&self, content_length: Option<&[u8]>) -> bool {
        content_length
            .and_then(edge_core::text::parse_u64)
            .is_some_and(|n| n > self.config.max_body_bytes)
    }

    /// How the body of a keyed request is fingerprinted, from its headers: with fingerprints
    /// off, or no body (the headers ended the stream), decide now; a declared length over
    /// `maxBodyBytes` is refused before anything is read; otherwise read it as it arrives.
    pub fn body_plan(&self, end_of_stream: bool, content_length: Option<&[u8]>) -> BodyPlan {
        if !self.config.fingerprint {
            return BodyPlan::Decide(None);
        }
        if end_of_stream {
            return BodyPlan::Decide(Some(Sha256::new().finish()));
        }
        if self.declared_too_large(content_length) {
            return BodyPlan::Refuse(Problem::TooLarge, self.too_large());
        }
        BodyPlan::Read(Box::new(BodyFingerprint {
            hash: Sha256::new(),
            seen: 0,
            max: self.config.max_body_bytes,
        }))
    }

    fn too_large(&self) -> String {
        too_large(self.config.max_body_bytes)
    }

    /// A copy of the claimed request's response, drawing on this worker's copy budget.
    pub fn copy(&self, status: u16, headers: Vec<(String, Vec<u8>)>) -> ResponseCopy {
        ResponseCopy::new(
            status,
            headers,
            self.config.max_body_bytes,
            self.budget.clone(),
        )
    }

    /// The claimed request's response has ended as `copied`. The application ran, so the key
    /// stays either way: a whole response is kept to replay; one given up (too large, over
    /// the worker's copy budget) or cut short (client gone, upstream reset mid-body) is
    /// recorded without it, and a retry gets 409 rather than running the request again.
    pub fn complete(
        &self,
        store: &impl SlotStore,
        claim: &Claim,
        copied: Copied,
        now_ns: u64,
    ) -> Result<Completion, StoreError> {
        let done = |state| Meta {
            state,
            fingerprint: claim.fingerprint,
        };
        if let Copied::Whole(mut r) = copied {
            r.stored_at_ns = now_ns;
            let record = Record::new(
                claim.found.record.key,
                now_ns,
                false,
                done(State::Done).encode(),
            );
            if self
                .table
                .put_body(store, &claim.found, record, &r.encode())?
                .is_some()
            {
                return Ok(Completion::Stored);
            }
        }
        let record = Record::new(
            claim.found.record.key,
            now_ns,
            false,
            done(State::DoneWithoutResponse).encode(),
        );
        Ok(match self.table.replace(store, &claim.found, record)? {
            Some(_) => Completion::StoredWithoutResponse,
            None => Completion::Lost,
        })
    }

    /// Gives the key back (the response is not kept, or never came): a retry runs again.
    pub fn release(&self, store: &impl SlotStore, claim: &Claim) -> Result<bool, StoreError> {
        self.table.release(store, &claim.found)
    }
}

fn m(req: &impl RequestView) -> String {
    edge_core::text::into_text(req.method())
}

fn p(req: &impl RequestView) -> String {
    edge_core::text::into_text(req.path())
}

fn too_large(max: u64) -> String {
    format!("the body is larger than {max} bytes, the most this route reads")
}

/// What to do with a keyed request's body before deciding.
pub enum BodyPlan {
    /// Decide now, with this fingerprint.
    Decide(Option<[u8; 32]>),
    /// Answer with a problem.
    Refuse(Problem, String),
    /// Read the body into this fingerprint as it arrives.
    Read(Box<BodyFingerprint>),
}

/// The fingerprint of a request body being read.
pub struct BodyFingerprint {
    hash: Sha256,
    seen: usize,
    max: u64,
}

/// What one body callback leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Hold the request until more of the body arrives.
    More,
    /// The whole body is read: decide with this fingerprint.
    Done([u8; 32]),
    Refuse(Problem, String),
}

impl BodyFingerprint {
    /// Envoy, buffering, hands over the whole body received so far (`total` bytes, `end`:
    /// all of it); only bytes not yet hashed are read, by `read(start, len)`. A body past
    /// `maxBodyBytes` is refused before it is read; one that cannot be read whole is refused
    /// as unavailable: a fingerprint of part of a body could match another body.
    pub fn feed(
        &mut self,
        total: usize,
        end: bool,
        read: impl FnOnce(usize, usize) -> Vec<u8>,
    ) -> Feed {
        if u64::try_from(total).map_or(true, |t| t > self.max) {
            return Feed::Refuse(Problem::TooLarge, too_large(self.max));
        }
        if total > self.seen {
            let want = total - self.seen;
            let new = read(self.seen, want);
            if new.len() != want {
                return Feed::Refuse(
                    Problem::Unavailable,
                    "the request body could not be read for its fingerprint".into(),
                );
            }
            self.hash.update(&new);
            self.seen = total;
        }
        if end {
            Feed::Done(core::mem::take(&mut self.hash).finish())
        } else {
            Feed::More
        }
    }

    /// The body ended with trailers: what was read is all of it.
    pub fn finish(self) -> [u8; 32] {
        self.hash.finish()
    }
}

/// The stored response as it is replayed.
fn replay(r: StoredResponse) -> Reply {
    r.into_reply(vec![(REPLAYED_HEADER, b"true".to_vec())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::store::MemoryStore;
    use edge_core::stored::Dropped;
    use edge_core::RequestParts;

    #[test]
    fn counters_keep_their_names() {
        let names = metrics::names::<Counter>(&["idempotency"]);
        assert_eq!(
            names,
            [
                "idempotency.forwarded",
                "idempotency.replayed",
                "idempotency.stored",
                "idempotency.released",
                "idempotency.evicted",
                "idempotency.conflict_409",
                "idempotency.mismatch_422",
                "idempotency.rejected_400",
                "idempotency.rejected_413",
                "idempotency.unavailable_503",
                "idempotency.lost",
                "idempotency.unrecorded",
            ]
        );
    }

    const S: u64 = 1_000_000_000;

    fn policy(json: &str) -> Idempotency {
        Idempotency::new(Config::parse(json.as_bytes()).unwrap(), "idem/", 42)
    }

    fn pay(key: &str, auth: &str) -> RequestParts {
        RequestParts::new("POST", "/payments?x=1")
            .header("idempotency-key", key)
            .header("authorization", auth)
    }

    fn key(p: &Idempotency, req: &RequestParts) -> u64 {
        match p.identify(req) {
            Identify::Key(k) => k,
            other => panic!("{other:?}"),
        }
    }

    fn response(body: &str) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: body.as_bytes().to_vec(),
            stored_at_ns: 0,
        }
    }

    fn forward(b: Begin) -> Claim {
        match b {
            Begin::Forward(c) => c,
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    fn refused(b: Begin) -> Problem {
        match b {
            Begin::Refuse(p, _) => p,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn keys_are_read_in_both_forms_within_limits() {
        assert_eq!(parse_key(b"8e03-978e", 255).unwrap(), b"8e03-978e");
        assert_eq!(parse_key(b" \"8e03-978e\" ", 255).unwrap(), b"8e03-978e");
        assert_eq!(parse_key(br#""a\"b\\c""#, 255).unwrap(), br#"a"b\c"#);
        assert_eq!(parse_key(b"a b", 255).unwrap(), b"a b");
        for (bad, why) in [
            (&b""[..], "empty"),
            (b"\"\"", "empty"),
            (b"\"abc", "end with a quote"),
            (b"\"a\"b\"", "unescaped quote"),
            (b"\"a\\nb\"", "escape only"),
            (b"caf\xc3\xa9", "printable ASCII"),
            (b"a\x01b", "printable ASCII"),
        ] {
            let e = parse_key(bad, 255).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(parse_key(&[b'k'; 10], 10).is_ok());
        assert!(parse_key(&[b'k'; 11], 10)
            .unwrap_err()
            .contains("longer than 10"));
    }

    #[test]
    fn only_covered_requests_with_keys_are_handled() {
        let p = policy(r#"{"routes":[{"pathPrefix":"/payments"}]}"#);
        assert_eq!(
            p.identify(&RequestParts::new("GET", "/payments").header("idempotency-key", "k")),
            Identify::Skip
        );
        assert_eq!(
            p.identify(&RequestParts::new("POST", "/orders").header("idempotency-key", "k")),
            Identify::Skip
        );
        assert_eq!(
            p.identify(&RequestParts::new("POST", "/payments")),
            Identify::Skip,
            "optional by default"
        );
        let p = policy(r#"{"required":true}"#);
        assert!(matches!(
            p.identify(&RequestParts::new("POST", "/payments")),
            Identify::Refuse(Problem::Missing, _)
        ));
        assert!(matches!(
            p.identify(&pay("", "a")),
            Identify::Refuse(Problem::Invalid, _)
        ));
        let r = Problem::Missing.reply("idempotency-key", "d");
        assert_eq!(r.status, 400);
        assert!(String::from_utf8(r.body)
            .unwrap()
            .contains("\"title\":\"idempotency-key is missing\""));
    }

    #[test]
    fn records_are_scoped_by_client_method_path_and_key() {
        let p = policy("{}");
        let base = key(&p, &pay("k1", "Bearer alice"));
        assert_eq!(
            base,
            key(&p, &pay("\"k1\"", "Bearer alice")),
            "both forms are one key"
        );
        assert_ne!(base, key(&p, &pay("k1", "Bearer bob")), "another client");
        assert_ne!(base, key(&p, &pay("k2", "Bearer alice")));
        let patch = RequestParts::new("PATCH", "/payments?x=1")
            .header("idempotency-key", "k1")
            .header("authorization", "Bearer alice");
        assert_ne!(base, key(&p, &patch));
        let other_path = RequestParts::new("POST", "/payments?x=2")
            .header("idempotency-key", "k1")
            .header("authorization", "Bearer alice");
        assert_ne!(base, key(&p, &other_path));
        let by_ip = policy(r#"{"scope":[{"source":"clientIp"}]}"#);
        let from = |ip| pay("k1", "same").from_ip(ip);
        assert_ne!(
            key(&by_ip, &from("10.0.0.1:1")),
            key(&by_ip, &from("10.0.0.2:1"))
        );
    }

    #[test]
    fn first_forwards_duplicate_conflicts_then_replays_after_completion() {
        let (p, s) = (policy("{}"), MemoryStore::new());
        let k = key(&p, &pay("k", "a"));
        let fp = Some([1; 32]);
        let claim = forward(p.begin(&s, k, fp, S));
        assert_eq!(refused(p.begin(&s, k, fp, S)), Problem::InFlight);
        assert_eq!(
            p.complete(&s, &claim, Copied::Whole(response("{\"id\":1}")), 2 * S),
            Ok(Completion::Stored)
        );
        let Begin::Replay(r) = p.begin(&s, k, fp, 3 * S) else {
            panic!()
        };
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{\"id\":1}"[..]));
        assert!(r
            .headers
            .contains(&("idempotent-replayed".into(), b"true".to_vec())));
        assert!(r
            .headers
            .contains(&("content-type".into(), b"application/json".to_vec())));
        assert_eq!(
            refused(p.begin(&s, k, Some([2; 32]), 3 * S)),
            Problem::Mismatch
        );
    }

    #[test]
    fn without_fingerprints_another_body_replays() {
        // Fingerprints that differ are ignored when the configuration turns them off.
        let (p, s) = (policy(r#"{"fingerprint":"none"}"#), MemoryStore::new());
        let claim = forward(p.begin(&s, 5, Some([1; 32]), S));
        p.complete(&s, &claim, Copied::Whole(response("x")), S)
            .unwrap();
        assert!(matches!(p.begin(&s, 5, Some([2; 32]), S), Begin::Replay(_)));
        assert!(matches!(p.begin(&s, 5, None, S), Begin::Replay(_)));
    }

    #[test]
    fn released_keys_run_again_and_records_expire() {
        let (p, s) = (
            policy(r#"{"ttl":"10s","inFlightTimeout":"2s"}"#),
            MemoryStore::new(),
        );
        let claim = forward(p.begin(&s, 5, None, 0));
        assert_eq!(p.release(&s, &claim), Ok(true));
        let claim = forward(p.begin(&s, 5, None, S));
        // A claim whose worker vanished blocks the key only until inFlightTimeout.
        assert_eq!(refused(p.begin(&s, 5, None, 2 * S)), Problem::InFlight);
        let retry = forward(p.begin(&s, 5, None, 3 * S));
        assert_eq!(
            p.complete(&s, &claim, Copied::Whole(response("late")), 4 * S),
            Ok(Completion::Lost)
        );
        p.complete(&s, &retry, Copied::Whole(response("retry")), 4 * S)
            .unwrap();
        let Begin::Replay(r) = p.begin(&s, 5, None, 13 * S) else {
            panic!()
        };
        assert_eq!(r.body, b"retry");
        forward(p.begin(&s, 5, None, 14 * S));
    }

    #[test]
    fn a_response_too_large_to_keep_refuses_duplicates_instead_of_running_them() {
        let (p, s) = (policy(r#"{"maxTotalBytes":100}"#), MemoryStore::new());
        let claim = forward(p.begin(&s, 5, None, 0));
        let big = response(&"x".repeat(200));
        assert_eq!(
            p.complete(&s, &claim, Copied::Whole(big), 0),
            Ok(Completion::StoredWithoutResponse)
        );
        assert_eq!(refused(p.begin(&s, 5, None, 0)), Problem::Unreplayable);
        let claim = forward(p.begin(&s, 6, None, 0));
        assert_eq!(
            p.complete(&s, &claim, Copied::Dropped(Dropped::TooLarge), 0),
            Ok(Completion::StoredWithoutResponse)
        );
    }

    #[test]
    fn live_claims_are_never_evicted_and_completed_records_make_room() {
        let (p, s) = (policy(r#"{"maxEntries":1}"#), MemoryStore::new());
        let first = forward(p.begin(&s, 1, None, 0));
        assert_eq!(refused(p.begin(&s, 2, None, 0)), Problem::Unavailable);
        p.complete(&s, &first, Copied::Whole(response("1")), 0)
            .unwrap();
        forward(p.begin(&s, 2, None, 0));
        assert_eq!(p.table().take_evictions(), 1);
        // The evicted key is forgotten: it would run again, once a slot is free.
        assert_eq!(refused(p.begin(&s, 1, None, 0)), Problem::Unavailable);
    }

    #[test]
    fn a_flood_of_keys_stays_within_the_bounds() {
        let (p, s) = (
            policy(r#"{"maxEntries":64,"maxTotalBytes":2000}"#),
            MemoryStore::new(),
        );
        let keep = forward(p.begin(&s, u64::MAX, None, 0));
        let mut stored = 0;
        for k in 1..5000u64 {
            if let Begin::Forward(c) = p.begin(&s, k, None, k) {
                let done = p.complete(&s, &c, Copied::Whole(response("0123456789")), k);
                stored += usize::from(done == Ok(Completion::Stored));
            }
            assert!(p.table().used_bytes(&s).unwrap() <= 2000);
        }
        // Room is made: nearly every key ran and kept its response, and the latest replays.
        assert!(stored > 4900, "stored {stored} of 4999");
        assert!(matches!(p.begin(&s, 4999, None, 5000), Begin::Replay(_)));
        assert!(s.len() <= 2 * 64 + 2, "shared keys: {}", s.len());
        assert_eq!(
            refused(p.begin(&s, u64::MAX, None, 10)),
            Problem::InFlight,
            "the live claim survived"
        );
        p.complete(&s, &keep, Copied::Whole(response("kept")), 10)
            .unwrap();
    }

    #[test]
    fn a_stream_cut_short_keeps_the_key_once_the_application_answered() {
        let (p, s) = (policy("{}"), MemoryStore::new());
        // No answer had begun: nothing says the request ran, the key goes back.
        assert!(matches!(p.cut_short(false), Fate::Release(_)));
        assert_eq!(p.cut_short(true), Fate::Keep);
        // Its answer had begun: what arrived is not replayed, and a retry does not run again.
        let claim = forward(p.begin(&s, 5, None, 0));
        let mut copy = p.copy(201, Vec::new());
        assert_eq!(copy.body(4, false, || b"half".to_vec()), None);
        assert_eq!(
            p.complete(&s, &claim, copy.finish(), S),
            Ok(Completion::StoredWithoutResponse)
        );
        assert_eq!(refused(p.begin(&s, 5, None, 2 * S)), Problem::Unreplayable);
        // Whole, it is replayed.
        let claim = forward(p.begin(&s, 6, None, 0));
        let mut copy = p.copy(201, Vec::new());
        assert_eq!(copy.body(5, true, || b"whole".to_vec()), None);
        p.complete(&s, &claim, copy.finish(), S).unwrap();
        assert!(matches!(p.begin(&s, 6, None, 2 * S), Begin::Replay(r) if r.body == b"whole"));
    }

    #[test]
    fn only_the_upstreams_own_answers_in_store_statuses_are_kept() {
        let p = policy(r#"{"storeStatuses":"2xx-4xx"}"#);
        assert_eq!(p.response_fate(201, Some("via_upstream")), Fate::Keep);
        assert_eq!(p.response_fate(409, Some("via_upstream")), Fate::Keep);
        assert_eq!(
            p.response_fate(201, None),
            Fate::Keep,
            "no details: trust the status"
        );
        assert!(matches!(
            p.response_fate(503, Some("via_upstream")),
            Fate::Release(_)
        ));
        for local in [
            "upstream_reset_before_response_started{connection_termination}",
            "response_timeout",
            "rate_limited",
        ] {
            assert!(
                matches!(p.response_fate(503, Some(local)), Fate::Release(_)),
                "{local}"
            );
            assert!(
                matches!(p.response_fate(200, Some(local)), Fate::Release(_)),
                "{local}"
            );
        }
    }

    #[test]
    fn a_declared_length_over_the_bound_is_refused_before_reading() {
        let p = policy(r#"{"maxBodyBytes":10}"#);
        assert!(!p.declared_too_large(Some(b"10")));
        assert!(p.declared_too_large(Some(b" 11 ")));
        assert!(!p.declared_too_large(None));
        assert!(
            !p.declared_too_large(Some(b"ten")),
            "unreadable: the streamed size decides"
        );
        assert!(!p.declared_too_large(Some(b"\xff")));
    }

    fn plan(p: &Idempotency, end: bool, length: Option<&[u8]>) -> BodyPlan {
        p.body_plan(end, length)
    }

    fn reading(b: BodyPlan) -> Box<BodyFingerprint> {
        match b {
            BodyPlan::Read(f) => f,
            _ => panic!("the body is read"),
        }
    }

    #[test]
    fn a_body_is_fingerprinted_once_whole_and_within_the_bound() {
        let p = policy(r#"{"maxBodyBytes":10}"#);
        let digest = |b: &[u8]| {
            let mut h = Sha256::new();
            h.update(b);
            h.finish()
        };
        // Envoy hands over everything buffered so far: each byte is read and hashed once.
        let body = b"0123456789";
        let mut f = reading(plan(&p, false, Some(b"10")));
        let read = |start: usize, len: usize| body[start..start + len].to_vec();
        assert_eq!(f.feed(4, false, read), Feed::More);
        assert_eq!(f.feed(4, false, |_, _| panic!("re-read")), Feed::More);
        assert_eq!(f.feed(10, true, read), Feed::Done(digest(body)));
        // No body: the same fingerprint as an empty body that streamed.
        let BodyPlan::Decide(Some(none)) = plan(&p, true, None) else {
            panic!("decided at the headers")
        };
        let mut empty = reading(plan(&p, false, None));
        assert_eq!(empty.feed(0, true, |_, _| Vec::new()), Feed::Done(none));
        // Past the bound, declared or streamed: 413 before any of it is read.
        assert!(matches!(
            plan(&p, false, Some(b"11")),
            BodyPlan::Refuse(Problem::TooLarge, _)
        ));
        let mut big = reading(plan(&p, false, None));
        assert!(matches!(
            big.feed(11, false, |_, _| panic!("read past the bound")),
            Feed::Refuse(Problem::TooLarge, _)
        ));
        // A short read fails closed.
        let mut short = reading(plan(&p, false, None));
        assert!(matches!(
            short.feed(5, true, |_, _| b"012".to_vec()),
            Feed::Refuse(Problem::Unavailable, _)
        ));
        // Trailers end it with what was read.
        let mut t = reading(plan(&p, false, None));
        assert_eq!(t.feed(3, false, |_, _| b"abc".to_vec()), Feed::More);
        assert_eq!(t.finish(), digest(b"abc"));
        // Fingerprints off: nothing is read.
        let off = policy(r#"{"fingerprint":"none"}"#);
        assert!(matches!(plan(&off, false, None), BodyPlan::Decide(None)));
    }

    #[test]
    fn a_broken_store_answers_503_and_never_forwards() {
        let (p, s) = (policy("{}"), MemoryStore::new());
        s.broken.set(true);
        let Begin::Refuse(Problem::Unavailable, detail) = p.begin(&s, 5, None, 0) else {
            panic!()
        };
        assert!(detail.contains("unavailable"), "{detail}");
        let r = Problem::Unavailable.reply("idempotency-key", &detail);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after".into(), b"1".to_vec())));
    }
}
