//! The table's policies: capacity and weight bounds with S3-FIFO eviction ([`Queues`]),
//! time-based expiry and the sweep that reclaims expired entries without a read.

use std::collections::VecDeque;

use hashbrown::HashTable;

use super::entry::{deadline_of, Entry, Side, IN_MAIN};
use super::table::Table;
use crate::settings::RemovalCause;
use crate::store::Write;

/// Read-side settings of a table, all per shard; times in nanoseconds of the coarse clock,
/// 0 for "off".
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most entries (tombstones included).
    pub(crate) capacity: usize,
    /// Most total weight.
    pub(crate) max_weight: u64,
    pub(crate) ttl: u64,
    pub(crate) tti: u64,
    /// How long an absent key is remembered as absent (0: not cached).
    pub(crate) negative_ttl: u64,
    /// Age after which an access schedules a refresh (0: no refresh-ahead).
    pub(crate) refresh_after: u64,
    /// A weigher is set: entries' weights differ from 1.
    pub(crate) weighted: bool,
    /// Entries may have times to live of their own (`Table::deadlines`).
    pub(crate) per_entry: bool,
}

impl Limits {
    /// A capacity or weight bound is set: the table evicts.
    pub(crate) fn bounded(&self) -> bool {
        self.capacity != usize::MAX || self.max_weight != u64::MAX
    }

    /// A time-based rule is on (TTL, TTI, negative caching, refresh-ahead).
    pub(crate) fn timed(&self) -> bool {
        (self.ttl | self.tti | self.negative_ttl | self.refresh_after) != 0 || self.per_entry
    }
}

/// The S3-FIFO queues: new keys enter `small`; keys accessed again while there move to
/// `main`, the others leave (remembered in `ghost`, so a quick return goes straight to
/// `main`); `main` is a CLOCK over the frequency bits. Dirty entries are pinned: passed over
/// and kept until they are written.
pub(super) struct Queues<K> {
    pub(super) small: VecDeque<(K, u64, u32)>,
    pub(super) main: VecDeque<(K, u64, u32)>,
    pub(super) small_live: usize,
    pub(super) ghost: VecDeque<u64>,
    pub(super) ghost_set: HashTable<u64>,
    pub(super) next_stamp: u32,
}

impl<K> Queues<K> {
    /// Positions in the queues beyond the live entries (an upper bound of the stale ones).
    pub(super) fn stale(&self) -> usize {
        self.small.len() + self.main.len()
    }
}

impl<K> Default for Queues<K> {
    fn default() -> Self {
        Queues {
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_live: 0,
            ghost: VecDeque::new(),
            ghost_set: HashTable::new(),
            next_stamp: 0,
        }
    }
}

impl<K: Eq + Clone + std::hash::Hash, V: Clone> Table<K, V> {
    pub(super) fn expired(
        limits: &Limits,
        e: &Entry<K, V>,
        side: &Side,
        deadline: u64,
        now: u64,
    ) -> bool {
        if e.is_dirty() {
            return false; // written first, then it may go
        }
        if e.is_tombstone() && e.version == 0 {
            return now >= side.born.saturating_add(limits.negative_ttl);
        }
        (limits.ttl != 0 && now >= side.born.saturating_add(limits.ttl))
            || (limits.tti != 0 && now >= side.accessed.saturating_add(limits.tti))
            || (deadline != 0 && now >= deadline)
    }

    /// `true` if `e` has expired at `now` (never for a dirty entry).
    pub(super) fn expired_at(&self, e: &Entry<K, V>, now: u64) -> bool {
        self.limits.timed()
            && Self::expired(
                &self.limits,
                e,
                &self.side[e.slot as usize],
                deadline_of(&self.deadlines, e.slot),
                now,
            )
    }

    /// Removes every clean entry that has expired at `now`, without a read touching it: the
    /// flushers call it periodically. Returns how many left.
    pub(crate) fn sweep_expired(&mut self, now: u64) -> usize {
        if (self.limits.ttl | self.limits.tti | self.limits.negative_ttl) == 0
            && !self.limits.per_entry
        {
            return 0;
        }
        let limits = self.limits;
        let (side, deadlines) = (&self.side, &self.deadlines);
        let gone: Vec<Entry<K, V>> = self
            .map
            .extract_if(|e| {
                let deadline = deadline_of(deadlines, e.slot);
                Self::expired(&limits, e, &side[e.slot as usize], deadline, now)
            })
            .collect();
        let n = gone.len();
        for e in gone {
            self.rare.expirations += 1;
            let (persisted, version) = (e.persisted, e.version);
            if persisted < version {
                // A local write: never acknowledged, also once it has left.
                if let Ok(k) = crate::guard::catch(|| e.key.clone()) {
                    let hash = self.hasher.hash_one(&k);
                    self.note_undurable(hash, k, persisted, version, false);
                } else {
                    self.undurable_floor = self.undurable_floor.max(version);
                }
            }
            match self.forget(e) {
                Write::Put { key, value, .. } if self.listening => {
                    self.departed.push((key, value, RemovalCause::Expired));
                }
                w => {
                    crate::guard::drop_quietly(w);
                }
            }
        }
        n
    }

    /// `true` while the table holds more than its capacity or weight allows.
    pub(super) fn over_capacity(&self) -> bool {
        self.map.len() > self.limits.capacity || self.weight > self.limits.max_weight
    }

    /// Evicts clean entries (S3-FIFO) until the table fits. Dirty entries are pinned: passed
    /// over, never dropped. Returns `true` if the table is still too big because too much of
    /// it is dirty (the caller then asks the flusher to write early).
    pub(super) fn enforce(&mut self) -> bool {
        if !self.limits.bounded() || !self.over_capacity() {
            return false;
        }
        let small_target = (self.limits.capacity / 10).max(1);
        let mut budget = 2 * (self.queues.small.len() + self.queues.main.len()) + 4;
        while self.over_capacity() && budget > 0 {
            budget -= 1;
            let from_small = self.queues.small_live > small_target || self.queues.main.is_empty();
            let popped = if from_small {
                self.queues.small.pop_front()
            } else {
                self.queues.main.pop_front()
            };
            let Some((key, hash, stamp)) = popped else {
                break;
            };
            let side = &self.side;
            let Some(e) = self.map.find_mut(hash, |e| {
                e.key == key && side[e.slot as usize].stamp == stamp
            }) else {
                continue; // a stale position: the entry left or was re-inserted
            };
            if from_small == e.flag(IN_MAIN) {
                continue; // moved to the other queue since
            }
            if e.is_dirty() {
                // Pinned until written: keep its place at the back.
                let q = if from_small {
                    &mut self.queues.small
                } else {
                    &mut self.queues.main
                };
                q.push_back((key, hash, stamp));
                continue;
            }
            if from_small {
                if e.freq() > 0 {
                    e.set_freq(0);
                    e.set_flag(IN_MAIN, true);
                    self.queues.small_live -= 1;
                    self.queues.main.push_back((key, hash, stamp));
                    continue;
                }
                // Remember it briefly: a quick return goes straight to the main queue.
                let q = &mut self.queues;
                if q.ghost.len() >= self.limits.capacity.min(1 << 20) {
                    if let Some(old) = q.ghost.pop_front() {
                        if let Ok(occ) = q.ghost_set.find_entry(old, |h| *h == old) {
                            occ.remove();
                        }
                    }
                }
                if q.ghost_set.find(hash, |h| *h == hash).is_none() {
                    q.ghost.push_back(hash);
                    q.ghost_set.insert_unique(hash, hash, |h| *h);
                }
            } else if e.freq() > 0 {
                e.set_freq(e.freq() - 1);
                self.queues.main.push_back((key, hash, stamp));
                continue;
            }
            self.rare.evictions += 1;
            self.remove_entry(hash, &key, Some(RemovalCause::Evicted));
        }
        self.over_capacity()
    }

    /// Drops the eviction queues' stale positions (entries that left or were re-inserted):
    /// they are skipped by `enforce`, which only runs over capacity, so without this a cache
    /// under its capacity with churning keys would grow them without bound.
    pub(super) fn compact_queues(&mut self) {
        let map = &self.map;
        let side = &self.side;
        let live = |pos: &(K, u64, u32), in_main: bool| {
            map.find(pos.1, |e| {
                e.key == pos.0 && side[e.slot as usize].stamp == pos.2 && e.flag(IN_MAIN) == in_main
            })
            .is_some()
        };
        self.queues.small.retain(|p| live(p, false));
        self.queues.main.retain(|p| live(p, true));
        self.queues.small_live = self.queues.small.len();
    }
}
