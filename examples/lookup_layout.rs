//! Get-hit latency of writebehind against the same lookup built by hand, against dashmap
//! with 16-, 32-, 40-, 56- and 88-byte entries and against quick_cache, in one process,
//! interleaved over nine rounds (docs/BENCHMARKS-HISTORY.md, "get hit: the entry's size"). A
//! diagnostic for the memory layout of the shard and the entry, not one of the issue's
//! benchmarks: those are `benches/ratio.rs` and `benches/peers.rs`.
//!
//! The dashmap sizes bracket writebehind's entry for `u64` keys and values: 56 bytes until
//! the fifth session, 40 since the sixth (the key, the value with a tombstone flag, the
//! version, the oldest unsent version, a 16-bit epoch tag, flags and a slot number); 32 bytes
//! is the least entry the design allows (without the oldest unsent version). dashmap with
//! those entries over dashmap with 16-byte ones is what the entry's size alone costs a get,
//! with no bookkeeping at all. The hand-built contenders hold a 56-byte entry inline in the
//! table, boxed, and in a dense vector behind a `u32` index; then 40- and 32-byte entries in
//! that dense layout, and last a 32-byte entry inline.
//!
//! `cargo run --release --example lookup_layout [keys] [threads]` (defaults 131072 keys and
//! 1 thread; `LOOKUP_OPS` gets per thread per contender per round, default 2,000,000).

use std::sync::Arc;
use std::time::Instant;

use writebehind::{Cache, MemoryStore};

mod layout;
use layout::Shards;

/// An entry the hand-built tables below hold: a `u64` key and value and the rest of its
/// size.
trait Keyed {
    fn make(key: u64) -> Self;
    fn key(&self) -> u64;
    fn value(&self) -> Option<u64>;
}

/// An entry with an `Option<u64>` value, padded with `N` words: 8 + 16 + 8·`N` bytes.
struct Padded<const N: usize> {
    key: u64,
    value: Option<u64>,
    _rest: [u64; N],
}

/// writebehind's entry size before the side state moved out of the table.
type E88 = Padded<8>;
/// writebehind's entry size for `u64` keys and values.
type E56 = Padded<4>;
/// The least entry the design allows with an `Option<u64>` value: the key, the value, a
/// version, and a word for the epoch tag and flags.
type E40 = Padded<2>;

/// The least entry the design allows at all: as [`E40`], with a tombstone as a flag rather
/// than an `Option`.
struct E32 {
    key: u64,
    value: u64,
    _version: u64,
    _tag_and_flags: u64,
}

impl<const N: usize> Keyed for Padded<N> {
    fn make(key: u64) -> Self {
        Padded {
            key,
            value: Some(key),
            _rest: [0; N],
        }
    }
    fn key(&self) -> u64 {
        self.key
    }
    fn value(&self) -> Option<u64> {
        self.value
    }
}

impl Keyed for E32 {
    fn make(key: u64) -> Self {
        E32 {
            key,
            value: key,
            _version: 0,
            _tag_and_flags: 0,
        }
    }
    fn key(&self) -> u64 {
        self.key
    }
    fn value(&self) -> Option<u64> {
        Some(self.value)
    }
}

/// Entries inline in the hash table, as writebehind keeps them.
struct Inline<E>(Shards<hashbrown::HashTable<E>>);

impl<E: Keyed> Inline<E> {
    fn new(n: u64) -> Self {
        let shards = Shards::new();
        shards.fill(n, E::make, |t| t, |e| e.key());
        Inline(shards)
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u64> {
        let h = self.0.hasher.hash_one(key);
        let t = self.0.lock(h);
        t.find(h, |e| e.key() == key).and_then(|e| e.value())
    }
}

/// Boxed entries: the hash table holds pointers.
struct Boxed<E>(Shards<hashbrown::HashTable<Box<E>>>);

impl<E: Keyed> Boxed<E> {
    fn new(n: u64) -> Self {
        let shards = Shards::new();
        shards.fill(n, |k| Box::new(E::make(k)), |t| t, |e| e.key());
        Boxed(shards)
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u64> {
        let h = self.0.hasher.hash_one(key);
        let t = self.0.lock(h);
        t.find(h, |e| e.key() == key).and_then(|e| e.value())
    }
}

/// Entries in a dense vector that the hash table indexes with `u32` slot numbers (the
/// shape quick_cache uses).
struct DenseTable<E> {
    index: hashbrown::HashTable<u32>,
    slots: Vec<E>,
}

impl<E> Default for DenseTable<E> {
    fn default() -> Self {
        DenseTable {
            index: hashbrown::HashTable::new(),
            slots: Vec::new(),
        }
    }
}

struct Dense<E>(Shards<DenseTable<E>>);

impl<E: Keyed> Dense<E> {
    fn new(n: u64) -> Self {
        let shards: Shards<DenseTable<E>> = Shards::new();
        for k in 0..n {
            let h = shards.hasher.hash_one(k);
            let mut t = shards.lock(h);
            let t = &mut *t;
            let i = u32::try_from(t.slots.len()).expect("a shard holds fewer than 2^32 keys");
            t.slots.push(E::make(k));
            let (slots, hasher) = (&t.slots, &shards.hasher);
            t.index
                .insert_unique(h, i, |&i| hasher.hash_one(slots[i as usize].key()));
        }
        Dense(shards)
    }
    #[inline]
    fn get(&self, key: u64) -> Option<u64> {
        let h = self.0.hasher.hash_one(key);
        let t = self.0.lock(h);
        let slots = &t.slots;
        let i = *t.index.find(h, |&i| slots[i as usize].key() == key)?;
        slots[i as usize].value()
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 17);
    let threads: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let ops: u64 = std::env::var("LOOKUP_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let wb: Cache<u64, u64> = Cache::builder(Arc::new(MemoryStore::new()))
        .build()
        .expect("default configuration");
    for k in 0..n {
        wb.put(k, k).expect("open");
    }
    wb.flush().expect("in-memory store");
    assert_eq!(
        [88, 56, 40, 32],
        [
            std::mem::size_of::<E88>(),
            std::mem::size_of::<E56>(),
            std::mem::size_of::<E40>(),
            std::mem::size_of::<E32>()
        ],
        "the entry sizes the contenders are named after"
    );
    let hand = Inline::<E88>::new(n);
    let inline56 = Inline::<E56>::new(n);
    let inline32 = Inline::<E32>::new(n);
    let boxed56 = Boxed::<E56>::new(n);
    let dense56 = Dense::<E56>::new(n);
    let dense40 = Dense::<E40>::new(n);
    let dense32 = Dense::<E32>::new(n);
    let dm16 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let dm32 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let dm40 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let dm56 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    let dm88 = dashmap::DashMap::with_hasher(ahash::RandomState::new());
    for k in 0..n {
        dm16.insert(k, k);
        dm32.insert(k, [k; 3]);
        dm40.insert(k, [k; 4]);
        dm56.insert(k, [k; 6]);
        dm88.insert(k, [k; 10]);
    }
    let quick: quick_cache::sync::Cache<u64, u64> = quick_cache::sync::Cache::new(1 << 22);
    for k in 0..n {
        quick.insert(k, k);
    }
    let names = [
        "writebehind",
        "hand-built 88 B",
        "dashmap 16 B",
        "dashmap 32 B",
        "dashmap 40 B",
        "dashmap 56 B",
        "dashmap 88 B",
        "quick_cache",
        "hand-built 56 B inline",
        "hand-built 56 B boxed",
        "hand-built 56 B dense + u32 index",
        "hand-built 40 B dense + u32 index",
        "hand-built 32 B dense + u32 index",
        "hand-built 32 B inline",
    ];
    // `LOOKUP_ONLY=i`: run contender `i` alone (for callgrind).
    let only: Option<usize> = std::env::var("LOOKUP_ONLY")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut sum = 0u64;
    for round in 0..9u64 {
        for (i, times) in ns.iter_mut().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let t0 = Instant::now();
            let sums: Vec<u64> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let (wb, hand, quick) = (&wb, &hand, &quick);
                        let (dm16, dm32, dm40) = (&dm16, &dm32, &dm40);
                        let (dm56, dm88) = (&dm56, &dm88);
                        let (inline56, boxed56, dense56) = (&inline56, &boxed56, &dense56);
                        let (dense40, dense32, inline32) = (&dense40, &dense32, &inline32);
                        s.spawn(move || {
                            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (round * 64 + t + 1));
                            let mut sum = 0u64;
                            for _ in 0..ops {
                                let k = rng.next() % n;
                                sum = sum.wrapping_add(match i {
                                    0 => wb.get(&k).expect("in memory").expect("present"),
                                    1 => hand.get(k).expect("present"),
                                    2 => *dm16.get(&k).expect("present"),
                                    3 => dm32.get(&k).expect("present")[0],
                                    4 => dm40.get(&k).expect("present")[0],
                                    5 => dm56.get(&k).expect("present")[0],
                                    6 => dm88.get(&k).expect("present")[0],
                                    7 => quick.get(&k).expect("present"),
                                    8 => inline56.get(k).expect("present"),
                                    9 => boxed56.get(k).expect("present"),
                                    10 => dense56.get(k).expect("present"),
                                    11 => dense40.get(k).expect("present"),
                                    12 => dense32.get(k).expect("present"),
                                    _ => inline32.get(k).expect("present"),
                                });
                            }
                            sum
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("no panic"))
                    .collect()
            });
            sum = sums.into_iter().fold(sum, u64::wrapping_add);
            // Wall time per get of one thread: with `threads` threads on as many cores,
            // the time a get takes while the others run.
            times.push(t0.elapsed().as_nanos() as f64 / ops as f64);
        }
    }
    println!(
        "{n} keys, {ops} random gets per thread per contender per round, 9 rounds, \
         {threads} thread(s)"
    );
    println!("| contender | median ns/get | min | rate / dashmap 16 B (paired median) |");
    println!("|---|---:|---:|---:|");
    let paired = |i: usize| {
        let mut r: Vec<f64> = ns[2].iter().zip(&ns[i]).map(|(d, c)| d / c).collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
    };
    for (i, name) in names.iter().enumerate() {
        let mut times = ns[i].clone();
        if times.is_empty() {
            continue;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}x |",
            times[4],
            times[0],
            paired(i)
        );
    }
    std::hint::black_box(sum);
    let m = wb.metrics();
    assert_eq!(m.misses, 0, "every get was a hit");
}
