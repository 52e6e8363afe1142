//! Step 3 of a mode's run, the load: client threads issue reads and updates of
//! Zipf-distributed users against the cache for the run's duration, under a progress bar;
//! their latencies are merged when they stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use writebehind::testing::profiles::Profile;
use writebehind::testing::{Rng, Zipf};
use writebehind::Cache;

use crate::probe::{new_histogram, Probe, BUCKET};
use crate::{group, profile_for, Args, BoxError};

/// Operations a client issues between two looks at the stop flag.
const ROUND: u64 = 256;

/// What the load measured, all client threads together.
pub struct Load {
    /// When the clients were let go.
    pub started: Instant,
    /// Seconds from `started` until they were told to stop.
    pub seconds: f64,
    pub reads: Histogram<u64>,
    pub writes: Histogram<u64>,
    /// Write latency per `BUCKET` from `started`, without trailing empty buckets.
    pub writes_over_time: Vec<Histogram<u64>>,
}

/// What one client thread measured.
struct Latencies {
    reads: Histogram<u64>,
    writes: Histogram<u64>,
    writes_over_time: Vec<Histogram<u64>>,
}

impl Latencies {
    fn new(buckets: usize) -> Self {
        Latencies {
            reads: new_histogram(),
            writes: new_histogram(),
            writes_over_time: (0..buckets).map(|_| new_histogram()).collect(),
        }
    }
}

/// What every client thread shares.
struct Clients {
    cache: Arc<Cache<u64, Profile>>,
    probe: Arc<Probe>,
    zipf: Arc<Zipf>,
    read_ratio: f64,
    started: Instant,
    /// Buckets of the over-time series, enough for the whole run.
    buckets: usize,
    stop: AtomicBool,
    /// Operations issued so far, for the progress bar.
    ops: AtomicU64,
}

/// Runs the load of `args` on `cache`; `label` names the mode and the database on the
/// progress bar, `mode` prefixes a client's error.
pub fn run(
    args: &Args,
    cache: &Arc<Cache<u64, Profile>>,
    probe: &Arc<Probe>,
    zipf: &Arc<Zipf>,
    mode: &str,
    label: &str,
) -> Result<Load, BoxError> {
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let clients = Arc::new(Clients {
        cache: cache.clone(),
        probe: probe.clone(),
        zipf: zipf.clone(),
        read_ratio: args.read_ratio,
        started,
        buckets: (duration.as_nanos() / BUCKET.as_nanos()) as usize + 2,
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
    });
    let mut handles = Vec::new();
    for t in 0..args.threads {
        let seed = args.seed.wrapping_mul(1000).wrapping_add(u64::from(t) + 1);
        let clients = clients.clone();
        let h = std::thread::Builder::new()
            .name(format!("client-{t}"))
            .spawn(move || clients.client(seed))?;
        handles.push(h);
    }
    let seconds = progress(&clients, duration, label);
    let all = merge(handles, clients.buckets, mode)?;
    Ok(Load {
        started,
        seconds,
        reads: all.reads,
        writes: all.writes,
        writes_over_time: all.writes_over_time,
    })
}

impl Clients {
    /// One client thread: rounds of reads and updates until told to stop.
    fn client(&self, seed: u64) -> Result<Latencies, String> {
        let mut rng = Rng::new(seed);
        let mut out = Latencies::new(self.buckets);
        while !self.stop.load(Ordering::Relaxed) {
            for _ in 0..ROUND {
                let key = self.zipf.sample(&mut rng);
                if rng.next_f64() < self.read_ratio {
                    self.read(key, &mut out)?;
                } else {
                    self.update(key, rng.next_u64(), &mut out)?;
                }
            }
            self.ops.fetch_add(ROUND, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// A timed `get` of a profile that must be there.
    fn read(&self, key: u64, out: &mut Latencies) -> Result<(), String> {
        let t0 = Instant::now();
        let got = self.cache.get(&key).map_err(|e| format!("get: {e}"))?;
        let dt = t0.elapsed().as_nanos() as u64;
        out.reads.saturating_record(dt.max(1));
        if got.is_none() {
            return Err(format!("profile {key} vanished from the cache"));
        }
        Ok(())
    }

    /// A timed `put` of a new profile drawn from `r`, stamped for the probe first.
    fn update(&self, key: u64, r: u64, out: &mut Latencies) -> Result<(), String> {
        let value = profile_for(key, r);
        let t0 = Instant::now();
        self.probe.stamp(key, t0);
        self.cache
            .put(key, value)
            .map_err(|e| format!("put: {e}"))?;
        let dt = t0.elapsed().as_nanos() as u64;
        out.writes.saturating_record(dt.max(1));
        let b = (t0.duration_since(self.started).as_nanos() / BUCKET.as_nanos()) as usize;
        if let Some(h) = out.writes_over_time.get_mut(b) {
            h.saturating_record(dt.max(1));
        }
        Ok(())
    }
}

/// Shows the load's progress until `duration` has passed, then stops the clients; returns
/// the seconds they ran.
fn progress(clients: &Clients, duration: Duration, label: &str) -> f64 {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:40}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let started = clients.started;
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100));
        let el = started.elapsed();
        bar.set_position(el.as_millis() as u64);
        bar.set_message(format!(
            "{:>5.1} s  {:>12} ops/s  {} rows written",
            el.as_secs_f64(),
            group(clients.ops.load(Ordering::Relaxed) as f64 / el.as_secs_f64()),
            group(clients.probe.rows.load(Ordering::Relaxed) as f64),
        ));
    }
    clients.stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    seconds
}

/// Joins the clients and merges their latencies; the error of a failed client names `mode`.
fn merge(
    handles: Vec<JoinHandle<Result<Latencies, String>>>,
    buckets: usize,
    mode: &str,
) -> Result<Latencies, BoxError> {
    let mut all = Latencies::new(buckets);
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => {
                all.reads.add(&r.reads)?;
                all.writes.add(&r.writes)?;
                for (all, one) in all.writes_over_time.iter_mut().zip(&r.writes_over_time) {
                    all.add(one)?;
                }
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a client thread panicked".to_string()),
        }
    }
    if let Some(e) = failure {
        return Err(format!("{mode}: {e}").into());
    }
    let over_time = &mut all.writes_over_time;
    while over_time.last().is_some_and(|h| h.is_empty()) && over_time.len() > 1 {
        over_time.pop();
    }
    Ok(all)
}
