//! Read-through, single-flight, capacity and eviction, expiry, refresh-ahead, preload and
//! write modes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use writebehind::{
    Backpressure, BatchError, Cache, Error, ManualClock, MemoryStore, Store, StoreError, Write,
    WriteMode,
};

/// A cache driven by hand with one shard (capacity and eviction work per shard), configured
/// further by `f`.
fn one_shard(
    s: &common::Store,
    f: impl FnOnce(writebehind::Builder<u64, u64>) -> writebehind::Builder<u64, u64>,
) -> (Cache<u64, u64>, Arc<ManualClock>) {
    manual_with(s, |b| f(b.shards(1)))
}

/// A hand-driven cache over `s`, whose key 1 (100 in the store) a reader on another thread is
/// loading, held at the store's gate: the reader's `get` returns once `s.release()` lets the
/// load go on.
fn load_held_at_the_store(
    s: &common::Store,
) -> (Arc<Cache<u64, u64>>, std::thread::JoinHandle<Option<u64>>) {
    s.memory().insert(1, 100);
    let cache = Arc::new(Cache::builder(s.clone()).manual_flushing().build().unwrap());
    s.hold();
    let c2 = cache.clone();
    let reader = std::thread::spawn(move || c2.get(&1).unwrap());
    assert!(
        s.wait_until_held(Duration::from_secs(5)),
        "the load is in the store"
    );
    (cache, reader)
}

#[test]
fn eight_threads_missing_one_key_make_one_load() {
    let s = store();
    s.memory().insert(7, 70);
    s.set_latency(Duration::from_millis(50));
    let cache = Arc::new(Cache::builder(s.clone()).manual_flushing().build().unwrap());
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                cache.get(&7).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Some(70));
    }
    assert_eq!(
        s.load_calls(),
        1,
        "single-flight: one load for eight misses"
    );
    assert!(cache.metrics().load_waits >= 1);
}

#[test]
fn followers_get_the_load_error_too() {
    let s = store();
    s.set_down(true);
    s.set_latency(Duration::from_millis(50));
    let cache = Arc::new(Cache::builder(s.clone()).manual_flushing().build().unwrap());
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                cache.get(&1)
            })
        })
        .collect();
    for t in threads {
        assert!(
            matches!(t.join().unwrap(), Err(Error::Load(_))),
            "an error, never None"
        );
    }
    assert!(s.load_calls() < 4);
}

#[test]
fn a_put_during_a_slow_load_wins() {
    let s = store();
    let (cache, reader) = load_held_at_the_store(&s);
    cache.put(1, 200).unwrap();
    s.release();
    assert_eq!(
        reader.join().unwrap(),
        Some(200),
        "the load saw the put had won"
    );
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(200),
        "the loaded value did not overwrite it"
    );
}

#[test]
fn remove_during_a_slow_load_reads_none() {
    let s = store();
    let (cache, reader) = load_held_at_the_store(&s);
    cache.remove(&1).unwrap();
    s.release();
    assert_eq!(reader.join().unwrap(), None);
    assert_eq!(
        cache.get(&1).unwrap(),
        None,
        "the removed key was not resurrected"
    );
    cache.flush().unwrap();
    assert_eq!(cache.get(&1).unwrap(), None);
}

#[test]
fn a_load_racing_a_persisted_delete_is_not_cached() {
    let s = store();
    let (cache, reader) = load_held_at_the_store(&s);
    cache.remove(&1).unwrap();
    // Persist the delete while the load still holds the old row (the gate lets the
    // flusher's write through only after release, so run the flush on another thread).
    let c3 = cache.clone();
    let flusher = std::thread::spawn(move || c3.flush().unwrap());
    std::thread::sleep(Duration::from_millis(20));
    s.release();
    let _ = reader.join().unwrap();
    flusher.join().unwrap();
    assert_eq!(s.memory().get(&1), None);
    assert!(
        !cache.contains_key(&1),
        "a value loaded before the delete was not cached"
    );
}

/// Counts `load_all` calls.
#[derive(Default)]
struct CountingStore {
    inner: MemoryStore<u64, u64>,
    load_all_calls: AtomicUsize,
    loads: AtomicUsize,
}

impl Store<u64, u64> for CountingStore {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(key)
    }
    fn load_all(&self, keys: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        self.load_all_calls.fetch_add(1, Ordering::SeqCst);
        Ok(keys
            .iter()
            .filter_map(|k| self.inner.get(k).map(|v| (*k, v)))
            .collect())
    }
    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        self.inner.write_all(batch)
    }
}

#[test]
fn get_all_reads_misses_through_one_load_all() {
    let store = Arc::new(CountingStore::default());
    for k in 0..10 {
        store.inner.insert(k, k * 10);
    }
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .build()
        .unwrap();
    cache.put(3, 333).unwrap();
    cache.remove(&4).unwrap();
    let got = cache.get_all(&[0, 3, 4, 5, 42]).unwrap();
    assert_eq!(got, vec![Some(0), Some(333), None, Some(50), None]);
    assert_eq!(store.load_all_calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.loads.load(Ordering::SeqCst), 0);
    // Now cached: no more store calls.
    assert_eq!(cache.get_all(&[0, 5]).unwrap(), vec![Some(0), Some(50)]);
    assert_eq!(store.load_all_calls.load(Ordering::SeqCst), 1);
}

#[test]
fn absent_keys_are_cached_only_when_asked() {
    let s = store();
    let (plain, _) = one_shard(&s, |b| b);
    plain.get(&1).unwrap();
    plain.get(&1).unwrap();
    assert_eq!(s.load_calls(), 2, "default: absent keys are not cached");

    let s = store();
    let (cache, clock) = one_shard(&s, |b| b.cache_absent_for(Duration::from_millis(100)));
    assert_eq!(cache.get(&1).unwrap(), None);
    assert_eq!(cache.get(&1).unwrap(), None);
    assert_eq!(s.load_calls(), 1, "the absence was remembered");
    assert!(!cache.contains_key(&1));
    s.memory().insert(1, 5);
    clock.advance(Duration::from_millis(150));
    cache.flush_step().unwrap(); // advances the coarse clock
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(5),
        "after the absent ttl, read through again"
    );
    assert_eq!(s.load_calls(), 2);
}

#[test]
fn contains_key_and_entries_never_load() {
    let s = store();
    s.memory().insert(1, 1);
    let (cache, _) = one_shard(&s, |b| b);
    assert!(!cache.contains_key(&1));
    assert!(cache.entries().is_empty());
    cache.put(2, 2).unwrap();
    assert_eq!(cache.entries(), vec![(2, 2)]);
    assert_eq!(s.load_calls(), 0);
    cache.get(&1).unwrap();
    cache.get(&1).unwrap();
    assert_eq!(s.load_calls(), 1, "a hit never loads");
}

#[test]
fn capacity_evicts_clean_entries_and_pins_dirty_ones() {
    let s = store();
    let (cache, _) = one_shard(&s, |b| b.capacity(100).max_dirty(100, Backpressure::Reject));
    assert_eq!(cache.preload((0..100).map(|k| (k, k))).unwrap(), 100);
    for k in 1000..1050 {
        cache.put(k, k).unwrap();
    }
    let m = cache.metrics();
    assert_eq!(m.entries, 100, "held at capacity");
    assert_eq!(m.evictions, 50, "clean entries made room");
    for k in 1000..1050 {
        assert!(cache.contains_key(&k), "dirty entry {k} was evicted");
    }
    cache.flush().unwrap();
    assert_eq!(s.memory().len(), 50);
}

#[test]
fn a_full_cache_with_a_dead_store_loses_nothing() {
    let s = store();
    s.set_down(true);
    let (cache, _) = one_shard(&s, |b| b.capacity(64).max_dirty(64, Backpressure::Reject));
    let mut accepted = Vec::new();
    for k in 0..200 {
        match cache.put(k, k + 1) {
            Ok(_) => accepted.push(k),
            Err(Error::Backpressure { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        accepted.len(),
        64,
        "every entry is dirty: the rest is refused, not dropped"
    );
    assert_eq!(cache.metrics().evictions, 0);
    for k in &accepted {
        assert_eq!(cache.get(k).unwrap(), Some(k + 1));
    }
    s.set_down(false);
    cache.flush().unwrap();
    for k in &accepted {
        assert_eq!(s.memory().get(k), Some(k + 1), "accepted write {k} lost");
    }
}

#[test]
fn s3_fifo_keeps_the_hot_keys_through_a_scan() {
    let s = store();
    for k in 0..10_000 {
        s.memory().insert(k, k);
    }
    let (cache, _) = one_shard(&s, |b| b.capacity(200));
    // A hot set of 50 keys, each read several times.
    for _ in 0..5 {
        for k in 0..50 {
            cache.get(&k).unwrap();
        }
    }
    // A one-pass scan over 5,000 other keys.
    for k in 1000..6000 {
        cache.get(&k).unwrap();
    }
    let hot_kept = (0..50).filter(|k| cache.contains_key(k)).count();
    assert!(
        hot_kept >= 45,
        "the scan flushed the hot set: {hot_kept}/50 kept"
    );
    assert!(cache.metrics().entries <= 200);
}

#[test]
fn weigher_bounds_total_weight() {
    let s = store();
    let (cache, _) = one_shard(&s, |b| b.weigher(|_, v: &u64| *v as u32).max_weight(1000));
    cache.preload((0..100).map(|k| (k, 100))).unwrap(); // 100 entries of weight 100
    let m = cache.metrics();
    assert!(
        m.entries <= 10,
        "{} entries of weight 100 in 1000",
        m.entries
    );
    assert!(m.evictions >= 90);
}

/// Overwriting a key re-weighs it: a heavy value replaced by a light one frees its weight.
#[test]
fn an_update_reweighs_the_entry() {
    let s = store();
    let (cache, _) = one_shard(&s, |b| b.weigher(|_, v: &u64| *v as u32).max_weight(1000));
    cache.put(1, 900).unwrap();
    cache.flush().unwrap();
    cache.put(1, 10).unwrap(); // weight 900 -> 10
    cache.flush().unwrap();
    cache.put(2, 500).unwrap(); // 510 of 1000: nothing to evict
    cache.flush().unwrap();
    assert_eq!(
        cache.metrics().evictions,
        0,
        "the table still counted 900 for key 1"
    );
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    assert_eq!(cache.get(&2).unwrap(), Some(500));
}

#[test]
fn an_expired_dirty_entry_is_written_before_it_disappears() {
    let s = store();
    let (cache, clock) = one_shard(&s, |b| {
        b.time_to_live(Duration::from_millis(50))
            .write_delay(Duration::from_secs(10))
    });
    cache.put(1, 10).unwrap();
    clock.advance(Duration::from_millis(100));
    cache.flush_step().unwrap(); // coarse clock at 100 ms: the entry's ttl is over
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(10),
        "not gone while its write is pending"
    );
    assert!(s.memory().get(&1).is_none());
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&1), Some(10), "written first");
    assert!(!cache.contains_key(&1), "then gone");
    assert!(cache.metrics().expirations >= 1);
    assert_eq!(cache.get(&1).unwrap(), Some(10), "read through again");
}

#[test]
fn clean_entries_expire_after_ttl_and_idle_time() {
    let s = store();
    s.memory().insert(1, 1);
    s.memory().insert(2, 2);
    let (cache, clock) = one_shard(&s, |b| {
        b.time_to_live(Duration::from_secs(10))
            .time_to_idle(Duration::from_millis(100))
    });
    cache.get(&1).unwrap();
    cache.get(&2).unwrap();
    for _ in 0..3 {
        clock.advance(Duration::from_millis(60));
        cache.flush_step().unwrap();
        cache.get(&1).unwrap(); // keeps key 1 busy
    }
    assert!(cache.contains_key(&1), "accessed: not idle");
    assert_eq!(cache.get(&2).unwrap(), Some(2));
    assert_eq!(
        s.load_calls(),
        3,
        "key 2 idled out and was read through again"
    );
}

#[test]
fn refresh_ahead_serves_the_old_value_and_reloads_once() {
    let s = store();
    s.memory().insert(1, 1);
    let (cache, clock) = one_shard(&s, |b| {
        b.time_to_live(Duration::from_secs(1)).refresh_ahead(0.5)
    });
    assert_eq!(cache.get(&1).unwrap(), Some(1));
    s.memory().insert(1, 2); // the database changed behind the cache
    clock.advance(Duration::from_millis(600));
    cache.flush_step().unwrap();
    s.set_latency(Duration::from_millis(30));
    for _ in 0..10 {
        assert_eq!(cache.get(&1).unwrap(), Some(1), "the old value, at once");
    }
    assert!(eventually(Duration::from_secs(5), || cache
        .get(&1)
        .unwrap()
        == Some(2)));
    assert_eq!(s.load_calls(), 2, "one load, one refresh");
    assert_eq!(cache.metrics().refreshes, 1);
    // After the ttl an access reloads synchronously.
    s.set_latency(Duration::ZERO);
    s.memory().insert(1, 3);
    clock.advance(Duration::from_millis(1100));
    cache.flush_step().unwrap();
    assert_eq!(cache.get(&1).unwrap(), Some(3));
}

#[test]
fn a_refresh_never_overwrites_a_write_and_a_failed_refresh_keeps_the_value() {
    let s = store();
    s.memory().insert(1, 1);
    s.memory().insert(2, 2);
    let (cache, clock) = one_shard(&s, |b| {
        b.time_to_live(Duration::from_secs(1)).refresh_ahead(0.5)
    });
    cache.get(&1).unwrap();
    cache.get(&2).unwrap();
    clock.advance(Duration::from_millis(600));
    cache.flush_step().unwrap();
    s.hold();
    assert_eq!(cache.get(&1).unwrap(), Some(1)); // schedules a refresh, which blocks
    assert!(s.wait_until_held(Duration::from_secs(5)));
    cache.put(1, 100).unwrap(); // a write while the refresh runs
    s.release();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(100),
        "the refresh did not overwrite the write"
    );

    s.set_down(true);
    assert_eq!(cache.get(&2).unwrap(), Some(2)); // schedules a refresh that fails
    assert!(eventually(Duration::from_secs(5), || cache
        .metrics()
        .refresh_failures
        == 1));
    assert_eq!(
        cache.get(&2).unwrap(),
        Some(2),
        "the old value stays until it expires"
    );
}

#[test]
fn preload_writes_nothing_and_never_overwrites_a_pending_write() {
    let s = store();
    for k in 0..100 {
        s.memory().insert(k, k);
    }
    let (cache, _) = one_shard(&s, |b| b);
    cache.put(5, 555).unwrap();
    let keys: Vec<u64> = (0..100).collect();
    assert_eq!(cache.preload_from_store(&keys).unwrap(), 99);
    assert_eq!(
        cache.get(&5).unwrap(),
        Some(555),
        "the pending write was kept"
    );
    cache.flush().unwrap();
    let records: usize = s.calls().iter().map(|c| c.batch.len()).sum();
    assert_eq!(records, 1, "only the real write reached the store");
    assert_eq!(
        s.load_calls(),
        99,
        "load_all's default loops over load once per key; key 5 was in memory, not read"
    );
    assert_eq!(cache.len(), 100);
}

#[test]
fn switching_behind_to_read_only_flushes_then_sends_nothing() {
    let s = store();
    let cache = flushed_on_demand(&s);
    cache.put(1, 1).unwrap();
    cache.put(2, 2).unwrap();
    cache.set_write_mode(WriteMode::ReadOnly).unwrap();
    assert_eq!(
        s.memory().len(),
        2,
        "pending writes were flushed by the switch"
    );
    let calls = s.calls().len();
    cache.put(1, 10).unwrap();
    cache.put(3, 3).unwrap();
    cache.remove(&2).unwrap();
    cache.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(s.calls().len(), calls, "read-only writes are never sent");
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    assert_eq!(cache.get(&2).unwrap(), None);
    assert_eq!(cache.write_mode(), WriteMode::ReadOnly);
    // And back: new writes go behind again.
    cache.set_write_mode(WriteMode::Behind).unwrap();
    cache.put(4, 4).unwrap();
    cache.flush().unwrap();
    assert_eq!(s.memory().get(&4), Some(4));
    assert_eq!(
        s.memory().get(&1),
        Some(1),
        "the read-only write was not sent later either"
    );
}

#[test]
fn switching_to_through_writes_synchronously() {
    let s = store();
    let cache = flushed_on_demand(&s);
    cache.put(1, 1).unwrap();
    cache.set_write_mode(WriteMode::Through).unwrap();
    assert_eq!(s.memory().get(&1), Some(1));
    cache.put(2, 2).unwrap();
    assert_eq!(s.memory().get(&2), Some(2), "in the store when put returns");
    s.set_down(true);
    assert!(matches!(cache.put(2, 3), Err(Error::Store(_))));
    assert_eq!(cache.get(&2).unwrap(), Some(2));
}

#[test]
fn invalid_read_side_settings_are_refused() {
    let b = || {
        Cache::<u64, u64>::builder(MemoryStore::new())
            .manual_flushing()
            .shards(4)
    };
    let setting = |r: Result<Cache<u64, u64>, Error>| match r {
        Err(Error::InvalidConfig { setting, .. }) => setting,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(setting(b().capacity(2).build()), "capacity");
    assert_eq!(
        setting(b().time_to_live(Duration::ZERO).build()),
        "time_to_live"
    );
    assert_eq!(setting(b().refresh_ahead(0.5).build()), "refresh_ahead");
    assert_eq!(
        setting(
            b().time_to_live(Duration::from_secs(1))
                .refresh_ahead(1.5)
                .build()
        ),
        "refresh_ahead"
    );
    assert_eq!(setting(b().loaders(0).build()), "loaders");
}

#[test]
fn the_weigher_runs_with_no_cache_lock_held() {
    use std::sync::{mpsc, OnceLock, Weak};
    // A weigher that reads the cache: it would deadlock if it ran under a shard lock.
    let slot: Arc<OnceLock<Weak<Cache<u64, u64>>>> = Arc::new(OnceLock::new());
    let s2 = slot.clone();
    let s = store();
    let cache = Arc::new(
        Cache::builder(s.clone())
            .manual_flushing()
            .shards(1)
            .max_weight(1_000)
            .max_dirty(1, Backpressure::WriteThrough)
            .weigher(move |_, v: &u64| {
                if let Some(c) = s2.get().and_then(Weak::upgrade) {
                    let _ = c.len(); // takes every shard lock
                }
                *v as u32
            })
            .build()
            .unwrap(),
    );
    slot.set(Arc::downgrade(&cache)).ok();
    let (tx, rx) = mpsc::channel();
    let c2 = cache.clone();
    std::thread::spawn(move || {
        c2.put(1, 10).unwrap(); // write-behind
        c2.put(2, 20).unwrap(); // over max_dirty: the write-through fallback
        c2.set_write_mode(WriteMode::Through).unwrap();
        c2.put(3, 30).unwrap();
        c2.set_write_mode(WriteMode::ReadOnly).unwrap();
        c2.put(4, 40).unwrap();
        c2.preload([(5, 50)]).unwrap();
        tx.send(()).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "a write deadlocked: the weigher ran under a shard lock"
    );
    assert_eq!(cache.get(&2).unwrap(), Some(20));
}
