//! Unit tests of the shard: the table's protocol, one operation at a time.

use super::durability::*;
use super::entry::*;
use super::inflight::*;
use super::policy::*;
use super::table::*;
use super::*;
use crate::store::Write;
use crate::sync::atomic::Ordering;
use crate::sync::Arc;
use hashbrown::HashTable;

/// The table takes the hash from the caller; it must be the table's own hasher's (the
/// table rehashes with it when it grows).
fn hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(1, 2, 3, 4)
}

fn h(k: u64) -> u64 {
    hasher().hash_one(k)
}

const UNBOUNDED: Limits = Limits {
    capacity: usize::MAX,
    max_weight: u64::MAX,
    ttl: 0,
    tti: 0,
    negative_ttl: 0,
    refresh_after: 0,
    weighted: false,
    per_entry: false,
};

fn table() -> Table<u64, u64> {
    Table::new(100, UNBOUNDED, hasher())
}

/// A put in `epoch` (the open epoch moves there first, as the flusher would move it).
fn put(t: &mut Table<u64, u64>, k: u64, v: u64, epoch: u16) -> bool {
    t.epoch = epoch;
    t.write(h(k), k, Some(v), 0, 1).ring_key.is_some()
}

fn del(t: &mut Table<u64, u64>, k: u64, epoch: u16) {
    t.epoch = epoch;
    t.write(h(k), k, None, 0, 1);
}

/// `Some(v)` for a hit (`v` is `None` for a pending delete), `None` for a miss.
fn look(t: &mut Table<u64, u64>, k: u64) -> Option<Option<u64>> {
    match t.get(h(k), &k, 0) {
        Lookup::Hit(v) => Some(v),
        Lookup::HitRefresh(v, _) => Some(Some(v)),
        Lookup::Miss => None,
    }
}

/// A whole read-through: lead the load, then finish it with `loaded`.
fn load(t: &mut Table<u64, u64>, k: u64, loaded: Option<u64>) -> Option<u64> {
    let slot = lead(t, k);
    t.finish_load(h(k), &k, &slot, loaded, 0, 1).0
}

/// Joins the load of `k` as its leader (the test fails if a load was in flight).
fn lead(t: &mut Table<u64, u64>, k: u64) -> Arc<LoadSlot<u64>> {
    match t.join_load(h(k), &k) {
        LoadRole::Leader(slot) => slot,
        LoadRole::Follower(_) => panic!("a load of {k} was in flight"),
    }
}

#[test]
fn first_write_in_an_epoch_pushes_later_ones_conflate() {
    let mut t = table();
    assert!(put(&mut t, 1, 10, 1), "a new key goes on the ring");
    assert!(!put(&mut t, 1, 11, 1), "same epoch: conflated");
    assert_eq!(t.counters().conflated, 1);
    assert!(put(&mut t, 1, 12, 2), "next epoch: pushed again");
    assert_eq!(look(&mut t, 1), Some(Some(12)));
    assert_eq!((t.len(0), t.dirty), (1, 1));
    assert_eq!(t.next_version, 103, "one version per write");
    assert_eq!(
        t.unsent_of(h(1), &1),
        100,
        "the oldest unsent version is kept"
    );
}

/// The put count is derived from the versions handed out (`Table::counters`): every
/// kind of write must land in the right count.
#[test]
fn counters_follow_every_kind_of_write() {
    let mut t = table();
    assert!(put(&mut t, 1, 10, 1), "new key: queued");
    assert!(!put(&mut t, 1, 11, 1), "conflated");
    del(&mut t, 1, 1); // a remove that conflates
    del(&mut t, 2, 1); // a remove of a key not cached: queued
    assert!(put(&mut t, 1, 12, 2), "next epoch: queued");
    let _ = t.next_version(); // a write-through the store failed: not counted
    let _ = t.next_version(); // a write-through put the store took
    t.count_write_through(false);
    let _ = t.next_version(); // a write-through remove the store took
    t.count_write_through(true);
    t.set_local(h(3), 3, Some(30), 0, 1); // read-only mode: a put, never conflated
    t.set_local(h(3), 3, Some(31), 0, 1);
    assert!(!put(&mut t, 1, 13, 2), "conflated after the other writes");
    let c = t.counters();
    assert_eq!(c.puts, 7, "puts through write, set_local and write-through");
    assert_eq!(c.removes, 3);
    assert_eq!(
        c.conflated, 3,
        "two puts and one remove found their key queued"
    );
    assert_eq!(t.next_version, 111, "one version per write of any kind");
}

#[test]
fn take_snapshots_the_latest_value_and_marks_in_flight() {
    let mut t = table();
    put(&mut t, 1, 10, 1);
    put(&mut t, 1, 11, 1);
    let snap = t.take(h(1), &1, false).unwrap().expect("dirty key");
    assert_eq!(
        snap.write,
        Write::Put {
            key: 1,
            value: 11,
            version: 101
        }
    );
    assert_eq!(snap.first, 100);
    assert!(
        t.take(h(1), &1, false).unwrap().is_none(),
        "in flight: not taken twice"
    );
    assert!(t.persisted(h(1), &1, 101, 0));
    assert_eq!(t.dirty, 0);
    assert_eq!(t.unsent_of(h(1), &1), NONE);
    assert_eq!(
        look(&mut t, 1),
        Some(Some(11)),
        "a clean entry stays cached"
    );
}

/// Epoch tags are 16 bits: 65,535 closes later the open epoch has the tag a queued entry
/// still carries. A write then conflates into it, and the pending take carries that
/// write, as it does for any write that conflates.
#[test]
fn an_epoch_tag_that_comes_round_again_conflates_into_the_pending_take() {
    let mut t = table();
    assert!(put(&mut t, 1, 10, 1));
    for _ in 0..u16::MAX {
        t.close_epoch();
        assert_ne!(t.epoch, NOT_QUEUED, "NOT_QUEUED is never an open epoch");
    }
    assert_eq!(t.epoch, 1, "the tags 1..=65535 came round");
    let w = t.write(h(1), 1, Some(11), 0, 1);
    assert!(w.ring_key.is_none(), "the same tag: conflated");
    let snap = t
        .take(h(1), &1, false)
        .unwrap()
        .expect("the take the queued key is waiting for");
    assert_eq!((snap.write.value(), snap.first), (Some(&11), 100));
    assert!(
        t.write(h(1), 1, Some(12), 0, 1).ring_key.is_some(),
        "after the take a write pushes again, whatever the tag"
    );
}

/// The early-drain race: a key pushed in the open epoch and drained early must be pushed
/// again by a later write in that same epoch, or that write never reaches the ring.
#[test]
fn a_write_after_take_in_the_same_epoch_pushes_again() {
    let mut t = table();
    assert!(put(&mut t, 1, 10, 2));
    let snap = t.take(h(1), &1, false).unwrap().unwrap();
    assert!(put(&mut t, 1, 11, 2), "the key must go on the ring again");
    assert!(
        !t.persisted(h(1), &1, snap.write.version(), 0),
        "a newer write keeps the entry dirty"
    );
    assert_eq!(t.dirty, 1);
    let again = t.take(h(1), &1, false).unwrap().unwrap();
    assert_eq!(again.write.value(), Some(&11));
    assert!(t.persisted(h(1), &1, again.write.version(), 0));
    assert_eq!(t.dirty, 0);
}

#[test]
fn persisted_delete_drops_the_tombstone() {
    let mut t = table();
    put(&mut t, 1, 10, 1);
    del(&mut t, 1, 1);
    assert_eq!(t.len(0), 0, "a tombstone is not a live entry");
    assert_eq!(look(&mut t, 1), Some(None), "a pending delete answers None");
    assert!(!t.contains(h(1), &1, 0));
    let snap = t.take(h(1), &1, false).unwrap().unwrap();
    assert!(snap.write.is_delete());
    assert!(t.persisted(h(1), &1, snap.write.version(), 0));
    assert_eq!(look(&mut t, 1), None, "the entry left the table");
    assert_eq!((t.dirty, t.tombstones), (0, 0));
}

#[test]
fn retry_keeps_ownership_and_the_oldest_version() {
    let mut t = table();
    put(&mut t, 1, 10, 1);
    let snap = t.take(h(1), &1, false).unwrap().unwrap();
    t.retry_later(h(1), &1, snap.first);
    assert_eq!(t.unsent_of(h(1), &1), 100);
    put(&mut t, 1, 11, 2);
    assert!(
        t.take(h(1), &1, false).unwrap().is_none(),
        "the retry list owns the key; a ring entry must not send it too"
    );
    let retried = t
        .take(h(1), &1, true)
        .unwrap()
        .expect("the retry list takes it");
    assert_eq!(
        retried.first, 100,
        "the retry covers the first failed version"
    );
    assert_eq!(retried.write.version(), 101, "and carries the latest value");
    assert!(t.persisted(h(1), &1, 101, 0));
    assert_eq!(t.dirty, 0);
    // A retry of a key that has nothing unsent any more just releases it.
    put(&mut t, 2, 20, 3);
    let s2 = t.take(h(2), &2, false).unwrap().unwrap();
    assert!(t.persisted(h(2), &2, s2.write.version(), 0));
    assert!(t.take(h(2), &2, true).unwrap().is_none());
    assert_eq!(t.dirty, 0);
}

#[test]
fn abandon_cleans_or_keeps_a_newer_write() {
    let mut t = table();
    put(&mut t, 1, 10, 1);
    let v1 = t.take(h(1), &1, false).unwrap().unwrap().write.version();
    t.abandon(h(1), &1, v1);
    assert_eq!(t.dirty, 0);
    assert_eq!(look(&mut t, 1), None, "a given-up value leaves memory");
    assert_eq!(t.durable(h(1), &1, v1), Durability::GivenUp);

    del(&mut t, 2, 1);
    let v2 = t.take(h(2), &2, false).unwrap().unwrap().write.version();
    t.abandon(h(2), &2, v2);
    assert_eq!(look(&mut t, 2), None, "an abandoned tombstone is dropped");
    assert_eq!(t.durable(h(2), &2, v2), Durability::GivenUp);

    put(&mut t, 3, 30, 1);
    let v3 = t.take(h(3), &3, false).unwrap().unwrap().write.version();
    put(&mut t, 3, 31, 1);
    t.abandon(h(3), &3, v3);
    assert_eq!(t.dirty, 1, "the newer write still goes to the store");
    assert!(t.take(h(3), &3, false).unwrap().is_some());
}

#[test]
fn loaded_values_never_shadow_writes() {
    let mut t = table();
    // A write that happened while the load ran wins.
    let slot = lead(&mut t, 1);
    put(&mut t, 1, 10, 1);
    assert_eq!(
        t.finish_load(h(1), &1, &slot, Some(5), 0, 1),
        (Some(10), false)
    );
    // A pending delete wins too.
    let slot = lead(&mut t, 2);
    del(&mut t, 2, 1);
    assert_eq!(t.finish_load(h(2), &2, &slot, Some(5), 0, 1), (None, false));
    // A second miss of a key being loaded follows the first.
    let slot = lead(&mut t, 5);
    assert!(matches!(t.join_load(h(5), &5), LoadRole::Follower(_)));
    t.abort_load(h(5), &5, &slot);
    // A delete that came and went while the load ran: answered but not cached.
    let slot = lead(&mut t, 2);
    let s = t.take(h(2), &2, false).unwrap().unwrap();
    t.persisted(h(2), &2, s.write.version(), 0);
    assert_eq!(
        t.finish_load(h(2), &2, &slot, Some(5), 0, 1),
        (Some(5), false)
    );
    assert_eq!(
        look(&mut t, 2),
        None,
        "the possibly stale load was not cached"
    );
    // An undisturbed load is cached clean.
    assert_eq!(load(&mut t, 3, Some(7)), Some(7));
    assert_eq!(look(&mut t, 3), Some(Some(7)));
    assert_eq!(t.dirty, 1, "loaded entries are clean");
    // A loaded value (version 0) never replaces a write.
    assert_eq!(t.fill_clean(h(1), 1, 99, 0, 0, 1), Some(10));
}

/// A miss after a write of the key starts its own load: following a load that began
/// before the write could answer with the value the write replaced (a get that began
/// after a remove returning the removed value). The first load, finished later, neither
/// caches its result nor takes the second one out of the table.
#[test]
fn a_miss_after_a_write_does_not_follow_the_older_load() {
    let mut t = table();
    let first = lead(&mut t, 4);
    assert!(matches!(t.join_load(h(4), &4), LoadRole::Follower(_)));
    // A remove that came and went (written through, or a tombstone persisted and
    // dropped): the key is absent from memory again.
    del(&mut t, 4, 1);
    let s = t.take(h(4), &4, false).unwrap().unwrap();
    assert!(t.persisted(h(4), &4, s.write.version(), 0));
    assert_eq!(look(&mut t, 4), None, "the tombstone left");
    let second = lead(&mut t, 4);
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(
        t.finish_load(h(4), &4, &first, Some(40), 0, 1),
        (Some(40), false),
        "the first load's callers get what it read"
    );
    assert_eq!(look(&mut t, 4), None, "but it is not cached");
    assert!(
        matches!(t.join_load(h(4), &4), LoadRole::Follower(_)),
        "the second load is still in flight"
    );
    t.abort_load(h(4), &4, &first);
    assert!(
        matches!(t.join_load(h(4), &4), LoadRole::Follower(_)),
        "only its own leader takes a load out"
    );
    assert_eq!(t.finish_load(h(4), &4, &second, None, 0, 1), (None, false));
    assert!(matches!(t.join_load(h(4), &4), LoadRole::Leader(_)));
}

#[test]
fn scan_and_unwritten_list_the_dirty_entries() {
    let mut t = table();
    put(&mut t, 1, 10, 1);
    put(&mut t, 2, 20, 1);
    del(&mut t, 3, 1);
    load(&mut t, 4, Some(40));
    t.take(h(2), &2, false).unwrap().unwrap(); // in flight: not the scan's, but still unwritten
    let mut scanned = Vec::new();
    t.scan_dirty(&mut scanned);
    scanned.sort_unstable();
    assert_eq!(scanned, vec![1, 3]);
    let mut unwritten = Vec::new();
    t.unwritten(&mut unwritten);
    let mut keys: Vec<u64> = unwritten.iter().map(|w| *w.key()).collect();
    keys.sort_unstable();
    assert_eq!(keys, vec![1, 2, 3]);
}

/// The shard's lock-free handshake, with a real writer thread against a draining thread:
/// after both finish and a final drain, no dirty key is missing from the drained set.
/// (Under Miri this also checks the ring's unsafe code for data races.)
#[test]
fn shard_writer_vs_drainer_loses_no_dirty_key() {
    use std::sync::Arc;
    let rounds = if cfg!(miri) { 5 } else { 2_000 };
    for round in 0..if cfg!(miri) { 2 } else { 20 } {
        let shard = Arc::new(Shard::<u64, u64>::new(1, 4, UNBOUNDED, hasher()));
        // Every other round starts at the last epoch tag, so the tags wrap while the
        // writer runs (the first close goes from 65,535 to 1).
        let wraps = round % 2 == 1;
        if wraps {
            shard.table.lock().epoch = u16::MAX;
        }
        let s2 = shard.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..rounds {
                let k = i % 3;
                let mut t = s2.table.lock();
                let out = t.write(h(k), k, Some(i), 0, 1);
                // As the cache does: the push (or the flag) before the unlock.
                if let Some(key) = out.ring_key {
                    if s2.ring.push(key).is_err() {
                        s2.overflow.store(true, Ordering::SeqCst);
                    }
                }
                drop(t);
            }
        });
        let mut persisted = 0;
        let flush = |shard: &Shard<u64, u64>, persisted: &mut u64| {
            shard.table.lock().close_epoch();
            let mut keys = Vec::new();
            shard.ring.drain_into(&mut keys, false);
            let mut t = shard.table.lock();
            if shard.overflow.swap(false, Ordering::SeqCst) {
                t.scan_dirty(&mut keys);
            }
            for k in keys {
                if let Some(s) = t.take(h(k), &k, false).unwrap() {
                    t.persisted(h(k), &k, s.write.version(), 0);
                    *persisted += 1;
                }
            }
        };
        while !writer.is_finished() {
            flush(&shard, &mut persisted);
            std::thread::yield_now();
        }
        writer.join().unwrap();
        flush(&shard, &mut persisted);
        assert_eq!(shard.table.lock().dirty, 0, "a dirty key was on no ring");
        assert!(persisted > 0);
        if wraps {
            assert_ne!(shard.table.lock().epoch, u16::MAX, "the tags wrapped");
        }
    }
}

/// S3-FIFO: a key read while in the small queue goes on to the main queue when its turn
/// to leave comes; the unread keys around it are evicted. (The frequency lives in the
/// entry's `bits` beside the queue flag.)
#[test]
fn a_read_key_survives_the_small_queue_and_leaves_main_when_cold() {
    let bounded = Limits {
        capacity: 4,
        ..UNBOUNDED
    };
    let mut t = Table::new(100, bounded, hasher());
    for k in 0..4 {
        t.fill_clean(h(k), k, k, 1, 0, 1);
    }
    assert_eq!(look(&mut t, 0), Some(Some(0)));
    for k in 4..8 {
        t.fill_clean(h(k), k, k, 1, 0, 1);
    }
    assert!(t.contains(h(0), &0, 0), "the key that was read stays");
    assert!(
        !t.contains(h(1), &1, 0),
        "an unread key of its time is evicted"
    );
    assert_eq!(t.len(0), 4);
    // New keys, each read once, follow it into the main queue; never read again, it
    // leaves the main queue in its turn.
    for k in 8..40 {
        t.fill_clean(h(k), k, k, 1, 0, 1);
        assert_eq!(look(&mut t, k), Some(Some(k)));
    }
    assert!(
        !t.contains(h(0), &0, 0),
        "the main queue evicts it once it goes cold"
    );
    assert_eq!(t.len(0), 4);
}

/// The table holds only what a hit and an update touch.
#[test]
fn entry_parts_keep_what_a_get_and_a_put_touch_in_48_bytes() {
    assert_eq!(std::mem::size_of::<Entry<u64, u64>>(), 48);
    assert_eq!(std::mem::size_of::<Side>(), 24);
}

/// Slots of the cold and side vectors are reused: a table that churns through keys keeps
/// them at their peak size, and every entry keeps its own slot's state.
#[test]
fn side_slots_are_reused_after_removal() {
    let mut t = table();
    for round in 0..10u64 {
        for k in 0..100u64 {
            t.fill_clean(h(k), k, k + round, 1 + round, 0, k as u32 + 1);
        }
        // Remove every third key, then check that the rest kept their values and slots.
        for k in (0..100u64).step_by(3) {
            t.remove_clean(h(k), &k, 1_000, 1);
        }
        assert_eq!(t.len(0), 66);
        for k in 0..100u64 {
            let want = (k % 3 != 0).then_some(Some(k + round));
            assert_eq!(look(&mut t, k), want, "key {k} in round {round}");
            if k % 3 != 0 {
                let slot = t.find(h(k), &k).expect("present").slot as usize;
                assert_eq!(t.side[slot].weight, k as u32 + 1, "key {k}'s own slot");
            }
        }
        for k in 0..100u64 {
            t.remove_clean(h(k), &k, 1_000, 1);
        }
        assert_eq!((t.len(0), t.map.len()), (0, 0));
    }
    assert_eq!(
        (t.side.len(), t.free.len()),
        (100, 100),
        "ten rounds of 100 keys reuse 100 slots"
    );
}

/// A tombstone holds no value, and replacing values drops each exactly once (Miri checks
/// the uninitialised slot is never read; the counter checks the drops).
#[test]
fn tombstones_and_replaced_values_drop_exactly_once() {
    use std::sync::atomic::{AtomicUsize, Ordering as O};
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    #[derive(Debug, PartialEq)]
    struct Counted(u64);
    impl Counted {
        fn new(v: u64) -> Self {
            LIVE.fetch_add(1, O::SeqCst);
            Counted(v)
        }
    }
    impl Clone for Counted {
        fn clone(&self) -> Self {
            Counted::new(self.0)
        }
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, O::SeqCst);
        }
    }
    {
        let mut t: Table<u64, Counted> = Table::new(100, UNBOUNDED, hasher());
        let put = |t: &mut Table<u64, Counted>, k: u64, v: Option<u64>| {
            t.write(h(k), k, v.map(Counted::new), 0, 1).old
        };
        assert_eq!(put(&mut t, 1, Some(10)), None);
        assert_eq!(put(&mut t, 1, None), Some(Counted::new(10)));
        assert_eq!(
            put(&mut t, 1, None),
            None,
            "a tombstone replaced by a tombstone"
        );
        assert_eq!(put(&mut t, 1, Some(11)), None);
        assert_eq!(put(&mut t, 2, None), None);
        assert_eq!(put(&mut t, 3, Some(30)), None);
        assert!(matches!(t.get(h(2), &2, 0), Lookup::Hit(None)));
        assert!(matches!(t.get(h(1), &1, 0), Lookup::Hit(Some(Counted(11)))));
        assert_eq!(LIVE.load(O::SeqCst), 2, "the values of keys 1 and 3");
        let mut out = Vec::new();
        t.unwritten(&mut out);
        assert_eq!(out.len(), 3);
        drop(out);
        // Key 1's snapshot, persisted: clean and kept; key 2's tombstone goes.
        for k in [1u64, 2] {
            let s = t.take(h(k), &k, false).unwrap().expect("dirty");
            assert!(t.persisted(h(k), &k, s.write.version(), 0));
        }
        assert_eq!((t.len(0), t.map.len()), (2, 2));
        assert_eq!(LIVE.load(O::SeqCst), 2);
    }
    assert_eq!(
        LIVE.load(O::SeqCst),
        0,
        "dropping the table dropped every value"
    );
}

#[test]
fn shard_stride_is_an_odd_multiple_of_128() {
    for size in [
        std::mem::size_of::<Shard<u64, u64>>(),
        std::mem::size_of::<Shard<String, Vec<u8>>>(),
    ] {
        assert_eq!(size % 128, 0, "CachePadded aligns shards to 128 bytes");
        assert_eq!(
            (size / 128) % 2,
            1,
            "a shard of {size} bytes: power-of-two-ish stride"
        );
    }
}

/// The lock word and what a hit touches share the shard's first cache line; the rest of
/// the put path the second.
#[test]
fn hot_fields_share_the_first_cache_lines() {
    let m: CachePadded<Mutex<Table<u64, u64>>> = CachePadded::new(Mutex::new(table()));
    let base = &*m as *const Mutex<Table<u64, u64>> as usize;
    let g = m.lock();
    let t: &Table<u64, u64> = &g;
    let at = |f: usize| f - base;
    assert_eq!(at(t as *const _ as usize), 8, "the raw lock comes first");
    assert_eq!(
        at(&t.map as *const _ as usize),
        8,
        "the table header follows it"
    );
    let first = [
        at(&t.hits as *const u64 as usize) + 8,
        at(&t.next_version as *const u64 as usize) + 8,
        at(&t.conflated as *const u64 as usize) + 8,
    ];
    assert!(
        first.iter().all(|&e| e <= 64),
        "lock, header, hits, next_version, conflated: one line"
    );
    let second = [
        at(&t.dirty as *const u32 as usize) + 4,
        at(&t.epoch as *const u16 as usize) + 2,
        at(&t.pressured as *const bool as usize) + 1,
        at(&t.write_side as *const bool as usize) + 1,
        at(&t.loading as *const _ as usize) + std::mem::size_of::<HashTable<u64>>(),
    ];
    assert!(
        at(&t.dirty as *const u32 as usize) >= 64 && second.iter().all(|&e| e <= 128),
        "the rest of the put path: the second line"
    );
}

/// Put/remove churn under capacity leaves stale positions in the eviction queues, which
/// `enforce` (over capacity only) never pops: the table compacts them as it goes.
#[test]
fn eviction_queues_stay_bounded_under_churn_below_capacity() {
    let limits = Limits {
        capacity: 1000,
        ..UNBOUNDED
    };
    let mut t: Table<u64, u64> = Table::new(100, limits, hasher());
    let rounds = if cfg!(miri) { 2_000 } else { 100_000u64 };
    for i in 0..rounds {
        let k = i % 10;
        t.write(h(k), k, Some(i), 0, 1);
        if let Ok(Some(s)) = t.take(h(k), &k, false) {
            assert!(t.persisted(h(k), &k, s.write.version(), 0));
        }
        // A finished delete leaves memory; the next put of the key inserts it again.
        t.write(h(k), k, None, 0, 1);
        let s = t.take(h(k), &k, false).unwrap().unwrap();
        assert!(t.persisted(h(k), &k, s.write.version(), 0));
    }
    let positions = t.queues.small.len() + t.queues.main.len();
    assert!(
        positions <= 2 * t.map.len() + 64,
        "{positions} queue positions for {} entries",
        t.map.len()
    );
}
