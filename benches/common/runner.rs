//! How the benches time a contender on a workload: instances built (and prefilled) outside
//! the timed part, fresh ones where the workload or the contender needs them, and each run
//! started once the process is quiet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use writebehind::MemoryStore;

use super::contender::{Contender, SharedStore};
use super::contenders::Kind;
use super::value::Val;
use super::workload::{Dist, Mix, Plan, Workload, MISS_KEYS};

/// Most operations per thread one contender instance runs in a workload that needs fresh
/// keys (get miss, distinct puts); longer runs are split over fresh instances.
pub fn fresh_chunk(threads: usize) -> u64 {
    MISS_KEYS / threads as u64
}

/// Does this workload need a fresh contender (fresh keys) for every run?
pub fn needs_fresh(w: &Workload) -> bool {
    w.mix == Mix::GetMiss || w.dist == Dist::Distinct
}

/// A contender ready for `w`: built on its store and prefilled (not timed).
pub fn prepared<V: Val>(
    kind: Kind,
    w: &Workload,
    threads: usize,
    miss_store: &Option<SharedStore<V>>,
) -> Box<dyn Contender<V>> {
    let store = match (w.mix, miss_store) {
        (Mix::GetMiss, Some(s)) => s.clone(),
        _ => Arc::new(MemoryStore::new()),
    };
    let c = kind.build(store, threads);
    if w.mix != Mix::GetMiss && w.dist != Dist::Distinct {
        c.prefill(w.keyspace);
    }
    c
}

/// CPU time this process has used, all threads together (`None` where it cannot be read).
#[cfg(target_os = "linux")]
fn process_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` for the duration of the call, and
    // CLOCK_PROCESS_CPUTIME_ID is a clock every Linux kernel since 2.6.12 provides.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| {
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn process_cpu() -> Option<Duration> {
    None
}

/// Runs that started before the process was quiet (see [`quiesce`]), for the report.
pub static UNQUIET_RUNS: AtomicU64 = AtomicU64::new(0);
/// Time spent waiting for a quiet process before runs, in nanoseconds, for the report.
pub static QUIESCE_WAITED_NS: AtomicU64 = AtomicU64::new(0);

/// Waits, untimed, until the process is quiet: less than 5 % of one core used over a 20 ms
/// window by all its threads (the caller sleeps). Contenders share the process, and some
/// keep working after their run returns (a runtime's background flush, a writer thread
/// draining its channel): without this wait, that work lands on whichever contender runs
/// next, always the same one in the report's rotation. Gives up after 3 s (counted in
/// [`UNQUIET_RUNS`]); returns at once where process CPU time cannot be read.
pub fn quiesce() {
    const WINDOW: Duration = Duration::from_millis(20);
    const BUSY: Duration = Duration::from_millis(1);
    const GIVE_UP: Duration = Duration::from_secs(3);
    let start = Instant::now();
    while let Some(before) = process_cpu() {
        std::thread::sleep(WINDOW);
        let Some(after) = process_cpu() else { break };
        if after.saturating_sub(before) < BUSY {
            break;
        }
        if start.elapsed() >= GIVE_UP {
            UNQUIET_RUNS.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    QUIESCE_WAITED_NS.fetch_add(waited, Ordering::Relaxed);
}

/// One contender of a workload, as the runners time it: its cached instance, if any, and
/// what a fresh one is built from.
pub struct Runner<V: Val> {
    kind: Kind,
    /// The instance reused for workloads on prefilled keys.
    pub cached: Option<Box<dyn Contender<V>>>,
    /// The read-through store of the get-miss workload.
    miss_store: Option<SharedStore<V>>,
    /// Other contenders' instances stay alive between this contender's runs (the ratio
    /// report, which keeps every contender of a workload). Then a contender busy between its
    /// runs ([`Kind::busy_between_runs`]) gets a fresh instance for each run, so that it is
    /// never alive during another contender's run. Without it (the criterion matrix, which
    /// drops a contender's instance before the next contender runs) it keeps one instance
    /// for the group: a fresh one per run would put its prefill inside criterion's warm-up
    /// and sample planning, which time the whole call, and leave one operation per sample.
    /// Its own background work is then its own cost, so its runs do not wait for a quiet
    /// process.
    beside_others: bool,
}

impl<V: Val> Runner<V> {
    pub fn new(kind: Kind, miss_store: Option<SharedStore<V>>, beside_others: bool) -> Self {
        Runner {
            kind,
            cached: None,
            miss_store,
            beside_others,
        }
    }

    /// Times `ops` operations per thread of `plan`, building fresh instances as the
    /// workload or the contender needs ([`needs_fresh`], [`Kind::busy_between_runs`]; their
    /// construction and teardown are not timed), each run starting once the process is
    /// quiet ([`quiesce`]).
    pub fn timed_run(
        &mut self,
        plan: &Arc<Plan>,
        threads: usize,
        ops: u64,
        run_id: u64,
    ) -> Duration {
        let (kind, miss_store) = (self.kind, &self.miss_store);
        let w = plan.workload;
        let busy = kind.busy_between_runs();
        if !(needs_fresh(&w) || busy && self.beside_others) {
            let c = self
                .cached
                .get_or_insert_with(|| prepared(kind, &w, threads, miss_store));
            if !busy {
                quiesce();
            }
            return c.run(plan, threads, ops, run_id);
        }
        // Fresh instances: one per chunk of fresh keys, or one for the whole run.
        let chunk = if needs_fresh(&w) {
            fresh_chunk(threads)
        } else {
            ops
        };
        let mut left = ops;
        let mut total = Duration::ZERO;
        while left > 0 {
            let n = left.min(chunk);
            let c = prepared(kind, &w, threads, miss_store);
            quiesce();
            total += c.run(plan, threads, n, 0);
            drop(c);
            left -= n;
        }
        total
    }
}
