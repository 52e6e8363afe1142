//! [`JournalStats`]: what the journal has done since it was opened.

use super::replay::ReplayStats;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::Distribution;

/// A snapshot of an open journal's counters, from `JournalLog::stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalStats {
    /// Bytes of segment headers and records held now (what a checkpoint can reclaim, and
    /// what it cannot).
    pub bytes: u64,
    /// Bytes allocated on disk for the segments held now.
    pub allocated_bytes: u64,
    /// Records appended since open.
    pub records: u64,
    /// Segment syncs (`msync`) made by the journal thread.
    pub syncs: u64,
    /// Rounds of syncs that made at least one record durable (one group commit each).
    pub sync_rounds: u64,
    /// Syncs that failed.
    pub sync_errors: u64,
    /// Checkpoints completed.
    pub checkpoints: u64,
    /// Segment files created (log, spare and checkpoint).
    pub segments_created: u64,
    /// Segment files reused: reclaimed by a checkpoint and given a new sequence number,
    /// with no new allocation on disk.
    pub segments_reused: u64,
    /// Duration of each segment sync, in microseconds.
    pub sync_micros: Distribution,
    /// Records made durable per sync round: the group-commit size.
    pub group_commit: Distribution,
    /// What replay did when the journal was opened.
    pub replay: ReplayStats,
}

/// The journal's counters (`Relaxed`: statistics only).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) syncs: AtomicU64,
    pub(crate) sync_rounds: AtomicU64,
    pub(crate) sync_errors: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    pub(crate) segments_created: AtomicU64,
    pub(crate) segments_reused: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> JournalStats {
        JournalStats {
            syncs: self.syncs.load(Ordering::Relaxed),
            sync_rounds: self.sync_rounds.load(Ordering::Relaxed),
            sync_errors: self.sync_errors.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            segments_created: self.segments_created.load(Ordering::Relaxed),
            segments_reused: self.segments_reused.load(Ordering::Relaxed),
            ..JournalStats::default()
        }
    }
}
