//! Hit ratios of writebehind's S3-FIFO eviction against moka (W-TinyLFU) and quick_cache
//! (CLOCK-Pro) on the same traces, same capacity, one shard-equivalent setup each.
//!
//! Run: `cargo bench --bench hit_ratio`
use writebehind::{BatchError, Cache, Store, StoreError, Write};

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

/// A seeded xorshift generator (no dependency needed for a trace).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over `n` keys by inverse CDF on a precomputed table; key ranks are scattered
/// so that hot keys are not neighbours.
struct Zipf {
    cdf: Vec<f64>,
}
impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for i in 1..=n {
            sum += 1.0 / (i as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let rank = self.cdf.partition_point(|c| *c < u) as u64;
        rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20
    }
}

fn zipf_trace(n: usize, s: f64, len: usize, seed: u64) -> Vec<u64> {
    let z = Zipf::new(n, s);
    let mut rng = Rng(seed);
    (0..len).map(|_| z.sample(&mut rng)).collect()
}

/// A Zipf workload interrupted by one-pass scans over keys never seen otherwise.
fn scan_trace(n: usize, len: usize, seed: u64) -> Vec<u64> {
    let z = Zipf::new(n, 1.0);
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len);
    let mut scan_key = 1u64 << 60;
    while out.len() < len {
        for _ in 0..20_000 {
            out.push(z.sample(&mut rng));
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

fn moka_ratio(trace: &[u64], cap: usize) -> f64 {
    let cache = moka::sync::Cache::<u64, u64>::new(cap as u64);
    let mut hits = 0u64;
    for &k in trace {
        if cache.get(&k).is_some() {
            hits += 1;
        } else {
            cache.insert(k, k);
        }
    }
    hits as f64 / trace.len() as f64
}

fn quick_cache_ratio(trace: &[u64], cap: usize) -> f64 {
    let cache = quick_cache::sync::Cache::<u64, u64>::new(cap);
    let mut hits = 0u64;
    for &k in trace {
        if cache.get(&k).is_some() {
            hits += 1;
        } else {
            cache.insert(k, k);
        }
    }
    hits as f64 / trace.len() as f64
}

/// The positional arguments, without the flags `cargo bench` passes; `None` when the target
/// runs under `cargo test` (no `--bench` flag), which only builds it.
fn bench_args() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("a diagnostic: run it with `cargo bench --bench <name>`");
        return None;
    }
    Some(args.into_iter().filter(|a| !a.starts_with("--")).collect())
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
