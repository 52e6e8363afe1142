//! [`Builder`]: the public face of a cache's [`Settings`]: one method per tunable, and `build`.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::Cache;
use crate::clock::Clock;
use crate::error::Error;
use crate::settings::{Backpressure, Settings, WriteMode};
use crate::store::Store;

/// Configures and builds a [`Cache`](crate::Cache). Made by [`Cache::builder`](crate::Cache::builder).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use writebehind::{Cache, MemoryStore, WriteMode};
///
/// let cache: Cache<u64, String> = Cache::builder(MemoryStore::new())
///     .write_mode(WriteMode::Behind)
///     .write_delay(Duration::from_millis(200))
///     .max_batch(500)
///     .shards(16)
///     .flushers(1)
///     .build()
///     .unwrap();
/// # drop(cache);
///
/// // A bad setting is refused with a message that names it.
/// let err = Cache::<u64, String>::builder(MemoryStore::new()).shards(0).build().unwrap_err();
/// assert!(err.to_string().contains("shards"));
/// ```
pub struct Builder<K, V> {
    pub(crate) s: Settings<K, V>,
}

impl<K, V> Builder<K, V> {
    pub(crate) fn new(store: impl Store<K, V>) -> Self {
        Builder {
            s: Settings::new(store),
        }
    }

    /// Bounds the number of entries (pending deletes included). Clean entries are evicted
    /// with S3-FIFO (a small probationary FIFO, a main CLOCK, and a ghost list); an entry
    /// with a write not yet in the store is never evicted: it is pinned, and the flusher is
    /// asked to write early. Unless [`Builder::max_dirty`] says otherwise, at most `n` entries
    /// may be dirty, with [`Backpressure::Block`] for 5 s beyond that. Each shard holds
    /// `n / shards`, so `n` must be at least the number of shards. Default: unbounded.
    pub fn capacity(mut self, n: usize) -> Self {
        self.s.capacity = Some(n);
        self
    }

    /// Weighs entries (for example by their size in bytes) for [`Builder::max_weight`].
    /// Called with no cache lock held, on the writer's or loader's thread.
    pub fn weigher(mut self, f: impl Fn(&K, &V) -> u32 + Send + Sync + 'static) -> Self {
        self.s.weigher = Some(std::sync::Arc::new(f));
        self
    }

    /// Bounds the total weight of the entries (each weighs 1 without a weigher); evicts like
    /// [`Builder::capacity`]. Each shard holds `max / shards`.
    pub fn max_weight(mut self, max: u64) -> Self {
        self.s.max_weight = Some(max);
        self
    }

    /// An entry expires this long after its last write or load. An expired entry that holds
    /// a write not yet in the store is written first and disappears then. Precision: the
    /// cache's coarse clock, which the flushers advance (a few percent of the shortest time
    /// setting, at most 100 ms).
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.s.ttl = Some(ttl);
        self
    }

    /// Lets [`Cache::put_with_ttl`](crate::Cache::put_with_ttl) give entries times to live
    /// of their own. An entry expires at the first of its own deadline and the cache's
    /// rules ([`Builder::time_to_live`], [`Builder::time_to_idle`]); a write without a time
    /// to live of its own clears the entry's. Like every time rule, it turns off the
    /// lock-free reads.
    pub fn per_entry_ttl(mut self) -> Self {
        self.s.per_entry_ttl = true;
        self
    }

    /// An entry also expires this long after its last access (read or write).
    pub fn time_to_idle(mut self, tti: Duration) -> Self {
        self.s.tti = Some(tti);
        self
    }

    /// Refresh-ahead, as Coherence defines it: an access later than `factor x time_to_live`
    /// after the entry's write or load (but before it expires) returns the current value at
    /// once and schedules a reload on the loader threads; an access after expiry reloads
    /// synchronously. A reload never overwrites a write; a failed reload keeps the old value
    /// until it expires (metric `refresh_failures`). `factor` is in (0, 1) and needs
    /// [`Builder::time_to_live`].
    pub fn refresh_ahead(mut self, factor: f64) -> Self {
        self.s.refresh_ahead = Some(factor);
        self
    }

    /// Remembers that the store has no row for a key, for `d`, so repeated gets of an absent
    /// key do not reach the store each time. Default: absent keys are not cached.
    pub fn cache_absent_for(mut self, d: Duration) -> Self {
        self.s.negative_ttl = Some(d);
        self
    }

    /// Number of loader threads for refresh-ahead (default 1). Between 1 and 64.
    pub fn loaders(mut self, n: usize) -> Self {
        self.s.loaders = n;
        self
    }

    /// A store call that takes longer than this is reported (metric `slow_store_calls` and a
    /// warning). It is not interrupted (a blocking call cannot be), and it never stalls the
    /// other flushers, which own other shards. Default 5 s.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.s.store_timeout = timeout;
        self
    }

    /// Bounds the entries waiting for the store to `max` and says what a write does beyond
    /// it (see [`Backpressure`]). `max` must be at least the number of shards. Default:
    /// unbounded (memory grows while the store is down).
    pub fn max_dirty(mut self, max: usize, policy: Backpressure) -> Self {
        self.s.max_dirty = Some((max, policy));
        self
    }

    /// How many given-up writes the failed-writes sink holds before the application drains
    /// it. When it is full, nothing is dropped: a write that would go there stays in the
    /// cache, dirty, and is retried at the longest backoff (metric `sink_full`). Default
    /// 10 000.
    pub fn failed_writes_capacity(mut self, n: usize) -> Self {
        self.s.failed_writes_capacity = n;
        self
    }

    /// How writes reach the store (default [`WriteMode::Behind`]).
    pub fn write_mode(mut self, mode: WriteMode) -> Self {
        self.s.write_mode = mode;
        self
    }

    /// The staleness bound: how long after a key's first unflushed write it is written at the
    /// latest (plus one flush). Zero writes as soon as a flusher wakes. Default 1 s.
    pub fn write_delay(mut self, delay: Duration) -> Self {
        self.s.write_delay = delay;
        self
    }

    /// The most writes in one `write_all` call; this many dirty keys queued in a flusher's
    /// shards also start a flush of all of them before the delay is up (counted in small
    /// steps per shard, so with several shards per flusher it may fire a few keys late; see
    /// docs/ARCHITECTURE.md, "Count trigger"). Must be at least 1. Default 1000.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.s.max_batch = n;
        self
    }

    /// The number of shards; a power of two between 1 and 65536. Default 64.
    pub fn shards(mut self, n: usize) -> Self {
        self.s.shards = n;
        self
    }

    /// The number of flusher threads; each owns the shards `i` with `i % flushers == k`.
    /// Between 1 and 256 and at most the number of shards. Default 1.
    pub fn flushers(mut self, n: usize) -> Self {
        self.s.flushers = n;
        self
    }

    /// How many nice levels below the thread that builds the cache each flusher's worker
    /// thread runs (Linux; elsewhere nothing changes). Default 0: level with it, one thread
    /// per flusher. The result is capped at nice 19, the lowest priority.
    ///
    /// A throughput setting for machines whose cores the application keeps busy. A flusher
    /// is background work: at a lower priority the application's threads run first and the
    /// flusher takes the gaps, so its flush windows grow, more writes to a key conflate into
    /// one record, and the machine does less work per put. On two cores with two threads
    /// putting Zipf-chosen keys, 10 levels take the put rate from 3.3x to 4.4x
    /// the hand-rolled write-behind's (`cargo bench --bench ratio`; docs/BENCHMARKS.md,
    /// "Targets"). With a core to spare it changes nothing.
    ///
    /// **The staleness bound, and where it gives.** Above 0, each flusher gets a second
    /// thread at the builder's priority, the keeper, which parks. Before each batch the
    /// niced worker checks whether that batch would end less than half of
    /// [`Builder::write_delay`] before the deadline of its oldest write; if so it stops
    /// between two batches and hands the rest to the keeper, which writes it at once and
    /// hands back (metric `flusher_handoffs`). In the main job at 10 levels the oldest
    /// unflushed write stays under the 1 s delay (docs/BENCHMARKS.md, "Main job"). While the
    /// worker has the turn the keeper also looks every eighth of the delay (at least every
    /// 5 ms): once a shard has waited an eighth of the delay past its deadline, or a retry
    /// an eighth past its time, and the worker has not started the step, the keeper takes
    /// the turn, writes it and hands back (metric `flusher_takeovers`).
    ///
    /// What no keeper covers is a worker the CPU leaves in the middle of a batch, the store
    /// call included: the batch is its own until the call returns. With cores kept busy by
    /// more threads than they hold, a niced flusher can then miss the bound: on two cores
    /// with two busy threads beside the main job's two clients, 19 levels let writes wait
    /// 1.4-4.2 s with a 1 s delay, 10 levels 0.97 s, 5 levels 0.71 s, and 0 levels keep them
    /// under 0.31 s (docs/BENCHMARKS.md, "Main job"). Lower the priority only where the
    /// flusher still gets its share of the CPU, and by a few levels rather than many. A
    /// failure to lower the priority is logged at debug level and the worker runs at the
    /// builder's priority.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use writebehind::{Cache, MemoryStore};
    ///
    /// // Flushers 10 nice levels below the application's threads.
    /// let cache: Cache<u64, u64> = Cache::builder(Arc::new(MemoryStore::new()))
    ///     .flusher_nice(10)
    ///     .build()?;
    /// cache.put(1, 1)?;
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn flusher_nice(mut self, levels: u8) -> Self {
        self.s.flusher_nice = levels;
        self
    }

    /// How many times a record the store rejects is tried before it goes to the failed-writes
    /// sink. At least 1. Default 5.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.s.max_attempts = n;
        self
    }

    /// The retry backoff: the first wait after a failure and the cap it doubles up to.
    /// Defaults 10 ms and 5 s.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.s.retry_base = base;
        self.s.retry_max = max;
        self
    }

    /// How long [`Cache::flush`](crate::Cache::flush) waits before it gives up with
    /// [`Error::FlushTimeout`]. Default 30 s.
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.s.flush_timeout = timeout;
        self
    }

    /// The deadline of the close that `Drop` performs when the cache was not closed.
    /// Default 10 s.
    pub fn drop_deadline(mut self, deadline: Duration) -> Self {
        self.s.drop_deadline = deadline;
        self
    }

    /// Hands a backlog to the store in key order. When a flusher step has more dirty keys
    /// than one batch holds (the store fell behind, or a `flush` drains a long write
    /// delay), it sorts them with `order` before it cuts them into batches of
    /// [`Builder::max_batch`], so each batch covers a run of neighbouring keys instead of
    /// keys from all over the key space. A B-tree store (SQLite, PostgreSQL) then writes
    /// each batch into a few neighbouring pages rather than one page per row:
    /// docs/BENCHMARKS.md ("Stores") measures SQLite taking a large backlog
    /// several times faster this way. Pick the order the store keeps its rows in (for
    /// integer or string keys, usually `Ord::cmp`); any order that keeps neighbours together
    /// helps.
    ///
    /// Per-key order is unchanged (each key's writes still reach the store oldest first),
    /// and a step that fits in one batch is not sorted (the adapters sort each batch
    /// themselves). The sort costs the flusher about `log2(n)` calls of `order` per key of
    /// the backlog. If `order` panics, the step writes in the default order and the error
    /// is logged. Default: none (batches come shard by shard, in no key order).
    ///
    /// A flusher that drains faster also takes more of the CPU while it does: on a 2-core
    /// machine with two writer threads the writers' put p99.9 rose from about 1–2 µs to
    /// 1.4–3.2 µs with the order, while SQLite took the same backlog 8–12 times faster
    /// (docs/BENCHMARKS.md, "Stores").
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, MemoryStore};
    ///
    /// let cache: Cache<u64, String> = Cache::builder(MemoryStore::new())
    ///     .flush_order(|a: &u64, b: &u64| a.cmp(b))
    ///     .build()?;
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn flush_order(
        mut self,
        order: impl Fn(&K, &K) -> std::cmp::Ordering + Send + Sync + 'static,
    ) -> Self {
        self.s.flush_order = Some(std::sync::Arc::new(order));
        self
    }

    /// Capacity of each shard's dirty ring, rounded up to a power of two. Default 1024.
    pub fn dirty_ring_capacity(mut self, n: usize) -> Self {
        self.s.ring_capacity = n;
        self
    }

    /// The clock flushers use for delays and backoff (default: the system's monotonic clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.s.clock = clock;
        self
    }

    /// Starts no flusher threads: the application (or a test, or a model check) drives the
    /// flushers by calling [`Cache::flush_step`](crate::Cache::flush_step), `flush` and
    /// `close` itself.
    pub fn manual_flushing(mut self) -> Self {
        self.s.manual = true;
        self
    }

    /// A prefix for the flusher threads' names (default `writebehind`): threads are named
    /// `{name}-flusher-{k}`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.s.name = name.into();
        self
    }

    /// Records every accepted write in a crash-safe journal before `put`/`remove` return, so
    /// that the writes the store does not hold yet survive the death of the process (and,
    /// with [`JournalSync::EveryWrite`](crate::journal::JournalSync::EveryWrite), a power
    /// loss). `build` replays what the journal holds that the store may not: those writes
    /// are dirty again, with their journaled versions, and are written as any other.
    /// Off by default: without a journal, a crash loses every write not yet in the store.
    ///
    /// What each sync mode promises is in [`JournalSync`](crate::journal::JournalSync); the
    /// format and the space reclamation are in [`crate::journal`].
    ///
    /// # Examples
    /// ```
    /// use writebehind::journal::{Journal, JournalSync};
    /// use writebehind::stores::Raw;
    /// use writebehind::{Cache, MemoryStore};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let cache: Cache<String, Vec<u8>> = Cache::builder(MemoryStore::new())
    ///     .journal(Journal::new(dir.path(), Raw, Raw).sync(JournalSync::EveryWrite))
    ///     .build()?;
    /// cache.put("k".to_string(), b"v".to_vec())?; // on stable storage when it returns
    /// assert!(cache.close(std::time::Duration::from_secs(5)).is_clean());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn journal(mut self, journal: crate::journal::Journal<K, V>) -> Self {
        self.s.journal = Some(journal);
        self
    }

    /// Splits the key space into `count` partitions (`partitioner(key) % count`), for running
    /// several instances over one database: each serves the partitions the application gives
    /// it ([`Builder::owned_partitions`]; all of them by default), and refuses reads and
    /// writes of other keys with [`Error::NotOwner`](crate::Error::NotOwner).
    /// [`Cache::release_partitions`](crate::Cache::release_partitions) and
    /// [`Cache::acquire_partitions`](crate::Cache::acquire_partitions) move them between
    /// instances. The partitioner must give a key the same partition in every instance (a
    /// hash of the key's bytes, not `std`'s randomly seeded hasher); it runs outside the
    /// cache's locks. See docs/SCALING.md.
    ///
    /// # Examples
    /// ```
    /// use writebehind::{Cache, Error, MemoryStore};
    /// let cache = Cache::builder(MemoryStore::new())
    ///     .partitions(4, |k: &u64| (*k % 4) as u32)
    ///     .owned_partitions([0, 1])
    ///     .build()?;
    /// cache.put(4, "mine".to_string())?;                  // partition 0
    /// assert!(matches!(cache.put(6, "theirs".to_string()), Err(Error::NotOwner { partition: 2 })));
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn partitions(
        mut self,
        count: u32,
        partitioner: impl Fn(&K) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.s.partitions = Some(crate::partition::PartitionSettings {
            count,
            of: std::sync::Arc::new(partitioner),
            owned: None,
        });
        self
    }

    /// The partitions this cache serves from the start (with [`Builder::partitions`]);
    /// default: all of them.
    pub fn owned_partitions(mut self, owned: impl IntoIterator<Item = u32>) -> Self {
        self.s.owned_partitions = Some(owned.into_iter().collect());
        self
    }

    /// A listener called for every clean value that leaves memory, with its key and the
    /// [`RemovalCause`](crate::RemovalCause): evicted, expired, invalidated, replaced by a
    /// newer value, or removed. A value whose write the store may not hold yet never leaves
    /// memory, so it is never reported.
    ///
    /// It runs outside every lock of the cache, on the thread whose call made the value
    /// leave (a `put` that replaced it, a `get` that found it expired, an `invalidate`) or
    /// on a flusher thread (evictions and expiries the flushers make, and any value left
    /// over from a call it was not delivered in), in no particular order between threads.
    /// It must be quick; it may call the cache, but a write it makes of a key whose
    /// read-modify-write it interrupted gets [`Error::Reentrant`](crate::Error::Reentrant).
    /// A panic in it is caught and counted in `Metrics::user_panics`.
    ///
    /// # Examples
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use writebehind::{Cache, MemoryStore, RemovalCause};
    ///
    /// let heard = Arc::new(Mutex::new(Vec::new()));
    /// let h = heard.clone();
    /// let cache = Cache::builder(MemoryStore::new())
    ///     .on_removal(move |k: u64, v: String, cause| h.lock().unwrap().push((k, v, cause)))
    ///     .build()?;
    /// cache.put(1, "a".to_string())?;
    /// cache.flush()?;                      // now clean
    /// cache.put(1, "b".to_string())?;      // replaces the clean "a"
    /// cache.flush()?;
    /// cache.invalidate(&1)?;
    /// assert_eq!(
    ///     *heard.lock().unwrap(),
    ///     [(1, "a".to_string(), RemovalCause::Replaced), (1, "b".to_string(), RemovalCause::Invalidated)]
    /// );
    /// # Ok::<(), writebehind::Error>(())
    /// ```
    pub fn on_removal(
        mut self,
        listener: impl Fn(K, V, crate::RemovalCause) + Send + Sync + 'static,
    ) -> Self {
        self.s.on_removal = Some(std::sync::Arc::new(listener));
        self
    }

    /// A callback called (on the flusher thread) for every write the cache gives up on, in
    /// addition to the queue that [`Cache::failed_writes`](crate::Cache::failed_writes) drains.
    pub fn on_failed_write(
        mut self,
        hook: impl Fn(&crate::FailedWrite<K, V>) + Send + Sync + 'static,
    ) -> Self {
        self.s.on_failed_write = Some(Box::new(hook));
        self
    }
}

impl<K, V> Builder<K, V>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Builds the cache and starts its flusher threads.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting at fault; [`Error::Spawn`] if a thread could
    /// not be started.
    pub fn build(self) -> Result<Cache<K, V>, Error> {
        Cache::from_settings(self.s)
    }
}

impl<K, V> Cache<K, V>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
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
}
