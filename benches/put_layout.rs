//! Put (update of an existing key, Zipf 1.0) throughput of writebehind with no flusher thread
//! and with one, against dashmap, the same update built by hand (64 padded locks around
//! hashbrown tables of 56-byte entries), the *store floor* and the hand-rolled write-behind of
//! the benches (`benches/common`: dashmap, a channel, one writer thread), and the same update
//! on a dense table of 32-byte entries behind a `u32` index, in one process, interleaved
//! over nine rounds. A diagnostic for the put path (docs/BENCHMARKS.md, "Floors"); the
//! targets are measured by `benches/ratio.rs` and `benches/peers.rs`.
//!
//! The store floor is the least work any write-behind must do for these puts: a dashmap
//! insert per put, and for the share of puts that writebehind's flusher sent to the store
//! (its records per put over a calibration run and every flushing run before the floor's;
//! perfect conflation, so no design sends fewer) one dashmap read of the value and one record
//! in a `MemoryStore::write_all` batch of 1,000, all on the putting thread: no flusher
//! thread, no lock or line shared with one, no epochs, no dirty bookkeeping. It picks the recorded puts evenly rather than the cold keys the engine
//! really sends, so it errs fast. Its ratio to dashmap bounds what a write-behind can reach
//! on this workload with this store.
//!
//! `cargo bench --bench put_layout [-- threads keys]` (defaults 2 and 131072; `PUT_OPS` puts
//! per thread per contender per round, default 1,000,000).

use std::sync::Arc;
use std::time::Instant;

use writebehind::testing::{scatter, Rng, Zipf};
use writebehind::{Cache, MemoryStore, Store, Write};

/// The benches' contenders: this diagnostic runs their hand-rolled write-behind ([`Hand`]).
mod common;
use common::{Hand, SyncCache};

mod diagnostic;
use diagnostic::bench_args;

mod layout;
use layout::Shards;

/// The update of writebehind's table built by hand ([`Shards`] around hashbrown tables of
/// 56-byte entries): an update replaces the value, takes a version from the table and counts
/// the put.
struct HandBuilt {
    shards: Shards<HandTable>,
}

#[derive(Default)]
struct HandTable {
    map: hashbrown::HashTable<Entry>,
    next_version: u64,
    puts: u64,
}

struct Entry {
    key: u64,
    value: Option<u64>,
    version: u64,
    _rest: [u64; 3],
}

impl HandBuilt {
    fn new(n: u64) -> Self {
        let shards = Shards::new();
        let entry = |key| Entry {
            key,
            value: Some(key),
            version: 0,
            _rest: [0; 3],
        };
        shards.fill(n, entry, |t: &mut HandTable| &mut t.map, |e| e.key);
        HandBuilt { shards }
    }

    #[inline]
    fn put(&self, key: u64, value: u64) {
        let h = self.shards.hasher.hash_one(key);
        let mut t = self.shards.lock(h);
        let version = t.next_version;
        t.next_version += 1;
        t.puts += 1;
        if let Some(e) = t.map.find_mut(h, |e| e.key == key) {
            e.value = Some(value);
            e.version = version;
        }
    }
}

/// The same update on the design's least entry (32 bytes: key, value, version, a word for the
/// epoch tag and flags) kept in a dense vector behind a `u32` index: what that layout costs
/// an update.
struct HandDense {
    shards: Shards<DenseTable>,
}

#[derive(Default)]
struct DenseTable {
    index: hashbrown::HashTable<u32>,
    slots: Vec<Entry32>,
    next_version: u64,
    puts: u64,
}

struct Entry32 {
    key: u64,
    value: u64,
    version: u64,
    _tag_and_flags: u64,
}

impl HandDense {
    fn new(n: u64) -> Self {
        let shards: Shards<DenseTable> = Shards::new();
        for k in 0..n {
            let h = shards.hasher.hash_one(k);
            let mut t = shards.lock(h);
            let t = &mut *t;
            let i = u32::try_from(t.slots.len()).expect("a shard holds fewer than 2^32 keys");
            t.slots.push(Entry32 {
                key: k,
                value: k,
                version: 0,
                _tag_and_flags: 0,
            });
            let (slots, hasher) = (&t.slots, &shards.hasher);
            t.index
                .insert_unique(h, i, |&i| hasher.hash_one(slots[i as usize].key));
        }
        HandDense { shards }
    }

    #[inline]
    fn put(&self, key: u64, value: u64) {
        let h = self.shards.hasher.hash_one(key);
        let mut t = self.shards.lock(h);
        let t = &mut *t;
        let version = t.next_version;
        t.next_version += 1;
        t.puts += 1;
        let slots = &t.slots;
        if let Some(&i) = t.index.find(h, |&i| slots[i as usize].key == key) {
            let e = &mut t.slots[i as usize];
            e.value = value;
            e.version = version;
        }
    }
}

/// `count` keys of Zipf(1.0) over `0..n`, ranks scattered over the key space.
fn zipf_keys(n: u64, count: usize, seed: u64) -> Vec<u64> {
    let zipf = Zipf::new(n, 1.0);
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| scatter(zipf.sample(&mut rng), n))
        .collect()
}

/// The store floor's per-thread state: records due (in millionths of a record) and the
/// batch being built.
struct Floor {
    due: u64,
    per_put: u64,
    batch: Vec<Write<u64, u64>>,
}

impl Floor {
    fn new(per_put: u64) -> Self {
        Floor {
            due: 0,
            per_put,
            batch: Vec::with_capacity(1000),
        }
    }

    #[inline]
    fn put(
        &mut self,
        dm: &dashmap::DashMap<u64, u64, ahash::RandomState>,
        store: &MemoryStore<u64, u64>,
        k: u64,
        v: u64,
    ) {
        dm.insert(k, v);
        self.due += self.per_put;
        if self.due >= 1_000_000 {
            self.due -= 1_000_000;
            let value = *dm.get(&k).expect("just inserted");
            self.batch.push(Write::Put {
                key: k,
                value,
                version: v,
            });
            if self.batch.len() == 1000 {
                store.write_all(&self.batch).expect("in-memory store");
                self.batch.clear();
            }
        }
    }
}

/// CPU time (user + system) of this process's flusher threads so far, from `/proc` (Linux;
/// `None` elsewhere). Only the flushing cache has a flusher thread.
fn flusher_cpu_seconds() -> Option<f64> {
    let mut total = 0.0;
    let mut found = false;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // Thread names are cut to 15 bytes in `comm`: "writebehind-flusher-0" reads
        // "writebehind-flu".
        if !comm.contains("-flu") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        total += ticks / 100.0;
        found = true;
    }
    found.then_some(total)
}

/// Lowers the priority of this process's threads named `name` by `levels` nice levels
/// (Linux; elsewhere it says it cannot).
fn lower_thread_priority(name: &str, levels: u8) {
    #[cfg(target_os = "linux")]
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        if comm.trim_end() == name {
            // SAFETY: plain system calls on one of this process's threads; no memory is
            // passed. Raising a nice value needs no privilege.
            let done = unsafe {
                let now = libc::getpriority(libc::PRIO_PROCESS, tid);
                libc::setpriority(libc::PRIO_PROCESS, tid, (now + i32::from(levels)).min(19))
            };
            eprintln!("{name} ({tid}): {levels} nice levels lower: {}", done == 0);
        }
    }
    #[cfg(not(target_os = "linux"))]
    eprintln!("{name}: thread priorities are set on Linux only ({levels} levels asked)");
}

fn main() {
    let Some(args) = bench_args() else { return };
    let mut args = args.into_iter();
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1 << 17);
    let ops: usize = std::env::var("PUT_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    // `PUT_ONLY=i`: run contender `i` alone (for callgrind).
    let only: Option<usize> = std::env::var("PUT_ONLY").ok().and_then(|s| s.parse().ok());
    let keys: Vec<Vec<u64>> = (0..threads)
        .map(|t| zipf_keys(n, ops, 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1)))
        .collect();
    let manual: Cache<u64, u64> = Cache::builder(Arc::new(MemoryStore::new()))
        .manual_flushing()
        .build()
        .expect("valid configuration");
    // `PUT_FLUSHER_NICE=n`: the flushing cache's flusher n nice levels below the putting
    // threads (`Builder::flusher_nice`); `PUT_HAND_NICE=n`: the hand-rolled write-behind's
    // writer thread likewise (Linux), to see whether it gains as the engine does.
    let env_nice = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u8>().ok());
    let flushed: Cache<u64, u64> = Cache::builder(Arc::new(MemoryStore::new()))
        .flusher_nice(env_nice("PUT_FLUSHER_NICE").unwrap_or(0))
        .build()
        .expect("default configuration");
    let hand = HandBuilt::new(n);
    let dense = HandDense::new(n);
    let dm = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let floor_dm = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let floor_store = MemoryStore::new();
    let rolled = Hand::<u64>::new(Arc::new(MemoryStore::new()));
    if let Some(n) = env_nice("PUT_HAND_NICE") {
        lower_thread_priority(common::HAND_WRITER, n);
    }
    for k in 0..n {
        manual.put(k, k).expect("open");
        flushed.put(k, k).expect("open");
        dm.insert(k, k);
        floor_dm.insert(k, k);
        SyncCache::put(&*rolled, k, k);
    }
    rolled.settle();
    manual.flush().expect("in-memory store");
    flushed.flush().expect("in-memory store");
    // Calibration: the flusher's records per put on this workload, for the store floor's
    // first round; later rounds use the share of every flushing run so far.
    let before = flushed.metrics();
    std::thread::scope(|s| {
        for ks in &keys {
            let flushed = &flushed;
            s.spawn(move || {
                for &k in ks {
                    flushed.put(k, k).expect("open");
                }
            });
        }
    });
    // Everything the run dirtied, written: the share counts every record the run cost.
    flushed.flush().expect("in-memory store");
    let after = flushed.metrics();
    let share = |m: &writebehind::Metrics| {
        ((m.records_written - before.records_written) as f64 / (m.puts - before.puts).max(1) as f64
            * 1e6) as u64
    };
    let mut per_put = share(&after);
    let names = [
        "writebehind, no flusher",
        "writebehind, flusher",
        "hand-built table",
        "dashmap",
        "store floor",
        "hand-rolled write-behind",
        "hand-built dense 32 B",
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Wall time of the flushing cache's timed runs, for the flusher's share of the cores.
    let mut flushing_wall = 0.0;
    for round in 0..9 {
        for j in 0..names.len() {
            let i = (j + round) % names.len();
            if only.is_some_and(|o| o != i) {
                continue;
            }
            if i == 4 {
                per_put = share(&flushed.metrics());
            }
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for ks in &keys {
                    let (manual, flushed, hand, dm) = (&manual, &flushed, &hand, &dm);
                    let dense = &dense;
                    let (floor_dm, floor_store, rolled) = (&floor_dm, &floor_store, &rolled);
                    s.spawn(move || {
                        let mut floor = Floor::new(per_put);
                        for &k in ks {
                            match i {
                                0 => {
                                    manual.put(k, k).expect("open");
                                }
                                1 => {
                                    flushed.put(k, k).expect("open");
                                }
                                2 => hand.put(k, k),
                                3 => {
                                    dm.insert(k, k);
                                }
                                4 => floor.put(floor_dm, floor_store, k, k),
                                5 => SyncCache::put(&**rolled, k, k),
                                _ => dense.put(k, k),
                            }
                        }
                        if !floor.batch.is_empty() {
                            floor_store
                                .write_all(&floor.batch)
                                .expect("in-memory store");
                        }
                    });
                }
            });
            // Inside the timed part: a backlog left in the flusher's rings or in the channel
            // is paid for.
            if i == 1 {
                flushed.flush().expect("in-memory store");
            }
            if i == 5 {
                rolled.settle();
            }
            let secs = t0.elapsed().as_secs_f64();
            if i == 1 {
                flushing_wall += secs;
            }
            rates[i].push((threads * ops) as f64 / secs / 1e6);
            if i == 0 {
                manual.flush().expect("in-memory store");
            }
        }
    }
    println!("{n} keys, Zipf 1.0, {ops} puts per thread per contender per round, 9 rounds, {threads} threads");
    println!("| contender | median Mops/s | min | max | ns per put per thread |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in names.iter().zip(rates.iter_mut()) {
        if r.len() < 9 {
            continue;
        }
        r.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r[4],
            r[0],
            r[8],
            threads as f64 * 1e3 / r[4]
        );
    }
    let m = flushed.metrics();
    println!(
        "flusher: puts {}, records written {} ({:.1}%), batches {}; store floor: {:.1}% of \
         puts recorded (its last round: the flushing runs' share until then)",
        m.puts,
        m.records_written,
        100.0 * m.records_written as f64 / m.puts.max(1) as f64,
        m.batches,
        per_put as f64 / 1e4
    );
    if let Some(cpu) = flusher_cpu_seconds() {
        println!(
            "flusher thread CPU: {:.2} s for {} records ({:.0} ns per record, whole run)",
            cpu,
            m.records_written,
            cpu * 1e9 / m.records_written.max(1) as f64
        );
        // Under a saturating load the flusher is never idle for long: a cheaper record makes
        // its windows shorter (fewer puts conflate), not its share smaller. The share is the
        // whole run's flusher CPU (it also wrote the prefill, a small part) over the flushing
        // cache's timed runs.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if flushing_wall > 0.0 {
            println!(
                "flusher thread: {:.0} % of {cores} cores during the flushing cache's timed runs \
                 ({:.2} s of CPU in {:.2} s)",
                100.0 * cpu / (flushing_wall * cores as f64),
                cpu,
                flushing_wall
            );
        }
    }
    let median = |i: usize| rates[i].get(4).copied().unwrap_or(f64::NAN);
    if only.is_none() {
        println!(
            "ratios: writebehind (flusher) / dashmap {:.2}x, store floor / dashmap {:.2}x, \
         writebehind (no flusher) / hand-built table {:.2}x; against the hand-rolled \
         write-behind: writebehind (flusher) {:.2}x, writebehind (no flusher) {:.2}x, store \
         floor {:.2}x; hand-built dense 32 B / hand-built table {:.2}x",
            median(1) / median(3),
            median(4) / median(3),
            median(0) / median(2),
            median(1) / median(5),
            median(0) / median(5),
            median(4) / median(5),
            median(6) / median(2)
        );
    }
}
