//! Single-thread get-hit latency of writebehind against the same lookup built by hand and
//! against dashmap with 16-, 32- and 88-byte entries and against quick_cache, in one process, interleaved over nine
//! rounds (docs/BENCHMARKS.md, "get hit: what the lookup costs"). A diagnostic for the
//! memory layout of the shard and the entry, not one of the benchmarks: those are
//! `benches/ratio.rs` and `benches/peers.rs`.
//!
//! `cargo run --release --example lookup_layout [keys]` (default 131072 keys; `LOOKUP_OPS`
//! gets per contender per round, default 2,000,000).

use std::sync::Arc;
use std::time::Instant;

use writebehind::{Cache, MemoryStore};

mod layout;
use layout::Shards;

/// The shape of writebehind's table built by hand ([`Shards`]) around hashbrown tables of
/// 88-byte entries (the entry size before the side state moved out).
struct HandBuilt {
    shards: Shards<hashbrown::HashTable<Wide>>,
}

struct Wide {
    key: u64,
    value: Option<u64>,
    _rest: [u64; 8],
}

impl HandBuilt {
    fn new(n: u64) -> Self {
        let shards = Shards::new();
        let wide = |key| Wide {
            key,
            value: Some(key),
            _rest: [0; 8],
        };
        shards.fill(n, wide, |t| t, |e| e.key);
        HandBuilt { shards }
    }

    #[inline]
    fn get(&self, key: u64) -> Option<u64> {
        let h = self.shards.hasher.hash_one(key);
        let t = self.shards.lock(h);
        t.find(h, |e| e.key == key).and_then(|e| e.value)
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 17);
    let ops: u64 = std::env::var("LOOKUP_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let wb: Cache<u64, u64> = Cache::builder(Arc::new(MemoryStore::new()))
        .build()
        .expect("default configuration");
    for k in 0..n {
        wb.put(k, k).expect("open");
    }
    wb.flush().expect("in-memory store");
    let hand = HandBuilt::new(n);
    let dm16 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let dm32 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let dm88 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    for k in 0..n {
        dm16.insert(k, k);
        dm32.insert(k, [k; 3]);
        dm88.insert(k, [k; 10]);
    }
    let quick: quick_cache::sync::Cache<u64, u64> = quick_cache::sync::Cache::new(1 << 22);
    for k in 0..n {
        quick.insert(k, k);
    }
    let names = [
        "writebehind",
        "hand-built 88 B",
        "dashmap 16 B",
        "dashmap 32 B",
        "dashmap 88 B",
        "quick_cache",
    ];
    // `LOOKUP_ONLY=i`: run contender `i` alone (for callgrind).
    let only: Option<usize> = std::env::var("LOOKUP_ONLY")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut sum = 0u64;
    for _ in 0..9 {
        for (i, times) in ns.iter_mut().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let t0 = Instant::now();
            for _ in 0..ops {
                let k = rng.next() % n;
                sum = sum.wrapping_add(match i {
                    0 => wb.get(&k).expect("in memory").expect("present"),
                    1 => hand.get(k).expect("present"),
                    2 => *dm16.get(&k).expect("present"),
                    3 => dm32.get(&k).expect("present")[0],
                    4 => dm88.get(&k).expect("present")[0],
                    _ => quick.get(&k).expect("present"),
                });
            }
            times.push(t0.elapsed().as_nanos() as f64 / ops as f64);
        }
    }
    println!("{n} keys, {ops} random gets per contender per round, 9 rounds, 1 thread");
    println!("| contender | median ns/get | min |");
    println!("|---|---:|---:|");
    for (name, times) in names.iter().zip(ns.iter_mut()) {
        if times.is_empty() {
            continue;
        }
        times.sort_by(f64::total_cmp);
        println!("| {name} | {:.0} | {:.0} |", times[4], times[0]);
    }
    std::hint::black_box(sum);
    let m = wb.metrics();
    assert_eq!(m.misses, 0, "every get was a hit");
}
