//! `writebehind-demo`: the load driver of the portal-personalization case (`cargo run --release --features demo`).
//!
//! An online bank moves user-profile reads and updates off its database into the cache. The
//! driver creates and fills a `profiles` table (embedded SQLite by default, or PostgreSQL with
//! `--postgres`), preloads the cache from it without writing anything back, and runs mixed
//! reads and updates over Zipf-distributed (hot-user) keys, once in write-through mode and
//! once in write-behind mode. It prints one side-by-side table and, with `--plot`, an SVG.

mod load;
mod probe;
mod redact;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use writebehind::journal::{Journal, JournalSync};
use writebehind::stores::Raw;
use writebehind::testing::profiles::{self, Profile, ProfileCodec};
use writebehind::testing::{Rng, Zipf};
use writebehind::{
    Cache, Store, Write, WriteMode, DEFAULT_FLUSHER_NICE, DEFAULT_MAX_BATCH, DEFAULT_SHARDS,
};

use probe::{Db, Probe, Probed};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Rows per statement when filling, preloading and checking.
const CHUNK: usize = 5000;

/// Load driver of the portal-personalization case: user-profile reads and updates through a
/// write-through and a write-behind cache in front of SQLite (default) or PostgreSQL.
///
/// The driver drops and recreates the table `profiles` in the database it is given.
#[derive(Parser, Debug)]
#[command(name = "writebehind-demo", version)]
struct Args {
    /// Number of user profiles.
    #[arg(short = 'n', long = "profiles", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    n: u64,

    /// Client threads.
    #[arg(short = 't', long = "threads", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,

    /// Seconds of load per mode.
    #[arg(long, default_value_t = 5.0, value_parser = positive_seconds, allow_negative_numbers = true)]
    duration: f64,

    /// Share of operations that are reads (the rest are updates).
    #[arg(long, default_value_t = 0.9, value_parser = fraction, allow_negative_numbers = true)]
    read_ratio: f64,

    /// Zipf exponent of the key distribution (0 = uniform; 1 = a few very hot users).
    #[arg(long, default_value_t = 1.0, value_parser = zipf_exponent, allow_negative_numbers = true)]
    zipf: f64,

    /// Which write modes to run.
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    mode: ModeArg,

    /// SQLite database file (created if missing). Default: a temporary file, removed at exit.
    #[arg(long, value_name = "PATH", conflicts_with = "postgres")]
    db: Option<PathBuf>,

    /// Use PostgreSQL instead of SQLite: a libpq connection string or postgres:// URL.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,

    /// Write an SVG chart (write latency and rows written per second over time) to FILE.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,

    /// Write-behind staleness bound in milliseconds (the cache's write_delay).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    write_delay_ms: u64,

    /// Nice levels the flusher threads run below the client threads (Linux; the cache's
    /// flusher_nice). 0 runs them at the clients' priority.
    #[arg(long, value_name = "LEVELS", default_value_t = DEFAULT_FLUSHER_NICE)]
    flusher_nice: u8,

    /// Largest batch (rows per transaction) and count trigger of write-behind.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH, value_parser = batch_size)]
    max_batch: usize,

    /// Seed of the key and value generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Journal the write-behind run's writes in DIR (crash safety; see the README). Off by
    /// default.
    #[arg(long, value_name = "DIR")]
    journal: Option<PathBuf>,

    /// How the journal syncs: `every` (each write on stable storage before it returns,
    /// concurrent writers sharing a sync), `interval` (every 10 ms) or `os` (never).
    #[arg(long, value_enum, default_value_t = SyncArg::Interval, requires = "journal")]
    journal_sync: SyncArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SyncArg {
    Every,
    Interval,
    Os,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Through,
    Behind,
    Both,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

fn batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if (1..=1_000_000).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a batch size between 1 and 1000000")),
    }
}

fn zipf_exponent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=10.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not an exponent between 0 and 10")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            // The messages name the server by its redacted connection string; a library's
            // message could still quote the password, so it is scrubbed from all of them.
            let message = match &args.postgres {
                Some(conn) => redact::scrub(&e.to_string(), conn),
                None => e.to_string(),
            };
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources, `: `-separated (the postgres crate puts the cause in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

/// Where the database lives, for the report and for clean-up.
struct Target {
    db: Arc<Db>,
    label: String,
    temp_file: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(p) = &self.temp_file {
            for suffix in ["", "-wal", "-shm"] {
                let mut f = p.clone().into_os_string();
                f.push(suffix);
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

fn open_target(args: &Args) -> Result<Target, BoxError> {
    if let Some(url) = &args.postgres {
        // Messages show the connection string without its password.
        let shown = redact::redact(url);
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| format!("--postgres {shown:?} is not a valid connection string: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // A first connection with a timeout, so an unreachable server is a clear error.
        config
            .connect(postgres::NoTls)
            .map_err(|e| format!("cannot reach PostgreSQL at {shown:?}: {}", chain(&e)))?;
        let store = profiles::postgres::ProfileStore::connect(url)
            .map_err(|e| format!("cannot use PostgreSQL at {shown:?}: {e}"))?;
        return Ok(Target {
            db: Arc::new(Db::Postgres(Box::new(store))),
            label: "PostgreSQL".to_string(),
            temp_file: None,
        });
    }
    let (path, temp_file) = match &args.db {
        Some(p) => (p.clone(), None),
        None => {
            let p =
                std::env::temp_dir().join(format!("writebehind-demo-{}.db", std::process::id()));
            (p.clone(), Some(p))
        }
    };
    let store = profiles::sqlite::ProfileStore::open(&path).map_err(|e| {
        format!(
            "cannot open the SQLite database {}: {e} (is its directory there and writable?)",
            path.display()
        )
    })?;
    Ok(Target {
        db: Arc::new(Db::Sqlite(store)),
        label: format!("SQLite {}", path.display()),
        temp_file,
    })
}

/// Everything one mode's run measured.
pub struct ModeResult {
    pub mode: WriteMode,
    pub seconds: f64,
    pub reads: Histogram<u64>,
    pub writes: Histogram<u64>,
    /// Write latency per `BUCKET` of the load phase.
    pub writes_over_time: Vec<Histogram<u64>>,
    /// Rows committed per `BUCKET`, from the start of the load phase.
    pub rows_over_time: Vec<u64>,
    pub transactions: u64,
    pub failed_transactions: u64,
    pub rows: u64,
    pub ages: Histogram<u64>,
    pub unstamped: u64,
    pub flush_time: Duration,
    pub compared: u64,
    pub mismatched: u64,
    pub unwritten_at_close: usize,
    /// Steps a niced flusher handed to its keeper (`--flusher-nice`).
    pub handoffs: u64,
    /// Steps a niced flusher's keeper took from a worker that had not started them.
    pub takeovers: u64,
}

fn run(args: &Args) -> Result<bool, BoxError> {
    let target = open_target(args)?;
    let zipf = Arc::new(Zipf::new(args.n, args.zipf));
    let modes: &[WriteMode] = match args.mode {
        ModeArg::Through => &[WriteMode::Through],
        ModeArg::Behind => &[WriteMode::Behind],
        ModeArg::Both => &[WriteMode::Through, WriteMode::Behind],
    };
    let mut results = Vec::new();
    for &mode in modes {
        results.push(run_mode(args, &target.db, mode, &zipf)?);
    }
    print!(
        "{}",
        report::table(args_summary(args, &target, &zipf), &results)
    );
    if let Some(path) = &args.plot {
        report::plot(path, &results)
            .map_err(|e| format!("cannot write the chart {}: {e}", path.display()))?;
        println!("chart: {}", path.display());
    }
    let consistent = results.iter().all(|r| r.mismatched == 0);
    if !consistent {
        eprintln!("error: the database does not match the cache (see the consistency line)");
    }
    Ok(consistent)
}

fn args_summary(args: &Args, target: &Target, zipf: &Zipf) -> String {
    let top = (args.n as usize / 100).max(1);
    format!(
        "store: {}\nprofiles: {}, threads: {}, {} s per mode, read ratio {}, zipf {} \
         (the hottest 1% of users get {:.0}% of the operations)\n\
         cache: write_delay {} ms, max_batch {}, {} shards, 1 flusher{}\nmachine: {}\n",
        target.label,
        args.n,
        args.threads,
        args.duration,
        args.read_ratio,
        args.zipf,
        100.0 * zipf.head_mass(top),
        args.write_delay_ms,
        args.max_batch,
        DEFAULT_SHARDS,
        match &args.journal {
            Some(dir) => format!(
                "; write-behind journaled in {} (sync: {:?})",
                dir.display(),
                args.journal_sync
            ),
            None => String::new(),
        },
        report::machine(),
    )
}

fn profile_for(key: u64, r: u64) -> Profile {
    Profile {
        name: format!("user-{key}"),
        theme: if r & 1 == 0 { "light" } else { "dark" }.to_string(),
        visits: (r >> 1) as i64 & 0xFFFF_FFFF,
    }
}

/// One mode's run, in its four steps: a fresh table, a preloaded cache, the load, and the
/// final flush with its consistency check.
fn run_mode(
    args: &Args,
    db: &Arc<Db>,
    mode: WriteMode,
    zipf: &Arc<Zipf>,
) -> Result<ModeResult, BoxError> {
    let name = report::mode_name(mode);
    let keys: Vec<u64> = (0..args.n).collect();
    fill_table(args, db, &keys)?;
    let probe = Arc::new(Probe::new(args.n));
    let cache = Arc::new(preloaded_cache(args, db, mode, &probe, &keys)?);
    let label = format!("{name} {}", target_short(db));
    let load = load::run(args, &cache, &probe, zipf, name, &label)?;
    let check = flush_and_compare(name, &cache, db, &keys)?;
    let (handoffs, takeovers) = {
        let m = cache.metrics();
        (m.flusher_handoffs, m.flusher_takeovers)
    };
    let report = cache.close(Duration::from_secs(10));
    Ok(ModeResult {
        mode,
        seconds: load.seconds,
        reads: load.reads,
        writes: load.writes,
        writes_over_time: load.writes_over_time,
        rows_over_time: probe.rows_per_bucket(probe.nanos_at(load.started)),
        transactions: probe.transactions.load(Ordering::Relaxed),
        failed_transactions: probe.failed_transactions.load(Ordering::Relaxed),
        rows: probe.rows.load(Ordering::Relaxed),
        ages: probe.ages(),
        unstamped: probe.unstamped.load(Ordering::Relaxed),
        flush_time: check.flush_time,
        compared: check.compared,
        mismatched: check.mismatched,
        unwritten_at_close: report.unwritten.len(),
        handoffs,
        takeovers,
    })
}

/// Step 1: a fresh table with `keys` profiles (version 1: below every version a cache hands
/// out).
fn fill_table(args: &Args, db: &Db, keys: &[u64]) -> Result<(), BoxError> {
    db.reset()
        .map_err(|e| format!("cannot create the profiles table: {e}"))?;
    let mut rng = Rng::new(args.seed);
    for chunk in keys.chunks(CHUNK) {
        let batch: Vec<Write<u64, Profile>> = chunk
            .iter()
            .map(|&k| Write::Put {
                key: k,
                value: profile_for(k, rng.next_u64()),
                version: 1,
            })
            .collect();
        db.write_all(&batch)
            .map_err(|e| format!("cannot fill the profiles table: {e}"))?;
    }
    Ok(())
}

/// Step 2: the cache in `mode`, preloaded from the table without writing back.
fn preloaded_cache(
    args: &Args,
    db: &Arc<Db>,
    mode: WriteMode,
    probe: &Arc<Probe>,
    keys: &[u64],
) -> Result<Cache<u64, Profile>, BoxError> {
    let cache = Cache::builder(Probed {
        db: db.clone(),
        probe: probe.clone(),
    })
    .name(format!("demo-{}", report::mode_name(mode)))
    .write_mode(mode)
    .write_delay(Duration::from_millis(args.write_delay_ms))
    .max_batch(args.max_batch)
    .flusher_nice(args.flusher_nice)
    // The profiles table is keyed by user id: a backlog reaches it in runs of neighbouring
    // ids, which the B-tree takes in a few pages per batch.
    .flush_order(|a: &u64, b: &u64| a.cmp(b));
    let cache = match (&args.journal, mode) {
        (Some(dir), WriteMode::Behind) => {
            let sync = match args.journal_sync {
                SyncArg::Every => JournalSync::EveryWrite,
                SyncArg::Interval => JournalSync::Interval(Duration::from_millis(10)),
                SyncArg::Os => JournalSync::Os,
            };
            cache.journal(Journal::new(dir, Raw, ProfileCodec).sync(sync))
        }
        _ => cache,
    }
    .build()?;
    let mut preloaded = 0usize;
    for chunk in keys.chunks(CHUNK) {
        let rows = db
            .load_all(chunk)
            .map_err(|e| format!("cannot read the profiles table: {e}"))?;
        preloaded += rows.len();
        cache.preload(rows)?;
    }
    if preloaded as u64 != args.n {
        return Err(format!("preloaded {preloaded} profiles, expected {}", args.n).into());
    }
    Ok(cache)
}

/// What step 4 found.
struct Check {
    flush_time: Duration,
    compared: u64,
    mismatched: u64,
}

/// Step 4: everything into the database, then the database compared with the cache.
fn flush_and_compare(
    name: &str,
    cache: &Cache<u64, Profile>,
    db: &Db,
    keys: &[u64],
) -> Result<Check, BoxError> {
    let t = Instant::now();
    cache
        .flush()
        .map_err(|e| format!("{name}: final flush failed: {e}"))?;
    let flush_time = t.elapsed();
    let (mut compared, mut mismatched) = (0u64, 0u64);
    for chunk in keys.chunks(CHUNK) {
        let rows = db
            .load_all(chunk)
            .map_err(|e| format!("cannot read the profiles table back: {e}"))?;
        mismatched += (chunk.len() - rows.len()) as u64; // missing rows
        for (k, p) in rows {
            compared += 1;
            if cache.get(&k)? != Some(p) {
                mismatched += 1;
            }
        }
    }
    Ok(Check {
        flush_time,
        compared,
        mismatched,
    })
}

fn target_short(db: &Db) -> &'static str {
    match db {
        Db::Sqlite(_) => "sqlite",
        Db::Postgres(_) => "postgres",
    }
}

/// `1234567` -> `1,234,567`.
pub fn group(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
