//! [`Ticket`]: a flush barrier shared by all flushers.

use std::time::Duration;

use crate::sync::{Condvar, Mutex};

/// A flush barrier shared by all flushers: each completes its part once no write older than
/// the flush (per shard: a version below `targets[shard]`) is waiting in its shards.
pub(crate) struct Ticket {
    pub(super) targets: Vec<u64>,
    pub(super) state: Mutex<TicketState>,
    pub(super) cv: Condvar,
}

#[derive(Default)]
pub(super) struct TicketState {
    pub(super) remaining: usize,
    pub(super) rejected: usize,
    pub(super) pending: usize,
    pub(super) cancelled: bool,
    /// The cache closed before the flushers could settle the ticket.
    pub(super) closed: bool,
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

    pub(super) fn complete_part(&self) {
        let mut s = self.state.lock();
        s.remaining = s.remaining.saturating_sub(1);
        if s.remaining == 0 {
            self.cv.notify_all();
        }
    }

    pub(super) fn note(&self, rejected: usize, pending: usize) {
        let mut s = self.state.lock();
        s.rejected += rejected;
        s.pending = pending;
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.state.lock().cancelled
    }

    /// The cache closed: whoever waits on this ticket gets `Closed` at once.
    pub(super) fn abort_closed(&self) {
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
