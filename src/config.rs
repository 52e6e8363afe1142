//! [`Builder`]: every tunable of a cache, its default, and the validation `build` performs.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::store::Store;

/// Default staleness bound: a write reaches the store at most this long after the key's first
/// unflushed write (plus one flush).
pub const DEFAULT_WRITE_DELAY: Duration = Duration::from_secs(1);
/// Default largest batch handed to [`Store::write_all`], and the count trigger.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// Default number of shards.
pub const DEFAULT_SHARDS: usize = 64;
/// Default number of flusher threads.
pub const DEFAULT_FLUSHERS: usize = 1;
/// Default number of nice levels the flusher threads run below the thread that builds the
/// cache (Linux; see [`Builder::flusher_nice`]).
pub const DEFAULT_FLUSHER_NICE: u8 = 0;
/// Default number of attempts for a record the store rejects before it goes to the
/// failed-writes sink.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default first backoff after a failed store call; it doubles up to [`DEFAULT_RETRY_MAX`].
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(10);
/// Default cap of the retry backoff.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);
/// Default time [`Cache::flush`](crate::Cache::flush) waits for its writes to reach the store.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline of the implicit close when a cache is dropped without `close`.
pub const DEFAULT_DROP_DEADLINE: Duration = Duration::from_secs(10);
/// Default capacity of each shard's dirty ring (keys). A full ring is not an error: the
/// flusher then scans the shard's table, which costs more but loses nothing.
pub const DEFAULT_RING_CAPACITY: usize = 1024;
/// Default time after which a store call is reported as slow.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default capacity of the failed-writes sink.
pub const DEFAULT_FAILED_WRITES_CAPACITY: usize = 10_000;
/// Most shards a cache may have.
pub const MAX_SHARDS: usize = 1 << 16;
/// Most flusher threads a cache may have.
pub const MAX_FLUSHERS: usize = 256;
/// Largest `max_batch`.
pub const MAX_BATCH: usize = 1 << 20;
/// Largest dirty ring per shard.
pub const MAX_RING_CAPACITY: usize = 1 << 20;
/// Most dirty-ring slots over all shards (what [`Builder::dirty_ring_capacity`] times
/// [`Builder::shards`] may come to; the rings are allocated when the cache is built).
pub const MAX_RING_SLOTS: usize = 1 << 22;

/// How writes reach the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// `put` returns once the write is in memory; flushers write it later, conflated and
    /// batched (the default).
    #[default]
    Behind,
    /// `put` returns once the store has accepted the write; if the store fails, `put` returns
    /// the error and the cache keeps its previous value. Writes of different keys go to the
    /// store side by side; two of one key take turns, so the key's versions arrive in order.
    Through,
    /// Writes stay in the cache and are never sent to the store (a read-through replica).
    ReadOnly,
}

/// What a write does when the cache already holds `max_dirty` entries waiting for the store.
///
/// Only writes that would add a dirty entry are held back: a write to a key that already
/// waits for the store replaces its value and always goes through. Each shard admits
/// `max_dirty / shards` dirty entries; once full, it admits new ones again only when it is
/// back at 90% of that (the low watermark), so writers do not flap at the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backpressure {
    /// Wait up to `timeout` for room (the flusher is asked to write early), then fail with
    /// [`Error::Backpressure`](crate::Error::Backpressure).
    Block {
        /// The longest a writer waits.
        timeout: Duration,
    },
    /// Fail at once with [`Error::Backpressure`](crate::Error::Backpressure).
    Reject,
    /// The writer writes its key to the store itself, as in [`WriteMode::Through`]; if the
    /// store fails, the write fails with [`Error::Store`](crate::Error::Store) and the cache
    /// keeps its previous value.
    WriteThrough,
}

/// Gives an entry's weight (e.g. its size in bytes) for [`Builder::weigher`].
pub(crate) type Weigher<K, V> = std::sync::Arc<dyn Fn(&K, &V) -> u32 + Send + Sync>;

/// Orders keys for [`Builder::flush_order`].
pub(crate) type KeyOrder<K> = std::sync::Arc<dyn Fn(&K, &K) -> std::cmp::Ordering + Send + Sync>;

/// A callback that sees every write the cache gave up on.
pub(crate) type FailedWriteHook<K, V> = Box<dyn Fn(&crate::FailedWrite<K, V>) + Send + Sync>;

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
    pub(crate) store: Box<dyn Store<K, V>>,
    pub(crate) write_mode: WriteMode,
    pub(crate) write_delay: Duration,
    pub(crate) max_batch: usize,
    pub(crate) shards: usize,
    pub(crate) flushers: usize,
    pub(crate) flusher_nice: u8,
    pub(crate) max_attempts: u32,
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) flush_timeout: Duration,
    pub(crate) drop_deadline: Duration,
    pub(crate) ring_capacity: usize,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) manual: bool,
    pub(crate) name: String,
    pub(crate) on_failed_write: Option<FailedWriteHook<K, V>>,
    pub(crate) store_timeout: Duration,
    pub(crate) max_dirty: Option<(usize, Backpressure)>,
    pub(crate) failed_writes_capacity: usize,
    pub(crate) capacity: Option<usize>,
    pub(crate) weigher: Option<Weigher<K, V>>,
    pub(crate) max_weight: Option<u64>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) tti: Option<Duration>,
    pub(crate) refresh_ahead: Option<f64>,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) loaders: usize,
    pub(crate) flush_order: Option<KeyOrder<K>>,
}

impl<K, V> Builder<K, V> {
    pub(crate) fn new(store: impl Store<K, V>) -> Self {
        Builder {
            store: Box::new(store),
            write_mode: WriteMode::Behind,
            write_delay: DEFAULT_WRITE_DELAY,
            max_batch: DEFAULT_MAX_BATCH,
            shards: DEFAULT_SHARDS,
            flushers: DEFAULT_FLUSHERS,
            flusher_nice: DEFAULT_FLUSHER_NICE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_base: DEFAULT_RETRY_BASE,
            retry_max: DEFAULT_RETRY_MAX,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            drop_deadline: DEFAULT_DROP_DEADLINE,
            ring_capacity: DEFAULT_RING_CAPACITY,
            clock: Arc::new(SystemClock::default()),
            manual: false,
            name: "writebehind".to_string(),
            on_failed_write: None,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            max_dirty: None,
            failed_writes_capacity: DEFAULT_FAILED_WRITES_CAPACITY,
            capacity: None,
            weigher: None,
            max_weight: None,
            ttl: None,
            tti: None,
            refresh_ahead: None,
            negative_ttl: None,
            loaders: 1,
            flush_order: None,
        }
    }

    /// Bounds the number of entries (pending deletes included). Clean entries are evicted
    /// with S3-FIFO (a small probationary FIFO, a main CLOCK, and a ghost list); an entry
    /// with a write not yet in the store is never evicted: it is pinned, and the flusher is
    /// asked to write early. Unless [`Builder::max_dirty`] says otherwise, at most `n` entries
    /// may be dirty, with [`Backpressure::Block`] for 5 s beyond that. Each shard holds
    /// `n / shards`, so `n` must be at least the number of shards. Default: unbounded.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = Some(n);
        self
    }

    /// Weighs entries (for example by their size in bytes) for [`Builder::max_weight`].
    /// Called with no cache lock held, on the writer's or loader's thread.
    pub fn weigher(mut self, f: impl Fn(&K, &V) -> u32 + Send + Sync + 'static) -> Self {
        self.weigher = Some(std::sync::Arc::new(f));
        self
    }

    /// Bounds the total weight of the entries (each weighs 1 without a weigher); evicts like
    /// [`Builder::capacity`]. Each shard holds `max / shards`.
    pub fn max_weight(mut self, max: u64) -> Self {
        self.max_weight = Some(max);
        self
    }

    /// An entry expires this long after its last write or load. An expired entry that holds
    /// a write not yet in the store is written first and disappears then. Precision: the
    /// cache's coarse clock, which the flushers advance (a few percent of the shortest time
    /// setting, at most 100 ms).
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// An entry also expires this long after its last access (read or write).
    pub fn time_to_idle(mut self, tti: Duration) -> Self {
        self.tti = Some(tti);
        self
    }

    /// Refresh-ahead, as Coherence defines it: an access later than `factor x time_to_live`
    /// after the entry's write or load (but before it expires) returns the current value at
    /// once and schedules a reload on the loader threads; an access after expiry reloads
    /// synchronously. A reload never overwrites a write; a failed reload keeps the old value
    /// until it expires (metric `refresh_failures`). `factor` is in (0, 1) and needs
    /// [`Builder::time_to_live`].
    pub fn refresh_ahead(mut self, factor: f64) -> Self {
        self.refresh_ahead = Some(factor);
        self
    }

    /// Remembers that the store has no row for a key, for `d`, so repeated gets of an absent
    /// key do not reach the store each time. Default: absent keys are not cached.
    pub fn cache_absent_for(mut self, d: Duration) -> Self {
        self.negative_ttl = Some(d);
        self
    }

    /// Number of loader threads for refresh-ahead (default 1). Between 1 and 64.
    pub fn loaders(mut self, n: usize) -> Self {
        self.loaders = n;
        self
    }

    /// A store call that takes longer than this is reported (metric `slow_store_calls` and a
    /// warning). It is not interrupted (a blocking call cannot be), and it never stalls the
    /// other flushers, which own other shards. Default 5 s.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// Bounds the entries waiting for the store to `max` and says what a write does beyond
    /// it (see [`Backpressure`]). `max` must be at least the number of shards. Default:
    /// unbounded (memory grows while the store is down).
    pub fn max_dirty(mut self, max: usize, policy: Backpressure) -> Self {
        self.max_dirty = Some((max, policy));
        self
    }

    /// How many given-up writes the failed-writes sink holds before the application drains
    /// it. When it is full, nothing is dropped: a write that would go there stays in the
    /// cache, dirty, and is retried at the longest backoff (metric `sink_full`). Default
    /// 10 000.
    pub fn failed_writes_capacity(mut self, n: usize) -> Self {
        self.failed_writes_capacity = n;
        self
    }

    /// How writes reach the store (default [`WriteMode::Behind`]).
    pub fn write_mode(mut self, mode: WriteMode) -> Self {
        self.write_mode = mode;
        self
    }

    /// The staleness bound: how long after a key's first unflushed write it is written at the
    /// latest (plus one flush). Zero writes as soon as a flusher wakes. Default 1 s.
    pub fn write_delay(mut self, delay: Duration) -> Self {
        self.write_delay = delay;
        self
    }

    /// The most writes in one `write_all` call; this many dirty keys queued in a flusher's
    /// shards also start a flush of all of them before the delay is up (counted in small
    /// steps per shard, so with several shards per flusher it may fire a few keys late; see
    /// docs/ARCHITECTURE.md, "Count trigger"). Must be at least 1. Default 1000.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// The number of shards; a power of two between 1 and 65536. Default 64.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// The number of flusher threads; each owns the shards `i` with `i % flushers == k`.
    /// Between 1 and 256 and at most the number of shards. Default 1.
    pub fn flushers(mut self, n: usize) -> Self {
        self.flushers = n;
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
    /// putting Zipf-chosen keys, 10 levels take the put rate from about 2.15x to about 3x
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
        self.flusher_nice = levels;
        self
    }

    /// How many times a record the store rejects is tried before it goes to the failed-writes
    /// sink. At least 1. Default 5.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The retry backoff: the first wait after a failure and the cap it doubles up to.
    /// Defaults 10 ms and 5 s.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max;
        self
    }

    /// How long [`Cache::flush`](crate::Cache::flush) waits before it gives up with
    /// [`Error::FlushTimeout`]. Default 30 s.
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.flush_timeout = timeout;
        self
    }

    /// The deadline of the close that `Drop` performs when the cache was not closed.
    /// Default 10 s.
    pub fn drop_deadline(mut self, deadline: Duration) -> Self {
        self.drop_deadline = deadline;
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
        self.flush_order = Some(std::sync::Arc::new(order));
        self
    }

    /// Capacity of each shard's dirty ring, rounded up to a power of two. Default 1024.
    pub fn dirty_ring_capacity(mut self, n: usize) -> Self {
        self.ring_capacity = n;
        self
    }

    /// The clock flushers use for delays and backoff (default: the system's monotonic clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Starts no flusher threads: the application (or a test, or a model check) drives the
    /// flushers by calling [`Cache::flush_step`](crate::Cache::flush_step), `flush` and
    /// `close` itself.
    pub fn manual_flushing(mut self) -> Self {
        self.manual = true;
        self
    }

    /// A prefix for the flusher threads' names (default `writebehind`): threads are named
    /// `{name}-flusher-{k}`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// A callback called (on the flusher thread) for every write the cache gives up on, in
    /// addition to the queue that [`Cache::failed_writes`](crate::Cache::failed_writes) drains.
    pub fn on_failed_write(
        mut self,
        hook: impl Fn(&crate::FailedWrite<K, V>) + Send + Sync + 'static,
    ) -> Self {
        self.on_failed_write = Some(Box::new(hook));
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        fn bad(setting: &'static str, reason: String) -> Result<(), Error> {
            Err(Error::InvalidConfig { setting, reason })
        }
        if self.shards == 0 || !self.shards.is_power_of_two() || self.shards > MAX_SHARDS {
            return bad(
                "shards",
                format!(
                    "{} is not a power of two between 1 and {MAX_SHARDS}",
                    self.shards
                ),
            );
        }
        if self.flushers == 0 || self.flushers > MAX_FLUSHERS || self.flushers > self.shards {
            return bad(
                "flushers",
                format!(
                    "{} must be between 1 and {MAX_FLUSHERS} and at most the number of shards ({})",
                    self.flushers, self.shards
                ),
            );
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH {
            return bad(
                "max_batch",
                format!(
                    "{} must be between 1 and {MAX_BATCH}: a batch must hold at least one write, and each flusher keeps room for one",
                    self.max_batch
                ),
            );
        }
        if self.max_attempts == 0 {
            return bad(
                "max_attempts",
                "0: every write is tried at least once".into(),
            );
        }
        if self.retry_base.is_zero() || self.retry_base > self.retry_max {
            return bad(
                "retry_backoff",
                format!(
                    "base {:?} must be above zero and at most max {:?}",
                    self.retry_base, self.retry_max
                ),
            );
        }
        if self.ring_capacity == 0
            || self.ring_capacity > MAX_RING_CAPACITY
            || self.ring_capacity.saturating_mul(self.shards) > MAX_RING_SLOTS
        {
            return bad(
                "dirty_ring_capacity",
                format!(
                    "{} per shard must be between 1 and {MAX_RING_CAPACITY}, and at most {MAX_RING_SLOTS} over all {} shards (a full ring costs a table scan, never a write)",
                    self.ring_capacity, self.shards
                ),
            );
        }
        if let Some((max, _)) = self.max_dirty {
            if max < self.shards {
                return bad(
                    "max_dirty",
                    format!(
                        "{max} is below the number of shards ({}): each shard needs room for one dirty entry",
                        self.shards
                    ),
                );
            }
        }
        if let Some(c) = self.capacity {
            if c < self.shards {
                return bad(
                    "capacity",
                    format!(
                        "{c} is below the number of shards ({}): every shard needs room",
                        self.shards
                    ),
                );
            }
        }
        if let Some(w) = self.max_weight {
            if w < self.shards as u64 {
                return bad(
                    "max_weight",
                    format!("{w} is below the number of shards ({})", self.shards),
                );
            }
        }
        for (setting, d) in [
            ("time_to_live", self.ttl),
            ("time_to_idle", self.tti),
            ("cache_absent_for", self.negative_ttl),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return bad(
                    setting,
                    "zero: use a positive duration, or leave it unset".into(),
                );
            }
        }
        if let Some(f) = self.refresh_ahead {
            if !(f > 0.0 && f < 1.0) {
                return bad(
                    "refresh_ahead",
                    format!("factor {f} must be between 0 and 1 (exclusive)"),
                );
            }
            if self.ttl.is_none() {
                return bad("refresh_ahead", "needs time_to_live to be set".into());
            }
        }
        if self.loaders == 0 || self.loaders > 64 {
            return bad(
                "loaders",
                format!("{} must be between 1 and 64", self.loaders),
            );
        }
        if self.failed_writes_capacity == 0 {
            return bad(
                "failed_writes_capacity",
                "0: the sink must hold at least one write".into(),
            );
        }
        // A delay so long it would overflow deadline arithmetic is a mistake, not a wish.
        let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
        if self.write_delay > ten_years {
            return bad(
                "write_delay",
                format!("{:?} is longer than ten years", self.write_delay),
            );
        }
        Ok(())
    }
}
