//! Atomic read-modify-writes of one key: `compute`, `update`, `put_if_absent`, `get_with`.
//!
//! The key is *reserved* first ([`Table::reserve`](crate::shard::Table)): until the
//! reservation ends, every other write of the key (put, remove, write-through, another
//! read-modify-write) waits, on any thread. Then the current value is read (from memory, or
//! through the store, single-flight), the caller's closure runs without any lock, and the
//! result is written by the ordinary write path of the mode (behind, through, local), which
//! lets this thread's own reservation through. The reservation ends after the write, so a
//! waiting writer's value lands after this one, never under it.
//!
//! A closure that writes its own key (directly, or through another read-modify-write of it)
//! would wait for itself: such a call returns [`Error::Reentrant`]. The closure may panic:
//! the reservation ends as the panic unwinds, and nothing was written.

// loom's `thread_local!` takes no `const` initializer.
#![allow(clippy::missing_const_for_thread_local)]

use std::cell::{Cell, RefCell};
use std::hash::Hash;

use super::Inner;
use crate::error::Error;
use crate::shard::{Shard, Table};
use crate::sync::atomic::Ordering;

crate::sync::thread_local! {
    /// Stands for this thread in a reservation: its address.
    static ME: u8 = 0;
    /// The reservations (shard, key hash) whose closure runs on this thread now.
    static RUNNING: RefCell<Vec<(usize, u64)>> = RefCell::new(Vec::new());
}

/// This thread's token for [`Table::reserve`] (never 0).
fn me() -> usize {
    ME.with(|m| std::ptr::from_ref(m) as usize)
}

/// What [`Cache::compute`](crate::Cache::compute) did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Computed<V> {
    /// The key's value after the call: what the closure returned (`None`: removed, or left
    /// absent).
    pub value: Option<V>,
    /// The version of the write the call made; `None` when it wrote nothing (the closure
    /// returned `None` for an absent key).
    pub version: Option<u64>,
}

/// A key reserved by this thread ([`Inner::reserve`]); the reservation ends on drop.
pub(crate) struct Reservation<'a, K: Eq + Clone + Hash, V: Clone> {
    shard: &'a Shard<K, V>,
    hash: u64,
    key: &'a K,
    owner: usize,
    /// Ended already, by [`Reservation::end_in`].
    ended: Cell<bool>,
}

impl<K: Eq + Clone + Hash, V: Clone> Reservation<'_, K, V> {
    /// Ends the reservation under the caller's hold of the shard's lock (its write was just
    /// made there). Returns `true` if a write waits for it (the caller notifies once the
    /// lock is released).
    pub(super) fn end_in(&self, table: &mut Table<K, V>) -> bool {
        self.ended.set(true);
        table.end_reservation(self.hash, self.key, self.owner)
    }

    /// Runs the caller's closure for the reserved key: a write of the key from inside it is
    /// refused ([`Inner::my_turn`]) instead of waiting for this reservation.
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Running;
        impl Drop for Running {
            fn drop(&mut self) {
                RUNNING.with(|r| r.borrow_mut().pop());
            }
        }
        let id = (std::ptr::from_ref(self.shard) as usize, self.hash);
        RUNNING.with(|r| r.borrow_mut().push(id));
        let _running = Running;
        f()
    }
}

impl<K: Eq + Clone + Hash, V: Clone> Drop for Reservation<'_, K, V> {
    fn drop(&mut self) {
        if self.ended.get() {
            return;
        }
        // Only this thread's reservation: a write-through of the key ends it when it is
        // cached, and another thread may hold the key's next one by now.
        // Guarded: this may run while a panic of the closure unwinds, and the key's `Eq`
        // (user code) panicking again would abort the process.
        let (shard, hash, key, owner) = (self.shard, self.hash, self.key, self.owner);
        let waited = crate::guard::catch(|| shard.table.lock().end_reservation(hash, key, owner))
            .unwrap_or(true);
        if waited {
            self.shard.through_done.notify_all();
        }
    }
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Reserves `key` for this thread, waiting while another thread's turn of it (a
    /// write-through, a read-modify-write) is in flight; returns the reservation and the
    /// key's current value.
    fn reserve<'a>(&'a self, key: &'a K) -> Result<(Reservation<'a, K, V>, Option<V>), Error> {
        let (turn, known) = self.reserve_in_memory(key)?;
        let current = match known {
            Some(found) => found,
            // Not in memory (or a time-based rule is on): read through the store.
            None => self.get(key)?,
        };
        Ok((turn, current))
    }

    /// [`Inner::reserve`]'s reservation, and the key's value if memory holds it (`None`:
    /// unknown, read it).
    #[allow(clippy::type_complexity)]
    fn reserve_in_memory<'a>(
        &'a self,
        key: &'a K,
    ) -> Result<(Reservation<'a, K, V>, Option<Option<V>>), Error> {
        let hash = self.hash(key);
        let shard = &self.shards[self.shard_of(hash)];
        let owner = me();
        let mut table = shard.table.lock();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if table.reserve(hash, key, owner) {
                // The current value, when memory knows it: read under this hold of the lock.
                let known = if self.timed {
                    None
                } else {
                    table.get_untimed(hash, key, self.bounded)
                };
                let turn = Reservation {
                    shard,
                    hash,
                    key,
                    owner,
                    ended: Cell::new(false),
                };
                return Ok((turn, known));
            }
            if table.turn_owner(hash, key) == Some(owner) {
                // A closure of this thread's read-modify-write of the key, calling back.
                return Err(Error::Reentrant);
            }
            Self::wait_through(shard, &mut table)?;
        }
    }

    /// Whether a write of `key`, which found a turn of the key in flight, is this thread's
    /// own read-modify-write writing its result (it goes ahead): `Ok(false)` for another
    /// thread's turn (the write waits), [`Error::Reentrant`] from inside the closure.
    pub(super) fn my_turn(
        shard: &Shard<K, V>,
        table: &Table<K, V>,
        hash: u64,
        key: &K,
    ) -> Result<bool, Error> {
        if table.turn_owner(hash, key) != Some(me()) {
            return Ok(false);
        }
        let id = (std::ptr::from_ref(shard) as usize, hash);
        if RUNNING.with(|r| r.borrow().contains(&id)) {
            return Err(Error::Reentrant);
        }
        Ok(true)
    }

    /// Writes the result of a read-modify-write of `turn`'s key. Written behind, the
    /// reservation ends with the write, under one hold of the lock; otherwise the mode's
    /// write path lets this thread's reservation through, and it ends on drop.
    fn write_reserved(
        &self,
        turn: &Reservation<'_, K, V>,
        key: K,
        value: Option<V>,
    ) -> Result<u64, Error> {
        if self.write_mode() != crate::settings::WriteMode::Behind {
            return self.write(key, value);
        }
        let hash = turn.hash;
        let weight = self.weight(&key, value.as_ref());
        let rec = self.encode(&key, value.as_ref())?;
        self.write_behind_prepared(
            self.shard_of(hash),
            hash,
            key,
            value,
            weight,
            rec,
            Some(turn),
        )
    }

    pub(crate) fn compute<F>(&self, key: &K, f: F) -> Result<Computed<V>, Error>
    where
        F: FnOnce(Option<&V>) -> Option<V>,
    {
        let (turn, current) = self.reserve(key)?;
        let value = turn.run(|| f(current.as_ref()));
        if value.is_none() && current.is_none() {
            return Ok(Computed {
                value,
                version: None,
            });
        }
        let version = self.write_reserved(&turn, key.clone(), value.clone())?;
        Ok(Computed {
            value,
            version: Some(version),
        })
    }

    pub(crate) fn update<F>(&self, key: &K, f: F) -> Result<Option<u64>, Error>
    where
        F: FnOnce(&mut V),
    {
        let (turn, current) = self.reserve(key)?;
        let Some(mut value) = current else {
            return Ok(None);
        };
        turn.run(|| f(&mut value));
        let version = self.write_reserved(&turn, key.clone(), Some(value))?;
        Ok(Some(version))
    }

    pub(crate) fn put_if_absent(&self, key: K, value: V) -> Result<Option<V>, Error> {
        let (turn, current) = self.reserve(&key)?;
        if let Some(existing) = current {
            return Ok(Some(existing));
        }
        self.write_reserved(&turn, key.clone(), Some(value))?;
        Ok(None)
    }

    pub(crate) fn try_get_with<F, E>(&self, key: K, init: F) -> Result<V, E>
    where
        F: FnOnce() -> Result<V, E>,
        E: From<Error>,
    {
        if let Some(v) = self.get(&key)? {
            return Ok(v);
        }
        // Another caller may have written it while this one waited for its turn.
        let (turn, current) = self.reserve(&key)?;
        if let Some(v) = current {
            return Ok(v);
        }
        let value = turn.run(init)?;
        self.write_reserved(&turn, key.clone(), Some(value.clone()))?;
        Ok(value)
    }
}
