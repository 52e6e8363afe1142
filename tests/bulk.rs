//! `put_all` and `remove_all`: bulk writes that take each shard lock once.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use writebehind::journal::{Journal, JournalSync};
use writebehind::stores::Raw;
use writebehind::testing::FaultyStore;
use writebehind::{Backpressure, Cache, Error, WriteMode};

type Store = Arc<FaultyStore<u64, u64>>;

fn cache(store: &Store) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .shards(8)
        .write_delay(Duration::from_millis(1))
        .build()
        .expect("valid config")
}

#[test]
fn put_all_writes_every_key_and_returns_versions_in_order() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    // Key 5 twice: the later item is the newer write.
    let mut items: Vec<(u64, u64)> = (0..1000).map(|k| (k, k + 1)).collect();
    items.push((5, 555));
    let versions = cache.put_all(items.clone()).unwrap();
    assert_eq!(versions.len(), items.len());
    assert!(
        versions[5] < versions[1000],
        "{} {}",
        versions[5],
        versions[1000]
    );
    assert_eq!(cache.get(&5).unwrap(), Some(555));
    assert_eq!(cache.get(&999).unwrap(), Some(1000));
    cache.flush().unwrap();
    assert_eq!(store.memory().len(), 1000);
    assert_eq!(store.memory().get(&5), Some(555));
    // Each key's returned version is the one the store holds.
    for k in 0..1000 {
        let at = if k == 5 { 1000 } else { k as usize };
        assert_eq!(store.memory().version_of(&k), Some(versions[at]), "key {k}");
    }
    writebehind::testing::assert_versions_grow(&store);
}

#[test]
fn remove_all_deletes_in_memory_and_in_the_store() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.put_all((0..100).map(|k| (k, k))).unwrap();
    cache.flush().unwrap();
    let gone: Vec<u64> = (0..100).filter(|k| k % 3 == 0).collect();
    let versions = cache.remove_all(&gone).unwrap();
    assert_eq!(versions.len(), gone.len());
    for k in 0..100 {
        let expect = (k % 3 != 0).then_some(k);
        assert_eq!(cache.get(&k).unwrap(), expect, "key {k}");
    }
    cache.flush().unwrap();
    assert_eq!(store.memory().len(), 66);
    assert_eq!(store.memory().get(&3), None);
}

#[test]
fn put_all_in_write_through_mode_reaches_the_store_before_returning() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.set_write_mode(WriteMode::Through).unwrap();
    cache.put_all((0..50).map(|k| (k, k * 2))).unwrap();
    assert_eq!(store.memory().len(), 50);
    assert_eq!(store.memory().get(&49), Some(98));
}

#[test]
fn put_all_under_backpressure_reports_the_refusal_and_keeps_what_it_wrote() {
    let store: Store = Arc::new(FaultyStore::new());
    store.set_down(true);
    let cache = Cache::builder(store.clone())
        .shards(1)
        .write_delay(Duration::from_millis(1))
        .max_dirty(10, Backpressure::Reject)
        .build()
        .unwrap();
    let r = cache.put_all((0..20).map(|k| (k, k)));
    assert!(matches!(r, Err(Error::Backpressure { .. })), "{r:?}");
    let written: Vec<u64> = (0..20).filter(|k| cache.contains_key(k)).collect();
    assert!(!written.is_empty() && written.len() < 20, "{written:?}");
    for k in &written {
        assert_eq!(cache.get(k).unwrap(), Some(*k), "a write is whole");
    }
    store.set_down(false);
    cache.flush().unwrap();
    assert_eq!(store.memory().len(), written.len());
}

#[test]
fn put_all_waits_for_a_read_modify_write_of_one_of_its_keys() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    cache.put(3, 0).unwrap();
    let inside = Arc::new(Barrier::new(2));
    let (c2, i2) = (cache.clone(), inside.clone());
    let computing = std::thread::spawn(move || {
        c2.compute(&3, |v| {
            i2.wait();
            std::thread::sleep(Duration::from_millis(100));
            v.map(|v| v + 1)
        })
        .unwrap()
    });
    inside.wait();
    let versions = cache.put_all((0..10).map(|k| (k, 100 + k))).unwrap();
    let computed = computing.join().unwrap();
    assert!(
        computed.version.unwrap() < versions[3],
        "the bulk write of key 3 came after"
    );
    assert_eq!(cache.get(&3).unwrap(), Some(103));
}

#[test]
fn put_all_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let store: Store = Arc::new(FaultyStore::new());
    store.set_down(true);
    let build = |store: &Store| {
        Cache::builder(store.clone())
            .shards(4)
            .write_delay(Duration::from_millis(1))
            .journal(Journal::new(dir.path(), Raw, Raw).sync(JournalSync::EveryWrite))
            .build()
            .unwrap()
    };
    let cache = build(&store);
    cache.put_all((0..200).map(|k| (k, k + 7))).unwrap();
    cache.remove_all(&[1, 2]).unwrap();
    let report = cache.close(Duration::from_millis(50));
    assert!(
        !report.is_clean(),
        "the store is down: the writes are handed back"
    );
    drop(cache);
    store.set_down(false);
    let cache = build(&store);
    cache.flush().unwrap();
    assert_eq!(store.memory().len(), 198);
    assert_eq!(store.memory().get(&150), Some(157));
    assert_eq!(store.memory().get(&2), None);
}
