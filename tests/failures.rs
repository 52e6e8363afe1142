//! Failure handling, backpressure, durable acknowledgements and observability.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use writebehind::{Backpressure, Cache, Error, Health};

#[test]
fn store_down_for_five_seconds_under_load_then_healed_converges() {
    let s = store();
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::from_millis(20))
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(200))
            .flushers(2)
            .build()
            .unwrap(),
    );
    s.set_down(true);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let cache = cache.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = (i * 31 + t) % 5_000;
                    if i % 7 == 0 {
                        cache.remove(&k).unwrap();
                    } else {
                        cache.put(k, t << 40 | i).unwrap();
                    }
                    assert!(cache.get(&k).is_ok(), "reads keep being served");
                    i += 1;
                    if i % 1024 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                i
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let during = cache.metrics();
    assert!(matches!(during.health, Health::Degraded { .. }));
    assert!(during.dirty > 0);
    assert_eq!(s.memory().len(), 0, "nothing reached a dead store");
    s.set_down(false);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let ops: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    cache.flush().unwrap();
    assert_store_equals_cache(&s, &cache, 5_000);
    assert_versions_grow(&s);
    let m = cache.metrics();
    assert!(ops > 10_000, "the load ran: {ops} ops");
    assert!(m.retries > 0 && m.store_unavailable > 0, "{m:?}");
    assert_eq!(m.health, Health::Healthy);
    assert_eq!(m.dirty, 0);
}

#[test]
fn one_poisoned_key_among_ten_thousand() {
    let s = store();
    s.reject_if(|w| *w.key() == 4_242);
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::from_millis(50))
        .max_attempts(4)
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(40))
        .build()
        .unwrap();
    let t0 = Instant::now();
    for k in 0..10_000u64 {
        cache.put(k, k).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || s.memory().len() == 9_999),
        "the other 9,999 were not held back"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "not on time: {took:?}");
    assert!(eventually(Duration::from_secs(5), || cache
        .metrics()
        .failed_writes
        == 1));
    let failed = cache.failed_writes();
    assert_eq!(failed.len(), 1);
    assert_eq!(*failed[0].write.key(), 4_242);
    assert_eq!(failed[0].attempts, 4);
    assert!(!failed[0].error.is_unavailable());
    assert_eq!(s.received_versions()[&4_242].len(), 4);
    assert_eq!(s.memory().get(&4_242), None);
}

fn bounded(s: &Store, policy: Backpressure) -> Cache<u64, u64> {
    Cache::builder(s.clone())
        .manual_flushing()
        .shards(4)
        .max_dirty(40, policy)
        .build()
        .unwrap()
}

#[test]
fn reject_policy_returns_the_error_and_never_exceeds_max_dirty() {
    let s = store();
    s.set_down(true);
    let cache = bounded(&s, Backpressure::Reject);
    let mut refused = 0;
    for k in 0..200 {
        match cache.put(k, k) {
            Ok(_) => {}
            Err(Error::Backpressure { shard_limit }) => {
                assert_eq!(shard_limit, 10);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(cache.metrics().dirty <= 40);
    }
    assert_eq!(
        cache.metrics().dirty,
        40,
        "each shard filled up to its share"
    );
    assert_eq!(refused, 160);
    assert_eq!(cache.metrics().backpressure_rejections, 160);
    // A write to a key that already waits is conflated and always accepted.
    let accepted = (0..200).find(|k| cache.contains_key(k)).unwrap();
    cache.put(accepted, 1).unwrap();
    // Nothing was dropped: refused keys are simply not in the cache.
    assert_eq!(cache.len(), 40);
}

#[test]
fn watermarks_hold_writers_back_until_the_shard_drains_to_ninety_percent() {
    let s = store();
    let cache = Cache::builder(s.clone())
        .manual_flushing()
        .shards(1)
        .max_dirty(20, Backpressure::Reject)
        .build()
        .unwrap();
    for k in 0..20 {
        cache.put(k, k).unwrap();
    }
    assert!(matches!(cache.put(100, 0), Err(Error::Backpressure { .. })));
    cache.flush().unwrap(); // everything written: dirty back to 0, below the low watermark
    for k in 200..220 {
        cache.put(k, k).unwrap();
    }
    assert_eq!(cache.metrics().dirty, 20);
}

#[test]
fn block_policy_times_out_on_a_dead_store() {
    let s = store();
    s.set_down(true);
    let cache = Cache::builder(s.clone())
        .shards(2)
        .write_delay(Duration::from_millis(5))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .max_dirty(
            10,
            Backpressure::Block {
                timeout: Duration::from_millis(150),
            },
        )
        .build()
        .unwrap();
    let mut k = 0;
    let err = loop {
        match cache.put(k, k) {
            Ok(_) => k += 1,
            Err(e) => break e,
        }
        assert!(cache.metrics().dirty <= 10);
    };
    assert!(matches!(err, Error::Backpressure { .. }), "{err}");
    let t0 = Instant::now();
    let mut blocked_key = k;
    // Find a key of a full shard and time the wait.
    let err = loop {
        match cache.put(blocked_key, 0) {
            Ok(_) => blocked_key += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Backpressure { .. }));
    assert!(
        t0.elapsed() >= Duration::from_millis(140),
        "blocked for the timeout"
    );
    let m = cache.metrics();
    assert!(
        m.backpressure_waits >= 2 && m.backpressure_rejections >= 2,
        "{m:?}"
    );
    assert!(m.dirty <= 10);
}

#[test]
fn block_policy_proceeds_once_the_store_heals() {
    let s = store();
    s.set_down(true);
    let cache = Arc::new(
        Cache::builder(s.clone())
            .shards(1)
            .write_delay(Duration::from_millis(5))
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(10))
            .max_dirty(
                8,
                Backpressure::Block {
                    timeout: Duration::from_secs(10),
                },
            )
            .build()
            .unwrap(),
    );
    for k in 0..8 {
        cache.put(k, k).unwrap();
    }
    let c2 = cache.clone();
    let writer = std::thread::spawn(move || c2.put(100, 100));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!writer.is_finished(), "the writer waits for room");
    s.set_down(false);
    writer.join().unwrap().unwrap();
    cache.flush().unwrap();
    assert_eq!(s.memory().len(), 9);
}

#[test]
fn write_through_fallback_writes_itself_and_fails_cleanly_on_a_dead_store() {
    let s = store();
    let cache = bounded(&s, Backpressure::WriteThrough);
    // No flush steps run (manual mode): shards fill up to their share.
    let mut direct = Vec::new();
    for k in 0..100 {
        let before = s.calls().len();
        cache.put(k, k * 10).unwrap();
        if s.calls().len() > before {
            direct.push(k);
        }
        assert!(cache.metrics().dirty <= 40);
    }
    assert_eq!(
        direct.len(),
        60,
        "writes beyond the bound went to the store at once"
    );
    for k in &direct {
        assert_eq!(s.memory().get(k), Some(k * 10));
        assert_eq!(cache.get(k).unwrap(), Some(k * 10), "and are cached, clean");
    }
    assert_eq!(cache.metrics().write_through_fallbacks, 60);
    s.set_down(true);
    let k = direct[0];
    assert!(matches!(cache.put(k, 1), Err(Error::Store(_))));
    assert_eq!(
        cache.get(&k).unwrap(),
        Some(k * 10),
        "the cache kept the old value"
    );
    s.set_down(false);
    cache.flush().unwrap();
    assert_eq!(s.memory().len(), 100);
    assert_versions_grow(&s);
}

#[test]
fn wait_durable_returns_only_after_the_store_holds_the_version() {
    let s = store();
    let cache = Arc::new(
        Cache::builder(s.clone())
            .write_delay(Duration::from_millis(1))
            .build()
            .unwrap(),
    );
    s.hold();
    let version = cache.put(5, 50).unwrap();
    let c2 = cache.clone();
    let s2 = s.clone();
    let waiter = std::thread::spawn(move || {
        c2.wait_durable(&5, version, Duration::from_secs(10))
            .unwrap();
        s2.memory().version_of(&5)
    });
    assert!(s.wait_until_held(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiter.is_finished(), "not durable while the batch is held");
    s.release();
    let stored = waiter.join().unwrap();
    assert!(
        stored >= Some(version),
        "wait_durable returned before the store held {version}"
    );
    // A write superseded by a newer one is durable once the newer one is.
    let v1 = cache.put(6, 1).unwrap();
    let v2 = cache.put(6, 2).unwrap();
    cache.wait_durable(&6, v1, Duration::from_secs(5)).unwrap();
    assert!(s.memory().version_of(&6) >= Some(v2));
}

#[test]
fn wait_durable_times_out_on_a_dead_store() {
    let s = store();
    s.set_down(true);
    let cache = Cache::builder(s.clone())
        .write_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    let v = cache.put(1, 1).unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        cache.wait_durable(&1, v, Duration::from_millis(100)),
        Err(Error::Timeout)
    ));
    assert!(t0.elapsed() >= Duration::from_millis(100));
}

#[test]
fn flush_key_writes_one_key_now() {
    let s = store();
    let cache = flushed_on_demand(&s);
    cache.put(1, 1).unwrap();
    cache.put(2, 2).unwrap();
    cache.flush_key(&1).unwrap();
    assert_eq!(s.memory().get(&1), Some(1));
    assert_eq!(s.memory().get(&2), None, "only that key");
    cache.flush_key(&3).unwrap(); // nothing pending: fine
    s.set_down(true);
    cache.put(1, 11).unwrap();
    assert!(matches!(cache.flush_key(&1), Err(Error::Store(_))));
    s.set_down(false);
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&1), Some(11));
    assert_versions_grow(&s);
}

#[test]
fn full_sink_drops_nothing() {
    let s = store();
    s.reject_if(|w| *w.key() >= 100);
    let (cache, clock) = {
        let clock = Arc::new(writebehind::ManualClock::new());
        let cache = Cache::builder(s.clone())
            .manual_flushing()
            .clock(clock.clone())
            .max_attempts(1)
            .failed_writes_capacity(1)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(10))
            .build()
            .unwrap();
        (cache, clock)
    };
    cache.put(100, 1).unwrap();
    cache.put(101, 2).unwrap();
    assert!(cache.flush().is_err());
    let m = cache.metrics();
    assert_eq!(m.failed_writes, 1);
    assert!(m.sink_full >= 1);
    assert_eq!(m.dirty, 1, "the write that did not fit stays queued");
    let first = cache.failed_writes();
    assert_eq!(first.len(), 1);
    clock.advance(Duration::from_millis(20));
    cache.flush_step().unwrap();
    let second = cache.failed_writes();
    assert_eq!(second.len(), 1, "after draining, the queued one arrives");
    let mut keys = vec![*first[0].write.key(), *second[0].write.key()];
    keys.sort();
    assert_eq!(keys, vec![100, 101]);
    assert_eq!(cache.metrics().dirty, 0);
}

#[test]
fn every_metric_moves_when_its_event_happens() {
    let s = store();
    s.memory().insert(1_000, 1);
    let (cache, clock) = manual(&s, Duration::from_millis(10));
    let m0 = cache.metrics();
    assert_eq!(m0.puts + m0.gets + m0.batches, 0);

    cache.put(1, 1).unwrap();
    cache.put(1, 2).unwrap();
    cache.remove(&2).unwrap();
    cache.get(&1).unwrap();
    cache.get(&1_000).unwrap();
    let m = cache.metrics();
    assert_eq!((m.puts, m.removes, m.conflated), (2, 1, 1));
    assert_eq!((m.gets, m.hits, m.misses, m.loads), (2, 1, 1, 1));
    assert_eq!((m.dirty, m.entries), (2, 2));

    cache.flush_step().unwrap();
    clock.advance(Duration::from_millis(25));
    let m = cache.metrics();
    assert!(
        m.oldest_unflushed_age >= Duration::from_millis(25),
        "{:?}",
        m.oldest_unflushed_age
    );

    cache.flush_step().unwrap();
    let m = cache.metrics();
    assert_eq!((m.batches, m.records_written, m.dirty), (1, 2, 0));
    assert_eq!(m.batch_size.count, 1);
    assert_eq!(m.batch_size.max, 2);
    assert_eq!(m.store_latency_us.count, 1);
    assert_eq!(m.oldest_unflushed_age, Duration::ZERO);

    s.set_down(true);
    assert!(cache.get(&5_000).is_err());
    cache.put(3, 3).unwrap();
    cache.flush_step().unwrap(); // the flusher sees the shard armed: its delay starts
    clock.advance(Duration::from_millis(20));
    cache.flush_step().unwrap();
    let m = cache.metrics();
    assert_eq!(m.load_errors, 1);
    assert!(m.store_unavailable >= 1 && m.retries >= 1);
    assert!(matches!(m.health, Health::Degraded { .. }));
    s.heal();

    s.panic_next(1);
    clock.advance(Duration::from_millis(50));
    cache.flush_step().unwrap();
    assert_eq!(cache.metrics().store_panics, 1);
    cache.flush().unwrap();
    assert_eq!(cache.metrics().health, Health::Healthy);

    s.reject_if(|w| *w.key() == 9);
    cache.put(9, 9).unwrap();
    let _ = cache.flush();
    let m = cache.metrics();
    assert!(m.records_rejected >= 1);
    assert_eq!(m.failed_writes, 1);
}

#[test]
fn slow_store_calls_are_reported() {
    let s = store();
    s.set_latency(Duration::from_millis(30));
    let cache = Cache::builder(s.clone())
        .manual_flushing()
        .store_timeout(Duration::from_millis(10))
        .build()
        .unwrap();
    cache.put(1, 1).unwrap();
    cache.flush().unwrap();
    let m = cache.metrics();
    assert_eq!(m.slow_store_calls, 1);
    assert!(m.store_latency_us.max >= 30_000);
}

#[test]
fn a_slow_store_call_does_not_stall_the_other_flusher() {
    // Two flushers: one is stuck in a store call on its shard's batch, the other keeps writing.
    struct StuckOnKeyZero(writebehind::MemoryStore<u64, u64>, std::sync::Mutex<()>);
    impl writebehind::Store<u64, u64> for StuckOnKeyZero {
        fn load(&self, k: &u64) -> Result<Option<u64>, writebehind::StoreError> {
            self.0.load(k)
        }
        fn write_all(
            &self,
            b: &[writebehind::Write<u64, u64>],
        ) -> Result<(), writebehind::BatchError> {
            if b.iter().any(|w| *w.key() == 0) {
                let _g = self.1.lock().unwrap(); // held by the test
            }
            self.0.write_all(b)
        }
    }
    let store = Arc::new(StuckOnKeyZero(Default::default(), Default::default()));
    let gate = store.1.lock().unwrap();
    let cache = Cache::builder(store.clone())
        .shards(2)
        .flushers(2)
        .write_delay(Duration::from_millis(1))
        .store_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    cache.put(0, 0).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // Keys on the other flusher's shard still reach the store.
    let mut reached = 0;
    for k in 1..200u64 {
        cache.put(k, k).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            reached = store.0.len();
            reached > 50
        }),
        "only {reached} keys written while one flusher was stuck"
    );
    std::thread::sleep(Duration::from_millis(30)); // the stuck call is now past store_timeout
    drop(gate);
    cache.flush().unwrap();
    assert_eq!(store.0.len(), 200);
    assert!(cache.metrics().slow_store_calls >= 1);
}
