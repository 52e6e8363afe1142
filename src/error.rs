//! Errors: what the cache reports to callers ([`Error`]) and what a [`Store`](crate::Store)
//! reports to the cache ([`StoreError`], [`BatchError`]).

use std::fmt;
use std::sync::Arc;

/// The source of a store failure, shared so that a failed write can be reported in several
/// places (the caller, the failed-writes sink, the close report) without copying it.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store could not load or write a record.
///
/// The variant tells the cache what to do next, so pick it by what a retry would achieve:
///
/// * [`StoreError::Unavailable`]: the backend cannot be reached or is overloaded (connection
///   refused, timeout, database locked). Nothing is wrong with the record; the cache keeps it
///   queued and retries with capped exponential backoff, without limit.
/// * [`StoreError::Rejected`]: the backend refused *this record* (constraint violation, bad
///   type). Retrying may help a bounded number of times (a foreign key that appears later);
///   after that the write goes to the failed-writes sink.
#[derive(Clone)]
pub enum StoreError {
    /// The backend is unreachable or busy: keep the write queued and retry later.
    Unavailable(Source),
    /// This record is bad: retry a bounded number of times, then hand it to the sink.
    Rejected(Source),
}

impl StoreError {
    /// An [`StoreError::Unavailable`] from any error or message.
    ///
    /// ```
    /// use writebehind::StoreError;
    /// let e = StoreError::unavailable("connection refused");
    /// assert!(e.is_unavailable());
    /// ```
    pub fn unavailable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StoreError::Unavailable(Arc::from(source.into()))
    }

    /// A [`StoreError::Rejected`] from any error or message.
    pub fn rejected(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StoreError::Rejected(Arc::from(source.into()))
    }

    /// `true` for [`StoreError::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            StoreError::Unavailable(s) | StoreError::Rejected(s) => &**s,
        }
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(s) => {
                f.debug_tuple("Unavailable").field(&s.to_string()).finish()
            }
            StoreError::Rejected(s) => f.debug_tuple("Rejected").field(&s.to_string()).finish(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(s) => write!(f, "store unavailable: {s}"),
            StoreError::Rejected(s) => write!(f, "store rejected the record: {s}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unavailable(s) | StoreError::Rejected(s) => Some(&**s),
        }
    }
}

/// Why [`Store::write_all`](crate::Store::write_all) did not apply a whole batch.
#[derive(Clone, Debug)]
pub enum BatchError {
    /// Nothing, or an unknown part, was applied: the cache retries the whole batch after a
    /// backoff. Safe because writes carry versions and adapters are idempotent.
    Unavailable(Source),
    /// The records at these indices (into the batch slice) failed, each with its own error;
    /// every other record was applied. Indices out of range are ignored (and logged).
    Partial(Vec<(usize, StoreError)>),
}

impl BatchError {
    /// A [`BatchError::Unavailable`] from any error or message.
    pub fn unavailable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BatchError::Unavailable(Arc::from(source.into()))
    }
}

impl From<StoreError> for BatchError {
    /// A store error that concerns the whole batch. `Rejected` cannot name a record here, so
    /// it is treated as `Unavailable`; adapters that can isolate a bad record return `Partial`.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(s) | StoreError::Rejected(s) => BatchError::Unavailable(s),
        }
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::Unavailable(s) => write!(f, "store unavailable, batch not applied: {s}"),
            BatchError::Partial(failed) => {
                write!(f, "{} record(s) of the batch failed", failed.len())
            }
        }
    }
}

impl std::error::Error for BatchError {}

/// What a cache operation can fail with.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The cache was closed ([`Cache::close`](crate::Cache::close) or drop); it accepts no
    /// more writes and no read-through.
    Closed,
    /// Reading a missing key through the store failed; the cache did not cache anything.
    Load(StoreError),
    /// A write-through (or a mode switch's flush) could not write to the store; the cache
    /// kept its previous state.
    Store(StoreError),
    /// [`Cache::flush`](crate::Cache::flush) did not see every earlier write reach the store
    /// within the flush timeout (the store is probably down). Nothing is lost: the writes stay
    /// queued and are retried.
    FlushTimeout {
        /// Writes from before the flush that were still waiting.
        pending: usize,
    },
    /// The cache already holds `max_dirty` entries waiting for the store (see
    /// [`Backpressure`](crate::Backpressure)); the write was not made. Retry later, shed load,
    /// or check the store's health.
    Backpressure {
        /// The shard's share of `max_dirty` that was reached.
        shard_limit: usize,
    },
    /// [`Cache::wait_durable`](crate::Cache::wait_durable) or
    /// [`Cache::flush_key`](crate::Cache::flush_key) gave up before the store held the write.
    /// The write is still queued.
    Timeout,
    /// A call from inside a `Store` callback that would wait for that callback: `flush` or
    /// `close` on a flusher thread; a write-through of a key whose write-through is in flight
    /// (the store writing, through the cache, the key it is being asked to write); or a write
    /// that would have to hold a flusher's core (a write-through under
    /// `Backpressure::WriteThrough`, or of a key with write-behind work still pending).
    Reentrant,
    /// The key belongs to a partition this cache does not own
    /// ([`Builder::partitions`](crate::Builder::partitions)): another instance serves it.
    NotOwner {
        /// The key's partition.
        partition: u32,
    },
    /// The builder was given a setting it cannot use.
    InvalidConfig {
        /// The builder method at fault.
        setting: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A thread a call needed could not be started: one of the cache's background threads
    /// at `build`, or, for a call of `AsyncCache` (feature `tokio`), a task on the Tokio
    /// runtime's blocking pool because the runtime is shutting down (the call did nothing).
    Spawn(Source),
    /// The journal ([`Builder::journal`](crate::Builder::journal)) could not take the write
    /// (a full disk, an I/O error, a codec that failed), or could not be opened at `build`
    /// (locked by another cache, corrupt). A refused write was not made: nothing of it is in
    /// memory or on disk. From an `EveryWrite` sync that failed, the write is in memory and
    /// reaches the store, but may not survive a power loss.
    Journal(std::sync::Arc<crate::journal::JournalError>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Closed => f.write_str("the cache is closed"),
            Error::Load(e) => write!(f, "read-through failed: {e}"),
            Error::Store(e) => write!(f, "store write failed: {e}"),
            Error::FlushTimeout { pending } => write!(
                f,
                "flush timed out with {pending} earlier write(s) not yet in the store; they stay queued and are retried"
            ),
            Error::Backpressure { shard_limit } => write!(
                f,
                "too many writes waiting for the store ({shard_limit} in this shard); write refused"
            ),
            Error::Timeout => f.write_str("timed out before the store held the write; it stays queued"),
            Error::Reentrant => f.write_str(
                "called from inside a Store callback (flush/close on a flusher thread, or a write-through that would wait for the call it is in); it would wait for itself",
            ),
            Error::NotOwner { partition } => write!(
                f,
                "the key is in partition {partition}, which this cache does not own; route it to its owner"
            ),
            Error::InvalidConfig { setting, reason } => {
                write!(f, "invalid cache configuration: {setting}: {reason}")
            }
            Error::Spawn(e) => write!(f, "could not start a thread: {e}"),
            Error::Journal(e) => write!(f, "journal: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Load(e) | Error::Store(e) => Some(e),
            Error::Spawn(e) => Some(&**e),
            Error::Journal(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<crate::journal::JournalError> for Error {
    fn from(e: crate::journal::JournalError) -> Self {
        Error::Journal(std::sync::Arc::new(e))
    }
}
