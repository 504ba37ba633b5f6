//! The etcd store's glue: a keyed request claims its record in etcd from its headers (one
//! transaction, paused until etcd answers), and its response is recorded before it reaches
//! the client, so a retry that lands on any proxy of the fleet finds it. The protocol and
//! every decision on an answer are in [`crate::etcd`]; this module only sends and receives.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use edge_core::problem::Reply;
use edge_core::stored::{Copied, ResponseCopy};
use edge_core::throttle::Throttle;
use edge_core::RequestView;
use edge_host::host::{
    answer, callout_response_body, callout_status, http_call, now_ns, property, random_token,
    request_body, response_body_chunk, response_status_and_headers, resume_request,
    resume_response, warn_throttled, Action, Context, Counters, HostRequest, HttpContext,
};

use crate::etcd::{
    self, claimed, on_failure, outcome, parse_lease, parse_txn, Attempts, Claimed, EtcdConfig,
    EtcdRecord, Failure, LeaseKind, Leases, StoreCounter, Txn, Unusable,
};
use crate::policy::{BodyFingerprint, BodyPlan, Counter, Fate, Feed, Idempotency, Identify};
use crate::policy::{Problem, REPLAYED_HEADER};
use crate::record::{Meta, State};

/// The largest etcd answer read (a record is at most about 1.4 MiB in base64).
const MAX_ANSWER: usize = 4 << 20;
/// Grants the root keeps track of at once (one per kind is the rule; lost ones age out).
const MAX_ROOT_GRANTS: usize = 8;

/// How the glue counts and warns: the plugin's counters, shared with the local store.
pub trait Tally {
    fn add(&self, c: Counter, n: u64);
    fn warn(&self, line: &dyn Fn() -> String);
}

/// One VM's link to etcd: its configuration, its leases, and the store's counters.
pub struct Fleet {
    pub etcd: EtcdConfig,
    leases: RefCell<Leases>,
    counters: Counters<StoreCounter>,
    throttle: Throttle,
    /// Grants sent by the root context: token, kind, sent at.
    root_grants: RefCell<Vec<(u32, LeaseKind, u64)>>,
}

fn timeout_ns(etcd: &EtcdConfig) -> u64 {
    u64::try_from(etcd.timeout.as_nanos()).unwrap_or(u64::MAX)
}

impl Fleet {
    pub fn new(etcd: EtcdConfig, in_flight_timeout_ns: u64, ttl_ns: u64) -> Fleet {
        let leases = Leases::new(in_flight_timeout_ns, ttl_ns, timeout_ns(&etcd));
        Fleet {
            etcd,
            leases: RefCell::new(leases),
            counters: Counters::define("idempotency"),
            throttle: Throttle::default(),
            root_grants: RefCell::new(Vec::new()),
        }
    }

    /// How often the root ticks: twice per lease interval at least.
    pub fn tick_ms(&self) -> u32 {
        let ms = self.leases.borrow().interval_ns() / 2 / 1_000_000;
        u32::try_from(ms.min(1000)).unwrap_or(1000)
    }

    fn count(&self, c: StoreCounter) {
        self.counters.add(c, 1);
    }

    fn warn(&self, line: impl FnOnce() -> String) {
        warn_throttled(&self.throttle, line);
    }

    /// Sends one request to etcd: the callout's token.
    fn send(&self, path: &str, body: &str) -> Result<u32, Failure> {
        http_call(
            &self.etcd.cluster,
            vec![
                (":method", "POST"),
                (":path", path),
                (":authority", &self.etcd.cluster),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
            self.etcd.timeout,
        )
        .map_err(|_| {
            Failure::Error(format!(
                "the host refused a callout to cluster {}: is it defined?",
                self.etcd.cluster
            ))
        })
    }

    fn grant(&self, kind: LeaseKind) -> Result<u32, Failure> {
        let ttl = self.leases.borrow().ttl_secs(kind);
        self.send("/v3/lease/grant", &etcd::lease_grant(ttl))
    }

    /// The answer to this context's callout, as etcd's body or why there is none.
    fn read_answer(&self, body_size: usize) -> Result<Vec<u8>, Failure> {
        if body_size > MAX_ANSWER {
            return Err(Failure::Error(format!("an answer of {body_size} bytes")));
        }
        let status = callout_status();
        let body = callout_response_body(body_size);
        outcome(status, &body).map(<[u8]>::to_vec)
    }

    fn failed(&self, f: &Failure) {
        self.count(f.counter());
    }

    fn lease_answer(&self, kind: LeaseKind, sent_at: u64, body_size: usize) -> Result<(), Failure> {
        let got = self
            .read_answer(body_size)
            .and_then(|b| parse_lease(&b).map_err(Failure::from));
        match got {
            Ok((id, ttl)) => {
                self.leases.borrow_mut().granted(kind, id, ttl, sent_at);
                self.count(StoreCounter::Leases);
                Ok(())
            }
            Err(f) => {
                self.leases.borrow_mut().grant_failed(kind);
                Err(f)
            }
        }
    }

    /// The root's tick: renews the leases in use before they stop being usable.
    pub fn tick(&self) {
        let now = now_ns();
        for kind in [LeaseKind::Claim, LeaseKind::Done] {
            if !self.leases.borrow_mut().renew(kind, now) {
                continue;
            }
            match self.grant(kind) {
                Ok(token) => {
                    let mut g = self.root_grants.borrow_mut();
                    if g.len() >= MAX_ROOT_GRANTS {
                        g.remove(0);
                    }
                    g.push((token, kind, now));
                }
                Err(f) => {
                    self.leases.borrow_mut().grant_failed(kind);
                    self.warn(|| {
                        format!(
                            "idempotency: cannot renew a lease: {}",
                            f.describe(self.etcd.timeout, 1)
                        )
                    });
                }
            }
        }
    }

    /// An answer to the root's callout `token`.
    pub fn root_answer(&self, token: u32, body_size: usize) {
        let found = {
            let mut g = self.root_grants.borrow_mut();
            let at = g.iter().position(|(t, _, _)| *t == token);
            at.map(|i| g.remove(i))
        };
        if let Some((_, kind, sent_at)) = found {
            if let Err(f) = self.lease_answer(kind, sent_at, body_size) {
                self.failed(&f);
                self.warn(|| {
                    format!(
                        "idempotency: etcd did not grant a lease: {}",
                        f.describe(self.etcd.timeout, 1)
                    )
                });
            }
        }
    }
}

/// What a callout on its way is for.
enum Op {
    /// A lease, then `then`.
    Grant {
        kind: LeaseKind,
        sent_at: u64,
        then: Next,
    },
    Claim {
        lease: i64,
    },
    Complete {
        lease: i64,
    },
    Release,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    Claim,
    Complete,
    Release,
}

#[derive(PartialEq, Eq)]
enum Stage {
    /// Not ours, or answered.
    Idle,
    /// Waiting for etcd with the request's headers held.
    Claiming,
    /// Reading the body (for the fingerprint) before forwarding or answering.
    Reading,
    /// Forwarded under our claim; the response has not begun.
    Forwarded,
    /// Copying the response as it streams.
    Copying,
    /// Recording the response (or releasing the key) with the response held.
    Recording,
    /// Forwarded without a record (`failureMode: "open"`), or finished.
    Done,
}

/// A keyed request with the etcd store.
pub struct EtcdStream {
    policy: Rc<Idempotency>,
    fleet: Rc<Fleet>,
    tally: Rc<dyn Tally>,
    stage: Stage,
    key: String,
    owner: [u8; 16],
    fingerprint: Option<[u8; 32]>,
    body: Option<Box<BodyFingerprint>>,
    /// Our claim's revision, once we hold the key.
    revision: Option<i64>,
    /// Someone else's completed record, to compare with the body once it is read.
    theirs: Option<Txn>,
    copy: Option<ResponseCopy>,
    /// The record being written (kept to send again).
    record: Option<EtcdRecord>,
    attempts: Attempts,
    /// Leases this phase has granted itself: an answer that leaves no usable lease (a TTL
    /// shorter than asked, a late answer) must not make every send grant again, unbounded.
    grants: u8,
    pending: Option<(u32, Op)>,
}

/// Grants one phase of a request (claim, completion) may send before it fails.
const MAX_GRANTS: u8 = 2;

impl EtcdStream {
    pub fn new(policy: Rc<Idempotency>, fleet: Rc<Fleet>, tally: Rc<dyn Tally>) -> EtcdStream {
        let retries = fleet.etcd.retries;
        EtcdStream {
            policy,
            fleet,
            tally,
            stage: Stage::Idle,
            key: String::new(),
            owner: [0; 16],
            fingerprint: None,
            body: None,
            revision: None,
            theirs: None,
            copy: None,
            record: None,
            attempts: Attempts::new(retries),
            grants: 0,
            pending: None,
        }
    }

    fn reply(&mut self, r: &Reply) -> Action {
        self.stage = Stage::Done;
        answer("idempotency", r, Action::Pause)
    }

    fn refuse(&mut self, problem: Problem, detail: &str) -> Action {
        self.tally.add(problem.counter(), 1);
        if problem == Problem::Unavailable {
            self.tally.warn(&|| format!("idempotency: 503: {detail}"));
        }
        // A key we hold goes back: nothing ran.
        if self.revision.is_some() {
            let _ = self.send(Next::Release);
            self.pending = None;
        }
        let r = problem.reply(&self.policy.config.header, detail);
        self.reply(&r)
    }

    /// Sends `next`, first granting the lease it needs when none is at hand.
    fn send(&mut self, next: Next) -> Result<(), Failure> {
        let now = now_ns();
        let kind = match next {
            Next::Claim => Some(LeaseKind::Claim),
            Next::Complete => Some(LeaseKind::Done),
            Next::Release => None,
        };
        let lease = kind.map(|k| (k, self.fleet.leases.borrow_mut().take(k, now)));
        let sent = match lease {
            Some((_, None)) if self.grants >= MAX_GRANTS => {
                return Err(Failure::Error(
                    "etcd granted leases this request could not use".into(),
                ))
            }
            Some((kind, None)) => self.fleet.grant(kind).map(|t| {
                self.grants += 1;
                (
                    t,
                    Op::Grant {
                        kind,
                        sent_at: now,
                        then: next,
                    },
                )
            }),
            Some((_, Some(lease))) if next == Next::Claim => {
                let record = EtcdRecord {
                    owner: self.owner,
                    meta: Meta {
                        state: State::InFlight,
                        fingerprint: self.fingerprint,
                    },
                    response: None,
                };
                self.fleet
                    .send("/v3/kv/txn", &etcd::claim(&self.key, &record, lease))
                    .map(|t| (t, Op::Claim { lease }))
            }
            Some((_, Some(lease))) => {
                let (Some(record), Some(rev)) = (&self.record, self.revision) else {
                    return Err(Failure::Error("nothing to record".into()));
                };
                self.fleet
                    .send("/v3/kv/txn", &etcd::complete(&self.key, record, rev, lease))
                    .map(|t| (t, Op::Complete { lease }))
            }
            None => {
                let Some(rev) = self.revision else {
                    return Err(Failure::Error("no claim to release".into()));
                };
                self.fleet
                    .send("/v3/kv/txn", &etcd::release(&self.key, rev))
                    .map(|t| (t, Op::Release))
            }
        }?;
        self.pending = Some(sent);
        Ok(())
    }

    /// Sends `next` and holds the stream, or applies the failure at once.
    fn start(&mut self, next: Next) -> Action {
        match self.send(next) {
            Ok(()) => Action::Pause,
            Err(f) => {
                self.fleet.failed(&f);
                self.give_up(f, next, false)
            }
        }
    }

    /// After a failed request to etcd: sends it again while attempts remain, else applies
    /// the failure (the claim's failure mode; a record or release not written is left to
    /// the claim's lease). `held`: the stream waits for us (resume it when going on).
    fn failed(&mut self, f: Failure, next: Next) {
        self.fleet.failed(&f);
        if self.attempts.again(&f) {
            self.fleet.count(StoreCounter::Retries);
            match self.send(next) {
                Ok(()) => return,
                Err(e) => {
                    self.fleet.failed(&e);
                    let _ = self.give_up(e, next, true);
                    return;
                }
            }
        }
        let _ = self.give_up(f, next, true);
    }

    /// A failure of a request attached to `lease`: a lease etcd no longer knows (restored,
    /// or expired early) is not attached again, so the retry grants a new one.
    fn lease_failed(&mut self, f: Failure, lease: i64, next: Next) {
        if f == Failure::LeaseGone {
            self.fleet.leases.borrow_mut().forget(lease);
        }
        self.failed(f, next);
    }

    fn give_up(&mut self, f: Failure, next: Next, held: bool) -> Action {
        let why = f.describe(self.fleet.etcd.timeout, self.attempts.made);
        match next {
            Next::Claim => match on_failure(self.fleet.etcd.failure_mode) {
                Unusable::Refuse => self.refuse(Problem::Unavailable, &why),
                Unusable::ForwardUnguarded => {
                    self.fleet.count(StoreCounter::Unguarded);
                    self.fleet.warn(|| {
                        format!("idempotency: forwarded without a record (failureMode open): {why}")
                    });
                    self.stage = Stage::Done;
                    self.go_on_request(held)
                }
            },
            Next::Complete => {
                // The application ran: the key stays claimed until its lease ends.
                self.tally.add(Counter::Unrecorded, 1);
                self.tally.warn(&|| {
                    format!("idempotency: cannot record a completed request, its key stays claimed: {why}")
                });
                self.stage = Stage::Done;
                self.go_on_response(held)
            }
            Next::Release => {
                self.tally.warn(&|| {
                    format!("idempotency: cannot release a key, it stays claimed until its lease ends: {why}")
                });
                self.stage = Stage::Done;
                self.go_on_response(held)
            }
        }
    }

    fn go_on_request(&mut self, held: bool) -> Action {
        if held && !resume_request() {
            log::warn!("idempotency: the host refused to resume a request");
        }
        Action::Continue
    }

    fn go_on_response(&mut self, held: bool) -> Action {
        if held && !resume_response() {
            log::warn!("idempotency: the host refused to resume a response");
        }
        Action::Continue
    }

    /// The claim's answer.
    fn on_claim(&mut self, txn: Txn) {
        let known = self.body.is_none();
        let fp = if known { self.fingerprint } else { None };
        match claimed(txn.clone(), &self.owner, fp.as_ref()) {
            Claimed::Proceed { revision } => {
                self.revision = Some(revision);
                if self.body.is_some() {
                    self.stage = Stage::Reading;
                } else {
                    self.forwarded();
                }
                let _ = self.go_on_request(true);
            }
            Claimed::InFlight => {
                let _ = self.refuse(
                    Problem::InFlight,
                    "the first request with this key has not completed yet; retry later",
                );
            }
            Claimed::Retry => {
                self.failed(Failure::Error("the record vanished".into()), Next::Claim)
            }
            Claimed::Foreign => {
                let _ = self.refuse(
                    Problem::Unavailable,
                    "the key in etcd holds a value that is not an idempotency record",
                );
            }
            _ if !known => {
                // A completed record: compare once the body is read.
                self.theirs = Some(txn);
                self.stage = Stage::Reading;
                let _ = self.go_on_request(true);
            }
            done => {
                let _ = self.answer_done(done);
            }
        }
    }

    /// Answers a duplicate of a completed request.
    fn answer_done(&mut self, c: Claimed) -> Action {
        match c {
            Claimed::Replay(r) => {
                self.tally.add(Counter::Replayed, 1);
                let reply = r.into_reply(vec![(REPLAYED_HEADER, b"true".to_vec())]);
                self.reply(&reply)
            }
            Claimed::Mismatch => self.refuse(
                Problem::Mismatch,
                "this key was used for a request with a different body",
            ),
            _ => self.refuse(
                Problem::Unreplayable,
                "the response was too large to keep; use a new key to repeat the request",
            ),
        }
    }

    fn forwarded(&mut self) {
        self.tally.add(Counter::Forwarded, 1);
        self.stage = Stage::Forwarded;
    }

    /// The body is read: forward under our claim, or answer from their record.
    fn body_read(&mut self, fp: [u8; 32]) -> Action {
        self.fingerprint = Some(fp);
        self.body = None;
        match self.theirs.take() {
            Some(txn) => {
                let c = claimed(txn, &self.owner, Some(&fp));
                self.answer_done(c)
            }
            None => {
                self.forwarded();
                Action::Continue
            }
        }
    }

    /// The response has ended (or was cut short): record it, holding the response.
    fn record(&mut self, copied: Copied) -> Result<(), Failure> {
        let mut response = match copied {
            Copied::Whole(r)
                if u64::try_from(r.body.len()).is_ok_and(|n| n <= etcd::MAX_KEPT_BODY) =>
            {
                Some(r)
            }
            _ => None,
        };
        if let Some(r) = &mut response {
            r.stored_at_ns = now_ns();
        }
        self.record = Some(EtcdRecord {
            owner: self.owner,
            meta: Meta {
                state: if response.is_some() {
                    State::Done
                } else {
                    State::DoneWithoutResponse
                },
                fingerprint: self.fingerprint,
            },
            response,
        });
        self.attempts = Attempts::new(self.fleet.etcd.retries);
        self.grants = 0;
        self.stage = Stage::Recording;
        self.send(Next::Complete)
    }

    fn finish_response(&mut self) -> Action {
        let Some(copy) = self.copy.take() else {
            return Action::Continue;
        };
        match self.record(copy.finish()) {
            Ok(()) => Action::Pause,
            Err(f) => {
                self.fleet.failed(&f);
                self.give_up(f, Next::Complete, false)
            }
        }
    }

    fn on_complete(&mut self, txn: Txn) {
        let without = self.record.as_ref().is_some_and(|r| r.response.is_none());
        let ours = match txn {
            Txn::Succeeded { .. } => true,
            // A lost reply sent again finds our own completed record.
            Txn::Failed {
                record: Some(r), ..
            } => r.owner == self.owner && r.meta.state != State::InFlight,
            Txn::Failed { .. } => false,
        };
        if ours {
            self.tally.add(Counter::Stored, 1);
            if without {
                self.tally.warn(&|| {
                    "idempotency: a response could not be kept whole (maxBodyBytes, at most 1 MiB \
                     with etcd, or the stream was cut short); duplicates of its key get 409"
                        .into()
                });
            }
        } else {
            self.tally.add(Counter::Lost, 1);
            self.tally.warn(&|| {
                "idempotency: a request outlived inFlightTimeout and its key was taken by a retry"
                    .into()
            });
        }
        self.stage = Stage::Done;
        let _ = self.go_on_response(true);
    }

    fn on_release(&mut self, txn: Txn) {
        match txn {
            Txn::Succeeded { .. } => self.tally.add(Counter::Released, 1),
            Txn::Failed { exists: false, .. } => self.tally.add(Counter::Released, 1),
            Txn::Failed { .. } => self.tally.add(Counter::Lost, 1),
        }
        self.stage = Stage::Done;
        let _ = self.go_on_response(true);
    }
}

impl Context for EtcdStream {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some((t, op)) = self.pending.take() else {
            return;
        };
        if t != token {
            self.pending = Some((t, op));
            return;
        }
        let answer = self.fleet.read_answer(body_size);
        let txn =
            |a: Result<Vec<u8>, Failure>| a.and_then(|b| parse_txn(&b).map_err(Failure::from));
        match op {
            Op::Grant {
                kind,
                sent_at,
                then,
            } => match self.fleet.lease_answer(kind, sent_at, body_size) {
                Ok(()) => match self.send(then) {
                    Ok(()) => {}
                    Err(f) => self.failed(f, then),
                },
                Err(f) => self.failed(f, then),
            },
            Op::Claim { lease } => match txn(answer) {
                Ok(t) => self.on_claim(t),
                Err(f) => self.lease_failed(f, lease, Next::Claim),
            },
            Op::Complete { lease } => match txn(answer) {
                Ok(t) => self.on_complete(t),
                Err(f) => self.lease_failed(f, lease, Next::Complete),
            },
            Op::Release => match txn(answer) {
                Ok(t) => self.on_release(t),
                Err(f) => self.failed(f, Next::Release),
            },
        }
    }
}

impl HttpContext for EtcdStream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        // The key, method, path and more: one read of the request's headers.
        let _once = edge_host::host::read_request_once();
        let hash = match self.policy.identify(&HostRequest) {
            Identify::Skip => return Action::Continue,
            Identify::Refuse(problem, detail) => return self.refuse(problem, &detail),
            Identify::Key(k) => k,
        };
        match self.policy.body_plan(
            end_of_stream,
            HostRequest.header("content-length").as_deref(),
        ) {
            BodyPlan::Refuse(problem, detail) => return self.refuse(problem, &detail),
            BodyPlan::Decide(fp) => self.fingerprint = fp,
            BodyPlan::Read(body) => self.body = Some(body),
        }
        self.key = etcd::record_key(&self.fleet.etcd.prefix, hash);
        self.owner = random_token();
        self.stage = Stage::Claiming;
        self.start(Next::Claim)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.stage != Stage::Reading {
            return Action::Continue;
        }
        let Some(body) = self.body.as_mut() else {
            return Action::Continue;
        };
        match body.feed(body_size, end_of_stream, request_body) {
            Feed::More => Action::Pause,
            Feed::Done(fp) => self.body_read(fp),
            Feed::Refuse(problem, detail) => self.refuse(problem, &detail),
        }
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        if self.stage != Stage::Reading {
            return Action::Continue;
        }
        match self.body.take() {
            Some(body) => self.body_read(body.finish()),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.stage != Stage::Forwarded {
            return Action::Continue;
        }
        let (status, headers) = response_status_and_headers();
        let status = status.unwrap_or(0);
        let details = property(&["response", "code_details"]);
        if let Fate::Release(why) = self.policy.response_fate(status, details.as_deref()) {
            log::debug!("idempotency: key released: {why}");
            self.attempts = Attempts::new(self.fleet.etcd.retries);
            self.grants = 0;
            self.stage = Stage::Recording;
            return self.start(Next::Release);
        }
        let mut copy = self.policy.copy(status, headers);
        if end_of_stream {
            copy.end();
        }
        self.copy = Some(copy);
        self.stage = Stage::Copying;
        if end_of_stream {
            return self.finish_response();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.stage != Stage::Copying {
            return Action::Continue;
        }
        if let Some(copy) = self.copy.as_mut() {
            let _ = copy.body(body_size, end_of_stream, || response_body_chunk(body_size));
        }
        if end_of_stream {
            return self.finish_response();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if self.stage != Stage::Copying {
            return Action::Continue;
        }
        if let Some(copy) = self.copy.as_mut() {
            copy.end();
        }
        self.finish_response()
    }

    fn on_log(&mut self) {
        // The stream ends with our claim unsettled; what is sent now is not waited for (its
        // answer reaches no one), and the claim's lease covers a lost one.
        match self.stage {
            Stage::Reading if self.revision.is_some() => {
                let _ = self.send(Next::Release);
            }
            Stage::Forwarded | Stage::Copying => {
                let started = self.stage == Stage::Copying;
                match self.policy.cut_short(started) {
                    Fate::Keep => {
                        let _ = self.record(Copied::CutShort);
                    }
                    Fate::Release(_) => {
                        let _ = self.send(Next::Release);
                    }
                }
            }
            _ => {}
        }
        self.stage = Stage::Done;
    }
}
