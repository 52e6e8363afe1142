#![cfg(writebehind_loom)]
//! Loom models of the lock-free core and of the cache protocols built on it.
//!
//! Run with (see `.ci/loom.sh` and `docs/VERIFICATION.md`):
//!
//! ```text
//! RUSTFLAGS="--cfg writebehind_loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --test loom
//! ```
//!
//! Under `cfg(writebehind_loom)` every atomic, lock, condvar, cell and `Arc` of the engine is
//! loom's. Flusher threads are not modeled: every cache is built with `manual_flushing()` and
//! the models drive `flush_step`, `flush` and `close` from their own threads. Time is a
//! `ManualClock` (its atomic is loom's too, so it is created inside each model). The stores are
//! `FaultyStore`/`MemoryStore`, which use plain `std` locks: a store call is one indivisible step
//! for loom, which is exactly the atomicity a real store's transaction gives.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

use writebehind::__verify::DirtyRing;
use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, ManualClock, WriteMode};

type Store = std::sync::Arc<FaultyStore<u64, u64>>;

/// A one-shard, one-flusher cache with manual flushing, a zero write delay (every armed shard
/// is due at the next step) and a clock that never moves unless a model moves it.
fn cache(store: &Store) -> Cache<u64, u64> {
    model_cache(store, 8, 4)
}

/// As [`cache`], with one-record batches and a two-slot ring: a third queued key overflows
/// and only the table scan finds it.
fn small_ring_cache(store: &Store) -> Cache<u64, u64> {
    model_cache(store, 1, 2)
}

fn model_cache(store: &Store, max_batch: usize, ring: usize) -> Cache<u64, u64> {
    model_builder(store)
        .max_batch(max_batch)
        .dirty_ring_capacity(ring)
        .build()
        .expect("valid model configuration")
}

/// One shard, one flusher, manual flushing, a zero write delay and a clock that never moves
/// unless a model moves it: what every model's cache starts from.
fn model_builder(store: &Store) -> writebehind::Builder<u64, u64> {
    Cache::builder(store.clone())
        .shards(1)
        .flushers(1)
        .write_delay(Duration::ZERO)
        .clock(std::sync::Arc::new(ManualClock::new()))
        .manual_flushing()
}

fn store() -> Store {
    std::sync::Arc::new(FaultyStore::new())
}

/// Per-key order: the versions the store received for each key never go down.
fn assert_versions_grow(store: &FaultyStore<u64, u64>) {
    for (key, versions) in store.received_versions() {
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "key {key}: the store received versions out of order: {versions:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Model 1: the dirty ring on its own.
// ---------------------------------------------------------------------------------------

/// Two producers and a consumer that pops while they push: every key pushed with `Ok` is
/// popped exactly once, and loom's cell tracking fails the model if the consumer reads a slot
/// before its producer published it (or two threads touch one slot at once).
#[test]
fn ring_two_producers_one_consumer() {
    loom::model(|| {
        let ring = Arc::new(DirtyRing::<u64>::new(2));
        let producers: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|k| {
                let ring = ring.clone();
                thread::spawn(move || {
                    ring.push(k).expect("two keys fit a two-slot ring");
                })
            })
            .collect();
        let mut seen = Vec::new();
        if let Some(k) = ring.pop() {
            seen.push(k);
        }
        for p in producers {
            p.join().unwrap();
        }
        ring.drain_into(&mut seen, false);
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 2], "each pushed key drained exactly once");
        assert_eq!(ring.pop(), None);
    });
}

/// The full-ring path: three keys into two slots while the consumer drains once. A push either
/// succeeds (and its key is drained exactly once) or gives its key back; nothing is lost or
/// duplicated, and a wrapped slot is never overwritten before it was read.
#[test]
fn ring_full_path_gives_keys_back() {
    loom::model(|| {
        let ring = Arc::new(DirtyRing::<u64>::new(2));
        let r1 = ring.clone();
        let p1 = thread::spawn(move || {
            let mut refused = Vec::new();
            for k in [1u64, 2] {
                if let Err(back) = r1.push(k) {
                    refused.push(back);
                }
            }
            refused
        });
        let r2 = ring.clone();
        let p2 = thread::spawn(move || r2.push(3).err().into_iter().collect::<Vec<_>>());
        let mut drained = Vec::new();
        ring.drain_into(&mut drained, true);
        let mut refused = p1.join().unwrap();
        refused.extend(p2.join().unwrap());
        ring.drain_into(&mut drained, true);
        let drained_set: HashSet<u64> = drained.iter().copied().collect();
        assert_eq!(
            drained_set.len(),
            drained.len(),
            "a key drained twice: {drained:?}"
        );
        for k in &refused {
            assert!(!drained_set.contains(k), "key {k} refused and drained");
        }
        let mut all: Vec<u64> = drained.iter().chain(refused.iter()).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            vec![1, 2, 3],
            "drained {drained:?}, refused {refused:?}"
        );
        assert!(
            drained.len() >= 2,
            "a two-slot ring accepts at least two keys"
        );
    });
}

/// `drain_into(.., wait_for_claimed = true)` is the ring's half of the flush barrier: a push
/// that returned before the drain began is drained by it, even if a slower producer claimed an
/// earlier slot and has not published it yet.
#[test]
fn ring_drain_waits_for_pushes_that_returned() {
    loom::model(|| {
        let ring = Arc::new(DirtyRing::<u64>::new(4));
        let pushed = Arc::new(AtomicBool::new(false));
        let (r1, r2, f2) = (ring.clone(), ring.clone(), pushed.clone());
        let slow = thread::spawn(move || r1.push(1).unwrap());
        let fast = thread::spawn(move || {
            r2.push(2).unwrap();
            f2.store(true, Ordering::SeqCst);
        });
        let saw = pushed.load(Ordering::SeqCst);
        let mut drained = Vec::new();
        ring.drain_into(&mut drained, true);
        if saw {
            assert!(
                drained.contains(&2),
                "a push that returned was missed: {drained:?}"
            );
        }
        slow.join().unwrap();
        fast.join().unwrap();
        ring.drain_into(&mut drained, true);
        drained.sort_unstable();
        assert_eq!(drained, vec![1, 2]);
    });
}

// ---------------------------------------------------------------------------------------
// Model 2: the conflation handshake (epoch close vs put).
// ---------------------------------------------------------------------------------------

/// `put(k,1); put(k,2)` against a flusher step. Whatever the interleaving: the store never
/// receives an older version after a newer one, and once a final `flush` ran the store holds
/// `2` and nothing is dirty. This catches a key that is dirty but on no ring (the epoch closed
/// between the value write and the push, or the key was drained early and the second write
/// conflated into an epoch the flusher had already taken).
///
/// Another key is written first, so the shard is already armed and the step may close the
/// epoch at any point of the two puts (a step only selects an armed, due shard).
#[test]
fn conflation_handshake() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        cache.put(8, 80).unwrap();
        let c1 = cache.clone();
        let writer = thread::spawn(move || {
            c1.put(7, 1).unwrap();
            c1.put(7, 2).unwrap();
        });
        let c2 = cache.clone();
        let flusher = thread::spawn(move || {
            c2.flush_step().unwrap();
        });
        writer.join().unwrap();
        flusher.join().unwrap();
        assert_versions_grow(&store);
        // Every write has returned: nothing may be dirty yet off every ring.
        cache.flush().unwrap();
        assert_eq!(
            store.memory().get(&7),
            Some(2),
            "the latest value reached the store"
        );
        assert_eq!(cache.metrics().dirty, 0, "a dirty key was left behind");
        assert_versions_grow(&store);
        for call in store.calls() {
            let mut keys: Vec<u64> = call.batch.iter().map(|w| *w.key()).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), call.batch.len(), "a key twice in one batch");
        }
    });
}

/// A single `put` against a flusher step on an already armed shard: the step may close the
/// epoch between the put's table write (stamped with the old epoch) and its ring push. The
/// key must still reach the ring (a later write would mask a lost push, so there is none),
/// and a final `flush` must write it.
#[test]
fn epoch_closes_between_write_and_push() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        cache.put(8, 80).unwrap();
        let c1 = cache.clone();
        let writer = thread::spawn(move || c1.put(7, 1).unwrap());
        let c2 = cache.clone();
        let flusher = thread::spawn(move || {
            c2.flush_step().unwrap();
        });
        writer.join().unwrap();
        flusher.join().unwrap();
        cache.flush().unwrap();
        assert_eq!(
            store.memory().get(&7),
            Some(1),
            "the put never reached the store"
        );
        assert_eq!(store.memory().get(&8), Some(80));
        assert_eq!(cache.metrics().dirty, 0, "a dirty key was left behind");
        assert_versions_grow(&store);
    });
}

/// Two writers on one key against a flusher step: the store ends at one of the two values, the
/// one the cache answers with, and versions never go backwards.
#[test]
fn two_writers_one_key_against_a_step() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        cache.put(8, 80).unwrap(); // arm the shard: the step may run inside the puts
        let writers: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|v| {
                let c = cache.clone();
                thread::spawn(move || c.put(9, v).unwrap())
            })
            .collect();
        cache.flush_step().unwrap();
        for w in writers {
            w.join().unwrap();
        }
        cache.flush().unwrap();
        let latest = cache.get(&9).unwrap();
        assert!(matches!(latest, Some(1) | Some(2)));
        assert_eq!(
            store.memory().get(&9),
            latest,
            "store and cache agree after flush"
        );
        assert_eq!(cache.metrics().dirty, 0);
        assert_versions_grow(&store);
    });
}

// ---------------------------------------------------------------------------------------
// Model 3: the flush barrier against a concurrent writer.
// ---------------------------------------------------------------------------------------

/// A write that returned before `flush()` began is in the store when `flush()` returns, while
/// the same thread keeps writing the key (a newer version may be there instead, never an older
/// one), and another key's write is caught by the barrier too.
#[test]
fn flush_barrier_vs_writer() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        let returned = Arc::new(AtomicBool::new(false));
        let (c1, r1) = (cache.clone(), returned.clone());
        let writer = thread::spawn(move || {
            c1.put(1, 10).unwrap();
            c1.put(2, 20).unwrap();
            r1.store(true, Ordering::SeqCst);
            c1.put(1, 11).unwrap();
        });
        let before = returned.load(Ordering::SeqCst);
        cache.flush().unwrap();
        if before {
            let one = store.memory().get(&1);
            assert!(
                matches!(one, Some(10) | Some(11)),
                "put(1) returned before flush began, store has {one:?}"
            );
            assert_eq!(
                store.memory().get(&2),
                Some(20),
                "put(2) missed by the barrier"
            );
        }
        writer.join().unwrap();
        assert_versions_grow(&store);
    });
}

/// The barrier against a write that conflates into another writer's push: writer A's put
/// stamps the key with the open epoch, so this thread's later put of the same key conflates
/// (it does not push) and returns. Its `flush()` must still write the key, even while A has
/// not yet reached the ring. A push after the shard lock was released lost this: the
/// flush closed the epoch and drained a ring A had not yet claimed a slot in, and returned
/// with the key dirty (the per-key linearizability test caught it with real threads).
#[test]
fn flush_barrier_vs_a_write_that_conflated_into_another_writers_push() {
    loom::model(|| {
        let store = store();
        conflated_write_vs_flush(&store, Arc::new(cache(&store)), 1);
    });
}

/// Writer A puts `(key, 10·key)` while this thread puts `(key, 10·key + 1)`, which may
/// conflate into A's write, and then flushes: this thread's put returned before its flush
/// began, so the store holds one of the two values when the flush returns. Afterwards store
/// and cache agree and nothing is dirty.
fn conflated_write_vs_flush(store: &Store, cache: Arc<Cache<u64, u64>>, key: u64) {
    let (a, b) = (key * 10, key * 10 + 1);
    let c1 = cache.clone();
    let writer = thread::spawn(move || {
        c1.put(key, a).unwrap();
    });
    cache.put(key, b).unwrap();
    cache.flush().unwrap();
    let stored = store.memory().get(&key);
    assert!(
        stored == Some(a) || stored == Some(b),
        "put({key}, {b}) returned before flush() began, yet the store has {stored:?}"
    );
    writer.join().unwrap();
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&key), cache.get(&key).unwrap());
    assert_eq!(cache.metrics().dirty, 0);
    assert_versions_grow(store);
}

/// The same race through a full ring: writer A's push of key 3 finds the two-slot ring full
/// and raises the overflow flag instead; this thread's put of key 3 conflates into A's write
/// and returns, and its `flush()` must scan the table and write the key. The flag is raised
/// under the shard lock for this: raised after the unlock, the flush could swap a clear flag,
/// skip the scan and return without key 3.
#[test]
fn flush_barrier_vs_a_write_that_conflated_into_an_overflowed_push() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(small_ring_cache(&store));
        cache.put(1, 10).unwrap();
        cache.put(2, 20).unwrap(); // the ring is full now
        conflated_write_vs_flush(&store, cache, 3);
    });
}

/// The barrier also holds when the first batch fails (the retry belongs to the same flush).
#[test]
fn flush_barrier_with_a_failed_batch() {
    loom::model(|| {
        let store = store();
        store.fail_next(1);
        let cache = Arc::new(cache(&store));
        let returned = Arc::new(AtomicBool::new(false));
        let (c1, r1) = (cache.clone(), returned.clone());
        let writer = thread::spawn(move || {
            c1.put(1, 10).unwrap();
            r1.store(true, Ordering::SeqCst);
            c1.put(1, 11).unwrap();
        });
        let before = returned.load(Ordering::SeqCst);
        cache.flush().unwrap();
        if before {
            let one = store.memory().get(&1);
            assert!(matches!(one, Some(10) | Some(11)), "store has {one:?}");
        }
        writer.join().unwrap();
        assert_versions_grow(&store);
    });
}

/// The barrier through the full-ring path: with `max_batch(1)` the ring has two slots, so the
/// third key of the writer overflows and only the table scan finds it. A put that returned
/// before `flush` began is in the store when it returns, scanned or drained.
#[test]
fn flush_barrier_through_ring_overflow() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(small_ring_cache(&store));
        cache.put(1, 10).unwrap();
        cache.put(2, 20).unwrap(); // the ring is full now
        let returned = Arc::new(AtomicBool::new(false));
        let (c1, r1) = (cache.clone(), returned.clone());
        let writer = thread::spawn(move || {
            c1.put(3, 30).unwrap(); // overflows: the key is only in the table
            r1.store(true, Ordering::SeqCst);
        });
        let before = returned.load(Ordering::SeqCst);
        cache.flush().unwrap();
        if before {
            assert_eq!(
                store.memory().get(&3),
                Some(30),
                "an overflowed put was missed"
            );
        }
        assert_eq!(store.memory().get(&1), Some(10));
        assert_eq!(store.memory().get(&2), Some(20));
        writer.join().unwrap();
        cache.flush().unwrap();
        assert_eq!(store.memory().get(&3), Some(30));
        assert_eq!(cache.metrics().dirty, 0);
    });
}

// ---------------------------------------------------------------------------------------
// Model 4: close against put (and against a concurrent flush step).
// ---------------------------------------------------------------------------------------

/// Every write `put` accepted is, after `close` returns, in the store or in the report (its
/// latest accepted value), and from then on nothing calls the store.
#[test]
fn close_vs_put() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        let c1 = cache.clone();
        let writer = thread::spawn(move || {
            let mut accepted = HashMap::new();
            for (k, v) in [(1u64, 10u64), (2, 20)] {
                match c1.put(k, v) {
                    Ok(_) => {
                        accepted.insert(k, v);
                    }
                    Err(Error::Closed) => {}
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            accepted
        });
        let report = cache.close(Duration::from_secs(1));
        let calls_at_close = store.calls().len();
        let accepted = writer.join().unwrap();
        let handed_back: HashMap<u64, Option<u64>> = report
            .unwritten
            .iter()
            .map(|w| (*w.key(), w.value().copied()))
            .collect();
        for (k, v) in &accepted {
            let written = store.memory().get(k) == Some(*v);
            let returned = handed_back.get(k) == Some(&Some(*v));
            assert!(
                written || returned,
                "accepted put({k}, {v}) was lost: report {handed_back:?}"
            );
        }
        assert!(matches!(cache.flush_step(), Err(Error::Closed)));
        assert!(matches!(cache.get(&3), Err(Error::Closed)));
        assert_eq!(
            store.calls().len(),
            calls_at_close,
            "the store was called after close"
        );
    });
}

/// `close` against a put while the store fails the first batch: close's own retries and its
/// report still account for every accepted write.
#[test]
fn close_vs_put_with_a_failing_store() {
    loom::model(|| {
        let store = store();
        store.fail_next(1);
        let cache = Arc::new(cache(&store));
        cache.put(1, 10).unwrap();
        let c1 = cache.clone();
        let writer = thread::spawn(move || c1.put(1, 11).is_ok());
        let report = cache.close(Duration::from_secs(1));
        let calls_at_close = store.calls().len();
        let second = writer.join().unwrap();
        let latest = if second { 11 } else { 10 };
        let written = store.memory().get(&1) == Some(latest);
        let returned = report.unwritten.iter().any(|w| w.value() == Some(&latest));
        assert!(
            written || returned,
            "the latest accepted put ({latest}) was lost"
        );
        assert_eq!(
            store.calls().len(),
            calls_at_close,
            "the store was called after close"
        );
        assert_versions_grow(&store);
    });
}

/// `close` against a `flush_step` that started before it and a `put` that was accepted just
/// before `close` (so `close` may hand it back): once `close` returned, nothing may call the
/// store, and the put is in the store or in the report.
#[test]
fn close_vs_flush_step() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        let c1 = cache.clone();
        let writer = thread::spawn(move || c1.put(1, 10).is_ok());
        let c2 = cache.clone();
        let stepper = thread::spawn(move || {
            let _ = c2.flush_step();
        });
        let report = cache.close(Duration::from_secs(1));
        let calls_at_close = store.calls().len();
        let accepted = writer.join().unwrap();
        stepper.join().unwrap();
        assert_eq!(
            store.calls().len(),
            calls_at_close,
            "a flush step called the store after close returned"
        );
        if accepted {
            let written = store.memory().get(&1) == Some(10);
            let returned = report.unwritten.iter().any(|w| w.value() == Some(&10));
            assert!(written || returned, "the accepted put was lost");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Model 5: read-through against put / remove on the same key.
// ---------------------------------------------------------------------------------------

/// A value loaded from the store never overwrites a newer put: after both calls returned the
/// cache answers with the put's value, and the get saw either the old or the new value.
#[test]
fn read_through_vs_put() {
    loom::model(|| {
        let store = store();
        store.memory().insert(5, 1); // the store's row, version 0
        let cache = Arc::new(cache(&store));
        let c1 = cache.clone();
        let reader = thread::spawn(move || c1.get(&5).unwrap());
        cache.put(5, 2).unwrap();
        let seen = reader.join().unwrap();
        assert!(matches!(seen, Some(1) | Some(2)), "get saw {seen:?}");
        assert_eq!(
            cache.get(&5).unwrap(),
            Some(2),
            "a loaded value overwrote a newer put"
        );
        cache.flush().unwrap();
        assert_eq!(store.memory().get(&5), Some(2));
    });
}

/// A read-through racing a delete that is written and leaves the table (the tombstone is
/// dropped once persisted): the stale loaded value must not come back.
#[test]
fn read_through_vs_persisted_remove() {
    loom::model(|| read_through_vs_persisted_remove_then_get(true));
}

/// A get that begins after a remove was written (the tombstone persisted and dropped) must
/// not follow a load that began before the remove: that load may have read the removed row.
/// Unlike `read_through_vs_persisted_remove`, the reader is still in flight when this
/// thread's get misses. (A load that stayed joinable once marked stale would answer the
/// removed row.)
#[test]
fn a_get_after_a_persisted_remove_does_not_follow_an_older_load() {
    loom::model(|| read_through_vs_persisted_remove_then_get(false));
}

/// A reader gets key 5 (a miss: it loads the row) while this thread removes the key and
/// flushes (the tombstone leaves the table), then gets it itself, after joining the reader
/// or while it may still be in flight. The reader sees the row or nothing; this thread's get
/// began after the remove was written, so it sees nothing.
fn read_through_vs_persisted_remove_then_get(join_reader_first: bool) {
    let store = store();
    store.memory().insert(5, 1);
    let cache = Arc::new(cache(&store));
    let c1 = cache.clone();
    let reader = thread::spawn(move || c1.get(&5).unwrap());
    cache.remove(&5).unwrap();
    cache.flush().unwrap();
    let reader = if join_reader_first {
        let seen = reader.join().unwrap();
        assert!(matches!(seen, Some(1) | None), "get saw {seen:?}");
        None
    } else {
        Some(reader)
    };
    assert_eq!(
        cache.get(&5).unwrap(),
        None,
        "a get that began after the remove was written saw the removed value"
    );
    if let Some(reader) = reader {
        let seen = reader.join().unwrap();
        assert!(matches!(seen, Some(1) | None), "get saw {seen:?}");
    }
    assert_eq!(store.memory().get(&5), None);
}

// ---------------------------------------------------------------------------------------
// Model 6: write-throughs of one key.
// ---------------------------------------------------------------------------------------

/// A put and a remove of one key written through on two threads: the second to start waits
/// at the key's mark until the first is back from the store, so the store receives the
/// key's versions in order and the cache ends with the store's answer. (Without the mark, the
/// remove could reach the store first and the put's value stay cached though the store
/// ignored it as older.)
#[test]
fn two_write_throughs_of_one_key() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(
            model_builder(&store)
                .write_mode(WriteMode::Through)
                .build()
                .expect("valid model configuration"),
        );
        let c = cache.clone();
        let writer = thread::spawn(move || c.put(9, 1).unwrap());
        cache.remove(&9).unwrap();
        writer.join().unwrap();
        assert_versions_grow(&store);
        assert_eq!(
            cache.get(&9).unwrap(),
            store.memory().get(&9),
            "cache and store agree"
        );
    });
}

/// A switch to `WriteMode::Through` while key 9's write-behind value is pending: a flusher
/// step, the switch (which flushes) and a put of key 9 run on three threads. Whichever mode
/// the put sees, the store receives key 9's versions in order (a write-through of a key with
/// write-behind work pending holds the flusher's core, so no batch with the older version is
/// at the store meanwhile), and after a final flush the store holds what the cache answers.
#[test]
fn a_put_across_a_switch_to_write_through_vs_a_step() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        cache.put(9, 1).unwrap();
        let c = cache.clone();
        let step = thread::spawn(move || c.flush_step().unwrap());
        let c = cache.clone();
        let switch = thread::spawn(move || c.set_write_mode(WriteMode::Through).unwrap());
        cache.put(9, 2).unwrap();
        step.join().unwrap();
        switch.join().unwrap();
        cache.flush().unwrap();
        assert_versions_grow(&store);
        assert_eq!(cache.get(&9).unwrap(), Some(2));
        assert_eq!(store.memory().get(&9), Some(2), "store and cache agree");
    });
}

// ---------------------------------------------------------------------------------------
// A local write (ReadOnly) against a failing batch of an older write of its key.
// ---------------------------------------------------------------------------------------

/// Key 1 has a write-behind write waiting after failed flushes when the cache switches to
/// `ReadOnly`. A writer writes key 1 locally while `flush` sends the old write in a batch that
/// fails: whichever comes first (the local write before the snapshot, or between the snapshot
/// and the failure), the local value never reaches the store, and the old write is not sent
/// after the local one superseded it.
#[test]
fn a_local_write_against_a_failing_batch_of_its_key() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        cache.put(1, 10).unwrap();
        store.set_down(true);
        assert!(cache.set_write_mode(WriteMode::ReadOnly).is_err());
        store.heal();
        store.fail_next(1);
        let c1 = cache.clone();
        let writer = thread::spawn(move || {
            c1.put(1, 20).unwrap();
        });
        let _ = cache.flush();
        writer.join().unwrap();
        store.heal();
        let _ = cache.flush();
        for call in store.calls() {
            for w in &call.batch {
                assert_ne!(w.value(), Some(&20), "a local write reached the store");
            }
        }
        assert!(matches!(store.memory().get(&1), None | Some(10)));
        assert_eq!(cache.get(&1).unwrap(), Some(20), "read your (local) writes");
        assert_versions_grow(&store);
    });
}

// ---------------------------------------------------------------------------------------
// Lock-free reads: a hit on a key in its shard's read slot takes no lock; it copies the slot
// under its sequence count (docs/ARCHITECTURE.md, "Lock-free reads"). A slot is written only
// under the shard lock: a locked hit installs its entry, every change or removal of the key
// clears it first. Under the model a slot's key and value are each two atomic half-words,
// stored and loaded one after the other, so a torn copy is visible. Each model first reads
// the key once under the lock, which installs it in its slot.
// ---------------------------------------------------------------------------------------

/// A model cache whose key 1 holds `value`, copied into its read slot by a locked get.
fn slotted(store: &Store, value: u64) -> Arc<Cache<u64, u64>> {
    let cache = Arc::new(cache(store));
    cache.put(1, value).unwrap();
    assert_eq!(cache.get(&1).unwrap(), Some(value));
    cache
}

/// The position of `seen` in the order the model wrote the key's values.
fn position(order: &[Option<u64>], seen: Option<u64>) -> usize {
    order
        .iter()
        .position(|v| *v == seen)
        .unwrap_or_else(|| panic!("get returned {seen:?}, which no write stored: {order:?}"))
}

/// Two gets racing an update and a remove of their key: each answers a value some write
/// stored, the second never an older one than the first, and afterwards `None`.
#[test]
fn lock_free_get_vs_put_and_remove() {
    loom::model(|| {
        let store = store();
        let cache = slotted(&store, 10);
        let c1 = cache.clone();
        let reader = thread::spawn(move || (c1.get(&1).unwrap(), c1.get(&1).unwrap()));
        cache.put(1, 20).unwrap();
        cache.remove(&1).unwrap();
        let (first, second) = reader.join().unwrap();
        let order = [Some(10), Some(20), None];
        assert!(
            position(&order, first) <= position(&order, second),
            "went back: {first:?} then {second:?}"
        );
        assert_eq!(cache.get(&1).unwrap(), None, "read your writes");
    });
}

/// A get racing updates of its key, each read back under the lock (which installs it in the
/// slot while the racing get may be copying the slot), with values whose halves are equal: a
/// get that the count let through mid-install would return unequal halves.
#[test]
fn lock_free_get_never_tears_a_value() {
    fn value(n: u64) -> u64 {
        n | (n << 32)
    }
    loom::model(|| {
        let store = store();
        let cache = slotted(&store, value(1));
        let c1 = cache.clone();
        let reader = thread::spawn(move || c1.get(&1).unwrap());
        cache.put(1, value(2)).unwrap();
        assert_eq!(cache.get(&1).unwrap(), Some(value(2)));
        let seen = reader.join().unwrap().expect("key 1 holds a value");
        assert_eq!(seen as u32, (seen >> 32) as u32, "a torn value: {seen:#x}");
    });
}

/// A get racing the eviction of its clean key by the insert of another (capacity 1): the
/// value comes from the slot, the table or, once the entry left, the store; never `None`.
#[test]
fn lock_free_get_vs_eviction() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(
            model_builder(&store)
                .capacity(1)
                .build()
                .expect("valid model configuration"),
        );
        cache.put(1, 10).unwrap();
        cache.flush().unwrap();
        assert_eq!(cache.get(&1).unwrap(), Some(10));
        let c1 = cache.clone();
        let reader = thread::spawn(move || c1.get(&1).unwrap());
        cache.put(2, 20).unwrap();
        assert_eq!(reader.join().unwrap(), Some(10));
    });
}

/// A get racing an insert that grows the shard's slot array, then an update of the key it
/// reads: it answers the old or the new value, whichever array it read.
#[test]
fn lock_free_get_vs_slot_array_growth() {
    loom::model(|| {
        let store = store();
        let cache = Arc::new(cache(&store));
        // Sixteen keys fill the first array: the seventeenth grows it.
        for k in 0..16 {
            cache.put(k, k).unwrap();
        }
        assert_eq!(cache.get(&3).unwrap(), Some(3));
        let c1 = cache.clone();
        let reader = thread::spawn(move || c1.get(&3).unwrap());
        cache.put(16, 16).unwrap();
        cache.put(3, 30).unwrap();
        let seen = reader.join().unwrap();
        assert!(matches!(seen, Some(3) | Some(30)), "get saw {seen:?}");
        assert_eq!(cache.get(&3).unwrap(), Some(30));
    });
}

/// A get of a key in its slot racing the flusher's snapshot, write and acknowledgement of
/// the key: the value stays readable throughout, and the store ends with it.
#[test]
fn lock_free_get_vs_flush() {
    loom::model(|| {
        let store = store();
        let cache = slotted(&store, 10);
        let c1 = cache.clone();
        let reader = thread::spawn(move || c1.get(&1).unwrap());
        cache.flush().unwrap();
        assert_eq!(reader.join().unwrap(), Some(10));
        assert_eq!(store.memory().get(&1), Some(10));
    });
}
