//! What an idempotency record says (kept in the record table's `meta`), and how old it may be.

use alloc::vec;
use alloc::vec::Vec;
/// A record's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Claimed by a request that is still running.
    InFlight,
    /// Completed; the response is kept in the record's body.
    Done,
    /// Completed, but the response could not be kept (larger than the store allows):
    /// duplicates are refused rather than executed again.
    DoneWithoutResponse,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub state: State,
    /// SHA-256 of the request body, when fingerprints are on.
    pub fingerprint: Option<[u8; 32]>,
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![match self.state {
            State::InFlight => 1,
            State::Done => 2,
            State::DoneWithoutResponse => 3,
        }];
        if let Some(fp) = self.fingerprint {
            out.extend_from_slice(&fp);
        }
        out
    }

    /// `None` for bytes that are not a record of ours.
    pub fn decode(bytes: &[u8]) -> Option<Meta> {
        let (first, rest) = bytes.split_first()?;
        let state = match first {
            1 => State::InFlight,
            2 => State::Done,
            3 => State::DoneWithoutResponse,
            _ => return None,
        };
        let fingerprint = match rest.len() {
            0 => None,
            32 => Some(rest.try_into().ok()?),
            _ => return None,
        };
        Some(Meta { state, fingerprint })
    }
}

/// What a record found for a key means now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Age {
    /// In flight for less than `inFlightTimeout`, or completed less than `ttl` ago.
    Live,
    /// A claim older than `inFlightTimeout` (its worker is gone or stuck), or a completed
    /// record older than `ttl`: the key is free again.
    Over,
}

/// `at_ns` is when the record was written; a clock that went back counts as no time passed.
pub fn age(state: State, at_ns: u64, now_ns: u64, ttl_ns: u64, in_flight_timeout_ns: u64) -> Age {
    let limit = match state {
        State::InFlight => in_flight_timeout_ns,
        State::Done | State::DoneWithoutResponse => ttl_ns,
    };
    if now_ns.saturating_sub(at_ns) >= limit {
        Age::Over
    } else {
        Age::Live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_foreign_bytes_are_refused() {
        for m in [
            Meta {
                state: State::InFlight,
                fingerprint: Some([7; 32]),
            },
            Meta {
                state: State::Done,
                fingerprint: None,
            },
            Meta {
                state: State::DoneWithoutResponse,
                fingerprint: Some([0; 32]),
            },
        ] {
            assert_eq!(Meta::decode(&m.encode()), Some(m));
        }
        assert_eq!(Meta::decode(b""), None);
        assert_eq!(Meta::decode(&[9]), None);
        assert_eq!(Meta::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn claims_time_out_and_completed_records_expire() {
        let (ttl, timeout) = (1000, 10);
        assert_eq!(age(State::InFlight, 100, 109, ttl, timeout), Age::Live);
        assert_eq!(age(State::InFlight, 100, 110, ttl, timeout), Age::Over);
        assert_eq!(age(State::Done, 100, 1099, ttl, timeout), Age::Live);
        assert_eq!(age(State::Done, 100, 1100, ttl, timeout), Age::Over);
        assert_eq!(
            age(State::DoneWithoutResponse, 100, 1100, ttl, timeout),
            Age::Over
        );
        assert_eq!(
            age(State::InFlight, 100, 5, ttl, timeout),
            Age::Live,
            "clock went back"
        );
    }
}
