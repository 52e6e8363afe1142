//! [`Segment`]: one preallocated, memory-mapped segment file being appended to.
//!
//! A segment is created whole: a temporary file is allocated to its full size (`fallocate`,
//! so a full disk fails here and never as `SIGBUS` on a later store into the mapping), its
//! header is written and synced, and only then is it renamed into place and the directory
//! synced. A visible segment therefore always has a valid header and all of its blocks.
//!
//! Appends copy bytes into the mapping (a `memcpy` into the page cache: no system call) and
//! publish the new end in `written`. A sync (`msync`) covers everything up to a `written`
//! it read, and then records that end as the segment's watermark in the header, which the
//! next sync makes durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use memmap2::{MmapOptions, MmapRaw};

use super::error::JournalError;
use super::format::{self, SegmentKind, HEADER_LEN, MAX_SEGMENT_BYTES, WATERMARK_AT};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::Mutex;

/// The file name of a segment: `<shard>-<sequence>.<log|ckpt>`, sequence in hex so names
/// sort by age within a shard.
pub(crate) fn file_name(shard: u32, seq: u64, kind: SegmentKind) -> String {
    format!("{shard:05}-{seq:016x}.{}", kind.suffix())
}

/// Parses a [`file_name`]; `None` for any other file.
pub(crate) fn parse_file_name(name: &str) -> Option<(u32, u64, SegmentKind)> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let kind = match suffix {
        "log" => SegmentKind::Log,
        "ckpt" => SegmentKind::Checkpoint,
        _ => return None,
    };
    let (shard, seq) = stem.split_once('-')?;
    if shard.is_empty() || !shard.bytes().all(|b| b.is_ascii_digit()) || seq.len() != 16 {
        return None;
    }
    Some((
        shard.parse().ok()?,
        u64::from_str_radix(seq, 16).ok()?,
        kind,
    ))
}

/// Prefix of the temporary files a segment is built in before it is renamed into place.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// Syncs a directory, so that the entries created or renamed in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// A segment open for appending (or, for a checkpoint, for its one writer).
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) seq: u64,
    map: MmapRaw,
    /// Kept open for the mapping's lifetime (and for the allocation it holds).
    file: File,
    /// End of the complete records. Written only by the one appender (the shard's log lock
    /// or the checkpoint that owns the segment), with `Release` after the bytes are in place.
    written: AtomicU64,
    /// Records appended (stats: how many a sync covered).
    records: AtomicU64,
    /// End of the records a completed sync covered.
    synced: AtomicU64,
    synced_records: AtomicU64,
    /// No more appends: the shard moved to another segment.
    sealed: AtomicBool,
    /// A sync failed: what it covered may not be durable, so no waiter on this segment is
    /// told otherwise, and the shard moves its appends elsewhere.
    failed: AtomicBool,
    failure: Mutex<Option<(io::ErrorKind, String)>>,
    /// Serializes writes of the header's watermark word; holds the last value written.
    watermark: Mutex<u64>,
    /// End of the pages whose mapping [`sync`](Self::sync) dropped (the header's page is
    /// kept).
    unmapped: AtomicU64,
}

/// A segment file taken out of the journal for reuse ([`Segment::retire`]).
pub(crate) struct Retired {
    /// Its temporary name.
    pub(crate) path: PathBuf,
    map: MmapRaw,
    file: File,
}

impl Retired {
    /// Bytes the file holds (its allocation).
    pub(crate) fn capacity(&self) -> u64 {
        self.map.len() as u64
    }
}

/// What one [`Segment::sync`] did.
pub(crate) struct Synced {
    /// Records this sync made durable.
    pub(crate) records: u64,
    /// How long the `msync` took.
    pub(crate) micros: u64,
}

impl Segment {
    /// Creates, allocates, syncs and maps a new segment of `bytes` bytes. With `prefault`
    /// (spares, made by the journal thread ahead of need) every page of the mapping is
    /// faulted in for writing now, so appends into it take no page fault: about half the
    /// cost of an append into a fresh mapping. The pages are then dirty zeros that the OS
    /// writes back in the background.
    ///
    /// # Errors
    /// [`JournalError::Io`] when the file cannot be created or allocated (a full disk shows
    /// up here) or synced; no file is left behind then.
    pub(crate) fn create(
        dir: &Path,
        shard: u32,
        seq: u64,
        kind: SegmentKind,
        shards: u32,
        bytes: u64,
        prefault: bool,
    ) -> Result<Segment, JournalError> {
        let bytes = bytes.clamp(HEADER_LEN as u64, MAX_SEGMENT_BYTES);
        let len = usize::try_from(bytes).map_err(|_| {
            JournalError::io(
                "map",
                dir,
                io::Error::new(io::ErrorKind::InvalidInput, "segment larger than memory"),
            )
        })?;
        let name = file_name(shard, seq, kind);
        let path = dir.join(&name);
        let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
        let built = (|| {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| JournalError::io("create", &tmp, e))?;
            fs4::FileExt::allocate(&file, bytes)
                .map_err(|e| JournalError::io("allocate", &tmp, e))?;
            file.write_all(&format::encode_header(shard, seq, kind, shards))
                .map_err(|e| JournalError::io("write the header of", &tmp, e))?;
            file.sync_all()
                .map_err(|e| JournalError::io("sync", &tmp, e))?;
            Ok::<File, JournalError>(file)
        })();
        let file = match built {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(JournalError::io("rename into place", &path, e));
        }
        let undo = |e: JournalError| {
            let _ = fs::remove_file(&path);
            e
        };
        sync_dir(dir).map_err(|e| undo(JournalError::io("sync the directory", dir, e)))?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| undo(JournalError::io("map", &path, e)))?;
        Ok(Segment::mapped(path, seq, map, file, prefault))
    }

    /// A segment over `map`, whose header is written, with no records yet; with `prefault`,
    /// every page of the mapping is faulted in for writing first.
    fn mapped(path: PathBuf, seq: u64, map: MmapRaw, file: File, prefault: bool) -> Segment {
        if prefault {
            // Best effort: kernels before 5.14 do not know the advice; appends then fault
            // pages in as they reach them.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::PopulateWrite);
        }
        Segment {
            path,
            seq,
            map,
            file,
            written: AtomicU64::new(HEADER_LEN as u64),
            records: AtomicU64::new(0),
            synced: AtomicU64::new(HEADER_LEN as u64),
            synced_records: AtomicU64::new(0),
            sealed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            watermark: Mutex::new(0),
            unmapped: AtomicU64::new(0),
        }
    }

    /// Takes a segment whose records a checkpoint made obsolete out of the journal's view:
    /// renamed to a temporary name (which replay never reads, and which opening a journal
    /// deletes), with its file, allocation and mapping kept for [`reuse`](Self::reuse).
    ///
    /// # Errors
    /// The rename's error; the segment is dropped and its file is left where it was.
    pub(crate) fn retire(self, dir: &Path) -> io::Result<Retired> {
        let path = dir.join(format!("{TMP_PREFIX}free-{:016x}", self.seq));
        fs::rename(&self.path, &path)?;
        Ok(Retired {
            path,
            map: self.map,
            file: self.file,
        })
    }

    /// Makes a retired segment file segment `seq` of `shard`: its header is rewritten and
    /// synced, then it is renamed into place and the directory synced, as
    /// [`create`](Self::create) does for a new file. The bytes of its earlier use stay past
    /// the header: replay tells them apart by their records' segment tag
    /// ([`format::segment_tag`]). Its pages are in the page cache already, and with
    /// `prefault` mapped for writing, so appends take no page fault and allocate nothing.
    ///
    /// # Errors
    /// [`JournalError::Io`] if the header cannot be synced or the file renamed; the file
    /// is deleted then.
    pub(crate) fn reuse(
        old: Retired,
        dir: &Path,
        shard: u32,
        seq: u64,
        kind: SegmentKind,
        shards: u32,
        prefault: bool,
    ) -> Result<Segment, JournalError> {
        let Retired {
            path: tmp,
            map,
            file,
        } = old;
        let header = format::encode_header(shard, seq, kind, shards);
        // SAFETY: the mapping is at least `HEADER_LEN` bytes (creation clamps it) and lives
        // as long as `map`; a retired segment has no appender, no syncer and no reader in
        // this process (it left every list when it was retired), so nothing else touches it.
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), map.as_mut_ptr(), HEADER_LEN);
        }
        let path = dir.join(file_name(shard, seq, kind));
        let placed = map
            .flush_range(0, HEADER_LEN)
            .map_err(|e| JournalError::io("sync the header of", &tmp, e))
            .and_then(|()| {
                fs::rename(&tmp, &path).map_err(|e| JournalError::io("rename into place", &path, e))
            });
        if let Err(e) = placed {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = sync_dir(dir) {
            let _ = fs::remove_file(&path);
            return Err(JournalError::io("sync the directory", dir, e));
        }
        Ok(Segment::mapped(path, seq, map, file, prefault))
    }

    /// Bytes the segment file holds (its allocation).
    pub(crate) fn capacity(&self) -> u64 {
        self.map.len() as u64
    }

    /// End of the complete records.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Bytes still free for records.
    pub(crate) fn room(&self) -> u64 {
        self.capacity() - self.written.load(Ordering::Relaxed)
    }

    pub(crate) fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    pub(crate) fn seal(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The error a failed sync of this segment reported.
    pub(crate) fn failure(&self) -> JournalError {
        let (kind, msg) = self
            .failure
            .lock()
            .clone()
            .unwrap_or((io::ErrorKind::Other, "an earlier sync failed".into()));
        JournalError::io("sync", &self.path, io::Error::new(kind, msg))
    }

    fn fail(&self, e: &io::Error) {
        *self.failure.lock() = Some((e.kind(), e.to_string()));
        self.failed.store(true, Ordering::Release);
    }

    /// Writes one record at the end and publishes it; returns the new end.
    ///
    /// # Safety
    /// The caller is the segment's only appender for the duration of the call (it holds the
    /// shard's log lock, or owns a checkpoint segment no other thread appends to), and
    /// `size == format::record_size(key.len(), value.len()) <= self.room()`.
    pub(crate) unsafe fn append(
        &self,
        size: usize,
        kind: format::Kind,
        version: u64,
        key: &[u8],
        value: &[u8],
    ) -> u64 {
        let at = self.written.load(Ordering::Relaxed);
        debug_assert!(size as u64 <= self.capacity() - at);
        // SAFETY: (1) `at + size <= capacity` (the caller checked `room()`), so the range
        // lies inside the mapping, which lives as long as `self`. (2) Bytes at and past
        // `written` are touched by no one else: the caller is the only appender, the sync
        // thread writes only the header's watermark word (below `HEADER_LEN <= at`) and
        // never reads record bytes, and replay maps its own read-only views before any
        // appender exists. (3) The directory lock keeps other processes from the file, so
        // it is not truncated under the mapping.
        let out =
            unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(at as usize), size) };
        format::encode_record(
            out,
            kind,
            format::segment_tag(self.seq),
            version,
            key,
            value,
        );
        let end = at + size as u64;
        // The only appender: a load and a store, no atomic add.
        self.records
            .store(self.records.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.written.store(end, Ordering::Release);
        end
    }

    /// Syncs what is written (`msync`) and records the synced end as the watermark.
    /// `Ok(None)` when nothing was new. A failure marks the segment failed.
    pub(crate) fn sync(&self) -> io::Result<Option<Synced>> {
        let end = self.written.load(Ordering::Acquire);
        let records = self.records.load(Ordering::Acquire);
        if end <= self.synced.load(Ordering::Acquire) {
            return Ok(None);
        }
        let start = Instant::now();
        self.unmap_below(end);
        // From 0: the header page carries the previous watermark, made durable here.
        if let Err(e) = self.map.flush_range(0, end as usize) {
            self.fail(&e);
            return Err(e);
        }
        let micros = start.elapsed().as_micros() as u64;
        self.synced.store(end, Ordering::Release);
        let before = self.synced_records.swap(records, Ordering::AcqRel);
        self.set_watermark(end);
        Ok(Some(Synced {
            records: records.saturating_sub(before),
            micros,
        }))
    }

    /// Drops this process's mapping of the whole pages below `end` (past the header's page)
    /// before a sync writes them back. Writing back a page that is mapped writable makes
    /// the kernel write-protect it, one TLB shootdown (an interrupt of every CPU running
    /// this process) per page; writing back pages that are not mapped needs none, so the
    /// sync's cost no longer grows with the appending threads'. The bytes stay in the page
    /// cache; a later use of the file maps them again.
    fn unmap_below(&self, end: u64) {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let Ok(page) = u64::try_from(page) else {
                return;
            };
            if page == 0 {
                return;
            }
            let from = self.unmapped.load(Ordering::Relaxed).max(page);
            let to = end / page * page;
            if to <= from {
                return;
            }
            // SAFETY: `from..to` is whole pages inside the mapping (`to <= end <= capacity`,
            // `from` is a multiple of the page size at or above the first page), and no
            // reference into it exists: the appender writes only at or past `written`,
            // which is at or past `end`; the watermark word is in the first page, which is
            // excluded; replay maps the file on its own. The mapping is `MAP_SHARED` over a
            // file, so `MADV_DONTNEED` only drops the page table entries (a dirty page's
            // dirty state goes to the page cache): the bytes are unchanged, and any later
            // access maps them again from the page cache.
            let dropped = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    from as usize,
                    (to - from) as usize,
                )
            };
            if dropped.is_ok() {
                self.unmapped.fetch_max(to, Ordering::Relaxed);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = end;
    }

    /// Makes the last watermark durable (a one-page `msync`), at close and after a
    /// checkpoint.
    pub(crate) fn sync_header(&self) -> io::Result<()> {
        self.map.flush_range(0, HEADER_LEN)
    }

    /// Writes the watermark word: records up to `end` are on stable storage.
    fn set_watermark(&self, end: u64) {
        let mut last = self.watermark.lock();
        if *last >= end {
            return;
        }
        let word = format::encode_watermark(self.seq, end).to_le_bytes();
        // SAFETY: the mapping is at least `HEADER_LEN` bytes (creation clamps it) and lives
        // as long as `self`; the word's 8 bytes are written only here, under the `watermark`
        // lock, and read by no one in this process. The base of a mapping is page-aligned,
        // so the 8-aligned word is one aligned store: a crash leaves the old or the new one.
        unsafe {
            std::ptr::write_volatile(
                self.map.as_mut_ptr().add(WATERMARK_AT).cast::<[u8; 8]>(),
                word,
            );
        }
        *last = end;
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("written", &self.written())
            .field("synced", &self.synced())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in [SegmentKind::Log, SegmentKind::Checkpoint] {
            let n = file_name(12, 0xabc, kind);
            assert_eq!(parse_file_name(&n), Some((12, 0xabc, kind)));
        }
        assert_eq!(parse_file_name("LOCK"), None);
        assert_eq!(parse_file_name("00001-00000000000000zz.log"), None);
        assert_eq!(parse_file_name(".tmp-00001-0000000000000001.log"), None);
    }

    #[test]
    fn create_append_sync() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 2, 7, SegmentKind::Log, 4, 8192, true).unwrap();
        assert_eq!(seg.capacity(), 8192);
        assert!(!dir
            .path()
            .join(format!("{TMP_PREFIX}{}", file_name(2, 7, SegmentKind::Log)))
            .exists());
        let size = format::record_size(1, 2);
        // SAFETY: this test is the only appender and the record fits.
        let end = unsafe { seg.append(size, format::Kind::Put, 1, b"k", b"vv") };
        assert_eq!(end, (HEADER_LEN + size) as u64);
        let s = seg.sync().unwrap().unwrap();
        assert_eq!(s.records, 1);
        assert!(seg.sync().unwrap().is_none());
        seg.sync_header().unwrap();
        let bytes = fs::read(&seg.path).unwrap();
        assert_eq!(bytes.len(), 8192);
        let h = format::decode_header(&bytes).unwrap();
        assert_eq!((h.shard, h.seq, h.watermark), (2, 7, end));
        match format::read_record(&bytes, HEADER_LEN, format::segment_tag(7)) {
            format::Read::Record(r) => {
                assert_eq!((r.key, r.value, r.version), (&b"k"[..], &b"vv"[..], 1))
            }
            other => panic!("{other:?}"),
        }
    }
}
