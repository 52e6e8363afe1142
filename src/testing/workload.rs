//! Seeded key generators: the random source and the key distributions that the benches, the
//! load driver and the randomized tests draw their keys from, so that a seed names one key
//! sequence everywhere.

/// SplitMix64: small, fast and seedable; plenty for picking keys, not for anything secret.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; different seeds give independent-looking streams (seed 0
    /// included).
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), by multiplication rather than a biased modulo.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Zipf(s) over ranks `0..n`: rank `i` is drawn with probability proportional to
/// `1 / (i + 1)^s` (`s = 0` is uniform), so rank 0 is the hottest. Sampling is a binary
/// search in the precomputed cumulative distribution; [`scatter`] spreads the ranks over a
/// key space when neighbouring hot keys would distort what is measured.
#[derive(Clone, Debug)]
pub struct Zipf {
    /// Cumulative probabilities, normalized: the last one is 1.
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n` ranks with exponent `s >= 0`.
    pub fn new(n: u64, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    /// One rank, in `0..n` (0 when `n` is 0).
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        let rank = self.cdf.partition_point(|&c| c <= u);
        rank.min(self.cdf.len().saturating_sub(1)) as u64
    }

    /// The probability mass of the `k` hottest ranks.
    pub fn head_mass(&self, k: usize) -> f64 {
        match k.min(self.cdf.len()) {
            0 => 0.0,
            k => self.cdf[k - 1],
        }
    }
}

/// Scatters rank `r` of `0..n` over `0..n`, so that hot ranks are not neighbouring keys (in
/// one shard, one B-tree page). An affine map with a prime step: a permutation for any `n`
/// the step does not divide, where multiplying by an odd constant would need `n` to be a
/// power of two.
#[inline]
pub fn scatter(r: u64, n: u64) -> u64 {
    (r.wrapping_mul(2_654_435_761) + 12_345) % n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = Rng::new(7);
        let mut hits = vec![0u32; 1000];
        for _ in 0..100_000 {
            hits[z.sample(&mut rng) as usize] += 1;
        }
        assert!(hits[0] > hits[10] && hits[10] > hits[500]);
        let uniform = Zipf::new(10, 0.0);
        assert!((uniform.head_mass(5) - 0.5).abs() < 1e-9);
        assert_eq!(uniform.head_mass(0), 0.0);
        assert_eq!(uniform.head_mass(99), 1.0);
    }

    #[test]
    fn below_and_scatter_stay_in_range() {
        let mut rng = Rng::new(0);
        assert!((0..10_000).all(|_| rng.below(17) < 17));
        let mut seen: Vec<u64> = (0..1000).map(|r| scatter(r, 1000)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>(), "a permutation");
    }

    #[test]
    fn a_seed_names_one_sequence() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
