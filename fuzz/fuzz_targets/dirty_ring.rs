//! Drives a `DirtyRing` with an arbitrary sequence of push / pop / drain against a `VecDeque`
//! model: FIFO order, a push fails exactly when `capacity` keys are in the ring and gives its
//! key back, `len` is exact when single-threaded, and (under the sanitizer cargo-fuzz builds
//! with) every boxed key is dropped exactly once, also when the ring is dropped non-empty.
#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use writebehind::__verify::DirtyRing;

#[derive(Arbitrary, Debug)]
enum RingOp {
    Push(u32),
    Pop,
    Drain { wait_for_claimed: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    capacity: u8,
    ops: Vec<RingOp>,
}

fuzz_target!(|input: Input| {
    let ring = DirtyRing::<Box<u32>>::new(usize::from(input.capacity % 17));
    let cap = ring.capacity();
    assert!(cap.is_power_of_two() && cap >= 2 && cap >= usize::from(input.capacity % 17));
    let mut model: VecDeque<u32> = VecDeque::new();
    for op in input.ops.iter().take(1000) {
        match *op {
            RingOp::Push(v) => match ring.push(Box::new(v)) {
                Ok(len) => {
                    assert!(model.len() < cap, "push accepted into a full ring");
                    model.push_back(v);
                    assert_eq!(len, model.len(), "push reports the length after it");
                }
                Err(back) => {
                    assert_eq!(model.len(), cap, "push refused with room left");
                    assert_eq!(*back, v, "the refused key comes back");
                }
            },
            RingOp::Pop => assert_eq!(ring.pop().map(|b| *b), model.pop_front()),
            RingOp::Drain { wait_for_claimed } => {
                let mut out = Vec::new();
                ring.drain_into(&mut out, wait_for_claimed);
                let want: Vec<u32> = model.drain(..).collect();
                assert_eq!(out.into_iter().map(|b| *b).collect::<Vec<_>>(), want);
            }
        }
        assert_eq!(ring.len(), model.len());
    }
    // Dropping the ring drops what is left (a leak or double free trips the sanitizer).
});
