//! What the store holds of each key, for acknowledgements ([`Table::durable`]): an entry knows
//! it; a key that left memory with a write the store does not hold is remembered here.

use super::table::Table;

/// Most records a table keeps of keys that left memory while their latest write was not in
/// the store ([`Table::durable`]); past it, the oldest are folded into a version floor.
pub(super) const UNDURABLE_MAX: usize = 4096;

/// A key that left memory while the store did not hold its latest write (a write given up
/// to the failed-writes sink, or a local write of `WriteMode::ReadOnly`), so that
/// [`Table::durable`] never acknowledges that write once nothing in memory remembers it.
pub(super) struct Undurable<K> {
    pub(super) key: K,
    pub(super) hash: u64,
    /// The highest version the store is known to hold.
    pub(super) persisted: u64,
    /// The key's latest version when it left memory.
    pub(super) version: u64,
    /// That version was given up (it is in the failed-writes sink).
    pub(super) given_up: bool,
}

/// Whether the store holds a version of a key ([`Table::durable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The store holds this version or a newer one.
    Durable,
    /// Not yet, or never (a local write).
    Pending,
    /// The write was given up: it went to the failed-writes sink.
    GivenUp,
}

impl<K: Eq + Clone + std::hash::Hash, V: Clone> Table<K, V> {
    /// Whether the store holds `version` of the key or a newer one. An entry knows the
    /// highest version the store holds; a key that left memory is durable unless it left
    /// with a write the store does not hold ([`Undurable`], [`Table::undurable_floor`]).
    pub(crate) fn durable(&self, hash: u64, key: &K, version: u64) -> Durability {
        if let Some(e) = self.find(hash, key) {
            return if e.persisted >= version {
                Durability::Durable
            } else {
                Durability::Pending
            };
        }
        match self.undurable.find(hash, |u| u.key == *key) {
            Some(u) if version <= u.persisted => Durability::Durable,
            Some(u) if u.given_up && version <= u.version => Durability::GivenUp,
            Some(_) => Durability::Pending,
            None if version <= self.undurable_floor => Durability::Pending,
            None => Durability::Durable,
        }
    }

    /// Remembers that `key` leaves memory while the store holds only `persisted` of it and
    /// its latest write is `version` (see [`Undurable`]).
    pub(super) fn note_undurable(
        &mut self,
        hash: u64,
        key: K,
        persisted: u64,
        version: u64,
        given_up: bool,
    ) {
        if let Ok(occ) = self.undurable.find_entry(hash, |u| u.key == key) {
            occ.remove();
        }
        if self.undurable.len() >= UNDURABLE_MAX {
            // Fold an arbitrary record into the floor: its key's writes up to its version are
            // never acknowledged from now on, nor are other absent keys' (a false "not yet" for
            // an old version that was in fact written, never a false acknowledgement).
            let mut oldest = None;
            if let Some(u) = self.undurable.iter().next() {
                oldest = Some((u.hash, u.version));
            }
            if let Some((h, v)) = oldest {
                self.undurable_floor = self.undurable_floor.max(v);
                if let Ok(occ) = self.undurable.find_entry(h, |u| u.version == v) {
                    occ.remove();
                }
            }
        }
        let rec = Undurable {
            key,
            hash,
            persisted,
            version,
            given_up,
        };
        self.undurable.insert_unique(hash, rec, |u| u.hash);
    }

    /// A key comes back into memory: what its record knew moves into the entry.
    pub(super) fn recall_undurable(&mut self, hash: u64, key: &K) -> u64 {
        if self.undurable.is_empty() {
            return 0;
        }
        match self.undurable.find_entry(hash, |u| u.key == *key) {
            Ok(occ) => occ.remove().0.persisted,
            Err(_) => 0,
        }
    }
}
