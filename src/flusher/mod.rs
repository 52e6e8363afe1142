//! [`Flusher`]: the background actor that owns a set of shards and writes their dirty keys
//! to the store. Its logic is [`FlusherCore::step`], which the thread loop calls and which
//! tests and model checks can call directly (manual flushing).
//!
//! One step, for every shard it selects (due; asked for by its capacity or backpressure;
//! overflowed; every armed one when the flusher's count trigger fired; or all of them when a
//! flush/close asks):
//! 1. disarm the shard's delay, close its epoch with one increment, drain its ring (and scan
//!    its table if the ring overflowed);
//! 2. add the retry items that are due;
//! 3. take a snapshot of each key under the shard lock (latest value and version; the entry
//!    becomes in-flight), in batches of at most `max_batch`;
//! 4. call `Store::write_all` with no cache lock held, catching panics;
//! 5. apply the outcome: persisted versions make entries clean, failures go to the retry
//!    list (the entry keeps its in-flight mark, so nothing else sends the key meanwhile),
//!    records rejected too often go to the failed-writes sink.
//!
//! Because one flusher owns a shard and its steps run one after another, a key is never in
//! two batches at once, and every batch carries the latest version: the store never sees a
//! key's versions go backwards.

mod outcome;
mod step;
mod thread;
mod ticket;

pub(crate) use outcome::{failures, split_superseded, superseded_error};
pub(crate) use thread::run;
pub(crate) use ticket::{Ticket, TicketOutcome};

use std::time::Duration;

use crate::metrics::FlusherStats;
use crate::shared::Shared;
use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use crate::sync::thread::Unparker;
use crate::sync::{Arc, CachePadded, Mutex};

/// How many keys a flusher snapshots per acquisition of a shard lock, to keep writers'
/// waits short.
pub(super) const SNAPSHOT_CHUNK: usize = 32;
/// The longest a flusher parks without a reason to wake (a safety net, not a poll).
pub(super) const MAX_PARK: Duration = Duration::from_secs(1);
/// A flusher's pause after a panic in user code cut its turn short; it doubles, up to
/// [`MAX_PARK`], while the panics repeat.
pub(super) const PANIC_PAUSE_MIN: Duration = Duration::from_millis(1);
/// A worker hands off before a batch once the oldest write of its step would be this part
/// of `write_delay` (a half) from its deadline (`since + write_delay`) when the batch ends
/// (taking as long as its last one): the keeper, at the application's priority, gets that
/// long to write the rest in time. A quarter was too little in the main job: a niced
/// batch's wall time under saturation varies by more than that.
pub(crate) const HANDOFF_RESERVE: u32 = 2;
/// ... or once the step has run this part of `write_delay` (an eighth), whichever is later.
/// Work a step takes because its delay is up is at its deadline already; this is how much
/// longer than a thread at the application's priority the worker may take over it.
pub(crate) const HANDOFF_GRACE: u32 = 8;
/// A keeper whose worker has the turn looks this often (this part of `write_delay`, within
/// [`KEEPER_WATCH_MIN`] and the flusher's longest park) for a step the worker owes and has
/// not started: a niced worker the CPU never gets to.
pub(crate) const KEEPER_WATCH: u32 = 8;
/// The keeper's shortest look interval, for tiny delays.
pub(crate) const KEEPER_WATCH_MIN: Duration = Duration::from_millis(5);

/// What a flusher works with: the cache's [`Shared`] state and this flusher's own handle.
/// Derefs to [`Shared`].
pub(crate) struct Ctx<'a, K, V> {
    pub(crate) shared: &'a Shared<K, V>,
    pub(crate) me: &'a Flusher<K>,
}

impl<K, V> std::ops::Deref for Ctx<'_, K, V> {
    type Target = Shared<K, V>;
    #[inline(always)]
    fn deref(&self) -> &Shared<K, V> {
        self.shared
    }
}

/// Requests for a flusher thread, posted by `flush` and `close`.
#[derive(Default)]
pub(crate) struct Mailbox {
    pub(super) tickets: Vec<Arc<Ticket>>,
    /// Set by `close`: drain what is pending, then exit at the latest at this time.
    pub(super) close_deadline: Option<Duration>,
    /// The flusher has stopped: a ticket posted now is answered `Closed` at once.
    pub(super) shut: bool,
}

/// What every thread shares about one flusher.
///
/// With [`crate::Builder::flusher_nice`] above 0 a flusher has two threads: the *worker*,
/// niced, which serves it, and the *keeper*, at the builder's priority, which parks until
/// the worker hands its work over (see [`Role`]). Otherwise the worker is the only thread.
pub(crate) struct Flusher<K> {
    pub(crate) core: Mutex<FlusherCore<K>>,
    /// The worker thread.
    pub(crate) unparker: Unparker,
    /// The keeper thread (empty without one).
    pub(crate) keeper: Unparker,
    /// The worker handed its work to the keeper, which serves the flusher until it has
    /// caught up; wakes go to the keeper meanwhile.
    pub(super) handed_off: AtomicBool,
    pub(super) mailbox: Mutex<Mailbox>,
    pub(crate) stats: FlusherStats,
    /// Keys pushed on this flusher's rings and not yet drained, as counted by the count
    /// trigger (in steps, so an estimate: see `Cache::after_push`).
    pub(super) queued: CachePadded<AtomicUsize>,
    /// The count trigger fired: the next step drains every armed shard of this flusher.
    pub(super) count_fired: AtomicBool,
}

impl<K> Flusher<K> {
    pub(crate) fn new(index: usize, owned: Vec<usize>, retry_base: Duration) -> Self {
        Flusher {
            core: Mutex::new(FlusherCore::new(index, owned, retry_base)),
            unparker: Unparker::default(),
            keeper: Unparker::default(),
            handed_off: AtomicBool::new(false),
            mailbox: Mutex::new(Mailbox::default()),
            stats: FlusherStats::default(),
            queued: CachePadded::new(AtomicUsize::new(0)),
            count_fired: AtomicBool::new(false),
        }
    }

    /// Counts `n` more queued keys; returns the new total.
    #[inline]
    pub(crate) fn count(&self, n: usize) -> usize {
        self.queued.fetch_add(n, Ordering::SeqCst) + n
    }

    /// Forgets `n` queued keys the flusher drained (never below zero: a drain also takes keys
    /// that were never counted).
    pub(super) fn uncount(&self, n: usize) {
        if n > 0 {
            let _ = self
                .queued
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                    Some(q.saturating_sub(n))
                });
        }
    }

    /// The keys counted so far.
    #[inline]
    pub(crate) fn counted(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Asks for a count-triggered step (once until the flusher takes it).
    #[inline]
    pub(crate) fn fire_count_trigger(&self) {
        if !self.count_fired.load(Ordering::SeqCst)
            && !self.count_fired.swap(true, Ordering::SeqCst)
        {
            self.wake();
        }
    }

    /// Wakes the thread serving the flusher: the keeper while the worker has handed its work
    /// over, else the worker (no-op in manual mode).
    ///
    /// A wake routed by a flag read just before a handoff (or the hand back) still reaches a
    /// step that sees its cause: each side unparks the other after changing the flag, and
    /// the cause was stored before the flag was read.
    #[inline]
    pub(crate) fn wake(&self) {
        if self.handed_off.load(Ordering::SeqCst) {
            self.keeper.unpark();
        } else {
            self.unparker.unpark();
        }
    }

    pub(crate) fn post_ticket(&self, t: Arc<Ticket>) {
        let mut mb = self.mailbox.lock();
        if mb.shut {
            t.abort_closed();
            return;
        }
        mb.tickets.push(t);
        drop(mb);
        self.wake();
    }

    /// After `close` stopped this flusher: answers every flush still waiting on it (and any
    /// posted later) with `Closed`, instead of letting it time out.
    pub(crate) fn shut(&self) {
        let waiting = {
            let mut mb = self.mailbox.lock();
            mb.shut = true;
            std::mem::take(&mut mb.tickets)
        };
        let mut core = self.core.lock();
        for t in waiting.iter().chain(core.tickets.iter().map(|(t, _)| t)) {
            t.abort_closed();
        }
        core.tickets.clear();
    }

    pub(crate) fn post_close(&self, deadline: Duration) {
        self.mailbox.lock().close_deadline = Some(deadline);
        self.unparker.unpark();
        self.keeper.unpark();
    }
}

pub(super) struct RetryItem<K> {
    pub(super) shard: usize,
    pub(super) key: K,
    /// Rejections of `version` so far.
    pub(super) attempts: u32,
    pub(super) version: u64,
    pub(super) not_before: Duration,
    /// When the oldest write this item carries was made, at the latest.
    pub(super) since: Duration,
}

/// A key to snapshot and send.
pub(super) struct Work<K> {
    pub(super) shard: usize,
    pub(super) key: K,
    /// For a retry: rejections so far and the version they were for.
    pub(super) retry: Option<(u32, u64)>,
    pub(super) since: Duration,
}

/// Per-write bookkeeping of a batch in flight.
pub(super) struct Meta {
    pub(super) shard: usize,
    pub(super) hash: u64,
    pub(super) first: u64,
    pub(super) attempts: u32,
    pub(super) since: Duration,
}

/// How a step treats time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepMode {
    /// Take every owned shard and every retry item, due or not (flush and close).
    pub(crate) full: bool,
    /// Call the store even while the unavailable-backoff runs (manual flush and close).
    pub(crate) ignore_backoff: bool,
    /// A niced worker's step: stop between two batches once it is late (see
    /// [`HANDOFF_RESERVE`] and [`HANDOFF_GRACE`]), leaving the rest for the keeper.
    pub(crate) hand_off_when_late: bool,
}

/// Which thread runs [`run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The only thread of its flusher (no nice).
    Sole,
    /// The niced thread that serves the flusher until its oldest write gets late.
    Worker,
    /// The thread at the builder's priority that serves the flusher from a handoff until
    /// nothing waiting is late any more, then hands back.
    Keeper,
}

/// The state one flusher keeps between steps. Only the flusher (thread or manual caller,
/// serialized by the mutex around it) touches it.
pub(crate) struct FlusherCore<K> {
    pub(super) owned: Vec<usize>,
    /// Per owned shard: when its open epoch must be flushed.
    pub(super) due: Vec<Option<Duration>>,
    pub(super) retry: Vec<RetryItem<K>>,
    pub(super) backoff_until: Option<Duration>,
    pub(super) backoff_next: Duration,
    pub(super) rng: u64,
    /// Flush tickets taken from the mailbox; `true` once a full step ran after taking it.
    pub(super) tickets: Vec<(Arc<Ticket>, bool)>,
    pub(super) scratch: Vec<K>,
    /// The keys of a step, kept between steps so their room is reused. Not empty between
    /// steps only after a worker's step stopped for a handoff: the next step sends these
    /// first.
    pub(super) work: Vec<Work<K>>,
    /// How long the worker's last batch took, wall time, capped at half the grace (see
    /// `time_batch`): a late check allows for one more.
    pub(super) batch_wall: Duration,
    /// When the next sweep of expired entries is due.
    pub(super) next_sweep: Duration,
    /// Journal bytes at which this flusher next checkpoints its shards (0: at the journal's
    /// `checkpoint_bytes`).
    pub(super) checkpoint_at: u64,
}

impl<K> FlusherCore<K> {
    /// The shards this flusher owns (`s % flushers == self's index`).
    pub(crate) fn owned(&self) -> &[usize] {
        &self.owned
    }

    pub(super) fn new(index: usize, owned: Vec<usize>, retry_base: Duration) -> Self {
        let n = owned.len();
        FlusherCore {
            owned,
            due: vec![None; n],
            retry: Vec::new(),
            backoff_until: None,
            backoff_next: retry_base,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1),
            tickets: Vec::new(),
            scratch: Vec::new(),
            work: Vec::new(),
            batch_wall: Duration::ZERO,
            next_sweep: Duration::ZERO,
            checkpoint_at: 0,
        }
    }
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests;
