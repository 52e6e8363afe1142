//! `PgLeases` against a real PostgreSQL: partitions are taken only when free, expired or
//! already the holder's, change hands after a holder stops renewing, and no two holders
//! ever trust a lease of one partition at the same moment.
#![cfg(feature = "postgres")]

mod pg;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pg::need;
use postgres::{Client, NoTls};
use writebehind::stores::PgLeases;

/// Per partition, each (holder, from, until) during which a holder trusted its lease.
type Spans = HashMap<u32, Vec<(usize, Instant, Instant)>>;

/// The tests share the lease table: one at a time, each on an empty table.
static TABLE: Mutex<()> = Mutex::new(());

fn fresh(url: &str) -> MutexGuard<'static, ()> {
    let g = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Client::connect(url, NoTls).unwrap();
    c.batch_execute("DROP TABLE IF EXISTS writebehind_leases")
        .unwrap();
    g
}

#[test]
fn a_partition_is_taken_only_when_free_expired_or_already_held() {
    let url = need!("WRITEBEHIND_PG_URL");
    let _t = fresh(&url);
    let ttl = Duration::from_millis(400);
    let a = PgLeases::connect(&url, "a", ttl).unwrap();
    let b = PgLeases::connect(&url, "b", ttl).unwrap();
    assert_eq!(
        a.acquire(&[0, 1, 2, 3]).unwrap().partitions,
        vec![0, 1, 2, 3]
    );
    assert_eq!(
        b.acquire(&[0, 1, 2, 3, 4, 5]).unwrap().partitions,
        vec![4, 5]
    );
    assert_eq!(a.renew().unwrap().partitions, vec![0, 1, 2, 3]);
    let fence_a = a.fences().unwrap();
    // A releases one at once; A stops renewing the rest (as if it crashed).
    a.release(&[3]).unwrap();
    assert_eq!(b.acquire(&[0, 3]).unwrap().partitions, vec![3, 4, 5]);
    // B renews its own meanwhile; A's run out.
    for _ in 0..5 {
        std::thread::sleep(ttl / 4);
        assert_eq!(b.renew().unwrap().partitions, vec![3, 4, 5]);
    }
    assert_eq!(
        b.acquire(&[0, 1, 2]).unwrap().partitions,
        vec![0, 1, 2, 3, 4, 5]
    );
    assert_eq!(
        a.renew().unwrap().partitions,
        Vec::<u32>::new(),
        "expired and taken"
    );
    // A partition that changed hands has a higher fence.
    let fence_b: HashMap<u32, u64> = b.fences().unwrap().into_iter().collect();
    for (p, f) in fence_a {
        assert!(fence_b[&p] > f, "partition {p}");
    }
}

#[test]
fn bad_settings_are_refused() {
    let url = need!("WRITEBEHIND_PG_URL");
    assert!(PgLeases::connect(&url, "", Duration::from_secs(1)).is_err());
    assert!(PgLeases::connect(&url, "a", Duration::from_millis(10)).is_err());
}

#[test]
fn no_two_holders_trust_one_partition_at_once() {
    let url = need!("WRITEBEHIND_PG_URL");
    let _t = fresh(&url);
    let ttl = Duration::from_millis(200);
    // (holder, from, until) for each partition: the time a holder trusted its lease.
    let held: Arc<Mutex<Spans>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(3);
    let holders: Vec<_> = (0..4)
        .map(|h| {
            let (url, held) = (url.clone(), held.clone());
            std::thread::spawn(move || {
                let leases = PgLeases::connect(&url, &format!("holder-{h}"), ttl).unwrap();
                let mut round = 0u64;
                while Instant::now() < stop_at {
                    round += 1;
                    let got = leases.acquire(&[0, 1, 2]).unwrap();
                    let from = Instant::now();
                    {
                        let mut spans = held.lock().unwrap();
                        for p in &got.partitions {
                            spans
                                .entry(*p)
                                .or_default()
                                .push((h, from, got.valid_until));
                        }
                    }
                    // Some holders give leases back, some let them run out.
                    if (round + h as u64) % 7 == 0 {
                        // A holder stops trusting a lease before it gives it back.
                        let now = Instant::now();
                        {
                            let mut spans = held.lock().unwrap();
                            for p in &got.partitions {
                                for span in spans.get_mut(p).into_iter().flatten() {
                                    if span.0 == h {
                                        span.2 = span.2.min(now);
                                    }
                                }
                            }
                        }
                        leases.release(&got.partitions).unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(if h % 2 == 0 { 20 } else { 130 }));
                }
            })
        })
        .collect();
    for h in holders {
        h.join().unwrap();
    }
    let held = held.lock().unwrap();
    let mut changes = 0;
    for (p, spans) in held.iter() {
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                if a.0 != b.0 {
                    changes += 1;
                    let overlap = a.1.max(b.1) < a.2.min(b.2);
                    assert!(
                        !overlap,
                        "partition {p}: holders {} and {} at once: {:?} and {:?}",
                        a.0,
                        b.0,
                        (a.1.elapsed(), a.2.elapsed()),
                        (b.1.elapsed(), b.2.elapsed())
                    );
                }
            }
        }
    }
    assert!(
        changes > 0,
        "the partitions must change hands for the test to say anything"
    );
}
