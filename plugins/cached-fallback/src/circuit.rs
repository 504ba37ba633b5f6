//! The circuit breaker as a pure state machine over one small value that every worker shares
//! (the policy applies each transition with a compare-and-swap).
//!
//! Closed: failures are counted in fixed windows of `window`; the `failures`-th in one window
//! opens the circuit. Open: requests are answered without the upstream until `openFor` has
//! passed; then the first request becomes the probe (half-open) and the others are still
//! answered locally. The probe's success closes the circuit, its failure opens it again. A
//! probe that never reports (its stream was cancelled, or its answer was neither a success nor
//! a failure) gives way: its stream hands the probe back when it ends, and in any case another
//! request takes over as the probe once `openFor` has passed since it started.

use crate::config::Breaker;
use alloc::vec::Vec;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

/// The shared state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    /// Closed: the start of the current counting window.
    pub window_start_ns: u64,
    /// Closed: failures counted in the current window.
    pub failures: u32,
    /// Open: when it opened. Half-open: when the probe was let through, which is also the
    /// probe's token.
    pub since_ns: u64,
}

const LEN: usize = 21;

impl State {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.push(match self.phase {
            Phase::Closed => 0,
            Phase::Open => 1,
            Phase::HalfOpen => 2,
        });
        out.extend_from_slice(&self.window_start_ns.to_le_bytes());
        out.extend_from_slice(&self.failures.to_le_bytes());
        out.extend_from_slice(&self.since_ns.to_le_bytes());
        out
    }

    /// Anything that is not a state reads as closed with nothing counted.
    pub fn decode(b: &[u8]) -> State {
        let read = || -> Option<State> {
            if b.len() != LEN {
                return None;
            }
            Some(State {
                phase: match b.first()? {
                    1 => Phase::Open,
                    2 => Phase::HalfOpen,
                    _ => Phase::Closed,
                },
                window_start_ns: u64::from_le_bytes(b.get(1..9)?.try_into().ok()?),
                failures: u32::from_le_bytes(b.get(9..13)?.try_into().ok()?),
                since_ns: u64::from_le_bytes(b.get(13..21)?.try_into().ok()?),
            })
        };
        read().unwrap_or_default()
    }
}

/// What a request may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Forward it (closed circuit).
    Pass,
    /// Forward it as the half-open probe with this token.
    Probe(u64),
    /// Answer it locally; the circuit may let a probe through in `retry_after_ns`.
    Reject { retry_after_ns: u64 },
}

/// Decides on a request at `now`; the new state to write, if it changes.
pub fn admit(b: &Breaker, s: State, now: u64) -> (Admit, Option<State>) {
    match s.phase {
        Phase::Closed => (Admit::Pass, None),
        Phase::Open | Phase::HalfOpen => {
            let due = s.since_ns.saturating_add(b.open_ns);
            // Clocks of two workers are the same host clock; one that went back leaves the
            // circuit open a little longer, never shorter.
            if now >= due {
                let probe = State {
                    phase: Phase::HalfOpen,
                    window_start_ns: 0,
                    failures: 0,
                    since_ns: now,
                };
                (Admit::Probe(now), Some(probe))
            } else {
                (
                    Admit::Reject {
                        retry_after_ns: due - now,
                    },
                    None,
                )
            }
        }
    }
}

/// Reports an upstream outcome (`failure` or success) of a request forwarded at `now`,
/// `probe` being its token if it was the probe. Returns the new state to write and whether
/// this report opened the circuit.
pub fn report(
    b: &Breaker,
    s: State,
    now: u64,
    failure: bool,
    probe: Option<u64>,
) -> (Option<State>, bool) {
    let open = State {
        phase: Phase::Open,
        window_start_ns: 0,
        failures: 0,
        since_ns: now,
    };
    match s.phase {
        Phase::Closed if failure => {
            let expired = now < s.window_start_ns
                || now - s.window_start_ns >= b.window_ns
                || s.failures == 0;
            let (start, n) = if expired {
                (now, 1)
            } else {
                (s.window_start_ns, s.failures.saturating_add(1))
            };
            if n >= b.failures {
                (Some(open), true)
            } else {
                let counted = State {
                    phase: Phase::Closed,
                    window_start_ns: start,
                    failures: n,
                    since_ns: 0,
                };
                (Some(counted), false)
            }
        }
        // Successes while closed change nothing (failures are counted per window, not in a
        // row); outcomes of requests forwarded before the circuit opened are ignored.
        Phase::Closed | Phase::Open => (None, false),
        Phase::HalfOpen if probe == Some(s.since_ns) => {
            if failure {
                (Some(open), true)
            } else {
                (Some(State::default()), false)
            }
        }
        Phase::HalfOpen => (None, false),
    }
}

/// The probe with token `probe` ended without reporting: the next request may probe at once.
pub fn abandon(b: &Breaker, s: State, now: u64, probe: u64) -> Option<State> {
    (s.phase == Phase::HalfOpen && s.since_ns == probe).then(|| State {
        phase: Phase::Open,
        window_start_ns: 0,
        failures: 0,
        since_ns: now.saturating_sub(b.open_ns),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const B: Breaker = Breaker {
        failures: 3,
        window_ns: 10 * S,
        open_ns: 30 * S,
    };

    /// Applies a report and returns the state after it.
    fn fail(s: State, now: u64) -> (State, bool) {
        let (n, opened) = report(&B, s, now, true, None);
        (n.unwrap_or(s), opened)
    }

    #[test]
    fn opens_after_n_failures_within_the_window() {
        let s = State::default();
        let (s, o1) = fail(s, 100 * S);
        let (s, o2) = fail(s, 105 * S);
        assert!(!o1 && !o2);
        assert_eq!((s.phase, s.failures), (Phase::Closed, 2));
        let (s, o3) = fail(s, 109 * S);
        assert!(o3);
        assert_eq!((s.phase, s.since_ns), (Phase::Open, 109 * S));
    }

    #[test]
    fn failures_in_different_windows_do_not_add_up_and_successes_change_nothing() {
        let (s, _) = fail(State::default(), 100 * S);
        let (s, _) = fail(s, 105 * S);
        assert_eq!(report(&B, s, 106 * S, false, None), (None, false));
        // The window that began at 100 s is over at 110 s: counting starts again.
        let (s, opened) = fail(s, 110 * S);
        assert!(!opened);
        assert_eq!((s.failures, s.window_start_ns), (1, 110 * S));
        // A clock that went back also starts a new window rather than underflowing.
        let (s, _) = fail(s, 50 * S);
        assert_eq!((s.failures, s.window_start_ns), (1, 50 * S));
    }

    #[test]
    fn open_rejects_until_open_for_then_lets_exactly_one_probe_through() {
        let open = State {
            phase: Phase::Open,
            since_ns: 100 * S,
            ..State::default()
        };
        assert_eq!(
            admit(&B, open, 110 * S),
            (
                Admit::Reject {
                    retry_after_ns: 20 * S
                },
                None
            )
        );
        let (a, next) = admit(&B, open, 130 * S);
        assert_eq!(a, Admit::Probe(130 * S));
        let half = next.unwrap();
        assert_eq!(half.phase, Phase::HalfOpen);
        // While the probe is out, everyone else is still answered locally.
        assert!(matches!(admit(&B, half, 131 * S).0, Admit::Reject { .. }));
        assert_eq!(admit(&B, State::default(), 131 * S), (Admit::Pass, None));
    }

    #[test]
    fn the_probe_closes_on_success_and_reopens_on_failure_others_are_ignored() {
        let half = State {
            phase: Phase::HalfOpen,
            since_ns: 130 * S,
            ..State::default()
        };
        let token = Some(130 * S);
        assert_eq!(
            report(&B, half, 131 * S, false, token),
            (Some(State::default()), false)
        );
        let (s, opened) = report(&B, half, 131 * S, true, token);
        assert!(opened);
        assert_eq!(s.unwrap().since_ns, 131 * S);
        // Stragglers forwarded before the circuit opened decide nothing.
        assert_eq!(report(&B, half, 131 * S, false, None), (None, false));
        assert_eq!(report(&B, half, 131 * S, true, Some(1)), (None, false));
        let open = State {
            phase: Phase::Open,
            since_ns: 100 * S,
            ..State::default()
        };
        assert_eq!(report(&B, open, 101 * S, true, None), (None, false));
    }

    #[test]
    fn a_probe_that_never_reports_does_not_wedge_the_circuit() {
        let half = State {
            phase: Phase::HalfOpen,
            since_ns: 130 * S,
            ..State::default()
        };
        // Its stream ended without an answer: the next request probes at once.
        let s = abandon(&B, half, 140 * S, 130 * S).unwrap();
        assert_eq!(admit(&B, s, 140 * S).0, Admit::Probe(140 * S));
        assert_eq!(abandon(&B, half, 140 * S, 1), None, "not that probe");
        // Or it vanished silently: after openFor another request takes over.
        assert!(matches!(admit(&B, half, 159 * S).0, Admit::Reject { .. }));
        assert_eq!(admit(&B, half, 160 * S).0, Admit::Probe(160 * S));
        // The late report of the first probe no longer decides.
        let (_, next) = admit(&B, half, 160 * S);
        assert_eq!(
            report(&B, next.unwrap(), 161 * S, false, Some(130 * S)),
            (None, false)
        );
    }

    #[test]
    fn states_round_trip_and_garbage_reads_as_closed() {
        let s = State {
            phase: Phase::HalfOpen,
            window_start_ns: 7,
            failures: 3,
            since_ns: u64::MAX,
        };
        assert_eq!(State::decode(&s.encode()), s);
        assert_eq!(State::decode(b"junk"), State::default());
        assert_eq!(State::decode(&[]), State::default());
    }
}
