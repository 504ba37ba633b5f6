//! The rate-limit decision: which rules apply, whose bucket is empty, what the client and the
//! upstream are told. Pure: requests come in as a [`RequestView`], state as a [`SlotStore`].
//!
//! # State layout
//! Each rule owns `maxKeys` slots in the store, in sets of [`WAYS`](edge_core::table::WAYS)
//! (`<ns><rule>/s<n>`, one value per set, laid out as the record table's sets), created on
//! first use and never more. A key hashes to one set and may live in any of its slots, so one
//! read finds its bucket or a free slot and one compare-and-swap takes the token: two workers
//! claiming a new key race for the same value, and the loser reads again and finds the
//! winner's bucket.
//! A slot holds the key's 64-bit hash and its bucket; it is given to another key only when it
//! is empty or its bucket is full again (so taking it over forgets nothing: no client escapes
//! its limit by making others evict it). When every slot of the set holds an active bucket of
//! another key, the request is charged to the rule's one overflow bucket, which has the rule's
//! limit: a flood of new keys shares one bucket instead of each getting a fresh one.
//! Every write is a compare-and-swap of the version read, retried a bounded number of times,
//! so two workers can never both take a bucket's last token.

use crate::bucket::{ceil_secs, Bucket, Limit, Take};
use crate::config::{Config, FailureMode, Mode, Rule};
use crate::global::{self, Answer, Denied, Failure, Quota};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use edge_core::headers::HeaderEdits;
use edge_core::key::{key_hash, KeyHasher};
use edge_core::metrics::Counter;
use edge_core::problem::{json_string_list, problem_json, retry_after, retry_after_secs, Reply};
use edge_core::store::{contended, get_or_create, update, Write};
use edge_core::table::{set_count, set_ways};
use edge_core::text;
use edge_core::{RequestView, SlotStore, StoreError};

/// Read-modify-write attempts before the store counts as failing.
pub const ATTEMPTS: u32 = 16;
/// The key hash of the overflow bucket's slot.
const OVERFLOW: u64 = u64::MAX;

pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// What happened for one matched rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Limited,
    ShadowLimited,
    /// The store failed; `failureMode` decided.
    StoreError,
}

/// Each outcome is a counter of its rule's, `rate_limit.<rule>.<outcome>`.
impl Counter for Outcome {
    const ALL: &'static [Outcome] = &[
        Outcome::Allowed,
        Outcome::Limited,
        Outcome::ShadowLimited,
        Outcome::StoreError,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Limited => "limited",
            Outcome::ShadowLimited => "shadow_limited",
            Outcome::StoreError => "store_errors",
        }
    }
}

/// The marker shadow mode sends upstream; only this plugin may set it.
pub const SHADOW_HEADER: &str = "x-ratelimit-shadow";

/// One matched rule's result, for metrics and the decision log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleResult {
    pub rule: usize,
    pub outcome: Outcome,
    pub key: u64,
    pub remaining: u64,
    pub overflow: bool,
}

/// What the filter does with the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward it with these edits of the request, and of the response when it comes.
    Continue {
        upstream: HeaderEdits,
        response: HeaderEdits,
    },
    /// Answer locally.
    Reply(Reply),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub results: Vec<RuleResult>,
    pub action: Action,
    /// Store failures (each naming its rule), for the warning log; `failureMode` decided.
    pub errors: Vec<StoreError>,
    /// Rules with a `global` part that this proxy allowed: the rate limit service decides
    /// next, and [`Limiter::settle`] turns its answers into the action. `None`: `action` is
    /// final.
    pub pending: Option<Pending>,
}

/// One question for the rate limit service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalCheck {
    pub rule: usize,
    /// The client's key hash, which the per-VM deny cache remembers.
    pub key: u64,
    /// The `RateLimitRequest`, encoded.
    pub message: Vec<u8>,
}

/// A request waiting for the service: its questions and what [`Limiter::settle`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub checks: Vec<GlobalCheck>,
    taken: Vec<(usize, Taken)>,
    upstream: HeaderEdits,
}

/// What the service (or the deny cache) answered one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalAnswer {
    Service(Answer),
    /// The deny cache still holds this client: no call was made.
    Cached(Denied),
    Failed(Failure),
}

/// Each rule with a `global` part counts, under `rate_limit.<rule>.`: calls answered, calls
/// that limited, failures and timeouts, and requests the deny cache answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalOutcome {
    Checked,
    OverLimit,
    Errors,
    Timeouts,
    DenyCacheHits,
}

impl Counter for GlobalOutcome {
    const ALL: &'static [GlobalOutcome] = &[
        GlobalOutcome::Checked,
        GlobalOutcome::OverLimit,
        GlobalOutcome::Errors,
        GlobalOutcome::Timeouts,
        GlobalOutcome::DenyCacheHits,
    ];

    fn name(self) -> &'static str {
        match self {
            GlobalOutcome::Checked => "global_checked",
            GlobalOutcome::OverLimit => "global_over_limit",
            GlobalOutcome::Errors => "global_errors",
            GlobalOutcome::Timeouts => "global_timeouts",
            GlobalOutcome::DenyCacheHits => "deny_cache_hits",
        }
    }
}

/// What one check of a pending request needs (see [`Limiter::plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask<'a> {
    Known(GlobalAnswer),
    Call {
        cluster: &'a str,
        timeout_ms: u32,
        message: &'a [u8],
    },
}

/// The service's answers turned into the request's fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub action: Action,
    /// Per check, in order: what it counts as.
    pub outcomes: Vec<(usize, GlobalOutcome)>,
    /// Clients the service limited, for the deny cache: (rule, key, denial).
    pub remember: Vec<(usize, u64, Denied)>,
}

/// The compiled limiter: a config plus the namespace of its keys in the store.
pub struct Limiter {
    pub config: Config,
    seed: u64,
    /// Per rule, computed once: the limit's fingerprint, the prefix of its slot keys
    /// (`<ns><rule>/`) and its `RateLimit-Policy` item.
    fingerprints: Vec<u64>,
    prefixes: Vec<String>,
    policies: Vec<String>,
}

/// A slot's bytes: key hash, limit fingerprint, level, timestamp (40 bytes, little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    key: u64,
    limit: u64,
    bucket: Bucket,
}

const SLOT_LEN: usize = 40;

impl Slot {
    fn encode(&self) -> [u8; SLOT_LEN] {
        let mut out = [0u8; SLOT_LEN];
        let parts = [
            &self.key.to_le_bytes()[..],
            &self.limit.to_le_bytes()[..],
            &self.bucket.level.to_le_bytes()[..],
            &self.bucket.at_ns.to_le_bytes()[..],
        ];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = out.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        out
    }

    /// Anything that is not a slot reads as an empty one.
    fn decode(bytes: &[u8]) -> Slot {
        fn le<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
            b.get(at..at + N)?.try_into().ok()
        }
        (|| {
            if bytes.len() != SLOT_LEN {
                return None;
            }
            Some(Slot {
                key: u64::from_le_bytes(le(bytes, 0)?),
                limit: u64::from_le_bytes(le(bytes, 8)?),
                bucket: Bucket {
                    level: u128::from_le_bytes(le(bytes, 16)?),
                    at_ns: u64::from_le_bytes(le(bytes, 32)?),
                },
            })
        })()
        .unwrap_or_default()
    }
}

/// A set's slots as stored, one after another; a missing or unreadable slot is empty.
fn decode_set(bytes: &[u8], ways: usize) -> Vec<Slot> {
    let mut out: Vec<Slot> = bytes
        .chunks(SLOT_LEN)
        .take(ways)
        .map(Slot::decode)
        .collect();
    out.resize(ways, Slot::default());
    out
}

fn encode_set(slots: &[Slot]) -> Vec<u8> {
    slots.iter().flat_map(|s| s.encode()).collect()
}

/// A limit's identity: a slot written under another limit (before a config change) is not
/// this limit's bucket and reads as fresh.
fn fingerprint(l: &Limit) -> u64 {
    KeyHasher::new(0, "rate_limit/limit")
        .number(l.requests)
        .number(l.window_ns)
        .number(l.burst)
        .finish()
}

/// The bucket a request is charged to: rule `index` (`rule`, whose limit has fingerprint
/// `fp`) for the client key `key`.
#[derive(Clone, Copy)]
struct Target<'r> {
    index: usize,
    rule: &'r Rule,
    fp: u64,
    key: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Taken {
    take: Take,
    slot_key: String,
    overflow: bool,
    key: u64,
    fp: u64,
}

impl Limiter {
    /// `namespace` prefixes every store key (the store is shared by every plugin of the VM);
    /// `seed` keys the hash of client keys (shared by all workers, see
    /// `edge_core::key::shared_seed`).
    pub fn new(config: Config, namespace: &str, seed: u64) -> Self {
        Limiter {
            fingerprints: config.rules.iter().map(|r| fingerprint(&r.limit)).collect(),
            prefixes: config
                .rules
                .iter()
                .map(|r| format!("{namespace}{}/", r.name))
                .collect(),
            policies: config
                .rules
                .iter()
                .map(|r| format!("\"{}\";q={};w={}", r.name, r.limit.requests, r.window_secs))
                .collect(),
            config,
            seed,
        }
    }

    /// The prefix of each rule's set of [`Outcome`] counters, `rate_limit.<rule>`, in rule
    /// order (a result's `rule` is its set).
    pub fn counter_sets(config: &Config) -> Vec<String> {
        config
            .rules
            .iter()
            .map(|r| format!("rate_limit.{}", r.name))
            .collect()
    }

    /// The prefixes of the [`GlobalOutcome`] counter sets: one per rule, in rule order (rules
    /// without a `global` part define theirs too, so a check's `rule` is its set; they stay 0).
    pub fn global_counter_sets(config: &Config) -> Vec<String> {
        if config.rules.iter().all(|r| r.global.is_none()) {
            return Vec::new();
        }
        Self::counter_sets(config)
    }

    /// Decides on one request at `now_ns` (wall clock, nanoseconds).
    pub fn check(&self, req: &impl RequestView, now_ns: u64, store: &impl SlotStore) -> Decision {
        let rules = self.config.rules.len();
        let mut results = Vec::with_capacity(rules);
        let mut errors = Vec::new();
        let mut taken: Vec<(usize, Taken)> = Vec::with_capacity(rules);
        for (i, rule) in self.config.rules.iter().enumerate() {
            if !rule.route.matches(req) {
                continue;
            }
            let key = key_hash(self.seed, &rule.name, &rule.key, req);
            let fp = self.fingerprints.get(i).copied().unwrap_or(1);
            let target = Target {
                index: i,
                rule,
                fp,
                key,
            };
            match self.take(&target, now_ns, store) {
                Ok(t) => {
                    let outcome = match (t.take.allowed, self.config.mode) {
                        (true, _) => Outcome::Allowed,
                        (false, Mode::Enforce) => Outcome::Limited,
                        (false, Mode::Shadow) => Outcome::ShadowLimited,
                    };
                    results.push(RuleResult {
                        rule: i,
                        outcome,
                        key,
                        remaining: t.take.remaining,
                        overflow: t.overflow,
                    });
                    taken.push((i, t));
                }
                Err(e) => {
                    errors.push(StoreError(format!("rule {}: {e}", rule.name)));
                    results.push(RuleResult {
                        rule: i,
                        outcome: Outcome::StoreError,
                        key,
                        remaining: 0,
                        overflow: false,
                    });
                }
            }
        }
        let limited = results.iter().any(|r| r.outcome == Outcome::Limited);
        let deny_on_error = self.config.mode == Mode::Enforce
            && self.config.failure_mode == FailureMode::Deny
            && !errors.is_empty();

        if limited || deny_on_error {
            // The request is not served: the tokens it took from other rules go back.
            for (i, t) in taken.iter_mut().filter(|(_, t)| t.take.allowed) {
                let Some(rule) = self.config.rules.get(*i) else {
                    continue;
                };
                if let Ok(Some(b)) = self.give_back(rule, t, now_ns, store) {
                    t.take = rule.limit.describe(true, b);
                }
            }
        }
        let action = if limited {
            self.reject(&taken)
        } else if deny_on_error {
            Action::Reply(Reply::problem(
                503,
                Vec::new(),
                problem_json(
                    "about:blank",
                    "Service Unavailable",
                    503,
                    "rate limit state is unavailable",
                    &[],
                ),
            ))
        } else {
            let shadow: Vec<&str> = results
                .iter()
                .filter(|r| r.outcome == Outcome::ShadowLimited)
                .filter_map(|r| self.config.rules.get(r.rule).map(|x| x.name.as_str()))
                .collect();
            Action::Continue {
                upstream: HeaderEdits {
                    // In shadow mode a client-sent marker is always dropped: it could fake a
                    // verdict.
                    remove: if self.config.mode == Mode::Shadow {
                        vec![SHADOW_HEADER.into()]
                    } else {
                        Vec::new()
                    },
                    set: if shadow.is_empty() {
                        Vec::new()
                    } else {
                        vec![(SHADOW_HEADER.into(), shadow.join(", "))]
                    },
                },
                response: HeaderEdits {
                    remove: Vec::new(),
                    set: if self.config.response_headers && self.config.mode == Mode::Enforce {
                        self.quota_headers(&taken)
                    } else {
                        Vec::new()
                    },
                },
            }
        };
        let checks: Vec<GlobalCheck> = match &action {
            Action::Continue { .. } => results
                .iter()
                .filter(|r| r.outcome == Outcome::Allowed)
                .filter_map(|r| {
                    let rule = self.config.rules.get(r.rule)?;
                    let g = rule.global.as_ref()?;
                    Some(GlobalCheck {
                        rule: r.rule,
                        key: r.key,
                        message: global::request(&g.domain, &rule.name, &rule.key, req),
                    })
                })
                .collect(),
            Action::Reply(_) => Vec::new(),
        };
        let pending = match (&action, checks.is_empty()) {
            (Action::Continue { upstream, .. }, false) => Some(Pending {
                checks,
                upstream: upstream.clone(),
                taken,
            }),
            _ => None,
        };
        Decision {
            results,
            action,
            errors,
            pending,
        }
    }

    /// What each of a pending request's checks needs, in order: an answer already known (a
    /// client the deny cache still holds: no call) or a call to the rule's service. A check
    /// whose rule has no `global` part cannot be asked and is a failure, so no check is ever
    /// left without an answer (the request would wait forever).
    pub fn plan<'a>(
        &'a self,
        pending: &'a Pending,
        denied: &mut [global::DenyCache],
        now_ns: u64,
    ) -> Vec<Ask<'a>> {
        pending
            .checks
            .iter()
            .map(|check| {
                let Some(g) = self
                    .config
                    .rules
                    .get(check.rule)
                    .and_then(|r| r.global.as_ref())
                else {
                    return Ask::Known(GlobalAnswer::Failed(Failure::Error));
                };
                match denied
                    .get_mut(check.rule)
                    .and_then(|c| c.get(check.key, now_ns))
                {
                    Some(d) => Ask::Known(GlobalAnswer::Cached(d)),
                    None => Ask::Call {
                        cluster: &g.cluster,
                        timeout_ms: g.timeout_ms,
                        message: &check.message,
                    },
                }
            })
            .collect()
    }

    /// Decides a request the service was asked about, from its answers (one per check, in
    /// order) at `now_ns`. Over the limit anywhere: the 429 with the service's quota when it
    /// sent one. A failed call: the rule's `failureMode` (`local`: this proxy's bucket, which
    /// allowed it; `open`: allowed, and its local token given back so the outage limits
    /// nothing; `closed`: 503).
    pub fn settle(
        &self,
        pending: Pending,
        answers: &[GlobalAnswer],
        now_ns: u64,
        store: &impl SlotStore,
    ) -> Settled {
        let Pending {
            checks,
            mut taken,
            upstream,
        } = pending;
        let mut outcomes = Vec::with_capacity(checks.len());
        let mut remember = Vec::new();
        let mut policies: Vec<(usize, String)> = Vec::new();
        let mut limited = false;
        let mut shadow: Vec<String> = Vec::new();
        let mut closed = false;
        for (check, answer) in checks.iter().zip(answers) {
            let Some(rule) = self.config.rules.get(check.rule) else {
                continue;
            };
            let Some(g) = rule.global.as_ref() else {
                continue;
            };
            let show = |taken: &mut Vec<(usize, Taken)>, allowed: bool, q: Option<Quota>| {
                let t = taken.iter_mut().find(|(i, _)| *i == check.rule)?;
                let reset_ns = q.map_or(rule.window_secs, |q| q.reset_secs) * 1_000_000_000;
                t.1.take.allowed = allowed;
                if let Some(q) = q {
                    t.1.take.remaining = u64::from(q.remaining);
                }
                t.1.take.retry_after_ns = if allowed && t.1.take.remaining > 0 {
                    0
                } else {
                    reset_ns
                };
                t.1.take.full_in_ns = reset_ns;
                q.map(|q| {
                    let w = q.window_secs.unwrap_or(rule.window_secs);
                    format!("\"{}\";q={};w={w}", rule.name, q.limit)
                })
            };
            let outcome = match *answer {
                GlobalAnswer::Service(Answer::Allowed(q)) => {
                    if q.is_some() {
                        policies.extend(show(&mut taken, true, q).map(|p| (check.rule, p)));
                    }
                    GlobalOutcome::Checked
                }
                GlobalAnswer::Service(Answer::Limited(q)) => {
                    let reset = q.map_or(rule.window_secs, |q| q.reset_secs.max(1));
                    remember.push((
                        check.rule,
                        check.key,
                        Denied {
                            until_ns: now_ns.saturating_add(reset.saturating_mul(1_000_000_000)),
                            quota: q,
                        },
                    ));
                    if self.config.mode == Mode::Shadow {
                        shadow.push(rule.name.clone());
                    } else {
                        limited = true;
                        policies.extend(show(&mut taken, false, q).map(|p| (check.rule, p)));
                    }
                    GlobalOutcome::OverLimit
                }
                GlobalAnswer::Cached(denied) => {
                    let left = denied
                        .until_ns
                        .saturating_sub(now_ns)
                        .div_ceil(1_000_000_000);
                    let q = denied.quota.map(|q| Quota {
                        remaining: 0,
                        reset_secs: left.max(1),
                        ..q
                    });
                    if self.config.mode == Mode::Shadow {
                        shadow.push(rule.name.clone());
                    } else {
                        limited = true;
                        policies.extend(show(&mut taken, false, q).map(|p| (check.rule, p)));
                        if q.is_none() {
                            if let Some(t) = taken.iter_mut().find(|(i, _)| *i == check.rule) {
                                t.1.take.retry_after_ns = left.max(1) * 1_000_000_000;
                            }
                        }
                    }
                    GlobalOutcome::DenyCacheHits
                }
                GlobalAnswer::Failed(f) => {
                    match g.failure_mode {
                        global::FailureMode::Local => {}
                        global::FailureMode::Open => {
                            if let Some((_, t)) = taken.iter().find(|(i, _)| *i == check.rule) {
                                let _ = self.give_back(rule, t, now_ns, store);
                            }
                        }
                        global::FailureMode::Closed => closed = true,
                    }
                    if f == Failure::Timeout {
                        GlobalOutcome::Timeouts
                    } else {
                        GlobalOutcome::Errors
                    }
                }
            };
            outcomes.push((check.rule, outcome));
        }
        let enforce = self.config.mode == Mode::Enforce;
        let action = if limited {
            self.reject_with(&taken, &policies)
        } else if closed && enforce {
            Action::Reply(Reply::problem(
                503,
                Vec::new(),
                problem_json(
                    "about:blank",
                    "Service Unavailable",
                    503,
                    "the rate limit service is unavailable",
                    &[],
                ),
            ))
        } else {
            let mut upstream = upstream;
            if !shadow.is_empty() {
                let mut marker = upstream
                    .set
                    .iter()
                    .find(|(k, _)| k == SHADOW_HEADER)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                for name in &shadow {
                    if !marker.is_empty() {
                        marker.push_str(", ");
                    }
                    marker.push_str(name);
                }
                upstream.set.retain(|(k, _)| k != SHADOW_HEADER);
                upstream.set.push((SHADOW_HEADER.into(), marker));
            }
            Action::Continue {
                upstream,
                response: HeaderEdits {
                    remove: Vec::new(),
                    set: if self.config.response_headers && enforce {
                        self.quota_headers_with(&taken, &policies)
                    } else {
                        Vec::new()
                    },
                },
            }
        };
        Settled {
            action,
            outcomes,
            remember,
        }
    }

    /// `RateLimit-Policy` and `RateLimit` for the rules that were checked. `t` is the seconds
    /// until the next token when none is left, else until the bucket is full again.
    fn quota_headers(&self, taken: &[(usize, Taken)]) -> Vec<(String, String)> {
        self.quota_headers_with(taken, &[])
    }

    /// [`Self::quota_headers`], with the `RateLimit-Policy` items of the rules in `policies`
    /// replaced (a rate limit service's limit and window instead of this proxy's bucket).
    fn quota_headers_with(
        &self,
        taken: &[(usize, Taken)],
        policies: &[(usize, String)],
    ) -> Vec<(String, String)> {
        let mut policy = String::with_capacity(64);
        let mut state = String::with_capacity(64);
        for (i, t) in taken {
            let given = policies.iter().find(|(r, _)| r == i).map(|(_, p)| p);
            let (Some(rule), Some(p)) = (
                self.config.rules.get(*i),
                given.or_else(|| self.policies.get(*i)),
            ) else {
                continue;
            };
            let wait = if t.take.remaining == 0 {
                t.take.retry_after_ns
            } else {
                t.take.full_in_ns
            };
            if !policy.is_empty() {
                policy.push_str(", ");
                state.push_str(", ");
            }
            policy.push_str(p);
            state.push('"');
            state.push_str(&rule.name);
            state.push_str("\";r=");
            text::push_decimal(&mut state, t.take.remaining);
            state.push_str(";t=");
            text::push_decimal(&mut state, ceil_secs(wait));
        }
        if policy.is_empty() {
            return Vec::new();
        }
        vec![
            ("ratelimit-policy".into(), policy),
            ("ratelimit".into(), state),
        ]
    }

    fn reject(&self, taken: &[(usize, Taken)]) -> Action {
        self.reject_with(taken, &[])
    }

    fn reject_with(&self, taken: &[(usize, Taken)], policies: &[(usize, String)]) -> Action {
        let limited: Vec<(&Rule, &Taken)> = taken
            .iter()
            .filter(|(_, t)| !t.take.allowed)
            .filter_map(|(i, t)| Some((self.config.rules.get(*i)?, t)))
            .collect();
        let retry = limited
            .iter()
            .map(|(_, t)| retry_after_secs(t.take.retry_after_ns))
            .max()
            .unwrap_or(1);
        let status = limited.first().map(|(r, _)| r.status).unwrap_or(429);
        let names: Vec<&str> = limited.iter().map(|(r, _)| r.name.as_str()).collect();
        let mut headers = vec![retry_after(retry)];
        if self.config.response_headers {
            headers.extend(
                self.quota_headers_with(taken, policies)
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
        }
        let body = problem_json(
            QUOTA_EXCEEDED,
            "Too Many Requests",
            status,
            &format!(
                "rate limit exceeded ({}); retry in {retry} s",
                names.join(", ")
            ),
            &[("violated-policies", json_string_list(names.iter().copied()))],
        );
        Action::Reply(Reply::problem(status, headers, body))
    }

    fn slot_key(&self, rule: usize, index: Option<u32>) -> String {
        let prefix = self.prefixes.get(rule).map_or("", String::as_str);
        match index {
            Some(i) => {
                let mut k = String::with_capacity(prefix.len() + 11);
                k.push_str(prefix);
                k.push('s');
                text::push_decimal(&mut k, u64::from(i));
                k
            }
            None => format!("{prefix}overflow"),
        }
    }

    /// Takes a token from the key's bucket (see the module docs for the slot search).
    fn take(&self, t: &Target<'_>, now: u64, store: &impl SlotStore) -> Result<Taken, StoreError> {
        let Target {
            index: i,
            rule,
            fp,
            key,
        } = *t;
        let set = u32::try_from(key % u64::from(set_count(rule.max_keys))).unwrap_or(0);
        let ways = set_ways(rule.max_keys, set);
        let set_key = self.slot_key(i, Some(set));
        for _ in 0..ATTEMPTS {
            let read = store.get(&set_key)?;
            let mut slots = read.as_ref().map_or_else(
                || vec![Slot::default(); ways],
                |e| decode_set(&e.value, ways),
            );
            let own = slots.iter().position(|s| s.key == key && s.limit == fp);
            let free = || {
                slots
                    .iter()
                    .position(|s| s.key == 0 || s.limit != fp || rule.limit.is_full(s.bucket, now))
            };
            let (way, bucket) = match own.or_else(free) {
                Some(w) if Some(w) == own => (w, slots.get(w).map(|s| s.bucket)),
                Some(w) => (w, None),
                None => return self.take_overflow(t, now, store),
            };
            let take = rule
                .limit
                .take(bucket.unwrap_or_else(|| rule.limit.fresh(now)), now);
            // A refused request took nothing: the stored bucket is still right, no write.
            if take.allowed {
                if let Some(s) = slots.get_mut(way) {
                    *s = Slot {
                        key,
                        limit: fp,
                        bucket: take.bucket,
                    };
                }
                let value = encode_set(&slots);
                let written = match &read {
                    Some(e) => store.compare_and_swap(&set_key, &value, e.version)?,
                    None => store.create(&set_key, &value)?,
                };
                if written == Write::Conflict {
                    continue;
                }
            }
            return Ok(Taken {
                take,
                slot_key: set_key,
                overflow: false,
                key,
                fp,
            });
        }
        Err(contended(ATTEMPTS))
    }

    /// Charges the rule's one overflow bucket, when every slot of the key's set holds another
    /// key's active bucket.
    fn take_overflow(
        &self,
        t: &Target<'_>,
        now: u64,
        store: &impl SlotStore,
    ) -> Result<Taken, StoreError> {
        let k = self.slot_key(t.index, None);
        let empty = Slot::default().encode();
        for _ in 0..ATTEMPTS {
            let e = get_or_create(store, &k, &empty)?;
            let s = Slot::decode(&e.value);
            let bucket = if s.key == OVERFLOW && s.limit == t.fp {
                s.bucket
            } else {
                t.rule.limit.fresh(now)
            };
            let take = t.rule.limit.take(bucket, now);
            if take.allowed {
                let slot = Slot {
                    key: OVERFLOW,
                    limit: t.fp,
                    bucket: take.bucket,
                };
                if store.compare_and_swap(&k, &slot.encode(), e.version)? == Write::Conflict {
                    continue;
                }
            }
            return Ok(Taken {
                take,
                slot_key: k,
                overflow: true,
                key: t.key,
                fp: t.fp,
            });
        }
        Err(contended(ATTEMPTS))
    }

    /// Returns the token `t` took (the slot still belongs to the same key: a slot is only given
    /// away when full, and a bucket missing the token is not full).
    fn give_back(
        &self,
        rule: &Rule,
        t: &Taken,
        now: u64,
        store: &impl SlotStore,
    ) -> Result<Option<Bucket>, StoreError> {
        let owner = self.slot_owner(t);
        let mut returned = None;
        let written = update(store, &t.slot_key, ATTEMPTS, |bytes| {
            returned = None;
            // Only into the bucket the token came from: if the slot has meanwhile refilled
            // and passed to another key, there is nothing to give back.
            let ways = bytes.len() / SLOT_LEN;
            let mut slots = decode_set(bytes, ways.max(1));
            let s = slots
                .iter_mut()
                .find(|s| s.key == owner.0 && s.limit == owner.1)?;
            s.bucket = rule.limit.give_back(s.bucket, now);
            returned = Some(s.bucket);
            Some(encode_set(&slots))
        })?;
        Ok(written.and(returned))
    }

    /// The (key, fingerprint) a taken slot was written with.
    fn slot_owner(&self, t: &Taken) -> (u64, u64) {
        (if t.overflow { OVERFLOW } else { t.key }, t.fp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use edge_core::store::MemoryStore;
    use edge_core::table::WAYS;
    use edge_core::RequestParts;
    use std::println;

    const S: u64 = 1_000_000_000;

    fn limiter(json: &str) -> Limiter {
        Limiter::new(Config::parse(json.as_bytes()).unwrap(), "rl//", 7)
    }

    fn per_ip(requests: u64, window: &str, extra: &str) -> Limiter {
        per_ip_keys(requests, window, extra, 65_536)
    }

    fn per_ip_keys(requests: u64, window: &str, extra: &str, max_keys: u32) -> Limiter {
        limiter(&format!(
            r#"{{{extra}"rules":[{{"name":"per-ip","key":[{{"source":"clientIp"}}],
                "limit":{{"requests":{requests},"window":"{window}"}},"maxKeys":{max_keys}}}]}}"#
        ))
    }

    fn from(ip: &str) -> RequestParts {
        RequestParts::new("GET", "/api/x").from_ip(ip)
    }

    type Hook<'a> = Box<dyn FnOnce(&MemoryStore) + 'a>;

    /// A store where another worker acts just before (or, with `after`, right after) this
    /// worker's first write to `at`.
    struct Staged<'a> {
        inner: MemoryStore,
        at: String,
        after: bool,
        then: core::cell::RefCell<Option<Hook<'a>>>,
    }

    impl Staged<'_> {
        fn ran(&self) -> bool {
            self.then.borrow().is_none()
        }

        fn fire(&self) {
            if let Some(f) = self.then.borrow_mut().take() {
                f(&self.inner);
            }
        }
    }

    impl SlotStore for Staged<'_> {
        fn get(&self, key: &str) -> Result<Option<edge_core::store::Entry>, StoreError> {
            self.inner.get(key)
        }
        fn compare_and_swap(
            &self,
            key: &str,
            value: &[u8],
            version: u32,
        ) -> Result<Write, StoreError> {
            if key == self.at && !self.after {
                self.fire();
            }
            let w = self.inner.compare_and_swap(key, value, version)?;
            if key == self.at && self.after && w == Write::Done {
                self.fire();
            }
            Ok(w)
        }
        fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError> {
            self.inner.create(key, value)
        }
    }

    /// The key of `req` under rule 0, its set's store key, and a claim of it in a fresh
    /// bucket with one token taken.
    fn set_of(l: &Limiter, req: &RequestParts) -> (u64, String, Slot) {
        let rule = &l.config.rules[0];
        let key = key_hash(l.seed, &rule.name, &rule.key, req);
        let set = u32::try_from(key % u64::from(set_count(rule.max_keys))).unwrap();
        let theirs = Slot {
            key,
            limit: l.fingerprints[0],
            bucket: rule.limit.take(rule.limit.fresh(0), 0).bucket,
        };
        (key, l.slot_key(0, Some(set)), theirs)
    }

    /// Writes `slot` into the first free slot of set `key` as another worker would.
    fn write_slot(m: &MemoryStore, key: &str, slot: &Slot) {
        let e = get_or_create(m, key, &[]).unwrap();
        let mut slots = decode_set(&e.value, WAYS as usize);
        *slots.iter_mut().find(|s| s.key == 0).unwrap() = *slot;
        m.compare_and_swap(key, &encode_set(&slots), e.version)
            .unwrap();
    }

    fn holders(m: &MemoryStore, set_key: &str, key: u64) -> usize {
        let e = m.get(set_key).unwrap().unwrap();
        decode_set(&e.value, WAYS as usize)
            .iter()
            .filter(|s| s.key == key)
            .count()
    }

    #[test]
    fn a_new_key_claimed_by_two_workers_at_once_keeps_one_bucket() {
        // One token per hour. Both workers read the key's set while it had no bucket for
        // the key; the other writes its claim first, so this worker's write loses, it reads
        // again and finds the other's bucket empty.
        let l = per_ip(1, "1h", "");
        let req = from("10.0.0.9:1");
        let (key, set_key, theirs) = set_of(&l, &req);
        let s = Staged {
            inner: MemoryStore::new(),
            at: set_key.clone(),
            after: false,
            then: core::cell::RefCell::new(Some(Box::new(|m: &MemoryStore| {
                write_slot(m, &set_key, &theirs)
            }))),
        };
        write_slot(&s.inner, &set_key, &Slot::default());
        assert_eq!(status(&l.check(&req, 0, &s)), 429);
        assert!(s.ran(), "the staged race ran");
        assert_eq!(holders(&s.inner, &set_key, key), 1);
    }

    #[test]
    fn a_new_client_costs_one_read_and_one_write() {
        let l = per_ip(5, "1h", "");
        let s = MemoryStore::new();
        let req = from("10.0.0.3:1");
        let (key, set_key, _) = set_of(&l, &req);
        assert_eq!(status(&l.check(&req, 0, &s)), 200);
        assert_eq!(holders(&s, &set_key, key), 1);
        // A second client of the same set: one read of the set, one write.
        let other = (1..)
            .map(|i| from(&format!("10.1.{}.{}:1", i / 256, i % 256)))
            .find(|r| set_of(&l, r).1 == set_key && set_of(&l, r).0 != key)
            .unwrap();
        let counted = Counted::new(&s);
        assert_eq!(status(&l.check(&other, 0, &counted)), 200);
        assert_eq!((counted.reads.get(), counted.writes.get()), (1, 1));
    }

    /// Counts the round trips to a store.
    struct Counted<'a> {
        inner: &'a MemoryStore,
        reads: core::cell::Cell<u32>,
        writes: core::cell::Cell<u32>,
    }

    impl<'a> Counted<'a> {
        fn new(inner: &'a MemoryStore) -> Self {
            Counted {
                inner,
                reads: Default::default(),
                writes: Default::default(),
            }
        }
    }

    impl SlotStore for Counted<'_> {
        fn get(&self, key: &str) -> Result<Option<edge_core::store::Entry>, StoreError> {
            self.reads.set(self.reads.get() + 1);
            self.inner.get(key)
        }
        fn compare_and_swap(
            &self,
            key: &str,
            value: &[u8],
            version: u32,
        ) -> Result<Write, StoreError> {
            self.writes.set(self.writes.get() + 1);
            self.inner.compare_and_swap(key, value, version)
        }
        fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError> {
            self.writes.set(self.writes.get() + 1);
            self.inner.create(key, value)
        }
    }

    fn status(d: &Decision) -> u32 {
        match &d.action {
            Action::Continue { .. } => 200,
            Action::Reply(r) => r.status,
        }
    }

    fn header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
        match &d.action {
            Action::Continue { response, .. } => response.get(name),
            Action::Reply(r) => r.header(name).and_then(|v| core::str::from_utf8(v).ok()),
        }
    }

    #[test]
    fn each_client_gets_its_own_bucket() {
        let l = per_ip(2, "60s", "");
        let s = MemoryStore::new();
        let statuses: Vec<u32> = ["10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3", "10.0.0.2:1"]
            .iter()
            .map(|ip| status(&l.check(&from(ip), 0, &s)))
            .collect();
        assert_eq!(statuses, [200, 200, 429, 200]);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_address_in_any_spelling() {
        let l = per_ip(1, "60s", "");
        let s = MemoryStore::new();
        assert_eq!(status(&l.check(&from("[2001:db8::1]:1000"), 0, &s)), 200);
        assert_eq!(status(&l.check(&from("[2001:DB8:0::1]:2000"), 0, &s)), 429);
        assert_eq!(status(&l.check(&from("[2001:db8::2]:1000"), 0, &s)), 200);
    }

    #[test]
    fn a_limited_request_gets_retry_after_quota_headers_and_a_problem_body() {
        let l = per_ip(100, "60s", "");
        let s = MemoryStore::new();
        for _ in 0..100 {
            assert_eq!(status(&l.check(&from("10.0.0.1:1"), 0, &s)), 200);
        }
        let d = l.check(&from("10.0.0.1:1"), S / 2, &s);
        assert_eq!(status(&d), 429);
        // 100 per 60 s: a token every 600 ms; 100 ms of it left.
        assert_eq!(header(&d, "retry-after"), Some("1"));
        assert_eq!(
            header(&d, "ratelimit-policy"),
            Some("\"per-ip\";q=100;w=60")
        );
        assert_eq!(header(&d, "ratelimit"), Some("\"per-ip\";r=0;t=1"));
        assert_eq!(header(&d, "content-type"), Some("application/problem+json"));
        let Action::Reply(r) = &d.action else {
            panic!("a limited request is answered")
        };
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], QUOTA_EXCEEDED);
        assert_eq!(v["status"], 429);
        assert_eq!(v["violated-policies"], serde_json::json!(["per-ip"]));
    }

    #[test]
    fn allowed_responses_carry_remaining_quota() {
        let l = per_ip(10, "10s", "");
        let s = MemoryStore::new();
        let d = l.check(&from("10.0.0.1:1"), 0, &s);
        assert_eq!(header(&d, "ratelimit-policy"), Some("\"per-ip\";q=10;w=10"));
        assert_eq!(header(&d, "ratelimit"), Some("\"per-ip\";r=9;t=1"));
        let quiet = per_ip(10, "10s", r#""responseHeaders":false,"#);
        assert_eq!(
            header(&quiet.check(&from("10.0.0.1:1"), 0, &s), "ratelimit"),
            None
        );
    }

    #[test]
    fn the_window_refills_exactly() {
        let l = per_ip(3, "1s", "");
        let s = MemoryStore::new();
        let admitted = |from_ns: u64, n: u64| {
            (0..n)
                .filter(|k| status(&l.check(&from("10.0.0.1:1"), from_ns + k, &s)) == 200)
                .count()
        };
        assert_eq!(admitted(0, 10), 3);
        assert_eq!(
            admitted(S / 3 - 100, 1),
            0,
            "a third of a second minus a bit: no token"
        );
        assert_eq!(admitted(S, 10), 3);
    }

    #[test]
    fn multiple_rules_all_apply_and_a_rejection_uses_up_no_quota() {
        let l = limiter(
            r#"{"rules":[
                {"name":"global","limit":{"requests":3,"window":"60s"}},
                {"name":"per-key","key":[{"header":"x-api-key"}],"limit":{"requests":1,"window":"60s"}}]}"#,
        );
        let s = MemoryStore::new();
        let key = |k: &str| RequestParts::new("GET", "/").header("x-api-key", k);
        assert_eq!(status(&l.check(&key("a"), 0, &s)), 200);
        let d = l.check(&key("a"), 0, &s);
        assert_eq!(status(&d), 429);
        assert_eq!(
            header(&d, "ratelimit"),
            Some("\"global\";r=2;t=20, \"per-key\";r=0;t=60")
        );
        // The rejected requests did not use up the global quota: two more clients fit.
        for _ in 0..5 {
            assert_eq!(status(&l.check(&key("a"), 0, &s)), 429);
        }
        assert_eq!(status(&l.check(&key("b"), 0, &s)), 200);
        assert_eq!(status(&l.check(&key("c"), 0, &s)), 200);
        let d = l.check(&key("d"), 0, &s);
        assert_eq!(status(&d), 429);
        let Action::Reply(r) = &d.action else {
            panic!("a limited request is answered")
        };
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["violated-policies"], serde_json::json!(["global"]));
    }

    #[test]
    fn only_matching_rules_apply() {
        let l = limiter(
            r#"{"rules":[{"name":"posts","match":{"methods":["POST"]},"limit":{"requests":1,"window":"60s"}}]}"#,
        );
        let s = MemoryStore::new();
        for _ in 0..3 {
            let d = l.check(&RequestParts::new("GET", "/"), 0, &s);
            assert_eq!(status(&d), 200);
            assert!(d.results.is_empty());
            assert_eq!(header(&d, "ratelimit"), None);
        }
        assert_eq!(
            status(&l.check(&RequestParts::new("POST", "/"), 0, &s)),
            200
        );
        assert_eq!(
            status(&l.check(&RequestParts::new("POST", "/"), 0, &s)),
            429
        );
    }

    #[test]
    fn shadow_mode_forwards_with_a_marker_and_counts() {
        let l = per_ip(1, "60s", r#""mode":"shadow","#);
        let s = MemoryStore::new();
        assert_eq!(status(&l.check(&from("10.0.0.1:1"), 0, &s)), 200);
        let d = l.check(&from("10.0.0.1:1"), 0, &s);
        assert_eq!(d.results[0].outcome, Outcome::ShadowLimited);
        let Action::Continue { upstream, response } = &d.action else {
            panic!("shadow mode rejected: {d:?}")
        };
        assert_eq!(upstream.remove, ["x-ratelimit-shadow".to_string()]);
        assert_eq!(
            upstream.set,
            [("x-ratelimit-shadow".to_string(), "per-ip".to_string())]
        );
        assert!(response.is_empty(), "clients see no change in shadow mode");
    }

    #[test]
    fn enforce_mode_leaves_client_headers_alone() {
        let l = per_ip(1, "60s", "");
        let d = l.check(&from("10.0.0.1:1"), 0, &MemoryStore::new());
        let Action::Continue { upstream, .. } = &d.action else {
            panic!("{d:?}")
        };
        assert!(upstream.remove.is_empty());
    }

    #[test]
    fn each_rule_outcome_counts_under_its_documented_name() {
        let l = limiter(
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"}},
                         {"name":"b","limit":{"requests":1,"window":"1s"}}]}"#,
        );
        let names = edge_core::metrics::names::<Outcome>(&Limiter::counter_sets(&l.config));
        assert_eq!(names.len(), 8);
        let name = |rule, o| names[edge_core::metrics::index(rule, o)].as_str();
        assert_eq!(name(0, Outcome::Allowed), "rate_limit.a.allowed");
        assert_eq!(name(0, Outcome::StoreError), "rate_limit.a.store_errors");
        assert_eq!(name(1, Outcome::Limited), "rate_limit.b.limited");
        assert_eq!(
            name(1, Outcome::ShadowLimited),
            "rate_limit.b.shadow_limited"
        );
    }

    #[test]
    fn a_token_is_only_given_back_to_the_bucket_it_came_from() {
        // 1e9 per second refills in a nanosecond: by the time another rule rejects, the slot
        // may already belong to someone else.
        let l = limiter(
            r#"{"rules":[{"name":"fast","limit":{"requests":1000000000,"window":"1s","burst":1}}]}"#,
        );
        let s = MemoryStore::new();
        let target = Target {
            index: 0,
            rule: &l.config.rules[0],
            fp: l.fingerprints[0],
            key: 5,
        };
        let t = l.take(&target, 0, &s).unwrap();
        assert!(t.take.allowed);
        // Another key takes the slot over once the bucket is full again.
        let other = Slot {
            key: 6,
            limit: l.fingerprints[0],
            bucket: l.config.rules[0].limit.fresh(10),
        };
        let e = s.get(&t.slot_key).unwrap().unwrap();
        let mut slots = decode_set(&e.value, WAYS as usize);
        *slots.iter_mut().find(|s| s.key == 5).unwrap() = other;
        s.compare_and_swap(&t.slot_key, &encode_set(&slots), e.version)
            .unwrap();
        assert_eq!(l.give_back(&l.config.rules[0], &t, 10, &s), Ok(None));
        let after = decode_set(&s.get(&t.slot_key).unwrap().unwrap().value, WAYS as usize);
        assert!(after.contains(&other) && !after.iter().any(|s| s.key == 5));
    }

    #[test]
    fn failure_modes_decide_when_the_store_is_down() {
        let s = MemoryStore::new();
        s.broken.set(true);
        let allow = per_ip(1, "60s", "");
        let d = allow.check(&from("10.0.0.1:1"), 0, &s);
        assert_eq!(
            (status(&d), d.results[0].outcome),
            (200, Outcome::StoreError)
        );
        assert_eq!(d.errors.len(), 1);
        let deny = per_ip(1, "60s", r#""failureMode":"deny","#);
        let d = deny.check(&from("10.0.0.1:1"), 0, &s);
        assert_eq!(status(&d), 503);
        assert_eq!(header(&d, "content-type"), Some("application/problem+json"));
    }

    #[test]
    fn a_lost_compare_and_swap_is_retried_and_bounded() {
        let l = per_ip(1, "60s", "");
        let s = MemoryStore::new();
        // Another worker writes between our read and our write, three times.
        s.conflicts.set(3);
        assert_eq!(status(&l.check(&from("10.0.0.1:1"), 0, &s)), 200);
        assert_eq!(status(&l.check(&from("10.0.0.1:1"), 0, &s)), 429);
        // Endless contention is a store failure, not a hang.
        let l = per_ip(100, "60s", "");
        assert_eq!(status(&l.check(&from("10.0.0.2:1"), 0, &s)), 200);
        s.conflicts.set(u32::MAX);
        let d = l.check(&from("10.0.0.2:1"), 0, &s);
        assert_eq!(d.results[0].outcome, Outcome::StoreError);
    }

    #[test]
    fn a_flood_of_new_keys_stays_within_max_keys_and_the_hot_key_stays_limited() {
        let l = per_ip_keys(5, "60s", "", 64);
        let s = MemoryStore::new();
        let hot = from("192.0.2.1:1");
        for _ in 0..5 {
            assert_eq!(status(&l.check(&hot, 0, &s)), 200);
        }
        for i in 0..20_000u32 {
            let ip = format!("10.{}.{}.{}:1", i >> 16, (i >> 8) & 255, i & 255);
            l.check(&from(&ip), u64::from(i), &s);
            if i % 1000 == 0 {
                assert_eq!(
                    status(&l.check(&hot, u64::from(i), &s)),
                    429,
                    "after {i} new keys"
                );
            }
        }
        // 64 slots + the overflow bucket + the seed-free namespace: nothing else.
        assert!(s.len() <= 65, "{} keys", s.len());
    }

    #[test]
    fn a_rule_half_full_gives_nearly_every_client_its_own_bucket() {
        // 2,048 active clients in 4,096 slots: see [`WAYS`]. With `WAYS` = 4, 91 share and it fails.
        let l = per_ip_keys(5, "60s", "", 4096);
        let s = MemoryStore::new();
        let shared = (0..2048u32)
            .filter(|i| {
                let ip = format!("10.0.{}.{}:1", i >> 8, i & 255);
                l.check(&from(&ip), 0, &s).results[0].overflow
            })
            .count();
        println!("half full: {shared} of 2048 clients share the overflow bucket");
        assert!(
            shared <= 41,
            "{shared} of 2048 clients share the overflow bucket"
        );
    }

    #[test]
    fn a_full_bucket_gives_its_slot_to_a_new_key() {
        let l = per_ip_keys(1, "1s", "", 1);
        let s = MemoryStore::new();
        assert_eq!(status(&l.check(&from("10.0.0.1:1"), 0, &s)), 200);
        // The one slot is busy: the next client is charged to the overflow bucket.
        let d = l.check(&from("10.0.0.2:1"), 0, &s);
        assert!(d.results[0].overflow);
        // A second later the first bucket is full again and the slot is free for anyone.
        let d = l.check(&from("10.0.0.3:1"), S, &s);
        assert!(!d.results[0].overflow);
        assert_eq!(status(&d), 200);
    }

    #[test]
    fn a_changed_limit_starts_from_fresh_buckets() {
        let s = MemoryStore::new();
        let old = per_ip(1, "60s", "");
        assert_eq!(status(&old.check(&from("10.0.0.1:1"), 0, &s)), 200);
        assert_eq!(status(&old.check(&from("10.0.0.1:1"), 0, &s)), 429);
        let new = per_ip(2, "60s", "");
        assert_eq!(status(&new.check(&from("10.0.0.1:1"), 0, &s)), 200);
        assert_eq!(status(&new.check(&from("10.0.0.1:1"), 0, &s)), 200);
        assert_eq!(status(&new.check(&from("10.0.0.1:1"), 0, &s)), 429);
    }

    #[test]
    fn slots_round_trip_and_garbage_reads_as_empty() {
        let slot = Slot {
            key: 5,
            limit: 6,
            bucket: Bucket {
                level: u128::MAX - 1,
                at_ns: 7,
            },
        };
        assert_eq!(Slot::decode(&slot.encode()), slot);
        assert_eq!(Slot::decode(b"short"), Slot::default());
    }

    fn global_limiter(failure_mode: &str, extra: &str) -> Limiter {
        limiter(&format!(
            r#"{{{extra}"rules":[{{"name":"per-key","key":[{{"header":"x-api-key"}}],
                "limit":{{"requests":5,"window":"1m"}},
                "global":{{"cluster":"ratelimit","domain":"edge","failureMode":"{failure_mode}"}}}}]}}"#
        ))
    }

    fn keyed() -> RequestParts {
        RequestParts::new("GET", "/api/x").header("x-api-key", "k1")
    }

    fn quota(limit: u32, remaining: u32, reset_secs: u64) -> Option<Quota> {
        Some(Quota {
            limit,
            remaining,
            reset_secs,
            window_secs: Some(60),
        })
    }

    fn settled_header<'a>(s: &'a Settled, name: &str) -> Option<&'a str> {
        match &s.action {
            Action::Continue { response, .. } => response.get(name),
            Action::Reply(r) => r.header(name).and_then(|v| core::str::from_utf8(v).ok()),
        }
    }

    fn settled_status(s: &Settled) -> u32 {
        match &s.action {
            Action::Continue { .. } => 200,
            Action::Reply(r) => r.status,
        }
    }

    #[test]
    fn a_global_rule_asks_the_service_with_its_descriptor_after_the_local_bucket() {
        let l = global_limiter("local", "");
        let store = MemoryStore::default();
        let d = l.check(&keyed(), 0, &store);
        let pending = d.pending.expect("the service is asked");
        assert_eq!(pending.checks.len(), 1);
        let sent = global::RateLimitRequest::decode_message(&pending.checks[0].message);
        assert_eq!(sent.0, "edge");
        assert_eq!(
            sent.1,
            [
                ("rule".into(), "per-key".into()),
                ("x-api-key".into(), "k1".into())
            ]
        );
        // A client over the limit in this proxy is over it in the fleet: no call.
        for _ in 0..4 {
            let _ = l.check(&keyed(), 0, &store);
        }
        let over = l.check(&keyed(), 0, &store);
        assert_eq!(status(&over), 429);
        assert!(over.pending.is_none());
        // Rules without a global part never ask.
        let local = per_ip(5, "1m", "");
        assert!(local.check(&from("10.0.0.1"), 0, &store).pending.is_none());
    }

    #[test]
    fn the_services_answer_gives_the_quota_headers_or_the_429() {
        let l = global_limiter("local", "");
        let store = MemoryStore::default();
        let d = l.check(&keyed(), 0, &store);
        let ok = l.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Service(Answer::Allowed(quota(100, 42, 30)))],
            0,
            &store,
        );
        assert_eq!(settled_status(&ok), 200);
        assert_eq!(
            settled_header(&ok, "ratelimit-policy"),
            Some("\"per-key\";q=100;w=60")
        );
        assert_eq!(
            settled_header(&ok, "ratelimit"),
            Some("\"per-key\";r=42;t=30")
        );
        assert_eq!(ok.outcomes, [(0, GlobalOutcome::Checked)]);
        assert!(ok.remember.is_empty());

        let d = l.check(&keyed(), 0, &store);
        let now = 5 * S;
        let over = l.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Service(Answer::Limited(quota(100, 0, 30)))],
            now,
            &store,
        );
        assert_eq!(settled_status(&over), 429);
        assert_eq!(settled_header(&over, "retry-after"), Some("30"));
        assert_eq!(
            settled_header(&over, "ratelimit"),
            Some("\"per-key\";r=0;t=30")
        );
        assert_eq!(over.outcomes, [(0, GlobalOutcome::OverLimit)]);
        assert_eq!(
            over.remember,
            [(
                0,
                d_key(&l),
                Denied {
                    until_ns: now + 30 * S,
                    quota: quota(100, 0, 30)
                }
            )]
        );

        // Limitador sends no statuses: the rule's own window says when to retry.
        let d = l.check(&keyed(), 0, &store);
        let bare = l.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Service(Answer::Limited(None))],
            0,
            &store,
        );
        assert_eq!(settled_header(&bare, "retry-after"), Some("60"));
    }

    fn d_key(l: &Limiter) -> u64 {
        l.check(&keyed(), 0, &MemoryStore::default()).results[0].key
    }

    #[test]
    fn a_remembered_denial_answers_429_until_its_reset() {
        let l = global_limiter("local", "");
        let store = MemoryStore::default();
        let d = l.check(&keyed(), 0, &store);
        let denied = Denied {
            until_ns: 20 * S,
            quota: quota(100, 0, 30),
        };
        let s = l.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Cached(denied)],
            12 * S,
            &store,
        );
        assert_eq!(settled_status(&s), 429);
        assert_eq!(settled_header(&s, "retry-after"), Some("8"));
        assert_eq!(s.outcomes, [(0, GlobalOutcome::DenyCacheHits)]);
    }

    #[test]
    fn each_failure_mode_does_what_it_says_while_the_service_fails() {
        let store = MemoryStore::default();
        // local: this proxy's bucket decided (it allowed), so the request goes on.
        let l = global_limiter("local", "");
        let d = l.check(&keyed(), 0, &store);
        let s = l.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Failed(Failure::Timeout)],
            0,
            &store,
        );
        assert_eq!(settled_status(&s), 200);
        assert_eq!(s.outcomes, [(0, GlobalOutcome::Timeouts)]);
        // open: allowed, and the outage costs the client no local token.
        let open = global_limiter("open", "");
        let store = MemoryStore::default();
        for _ in 0..10 {
            let d = open.check(&keyed(), 0, &store);
            let s = open.settle(
                d.pending.unwrap(),
                &[GlobalAnswer::Failed(Failure::Error)],
                0,
                &store,
            );
            assert_eq!(settled_status(&s), 200);
            assert_eq!(s.outcomes, [(0, GlobalOutcome::Errors)]);
        }
        // closed: 503, nothing forwarded.
        let closed = global_limiter("closed", "");
        let d = closed.check(&keyed(), 0, &store);
        let s = closed.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Failed(Failure::Malformed)],
            0,
            &store,
        );
        assert_eq!(settled_status(&s), 503);
    }

    #[test]
    fn shadow_mode_forwards_a_client_the_service_limited_with_the_marker() {
        let l = global_limiter("local", r#""mode":"shadow","#);
        let store = MemoryStore::default();
        let d = l.check(&keyed(), 0, &store);
        let s = l.settle(
            d.pending.unwrap(),
            &[GlobalAnswer::Service(Answer::Limited(quota(100, 0, 30)))],
            0,
            &store,
        );
        match &s.action {
            Action::Continue { upstream, .. } => {
                assert_eq!(upstream.get(SHADOW_HEADER), Some("per-key"));
            }
            Action::Reply(r) => panic!("shadow mode answered {}", r.status),
        }
        assert_eq!(s.outcomes, [(0, GlobalOutcome::OverLimit)]);
    }

    #[test]
    fn a_remembered_client_is_answered_without_a_call_and_others_are_asked() {
        let l = global_limiter("local", "");
        let store = MemoryStore::default();
        let mut caches = vec![global::DenyCache::new(16)];
        let d = l.check(&keyed(), 0, &store);
        let pending = d.pending.unwrap();
        match l.plan(&pending, &mut caches, 0).as_slice() {
            [Ask::Call {
                cluster,
                timeout_ms,
                message,
            }] => {
                assert_eq!((*cluster, *timeout_ms), ("ratelimit", 50));
                assert_eq!(*message, pending.checks[0].message.as_slice());
            }
            other => panic!("expected one call, got {other:?}"),
        }
        let denied = Denied {
            until_ns: 10 * S,
            quota: None,
        };
        caches[0].remember(pending.checks[0].key, denied);
        assert_eq!(
            l.plan(&pending, &mut caches, 5 * S),
            [Ask::Known(GlobalAnswer::Cached(denied))]
        );
        // At the reset the client is asked about again.
        assert!(matches!(
            l.plan(&pending, &mut caches, 10 * S).as_slice(),
            [Ask::Call { .. }]
        ));
        // A check no rule can answer fails rather than waiting forever.
        let local = per_ip(5, "1m", "");
        assert_eq!(
            local.plan(&pending, &mut caches, 0),
            [Ask::Known(GlobalAnswer::Failed(Failure::Error))]
        );
    }
}
