//! [`Shard`]: one slice of the key space. Its table and every entry's bookkeeping live behind
//! one lock and are plain single-threaded code ([`Table`]); the dirty ring and the epoch next
//! to it are what writers and the owning flusher share without that lock.

mod durability;
mod entry;
mod hot;
mod inflight;
mod policy;
mod table;

pub(crate) use durability::Durability;
pub(crate) use hot::{plain, HotReads};
pub(crate) use inflight::{LoadRole, LoadSlot};
pub(crate) use policy::Limits;
pub(crate) use table::{Lookup, Table, WriteOutcome};

use std::time::Duration;

use crate::dirty_ring::DirtyRing;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{Arc, CachePadded, Condvar, Mutex};

/// `Entry::unsent` when every write of the entry has been handed to the store.
pub(crate) const NONE: u64 = u64::MAX;
/// `Entry::queued_epoch` when the key is not on the ring for any epoch.
pub(crate) const NOT_QUEUED: u16 = 0;

/// Bytes of padding in a [`Shard`] (see `Shard::_stride`): the fields alone come to an even
/// multiple of 128 bytes (1,280), and 128 more make the stride an odd multiple (1,408). A
/// change to the fields may need 0.
const STRIDE_PAD: usize = 128;

/// One shard: the locked table plus the lock-free parts writers and the flusher share.
pub(crate) struct Shard<K, V> {
    pub(crate) table: CachePadded<Mutex<Table<K, V>>>,
    /// The read slots a hit uses without the lock (the table's, shared): see [`HotReads`].
    pub(crate) hot: Arc<HotReads<K, V>>,
    /// Keys that became dirty in an epoch, for the flusher.
    ring: DirtyRing<K>,
    /// A key was pushed since the flusher last closed this shard's epoch: its delay runs.
    armed: AtomicBool,
    /// When the writer that armed the shard did (clock nanoseconds): stored before `armed`
    /// is set, so a flusher that finds it armed reads this arming's time or a racing
    /// writer's a moment later.
    armed_at: AtomicU64,
    /// An early flush is asked for (pinned dirty entries hold the table over its capacity,
    /// or a writer waits for room under backpressure).
    triggered: AtomicBool,
    /// Signalled when a write-through that another one waits for ends
    /// ([`Table::end_through`]).
    pub(crate) through_done: Condvar,
    /// A push found the ring full: the flusher must scan the table for dirty keys.
    overflow: AtomicBool,
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
        let table = Table::new(first_version, limits, hasher);
        Shard {
            hot: Arc::clone(&table.hot),
            table: CachePadded::new(Mutex::new(table)),
            ring: DirtyRing::new(ring_capacity),
            armed: AtomicBool::new(false),
            armed_at: AtomicU64::new(0),
            triggered: AtomicBool::new(false),
            through_done: Condvar::new(),
            overflow: AtomicBool::new(false),
            _stride: [0; STRIDE_PAD],
        }
    }

    // -- The writers' side of the protocol.

    /// Puts the key of a write that was not queued in the open epoch (`None`: it was, the
    /// write conflated) on the ring, or raises the overflow flag if the ring is full.
    ///
    /// Called **with the table lock held**: a later write of the key in the same epoch
    /// conflates (it finds the entry's tag equal to the open epoch and does not push), and
    /// returns as soon as it unlocks. If this push came after the unlock, that write could
    /// return while the key was on no ring and behind no flag; a `flush()` begun then would
    /// close the epoch, drain the ring without it and return with the write unsent. Under
    /// the lock the push (or the flag) happens before any write that can conflate into it,
    /// so a flush that a write returned before finds the key drained or scanned.
    /// docs/ARCHITECTURE.md, "Why no accepted write is lost".
    #[inline]
    pub(crate) fn enqueue(&self, ring_key: Option<K>) -> Queued<K> {
        let Some(key) = ring_key else {
            return Queued::Conflated;
        };
        match self.ring.push(key) {
            Ok(len) => Queued::Pushed(len),
            Err(key) => {
                // The entry is dirty in the table: the flusher finds it by scanning. (Read
                // first: while the ring stays full every push lands here, and a swap would
                // write the flag's line each time.)
                let raised = !self.overflow.load(Ordering::SeqCst)
                    && !self.overflow.swap(true, Ordering::SeqCst);
                Queued::Overflowed { key, raised }
            }
        }
    }

    /// Starts the shard's delay if it is not running, at the time `at` gives (read only when
    /// it arms: one clock read per shard and flush window). `true` if this call armed it:
    /// the caller wakes the flusher.
    #[inline]
    pub(crate) fn arm(&self, at: impl FnOnce() -> u64) -> bool {
        if self.armed.load(Ordering::SeqCst) {
            return false;
        }
        // The time goes first: a flusher that finds the shard armed reads this arming's time
        // or a racing writer's a moment later.
        self.armed_at.store(at(), Ordering::SeqCst);
        !self.armed.swap(true, Ordering::SeqCst)
    }

    /// Asks the flusher for an early flush of this shard. `true` if this call raised the
    /// request: the caller wakes the flusher.
    #[inline]
    pub(crate) fn trigger(&self) -> bool {
        !self.triggered.swap(true, Ordering::SeqCst)
    }

    // -- The owning flusher's side.

    /// When the shard was armed, if it is: the arming writer's clock reading, never later
    /// than `now`.
    pub(crate) fn armed_since(&self, now: Duration) -> Option<Duration> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let at = Duration::from_nanos(self.armed_at.load(Ordering::SeqCst));
        Some(at.min(now))
    }

    /// `true` if a step must take this shard now whatever its deadline: an early flush was
    /// asked for, the ring overflowed, or the flusher's count trigger fired (`counted`) and
    /// the shard is armed.
    pub(crate) fn wants_flush(&self, counted: bool) -> bool {
        (counted && self.armed.load(Ordering::SeqCst))
            || self.triggered.load(Ordering::SeqCst)
            || self.overflow.load(Ordering::SeqCst)
    }

    /// Takes the shard for a flush: disarms it, clears the early-flush request, closes the
    /// open epoch (writes from now on push their keys again), then drains the ring into `out`
    /// (with `all`, also the keys of pushes still in progress) and, if the ring overflowed,
    /// adds every dirty key of the table. Returns how many keys came from the ring.
    pub(crate) fn select_for_flush(&self, out: &mut Vec<K>, all: bool) -> usize {
        self.armed.store(false, Ordering::SeqCst);
        self.triggered.store(false, Ordering::SeqCst);
        self.table.lock().close_epoch();
        let overflow = self.overflow.swap(false, Ordering::SeqCst);
        let before = out.len();
        self.ring.drain_into(out, all);
        let drained = out.len() - before;
        if overflow {
            self.table.lock().scan_dirty(out);
        }
        drained
    }

    /// The next step must scan the table for dirty keys rather than trust the ring (after a
    /// key was released from a lost batch, see `FlusherCore::recover`).
    pub(crate) fn mark_overflowed(&self) {
        self.overflow.store(true, Ordering::SeqCst);
    }
}

/// How a write-behind queued its key ([`Shard::enqueue`], under the table lock).
pub(crate) enum Queued<K> {
    /// The key was already queued in the open epoch: nothing to push.
    Conflated,
    /// Pushed; the ring's length just after the push (for the count trigger).
    Pushed(usize),
    /// The ring was full: the key is given back (to drop after the unlock), and `raised` says
    /// whether this write set the shard's overflow flag (then it wakes the flusher).
    Overflowed { key: K, raised: bool },
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests;
