//! A bounded table of records in a [`SlotStore`], for plugins that remember something per
//! client key across workers (cached responses, idempotency records).
//!
//! Shared data has no delete, so the table owns a fixed set of keys: `slots` index slots
//! (`<ns>i/<n>`, small records), one body key per slot (`<ns>b/<n>`, the large payload, read
//! only when needed) and one `<ns>bytes` key counting the body bytes held. A record lives in
//! one of [`PROBES`] slots chosen by its key hash. The number of keys never exceeds
//! `2 × slots + 1` and the bytes never exceed `max_bytes`, however many distinct keys clients
//! send; to make room the oldest record that is not pinned goes (among the probed slots for
//! an index slot, among a sample of [`SAMPLE`] slots for bytes, like Redis's sampled LRU).
//!
//! Claiming a key is atomic across workers even though records can sit in different slots:
//! after a claim wins its slot, it reads the other probed slots, and yields if the same key
//! was claimed there too. Of two racing claims the later check sees the earlier write, so at
//! most one wins (both may yield, which callers treat as "in use": safe, and rare).

use crate::store::{
    contended, get_or_create, update, update_or_create, Entry, SlotStore, StoreError, Write,
};

/// Slots a key may occupy.
pub const PROBES: u64 = 4;
/// Slots sampled (at random) per round when making room for bytes.
pub const SAMPLE: u32 = 8;
const ATTEMPTS: u32 = 16;
const HEAD: usize = 21;

/// What an index slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key hash (never 0).
    pub key: u64,
    /// When it was written; the age for eviction, and the body's binding.
    pub at_ns: u64,
    /// Never evicted to make room (e.g. an idempotency claim in flight).
    pub pinned: bool,
    /// Bytes held in the slot's body key (set by [`Table::put_body`]).
    pub body_len: u32,
    /// The plugin's own small data.
    pub meta: Vec<u8>,
}

impl Record {
    pub fn new(key: u64, at_ns: u64, pinned: bool, meta: Vec<u8>) -> Record {
        Record {
            key,
            at_ns,
            pinned,
            body_len: 0,
            meta,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + self.meta.len());
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.at_ns.to_le_bytes());
        out.push(u8::from(self.pinned));
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.meta);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let key = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let at_ns = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let pinned = *bytes.get(16)? == 1;
        let body_len = u32::from_le_bytes(bytes.get(17..21)?.try_into().ok()?);
        (key != 0).then(|| Record {
            key,
            at_ns,
            pinned,
            body_len,
            meta: bytes.get(HEAD..).unwrap_or_default().to_vec(),
        })
    }
}

/// A record as read, with what is needed to change it only if nobody else did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub slot: u32,
    pub record: Record,
    version: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The record is now ours.
    Won(Found),
    /// The key already has a record (possibly a claim racing with ours).
    Exists(Found),
    /// Every probed slot holds a record that may not be evicted.
    Full,
}

pub struct Table {
    ns: String,
    /// `<ns>i/` and `<ns>b/`, the prefixes of index and body keys.
    index_prefix: String,
    body_prefix: String,
    slots: u32,
    max_bytes: u64,
    evictions: std::cell::Cell<u64>,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl Table {
    /// `ns` prefixes every key (end it with `/`); `slots` ≥ 1.
    pub fn new(ns: &str, slots: u32, max_bytes: u64) -> Table {
        Table {
            index_prefix: format!("{ns}i/"),
            body_prefix: format!("{ns}b/"),
            ns: ns.to_string(),
            slots: slots.max(1),
            max_bytes,
            evictions: std::cell::Cell::new(0),
        }
    }

    fn index_key(&self, slot: u32) -> String {
        crate::text::key(&self.index_prefix, u64::from(slot))
    }

    fn body_key(&self, slot: u32) -> String {
        crate::text::key(&self.body_prefix, u64::from(slot))
    }

    fn bytes_key(&self) -> String {
        format!("{}bytes", self.ns)
    }

    /// The distinct slots `key` may occupy, in probe order.
    pub fn probes(&self, key: u64) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::with_capacity(PROBES as usize);
        for p in 0..PROBES {
            let s = u32::try_from(
                mix(key ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % u64::from(self.slots),
            )
            .unwrap_or(0);
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    fn read(&self, store: &impl SlotStore, slot: u32) -> Result<Entry, StoreError> {
        get_or_create(store, &self.index_key(slot), &[])
    }

    /// The record for `key`, if any.
    pub fn find(&self, store: &impl SlotStore, key: u64) -> Result<Option<Found>, StoreError> {
        for slot in self.probes(key) {
            let e = self.read(store, slot)?;
            if let Some(record) = Record::decode(&e.value).filter(|r| r.key == key) {
                return Ok(Some(Found {
                    slot,
                    record,
                    version: e.version,
                }));
            }
        }
        Ok(None)
    }

    /// Installs `record` for its key unless the key has one: into an empty probed slot, else
    /// over the oldest probed record that `evictable` allows (its body is freed).
    pub fn claim(
        &self,
        store: &impl SlotStore,
        record: Record,
        evictable: impl Fn(&Record) -> bool,
    ) -> Result<Claim, StoreError> {
        let probes = self.probes(record.key);
        for _ in 0..ATTEMPTS {
            let mut target: Option<(u32, Option<Record>, u32)> = None;
            let mut existing = None;
            for &slot in &probes {
                let e = self.read(store, slot)?;
                let r = Record::decode(&e.value);
                match r {
                    Some(r) if r.key == record.key => {
                        existing = Some(Found {
                            slot,
                            record: r,
                            version: e.version,
                        });
                        break;
                    }
                    None => {
                        if !matches!(target, Some((_, None, _))) {
                            target = Some((slot, None, e.version));
                        }
                    }
                    Some(r) if evictable(&r) && !r.pinned => {
                        let older = match &target {
                            None => true,
                            Some((_, Some(t), _)) => r.at_ns < t.at_ns,
                            Some((_, None, _)) => false,
                        };
                        if older {
                            target = Some((slot, Some(r), e.version));
                        }
                    }
                    Some(_) => {}
                }
            }
            if let Some(f) = existing {
                return Ok(Claim::Exists(f));
            }
            let Some((slot, victim, version)) = target else {
                return Ok(Claim::Full);
            };
            let mut mine = record.clone();
            mine.body_len = 0;
            if store.compare_and_swap(&self.index_key(slot), &mine.encode(), version)?
                == Write::Conflict
            {
                continue;
            }
            if let Some(v) = victim {
                self.evicted();
                self.free_body(store, slot, &v)?;
            }
            // The version to act on later must be that of our own write: if another worker
            // already replaced it, the claim is lost and is tried again.
            let now = self.read(store, slot)?;
            if now.value != mine.encode() {
                continue;
            }
            let won = Found {
                slot,
                version: now.version,
                record: mine,
            };
            // A racing claim of the same key in another probed slot: the later check yields.
            for &other in probes.iter().filter(|s| **s != slot) {
                let e = self.read(store, other)?;
                if let Some(r) = Record::decode(&e.value).filter(|r| r.key == record.key) {
                    self.release(store, &won)?;
                    return Ok(Claim::Exists(Found {
                        slot: other,
                        record: r,
                        version: e.version,
                    }));
                }
            }
            return Ok(Claim::Won(won));
        }
        Err(contended(ATTEMPTS))
    }

    /// Replaces the record read as `found` (same body), unless someone changed it since:
    /// then `None`.
    pub fn replace(
        &self,
        store: &impl SlotStore,
        found: &Found,
        mut record: Record,
    ) -> Result<Option<Found>, StoreError> {
        record.body_len = found.record.body_len;
        record.at_ns = found.record.at_ns;
        self.write(store, found, record)
    }

    fn write(
        &self,
        store: &impl SlotStore,
        found: &Found,
        record: Record,
    ) -> Result<Option<Found>, StoreError> {
        let key = self.index_key(found.slot);
        let encoded = record.encode();
        if store.compare_and_swap(&key, &encoded, found.version)? == Write::Conflict {
            return Ok(None);
        }
        // Only a read-back of our own bytes proves the version is ours to act on.
        Ok(store
            .get(&key)?
            .filter(|e| e.value == encoded)
            .map(|e| Found {
                slot: found.slot,
                record,
                version: e.version,
            }))
    }

    /// Empties the slot if it still holds what was read as `found`; frees its body.
    pub fn release(&self, store: &impl SlotStore, found: &Found) -> Result<bool, StoreError> {
        if store.compare_and_swap(&self.index_key(found.slot), &[], found.version)?
            == Write::Conflict
        {
            return Ok(false);
        }
        self.free_body(store, found.slot, &found.record)?;
        Ok(true)
    }

    /// Stores `body` for the record read as `found` and replaces the record with `record`
    /// (whose `at_ns` the body is bound to). `None` when the record changed meanwhile or no
    /// room can be made within `max_bytes`; the table is unchanged then.
    ///
    /// The record is replaced first (that is what proves ownership), then the body is written,
    /// only while the record is still ours: a writer that lost its slot never overwrites the
    /// new owner's body. Between the two writes a reader finds the record without its body.
    pub fn put_body(
        &self,
        store: &impl SlotStore,
        found: &Found,
        mut record: Record,
        body: &[u8],
    ) -> Result<Option<Found>, StoreError> {
        let len = u32::try_from(body.len()).map_err(|_| StoreError("body too large".into()))?;
        if u64::from(len) > self.max_bytes {
            return Ok(None);
        }
        // The new body replaces the record's old one: only a growth is reserved (before the
        // write, undone if the write loses); a shrink is counted once the write has won, so
        // the count never dips below what is held.
        let delta = i64::from(len) - i64::from(found.record.body_len);
        if delta > 0 && !self.reserve(store, delta.unsigned_abs(), found.slot)? {
            return Ok(None);
        }
        let mut value = Vec::with_capacity(16 + body.len());
        value.extend_from_slice(&record.key.to_le_bytes());
        value.extend_from_slice(&record.at_ns.to_le_bytes());
        value.extend_from_slice(body);
        record.body_len = len;
        let index_key = self.index_key(found.slot);
        let encoded = record.encode();
        if store.compare_and_swap(&index_key, &encoded, found.version)? == Write::Conflict {
            if delta > 0 {
                self.add_bytes(store, -delta)?;
            }
            return Ok(None);
        }
        if delta < 0 {
            self.add_bytes(store, delta)?;
        }
        let body_key = self.body_key(found.slot);
        for _ in 0..ATTEMPTS {
            let current = get_or_create(store, &body_key, &[])?;
            // Our own bytes still in the index prove the slot is ours (and give the version
            // to act on later); a record's bytes name its key and write time.
            let Some(owner) = store.get(&index_key)?.filter(|e| e.value == encoded) else {
                // Replaced meanwhile: whoever evicted it gave its bytes back.
                return Ok(None);
            };
            if store.compare_and_swap(&body_key, &value, current.version)? == Write::Done {
                return Ok(Some(Found {
                    slot: found.slot,
                    record,
                    version: owner.version,
                }));
            }
        }
        Err(contended(ATTEMPTS))
    }

    /// The body stored for the record read as `found`.
    pub fn body(
        &self,
        store: &impl SlotStore,
        found: &Found,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if found.record.body_len == 0 {
            return Ok(None);
        }
        let Some(e) = store.get(&self.body_key(found.slot))? else {
            return Ok(None);
        };
        let at = found.record.at_ns.to_le_bytes();
        Ok(bound_to(&e.value, &found.record.key, Some(&at[..]))
            .then(|| e.value.get(16..).unwrap_or_default().to_vec()))
    }

    fn evicted(&self) {
        self.evictions.set(self.evictions.get().saturating_add(1));
    }

    /// Records this table removed to make room since the last call (for a metric).
    pub fn take_evictions(&self) -> u64 {
        self.evictions.replace(0)
    }

    /// Body bytes held now.
    pub fn used_bytes(&self, store: &impl SlotStore) -> Result<u64, StoreError> {
        Ok(store
            .get(&self.bytes_key())?
            .map_or(0, |e| read_u64(&e.value)))
    }

    fn free_body(&self, store: &impl SlotStore, slot: u32, old: &Record) -> Result<(), StoreError> {
        if old.body_len == 0 {
            return Ok(());
        }
        let at = old.at_ns.to_le_bytes();
        let body_key = self.body_key(slot);
        if store.get(&body_key)?.is_some() {
            update(store, &body_key, ATTEMPTS, |v| {
                bound_to(v, &old.key, Some(&at[..])).then(Vec::new)
            })?;
        }
        self.add_bytes(store, -i64::from(old.body_len))
    }

    fn add_bytes(&self, store: &impl SlotStore, delta: i64) -> Result<(), StoreError> {
        if delta == 0 {
            return Ok(());
        }
        let key = self.bytes_key();
        update_or_create(store, &key, &0u64.to_le_bytes(), ATTEMPTS, |v| {
            Some(
                read_u64(v)
                    .saturating_add_signed(delta)
                    .to_le_bytes()
                    .to_vec(),
            )
        })?;
        Ok(())
    }

    /// Counts `n` more bytes, evicting the oldest unpinned bodies (never `keep`'s) until they
    /// fit. False when no room could be made.
    fn reserve(&self, store: &impl SlotStore, n: u64, keep: u32) -> Result<bool, StoreError> {
        if n > self.max_bytes {
            return Ok(false);
        }
        let key = self.bytes_key();
        for round in 0..u64::from(SAMPLE) {
            let taken = update_or_create(store, &key, &0u64.to_le_bytes(), ATTEMPTS, |v| {
                let used = read_u64(v);
                used.checked_add(n)
                    .filter(|t| *t <= self.max_bytes)
                    .map(|t| t.to_le_bytes().to_vec())
            })?;
            if taken.is_some() {
                return Ok(true);
            }
            // Evict the oldest body among a sample of slots.
            let start = mix(self.used_bytes(store)? ^ n ^ u64::from(keep) ^ (round << 40));
            let mut victim: Option<Found> = None;
            for i in 0..u64::from(SAMPLE) {
                let slot =
                    u32::try_from(mix(start.wrapping_add(i)) % u64::from(self.slots)).unwrap_or(0);
                if slot == keep {
                    continue;
                }
                let Some(e) = store.get(&self.index_key(slot))? else {
                    continue;
                };
                if let Some(r) = Record::decode(&e.value) {
                    if !r.pinned
                        && r.body_len > 0
                        && victim.as_ref().is_none_or(|v| r.at_ns < v.record.at_ns)
                    {
                        victim = Some(Found {
                            slot,
                            record: r,
                            version: e.version,
                        });
                    }
                }
            }
            if let Some(v) = victim {
                if self.release(store, &v)? {
                    self.evicted();
                }
            }
        }
        Ok(false)
    }
}

fn read_u64(v: &[u8]) -> u64 {
    crate::store::read_u64(v, 0).unwrap_or(0)
}

/// Whether a body value belongs to the record with this key (and `at`, when given).
fn bound_to(value: &[u8], key: &u64, at: Option<&[u8]>) -> bool {
    value.get(0..8) == Some(&key.to_le_bytes()[..])
        && at.is_none_or(|a| value.get(8..16) == Some(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn rec(key: u64, at: u64) -> Record {
        Record::new(key, at, false, b"m".to_vec())
    }

    fn won(c: Claim) -> Found {
        match c {
            Claim::Won(f) => f,
            other => panic!("expected a win, got {other:?}"),
        }
    }

    #[test]
    fn a_claimed_key_is_found_and_a_second_claim_sees_it() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 64, 1000);
        let f = won(t.claim(&s, rec(7, 1), |_| true).unwrap());
        assert_eq!(t.find(&s, 7).unwrap().unwrap().record.meta, b"m");
        assert!(
            matches!(t.claim(&s, rec(7, 2), |_| true).unwrap(), Claim::Exists(e) if e.slot == f.slot)
        );
        assert!(t.find(&s, 8).unwrap().is_none());
    }

    #[test]
    fn bodies_round_trip_and_bytes_are_counted_and_freed() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 64, 1000);
        let f = won(t.claim(&s, rec(7, 1), |_| true).unwrap());
        let f = t.put_body(&s, &f, rec(7, 5), b"hello").unwrap().unwrap();
        assert_eq!(t.body(&s, &f).unwrap().unwrap(), b"hello");
        assert_eq!(t.used_bytes(&s).unwrap(), 5);
        // Replacing the body counts only the new one.
        let f = t.put_body(&s, &f, rec(7, 6), b"hi").unwrap().unwrap();
        assert_eq!(t.used_bytes(&s).unwrap(), 2);
        assert!(t.release(&s, &f).unwrap());
        assert_eq!(t.used_bytes(&s).unwrap(), 0);
        assert!(t.find(&s, 7).unwrap().is_none());
    }

    #[test]
    fn a_stale_handle_changes_nothing() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 64, 1000);
        let f = won(t.claim(&s, rec(7, 1), |_| true).unwrap());
        let newer = t.replace(&s, &f, rec(7, 1)).unwrap().unwrap();
        assert_eq!(t.put_body(&s, &f, rec(7, 2), b"x").unwrap(), None);
        assert!(!t.release(&s, &f).unwrap());
        assert_eq!(t.used_bytes(&s).unwrap(), 0);
        assert!(t.release(&s, &newer).unwrap());
    }

    #[test]
    fn a_writer_that_lost_its_slot_never_overwrites_the_new_owners_body() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 1, 1000);
        let stale = won(t.claim(&s, rec(7, 1), |_| true).unwrap());
        assert!(t.release(&s, &stale).unwrap());
        let owner = won(t.claim(&s, rec(7, 2), |_| true).unwrap());
        let owner = t.put_body(&s, &owner, rec(7, 3), b"new").unwrap().unwrap();
        assert_eq!(t.put_body(&s, &stale, rec(7, 4), b"old").unwrap(), None);
        assert_eq!(t.body(&s, &owner).unwrap().unwrap(), b"new");
        assert_eq!(t.used_bytes(&s).unwrap(), 3);
    }

    #[test]
    fn the_oldest_probed_record_makes_room_and_pinned_ones_never_do() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 1, 1000);
        let a = won(t.claim(&s, rec(1, 10), |_| true).unwrap());
        t.put_body(&s, &a, rec(1, 10), b"aaaa").unwrap().unwrap();
        won(t.claim(&s, rec(2, 20), |_| true).unwrap());
        assert!(t.find(&s, 1).unwrap().is_none(), "evicted");
        assert_eq!(t.take_evictions(), 1);
        assert_eq!(t.take_evictions(), 0);
        assert_eq!(t.used_bytes(&s).unwrap(), 0, "its body was freed");
        let pinned = Record::new(3, 30, true, vec![]);
        won(t.claim(&s, pinned, |_| true).unwrap());
        assert_eq!(t.claim(&s, rec(4, 40), |_| true).unwrap(), Claim::Full);
        assert!(t.find(&s, 3).unwrap().is_some());
    }

    #[test]
    fn bytes_stay_within_the_bound_by_evicting_old_bodies() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 16, 100);
        let mut stored = 0;
        for k in 1..=200u64 {
            let f = won(t.claim(&s, rec(k, k), |_| true).unwrap());
            // Room is made for every new body by evicting old ones.
            let kept = t.put_body(&s, &f, rec(k, k), &[b'x'; 30]).unwrap();
            stored += usize::from(kept.is_some());
            assert!(t.used_bytes(&s).unwrap() <= 100);
        }
        assert!(stored > 190, "only {stored} of 200 bodies found room");
        assert!(s.len() <= 2 * 16 + 1, "keys: {}", s.len());
        let newest = t.find(&s, 200).unwrap().unwrap();
        assert_eq!(t.body(&s, &newest).unwrap(), Some(vec![b'x'; 30]));
        let with_bodies = (1..=200u64)
            .filter_map(|k| t.find(&s, k).unwrap())
            .filter(|f| t.body(&s, f).unwrap().is_some())
            .count();
        assert!(
            (1..=3).contains(&with_bodies),
            "{with_bodies} bodies of 30 bytes in 100"
        );
        // Larger than the whole budget: refused, nothing evicted for it.
        let f = t.find(&s, 200).unwrap().unwrap();
        assert_eq!(t.put_body(&s, &f, rec(200, 201), &[0; 101]).unwrap(), None);
    }

    type Hook = Box<dyn FnOnce(&MemoryStore)>;

    /// A store where another worker writes right after this worker's first successful
    /// compare-and-swap (between its claim and its check), or its first to `on` when set.
    struct Racing {
        inner: MemoryStore,
        on: Option<String>,
        then: std::cell::RefCell<Option<Hook>>,
    }

    impl SlotStore for Racing {
        fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
            self.inner.get(key)
        }
        fn compare_and_swap(&self, key: &str, v: &[u8], version: u32) -> Result<Write, StoreError> {
            let w = self.inner.compare_and_swap(key, v, version)?;
            if w == Write::Done && self.on.as_deref().is_none_or(|k| k == key) {
                if let Some(f) = self.then.borrow_mut().take() {
                    f(&self.inner);
                }
            }
            Ok(w)
        }
        fn create(&self, key: &str, v: &[u8]) -> Result<Write, StoreError> {
            self.inner.create(key, v)
        }
    }

    #[test]
    fn of_two_claims_racing_into_different_probe_slots_at_most_one_wins() {
        let t = Table::new("t/", 1024, 1000);
        let probes = t.probes(9);
        let (Some(&first), Some(&second)) = (probes.first(), probes.get(1)) else {
            panic!("fewer than two probe slots")
        };
        // The other worker saw the first probe slot busy (a record that has since been
        // evicted) and claimed key 9 in the second, just after this worker won the first.
        let s = Racing {
            inner: MemoryStore::new(),
            on: None,
            then: std::cell::RefCell::new(None),
        };
        let index_key = t.index_key(second);
        *s.then.borrow_mut() = Some(Box::new(move |m: &MemoryStore| {
            let e = get_or_create(m, &index_key, &[]).unwrap();
            let theirs = Record::new(9, 1, true, b"theirs".to_vec());
            m.compare_and_swap(&index_key, &theirs.encode(), e.version)
                .unwrap();
        }));
        let c = t.claim(&s, rec(9, 2), |_| true).unwrap();
        assert!(
            matches!(&c, Claim::Exists(f) if f.slot == second && f.record.meta == b"theirs"),
            "{c:?}"
        );
        let mine = Record::decode(&s.inner.get(&t.index_key(first)).unwrap().unwrap().value);
        assert_eq!(mine, None, "the yielding claim gave its slot back");
        // Without the race the same claim wins.
        let s = MemoryStore::new();
        won(t.claim(&s, rec(9, 2), |_| true).unwrap());
    }

    #[test]
    fn a_record_replaced_right_after_its_write_is_not_handed_out_as_ours() {
        let t = Table::new("t/", 1, 1000);
        let index_key = t.index_key(0);
        let overwrite = |m: &MemoryStore| {
            let e = m.get("t/i/0").unwrap().unwrap();
            let theirs = Record::new(99, 5, false, b"theirs".to_vec());
            m.compare_and_swap("t/i/0", &theirs.encode(), e.version)
                .unwrap();
        };
        // A claim whose slot is taken by another worker between its write and read-back.
        let s = Racing {
            inner: MemoryStore::new(),
            on: None,
            then: std::cell::RefCell::new(Some(Box::new(overwrite))),
        };
        assert_eq!(
            t.claim(&s, rec(7, 1), |r| r.key != 99).unwrap(),
            Claim::Full
        );
        assert_eq!(t.find(&s, 99).unwrap().unwrap().record.meta, b"theirs");
        // A replace likewise: the handle it returns would act on the other record.
        let s = Racing {
            inner: MemoryStore::new(),
            on: None,
            then: std::cell::RefCell::new(None),
        };
        let f = won(t.claim(&s, rec(7, 1), |_| true).unwrap());
        *s.then.borrow_mut() = Some(Box::new(overwrite));
        assert_eq!(t.replace(&s, &f, rec(7, 1)).unwrap(), None);
        assert!(
            t.find(&s, 99).unwrap().is_some(),
            "{index_key} kept the other record"
        );
    }

    #[test]
    fn a_record_evicted_between_its_write_and_its_body_counts_its_bytes_once() {
        let t = Table::new("t/", 1024, 1000);
        let s = MemoryStore::new();
        let a = won(t.claim(&s, rec(1, 1), |_| true).unwrap());
        t.put_body(&s, &a, rec(1, 1), &[7; 50]).unwrap().unwrap();
        let b = won(t.claim(&s, rec(2, 2), |_| true).unwrap());
        let index_key = t.index_key(b.slot);
        // Another worker evicts B right after B's record is written, before its body is:
        // it gives back the 30 bytes B's record declares.
        let evict = {
            let index_key = index_key.clone();
            move |m: &MemoryStore| {
                let t = Table::new("t/", 1024, 1000);
                let e = m.get(&index_key).unwrap().unwrap();
                let theirs = Record::new(3, 3, false, Vec::new());
                m.compare_and_swap(&index_key, &theirs.encode(), e.version)
                    .unwrap();
                t.add_bytes(m, -30).unwrap();
            }
        };
        let r = Racing {
            inner: s,
            on: Some(index_key),
            then: std::cell::RefCell::new(Some(Box::new(evict))),
        };
        assert_eq!(t.put_body(&r, &b, rec(2, 2), &[9; 30]).unwrap(), None);
        assert_eq!(t.used_bytes(&r).unwrap(), 50, "A's body alone is held");
        assert_eq!(t.find(&r, 2).unwrap(), None);
        let a = t.find(&r, 1).unwrap().unwrap();
        assert_eq!(t.body(&r, &a).unwrap(), Some(vec![7; 50]));
    }

    #[test]
    fn garbage_in_a_slot_reads_as_empty() {
        let s = MemoryStore::new();
        let t = Table::new("t/", 1, 1000);
        s.create("t/i/0", b"junk").unwrap();
        assert!(t.find(&s, 1).unwrap().is_none());
        won(t.claim(&s, rec(1, 1), |_| true).unwrap());
    }
}
