//! A crash-safe local journal: every accepted write is recorded on local disk before the
//! write returns, so the writes the store does not hold yet survive a process crash (and,
//! per [`JournalSync`], a power loss).
//!
//! [`Journal`] is the configuration: a directory, the codecs that turn keys and values into
//! bytes (the [`Codec`] trait the store adapters use), a [`JournalSync`] mode, a segment
//! size, and whether to salvage a damaged journal.
//!
//! ```
//! use std::time::Duration;
//! use writebehind::journal::{Journal, JournalSync};
//! use writebehind::stores::Raw;
//!
//! let dir = tempfile::tempdir()?;
//! let journal: Journal<String, Vec<u8>> = Journal::new(dir.path(), Raw, Raw)
//!     .sync(JournalSync::Interval(Duration::from_millis(10)))
//!     .segment_bytes(8 << 20);
//! assert_eq!(journal.dir(), dir.path());
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Layout
//! The directory holds a `LOCK` file and segment files. The journal's appends are split into
//! "shards" (the cache uses one per flusher, for the cache's shards that flusher owns). A
//! shard has one file set per CPU, up to 8 (one in `EveryWrite` mode, where fewer files
//! make larger sync groups): appending threads take sets in turn at their first append and
//! keep them, so no tail, lock or counter is shared between writers on different cores. A set
//! appends to a segment of its own, named `<set>-<sequence>.log` (set `shard × sets per
//! shard + lane`); a checkpoint of a shard seals every set of it and writes
//! `<set>-<sequence>.ckpt` files. The
//! directory is locked with `flock` on `LOCK` while a journal is open: a second opener, in
//! this process or another, gets [`JournalError::Locked`].
//!
//! Segments are created whole: a temporary file is allocated to its full size
//! (`fallocate`), its header written and synced, and then it is renamed into place and the
//! directory synced. A full disk therefore fails the creation of a segment, which the write
//! that needed it reports as an error; appends into a mapped segment never meet a full disk
//! (which for a memory-mapped file would be a `SIGBUS`). The journal thread prepares the
//! next segment of a shard when its current one is half full, so writers rarely create one.
//!
//! Segments a checkpoint reclaimed are reused rather than deleted (up to a checkpoint's
//! worth, [`Journal::checkpoint_bytes`], and one per file set; the rest are deleted): the
//! checkpoint renames them to a temporary name, which replay never reads and opening a
//! journal deletes, and keeps them mapped. A new segment takes one of them when there is
//! one: its header is rewritten and synced, and it is renamed into place and the directory
//! synced, as for a new file. Its blocks are allocated and its pages are in the page cache
//! already, so appends into it allocate, zero and (in `Os` mode, where nothing unmaps them)
//! fault nothing.
//!
//! # Format
//! All integers little-endian. A segment starts with a 64-byte header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `WBJOURNL` |
//! | 8 | 4 | format version (2) |
//! | 12 | 4 | shard |
//! | 16 | 8 | sequence number (unique in the directory) |
//! | 24 | 4 | kind: 0 log, 1 checkpoint |
//! | 28 | 4 | the cache's shard count when written |
//! | 32 | 4 | CRC-32 of bytes 0..32 |
//! | 40 | 8 | watermark: low 48 bits an offset, high 16 bits a check of it and the sequence |
//!
//! The watermark says how far the segment's records were on stable storage at the last
//! sync; 0 means nowhere yet. Records follow from offset 64, each starting at a multiple of
//! 8:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `len`: bytes of the body (from offset 8 to the end of the value) |
//! | 4 | 4 | CRC-32 of `len` and the body |
//! | 8 | 1 | kind: 1 put, 2 delete |
//! | 9 | 4 | segment tag: the low 32 bits of the segment's sequence number |
//! | 13 | 8 | version |
//! | 21 | 4 | key length |
//! | 25 | .. | key bytes, then value bytes (none for a delete) |
//! | .. | 0–7 | zero padding to a multiple of 8 |
//!
//! The rest of a segment is zeros (fresh allocations read as zeros), so a zero `len`
//! followed by zeros is the end of the records. In a reused segment the rest holds the
//! records of the file's earlier use: whole, checksummed records whose tag names another
//! segment ("stale" records). Sequence numbers only grow, so a tag comes back only 2^32
//! segments later.
//!
//! # Torn tails and corruption
//! Replay reads each segment front to back. A record that does not check (its length runs
//! past the file, its CRC fails, its padding is not zero, or it is the zero-length end with
//! bytes after it) is judged by where it is and what follows it:
//!
//! * **Below the watermark**: that part was synced, so damage there is corruption.
//! * **No valid record after it**: a torn last record, the one being written when the
//!   process died (or the unsynced tail when the power went). Dropped, counted in
//!   [`ReplayStats::torn_records`].
//! * **Valid records after it, with an all-zero 4 KiB page or the start of a stale record
//!   in between**: after a power loss the OS may have written back a later page of the
//!   unsynced tail but not an earlier one, which still holds what the file held before (zeros,
//!   or a reused file's earlier records). The missing page is skipped
//!   ([`ReplayStats::hole_bytes`]) and the records after it are kept.
//! * **Valid records after it, and neither in between**: corruption.
//!
//! A stale record past the watermark ends the segment's records (the same lost page when
//! valid records follow it); below the watermark it is corruption. A stale record is never
//! replayed.
//!
//! Corruption makes opening fail with [`JournalError::Corrupt`], naming the file and the
//! offset, unless [`Journal::salvage`] is on: then the damaged bytes are skipped up to the
//! next valid record, counted in [`ReplayStats::salvaged_bytes`], and replay goes on.
//!
//! Replay never returns a record it did not read whole and checksummed, and returns, per
//! key, the record with the highest version (ties: the one in the oldest segment), so a
//! key's versions never go back whatever order segments and checkpoints are read in. Keys
//! are compared as the bytes their codec writes, which the [`Codec`] contract makes equal
//! for equal keys.
//!
//! # Sync modes
//! | mode | a write returns once its record is | survives a process crash | survives a power loss |
//! |---|---|---|---|
//! | [`JournalSync::EveryWrite`] | synced (`msync`, which on Linux is `fdatasync` of the range) | yes | yes |
//! | [`JournalSync::Interval`]`(d)` | in the OS's page cache | yes | all but the last `d` (plus one sync round's duration) of writes |
//! | [`JournalSync::Os`] | in the OS's page cache | yes | what the OS happened to write back |
//!
//! A record copied into a shared file mapping is in the page cache at once: if the process
//! dies, the kernel still writes it to the file. That is why every mode survives a process
//! crash at the cost of a `memcpy`. In `EveryWrite` mode the journal thread syncs every
//! segment with new records in one round and wakes every writer that round covered: writers
//! that arrive together share one sync (group commit).
//!
//! # Why a memory map
//! A record must reach the OS before its write returns, or a process crash loses it. With
//! `write(2)` that is a system call per record, made under the shard's lock; batching the
//! calls in user space leaves the batch in the process until it is written, so a crash
//! loses it unless every put waits for its batch. A shared mapping hands the page cache the
//! record with a `memcpy` and no system call: about a fifth of a `write(2)` per record, and
//! twice a `write(2)` batched in user space, which a crash can lose (`JOURNAL_PART=append
//! cargo bench --bench journal`; the numbers are in `docs/BENCHMARKS.md`). Much of an
//! append into a fresh mapping is the page fault of its first write to each page, so spare
//! segments are prefaulted by the journal thread before a shard needs them, and reclaimed
//! segments are reused.
//!
//! Writing back a page that is mapped writable makes the kernel write-protect it, with a
//! TLB shootdown (an interrupt of every CPU running the process) per page. A sync therefore
//! first drops the mapping of the whole pages it is about to write back (`MADV_DONTNEED`,
//! which on a shared file mapping leaves the bytes in the page cache), and writes back
//! pages no thread has mapped.
//!
//! The price: a file must be allocated up front (done when a segment is created, so a full
//! disk is an error and never a `SIGBUS`), and it must not be truncated while mapped (the
//! directory lock keeps cooperating processes away).
//!
//! Each shard appends to its own file, so appends of different shards share nothing, but a
//! sync round syncs one file per shard with new records. The journal thread issues those
//! syncs together on a few helper threads, which lets the file system commit them as one
//! (8 files: 21.7 ms one after another, 3.7 ms together, 2.5 ms for a single file).
//!
//! # Ordering argument
//! A write is journaled (its record copied into the shard's segment, under the shard's
//! lock) before the engine applies it and returns, so any write a caller saw accepted is in
//! the journal, in the page cache at least, before the caller learns of it. Versions grow
//! per key, and replay keeps the highest version per key, so replay yields, for each key,
//! its latest accepted write, unless a checkpoint removed it because the store holds it or
//! a newer write of it. A checkpoint removes a shard's segments only after it wrote every
//! write of the shard that the store may not hold into new segments and synced them; the
//! live set is read after the shard's appends moved to a new segment, so a write racing the
//! checkpoint is either in that live set or in the new segment (see
//! `JournalLog::checkpoint`). A crash in the middle of a checkpoint leaves the old segments
//! and part of the new ones: replay reads both and still takes the highest version of each
//! key.
//!
//! # Space reclamation
//! Space is reclaimed by checkpoints, one shard at a time: the shard's appends move to a new
//! segment, the engine passes the shard's dirty set (every write the store has not
//! acknowledged), the journal writes it into checkpoint segments, syncs them, and deletes
//! the shard's older segments. The engine's side: under the shard's lock, call
//! `JournalLog::begin_checkpoint` and take a snapshot of the dirty set; release the lock;
//! call `JournalLog::finish_checkpoint` with the snapshot (writing and syncing it takes no
//! lock of the engine's). `JournalLog::bytes` tells when a checkpoint is worth it. A
//! journal's size is thus bounded by the dirty set plus what was appended since the last
//! checkpoint of each shard plus one preallocated segment per shard that has written (and a
//! spare when one is half full); on disk, the reclaimed segments kept for reuse add up to a
//! checkpoint's worth and one per file set. Segments found when the journal is opened are
//! deleted once every shard has completed a checkpoint. A clean close after a flush and a
//! checkpoint of every shard with an empty dirty set leaves no segment, and deletes the
//! segments kept for reuse.
//!
//! # User code
//! Codecs run on the writer's thread; an error or a panic in one becomes
//! [`JournalError::Codec`] and the write is refused.
//!
//! [`Codec`]: crate::stores::Codec

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::stores::Codec;

mod error;
mod format;
mod log;
mod pool;
mod replay;
mod segment;
mod stats;

pub use error::JournalError;
pub use replay::ReplayStats;
pub use stats::JournalStats;

// The engine's handle on an open journal. Public only so the crate's integration tests can
// drive a journal without a cache; not part of the stable API.
#[doc(hidden)]
pub use log::{CheckpointTicket, Encoded, JournalLog, Lsn};
#[doc(hidden)]
pub use replay::{Replayed, ReplayedEntry};

/// Journal bytes at which the flushers reclaim space unless
/// [`Journal::checkpoint_bytes`] says otherwise: 64 MiB.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;

/// Bytes of one segment file unless [`Journal::segment_bytes`] says otherwise: 4 MiB.
///
/// Each shard that has written holds one such preallocated file (plus a prepared spare when
/// it is half full), so a journal of a 64-shard cache allocates up to 512 MiB before any
/// reclamation.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;

/// The smallest segment (one page); smaller requests are rounded up.
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// The sync interval of the default mode, [`JournalSync::Interval`].
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(10);

/// When the journal syncs its records to stable storage (see "Sync modes" in the [module
/// docs](self)).
///
/// The default is [`JournalSync::Interval`]`(`[`DEFAULT_SYNC_INTERVAL`]`)`: a write costs a
/// `memcpy`, survives a process crash, and a power loss takes at most the last 10 ms.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use writebehind::journal::JournalSync;
///
/// assert_eq!(JournalSync::default(), JournalSync::Interval(Duration::from_millis(10)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalSync {
    /// A write returns only once its record is on stable storage. Concurrent writers share
    /// one sync (group commit).
    EveryWrite,
    /// A write returns once its record is in the OS's page cache; the journal thread syncs
    /// at least this often.
    Interval(Duration),
    /// A write returns once its record is in the OS's page cache; the journal never syncs
    /// its log segments (checkpoints are still synced before they replace anything).
    Os,
}

impl Default for JournalSync {
    fn default() -> Self {
        JournalSync::Interval(DEFAULT_SYNC_INTERVAL)
    }
}

/// The configuration of a journal: where, how keys and values become bytes, how often to
/// sync, how large a segment is, whether to salvage damage.
///
/// # Examples
/// ```
/// use writebehind::journal::{Journal, JournalSync};
/// use writebehind::stores::Raw;
///
/// let journal: Journal<u64, String> = Journal::new("/var/lib/app/wb", Raw, Raw)
///     .sync(JournalSync::EveryWrite)
///     .salvage(false);
/// assert_eq!(journal.sync_mode(), JournalSync::EveryWrite);
/// ```
pub struct Journal<K, V> {
    pub(crate) dir: PathBuf,
    pub(crate) key_codec: Arc<dyn Codec<K>>,
    pub(crate) value_codec: Arc<dyn Codec<V>>,
    pub(crate) sync: JournalSync,
    pub(crate) segment_bytes: u64,
    pub(crate) salvage: bool,
    pub(crate) checkpoint_bytes: u64,
}

impl<K, V> Journal<K, V> {
    /// A journal in `dir` (created if missing), with these codecs, syncing per
    /// [`JournalSync::default`], 4 MiB segments, no salvage.
    pub fn new(
        dir: impl Into<PathBuf>,
        key_codec: impl Codec<K>,
        value_codec: impl Codec<V>,
    ) -> Self {
        Journal {
            dir: dir.into(),
            key_codec: Arc::new(key_codec),
            value_codec: Arc::new(value_codec),
            sync: JournalSync::default(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            salvage: false,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
        }
    }

    /// When to sync (see [`JournalSync`]).
    pub fn sync(mut self, mode: JournalSync) -> Self {
        self.sync = mode;
        self
    }

    /// The preallocated size of a segment file, at least [`MIN_SEGMENT_BYTES`]. A record
    /// larger than a segment gets a segment of its own, as large as it needs.
    pub fn segment_bytes(mut self, n: u64) -> Self {
        self.segment_bytes = n.clamp(MIN_SEGMENT_BYTES, format::MAX_SEGMENT_BYTES);
        self
    }

    /// Space reclamation: a cache's flushers checkpoint their shards once the journal holds
    /// this many bytes and twice what it held after their last checkpoint, so it stays within
    /// about twice the writes the store does not hold, plus this. The segments a checkpoint
    /// reclaims are kept for reuse, up to this many bytes of them and one per file set, so
    /// the directory also holds up to that much preallocated space, and while the journal is
    /// open the page cache holds their pages (mapped, so they count in the process's
    /// resident file pages; the kernel may write them back and reclaim them). Default
    /// [`DEFAULT_CHECKPOINT_BYTES`]; at least one segment.
    pub fn checkpoint_bytes(mut self, n: u64) -> Self {
        self.checkpoint_bytes = n.max(MIN_SEGMENT_BYTES);
        self
    }

    /// With `true`, replay skips damaged records and segments (up to the next readable
    /// record) and keys that do not decode, counting them in [`ReplayStats`], instead of
    /// failing with [`JournalError::Corrupt`] or [`JournalError::Codec`]. Writes in the
    /// damaged bytes are lost; use it after keeping a copy of the directory.
    pub fn salvage(mut self, on: bool) -> Self {
        self.salvage = on;
        self
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sync mode.
    pub fn sync_mode(&self) -> JournalSync {
        self.sync
    }
}

impl<K, V> Clone for Journal<K, V> {
    fn clone(&self) -> Self {
        Journal {
            dir: self.dir.clone(),
            key_codec: Arc::clone(&self.key_codec),
            value_codec: Arc::clone(&self.value_codec),
            sync: self.sync,
            segment_bytes: self.segment_bytes,
            salvage: self.salvage,
            checkpoint_bytes: self.checkpoint_bytes,
        }
    }
}

impl<K, V> fmt::Debug for Journal<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("sync", &self.sync)
            .field("segment_bytes", &self.segment_bytes)
            .field("salvage", &self.salvage)
            .finish_non_exhaustive()
    }
}
