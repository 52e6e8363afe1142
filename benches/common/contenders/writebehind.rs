//! writebehind itself, with the defaults, with a niced flusher, or with a journal.

use std::sync::Arc;

use writebehind::journal::{Journal, JournalSync};
use writebehind::stores::Raw;
use writebehind::Cache;

use super::Kind;
use crate::common::contender::{SharedStore, SyncCache};
use crate::common::value::{Val, ValCodec};

pub struct Wb<V: Val> {
    pub cache: Cache<u64, V>,
    label: Option<&'static str>,
    /// The journal's directory (removed when the contender drops), for the journaled ones.
    _dir: Option<tempfile::TempDir>,
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

    /// The defaults with a journal syncing as `sync` says, in a temporary directory (the
    /// `writebehind-journal-*` contenders), in its steady state: written to until a
    /// checkpoint has reclaimed segments and appends have reused one, as in a service that
    /// has run for more than a moment (not timed).
    pub fn journaled(store: SharedStore<V>, sync: JournalSync, kind: Kind) -> Arc<Self> {
        let dir = tempfile::tempdir().expect("a temporary directory for the journal");
        let cache = Cache::builder(store)
            .journal(Journal::new(dir.path(), Raw, ValCodec).sync(sync))
            .build()
            .expect("a journal in a fresh directory opens");
        warm_journal(&cache);
        Arc::new(Wb {
            cache,
            label: Some(kind.name()),
            _dir: Some(dir),
        })
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
            _dir: None,
        })
    }
}

/// Puts until the journal reuses reclaimed segments (or 50 M puts, whichever first).
pub fn warm_journal<V: Val>(cache: &Cache<u64, V>) {
    let reused = || cache.metrics().journal.map_or(0, |j| j.segments_reused);
    let mut n = 0u64;
    while reused() == 0 && n < 50_000_000 {
        for _ in 0..4096 {
            cache.put(n % 65_536, V::make(n)).expect("cache is open");
            n += 1;
        }
    }
    cache.flush().expect("in-memory store accepts everything");
}

impl<V: Val> SyncCache<V> for Wb<V> {
    const NAME: &'static str = "writebehind";
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
        let journal = m.journal.map_or(String::new(), |j| {
            format!(
                "; journal checkpoints {}, segments created {}, reused {}",
                j.checkpoints, j.segments_created, j.segments_reused
            )
        });
        Some(format!(
            "puts {}, conflated {} ({:.1}%), store batches {}, records written {} ({:.1} per batch), flusher handoffs {}, keeper takeovers {}{journal}",
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
