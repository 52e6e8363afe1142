//! State-machine model test: random sequences of cache operations and store faults, checked
//! step by step against plain `HashMap` models (see `tests/harness/mod.rs` for the model and
//! the invariants). Hand-written over `proptest` (no extra dependency): a case is a vector of
//! ops, so proptest shrinks a failure to a short sequence.

mod harness;

use harness::{Harness, Op, KEYS};
use proptest::collection::vec;
use proptest::prelude::*;

fn key2() -> std::ops::Range<u64> {
    0..KEYS
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    prop_oneof![
        6 => (key.clone(), 0..100u64).prop_map(|(k, v)| Op::Put(k, v)),
        2 => key.clone().prop_map(Op::Remove),
        3 => key.prop_map(Op::Get),
        3 => (0..25u64).prop_map(Op::Step),
        2 => Just(Op::Flush),
        1 => (1..4usize).prop_map(Op::FailNext),
        1 => (1..3usize).prop_map(Op::PartialNext),
        1 => Just(Op::Down),
        2 => Just(Op::Heal),
        1 => Just(Op::CloseReopen),
        1 => (1..3usize).prop_map(Op::MalformedNext),
        1 => (1..4u32, 0..25u64).prop_map(|(n, ms)| Op::CloneBomb(n, ms)),
        1 => (key2(), 0..100u64).prop_map(|(k, v)| Op::ReadOnlyPut(k, v)),
        1 => (key2(), 0..100u64, 0..25u64).prop_map(|(k, v, ms)| Op::ReadOnlyDuringBatch(k, v, ms)),
        2 => (key2(), 1..5u64).prop_map(|(k, d)| Op::Update(k, d)),
        2 => key2().prop_map(Op::Compute),
        1 => (key2(), 0..100u64).prop_map(|(k, v)| Op::PutIfAbsent(k, v)),
        1 => key2().prop_map(Op::Invalidate),
        1 => Just(Op::InvalidateAll),
        1 => vec((key2(), 0..100u64), 1..5).prop_map(Op::PutAll),
    ]
}

fn initial_rows() -> impl Strategy<Value = Vec<(u64, u64)>> {
    vec((0..KEYS, 100..200u64), 0..4)
}

proptest! {
    // Default config: 256 cases, `PROPTEST_CASES=N` for a longer run.

    /// Read-your-writes after every op; store == model after every successful flush; close
    /// loses nothing; per-key versions received by the store never go down; a local write
    /// never reaches the store. The environment's faults include panicking clones, malformed
    /// store answers and mode switches around batches in flight.
    #[test]
    fn cache_matches_hashmap_model(initial in initial_rows(), ops in vec(op(), 1..80)) {
        let mut h = Harness::new(&initial);
        for op in &ops {
            h.apply(op);
        }
        h.finish();
    }

    /// The same with `flush_order`: a step with more dirty keys than one batch (3 here)
    /// sorts them, so batches mix shards and retries in another order; the invariants are
    /// the same.
    #[test]
    fn cache_matches_hashmap_model_with_flush_order(
        initial in initial_rows(),
        ops in vec(op(), 1..80),
    ) {
        let mut h = Harness::with_order(&initial, true);
        for op in &ops {
            h.apply(op);
        }
        h.finish();
    }
}

/// The scenario of the early-drain race, deterministically: a key written, a step that
/// drains it, a conflated write, and the flush that must carry it.
#[test]
fn write_between_steps_reaches_the_store() {
    let mut h = Harness::new(&[]);
    for op in [
        Op::Put(1, 1),
        Op::Step(20),
        Op::Put(1, 2),
        Op::Step(0),
        Op::Put(1, 3),
        Op::FailNext(1),
        Op::Step(20),
        Op::Put(1, 4),
        Op::Flush,
        Op::CloseReopen,
        Op::Get(1),
    ] {
        h.apply(&op);
    }
    h.finish();
}

/// A local write over a write still at the store: invalidating it must wait for the store
/// (the entry is in flight), or the count of dirty entries goes wrong.
#[test]
fn a_local_write_over_a_write_in_flight_stays_until_the_store_answers() {
    let mut h = Harness::new(&[]);
    for op in [
        Op::Down,
        Op::Remove(1),
        Op::ReadOnlyPut(1, 0),
        Op::InvalidateAll,
        Op::Invalidate(1),
        Op::Heal,
        Op::Flush,
        Op::InvalidateAll,
    ] {
        h.apply(&op);
    }
    h.finish();
}
