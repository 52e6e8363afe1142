//! The ratio report: the headline workloads for every contender in one process,
//! interleaved (the order rotates each round), several rounds; prints each contender's median
//! throughput and the ratio writebehind/peer, checks the targets, and checks conflation.
//! writebehind runs twice: with the defaults (`writebehind`, the subject of every ratio
//! column) and with its flusher 10 nice levels below the benchmark threads
//! (`writebehind-nice10`, `Builder::flusher_nice`), whose put targets get rows of their own.
//!
//! Two ratios per peer: the ratio of the medians, and the median of the per-round ratios
//! (writebehind's run of a round against the peer's run of the same round, a second or so
//! apart). The VM drifts by tens of percent over seconds; the paired ratio cancels drift
//! slower than a round. The targets table gives both, and in how many rounds the paired
//! ratio reached the target.
//!
//! The workloads (2 threads, `u64` keys and values), by their `RATIO_WORKLOADS` names:
//!
//! | name | what every thread does |
//! | --- | --- |
//! | `get` | gets of prefilled keys, uniform over the key space |
//! | `get_hot1` | gets of one prefilled key, the same every time |
//! | `get_hot16` | gets of 16 prefilled keys, uniform over them |
//! | `get_zipf` | gets of prefilled keys, Zipf 1.0 over the key space |
//! | `put_zipf` | puts of prefilled keys, Zipf 1.0, the flusher writing to the in-memory store |
//! | `put_distinct` | puts of keys never seen before |
//! | `mixed` | 90 % gets, 10 % puts, Zipf 1.0 |
//!
//! The get workloads also time two floors (`common::LockFloor`): a get under the design's
//! shard lock with nothing of writebehind's own, over a bare 16-byte entry (the key and the
//! value) and over the least entry the design allows (32 bytes: the key, the value, a
//! version, a word of epoch tag and flags, the tombstone flag read on a hit). The report
//! sets the uniform get's targets against them: what the design allows next to what
//! writebehind does.
//!
//! `cargo bench --bench ratio` (env: `RATIO_ROUNDS`, default 7; `RATIO_MS`, the aimed length
//! of one contender's run in milliseconds, default 150; `RATIO_ONLY`, a comma-separated list
//! of contenders, e.g. `writebehind,dashmap`; `RATIO_WORKLOADS`, a comma-separated subset of
//! `get,get_hot1,get_hot16,get_zipf,put_zipf,put_distinct,mixed`, for profiling some of them;
//! with either of the two set, the report stops before the targets).

// wb-cache's futures are deep.
#![recursion_limit = "512"]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use writebehind::testing::{scatter, Rng, Zipf};
use writebehind::{Cache, MemoryStore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prefilled keys (`RATIO_KEYSPACE` overrides).
fn keyspace() -> u64 {
    env_u64("RATIO_KEYSPACE", 1 << 17)
}
const SEED: u64 = 0x5EED_0007;
const THREADS: usize = 2;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (NaN for no values).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Row {
    kind: Kind,
    median: f64,
    min: f64,
    max: f64,
    /// Throughput (ops/s) of each round, in round order.
    rounds: Vec<f64>,
}

/// Runs one workload for every contender; returns median throughput (ops/s) per contender.
fn workload(name: &str, w: Workload, rounds: u64, aim: Duration) -> Vec<Row> {
    let plan = Arc::new(Plan::new(w, THREADS, SEED));
    let only = std::env::var("RATIO_ONLY").ok();
    // The get workloads also time the two shard-lock floors (`LockFloor`): what a get under
    // the design's shard lock costs with nothing of writebehind's own.
    let floors = if w.mix == Mix::GetHit {
        &Kind::FLOORS[..]
    } else if w.mix == Mix::Put && w.dist == Dist::Zipf {
        // And the Zipf put the journaled engine, beside the same engine without a journal.
        &Kind::JOURNALED[..]
    } else {
        &[]
    };
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .chain(floors.iter().copied())
        .filter(|k| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|o| o == k.name()))
        })
        .collect();
    let mut runners: Vec<Runner<u64>> = kinds.iter().map(|k| Runner::new(*k, None, true)).collect();
    // Calibrate: ops per thread so one run takes about `aim`.
    let mut ops = Vec::new();
    for r in &mut runners {
        let probe = 20_000;
        let d = r.timed_run(&plan, THREADS, probe, 1);
        let rate = probe as f64 / d.as_secs_f64().max(1e-9);
        ops.push(((rate * aim.as_secs_f64()) as u64).clamp(5_000, 20_000_000));
    }
    let mut samples: Vec<Vec<f64>> = kinds.iter().map(|_| Vec::new()).collect();
    let trace = std::env::var("RATIO_TRACE").is_ok_and(|v| v == "1");
    for round in 0..rounds {
        for j in 0..kinds.len() {
            let i = (j + round as usize) % kinds.len();
            let d = runners[i].timed_run(&plan, THREADS, ops[i], round + 2);
            let rate = (ops[i] * THREADS as u64) as f64 / d.as_secs_f64();
            if trace {
                eprintln!(
                    "round {round} {}: {:.2} Mops/s",
                    kinds[i].name(),
                    rate / 1e6
                );
            }
            samples[i].push(rate);
        }
    }
    let reports: Vec<String> = runners
        .iter()
        .filter_map(|r| r.cached.as_ref())
        .filter_map(|c| c.report().map(|r| format!("{}: {r}", c.name())))
        .collect();
    drop(runners);
    let rows: Vec<Row> = kinds
        .iter()
        .zip(samples)
        .map(|(k, s)| Row {
            kind: *k,
            min: s.iter().cloned().fold(f64::INFINITY, f64::min),
            max: s.iter().cloned().fold(0.0, f64::max),
            median: median(&mut s.clone()),
            rounds: s,
        })
        .collect();
    let wb = rows
        .iter()
        .find(|r| r.kind == Kind::Writebehind)
        .map_or(f64::NAN, |r| r.median);
    println!("\n### {name} ({THREADS} threads, 8-byte values, {rounds} rounds)\n");
    println!(
        "| contender | median Mops/s | min | max | writebehind / peer | paired (median of rounds) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
            r.kind.name(),
            r.median / 1e6,
            r.min / 1e6,
            r.max / 1e6,
            wb / r.median,
            median(&mut paired(&rows, Kind::Writebehind, r.kind))
        );
    }
    for r in reports {
        println!("\n{r} (whole workload, calibration included)");
    }
    rows
}

/// `subject`'s throughput (writebehind in one configuration) over `k`'s, round by round
/// (empty if either did not run).
fn paired(rows: &[Row], subject: Kind, k: Kind) -> Vec<f64> {
    let of = |k| rows.iter().find(|r| r.kind == k).map(|r| &r.rounds);
    match (of(subject), of(k)) {
        (Some(w), Some(p)) => w.iter().zip(p).map(|(w, p)| w / p).collect(),
        _ => Vec::new(),
    }
}

fn ratio(rows: &[Row], subject: Kind, k: Kind) -> f64 {
    let of = |k| {
        rows.iter()
            .find(|r| r.kind == k)
            .map_or(f64::NAN, |r| r.median)
    };
    of(subject) / of(k)
}

/// One target: the ratio of the medians decides the verdict; the paired ratio and the rounds
/// whose paired ratio reached the target say how firm it is.
fn target(what: &str, rows: &[Row], subject: Kind, k: Kind, want: f64) {
    if !rows.iter().any(|r| r.kind == subject) || !rows.iter().any(|r| r.kind == k) {
        return;
    }
    let got = ratio(rows, subject, k);
    let mut pairs = paired(rows, subject, k);
    let reached = pairs.iter().filter(|&&r| r >= want).count();
    let n = pairs.len();
    let verdict = if got >= want { "met" } else { "MISSED" };
    println!(
        "| {what} | >= {want:.1}x | {got:.2}x | {:.2}x | {reached}/{n} | {verdict} |",
        median(&mut pairs)
    );
}

/// Perfect conflation: with manual flushing, every flush window's store writes must equal
/// the number of distinct keys put in that window (Zipf 1.0 keys, so most puts repeat).
fn conflation(windows: usize, puts_per_window: usize) {
    let store = Arc::new(MemoryStore::<u64, u64>::new());
    let cache: Cache<u64, u64> = Cache::builder(store.clone())
        .manual_flushing()
        .build()
        .expect("valid config");
    let zipf = Zipf::new(keyspace(), 1.0);
    let mut rng = Rng::new(SEED);
    let (mut equal, mut total_puts, mut total_distinct, mut total_writes) = (0, 0, 0, 0);
    for _ in 0..windows {
        let before = store.records();
        let mut distinct = HashSet::new();
        for i in 0..puts_per_window {
            let k = scatter(zipf.sample(&mut rng), keyspace());
            distinct.insert(k);
            cache.put(k, i as u64).expect("open");
        }
        cache.flush().expect("in-memory store");
        let writes = store.records() - before;
        equal += usize::from(writes == distinct.len() as u64);
        total_puts += puts_per_window;
        total_distinct += distinct.len();
        total_writes += writes;
    }
    println!(
        "\nconflation: {equal}/{windows} flush windows had store writes == distinct keys dirtied \
         ({total_puts} puts, {total_distinct} distinct keys per window summed, {total_writes} store writes)"
    );
}

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cpus} CPUs, {cpu}; load average at start: {}",
        load.trim()
    );
}

fn main() {
    let rounds = env_u64("RATIO_ROUNDS", 7);
    let aim = Duration::from_millis(env_u64("RATIO_MS", 150));
    let t0 = Instant::now();
    let only = std::env::var("RATIO_ONLY").ok();
    machine();
    let on = |mix, dist| Workload {
        mix,
        dist,
        keyspace: keyspace(),
    };
    let chosen = std::env::var("RATIO_WORKLOADS").ok();
    let want = |w: &str| {
        chosen
            .as_deref()
            .is_none_or(|c| c.split(',').any(|c| c == w))
    };
    let run = |key: &str, name: &str, w: Workload| {
        if want(key) {
            workload(name, w, rounds, aim)
        } else {
            Vec::new()
        }
    };
    let get = run("get", "get hit (uniform)", on(Mix::GetHit, Dist::Uniform));
    let hot = |n| on(Mix::GetHit, Dist::Hot(n));
    let hot1 = run("get_hot1", "get hit (one hot key)", hot(1));
    run("get_hot16", "get hit (16 hot keys, uniform)", hot(16));
    let zipf = on(Mix::GetHit, Dist::Zipf);
    run("get_zipf", "get hit (Zipf 1.0)", zipf);
    let put = run(
        "put_zipf",
        "put update (Zipf 1.0), flusher running against the in-memory store",
        on(Mix::Put, Dist::Zipf),
    );
    run(
        "put_distinct",
        "put distinct keys",
        on(Mix::Put, Dist::Distinct),
    );
    run(
        "mixed",
        "mixed 90% get / 10% put (Zipf 1.0)",
        on(Mix::Mixed { read_percent: 90 }, Dist::Zipf),
    );
    if get.iter().any(|r| Kind::FLOORS.contains(&r.kind)) {
        // Not targets: how far the design's shard lock lets any get go, and how close
        // writebehind's get comes to that.
        println!(
            "\n### get hit: the shard-lock floors (not targets: the least a get under the design's lock costs)\n"
        );
        println!(
            "| ratio | the target's bar | got (ratio of medians) | paired | rounds reaching it | |"
        );
        println!("|---|---:|---:|---:|---:|---|");
        for floor in Kind::FLOORS {
            let name = floor.name();
            target(
                &format!("{name} vs quick_cache"),
                &get,
                floor,
                Kind::QuickCache,
                1.5,
            );
            target(
                &format!("{name} vs dashmap"),
                &get,
                floor,
                Kind::Dashmap,
                0.9,
            );
            target(
                &format!("writebehind vs {name}"),
                &get,
                Kind::Writebehind,
                floor,
                1.0,
            );
        }
    }
    println!(
        "\nwaits for a quiet process before runs: {:.1}s in all; runs started with the process \
         still busy after 3 s: {}",
        QUIESCE_WAITED_NS.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9,
        UNQUIET_RUNS.load(std::sync::atomic::Ordering::Relaxed)
    );
    if chosen.is_some() || only.is_some() {
        return;
    }
    println!("\n### targets (2 threads)\n");
    println!("| target | want | got (ratio of medians) | paired | rounds reaching it | |");
    println!("|---|---:|---:|---:|---:|---|");
    let (wb, niced) = (Kind::Writebehind, Kind::WritebehindNice);
    target("get hit vs dashmap", &get, wb, Kind::Dashmap, 0.9);
    target("get hit vs quick_cache", &get, wb, Kind::QuickCache, 1.5);
    target("get hit vs moka", &get, wb, Kind::Moka, 10.0);
    target("get hot1 vs dashmap", &hot1, wb, Kind::Dashmap, 3.0);
    target("get hot1 vs quick_cache", &hot1, wb, Kind::QuickCache, 3.0);
    target("put Zipf vs dashmap insert", &put, wb, Kind::Dashmap, 0.7);
    target("put Zipf vs hand-rolled", &put, wb, Kind::HandRolled, 2.0);
    // The same two with the flusher below the benchmark threads (`Builder::flusher_nice`).
    let what = format!("put Zipf vs dashmap insert, flusher_nice({WB_NICE})");
    target(&what, &put, niced, Kind::Dashmap, 0.7);
    let what = format!("put Zipf vs hand-rolled, flusher_nice({WB_NICE})");
    target(&what, &put, niced, Kind::HandRolled, 2.0);
    target(
        "put Zipf, journal Os vs no journal",
        &put,
        Kind::JournalOs,
        wb,
        0.7,
    );
    target(
        "put Zipf, journal Interval(10ms) vs no journal",
        &put,
        Kind::JournalInterval,
        wb,
        0.7,
    );
    conflation(20, 50_000);
    println!("\ntotal time: {:.1}s", t0.elapsed().as_secs_f64());
}
