//! Counters, defined through the raw import (a refused definition is a missing
//! counter, never a trap) and incremented with [`crate::host::count`].

use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::hash::{BuildHasherDefault, Hasher};
use core::marker::PhantomData;
use hashbrown::HashMap;

use crate::ffi;
use crate::host::count;
use edge_core::metrics::{self, Counter};

/// A plugin's counters, the variants of its [`Counter`] enum: defined at configure time,
/// counted by variant. One set per prefix (`cached_fallback`, or `rate_limit.<rule>` per rule).
pub struct Counters<C> {
    ids: Vec<Option<u32>>,
    kind: PhantomData<C>,
}

impl<C> Default for Counters<C> {
    /// No counters (before the first configuration): adding counts nothing.
    fn default() -> Self {
        Counters {
            ids: Vec::new(),
            kind: PhantomData,
        }
    }
}

impl<C: Counter> Counters<C> {
    /// `<prefix>.<name>` for every counter of `C`.
    pub fn define(prefix: &str) -> Self {
        Self::define_sets(&[prefix])
    }

    /// One set of `C`'s counters for each prefix.
    pub fn define_sets(prefixes: &[impl AsRef<str>]) -> Self {
        Counters {
            ids: metrics::names::<C>(prefixes)
                .iter()
                .map(|n| ffi::define_counter(n))
                .collect(),
            kind: PhantomData,
        }
    }

    /// Adds `n` to `c` (of the first set).
    pub fn add(&self, c: C, n: u64) {
        self.add_in(0, c, n);
    }

    /// Adds `n` to `c` of set `set` (nothing for a set not defined, a refused definition or 0).
    pub fn add_in(&self, set: usize, c: C, n: u64) {
        if let (Some(Some(id)), true) = (self.ids.get(metrics::index(set, c)), n > 0) {
            count(*id, n);
        }
    }
}

/// Counters whose names come from data (e.g. the variants of a fetched flag file), defined on
/// first use. At most `cap` names get their own counter: a file that renames its variants on
/// every fetch cannot grow the host's stats without bound; later names count under `overflow`.
pub struct NamedCounters {
    ids: FnvMap<String, Option<u32>>,
    cap: usize,
    overflow: String,
}

/// FNV-1a for the names' map, looked up once per counted request. The names come from the
/// operator's own flag file and at most `cap` are kept, so a keyed hash (std's SipHash, several
/// times the instructions per name) would defend against nothing. The modules are `no_std`
/// (hashbrown has no default hasher): the bench's replay keys its maps with it too.
pub struct Fnv(u64);

/// A map keyed by [`Fnv`], for keys that are not client input.
pub type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;
/// A set keyed by [`Fnv`], for keys that are not client input.
pub type FnvSet<K> = hashbrown::HashSet<K, BuildHasherDefault<Fnv>>;

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl NamedCounters {
    pub fn new(cap: usize, overflow: &str) -> NamedCounters {
        NamedCounters {
            ids: HashMap::default(),
            cap,
            overflow: overflow.to_string(),
        }
    }

    /// The name counted for `name`: itself while there is room (or it already has a counter),
    /// else the overflow name.
    pub fn slot<'a>(&'a self, name: &'a str) -> &'a str {
        if self.ids.contains_key(name) || self.ids.len() < self.cap {
            name
        } else {
            &self.overflow
        }
    }

    pub fn add(&mut self, name: &str, n: u64) {
        if let (Some(id), true) = (self.id(name), n > 0) {
            count(id, n);
        }
    }

    /// The counter `name` counts under (defined on first use; `None` when the host refused
    /// it), for a caller that keeps it instead of looking the name up per request.
    pub fn id(&mut self, name: &str) -> Option<u32> {
        // A known name (every request once warm) is found without allocating.
        match self.ids.get(name) {
            Some(id) => *id,
            None => {
                let name = self.slot(name).to_string();
                *self
                    .ids
                    .entry(name)
                    .or_insert_with_key(|k| ffi::define_counter(k))
            }
        }
    }

    /// Adds `n` to a counter [`NamedCounters::id`] returned.
    pub fn add_id(&self, id: Option<u32>, n: u64) {
        if let (Some(id), true) = (id, n > 0) {
            count(id, n);
        }
    }

    /// Names with a counter of their own so far (the overflow name included once used).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn names_beyond_the_cap_share_the_overflow_counter() {
        let mut c = NamedCounters::new(3, "flags.other");
        for i in 0..100 {
            c.add(&format!("flags.v{i}"), 1);
        }
        // 3 own names, then everything else under the overflow name (the cap plus one).
        assert_eq!(c.len(), 4);
        assert_eq!(c.slot("flags.v0"), "flags.v0");
        assert_eq!(c.slot("flags.v99"), "flags.other");
    }
}
