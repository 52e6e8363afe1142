//! The on-disk format: the segment header and the record frame (see the module docs of
//! [`journal`](super) for the layout tables). Pure functions over byte slices, no I/O.

/// Magic bytes at offset 0 of every segment file.
pub(crate) const MAGIC: [u8; 8] = *b"WBJOURNL";
/// The format version this code writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Bytes of the segment header; records start here.
pub(crate) const HEADER_LEN: usize = 64;
/// Records start at multiples of this (the resynchronizing scan only looks there).
pub(crate) const ALIGN: usize = 8;
/// `len` (u32) and `crc` (u32) in front of every record.
pub(crate) const FRAME_PREFIX: usize = 8;
/// kind (u8) + segment tag (u32, see [`segment_tag`]) + version (u64) + key length (u32).
pub(crate) const BODY_FIXED: usize = 17;
/// Offset of the watermark word in the header.
pub(crate) const WATERMARK_AT: usize = 40;
/// Watermark offsets live in the low 48 bits; the high 16 bits are a check.
const WATERMARK_BITS: u32 = 48;
/// The largest offset a watermark can name (and so the largest segment).
pub(crate) const MAX_SEGMENT_BYTES: u64 = (1 << WATERMARK_BITS) - 1;

/// The tag every record of segment `seq` carries: the low 32 bits of its sequence number.
/// A reused segment file keeps the records of its earlier use past the new ones; their tag
/// names the earlier sequence number, which tells them apart ([`Read::Stale`]). Sequence
/// numbers only grow, so a tag repeats only 2^32 segments later.
pub(crate) fn segment_tag(seq: u64) -> u32 {
    seq as u32
}

/// What a record says about its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The key holds the record's value.
    Put = 1,
    /// The key was removed.
    Delete = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Put),
            2 => Some(Kind::Delete),
            _ => None,
        }
    }
}

/// What a segment holds: appended records or a checkpoint's copy of a shard's live set.
/// Replay treats both alike; the kind tells an operator what a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegmentKind {
    Log = 0,
    Checkpoint = 1,
}

impl SegmentKind {
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            SegmentKind::Log => "log",
            SegmentKind::Checkpoint => "ckpt",
        }
    }
}

/// A segment header as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) shard: u32,
    pub(crate) seq: u64,
    pub(crate) kind: SegmentKind,
    pub(crate) shards: u32,
    /// End of the records known to have been on stable storage when the header was last
    /// written (at least [`HEADER_LEN`]).
    pub(crate) watermark: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The header of a new segment (watermark: none).
pub(crate) fn encode_header(
    shard: u32,
    seq: u64,
    kind: SegmentKind,
    shards: u32,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&shard.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..28].copy_from_slice(&(kind as u32).to_le_bytes());
    h[28..32].copy_from_slice(&shards.to_le_bytes());
    let crc = crc32fast::hash(&h[0..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The watermark word for `offset` in segment `seq`: one aligned `u64`, so a crash never
/// leaves half of it written; its check bits tell a damaged word from a valid one.
pub(crate) fn encode_watermark(seq: u64, offset: u64) -> u64 {
    debug_assert!(offset <= MAX_SEGMENT_BYTES);
    offset | (u64::from(watermark_check(seq, offset)) << WATERMARK_BITS)
}

fn watermark_check(seq: u64, offset: u64) -> u16 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&offset.to_le_bytes());
    (h.finalize() & 0xffff) as u16
}

/// Why a header is unreadable.
pub(crate) fn decode_header(b: &[u8]) -> Result<Header, String> {
    if b.len() < HEADER_LEN {
        return Err(format!(
            "the file is {} bytes, shorter than a segment header ({HEADER_LEN})",
            b.len()
        ));
    }
    if b[0..8] != MAGIC {
        return Err("no journal segment magic at the start of the file".into());
    }
    if crc32fast::hash(&b[0..32]) != u32_at(b, 32) {
        return Err("segment header checksum mismatch".into());
    }
    if !is_zero(&b[36..WATERMARK_AT]) || !is_zero(&b[WATERMARK_AT + 8..HEADER_LEN]) {
        return Err("reserved segment header bytes are not zero".into());
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version}, this build reads version {FORMAT_VERSION}"
        ));
    }
    let kind = match u32_at(b, 24) {
        0 => SegmentKind::Log,
        1 => SegmentKind::Checkpoint,
        k => return Err(format!("unknown segment kind {k}")),
    };
    let seq = u64_at(b, 16);
    let raw = u64_at(b, WATERMARK_AT);
    let watermark = if raw == 0 {
        HEADER_LEN as u64
    } else {
        let offset = raw & MAX_SEGMENT_BYTES;
        let check = (raw >> WATERMARK_BITS) as u16;
        if check != watermark_check(seq, offset) || offset < HEADER_LEN as u64 {
            return Err("segment watermark is damaged".into());
        }
        offset
    };
    Ok(Header {
        shard: u32_at(b, 12),
        seq,
        kind,
        shards: u32_at(b, 28),
        watermark,
    })
}

/// `n` rounded up to a multiple of [`ALIGN`].
pub(crate) const fn align_up(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// Bytes a record with these key and value lengths takes in a segment, padding included.
pub(crate) fn record_size(key_len: usize, value_len: usize) -> usize {
    align_up(FRAME_PREFIX + BODY_FIXED + key_len + value_len)
}

/// The `len` field: body bytes after the 8-byte prefix. `None` if it would not fit a `u32`.
pub(crate) fn body_len(key_len: usize, value_len: usize) -> Option<u32> {
    BODY_FIXED
        .checked_add(key_len)?
        .checked_add(value_len)
        .and_then(|n| u32::try_from(n).ok())
}

/// Writes one record into `out` (exactly [`record_size`] bytes, zeroed padding included).
pub(crate) fn encode_record(
    out: &mut [u8],
    kind: Kind,
    tag: u32,
    version: u64,
    key: &[u8],
    value: &[u8],
) {
    let len = body_len(key.len(), value.len()).unwrap_or_else(|| unreachable!("checked by caller"));
    let key_len = key.len() as u32;
    let body_end = FRAME_PREFIX + len as usize;
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[8] = kind as u8;
    out[9..13].copy_from_slice(&tag.to_le_bytes());
    out[13..21].copy_from_slice(&version.to_le_bytes());
    out[21..25].copy_from_slice(&key_len.to_le_bytes());
    out[25..25 + key.len()].copy_from_slice(key);
    out[25 + key.len()..body_end].copy_from_slice(value);
    out[body_end..].fill(0);
    let crc = record_crc(&out[0..4], &out[8..body_end]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn record_crc(len: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(body);
    h.finalize()
}

/// A record read back; slices borrow the segment's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordRef<'a> {
    pub(crate) kind: Kind,
    pub(crate) version: u64,
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
    /// Bytes the record takes, padding included: the next record starts this far on.
    pub(crate) size: usize,
}

/// How reading a record at an offset turned out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read<'a> {
    /// A whole, intact record.
    Record(RecordRef<'a>),
    /// Zeros from here to the end of the bytes: nothing more was ever written.
    End,
    /// A whole, intact record of an earlier use of the segment file: its tag names another
    /// segment. Nothing written in this use of the file is at or after it, unless the OS
    /// lost a page before a power loss.
    Stale {
        /// Bytes the record takes, padding included.
        size: usize,
    },
    /// Not a valid record; the reason names the first check that failed.
    Bad(&'static str),
}

/// Reads the record at `at` of `seg` (a whole segment, header included), expecting `tag`
/// (the segment's [`segment_tag`]).
pub(crate) fn read_record(seg: &[u8], at: usize, tag: u32) -> Read<'_> {
    let rest = &seg[at.min(seg.len())..];
    if rest.len() < FRAME_PREFIX {
        return if rest.iter().all(|&b| b == 0) {
            Read::End
        } else {
            Read::Bad("a record frame runs past the end of the file")
        };
    }
    let len = u32_at(rest, 0) as usize;
    if len == 0 {
        return if is_zero(rest) {
            Read::End
        } else {
            Read::Bad("zero record length before non-zero bytes")
        };
    }
    if len < BODY_FIXED {
        return Read::Bad("record length is shorter than a record body");
    }
    let body_end = match FRAME_PREFIX.checked_add(len) {
        Some(e) if e <= rest.len() => e,
        _ => return Read::Bad("record length runs past the end of the file"),
    };
    let size = align_up(body_end);
    if size > rest.len() {
        return Read::Bad("record padding runs past the end of the file");
    }
    if record_crc(&rest[0..4], &rest[8..body_end]) != u32_at(rest, 4) {
        return Read::Bad("record checksum mismatch");
    }
    if !rest[body_end..size].iter().all(|&b| b == 0) {
        return Read::Bad("non-zero record padding");
    }
    let Some(kind) = Kind::from_byte(rest[8]) else {
        return Read::Bad("unknown record kind");
    };
    let key_len = u32_at(rest, 21) as usize;
    if key_len > len - BODY_FIXED {
        return Read::Bad("key length runs past the record");
    }
    let value = &rest[25 + key_len..body_end];
    if kind == Kind::Delete && !value.is_empty() {
        return Read::Bad("a delete record carries a value");
    }
    if u32_at(rest, 9) != tag {
        return Read::Stale { size };
    }
    Read::Record(RecordRef {
        kind,
        version: u64_at(rest, 13),
        key: &rest[25..25 + key_len],
        value,
        size,
    })
}

/// `true` if every byte is zero (word at a time).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    words.by_ref().all(|w| w == [0u8; 8]) && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment_with(records: &[(Kind, u64, &[u8], &[u8])]) -> Vec<u8> {
        let mut seg = encode_header(3, 9, SegmentKind::Log, 8).to_vec();
        for &(kind, version, key, value) in records {
            let at = seg.len();
            seg.resize(at + record_size(key.len(), value.len()), 0xaa);
            encode_record(&mut seg[at..], kind, segment_tag(9), version, key, value);
        }
        seg.resize(seg.len() + 64, 0);
        seg
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let mut h = encode_header(7, 42, SegmentKind::Checkpoint, 64);
        let d = decode_header(&h).unwrap();
        assert_eq!(
            (d.shard, d.seq, d.kind, d.shards, d.watermark),
            (7, 42, SegmentKind::Checkpoint, 64, HEADER_LEN as u64)
        );
        h[WATERMARK_AT..WATERMARK_AT + 8]
            .copy_from_slice(&encode_watermark(42, 4096).to_le_bytes());
        assert_eq!(decode_header(&h).unwrap().watermark, 4096);
        // A watermark word copied from another segment does not check.
        let mut other = h;
        other[WATERMARK_AT..WATERMARK_AT + 8]
            .copy_from_slice(&encode_watermark(41, 4096).to_le_bytes());
        assert!(decode_header(&other).is_err());
        for i in 0..HEADER_LEN {
            let mut bad = h;
            bad[i] ^= 0x10;
            assert!(decode_header(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(decode_header(&h[..10]).is_err());
    }

    #[test]
    fn records_round_trip() {
        let seg = segment_with(&[
            (Kind::Put, 5, b"k1", b"value one"),
            (Kind::Delete, 6, b"k2", b""),
            (Kind::Put, u64::MAX, b"", b""),
        ]);
        let mut at = HEADER_LEN;
        let mut seen = Vec::new();
        loop {
            match read_record(&seg, at, 9) {
                Read::Record(r) => {
                    assert_eq!(at % ALIGN, 0);
                    seen.push((r.kind, r.version, r.key.to_vec(), r.value.to_vec()));
                    at += r.size;
                }
                Read::End => break,
                other => panic!("{other:?} at {at}"),
            }
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen[0],
            (Kind::Put, 5, b"k1".to_vec(), b"value one".to_vec())
        );
        assert_eq!(seen[1], (Kind::Delete, 6, b"k2".to_vec(), vec![]));
        assert_eq!(seen[2].1, u64::MAX);
    }

    #[test]
    fn every_single_byte_flip_in_a_record_is_caught() {
        let seg = segment_with(&[(Kind::Put, 5, b"key", b"some value")]);
        let size = record_size(3, 10);
        for i in HEADER_LEN..HEADER_LEN + size {
            for bit in 0..8 {
                let mut bad = seg.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    matches!(read_record(&bad, HEADER_LEN, 9), Read::Bad(_)),
                    "flip of bit {bit} at {i} accepted"
                );
            }
        }
        // The same record read as part of a later use of the file is stale, not damaged.
        assert_eq!(
            read_record(&seg, HEADER_LEN, segment_tag(10)),
            Read::Stale { size }
        );
    }

    #[test]
    fn zero_tails_end_and_garbage_tails_do_not() {
        let seg = segment_with(&[]);
        assert_eq!(read_record(&seg, HEADER_LEN, 9), Read::End);
        assert_eq!(read_record(&seg, seg.len(), 9), Read::End);
        let mut g = seg.clone();
        let n = g.len();
        g[n - 1] = 1;
        assert!(matches!(read_record(&g, HEADER_LEN, 9), Read::Bad(_)));
        assert!(is_zero(&[0; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
