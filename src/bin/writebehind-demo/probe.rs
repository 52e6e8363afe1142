//! What the driver measures on the database side: the [`Db`] behind the cache, wrapped in a
//! [`Probed`] store that counts transactions and rows and times each key's wait.
//!
//! **Oldest unflushed write.** Before each `put` the driver stamps the key with the time of
//! its first write since the key was last handed to the database (a compare-and-swap from
//! "clean", so later writes keep the first stamp). When a batch reaches the store the probe
//! takes the stamps of its keys away (a write from then on starts a new window), and when the
//! transaction commits it records `commit time - stamp` per row: how long the oldest write of
//! that flush window waited. A failed transaction puts its stamps back. In write-through mode
//! this is the `put` itself. A put that lands between the flusher's snapshot of its key and
//! the batch reaching the store leaves no stamp for the next window; the probe counts the rows
//! written without a stamp (`unstamped`), whose wait it does not know.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use writebehind::{BatchError, Store, StoreError, Write};

use writebehind::testing::profiles::{self, Profile};

/// Width of one time bucket of the over-time series (plot and rates).
pub const BUCKET: Duration = Duration::from_millis(250);

/// The database: one of the two typed `profiles` adapters.
pub enum Db {
    /// Embedded SQLite file.
    Sqlite(profiles::sqlite::ProfileStore),
    /// PostgreSQL server (boxed: its client is several times larger than SQLite's).
    Postgres(Box<profiles::postgres::ProfileStore>),
}

impl Db {
    /// Drops and recreates `profiles`.
    pub fn reset(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(s) => s.reset(),
            Db::Postgres(s) => s.reset(),
        }
    }
}

impl Store<u64, Profile> for Db {
    fn load(&self, key: &u64) -> Result<Option<Profile>, StoreError> {
        match self {
            Db::Sqlite(s) => s.load(key),
            Db::Postgres(s) => s.load(key),
        }
    }

    fn load_all(&self, keys: &[u64]) -> Result<Vec<(u64, Profile)>, StoreError> {
        match self {
            Db::Sqlite(s) => s.load_all(keys),
            Db::Postgres(s) => s.load_all(keys),
        }
    }

    fn write_all(&self, batch: &[Write<u64, Profile>]) -> Result<(), BatchError> {
        match self {
            Db::Sqlite(s) => s.write_all(batch),
            Db::Postgres(s) => s.write_all(batch),
        }
    }
}

/// Database-side counters and timings of one run.
pub struct Probe {
    origin: Instant,
    /// Per user id: 0 when clean, else 1 + nanoseconds since `origin` of its first write
    /// since it last reached the database.
    first_dirty: Vec<AtomicU64>,
    /// Successful `write_all` calls (one transaction each).
    pub transactions: AtomicU64,
    /// `write_all` calls that failed (the cache retries them).
    pub failed_transactions: AtomicU64,
    /// Rows the database accepted.
    pub rows: AtomicU64,
    /// Rows written that carried no stamp (see the module docs).
    pub unstamped: AtomicU64,
    inner: Mutex<Timings>,
}

struct Timings {
    /// Wait of each stamped row, nanoseconds.
    ages: Histogram<u64>,
    /// Rows committed per `BUCKET` since `origin`.
    rows_per_bucket: Vec<u64>,
}

impl Probe {
    /// A probe for user ids `0..n`; its clock starts now.
    pub fn new(n: u64) -> Self {
        Probe {
            origin: Instant::now(),
            first_dirty: (0..n).map(|_| AtomicU64::new(0)).collect(),
            transactions: AtomicU64::new(0),
            failed_transactions: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            unstamped: AtomicU64::new(0),
            inner: Mutex::new(Timings {
                ages: new_histogram(),
                rows_per_bucket: Vec::new(),
            }),
        }
    }

    /// Nanoseconds from the probe's origin to `t`.
    pub fn nanos_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Marks `key` dirty at `t` unless it already is (the first write of a window counts).
    pub fn stamp(&self, key: u64, t: Instant) {
        if let Some(slot) = self.first_dirty.get(key as usize) {
            let at = self.nanos_at(t) + 1;
            let _ = slot.compare_exchange(0, at, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// A batch reached the store: takes its keys' stamps (0 where there was none).
    fn take(&self, batch: &[Write<u64, Profile>]) -> Vec<u64> {
        batch
            .iter()
            .map(|w| {
                self.first_dirty
                    .get(*w.key() as usize)
                    .map_or(0, |s| s.swap(0, Ordering::AcqRel))
            })
            .collect()
    }

    /// The batch failed: its writes are still waiting since their (earliest) stamps.
    fn restore(&self, batch: &[Write<u64, Profile>], stamps: &[u64]) {
        for (w, &old) in batch.iter().zip(stamps) {
            if let (Some(slot), true) = (self.first_dirty.get(*w.key() as usize), old != 0) {
                let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |cur| {
                    Some(if cur == 0 { old } else { cur.min(old) })
                });
            }
        }
    }

    /// The transaction carrying `batch`, whose stamps were `stamps`, committed.
    fn committed(&self, batch: &[Write<u64, Profile>], stamps: &[u64]) {
        let now = self.nanos_at(Instant::now());
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &stamp in stamps {
            if stamp == 0 {
                self.unstamped.fetch_add(1, Ordering::Relaxed);
            } else {
                t.ages
                    .saturating_record(now.saturating_sub(stamp - 1).max(1));
            }
        }
        let b = (now / BUCKET.as_nanos() as u64) as usize;
        if t.rows_per_bucket.len() <= b {
            t.rows_per_bucket.resize(b + 1, 0);
        }
        t.rows_per_bucket[b] += batch.len() as u64;
    }

    /// The wait of every stamped row written so far.
    pub fn ages(&self) -> Histogram<u64> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ages
            .clone()
    }

    /// Rows committed per `BUCKET`, from the bucket holding `from` (nanoseconds since origin).
    pub fn rows_per_bucket(&self, from: u64) -> Vec<u64> {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let first = (from / BUCKET.as_nanos() as u64) as usize;
        t.rows_per_bucket.iter().skip(first).copied().collect()
    }
}

/// Latency histogram: 1 ns to 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("constant, valid bounds")
}

/// The store the cache writes to: the database, counted by the probe.
pub struct Probed {
    /// The database.
    pub db: Arc<Db>,
    /// Its counters.
    pub probe: Arc<Probe>,
}

impl Store<u64, Profile> for Probed {
    fn load(&self, key: &u64) -> Result<Option<Profile>, StoreError> {
        self.db.load(key)
    }

    fn load_all(&self, keys: &[u64]) -> Result<Vec<(u64, Profile)>, StoreError> {
        self.db.load_all(keys)
    }

    fn write_all(&self, batch: &[Write<u64, Profile>]) -> Result<(), BatchError> {
        let stamps = self.probe.take(batch);
        let result = self.db.write_all(batch);
        match &result {
            Ok(()) => self.probe.committed(batch, &stamps),
            Err(_) => {
                // The driver writes only valid profiles, so a failure is the database being
                // unavailable: the cache retries the whole batch, still waiting since the
                // same stamps.
                self.probe.restore(batch, &stamps);
                self.probe
                    .failed_transactions
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}
