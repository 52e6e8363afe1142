//! How often a cache's background threads wake: the flusher (worker) and, with
//! `Builder::flusher_nice`, its keeper, counted as voluntary context switches from
//! `/proc/self/task` (Linux). Three phases: 5 s idle after a flush, 5 s of one put per
//! millisecond, then 2 s of two threads putting as fast as they can over 100,000 keys. A
//! diagnostic for docs/ARCHITECTURE.md ("A flusher may yield the CPU").
//!
//! `cargo bench --bench flusher_wakes [-- nice]` (default nice 10; 0 runs a sole flusher
//! without a keeper).

use std::sync::Arc;
use std::time::{Duration, Instant};

use writebehind::testing::Rng;
use writebehind::{Cache, MemoryStore};

mod diagnostic;
use diagnostic::bench_args;

/// The cache's name: its threads are `wakes-flusher-N` and `wakes-keeper-N`.
const NAME: &str = "wakes";

/// Voluntary context switches of this process's threads whose name starts with `prefix`,
/// or `None` where `/proc/self/task` cannot be read.
fn switches(prefix: &str) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())?;
    }
    Some(total)
}

fn counts() -> Option<(u64, u64)> {
    Some((
        switches(&format!("{NAME}-flusher"))?,
        switches(&format!("{NAME}-keeper"))?,
    ))
}

fn main() {
    let Some(args) = bench_args() else { return };
    let nice: u8 = args.first().and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut builder = Cache::builder(Arc::new(MemoryStore::new())).name(NAME);
    if nice > 0 {
        builder = builder.flusher_nice(nice);
    }
    let cache: Cache<u64, u64> = builder.build().expect("a valid configuration");
    cache.put(0, 0).expect("open");
    cache
        .flush()
        .expect("the in-memory store accepts everything");
    std::thread::sleep(Duration::from_millis(200));
    let Some(idle_start) = counts() else {
        eprintln!("/proc/self/task is not readable here (Linux only)");
        return;
    };
    std::thread::sleep(Duration::from_secs(5));
    let busy_start = counts().expect("readable a moment ago");
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(5) {
        cache.put(i % 1000, i).expect("open");
        i += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let end = counts().expect("readable a moment ago");
    // Two threads putting as fast as they can, over 100,000 keys, for 2 s.
    let started = Instant::now();
    let puts: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let cache = &cache;
                s.spawn(move || {
                    let mut rng = Rng::new(t + 1);
                    let mut n = 0u64;
                    while started.elapsed() < Duration::from_secs(2) {
                        for _ in 0..1000 {
                            cache.put(rng.below(100_000), n).expect("open");
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .sum()
    });
    let busy_end = counts().expect("readable a moment ago");
    println!("flusher_nice({nice}), wakes: | worker | keeper |");
    println!(
        "idle, 5 s | {} | {} |",
        busy_start.0 - idle_start.0,
        busy_start.1 - idle_start.1
    );
    println!(
        "{i} puts, one a millisecond, 5 s | {} | {} |",
        end.0 - busy_start.0,
        end.1 - busy_start.1
    );
    println!(
        "{puts} puts, two threads flat out, 2 s | {} | {} |",
        busy_end.0 - end.0,
        busy_end.1 - end.1
    );
}
