//! The read paths: a hit under the shard lock, a miss read through the store once for every
//! caller that missed the key meanwhile (single flight), batch reads through one `load_all`,
//! and preloading.

use std::hash::Hash;

use super::Inner;
use crate::error::{Error, StoreError};
use crate::sync::atomic::Ordering;
use crate::sync::Arc;
use std::collections::HashMap;

use crate::loader::RefreshJob;
use crate::shard::{plain, LoadRole, LoadSlot, Lookup, Shard};

/// One lock-free hit in this many of a bounded cache takes the locked path instead, so that
/// a key read mostly from its slot still counts as accessed for the S3-FIFO policy.
const HOT_SAMPLE: u32 = 32;

/// `true` once every [`HOT_SAMPLE`] calls on this thread.
#[inline(always)]
#[allow(clippy::missing_const_for_thread_local)] // loom's macro takes no `const` initializer
fn sampled() -> bool {
    crate::sync::thread_local! {
        static HOT_HITS: std::cell::Cell<u32> = std::cell::Cell::new(0);
    }
    HOT_HITS.with(|n| {
        let v = n.get().wrapping_add(1);
        n.set(v);
        v % HOT_SAMPLE == 0
    })
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

/// A key of a batch read whose load this caller leads ([`Cache::get_all`],
/// [`Cache::preload_from_store`]).
pub(super) struct Led<V> {
    /// Its position in the caller's keys.
    index: usize,
    shard: usize,
    hash: u64,
    slot: Arc<LoadSlot<V>>,
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Returns the latest value of `key`: a pending write or delete if there is one, else the
    /// cached value, else the store's (read through, then cached).
    #[inline(always)]
    pub(crate) fn get(&self, key: &K) -> Result<Option<V>, Error> {
        let inner = self;
        if inner.partitions.is_some() {
            inner.check_owner(inner.partition_of(key))?;
        }
        let hash = inner.hash(key);
        let s = inner.shard_of(hash);
        if inner.timed {
            return self.get_timed(s, hash, key);
        }
        // A key in its read slot is answered without the lock (plain keys and values only,
        // decided at compile time: other types do not even look). A bounded cache sends one
        // such hit in [`HOT_SAMPLE`] to the lock, where it counts for the eviction policy.
        if plain::<K>() && plain::<V>() {
            if let Some(found) = inner.shards[s].hot.get(hash, key) {
                if !inner.bounded || !sampled() {
                    inner.lock_free_hits.add_one();
                    return Ok(found);
                }
            }
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

    /// The value of `key` in memory, if any: never reads the store (a miss is `None`, as is
    /// a pending delete).
    pub(crate) fn get_if_present(&self, key: &K) -> Option<V> {
        if self.partitions.is_some() && self.check_owner(self.partition_of(key)).is_err() {
            return None;
        }
        let hash = self.hash(key);
        let s = self.shard_of(hash);
        if !self.timed && plain::<K>() && plain::<V>() {
            if let Some(found) = self.shards[s].hot.get(hash, key) {
                if !self.bounded || !sampled() {
                    self.lock_free_hits.add_one();
                    return found;
                }
            }
        }
        let now = self.coarse_now();
        let mut table = self.shards[s].table.lock();
        match table.get(hash, key, now) {
            Lookup::Hit(found) => found,
            Lookup::HitRefresh(v, version) => {
                drop(table);
                self.refresh(s, key, version);
                Some(v)
            }
            Lookup::Miss => None,
        }
    }

    /// [`Cache::get`] when a time-based rule is on (expiry, refresh-ahead).
    #[inline(never)]
    pub(super) fn get_timed(&self, s: usize, hash: u64, key: &K) -> Result<Option<V>, Error> {
        let inner = self;
        let now = inner.coarse_now();
        let mut table = inner.shards[s].table.lock();
        let role = match table.get(hash, key, now) {
            Lookup::Hit(found) => return Ok(found),
            Lookup::HitRefresh(v, version) => {
                drop(table);
                inner.refresh(s, key, version);
                return Ok(Some(v));
            }
            Lookup::Miss => table.join_load(hash, key),
        };
        // A miss may be an entry that expired and left memory.
        let departed = table.departures();
        drop(table);
        inner.deliver(departed);
        self.finish_miss(s, hash, key, role)
    }

    /// A missed key: waits for the load in flight, or leads it.
    #[cold]
    pub(super) fn finish_miss(
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
    pub(super) fn lead_load(
        &self,
        s: usize,
        hash: u64,
        key: &K,
        slot: &LoadSlot<V>,
    ) -> Result<Option<V>, Error> {
        let inner = self;
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
                let mut table = shard.table.lock();
                let answer = table.finish_load(hash, key, slot, v, now, weight).0;
                let departed = table.departures();
                drop(table);
                inner.deliver(departed);
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
    pub(crate) fn get_all(&self, keys: &[K]) -> Result<Vec<Option<V>>, Error> {
        let inner = self;
        if inner.partitions.is_some() {
            for key in keys {
                inner.check_owner(inner.partition_of(key))?;
            }
        }
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
                    inner.refresh(s, key, version);
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
    pub(super) fn load_leaders(
        &self,
        keys: &[K],
        lead: &[Led<V>],
        now: u64,
    ) -> Result<Vec<(usize, Option<V>, bool)>, Error> {
        let inner = self;
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
    pub(crate) fn preload(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<usize, Error> {
        let inner = self;
        let now = inner.coarse_now();
        let mut added = 0;
        for (key, value) in entries {
            // A key of a partition another instance serves is not cached here.
            if inner.check_owner(inner.partition_of(&key)).is_err() {
                continue;
            }
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
    pub(crate) fn preload_from_store(&self, keys: &[K]) -> Result<usize, Error> {
        let inner = self;
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
    pub(crate) fn entries(&self) -> Vec<(K, V)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            s.table.lock().entries(&mut out, self.coarse_now());
        }
        out
    }

    /// `true` if `key` holds a value in memory. Never reads the store.
    pub(crate) fn contains_key(&self, key: &K) -> bool {
        let hash = self.hash(key);
        self.shards[self.shard_of(hash)]
            .table
            .lock()
            .contains(hash, key, self.coarse_now())
    }

    /// Live entries in memory (pending deletes not counted).
    pub(crate) fn len(&self) -> usize {
        let now = self.coarse_now();
        self.shards.iter().map(|s| s.table.lock().len(now)).sum()
    }

    /// Schedules a refresh-ahead reload of `key` (shard `s`), which must still hold `version`
    /// when it lands.
    fn refresh(&self, s: usize, key: &K, version: u64) {
        if let Some(loader) = &self.loader {
            loader.submit(RefreshJob {
                shard: s,
                key: key.clone(),
                version,
            });
        }
    }
}
