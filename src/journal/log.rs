//! [`JournalLog`]: an open journal. Appends, group commit, checkpoints, close.
//!
//! Lock order: a shard's `log` lock, then `unsynced`, `state` or `legacy` (never two of
//! those three at once). The journal thread takes `state` and `unsynced` one at a time and
//! a shard's `log` only to install a spare segment.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::metrics::new_histogram;

use super::error::JournalError;
use super::format::{self, Kind, SegmentKind, HEADER_LEN};
use super::pool::{SyncPool, SYNC_HELPERS};
use super::replay::{self, ReplayStats, Replayed};
use super::segment::{Retired, Segment};
use super::stats::{Counters, JournalStats};
use super::{Journal, JournalSync};
use crate::guard;
use crate::stores::Codec;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{thread, Arc, CachePadded, Condvar, Mutex, MutexGuard};

/// Name of the lock file in the journal directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// The most file sets per shard outside `EveryWrite` mode (one per CPU up to this).
const MAX_LANES: usize = 8;

std::thread_local! {
    /// The journal (its core's address) this thread last appended to, and its lane there.
    static LANE: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// How long a waiter or the idle journal thread sleeps before looking again (a guard
/// against a lost wake-up; wake-ups are notified).
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// A position in the journal to wait on with [`JournalLog::wait_synced`]: the end of one
/// appended record in its segment.
#[derive(Clone, Debug)]
pub struct Lsn {
    /// The segment, kept only when the sync mode waits (`EveryWrite`).
    seg: Option<Arc<Segment>>,
    end: u64,
}

impl Lsn {
    /// The end offset of the record in its segment file.
    pub fn offset(&self) -> u64 {
        self.end
    }
}

/// A sealed segment of a file set, kept until a checkpoint reclaims it.
#[derive(Debug)]
pub(crate) struct SegmentFile {
    pub(crate) path: PathBuf,
    /// The file set whose bytes count it (`usize::MAX` for a segment found at open).
    pub(crate) set: usize,
    /// Bytes of header and records (its share of [`JournalLog::bytes`]).
    pub(crate) used: u64,
    /// Bytes allocated on disk.
    pub(crate) allocated: u64,
    /// The segment, still mapped, for reuse once reclaimed (`None` for a file found at
    /// open).
    pub(crate) seg: Option<Arc<Segment>>,
}

/// One file set's appending state, under its lock.
#[derive(Default)]
struct ShardLog {
    /// The segment appends go to; `None` until the first append after open or a checkpoint.
    active: Option<Arc<Segment>>,
    /// A segment the journal thread created ahead of need.
    spare: Option<Segment>,
    spare_requested: bool,
    /// Sealed segments since the last checkpoint, oldest first.
    files: Vec<SegmentFile>,
}

/// A file set: a sequence of segments with one appender at a time.
struct ShardSlot {
    log: Mutex<ShardLog>,
    /// Bytes of this set's segments (headers and records).
    bytes: AtomicU64,
    /// Records appended since open.
    records: AtomicU64,
}

impl ShardSlot {
    /// Counts `bytes` and `records` more. The set's log lock is held: its holder is the
    /// only writer of both counters, so a load and a store (no atomic add) suffice, and
    /// readers see each store whole.
    fn add(&self, bytes: u64, records: u64) {
        self.bytes.store(
            self.bytes.load(Ordering::Relaxed) + bytes,
            Ordering::Relaxed,
        );
        if records > 0 {
            self.records.store(
                self.records.load(Ordering::Relaxed) + records,
                Ordering::Relaxed,
            );
        }
    }
}

/// Why the journal thread should stop.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    /// Sync everything first (close, drop).
    Sync,
    /// Stop at once, as a crash would leave the files (tests).
    Abandon,
}

#[derive(Default)]
struct SyncState {
    /// An `EveryWrite` waiter needs a sync.
    requested: bool,
    stop: Option<Stop>,
    /// Shards that want a spare segment.
    spares: Vec<usize>,
    /// The journal thread has exited.
    exited: bool,
}

/// Segments found at open: reclaimed once every shard has completed a checkpoint, since a
/// key's shard may differ from the shard that journaled it (the shard count can change
/// between runs).
struct Legacy {
    files: Vec<SegmentFile>,
    checkpointed: Vec<bool>,
    remaining: usize,
}

/// The part of an open journal its thread shares: no codec, no key or value type.
pub(crate) struct Core {
    dir: PathBuf,
    mode: JournalSync,
    segment_bytes: u64,
    /// File sets: `lanes` per shard, set `shard * lanes + lane`.
    shard_count: u32,
    /// File sets per shard: appenders on different threads take different lanes, so they
    /// share no lock and no cache line (1 in `EveryWrite` mode, where one sync per set
    /// is what a writer waits for, and fewer sets mean larger groups).
    lanes: usize,
    /// The lane the next thread to append takes (modulo `lanes`).
    next_lane: std::sync::atomic::AtomicUsize,
    shards: Box<[CachePadded<ShardSlot>]>,
    next_seq: AtomicU64,
    /// Log segments that may hold records not yet synced (never used in `Os` mode).
    unsynced: Mutex<Vec<Arc<Segment>>>,
    state: Mutex<SyncState>,
    to_thread: Condvar,
    to_waiters: Condvar,
    legacy: Mutex<Legacy>,
    legacy_bytes: AtomicU64,
    allocated: AtomicU64,
    /// Reclaimed segments kept for reuse, at most `max_free` (about one checkpoint's worth
    /// and one per file set).
    free: Mutex<Vec<Retired>>,
    max_free: usize,
    pub(crate) counters: Counters,
    sync_micros: Mutex<Histogram<u64>>,
    group_sizes: Mutex<Histogram<u64>>,
    replay: ReplayStats,
    pool: SyncPool,
}

/// An open journal: holds the directory lock and the journal thread.
///
/// The engine drives it: [`append`](Self::append) under a shard's lock for every accepted
/// write, [`wait_synced`](Self::wait_synced) outside it, [`checkpoint`](Self::checkpoint) to
/// reclaim space, [`close`](Self::close) at shutdown. Not part of the stable API.
pub struct JournalLog<K, V> {
    core: Arc<Core>,
    checkpoint_bytes: u64,
    key_codec: std::sync::Arc<dyn Codec<K>>,
    value_codec: std::sync::Arc<dyn Codec<V>>,
    thread: Mutex<Option<thread::JoinHandle>>,
    /// Holds the directory's `flock` while open; dropped last.
    lock: Mutex<Option<File>>,
}

impl<K, V> std::fmt::Debug for JournalLog<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalLog")
            .field("dir", &self.core.dir)
            .field("mode", &self.core.mode)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

/// Runs a codec's `encode_into`, turning an error or a panic into [`JournalError::Codec`]
/// (and leaving `out` as it was).
fn encode_into<T: 'static>(
    codec: &dyn Codec<T>,
    value: &T,
    out: &mut Vec<u8>,
    what: &'static str,
) -> Result<(), JournalError> {
    let len = out.len();
    let message = match guard::catch(|| codec.encode_into(value, out)) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("the codec panicked: {panic}"),
    };
    out.truncate(len);
    Err(JournalError::Codec {
        what,
        file: None,
        offset: None,
        message,
    })
}

/// Runs a codec's `encode`, turning an error or a panic into [`JournalError::Codec`].
fn encode<T: 'static>(
    codec: &dyn Codec<T>,
    value: &T,
    what: &'static str,
) -> Result<Vec<u8>, JournalError> {
    let message = match guard::catch(|| codec.encode(value)) {
        Ok(Ok(bytes)) => return Ok(bytes),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("the codec panicked: {panic}"),
    };
    Err(JournalError::Codec {
        what,
        file: None,
        offset: None,
        message,
    })
}

/// Takes the directory's lock file, `flock`-exclusive: refused while another open file
/// description holds it, in this process or another.
fn lock_dir(dir: &std::path::Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io("open the lock file", &path, e))?;
    match fs4::FileExt::try_lock(&file) {
        Ok(()) => Ok(file),
        Err(fs4::TryLockError::WouldBlock) => Err(JournalError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs4::TryLockError::Error(e)) => Err(JournalError::io("lock", &path, e)),
    }
}

/// The segments found at open that hold records (kept until every shard has checkpointed);
/// empty ones (spares, segments whose records were never written) are removed, which changes
/// no replay.
fn keep_nonempty(found: Vec<replay::Found>) -> Result<Vec<SegmentFile>, JournalError> {
    let mut legacy_files = Vec::new();
    for f in found {
        if f.empty {
            fs::remove_file(&f.path).map_err(|e| JournalError::io("remove", &f.path, e))?;
        } else {
            legacy_files.push(SegmentFile {
                path: f.path,
                set: usize::MAX,
                used: f.used,
                allocated: f.len,
                seg: None,
            });
        }
    }
    Ok(legacy_files)
}

impl<K: 'static, V: 'static> JournalLog<K, V> {
    /// Locks the directory, replays every segment and starts the journal thread.
    ///
    /// Returns, per key, the journaled write with the highest version (a put with its value
    /// or a delete), and what replay did. `shards` is the cache's shard count: appends name
    /// a shard below it. The segments found here are reclaimed once every shard has
    /// completed a [`checkpoint`](Self::checkpoint), so the engine must take the replayed
    /// entries into its dirty sets before it begins any checkpoint.
    ///
    /// # Errors
    /// [`JournalError::Locked`] if another journal holds the directory;
    /// [`JournalError::Corrupt`] for damage other than a torn tail (unless salvaging);
    /// [`JournalError::Codec`] if a replayed key or value does not decode (unless
    /// salvaging); [`JournalError::Io`] for file system errors.
    ///
    /// # Panics
    /// If `shards` is 0 or above `u32::MAX`.
    pub fn open(cfg: Journal<K, V>, shards: usize) -> Result<(Self, Replayed<K, V>), JournalError> {
        let Journal {
            dir,
            key_codec,
            value_codec,
            sync: mode,
            segment_bytes,
            salvage,
            checkpoint_bytes,
        } = cfg;
        let lanes = if mode == JournalSync::EveryWrite {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_LANES))
        };
        let shard_count = shards
            .checked_mul(lanes)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|_| shards > 0)
            .unwrap_or_else(|| {
                panic!(
                    "a journal needs 1 to {} shards, got {shards}",
                    u32::MAX as usize / lanes
                )
            });
        fs::create_dir_all(&dir).map_err(|e| JournalError::io("create", &dir, e))?;
        let lock = lock_dir(&dir)?;
        let mut found = replay::list_segments(&dir)?;
        let replayed = replay::replay(&mut found, &*key_codec, &*value_codec, salvage)?;
        let s = &replayed.stats;
        tracing::info!(
            dir = %dir.display(),
            segments = s.segments,
            records = s.records,
            bytes = s.bytes,
            keys = s.keys,
            torn = s.torn_records,
            micros = s.duration.as_micros() as u64,
            "journal replayed"
        );
        let next_seq = found.iter().map(|f| f.seq + 1).max().unwrap_or(1);
        let legacy_files = keep_nonempty(found)?;
        let legacy_bytes = legacy_files.iter().map(|f| f.used).sum();
        let allocated = legacy_files.iter().map(|f| f.allocated).sum();
        let remaining = if legacy_files.is_empty() { 0 } else { shards };
        let core = Arc::new(Core {
            dir,
            mode,
            segment_bytes,
            shard_count,
            lanes,
            next_lane: std::sync::atomic::AtomicUsize::new(0),
            shards: (0..shard_count as usize)
                .map(|_| {
                    CachePadded::new(ShardSlot {
                        log: Mutex::new(ShardLog::default()),
                        bytes: AtomicU64::new(0),
                        records: AtomicU64::new(0),
                    })
                })
                .collect(),
            next_seq: AtomicU64::new(next_seq),
            unsynced: Mutex::new(Vec::new()),
            state: Mutex::new(SyncState::default()),
            to_thread: Condvar::new(),
            to_waiters: Condvar::new(),
            legacy: Mutex::new(Legacy {
                files: legacy_files,
                checkpointed: vec![false; shards],
                remaining,
            }),
            legacy_bytes: AtomicU64::new(legacy_bytes),
            allocated: AtomicU64::new(allocated),
            free: Mutex::new(Vec::new()),
            max_free: usize::try_from(checkpoint_bytes.div_ceil(segment_bytes))
                .unwrap_or(usize::MAX)
                .saturating_add(shard_count as usize),
            counters: Counters::default(),
            sync_micros: Mutex::new(new_histogram()),
            group_sizes: Mutex::new(new_histogram()),
            replay: replayed.stats,
            pool: SyncPool::new(if mode == JournalSync::Os {
                0
            } else {
                SYNC_HELPERS
            }),
        });
        let for_thread = Arc::clone(&core);
        let handle = thread::spawn_named("writebehind-journal".into(), move || for_thread.run())
            .map_err(|e| {
                core.pool.stop();
                JournalError::io("start the journal thread for", &core.dir, e)
            })?;
        Ok((
            JournalLog {
                core,
                checkpoint_bytes,
                key_codec,
                value_codec,
                thread: Mutex::new(Some(handle)),
                lock: Mutex::new(Some(lock)),
            },
            replayed,
        ))
    }

    /// Appends one record for `shard`: a put of `value`, or a delete when `value` is `None`,
    /// at `version`. Returns the position to pass to [`wait_synced`](Self::wait_synced).
    ///
    /// The engine calls it under the shard's lock, so it is cheap: the codecs encode, the
    /// bytes are copied into the shard's mapped segment, and no system call is made unless
    /// the segment is full and a new one must be created (normally prepared ahead by the
    /// journal thread). Records of one shard are in the order of their appends.
    ///
    /// # Errors
    /// [`JournalError::Codec`] if a codec fails or panics; [`JournalError::Io`] if a new
    /// segment cannot be created (a full disk, a read-only file system): the write must be
    /// refused, and nothing was journaled. [`JournalError::RecordTooLarge`] for a record
    /// above 4 GiB.
    ///
    /// # Panics
    /// If `shard` is not below the shard count given to [`open`](Self::open).
    pub fn append(
        &self,
        shard: usize,
        key: &K,
        value: Option<&V>,
        version: u64,
    ) -> Result<Lsn, JournalError> {
        let rec = self.encode(key, value)?;
        self.append_encoded(shard, &rec, version)
    }

    /// The first half of [`append`](Self::append): runs the codecs, so that the engine can do
    /// it before it takes the shard's lock.
    ///
    /// # Errors
    /// [`JournalError::Codec`] if a codec fails or panics.
    pub fn encode(&self, key: &K, value: Option<&V>) -> Result<Encoded, JournalError> {
        // The buffer is this thread's, reused: no allocation per write once it has grown.
        let mut rec = Encoded {
            kind: Kind::Delete,
            buf: ENCODE_BUF.with(std::cell::Cell::take),
            key_len: 0,
        };
        rec.buf.clear();
        encode_into(&*self.key_codec, key, &mut rec.buf, "encoding a key")?;
        rec.key_len = rec.buf.len();
        if let Some(v) = value {
            rec.kind = Kind::Put;
            encode_into(&*self.value_codec, v, &mut rec.buf, "encoding a value")?;
        }
        Ok(rec)
    }

    /// The second half of [`append`](Self::append): copies an encoded record, at `version`,
    /// into `shard`'s segment.
    ///
    /// # Errors
    /// As [`append`](Self::append), but for the codecs.
    pub fn append_encoded(
        &self,
        shard: usize,
        rec: &Encoded,
        version: u64,
    ) -> Result<Lsn, JournalError> {
        let (key, value) = rec.buf.split_at(rec.key_len);
        self.core.append(shard, rec.kind, version, key, value)
    }

    /// Reclaims the space of `shard`'s records the store no longer needs.
    ///
    /// [`begin_checkpoint`](Self::begin_checkpoint) then
    /// [`finish_checkpoint`](Self::finish_checkpoint): `live` is read only after the shard
    /// has moved its appends to a new segment, so a lazy iterator over the shard's dirty set
    /// sees every write journaled in the segments this call deletes. If `live` is a
    /// snapshot taken earlier, the engine must hold the shard's lock from the snapshot until
    /// this call returns (or call the two halves itself, see `begin_checkpoint`).
    ///
    /// `live` must hold every write of the shard that the store may not hold (key, value or
    /// `None` for a delete, version). Old segments are deleted only after the checkpoint is
    /// on stable storage, so a crash at any point replays a superset of the live set.
    ///
    /// # Errors
    /// As [`finish_checkpoint`](Self::finish_checkpoint).
    pub fn checkpoint(
        &self,
        shard: usize,
        live: impl Iterator<Item = (K, Option<V>, u64)>,
    ) -> Result<(), JournalError> {
        let ticket = self.begin_checkpoint(shard);
        self.finish_checkpoint(ticket, live)
    }

    /// First half of a checkpoint: seals the shard's segment, so records appended from now
    /// on go to a new one, and takes the list of the shard's older segments. Cheap (no
    /// system call); call it under the shard's lock together with taking the snapshot of
    /// the dirty set, then release the lock and call
    /// [`finish_checkpoint`](Self::finish_checkpoint) with that snapshot.
    ///
    /// # Panics
    /// If `shard` is not below the shard count given to [`open`](Self::open).
    pub fn begin_checkpoint(&self, shard: usize) -> CheckpointTicket {
        let mut old = Vec::new();
        for set in self.core.sets_of(shard) {
            let mut log = self.core.shards[set].log.lock();
            let Some(active) = log.active.take() else {
                old.append(&mut log.files);
                continue;
            };
            self.core.seal(&mut log, set, &active);
            old.append(&mut log.files);
            // The next append needs a new segment: the journal thread prepares a spare now,
            // so that the append takes it rather than create a file on a writer's path.
            if !log.spare_requested && log.spare.is_none() {
                log.spare_requested = true;
                drop(log);
                self.core.state.lock().spares.push(set);
                self.core.to_thread.notify_all();
            }
        }
        CheckpointTicket {
            core: Arc::clone(&self.core),
            shard,
            old,
        }
    }

    /// Second half of a checkpoint: writes `live` into new checkpoint segments, syncs them,
    /// then deletes the segments `ticket` took. Needs no lock of the engine; two
    /// checkpoints of one shard may overlap (each deletes only what it took).
    ///
    /// # Errors
    /// [`JournalError::Io`] if a checkpoint segment cannot be created or synced, and
    /// [`JournalError::Codec`] if a codec fails: then nothing is deleted (the old segments
    /// are reclaimed by a later checkpoint) and the partial checkpoint is removed.
    pub fn finish_checkpoint(
        &self,
        mut ticket: CheckpointTicket,
        live: impl Iterator<Item = (K, Option<V>, u64)>,
    ) -> Result<(), JournalError> {
        let core = &*self.core;
        let shard = ticket.shard;
        // The checkpoint's segments belong to the shard's first file set.
        let set = shard * core.lanes;
        let mut writer = CheckpointWriter {
            core,
            set,
            segments: Vec::new(),
        };
        let written = (|| {
            for (key, value, version) in live {
                let key = encode(&*self.key_codec, &key, "encoding a key")?;
                let value = match &value {
                    Some(v) => Some(encode(&*self.value_codec, v, "encoding a value")?),
                    None => None,
                };
                let kind = if value.is_some() {
                    Kind::Put
                } else {
                    Kind::Delete
                };
                writer.push(kind, version, &key, value.as_deref().unwrap_or(&[]))?;
            }
            writer.sync()
        })();
        let files = match written {
            Ok(files) => files,
            Err(e) => {
                writer.discard();
                return Err(e);
            }
        };
        let old = std::mem::take(&mut ticket.old);
        let mut kept = Vec::new();
        {
            let slot = &core.shards[set];
            let mut log = slot.log.lock();
            for f in &files {
                slot.add(f.used, 0);
            }
            log.files.splice(0..0, files);
        }
        for f in old {
            if let Err((f, e)) = core.reclaim(f) {
                tracing::warn!(file = %f.path.display(), error = %e, "journal: could not delete a reclaimed segment; a later checkpoint retries");
                kept.push(f);
            }
        }
        if !kept.is_empty() {
            core.shards[set].log.lock().files.splice(0..0, kept);
        }
        core.checkpointed(shard);
        core.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl<K, V> JournalLog<K, V> {
    /// `true` in `EveryWrite` mode, where a write waits for a sync of its record.
    #[cfg(feature = "tokio")]
    pub(crate) fn waits_for_sync(&self) -> bool {
        self.core.mode == JournalSync::EveryWrite
    }

    /// Waits until a sync covers `lsn`, in `EveryWrite` mode; returns at once in the others.
    ///
    /// Concurrent callers share syncs (group commit): the journal thread syncs every segment
    /// with new records in one round and wakes every waiter that round covered.
    ///
    /// # Errors
    /// [`JournalError::Io`] if the sync failed: the record is in the OS's page cache but may
    /// not be on stable storage. Appends to that shard move to a new segment.
    pub fn wait_synced(&self, lsn: &Lsn) -> Result<(), JournalError> {
        self.core.wait_synced(lsn)
    }

    /// The journal size at which the engine reclaims space
    /// ([`Journal::checkpoint_bytes`](super::Journal::checkpoint_bytes)).
    pub fn checkpoint_bytes(&self) -> u64 {
        self.checkpoint_bytes
    }

    /// Bytes the journal holds now: segment headers and records, reclaimable or not.
    pub fn bytes(&self) -> u64 {
        self.core.bytes()
    }

    /// Counters, sync latencies and group-commit sizes.
    pub fn stats(&self) -> JournalStats {
        self.core.stats()
    }

    /// Stops the journal thread after a final sync (`EveryWrite` and `Interval`), removes
    /// unused spare segments and releases the directory lock.
    ///
    /// # Errors
    /// [`JournalError::Io`] if the final sync failed: what was not synced is in the OS's
    /// page cache and reaches the disk when the OS writes it back.
    pub fn close(self) -> Result<(), JournalError> {
        self.shutdown(Stop::Sync)
    }

    /// [`close`](Self::close) for a journal the engine shares: later calls do nothing, and
    /// appends after it are refused by the engine (it is closed).
    ///
    /// # Errors
    /// As [`close`](Self::close).
    pub fn close_shared(&self) -> Result<(), JournalError> {
        self.shutdown(Stop::Sync)
    }

    /// Stops without syncing anything or removing anything, leaving the files as a process
    /// crash would (the page cache keeps every append). For crash tests.
    #[doc(hidden)]
    pub fn abandon(self) {
        let _ = self.shutdown(Stop::Abandon);
    }

    fn shutdown(&self, how: Stop) -> Result<(), JournalError> {
        let Some(handle) = self.thread.lock().take() else {
            return Ok(());
        };
        {
            let mut st = self.core.state.lock();
            st.stop = Some(how);
            self.core.to_thread.notify_all();
        }
        let joined = handle.join();
        self.core.pool.stop();
        let mut result = Ok(());
        if how == Stop::Sync {
            result = self.core.finish();
        }
        if joined.is_err() {
            result = Err(JournalError::io(
                "stop the journal thread for",
                &self.core.dir,
                io::Error::other("the journal thread panicked"),
            ));
        }
        if let Some(lock) = self.lock.lock().take() {
            // Explicitly: a child forked by another thread may hold a copy of the descriptor
            // until it execs, and closing ours would not release the lock until then.
            let _ = fs4::FileExt::unlock(&lock);
        }
        result
    }
}

impl<K, V> Drop for JournalLog<K, V> {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Stop::Sync) {
            tracing::error!(error = %e, "journal: closing on drop failed");
        }
    }
}

/// A record whose key and value went through the codecs, ready to append
/// ([`JournalLog::encode`]).
#[derive(Debug)]
pub struct Encoded {
    kind: Kind,
    /// The key's bytes, then the value's.
    buf: Vec<u8>,
    key_len: usize,
}

/// Buffers above this many bytes are not kept for reuse.
const KEEP_BUF: usize = 64 << 10;

std::thread_local! {
    /// A buffer [`JournalLog::encode`] reuses: taken while a record is encoded, given back
    /// when the record drops.
    static ENCODE_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for Encoded {
    fn drop(&mut self) {
        if self.buf.capacity() <= KEEP_BUF {
            let buf = std::mem::take(&mut self.buf);
            // `try_with`: a record dropped during the thread's exit has nowhere to go.
            let _ = ENCODE_BUF.try_with(|b| b.set(buf));
        }
    }
}

/// The first half of a checkpoint, from [`JournalLog::begin_checkpoint`]. Dropping it
/// without [`JournalLog::finish_checkpoint`] gives its segments back to the shard.
#[must_use = "a checkpoint reclaims nothing until finish_checkpoint"]
pub struct CheckpointTicket {
    core: Arc<Core>,
    shard: usize,
    old: Vec<SegmentFile>,
}

impl std::fmt::Debug for CheckpointTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointTicket")
            .field("shard", &self.shard)
            .field("segments", &self.old.len())
            .finish()
    }
}

impl Drop for CheckpointTicket {
    fn drop(&mut self) {
        if !self.old.is_empty() {
            let old = std::mem::take(&mut self.old);
            self.core.shards[self.shard * self.core.lanes]
                .log
                .lock()
                .files
                .splice(0..0, old);
        }
    }
}

/// Writes one checkpoint's records into segments of its own.
struct CheckpointWriter<'a> {
    core: &'a Core,
    set: usize,
    segments: Vec<Segment>,
}

impl CheckpointWriter<'_> {
    fn push(
        &mut self,
        kind: Kind,
        version: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), JournalError> {
        let size = self.core.record_size(key, value)?;
        let fits = self
            .segments
            .last()
            .is_some_and(|s| s.room() >= size as u64);
        if !fits {
            let seg = self
                .core
                .create_segment(self.set, SegmentKind::Checkpoint, size, false)?;
            self.segments.push(seg);
        }
        let seg = self
            .segments
            .last()
            .unwrap_or_else(|| unreachable!("pushed above"));
        // SAFETY: this writer owns the segment (no other thread has it) and `room()` was
        // checked against `size`, which `record_size` computed for these lengths.
        unsafe { seg.append(size, kind, version, key, value) };
        Ok(())
    }

    /// Syncs every segment and its watermark; returns them as sealed files.
    fn sync(&mut self) -> Result<Vec<SegmentFile>, JournalError> {
        for seg in &self.segments {
            seg.sync()
                .and_then(|_| seg.sync_header())
                .map_err(|e| JournalError::io("sync", &seg.path, e))?;
        }
        Ok(self
            .segments
            .drain(..)
            .map(|seg| SegmentFile {
                set: self.set,
                used: seg.written(),
                allocated: seg.capacity(),
                path: seg.path.clone(),
                seg: Some(Arc::new(seg)),
            })
            .collect())
    }

    /// Removes the segments written so far (the checkpoint failed).
    fn discard(&mut self) {
        for seg in self.segments.drain(..) {
            let _ = fs::remove_file(&seg.path);
            self.core
                .allocated
                .fetch_sub(seg.capacity(), Ordering::Relaxed);
        }
    }
}

impl Drop for CheckpointWriter<'_> {
    /// A checkpoint abandoned midway (its `live` iterator panicked) leaves no file behind;
    /// after `sync` there is nothing left to remove.
    fn drop(&mut self) {
        self.discard();
    }
}

impl Core {
    fn bytes(&self) -> u64 {
        self.legacy_bytes.load(Ordering::Relaxed)
            + self
                .shards
                .iter()
                .map(|s| s.bytes.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    fn record_size(&self, key: &[u8], value: &[u8]) -> Result<usize, JournalError> {
        if format::body_len(key.len(), value.len()).is_none() {
            return Err(JournalError::RecordTooLarge {
                bytes: key.len() as u64 + value.len() as u64,
            });
        }
        Ok(format::record_size(key.len(), value.len()))
    }

    /// A new segment for `shard` with room for a record of `size` bytes (see
    /// [`Segment::create`] for `prefault`).
    fn create_segment(
        &self,
        shard: usize,
        kind: SegmentKind,
        size: usize,
        prefault: bool,
    ) -> Result<Segment, JournalError> {
        let need = (HEADER_LEN + size) as u64;
        let bytes = self.segment_bytes.max(need.div_ceil(4096) * 4096);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let retired = self.free.lock().pop();
        if let Some(old) = retired {
            let capacity = old.capacity();
            if capacity >= need {
                match Segment::reuse(
                    old,
                    &self.dir,
                    shard as u32,
                    seq,
                    kind,
                    self.shard_count,
                    prefault,
                ) {
                    Ok(seg) => {
                        self.counters
                            .segments_reused
                            .fetch_add(1, Ordering::Relaxed);
                        return Ok(seg);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "journal: could not reuse a segment; creating one");
                    }
                }
            } else {
                let _ = fs::remove_file(&old.path);
            }
            self.allocated.fetch_sub(capacity, Ordering::Relaxed);
        }
        let seg = Segment::create(
            &self.dir,
            shard as u32,
            seq,
            kind,
            self.shard_count,
            bytes,
            prefault,
        )?;
        self.allocated.fetch_add(seg.capacity(), Ordering::Relaxed);
        self.counters
            .segments_created
            .fetch_add(1, Ordering::Relaxed);
        Ok(seg)
    }

    fn append(
        &self,
        shard: usize,
        kind: Kind,
        version: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Lsn, JournalError> {
        let size = self.record_size(key, value)?;
        let (set, mut log) = self.lane(shard);
        let slot = &self.shards[set];
        let usable = log
            .active
            .as_ref()
            .is_some_and(|s| s.room() >= size as u64 && !s.has_failed());
        if !usable {
            self.rotate(&mut log, set, size)?;
        }
        let seg = log
            .active
            .as_ref()
            .unwrap_or_else(|| unreachable!("rotated above"));
        // SAFETY: the shard's log lock is held, which makes this the segment's only
        // appender (an active segment is appended to only under it), and `room()` was
        // checked against `size` above or by `rotate`.
        let end = unsafe { seg.append(size, kind, version, key, value) };
        slot.add(size as u64, 1);
        let lsn = Lsn {
            seg: (self.mode == JournalSync::EveryWrite).then(|| Arc::clone(seg)),
            end,
        };
        if !log.spare_requested && log.spare.is_none() && end * 2 > seg.capacity() {
            log.spare_requested = true;
            drop(log);
            self.state.lock().spares.push(set);
            self.to_thread.notify_all();
        }
        Ok(lsn)
    }

    /// The file set of `shard` this thread appends to, locked: its lane. Threads take lanes
    /// in turn at their first append to this journal, so as long as there are no more
    /// appending threads than lanes, no two share one.
    fn lane(&self, shard: usize) -> (usize, MutexGuard<'_, ShardLog>) {
        let base = shard * self.lanes;
        if self.lanes == 1 {
            return (base, self.shards[base].log.lock());
        }
        let me = std::ptr::from_ref(self) as usize;
        let lane = LANE.with(|l| match l.get() {
            (journal, lane) if journal == me => lane,
            _ => {
                let lane = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes;
                l.set((me, lane));
                lane
            }
        });
        let set = base + lane;
        (set, self.shards[set].log.lock())
    }

    /// The file sets of `shard`.
    fn sets_of(&self, shard: usize) -> std::ops::Range<usize> {
        shard * self.lanes..(shard + 1) * self.lanes
    }

    /// Seals the active segment (if any) and makes a new one active.
    fn rotate(&self, log: &mut ShardLog, shard: usize, size: usize) -> Result<(), JournalError> {
        if let Some(old) = log.active.take() {
            self.seal(log, shard, &old);
        }
        let seg = match log.spare.take() {
            Some(spare) if spare.room() >= size as u64 => spare,
            other => {
                if let Some(unfit) = other {
                    let _ = fs::remove_file(&unfit.path);
                    self.allocated
                        .fetch_sub(unfit.capacity(), Ordering::Relaxed);
                }
                self.create_segment(shard, SegmentKind::Log, size, false)?
            }
        };
        self.activate(log, shard, seg);
        Ok(())
    }

    /// Makes `seg` the shard's active segment (the shard's log lock is held).
    fn activate(&self, log: &mut ShardLog, shard: usize, seg: Segment) {
        self.shards[shard].add(HEADER_LEN as u64, 0);
        let seg = Arc::new(seg);
        if self.mode != JournalSync::Os {
            self.unsynced.lock().push(Arc::clone(&seg));
        }
        log.active = Some(seg);
        log.spare_requested = false;
    }

    /// Moves a segment out of appending into the shard's sealed files.
    fn seal(&self, log: &mut ShardLog, set: usize, seg: &Arc<Segment>) {
        seg.seal();
        log.files.push(SegmentFile {
            path: seg.path.clone(),
            set,
            used: seg.written(),
            allocated: seg.capacity(),
            seg: Some(Arc::clone(seg)),
        });
    }

    /// Takes a segment a checkpoint made obsolete out of the journal: kept for reuse
    /// ([`Segment::retire`]) while the pool has room and nothing else holds it (a waiter's
    /// [`Lsn`], the sync list), else deleted.
    ///
    /// # Errors
    /// The file could not be deleted: it is handed back to be kept.
    fn reclaim(&self, mut f: SegmentFile) -> Result<(), (SegmentFile, io::Error)> {
        if let Some(seg) = f.seg.take() {
            let room = self.free.lock().len() < self.max_free;
            if room && !seg.has_failed() {
                if let Ok(seg) = Arc::try_unwrap(seg) {
                    match seg.retire(&self.dir) {
                        Ok(retired) => {
                            self.forget(&f, false);
                            self.free.lock().push(retired);
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::debug!(file = %f.path.display(), error = %e, "journal: could not keep a reclaimed segment for reuse; deleting it");
                        }
                    }
                }
            }
        }
        match fs::remove_file(&f.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err((f, e)),
        }
        self.forget(&f, true);
        Ok(())
    }

    /// Accounts for a segment that left the journal: its bytes, and its allocation when
    /// its file was `deleted` (a segment kept for reuse keeps it).
    fn forget(&self, f: &SegmentFile, deleted: bool) {
        let slot = &self.shards[f.set];
        let _log = slot.log.lock();
        slot.bytes.store(
            slot.bytes.load(Ordering::Relaxed) - f.used,
            Ordering::Relaxed,
        );
        if deleted {
            self.allocated.fetch_sub(f.allocated, Ordering::Relaxed);
        }
    }

    /// A checkpoint of `shard` completed: once every shard has one, the segments found at
    /// open hold nothing a checkpoint did not copy, and go.
    fn checkpointed(&self, shard: usize) {
        let files = {
            let mut legacy = self.legacy.lock();
            if legacy.remaining == 0 || legacy.checkpointed[shard] {
                return;
            }
            legacy.checkpointed[shard] = true;
            legacy.remaining -= 1;
            if legacy.remaining > 0 {
                return;
            }
            std::mem::take(&mut legacy.files)
        };
        for f in files {
            match fs::remove_file(&f.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.path.display(), error = %e, "journal: could not delete a replayed segment");
                    continue;
                }
            }
            self.legacy_bytes.fetch_sub(f.used, Ordering::Relaxed);
            self.allocated.fetch_sub(f.allocated, Ordering::Relaxed);
        }
    }

    fn wait_synced(&self, lsn: &Lsn) -> Result<(), JournalError> {
        let Some(seg) = &lsn.seg else {
            return Ok(());
        };
        if seg.synced() >= lsn.end {
            return Ok(());
        }
        let mut st = self.state.lock();
        loop {
            if seg.synced() >= lsn.end {
                return Ok(());
            }
            if seg.has_failed() {
                return Err(seg.failure());
            }
            if st.exited {
                return Err(JournalError::io(
                    "sync",
                    &seg.path,
                    io::Error::other("the journal was closed before this record was synced"),
                ));
            }
            if !st.requested {
                st.requested = true;
                self.to_thread.notify_all();
            }
            self.to_waiters.wait_for(&mut st, POLL);
        }
    }

    /// The journal thread: syncs per the mode, prepares spare segments.
    fn run(&self) {
        let _scope = guard::EngineScope::enter();
        let interval = match self.mode {
            JournalSync::Interval(d) => Some(d.max(Duration::from_micros(100))),
            _ => None,
        };
        let mut last_round = Instant::now();
        loop {
            let (stop, spares, requested) = {
                let mut st = self.state.lock();
                loop {
                    let due = interval.is_some_and(|d| last_round.elapsed() >= d);
                    if st.stop.is_some() || st.requested || !st.spares.is_empty() || due {
                        break;
                    }
                    let wait = interval.map_or(POLL, |d| d.saturating_sub(last_round.elapsed()));
                    self.to_thread.wait_for(&mut st, wait.min(POLL));
                }
                let requested = std::mem::take(&mut st.requested);
                (st.stop, std::mem::take(&mut st.spares), requested)
            };
            if stop == Some(Stop::Abandon) {
                break;
            }
            // Syncs first: a writer may be waiting for one; a spare is needed later.
            let due = interval.is_some_and(|d| last_round.elapsed() >= d);
            if requested || due || stop.is_some() {
                last_round = Instant::now();
                if self.mode != JournalSync::Os {
                    self.sync_round();
                }
                let _st = self.state.lock();
                self.to_waiters.notify_all();
            }
            if stop.is_some() {
                break;
            }
            for shard in spares {
                self.make_spare(shard);
            }
        }
        let mut st = self.state.lock();
        st.exited = true;
        self.to_waiters.notify_all();
    }

    fn make_spare(&self, shard: usize) {
        match self.create_segment(shard, SegmentKind::Log, 0, true) {
            Ok(seg) => {
                let mut log = self.shards[shard].log.lock();
                if log.spare.is_none() {
                    log.spare = Some(seg);
                } else {
                    drop(log);
                    let _ = fs::remove_file(&seg.path);
                    self.allocated.fetch_sub(seg.capacity(), Ordering::Relaxed);
                }
            }
            Err(e) => {
                // The next rotation creates one itself and reports the error to its writer.
                tracing::debug!(error = %e, "journal: could not prepare a spare segment");
                self.shards[shard].log.lock().spare_requested = false;
            }
        }
    }

    /// Syncs every segment with new records, then wakes the waiters.
    fn sync_round(&self) {
        let segs: Vec<Arc<Segment>> = self
            .unsynced
            .lock()
            .iter()
            .filter(|s| !s.has_failed() && s.written() > s.synced())
            .cloned()
            .collect();
        let mut covered = 0;
        for (seg, result) in self.pool.sync_all(segs) {
            match result {
                Ok(Some(s)) => {
                    covered += s.records;
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    let _ = self.sync_micros.lock().record(s.micros.max(1));
                }
                Ok(None) => {}
                Err(e) => {
                    self.counters.sync_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(file = %seg.path.display(), error = %e, "journal: sync failed; the shard moves to a new segment");
                }
            }
        }
        if covered > 0 {
            self.counters.sync_rounds.fetch_add(1, Ordering::Relaxed);
            let _ = self.group_sizes.lock().record(covered);
        }
        self.unsynced
            .lock()
            .retain(|s| !(s.is_sealed() && (s.has_failed() || s.synced() >= s.written())));
    }

    /// After the thread stopped with a final sync: make the watermarks durable, remove
    /// spares. The first failure is returned; the rest is still done.
    fn finish(&self) -> Result<(), JournalError> {
        let mut result = Ok(());
        for seg in self.unsynced.lock().drain(..) {
            if seg.has_failed() {
                if result.is_ok() {
                    result = Err(seg.failure());
                }
            } else if let Err(e) = seg.sync_header() {
                if result.is_ok() {
                    result = Err(JournalError::io("sync", &seg.path, e));
                }
            }
        }
        for old in self.free.lock().drain(..) {
            let _ = fs::remove_file(&old.path);
            self.allocated.fetch_sub(old.capacity(), Ordering::Relaxed);
        }
        for slot in self.shards.iter() {
            let spare = slot.log.lock().spare.take();
            if let Some(spare) = spare {
                let _ = fs::remove_file(&spare.path);
                self.allocated
                    .fetch_sub(spare.capacity(), Ordering::Relaxed);
            }
        }
        result
    }

    fn stats(&self) -> JournalStats {
        let mut s = self.counters.snapshot();
        s.bytes = self.bytes();
        s.allocated_bytes = self.allocated.load(Ordering::Relaxed);
        s.records = self
            .shards
            .iter()
            .map(|x| x.records.load(Ordering::Relaxed))
            .sum();
        s.sync_micros = crate::Distribution::of(&self.sync_micros.lock());
        s.group_commit = crate::Distribution::of(&self.group_sizes.lock());
        s.replay = self.replay;
        s
    }
}
