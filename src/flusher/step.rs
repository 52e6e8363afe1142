//! A flusher's step ([`FlusherCore::step`]): select the due shards, close their epochs, drain
//! their rings, snapshot their dirty keys into batches and hand each batch to
//! [`outcome`](super::outcome); plus the bookkeeping between steps (deadlines, tickets,
//! handoffs, recovery after a panic).

use std::time::Duration;

use super::ticket::Ticket;
use super::{
    Ctx, FlusherCore, Meta, StepMode, Work, HANDOFF_GRACE, HANDOFF_RESERVE, SNAPSHOT_CHUNK,
};
use crate::guard::catch;
use crate::shard::NONE;
use crate::store::Write;
use crate::sync::atomic::Ordering;
use crate::sync::Arc;

impl<K: Clone + Eq + std::hash::Hash + Send + Sync + 'static> FlusherCore<K> {
    /// Adds a flush ticket to wait on (manual flush).
    pub(crate) fn take_ticket(&mut self, t: Arc<Ticket>) {
        self.tickets.push((t, false));
    }

    /// Runs one step; returns `false` if the store backoff made it skip the store.
    pub(crate) fn step<V>(&mut self, cx: &Ctx<'_, K, V>, mode: StepMode) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        cx.tick_clock();
        let now = cx.now();
        let delay = cx.config.write_delay;
        if cx.timed && now >= self.next_sweep {
            // Expired entries leave memory within `sweep_every` without a read touching them.
            self.next_sweep = now.saturating_add(cx.sweep_every);
            let coarse = cx.coarse_now();
            for &s in &self.owned {
                cx.shards[s].table.lock().sweep_expired(coarse);
            }
        }
        self.deliver_departed(cx);
        self.stamp_armed(cx, now);
        if !mode.ignore_backoff && self.backoff_until.is_some_and(|until| now < until) {
            self.publish_oldest(cx);
            return false;
        }

        // 1. Close epochs and drain rings of the selected shards. The count trigger selects
        // every armed shard: the batch then holds what the whole flusher has queued.
        let flusher = &cx.me;
        let counted = flusher.count_fired.swap(false, Ordering::SeqCst);
        let mut work = std::mem::take(&mut self.work);
        for slot in 0..self.owned.len() {
            let s = self.owned[slot];
            let shard = &cx.shards[s];
            let due = self.due[slot].is_some_and(|d| d <= now);
            if !(mode.full || due || shard.wants_flush(counted)) {
                continue;
            }
            // When the shard's delay started: the oldest write drained now is no older.
            let since = match self.due[slot] {
                Some(d) => d.saturating_sub(delay),
                None => shard.armed_since(now).unwrap_or(now),
            };
            self.due[slot] = None;
            self.scratch.clear();
            let drained = shard.select_for_flush(&mut self.scratch, mode.full);
            flusher.uncount(drained);
            work.extend(self.scratch.drain(..).map(|key| Work {
                shard: s,
                key,
                retry: None,
                since,
            }));
        }

        // 2. Retry items that are due.
        let mut i = 0;
        while i < self.retry.len() {
            if mode.full || self.retry[i].not_before <= now {
                let r = self.retry.swap_remove(i);
                work.push(Work {
                    shard: r.shard,
                    key: r.key,
                    retry: Some((r.attempts, r.version)),
                    since: r.since,
                });
            } else {
                i += 1;
            }
        }
        let grace_until = mode
            .hand_off_when_late
            .then(|| now.saturating_add(delay / HANDOFF_GRACE));
        // A worker's step that stopped leaves the rest in `work`: that is the handoff.
        self.write_out(cx, &mut work, grace_until);
        self.work = work;
        self.publish_oldest(cx);
        self.maybe_checkpoint(cx);
        self.deliver_departed(cx);
        true
    }

    /// Hands the removal listener (if any) what left this flusher's shards without a call
    /// that delivered it: the sweep's expiries, the step's own, reads of many keys.
    fn deliver_departed<V>(&self, cx: &Ctx<'_, K, V>)
    where
        V: Clone + Send + Sync + 'static,
    {
        if cx.on_removal.is_some() {
            for &s in &self.owned {
                cx.deliver_pending(s);
            }
        }
    }

    /// Reclaims journal space once the journal has grown past its `checkpoint_bytes` and twice
    /// its size after this flusher's last checkpoint: each owned shard's segments are replaced
    /// by a checkpoint of the writes the store may not hold.
    fn maybe_checkpoint<V>(&mut self, cx: &Ctx<'_, K, V>)
    where
        V: Clone + Send + Sync + 'static,
    {
        let Some(j) = &cx.journal else { return };
        if j.bytes() < self.checkpoint_at.max(j.checkpoint_bytes()) {
            return;
        }
        if let Some(&first) = self.owned.first() {
            // This flusher's shards are those `s` with `s % flushers == first`.
            cx.checkpoint_journal(first, &self.owned);
        }
        self.checkpoint_at = 2 * j.bytes();
    }

    /// [`FlusherCore::step`], surviving a panic in user code that escaped the finer guards
    /// (a key's `Hash` or `Eq`, a tracing subscriber, ...): the panic is logged and counted,
    /// health turns degraded, and [`FlusherCore::recover`] puts back what the step held.
    /// Returns what `step` returned, `false` after a panic.
    pub(crate) fn step_guarded<V>(&mut self, cx: &Ctx<'_, K, V>, mode: StepMode) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        self.guarded(cx, |core| core.step(cx, mode))
            .unwrap_or(false)
    }

    /// Runs `f` on this core; a panic in it is caught and recovered from as in
    /// [`FlusherCore::step_guarded`] (`None` then).
    pub(crate) fn guarded<V, R>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        f: impl FnOnce(&mut Self) -> R,
    ) -> Option<R>
    where
        V: Clone + Send + Sync + 'static,
    {
        match catch(|| f(self)) {
            Ok(r) => Some(r),
            Err(msg) => {
                self.recover(cx, &msg);
                None
            }
        }
    }

    /// Puts the flusher back in a state from which nothing is lost after a panic cut a step
    /// short: every key the step or the retry list held in flight is released (and sent again:
    /// the versions make a repeat harmless), and every owned shard is marked overflowed, so
    /// the next step scans its table for dirty keys instead of trusting the drained rings.
    pub(crate) fn recover<V>(&mut self, cx: &Ctx<'_, K, V>, msg: &str)
    where
        V: Clone + Send + Sync + 'static,
    {
        cx.user_panicked("user code on the flush path", msg);
        let stats = &cx.me.stats;
        stats.mark_degraded(cx.now());
        // The lists' keys are dropped without running user code under a lock.
        let retry = std::mem::take(&mut self.retry);
        let work = std::mem::take(&mut self.work);
        for &s in &self.owned {
            let shard = &cx.shards[s];
            shard.table.lock().release_all_in_flight();
            shard.mark_overflowed();
        }
        for r in retry {
            crate::guard::drop_quietly(r.key);
        }
        for w in work {
            crate::guard::drop_quietly(w.key);
        }
        self.scratch.clear();
        self.publish_oldest(cx);
    }

    /// Gives each armed shard without a deadline its deadline: its delay from the arming
    /// write's clock reading.
    pub(super) fn stamp_armed<V>(&mut self, cx: &Ctx<'_, K, V>, now: Duration)
    where
        V: Clone + Send + Sync + 'static,
    {
        let delay = cx.config.write_delay;
        for (slot, &s) in self.owned.iter().enumerate() {
            if self.due[slot].is_none() {
                if let Some(at) = cx.shards[s].armed_since(now) {
                    self.due[slot] = Some(at.saturating_add(delay));
                }
            }
        }
    }

    /// When the worker is overdue with a step it has not started (see [`KEEPER_WATCH`]),
    /// judged at `now`: once a shard of this flusher has been armed for `write_delay` and
    /// `watch` more, or a retry item has been due for `watch`, and no store backoff holds the
    /// work back. At or before `now`, the keeper takes the turn; after it, the keeper sleeps
    /// until then. A shard that is not armed counts as armed at `now` (a write may arm it
    /// the next moment), so the time is never more than `write_delay` and `watch` away, and
    /// no write made after `now` makes the worker overdue sooner.
    pub(crate) fn worker_overdue_at<V>(
        &self,
        cx: &Ctx<'_, K, V>,
        now: Duration,
        watch: Duration,
    ) -> Duration
    where
        V: Clone + Send + Sync + 'static,
    {
        let late = cx.config.write_delay.saturating_add(watch);
        let armed = self
            .owned
            .iter()
            .map(|&s| cx.shards[s].armed_since(now).unwrap_or(now))
            .min()
            .unwrap_or(now)
            .saturating_add(late);
        let retry = self
            .retry
            .iter()
            .map(|r| r.not_before.saturating_add(watch))
            .min();
        let at = retry.map_or(armed, |r| r.min(armed));
        self.backoff_until.map_or(at, |until| at.max(until))
    }

    /// `true` after a worker's step that stopped for a handoff: keys are left for the
    /// keeper (`work` is empty between steps otherwise).
    pub(crate) fn handing_off(&self) -> bool {
        !self.work.is_empty()
    }

    /// When the oldest write waiting in this flusher was made (at the latest; see
    /// [`Self::publish_oldest`]), if any.
    pub(super) fn oldest<V>(&self, cx: &Ctx<'_, K, V>) -> Option<Duration>
    where
        V: Clone + Send + Sync + 'static,
    {
        let delay = cx.config.write_delay;
        let armed = self
            .due
            .iter()
            .flatten()
            .map(|d| d.saturating_sub(delay))
            .min();
        let retry = self.retry.iter().map(|r| r.since).min();
        let left = self.work.iter().map(|w| w.since).min();
        [armed, retry, left].into_iter().flatten().min()
    }

    /// `true` once the keys a handoff left have been written (the keeper then hands back).
    pub(crate) fn caught_up(&self) -> bool {
        self.work.is_empty() && !self.wants_full_step()
    }

    /// Writes one key now, on the caller's thread (`Cache::flush_key`), whether or not its
    /// delay is up and ignoring the store backoff. Holding this core's lock keeps the
    /// flusher thread out meanwhile, so the key's order is kept.
    pub(crate) fn write_key<V>(&mut self, cx: &Ctx<'_, K, V>, shard: usize, key: K)
    where
        V: Clone + Send + Sync + 'static,
    {
        let mut work = Work {
            shard,
            key,
            retry: None,
            since: cx.now(),
        };
        if let Some(i) = self.retry.iter().position(|r| r.key == work.key) {
            let r = self.retry.swap_remove(i);
            work.retry = Some((r.attempts, r.version));
            work.since = r.since;
        }
        // A handed-off step may have left the key (a retry among them) for the keeper: it is
        // written here instead.
        self.work.retain(|w| {
            if w.key != work.key {
                return true;
            }
            work.retry = work.retry.or(w.retry);
            work.since = work.since.min(w.since);
            false
        });
        self.write_out(cx, &mut vec![work], None);
        // The key may have been the oldest write waiting here; the next oldest may be in a
        // shard armed since the last step.
        self.stamp_armed(cx, cx.now());
        self.publish_oldest(cx);
    }

    /// Snapshots the keys of `work` in batches of at most `max_batch`, sends and applies them.
    ///
    /// With `grace_until` (a niced worker's step: its start plus [`HANDOFF_GRACE`] of the
    /// delay), stops before a batch once the step is late: `work` then holds the keys not yet
    /// snapshotted, in order (the handoff).
    pub(super) fn write_out<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        work: &mut Vec<Work<K>>,
        grace_until: Option<Duration>,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        if work.is_empty() {
            return;
        }
        // When this step gets late: checked before each batch, the first included.
        let late_at = grace_until.and_then(|grace_until| {
            let delay = cx.config.write_delay;
            let oldest = work.iter().map(|w| w.since).min()?;
            let reserve_from = oldest
                .saturating_add(delay)
                .saturating_sub(delay / HANDOFF_RESERVE);
            Some(reserve_from.max(grace_until))
        });
        let max_batch = cx.config.max_batch;
        let ordered = work.len() > max_batch && Self::order_by_key(cx, work, max_batch);
        // Otherwise keys of one shard together, so snapshots take each lock once per chunk
        // (drained rings come shard by shard already; retries may not).
        if !ordered && !work.is_sorted_by_key(|w| w.shard) {
            work.sort_by_key(|w| w.shard);
        }
        let mut batch: Vec<Write<K, V>> = Vec::with_capacity(work.len().min(max_batch));
        let mut meta: Vec<Meta> = Vec::with_capacity(batch.capacity());
        let mut i = 0;
        // When the batch being filled was started (timed only for a late check).
        let mut batch_started = None;
        while i < work.len() {
            if let (Some(at), true) = (late_at, batch.is_empty()) {
                // Late if the next batch, taking as long as the last one did, would end past
                // the step's lateness.
                let now = cx.now();
                if now.saturating_add(self.batch_wall) >= at {
                    // Nothing of `work[i..]` was snapshotted: the keys stay queued, in order,
                    // for the next step (the keeper's).
                    work.drain(..i);
                    return;
                }
                batch_started = Some(now);
            }
            // One chunk: keys of one shard, at most SNAPSHOT_CHUNK, no more than the batch
            // has room for.
            let s = work[i].shard;
            let room = (max_batch - batch.len()).min(SNAPSHOT_CHUNK);
            let end = i + work[i..]
                .iter()
                .take(room)
                .take_while(|w| w.shard == s)
                .count();
            self.snapshot_chunk(cx, s, &work[i..end], &mut batch, &mut meta);
            i = end;
            if batch.len() == max_batch {
                self.send(cx, &mut batch, &mut meta);
                self.time_batch(cx, batch_started.take());
            }
        }
        work.clear();
        if !batch.is_empty() {
            self.send(cx, &mut batch, &mut meta);
            self.time_batch(cx, batch_started);
        }
    }

    /// Takes the snapshots of `chunk` (keys of shard `s`, at most [`SNAPSHOT_CHUNK`]) under one
    /// acquisition of the shard's lock, into `batch` and `meta`. A key whose `Clone` panics
    /// goes on the retry list, or (after `max_attempts`) to the failed-writes sink by move.
    fn snapshot_chunk<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        s: usize,
        chunk: &[Work<K>],
        batch: &mut Vec<Write<K, V>>,
        meta: &mut Vec<Meta>,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        let mut hashes = [0u64; SNAPSHOT_CHUNK];
        for (h, w) in hashes.iter_mut().zip(chunk) {
            *h = cx.hash(&w.key);
        }
        let mut table = cx.shards[s].table.lock();
        // First prefetch every entry of the chunk, then take the snapshots: the entries were
        // just written on the writers' cores, and the prefetches let their cache misses
        // overlap instead of coming one by one.
        for &hash in &hashes[..chunk.len()] {
            table.prefetch(hash);
        }
        let mut surrendered = Vec::new();
        for (w, &hash) in chunk.iter().zip(&hashes) {
            match table.take(hash, &w.key, w.retry.is_some()) {
                Ok(None) => {}
                Ok(Some(snap)) => {
                    let attempts = match w.retry {
                        Some((a, v)) if v == snap.write.version() => a,
                        _ => 0,
                    };
                    batch.push(snap.write);
                    meta.push(Meta {
                        shard: s,
                        hash,
                        first: snap.first,
                        attempts,
                        since: w.since,
                    });
                }
                Err((version, msg)) => {
                    // The key's or value's `Clone` panicked: the key is in flight and this
                    // flusher's to retry, like a rejected record.
                    cx.user_panicked("a key's or value's Clone", &msg);
                    let attempts = 1 + match w.retry {
                        Some((a, v)) if v == version => a,
                        _ => 0,
                    };
                    if attempts >= cx.config.max_attempts && cx.sink_has_room() {
                        if let Some(given) = table.surrender(hash, &w.key) {
                            surrendered.push((given, attempts, msg));
                        }
                    } else {
                        let wait = self.rejected_backoff(cx, attempts);
                        let at = (s, hash);
                        self.retry_key(
                            cx,
                            &mut table,
                            at,
                            &w.key,
                            (attempts, version),
                            w.since,
                            wait,
                        );
                    }
                }
            }
        }
        drop(table);
        for ((write, first), attempts, msg) in surrendered {
            self.surrender(cx, s, write, first, attempts, &msg);
        }
    }

    /// Keeps how long a timed batch took, from its first snapshot to its last record marked.
    pub(super) fn time_batch<V>(&mut self, cx: &Ctx<'_, K, V>, started: Option<Duration>)
    where
        V: Clone + Send + Sync + 'static,
    {
        if let Some(t) = started {
            // Capped at half the grace: a step's first late check comes a little after the
            // step began and passes whenever `batch_wall` is under the grace, so every worker
            // step writes (and times) at least one batch. A cap at the grace or above would
            // let one slow batch make every later step hand off before its first batch, and
            // so never time another: the keeper would write everything from then on.
            let cap = cx.config.write_delay / (2 * HANDOFF_GRACE);
            self.batch_wall = cx.now().saturating_sub(t).min(cap);
        }
    }

    /// [`crate::Builder::flush_order`]: sorts a backlog of more than one batch by key, then
    /// each batch-sized window by shard (a stable sort: the window keeps its keys, and the
    /// snapshots take each shard's lock once per chunk). Two work items of one key stay in
    /// the order they had, so a key's writes still go oldest first. Returns `false` (and
    /// leaves the order to the caller) without an order, or if it panicked.
    pub(super) fn order_by_key<V>(
        cx: &Ctx<'_, K, V>,
        work: &mut [Work<K>],
        max_batch: usize,
    ) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        let Some(order) = &cx.flush_order else {
            return false;
        };
        // A panicking (or inconsistent) comparator leaves the slice a permutation of itself:
        // nothing is lost, the step just writes in shard order.
        let sorted = catch(|| work.sort_by(|a, b| order(&a.key, &b.key)));
        if sorted.is_err() {
            tracing::error!("the flush_order comparator panicked; this step writes in shard order");
            return false;
        }
        for window in work.chunks_mut(max_batch) {
            window.sort_by_key(|w| w.shard);
        }
        true
    }

    /// Publishes when the oldest write still waiting in this flusher's shards was made (at
    /// the latest: when its shard was armed, for a key a handoff left too, or when a
    /// retried write was first drained).
    pub(super) fn publish_oldest<V>(&self, cx: &Ctx<'_, K, V>)
    where
        V: Clone + Send + Sync + 'static,
    {
        cx.me.stats.set_oldest(self.oldest(cx));
    }

    /// A wait between half and all of `d`, so flushers of many processes do not retry in step.
    pub(super) fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift64: enough to spread retries, no need for a crate.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }

    /// Checks the flush tickets after a step: a ticket is done for this flusher once a full
    /// step ran after it was taken and no retry item holds a write older than the flush.
    pub(crate) fn settle_tickets<V>(&mut self, cx: &Ctx<'_, K, V>, ran_full_step: bool)
    where
        V: Clone + Send + Sync + 'static,
    {
        if self.tickets.is_empty() {
            return;
        }
        let mut k = 0;
        while k < self.tickets.len() {
            let (ticket, full_done) = &mut self.tickets[k];
            if ticket.is_cancelled() {
                self.tickets.swap_remove(k);
                continue;
            }
            *full_done |= ran_full_step;
            if !*full_done {
                k += 1;
                continue;
            }
            // Retry items, and keys a handed-off step left (retry items among them).
            let waiting = self.retry.iter().map(|r| (r.shard, &r.key));
            let left = self.work.iter().map(|w| (w.shard, &w.key));
            let pending = waiting
                .chain(left)
                .filter(|&(shard, key)| {
                    let hash = cx.hash(key);
                    let unsent = cx.shards[shard].table.lock().unsent_of(hash, key);
                    unsent != NONE && unsent < ticket.targets[shard]
                })
                .count();
            ticket.note(0, pending);
            if pending == 0 {
                ticket.complete_part();
                self.tickets.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }

    /// Whether a full step is owed to a ticket.
    pub(crate) fn wants_full_step(&self) -> bool {
        self.tickets.iter().any(|(_, done)| !done)
    }

    /// `true` when nothing is pending in this flusher's shards.
    pub(crate) fn is_idle<V>(&self, cx: &Ctx<'_, K, V>) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        self.retry.is_empty()
            && self.work.is_empty()
            && self
                .owned
                .iter()
                .all(|&s| cx.shards[s].table.lock().dirty == 0)
    }

    /// When this flusher next has something to do, if anything.
    pub(super) fn next_wake(&self) -> Option<Duration> {
        if !self.work.is_empty() {
            // At once, unless the store's backoff holds the keys back.
            return Some(self.backoff_until.unwrap_or(Duration::ZERO));
        }
        let due = self.due.iter().flatten().copied().min();
        let retry = self.retry.iter().map(|r| r.not_before).min();
        let retry = match (retry, self.backoff_until) {
            (Some(r), Some(b)) => Some(r.max(b)),
            (r, _) => r,
        };
        [due, retry].into_iter().flatten().min()
    }
}
