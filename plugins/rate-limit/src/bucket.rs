//! Exact token-bucket arithmetic in integers.
//!
//! A bucket holds up to `burst` tokens and gains `requests` tokens per `window`. To stay exact
//! (no floating point, no drift at window edges) the level is kept in *token-nanoseconds*: one
//! token is `window_ns` units, and each elapsed nanosecond adds `requests` units. A request
//! costs `window_ns` units.

/// A limit as configured: `requests` per `window_ns`, bucket capacity `burst` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub requests: u64,
    pub window_ns: u64,
    pub burst: u64,
}

/// A bucket's state: its level (token-nanoseconds) at time `at_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bucket {
    pub level: u128,
    pub at_ns: u64,
}

/// The outcome of taking one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Take {
    pub allowed: bool,
    /// The bucket after the decision (store it back).
    pub bucket: Bucket,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Nanoseconds until one token is available (0 when one is).
    pub retry_after_ns: u64,
    /// Nanoseconds until the bucket is full again.
    pub full_in_ns: u64,
}

impl Limit {
    fn capacity(&self) -> u128 {
        u128::from(self.burst) * u128::from(self.window_ns)
    }

    fn cost(&self) -> u128 {
        u128::from(self.window_ns)
    }

    /// A bucket as a new key finds it: full.
    pub fn fresh(&self, now_ns: u64) -> Bucket {
        Bucket {
            level: self.capacity(),
            at_ns: now_ns,
        }
    }

    /// The bucket refilled up to `now_ns`. A clock that went backwards adds nothing and keeps
    /// the later timestamp, so a jump back never grants tokens twice.
    pub fn refill(&self, b: Bucket, now_ns: u64) -> Bucket {
        let elapsed = now_ns.saturating_sub(b.at_ns);
        let level = b
            .level
            .saturating_add(u128::from(elapsed) * u128::from(self.requests))
            .min(self.capacity());
        Bucket {
            level,
            at_ns: b.at_ns.max(now_ns),
        }
    }

    /// True when the bucket at `now_ns` is indistinguishable from a fresh one, so its slot may
    /// be given to another key without letting anyone escape a limit.
    pub fn is_full(&self, b: Bucket, now_ns: u64) -> bool {
        self.refill(b, now_ns).level >= self.capacity()
    }

    /// Takes one token if there is one.
    pub fn take(&self, b: Bucket, now_ns: u64) -> Take {
        let mut b = self.refill(b, now_ns);
        let allowed = b.level >= self.cost();
        if allowed {
            b.level -= self.cost();
        }
        self.describe(allowed, b)
    }

    /// What a client is told about bucket `b` (already refilled to now).
    pub fn describe(&self, allowed: bool, b: Bucket) -> Take {
        let rate = u128::from(self.requests);
        // With no refill a missing token never comes: u64::MAX stands for "never".
        let ns_until = |target: u128| -> u64 {
            let missing = target.saturating_sub(b.level);
            if missing == 0 {
                0
            } else if rate == 0 {
                u64::MAX
            } else {
                let q = div(missing, rate);
                u64::try_from(q + u128::from(q * rate < missing)).unwrap_or(u64::MAX)
            }
        };
        Take {
            allowed,
            bucket: b,
            remaining: u64::try_from(div(b.level, self.cost().max(1))).unwrap_or(u64::MAX),
            retry_after_ns: ns_until(self.cost()),
            full_in_ns: ns_until(self.capacity()),
        }
    }

    /// Returns one token taken earlier (a request another rule rejected must not use up this
    /// rule's quota). Never beyond capacity.
    pub fn give_back(&self, b: Bucket, now_ns: u64) -> Bucket {
        let b = self.refill(b, now_ns);
        Bucket {
            level: b.level.saturating_add(self.cost()).min(self.capacity()),
            at_ns: b.at_ns,
        }
    }
}

/// `a / b` (b > 0) in 64-bit arithmetic when both fit, as they do for every limit below
/// 18 billion tokens: wasm has no 128-bit division, and the library routine costs hundreds of
/// instructions.
fn div(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) if b > 0 => u128::from(a / b),
        _ => div_wide(a, b),
    }
}

/// The 128-bit routine, out of line: reached only by limits beyond 18 billion tokens.
#[cold]
#[inline(never)]
fn div_wide(a: u128, b: u128) -> u128 {
    a / b.max(1)
}

/// Whole seconds, rounded up (for `retry-after` and the RateLimit `t` parameter).
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limit(requests: u64, window_s: u64, burst: u64) -> Limit {
        Limit {
            requests,
            window_ns: window_s * S,
            burst,
        }
    }

    /// Takes `n` tokens at `now`, returning how many were allowed and the final bucket.
    fn take_n(l: &Limit, mut b: Bucket, now: u64, n: u64) -> (u64, Bucket) {
        let mut allowed = 0;
        for _ in 0..n {
            let t = l.take(b, now);
            allowed += u64::from(t.allowed);
            b = t.bucket;
        }
        (allowed, b)
    }

    #[test]
    fn a_fresh_bucket_admits_exactly_burst_then_limits() {
        let l = limit(100, 60, 20);
        let (allowed, b) = take_n(&l, l.fresh(0), 0, 25);
        assert_eq!(allowed, 20);
        let t = l.take(b, 0);
        assert!(!t.allowed);
        assert_eq!(t.remaining, 0);
        // 100 per 60 s: one token every 0.6 s.
        assert_eq!(t.retry_after_ns, 600_000_000);
        assert_eq!(ceil_secs(t.retry_after_ns), 1);
    }

    #[test]
    fn refill_is_exact_at_window_edges() {
        let l = limit(3, 1, 3);
        let (_, empty) = take_n(&l, l.fresh(0), 0, 3);
        // 3 per second: a token every 333,333,333.33 ns; not one nanosecond early.
        assert!(!l.take(empty, 333_333_333).allowed);
        assert!(l.take(empty, 333_333_334).allowed);
        // After exactly one window the bucket is full again, and not beyond.
        let (allowed, _) = take_n(&l, empty, S, 10);
        assert_eq!(allowed, 3);
        assert!(l.is_full(empty, S));
        assert!(!l.is_full(empty, S - 1));
    }

    #[test]
    fn over_many_windows_the_rate_is_exact() {
        // 7 requests per 3 s, hammered every millisecond for 30 s: the initial burst of 2 plus
        // exactly 70 refilled tokens. (With burst 1 a token arriving between samples would
        // find the bucket full and be lost, as a token bucket must.)
        let l = limit(7, 3, 2);
        let mut b = l.fresh(0);
        let mut allowed = 0;
        for ms in 0..=30_000u64 {
            let t = l.take(b, ms * 1_000_000);
            allowed += u64::from(t.allowed);
            b = t.bucket;
        }
        assert_eq!(allowed, 72);
    }

    #[test]
    fn time_going_backwards_grants_nothing() {
        let l = limit(10, 1, 10);
        let (_, empty) = take_n(&l, l.fresh(5 * S), 5 * S, 10);
        let back = l.take(empty, S);
        assert!(!back.allowed, "an earlier clock must not refill");
        assert_eq!(back.bucket.at_ns, 5 * S, "the later timestamp is kept");
        assert!(l.take(empty, 5 * S + S / 10).allowed);
    }

    #[test]
    fn huge_and_zero_values_neither_overflow_nor_divide_by_zero() {
        let l = Limit {
            requests: u64::MAX,
            window_ns: u64::MAX,
            burst: u64::MAX,
        };
        let t = l.take(l.fresh(u64::MAX), u64::MAX);
        assert!(t.allowed);
        let zero = Limit {
            requests: 0,
            window_ns: S,
            burst: 0,
        };
        let t = zero.take(zero.fresh(0), 10 * S);
        assert!(!t.allowed);
        assert_eq!(t.retry_after_ns, u64::MAX, "no refill: a token never comes");
        assert_eq!(t.full_in_ns, 0, "capacity 0 is already full");
    }

    #[test]
    fn a_returned_token_can_be_taken_again_but_never_overfills() {
        let l = limit(1, 60, 1);
        let t = l.take(l.fresh(0), 0);
        assert!(!l.take(t.bucket, 0).allowed);
        let back = l.give_back(t.bucket, 0);
        assert!(l.take(back, 0).allowed);
        assert_eq!(l.give_back(l.fresh(0), 0), l.fresh(0));
    }

    #[test]
    fn remaining_and_full_in_describe_the_bucket_after_the_request() {
        let l = limit(10, 10, 5);
        let t = l.take(l.fresh(0), 0);
        assert_eq!(t.remaining, 4);
        assert_eq!(t.full_in_ns, S, "one token back at 1 per second");
        assert_eq!(t.retry_after_ns, 0);
    }
}
