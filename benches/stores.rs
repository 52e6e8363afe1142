//! The store-side targets, against real databases:
//!
//! 1. put latency (p50/p99/p99.9/max) on 2 writer threads while a flusher writes batches to
//!    SQLite (write-behind, by default and with `Builder::flush_order`), and the same puts
//!    in write-through mode for scale;
//! 2. sustained flush throughput into SQLite: `N` dirty keys flushed by the engine
//!    (`flush()`), against plain loops of batched upserts (`SqliteStore::write_all` with
//!    batches of the same size) on the same kind of file: the rows in key order into an empty
//!    table (the database's best case), the same rows again in a random order (updates of
//!    existing rows), and the rows in a random order into an empty table (what the engine
//!    does: inserts of keys dirtied at random, in batches of `max_batch`); then the engine
//!    again with `Builder::flush_order` (key order), which sorts a backlog before it cuts it
//!    into batches; the same for
//!    PostgreSQL when `WRITEBEHIND_PG_URL` is set (`source .ci/pg.sh && pg_start`). The
//!    PostgreSQL tables are dropped at the start, and every timed phase begins with a
//!    `CHECKPOINT`, so runs against one server stay comparable.
//!
//! Run: `cargo bench --features sqlite,postgres --bench stores`
//! (env: `STORES_KEYS`, default 200000; `STORES_SECONDS`, default 2).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use writebehind::stores::{PostgresStore, SqliteStore};
use writebehind::testing::Rng;
use writebehind::{Cache, Store, Write};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn value(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

/// How a latency run configures the cache.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Behind,
    /// Write-behind with `flush_order` (key order).
    BehindOrdered,
    /// Write-behind with the flusher 10 nice levels below the writers (`flusher_nice`).
    BehindNiced,
    Through,
}

/// Put latency on 2 threads ([`timed_puts`]) while the flusher writes to `store`.
fn put_latency<S: Store<u64, Vec<u8>> + Clone>(label: &str, store: S, mode: Mode, seconds: u64) {
    let mut b = Cache::builder(store)
        .write_delay(Duration::from_millis(50))
        .max_batch(1000)
        .flush_timeout(Duration::from_secs(600));
    match mode {
        Mode::Behind => {}
        Mode::BehindOrdered => b = b.flush_order(|a: &u64, b: &u64| a.cmp(b)),
        Mode::BehindNiced => b = b.flusher_nice(10),
        Mode::Through => b = b.write_mode(writebehind::WriteMode::Through),
    }
    let cache = Arc::new(b.build().expect("cache"));
    let c2 = cache.clone();
    let all = timed_puts(seconds, move |key, v| {
        c2.put(key, v).expect("put");
    });
    let before = cache.metrics();
    let t_flush = Instant::now();
    if let Err(e) = cache.flush() {
        let m = cache.metrics();
        panic!(
            "flush after the load: {e}; dirty {} before, {} now; rows written {} before, {} now",
            before.dirty, m.dirty, before.records_written, m.records_written
        );
    }
    let flush_took = t_flush.elapsed();
    let m = cache.metrics();
    latency_row(
        label,
        &all,
        &format!(
            "{} | {} | {} in {:.1} s",
            m.batches,
            m.records_written,
            before.dirty,
            flush_took.as_secs_f64()
        ),
    );
}

/// One row of the put-latency table: the puts, their percentiles and maximum, then `rest`
/// (store batches, rows written, the final flush).
fn latency_row(label: &str, all: &Histogram<u64>, rest: &str) {
    println!(
        "| {label} | {} | {} ns | {} ns | {} ns | {} ns | {rest} |",
        all.len(),
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999),
        all.max(),
    );
}

/// Two writer threads putting for `seconds` (Zipf-ish hot keys: every 8th put a new cold
/// key), each put timed alone; the latencies of both.
fn timed_puts(seconds: u64, put: impl Fn(u64, Vec<u8>) + Send + Sync + 'static) -> Histogram<u64> {
    let put = Arc::new(put);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let put = put.clone();
            let stop = stop.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut rng = Rng::new(t);
                let mut i = 0u64;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let key = if i % 8 == 0 {
                        1_000_000 + rng.below(1_000_000)
                    } else {
                        rng.below(1000)
                    };
                    let v = value(i);
                    let t0 = Instant::now();
                    put(key, v);
                    let ns = t0.elapsed().as_nanos() as u64;
                    let _ = h.record(ns.max(1));
                    i += 1;
                }
                h
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for t in threads {
        let _ = all.add(t.join().expect("writer"));
    }
    all
}

/// The machine's floor for the put-latency rows: the same two writer threads timing a
/// dashmap insert (no write-behind at all) while a third thread writes batches of 1,000
/// rows to `store` without a pause, as a busy flusher does. No engine can put faster than
/// a bare concurrent map insert beside the same database work.
fn floor_latency<S: Store<u64, Vec<u8>> + Send + Sync + 'static>(
    label: &str,
    store: S,
    seconds: u64,
) {
    let map = Arc::new(dashmap::DashMap::<u64, Vec<u8>, ahash::RandomState>::default());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut version = 0u64;
            let mut batches = 0u64;
            let mut rng = Rng::new(1);
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<Write<u64, Vec<u8>>> = (0..1000)
                    .map(|_| {
                        version += 1;
                        let key = rng.below(1_001_000);
                        Write::Put {
                            key,
                            value: value(key),
                            version,
                        }
                    })
                    .collect();
                store.write_all(&batch).expect("write_all");
                batches += 1;
            }
            batches
        })
    };
    let m2 = map.clone();
    let all = timed_puts(seconds, move |key, v| {
        m2.insert(key, v);
    });
    stop.store(true, Ordering::Relaxed);
    let batches = writer.join().expect("store writer");
    latency_row(label, &all, &format!("{batches} | {} | -", batches * 1000));
}

/// Rows per second: the engine flushing `n` dirty keys, against a plain loop of batched
/// upserts of the same rows through the same adapter.
/// `before_phase` runs before each timed phase (for PostgreSQL: a `CHECKPOINT`, so every
/// phase starts from the same state of the server's write-ahead log).
fn flush_throughput<S: Store<u64, Vec<u8>> + Clone>(
    label: &str,
    engine_store: S,
    ordered_store: S,
    plain_store: S,
    fresh_store: S,
    n: u64,
    before_phase: &dyn Fn(),
) {
    let batch = 1000usize;
    // Plain: write_all over batches of `batch` rows, versions as the engine would give.
    let writes: Vec<Write<u64, Vec<u8>>> = (0..n)
        .map(|k| Write::Put {
            key: k,
            value: value(k),
            version: 1 + k,
        })
        .collect();
    before_phase();
    let t0 = Instant::now();
    for chunk in writes.chunks(batch) {
        plain_store.write_all(chunk).expect("plain write_all");
    }
    let plain = n as f64 / t0.elapsed().as_secs_f64();
    // The same rows again in a random order (the engine's batches come in hash order), with
    // newer versions so every row is really rewritten.
    let mut shuffled: Vec<Write<u64, Vec<u8>>> = (0..n)
        .map(|k| Write::Put {
            key: k,
            value: value(k + 1),
            version: n + 1 + k,
        })
        .collect();
    let mut rng = Rng::new(1);
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i as u64 + 1) as usize);
    }
    before_phase();
    let t0 = Instant::now();
    for chunk in shuffled.chunks(batch) {
        plain_store.write_all(chunk).expect("plain write_all");
    }
    let plain_random = n as f64 / t0.elapsed().as_secs_f64();
    // The same random order into an empty table: the database's own cost for the engine's
    // work (inserts of randomly dirtied keys, `batch` per transaction; the adapter sorts each
    // batch, as it does for the engine).
    before_phase();
    let t0 = Instant::now();
    for chunk in shuffled.chunks(batch) {
        fresh_store.write_all(chunk).expect("plain write_all");
    }
    let plain_fresh = n as f64 / t0.elapsed().as_secs_f64();

    // The engine as configured by default, then with `flush_order` (key order), each into
    // an empty table. The count trigger starts flushing while the puts fill the cache, so
    // the time runs from the first put to the end of the flush: it counts the puts against
    // the engine.
    let engine_run = |store: S, ordered: bool| {
        let mut b = Cache::builder(store)
            .write_delay(Duration::from_secs(3600))
            .max_batch(batch)
            .shards(64)
            .dirty_ring_capacity(1 << 14);
        if ordered {
            b = b.flush_order(|a: &u64, b: &u64| a.cmp(b));
        }
        let cache = b.build().expect("cache");
        before_phase();
        let t0 = Instant::now();
        for k in 0..n {
            cache.put(k, value(k)).expect("put");
        }
        cache.flush().expect("flush");
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        let m = cache.metrics();
        (
            rate,
            format!("{} batches, {} rows", m.batches, m.records_written),
        )
    };
    let (engine, batches) = engine_run(engine_store, false);
    let (ordered, _) = engine_run(ordered_store, true);
    println!(
        "| {label} | {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.0} | {:.2}x | {:.2}x | {batches} |",
        plain,
        plain_random,
        plain_fresh,
        engine,
        engine / plain,
        engine / plain_fresh,
        ordered,
        ordered / plain,
        ordered / plain_fresh,
    );
}

fn main() {
    let n = env("STORES_KEYS", 200_000);
    let seconds = env("STORES_SECONDS", 2);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "machine: {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    println!("\n### put latency while the flusher writes to the database (2 writer threads)\n");
    println!(
        "| mode | puts | p50 | p99 | p99.9 | max | store batches | rows written | final flush |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sqlite = |name: &str| {
        Arc::new(
            SqliteStore::<u64, Vec<u8>>::open(dir.path().join(format!("{name}.db")), "kv")
                .expect("sqlite"),
        )
    };
    put_latency(
        "SQLite, write-behind",
        sqlite("lat_behind"),
        Mode::Behind,
        seconds,
    );
    put_latency(
        "SQLite, write-behind, flush_order",
        sqlite("lat_ordered"),
        Mode::BehindOrdered,
        seconds,
    );
    put_latency(
        "SQLite, write-behind, flusher_nice(10)",
        sqlite("lat_niced"),
        Mode::BehindNiced,
        seconds,
    );
    put_latency(
        "SQLite, write-through",
        sqlite("lat_through"),
        Mode::Through,
        seconds,
    );
    floor_latency(
        "floor: dashmap insert beside SQLite batches (no engine)",
        sqlite("lat_floor"),
        seconds,
    );

    println!("\n### sustained flush throughput (rows/s)\n");
    println!("| store | rows | plain, key order, empty table | plain, random order, existing rows | plain, random order, empty table | engine (puts + flush) | engine / key order | engine / same work | engine with flush_order | ordered / key order | ordered / same work | engine batches |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    flush_throughput(
        "SQLite",
        sqlite("flush_engine"),
        sqlite("flush_ordered"),
        sqlite("flush_plain"),
        sqlite("flush_fresh"),
        n,
        &|| {},
    );
    match std::env::var("WRITEBEHIND_PG_URL") {
        Ok(url) => {
            // The tables outlive a run on the server: drop them first, or a second run would
            // update the rows of the first (and measure their dead tuples) instead of
            // inserting into empty tables.
            let mut admin = postgres::Client::connect(&url, postgres::NoTls).expect("postgres");
            admin
                .batch_execute(
                    "DROP TABLE IF EXISTS bench_engine, bench_ordered, bench_plain, bench_fresh, \
                     bench_latency",
                )
                .expect("drop the bench tables");
            let admin = std::sync::Mutex::new(admin);
            let checkpoint = || {
                admin
                    .lock()
                    .expect("admin connection")
                    .batch_execute("CHECKPOINT")
                    .expect("CHECKPOINT (the bench connects as a superuser)");
            };
            let pg = |table: &str| {
                Arc::new(PostgresStore::<u64, Vec<u8>>::connect(&url, table).expect("postgres"))
            };
            flush_throughput(
                "PostgreSQL",
                pg("bench_engine"),
                pg("bench_ordered"),
                pg("bench_plain"),
                pg("bench_fresh"),
                n,
                &checkpoint,
            );
            put_latency(
                "PostgreSQL, write-behind",
                pg("bench_latency"),
                Mode::Behind,
                seconds,
            );
        }
        Err(_) => {
            println!("| PostgreSQL | - | (WRITEBEHIND_PG_URL not set: skipped) | | | | | | | | | |")
        }
    }
}
