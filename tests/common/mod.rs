#![allow(dead_code)]
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use writebehind::testing::FaultyStore;
use writebehind::{Cache, ManualClock};

pub type Store = Arc<FaultyStore<u64, u64>>;

/// A cache driven by hand: no threads, a clock that moves only when told.
pub fn manual(store: &Store, delay: Duration) -> (Cache<u64, u64>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .clock(clock.clone())
        .write_delay(delay)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(8))
        .shards(4)
        .build()
        .expect("valid config");
    (cache, clock)
}

pub fn store() -> Store {
    Arc::new(FaultyStore::new())
}

/// Polls `cond` every millisecond until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// Asserts that the store received every key's versions in non-decreasing order.
pub fn assert_monotonic(store: &Store) {
    for (k, versions) in store.received_versions() {
        for w in versions.windows(2) {
            assert!(
                w[0] <= w[1],
                "key {k}: version {} received after {}",
                w[1],
                w[0]
            );
        }
    }
}

/// Store contents must equal what the cache answers, exactly, for keys `0..n`.
pub fn assert_store_equals_cache(store: &Store, cache: &Cache<u64, u64>, n: u64) {
    let snap: HashMap<u64, u64> = store.memory().snapshot();
    for k in 0..n {
        let in_cache = if cache.contains_key(&k) {
            cache.get(&k).unwrap()
        } else {
            None
        };
        assert_eq!(
            in_cache,
            snap.get(&k).copied(),
            "key {k}: cache and store disagree"
        );
    }
    assert!(
        snap.keys().all(|k| *k < n),
        "store holds a key that was never written"
    );
}
