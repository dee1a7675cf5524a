//! The durability ledger: which source positions the target holds, visibly and durably, and
//! so how far the slot may be confirmed.
//!
//! Batches commit asynchronously on the target: visible at once, durable only once a later
//! synchronous commit returns ([`Job::MakeDurable`](crate::apply::Job::MakeDurable)). The
//! ledger keeps the applied batches' end positions until such a flush covers them, and the
//! slot is confirmed up to the last durable one, never further. Caught up, the server's
//! latest position (nothing for the target up to it) is recorded in the checkpoint by the
//! next flush, and becomes confirmable only then: the slot never passes the checkpoint, which
//! is how a target restored to an earlier point is told from one that is up to date.
//!
//! Kept apart from the session so that these rules live in one small place, testable
//! without a server, and so that each target of a fan-out can keep a ledger of its own.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// How often, at most, applied batches are made durable (a synchronous commit on the target),
/// which lets the slot be confirmed up to them.
pub(super) const DURABLE_INTERVAL: Duration = Duration::from_millis(200);
/// How often, at most, an idle position is recorded in the checkpoint (a small synchronous
/// target transaction) so that the slot can be confirmed there: while the source is idle,
/// one such write per interval; under load it rides on the durability flushes. The slot
/// needs progress over minutes (retained WAL, Neon's inactive-slot rule), not seconds.
pub(super) const IDLE_RECORD_INTERVAL: Duration = Duration::from_secs(10);

/// What one flush covers: the oldest `batches` applied batches, and the idle position it
/// records in the checkpoint, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Flush {
    pub batches: usize,
    pub idle: Option<Lsn>,
}

#[derive(Debug)]
pub(super) struct Ledger {
    /// Transactions committed before this position are on the target already.
    skip_before: Lsn,
    /// The position the target holds durably (the checkpoint's `end_lsn`).
    confirmed: Lsn,
    /// Applied batches not yet known durable: the source position each takes the checkpoint to.
    unflushed: VecDeque<Lsn>,
    last_flush: Instant,
    /// A position with nothing for the target up to it, confirmable while caught up once
    /// recorded.
    idle_position: Lsn,
    /// A dry run records nothing, so it has no idle position to record.
    records: bool,
}

impl Ledger {
    /// A ledger for a target resuming at `resume_at` (its durable checkpoint).
    pub fn new(resume_at: Lsn, records: bool) -> Self {
        Ledger {
            skip_before: resume_at,
            confirmed: resume_at,
            unflushed: VecDeque::new(),
            last_flush: Instant::now(),
            idle_position: resume_at,
            records,
        }
    }

    /// Whether the target has the transaction committed at `commit_lsn` already.
    pub fn holds(&self, commit_lsn: Lsn) -> bool {
        commit_lsn < self.skip_before
    }

    /// A batch that takes the checkpoint to `end_lsn` committed (visible, not yet durable).
    pub fn applied(&mut self, end_lsn: Lsn) {
        debug_assert!(
            end_lsn >= self.skip_before,
            "the checkpoint only moves forward"
        );
        self.skip_before = self.skip_before.max(end_lsn);
        self.unflushed.push_back(end_lsn);
    }

    /// Nothing for the target up to `position` but what it was fed before (a keepalive,
    /// transactions that map to nothing, other routes' transactions); recorded only once
    /// caught up, and only past everything applied (see `idle_to_record`).
    pub fn nothing_until(&mut self, position: Lsn) {
        self.idle_position = self.idle_position.max(position);
    }

    /// When the next flush is due, if one is wanted: soon after a batch was applied, rarely
    /// for an idle position alone.
    pub fn flush_due(&self, caught_up: bool) -> Option<Instant> {
        if !self.unflushed.is_empty() {
            Some(self.last_flush + DURABLE_INTERVAL)
        } else {
            self.idle_to_record(caught_up)
                .map(|_| self.last_flush + IDLE_RECORD_INTERVAL)
        }
    }

    /// A flush is sent now: what it covers, whether or not it is due.
    pub fn flush(&mut self, caught_up: bool) -> Flush {
        self.last_flush = Instant::now();
        Flush {
            batches: self.unflushed.len(),
            idle: self.idle_to_record(caught_up),
        }
    }

    /// A flush of the applied batches alone, sent now, if there are any: one that cannot
    /// record an idle position (it runs beside the writer and does not write the checkpoint
    /// row).
    pub fn flush_applied(&mut self) -> Option<Flush> {
        if self.unflushed.is_empty() {
            return None;
        }
        self.last_flush = Instant::now();
        Some(Flush {
            batches: self.unflushed.len(),
            idle: None,
        })
    }

    /// Whether `flush` would make anything durable.
    pub fn has_work(flush: Flush) -> bool {
        flush.batches > 0 || flush.idle.is_some()
    }

    /// A flush returned: what it covered is durable, and the slot may be confirmed up to it.
    pub fn durable(&mut self, flush: Flush) {
        for end_lsn in self.unflushed.drain(..flush.batches).chain(flush.idle) {
            self.confirmed = self.confirmed.max(end_lsn);
        }
    }

    /// A position past everything applied with nothing for the target up to it: caught up,
    /// the server's latest. The slot may be confirmed there once the checkpoint records it.
    fn idle_to_record(&self, caught_up: bool) -> Option<Lsn> {
        let past = self
            .unflushed
            .back()
            .map_or(self.confirmed, |&end| end.max(self.confirmed));
        (self.records && caught_up && self.idle_position > past).then_some(self.idle_position)
    }

    /// The position the target holds durably.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }
}

/// The flush position the status updates report: what every target holds durably, or what
/// was reported before if that is further. It starts at the slot's own position: what was
/// reported once is never taken back (a crash between recording a position and confirming
/// it leaves the checkpoint ahead of the slot, never behind).
#[derive(Debug)]
pub(super) struct Reported(Lsn);

impl Reported {
    pub fn new(slot_confirmed: Lsn) -> Self {
        Reported(slot_confirmed)
    }

    /// The position to report now that every target holds `durable` durably.
    pub fn report(&mut self, durable: Lsn) -> Lsn {
        self.0 = self.0.max(durable);
        self.0
    }

    pub fn position(&self) -> Lsn {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> Lsn {
        Lsn(n)
    }

    #[test]
    fn the_first_report_is_the_slots_own_position_never_less_never_more() {
        // The slot is behind the checkpoint (a crash between recording and confirming).
        let ledger = Ledger::new(lsn(200), true);
        assert_eq!(Reported::new(lsn(100)).report(ledger.confirmed()), lsn(200));
        // The slot is ahead (an older usersync's checkpoint, taken over): never taken back.
        let ledger = Ledger::new(lsn(100), true);
        let mut reported = Reported::new(lsn(300));
        assert_eq!(reported.report(ledger.confirmed()), lsn(300));
        assert_eq!(reported.report(lsn(250)), lsn(300));
        assert_eq!(reported.report(lsn(400)), lsn(400));
    }

    #[test]
    fn an_applied_batch_is_confirmed_only_once_a_flush_covering_it_returns() {
        let mut ledger = Ledger::new(lsn(100), true);
        ledger.applied(lsn(150));
        assert!(ledger.holds(lsn(149)) && !ledger.holds(lsn(150)));
        assert_eq!(ledger.confirmed(), lsn(100), "visible is not durable");
        let flush = ledger.flush(false);
        // Applied while the flush was on its way: not covered by it.
        ledger.applied(lsn(170));
        assert_eq!(ledger.confirmed(), lsn(100));
        ledger.durable(flush);
        assert_eq!(ledger.confirmed(), lsn(150));
        assert_eq!(
            ledger.flush_due(false),
            Some(ledger.last_flush + DURABLE_INTERVAL)
        );
        let flush = ledger.flush(false);
        ledger.durable(flush);
        assert_eq!(ledger.confirmed(), lsn(170));
        assert_eq!(ledger.flush_due(false), None);
    }

    #[test]
    fn an_idle_position_is_confirmed_only_once_recorded_and_only_while_caught_up() {
        let mut ledger = Ledger::new(lsn(100), true);
        ledger.nothing_until(lsn(400));
        assert_eq!(ledger.flush_due(false), None, "work waits: not idle");
        let due = ledger.flush_due(true).expect("an idle position to record");
        assert_eq!(due, ledger.last_flush + IDLE_RECORD_INTERVAL);
        assert_eq!(ledger.confirmed(), lsn(100), "not recorded yet");
        let flush = ledger.flush(true);
        assert_eq!(flush.idle, Some(lsn(400)));
        ledger.durable(flush);
        assert_eq!(ledger.confirmed(), lsn(400));
        assert_eq!(ledger.flush_due(true), None, "recorded already");
    }

    #[test]
    fn an_idle_position_behind_an_applied_batch_is_not_recorded() {
        let mut ledger = Ledger::new(lsn(100), true);
        ledger.nothing_until(lsn(120));
        ledger.applied(lsn(150));
        let flush = ledger.flush(true);
        assert_eq!(
            flush,
            Flush {
                batches: 1,
                idle: None
            }
        );
    }

    #[test]
    fn a_dry_run_records_no_idle_position() {
        let mut ledger = Ledger::new(lsn(100), false);
        ledger.nothing_until(lsn(400));
        assert_eq!(ledger.flush_due(true), None);
        let flush = ledger.flush(true);
        assert!(!Ledger::has_work(flush));
        ledger.durable(flush);
        assert_eq!(ledger.confirmed(), lsn(100));
    }
}
