//! One or more tests per guarantee of the design card (the ten semantics), plus the engine's
//! other behaviours. Engine tests use the in-memory fault-injecting store.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock, Weak};
use std::time::{Duration, Instant};

use common::*;
use writebehind::testing::{Outcome, Rng};
use writebehind::{
    Backpressure, BatchError, Cache, Error, Health, MemoryStore, Store, StoreError, Write,
    WriteMode,
};

// 1. Read your writes ------------------------------------------------------------------

#[test]
fn read_your_writes_before_and_after_flush() {
    let s = store();
    let (cache, _clock) = manual(&s, Duration::from_secs(1));
    cache.put(1, 10).unwrap();
    cache.put(1, 11).unwrap();
    assert_eq!(cache.get(&1).unwrap(), Some(11));
    cache.remove(&1).unwrap();
    assert_eq!(cache.get(&1).unwrap(), None);
    cache.put(2, 20).unwrap();
    assert_eq!(s.load_calls(), 0, "every answer came from memory");
    cache.flush().unwrap();
    assert_eq!(cache.get(&2).unwrap(), Some(20));
    // The tombstone left with the persisted delete; the store agrees the key is gone.
    assert_eq!(cache.get(&1).unwrap(), None);
}

#[test]
fn pending_delete_is_never_shadowed_by_the_store() {
    let s = store();
    s.memory().insert(5, 500); // the store holds a row the cache has not seen
    let (cache, _clock) = manual(&s, Duration::from_secs(1));
    cache.remove(&5).unwrap();
    assert_eq!(
        cache.get(&5).unwrap(),
        None,
        "the pending delete answers, not the store"
    );
    assert_eq!(s.load_calls(), 0);
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&5), None, "the delete reached the store");
    assert_eq!(cache.get(&5).unwrap(), None);
}

#[test]
fn remove_while_store_is_slow_reads_none() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::ZERO)
        .build()
        .unwrap();
    cache.put(1, 1).unwrap();
    s.hold(); // the flusher's next batch blocks in the store
    cache.put(1, 2).unwrap();
    assert!(
        s.wait_until_held(Duration::from_secs(5)),
        "a batch reached the store"
    );
    cache.remove(&1).unwrap();
    assert_eq!(
        cache.get(&1).unwrap(),
        None,
        "delete visible while a batch with a put is in flight"
    );
    cache.put(3, 3).unwrap();
    assert_eq!(cache.get(&3).unwrap(), Some(3));
    s.release();
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&1), None);
    assert_eq!(cache.get(&1).unwrap(), None);
    assert_versions_grow(&s);
}

// 2. Conflation ------------------------------------------------------------------------

#[test]
fn thousand_puts_to_one_key_make_one_store_write() {
    let s = store();
    let (cache, _clock) = manual(&s, Duration::from_secs(1));
    for v in 0..1000 {
        cache.put(42, v).unwrap();
    }
    cache.flush().unwrap();
    let calls = s.calls();
    let writes: Vec<_> = calls.iter().flat_map(|c| c.batch.iter()).collect();
    assert_eq!(writes.len(), 1, "exactly one store write");
    assert_eq!(writes[0].value(), Some(&999), "carrying the last value");
    let m = cache.metrics();
    assert_eq!(m.puts, 1000);
    assert_eq!(m.conflated, 999);
}

#[test]
fn writes_per_window_equal_distinct_keys() {
    let s = store();
    let (cache, clock) = manual(&s, Duration::from_millis(100));
    for round in 0..3u64 {
        for i in 0..10_000u64 {
            cache.put(i % 250, round * 100_000 + i).unwrap();
        }
        cache.flush_step().unwrap(); // arms the delays
        clock.advance(Duration::from_millis(100));
        cache.flush_step().unwrap(); // everything due
        let written: usize = s.calls().iter().map(|c| c.batch.len()).sum();
        assert_eq!(
            written as u64,
            250 * (round + 1),
            "one write per distinct key per window"
        );
    }
}

// 3. Staleness bound -------------------------------------------------------------------

#[test]
fn delay_counts_from_the_first_unflushed_write() {
    let s = store();
    let (cache, clock) = manual(&s, Duration::from_millis(100));
    cache.put(1, 1).unwrap();
    cache.flush_step().unwrap(); // the flusher sees the shard armed at t=0
    clock.advance(Duration::from_millis(60));
    cache.put(1, 2).unwrap(); // a later write must not restart the clock
    cache.flush_step().unwrap();
    assert!(s.calls().is_empty(), "not due at 60 ms");
    clock.advance(Duration::from_millis(40));
    cache.flush_step().unwrap();
    assert_eq!(
        s.memory().get(&1),
        Some(2),
        "due 100 ms after the first write, 40 ms after the last"
    );
}

/// The delay runs from the write that armed the shard, not from the step that first saw it
/// armed: a flusher that comes late (a niced one on busy cores, or one busy with another
/// shard) must not push the deadline back by its own lateness.
#[test]
fn delay_counts_from_the_first_write_even_when_the_flusher_sees_it_late() {
    let s = store();
    let (cache, clock) = manual(&s, Duration::from_millis(100));
    cache.put(1, 1).unwrap(); // arms the shard at t=0
    clock.advance(Duration::from_millis(60));
    cache.flush_step().unwrap(); // the flusher first looks at 60 ms
    assert!(s.calls().is_empty(), "not due at 60 ms");
    clock.advance(Duration::from_millis(40));
    cache.flush_step().unwrap();
    assert_eq!(
        s.memory().get(&1),
        Some(1),
        "due 100 ms after the write, 40 ms after the flusher first saw it"
    );
    assert_eq!(cache.metrics().oldest_unflushed_age, Duration::ZERO);
}

#[test]
fn threaded_flusher_meets_the_staleness_bound() {
    let s = store();
    let delay = Duration::from_millis(200);
    let cache = Cache::builder(s.clone())
        .write_delay(delay)
        .build()
        .unwrap();
    let t0 = Instant::now();
    cache.put(1, 1).unwrap();
    std::thread::sleep(Duration::from_millis(120));
    cache.put(1, 2).unwrap();
    assert!(eventually(Duration::from_secs(5), || s.memory().get(&1) == Some(2)));
    let took = t0.elapsed();
    // Written no earlier than the delay after the first write and well before the delay
    // after the last one (which would be 320 ms).
    assert!(took >= delay, "flushed too early: {took:?}");
    assert!(
        took < Duration::from_millis(310),
        "flushed later than first write + delay: {took:?}"
    );
}

// 4. Write-combining ----------------------------------------------------------------------

#[test]
fn batches_never_exceed_max_batch() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .manual_flushing()
        .max_batch(7)
        .shards(2)
        .build()
        .unwrap();
    for k in 0..100 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    let calls = s.calls();
    assert!(calls
        .iter()
        .all(|c| c.batch.len() <= 7 && !c.batch.is_empty()));
    assert_eq!(calls.iter().map(|c| c.batch.len()).sum::<usize>(), 100);
    assert_eq!(
        calls.len(),
        100usize.div_ceil(7),
        "batches are full but for the last"
    );
}

/// `max_batch − 1` dirty keys over `shards` shards wait for the hour-long delay; one more
/// starts a flush at once, which sends all of them in one batch.
fn count_trigger_case(shards: usize, max_batch: u64) {
    let s = store();
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::from_secs(3600))
        .max_batch(max_batch as usize)
        .shards(shards)
        .build()
        .unwrap();
    for k in 0..max_batch - 1 {
        cache.put(k, k).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        s.calls().is_empty(),
        "{} dirty keys over {shards} shard(s): below the trigger, the delay holds",
        max_batch - 1
    );
    cache.put(max_batch - 1, 0).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || s.memory().len() as u64
            == max_batch),
        "the last dirty key triggers a flush long before the delay"
    );
    let sizes: Vec<usize> = s.calls().iter().map(|c| c.batch.len()).collect();
    assert_eq!(sizes, vec![max_batch as usize], "one full batch");
}

#[test]
fn count_trigger_flushes_before_the_delay() {
    count_trigger_case(1, 50);
}

/// The count trigger counts the dirty keys of all of a flusher's shards, and the batch it
/// fires carries all of them (a trigger per shard would fire at `max_batch / shards` keys,
/// with a batch of that one shard).
#[test]
fn count_trigger_counts_across_shards_and_sends_one_batch() {
    count_trigger_case(64, 100);
}

#[test]
fn full_ring_loses_nothing() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .manual_flushing()
        .shards(1)
        .dirty_ring_capacity(2)
        .max_batch(1) // trigger 1, ring capacity at least 2
        .build()
        .unwrap();
    for k in 0..300 {
        cache.put(k, k + 1).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(
        s.memory().len(),
        300,
        "keys that did not fit the ring were found by the scan"
    );
    for k in 0..300 {
        assert_eq!(s.memory().get(&k), Some(k + 1));
    }
}

/// Flushes 2,000 keys written in a scrambled order, in batches of 100, with or without
/// `flush_order`; returns each batch's span of keys (largest less smallest) and checks that
/// every key reached the store with its latest value.
fn batch_spans(order: Option<fn(&u64, &u64) -> std::cmp::Ordering>) -> Vec<u64> {
    let s = store();
    let mut b = Cache::builder(s.clone())
        .manual_flushing()
        .shards(64)
        .max_batch(100)
        .dirty_ring_capacity(4096);
    if let Some(order) = order {
        b = b.flush_order(order);
    }
    let cache = b.build().unwrap();
    for i in 0..2000u64 {
        cache.put((i * 7919) % 2000, i).unwrap();
    }
    cache.flush().unwrap();
    for i in 0..2000u64 {
        assert_eq!(s.memory().get(&((i * 7919) % 2000)), Some(i));
    }
    s.calls()
        .iter()
        .map(|c| {
            let keys = c.batch.iter().map(|w| *w.key());
            keys.clone().max().unwrap() - keys.min().unwrap()
        })
        .collect()
}

/// With `flush_order`, a backlog reaches the store in runs of neighbouring keys; without
/// it, every batch spans the whole key space (so this test tells the two apart).
#[test]
fn flush_order_sends_a_backlog_in_runs_of_neighbouring_keys() {
    let ordered = batch_spans(Some(|a, b| a.cmp(b)));
    assert_eq!(ordered.len(), 20, "2,000 keys in batches of 100");
    assert!(
        ordered.iter().all(|&span| span == 99),
        "each batch holds 100 consecutive keys: {ordered:?}"
    );
    let unordered = batch_spans(None);
    assert!(
        unordered.iter().all(|&span| span > 1000),
        "without an order each batch spans the key space: {unordered:?}"
    );
}

/// A comparator that panics costs the order, not the writes.
#[test]
fn a_panicking_flush_order_still_writes_everything() {
    let spans = batch_spans(Some(|_, _| panic!("a comparator that panics")));
    assert_eq!(spans.len(), 20);
}

// 5. Per-key order --------------------------------------------------------------------------

#[test]
fn versions_only_grow_in_the_store_under_failures() {
    let s = store();
    s.fail_with_probability(0.3, 7);
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::from_millis(1))
            .max_batch(16)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(4))
            .build()
            .unwrap(),
    );
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let cache = cache.clone();
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u64 {
                    if i % 500 == 0 {
                        s.partial_next(2);
                    }
                    if i % 3 == 0 {
                        cache.remove(&(i % 64)).unwrap();
                    } else {
                        cache.put(i % 64, t * 1_000_000 + i).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The random failures above may all miss when a loaded machine starves the flusher
    // until the writers are done; these two make sure the final flush goes through the
    // failure paths as well.
    s.heal();
    s.fail_next(1);
    s.panic_next(1);
    cache.put(0, 0).unwrap();
    cache.flush().unwrap();
    assert_versions_grow(&s);
    assert_store_equals_cache(&s, &cache, 64);
    let m = cache.metrics();
    assert!(
        m.retries > 0 && m.store_unavailable > 0 && m.store_panics > 0,
        "failures happened: {m:?}"
    );
}

// 6. No silent loss ---------------------------------------------------------------------------

#[test]
fn unavailable_store_keeps_writes_and_accepts_more() {
    let s = store();
    let (cache, clock) = manual(&s, Duration::ZERO);
    s.set_down(true);
    for k in 0..10 {
        cache.put(k, k).unwrap();
    }
    cache.flush_step().unwrap();
    assert!(matches!(cache.metrics().health, Health::Degraded { .. }));
    for k in 10..20 {
        cache.put(k, k).unwrap(); // writes are still served from memory
    }
    assert_eq!(cache.metrics().dirty, 20);
    for _ in 0..5 {
        clock.advance(Duration::from_millis(50));
        cache.flush_step().unwrap();
    }
    assert_eq!(s.memory().len(), 0);
    s.set_down(false);
    clock.advance(Duration::from_millis(50));
    cache.flush_step().unwrap();
    cache.flush().unwrap();
    assert_eq!(s.memory().len(), 20);
    let m = cache.metrics();
    assert_eq!(m.health, Health::Healthy);
    assert_eq!(m.dirty, 0);
    assert!(m.retries >= 10);
}

#[test]
fn backoff_grows_while_the_store_is_down() {
    let s = store();
    let (cache, clock) = manual(&s, Duration::ZERO);
    s.set_down(true);
    cache.put(1, 1).unwrap();
    // Over 100 ms of steps every millisecond, a 1 ms base doubling to 8 ms makes far fewer
    // calls than steps.
    for _ in 0..100 {
        cache.flush_step().unwrap();
        clock.advance(Duration::from_millis(1));
    }
    let calls = s.calls().len();
    assert!(
        (5..=40).contains(&calls),
        "{calls} store calls in 100 steps"
    );
}

#[test]
fn rejected_record_goes_to_the_sink_after_max_attempts() {
    let s = store();
    s.reject_if(|w| *w.key() == 13);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let cache = Cache::builder(s.clone())
        .manual_flushing()
        .max_attempts(3)
        .on_failed_write(move |fw| seen2.lock().unwrap().push(fw.write.clone()))
        .build()
        .unwrap();
    for k in 0..20 {
        cache.put(k, k * 10).unwrap();
    }
    let err = cache.flush().unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Rejected(_))),
        "{err}"
    );
    assert_eq!(s.memory().len(), 19, "the others were written");
    let failed = cache.failed_writes();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].write.key(), &13);
    assert_eq!(failed[0].write.value(), Some(&130));
    assert_eq!(failed[0].attempts, 3);
    assert_eq!(seen.lock().unwrap().len(), 1, "the callback saw it too");
    let tries = s.received_versions()[&13].len();
    assert_eq!(tries, 3, "tried exactly max_attempts times");
    assert!(
        cache.failed_writes().is_empty(),
        "draining empties the sink"
    );
    // The application fixes the cause and re-submits.
    s.stop_rejecting();
    cache.put(13, 130).unwrap();
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&13), Some(130));
}

#[test]
fn panicking_store_is_caught_and_the_flusher_survives() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::ZERO)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build()
        .unwrap();
    s.panic_next(2);
    cache.put(1, 1).unwrap();
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&1), Some(1));
    cache.put(2, 2).unwrap();
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&2), Some(2), "the flusher still runs");
    assert_eq!(cache.metrics().store_panics, 2);
    assert_eq!(
        s.calls()
            .iter()
            .filter(|c| c.outcome == Outcome::Panicked)
            .count(),
        2
    );
}

#[test]
fn partial_batch_requeues_only_failed_records() {
    let s = store();
    let (cache, _clock) = manual(&s, Duration::ZERO);
    s.partial_next(1);
    for k in 0..10 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    let calls = s.calls();
    assert!(matches!(calls[0].outcome, Outcome::Partial(_)));
    let first_failed = match &calls[0].outcome {
        Outcome::Partial(f) => f.len(),
        _ => unreachable!(),
    };
    let resent: usize = calls[1..].iter().map(|c| c.batch.len()).sum();
    assert_eq!(
        resent, first_failed,
        "only the failed records were sent again"
    );
    assert_eq!(s.memory().len(), 10);
}

// 7. flush() is a barrier ------------------------------------------------------------------------

#[test]
fn flush_is_a_barrier_for_concurrent_writers() {
    let s = store();
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::from_secs(60))
            .flushers(2)
            .build()
            .unwrap(),
    );
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let cache = cache.clone();
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let k = t * 1000 + i % 17;
                    let v = t * 1_000_000 + i;
                    cache.put(k, v).unwrap();
                    cache.flush().unwrap();
                    // Only this thread writes k, so the store must hold exactly v.
                    assert_eq!(
                        s.memory().get(&k),
                        Some(v),
                        "flush returned before the write was stored"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn flush_racing_an_in_flight_batch_waits_and_writes_nothing_twice() {
    let s = store();
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::ZERO)
            .build()
            .unwrap(),
    );
    s.hold();
    cache.put(1, 1).unwrap();
    assert!(s.wait_until_held(Duration::from_secs(5)));
    let done = Arc::new(AtomicBool::new(false));
    let c2 = cache.clone();
    let d2 = done.clone();
    let flusher = std::thread::spawn(move || {
        c2.flush().unwrap();
        d2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "flush waits for the batch in flight"
    );
    s.release();
    flusher.join().unwrap();
    assert_eq!(s.memory().get(&1), Some(1));
    assert_eq!(s.received_versions()[&1].len(), 1, "written once");
}

#[test]
fn flush_times_out_on_a_dead_store_without_losing_anything() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::ZERO)
        .flush_timeout(Duration::from_millis(150))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(20))
        .build()
        .unwrap();
    s.set_down(true);
    cache.put(1, 1).unwrap();
    let err = cache.flush().unwrap_err();
    assert!(matches!(err, Error::FlushTimeout { .. }), "{err}");
    s.set_down(false);
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&1), Some(1));
}

// 8. No lock across the store ------------------------------------------------------------------------

/// A store that calls back into its cache from `write_all`.
struct Reentrant {
    inner: MemoryStore<u64, u64>,
    cache: OnceLock<Weak<Cache<u64, u64>>>,
    flush_result: std::sync::Mutex<Option<String>>,
}

impl Store<u64, u64> for Reentrant {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.inner.load(key)
    }
    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        if let Some(cache) = self.cache.get().and_then(Weak::upgrade) {
            for w in batch {
                if *w.key() < 1000 {
                    // Read the key being written and write a derived key.
                    let _ = cache.get(w.key()).unwrap();
                    cache.put(w.key() + 1000, w.version()).unwrap();
                }
            }
            let r = cache.flush();
            *self.flush_result.lock().unwrap() = Some(format!("{r:?}"));
        }
        self.inner.write_all(batch)
    }
}

#[test]
fn store_may_call_back_into_the_cache() {
    let store = Arc::new(Reentrant {
        inner: MemoryStore::new(),
        cache: OnceLock::new(),
        flush_result: std::sync::Mutex::new(None),
    });
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_delay(Duration::from_millis(1))
            .build()
            .unwrap(),
    );
    store.cache.set(Arc::downgrade(&cache)).ok();
    for k in 0..50 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    cache.flush().unwrap(); // the puts made from inside write_all
    for k in 0..50 {
        assert_eq!(store.inner.get(&k), Some(k));
        assert!(
            store.inner.get(&(k + 1000)).is_some(),
            "a put made from the store was lost"
        );
    }
    let r = store.flush_result.lock().unwrap().clone().unwrap();
    assert!(
        r.contains("Reentrant"),
        "flush from inside the store is refused: {r}"
    );
}

// 9. At-least-once, idempotent ----------------------------------------------------------------------

#[test]
fn redelivery_after_unknown_outcome_is_harmless() {
    // A store that applies the batch and then reports it unavailable (outcome unknown).
    struct AppliedThenFailed(MemoryStore<u64, u64>, std::sync::atomic::AtomicUsize);
    impl Store<u64, u64> for AppliedThenFailed {
        fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
            self.0.load(key)
        }
        fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
            self.0.write_all(batch)?;
            if self.1.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(BatchError::unavailable("connection reset after commit"));
            }
            Ok(())
        }
    }
    let store = Arc::new(AppliedThenFailed(MemoryStore::new(), Default::default()));
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .build()
        .unwrap();
    cache.put(1, 1).unwrap();
    cache.flush().unwrap();
    assert_eq!(store.0.get(&1), Some(1));
    assert_eq!(store.0.batches(), 2, "delivered twice");
}

// 10. Versions outlive the process ----------------------------------------------------------------------

#[test]
fn a_second_cache_on_the_same_store_writes_higher_versions() {
    let s = store();
    let first = Cache::builder(s.clone()).manual_flushing().build().unwrap();
    for v in 0..10_000 {
        first.put(1, v).unwrap();
    }
    first.flush().unwrap();
    let v1 = s.memory().version_of(&1).unwrap();
    assert!(first.close(Duration::from_secs(1)).is_clean());
    let second = Cache::builder(s.clone()).manual_flushing().build().unwrap();
    second.put(1, 7).unwrap();
    second.flush().unwrap();
    let v2 = s.memory().version_of(&1).unwrap();
    assert!(v2 > v1, "restart wrote version {v2} <= {v1}");
    assert_eq!(
        s.memory().get(&1),
        Some(7),
        "the version guard accepted the new write"
    );
    // Versions start at the wall clock.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(v1 > now_ns - 3_600_000_000_000 && v2 <= now_ns + 1_000_000_000);
}

// close / Drop ---------------------------------------------------------------------------------------

#[test]
fn close_with_a_dead_store_hands_back_exactly_the_unwritten() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::ZERO)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .build()
        .unwrap();
    for k in 0..10 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    s.set_down(true);
    for k in 5..15 {
        cache.put(k, k * 100).unwrap();
    }
    cache.remove(&0).unwrap();
    let report = cache.close(Duration::from_millis(200));
    assert!(report.deadline_reached);
    let mut got: Vec<(u64, Option<u64>)> = report
        .unwritten
        .iter()
        .map(|w| (*w.key(), w.value().copied()))
        .collect();
    got.sort();
    let mut want: Vec<(u64, Option<u64>)> = (5..15).map(|k| (k, Some(k * 100))).collect();
    want.insert(0, (0, None));
    assert_eq!(got, want);
    let calls_at_close = s.calls().len();
    assert!(matches!(cache.put(1, 1), Err(Error::Closed)));
    assert!(matches!(cache.remove(&1), Err(Error::Closed)));
    assert!(matches!(cache.flush(), Err(Error::Closed)));
    assert!(
        matches!(cache.get(&999), Err(Error::Closed)),
        "no read-through after close"
    );
    assert_eq!(cache.get(&1).unwrap(), Some(1), "hits are still served");
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        s.calls().len(),
        calls_at_close,
        "nothing calls the store after close"
    );
    assert!(cache.close(Duration::ZERO).already_closed);
}

#[test]
fn close_drains_a_healthy_store() {
    let s = store();
    let cache = flushed_on_demand(&s);
    for k in 0..1000 {
        cache.put(k, k).unwrap();
    }
    let report = cache.close(Duration::from_secs(10));
    assert!(report.is_clean() && !report.deadline_reached);
    assert_eq!(s.memory().len(), 1000);
}

#[test]
fn drop_flushes_what_is_pending() {
    let s = store();
    {
        let cache = flushed_on_demand(&s);
        cache.put(1, 1).unwrap();
        cache.remove(&2).unwrap();
    }
    assert_eq!(s.memory().get(&1), Some(1));
    assert!(s.memory().version_of(&2).is_some(), "the delete was sent");
}

fn flusher_threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn hundred_caches_leave_no_thread_behind() {
    if !std::path::Path::new("/proc/self/task").exists() {
        eprintln!("no /proc: thread count not checkable here");
        return;
    }
    for i in 0..100u64 {
        let cache = Cache::builder(MemoryStore::<u64, u64>::new())
            .name("leakchk")
            .flushers(2)
            .build()
            .unwrap();
        cache.put(i, i).unwrap();
        if i == 50 {
            let visible = eventually(Duration::from_secs(5), || flusher_threads("leakchk") == 2);
            assert!(visible, "the live cache's two flushers are visible");
        }
    }
    // A joined thread can linger in /proc/self/task for a moment: the kernel wakes the
    // joiner before it removes the task.
    assert!(
        eventually(Duration::from_secs(5), || flusher_threads("leakchk") == 0),
        "{} flusher threads left",
        flusher_threads("leakchk")
    );
}

/// The nice value of a thread from its `/proc/.../stat` (field 19).
#[cfg(target_os = "linux")]
fn nice_of(stat_path: &std::path::Path) -> Option<i32> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised name start with the state, field 3.
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(19 - 3)?
        .parse()
        .ok()
}

/// The nice values of this process's threads whose name starts with `prefix`.
#[cfg(target_os = "linux")]
fn nice_of_threads(prefix: &str) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|name| name.starts_with(prefix))
        })
        .filter_map(|e| nice_of(&e.path().join("stat")))
        .collect()
}

/// Flusher threads lower their own CPU priority by `Builder::flusher_nice` levels (none by
/// default), capped at 19; the building thread keeps its own.
#[cfg(target_os = "linux")]
#[test]
fn flushers_run_the_configured_nice_levels_below_the_builder() {
    let own = || nice_of(std::path::Path::new("/proc/thread-self/stat")).unwrap();
    let base = own();
    for (name, levels) in [
        ("nicedflt", None),
        ("niceten", Some(10)),
        ("nicefifty", Some(50)),
    ] {
        let mut b = Cache::builder(MemoryStore::<u64, u64>::new())
            .name(name)
            .flushers(2);
        if let Some(n) = levels {
            b = b.flusher_nice(n);
        }
        let cache = b.build().unwrap();
        // Each flusher lowers its priority before it serves anything: once a flush has been
        // served by both, both have done it.
        for k in 0..64 {
            cache.put(k, k).unwrap();
        }
        cache.flush().unwrap();
        let want = (base + i32::from(levels.unwrap_or(0))).min(19);
        let workers = format!("{name}-f");
        assert!(
            eventually(Duration::from_secs(5), || nice_of_threads(&workers)
                == vec![want, want]),
            "{name}: flusher nice values {:?}, want {want} twice (builder at {base})",
            nice_of_threads(&workers)
        );
        // A niced flusher has a keeper thread at the builder's priority; one that is not
        // niced has none. A keeper parks at once and serves nothing until a handoff, and a
        // thread takes its name only once it runs, so wait for the names to appear.
        let keepers = if levels.is_some() {
            vec![base, base]
        } else {
            Vec::new()
        };
        let keeper_prefix = format!("{name}-k");
        assert!(
            eventually(Duration::from_secs(5), || nice_of_threads(&keeper_prefix)
                == keepers),
            "{name}: keeper threads' nice values {:?}, want {keepers:?} (builder at {base})",
            nice_of_threads(&keeper_prefix)
        );
        assert_eq!(own(), base, "the building thread keeps its priority");
    }
}

/// A store that remembers which threads called `write_all`, around a [`FaultyStore`].
#[cfg(target_os = "linux")]
struct ThreadLoggingStore {
    inner: common::Store,
    threads: std::sync::Mutex<Vec<String>>,
}

#[cfg(target_os = "linux")]
impl writebehind::Store<u64, u64> for ThreadLoggingStore {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.inner.load(key)
    }

    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        self.inner.write_all(batch)
    }
}

/// A niced flusher that runs late hands the rest of its step to its keeper, which writes it
/// at the builder's priority and hands back. Here the store takes 20 ms a batch of 10, and
/// 300 keys queued at once make one count-triggered step of about 600 ms: once a batch would
/// end less than half the 400 ms delay before its deadline, after about 9 batches, the
/// worker stops between two batches. Every key still reaches the store once, with its
/// value, in version order.
#[cfg(target_os = "linux")]
#[test]
fn a_late_niced_flusher_hands_the_rest_of_its_step_to_its_keeper() {
    let faulty = store();
    faulty.set_latency(Duration::from_millis(20));
    let logging = Arc::new(ThreadLoggingStore {
        inner: faulty.clone(),
        threads: Default::default(),
    });
    let cache = Cache::builder(logging.clone())
        .name("handoff")
        .flusher_nice(5)
        .write_delay(Duration::from_millis(400))
        .max_batch(10)
        .shards(4)
        .build()
        .unwrap();
    for k in 0..300 {
        cache.put(k, k + 1).unwrap();
    }
    // No flush: its full step would never hand off. The count trigger alone writes them.
    assert!(
        eventually(Duration::from_secs(10), || faulty.memory().len() == 300),
        "{} of 300 keys reached the store",
        faulty.memory().len()
    );
    let threads = logging.threads.lock().unwrap().clone();
    let by = |prefix: &str| threads.iter().filter(|t| t.starts_with(prefix)).count();
    assert!(
        by("handoff-flusher") > 0 && by("handoff-keeper") > 0,
        "batches by the worker {} and by the keeper {} (of {})",
        by("handoff-flusher"),
        by("handoff-keeper"),
        threads.len()
    );
    assert!(cache.metrics().flusher_handoffs >= 1);
    let snap = faulty.memory().snapshot();
    for k in 0..300 {
        assert_eq!(snap.get(&k), Some(&(k + 1)), "key {k}");
    }
    assert_eq!(
        faulty.calls().iter().map(|c| c.batch.len()).sum::<usize>(),
        300,
        "each key written once"
    );
    assert_versions_grow(&faulty);
    let report = cache.close(Duration::from_secs(5));
    assert!(report.unwritten.is_empty());
}

// Read-through --------------------------------------------------------------------------------------------

#[test]
fn miss_reads_through_once_and_caches() {
    let s = store();
    s.memory().insert(9, 90);
    let (cache, _clock) = manual(&s, Duration::from_secs(1));
    assert_eq!(cache.get(&9).unwrap(), Some(90));
    assert_eq!(cache.get(&9).unwrap(), Some(90));
    assert_eq!(s.load_calls(), 1);
    assert!(cache.contains_key(&9));
    assert!(!cache.contains_key(&10));
    assert_eq!(s.load_calls(), 1, "contains_key never loads");
    let m = cache.metrics();
    assert_eq!((m.gets, m.hits, m.misses, m.loads), (2, 1, 1, 1));
    assert_eq!(cache.len(), 1);
}

#[test]
fn load_error_is_an_error_not_none() {
    let s = store();
    let (cache, _clock) = manual(&s, Duration::from_secs(1));
    s.set_down(true);
    assert!(matches!(
        cache.get(&1),
        Err(Error::Load(StoreError::Unavailable(_)))
    ));
    assert_eq!(cache.metrics().load_errors, 1);
    assert!(!cache.contains_key(&1), "nothing was cached");
}

// Configuration ---------------------------------------------------------------------------------------------

#[test]
fn invalid_configurations_are_refused_with_the_setting_named() {
    let b = || Cache::<u64, u64>::builder(MemoryStore::new()).manual_flushing();
    type Built = Result<Cache<u64, u64>, Error>;
    let cases: Vec<(&str, Built)> = vec![
        ("shards", b().shards(0).build()),
        ("shards", b().shards(3).build()),
        ("shards", b().shards(1 << 20).build()),
        ("flushers", b().flushers(0).build()),
        ("flushers", b().shards(2).flushers(4).build()),
        ("max_batch", b().max_batch(0).build()),
        ("max_attempts", b().max_attempts(0).build()),
        (
            "retry_backoff",
            b().retry_backoff(Duration::ZERO, Duration::from_secs(1))
                .build(),
        ),
        (
            "retry_backoff",
            b().retry_backoff(Duration::from_secs(2), Duration::from_secs(1))
                .build(),
        ),
        ("dirty_ring_capacity", b().dirty_ring_capacity(0).build()),
    ];
    for (setting, result) in cases {
        match result {
            Err(Error::InvalidConfig { setting: s, reason }) => {
                assert_eq!(s, setting, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{setting}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert!(b().shards(1).flushers(1).max_batch(1).build().is_ok());
}

// Write modes -----------------------------------------------------------------------------------------------

#[test]
fn write_through_returns_after_the_store_and_keeps_old_value_on_failure() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .write_mode(WriteMode::Through)
        .manual_flushing()
        .build()
        .unwrap();
    cache.put(1, 1).unwrap();
    assert_eq!(s.memory().get(&1), Some(1), "in the store when put returns");
    s.set_down(true);
    assert!(matches!(cache.put(1, 2), Err(Error::Store(_))));
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(1),
        "the cache kept the old value"
    );
    s.set_down(false);
    cache.remove(&1).unwrap();
    assert_eq!(s.memory().get(&1), None);
    assert_eq!(cache.get(&1).unwrap(), None);
    let m = cache.metrics();
    assert_eq!(
        (m.puts, m.removes),
        (1, 1),
        "the put and the remove the store took count; the failed put does not"
    );
}

/// A cache in `WriteMode::Through`, flushed by hand, over `store`.
fn write_through_cache<S: Store<u64, u64> + 'static>(store: &Arc<S>) -> Arc<Cache<u64, u64>> {
    Arc::new(
        Cache::builder(store.clone())
            .write_mode(WriteMode::Through)
            .manual_flushing()
            .build()
            .unwrap(),
    )
}

/// A thread that puts and returns the put's version.
type PutThread = std::thread::JoinHandle<Result<u64, Error>>;

/// A write-through cache on a store that holds puts of 10, and a thread whose put of 10 to
/// key 1 is at the store (held) when this returns.
fn a_write_through_of_key_1_held() -> (Arc<HoldsValues>, Arc<Cache<u64, u64>>, PutThread) {
    let store = Arc::new(HoldsValues::new(&[10]));
    let cache = write_through_cache(&store);
    let c = cache.clone();
    let put = std::thread::spawn(move || c.put(1, 10));
    store.wait_until_held(10);
    (store, cache, put)
}

/// Two write-throughs of one key: the second waits until the first has been to the store, so
/// the store receives the versions in order and the cache ends with the store's answer. (Run
/// side by side, the remove could reach the store first, the store's version guard would then
/// ignore the older put, and the put would still cache its value: `get` would say `Some(10)`
/// while the store held nothing.)
#[test]
fn write_throughs_of_one_key_reach_the_store_one_at_a_time() {
    let (store, cache, put) = a_write_through_of_key_1_held();
    let c = cache.clone();
    let remove = std::thread::spawn(move || c.remove(&1));
    // A write-through of another key is not held up by the one in flight.
    cache.put(2, 20).unwrap();
    assert_eq!(store.memory.get(&2), Some(20));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        store.received.lock().unwrap().len(),
        2,
        "the remove reached the store while the put of the same key was still there"
    );
    store.release(10);
    let put_version = put.join().unwrap().unwrap();
    let remove_version = remove.join().unwrap().unwrap();
    assert!(
        put_version < remove_version,
        "the remove took its version after the put"
    );
    // Versions are per shard: key 1's are the ones to compare.
    let received: Vec<u64> = store
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k == 1)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(
        received,
        vec![put_version, remove_version],
        "in the order they were given"
    );
    assert_eq!(store.memory.get(&1), None);
    assert_eq!(
        cache.get(&1).unwrap(),
        None,
        "the cache agrees with the store"
    );
}

/// After a switch to `WriteMode::Through`, a write-through of a key whose write-behind batch
/// is at the store waits for that batch: the store applies the key's versions in order. (Going
/// straight to the store, it would have the new version applied and then the batch's older
/// one; a store without a version guard would keep the older value.)
#[test]
fn a_write_through_after_a_switch_waits_for_the_keys_batch_at_the_store() {
    let store = Arc::new(HoldsValues::new(&[10]));
    let cache = Arc::new(
        Cache::builder(store.clone())
            .manual_flushing()
            .build()
            .unwrap(),
    );
    let behind = cache.put(1, 10).unwrap();
    let c = cache.clone();
    let flush = std::thread::spawn(move || c.flush());
    store.wait_until_held(10); // the batch with key 1 is at the store
    let c = cache.clone();
    let switch = std::thread::spawn(move || c.set_write_mode(WriteMode::Through));
    while cache.write_mode() != WriteMode::Through {
        std::thread::yield_now();
    }
    let s = store.clone();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        s.release(10);
    });
    let through = cache.put(1, 11).unwrap();
    release.join().unwrap();
    flush.join().unwrap().unwrap();
    switch.join().unwrap().unwrap();
    assert_key_1_ends_at_11(&store, &cache, [behind, through]);
}

/// A remove written through over a write-behind put of the key that is still pending (here
/// because the switch's flush failed) takes the key out of the cache too: the entry becomes a
/// tombstone at the remove's version. (Were only a clean entry dropped, the older dirty value
/// would stay cached: a get after the remove would answer the removed value, and after a
/// flush the cache would hold it while the store held nothing.)
#[test]
fn a_remove_written_through_over_a_pending_write_behind_put_removes_it() {
    let s = store();
    let cache = Cache::builder(s.clone()).manual_flushing().build().unwrap();
    cache.put(1, 10).unwrap(); // write-behind: pending
    s.set_down(true);
    let switched = cache.set_write_mode(WriteMode::Through);
    assert!(
        matches!(switched, Err(Error::FlushTimeout { .. })),
        "{switched:?}"
    );
    assert_eq!(cache.write_mode(), WriteMode::Through);
    s.set_down(false);
    cache.remove(&1).unwrap(); // write-through: the store applies the delete
    assert_eq!(s.memory().get(&1), None);
    let seen = cache.get(&1).unwrap();
    cache.flush().unwrap();
    let after_flush = (cache.get(&1).unwrap(), s.memory().get(&1));
    assert_eq!(
        (seen, after_flush),
        (None, (None, None)),
        "(a get after the written-through remove, (cache, store) after a flush)"
    );
}

/// The same with a healthy store: the switch's flush is still on its way (it holds one
/// flusher's core while that flusher's batch is at the store) when a remove of a key owned
/// by the other flusher, whose write-behind put is still pending, is written through.
#[test]
fn a_remove_written_through_while_the_switch_flush_has_not_reached_the_key() {
    // Keys land in shards by a seeded hash, so a cache in which key 1 (held at the store)
    // and some other key belong to different flushers, with key 1's flushed first, is
    // looked for over a few caches.
    for _ in 0..64 {
        let store = Arc::new(HoldsValues::new(&[10]));
        let cache = Arc::new(
            Cache::builder(store.clone())
                .manual_flushing()
                .shards(2)
                .flushers(2)
                .build()
                .unwrap(),
        );
        cache.put(1, 10).unwrap();
        for k in 2..=16 {
            cache.put(k, 100 + k).unwrap();
        }
        let c = cache.clone();
        let switch = std::thread::spawn(move || c.set_write_mode(WriteMode::Through));
        store.wait_until_held(10); // the switch's flush holds key 1's flusher core
        let received: Vec<u64> = store.received.lock().unwrap().iter().map(|w| w.0).collect();
        let Some(k) = (2..=16).find(|k| !received.contains(k)) else {
            store.release(10); // key 1's flusher went second: try another cache
            switch.join().unwrap().unwrap();
            continue;
        };
        assert_eq!(cache.write_mode(), WriteMode::Through);
        cache.remove(&k).unwrap(); // written through under the other flusher's core
        assert_eq!(store.memory.get(&k), None);
        let seen = cache.get(&k).unwrap();
        store.release(10);
        switch.join().unwrap().unwrap();
        assert_eq!(
            seen, None,
            "key {k}: a get after the written-through remove returned answers the removed value"
        );
        return;
    }
    panic!("no cache put key 1 and another key in different flushers, key 1's first");
}

/// A write-through of key 1 is at the store when the mode switches back to `Behind`; a put of
/// key 1 made after the switch waits until the write-through is back, so its batch cannot
/// reach the store first. (Otherwise a flush would send it while the write-through is still
/// at the store, which would apply the newer version and then the write-through's older one;
/// a store without a version guard would keep the older value while the cache answers the
/// newer.)
#[test]
fn a_write_behind_after_a_switch_back_does_not_overtake_the_keys_write_through() {
    let (store, cache, through) = a_write_through_of_key_1_held();
    cache.set_write_mode(WriteMode::Behind).unwrap();
    let c = cache.clone();
    let behind = std::thread::spawn(move || {
        let version = c.put(1, 11)?;
        c.flush()?;
        Ok::<u64, Error>(version)
    });
    // Let the put and its flush finish if nothing holds them back (as now); a put that waits
    // for the write-through in flight is let go by the release after the deadline.
    eventually(Duration::from_millis(500), || behind.is_finished());
    store.release(10);
    let through = through.join().unwrap().unwrap();
    let behind = behind.join().unwrap().unwrap();
    assert!(
        through < behind,
        "the write-behind put took the newer version"
    );
    assert_key_1_ends_at_11(&store, &cache, [through, behind]);
}

/// The store applied key 1's versions in the order given, and the store and the cache both
/// hold 11 for it.
fn assert_key_1_ends_at_11(store: &HoldsValues, cache: &Cache<u64, u64>, versions: [u64; 2]) {
    assert_eq!(
        store.applied_versions(1),
        versions,
        "the store applied key 1's versions out of order"
    );
    assert_eq!(store.memory.get(&1), Some(11));
    assert_eq!(cache.get(&1).unwrap(), Some(11));
}

/// A store whose `write_all` holds a batch with a put of one of some values until the test
/// lets that value go.
struct HoldsValues {
    memory: MemoryStore<u64, u64>,
    /// value -> (a put of it is held, the test let it go)
    gates: std::sync::Mutex<HashMap<u64, (bool, bool)>>,
    changed: std::sync::Condvar,
    /// Every (key, version) the store was handed, in the order of the calls.
    received: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Every (key, version) the store applied, in the order it applied them.
    applied: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl HoldsValues {
    fn new(values: &[u64]) -> Self {
        HoldsValues {
            memory: MemoryStore::new(),
            gates: std::sync::Mutex::new(values.iter().map(|&v| (v, (false, false))).collect()),
            changed: std::sync::Condvar::new(),
            received: std::sync::Mutex::new(Vec::new()),
            applied: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn wait_until_held(&self, value: u64) {
        let mut gates = self.gates.lock().unwrap();
        while !gates[&value].0 {
            gates = self.changed.wait(gates).unwrap();
        }
    }

    fn is_held(&self, value: u64) -> bool {
        self.gates.lock().unwrap()[&value].0
    }

    fn release(&self, value: u64) {
        self.gates.lock().unwrap().get_mut(&value).unwrap().1 = true;
        self.changed.notify_all();
    }

    fn applied_versions(&self, key: u64) -> Vec<u64> {
        let applied = self.applied.lock().unwrap();
        applied
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    }
}

impl Store<u64, u64> for HoldsValues {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.memory.load(key)
    }
    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        self.received
            .lock()
            .unwrap()
            .extend(batch.iter().map(|w| (*w.key(), w.version())));
        let mut gates = self.gates.lock().unwrap();
        for w in batch {
            let Some(&value) = w.value() else { continue };
            if let Some(gate) = gates.get_mut(&value) {
                gate.0 = true;
                self.changed.notify_all();
                while !gates[&value].1 {
                    gates = self.changed.wait(gates).unwrap();
                }
            }
        }
        drop(gates);
        let mut applied = self.applied.lock().unwrap();
        applied.extend(batch.iter().map(|w| (*w.key(), w.version())));
        self.memory.write_all(batch)
    }
}

/// A write-through decides whether to hold its flusher's core (the key has write-behind work
/// pending) on its turn, under the lock that marks it. It once decided before waiting for the
/// key's write-through in flight: a write-behind put of the key made while it waited (the
/// mode went back to `Behind`) was in a batch at the store when the waiting write-through
/// went there too, without the core, and the store applied the write-through's newer version
/// first and the batch's older one after it.
#[test]
fn a_write_through_that_waited_for_its_turn_does_not_overtake_a_batch_of_its_key() {
    let store = Arc::new(HoldsValues::new(&[10, 11]));
    let cache = write_through_cache(&store);
    let c = cache.clone();
    let first = std::thread::spawn(move || c.put(1, 10));
    store.wait_until_held(10); // the first write-through of key 1 is at the store
    let c = cache.clone();
    let second = std::thread::spawn(move || c.put(1, 12));
    // Time for the second write-through to find key 1 without write-behind work and to wait
    // for the first (nothing outside the cache shows that it waits).
    std::thread::sleep(Duration::from_millis(100));
    cache.set_write_mode(WriteMode::Behind).unwrap();
    let c = cache.clone();
    let behind = std::thread::spawn(move || {
        let version = c.put(1, 11)?;
        c.flush()?;
        Ok::<u64, Error>(version)
    });
    // Each wait below ends at once on the code as it is; the deadlines let a cache that holds
    // the put or the second write-through back finish anyway.
    let wait = |done: &dyn Fn() -> bool| eventually(Duration::from_millis(500), done);
    wait(&|| store.is_held(11)); // the batch with key 1 is at the store
    store.release(10);
    wait(&|| second.is_finished());
    store.release(11);
    let first = first.join().unwrap().unwrap();
    let second = second.join().unwrap().unwrap();
    let behind = behind.join().unwrap().unwrap();
    let applied = store.applied_versions(1);
    let mut in_order = applied.clone();
    in_order.sort_unstable();
    assert_eq!(
        (applied.len(), first < behind),
        (3, true),
        "three versions of key 1"
    );
    assert_eq!(
        applied, in_order,
        "the store applied key 1's versions out of order (first write-through {first}, \
         write-behind {behind}, second write-through {second})"
    );
    let last = if second > behind { 12 } else { 11 };
    assert_eq!(store.memory.get(&1), Some(last));
    assert_eq!(cache.get(&1).unwrap(), Some(last));
}

/// A store that, handed a write of `trigger` (a value), puts `value` at `key` (`None`: the
/// key being written) into its cache from inside `write_all`, and keeps what that put
/// returned.
struct PutsFromStore {
    memory: MemoryStore<u64, u64>,
    cache: OnceLock<Weak<Cache<u64, u64>>>,
    trigger: u64,
    key: Option<u64>,
    value: u64,
    inner_result: std::sync::Mutex<Option<String>>,
}

impl PutsFromStore {
    fn new(trigger: u64, key: Option<u64>, value: u64) -> Self {
        PutsFromStore {
            memory: MemoryStore::new(),
            cache: OnceLock::new(),
            trigger,
            key,
            value,
            inner_result: std::sync::Mutex::new(None),
        }
    }
}

impl Store<u64, u64> for PutsFromStore {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.memory.load(key)
    }
    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        if let Some(cache) = self.cache.get().and_then(Weak::upgrade) {
            if let Some(w) = batch.iter().find(|w| w.value() == Some(&self.trigger)) {
                let r = cache.put(self.key.unwrap_or(*w.key()), self.value);
                *self.inner_result.lock().unwrap() = Some(format!("{r:?}"));
            }
        }
        self.memory.write_all(batch)
    }
}

/// A put from inside a flusher's store call that meets a full shard under
/// `Backpressure::WriteThrough` would take the flusher's core, which the call it is in holds:
/// it is refused instead of waiting for itself.
#[test]
fn a_write_through_under_backpressure_from_inside_the_store_is_refused() {
    let store = Arc::new(PutsFromStore::new(1, Some(2), 2));
    let cache = Arc::new(
        Cache::builder(store.clone())
            .shards(1)
            .max_dirty(1, Backpressure::WriteThrough)
            .manual_flushing()
            .build()
            .unwrap(),
    );
    store.cache.set(Arc::downgrade(&cache)).ok();
    cache.put(1, 1).unwrap(); // the shard's one dirty entry
    let (done, wait) = std::sync::mpsc::channel();
    let c = cache.clone();
    std::thread::spawn(move || {
        let _ = done.send(c.flush());
    });
    let flushed = wait
        .recv_timeout(Duration::from_secs(20))
        .expect("the flush waits for itself");
    flushed.unwrap();
    let inner = store.inner_result.lock().unwrap().clone().unwrap();
    assert!(
        inner.contains("Reentrant"),
        "refused, not deadlocked: {inner}"
    );
    assert_eq!(store.memory.get(&1), Some(1));
}

/// A store that writes through, from inside `write_all`, the key it is writing: the inner
/// write-through would wait for the outer one, which waits for the store, so it is refused.
#[test]
fn a_write_through_of_the_key_being_written_from_inside_the_store_is_refused() {
    let store = Arc::new(PutsFromStore::new(1, None, 2));
    let cache = write_through_cache(&store);
    store.cache.set(Arc::downgrade(&cache)).ok();
    cache.put(7, 1).unwrap();
    let inner = store.inner_result.lock().unwrap().clone().unwrap();
    assert!(
        inner.contains("Reentrant"),
        "refused, not deadlocked: {inner}"
    );
    assert_eq!(store.memory.get(&7), Some(1));
    assert_eq!(cache.get(&7).unwrap(), Some(1));
    // The key's write-through ended: the next one goes through.
    cache.put(7, 3).unwrap();
    assert_eq!(store.memory.get(&7), Some(3));
}

#[test]
fn read_only_mode_never_writes_to_the_store() {
    let s = store();
    s.memory().insert(2, 20);
    let cache = Cache::builder(s.clone())
        .write_mode(WriteMode::ReadOnly)
        .manual_flushing()
        .build()
        .unwrap();
    cache.put(1, 1).unwrap();
    cache.remove(&2).unwrap();
    cache.flush().unwrap();
    assert_eq!(cache.get(&1).unwrap(), Some(1));
    assert_eq!(
        cache.get(&2).unwrap(),
        None,
        "a local delete hides the store's row"
    );
    assert!(s.calls().is_empty());
    assert_eq!(s.load_calls(), 0);
}

// Multi-threaded convergence -------------------------------------------------------------------------------

#[test]
fn four_threads_converge_with_a_store_failing_a_fifth_of_batches() {
    let ops: u64 = 100_000;
    let s = store();
    s.fail_with_probability(0.2, 42);
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::from_millis(2))
            .max_batch(256)
            .flushers(2)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(10))
            .build()
            .unwrap(),
    );
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = cache.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let mut rng = Rng::new(t);
                for i in 0..ops {
                    let x = rng.next_u64();
                    let k = x % 10_000;
                    if x % 5 == 0 {
                        cache.remove(&k).unwrap();
                    } else {
                        cache.put(k, t << 32 | i).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    cache.flush().unwrap();
    assert_store_equals_cache(&s, &cache, 10_000);
    assert_versions_grow(&s);
    let m = cache.metrics();
    assert_eq!(m.dirty, 0);
    assert_eq!(m.puts + m.removes, 4 * ops);
    assert!(m.store_unavailable > 0, "the store did fail: {m:?}");
    let counts: HashMap<_, _> = s
        .calls()
        .iter()
        .map(|c| (format!("{:?}", c.outcome), 1))
        .collect();
    assert!(counts.contains_key("Unavailable"));
}

#[test]
fn a_flush_racing_close_answers_closed_not_a_timeout() {
    let s = store();
    s.set_down(true);
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::ZERO)
            .flush_timeout(Duration::from_secs(30))
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .build()
            .unwrap(),
    );
    cache.put(1, 1).unwrap();
    let c2 = cache.clone();
    let flusher = std::thread::spawn(move || {
        let t0 = Instant::now();
        (c2.flush(), t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50)); // the flush waits on the dead store
    let report = cache.close(Duration::from_millis(50));
    assert_eq!(report.unwritten.len(), 1);
    let (result, waited) = flusher.join().unwrap();
    assert!(matches!(result, Err(Error::Closed)), "{result:?}");
    assert!(
        waited < Duration::from_secs(5),
        "answered at close, not after the timeout"
    );
}

/// A write held back by backpressure (`policy`) on key 1 finds room only after the mode
/// switched to `Through` and a write-through of key 1 went to the store; the held-back write
/// waits for that write-through before it writes behind, so its batch cannot reach the store
/// first. (Were it to re-take the table lock and write without asking, a flush would send its
/// newer version while the write-through's older one is still at the store, which would
/// apply them in the wrong order.)
fn a_backpressured_write_waits_for_the_keys_write_through(policy: Backpressure) {
    let store = Arc::new(HoldsValues::new(&[10, 30]));
    let cache = Arc::new(
        Cache::builder(store.clone())
            .manual_flushing()
            .shards(1)
            .max_dirty(1, policy)
            .build()
            .unwrap(),
    );
    let spawn_flush = |cache: &Arc<Cache<u64, u64>>| {
        let c = cache.clone();
        std::thread::spawn(move || c.flush())
    };
    let wait_for = |done: &dyn Fn() -> bool| eventually(Duration::from_millis(500), done);
    cache.put(2, 30).unwrap(); // the shard is at its dirty limit
    let first_flush = spawn_flush(&cache);
    store.wait_until_held(30); // key 2 is at the store, still dirty
    let c = cache.clone();
    let held_back = std::thread::spawn(move || c.put(1, 11));
    let metrics_show_it = || {
        let m = cache.metrics();
        m.backpressure_waits + m.write_through_fallbacks == 1
    };
    wait_for(&metrics_show_it);
    assert!(metrics_show_it(), "the put of key 1 was not held back");
    let c = cache.clone();
    let switch = std::thread::spawn(move || c.set_write_mode(WriteMode::Through));
    while cache.write_mode() != WriteMode::Through {
        std::thread::yield_now();
    }
    let c = cache.clone();
    let through = std::thread::spawn(move || c.put(1, 10));
    store.wait_until_held(10); // the write-through of key 1 is at the store
    store.release(30); // key 2 is written: room for the held-back put
    first_flush.join().unwrap().unwrap();
    // Let the held-back put, and a flush after it, finish if nothing holds them; one that
    // waits for the write-through is let go by the release below.
    wait_for(&|| held_back.is_finished());
    let second_flush = spawn_flush(&cache);
    wait_for(&|| second_flush.is_finished());
    store.release(10);
    let through = through.join().unwrap().unwrap();
    let behind = held_back.join().unwrap().unwrap();
    switch.join().unwrap().unwrap();
    second_flush.join().unwrap().unwrap();
    cache.flush().unwrap();
    assert!(through < behind, "the held-back put took the newer version");
    assert_key_1_ends_at_11(&store, &cache, [through, behind]);
}

#[test]
fn a_write_blocked_by_backpressure_waits_for_the_keys_write_through() {
    a_backpressured_write_waits_for_the_keys_write_through(Backpressure::Block {
        timeout: Duration::from_secs(10),
    });
}

#[test]
fn a_write_falling_back_to_write_through_waits_for_the_keys_write_through() {
    a_backpressured_write_waits_for_the_keys_write_through(Backpressure::WriteThrough);
}
