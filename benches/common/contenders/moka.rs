//! moka, synchronous, reading through the store on a miss.

use std::sync::Arc;

use super::read_through::{PeerMap, ReadThrough};
use super::PEER_CAPACITY;
use crate::common::contender::SharedStore;
use crate::common::value::Val;

type MokaCache<V> = moka::sync::Cache<u64, V, ahash::RandomState>;

/// moka's synchronous cache, hashed with ahash.
pub type Moka<V> = ReadThrough<MokaCache<V>, V>;

impl<V: Val> Moka<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        let cache = moka::sync::Cache::builder()
            .max_capacity(PEER_CAPACITY as u64)
            .build_with_hasher(ahash::RandomState::new());
        ReadThrough::over(cache, store)
    }
}

impl<V: Val> PeerMap<V> for MokaCache<V> {
    const NAME: &'static str = "moka";
    #[inline]
    fn lookup(&self, k: u64) -> Option<V> {
        self.get(&k)
    }
    #[inline]
    fn insert(&self, k: u64, v: V) {
        MokaCache::insert(self, k, v);
    }
}
