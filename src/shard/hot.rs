//! [`HotReads`]: a shard's lock-free read slots. A hit on a key that sits in a slot takes no
//! lock and writes no shared cache line.
//!
//! Offered when keys and values are both [`plain`] (no drop glue, at most 32 bytes: `u64`,
//! small structs of numbers) and the cache has no time-based rule. Such keys and values can
//! be copied bit for bit while a writer may be overwriting them, and the copy checked
//! afterwards, so no epoch or hazard pointer is needed:
//!
//! * A slot holds a copy of one entry (key, value or tombstone) under a sequence count. The
//!   slot of a key is picked by its hash (direct-mapped); another key may take it over.
//! * **Every slot write happens under the shard lock.** A locked hit copies its entry into the
//!   key's slot ([`HotReads::install`]) before it unlocks; every change of an entry's value,
//!   and every removal, first empties the key's slot if it holds the key
//!   ([`HotReads::clear`]). So while a slot holds a key, it holds that key's current value.
//! * **Readers** copy the slot's key and value under its count and use the copy only when the
//!   count did not move and the key is theirs ([`HotReads::get`]). Anything else is not an
//!   answer: the caller reads under the lock (and installs).
//! * **Growth**: the array grows with the table (one slot per entry, rounded up to a power of
//!   two). A replaced array is kept until the cache drops, never freed under a reader: at
//!   most as many slots again as the current array. A reader still on the old array reads
//!   what it held when it was replaced, which was current then, after the reader began.
//!
//! docs/ARCHITECTURE.md, "Lock-free reads", has the argument.

use std::mem::MaybeUninit;

use crate::sync::atomic::{fence, AtomicPtr, AtomicU64, Ordering};

/// `true` if values of type `T` can be copied bit for bit under a sequence count: no drop
/// glue (a copy owns nothing), at most 32 bytes.
pub(crate) const fn plain<T>() -> bool {
    #[cfg(not(writebehind_loom))]
    let fits = std::mem::size_of::<T>() <= 32;
    // The model's slot keeps a key and a value in atomic words.
    #[cfg(writebehind_loom)]
    let fits = std::mem::size_of::<T>() == 8;
    fits && !std::mem::needs_drop::<T>()
}

/// `Slot::seq`: a write of the slot is in progress.
const WRITING: u64 = 0b001;
/// `Slot::seq`: the slot holds a key.
const FULL: u64 = 0b010;
/// `Slot::seq`: the key it holds has no value (a pending delete, or a cached absence).
const TOMB: u64 = 0b100;
/// `Slot::seq`: the step of the write count, above the flags.
const STEP: u64 = 0b1000;

/// One slot: a copy of one entry under a sequence count.
struct Slot<K, V> {
    seq: AtomicU64,
    key: Cell<K>,
    value: Cell<V>,
}

/// Bytes that a reader copies while the writer may be storing them.
#[cfg(not(writebehind_loom))]
struct Cell<T>(std::cell::UnsafeCell<MaybeUninit<T>>);

/// Under loom the bytes are two atomic half-words, stored and loaded one after the other, so
/// that a model sees a torn copy if the count lets one through (`plain` admits only 8-byte
/// types there).
#[cfg(writebehind_loom)]
struct Cell<T>(
    [crate::sync::atomic::AtomicU32; 2],
    std::marker::PhantomData<T>,
);

#[cfg(not(writebehind_loom))]
impl<T> Cell<T> {
    fn new() -> Self {
        Cell(std::cell::UnsafeCell::new(MaybeUninit::uninit()))
    }

    /// A copy of the bytes, which the writer may be overwriting: the caller checks the count
    /// before it treats the copy as a `T`.
    #[inline(always)]
    fn copy(&self) -> MaybeUninit<T> {
        // SAFETY: the storage is valid and aligned for a `MaybeUninit<T>`, and any bytes are
        // a valid one. The read may race with `store`: this is the seqlock's optimistic read,
        // volatile so that the compiler neither elides nor splits it differently, as
        // crossbeam's `AtomicCell` and the `seqlock` crate do; the caller uses the copy as a
        // `T` only once the count shows that no store overlapped it.
        unsafe { std::ptr::read_volatile(self.0.get()) }
    }

    /// Stores a bitwise copy of `v`. Only the writer, between the odd and the even count.
    #[inline(always)]
    fn store(&self, v: &T) {
        // SAFETY: `T` is plain: a bitwise copy owns nothing. Only the writer, holding the
        // shard lock, stores; readers discard a copy that overlapped this store.
        unsafe {
            let bits = std::ptr::read(v as *const T as *const MaybeUninit<T>);
            std::ptr::write_volatile(self.0.get(), bits);
        }
    }
}

#[cfg(writebehind_loom)]
impl<T> Cell<T> {
    fn new() -> Self {
        use crate::sync::atomic::AtomicU32;
        Cell(
            [AtomicU32::new(0), AtomicU32::new(0)],
            std::marker::PhantomData,
        )
    }

    fn copy(&self) -> MaybeUninit<T> {
        let lo = u64::from(self.0[0].load(Ordering::Relaxed));
        let hi = u64::from(self.0[1].load(Ordering::Relaxed));
        let bits = lo | (hi << 32);
        // SAFETY: under loom `plain` admits only 8-byte types.
        unsafe { std::mem::transmute_copy::<u64, MaybeUninit<T>>(&bits) }
    }

    fn store(&self, v: &T) {
        // SAFETY: as above.
        let bits = unsafe { std::mem::transmute_copy::<T, u64>(v) };
        self.0[0].store(bits as u32, Ordering::Relaxed);
        self.0[1].store((bits >> 32) as u32, Ordering::Relaxed);
    }
}

impl<K, V> Slot<K, V> {
    fn new() -> Self {
        Slot {
            seq: AtomicU64::new(0),
            key: Cell::new(),
            value: Cell::new(),
        }
    }

    /// Makes the count odd: readers that look now or later, until [`Slot::end`], discard
    /// what they copy.
    #[inline(always)]
    fn begin(&self) -> u64 {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq | WRITING, Ordering::Relaxed);
        // The odd count is visible before any byte of the write (the seqlock's write side).
        fence(Ordering::Release);
        seq
    }

    /// Ends a write with the next even count and the slot's new flags.
    #[inline(always)]
    fn end(&self, seq: u64, flags: u64) {
        let next = (seq & !(STEP - 1)).wrapping_add(STEP) | flags;
        self.seq.store(next, Ordering::Release);
    }
}

/// One array of slots, a power of two of them.
struct Slots<K, V> {
    mask: usize,
    slots: Box<[Slot<K, V>]>,
}

impl<K, V> Slots<K, V> {
    fn new(len: usize) -> Box<Self> {
        debug_assert!(len.is_power_of_two());
        Box::new(Slots {
            mask: len - 1,
            slots: (0..len).map(|_| Slot::new()).collect(),
        })
    }

    #[inline(always)]
    fn of(&self, hash: u64) -> &Slot<K, V> {
        &self.slots[hash as usize & self.mask]
    }
}

/// A shard's lock-free read slots (see the module docs). Readers call [`HotReads::get`];
/// everything else is the writer's, under the shard lock.
pub(crate) struct HotReads<K, V> {
    slots: AtomicPtr<Slots<K, V>>,
    /// Arrays replaced by a larger one, kept until the cache drops (readers take no pin).
    // Boxed: readers may hold a reference to a kept array, whose address must not move.
    #[allow(clippy::vec_box)]
    kept: std::sync::Mutex<Vec<Box<Slots<K, V>>>>,
}

// SAFETY: readers on any thread copy keys and values out bitwise (plain types, no drop glue)
// and hand them to `K::eq` and `V::clone` by reference: `K: Sync` and `V: Send + Sync` cover
// that. The arrays are owned here and freed on drop.
unsafe impl<K: Send + Sync, V: Send + Sync> Sync for HotReads<K, V> {}
// SAFETY: as above.
unsafe impl<K: Send + Sync, V: Send + Sync> Send for HotReads<K, V> {}

impl<K, V> Default for HotReads<K, V> {
    fn default() -> Self {
        HotReads {
            slots: AtomicPtr::new(std::ptr::null_mut()),
            kept: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<K: Eq, V: Clone> HotReads<K, V> {
    /// The value of `key` if its slot holds it (`Some(None)`: a tombstone), read without a
    /// lock. `None`: not an answer; read under the lock.
    #[inline]
    pub(crate) fn get(&self, hash: u64, key: &K) -> Option<Option<V>> {
        let slots = self.slots.load(Ordering::Acquire);
        if slots.is_null() {
            return None;
        }
        // SAFETY: an array is freed only when the cache drops (replaced ones are kept), so
        // it outlives every reader.
        let slot = unsafe { &*slots }.of(hash);
        let before = slot.seq.load(Ordering::Acquire);
        if before & (WRITING | FULL) != FULL {
            return None;
        }
        let k = slot.key.copy();
        let v = slot.value.copy();
        // Orders the copies before the second load of the count (the seqlock's read side).
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) != before {
            return None;
        }
        // SAFETY: the count was even and unchanged around the copies, so no write overlapped
        // them: they are the whole key and value that the last write stored (the value only
        // when TOMB is clear). Both types are plain (no drop glue): the copies own nothing,
        // and are only lent to `K::eq` and `V::clone`.
        if unsafe { k.assume_init_ref() } != key {
            return None;
        }
        if before & TOMB != 0 {
            return Some(None);
        }
        // SAFETY: as above; TOMB was clear, so the value is whole.
        Some(Some(unsafe { v.assume_init_ref() }.clone()))
    }
}

impl<K: Eq, V> HotReads<K, V> {
    /// Copies an entry into its key's slot (the writer, under the shard lock, from a locked
    /// read of the entry: the copy is the key's current value).
    #[inline]
    pub(crate) fn install(&self, hash: u64, key: &K, value: Option<&V>) {
        let slots = self.slots.load(Ordering::Relaxed);
        if slots.is_null() {
            return;
        }
        // SAFETY: the writer (the caller) is the only one who replaces the array.
        let slot = unsafe { &*slots }.of(hash);
        let seq = slot.begin();
        slot.key.store(key);
        match value {
            Some(v) => {
                slot.value.store(v);
                slot.end(seq, FULL);
            }
            None => slot.end(seq, FULL | TOMB),
        }
    }

    /// Empties the key's slot if it holds the key (the writer, under the shard lock, before
    /// the key's entry changes or leaves).
    #[inline]
    pub(crate) fn clear(&self, hash: u64, key: &K) {
        let slots = self.slots.load(Ordering::Relaxed);
        if slots.is_null() {
            return;
        }
        // SAFETY: the writer (the caller) is the only one who replaces the array.
        let slot = unsafe { &*slots }.of(hash);
        let seq = slot.seq.load(Ordering::Relaxed);
        if seq & FULL == 0 {
            return;
        }
        // The writer's own read: nothing else writes the slot. `K` is plain.
        // SAFETY: FULL is set and no write is in progress (only the caller writes), so the key
        // is whole.
        let holds = unsafe { slot.key.copy().assume_init_ref() } == key;
        if holds {
            let seq = slot.begin();
            slot.end(seq, 0);
        }
    }

    /// Empties every slot (the writer, under the shard lock: when entries leave whose hashes
    /// are not at hand).
    pub(crate) fn clear_all(&self) {
        let slots = self.slots.load(Ordering::Relaxed);
        if slots.is_null() {
            return;
        }
        // SAFETY: the writer (the caller) is the only one who replaces the array.
        for slot in unsafe { &*slots }.slots.iter() {
            if slot.seq.load(Ordering::Relaxed) & FULL != 0 {
                let seq = slot.begin();
                slot.end(seq, 0);
            }
        }
    }

    /// Grows the array to at least `entries` slots (the writer, under the shard lock, when
    /// the table grows). The new array starts empty: locked hits fill it again.
    pub(crate) fn reserve(&self, entries: usize) {
        let slots = self.slots.load(Ordering::Relaxed);
        // SAFETY: the writer (the caller) is the only one who replaces the array.
        let len = if slots.is_null() {
            0
        } else {
            unsafe { &*slots }.slots.len()
        };
        if entries <= len {
            return;
        }
        let fresh = Slots::new(entries.next_power_of_two().max(16));
        // Release: a reader that loads the new array sees its slots built.
        self.slots.store(Box::into_raw(fresh), Ordering::Release);
        if !slots.is_null() {
            // SAFETY: the replaced array, from `Box::into_raw`; kept (readers take no pin).
            let old = unsafe { Box::from_raw(slots) };
            self.kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(old);
        }
    }
}

impl<K, V> Drop for HotReads<K, V> {
    fn drop(&mut self) {
        let slots = self.slots.load(Ordering::Acquire);
        if !slots.is_null() {
            // SAFETY: the current array; `&mut self` means no reader holds it. Slots hold
            // plain bytes: nothing to drop but the memory.
            drop(unsafe { Box::from_raw(slots) });
        }
    }
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;

    #[test]
    fn plain_types() {
        assert!(plain::<u64>() && plain::<(u64, u32, [u8; 16])>());
        assert!(!plain::<[u64; 5]>(), "more than 32 bytes");
        assert!(
            !plain::<String>() && !plain::<Option<Box<u8>>>(),
            "drop glue"
        );
    }

    #[test]
    fn a_slot_answers_only_for_its_key_and_only_what_was_installed() {
        let hot = HotReads::<u64, u64>::default();
        assert_eq!(hot.get(1, &1), None, "no array yet");
        hot.reserve(4);
        assert_eq!(hot.get(1, &1), None, "empty");
        hot.install(1, &1, Some(&10));
        assert_eq!(hot.get(1, &1), Some(Some(10)));
        assert_eq!(hot.get(1, &2), None, "another key of the same slot");
        hot.install(1, &1, None);
        assert_eq!(hot.get(1, &1), Some(None), "a tombstone");
        hot.clear(1, &2);
        assert_eq!(hot.get(1, &1), Some(None), "clearing another key leaves it");
        hot.clear(1, &1);
        assert_eq!(hot.get(1, &1), None);
        hot.install(17, &17, Some(&170));
        hot.reserve(100);
        assert_eq!(hot.get(17, &17), None, "a grown array starts empty");
    }

    /// Readers on other threads while the writer installs, clears and grows: a reader sees a
    /// value some install stored for its key, never another key's or a torn one. (Not under
    /// Miri: the optimistic copy is a racy read by design.)
    #[cfg(not(miri))]
    #[test]
    fn readers_see_whole_values_of_their_key() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        // Both halves of a value come from one round, and the second names the key.
        fn pair(k: u64, round: u64) -> (u64, u64) {
            (round, round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k)
        }
        let hot = Arc::new(HotReads::<u64, (u64, u64)>::default());
        hot.reserve(16);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (hot, stop) = (hot.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for k in 0..64u64 {
                            // Keys collide: slot `k % 16` of the first array.
                            if let Some(Some(v)) = hot.get(k, &k) {
                                assert_eq!(v, pair(k, v.0), "torn, or another key's");
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        let start = std::time::Instant::now();
        let mut round = 0u64;
        while round < 50_000 || start.elapsed() < std::time::Duration::from_millis(100) {
            round += 1;
            let k = round.wrapping_mul(0x9E37_79B9) % 64;
            match round % 5 {
                0 => hot.clear(k, &k),
                _ => hot.install(k, &k, Some(&pair(k, round))),
            }
            if round % 10_000 == 0 {
                hot.reserve((round / 10_000) as usize * 16);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let seen: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(seen > 0, "the readers read values while the writer ran");
    }
}
