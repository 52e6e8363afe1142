//! Memory a cache holds per key: the resident set's growth while `preload` fills a
//! `Cache<u64, u64>` with clean entries (nothing goes to the store, so the store holds
//! nothing), divided by the keys. A diagnostic for the entry's layout (docs/ARCHITECTURE.md,
//! "Entry state").
//!
//! `cargo bench --bench memory_per_key [-- keys]` (default 4,194,304). Linux only (reads
//! `/proc/self/status`).

use std::sync::Arc;

use writebehind::{Cache, MemoryStore};

mod diagnostic;
use diagnostic::bench_args;

/// The resident set in bytes, from `/proc/self/status` (0 where it cannot be read).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let Some(args) = bench_args() else { return };
    let n: u64 = args
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 22)
        .max(1);
    let cache: Cache<u64, u64> = Cache::builder(Arc::new(MemoryStore::new()))
        .build()
        .expect("default configuration");
    let before = rss();
    // In chunks, so the iterator itself holds nothing.
    let chunk = 1u64 << 16;
    let mut k = 0;
    while k < n {
        let end = (k + chunk).min(n);
        cache.preload((k..end).map(|k| (k, k))).expect("open");
        k = end;
    }
    let after = rss();
    assert_eq!(cache.metrics().entries, n, "every key is cached");
    println!(
        "{n} keys: resident set grew by {:.1} MiB, {:.1} bytes per key",
        (after - before) as f64 / (1u64 << 20) as f64,
        (after - before) as f64 / n as f64
    );
}
