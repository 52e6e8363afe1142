//! What the benches run: the operation mix, the key distribution, and each thread's
//! precomputed (seeded) sequence of operations.

use writebehind::testing::{scatter, Rng, Zipf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    Uniform,
    Zipf,
    /// Uniform over the `n` hottest keys: Zipf's ranks `0..n`, scattered over the key space
    /// as the Zipf draws are (`Hot(1)`: the Zipf draws' hottest key, every time).
    Hot(u64),
    /// Every operation a key never seen before (a disjoint range per thread).
    Distinct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Gets of prefilled keys.
    GetHit,
    /// Gets of keys that are in the store but not in the cache (read-through).
    GetMiss,
    /// Puts only.
    Put,
    /// `read_percent` gets, the rest puts.
    Mixed { read_percent: u8 },
}

/// One workload: what to do and on which keys. Key sequences are precomputed (seeded) per
/// thread, outside the timed part, and cycled.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub mix: Mix,
    pub dist: Dist,
    /// Keys `0..keyspace` are prefilled (and the Uniform / Zipf / Hot draws come from there).
    pub keyspace: u64,
}

/// Length of each thread's precomputed key / op sequence.
pub const PLAN_LEN: usize = 1 << 16;

/// Per-thread precomputed operations.
pub struct Plan {
    pub keys: Vec<Vec<u64>>,
    pub writes: Vec<Vec<bool>>,
    pub workload: Workload,
}

impl Plan {
    pub fn new(w: Workload, threads: usize, seed: u64) -> Self {
        let zipf = (w.dist == Dist::Zipf).then(|| Zipf::new(w.keyspace, 1.0));
        let mut keys = Vec::new();
        let mut writes = Vec::new();
        for t in 0..threads {
            let mut rng = Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let mut ks = Vec::with_capacity(PLAN_LEN);
            let mut ws = Vec::with_capacity(PLAN_LEN);
            for _ in 0..PLAN_LEN {
                let k = match w.dist {
                    Dist::Uniform => rng.below(w.keyspace),
                    Dist::Zipf => scatter(zipf.as_ref().unwrap().sample(&mut rng), w.keyspace),
                    Dist::Hot(n) => scatter(rng.below(n), w.keyspace),
                    Dist::Distinct => 0,
                };
                ks.push(k);
                let write = match w.mix {
                    Mix::GetHit | Mix::GetMiss => false,
                    Mix::Put => true,
                    Mix::Mixed { read_percent } => rng.below(100) >= u64::from(read_percent),
                };
                ws.push(write);
            }
            keys.push(ks);
            writes.push(ws);
        }
        Plan {
            keys,
            writes,
            workload: w,
        }
    }
}

/// Keys of the store for the get-miss workload start here (never prefilled in a cache).
pub const MISS_BASE: u64 = 1 << 40;
/// A distinct-key put of thread `t` starts at `DISTINCT_BASE * (t + 1)` plus a per-run offset.
pub const DISTINCT_BASE: u64 = 1 << 48;

/// Keys in the read-through store of the get-miss workload.
pub const MISS_KEYS: u64 = 1 << 20;

/// The key of operation `i` of thread `t`.
#[inline(always)]
pub fn key_of(plan: &Plan, t: usize, i: u64, run_id: u64, ops: u64) -> u64 {
    match plan.workload.mix {
        Mix::GetMiss => MISS_BASE + t as u64 * ops + i,
        _ => match plan.workload.dist {
            Dist::Distinct => DISTINCT_BASE * (t as u64 + 1) + run_id * ops + i,
            _ => plan.keys[t][(i as usize) & (PLAN_LEN - 1)],
        },
    }
}
