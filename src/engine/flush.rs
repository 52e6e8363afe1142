//! Flush barriers on the caller's thread: `flush` (a ticket every flusher settles),
//! `flush_key`, `wait_durable`, manual steps, and the mode switch that flushes first.

use std::hash::Hash;
use std::time::Duration;

use super::Inner;
use crate::error::{Error, StoreError};
use crate::flusher::{StepMode, Ticket, TicketOutcome};
use crate::guard::{in_engine, EngineScope};
use crate::settings::WriteMode;
use crate::shard::Durability;
use crate::store::Write;
use crate::sync::atomic::Ordering;
use crate::sync::Arc;

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Writes everything written before the call to the store, and returns once it is there.
    pub(crate) fn flush(&self) -> Result<(), Error> {
        let inner = self;
        if in_engine() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        // Every write that returned before now has a version below its shard's next version.
        let targets: Vec<u64> = inner
            .shards
            .iter()
            .map(|s| s.table.lock().next_version)
            .collect();
        let ticket = Arc::new(Ticket::new(targets, inner.flushers.len()));
        let outcome = if inner.config.manual {
            match self.manual_flush(&ticket) {
                Some(outcome) => outcome,
                None => return Err(Error::Closed),
            }
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
            TicketOutcome::Closed => Err(Error::Closed),
        }
    }

    /// Manual flushing: run full steps on the caller's thread until the ticket is settled,
    /// giving rejected records their attempts.
    /// `None` if the cache was closed meanwhile.
    pub(super) fn manual_flush(&self, ticket: &Arc<Ticket>) -> Option<TicketOutcome> {
        let inner = self;
        let rounds = inner.config.max_attempts as usize + 1;
        for f in inner.flushers.iter() {
            let _engine = EngineScope::enter();
            let cx = inner.ctx(f);
            let mut core = f.core.lock();
            // As in `flush_step`: no store call once a concurrent `close` has taken over.
            if inner.closed.load(Ordering::SeqCst) {
                return None;
            }
            core.take_ticket(ticket.clone());
            for _ in 0..rounds {
                let mode = StepMode {
                    full: true,
                    ignore_backoff: true,
                    hand_off_when_late: false,
                };
                let ran = core.step_guarded(&cx, mode);
                core.settle_tickets(&cx, ran);
                if !core.wants_full_step() && matches!(ticket.outcome(), TicketOutcome::Done { .. })
                {
                    break;
                }
                if core.is_idle(&cx) {
                    core.settle_tickets(&cx, true);
                }
            }
        }
        Some(ticket.outcome())
    }

    /// Drops `key` from memory without deleting it in the store; a pending write of the key
    /// is written first ([`Inner::flush_key`]). `Ok(false)`: the key stays, because another
    /// write of it came in while its older write was being written.
    pub(crate) fn invalidate(&self, key: &K) -> Result<bool, Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let hash = self.hash(key);
        let shard = &self.shards[self.shard_of(hash)];
        let invalidate = || {
            let mut t = shard.table.lock();
            let gone = t.invalidate(hash, key);
            let departed = t.departures();
            drop(t);
            self.deliver(departed);
            gone
        };
        if invalidate() {
            return Ok(true);
        }
        self.flush_key(key)?;
        Ok(invalidate())
    }

    /// Drops every key from memory without deleting anything in the store, after a
    /// [`Inner::flush`] barrier. Returns how many entries left memory; a key written again
    /// after the barrier stays.
    pub(crate) fn invalidate_all(&self) -> Result<usize, Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let invalidate_all = |s: usize| {
            let mut t = self.shards[s].table.lock();
            let counts = t.invalidate_all();
            let departed = t.departures();
            drop(t);
            self.deliver(departed);
            counts
        };
        let mut gone = 0;
        let mut kept = 0;
        for s in 0..self.shards.len() {
            let (g, k) = invalidate_all(s);
            gone += g;
            kept += k;
        }
        if kept == 0 {
            return Ok(gone);
        }
        self.flush()?;
        for s in 0..self.shards.len() {
            gone += invalidate_all(s).0;
        }
        Ok(gone)
    }

    /// [`Cache::release_partitions`](crate::Cache::release_partitions).
    pub(crate) fn release_partitions(&self, parts: &[u32]) -> Result<Vec<Write<K, V>>, Error> {
        let ps = self.partitioned()?;
        ps.set(parts, false)?;
        // A write checks ownership under its shard's lock: taking each lock once after the
        // bits cleared orders every write that was let through before the flush below.
        for shard in self.shards.iter() {
            drop(shard.table.lock());
        }
        let mut handed = Vec::new();
        if let Err(e) = self.flush() {
            if in_engine() {
                // A store callback: the cores below may be this thread's caller's.
                return Err(e);
            }
            tracing::warn!(error = %e, "releasing partitions: pending writes could not be written; handing them back");
            // With every flusher's core held, no batch is at the store: the partitions'
            // writes still in memory leave it and go back to the caller.
            let _cores: Vec<_> = self.flushers.iter().map(|f| f.core.lock()).collect();
            for shard in self.shards.iter() {
                let keys = shard.table.lock().keys();
                let mine: Vec<(u64, K)> = keys
                    .into_iter()
                    .filter(|k| parts.contains(&ps.of(k)))
                    .map(|k| (self.hash(&k), k))
                    .collect();
                let mut t = shard.table.lock();
                for (hash, k) in &mine {
                    handed.extend(t.hand_back(*hash, k));
                }
            }
        }
        self.drop_partitions(parts);
        Ok(handed)
    }

    /// [`Cache::acquire_partitions`](crate::Cache::acquire_partitions).
    pub(crate) fn acquire_partitions(&self, parts: &[u32]) -> Result<(), Error> {
        let ps = self.partitioned()?;
        // Validated first, so that nothing is dropped for a call that is refused.
        ps.validate(parts)?;
        // A new generation, as a lease's fencing token: the previous owner may have been
        // built later than this cache, and its writes of these keys would outrank this
        // cache's until its versions move above them.
        match crate::guard::call_store(|| self.store.generation()) {
            Ok(Ok(Some(g))) => {
                let first =
                    crate::version::first_of_generation(g).ok_or_else(|| Error::InvalidConfig {
                        setting: "Store::generation",
                        reason: format!("generation {g} is above the most a version holds"),
                    })?;
                for shard in self.shards.iter() {
                    shard.table.lock().raise_versions(first);
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err(Error::Store(e)),
            Err(panic) => {
                return Err(Error::Store(crate::StoreError::unavailable(format!(
                    "Store::generation panicked: {panic}"
                ))))
            }
        }
        // What memory may hold of them from an earlier time of ownership is older than the
        // store: it goes, and reads go to the store.
        self.drop_partitions(parts);
        ps.set(parts, true)
    }

    /// The partitions this cache owns now.
    pub(crate) fn owned_partitions(&self) -> Vec<u32> {
        self.partitions
            .as_ref()
            .map_or_else(Vec::new, crate::partition::Partitions::owned)
    }

    fn partitioned(&self) -> Result<&crate::partition::Partitions<K>, Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.partitions
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig {
                setting: "partitions",
                reason: "the cache is not partitioned (Builder::partitions)".into(),
            })
    }

    /// Drops the keys of `parts` from memory, except those holding a write the store may
    /// not have yet. The keys are listed under each shard's lock and their partitions
    /// computed outside it (the partitioner is the application's code).
    fn drop_partitions(&self, parts: &[u32]) {
        let Some(ps) = &self.partitions else { return };
        for shard in self.shards.iter() {
            let keys = shard.table.lock().keys();
            let gone: Vec<(u64, K)> = keys
                .into_iter()
                .filter(|k| parts.contains(&ps.of(k)))
                .map(|k| (self.hash(&k), k))
                .collect();
            if gone.is_empty() {
                continue;
            }
            let mut t = shard.table.lock();
            for (hash, k) in &gone {
                t.invalidate(*hash, k);
            }
            let departed = t.departures();
            drop(t);
            self.deliver(departed);
        }
    }

    /// Writes `key`'s pending write (if any) to the store now, on the caller's thread,
    /// without waiting for its delay, and returns once the store holds it.
    pub(crate) fn flush_key(&self, key: &K) -> Result<(), Error> {
        let inner = self;
        if in_engine() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let hash = inner.hash(key);
        let s = inner.shard_of(hash);
        let target = inner.shards[s].table.lock().next_version;
        {
            let _engine = EngineScope::enter();
            let cx = inner.ctx(inner.flusher_of(s));
            let mut core = cx.me.core.lock();
            // `close` holds every core once after it set the flag: checked under the core, a
            // write here either comes before `close` returns or not at all.
            if inner.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let key = key.clone();
            if core
                .guarded(&cx, |core| core.write_key(&cx, s, key))
                .is_none()
            {
                return Err(Error::Store(StoreError::unavailable(
                    "user code panicked while the key was written; it stays queued",
                )));
            }
        }
        let t = inner.shards[s].table.lock();
        // Every write of the key from before the call has been handed over and persisted.
        if t.unsent_of(hash, key) >= target && !t.in_flight(hash, key) {
            return Ok(());
        }
        Err(Error::Store(StoreError::unavailable(
            "the store did not take the write; it stays queued and is retried",
        )))
    }

    /// Blocks until the store holds the write that returned `version` for `key` (or a newer
    /// write of the key), or `timeout` passes. Use it to tell a client "saved" without
    /// writing through on every request; [`Cache::flush_key`] makes it quick.
    pub(crate) fn wait_durable(
        &self,
        key: &K,
        version: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let inner = self;
        let hash = inner.hash(key);
        let shard = &inner.shards[inner.shard_of(hash)];
        let deadline = std::time::Instant::now().checked_add(timeout);
        loop {
            match shard.table.lock().durable(hash, key, version) {
                Durability::Durable => return Ok(()),
                Durability::GivenUp => {
                    return Err(Error::Store(StoreError::rejected(
                        "the store rejected this write too often; it is in failed_writes()",
                    )))
                }
                Durability::Pending => {}
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            inner.wait_progress(left.min(Duration::from_millis(50)));
        }
    }

    /// Manual flushing: runs one step of every flusher now, writing the shards whose delay is
    /// up, whose ring reached the count trigger, and the retries that are due. Returns the
    /// number of flushers that called the store (or had nothing to send); a flusher in its
    /// unavailable-backoff skips.
    pub(crate) fn flush_step(&self) -> Result<usize, Error> {
        let inner = self;
        if in_engine() {
            return Err(Error::Reentrant);
        }
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let mut ran = 0;
        for f in inner.flushers.iter() {
            let _engine = EngineScope::enter();
            let cx = inner.ctx(f);
            let mut core = f.core.lock();
            // `close` may have run between the check above and this lock, handed back what
            // was dirty and returned: a step now would call the store after `close`. `close`
            // sets the flag before it takes the cores, so checking it under the core lock
            // orders every step either before `close` returns or not at all.
            if inner.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let mode = StepMode {
                full: false,
                ignore_backoff: false,
                hand_off_when_late: false,
            };
            if core.step_guarded(&cx, mode) {
                ran += 1;
            }
            core.guarded(&cx, |core| core.settle_tickets(&cx, false));
        }
        Ok(ran)
    }

    /// Switches the write mode without a restart. Leaving [`WriteMode::Behind`] first
    /// flushes what is pending, so after `Behind -> ReadOnly` returns `Ok`, everything written
    /// before is in the store and nothing written after is ever sent. (A write racing the
    /// switch itself is a write-behind write and is sent.) After `Behind -> Through`, a
    /// write-through of a key that still has write-behind work pending (the flush has not
    /// reached it yet, or failed) waits for the key's batch at the store, so the store
    /// receives the key's versions in order.
    pub(crate) fn set_write_mode(&self, mode: WriteMode) -> Result<(), Error> {
        let old = self.mode.swap(mode as u8, Ordering::SeqCst);
        if old == (WriteMode::Behind as u8) && mode != WriteMode::Behind {
            tracing::info!(?mode, "leaving write-behind: flushing pending writes");
            return self.flush();
        }
        Ok(())
    }

    /// The current write mode.
    #[inline]
    pub(crate) fn write_mode(&self) -> WriteMode {
        match self.mode.load(Ordering::Relaxed) {
            0 => WriteMode::Behind,
            1 => WriteMode::Through,
            _ => WriteMode::ReadOnly,
        }
    }
}
