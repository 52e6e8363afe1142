//! [`AsyncCache`]: the cache's API as async methods, for services on a Tokio runtime
//! (feature `tokio`).
//!
//! The engine is synchronous: its calls run on the caller's thread and some of them wait, for
//! the store (a read-through, a write-through, a flush) or for another caller (a
//! read-modify-write of the same key, backpressure, a journal sync). A Tokio worker thread
//! must not wait like that: every task scheduled on it would stall. `AsyncCache` therefore
//! splits the API by what a call may do:
//!
//! | call | runs |
//! |---|---|
//! | [`get`](AsyncCache::get), [`get_all`](AsyncCache::get_all) | a hit inline on the task; a miss on the blocking pool |
//! | [`put`](AsyncCache::put), [`remove`](AsyncCache::remove) | inline when the write cannot wait (below); otherwise on the blocking pool |
//! | [`compute`](AsyncCache::compute), [`update`](AsyncCache::update) | on the blocking pool |
//! | [`put_if_absent`](AsyncCache::put_if_absent), [`get_with`](AsyncCache::get_with), [`try_get_with`](AsyncCache::try_get_with) | a key in memory inline; otherwise on the blocking pool |
//! | [`flush`](AsyncCache::flush), [`flush_key`](AsyncCache::flush_key), [`wait_durable`](AsyncCache::wait_durable), [`invalidate`](AsyncCache::invalidate), [`invalidate_all`](AsyncCache::invalidate_all), [`close`](AsyncCache::close) | on the blocking pool |
//! | [`get_if_present`](AsyncCache::get_if_present), [`metrics`](AsyncCache::metrics), [`write_mode`](AsyncCache::write_mode) | inline (plain methods) |
//!
//! "Inline" means the call takes at most a shard lock, held for a hash-table update, and
//! returns at its first poll. "The blocking pool" is [`tokio::task::spawn_blocking`]: the
//! call runs there as it would on any thread, so the engine's guarantees hold across tasks as
//! across threads (the loads of one missed key are one store call, whichever tasks miss it;
//! two tasks that each add 1 with `compute` add 2).
//!
//! A `put` or `remove` runs inline when the cache is in [`WriteMode::Behind`], its
//! [`Backpressure`](crate::Backpressure) policy (if any) is `Reject`, its journal (if any) does
//! not sync every write ([`JournalSync::EveryWrite`](crate::journal::JournalSync)), and no
//! read-modify-write or write-through of the key is in flight. A journaled write may still,
//! rarely, create a journal segment file inline (the journal thread prepares them ahead).
//!
//! # Cancellation
//! Dropping the future of a call (a `select!` that took another branch, a timeout) loses
//! nothing the cache accepted:
//!
//! * A call that runs inline completes at its first poll. Dropped before it, it did nothing;
//!   after it, it is complete.
//! * A call on the blocking pool starts at its first poll and then runs to completion
//!   whether or not its future is still there; only its result is lost. A cancelled `put`
//!   may therefore have been made (in [`WriteMode::Through`], written to the store), a
//!   cancelled `compute` may have run its closure and written the result, a cancelled `flush`
//!   still flushes. A cancelled write may land after writes the task makes later: await it,
//!   or [`flush_key`](AsyncCache::flush_key) the key, before writing the key again if their
//!   order matters.
//! * A cancelled [`close`](AsyncCache::close) still closes the cache; its report cannot reach
//!   the caller, so the writes it could not make are logged at error level (with `tracing`),
//!   as when a cache is dropped without `close`. Await `close`.
//!
//! Each write is all or nothing, as on the synchronous cache: a dropped future never leaves a
//! write half-applied.
//!
//! # Dropping
//! Dropping the last clone of an `AsyncCache` inside a runtime lets go of the cache on the
//! blocking pool. If nothing else holds the cache, it is dropped there: closed with the
//! builder's drop deadline if `close` was not called, and its store dropped, whose own `Drop`
//! may block (the synchronous `postgres` client's must not run on a runtime thread at all).
//! Await [`close`](AsyncCache::close) before the last drop to get the report back.
//!
//! # Panics and errors
//! A panic in user code that runs on the blocking pool (a `compute` or `update` closure, an
//! `init`) reaches the awaiting task as that panic ([`std::panic::resume_unwind`]), as it
//! would reach the caller of the synchronous method. If the runtime is shutting down and its
//! blocking pool no longer runs tasks, a call that needed it did nothing and returns
//! [`Error::Spawn`] (`close` then runs on the calling thread instead).
//!
//! Calls that use the blocking pool must be awaited inside a Tokio runtime;
//! [`tokio::task::spawn_blocking`] panics otherwise.
//!
//! # Examples
//! ```
//! use writebehind::{AsyncCache, Cache, MemoryStore};
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().build()?;
//! runtime.block_on(async {
//!     let cache: AsyncCache<u64, u64> = Cache::builder(MemoryStore::new()).build()?.into_async();
//!     cache.put(1, 10).await?; // write-behind: in memory, inline
//!     assert_eq!(cache.get(&1).await?, Some(10));
//!     let visits = cache.compute(&2, |n| Some(n.copied().unwrap_or(0) + 1)).await?;
//!     assert_eq!(visits.value, Some(1));
//!     cache.flush().await?; // on the blocking pool
//!     assert!(cache.close(std::time::Duration::from_secs(5)).await.is_clean());
//!     Ok::<(), writebehind::Error>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::Cache;
use crate::engine::{CloseReport, Computed, WriteNow};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::settings::WriteMode;

/// A [`Cache`] for async code on a Tokio runtime: what never blocks runs on the calling task,
/// what may block runs on the runtime's blocking pool (see the [module docs](crate::async_cache)).
///
/// Cloning it is cheap: the clones share one cache. Dropping the last clone inside a runtime
/// drops its hold on the cache on the blocking pool: a cache that was not closed closes then
/// (as [`Cache`]'s `Drop` does), and a store's own `Drop` may block too.
pub struct AsyncCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    // Dropped before `last`: when the last clone's `last` goes, it holds the facade's only
    // reference.
    cache: Arc<Cache<K, V>>,
    last: Arc<LastHold<K, V>>,
}

/// One more reference to the cache, shared by every clone of an [`AsyncCache`] and dropped
/// with the last of them: it lets go of the cache off the runtime's worker threads.
struct LastHold<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    cache: Option<Arc<Cache<K, V>>>,
}

impl<K, V> Drop for LastHold<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        let Some(cache) = self.cache.take() else {
            return;
        };
        // Inside a runtime this may be a worker thread, where the cache's close (and the
        // store's `Drop`) must not run. A runtime shutting down drops the task unrun, and the
        // cache with it, on the thread that shuts it down.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn_blocking(move || drop(cache)));
        }
    }
}

impl<K, V> Clone for AsyncCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn clone(&self) -> Self {
        AsyncCache {
            cache: Arc::clone(&self.cache),
            last: Arc::clone(&self.last),
        }
    }
}

impl<K, V> std::fmt::Debug for AsyncCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AsyncCache").field(&*self.cache).finish()
    }
}

impl<K, V> From<Cache<K, V>> for AsyncCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn from(cache: Cache<K, V>) -> Self {
        AsyncCache::new(cache)
    }
}

impl<K, V> AsyncCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Wraps `cache` (also [`Cache::into_async`]).
    pub fn new(cache: Cache<K, V>) -> Self {
        AsyncCache::from_arc(Arc::new(cache))
    }

    /// Wraps a cache that synchronous code shares too.
    pub fn from_arc(cache: Arc<Cache<K, V>>) -> Self {
        let last = Arc::new(LastHold {
            cache: Some(Arc::clone(&cache)),
        });
        AsyncCache { cache, last }
    }

    /// The synchronous cache, for calls without an async form (`preload`, `set_write_mode`,
    /// `failed_writes`, ...) and for threads outside the runtime. Its blocking calls must not
    /// be made on a runtime's worker thread.
    pub fn cache(&self) -> &Arc<Cache<K, V>> {
        &self.cache
    }

    /// Runs `f` on the runtime's blocking pool and returns its result; a panic in `f` goes on
    /// unwinding in the caller.
    async fn blocking<R, F>(&self, f: F) -> Result<R, Error>
    where
        F: FnOnce(&Cache<K, V>) -> R + Send + 'static,
        R: Send + 'static,
    {
        let cache = Arc::clone(&self.cache);
        match tokio::task::spawn_blocking(move || f(&cache)).await {
            Ok(r) => Ok(r),
            Err(e) => Err(not_run(e)),
        }
    }

    /// [`Cache::get`]: a hit is answered on the task; a miss reads through the store on the
    /// blocking pool (one load for every caller that misses the key meanwhile, tasks and
    /// threads alike).
    ///
    /// # Errors
    /// As [`Cache::get`]; [`Error::Spawn`] (see the [module docs](crate::async_cache)).
    pub async fn get(&self, key: &K) -> Result<Option<V>, Error> {
        if let Some(v) = self.cache.get_if_present(key) {
            return Ok(Some(v));
        }
        let key = key.clone();
        self.blocking(move |c| c.get(&key)).await?
    }

    /// [`Cache::get_all`]: answered on the task when every key is in memory; otherwise the
    /// whole call runs on the blocking pool, with one [`Store::load_all`](crate::Store) for
    /// the misses.
    ///
    /// # Errors
    /// As [`Cache::get_all`]; [`Error::Spawn`].
    pub async fn get_all(&self, keys: &[K]) -> Result<Vec<Option<V>>, Error> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            match self.cache.get_if_present(key) {
                Some(v) => found.push(Some(v)),
                None => break,
            }
        }
        if found.len() == keys.len() {
            return Ok(found);
        }
        drop(found);
        let keys = keys.to_vec();
        self.blocking(move |c| c.get_all(&keys)).await?
    }

    /// [`Cache::get_if_present`]: the value in memory, if any; never reads the store.
    pub fn get_if_present(&self, key: &K) -> Option<V> {
        self.cache.get_if_present(key)
    }

    /// [`Cache::put`]: inline when the write cannot wait (see the [module docs](crate::async_cache)),
    /// otherwise on the blocking pool. Returns the write's version.
    ///
    /// # Errors
    /// As [`Cache::put`]; [`Error::Spawn`].
    pub async fn put(&self, key: K, value: V) -> Result<u64, Error> {
        self.write(key, Some(value)).await
    }

    /// [`Cache::remove`], run as [`AsyncCache::put`] is.
    ///
    /// # Errors
    /// As [`Cache::remove`]; [`Error::Spawn`].
    pub async fn remove(&self, key: &K) -> Result<u64, Error> {
        self.write(key.clone(), None).await
    }

    async fn write(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        match self.cache.inner.write_now(key, value) {
            WriteNow::Done(r) => r,
            WriteNow::WouldWait(key, value) => {
                self.blocking(move |c| c.inner.write(key, value)).await?
            }
        }
    }

    /// [`Cache::compute`], on the blocking pool: `f` runs there, once, on the key's latest
    /// value, and every other write of the key (from any task or thread) waits until its
    /// result is written.
    ///
    /// `f` must not write `key` itself, through this cache or its [`AsyncCache::cache`]: the
    /// synchronous cache answers [`Error::Reentrant`], and a write through this facade would
    /// wait for `f` for good. If `f` panics, the panic reaches the awaiting task and nothing is
    /// written.
    ///
    /// # Errors
    /// As [`Cache::compute`]; [`Error::Spawn`].
    pub async fn compute<F>(&self, key: &K, f: F) -> Result<Computed<V>, Error>
    where
        F: FnOnce(Option<&V>) -> Option<V> + Send + 'static,
    {
        let key = key.clone();
        self.blocking(move |c| c.compute(&key, f)).await?
    }

    /// [`Cache::update`], on the blocking pool, with [`AsyncCache::compute`]'s rules for `f`.
    /// Returns the version of the write, or `None` when the key has no value.
    ///
    /// # Errors
    /// As [`Cache::update`]; [`Error::Spawn`].
    pub async fn update<F>(&self, key: &K, f: F) -> Result<Option<u64>, Error>
    where
        F: FnOnce(&mut V) + Send + 'static,
    {
        let key = key.clone();
        self.blocking(move |c| c.update(&key, f)).await?
    }

    /// [`Cache::put_if_absent`]: a key with a value in memory is answered on the task (nothing
    /// is written); otherwise the call runs on the blocking pool.
    ///
    /// # Errors
    /// As [`Cache::put_if_absent`]; [`Error::Spawn`].
    pub async fn put_if_absent(&self, key: K, value: V) -> Result<Option<V>, Error> {
        if let Some(existing) = self.cache.get_if_present(&key) {
            return Ok(Some(existing));
        }
        self.blocking(move |c| c.put_if_absent(key, value)).await?
    }

    /// [`Cache::get_with`]: a key with a value in memory is answered on the task; otherwise
    /// the call runs on the blocking pool, and concurrent callers for one absent key, tasks
    /// and threads alike, run `init` once. `init` follows [`AsyncCache::compute`]'s rules.
    ///
    /// # Errors
    /// As [`Cache::get_with`]; [`Error::Spawn`].
    pub async fn get_with<F>(&self, key: K, init: F) -> Result<V, Error>
    where
        F: FnOnce() -> V + Send + 'static,
    {
        if let Some(v) = self.cache.get_if_present(&key) {
            return Ok(v);
        }
        self.blocking(move |c| c.get_with(key, init)).await?
    }

    /// [`Cache::try_get_with`], run as [`AsyncCache::get_with`] is: `init`'s error is
    /// returned and nothing is written.
    ///
    /// # Errors
    /// `init`'s error, or one of the cache's converted into `E` (as [`Cache::try_get_with`];
    /// [`Error::Spawn`]).
    pub async fn try_get_with<F, E>(&self, key: K, init: F) -> Result<V, E>
    where
        F: FnOnce() -> Result<V, E> + Send + 'static,
        E: From<Error> + Send + 'static,
    {
        if let Some(v) = self.cache.get_if_present(&key) {
            return Ok(v);
        }
        self.blocking(move |c| c.try_get_with(key, init)).await?
    }

    /// [`Cache::flush`], on the blocking pool: when it returns `Ok`, every write that returned
    /// before the call is in the store.
    ///
    /// # Errors
    /// As [`Cache::flush`]; [`Error::Spawn`].
    pub async fn flush(&self) -> Result<(), Error> {
        self.blocking(Cache::flush).await?
    }

    /// [`Cache::flush_key`], on the blocking pool.
    ///
    /// # Errors
    /// As [`Cache::flush_key`]; [`Error::Spawn`].
    pub async fn flush_key(&self, key: &K) -> Result<(), Error> {
        let key = key.clone();
        self.blocking(move |c| c.flush_key(&key)).await?
    }

    /// [`Cache::wait_durable`], on the blocking pool (which it holds a thread of until the
    /// store holds the write or `timeout` passes).
    ///
    /// # Errors
    /// As [`Cache::wait_durable`]; [`Error::Spawn`].
    pub async fn wait_durable(
        &self,
        key: &K,
        version: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let key = key.clone();
        self.blocking(move |c| c.wait_durable(&key, version, timeout))
            .await?
    }

    /// [`Cache::invalidate`], on the blocking pool (a pending write of the key is written
    /// first).
    ///
    /// # Errors
    /// As [`Cache::invalidate`]; [`Error::Spawn`].
    pub async fn invalidate(&self, key: &K) -> Result<bool, Error> {
        let key = key.clone();
        self.blocking(move |c| c.invalidate(&key)).await?
    }

    /// [`Cache::invalidate_all`], on the blocking pool.
    ///
    /// # Errors
    /// As [`Cache::invalidate_all`]; [`Error::Spawn`].
    pub async fn invalidate_all(&self) -> Result<usize, Error> {
        self.blocking(Cache::invalidate_all).await?
    }

    /// [`Cache::close`], on the blocking pool: stops accepting writes, writes what is pending
    /// until `deadline`, and hands back every write that did not reach the store.
    ///
    /// Dropped before it returns, the close still happens; the writes it could not make are
    /// then logged at error level (their count), not returned. If the runtime's blocking pool
    /// no longer runs tasks, the close runs on the calling thread.
    pub async fn close(&self, deadline: Duration) -> CloseReport<K, V> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cache = Arc::clone(&self.cache);
        let task = tokio::task::spawn_blocking(move || {
            if let Err(report) = tx.send(cache.close(deadline)) {
                if !report.unwritten.is_empty() {
                    tracing::error!(
                        unwritten = report.unwritten.len(),
                        "AsyncCache::close was cancelled: its report, the writes that did not reach the store, is lost"
                    );
                }
            }
        });
        if let Ok(report) = rx.await {
            return report;
        }
        // The task ended without sending: it panicked, or never ran.
        match task.await {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            _ => self.cache.close(deadline),
        }
    }

    /// [`Cache::metrics`]: a snapshot of the counters and gauges (takes each shard's lock
    /// briefly, never waits for the store).
    pub fn metrics(&self) -> Metrics {
        self.cache.metrics()
    }

    /// [`Cache::write_mode`].
    pub fn write_mode(&self) -> WriteMode {
        self.cache.write_mode()
    }
}

/// The error for a blocking-pool task that did not return: its panic goes on unwinding in
/// the caller; a task the runtime cancelled (it never ran: the runtime is shutting down)
/// becomes [`Error::Spawn`].
fn not_run(e: tokio::task::JoinError) -> Error {
    match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(e) => Error::Spawn(Arc::new(RuntimeShutDown(e.to_string()))),
    }
}

/// The runtime's blocking pool did not run a call.
#[derive(Debug)]
struct RuntimeShutDown(String);

impl std::fmt::Display for RuntimeShutDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the Tokio runtime's blocking pool did not run the call (the runtime is shutting down; the call did nothing): {}",
            self.0
        )
    }
}

impl std::error::Error for RuntimeShutDown {}
