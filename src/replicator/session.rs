//! One streaming session's reader: reads the stream, decodes and maps it once, feeds the
//! routes, and reports positions to the source.
//!
//! Decode ([`crate::decode`]) and map ([`super::changes`]) happen here; each route
//! ([`super::route`]) batches and writes what it is fed on a task of its own, so the stream
//! goes on being read while the targets write. The status updates sent from here are the
//! only place the slot is confirmed: at the lowest position every route holds durably, never
//! below what was reported before. Whether the source is still there is the
//! [`SilenceWatch`]'s to say.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit};
use tokio::task::JoinSet;

use super::backfill::{self, CopyEnd, CopyKind, Joined, Mark, Window};
use super::changes::{print_changes, transaction_meta, ChangeMapper, Routed, UserChange};
use super::fleet::{self, Fleet, Member, RouteHealth};
use super::lag::ClockWatch;
use super::ledger::Reported;
use super::route::{self, Feed, RouteParts};
use super::silence::{SilenceWatch, Verdict};
use super::{stopped, Ended, Mode};
use crate::apply::{ApplyWorker, CommitPosition, UnixMicros};
use crate::config::Config;
use crate::decode::{
    decode_replication_message, encode_standby_status_update, pg_micros_to_unix_micros,
    unix_micros_to_pg_micros, Assembled, LogicalMessage, PgOutputDecoder, ReplicationMessage,
    Transaction, TransactionAssembler,
};
use crate::error::Error;
use crate::lag::unix_micros_now;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::{ReplicationStream, SourceError};

/// Changes per part of a large transaction ([`Session::feed_in_parts`]): a few parts are
/// held at once (with one route: one being written, one queued behind it, one mapped), as
/// parsed `raw_json` and as the statement's encoded parameters, so this bounds the memory a
/// transaction of any size takes; a round trip per part is little beside the writing of its
/// rows.
pub(super) const PART_CHANGES: usize = 2_000;

/// Changes beyond which a transaction goes to the target in parts, one by one, rather than
/// whole in a batch with others.
const LARGE_TRANSACTION_CHANGES: usize = 10_000;

/// The least time the reader waits for room in a route's feed before it leaves the route
/// behind (a fan-out; half the lag target otherwise): less would leave routes behind over a
/// hiccup of their target.
const SLOW_ROUTE_MIN_WAIT: Duration = Duration::from_millis(200);
/// Most often an idle position from a keepalive is fed to the routes. A walsender (14 and
/// later) sends a keepalive each time it waits for WAL while the position this client last
/// reported written is behind what it sent: under load, after nearly every transaction
/// (3,900 a second at 5,000 tx/s in the bench), and each fed position wakes every route.
/// The routes record an idle position every few seconds at most, so the furthest one of
/// each interval is all they need; it is fed when the interval ends (see `idle_pending`).
const IDLE_FEED_INTERVAL: Duration = Duration::from_millis(50);

/// Whether a transaction goes to the target in parts rather than in a batch.
fn is_large(transaction: &Transaction) -> bool {
    transaction.spilled.is_some() || transaction.len() > LARGE_TRANSACTION_CHANGES
}

/// A route's target as [`super::start`] found it.
pub(super) enum RouteStart {
    /// Ready to write, from its durable checkpoint (it skips what was committed before);
    /// `copying`: its online copy is not done (see [`backfill`]), and starts again.
    Ready {
        worker: ApplyWorker,
        /// A second connection's worker, for a route alone (see `route::Companion`).
        companion: Option<ApplyWorker>,
        resume_at: Lsn,
        copying: Option<CopyKind>,
    },
    /// Could not be opened (a fan-out only): holds the slot at `held`; its target is probed
    /// if the failure may pass by itself (`probe`), else left for the operator.
    Down { held: Lsn, probe: bool },
    /// Evicted, or its checkpoint is behind the slot: holds nothing; needs a resync.
    Evicted,
    /// A fan-out's route with no checkpoint yet: holds the slot at `held` while its target is
    /// prepared, then joins the stream and is copied online ([`backfill`]).
    Unset { held: Lsn },
}

/// What a session streams with, as [`super::start`] prepares it.
pub(super) struct Parts<'a> {
    pub config: &'a Config,
    pub metrics: &'a Arc<Metrics>,
    pub mode: Mode,
    pub status_interval: Duration,
    pub stream: ReplicationStream,
    /// One per route (one without `--routes`), in the routes file's order.
    pub routes: Vec<RouteStart>,
    /// What `run` keeps of its routes across sessions.
    pub fleet: &'a mut Fleet,
    /// A fan-out's connection to the source holding the slot's lock (see `start`).
    pub leader: Option<tokio_postgres::Client>,
    pub changes: ChangeMapper,
    /// Where the slot is confirmed already: no status update reports less.
    pub slot_confirmed: Lsn,
    /// When this session's heartbeats began (see [`super::lag::LagTracker`]).
    pub monitor_started: UnixMicros,
    /// The source's system identifier, for the checkpoints of routes that join.
    pub system_id: String,
}

pub(super) struct Session<'a> {
    config: &'a Config,
    metrics: &'a Arc<Metrics>,
    mode: Mode,
    /// How often a status update goes out, whatever happens.
    status_interval: Duration,
    stream: ReplicationStream,
    decoder: PgOutputDecoder,
    assembler: TransactionAssembler,
    changes: ChangeMapper,
    clock: ClockWatch,
    silence: SilenceWatch,
    routes: Vec<Member>,
    /// The routes' configs (their targets), for the probes of routes that went away.
    route_configs: Vec<Config>,
    /// Each route's health, new routes files, and the config with the routes this session
    /// added (see [`fleet`]).
    fleet: &'a mut Fleet,
    /// A fan-out's connection holding the slot's lock in the source: once it is gone, so is
    /// the lock, and a standby may take over; the session ends rather than go on beside it.
    leader: Option<tokio_postgres::Client>,
    /// The routes' tasks: each ends with its route's first error, or once finished.
    route_tasks: JoinSet<Result<(), Error>>,
    /// Which route each task is.
    task_routes: HashMap<tokio::task::Id, usize>,
    /// Where each route started: a durable position past it means it works.
    started_at: Vec<Lsn>,
    /// Probes of routes that went away: each ends with its route once its target answers.
    probes: JoinSet<usize>,
    /// Each route's probe, if it has one: an evicted route's is stopped.
    probe_handles: Vec<Option<tokio::task::AbortHandle>>,
    /// When this session started: a route attached for [`fleet::SETTLED`] works again.
    started: Instant,
    /// How long the reader waits for room in a route's feed before it leaves the route
    /// behind (a fan-out only).
    slow_after: Duration,
    /// Told whenever a route's durable position moves.
    confirmations: Arc<Notify>,
    /// When this session's heartbeats began, for the routes' lag.
    monitor_started: UnixMicros,
    /// The source's system identifier, for the checkpoints of routes that join.
    system_id: String,
    /// Per route, its online copy's window, while one runs (see [`backfill`]).
    copies: Vec<Option<Window>>,
    /// The copies' tasks, each ending with its route's index.
    copy_tasks: JoinSet<CopyEnded>,
    /// Each route's copy task, if it has one.
    copy_handles: Vec<Option<tokio::task::AbortHandle>>,
    /// New routes whose targets are ready to join, from their copy tasks.
    joins: mpsc::UnboundedReceiver<Joined>,
    joins_sender: mpsc::UnboundedSender<Joined>,
    /// The prefix of this slot's watermark messages.
    copy_prefix: String,
    /// Checks that a route asked to be resynced online is marked so on its target (the
    /// message that asks can be written by anyone who may emit messages on the source); each
    /// ends with the route and whether it is.
    resync_checks: JoinSet<(usize, Option<String>)>,
    /// Per route, whether its copy failed for good in this session (it stays marked).
    copy_stuck: Vec<bool>,
    /// Per route, the request (`copy_started_at` on its target) a resync was last started
    /// for: a message read again, or forged, finds the same one, and changes nothing.
    resynced: Vec<Option<String>>,
    /// The routes being checked: one check at a time each.
    resync_checking: std::collections::HashSet<usize>,
    /// Transactions committed before this position are on every route's target already.
    skip_before: Lsn,
    /// Per route, a position up to which it was fed all it takes without being told (other
    /// routes' transactions), to tell it with the next status update ([`Feed::Idle`]).
    untold: Vec<Option<Lsn>>,
    /// The flush position the status updates report.
    reported: Reported,
    /// A replay reached its end position.
    finished: bool,
    /// A route that went away was resynced online: a new session lets it back in.
    rejoin: bool,
    /// The furthest WAL position the server has reported.
    received: Lsn,
    /// The source's clock at its walsender's first unasked keepalive in this session, which
    /// it sends as it starts reading WAL: a transaction committed before it (downtime, a
    /// reconnect) waited for usersync to come back, not for the source, so only those
    /// committed from then on count in the source's share of the lag. (One committed during
    /// the catch-up that follows counts, with its wait behind the backlog.)
    streaming_since: Option<i64>,
    last_status: Instant,
    /// When an idle position was last fed to the routes, and the furthest one held back
    /// since (see [`IDLE_FEED_INTERVAL`]).
    idle_fed_at: Option<Instant>,
    idle_pending: Option<(Lsn, Option<UnixMicros>)>,
}

impl<'a> Session<'a> {
    pub fn new(parts: Parts<'a>) -> Self {
        let Parts {
            config,
            metrics,
            mode,
            status_interval,
            stream,
            routes: starts,
            fleet,
            leader,
            changes,
            slot_confirmed,
            monitor_started,
            system_id,
        } = parts;
        // The stream starts at the lowest checkpoint; each route skips what it holds.
        let resume_at = starts
            .iter()
            .filter_map(|start| match start {
                RouteStart::Ready { resume_at, .. } => Some(*resume_at),
                _ => None,
            })
            .min()
            .unwrap_or(slot_confirmed);
        let (joins_sender, joins) = mpsc::unbounded_channel();
        let mut session = Session {
            config,
            metrics,
            mode,
            status_interval,
            stream,
            decoder: PgOutputDecoder::new(),
            assembler: TransactionAssembler::with_memory_limit(config.spill_threshold),
            changes,
            clock: ClockWatch::default(),
            silence: SilenceWatch::new(config.source_timeout),
            untold: Vec::with_capacity(starts.len()),
            routes: Vec::with_capacity(starts.len()),
            route_configs: config.route_configs(),
            fleet,
            leader,
            route_tasks: JoinSet::new(),
            task_routes: HashMap::new(),
            started_at: Vec::with_capacity(starts.len()),
            probes: JoinSet::new(),
            probe_handles: Vec::with_capacity(starts.len()),
            started: Instant::now(),
            slow_after: (config.lag_target / 2).max(SLOW_ROUTE_MIN_WAIT),
            confirmations: Arc::new(Notify::new()),
            monitor_started,
            system_id,
            copies: Vec::with_capacity(starts.len()),
            copy_tasks: JoinSet::new(),
            copy_handles: Vec::with_capacity(starts.len()),
            joins,
            joins_sender,
            copy_prefix: backfill::prefix(&config.slot),
            copy_stuck: Vec::with_capacity(starts.len()),
            resynced: Vec::with_capacity(starts.len()),
            resync_checks: JoinSet::new(),
            resync_checking: std::collections::HashSet::new(),
            skip_before: resume_at,
            reported: Reported::new(slot_confirmed),
            finished: false,
            rejoin: false,
            received: resume_at,
            streaming_since: None,
            last_status: Instant::now(),
            idle_fed_at: None,
            idle_pending: None,
        };
        for (index, start) in starts.into_iter().enumerate() {
            session.add_route(index, start);
        }
        session
    }

    /// Adds route `index` (the next one) as [`super::start`] found it.
    fn add_route(&mut self, index: usize, start: RouteStart) {
        debug_assert_eq!(index, self.routes.len());
        self.started_at.push(match &start {
            RouteStart::Ready { resume_at, .. } => *resume_at,
            RouteStart::Down { held, .. } | RouteStart::Unset { held } => *held,
            RouteStart::Evicted => Lsn::ZERO,
        });
        self.untold.push(None);
        self.probe_handles.push(None);
        self.copies.push(None);
        self.copy_handles.push(None);
        self.copy_stuck.push(false);
        self.resynced.push(None);
        let member = match start {
            RouteStart::Ready {
                worker,
                companion,
                resume_at,
                copying,
            } => {
                let handle = self.spawn_route(index, worker, companion, resume_at);
                if let Some(kind) = copying.filter(|_| self.mode == Mode::Service) {
                    let confirmed = handle.confirmed_shared();
                    self.start_copy(index, kind, backfill::Start::Attached(confirmed));
                }
                Member::Attached(handle)
            }
            RouteStart::Down { held, probe } => {
                if probe {
                    self.probe_handles[index] = Some(self.probes.spawn(fleet::probe(
                        index,
                        self.route_configs[index].clone(),
                        self.fleet.health[index].backoff(),
                    )));
                }
                Member::Detached { held }
            }
            RouteStart::Evicted => Member::Evicted,
            RouteStart::Unset { held } => {
                // Down until it has joined: `--evict-after` releases the slot from a route
                // whose target never gets ready.
                self.fleet.health[index].failed();
                let joined = self.joins_sender.clone();
                self.start_copy(
                    index,
                    CopyKind::Fill,
                    backfill::Start::Join { held, joined },
                );
                Member::Joining { held }
            }
        };
        self.routes.push(member);
    }

    /// Starts route `route`'s task, writing from `resume_at`.
    fn spawn_route(
        &mut self,
        route: usize,
        worker: ApplyWorker,
        companion: Option<ApplyWorker>,
        resume_at: Lsn,
    ) -> route::RouteHandle {
        let (handle, task) = route::spawn(
            RouteParts {
                worker,
                companion,
                metrics: Arc::clone(self.metrics),
                resume_at,
                records: !self.mode.is_dry_run(),
                clock: self.clock.shared(),
                monitor_started: self.monitor_started,
                part_keys: self.config.mapping.part_keys(),
                confirmations: Arc::clone(&self.confirmations),
                route: self.route_configs[route]
                    .route_name()
                    .map(|name| (route, name.to_owned())),
                routes: self.route_configs.len(),
            },
            &mut self.route_tasks,
        );
        self.task_routes.insert(task, route);
        handle
    }

    /// Starts the online copy of route `route` (see [`backfill`]).
    fn start_copy(&mut self, route: usize, kind: CopyKind, start: backfill::Start) {
        let (copy, window) = backfill::pair(
            route,
            kind,
            self.route_configs[route].clone(),
            self.system_id.clone(),
            Arc::clone(self.metrics),
        );
        self.copies[route] = Some(window);
        self.copy_stuck[route] = false;
        let task = self
            .copy_tasks
            .spawn(async move { (route, backfill::run(copy, start).await) });
        self.copy_handles[route] = Some(task);
    }

    /// Stops route `route`'s online copy, if it has one: the next session starts it again.
    fn stop_copy(&mut self, route: usize) {
        if let Some(task) = self.copy_handles[route].take() {
            task.abort();
        }
        self.copies[route] = None;
    }

    /// A new route's target is ready: it joins the stream here, and its copy goes on.
    fn joined(&mut self, joined: Joined) {
        let Joined {
            route,
            worker,
            resume_at,
            attached,
        } = joined;
        if !matches!(self.routes.get(route), Some(Member::Joining { .. })) {
            return;
        }
        let handle = self.spawn_route(route, worker, None, resume_at);
        // The copy task is waiting for this; gone, it was stopped.
        let _ = attached.send(handle.confirmed_shared());
        tracing::info!(
            route = self.route_name(route),
            at = %self.received,
            "the new route joins the stream"
        );
        self.routes[route] = Member::Attached(handle);
    }

    /// A route's copy task ended.
    fn copy_ended(
        &mut self,
        ended: Result<(tokio::task::Id, CopyEnded), tokio::task::JoinError>,
    ) -> Result<Option<Ended>, Error> {
        let (route, result) = match ended {
            // A copy stopped for another that started (a resync) may have ended just before:
            // it is not the route's copy any more.
            Ok((task, (route, _)))
                if self.copy_handles[route].as_ref().map(|h| h.id()) != Some(task) =>
            {
                return Ok(None)
            }
            Ok((_, ended)) => ended,
            Err(join) if join.is_panic() => {
                // A bug in one route's copy: that copy stops, the fan-out goes on.
                let route = self
                    .copy_handles
                    .iter()
                    .position(|handle| handle.as_ref().is_some_and(|h| h.id() == join.id()));
                tracing::error!(
                    route = route.map_or("-", |route| self.route_name(route)),
                    "the route's online copy panicked (a bug: please report it); the route \
                     streams on, marked as copying, and the next start of usersync run copies \
                     it again"
                );
                if let Some(route) = route {
                    self.copies[route] = None;
                    self.copy_handles[route] = None;
                    self.copy_stuck[route] = true;
                }
                return Ok(None);
            }
            // Stopped (its route went away): the next session starts it again.
            Err(_) => return Ok(None),
        };
        self.copies[route] = None;
        self.copy_handles[route] = None;
        // Still marked on its target: the route shows as copying until a restart copies it.
        self.copy_stuck[route] = result.is_err();
        match result {
            Ok(CopyEnd::Done) => Ok(None),
            Ok(CopyEnd::HasCheckpoint) => {
                tracing::info!(
                    route = self.route_name(route),
                    "the new route's target has a checkpoint already: starting a new session, \
                     in which it joins from there"
                );
                Ok(Some(Ended::Rejoin))
            }
            Err(error) if matches!(self.routes[route], Member::Joining { .. }) => {
                tracing::error!(
                    route = self.route_name(route),
                    error = %crate::error::report(&error),
                    "the new route's target cannot be prepared until this is fixed: the other \
                     routes go on, and the slot waits for this one (restart usersync run once \
                     fixed, or let --evict-after release the slot)"
                );
                Ok(None)
            }
            Err(error) => {
                tracing::error!(
                    route = self.route_name(route),
                    error = %crate::error::report(&error),
                    "the route's online copy cannot go on until this is fixed: the route \
                     streams on (its target lacks users from before it joined), marked as \
                     copying; restart usersync run once fixed, and the copy starts again"
                );
                Ok(None)
            }
        }
    }

    /// Streams until stopped or, in a replay, until the end, or until a route that went
    /// away can come back ([`Ended::Rejoin`]); the connection is closed after.
    pub async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Ended, Error> {
        let ended = self.stream_until(shutdown).await?;
        self.stream.finish().await;
        Ok(ended)
    }

    /// Reads the stream while the routes write. Reading pauses only while a route's feed is
    /// full (its target is behind and its next batch is full).
    async fn stream_until(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Ended, Error> {
        loop {
            self.metrics.liveness().progress();
            if self.finished {
                self.finish_routes().await?;
                return Ok(Ended::Done);
            }
            if self.rejoin {
                tracing::info!("starting a new session, in which the resynced route joins");
                self.finish_routes().await?;
                return Ok(Ended::Rejoin);
            }
            let status_due = self.last_status + self.status_interval;
            let idle_due = self.idle_due();
            let timer = status_due
                .min(self.silence.check_due())
                .min(idle_due.unwrap_or(status_due));
            tokio::select! {
                biased;
                _ = stopped(shutdown) => {
                    self.finish_routes().await?;
                    tracing::info!(confirmed = %self.reported.position(), "stopped");
                    return Ok(Ended::Done);
                }
                ended = self.route_tasks.join_next_with_id(), if !self.route_tasks.is_empty() => {
                    self.route_ended(ended)?
                }
                changed = async {
                    match self.fleet.reload.as_mut() {
                        Some(reload) => reload.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if changed {
                        self.add_routes();
                    } else {
                        // Nothing sends any more (the process is stopping).
                        self.fleet.reload = None;
                    }
                }
                Some(joined) = self.joins.recv() => self.joined(joined),
                Some(Ok((route, marked))) = self.resync_checks.join_next(),
                    if !self.resync_checks.is_empty() => self.resync(route, marked),
                Some(ended) = self.copy_tasks.join_next_with_id(), if !self.copy_tasks.is_empty() => {
                    if let Some(ended) = self.copy_ended(ended)? {
                        self.finish_routes().await?;
                        return Ok(ended);
                    }
                }
                Some(back) = self.probes.join_next(), if !self.probes.is_empty() => {
                    // A probe stopped (its route evicted) ends without a route.
                    let Ok(route) = back else { continue };
                    tracing::info!(
                        route = self.route_name(route),
                        "the route's target answers again: starting a new session, in which it \
                         catches up from its checkpoint"
                    );
                    self.finish_routes().await?;
                    return Ok(Ended::Rejoin);
                }
                _ = self.confirmations.notified() => self.send_status(false).await?,
                payload = self.stream.recv() => match payload? {
                    Some(payload) => {
                        self.handle(payload).await?;
                        // After handling: feeding a full route waits while nothing is read.
                        self.silence.heard();
                    }
                    None => return Err(SourceError::Replication(
                        crate::source::ReplicationError::Closed,
                    ).into()),
                },
                _ = tokio::time::sleep_until(timer.into()) => {
                    self.check_silence().await?;
                    if idle_due.is_some_and(|due| Instant::now() >= due) {
                        self.feed_pending_idle().await?;
                    }
                    if Instant::now() >= status_due {
                        // A replay asks for keepalives: their position tells it when it is done.
                        self.send_status(matches!(self.mode, Mode::Replay { .. })).await?;
                    }
                }
            }
        }
    }

    /// Asks a quiet source for a reply; gives up on one silent for the whole timeout.
    async fn check_silence(&mut self) -> Result<(), Error> {
        match self.silence.check() {
            Verdict::Fine => Ok(()),
            Verdict::AskForReply(silent_for) => {
                tracing::debug!(
                    silent_ms = silent_for.as_millis() as u64,
                    "the source is quiet; asking for a reply"
                );
                self.send_status(true).await
            }
            Verdict::Dead(silent_for) => {
                Err(SourceError::Replication(self.stream.silent(silent_for)).into())
            }
        }
    }

    async fn handle(&mut self, payload: Bytes) -> Result<(), Error> {
        match decode_replication_message(payload)? {
            ReplicationMessage::XLogData {
                wal_end,
                data,
                server_time_micros,
                ..
            } => {
                self.clock
                    .observe_server_time(server_time_micros, self.metrics);
                self.received = self.received.max(wal_end);
                let message = self.decoder.decode(data.clone())?;
                let assembled = self.assembler.push_payload(message, data)?;
                match (&assembled, self.streaming_since) {
                    (Assembled::Transaction(transaction), Some(since))
                        if transaction.commit_time_micros >= since =>
                    {
                        self.metrics.observe_source_send_delay(
                            transaction.commit_time_micros,
                            server_time_micros,
                        );
                    }
                    _ => {}
                }
                match assembled {
                    Assembled::Transaction(transaction) if is_large(&transaction) => {
                        self.feed_large_transaction(transaction).await?;
                    }
                    Assembled::Transaction(transaction) => {
                        if let Err(error) = self.feed_transaction(transaction).await {
                            // Keep what came before the bad transaction: apply and confirm it,
                            // then stop with the error.
                            self.confirm_before_failing().await;
                            return Err(error);
                        }
                    }
                    Assembled::Relation(relation) => self.changes.note(relation)?,
                    Assembled::NonTransactionalMessage(_) | Assembled::Nothing => {}
                }
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested,
                server_time_micros,
            } => {
                self.clock
                    .observe_server_time(server_time_micros, self.metrics);
                if !reply_requested {
                    self.streaming_since.get_or_insert(server_time_micros);
                }
                self.received = self.received.max(wal_end);
                // Everything before the keepalive's position has been sent: with no
                // transaction half-read, nothing up to it is for the targets but what they
                // have been fed.
                if self.assembler.is_idle() {
                    if let Mode::Replay { until, .. } = self.mode {
                        if wal_end >= until {
                            self.finished = true;
                        }
                    }
                    let in_interval = self
                        .idle_fed_at
                        .is_some_and(|at| at.elapsed() < IDLE_FEED_INTERVAL);
                    let sent_at = self
                        .config
                        .heartbeat_interval
                        .is_none()
                        .then(|| pg_micros_to_unix_micros(server_time_micros));
                    if in_interval {
                        // Fed at the interval's end: the furthest position of its keepalives
                        // (a lower one, from a server going back, must not replace it).
                        let position = self
                            .idle_pending
                            .map_or(wal_end, |(held, _)| held.max(wal_end));
                        self.idle_pending = Some((position, sent_at));
                    } else {
                        self.feed_idle(wal_end, sent_at).await?;
                    }
                }
                if reply_requested {
                    self.send_status(false).await?;
                }
            }
        }
        Ok(())
    }

    /// Whether a committed transaction is still to be applied: not one every target holds
    /// already, nor, in a replay, one at or past its end (which ends the replay).
    fn wanted(&mut self, transaction: &Transaction) -> bool {
        if transaction.commit_lsn < self.skip_before {
            self.metrics.transaction_skipped();
            return false;
        }
        if let Mode::Replay { until, .. } = self.mode {
            if transaction.commit_lsn >= until {
                self.finished = true;
                return false;
            }
        }
        true
    }

    /// Maps the whole transaction first, then feeds it: a row that cannot be mapped fails
    /// the transaction before any of it reaches a route. Each route gets its own changes; a
    /// route with none is told only with the next status update (one route: at once, which
    /// costs nothing there).
    async fn feed_transaction(&mut self, transaction: Transaction) -> Result<(), Error> {
        if !self.wanted(&transaction) {
            return self.changes.note_skipped(transaction);
        }
        // The copies' messages (see [`backfill`]): a watermark's chunk goes to its route
        // with this transaction; a resync starts once it is fed.
        let marks: Vec<Mark> = if self.config.routes.is_some() && self.mode == Mode::Service {
            transaction
                .changes
                .iter()
                .filter_map(|change| match change {
                    LogicalMessage::Message(message) if message.prefix == self.copy_prefix => {
                        backfill::parse_mark(&message.content)
                    }
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let xid = transaction.xid;
        let mut routed = Routed::new(self.routes.len());
        for change in transaction.changes {
            self.changes.map(change, &mut routed)?;
        }
        let at = pg_micros_to_unix_micros(transaction.commit_time_micros);
        if self.mode.is_dry_run() {
            let meta = transaction_meta(&transaction.commit_lsn, at);
            self.print_routed(&meta, transaction.commit_lsn, &routed);
            return Ok(());
        }
        let position = CommitPosition {
            commit_lsn: transaction.commit_lsn,
            end_lsn: transaction.end_lsn,
            commit_time: at,
        };
        let one_route = self.routes.len() == 1;
        for route in 0..self.routes.len() {
            let mut changes = routed.take(route);
            let heartbeat = matches!(changes.last(), Some(UserChange::Heartbeat));
            if heartbeat {
                changes.pop();
            }
            // Only what the route applies counts: before it joins, or below its checkpoint
            // (a session that starts lower for another route), the chunks bring it all.
            let applies =
                self.routes[route].fed().is_some() && position.commit_lsn >= self.started_at[route];
            if let Some(window) = self.copies[route].as_mut().filter(|_| applies) {
                window.record(xid, &changes);
                for mark in &marks {
                    if let Mark::Chunk(attempt, seq) = *mark {
                        if let Some(chunk) = window.take(attempt, seq) {
                            changes.extend(chunk);
                        }
                    }
                }
            }
            if changes.is_empty() && !heartbeat && !one_route {
                self.untold[route] = Some(position.end_lsn);
                continue;
            }
            let Some(permit) = self.room(route, changes.len()).await? else {
                continue;
            };
            self.send(
                route,
                Feed::Transaction {
                    position,
                    changes,
                    heartbeat,
                },
                permit,
            )
            .await?;
        }
        for mark in marks {
            if let Mark::Resync(route) = mark {
                self.resync_asked(&route, position.commit_lsn);
            }
        }
        Ok(())
    }

    /// A message asks for `resync --online` of the route named `name`, committed at
    /// `commit_lsn`: once its target shows the mark `resync --online` leaves there, the
    /// route is resynced ([`Session::resync`]). A message alone does nothing: anyone who may
    /// emit messages on the source can write one.
    fn resync_asked(&mut self, name: &str, commit_lsn: Lsn) {
        let Some(route) = self
            .route_configs
            .iter()
            .position(|config| config.route_name() == Some(name))
        else {
            tracing::warn!(
                route = name,
                "asked to resync a route this run does not have (its routes file is older?)"
            );
            return;
        };
        // Read again below the route's checkpoint (a session started lower for another
        // route): asked, and done, before.
        if commit_lsn < self.started_at[route] || !self.resync_checking.insert(route) {
            return;
        }
        let config = self.route_configs[route].clone();
        self.resync_checks.spawn(async move {
            let marked = async {
                let client = crate::conn::sql::connect(&config.target, super::APPLICATION_NAME)
                    .await
                    .ok()?;
                let (asked, reconciles) =
                    crate::apply::copy_asked(&client, &config.checkpoint_key())
                        .await
                        .ok()??;
                reconciles.then_some(asked)
            };
            let marked = tokio::time::timeout(super::BACKOFF_MAX, marked).await;
            (route, marked.ok().flatten())
        });
    }

    /// `resync --online` of route `route`, whose target is marked so: an attached route is
    /// copied again, reconciling, from here on; any other comes back in a new session, from
    /// where the slot stands (see `start::resume_point`).
    fn resync(&mut self, route: usize, marked: Option<String>) {
        self.resync_checking.remove(&route);
        let Some(asked) = marked else {
            // Also a message read again after the resync it asked for is done.
            tracing::info!(
                route = self.route_name(route),
                "a message asks to resync the route, but its target is not marked so (by \
                 usersync resync --online): ignored"
            );
            return;
        };
        if self.resynced[route].as_ref() == Some(&asked) {
            // Started for this request already (its message read again, or forged).
            return;
        }
        tracing::info!(
            route = self.route_name(route),
            "resync --online: copying the route again"
        );
        match &self.routes[route] {
            Member::Attached(handle) => {
                let confirmed = handle.confirmed_shared();
                self.stop_copy(route);
                self.start_copy(
                    route,
                    CopyKind::Reconcile,
                    backfill::Start::Attached(confirmed),
                );
            }
            // Joining: it has no checkpoint to mark.
            Member::Joining { .. } => return,
            _ => {
                self.fleet.health[route].resynced();
                self.rejoin = true;
            }
        }
        self.resynced[route] = Some(asked);
    }

    /// A transaction of over 10,000 changes (or spilled to disk) goes to the targets in
    /// parts, read, mapped and fed [`PART_CHANGES`] at a time; each route writes them into
    /// one target transaction that commits with the checkpoint: memory stays bounded and the
    /// target still sees the source transaction whole or not at all. Status updates keep
    /// going out meanwhile, so the source does not time the connection out.
    async fn feed_large_transaction(&mut self, transaction: Transaction) -> Result<(), Error> {
        if !self.wanted(&transaction) {
            return self.changes.note_skipped(transaction);
        }
        let at = pg_micros_to_unix_micros(transaction.commit_time_micros);
        let position = CommitPosition {
            commit_lsn: transaction.commit_lsn,
            end_lsn: transaction.end_lsn,
            commit_time: at,
        };
        tracing::info!(
            commit_lsn = %transaction.commit_lsn,
            changes = transaction.len(),
            spilled = transaction.spilled.is_some(),
            "applying a large transaction in parts"
        );
        if let Err(error) = self.feed_in_parts(transaction, position).await {
            // Nothing of it may reach the target: the routes roll back what they wrote.
            if !self.mode.is_dry_run() {
                let _ = self.feed_all(|| Feed::LargeAbort).await;
            }
            self.confirm_before_failing().await;
            return Err(error);
        }
        Ok(())
    }

    async fn feed_in_parts(
        &mut self,
        transaction: Transaction,
        position: CommitPosition,
    ) -> Result<(), Error> {
        let dry_run = self.mode.is_dry_run();
        let xid = transaction.xid;
        let meta = transaction_meta(&position.commit_lsn, position.commit_time);
        let routes = self.routes.len();
        let one_route = routes == 1;
        let mut routed = Routed::new(routes);
        // Per route: whether any change of the transaction was for it, and whether it was
        // fed a part (it then has the target transaction open, which its end commits).
        let mut carried = vec![false; routes];
        let mut started = vec![false; routes];
        let mut marks: Vec<Mark> = Vec::new();
        let mut read = 0_usize;
        let mut room = None;
        let mut all = transaction.into_changes().peekable();
        while let Some(change) = all.next() {
            if one_route && room.is_none() && !dry_run {
                // Room for a whole part before it is mapped: the route has handed the one
                // before to its writer, so a transaction of any size holds three parts at
                // most: one being written, one queued behind it, and the next, mapped while
                // they are. (Several routes: each holds two shares at most, one being written
                // and the next waiting for it, while the reader maps the part after.)
                room = self.room(0, PART_CHANGES).await?;
            }
            let change = change?;
            // A copy's message in a transaction that spilled (streamed beside a large one).
            if let LogicalMessage::Message(message) = &change {
                if message.prefix == self.copy_prefix && self.mode == Mode::Service {
                    marks.extend(backfill::parse_mark(&message.content));
                }
            }
            self.changes.map(change, &mut routed)?;
            read += 1;
            let last = all.peek().is_none();
            if routed.len() < PART_CHANGES && !last {
                // Changes that map to nothing (other tables, skipped rows) fill no part, so
                // the status updates that keep the source connection (and the liveness
                // bound) satisfied are counted in changes read.
                if read.is_multiple_of(LARGE_TRANSACTION_CHANGES)
                    && self.last_status.elapsed() >= self.status_interval
                {
                    self.send_status(false).await?;
                }
                continue;
            }
            if dry_run {
                self.print_routed(&meta, position.commit_lsn, &routed);
                routed.clear();
                continue;
            }
            for route in 0..routes {
                carried[route] |= routed
                    .of(route)
                    .iter()
                    .any(|change| !matches!(change, UserChange::Heartbeat));
                let mut part = routed.take(route);
                let applies = self.routes[route].fed().is_some()
                    && position.commit_lsn >= self.started_at[route];
                if let Some(window) = self.copies[route].as_mut().filter(|_| applies) {
                    window.record(xid, &part);
                    if last {
                        for mark in &marks {
                            if let Mark::Chunk(attempt, seq) = *mark {
                                part.extend(window.take(attempt, seq).unwrap_or_default());
                            }
                        }
                    }
                }
                let feed = if last {
                    if !one_route && !started[route] && part.is_empty() {
                        // Nothing of the transaction was for this route.
                        self.untold[route] = Some(position.end_lsn);
                        continue;
                    }
                    Feed::LargeEnd {
                        position,
                        changes: part,
                        carried: carried[route],
                    }
                } else if part.is_empty() && !one_route {
                    continue;
                } else {
                    started[route] = true;
                    Feed::Part {
                        position,
                        changes: part,
                    }
                };
                let permit = match room.take() {
                    Some(permit) => Some(permit),
                    None if one_route => self.room(0, PART_CHANGES).await?,
                    None => self.room(route, feed_len(&feed)).await?,
                };
                if let Some(permit) = permit {
                    self.send(route, feed, permit).await?;
                }
            }
            if self.last_status.elapsed() >= self.status_interval {
                self.send_status(false).await?;
            }
        }
        for mark in marks {
            if let Mark::Resync(route) = mark {
                self.resync_asked(&route, position.commit_lsn);
            }
        }
        if read == 0 && !dry_run {
            // No change at all (a spilled transaction can be empty): it still moves the
            // position.
            for route in 0..routes {
                if !one_route {
                    self.untold[route] = Some(position.end_lsn);
                    continue;
                }
                if let Some(permit) = self.room(route, 0).await? {
                    let feed = Feed::Transaction {
                        position,
                        changes: Vec::new(),
                        heartbeat: false,
                    };
                    self.send(route, feed, permit).await?;
                }
            }
        }
        Ok(())
    }

    /// Room in route `route`'s feed for `changes`; while it is full (the route's target is
    /// behind), status updates keep going out, and a route that fails ends the wait. `None`:
    /// the route is not fed (any more): it went away, or, in a fan-out, it was too slow for
    /// [`Session::slow_after`] and is left behind (see [`fleet`]) so the others go on.
    async fn room(
        &mut self,
        route: usize,
        changes: usize,
    ) -> Result<Option<OwnedSemaphorePermit>, Error> {
        let Some(handle) = self.routes[route].fed() else {
            return Ok(None);
        };
        if let Some(permit) = handle.room_now(changes) {
            return Ok(Some(permit));
        }
        let waiting_since = Instant::now();
        let fan_out = self.routes.len() > 1 && self.mode == Mode::Service;
        loop {
            let Some(handle) = self.routes[route].fed() else {
                return Ok(None);
            };
            let status_due = self.last_status + self.status_interval;
            let slow_at = waiting_since + self.slow_after;
            let timer = if fan_out {
                status_due.min(slow_at)
            } else {
                status_due
            };
            tokio::select! {
                permit = handle.room(changes) => return Ok(Some(permit)),
                ended = self.route_tasks.join_next_with_id(), if !self.route_tasks.is_empty() => {
                    self.route_ended(ended)?
                }
                _ = self.confirmations.notified() => self.send_status(false).await?,
                _ = tokio::time::sleep_until(timer.into()) => {
                    if fan_out && Instant::now() >= slow_at {
                        self.leave_behind(route);
                        return Ok(None);
                    }
                    self.send_status(false).await?
                }
            }
        }
    }

    /// Hands `feed` to route `route`; a route that has ended says why (in a fan-out, where
    /// its task is joined).
    async fn send(
        &mut self,
        route: usize,
        feed: Feed,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), Error> {
        let Some(handle) = self.routes[route].fed() else {
            return Ok(());
        };
        if handle.send(feed, permit) || (self.routes.len() > 1 && self.mode == Mode::Service) {
            Ok(())
        } else {
            let ended = self.route_tasks.join_next_with_id().await;
            self.route_ended(ended)
        }
    }

    /// When the idle position held back, if one is, is to be fed: at the end of the interval
    /// that began with the last one fed.
    fn idle_due(&self) -> Option<Instant> {
        self.idle_pending?;
        Some(self.idle_fed_at? + IDLE_FEED_INTERVAL)
    }

    /// Feeds an idle position to every route, starting an interval in which the next ones
    /// are held back; `sent_at` is its keepalive's send time, for the lag while idle.
    async fn feed_idle(&mut self, position: Lsn, sent_at: Option<UnixMicros>) -> Result<(), Error> {
        self.idle_fed_at = Some(Instant::now());
        self.idle_pending = None;
        self.feed_all(|| Feed::Idle { position, sent_at }).await
    }

    /// Feeds the idle position held back, if any. Its send time is up to an interval old, so
    /// the lag while idle it gives errs high, never low.
    async fn feed_pending_idle(&mut self) -> Result<(), Error> {
        match self.idle_pending {
            Some((position, sent_at)) => self.feed_idle(position, sent_at).await,
            None => Ok(()),
        }
    }

    /// Feeds every route the same message.
    async fn feed_all(&mut self, feed: impl Fn() -> Feed) -> Result<(), Error> {
        for route in 0..self.routes.len() {
            if let Some(permit) = self.room(route, 0).await? {
                self.send(route, feed(), permit).await?;
            }
        }
        Ok(())
    }

    /// Leaves a route too slow to keep up behind: it applies what it holds, makes it durable
    /// and ends, holding the slot where its target stands; it rejoins in a later session.
    fn leave_behind(&mut self, route: usize) {
        let member = std::mem::replace(&mut self.routes[route], Member::Evicted);
        self.routes[route] = match member {
            Member::Attached(handle) => {
                tracing::warn!(
                    route = self.route_name(route),
                    waited_ms = self.slow_after.as_millis() as u64,
                    "the route's target cannot keep up: left behind so that the other routes \
                     go on; it applies what it holds, and rejoins, catching up from its \
                     checkpoint, in a later session"
                );
                handle.finish_now();
                Member::Draining(handle)
            }
            other => other,
        };
        self.stop_copy(route);
    }

    /// A route's task ended. One route: its error ends the session, as always. A fan-out:
    /// the route is left behind where its target stands, and probed until it answers; one
    /// that finished after being left behind rejoins in a new session.
    fn route_ended(&mut self, ended: Option<JoinedRoute>) -> Result<(), Error> {
        let (task, result) = match ended {
            Some(Ok((task, result))) => (task, result),
            // A panic in a route is a bug: it goes on as one, as if it were the session's own.
            Some(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Some(Err(_)) | None => return Err(crate::apply::ApplyError::WorkerGone.into()),
        };
        if self.routes.len() == 1 || self.mode != Mode::Service {
            return match result {
                Err(error) => Err(error),
                Ok(()) => Err(crate::apply::ApplyError::WorkerGone.into()),
            };
        }
        let Some(route) = self.task_routes.remove(&task) else {
            return Ok(());
        };
        let held = self.routes[route].holds().unwrap_or(Lsn::ZERO);
        let delay = match result {
            // Told to finish at the end of the session: nothing more to do.
            Ok(()) if matches!(self.routes[route], Member::Attached(_)) => return Ok(()),
            // Left behind, and done with what it held: it rejoins, less often each time.
            Ok(()) => Some(self.fleet.health[route].left_behind()),
            Err(error) if error.is_transient() => {
                self.fleet.health[route].failed();
                tracing::warn!(
                    route = self.route_name(route),
                    held = %held,
                    error = %crate::error::report(&error),
                    "the route failed: the other routes go on, the slot waits at its \
                     position, and its target is probed until it answers"
                );
                Some(self.fleet.health[route].backoff())
            }
            Err(error) => {
                // Retrying will not fix it: no probe (it would rejoin into the same wall,
                // again and again); a restart of run after the fix retries it.
                self.fleet.health[route].failed();
                tracing::error!(
                    route = self.route_name(route),
                    held = %held,
                    error = %crate::error::report(&error),
                    "the route failed and needs a fix: the other routes go on and the slot \
                     waits at its position (restart usersync run once fixed, or let \
                     --evict-after release the slot)"
                );
                None
            }
        };
        self.routes[route] = Member::Detached { held };
        self.stop_copy(route);
        if let Some(delay) = delay {
            self.probe_handles[route] = Some(self.probes.spawn(fleet::probe(
                route,
                self.route_configs[route].clone(),
                delay,
            )));
        }
        Ok(())
    }

    /// A routes file read again (SIGHUP): its new routes join while the others stream. Each
    /// holds the slot where it has been reported while its target is prepared, then joins
    /// the stream and is copied online ([`backfill`]), the others going on. Anything
    /// else that changed (a route removed or changed, values moved, a new default) takes
    /// effect only when `run` restarts, and is said so.
    fn add_routes(&mut self) {
        let Some(new) = self
            .fleet
            .reload
            .as_mut()
            .and_then(|reload| reload.borrow_and_update().clone())
        else {
            return;
        };
        let current = self
            .fleet
            .next_config
            .clone()
            .unwrap_or_else(|| self.config.clone());
        let Some(old) = current.routes.clone() else {
            return;
        };
        let (merged, added) = fleet::merge_added(&old, &new);
        if added.is_empty() {
            tracing::info!("routes file read again: no route to add");
            return;
        }
        let merged = Arc::new(merged);
        let mut next = current;
        next.routes = Some(Arc::clone(&merged));
        let configs = next.route_configs();
        self.changes.set_routes(Arc::clone(&merged));
        let held = self.reported.position();
        for index in added {
            debug_assert_eq!(index, self.routes.len());
            tracing::info!(
                route = configs[index].route_name().unwrap_or_default(),
                held = %held,
                "route added from the routes file"
            );
            self.route_configs.push(configs[index].clone());
            self.fleet.health.push(RouteHealth::default());
            self.add_route(index, RouteStart::Unset { held });
        }
        self.fleet.next_config = Some(next);
    }

    /// `replay --dry-run`: each route's changes as JSON lines, with `"route"` in a fan-out;
    /// nothing for a route whose checkpoint holds the transaction (committed at `commit_lsn`)
    /// already.
    fn print_routed(
        &self,
        meta: &serde_json::Map<String, serde_json::Value>,
        commit_lsn: Lsn,
        routed: &Routed,
    ) {
        for (route, config) in self.route_configs.iter().enumerate() {
            if commit_lsn < self.started_at[route] {
                continue;
            }
            let changes = routed
                .of(route)
                .iter()
                .filter(|change| !matches!(change, UserChange::Heartbeat));
            match config.route_name() {
                None => print_changes(meta, changes),
                Some(name) => {
                    let mut meta = meta.clone();
                    meta.insert("route".into(), name.into());
                    print_changes(&meta, changes);
                }
            }
        }
    }

    /// Route `route`'s name, for logs.
    fn route_name(&self, route: usize) -> &str {
        self.route_configs[route].route_name().unwrap_or("-")
    }

    /// Before a session ends, by request or at a replay's end: every route applies what it
    /// was fed and makes it durable; then the slot is confirmed up to it.
    async fn finish_routes(&mut self) -> Result<(), Error> {
        self.feed_pending_idle().await?;
        self.feed_all(|| Feed::Finish).await?;
        loop {
            let status_due = self.last_status + self.status_interval;
            tokio::select! {
                ended = self.route_tasks.join_next_with_id() => match ended {
                    None => break,
                    Some(Ok((task, Ok(())))) => {
                        self.task_routes.remove(&task);
                    }
                    ended => self.route_ended(ended)?,
                },
                _ = tokio::time::sleep_until(status_due.into()) => self.send_status(false).await?,
            }
        }
        self.send_status(false).await
    }

    /// Before a session ends with an error: confirms what was applied, if the connections
    /// still allow it. A failure here is only logged: the error that ends the session is
    /// the one to report.
    async fn confirm_before_failing(&mut self) {
        if let Err(error) = self.finish_routes().await {
            tracing::debug!(error = %crate::error::report(&error), "confirming before the session ends");
        }
    }

    /// The position every route's target holds durably (an evicted route holds nothing);
    /// notes the routes that work again, and evicts those down past `--evict-after`.
    fn confirmed(&mut self) -> Lsn {
        let settled = self.started.elapsed() >= fleet::SETTLED;
        for route in 0..self.routes.len() {
            match &self.routes[route] {
                Member::Attached(handle) if handle.confirmed() > self.started_at[route] => {
                    self.fleet.health[route].progressed();
                    if settled {
                        self.fleet.health[route].settled();
                    }
                }
                Member::Detached { held } | Member::Joining { held } => {
                    let held = *held;
                    let down_too_long = self
                        .config
                        .evict_after
                        .filter(|limit| self.fleet.health[route].down_longer_than(*limit))
                        .map(|limit| {
                            format!("down longer than --evict-after ({}s)", limit.as_secs())
                        });
                    // The source's WAL past where the slot waits for it: what it costs there.
                    let behind = self.received.0.saturating_sub(held.0);
                    let too_far_behind = self
                        .config
                        .evict_after_wal
                        .filter(|limit| behind > *limit)
                        .map(|limit| {
                            format!(
                                "{behind} bytes of WAL behind, past --evict-after-wal ({limit})"
                            )
                        });
                    if let Some(why) = down_too_long.or(too_far_behind) {
                        tracing::error!(
                            route = self.route_name(route),
                            why,
                            "the route is evicted: the slot no longer waits for it, and its \
                             target needs usersync resync --routes <file> --online <route>"
                        );
                        self.fleet.health[route].evict();
                        self.routes[route] = Member::Evicted;
                        if let Some(probe) = self.probe_handles[route].take() {
                            probe.abort();
                        }
                        self.stop_copy(route);
                    }
                }
                _ => {}
            }
        }
        for (route, (member, config)) in self.routes.iter().zip(&self.route_configs).enumerate() {
            if let Some(name) = config.route_name() {
                let durable = member.holds().map(|lsn| lsn.0);
                let copying = self.copies[route].is_some() || self.copy_stuck[route];
                let state = match member {
                    Member::Attached(_) if copying => "copying",
                    member => member.state(),
                };
                self.metrics.set_route_state(name, state, durable);
            }
        }
        self.routes
            .iter()
            .filter_map(Member::holds)
            .min()
            .unwrap_or(self.reported.position())
    }

    /// Tells each route fed nothing lately up to where the others were fed, so that its
    /// durable position (and with it the slot) moves on. Only a route with room in its
    /// feed: one without has work pending, and is told later.
    fn tell_untold(&mut self) {
        for (route, untold) in self.routes.iter().zip(self.untold.iter_mut()) {
            let Some(position) = *untold else { continue };
            let Some(route) = route.fed() else {
                *untold = None;
                continue;
            };
            let Some(permit) = route.room_now(0) else {
                continue;
            };
            // A route that has ended says why where its task is joined.
            let _ = route.send(
                Feed::Idle {
                    position,
                    sent_at: None,
                },
                permit,
            );
            *untold = None;
        }
    }

    async fn send_status(&mut self, reply_requested: bool) -> Result<(), Error> {
        if self
            .leader
            .as_ref()
            .is_some_and(tokio_postgres::Client::is_closed)
        {
            return Err(SourceError::Replication(crate::source::ReplicationError::Closed).into());
        }
        self.tell_untold();
        let flushed = if self.mode.is_dry_run() {
            // A dry run confirms nothing: the server ignores an invalid (zero) position.
            Lsn::ZERO
        } else {
            let durable = self.confirmed();
            self.reported.report(durable)
        };
        let written = self.received.max(flushed);
        let update = encode_standby_status_update(
            written,
            flushed,
            flushed,
            unix_micros_to_pg_micros(unix_micros_now()),
            reply_requested,
        );
        self.stream.send(update).await?;
        self.last_status = Instant::now();
        // Status updates go out every few seconds, also while the session waits for a route.
        self.metrics.liveness().progress();
        Ok(())
    }
}

/// What a copy task ends with: its route, and how.
type CopyEnded = (usize, Result<CopyEnd, Error>);

/// What joining a route's task gives: which task, and how it ended.
type JoinedRoute = Result<(tokio::task::Id, Result<(), Error>), tokio::task::JoinError>;

/// The changes a feed message carries.
fn feed_len(feed: &Feed) -> usize {
    match feed {
        Feed::Transaction { changes, .. }
        | Feed::Part { changes, .. }
        | Feed::LargeEnd { changes, .. } => changes.len(),
        Feed::LargeAbort | Feed::Idle { .. } | Feed::Finish => 0,
    }
}
