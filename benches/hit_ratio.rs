//! Hit ratios of writebehind's S3-FIFO eviction against moka (W-TinyLFU) and quick_cache
//! (CLOCK-Pro) on the same traces, same capacity, one shard-equivalent setup each.
//!
//! Run: `cargo bench --bench hit_ratio`
use writebehind::testing::{scatter, Rng, Zipf};
use writebehind::{BatchError, Cache, Store, StoreError, Write};

mod diagnostic;
use diagnostic::bench_args;

/// A store that has every key (its value is the key): every miss is a read-through that
/// inserts, as in a cache in front of a database that holds the whole key space.
struct EveryKey;
impl Store<u64, u64> for EveryKey {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        Ok(Some(*key))
    }
    fn write_all(&self, _: &[Write<u64, u64>]) -> Result<(), BatchError> {
        Ok(())
    }
}

/// `len` keys of Zipf(s) over `n` keys, ranks scattered so that hot keys are not
/// neighbours.
fn zipf_trace(n: u64, s: f64, len: usize, seed: u64) -> Vec<u64> {
    let z = Zipf::new(n, s);
    let mut rng = Rng::new(seed);
    (0..len).map(|_| scatter(z.sample(&mut rng), n)).collect()
}

/// A Zipf workload interrupted by one-pass scans over keys never seen otherwise.
fn scan_trace(n: u64, len: usize, seed: u64) -> Vec<u64> {
    let z = Zipf::new(n, 1.0);
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    let mut scan_key = 1u64 << 60;
    while out.len() < len {
        for _ in 0..20_000 {
            out.push(scatter(z.sample(&mut rng), n));
        }
        for _ in 0..10_000 {
            out.push(scan_key);
            scan_key += 1;
        }
    }
    out.truncate(len);
    out
}

fn writebehind_ratio(trace: &[u64], cap: usize) -> f64 {
    let cache = Cache::builder(EveryKey)
        .manual_flushing()
        .shards(1)
        .capacity(cap)
        .build()
        .expect("valid config");
    for &k in trace {
        let _ = cache.get(&k); // a miss loads and caches
    }
    let m = cache.metrics();
    m.hits as f64 / trace.len() as f64
}

/// The hit ratio over `trace` of a cache that `hit` asks and `insert` fills on a miss.
fn ratio_of(trace: &[u64], hit: impl Fn(u64) -> bool, insert: impl Fn(u64)) -> f64 {
    let mut hits = 0u64;
    for &k in trace {
        if hit(k) {
            hits += 1;
        } else {
            insert(k);
        }
    }
    hits as f64 / trace.len() as f64
}

fn moka_ratio(trace: &[u64], cap: usize) -> f64 {
    let cache = moka::sync::Cache::<u64, u64>::new(cap as u64);
    ratio_of(trace, |k| cache.get(&k).is_some(), |k| cache.insert(k, k))
}

fn quick_cache_ratio(trace: &[u64], cap: usize) -> f64 {
    let cache = quick_cache::sync::Cache::<u64, u64>::new(cap);
    ratio_of(trace, |k| cache.get(&k).is_some(), |k| cache.insert(k, k))
}

fn main() {
    if bench_args().is_none() {
        return;
    }
    let len = 1_000_000;
    let traces: Vec<(&str, Vec<u64>)> = vec![
        ("zipf 1.0, 100k keys", zipf_trace(100_000, 1.0, len, 1)),
        ("zipf 0.8, 100k keys", zipf_trace(100_000, 0.8, len, 2)),
        ("zipf 1.0 + scans", scan_trace(100_000, len, 3)),
    ];
    println!(
        "| trace | capacity | writebehind (S3-FIFO) | moka (W-TinyLFU) | quick_cache (CLOCK-Pro) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, trace) in &traces {
        for cap in [1_000usize, 10_000] {
            println!(
                "| {name} | {cap} | {:.2}% | {:.2}% | {:.2}% |",
                100.0 * writebehind_ratio(trace, cap),
                100.0 * moka_ratio(trace, cap),
                100.0 * quick_cache_ratio(trace, cap),
            );
        }
    }
}
