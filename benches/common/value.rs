//! The values the benches put: 8 bytes or 256.

use std::fmt::Debug;

/// A benchmark value: 8 bytes (`u64`) or 256 bytes ([`V256`]).
pub trait Val: Clone + Debug + Send + Sync + 'static {
    const BYTES: usize;
    fn make(i: u64) -> Self;
    /// Appends the value's bytes (for the journaled contenders' codec).
    fn write_bytes(&self, out: &mut Vec<u8>);
    /// The value from [`Val::write_bytes`]'s bytes.
    fn from_bytes(b: &[u8]) -> Option<Self>;
}

impl Val for u64 {
    const BYTES: usize = 8;
    #[inline]
    fn make(i: u64) -> Self {
        i
    }
    fn write_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// A journal codec for any [`Val`].
pub struct ValCodec;

impl<V: Val> writebehind::stores::Codec<V> for ValCodec {
    fn encode(&self, value: &V) -> Result<Vec<u8>, writebehind::stores::CodecError> {
        let mut out = Vec::with_capacity(V::BYTES);
        value.write_bytes(&mut out);
        Ok(out)
    }
    fn encode_into(
        &self,
        value: &V,
        out: &mut Vec<u8>,
    ) -> Result<(), writebehind::stores::CodecError> {
        value.write_bytes(out);
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<V, writebehind::stores::CodecError> {
        V::from_bytes(bytes).ok_or_else(|| "not a benchmark value".into())
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
    fn write_bytes(&self, out: &mut Vec<u8>) {
        for w in &self.0 {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut a = [0u64; 32];
        for (w, chunk) in a.iter_mut().zip(b.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        (b.len() == 256).then_some(V256(a))
    }
}
