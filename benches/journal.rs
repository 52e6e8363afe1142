//! What the journal costs a put, measured in one process.
//!
//! 1. Put throughput, 2 threads, Zipf 1.0 updates over 131,072 keys, the flusher writing to
//!    an in-memory store: the engine without a journal, with `JournalSync::Interval(10ms)` and
//!    with `JournalSync::Os`, in interleaved rounds (the order rotates); medians and the
//!    ratio to the journal-less engine. Keys are drawn before a run, as in the ratio report.
//!    A journal is measured in its steady state: before the timed run it is written to
//!    until a checkpoint has reclaimed segments and appends reuse them (not timed).
//! 2. One thread's append through the journal's memory map, next to a `write(2)` per
//!    record and `write(2)` batched in user space: why the journal maps its segments.
//! 3. `JournalSync::EveryWrite` under 2, 8 and 64 writer threads: durable puts per second,
//!    syncs per second, the group-commit factor (puts per sync) and the put latency
//!    p50/p99/p99.9, next to a bare `fdatasync` loop on the same file system (the floor).
//!
//! `cargo bench --bench journal` (env: `JOURNAL_ROUNDS`, default 7; `JOURNAL_MS`, one run's
//! length in milliseconds, default 300; `JOURNAL_PART`, `throughput`, `append` or `every` for
//! one part only; `JOURNAL_ONLY`, a comma-separated list of the throughput rows to run, among
//! `no journal`, `Interval(10ms)`, `Os` and `floor`; `JOURNAL_DIR`, the directory to
//! journal into, default a temporary directory under the target directory, which is on the
//! disk the crate is on).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use writebehind::journal::{Journal, JournalSync};
use writebehind::stores::Raw;
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

/// Keys drawn per thread before a run (as the ratio report does), so that a timed loop
/// costs a put, not a draw.
const DRAWN: usize = 1 << 20;

/// Zipf(1.0) keys over `0..KEYS` from a seeded generator, drawn ahead and taken in a cycle.
struct Keys {
    keys: Vec<u64>,
    at: usize,
}

impl Keys {
    fn new(zipf: &Arc<Zipf>, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        Keys {
            keys: (0..DRAWN)
                .map(|_| scatter(zipf.sample(&mut rng), KEYS))
                .collect(),
            at: 0,
        }
    }

    #[inline]
    fn next(&mut self) -> u64 {
        self.at = (self.at + 1) & (DRAWN - 1);
        self.keys[self.at]
    }
}

fn base_dir() -> std::path::PathBuf {
    std::env::var("JOURNAL_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir())
}

fn build(mode: Option<JournalSync>, dir: &std::path::Path) -> Cache<u64, u64> {
    let b = Cache::builder(MemoryStore::new());
    let b = match mode {
        Some(m) => b.journal(Journal::new(dir, Raw, Raw).sync(m)),
        None => b,
    };
    b.build().expect("bench cache")
}

/// Puts until the journal reuses reclaimed segments, its steady state in a service that has
/// run for more than a moment (or 50 M puts, whichever first); then flushes.
fn warm(cache: &Cache<u64, u64>) {
    let reused = || cache.metrics().journal.map_or(0, |j| j.segments_reused);
    let mut n = 0u64;
    while reused() == 0 && n < 50_000_000 {
        for _ in 0..4096 {
            cache.put(n % KEYS, n).expect("put");
            n += 1;
        }
    }
    cache.flush().expect("flush");
}

/// Operations per second of `THREADS` threads, each running the operation `make(thread)`
/// returns (given a running count) in a loop for `ms`.
fn run_rate<F>(ms: u64, make: impl Fn(usize) -> F) -> f64
where
    F: FnMut(u64) + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, done, start) = (stop.clone(), done.clone(), start.clone());
            let mut op = make(t);
            std::thread::spawn(move || {
                start.wait();
                let mut n = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        op(n);
                        n += 1;
                    }
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

/// Puts per second of `THREADS` threads putting Zipf keys for `ms`, the final flush included
/// (sustained throughput, not buffer filling).
fn put_rate(cache: &Arc<Cache<u64, u64>>, zipf: &Arc<Zipf>, ms: u64, seed: u64) -> f64 {
    let t0 = Instant::now();
    let rate = run_rate(ms, |t| {
        let cache = cache.clone();
        let mut z = Keys::new(zipf, seed ^ ((t as u64 + 1) * 0x9E37_79B9));
        move |n| {
            cache.put(z.next(), n).expect("put");
        }
    });
    let ops = rate * ms as f64 / 1e3;
    cache.flush().expect("flush");
    ops / t0.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn throughput(rounds: u64, ms: u64) {
    println!("## Put throughput, {THREADS} threads, Zipf 1.0 over {KEYS} keys ({rounds} rounds of {ms} ms)\n");
    let modes: [(&str, Option<JournalSync>); 3] = [
        ("no journal", None),
        (
            "Interval(10ms)",
            Some(JournalSync::Interval(Duration::from_millis(10))),
        ),
        ("Os", Some(JournalSync::Os)),
    ];
    let zipf = Arc::new(Zipf::new(KEYS, 1.0));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let only = std::env::var("JOURNAL_ONLY").unwrap_or_default();
    for round in 0..rounds {
        for i in 0..modes.len() {
            let m = (i + round as usize) % modes.len();
            if !only.is_empty() && !only.split(',').any(|o| o == modes[m].0) {
                rates[m].push(0.0);
                continue;
            }
            let dir = tempfile::tempdir_in(base_dir()).expect("temp dir");
            let cache = build(modes[m].1, dir.path());
            if modes[m].1.is_some() {
                warm(&cache);
            }
            let cache = Arc::new(cache);
            rates[m].push(put_rate(&cache, &zipf, ms, round * 31 + m as u64));
            let report = cache.close(Duration::from_secs(10));
            assert!(report.is_clean());
        }
    }
    // The floor: the journal alone, the same appends without a cache (one shard per thread).
    let mut floors: Vec<(&str, Vec<f64>)> =
        vec![("Interval(10ms)", Vec::new()), ("Os", Vec::new())];
    for _ in 0..rounds {
        if !only.is_empty() && !only.split(',').any(|o| o == "floor") {
            break;
        }
        for (i, mode) in [
            JournalSync::Interval(Duration::from_millis(10)),
            JournalSync::Os,
        ]
        .into_iter()
        .enumerate()
        {
            let dir = tempfile::tempdir_in(base_dir()).expect("temp dir");
            floors[i].1.push(append_rate(dir.path(), mode, &zipf, ms));
        }
    }
    let base = median(&mut rates[0].clone());
    // Wall time per operation of one thread.
    let ns = |rate: f64| THREADS as f64 * 1e9 / rate;
    println!("| engine | puts/s (median) | ns per put, per thread | / no journal |");
    println!("|---|---:|---:|---:|");
    for (i, (name, _)) in modes.iter().enumerate() {
        let m = median(&mut rates[i]);
        println!(
            "| {name} | {:.2} M | {:.0} | {:.2}x |",
            m / 1e6,
            ns(m),
            m / base
        );
    }
    for (name, r) in &mut floors {
        if r.is_empty() {
            continue;
        }
        let m = median(r);
        println!(
            "| floor: journal appends alone, {name} | {:.2} M | {:.0} | {:.2}x |",
            m / 1e6,
            ns(m),
            m / base
        );
    }
    println!();
}

/// Appends per second of `THREADS` threads appending put records (8-byte key and value)
/// straight to a journal, each to a shard of its own: what journaling a put costs without
/// the cache around it. In the journal's steady state, as the engine's rows: before the
/// timed run, appends fill a checkpoint's worth of segments and a checkpoint of an empty
/// live set reclaims them for reuse (not timed).
fn append_rate(dir: &std::path::Path, mode: JournalSync, zipf: &Arc<Zipf>, ms: u64) -> f64 {
    use writebehind::journal::JournalLog;
    let (log, _) = JournalLog::<u64, u64>::open(Journal::new(dir, Raw, Raw).sync(mode), THREADS)
        .expect("journal");
    for t in 0..THREADS {
        let mut n = 0;
        while log.bytes() < (t as u64 + 1) * log.checkpoint_bytes() / THREADS as u64 {
            log.append(t, &(n % KEYS), Some(&n), n).expect("append");
            n += 1;
        }
    }
    for t in 0..THREADS {
        log.checkpoint(t, std::iter::empty()).expect("checkpoint");
    }
    let log = Arc::new(log);
    run_rate(ms, |t| {
        let log = log.clone();
        let mut z = Keys::new(zipf, t as u64 + 3);
        move |n| {
            log.append(t, &z.next(), Some(&n), n).expect("append");
        }
    })
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn every_write(ms: u64) {
    println!("## EveryWrite: durable puts, syncs and latency ({ms} ms per row)\n");
    println!("| writers | durable puts/s | syncs/s | puts per sync | p50 | p99 | p99.9 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let zipf = Arc::new(Zipf::new(KEYS, 1.0));
    for threads in [2usize, 8, 64] {
        let dir = tempfile::tempdir_in(base_dir()).expect("temp dir");
        let cache = Arc::new(build(Some(JournalSync::EveryWrite), dir.path()));
        let stop = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, stop, start) = (cache.clone(), stop.clone(), start.clone());
                let mut z = Keys::new(&zipf, t as u64 + 7);
                std::thread::spawn(move || {
                    let mut h = hist();
                    start.wait();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        cache.put(z.next(), n).expect("put");
                        h.record(t0.elapsed().as_nanos() as u64).ok();
                        n += 1;
                    }
                    h
                })
            })
            .collect();
        let syncs0 = cache.metrics().journal.map_or(0, |j| j.syncs);
        start.wait();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        stop.store(true, Ordering::Relaxed);
        let mut all = hist();
        for h in handles {
            all.add(h.join().unwrap()).ok();
        }
        let secs = t0.elapsed().as_secs_f64();
        let syncs = cache.metrics().journal.map_or(0, |j| j.syncs) - syncs0;
        let puts = all.len();
        println!(
            "| {threads} | {:.0} | {:.0} | {:.1} | {} | {} | {} |",
            puts as f64 / secs,
            syncs as f64 / secs,
            puts as f64 / syncs.max(1) as f64,
            us(all.value_at_quantile(0.5)),
            us(all.value_at_quantile(0.99)),
            us(all.value_at_quantile(0.999)),
        );
        let _ = cache.close(Duration::from_secs(10));
    }
    // The floor: one thread writing 64 bytes and fdatasync-ing, on the same file system.
    let dir = tempfile::tempdir_in(base_dir()).expect("temp dir");
    let mut f = std::fs::File::create(dir.path().join("floor")).expect("floor file");
    let mut h = hist();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(ms) {
        let t = Instant::now();
        f.write_all(&[7u8; 64]).expect("write");
        f.sync_data().expect("fdatasync");
        h.record(t.elapsed().as_nanos() as u64).ok();
    }
    println!(
        "| floor: write + fdatasync, 1 thread | {:.0} | {:.0} | 1.0 | {} | {} | {} |",
        h.len() as f64 / t0.elapsed().as_secs_f64(),
        h.len() as f64 / t0.elapsed().as_secs_f64(),
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
    );
    println!();
}

/// One thread appending 136-byte records (an 8-byte key, a 100-byte value): through the
/// journal's memory map (`Os` mode, 4 MiB segments), with a `write(2)` per record, and with
/// `write(2)` batched 64 KiB at a time in user space (which a process crash loses until the
/// batch is written). Why the journal maps its segments. Median nanoseconds per append.
fn append_paths(rounds: u64) {
    use writebehind::journal::JournalLog;
    const N: u64 = 400_000;
    let val = vec![0x5au8; 100];
    let record_len = (8 + 17 + 8 + val.len()).div_ceil(8) * 8;
    println!("## One append of a {record_len}-byte record, 1 thread ({rounds} rounds of {N})\n");
    // The same bytes as the journal's record, for the write(2) paths.
    let encode = |buf: &mut Vec<u8>, v: u64| {
        buf.clear();
        buf.extend_from_slice(&[0; 8]);
        buf.push(1);
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&v.to_le_bytes());
        buf.extend_from_slice(&8u32.to_le_bytes());
        buf.extend_from_slice(&(v % 1000).to_le_bytes());
        buf.extend_from_slice(&val);
        let crc = crc32fast::hash(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        buf.resize(record_len, 0);
    };
    let mut mmap = Vec::new();
    let mut write = Vec::new();
    let mut batched = Vec::new();
    for _ in 0..rounds {
        let dir = tempfile::tempdir_in(base_dir()).expect("temp dir");
        let (log, _) = JournalLog::<u64, Vec<u8>>::open(
            Journal::new(dir.path().join("j"), Raw, Raw).sync(JournalSync::Os),
            1,
        )
        .expect("journal");
        log.append(0, &0, Some(&val), 0).expect("append");
        let t = Instant::now();
        for v in 1..=N {
            log.append(0, &(v % 1000), Some(&val), v).expect("append");
        }
        mmap.push(t.elapsed().as_nanos() as f64 / N as f64);
        log.close().expect("close");

        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("write"))
            .expect("file");
        let mut buf = Vec::new();
        let t = Instant::now();
        for v in 1..=N {
            encode(&mut buf, v);
            (&f).write_all(&buf).expect("write");
        }
        write.push(t.elapsed().as_nanos() as f64 / N as f64);

        let f = std::fs::File::create(dir.path().join("batched")).expect("file");
        let mut w = std::io::BufWriter::with_capacity(64 << 10, f);
        let t = Instant::now();
        for v in 1..=N {
            encode(&mut buf, v);
            w.write_all(&buf).expect("write");
        }
        w.flush().expect("flush");
        batched.push(t.elapsed().as_nanos() as f64 / N as f64);
    }
    println!("| path | ns per append (median) | survives a process crash on return |");
    println!("|---|---:|---|");
    println!(
        "| journal (memory map, `Os`) | {:.0} | yes |",
        median(&mut mmap)
    );
    println!(
        "| `write(2)` per record | {:.0} | yes |",
        median(&mut write)
    );
    println!(
        "| `write(2)` batched 64 KiB | {:.0} | no |",
        median(&mut batched)
    );
    println!();
}

fn us(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} µs", ns as f64 / 1e3)
    }
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rounds = env_u64("JOURNAL_ROUNDS", 7);
    let ms = env_u64("JOURNAL_MS", 300);
    let part = std::env::var("JOURNAL_PART").unwrap_or_default();
    if part.is_empty() || part == "throughput" {
        throughput(rounds, ms);
    }
    if part.is_empty() || part == "append" {
        append_paths(rounds);
    }
    if part.is_empty() || part == "every" {
        every_write(ms.max(1000));
    }
}
