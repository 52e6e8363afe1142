//! The no-loss promise under hostile conditions: user code that panics (a value's `Clone` or
//! `Drop`, a key's `Hash`, a weigher, a clock, the store), a store that answers oddly, calls
//! made from places that could wait for themselves, and settings at their extremes.
//!
//! Every accepted write must, at every moment, be exactly one of: in the store, queued, in the
//! failed-writes sink, or in a close report; no thread of the cache dies; no call hangs.

mod common;

use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use common::eventually;
use writebehind::testing::FaultyStore;
use writebehind::{
    Backpressure, BatchError, Cache, Clock, Error, ManualClock, MemoryStore, Store, StoreError,
    Write, WriteMode,
};

/// Runs `f` on a thread and fails the test if it has not returned within `limit` (the
/// thread is left behind: it is what the test found wedged).
fn within<R: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => panic!("{what} did not return within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// A value and a key whose user code panics on demand.
// ---------------------------------------------------------------------------------------

/// A value whose `Clone` panics while its `clone_bombs` counter is above zero (each panic
/// takes one), or always while `always` is set; its `Drop` panics while `drop_bombs` is
/// above zero. Each test uses its own [`Bombs`], so tests running side by side do not
/// trip each other.
#[derive(Debug)]
struct Val {
    n: u64,
    bombs: Arc<Bombs>,
}

#[derive(Debug, Default)]
struct Bombs {
    clone_bombs: AtomicU32,
    always: AtomicBool,
    drop_bombs: AtomicU32,
    clones: AtomicUsize,
}

impl Bombs {
    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl Clone for Val {
    fn clone(&self) -> Self {
        self.bombs.clones.fetch_add(1, Ordering::SeqCst);
        if self.bombs.always.load(Ordering::SeqCst) || Bombs::take(&self.bombs.clone_bombs) {
            panic!("Val::clone: injected panic");
        }
        Val {
            n: self.n,
            bombs: self.bombs.clone(),
        }
    }
}

impl Drop for Val {
    fn drop(&mut self) {
        if !std::thread::panicking() && Bombs::take(&self.bombs.drop_bombs) {
            panic!("Val::drop: injected panic");
        }
    }
}

impl PartialEq for Val {
    fn eq(&self, other: &Self) -> bool {
        self.n == other.n
    }
}

fn val(bombs: &Arc<Bombs>, n: u64) -> Val {
    Val {
        n,
        bombs: bombs.clone(),
    }
}

type ValStore = Arc<FaultyStore<u64, Val>>;

fn stored(store: &ValStore, k: u64) -> Option<u64> {
    store.memory().get(&k).map(|v| v.n)
}

// ---------------------------------------------------------------------------------------
// A store that runs a hook at the start of every call and answers from a script.
// ---------------------------------------------------------------------------------------

/// What [`Scripted::write_all`] does with one call.
#[derive(Clone, Debug)]
enum Reply {
    /// Apply the batch.
    Apply,
    /// Apply nothing, answer `Unavailable`.
    Unavailable,
    /// Apply nothing, answer `Partial` with these (index, rejected) entries: a malformed
    /// answer when they do not account for the batch.
    Partial(Vec<usize>),
    /// Reject deletes; apply the rest.
    RejectDeletes,
    /// Reject every record.
    RejectAll,
}

type Hook = Box<dyn Fn(&[Write<u64, u64>]) + Send + Sync>;
type LoadHook = Box<dyn Fn(&u64) + Send + Sync>;

struct Scripted {
    memory: MemoryStore<u64, u64>,
    script: Mutex<Vec<Reply>>,
    /// When the script is used up.
    then: Mutex<Reply>,
    on_write: Mutex<Option<Hook>>,
    on_load: Mutex<Option<LoadHook>>,
    received: Mutex<Vec<Write<u64, u64>>>,
}

impl Scripted {
    fn new(then: Reply) -> Arc<Self> {
        Arc::new(Scripted {
            memory: MemoryStore::new(),
            script: Mutex::new(Vec::new()),
            then: Mutex::new(then),
            on_write: Mutex::new(None),
            on_load: Mutex::new(None),
            received: Mutex::new(Vec::new()),
        })
    }

    fn script(&self, replies: &[Reply]) {
        let mut s = self.script.lock().unwrap();
        s.clear();
        s.extend(replies.iter().rev().cloned());
    }

    fn received_values(&self, key: u64) -> Vec<Option<u64>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|w| *w.key() == key)
            .map(|w| w.value().copied())
            .collect()
    }
}

impl Store<u64, u64> for Scripted {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        if let Some(h) = self.on_load.lock().unwrap().as_ref() {
            h(key);
        }
        self.memory.load(key)
    }

    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        let hook = self.on_write.lock().unwrap().take();
        if let Some(h) = &hook {
            h(batch);
        }
        if let Some(h) = hook {
            self.on_write.lock().unwrap().get_or_insert(h);
        }
        self.received.lock().unwrap().extend(batch.iter().cloned());
        let reply = self
            .script
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_else(|| self.then.lock().unwrap().clone());
        let rejected = |i| (i, StoreError::rejected("scripted rejection"));
        match reply {
            Reply::Apply => {
                for w in batch {
                    let _ = self.memory.write_all(std::slice::from_ref(w));
                }
                Ok(())
            }
            Reply::Unavailable => Err(BatchError::unavailable("scripted outage")),
            Reply::Partial(list) => Err(BatchError::Partial(
                list.into_iter().map(rejected).collect(),
            )),
            Reply::RejectDeletes | Reply::RejectAll => {
                let mut failed = Vec::new();
                for (i, w) in batch.iter().enumerate() {
                    if matches!(reply, Reply::RejectAll) || w.is_delete() {
                        failed.push(rejected(i));
                    } else {
                        let _ = self.memory.write_all(std::slice::from_ref(w));
                    }
                }
                if failed.is_empty() {
                    Ok(())
                } else {
                    Err(BatchError::Partial(failed))
                }
            }
        }
    }
}

fn manual_scripted(store: &Arc<Scripted>) -> Cache<u64, u64> {
    Cache::builder(store.clone())
        .manual_flushing()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .max_attempts(1)
        .shards(2)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. ReadOnly writes never reach the store.
// ---------------------------------------------------------------------------------------

/// A batch holding key 1 is at the store when the mode switches to `ReadOnly` and the key is
/// written locally; the batch fails. Its retry must not send the read-only value.
#[test]
fn a_read_only_write_made_during_a_failed_batch_is_never_sent() {
    let store = Scripted::new(Reply::Apply);
    let cache = Arc::new(manual_scripted(&store));
    let weak: Weak<Cache<u64, u64>> = Arc::downgrade(&cache);
    store.script(&[Reply::Unavailable]);
    *store.on_write.lock().unwrap() = Some(Box::new(move |_| {
        if let Some(c) = weak.upgrade() {
            if c.write_mode() == WriteMode::Behind {
                // The switch's flush is refused from inside the store call; the mode switches.
                let _ = c.set_write_mode(WriteMode::ReadOnly);
                c.put(1, 222).unwrap();
            }
        }
    }));
    cache.put(1, 111).unwrap();
    let _ = cache.flush();
    assert_eq!(cache.write_mode(), WriteMode::ReadOnly);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(3));
        let _ = cache.flush_step();
    }
    let _ = cache.flush();
    assert!(
        !store.received_values(1).contains(&Some(222)),
        "the read-only value reached the store: {:?}",
        store.received_values(1)
    );
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(222),
        "read your (local) writes"
    );
    let report = cache.close(Duration::from_millis(100));
    assert!(
        report.unwritten.iter().all(|w| w.value() != Some(&222)),
        "a read-only write is not an unwritten write: {:?}",
        report.unwritten
    );
}

// ---------------------------------------------------------------------------------------
// 2 and 10. Acknowledgements mean the store holds the write; a given-up write leaves memory.
// ---------------------------------------------------------------------------------------

#[test]
fn wait_durable_never_acknowledges_a_rejected_delete() {
    let store = Scripted::new(Reply::RejectDeletes);
    let cache = manual_scripted(&store);
    cache.put(1, 10).unwrap();
    cache.flush().unwrap();
    let v = cache.remove(&1).unwrap();
    assert!(matches!(cache.flush(), Err(Error::Store(_))));
    assert_eq!(cache.failed_writes().len(), 1);
    assert!(
        cache
            .wait_durable(&1, v, Duration::from_millis(50))
            .is_err(),
        "a delete the store rejected was acknowledged"
    );
}

#[test]
fn wait_durable_never_acknowledges_a_rejected_put_even_once_it_left_memory() {
    let store = Scripted::new(Reply::RejectAll);
    let cache: Cache<u64, u64> = Cache::builder(store.clone())
        .manual_flushing()
        .max_attempts(1)
        .capacity(4)
        .shards(1)
        .build()
        .unwrap();
    let v = cache.put(1, 10).unwrap();
    assert!(matches!(cache.flush(), Err(Error::Store(_))));
    *store.then.lock().unwrap() = Reply::Apply;
    // Other keys push key 1 out of memory, if it is still there.
    for k in 100..120 {
        cache.put(k, k).unwrap();
        cache.flush().unwrap();
    }
    assert!(
        cache
            .wait_durable(&1, v, Duration::from_millis(50))
            .is_err(),
        "a put the store rejected was acknowledged"
    );
    // A newer write of the key that the store takes acknowledges the older version too.
    let v2 = cache.put(1, 11).unwrap();
    cache.flush().unwrap();
    cache.wait_durable(&1, v, Duration::from_secs(1)).unwrap();
    cache.wait_durable(&1, v2, Duration::from_secs(1)).unwrap();
}

#[test]
fn a_given_up_write_leaves_memory_and_reads_go_to_the_store() {
    let store = Scripted::new(Reply::RejectAll);
    store.memory.insert(1, 5);
    let cache = manual_scripted(&store);
    cache.put(1, 10).unwrap();
    assert_eq!(cache.get(&1).unwrap(), Some(10));
    assert!(matches!(cache.flush(), Err(Error::Store(_))));
    let failed = cache.failed_writes();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].write.value(), Some(&10));
    assert_eq!(
        cache.get(&1).unwrap(),
        Some(5),
        "a rejected value must not be served as if it were stored"
    );
}

#[test]
fn a_write_superseded_in_read_only_mode_is_never_acknowledged() {
    let store = Scripted::new(Reply::Unavailable);
    let cache: Cache<u64, u64> = Cache::builder(store.clone())
        .manual_flushing()
        .capacity(4)
        .shards(1)
        .flush_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let v = cache.put(1, 10).unwrap();
    let _ = cache.set_write_mode(WriteMode::ReadOnly); // the flush fails: the store is down
    let local = cache.put(1, 11).unwrap();
    *store.then.lock().unwrap() = Reply::Apply;
    let _ = cache.flush();
    for k in 100..120 {
        cache.put(k, k).unwrap(); // read-only: local entries, pushing key 1 out
    }
    assert!(cache
        .wait_durable(&1, v, Duration::from_millis(30))
        .is_err());
    assert!(cache
        .wait_durable(&1, local, Duration::from_millis(30))
        .is_err());
}

// ---------------------------------------------------------------------------------------
// 3. Panics in user code on the flush path.
// ---------------------------------------------------------------------------------------

fn threaded(store: &ValStore) -> Cache<u64, Val> {
    Cache::builder(store.clone())
        .write_delay(Duration::from_millis(5))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .flush_timeout(Duration::from_secs(10))
        .shards(4)
        .build()
        .unwrap()
}

#[test]
fn a_panicking_clone_on_the_flusher_thread_loses_nothing_and_the_flusher_goes_on() {
    let bombs = Arc::new(Bombs::default());
    let store: ValStore = Arc::new(FaultyStore::new());
    let cache = threaded(&store);
    for k in 0..20 {
        cache.put(k, val(&bombs, k)).unwrap();
    }
    bombs.clone_bombs.store(3, Ordering::SeqCst);
    let cache = Arc::new(cache);
    let c = cache.clone();
    within(Duration::from_secs(20), "flush", move || c.flush()).unwrap();
    for k in 0..20 {
        assert_eq!(stored(&store, k), Some(k), "key {k}");
    }
    assert_eq!(
        bombs.clone_bombs.load(Ordering::SeqCst),
        0,
        "the bombs went off"
    );
    assert!(cache.metrics().user_panics >= 1);
    // The flusher is alive: a later write reaches the store on its own.
    cache.put(100, val(&bombs, 100)).unwrap();
    assert!(eventually(Duration::from_secs(5), || stored(&store, 100) == Some(100)));
}

#[test]
fn a_panicking_clone_in_a_manual_flush_strands_no_key() {
    let bombs = Arc::new(Bombs::default());
    let store: ValStore = Arc::new(FaultyStore::new());
    let cache: Cache<u64, Val> = Cache::builder(store.clone())
        .manual_flushing()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build()
        .unwrap();
    cache.put(1, val(&bombs, 1)).unwrap();
    bombs.clone_bombs.store(1, Ordering::SeqCst);
    let first = catch_unwind(AssertUnwindSafe(|| cache.flush()));
    assert!(first.is_ok(), "the value's panic escaped flush()");
    cache.flush().unwrap();
    assert_eq!(stored(&store, 1), Some(1));
}

#[test]
fn a_value_that_never_clones_is_handed_back_by_close_not_lost() {
    let bombs = Arc::new(Bombs::default());
    let store: ValStore = Arc::new(FaultyStore::new());
    let cache: Cache<u64, Val> = Cache::builder(store.clone())
        .manual_flushing()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .max_attempts(100)
        .build()
        .unwrap();
    cache.put(1, val(&bombs, 1)).unwrap();
    cache.put(2, val(&bombs, 2)).unwrap();
    bombs.always.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| cache.flush_step())).is_ok());
    let report = catch_unwind(AssertUnwindSafe(|| cache.close(Duration::from_millis(50))))
        .expect("close must not panic");
    // Each write is in the report or (had close's rounds used up its attempts) in the sink,
    // exactly once.
    let mut back: Vec<(u64, u64)> = report
        .unwritten
        .iter()
        .chain(cache.failed_writes().iter().map(|f| &f.write))
        .map(|w| (*w.key(), w.value().unwrap().n))
        .collect();
    back.sort();
    assert_eq!(back, vec![(1, 1), (2, 2)]);
    assert_eq!(stored(&store, 1), None);
}

#[test]
fn a_value_that_never_clones_goes_to_the_failed_writes_sink_after_max_attempts() {
    let bombs = Arc::new(Bombs::default());
    let store: ValStore = Arc::new(FaultyStore::new());
    let cache: Cache<u64, Val> = Cache::builder(store.clone())
        .manual_flushing()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .max_attempts(2)
        .build()
        .unwrap();
    cache.put(1, val(&bombs, 1)).unwrap();
    cache.put(2, val(&bombs, 2)).unwrap();
    bombs.always.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| cache.flush())).expect("flush must not panic");
    assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
    bombs.always.store(false, Ordering::SeqCst);
    let failed = cache.failed_writes();
    let mut keys: Vec<u64> = failed.iter().map(|f| *f.write.key()).collect();
    keys.sort();
    assert_eq!(keys, vec![1, 2]);
    assert_eq!(cache.metrics().dirty, 0);
}

#[test]
fn a_panicking_drop_on_the_flusher_thread_loses_nothing() {
    let bombs = Arc::new(Bombs::default());
    let store: ValStore = Arc::new(FaultyStore::new());
    let cache = Arc::new(threaded(&store));
    bombs.drop_bombs.store(5, Ordering::SeqCst);
    for k in 0..10 {
        cache.put(k, val(&bombs, k)).unwrap();
    }
    let c = cache.clone();
    within(Duration::from_secs(20), "flush", move || c.flush()).unwrap();
    for k in 0..10 {
        assert_eq!(stored(&store, k), Some(k));
    }
    cache.put(50, val(&bombs, 50)).unwrap();
    assert!(eventually(Duration::from_secs(5), || stored(&store, 50) == Some(50)));
}

/// A clock that panics while armed.
struct BombClock {
    inner: ManualClock,
    armed: AtomicU32,
}

impl Clock for BombClock {
    fn now(&self) -> Duration {
        if Bombs::take(&self.armed) {
            panic!("BombClock: injected panic");
        }
        self.inner.now()
    }
}

#[test]
fn a_panicking_clock_does_not_kill_the_flusher() {
    let clock = Arc::new(BombClock {
        inner: ManualClock::new(),
        armed: AtomicU32::new(0),
    });
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache = Arc::new(
        Cache::builder(store.clone())
            .clock(clock.clone())
            .write_delay(Duration::from_millis(1))
            .flush_timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    );
    // Writers and the flusher thread read the clock: these panics land on both.
    clock.armed.store(10, Ordering::SeqCst);
    for k in 0..20 {
        cache.put(k, k).unwrap();
        clock.inner.advance(Duration::from_millis(2));
    }
    assert!(eventually(Duration::from_secs(10), || clock
        .armed
        .load(Ordering::SeqCst)
        == 0));
    let c = cache.clone();
    within(Duration::from_secs(20), "flush", move || c.flush()).unwrap();
    for k in 0..20 {
        assert_eq!(store.memory().get(&k), Some(k));
    }
    assert!(cache.metrics().user_panics >= 10);
    cache.put(100, 100).unwrap();
    clock.inner.advance(Duration::from_millis(2));
    assert!(eventually(Duration::from_secs(5), || store
        .memory()
        .get(&100)
        == Some(100)));
}

// ---------------------------------------------------------------------------------------
// 4. An abandoned single-flight load does not wedge its key.
// ---------------------------------------------------------------------------------------

#[test]
fn a_load_leader_that_panics_does_not_wedge_the_key() {
    let store = Arc::new(MemoryStore::<u64, u64>::new());
    store.insert(1, 10);
    let boom = Arc::new(AtomicBool::new(true));
    let b = boom.clone();
    let cache = Arc::new(
        Cache::builder(store.clone())
            .manual_flushing()
            .weigher(move |_k: &u64, _v: &u64| {
                if b.swap(false, Ordering::SeqCst) {
                    panic!("weigher: injected panic");
                }
                1
            })
            .max_weight(1000)
            .build()
            .unwrap(),
    );
    let c = cache.clone();
    assert!(catch_unwind(AssertUnwindSafe(|| c.get(&1))).is_err());
    let c = cache.clone();
    let got = within(
        Duration::from_secs(5),
        "get after a panicked load",
        move || c.get(&1),
    );
    assert_eq!(got.unwrap(), Some(10));
}

#[test]
fn a_store_load_that_reads_its_own_key_through_the_cache_does_not_hang() {
    let store = Scripted::new(Reply::Apply);
    store.memory.insert(1, 10);
    let cache = Arc::new(manual_scripted(&store));
    let weak = Arc::downgrade(&cache);
    let inner_result = Arc::new(Mutex::new(None));
    let r = inner_result.clone();
    *store.on_load.lock().unwrap() = Some(Box::new(move |k| {
        if let Some(c) = weak.upgrade() {
            *r.lock().unwrap() = Some(c.get(k).map_err(|e| e.to_string()));
        }
    }));
    let c = cache.clone();
    let got = within(Duration::from_secs(5), "a re-entrant load", move || {
        c.get(&1)
    });
    assert_eq!(got.unwrap(), Some(10));
    let inner = inner_result.lock().unwrap().clone().expect("the hook ran");
    assert!(
        inner.is_err(),
        "the nested get must be refused, got {inner:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5 and 7. close() from awkward places; threads and spins.
// ---------------------------------------------------------------------------------------

#[test]
fn close_from_inside_a_store_call_leaves_the_report_to_a_later_close() {
    let store = Scripted::new(Reply::Unavailable);
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_delay(Duration::from_millis(1))
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
            .build()
            .unwrap(),
    );
    let weak = Arc::downgrade(&cache);
    let inner_report = Arc::new(Mutex::new(None));
    let r = inner_report.clone();
    *store.on_write.lock().unwrap() = Some(Box::new(move |_| {
        if let Some(c) = weak.upgrade() {
            let mut slot = r.lock().unwrap();
            if slot.is_none() {
                let rep = c.close(Duration::from_millis(200));
                *slot = Some((rep.unwritten.len(), rep.already_closed));
            }
        }
    }));
    for k in 0..5 {
        cache.put(k, k).unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || inner_report
        .lock()
        .unwrap()
        .is_some()));
    let c = cache.clone();
    let report = within(Duration::from_secs(10), "close", move || {
        c.close(Duration::from_millis(100))
    });
    assert!(!report.already_closed, "the real close is this one");
    let mut keys: Vec<u64> = report.unwritten.iter().map(|w| *w.key()).collect();
    keys.sort();
    assert_eq!(keys, vec![0, 1, 2, 3, 4]);
}

#[test]
fn close_does_not_spin_forever_on_a_hung_read_through() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache = Arc::new(Cache::builder(store.clone()).build().unwrap());
    store.hold();
    let c = cache.clone();
    let reader = std::thread::spawn(move || c.get(&1));
    assert!(store.wait_until_held(Duration::from_secs(5)));
    let c = cache.clone();
    let started = Instant::now();
    let report = within(
        Duration::from_secs(10),
        "close with a hung load",
        move || c.close(Duration::from_millis(100)),
    );
    assert!(report.is_clean());
    assert!(started.elapsed() < Duration::from_secs(5));
    store.release();
    let _ = reader.join();
}

#[test]
fn close_stops_refresh_loaders_in_manual_mode() {
    let store = Arc::new(MemoryStore::<u64, u64>::new());
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .time_to_live(Duration::from_secs(60))
        .refresh_ahead(0.5)
        .build()
        .unwrap();
    assert!(Arc::strong_count(&store) > 1);
    let report = cache.close(Duration::from_millis(10));
    assert!(report.is_clean());
    drop(cache);
    assert!(
        eventually(Duration::from_secs(5), || Arc::strong_count(&store) == 1),
        "a loader thread still holds the store after close"
    );
}

/// A key whose `Hash` runs a hook once when armed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HookKey(u64);

type KeyHook = Box<dyn Fn() + Send + Sync>;
static KEY_HOOK: OnceLock<Mutex<Option<KeyHook>>> = OnceLock::new();

impl Hash for HookKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.0 == 777 {
            let hook = KEY_HOOK
                .get_or_init(|| Mutex::new(None))
                .lock()
                .unwrap()
                .take();
            if let Some(h) = hook {
                h();
            }
        }
        self.0.hash(state);
    }
}

#[test]
fn flush_key_never_writes_after_close_returned() {
    let store = Arc::new(FaultyStore::<HookKey, u64>::new());
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_delay(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    cache.put(HookKey(777), 1).unwrap();
    // Down while close runs, so the key is still dirty when close returns.
    store.set_down(true);
    let closed_at_calls = Arc::new(Mutex::new(None));
    let weak = Arc::downgrade(&cache);
    let (s, c2) = (store.clone(), closed_at_calls.clone());
    *KEY_HOOK.get_or_init(|| Mutex::new(None)).lock().unwrap() = Some(Box::new(move || {
        if let Some(c) = weak.upgrade() {
            let report = c.close(Duration::ZERO);
            assert_eq!(report.unwritten.len(), 1);
            s.heal();
            *c2.lock().unwrap() = Some(s.calls().len());
        }
    }));
    let _ = cache.flush_key(&HookKey(777));
    let at_close = closed_at_calls
        .lock()
        .unwrap()
        .expect("the hook closed the cache");
    assert_eq!(
        store.calls().len(),
        at_close,
        "flush_key called the store after close returned"
    );
}

#[test]
fn close_from_user_code_on_a_flusher_thread_does_not_deadlock() {
    // A clock that closes the cache the first time a background thread of the cache reads it
    // while a write is pending.
    struct ClosingClock {
        inner: ManualClock,
        cache: OnceLock<Weak<Cache<u64, u64>>>,
        fired: AtomicBool,
        armed: AtomicBool,
    }
    impl Clock for ClosingClock {
        fn now(&self) -> Duration {
            let name = std::thread::current().name().unwrap_or("").to_string();
            if self.armed.load(Ordering::SeqCst)
                && (name.contains("-flusher-") || name.contains("-keeper-"))
                && !self.fired.swap(true, Ordering::SeqCst)
            {
                if let Some(c) = self.cache.get().and_then(Weak::upgrade) {
                    let report = c.close(Duration::from_millis(50));
                    assert!(
                        report.in_progress,
                        "a close on a flusher thread cannot wait"
                    );
                }
            }
            self.inner.now()
        }
    }
    let clock = Arc::new(ClosingClock {
        inner: ManualClock::new(),
        cache: OnceLock::new(),
        fired: AtomicBool::new(false),
        armed: AtomicBool::new(false),
    });
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache = Arc::new(
        Cache::builder(store.clone())
            .clock(clock.clone())
            .flusher_nice(1)
            .write_delay(Duration::from_millis(1))
            .build()
            .unwrap(),
    );
    clock.cache.set(Arc::downgrade(&cache)).unwrap();
    clock.armed.store(true, Ordering::SeqCst);
    cache.put(1, 1).unwrap();
    assert!(eventually(Duration::from_secs(5), || clock
        .fired
        .load(Ordering::SeqCst)));
    let c = cache.clone();
    let report = within(
        Duration::from_secs(10),
        "close after a close on a flusher thread",
        move || c.close(Duration::from_millis(100)),
    );
    assert!(!report.already_closed);
    assert!(cache.is_closed());
    let in_store = store.memory().get(&1) == Some(1);
    let handed_back = report.unwritten.iter().any(|w| *w.key() == 1);
    assert!(
        in_store ^ handed_back,
        "key 1 must be in the store or in the report"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Settings at their extremes: errors or saturation, never a panic or a huge allocation.
// ---------------------------------------------------------------------------------------

#[test]
fn duration_max_settings_do_not_panic() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache = Cache::builder(store.clone())
        .write_delay(Duration::from_millis(1))
        .flush_timeout(Duration::MAX)
        .max_dirty(
            4,
            Backpressure::Block {
                timeout: Duration::MAX,
            },
        )
        .shards(1)
        .build()
        .unwrap();
    for k in 0..50 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    let v = cache.put(1, 2).unwrap();
    cache.wait_durable(&1, v, Duration::MAX).unwrap();

    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .retry_backoff(Duration::MAX, Duration::MAX)
        .build()
        .unwrap();
    store.fail_next(2);
    cache.put(1, 1).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _ = cache.flush_step();
        let _ = cache.flush_step();
    }));
    assert!(r.is_ok(), "a huge backoff overflowed");
    cache.flush().unwrap();
    assert_eq!(store.memory().get(&1), Some(1));
}

#[test]
fn absurd_sizes_are_refused_with_a_clear_error() {
    let b = || Cache::<u64, u64>::builder(MemoryStore::new()).manual_flushing();
    for (setting, r) in [
        (
            "dirty_ring_capacity",
            b().dirty_ring_capacity(1 << 24).build(),
        ),
        ("max_batch", b().max_batch(1 << 25).build()),
        (
            "dirty_ring_capacity",
            b().shards(1 << 16).dirty_ring_capacity(1 << 12).build(),
        ),
    ] {
        match r {
            Err(Error::InvalidConfig { setting: s, .. }) => assert_eq!(s, setting),
            Err(e) => panic!("{setting}: unexpected error {e}"),
            Ok(_) => panic!("{setting}: an absurd size was accepted"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 9. A malformed Partial is not a success.
// ---------------------------------------------------------------------------------------

#[test]
fn a_partial_that_does_not_account_for_the_batch_is_retried() {
    for malformed in [vec![], vec![5], vec![0, 7]] {
        let store = Scripted::new(Reply::Apply);
        let cache = manual_scripted(&store);
        store.script(&[Reply::Partial(malformed.clone())]);
        cache.put(1, 10).unwrap();
        cache.put(2, 20).unwrap();
        let _ = cache.flush_step();
        std::thread::sleep(Duration::from_millis(5));
        cache.flush().unwrap();
        assert_eq!(store.memory.get(&1), Some(10), "{malformed:?}");
        assert_eq!(store.memory.get(&2), Some(20), "{malformed:?}");
        assert!(cache.failed_writes().is_empty(), "{malformed:?}");
    }
}

#[test]
fn a_malformed_partial_in_write_through_is_an_error() {
    let store = Scripted::new(Reply::Apply);
    let cache: Cache<u64, u64> = Cache::builder(store.clone())
        .write_mode(WriteMode::Through)
        .build()
        .unwrap();
    store.script(&[Reply::Partial(vec![])]);
    assert!(
        cache.put(1, 10).is_err(),
        "a write the store did not take returned Ok"
    );
    assert_eq!(cache.get(&1).unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// 12. Expired entries are invisible and reclaimed without a read.
// ---------------------------------------------------------------------------------------

#[test]
fn expired_entries_are_invisible_and_swept() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let clock = Arc::new(ManualClock::new());
    let cache = Cache::builder(store.clone())
        .manual_flushing()
        .clock(clock.clone())
        .time_to_live(Duration::from_millis(100))
        .build()
        .unwrap();
    for k in 0..10 {
        cache.put(k, k).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(cache.len(), 10);
    clock.advance(Duration::from_millis(150));
    cache.flush_step().unwrap();
    assert_eq!(cache.len(), 0);
    assert!(!cache.contains_key(&3));
    assert!(cache.entries().is_empty());
    assert_eq!(cache.metrics().entries, 0);
    assert_eq!(
        cache.metrics().expirations,
        10,
        "expired entries are reclaimed by the sweep, without a read"
    );
}

/// A key whose `Hash` panics on a flusher thread while its bombs last (each panic takes one).
#[derive(Clone, Debug, PartialEq, Eq)]
struct BombKey(u64, Arc<Bombs>);

impl Hash for BombKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let on_flusher = std::thread::current()
            .name()
            .is_some_and(|n| n.contains("-flusher-"));
        if on_flusher && Bombs::take(&self.1.clone_bombs) {
            panic!("BombKey::hash: injected panic");
        }
        self.0.hash(state);
    }
}

impl PartialEq for Bombs {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Bombs {}

/// A panic that no finer guard catches (here the key's `Hash`, as the flusher hashes the keys
/// of a chunk) ends the flusher's turn; the flusher recovers (its in-flight marks released,
/// its shards rescanned), goes on, and nothing is lost.
#[test]
fn a_panic_the_flusher_did_not_expect_is_recovered_from() {
    let bombs = Arc::new(Bombs::default());
    let store = Arc::new(FaultyStore::<BombKey, u64>::new());
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_delay(Duration::from_millis(2))
            .flush_timeout(Duration::from_secs(20))
            .shards(2)
            .build()
            .unwrap(),
    );
    // The flusher's next three hashes panic.
    bombs.clone_bombs.store(3, Ordering::SeqCst);
    for k in 0..20 {
        cache.put(BombKey(k, bombs.clone()), k).unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || bombs
        .clone_bombs
        .load(Ordering::SeqCst)
        == 0));
    let c = cache.clone();
    within(Duration::from_secs(30), "flush", move || c.flush()).unwrap();
    for k in 0..20 {
        assert_eq!(
            store.memory().get(&BombKey(k, bombs.clone())),
            Some(k),
            "key {k}"
        );
    }
    assert!(cache.metrics().user_panics >= 1);
}
