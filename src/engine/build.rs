//! Building the engine from its [`Settings`]: the per-shard limits, the shards and flushers,
//! the shared state, then the background threads.

use std::collections::VecDeque;
use std::hash::Hash;
use std::time::Duration;

use super::Inner;
use crate::error::Error;
use crate::flusher::{self, Flusher};
use crate::journal::{JournalLog, ReplayedEntry};
use crate::loader::Loader;
use crate::settings::{Backpressure, Settings};
use crate::shard::{Limits, Shard};
use crate::shared::{Config, Shared};
use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use crate::sync::thread::JoinHandle;
use crate::sync::{Arc, Condvar, Mutex};

/// What starting the threads needs of the settings, once the rest went into the engine.
pub(crate) struct Threads {
    name: String,
    manual: bool,
    nice: u8,
    loaders: usize,
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The engine for `s`, with no thread started yet ([`Inner::start_threads`], which takes the engine in its `Arc`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting at fault.
    ///
    /// With a journal, it is opened (locked, replayed) first: its writes become dirty entries
    /// at their journaled versions, and new versions start above all of them.
    pub(crate) fn new(mut s: Settings<K, V>) -> Result<(Self, Threads), Error> {
        s.validate()?;
        let partitions = match (s.partitions.take(), s.owned_partitions.take()) {
            (Some(mut p), owned) => {
                if owned.is_some() {
                    p.owned = owned;
                }
                Some(crate::partition::Partitions::new(p)?)
            }
            (None, Some(_)) => {
                return Err(Error::InvalidConfig {
                    setting: "owned_partitions",
                    reason: "needs Builder::partitions (the partition count and the partitioner)"
                        .into(),
                })
            }
            (None, None) => None,
        };
        let (journal, replayed) = match s.journal.take() {
            Some(j) => {
                // One journal shard per flusher: flusher k's shards (s % flushers == k)
                // append to journal shard k, so a checkpoint of a flusher's shards seals it.
                let (log, replayed) = JournalLog::open(j, s.flushers)?;
                (Some(log), Some(replayed))
            }
            None => (None, None),
        };
        let min_version = replayed
            .as_ref()
            .map_or(0, |r| r.stats.max_version.saturating_add(1))
            .max(first_version(&s)?);
        let nshards = s.shards;
        let nflushers = s.flushers;
        let owned_per_flusher = nshards / nflushers + usize::from(nshards % nflushers != 0);
        // Counting in steps of `count_chunk` keys per ring keeps the flusher's counter off most
        // pushes; the trigger may then fire up to `(owned − 1) × (count_chunk − 1)` keys late,
        // so the step stays at a quarter of a shard's even share of a batch, and at most 8; a
        // power of two, so the push path masks instead of dividing.
        let count_chunk = prev_power_of_two((s.max_batch / (4 * owned_per_flusher)).clamp(1, 8));
        // Room for two batches' share per ring, within the bound on all rings together.
        let ring_capacity = s
            .ring_capacity
            .max(2 * (s.max_batch / owned_per_flusher).max(1))
            .min((crate::settings::MAX_RING_SLOTS / nshards).max(s.ring_capacity));
        let limits = limits(&s);
        // A bounded cache bounds its dirty entries too, unless told otherwise.
        let max_dirty = s.max_dirty.or_else(|| {
            s.capacity.map(|c| {
                let timeout = Duration::from_secs(5);
                (c, Backpressure::Block { timeout })
            })
        });
        let flushers = (0..nflushers)
            .map(|k| Flusher::new(k, (k..nshards).step_by(nflushers).collect(), s.retry_base))
            .collect();
        let threads = Threads {
            name: s.name.clone(),
            manual: s.manual,
            nice: s.flusher_nice,
            loaders: s.loaders,
        };
        let (mode, loader) = (s.write_mode, s.refresh_ahead.map(|_| Loader::new()));
        let inner = Inner {
            shared: shared(s, limits, ring_capacity, journal, min_version, partitions),
            flushers,
            count_chunk,
            load_errors: AtomicU64::new(0),
            backpressure: max_dirty.map(|(max, policy)| {
                let high = (max / nshards).max(1);
                // Low watermark at 90% (at least one below the high one).
                let low = high.saturating_sub((high / 10).max(1));
                (high, low, policy)
            }),
            bp_waits: AtomicU64::new(0),
            bp_rejections: AtomicU64::new(0),
            through_fallbacks: AtomicU64::new(0),
            superseded_through: AtomicU64::new(0),
            mode: AtomicU8::new(mode as u8),
            loader,
            threads: Mutex::new(Some(Vec::new())),
        };
        inner.tick_clock();
        if let Some(replayed) = replayed {
            inner.restore(replayed.entries);
        }
        Ok((inner, threads))
    }

    /// Makes the journaled writes dirty again, at their journaled versions, queued for the
    /// flushers (which write them as any other: the store's version guard ignores the ones it
    /// already holds).
    fn restore(&self, entries: Vec<ReplayedEntry<K, V>>) {
        let n = entries.len();
        for e in entries {
            let hash = self.hash(&e.key);
            let s = self.shard_of(hash);
            let shard = &self.shards[s];
            let weight = self.weight(&e.key, e.value.as_ref());
            let mut table = shard.table.lock();
            let ring_key =
                table.restore(hash, e.key, e.value, e.version, self.coarse_now(), weight);
            let queued = shard.enqueue(ring_key);
            drop(table);
            drop(queued);
            shard.arm(|| self.clock_nanos());
        }
        if n > 0 {
            tracing::info!(
                writes = n,
                "journal: replayed writes are queued for the store"
            );
        }
    }

    /// Starts the flusher threads (unless flushing is manual) and the refresh-ahead loaders.
    ///
    /// # Errors
    /// [`Error::Spawn`] if a thread could not be started; the caller then drops the cache,
    /// whose close stops the threads already started.
    pub(crate) fn start_threads(this: &Arc<Self>, t: &Threads) -> Result<(), Error> {
        if !t.manual {
            // A niced worker gets a keeper at the builder's priority (`flusher::Role`), where
            // the nice takes effect.
            let keepers = t.nice > 0 && cfg!(target_os = "linux");
            let role = if keepers {
                flusher::Role::Worker
            } else {
                flusher::Role::Sole
            };
            for k in 0..this.flushers.len() {
                let (inner, nice) = (this.clone(), t.nice);
                let spawned = crate::sync::thread::spawn_named(
                    format!("{}-flusher-{k}", t.name),
                    move || {
                        if let Err(e) = crate::sync::thread::lower_priority(nice) {
                            tracing::debug!(error = %e, nice, "flusher keeps the builder's priority");
                        }
                        inner.flushers[k].unparker.set(std::thread::current());
                        flusher::run(&inner.shared, &inner.flushers[k], role);
                    },
                );
                this.adopt(spawned, |h| this.flushers[k].unparker.set(h))?;
                if keepers {
                    let inner = this.clone();
                    let spawned = crate::sync::thread::spawn_named(
                        format!("{}-keeper-{k}", t.name),
                        move || {
                            inner.flushers[k].keeper.set(std::thread::current());
                            let me = &inner.flushers[k];
                            flusher::run(&inner.shared, me, flusher::Role::Keeper);
                        },
                    );
                    this.adopt(spawned, |h| this.flushers[k].keeper.set(h))?;
                }
            }
        }
        if this.loader.is_some() {
            for k in 0..t.loaders {
                let inner = this.clone();
                let spawned =
                    crate::sync::thread::spawn_named(format!("{}-loader-{k}", t.name), move || {
                        if let Some(loader) = &inner.loader {
                            loader.run(&inner.shared);
                        }
                    });
                this.adopt(spawned, |_| {})?;
            }
        }
        Ok(())
    }

    /// Keeps a background thread's handle for `close`, after `register` gave its handle to
    /// whatever wakes it (the thread registers itself too: a wake sent before either is not
    /// lost). A failed spawn is `Error::Spawn`.
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
}

/// Each shard's share of the capacity and weight bounds, and the time rules in nanoseconds.
fn limits<K, V>(s: &Settings<K, V>) -> Limits {
    let nshards = s.shards;
    let ns = |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Limits {
        capacity: s.capacity.map_or(usize::MAX, |c| (c / nshards).max(1)),
        max_weight: s
            .max_weight
            .map_or(u64::MAX, |w| (w / nshards as u64).max(1)),
        ttl: ns(s.ttl),
        tti: ns(s.tti),
        negative_ttl: ns(s.negative_ttl),
        refresh_after: match (s.refresh_ahead, s.ttl) {
            (Some(f), Some(ttl)) => ns(Some(ttl.mul_f64(f))).max(1),
            _ => 0,
        },
        weighted: s.weigher.is_some(),
        per_entry: s.per_entry_ttl,
    }
}

/// The state every thread shares, with `nshards` shards of `limits` and rings of
/// `ring_capacity`.
fn shared<K, V>(
    s: Settings<K, V>,
    limits: Limits,
    ring_capacity: usize,
    journal: Option<JournalLog<K, V>>,
    min_version: u64,
    partitions: Option<crate::partition::Partitions<K>>,
) -> Shared<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let nshards = s.shards;
    let first_version = min_version;
    // Under loom the seeds are fixed: a model must run the same operations for the same
    // schedule, and the seeds decide the order a full ring's table scan lists keys in.
    let hasher = if cfg!(writebehind_loom) {
        ahash::RandomState::with_seeds(1, 2, 3, 4)
    } else {
        ahash::RandomState::new()
    };
    let shards: Box<[Shard<K, V>]> = (0..nshards)
        .map(|_| Shard::new(first_version, ring_capacity, limits, hasher.clone()))
        .collect();
    if s.on_removal.is_some() {
        for shard in shards.iter() {
            shard.table.lock().listening = true;
        }
    }
    let shortest = [s.ttl, s.tti, s.negative_ttl]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(1));
    let tick = (shortest / 20).clamp(Duration::from_millis(1), Duration::from_millis(100));
    Shared {
        shards,
        shard_mask: (nshards - 1) as u64,
        hasher,
        store: s.store,
        config: Config {
            write_delay: s.write_delay,
            max_batch: s.max_batch,
            max_attempts: s.max_attempts,
            retry_base: s.retry_base,
            retry_max: s.retry_max,
            flush_timeout: s.flush_timeout,
            drop_deadline: s.drop_deadline,
            manual: s.manual,
            store_timeout: s.store_timeout,
            failed_writes_capacity: s.failed_writes_capacity,
        },
        clock: s.clock,
        closed: AtomicBool::new(false),
        store_users: AtomicUsize::new(0),
        failed: Mutex::new(VecDeque::new()),
        on_failed_write: s.on_failed_write,
        on_removal: s.on_removal,
        partitions,
        user_panics: AtomicU64::new(0),
        last_clock: AtomicU64::new(0),
        progress: Mutex::new(0),
        progress_cv: Condvar::new(),
        progress_waiters: AtomicUsize::new(0),
        coarse: AtomicU64::new(0),
        timed: limits.timed(),
        bounded: limits.bounded(),
        per_entry: limits.per_entry,
        lock_free_hits: crate::metrics::Striped::new(),
        tick,
        sweep_every: (shortest / 2).clamp(tick, Duration::from_secs(10)),
        weigher: s.weigher,
        flush_order: s.flush_order,
        journal,
    }
}

/// The largest power of two not above `n` (`n` >= 1).
fn prev_power_of_two(n: usize) -> usize {
    debug_assert!(n >= 1);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// The first version a new cache hands out ([`crate::version`]): its store's generation's
/// first (fenced), or the wall clock's nanoseconds since the Unix epoch when the store hands
/// out none (a restarted process then writes above its predecessor unless the clock went
/// back by more than the time between the two).
fn first_version<K: 'static, V: 'static>(s: &Settings<K, V>) -> Result<u64, Error> {
    match crate::guard::call_store(|| s.store.generation()) {
        Ok(Ok(Some(g))) => {
            crate::version::first_of_generation(g).ok_or_else(|| Error::InvalidConfig {
                setting: "Store::generation",
                reason: format!(
                    "the store handed out generation {g}, above the most a version holds ({})",
                    crate::version::MAX_GENERATION
                ),
            })
        }
        Ok(Ok(None)) => Ok(crate::version::wall_clock_first(&*s.clock)),
        Ok(Err(e)) => Err(Error::Store(e)),
        Err(panic) => Err(Error::Store(crate::StoreError::unavailable(format!(
            "Store::generation panicked: {panic}"
        )))),
    }
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
