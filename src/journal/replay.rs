//! Replay: one streaming pass over every segment, keeping the highest version per key.
//!
//! Each segment is read front to back. Where a record does not check, the rest of the
//! segment decides what it is (see "Torn tails and corruption" in the [module
//! docs](super)):
//!
//! * below the header's watermark (synced data): corruption;
//! * no valid record after it: a torn tail, dropped;
//! * a valid record after it, with an all-zero 4 KiB block or a record of the file's earlier
//!   use in between: a page the OS had not written back when the power went (only possible
//!   past the watermark): skipped, and the records after it are kept;
//! * a valid record after it and neither in between: corruption.
//!
//! A record of the file's earlier use (a reused segment, [`Read::Stale`]) past the watermark
//! ends the segment's records, unless a valid record follows it (the lost page again).
//!
//! Corruption is [`JournalError::Corrupt`], or with salvage, skipped up to the next valid
//! record and counted.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::Mmap;

use super::error::JournalError;
use super::format::{self, Kind, Read, ALIGN, HEADER_LEN};
use super::segment::{parse_file_name, TMP_PREFIX};
use crate::guard;
use crate::stores::Codec;

/// What replay did, reported by [`JournalStats::replay`](super::JournalStats::replay).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayStats {
    /// Segment files read.
    pub segments: u64,
    /// Valid records read (every version of every key).
    pub records: u64,
    /// Bytes of segments read, up to the end of their records.
    pub bytes: u64,
    /// Keys replayed (the highest version of each).
    pub keys: u64,
    /// The highest version of any record read: new versions must start above it.
    pub max_version: u64,
    /// Torn last records dropped (a crash hit while one was being written).
    pub torn_records: u64,
    /// Bytes of unsynced regions skipped because the OS had not written them back before a
    /// power loss, with readable records after them.
    pub hole_bytes: u64,
    /// Bytes skipped over damaged records (`salvage(true)` only).
    pub salvaged_bytes: u64,
    /// Segment files skipped whole for a damaged header (`salvage(true)` only).
    pub salvaged_files: u64,
    /// Keys dropped because their latest record would not decode (`salvage(true)` only).
    pub undecodable_keys: u64,
    /// How long replay took.
    pub duration: Duration,
}

/// One key as replayed: its latest journaled write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayedEntry<K, V> {
    /// The key.
    pub key: K,
    /// The value of its latest write, `None` if that was a delete.
    pub value: Option<V>,
    /// The version of that write.
    pub version: u64,
    /// The journal file set that wrote it (from its segment's header; shard counts may differ
    /// between runs).
    pub shard: usize,
}

/// What [`JournalLog::open`](super::JournalLog::open) found.
#[derive(Debug)]
pub struct Replayed<K, V> {
    /// One entry per key.
    pub entries: Vec<ReplayedEntry<K, V>>,
    /// Counts, bytes and time.
    pub stats: ReplayStats,
}

/// A segment file found in the journal directory.
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub(crate) path: PathBuf,
    pub(crate) seq: u64,
    pub(crate) len: u64,
    /// Set by the scan: no record in it.
    pub(crate) empty: bool,
    /// Set by the scan: end of its records.
    pub(crate) used: u64,
}

/// Lists the segment files of `dir` by sequence number, deleting leftover temporary files
/// (segments whose creation did not finish; they were never renamed into place).
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<Found>, JournalError> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| JournalError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name.starts_with(TMP_PREFIX) {
            fs::remove_file(&path).map_err(|e| JournalError::io("remove", &path, e))?;
            continue;
        }
        let Some((_, seq, _)) = parse_file_name(name) else {
            continue;
        };
        let len = entry
            .metadata()
            .map_err(|e| JournalError::io("stat", &path, e))?
            .len();
        found.push(Found {
            path,
            seq,
            len,
            empty: false,
            used: 0,
        });
    }
    found.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.path.cmp(&b.path)));
    Ok(found)
}

/// How one segment read.
#[derive(Default, Debug)]
struct SegmentScan {
    records: u64,
    end: u64,
    torn: bool,
    hole_bytes: u64,
    salvaged_bytes: u64,
    skipped_file: bool,
}

/// Offset of the first valid record at or after `from` (8-aligned), before `limit`.
fn resync(seg: &[u8], from: usize, limit: usize, tag: u32) -> Option<usize> {
    let mut q = format::align_up(from);
    while q < limit {
        if matches!(format::read_record(seg, q, tag), Read::Record(_)) {
            return Some(q);
        }
        q += ALIGN;
    }
    None
}

/// End of the last non-zero byte of `seg` (0 if all zero).
fn last_nonzero_end(seg: &[u8]) -> usize {
    seg.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// `true` if `from..to` holds what a page the OS never wrote back leaves: a 4 KiB-aligned,
/// all-zero 4 KiB block overlapping it (a new file's page), or a record of the file's
/// earlier use starting in it (a reused file's page).
fn lost_page_between(seg: &[u8], from: usize, to: usize, tag: u32) -> bool {
    const BLOCK: usize = 4096;
    let mut b = from / BLOCK * BLOCK;
    while b < to && b + BLOCK <= seg.len() {
        if format::is_zero(&seg[b..b + BLOCK]) {
            return true;
        }
        b += BLOCK;
    }
    let mut q = format::align_up(from);
    while q < to {
        if matches!(format::read_record(seg, q, tag), Read::Stale { .. }) {
            return true;
        }
        q += ALIGN;
    }
    false
}

/// Salvage: skips the damaged bytes at `p` up to `next`, the next valid record (or, with
/// none, up to `limit`, the end of the segment's bytes), counting them; returns where reading
/// goes on, if anywhere.
fn salvage_past(
    out: &mut SegmentScan,
    file: &Path,
    p: usize,
    next: Option<usize>,
    limit: usize,
    reason: &str,
) -> Option<usize> {
    let resume = next.unwrap_or(limit.max(p));
    tracing::warn!(file = %file.display(), offset = p, resumes_at = resume, %reason, "journal: salvaging past a damaged record");
    out.salvaged_bytes += (resume - p) as u64;
    next
}

/// Reads one segment, calling `emit(offset, shard, record)` for each valid record (`shard`
/// from the segment's header).
fn scan_segment<'a>(
    seg: &'a [u8],
    file: &Path,
    salvage: bool,
    mut emit: impl FnMut(usize, u32, format::RecordRef<'a>),
) -> Result<SegmentScan, JournalError> {
    let corrupt = |offset: usize, reason: String| JournalError::Corrupt {
        file: file.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let header = match format::decode_header(seg) {
        Ok(h) => h,
        Err(reason) if salvage => {
            tracing::warn!(file = %file.display(), %reason, "journal: skipping a segment whose header is damaged");
            return Ok(SegmentScan {
                skipped_file: true,
                ..SegmentScan::default()
            });
        }
        Err(reason) => return Err(corrupt(0, reason)),
    };
    let watermark = usize::try_from(header.watermark).unwrap_or(usize::MAX);
    let tag = format::segment_tag(header.seq);
    let mut out = SegmentScan::default();
    let mut limit = None;
    let mut p = HEADER_LEN;
    loop {
        match format::read_record(seg, p, tag) {
            Read::Record(r) => {
                emit(p, header.shard, r);
                out.records += 1;
                p += r.size;
            }
            Read::End if p >= watermark => break,
            Read::End => {
                let reason = format!(
                    "the records end before the synced watermark (byte {watermark}): the file \
                     was truncated or zeroed"
                );
                if salvage {
                    tracing::warn!(file = %file.display(), offset = p, %reason, "journal: salvaging");
                    break;
                }
                return Err(corrupt(p, reason));
            }
            Read::Stale { size } if p >= watermark => {
                let limit = *limit.get_or_insert_with(|| last_nonzero_end(seg));
                match resync(seg, p + size, limit, tag) {
                    // The earlier use's records: this use wrote nothing further.
                    None => break,
                    Some(q) => {
                        out.hole_bytes += (q - p) as u64;
                        tracing::warn!(file = %file.display(), offset = p, resumes_at = q, "journal: skipping unsynced bytes the OS never wrote back (power loss)");
                        p = q;
                    }
                }
            }
            Read::Stale { size } => {
                let reason = format!(
                    "a record of the file's earlier use below the synced watermark (byte \
                     {watermark})"
                );
                if !salvage {
                    return Err(corrupt(p, reason));
                }
                let limit = *limit.get_or_insert_with(|| last_nonzero_end(seg));
                let next = resync(seg, p + size, limit, tag);
                match salvage_past(&mut out, file, p, next, limit, &reason) {
                    Some(q) => p = q,
                    None => break,
                }
            }
            Read::Bad(reason) => {
                let limit = *limit.get_or_insert_with(|| last_nonzero_end(seg));
                let next = resync(seg, p + ALIGN, limit, tag);
                let synced = p < watermark;
                match next {
                    None if !synced => {
                        // The crash hit while this record was being written: drop it.
                        out.torn = true;
                        tracing::info!(file = %file.display(), offset = p, reason, "journal: dropping a torn last record");
                        break;
                    }
                    Some(q) if !synced && lost_page_between(seg, p, q, tag) => {
                        out.hole_bytes += (q - p) as u64;
                        tracing::warn!(file = %file.display(), offset = p, resumes_at = q, "journal: skipping unsynced bytes the OS never wrote back (power loss)");
                        p = q;
                    }
                    _ => {
                        let reason = if synced {
                            format!("{reason}, below the synced watermark (byte {watermark})")
                        } else {
                            format!("{reason}, and valid records follow it")
                        };
                        if !salvage {
                            return Err(corrupt(p, reason));
                        }
                        match salvage_past(&mut out, file, p, next, limit, &reason) {
                            Some(q) => p = q,
                            None => break,
                        }
                    }
                }
            }
        }
    }
    out.end = p as u64;
    Ok(out)
}

/// The latest record of a key seen so far.
struct Winner<'a> {
    version: u64,
    kind: Kind,
    value: &'a [u8],
    shard: u32,
    file: usize,
    offset: usize,
}

/// Reads every segment in `found` (filling in `empty` and `used`) and returns the latest
/// write of each key.
pub(crate) fn replay<K: 'static, V: 'static>(
    found: &mut [Found],
    key_codec: &dyn Codec<K>,
    value_codec: &dyn Codec<V>,
    salvage: bool,
) -> Result<Replayed<K, V>, JournalError> {
    let start = Instant::now();
    let mut stats = ReplayStats::default();
    let mut maps: Vec<Option<Mmap>> = Vec::with_capacity(found.len());
    for f in found.iter() {
        if f.len == 0 {
            maps.push(None);
            continue;
        }
        let file = File::open(&f.path).map_err(|e| JournalError::io("open", &f.path, e))?;
        // SAFETY: the journal directory is locked, so no cooperating process writes or
        // truncates the file while it is mapped; this process has no writer yet either. The
        // map is read-only and dropped before this function returns.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| JournalError::io("map", &f.path, e))?;
        maps.push(Some(map));
    }
    let mut winners: HashMap<&[u8], Winner<'_>, ahash::RandomState> = HashMap::default();
    for (i, (f, map)) in found.iter_mut().zip(&maps).enumerate() {
        let seg: &[u8] = map.as_deref().unwrap_or(&[]);
        let scan = scan_segment(seg, &f.path, salvage, |offset, shard, r| {
            stats.max_version = stats.max_version.max(r.version);
            let newer = winners.get(r.key).is_none_or(|w| r.version > w.version);
            if newer {
                winners.insert(
                    r.key,
                    Winner {
                        version: r.version,
                        kind: r.kind,
                        value: r.value,
                        shard,
                        file: i,
                        offset,
                    },
                );
            }
        })?;
        stats.segments += 1;
        stats.records += scan.records;
        stats.bytes += scan.end;
        stats.torn_records += u64::from(scan.torn);
        stats.hole_bytes += scan.hole_bytes;
        stats.salvaged_bytes += scan.salvaged_bytes;
        stats.salvaged_files += u64::from(scan.skipped_file);
        f.empty = scan.records == 0 && !scan.skipped_file;
        f.used = scan.end;
    }
    let mut entries = Vec::with_capacity(winners.len());
    for (key, w) in winners {
        let at = |what: &'static str, message: String| JournalError::Codec {
            what,
            file: Some(found[w.file].path.clone()),
            offset: Some(w.offset as u64),
            message,
        };
        let decoded = decode(key_codec, key)
            .map_err(|m| at("decoding a key", m))
            .and_then(|k| match w.kind {
                Kind::Delete => Ok((k, None)),
                Kind::Put => decode(value_codec, w.value)
                    .map(|v| (k, Some(v)))
                    .map_err(|m| at("decoding a value", m)),
            });
        match decoded {
            Ok((key, value)) => entries.push(ReplayedEntry {
                key,
                value,
                version: w.version,
                shard: w.shard as usize,
            }),
            Err(e) if salvage => {
                tracing::warn!(error = %e, "journal: dropping a key whose latest record does not decode");
                stats.undecodable_keys += 1;
            }
            Err(e) => return Err(e),
        }
    }
    stats.keys = entries.len() as u64;
    stats.duration = start.elapsed();
    Ok(Replayed { entries, stats })
}

/// Runs a codec's `decode`, turning an error or a panic into its message.
fn decode<T: 'static>(codec: &dyn Codec<T>, bytes: &[u8]) -> Result<T, String> {
    match guard::catch(|| codec.decode(bytes)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("the codec panicked: {panic}")),
    }
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;
    use format::{encode_header, encode_record, record_size, SegmentKind};

    fn segment(records: &[(u64, &[u8], &[u8])], len: usize) -> Vec<u8> {
        segment_of(1, records, len)
    }

    /// Segment `seq`'s bytes: its header, then `records`, then zeros up to `len`.
    fn segment_of(seq: u64, records: &[(u64, &[u8], &[u8])], len: usize) -> Vec<u8> {
        let mut seg = encode_header(0, seq, SegmentKind::Log, 1).to_vec();
        for &(version, key, value) in records {
            let at = seg.len();
            seg.resize(at + record_size(key.len(), value.len()), 0);
            let tag = format::segment_tag(seq);
            encode_record(&mut seg[at..], Kind::Put, tag, version, key, value);
        }
        seg.resize(len, 0);
        seg
    }

    /// The file of segment `old` reused as segment `new`: `new`'s header and records over
    /// `old`'s bytes.
    fn reused(old: &[u8], new: u64, records: &[(u64, &[u8], &[u8])]) -> Vec<u8> {
        let fresh = segment_of(new, records, old.len());
        let end = HEADER_LEN
            + records
                .iter()
                .map(|(_, k, v)| record_size(k.len(), v.len()))
                .sum::<usize>();
        let mut seg = old.to_vec();
        seg[..end].copy_from_slice(&fresh[..end]);
        seg
    }

    fn scan(seg: &[u8], salvage: bool) -> Result<(Vec<u64>, SegmentScan), JournalError> {
        let mut versions = Vec::new();
        let s = scan_segment(seg, Path::new("x.log"), salvage, |_, _, r| {
            versions.push(r.version)
        })?;
        Ok((versions, s))
    }

    #[test]
    fn torn_tail_is_dropped_and_mid_file_damage_is_an_error() {
        let recs: Vec<(u64, &[u8], &[u8])> =
            vec![(1, b"a", b"1"), (2, b"b", b"2"), (3, b"c", b"3")];
        let seg = segment(&recs, 16384);
        let (v, s) = scan(&seg, false).unwrap();
        assert_eq!((v, s.torn), (vec![1, 2, 3], false));
        let size = record_size(1, 1);
        // Damage in the last record: torn.
        let mut t = seg.clone();
        t[HEADER_LEN + 2 * size + 10] ^= 1;
        let (v, s) = scan(&t, false).unwrap();
        assert_eq!((v, s.torn), (vec![1, 2], true));
        // Damage in the middle one: corrupt, naming its offset.
        let mut m = seg.clone();
        m[HEADER_LEN + size + 10] ^= 1;
        match scan(&m, false) {
            Err(JournalError::Corrupt { offset, .. }) => {
                assert_eq!(offset, (HEADER_LEN + size) as u64)
            }
            other => panic!("{other:?}"),
        }
        let (v, s) = scan(&m, true).unwrap();
        assert_eq!(v, vec![1, 3]);
        assert_eq!(s.salvaged_bytes, size as u64);
    }

    #[test]
    fn a_page_hole_past_the_watermark_is_skipped() {
        // Records fill three pages; the second page never reached the disk.
        let value = vec![7u8; 1000];
        let recs: Vec<(u64, &[u8], &[u8])> =
            (0..12u64).map(|v| (v, &b"k"[..], &value[..])).collect();
        let mut seg = segment(&recs, 16384);
        seg[4096..8192].fill(0);
        let (v, s) = scan(&seg, false).unwrap();
        assert!(s.hole_bytes > 0);
        assert!(v.len() < 12 && v.len() > 4, "{v:?}");
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        // Below a watermark the same hole is corruption.
        seg[format::WATERMARK_AT..format::WATERMARK_AT + 8]
            .copy_from_slice(&format::encode_watermark(1, 12000).to_le_bytes());
        assert!(matches!(
            scan(&seg, false),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn damaged_header_is_corrupt_unless_salvaging() {
        let mut seg = segment(&[(1, b"a", b"1")], 4096);
        seg[3] ^= 1;
        assert!(matches!(
            scan(&seg, false),
            Err(JournalError::Corrupt { offset: 0, .. })
        ));
        let (v, s) = scan(&seg, true).unwrap();
        assert!(v.is_empty() && s.skipped_file);
    }

    #[test]
    fn a_reused_files_earlier_records_are_never_replayed() {
        let old_recs: Vec<(u64, &[u8], &[u8])> =
            (0..200u64).map(|v| (v, &b"k"[..], &b"old"[..])).collect();
        let old = segment_of(5, &old_recs, 16384);
        let new_recs: Vec<(u64, &[u8], &[u8])> = (1000..1010u64)
            .map(|v| (v, &b"k"[..], &b"new"[..]))
            .collect();
        let seg = reused(&old, 9, &new_recs);
        let (v, s) = scan(&seg, false).unwrap();
        assert_eq!(v, (1000..1010).collect::<Vec<_>>());
        assert!(!s.torn && s.hole_bytes == 0);
        // The last new record torn over the old bytes: dropped, and nothing old read.
        let size = record_size(1, 3);
        let mut t = seg.clone();
        t[HEADER_LEN + 9 * size + 12] ^= 1;
        let (v, s) = scan(&t, false).unwrap();
        assert_eq!((v, s.torn), ((1000..1009).collect::<Vec<_>>(), true));
        // A page of new records the OS never wrote back: the old bytes are still there, and
        // the new records after it are kept, none of the old ones.
        let lost_page = |old: &[u8], new: &[(u64, &[u8], &[u8])]| {
            let mut hole = reused(old, 9, new);
            hole[4096..8192].copy_from_slice(&old[4096..8192]);
            let (v, s) = scan(&hole, false).unwrap();
            assert!(s.hole_bytes > 0);
            assert!(
                v.iter().all(|&x| x >= 1000),
                "an old record was replayed: {v:?}"
            );
            assert!(v.len() < 300 && v.len() > 100, "{}", v.len());
        };
        let long: Vec<(u64, &[u8], &[u8])> = (1000..1300u64)
            .map(|v| (v, &b"k"[..], &b"new"[..]))
            .collect();
        lost_page(&old, &long);
        // The earlier use's records laid out differently: the lost page starts inside a new
        // record, which reads as damaged, and old records follow it.
        let old_long: Vec<(u64, &[u8], &[u8])> = (0..200u64)
            .map(|v| (v, &b"k"[..], &b"an older, longer value"[..]))
            .collect();
        let odd: Vec<(u64, &[u8], &[u8])> = (1000..1300u64)
            .map(|v| (v, &b"k"[..], &b"new value!!"[..]))
            .collect();
        lost_page(&segment_of(5, &old_long, 16384), &odd);
        // Below the watermark, an old record is corruption.
        let mut synced = seg.clone();
        synced[format::WATERMARK_AT..format::WATERMARK_AT + 8]
            .copy_from_slice(&format::encode_watermark(9, 8192).to_le_bytes());
        assert!(matches!(
            scan(&synced, false),
            Err(JournalError::Corrupt { .. })
        ));
        let (v, _) = scan(&synced, true).unwrap();
        assert_eq!(v, (1000..1010).collect::<Vec<_>>());
        // Salvaging past an old record below the watermark keeps the new records after it.
        let mut mid = seg.clone();
        mid[HEADER_LEN + 3 * size..HEADER_LEN + 4 * size]
            .copy_from_slice(&old[HEADER_LEN + 3 * size..HEADER_LEN + 4 * size]);
        let synced_end = (HEADER_LEN + 10 * size) as u64;
        mid[format::WATERMARK_AT..format::WATERMARK_AT + 8]
            .copy_from_slice(&format::encode_watermark(9, synced_end).to_le_bytes());
        let (v, s) = scan(&mid, true).unwrap();
        assert_eq!(v, [1000, 1001, 1002, 1004, 1005, 1006, 1007, 1008, 1009]);
        assert_eq!(s.salvaged_bytes, size as u64);
    }

    /// `(start, end)` of each record of `records` laid out from the header on.
    fn places(records: &[(u64, &[u8], &[u8])]) -> Vec<(usize, usize)> {
        let mut at = HEADER_LEN;
        records
            .iter()
            .map(|(_, k, v)| {
                let start = at;
                at += record_size(k.len(), v.len());
                (start, at)
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// A reused file whose last new record is torn (its tail still the earlier use's
        /// bytes) at any byte, with one byte flipped anywhere: replay never returns a record
        /// of the earlier use, keeps every new record before the first damaged one, drops a
        /// damaged last record as torn, and calls a damaged record with intact ones after it
        /// corruption, at its offset.
        #[test]
        fn a_reused_file_torn_or_flipped_replays_as_the_rules_say(
            old_lens in proptest::collection::vec(0usize..60, 1..120),
            new_lens in proptest::collection::vec(0usize..60, 1..30),
            tear in proptest::option::of(proptest::prelude::any::<u64>()),
            flip in proptest::option::of((proptest::prelude::any::<u64>(), 1u8..=255)),
        ) {
            let values: Vec<Vec<u8>> = (0..60u8).map(|n| vec![n.wrapping_mul(7) | 1; n as usize]).collect();
            let old_recs: Vec<(u64, &[u8], &[u8])> = old_lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (i as u64, &b"o"[..], &values[n][..]))
                .collect();
            let new_recs: Vec<(u64, &[u8], &[u8])> = new_lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (1000 + i as u64, &b"n"[..], &values[n][..]))
                .collect();
            let old = segment_of(5, &old_recs, 16384);
            let pristine = reused(&old, 9, &new_recs);
            let at = places(&new_recs);
            let end = at.last().unwrap().1;
            let mut seg = pristine.clone();
            if let Some(t) = tear {
                let (start, stop) = *at.last().unwrap();
                let from = start + (t as usize) % (stop - start);
                seg[from..stop].copy_from_slice(&old[from..stop]);
            }
            let flipped = flip.map(|(b, x)| ((b as usize) % (end + 256), x));
            if let Some((b, x)) = flipped {
                seg[b] ^= x;
            }
            let intact: Vec<bool> = at.iter().map(|&(a, b)| seg[a..b] == pristine[a..b]).collect();
            let got = scan(&seg, false);
            if flipped.is_some_and(|(b, _)| b < HEADER_LEN) {
                proptest::prop_assert!(matches!(got, Err(JournalError::Corrupt { offset: 0, .. })), "{got:?}");
                return Ok(());
            }
            match intact.iter().position(|ok| !ok) {
                None => {
                    let (v, _) = got.unwrap();
                    proptest::prop_assert_eq!(v, (1000..1000 + at.len() as u64).collect::<Vec<_>>());
                }
                Some(d) if !intact[d + 1..].iter().any(|&ok| ok) => {
                    let (v, _) = got.unwrap();
                    proptest::prop_assert_eq!(v, (1000..1000 + d as u64).collect::<Vec<_>>());
                }
                Some(d) => match got {
                    Err(JournalError::Corrupt { offset, .. }) => {
                        proptest::prop_assert_eq!(offset as usize, at[d].0);
                    }
                    other => proptest::prop_assert!(false, "expected corruption at {}, got {other:?}", at[d].0),
                },
            }
            // Salvaging returns no record of the earlier use either.
            let (v, _) = scan(&seg, true).unwrap();
            proptest::prop_assert!(v.iter().all(|&x| x >= 1000), "{v:?}");
        }
    }
}
