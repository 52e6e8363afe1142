//! N instances (processes) of a cache over one PostgreSQL table, against the database's own
//! batched-upsert ceiling from N connections.
//!
//! For each N, on a table prefilled with every key:
//!
//! 1. **ceiling**: N threads, each with its own [`PostgresStore`] (its own connection), loop
//!    over plain `write_all` batches of 1,000 distinct keys of their own range for the run's
//!    time, no cache: the rows per second the database takes from N writers;
//! 2. **instances**: N child processes of this binary (re-executed with `INSTANCES_CHILD`
//!    set), each a `Cache<u64, u64>` over a `PostgresStore` on the same table, put Zipf(1.0)
//!    updates on 2 threads for the run's time, then flush. Instance `i` owns the keys with
//!    `key % N == i`, as a router would send them: every thread draws keys from Zipf(1.0)
//!    over all keys (ranks scattered over the key space) and keeps those of its instance, so
//!    the N instances together see one Zipf workload. Keys are drawn before the timed part.
//!    Each child prints one `RESULT` line (puts, rows written, batches, seconds) that the
//!    parent parses;
//! 3. **check**: each child compares the table with its cache for every key it wrote (the
//!    last value put is the stored one), and reports `Metrics::superseded` and
//!    `Metrics::failed_writes` (both must be 0: the key ranges are disjoint); the parent
//!    counts the rows written by this N's generations, which must equal the keys the
//!    instances wrote.
//!
//! Every timed phase starts with a `CHECKPOINT`. Without `WRITEBEHIND_PG_URL` the bench
//! prints a skip message.
//!
//! Run: `source .ci/pg.sh && pg_start`, then
//! `cargo bench --features postgres --bench instances`
//! (env: `INSTANCES_SECONDS`, default 5; `INSTANCES_KEYS`, default 100000; `INSTANCES_N`,
//! default `1,2,4`).
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use writebehind::stores::PostgresStore;
use writebehind::testing::{scatter, Rng, Zipf};
use writebehind::{version, Cache, Store, Write};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The table every instance writes.
const TABLE: &str = "bench_instances";
/// Rows per batch: the cache's `max_batch` and the ceiling's batch size.
const BATCH: usize = 1000;
/// Keys each writer thread draws before the timed part (cycled through).
const DRAWN: usize = 1 << 20;
/// Writer threads per instance.
const THREADS: u64 = 2;
/// Set in a child process: its instance index.
const CHILD: &str = "INSTANCES_CHILD";
/// Set in a child process: the number of instances.
const OF: &str = "INSTANCES_OF";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn counts() -> Vec<u64> {
    std::env::var("INSTANCES_N")
        .unwrap_or_else(|_| "1,2,4".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect()
}

fn pg(url: &str) -> Arc<PostgresStore<u64, u64>> {
    Arc::new(PostgresStore::connect(url, TABLE).expect("connect to PostgreSQL"))
}

/// `DRAWN` keys of instance `i` of `n`: Zipf(1.0) ranks over all `keys`, scattered over the
/// key space, keeping those with `key % n == i`.
fn draw(keys: u64, i: u64, n: u64, seed: u64) -> Vec<u64> {
    let zipf = Zipf::new(keys, 1.0);
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(DRAWN);
    while out.len() < DRAWN {
        let key = scatter(zipf.sample(&mut rng), keys);
        if key % n == i {
            out.push(key);
        }
    }
    out
}

/// What one instance reports, as its `RESULT` line carries it.
#[derive(Debug, Default, Clone)]
struct Report {
    puts: u64,
    rows: u64,
    batches: u64,
    /// The timed puts.
    put_seconds: f64,
    /// The puts and the final flush.
    seconds: f64,
    superseded: u64,
    failed: u64,
    /// Distinct keys written.
    keys: u64,
    /// Keys whose stored value differs from the cache's.
    mismatched: u64,
    generation: u64,
}

impl Report {
    fn line(&self) -> String {
        format!(
            "RESULT puts={} rows={} batches={} put_seconds={:.6} seconds={:.6} superseded={} \
             failed={} keys={} mismatched={} generation={}",
            self.puts,
            self.rows,
            self.batches,
            self.put_seconds,
            self.seconds,
            self.superseded,
            self.failed,
            self.keys,
            self.mismatched,
            self.generation
        )
    }

    fn parse(line: &str) -> Option<Report> {
        let mut r = Report::default();
        for field in line.strip_prefix("RESULT ")?.split_whitespace() {
            let (name, value) = field.split_once('=')?;
            let int = || value.parse::<u64>().ok();
            match name {
                "puts" => r.puts = int()?,
                "rows" => r.rows = int()?,
                "batches" => r.batches = int()?,
                "put_seconds" => r.put_seconds = value.parse().ok()?,
                "seconds" => r.seconds = value.parse().ok()?,
                "superseded" => r.superseded = int()?,
                "failed" => r.failed = int()?,
                "keys" => r.keys = int()?,
                "mismatched" => r.mismatched = int()?,
                "generation" => r.generation = int()?,
                _ => return None,
            }
        }
        Some(r)
    }
}

/// The child role: one instance. Prints `READY`, waits for a line on stdin, puts for the
/// run's time, flushes, checks, prints its `RESULT` line.
fn child(url: &str, i: u64, n: u64) {
    let seconds = env("INSTANCES_SECONDS", 5);
    let keys = env("INSTANCES_KEYS", 100_000);
    let store = pg(url);
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_delay(Duration::from_secs(1))
            .max_batch(BATCH)
            .flush_timeout(Duration::from_secs(600))
            .build()
            .expect("build the cache"),
    );
    let drawn: Vec<Arc<Vec<u64>>> = (0..THREADS)
        .map(|t| Arc::new(draw(keys, i, n, 1 + i * THREADS + t)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(THREADS as usize + 1));
    let writers: Vec<_> = drawn
        .iter()
        .enumerate()
        .map(|(t, keys)| {
            let (cache, keys, stop, start) =
                (cache.clone(), keys.clone(), stop.clone(), start.clone());
            std::thread::spawn(move || {
                let mut puts = 0u64;
                let mut first_version = 0;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let key = keys[puts as usize % DRAWN];
                    // The value names the writer and its put: the last one put is checked.
                    let v = cache.put(key, ((t as u64) << 56) | puts).expect("put");
                    if puts == 0 {
                        first_version = v;
                    }
                    puts += 1;
                }
                (puts, first_version)
            })
        })
        .collect();
    println!("READY");
    std::io::stdout().flush().expect("stdout");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("stdin");

    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut puts = 0;
    let mut reached = Vec::new();
    let mut generation = 0;
    for w in writers {
        let (p, first_version) = w.join().expect("writer thread");
        puts += p;
        reached.push(p);
        generation = generation.max(version::generation_of(first_version).unwrap_or(0));
    }
    let put_seconds = t0.elapsed().as_secs_f64();
    cache.flush().expect("flush");
    let seconds = t0.elapsed().as_secs_f64();
    let m = cache.metrics();

    // The keys written, and the stored value of each against the cache's.
    let mut written = vec![false; keys as usize];
    for (keys, &p) in drawn.iter().zip(&reached) {
        for &k in &keys[..(p as usize).min(DRAWN)] {
            written[k as usize] = true;
        }
    }
    let written: Vec<u64> = (0..keys).filter(|&k| written[k as usize]).collect();
    let mut mismatched = 0;
    for chunk in written.chunks(10_000) {
        let stored: std::collections::HashMap<u64, u64> = store
            .load_all(chunk)
            .expect("load the written keys")
            .into_iter()
            .collect();
        for k in chunk {
            let cached = cache.get(k).expect("get");
            if cached.is_none() || stored.get(k) != cached.as_ref() {
                mismatched += 1;
            }
        }
    }
    let report = cache.close(Duration::from_secs(60));
    let r = Report {
        puts,
        rows: m.records_written,
        batches: m.batches,
        put_seconds,
        seconds,
        superseded: m.superseded,
        failed: m.failed_writes + report.unwritten.len() as u64,
        keys: written.len() as u64,
        mismatched,
        generation,
    };
    println!("{}", r.line());
}

/// Drops and recreates the table, and writes every key once (version 1) in key order.
fn prefill(url: &str, admin: &mut postgres::Client, keys: u64) {
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .expect("drop the bench table");
    let store = pg(url);
    let all: Vec<Write<u64, u64>> = (0..keys)
        .map(|key| Write::Put {
            key,
            value: 0,
            version: 1,
        })
        .collect();
    for chunk in all.chunks(BATCH) {
        store.write_all(chunk).expect("prefill");
    }
}

/// Rows per second of N threads, each with its own connection, writing batches of `BATCH`
/// distinct keys of its own range (`key % n == i`, in a random order) for `seconds`.
fn ceiling(url: &str, n: u64, keys: u64, seconds: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(n as usize + 1));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let store = pg(url);
            let (stop, start) = (stop.clone(), start.clone());
            std::thread::spawn(move || {
                let mut own: Vec<u64> = (0..keys).filter(|k| k % n == i).collect();
                let batch = BATCH.min(own.len()).max(1);
                let mut rng = Rng::new(100 + i);
                let mut version = 2u64;
                let mut rows = 0u64;
                start.wait();
                'run: loop {
                    for j in (1..own.len()).rev() {
                        own.swap(j, rng.below(j as u64 + 1) as usize);
                    }
                    for chunk in own.chunks_exact(batch) {
                        if stop.load(Ordering::Relaxed) {
                            break 'run;
                        }
                        let writes: Vec<Write<u64, u64>> = chunk
                            .iter()
                            .map(|&key| {
                                version += 1;
                                Write::Put {
                                    key,
                                    value: version,
                                    version,
                                }
                            })
                            .collect();
                        store.write_all(&writes).expect("ceiling write_all");
                        rows += writes.len() as u64;
                    }
                }
                rows
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let rows: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("ceiling thread"))
        .sum();
    rows as f64 / t0.elapsed().as_secs_f64()
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Reads `child`'s stdout up to a line starting with `prefix`; other lines are echoed.
fn read_until(stdout: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).expect("read a child's stdout") == 0 {
            panic!("an instance exited before printing {prefix}");
        }
        if line.starts_with(prefix) {
            return line.trim_end().to_string();
        }
        print!("{line}");
    }
}

/// N instances at once: spawned, started together, their reports collected.
fn instances(n: u64) -> Vec<Report> {
    let exe = std::env::current_exe().expect("this bench's own binary");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut running: Vec<Running> = (0..n)
        .map(|i| {
            let mut child = Command::new(&exe)
                .args(&args)
                .env(CHILD, i.to_string())
                .env(OF, n.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn an instance");
            let stdin = child.stdin.take().expect("child stdin");
            let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
            Running {
                child,
                stdin,
                stdout,
            }
        })
        .collect();
    for r in &mut running {
        read_until(&mut r.stdout, "READY");
    }
    for r in &mut running {
        writeln!(r.stdin, "go").expect("start an instance");
        r.stdin.flush().expect("start an instance");
    }
    running
        .into_iter()
        .map(|mut r| {
            let line = read_until(&mut r.stdout, "RESULT");
            let status = r.child.wait().expect("wait for an instance");
            assert!(status.success(), "an instance failed: {status}");
            Report::parse(&line).unwrap_or_else(|| panic!("unparsable report: {line}"))
        })
        .collect()
}

fn main() {
    if let (Ok(i), Ok(n)) = (std::env::var(CHILD), std::env::var(OF)) {
        let url = std::env::var("WRITEBEHIND_PG_URL").expect("WRITEBEHIND_PG_URL in a child");
        let (i, n) = (
            i.parse().expect("INSTANCES_CHILD"),
            n.parse().expect("INSTANCES_OF"),
        );
        child(&url, i, n);
        return;
    }
    // `cargo test --benches` runs this with `--bench` absent: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Ok(url) = std::env::var("WRITEBEHIND_PG_URL") else {
        println!(
            "instances: WRITEBEHIND_PG_URL not set, skipped \
             (source .ci/pg.sh && pg_start sets it)"
        );
        return;
    };
    let seconds = env("INSTANCES_SECONDS", 5);
    let keys = env("INSTANCES_KEYS", 100_000);
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).expect("postgres");
    let server: String = admin
        .query_one("SHOW server_version", &[])
        .expect("server version")
        .get(0);
    println!(
        "machine: {} CPUs; PostgreSQL {server}; {keys} keys, {seconds} s per phase, \
         2 writer threads per instance, max_batch {BATCH}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let checkpoint = |admin: &mut postgres::Client| {
        admin
            .batch_execute("CHECKPOINT")
            .expect("CHECKPOINT (the bench connects as a superuser)");
    };
    let mut rows_out = Vec::new();
    for n in counts() {
        prefill(&url, &mut admin, keys);
        checkpoint(&mut admin);
        let ceiling = ceiling(&url, n, keys, seconds);
        checkpoint(&mut admin);
        let reports = instances(n);

        // The rows this N's instances wrote: those of their generations or later.
        let first = reports.iter().map(|r| r.generation).min().unwrap_or(0);
        let floor = version::first_of_generation(first).expect("generation") as i64;
        let stored: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM {TABLE} WHERE version >= $1"),
                &[&floor],
            )
            .expect("count the written rows")
            .get(0);
        let written: u64 = reports.iter().map(|r| r.keys).sum();
        let mismatched: u64 = reports.iter().map(|r| r.mismatched).sum();
        let superseded: u64 = reports.iter().map(|r| r.superseded).sum();
        let failed: u64 = reports.iter().map(|r| r.failed).sum();
        let ok = stored as u64 == written && mismatched == 0 && superseded == 0 && failed == 0;
        let check = if ok {
            format!("OK, {} keys", thousands(written as f64))
        } else {
            format!(
                "FAILED: {stored} rows of {written} keys, {mismatched} mismatched, \
                 {superseded} superseded, {failed} unwritten"
            )
        };

        let rows: u64 = reports.iter().map(|r| r.rows).sum();
        let puts: u64 = reports.iter().map(|r| r.puts).sum();
        let batches: u64 = reports.iter().map(|r| r.batches).sum();
        let longest = reports.iter().map(|r| r.seconds).fold(0.0, f64::max);
        let rate = rows as f64 / longest;
        let per_instance: Vec<f64> = reports
            .iter()
            .map(|r| r.puts as f64 / r.put_seconds)
            .collect();
        let total_puts: f64 = per_instance.iter().sum();
        let (lo, hi) = per_instance
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &p| (lo.min(p), hi.max(p)));
        for (i, r) in reports.iter().enumerate() {
            println!(
                "instance {i} of {n}: {} puts in {:.2} s, {} rows in {} batches, {:.2} s with \
                 the final flush, {} keys, generation {}",
                r.puts, r.put_seconds, r.rows, r.batches, r.seconds, r.keys, r.generation
            );
        }
        rows_out.push(format!(
            "| {n} | {} | {} | {:.2}x | {} | {} | {:.1} | {:.0} | {:.2} | {check} |",
            thousands(ceiling),
            thousands(rate),
            rate / ceiling,
            thousands(total_puts),
            if n == 1 {
                thousands(lo)
            } else {
                format!("{}–{}", thousands(lo), thousands(hi))
            },
            puts as f64 / rows.max(1) as f64,
            rows as f64 / batches.max(1) as f64,
            reports
                .iter()
                .map(|r| r.seconds - r.put_seconds)
                .fold(0.0, f64::max),
        ));
    }
    println!();
    println!(
        "| instances | ceiling rows/s (N connections, plain 1,000-row upserts) | instances rows/s | / ceiling | puts/s, total | puts/s per instance | puts per row | rows per batch | final flush, s | check |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows_out {
        println!("{r}");
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
