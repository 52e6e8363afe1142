//! [`DirtyRing`]: the bounded, lock-free ring of keys that writers push when an entry first
//! becomes dirty in an epoch and the shard's flusher drains.
//!
//! It is the bounded queue of Dmitry Vyukov: every slot carries a `stamp` that says whose turn
//! the slot is. With `cap` slots (a power of two) and positions that only grow:
//!
//! * `stamp == pos`          : the slot is empty and waits for the producer of position `pos`;
//! * `stamp == pos + 1`      : the producer of `pos` has published its key; the consumer of
//!   `pos` may read it;
//! * after the read the consumer stores `pos + cap`, handing the slot to the producer one lap
//!   later.
//!
//! Producers claim a position with a CAS on `tail`, write the key, then publish with a
//! `Release` store of the stamp; the consumer's `Acquire` load of the stamp makes the key
//! visible before it reads it. A full ring makes `push` fail at once (the caller then flags the
//! shard for a table scan), so a writer never waits for the flusher.
//!
//! The engine has one consumer per ring (the owning flusher), but `pop` claims positions with
//! a CAS as well, so it stays correct if two threads ever drain the same ring.
//!
//! The type is `pub` inside this private module only so that the loom models and the fuzz
//! target can reach it through `writebehind::__verify` (compiled only under
//! `cfg(writebehind_loom)` or `cfg(fuzzing)`); it is not part of the public API.

use std::mem::MaybeUninit;

use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{spin_hint, CachePadded, UnsafeCell};

struct Slot<T> {
    /// Turn marker; see the module docs for its encoding.
    stamp: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// A bounded multi-producer ring. See the module docs for the protocol.
pub struct DirtyRing<T> {
    /// Next position to pop. Only the consumer side moves it.
    head: CachePadded<AtomicUsize>,
    /// Next position to push. Producers move it with a CAS.
    tail: CachePadded<AtomicUsize>,
    slots: Box<[Slot<T>]>,
    mask: usize,
}

// SAFETY: a `DirtyRing<T>` moves `T` values between threads (pushed by one, popped by
// another) and never hands out shared references to them, so `T: Send` is enough for both
// `Send` and `Sync`. Access to each slot's cell is serialized by the stamp protocol: a
// producer writes the cell only after winning the CAS for that position while the stamp
// says "empty", and the consumer reads it only after observing the producer's Release store.
unsafe impl<T: Send> Send for DirtyRing<T> {}
// SAFETY: see the `Send` impl above; `&DirtyRing` only allows `push`/`pop`, which follow the
// stamp protocol.
unsafe impl<T: Send> Sync for DirtyRing<T> {}

// `len` is an estimate under concurrency; an `is_empty` would invite check-then-act.
#[allow(clippy::len_without_is_empty)]
impl<T> DirtyRing<T> {
    /// A ring with room for `capacity` keys, rounded up to a power of two (at least 2).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.max(2).next_power_of_two();
        let slots = (0..cap)
            .map(|i| Slot {
                stamp: AtomicUsize::new(i),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        DirtyRing {
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            slots,
            mask: cap - 1,
        }
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Pushes `value`. Returns the number of keys in the ring just after the push (a hint for
    /// the count trigger), or gives the value back when the ring is full.
    pub fn push(&self, value: T) -> Result<usize, T> {
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[pos & self.mask];
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == pos {
                // The slot is free for position `pos`: try to claim it.
                match self.tail.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: winning the CAS for `pos` while `stamp == pos` makes this
                        // thread the only writer of the slot until it publishes below: other
                        // producers now see `tail > pos`, and the consumer will not read the
                        // cell before the stamp becomes `pos + 1`. The previous value (one lap
                        // earlier) was moved out by the consumer before it stored `pos`.
                        slot.value.with_mut(|p| unsafe { (*p).write(value) });
                        slot.stamp.store(pos.wrapping_add(1), Ordering::Release);
                        let head = self.head.load(Ordering::Relaxed);
                        return Ok(pos.wrapping_add(1).wrapping_sub(head).min(self.capacity()));
                    }
                    Err(actual) => pos = actual,
                }
            } else if (stamp as isize).wrapping_sub(pos as isize) < 0 {
                // The slot still holds the key of the previous lap: the ring may be full.
                let head = self.head.load(Ordering::SeqCst);
                if head.wrapping_add(self.capacity()) == pos {
                    return Err(value);
                }
                // The consumer is moving this slot on; retry with a fresh tail.
                spin_hint();
                pos = self.tail.load(Ordering::Relaxed);
            } else {
                // Another producer took `pos`; catch up.
                spin_hint();
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Pops the oldest published key, or `None` if there is none (a key whose producer has
    /// claimed a slot but not yet published counts as not there yet).
    pub fn pop(&self) -> Option<T> {
        let mut pos = self.head.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[pos & self.mask];
            let stamp = slot.stamp.load(Ordering::Acquire);
            let published = pos.wrapping_add(1);
            if stamp == published {
                match self.head.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: the Acquire load saw `stamp == pos + 1`, the producer's
                        // Release store made after it initialised the cell, and winning the CAS
                        // on `head` makes this thread the only reader of position `pos`. The
                        // value is moved out exactly once; the stamp store below hands the now
                        // logically uninitialised slot to the producer of the next lap.
                        let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
                        slot.stamp
                            .store(pos.wrapping_add(self.capacity()), Ordering::Release);
                        return Some(value);
                    }
                    Err(actual) => pos = actual,
                }
            } else if (stamp as isize).wrapping_sub(published as isize) < 0 {
                // Not published yet: empty as far as the consumer can tell.
                return None;
            } else {
                spin_hint();
                pos = self.head.load(Ordering::Relaxed);
            }
        }
    }

    /// Pops every key into `out`. With `wait_for_claimed`, also waits for producers that
    /// claimed a slot before the call but had not yet published it: a `flush()` barrier needs
    /// every push that *returned* before it began, and such a push may sit behind a slower
    /// producer's claimed slot. The wait is for a few instructions of a running producer.
    pub fn drain_into(&self, out: &mut Vec<T>, wait_for_claimed: bool) {
        let end = self.tail.load(Ordering::SeqCst);
        loop {
            match self.pop() {
                Some(v) => out.push(v),
                None => {
                    let head = self.head.load(Ordering::SeqCst);
                    if !wait_for_claimed || (head.wrapping_sub(end) as isize) >= 0 {
                        return;
                    }
                    crate::sync::thread::yield_now();
                }
            }
        }
    }

    /// An estimate of the number of keys in the ring.
    #[cfg_attr(not(any(test, fuzzing, writebehind_loom)), allow(dead_code))]
    pub fn len(&self) -> usize {
        let tail = self.tail.load(Ordering::SeqCst);
        let head = self.head.load(Ordering::SeqCst);
        tail.wrapping_sub(head).min(self.capacity())
    }
}

impl<T> Drop for DirtyRing<T> {
    fn drop(&mut self) {
        // `&mut self`: no other thread can touch the ring; pop what is left so every
        // published key is dropped exactly once.
        while self.pop().is_some() {}
    }
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn fifo_and_full() {
        let ring = DirtyRing::new(4);
        assert_eq!(ring.capacity(), 4);
        for i in 0..4 {
            assert_eq!(ring.push(i), Ok(i + 1));
        }
        assert_eq!(ring.push(9), Err(9), "a full ring refuses the push");
        assert_eq!(ring.len(), 4);
        assert_eq!(ring.pop(), Some(0));
        assert_eq!(ring.push(4), Ok(4));
        for i in 1..5 {
            assert_eq!(ring.pop(), Some(i));
        }
        assert_eq!(ring.pop(), None);
    }

    #[test]
    fn wraps_many_laps() {
        let ring = DirtyRing::new(2);
        let laps = if cfg!(miri) { 20 } else { 1000 };
        for i in 0..laps {
            assert!(ring.push(i).is_ok());
            assert_eq!(ring.pop(), Some(i));
        }
        assert_eq!(ring.pop(), None);
    }

    #[test]
    fn drop_frees_what_is_left() {
        let ring = DirtyRing::new(8);
        for i in 0..5 {
            ring.push(Box::new(i)).unwrap();
        }
        drop(ring); // Miri and LeakSanitizer catch a leak or double free here.
    }

    #[test]
    fn two_producers_one_consumer_exactly_once() {
        let per = if cfg!(miri) { 50 } else { 20_000 };
        let ring = Arc::new(DirtyRing::new(64));
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut refused = Vec::new();
                    for i in 0..per {
                        let v = p * per + i;
                        let mut v2 = v;
                        loop {
                            match ring.push(v2) {
                                Ok(_) => break,
                                Err(back) => {
                                    v2 = back;
                                    refused.push(v);
                                    std::thread::yield_now();
                                }
                            }
                        }
                    }
                    refused.len()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        while seen.len() < 2 * per {
            if let Some(v) = ring.pop() {
                assert!(seen.insert(v), "key {v} drained twice");
            } else {
                std::thread::yield_now();
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(ring.pop(), None);
        assert_eq!(seen.len(), 2 * per);
    }
}
