//! Work in flight on a key outside the table lock: single-flight loads ([`Loading`], whose
//! followers wait on a [`LoadSlot`]) and a key's turns: write-throughs and atomic
//! read-modify-writes ([`Through`]).

use std::time::Duration;

use super::entry::{Entry, REFRESHING};
use super::table::Table;
use crate::error::StoreError;
use crate::settings::RemovalCause;
use crate::sync::{Arc, Condvar, Mutex};

/// Whether a miss leads a load or joins one in flight.
pub(crate) enum LoadRole<V> {
    Leader(Arc<LoadSlot<V>>),
    Follower(Arc<LoadSlot<V>>),
}

/// A key's turn in flight: a write-through (its writer calls the store without the table
/// lock, and a second write-through of the key waits until this one is done,
/// [`Table::begin_through`], so the key's versions reach the store in order), or an atomic
/// read-modify-write ([`Table::reserve`]: every other write of the key waits until it has
/// written).
pub(super) struct Through<K> {
    pub(super) key: K,
    pub(super) hash: u64,
    /// Another write of the key waits for this one.
    pub(super) waited: bool,
    /// The thread that reserved the key ([`Table::reserve`]); 0 for a write-through.
    pub(super) owner: usize,
}

/// A load in flight for a key (single-flight). A miss of the key joins it while it is in
/// the table; a write, remove or eviction of the key takes it out ([`Table::touch_loading`]).
pub(super) struct Loading<K, V> {
    pub(super) key: K,
    pub(super) hash: u64,
    pub(super) slot: Arc<LoadSlot<V>>,
}

impl<K: Eq + Clone + std::hash::Hash, V: Clone> Table<K, V> {
    /// Starts a write-through of `key`: its version, or `None` while another write-through of
    /// the key is in flight (the caller waits on [`Shard::through_done`] and asks again).
    /// Two write-throughs of one key that overlapped would call the store in either order,
    /// so the store could receive the older version after the newer one, and the cache keep
    /// the older value; one at a time per key, each takes its version when it starts, and the
    /// store and the cache see the key's versions in order. Until [`Table::end_through`] the
    /// key stays marked.
    pub(crate) fn begin_through(&mut self, hash: u64, key: &K) -> Option<u64> {
        if self.through_in_flight(hash, key) {
            return None;
        }
        let mark = Through {
            key: key.clone(),
            hash,
            waited: false,
            owner: 0,
        };
        self.through.insert_unique(hash, mark, |t| t.hash);
        self.throughs += 1;
        Some(self.next_version())
    }

    /// Reserves `key` for thread `owner` (non-zero): until [`Table::end_through`], every
    /// other write of the key waits, and that thread's writes of it go ahead
    /// ([`Table::turn_owner`]). `false` while another turn of the key is in flight (the
    /// caller waits on [`Shard::through_done`] and asks again).
    pub(crate) fn reserve(&mut self, hash: u64, key: &K, owner: usize) -> bool {
        debug_assert_ne!(owner, 0);
        if self.through_in_flight(hash, key) {
            return false;
        }
        let mark = Through {
            key: key.clone(),
            hash,
            waited: false,
            owner,
        };
        self.through.insert_unique(hash, mark, |t| t.hash);
        self.throughs += 1;
        true
    }

    /// The thread that reserved `key` ([`Table::reserve`]), if a reservation is in flight.
    pub(crate) fn turn_owner(&self, hash: u64, key: &K) -> Option<usize> {
        if self.throughs == 0 {
            return None;
        }
        self.through
            .find(hash, |t| t.key == *key)
            .map(|t| t.owner)
            .filter(|&o| o != 0)
    }

    /// A write-through of `key` is in flight. If so, it is asked to notify
    /// [`Shard::through_done`] when it ends, for the caller, which is about to wait: another
    /// write-through of the key, or a write-behind write after a switch back to `Behind`
    /// (its batch could otherwise reach the store while the older write-through is there).
    #[inline]
    pub(crate) fn through_in_flight(&mut self, hash: u64, key: &K) -> bool {
        if self.throughs == 0 {
            return false;
        }
        match self.through.find_mut(hash, |t| t.key == *key) {
            Some(t) => {
                t.waited = true;
                true
            }
            None => false,
        }
    }

    /// `key` has write-behind work the store does not hold yet: a write still to send, or a
    /// batch (or retry) in flight. A write-through of such a key (after a switch to
    /// `WriteMode::Through`) holds the owning flusher's core so that no batch with the key's
    /// older version is at the store at the same time.
    pub(crate) fn has_behind_work(&self, hash: u64, key: &K) -> bool {
        self.find(hash, key).is_some_and(Entry::is_dirty)
    }

    /// Ends the write-through of `key` that [`Table::begin_through`] started. Returns `true`
    /// if another write-through of the key waits for it (the caller then notifies
    /// [`Shard::through_done`] once it has released the lock).
    pub(crate) fn end_through(&mut self, hash: u64, key: &K) -> bool {
        match self.through.find_entry(hash, |t| t.key == *key) {
            Ok(mark) => {
                self.throughs -= 1;
                mark.remove().0.waited
            }
            Err(_) => false,
        }
    }

    /// Ends `owner`'s reservation of `key` ([`Table::reserve`]) if it is still in flight
    /// (a write-through of the key ends it once cached). Returns `true` if a write waits
    /// for it (the caller then notifies [`Shard::through_done`]).
    pub(crate) fn end_reservation(&mut self, hash: u64, key: &K, owner: usize) -> bool {
        match self
            .through
            .find_entry(hash, |t| t.key == *key && t.owner == owner)
        {
            Ok(mark) => {
                self.throughs -= 1;
                mark.remove().0.waited
            }
            Err(_) => false,
        }
    }

    /// A write-through write with a version from [`Table::next_version`] reached the store:
    /// count it as a put or a remove (a failed one stays uncounted, as it was not accepted).
    pub(crate) fn count_write_through(&mut self, is_delete: bool) {
        // `puts` is the versions handed out less `version_base` less the removes.
        self.version_base -= 1;
        if is_delete {
            self.rare.removes += 1;
        }
    }

    /// Something happened to `key` (a write, a remove, an eviction): a load of it in flight
    /// may have read the store before that, so it is taken out of the single-flight table.
    /// Its leader and the gets that already follow it still get its result (each of them
    /// began before this change, so the older value is one they may see), but the leader
    /// does not cache it ([`Table::finish_load`] no longer finds it), and a miss from now on
    /// starts a new load instead of following one that may return what this change replaced.
    /// (Marking the load stale and leaving it joinable let a get that began after a remove
    /// returned follow a load that read the removed value: tests/linearizability.rs,
    /// `per_key_linearizable_flush_order_and_write_through_backpressure`.)
    #[inline]
    pub(super) fn touch_loading(&mut self, hash: u64, key: &K) {
        if !self.loading.is_empty() {
            if let Ok(occ) = self.loading.find_entry(hash, |l| l.key == *key) {
                occ.remove();
            }
        }
    }

    /// A miss: join the load of `key` in flight, or lead a new one.
    pub(crate) fn join_load(&mut self, hash: u64, key: &K) -> LoadRole<V> {
        if let Some(l) = self.loading.find(hash, |l| l.key == *key) {
            self.rare.load_waits += 1;
            return LoadRole::Follower(l.slot.clone());
        }
        let slot = Arc::new(LoadSlot::new());
        self.loading.insert_unique(
            hash,
            Loading {
                key: key.clone(),
                hash,
                slot: slot.clone(),
            },
            |l| l.hash,
        );
        LoadRole::Leader(slot)
    }

    /// The leader's load (the one publishing to `slot`) finished successfully: cache the
    /// result unless the key was written, removed or evicted meanwhile (then what is in
    /// memory, or the loaded value, is the answer but nothing is cached). Absent keys are
    /// cached as absent when negative caching is on. Returns what the callers see, and
    /// whether a loaded value was cached.
    pub(crate) fn finish_load(
        &mut self,
        hash: u64,
        key: &K,
        slot: &LoadSlot<V>,
        loaded: Option<V>,
        now: u64,
        weight: u32,
    ) -> (Option<V>, bool) {
        self.rare.loads += 1;
        // Still in the table means nothing touched the key since the load began. (Another
        // load of the key may be there instead: one a later miss started after this one was
        // taken out.)
        let stale = match self.loading.find_entry(hash, |l| {
            l.key == *key && std::ptr::eq(Arc::as_ptr(&l.slot), slot)
        }) {
            Ok(occ) => {
                occ.remove();
                false
            }
            Err(_) => true,
        };
        if let Some(e) = self.find(hash, key) {
            return (e.value().cloned(), false);
        }
        if stale {
            return (loaded, false);
        }
        match loaded {
            Some(v) => (self.fill_clean(hash, key.clone(), v, 0, now, weight), true),
            None => {
                if self.limits.negative_ttl != 0 {
                    self.insert(hash, key.clone(), None, 0, 0, now, 1);
                    self.enforce();
                }
                (None, false)
            }
        }
    }

    /// The leader's load (publishing to `slot`) failed: forget it, if it is still in the
    /// table (followers get the error through the slot).
    pub(crate) fn abort_load(&mut self, hash: u64, key: &K, slot: &LoadSlot<V>) {
        if let Ok(occ) = self.loading.find_entry(hash, |l| {
            l.key == *key && std::ptr::eq(Arc::as_ptr(&l.slot), slot)
        }) {
            occ.remove();
        }
    }

    /// An asynchronous refresh finished. The new value replaces the entry only if the entry
    /// is still the one the refresh was scheduled for (same version, clean): a refresh never
    /// overwrites a write. A failure keeps the old value until it really expires.
    pub(crate) fn finish_refresh(
        &mut self,
        hash: u64,
        key: &K,
        version: u64,
        loaded: Result<Option<V>, ()>,
        now: u64,
    ) {
        let Some(e) = self.map.find_mut(hash, |e| e.key == *key) else {
            return;
        };
        e.set_flag(REFRESHING, false);
        match loaded {
            Err(()) => self.rare.refresh_failures += 1,
            Ok(_) if e.version != version || e.is_dirty() => {}
            Ok(Some(v)) => {
                let old = e.replace_value(Some(v));
                if old.is_none() {
                    // A clean tombstone at version 0 is a cached absence; a refresh is only
                    // scheduled for an entry that held a value, but keep the count right.
                    self.tombstones -= 1;
                }
                let side = &mut self.side[e.slot as usize];
                side.born = now;
                side.accessed = now;
                self.rare.refreshes += 1;
                drop(self.replaced(key, old, RemovalCause::Replaced));
            }
            Ok(None) => {
                // Deleted in the store by someone else: forget it.
                self.rare.refreshes += 1;
                self.remove_entry(hash, key, Some(RemovalCause::Removed));
            }
        }
    }
}

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
