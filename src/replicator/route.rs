//! A route: one target, on a task of its own, fed the source's committed transactions by the
//! session's reader.
//!
//! The reader decodes and maps the stream once; each route batches what it is fed
//! ([`Batcher`]), has its [`ApplyWorker`] write the batches to its target, keeps its own
//! [`Ledger`] of what that target holds durably and its own [`LagTracker`]. The slot is
//! confirmed at the lowest position every route holds durably, which the route publishes
//! ([`RouteHandle::confirmed`]) and the reader reads when it sends a status update.
//!
//! The feed is bounded in changes ([`FEED_CHANGES`], or one transaction that has more), not
//! in messages: a route whose target is slower than the source stops taking from its feed
//! once its next batch is full, and the reader then waits (sending status updates
//! meanwhile), so memory stays bounded whatever the backlog: the batch being written, the
//! next one, the feed, and the transaction the reader holds, each at most a batch's worth or
//! one transaction not large enough to go in parts (for a route alone, one more: a large
//! transaction's part queued at the worker, or a backlog's batch written beside the one
//! before, see [`Companion`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use super::batcher::Batcher;
use super::changes::UserChange;
use super::lag::{LagTracker, SharedClock};
use super::ledger::{Flush, Ledger};
use crate::apply::{
    ApplyError, ApplyWorker, Batch, CommitPosition, Done, Job, UnixMicros, UserKeys,
};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::metrics::Metrics;

/// Most changes waiting in a route's feed. The feed is only a handoff (the route takes a
/// transaction into its batch as soon as it comes), so a part's worth is plenty.
pub(super) const FEED_CHANGES: usize = super::session::PART_CHANGES;

/// What the routes of a fan-out may hold together, in their feeds and in their next
/// batches, so that memory stays bounded however many routes fall behind at once: each
/// route gets an equal share, between a floor (a route must still batch) and one route's
/// full allowance ([`FEED_CHANGES`], [`MAX_BATCH_CHANGES`](super::batcher::MAX_BATCH_CHANGES)).
const FEED_BUDGET: usize = 20_000;
const BATCH_BUDGET: usize = 50_000;
const FEED_FLOOR: usize = 50;
const BATCH_FLOOR: usize = 100;

/// A route's share of the feed and batch budgets when there are `routes` of them: (feed,
/// batch), in changes.
pub(super) fn route_share(routes: usize) -> (usize, usize) {
    let routes = routes.max(1);
    (
        (FEED_BUDGET / routes).clamp(FEED_FLOOR, FEED_CHANGES),
        (BATCH_BUDGET / routes).clamp(BATCH_FLOOR, super::batcher::MAX_BATCH_CHANGES),
    )
}

/// How often, at most, a route refreshes the lag figures that change with time alone.
const LAG_REFRESH: Duration = Duration::from_secs(1);

/// What the reader feeds a route, in commit order.
pub(super) enum Feed {
    /// A committed source transaction's changes for this route (none: it only moves the
    /// position); `heartbeat`: it carried this replicator's heartbeat.
    Transaction {
        position: CommitPosition,
        changes: Vec<UserChange>,
        heartbeat: bool,
    },
    /// Changes of a large transaction committed at `position`, more to come.
    Part {
        position: CommitPosition,
        changes: Vec<UserChange>,
    },
    /// The last changes of a large transaction; `carried`: whether any of its changes, in
    /// any part, was for the target.
    LargeEnd {
        position: CommitPosition,
        changes: Vec<UserChange>,
        carried: bool,
    },
    /// The large transaction being fed failed to map: nothing of it may reach the target.
    LargeAbort,
    /// Nothing for the target up to `position` (a keepalive while the reader holds no
    /// transaction); `sent_at`, without heartbeats, the server's clock as it sent it.
    Idle {
        position: Lsn,
        sent_at: Option<UnixMicros>,
    },
    /// Apply what is pending, make it durable, and end.
    Finish,
}

/// The share of a feed of `capacity` a message of `changes` takes: one at least (every
/// message costs memory), the whole feed at most (a larger transaction waits for an empty
/// feed).
fn permits(changes: usize, capacity: usize) -> u32 {
    changes.clamp(1, capacity) as u32
}

/// A feed message and the share of the feed's capacity it holds until taken (none: a
/// [`Feed::Finish`] sent past a full feed, see [`RouteHandle::finish_now`]).
struct Fed {
    feed: Feed,
    _permit: Option<OwnedSemaphorePermit>,
}

/// What the reader holds of a route.
pub(super) struct RouteHandle {
    feed: mpsc::UnboundedSender<Fed>,
    capacity: Arc<Semaphore>,
    /// The feed's size in changes.
    feed_changes: usize,
    confirmed: Arc<AtomicU64>,
}

impl RouteHandle {
    /// The position the route's target holds durably.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Acquire))
    }

    /// [`RouteHandle::confirmed`], for another task to watch (a route's online copy waits
    /// for its last chunk to be durable).
    pub fn confirmed_shared(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.confirmed)
    }

    /// Waits for room for `changes` in the feed. Cancel-safe: nothing is taken until ready.
    pub async fn room(&self, changes: usize) -> OwnedSemaphorePermit {
        Arc::clone(&self.capacity)
            .acquire_many_owned(permits(changes, self.feed_changes))
            .await
            .expect("the feed's semaphore is never closed")
    }

    /// Room for `changes` right now, if there is.
    pub fn room_now(&self, changes: usize) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.capacity)
            .try_acquire_many_owned(permits(changes, self.feed_changes))
            .ok()
    }

    /// Hands `feed` over with the room taken for it; false if the route has ended (its task
    /// says why).
    pub fn send(&self, feed: Feed, permit: OwnedSemaphorePermit) -> bool {
        self.feed
            .send(Fed {
                feed,
                _permit: Some(permit),
            })
            .is_ok()
    }

    /// Tells the route to apply what it was fed, make it durable and end, without waiting
    /// for room in its feed: the reader stops feeding a route too slow to keep up.
    pub fn finish_now(&self) {
        let _ = self.feed.send(Fed {
            feed: Feed::Finish,
            _permit: None,
        });
    }
}

/// What a route needs to start.
pub(super) struct RouteParts {
    pub worker: ApplyWorker,
    /// A second worker, on a connection of its own to the same target, for a route alone
    /// (see [`Companion`]).
    pub companion: Option<ApplyWorker>,
    pub metrics: Arc<Metrics>,
    /// The durable checkpoint the route's target resumes from.
    pub resume_at: Lsn,
    /// Whether idle positions are recorded (not in a dry run).
    pub records: bool,
    pub clock: SharedClock,
    /// When this session's heartbeats began (see [`LagTracker`]).
    pub monitor_started: UnixMicros,
    /// Told whenever any route's durable position moves.
    pub confirmations: Arc<Notify>,
    /// The keys of a user's part kept in another table (see [`Batcher::with_part_keys`]).
    pub part_keys: &'static [&'static str],
    /// Which route of a fan-out this is (index, name), for its own metrics.
    pub route: Option<(usize, String)>,
    /// How many routes share the process's memory (see [`route_share`]).
    pub routes: usize,
}

/// Starts a route on its own task, which ends with the route's first error, or once it has
/// made everything it was fed durable after [`Feed::Finish`].
pub(super) fn spawn(
    parts: RouteParts,
    tasks: &mut tokio::task::JoinSet<Result<(), Error>>,
) -> (RouteHandle, tokio::task::Id) {
    let (feed, fed) = mpsc::unbounded_channel();
    let (feed_changes, batch_changes) = route_share(parts.routes);
    let capacity = Arc::new(Semaphore::new(feed_changes));
    let confirmed = Arc::new(AtomicU64::new(parts.resume_at.0));
    let route = Route {
        fed,
        worker: parts.worker,
        companion: parts
            .companion
            .map(|worker| Companion { worker, job: None }),
        worker_holds_lock: true,
        batcher: Batcher::with_part_keys(parts.part_keys).limited_to(batch_changes),
        ledger: Ledger::new(parts.resume_at, parts.records),
        lag: LagTracker::new(
            Arc::clone(&parts.metrics),
            parts.clock,
            parts.monitor_started,
            parts.route.clone(),
        ),
        route: parts.route.map(|(_, name)| name),
        metrics: parts.metrics,
        in_flight: None,
        side_flush: None,
        written: None,
        parts_queued: if parts.routes == 1 { 1 } else { 0 },
        in_large_transaction: false,
        confirmed: Arc::clone(&confirmed),
        confirmations: parts.confirmations,
        lag_refreshed: Instant::now(),
    };
    let task = tasks.spawn(route.run()).id();
    (
        RouteHandle {
            feed,
            capacity,
            feed_changes,
            confirmed,
        },
        task,
    )
}

/// What the route remembers of the job its worker is doing.
enum InFlight {
    /// A batch: its oldest commit time, a heartbeat that came behind it, where it ends, the
    /// users it writes when the batch after it may be written beside it ([`Companion`]), and
    /// whether its transaction holds the checkpoint row already, which that needs.
    Batch {
        oldest_commit: Option<UnixMicros>,
        heartbeat: Option<UnixMicros>,
        end: Lsn,
        users: Option<UserKeys>,
        holds_checkpoint: bool,
    },
    /// A part of a large transaction.
    Part,
    /// A durability flush, and what it covers.
    Flush(Flush),
}

/// A second worker for a backlog: one target connection is a single backend, which a
/// backlog keeps busy while the machine has room for a second. A batch that is due (full, or
/// old) when the worker is free starts by holding the checkpoint row
/// ([`Job::CommitHolding`]); once it does, the next batch that is due goes to the companion,
/// which writes its users the first does not write beside it, then waits for the first to
/// end (holding the row in turn), and commits only if the first committed
/// ([`Job::CommitAfter`]). When the worker's batch is done the two swap places, so `worker`
/// always holds the oldest job: answers are taken in commit order, the next batch goes beside
/// once the new oldest holds the row, and everything else a route does (parts, flushes, a
/// batch in steady load) waits for both to be free and goes through the connection that
/// holds the slot's lock (`worker_holds_lock`).
struct Companion {
    worker: ApplyWorker,
    /// The batch it is writing, if any (then the worker is writing the one before).
    job: Option<InFlight>,
}

struct Route {
    /// Its name in a fan-out, for its metrics.
    route: Option<String>,
    fed: mpsc::UnboundedReceiver<Fed>,
    /// Writes the oldest job in flight.
    worker: ApplyWorker,
    companion: Option<Companion>,
    /// `worker` is the one whose connection holds the slot's lock (they swap places).
    worker_holds_lock: bool,
    batcher: Batcher,
    ledger: Ledger,
    lag: LagTracker,
    metrics: Arc<Metrics>,
    /// The job the worker is doing, if any (parts: while any is being written or queued).
    in_flight: Option<InFlight>,
    /// A durability flush the companion is doing beside the worker, and what it covers
    /// (see [`Route::submit_side_flush`]).
    side_flush: Option<Flush>,
    /// The batch written last, dropped after the next is handed to the worker: freeing a
    /// backlog's batch of thousands of documents takes milliseconds the worker would wait.
    written: Option<Box<Batch>>,
    /// Parts of a large transaction that may wait in the worker's queue behind the one being
    /// written: one when the route is alone, whose memory a part bounds; none in a fan-out,
    /// where every route holding one more part would add up with the routes.
    parts_queued: usize,
    /// A large transaction is being applied in parts.
    in_large_transaction: bool,
    /// The ledger's durable position, for the reader.
    confirmed: Arc<AtomicU64>,
    confirmations: Arc<Notify>,
    lag_refreshed: Instant,
}

impl Route {
    /// Takes from the feed while the worker writes the previous batch. A batch goes to the
    /// worker as soon as the feed is empty and the worker is free; while it is busy, the next
    /// batch grows (up to its limit, then the route stops taking from the feed).
    async fn run(mut self) -> Result<(), Error> {
        loop {
            let worker_free = self.in_flight.is_none();
            // Between the parts of a large transaction the target transaction is open on the
            // writer's connection: a flush there would commit the parts so far.
            let flush_due = if self.in_large_transaction {
                None
            } else {
                self.ledger.flush_due(self.caught_up())
            };
            let flush_now = flush_due.is_some_and(|due| Instant::now() >= due);
            if flush_now && self.submit_side_flush().await? {
                continue;
            }
            if worker_free && flush_now && self.side_flush.is_none() {
                self.submit_flush().await?;
                continue;
            }
            if self.batcher.is_due() && worker_free {
                self.submit_batch().await?;
                continue;
            }
            if self.batcher.is_due() && self.submit_beside().await? {
                continue;
            }
            let may_take = worker_free || !self.batcher.is_due();
            if !may_take {
                // Full (a backlog): nothing more comes into it until the worker is free.
                self.batcher.encode_ahead();
            }
            let mut timer = self.lag_refreshed + LAG_REFRESH;
            let may_flush = (worker_free && self.side_flush.is_none()) || self.side_free();
            if let Some(flush_due) = flush_due.filter(|_| may_flush) {
                // (A busy worker, or the companion's flush, wakes the loop itself when done.)
                timer = timer.min(flush_due);
            }
            // Freed once the next batch, if one is due, has gone to the worker.
            self.written = None;
            tokio::select! {
                biased;
                done = self.worker.recv(), if !worker_free => self.on_done(done?).await?,
                done = side_done(&mut self.companion), if self.side_flush.is_some() => {
                    self.side_flushed(done?)
                }
                fed = self.fed.recv(), if may_take => match fed {
                    Some(Fed { feed: Feed::Finish, .. }) => return self.finish().await,
                    Some(Fed { feed, _permit }) => self.take(feed).await?,
                    // The session is ending without a finish (it failed): nothing to add.
                    None => return Ok(()),
                },
                // Nothing more to take right now: write what we have.
                _ = std::future::ready(()), if worker_free && !self.batcher.is_empty() => {
                    self.submit_batch().await?
                }
                _ = tokio::time::sleep_until(timer.into()) => self.refresh_lag(),
            }
        }
    }

    /// Nothing fed is waiting to be applied.
    fn caught_up(&self) -> bool {
        self.batcher.is_empty() && self.in_flight.is_none() && !self.in_large_transaction
    }

    async fn take(&mut self, feed: Feed) -> Result<(), Error> {
        match feed {
            Feed::Transaction {
                position,
                changes,
                heartbeat,
            } => self.add_transaction(position, changes, heartbeat),
            Feed::Part { position, changes } => {
                if self.ledger.holds(position.commit_lsn) {
                    return Ok(());
                }
                self.start_large_transaction().await?;
                self.batcher
                    .add(changes, position.commit_time, &self.metrics);
                // Encoded while the worker writes the part before.
                let part = self.batcher.take_part();
                // The part waits in the worker's queue while the one before is written, so
                // the target goes from one part to the next without waiting on this task
                // (and the reader maps the part after meanwhile).
                while self.worker.in_flight() > self.parts_queued {
                    let done = self.worker.recv().await?;
                    self.on_done(done).await?;
                }
                debug_assert!(
                    self.worker_holds_lock,
                    "a large transaction goes through the connection holding the slot's lock"
                );
                self.worker.send(Job::Part(part)).await?;
                self.in_flight = Some(InFlight::Part);
            }
            Feed::LargeEnd {
                position,
                changes,
                carried,
            } => {
                if self.ledger.holds(position.commit_lsn) {
                    self.metrics.transaction_skipped();
                    return Ok(());
                }
                self.start_large_transaction().await?;
                self.batcher
                    .add(changes, position.commit_time, &self.metrics);
                self.batcher.commit(position, carried);
                // Committed in the target transaction its parts opened, not as a backlog's
                // batch (which would start a transaction of its own).
                self.apply_batch().await?;
                self.in_large_transaction = false;
            }
            Feed::LargeAbort => self.abandon_large_transaction().await?,
            Feed::Idle { position, sent_at } => {
                // Everything for this target up to `position` was fed before this: once it is
                // applied (the ledger records an idle position only while caught up, and only
                // past everything applied), the position is the target's.
                self.ledger.nothing_until(position);
                if let (Some(sent_at), true) = (sent_at, self.caught_up()) {
                    // No heartbeats: a keepalive while caught up is the best idle estimate.
                    self.lag.keepalive_while_idle(sent_at);
                }
            }
            Feed::Finish => unreachable!("handled by run"),
        }
        Ok(())
    }

    /// Adds a transaction to the batch; one with nothing for the target only moves the
    /// position, without a target transaction of its own while nothing else waits.
    fn add_transaction(
        &mut self,
        position: CommitPosition,
        changes: Vec<UserChange>,
        heartbeat: bool,
    ) {
        if self.ledger.holds(position.commit_lsn) {
            self.metrics.transaction_skipped();
            return;
        }
        let at = position.commit_time;
        if changes.is_empty() && self.batcher.is_empty() {
            self.ledger.nothing_until(position.end_lsn);
            if heartbeat {
                // It has come through once the batch written last has.
                let latest = match &mut self.companion {
                    Some(Companion { job: Some(job), .. }) => Some(job),
                    _ => self.in_flight.as_mut(),
                };
                match latest {
                    Some(InFlight::Batch { heartbeat, .. }) => *heartbeat = Some(at),
                    _ => self.heartbeat_arrived(at),
                }
            }
            return;
        }
        if heartbeat {
            self.batcher.heartbeat_behind(at);
        }
        let carried = !changes.is_empty();
        self.batcher.add(changes, at, &self.metrics);
        self.batcher.commit(position, carried);
    }

    /// The first part of a large transaction goes into a target transaction of its own:
    /// what was batched before it is written first.
    async fn start_large_transaction(&mut self) -> Result<(), Error> {
        if !self.in_large_transaction {
            self.apply_batch().await?;
            self.in_large_transaction = true;
        }
        Ok(())
    }

    /// The large transaction being fed failed: roll back what was written of it, drop the
    /// rest. What was batched before it (committed source transactions) stays, to be applied.
    /// Before its first part, there is nothing of it here.
    async fn abandon_large_transaction(&mut self) -> Result<(), Error> {
        if self.in_large_transaction {
            self.settle().await?;
            self.worker.run(Job::Abandon).await?;
            self.batcher.discard();
            self.in_large_transaction = false;
        }
        Ok(())
    }

    /// Applies what is pending and makes it durable: the reader confirms it, then ends. A
    /// large transaction left unfinished (its end never came) is rolled back first.
    async fn finish(mut self) -> Result<(), Error> {
        if self.side_flush.is_some() {
            let done = side_done(&mut self.companion).await?;
            self.side_flushed(done);
        }
        self.abandon_large_transaction().await?;
        self.apply_batch().await?;
        self.settle().await?;
        let flush = self.ledger.flush(self.caught_up());
        if Ledger::has_work(flush) {
            self.worker.run(Job::MakeDurable(flush.idle)).await?;
            self.durable(flush);
        }
        Ok(())
    }

    /// Hands the batch to the worker; the worker must be free.
    async fn submit_batch(&mut self) -> Result<(), Error> {
        // A batch due while the worker was busy (a backlog) makes room for the next beside it;
        // not the end of a large transaction, whose target transaction is open already.
        // Not while the companion flushes: its lock on the checkpoint row would hold the
        // batch's (and the companion is busy anyway).
        let backlog = self.companion.is_some()
            && !self.in_large_transaction
            && self.side_flush.is_none()
            && self.batcher.is_due();
        let (batch, heartbeat) = self.batcher.take();
        let users = if backlog { batch.user_keys() } else { None };
        let job = if users.is_some() {
            Job::CommitHolding
        } else {
            Job::Commit
        };
        self.in_flight = Some(Self::in_flight(&batch, heartbeat, users));
        self.worker.send(job(batch)).await?;
        Ok(())
    }

    /// Hands the batch, which is due, to the companion while the worker writes the batch
    /// before it, if the companion is free and both batches can be written so
    /// ([`Batch::split_beside`]). False if it stays with the batcher.
    async fn submit_beside(&mut self) -> Result<bool, Error> {
        let Some(companion) = &mut self.companion else {
            return Ok(false);
        };
        let Some(InFlight::Batch {
            end: after,
            users: Some(before),
            holds_checkpoint: true,
            ..
        }) = &self.in_flight
        else {
            return Ok(false);
        };
        // A flush that is due waits for both to be free: going on beside one another, a
        // backlog would leave none free, and confirm nothing, until it has drained.
        let flush_due = self
            .ledger
            .flush_due(false)
            .is_some_and(|due| Instant::now() >= due);
        if companion.job.is_some()
            || self.side_flush.is_some()
            || self.in_large_transaction
            || flush_due
        {
            return Ok(false);
        }
        let after = *after;
        let Some((batch, heartbeat, users)) = self.batcher.take_beside(before) else {
            return Ok(false);
        };
        companion.job = Some(Self::in_flight(&batch, heartbeat, Some(users)));
        companion
            .worker
            .send(Job::CommitAfter(batch, after))
            .await?;
        Ok(true)
    }

    fn in_flight(
        batch: &Batch,
        heartbeat: Option<UnixMicros>,
        users: Option<UserKeys>,
    ) -> InFlight {
        InFlight::Batch {
            oldest_commit: batch.commit_times().first().copied(),
            heartbeat,
            end: batch
                .last_commit()
                .map_or(Lsn::ZERO, |position| position.end_lsn),
            users,
            holds_checkpoint: false,
        }
    }

    /// Waits until the worker has answered everything sent to it.
    async fn settle(&mut self) -> Result<(), Error> {
        while self.worker.in_flight() > 0 {
            let done = self.worker.recv().await?;
            self.on_done(done).await?;
        }
        Ok(())
    }

    /// Writes the batch and waits for it, and for anything before it.
    async fn apply_batch(&mut self) -> Result<(), Error> {
        self.settle().await?;
        if !self.batcher.is_empty() {
            self.submit_batch().await?;
            self.written = None;
            self.settle().await?;
        }
        self.written = None;
        Ok(())
    }

    async fn on_done(&mut self, done: Done) -> Result<(), Error> {
        if let Done::HoldingCheckpoint = done {
            // The batch being written holds the checkpoint row: the next may go beside it.
            if let Some(InFlight::Batch {
                holds_checkpoint, ..
            }) = &mut self.in_flight
            {
                *holds_checkpoint = true;
            }
            return Ok(());
        }
        let in_flight = self.in_flight.take();
        let (batch, position, took) = match done {
            Done::Committed {
                batch,
                position,
                took,
            } => (batch, position, took),
            Done::Durable => {
                if let Some(InFlight::Flush(flush)) = in_flight {
                    self.durable(flush);
                }
                return Ok(());
            }
            Done::Part(_) => {
                // The part queued behind it is still being written.
                if self.worker.in_flight() > 0 {
                    self.in_flight = in_flight;
                }
                return Ok(());
            }
            Done::Abandoned | Done::HoldingCheckpoint => return Ok(()),
        };
        self.lag.applied(batch.commit_times());
        self.metrics
            .batch_applied(batch.user_transactions(), batch.changes(), took);
        if let Some(route) = &self.route {
            self.metrics.route_applied(route, batch.changes() as u64);
        }
        self.metrics
            .set_checkpoint(position.end_lsn, position.commit_time);
        self.ledger.applied(position.end_lsn);
        if let Some(companion) = &mut self.companion {
            if let Some(job) = companion.job.take() {
                // The batch written beside this one is now the oldest.
                std::mem::swap(&mut self.worker, &mut companion.worker);
                self.worker_holds_lock = !self.worker_holds_lock;
                self.in_flight = Some(job);
            } else if !self.worker_holds_lock && self.worker.in_flight() == 0 {
                // Both are free: the connection that holds the slot's lock takes every job
                // but a batch beside another (or a flush beside the worker), so that the other
                // commits nothing the lock holder could not have (see
                // `TargetWriter::apply_after`).
                std::mem::swap(&mut self.worker, &mut companion.worker);
                self.worker_holds_lock = true;
            }
        }
        // After the swap: it has come through, but the route is caught up only if no batch
        // is still being written beside.
        if let Some(InFlight::Batch {
            heartbeat: Some(heartbeat),
            ..
        }) = in_flight
        {
            self.heartbeat_arrived(heartbeat);
        }
        self.refresh_lag();
        self.written = Some(batch);
        Ok(())
    }

    /// Whether the companion is free for a flush beside the worker: only while the worker is
    /// the connection that holds the slot's lock, so that the two never swap places while
    /// it flushes, and every other job stays on the lock holder (a large transaction's parts
    /// above all, whose target transaction must be the one their end commits). Not in a
    /// backlog (a batch due), where the companion writes the next batch beside the worker's
    /// instead, and a flush waits for both to be free as before: a flush beside every
    /// batch would leave none to write beside it.
    fn side_free(&self) -> bool {
        self.worker_holds_lock
            && !self.batcher.is_due()
            && self.side_flush.is_none()
            // A flush is on the worker already, or a batch that will lock the checkpoint row
            // for one beside it, which the flush's lock on the row would hold up.
            && !matches!(
                self.in_flight,
                Some(InFlight::Flush(_) | InFlight::Batch { users: Some(_), .. })
            )
            && self.companion.as_ref().is_some_and(|companion| {
                companion.job.is_none() && companion.worker.in_flight() == 0
            })
    }

    /// Hands a flush of the batches applied so far to the companion, if it is free and there
    /// are any: a durability flush waits for the target's WAL flush (on Neon, for the
    /// safekeepers), and on the worker's connection the batches behind it would wait with
    /// it. It covers only what was applied when it was sent, and writes no row (it locks the
    /// checkpoint row `FOR KEY SHARE`, which the batches' updates do not wait for); an idle
    /// position is left to a flush on the worker ([`Route::submit_flush`]). False if not
    /// sent.
    async fn submit_side_flush(&mut self) -> Result<bool, Error> {
        if !self.side_free() {
            return Ok(false);
        }
        let Some(flush) = self.ledger.flush_applied() else {
            return Ok(false);
        };
        let Some(companion) = &mut self.companion else {
            return Ok(false);
        };
        companion.worker.send(Job::SyncWal).await?;
        self.side_flush = Some(flush);
        Ok(true)
    }

    /// The companion's flush returned.
    fn side_flushed(&mut self, done: Done) {
        if let (Done::Durable, Some(flush)) = (done, self.side_flush.take()) {
            self.durable(flush);
        }
    }

    /// Asks the worker to make the batches applied so far durable, and to record the idle
    /// position if there is one, without waiting for it.
    async fn submit_flush(&mut self) -> Result<(), Error> {
        let flush = self.ledger.flush(self.caught_up());
        self.in_flight = Some(InFlight::Flush(flush));
        self.worker.send(Job::MakeDurable(flush.idle)).await?;
        Ok(())
    }

    /// A flush returned: the reader may confirm the slot up to what it covered.
    fn durable(&mut self, flush: Flush) {
        self.ledger.durable(flush);
        self.confirmed
            .store(self.ledger.confirmed().0, Ordering::Release);
        self.confirmations.notify_one();
    }

    /// A heartbeat committed at `commit_time` has come through the whole pipeline.
    fn heartbeat_arrived(&mut self, commit_time: UnixMicros) {
        let caught_up = self.caught_up();
        self.lag.heartbeat_arrived(commit_time, caught_up);
    }

    /// The current lag while work waits: the age of the oldest waiting commit.
    fn refresh_lag(&mut self) {
        let oldest = match &self.in_flight {
            Some(InFlight::Batch {
                oldest_commit: Some(oldest),
                ..
            }) => Some(*oldest),
            _ => self.batcher.oldest_commit(),
        };
        self.lag.waiting(oldest);
        self.lag_refreshed = Instant::now();
    }
}

/// The answer to the companion's flush ([`Route::submit_side_flush`]); never, without one.
async fn side_done(companion: &mut Option<Companion>) -> Result<Done, ApplyError> {
    match companion {
        Some(companion) => companion.worker.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_share_a_bounded_memory_budget() {
        // One route keeps its full allowance, as before fan-out.
        assert_eq!(
            route_share(1),
            (FEED_CHANGES, super::super::batcher::MAX_BATCH_CHANGES)
        );
        for routes in [2, 10, 100, 400, 1_000] {
            let (feed, batch) = route_share(routes);
            assert!(feed >= FEED_FLOOR && batch >= BATCH_FLOOR);
            let total = routes * (feed + batch);
            assert!(
                total <= (FEED_BUDGET + BATCH_BUDGET).max(routes * (FEED_FLOOR + BATCH_FLOOR)),
                "{routes} routes may hold {total} changes"
            );
        }
        assert_eq!(permits(0, 200), 1);
        assert_eq!(
            permits(5_000, 200),
            200,
            "a large part waits for an empty feed"
        );
    }
}
