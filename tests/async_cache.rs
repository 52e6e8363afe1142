//! `AsyncCache` (feature `tokio`): a miss or a waiting write never stalls the runtime thread,
//! no increment is lost across tasks, a cancelled call loses nothing it started, single
//! flight holds across tasks, and a panic in a closure reaches the awaiting task.
#![cfg(feature = "tokio")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use writebehind::testing::{assert_versions_grow, eventually, FaultyStore};
use writebehind::{AsyncCache, BatchError, Cache, Error, Store, StoreError, Write, WriteMode};

/// Long enough that a test waiting on it has certainly failed; never reached when it passes.
const STUCK: Duration = Duration::from_secs(10);

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        .build()
        .expect("a runtime")
}

/// A store whose `load` of key [`GATED`] waits until the test opens the gate (or [`STUCK`]
/// passes), and tells the test when it has started.
struct GatedStore {
    data: Mutex<std::collections::HashMap<u64, u64>>,
    started: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    gate: Mutex<mpsc::Receiver<()>>,
    loads: AtomicUsize,
}

const GATED: u64 = 2;

impl GatedStore {
    /// The store, the receiver told when the gated load starts, and the gate's key.
    fn new() -> (
        Arc<Self>,
        tokio::sync::oneshot::Receiver<()>,
        mpsc::Sender<()>,
    ) {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (open, gate) = mpsc::channel();
        let store = Arc::new(GatedStore {
            data: Mutex::new([(GATED, 20)].into_iter().collect()),
            started: Mutex::new(Some(started_tx)),
            gate: Mutex::new(gate),
            loads: AtomicUsize::new(0),
        });
        (store, started_rx, open)
    }
}

impl Store<u64, u64> for GatedStore {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if *key == GATED {
            if let Some(started) = self.started.lock().unwrap().take() {
                let _ = started.send(());
            }
            // Fails the test (the miss answers first) rather than hanging it, when the
            // runtime thread is the one waiting here.
            let _ = self.gate.lock().unwrap().recv_timeout(STUCK);
        }
        Ok(self.data.lock().unwrap().get(key).copied())
    }

    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        let mut data = self.data.lock().unwrap();
        for w in batch {
            match w {
                Write::Put { key, value, .. } => {
                    data.insert(*key, *value);
                }
                Write::Delete { key, .. } => {
                    data.remove(key);
                }
            }
        }
        Ok(())
    }
}

/// On a current-thread runtime (one thread for every task), a miss whose load waits at the
/// gate does not hold that thread: other tasks' hits and write-behind puts all complete while
/// the load waits, and only then is the gate opened. Were the miss run on the task, the load
/// would hold the only thread, the hits could not run, and the miss would answer first.
#[test]
fn a_miss_never_holds_the_runtime_thread() {
    let (store, started, open) = GatedStore::new();
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone()).build().unwrap().into_async();
    let order = Arc::new(Mutex::new(Vec::new()));
    current_thread().block_on(async {
        cache.put(1, 10).await.unwrap();
        let miss = tokio::spawn({
            let (cache, order) = (cache.clone(), order.clone());
            async move {
                let v = cache.get(&GATED).await.unwrap();
                order.lock().unwrap().push("miss");
                v
            }
        });
        started.await.expect("the load started");
        let hits: Vec<_> = (0..8u64)
            .map(|t| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        assert_eq!(cache.get(&1).await.unwrap(), Some(10));
                        cache.put(100 + t, i).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for h in hits {
            h.await.unwrap();
        }
        order.lock().unwrap().push("hits");
        open.send(()).unwrap();
        assert_eq!(miss.await.unwrap(), Some(20));
    });
    assert_eq!(*order.lock().unwrap(), ["hits", "miss"]);
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        1,
        "only the miss loaded"
    );
    assert_eq!(cache.get_if_present(&107), Some(99));
}

/// A put of a key whose `compute` is in flight (its load waits at the gate) must wait for it,
/// and so goes to the blocking pool: the runtime thread keeps serving hits meanwhile, and the
/// put lands after the compute's write.
#[test]
fn a_put_waiting_for_a_compute_does_not_hold_the_runtime_thread() {
    let (store, started, open) = GatedStore::new();
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone()).build().unwrap().into_async();
    current_thread().block_on(async {
        cache.put(1, 10).await.unwrap();
        let compute = tokio::spawn({
            let cache = cache.clone();
            async move { cache.compute(&GATED, |v| v.map(|v| v + 1)).await }
        });
        started.await.expect("the compute's load started");
        let put = tokio::spawn({
            let cache = cache.clone();
            async move { cache.put(GATED, 500).await }
        });
        // The put has had its first poll (it waits now); the hits still run.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            assert_eq!(cache.get(&1).await.unwrap(), Some(10));
        }
        assert!(!put.is_finished(), "the put waits for the compute's turn");
        open.send(()).unwrap();
        let computed = compute.await.unwrap().unwrap();
        assert_eq!(computed.value, Some(21));
        let version = put.await.unwrap().unwrap();
        assert!(version > computed.version.unwrap(), "the put lands after");
        assert_eq!(cache.get(&GATED).await.unwrap(), Some(500));
    });
}

/// 64 tasks on a multi-thread runtime add 1 to 4 counters with `compute` (and `update`) while
/// the store fails 20% of its batches: every counter ends at its number of increments, in
/// the cache and, after a flush, in the store.
#[test]
fn no_increment_is_lost_across_tasks() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 50;
    const KEYS: u64 = 4;
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    store.fail_with_probability(0.2, 7);
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone())
        .write_delay(Duration::from_millis(1))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(4))
        .build()
        .unwrap()
        .into_async();
    multi_thread(2).block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    for i in 0..PER_TASK {
                        let key = (t + i) % KEYS;
                        if i % 5 == 4 {
                            // `update` needs a value: the key has one after its first compute.
                            let added = cache.update(&key, |n| *n += 1).await.unwrap();
                            if added.is_none() {
                                cache
                                    .compute(&key, |n| Some(n.copied().unwrap_or(0) + 1))
                                    .await
                                    .unwrap();
                            }
                        } else {
                            cache
                                .compute(&key, |n| Some(n.copied().unwrap_or(0) + 1))
                                .await
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let per_key = TASKS * PER_TASK / KEYS;
        for k in 0..KEYS {
            assert_eq!(
                cache.get(&k).await.unwrap(),
                Some(per_key),
                "key {k} in the cache"
            );
        }
        cache.flush().await.unwrap();
        for k in 0..KEYS {
            assert_eq!(
                store.memory().get(&k),
                Some(per_key),
                "key {k} in the store"
            );
        }
    });
    assert_versions_grow(&store);
    assert!(
        store
            .calls()
            .iter()
            .any(|c| c.outcome == writebehind::testing::Outcome::Unavailable),
        "the store failed some batches"
    );
}

/// Write-through puts whose futures are dropped while the store holds them (a timeout) are
/// still made once the store lets them through: each key ends with its value in the store
/// and the same value in the cache, never one without the other.
#[test]
fn cancelled_write_through_puts_are_still_made() {
    const KEYS: u64 = 16;
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone())
        .write_mode(WriteMode::Through)
        .build()
        .unwrap()
        .into_async();
    store.hold();
    multi_thread(2).block_on(async {
        for k in 0..KEYS {
            let put = tokio::time::timeout(Duration::from_millis(1), cache.put(k, k * 10));
            assert!(put.await.is_err(), "the store holds the put: it times out");
        }
        // Every put is on the blocking pool, none at the store yet.
        assert!(store.wait_until_held(STUCK));
        for k in 0..KEYS {
            assert_eq!(store.memory().get(&k), None);
            assert_eq!(
                cache.get_if_present(&k),
                None,
                "not cached before the store has it"
            );
        }
        store.release();
        assert!(eventually(STUCK, || {
            (0..KEYS).all(|k| store.memory().get(&k) == Some(k * 10))
        }));
        for k in 0..KEYS {
            // The store took the write: the cache holds it too, as a clean entry.
            assert!(eventually(STUCK, || cache.get_if_present(&k) == Some(k * 10)));
        }
    });
    assert_eq!(cache.metrics().dirty, 0);
    assert_versions_grow(&store);
}

/// A `compute` dropped (by `select!`) while its closure runs still writes its result: after
/// a flush, the counter holds every increment, cancelled ones included.
#[test]
fn a_cancelled_compute_still_writes_its_result() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone())
        .write_delay(Duration::from_millis(1))
        .build()
        .unwrap()
        .into_async();
    let ran = Arc::new(AtomicUsize::new(0));
    multi_thread(2).block_on(async {
        for _ in 0..10 {
            let (entered_tx, entered) = tokio::sync::oneshot::channel();
            let (open, gate) = mpsc::channel::<()>();
            let ran = ran.clone();
            let compute = cache.compute(&1, move |n| {
                let _ = entered_tx.send(());
                let _ = gate.recv_timeout(STUCK);
                ran.fetch_add(1, Ordering::SeqCst);
                Some(n.copied().unwrap_or(0) + 1)
            });
            tokio::select! {
                _ = compute => panic!("the closure waits at its gate"),
                _ = entered => {}
            }
            // The compute's future is dropped; its closure is still at the gate.
            open.send(()).unwrap();
        }
        assert!(eventually(STUCK, || ran.load(Ordering::SeqCst) == 10));
        // The next compute waits for the last cancelled one's turn.
        let c = cache.compute(&1, |n| n.copied()).await.unwrap();
        assert_eq!(c.value, Some(10));
        cache.flush().await.unwrap();
    });
    assert_eq!(store.memory().get(&1), Some(10));
}

/// Tasks that all ask `get_with` for one absent key run `init` once, and all get its value.
#[test]
fn get_with_runs_init_once_across_tasks() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone()).build().unwrap().into_async();
    let inits = Arc::new(AtomicUsize::new(0));
    let (open, gate) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let values = multi_thread(2).block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, inits, gate) = (cache.clone(), inits.clone(), gate.clone());
                tokio::spawn(async move {
                    cache
                        .get_with(7, move || {
                            inits.fetch_add(1, Ordering::SeqCst);
                            let _ = gate.lock().unwrap().recv_timeout(STUCK);
                            70
                        })
                        .await
                })
            })
            .collect();
        // The first init waits at the gate while the other tasks arrive.
        assert!(eventually(STUCK, || inits.load(Ordering::SeqCst) == 1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        open.send(()).unwrap();
        let mut values = Vec::new();
        for t in tasks {
            values.push(t.await.unwrap().unwrap());
        }
        values
    });
    assert_eq!(inits.load(Ordering::SeqCst), 1, "init ran once");
    assert!(values.iter().all(|&v| v == 70));
    assert_eq!(cache.get_if_present(&7), Some(70));
}

/// Tasks that miss one key together make one store load.
#[test]
fn concurrent_misses_load_once() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    store.memory().insert(3, 30);
    store.set_latency(Duration::from_millis(50));
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone()).build().unwrap().into_async();
    multi_thread(2).block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&3).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Some(30));
        }
    });
    assert_eq!(
        store.load_calls(),
        1,
        "the later tasks hit what the first load cached"
    );
}

/// A panic in a `compute` closure on the blocking pool reaches the awaiting task as that
/// panic; nothing is written and the key is free for the next call.
#[test]
fn a_panic_in_a_closure_reaches_the_awaiting_task() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone()).build().unwrap().into_async();
    multi_thread(2).block_on(async {
        cache.put(1, 1).await.unwrap();
        let failed = tokio::spawn({
            let cache = cache.clone();
            async move { cache.compute(&1, |_| panic!("closure failed")).await }
        })
        .await
        .expect_err("the task panicked");
        let panic = failed.into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"closure failed"));
        assert_eq!(cache.get(&1).await.unwrap(), Some(1), "nothing written");
        let c = cache.compute(&1, |n| n.map(|n| n + 1)).await.unwrap();
        assert_eq!(c.value, Some(2), "the key is free again");
    });
}

/// Errors come back as the synchronous cache's: an `init` error through `try_get_with`, a
/// write after `close`, and a write-through the store refused.
#[test]
fn errors_are_the_caches() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone()).build().unwrap().into_async();
    current_thread().block_on(async {
        #[derive(Debug)]
        enum AppError {
            NotFound,
            Cache(Error),
        }
        impl From<Error> for AppError {
            fn from(e: Error) -> Self {
                AppError::Cache(e)
            }
        }
        let miss = cache.try_get_with(5, || Err(AppError::NotFound)).await;
        assert!(matches!(miss, Err(AppError::NotFound)));
        assert_eq!(cache.get_if_present(&5), None);
        assert_eq!(
            cache
                .try_get_with(5, || Ok::<_, AppError>(50))
                .await
                .unwrap(),
            50
        );

        cache.cache().set_write_mode(WriteMode::Through).unwrap();
        assert_eq!(cache.write_mode(), WriteMode::Through);
        store.fail_next(1);
        assert!(matches!(cache.put(6, 60).await, Err(Error::Store(_))));
        assert_eq!(
            cache.get(&6).await.unwrap(),
            None,
            "the refused write is not cached"
        );
        cache.put(6, 61).await.unwrap();
        assert_eq!(store.memory().get(&6), Some(61), "written through");

        let report = cache.close(Duration::from_secs(5)).await;
        assert!(report.is_clean());
        assert!(matches!(cache.put(7, 70).await, Err(Error::Closed)));
        assert!(matches!(cache.remove(&7).await, Err(Error::Closed)));
        let miss = cache.try_get_with(8, || Ok::<_, AppError>(80)).await;
        assert!(matches!(miss, Err(AppError::Cache(Error::Closed))));
    });
}

/// The rest of the API, on a write-behind cache: `get_all`, `put_if_absent`, `remove`,
/// `flush_key`, `wait_durable`, `invalidate`, `invalidate_all`, `close` with its report.
#[test]
fn the_rest_of_the_api() {
    let store = Arc::new(FaultyStore::<u64, u64>::new());
    store.memory().insert(9, 90);
    let cache: AsyncCache<u64, u64> = Cache::builder(store.clone())
        .write_delay(Duration::from_secs(60))
        .build()
        .unwrap()
        .into_async();
    current_thread().block_on(async {
        cache.put(1, 10).await.unwrap();
        assert_eq!(
            cache.get_all(&[1, 9, 4]).await.unwrap(),
            [Some(10), Some(90), None]
        );
        assert_eq!(cache.get_all(&[1, 9]).await.unwrap(), [Some(10), Some(90)]);
        assert_eq!(cache.put_if_absent(1, 11).await.unwrap(), Some(10));
        assert_eq!(cache.put_if_absent(2, 20).await.unwrap(), None);
        assert!(cache.remove(&9).await.unwrap() > 0);
        assert_eq!(cache.get(&9).await.unwrap(), None);

        cache.flush_key(&1).await.unwrap();
        assert_eq!(store.memory().get(&1), Some(10));
        let v = cache.put(3, 30).await.unwrap();
        cache.flush_key(&3).await.unwrap();
        cache
            .wait_durable(&3, v, Duration::from_secs(5))
            .await
            .unwrap();

        assert!(cache.invalidate(&2).await.unwrap(), "written, then dropped");
        assert_eq!(store.memory().get(&2), Some(20));
        assert_eq!(cache.get_if_present(&2), None);
        assert_eq!(cache.get(&2).await.unwrap(), Some(20), "read through again");
        assert!(cache.invalidate_all().await.unwrap() >= 1);
        assert_eq!(store.memory().get(&9), None, "the delete reached the store");

        cache.put(4, 40).await.unwrap();
        store.set_down(true);
        let report = cache.close(Duration::from_millis(50)).await;
        assert_eq!(report.unwritten.len(), 1, "the store is down: handed back");
        assert!(cache.metrics().puts >= 4);
    });
}

/// A store that reports the thread it is dropped on.
struct DropReporter {
    inner: Arc<FaultyStore<u64, u64>>,
    dropped_on: mpsc::Sender<std::thread::ThreadId>,
}

impl Store<u64, u64> for DropReporter {
    fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
        self.inner.load(key)
    }

    fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
        self.inner.write_all(batch)
    }
}

impl Drop for DropReporter {
    fn drop(&mut self) {
        let _ = self.dropped_on.send(std::thread::current().id());
    }
}

/// The last `AsyncCache` dropped on a runtime thread lets go of the cache on the blocking
/// pool: the cache's close (which writes the pending write) and the store's `Drop` run there,
/// not on the thread that drives the tasks.
#[test]
fn the_last_drop_inside_a_runtime_closes_on_the_blocking_pool() {
    let faulty = Arc::new(FaultyStore::new());
    let (dropped_on, dropped) = mpsc::channel();
    let store = DropReporter {
        inner: faulty.clone(),
        dropped_on,
    };
    // A current-thread runtime drives its tasks on the thread that calls `block_on`.
    let runtime_thread = std::thread::current().id();
    current_thread().block_on(async move {
        let cache: AsyncCache<u64, u64> = Cache::builder(store)
            .write_delay(Duration::from_secs(60))
            .build()
            .unwrap()
            .into_async();
        let copy = cache.clone();
        copy.put(1, 10).await.unwrap();
        drop(copy);
        assert!(!cache.cache().is_closed(), "a clone's drop closes nothing");
        drop(cache);
    });
    let on = dropped.recv_timeout(STUCK).expect("the store was dropped");
    assert_ne!(
        on, runtime_thread,
        "not on the thread that drives the tasks"
    );
    assert_eq!(
        faulty.memory().get(&1),
        Some(10),
        "the close wrote the pending write"
    );
}
