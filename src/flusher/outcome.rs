//! What a batch's outcome does: persisted records make their entries clean, failed ones go on
//! the retry list or, rejected too often, to the failed-writes sink. [`failures`] classifies
//! a store call's answer for the flushers and the write-through path alike.

use std::time::Duration;

use super::{Ctx, FlusherCore, Meta, RetryItem, SNAPSHOT_CHUNK};
use crate::error::{BatchError, StoreError};
use crate::guard::{call_store, catch};
use crate::metrics::FlusherStats;
use crate::shard::Table;
use crate::store::FailedWrite;
use crate::store::Write;

impl<K: Clone + Eq + std::hash::Hash + Send + Sync + 'static> FlusherCore<K> {
    /// Calls the store with `batch` and applies the outcome. Leaves both vectors empty.
    pub(super) fn send<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        batch: &mut Vec<Write<K, V>>,
        meta: &mut Vec<Meta>,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        let stats = &cx.me.stats;
        FlusherStats::add(&stats.batches, 1);
        let started = std::time::Instant::now();
        let outcome = call_store(|| cx.store.write_all_checked(batch));
        let took = started.elapsed();
        stats.record_batch(batch.len(), took);
        if took > cx.config.store_timeout {
            FlusherStats::add(&stats.slow_store_calls, 1);
            tracing::warn!(took = ?took, limit = ?cx.config.store_timeout, records = batch.len(), "a store call took longer than store_timeout");
        }
        let now = cx.now();
        let coarse = cx.coarse_now();
        if let Err(panic_msg) = &outcome {
            FlusherStats::add(&stats.store_panics, 1);
            tracing::error!(message = %panic_msg, "store panicked in write_all; treated as unavailable");
        }
        let (outcome, superseded) = split_superseded(outcome, batch.len());
        let failed = failures(outcome, batch.len());

        self.note_health(cx, &failed, batch.len(), now);

        if failed.is_empty() && superseded.is_empty() {
            Self::mark_persisted(cx, batch, meta, coarse);
            FlusherStats::add(&stats.records_written, batch.len() as u64);
            crate::guard::clear_quietly(batch);
            meta.clear();
            cx.notify_progress();
            return;
        }
        let mut failed = failed.into_iter().peekable();
        let mut superseded = superseded.into_iter().peekable();
        let mut written = 0u64;
        for (i, (write, m)) in batch.drain(..).zip(meta.drain(..)).enumerate() {
            let error = failed.next_if(|(fi, _)| *fi == i).map(|(_, e)| e);
            if error.is_none() && superseded.next_if(|&si| si == i).is_some() {
                // A cache of a later generation wrote the key: retrying cannot help. The
                // write goes to the failed-writes sink as one rejected for the last time
                // (or, while the sink is full, waits there at the longest backoff).
                FlusherStats::add(&stats.superseded, 1);
                tracing::warn!(version = write.version(), "the store holds a newer version of the key, written by a cache of a later generation; the write is handed to the failed-writes sink");
                let last = Meta {
                    attempts: cx.config.max_attempts.saturating_sub(1),
                    ..m
                };
                self.settle_failed(cx, write, &last, superseded_error(), now);
                continue;
            }
            match error {
                None => {
                    let mut table = cx.shards[m.shard].table.lock();
                    table.persisted(m.hash, write.key(), write.version(), coarse);
                    drop(table);
                    written += 1;
                    crate::guard::drop_quietly(write);
                }
                Some(e) => self.settle_failed(cx, write, &m, e, now),
            }
        }
        FlusherStats::add(&stats.records_written, written);
        cx.notify_progress();
    }

    /// The store's health after a batch: any unavailable record starts (or lengthens) the
    /// store backoff and marks health degraded; a batch without one ends the backoff.
    fn note_health<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        failed: &[(usize, StoreError)],
        records: usize,
        now: Duration,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        let stats = &cx.me.stats;
        if failed.iter().any(|(_, e)| e.is_unavailable()) {
            FlusherStats::add(&stats.store_unavailable, 1);
            if stats.mark_degraded(now) {
                tracing::warn!("store unavailable: health is now degraded");
            }
            let jittered = self.jitter(self.backoff_next);
            self.backoff_until = Some(now.saturating_add(jittered));
            self.backoff_next = self.backoff_next.saturating_mul(2).min(cx.config.retry_max);
            tracing::debug!(failed = failed.len(), batch = records, backoff = ?jittered, "store unavailable; writes stay queued");
        } else {
            self.backoff_until = None;
            self.backoff_next = cx.config.retry_base;
            if stats.mark_healthy() {
                tracing::info!("store healthy again");
            }
        }
    }

    /// The common case, everything applied: marks the records persisted, taking each shard's
    /// lock once per run of its records (the batch is in shard order), at most
    /// [`SNAPSHOT_CHUNK`] records per acquisition so writers wait no longer than they do for a
    /// snapshot chunk. Never two shard locks at once.
    fn mark_persisted<V>(cx: &Ctx<'_, K, V>, batch: &[Write<K, V>], meta: &[Meta], coarse: u64)
    where
        V: Clone + Send + Sync + 'static,
    {
        let mut i = 0;
        while i < batch.len() {
            let s = meta[i].shard;
            let mut end = i;
            while end < batch.len() && meta[end].shard == s && end - i < SNAPSHOT_CHUNK {
                end += 1;
            }
            let mut table = cx.shards[s].table.lock();
            // Prefetch first, as for the snapshots (`write_out`).
            for m in &meta[i..end] {
                table.prefetch(m.hash);
            }
            for k in i..end {
                table.persisted(meta[k].hash, batch[k].key(), batch[k].version(), coarse);
            }
            i = end;
        }
    }

    /// A record of a batch failed with `error`: it goes on the retry list (unavailable, or
    /// rejected fewer than `max_attempts` times, or the failed-writes sink is full), or to
    /// the failed-writes sink.
    pub(super) fn settle_failed<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        write: Write<K, V>,
        m: &Meta,
        error: StoreError,
        now: Duration,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        let stats = &cx.me.stats;
        let mut table = cx.shards[m.shard].table.lock();
        let (attempts, wait) = match error {
            StoreError::Unavailable(_) => (
                m.attempts,
                self.backoff_until.unwrap_or(now).saturating_sub(now),
            ),
            e @ StoreError::Rejected(_) => {
                FlusherStats::add(&stats.records_rejected, 1);
                let attempts = m.attempts + 1;
                if attempts < cx.config.max_attempts {
                    (attempts, self.rejected_backoff(cx, attempts))
                } else if cx.sink_has_room() {
                    table.abandon(m.hash, write.key(), write.version());
                    drop(table);
                    for (t, _) in &self.tickets {
                        if m.first < t.targets[m.shard] {
                            t.note(1, 0);
                        }
                    }
                    FlusherStats::add(&stats.failed_writes, 1);
                    tracing::error!(version = write.version(), attempts, error = %e, "store rejected a write too often; handed to the failed-writes sink");
                    cx.give_up(FailedWrite {
                        write,
                        error: e,
                        attempts,
                    });
                    return;
                } else {
                    // The sink is full: keep the write in the cache, dirty, and try again
                    // at the longest backoff until the application drains the sink.
                    FlusherStats::add(&stats.sink_full, 1);
                    tracing::warn!(
                        version = write.version(),
                        "failed-writes sink is full; the write stays queued"
                    );
                    (attempts, cx.config.retry_max)
                }
            }
        };
        if table.retry_later(m.hash, write.key(), m.first) {
            FlusherStats::add(&stats.retries, 1);
            self.retry_key(
                cx,
                &mut table,
                (m.shard, m.hash),
                write.key(),
                (attempts, write.version()),
                m.since,
                wait,
            );
        }
        drop(table);
        crate::guard::drop_quietly(write);
    }

    /// Puts a key this flusher holds in flight on its retry list, due after `wait`. If the
    /// key cannot be cloned for the list (its `Clone` panics), its mark is released instead and
    /// the shard's table scan finds it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn retry_key<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        table: &mut Table<K, V>,
        (shard, hash): (usize, u64),
        key: &K,
        (attempts, version): (u32, u64),
        since: Duration,
        wait: Duration,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        match catch(|| key.clone()) {
            Ok(key) => self.retry.push(RetryItem {
                shard,
                key,
                attempts,
                version,
                not_before: cx.now().saturating_add(wait),
                since,
            }),
            Err(msg) => {
                cx.user_panicked("a key's Clone", &msg);
                table.release(hash, key);
                cx.shards[shard].mark_overflowed();
            }
        }
    }

    /// Hands a write whose key or value cannot be cloned to the failed-writes sink (it was
    /// moved out of the table by [`Table::surrender`]).
    pub(super) fn surrender<V>(
        &mut self,
        cx: &Ctx<'_, K, V>,
        shard: usize,
        write: Write<K, V>,
        first: u64,
        attempts: u32,
        msg: &str,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        for (t, _) in &self.tickets {
            if first < t.targets[shard] {
                t.note(1, 0);
            }
        }
        FlusherStats::add(&cx.me.stats.failed_writes, 1);
        tracing::error!(
            version = write.version(),
            attempts,
            "a write's key or value could not be cloned; handed to the failed-writes sink"
        );
        cx.give_up(FailedWrite {
            write,
            error: StoreError::rejected(format!(
                "the key's or value's Clone panicked {attempts} time(s): {msg}"
            )),
            attempts,
        });
    }

    /// The wait before retrying a record rejected `attempts` times.
    pub(super) fn rejected_backoff<V>(&self, cx: &Ctx<'_, K, V>, attempts: u32) -> Duration
    where
        V: Clone + Send + Sync + 'static,
    {
        cx.config
            .retry_base
            .saturating_mul(1 << attempts.saturating_sub(1).min(20))
            .min(cx.config.retry_max)
    }
}

/// What a store call's outcome (`Err`: the store panicked, with its message) means for each
/// record of a batch of `len`: the indices that failed and why, in order; empty when
/// everything was applied. The flushers and the write-through path share it.
///
/// A `Partial` that does not account for the batch (an empty list, or an index outside it)
/// is treated as `Unavailable`: nothing is known to be applied, so the whole batch is retried,
/// which the store's version guard makes harmless.
/// The error a superseded write is handed to the failed-writes sink with.
pub(crate) fn superseded_error() -> StoreError {
    StoreError::rejected(
        "superseded: the store holds a newer version of this key, written by a cache of a later generation",
    )
}

/// A store call's answer with the superseded writes taken out: the answer as
/// [`failures`] reads it, and the indices of the writes the store ignored for a newer
/// version (sorted; out-of-range ones dropped, with a warning).
pub(crate) fn split_superseded(
    outcome: Result<Result<crate::store::Applied, BatchError>, String>,
    len: usize,
) -> (Result<Result<(), BatchError>, String>, Vec<usize>) {
    match outcome {
        Ok(Ok(applied)) => {
            let mut s = applied.superseded;
            s.sort_unstable();
            s.dedup();
            if s.last().is_some_and(|&i| i >= len) {
                tracing::warn!(batch = len, reported = ?s, "the store reported superseded writes outside the batch; ignored");
                s.retain(|&i| i < len);
            }
            (Ok(Ok(())), s)
        }
        Ok(Err(e)) => (Ok(Err(e)), Vec::new()),
        Err(panic) => (Err(panic), Vec::new()),
    }
}

pub(crate) fn failures(
    outcome: Result<Result<(), BatchError>, String>,
    len: usize,
) -> Vec<(usize, StoreError)> {
    let all = |e: StoreError| (0..len).map(|i| (i, e.clone())).collect();
    match outcome {
        Ok(Ok(())) => Vec::new(),
        Ok(Err(BatchError::Unavailable(e))) => all(StoreError::Unavailable(e)),
        Ok(Err(BatchError::Partial(mut list))) => {
            if list.is_empty() || list.iter().any(|(i, _)| *i >= len) {
                tracing::warn!(
                    batch = len,
                    reported = ?list.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                    "the store's Partial does not account for the batch; retrying it whole"
                );
                return all(StoreError::unavailable(
                    "the store answered with a Partial that does not account for the batch",
                ));
            }
            list.sort_by_key(|(i, _)| *i);
            list.dedup_by_key(|(i, _)| *i);
            list
        }
        Err(panic_msg) => all(StoreError::unavailable(format!(
            "store panicked: {panic_msg}"
        ))),
    }
}
