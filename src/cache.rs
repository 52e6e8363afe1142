//! [`Cache`]: hashes a key to its shard, runs the write modes, read-through, flush barriers and
//! close. It never holds two shard locks at once, and never holds one across a store call.

use std::collections::VecDeque;
use std::hash::Hash;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Builder, FailedWriteHook, WriteMode};
use crate::error::{Error, StoreError};
use crate::flusher::{self, call_store, in_store_call, Flusher, StepMode, Ticket, TicketOutcome};
use crate::metrics::Metrics;
use crate::shard::Shard;
use crate::store::{Store, Write};
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use crate::sync::thread::JoinHandle;
use crate::sync::{Arc, Mutex};

/// A write the cache gave up on: the store rejected it `attempts` times. The application
/// decides what to do with it (log it, fix and re-submit it, park it elsewhere).
#[derive(Clone, Debug)]
pub struct FailedWrite<K, V> {
    /// The write, with the value and version the store refused.
    pub write: Write<K, V>,
    /// The last error.
    pub error: StoreError,
    /// How many times it was tried.
    pub attempts: u32,
}

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
}

impl<K, V> CloseReport<K, V> {
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
    /// Count trigger per shard: pushes that fill a ring to this many keys wake the flusher.
    trigger: usize,
    failed: Mutex<VecDeque<FailedWrite<K, V>>>,
    on_failed_write: Option<FailedWriteHook<K, V>>,
    load_errors: AtomicU64,
}

/// The settings the engine reads after build.
pub(crate) struct Config {
    pub(crate) write_mode: WriteMode,
    pub(crate) write_delay: Duration,
    pub(crate) max_batch: usize,
    pub(crate) max_attempts: u32,
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) drop_deadline: Duration,
    pub(crate) manual: bool,
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
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
        &self.flushers[shard % self.flushers.len()]
    }

    pub(crate) fn give_up(&self, fw: FailedWrite<K, V>) {
        if let Some(hook) = &self.on_failed_write {
            if call_store(|| hook(&fw)).is_err() {
                tracing::error!("the failed-write callback panicked; the write is still queued for failed_writes()");
            }
        }
        self.failed.lock().push_back(fw);
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

/// Marks a caller thread's store call in progress.
struct StoreUse<'a>(&'a AtomicUsize);

impl Drop for StoreUse<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A sharded, write-behind cache in front of a [`Store`].
///
/// Share it between threads in an `Arc`. See the [crate docs](crate) for the guarantees.
pub struct Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    inner: Arc<Inner<K, V>>,
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
        b.validate()?;
        let first_version = first_version();
        let nshards = b.shards;
        let nflushers = b.flushers;
        let owned_per_flusher = nshards / nflushers + usize::from(nshards % nflushers != 0);
        let trigger = (b.max_batch / owned_per_flusher).max(1);
        let ring_capacity = b.ring_capacity.max(2 * trigger).min(1 << 24);
        let shards = (0..nshards)
            .map(|_| Shard::new(first_version, ring_capacity))
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
            hasher: ahash::RandomState::new(),
            store: b.store,
            config: Config {
                write_mode: b.write_mode,
                write_delay: b.write_delay,
                max_batch: b.max_batch,
                max_attempts: b.max_attempts,
                retry_base: b.retry_base,
                retry_max: b.retry_max,
                flush_timeout: b.flush_timeout,
                drop_deadline: b.drop_deadline,
                manual: b.manual,
            },
            clock: b.clock,
            flushers,
            closed: AtomicBool::new(false),
            store_users: AtomicUsize::new(0),
            trigger,
            failed: Mutex::new(VecDeque::new()),
            on_failed_write: b.on_failed_write,
            load_errors: AtomicU64::new(0),
        });
        let cache = Cache {
            inner: inner.clone(),
            threads: Mutex::new(Some(Vec::new())),
        };
        if !b.manual {
            for k in 0..nflushers {
                let inner2 = inner.clone();
                let spawned = crate::sync::thread::spawn_named(
                    format!("{}-flusher-{k}", b.name),
                    move || {
                        inner2.flushers[k].unparker.set(std::thread::current());
                        flusher::run(inner2, k);
                    },
                );
                match spawned {
                    Ok(h) => {
                        // The thread registers its handle itself; make sure a wake sent before
                        // that is not lost.
                        inner.flushers[k].unparker.set(h.thread().clone());
                        if let Some(v) = cache.threads.lock().as_mut() {
                            v.push(h);
                        }
                    }
                    Err(e) => {
                        // `cache` drops here and closes the flushers already started.
                        return Err(Error::Spawn(std::sync::Arc::new(e)));
                    }
                }
            }
        }
        Ok(cache)
    }

    /// Inserts or replaces `key`.
    ///
    /// In [`WriteMode::Behind`] this returns once the write is in memory; a flusher writes it
    /// later. In [`WriteMode::Through`] it returns once the store accepted it.
    ///
    /// # Errors
    /// [`Error::Closed`] after `close`; in `Through` mode, [`Error::Store`] when the store
    /// refused the write (the cache then keeps its previous value).
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
    pub fn put(&self, key: K, value: V) -> Result<(), Error> {
        self.write(key, Some(value))
    }

    /// Removes `key`: `get` answers `None` from now on, and a delete is queued for the store
    /// (even if the key was not cached: the store may hold it).
    ///
    /// # Errors
    /// As for [`Cache::put`].
    pub fn remove(&self, key: &K) -> Result<(), Error> {
        self.write(key.clone(), None)
    }

    #[inline]
    fn write(&self, key: K, value: Option<V>) -> Result<(), Error> {
        match self.inner.config.write_mode {
            WriteMode::Behind => self.write_behind(key, value),
            WriteMode::Through => self.write_through(key, value),
            WriteMode::ReadOnly => self.write_local(key, value),
        }
    }

    #[inline]
    fn write_behind(&self, key: K, value: Option<V>) -> Result<(), Error> {
        let inner = &*self.inner;
        let hash = inner.hash(&key);
        let s = inner.shard_of(hash);
        let shard = &inner.shards[s];
        let mut table = shard.table.lock();
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let epoch = shard.open_epoch();
        let outcome = table.write(hash, key, value, epoch);
        drop(table);
        drop(outcome.old);
        if let Some(k) = outcome.ring_key {
            self.push(s, k);
        }
        Ok(())
    }

    /// Puts a key on its shard's ring and wakes the flusher when its delay starts, the count
    /// trigger fires, or the ring is full.
    fn push(&self, s: usize, key: K) {
        let inner = &*self.inner;
        let shard = &inner.shards[s];
        match shard.ring.push(key) {
            Ok(len) => {
                if len == inner.trigger && !shard.triggered.swap(true, Ordering::SeqCst) {
                    inner.flusher_of(s).wake();
                }
            }
            Err(_) => {
                // The entry is dirty in the table: the flusher finds it by scanning.
                if !shard.overflow.swap(true, Ordering::SeqCst) {
                    inner.flusher_of(s).wake();
                }
            }
        }
        if !shard.armed.load(Ordering::SeqCst) && !shard.armed.swap(true, Ordering::SeqCst) {
            inner.flusher_of(s).wake();
        }
    }

    fn write_through(&self, key: K, value: Option<V>) -> Result<(), Error> {
        let inner = &*self.inner;
        let _use = inner.enter_store()?;
        let hash = inner.hash(&key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let version = {
            let mut t = shard.table.lock();
            let v = t.next_version;
            t.next_version += 1;
            v
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
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(crate::BatchError::Unavailable(e))) => Some(StoreError::Unavailable(e)),
            Ok(Err(crate::BatchError::Partial(mut list))) => list.pop().map(|(_, e)| e),
            Err(msg) => Some(StoreError::unavailable(format!("store panicked: {msg}"))),
        };
        if let Some(e) = error {
            return Err(Error::Store(e));
        }
        let mut t = shard.table.lock();
        match write {
            Write::Put {
                key,
                value,
                version,
            } => {
                t.fill_clean(hash, key, value, version);
            }
            Write::Delete { key, version } => t.remove_clean(hash, &key, version),
        }
        Ok(())
    }

    fn write_local(&self, key: K, value: Option<V>) -> Result<(), Error> {
        let inner = &*self.inner;
        let hash = inner.hash(&key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let mut t = shard.table.lock();
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let old = t.set_local(hash, key, value);
        drop(t);
        drop(old);
        Ok(())
    }

    /// Returns the latest value of `key`: a pending write or delete if there is one, else the
    /// cached value, else the store's (read through, then cached).
    ///
    /// # Errors
    /// [`Error::Load`] if the key was not in memory and the store failed (never `Ok(None)` for
    /// a failure); [`Error::Closed`] for a miss after `close`.
    pub fn get(&self, key: &K) -> Result<Option<V>, Error> {
        let inner = &*self.inner;
        let hash = inner.hash(key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let mut table = shard.table.lock();
        if let Some(found) = table.get(hash, key) {
            return Ok(found);
        }
        let removals = table.removals;
        drop(table);
        let _use = inner.enter_store()?;
        let loaded = match call_store(|| inner.store.load(key)) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                inner.load_errors.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Load(e));
            }
            Err(msg) => {
                inner.load_errors.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Load(StoreError::unavailable(format!(
                    "store panicked in load: {msg}"
                ))));
            }
        };
        let mut table = shard.table.lock();
        table.counters.loads += 1;
        Ok(table.fill_loaded(hash, key, loaded, removals))
    }

    /// `true` if `key` holds a value in memory. Never reads the store.
    pub fn contains_key(&self, key: &K) -> bool {
        let hash = self.inner.hash(key);
        self.inner.shards[self.inner.shard_of(hash)]
            .table
            .lock()
            .contains(hash, key)
    }

    /// Live entries in memory (pending deletes not counted).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.table.lock().len()).sum()
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
        if in_store_call() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if inner.config.write_mode != WriteMode::Behind {
            return Ok(());
        }
        // Every write that returned before now has a version below its shard's next version.
        let targets: Vec<u64> = inner
            .shards
            .iter()
            .map(|s| s.table.lock().next_version)
            .collect();
        let ticket = Arc::new(Ticket::new(targets, inner.flushers.len()));
        let outcome = if inner.config.manual {
            self.manual_flush(&ticket)
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
        }
    }

    /// Manual flushing: run full steps on the caller's thread until the ticket is settled,
    /// giving rejected records their attempts.
    fn manual_flush(&self, ticket: &Arc<Ticket>) -> TicketOutcome {
        let inner = &*self.inner;
        let rounds = inner.config.max_attempts as usize + 1;
        for f in inner.flushers.iter() {
            let mut core = f.core.lock();
            core.take_ticket(ticket.clone());
            for _ in 0..rounds {
                let mode = StepMode {
                    full: true,
                    ignore_backoff: true,
                };
                let ran = core.step(inner, mode);
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
        ticket.outcome()
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
        if in_store_call() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let mut ran = 0;
        for f in inner.flushers.iter() {
            let mut core = f.core.lock();
            let mode = StepMode {
                full: false,
                ignore_backoff: false,
            };
            if core.step(inner, mode) {
                ran += 1;
            }
            core.settle_tickets(inner, false);
        }
        Ok(ran)
    }

    /// Stops accepting writes, writes what is pending until `deadline` (measured from now),
    /// stops the flusher threads, and hands back every write that did not reach the store.
    ///
    /// After `close`, `put`/`remove`/`flush` fail with [`Error::Closed`], a `get` that misses
    /// memory fails with it too, and the store is not called again. A store call in progress
    /// when the deadline passes is waited for (it cannot be interrupted). A second `close`
    /// returns an empty report with `already_closed` set.
    ///
    /// Called from inside a `Store` callback, it stops the cache without waiting (it cannot
    /// join the thread it runs on) and the report is empty.
    pub fn close(&self, deadline: Duration) -> CloseReport<K, V> {
        let inner = &*self.inner;
        let Some(threads) = self.threads.lock().take() else {
            return CloseReport {
                unwritten: Vec::new(),
                deadline_reached: false,
                already_closed: true,
            };
        };
        // Writers check the flag under their shard lock, so every write either completed
        // before (and is written or handed back below) or sees it and fails.
        inner.closed.store(true, Ordering::SeqCst);
        let until = inner.clock.now().saturating_add(deadline);
        if in_store_call() {
            for f in inner.flushers.iter() {
                f.post_close(until);
            }
            return CloseReport {
                unwritten: Vec::new(),
                deadline_reached: false,
                already_closed: false,
            };
        }
        if inner.config.manual {
            let rounds = inner.config.max_attempts as usize + 1;
            for f in inner.flushers.iter() {
                let mut core = f.core.lock();
                for _ in 0..rounds {
                    if core.is_idle(inner) || inner.clock.now() > until {
                        break;
                    }
                    let mode = StepMode {
                        full: true,
                        ignore_backoff: true,
                    };
                    core.step(inner, mode);
                }
            }
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
                    tracing::error!("a flusher thread panicked");
                }
            }
        }
        // No new read- or write-through can start now; wait for those in progress.
        while inner.store_users.load(Ordering::SeqCst) != 0 {
            crate::sync::thread::yield_now();
        }
        let mut unwritten = Vec::new();
        for s in inner.shards.iter() {
            s.table.lock().unwritten(&mut unwritten);
        }
        let deadline_reached = !unwritten.is_empty() && inner.clock.now() >= until;
        CloseReport {
            unwritten,
            deadline_reached,
            already_closed: false,
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
        for s in self.inner.shards.iter() {
            let t = s.table.lock();
            let c = t.counters;
            m.puts += c.puts;
            m.removes += c.removes;
            m.conflated += c.conflated;
            m.gets += c.hits + c.misses;
            m.hits += c.hits;
            m.misses += c.misses;
            m.loads += c.loads;
            m.entries += t.len() as u64;
            m.dirty += t.dirty as u64;
        }
        m.load_errors = self.inner.load_errors.load(Ordering::Relaxed);
        for f in self.inner.flushers.iter() {
            f.stats.add_into(&mut m);
        }
        m
    }

    /// The write mode chosen at build time.
    pub fn write_mode(&self) -> WriteMode {
        self.inner.config.write_mode
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
            .field("write_mode", &self.inner.config.write_mode)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl<K, V> Builder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Builds the cache and starts its flusher threads.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting at fault; [`Error::Spawn`] if a thread could
    /// not be started.
    pub fn build(self) -> Result<Cache<K, V>, Error> {
        Cache::from_builder(self)
    }
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
