//! Atomic read-modify-writes: `compute`, `update`, `put_if_absent`, `get_with`,
//! `try_get_with`. No update is lost under contention and store failures, one racer wins an
//! absent key, a closure that calls back for its own key is refused, and a panicking closure
//! leaves its key free.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, WriteMode};

type Store = Arc<FaultyStore<u64, u64>>;

const KEYS: u64 = 100;

fn cache(store: &Store) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .write_delay(Duration::from_millis(1))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(4))
        .build()
        .expect("valid config")
}

/// `threads` threads each add 1 to every key `per_thread / KEYS` times through `incr`, with
/// a store that fails 20% of its batches; every counter must end at the number of
/// increments, in the cache and, after a flush, in the store.
fn no_increment_is_lost(
    mode: WriteMode,
    threads: u64,
    per_thread: u64,
    incr: fn(&Cache<u64, u64>, u64),
) {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    cache.set_write_mode(mode).unwrap();
    for k in 0..KEYS {
        cache.put(k, 0).unwrap();
    }
    cache.flush().unwrap();
    store.fail_with_probability(0.2, 7);
    let start = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, start) = (cache.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut k = t * 7;
                for _ in 0..per_thread {
                    k = (k + 13) % KEYS;
                    incr(&cache, k);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let each = threads * per_thread / KEYS;
    for k in 0..KEYS {
        assert_eq!(cache.get(&k).unwrap(), Some(each), "key {k} in the cache");
    }
    store.fail_with_probability(0.0, 0);
    cache.flush().unwrap();
    for k in 0..KEYS {
        assert_eq!(store.memory().get(&k), Some(each), "key {k} in the store");
    }
    writebehind::testing::assert_versions_grow(&store);
}

fn update_incr(cache: &Cache<u64, u64>, k: u64) {
    // A write-through may fail (the store refused it): the increment is then not made, and
    // the caller tries again, as an application would.
    while let Err(e) = cache.update(&k, |n| *n += 1) {
        assert!(matches!(e, Error::Store(_)), "{e}");
    }
}

fn compute_incr(cache: &Cache<u64, u64>, k: u64) {
    while let Err(e) = cache.compute(&k, |n| Some(n.copied().unwrap_or(0) + 1)) {
        assert!(matches!(e, Error::Store(_)), "{e}");
    }
}

#[test]
fn update_loses_no_increment_written_behind() {
    no_increment_is_lost(WriteMode::Behind, 8, 100_000, update_incr);
}

#[test]
fn compute_loses_no_increment_written_behind() {
    no_increment_is_lost(WriteMode::Behind, 8, 50_000, compute_incr);
}

#[test]
fn update_loses_no_increment_written_through() {
    no_increment_is_lost(WriteMode::Through, 4, 5_000, update_incr);
}

#[test]
fn increments_mixed_with_plain_puts_of_other_keys_and_reads() {
    // Writers of other keys and readers of the counted keys run beside the increments.
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    cache.put(0, 0).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise: Vec<_> = (0..2)
        .map(|t| {
            let (cache, stop) = (cache.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    cache.put(1000 + t * 100 + n % 100, n).unwrap();
                    let seen = cache.get(&0).unwrap().unwrap();
                    assert!(seen <= 40_000);
                    n += 1;
                }
            })
        })
        .collect();
    let incr: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                for _ in 0..10_000 {
                    cache.update(&0, |n| *n += 1).unwrap();
                }
            })
        })
        .collect();
    for h in incr {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for h in noise {
        h.join().unwrap();
    }
    assert_eq!(cache.get(&0).unwrap(), Some(40_000));
}

#[test]
fn put_if_absent_has_one_winner_and_one_store_write() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    let start = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let (cache, start) = (cache.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                cache.put_if_absent(5, 100 + t).unwrap()
            })
        })
        .collect();
    let answers: Vec<Option<u64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners = answers.iter().filter(|a| a.is_none()).count();
    assert_eq!(winners, 1, "{answers:?}");
    let value = cache.get(&5).unwrap().unwrap();
    assert!(
        answers.iter().flatten().all(|&a| a == value),
        "every loser saw the winner's value: {answers:?}"
    );
    cache.flush().unwrap();
    assert_eq!(store.received_versions()[&5].len(), 1, "one store write");
    assert_eq!(store.memory().get(&5), Some(value));
}

#[test]
fn get_with_runs_init_once_for_racing_callers() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    let runs = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (cache, start, runs) = (cache.clone(), start.clone(), runs.clone());
            std::thread::spawn(move || {
                start.wait();
                cache
                    .get_with(9, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        42
                    })
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "init ran once");
    cache.flush().unwrap();
    assert_eq!(store.received_versions()[&9].len(), 1, "one store write");
}

#[test]
fn a_key_only_in_the_store_is_not_overwritten() {
    let store: Store = Arc::new(FaultyStore::new());
    store.memory().insert(3, 33);
    let cache = cache(&store);
    assert_eq!(cache.put_if_absent(3, 1).unwrap(), Some(33));
    assert_eq!(cache.get_with(3, || unreachable!()).unwrap(), 33);
    assert_eq!(
        cache
            .try_get_with(3, || Err::<u64, Error>(Error::Closed))
            .unwrap(),
        33
    );
    assert!(cache.update(&3, |v| *v += 1).unwrap().is_some());
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&3), Some(34));
    assert!(
        store.received_versions()[&3].len() == 1,
        "only the update was written"
    );
}

#[test]
fn compute_on_an_absent_key_and_removal() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    // `None` for an absent key writes nothing.
    let c = cache.compute(&1, |v| v.copied()).unwrap();
    assert_eq!((c.value, c.version), (None, None));
    let c = cache
        .compute(&1, |v| Some(v.copied().unwrap_or(10)))
        .unwrap();
    assert_eq!(c.value, Some(10));
    let put_version = c.version.unwrap();
    let c = cache.compute(&1, |_| None).unwrap();
    assert!(c.value.is_none() && c.version.unwrap() > put_version);
    assert_eq!(cache.get(&1).unwrap(), None);
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&1), None);
    assert_eq!(
        cache.update(&1, |v| *v += 1).unwrap(),
        None,
        "absent: not written"
    );
}

#[test]
fn a_closure_writing_its_own_key_is_refused_and_other_keys_are_fine() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.put(1, 1).unwrap();
    let mut inner = Vec::new();
    let c = cache
        .compute(&1, |v| {
            inner.push(cache.put(1, 99).map(|_| ()));
            inner.push(cache.remove(&1).map(|_| ()));
            inner.push(cache.compute(&1, |_| Some(7)).map(|_| ()));
            inner.push(cache.update(&1, |v| *v = 7).map(|_| ()));
            inner.push(cache.put(2, 20).map(|_| ()));
            // Reads of its own key are fine.
            assert_eq!(cache.get(&1).unwrap(), Some(1));
            v.map(|v| v + 1)
        })
        .unwrap();
    assert!(matches!(inner[0], Err(Error::Reentrant)), "{:?}", inner[0]);
    assert!(matches!(inner[1], Err(Error::Reentrant)), "{:?}", inner[1]);
    assert!(matches!(inner[2], Err(Error::Reentrant)), "{:?}", inner[2]);
    assert!(matches!(inner[3], Err(Error::Reentrant)), "{:?}", inner[3]);
    assert!(inner[4].is_ok(), "another key: {:?}", inner[4]);
    assert_eq!(c.value, Some(2));
    assert_eq!(cache.get(&1).unwrap(), Some(2));
    assert_eq!(cache.get(&2).unwrap(), Some(20));
    // A nested read-modify-write of another key inside the closure writes normally.
    cache
        .compute(&1, |v| {
            cache.update(&2, |w| *w += 1).unwrap();
            v.copied()
        })
        .unwrap();
    assert_eq!(cache.get(&2).unwrap(), Some(21));
}

#[test]
fn a_panicking_closure_writes_nothing_and_frees_the_key() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    cache.put(4, 40).unwrap();
    let c2 = cache.clone();
    let r = std::thread::spawn(move || {
        c2.update(&4, |_| panic!("user code panics")).unwrap();
    })
    .join();
    assert!(r.is_err());
    let c2 = cache.clone();
    let r = std::thread::spawn(move || {
        c2.get_with(5, || panic!("init panics")).unwrap();
    })
    .join();
    assert!(r.is_err());
    assert_eq!(cache.get(&4).unwrap(), Some(40), "nothing written");
    assert!(!cache.contains_key(&5));
    // Neither key is wedged: plain writes and further read-modify-writes go through.
    cache.put(4, 41).unwrap();
    assert!(cache.update(&4, |v| *v += 1).unwrap().is_some());
    assert_eq!(cache.get_with(5, || 50).unwrap(), 50);
    assert_eq!(cache.get(&4).unwrap(), Some(42));
}

#[test]
fn a_failed_load_runs_no_closure_and_frees_the_key() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    store.set_down(true);
    let ran = AtomicUsize::new(0);
    let r = cache.compute(&8, |v| {
        ran.fetch_add(1, Ordering::SeqCst);
        v.copied()
    });
    assert!(matches!(r, Err(Error::Load(_))), "{r:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    store.set_down(false);
    assert_eq!(cache.put_if_absent(8, 80).unwrap(), None);
    assert_eq!(cache.get(&8).unwrap(), Some(80));
}

#[test]
fn a_put_of_the_key_waits_for_the_closure_and_lands_after_it() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = Arc::new(cache(&store));
    cache.put(6, 1).unwrap();
    let entered = Arc::new(Barrier::new(2));
    let c2 = cache.clone();
    let e2 = entered.clone();
    let computing = std::thread::spawn(move || {
        c2.compute(&6, |v| {
            e2.wait();
            // The put below has started by now and must wait for this value.
            std::thread::sleep(Duration::from_millis(100));
            v.map(|v| v + 100)
        })
        .unwrap()
    });
    entered.wait();
    let put_version = cache.put(6, 7).unwrap();
    let computed = computing.join().unwrap();
    assert!(computed.version.unwrap() < put_version);
    assert_eq!(
        cache.get(&6).unwrap(),
        Some(7),
        "the put landed after the compute"
    );
}

#[test]
fn read_modify_writes_after_close_are_refused() {
    let store: Store = Arc::new(FaultyStore::new());
    let cache = cache(&store);
    cache.put(1, 1).unwrap();
    assert!(cache.close(Duration::from_secs(5)).is_clean());
    assert!(matches!(cache.update(&1, |v| *v += 1), Err(Error::Closed)));
    assert!(matches!(
        cache.compute(&1, |v| v.copied()),
        Err(Error::Closed)
    ));
    assert!(matches!(cache.put_if_absent(2, 2), Err(Error::Closed)));
}
