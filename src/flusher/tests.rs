//! Deterministic checks of the keys a niced worker's step leaves for its keeper (the
//! "leftover" keys in `FlusherCore::work` between steps). No flusher thread runs (manual
//! flushing), the clock moves only when a test or the store moves it, and every store batch
//! takes a whole `DELAY` of that clock: a worker's step is late after its first batch.

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
        assert!(core.step(&ctx0(&l.cache), WORKER));
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
        self.core().step(&ctx0(&self.cache), mode)
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
    let cx = &ctx0(&l.cache);
    {
        let core = l.core();
        assert!(!core.is_idle(cx));
        assert_eq!(core.next_wake(), Some(Duration::ZERO));
    }
    let m = l.cache.metrics();
    assert_eq!(m.dirty, 3);
    assert_eq!(m.oldest_unflushed_age, l.clock.now(), "put at time 0");
    assert!(l.step(KEEPER));
    {
        let core = l.core();
        assert!(core.is_idle(cx));
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
    let cx = &ctx0(&l.cache);
    let targets = cx
        .shards
        .iter()
        .map(|s| s.table.lock().next_version)
        .collect();
    let ticket = Arc::new(Ticket::new(targets, 1));
    let mut core = l.core();
    core.take_ticket(ticket.clone());
    // `true`: as once the ticket's full step has run (a worker's step after it may still
    // leave keys over, e.g. retry items the ticket waits on).
    core.settle_tickets(cx, true);
    assert!(matches!(ticket.outcome(), TicketOutcome::Pending(3)));
    assert!(core.step(cx, KEEPER));
    core.settle_tickets(cx, false);
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
            .step(&ctx0(&cache), KEEPER)
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
    let cx = &ctx0(&cache);
    let overdue_at = || cx.me.core.lock().worker_overdue_at(cx, clock.now(), WATCH);
    let overdue = || overdue_at() <= clock.now();
    let step = || cx.me.core.lock().step(cx, KEEPER);
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
        let core = cx.me.core.lock();
        assert_eq!(core.retry.len(), 1);
        core.backoff_until.expect("an unavailable store backs off")
    };
    assert!(!overdue(), "the backoff holds the retry back");
    let not_before = cx.me.core.lock().retry[0].not_before;
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
    let keeper = std::thread::spawn(move || {
        super::run(&inner.shared, &inner.flushers[0], super::Role::Keeper)
    });
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

/// The context of the cache's first (in these tests, only) flusher.
fn ctx0(cache: &Cache<u64, u64>) -> super::Ctx<'_, u64, u64> {
    cache.inner.ctx(&cache.inner.flushers[0])
}
