//! [`Shard`]: one slice of the key space. Its table and every entry's bookkeeping live behind
//! one lock and are plain single-threaded code ([`Table`]); the dirty ring and the epoch next
//! to it are what writers and the owning flusher share without that lock.

mod durability;
mod entry;
mod inflight;
mod policy;
mod table;

pub(crate) use durability::Durability;
pub(crate) use inflight::{LoadRole, LoadSlot};
pub(crate) use policy::Limits;
pub(crate) use table::{Lookup, Table, WriteOutcome};

use crate::dirty_ring::DirtyRing;
use crate::sync::atomic::{AtomicBool, AtomicU64};
use crate::sync::{CachePadded, Condvar, Mutex};

/// `Entry::unsent` when every write of the entry has been handed to the store.
pub(crate) const NONE: u64 = u64::MAX;
/// `Entry::queued_epoch` when the key is not on the ring for any epoch.
pub(crate) const NOT_QUEUED: u16 = 0;

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
mod tests;
