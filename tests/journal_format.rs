//! The journal on its own: round trips, reopen, shards, checkpoints, the directory lock,
//! group commit, process crashes and a full disk.

#![cfg(unix)]

mod process;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use writebehind::journal::{Journal, JournalError, JournalLog, JournalSync};
use writebehind::stores::{Codec, CodecError, Raw};

type Log = JournalLog<u64, Vec<u8>>;
type Model = HashMap<u64, (Option<Vec<u8>>, u64)>;
/// A shard's dirty set: key -> (value, version).
type Dirty = HashMap<u64, (Vec<u8>, u64)>;

fn journal(dir: &Path, mode: JournalSync, segment: u64) -> Journal<u64, Vec<u8>> {
    Journal::new(dir, Raw, Raw)
        .sync(mode)
        .segment_bytes(segment)
}

fn open(dir: &Path, mode: JournalSync, segment: u64, shards: usize) -> (Log, Model) {
    let (log, replayed) = JournalLog::open(journal(dir, mode, segment), shards).unwrap();
    let model = replayed
        .entries
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect();
    (log, model)
}

fn value(key: u64, version: u64) -> Vec<u8> {
    format!("value of {key} at {version}").into_bytes()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("log" | "ckpt")))
        // (A spare being prepared is a temporary file until it is renamed into place.)
        .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
        .collect();
    v.sort();
    v
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Appends `n` random puts and deletes over `keys` keys; returns what replay must give.
fn write_random(
    log: &Log,
    model: &mut Model,
    rng: &mut Rng,
    n: u64,
    keys: u64,
    shards: usize,
    next_version: &mut u64,
) {
    for _ in 0..n {
        let key = rng.below(keys);
        let shard = (key % shards as u64) as usize;
        *next_version += 1;
        let v = *next_version;
        if rng.below(5) == 0 {
            log.append(shard, &key, None, v).unwrap();
            model.insert(key, (None, v));
        } else {
            let val = value(key, v);
            log.append(shard, &key, Some(&val), v).unwrap();
            model.insert(key, (Some(val), v));
        }
    }
}

#[test]
fn puts_and_deletes_of_many_shards_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 8);
    assert!(replayed.is_empty());
    let mut model = Model::new();
    let mut version = 0;
    write_random(&log, &mut model, &mut Rng(7), 3000, 300, 8, &mut version);
    assert_eq!(log.stats().records, 3000);
    assert!(segment_files(dir.path()).len() > 8, "small segments rotate");
    log.close().unwrap();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 8);
    assert_eq!(replayed, model);
    let stats = log.stats().replay;
    assert_eq!(stats.records, 3000);
    assert_eq!(stats.max_version, version);
    assert_eq!(stats.torn_records, 0);
    log.close().unwrap();
}

#[test]
fn reopen_after_close_and_new_writes_converge() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new();
    let mut version = 0;
    let mut rng = Rng(11);
    for round in 0..4 {
        let mode = [
            JournalSync::Os,
            JournalSync::EveryWrite,
            JournalSync::default(),
            JournalSync::Os,
        ][round];
        let (log, replayed) = open(dir.path(), mode, 8192, 4);
        assert_eq!(replayed, model, "round {round}");
        if round > 0 {
            assert_eq!(log.stats().replay.max_version, version);
        }
        write_random(&log, &mut model, &mut rng, 500, 60, 4, &mut version);
        log.close().unwrap();
    }
    // A different shard count reads the same journal: records name their shard, keys are
    // merged across shards.
    let (log, replayed) = open(dir.path(), JournalSync::Os, 8192, 3);
    assert_eq!(replayed, model);
    log.close().unwrap();
}

#[test]
fn abandoned_journal_replays_every_append() {
    // `abandon` leaves the files as a killed process would: no final sync, no cleanup.
    let dir = tempfile::tempdir().unwrap();
    for mode in [
        JournalSync::Os,
        JournalSync::Interval(Duration::from_secs(60)),
    ] {
        let (log, mut model) = open(dir.path(), mode, 4096, 4);
        let mut version = model.values().map(|(_, v)| *v).max().unwrap_or(0);
        write_random(&log, &mut model, &mut Rng(3), 1000, 100, 4, &mut version);
        log.abandon();
        let (log, replayed) = open(dir.path(), mode, 4096, 4);
        assert_eq!(replayed, model);
        log.close().unwrap();
    }
}

#[test]
fn checkpoint_keeps_exactly_the_live_set_and_deletes_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 2);
    // Shard 0: 5000 writes over 200 keys; the store acknowledged all but 10 keys.
    let mut model = Model::new();
    let mut version = 0;
    write_random(&log, &mut model, &mut Rng(5), 5000, 200, 1, &mut version);
    // Shard 1 keeps its records.
    log.append(1, &1_000_001, Some(&b"other shard".to_vec()), version + 1)
        .unwrap();
    let before = log.bytes();
    let files_before = segment_files(dir.path());
    assert!(before > 100_000, "{before}");
    let live: Model = model
        .iter()
        .filter(|(k, _)| **k < 10)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    log.checkpoint(
        0,
        live.iter().map(|(k, (val, ver))| (*k, val.clone(), *ver)),
    )
    .unwrap();
    let after = log.bytes();
    let live_bytes: u64 = live
        .values()
        .map(|(v, _)| 40 + v.as_ref().map_or(0, |v| v.len() as u64))
        .sum();
    assert!(
        after <= live_bytes + 2 * 4096,
        "journal holds {after} bytes for a live set of {live_bytes}"
    );
    let files_after = segment_files(dir.path());
    let kept: Vec<_> = files_before
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("00000-")
        })
        .filter(|p| files_after.contains(p))
        .collect();
    // (A spare segment prepared ahead holds no record and may stay.)
    assert!(
        kept.iter()
            .all(|p| std::fs::read(p).unwrap()[64..72] == [0; 8]),
        "old segments of shard 0 are kept: {kept:?}"
    );
    assert!(files_after.len() < files_before.len());
    assert_eq!(log.stats().checkpoints, 1);
    log.close().unwrap();

    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 2);
    let mut expect = live.clone();
    expect.insert(1_000_001, (Some(b"other shard".to_vec()), version + 1));
    assert_eq!(replayed, expect);
    // Every shard checkpoints with an empty dirty set (the store holds everything): the
    // segments found at open go, and the journal is empty.
    log.checkpoint(0, std::iter::empty()).unwrap();
    assert!(
        !segment_files(dir.path()).is_empty(),
        "replayed segments wait for every shard"
    );
    log.checkpoint(1, std::iter::empty()).unwrap();
    // (A spare segment prepared for the next append holds no record and may be there.)
    let with_records: Vec<PathBuf> = segment_files(dir.path())
        .into_iter()
        .filter(|p| std::fs::read(p).unwrap()[64..72] != [0; 8])
        .collect();
    assert_eq!(with_records, Vec::<PathBuf>::new());
    assert_eq!(log.bytes(), 0);
    log.close().unwrap();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 2);
    assert!(replayed.is_empty());
    log.close().unwrap();
}

#[test]
fn a_checkpoint_abandoned_midway_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 1);
    let mut model = Model::new();
    let mut version = 0;
    write_random(&log, &mut model, &mut Rng(21), 300, 40, 1, &mut version);
    let files = segment_files(dir.path());
    // The engine's iterator panics after a few records (a value's Clone, say).
    let live = model.clone().into_iter().map(|(k, (v, ver))| (k, v, ver));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        log.checkpoint(
            0,
            live.enumerate()
                .map(|(i, x)| if i == 5 { panic!("clone failed") } else { x }),
        )
    }));
    assert!(panicked.is_err());
    let after: Vec<_> = segment_files(dir.path())
        .into_iter()
        .filter(|p| p.extension().unwrap() == "ckpt")
        .collect();
    assert!(
        after.is_empty(),
        "partial checkpoint left behind: {after:?}"
    );
    assert!(
        files.iter().all(|f| f.exists()),
        "a failed checkpoint deleted segments"
    );
    // A later checkpoint reclaims them all.
    log.checkpoint(
        0,
        model.clone().into_iter().map(|(k, (v, ver))| (k, v, ver)),
    )
    .unwrap();
    assert!(files
        .iter()
        .all(|f| !f.exists() || std::fs::read(f).unwrap()[64..72] == [0; 8]));
    log.close().unwrap();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 1);
    assert_eq!(replayed, model);
    log.close().unwrap();
}

#[test]
fn journal_size_stays_bounded_under_repeated_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 16384, 1);
    let mut model = Model::new();
    let mut version = 0;
    let mut rng = Rng(99);
    let mut peak = 0;
    for _ in 0..50 {
        write_random(&log, &mut model, &mut rng, 400, 50, 1, &mut version);
        // The store holds everything but keys 0..5.
        let live: Vec<_> = model
            .iter()
            .filter(|(k, _)| **k < 5)
            .map(|(k, (v, ver))| (*k, v.clone(), *ver))
            .collect();
        log.checkpoint(0, live.into_iter()).unwrap();
        peak = peak.max(log.bytes());
        assert!(
            segment_files(dir.path()).len() <= 3,
            "{:?}",
            segment_files(dir.path())
        );
    }
    assert!(peak < 20_000, "peak {peak}");
    log.close().unwrap();
}

/// Files kept for reuse: reclaimed segments renamed out of the journal's view.
fn kept_for_reuse(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with(".tmp-free-")
        })
        .count()
}

#[test]
fn reclaimed_segments_are_reused_and_replay_reads_only_their_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 1);
    let mut version = 0;
    // A first life: 3000 writes over 300 keys, then the store holds all of them.
    let mut first = Model::new();
    write_random(&log, &mut first, &mut Rng(17), 3000, 300, 1, &mut version);
    let created = log.stats().segments_created;
    assert!(created > 20, "{created}");
    log.checkpoint(0, std::iter::empty()).unwrap();
    assert!(kept_for_reuse(dir.path()) > 0, "nothing kept for reuse");
    // A second life over other keys, in the reused files.
    let mut second = Model::new();
    let mut rng = Rng(23);
    for _ in 0..1500 {
        let key = 1_000 + rng.below(50);
        version += 1;
        let val = value(key, version);
        log.append(0, &key, Some(&val), version).unwrap();
        second.insert(key, (Some(val), version));
    }
    let s = log.stats();
    assert!(s.segments_reused > 0, "{s:?}");
    assert!(
        s.segments_created - created < created / 2,
        "reuse did not replace creation: {s:?}"
    );
    // As a crash leaves it: the reused files still hold the first life's records past the
    // new ones; replay returns the second life only.
    log.abandon();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 1);
    assert_eq!(replayed, second);
    assert_eq!(kept_for_reuse(dir.path()), 0, "open keeps no reuse file");
    write_random(
        &log,
        &mut Model::new(),
        &mut Rng(29),
        2000,
        300,
        1,
        &mut version,
    );
    log.checkpoint(0, std::iter::empty()).unwrap();
    assert!(kept_for_reuse(dir.path()) > 0);
    log.close().unwrap();
    assert_eq!(kept_for_reuse(dir.path()), 0, "a clean close deletes them");
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 1);
    assert!(replayed.is_empty());
    log.close().unwrap();
}

#[test]
fn appends_racing_a_checkpoint_are_all_replayed() {
    // The engine's protocol: appends happen under the shard lock together with the update of
    // the dirty set; a checkpoint begins under that lock while it snapshots the dirty set,
    // and finishes without it. A "store" acknowledges writes meanwhile (removes them from
    // the dirty set).
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 1);
    let log = Arc::new(log);
    let shard: Arc<Mutex<Dirty>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (log, shard) = (Arc::clone(&log), Arc::clone(&shard));
        std::thread::spawn(move || {
            let mut rng = Rng(1234);
            for version in 1..=20_000u64 {
                let key = rng.below(100);
                let val = value(key, version);
                let mut dirty = shard.lock().unwrap();
                log.append(0, &key, Some(&val), version).unwrap();
                dirty.insert(key, (val, version));
            }
        })
    };
    let store = {
        let (shard, done) = (Arc::clone(&shard), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut rng = Rng(77);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let key = rng.below(100);
                shard.lock().unwrap().remove(&key);
                std::thread::yield_now();
            }
        })
    };
    let mut checkpoints = 0;
    while !writer.is_finished() {
        let (ticket, snapshot) = {
            let dirty = shard.lock().unwrap();
            (log.begin_checkpoint(0), dirty.clone())
        };
        log.finish_checkpoint(
            ticket,
            snapshot.into_iter().map(|(k, (v, ver))| (k, Some(v), ver)),
        )
        .unwrap();
        checkpoints += 1;
    }
    writer.join().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    store.join().unwrap();
    assert!(
        checkpoints > 1,
        "the race needs checkpoints during the appends"
    );
    let dirty = shard.lock().unwrap().clone();
    Arc::try_unwrap(log).unwrap().abandon();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 1);
    for (key, (val, version)) in &dirty {
        assert_eq!(
            replayed.get(key),
            Some(&(Some(val.clone()), *version)),
            "key {key}"
        );
    }
    for (key, (val, version)) in &replayed {
        assert_eq!(
            val.as_ref().unwrap(),
            &value(*key, *version),
            "replay invented a write"
        );
    }
    log.close().unwrap();
}

#[test]
fn writers_on_many_threads_append_to_lanes_that_checkpoints_reclaim() {
    // Four threads write one journal shard, each key under its own lock of four (the
    // engine's shard locks), while checkpoints run: with several CPUs the threads append to
    // separate file sets (lanes), a checkpoint seals and reclaims every lane, and replay
    // gives each key's latest write whatever lane holds it.
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 8192, 1);
    let log = Arc::new(log);
    let locks: Arc<Vec<Mutex<Dirty>>> = Arc::new((0..4).map(|_| Mutex::default()).collect());
    let next_version = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let sets_seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (log, locks, next_version) = (log.clone(), locks.clone(), next_version.clone());
            let (dir, sets_seen) = (dir.path().to_path_buf(), sets_seen.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t + 11);
                for i in 0..PER_THREAD {
                    let key = rng.below(400);
                    let mut dirty = locks[(key % 4) as usize].lock().unwrap();
                    let version = next_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let val = value(key, version);
                    log.append(0, &key, Some(&val), version).unwrap();
                    dirty.insert(key, (val, version));
                    drop(dirty);
                    if i % 500 == 0 {
                        // Which file sets hold records now (the prefix of a segment's name).
                        let mut seen = sets_seen.lock().unwrap();
                        for f in segment_files(&dir) {
                            let name = f.file_name().unwrap().to_str().unwrap().to_string();
                            seen.insert(name[..5].to_string());
                        }
                    }
                }
            })
        })
        .collect();
    // The engine's order: seal first, then each lock's snapshot in turn.
    let checkpoint = |log: &Log| {
        let ticket = log.begin_checkpoint(0);
        let mut live = Vec::new();
        for l in locks.iter() {
            live.extend(
                l.lock()
                    .unwrap()
                    .iter()
                    .map(|(k, (v, ver))| (*k, Some(v.clone()), *ver)),
            );
        }
        log.finish_checkpoint(ticket, live.into_iter()).unwrap();
    };
    let mut checkpoints = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        checkpoint(&log);
        checkpoints += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        checkpoints > 1,
        "the race needs checkpoints during the appends"
    );
    // A last checkpoint leaves the live set (at most 400 keys) and the lanes' open segments.
    checkpoint(&log);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 {
        let seen = sets_seen.lock().unwrap();
        assert!(seen.len() > 1, "threads shared one file set: {seen:?}");
    }
    // Every record is about 80 bytes; without reclaiming the lanes the journal would hold
    // all 20,000 of them.
    let all: u64 = THREADS * PER_THREAD * 80;
    let left = log.bytes();
    assert!(left < all / 20, "{left} bytes left of {all}");
    let mut expect = Model::new();
    for l in locks.iter() {
        for (k, (v, ver)) in l.lock().unwrap().iter() {
            expect.insert(*k, (Some(v.clone()), *ver));
        }
    }
    Arc::try_unwrap(log).unwrap().abandon();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 8192, 1);
    assert_eq!(replayed, expect);
    log.close().unwrap();
}

#[test]
fn a_second_opener_in_this_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 1);
    match JournalLog::open(journal(dir.path(), JournalSync::Os, 4096), 1) {
        Err(JournalError::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    log.close().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 1);
    log.close().unwrap();
}

const CHILD_DIR: &str = "WRITEBEHIND_JOURNAL_TEST_DIR";
const CHILD_MODE: &str = "WRITEBEHIND_JOURNAL_TEST_MODE";

/// Runs only as a child of the tests below (the test binary started again with an env var).
#[test]
fn child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let mode = match std::env::var(CHILD_MODE).as_deref() {
        Ok("every") => JournalSync::EveryWrite,
        Ok("interval") => JournalSync::Interval(Duration::from_millis(5)),
        Ok("os") => JournalSync::Os,
        _ => {
            // Hold the lock until killed.
            let (_log, _) = open(Path::new(&dir), JournalSync::Os, 4096, 1);
            println!("LOCKED");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    // Write until killed; print each acknowledged version.
    let (log, replayed) = open(Path::new(&dir), mode, 8192, 4);
    let start = replayed.values().map(|(_, v)| *v).max().unwrap_or(0) + 1;
    for version in start.. {
        let key = version % 97;
        let lsn = log
            .append(
                (key % 4) as usize,
                &key,
                Some(&value(key, version)),
                version,
            )
            .unwrap();
        log.wait_synced(&lsn).unwrap();
        println!("ACK {key} {version}");
    }
}

fn child(dir: &Path, mode: &str) -> std::process::Child {
    process::respawn(
        "child_process",
        &[
            (CHILD_DIR, dir.display().to_string()),
            (CHILD_MODE, mode.to_string()),
        ],
    )
}

#[test]
fn a_second_opener_in_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = child(dir.path(), "lock");
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("LOCKED") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child exited before locking"
        );
    }
    let refused = JournalLog::open(journal(dir.path(), JournalSync::Os, 4096), 1);
    assert!(
        matches!(refused, Err(JournalError::Locked { .. })),
        "{refused:?}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The kernel releases a dead process's lock.
    let (log, _) = open(dir.path(), JournalSync::Os, 4096, 1);
    log.close().unwrap();
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let mut rng = Rng(std::process::id() as u64 | 1);
    for mode in ["every", "interval", "os"] {
        let dir = tempfile::tempdir().unwrap();
        let mut acked: HashMap<u64, u64> = HashMap::new();
        for round in 0..3 {
            let mut c = child(dir.path(), mode);
            let mut out = BufReader::new(c.stdout.take().unwrap());
            let kill_after = 200 + rng.below(3000);
            let mut line = String::new();
            let mut n = 0;
            while n < kill_after {
                line.clear();
                assert!(out.read_line(&mut line).unwrap() > 0, "child died early");
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.split_whitespace().map(|x| x.parse::<u64>().unwrap());
                    let (k, v) = (it.next().unwrap(), it.next().unwrap());
                    acked.insert(k, v);
                    n += 1;
                }
            }
            c.kill().unwrap();
            // Lines already printed were acknowledged before the kill.
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.split_whitespace().map(|x| x.parse::<u64>().unwrap());
                    acked.insert(it.next().unwrap(), it.next().unwrap());
                }
            }
            c.wait().unwrap();
            let (log, replayed) = open(dir.path(), JournalSync::Os, 8192, 4);
            for (k, v) in &acked {
                let (val, got) = replayed
                    .get(k)
                    .unwrap_or_else(|| panic!("{mode} round {round}: key {k} lost"));
                assert!(
                    got >= v,
                    "{mode} round {round}: key {k} went back from {v} to {got}"
                );
                assert_eq!(val.as_deref(), Some(&value(*k, *got)[..]));
            }
            log.close().unwrap();
        }
    }
}

#[test]
fn every_write_shares_syncs_between_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    // 8 writers on 2 shards: writers of one shard share its sync, and the two shards'
    // syncs share a round.
    let (log, _) = open(dir.path(), JournalSync::EveryWrite, 1 << 20, 2);
    let log = Arc::new(log);
    const THREADS: u64 = 8;
    const EACH: u64 = 150;
    let started = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let version = t * EACH + i + 1;
                    let lsn = log
                        .append((t % 2) as usize, &t, Some(&value(t, version)), version)
                        .unwrap();
                    log.wait_synced(&lsn).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = started.elapsed();
    let s = log.stats();
    let appends = THREADS * EACH;
    println!(
        "EveryWrite, {THREADS} threads on 2 shards: {appends} durable appends in {elapsed:?} \
         ({:.0}/s), {} syncs in {} rounds, group size p50 {} max {}, sync p50 {} us p99 {} us",
        appends as f64 / elapsed.as_secs_f64(),
        s.syncs,
        s.sync_rounds,
        s.group_commit.p50,
        s.group_commit.max,
        s.sync_micros.p50,
        s.sync_micros.p99
    );
    assert!(s.sync_rounds < appends, "{s:?}");
    assert!(s.syncs < appends, "{s:?}");
    assert!(s.group_commit.max > 1, "{s:?}");
    assert_eq!(s.group_commit.count, s.sync_rounds);
    Arc::try_unwrap(log).unwrap().close().unwrap();
}

#[test]
fn interval_mode_syncs_in_the_background_and_os_mode_never() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(
        dir.path(),
        JournalSync::Interval(Duration::from_millis(5)),
        8192,
        1,
    );
    let lsn = log.append(0, &1, Some(&b"x".to_vec()), 1).unwrap();
    log.wait_synced(&lsn).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.stats().syncs == 0 {
        assert!(Instant::now() < deadline, "no background sync");
        std::thread::sleep(Duration::from_millis(5));
    }
    log.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::Os, 8192, 1);
    log.append(0, &1, Some(&b"x".to_vec()), 1).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(log.stats().syncs, 0);
    log.close().unwrap();
}

struct Panicky;
impl Codec<u64> for Panicky {
    fn encode(&self, v: &u64) -> Result<Vec<u8>, CodecError> {
        match v {
            13 => panic!("unlucky"),
            14 => Err("fourteen is not allowed".into()),
            _ => Ok(v.to_be_bytes().to_vec()),
        }
    }
    fn decode(&self, b: &[u8]) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(b.try_into()?))
    }
}

#[test]
fn a_failing_or_panicking_codec_refuses_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::new(dir.path(), Panicky, Raw).sync(JournalSync::Os);
    let (log, _) = JournalLog::<u64, Vec<u8>>::open(j.clone(), 1).unwrap();
    let e = log.append(0, &13, Some(&vec![1]), 1).unwrap_err();
    assert!(
        matches!(
            &e,
            JournalError::Codec {
                what: "encoding a key",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("unlucky"));
    assert!(matches!(
        log.append(0, &14, None, 2),
        Err(JournalError::Codec { .. })
    ));
    log.append(0, &15, Some(&vec![1]), 3).unwrap();
    assert_eq!(log.stats().records, 1);
    log.close().unwrap();
    let (log, replayed) = JournalLog::<u64, Vec<u8>>::open(j, 1).unwrap();
    assert_eq!(replayed.entries.len(), 1);
    assert_eq!(replayed.entries[0].key, 15);
    log.close().unwrap();
}

#[test]
fn a_record_larger_than_a_segment_gets_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), JournalSync::EveryWrite, 4096, 1);
    let big = vec![0xabu8; 100_000];
    let lsn = log.append(0, &1, Some(&big), 1).unwrap();
    log.wait_synced(&lsn).unwrap();
    log.append(0, &2, Some(&b"small".to_vec()), 2).unwrap();
    log.close().unwrap();
    let (log, replayed) = open(dir.path(), JournalSync::Os, 4096, 1);
    assert_eq!(replayed[&1], (Some(big), 1));
    assert_eq!(replayed[&2], (Some(b"small".to_vec()), 2));
    log.close().unwrap();
}

#[test]
fn a_full_disk_refuses_appends_without_sigbus_and_recovers() {
    let Some(fs) = process::Tmpfs::mount("1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let dir = fs.path().join("wb");
    // A segment larger than the file system: the first append fails cleanly.
    let (log, _) = open(&dir, JournalSync::Os, 4 << 20, 1);
    let e = log.append(0, &1, Some(&b"x".to_vec()), 1).unwrap_err();
    assert!(e.is_disk_full(), "{e}");
    assert!(e.to_string().contains("free space"), "{e}");
    log.close().unwrap();

    // Fill the disk with appends into 128 KiB segments, with a ballast file taking most of
    // the room: appends fail once no segment can be created, and resume when the ballast
    // goes.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 600 << 10]).unwrap();
    let (log, _) = open(&dir, JournalSync::EveryWrite, 128 << 10, 1);
    let mut acked = Model::new();
    let mut version = 0;
    let full = loop {
        version += 1;
        let val = vec![(version % 251) as u8; 1000];
        match log.append(0, &(version % 50), Some(&val), version) {
            Ok(lsn) => {
                log.wait_synced(&lsn).unwrap();
                acked.insert(version % 50, (Some(val), version));
            }
            Err(e) => break e,
        }
        assert!(version < 10_000, "the disk never filled");
    };
    assert!(full.is_disk_full(), "{full}");
    assert!(version > 100);
    std::fs::remove_file(&ballast).unwrap();
    version += 1;
    let val = vec![7u8; 1000];
    let lsn = log.append(0, &(version % 50), Some(&val), version).unwrap();
    log.wait_synced(&lsn).unwrap();
    acked.insert(version % 50, (Some(val), version));
    log.close().unwrap();
    let (log, replayed) = open(&dir, JournalSync::Os, 128 << 10, 1);
    assert_eq!(replayed, acked);
    log.close().unwrap();
}

#[test]
fn the_engine_can_share_a_journal_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<JournalLog<String, Vec<u8>>>();
    shared::<writebehind::journal::Lsn>();
    shared::<Journal<String, Vec<u8>>>();
    let j = Journal::<u64, Vec<u8>>::new("/nonexistent", Raw, Raw).segment_bytes(1);
    assert!(format!("{j:?}").contains("segment_bytes: 4096"), "{j:?}");
}
