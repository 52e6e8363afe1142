//! [`Entry`]: one cached key as the hash table holds it, its flags, and its [`Side`] state.

use std::mem::MaybeUninit;

use super::{NONE, NOT_QUEUED};
use crate::store::Write;

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
    pub(super) key: K,
    pub(super) value: MaybeUninit<V>,
    /// The S3-FIFO frequency and queue, the refresh flag and the tombstone flag (see
    /// [`FREQ`] and the flags after it). Right after the value: a hit reads the key, the
    /// value and this byte, and nothing else of the entry.
    pub(super) bits: u8,
    /// A flusher holds a snapshot of this key (in a batch, or in its retry list).
    pub(super) in_flight: bool,
    /// The epoch in which the key was last pushed on the ring (its low 16 bits, see
    /// [`Table::close_epoch`]), or [`NOT_QUEUED`] once the flusher has taken it. A write
    /// pushes the key unless this equals the open epoch.
    pub(super) queued_epoch: u16,
    /// The entry's slot in the table's `side` vector.
    pub(super) slot: u32,
    /// Version of the value (0 for a value loaded from the store or preloaded).
    pub(super) version: u64,
    /// Version of the oldest write not yet handed to the store, or [`NONE`].
    pub(super) unsent: u64,
    /// Highest version the store is known to hold (0: none). `wait_durable` reads it, the
    /// flusher's acknowledgement writes it.
    pub(super) persisted: u64,
}

/// The part of an entry that a hit, an update of a cache without time-based rules or a
/// weigher, and the flusher never touch.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Side {
    /// Coarse time (ns) of the last write or load: time-to-live counts from here.
    pub(super) born: u64,
    /// Coarse time (ns) of the last access: time-to-idle counts from here.
    pub(super) accessed: u64,
    /// Weight given by the weigher (1 without one).
    pub(super) weight: u32,
    /// Matches the entry's live position in the eviction queues (stale positions differ).
    pub(super) stamp: u32,
}

/// Sets the deadline of `slot` in a table's `deadlines` (kept only with
/// `Limits::per_entry`: a cache without entries' own times to live spends no memory on it).
#[inline]
pub(super) fn put_deadline(deadlines: &mut Vec<u64>, slot: usize, deadline: u64) {
    if deadlines.len() <= slot {
        deadlines.resize(slot + 1, 0);
    }
    deadlines[slot] = deadline;
}

/// The deadline of `slot` (0: none).
#[inline]
pub(super) fn deadline_of(deadlines: &[u64], slot: u32) -> u64 {
    deadlines.get(slot as usize).copied().unwrap_or(0)
}

/// Hints the CPU to fetch the cache line holding `p` in a state that allows a write
/// (`prefetchw` on x86-64, `prfm pstl1keep` on aarch64; nothing elsewhere or under Miri).
#[inline(always)]
pub(super) fn prefetch_for_write(p: *const u8) {
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
pub(super) const FREQ: u8 = 0b0000_0011;

/// `Entry::bits`: in the main queue (else the small one).
pub(super) const IN_MAIN: u8 = 0b0000_0100;

/// `Entry::bits`: an asynchronous refresh of this entry is scheduled or running.
pub(super) const REFRESHING: u8 = 0b0000_1000;

/// `Entry::bits`: the entry holds no value (a pending or local delete, or a cached absence);
/// `Entry::value` is uninitialised.
pub(super) const TOMB: u8 = 0b0001_0000;

/// `Entry::bits`: the entry was copied into its key's read slot ([`HotReads`]) and no change
/// of it has emptied the slot since. Only an entry with the flag can be in a slot, so a write
/// of any other entry does not touch the slots.
///
/// [`HotReads`]: super::HotReads
pub(super) const HOT: u8 = 0b0100_0000;

/// `Entry::bits`: the value was written in `WriteMode::ReadOnly` and must never be sent; a
/// write-behind or write-through write of the key clears it. A batch of an older version that
/// was in flight when the local write came does not bring the key back to the store when it
/// fails ([`Table::retry_later`]).
pub(super) const LOCAL: u8 = 0b0010_0000;

impl<K, V> Entry<K, V> {
    pub(super) fn new(key: K, value: Option<V>, version: u64, slot: u32, persisted: u64) -> Self {
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
    pub(super) fn value(&self) -> Option<&V> {
        if self.bits & TOMB != 0 {
            None
        } else {
            // SAFETY: the value is initialised whenever TOMB is clear: `new` and
            // `replace_value` write it before clearing the flag, and nothing else clears it.
            Some(unsafe { self.value.assume_init_ref() })
        }
    }

    #[inline]
    pub(super) fn is_tombstone(&self) -> bool {
        self.bits & TOMB != 0
    }

    /// Replaces the value (`None` leaves a tombstone) and returns the old one.
    #[inline]
    pub(super) fn replace_value(&mut self, value: Option<V>) -> Option<V> {
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
    pub(super) fn is_dirty(&self) -> bool {
        self.unsent != NONE || self.in_flight
    }

    #[inline]
    pub(super) fn freq(&self) -> u8 {
        self.bits & FREQ
    }

    /// Counts an access (saturating at 3).
    #[inline]
    pub(super) fn bump_freq(&mut self) {
        if self.bits & FREQ != FREQ {
            self.bits += 1;
        }
    }

    #[inline]
    pub(super) fn set_freq(&mut self, f: u8) {
        debug_assert!(f <= FREQ);
        self.bits = (self.bits & !FREQ) | f;
    }

    #[inline]
    pub(super) fn flag(&self, f: u8) -> bool {
        self.bits & f != 0
    }

    #[inline]
    pub(super) fn set_flag(&mut self, f: u8, on: bool) {
        if on {
            self.bits |= f;
        } else {
            self.bits &= !f;
        }
    }
}

impl<K: Clone, V: Clone> Entry<K, V> {
    /// The write that would persist the entry as it is now.
    pub(super) fn as_write(&self) -> Write<K, V> {
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
