//! The values the benches put: 8 bytes or 256.

use std::fmt::Debug;

/// A benchmark value: 8 bytes (`u64`) or 256 bytes ([`V256`]).
pub trait Val: Clone + Debug + Send + Sync + 'static {
    const BYTES: usize;
    fn make(i: u64) -> Self;
}

impl Val for u64 {
    const BYTES: usize = 8;
    #[inline]
    fn make(i: u64) -> Self {
        i
    }
}

/// A 256-byte `Copy` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V256(pub [u64; 32]);

impl Val for V256 {
    const BYTES: usize = 256;
    #[inline]
    fn make(i: u64) -> Self {
        let mut a = [0u64; 32];
        a[0] = i;
        a[31] = i;
        V256(a)
    }
}
