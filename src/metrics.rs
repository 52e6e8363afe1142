//! Counters and the [`Metrics`] snapshot.
//!
//! Writer-side counters live in each shard's table and are bumped under the shard lock the
//! operation holds anyway, so they cost no atomic instruction on the hot path. A hit that
//! takes no lock counts in a [`Striped`] counter, one cache line per thread. Flusher-side
//! counters are relaxed atomics owned by each flusher.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{CachePadded, Mutex};

/// Stripes of a [`Striped`] counter (a few under loom, whose models run few threads).
#[cfg(not(writebehind_loom))]
const STRIPES: usize = 64;
#[cfg(writebehind_loom)]
const STRIPES: usize = 2;

/// A counter that threads add to without sharing a cache line: each thread adds to its own
/// stripe (threads are given stripes in turn, at their first count), and a snapshot sums
/// them. An add is a plain load and store of the stripe, no locked instruction, so two
/// threads that share a stripe (past 64 threads) can lose a count when they add at the same
/// moment: exact enough for hit counts, never for anything the engine decides with.
pub(crate) struct Striped {
    stripes: Box<[CachePadded<AtomicU64>]>,
}

impl Striped {
    pub(crate) fn new() -> Self {
        Striped {
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
        }
    }

    #[inline(always)]
    pub(crate) fn add_one(&self) {
        let s = &self.stripes[stripe()];
        s.store(s.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// The calling thread's stripe.
#[inline(always)]
fn stripe() -> usize {
    // A plain std atomic also under loom: the order in which threads take stripes is not
    // part of any model.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    crate::sync::thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

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
    /// `put` calls accepted, in every write mode (a write-through put counts once the store
    /// took it; one the store failed returned an error and does not count).
    pub puts: u64,
    /// `remove` calls accepted, counted as `puts` are.
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
    /// Misses that waited for another caller's load of the same key (single-flight).
    pub load_waits: u64,
    /// Clean entries evicted to respect the capacity or weight bound.
    pub evictions: u64,
    /// Entries that expired (time to live / idle, or a cached absence).
    pub expirations: u64,
    /// Refresh-ahead reloads that replaced a value.
    pub refreshes: u64,
    /// Refresh-ahead reloads that failed (the old value stayed).
    pub refresh_failures: u64,
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
    /// Writes the store ignored because it held a newer version of their key, written by a
    /// cache of a later generation ([`Applied::superseded`](crate::Applied)): handed to the
    /// failed-writes sink (written through: returned as an error).
    pub superseded: u64,
    /// Records queued again after a failure.
    pub retries: u64,
    /// Writes handed to the failed-writes sink.
    pub failed_writes: u64,
    /// Store calls that panicked (treated as unavailable).
    pub store_panics: u64,
    /// Panics the cache caught in user code other than the store: a key's or value's `Clone`,
    /// `Drop` or `Hash`, the clock, a weigher or a callback, on a thread of the cache or
    /// while it held a flusher's state. Each one marks health degraded until the next batch
    /// the store takes; docs/ARCHITECTURE.md, "When user code panics".
    pub user_panics: u64,
    /// Store calls that took longer than `store_timeout`.
    pub slow_store_calls: u64,
    /// Times a write given up on could not enter the full failed-writes sink (it stayed queued).
    pub sink_full: u64,
    /// Times a niced flusher thread handed its work to its keeper thread because it was late
    /// ([`Builder::flusher_nice`](crate::Builder::flusher_nice)).
    pub flusher_handoffs: u64,
    /// Times a niced flusher's keeper took a step its worker owed and had not started (a
    /// worker the CPU did not get to; [`Builder::flusher_nice`](crate::Builder::flusher_nice)).
    pub flusher_takeovers: u64,
    /// Writes that waited for room under `Backpressure::Block`.
    pub backpressure_waits: u64,
    /// Writes refused with `Error::Backpressure` (`Reject`, or `Block` timing out).
    pub backpressure_rejections: u64,
    /// Writes the writer sent to the store itself under `Backpressure::WriteThrough`.
    pub write_through_fallbacks: u64,
    /// How long the oldest write not yet in the store has waited (zero if none), as far as
    /// the flushers can tell: measured from when its shard's delay started.
    pub oldest_unflushed_age: Duration,
    /// Records per `write_all` call.
    pub batch_size: Distribution,
    /// Duration of `write_all` calls, in microseconds.
    pub store_latency_us: Distribution,
    /// The store's health as the flushers see it.
    pub health: Health,
    /// The journal's counters, latencies and replay, with a journal
    /// ([`Builder::journal`](crate::Builder::journal)).
    pub journal: Option<crate::journal::JournalStats>,
}

/// A summary of a histogram (hdrhistogram, 3 significant digits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Distribution {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Distribution {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Distribution::default();
        }
        Distribution {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // Auto-resizing, 3 significant digits: never fails to record.
    let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"));
    h.auto(true);
    h
}

/// One flusher's counters.
pub(crate) struct FlusherStats {
    pub(crate) batches: AtomicU64,
    pub(crate) records_written: AtomicU64,
    pub(crate) store_unavailable: AtomicU64,
    pub(crate) records_rejected: AtomicU64,
    pub(crate) superseded: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) failed_writes: AtomicU64,
    pub(crate) store_panics: AtomicU64,
    pub(crate) slow_store_calls: AtomicU64,
    pub(crate) sink_full: AtomicU64,
    pub(crate) handoffs: AtomicU64,
    pub(crate) takeovers: AtomicU64,
    /// 0 when healthy, else 1 + nanoseconds of the clock when degradation began.
    pub(crate) degraded_since: AtomicU64,
    /// 0 when nothing waits, else 1 + nanoseconds of the clock when the oldest waiting write
    /// was made (at the latest).
    oldest: AtomicU64,
    batch_size: Mutex<Histogram<u64>>,
    store_latency_us: Mutex<Histogram<u64>>,
}

impl Default for FlusherStats {
    fn default() -> Self {
        FlusherStats {
            batches: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            store_unavailable: AtomicU64::new(0),
            records_rejected: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
            store_panics: AtomicU64::new(0),
            slow_store_calls: AtomicU64::new(0),
            sink_full: AtomicU64::new(0),
            handoffs: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            degraded_since: AtomicU64::new(0),
            oldest: AtomicU64::new(0),
            batch_size: Mutex::new(new_histogram()),
            store_latency_us: Mutex::new(new_histogram()),
        }
    }
}

fn stamp(t: Duration) -> u64 {
    1 + u64::try_from(t.as_nanos()).unwrap_or(u64::MAX - 1)
}

impl FlusherStats {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Returns `true` if this turned the health from healthy to degraded.
    pub(crate) fn mark_degraded(&self, now: Duration) -> bool {
        self.degraded_since
            .compare_exchange(0, stamp(now), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Returns `true` if this turned the health from degraded to healthy.
    pub(crate) fn mark_healthy(&self) -> bool {
        self.degraded_since.swap(0, Ordering::Relaxed) != 0
    }

    pub(crate) fn set_oldest(&self, oldest: Option<Duration>) {
        self.oldest
            .store(oldest.map_or(0, stamp), Ordering::Relaxed);
    }

    pub(crate) fn record_batch(&self, records: usize, took: Duration) {
        let _ = self.batch_size.lock().record(records as u64);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self.store_latency_us.lock().record(us);
    }

    /// Adds this flusher's numbers into `m`; `now` is the clock's time, for ages.
    pub(crate) fn add_into(&self, m: &mut Metrics, now: Duration, hists: &mut [Histogram<u64>; 2]) {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        m.batches += r(&self.batches);
        m.records_written += r(&self.records_written);
        m.store_unavailable += r(&self.store_unavailable);
        m.records_rejected += r(&self.records_rejected);
        m.superseded += r(&self.superseded);
        m.retries += r(&self.retries);
        m.failed_writes += r(&self.failed_writes);
        m.store_panics += r(&self.store_panics);
        m.slow_store_calls += r(&self.slow_store_calls);
        m.sink_full += r(&self.sink_full);
        m.flusher_handoffs += r(&self.handoffs);
        m.flusher_takeovers += r(&self.takeovers);
        let oldest = r(&self.oldest);
        if oldest != 0 {
            let age = now.saturating_sub(Duration::from_nanos(oldest - 1));
            m.oldest_unflushed_age = m.oldest_unflushed_age.max(age);
        }
        let _ = hists[0].add(&*self.batch_size.lock());
        let _ = hists[1].add(&*self.store_latency_us.lock());
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
            load_waits: 0,
            evictions: 0,
            expirations: 0,
            refreshes: 0,
            refresh_failures: 0,
            entries: 0,
            dirty: 0,
            batches: 0,
            records_written: 0,
            store_unavailable: 0,
            records_rejected: 0,
            superseded: 0,
            retries: 0,
            failed_writes: 0,
            store_panics: 0,
            user_panics: 0,
            slow_store_calls: 0,
            sink_full: 0,
            flusher_handoffs: 0,
            flusher_takeovers: 0,
            backpressure_waits: 0,
            backpressure_rejections: 0,
            write_through_fallbacks: 0,
            oldest_unflushed_age: Duration::ZERO,
            batch_size: Distribution::default(),
            store_latency_us: Distribution::default(),
            health: Health::Healthy,
            journal: None,
        }
    }

    pub(crate) fn histograms() -> [Histogram<u64>; 2] {
        [new_histogram(), new_histogram()]
    }

    pub(crate) fn set_distributions(&mut self, hists: &[Histogram<u64>; 2]) {
        self.batch_size = Distribution::of(&hists[0]);
        self.store_latency_us = Distribution::of(&hists[1]);
    }
}

#[cfg(feature = "metrics")]
impl Metrics {
    /// Publishes this snapshot through the [`metrics`] facade: counters as
    /// `{prefix}_{name}_total` (set to the absolute count), gauges as `{prefix}_{name}`, and the
    /// distributions' p50/p99/p99.9/max as gauges. Call it periodically (e.g. every few
    /// seconds from the application's metrics loop); every series carries no labels.
    pub fn export(&self, prefix: &str) {
        let counters: [(&str, u64); 31] = [
            ("load_waits", self.load_waits),
            ("evictions", self.evictions),
            ("expirations", self.expirations),
            ("refreshes", self.refreshes),
            ("refresh_failures", self.refresh_failures),
            ("puts", self.puts),
            ("removes", self.removes),
            ("conflated", self.conflated),
            ("gets", self.gets),
            ("hits", self.hits),
            ("misses", self.misses),
            ("loads", self.loads),
            ("load_errors", self.load_errors),
            ("batches", self.batches),
            ("records_written", self.records_written),
            ("store_unavailable", self.store_unavailable),
            ("records_rejected", self.records_rejected),
            ("superseded", self.superseded),
            ("retries", self.retries),
            ("failed_writes", self.failed_writes),
            ("store_panics", self.store_panics),
            ("user_panics", self.user_panics),
            ("slow_store_calls", self.slow_store_calls),
            ("sink_full", self.sink_full),
            ("flusher_handoffs", self.flusher_handoffs),
            ("flusher_takeovers", self.flusher_takeovers),
            ("backpressure_waits", self.backpressure_waits),
            ("backpressure_rejections", self.backpressure_rejections),
            ("write_through_fallbacks", self.write_through_fallbacks),
            ("batch_size_count", self.batch_size.count),
            ("store_latency_us_count", self.store_latency_us.count),
        ];
        for (name, v) in counters {
            metrics::counter!(format!("{prefix}_{name}_total")).absolute(v);
        }
        let healthy = matches!(self.health, Health::Healthy);
        let gauges: [(&str, f64); 12] = [
            ("entries", self.entries as f64),
            ("dirty", self.dirty as f64),
            (
                "oldest_unflushed_age_seconds",
                self.oldest_unflushed_age.as_secs_f64(),
            ),
            ("healthy", if healthy { 1.0 } else { 0.0 }),
            ("batch_size_p50", self.batch_size.p50 as f64),
            ("batch_size_p99", self.batch_size.p99 as f64),
            ("batch_size_p999", self.batch_size.p999 as f64),
            ("batch_size_max", self.batch_size.max as f64),
            ("store_latency_us_p50", self.store_latency_us.p50 as f64),
            ("store_latency_us_p99", self.store_latency_us.p99 as f64),
            ("store_latency_us_p999", self.store_latency_us.p999 as f64),
            ("store_latency_us_max", self.store_latency_us.max as f64),
        ];
        for (name, v) in gauges {
            metrics::gauge!(format!("{prefix}_{name}")).set(v);
        }
    }
}
