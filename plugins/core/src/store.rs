//! The cross-worker state store, as one small trait so policies never see a hostcall and a
//! distributed backend can be added later without touching them.
//!
//! The semantics are proxy-wasm shared data's, the weakest store we run on: values carry a
//! version; a write names the version it read and loses if someone wrote in between; there is
//! no delete. Envoy's compare-and-swap does not protect a key that does not exist yet, so
//! creation is its own operation ([`SlotStore::create`]) and policies keep a fixed, bounded set
//! of keys that they create before use and then only ever compare-and-swap.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

/// A stored value and the version to name when replacing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub version: u32,
}

/// The outcome of a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Someone else wrote first (or, for `create`, the key already exists): read again.
    Conflict,
}

/// The store cannot be read or written; the plugin's `failureMode` decides what happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError(pub String);

impl core::fmt::Display for StoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

pub trait SlotStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Replaces the value if the key is still at `version`.
    fn compare_and_swap(&self, key: &str, value: &[u8], version: u32) -> Result<Write, StoreError>;
    /// Creates the key with `value` unless it exists (then `Conflict`, value untouched).
    fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError>;
}

/// Reads `key`, creating it with `initial` first if it does not exist yet.
pub fn get_or_create(
    store: &impl SlotStore,
    key: &str,
    initial: &[u8],
) -> Result<Entry, StoreError> {
    if let Some(e) = store.get(key)? {
        return Ok(e);
    }
    // Losing the creation race is fine: the winner's value is read below.
    store.create(key, initial)?;
    store
        .get(key)?
        .ok_or_else(|| StoreError(format!("{key} vanished after it was created")))
}

/// Read-modify-write of one existing key: `change` gets the current value and returns the new
/// one (`None`: leave it as it is); a lost compare-and-swap re-reads and tries again, at most
/// `attempts` times, after which the store counts as failing. Returns the value written.
pub fn update(
    store: &impl SlotStore,
    key: &str,
    attempts: u32,
    mut change: impl FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, StoreError> {
    for _ in 0..attempts {
        let Some(e) = store.get(key)? else {
            return Err(StoreError(format!("{key} is missing")));
        };
        let Some(new) = change(&e.value) else {
            return Ok(None);
        };
        if store.compare_and_swap(key, &new, e.version)? == Write::Done {
            return Ok(Some(new));
        }
    }
    Err(contended(attempts))
}

/// [`update`] of a key that is created with `initial` first if it does not exist yet: one read
/// and one write when it does (where [`get_or_create`] then [`update`] reads twice).
pub fn update_or_create(
    store: &impl SlotStore,
    key: &str,
    initial: &[u8],
    attempts: u32,
    mut change: impl FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, StoreError> {
    for _ in 0..attempts {
        let e = match store.get(key)? {
            Some(e) => e,
            None => get_or_create(store, key, initial)?,
        };
        let Some(new) = change(&e.value) else {
            return Ok(None);
        };
        if store.compare_and_swap(key, &new, e.version)? == Write::Done {
            return Ok(Some(new));
        }
    }
    Err(contended(attempts))
}

/// The little-endian u64 at `at` in a stored value (`None` when the value is too short).
pub fn read_u64(value: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    Some(u64::from_le_bytes(value.get(at..end)?.try_into().ok()?))
}

/// The error for a key that stayed contended through every attempt.
pub fn contended(attempts: u32) -> StoreError {
    StoreError(format!("gave up after {attempts} conflicting writes"))
}

/// An in-process store with Envoy's rules (versions from one counter that skips 0), for unit
/// tests. It can inject the failures a policy must survive: a competing write before the next
/// compare-and-swaps, and an unavailable store.
#[derive(Default)]
pub struct MemoryStore {
    data: RefCell<BTreeMap<String, Entry>>,
    next_version: Cell<u32>,
    /// The next N compare-and-swaps find that another worker wrote first.
    pub conflicts: Cell<u32>,
    /// Every operation fails while set.
    pub broken: Cell<bool>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.data.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn total_bytes(&self) -> usize {
        self.data
            .borrow()
            .iter()
            .map(|(k, e)| k.len() + e.value.len())
            .sum()
    }

    fn version(&self) -> u32 {
        let v = self.next_version.get().wrapping_add(1).max(1);
        self.next_version.set(v);
        v
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.broken.get() {
            Err(StoreError("store unavailable".into()))
        } else {
            Ok(())
        }
    }
}

impl SlotStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.check()?;
        Ok(self.data.borrow().get(key).cloned())
    }

    fn compare_and_swap(&self, key: &str, value: &[u8], version: u32) -> Result<Write, StoreError> {
        self.check()?;
        let v = self.version();
        let mut data = self.data.borrow_mut();
        let Some(entry) = data.get_mut(key) else {
            return Err(StoreError(format!("{key} does not exist")));
        };
        if self.conflicts.get() > 0 {
            self.conflicts.set(self.conflicts.get() - 1);
            entry.version = v;
            return Ok(Write::Conflict);
        }
        if entry.version != version {
            return Ok(Write::Conflict);
        }
        *entry = Entry {
            value: value.to_vec(),
            version: v,
        };
        Ok(Write::Done)
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError> {
        self.check()?;
        let v = self.version();
        let mut data = self.data.borrow_mut();
        if data.contains_key(key) {
            return Ok(Write::Conflict);
        }
        data.insert(
            key.to_string(),
            Entry {
                value: value.to_vec(),
                version: v,
            },
        );
        Ok(Write::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn a_stale_version_loses_and_the_winner_stays() {
        let s = MemoryStore::new();
        let e = get_or_create(&s, "k", b"0").unwrap();
        assert_eq!(s.compare_and_swap("k", b"1", e.version), Ok(Write::Done));
        assert_eq!(
            s.compare_and_swap("k", b"2", e.version),
            Ok(Write::Conflict)
        );
        assert_eq!(s.get("k").unwrap().unwrap().value, b"1");
    }

    #[test]
    fn update_retries_a_lost_write_and_gives_up_when_bounded() {
        let s = MemoryStore::new();
        get_or_create(&s, "n", &[1]).unwrap();
        let inc = |v: &[u8]| Some(vec![v.first().copied().unwrap_or(0) + 1]);
        s.conflicts.set(2);
        assert_eq!(update(&s, "n", 3, inc), Ok(Some(vec![2])));
        assert_eq!(update(&s, "n", 3, |_| None), Ok(None));
        s.conflicts.set(3);
        assert!(update(&s, "n", 3, inc).is_err());
        assert_eq!(
            s.get("n").unwrap().unwrap().value,
            vec![2],
            "nothing half-written"
        );
        assert!(update(&s, "absent", 3, inc).is_err());
    }

    #[test]
    fn update_or_create_starts_from_the_initial_value_once() {
        let s = MemoryStore::new();
        let inc = |v: &[u8]| Some(vec![v.first().copied().unwrap_or(0) + 1]);
        assert_eq!(update_or_create(&s, "n", &[5], 3, inc), Ok(Some(vec![6])));
        assert_eq!(update_or_create(&s, "n", &[5], 3, inc), Ok(Some(vec![7])));
        s.conflicts.set(3);
        assert!(update_or_create(&s, "n", &[5], 3, inc).is_err());
        assert_eq!(s.get("n").unwrap().unwrap().value, vec![7]);
    }

    #[test]
    fn create_never_overwrites() {
        let s = MemoryStore::new();
        assert_eq!(s.create("k", b"a"), Ok(Write::Done));
        assert_eq!(s.create("k", b"b"), Ok(Write::Conflict));
        assert_eq!(get_or_create(&s, "k", b"c").unwrap().value, b"a");
    }

    #[test]
    fn injected_conflicts_and_outages_are_reported() {
        let s = MemoryStore::new();
        let e = get_or_create(&s, "k", b"0").unwrap();
        s.conflicts.set(1);
        assert_eq!(
            s.compare_and_swap("k", b"1", e.version),
            Ok(Write::Conflict)
        );
        s.broken.set(true);
        assert!(s.get("k").is_err());
    }
}
