//! [`Cache`]: hashes a key to its shard, runs the write modes, read-through, flush barriers and
//! close. It never holds two shard locks at once, and never holds one across a store call.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Builder;
use crate::error::FailedWrite;
use crate::error::{Error, StoreError};
use crate::flusher::{self, Flusher, StepMode, Ticket, TicketOutcome};
use crate::guard::{call_store, in_engine, EngineScope};
use crate::loader::{Loader, RefreshJob};
use crate::metrics::Metrics;
use crate::settings::{Backpressure, FailedWriteHook, KeyOrder, Weigher, WriteMode};
use crate::shard::{Durability, Limits, LoadRole, LoadSlot, Lookup, Shard, Table};
use crate::store::{Store, Write};
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use crate::sync::thread::JoinHandle;
use crate::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What [`Cache::close`] could not write.
#[derive(Debug)]
#[must_use = "a close report holds the writes that did not reach the store"]
pub struct CloseReport<K, V> {
    /// Every write that is not in the store: the latest value (or delete) of each dirty key,
    /// with its version. Save them elsewhere or replay them into a new cache.
    pub unwritten: Vec<Write<K, V>>,
    /// The deadline passed before everything was written.
    pub deadline_reached: bool,
    /// The cache had been closed already; this report is empty.
    pub already_closed: bool,
    /// `close` was called from inside the engine (a `Store` callback, or user code on a
    /// flusher thread) and could not wait: the flushers write until the deadline in the
    /// background, and this report is empty. Call `close` again from an application thread
    /// for the full report.
    pub in_progress: bool,
}

impl<K, V> CloseReport<K, V> {
    fn empty(already_closed: bool, in_progress: bool) -> Self {
        CloseReport {
            unwritten: Vec::new(),
            deadline_reached: false,
            already_closed,
            in_progress,
        }
    }

    /// `true` if everything reached the store.
    pub fn is_clean(&self) -> bool {
        self.unwritten.is_empty()
    }
}

/// Shared state of a cache: what the flusher threads hold on to.
pub(crate) struct Inner<K, V> {
    pub(crate) shards: Box<[Shard<K, V>]>,
    shard_mask: u64,
    hasher: ahash::RandomState,
    pub(crate) store: Box<dyn Store<K, V>>,
    pub(crate) config: Config,
    pub(crate) clock: std::sync::Arc<dyn crate::Clock>,
    pub(crate) flushers: Box<[Flusher<K>]>,
    /// Set by `close`; writers check it under their shard lock.
    closed: AtomicBool,
    /// Threads inside a read-through or write-through store call; `close` waits for them.
    store_users: AtomicUsize,
    /// The count trigger's step: a push that brings its ring to a multiple of this many keys
    /// adds that many to its flusher's count of queued keys (see `Cache::after_push`).
    count_chunk: usize,
    failed: Mutex<VecDeque<FailedWrite<K, V>>>,
    on_failed_write: Option<FailedWriteHook<K, V>>,
    load_errors: AtomicU64,
    /// Panics caught in user code other than the store (see [`Metrics::user_panics`]).
    pub(crate) user_panics: AtomicU64,
    /// The last time the clock gave (ns), for [`Inner::now`] when it panics.
    last_clock: AtomicU64,
    /// Per-shard backpressure: (high watermark, low watermark, policy).
    backpressure: Option<(usize, usize, Backpressure)>,
    /// Flushers notify after every batch when someone waits (backpressure, `wait_durable`).
    progress: Mutex<u64>,
    progress_cv: Condvar,
    progress_waiters: AtomicUsize,
    bp_waits: AtomicU64,
    bp_rejections: AtomicU64,
    through_fallbacks: AtomicU64,
    /// The write mode, switchable at run time (`WriteMode as u8`).
    mode: AtomicU8,
    /// Coarse clock (ns) for entry times, advanced by the flushers: the put path reads this
    /// atomic, never the clock. Only kept when a time-based setting is on.
    coarse: AtomicU64,
    /// Some time-based setting (ttl, tti, refresh, absent caching) is on.
    pub(crate) timed: bool,
    /// A capacity or weight bound is set: the tables evict.
    bounded: bool,
    /// How often flushers advance the coarse clock when `timed`.
    pub(crate) tick: Duration,
    /// How often a flusher sweeps its shards for expired entries when `timed`.
    pub(crate) sweep_every: Duration,
    weigher: Option<Weigher<K, V>>,
    /// [`crate::Builder::flush_order`]: how a flusher orders a backlog of more than one
    /// batch.
    pub(crate) flush_order: Option<KeyOrder<K>>,
    /// Refresh-ahead jobs (only with `refresh_ahead`).
    loader: Option<Loader<K>>,
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

impl<K, V> Inner<K, V>
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
    fn weight(&self, key: &K, value: Option<&V>) -> u32 {
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
    fn shard_of(&self, hash: u64) -> usize {
        ((hash >> 32) & self.shard_mask) as usize
    }

    #[inline]
    fn flusher_of(&self, shard: usize) -> &Flusher<K> {
        // One flusher is the default: no division on the push path then.
        let n = self.flushers.len();
        &self.flushers[if n == 1 { 0 } else { shard % n }]
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
    fn wait_progress(&self, slice: Duration) {
        self.progress_waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = self.progress.lock();
        self.progress_cv.wait_for(&mut g, slice);
        drop(g);
        self.progress_waiters.fetch_sub(1, Ordering::SeqCst);
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
    fn read_store<R>(
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
    fn wait_store_users(&self, until: Option<std::time::Instant>) {
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
    fn enter_store(&self) -> Result<StoreUse<'_>, Error> {
        self.store_users.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.store_users.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Closed);
        }
        Ok(StoreUse(&self.store_users))
    }
}

/// A key's write-through in flight ([`Table::begin_through`](crate::shard::Table)): ended by
/// [`ThroughMark::end`] under the table lock once the write is cached, or on drop (a failed
/// store call, or a panic in between) so that a waiting write-through of the key never waits
/// for good.
struct ThroughMark<'a, K: Eq + Clone + Hash, V: Clone> {
    shard: &'a Shard<K, V>,
    hash: u64,
    key: Option<K>,
}

impl<K: Eq + Clone + Hash, V: Clone> ThroughMark<'_, K, V> {
    /// Ends the write-through under the caller's lock; `true` if another one waits for it.
    fn end(mut self, table: &mut Table<K, V>) -> bool {
        match self.key.take() {
            Some(key) => table.end_through(self.hash, &key),
            None => false,
        }
    }
}

impl<K: Eq + Clone + Hash, V: Clone> Drop for ThroughMark<'_, K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let waited = self.shard.table.lock().end_through(self.hash, &key);
            if waited {
                self.shard.through_done.notify_all();
            }
        }
    }
}

/// The loads a `get` leads (single-flight): if the leader unwinds before it publishes (a
/// panic in the store's `load`, the weigher, the value's `Clone`), the guard publishes an
/// error to the followers and takes the loads out of the table, so the key's next miss loads
/// again instead of waiting for good. Cleared once the leader publishes.
struct LeadGuard<'a, K: Eq + Clone + Hash, V: Clone> {
    shard: &'a Shard<K, V>,
    leads: Vec<(u64, &'a K, &'a LoadSlot<V>)>,
}

impl<K: Eq + Clone + Hash, V: Clone> Drop for LeadGuard<'_, K, V> {
    fn drop(&mut self) {
        for (hash, key, slot) in self.leads.drain(..) {
            abandon_lead(self.shard, hash, key, slot);
        }
    }
}

/// [`LeadGuard`] for a batch read ([`Cache::get_all`]): the led keys from `done` on are
/// abandoned if the leader unwinds.
struct BatchLeadGuard<'a, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    inner: &'a Inner<K, V>,
    keys: &'a [K],
    lead: &'a [Led<V>],
    done: usize,
}

impl<K, V> Drop for BatchLeadGuard<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        // The load being finished when the panic came (`done - 1`) may not be published.
        let from = self.done.saturating_sub(1);
        for l in self.lead.iter().skip(from) {
            let shard = &self.inner.shards[l.shard];
            abandon_lead(shard, l.hash, &self.keys[l.index], &l.slot);
        }
    }
}

/// Publishes an error to the followers of a load whose leader unwinds, and takes the load out
/// of the table. Runs while unwinding: the table's `Eq` calls are guarded (a second panic
/// would abort the process).
fn abandon_lead<K: Eq + Clone + Hash, V: Clone>(
    shard: &Shard<K, V>,
    hash: u64,
    key: &K,
    slot: &LoadSlot<V>,
) {
    if !std::thread::panicking() {
        return;
    }
    slot.publish_if_empty(Err(StoreError::unavailable(
        "the load's leader panicked (in the store or in user code); try again",
    )));
    let _ = crate::guard::catch(|| shard.table.lock().abort_load(hash, key, slot));
}

/// Marks a caller thread's store call in progress.
struct StoreUse<'a>(&'a AtomicUsize);

impl Drop for StoreUse<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a write-behind queued its key ([`Cache::queue`], under the shard lock).
enum Queued<K> {
    /// The key was already queued in the open epoch: nothing to push.
    Conflated,
    /// Pushed; the ring's length just after the push (for the count trigger).
    Pushed(usize),
    /// The ring was full: the key is given back (to drop after the unlock), and `raised` says
    /// whether this write set the shard's overflow flag (then it wakes the flusher).
    Overflowed { key: K, raised: bool },
}

/// A key of a batch read whose load this caller leads ([`Cache::get_all`],
/// [`Cache::preload_from_store`]).
struct Led<V> {
    /// Its position in the caller's keys.
    index: usize,
    shard: usize,
    hash: u64,
    slot: Arc<LoadSlot<V>>,
}

/// A sharded, write-behind cache in front of a [`Store`].
///
/// Share it between threads in an `Arc`. See the [crate docs](crate) for the guarantees.
pub struct Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) inner: Arc<Inner<K, V>>,
    threads: Mutex<Option<Vec<JoinHandle>>>,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts configuring a cache in front of `store`.
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// let cache: Cache<u64, u64> = Cache::builder(MemoryStore::new()).build()?;
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn builder(store: impl Store<K, V>) -> Builder<K, V> {
        Builder::new(store)
    }

    pub(crate) fn from_builder(b: Builder<K, V>) -> Result<Self, Error> {
        let b = b.s;
        b.validate()?;
        let first_version = first_version();
        let nshards = b.shards;
        let nflushers = b.flushers;
        let owned_per_flusher = nshards / nflushers + usize::from(nshards % nflushers != 0);
        // Counting in steps of `count_chunk` keys per ring keeps the flusher's counter off most
        // pushes; the trigger may then fire up to `(owned − 1) × (count_chunk − 1)` keys late,
        // so the step stays at a quarter of a shard's even share of a batch, and at most 8; a
        // power of two, so the push path masks instead of dividing.
        let count_chunk = prev_power_of_two((b.max_batch / (4 * owned_per_flusher)).clamp(1, 8));
        // Room for two batches' share per ring, within the bound on all rings together.
        let ring_capacity = b
            .ring_capacity
            .max(2 * (b.max_batch / owned_per_flusher).max(1))
            .min((crate::settings::MAX_RING_SLOTS / nshards).max(b.ring_capacity));
        let ns =
            |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let limits = Limits {
            capacity: b.capacity.map_or(usize::MAX, |c| (c / nshards).max(1)),
            max_weight: b
                .max_weight
                .map_or(u64::MAX, |w| (w / nshards as u64).max(1)),
            ttl: ns(b.ttl),
            tti: ns(b.tti),
            negative_ttl: ns(b.negative_ttl),
            refresh_after: match (b.refresh_ahead, b.ttl) {
                (Some(f), Some(ttl)) => ns(Some(ttl.mul_f64(f))).max(1),
                _ => 0,
            },
            weighted: b.weigher.is_some(),
        };
        let timed = limits.timed();
        let bounded = limits.bounded();
        let shortest = [b.ttl, b.tti, b.negative_ttl]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(1));
        let tick = (shortest / 20).clamp(Duration::from_millis(1), Duration::from_millis(100));
        // A bounded cache bounds its dirty entries too, unless told otherwise.
        let max_dirty = b.max_dirty.or_else(|| {
            b.capacity.map(|c| {
                (
                    c,
                    Backpressure::Block {
                        timeout: Duration::from_secs(5),
                    },
                )
            })
        });
        // Under loom the seeds are fixed: a model must run the same operations for the same
        // schedule, and the seeds decide the order a full ring's table scan lists keys in.
        let hasher = if cfg!(writebehind_loom) {
            ahash::RandomState::with_seeds(1, 2, 3, 4)
        } else {
            ahash::RandomState::new()
        };
        let shards = (0..nshards)
            .map(|_| Shard::new(first_version, ring_capacity, limits, hasher.clone()))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let flushers = (0..nflushers)
            .map(|k| {
                let owned = (k..nshards).step_by(nflushers).collect();
                Flusher::new(k, owned, b.retry_base)
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let inner = Arc::new(Inner {
            shards,
            shard_mask: (nshards - 1) as u64,
            hasher,
            store: b.store,
            config: Config {
                write_delay: b.write_delay,
                max_batch: b.max_batch,
                max_attempts: b.max_attempts,
                retry_base: b.retry_base,
                retry_max: b.retry_max,
                flush_timeout: b.flush_timeout,
                drop_deadline: b.drop_deadline,
                manual: b.manual,
                store_timeout: b.store_timeout,
                failed_writes_capacity: b.failed_writes_capacity,
            },
            clock: b.clock,
            flushers,
            closed: AtomicBool::new(false),
            store_users: AtomicUsize::new(0),
            count_chunk,
            failed: Mutex::new(VecDeque::new()),
            on_failed_write: b.on_failed_write,
            load_errors: AtomicU64::new(0),
            user_panics: AtomicU64::new(0),
            last_clock: AtomicU64::new(0),
            backpressure: max_dirty.map(|(max, policy)| {
                let high = (max / nshards).max(1);
                // Low watermark at 90% (at least one below the high one).
                let low = high.saturating_sub((high / 10).max(1));
                (high, low, policy)
            }),
            progress: Mutex::new(0),
            progress_cv: Condvar::new(),
            progress_waiters: AtomicUsize::new(0),
            bp_waits: AtomicU64::new(0),
            bp_rejections: AtomicU64::new(0),
            through_fallbacks: AtomicU64::new(0),
            mode: AtomicU8::new(b.write_mode as u8),
            coarse: AtomicU64::new(0),
            timed,
            bounded,
            tick,
            sweep_every: (shortest / 2).clamp(tick, Duration::from_secs(10)),
            weigher: b.weigher,
            flush_order: b.flush_order,
            loader: b.refresh_ahead.map(|_| Loader::new()),
        });
        inner.tick_clock();
        let cache = Cache {
            inner: inner.clone(),
            threads: Mutex::new(Some(Vec::new())),
        };
        if !b.manual {
            let nice = b.flusher_nice;
            // A niced worker gets a keeper at the builder's priority (`flusher::Role`), where
            // the nice takes effect.
            let keepers = nice > 0 && cfg!(target_os = "linux");
            for k in 0..nflushers {
                let inner2 = inner.clone();
                let role = if keepers {
                    flusher::Role::Worker
                } else {
                    flusher::Role::Sole
                };
                let spawned = crate::sync::thread::spawn_named(
                    format!("{}-flusher-{k}", b.name),
                    move || {
                        if let Err(e) = crate::sync::thread::lower_priority(nice) {
                            tracing::debug!(error = %e, nice, "flusher keeps the builder's priority");
                        }
                        inner2.flushers[k].unparker.set(std::thread::current());
                        flusher::run(inner2, k, role);
                    },
                );
                cache.adopt(spawned, |h| inner.flushers[k].unparker.set(h))?;
                if keepers {
                    let inner2 = inner.clone();
                    let spawned = crate::sync::thread::spawn_named(
                        format!("{}-keeper-{k}", b.name),
                        move || {
                            inner2.flushers[k].keeper.set(std::thread::current());
                            flusher::run(inner2, k, flusher::Role::Keeper);
                        },
                    );
                    cache.adopt(spawned, |h| inner.flushers[k].keeper.set(h))?;
                }
            }
        }
        if inner.loader.is_some() {
            for k in 0..b.loaders {
                let inner2 = inner.clone();
                let spawned =
                    crate::sync::thread::spawn_named(format!("{}-loader-{k}", b.name), move || {
                        run_loader(&inner2)
                    });
                cache.adopt(spawned, |_| {})?;
            }
        }
        Ok(cache)
    }

    /// Keeps a background thread's handle for `close`, after `register` gave its handle to
    /// whatever wakes it (the thread registers itself too: a wake sent before either is not
    /// lost). A failed spawn is `Error::Spawn`; the caller then drops the cache, which closes
    /// the threads already started.
    fn adopt(
        &self,
        spawned: std::io::Result<JoinHandle>,
        register: impl FnOnce(std::thread::Thread),
    ) -> Result<(), Error> {
        let h = spawned.map_err(|e| Error::Spawn(std::sync::Arc::new(e)))?;
        register(h.thread().clone());
        if let Some(v) = self.threads.lock().as_mut() {
            v.push(h);
        }
        Ok(())
    }

    /// Inserts or replaces `key`, and returns the write's version (pass it to
    /// [`Cache::wait_durable`] to learn when the store holds it).
    ///
    /// In [`WriteMode::Behind`] this returns once the write is in memory; a flusher writes it
    /// later. In [`WriteMode::Through`] it returns once the store accepted it; two
    /// write-throughs of one key take turns (the second waits until the first is back from
    /// the store), so the store receives a key's versions in order.
    ///
    /// # Errors
    /// [`Error::Closed`] after `close`; in `Through` mode, [`Error::Store`] when the store
    /// refused the write (the cache then keeps its previous value); with `max_dirty` set,
    /// [`Error::Backpressure`] or [`Error::Store`] as the [`Backpressure`] policy says;
    /// [`Error::Reentrant`] for a write-through made from inside a store call that it would
    /// have to wait for (see [`Store`]).
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new()).build()?;
    /// cache.put("k".to_string(), 1u32)?;
    /// assert_eq!(cache.get(&"k".to_string())?, Some(1));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    #[inline]
    pub fn put(&self, key: K, value: V) -> Result<u64, Error> {
        self.write(key, Some(value))
    }

    /// Removes `key`: `get` answers `None` from now on, and a delete is queued for the store
    /// (even if the key was not cached: the store may hold it).
    ///
    /// # Errors
    /// As for [`Cache::put`].
    pub fn remove(&self, key: &K) -> Result<u64, Error> {
        self.write(key.clone(), None)
    }

    #[inline]
    fn write(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        match self.write_mode() {
            WriteMode::Behind => self.write_behind(key, value),
            WriteMode::Through => self.write_through(key, value),
            WriteMode::ReadOnly => self.write_local(key, value),
        }
    }

    #[inline]
    fn write_behind(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        let inner = &*self.inner;
        let hash = inner.hash(&key);
        let s = inner.shard_of(hash);
        let shard = &inner.shards[s];
        let weight = inner.weight(&key, value.as_ref());
        let now = inner.coarse_now();
        let mut table = Self::lock_behind(shard, hash, &key)?;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if let Some((high, low, policy)) = inner.backpressure {
            if !table.admits(high, low, hash, &key) {
                drop(table);
                return self.write_under_pressure(s, hash, key, value, weight, policy);
            }
        }
        Ok(self.write_locked(s, table, hash, key, value, now, weight))
    }

    /// Locks a shard's table for a write-behind of `key`: if a write-through of the key is
    /// still at the store (the mode switched while this write was on its way), waits for it
    /// first, or this write's batch could reach the store before the older write-through.
    #[inline]
    fn lock_behind<'a>(
        shard: &'a Shard<K, V>,
        hash: u64,
        key: &K,
    ) -> Result<MutexGuard<'a, Table<K, V>>, Error> {
        let mut table = shard.table.lock();
        while table.through_in_flight(hash, key) {
            Self::wait_through(shard, &mut table)?;
        }
        Ok(table)
    }

    /// A write-behind on a shard whose table lock the caller holds: records the write, queues
    /// its key while still holding the lock ([`Cache::queue`]), unlocks, then wakes whoever the
    /// write calls for. Returns the write's version.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn write_locked(
        &self,
        s: usize,
        mut table: MutexGuard<'_, Table<K, V>>,
        hash: u64,
        key: K,
        value: Option<V>,
        now: u64,
        weight: u32,
    ) -> u64 {
        let mut outcome = table.write(hash, key, value, now, weight);
        let queued = Self::queue(&self.inner.shards[s], outcome.ring_key.take());
        drop(table);
        self.after_write(s, outcome, queued)
    }

    /// Puts the key of a write that was not queued in the open epoch on its shard's ring, or
    /// raises the shard's overflow flag if the ring is full. Called **with the shard's table
    /// lock held**: a later write of the key in the same epoch conflates (it finds the
    /// entry's tag equal to the open epoch and does not push), and returns as soon as it
    /// unlocks. If this push came after the unlock, that write could return while the key was
    /// on no ring and behind no flag; a `flush()` begun then would close the epoch, drain
    /// the ring without it and return with the write unsent. Under the lock the push (or the
    /// flag) happens before any write that can conflate into it, so a flush that a write
    /// returned before finds the key drained or scanned. docs/ARCHITECTURE.md, "Why no
    /// accepted write is lost".
    #[inline]
    fn queue(shard: &crate::shard::Shard<K, V>, ring_key: Option<K>) -> Queued<K> {
        let Some(key) = ring_key else {
            return Queued::Conflated;
        };
        match shard.ring.push(key) {
            Ok(len) => Queued::Pushed(len),
            Err(key) => {
                // The entry is dirty in the table: the flusher finds it by scanning. (Read
                // first: while the ring stays full every push lands here, and a swap would
                // write the flag's line each time.)
                let raised = !shard.overflow.load(Ordering::SeqCst)
                    && !shard.overflow.swap(true, Ordering::SeqCst);
                Queued::Overflowed { key, raised }
            }
        }
    }

    /// What follows a write-behind once the shard lock is released: drop the old value, wake
    /// the flusher if the push calls for it, and ask for an early flush if pinned dirty
    /// entries hold the shard over its capacity.
    #[inline]
    fn after_write(
        &self,
        s: usize,
        outcome: crate::shard::WriteOutcome<K, V>,
        queued: Queued<K>,
    ) -> u64 {
        // Queued and armed first: a panic in the old value's `Drop` (user code) must not keep
        // the flusher from learning of the write.
        self.after_push(s, queued);
        drop(outcome.old);
        if outcome.over_capacity {
            let shard = &self.inner.shards[s];
            if !shard.triggered.swap(true, Ordering::SeqCst) {
                self.inner.flusher_of(s).wake();
            }
        }
        outcome.version
    }

    /// A write that would add a dirty entry to a shard at its `max_dirty` share.
    #[cold]
    fn write_under_pressure(
        &self,
        s: usize,
        hash: u64,
        key: K,
        value: Option<V>,
        weight: u32,
        policy: Backpressure,
    ) -> Result<u64, Error> {
        let inner = &*self.inner;
        let shard = &inner.shards[s];
        let (high, low, _) = inner.backpressure.unwrap_or((usize::MAX, 0, policy));
        let refused = || {
            inner.bp_rejections.fetch_add(1, Ordering::Relaxed);
            Err(Error::Backpressure { shard_limit: high })
        };
        match policy {
            Backpressure::Reject => refused(),
            Backpressure::Block { timeout } => {
                inner.bp_waits.fetch_add(1, Ordering::Relaxed);
                // No deadline when the timeout is beyond what an `Instant` can hold.
                let deadline = std::time::Instant::now().checked_add(timeout);
                loop {
                    // Ask the flusher to write this shard now rather than at its delay.
                    if !shard.triggered.swap(true, Ordering::SeqCst) {
                        inner.flusher_of(s).wake();
                    }
                    let left = match deadline {
                        Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                        None => Duration::MAX,
                    };
                    if left.is_zero() {
                        return refused();
                    }
                    inner.wait_progress(left.min(Duration::from_millis(10)));
                    // The mode may have switched meanwhile, and a write-through of the key
                    // gone to the store: `lock_behind` waits for it.
                    let mut table = Self::lock_behind(shard, hash, &key)?;
                    if inner.closed.load(Ordering::Acquire) {
                        return Err(Error::Closed);
                    }
                    if table.admits(high, low, hash, &key) {
                        let now = inner.coarse_now();
                        return Ok(self.write_locked(s, table, hash, key, value, now, weight));
                    }
                }
            }
            Backpressure::WriteThrough => {
                if in_engine() {
                    // A store callback (on a flusher thread, or a writer's write-through)
                    // may run under a flusher's core: taking one here could wait for itself.
                    return Err(Error::Reentrant);
                }
                inner.through_fallbacks.fetch_add(1, Ordering::Relaxed);
                // Holding the owning flusher's core keeps its batches out while this writer
                // writes the key, so the key's versions reach the store in order.
                let _core = inner.flusher_of(s).core.lock();
                // A write-through of the key in flight does not need the core (it would hold
                // it), so waiting for it here cannot wait for this thread.
                let mut table = Self::lock_behind(shard, hash, &key)?;
                if table.admits(high, low, hash, &key) {
                    // Room appeared meanwhile: an ordinary write-behind.
                    let now = inner.coarse_now();
                    return Ok(self.write_locked(s, table, hash, key, value, now, weight));
                }
                drop(table);
                self.write_through_at(s, hash, key, value, true)
            }
        }
    }

    /// After a push under the lock ([`Cache::queue`]): arms the shard and wakes the flusher
    /// when its delay starts, the count trigger fires, or the ring overflowed.
    #[inline]
    fn after_push(&self, s: usize, queued: Queued<K>) {
        if matches!(queued, Queued::Conflated) {
            return;
        }
        let inner = &*self.inner;
        let shard = &inner.shards[s];
        // Arm the shard first: a count-triggered step drains the armed shards, and this key
        // must be in that batch. The arming write's time goes first: the shard's delay, and
        // the age of its oldest write, count from it (one clock read per shard and window).
        if !shard.armed.load(Ordering::SeqCst) {
            shard.armed_at.store(inner.clock_nanos(), Ordering::SeqCst);
            if !shard.armed.swap(true, Ordering::SeqCst) {
                inner.flusher_of(s).wake();
            }
        }
        match queued {
            Queued::Conflated => {}
            Queued::Pushed(len) => {
                // The count trigger: `max_batch` keys queued in this flusher's shards. Each
                // ring adds its keys to the flusher's count in steps of `count_chunk`, so the
                // shared counter is written by few pushes; a push adds its own ring's part
                // step to the count it reads. Exact with one shard per flusher; otherwise the
                // other rings' part steps may make it fire up to
                // `(shards per flusher − 1) × (count_chunk − 1)` keys late.
                let chunk = inner.count_chunk;
                let flusher = inner.flusher_of(s);
                let part = len & (chunk - 1);
                let queued = if part == 0 {
                    flusher.count(chunk)
                } else {
                    flusher.counted() + part
                };
                if queued >= inner.config.max_batch {
                    flusher.fire_count_trigger();
                }
            }
            Queued::Overflowed { key, raised } => {
                drop(key);
                if raised {
                    inner.flusher_of(s).wake();
                }
            }
        }
    }

    /// Waits, without the table lock, until a write-through of the shard ends (the caller
    /// found its key's in flight with [`Table::through_in_flight`], which asked for the
    /// wake-up), then holds the lock again; the caller asks again. From inside a store call
    /// it returns `Error::Reentrant` instead: the write-through in flight may be this
    /// thread's own, further up the stack (a store that writes the key it is writing).
    fn wait_through(
        shard: &Shard<K, V>,
        table: &mut MutexGuard<'_, Table<K, V>>,
    ) -> Result<(), Error> {
        if in_engine() {
            return Err(Error::Reentrant);
        }
        // The timeout only bounds a lost wake-up; the caller's loop asks again either way.
        let _ = shard
            .through_done
            .wait_for(table, Duration::from_millis(100));
        Ok(())
    }

    fn write_through(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        let inner = &*self.inner;
        let hash = inner.hash(&key);
        let s = inner.shard_of(hash);
        self.write_through_at(s, hash, key, value, false)
    }

    /// Writes one key to the store on the caller's thread, then caches it as clean (unless
    /// something newer arrived meanwhile).
    ///
    /// `core_held`: the caller holds the owning flusher's core (backpressure).
    fn write_through_at(
        &self,
        s: usize,
        hash: u64,
        key: K,
        value: Option<V>,
        core_held: bool,
    ) -> Result<u64, Error> {
        let inner = &*self.inner;
        let _use = inner.enter_store()?;
        let shard = &inner.shards[s];
        let mut core = None;
        // One write-through of a key at a time (`Table::begin_through`): a second one waits
        // here, without the table lock, until the first has been to the store and back.
        let mut table = shard.table.lock();
        let version = loop {
            if table.through_in_flight(hash, &key) {
                Self::wait_through(shard, &mut table)?;
                continue;
            }
            // A key written behind (before a switch to `Through`) may still be waiting for
            // the store, or be in a batch at the store right now. Its write-through then
            // holds the owning flusher's core, as a write-through under backpressure does, so
            // that no batch with the key's older version overlaps it; the flusher later sends
            // the key's latest version, which this write makes its own. Decided on its turn,
            // under the lock that marks it: the core is taken without the table lock, and the
            // turn asked for again.
            if !core_held && core.is_none() && table.has_behind_work(hash, &key) {
                if in_engine() {
                    // The core may be held by this thread's caller (a flusher's store call).
                    return Err(Error::Reentrant);
                }
                drop(table);
                core = Some(inner.flusher_of(s).core.lock());
                table = shard.table.lock();
                continue;
            }
            if let Some(version) = table.begin_through(hash, &key) {
                break version;
            }
        };
        drop(table);
        // The weigher (user code) runs before the store call: once the store holds the write,
        // nothing may keep it out of the cache.
        let weight = inner.weight(&key, value.as_ref());
        let mark = ThroughMark {
            shard,
            hash,
            key: Some(key.clone()),
        };
        let write = match value {
            Some(value) => Write::Put {
                key,
                value,
                version,
            },
            None => Write::Delete { key, version },
        };
        let result = call_store(|| inner.store.write_all(std::slice::from_ref(&write)));
        if let Some((_, e)) = flusher::failures(result, 1).pop() {
            drop(mark); // ends the write-through: the key's next one may go
            return Err(Error::Store(e));
        }
        let mut t = shard.table.lock();
        t.count_write_through(write.is_delete());
        match write {
            Write::Put {
                key,
                value,
                version,
            } => {
                t.fill_clean(hash, key, value, version, inner.coarse_now(), weight);
            }
            Write::Delete { key, version } => {
                drop(t.remove_clean(hash, &key, version, weight));
            }
        }
        // Cached before the mark goes: the key's next write-through applies after this one.
        let waited = mark.end(&mut t);
        drop(t);
        if waited {
            shard.through_done.notify_all();
        }
        Ok(version)
    }

    fn write_local(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        let inner = &*self.inner;
        let hash = inner.hash(&key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let weight = inner.weight(&key, value.as_ref());
        let mut t = shard.table.lock();
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let (version, old) = t.set_local(hash, key, value, inner.coarse_now(), weight);
        drop(t);
        drop(old);
        Ok(version)
    }

    /// Returns the latest value of `key`: a pending write or delete if there is one, else the
    /// cached value, else the store's (read through, then cached).
    ///
    /// # Errors
    /// [`Error::Load`] if the key was not in memory and the store failed (never `Ok(None)` for
    /// a failure); [`Error::Closed`] for a miss after `close`.
    #[inline(always)]
    pub fn get(&self, key: &K) -> Result<Option<V>, Error> {
        let inner = &*self.inner;
        let hash = inner.hash(key);
        let s = inner.shard_of(hash);
        if inner.timed {
            return self.get_timed(s, hash, key);
        }
        // The common case, inlined: no time-based rule, so a hit reads the shard's first
        // line and the entry, and nothing else.
        let mut table = inner.shards[s].table.lock();
        if let Some(found) = table.get_untimed(hash, key, inner.bounded) {
            return Ok(found);
        }
        let role = table.join_load(hash, key);
        drop(table);
        self.finish_miss(s, hash, key, role)
    }

    /// [`Cache::get`] when a time-based rule is on (expiry, refresh-ahead).
    #[inline(never)]
    fn get_timed(&self, s: usize, hash: u64, key: &K) -> Result<Option<V>, Error> {
        let inner = &*self.inner;
        let now = inner.coarse_now();
        let mut table = inner.shards[s].table.lock();
        let role = match table.get(hash, key, now) {
            Lookup::Hit(found) => return Ok(found),
            Lookup::HitRefresh(v, version) => {
                drop(table);
                if let Some(loader) = &inner.loader {
                    loader.submit(RefreshJob {
                        shard: s,
                        key: key.clone(),
                        version,
                    });
                }
                return Ok(Some(v));
            }
            Lookup::Miss => table.join_load(hash, key),
        };
        drop(table);
        self.finish_miss(s, hash, key, role)
    }

    /// A missed key: waits for the load in flight, or leads it.
    #[cold]
    fn finish_miss(
        &self,
        s: usize,
        hash: u64,
        key: &K,
        role: LoadRole<V>,
    ) -> Result<Option<V>, Error> {
        match role {
            // This thread leads the load already (its store's `load` reads the key through the
            // cache): waiting would wait for itself.
            LoadRole::Follower(slot) if slot.led_here() => Err(Error::Reentrant),
            LoadRole::Follower(slot) => slot.wait().map_err(Error::Load),
            LoadRole::Leader(slot) => self.lead_load(s, hash, key, &slot),
        }
    }

    /// Reads a missed key through the store for every caller waiting on `slot`.
    fn lead_load(
        &self,
        s: usize,
        hash: u64,
        key: &K,
        slot: &LoadSlot<V>,
    ) -> Result<Option<V>, Error> {
        let inner = &*self.inner;
        let shard = &inner.shards[s];
        let mut guard = LeadGuard {
            shard,
            leads: vec![(hash, key, slot)],
        };
        let loaded = inner.read_store("load", || inner.store.load(key));
        match loaded {
            Ok(v) => {
                let weight = inner.weight(key, v.as_ref());
                let now = inner.coarse_now();
                let answer = shard
                    .table
                    .lock()
                    .finish_load(hash, key, slot, v, now, weight)
                    .0;
                guard.leads.clear();
                slot.publish(Ok(answer.clone()));
                Ok(answer)
            }
            Err(e) => {
                guard.leads.clear();
                shard.table.lock().abort_load(hash, key, slot);
                slot.publish(Err(e.clone()));
                if inner.closed.load(Ordering::SeqCst) {
                    return Err(Error::Closed);
                }
                inner.load_errors.fetch_add(1, Ordering::Relaxed);
                Err(Error::Load(e))
            }
        }
    }

    /// Reads many keys: hits from memory, and every miss through one
    /// [`Store::load_all`] call (misses already being loaded by another caller wait for
    /// that load instead). The answer is in the order of `keys`.
    ///
    /// # Errors
    /// [`Error::Load`] if the store failed; [`Error::Closed`] for misses after `close`.
    pub fn get_all(&self, keys: &[K]) -> Result<Vec<Option<V>>, Error> {
        let inner = &*self.inner;
        let now = inner.coarse_now();
        let mut out: Vec<Option<V>> = Vec::with_capacity(keys.len());
        let mut lead: Vec<Led<V>> = Vec::new();
        let mut follow: Vec<(usize, Arc<LoadSlot<V>>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let hash = inner.hash(key);
            let s = inner.shard_of(hash);
            let mut table = inner.shards[s].table.lock();
            match table.get(hash, key, now) {
                Lookup::Hit(v) => out.push(v),
                Lookup::HitRefresh(v, version) => {
                    drop(table);
                    if let Some(loader) = &inner.loader {
                        loader.submit(RefreshJob {
                            shard: s,
                            key: key.clone(),
                            version,
                        });
                    }
                    out.push(Some(v));
                }
                Lookup::Miss => {
                    out.push(None);
                    match table.join_load(hash, key) {
                        LoadRole::Leader(slot) => lead.push(Led {
                            index: i,
                            shard: s,
                            hash,
                            slot,
                        }),
                        LoadRole::Follower(slot) => follow.push((i, slot)),
                    }
                }
            }
        }
        for (i, answer, _) in self.load_leaders(keys, &lead, now)? {
            out[i] = answer;
        }
        for (i, slot) in follow {
            out[i] = slot.wait().map_err(Error::Load)?;
        }
        Ok(out)
    }

    /// Reads the keys this caller leads the loads of with one [`Store::load_all`], finishes
    /// each load (caching what nothing changed meanwhile) and answers its followers. Returns,
    /// per led key, its index in `keys`, the answer and whether a loaded value was cached.
    fn load_leaders(
        &self,
        keys: &[K],
        lead: &[Led<V>],
        now: u64,
    ) -> Result<Vec<(usize, Option<V>, bool)>, Error> {
        let inner = &*self.inner;
        if lead.is_empty() {
            return Ok(Vec::new());
        }
        let mut guard = BatchLeadGuard {
            inner,
            keys,
            lead,
            done: 0,
        };
        let wanted: Vec<K> = lead.iter().map(|l| keys[l.index].clone()).collect();
        match inner.read_store("load_all", || inner.store.load_all(&wanted)) {
            Ok(rows) => {
                let mut found: HashMap<K, V> = rows.into_iter().collect();
                let mut answers = Vec::with_capacity(lead.len());
                for l in lead {
                    guard.done += 1;
                    let key = &keys[l.index];
                    let v = found.remove(key);
                    let weight = inner.weight(key, v.as_ref());
                    let (answer, cached) = inner.shards[l.shard]
                        .table
                        .lock()
                        .finish_load(l.hash, key, &l.slot, v, now, weight);
                    l.slot.publish(Ok(answer.clone()));
                    answers.push((l.index, answer, cached));
                }
                Ok(answers)
            }
            Err(e) => {
                guard.done = lead.len();
                for l in lead {
                    inner.shards[l.shard]
                        .table
                        .lock()
                        .abort_load(l.hash, &keys[l.index], &l.slot);
                    l.slot.publish(Err(e.clone()));
                }
                if inner.closed.load(Ordering::SeqCst) {
                    return Err(Error::Closed);
                }
                inner.load_errors.fetch_add(1, Ordering::Relaxed);
                Err(Error::Load(e))
            }
        }
    }

    /// Fills the cache with clean entries that are *not* written back (warming a cache from
    /// its own database must not write every row again). An entry that holds a write, or any
    /// entry already cached, is left as it is. Returns how many entries were added.
    ///
    /// # Errors
    /// [`Error::Closed`] after `close`.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore};
    /// let store = Arc::new(MemoryStore::new());
    /// let cache = Cache::builder(store.clone()).build()?;
    /// assert_eq!(cache.preload((0..100u64).map(|k| (k, k * 2)))?, 100);
    /// cache.flush()?;
    /// assert_eq!(store.batches(), 0, "preloading wrote nothing");
    /// cache.put(200, 0)?;
    /// assert_eq!(cache.preload([(200, 400)])?, 0, "a pending write is never overwritten");
    /// assert_eq!(cache.get(&200)?, Some(0));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn preload(&self, entries: impl IntoIterator<Item = (K, V)>) -> Result<usize, Error> {
        let inner = &*self.inner;
        let now = inner.coarse_now();
        let mut added = 0;
        for (key, value) in entries {
            let hash = inner.hash(&key);
            let weight = inner.weight(&key, Some(&value));
            let mut t = inner.shards[inner.shard_of(hash)].table.lock();
            if inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if !t.contains_any(hash, &key) {
                t.fill_clean(hash, key, value, 0, now, weight);
                added += 1;
            }
        }
        Ok(added)
    }

    /// Reads `keys` from the store with one [`Store::load_all`] call and caches what it
    /// finds as clean entries (see [`Cache::preload`]); keys already in memory, or being
    /// read through by another caller, are left alone. Returns how many entries were added.
    ///
    /// The reads are read-throughs: a key written, removed or evicted while the store call
    /// runs is not filled with the row read before that, which may be older.
    ///
    /// # Errors
    /// [`Error::Load`] if the store failed; [`Error::Closed`] after `close`.
    pub fn preload_from_store(&self, keys: &[K]) -> Result<usize, Error> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let now = inner.coarse_now();
        let mut lead: Vec<Led<V>> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let hash = inner.hash(key);
            let s = inner.shard_of(hash);
            let mut t = inner.shards[s].table.lock();
            if inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if t.contains_any(hash, key) {
                continue;
            }
            if let LoadRole::Leader(slot) = t.join_load(hash, key) {
                lead.push(Led {
                    index: i,
                    shard: s,
                    hash,
                    slot,
                });
            }
        }
        let loaded = self.load_leaders(keys, &lead, now)?;
        Ok(loaded.iter().filter(|(_, _, cached)| *cached).count())
    }

    /// A snapshot of every live entry in memory. Never reads the store.
    pub fn entries(&self) -> Vec<(K, V)> {
        let mut out = Vec::new();
        for s in self.inner.shards.iter() {
            s.table.lock().entries(&mut out, self.inner.coarse_now());
        }
        out
    }

    /// `true` if `key` holds a value in memory. Never reads the store.
    pub fn contains_key(&self, key: &K) -> bool {
        let hash = self.inner.hash(key);
        self.inner.shards[self.inner.shard_of(hash)]
            .table
            .lock()
            .contains(hash, key, self.inner.coarse_now())
    }

    /// Live entries in memory (pending deletes not counted).
    pub fn len(&self) -> usize {
        let now = self.inner.coarse_now();
        self.inner
            .shards
            .iter()
            .map(|s| s.table.lock().len(now))
            .sum()
    }

    /// `true` if no live entry is in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes everything written before the call to the store, and returns once it is there.
    ///
    /// A barrier: when it returns `Ok`, every `put`/`remove` that returned before `flush`
    /// was called is in the store (or was superseded by a newer version that is). Writes that
    /// arrive meanwhile may or may not be included. A batch already in flight is waited for,
    /// never sent twice.
    ///
    /// # Errors
    /// * [`Error::FlushTimeout`] if the store did not take everything within the flush
    ///   timeout; the writes stay queued.
    /// * [`Error::Store`] if the store rejected some of those writes for good; they are in
    ///   [`Cache::failed_writes`].
    /// * [`Error::Reentrant`] when called from inside a `Store` callback on a flusher.
    /// * [`Error::Closed`] after `close`.
    pub fn flush(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        if in_engine() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        // Every write that returned before now has a version below its shard's next version.
        let targets: Vec<u64> = inner
            .shards
            .iter()
            .map(|s| s.table.lock().next_version)
            .collect();
        let ticket = Arc::new(Ticket::new(targets, inner.flushers.len()));
        let outcome = if inner.config.manual {
            match self.manual_flush(&ticket) {
                Some(outcome) => outcome,
                None => return Err(Error::Closed),
            }
        } else {
            for f in inner.flushers.iter() {
                f.post_ticket(ticket.clone());
            }
            ticket.wait(inner.config.flush_timeout)
        };
        match outcome {
            TicketOutcome::Done { rejected: 0 } => Ok(()),
            TicketOutcome::Done { rejected } => Err(Error::Store(StoreError::rejected(format!(
                "{rejected} write(s) were rejected by the store and moved to failed_writes()"
            )))),
            TicketOutcome::Pending(pending) => Err(Error::FlushTimeout { pending }),
            TicketOutcome::Closed => Err(Error::Closed),
        }
    }

    /// Manual flushing: run full steps on the caller's thread until the ticket is settled,
    /// giving rejected records their attempts.
    /// `None` if the cache was closed meanwhile.
    fn manual_flush(&self, ticket: &Arc<Ticket>) -> Option<TicketOutcome> {
        let inner = &*self.inner;
        let rounds = inner.config.max_attempts as usize + 1;
        for f in inner.flushers.iter() {
            let _engine = EngineScope::enter();
            let mut core = f.core.lock();
            // As in `flush_step`: no store call once a concurrent `close` has taken over.
            if inner.closed.load(Ordering::SeqCst) {
                return None;
            }
            core.take_ticket(ticket.clone());
            for _ in 0..rounds {
                let mode = StepMode {
                    full: true,
                    ignore_backoff: true,
                    hand_off_when_late: false,
                };
                let ran = core.step_guarded(inner, mode);
                core.settle_tickets(inner, ran);
                if !core.wants_full_step() && matches!(ticket.outcome(), TicketOutcome::Done { .. })
                {
                    break;
                }
                if core.is_idle(inner) {
                    core.settle_tickets(inner, true);
                }
            }
        }
        Some(ticket.outcome())
    }

    /// Writes `key`'s pending write (if any) to the store now, on the caller's thread,
    /// without waiting for its delay, and returns once the store holds it.
    ///
    /// # Errors
    /// [`Error::Store`] if the store failed (the write stays queued and is retried as
    /// usual); [`Error::Closed`]; [`Error::Reentrant`] from inside a store callback.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore};
    /// let store = Arc::new(MemoryStore::new());
    /// let cache = Cache::builder(store.clone()).build()?;
    /// cache.put(1u64, "saved".to_string())?;
    /// cache.flush_key(&1)?;
    /// assert_eq!(store.get(&1).as_deref(), Some("saved"));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn flush_key(&self, key: &K) -> Result<(), Error> {
        let inner = &*self.inner;
        if in_engine() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let hash = inner.hash(key);
        let s = inner.shard_of(hash);
        let target = inner.shards[s].table.lock().next_version;
        {
            let _engine = EngineScope::enter();
            let mut core = inner.flusher_of(s).core.lock();
            // `close` holds every core once after it set the flag: checked under the core, a
            // write here either comes before `close` returns or not at all.
            if inner.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let key = key.clone();
            if core
                .guarded(inner, |core| core.write_key(inner, s, key))
                .is_none()
            {
                return Err(Error::Store(StoreError::unavailable(
                    "user code panicked while the key was written; it stays queued",
                )));
            }
        }
        let t = inner.shards[s].table.lock();
        // Every write of the key from before the call has been handed over and persisted.
        if t.unsent_of(hash, key) >= target && !t.in_flight(hash, key) {
            return Ok(());
        }
        Err(Error::Store(StoreError::unavailable(
            "the store did not take the write; it stays queued and is retried",
        )))
    }

    /// Blocks until the store holds the write that returned `version` for `key` (or a newer
    /// write of the key), or `timeout` passes. Use it to tell a client "saved" without
    /// writing through on every request; [`Cache::flush_key`] makes it quick.
    ///
    /// `Ok` means the store holds that version of the key or a newer one, never less: a write
    /// given up to the failed-writes sink, or made in [`WriteMode::ReadOnly`], is never
    /// acknowledged, also after its key has left memory.
    ///
    /// # Errors
    /// [`Error::Timeout`] (the write stays queued). [`Error::Store`] at once when the write
    /// was given up (it is in [`Cache::failed_writes`]). In [`WriteMode::ReadOnly`] nothing is
    /// ever written, so this always times out. A `timeout` of `Duration::MAX` waits for good.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use writebehind::{Cache, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new())
    ///     .write_delay(Duration::from_millis(10))
    ///     .build()?;
    /// let version = cache.put(7u64, 70u64)?;
    /// cache.wait_durable(&7, version, Duration::from_secs(5))?;
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn wait_durable(&self, key: &K, version: u64, timeout: Duration) -> Result<(), Error> {
        let inner = &*self.inner;
        let hash = inner.hash(key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let deadline = std::time::Instant::now().checked_add(timeout);
        loop {
            match shard.table.lock().durable(hash, key, version) {
                Durability::Durable => return Ok(()),
                Durability::GivenUp => {
                    return Err(Error::Store(StoreError::rejected(
                        "the store rejected this write too often; it is in failed_writes()",
                    )))
                }
                Durability::Pending => {}
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            inner.wait_progress(left.min(Duration::from_millis(50)));
        }
    }

    /// Manual flushing: runs one step of every flusher now, writing the shards whose delay is
    /// up, whose ring reached the count trigger, and the retries that are due. Returns the
    /// number of flushers that called the store (or had nothing to send); a flusher in its
    /// unavailable-backoff skips.
    ///
    /// With background flushers this runs a step too (the flusher thread and this call take
    /// turns); it is meant for tests, model checks and applications that drive flushing from
    /// their own loop.
    ///
    /// # Errors
    /// [`Error::Closed`] after close; [`Error::Reentrant`] from inside a store callback.
    pub fn flush_step(&self) -> Result<usize, Error> {
        let inner = &*self.inner;
        if in_engine() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let mut ran = 0;
        for f in inner.flushers.iter() {
            let _engine = EngineScope::enter();
            let mut core = f.core.lock();
            // `close` may have run between the check above and this lock, handed back what
            // was dirty and returned: a step now would call the store after `close`. `close`
            // sets the flag before it takes the cores, so checking it under the core lock
            // orders every step either before `close` returns or not at all.
            if inner.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let mode = StepMode {
                full: false,
                ignore_backoff: false,
                hand_off_when_late: false,
            };
            if core.step_guarded(inner, mode) {
                ran += 1;
            }
            core.guarded(inner, |core| core.settle_tickets(inner, false));
        }
        Ok(ran)
    }

    /// Stops accepting writes, writes what is pending until `deadline` (measured from now),
    /// stops the flusher threads, and hands back every write that did not reach the store.
    ///
    /// After `close`, `put`/`remove`/`flush` fail with [`Error::Closed`], a `get` that misses
    /// memory fails with it too, and the store is not called again once `close` returns. A
    /// read- or write-through in progress is waited for until the deadline, not longer (it
    /// cannot be interrupted; a load that returns later caches nothing). A second `close`
    /// returns an empty report with `already_closed` set.
    ///
    /// Called from inside the engine (a `Store` callback, or user code such as a value's `Drop`
    /// running on a flusher thread), it cannot wait for the flushers, which may be waiting for
    /// it: it stops the cache, lets the flushers write until the deadline, and returns a report
    /// with `in_progress` set. A later `close` from an application thread joins the flushers
    /// and returns the full report.
    pub fn close(&self, deadline: Duration) -> CloseReport<K, V> {
        let inner = &*self.inner;
        if self.threads.lock().is_none() {
            return CloseReport::empty(true, false);
        }
        // Writers check the flag under their shard lock, so every write either completed
        // before (and is written or handed back below) or sees it and fails.
        inner.closed.store(true, Ordering::SeqCst);
        if let Some(loader) = &inner.loader {
            loader.stop();
        }
        let until = inner.now().saturating_add(deadline);
        let wall_until = std::time::Instant::now().checked_add(deadline);
        if in_engine() {
            for f in inner.flushers.iter() {
                f.post_close(until);
            }
            return CloseReport::empty(false, true);
        }
        let Some(threads) = self.threads.lock().take() else {
            return CloseReport::empty(true, false);
        };
        let _engine = EngineScope::enter();
        if inner.config.manual {
            self.drain_manually(until);
        } else {
            for f in inner.flushers.iter() {
                f.post_close(until);
            }
            let me = crate::sync::thread::current_id();
            for h in threads {
                if h.thread().id() == me {
                    continue;
                }
                if h.join().is_err() {
                    tracing::error!("a background thread of the cache panicked");
                }
            }
        }
        // Holding each core once after the flag was set orders this close after any
        // `flush_key`/`flush_step`/manual flush that holds one now; those that come later see
        // the flag under the core and do not call the store.
        for f in inner.flushers.iter() {
            drop(f.core.lock());
            // A flush still waiting (or racing this close) gets `Closed`.
            f.shut();
        }
        inner.wait_store_users(wall_until);
        let mut unwritten = Vec::new();
        for s in inner.shards.iter() {
            s.table.lock().unwritten(&mut unwritten);
        }
        let deadline_reached = !unwritten.is_empty() && inner.now() >= until;
        CloseReport {
            unwritten,
            deadline_reached,
            already_closed: false,
            in_progress: false,
        }
    }

    /// Manual flushing: `close` runs full steps on the caller's thread until everything is
    /// written, the deadline passes, or each record had its attempts.
    fn drain_manually(&self, until: Duration) {
        let inner = &*self.inner;
        let rounds = inner.config.max_attempts as usize + 1;
        for f in inner.flushers.iter() {
            let mut core = f.core.lock();
            for _ in 0..rounds {
                let idle = core.guarded(inner, |core| core.is_idle(inner));
                if idle == Some(true) || inner.now() > until {
                    break;
                }
                let mode = StepMode {
                    full: true,
                    ignore_backoff: true,
                    hand_off_when_late: false,
                };
                core.step_guarded(inner, mode);
            }
        }
    }

    /// Takes the writes the cache gave up on (the store rejected them `max_attempts` times),
    /// oldest first. The application can fix and re-submit them with `put`/`remove`.
    pub fn failed_writes(&self) -> Vec<FailedWrite<K, V>> {
        self.inner.failed.lock().drain(..).collect()
    }

    /// A snapshot of the counters and gauges.
    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::empty();
        let now = self.inner.coarse_now();
        for s in self.inner.shards.iter() {
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
        let inner = &*self.inner;
        m.load_errors = inner.load_errors.load(Ordering::Relaxed);
        m.user_panics = inner.user_panics.load(Ordering::Relaxed);
        m.backpressure_waits = inner.bp_waits.load(Ordering::Relaxed);
        m.backpressure_rejections = inner.bp_rejections.load(Ordering::Relaxed);
        m.write_through_fallbacks = inner.through_fallbacks.load(Ordering::Relaxed);
        let now = inner.now();
        let mut hists = Metrics::histograms();
        for f in inner.flushers.iter() {
            f.stats.add_into(&mut m, now, &mut hists);
        }
        m.set_distributions(&hists);
        if m.dirty == 0 {
            m.oldest_unflushed_age = Duration::ZERO;
        }
        m
    }

    /// The current write mode.
    #[inline]
    pub fn write_mode(&self) -> WriteMode {
        match self.inner.mode.load(Ordering::Relaxed) {
            0 => WriteMode::Behind,
            1 => WriteMode::Through,
            _ => WriteMode::ReadOnly,
        }
    }

    /// Switches the write mode without a restart. Leaving [`WriteMode::Behind`] first
    /// flushes what is pending, so after `Behind -> ReadOnly` returns `Ok`, everything written
    /// before is in the store and nothing written after is ever sent. (A write racing the
    /// switch itself is a write-behind write and is sent.) After `Behind -> Through`, a
    /// write-through of a key that still has write-behind work pending (the flush has not
    /// reached it yet, or failed) waits for the key's batch at the store, so the store
    /// receives the key's versions in order.
    ///
    /// # Errors
    /// What [`Cache::flush`] returns when leaving `Behind`; the mode is switched regardless.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore, WriteMode};
    /// let store = Arc::new(MemoryStore::new());
    /// let cache = Cache::builder(store.clone()).build()?;
    /// cache.put(1u64, 1u64)?;
    /// cache.set_write_mode(WriteMode::ReadOnly)?; // flushes the pending write
    /// cache.put(2, 2)?;                           // stays in memory
    /// cache.flush()?;
    /// assert_eq!(store.get(&1), Some(1));
    /// assert_eq!(store.get(&2), None);
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn set_write_mode(&self, mode: WriteMode) -> Result<(), Error> {
        let old = self.inner.mode.swap(mode as u8, Ordering::SeqCst);
        if old == (WriteMode::Behind as u8) && mode != WriteMode::Behind {
            tracing::info!(?mode, "leaving write-behind: flushing pending writes");
            return self.flush();
        }
        Ok(())
    }

    /// `true` once `close` has started.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }
}

impl<K, V> Drop for Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Closes the cache with the builder's drop deadline if `close` was not called, and logs
    /// (at error level) how many writes could not be written. Call `close` to get them back.
    fn drop(&mut self) {
        let report = self.close(self.inner.config.drop_deadline);
        if report.in_progress {
            let dirty: u64 = self
                .inner
                .shards
                .iter()
                .map(|s| u64::from(s.table.lock().dirty))
                .sum();
            tracing::error!(
                dirty,
                "cache dropped inside a store call or on a flusher thread: its flushers write until the drop deadline, and what is left then is lost; close() the cache from an application thread to get it back"
            );
        }
        if !report.unwritten.is_empty() {
            tracing::error!(
                unwritten = report.unwritten.len(),
                "cache dropped with writes that did not reach the store; call close() to get them back"
            );
        }
    }
}

impl<K, V> std::fmt::Debug for Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("shards", &self.inner.shards.len())
            .field("flushers", &self.inner.flushers.len())
            .field("write_mode", &self.write_mode())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// The body of a refresh-ahead loader thread.
fn run_loader<K, V>(inner: &Inner<K, V>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let Some(loader) = &inner.loader else { return };
    while let Some(job) = loader.next() {
        if inner.closed.load(Ordering::SeqCst) {
            break;
        }
        let loaded = inner
            .read_store("load", || inner.store.load(&job.key))
            .map_err(|e| {
                tracing::warn!(error = %e, "refresh-ahead reload failed; the old value stays until it expires");
            });
        let hash = inner.hash(&job.key);
        let now = inner.coarse_now();
        inner.shards[job.shard].table.lock().finish_refresh(
            hash,
            &job.key,
            job.version,
            loaded,
            now,
        );
    }
}

/// The largest power of two not above `n` (`n` >= 1).
fn prev_power_of_two(n: usize) -> usize {
    debug_assert!(n >= 1);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// The first version a new cache hands out: nanoseconds since the Unix epoch, so a restarted
/// process writes versions above its predecessor's (unless the wall clock went back by more
/// than the time between the two, or the predecessor wrote more than one version per
/// nanosecond of that gap in one shard).
fn first_version() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
        .max(1)
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::prev_power_of_two;

    #[test]
    fn count_steps_are_powers_of_two() {
        let got: Vec<usize> = (1..=9).map(prev_power_of_two).collect();
        assert_eq!(got, vec![1, 2, 2, 4, 4, 4, 4, 8, 8]);
    }
}
