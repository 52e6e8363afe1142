//! Key ownership across instances over one store: partitions refused where not owned, and
//! handed from one cache to another under load with nothing lost and no stale read after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, MemoryStore};

const PARTS: u32 = 8;

fn part(k: &u64) -> u32 {
    (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as u32
}

#[test]
fn a_key_of_a_partition_not_owned_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let mine: Vec<u32> = (0..PARTS).filter(|p| p % 2 == 0).collect();
    let cache = Cache::builder(store.clone())
        .partitions(PARTS, part)
        .owned_partitions(mine.clone())
        .build()
        .unwrap();
    assert_eq!(cache.owned_partitions(), mine);
    let theirs = (0..1000u64).find(|k| part(k) % 2 == 1).unwrap();
    let ours = (0..1000u64).find(|k| part(k) % 2 == 0).unwrap();
    store.insert(theirs, 1);
    let refused = |r: Result<(), Error>| matches!(r, Err(Error::NotOwner { partition }) if partition == part(&theirs));
    assert!(refused(cache.put(theirs, 2).map(|_| ())));
    assert!(refused(cache.remove(&theirs).map(|_| ())));
    assert!(refused(cache.get(&theirs).map(|_| ())));
    assert!(refused(cache.get_all(&[ours, theirs]).map(|_| ())));
    assert!(refused(cache.update(&theirs, |v| *v += 1).map(|_| ())));
    assert!(refused(cache.compute(&theirs, |v| v.copied()).map(|_| ())));
    assert_eq!(cache.get_if_present(&theirs), None);
    assert_eq!(
        cache.preload([(theirs, 9), (ours, 9)]).unwrap(),
        1,
        "only its own key"
    );
    assert!(refused(cache.put_all([(ours, 5), (theirs, 5)]).map(|_| ())));
    assert_eq!(store.get(&theirs), Some(1), "nothing reached the store");
    cache.put(ours, 7).unwrap();
    assert_eq!(cache.get(&ours).unwrap(), Some(7));
}

#[test]
fn acquiring_moves_the_versions_above_every_earlier_owner() {
    // B is built after A, so B's versions outrank A's; when a partition moves from B back
    // to A, A takes a new generation, and its writes win again.
    let store = Arc::new(MemoryStore::new());
    let a = Cache::builder(store.clone())
        .partitions(PARTS, part)
        .build()
        .unwrap();
    let b = Cache::builder(store.clone())
        .partitions(PARTS, part)
        .owned_partitions([])
        .build()
        .unwrap();
    let k = 11;
    let p = part(&k);
    a.release_partitions(&[p]).unwrap();
    b.acquire_partitions(&[p]).unwrap();
    b.put(k, 1).unwrap();
    b.release_partitions(&[p]).unwrap();
    a.acquire_partitions(&[p]).unwrap();
    let v = a.put(k, 2).unwrap();
    assert!(v > store.version_of(&k).unwrap());
    a.flush().unwrap();
    assert_eq!(store.get(&k), Some(2));
    assert_eq!(a.metrics().superseded, 0);
}

#[test]
fn settings_and_calls_that_make_no_sense_are_refused() {
    let store = Arc::new(MemoryStore::<u64, u64>::new());
    assert!(matches!(
        Cache::builder(store.clone()).partitions(0, part).build(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Cache::builder(store.clone())
            .partitions(4, part)
            .owned_partitions([4])
            .build(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Cache::builder(store.clone()).owned_partitions([0]).build(),
        Err(Error::InvalidConfig { .. })
    ));
    let plain = Cache::builder(store.clone()).build().unwrap();
    assert!(matches!(
        plain.release_partitions(&[0]),
        Err(Error::InvalidConfig { .. })
    ));
    let parted = Cache::builder(store).partitions(4, part).build().unwrap();
    assert!(matches!(
        parted.release_partitions(&[9]),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        parted.acquire_partitions(&[9]),
        Err(Error::InvalidConfig { .. })
    ));
    assert_eq!(
        parted.owned_partitions(),
        vec![0, 1, 2, 3],
        "nothing changed"
    );
}

#[test]
fn a_release_that_cannot_write_hands_the_writes_back() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache = Cache::builder(store.clone())
        .partitions(PARTS, part)
        .flush_timeout(Duration::from_millis(200))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build()
        .unwrap();
    let k = 42;
    let p = part(&k);
    let other = (0..1000u64).find(|o| part(o) != p).unwrap();
    cache.put(k, 1).unwrap();
    cache.put(other, 1).unwrap();
    store.set_down(true);
    let handed = cache.release_partitions(&[p]).unwrap();
    assert_eq!(handed.len(), 1, "{handed:?}");
    assert_eq!((*handed[0].key(), handed[0].value().copied()), (k, Some(1)));
    assert!(matches!(cache.put(k, 2), Err(Error::NotOwner { .. })));
    assert!(!cache.contains_key(&k));
    assert!(
        cache.contains_key(&other),
        "another partition's write stays"
    );
    store.set_down(false);
    cache.flush().unwrap();
    assert_eq!(
        store.memory().get(&k),
        None,
        "handed back, not written by this cache"
    );
    assert_eq!(store.memory().get(&other), Some(1));
    assert_eq!(cache.metrics().dirty, 0);
}

#[test]
fn acquiring_drops_what_memory_still_holds() {
    let store = Arc::new(MemoryStore::new());
    let a = Cache::builder(store.clone())
        .partitions(PARTS, part)
        .build()
        .unwrap();
    let k = 7;
    let p = part(&k);
    a.put(k, 1).unwrap();
    a.flush().unwrap();
    let b = Cache::builder(store.clone())
        .partitions(PARTS, part)
        .owned_partitions([])
        .build()
        .unwrap();
    a.release_partitions(&[p]).unwrap();
    b.acquire_partitions(&[p]).unwrap();
    b.put(k, 2).unwrap();
    b.release_partitions(&[p]).unwrap();
    a.acquire_partitions(&[p]).unwrap();
    assert_eq!(
        a.get(&k).unwrap(),
        Some(2),
        "read from the store, not an old copy"
    );
}

/// Which cache serves each partition, as an application's router knows it.
struct Router {
    owner: RwLock<Vec<usize>>,
}

#[test]
fn partitions_move_between_caches_under_load_with_nothing_lost() {
    let store = Arc::new(MemoryStore::new());
    let caches: Arc<Vec<Cache<u64, u64>>> = Arc::new(vec![
        Cache::builder(store.clone())
            .partitions(PARTS, part)
            .write_delay(Duration::from_millis(2))
            .build()
            .unwrap(),
        Cache::builder(store.clone())
            .partitions(PARTS, part)
            .owned_partitions([])
            .write_delay(Duration::from_millis(2))
            .build()
            .unwrap(),
    ]);
    let router = Arc::new(Router {
        owner: RwLock::new(vec![0; PARTS as usize]),
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer owns its keys (key % 4 == writer) and writes them increasing values; it
    // remembers the last value the cache accepted for each.
    let last: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (caches, router, stop, last) =
                (caches.clone(), router.clone(), stop.clone(), last.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut mine = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let k = (n * 4 + w) % 400;
                    loop {
                        let owner = router.owner.read().unwrap()[part(&k) as usize];
                        match caches[owner].put(k, n) {
                            Ok(_) => break,
                            // The partition is moving: ask the router again.
                            Err(Error::NotOwner { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    mine.insert(k, n);
                    // Reads go to the owner too, and see this writer's last write.
                    loop {
                        let owner = router.owner.read().unwrap()[part(&k) as usize];
                        match caches[owner].get(&k) {
                            Ok(v) => {
                                assert_eq!(v, Some(n), "key {k}: a stale read");
                                break;
                            }
                            Err(Error::NotOwner { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                last.lock().unwrap().extend(mine);
            })
        })
        .collect();
    // Move every partition from cache 0 to cache 1 and back, one at a time.
    for round in 0..2 {
        let (from, to) = if round == 0 { (0, 1) } else { (1, 0) };
        for p in 0..PARTS {
            std::thread::sleep(Duration::from_millis(5));
            caches[from].release_partitions(&[p]).unwrap();
            caches[to].acquire_partitions(&[p]).unwrap();
            router.owner.write().unwrap()[p as usize] = to;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for c in caches.iter() {
        c.flush().unwrap();
        assert_eq!(
            c.metrics().superseded,
            0,
            "no write lost to another instance"
        );
    }
    let last = last.lock().unwrap();
    assert!(last.len() > 100);
    for (k, v) in last.iter() {
        assert_eq!(store.get(k), Some(*v), "key {k}: the last accepted write");
    }
}
