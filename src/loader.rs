//! Read-through helpers: [`LoadSlot`], where the followers of a single-flight load wait for
//! its leader, and [`Loader`], the background threads that run refresh-ahead reloads.

use std::collections::VecDeque;
use std::time::Duration;

use crate::error::StoreError;
use crate::sync::{Condvar, Mutex};

/// The outcome of one load, shared by every caller that missed the key while it ran.
pub(crate) struct LoadSlot<V> {
    result: Mutex<Option<Result<Option<V>, StoreError>>>,
    cv: Condvar,
    /// The leader's thread: a miss of the key on that thread (its store's `load` reading the
    /// key through the cache) would wait for itself.
    leader: crate::sync::thread::ThreadId,
}

impl<V: Clone> LoadSlot<V> {
    /// A slot whose leader is the calling thread.
    pub(crate) fn new() -> Self {
        LoadSlot {
            result: Mutex::new(None),
            cv: Condvar::new(),
            leader: crate::sync::thread::model_id(),
        }
    }

    /// `true` if the calling thread leads this load.
    pub(crate) fn led_here(&self) -> bool {
        self.leader == crate::sync::thread::model_id()
    }

    /// The leader hands over what every caller should see.
    pub(crate) fn publish(&self, r: Result<Option<V>, StoreError>) {
        *self.result.lock() = Some(r);
        self.cv.notify_all();
    }

    /// Publishes `r` unless an outcome is there already.
    pub(crate) fn publish_if_empty(&self, r: Result<Option<V>, StoreError>) {
        let mut g = self.result.lock();
        if g.is_none() {
            *g = Some(r);
        }
        drop(g);
        self.cv.notify_all();
    }

    /// A follower waits for the leader's outcome. The leader always publishes one: its
    /// `LeadGuard` (in `cache.rs`) publishes an error if it unwinds.
    pub(crate) fn wait(&self) -> Result<Option<V>, StoreError> {
        let mut g = self.result.lock();
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            self.cv.wait_for(&mut g, Duration::from_millis(100));
        }
    }
}

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
