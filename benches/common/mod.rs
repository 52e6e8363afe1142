//! Shared by the criterion benches (`peers.rs`) and the ratio report (`ratio.rs`): the
//! contenders behind one interface, seeded key distributions, and a runner that starts N
//! threads at a barrier and times a fixed number of operations on each.
//!
//! Every contender gets the same operations, the same keys and the same in-memory store
//! (`writebehind::MemoryStore`, a mutex around a `HashMap`, reached through the `Store` trait).
#![allow(dead_code)]

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use writebehind::{BatchError, Cache, MemoryStore, Store, Write};

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Key distributions
// ---------------------------------------------------------------------------------------

/// SplitMix64: a small seeded generator, so every contender sees the same key sequence.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
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
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Zipf(s) over ranks `0..n` by inverting a precomputed CDF (binary search). Rank 0 is the
/// hottest; ranks are then scattered over the key space by a fixed permutation so hot keys
/// do not sit next to each other (in the same shard).
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
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
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        self.cdf.partition_point(|&c| c < u) as u64
    }
}

/// Scatters rank `r` of `0..n` over `0..n` (multiplication by an odd constant modulo a power
/// of two would need `n` to be one; an affine map with a prime step works for any `n`).
#[inline]
pub fn scatter(r: u64, n: u64) -> u64 {
    (r.wrapping_mul(2_654_435_761) + 12_345) % n
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    Uniform,
    Zipf,
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
    /// Keys `0..keyspace` are prefilled (and the Uniform / Zipf draws come from there).
    pub keyspace: u64,
}

/// Length of each thread's precomputed key / op sequence.
const PLAN_LEN: usize = 1 << 16;

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

// ---------------------------------------------------------------------------------------
// Contenders
// ---------------------------------------------------------------------------------------

/// A synchronous contender: what one thread calls.
pub trait SyncCache<V: Val>: Send + Sync + 'static {
    /// `get`, reading through the store on a miss.
    fn get(&self, k: u64) -> Option<V>;
    fn put(&self, k: u64, v: V);
    /// Write-behind contenders: returns once every put made so far is in the store. Called
    /// inside the timed part after a run with puts, so a backlog left in a queue is paid for
    /// (sustained throughput, not the speed of filling a buffer).
    fn settle(&self) {}
    fn report(&self) -> Option<String> {
        None
    }
    /// The contender's name when one type serves several (writebehind and its configurations).
    fn label(&self) -> Option<&'static str> {
        None
    }
}

/// Something the runner can time.
pub trait Contender<V: Val>: Send + Sync {
    fn name(&self) -> &'static str;
    /// Runs `ops` operations of `plan` on each of `threads` threads, started together;
    /// returns the wall time from the start until the last thread finished. `run_id` makes
    /// distinct keys differ between runs.
    fn run(&self, plan: &Arc<Plan>, threads: usize, ops: u64, run_id: u64) -> Duration;
    /// Puts the prefill keys and waits until a write-behind contender has written them (not
    /// timed: a flusher still busy with the prefill would steal the measured threads' cores).
    fn prefill(&self, n: u64);
    /// A line about what happened inside (writebehind: its metrics).
    fn report(&self) -> Option<String> {
        None
    }
}

/// The key of operation `i` of thread `t`.
#[inline(always)]
fn key_of(plan: &Plan, t: usize, i: u64, run_id: u64, ops: u64) -> u64 {
    match plan.workload.mix {
        Mix::GetMiss => MISS_BASE + t as u64 * ops + i,
        _ => match plan.workload.dist {
            Dist::Distinct => DISTINCT_BASE * (t as u64 + 1) + run_id * ops + i,
            _ => plan.keys[t][(i as usize) & (PLAN_LEN - 1)],
        },
    }
}

/// Runs `ops` operations per thread on `threads` OS threads released by a barrier.
pub fn run_threads<V: Val, C: SyncCache<V>>(
    c: &Arc<C>,
    plan: &Arc<Plan>,
    threads: usize,
    ops: u64,
    run_id: u64,
) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<JoinHandle<(Instant, Instant)>> = (0..threads)
        .map(|t| {
            let c = c.clone();
            let plan = plan.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let mut sink = 0u64;
                for i in 0..ops {
                    let k = key_of(&plan, t, i, run_id, ops);
                    if plan.writes[t][(i as usize) & (PLAN_LEN - 1)] {
                        c.put(k, V::make(i));
                    } else {
                        // The whole value is handed to black_box: otherwise the optimizer may
                        // drop the copy of a value nobody reads (it did for dashmap's
                        // 256-byte gets, which then read one cache line of five).
                        let got = std::hint::black_box(c.get(k));
                        sink = sink.wrapping_add(got.is_some() as u64);
                    }
                }
                std::hint::black_box(sink);
                (start, Instant::now())
            })
        })
        .collect();
    let times: Vec<(Instant, Instant)> = handles
        .into_iter()
        .map(|h| h.join().expect("bench thread panicked"))
        .collect();
    let start = times.iter().map(|t| t.0).min().expect("one thread");
    let mut end = times.iter().map(|t| t.1).max().expect("one thread");
    if plan.workload.mix != Mix::GetHit && plan.workload.mix != Mix::GetMiss {
        c.settle();
        end = Instant::now();
    }
    end - start
}

fn span(times: impl Iterator<Item = (Instant, Instant)>) -> Duration {
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for (s, e) in times {
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
    }
    last.unwrap() - first.unwrap()
}

/// The store every contender reads through / writes to.
pub type SharedStore<V> = Arc<MemoryStore<u64, V>>;

/// A store holding `MISS_BASE..MISS_BASE + n` (for read-through misses).
pub fn miss_store<V: Val>(n: u64) -> SharedStore<V> {
    let s = Arc::new(MemoryStore::new());
    for k in 0..n {
        s.insert(MISS_BASE + k, V::make(k));
    }
    s
}

macro_rules! sync_contender {
    ($ty:ident, $name:expr) => {
        impl<V: Val> Contender<V> for Arc<$ty<V>> {
            fn name(&self) -> &'static str {
                SyncCache::label(&**self).unwrap_or($name)
            }
            fn run(&self, plan: &Arc<Plan>, threads: usize, ops: u64, run_id: u64) -> Duration {
                run_threads(self, plan, threads, ops, run_id)
            }
            fn report(&self) -> Option<String> {
                SyncCache::report(&**self)
            }
            fn prefill(&self, n: u64) {
                for k in 0..n {
                    SyncCache::put(&**self, k, V::make(k));
                }
                SyncCache::settle(&**self);
            }
        }
    };
}

// --- writebehind ---------------------------------------------------------------------------

pub struct Wb<V: Val> {
    pub cache: Cache<u64, V>,
    label: Option<&'static str>,
}

/// The nice levels of the `writebehind-nice10` contender's flusher (`Builder::flusher_nice`).
pub const WB_NICE: u8 = 10;

impl<V: Val> Wb<V> {
    /// The defaults (the `writebehind` contender).
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        Self::build(store, None)
    }

    /// The defaults with the flusher [`WB_NICE`] nice levels below the benchmark threads
    /// (the `writebehind-nice10` contender).
    pub fn niced(store: SharedStore<V>) -> Arc<Self> {
        Self::build(store, Some(WB_NICE))
    }

    fn build(store: SharedStore<V>, nice: Option<u8>) -> Arc<Self> {
        // `WB_MANUAL=1` (a diagnostic, not a contender): no flusher thread; the flush at the
        // end of a timed run writes everything on the calling thread.
        let manual = std::env::var("WB_MANUAL").is_ok_and(|v| v == "1");
        let mut b = Cache::builder(store);
        // `WB_MAX_BATCH=n` (a diagnostic): another count trigger / batch size.
        if let Some(n) = std::env::var("WB_MAX_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            b = b.max_batch(n);
        }
        if manual {
            b = b.manual_flushing();
        }
        if let Some(n) = nice {
            b = b.flusher_nice(n);
        }
        let cache = b.build().expect("default configuration is valid");
        Arc::new(Wb {
            cache,
            label: nice.map(|_| Kind::WritebehindNice.name()),
        })
    }
}

impl<V: Val> SyncCache<V> for Wb<V> {
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        self.cache.get(&k).expect("in-memory store does not fail")
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.cache.put(k, v).expect("cache is open");
    }
    fn settle(&self) {
        self.cache
            .flush()
            .expect("in-memory store accepts everything");
    }
    fn report(&self) -> Option<String> {
        let m = self.cache.metrics();
        Some(format!(
            "puts {}, conflated {} ({:.1}%), store batches {}, records written {} ({:.1} per batch), flusher handoffs {}, keeper takeovers {}",
            m.puts,
            m.conflated,
            100.0 * m.conflated as f64 / m.puts.max(1) as f64,
            m.batches,
            m.records_written,
            m.records_written as f64 / m.batches.max(1) as f64,
            m.flusher_handoffs,
            m.flusher_takeovers
        ))
    }
    fn label(&self) -> Option<&'static str> {
        self.label
    }
}
sync_contender!(Wb, "writebehind");

// --- dashmap (the ceiling: no persistence) ---------------------------------------------------

pub struct Dash<V: Val> {
    map: DashMap<u64, V, ahash::RandomState>,
    store: SharedStore<V>,
}

impl<V: Val> Dash<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        Arc::new(Dash {
            map: DashMap::with_hasher(ahash::RandomState::new()),
            store,
        })
    }
}

impl<V: Val> SyncCache<V> for Dash<V> {
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        if let Some(v) = self.map.get(&k) {
            return Some(v.clone());
        }
        let v = self.store.load(&k).expect("in-memory store")?;
        self.map.insert(k, v.clone());
        Some(v)
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.map.insert(k, v);
    }
}
sync_contender!(Dash, "dashmap");

// --- the shard-lock floors (a get's least cost under the design's shard lock) ----------------

/// Shards of the floors, as many as writebehind's default.
const FLOOR_SHARDS: usize = 64;

/// An entry of a [`LockFloor`] table.
pub trait FloorEntry<V>: Send + Sync + 'static {
    fn new(key: u64, value: V) -> Self;
    fn key(&self) -> u64;
    /// What a hit returns.
    fn hit(&self) -> Option<V>;
    fn set(&mut self, value: V);
}

/// The bare map's entry: the key and the value, 16 bytes for `u64` values.
pub struct MapEntry<V>(u64, V);

impl<V: Val> FloorEntry<V> for MapEntry<V> {
    fn new(key: u64, value: V) -> Self {
        MapEntry(key, value)
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn hit(&self) -> Option<V> {
        Some(self.1.clone())
    }
    fn set(&mut self, value: V) {
        self.1 = value;
    }
}

/// The least entry the design allows (the design card's `Entry{value, version,
/// dirty_epoch, ...}`): the key, the value, the version, and one word for the epoch tag and
/// the flags, 32 bytes for `u64` values. A hit reads the flags for the tombstone bit, as
/// any entry that can stand for a pending delete must.
pub struct DesignEntry<V> {
    key: u64,
    value: V,
    flags: u64,
    _version: u64,
}

/// [`DesignEntry::flags`]: the entry is a tombstone.
const FLOOR_TOMB: u64 = 1 << 4;

impl<V: Val> FloorEntry<V> for DesignEntry<V> {
    fn new(key: u64, value: V) -> Self {
        DesignEntry {
            key,
            value,
            flags: 0,
            _version: 1,
        }
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        self.key
    }
    #[inline(always)]
    fn hit(&self) -> Option<V> {
        (self.flags & FLOOR_TOMB == 0).then(|| self.value.clone())
    }
    fn set(&mut self, value: V) {
        self.value = value;
        self.flags &= !FLOOR_TOMB;
    }
}

/// The least a get can cost under the design's shard lock, built by hand with the same parts
/// writebehind uses: 64 cache-padded `parking_lot` mutexes over hashbrown tables hashed with
/// ahash, the shard chosen from bits 32.. of the hash as writebehind chooses it, and entries
/// of type `E` inline in the table. A get locks, probes, reads the entry and unlocks: no
/// counters, nothing to persist. A diagnostic of the ratio report's get workload, not a
/// cache anyone would ship: what writebehind's get could reach with nothing of its own
/// ([`MapEntry`]) and with the least entry the design allows ([`DesignEntry`]).
pub struct LockFloor<V: Val, E> {
    shards: Box<[crossbeam_utils::CachePadded<parking_lot::Mutex<hashbrown::HashTable<E>>>]>,
    hasher: ahash::RandomState,
    store: SharedStore<V>,
}

impl<V: Val, E: FloorEntry<V>> LockFloor<V, E> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        Arc::new(LockFloor {
            shards: (0..FLOOR_SHARDS).map(|_| Default::default()).collect(),
            hasher: ahash::RandomState::new(),
            store,
        })
    }

    #[inline(always)]
    fn shard(&self, hash: u64) -> &parking_lot::Mutex<hashbrown::HashTable<E>> {
        &self.shards[((hash >> 32) as usize) & (FLOOR_SHARDS - 1)]
    }

    fn insert(&self, hash: u64, k: u64, v: V) {
        let mut t = self.shard(hash).lock();
        match t.find_mut(hash, |e| e.key() == k) {
            Some(e) => e.set(v),
            None => {
                t.insert_unique(hash, E::new(k, v), |e| self.hasher.hash_one(e.key()));
            }
        }
    }
}

impl<V: Val, E: FloorEntry<V>> SyncCache<V> for LockFloor<V, E> {
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        let hash = self.hasher.hash_one(k);
        if let Some(found) = self
            .shard(hash)
            .lock()
            .find(hash, |e| e.key() == k)
            .map(E::hit)
        {
            return found;
        }
        let v = self.store.load(&k).expect("in-memory store")?;
        self.insert(hash, k, v.clone());
        Some(v)
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.insert(self.hasher.hash_one(k), k, v);
    }
}

/// [`LockFloor`] over a bare map's entry.
pub type MapFloor<V> = LockFloor<V, MapEntry<V>>;
sync_contender!(MapFloor, "lock floor 16B");
/// [`LockFloor`] over the least entry the design allows.
pub type DesignFloor<V> = LockFloor<V, DesignEntry<V>>;
sync_contender!(DesignFloor, "lock floor 32B");

// --- quick_cache (sync) ----------------------------------------------------------------------

/// Capacity of the bounded peers: large enough that nothing the benches put is evicted.
pub const PEER_CAPACITY: usize = 1 << 22;

pub struct Quick<V: Val> {
    cache: quick_cache::sync::Cache<u64, V>,
    store: SharedStore<V>,
}

impl<V: Val> Quick<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        Arc::new(Quick {
            cache: quick_cache::sync::Cache::new(PEER_CAPACITY),
            store,
        })
    }
}

impl<V: Val> SyncCache<V> for Quick<V> {
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        if let Some(v) = self.cache.get(&k) {
            return Some(v);
        }
        let v = self.store.load(&k).expect("in-memory store")?;
        self.cache.insert(k, v.clone());
        Some(v)
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.cache.insert(k, v);
    }
}
sync_contender!(Quick, "quick_cache");

// --- moka (sync) -----------------------------------------------------------------------------

pub struct Moka<V: Val> {
    cache: moka::sync::Cache<u64, V, ahash::RandomState>,
    store: SharedStore<V>,
}

impl<V: Val> Moka<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        Arc::new(Moka {
            cache: moka::sync::Cache::builder()
                .max_capacity(PEER_CAPACITY as u64)
                .build_with_hasher(ahash::RandomState::new()),
            store,
        })
    }
}

impl<V: Val> SyncCache<V> for Moka<V> {
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        if let Some(v) = self.cache.get(&k) {
            return Some(v);
        }
        let v = self.store.load(&k).expect("in-memory store")?;
        self.cache.insert(k, v.clone());
        Some(v)
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.cache.insert(k, v);
    }
}
sync_contender!(Moka, "moka");

// --- hand-rolled write-behind (dashmap + channel + one writer thread) ---------------------------

/// Channel capacity of the hand-rolled write-behind: bounded, as a service would run it so a
/// slow store applies back-pressure instead of growing memory without limit.
pub const HAND_CHANNEL: usize = 1 << 16;

pub enum Msg<V> {
    Put(u64, V),
    /// Answered once every earlier record is written.
    Sync(crossbeam_channel::Sender<()>),
}

/// The hand-rolled write-behind's writer thread's name (15 bytes, all of it in `comm`).
pub const HAND_WRITER: &str = "hand-rolled-wrt";

/// What users write by hand: a dashmap for reads, every write also sent over a channel to one
/// writer thread that calls the store once per record.
pub struct Hand<V: Val> {
    map: DashMap<u64, V, ahash::RandomState>,
    tx: Option<crossbeam_channel::Sender<Msg<V>>>,
    writer: Option<JoinHandle<()>>,
    store: SharedStore<V>,
    pub written: Arc<AtomicU64>,
}

impl<V: Val> Hand<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Msg<V>>(HAND_CHANNEL);
        let written = Arc::new(AtomicU64::new(0));
        let (s2, w2) = (store.clone(), written.clone());
        // Named, so a diagnostic can find it (`put_layout`'s `PUT_HAND_NICE`).
        let writer = std::thread::Builder::new().name(HAND_WRITER.into());
        let writer = writer.spawn(move || {
            let mut version = 1u64;
            for msg in rx {
                let (key, value) = match msg {
                    Msg::Put(k, v) => (k, v),
                    Msg::Sync(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                let w = Write::Put {
                    key,
                    value,
                    version,
                };
                version += 1;
                let _ = s2.write_all(std::slice::from_ref(&w));
                w2.fetch_add(1, Ordering::Relaxed);
            }
        });
        let writer = writer.expect("the hand-rolled writer thread starts");
        Arc::new(Hand {
            map: DashMap::with_hasher(ahash::RandomState::new()),
            tx: Some(tx),
            writer: Some(writer),
            store,
            written,
        })
    }
}

impl<V: Val> Drop for Hand<V> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl<V: Val> SyncCache<V> for Hand<V> {
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        if let Some(v) = self.map.get(&k) {
            return Some(v.clone());
        }
        let v = self.store.load(&k).expect("in-memory store")?;
        self.map.insert(k, v.clone());
        Some(v)
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.map.insert(k, v.clone());
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Put(k, v));
        }
    }
    fn settle(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Sync(done));
            let _ = wait.recv();
        }
    }
}
sync_contender!(Hand, "hand-rolled");

// --- wb-cache (async, driven from a tokio runtime) ------------------------------------------

/// The data controller wb-cache needs: the record carries its key (wb-cache derives the
/// primary key from the value), loads and batched write-backs go to the same in-memory store.
pub struct WbcController<V: Val> {
    store: SharedStore<V>,
    version: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Rec<V>(pub u64, pub V);

#[async_trait::async_trait]
impl<V: Val> wb_cache::DataController for WbcController<V> {
    type Key = u64;
    type Value = Rec<V>;
    type CacheUpdate = V;
    type Error = String;

    async fn get_for_key(&self, key: &u64) -> Result<Option<Rec<V>>, String> {
        Ok(self
            .store
            .load(key)
            .map_err(|e| e.to_string())?
            .map(|v| Rec(*key, v)))
    }

    async fn write_back(
        &self,
        updates: Arc<wb_cache::update_iterator::UpdateIterator<Self>>,
    ) -> Result<(), String> {
        let mut batch = Vec::with_capacity(updates.len());
        while let Some(item) = updates.next() {
            let version = self.version.fetch_add(1, Ordering::Relaxed);
            batch.push(Write::Put {
                key: *item.key(),
                value: item.update().clone(),
                version,
            });
        }
        self.store
            .write_all(&batch)
            .map_err(|e: BatchError| e.to_string())?;
        updates.confirm_all();
        Ok(())
    }

    async fn on_new(
        &self,
        _key: &u64,
        value: &Rec<V>,
    ) -> Result<wb_cache::types::DataControllerResponse<Self>, String> {
        Ok(wb_cache::types::DataControllerResponse {
            op: wb_cache::types::DataControllerOp::Insert,
            update: Some(value.1.clone()),
        })
    }

    async fn on_delete(
        &self,
        _key: &u64,
        _update: Option<&V>,
    ) -> Result<wb_cache::types::DataControllerResponse<Self>, String> {
        Ok(wb_cache::types::DataControllerResponse {
            op: wb_cache::types::DataControllerOp::Revoke,
            update: None,
        })
    }

    async fn on_change(
        &self,
        _key: &u64,
        value: &Rec<V>,
        _old: Rec<V>,
        _prev: Option<V>,
    ) -> Result<wb_cache::types::DataControllerResponse<Self>, String> {
        Ok(wb_cache::types::DataControllerResponse {
            op: wb_cache::types::DataControllerOp::Insert,
            update: Some(value.1.clone()),
        })
    }

    fn primary_key_of(&self, value: &Rec<V>) -> u64 {
        value.0
    }
}

/// wb-cache on a multi-threaded tokio runtime with as many workers as benchmark threads;
/// each benchmark "thread" is a task looping over its operations.
pub struct WbCache<V: Val> {
    rt: tokio::runtime::Runtime,
    cache: Arc<wb_cache::Cache<WbcController<V>>>,
}

impl<V: Val> WbCache<V> {
    pub fn new(store: SharedStore<V>, workers: usize) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dc = WbcController {
            store,
            version: AtomicU64::new(1),
        };
        let cache = rt.block_on(async {
            wb_cache::Cache::builder()
                .data_controller(dc)
                .max_updates(1000)
                .max_capacity(PEER_CAPACITY as u64)
                .flush_interval(Duration::from_secs(1))
                .build()
                .expect("wb-cache builds")
        });
        WbCache { rt, cache }
    }
}

impl<V: Val> Drop for WbCache<V> {
    fn drop(&mut self) {
        let c = self.cache.clone();
        let _ = self.rt.block_on(async move { c.close().await });
    }
}

impl<V: Val> Contender<V> for WbCache<V> {
    fn name(&self) -> &'static str {
        "wb-cache"
    }
    fn prefill(&self, n: u64) {
        let c = self.cache.clone();
        self.rt.block_on(async move {
            for k in 0..n {
                c.insert(Rec(k, V::make(k))).await.expect("wb-cache insert");
            }
            c.flush().await.expect("wb-cache flush");
        });
    }
    fn run(&self, plan: &Arc<Plan>, threads: usize, ops: u64, run_id: u64) -> Duration {
        let barrier = Arc::new(tokio::sync::Barrier::new(threads));
        let tasks: Vec<_> = (0..threads)
            .map(|t| {
                let c = self.cache.clone();
                let plan = plan.clone();
                let barrier = barrier.clone();
                self.rt.spawn(async move {
                    barrier.wait().await;
                    let start = Instant::now();
                    let mut sink = 0u64;
                    for i in 0..ops {
                        let k = key_of(&plan, t, i, run_id, ops);
                        if plan.writes[t][(i as usize) & (PLAN_LEN - 1)] {
                            c.insert(Rec(k, V::make(i))).await.expect("wb-cache insert");
                        } else {
                            let got = c.get(&k).await.expect("wb-cache get");
                            sink = sink.wrapping_add(got.is_some() as u64);
                        }
                    }
                    std::hint::black_box(sink);
                    (start, Instant::now())
                })
            })
            .collect();
        let c2 = self.cache.clone();
        let plan = plan.clone();
        let times = self.rt.block_on(async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("wb-cache task panicked"));
            }
            if plan.workload.mix != Mix::GetHit && plan.workload.mix != Mix::GetMiss {
                c2.flush().await.expect("wb-cache flush");
            }
            let end = Instant::now();
            out.push((end, end));
            out
        });
        span(times.into_iter())
    }
}

/// The contenders, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Writebehind,
    /// writebehind with `flusher_nice(WB_NICE)`.
    WritebehindNice,
    Dashmap,
    QuickCache,
    Moka,
    HandRolled,
    WbCache,
    /// [`LockFloor`] with a [`MapEntry`]: not a peer, the least a get costs under the
    /// design's shard lock. Not in [`Kind::ALL`]; the ratio report adds both floors to its
    /// get workload.
    MapFloor,
    /// [`LockFloor`] with a [`DesignEntry`], the least entry the design allows.
    DesignFloor,
}

impl Kind {
    /// The two shard-lock floors ([`LockFloor`]), which the ratio report adds to its get
    /// workload.
    pub const FLOORS: [Kind; 2] = [Kind::MapFloor, Kind::DesignFloor];

    pub const ALL: [Kind; 7] = [
        Kind::Writebehind,
        Kind::WritebehindNice,
        Kind::Dashmap,
        Kind::QuickCache,
        Kind::Moka,
        Kind::HandRolled,
        Kind::WbCache,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Writebehind => "writebehind",
            Kind::WritebehindNice => "writebehind-nice10",
            Kind::Dashmap => "dashmap",
            Kind::QuickCache => "quick_cache",
            Kind::Moka => "moka",
            Kind::HandRolled => "hand-rolled",
            Kind::WbCache => "wb-cache",
            Kind::MapFloor => "lock floor 16B",
            Kind::DesignFloor => "lock floor 32B",
        }
    }

    /// Does an instance keep a core busy between its runs? wb-cache 0.1.0's background
    /// task flushes its whole update pool on every tick once the prefill has filled it, and
    /// the pool does not empty (a tokio worker measured at 100 % of a core from the
    /// prefill on, through every other contender's runs). Where other contenders' instances
    /// stay alive (the ratio report), such a contender gets a fresh instance for each run,
    /// dropped (its runtime shut down) before the next contender runs ([`Runner::timed_run`]).
    pub fn busy_between_runs(self) -> bool {
        self == Kind::WbCache
    }

    /// A new contender on `store`, for `threads` benchmark threads.
    pub fn build<V: Val>(self, store: SharedStore<V>, threads: usize) -> Box<dyn Contender<V>> {
        match self {
            Kind::Writebehind => Box::new(Wb::new(store)),
            Kind::WritebehindNice => Box::new(Wb::niced(store)),
            Kind::Dashmap => Box::new(Dash::new(store)),
            Kind::QuickCache => Box::new(Quick::new(store)),
            Kind::Moka => Box::new(Moka::new(store)),
            Kind::HandRolled => Box::new(Hand::new(store)),
            Kind::WbCache => Box::new(WbCache::new(store, threads)),
            Kind::MapFloor => Box::new(MapFloor::new(store)),
            Kind::DesignFloor => Box::new(DesignFloor::new(store)),
        }
    }
}

/// Keys in the read-through store of the get-miss workload.
pub const MISS_KEYS: u64 = 1 << 20;

/// Most operations per thread one contender instance runs in a workload that needs fresh
/// keys (get miss, distinct puts); longer runs are split over fresh instances.
pub fn fresh_chunk(threads: usize) -> u64 {
    MISS_KEYS / threads as u64
}

/// Does this workload need a fresh contender (fresh keys) for every run?
pub fn needs_fresh(w: &Workload) -> bool {
    w.mix == Mix::GetMiss || w.dist == Dist::Distinct
}

/// A contender ready for `w`: built on its store and prefilled (not timed).
pub fn prepared<V: Val>(
    kind: Kind,
    w: &Workload,
    threads: usize,
    miss_store: &Option<SharedStore<V>>,
) -> Box<dyn Contender<V>> {
    let store = match (w.mix, miss_store) {
        (Mix::GetMiss, Some(s)) => s.clone(),
        _ => Arc::new(MemoryStore::new()),
    };
    let c = kind.build(store, threads);
    if w.mix != Mix::GetMiss && w.dist != Dist::Distinct {
        c.prefill(w.keyspace);
    }
    c
}

/// CPU time this process has used, all threads together (`None` where it cannot be read).
#[cfg(target_os = "linux")]
fn process_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` for the duration of the call, and
    // CLOCK_PROCESS_CPUTIME_ID is a clock every Linux kernel since 2.6.12 provides.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| {
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn process_cpu() -> Option<Duration> {
    None
}

/// Runs that started before the process was quiet (see [`quiesce`]), for the report.
pub static UNQUIET_RUNS: AtomicU64 = AtomicU64::new(0);
/// Time spent waiting for a quiet process before runs, in nanoseconds, for the report.
pub static QUIESCE_WAITED_NS: AtomicU64 = AtomicU64::new(0);

/// Waits, untimed, until the process is quiet: less than 5 % of one core used over a 20 ms
/// window by all its threads (the caller sleeps). Contenders share the process, and some
/// keep working after their run returns (a runtime's background flush, a writer thread
/// draining its channel): without this wait, that work lands on whichever contender runs
/// next, always the same one in the report's rotation. Gives up after 3 s (counted in
/// [`UNQUIET_RUNS`]); returns at once where process CPU time cannot be read.
pub fn quiesce() {
    const WINDOW: Duration = Duration::from_millis(20);
    const BUSY: Duration = Duration::from_millis(1);
    const GIVE_UP: Duration = Duration::from_secs(3);
    let start = Instant::now();
    while let Some(before) = process_cpu() {
        std::thread::sleep(WINDOW);
        let Some(after) = process_cpu() else { break };
        if after.saturating_sub(before) < BUSY {
            break;
        }
        if start.elapsed() >= GIVE_UP {
            UNQUIET_RUNS.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    let waited = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    QUIESCE_WAITED_NS.fetch_add(waited, Ordering::Relaxed);
}

/// One contender of a workload, as the runners time it: its cached instance, if any, and
/// what a fresh one is built from.
pub struct Runner<V: Val> {
    kind: Kind,
    /// The instance reused for workloads on prefilled keys.
    pub cached: Option<Box<dyn Contender<V>>>,
    /// The read-through store of the get-miss workload.
    miss_store: Option<SharedStore<V>>,
    /// Other contenders' instances stay alive between this contender's runs (the ratio
    /// report, which keeps every contender of a workload). Then a contender busy between its
    /// runs ([`Kind::busy_between_runs`]) gets a fresh instance for each run, so that it is
    /// never alive during another contender's run. Without it (the criterion matrix, which
    /// drops a contender's instance before the next contender runs) it keeps one instance
    /// for the group: a fresh one per run would put its prefill inside criterion's warm-up
    /// and sample planning, which time the whole call, and leave one operation per sample.
    /// Its own background work is then its own cost, so its runs do not wait for a quiet
    /// process.
    beside_others: bool,
}

impl<V: Val> Runner<V> {
    pub fn new(kind: Kind, miss_store: Option<SharedStore<V>>, beside_others: bool) -> Self {
        Runner {
            kind,
            cached: None,
            miss_store,
            beside_others,
        }
    }

    /// Times `ops` operations per thread of `plan`, building fresh instances as the
    /// workload or the contender needs ([`needs_fresh`], [`Kind::busy_between_runs`]; their
    /// construction and teardown are not timed), each run starting once the process is
    /// quiet ([`quiesce`]).
    pub fn timed_run(
        &mut self,
        plan: &Arc<Plan>,
        threads: usize,
        ops: u64,
        run_id: u64,
    ) -> Duration {
        let (kind, miss_store) = (self.kind, &self.miss_store);
        let w = plan.workload;
        let busy = kind.busy_between_runs();
        if !(needs_fresh(&w) || busy && self.beside_others) {
            let c = self
                .cached
                .get_or_insert_with(|| prepared(kind, &w, threads, miss_store));
            if !busy {
                quiesce();
            }
            return c.run(plan, threads, ops, run_id);
        }
        // Fresh instances: one per chunk of fresh keys, or one for the whole run.
        let chunk = if needs_fresh(&w) {
            fresh_chunk(threads)
        } else {
            ops
        };
        let mut left = ops;
        let mut total = Duration::ZERO;
        while left > 0 {
            let n = left.min(chunk);
            let c = prepared(kind, &w, threads, miss_store);
            quiesce();
            total += c.run(plan, threads, n, 0);
            drop(c);
            left -= n;
        }
        total
    }
}
