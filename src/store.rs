//! The system of record: the [`Store`] trait, the [`Write`] records it receives, and
//! [`MemoryStore`], a version-guarded in-memory store for examples and tests.

use std::collections::HashMap;
use std::hash::Hash;

use crate::error::{BatchError, StoreError};

/// One record of a write batch. Every write carries the key's version: versions of one key
/// only grow (across restarts too, see the crate docs), so an adapter can ignore a write that
/// is older than what it holds, which makes redelivery harmless.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write<K, V> {
    /// Insert or replace `key` with `value`.
    Put {
        /// The key.
        key: K,
        /// The latest value at the time the batch was built.
        value: V,
        /// The version of this value.
        version: u64,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: K,
        /// The version of this delete.
        version: u64,
    },
}

impl<K, V> Write<K, V> {
    /// The key written.
    pub fn key(&self) -> &K {
        match self {
            Write::Put { key, .. } | Write::Delete { key, .. } => key,
        }
    }

    /// The version of the write.
    pub fn version(&self) -> u64 {
        match self {
            Write::Put { version, .. } | Write::Delete { version, .. } => *version,
        }
    }

    /// The value, or `None` for a delete.
    pub fn value(&self) -> Option<&V> {
        match self {
            Write::Put { value, .. } => Some(value),
            Write::Delete { .. } => None,
        }
    }

    /// `true` for [`Write::Delete`].
    pub fn is_delete(&self) -> bool {
        matches!(self, Write::Delete { .. })
    }
}

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

/// The system of record behind a cache: blocking, called only from flusher threads, from a
/// reader's thread on a miss, and from the writer's thread in write-through mode.
///
/// The cache never holds one of its locks while it calls the store, so an implementation may
/// call back into the cache (`get`, `put`). It must not call `flush` or `close` from
/// `write_all` (they would wait for the very flusher that is calling; they return
/// [`Error::Reentrant`](crate::Error::Reentrant) instead). Likewise, from inside a store
/// call, a write-through that would wait for that call returns `Error::Reentrant`: one of the
/// key being written (one write-through of a key runs at a time), one under
/// `Backpressure::WriteThrough`, or one of a key with write-behind work still pending (both
/// hold a flusher's core, which a flusher holds across its store calls).
///
/// # Idempotence
/// A batch may be delivered more than once (after a failure whose outcome is unknown) and a
/// retry carries the key's *latest* version. An implementation must apply a write only if its
/// version is not older than the one it holds, deletes included (keep the version of a
/// deleted key, as a tombstone row or column).
///
/// # Examples
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use writebehind::{BatchError, Store, StoreError, Write};
///
/// /// A toy adapter: a map from key to (value or deleted, version).
/// #[derive(Default)]
/// struct MapStore(Mutex<HashMap<u64, (Option<String>, u64)>>);
///
/// impl Store<u64, String> for MapStore {
///     fn load(&self, key: &u64) -> Result<Option<String>, StoreError> {
///         Ok(self.0.lock().unwrap().get(key).and_then(|(v, _)| v.clone()))
///     }
///     fn write_all(&self, batch: &[Write<u64, String>]) -> Result<(), BatchError> {
///         let mut map = self.0.lock().unwrap();
///         for w in batch {
///             let newer = map.get(w.key()).is_none_or(|(_, v)| w.version() >= *v);
///             if newer {
///                 map.insert(*w.key(), (w.value().cloned(), w.version()));
///             }
///         }
///         Ok(())
///     }
/// }
/// # let s = MapStore::default();
/// # s.write_all(&[Write::Put { key: 1, value: "a".into(), version: 2 }]).unwrap();
/// # s.write_all(&[Write::Put { key: 1, value: "old".into(), version: 1 }]).unwrap();
/// # assert_eq!(s.load(&1).unwrap().as_deref(), Some("a"));
/// ```
pub trait Store<K, V>: Send + Sync + 'static {
    /// Reads one key. `Ok(None)` means the key does not exist.
    ///
    /// # Errors
    /// [`StoreError`]; the cache hands it to the caller as [`Error::Load`](crate::Error::Load).
    fn load(&self, key: &K) -> Result<Option<V>, StoreError>;

    /// Reads many keys; absent keys are left out of the result. The default calls
    /// [`Store::load`] for each key; adapters should override it with one query.
    ///
    /// # Errors
    /// The first error of any key.
    fn load_all(&self, keys: &[K]) -> Result<Vec<(K, V)>, StoreError>
    where
        K: Clone,
    {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = self.load(k)? {
                out.push((k.clone(), v));
            }
        }
        Ok(out)
    }

    /// Applies a batch, ideally as one transaction. A batch holds at most one write per key.
    ///
    /// # Errors
    /// [`BatchError::Unavailable`] when nothing (or an unknown part) was applied;
    /// [`BatchError::Partial`] naming the indices that failed when all others were applied.
    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError>;

    /// [`Store::write_all`], saying also which writes the version guard ignored because the
    /// store holds a newer version of their key ([`Applied::superseded`]). Of one cache's
    /// writes, only a cache of a later generation can have written that newer version
    /// (one cache sends a key's versions in order), so the cache counts each in
    /// `Metrics::superseded` and hands it to the failed-writes sink instead of reporting it
    /// written: nothing it accepted vanishes without a trace.
    ///
    /// The default calls `write_all` and reports nothing superseded; the shipped adapters
    /// implement it (`write_all` then calls it). A redelivered write whose version equals the
    /// stored one is applied, not superseded.
    ///
    /// # Errors
    /// As [`Store::write_all`].
    fn write_all_checked(&self, batch: &[Write<K, V>]) -> Result<Applied, BatchError> {
        self.write_all(batch).map(|()| Applied::default())
    }

    /// A new generation for a cache being built over this store: a number the store hands
    /// out once, each larger than every one it handed out before, durably (a database
    /// sequence, or a row updated in one transaction). The cache's versions are then
    /// *fenced* ([`crate::version`]): every version of a later generation is above every
    /// version of an earlier one, so of two caches over one store the one built later wins
    /// every key they both write, whatever their clocks say, and a restarted process never
    /// writes below its predecessor.
    ///
    /// The default, `Ok(None)`, starts versions at the wall clock instead
    /// ([`Clock::since_unix_epoch`](crate::Clock::since_unix_epoch)): right for one process
    /// at a time on a host whose clock does not go back, wrong for two at once or across
    /// hosts whose clocks disagree.
    ///
    /// # Errors
    /// The store could not hand one out; `build` fails with it.
    fn generation(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

impl<K, V, S> Store<K, V> for std::sync::Arc<S>
where
    S: Store<K, V> + ?Sized,
{
    fn load(&self, key: &K) -> Result<Option<V>, StoreError> {
        (**self).load(key)
    }

    fn load_all(&self, keys: &[K]) -> Result<Vec<(K, V)>, StoreError>
    where
        K: Clone,
    {
        (**self).load_all(keys)
    }

    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError> {
        (**self).write_all(batch)
    }

    fn generation(&self) -> Result<Option<u64>, StoreError> {
        (**self).generation()
    }

    fn write_all_checked(&self, batch: &[Write<K, V>]) -> Result<Applied, BatchError> {
        (**self).write_all_checked(batch)
    }
}

/// What a store did with a batch it applied ([`Store::write_all_checked`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// Indices into the batch of the writes the version guard ignored because the store
    /// holds a newer version of their key.
    pub superseded: Vec<usize>,
}

impl Applied {
    /// The writes at `superseded` were ignored for a newer stored version; the rest applied.
    pub fn superseded(superseded: Vec<usize>) -> Self {
        Applied { superseded }
    }
}

/// A version-guarded in-memory [`Store`], for examples, tests and benchmarks.
///
/// It keeps the version of every key it has seen, deleted ones included, and ignores any write
/// older than that, exactly as a real adapter must. Counters tell how often it was called.
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use writebehind::{Cache, MemoryStore};
///
/// let store = Arc::new(MemoryStore::<u64, String>::new());
/// let cache = Cache::builder(store.clone()).build().unwrap();
/// cache.put(7, "seven".to_string()).unwrap();
/// cache.flush().unwrap();
/// assert_eq!(store.get(&7).as_deref(), Some("seven"));
/// ```
#[derive(Debug)]
pub struct MemoryStore<K, V> {
    inner: std::sync::Mutex<MemoryInner<K, V>>,
}

#[derive(Debug)]
struct MemoryInner<K, V> {
    /// key -> (value, or `None` once deleted; version of the last applied write)
    /// ahash, not SipHash: engine tests and the benchmarks push millions of records through
    /// this map on the flusher thread, and a test store should not be what they measure.
    rows: HashMap<K, (Option<V>, u64), ahash::RandomState>,
    loads: u64,
    batches: u64,
    records: u64,
    stale_ignored: u64,
    /// The last generation handed out ([`Store::generation`]).
    generation: u64,
}

impl<K, V> Default for MemoryStore<K, V> {
    fn default() -> Self {
        MemoryStore {
            inner: std::sync::Mutex::new(MemoryInner {
                rows: HashMap::default(),
                loads: 0,
                batches: 0,
                records: 0,
                stale_ignored: 0,
                generation: 0,
            }),
        }
    }
}

impl<K, V> MemoryStore<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner<K, V>> {
        // A panic while holding this lock cannot leave the map half-written (every update is
        // one insert), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a row directly (as if another system had written it), with version 0 so any
    /// cache write supersedes it.
    pub fn insert(&self, key: K, value: V) {
        self.lock().rows.insert(key, (Some(value), 0));
    }

    /// The stored value of `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        self.lock().rows.get(key).and_then(|(v, _)| v.clone())
    }

    /// The version of the last write applied to `key` (deletes included).
    pub fn version_of(&self, key: &K) -> Option<u64> {
        self.lock().rows.get(key).map(|(_, ver)| *ver)
    }

    /// All present rows.
    pub fn snapshot(&self) -> HashMap<K, V> {
        self.lock()
            .rows
            .iter()
            .filter_map(|(k, (v, _))| v.clone().map(|v| (k.clone(), v)))
            .collect()
    }

    /// Number of present rows.
    pub fn len(&self) -> usize {
        self.lock()
            .rows
            .values()
            .filter(|(v, _)| v.is_some())
            .count()
    }

    /// `true` when no row is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls to `load` (each key of `load_all` counts once).
    pub fn loads(&self) -> u64 {
        self.lock().loads
    }

    /// Calls to `write_all`.
    pub fn batches(&self) -> u64 {
        self.lock().batches
    }

    /// Records received by `write_all`, stale ones included.
    pub fn records(&self) -> u64 {
        self.lock().records
    }

    /// Records ignored because the store already held a newer version.
    pub fn stale_ignored(&self) -> u64 {
        self.lock().stale_ignored
    }

    /// Applies one write with the version guard; `true` if it was applied.
    pub(crate) fn apply(&self, w: &Write<K, V>) -> bool {
        let mut g = self.lock();
        g.records += 1;
        Self::apply_locked(&mut g, w)
    }

    fn apply_locked(g: &mut MemoryInner<K, V>, w: &Write<K, V>) -> bool {
        // One lookup: the row is replaced in place when the write is not older.
        let newer = match g.rows.get_mut(w.key()) {
            Some(row) if w.version() >= row.1 => {
                *row = (w.value().cloned(), w.version());
                true
            }
            Some(_) => false,
            None => {
                g.rows
                    .insert(w.key().clone(), (w.value().cloned(), w.version()));
                true
            }
        };
        if !newer {
            g.stale_ignored += 1;
        }
        newer
    }
}

impl<K, V> Store<K, V> for MemoryStore<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    fn load(&self, key: &K) -> Result<Option<V>, StoreError> {
        let mut g = self.lock();
        g.loads += 1;
        Ok(g.rows.get(key).and_then(|(v, _)| v.clone()))
    }

    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError> {
        self.write_all_checked(batch).map(|_| ())
    }

    fn write_all_checked(&self, batch: &[Write<K, V>]) -> Result<Applied, BatchError> {
        let mut g = self.lock();
        g.batches += 1;
        g.records += batch.len() as u64;
        let mut superseded = Vec::new();
        for (i, w) in batch.iter().enumerate() {
            if !Self::apply_locked(&mut g, w) {
                superseded.push(i);
            }
        }
        Ok(Applied::superseded(superseded))
    }

    /// 1, 2, 3, ...: each cache built over this store outranks the ones built before it.
    fn generation(&self) -> Result<Option<u64>, StoreError> {
        let mut g = self.lock();
        g.generation += 1;
        Ok(Some(g.generation))
    }
}
