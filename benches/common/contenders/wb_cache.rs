//! wb-cache, the published write-behind crate: async, driven from a tokio runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use writebehind::{BatchError, Store, Write};

use super::PEER_CAPACITY;
use crate::common::contender::{span, Contender, SharedStore};
use crate::common::value::Val;
use crate::common::workload::{key_of, Mix, Plan, PLAN_LEN};

/// The data controller wb-cache needs: the record carries its key (wb-cache derives the
/// primary key from the value), loads and batched write-backs go to the same in-memory store.
pub struct WbcController<V: Val> {
    store: SharedStore<V>,
    version: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Rec<V>(pub u64, pub V);

#[async_trait::async_trait]
impl<V: Val> wb_cache::DataController for WbcController<V> {
    type Key = u64;
    type Value = Rec<V>;
    type CacheUpdate = V;
    type Error = String;

    async fn get_for_key(&self, key: &u64) -> Result<Option<Rec<V>>, String> {
        Ok(self
            .store
            .load(key)
            .map_err(|e| e.to_string())?
            .map(|v| Rec(*key, v)))
    }

    async fn write_back(
        &self,
        updates: Arc<wb_cache::update_iterator::UpdateIterator<Self>>,
    ) -> Result<(), String> {
        let mut batch = Vec::with_capacity(updates.len());
        while let Some(item) = updates.next() {
            let version = self.version.fetch_add(1, Ordering::Relaxed);
            batch.push(Write::Put {
                key: *item.key(),
                value: item.update().clone(),
                version,
            });
        }
        self.store
            .write_all(&batch)
            .map_err(|e: BatchError| e.to_string())?;
        updates.confirm_all();
        Ok(())
    }

    async fn on_new(
        &self,
        _key: &u64,
        value: &Rec<V>,
    ) -> Result<wb_cache::types::DataControllerResponse<Self>, String> {
        Ok(wb_cache::types::DataControllerResponse {
            op: wb_cache::types::DataControllerOp::Insert,
            update: Some(value.1.clone()),
        })
    }

    async fn on_delete(
        &self,
        _key: &u64,
        _update: Option<&V>,
    ) -> Result<wb_cache::types::DataControllerResponse<Self>, String> {
        Ok(wb_cache::types::DataControllerResponse {
            op: wb_cache::types::DataControllerOp::Revoke,
            update: None,
        })
    }

    async fn on_change(
        &self,
        _key: &u64,
        value: &Rec<V>,
        _old: Rec<V>,
        _prev: Option<V>,
    ) -> Result<wb_cache::types::DataControllerResponse<Self>, String> {
        Ok(wb_cache::types::DataControllerResponse {
            op: wb_cache::types::DataControllerOp::Insert,
            update: Some(value.1.clone()),
        })
    }

    fn primary_key_of(&self, value: &Rec<V>) -> u64 {
        value.0
    }
}

/// wb-cache on a multi-threaded tokio runtime with as many workers as benchmark threads;
/// each benchmark "thread" is a task looping over its operations.
pub struct WbCache<V: Val> {
    rt: tokio::runtime::Runtime,
    cache: Arc<wb_cache::Cache<WbcController<V>>>,
}

impl<V: Val> WbCache<V> {
    pub fn new(store: SharedStore<V>, workers: usize) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dc = WbcController {
            store,
            version: AtomicU64::new(1),
        };
        let cache = rt.block_on(async {
            wb_cache::Cache::builder()
                .data_controller(dc)
                .max_updates(1000)
                .max_capacity(PEER_CAPACITY as u64)
                .flush_interval(Duration::from_secs(1))
                .build()
                .expect("wb-cache builds")
        });
        WbCache { rt, cache }
    }
}

impl<V: Val> Drop for WbCache<V> {
    fn drop(&mut self) {
        let c = self.cache.clone();
        let _ = self.rt.block_on(async move { c.close().await });
    }
}

impl<V: Val> Contender<V> for WbCache<V> {
    fn name(&self) -> &'static str {
        "wb-cache"
    }
    fn prefill(&self, n: u64) {
        let c = self.cache.clone();
        self.rt.block_on(async move {
            for k in 0..n {
                c.insert(Rec(k, V::make(k))).await.expect("wb-cache insert");
            }
            c.flush().await.expect("wb-cache flush");
        });
    }
    fn run(&self, plan: &Arc<Plan>, threads: usize, ops: u64, run_id: u64) -> Duration {
        let barrier = Arc::new(tokio::sync::Barrier::new(threads));
        let tasks: Vec<_> = (0..threads)
            .map(|t| {
                let c = self.cache.clone();
                let plan = plan.clone();
                let barrier = barrier.clone();
                self.rt.spawn(async move {
                    barrier.wait().await;
                    let start = Instant::now();
                    let mut sink = 0u64;
                    for i in 0..ops {
                        let k = key_of(&plan, t, i, run_id, ops);
                        if plan.writes[t][(i as usize) & (PLAN_LEN - 1)] {
                            c.insert(Rec(k, V::make(i))).await.expect("wb-cache insert");
                        } else {
                            let got = c.get(&k).await.expect("wb-cache get");
                            sink = sink.wrapping_add(got.is_some() as u64);
                        }
                    }
                    std::hint::black_box(sink);
                    (start, Instant::now())
                })
            })
            .collect();
        let c2 = self.cache.clone();
        let plan = plan.clone();
        let times = self.rt.block_on(async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("wb-cache task panicked"));
            }
            if plan.workload.mix != Mix::GetHit && plan.workload.mix != Mix::GetMiss {
                c2.flush().await.expect("wb-cache flush");
            }
            let end = Instant::now();
            out.push((end, end));
            out
        });
        span(times.into_iter())
    }
}
