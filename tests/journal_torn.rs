//! Torn and corrupt journals: a journal is written, then cut or damaged the ways a crash
//! or a bad disk would, and replayed.
//!
//! The oracle follows the format's documented rules (records start at offset 64, each
//! `8 + 17 + key + value` bytes padded to a multiple of 8; the header's watermark says how
//! far a sync reached):
//! * past the watermark, a damaged record with no valid record after it is a torn tail and
//!   is dropped; a damaged record with valid records after it is corruption;
//! * below the watermark any damage, a cut included, is corruption;
//! * corruption is `JournalError::Corrupt` naming the segment and the damaged record's
//!   offset; replay never panics, never returns a write that was not made, and returns the
//!   latest version of each key among the records it keeps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use writebehind::journal::{Journal, JournalError, JournalLog, JournalSync};
use writebehind::stores::Raw;

type Model = HashMap<u64, (Option<Vec<u8>>, u64)>;

const HEADER: usize = 64;
const WATERMARK: std::ops::Range<usize> = 40..48;

#[derive(Clone, Debug)]
struct Rec {
    key: u64,
    value: Option<Vec<u8>>,
    version: u64,
    start: usize,
    /// End of the value (padding follows to `end`).
    body_end: usize,
    end: usize,
}

fn journal(dir: &Path, mode: JournalSync, salvage: bool) -> Journal<u64, Vec<u8>> {
    Journal::new(dir, Raw, Raw)
        .sync(mode)
        .segment_bytes(64 << 10)
        .salvage(salvage)
}

/// Writes `ops` into a one-shard journal; returns the segment's bytes and the records'
/// places. `synced`: closed in `EveryWrite` mode (watermark at the end) rather than
/// abandoned in `Os` mode (no watermark).
fn write(ops: &[(u64, Option<Vec<u8>>)], synced: bool) -> (Vec<u8>, Vec<Rec>) {
    let dir = tempfile::tempdir().unwrap();
    let mode = if synced {
        JournalSync::EveryWrite
    } else {
        JournalSync::Os
    };
    let (log, _) = JournalLog::open(journal(dir.path(), mode, false), 1).unwrap();
    let mut recs = Vec::new();
    let mut at = HEADER;
    for (i, (key, value)) in ops.iter().enumerate() {
        let version = i as u64 + 1;
        let lsn = log.append(0, key, value.as_ref(), version).unwrap();
        let size = (8 + 17 + 8 + value.as_ref().map_or(0, Vec::len)).div_ceil(8) * 8;
        assert_eq!(
            lsn.offset() as usize,
            at + size,
            "records are laid out as documented"
        );
        recs.push(Rec {
            key: *key,
            value: value.clone(),
            version,
            start: at,
            body_end: at + 8 + 17 + 8 + value.as_ref().map_or(0, Vec::len),
            end: at + size,
        });
        at += size;
    }
    if synced {
        log.close().unwrap();
    } else {
        log.abandon();
    }
    let seg = segment_file(dir.path());
    (std::fs::read(seg).unwrap(), recs)
}

fn segment_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("one segment")
}

fn model(recs: &[Rec]) -> Model {
    let mut m = Model::new();
    for r in recs {
        m.insert(r.key, (r.value.clone(), r.version));
    }
    m
}

#[derive(Debug, PartialEq)]
enum Expect {
    /// Replay returns the first n records' latest versions.
    Prefix(usize),
    /// Replay fails naming this offset.
    Corrupt(usize),
}

/// What replay must do with the segment cut to `len` bytes (`zeroed`: its bytes from `len`
/// on zeroed rather than removed) and one byte changed at `flip`.
fn oracle(recs: &[Rec], synced: bool, len: usize, zeroed: bool, flip: Option<usize>) -> Expect {
    if flip.is_some_and(|b| b < HEADER) {
        return Expect::Corrupt(0);
    }
    // Zeroing only the padding leaves a record whole.
    let whole = |r: &Rec| r.end <= len || (zeroed && r.body_end <= len);
    let complete = recs.iter().take_while(|r| whole(r)).count();
    let damaged = flip.and_then(|b| {
        recs[..complete]
            .iter()
            .position(|r| (r.start..r.end).contains(&b))
    });
    if synced {
        let cut = (complete < recs.len()).then(|| recs[complete].start);
        match (damaged.map(|r| recs[r].start), cut) {
            (None, None) => Expect::Prefix(recs.len()),
            (a, b) => Expect::Corrupt(a.into_iter().chain(b).min().unwrap()),
        }
    } else {
        match damaged {
            Some(r) if r + 1 == complete => Expect::Prefix(r),
            Some(r) => Expect::Corrupt(recs[r].start),
            None => Expect::Prefix(complete),
        }
    }
}

/// Replays `bytes` as the only segment of a fresh directory.
fn replay(bytes: &[u8], salvage: bool) -> (PathBuf, Result<Model, JournalError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("00000-0000000000000001.log");
    std::fs::write(&path, bytes).unwrap();
    let result =
        JournalLog::open(journal(dir.path(), JournalSync::Os, salvage), 1).map(|(log, r)| {
            log.abandon();
            r.entries
                .into_iter()
                .map(|e| (e.key, (e.value, e.version)))
                .collect()
        });
    (path, result)
}

/// Replays `bytes` with one byte changed at `flip`; `len` is where the records were cut
/// (the file's end, or where its tail was zeroed).
fn check(bytes: &[u8], recs: &[Rec], synced: bool, len: usize, flip: Option<(usize, u8)>) {
    let zeroed = bytes.len() > len;
    let mut damaged = bytes.to_vec();
    if let Some((b, x)) = flip {
        damaged[b] ^= x;
    }
    let expect = oracle(recs, synced, len, zeroed, flip.map(|f| f.0));
    let (path, got) = replay(&damaged, false);
    match (&expect, got) {
        (Expect::Prefix(n), Ok(m)) => assert_eq!(m, model(&recs[..*n]), "len {len} flip {flip:?}"),
        (
            Expect::Corrupt(at),
            Err(JournalError::Corrupt {
                file,
                offset,
                reason,
            }),
        ) => {
            assert_eq!(file, path);
            assert_eq!(offset as usize, *at, "len {len} flip {flip:?}: {reason}");
        }
        (e, got) => panic!("len {len} flip {flip:?} synced {synced}: expected {e:?}, got {got:?}"),
    }
    // Salvaging never fails on damaged records, returns only writes that were made, and
    // never a version older than the intact prefix holds.
    let (_, salvaged) = replay(&damaged, true);
    let salvaged = salvaged.unwrap();
    let written: HashMap<(u64, u64), &Option<Vec<u8>>> = recs
        .iter()
        .map(|r| ((r.key, r.version), &r.value))
        .collect();
    for (k, (v, ver)) in &salvaged {
        assert_eq!(
            written.get(&(*k, *ver)),
            Some(&v),
            "salvage invented {k}@{ver}"
        );
    }
    let first_damage = flip.map_or(len, |f| f.0.min(len));
    let intact: Vec<Rec> = recs
        .iter()
        .filter(|r| r.end <= first_damage)
        .cloned()
        .collect();
    for (k, (_, ver)) in model(&intact) {
        let got = salvaged.get(&k).map(|x| x.1);
        if flip.is_none_or(|f| f.0 >= HEADER) {
            assert!(got >= Some(ver), "salvage lost {k}@{ver}: {got:?}");
        }
    }
}

fn ops() -> impl Strategy<Value = Vec<(u64, Option<Vec<u8>>)>> {
    prop::collection::vec(
        (
            0u64..8,
            prop::option::weighted(0.8, prop::collection::vec(1u8..=255, 0..200)),
        ),
        1..30,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn cut_and_flipped_journals_replay_as_the_rules_say(
        ops in ops(),
        synced in any::<bool>(),
        cut_from_end in 0usize..1000,
        cut_sel in any::<u64>(),
        flip_sel in prop::option::of((any::<u64>(), 1u8..=255)),
    ) {
        let (bytes, recs) = write(&ops, synced);
        let end = recs.last().unwrap().end;
        // Cut within the last records (or not at all), flip anywhere up to a little past
        // the records, except the watermark word (its 16-bit check is tested on its own).
        let len = if cut_sel % 3 == 0 { bytes.len() } else { end - cut_from_end.min(end - HEADER) };
        let flip = flip_sel
            .map(|(sel, x)| ((sel % (end as u64 + 64)) as usize, x))
            .filter(|(b, _)| *b < len && !WATERMARK.contains(b));
        check(&bytes[..len], &recs, synced, len, flip);
    }
}

/// Every cut within the last three records, and the zeroing of the tail from there (a
/// preallocated segment is never shortened by a crash; its unwritten tail is zeros).
#[test]
fn every_cut_of_the_last_records() {
    let ops: Vec<(u64, Option<Vec<u8>>)> = (0..12u64)
        .map(|i| {
            (
                i % 5,
                (i % 4 != 3).then(|| vec![(i * 37 % 251 + 1) as u8; (i * 13 % 90) as usize]),
            )
        })
        .collect();
    for synced in [false, true] {
        let (bytes, recs) = write(&ops, synced);
        let end = recs.last().unwrap().end;
        for len in recs[recs.len() - 3].start..=end {
            check(&bytes[..len], &recs, synced, len, None);
            let mut zeroed = bytes.clone();
            zeroed[len..].fill(0);
            check(&zeroed, &recs, synced, len, None);
        }
    }
}
