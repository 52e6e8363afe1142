//! Criterion benches: writebehind against its peers, workload by workload.
//!
//! Every group holds all contenders, so ratios come from one run:
//! `writebehind`, `dashmap` (the raw map: the ceiling), `quick_cache` (sync), `moka` (sync),
//! `hand-rolled` (dashmap + a bounded crossbeam channel to one writer thread that calls the
//! store once per record) and `wb-cache` (async, driven from a tokio runtime with one worker
//! per benchmark thread).
//!
//! Run a subset with a filter, e.g. `cargo bench --bench peers -- 'put_zipf/8B/2t'`.
//! The full matrix takes a while; `benches/ratio.rs` is the quick headline report.

// wb-cache's futures are deep.
#![recursion_limit = "512"]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYSPACE: u64 = 1 << 17;
const SEED: u64 = 0x5EED_0007;

fn group<V: Val>(c: &mut Criterion, name: &str, w: Workload, threads: usize) {
    let label = format!("{name}/{}B/{threads}t", V::BYTES);
    let mut g = c.benchmark_group(&label);
    g.throughput(Throughput::Elements(threads as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    let plan = Arc::new(Plan::new(w, threads, SEED));
    let miss_store: Option<SharedStore<V>> =
        (w.mix == Mix::GetMiss).then(|| miss_store::<V>(MISS_KEYS));
    for kind in Kind::ALL {
        // Dropped before the next contender runs: no instance lives beside another's runs.
        let mut runner = Runner::new(kind, miss_store.clone(), false);
        let mut run_id = 0u64;
        g.bench_function(BenchmarkId::from_parameter(kind.name()), |b| {
            b.iter_custom(|iters| {
                run_id += 1;
                runner.timed_run(&plan, threads, iters, run_id)
            })
        });
        drop(runner);
    }
    g.finish();
}

fn workloads(c: &mut Criterion) {
    let on = |mix, dist| Workload {
        mix,
        dist,
        keyspace: KEYSPACE,
    };
    for threads in [1, 2] {
        group::<u64>(c, "get_hit", on(Mix::GetHit, Dist::Uniform), threads);
        group::<V256>(c, "get_hit", on(Mix::GetHit, Dist::Uniform), threads);
        group::<u64>(c, "get_hot1", on(Mix::GetHit, Dist::Hot(1)), threads);
        group::<u64>(c, "get_zipf", on(Mix::GetHit, Dist::Zipf), threads);
        group::<u64>(c, "get_miss", on(Mix::GetMiss, Dist::Uniform), threads);
        group::<u64>(c, "put_uniform", on(Mix::Put, Dist::Uniform), threads);
        group::<V256>(c, "put_uniform", on(Mix::Put, Dist::Uniform), threads);
        group::<u64>(c, "put_zipf", on(Mix::Put, Dist::Zipf), threads);
        group::<V256>(c, "put_zipf", on(Mix::Put, Dist::Zipf), threads);
        group::<u64>(c, "put_distinct", on(Mix::Put, Dist::Distinct), threads);
        let m90 = Mix::Mixed { read_percent: 90 };
        let m50 = Mix::Mixed { read_percent: 50 };
        group::<u64>(c, "mixed_90_10", on(m90, Dist::Zipf), threads);
        group::<u64>(c, "mixed_50_50", on(m50, Dist::Zipf), threads);
    }
}

criterion_group!(benches, workloads);
criterion_main!(benches);
