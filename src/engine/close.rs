//! Close: stop writes, drain, join the threads, and hand back every write that is not in the
//! store.

use std::hash::Hash;
use std::time::Duration;

use super::Inner;
use crate::flusher::StepMode;
use crate::guard::{in_engine, EngineScope};
use crate::store::{FailedWrite, Write};
use crate::sync::atomic::Ordering;

/// What [`Cache::close`](crate::Cache::close) could not write.
#[derive(Debug)]
#[must_use = "a close report holds the writes that did not reach the store"]
pub struct CloseReport<K, V> {
    /// Every write that is not in the store: the latest value (or delete) of each dirty key,
    /// with its version. Save them elsewhere or replay them into a new cache.
    pub unwritten: Vec<Write<K, V>>,
    /// The deadline passed before everything was written.
    pub deadline_reached: bool,
    /// The cache had been closed already; this report is empty.
    pub already_closed: bool,
    /// `close` was called from inside the engine (a `Store` callback, or user code on a
    /// flusher thread) and could not wait: the flushers write until the deadline in the
    /// background, and this report is empty. Call `close` again from an application thread
    /// for the full report.
    pub in_progress: bool,
}

impl<K, V> CloseReport<K, V> {
    pub(crate) fn empty(already_closed: bool, in_progress: bool) -> Self {
        CloseReport {
            unwritten: Vec::new(),
            deadline_reached: false,
            already_closed,
            in_progress,
        }
    }

    /// `true` if everything reached the store.
    pub fn is_clean(&self) -> bool {
        self.unwritten.is_empty()
    }
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Stops accepting writes, writes what is pending until `deadline` (measured from now),
    /// stops the flusher threads, and hands back every write that did not reach the store.
    pub(crate) fn close(&self, deadline: Duration) -> CloseReport<K, V> {
        let inner = self;
        if self.threads.lock().is_none() {
            return CloseReport::empty(true, false);
        }
        // Writers check the flag under their shard lock, so every write either completed
        // before (and is written or handed back below) or sees it and fails.
        inner.closed.store(true, Ordering::SeqCst);
        if let Some(loader) = &inner.loader {
            loader.stop();
        }
        let until = inner.now().saturating_add(deadline);
        let wall_until = std::time::Instant::now().checked_add(deadline);
        if in_engine() {
            for f in inner.flushers.iter() {
                f.post_close(until);
            }
            return CloseReport::empty(false, true);
        }
        let Some(threads) = self.threads.lock().take() else {
            return CloseReport::empty(true, false);
        };
        let _engine = EngineScope::enter();
        if inner.config.manual {
            self.drain_manually(until);
        } else {
            for f in inner.flushers.iter() {
                f.post_close(until);
            }
            let me = crate::sync::thread::current_id();
            for h in threads {
                if h.thread().id() == me {
                    continue;
                }
                if h.join().is_err() {
                    tracing::error!("a background thread of the cache panicked");
                }
            }
        }
        // Holding each core once after the flag was set orders this close after any
        // `flush_key`/`flush_step`/manual flush that holds one now; those that come later see
        // the flag under the core and do not call the store.
        for f in inner.flushers.iter() {
            drop(f.core.lock());
            // A flush still waiting (or racing this close) gets `Closed`.
            f.shut();
        }
        inner.wait_store_users(wall_until);
        self.close_journal();
        let mut unwritten = Vec::new();
        for s in inner.shards.iter() {
            s.table.lock().unwritten(&mut unwritten);
        }
        let deadline_reached = !unwritten.is_empty() && inner.now() >= until;
        CloseReport {
            unwritten,
            deadline_reached,
            already_closed: false,
            in_progress: false,
        }
    }

    /// With a journal: every shard's segments are replaced by a checkpoint of what the store
    /// does not hold (nothing, after a close that wrote everything; else exactly the writes
    /// this close hands back, which the next start replays too), then the journal is synced
    /// and its directory unlocked.
    fn close_journal(&self) {
        let Some(j) = &self.journal else { return };
        for f in self.flushers.iter() {
            let owned = f.core.lock().owned().to_vec();
            if let Some(&first) = owned.first() {
                self.checkpoint_journal(first, &owned);
            }
        }
        if let Err(e) = j.close_shared() {
            tracing::error!(error = %e, "journal: the final sync failed; the OS writes back what it holds");
        }
    }

    /// Manual flushing: `close` runs full steps on the caller's thread until everything is
    /// written, the deadline passes, or each record had its attempts.
    pub(super) fn drain_manually(&self, until: Duration) {
        let inner = self;
        let rounds = inner.config.max_attempts as usize + 1;
        for f in inner.flushers.iter() {
            let cx = inner.ctx(f);
            let mut core = f.core.lock();
            for _ in 0..rounds {
                let idle = core.guarded(&cx, |core| core.is_idle(&cx));
                if idle == Some(true) || inner.now() > until {
                    break;
                }
                let mode = StepMode {
                    full: true,
                    ignore_backoff: true,
                    hand_off_when_late: false,
                };
                core.step_guarded(&cx, mode);
            }
        }
    }

    /// Takes the writes the cache gave up on (the store rejected them `max_attempts` times),
    /// oldest first. The application can fix and re-submit them with `put`/`remove`.
    pub(crate) fn failed_writes(&self) -> Vec<FailedWrite<K, V>> {
        self.failed.lock().drain(..).collect()
    }

    /// `true` once `close` has started.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}
