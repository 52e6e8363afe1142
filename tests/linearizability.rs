//! Per-key linearizability with real threads and background flushers.
//!
//! Threads put, remove and get a handful of shared keys while the flushers write them to a
//! store that fails some batches. Every call is stamped with a global logical clock taken just
//! before and just after it, so "A returned before B began" is `a.end < b.start`. Every value
//! written is unique, so each `get` names the write it observed (`None`: a remove or the
//! initial absence). A `get` is accepted if the write it saw
//! 1. had begun before the get returned (no reads from the future), and
//! 2. had not been overwritten by a write that began after it returned and itself returned
//!    before the get began (no stale reads).
//!
//!
//! These are the two conditions that define linearizability of one register when every write
//! is distinct and every read is checked on its own; they are the ones a cache can break
//! (a stale store value shadowing a newer write, a lost pending delete).
//! A third of the reads go through `get_all`. Besides the healthy and the failing store, the
//! same run is checked with eviction, expiry and refresh-ahead, key-ordered batches,
//! write-through and blocking backpressure (`run_with`).
//! Now and then a thread calls `flush()` and then reads every key's row from the store: by the
//! barrier, each row must be a value current at some point since the flush began, which is
//! the same check with the read spanning `[flush start, store read end]`.
//! The store's log is checked too: per key, the versions it received never go down. After a
//! final flush, each key's row and cached value are checked as one more read that begins
//! after every call returned.
//!
//! Switching modes. In `run_switching_modes` the workers also switch the write mode between
//! `Behind` and `Through` now and then (`Switcher`), so write-behind batches and
//! write-throughs of the same keys meet at the store. A switch from `Behind` flushes and is
//! checked as a flush barrier. The cache writes to the store through `LoggedStore`, which
//! tells the write-throughs (store calls made on a worker thread) from the flushers'
//! batches: the runs count both, and the version-order check leaves out the write-throughs
//! the store failed (they took no effect, and the key's older write-behind version, still
//! pending, is sent after them).
//!
//! Writes that fail. With write-through (`WriteMode::Through`, or
//! `Backpressure::WriteThrough` once a shard is at its `max_dirty` share) a writer calls the
//! store itself, and when the store fails, `put` / `remove` return `Error::Store` and the
//! cache keeps its previous value. A write that returned an error is recorded as
//! `Kind::FailedWrite` and the checker treats it as a write that never took effect: it
//! explains no read, it overwrites nothing, and a get or store read that returns its value
//! is rejected. That rule is exact here because of how the store fails:
//! `FaultyStore::fail_with_probability` fails a whole `write_all` call with
//! `BatchError::Unavailable` before it applies any record (its log says
//! `Outcome::Unavailable`, "nothing was applied"), and the write-through path returns the
//! error without caching or queueing the write. The store contract is weaker
//! (`BatchError::Unavailable` allows "nothing, or an unknown part" to have been applied); a
//! store that may apply part of a failed batch would need the looser rule "takes effect at
//! some point after it began, or never", which this checker does not implement. A failed
//! remove is invisible to reads (`None` names no write), so it only drops out of the
//! candidates that may explain a `None`.
//! Only the failure the configuration allows is tolerated: `Error::Store` carrying the
//! injected `StoreError::Unavailable`, and only in runs that ask for it
//! (`run_with_failing_writes`, `run_switching_modes` on the failing store). Any other error
//! (`Closed`, `Backpressure`, another store error) fails the test, and so does any error of
//! a mode switch (`Switcher::switch` says why none is legitimate here).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use writebehind::testing::{FaultyStore, Rng};
use writebehind::{
    Backpressure, BatchError, Builder, Cache, Error, Store, StoreError, Write, WriteMode,
};

const KEYS: u64 = 4;
const THREADS: u64 = 4;
/// The error text of a `write_all` call that `FaultyStore::fail_with_probability` failed.
const INJECTED_FAILURE: &str = "faulty store: injected unavailability";

thread_local! {
    /// Set on the worker threads: a store write made on one of them is a write-through
    /// (workers never run a flusher step; their `flush()` waits for the flusher threads).
    static WORKER: Cell<bool> = const { Cell::new(false) };
}

/// One `write_all` call as `LoggedStore` saw it.
struct LoggedCall {
    /// (key, version) of each record, in batch order.
    writes: Vec<(u64, u64)>,
    /// Made on a worker thread: a write-through (one record).
    through: bool,
    /// The store took the call (`Ok`); otherwise it applied nothing.
    ok: bool,
}

/// The failing store behind a log of its `write_all` calls that tells write-throughs from
/// the flushers' batches. A mutex around each call keeps the log in the order the store
/// handled the calls (`FaultyStore` handles one call at a time anyway).
struct LoggedStore {
    faulty: Arc<FaultyStore<u64, u64>>,
    calls: Mutex<Vec<LoggedCall>>,
}

impl Store<u64, u64> for LoggedStore {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.faulty.load(key)
    }

    fn load_all(&self, keys: &[u64]) -> Result<Vec<(u64, u64)>, StoreError> {
        self.faulty.load_all(keys)
    }

    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        let mut calls = self.calls.lock().unwrap();
        let result = self.faulty.write_all(batch);
        calls.push(LoggedCall {
            writes: batch.iter().map(|w| (*w.key(), w.version())).collect(),
            through: WORKER.with(Cell::get),
            ok: result.is_ok(),
        });
        result
    }
}

impl LoggedStore {
    /// Per key, the versions the store was handed, in order, leaving out the write-throughs
    /// it failed. Such a write took no effect (the cache kept the key's previous value and
    /// the store applied nothing), so the key's older write-behind version, still pending
    /// from before a switch to `Through`, may follow it.
    fn versions_in_effect(&self) -> HashMap<u64, Vec<u64>> {
        let mut out: HashMap<u64, Vec<u64>> = HashMap::new();
        for call in self.calls.lock().unwrap().iter() {
            if call.through && !call.ok {
                continue;
            }
            for &(key, version) in &call.writes {
                out.entry(key).or_default().push(version);
            }
        }
        out
    }

    /// (records of the flushers' batches the store took, write-throughs it took).
    fn records_by_path(&self) -> (u64, u64) {
        let calls = self.calls.lock().unwrap();
        let ok = |through: bool| -> u64 {
            calls
                .iter()
                .filter(|c| c.ok && c.through == through)
                .map(|c| c.writes.len() as u64)
                .sum()
        };
        (ok(false), ok(true))
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A put of the unique value, or (`None`) a remove.
    Write(Option<u64>),
    /// A put (or, `None`, a remove) that returned the store's error: it took no effect, so
    /// no read may return its value.
    FailedWrite(Option<u64>),
    /// A get and what it returned.
    Read(Option<u64>),
    /// The store's row, read right after a `flush()` that began at `start`: the flush barrier
    /// makes it a read of the key over `[flush start, store read end]`.
    StoreRead(Option<u64>),
}

#[derive(Clone, Copy, Debug)]
struct Event {
    key: u64,
    kind: Kind,
    start: u64,
    end: u64,
}

/// What a put or remove returned, as an event kind. With `may_fail`, the store's injected
/// failure of a write-through is a failed write; any other error panics.
fn write_kind(result: Result<u64, Error>, value: Option<u64>, may_fail: bool) -> Kind {
    match result {
        Ok(_) => Kind::Write(value),
        Err(Error::Store(StoreError::Unavailable(source)))
            if may_fail && source.to_string() == INJECTED_FAILURE =>
        {
            Kind::FailedWrite(value)
        }
        Err(e) => panic!("the write of {value:?} failed with {e:?}, which this run does not allow"),
    }
}

fn run_threads(
    cache: &Arc<Cache<u64, u64>>,
    store: &Arc<FaultyStore<u64, u64>>,
    ops_per_thread: u64,
    writes_may_fail: bool,
    switch_modes: bool,
) -> (Vec<Event>, Switches) {
    let clock = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let switcher = Arc::new(Switcher::default());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (cache, clock, barrier) = (cache.clone(), clock.clone(), barrier.clone());
            let (store, switcher) = (store.clone(), switcher.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(t + 1);
                let mut log = Vec::new();
                WORKER.with(|w| w.set(true));
                barrier.wait();
                for i in 0..ops_per_thread {
                    let r = rng.next_u64();
                    let key = r % KEYS;
                    // Unique across threads: thread in the high bits, sequence in the low.
                    let value = (t << 32) | i;
                    if switch_modes && (r >> 32) % SWITCH_ONE_IN == 0 {
                        // A switch from `Behind` flushes: the same barrier as below, checked
                        // the same way. A switch to `Behind` flushes nothing.
                        let start = clock.fetch_add(1, Ordering::SeqCst);
                        if switcher.switch(&cache) == Some(WriteMode::Through) {
                            log.extend(store_rows(&store, &clock, start));
                        }
                        continue;
                    }
                    if r % 97 == 0 {
                        // The flush barrier: after flush() returns, the store holds, for every
                        // key, a value that was current at some point since the flush began.
                        let start = clock.fetch_add(1, Ordering::SeqCst);
                        cache.flush().expect("flush with a store that recovers");
                        log.extend(store_rows(&store, &clock, start));
                        continue;
                    }
                    if r % 97 == 1 {
                        // Warm the key from the store. Not an event: what it caches is
                        // checked by the gets after it (a row read before a remove and
                        // cached after it would be a stale read for them).
                        cache
                            .preload_from_store(&[key])
                            .expect("the store never fails loads");
                        continue;
                    }
                    let start = clock.fetch_add(1, Ordering::SeqCst);
                    let kind = match (r >> 8) % 10 {
                        0..=3 => write_kind(cache.put(key, value), Some(value), writes_may_fail),
                        4 => write_kind(cache.remove(&key), None, writes_may_fail),
                        // A third of the reads through `get_all` (its own single-flight path).
                        _ if r % 3 == 0 => Kind::Read(
                            cache.get_all(&[key]).expect("the store never fails loads")[0],
                        ),
                        _ => Kind::Read(cache.get(&key).expect("the store never fails loads")),
                    };
                    let end = clock.fetch_add(1, Ordering::SeqCst);
                    log.push(Event {
                        key,
                        kind,
                        start,
                        end,
                    });
                    if r % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                log
            })
        })
        .collect();
    let events = handles
        .into_iter()
        .flat_map(|h| h.join().expect("worker panicked"))
        .collect();
    (events, switcher.switches())
}

/// Every key's row in the store, read after a flush that began at `start`: reads of the keys
/// over `[start, now]`.
fn store_rows(store: &FaultyStore<u64, u64>, clock: &AtomicU64, start: u64) -> Vec<Event> {
    let rows: Vec<(u64, Option<u64>)> = (0..KEYS).map(|k| (k, store.memory().get(&k))).collect();
    let end = clock.fetch_add(1, Ordering::SeqCst);
    rows.into_iter()
        .map(|(key, v)| Event {
            key,
            kind: Kind::StoreRead(v),
            start,
            end,
        })
        .collect()
}

/// With mode switching on, one op in this many (about 400 of a full run's 16,000) switches
/// the write mode.
const SWITCH_ONE_IN: u64 = 40;

/// Mode switches a run made, by direction.
#[derive(Clone, Copy, Debug, Default)]
struct Switches {
    to_through: usize,
    to_behind: usize,
}

/// Switches the write mode between `Behind` and `Through` on behalf of the workers, one
/// switch at a time, so that write-behind batches and write-throughs of the same keys meet
/// at the store: a write-through may start while its key's write-behind write is queued or
/// at the store, and a write-behind write may be queued while a write-through of its key is
/// at the store. Never `ReadOnly`: its writes are never sent, which the store checks cannot
/// model.
#[derive(Default)]
struct Switcher {
    /// Held across a switch: only a switch changes the mode, so the mode read under it is
    /// the one the switch leaves, and each switch is counted in its true direction.
    counts: Mutex<Switches>,
}

impl Switcher {
    /// Switches to the other mode and returns it, unless another worker is switching right
    /// now (`None`).
    ///
    /// Leaving `Behind` flushes, and `set_write_mode` returns the flush's result. Of the
    /// errors `Cache::flush` documents, none can occur here, so every switch must return
    /// `Ok`: `Error::Store` reports writes the store *rejected* `max_attempts` times, and the
    /// failing store never rejects a record (it fails whole calls as unavailable, which the
    /// flusher retries without counting attempts); `Error::FlushTimeout` needs the store to
    /// refuse the flushers' calls for the whole flush timeout (30 s by default), while the
    /// failing store takes four calls in five and the flusher retries within `retry_max`
    /// (2 ms); `Error::Reentrant` needs a call from inside a store call; `Error::Closed` a
    /// closed cache, and the cache is closed only after every worker has returned. The
    /// workers' own `flush()` calls expect `Ok` on the failing store for the same reasons.
    /// Switching to `Behind` flushes nothing and is always `Ok`.
    fn switch(&self, cache: &Cache<u64, u64>) -> Option<WriteMode> {
        let Ok(mut counts) = self.counts.try_lock() else {
            return None;
        };
        let to = match cache.write_mode() {
            WriteMode::Behind => WriteMode::Through,
            WriteMode::Through => WriteMode::Behind,
            WriteMode::ReadOnly => unreachable!("no run switches to ReadOnly"),
        };
        if let Err(e) = cache.set_write_mode(to) {
            panic!("switching to {to:?} returned {e:?}; this run allows no error there");
        }
        match to {
            WriteMode::Through => counts.to_through += 1,
            _ => counts.to_behind += 1,
        }
        Some(to)
    }

    fn switches(&self) -> Switches {
        *self.counts.lock().unwrap()
    }
}

/// Checks every read of one key against that key's writes.
fn check_key(key: u64, events: &[Event]) {
    let writes: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, Kind::Write(_)))
        .collect();
    for read in events.iter() {
        let (seen, what) = match read.kind {
            Kind::Write(_) | Kind::FailedWrite(_) => continue,
            Kind::Read(v) => (v, "get"),
            Kind::StoreRead(v) => (v, "the store after flush()"),
        };
        // A failed write applied nothing: its value (unique, so a `Some`) is never current.
        if let Some(failed) = events
            .iter()
            .find(|e| seen.is_some() && matches!(e.kind, Kind::FailedWrite(v) if v == seen))
        {
            panic!(
                "key {key}: {what} during [{}, {}] returned {seen:?}, the value of a failed \
                 write during [{}, {}], which must not take effect",
                read.start, read.end, failed.start, failed.end
            );
        }
        // The candidates that could explain the read: the writes of that value (one, since
        // values are unique; any remove for `None`), plus the initial absence for `None`.
        let mut candidates: Vec<(u64, u64)> = writes
            .iter()
            .filter(|w| matches!(w.kind, Kind::Write(v) if v == seen))
            .map(|w| (w.start, w.end))
            .collect();
        if seen.is_none() {
            candidates.push((0, 0)); // the key did not exist before any write
        }
        let ok = candidates.iter().any(|&(ws, we)| {
            let not_future = ws < read.end || (ws, we) == (0, 0);
            let initial = (ws, we) == (0, 0);
            let overwritten = writes.iter().any(|o| {
                (initial || o.start > we) && o.end < read.start && (o.start, o.end) != (ws, we)
            });
            not_future && !overwritten
        });
        if !ok {
            // The writes that matter: the last few that began before the read ended.
            let recent: Vec<_> = writes
                .iter()
                .filter(|w| w.start < read.end)
                .map(|w| (w.kind, w.start, w.end))
                .collect();
            panic!(
                "key {key}: {what} during [{}, {}] returned {seen:?}, which was not current at \
                 any point of the call; last writes before it: {:?}",
                read.start,
                read.end,
                &recent[recent.len().saturating_sub(8)..]
            );
        }
    }
}

type Tweak = fn(Builder<u64, u64>) -> Builder<u64, u64>;

/// What a run did: events by kind, then what reached the store by path, and the mode
/// switches.
#[derive(Debug, Default)]
struct Counts {
    writes: usize,
    failed_writes: usize,
    reads: usize,
    store_reads: usize,
    /// Records of the flushers' batches the store took (write-behind).
    behind_records: u64,
    /// Write-throughs the store took.
    write_throughs: u64,
    switches: Switches,
}

fn run(flaky: bool, ops_per_thread: u64) -> Counts {
    run_with(flaky, ops_per_thread, |b| b)
}

/// `run` with more builder settings on top of the common ones. Every write must succeed.
fn run_with(flaky: bool, ops_per_thread: u64, tweak: Tweak) -> Counts {
    run_checked(flaky, false, false, ops_per_thread, tweak)
}

/// `run_with` on the failing store, for a configuration that writes through: a write may
/// fail with the store's injected error, and is then checked as a failed write.
fn run_with_failing_writes(ops_per_thread: u64, tweak: Tweak) -> Counts {
    run_checked(true, true, false, ops_per_thread, tweak)
}

/// `run` while the workers switch the write mode between `Behind` and `Through` now and
/// then (`Switcher`). On the failing store a write made in `Through` may fail.
fn run_switching_modes(flaky: bool, ops_per_thread: u64) -> Counts {
    run_checked(flaky, flaky, true, ops_per_thread, |b| b)
}

fn run_checked(
    flaky: bool,
    writes_may_fail: bool,
    switch_modes: bool,
    ops_per_thread: u64,
    tweak: Tweak,
) -> Counts {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    if flaky {
        store.fail_with_probability(0.2, 42);
    }
    let logged = Arc::new(LoggedStore {
        faulty: store.clone(),
        calls: Mutex::new(Vec::new()),
    });
    let builder = Cache::builder(logged.clone())
        .write_delay(Duration::from_micros(200))
        .retry_backoff(Duration::from_micros(100), Duration::from_millis(2))
        .max_batch(4)
        .shards(2)
        .flushers(2)
        .dirty_ring_capacity(2);
    let cache = Arc::new(tweak(builder).build().unwrap());
    let (mut events, switches) = run_threads(
        &cache,
        &store,
        ops_per_thread,
        writes_may_fail,
        switch_modes,
    );

    store.heal();
    cache.flush().unwrap();
    // Every call has returned: each key's row and cached value must be a value current at
    // the end, checked as reads that begin after every stamp.
    let after = events.iter().map(|e| e.end).max().unwrap_or(0) + 1;
    for key in 0..KEYS {
        let row = store.memory().get(&key);
        let cached = cache.get(&key).unwrap();
        assert_eq!(
            row, cached,
            "key {key}: store and cache disagree after the final flush"
        );
        for kind in [Kind::StoreRead(row), Kind::Read(cached)] {
            events.push(Event {
                key,
                kind,
                start: after,
                end: after + 1,
            });
        }
    }

    let mut per_key: HashMap<u64, Vec<Event>> = HashMap::new();
    for e in events {
        per_key.entry(e.key).or_default().push(e);
    }
    let mut counts = Counts::default();
    for (key, evs) in &per_key {
        for e in evs {
            match e.kind {
                Kind::Write(_) => counts.writes += 1,
                Kind::FailedWrite(_) => counts.failed_writes += 1,
                Kind::Read(_) => counts.reads += 1,
                Kind::StoreRead(_) => counts.store_reads += 1,
            }
        }
        check_key(*key, evs);
    }
    // The final checks above add one read and one store read per key.
    assert!(counts.reads > KEYS as usize, "the workload made no reads");
    assert!(
        counts.store_reads > KEYS as usize || cfg!(miri),
        "the workload made no flushes"
    );

    for (key, versions) in logged.versions_in_effect() {
        if let Some(i) = versions.windows(2).position(|w| w[0] > w[1]) {
            panic!(
                "key {key}: the store received versions out of order: {} after {} (receipt \
                 {} of {}; around it: {:?})",
                versions[i + 1],
                versions[i],
                i + 1,
                versions.len(),
                &versions[i.saturating_sub(3)..(i + 5).min(versions.len())]
            );
        }
    }
    let report = cache.close(Duration::from_secs(5));
    assert!(report.is_clean());
    (counts.behind_records, counts.write_throughs) = logged.records_by_path();
    assert_eq!(
        counts.behind_records,
        cache.metrics().records_written,
        "the flushers' batches the store took are the records the flushers wrote"
    );
    counts.switches = switches;
    eprintln!("{counts:?}");
    counts
}

#[test]
fn per_key_linearizable_healthy_store() {
    run(false, if cfg!(miri) { 20 } else { 4000 });
}

#[test]
fn per_key_linearizable_flaky_store() {
    run(true, if cfg!(miri) { 20 } else { 4000 });
}

/// A cache that holds two of the four keys: clean keys are evicted and read through from the
/// store again while other threads write them (a load that a write overtakes must not be
/// cached, and a key is evicted only once its writes are in the store).
#[test]
fn per_key_linearizable_bounded_read_through() {
    run_with(false, if cfg!(miri) { 20 } else { 4000 }, |b| b.capacity(2));
}

/// Batches of two sorted by a key order, and writes that meet a full shard written through
/// on the caller's thread (the flusher's core lock keeps a key's versions in order between
/// the two paths). The store is healthy, so every write must succeed; the same settings with
/// a failing store, where write-throughs fail, are
/// `per_key_linearizable_write_through_backpressure_flaky_store`.
#[test]
fn per_key_linearizable_flush_order_and_write_through_backpressure() {
    run_with(
        false,
        if cfg!(miri) { 20 } else { 4000 },
        write_through_backpressure,
    );
}

fn write_through_backpressure(b: Builder<u64, u64>) -> Builder<u64, u64> {
    b.max_batch(2)
        .flush_order(|a: &u64, b: &u64| b.cmp(a))
        .max_dirty(2, Backpressure::WriteThrough)
}

/// The settings above with the failing store: a write that meets a full shard is written
/// through and fails one time in five, returning the store's error; the cache must keep its
/// previous value and the store must not hold the failed one. Background batches fail too,
/// which keeps keys dirty longer and sends more writes through.
#[test]
fn per_key_linearizable_write_through_backpressure_flaky_store() {
    let counts = run_with_failing_writes(
        if cfg!(miri) { 20 } else { 4000 },
        write_through_backpressure,
    );
    assert!(
        counts.failed_writes > 0 || cfg!(miri),
        "no write-through failed, so the failure path went unchecked: {counts:?}"
    );
}

/// Every write goes to the store on the writer's thread (`WriteMode::Through`), and the
/// failing store fails one in five of them. Two writers of one key take turns at the store
/// (one write-through of a key at a time), so the store receives the key's versions in order
/// and the cache ends with what the store holds.
#[test]
fn per_key_linearizable_write_through_mode_flaky_store() {
    let counts = run_with_failing_writes(if cfg!(miri) { 20 } else { 4000 }, |b| {
        b.write_mode(WriteMode::Through)
    });
    assert!(
        counts.failed_writes > 0,
        "no write-through failed, so the failure path went unchecked: {counts:?}"
    );
}

/// The write mode switches between `Behind` and `Through` a few hundred times while the
/// workers run (`Switcher`): write-throughs start while their key's write-behind
/// batch is queued or at the store, and write-behind writes are queued while a write-through
/// of their key is at the store. Every switch and every write must succeed.
#[test]
fn per_key_linearizable_switching_write_modes() {
    let counts = run_switching_modes(false, if cfg!(miri) { 20 } else { 4000 });
    assert_switched_and_wrote_both_ways(&counts);
}

/// The same on the failing store: write-throughs fail one time in five (failed writes),
/// write-behind batches fail and are retried, which keeps keys dirty into the next
/// `Through` period.
#[test]
fn per_key_linearizable_switching_write_modes_flaky_store() {
    let counts = run_switching_modes(true, if cfg!(miri) { 20 } else { 4000 });
    assert_switched_and_wrote_both_ways(&counts);
    assert!(
        counts.failed_writes > 0 || cfg!(miri),
        "no write-through failed, so the failure path went unchecked: {counts:?}"
    );
}

/// A switching run proves something only if the modes switched both ways and both paths
/// wrote to the store.
fn assert_switched_and_wrote_both_ways(counts: &Counts) {
    let Switches {
        to_through,
        to_behind,
    } = counts.switches;
    assert!(
        (to_through > 0 && to_behind > 0) || cfg!(miri),
        "the mode did not switch both ways: {counts:?}"
    );
    assert!(
        counts.write_throughs > 0 || cfg!(miri),
        "no write-through reached the store: {counts:?}"
    );
    assert!(
        counts.behind_records > 0 || cfg!(miri),
        "no write-behind batch reached the store: {counts:?}"
    );
}

/// Entries live 1 ms and are refreshed in the background after 0.3 ms: expired keys are read
/// through again, and a refresh must never replace a newer write.
#[test]
fn per_key_linearizable_expiry_and_refresh_ahead() {
    run_with(false, if cfg!(miri) { 20 } else { 4000 }, |b| {
        b.time_to_live(Duration::from_millis(1)).refresh_ahead(0.3)
    });
}

/// A failing store behind a dirty limit that makes writers wait for the flusher.
#[test]
fn per_key_linearizable_blocking_backpressure_flaky_store() {
    run_with(true, if cfg!(miri) { 20 } else { 4000 }, |b| {
        b.max_dirty(
            2,
            Backpressure::Block {
                timeout: Duration::from_secs(5),
            },
        )
    });
}

/// An event of key 0, for the checker's own tests.
fn ev(kind: Kind, start: u64, end: u64) -> Event {
    Event {
        key: 0,
        kind,
        start,
        end,
    }
}

/// The checker itself must reject a stale read (a test that cannot fail proves nothing).
#[test]
#[should_panic(expected = "was not current")]
fn checker_rejects_a_stale_read() {
    let w = |v: u64, start, end| ev(Kind::Write(Some(v)), start, end);
    let events = [w(1, 1, 2), w(2, 3, 4), ev(Kind::Read(Some(1)), 5, 6)];
    check_key(0, &events);
}

/// ... and a read from the future.
#[test]
#[should_panic(expected = "was not current")]
fn checker_rejects_a_future_read() {
    let events = [
        ev(Kind::Read(Some(1)), 1, 2),
        ev(Kind::Write(Some(1)), 3, 4),
    ];
    check_key(0, &events);
}

/// ... and a store that, after a flush, still holds a value overwritten before the flush.
#[test]
#[should_panic(expected = "the store after flush()")]
fn checker_rejects_a_store_row_older_than_the_flush() {
    let w = |v: u64, start, end| ev(Kind::Write(Some(v)), start, end);
    let events = [w(1, 1, 2), w(2, 3, 4), ev(Kind::StoreRead(Some(1)), 5, 6)];
    check_key(0, &events);
}

/// ... and a get that returns the value of a write that failed.
#[test]
#[should_panic(expected = "the value of a failed write")]
fn checker_rejects_a_read_of_a_failed_write() {
    let events = [
        ev(Kind::Write(Some(1)), 1, 2),
        ev(Kind::FailedWrite(Some(2)), 3, 4),
        ev(Kind::Read(Some(2)), 5, 6),
    ];
    check_key(0, &events);
}

/// ... even while the failed write is still in progress (it may not show before it fails).
#[test]
#[should_panic(expected = "the value of a failed write")]
fn checker_rejects_a_read_of_a_failed_write_during_it() {
    let events = [
        ev(Kind::FailedWrite(Some(1)), 1, 4),
        ev(Kind::StoreRead(Some(1)), 2, 3),
    ];
    check_key(0, &events);
}

/// ... and a `None` that only a failed remove could explain.
#[test]
#[should_panic(expected = "was not current")]
fn checker_rejects_a_none_after_a_failed_remove() {
    let events = [
        ev(Kind::Write(Some(1)), 1, 2),
        ev(Kind::FailedWrite(None), 3, 4),
        ev(Kind::Read(None), 5, 6),
    ];
    check_key(0, &events);
}

/// A failed write overwrites nothing: the value before it stays current.
#[test]
fn checker_accepts_the_previous_value_after_a_failed_write() {
    let events = [
        ev(Kind::Write(Some(1)), 1, 2),
        ev(Kind::FailedWrite(Some(2)), 3, 4),
        ev(Kind::FailedWrite(None), 5, 6),
        ev(Kind::Read(Some(1)), 7, 8),
        ev(Kind::StoreRead(Some(1)), 7, 9),
    ];
    check_key(0, &events);
}
