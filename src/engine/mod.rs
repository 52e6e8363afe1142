//! The engine behind [`Cache`](crate::Cache): the [`Shared`] state, the flushers and the
//! loaders, and every path a call takes through them, one file per path: [`build`] (settings
//! to a running engine), [`write`], [`read`], [`flush`] and [`close`]. The cache itself is a thin
//! facade over it.

mod build;
mod close;
mod compute;
mod flush;
mod read;
mod write;

pub use close::CloseReport;
pub use compute::Computed;
#[cfg(feature = "tokio")]
pub(crate) use write::WriteNow;

use std::hash::Hash;
use std::time::Duration;

use crate::flusher::{Ctx, Flusher};
use crate::loader::Loader;
use crate::metrics::Metrics;
use crate::settings::Backpressure;
use crate::shared::Shared;
use crate::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use crate::sync::thread::JoinHandle;
use crate::sync::Mutex;

/// The engine: the [`Shared`] state plus the flushers, the loaders, the write mode and the
/// backpressure counters. Derefs to [`Shared`].
pub(crate) struct Inner<K, V> {
    pub(crate) shared: Shared<K, V>,
    pub(crate) flushers: Box<[Flusher<K>]>,
    /// The count trigger's step: a push that brings its ring to a multiple of this many keys
    /// adds that many to its flusher's count of queued keys (see `Cache::after_push`).
    pub(super) count_chunk: usize,
    pub(super) load_errors: AtomicU64,
    /// Per-shard backpressure: (high watermark, low watermark, policy).
    pub(super) backpressure: Option<(usize, usize, Backpressure)>,
    pub(super) bp_waits: AtomicU64,
    pub(super) bp_rejections: AtomicU64,
    pub(super) through_fallbacks: AtomicU64,
    /// Write-throughs the store ignored for a newer version of their key.
    pub(super) superseded_through: AtomicU64,
    /// The write mode, switchable at run time (`WriteMode as u8`).
    pub(super) mode: AtomicU8,
    /// Refresh-ahead jobs (only with `refresh_ahead`).
    pub(super) loader: Option<Loader<K>>,
    /// The background threads, for `close` to join (taken by the first close that can).
    pub(super) threads: Mutex<Option<Vec<JoinHandle>>>,
}

impl<K, V> std::ops::Deref for Inner<K, V> {
    type Target = Shared<K, V>;
    #[inline(always)]
    fn deref(&self) -> &Shared<K, V> {
        &self.shared
    }
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// What flusher `f`'s steps work with.
    #[inline]
    pub(crate) fn ctx<'a>(&'a self, f: &'a Flusher<K>) -> Ctx<'a, K, V> {
        Ctx {
            shared: &self.shared,
            me: f,
        }
    }

    #[inline]
    pub(super) fn flusher_of(&self, shard: usize) -> &Flusher<K> {
        // One flusher is the default: no division on the push path then.
        let n = self.flushers.len();
        &self.flushers[if n == 1 { 0 } else { shard % n }]
    }

    /// A snapshot of the counters and gauges.
    pub(crate) fn metrics(&self) -> Metrics {
        let mut m = Metrics::empty();
        let now = self.coarse_now();
        for s in self.shards.iter() {
            let t = s.table.lock();
            let c = t.counters();
            m.puts += c.puts;
            m.removes += c.removes;
            m.conflated += c.conflated;
            m.gets += c.hits + c.misses;
            m.hits += c.hits;
            m.misses += c.misses;
            m.loads += c.loads;
            m.evictions += c.evictions;
            m.expirations += c.expirations;
            m.refreshes += c.refreshes;
            m.refresh_failures += c.refresh_failures;
            m.load_waits += c.load_waits;
            m.entries += t.len(now) as u64;
            m.dirty += t.dirty as u64;
        }
        let lock_free_hits = self.lock_free_hits.sum();
        m.gets += lock_free_hits;
        m.hits += lock_free_hits;
        let inner = self;
        m.load_errors = inner.load_errors.load(Ordering::Relaxed);
        m.user_panics = inner.user_panics.load(Ordering::Relaxed);
        m.backpressure_waits = inner.bp_waits.load(Ordering::Relaxed);
        m.backpressure_rejections = inner.bp_rejections.load(Ordering::Relaxed);
        m.write_through_fallbacks = inner.through_fallbacks.load(Ordering::Relaxed);
        m.superseded += inner.superseded_through.load(Ordering::Relaxed);
        let now = inner.now();
        let mut hists = Metrics::histograms();
        for f in inner.flushers.iter() {
            f.stats.add_into(&mut m, now, &mut hists);
        }
        m.set_distributions(&hists);
        m.journal = self.journal.as_ref().map(|j| j.stats());
        if m.dirty == 0 {
            m.oldest_unflushed_age = Duration::ZERO;
        }
        m
    }
}
