//! Decodes an arbitrary sequence of cache operations and store faults and runs it through the
//! same reference model and invariants as `tests/model.rs` (the harness is shared by path).
//! All its ops but `CloneBomb`: libFuzzer's panic hook aborts on any panic, caught or not, so
//! panicking user code is the proptest model's to exercise.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/harness/mod.rs"]
mod harness;

use harness::{Harness, Op, KEYS};

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Put(u8, u8),
    Remove(u8),
    Get(u8),
    Step(u8),
    Flush,
    FailNext(u8),
    PartialNext(u8),
    Down,
    Heal,
    CloseReopen,
    MalformedNext(u8),
    ReadOnlyPut(u8, u8),
    ReadOnlyDuringBatch(u8, u8, u8),
    Update(u8, u8),
    Compute(u8),
    PutIfAbsent(u8, u8),
    Invalidate(u8),
    InvalidateAll,
    PutAll(Vec<(u8, u8)>),
}

impl FuzzOp {
    fn to_op(&self) -> Op {
        let k = |k: &u8| u64::from(*k) % KEYS;
        match self {
            FuzzOp::Put(key, v) => Op::Put(k(key), u64::from(*v)),
            FuzzOp::Remove(key) => Op::Remove(k(key)),
            FuzzOp::Get(key) => Op::Get(k(key)),
            FuzzOp::Step(ms) => Op::Step(u64::from(*ms % 32)),
            FuzzOp::Flush => Op::Flush,
            FuzzOp::FailNext(n) => Op::FailNext(usize::from(*n % 4) + 1),
            FuzzOp::PartialNext(n) => Op::PartialNext(usize::from(*n % 3) + 1),
            FuzzOp::Down => Op::Down,
            FuzzOp::Heal => Op::Heal,
            FuzzOp::CloseReopen => Op::CloseReopen,
            FuzzOp::MalformedNext(n) => Op::MalformedNext(usize::from(*n % 2) + 1),
            FuzzOp::ReadOnlyPut(key, v) => Op::ReadOnlyPut(k(key), u64::from(*v)),
            FuzzOp::ReadOnlyDuringBatch(key, v, ms) => {
                Op::ReadOnlyDuringBatch(k(key), u64::from(*v), u64::from(*ms % 32))
            }
            FuzzOp::Update(key, d) => Op::Update(k(key), u64::from(*d % 8) + 1),
            FuzzOp::Compute(key) => Op::Compute(k(key)),
            FuzzOp::PutIfAbsent(key, v) => Op::PutIfAbsent(k(key), u64::from(*v)),
            FuzzOp::Invalidate(key) => Op::Invalidate(k(key)),
            FuzzOp::InvalidateAll => Op::InvalidateAll,
            FuzzOp::PutAll(items) => Op::PutAll(
                items
                    .iter()
                    .take(4)
                    .map(|(key, v)| (k(key), u64::from(*v)))
                    .collect(),
            ),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    initial: Vec<(u8, u8)>,
    ops: Vec<FuzzOp>,
}

fuzz_target!(|input: Input| {
    let initial: Vec<(u64, u64)> = input
        .initial
        .iter()
        .take(4)
        .map(|&(k, v)| (u64::from(k) % KEYS, 100 + u64::from(v)))
        .collect();
    let mut h = Harness::new(&initial);
    for op in input.ops.iter().take(200) {
        h.apply(&op.to_op());
    }
    h.finish();
});
