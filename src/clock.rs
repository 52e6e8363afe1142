//! Time for the flushers: a monotonic [`Clock`] (on the put path, only the write that arms
//! a shard's delay reads it), which tests and models can drive ([`ManualClock`]).

use std::time::{Duration, Instant};

use crate::sync::atomic::{AtomicU64, Ordering};

/// A monotonic clock: the time since an arbitrary origin fixed when the clock was made.
///
/// The engine reads it on flusher threads (and in `flush`/`close`), and on the put path only
/// in the write that arms a shard's delay (once per shard and flush window).
pub trait Clock: Send + Sync + 'static {
    /// Time since the clock's origin. Must never go backwards.
    fn now(&self) -> Duration;

    /// Wall-clock time since the Unix epoch. A cache over a store that hands out no
    /// generation ([`Store::generation`](crate::Store::generation)) starts its versions
    /// there; nothing else reads it. Default: the system's clock.
    fn since_unix_epoch(&self) -> Duration {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// The real clock ([`Instant`]).
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to, for tests and model checks.
///
/// ```
/// use std::time::Duration;
/// use writebehind::{Clock, ManualClock};
/// let clock = ManualClock::new();
/// clock.advance(Duration::from_millis(5));
/// assert_eq!(clock.now(), Duration::from_millis(5));
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        ManualClock {
            nanos: AtomicU64::new(0),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let add = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(add, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}
