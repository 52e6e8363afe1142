//! `Cache::invalidate` and `Cache::invalidate_all`: a key leaves memory without a store
//! delete, and nothing unwritten is dropped.

use std::sync::Arc;
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, WriteMode};

type Store = Arc<FaultyStore<u64, u64>>;

/// A cache whose writes wait for an explicit flush (a long delay, a large batch).
fn cache(store: &Store) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .write_delay(Duration::from_secs(3600))
        .max_batch(10_000)
        .build()
        .unwrap()
}

/// As [`cache`], with a flush that gives up on a down store after 200 ms.
fn impatient_cache(store: &Store) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .write_delay(Duration::from_secs(3600))
        .max_batch(10_000)
        .flush_timeout(Duration::from_millis(200))
        .build()
        .unwrap()
}

#[test]
fn a_clean_key_leaves_memory_and_is_read_through_again() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.put(1, 10).unwrap();
    cache.flush().unwrap();
    let loads = store.load_calls();
    assert!(cache.invalidate(&1).unwrap());
    assert!(!cache.contains_key(&1));
    assert_eq!(store.memory().get(&1), Some(10), "the store keeps the key");
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    assert_eq!(
        store.load_calls(),
        loads + 1,
        "the get read through the store"
    );
    assert!(cache.invalidate(&99).unwrap(), "an absent key is fine");
}

#[test]
fn a_pending_write_is_written_before_the_key_leaves() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.put(1, 10).unwrap();
    cache.put(1, 11).unwrap();
    assert_eq!(store.memory().get(&1), None, "nothing written yet");
    assert!(cache.invalidate(&1).unwrap());
    assert_eq!(store.memory().get(&1), Some(11), "written before it left");
    assert!(!cache.contains_key(&1));
    assert_eq!(cache.metrics().dirty, 0);
}

#[test]
fn a_pending_delete_is_written_before_the_key_leaves() {
    let store: Store = Arc::new(FaultyStore::new());
    store.memory().insert(1, 10);
    let cache = cache(&store);
    cache.remove(&1).unwrap();
    assert!(cache.invalidate(&1).unwrap());
    assert_eq!(store.memory().get(&1), None, "the delete reached the store");
    assert_eq!(
        cache.get(&1).unwrap(),
        None,
        "the old row does not come back"
    );
}

#[test]
fn a_key_whose_write_cannot_be_written_stays() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = impatient_cache(&store);
    cache.put(1, 10).unwrap();
    store.set_down(true);
    assert!(cache.invalidate(&1).is_err());
    assert!(cache.contains_key(&1), "kept, with its write");
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    store.set_down(false);
    assert!(cache.invalidate(&1).unwrap());
    assert_eq!(store.memory().get(&1), Some(10));
}

#[test]
fn a_local_write_of_read_only_mode_is_dropped_and_the_store_answers_again() {
    let store: Store = Arc::new(FaultyStore::new());
    store.memory().insert(1, 10);
    let cache = cache(&store);
    cache.set_write_mode(WriteMode::ReadOnly).unwrap();
    cache.put(1, 99).unwrap();
    assert_eq!(cache.get(&1).unwrap(), Some(99));
    assert!(cache.invalidate(&1).unwrap());
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(10),
        "the store's row, not the local write"
    );
    assert_eq!(
        store.memory().get(&1),
        Some(10),
        "the local write was never sent"
    );
}

#[test]
fn invalidate_all_writes_what_is_pending_then_empties_memory() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    for k in 0..100 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    for k in 100..150 {
        cache.put(k, k).unwrap(); // pending
    }
    assert_eq!(cache.invalidate_all().unwrap(), 150);
    assert_eq!(cache.len(), 0);
    for k in 0..150 {
        assert_eq!(store.memory().get(&k), Some(k), "key {k}");
    }
    assert_eq!(cache.get(&120).unwrap(), Some(120), "read through again");
}

#[test]
fn invalidate_all_keeps_everything_pending_when_the_store_is_down() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = impatient_cache(&store);
    cache.put(1, 10).unwrap();
    cache.flush().unwrap();
    cache.put(2, 20).unwrap();
    store.set_down(true);
    assert!(matches!(
        cache.invalidate_all(),
        Err(Error::FlushTimeout { .. } | Error::Store(_))
    ));
    assert!(!cache.contains_key(&1), "the clean key left");
    assert_eq!(cache.get(&2).unwrap(), Some(20), "the pending one stays");
    store.set_down(false);
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&2), Some(20));
}

#[test]
fn invalidate_after_close_is_refused() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.put(1, 10).unwrap();
    let _ = cache.close(Duration::from_secs(5));
    assert!(matches!(cache.invalidate(&1), Err(Error::Closed)));
    assert!(matches!(cache.invalidate_all(), Err(Error::Closed)));
}
