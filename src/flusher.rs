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

use std::time::Duration;

use crate::cache::Inner;
use crate::error::FailedWrite;
use crate::error::{BatchError, StoreError};
use crate::guard::{call_store, catch};
use crate::metrics::FlusherStats;
use crate::shard::Table;
use crate::shard::NONE;
use crate::store::Write;
use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use crate::sync::thread::Unparker;
use crate::sync::{Arc, CachePadded, Condvar, Mutex};

/// How many keys a flusher snapshots per acquisition of a shard lock, to keep writers'
/// waits short.
const SNAPSHOT_CHUNK: usize = 32;
/// The longest a flusher parks without a reason to wake (a safety net, not a poll).
const MAX_PARK: Duration = Duration::from_secs(1);
/// A flusher's pause after a panic in user code cut its turn short; it doubles, up to
/// [`MAX_PARK`], while the panics repeat.
const PANIC_PAUSE_MIN: Duration = Duration::from_millis(1);

/// A flush barrier shared by all flushers: each completes its part once no write older than
/// the flush (per shard: a version below `targets[shard]`) is waiting in its shards.
pub(crate) struct Ticket {
    targets: Vec<u64>,
    state: Mutex<TicketState>,
    cv: Condvar,
}

#[derive(Default)]
struct TicketState {
    remaining: usize,
    rejected: usize,
    pending: usize,
    cancelled: bool,
    /// The cache closed before the flushers could settle the ticket.
    closed: bool,
}

/// How a flush ended.
pub(crate) enum TicketOutcome {
    Done { rejected: usize },
    Pending(usize),
    Closed,
}

impl Ticket {
    pub(crate) fn new(targets: Vec<u64>, flushers: usize) -> Self {
        Ticket {
            targets,
            state: Mutex::new(TicketState {
                remaining: flushers,
                ..TicketState::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn complete_part(&self) {
        let mut s = self.state.lock();
        s.remaining = s.remaining.saturating_sub(1);
        if s.remaining == 0 {
            self.cv.notify_all();
        }
    }

    fn note(&self, rejected: usize, pending: usize) {
        let mut s = self.state.lock();
        s.rejected += rejected;
        s.pending = pending;
    }

    fn is_cancelled(&self) -> bool {
        self.state.lock().cancelled
    }

    /// The cache closed: whoever waits on this ticket gets `Closed` at once.
    fn abort_closed(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        s.cancelled = true;
        self.cv.notify_all();
    }

    /// Waits until every flusher completed its part or `timeout` passes (then the ticket is
    /// cancelled so flushers drop it).
    pub(crate) fn wait(&self, timeout: Duration) -> TicketOutcome {
        // No deadline when the timeout is beyond what an `Instant` can hold.
        let deadline = std::time::Instant::now().checked_add(timeout);
        let mut s = self.state.lock();
        loop {
            if s.remaining == 0 {
                return TicketOutcome::Done {
                    rejected: s.rejected,
                };
            }
            if s.closed {
                return TicketOutcome::Closed;
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                s.cancelled = true;
                return TicketOutcome::Pending(s.pending.max(1));
            }
            self.cv.wait_for(&mut s, left);
        }
    }

    /// The state after manual steps.
    pub(crate) fn outcome(&self) -> TicketOutcome {
        let s = self.state.lock();
        if s.remaining == 0 {
            TicketOutcome::Done {
                rejected: s.rejected,
            }
        } else {
            TicketOutcome::Pending(s.pending.max(1))
        }
    }
}

/// Requests for a flusher thread, posted by `flush` and `close`.
#[derive(Default)]
pub(crate) struct Mailbox {
    tickets: Vec<Arc<Ticket>>,
    /// Set by `close`: drain what is pending, then exit at the latest at this time.
    close_deadline: Option<Duration>,
    /// The flusher has stopped: a ticket posted now is answered `Closed` at once.
    shut: bool,
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
    handed_off: AtomicBool,
    mailbox: Mutex<Mailbox>,
    pub(crate) stats: FlusherStats,
    /// Keys pushed on this flusher's rings and not yet drained, as counted by the count
    /// trigger (in steps, so an estimate: see `Cache::after_push`).
    queued: CachePadded<AtomicUsize>,
    /// The count trigger fired: the next step drains every armed shard of this flusher.
    count_fired: AtomicBool,
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
    fn uncount(&self, n: usize) {
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

struct RetryItem<K> {
    shard: usize,
    key: K,
    /// Rejections of `version` so far.
    attempts: u32,
    version: u64,
    not_before: Duration,
    /// When the oldest write this item carries was made, at the latest.
    since: Duration,
}

/// A key to snapshot and send.
struct Work<K> {
    shard: usize,
    key: K,
    /// For a retry: rejections so far and the version they were for.
    retry: Option<(u32, u64)>,
    since: Duration,
}

/// Per-write bookkeeping of a batch in flight.
struct Meta {
    shard: usize,
    hash: u64,
    first: u64,
    attempts: u32,
    since: Duration,
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
    index: usize,
    owned: Vec<usize>,
    /// Per owned shard: when its open epoch must be flushed.
    due: Vec<Option<Duration>>,
    retry: Vec<RetryItem<K>>,
    backoff_until: Option<Duration>,
    backoff_next: Duration,
    rng: u64,
    /// Flush tickets taken from the mailbox; `true` once a full step ran after taking it.
    tickets: Vec<(Arc<Ticket>, bool)>,
    scratch: Vec<K>,
    /// The keys of a step, kept between steps so their room is reused. Not empty between
    /// steps only after a worker's step stopped for a handoff: the next step sends these
    /// first.
    work: Vec<Work<K>>,
    /// How long the worker's last batch took, wall time, capped at half the grace (see
    /// `time_batch`): a late check allows for one more.
    batch_wall: Duration,
    /// When the next sweep of expired entries is due.
    next_sweep: Duration,
}

impl<K> FlusherCore<K> {
    fn new(index: usize, owned: Vec<usize>, retry_base: Duration) -> Self {
        let n = owned.len();
        FlusherCore {
            index,
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
        }
    }
}

impl<K: Clone + Eq + std::hash::Hash + Send + Sync + 'static> FlusherCore<K> {
    /// Adds a flush ticket to wait on (manual flush).
    pub(crate) fn take_ticket(&mut self, t: Arc<Ticket>) {
        self.tickets.push((t, false));
    }

    /// Runs one step; returns `false` if the store backoff made it skip the store.
    pub(crate) fn step<V>(&mut self, inner: &Inner<K, V>, mode: StepMode) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        inner.tick_clock();
        let now = inner.now();
        let delay = inner.config.write_delay;
        if inner.timed && now >= self.next_sweep {
            // Expired entries leave memory within `sweep_every` without a read touching them.
            self.next_sweep = now.saturating_add(inner.sweep_every);
            let coarse = inner.coarse_now();
            for &s in &self.owned {
                inner.shards[s].table.lock().sweep_expired(coarse);
            }
        }
        self.stamp_armed(inner, now);
        if !mode.ignore_backoff && self.backoff_until.is_some_and(|until| now < until) {
            self.publish_oldest(inner);
            return false;
        }

        // 1. Close epochs and drain rings of the selected shards. The count trigger selects
        // every armed shard: the batch then holds what the whole flusher has queued.
        let flusher = &inner.flushers[self.index];
        let counted = flusher.count_fired.swap(false, Ordering::SeqCst);
        let mut work = std::mem::take(&mut self.work);
        for slot in 0..self.owned.len() {
            let s = self.owned[slot];
            let shard = &inner.shards[s];
            let selected = mode.full
                || (counted && shard.armed.load(Ordering::SeqCst))
                || shard.triggered.load(Ordering::SeqCst)
                || shard.overflow.load(Ordering::SeqCst)
                || self.due[slot].is_some_and(|d| d <= now);
            if !selected {
                continue;
            }
            // When the shard's delay started: the oldest write drained now is no older.
            let since = match self.due[slot] {
                Some(d) => d.saturating_sub(delay),
                None => Self::armed_since(shard, now).unwrap_or(now),
            };
            self.due[slot] = None;
            shard.armed.store(false, Ordering::SeqCst);
            shard.triggered.store(false, Ordering::SeqCst);
            shard.table.lock().close_epoch();
            let overflow = shard.overflow.swap(false, Ordering::SeqCst);
            self.scratch.clear();
            shard.ring.drain_into(&mut self.scratch, mode.full);
            flusher.uncount(self.scratch.len());
            if overflow {
                shard.table.lock().scan_dirty(&mut self.scratch);
            }
            work.extend(self.scratch.drain(..).map(|key| Work {
                shard: s,
                key,
                retry: None,
                since,
            }));
        }

        // 2. Retry items that are due.
        let mut i = 0;
        while i < self.retry.len() {
            if mode.full || self.retry[i].not_before <= now {
                let r = self.retry.swap_remove(i);
                work.push(Work {
                    shard: r.shard,
                    key: r.key,
                    retry: Some((r.attempts, r.version)),
                    since: r.since,
                });
            } else {
                i += 1;
            }
        }
        let grace_until = mode
            .hand_off_when_late
            .then(|| now.saturating_add(delay / HANDOFF_GRACE));
        // A worker's step that stopped leaves the rest in `work`: that is the handoff.
        self.write_out(inner, &mut work, grace_until);
        self.work = work;
        self.publish_oldest(inner);
        true
    }

    /// [`FlusherCore::step`], surviving a panic in user code that escaped the finer guards
    /// (a key's `Hash` or `Eq`, a tracing subscriber, ...): the panic is logged and counted,
    /// health turns degraded, and [`FlusherCore::recover`] puts back what the step held.
    /// Returns what `step` returned, `false` after a panic.
    pub(crate) fn step_guarded<V>(&mut self, inner: &Inner<K, V>, mode: StepMode) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        self.guarded(inner, |core| core.step(inner, mode))
            .unwrap_or(false)
    }

    /// Runs `f` on this core; a panic in it is caught and recovered from as in
    /// [`FlusherCore::step_guarded`] (`None` then).
    pub(crate) fn guarded<V, R>(
        &mut self,
        inner: &Inner<K, V>,
        f: impl FnOnce(&mut Self) -> R,
    ) -> Option<R>
    where
        V: Clone + Send + Sync + 'static,
    {
        match catch(|| f(self)) {
            Ok(r) => Some(r),
            Err(msg) => {
                self.recover(inner, &msg);
                None
            }
        }
    }

    /// Puts the flusher back in a state from which nothing is lost after a panic cut a step
    /// short: every key the step or the retry list held in flight is released (and sent again:
    /// the versions make a repeat harmless), and every owned shard is marked overflowed, so
    /// the next step scans its table for dirty keys instead of trusting the drained rings.
    pub(crate) fn recover<V>(&mut self, inner: &Inner<K, V>, msg: &str)
    where
        V: Clone + Send + Sync + 'static,
    {
        inner.user_panicked("user code on the flush path", msg);
        let stats = &inner.flushers[self.index].stats;
        stats.mark_degraded(inner.now());
        // The lists' keys are dropped without running user code under a lock.
        let retry = std::mem::take(&mut self.retry);
        let work = std::mem::take(&mut self.work);
        for &s in &self.owned {
            let shard = &inner.shards[s];
            shard.table.lock().release_all_in_flight();
            shard.overflow.store(true, Ordering::SeqCst);
        }
        for r in retry {
            crate::guard::drop_quietly(r.key);
        }
        for w in work {
            crate::guard::drop_quietly(w.key);
        }
        self.scratch.clear();
        self.publish_oldest(inner);
    }

    /// Gives each armed shard without a deadline its deadline: its delay from the arming
    /// write's clock reading.
    fn stamp_armed<V>(&mut self, inner: &Inner<K, V>, now: Duration)
    where
        V: Clone + Send + Sync + 'static,
    {
        let delay = inner.config.write_delay;
        for (slot, &s) in self.owned.iter().enumerate() {
            if self.due[slot].is_none() {
                if let Some(at) = Self::armed_since(&inner.shards[s], now) {
                    self.due[slot] = Some(at.saturating_add(delay));
                }
            }
        }
    }

    /// When `shard` was armed, if it is: the arming writer's clock reading (see
    /// `Shard::armed_at`), never later than `now`.
    fn armed_since<V>(shard: &crate::shard::Shard<K, V>, now: Duration) -> Option<Duration> {
        if !shard.armed.load(Ordering::SeqCst) {
            return None;
        }
        let at = Duration::from_nanos(shard.armed_at.load(Ordering::SeqCst));
        Some(at.min(now))
    }

    /// When the worker is overdue with a step it has not started (see [`KEEPER_WATCH`]),
    /// judged at `now`: once a shard of this flusher has been armed for `write_delay` and
    /// `watch` more, or a retry item has been due for `watch`, and no store backoff holds the
    /// work back. At or before `now`, the keeper takes the turn; after it, the keeper sleeps
    /// until then. A shard that is not armed counts as armed at `now` (a write may arm it
    /// the next moment), so the time is never more than `write_delay` and `watch` away, and
    /// no write made after `now` makes the worker overdue sooner.
    pub(crate) fn worker_overdue_at<V>(
        &self,
        inner: &Inner<K, V>,
        now: Duration,
        watch: Duration,
    ) -> Duration
    where
        V: Clone + Send + Sync + 'static,
    {
        let late = inner.config.write_delay.saturating_add(watch);
        let armed = self
            .owned
            .iter()
            .map(|&s| Self::armed_since(&inner.shards[s], now).unwrap_or(now))
            .min()
            .unwrap_or(now)
            .saturating_add(late);
        let retry = self
            .retry
            .iter()
            .map(|r| r.not_before.saturating_add(watch))
            .min();
        let at = retry.map_or(armed, |r| r.min(armed));
        self.backoff_until.map_or(at, |until| at.max(until))
    }

    /// `true` after a worker's step that stopped for a handoff: keys are left for the
    /// keeper (`work` is empty between steps otherwise).
    pub(crate) fn handing_off(&self) -> bool {
        !self.work.is_empty()
    }

    /// When the oldest write waiting in this flusher was made (at the latest; see
    /// [`Self::publish_oldest`]), if any.
    fn oldest<V>(&self, inner: &Inner<K, V>) -> Option<Duration>
    where
        V: Clone + Send + Sync + 'static,
    {
        let delay = inner.config.write_delay;
        let armed = self
            .due
            .iter()
            .flatten()
            .map(|d| d.saturating_sub(delay))
            .min();
        let retry = self.retry.iter().map(|r| r.since).min();
        let left = self.work.iter().map(|w| w.since).min();
        [armed, retry, left].into_iter().flatten().min()
    }

    /// `true` once the keys a handoff left have been written (the keeper then hands back).
    pub(crate) fn caught_up(&self) -> bool {
        self.work.is_empty() && !self.wants_full_step()
    }

    /// Writes one key now, on the caller's thread (`Cache::flush_key`), whether or not its
    /// delay is up and ignoring the store backoff. Holding this core's lock keeps the
    /// flusher thread out meanwhile, so the key's order is kept.
    pub(crate) fn write_key<V>(&mut self, inner: &Inner<K, V>, shard: usize, key: K)
    where
        V: Clone + Send + Sync + 'static,
    {
        let mut work = Work {
            shard,
            key,
            retry: None,
            since: inner.now(),
        };
        if let Some(i) = self.retry.iter().position(|r| r.key == work.key) {
            let r = self.retry.swap_remove(i);
            work.retry = Some((r.attempts, r.version));
            work.since = r.since;
        }
        // A handed-off step may have left the key (a retry among them) for the keeper: it is
        // written here instead.
        self.work.retain(|w| {
            if w.key != work.key {
                return true;
            }
            work.retry = work.retry.or(w.retry);
            work.since = work.since.min(w.since);
            false
        });
        self.write_out(inner, &mut vec![work], None);
        // The key may have been the oldest write waiting here; the next oldest may be in a
        // shard armed since the last step.
        self.stamp_armed(inner, inner.now());
        self.publish_oldest(inner);
    }

    /// Snapshots the keys of `work` in batches of at most `max_batch`, sends and applies them.
    ///
    /// With `grace_until` (a niced worker's step: its start plus [`HANDOFF_GRACE`] of the
    /// delay), stops before a batch once the step is late: `work` then holds the keys not yet
    /// snapshotted, in order (the handoff).
    fn write_out<V>(
        &mut self,
        inner: &Inner<K, V>,
        work: &mut Vec<Work<K>>,
        grace_until: Option<Duration>,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        if work.is_empty() {
            return;
        }
        // When this step gets late: checked before each batch, the first included.
        let late_at = grace_until.and_then(|grace_until| {
            let delay = inner.config.write_delay;
            let oldest = work.iter().map(|w| w.since).min()?;
            let reserve_from = oldest
                .saturating_add(delay)
                .saturating_sub(delay / HANDOFF_RESERVE);
            Some(reserve_from.max(grace_until))
        });
        let max_batch = inner.config.max_batch;
        let ordered = work.len() > max_batch && Self::order_by_key(inner, work, max_batch);
        // Otherwise keys of one shard together, so snapshots take each lock once per chunk
        // (drained rings come shard by shard already; retries may not).
        if !ordered && !work.is_sorted_by_key(|w| w.shard) {
            work.sort_by_key(|w| w.shard);
        }
        let mut batch: Vec<Write<K, V>> = Vec::with_capacity(work.len().min(max_batch));
        let mut meta: Vec<Meta> = Vec::with_capacity(batch.capacity());
        let mut hashes = [0u64; SNAPSHOT_CHUNK];
        let mut i = 0;
        // When the batch being filled was started (timed only for a late check).
        let mut batch_started = None;
        while i < work.len() {
            if let (Some(at), true) = (late_at, batch.is_empty()) {
                // Late if the next batch, taking as long as the last one did, would end past
                // the step's lateness.
                let now = inner.now();
                if now.saturating_add(self.batch_wall) >= at {
                    // Nothing of `work[i..]` was snapshotted: the keys stay queued, in order,
                    // for the next step (the keeper's).
                    work.drain(..i);
                    return;
                }
                batch_started = Some(now);
            }
            // One chunk: keys of one shard, at most SNAPSHOT_CHUNK, no more than the batch
            // has room for.
            let s = work[i].shard;
            let room = (max_batch - batch.len()).min(SNAPSHOT_CHUNK);
            let mut end = i;
            while end < work.len() && work[end].shard == s && end - i < room {
                hashes[end - i] = inner.hash(&work[end].key);
                end += 1;
            }
            let mut table = inner.shards[s].table.lock();
            // First prefetch every entry of the chunk, then take the snapshots: the entries
            // were just written on the writers' cores, and the prefetches let their cache
            // misses overlap instead of coming one by one.
            for &hash in &hashes[..end - i] {
                table.prefetch(hash);
            }
            let mut surrendered = Vec::new();
            for (w, &hash) in work[i..end].iter().zip(&hashes) {
                match table.take(hash, &w.key, w.retry.is_some()) {
                    Ok(None) => {}
                    Ok(Some(snap)) => {
                        let attempts = match w.retry {
                            Some((a, v)) if v == snap.write.version() => a,
                            _ => 0,
                        };
                        batch.push(snap.write);
                        meta.push(Meta {
                            shard: s,
                            hash,
                            first: snap.first,
                            attempts,
                            since: w.since,
                        });
                    }
                    Err((version, msg)) => {
                        // The key's or value's `Clone` panicked: the key is in flight and
                        // this flusher's to retry, like a rejected record.
                        inner.user_panicked("a key's or value's Clone", &msg);
                        let attempts = 1 + match w.retry {
                            Some((a, v)) if v == version => a,
                            _ => 0,
                        };
                        if attempts >= inner.config.max_attempts && inner.sink_has_room() {
                            if let Some(given) = table.surrender(hash, &w.key) {
                                surrendered.push((given, attempts, msg));
                            }
                        } else {
                            let wait = self.rejected_backoff(inner, attempts);
                            self.retry_key(
                                inner,
                                &mut table,
                                (s, hash),
                                &w.key,
                                (attempts, version),
                                w.since,
                                wait,
                            );
                        }
                    }
                }
            }
            drop(table);
            for ((write, first), attempts, msg) in surrendered {
                self.surrender(inner, s, write, first, attempts, &msg);
            }
            i = end;
            if batch.len() == max_batch {
                self.send(inner, &mut batch, &mut meta);
                self.time_batch(inner, batch_started.take());
            }
        }
        work.clear();
        if !batch.is_empty() {
            self.send(inner, &mut batch, &mut meta);
            self.time_batch(inner, batch_started);
        }
    }

    /// Keeps how long a timed batch took, from its first snapshot to its last record marked.
    fn time_batch<V>(&mut self, inner: &Inner<K, V>, started: Option<Duration>)
    where
        V: Clone + Send + Sync + 'static,
    {
        if let Some(t) = started {
            // Capped at half the grace: a step's first late check comes a little after the
            // step began and passes whenever `batch_wall` is under the grace, so every worker
            // step writes (and times) at least one batch. A cap at the grace or above would
            // let one slow batch make every later step hand off before its first batch, and
            // so never time another: the keeper would write everything from then on.
            let cap = inner.config.write_delay / (2 * HANDOFF_GRACE);
            self.batch_wall = inner.now().saturating_sub(t).min(cap);
        }
    }

    /// [`crate::Builder::flush_order`]: sorts a backlog of more than one batch by key, then
    /// each batch-sized window by shard (a stable sort: the window keeps its keys, and the
    /// snapshots take each shard's lock once per chunk). Two work items of one key stay in
    /// the order they had, so a key's writes still go oldest first. Returns `false` (and
    /// leaves the order to the caller) without an order, or if it panicked.
    fn order_by_key<V>(inner: &Inner<K, V>, work: &mut [Work<K>], max_batch: usize) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        let Some(order) = &inner.flush_order else {
            return false;
        };
        // A panicking (or inconsistent) comparator leaves the slice a permutation of itself:
        // nothing is lost, the step just writes in shard order.
        let sorted = catch(|| work.sort_by(|a, b| order(&a.key, &b.key)));
        if sorted.is_err() {
            tracing::error!("the flush_order comparator panicked; this step writes in shard order");
            return false;
        }
        for window in work.chunks_mut(max_batch) {
            window.sort_by_key(|w| w.shard);
        }
        true
    }

    /// Publishes when the oldest write still waiting in this flusher's shards was made (at
    /// the latest: when its shard was armed, for a key a handoff left too, or when a
    /// retried write was first drained).
    fn publish_oldest<V>(&self, inner: &Inner<K, V>)
    where
        V: Clone + Send + Sync + 'static,
    {
        inner.flushers[self.index]
            .stats
            .set_oldest(self.oldest(inner));
    }

    /// Calls the store with `batch` and applies the outcome. Leaves both vectors empty.
    fn send<V>(&mut self, inner: &Inner<K, V>, batch: &mut Vec<Write<K, V>>, meta: &mut Vec<Meta>)
    where
        V: Clone + Send + Sync + 'static,
    {
        let stats = &inner.flushers[self.index].stats;
        FlusherStats::add(&stats.batches, 1);
        let started = std::time::Instant::now();
        let outcome = call_store(|| inner.store.write_all(batch));
        let took = started.elapsed();
        stats.record_batch(batch.len(), took);
        if took > inner.config.store_timeout {
            FlusherStats::add(&stats.slow_store_calls, 1);
            tracing::warn!(took = ?took, limit = ?inner.config.store_timeout, records = batch.len(), "a store call took longer than store_timeout");
        }
        let now = inner.now();
        let coarse = inner.coarse_now();
        if let Err(panic_msg) = &outcome {
            FlusherStats::add(&stats.store_panics, 1);
            tracing::error!(message = %panic_msg, "store panicked in write_all; treated as unavailable");
        }
        let failed = failures(outcome, batch.len());

        let any_unavailable = failed.iter().any(|(_, e)| e.is_unavailable());
        if any_unavailable {
            FlusherStats::add(&stats.store_unavailable, 1);
            if stats.mark_degraded(now) {
                tracing::warn!("store unavailable: health is now degraded");
            }
            let jittered = self.jitter(self.backoff_next);
            self.backoff_until = Some(now.saturating_add(jittered));
            self.backoff_next = self
                .backoff_next
                .saturating_mul(2)
                .min(inner.config.retry_max);
            tracing::debug!(failed = failed.len(), batch = batch.len(), backoff = ?jittered, "store unavailable; writes stay queued");
        } else {
            self.backoff_until = None;
            self.backoff_next = inner.config.retry_base;
            if stats.mark_healthy() {
                tracing::info!("store healthy again");
            }
        }

        if failed.is_empty() {
            // The common case, everything applied: mark the records persisted taking each
            // shard's lock once per run of its records (the batch is in shard order), at most
            // SNAPSHOT_CHUNK records per acquisition so writers wait no longer than they do
            // for a snapshot chunk. Never two shard locks at once.
            let mut i = 0;
            while i < batch.len() {
                let s = meta[i].shard;
                let mut end = i;
                while end < batch.len() && meta[end].shard == s && end - i < SNAPSHOT_CHUNK {
                    end += 1;
                }
                let mut table = inner.shards[s].table.lock();
                // Prefetch first, as for the snapshots (`write_out`).
                for m in &meta[i..end] {
                    table.prefetch(m.hash);
                }
                for k in i..end {
                    table.persisted(meta[k].hash, batch[k].key(), batch[k].version(), coarse);
                }
                i = end;
            }
            FlusherStats::add(&stats.records_written, batch.len() as u64);
            crate::guard::clear_quietly(batch);
            meta.clear();
            inner.notify_progress();
            return;
        }
        let mut failed = failed.into_iter().peekable();
        let mut written = 0u64;
        for (i, (write, m)) in batch.drain(..).zip(meta.drain(..)).enumerate() {
            let error = failed.next_if(|(fi, _)| *fi == i).map(|(_, e)| e);
            match error {
                None => {
                    let mut table = inner.shards[m.shard].table.lock();
                    table.persisted(m.hash, write.key(), write.version(), coarse);
                    drop(table);
                    written += 1;
                    crate::guard::drop_quietly(write);
                }
                Some(e) => self.settle_failed(inner, write, &m, e, now),
            }
        }
        FlusherStats::add(&stats.records_written, written);
        inner.notify_progress();
    }

    /// A record of a batch failed with `error`: it goes on the retry list (unavailable, or
    /// rejected fewer than `max_attempts` times, or the failed-writes sink is full), or to
    /// the failed-writes sink.
    fn settle_failed<V>(
        &mut self,
        inner: &Inner<K, V>,
        write: Write<K, V>,
        m: &Meta,
        error: StoreError,
        now: Duration,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        let stats = &inner.flushers[self.index].stats;
        let mut table = inner.shards[m.shard].table.lock();
        let (attempts, wait) = match error {
            StoreError::Unavailable(_) => (
                m.attempts,
                self.backoff_until.unwrap_or(now).saturating_sub(now),
            ),
            e @ StoreError::Rejected(_) => {
                FlusherStats::add(&stats.records_rejected, 1);
                let attempts = m.attempts + 1;
                if attempts < inner.config.max_attempts {
                    (attempts, self.rejected_backoff(inner, attempts))
                } else if inner.sink_has_room() {
                    table.abandon(m.hash, write.key(), write.version());
                    drop(table);
                    for (t, _) in &self.tickets {
                        if m.first < t.targets[m.shard] {
                            t.note(1, 0);
                        }
                    }
                    FlusherStats::add(&stats.failed_writes, 1);
                    tracing::error!(version = write.version(), attempts, error = %e, "store rejected a write too often; handed to the failed-writes sink");
                    inner.give_up(FailedWrite {
                        write,
                        error: e,
                        attempts,
                    });
                    return;
                } else {
                    // The sink is full: keep the write in the cache, dirty, and try again
                    // at the longest backoff until the application drains the sink.
                    FlusherStats::add(&stats.sink_full, 1);
                    tracing::warn!(
                        version = write.version(),
                        "failed-writes sink is full; the write stays queued"
                    );
                    (attempts, inner.config.retry_max)
                }
            }
        };
        if table.retry_later(m.hash, write.key(), m.first) {
            FlusherStats::add(&stats.retries, 1);
            self.retry_key(
                inner,
                &mut table,
                (m.shard, m.hash),
                write.key(),
                (attempts, write.version()),
                m.since,
                wait,
            );
        }
        drop(table);
        crate::guard::drop_quietly(write);
    }

    /// Puts a key this flusher holds in flight on its retry list, due after `wait`. If the
    /// key cannot be cloned for the list (its `Clone` panics), its mark is released instead and
    /// the shard's table scan finds it.
    #[allow(clippy::too_many_arguments)]
    fn retry_key<V>(
        &mut self,
        inner: &Inner<K, V>,
        table: &mut Table<K, V>,
        (shard, hash): (usize, u64),
        key: &K,
        (attempts, version): (u32, u64),
        since: Duration,
        wait: Duration,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        match catch(|| key.clone()) {
            Ok(key) => self.retry.push(RetryItem {
                shard,
                key,
                attempts,
                version,
                not_before: inner.now().saturating_add(wait),
                since,
            }),
            Err(msg) => {
                inner.user_panicked("a key's Clone", &msg);
                table.release(hash, key);
                inner.shards[shard].overflow.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Hands a write whose key or value cannot be cloned to the failed-writes sink (it was
    /// moved out of the table by [`Table::surrender`]).
    fn surrender<V>(
        &mut self,
        inner: &Inner<K, V>,
        shard: usize,
        write: Write<K, V>,
        first: u64,
        attempts: u32,
        msg: &str,
    ) where
        V: Clone + Send + Sync + 'static,
    {
        for (t, _) in &self.tickets {
            if first < t.targets[shard] {
                t.note(1, 0);
            }
        }
        FlusherStats::add(&inner.flushers[self.index].stats.failed_writes, 1);
        tracing::error!(
            version = write.version(),
            attempts,
            "a write's key or value could not be cloned; handed to the failed-writes sink"
        );
        inner.give_up(FailedWrite {
            write,
            error: StoreError::rejected(format!(
                "the key's or value's Clone panicked {attempts} time(s): {msg}"
            )),
            attempts,
        });
    }

    /// The wait before retrying a record rejected `attempts` times.
    fn rejected_backoff<V>(&self, inner: &Inner<K, V>, attempts: u32) -> Duration
    where
        V: Clone + Send + Sync + 'static,
    {
        inner
            .config
            .retry_base
            .saturating_mul(1 << attempts.saturating_sub(1).min(20))
            .min(inner.config.retry_max)
    }

    /// A wait between half and all of `d`, so flushers of many processes do not retry in step.
    fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift64: enough to spread retries, no need for a crate.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }

    /// Checks the flush tickets after a step: a ticket is done for this flusher once a full
    /// step ran after it was taken and no retry item holds a write older than the flush.
    pub(crate) fn settle_tickets<V>(&mut self, inner: &Inner<K, V>, ran_full_step: bool)
    where
        V: Clone + Send + Sync + 'static,
    {
        if self.tickets.is_empty() {
            return;
        }
        let mut k = 0;
        while k < self.tickets.len() {
            let (ticket, full_done) = &mut self.tickets[k];
            if ticket.is_cancelled() {
                self.tickets.swap_remove(k);
                continue;
            }
            *full_done |= ran_full_step;
            if !*full_done {
                k += 1;
                continue;
            }
            // Retry items, and keys a handed-off step left (retry items among them).
            let waiting = self.retry.iter().map(|r| (r.shard, &r.key));
            let left = self.work.iter().map(|w| (w.shard, &w.key));
            let pending = waiting
                .chain(left)
                .filter(|&(shard, key)| {
                    let hash = inner.hash(key);
                    let unsent = inner.shards[shard].table.lock().unsent_of(hash, key);
                    unsent != NONE && unsent < ticket.targets[shard]
                })
                .count();
            ticket.note(0, pending);
            if pending == 0 {
                ticket.complete_part();
                self.tickets.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }

    /// Whether a full step is owed to a ticket.
    pub(crate) fn wants_full_step(&self) -> bool {
        self.tickets.iter().any(|(_, done)| !done)
    }

    /// `true` when nothing is pending in this flusher's shards.
    pub(crate) fn is_idle<V>(&self, inner: &Inner<K, V>) -> bool
    where
        V: Clone + Send + Sync + 'static,
    {
        self.retry.is_empty()
            && self.work.is_empty()
            && self
                .owned
                .iter()
                .all(|&s| inner.shards[s].table.lock().dirty == 0)
    }

    /// When this flusher next has something to do, if anything.
    fn next_wake(&self) -> Option<Duration> {
        if !self.work.is_empty() {
            // At once, unless the store's backoff holds the keys back.
            return Some(self.backoff_until.unwrap_or(Duration::ZERO));
        }
        let due = self.due.iter().flatten().copied().min();
        let retry = self.retry.iter().map(|r| r.not_before).min();
        let retry = match (retry, self.backoff_until) {
            (Some(r), Some(b)) => Some(r.max(b)),
            (r, _) => r,
        };
        [due, retry].into_iter().flatten().min()
    }
}

/// What a store call's outcome (`Err`: the store panicked, with its message) means for each
/// record of a batch of `len`: the indices that failed and why, in order; empty when
/// everything was applied. The flushers and the write-through path share it.
///
/// A `Partial` that does not account for the batch (an empty list, or an index outside it)
/// is treated as `Unavailable`: nothing is known to be applied, so the whole batch is retried,
/// which the store's version guard makes harmless.
pub(crate) fn failures(
    outcome: Result<Result<(), BatchError>, String>,
    len: usize,
) -> Vec<(usize, StoreError)> {
    let all = |e: StoreError| (0..len).map(|i| (i, e.clone())).collect();
    match outcome {
        Ok(Ok(())) => Vec::new(),
        Ok(Err(BatchError::Unavailable(e))) => all(StoreError::Unavailable(e)),
        Ok(Err(BatchError::Partial(mut list))) => {
            if list.is_empty() || list.iter().any(|(i, _)| *i >= len) {
                tracing::warn!(
                    batch = len,
                    reported = ?list.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                    "the store's Partial does not account for the batch; retrying it whole"
                );
                return all(StoreError::unavailable(
                    "the store answered with a Partial that does not account for the batch",
                ));
            }
            list.sort_by_key(|(i, _)| *i);
            list.dedup_by_key(|(i, _)| *i);
            list
        }
        Err(panic_msg) => all(StoreError::unavailable(format!(
            "store panicked: {panic_msg}"
        ))),
    }
}

/// The body of a flusher thread in `role`: turns until a close is done. A panic that escapes
/// a turn (user code: a key's `Hash`, a value's `Drop`, a tracing subscriber) is caught, the
/// flusher recovers ([`FlusherCore::recover`]) and goes on after a pause that doubles while
/// panics repeat, so the thread never dies and never spins.
pub(crate) fn run<K, V>(inner: Arc<Inner<K, V>>, index: usize, role: Role)
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let _engine = crate::guard::EngineScope::enter();
    let me = &inner.flushers[index];
    let max_park = if inner.timed { inner.tick } else { MAX_PARK };
    let watch = (inner.config.write_delay / KEEPER_WATCH)
        .clamp(KEEPER_WATCH_MIN, max_park.max(KEEPER_WATCH_MIN));
    let mut pause = PANIC_PAUSE_MIN;
    loop {
        match catch(|| turn(&inner, index, role, max_park, watch)) {
            Ok(true) => return,
            Ok(false) => pause = PANIC_PAUSE_MIN,
            Err(msg) => {
                me.core.lock().recover(&inner, &msg);
                let deadline = me.mailbox.lock().close_deadline;
                if deadline.is_some_and(|d| inner.now() >= d) {
                    return;
                }
                crate::sync::thread::park_timeout(pause);
                pause = pause.saturating_mul(2).min(MAX_PARK);
            }
        }
    }
}

/// One turn of a flusher thread's loop; `true` once the thread should end (a close is done).
fn turn<K, V>(
    inner: &Arc<Inner<K, V>>,
    index: usize,
    role: Role,
    max_park: Duration,
    watch: Duration,
) -> bool
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let me = &inner.flushers[index];
    // A worker whose work the keeper has, or a keeper with nothing handed over, parks
    // (both serve a close).
    let turn = match role {
        Role::Sole => true,
        Role::Worker => !me.handed_off.load(Ordering::SeqCst),
        Role::Keeper => me.handed_off.load(Ordering::SeqCst),
    };
    if !turn && me.mailbox.lock().close_deadline.is_none() {
        // The coarse clock must not stop while a starved worker is the one to tick it.
        inner.tick_clock();
        if role == Role::Keeper {
            // A worker that holds the core is running; one that owes a step and has not
            // started it may be starved: the keeper takes the turn, steps and hands back.
            // Otherwise it sleeps until the worker could next be overdue (an idle
            // flusher's keeper so wakes once per delay, or per longest park), or, while
            // the worker is stepping, for the watch.
            let now = inner.now();
            let overdue_at = me
                .core
                .try_lock()
                .map(|core| core.worker_overdue_at(inner, now, watch));
            match overdue_at {
                Some(at) if at <= now => {
                    FlusherStats::add(&me.stats.takeovers, 1);
                    me.handed_off.store(true, Ordering::SeqCst);
                    return false;
                }
                Some(at) => crate::sync::thread::park_timeout((at - now).min(max_park)),
                None => crate::sync::thread::park_timeout(watch),
            }
        } else {
            crate::sync::thread::park_timeout(max_park);
        }
        return false;
    }
    let (new_tickets, close_deadline) = {
        let mut mb = me.mailbox.lock();
        (std::mem::take(&mut mb.tickets), mb.close_deadline)
    };
    let mut core = me.core.lock();
    for t in new_tickets {
        core.take_ticket(t);
    }
    let closing = close_deadline.is_some();
    let full = closing || core.wants_full_step();
    let ran = core.step(
        inner,
        StepMode {
            full,
            ignore_backoff: false,
            hand_off_when_late: role == Role::Worker && !full,
        },
    );
    core.settle_tickets(inner, ran && full);
    if role == Role::Worker && !core.retry.is_empty() {
        // The keeper sleeps until the worker could be overdue, and a retry item made by
        // this step may be due before that: it looks again.
        me.keeper.unpark();
    }
    let now = inner.now();
    if let Some(deadline) = close_deadline {
        if core.is_idle(inner) || now >= deadline {
            return true;
        }
    }
    if !closing {
        let hand_over = match role {
            Role::Sole => false,
            Role::Worker => core.handing_off(),
            Role::Keeper => core.caught_up(),
        };
        if hand_over {
            drop(core);
            // The flag first, then the unpark: the other thread's next look at the flag
            // finds its turn, and a wake routed to this thread meanwhile is covered by
            // the other's step.
            if role == Role::Worker {
                FlusherStats::add(&me.stats.handoffs, 1);
                me.handed_off.store(true, Ordering::SeqCst);
                me.keeper.unpark();
            } else {
                me.handed_off.store(false, Ordering::SeqCst);
                me.unparker.unpark();
            }
            return false;
        }
    }
    let mut wake = core.next_wake();
    if core.wants_full_step() {
        wake = core.backoff_until.or(Some(now));
    }
    if let Some(deadline) = close_deadline {
        wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
    }
    drop(core);
    let sleep = wake.map_or(max_park, |w| w.saturating_sub(now).min(max_park));
    if !sleep.is_zero() {
        crate::sync::thread::park_timeout(sleep);
    }

    false
}

/// Deterministic checks of the keys a niced worker's step leaves for its keeper (the
/// "leftover" keys in `FlusherCore::work` between steps). No flusher thread runs (manual
/// flushing), the clock moves only when a test or the store moves it, and every store batch
/// takes a whole `DELAY` of that clock: a worker's step is late after its first batch.
#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{FlusherCore, StepMode, Ticket, TicketOutcome};
    use crate::error::{BatchError, StoreError};
    use crate::store::{Store, Write};
    use crate::sync::MutexGuard;
    use crate::testing::FaultyStore;
    use crate::{Cache, Clock, ManualClock};

    const DELAY: Duration = Duration::from_millis(100);
    /// The store backoff after an unavailable batch (base and max alike: a test knows how far
    /// to move the clock to end it).
    const BACKOFF: Duration = Duration::from_millis(40);
    const KEYS: u64 = 5;
    const MAX_BATCH: usize = 2;
    const WORKER: StepMode = StepMode {
        full: false,
        ignore_backoff: false,
        hand_off_when_late: true,
    };
    /// A keeper's step (a sole flusher's and `flush_step`'s too).
    const KEEPER: StepMode = StepMode {
        full: false,
        ignore_backoff: false,
        hand_off_when_late: false,
    };

    /// Every batch takes `DELAY` of the test's clock, then the faulty store applies it.
    struct SlowStore {
        faulty: Arc<FaultyStore<u64, u64>>,
        clock: Arc<ManualClock>,
    }

    impl Store<u64, u64> for SlowStore {
        fn load(&self, key: &u64) -> Result<Option<u64>, StoreError> {
            self.faulty.load(key)
        }

        fn write_all(&self, batch: &[Write<u64, u64>]) -> Result<(), BatchError> {
            self.clock.advance(DELAY);
            self.faulty.write_all(batch)
        }
    }

    /// A cache whose one flusher holds leftover keys: keys `0..KEYS` were put at time 0
    /// (value `10 * k`), their delay is up, and a worker's step wrote one batch, was then
    /// late and handed the rest off.
    struct Leftover {
        cache: Cache<u64, u64>,
        store: Arc<FaultyStore<u64, u64>>,
        clock: Arc<ManualClock>,
    }

    impl Leftover {
        /// With `retried`, every key's first attempt failed (the store was down for a
        /// keeper's step) and the worker's step took the keys from the retry list: the
        /// leftover keys are retry items, which own their entries' in-flight marks.
        fn new(retried: bool) -> Self {
            let clock = Arc::new(ManualClock::new());
            let store = Arc::new(FaultyStore::new());
            let slow = SlowStore {
                faulty: store.clone(),
                clock: clock.clone(),
            };
            let cache = manual_builder(slow, &clock)
                .max_batch(MAX_BATCH)
                .build()
                .unwrap();
            let l = Leftover {
                cache,
                store,
                clock,
            };
            for k in 0..KEYS {
                l.cache.put(k, 10 * k).unwrap();
            }
            l.clock.advance(DELAY);
            if retried {
                l.store.set_down(true);
                assert!(l.step(KEEPER));
                l.store.heal();
                assert_eq!(l.core().retry.len(), KEYS as usize);
                l.clock.advance(BACKOFF);
            }
            let sent = l.store.calls().len();
            let mut core = l.core();
            assert!(core.step(&l.cache.inner, WORKER));
            assert!(core.handing_off(), "the worker's step hands off");
            drop(core);
            let written = l.batches(sent);
            assert_eq!(written.len(), 1, "one batch, then the step was late");
            let mut all: Vec<u64> = written[0].iter().map(|&(k, _)| k).collect();
            assert_eq!(all.len(), MAX_BATCH);
            all.extend(l.left());
            all.sort_unstable();
            assert_eq!(all, (0..KEYS).collect::<Vec<_>>(), "written or left, once");
            l
        }

        fn core(&self) -> MutexGuard<'_, FlusherCore<u64>> {
            self.cache.inner.flushers[0].core.lock()
        }

        fn step(&self, mode: StepMode) -> bool {
            self.core().step(&self.cache.inner, mode)
        }

        /// The leftover keys, in the order the next step sends them.
        fn left(&self) -> Vec<u64> {
            self.core().work.iter().map(|w| w.key).collect()
        }

        /// The (key, value) records of every store call from the `from`th on.
        fn batches(&self, from: usize) -> Vec<Vec<(u64, u64)>> {
            self.store.calls()[from..]
                .iter()
                .map(|c| {
                    let record = |w: &Write<u64, u64>| (*w.key(), *w.value().unwrap());
                    c.batch.iter().map(record).collect()
                })
                .collect()
        }
    }

    /// The keeper's step (no handoff) writes every leftover key, in the order they were
    /// left, each once and with its latest value; the flusher has then caught up.
    #[test]
    fn the_keepers_step_writes_each_leftover_key_once_with_its_latest_value() {
        let l = Leftover::new(false);
        assert_eq!(l.batches(0), [vec![(0, 0), (1, 10)]]);
        assert_eq!(l.left(), [2, 3, 4]);
        assert!(!l.core().caught_up());
        // A newer value: the write queues key 3 again (its shard's delay starts now).
        l.cache.put(3, 31).unwrap();
        assert!(l.step(KEEPER));
        assert!(l.core().caught_up());
        assert!(l.left().is_empty());
        assert_eq!(l.batches(1), [vec![(2, 20), (3, 31)], vec![(4, 40)]]);
        // Key 3's second queueing comes due: nothing is left to send.
        l.clock.advance(DELAY);
        assert!(l.step(KEEPER));
        assert_eq!(l.store.calls().len(), 3);
        assert_eq!(l.cache.metrics().dirty, 0);
    }

    /// `Cache::flush_key` of a leftover key (`FlusherCore::write_key`) writes its latest
    /// value at once and takes it out of the leftovers; the others stay queued, unsent, and
    /// the keeper's step does not send the flushed key again.
    #[test]
    fn flush_key_writes_a_leftover_key_and_takes_it_out_of_the_leftovers() {
        let l = Leftover::new(false);
        assert_eq!(l.left(), [2, 3, 4]);
        l.cache.put(3, 31).unwrap();
        l.cache.flush_key(&3).unwrap();
        assert_eq!(l.batches(1), [vec![(3, 31)]]);
        assert_eq!(l.left(), [2, 4]);
        assert_eq!(l.store.memory().get(&2), None);
        assert_eq!(l.store.memory().get(&4), None);
        assert!(l.step(KEEPER));
        assert_eq!(l.batches(2), [vec![(2, 20), (4, 40)]]);
    }

    /// A leftover key that is a retry item: `write_key` carries its retry mark over, or the
    /// snapshot would find the entry in flight (owned by the retry) and send nothing.
    #[test]
    fn flush_key_writes_a_leftover_retry_item() {
        let l = Leftover::new(true);
        let left = l.left();
        let sent = l.store.calls().len();
        let k = left[0];
        l.cache.flush_key(&k).unwrap();
        assert_eq!(l.batches(sent), [vec![(k, 10 * k)]]);
        assert_eq!(l.left(), left[1..]);
    }

    /// A leftover key `flush_key` fails to write goes to the retry list with the age it had
    /// as a leftover, not the time of the call.
    #[test]
    fn a_leftover_key_that_flush_key_fails_to_write_keeps_its_age() {
        let l = Leftover::new(false);
        l.store.set_down(true);
        for k in l.left() {
            assert!(l.cache.flush_key(&k).is_err());
        }
        assert!(l.left().is_empty());
        assert_eq!(l.core().retry.len(), 3);
        // A step (skipped: the store backs off) publishes the oldest write's age.
        assert!(!l.step(KEEPER));
        assert_eq!(
            l.cache.metrics().oldest_unflushed_age,
            l.clock.now(),
            "the keys were put at time 0"
        );
    }

    /// While leftover keys wait, the flusher is not idle, wants to run at once, and counts
    /// their age as the oldest unflushed; the keeper's step clears all three.
    #[test]
    fn leftover_keys_keep_the_flusher_busy_and_count_as_the_oldest_writes() {
        let l = Leftover::new(false);
        let inner = &l.cache.inner;
        {
            let core = l.core();
            assert!(!core.is_idle(inner));
            assert_eq!(core.next_wake(), Some(Duration::ZERO));
        }
        let m = l.cache.metrics();
        assert_eq!(m.dirty, 3);
        assert_eq!(m.oldest_unflushed_age, l.clock.now(), "put at time 0");
        assert!(l.step(KEEPER));
        {
            let core = l.core();
            assert!(core.is_idle(inner));
            assert_eq!(core.next_wake(), None);
        }
        assert_eq!(l.cache.metrics().oldest_unflushed_age, Duration::ZERO);
    }

    /// A store backoff holds leftover keys back: the flusher wakes when it ends, not at
    /// once; a step meanwhile sends nothing; the first step after it sends them.
    #[test]
    fn leftover_keys_wait_for_the_store_backoff() {
        let l = Leftover::new(false);
        l.store.set_down(true);
        assert!(l.cache.flush_key(&2).is_err(), "the store is down");
        l.store.heal();
        assert_eq!(l.left(), [3, 4]);
        let until = l
            .core()
            .backoff_until
            .expect("an unavailable store backs off");
        assert!(until > l.clock.now());
        assert_eq!(l.core().next_wake(), Some(until));
        let sent = l.store.calls().len();
        assert!(!l.step(KEEPER), "the step waits for the backoff");
        assert_eq!(l.store.calls().len(), sent);
        assert_eq!(l.left(), [3, 4]);
        l.clock.advance(until - l.clock.now());
        assert!(l.step(KEEPER));
        assert_eq!(l.batches(sent), [vec![(3, 30), (4, 40)], vec![(2, 20)]]);
        assert!(l.core().caught_up());
    }

    /// A flush ticket is not done while leftover keys written before it wait, and is once
    /// the keeper's step has written them.
    #[test]
    fn a_flush_ticket_waits_for_the_leftover_keys() {
        let l = Leftover::new(false);
        let inner = &l.cache.inner;
        let targets = inner
            .shards
            .iter()
            .map(|s| s.table.lock().next_version)
            .collect();
        let ticket = Arc::new(Ticket::new(targets, 1));
        let mut core = l.core();
        core.take_ticket(ticket.clone());
        // `true`: as once the ticket's full step has run (a worker's step after it may still
        // leave keys over, e.g. retry items the ticket waits on).
        core.settle_tickets(inner, true);
        assert!(matches!(ticket.outcome(), TicketOutcome::Pending(3)));
        assert!(core.step(inner, KEEPER));
        core.settle_tickets(inner, false);
        assert!(matches!(
            ticket.outcome(),
            TicketOutcome::Done { rejected: 0 }
        ));
    }

    /// A slow batch does not leave the worker handing off for good: every later worker step
    /// still writes (and times) its first batch before it asks whether it is late.
    #[test]
    fn after_a_slow_batch_each_worker_step_still_writes_its_first_batch() {
        let l = Leftover::new(false);
        assert!(l.step(KEEPER));
        assert!(l.core().caught_up());
        for round in 1..=3u64 {
            for k in 0..KEYS {
                l.cache.put(k, 100 * round + k).unwrap();
            }
            l.clock.advance(DELAY);
            let sent = l.store.calls().len();
            assert!(l.step(WORKER));
            assert!(l.core().handing_off(), "round {round}: each batch is slow");
            assert_eq!(
                l.batches(sent).len(),
                1,
                "round {round}: the worker wrote one batch before handing off"
            );
            assert!(l.step(KEEPER));
            assert!(l.core().caught_up());
        }
    }

    /// `flush_key` of the oldest write waiting (a retry item here) updates the oldest-write
    /// figure at once, not at the flusher's next step.
    #[test]
    fn flush_key_of_the_oldest_write_updates_the_oldest_age() {
        let clock = Arc::new(ManualClock::new());
        let store = Arc::new(FaultyStore::new());
        let cache = manual_builder(store.clone(), &clock).build().unwrap();
        let step = || {
            cache.inner.flushers[0]
                .core
                .lock()
                .step(&cache.inner, KEEPER)
        };
        cache.put(1, 10).unwrap();
        clock.advance(DELAY);
        store.set_down(true);
        assert!(
            step(),
            "key 1's first attempt fails: a retry item written at 0"
        );
        store.heal();
        clock.advance(BACKOFF);
        cache.put(2, 20).unwrap();
        let second = clock.now();
        clock.advance(DELAY / 4);
        assert_eq!(
            cache.metrics().oldest_unflushed_age,
            clock.now(),
            "key 1's age"
        );
        cache.flush_key(&1).unwrap();
        assert_eq!(store.memory().get(&1), Some(10));
        assert_eq!(
            cache.metrics().oldest_unflushed_age,
            clock.now() - second,
            "key 2 is now the oldest write waiting"
        );
    }

    /// `cond()` within `timeout` of real time (for a thread's progress, not for timing).
    fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cond()
    }

    /// A manual-flushing cache's builder on the test's clock, with one shard and the test's
    /// delay and backoff.
    fn manual_builder<S: Store<u64, u64>>(
        store: S,
        clock: &Arc<ManualClock>,
    ) -> crate::Builder<u64, u64> {
        Cache::builder(store)
            .manual_flushing()
            .clock(clock.clone())
            .shards(1)
            .write_delay(DELAY)
            .retry_backoff(BACKOFF, BACKOFF)
    }

    /// The keeper's look for a starved worker: a shard armed for the delay and the watch
    /// more, or a retry item due for the watch, and no store backoff.
    #[test]
    fn a_worker_is_overdue_after_its_deadline_and_the_watch_unless_the_store_backs_off() {
        const WATCH: Duration = Duration::from_millis(10);
        let clock = Arc::new(ManualClock::new());
        let store = Arc::new(FaultyStore::new());
        let cache = manual_builder(store.clone(), &clock).build().unwrap();
        let inner = &cache.inner;
        let overdue_at = || {
            inner.flushers[0]
                .core
                .lock()
                .worker_overdue_at(inner, clock.now(), WATCH)
        };
        let overdue = || overdue_at() <= clock.now();
        let step = || inner.flushers[0].core.lock().step(inner, KEEPER);
        assert!(!overdue(), "nothing armed");
        assert_eq!(
            overdue_at(),
            clock.now() + DELAY + WATCH,
            "nothing armed: a write made now would be overdue this late"
        );
        clock.advance(Duration::from_millis(3));
        let armed = clock.now();
        cache.put(1, 10).unwrap();
        clock.advance(DELAY + WATCH - Duration::from_millis(1));
        assert!(!overdue(), "the worker still has part of the watch");
        assert_eq!(
            overdue_at(),
            armed + DELAY + WATCH,
            "the time counts from the arming write, not from now"
        );
        clock.advance(Duration::from_millis(1));
        assert!(overdue(), "armed for the delay and the watch");
        assert!(step());
        assert!(!overdue(), "the step drained the shard");
        assert_eq!(overdue_at(), clock.now() + DELAY + WATCH, "idle again");
        // A failed batch: the key is a retry item, and the store backs off.
        cache.put(2, 20).unwrap();
        clock.advance(DELAY + WATCH);
        store.set_down(true);
        assert!(step());
        store.heal();
        let until = {
            let core = inner.flushers[0].core.lock();
            assert_eq!(core.retry.len(), 1);
            core.backoff_until.expect("an unavailable store backs off")
        };
        assert!(!overdue(), "the backoff holds the retry back");
        let not_before = inner.flushers[0].core.lock().retry[0].not_before;
        assert_eq!(
            overdue_at(),
            (not_before + WATCH).max(until),
            "the retry's time, held back by the backoff"
        );
        clock.advance(until - clock.now() + WATCH - Duration::from_millis(1));
        assert!(!overdue(), "the retry is due, but not for the whole watch");
        clock.advance(Duration::from_millis(1));
        assert!(overdue(), "the retry has been due for the watch");
    }

    /// A keeper whose worker never runs (no worker thread at all here) writes a key once its
    /// deadline and the watch have passed, counts a handoff and hands the turn back.
    #[test]
    fn a_keeper_takes_over_from_a_worker_that_never_runs() {
        let clock = Arc::new(ManualClock::new());
        let store = Arc::new(FaultyStore::new());
        let cache = manual_builder(store.clone(), &clock).build().unwrap();
        let inner = cache.inner.clone();
        let keeper = std::thread::spawn(move || super::run(inner, 0, super::Role::Keeper));
        cache.inner.flushers[0].keeper.set(keeper.thread().clone());
        cache.put(1, 10).unwrap();
        // The keeper sleeps (real time) until the worker could be overdue by the test's
        // clock, at most the delay and the watch; the clock then says it is.
        clock.advance(DELAY + DELAY / super::KEEPER_WATCH);
        let written = eventually(Duration::from_secs(10), || {
            store.memory().get(&1) == Some(10)
        });
        assert!(written, "the keeper wrote the overdue key");
        let m = cache.metrics();
        assert!(m.flusher_takeovers >= 1, "a takeover, counted");
        assert_eq!(m.flusher_handoffs, 0, "no worker asked");
        let handed_back = eventually(Duration::from_secs(10), || {
            !cache.inner.flushers[0]
                .handed_off
                .load(super::Ordering::SeqCst)
        });
        assert!(handed_back, "the keeper caught up and handed the turn back");
        cache.inner.flushers[0].post_close(Duration::ZERO);
        keeper.join().unwrap();
    }
}
