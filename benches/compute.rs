//! What an atomic read-modify-write costs: 2 threads adding 1 to Zipf(1.0) keys over
//! 131,072 prefilled `u64` counters, in interleaved rounds (the order rotates):
//!
//! * `update`: `Cache::update(&k, |n| *n += 1)`, written behind;
//! * `get + put`: `get` then `put` of the same key, written behind (not atomic: two threads
//!   can lose an increment; the cost of doing it by hand);
//! * `moka and_compute_with`: moka's `entry(k).and_compute_with`, the atomic update of the
//!   cache most Rust services use (no store behind it).
//!
//! Prints the median increments per second of each and the ratios.
//! `cargo bench --bench compute` (env: `COMPUTE_ROUNDS`, default 7; `COMPUTE_MS`, one run's
//! length in milliseconds, default 300).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use writebehind::testing::{scatter, Rng, Zipf};
use writebehind::{Cache, MemoryStore};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: u64 = 1 << 17;
const THREADS: usize = 2;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Operations per second of `THREADS` threads, each running `op(thread, key)` on Zipf keys
/// for `ms`.
fn run_rate(ms: u64, zipf: &Arc<Zipf>, seed: u64, op: Arc<dyn Fn(u64) + Send + Sync>) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, done, start, op) = (stop.clone(), done.clone(), start.clone(), op.clone());
            let zipf = zipf.clone();
            let mut rng = Rng::new(seed ^ ((t as u64 + 1) * 0x9E37_79B9));
            std::thread::spawn(move || {
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        op(scatter(zipf.sample(&mut rng), KEYS));
                    }
                    n += 64;
                }
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(ms));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn writebehind() -> Arc<Cache<u64, u64>> {
    let cache = Cache::builder(MemoryStore::new()).build().expect("cache");
    cache.preload((0..KEYS).map(|k| (k, 0))).expect("preload");
    Arc::new(cache)
}

fn moka() -> moka::sync::Cache<u64, u64> {
    let cache = moka::sync::Cache::new(2 * KEYS);
    for k in 0..KEYS {
        cache.insert(k, 0);
    }
    cache
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rounds = env_u64("COMPUTE_ROUNDS", 7);
    let ms = env_u64("COMPUTE_MS", 300);
    let zipf = Arc::new(Zipf::new(KEYS, 1.0));
    let names = ["update", "get + put", "moka and_compute_with"];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for i in 0..names.len() {
            let m = (i + round as usize) % names.len();
            let seed = round * 31 + 7;
            let rate = match m {
                0 => {
                    let c = writebehind();
                    let op = Arc::new(move |k| {
                        c.update(&k, |n| *n += 1).expect("update");
                    });
                    run_rate(ms, &zipf, seed, op)
                }
                1 => {
                    let c = writebehind();
                    let op = Arc::new(move |k| {
                        let n = c.get(&k).expect("get").unwrap_or(0);
                        c.put(k, n + 1).expect("put");
                    });
                    run_rate(ms, &zipf, seed, op)
                }
                _ => {
                    let c = moka();
                    let op = Arc::new(move |k| {
                        c.entry(k)
                            .and_compute_with(|e| Op::Put(e.map_or(0, |e| e.into_value()) + 1));
                    });
                    run_rate(ms, &zipf, seed, op)
                }
            };
            rates[m].push(rate);
        }
    }
    println!(
        "## Atomic increments, {THREADS} threads, Zipf 1.0 over {KEYS} keys ({rounds} rounds of {ms} ms)\n"
    );
    let meds: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    println!("| how | increments/s (median) | update / this |");
    println!("|---|---:|---:|");
    for (i, name) in names.iter().enumerate() {
        println!(
            "| {name} | {:.2} M | {:.2}x |",
            meds[i] / 1e6,
            meds[0] / meds[i]
        );
    }
}
