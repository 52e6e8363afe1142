//! A cache writing behind to PostgreSQL survives the server going away: while the server is
//! stopped, reads and writes keep being served from memory; once it is back and the cache is
//! flushed, the table equals the cache exactly.
//!
//! Needs `WRITEBEHIND_PG_URL` and `WRITEBEHIND_PG_CTL` (`source .ci/pg.sh && pg_start`).
//! Without them the test prints SKIPPED and passes, except under `CI`, where it fails.
#![cfg(feature = "postgres")]

mod pg;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pg::{need, Outage};
use postgres::{Client, NoTls};
use writebehind::stores::PostgresStore;
use writebehind::{Cache, Health, Store, WriteMode};

const TABLE: &str = "wb_test_cache_outage";
const THREADS: u64 = 2;
const KEYS_PER_THREAD: u64 = 400;

/// What a writer thread did: its keys' expected values, and how many operations it served
/// while the server was down.
struct Writer {
    model: HashMap<u64, Option<String>>,
    ops_during_outage: u64,
}

/// Puts (and now and then removes) its own keys, and reads back keys it wrote, checking
/// read-your-writes the whole time. Every operation must succeed, outage or not.
fn writer(
    cache: Arc<Cache<u64, String>>,
    t: u64,
    stop: Arc<AtomicBool>,
    server_down: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> JoinHandle<Writer> {
    std::thread::spawn(move || {
        let mut model: HashMap<u64, Option<String>> = HashMap::new();
        let mut ops_during_outage = 0;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let key = t * KEYS_PER_THREAD + (i * 7919) % KEYS_PER_THREAD;
            if i % 13 == 0 {
                cache.remove(&key).expect("remove is served from memory");
                model.insert(key, None);
            } else {
                let value = format!("t{t}-op{i}");
                cache
                    .put(key, value.clone())
                    .expect("put is served from memory");
                model.insert(key, Some(value));
            }
            // Read back a key this thread wrote: memory answers, whatever the server does.
            let probe = t * KEYS_PER_THREAD + (i * 31) % KEYS_PER_THREAD;
            if let Some(Some(expected)) = model.get(&probe) {
                let got = cache.get(&probe).expect("get is served from memory");
                assert_eq!(
                    got.as_ref(),
                    Some(expected),
                    "read-your-writes, key {probe}"
                );
            }
            if server_down.load(Ordering::Relaxed) {
                ops_during_outage += 1;
            }
            ops.fetch_add(1, Ordering::Relaxed);
            i += 1;
            if i % 64 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Writer {
            model,
            ops_during_outage,
        }
    })
}

#[test]
fn write_behind_load_rides_out_a_postgres_restart() {
    let url = need!("WRITEBEHIND_PG_URL");
    let ctl = need!("WRITEBEHIND_PG_CTL");
    Client::connect(&url, NoTls)
        .expect("connect for setup")
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .expect("drop table");
    let store =
        Arc::new(PostgresStore::<u64, String>::connect(&url, TABLE).expect("connect store"));
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_mode(WriteMode::Behind)
            .write_delay(Duration::from_millis(20))
            .max_batch(200)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(200))
            .flush_timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let server_down = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            writer(
                cache.clone(),
                t,
                stop.clone(),
                server_down.clone(),
                ops.clone(),
            )
        })
        .collect();

    // Healthy: writes reach the table.
    std::thread::sleep(Duration::from_millis(400));
    let written_before = cache.metrics().records_written;
    assert!(written_before > 0, "nothing was written while healthy");

    // Open the store's read connection before the outage, so the read-back below runs on a
    // connection whose session the restart ended.
    store.load_all(&[0]).expect("a read while healthy");

    // Down: the load goes on, served from memory; the flushers fail and retry.
    let mut outage = Outage::begin(ctl);
    server_down.store(true, Ordering::Relaxed);
    let down_at = Instant::now();
    let ops_at_stop = ops.load(Ordering::Relaxed);
    while down_at.elapsed() < Duration::from_millis(800) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = cache.metrics();
    assert!(
        m.store_unavailable > 0,
        "the flusher never saw the outage: {m:?}"
    );
    assert!(
        matches!(m.health, Health::Degraded { .. }),
        "health should be degraded while the server is down: {m:?}"
    );
    assert!(m.dirty > 0, "writes should be waiting: {m:?}");
    let served_down = ops.load(Ordering::Relaxed) - ops_at_stop;
    assert!(
        served_down > 100,
        "only {served_down} operations while the server was down"
    );
    server_down.store(false, Ordering::Relaxed);

    // Up again: the store reconnects, the backlog drains, the load goes on.
    outage.end();
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let mut model = HashMap::new();
    let mut during = 0;
    for w in writers {
        let w = w.join().expect("writer thread");
        during += w.ops_during_outage;
        model.extend(w.model);
    }
    assert!(during > 0);
    cache.flush().expect("flush after the restart");
    let m = cache.metrics();
    assert_eq!(m.dirty, 0, "{m:?}");
    assert_eq!(m.health, Health::Healthy, "{m:?}");
    assert_eq!(m.failed_writes, 0, "{m:?}");

    // The table equals the cache, key by key, and both equal what the writers did.
    let keys: Vec<u64> = (0..THREADS * KEYS_PER_THREAD).collect();
    // The store's read connection was opened before the restart: the adapter notices the
    // ended session and retries the read on a fresh connection, so the first read succeeds.
    let table: HashMap<u64, String> = store
        .load_all(&keys)
        .expect("the first read after a restart reconnects")
        .into_iter()
        .collect();
    let mut compared = 0;
    for &k in &keys {
        let in_cache = cache.get(&k).unwrap();
        assert_eq!(in_cache.as_ref(), table.get(&k), "key {k}: cache vs table");
        if let Some(expected) = model.get(&k) {
            assert_eq!(&in_cache, expected, "key {k}: cache vs writer");
        }
        compared += 1;
    }
    assert_eq!(compared, keys.len());
    assert!(!table.is_empty());
    let report = cache.close(Duration::from_secs(10));
    assert!(report.is_clean(), "{} unwritten", report.unwritten.len());
}
