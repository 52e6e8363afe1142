//! quick_cache, synchronous, reading through the store on a miss.

use std::sync::Arc;

use super::read_through::{PeerMap, ReadThrough};
use super::PEER_CAPACITY;
use crate::common::contender::SharedStore;
use crate::common::value::Val;

type QuickCache<V> = quick_cache::sync::Cache<u64, V>;

/// quick_cache's synchronous cache.
pub type Quick<V> = ReadThrough<QuickCache<V>, V>;

impl<V: Val> Quick<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        ReadThrough::over(QuickCache::new(PEER_CAPACITY), store)
    }
}

impl<V: Val> PeerMap<V> for QuickCache<V> {
    const NAME: &'static str = "quick_cache";
    #[inline]
    fn lookup(&self, k: u64) -> Option<V> {
        self.get(&k)
    }
    #[inline]
    fn insert(&self, k: u64, v: V) {
        QuickCache::insert(self, k, v);
    }
}
