//! A rolling deploy on a real PostgreSQL: instance A (a child process) writes under load;
//! instance B starts later, so with a newer generation, and takes over half the partitions
//! while A still holds unwritten writes of them; A writes its late batches, is killed, and
//! the table holds every key's latest write, B's where B wrote it. Every write of A that
//! lost to B is reported by A as superseded, none silently.
#![cfg(all(unix, feature = "postgres"))]

mod pg;
mod process;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg::need;
use postgres::{Client, NoTls};
use writebehind::stores::PostgresStore;
use writebehind::{version, Cache};

const PARTS: u32 = 8;
const KEYS: u64 = 400;
/// The partitions that move from A to B.
const MOVED: [u32; 4] = [0, 1, 2, 3];
const TABLE: &str = "wb_test_rolling_deploy";

/// The same in every process.
fn part(k: &u64) -> u32 {
    (*k % u64::from(PARTS)) as u32
}

/// Instance A, as a child process: writes keys round and round, printing `ACK key value`
/// for each accepted put; stops writing the moved partitions once the parent says so (its
/// router moved them); on `flush`, writes what it holds and prints what the store refused as
/// superseded, then waits to be killed. Its writes wait for that flush: the write delay is a
/// minute and the count trigger out of reach.
#[test]
fn instance_a() {
    let Ok(ctl) = std::env::var("ROLLING_CTL") else {
        return; // not a child
    };
    let ctl = PathBuf::from(ctl);
    let url = std::env::var("WRITEBEHIND_PG_URL").unwrap();
    let store = PostgresStore::<u64, u64>::connect(&url, TABLE).unwrap();
    let cache = Cache::builder(store)
        .partitions(PARTS, part)
        .write_delay(Duration::from_secs(60))
        .max_batch(100_000)
        .build()
        .unwrap();
    println!("READY");
    let mut moved = false;
    let mut n = 0u64;
    loop {
        if !moved && ctl.join("moved").exists() {
            moved = true;
            println!("MOVED_SEEN");
        }
        if ctl.join("flush").exists() {
            let flushed = cache.flush();
            for f in cache.failed_writes() {
                println!(
                    "SUPERSEDED {} {} {}",
                    f.write.key(),
                    f.write.value().copied().unwrap_or(0),
                    f.error
                );
            }
            println!("FLUSHED {}", flushed.is_ok());
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        n += 1;
        let k = n % KEYS;
        if moved && MOVED.contains(&part(&k)) {
            continue;
        }
        cache.put(k, n).unwrap();
        println!("ACK {k} {n}");
        if n % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Lines of the child's output, collected by a thread.
fn collect(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let out = child.stdout.take().unwrap();
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

fn wait_for(lines: &Mutex<Vec<String>>, what: &str, min: usize) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let n = lines
            .lock()
            .unwrap()
            .iter()
            // (The test harness prints its own words before the child's first line.)
            .filter(|l| l.contains(what))
            .count();
        if n >= min {
            return;
        }
        assert!(Instant::now() < until, "the child never printed {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_rolling_deploy_keeps_the_latest_write_of_every_key() {
    let url = need!("WRITEBEHIND_PG_URL");
    let mut admin = Client::connect(&url, NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .unwrap();
    drop(PostgresStore::<u64, u64>::connect(&url, TABLE).unwrap());
    let ctl = tempfile::tempdir().unwrap();
    let mut a = process::respawn(
        "instance_a",
        &[
            ("ROLLING_CTL", ctl.path().display().to_string()),
            ("WRITEBEHIND_PG_URL", url.clone()),
        ],
    );
    let lines = collect(&mut a);
    wait_for(&lines, "READY", 1);
    wait_for(&lines, "ACK", 2_000);

    // B starts: a newer generation than A's. The router moves half the partitions to it.
    let b = Cache::builder(PostgresStore::<u64, u64>::connect(&url, TABLE).unwrap())
        .partitions(PARTS, part)
        .owned_partitions([])
        .build()
        .unwrap();
    b.acquire_partitions(&MOVED).unwrap();
    std::fs::write(ctl.path().join("moved"), b"").unwrap();
    wait_for(&lines, "MOVED_SEEN", 1);
    // B writes two keys in three of the moved partitions, and flushes.
    let mut by_b = HashMap::new();
    for k in (0..KEYS).filter(|k| MOVED.contains(&part(k)) && k % 3 != 0) {
        let v = 1_000_000_000 + k;
        b.put(k, v).unwrap();
        by_b.insert(k, v);
    }
    b.flush().unwrap();
    // A writes its late batches, then is killed.
    std::fs::write(ctl.path().join("flush"), b"").unwrap();
    wait_for(&lines, "FLUSHED", 1);
    a.kill().unwrap();
    a.wait().unwrap();
    b.flush().unwrap();

    let lines = lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l == "FLUSHED true" || l == "FLUSHED false"),
        "{:?}",
        lines.last()
    );
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut superseded: HashSet<(u64, u64)> = HashSet::new();
    for l in &lines {
        let f: Vec<&str> = l.split(' ').collect();
        match f[0] {
            "ACK" => {
                acked.insert(f[1].parse().unwrap(), f[2].parse().unwrap());
            }
            "SUPERSEDED" => {
                assert!(l.contains("superseded"), "{l}");
                superseded.insert((f[1].parse().unwrap(), f[2].parse().unwrap()));
            }
            _ => {}
        }
    }
    // The table: B's write where B wrote the key, A's last acknowledged one elsewhere.
    let rows = admin
        .query(
            &format!("SELECT key, value, version FROM {TABLE} WHERE NOT deleted"),
            &[],
        )
        .unwrap();
    let table: HashMap<u64, (u64, i64)> = rows
        .iter()
        .map(|r| {
            let k: Vec<u8> = r.get(0);
            let v: Vec<u8> = r.get(1);
            (
                u64::from_be_bytes(k.try_into().unwrap()),
                (u64::from_be_bytes(v.try_into().unwrap()), r.get(2)),
            )
        })
        .collect();
    let mut expected = acked.clone();
    expected.extend(by_b.iter().map(|(k, v)| (*k, *v)));
    let got: HashMap<u64, u64> = table.iter().map(|(k, (v, _))| (*k, *v)).collect();
    assert_eq!(
        got, expected,
        "the table against the latest write of every key"
    );
    // B's rows carry B's (newer) generation.
    let gen_of = |k: &u64| version::generation_of(table[k].1 as u64).unwrap();
    let a_gen = acked
        .keys()
        .filter(|k| !by_b.contains_key(k))
        .map(gen_of)
        .max()
        .unwrap();
    assert!(by_b.keys().all(|k| gen_of(k) > a_gen));
    // None silently lost: A's late write of each key B wrote is reported superseded, and
    // nothing else is.
    let lost: HashSet<(u64, u64)> = by_b.keys().map(|k| (*k, acked[k])).collect();
    assert_eq!(superseded, lost);
}
