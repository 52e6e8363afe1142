//! [`FaultyStore`]: a store for tests that injects failures and logs every call.
//!
//! It wraps a [`MemoryStore`] (version-guarded, like a real adapter) and can be told to fail
//! the next N batches, fail batches with a seeded probability, reject chosen records, split
//! batches into partial failures, panic, go down entirely, or block until released. Every
//! call is logged, so a test can check what the store *received*, in order.
//!
//! ```
//! use std::sync::Arc;
//! use writebehind::{Cache, testing::FaultyStore};
//!
//! let store = Arc::new(FaultyStore::<u64, u64>::new());
//! let cache = Cache::builder(store.clone()).manual_flushing().build().unwrap();
//! store.fail_next(1);
//! cache.put(1, 10).unwrap();
//! cache.flush().unwrap(); // the first batch fails, the retry succeeds
//! assert_eq!(store.memory().get(&1), Some(10));
//! assert_eq!(store.calls().len(), 2);
//! ```
//!
//! Tests over a `FaultyStore` share two helpers: [`eventually`] (poll a condition until a
//! deadline) and [`assert_versions_grow`] (per-key order of what the store received).
//!
//! The module also holds the support code of the crate's own benches, examples and load
//! driver, hidden from the documentation and not part of the API: seeded key generators
//! (`Rng`, `Zipf`, `scatter`) and, with the `demo` feature, the typed `profiles` schema and
//! its adapters.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{BatchError, StoreError};
use crate::store::{MemoryStore, Store, Write};

mod checks;
#[cfg(feature = "demo")]
#[doc(hidden)]
pub mod profiles;
mod workload;

pub use checks::{assert_versions_grow, eventually};
#[doc(hidden)]
pub use workload::{scatter, Rng, Zipf};

type RejectFn<K, V> = Box<dyn Fn(&Write<K, V>) -> bool + Send + Sync>;
type Hook = Box<dyn FnOnce() + Send>;

/// What a logged `write_all` call ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every record was applied (or ignored as stale by the version guard).
    Applied,
    /// Nothing was applied; the call returned `BatchError::Unavailable`.
    Unavailable,
    /// The records at these indices failed; the others were applied.
    Partial(Vec<usize>),
    /// The call panicked; nothing was applied.
    Panicked,
    /// Nothing was applied, and the call answered with a `Partial` that does not account for
    /// the batch (an index outside it).
    Malformed,
}

/// One logged `write_all` call.
#[derive(Clone, Debug)]
pub struct Call<K, V> {
    /// The batch as received.
    pub batch: Vec<Write<K, V>>,
    /// How it ended.
    pub outcome: Outcome,
}

struct Faults<K, V> {
    fail_next: usize,
    panic_next: usize,
    partial_next: usize,
    malformed_next: usize,
    down: bool,
    probability: f64,
    rng: u64,
    latency: Duration,
    blocked: bool,
    waiting: usize,
    reject: Option<RejectFn<K, V>>,
    before_next_write: Option<Hook>,
    log: Vec<Call<K, V>>,
    load_calls: usize,
}

/// A fault-injecting, call-logging store for tests. See the [module docs](self).
pub struct FaultyStore<K, V> {
    memory: MemoryStore<K, V>,
    faults: Mutex<Faults<K, V>>,
    gate: Condvar,
}

impl<K, V> Default for FaultyStore<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    fn default() -> Self {
        FaultyStore {
            memory: MemoryStore::new(),
            faults: Mutex::new(Faults {
                fail_next: 0,
                panic_next: 0,
                partial_next: 0,
                malformed_next: 0,
                down: false,
                probability: 0.0,
                rng: 0x2545_F491_4F6C_DD1D,
                latency: Duration::ZERO,
                blocked: false,
                waiting: 0,
                reject: None,
                before_next_write: None,
                log: Vec::new(),
                load_calls: 0,
            }),
            gate: Condvar::new(),
        }
    }
}

impl<K, V> FaultyStore<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// A healthy, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn faults(&self) -> MutexGuard<'_, Faults<K, V>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version-guarded data behind the faults.
    pub fn memory(&self) -> &MemoryStore<K, V> {
        &self.memory
    }

    /// The next `n` `write_all` calls fail as unavailable, applying nothing.
    pub fn fail_next(&self, n: usize) {
        self.faults().fail_next = n;
    }

    /// Every `write_all` call fails as unavailable with probability `p`, drawn from a
    /// generator seeded with `seed` (so a failing run can be replayed).
    pub fn fail_with_probability(&self, p: f64, seed: u64) {
        let mut f = self.faults();
        f.probability = p.clamp(0.0, 1.0);
        f.rng = seed | 1;
    }

    /// The next `n` `write_all` calls apply the records at even indices and report the odd
    /// ones as unavailable (a `Partial` result).
    pub fn partial_next(&self, n: usize) {
        self.faults().partial_next = n;
    }

    /// The next `n` `write_all` calls (after any armed `fail_next`) apply nothing and answer
    /// with a malformed `Partial`: one failed index just past the batch, which does not
    /// account for it. A cache must retry such a batch whole.
    pub fn malformed_next(&self, n: usize) {
        self.faults().malformed_next = n;
    }

    /// Runs `hook` at the start of the next `write_all` call, inside it (as a store that calls
    /// back into the cache would), before any fault is applied. `take_hook` disarms it.
    pub fn before_next_write(&self, hook: impl FnOnce() + Send + 'static) {
        self.faults().before_next_write = Some(Box::new(hook));
    }

    /// Disarms the hook of [`FaultyStore::before_next_write`]; `true` if it had not run.
    pub fn take_hook(&self) -> bool {
        self.faults().before_next_write.take().is_some()
    }

    /// The next `n` `write_all` calls panic before applying anything.
    pub fn panic_next(&self, n: usize) {
        self.faults().panic_next = n;
    }

    /// While down, every call (`load` and `write_all`) fails as unavailable.
    pub fn set_down(&self, down: bool) {
        self.faults().down = down;
    }

    /// Records for which `reject` returns `true` are rejected (`Partial`); the rest apply.
    pub fn reject_if(&self, reject: impl Fn(&Write<K, V>) -> bool + Send + Sync + 'static) {
        self.faults().reject = Some(Box::new(reject));
    }

    /// Stops rejecting records.
    pub fn stop_rejecting(&self) {
        self.faults().reject = None;
    }

    /// Clears every fault (down, probabilities, pending failures, rejections, latency).
    pub fn heal(&self) {
        let mut f = self.faults();
        f.fail_next = 0;
        f.panic_next = 0;
        f.partial_next = 0;
        f.malformed_next = 0;
        f.down = false;
        f.probability = 0.0;
        f.reject = None;
        f.latency = Duration::ZERO;
    }

    /// Every call sleeps this long first.
    pub fn set_latency(&self, d: Duration) {
        self.faults().latency = d;
    }

    /// From now on, calls wait at the gate until [`FaultyStore::release`].
    pub fn hold(&self) {
        self.faults().blocked = true;
    }

    /// Opens the gate.
    pub fn release(&self) {
        self.faults().blocked = false;
        self.gate.notify_all();
    }

    /// Waits until at least one call is waiting at the gate, or `timeout` passes; returns
    /// whether one is.
    pub fn wait_until_held(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut f = self.faults();
        while f.waiting == 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            f = self
                .gate
                .wait_timeout(f, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Every `write_all` call so far, in order.
    pub fn calls(&self) -> Vec<Call<K, V>> {
        self.faults().log.clone()
    }

    /// Number of `load` calls (each key of a `load_all` counts once).
    pub fn load_calls(&self) -> usize {
        self.faults().load_calls
    }

    /// Versions each key was *received* with, in order of receipt, over all calls.
    pub fn received_versions(&self) -> HashMap<K, Vec<u64>> {
        let mut out: HashMap<K, Vec<u64>> = HashMap::new();
        for call in &self.faults().log {
            for w in &call.batch {
                out.entry(w.key().clone()).or_default().push(w.version());
            }
        }
        out
    }

    /// Waits at the gate and sleeps the latency; returns the lock.
    fn enter(&self) -> MutexGuard<'_, Faults<K, V>> {
        let mut f = self.faults();
        if f.blocked {
            f.waiting += 1;
            self.gate.notify_all();
            while f.blocked {
                f = self.gate.wait(f).unwrap_or_else(|e| e.into_inner());
            }
            f.waiting -= 1;
        }
        let latency = f.latency;
        if !latency.is_zero() {
            drop(f);
            std::thread::sleep(latency);
            f = self.faults();
        }
        f
    }
}

impl<K, V> Store<K, V> for FaultyStore<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn load(&self, key: &K) -> Result<Option<V>, StoreError> {
        let mut f = self.enter();
        f.load_calls += 1;
        if f.down {
            return Err(StoreError::unavailable("faulty store is down"));
        }
        drop(f);
        self.memory.load(key)
    }

    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError> {
        let hook = self.faults().before_next_write.take();
        if let Some(hook) = hook {
            hook();
        }
        let mut f = self.enter();
        let log = |f: &mut Faults<K, V>, outcome: Outcome| {
            f.log.push(Call {
                batch: batch.to_vec(),
                outcome,
            });
        };
        if f.panic_next > 0 {
            f.panic_next -= 1;
            log(&mut f, Outcome::Panicked);
            drop(f);
            panic!("faulty store: injected panic");
        }
        let random_fail = if f.probability > 0.0 {
            f.rng ^= f.rng << 13;
            f.rng ^= f.rng >> 7;
            f.rng ^= f.rng << 17;
            ((f.rng >> 11) as f64 / (1u64 << 53) as f64) < f.probability
        } else {
            false
        };
        if f.down || f.fail_next > 0 || random_fail {
            f.fail_next = f.fail_next.saturating_sub(1);
            log(&mut f, Outcome::Unavailable);
            return Err(BatchError::unavailable(
                "faulty store: injected unavailability",
            ));
        }
        if f.malformed_next > 0 {
            f.malformed_next -= 1;
            log(&mut f, Outcome::Malformed);
            return Err(BatchError::Partial(vec![(
                batch.len(),
                StoreError::rejected("faulty store: a failure outside the batch"),
            )]));
        }
        let split = if f.partial_next > 0 {
            f.partial_next -= 1;
            true
        } else {
            false
        };
        let mut failed = Vec::new();
        for (i, w) in batch.iter().enumerate() {
            if f.reject.as_ref().is_some_and(|r| r(w)) {
                failed.push((i, StoreError::rejected("faulty store: injected rejection")));
            } else if split && i % 2 == 1 {
                failed.push((
                    i,
                    StoreError::unavailable("faulty store: injected partial failure"),
                ));
            } else {
                self.memory.apply(w);
            }
        }
        if failed.is_empty() {
            log(&mut f, Outcome::Applied);
            Ok(())
        } else {
            log(
                &mut f,
                Outcome::Partial(failed.iter().map(|(i, _)| *i).collect()),
            );
            Err(BatchError::Partial(failed))
        }
    }
}
