//! The key distribution: a seeded generator and a Zipf (hot-user) sampler over user ids.

/// SplitMix64: small, fast, seedable; plenty for picking keys.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`; different seeds give independent-looking streams.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over `0..n`: user `i` is picked with probability proportional to `1 / (i + 1)^s`
/// (`s = 0` is uniform). Sampling is a binary search in the precomputed CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n >= 1` keys with exponent `s >= 0`.
    pub fn new(n: u64, s: f64) -> Self {
        let mut total = 0.0;
        let cdf = (0..n)
            .map(|i| {
                total += 1.0 / ((i + 1) as f64).powf(s);
                total
            })
            .collect();
        Zipf { cdf }
    }

    /// One key.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let total = self.cdf.last().copied().unwrap_or(0.0);
        let u = rng.next_f64() * total;
        let i = self.cdf.partition_point(|&c| c <= u);
        i.min(self.cdf.len().saturating_sub(1)) as u64
    }

    /// The probability mass of the `k` hottest keys (for the report).
    pub fn head_mass(&self, k: usize) -> f64 {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        match k.min(self.cdf.len()) {
            0 => 0.0,
            k => self.cdf[k - 1] / total,
        }
    }
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
    }
}
