//! `Cache::preload`: clean entries that are never written back and never replace a pending
//! write or delete.

use std::sync::Arc;
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, WriteMode};

fn cache(store: &Arc<FaultyStore<u64, u64>>, mode: WriteMode) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .write_mode(mode)
        .write_delay(Duration::from_millis(10))
        .build()
        .unwrap()
}

#[test]
fn preloaded_entries_are_served_and_never_written_back() {
    let store = Arc::new(FaultyStore::new());
    for k in 0..1000 {
        store.memory().insert(k, k * 10);
    }
    let c = cache(&store, WriteMode::Behind);
    c.preload(store.memory().snapshot()).unwrap();
    assert_eq!(c.len(), 1000);
    assert_eq!(c.metrics().dirty, 0);
    for k in 0..1000 {
        assert_eq!(c.get(&k).unwrap(), Some(k * 10));
    }
    c.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50)); // past the write delay, too
    c.flush().unwrap();
    assert!(store.calls().is_empty(), "a preload wrote to the store");
    assert_eq!(store.load_calls(), 0, "every get came from memory");
    let m = c.metrics();
    assert_eq!((m.batches, m.records_written), (0, 0));
    assert!(c.close(Duration::from_secs(1)).is_clean());
}

#[test]
fn preload_never_overwrites_a_pending_write_or_delete() {
    let store = Arc::new(FaultyStore::new());
    store.set_down(true); // keep the writes pending for the whole test
    let c = cache(&store, WriteMode::Behind);
    c.put(1, 100).unwrap();
    c.remove(&2).unwrap();
    c.preload([(1, 1), (2, 2), (3, 3)]).unwrap();
    assert_eq!(c.get(&1).unwrap(), Some(100), "the pending put wins");
    assert_eq!(c.get(&2).unwrap(), None, "the pending delete wins");
    assert_eq!(c.get(&3).unwrap(), Some(3));
    assert_eq!(c.metrics().dirty, 2);

    store.set_down(false);
    c.flush().unwrap();
    let mem = store.memory();
    assert_eq!(mem.get(&1), Some(100));
    assert_eq!(mem.get(&2), None);
    assert_eq!(mem.get(&3), None, "the preloaded key was written back");
    let written: Vec<u64> = store
        .calls()
        .iter()
        .flat_map(|c| c.batch.iter().map(|w| *w.key()))
        .collect();
    assert!(!written.contains(&3));
    assert!(c.close(Duration::from_secs(1)).is_clean());
}

#[test]
fn preload_keeps_a_value_already_cached_and_later_writes_go_out() {
    let store = Arc::new(FaultyStore::new());
    let c = cache(&store, WriteMode::Behind);
    c.put(7, 70).unwrap();
    c.flush().unwrap(); // now clean in memory
    c.preload([(7, 1)]).unwrap();
    assert_eq!(
        c.get(&7).unwrap(),
        Some(70),
        "a cached value is not replaced"
    );

    c.preload([(8, 80)]).unwrap();
    c.put(8, 81).unwrap(); // a write after the preload is written as usual
    c.flush().unwrap();
    assert_eq!(store.memory().get(&8), Some(81));
}

#[test]
fn preload_in_write_through_mode_writes_nothing() {
    let store = Arc::new(FaultyStore::new());
    let c = cache(&store, WriteMode::Through);
    c.preload((0..10).map(|k| (k, k))).unwrap();
    c.flush().unwrap();
    assert!(store.calls().is_empty());
    assert_eq!(c.get(&9).unwrap(), Some(9));
}

#[test]
fn preload_after_close_fails() {
    let store = Arc::new(FaultyStore::new());
    let c = cache(&store, WriteMode::Behind);
    let _ = c.close(Duration::from_secs(1));
    assert!(matches!(c.preload([(1, 1)]), Err(Error::Closed)));
}
