//! [`Shared`]: the state of a cache that writers, readers and the flusher threads all read:
//! the shards, the store, the clock, the failed-writes sink and the progress signal. It knows
//! nothing of the flushers themselves, so the flusher sits above it and the engine above both.

use std::collections::VecDeque;
use std::hash::Hash;
use std::time::Duration;

use crate::error::{Error, StoreError};
use crate::guard::call_store;
use crate::settings::{FailedWriteHook, KeyOrder, Weigher};
use crate::shard::Shard;
use crate::store::FailedWrite;
use crate::store::Store;
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Condvar, Mutex};

/// State every thread of a cache shares; see the [module docs](self).
pub(crate) struct Shared<K, V> {
    pub(crate) shards: Box<[Shard<K, V>]>,
    pub(crate) shard_mask: u64,
    pub(crate) hasher: ahash::RandomState,
    pub(crate) store: Box<dyn Store<K, V>>,
    pub(crate) config: Config,
    pub(crate) clock: std::sync::Arc<dyn crate::Clock>,
    /// Set by `close`; writers check it under their shard lock.
    pub(crate) closed: AtomicBool,
    /// Threads inside a read-through or write-through store call; `close` waits for them.
    pub(crate) store_users: AtomicUsize,
    pub(crate) failed: Mutex<VecDeque<FailedWrite<K, V>>>,
    pub(crate) on_failed_write: Option<FailedWriteHook<K, V>>,
    /// The partitions this cache owns ([`Builder::partitions`](crate::Builder::partitions)).
    pub(crate) partitions: Option<crate::partition::Partitions<K>>,
    /// The removal listener ([`Builder::on_removal`](crate::Builder::on_removal)).
    pub(crate) on_removal: Option<crate::settings::RemovalListener<K, V>>,
    /// Panics caught in user code other than the store (see `Metrics::user_panics`).
    pub(crate) user_panics: AtomicU64,
    /// The last time the clock gave (ns), for [`Shared::now`] when it panics.
    pub(crate) last_clock: AtomicU64,
    /// Flushers notify after every batch when someone waits (backpressure, `wait_durable`).
    pub(crate) progress: Mutex<u64>,
    pub(crate) progress_cv: Condvar,
    pub(crate) progress_waiters: AtomicUsize,
    /// Coarse clock (ns) for entry times, advanced by the flushers: the put path reads this
    /// atomic, never the clock. Only kept when a time-based setting is on.
    pub(crate) coarse: AtomicU64,
    /// Some time-based setting (ttl, tti, refresh, absent caching) is on.
    pub(crate) timed: bool,
    /// A capacity or weight bound is set: the tables evict.
    pub(crate) bounded: bool,
    /// Entries may have times to live of their own (`Builder::per_entry_ttl`).
    pub(crate) per_entry: bool,
    /// Hits answered from the shards' read slots, without the lock (the locked ones count in
    /// the tables).
    pub(crate) lock_free_hits: crate::metrics::Striped,
    /// How often flushers advance the coarse clock when `timed`.
    pub(crate) tick: Duration,
    /// How often a flusher sweeps its shards for expired entries when `timed`.
    pub(crate) sweep_every: Duration,
    pub(crate) weigher: Option<Weigher<K, V>>,
    /// [`crate::Builder::flush_order`]: how a flusher orders a backlog of more than one
    /// batch.
    pub(crate) flush_order: Option<KeyOrder<K>>,
    /// The crash-safe journal, if the builder set one.
    pub(crate) journal: Option<crate::journal::JournalLog<K, V>>,
}

/// The settings the engine reads after build.
pub(crate) struct Config {
    pub(crate) write_delay: Duration,
    pub(crate) max_batch: usize,
    pub(crate) max_attempts: u32,
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) drop_deadline: Duration,
    pub(crate) manual: bool,
    pub(crate) store_timeout: Duration,
    pub(crate) failed_writes_capacity: usize,
}

impl<K, V> Shared<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Advances the coarse clock to the real one (flusher steps do this).
    pub(crate) fn tick_clock(&self) {
        if self.timed {
            self.coarse.fetch_max(self.clock_nanos(), Ordering::Relaxed);
        }
    }

    /// The clock's time in nanoseconds.
    #[inline]
    pub(crate) fn clock_nanos(&self) -> u64 {
        u64::try_from(self.now().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The clock's time. The clock is user code: if it panics, the panic is counted and the
    /// last time it gave (never going back) stands in for it.
    #[inline]
    pub(crate) fn now(&self) -> Duration {
        match crate::guard::catch(|| self.clock.now()) {
            Ok(t) => {
                let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
                if self.last_clock.load(Ordering::Relaxed) < ns {
                    self.last_clock.fetch_max(ns, Ordering::Relaxed);
                }
                t
            }
            Err(msg) => {
                self.user_panicked("the clock", &msg);
                Duration::from_nanos(self.last_clock.load(Ordering::Relaxed))
            }
        }
    }

    /// Counts a panic caught in user code, and logs it.
    pub(crate) fn user_panicked(&self, what: &str, msg: &str) {
        self.user_panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(message = %msg, "{what} panicked; the cache goes on");
    }

    /// The coarse time for entry bookkeeping (0 when nothing is time-based).
    #[inline]
    pub(crate) fn coarse_now(&self) -> u64 {
        if self.timed {
            self.coarse.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    #[inline]
    pub(crate) fn weight(&self, key: &K, value: Option<&V>) -> u32 {
        match (&self.weigher, value) {
            (Some(w), Some(v)) => w(key, v).max(1),
            _ => 1,
        }
    }

    #[inline]
    pub(crate) fn hash(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of a hash. Bits 32.. choose it: the table inside the shard uses the low bits
    /// (bucket) and the top seven (tag), so they stay spread within a shard.
    #[inline]
    pub(crate) fn shard_of(&self, hash: u64) -> usize {
        ((hash >> 32) & self.shard_mask) as usize
    }

    /// `true` if the failed-writes sink can take one more write.
    pub(crate) fn sink_has_room(&self) -> bool {
        self.failed.lock().len() < self.config.failed_writes_capacity
    }

    /// Wakes threads waiting for the flushers to make progress.
    pub(crate) fn notify_progress(&self) {
        if self.progress_waiters.load(Ordering::SeqCst) > 0 {
            *self.progress.lock() += 1;
            self.progress_cv.notify_all();
        }
    }

    /// Waits until a flusher made progress or `slice` passed.
    pub(crate) fn wait_progress(&self, slice: Duration) {
        self.progress_waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = self.progress.lock();
        self.progress_cv.wait_for(&mut g, slice);
        drop(g);
        self.progress_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// The partition of `key` when the cache is partitioned (the application's partitioner:
    /// call it outside every lock).
    #[inline]
    pub(crate) fn partition_of(&self, key: &K) -> Option<u32> {
        self.partitions.as_ref().map(|p| p.of(key))
    }

    /// Refuses a key of a partition this cache does not own ([`Error::NotOwner`]).
    #[inline]
    pub(crate) fn check_owner(&self, part: Option<u32>) -> Result<(), crate::Error> {
        match (part, &self.partitions) {
            (Some(p), Some(ps)) => ps.check(p),
            _ => Ok(()),
        }
    }

    /// Calls the removal listener for values that left memory, on the caller's thread,
    /// which holds no lock. A panicking listener is caught and counted; the other values
    /// are still reported.
    pub(crate) fn deliver(&self, departed: Vec<(K, V, crate::settings::RemovalCause)>) {
        let Some(listener) = &self.on_removal else {
            return;
        };
        for (key, value, cause) in departed {
            if let Err(msg) = crate::guard::catch(|| listener(key, value, cause)) {
                self.user_panicked("the removal listener", &msg);
            }
        }
    }

    /// [`Shared::deliver`] for whatever shard `s` holds (a flusher's step, a bulk call).
    pub(crate) fn deliver_pending(&self, s: usize) {
        if self.on_removal.is_some() {
            let departed = self.shards[s].table.lock().take_departed();
            self.deliver(departed);
        }
    }

    pub(crate) fn give_up(&self, fw: FailedWrite<K, V>) {
        if let Some(hook) = &self.on_failed_write {
            if call_store(|| hook(&fw)).is_err() {
                tracing::error!("the failed-write callback panicked; the write is still queued for failed_writes()");
            }
        }
        self.failed.lock().push_back(fw);
    }

    /// Runs a read (`load`, `load_all`) on the caller's thread: refused once the cache is
    /// closed, with a panic in the store turned into an `Unavailable` error.
    pub(crate) fn read_store<R>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let Ok(_use) = self.enter_store() else {
            return Err(StoreError::unavailable("the cache is closed"));
        };
        call_store(f).unwrap_or_else(|msg| {
            Err(StoreError::unavailable(format!(
                "store panicked in {what}: {msg}"
            )))
        })
    }

    /// Waits, without spinning, until no read- or write-through is at the store, or `until`
    /// passes (`None`: no limit).
    pub(crate) fn wait_store_users(&self, until: Option<std::time::Instant>) {
        let mut pause = Duration::from_micros(50);
        while self.store_users.load(Ordering::SeqCst) != 0 {
            if until.is_some_and(|u| std::time::Instant::now() >= u) {
                tracing::warn!(
                    calls = self.store_users.load(Ordering::SeqCst),
                    "close: store calls of application threads still running at the deadline"
                );
                return;
            }
            crate::sync::thread::park_timeout(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Enters a store call from a caller's thread, unless the cache is closed.
    pub(crate) fn enter_store(&self) -> Result<StoreUse<'_>, Error> {
        self.store_users.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.store_users.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Closed);
        }
        Ok(StoreUse(&self.store_users))
    }

    /// Reclaims the journal's space for the journal shard `part` (if there is a journal),
    /// whose writers are the shards `owned` (a flusher's): its segments are replaced by a
    /// checkpoint of the writes the store may not hold. The journal moves every lane of the
    /// part to a new segment first; then each shard's dirty set is taken under its lock. A
    /// writer appends
    /// and writes its table under its shard's lock, so each write is either in a snapshot
    /// (its append was before the switch, and the lock orders its table write before the
    /// snapshot) or appended after the switch.
    pub(crate) fn checkpoint_journal(&self, part: usize, owned: &[usize]) {
        let Some(j) = &self.journal else { return };
        let ticket = j.begin_checkpoint(part);
        let mut live = Vec::new();
        for &s in owned {
            match self.shards[s].table.lock().journal_snapshot() {
                Ok(mut snap) => live.append(&mut snap),
                Err(msg) => {
                    // The checkpoint is dropped: nothing is reclaimed, nothing lost.
                    self.user_panicked("a key's or value's Clone (journal checkpoint)", &msg);
                    return;
                }
            }
        }
        if let Err(e) = j.finish_checkpoint(ticket, live.into_iter()) {
            tracing::warn!(part, error = %e, "journal: a checkpoint failed; its space is reclaimed by a later one");
        }
    }
}

/// Marks a caller thread's store call in progress.
pub(crate) struct StoreUse<'a>(&'a AtomicUsize);

impl Drop for StoreUse<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
