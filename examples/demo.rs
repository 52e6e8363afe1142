//! A small demonstration: two threads update hot keys while a slow store is written behind.
use std::sync::Arc;
use std::time::{Duration, Instant};

use writebehind::{testing::FaultyStore, Cache};

fn main() -> Result<(), writebehind::Error> {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    store.set_latency(Duration::from_millis(5)); // a slow database
    let cache = Arc::new(
        Cache::builder(store.clone())
            .write_delay(Duration::from_millis(100))
            .build()?,
    );
    let start = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while start.elapsed() < Duration::from_secs(1) {
                    cache.put((n * 7 + t) % 1000, n).expect("open cache");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let puts: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    cache.flush()?;
    let m = cache.metrics();
    println!(
        "puts: {puts} in 1 s, store batches: {}, records written: {}",
        m.batches, m.records_written
    );
    println!(
        "conflation: {:.1} puts per record written",
        puts as f64 / m.records_written.max(1) as f64
    );
    let report = cache.close(Duration::from_secs(5));
    println!("unwritten at close: {}", report.unwritten.len());
    Ok(())
}
