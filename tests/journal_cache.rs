//! The journal wired into the cache: what `put` acknowledges survives the death of the
//! process (a real SIGKILL of a child process), `build` replays it, a clean close leaves the
//! journal empty, one cache per directory, and a full disk refuses writes with a clear error.

mod process;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use writebehind::journal::{Journal, JournalError, JournalSync};
use writebehind::stores::Raw;
use writebehind::testing::FaultyStore;
use writebehind::{Cache, Error, MemoryStore, Store, Write};

type Store64 = Arc<FaultyStore<u64, u64>>;

fn journal(dir: &Path, mode: JournalSync) -> Journal<u64, u64> {
    Journal::new(dir, Raw, Raw)
        .sync(mode)
        .segment_bytes(64 << 10)
        .checkpoint_bytes(2 << 20)
}

fn cache(store: &Store64, dir: &Path, mode: JournalSync) -> Result<Cache<u64, u64>, Error> {
    Cache::builder(store.clone())
        .journal(journal(dir, mode))
        .write_delay(Duration::from_millis(5))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(20))
        .flush_timeout(Duration::from_secs(10))
        .shards(4)
        .build()
}

fn journal_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".log") || name.ends_with(".ckpt")
        })
        .count()
}

#[test]
fn writes_a_down_store_never_took_are_replayed_by_the_next_cache() {
    let dir = tempfile::tempdir().unwrap();
    let down: Store64 = Arc::new(FaultyStore::new());
    down.set_down(true);
    let c = cache(
        &down,
        dir.path(),
        JournalSync::Interval(Duration::from_millis(5)),
    )
    .unwrap();
    for k in 0..100 {
        c.put(k, k * 10).unwrap();
    }
    c.remove(&7).unwrap();
    let report = c.close(Duration::from_millis(50));
    assert_eq!(
        report.unwritten.len(),
        100,
        "the store was down: close hands all back"
    );
    drop(c);

    // A new cache over the same journal and a healthy store writes them.
    let store: Store64 = Arc::new(FaultyStore::new());
    store.memory().insert(7, 1); // the delete must reach it
    let c = cache(&store, dir.path(), JournalSync::Os).unwrap();
    assert_eq!(
        c.get(&5).unwrap(),
        Some(50),
        "replayed writes are read back at once"
    );
    assert_eq!(
        c.get(&7).unwrap(),
        None,
        "a replayed delete hides the store's row"
    );
    c.flush().unwrap();
    for k in 0..100 {
        let want = if k == 7 { None } else { Some(k * 10) };
        assert_eq!(store.memory().get(&k), want, "key {k}");
    }
    let m = c.metrics();
    let j = m.journal.expect("journal stats");
    assert_eq!(j.replay.keys, 100);
    // New versions start above every journaled one.
    let v = c.put(1, 11).unwrap();
    assert!(v > j.replay.max_version);
    assert!(c.close(Duration::from_secs(5)).is_clean());
}

#[test]
fn replay_never_writes_over_a_newer_version_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let down: Store64 = Arc::new(FaultyStore::new());
    down.set_down(true);
    let c = cache(&down, dir.path(), JournalSync::Os).unwrap();
    let old = c.put(1, 100).unwrap();
    let _ = c.close(Duration::from_millis(20));
    drop(c);

    // Meanwhile another writer put a newer version of key 1 into the store.
    let store: Store64 = Arc::new(FaultyStore::new());
    store
        .write_all(&[Write::Put {
            key: 1,
            value: 999,
            version: old + 1_000_000,
        }])
        .unwrap();
    let c = cache(&store, dir.path(), JournalSync::Os).unwrap();
    c.flush().unwrap();
    assert_eq!(
        store.memory().get(&1),
        Some(999),
        "the older journaled write lost"
    );
    assert!(c.close(Duration::from_secs(5)).is_clean());
}

#[test]
fn a_clean_close_leaves_an_empty_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store: Store64 = Arc::new(FaultyStore::new());
    let c = cache(
        &store,
        dir.path(),
        JournalSync::Interval(Duration::from_millis(5)),
    )
    .unwrap();
    for k in 0..1000 {
        c.put(k % 50, k).unwrap();
    }
    assert!(c.close(Duration::from_secs(5)).is_clean());
    drop(c);
    let c = cache(&store, dir.path(), JournalSync::Os).unwrap();
    let replay = c.metrics().journal.unwrap().replay;
    assert_eq!(
        replay.keys, 0,
        "everything was in the store: nothing to replay"
    );
    assert!(c.close(Duration::from_secs(5)).is_clean());
    drop(c);
    assert!(
        journal_files(dir.path()) <= 4,
        "at most an empty checkpoint per shard is left"
    );
}

#[test]
fn the_journal_stays_bounded_while_the_store_keeps_up() {
    let dir = tempfile::tempdir().unwrap();
    let store: Store64 = Arc::new(FaultyStore::new());
    let c = cache(&store, dir.path(), JournalSync::Os).unwrap();
    let mut most = 0;
    for round in 0..30u64 {
        for k in 0..20_000u64 {
            c.put(k % 1000, round * 100_000 + k).unwrap();
        }
        c.flush().unwrap();
        most = most.max(c.metrics().journal.unwrap().bytes);
    }
    // 600,000 records of about 40 bytes (24 MB) went through; checkpoints keep the journal
    // near its 2 MiB trigger (and twice the live set), not the history of writes.
    let j = c.metrics().journal.unwrap();
    assert!(j.records >= 600_000);
    assert!(j.checkpoints > 0, "no checkpoint ran");
    assert!(most < 8 << 20, "the journal grew to {most} bytes");
    assert!(c.close(Duration::from_secs(5)).is_clean());
}

#[test]
fn a_second_cache_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store: Store64 = Arc::new(FaultyStore::new());
    let first = cache(&store, dir.path(), JournalSync::Os).unwrap();
    match cache(&store, dir.path(), JournalSync::Os) {
        Err(Error::Journal(e)) => assert!(matches!(*e, JournalError::Locked { .. }), "{e}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("two caches opened one journal"),
    }
    assert!(first.close(Duration::from_secs(5)).is_clean());
    drop(first);
    // Closed: the directory is free again.
    let again = cache(&store, dir.path(), JournalSync::Os).unwrap();
    assert!(again.close(Duration::from_secs(5)).is_clean());
}

#[test]
fn every_write_returns_once_its_record_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let store: Store64 = Arc::new(FaultyStore::new());
    let c = Arc::new(cache(&store, dir.path(), JournalSync::EveryWrite).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    c.put(t * 1000 + i, i).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let j = c.metrics().journal.unwrap();
    assert_eq!(j.records, 800);
    assert!(j.syncs > 0 && j.syncs <= 800, "{j:?}");
    assert!(c.close(Duration::from_secs(5)).is_clean());
}

// ---------------------------------------------------------------------------------------
// A real crash: SIGKILL of a child process writing under load, its store down.
// ---------------------------------------------------------------------------------------

const CHILD_DIR: &str = "WRITEBEHIND_CACHE_JOURNAL_DIR";
const CHILD_MODE: &str = "WRITEBEHIND_CACHE_JOURNAL_MODE";

/// Runs only as a child of `acknowledged_puts_survive_sigkill` (the test binary started
/// again with an env var): puts until killed, printing each acknowledged put.
#[test]
fn journal_child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let mode = match std::env::var(CHILD_MODE).as_deref() {
        Ok("every") => JournalSync::EveryWrite,
        Ok("interval") => JournalSync::Interval(Duration::from_millis(5)),
        _ => JournalSync::Os,
    };
    // The store is down: the writes live in the cache and the journal only. Small segments
    // and checkpoints: checkpoints reclaim segments within the first thousand puts, and the
    // appends after go to reused files, which the kill then leaves holding records of their
    // earlier use past the new ones.
    let store: Store64 = Arc::new(FaultyStore::new());
    store.set_down(true);
    let c = Cache::builder(store.clone())
        .journal(
            Journal::new(Path::new(&dir), Raw, Raw)
                .sync(mode)
                .segment_bytes(8 << 10)
                .checkpoint_bytes(16 << 10),
        )
        .write_delay(Duration::from_millis(5))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(20))
        .shards(4)
        .build()
        .unwrap();
    let start: u64 = std::env::var("WRITEBEHIND_CACHE_JOURNAL_START")
        .unwrap()
        .parse()
        .unwrap();
    let mut reused = false;
    for n in start.. {
        let key = n % 97;
        c.put(key, n).unwrap();
        println!("ACK {key} {n}");
        if !reused && c.metrics().journal.is_some_and(|j| j.segments_reused > 0) {
            reused = true;
            println!("REUSED");
        }
    }
}

fn child(dir: &Path, mode: &str, start: u64) -> std::process::Child {
    process::respawn(
        "journal_child_process",
        &[
            (CHILD_DIR, dir.display().to_string()),
            (CHILD_MODE, mode.to_string()),
            ("WRITEBEHIND_CACHE_JOURNAL_START", start.to_string()),
        ],
    )
}

fn parse_ack(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("ACK ")?;
    let mut it = rest.split_whitespace().map(|x| x.parse::<u64>());
    match (it.next(), it.next()) {
        (Some(Ok(k)), Some(Ok(v))) => Some((k, v)),
        _ => None, // a line the kill cut short was not acknowledged
    }
}

#[test]
fn acknowledged_puts_survive_sigkill() {
    let mut seed = std::process::id() as u64 | 1;
    let mut below = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for mode in ["every", "interval", "os"] {
        let dir = tempfile::tempdir().unwrap();
        let mut acked: HashMap<u64, u64> = HashMap::new();
        let mut next = 1;
        // Rounds killed after the child appended to a reused segment file.
        let mut reused_rounds = 0;
        // The system of record, which outlives every crash of the cache.
        let store = Arc::new(MemoryStore::<u64, u64>::new());
        for round in 0..3 {
            let mut c = child(dir.path(), mode, next);
            let mut out = BufReader::new(c.stdout.take().unwrap());
            // Kill at a random moment: after a random number of acknowledged puts (in the
            // faster modes, past the first reuse of a segment file).
            let kill_after = if mode == "every" {
                100 + below(300)
            } else {
                2000 + below(4000)
            };
            let mut line = String::new();
            let mut n = 0;
            while n < kill_after {
                line.clear();
                assert!(
                    out.read_line(&mut line).unwrap() > 0,
                    "the child died early"
                );
                if line.trim_end() == "REUSED" {
                    reused_rounds += 1;
                }
                if let Some((k, v)) = parse_ack(line.trim_end()) {
                    acked.insert(k, v);
                    next = next.max(v + 1);
                    n += 1;
                }
            }
            c.kill().unwrap();
            // Lines printed before the kill were acknowledged before it.
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Some((k, v)) = parse_ack(&line) {
                    acked.insert(k, v);
                    next = next.max(v + 1);
                }
            }
            c.wait().unwrap();
            next += 1_000_000; // above anything the killed child may have journaled

            // Restart over the same journal with a healthy store, flush, check.
            let restarted: Cache<u64, u64> = Cache::builder(store.clone())
                .journal(journal(dir.path(), JournalSync::Os))
                .shards(4)
                .build()
                .unwrap();
            restarted.flush().unwrap();
            for (&k, &v) in &acked {
                let got = store.get(&k).unwrap_or_else(|| {
                    panic!("{mode} round {round}: acknowledged key {k} (value {v}) lost")
                });
                // Values grow per key: the store holds the last acknowledged put or a later
                // one the child journaled before it printed it.
                assert!(
                    got >= v,
                    "{mode} round {round}: key {k} went back from {v} to {got}"
                );
            }
            assert!(restarted.close(Duration::from_secs(5)).is_clean());
        }
        if mode != "every" {
            assert!(
                reused_rounds > 0,
                "{mode}: no round appended to a reused segment before its kill"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// A full disk: writes are refused with a clear error, reads go on, nothing acknowledged is
// lost, and writes are accepted again once there is room.
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_disk_refuses_writes_and_recovers() {
    let Some(fs) = process::Tmpfs::mount("2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let dir = fs.path().join("wb");
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 1200 << 10]).unwrap();
    let store: Store64 = Arc::new(FaultyStore::new());
    store.set_down(true); // everything stays in the journal
    let c: Cache<u64, u64> = Cache::builder(store.clone())
        .journal(
            Journal::new(&dir, Raw, Raw)
                .sync(JournalSync::EveryWrite)
                .segment_bytes(64 << 10),
        )
        .shards(1)
        .build()
        .unwrap();
    let mut acked = HashMap::new();
    let mut n = 0u64;
    let refused = loop {
        n += 1;
        match c.put(n % 500, n) {
            Ok(_) => {
                acked.insert(n % 500, n);
            }
            Err(e) => break e,
        }
        assert!(n < 1_000_000, "the disk never filled");
    };
    match &refused {
        Error::Journal(e) => assert!(e.is_disk_full(), "{e}"),
        e => panic!("expected a journal error, got {e}"),
    }
    assert!(refused.to_string().contains("journal"), "{refused}");
    // The refused write was not made; reads go on.
    assert_eq!(c.get(&(n % 500)).unwrap(), acked.get(&(n % 500)).copied());
    // Room again: writes are accepted.
    std::fs::remove_file(&ballast).unwrap();
    c.put(n % 500, n).unwrap();
    acked.insert(n % 500, n);
    let report = c.close(Duration::from_millis(20));
    assert_eq!(report.unwritten.len(), acked.len());
    drop(c);
    // Everything acknowledged is replayed.
    let healthy: Store64 = Arc::new(FaultyStore::new());
    let c: Cache<u64, u64> = Cache::builder(healthy.clone())
        .journal(Journal::new(&dir, Raw, Raw).segment_bytes(64 << 10))
        .shards(1)
        .build()
        .unwrap();
    c.flush().unwrap();
    for (k, v) in &acked {
        assert_eq!(healthy.memory().get(k), Some(*v), "key {k}");
    }
    assert!(c.close(Duration::from_secs(5)).is_clean());
}
