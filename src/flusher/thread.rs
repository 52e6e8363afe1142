//! The thread of a flusher: its loop of turns (a step, then a park until the next reason to
//! wake), the worker/keeper handoff, and the catch that keeps the thread alive through a panic.

use std::time::Duration;

use super::{
    Ctx, Flusher, Role, StepMode, KEEPER_WATCH, KEEPER_WATCH_MIN, MAX_PARK, PANIC_PAUSE_MIN,
};
use crate::guard::catch;
use crate::metrics::FlusherStats;
use crate::shared::Shared;
use crate::sync::atomic::Ordering;

/// The body of a flusher thread in `role`: turns until a close is done. A panic that escapes
/// a turn (user code: a key's `Hash`, a value's `Drop`, a tracing subscriber) is caught, the
/// flusher recovers ([`FlusherCore::recover`]) and goes on after a pause that doubles while
/// panics repeat, so the thread never dies and never spins.
pub(crate) fn run<K, V>(shared: &Shared<K, V>, me: &Flusher<K>, role: Role)
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let _engine = crate::guard::EngineScope::enter();
    let cx = Ctx { shared, me };
    let max_park = if cx.timed { cx.tick } else { MAX_PARK };
    let watch = (cx.config.write_delay / KEEPER_WATCH)
        .clamp(KEEPER_WATCH_MIN, max_park.max(KEEPER_WATCH_MIN));
    let mut pause = PANIC_PAUSE_MIN;
    loop {
        match catch(|| turn(&cx, role, max_park, watch)) {
            Ok(true) => return,
            Ok(false) => pause = PANIC_PAUSE_MIN,
            Err(msg) => {
                me.core.lock().recover(&cx, &msg);
                let deadline = me.mailbox.lock().close_deadline;
                if deadline.is_some_and(|d| cx.now() >= d) {
                    return;
                }
                crate::sync::thread::park_timeout(pause);
                pause = pause.saturating_mul(2).min(MAX_PARK);
            }
        }
    }
}

/// One turn of a flusher thread's loop; `true` once the thread should end (a close is done).
fn turn<K, V>(cx: &Ctx<'_, K, V>, role: Role, max_park: Duration, watch: Duration) -> bool
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let me = cx.me;
    // A worker whose work the keeper has, or a keeper with nothing handed over, parks
    // (both serve a close).
    let turn = match role {
        Role::Sole => true,
        Role::Worker => !me.handed_off.load(Ordering::SeqCst),
        Role::Keeper => me.handed_off.load(Ordering::SeqCst),
    };
    if !turn && me.mailbox.lock().close_deadline.is_none() {
        wait_for_turn(cx, role, max_park, watch);
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
        cx,
        StepMode {
            full,
            ignore_backoff: false,
            hand_off_when_late: role == Role::Worker && !full,
        },
    );
    core.settle_tickets(cx, ran && full);
    if role == Role::Worker && !core.retry.is_empty() {
        // The keeper sleeps until the worker could be overdue, and a retry item made by
        // this step may be due before that: it looks again.
        me.keeper.unpark();
    }
    let now = cx.now();
    if let Some(deadline) = close_deadline {
        if core.is_idle(cx) || now >= deadline {
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
            pass_turn(me, role);
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

/// A thread whose turn it is not (a worker whose work the keeper has, or a keeper with
/// nothing handed over) parks. The keeper first looks whether the worker owes a step it has
/// not started (a niced worker the CPU never gets to): then it takes the turn.
fn wait_for_turn<K, V>(cx: &Ctx<'_, K, V>, role: Role, max_park: Duration, watch: Duration)
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let me = cx.me;
    // The coarse clock must not stop while a starved worker is the one to tick it.
    cx.tick_clock();
    if role != Role::Keeper {
        crate::sync::thread::park_timeout(max_park);
        return;
    }
    // A worker that holds the core is running; one that owes a step and has not started it
    // may be starved: the keeper takes the turn, steps and hands back. Otherwise it sleeps
    // until the worker could next be overdue (an idle flusher's keeper so wakes once per
    // delay, or per longest park), or, while the worker is stepping, for the watch.
    let now = cx.now();
    let overdue_at = me
        .core
        .try_lock()
        .map(|core| core.worker_overdue_at(cx, now, watch));
    match overdue_at {
        Some(at) if at <= now => {
            FlusherStats::add(&me.stats.takeovers, 1);
            me.handed_off.store(true, Ordering::SeqCst);
        }
        Some(at) => crate::sync::thread::park_timeout((at - now).min(max_park)),
        None => crate::sync::thread::park_timeout(watch),
    }
}

/// Hands the flusher to the other thread: the worker to its keeper when its step stopped
/// late, the keeper back to the worker once it caught up.
fn pass_turn<K>(me: &Flusher<K>, role: Role) {
    // The flag first, then the unpark: the other thread's next look at the flag finds its
    // turn, and a wake routed to this thread meanwhile is covered by the other's step.
    if role == Role::Worker {
        FlusherStats::add(&me.stats.handoffs, 1);
        me.handed_off.store(true, Ordering::SeqCst);
        me.keeper.unpark();
    } else {
        me.handed_off.store(false, Ordering::SeqCst);
        me.unparker.unpark();
    }
}
