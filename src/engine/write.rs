//! The write paths: write-behind (record, queue on the shard's ring, arm the shard, wake the
//! flusher), backpressure, write-through (one key at a time per key, in version order) and
//! the local writes of `ReadOnly` mode.

use std::hash::Hash;
use std::time::Duration;

use super::compute::Reservation;
use super::Inner;
use crate::error::Error;
use crate::flusher::FlusherCore;
use crate::guard::{call_store, in_engine};
use crate::journal::{Encoded, Lsn};
use crate::settings::{Backpressure, WriteMode};
use crate::shard::{Queued, Shard, Table, WriteOutcome};
use crate::store::Write;
use crate::sync::atomic::Ordering;
use crate::sync::MutexGuard;

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

crate::sync::thread_local! {
    /// The time to live of this thread's write in progress (`Cache::put_with_ttl`), in
    /// coarse nanoseconds; 0: none.
    #[allow(clippy::missing_const_for_thread_local)] // loom's macro takes no `const`
    static WRITE_TTL: std::cell::Cell<u64> = std::cell::Cell::new(0);
}

/// A flusher's core, held.
type CoreGuard<'a, K> = MutexGuard<'a, FlusherCore<K>>;

/// A write made under the table lock: what to do once it is released.
type Made<K, V> = (WriteOutcome<K, V>, Queued<K>, Option<Lsn>);

/// A write of [`Inner::write_many`], hashed, weighed and encoded before any lock.
struct Prepared<K, V> {
    /// Its position in the caller's items.
    at: usize,
    /// Its partition, in a partitioned cache.
    part: Option<u32>,
    s: usize,
    hash: u64,
    key: K,
    value: Option<V>,
    weight: u32,
    rec: Option<Encoded>,
}

/// What [`Inner::write_now`] did with a write.
#[cfg(feature = "tokio")]
pub(crate) enum WriteNow<K, V> {
    /// The write was made, or refused, without waiting.
    Done(Result<u64, Error>),
    /// The write would have waited: its key and value, untouched, for a caller that may.
    WouldWait(K, Option<V>),
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    #[inline]
    pub(crate) fn write(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        match self.write_mode() {
            WriteMode::Behind => self.write_behind(key, value),
            WriteMode::Through => self.write_through(key, value),
            WriteMode::ReadOnly => self.write_local(key, value),
        }
    }

    #[inline]
    pub(super) fn write_behind(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        let inner = self;
        let hash = inner.hash(&key);
        let s = inner.shard_of(hash);
        let weight = inner.weight(&key, value.as_ref());
        // The journal's codecs run before the lock; the record is appended under it.
        let rec = self.encode(&key, value.as_ref())?;
        self.write_behind_prepared(s, hash, key, value, weight, rec, None)
    }

    /// The journal record of a write, if there is a journal.
    #[inline]
    pub(super) fn encode(&self, key: &K, value: Option<&V>) -> Result<Option<Encoded>, Error> {
        match &self.journal {
            Some(j) => Ok(Some(j.encode(key, value)?)),
            None => Ok(None),
        }
    }

    /// [`Inner::write_behind`] once the key is hashed, weighed and encoded. With `turn` (the
    /// key's reservation by this thread, for a read-modify-write), the reservation ends with
    /// the write, under the same hold of the lock.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn write_behind_prepared(
        &self,
        s: usize,
        hash: u64,
        key: K,
        value: Option<V>,
        weight: u32,
        rec: Option<Encoded>,
        turn: Option<&Reservation<'_, K, V>>,
    ) -> Result<u64, Error> {
        let inner = self;
        let shard = &inner.shards[s];
        let now = inner.coarse_now();
        let mut table = self.lock_behind(shard, hash, &key)?;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if let Some((high, low, policy)) = inner.backpressure {
            if !table.admits(high, low, hash, &key) {
                drop(table);
                return self.write_under_pressure(s, hash, key, value, weight, policy, rec);
            }
        }
        let Some(turn) = turn else {
            return self.write_locked(s, table, hash, key, value, now, weight, rec.as_ref());
        };
        let (outcome, queued, lsn) =
            self.write_in(s, &mut table, hash, key, value, now, weight, rec.as_ref())?;
        let waited = turn.end_in(&mut table);
        drop(table);
        if waited {
            shard.through_done.notify_all();
        }
        let version = self.after_write(s, outcome, queued);
        self.wait_journaled(lsn)?;
        Ok(version)
    }

    /// Whether a write may wait on the caller's thread for more than a shard lock: any write
    /// outside [`WriteMode::Behind`] (the store, or a local write waiting for a write-through),
    /// backpressure that blocks or writes through, and a journal that syncs every write.
    #[cfg(feature = "tokio")]
    pub(crate) fn writes_may_block(&self) -> bool {
        self.write_mode() != WriteMode::Behind
            || matches!(
                self.backpressure,
                Some((
                    _,
                    _,
                    Backpressure::Block { .. } | Backpressure::WriteThrough
                ))
            )
            || self.journal.as_ref().is_some_and(|j| j.waits_for_sync())
    }

    /// A write-behind that never waits: where [`Inner::write`] could wait (see
    /// [`Inner::writes_may_block`], or another caller's turn of the key is in flight: a
    /// read-modify-write or a write-through), it hands the key and value back instead.
    #[cfg(feature = "tokio")]
    pub(crate) fn write_now(&self, key: K, value: Option<V>) -> WriteNow<K, V> {
        if self.writes_may_block() {
            return WriteNow::WouldWait(key, value);
        }
        let hash = self.hash(&key);
        let s = self.shard_of(hash);
        let shard = &self.shards[s];
        let weight = self.weight(&key, value.as_ref());
        let rec = match &self.journal {
            Some(j) => match j.encode(&key, value.as_ref()) {
                Ok(rec) => Some(rec),
                Err(e) => return WriteNow::Done(Err(e.into())),
            },
            None => None,
        };
        let now = self.coarse_now();
        let part = self.partition_of(&key);
        let mut table = shard.table.lock();
        if table.through_in_flight(hash, &key) {
            return WriteNow::WouldWait(key, value);
        }
        if let Err(e) = self.check_owner(part) {
            return WriteNow::Done(Err(e));
        }
        if self.closed.load(Ordering::Acquire) {
            return WriteNow::Done(Err(Error::Closed));
        }
        if let Some((high, low, policy)) = self.backpressure {
            if !table.admits(high, low, hash, &key) {
                drop(table);
                // `Reject` here (`writes_may_block` sent the other policies away): no wait.
                let refused = self.write_under_pressure(s, hash, key, value, weight, policy, rec);
                return WriteNow::Done(refused);
            }
        }
        WriteNow::Done(self.write_locked(s, table, hash, key, value, now, weight, rec.as_ref()))
    }

    /// Locks a shard's table for a write-behind of `key`: if a write-through of the key is
    /// still at the store (the mode switched while this write was on its way), waits for it
    /// first, or this write's batch could reach the store before the older write-through.
    /// In a partitioned cache, the key's partition must be owned: checked under the lock,
    /// so that [`Inner::release_partitions`] (which takes every shard's lock once after it
    /// stops owning) orders every write it did not refuse before its flush.
    #[inline]
    pub(super) fn lock_behind<'a>(
        &self,
        shard: &'a Shard<K, V>,
        hash: u64,
        key: &K,
    ) -> Result<MutexGuard<'a, Table<K, V>>, Error> {
        let part = self.partition_of(key);
        let mut table = shard.table.lock();
        while table.through_in_flight(hash, key) {
            // This thread's own read-modify-write of the key writes its result.
            if Self::my_turn(shard, &table, hash, key)? {
                break;
            }
            Self::wait_through(shard, &mut table)?;
        }
        self.check_owner(part)?;
        Ok(table)
    }

    /// A write-behind on a shard whose table lock the caller holds: records the write, queues
    /// its key while still holding the lock ([`Cache::queue`]), unlocks, then wakes whoever the
    /// write calls for. Returns the write's version.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn write_locked(
        &self,
        s: usize,
        mut table: MutexGuard<'_, Table<K, V>>,
        hash: u64,
        key: K,
        value: Option<V>,
        now: u64,
        weight: u32,
        rec: Option<&Encoded>,
    ) -> Result<u64, Error> {
        let (outcome, queued, lsn) =
            self.write_in(s, &mut table, hash, key, value, now, weight, rec)?;
        drop(table);
        let version = self.after_write(s, outcome, queued);
        self.wait_journaled(lsn)?;
        Ok(version)
    }

    /// The part of a write-behind made under the table lock: journals the write (with a
    /// journal, the write is recorded first, at the version it is about to take, while the
    /// shard lock orders it with the shard's other writes: a write the journal refuses is not
    /// made at all), records it in the table and queues its key.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn write_in(
        &self,
        s: usize,
        table: &mut Table<K, V>,
        hash: u64,
        key: K,
        value: Option<V>,
        now: u64,
        weight: u32,
        rec: Option<&Encoded>,
    ) -> Result<Made<K, V>, Error> {
        let lsn = match (&self.journal, rec) {
            (Some(j), Some(rec)) => {
                Some(j.append_encoded(s % self.flushers.len(), rec, table.next_version)?)
            }
            _ => None,
        };
        self.apply_ttl(table);
        let mut outcome = table.write(hash, key, value, now, weight);
        let queued = self.shards[s].enqueue(outcome.ring_key.take());
        Ok((outcome, queued, lsn))
    }

    /// Passes this thread's [`Inner::put_with_ttl`] time to live (if any) to the table write
    /// about to be made under `table`'s lock.
    #[inline]
    fn apply_ttl(&self, table: &mut Table<K, V>) {
        if self.per_entry {
            let ttl = WRITE_TTL.with(std::cell::Cell::get);
            if ttl != 0 {
                table.expire_next_write(ttl);
            }
        }
    }

    /// [`Cache::put_with_ttl`](crate::Cache::put_with_ttl).
    pub(crate) fn put_with_ttl(&self, key: K, value: V, ttl: Duration) -> Result<u64, Error> {
        if !self.per_entry {
            return Err(Error::InvalidConfig {
                setting: "put_with_ttl",
                reason: "entries' own times to live need Builder::per_entry_ttl".into(),
            });
        }
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                WRITE_TTL.with(|t| t.set(0));
            }
        }
        let ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX).max(1);
        WRITE_TTL.with(|t| t.set(ns));
        let _reset = Reset;
        self.write(key, Some(value))
    }

    /// `EveryWrite`: returns once a sync (shared with concurrent writers) covers the record.
    #[inline]
    fn wait_journaled(&self, lsn: Option<Lsn>) -> Result<(), Error> {
        if let (Some(j), Some(lsn)) = (&self.journal, lsn) {
            j.wait_synced(&lsn)?;
        }
        Ok(())
    }

    /// Writes many keys (`None`: a delete). Written behind, the keys of one shard are written
    /// under one hold of its lock; a key that would wait (backpressure, or another thread's
    /// turn of it) takes the one-key path in its place, without the lock. In the other
    /// modes, one key at a time. Returns the versions in the order of `items`; on the first
    /// error, returns it, and the writes made before it stand.
    pub(crate) fn write_many(&self, items: Vec<(K, Option<V>)>) -> Result<Vec<u64>, Error> {
        if self.write_mode() != WriteMode::Behind {
            return items.into_iter().map(|(k, v)| self.write(k, v)).collect();
        }
        let n = items.len();
        let mut prepared = Vec::with_capacity(n);
        for (at, (key, value)) in items.into_iter().enumerate() {
            let hash = self.hash(&key);
            let weight = self.weight(&key, value.as_ref());
            let rec = self.encode(&key, value.as_ref())?;
            prepared.push(Prepared {
                at,
                part: self.partition_of(&key),
                s: self.shard_of(hash),
                hash,
                key,
                value,
                weight,
                rec,
            });
        }
        prepared.sort_by_key(|p| p.s);
        let mut versions = vec![0; n];
        let mut made = Vec::new();
        let mut items = prepared.into_iter().peekable();
        while let Some(first) = items.next() {
            let s = first.s;
            let shard = &self.shards[s];
            let mut group = vec![first];
            while let Some(p) = items.next_if(|p| p.s == s) {
                group.push(p);
            }
            let mut table = shard.table.lock();
            let mut result = Ok(());
            for p in group {
                if self.closed.load(Ordering::Acquire) {
                    result = Err(Error::Closed);
                    break;
                }
                if let Err(e) = self.check_owner(p.part) {
                    result = Err(e);
                    break;
                }
                let waits = match table.through_in_flight(p.hash, &p.key) {
                    true => match Self::my_turn(shard, &table, p.hash, &p.key) {
                        Ok(mine) => !mine,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    },
                    false => false,
                };
                let pressed = self
                    .backpressure
                    .is_some_and(|(high, low, _)| !table.admits(high, low, p.hash, &p.key));
                if waits || pressed {
                    drop(table);
                    self.finish_many(s, &mut made, &mut versions)?;
                    let at = p.at;
                    match self
                        .write_behind_prepared(s, p.hash, p.key, p.value, p.weight, p.rec, None)
                    {
                        Ok(v) => versions[at] = v,
                        Err(e) => return Err(e),
                    }
                    table = shard.table.lock();
                    continue;
                }
                let now = self.coarse_now();
                match self.write_in(
                    s,
                    &mut table,
                    p.hash,
                    p.key,
                    p.value,
                    now,
                    p.weight,
                    p.rec.as_ref(),
                ) {
                    Ok(m) => made.push((p.at, m)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            drop(table);
            self.finish_many(s, &mut made, &mut versions)?;
            result?;
        }
        Ok(versions)
    }

    /// What follows the writes [`Inner::write_many`] made under shard `s`'s lock, once it
    /// is released: [`Inner::after_write`] for each, then the journal's syncs.
    fn finish_many(
        &self,
        s: usize,
        made: &mut Vec<(usize, Made<K, V>)>,
        versions: &mut [u64],
    ) -> Result<(), Error> {
        let mut lsns = Vec::new();
        for (at, (outcome, queued, lsn)) in made.drain(..) {
            versions[at] = self.after_write(s, outcome, queued);
            lsns.extend(lsn);
        }
        for lsn in lsns {
            self.wait_journaled(Some(lsn))?;
        }
        Ok(())
    }

    /// What follows a write-behind once the shard lock is released: drop the old value, wake
    /// the flusher if the push calls for it, and ask for an early flush if pinned dirty
    /// entries hold the shard over its capacity.
    #[inline]
    pub(super) fn after_write(
        &self,
        s: usize,
        outcome: WriteOutcome<K, V>,
        queued: Queued<K>,
    ) -> u64 {
        // Queued and armed first: a panic in the old value's `Drop` (user code) must not keep
        // the flusher from learning of the write.
        self.after_push(s, queued);
        drop(outcome.old);
        if !outcome.departed.is_empty() {
            self.deliver(outcome.departed);
        }
        if outcome.over_capacity {
            let shard = &self.shards[s];
            if shard.trigger() {
                self.flusher_of(s).wake();
            }
        }
        outcome.version
    }

    /// A write that would add a dirty entry to a shard at its `max_dirty` share.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_under_pressure(
        &self,
        s: usize,
        hash: u64,
        key: K,
        value: Option<V>,
        weight: u32,
        policy: Backpressure,
        rec: Option<Encoded>,
    ) -> Result<u64, Error> {
        let inner = self;
        let shard = &inner.shards[s];
        let (high, low) = inner.watermarks();
        match policy {
            Backpressure::Reject => self.refuse(high),
            Backpressure::Block { timeout } => {
                self.block_for_room(s, hash, key, value, weight, timeout, rec)
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
                let mut table = self.lock_behind(shard, hash, &key)?;
                if table.admits(high, low, hash, &key) {
                    // Room appeared meanwhile: an ordinary write-behind.
                    let now = inner.coarse_now();
                    return self.write_locked(
                        s,
                        table,
                        hash,
                        key,
                        value,
                        now,
                        weight,
                        rec.as_ref(),
                    );
                }
                drop(table);
                self.write_through_at(s, hash, key, value, true)
            }
        }
    }

    /// Each shard's backpressure watermarks (high, low); none without `max_dirty`.
    fn watermarks(&self) -> (usize, usize) {
        self.backpressure
            .map_or((usize::MAX, 0), |(high, low, _)| (high, low))
    }

    /// Refuses a write under backpressure (counted).
    fn refuse(&self, high: usize) -> Result<u64, Error> {
        self.bp_rejections.fetch_add(1, Ordering::Relaxed);
        Err(Error::Backpressure { shard_limit: high })
    }

    /// `Backpressure::Block`: asks the flusher to write the shard now and waits for room (or
    /// `timeout`), then writes.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn block_for_room(
        &self,
        s: usize,
        hash: u64,
        key: K,
        value: Option<V>,
        weight: u32,
        timeout: Duration,
        rec: Option<Encoded>,
    ) -> Result<u64, Error> {
        let inner = self;
        let shard = &inner.shards[s];
        let (high, low) = inner.watermarks();
        inner.bp_waits.fetch_add(1, Ordering::Relaxed);
        // No deadline when the timeout is beyond what an `Instant` can hold.
        let deadline = std::time::Instant::now().checked_add(timeout);
        loop {
            // Ask the flusher to write this shard now rather than at its delay.
            if shard.trigger() {
                inner.flusher_of(s).wake();
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return self.refuse(high);
            }
            inner.wait_progress(left.min(Duration::from_millis(10)));
            // The mode may have switched meanwhile, and a write-through of the key
            // gone to the store: `lock_behind` waits for it.
            let mut table = self.lock_behind(shard, hash, &key)?;
            if inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if table.admits(high, low, hash, &key) {
                let now = inner.coarse_now();
                return self.write_locked(s, table, hash, key, value, now, weight, rec.as_ref());
            }
        }
    }

    /// After a push under the lock ([`Shard::enqueue`]): arms the shard and wakes the flusher
    /// when its delay starts, the count trigger fires, or the ring overflowed.
    #[inline]
    pub(super) fn after_push(&self, s: usize, queued: Queued<K>) {
        if matches!(queued, Queued::Conflated) {
            return;
        }
        let inner = self;
        let shard = &inner.shards[s];
        // Arm the shard first: a count-triggered step drains the armed shards, and this key
        // must be in that batch. The shard's delay, and the age of its oldest write, count
        // from the arming write's time.
        if shard.arm(|| inner.clock_nanos()) {
            inner.flusher_of(s).wake();
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
    pub(super) fn wait_through(
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

    pub(super) fn write_through(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        let inner = self;
        let hash = inner.hash(&key);
        let s = inner.shard_of(hash);
        self.write_through_at(s, hash, key, value, false)
    }

    /// Writes one key to the store on the caller's thread, then caches it as clean (unless
    /// something newer arrived meanwhile).
    pub(super) fn write_through_at(
        &self,
        s: usize,
        hash: u64,
        key: K,
        value: Option<V>,
        core_held: bool,
    ) -> Result<u64, Error> {
        let inner = self;
        let _use = inner.enter_store()?;
        let shard = &inner.shards[s];
        // Held until the write-through is done, when the key has write-behind work pending.
        let (version, _core) = self.through_turn(s, hash, &key, core_held)?;
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
        let result = call_store(|| inner.store.write_all_checked(std::slice::from_ref(&write)));
        let (result, superseded) = crate::flusher::split_superseded(result, 1);
        if let Some((_, e)) = crate::flusher::failures(result, 1).pop() {
            drop(mark); // ends the write-through: the key's next one may go
            return Err(Error::Store(e));
        }
        if !superseded.is_empty() {
            // A cache of a later generation wrote the key: this write is refused, and what
            // memory holds of the key (older than the store's) leaves it.
            inner.superseded_through.fetch_add(1, Ordering::Relaxed);
            let mut t = shard.table.lock();
            t.invalidate(hash, write.key());
            let waited = mark.end(&mut t);
            let departed = t.departures();
            drop(t);
            self.deliver(departed);
            if waited {
                shard.through_done.notify_all();
            }
            return Err(Error::Store(crate::flusher::superseded_error()));
        }
        let mut t = shard.table.lock();
        t.count_write_through(write.is_delete());
        self.apply_ttl(&mut t);
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
        let departed = t.departures();
        drop(t);
        self.deliver(departed);
        if waited {
            shard.through_done.notify_all();
        }
        Ok(version)
    }

    /// Waits for `key`'s turn to be written through and takes its version. One write-through
    /// of a key at a time (`Table::begin_through`): a second one waits here, without the table
    /// lock, until the first has been to the store and back. A key with write-behind work
    /// pending also holds the owning flusher's core (unless `core_held`), returned with the
    /// version, for the whole write-through.
    fn through_turn(
        &self,
        s: usize,
        hash: u64,
        key: &K,
        core_held: bool,
    ) -> Result<(u64, Option<CoreGuard<'_, K>>), Error> {
        let shard = &self.shards[s];
        let mut core = None;
        let part = self.partition_of(key);
        let mut table = shard.table.lock();
        loop {
            self.check_owner(part)?;
            // This thread's own read-modify-write of the key, writing its result through:
            // the key is already its turn.
            let in_flight = table.through_in_flight(hash, key);
            let mine = in_flight && Self::my_turn(shard, &table, hash, key)?;
            if in_flight && !mine {
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
            if !core_held && core.is_none() && table.has_behind_work(hash, key) {
                if in_engine() {
                    // The core may be held by this thread's caller (a flusher's store call).
                    return Err(Error::Reentrant);
                }
                drop(table);
                core = Some(self.flusher_of(s).core.lock());
                table = shard.table.lock();
                continue;
            }
            if mine {
                return Ok((table.next_version(), core));
            }
            if let Some(version) = table.begin_through(hash, key) {
                return Ok((version, core));
            }
        }
    }

    pub(super) fn write_local(&self, key: K, value: Option<V>) -> Result<u64, Error> {
        let inner = self;
        let hash = inner.hash(&key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let weight = inner.weight(&key, value.as_ref());
        let mut t = self.lock_behind(shard, hash, &key)?;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.apply_ttl(&mut t);
        let (version, old) = t.set_local(hash, key, value, inner.coarse_now(), weight);
        let departed = t.departures();
        drop(t);
        drop(old);
        self.deliver(departed);
        Ok(version)
    }
}
