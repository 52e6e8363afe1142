//! The interface the runner times, and how a synchronous cache becomes a contender: `N`
//! threads released by a barrier, each running a fixed number of operations.

use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use writebehind::{MemoryStore, Store};

use super::value::Val;
use super::workload::{key_of, Mix, Plan, MISS_BASE, PLAN_LEN};

/// A synchronous contender: what one thread calls. Shared in an `Arc`, it is a
/// [`Contender`] its threads run on.
pub trait SyncCache<V: Val>: Send + Sync + 'static {
    /// The contender's name in reports (see also [`SyncCache::label`]).
    const NAME: &'static str;
    /// `get`, reading through the store on a miss.
    fn get(&self, k: u64) -> Option<V>;
    fn put(&self, k: u64, v: V);
    /// Write-behind contenders: returns once every put made so far is in the store. Called
    /// inside the timed part after a run with puts, so a backlog left in a queue is paid for
    /// (sustained throughput, not the speed of filling a buffer).
    fn settle(&self) {}
    fn report(&self) -> Option<String> {
        None
    }
    /// The contender's name when one type serves several (writebehind and its configurations).
    fn label(&self) -> Option<&'static str> {
        None
    }
}

/// Something the runner can time.
pub trait Contender<V: Val>: Send + Sync {
    fn name(&self) -> &'static str;
    /// Runs `ops` operations of `plan` on each of `threads` threads, started together;
    /// returns the wall time from the start until the last thread finished. `run_id` makes
    /// distinct keys differ between runs.
    fn run(&self, plan: &Arc<Plan>, threads: usize, ops: u64, run_id: u64) -> Duration;
    /// Puts the prefill keys and waits until a write-behind contender has written them (not
    /// timed: a flusher still busy with the prefill would steal the measured threads' cores).
    fn prefill(&self, n: u64);
    /// A line about what happened inside (writebehind: its metrics).
    fn report(&self) -> Option<String> {
        None
    }
}

impl<V: Val, C: SyncCache<V>> Contender<V> for Arc<C> {
    fn name(&self) -> &'static str {
        SyncCache::label(&**self).unwrap_or(C::NAME)
    }
    fn run(&self, plan: &Arc<Plan>, threads: usize, ops: u64, run_id: u64) -> Duration {
        run_threads(self, plan, threads, ops, run_id)
    }
    fn report(&self) -> Option<String> {
        SyncCache::report(&**self)
    }
    fn prefill(&self, n: u64) {
        for k in 0..n {
            SyncCache::put(&**self, k, V::make(k));
        }
        SyncCache::settle(&**self);
    }
}

/// Runs `ops` operations per thread on `threads` OS threads released by a barrier.
pub fn run_threads<V: Val, C: SyncCache<V>>(
    c: &Arc<C>,
    plan: &Arc<Plan>,
    threads: usize,
    ops: u64,
    run_id: u64,
) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<JoinHandle<(Instant, Instant)>> = (0..threads)
        .map(|t| {
            let c = c.clone();
            let plan = plan.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let mut sink = 0u64;
                for i in 0..ops {
                    let k = key_of(&plan, t, i, run_id, ops);
                    if plan.writes[t][(i as usize) & (PLAN_LEN - 1)] {
                        c.put(k, V::make(i));
                    } else {
                        // The whole value is handed to black_box: otherwise the optimizer may
                        // drop the copy of a value nobody reads (it did for dashmap's
                        // 256-byte gets, which then read one cache line of five).
                        let got = std::hint::black_box(c.get(k));
                        sink = sink.wrapping_add(got.is_some() as u64);
                    }
                }
                std::hint::black_box(sink);
                (start, Instant::now())
            })
        })
        .collect();
    let times: Vec<(Instant, Instant)> = handles
        .into_iter()
        .map(|h| h.join().expect("bench thread panicked"))
        .collect();
    let start = times.iter().map(|t| t.0).min().expect("one thread");
    let mut end = times.iter().map(|t| t.1).max().expect("one thread");
    if plan.workload.mix != Mix::GetHit && plan.workload.mix != Mix::GetMiss {
        c.settle();
        end = Instant::now();
    }
    end - start
}

/// From the first start to the last end of `times`.
pub fn span(times: impl Iterator<Item = (Instant, Instant)>) -> Duration {
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for (s, e) in times {
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
    }
    last.unwrap() - first.unwrap()
}

/// The store every contender reads through / writes to.
pub type SharedStore<V> = Arc<MemoryStore<u64, V>>;

/// A get's miss, read through: the store's value of `k`, handed to `insert` to be cached.
#[inline(always)]
pub fn read_through<V: Val>(
    store: &SharedStore<V>,
    k: u64,
    insert: impl FnOnce(u64, V),
) -> Option<V> {
    let v = store.load(&k).expect("in-memory store")?;
    insert(k, v.clone());
    Some(v)
}

/// A store holding `MISS_BASE..MISS_BASE + n` (for read-through misses).
pub fn miss_store<V: Val>(n: u64) -> SharedStore<V> {
    let s = Arc::new(MemoryStore::new());
    for k in 0..n {
        s.insert(MISS_BASE + k, V::make(k));
    }
    s
}
