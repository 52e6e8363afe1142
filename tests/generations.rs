//! Fenced versions: a cache built later outranks every cache built before it over the same
//! store, whatever the hosts' clocks say (`Store::generation`, `writebehind::version`).

use std::sync::Arc;
use std::time::Duration;

use writebehind::{version, BatchError, Cache, Clock, MemoryStore, Store, StoreError, Write};

/// A clock whose wall time is `behind` the system's (a host with a skewed clock).
struct Skewed {
    behind: Duration,
}

impl Clock for Skewed {
    fn now(&self) -> Duration {
        // Monotonic time is not what is skewed here.
        writebehind::SystemClock::default().now()
    }
    fn since_unix_epoch(&self) -> Duration {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            - self.behind
    }
}

/// A store that hands out no generation (versions start at the wall clock).
struct WallClockOnly(Arc<MemoryStore<u64, String>>);

impl Store<u64, String> for WallClockOnly {
    fn load(&self, key: &u64) -> Result<Option<String>, StoreError> {
        self.0.load(key)
    }
    fn write_all(&self, batch: &[Write<u64, String>]) -> Result<(), BatchError> {
        self.0.write_all(batch)
    }
}

/// Instance A (a right clock) writes key 1 and holds it unflushed; instance B, built later
/// on a host whose clock is an hour behind, writes key 1 and flushes; then A's late batch
/// arrives. Returns A, for what it says of its write, and what A's flush returned.
fn late_batch_of_an_older_instance(
    store: impl Store<u64, String> + Clone,
) -> (Cache<u64, String>, Result<(), writebehind::Error>) {
    let a = Cache::builder(store.clone())
        .write_delay(Duration::from_secs(3600))
        .build()
        .unwrap();
    a.put(1, "from A".to_string()).unwrap();
    let b = Cache::builder(store)
        .clock(Arc::new(Skewed {
            behind: Duration::from_secs(3600),
        }))
        .build()
        .unwrap();
    b.put(1, "from B".to_string()).unwrap();
    b.flush().unwrap();
    let flushed = a.flush();
    assert!(b.close(Duration::from_secs(5)).is_clean());
    (a, flushed)
}

#[test]
fn the_instance_built_later_wins_despite_its_clock() {
    let store = Arc::new(MemoryStore::new());
    let (a, flushed) = late_batch_of_an_older_instance(store.clone());
    assert_eq!(store.get(&1).as_deref(), Some("from B"));
    // A's flush says one of its writes did not make it.
    assert!(
        matches!(flushed, Err(writebehind::Error::Store(_))),
        "{flushed:?}"
    );
    assert_eq!(store.stale_ignored(), 1, "A's late write was the stale one");
    // A says so: counted, handed to the failed-writes sink with its cause, and its copy of
    // the key left memory, so A reads the store's newer value.
    assert_eq!(a.metrics().superseded, 1);
    let failed = a.failed_writes();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].write.value().map(String::as_str), Some("from A"));
    assert!(
        failed[0].error.to_string().contains("superseded"),
        "{}",
        failed[0].error
    );
    assert_eq!(a.get(&1).unwrap().as_deref(), Some("from B"));
    assert!(a.close(Duration::from_secs(5)).is_clean());
}

#[test]
fn a_superseded_write_through_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let a = Cache::builder(store.clone()).build().unwrap();
    a.put(1, "a1".to_string()).unwrap();
    a.flush().unwrap();
    let b = Cache::builder(store.clone()).build().unwrap();
    b.put(1, "b1".to_string()).unwrap();
    b.flush().unwrap();
    a.set_write_mode(writebehind::WriteMode::Through).unwrap();
    let r = a.put(1, "a2".to_string());
    assert!(matches!(r, Err(writebehind::Error::Store(_))), "{r:?}");
    assert_eq!(a.metrics().superseded, 1);
    assert_eq!(store.get(&1).as_deref(), Some("b1"));
    assert_eq!(
        a.get(&1).unwrap().as_deref(),
        Some("b1"),
        "A's old copy left memory"
    );
}

#[test]
fn without_generations_the_skewed_clock_loses_the_newer_write() {
    // The failure fencing removes: versions from wall clocks, B's an hour behind A's.
    let memory = Arc::new(MemoryStore::new());
    let (a, flushed) = late_batch_of_an_older_instance(Arc::new(WallClockOnly(memory.clone())));
    assert_eq!(memory.get(&1).as_deref(), Some("from A"));
    flushed.unwrap();
    assert!(a.close(Duration::from_secs(5)).is_clean());
}

#[test]
fn a_restarted_cache_writes_above_its_predecessor_even_if_the_clock_went_back() {
    let store = Arc::new(MemoryStore::new());
    let first = Cache::builder(store.clone()).build().unwrap();
    let v1 = first.put(1, "one".to_string()).unwrap();
    assert!(first.close(Duration::from_secs(5)).is_clean());
    let second = Cache::builder(store.clone())
        .clock(Arc::new(Skewed {
            behind: Duration::from_secs(86_400),
        }))
        .build()
        .unwrap();
    let v2 = second.put(1, "two".to_string()).unwrap();
    assert!(v2 > v1);
    assert_eq!(
        version::generation_of(v2),
        version::generation_of(v1).map(|g| g + 1)
    );
    second.flush().unwrap();
    assert_eq!(store.get(&1).as_deref(), Some("two"));
}

#[test]
fn a_store_that_cannot_hand_out_a_generation_fails_the_build() {
    struct Broken;
    impl Store<u64, u64> for Broken {
        fn load(&self, _: &u64) -> Result<Option<u64>, StoreError> {
            Ok(None)
        }
        fn write_all(&self, _: &[Write<u64, u64>]) -> Result<(), BatchError> {
            Ok(())
        }
        fn generation(&self) -> Result<Option<u64>, StoreError> {
            Err(StoreError::unavailable("the database is down"))
        }
    }
    struct TooLarge;
    impl Store<u64, u64> for TooLarge {
        fn load(&self, _: &u64) -> Result<Option<u64>, StoreError> {
            Ok(None)
        }
        fn write_all(&self, _: &[Write<u64, u64>]) -> Result<(), BatchError> {
            Ok(())
        }
        fn generation(&self) -> Result<Option<u64>, StoreError> {
            Ok(Some(version::MAX_GENERATION + 1))
        }
    }
    assert!(matches!(
        Cache::builder(Broken).build(),
        Err(writebehind::Error::Store(_))
    ));
    assert!(matches!(
        Cache::builder(TooLarge).build(),
        Err(writebehind::Error::InvalidConfig { .. })
    ));
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_hands_out_growing_generations_per_table() {
    use writebehind::stores::{Raw, SqliteStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen.db");
    let open = |table: &str| SqliteStore::<u64, String>::builder(&path, table, Raw, Raw).open();
    let a = open("profiles").unwrap();
    assert_eq!(a.generation().unwrap(), Some(1));
    assert_eq!(a.generation().unwrap(), Some(2));
    drop(a);
    // Durable: a new connection to the same file continues; another table starts at 1.
    assert_eq!(open("profiles").unwrap().generation().unwrap(), Some(3));
    assert_eq!(open("carts").unwrap().generation().unwrap(), Some(1));
    let cache = Cache::builder(open("profiles").unwrap()).build().unwrap();
    let v = cache.put(1, "x".to_string()).unwrap();
    assert_eq!(version::generation_of(v), Some(4));
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_reports_superseded_writes_and_not_redeliveries() {
    use writebehind::stores::SqliteStore;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::<u64, String>::open(dir.path().join("s.db"), "kv").unwrap();
    let put = |k: u64, v: &str, version: u64| Write::Put {
        key: k,
        value: v.to_string(),
        version,
    };
    let applied = store
        .write_all_checked(&[put(1, "new", 10), put(2, "two", 10)])
        .unwrap();
    assert!(applied.superseded.is_empty());
    // Key 1 older (superseded), key 2 the same version again (a redelivery), key 3 new, and
    // a delete older than key 2's put.
    let applied = store
        .write_all_checked(&[
            put(1, "old", 5),
            put(2, "two", 10),
            put(3, "three", 1),
            Write::Delete { key: 2, version: 9 },
        ])
        .unwrap();
    assert_eq!(applied.superseded, vec![0, 3]);
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("new"));
    assert_eq!(store.load(&2).unwrap().as_deref(), Some("two"));
}
