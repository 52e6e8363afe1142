//! [`Table`]: the single-threaded part of a shard, behind its lock: the hash table of entries
//! and their dirty/epoch bookkeeping (what a write, a flusher snapshot and an
//! acknowledgement do to an entry).

use hashbrown::HashTable;

use super::durability::Undurable;
use super::entry::{
    deadline_of, prefetch_for_write, put_deadline, Entry, Side, HOT, IN_MAIN, LOCAL, REFRESHING,
};
use super::hot::{plain, HotReads};
use super::inflight::{Loading, Through};
use super::policy::{Limits, Queues};
use super::{NONE, NOT_QUEUED};
use crate::settings::RemovalCause;
use crate::store::Write;
use crate::sync::Arc;

/// Per-shard counters, bumped under the shard lock (so they cost no atomic operation).
/// `gets` is not counted: it is `hits + misses`.
///
/// `repr(C)`, the counters every get and put writes first: see [`Table`] for why.
#[derive(Default, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct ShardCounters {
    pub(crate) hits: u64,
    pub(crate) puts: u64,
    pub(crate) conflated: u64,
    pub(crate) removes: u64,
    pub(crate) misses: u64,
    pub(crate) loads: u64,
    pub(crate) evictions: u64,
    pub(crate) expirations: u64,
    pub(crate) refreshes: u64,
    pub(crate) refresh_failures: u64,
    pub(crate) load_waits: u64,
}

/// What a lookup found.
pub(crate) enum Lookup<V> {
    /// In memory: a value, or `None` (a pending or local delete, or a cached absence).
    Hit(Option<V>),
    /// In memory, and old enough that a refresh was scheduled: serve it, reload in the
    /// background. Carries the version the refresh must still find.
    HitRefresh(V, u64),
    /// Not in memory (or expired).
    Miss,
}

/// The single-threaded part of a shard.
///
/// The hash table `map` holds the entries ([`Entry`]) inline; their [`Side`] state sits at
/// each entry's slot of the `side` vector, whose free slots are kept in `free`. Inline, a
/// lookup follows two dependent loads (the control bytes, then the entry); a dense vector
/// behind an index of slot numbers would make it three.
///
/// Layout (`repr(C)`, and `lock_api::Mutex` keeps its raw lock first): what a hit reads and
/// writes, and what every put writes, fills the shard's first cache line with the lock word
/// (the table header, `hits`, `next_version`, `conflated`); the rest of the put path (the
/// dirty count, the open epoch, the flags, the loads-in-flight header) fills the second,
/// which a put only reads unless its entry turns dirty. A hit on a cache without time-based
/// rules so touches one line of the shard besides the entry's: each extra line of shard
/// state a get touches costs a cache miss per get once the entries no longer fit in the
/// cache. The put count is not stored: every
/// write takes one version, so it is the versions handed out less the removes and the
/// write-through versions ([`Table::counters`]). The cold state follows.
#[repr(C)]
pub(crate) struct Table<K, V> {
    pub(super) map: HashTable<Entry<K, V>>,
    pub(super) hits: u64,
    /// Next version to hand out; starts at the wall clock (see `Cache` docs) and only grows.
    pub(crate) next_version: u64,
    /// Writes that found their key already queued in the open epoch.
    pub(super) conflated: u64,
    // -- second line
    /// Entries that are dirty (`unsent != NONE || in_flight`).
    pub(crate) dirty: u32,
    /// The open epoch (starts at 1; [`NOT_QUEUED`] is never an epoch). A write pushes its
    /// key unless the entry was already queued in this epoch; the flusher closes it (one
    /// increment under this lock, [`Table::close_epoch`]) before it drains the ring.
    pub(super) epoch: u16,
    /// Backpressure: the table reached its dirty limit and admits no new dirty entry until
    /// it is back at the low watermark.
    pub(super) pressured: bool,
    /// A time-based rule is on or a weigher is set: a write updates the entry's [`Side`]
    /// (kept here so an update reads no cold line).
    pub(super) write_side: bool,
    /// Keys in `through` (kept here so a write-behind put reads no cold line to learn that
    /// no write-through is in flight).
    pub(super) throughs: u32,
    /// A removal listener is set: clean values that leave memory go to `departed` (kept
    /// here so a write reads no cold line to learn that there is none).
    pub(crate) listening: bool,
    /// Loads in flight (single-flight read-through).
    pub(super) loading: HashTable<Loading<K, V>>,
    // -- cold
    /// Keys with a write-through in flight ([`Table::begin_through`]).
    pub(super) through: HashTable<Through<K>>,
    /// The entries' side state (see [`Side`]), by slot.
    pub(super) side: Vec<Side>,
    /// Slots no entry holds.
    pub(super) free: Vec<u32>,
    /// The counters off the hot path (`hits` and `conflated` are kept above and `puts` is
    /// derived: they stay zero here; [`Table::counters`] joins them).
    pub(super) rare: ShardCounters,
    /// `next_version` when the table was built, plus the versions handed out since by
    /// [`Table::next_version`] that no [`Table::count_write_through`] counted (write-through
    /// writes in flight or failed): `next_version` less this is the writes accepted.
    pub(super) version_base: u64,
    /// Entries that are tombstones.
    pub(super) tombstones: usize,
    pub(super) limits: Limits,
    /// Sum of the entries' weights.
    pub(super) weight: u64,
    pub(super) queues: Queues<K>,
    /// The cache's hasher, to rehash keys when the table grows.
    pub(super) hasher: ahash::RandomState,
    /// Keys that left memory with a write the store does not hold ([`Undurable`]).
    pub(super) undurable: HashTable<Undurable<K>>,
    /// Versions at or below this may belong to a record that [`UNDURABLE_MAX`] pushed out:
    /// an absent key's write at or below it is never acknowledged.
    pub(super) undurable_floor: u64,
    /// The read slots that lock-free hits use ([`HotReads`]; the shard holds the same).
    /// Every slot write happens here, under the lock: a locked hit installs its entry, and
    /// every change or removal of an entry first clears the key's slot.
    pub(crate) hot: Arc<HotReads<K, V>>,
    /// Keys and values are plain and no time-based rule is on: the slots are in use.
    pub(crate) hot_on: bool,
    /// Slots in the current array (grown with the table).
    hot_len: usize,
    /// Each slot's deadline by a time to live of its own (0: none); kept only with
    /// `Limits::per_entry`, and only as long as the highest slot that had one.
    pub(super) deadlines: Vec<u64>,
    /// A time to live for the next write of this hold of the lock
    /// ([`Table::expire_next_write`]); 0: none.
    next_ttl: u64,
    /// Clean values that left memory, for the removal listener; the engine takes them
    /// under the lock and calls the listener after it ([`Table::take_departed`]).
    pub(crate) departed: Vec<(K, V, RemovalCause)>,
}

/// What a write under the lock decided.
pub(crate) struct WriteOutcome<K, V> {
    /// The version given to the write.
    pub(crate) version: u64,
    /// The replaced value, to drop after the lock is released.
    pub(crate) old: Option<V>,
    /// The key to push on the ring, if this is the key's first write in the open epoch.
    pub(crate) ring_key: Option<K>,
    /// The table is over its capacity because its dirty entries are pinned: the flusher
    /// should write early.
    pub(crate) over_capacity: bool,
    /// Values that left memory, for the removal listener (empty without one).
    pub(crate) departed: Vec<(K, V, RemovalCause)>,
}

/// A snapshot the flusher took: the write to send and the oldest version it covers.
pub(crate) struct Snapshot<K, V> {
    pub(crate) write: Write<K, V>,
    pub(crate) first: u64,
}

impl<K: Eq + Clone + std::hash::Hash, V: Clone> Table<K, V> {
    pub(crate) fn new(first_version: u64, limits: Limits, hasher: ahash::RandomState) -> Self {
        Table {
            map: HashTable::new(),
            hits: 0,
            next_version: first_version,
            conflated: 0,
            dirty: 0,
            epoch: 1,
            pressured: false,
            write_side: limits.timed() || limits.weighted,
            throughs: 0,
            listening: false,
            loading: HashTable::new(),
            through: HashTable::new(),
            side: Vec::new(),
            free: Vec::new(),
            rare: ShardCounters::default(),
            version_base: first_version,
            tombstones: 0,
            limits,
            weight: 0,
            queues: Queues::default(),
            hasher,
            undurable: HashTable::new(),
            undurable_floor: 0,
            hot: Arc::new(HotReads::default()),
            hot_on: plain::<K>() && plain::<V>() && !limits.timed(),
            departed: Vec::new(),
            next_ttl: 0,
            deadlines: Vec::new(),
            hot_len: 0,
        }
    }

    /// Empties the read slot of an entry about to change or leave, if the entry was copied
    /// there (its [`HOT`] flag; see [`HotReads`]).
    #[inline(always)]
    fn unhot(hot: &HotReads<K, V>, hash: u64, e: &mut Entry<K, V>) {
        if e.flag(HOT) {
            e.set_flag(HOT, false);
            hot.clear(hash, &e.key);
        }
    }

    /// The shard's counters.
    pub(crate) fn counters(&self) -> ShardCounters {
        ShardCounters {
            hits: self.hits,
            // Each write through `begin_write` took one version and counted a put or a
            // remove.
            puts: self.next_version - self.version_base - self.rare.removes,
            conflated: self.conflated,
            ..self.rare
        }
    }

    /// Live (non-tombstone) entries that have not expired at coarse time `now`.
    pub(crate) fn len(&self, now: u64) -> usize {
        if !self.limits.timed() {
            return self.map.len() - self.tombstones;
        }
        self.map
            .iter()
            .filter(|e| !e.is_tombstone() && !self.expired_at(e, now))
            .count()
    }

    /// The entry of `key`, if the table holds it.
    #[inline(always)]
    pub(super) fn find(&self, hash: u64, key: &K) -> Option<&Entry<K, V>> {
        self.map.find(hash, |e| e.key == *key)
    }

    /// Looks a key up in a table without time-based rules (the caller knows: no TTL, TTI,
    /// negative caching or refresh-ahead); `bounded` says the table evicts, so a hit counts
    /// for the entry's frequency. `None` is a miss, counted. Reads the table's first line and
    /// the entry, nothing else.
    #[inline(always)]
    pub(crate) fn get_untimed(&mut self, hash: u64, key: &K, bounded: bool) -> Option<Option<V>> {
        debug_assert!(!self.limits.timed(), "a timed table goes through `get`");
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            self.rare.misses += 1;
            return None;
        };
        self.hits += 1;
        if bounded {
            e.bump_freq();
        }
        if self.hot_on {
            // The entry as it is now, under the lock: lock-free hits of the key read it.
            self.hot.install(hash, key, e.value());
            e.set_flag(HOT, true);
        }
        Some(e.value().cloned())
    }

    /// Looks a key up at coarse time `now`.
    #[inline]
    pub(crate) fn get(&mut self, hash: u64, key: &K, now: u64) -> Lookup<V> {
        let limits = self.limits;
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            self.rare.misses += 1;
            return Lookup::Miss;
        };
        let side = &mut self.side[e.slot as usize];
        if (limits.ttl | limits.tti | limits.negative_ttl) != 0
            && Self::expired(&limits, e, side, deadline_of(&self.deadlines, e.slot), now)
        {
            self.rare.expirations += 1;
            self.rare.misses += 1;
            self.remove_entry(hash, key, Some(RemovalCause::Expired));
            return Lookup::Miss;
        }
        self.hits += 1;
        if limits.bounded() {
            // Only a bounded table evicts: an unbounded one does not write the entry's line.
            e.bump_freq();
        }
        if limits.tti != 0 {
            side.accessed = now;
        }
        if limits.refresh_after != 0
            && !e.flag(REFRESHING)
            && !e.is_dirty()
            && now >= side.born.saturating_add(limits.refresh_after)
        {
            if let Some(v) = e.value().cloned() {
                e.set_flag(REFRESHING, true);
                return Lookup::HitRefresh(v, e.version);
            }
        }
        Lookup::Hit(e.value().cloned())
    }

    /// Drops the key's entry from memory if nothing of it waits for the store (a clean
    /// value, a cached absence, or a local write of `ReadOnly` mode); the store is not told.
    /// A load of the key in flight is taken out of the single-flight table, so it does not
    /// cache what it read. `false`: the entry holds a write the store may not have yet (it
    /// stays).
    pub(crate) fn invalidate(&mut self, hash: u64, key: &K) -> bool {
        match self.find(hash, key) {
            None => {
                self.touch_loading(hash, key);
                true
            }
            // (A local write over an older write still at the store stays too: the entry
            // is in flight until the store answers.)
            Some(e) if e.is_dirty() => false,
            Some(_) => {
                // As an eviction: a local write that leaves is remembered as never written.
                self.remove_entry(hash, key, Some(RemovalCause::Invalidated));
                true
            }
        }
    }

    /// [`Table::invalidate`] for every key of the table. Returns how many entries left, and
    /// how many stayed because they hold a write the store may not have yet.
    pub(crate) fn invalidate_all(&mut self) -> (usize, usize) {
        let mut gone = Vec::new();
        let mut kept = 0;
        for e in self.map.iter() {
            if e.is_dirty() {
                kept += 1;
            } else if let Ok(k) = crate::guard::catch(|| e.key.clone()) {
                gone.push(k);
            }
        }
        let hasher = self.hasher.clone();
        let mut n = 0;
        for k in gone {
            if let Ok(hash) = crate::guard::catch(|| hasher.hash_one(&k)) {
                n += usize::from(self.invalidate(hash, &k));
            }
            crate::guard::drop_quietly(k);
        }
        (n, kept)
    }

    /// Takes a key's write the store may not hold out of memory and returns it, for the
    /// application to write elsewhere (a partition handed away while the store was down).
    /// The caller holds the owning flusher's core, so no batch holding the key is at the
    /// store; a retry of it finds no entry and ends. `None` for a clean entry or a local
    /// write.
    pub(crate) fn hand_back(&mut self, hash: u64, key: &K) -> Option<Write<K, V>> {
        let e = self.map.find(hash, |e| e.key == *key)?;
        if !e.is_dirty() || (e.flag(LOCAL) && e.unsent == NONE) {
            return None;
        }
        let (mut e, _) = self.map.find_entry(hash, |e| e.key == *key).ok()?.remove();
        Self::unhot(&self.hot, hash, &mut e);
        self.dirty -= 1;
        let (persisted, version) = (e.persisted, e.version);
        let write = self.forget(e);
        self.touch_loading(hash, key);
        if persisted < version {
            match crate::guard::catch(|| key.clone()) {
                Ok(k) => self.note_undurable(hash, k, persisted, version, true),
                Err(_) => self.undurable_floor = self.undurable_floor.max(version),
            }
        }
        Some(write)
    }

    /// A copy of every key in memory (a key whose `Clone` panics is left out).
    pub(crate) fn keys(&self) -> Vec<K> {
        self.map
            .iter()
            .filter_map(|e| crate::guard::catch(|| e.key.clone()).ok())
            .collect()
    }

    /// `true` if the key has any entry (a value, a pending delete, or a cached absence).
    pub(crate) fn contains_any(&self, hash: u64, key: &K) -> bool {
        self.find(hash, key).is_some()
    }

    /// `true` if the key holds a value (not a tombstone) that has not expired at `now`.
    pub(crate) fn contains(&self, hash: u64, key: &K, now: u64) -> bool {
        self.find(hash, key)
            .is_some_and(|e| !e.is_tombstone() && !self.expired_at(e, now))
    }

    /// Backpressure check for a write that would add a dirty entry: `false` once the table
    /// holds `high` dirty entries, and until it is back at `low`.
    #[inline]
    pub(super) fn over_limit(&mut self, high: usize, low: usize) -> bool {
        let dirty = self.dirty as usize;
        if self.pressured && dirty <= low {
            self.pressured = false;
        }
        if !self.pressured && dirty >= high {
            self.pressured = true;
        }
        self.pressured
    }

    /// Backpressure: `true` if a write to `key` may go ahead, i.e. the table is below its
    /// dirty limit, or the key is dirty already (the write only replaces its value).
    #[inline]
    pub(crate) fn admits(&mut self, high: usize, low: usize, hash: u64, key: &K) -> bool {
        !self.over_limit(high, low) || self.find(hash, key).is_some_and(Entry::is_dirty)
    }

    /// Closes the open epoch: a write from now on pushes its key again, even if the key was
    /// queued before. The flusher calls it, then drains the ring.
    ///
    /// Epochs are counted modulo 2^16 (skipping [`NOT_QUEUED`]), so an entry's tag fits beside
    /// its flags. A tag that comes round again is harmless: an entry carries a tag other
    /// than `NOT_QUEUED` only while a take of its key is pending (the key is on the ring, in
    /// the flusher's drained work, in a full ring's scan, or its snapshot is in the retry
    /// list), because `take` resets the tag and only a push sets it. A write that conflates
    /// into that tag is read by the pending take, which always snapshots the latest value.
    /// docs/ARCHITECTURE.md, "Epoch tags".
    pub(crate) fn close_epoch(&mut self) {
        self.epoch = self.epoch.wrapping_add(1).max(1);
    }

    /// Hands out the next version (for a write that does not go through `write`). It is not
    /// counted as a put until [`Table::count_write_through`] says the store took it.
    /// Moves the version counter up to `first` (a newer generation's first version, so that
    /// every later write outranks every earlier one), without counting the skipped versions
    /// as writes. Never moves it down.
    pub(crate) fn raise_versions(&mut self, first: u64) {
        if first > self.next_version {
            self.version_base += first - self.next_version;
            self.next_version = first;
        }
    }

    pub(crate) fn next_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        self.version_base += 1;
        v
    }

    /// Hands out a version for a write of `key` and counts it; any load of the key in flight
    /// becomes stale.
    #[inline]
    pub(super) fn begin_write(&mut self, hash: u64, key: &K, is_delete: bool) -> u64 {
        let version = self.next_version;
        self.next_version += 1;
        // A put is counted by its version (`Table::counters`); a remove here.
        if is_delete {
            self.rare.removes += 1;
        }
        self.touch_loading(hash, key);
        version
    }

    /// A slot of the `side` vector for a new entry (a free one, else a new one).
    pub(super) fn take_slot(&mut self, now: u64, weight: u32) -> u32 {
        let stamp = self.queues.next_stamp;
        self.queues.next_stamp = stamp.wrapping_add(1);
        let side = Side {
            born: now,
            accessed: now,
            weight,
            stamp,
        };
        if let Some(i) = self.free.pop() {
            self.side[i as usize] = side;
            if self.limits.per_entry {
                put_deadline(&mut self.deadlines, i as usize, 0);
            }
            return i;
        }
        let i = u32::try_from(self.side.len())
            .expect("a shard holds fewer than 2^32 entries (that would be > 100 GiB)");
        self.side.push(side);
        i
    }

    /// Adds an entry for `key` (queued for eviction when the table is bounded) and returns
    /// it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert(
        &mut self,
        hash: u64,
        key: K,
        value: Option<V>,
        version: u64,
        persisted: u64,
        now: u64,
        weight: u32,
    ) -> &mut Entry<K, V> {
        let persisted = persisted.max(self.recall_undurable(hash, &key));
        if self.limits.bounded() && self.queues.stale() > 2 * self.map.len() + 64 {
            self.compact_queues();
        }
        let slot = self.take_slot(now, weight);
        let stamp = self.side[slot as usize].stamp;
        let mut e = Entry::new(key, value, version, slot, persisted);
        if e.is_tombstone() {
            self.tombstones += 1;
        }
        self.weight += u64::from(weight);
        if self.limits.bounded() {
            let q = &mut self.queues;
            let ghost = q.ghost_set.find(hash, |h| *h == hash).is_some();
            e.set_flag(IN_MAIN, ghost);
            let pos = (e.key.clone(), hash, stamp);
            if ghost {
                q.main.push_back(pos);
            } else {
                q.small.push_back(pos);
                q.small_live += 1;
            }
        }
        if self.hot_on && self.map.len() >= self.hot_len {
            self.hot_len = (2 * (self.map.len() + 1)).next_power_of_two().max(16);
            self.hot.reserve(self.hot_len);
        }
        let hasher = &self.hasher;
        self.map
            .insert_unique(hash, e, |e| hasher.hash_one(&e.key))
            .into_mut()
    }

    /// Records a write (`value: None` is a delete) as dirty, for the flusher to send.
    #[inline]
    pub(crate) fn write(
        &mut self,
        hash: u64,
        key: K,
        value: Option<V>,
        now: u64,
        weight: u32,
    ) -> WriteOutcome<K, V> {
        let open_epoch = self.epoch;
        let is_delete = value.is_none();
        let version = self.begin_write(hash, &key, is_delete);
        // (Time rules, a weigher or times to live of entries' own: the side state is kept.)
        let deadline = if self.write_side {
            self.take_deadline(now)
        } else {
            0
        };
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            Self::unhot(&self.hot, hash, e);
            let was_dirty = e.is_dirty();
            let was_tombstone = e.is_tombstone();
            let old = e.replace_value(value);
            e.version = version;
            e.set_flag(LOCAL, false);
            let push = e.queued_epoch != open_epoch;
            if push {
                e.queued_epoch = open_epoch;
            }
            let mut old_weight = weight;
            if self.write_side {
                // Only then: the side state is another line.
                let side = &mut self.side[e.slot as usize];
                side.born = now;
                side.accessed = now;
                old_weight = std::mem::replace(&mut side.weight, weight);
                if self.limits.per_entry {
                    put_deadline(&mut self.deadlines, e.slot as usize, deadline);
                }
            }
            if e.unsent == NONE {
                e.unsent = version;
            }
            if !was_dirty {
                self.dirty += 1;
            }
            match (was_tombstone, is_delete) {
                (false, true) => self.tombstones += 1,
                (true, false) => self.tombstones -= 1,
                _ => {}
            }
            if !push {
                self.conflated += 1;
            }
            if old_weight != weight {
                self.weight = self.weight + u64::from(weight) - u64::from(old_weight);
            }
            let old = self.overwritten(&key, old, was_dirty, is_delete);
            // The caller's key goes on the ring; the table already holds one.
            WriteOutcome {
                version,
                old,
                ring_key: push.then_some(key),
                over_capacity: false,
                departed: self.departures(),
            }
        } else {
            let ring_key = key.clone();
            let e = self.insert(hash, key, value, version, 0, now, weight);
            e.queued_epoch = open_epoch;
            e.unsent = version;
            let slot = e.slot as usize;
            if self.limits.per_entry {
                put_deadline(&mut self.deadlines, slot, deadline);
            }
            self.dirty += 1;
            let over_capacity = self.enforce();
            WriteOutcome {
                version,
                old: None,
                ring_key: Some(ring_key),
                over_capacity,
                departed: self.departures(),
            }
        }
    }

    /// A journaled write replayed at build, into a table that does not hold the key yet:
    /// dirty at its journaled `version`. Returns the key to queue on the ring.
    pub(crate) fn restore(
        &mut self,
        hash: u64,
        key: K,
        value: Option<V>,
        version: u64,
        now: u64,
        weight: u32,
    ) -> Option<K> {
        if self.find(hash, &key).is_some() {
            return None; // replay yields one write per key
        }
        let open_epoch = self.epoch;
        let ring_key = key.clone();
        let e = self.insert(hash, key, value, version, 0, now, weight);
        e.queued_epoch = open_epoch;
        e.unsent = version;
        self.dirty += 1;
        Some(ring_key)
    }

    /// Stores a clean value (loaded, preloaded, or written through) unless the key holds
    /// something at least as new. Returns the value the cache now answers with.
    pub(crate) fn fill_clean(
        &mut self,
        hash: u64,
        key: K,
        value: V,
        version: u64,
        now: u64,
        weight: u32,
    ) -> Option<V> {
        self.touch_loading(hash, &key);
        let deadline = self.take_deadline(now);
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            if e.version >= version || (version == 0 && e.is_dirty()) {
                return e.value().cloned();
            }
            Self::unhot(&self.hot, hash, e);
            // A newer, stored version (write-through): it replaces even a dirty older value;
            // the flusher then sends this same version again, never an older one.
            let was_tombstone = e.is_tombstone();
            let was_dirty = e.is_dirty();
            // Dropped after the table is updated, still under the lock.
            let old = e.replace_value(Some(value.clone()));
            e.version = version;
            e.set_flag(LOCAL, false);
            e.persisted = e.persisted.max(version);
            let side = &mut self.side[e.slot as usize];
            side.born = now;
            side.accessed = now;
            let old_weight = std::mem::replace(&mut side.weight, weight);
            if self.limits.per_entry {
                put_deadline(&mut self.deadlines, e.slot as usize, deadline);
            }
            if was_tombstone {
                self.tombstones -= 1;
            }
            self.weight = self.weight + u64::from(weight) - u64::from(old_weight);
            if !was_dirty {
                drop(self.replaced(&key, old, RemovalCause::Replaced));
            }
            return Some(value);
        }
        let slot = self
            .insert(
                hash,
                key,
                Some(value.clone()),
                version,
                version,
                now,
                weight,
            )
            .slot as usize;
        if self.limits.per_entry {
            put_deadline(&mut self.deadlines, slot, deadline);
        }
        self.enforce();
        Some(value)
    }

    /// Write-through delete at `version` (the store holds it): drops a clean entry unless it
    /// holds something newer. A dirty entry with an older version (a write-behind write still
    /// waiting for the store when the mode switched to `Through`) becomes a tombstone at this
    /// version instead, as [`Table::fill_clean`] replaces a dirty older value: `get` answers
    /// `None` at once, and the flusher later sends this same delete again, never the older
    /// write. Returns the value it replaced, to drop after the lock is released.
    pub(crate) fn remove_clean(
        &mut self,
        hash: u64,
        key: &K,
        version: u64,
        weight: u32,
    ) -> Option<V> {
        self.touch_loading(hash, key);
        let e = self.map.find_mut(hash, |e| e.key == *key)?;
        if e.version >= version {
            return None;
        }
        Self::unhot(&self.hot, hash, e);
        if !e.is_dirty() {
            self.remove_entry(hash, key, Some(RemovalCause::Removed));
            return None;
        }
        let was_tombstone = e.is_tombstone();
        let old = e.replace_value(None);
        e.version = version;
        e.set_flag(LOCAL, false);
        e.persisted = e.persisted.max(version);
        let old_weight = std::mem::replace(&mut self.side[e.slot as usize].weight, weight);
        self.weight = self.weight + u64::from(weight) - u64::from(old_weight);
        if !was_tombstone {
            self.tombstones += 1;
        }
        old
    }

    /// Read-only mode: a write that stays in memory and is never sent (a delete leaves a
    /// clean tombstone so the store's value does not come back). A pending write of the key
    /// from an earlier write-behind period is superseded and will not be sent. Returns the
    /// version and the replaced value.
    pub(crate) fn set_local(
        &mut self,
        hash: u64,
        key: K,
        value: Option<V>,
        now: u64,
        weight: u32,
    ) -> (u64, Option<V>) {
        let is_delete = value.is_none();
        let version = self.begin_write(hash, &key, is_delete);
        let deadline = self.take_deadline(now);
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            Self::unhot(&self.hot, hash, e);
            let was_tombstone = e.is_tombstone();
            let was_dirty = e.is_dirty();
            let old = e.replace_value(value);
            e.version = version;
            e.set_flag(LOCAL, true);
            let side = &mut self.side[e.slot as usize];
            side.born = now;
            side.accessed = now;
            let old_weight = std::mem::replace(&mut side.weight, weight);
            if self.limits.per_entry {
                put_deadline(&mut self.deadlines, e.slot as usize, deadline);
            }
            e.unsent = NONE;
            let clean_now = !e.is_dirty();
            self.weight = self.weight + u64::from(weight) - u64::from(old_weight);
            if was_dirty && clean_now {
                self.dirty -= 1;
            }
            match (was_tombstone, is_delete) {
                (false, true) => self.tombstones += 1,
                (true, false) => self.tombstones -= 1,
                _ => {}
            }
            let old = self.overwritten(&key, old, was_dirty, is_delete);
            return (version, old);
        }
        let e = self.insert(hash, key, value, version, 0, now, weight);
        e.set_flag(LOCAL, true);
        let slot = e.slot as usize;
        if self.limits.per_entry {
            put_deadline(&mut self.deadlines, slot, deadline);
        }
        self.enforce();
        (version, None)
    }

    /// Asks the CPU to bring the entry of `key` into this core's cache, for writing, without
    /// waiting for it: the flusher calls it for a chunk of keys before taking their snapshots
    /// or marking them persisted. The entries were just written on the writers' cores, so each
    /// is a miss; issued together, the misses overlap. Only the control bytes are read here
    /// (the entry is not compared, since that would wait for its line); a wrong candidate
    /// costs a wasted prefetch, nothing else.
    #[inline]
    pub(crate) fn prefetch(&self, hash: u64) {
        if let Some(e) = self.map.iter_hash(hash).next() {
            let start = e as *const Entry<K, V> as *const u8;
            prefetch_for_write(start);
            // An entry may straddle two lines (48 bytes at a 16-byte alignment).
            prefetch_for_write(start.wrapping_add(std::mem::size_of::<Entry<K, V>>() - 1));
        }
    }

    /// Takes a snapshot of a dirty key for a batch. `retry` is set when the caller is the
    /// retry list that already owns the key's in-flight mark.
    ///
    /// The snapshot clones the key and the value. If that panics, the entry is left as the
    /// caller's to retry (in flight, its write still unsent) and the panic comes back as
    /// `Err` with the key's version and the panic's message.
    pub(crate) fn take(
        &mut self,
        hash: u64,
        key: &K,
        retry: bool,
    ) -> Result<Option<Snapshot<K, V>>, (u64, String)> {
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return Ok(None);
        };
        if e.in_flight && !retry {
            // The key is in the flusher's retry list, which will send its latest value.
            return Ok(None);
        }
        if e.unsent == NONE {
            if retry && e.in_flight {
                e.in_flight = false;
                self.dirty -= 1;
            }
            return Ok(None);
        }
        let cloned = crate::guard::catch(|| e.as_write());
        e.in_flight = true;
        // Any later write must push the key again: it may have been pushed in the open epoch
        // already (and drained early), and a write that conflates into that epoch would
        // otherwise never reach the ring. See docs/ARCHITECTURE.md, "the early-drain race".
        e.queued_epoch = NOT_QUEUED;
        match cloned {
            Ok(write) => {
                let first = std::mem::replace(&mut e.unsent, NONE);
                Ok(Some(Snapshot { write, first }))
            }
            Err(msg) => Err((e.version, msg)),
        }
    }

    /// Gives up on the key's unsent write without cloning it: the entry leaves memory and its
    /// write is moved out, for the failed-writes sink. Only for a key the caller's retry list
    /// owns (in flight) whose latest write is unsent; `None` otherwise.
    /// Returns the write and its oldest unsent version.
    pub(crate) fn surrender(&mut self, hash: u64, key: &K) -> Option<(Write<K, V>, u64)> {
        let e = self.map.find(hash, |e| e.key == *key)?;
        if !e.in_flight || e.unsent == NONE {
            return None;
        }
        let Ok(occ) = self.map.find_entry(hash, |e| e.key == *key) else {
            return None;
        };
        let (mut e, _) = occ.remove();
        Self::unhot(&self.hot, hash, &mut e);
        self.dirty -= 1;
        let (persisted, version, first) = (e.persisted, e.version, e.unsent);
        let write = self.forget(e);
        self.touch_loading(hash, key);
        match crate::guard::catch(|| write.key().clone()) {
            Ok(k) => self.note_undurable(hash, k, persisted, version, true),
            Err(_) => self.undurable_floor = self.undurable_floor.max(version),
        }
        Some((write, first))
    }

    /// The bookkeeping of an entry taken out of `map`, and its write, moved out.
    pub(super) fn forget(&mut self, mut e: Entry<K, V>) -> Write<K, V> {
        if e.is_tombstone() {
            self.tombstones -= 1;
        }
        if !e.flag(IN_MAIN) && self.limits.bounded() {
            self.queues.small_live = self.queues.small_live.saturating_sub(1);
        }
        self.weight -= u64::from(self.side[e.slot as usize].weight);
        self.free.push(e.slot);
        // The value moves out and leaves a tombstone, whose drop touches no value.
        let value = e.replace_value(None);
        let version = e.version;
        let e = std::mem::ManuallyDrop::new(e);
        // SAFETY: `e` is initialised and in a `ManuallyDrop`, so `Entry::drop` never runs: the
        // key read out here is the only copy that will be dropped, and `e` is not used again.
        // (Its value was moved out above; `Entry` has no other field that owns anything.)
        let key = unsafe { std::ptr::read(&e.key) };
        match value {
            Some(value) => Write::Put {
                key,
                value,
                version,
            },
            None => Write::Delete { key, version },
        }
    }

    /// The store applied `version` of the key. Returns `true` if the entry is now clean. An
    /// entry that expired while it waited for the store goes now.
    pub(crate) fn persisted(&mut self, hash: u64, key: &K, version: u64, now: u64) -> bool {
        let limits = self.limits;
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return false;
        };
        if !e.in_flight {
            return false;
        }
        e.in_flight = false;
        e.persisted = e.persisted.max(version);
        if e.unsent != NONE {
            // Written to again during the batch: still dirty, and that write pushed the key.
            return false;
        }
        let tombstone_done = e.is_tombstone() && e.version == version;
        let expired = (limits.ttl | limits.tti) != 0
            && Self::expired(
                &limits,
                e,
                &self.side[e.slot as usize],
                deadline_of(&self.deadlines, e.slot),
                now,
            );
        self.dirty -= 1;
        if tombstone_done {
            self.remove_entry(hash, key, None);
        } else if expired {
            self.rare.expirations += 1;
            self.remove_entry(hash, key, Some(RemovalCause::Expired));
        }
        true
    }

    /// The snapshot whose oldest version was `first` failed and will be retried: the entry
    /// keeps its in-flight mark (the retry list owns it) and remembers the oldest unsent
    /// version again.
    ///
    /// Returns `false` when there is nothing left to retry: the key was written in
    /// `WriteMode::ReadOnly` since, which supersedes the failed write for good (that local
    /// write is never sent), and no write-behind write followed it. The entry is then clean.
    pub(crate) fn retry_later(&mut self, hash: u64, key: &K, first: u64) -> bool {
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return false;
        };
        if e.flag(LOCAL) && e.unsent == NONE {
            if e.in_flight {
                e.in_flight = false;
                self.dirty -= 1;
            }
            return false;
        }
        e.unsent = e.unsent.min(first);
        true
    }

    /// The cache gave up on the snapshot of `version` (it went to the failed-writes sink). A
    /// newer write, if any, goes on. Otherwise the entry leaves memory, so that reads go to
    /// the store again rather than serve a value the store refused, and the key is
    /// remembered as given up ([`Table::durable`]). A local write (`WriteMode::ReadOnly`) made
    /// since stays in memory, clean.
    pub(crate) fn abandon(&mut self, hash: u64, key: &K, version: u64) {
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return;
        };
        if !e.in_flight {
            return;
        }
        e.in_flight = false;
        if e.unsent != NONE {
            return;
        }
        self.dirty -= 1;
        if e.flag(LOCAL) {
            return;
        }
        let persisted = e.persisted;
        let k = crate::guard::catch(|| e.key.clone());
        self.remove_entry(hash, key, None);
        if let Ok(k) = k {
            self.note_undurable(hash, k, persisted, version, true);
        } else {
            self.undurable_floor = self.undurable_floor.max(version);
        }
    }

    /// Recovery after a panic interrupted a flusher's step: every in-flight mark of the table
    /// is released (the batch or retry list that held it is gone) and the write is unsent
    /// again, so the next step's table scan (the overflow path) sends it. A version already
    /// at the store is sent again, which the version guard makes harmless.
    pub(crate) fn release_all_in_flight(&mut self) -> usize {
        let mut n = 0;
        let mut cleaned = 0;
        for e in self.map.iter_mut() {
            if e.in_flight {
                n += 1;
                cleaned += u32::from(Self::release_entry(e));
            }
        }
        self.dirty -= cleaned;
        n
    }

    /// [`Table::release_all_in_flight`] for one key.
    pub(crate) fn release(&mut self, hash: u64, key: &K) {
        if let Some(e) = self.map.find_mut(hash, |e| e.key == *key) {
            if e.in_flight && Self::release_entry(e) {
                self.dirty -= 1;
            }
        }
    }

    /// Releases an entry's in-flight mark; `true` if the entry is clean now.
    pub(super) fn release_entry(e: &mut Entry<K, V>) -> bool {
        e.in_flight = false;
        e.queued_epoch = NOT_QUEUED;
        if e.unsent == NONE {
            if e.flag(LOCAL) || e.persisted >= e.version {
                return true; // nothing of it is left to send
            }
            e.unsent = e.version;
        }
        false
    }

    /// The oldest unsent version of a key, for the flush barrier ([`NONE`] if none).
    pub(crate) fn unsent_of(&self, hash: u64, key: &K) -> u64 {
        self.find(hash, key).map_or(NONE, |e| e.unsent)
    }

    /// `true` if a flusher holds a snapshot of the key (batch or retry list).
    pub(crate) fn in_flight(&self, hash: u64, key: &K) -> bool {
        self.find(hash, key).is_some_and(|e| e.in_flight)
    }

    /// Keys that are dirty and not owned by a retry list (the full-ring path).
    pub(crate) fn scan_dirty(&self, out: &mut Vec<K>) {
        out.extend(
            self.map
                .iter()
                .filter(|e| e.unsent != NONE && !e.in_flight)
                .map(|e| e.key.clone()),
        );
    }

    /// Every dirty entry as the write that would persist it (what `close` hands back). An
    /// entry whose key or value cannot be cloned (the `Clone` panics) is moved out instead:
    /// it leaves memory, its write goes to `out`.
    pub(crate) fn unwritten(&mut self, out: &mut Vec<Write<K, V>>) {
        let mut stuck = Vec::new();
        for e in self.map.iter() {
            if !e.is_dirty() || (e.flag(LOCAL) && e.unsent == NONE) {
                continue;
            }
            match crate::guard::catch(|| e.as_write()) {
                Ok(w) => out.push(w),
                Err(_) => stuck.push(e.slot),
            }
        }
        if stuck.is_empty() {
            return;
        }
        if self.hot_on {
            // Their hashes are not at hand (the key's `Hash` is user code): empty every slot.
            self.hot.clear_all();
        }
        let taken: Vec<Entry<K, V>> = self.map.extract_if(|e| stuck.contains(&e.slot)).collect();
        for e in taken {
            self.dirty -= 1;
            let w = self.forget(e);
            out.push(w);
        }
    }

    /// Every write of the table the store may not hold, as the journal keeps it (key, value
    /// or `None` for a delete, version): the dirty entries, in flight included, but no local
    /// write of `ReadOnly` mode (never journaled, never sent). `Err` if a key's or value's
    /// `Clone` panicked.
    pub(crate) fn journal_snapshot(&self) -> Result<Vec<(K, Option<V>, u64)>, String> {
        crate::guard::catch(|| {
            self.map
                .iter()
                .filter(|e| e.is_dirty() && !(e.flag(LOCAL) && e.unsent == NONE))
                .map(|e| (e.key.clone(), e.value().cloned(), e.version))
                .collect()
        })
    }

    /// Every live entry that has not expired at `now` (for `Cache::entries`); never loads.
    pub(crate) fn entries(&self, out: &mut Vec<(K, V)>, now: u64) {
        out.extend(
            self.map
                .iter()
                .filter(|e| !self.expired_at(e, now))
                .filter_map(|e| e.value().map(|v| (e.key.clone(), v.clone()))),
        );
    }

    /// Removes the entry of `key` (and takes a load of it in flight out of the single-flight
    /// table).
    /// A local write (`WriteMode::ReadOnly`) that leaves is remembered, so that it is never
    /// acknowledged ([`Table::durable`]). A panic in the key's or value's `Drop` is caught.
    /// With `cause`, a value that leaves goes to the removal listener ([`Table::departed`]).
    pub(super) fn remove_entry(&mut self, hash: u64, key: &K, cause: Option<RemovalCause>) {
        if let Ok(occ) = self.map.find_entry(hash, |e| e.key == *key) {
            let (mut e, _) = occ.remove();
            Self::unhot(&self.hot, hash, &mut e);
            let (persisted, version) = (e.persisted, e.version);
            let w = self.forget(e);
            self.touch_loading(hash, key);
            if persisted < version {
                if let Ok(k) = crate::guard::catch(|| key.clone()) {
                    self.note_undurable(hash, k, persisted, version, false);
                } else {
                    self.undurable_floor = self.undurable_floor.max(version);
                }
            }
            match (w, cause) {
                (Write::Put { key, value, .. }, Some(cause)) if self.listening => {
                    self.departed.push((key, value, cause));
                }
                (w, _) => {
                    crate::guard::drop_quietly(w);
                }
            }
        }
    }

    /// A write replaced `old` in place: a clean value goes to the removal listener
    /// ([`Table::replaced`]: `Removed` by a delete, `Replaced` by a put); a pending one
    /// (`was_dirty`) was superseded, not removed, and comes back to drop after the lock.
    fn overwritten(
        &mut self,
        key: &K,
        old: Option<V>,
        was_dirty: bool,
        is_delete: bool,
    ) -> Option<V> {
        if was_dirty {
            return old;
        }
        let cause = if is_delete {
            RemovalCause::Removed
        } else {
            RemovalCause::Replaced
        };
        self.replaced(key, old, cause)
    }

    /// A clean value replaced in place by a write (`cause` `Replaced` or `Removed`): to the
    /// removal listener when one is set (with a clone of the key: a key whose `Clone`
    /// panics is not reported), else given back to drop after the lock.
    pub(super) fn replaced(&mut self, key: &K, old: Option<V>, cause: RemovalCause) -> Option<V> {
        let old = old?;
        if !self.listening {
            return Some(old);
        }
        match crate::guard::catch(|| key.clone()) {
            Ok(k) => {
                self.departed.push((k, old, cause));
                None
            }
            Err(_) => Some(old),
        }
    }

    /// Gives the next write under this hold of the lock (`write`, `fill_clean` or
    /// `set_local`) a time to live of its own, `ttl` coarse nanoseconds from its time (the
    /// table must allow it: `Limits::per_entry`). A write without one clears the entry's.
    pub(crate) fn expire_next_write(&mut self, ttl: u64) {
        debug_assert!(self.limits.per_entry);
        self.next_ttl = ttl;
    }

    /// The deadline of a write at `now` ([`Table::expire_next_write`]), 0 for none.
    fn take_deadline(&mut self, now: u64) -> u64 {
        match std::mem::take(&mut self.next_ttl) {
            0 => 0,
            ttl => now.saturating_add(ttl).max(1),
        }
    }

    /// The values that left memory since the last call, for the removal listener (empty
    /// without one).
    pub(crate) fn take_departed(&mut self) -> Vec<(K, V, RemovalCause)> {
        if self.departed.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut self.departed)
        }
    }

    /// [`Table::take_departed`] when a listener is set; reads no cold line otherwise.
    #[inline]
    pub(crate) fn departures(&mut self) -> Vec<(K, V, RemovalCause)> {
        if self.listening {
            self.take_departed()
        } else {
            Vec::new()
        }
    }
}
