//! [`Shard`]: one slice of the key space. Its table and every entry's bookkeeping live behind
//! one lock and are plain single-threaded code ([`Table`]); the dirty ring and the epoch next
//! to it are what writers and the owning flusher share without that lock.

use std::collections::VecDeque;
use std::mem::MaybeUninit;

use hashbrown::HashTable;

use crate::dirty_ring::DirtyRing;
use crate::loader::LoadSlot;
use crate::store::Write;
use crate::sync::atomic::{AtomicBool, AtomicU64};
use crate::sync::{Arc, CachePadded, Condvar, Mutex};

/// `Entry::unsent` when every write of the entry has been handed to the store.
pub(crate) const NONE: u64 = u64::MAX;
/// `Entry::queued_epoch` when the key is not on the ring for any epoch.
pub(crate) const NOT_QUEUED: u16 = 0;

/// A cached key as the hash table holds it: what a hit, an update and the flusher read and
/// write, 48 bytes for `u64` keys and values. What only expiry, eviction and a weigher need
/// ([`Side`]) sits at the entry's `slot` of a vector beside the table.
///
/// The value is `MaybeUninit` with a tombstone flag rather than an `Option`: an `Option<u64>`
/// takes 16 bytes, and the entry would be 56 (a half-full table holds twice the entry per
/// key). Smaller entries cost more than they save: with `persisted` in a slot beside the
/// table (40 bytes) the flusher's acknowledgement misses on that slot for every record; with
/// `unsent` there too (32 bytes) the first write of a key after the flusher took it writes a
/// line the flusher writes too. docs/ARCHITECTURE.md, "Entry state".
/// The value is initialised exactly when [`TOMB`] is clear; only [`Entry::new`],
/// [`Entry::value`], [`Entry::replace_value`] and `Drop` touch it.
#[repr(C)]
pub(crate) struct Entry<K, V> {
    key: K,
    value: MaybeUninit<V>,
    /// The S3-FIFO frequency and queue, the refresh flag and the tombstone flag (see
    /// [`FREQ`] and the flags after it). Right after the value: a hit reads the key, the
    /// value and this byte, and nothing else of the entry.
    bits: u8,
    /// A flusher holds a snapshot of this key (in a batch, or in its retry list).
    in_flight: bool,
    /// The epoch in which the key was last pushed on the ring (its low 16 bits, see
    /// [`Table::close_epoch`]), or [`NOT_QUEUED`] once the flusher has taken it. A write
    /// pushes the key unless this equals the open epoch.
    queued_epoch: u16,
    /// The entry's slot in the table's `side` vector.
    slot: u32,
    /// Version of the value (0 for a value loaded from the store or preloaded).
    version: u64,
    /// Version of the oldest write not yet handed to the store, or [`NONE`].
    unsent: u64,
    /// Highest version the store is known to hold (0: none). `wait_durable` reads it, the
    /// flusher's acknowledgement writes it.
    persisted: u64,
}

/// The part of an entry that a hit, an update of a cache without time-based rules or a
/// weigher, and the flusher never touch.
#[derive(Clone, Copy, Debug, Default)]
struct Side {
    /// Coarse time (ns) of the last write or load: time-to-live counts from here.
    born: u64,
    /// Coarse time (ns) of the last access: time-to-idle counts from here.
    accessed: u64,
    /// Weight given by the weigher (1 without one).
    weight: u32,
    /// Matches the entry's live position in the eviction queues (stale positions differ).
    stamp: u32,
}

/// Hints the CPU to fetch the cache line holding `p` in a state that allows a write
/// (`prefetchw` on x86-64, `prfm pstl1keep` on aarch64; nothing elsewhere or under Miri).
#[inline(always)]
fn prefetch_for_write(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: a prefetch is a hint: it reads no value into a register, writes no memory,
    // cannot fault (an unmapped or invalid address is ignored) and leaves the flags alone, so
    // any address is sound, and the options say exactly that.
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    // SAFETY: as above: `prfm` is a hint that neither faults nor changes memory or flags.
    unsafe {
        std::arch::asm!("prfm pstl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[cfg(any(miri, not(any(target_arch = "x86_64", target_arch = "aarch64"))))]
    let _ = p;
}

/// `Entry::bits`: the S3-FIFO access frequency (0..=3, kept only when the cache is bounded).
const FREQ: u8 = 0b0000_0011;
/// `Entry::bits`: in the main queue (else the small one).
const IN_MAIN: u8 = 0b0000_0100;
/// `Entry::bits`: an asynchronous refresh of this entry is scheduled or running.
const REFRESHING: u8 = 0b0000_1000;
/// `Entry::bits`: the entry holds no value (a pending or local delete, or a cached absence);
/// `Entry::value` is uninitialised.
const TOMB: u8 = 0b0001_0000;
/// `Entry::bits`: the value was written in `WriteMode::ReadOnly` and must never be sent; a
/// write-behind or write-through write of the key clears it. A batch of an older version that
/// was in flight when the local write came does not bring the key back to the store when it
/// fails ([`Table::retry_later`]).
const LOCAL: u8 = 0b0010_0000;

/// Most records a table keeps of keys that left memory while their latest write was not in
/// the store ([`Table::durable`]); past it, the oldest are folded into a version floor.
const UNDURABLE_MAX: usize = 4096;

impl<K, V> Entry<K, V> {
    fn new(key: K, value: Option<V>, version: u64, slot: u32, persisted: u64) -> Self {
        let (value, bits) = match value {
            Some(v) => (MaybeUninit::new(v), 0),
            None => (MaybeUninit::uninit(), TOMB),
        };
        Entry {
            key,
            value,
            version,
            unsent: NONE,
            queued_epoch: NOT_QUEUED,
            in_flight: false,
            bits,
            slot,
            persisted,
        }
    }

    /// The value, or `None` for a tombstone.
    #[inline]
    fn value(&self) -> Option<&V> {
        if self.bits & TOMB != 0 {
            None
        } else {
            // SAFETY: the value is initialised whenever TOMB is clear: `new` and
            // `replace_value` write it before clearing the flag, and nothing else clears it.
            Some(unsafe { self.value.assume_init_ref() })
        }
    }

    #[inline]
    fn is_tombstone(&self) -> bool {
        self.bits & TOMB != 0
    }

    /// Replaces the value (`None` leaves a tombstone) and returns the old one.
    #[inline]
    fn replace_value(&mut self, value: Option<V>) -> Option<V> {
        let old = if self.bits & TOMB != 0 {
            None
        } else {
            // SAFETY: TOMB is clear, so the value is initialised; it is moved out here and
            // the slot is either overwritten below or marked uninitialised with TOMB before
            // anything can read it again.
            Some(unsafe { self.value.assume_init_read() })
        };
        match value {
            Some(v) => {
                self.value.write(v);
                self.bits &= !TOMB;
            }
            None => self.bits |= TOMB,
        }
        old
    }

    #[inline]
    fn is_dirty(&self) -> bool {
        self.unsent != NONE || self.in_flight
    }

    #[inline]
    fn freq(&self) -> u8 {
        self.bits & FREQ
    }

    /// Counts an access (saturating at 3).
    #[inline]
    fn bump_freq(&mut self) {
        if self.bits & FREQ != FREQ {
            self.bits += 1;
        }
    }

    #[inline]
    fn set_freq(&mut self, f: u8) {
        debug_assert!(f <= FREQ);
        self.bits = (self.bits & !FREQ) | f;
    }

    #[inline]
    fn flag(&self, f: u8) -> bool {
        self.bits & f != 0
    }

    #[inline]
    fn set_flag(&mut self, f: u8, on: bool) {
        if on {
            self.bits |= f;
        } else {
            self.bits &= !f;
        }
    }
}

impl<K: Clone, V: Clone> Entry<K, V> {
    /// The write that would persist the entry as it is now.
    fn as_write(&self) -> Write<K, V> {
        match self.value() {
            Some(v) => Write::Put {
                key: self.key.clone(),
                value: v.clone(),
                version: self.version,
            },
            None => Write::Delete {
                key: self.key.clone(),
                version: self.version,
            },
        }
    }
}

impl<K, V> Drop for Entry<K, V> {
    fn drop(&mut self) {
        if self.bits & TOMB == 0 {
            // SAFETY: TOMB is clear, so the value is initialised, and it is dropped once:
            // the entry is going away.
            unsafe { self.value.assume_init_drop() }
        }
    }
}

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

/// Read-side settings of a table, all per shard; times in nanoseconds of the coarse clock,
/// 0 for "off".
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most entries (tombstones included).
    pub(crate) capacity: usize,
    /// Most total weight.
    pub(crate) max_weight: u64,
    pub(crate) ttl: u64,
    pub(crate) tti: u64,
    /// How long an absent key is remembered as absent (0: not cached).
    pub(crate) negative_ttl: u64,
    /// Age after which an access schedules a refresh (0: no refresh-ahead).
    pub(crate) refresh_after: u64,
    /// A weigher is set: entries' weights differ from 1.
    pub(crate) weighted: bool,
}

impl Limits {
    /// A capacity or weight bound is set: the table evicts.
    pub(crate) fn bounded(&self) -> bool {
        self.capacity != usize::MAX || self.max_weight != u64::MAX
    }

    /// A time-based rule is on (TTL, TTI, negative caching, refresh-ahead).
    pub(crate) fn timed(&self) -> bool {
        (self.ttl | self.tti | self.negative_ttl | self.refresh_after) != 0
    }
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

/// Whether a miss leads a load or joins one in flight.
pub(crate) enum LoadRole<V> {
    Leader(Arc<LoadSlot<V>>),
    Follower(Arc<LoadSlot<V>>),
}

/// A key with a write-through in flight: its writer calls the store without the table lock,
/// and a second write-through of the key waits until this one is done
/// ([`Table::begin_through`]), so the key's versions reach the store in order.
struct Through<K> {
    key: K,
    hash: u64,
    /// Another write-through of the key waits for this one.
    waited: bool,
}

/// A key that left memory while the store did not hold its latest write (a write given up
/// to the failed-writes sink, or a local write of `WriteMode::ReadOnly`), so that
/// [`Table::durable`] never acknowledges that write once nothing in memory remembers it.
struct Undurable<K> {
    key: K,
    hash: u64,
    /// The highest version the store is known to hold.
    persisted: u64,
    /// The key's latest version when it left memory.
    version: u64,
    /// That version was given up (it is in the failed-writes sink).
    given_up: bool,
}

/// Whether the store holds a version of a key ([`Table::durable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The store holds this version or a newer one.
    Durable,
    /// Not yet, or never (a local write).
    Pending,
    /// The write was given up: it went to the failed-writes sink.
    GivenUp,
}

/// A load in flight for a key (single-flight). A miss of the key joins it while it is in
/// the table; a write, remove or eviction of the key takes it out ([`Table::touch_loading`]).
struct Loading<K, V> {
    key: K,
    hash: u64,
    slot: Arc<LoadSlot<V>>,
}

/// The S3-FIFO queues: new keys enter `small`; keys accessed again while there move to
/// `main`, the others leave (remembered in `ghost`, so a quick return goes straight to
/// `main`); `main` is a CLOCK over the frequency bits. Dirty entries are pinned: passed over
/// and kept until they are written.
struct Queues<K> {
    small: VecDeque<(K, u64, u32)>,
    main: VecDeque<(K, u64, u32)>,
    small_live: usize,
    ghost: VecDeque<u64>,
    ghost_set: HashTable<u64>,
    next_stamp: u32,
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
    map: HashTable<Entry<K, V>>,
    hits: u64,
    /// Next version to hand out; starts at the wall clock (see `Cache` docs) and only grows.
    pub(crate) next_version: u64,
    /// Writes that found their key already queued in the open epoch.
    conflated: u64,
    // -- second line
    /// Entries that are dirty (`unsent != NONE || in_flight`).
    pub(crate) dirty: u32,
    /// The open epoch (starts at 1; [`NOT_QUEUED`] is never an epoch). A write pushes its
    /// key unless the entry was already queued in this epoch; the flusher closes it (one
    /// increment under this lock, [`Table::close_epoch`]) before it drains the ring.
    epoch: u16,
    /// Backpressure: the table reached its dirty limit and admits no new dirty entry until
    /// it is back at the low watermark.
    pressured: bool,
    /// A time-based rule is on or a weigher is set: a write updates the entry's [`Side`]
    /// (kept here so an update reads no cold line).
    write_side: bool,
    /// Keys in `through` (kept here so a write-behind put reads no cold line to learn that
    /// no write-through is in flight).
    throughs: u32,
    /// Loads in flight (single-flight read-through).
    loading: HashTable<Loading<K, V>>,
    // -- cold
    /// Keys with a write-through in flight ([`Table::begin_through`]).
    through: HashTable<Through<K>>,
    /// The entries' side state (see [`Side`]), by slot.
    side: Vec<Side>,
    /// Slots no entry holds.
    free: Vec<u32>,
    /// The counters off the hot path (`hits` and `conflated` are kept above and `puts` is
    /// derived: they stay zero here; [`Table::counters`] joins them).
    rare: ShardCounters,
    /// `next_version` when the table was built, plus the versions handed out since by
    /// [`Table::next_version`] that no [`Table::count_write_through`] counted (write-through
    /// writes in flight or failed): `next_version` less this is the writes accepted.
    version_base: u64,
    /// Entries that are tombstones.
    tombstones: usize,
    limits: Limits,
    /// Sum of the entries' weights.
    weight: u64,
    queues: Queues<K>,
    /// The cache's hasher, to rehash keys when the table grows.
    hasher: ahash::RandomState,
    /// Keys that left memory with a write the store does not hold ([`Undurable`]).
    undurable: HashTable<Undurable<K>>,
    /// Versions at or below this may belong to a record that [`UNDURABLE_MAX`] pushed out:
    /// an absent key's write at or below it is never acknowledged.
    undurable_floor: u64,
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
}

/// A snapshot the flusher took: the write to send and the oldest version it covers.
pub(crate) struct Snapshot<K, V> {
    pub(crate) write: Write<K, V>,
    pub(crate) first: u64,
}

impl<K> Queues<K> {
    /// Positions in the queues beyond the live entries (an upper bound of the stale ones).
    fn stale(&self) -> usize {
        self.small.len() + self.main.len()
    }
}

impl<K> Default for Queues<K> {
    fn default() -> Self {
        Queues {
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_live: 0,
            ghost: VecDeque::new(),
            ghost_set: HashTable::new(),
            next_stamp: 0,
        }
    }
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

    /// `true` if `e` has expired at `now` (never for a dirty entry).
    fn expired_at(&self, e: &Entry<K, V>, now: u64) -> bool {
        self.limits.timed() && Self::expired(&self.limits, e, &self.side[e.slot as usize], now)
    }

    /// The entry of `key`, if the table holds it.
    #[inline(always)]
    fn find(&self, hash: u64, key: &K) -> Option<&Entry<K, V>> {
        self.map.find(hash, |e| e.key == *key)
    }

    fn expired(limits: &Limits, e: &Entry<K, V>, side: &Side, now: u64) -> bool {
        if e.is_dirty() {
            return false; // written first, then it may go
        }
        if e.is_tombstone() && e.version == 0 {
            return now >= side.born.saturating_add(limits.negative_ttl);
        }
        (limits.ttl != 0 && now >= side.born.saturating_add(limits.ttl))
            || (limits.tti != 0 && now >= side.accessed.saturating_add(limits.tti))
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
            && Self::expired(&limits, e, side, now)
        {
            self.rare.expirations += 1;
            self.rare.misses += 1;
            self.remove_entry(hash, key);
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
    fn over_limit(&mut self, high: usize, low: usize) -> bool {
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

    /// Whether the store holds `version` of the key or a newer one. An entry knows the
    /// highest version the store holds; a key that left memory is durable unless it left
    /// with a write the store does not hold ([`Undurable`], [`Table::undurable_floor`]).
    pub(crate) fn durable(&self, hash: u64, key: &K, version: u64) -> Durability {
        if let Some(e) = self.find(hash, key) {
            return if e.persisted >= version {
                Durability::Durable
            } else {
                Durability::Pending
            };
        }
        match self.undurable.find(hash, |u| u.key == *key) {
            Some(u) if version <= u.persisted => Durability::Durable,
            Some(u) if u.given_up && version <= u.version => Durability::GivenUp,
            Some(_) => Durability::Pending,
            None if version <= self.undurable_floor => Durability::Pending,
            None => Durability::Durable,
        }
    }

    /// Remembers that `key` leaves memory while the store holds only `persisted` of it and
    /// its latest write is `version` (see [`Undurable`]).
    fn note_undurable(&mut self, hash: u64, key: K, persisted: u64, version: u64, given_up: bool) {
        if let Ok(occ) = self.undurable.find_entry(hash, |u| u.key == key) {
            occ.remove();
        }
        if self.undurable.len() >= UNDURABLE_MAX {
            // Fold an arbitrary record into the floor: its key's writes up to its version are
            // never acknowledged from now on, nor are other absent keys' (a false "not yet" for
            // an old version that was in fact written, never a false acknowledgement).
            let mut oldest = None;
            if let Some(u) = self.undurable.iter().next() {
                oldest = Some((u.hash, u.version));
            }
            if let Some((h, v)) = oldest {
                self.undurable_floor = self.undurable_floor.max(v);
                if let Ok(occ) = self.undurable.find_entry(h, |u| u.version == v) {
                    occ.remove();
                }
            }
        }
        let rec = Undurable {
            key,
            hash,
            persisted,
            version,
            given_up,
        };
        self.undurable.insert_unique(hash, rec, |u| u.hash);
    }

    /// A key comes back into memory: what its record knew moves into the entry.
    fn recall_undurable(&mut self, hash: u64, key: &K) -> u64 {
        if self.undurable.is_empty() {
            return 0;
        }
        match self.undurable.find_entry(hash, |u| u.key == *key) {
            Ok(occ) => occ.remove().0.persisted,
            Err(_) => 0,
        }
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
    pub(crate) fn next_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        self.version_base += 1;
        v
    }

    /// Starts a write-through of `key`: its version, or `None` while another write-through of
    /// the key is in flight (the caller waits on [`Shard::through_done`] and asks again).
    /// Two write-throughs of one key that overlapped would call the store in either order,
    /// so the store could receive the older version after the newer one, and the cache keep
    /// the older value; one at a time per key, each takes its version when it starts, and the
    /// store and the cache see the key's versions in order. Until [`Table::end_through`] the
    /// key stays marked.
    pub(crate) fn begin_through(&mut self, hash: u64, key: &K) -> Option<u64> {
        if self.through_in_flight(hash, key) {
            return None;
        }
        let mark = Through {
            key: key.clone(),
            hash,
            waited: false,
        };
        self.through.insert_unique(hash, mark, |t| t.hash);
        self.throughs += 1;
        Some(self.next_version())
    }

    /// A write-through of `key` is in flight. If so, it is asked to notify
    /// [`Shard::through_done`] when it ends, for the caller, which is about to wait: another
    /// write-through of the key, or a write-behind write after a switch back to `Behind`
    /// (its batch could otherwise reach the store while the older write-through is there).
    #[inline]
    pub(crate) fn through_in_flight(&mut self, hash: u64, key: &K) -> bool {
        if self.throughs == 0 {
            return false;
        }
        match self.through.find_mut(hash, |t| t.key == *key) {
            Some(t) => {
                t.waited = true;
                true
            }
            None => false,
        }
    }

    /// `key` has write-behind work the store does not hold yet: a write still to send, or a
    /// batch (or retry) in flight. A write-through of such a key (after a switch to
    /// `WriteMode::Through`) holds the owning flusher's core so that no batch with the key's
    /// older version is at the store at the same time.
    pub(crate) fn has_behind_work(&self, hash: u64, key: &K) -> bool {
        self.find(hash, key).is_some_and(Entry::is_dirty)
    }

    /// Ends the write-through of `key` that [`Table::begin_through`] started. Returns `true`
    /// if another write-through of the key waits for it (the caller then notifies
    /// [`Shard::through_done`] once it has released the lock).
    pub(crate) fn end_through(&mut self, hash: u64, key: &K) -> bool {
        match self.through.find_entry(hash, |t| t.key == *key) {
            Ok(mark) => {
                self.throughs -= 1;
                mark.remove().0.waited
            }
            Err(_) => false,
        }
    }

    /// A write-through write with a version from [`Table::next_version`] reached the store:
    /// count it as a put or a remove (a failed one stays uncounted, as it was not accepted).
    pub(crate) fn count_write_through(&mut self, is_delete: bool) {
        // `puts` is the versions handed out less `version_base` less the removes.
        self.version_base -= 1;
        if is_delete {
            self.rare.removes += 1;
        }
    }

    /// Hands out a version for a write of `key` and counts it; any load of the key in flight
    /// becomes stale.
    #[inline]
    fn begin_write(&mut self, hash: u64, key: &K, is_delete: bool) -> u64 {
        let version = self.next_version;
        self.next_version += 1;
        // A put is counted by its version (`Table::counters`); a remove here.
        if is_delete {
            self.rare.removes += 1;
        }
        self.touch_loading(hash, key);
        version
    }

    /// Something happened to `key` (a write, a remove, an eviction): a load of it in flight
    /// may have read the store before that, so it is taken out of the single-flight table.
    /// Its leader and the gets that already follow it still get its result (each of them
    /// began before this change, so the older value is one they may see), but the leader
    /// does not cache it ([`Table::finish_load`] no longer finds it), and a miss from now on
    /// starts a new load instead of following one that may return what this change replaced.
    /// (Marking the load stale and leaving it joinable let a get that began after a remove
    /// returned follow a load that read the removed value: tests/linearizability.rs,
    /// `per_key_linearizable_flush_order_and_write_through_backpressure`.)
    #[inline]
    fn touch_loading(&mut self, hash: u64, key: &K) {
        if !self.loading.is_empty() {
            if let Ok(occ) = self.loading.find_entry(hash, |l| l.key == *key) {
                occ.remove();
            }
        }
    }

    /// A slot of the `side` vector for a new entry (a free one, else a new one).
    fn take_slot(&mut self, now: u64, weight: u32) -> u32 {
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
    fn insert(
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
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
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
            // The caller's key goes on the ring; the table already holds one.
            WriteOutcome {
                version,
                old,
                ring_key: push.then_some(key),
                over_capacity: false,
            }
        } else {
            let ring_key = key.clone();
            let e = self.insert(hash, key, value, version, 0, now, weight);
            e.queued_epoch = open_epoch;
            e.unsent = version;
            self.dirty += 1;
            let over_capacity = self.enforce();
            WriteOutcome {
                version,
                old: None,
                ring_key: Some(ring_key),
                over_capacity,
            }
        }
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
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            if e.version >= version || (version == 0 && e.is_dirty()) {
                return e.value().cloned();
            }
            // A newer, stored version (write-through): it replaces even a dirty older value;
            // the flusher then sends this same version again, never an older one.
            let was_tombstone = e.is_tombstone();
            // Dropped after the table is updated, still under the lock.
            let _old = e.replace_value(Some(value.clone()));
            e.version = version;
            e.set_flag(LOCAL, false);
            e.persisted = e.persisted.max(version);
            let side = &mut self.side[e.slot as usize];
            side.born = now;
            side.accessed = now;
            let old_weight = std::mem::replace(&mut side.weight, weight);
            if was_tombstone {
                self.tombstones -= 1;
            }
            self.weight = self.weight + u64::from(weight) - u64::from(old_weight);
            return Some(value);
        }
        self.insert(
            hash,
            key,
            Some(value.clone()),
            version,
            version,
            now,
            weight,
        );
        self.enforce();
        Some(value)
    }

    /// A miss: join the load of `key` in flight, or lead a new one.
    pub(crate) fn join_load(&mut self, hash: u64, key: &K) -> LoadRole<V> {
        if let Some(l) = self.loading.find(hash, |l| l.key == *key) {
            self.rare.load_waits += 1;
            return LoadRole::Follower(l.slot.clone());
        }
        let slot = Arc::new(LoadSlot::new());
        self.loading.insert_unique(
            hash,
            Loading {
                key: key.clone(),
                hash,
                slot: slot.clone(),
            },
            |l| l.hash,
        );
        LoadRole::Leader(slot)
    }

    /// The leader's load (the one publishing to `slot`) finished successfully: cache the
    /// result unless the key was written, removed or evicted meanwhile (then what is in
    /// memory, or the loaded value, is the answer but nothing is cached). Absent keys are
    /// cached as absent when negative caching is on. Returns what the callers see, and
    /// whether a loaded value was cached.
    pub(crate) fn finish_load(
        &mut self,
        hash: u64,
        key: &K,
        slot: &LoadSlot<V>,
        loaded: Option<V>,
        now: u64,
        weight: u32,
    ) -> (Option<V>, bool) {
        self.rare.loads += 1;
        // Still in the table means nothing touched the key since the load began. (Another
        // load of the key may be there instead: one a later miss started after this one was
        // taken out.)
        let stale = match self.loading.find_entry(hash, |l| {
            l.key == *key && std::ptr::eq(Arc::as_ptr(&l.slot), slot)
        }) {
            Ok(occ) => {
                occ.remove();
                false
            }
            Err(_) => true,
        };
        if let Some(e) = self.find(hash, key) {
            return (e.value().cloned(), false);
        }
        if stale {
            return (loaded, false);
        }
        match loaded {
            Some(v) => (self.fill_clean(hash, key.clone(), v, 0, now, weight), true),
            None => {
                if self.limits.negative_ttl != 0 {
                    self.insert(hash, key.clone(), None, 0, 0, now, 1);
                    self.enforce();
                }
                (None, false)
            }
        }
    }

    /// The leader's load (publishing to `slot`) failed: forget it, if it is still in the
    /// table (followers get the error through the slot).
    pub(crate) fn abort_load(&mut self, hash: u64, key: &K, slot: &LoadSlot<V>) {
        if let Ok(occ) = self.loading.find_entry(hash, |l| {
            l.key == *key && std::ptr::eq(Arc::as_ptr(&l.slot), slot)
        }) {
            occ.remove();
        }
    }

    /// An asynchronous refresh finished. The new value replaces the entry only if the entry
    /// is still the one the refresh was scheduled for (same version, clean): a refresh never
    /// overwrites a write. A failure keeps the old value until it really expires.
    pub(crate) fn finish_refresh(
        &mut self,
        hash: u64,
        key: &K,
        version: u64,
        loaded: Result<Option<V>, ()>,
        now: u64,
    ) {
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return;
        };
        e.set_flag(REFRESHING, false);
        match loaded {
            Err(()) => self.rare.refresh_failures += 1,
            Ok(_) if e.version != version || e.is_dirty() => {}
            Ok(Some(v)) => {
                if e.replace_value(Some(v)).is_none() {
                    // A clean tombstone at version 0 is a cached absence; a refresh is only
                    // scheduled for an entry that held a value, but keep the count right.
                    self.tombstones -= 1;
                }
                let side = &mut self.side[e.slot as usize];
                side.born = now;
                side.accessed = now;
                self.rare.refreshes += 1;
            }
            Ok(None) => {
                // Deleted in the store by someone else: forget it.
                self.rare.refreshes += 1;
                self.remove_entry(hash, key);
            }
        }
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
        if !e.is_dirty() {
            self.remove_entry(hash, key);
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
        if let Some(e) = self.map.find_mut(hash, |e| e.key == key) {
            let was_tombstone = e.is_tombstone();
            let was_dirty = e.is_dirty();
            let old = e.replace_value(value);
            e.version = version;
            e.set_flag(LOCAL, true);
            let side = &mut self.side[e.slot as usize];
            side.born = now;
            side.accessed = now;
            let old_weight = std::mem::replace(&mut side.weight, weight);
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
            return (version, old);
        }
        self.insert(hash, key, value, version, 0, now, weight)
            .set_flag(LOCAL, true);
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
        let (e, _) = occ.remove();
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
    fn forget(&mut self, mut e: Entry<K, V>) -> Write<K, V> {
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
            && Self::expired(&limits, e, &self.side[e.slot as usize], now);
        self.dirty -= 1;
        if tombstone_done {
            self.remove_entry(hash, key);
        } else if expired {
            self.rare.expirations += 1;
            self.remove_entry(hash, key);
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
        self.remove_entry(hash, key);
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
    fn release_entry(e: &mut Entry<K, V>) -> bool {
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
        let taken: Vec<Entry<K, V>> = self.map.extract_if(|e| stuck.contains(&e.slot)).collect();
        for e in taken {
            self.dirty -= 1;
            let w = self.forget(e);
            out.push(w);
        }
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

    /// Removes every clean entry that has expired at `now`, without a read touching it: the
    /// flushers call it periodically. Returns how many left.
    pub(crate) fn sweep_expired(&mut self, now: u64) -> usize {
        if (self.limits.ttl | self.limits.tti | self.limits.negative_ttl) == 0 {
            return 0;
        }
        let limits = self.limits;
        let side = &self.side;
        let gone: Vec<Entry<K, V>> = self
            .map
            .extract_if(|e| Self::expired(&limits, e, &side[e.slot as usize], now))
            .collect();
        let n = gone.len();
        for e in gone {
            self.rare.expirations += 1;
            let (persisted, version) = (e.persisted, e.version);
            if persisted < version {
                // A local write: never acknowledged, also once it has left.
                if let Ok(k) = crate::guard::catch(|| e.key.clone()) {
                    let hash = self.hasher.hash_one(&k);
                    self.note_undurable(hash, k, persisted, version, false);
                } else {
                    self.undurable_floor = self.undurable_floor.max(version);
                }
            }
            let w = self.forget(e);
            crate::guard::drop_quietly(w);
        }
        n
    }

    /// `true` while the table holds more than its capacity or weight allows.
    fn over_capacity(&self) -> bool {
        self.map.len() > self.limits.capacity || self.weight > self.limits.max_weight
    }

    /// Evicts clean entries (S3-FIFO) until the table fits. Dirty entries are pinned: passed
    /// over, never dropped. Returns `true` if the table is still too big because too much of
    /// it is dirty (the caller then asks the flusher to write early).
    fn enforce(&mut self) -> bool {
        if !self.limits.bounded() || !self.over_capacity() {
            return false;
        }
        let small_target = (self.limits.capacity / 10).max(1);
        let mut budget = 2 * (self.queues.small.len() + self.queues.main.len()) + 4;
        while self.over_capacity() && budget > 0 {
            budget -= 1;
            let from_small = self.queues.small_live > small_target || self.queues.main.is_empty();
            let popped = if from_small {
                self.queues.small.pop_front()
            } else {
                self.queues.main.pop_front()
            };
            let Some((key, hash, stamp)) = popped else {
                break;
            };
            let side = &self.side;
            let Some(e) = self.map.find_mut(hash, |e| {
                e.key == key && side[e.slot as usize].stamp == stamp
            }) else {
                continue; // a stale position: the entry left or was re-inserted
            };
            if from_small == e.flag(IN_MAIN) {
                continue; // moved to the other queue since
            }
            if e.is_dirty() {
                // Pinned until written: keep its place at the back.
                let q = if from_small {
                    &mut self.queues.small
                } else {
                    &mut self.queues.main
                };
                q.push_back((key, hash, stamp));
                continue;
            }
            if from_small {
                if e.freq() > 0 {
                    e.set_freq(0);
                    e.set_flag(IN_MAIN, true);
                    self.queues.small_live -= 1;
                    self.queues.main.push_back((key, hash, stamp));
                    continue;
                }
                // Remember it briefly: a quick return goes straight to the main queue.
                let q = &mut self.queues;
                if q.ghost.len() >= self.limits.capacity.min(1 << 20) {
                    if let Some(old) = q.ghost.pop_front() {
                        if let Ok(occ) = q.ghost_set.find_entry(old, |h| *h == old) {
                            occ.remove();
                        }
                    }
                }
                if q.ghost_set.find(hash, |h| *h == hash).is_none() {
                    q.ghost.push_back(hash);
                    q.ghost_set.insert_unique(hash, hash, |h| *h);
                }
            } else if e.freq() > 0 {
                e.set_freq(e.freq() - 1);
                self.queues.main.push_back((key, hash, stamp));
                continue;
            }
            self.rare.evictions += 1;
            self.remove_entry(hash, &key);
        }
        self.over_capacity()
    }

    /// Removes the entry of `key` (and takes a load of it in flight out of the single-flight
    /// table).
    /// A local write (`WriteMode::ReadOnly`) that leaves is remembered, so that it is never
    /// acknowledged ([`Table::durable`]). A panic in the key's or value's `Drop` is caught.
    fn remove_entry(&mut self, hash: u64, key: &K) {
        if let Ok(occ) = self.map.find_entry(hash, |e| e.key == *key) {
            let (e, _) = occ.remove();
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
            crate::guard::drop_quietly(w);
        }
    }

    /// Drops the eviction queues' stale positions (entries that left or were re-inserted):
    /// they are skipped by `enforce`, which only runs over capacity, so without this a cache
    /// under its capacity with churning keys would grow them without bound.
    fn compact_queues(&mut self) {
        let map = &self.map;
        let side = &self.side;
        let live = |pos: &(K, u64, u32), in_main: bool| {
            map.find(pos.1, |e| {
                e.key == pos.0 && side[e.slot as usize].stamp == pos.2 && e.flag(IN_MAIN) == in_main
            })
            .is_some()
        };
        self.queues.small.retain(|p| live(p, false));
        self.queues.main.retain(|p| live(p, true));
        self.queues.small_live = self.queues.small.len();
    }
}

/// Bytes of padding in a [`Shard`] (see `Shard::_stride`): the fields alone come to an odd
/// multiple of 128 bytes (1,152), so none is needed. A change
/// to the fields may need 128.
const STRIDE_PAD: usize = 0;

/// One shard: the locked table plus the lock-free parts writers and the flusher share.
pub(crate) struct Shard<K, V> {
    pub(crate) table: CachePadded<Mutex<Table<K, V>>>,
    /// Keys that became dirty in an epoch, for the flusher.
    pub(crate) ring: DirtyRing<K>,
    /// A key was pushed since the flusher last closed this shard's epoch: its delay runs.
    pub(crate) armed: AtomicBool,
    /// When the writer that armed the shard did (clock nanoseconds): stored before `armed`
    /// is set, so a flusher that finds it armed reads this arming's time or a racing
    /// writer's a moment later.
    pub(crate) armed_at: AtomicU64,
    /// The ring reached the count trigger.
    pub(crate) triggered: AtomicBool,
    /// Signalled when a write-through that another one waits for ends
    /// ([`Table::end_through`]).
    pub(crate) through_done: Condvar,
    /// A push found the ring full: the flusher must scan the table for dirty keys.
    pub(crate) overflow: AtomicBool,
    /// Makes the shard's size an odd multiple of 128 bytes. The shards sit in one array, and
    /// at a power-of-two stride every shard's lock line would fall into the same few sets of
    /// the L1 cache: 64 shards would evict each other's hot line, and a get takes about three
    /// times as long on a table that fits in L2 that way. The unit test
    /// `shard_stride_is_an_odd_multiple_of_128` keeps it so: [`STRIDE_PAD`] is what the
    /// fields need to get there.
    _stride: [u8; STRIDE_PAD],
}

impl<K: Eq + Clone + std::hash::Hash, V: Clone> Shard<K, V> {
    pub(crate) fn new(
        first_version: u64,
        ring_capacity: usize,
        limits: Limits,
        hasher: ahash::RandomState,
    ) -> Self {
        Shard {
            table: CachePadded::new(Mutex::new(Table::new(first_version, limits, hasher))),
            ring: DirtyRing::new(ring_capacity),
            armed: AtomicBool::new(false),
            armed_at: AtomicU64::new(0),
            triggered: AtomicBool::new(false),
            through_done: Condvar::new(),
            overflow: AtomicBool::new(false),
            _stride: [0; STRIDE_PAD],
        }
    }
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;
    use crate::sync::atomic::Ordering;

    /// The table takes the hash from the caller; it must be the table's own hasher's (the
    /// table rehashes with it when it grows).
    fn hasher() -> ahash::RandomState {
        ahash::RandomState::with_seeds(1, 2, 3, 4)
    }

    fn h(k: u64) -> u64 {
        hasher().hash_one(k)
    }

    const UNBOUNDED: Limits = Limits {
        capacity: usize::MAX,
        max_weight: u64::MAX,
        ttl: 0,
        tti: 0,
        negative_ttl: 0,
        refresh_after: 0,
        weighted: false,
    };

    fn table() -> Table<u64, u64> {
        Table::new(100, UNBOUNDED, hasher())
    }

    /// A put in `epoch` (the open epoch moves there first, as the flusher would move it).
    fn put(t: &mut Table<u64, u64>, k: u64, v: u64, epoch: u16) -> bool {
        t.epoch = epoch;
        t.write(h(k), k, Some(v), 0, 1).ring_key.is_some()
    }

    fn del(t: &mut Table<u64, u64>, k: u64, epoch: u16) {
        t.epoch = epoch;
        t.write(h(k), k, None, 0, 1);
    }

    /// `Some(v)` for a hit (`v` is `None` for a pending delete), `None` for a miss.
    fn look(t: &mut Table<u64, u64>, k: u64) -> Option<Option<u64>> {
        match t.get(h(k), &k, 0) {
            Lookup::Hit(v) => Some(v),
            Lookup::HitRefresh(v, _) => Some(Some(v)),
            Lookup::Miss => None,
        }
    }

    /// A whole read-through: lead the load, then finish it with `loaded`.
    fn load(t: &mut Table<u64, u64>, k: u64, loaded: Option<u64>) -> Option<u64> {
        let slot = lead(t, k);
        t.finish_load(h(k), &k, &slot, loaded, 0, 1).0
    }

    /// Joins the load of `k` as its leader (the test fails if a load was in flight).
    fn lead(t: &mut Table<u64, u64>, k: u64) -> Arc<LoadSlot<u64>> {
        match t.join_load(h(k), &k) {
            LoadRole::Leader(slot) => slot,
            LoadRole::Follower(_) => panic!("a load of {k} was in flight"),
        }
    }

    #[test]
    fn first_write_in_an_epoch_pushes_later_ones_conflate() {
        let mut t = table();
        assert!(put(&mut t, 1, 10, 1), "a new key goes on the ring");
        assert!(!put(&mut t, 1, 11, 1), "same epoch: conflated");
        assert_eq!(t.counters().conflated, 1);
        assert!(put(&mut t, 1, 12, 2), "next epoch: pushed again");
        assert_eq!(look(&mut t, 1), Some(Some(12)));
        assert_eq!((t.len(0), t.dirty), (1, 1));
        assert_eq!(t.next_version, 103, "one version per write");
        assert_eq!(
            t.unsent_of(h(1), &1),
            100,
            "the oldest unsent version is kept"
        );
    }

    /// The put count is derived from the versions handed out (`Table::counters`): every
    /// kind of write must land in the right count.
    #[test]
    fn counters_follow_every_kind_of_write() {
        let mut t = table();
        assert!(put(&mut t, 1, 10, 1), "new key: queued");
        assert!(!put(&mut t, 1, 11, 1), "conflated");
        del(&mut t, 1, 1); // a remove that conflates
        del(&mut t, 2, 1); // a remove of a key not cached: queued
        assert!(put(&mut t, 1, 12, 2), "next epoch: queued");
        let _ = t.next_version(); // a write-through the store failed: not counted
        let _ = t.next_version(); // a write-through put the store took
        t.count_write_through(false);
        let _ = t.next_version(); // a write-through remove the store took
        t.count_write_through(true);
        t.set_local(h(3), 3, Some(30), 0, 1); // read-only mode: a put, never conflated
        t.set_local(h(3), 3, Some(31), 0, 1);
        assert!(!put(&mut t, 1, 13, 2), "conflated after the other writes");
        let c = t.counters();
        assert_eq!(c.puts, 7, "puts through write, set_local and write-through");
        assert_eq!(c.removes, 3);
        assert_eq!(
            c.conflated, 3,
            "two puts and one remove found their key queued"
        );
        assert_eq!(t.next_version, 111, "one version per write of any kind");
    }

    #[test]
    fn take_snapshots_the_latest_value_and_marks_in_flight() {
        let mut t = table();
        put(&mut t, 1, 10, 1);
        put(&mut t, 1, 11, 1);
        let snap = t.take(h(1), &1, false).unwrap().expect("dirty key");
        assert_eq!(
            snap.write,
            Write::Put {
                key: 1,
                value: 11,
                version: 101
            }
        );
        assert_eq!(snap.first, 100);
        assert!(
            t.take(h(1), &1, false).unwrap().is_none(),
            "in flight: not taken twice"
        );
        assert!(t.persisted(h(1), &1, 101, 0));
        assert_eq!(t.dirty, 0);
        assert_eq!(t.unsent_of(h(1), &1), NONE);
        assert_eq!(
            look(&mut t, 1),
            Some(Some(11)),
            "a clean entry stays cached"
        );
    }

    /// Epoch tags are 16 bits: 65,535 closes later the open epoch has the tag a queued entry
    /// still carries. A write then conflates into it, and the pending take carries that
    /// write, as it does for any write that conflates.
    #[test]
    fn an_epoch_tag_that_comes_round_again_conflates_into_the_pending_take() {
        let mut t = table();
        assert!(put(&mut t, 1, 10, 1));
        for _ in 0..u16::MAX {
            t.close_epoch();
            assert_ne!(t.epoch, NOT_QUEUED, "NOT_QUEUED is never an open epoch");
        }
        assert_eq!(t.epoch, 1, "the tags 1..=65535 came round");
        let w = t.write(h(1), 1, Some(11), 0, 1);
        assert!(w.ring_key.is_none(), "the same tag: conflated");
        let snap = t
            .take(h(1), &1, false)
            .unwrap()
            .expect("the take the queued key is waiting for");
        assert_eq!((snap.write.value(), snap.first), (Some(&11), 100));
        assert!(
            t.write(h(1), 1, Some(12), 0, 1).ring_key.is_some(),
            "after the take a write pushes again, whatever the tag"
        );
    }

    /// The early-drain race: a key pushed in the open epoch and drained early must be pushed
    /// again by a later write in that same epoch, or that write never reaches the ring.
    #[test]
    fn a_write_after_take_in_the_same_epoch_pushes_again() {
        let mut t = table();
        assert!(put(&mut t, 1, 10, 2));
        let snap = t.take(h(1), &1, false).unwrap().unwrap();
        assert!(put(&mut t, 1, 11, 2), "the key must go on the ring again");
        assert!(
            !t.persisted(h(1), &1, snap.write.version(), 0),
            "a newer write keeps the entry dirty"
        );
        assert_eq!(t.dirty, 1);
        let again = t.take(h(1), &1, false).unwrap().unwrap();
        assert_eq!(again.write.value(), Some(&11));
        assert!(t.persisted(h(1), &1, again.write.version(), 0));
        assert_eq!(t.dirty, 0);
    }

    #[test]
    fn persisted_delete_drops_the_tombstone() {
        let mut t = table();
        put(&mut t, 1, 10, 1);
        del(&mut t, 1, 1);
        assert_eq!(t.len(0), 0, "a tombstone is not a live entry");
        assert_eq!(look(&mut t, 1), Some(None), "a pending delete answers None");
        assert!(!t.contains(h(1), &1, 0));
        let snap = t.take(h(1), &1, false).unwrap().unwrap();
        assert!(snap.write.is_delete());
        assert!(t.persisted(h(1), &1, snap.write.version(), 0));
        assert_eq!(look(&mut t, 1), None, "the entry left the table");
        assert_eq!((t.dirty, t.tombstones), (0, 0));
    }

    #[test]
    fn retry_keeps_ownership_and_the_oldest_version() {
        let mut t = table();
        put(&mut t, 1, 10, 1);
        let snap = t.take(h(1), &1, false).unwrap().unwrap();
        t.retry_later(h(1), &1, snap.first);
        assert_eq!(t.unsent_of(h(1), &1), 100);
        put(&mut t, 1, 11, 2);
        assert!(
            t.take(h(1), &1, false).unwrap().is_none(),
            "the retry list owns the key; a ring entry must not send it too"
        );
        let retried = t
            .take(h(1), &1, true)
            .unwrap()
            .expect("the retry list takes it");
        assert_eq!(
            retried.first, 100,
            "the retry covers the first failed version"
        );
        assert_eq!(retried.write.version(), 101, "and carries the latest value");
        assert!(t.persisted(h(1), &1, 101, 0));
        assert_eq!(t.dirty, 0);
        // A retry of a key that has nothing unsent any more just releases it.
        put(&mut t, 2, 20, 3);
        let s2 = t.take(h(2), &2, false).unwrap().unwrap();
        assert!(t.persisted(h(2), &2, s2.write.version(), 0));
        assert!(t.take(h(2), &2, true).unwrap().is_none());
        assert_eq!(t.dirty, 0);
    }

    #[test]
    fn abandon_cleans_or_keeps_a_newer_write() {
        let mut t = table();
        put(&mut t, 1, 10, 1);
        let v1 = t.take(h(1), &1, false).unwrap().unwrap().write.version();
        t.abandon(h(1), &1, v1);
        assert_eq!(t.dirty, 0);
        assert_eq!(look(&mut t, 1), None, "a given-up value leaves memory");
        assert_eq!(t.durable(h(1), &1, v1), Durability::GivenUp);

        del(&mut t, 2, 1);
        let v2 = t.take(h(2), &2, false).unwrap().unwrap().write.version();
        t.abandon(h(2), &2, v2);
        assert_eq!(look(&mut t, 2), None, "an abandoned tombstone is dropped");
        assert_eq!(t.durable(h(2), &2, v2), Durability::GivenUp);

        put(&mut t, 3, 30, 1);
        let v3 = t.take(h(3), &3, false).unwrap().unwrap().write.version();
        put(&mut t, 3, 31, 1);
        t.abandon(h(3), &3, v3);
        assert_eq!(t.dirty, 1, "the newer write still goes to the store");
        assert!(t.take(h(3), &3, false).unwrap().is_some());
    }

    #[test]
    fn loaded_values_never_shadow_writes() {
        let mut t = table();
        // A write that happened while the load ran wins.
        let slot = lead(&mut t, 1);
        put(&mut t, 1, 10, 1);
        assert_eq!(
            t.finish_load(h(1), &1, &slot, Some(5), 0, 1),
            (Some(10), false)
        );
        // A pending delete wins too.
        let slot = lead(&mut t, 2);
        del(&mut t, 2, 1);
        assert_eq!(t.finish_load(h(2), &2, &slot, Some(5), 0, 1), (None, false));
        // A second miss of a key being loaded follows the first.
        let slot = lead(&mut t, 5);
        assert!(matches!(t.join_load(h(5), &5), LoadRole::Follower(_)));
        t.abort_load(h(5), &5, &slot);
        // A delete that came and went while the load ran: answered but not cached.
        let slot = lead(&mut t, 2);
        let s = t.take(h(2), &2, false).unwrap().unwrap();
        t.persisted(h(2), &2, s.write.version(), 0);
        assert_eq!(
            t.finish_load(h(2), &2, &slot, Some(5), 0, 1),
            (Some(5), false)
        );
        assert_eq!(
            look(&mut t, 2),
            None,
            "the possibly stale load was not cached"
        );
        // An undisturbed load is cached clean.
        assert_eq!(load(&mut t, 3, Some(7)), Some(7));
        assert_eq!(look(&mut t, 3), Some(Some(7)));
        assert_eq!(t.dirty, 1, "loaded entries are clean");
        // A loaded value (version 0) never replaces a write.
        assert_eq!(t.fill_clean(h(1), 1, 99, 0, 0, 1), Some(10));
    }

    /// A miss after a write of the key starts its own load: following a load that began
    /// before the write could answer with the value the write replaced (a get that began
    /// after a remove returning the removed value). The first load, finished later, neither
    /// caches its result nor takes the second one out of the table.
    #[test]
    fn a_miss_after_a_write_does_not_follow_the_older_load() {
        let mut t = table();
        let first = lead(&mut t, 4);
        assert!(matches!(t.join_load(h(4), &4), LoadRole::Follower(_)));
        // A remove that came and went (written through, or a tombstone persisted and
        // dropped): the key is absent from memory again.
        del(&mut t, 4, 1);
        let s = t.take(h(4), &4, false).unwrap().unwrap();
        assert!(t.persisted(h(4), &4, s.write.version(), 0));
        assert_eq!(look(&mut t, 4), None, "the tombstone left");
        let second = lead(&mut t, 4);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(
            t.finish_load(h(4), &4, &first, Some(40), 0, 1),
            (Some(40), false),
            "the first load's callers get what it read"
        );
        assert_eq!(look(&mut t, 4), None, "but it is not cached");
        assert!(
            matches!(t.join_load(h(4), &4), LoadRole::Follower(_)),
            "the second load is still in flight"
        );
        t.abort_load(h(4), &4, &first);
        assert!(
            matches!(t.join_load(h(4), &4), LoadRole::Follower(_)),
            "only its own leader takes a load out"
        );
        assert_eq!(t.finish_load(h(4), &4, &second, None, 0, 1), (None, false));
        assert!(matches!(t.join_load(h(4), &4), LoadRole::Leader(_)));
    }

    #[test]
    fn scan_and_unwritten_list_the_dirty_entries() {
        let mut t = table();
        put(&mut t, 1, 10, 1);
        put(&mut t, 2, 20, 1);
        del(&mut t, 3, 1);
        load(&mut t, 4, Some(40));
        t.take(h(2), &2, false).unwrap().unwrap(); // in flight: not the scan's, but still unwritten
        let mut scanned = Vec::new();
        t.scan_dirty(&mut scanned);
        scanned.sort_unstable();
        assert_eq!(scanned, vec![1, 3]);
        let mut unwritten = Vec::new();
        t.unwritten(&mut unwritten);
        let mut keys: Vec<u64> = unwritten.iter().map(|w| *w.key()).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![1, 2, 3]);
    }

    /// The shard's lock-free handshake, with a real writer thread against a draining thread:
    /// after both finish and a final drain, no dirty key is missing from the drained set.
    /// (Under Miri this also checks the ring's unsafe code for data races.)
    #[test]
    fn shard_writer_vs_drainer_loses_no_dirty_key() {
        use std::sync::Arc;
        let rounds = if cfg!(miri) { 5 } else { 2_000 };
        for round in 0..if cfg!(miri) { 2 } else { 20 } {
            let shard = Arc::new(Shard::<u64, u64>::new(1, 4, UNBOUNDED, hasher()));
            // Every other round starts at the last epoch tag, so the tags wrap while the
            // writer runs (the first close goes from 65,535 to 1).
            let wraps = round % 2 == 1;
            if wraps {
                shard.table.lock().epoch = u16::MAX;
            }
            let s2 = shard.clone();
            let writer = std::thread::spawn(move || {
                for i in 0..rounds {
                    let k = i % 3;
                    let mut t = s2.table.lock();
                    let out = t.write(h(k), k, Some(i), 0, 1);
                    // As the cache does: the push (or the flag) before the unlock.
                    if let Some(key) = out.ring_key {
                        if s2.ring.push(key).is_err() {
                            s2.overflow.store(true, Ordering::SeqCst);
                        }
                    }
                    drop(t);
                }
            });
            let mut persisted = 0;
            let flush = |shard: &Shard<u64, u64>, persisted: &mut u64| {
                shard.table.lock().close_epoch();
                let mut keys = Vec::new();
                shard.ring.drain_into(&mut keys, false);
                let mut t = shard.table.lock();
                if shard.overflow.swap(false, Ordering::SeqCst) {
                    t.scan_dirty(&mut keys);
                }
                for k in keys {
                    if let Some(s) = t.take(h(k), &k, false).unwrap() {
                        t.persisted(h(k), &k, s.write.version(), 0);
                        *persisted += 1;
                    }
                }
            };
            while !writer.is_finished() {
                flush(&shard, &mut persisted);
                std::thread::yield_now();
            }
            writer.join().unwrap();
            flush(&shard, &mut persisted);
            assert_eq!(shard.table.lock().dirty, 0, "a dirty key was on no ring");
            assert!(persisted > 0);
            if wraps {
                assert_ne!(shard.table.lock().epoch, u16::MAX, "the tags wrapped");
            }
        }
    }

    /// S3-FIFO: a key read while in the small queue goes on to the main queue when its turn
    /// to leave comes; the unread keys around it are evicted. (The frequency lives in the
    /// entry's `bits` beside the queue flag.)
    #[test]
    fn a_read_key_survives_the_small_queue_and_leaves_main_when_cold() {
        let bounded = Limits {
            capacity: 4,
            ..UNBOUNDED
        };
        let mut t = Table::new(100, bounded, hasher());
        for k in 0..4 {
            t.fill_clean(h(k), k, k, 1, 0, 1);
        }
        assert_eq!(look(&mut t, 0), Some(Some(0)));
        for k in 4..8 {
            t.fill_clean(h(k), k, k, 1, 0, 1);
        }
        assert!(t.contains(h(0), &0, 0), "the key that was read stays");
        assert!(
            !t.contains(h(1), &1, 0),
            "an unread key of its time is evicted"
        );
        assert_eq!(t.len(0), 4);
        // New keys, each read once, follow it into the main queue; never read again, it
        // leaves the main queue in its turn.
        for k in 8..40 {
            t.fill_clean(h(k), k, k, 1, 0, 1);
            assert_eq!(look(&mut t, k), Some(Some(k)));
        }
        assert!(
            !t.contains(h(0), &0, 0),
            "the main queue evicts it once it goes cold"
        );
        assert_eq!(t.len(0), 4);
    }

    /// The table holds only what a hit and an update touch.
    #[test]
    fn entry_parts_keep_what_a_get_and_a_put_touch_in_48_bytes() {
        assert_eq!(std::mem::size_of::<Entry<u64, u64>>(), 48);
        assert_eq!(std::mem::size_of::<Side>(), 24);
    }

    /// Slots of the cold and side vectors are reused: a table that churns through keys keeps
    /// them at their peak size, and every entry keeps its own slot's state.
    #[test]
    fn side_slots_are_reused_after_removal() {
        let mut t = table();
        for round in 0..10u64 {
            for k in 0..100u64 {
                t.fill_clean(h(k), k, k + round, 1 + round, 0, k as u32 + 1);
            }
            // Remove every third key, then check that the rest kept their values and slots.
            for k in (0..100u64).step_by(3) {
                t.remove_clean(h(k), &k, 1_000, 1);
            }
            assert_eq!(t.len(0), 66);
            for k in 0..100u64 {
                let want = (k % 3 != 0).then_some(Some(k + round));
                assert_eq!(look(&mut t, k), want, "key {k} in round {round}");
                if k % 3 != 0 {
                    let slot = t.find(h(k), &k).expect("present").slot as usize;
                    assert_eq!(t.side[slot].weight, k as u32 + 1, "key {k}'s own slot");
                }
            }
            for k in 0..100u64 {
                t.remove_clean(h(k), &k, 1_000, 1);
            }
            assert_eq!((t.len(0), t.map.len()), (0, 0));
        }
        assert_eq!(
            (t.side.len(), t.free.len()),
            (100, 100),
            "ten rounds of 100 keys reuse 100 slots"
        );
    }

    /// A tombstone holds no value, and replacing values drops each exactly once (Miri checks
    /// the uninitialised slot is never read; the counter checks the drops).
    #[test]
    fn tombstones_and_replaced_values_drop_exactly_once() {
        use std::sync::atomic::{AtomicUsize, Ordering as O};
        static LIVE: AtomicUsize = AtomicUsize::new(0);
        #[derive(Debug, PartialEq)]
        struct Counted(u64);
        impl Counted {
            fn new(v: u64) -> Self {
                LIVE.fetch_add(1, O::SeqCst);
                Counted(v)
            }
        }
        impl Clone for Counted {
            fn clone(&self) -> Self {
                Counted::new(self.0)
            }
        }
        impl Drop for Counted {
            fn drop(&mut self) {
                LIVE.fetch_sub(1, O::SeqCst);
            }
        }
        {
            let mut t: Table<u64, Counted> = Table::new(100, UNBOUNDED, hasher());
            let put = |t: &mut Table<u64, Counted>, k: u64, v: Option<u64>| {
                t.write(h(k), k, v.map(Counted::new), 0, 1).old
            };
            assert_eq!(put(&mut t, 1, Some(10)), None);
            assert_eq!(put(&mut t, 1, None), Some(Counted::new(10)));
            assert_eq!(
                put(&mut t, 1, None),
                None,
                "a tombstone replaced by a tombstone"
            );
            assert_eq!(put(&mut t, 1, Some(11)), None);
            assert_eq!(put(&mut t, 2, None), None);
            assert_eq!(put(&mut t, 3, Some(30)), None);
            assert!(matches!(t.get(h(2), &2, 0), Lookup::Hit(None)));
            assert!(matches!(t.get(h(1), &1, 0), Lookup::Hit(Some(Counted(11)))));
            assert_eq!(LIVE.load(O::SeqCst), 2, "the values of keys 1 and 3");
            let mut out = Vec::new();
            t.unwritten(&mut out);
            assert_eq!(out.len(), 3);
            drop(out);
            // Key 1's snapshot, persisted: clean and kept; key 2's tombstone goes.
            for k in [1u64, 2] {
                let s = t.take(h(k), &k, false).unwrap().expect("dirty");
                assert!(t.persisted(h(k), &k, s.write.version(), 0));
            }
            assert_eq!((t.len(0), t.map.len()), (2, 2));
            assert_eq!(LIVE.load(O::SeqCst), 2);
        }
        assert_eq!(
            LIVE.load(O::SeqCst),
            0,
            "dropping the table dropped every value"
        );
    }

    #[test]
    fn shard_stride_is_an_odd_multiple_of_128() {
        for size in [
            std::mem::size_of::<Shard<u64, u64>>(),
            std::mem::size_of::<Shard<String, Vec<u8>>>(),
        ] {
            assert_eq!(size % 128, 0, "CachePadded aligns shards to 128 bytes");
            assert_eq!(
                (size / 128) % 2,
                1,
                "a shard of {size} bytes: power-of-two-ish stride"
            );
        }
    }

    /// The lock word and what a hit touches share the shard's first cache line; the rest of
    /// the put path the second.
    #[test]
    fn hot_fields_share_the_first_cache_lines() {
        let m: CachePadded<Mutex<Table<u64, u64>>> = CachePadded::new(Mutex::new(table()));
        let base = &*m as *const Mutex<Table<u64, u64>> as usize;
        let g = m.lock();
        let t: &Table<u64, u64> = &g;
        let at = |f: usize| f - base;
        assert_eq!(at(t as *const _ as usize), 8, "the raw lock comes first");
        assert_eq!(
            at(&t.map as *const _ as usize),
            8,
            "the table header follows it"
        );
        let first = [
            at(&t.hits as *const u64 as usize) + 8,
            at(&t.next_version as *const u64 as usize) + 8,
            at(&t.conflated as *const u64 as usize) + 8,
        ];
        assert!(
            first.iter().all(|&e| e <= 64),
            "lock, header, hits, next_version, conflated: one line"
        );
        let second = [
            at(&t.dirty as *const u32 as usize) + 4,
            at(&t.epoch as *const u16 as usize) + 2,
            at(&t.pressured as *const bool as usize) + 1,
            at(&t.write_side as *const bool as usize) + 1,
            at(&t.loading as *const _ as usize) + std::mem::size_of::<HashTable<u64>>(),
        ];
        assert!(
            at(&t.dirty as *const u32 as usize) >= 64 && second.iter().all(|&e| e <= 128),
            "the rest of the put path: the second line"
        );
    }

    /// Put/remove churn under capacity leaves stale positions in the eviction queues, which
    /// `enforce` (over capacity only) never pops: the table compacts them as it goes.
    #[test]
    fn eviction_queues_stay_bounded_under_churn_below_capacity() {
        let limits = Limits {
            capacity: 1000,
            ..UNBOUNDED
        };
        let mut t: Table<u64, u64> = Table::new(100, limits, hasher());
        for i in 0..100_000u64 {
            let k = i % 10;
            t.write(h(k), k, Some(i), 0, 1);
            if let Ok(Some(s)) = t.take(h(k), &k, false) {
                assert!(t.persisted(h(k), &k, s.write.version(), 0));
            }
            // A finished delete leaves memory; the next put of the key inserts it again.
            t.write(h(k), k, None, 0, 1);
            let s = t.take(h(k), &k, false).unwrap().unwrap();
            assert!(t.persisted(h(k), &k, s.write.version(), 0));
        }
        let positions = t.queues.small.len() + t.queues.main.len();
        assert!(
            positions <= 2 * t.map.len() + 64,
            "{positions} queue positions for {} entries",
            t.map.len()
        );
    }
}
