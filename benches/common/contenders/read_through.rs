//! The peers that keep their entries in a concurrent map in front of the store: a get that
//! misses reads through and caches what it read; a put writes the map only (they persist
//! nothing).

use std::sync::Arc;

use crate::common::contender::{read_through, SharedStore, SyncCache};
use crate::common::value::Val;

/// The map a read-through peer keeps its entries in.
pub trait PeerMap<V>: Send + Sync + 'static {
    /// The peer's name in reports.
    const NAME: &'static str;
    fn lookup(&self, k: u64) -> Option<V>;
    fn insert(&self, k: u64, v: V);
}

/// A read-through peer: `map` in front of the store.
pub struct ReadThrough<M, V: Val> {
    pub map: M,
    store: SharedStore<V>,
}

impl<M: PeerMap<V>, V: Val> ReadThrough<M, V> {
    pub fn over(map: M, store: SharedStore<V>) -> Arc<Self> {
        Arc::new(ReadThrough { map, store })
    }
}

impl<M: PeerMap<V>, V: Val> SyncCache<V> for ReadThrough<M, V> {
    const NAME: &'static str = M::NAME;
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        if let Some(v) = self.map.lookup(k) {
            return Some(v);
        }
        read_through(&self.store, k, |k, v| self.map.insert(k, v))
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.map.insert(k, v);
    }
}
