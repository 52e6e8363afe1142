//! [`Shard`]: one slice of the key space. Its table and every entry's bookkeeping live behind
//! one lock and are plain single-threaded code ([`Table`]); the dirty ring and the epoch next
//! to it are what writers and the owning flusher share without that lock.

use hashbrown::HashTable;

use crate::dirty_ring::DirtyRing;
use crate::store::Write;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{CachePadded, Mutex};

/// `Entry::unsent` when every write of the entry has been handed to the store.
pub(crate) const NONE: u64 = u64::MAX;
/// `Entry::queued_epoch` when the key is not on the ring for any epoch.
pub(crate) const NOT_QUEUED: u64 = 0;

/// One cached key.
pub(crate) struct Entry<K, V> {
    pub(crate) key: K,
    /// The key's hash, kept so that growing the table never hashes a key again.
    hash: u64,
    /// The latest value; `None` is a pending delete (a tombstone): `get` answers `None` and
    /// never reads the key through until the delete is in the store.
    pub(crate) value: Option<V>,
    /// Version of `value` (0 for a value loaded from the store or preloaded).
    pub(crate) version: u64,
    /// Version of the oldest write not yet handed to the store, or [`NONE`].
    pub(crate) unsent: u64,
    /// The epoch in which the key was last pushed on the ring, or [`NOT_QUEUED`] once the
    /// flusher has taken it. A write pushes the key unless this equals the open epoch.
    pub(crate) queued_epoch: u64,
    /// A flusher holds a snapshot of this key (in a batch, or in its retry list).
    pub(crate) in_flight: bool,
    /// Highest version the store is known to hold (0: none). `wait_durable` reads it.
    pub(crate) persisted: u64,
}

impl<K, V> Entry<K, V> {
    #[inline]
    fn is_dirty(&self) -> bool {
        self.unsent != NONE || self.in_flight
    }
}

/// Per-shard counters, bumped under the shard lock (so they cost no atomic operation).
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct ShardCounters {
    pub(crate) puts: u64,
    pub(crate) removes: u64,
    pub(crate) conflated: u64,
    pub(crate) gets: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) loads: u64,
}

/// The single-threaded part of a shard.
pub(crate) struct Table<K, V> {
    map: HashTable<Entry<K, V>>,
    /// Next version to hand out; starts at the wall clock (see `Cache` docs) and only grows.
    pub(crate) next_version: u64,
    /// Entries that are tombstones.
    tombstones: usize,
    /// Entries that are dirty (`unsent != NONE || in_flight`).
    pub(crate) dirty: usize,
    /// Bumped whenever an entry leaves the table, so a read-through that started before can
    /// tell that its loaded value may be older than a delete that has come and gone.
    pub(crate) removals: u64,
    /// Backpressure: the table reached its dirty limit and admits no new dirty entry until
    /// it is back at the low watermark.
    pressured: bool,
    pub(crate) counters: ShardCounters,
}

/// What a write under the lock decided.
pub(crate) struct WriteOutcome<K, V> {
    /// The version given to the write.
    pub(crate) version: u64,
    /// The replaced value, to drop after the lock is released.
    pub(crate) old: Option<V>,
    /// The key to push on the ring, if this is the key's first write in the open epoch.
    pub(crate) ring_key: Option<K>,
}

/// A snapshot the flusher took: the write to send and the oldest version it covers.
pub(crate) struct Snapshot<K, V> {
    pub(crate) write: Write<K, V>,
    pub(crate) first: u64,
}

impl<K: Eq + Clone, V: Clone> Table<K, V> {
    fn new(first_version: u64) -> Self {
        Table {
            map: HashTable::new(),
            next_version: first_version,
            tombstones: 0,
            dirty: 0,
            removals: 0,
            pressured: false,
            counters: ShardCounters::default(),
        }
    }

    /// Live (non-tombstone) entries.
    pub(crate) fn len(&self) -> usize {
        self.map.len() - self.tombstones
    }

    /// Looks a key up: `Some(Some(v))` a value, `Some(None)` a pending delete, `None` a miss.
    #[inline]
    pub(crate) fn get(&mut self, hash: u64, key: &K) -> Option<Option<V>> {
        self.counters.gets += 1;
        let found = self
            .map
            .find(hash, |e| e.key == *key)
            .map(|e| e.value.clone());
        if found.is_some() {
            self.counters.hits += 1;
        } else {
            self.counters.misses += 1;
        }
        found
    }

    /// `true` if the key holds a value (not a tombstone).
    pub(crate) fn contains(&self, hash: u64, key: &K) -> bool {
        self.map
            .find(hash, |e| e.key == *key)
            .is_some_and(|e| e.value.is_some())
    }

    /// Backpressure check for a write that would add a dirty entry: `false` once the table
    /// holds `high` dirty entries, and until it is back at `low`.
    #[inline]
    pub(crate) fn over_limit(&mut self, high: usize, low: usize) -> bool {
        if self.pressured && self.dirty <= low {
            self.pressured = false;
        }
        if !self.pressured && self.dirty >= high {
            self.pressured = true;
        }
        self.pressured
    }

    /// `true` if a write to `key` would make a new dirty entry (a write to a dirty entry only
    /// replaces its value).
    pub(crate) fn would_add_dirty(&self, hash: u64, key: &K) -> bool {
        self.map
            .find(hash, |e| e.key == *key)
            .is_none_or(|e| !e.is_dirty())
    }

    /// `true` once the store holds `version` of the key or a newer one (or the key left the
    /// table, which only a persisted delete or a given-up write does).
    pub(crate) fn durable(&self, hash: u64, key: &K, version: u64) -> bool {
        self.map
            .find(hash, |e| e.key == *key)
            .is_none_or(|e| e.persisted >= version)
    }

    /// Hands out the next version (for a write that does not go through `write`).
    pub(crate) fn next_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    /// Records a write (`value: None` is a delete) as dirty, for the flusher to send.
    #[inline]
    pub(crate) fn write(
        &mut self,
        hash: u64,
        key: K,
        value: Option<V>,
        open_epoch: u64,
    ) -> WriteOutcome<K, V> {
        let version = self.next_version;
        self.next_version += 1;
        if value.is_some() {
            self.counters.puts += 1;
        } else {
            self.counters.removes += 1;
        }
        let is_delete = value.is_none();
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            let was_dirty = e.is_dirty();
            let was_tombstone = e.value.is_none();
            let old = std::mem::replace(&mut e.value, value);
            e.version = version;
            if e.unsent == NONE {
                e.unsent = version;
            }
            let push = e.queued_epoch != open_epoch;
            if push {
                e.queued_epoch = open_epoch;
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
                self.counters.conflated += 1;
            }
            // The caller's key goes on the ring; the table already holds one.
            WriteOutcome {
                version,
                old,
                ring_key: push.then_some(key),
            }
        } else {
            let ring_key = key.clone();
            self.map.insert_unique(
                hash,
                Entry {
                    key,
                    hash,
                    value,
                    version,
                    unsent: version,
                    queued_epoch: open_epoch,
                    in_flight: false,
                    persisted: 0,
                },
                |e| e.hash,
            );
            self.dirty += 1;
            if is_delete {
                self.tombstones += 1;
            }
            WriteOutcome {
                version,
                old: None,
                ring_key: Some(ring_key),
            }
        }
    }

    /// Stores a clean value (loaded, preloaded, or written through) unless the key already
    /// holds something newer. Returns the value the cache now answers with for the key.
    pub(crate) fn fill_clean(&mut self, hash: u64, key: K, value: V, version: u64) -> Option<V> {
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            if e.version >= version || e.is_dirty() {
                return e.value.clone();
            }
            let was_tombstone = e.value.is_none();
            e.value = Some(value.clone());
            e.version = version;
            e.persisted = e.persisted.max(version);
            if was_tombstone {
                self.tombstones -= 1;
            }
            return Some(value);
        }
        self.map.insert_unique(
            hash,
            Entry {
                key,
                hash,
                value: Some(value.clone()),
                version,
                unsent: NONE,
                queued_epoch: NOT_QUEUED,
                in_flight: false,
                persisted: version,
            },
            |e| e.hash,
        );
        Some(value)
    }

    /// Caches a value read through the store, unless the key was written meanwhile (the
    /// write wins) or an entry left the table since the read began (`removals` moved: a
    /// delete may have come and gone, so the loaded value may be stale; it is returned to the
    /// caller but not cached). Returns what the caller should see.
    pub(crate) fn fill_loaded(
        &mut self,
        hash: u64,
        key: &K,
        loaded: Option<V>,
        removals: u64,
    ) -> Option<V> {
        if let Some(e) = self.map.find(hash, |e| e.key == *key) {
            return e.value.clone();
        }
        match loaded {
            Some(v) if removals == self.removals => {
                self.fill_clean(hash, key.clone(), v.clone(), 0);
                Some(v)
            }
            other => other,
        }
    }

    /// Write-through delete: drops the entry unless it holds something newer.
    pub(crate) fn remove_clean(&mut self, hash: u64, key: &K, version: u64) {
        let stale = self
            .map
            .find(hash, |e| e.key == *key)
            .is_some_and(|e| !e.is_dirty() && e.version < version);
        if stale {
            self.remove_entry(hash, key);
        }
    }

    /// Read-only mode: a write that stays in memory and is never sent (a delete leaves a
    /// clean tombstone so the store's value does not come back). Returns the replaced value.
    pub(crate) fn set_local(&mut self, hash: u64, key: K, value: Option<V>) -> (u64, Option<V>) {
        let version = self.next_version;
        self.next_version += 1;
        if value.is_some() {
            self.counters.puts += 1;
        } else {
            self.counters.removes += 1;
        }
        let is_delete = value.is_none();
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            let was_tombstone = e.value.is_none();
            let old = std::mem::replace(&mut e.value, value);
            e.version = version;
            match (was_tombstone, is_delete) {
                (false, true) => self.tombstones += 1,
                (true, false) => self.tombstones -= 1,
                _ => {}
            }
            return (version, old);
        }
        self.map.insert_unique(
            hash,
            Entry {
                key,
                hash,
                value,
                version,
                unsent: NONE,
                queued_epoch: NOT_QUEUED,
                in_flight: false,
                persisted: 0,
            },
            |e| e.hash,
        );
        if is_delete {
            self.tombstones += 1;
        }
        (version, None)
    }

    /// Takes a snapshot of a dirty key for a batch. `retry` is set when the caller is the
    /// retry list that already owns the key's in-flight mark.
    pub(crate) fn take(&mut self, hash: u64, key: &K, retry: bool) -> Option<Snapshot<K, V>> {
        let e = self.map.find_mut(hash, |e| e.key == *key)?;
        if e.in_flight && !retry {
            // The key is in the flusher's retry list, which will send its latest value.
            return None;
        }
        if e.unsent == NONE {
            if retry && e.in_flight {
                e.in_flight = false;
                self.dirty -= 1;
            }
            return None;
        }
        let first = e.unsent;
        e.unsent = NONE;
        e.in_flight = true;
        // Any later write must push the key again: it may have been pushed in the open epoch
        // already (and drained early), and a write that conflates into that epoch would
        // otherwise never reach the ring. See docs/ARCHITECTURE.md, "the early-drain race".
        e.queued_epoch = NOT_QUEUED;
        let write = match &e.value {
            Some(v) => Write::Put {
                key: e.key.clone(),
                value: v.clone(),
                version: e.version,
            },
            None => Write::Delete {
                key: e.key.clone(),
                version: e.version,
            },
        };
        Some(Snapshot { write, first })
    }

    /// The store applied `version` of the key. Returns `true` if the entry is now clean.
    pub(crate) fn persisted(&mut self, hash: u64, key: &K, version: u64) -> bool {
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
        let gone = e.value.is_none() && e.version == version;
        self.dirty -= 1;
        if gone {
            self.remove_entry(hash, key);
        }
        true
    }

    /// The snapshot whose oldest version was `first` failed and will be retried: the entry
    /// keeps its in-flight mark (the retry list owns it) and remembers the oldest unsent
    /// version again.
    pub(crate) fn retry_later(&mut self, hash: u64, key: &K, first: u64) {
        if let Some(e) = self.map.find_mut(hash, |e| e.key == *key) {
            e.unsent = e.unsent.min(first);
        }
    }

    /// The cache gave up on the snapshot (it went to the failed-writes sink). A newer write,
    /// if any, goes on; otherwise the entry is clean, and a tombstone is dropped.
    pub(crate) fn abandon(&mut self, hash: u64, key: &K) {
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return;
        };
        if !e.in_flight {
            return;
        }
        e.in_flight = false;
        if e.unsent == NONE {
            let gone = e.value.is_none();
            self.dirty -= 1;
            if gone {
                self.remove_entry(hash, key);
            }
        }
    }

    /// The oldest unsent version of a key, for the flush barrier ([`NONE`] if none).
    pub(crate) fn unsent_of(&self, hash: u64, key: &K) -> u64 {
        self.map
            .find(hash, |e| e.key == *key)
            .map_or(NONE, |e| e.unsent)
    }

    /// `true` if a flusher holds a snapshot of the key (batch or retry list).
    pub(crate) fn in_flight(&self, hash: u64, key: &K) -> bool {
        self.map
            .find(hash, |e| e.key == *key)
            .is_some_and(|e| e.in_flight)
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

    /// Every dirty entry as the write that would persist it (what `close` hands back).
    pub(crate) fn unwritten(&self, out: &mut Vec<Write<K, V>>) {
        for e in self.map.iter().filter(|e| e.is_dirty()) {
            out.push(match &e.value {
                Some(v) => Write::Put {
                    key: e.key.clone(),
                    value: v.clone(),
                    version: e.version,
                },
                None => Write::Delete {
                    key: e.key.clone(),
                    version: e.version,
                },
            });
        }
    }

    fn remove_entry(&mut self, hash: u64, key: &K) {
        if let Ok(occ) = self.map.find_entry(hash, |e| e.key == *key) {
            let (e, _) = occ.remove();
            if e.value.is_none() {
                self.tombstones -= 1;
            }
            self.removals += 1;
        }
    }
}

/// One shard: the locked table plus the lock-free parts writers and the flusher share.
pub(crate) struct Shard<K, V> {
    pub(crate) table: CachePadded<Mutex<Table<K, V>>>,
    /// The open epoch (starts at 1; [`NOT_QUEUED`] is never an epoch). The flusher closes it
    /// with one increment.
    pub(crate) epoch: AtomicU64,
    /// Keys that became dirty in an epoch, for the flusher.
    pub(crate) ring: DirtyRing<K>,
    /// A key was pushed since the flusher last closed this shard's epoch: its delay runs.
    pub(crate) armed: AtomicBool,
    /// The ring reached the count trigger.
    pub(crate) triggered: AtomicBool,
    /// A push found the ring full: the flusher must scan the table for dirty keys.
    pub(crate) overflow: AtomicBool,
}

impl<K: Eq + Clone, V: Clone> Shard<K, V> {
    pub(crate) fn new(first_version: u64, ring_capacity: usize) -> Self {
        Shard {
            table: CachePadded::new(Mutex::new(Table::new(first_version))),
            epoch: AtomicU64::new(1),
            ring: DirtyRing::new(ring_capacity),
            armed: AtomicBool::new(false),
            triggered: AtomicBool::new(false),
            overflow: AtomicBool::new(false),
        }
    }

    /// The open epoch. Read under the table lock by writers.
    #[inline]
    pub(crate) fn open_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}
