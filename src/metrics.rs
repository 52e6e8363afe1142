//! Counters and the [`Metrics`] snapshot.
//!
//! Writer-side counters live in each shard's table and are bumped under the shard lock the
//! operation holds anyway, so they cost no atomic instruction on the hot path. Flusher-side
//! counters are relaxed atomics owned by each flusher.

use std::time::Duration;

use crate::sync::atomic::{AtomicU64, Ordering};

/// Whether the store has been accepting writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// The last store call succeeded (or none was made).
    Healthy,
    /// Store calls have been failing as unavailable since this time (of the cache's clock).
    Degraded {
        /// When the first failure of the current run of failures happened.
        since: Duration,
    },
}

/// A snapshot of a cache's counters and gauges. Counters only grow.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// `put` calls accepted.
    pub puts: u64,
    /// `remove` calls accepted.
    pub removes: u64,
    /// Writes that did not queue anything new: the key was already queued in the open epoch.
    pub conflated: u64,
    /// `get` calls.
    pub gets: u64,
    /// `get` calls answered from memory (tombstones included).
    pub hits: u64,
    /// `get` calls that missed memory.
    pub misses: u64,
    /// Keys read through the store.
    pub loads: u64,
    /// Read-throughs that failed.
    pub load_errors: u64,
    /// Live entries (gauge).
    pub entries: u64,
    /// Entries with a write not yet in the store (gauge).
    pub dirty: u64,
    /// `write_all` calls.
    pub batches: u64,
    /// Records the store accepted.
    pub records_written: u64,
    /// Store calls that failed as unavailable (whole batches, or records of partial batches).
    pub store_unavailable: u64,
    /// Records the store rejected.
    pub records_rejected: u64,
    /// Records queued again after a failure.
    pub retries: u64,
    /// Writes handed to the failed-writes sink.
    pub failed_writes: u64,
    /// Store calls that panicked (treated as unavailable).
    pub store_panics: u64,
    /// The store's health as the flushers see it.
    pub health: Health,
}

/// One flusher's counters.
#[derive(Debug, Default)]
pub(crate) struct FlusherStats {
    pub(crate) batches: AtomicU64,
    pub(crate) records_written: AtomicU64,
    pub(crate) store_unavailable: AtomicU64,
    pub(crate) records_rejected: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) failed_writes: AtomicU64,
    pub(crate) store_panics: AtomicU64,
    /// 0 when healthy, else 1 + nanoseconds of the clock when degradation began.
    pub(crate) degraded_since: AtomicU64,
}

impl FlusherStats {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn mark_degraded(&self, now: Duration) {
        let stamp = 1 + u64::try_from(now.as_nanos()).unwrap_or(u64::MAX - 1);
        let _ =
            self.degraded_since
                .compare_exchange(0, stamp, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn mark_healthy(&self) {
        self.degraded_since.store(0, Ordering::Relaxed);
    }

    pub(crate) fn add_into(&self, m: &mut Metrics) {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        m.batches += r(&self.batches);
        m.records_written += r(&self.records_written);
        m.store_unavailable += r(&self.store_unavailable);
        m.records_rejected += r(&self.records_rejected);
        m.retries += r(&self.retries);
        m.failed_writes += r(&self.failed_writes);
        m.store_panics += r(&self.store_panics);
        let since = r(&self.degraded_since);
        if since != 0 {
            let since = Duration::from_nanos(since - 1);
            m.health = match m.health {
                Health::Degraded { since: s } if s <= since => m.health,
                _ => Health::Degraded { since },
            };
        }
    }
}

impl Metrics {
    pub(crate) fn empty() -> Self {
        Metrics {
            puts: 0,
            removes: 0,
            conflated: 0,
            gets: 0,
            hits: 0,
            misses: 0,
            loads: 0,
            load_errors: 0,
            entries: 0,
            dirty: 0,
            batches: 0,
            records_written: 0,
            store_unavailable: 0,
            records_rejected: 0,
            retries: 0,
            failed_writes: 0,
            store_panics: 0,
            health: Health::Healthy,
        }
    }
}
