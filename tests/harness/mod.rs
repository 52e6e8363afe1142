//! The reference model shared by the proptest state-machine test (`tests/model.rs`) and the
//! `ops` fuzz target (`fuzz/fuzz_targets/ops.rs`, which includes this file by path).
//!
//! A [`Harness`] drives a manual-flushing cache over a `FaultyStore` with a sequence of
//! [`Op`]s and keeps two plain `HashMap` models next to it:
//! * `expected`: what the application expects `get` to answer for each key: its latest
//!   `put`/`remove`, or, for a key never written, the store's initial row;
//! * the store model, which is `expected` itself once everything is flushed.
//!
//! After every op it checks read-your-writes for the key it touched; after every `flush` that
//! returns `Ok` (always, when the store is healthy) it checks that the store equals the model
//! exactly and nothing is dirty; after `close` that every write is in the store, in the
//! failed-writes sink or in the report; at the end that the versions the store received per
//! key never went down, and that no write made in `WriteMode::ReadOnly` reached the store.
//!
//! Besides the store's faults, the environment can make the values' `Clone` panic during a
//! flusher step ([`Op::CloneBomb`]) and switch the write mode around a local write
//! ([`Op::ReadOnlyPut`]).
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, ManualClock, Write, WriteMode};

std::thread_local! {
    /// Clones of a [`Val`] on this thread that panic from now on (the harness runs the cache's
    /// steps on its own thread: manual flushing).
    static CLONE_BOMBS: Cell<u32> = const { Cell::new(0) };
}

/// The model's value: a `u64` whose `Clone` panics while [`CLONE_BOMBS`] is above zero.
#[derive(Debug, PartialEq, Eq)]
pub struct Val(pub u64);

impl Clone for Val {
    fn clone(&self) -> Self {
        let bomb = CLONE_BOMBS.with(|b| {
            let n = b.get();
            b.set(n.saturating_sub(1));
            n > 0
        });
        if bomb {
            panic!("Val::clone: injected panic");
        }
        Val(self.0)
    }
}

/// Keys are drawn from `0..KEYS`, so operations collide on keys and shards.
pub const KEYS: u64 = 8;

/// One step of the application or of the environment.
#[derive(Clone, Debug)]
pub enum Op {
    /// `cache.put(key, value)`.
    Put(u64, u64),
    /// `cache.remove(&key)`.
    Remove(u64),
    /// `cache.get(&key)`, checked against the model.
    Get(u64),
    /// Advance the clock by this many milliseconds, then `flush_step()`.
    Step(u64),
    /// `cache.flush()`.
    Flush,
    /// The next `n` store batches fail as unavailable.
    FailNext(usize),
    /// The next `n` store batches apply even indices and fail odd ones (`Partial`).
    PartialNext(usize),
    /// The store goes down (every call unavailable) until healed.
    Down,
    /// The next `n` store batches apply nothing and answer with a malformed `Partial`.
    MalformedNext(usize),
    /// The next `n` clones of a value panic during a `flush_step` (advancing the clock this
    /// many milliseconds); then the bombs are disarmed.
    CloneBomb(u32, u64),
    /// Switch to `WriteMode::ReadOnly` (its flush may fail), `put` locally, switch back.
    ReadOnlyPut(u64, u64),
    /// During the next batch (inside the store call): switch to `WriteMode::ReadOnly` and
    /// `put` locally; that batch then fails. Then a step runs (advancing the clock this many
    /// milliseconds) and the mode switches back.
    ReadOnlyDuringBatch(u64, u64, u64),
    /// Every fault is cleared.
    Heal,
    /// `close`, then a new cache over the same store, replaying what close handed back.
    CloseReopen,
    /// `cache.update(&key, |v| v += delta)`: changes the value if the key has one.
    Update(u64, u64),
    /// `cache.compute(&key, ..)`: absent becomes 1, a multiple of 3 is removed, anything
    /// else grows by 1.
    Compute(u64),
    /// `cache.put_if_absent(key, value)`.
    PutIfAbsent(u64, u64),
    /// `cache.invalidate(&key)`.
    Invalidate(u64),
    /// `cache.invalidate_all()`.
    InvalidateAll,
    /// `cache.put_all(..)`.
    PutAll(Vec<(u64, u64)>),
}

/// What [`Op::Compute`] does to a value.
fn computed(v: Option<u64>) -> Option<u64> {
    match v {
        None => Some(1),
        Some(x) if x % 3 == 0 => None,
        Some(x) => Some(x + 1),
    }
}

/// What the removal listener heard: key, value, and the store's row for the key when it
/// heard it.
type Heard = Arc<std::sync::Mutex<Vec<(u64, u64, Option<u64>)>>>;

type Store = Arc<FaultyStore<u64, Val>>;

/// The system under test and its reference models.
pub struct Harness {
    /// The cache hands backlogs to the store in key order (`Builder::flush_order`).
    ordered: bool,
    store: Store,
    clock: Arc<ManualClock>,
    cache: Arc<Cache<u64, Val>>,
    /// The answer `get` must give for every key the application wrote (`None`: deleted).
    written: HashMap<u64, Option<u64>>,
    /// The version of each key's latest write.
    latest: HashMap<u64, u64>,
    /// Keys whose latest write is local (`ReadOnly`): never sent, lost at close.
    local: HashSet<u64>,
    /// Local writes (key, version), none of which may ever reach the store. (Versions are
    /// counted per shard: only a key and its version name a write.)
    local_versions: HashSet<(u64, u64)>,
    /// Writes given up to the failed-writes sink, taken from it.
    sink: Vec<Write<u64, Val>>,
    /// The store's rows before the first op (version 0: any cache write supersedes them).
    initial: HashMap<u64, u64>,
    /// Values the removal listener heard leave memory, not yet checked.
    heard: Heard,
    /// Values written locally (`ReadOnly`): the store never holds them, yet they may leave
    /// memory clean.
    local_values: HashSet<(u64, u64)>,
    /// Faults that are armed: when none is, the store is healthy.
    down: bool,
    fail_pending: usize,
    malformed_pending: usize,
    partial_pending: usize,
    /// Operations applied, for failure messages.
    pub steps: usize,
}

fn build(
    store: &Store,
    clock: &Arc<ManualClock>,
    ordered: bool,
    heard: &Heard,
) -> Arc<Cache<u64, Val>> {
    let (h, s) = (heard.clone(), store.clone());
    let b = Cache::builder(store.clone())
        .on_removal(move |k, v: Val, _| {
            let stored = s.memory().get(&k).map(|v| v.0);
            h.lock().unwrap().push((k, v.0, stored));
        })
        .manual_flushing()
        .clock(clock.clone())
        .write_delay(Duration::from_millis(10))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(8))
        .max_batch(3)
        .shards(4)
        .flushers(2)
        // Small rings: the full-ring path (table scan) runs often.
        .dirty_ring_capacity(2);
    let b = if ordered {
        // Descending, so the order differs from both the keys' and the shards' order.
        b.flush_order(|a: &u64, b: &u64| b.cmp(a))
    } else {
        b
    };
    Arc::new(b.build().expect("valid model configuration"))
}

impl Harness {
    /// A fresh store holding `initial` rows and a cache in front of it.
    pub fn new(initial: &[(u64, u64)]) -> Self {
        Self::with_order(initial, false)
    }

    /// As [`Harness::new`]; with `ordered`, the cache sorts backlogs by key
    /// (`Builder::flush_order`).
    pub fn with_order(initial: &[(u64, u64)], ordered: bool) -> Self {
        let store: Store = Arc::new(FaultyStore::new());
        for &(k, v) in initial {
            store.memory().insert(k, Val(v));
        }
        let clock = Arc::new(ManualClock::new());
        let heard = Heard::default();
        let cache = build(&store, &clock, ordered, &heard);
        Harness {
            ordered,
            store,
            clock,
            cache,
            written: HashMap::new(),
            latest: HashMap::new(),
            local: HashSet::new(),
            local_versions: HashSet::new(),
            sink: Vec::new(),
            heard,
            local_values: HashSet::new(),
            initial: initial.iter().copied().collect(),
            down: false,
            fail_pending: 0,
            malformed_pending: 0,
            partial_pending: 0,
            steps: 0,
        }
    }

    fn healthy(&self) -> bool {
        !self.down
            && self.fail_pending == 0
            && self.partial_pending == 0
            && self.malformed_pending == 0
    }

    /// The store's rows, as plain numbers.
    fn store_rows(&self) -> HashMap<u64, u64> {
        self.store
            .memory()
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }

    /// Takes what went to the failed-writes sink: a key whose latest write is there left
    /// memory, and reads the store from now on.
    fn drain_sink(&mut self) {
        let rows = self.store_rows();
        for f in self.cache.failed_writes() {
            let k = *f.write.key();
            if self.latest.get(&k) == Some(&f.write.version()) {
                self.written.insert(k, rows.get(&k).copied());
                self.local.remove(&k);
            }
            self.sink.push(f.write);
        }
    }

    /// What `get(key)` must answer.
    fn expected(&self, key: u64) -> Option<u64> {
        match self.written.get(&key) {
            Some(v) => *v,
            None => self.initial.get(&key).copied(),
        }
    }

    /// The rows the store must hold once everything is written, for the keys whose latest
    /// write is not local (what the store holds of those is left open).
    fn expected_store(&self) -> HashMap<u64, u64> {
        (0..KEYS)
            .filter(|k| !self.local.contains(k))
            .filter_map(|k| self.expected(k).map(|v| (k, v)))
            .collect()
    }

    /// Batches the store will fail from now on are consumed by calls; we do not know how many
    /// calls a step makes, so after any store activity the one-shot faults are unknown until
    /// the store's own counters say so. The harness tracks them conservatively: a one-shot
    /// fault is "pending" until a step or flush ran after it was armed with enough calls.
    fn note_store_calls(&mut self, calls_before: usize) {
        let made = self.store.calls().len() - calls_before;
        // Each call consumes one armed fail (checked first by the store), else one malformed
        // answer, else one partial.
        let fails = made.min(self.fail_pending);
        self.fail_pending -= fails;
        let (malformed, partials) = if self.down {
            (0, 0)
        } else {
            let m = (made - fails).min(self.malformed_pending);
            (m, (made - fails - m).min(self.partial_pending))
        };
        self.malformed_pending -= malformed;
        self.partial_pending -= partials;
    }

    fn check_read(&self, key: u64, got: Result<Option<Val>, Error>) {
        match got.map(|v| v.map(|v| v.0)) {
            Ok(v) => assert_eq!(
                v,
                self.expected(key),
                "step {}: get({key}) broke read-your-writes",
                self.steps
            ),
            // A miss reads through; only a store that is down may fail it.
            Err(Error::Load(_)) if self.down => {}
            Err(e) => panic!("step {}: get({key}) failed: {e}", self.steps),
        }
    }

    fn check_store_equals_model(&self, what: &str) {
        let mut rows = self.store_rows();
        rows.retain(|k, _| !self.local.contains(k));
        assert_eq!(
            rows,
            self.expected_store(),
            "step {}: after {what} the store differs from the model",
            self.steps
        );
        assert_eq!(
            self.cache.metrics().dirty,
            0,
            "step {}: dirty entries after {what}",
            self.steps
        );
    }

    /// Applies one op and checks the invariants it touches.
    pub fn apply(&mut self, op: &Op) {
        self.steps += 1;
        match *op {
            Op::Put(k, v) => {
                let version = self.cache.put(k, Val(v)).expect("put on an open cache");
                self.wrote(k, Some(v), version);
            }
            Op::Remove(k) => {
                let version = self.cache.remove(&k).expect("remove on an open cache");
                self.wrote(k, None, version);
            }
            Op::ReadOnlyPut(k, v) => {
                let before = self.store.calls().len();
                // Leaving write-behind flushes first; a failing store makes that flush fail
                // and the pending write of `k`, if any, is superseded by the local one.
                let _ = self.cache.set_write_mode(WriteMode::ReadOnly);
                self.note_store_calls(before);
                let version = self.cache.put(k, Val(v)).expect("a local put");
                self.cache.set_write_mode(WriteMode::Behind).unwrap();
                self.wrote(k, Some(v), version);
                self.local.insert(k);
                self.local_versions.insert((k, version));
                self.local_values.insert((k, v));
            }
            Op::CloneBomb(n, ms) => {
                let before = self.store.calls().len();
                self.clock.advance(Duration::from_millis(ms));
                CLONE_BOMBS.with(|b| b.set(n));
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.cache.flush_step()
                }));
                CLONE_BOMBS.with(|b| b.set(0));
                assert!(
                    matches!(stepped, Ok(Ok(_))),
                    "step {}: a value's panicking Clone escaped flush_step",
                    self.steps
                );
                self.note_store_calls(before);
            }
            Op::ReadOnlyDuringBatch(k, v, ms) => self.read_only_during_batch(k, v, ms),
            Op::MalformedNext(n) => {
                self.store.malformed_next(n);
                self.malformed_pending = n;
            }
            Op::Get(k) => self.check_read(k, self.cache.get(&k)),
            Op::Step(ms) => {
                let before = self.store.calls().len();
                self.clock.advance(Duration::from_millis(ms));
                self.cache
                    .flush_step()
                    .expect("flush_step on an open cache");
                self.note_store_calls(before);
            }
            Op::Flush => {
                let healthy = self.healthy();
                let before = self.store.calls().len();
                let result = self.cache.flush();
                self.note_store_calls(before);
                self.drain_sink();
                match result {
                    Ok(()) => self.check_store_equals_model("flush() == Ok"),
                    // Writes whose clones kept panicking went to the sink.
                    Err(Error::Store(_)) if !self.sink.is_empty() => {}
                    Err(Error::FlushTimeout { .. }) if !healthy => {}
                    Err(e) => panic!(
                        "step {}: flush failed (store healthy: {healthy}): {e}",
                        self.steps
                    ),
                }
            }
            Op::FailNext(n) => {
                self.store.fail_next(n);
                self.fail_pending = n;
            }
            Op::PartialNext(n) => {
                self.store.partial_next(n);
                self.partial_pending = n;
            }
            Op::Down => {
                self.store.set_down(true);
                self.down = true;
            }
            Op::Heal => {
                self.store.heal();
                self.down = false;
                self.fail_pending = 0;
                self.malformed_pending = 0;
                self.partial_pending = 0;
            }
            Op::CloseReopen => self.close_and_reopen(),
            Op::Update(k, d) => {
                let before = self.expected(k);
                match self.cache.update(&k, |v| v.0 += d) {
                    Ok(Some(version)) => {
                        let old = before.unwrap_or_else(|| {
                            panic!("step {}: update({k}) changed an absent key", self.steps)
                        });
                        self.wrote(k, Some(old + d), version);
                    }
                    Ok(None) => assert_eq!(
                        before, None,
                        "step {}: update({k}) found no value",
                        self.steps
                    ),
                    Err(Error::Load(_)) if self.down => {}
                    Err(e) => panic!("step {}: update({k}) failed: {e}", self.steps),
                }
            }
            Op::Compute(k) => {
                let before = self.expected(k);
                match self
                    .cache
                    .compute(&k, |v| computed(v.map(|v| v.0)).map(Val))
                {
                    Ok(c) => {
                        let want = computed(before);
                        assert_eq!(
                            c.value.as_ref().map(|v| v.0),
                            want,
                            "step {}: compute({k}) from {before:?}",
                            self.steps
                        );
                        match c.version {
                            Some(version) => self.wrote(k, want, version),
                            None => assert_eq!((before, want), (None, None)),
                        }
                    }
                    Err(Error::Load(_)) if self.down => {}
                    Err(e) => panic!("step {}: compute({k}) failed: {e}", self.steps),
                }
            }
            Op::PutIfAbsent(k, v) => {
                let before = self.expected(k);
                match self.cache.put_if_absent(k, Val(v)) {
                    Ok(Some(existing)) => assert_eq!(
                        Some(existing.0),
                        before,
                        "step {}: put_if_absent({k}) saw another value",
                        self.steps
                    ),
                    Ok(None) => {
                        assert_eq!(
                            before, None,
                            "step {}: put_if_absent({k}) overwrote",
                            self.steps
                        );
                        // Its version, for the model: an identity compute writes the same
                        // value again and says which version it took.
                        let c = self
                            .cache
                            .compute(&k, |v| v.cloned())
                            .expect("the value is in memory");
                        assert_eq!(c.value.map(|v| v.0), Some(v));
                        self.wrote(k, Some(v), c.version.expect("a put"));
                    }
                    Err(Error::Load(_)) if self.down => {}
                    Err(e) => panic!("step {}: put_if_absent({k}) failed: {e}", self.steps),
                }
            }
            Op::Invalidate(k) => {
                let healthy = self.healthy();
                let before = self.store.calls().len();
                let r = self.cache.invalidate(&k);
                self.note_store_calls(before);
                self.check_invalidation(healthy, r.map(|_| ()));
            }
            Op::InvalidateAll => {
                let healthy = self.healthy();
                let before = self.store.calls().len();
                let r = self.cache.invalidate_all();
                self.note_store_calls(before);
                self.check_invalidation(healthy, r.map(|_| ()));
            }
            Op::PutAll(ref items) => {
                let versions = self
                    .cache
                    .put_all(items.iter().map(|&(k, v)| (k, Val(v))))
                    .expect("put_all on an open cache");
                // The later of two items of one key is its latest write; reads are checked
                // once all are recorded.
                for (&(k, v), version) in items.iter().zip(versions) {
                    self.written.insert(k, Some(v));
                    self.latest.insert(k, version);
                    self.local.remove(&k);
                }
                for &(k, _) in items {
                    self.check_read(k, self.cache.get(&k));
                }
            }
        }
        self.drain_sink();
        self.check_heard();
        // Read-your-writes holds for every key, not only the one touched (cheap: 8 keys).
        if matches!(
            op,
            Op::Step(_) | Op::Flush | Op::CloseReopen | Op::CloneBomb(..) | Op::ReadOnlyPut(..)
        ) {
            for k in 0..KEYS {
                self.check_read(k, self.cache.get(&k));
            }
        }
    }

    fn read_only_during_batch(&mut self, k: u64, v: u64, ms: u64) {
        let cache = Arc::downgrade(&self.cache);
        let local = Arc::new(std::sync::Mutex::new(None));
        let slot = local.clone();
        self.store.before_next_write(move || {
            if let Some(c) = cache.upgrade() {
                // The switch's flush is refused inside a store call; the mode switches.
                let _ = c.set_write_mode(WriteMode::ReadOnly);
                *slot.lock().unwrap() = Some(c.put(k, Val(v)).expect("a local put"));
            }
        });
        // The batch the local write lands in fails (consumed only if a batch is sent).
        let was_failing = self.fail_pending;
        self.store.fail_next(was_failing + 1);
        let before = self.store.calls().len();
        self.clock.advance(Duration::from_millis(ms));
        self.cache
            .flush_step()
            .expect("flush_step on an open cache");
        let ran = !self.store.take_hook();
        let made = self.store.calls().len() - before;
        if made == 0 {
            self.store.fail_next(was_failing);
        } else {
            self.fail_pending = was_failing + 1;
            self.note_store_calls(before);
        }
        self.cache.set_write_mode(WriteMode::Behind).unwrap();
        if ran {
            let version = local.lock().unwrap().take().expect("the hook wrote");
            self.wrote(k, Some(v), version);
            self.local.insert(k);
            self.local_versions.insert((k, version));
            self.local_values.insert((k, v));
        }
    }

    /// After `invalidate`/`invalidate_all`: a failure only from an unhealthy store; a local
    /// write that left memory is gone for good (the key reads the store again).
    fn check_invalidation(&mut self, healthy: bool, r: Result<(), Error>) {
        self.drain_sink();
        match r {
            Ok(()) => {}
            Err(Error::Store(_) | Error::FlushTimeout { .. } | Error::Timeout) if !healthy => {}
            Err(Error::Store(_)) if !self.sink.is_empty() => {}
            Err(e) => panic!(
                "step {}: invalidation failed (store healthy: {healthy}): {e}",
                self.steps
            ),
        }
        let stored = self.store_rows();
        let gone: Vec<u64> = self
            .local
            .iter()
            .copied()
            .filter(|k| !self.cache.contains_key(k))
            .collect();
        for k in gone {
            self.local.remove(&k);
            self.written.insert(k, stored.get(&k).copied());
        }
    }

    /// Every value the removal listener heard was clean when it left: the store held it,
    /// or it was a local write.
    fn check_heard(&mut self) {
        for (k, v, stored) in std::mem::take(&mut *self.heard.lock().unwrap()) {
            assert!(
                stored == Some(v) || self.local_values.contains(&(k, v)),
                "step {}: the listener heard key {k} leave with {v}, which the store did not hold ({stored:?})",
                self.steps
            );
        }
    }

    /// Records a write the application made and checks read-your-writes for it.
    fn wrote(&mut self, k: u64, v: Option<u64>, version: u64) {
        self.written.insert(k, v);
        self.latest.insert(k, version);
        self.local.remove(&k);
        self.check_read(k, self.cache.get(&k));
    }

    fn close_and_reopen(&mut self) {
        // Only a store healthy before close must take everything: close gives each record
        // `max_attempts + 1` rounds, which one-shot faults armed before it may use up.
        let healthy_before = self.healthy();
        let before = self.store.calls().len();
        let report = self.cache.close(Duration::from_secs(1));
        self.note_store_calls(before);
        let after_close = self.store.calls().len();
        self.drain_sink();
        let handed_back: HashMap<u64, Option<u64>> = report
            .unwritten
            .iter()
            .map(|w| (*w.key(), w.value().map(|v| v.0)))
            .collect();
        assert_eq!(
            handed_back.len(),
            report.unwritten.len(),
            "step {}: close handed a key back twice",
            self.steps
        );
        // No silent loss: every write is in the store, handed back with its latest value, or
        // (for a write given up) in the sink. A local write is none of them: close drops it.
        let stored = self.store_rows();
        for (&k, &v) in &self.written {
            if self.local.contains(&k) {
                assert!(
                    !handed_back.contains_key(&k) || handed_back.get(&k) != Some(&v),
                    "step {}: key {k}: close handed back a local write",
                    self.steps
                );
                continue;
            }
            let in_store = stored.get(&k).copied() == v;
            let returned = handed_back.get(&k) == Some(&v);
            assert!(
                in_store || returned,
                "step {}: key {k} (latest {v:?}) neither in the store ({:?}) nor handed back",
                self.steps,
                stored.get(&k)
            );
        }
        if healthy_before {
            assert!(
                report.unwritten.is_empty(),
                "step {}: close with a healthy store left {:?}",
                self.steps,
                report.unwritten
            );
        }
        assert!(matches!(self.cache.put(0, Val(0)), Err(Error::Closed)));
        assert!(matches!(self.cache.flush(), Err(Error::Closed)));
        assert_eq!(
            self.store.calls().len(),
            after_close,
            "step {}: the store was called after close returned",
            self.steps
        );
        // The application replays what close handed back into a new cache.
        self.cache = build(&self.store, &self.clock, self.ordered, &self.heard);
        for w in report.unwritten {
            let (k, v) = (*w.key(), w.value().map(|v| v.0));
            let version = match w {
                Write::Put { key, value, .. } => self.cache.put(key, value).unwrap(),
                Write::Delete { key, .. } => self.cache.remove(&key).unwrap(),
            };
            self.latest.insert(k, version);
            debug_assert_eq!(self.written.get(&k), Some(&v));
        }
        // Local writes did not survive the close: those keys read the store again.
        for k in std::mem::take(&mut self.local) {
            self.written.insert(k, stored.get(&k).copied());
        }
    }

    /// Heals the store, flushes, and checks the final state and the per-key version order.
    pub fn finish(mut self) {
        self.apply(&Op::Heal);
        self.apply(&Op::Flush);
        for (k, versions) in self.store.received_versions() {
            assert!(
                versions.windows(2).all(|w| w[0] <= w[1]),
                "key {k}: the store received versions out of order: {versions:?}"
            );
            for v in &versions {
                assert!(
                    !self.local_versions.contains(&(k, *v)),
                    "key {k}: a write made in ReadOnly mode (version {v}) reached the store"
                );
            }
        }
        let report = self.cache.close(Duration::from_secs(1));
        assert!(report.unwritten.is_empty(), "{:?}", report.unwritten);
    }
}
