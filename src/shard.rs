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
}

impl<K, V> Entry<K, V> {
    #[inline]
    fn is_dirty(&self) -> bool {
        self.unsent != NONE || self.in_flight
    }
}

/// Per-shard counters, bumped under the shard lock (so they cost no atomic operation).
/// `gets` is not counted: it is `hits + misses`.
///
/// `repr(C)`, hottest first: see [`Table`] for why the order matters.
#[derive(Default, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct ShardCounters {
    pub(crate) hits: u64,
    pub(crate) puts: u64,
    pub(crate) conflated: u64,
    pub(crate) removes: u64,
    pub(crate) misses: u64,
    pub(crate) loads: u64,
}

/// The single-threaded part of a shard.
///
/// Layout (`repr(C)`): the fields every `get` and `put` writes (`next_version`, the counters)
/// come first, so that together with the lock word in front of them (`lock_api::Mutex` keeps
/// its raw lock first, since its data may be unsized) they fill the shard's first cache line.
/// A hit then writes one cache line besides the entry's, as a read lock of a concurrent map
/// does; with the counters after the table header it wrote two, and on two cores each of them
/// bounced between the cores (measured in docs/BENCHMARKS.md). `map`'s header starts the
/// second line and is only written when an entry is added or removed.
#[repr(C)]
pub(crate) struct Table<K, V> {
    /// Next version to hand out; starts at the wall clock (see `Cache` docs) and only grows.
    pub(crate) next_version: u64,
    pub(crate) counters: ShardCounters,
    map: HashTable<Entry<K, V>>,
    /// Entries that are tombstones.
    tombstones: usize,
    /// Entries that are dirty (`unsent != NONE || in_flight`).
    pub(crate) dirty: usize,
    /// Bumped whenever an entry leaves the table, so a read-through that started before can
    /// tell that its loaded value may be older than a delete that has come and gone.
    pub(crate) removals: u64,
}

/// What a write under the lock decided.
pub(crate) struct WriteOutcome<K, V> {
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
            next_version: first_version,
            counters: ShardCounters::default(),
            map: HashTable::new(),
            tombstones: 0,
            dirty: 0,
            removals: 0,
        }
    }

    /// Live (non-tombstone) entries.
    pub(crate) fn len(&self) -> usize {
        self.map.len() - self.tombstones
    }

    /// Looks a key up: `Some(Some(v))` a value, `Some(None)` a pending delete, `None` a miss.
    #[inline]
    pub(crate) fn get(&mut self, hash: u64, key: &K) -> Option<Option<V>> {
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
                },
                |e| e.hash,
            );
            self.dirty += 1;
            if is_delete {
                self.tombstones += 1;
            }
            WriteOutcome {
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
    pub(crate) fn set_local(&mut self, hash: u64, key: K, value: Option<V>) -> Option<V> {
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
            return old;
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
            },
            |e| e.hash,
        );
        if is_delete {
            self.tombstones += 1;
        }
        None
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

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;

    /// The lock word, `next_version` and the counters share the shard's first cache line.
    #[test]
    fn hot_fields_share_the_first_cache_line() {
        let m: Mutex<Table<u64, u64>> = Mutex::new(Table::new(1));
        let base = &m as *const _ as usize;
        let g = m.lock();
        let t: &Table<u64, u64> = &g;
        let data = t as *const _ as usize;
        let counters_end = &t.counters as *const _ as usize + std::mem::size_of::<ShardCounters>();
        let map = &t.map as *const _ as usize;
        assert_eq!(data - base, 8, "the raw lock comes first");
        assert_eq!(
            counters_end - base,
            64,
            "lock + next_version + counters = one line"
        );
        assert_eq!(map - base, 64, "the table header starts the second line");
    }
}
