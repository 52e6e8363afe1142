//! [`Loader`]: the background threads that run refresh-ahead reloads.

use std::collections::VecDeque;
use std::time::Duration;

use crate::shared::Shared;
use crate::sync::atomic::Ordering;
use crate::sync::{Condvar, Mutex};

/// A refresh to run: the key, its shard, and the version it must still have.
pub(crate) struct RefreshJob<K> {
    pub(crate) shard: usize,
    pub(crate) key: K,
    pub(crate) version: u64,
}

/// The queue the refresh-ahead loader threads take jobs from.
pub(crate) struct Loader<K> {
    queue: Mutex<LoaderState<K>>,
    cv: Condvar,
}

struct LoaderState<K> {
    jobs: VecDeque<RefreshJob<K>>,
    stop: bool,
}

impl<K> Loader<K> {
    pub(crate) fn new() -> Self {
        Loader {
            queue: Mutex::new(LoaderState {
                jobs: VecDeque::new(),
                stop: false,
            }),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn submit(&self, job: RefreshJob<K>) {
        self.queue.lock().jobs.push_back(job);
        self.cv.notify_all();
    }

    /// The next job, or `None` once stopped.
    pub(crate) fn next(&self) -> Option<RefreshJob<K>> {
        let mut q = self.queue.lock();
        loop {
            if q.stop {
                return None;
            }
            if let Some(j) = q.jobs.pop_front() {
                return Some(j);
            }
            self.cv.wait_for(&mut q, Duration::from_millis(500));
        }
    }

    /// Stops the loader threads; jobs not started are dropped (a refresh is an optimization:
    /// the entries keep their values and expire as usual).
    pub(crate) fn stop(&self) -> Vec<RefreshJob<K>> {
        let mut q = self.queue.lock();
        q.stop = true;
        self.cv.notify_all();
        q.jobs.drain(..).collect()
    }
}

impl<K> Loader<K> {
    /// The body of a refresh-ahead loader thread: runs jobs until stopped or the cache closes.
    pub(crate) fn run<V>(&self, shared: &Shared<K, V>)
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        while let Some(job) = self.next() {
            if shared.closed.load(Ordering::SeqCst) {
                break;
            }
            let loaded = shared
                .read_store("load", || shared.store.load(&job.key))
                .map_err(|e| {
                    tracing::warn!(error = %e, "refresh-ahead reload failed; the old value stays until it expires");
                });
            let hash = shared.hash(&job.key);
            let now = shared.coarse_now();
            shared.shards[job.shard].table.lock().finish_refresh(
                hash,
                &job.key,
                job.version,
                loaded,
                now,
            );
        }
    }
}
