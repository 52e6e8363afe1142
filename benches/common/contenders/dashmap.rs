//! dashmap: the raw concurrent map, the ceiling (it persists nothing).

use std::sync::Arc;

use dashmap::DashMap;

use super::read_through::{PeerMap, ReadThrough};
use crate::common::contender::SharedStore;
use crate::common::value::Val;

/// dashmap, hashed with ahash.
pub type Dash<V> = ReadThrough<DashMap<u64, V, ahash::RandomState>, V>;

impl<V: Val> Dash<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        ReadThrough::over(DashMap::with_hasher(ahash::RandomState::new()), store)
    }
}

impl<V: Val> PeerMap<V> for DashMap<u64, V, ahash::RandomState> {
    const NAME: &'static str = "dashmap";
    #[inline]
    fn lookup(&self, k: u64) -> Option<V> {
        self.get(&k).map(|v| v.clone())
    }
    #[inline]
    fn insert(&self, k: u64, v: V) {
        DashMap::insert(self, k, v);
    }
}
