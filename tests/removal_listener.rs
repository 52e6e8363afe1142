//! The removal listener: every clean value that leaves memory is reported once, with its
//! cause, outside the cache's locks; a value whose write is pending is never reported.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Builder, Cache, ManualClock, RemovalCause, WriteMode};

type Store = Arc<FaultyStore<u64, u64>>;
type Heard = Arc<Mutex<Vec<(u64, u64, RemovalCause)>>>;
/// The cache, for its own listener to call (set once built).
type CacheSlot = Arc<Mutex<Option<std::sync::Weak<Cache<u64, u64>>>>>;

/// A cache driven by hand, configured further by `f`, whose listener records what it hears
/// and checks that it runs outside the key's shard lock (it reads the cache).
fn listened(
    store: &Store,
    f: impl FnOnce(Builder<u64, u64>) -> Builder<u64, u64>,
) -> (Arc<Cache<u64, u64>>, Heard, Arc<ManualClock>) {
    let heard: Heard = Arc::default();
    let h = heard.clone();
    let clock = Arc::new(ManualClock::new());
    let slot: CacheSlot = Arc::default();
    let s2 = slot.clone();
    let b = Cache::builder(store.clone())
        .manual_flushing()
        .clock(clock.clone())
        .shards(2)
        .on_removal(move |k, v, cause| {
            // Under the shard's lock this would deadlock.
            if let Some(c) = s2.lock().unwrap().as_ref().and_then(|w| w.upgrade()) {
                let _ = c.contains_key(&k);
            }
            h.lock().unwrap().push((k, v, cause));
        });
    let cache = Arc::new(f(b).build().unwrap());
    *slot.lock().unwrap() = Some(Arc::downgrade(&cache));
    (cache, heard, clock)
}

fn take(heard: &Heard) -> Vec<(u64, u64, RemovalCause)> {
    std::mem::take(&mut *heard.lock().unwrap())
}

#[test]
fn replaced_and_removed_clean_values_are_heard_and_pending_ones_are_not() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, heard, _) = listened(&store, |b| b);
    cache.put(1, 10).unwrap();
    cache.put(1, 11).unwrap(); // replaces a pending write: not heard
    assert_eq!(take(&heard), []);
    cache.flush().unwrap();
    cache.put(1, 12).unwrap(); // replaces the clean 11
    assert_eq!(take(&heard), [(1, 11, RemovalCause::Replaced)]);
    cache.flush().unwrap();
    cache.remove(&1).unwrap(); // removes the clean 12
    assert_eq!(take(&heard), [(1, 12, RemovalCause::Removed)]);
    cache.flush().unwrap();
    cache.remove(&1).unwrap(); // nothing left to remove
    assert_eq!(take(&heard), []);
}

#[test]
fn invalidated_values_are_heard_once() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, heard, _) = listened(&store, |b| b);
    cache.put_all((0..6).map(|k| (k, k * 10))).unwrap();
    cache.flush().unwrap();
    cache.invalidate(&0).unwrap();
    cache.invalidate(&0).unwrap();
    assert_eq!(take(&heard), [(0, 0, RemovalCause::Invalidated)]);
    // A pending write is written first, then the clean value goes.
    cache.put(1, 11).unwrap();
    cache.invalidate(&1).unwrap();
    assert_eq!(
        take(&heard),
        [
            (1, 10, RemovalCause::Replaced),
            (1, 11, RemovalCause::Invalidated)
        ]
    );
    assert_eq!(cache.invalidate_all().unwrap(), 4);
    let mut all = take(&heard);
    all.sort_unstable_by_key(|e| e.0);
    assert_eq!(
        all,
        (2..6)
            .map(|k| (k, k * 10, RemovalCause::Invalidated))
            .collect::<Vec<_>>()
    );
}

#[test]
fn evicted_values_are_heard_and_dirty_ones_never_evicted() {
    let store: Store = Arc::new(FaultyStore::new());
    for k in 0..100 {
        store.memory().insert(k, k);
    }
    let (cache, heard, _) = listened(&store, |b| b.capacity(20));
    // Ten pending writes the store does not take: pinned in memory.
    store.set_down(true);
    for k in 1000..1010 {
        cache.put(k, k).unwrap();
    }
    store.set_down(false);
    for k in 0..100 {
        assert_eq!(cache.get(&k).unwrap(), Some(k));
    }
    let evicted = take(&heard);
    assert!(!evicted.is_empty());
    assert!(evicted
        .iter()
        .all(|&(k, v, c)| k < 100 && v == k && c == RemovalCause::Evicted));
    assert_eq!(evicted.len() as u64, cache.metrics().evictions);
    let distinct: HashSet<u64> = evicted.iter().map(|e| e.0).collect();
    assert_eq!(distinct.len(), evicted.len(), "each eviction heard once");
    for k in 1000..1010 {
        assert!(cache.contains_key(&k), "a pending write stays in memory");
    }
}

#[test]
fn expired_values_are_heard_when_the_sweep_takes_them() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, heard, clock) = listened(&store, |b| b.time_to_live(Duration::from_secs(10)));
    cache.put(1, 1).unwrap();
    cache.put(2, 2).unwrap();
    cache.flush().unwrap();
    // The flusher's sweep finds both expired.
    clock.advance(Duration::from_secs(11));
    cache.flush_step().unwrap();
    let mut swept = take(&heard);
    swept.sort_unstable_by_key(|e| e.0);
    assert_eq!(
        swept,
        [(1, 1, RemovalCause::Expired), (2, 2, RemovalCause::Expired)]
    );
}

#[test]
fn a_write_through_replacing_a_clean_value_is_heard() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, heard, _) = listened(&store, |b| b);
    cache.put(1, 1).unwrap();
    cache.flush().unwrap();
    cache.set_write_mode(WriteMode::Through).unwrap();
    cache.put(1, 2).unwrap();
    cache.remove(&1).unwrap();
    assert_eq!(
        take(&heard),
        [
            (1, 1, RemovalCause::Replaced),
            (1, 2, RemovalCause::Removed)
        ]
    );
}

#[test]
fn a_panicking_listener_is_counted_and_the_cache_goes_on() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .on_removal(|_k: u64, v: u64, _| assert!(v != 7, "listener panics on 7"))
        .build()
        .unwrap();
    cache.put(1, 7).unwrap();
    cache.flush().unwrap();
    cache.put(1, 8).unwrap(); // the listener panics on the replaced 7
    assert_eq!(cache.metrics().user_panics, 1);
    assert_eq!(cache.get(&1).unwrap(), Some(8));
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&1), Some(8));
}

#[test]
fn under_concurrent_writers_each_value_is_heard_at_most_once() {
    // Every value written is distinct, and none is read back from the store (a value read
    // through would be in memory twice); values leave by replacement, eviction and
    // invalidation from several threads at once.
    let store: Store = Arc::new(FaultyStore::new());
    let heard: Heard = Arc::default();
    let h = heard.clone();
    let cache = Arc::new(
        Cache::builder(store.clone())
            .capacity(64)
            .write_delay(Duration::from_millis(1))
            .on_removal(move |k, v, cause| h.lock().unwrap().push((k, v, cause)))
            .build()
            .unwrap(),
    );
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                for i in 0..5_000u64 {
                    let k = (i * 7 + t) % 200;
                    cache.put(k, t * 1_000_000 + i).unwrap();
                    if i % 97 == 0 {
                        cache.invalidate(&k).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    cache.flush().unwrap();
    cache.invalidate_all().unwrap();
    cache.flush_step().unwrap();
    let heard = take(&heard);
    let mut seen = HashSet::new();
    for (k, v, cause) in &heard {
        assert!(
            seen.insert(*v),
            "value {v} of key {k} heard twice ({cause:?})"
        );
    }
    assert!(heard.iter().any(|h| h.2 == RemovalCause::Invalidated));
    // Every value left in the store was heard leaving memory by the final invalidate_all.
    for (k, v) in store.memory().snapshot() {
        assert!(
            seen.contains(&v),
            "key {k}: its stored value {v} left memory unheard"
        );
    }
}
