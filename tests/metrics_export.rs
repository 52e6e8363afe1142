//! The `metrics` feature publishes the snapshot through the `metrics` facade.
#![cfg(feature = "metrics")]

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use writebehind::{Cache, MemoryStore};

#[test]
fn export_publishes_counters_and_gauges() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let cache = Cache::builder(MemoryStore::<u64, u64>::new())
        .manual_flushing()
        .build()
        .unwrap();
    cache.put(1, 1).unwrap();
    cache.put(1, 2).unwrap();
    cache.put(2, 2).unwrap();
    cache.flush().unwrap();
    metrics::with_local_recorder(&recorder, || cache.metrics().export("wb"));
    let values: std::collections::HashMap<String, DebugValue> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, v)| (key.key().name().to_string(), v))
        .collect();
    assert!(matches!(values["wb_puts_total"], DebugValue::Counter(3)));
    assert!(matches!(
        values["wb_conflated_total"],
        DebugValue::Counter(1)
    ));
    assert!(matches!(
        values["wb_records_written_total"],
        DebugValue::Counter(2)
    ));
    match &values["wb_dirty"] {
        DebugValue::Gauge(g) => assert_eq!(g.into_inner(), 0.0),
        other => panic!("{other:?}"),
    }
    match &values["wb_healthy"] {
        DebugValue::Gauge(g) => assert_eq!(g.into_inner(), 1.0),
        other => panic!("{other:?}"),
    }
}
