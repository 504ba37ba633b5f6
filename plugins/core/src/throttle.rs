//! Warnings about a failing dependency (shared data down, a refused reply) come with every
//! request while it lasts; one line per interval per worker says the same, without letting the
//! log grow with the request rate.

use core::cell::Cell;

/// At most one warning per `every_ns`; the ones held back in between are counted and reported
/// with the next one that passes.
pub struct Throttle {
    every_ns: u64,
    next_ns: Cell<u64>,
    held: Cell<u64>,
}

impl Throttle {
    pub fn new(every_ns: u64) -> Throttle {
        Throttle {
            every_ns,
            next_ns: Cell::new(0),
            held: Cell::new(0),
        }
    }

    /// `Some(held back since the last one)` when a warning may be logged at `now_ns`.
    pub fn pass(&self, now_ns: u64) -> Option<u64> {
        if now_ns < self.next_ns.get() {
            self.held.set(self.held.get().saturating_add(1));
            return None;
        }
        self.next_ns.set(now_ns.saturating_add(self.every_ns));
        Some(self.held.replace(0))
    }
}

impl Default for Throttle {
    /// One line per 10 s.
    fn default() -> Throttle {
        Throttle::new(10_000_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t = Throttle::new(10);
        assert_eq!(t.pass(100), Some(0));
        for now in 101..110 {
            assert_eq!(t.pass(now), None);
        }
        assert_eq!(t.pass(110), Some(9));
        assert_eq!(t.pass(111), None);
        assert_eq!(t.pass(500), Some(1));
    }
}
