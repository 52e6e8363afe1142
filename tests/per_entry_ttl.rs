//! Times to live of entries' own (`Cache::put_with_ttl`), beside the cache's rules; a write
//! that waits for the store never expires before it is written.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{manual_with, Store};
use writebehind::testing::FaultyStore;
use writebehind::{Builder, Cache, Error, ManualClock, WriteMode};

/// A cache driven by hand that allows entries' own times to live, configured further by `f`.
fn manual(
    store: &Store,
    f: impl FnOnce(Builder<u64, u64>) -> Builder<u64, u64>,
) -> (Cache<u64, u64>, Arc<ManualClock>) {
    manual_with(store, |b| {
        f(
            b.retry_backoff(Duration::from_millis(1), Duration::from_millis(4))
                .per_entry_ttl(),
        )
    })
}

/// Moves the clock on and lets the flusher sweep.
fn pass(cache: &Cache<u64, u64>, clock: &ManualClock, d: Duration) {
    clock.advance(d);
    cache.flush_step().unwrap();
}

#[test]
fn only_the_entry_with_a_time_to_live_expires() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, clock) = manual(&store, |b| b);
    cache.put_with_ttl(1, 10, Duration::from_secs(5)).unwrap();
    cache.put_with_ttl(2, 20, Duration::from_secs(60)).unwrap();
    cache.put(3, 30).unwrap();
    cache.flush().unwrap();
    pass(&cache, &clock, Duration::from_secs(6));
    assert!(!cache.contains_key(&1));
    assert!(cache.contains_key(&2) && cache.contains_key(&3));
    pass(&cache, &clock, Duration::from_secs(60));
    assert!(!cache.contains_key(&2));
    assert!(cache.contains_key(&3), "no time to live: stays");
    // Expired from memory, not from the store: read through again.
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    assert_eq!(cache.metrics().expirations, 2);
}

#[test]
fn a_pending_write_is_written_before_it_expires() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, clock) = manual(&store, |b| b);
    store.set_down(true);
    cache.put_with_ttl(1, 10, Duration::from_secs(1)).unwrap();
    for _ in 0..5 {
        pass(&cache, &clock, Duration::from_secs(1));
    }
    assert!(cache.contains_key(&1), "unwritten: still in memory");
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    store.set_down(false);
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&1), Some(10));
    assert!(
        !cache.contains_key(&1),
        "written, then gone: its time had passed"
    );
}

#[test]
fn a_plain_write_clears_the_time_to_live() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, clock) = manual(&store, |b| b);
    cache.put_with_ttl(1, 10, Duration::from_secs(5)).unwrap();
    cache.put(1, 11).unwrap();
    cache.flush().unwrap();
    pass(&cache, &clock, Duration::from_secs(60));
    assert!(cache.contains_key(&1));
    // And a new time to live replaces the old one.
    cache.put_with_ttl(1, 12, Duration::from_secs(100)).unwrap();
    cache.put_with_ttl(1, 13, Duration::from_secs(5)).unwrap();
    cache.flush().unwrap();
    pass(&cache, &clock, Duration::from_secs(6));
    assert!(!cache.contains_key(&1));
}

#[test]
fn the_first_of_the_own_deadline_and_the_cache_rule_wins() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, clock) = manual(&store, |b| b.time_to_live(Duration::from_secs(10)));
    cache.put_with_ttl(1, 10, Duration::from_secs(3)).unwrap();
    cache.put_with_ttl(2, 20, Duration::from_secs(100)).unwrap();
    cache.flush().unwrap();
    pass(&cache, &clock, Duration::from_secs(4));
    assert!(!cache.contains_key(&1), "its own 3 s");
    assert!(cache.contains_key(&2));
    pass(&cache, &clock, Duration::from_secs(7));
    assert!(!cache.contains_key(&2), "the cache's 10 s");
}

#[test]
fn written_through_and_locally_the_time_to_live_holds() {
    let store: Store = Arc::new(FaultyStore::new());
    let (cache, clock) = manual(&store, |b| b);
    cache.set_write_mode(WriteMode::Through).unwrap();
    cache.put_with_ttl(1, 10, Duration::from_secs(5)).unwrap();
    cache.set_write_mode(WriteMode::ReadOnly).unwrap();
    cache.put_with_ttl(2, 20, Duration::from_secs(5)).unwrap();
    cache.put(3, 30).unwrap();
    pass(&cache, &clock, Duration::from_secs(6));
    assert!(!cache.contains_key(&1));
    assert!(!cache.contains_key(&2));
    assert!(cache.contains_key(&3));
}

#[test]
fn without_the_builder_setting_it_is_refused() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache: Cache<u64, u64> = Cache::builder(store.clone()).build().unwrap();
    let r = cache.put_with_ttl(1, 1, Duration::from_secs(1));
    assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    assert!(!cache.contains_key(&1));
}
