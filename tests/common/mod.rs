//! What the integration tests over a `FaultyStore` share: the store, a cache driven by hand,
//! and (from `writebehind::testing`) the wait and the per-key order check.
#![allow(dead_code)]
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use writebehind::testing::FaultyStore;
#[allow(unused_imports)] // not every test file uses both
pub use writebehind::testing::{assert_versions_grow, eventually};
use writebehind::{Builder, Cache, ManualClock};

pub type Store = Arc<FaultyStore<u64, u64>>;

pub fn store() -> Store {
    Arc::new(FaultyStore::new())
}

/// A cache driven by hand (no threads, a clock that moves only when told), configured
/// further by `f`.
pub fn manual_with(
    store: &Store,
    f: impl FnOnce(Builder<u64, u64>) -> Builder<u64, u64>,
) -> (Cache<u64, u64>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let b = Cache::builder(store.clone())
        .manual_flushing()
        .clock(clock.clone());
    (f(b).build().expect("valid config"), clock)
}

/// A cache with its flusher running and a write delay of an hour: its writes reach the
/// store only when the test flushes them (or something else does).
pub fn flushed_on_demand(store: &Store) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .write_delay(Duration::from_secs(3600))
        .build()
        .expect("valid config")
}

/// A cache driven by hand with `delay`, fast retries and four shards.
pub fn manual(store: &Store, delay: Duration) -> (Cache<u64, u64>, Arc<ManualClock>) {
    manual_with(store, |b| {
        b.write_delay(delay)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(8))
            .shards(4)
    })
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
