//! [`Cache`]: the public face of the engine. Every method hands its call to the engine
//! ([`crate::engine`]), which hashes the key to its shard, never holds two shard locks at once,
//! and never holds one across a store call.

use std::hash::Hash;
use std::time::Duration;

use crate::engine::{CloseReport, Computed, Inner};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::settings::{Settings, WriteMode};
use crate::store::FailedWrite;
use crate::sync::Arc;

#[allow(unused_imports)] // for the doc links
use crate::{Backpressure, Store};

/// A sharded, write-behind cache in front of a [`Store`].
///
/// Share it between threads in an `Arc`. See the [crate docs](crate) for the guarantees.
pub struct Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) inner: Arc<Inner<K, V>>,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Builds the engine for `s` and starts its threads. If a thread cannot be started, the
    /// cache made so far is dropped, which closes the threads already started.
    pub(crate) fn from_settings(s: Settings<K, V>) -> Result<Self, Error> {
        let (inner, threads) = Inner::new(s)?;
        let cache = Cache {
            inner: Arc::new(inner),
        };
        Inner::start_threads(&cache.inner, &threads)?;
        Ok(cache)
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
        self.inner.write(key, Some(value))
    }

    /// [`Cache::put`] with a time to live of the entry's own: it expires `ttl` after this
    /// write, or earlier by the cache's own rules. A write still waiting for the store does
    /// not expire: it is written first, and leaves memory then. A later write of the key
    /// without a time to live clears it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless the cache was built with
    /// [`Builder::per_entry_ttl`](crate::Builder::per_entry_ttl); otherwise as for
    /// [`Cache::put`].
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use writebehind::{Cache, ManualClock, MemoryStore};
    ///
    /// let clock = Arc::new(ManualClock::new());
    /// let store = Arc::new(MemoryStore::new());
    /// let cache = Cache::builder(store.clone())
    ///     .per_entry_ttl()
    ///     .clock(clock.clone())
    ///     .manual_flushing()
    ///     .build()?;
    /// cache.put_with_ttl("login:1".to_string(), 7u64, Duration::from_secs(30))?;
    /// cache.put("user:1".to_string(), 8)?;
    /// cache.flush()?;
    /// clock.advance(Duration::from_secs(31));
    /// cache.flush_step()?; // the flusher's sweep
    /// assert!(!cache.contains_key(&"login:1".to_string()));
    /// assert!(cache.contains_key(&"user:1".to_string()));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn put_with_ttl(&self, key: K, value: V, ttl: Duration) -> Result<u64, Error> {
        self.inner.put_with_ttl(key, value, ttl)
    }

    /// Removes `key`: `get` answers `None` from now on, and a delete is queued for the store
    /// (even if the key was not cached: the store may hold it).
    ///
    /// # Errors
    /// As for [`Cache::put`].
    pub fn remove(&self, key: &K) -> Result<u64, Error> {
        self.inner.write(key.clone(), None)
    }

    /// Writes many keys, as [`Cache::put`] each, and returns their versions in order. Written
    /// behind, the keys that share a shard are written under one hold of its lock (a key
    /// that must wait, for backpressure or for a write-through or read-modify-write of it in
    /// flight, is written on its own meanwhile); in the other modes, one at a time.
    ///
    /// # Errors
    /// As [`Cache::put`], for the first write that fails: the call stops there. Each write
    /// is whole (made or not); writes of other keys may have been made, since the keys are
    /// taken shard by shard, not in the order given. A journal codec that fails refuses the
    /// whole call before anything is written.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore};
    /// let store = Arc::new(MemoryStore::new());
    /// let cache = Cache::builder(store.clone()).build()?;
    /// let versions = cache.put_all((0..100u64).map(|k| (k, k * 10)))?;
    /// assert_eq!(versions.len(), 100);
    /// cache.remove_all(&[1, 2, 3])?;
    /// cache.flush()?;
    /// assert_eq!((store.get(&4), store.get(&2)), (Some(40), None));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn put_all(&self, entries: impl IntoIterator<Item = (K, V)>) -> Result<Vec<u64>, Error> {
        self.inner
            .write_many(entries.into_iter().map(|(k, v)| (k, Some(v))).collect())
    }

    /// Removes many keys, as [`Cache::remove`] each, with the locking of
    /// [`Cache::put_all`]; returns the versions of the deletes in order.
    ///
    /// # Errors
    /// As [`Cache::put_all`].
    pub fn remove_all(&self, keys: &[K]) -> Result<Vec<u64>, Error> {
        self.inner
            .write_many(keys.iter().map(|k| (k.clone(), None)).collect())
    }

    /// Returns the latest value of `key`: a pending write or delete if there is one, else the
    /// cached value, else the store's (read through, then cached).
    ///
    /// # Errors
    /// [`Error::Load`] if the key was not in memory and the store failed (never `Ok(None)` for
    /// a failure); [`Error::Closed`] for a miss after `close`.
    #[inline(always)]
    pub fn get(&self, key: &K) -> Result<Option<V>, Error> {
        self.inner.get(key)
    }

    /// Returns `key`'s value if it is in memory (a pending write, or a cached value), and
    /// `None` otherwise: unlike [`Cache::get`], never reads the store, so it never blocks on
    /// it.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore};
    /// let store = Arc::new(MemoryStore::new());
    /// store.insert(1u64, 10u64);
    /// let cache = Cache::builder(store.clone()).build()?;
    /// assert_eq!(cache.get_if_present(&1), None); // in the store only
    /// assert_eq!(cache.get(&1)?, Some(10));      // read through, now cached
    /// assert_eq!(cache.get_if_present(&1), Some(10));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn get_if_present(&self, key: &K) -> Option<V> {
        self.inner.get_if_present(key)
    }

    /// Reads many keys: hits from memory, and every miss through one
    /// [`Store::load_all`] call (misses already being loaded by another caller wait for
    /// that load instead). The answer is in the order of `keys`.
    ///
    /// # Errors
    /// [`Error::Load`] if the store failed; [`Error::Closed`] for misses after `close`.
    pub fn get_all(&self, keys: &[K]) -> Result<Vec<Option<V>>, Error> {
        self.inner.get_all(keys)
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
        self.inner.preload(entries)
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
        self.inner.preload_from_store(keys)
    }

    /// A snapshot of every live entry in memory. Never reads the store.
    pub fn entries(&self) -> Vec<(K, V)> {
        self.inner.entries()
    }

    /// `true` if `key` holds a value in memory. Never reads the store.
    pub fn contains_key(&self, key: &K) -> bool {
        self.inner.contains_key(key)
    }

    /// Live entries in memory (pending deletes not counted).
    pub fn len(&self) -> usize {
        self.inner.len()
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
        self.inner.flush()
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
        self.inner.flush_key(key)
    }

    /// Atomically replaces `key`'s value with what `f` makes of the current one, and returns
    /// the new value and the version of its write.
    ///
    /// `f` runs once, on the latest value: a pending write if there is one, else the cached
    /// value, else the store's (read through, single-flight). Until the result is written,
    /// every other write of the key waits (on any thread), so no update is lost: two threads
    /// that each add 1 add 2. `Some(v)` writes `v` (behind, through or locally, per the
    /// write mode); `None` removes the key, or writes nothing if it was absent
    /// ([`Computed::version`] is then `None`).
    ///
    /// `f` runs without any lock: other keys, and reads of this key, go on meanwhile. It must
    /// not write `key` itself (that would wait for this call): such a write returns
    /// [`Error::Reentrant`]. If `f` panics, the panic reaches the caller, nothing is written,
    /// and the key is free again.
    ///
    /// # Errors
    /// [`Error::Load`] if the key had to be read from the store and the store failed (`f`
    /// does not run); otherwise as for [`Cache::put`]; [`Error::Reentrant`] from inside `f`
    /// for its own key.
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new()).build()?;
    /// let likes = "post:7".to_string();
    /// let c = cache.compute(&likes, |n: Option<&u64>| Some(n.copied().unwrap_or(0) + 1))?;
    /// assert_eq!(c.value, Some(1));
    /// assert_eq!(cache.compute(&likes, |n| n.map(|n| n + 1))?.value, Some(2));
    /// // `None` removes the key.
    /// let gone = cache.compute(&likes, |_| None)?;
    /// assert!(gone.value.is_none() && gone.version.is_some());
    /// assert_eq!(cache.get(&likes)?, None);
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn compute<F>(&self, key: &K, f: F) -> Result<Computed<V>, Error>
    where
        F: FnOnce(Option<&V>) -> Option<V>,
    {
        self.inner.compute(key, f)
    }

    /// Atomically changes `key`'s value in place, if the key has one (in memory or in the
    /// store); returns the version of the write, or `None` when the key is absent (nothing is
    /// written). The value `f` gets is a copy of the latest one, changed and written as one
    /// step, with the same guarantees as [`Cache::compute`]; unlike `compute`, the new value
    /// is not cloned again to be returned.
    ///
    /// # Errors
    /// As [`Cache::compute`].
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new()).build()?;
    /// cache.put("cart:1".to_string(), vec!["apple".to_string()])?;
    /// let v = cache.update(&"cart:1".to_string(), |items| items.push("pear".into()))?;
    /// assert!(v.is_some());
    /// assert_eq!(cache.get(&"cart:1".to_string())?.unwrap(), ["apple", "pear"]);
    /// assert_eq!(cache.update(&"cart:2".to_string(), |items| items.clear())?, None);
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn update<F>(&self, key: &K, f: F) -> Result<Option<u64>, Error>
    where
        F: FnOnce(&mut V),
    {
        self.inner.update(key, f)
    }

    /// Writes `value` only if `key` has no value, in memory or in the store (read through);
    /// returns the existing value if there is one (and writes nothing), else `None`. Atomic
    /// with respect to every other write of the key, as [`Cache::compute`].
    ///
    /// # Errors
    /// As [`Cache::compute`].
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new()).build()?;
    /// assert_eq!(cache.put_if_absent("user:1".to_string(), "ada".to_string())?, None);
    /// assert_eq!(
    ///     cache.put_if_absent("user:1".to_string(), "bob".to_string())?.as_deref(),
    ///     Some("ada")
    /// );
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn put_if_absent(&self, key: K, value: V) -> Result<Option<V>, Error> {
        self.inner.put_if_absent(key, value)
    }

    /// Returns `key`'s value (from memory, or read through the store); if it has none, makes
    /// one with `init`, writes it (behind, per the write mode) and returns it. Concurrent
    /// callers for one absent key run `init` once: the others wait for its value.
    ///
    /// `init` runs without any lock and must not write `key` itself ([`Error::Reentrant`]).
    /// If it panics, the panic reaches the caller and the next caller runs its own `init`.
    ///
    /// # Errors
    /// As [`Cache::compute`].
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new()).build()?;
    /// let v = cache.get_with(7u64, || "made once".to_string())?;
    /// assert_eq!(v, "made once");
    /// assert_eq!(cache.get_with(7, || unreachable!())?, "made once");
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn get_with<F>(&self, key: K, init: F) -> Result<V, Error>
    where
        F: FnOnce() -> V,
    {
        self.inner.try_get_with(key, || Ok::<V, Error>(init()))
    }

    /// [`Cache::get_with`] for an `init` that may fail: its error is returned and nothing is
    /// written (the next caller tries again). The cache's own errors convert into `E`.
    ///
    /// # Errors
    /// `init`'s error, or one of [`Cache::compute`]'s converted into `E`.
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    /// #[derive(Debug)]
    /// enum AppError { NotFound, Cache(writebehind::Error) }
    /// impl From<writebehind::Error> for AppError {
    ///     fn from(e: writebehind::Error) -> Self { AppError::Cache(e) }
    /// }
    /// let cache = Cache::builder(MemoryStore::new()).build().unwrap();
    /// let miss = cache.try_get_with(1u64, || Err::<String, _>(AppError::NotFound));
    /// assert!(matches!(miss, Err(AppError::NotFound)));
    /// assert!(!cache.contains_key(&1));
    /// let hit = cache.try_get_with(1u64, || Ok::<_, AppError>("found".to_string()));
    /// assert_eq!(hit.unwrap(), "found");
    /// ```
    pub fn try_get_with<F, E>(&self, key: K, init: F) -> Result<V, E>
    where
        F: FnOnce() -> Result<V, E>,
        E: From<Error>,
    {
        self.inner.try_get_with(key, init)
    }

    /// Drops `key` from memory without deleting it in the store (unlike
    /// [`Cache::remove`]): the next `get` reads it through the store again. A pending write
    /// of the key is written first, on the caller's thread ([`Cache::flush_key`]), so nothing
    /// unwritten is dropped. A read-through of the key in flight does not cache what it read.
    ///
    /// Returns `Ok(true)` when the key is no longer in memory (or was not), `Ok(false)` when
    /// it stays because another write of it arrived while its older write was being written.
    ///
    /// # Errors
    /// As [`Cache::flush_key`]: the pending write could not be written, and the key stays.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore};
    /// let store = Arc::new(MemoryStore::new());
    /// let cache = Cache::builder(store.clone()).build()?;
    /// cache.put(1u64, "v1".to_string())?;
    /// assert!(cache.invalidate(&1)?);            // written first, then dropped from memory
    /// assert!(!cache.contains_key(&1));
    /// assert_eq!(store.get(&1).as_deref(), Some("v1"));
    /// assert_eq!(cache.get(&1)?.as_deref(), Some("v1")); // read through again
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn invalidate(&self, key: &K) -> Result<bool, Error> {
        self.inner.invalidate(key)
    }

    /// Drops every key from memory without deleting anything in the store. Pending writes are
    /// written first ([`Cache::flush`]); a key written again after that barrier stays.
    /// Returns how many entries left memory.
    ///
    /// # Errors
    /// As [`Cache::flush`], when there were pending writes: nothing that waits for the store
    /// is dropped.
    pub fn invalidate_all(&self) -> Result<usize, Error> {
        self.inner.invalidate_all()
    }

    /// Hands partitions away ([`Builder::partitions`](crate::Builder::partitions)): from
    /// now on their keys' reads and writes are refused ([`Error::NotOwner`]); then every
    /// pending write is written ([`Cache::flush`]) and their keys leave memory, so the new
    /// owner can start serving them once this returns.
    ///
    /// Returns the partitions' writes the store could not take (it is down, or rejected
    /// them): they left this cache, for the application to hand to the new owner (or record).
    /// Empty when everything was written.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a cache that is not partitioned or a partition that does
    /// not exist (nothing changes); [`Error::Closed`] after `close`; from inside a store
    /// call, the flush's error (the partitions stay released and their writes queued).
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, Error, MemoryStore};
    /// let store = Arc::new(MemoryStore::new());
    /// let part = |k: &u64| (*k % 2) as u32;
    /// let old = Cache::builder(store.clone()).partitions(2, part).build()?;
    /// let new = Cache::builder(store.clone()).partitions(2, part).owned_partitions([0]).build()?;
    /// old.put(3, "v1".to_string())?;                  // partition 1, old's
    /// let unwritten = old.release_partitions(&[1])?;   // written, dropped, refused from now
    /// assert!(unwritten.is_empty());
    /// assert!(matches!(old.get(&3), Err(Error::NotOwner { partition: 1 })));
    /// new.acquire_partitions(&[1])?;
    /// assert_eq!(new.get(&3)?.as_deref(), Some("v1")); // read from the store
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn release_partitions(&self, parts: &[u32]) -> Result<Vec<crate::Write<K, V>>, Error> {
        self.inner.release_partitions(parts)
    }

    /// Starts serving partitions handed over by another instance: whatever memory still
    /// holds of their keys leaves it first (it may be older than the store), so their reads
    /// go to the store. Call it once the previous owner's
    /// [`Cache::release_partitions`] returned `Ok` (or it is gone).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a cache that is not partitioned or a partition that does
    /// not exist (nothing changes); [`Error::Closed`] after `close`.
    pub fn acquire_partitions(&self, parts: &[u32]) -> Result<(), Error> {
        self.inner.acquire_partitions(parts)
    }

    /// The partitions this cache serves now (empty for a cache that is not partitioned).
    pub fn owned_partitions(&self) -> Vec<u32> {
        self.inner.owned_partitions()
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
        self.inner.wait_durable(key, version, timeout)
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
        self.inner.flush_step()
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
        self.inner.close(deadline)
    }

    /// Takes the writes the cache gave up on (the store rejected them `max_attempts` times),
    /// oldest first. The application can fix and re-submit them with `put`/`remove`.
    pub fn failed_writes(&self) -> Vec<FailedWrite<K, V>> {
        self.inner.failed_writes()
    }

    /// The current write mode.
    #[inline]
    pub fn write_mode(&self) -> WriteMode {
        self.inner.write_mode()
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
        self.inner.set_write_mode(mode)
    }

    /// `true` once `close` has started.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// `true` if no live entry is in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the counters and gauges.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics()
    }

    /// This cache behind the async facade for Tokio services (feature `tokio`): what may
    /// block runs on the runtime's blocking pool. See [`AsyncCache`](crate::AsyncCache).
    #[cfg(feature = "tokio")]
    pub fn into_async(self) -> crate::AsyncCache<K, V> {
        crate::AsyncCache::new(self)
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
