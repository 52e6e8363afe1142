//! The shard-lock floors: a get's least cost under the design's shard lock, built by hand.

use std::sync::Arc;

use super::contender::{read_through, SharedStore, SyncCache};
use super::value::Val;

/// Shards of the floors, as many as writebehind's default.
const FLOOR_SHARDS: usize = 64;

/// An entry of a [`LockFloor`] table.
pub trait FloorEntry<V>: Send + Sync + 'static {
    /// The name of the floor over this entry.
    const NAME: &'static str;
    fn new(key: u64, value: V) -> Self;
    fn key(&self) -> u64;
    /// What a hit returns.
    fn hit(&self) -> Option<V>;
    fn set(&mut self, value: V);
}

/// The bare map's entry: the key and the value, 16 bytes for `u64` values.
pub struct MapEntry<V>(u64, V);

impl<V: Val> FloorEntry<V> for MapEntry<V> {
    const NAME: &'static str = "lock floor 16B";
    fn new(key: u64, value: V) -> Self {
        MapEntry(key, value)
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn hit(&self) -> Option<V> {
        Some(self.1.clone())
    }
    fn set(&mut self, value: V) {
        self.1 = value;
    }
}

/// The least entry the design allows (the design card's `Entry{value, version,
/// dirty_epoch, ...}`): the key, the value, the version, and one word for the epoch tag and
/// the flags, 32 bytes for `u64` values. A hit reads the flags for the tombstone bit, as
/// any entry that can stand for a pending delete must.
pub struct DesignEntry<V> {
    key: u64,
    value: V,
    flags: u64,
    _version: u64,
}

/// [`DesignEntry::flags`]: the entry is a tombstone.
const FLOOR_TOMB: u64 = 1 << 4;

impl<V: Val> FloorEntry<V> for DesignEntry<V> {
    const NAME: &'static str = "lock floor 32B";
    fn new(key: u64, value: V) -> Self {
        DesignEntry {
            key,
            value,
            flags: 0,
            _version: 1,
        }
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        self.key
    }
    #[inline(always)]
    fn hit(&self) -> Option<V> {
        (self.flags & FLOOR_TOMB == 0).then(|| self.value.clone())
    }
    fn set(&mut self, value: V) {
        self.value = value;
        self.flags &= !FLOOR_TOMB;
    }
}

/// The least a get can cost under the design's shard lock, built by hand with the same parts
/// writebehind uses: 64 cache-padded `parking_lot` mutexes over hashbrown tables hashed with
/// ahash, the shard chosen from bits 32.. of the hash as writebehind chooses it, and entries
/// of type `E` inline in the table. A get locks, probes, reads the entry and unlocks: no
/// counters, nothing to persist. A diagnostic of the ratio report's get workload, not a
/// cache anyone would ship: what writebehind's get could reach with nothing of its own
/// ([`MapEntry`]) and with the least entry the design allows ([`DesignEntry`]).
pub struct LockFloor<V: Val, E> {
    shards: Box<[crossbeam_utils::CachePadded<parking_lot::Mutex<hashbrown::HashTable<E>>>]>,
    hasher: ahash::RandomState,
    store: SharedStore<V>,
}

impl<V: Val, E: FloorEntry<V>> LockFloor<V, E> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        Arc::new(LockFloor {
            shards: (0..FLOOR_SHARDS).map(|_| Default::default()).collect(),
            hasher: ahash::RandomState::new(),
            store,
        })
    }

    #[inline(always)]
    fn shard(&self, hash: u64) -> &parking_lot::Mutex<hashbrown::HashTable<E>> {
        &self.shards[((hash >> 32) as usize) & (FLOOR_SHARDS - 1)]
    }

    fn insert(&self, hash: u64, k: u64, v: V) {
        let mut t = self.shard(hash).lock();
        match t.find_mut(hash, |e| e.key() == k) {
            Some(e) => e.set(v),
            None => {
                t.insert_unique(hash, E::new(k, v), |e| self.hasher.hash_one(e.key()));
            }
        }
    }
}

impl<V: Val, E: FloorEntry<V>> SyncCache<V> for LockFloor<V, E> {
    const NAME: &'static str = E::NAME;
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        let hash = self.hasher.hash_one(k);
        if let Some(found) = self
            .shard(hash)
            .lock()
            .find(hash, |e| e.key() == k)
            .map(E::hit)
        {
            return found;
        }
        read_through(&self.store, k, |k, v| self.insert(hash, k, v))
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.insert(self.hasher.hash_one(k), k, v);
    }
}

/// [`LockFloor`] over a bare map's entry.
pub type MapFloor<V> = LockFloor<V, MapEntry<V>>;
/// [`LockFloor`] over the least entry the design allows.
pub type DesignFloor<V> = LockFloor<V, DesignEntry<V>>;
