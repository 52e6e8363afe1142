//! writebehind's shard shape built by hand, for `put_layout`: 64 padded parking_lot locks,
//! the shard chosen by bits 32.. of the hash, as the cache chooses it.

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

pub struct Shards<T> {
    pub hasher: ahash::RandomState,
    shards: Vec<CachePadded<Mutex<T>>>,
}

impl<T: Default> Shards<T> {
    pub fn new() -> Self {
        Shards {
            hasher: ahash::RandomState::new(),
            shards: (0..64).map(|_| CachePadded::default()).collect(),
        }
    }

    /// The locked shard of hash `h`.
    #[inline]
    pub fn lock(&self, h: u64) -> MutexGuard<'_, T> {
        self.shards[((h >> 32) & 63) as usize].lock()
    }

    /// Inserts `make(k)` for every key `0..n` into the table `table` picks in its shard.
    pub fn fill<E>(
        &self,
        n: u64,
        make: impl Fn(u64) -> E,
        table: impl Fn(&mut T) -> &mut hashbrown::HashTable<E>,
        key: impl Fn(&E) -> u64,
    ) {
        for k in 0..n {
            let h = self.hasher.hash_one(k);
            let mut shard = self.lock(h);
            table(&mut shard).insert_unique(h, make(k), |e| self.hasher.hash_one(key(e)));
        }
    }
}
