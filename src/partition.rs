//! Key ownership: which partitions of the key space this cache serves
//! ([`Builder::partitions`](crate::Builder::partitions)).
//!
//! Several instances of a service can run over one database, each serving the keys of the
//! partitions the application gives it (from its router, a service mesh, or a lease table).
//! A cache refuses reads and writes of a key it does not own ([`Error::NotOwner`]), so no
//! two live instances cache or write one key at once. [`Cache::release_partitions`] hands
//! partitions away (their pending writes are written and their keys leave memory);
//! [`Cache::acquire_partitions`] takes them (their reads go to the store: no stale copy).
//!
//! [`Error::NotOwner`]: crate::Error::NotOwner
//! [`Cache::release_partitions`]: crate::Cache::release_partitions
//! [`Cache::acquire_partitions`]: crate::Cache::acquire_partitions

use std::sync::Arc;

use crate::error::Error;
use crate::sync::atomic::{AtomicU64, Ordering};

/// The application's map from a key to its partition (taken modulo the partition count).
pub(crate) type Partitioner<K> = Arc<dyn Fn(&K) -> u32 + Send + Sync>;

/// The builder's partition settings.
pub(crate) struct PartitionSettings<K> {
    pub(crate) count: u32,
    pub(crate) of: Partitioner<K>,
    /// The partitions owned at `build` (`None`: all of them).
    pub(crate) owned: Option<Vec<u32>>,
}

/// The partitions a cache owns: a bit per partition.
pub(crate) struct Partitions<K> {
    count: u32,
    of: Partitioner<K>,
    owned: Box<[AtomicU64]>,
}

impl<K> Partitions<K> {
    /// # Errors
    /// [`Error::InvalidConfig`] for a count of 0 or an owned partition out of range.
    pub(crate) fn new(s: PartitionSettings<K>) -> Result<Self, Error> {
        if s.count == 0 {
            return Err(Error::InvalidConfig {
                setting: "partitions",
                reason: "the partition count must be at least 1".into(),
            });
        }
        let words = s.count.div_ceil(64) as usize;
        let p = Partitions {
            count: s.count,
            of: s.of,
            owned: (0..words).map(|_| AtomicU64::new(0)).collect(),
        };
        match s.owned {
            None => p.set((0..s.count).collect::<Vec<_>>().as_slice(), true)?,
            Some(owned) => p.set(&owned, true).map_err(|_| Error::InvalidConfig {
                setting: "owned_partitions",
                reason: format!("partitions are numbered 0 to {}", s.count - 1),
            })?,
        }
        Ok(p)
    }

    /// The partition of `key` (user code: call it outside every lock).
    pub(crate) fn of(&self, key: &K) -> u32 {
        (self.of)(key) % self.count
    }

    /// Whether the cache serves partition `p` now.
    pub(crate) fn owns(&self, p: u32) -> bool {
        self.owned[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    /// `Ok` if `p` is owned, else [`Error::NotOwner`].
    pub(crate) fn check(&self, p: u32) -> Result<(), Error> {
        if self.owns(p) {
            Ok(())
        } else {
            Err(Error::NotOwner { partition: p })
        }
    }

    /// Marks `parts` owned (or not).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if a partition is out of range (nothing changes then).
    pub(crate) fn set(&self, parts: &[u32], owned: bool) -> Result<(), Error> {
        self.validate(parts)?;
        for &p in parts {
            let bit = 1 << (p % 64);
            let word = &self.owned[(p / 64) as usize];
            if owned {
                word.fetch_or(bit, Ordering::AcqRel);
            } else {
                word.fetch_and(!bit, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// # Errors
    /// [`Error::InvalidConfig`] if a partition of `parts` does not exist.
    pub(crate) fn validate(&self, parts: &[u32]) -> Result<(), Error> {
        match parts.iter().find(|&&p| p >= self.count) {
            Some(&bad) => Err(Error::InvalidConfig {
                setting: "partitions",
                reason: format!(
                    "partition {bad} does not exist (the count is {})",
                    self.count
                ),
            }),
            None => Ok(()),
        }
    }

    /// The partitions owned now.
    pub(crate) fn owned(&self) -> Vec<u32> {
        (0..self.count).filter(|&p| self.owns(p)).collect()
    }
}
