#![doc = include_str!("../README.md")]
//!
//! # Guarantees
//!
//! * **Read your writes.** `get` returns the latest `put`, and `None` after `remove`, whether
//!   or not the write has reached the store; a value read through the store never shadows a
//!   pending write or delete.
//! * **Conflation.** Any number of writes to a key within one flush window make at most one
//!   store write, carrying the latest value.
//! * **Staleness bound.** With a healthy store, a write reaches the store at most
//!   `write_delay` (plus one flush) after the key's *first* unflushed write.
//! * **Batching.** Dirty keys go to [`Store::write_all`] in batches of at most `max_batch`;
//!   that many dirty keys start a flush before the delay is up.
//! * **Per-key order.** The store never receives an older version of a key after a newer
//!   one, across retries, `flush` and `close`.
//! * **No silent loss.** An unavailable store makes writes wait and retry with capped
//!   exponential backoff; a rejected record is retried `max_attempts` times and then handed
//!   to [`Cache::failed_writes`] (and the `on_failed_write` callback), and leaves memory so
//!   that reads go to the store again; a panicking store is caught and treated as
//!   unavailable; [`Cache::close`] returns what it could not write.
//! * **User code may panic.** A panic in the store, a callback, the clock, or a key's or
//!   value's `Clone`, `Drop` or `Hash` kills no thread of the cache and strands no key: every
//!   accepted write is, at every moment, in the store, queued, in the failed-writes sink or in
//!   a close report. Panics are counted in [`Metrics::user_panics`].
//! * **Acknowledgements mean the store holds the write.** [`Cache::wait_durable`] and
//!   [`Cache::flush_key`] return `Ok` only once the store holds that version of the key or a
//!   newer one; a write given up to the sink, or made in `ReadOnly` mode, never is.
//! * **`flush` is a barrier** (see [`Cache::flush`]).
//! * **No lock across the store.** A store may call back into the cache (`get`, `put`).
//! * **At-least-once, versioned.** A batch may be delivered again after a failure; every
//!   write carries a version that only grows per key, so idempotent adapters make that
//!   harmless. A store that hands out generations ([`Store::generation`]; the shipped
//!   adapters do) fences them: every version of a cache built later is above every version
//!   of one built before ([`version`]), whatever the clocks say. Otherwise versions start at
//!   the wall clock (nanoseconds since the Unix epoch) when the cache is built, so a
//!   restarted process writes above its predecessor unless the clock was set back by more
//!   than the time between the two runs.
//!
//! * **Crash safety is opt-in.** Without a journal, a process crash loses every write that
//!   has not reached the store (while the store is down, that is everything since). With
//!   [`Builder::journal`], a write whose `put` returned survives the death of the process,
//!   and with [`journal::JournalSync::EveryWrite`] a power loss, and is written after the
//!   restart.
//!
//! # `flush`, `close` and `Drop`
//! `flush` waits until everything written before it is in the store (or the flush timeout).
//! `close(deadline)` stops writes, drains until the deadline, joins the flusher threads and
//! returns a [`CloseReport`] listing every write that is not in the store. Dropping a cache
//! that was not closed closes it with the builder's drop deadline and logs (with `tracing`)
//! how many writes it could not write.
//!
//! # Thread safety
//! `Cache` is `Send + Sync`; share it in an `Arc`. Readers and writers of different shards
//! never contend; within a shard, one short lock guards the table and no lock is held while
//! the store runs.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub mod async_cache;
mod cache;
mod clock;
mod config;
mod dirty_ring;
mod engine;
mod error;
mod flusher;
mod guard;
pub mod journal;
mod loader;
mod metrics;
mod partition;
mod settings;
mod shard;
mod shared;
mod store;
pub mod stores;
pub(crate) mod sync;
pub mod testing;
pub mod version;

/// Internals for the loom models (`loom_tests/`) and the fuzz targets (`fuzz/`) only. Not part
/// of the public API; compiled only under `cfg(writebehind_loom)` or `cfg(fuzzing)`.
#[cfg(any(writebehind_loom, fuzzing))]
#[doc(hidden)]
pub mod __verify {
    pub use crate::dirty_ring::DirtyRing;
}

#[cfg(feature = "tokio")]
pub use async_cache::AsyncCache;
pub use cache::Cache;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Builder;
pub use engine::{CloseReport, Computed};
pub use error::{BatchError, Error, Source, StoreError};
pub use metrics::{Distribution, Health, Metrics};
pub use settings::{
    Backpressure, RemovalCause, WriteMode, DEFAULT_FAILED_WRITES_CAPACITY, DEFAULT_FLUSHERS,
    DEFAULT_FLUSHER_NICE, DEFAULT_FLUSH_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BATCH,
    DEFAULT_RETRY_BASE, DEFAULT_RETRY_MAX, DEFAULT_SHARDS, DEFAULT_STORE_TIMEOUT,
    DEFAULT_WRITE_DELAY, MAX_BATCH, MAX_RING_CAPACITY, MAX_RING_SLOTS,
};
pub use store::{Applied, FailedWrite, MemoryStore, Store, Write};

/// Compiles the examples of `docs/SCALING.md` as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/SCALING.md")]
struct ScalingDocs;

/// Compiles the examples of `docs/FEDERATION.md` as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/FEDERATION.md")]
struct FederationDocs;
