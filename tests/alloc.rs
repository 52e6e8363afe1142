//! The put path allocates nothing when it updates an existing key with a `Copy` value. A
//! counting global allocator counts only on threads that opted in, so the
//! flusher threads (which build batches) do not disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use writebehind::{Cache, MemoryStore};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}

fn counting_here() -> bool {
    COUNT_HERE.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is forwarded unchanged to `System`; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting_here() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if counting_here() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting_here() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.load(Ordering::SeqCst);
    COUNT_HERE.with(|c| c.set(true));
    f();
    COUNT_HERE.with(|c| c.set(false));
    ALLOCS.load(Ordering::SeqCst) - before
}

#[test]
fn the_counter_counts() {
    let n = allocations_in(|| drop(std::hint::black_box(Box::new(7u64))));
    assert_eq!(n, 1);
}

const KEYS: u64 = 1_000;
const PUTS: u64 = 100_000;

fn warm(cache: &Cache<u64, u64>) {
    for round in 0..3 {
        for k in 0..KEYS {
            cache.put(k, k + round).unwrap();
        }
        cache.flush().unwrap();
    }
}

#[test]
fn updating_puts_allocate_nothing_with_manual_flushing() {
    let store = Arc::new(MemoryStore::new());
    let cache: Cache<u64, u64> = Cache::builder(store).manual_flushing().build().unwrap();
    warm(&cache);
    // Within one flush window: each key's first write of the epoch goes on the dirty ring,
    // the rest conflate.
    let n = allocations_in(|| {
        for i in 0..PUTS {
            cache.put(i % KEYS, i).unwrap();
        }
    });
    assert_eq!(n, 0, "{n} allocations in {PUTS} updating puts");
    // Across windows: after a flush every key goes on the ring again.
    cache.flush().unwrap();
    let n = allocations_in(|| {
        for i in 0..KEYS {
            cache.put(i, i).unwrap();
        }
    });
    assert_eq!(n, 0, "{n} allocations in the first puts of a new window");
}

#[test]
fn updating_puts_allocate_nothing_while_flushers_run() {
    let store = Arc::new(MemoryStore::new());
    let cache: Cache<u64, u64> = Cache::builder(store)
        .write_delay(Duration::from_millis(1))
        .max_batch(64)
        .build()
        .unwrap();
    warm(&cache);
    let n = allocations_in(|| {
        for i in 0..PUTS {
            cache.put(i % KEYS, i).unwrap();
        }
    });
    assert_eq!(n, 0, "{n} allocations in {PUTS} updating puts");
    assert!(cache.close(Duration::from_secs(10)).is_clean());
}
