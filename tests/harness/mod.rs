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
//! exactly and nothing is dirty; after `close` that every write is in the store or in the
//! report; at the end that the versions the store received per key never went down.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, ManualClock, Write};

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
    /// Every fault is cleared.
    Heal,
    /// `close`, then a new cache over the same store, replaying what close handed back.
    CloseReopen,
}

type Store = Arc<FaultyStore<u64, u64>>;

/// The system under test and its reference models.
pub struct Harness {
    /// The cache hands backlogs to the store in key order (`Builder::flush_order`).
    ordered: bool,
    store: Store,
    clock: Arc<ManualClock>,
    cache: Cache<u64, u64>,
    /// The answer `get` must give for every key the application wrote (`None`: deleted).
    written: HashMap<u64, Option<u64>>,
    /// The store's rows before the first op (version 0: any cache write supersedes them).
    initial: HashMap<u64, u64>,
    /// Faults that are armed: when none is, the store is healthy.
    down: bool,
    fail_pending: usize,
    partial_pending: usize,
    /// Operations applied, for failure messages.
    pub steps: usize,
}

fn build(store: &Store, clock: &Arc<ManualClock>, ordered: bool) -> Cache<u64, u64> {
    let b = Cache::builder(store.clone())
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
    b.build().expect("valid model configuration")
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
            store.memory().insert(k, v);
        }
        let clock = Arc::new(ManualClock::new());
        let cache = build(&store, &clock, ordered);
        Harness {
            ordered,
            store,
            clock,
            cache,
            written: HashMap::new(),
            initial: initial.iter().copied().collect(),
            down: false,
            fail_pending: 0,
            partial_pending: 0,
            steps: 0,
        }
    }

    fn healthy(&self) -> bool {
        !self.down && self.fail_pending == 0 && self.partial_pending == 0
    }

    /// What `get(key)` must answer.
    fn expected(&self, key: u64) -> Option<u64> {
        match self.written.get(&key) {
            Some(v) => *v,
            None => self.initial.get(&key).copied(),
        }
    }

    /// The rows the store must hold once everything is written.
    fn expected_store(&self) -> HashMap<u64, u64> {
        (0..KEYS)
            .filter_map(|k| self.expected(k).map(|v| (k, v)))
            .collect()
    }

    /// Batches the store will fail from now on are consumed by calls; we do not know how many
    /// calls a step makes, so after any store activity the one-shot faults are unknown until
    /// the store's own counters say so. The harness tracks them conservatively: a one-shot
    /// fault is "pending" until a step or flush ran after it was armed with enough calls.
    fn note_store_calls(&mut self, calls_before: usize) {
        let made = self.store.calls().len() - calls_before;
        // Each call consumes one armed fail (checked first by the store), else one partial.
        let fails = made.min(self.fail_pending);
        self.fail_pending -= fails;
        let partials = if self.down {
            0
        } else {
            (made - fails).min(self.partial_pending)
        };
        self.partial_pending -= partials;
    }

    fn check_read(&self, key: u64, got: Result<Option<u64>, Error>) {
        match got {
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
        assert_eq!(
            self.store.memory().snapshot(),
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
                self.cache.put(k, v).expect("put on an open cache");
                self.written.insert(k, Some(v));
                self.check_read(k, self.cache.get(&k));
            }
            Op::Remove(k) => {
                self.cache.remove(&k).expect("remove on an open cache");
                self.written.insert(k, None);
                self.check_read(k, self.cache.get(&k));
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
                match result {
                    Ok(()) => self.check_store_equals_model("flush() == Ok"),
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
                self.partial_pending = 0;
            }
            Op::CloseReopen => self.close_and_reopen(),
        }
        // Read-your-writes holds for every key, not only the one touched (cheap: 8 keys).
        if matches!(op, Op::Step(_) | Op::Flush | Op::CloseReopen) {
            for k in 0..KEYS {
                self.check_read(k, self.cache.get(&k));
            }
        }
    }

    fn close_and_reopen(&mut self) {
        let before = self.store.calls().len();
        let report = self.cache.close(Duration::from_secs(1));
        self.note_store_calls(before);
        let after_close = self.store.calls().len();
        let handed_back: HashMap<u64, Option<u64>> = report
            .unwritten
            .iter()
            .map(|w| (*w.key(), w.value().copied()))
            .collect();
        assert_eq!(
            handed_back.len(),
            report.unwritten.len(),
            "step {}: close handed a key back twice",
            self.steps
        );
        // No silent loss: every write is in the store, or handed back with its latest value.
        let stored = self.store.memory().snapshot();
        for (&k, &v) in &self.written {
            let in_store = stored.get(&k).copied() == v;
            let returned = handed_back.get(&k) == Some(&v);
            assert!(
                in_store || returned,
                "step {}: key {k} (latest {v:?}) neither in the store ({:?}) nor handed back",
                self.steps,
                stored.get(&k)
            );
        }
        if self.healthy() {
            assert!(
                report.unwritten.is_empty(),
                "step {}: close with a healthy store left {:?}",
                self.steps,
                report.unwritten
            );
        }
        assert!(matches!(self.cache.put(0, 0), Err(Error::Closed)));
        assert!(matches!(self.cache.flush(), Err(Error::Closed)));
        assert_eq!(
            self.store.calls().len(),
            after_close,
            "step {}: the store was called after close returned",
            self.steps
        );
        // The application replays what close handed back into a new cache.
        self.cache = build(&self.store, &self.clock, self.ordered);
        for w in report.unwritten {
            match w {
                Write::Put { key, value, .. } => self.cache.put(key, value).unwrap(),
                Write::Delete { key, .. } => self.cache.remove(&key).unwrap(),
            };
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
        }
        let report = self.cache.close(Duration::from_secs(1));
        assert!(report.unwritten.is_empty(), "{:?}", report.unwritten);
    }
}
