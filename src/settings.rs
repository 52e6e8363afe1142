//! [`Settings`]: every tunable of a cache with its default, the enums and limits the
//! builder's methods speak of, and the validation `build` performs. [`Builder`](crate::Builder)
//! (in `config.rs`) is the public face over it.

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
/// cache (Linux; see [`Builder::flusher_nice`](crate::Builder::flusher_nice)).
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
/// Most dirty-ring slots over all shards (what [`Builder::dirty_ring_capacity`](crate::Builder::dirty_ring_capacity) times
/// [`Builder::shards`](crate::Builder::shards) may come to; the rings are allocated when the cache is built).
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

/// Why a value left memory, as the removal listener ([`Builder::on_removal`](crate::Builder::on_removal))
/// hears it. Only clean values are reported (the store holds them, or they were never to be
/// written): a value whose write is still pending never leaves memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalCause {
    /// Evicted to keep the cache within its capacity or weight.
    Evicted,
    /// Its time to live or time to idle ran out.
    Expired,
    /// Dropped by [`Cache::invalidate`](crate::Cache::invalidate) or `invalidate_all`.
    Invalidated,
    /// Replaced by a newer value (a put, a write-through, a refresh).
    Replaced,
    /// Removed by a delete ([`Cache::remove`](crate::Cache::remove), or a refresh that found
    /// the key gone from the store).
    Removed,
}

/// The removal listener's type: called with the key, the value that left, and why.
pub(crate) type RemovalListener<K, V> = std::sync::Arc<dyn Fn(K, V, RemovalCause) + Send + Sync>;

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

/// Gives an entry's weight (e.g. its size in bytes) for [`Builder::weigher`](crate::Builder::weigher).
pub(crate) type Weigher<K, V> = std::sync::Arc<dyn Fn(&K, &V) -> u32 + Send + Sync>;

/// Orders keys for [`Builder::flush_order`](crate::Builder::flush_order).
pub(crate) type KeyOrder<K> = std::sync::Arc<dyn Fn(&K, &K) -> std::cmp::Ordering + Send + Sync>;

/// A callback that sees every write the cache gave up on.
pub(crate) type FailedWriteHook<K, V> = Box<dyn Fn(&crate::store::FailedWrite<K, V>) + Send + Sync>;

/// Every setting of a cache, as [`Builder`](crate::Builder) collected them.
pub(crate) struct Settings<K, V> {
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
    pub(crate) on_removal: Option<RemovalListener<K, V>>,
    pub(crate) partitions: Option<crate::partition::PartitionSettings<K>>,
    pub(crate) owned_partitions: Option<Vec<u32>>,
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
    /// Entries may have times to live of their own (`Cache::put_with_ttl`).
    pub(crate) per_entry_ttl: bool,
    pub(crate) loaders: usize,
    pub(crate) flush_order: Option<KeyOrder<K>>,
    pub(crate) journal: Option<crate::journal::Journal<K, V>>,
}

impl<K, V> Settings<K, V> {
    pub(crate) fn new(store: impl Store<K, V>) -> Self {
        Settings {
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
            on_removal: None,
            partitions: None,
            owned_partitions: None,
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
            per_entry_ttl: false,
            loaders: 1,
            flush_order: None,
            journal: None,
        }
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
