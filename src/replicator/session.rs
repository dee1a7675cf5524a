//! One streaming session: reads the stream, hands batches to the writer, reports positions.
//!
//! The stream is read while the [`ApplyWorker`] writes the previous batch on its own task:
//! decode ([`crate::decode`]), map ([`super::changes`]), batch ([`super::batcher`]), apply.
//! What the target holds durably is the [`Ledger`]'s; the lag the [`LagTracker`]'s; whether
//! the source is still there the [`SilenceWatch`]'s. The session ties them together and sends
//! the status updates, the only place the slot is confirmed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::batcher::{Batcher, MAX_BATCH_CHANGES};
use super::changes::{print_changes, transaction_meta, ChangeMapper, UserChange};
use super::lag::LagTracker;
use super::ledger::{Flush, Ledger};
use super::silence::{SilenceWatch, Verdict};
use super::{stopped, Mode};
use crate::apply::{ApplyWorker, CommitPosition, Done, Job, UnixMicros};
use crate::config::Config;
use crate::decode::{
    decode_replication_message, encode_standby_status_update, pg_micros_to_unix_micros,
    unix_micros_to_pg_micros, Assembled, PgOutputDecoder, ReplicationMessage, Transaction,
    TransactionAssembler,
};
use crate::error::Error;
use crate::lag::unix_micros_now;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::source::{ReplicationStream, SourceError};

/// Changes per part of a large transaction ([`Session::add_in_parts`]): a part is held
/// twice over (being written while the next one is mapped), as parsed `raw_json` and as the
/// statement's encoded parameters, so this bounds the memory a transaction of any size
/// takes; a round trip per part is little beside the writing of its rows.
const PART_CHANGES: usize = 2_000;

/// What the session remembers of the job the worker is doing.
enum InFlight {
    /// A batch: its oldest commit time, and a heartbeat that came behind it.
    Batch {
        oldest_commit: Option<UnixMicros>,
        heartbeat: Option<UnixMicros>,
    },
    /// A part of a large transaction.
    Part,
    /// A durability flush, and what it covers.
    Flush(Flush),
}

/// Whether a transaction goes to the target in parts rather than in a batch.
fn is_large(transaction: &Transaction) -> bool {
    transaction.spilled.is_some() || transaction.len() > MAX_BATCH_CHANGES
}

/// What a session streams with, as [`super::start`] prepares it.
pub(super) struct Parts<'a> {
    pub config: &'a Config,
    pub metrics: &'a Arc<Metrics>,
    pub mode: Mode,
    pub status_interval: Duration,
    pub stream: ReplicationStream,
    pub worker: ApplyWorker,
    pub changes: ChangeMapper,
    /// The durable checkpoint the stream starts from.
    pub resume_at: Lsn,
    /// Where the slot is confirmed already: no status update reports less.
    pub slot_confirmed: Lsn,
    /// When this session's heartbeats began (see [`LagTracker`]).
    pub monitor_started: UnixMicros,
}

pub(super) struct Session<'a> {
    config: &'a Config,
    metrics: &'a Arc<Metrics>,
    mode: Mode,
    /// How often a status update goes out, whatever happens.
    status_interval: Duration,
    stream: ReplicationStream,
    worker: ApplyWorker,
    decoder: PgOutputDecoder,
    assembler: TransactionAssembler,
    changes: ChangeMapper,
    batcher: Batcher,
    ledger: Ledger,
    lag: LagTracker<'a>,
    silence: SilenceWatch,
    /// The job the worker is doing, if any.
    in_flight: Option<InFlight>,
    /// A large transaction is being applied in parts.
    in_large_transaction: bool,
    /// A replay reached its end position.
    finished: bool,
    /// The furthest WAL position the server has reported.
    received: Lsn,
    last_status: Instant,
}

impl<'a> Session<'a> {
    pub fn new(parts: Parts<'a>) -> Self {
        let Parts {
            config,
            metrics,
            mode,
            status_interval,
            stream,
            worker,
            changes,
            resume_at,
            slot_confirmed,
            monitor_started,
        } = parts;
        Session {
            config,
            metrics,
            mode,
            status_interval,
            stream,
            worker,
            decoder: PgOutputDecoder::new(),
            assembler: TransactionAssembler::with_memory_limit(config.spill_threshold),
            changes,
            batcher: Batcher::with_part_keys(config.mapping.part_keys()),
            ledger: Ledger::new(resume_at, slot_confirmed, !mode.is_dry_run()),
            lag: LagTracker::new(metrics, monitor_started),
            silence: SilenceWatch::new(config.source_timeout),
            in_flight: None,
            in_large_transaction: false,
            finished: false,
            received: resume_at,
            last_status: Instant::now(),
        }
    }

    /// Streams until stopped or, in a replay, until the end; the connection is closed after.
    pub async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        self.stream_until(shutdown).await?;
        self.stream.finish().await;
        Ok(())
    }
}

impl Session<'_> {
    /// Reads the stream while the worker writes the previous batch. A batch goes to the
    /// worker as soon as nothing more is readable and the worker is free; while it is busy,
    /// the next batch grows (up to [`MAX_BATCH_CHANGES`], then reading pauses).
    async fn stream_until(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        loop {
            self.metrics.liveness().progress();
            if self.finished {
                self.apply_batch().await?;
                self.make_durable().await?;
                self.send_status(false).await?;
                return Ok(());
            }
            let worker_free = self.in_flight.is_none();
            let flush_due = self.ledger.flush_due(self.caught_up());
            if worker_free && flush_due.is_some_and(|due| Instant::now() >= due) {
                self.submit_flush().await?;
                continue;
            }
            if self.batcher.is_due() && worker_free {
                self.submit_batch().await?;
                continue;
            }
            let status_due = self.last_status + self.status_interval;
            let may_read = worker_free || !self.batcher.is_due();
            self.silence.reading(may_read);
            let mut timer = status_due;
            if may_read {
                timer = timer.min(self.silence.check_due());
            }
            if let Some(flush_due) = flush_due.filter(|_| worker_free) {
                // (A busy worker wakes the loop itself when it is done.)
                timer = timer.min(flush_due);
            }
            tokio::select! {
                biased;
                _ = stopped(shutdown) => {
                    self.apply_batch().await?;
                    self.make_durable().await?;
                    self.send_status(false).await?;
                    tracing::info!(confirmed = %self.ledger.confirmed(), "stopped");
                    return Ok(());
                }
                done = self.worker.recv(), if !worker_free => self.on_done(done?).await?,
                payload = self.stream.recv(), if may_read => match payload? {
                    Some(payload) => {
                        self.handle(payload).await?;
                        // After handling: a large transaction is written while nothing is read.
                        self.silence.heard();
                    }
                    None => return Err(SourceError::Replication(
                        crate::source::ReplicationError::Closed,
                    ).into()),
                },
                // Nothing more is readable right now: write what we have.
                _ = std::future::ready(()), if worker_free && !self.batcher.is_empty() => {
                    self.submit_batch().await?
                }
                _ = tokio::time::sleep_until(timer.into()) => {
                    if may_read {
                        self.check_silence().await?;
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
                self.lag.observe_server_time(server_time_micros);
                self.received = self.received.max(wal_end);
                let message = self.decoder.decode(data.clone())?;
                match self.assembler.push_payload(message, data)? {
                    Assembled::Transaction(transaction) if is_large(&transaction) => {
                        self.add_large_transaction(transaction).await?;
                    }
                    Assembled::Transaction(transaction) => {
                        if let Err(error) = self.add_transaction(transaction) {
                            // Keep what came before the bad transaction: apply and confirm it,
                            // then stop with the error.
                            if !self.batcher.is_empty() {
                                self.apply_batch().await?;
                            }
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
                self.lag.observe_server_time(server_time_micros);
                self.received = self.received.max(wal_end);
                if let Mode::Replay { until, .. } = self.mode {
                    // Everything before `until` has been sent once a keepalive is past it.
                    if wal_end >= until && self.caught_up() {
                        self.finished = true;
                    }
                }
                if self.caught_up() {
                    self.ledger.nothing_until(wal_end);
                    if self.config.heartbeat_interval.is_none() {
                        self.lag.keepalive_while_idle(server_time_micros);
                    }
                }
                if reply_requested {
                    self.send_status(false).await?;
                }
            }
        }
        Ok(())
    }

    /// Nothing received is waiting to be applied.
    fn caught_up(&self) -> bool {
        self.batcher.is_empty()
            && self.in_flight.is_none()
            && self.assembler.is_idle()
            && !self.in_large_transaction
    }

    /// Whether a committed transaction is still to be applied: not one the target holds
    /// already, nor, in a replay, one at or past its end (which ends the replay).
    fn wanted(&mut self, transaction: &Transaction) -> bool {
        if self.ledger.holds(transaction.commit_lsn) {
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

    /// Maps the whole transaction first, then adds it to the batch: a row that cannot be
    /// mapped fails the transaction before any of it reaches the batch.
    fn add_transaction(&mut self, transaction: Transaction) -> Result<(), Error> {
        if !self.wanted(&transaction) {
            return self.changes.note_skipped(transaction);
        }
        let mut changes = Vec::with_capacity(transaction.changes.len());
        for change in transaction.changes {
            self.changes.map(change, &mut changes)?;
        }
        let at = pg_micros_to_unix_micros(transaction.commit_time_micros);
        let heartbeat = matches!(changes.last(), Some(UserChange::Heartbeat));
        if heartbeat {
            changes.pop();
        }
        if self.mode.is_dry_run() {
            print_changes(&transaction_meta(&transaction.commit_lsn, at), &changes);
            return Ok(());
        }
        if changes.is_empty() && self.batcher.is_empty() {
            // Nothing for the target: no target transaction just to move the checkpoint.
            self.ledger.nothing_until(transaction.end_lsn);
            if heartbeat {
                // It has come through once the batch being written has.
                match &mut self.in_flight {
                    Some(InFlight::Batch { heartbeat, .. }) => *heartbeat = Some(at),
                    _ => self.heartbeat_arrived(at),
                }
            }
            return Ok(());
        }
        if heartbeat {
            self.batcher.heartbeat_behind(at);
        }
        let carried = !changes.is_empty();
        self.batcher.add(changes, at, self.metrics);
        self.batcher.commit(
            CommitPosition {
                commit_lsn: transaction.commit_lsn,
                end_lsn: transaction.end_lsn,
                commit_time: at,
            },
            carried,
        );
        Ok(())
    }

    /// A transaction too large for one batch (or spilled to disk) goes to the target in
    /// parts, read, mapped and written [`PART_CHANGES`] at a time into one target
    /// transaction that commits with the checkpoint: memory stays bounded and the target
    /// still sees the source transaction whole or not at all. Status updates keep going
    /// out meanwhile, so the source does not time the connection out.
    async fn add_large_transaction(&mut self, transaction: Transaction) -> Result<(), Error> {
        if !self.wanted(&transaction) {
            return self.changes.note_skipped(transaction);
        }
        if !self.batcher.is_empty() {
            self.apply_batch().await?;
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
        self.in_large_transaction = true;
        let result = self.add_in_parts(transaction, at).await;
        self.in_large_transaction = false;
        let carried = match result {
            Ok(carried) => carried,
            Err(error) => {
                // Nothing of it may reach the target: roll back what was written, drop the rest.
                if self.settle().await.is_ok() {
                    let _ = self.worker.run(Job::Abandon).await;
                }
                self.batcher.discard();
                self.confirm_before_failing().await;
                return Err(error);
            }
        };
        if self.mode.is_dry_run() {
            return Ok(());
        }
        self.batcher.commit(position, carried);
        self.apply_batch().await
    }

    /// Whether any change of the transaction was for the target.
    async fn add_in_parts(
        &mut self,
        transaction: Transaction,
        at: UnixMicros,
    ) -> Result<bool, Error> {
        let dry_run = self.mode.is_dry_run();
        let meta = transaction_meta(&transaction.commit_lsn, at);
        let mut changes = Vec::new();
        let mut carried = false;
        let mut read = 0_usize;
        let mut all = transaction.into_changes().peekable();
        while let Some(change) = all.next() {
            self.changes.map(change?, &mut changes)?;
            read += 1;
            if changes.len() < PART_CHANGES && all.peek().is_some() {
                // Changes that map to nothing (other tables, skipped rows) fill no part, so
                // the status updates that keep the source connection (and the liveness
                // bound) satisfied are counted in changes read.
                if read.is_multiple_of(MAX_BATCH_CHANGES)
                    && self.last_status.elapsed() >= self.status_interval
                {
                    self.send_status(false).await?;
                }
                continue;
            }
            carried |= changes
                .iter()
                .any(|change| !matches!(change, UserChange::Heartbeat));
            if dry_run {
                print_changes(&meta, &changes);
                changes.clear();
                continue;
            }
            self.batcher.add(changes.drain(..), at, self.metrics);
            if all.peek().is_some() {
                // The worker writes this part while the next one is read and mapped.
                self.settle().await?;
                let part = self.batcher.take_part();
                self.worker.send(Job::Part(part)).await?;
                self.in_flight = Some(InFlight::Part);
            }
            if self.last_status.elapsed() >= self.status_interval {
                self.send_status(false).await?;
            }
        }
        Ok(carried)
    }

    /// Hands the batch to the worker; the worker must be free.
    async fn submit_batch(&mut self) -> Result<(), Error> {
        let (batch, heartbeat) = self.batcher.take();
        self.in_flight = Some(InFlight::Batch {
            oldest_commit: batch.commit_times().first().copied(),
            heartbeat,
        });
        self.worker.send(Job::Commit(batch)).await?;
        Ok(())
    }

    /// Waits until the worker has answered everything sent to it, with status updates going
    /// out meanwhile: a slow part of a large transaction must not get the connection ended
    /// by the source's `wal_sender_timeout`.
    async fn settle(&mut self) -> Result<(), Error> {
        while self.worker.in_flight() > 0 {
            let status_due = self.last_status + self.status_interval;
            tokio::select! {
                done = self.worker.recv() => {
                    let done = done?;
                    self.on_done(done).await?;
                }
                _ = tokio::time::sleep_until(status_due.into()) => self.send_status(false).await?,
            }
        }
        Ok(())
    }

    /// Writes the batch and waits for it, and for anything before it.
    async fn apply_batch(&mut self) -> Result<(), Error> {
        self.settle().await?;
        if !self.batcher.is_empty() {
            self.submit_batch().await?;
            self.settle().await?;
        }
        Ok(())
    }

    async fn on_done(&mut self, done: Done) -> Result<(), Error> {
        let in_flight = self.in_flight.take();
        let (batch, position, took) = match done {
            Done::Committed {
                batch,
                position,
                took,
            } => (batch, position, took),
            Done::Durable => {
                if let Some(InFlight::Flush(flush)) = in_flight {
                    self.ledger.durable(flush);
                }
                return self.send_status(false).await;
            }
            Done::Part | Done::Abandoned => return Ok(()),
        };
        self.lag.applied(batch.commit_times());
        self.metrics
            .batch_applied(batch.user_transactions(), batch.changes(), took);
        self.metrics
            .set_checkpoint(position.end_lsn, position.commit_time);
        if let Some(InFlight::Batch {
            heartbeat: Some(heartbeat),
            ..
        }) = in_flight
        {
            self.heartbeat_arrived(heartbeat);
        }
        self.ledger.applied(position.end_lsn);
        self.send_status(false).await
    }

    /// Asks the worker to make the batches applied so far durable, and to record the idle
    /// position if there is one, without waiting for it.
    async fn submit_flush(&mut self) -> Result<(), Error> {
        let flush = self.ledger.flush(self.caught_up());
        self.in_flight = Some(InFlight::Flush(flush));
        self.worker.send(Job::MakeDurable(flush.idle)).await?;
        Ok(())
    }

    /// Before a session ends with an error: confirms what was applied, if the connections
    /// still allow it. A failure here is only logged: the error that ends the session is
    /// the one to report.
    async fn confirm_before_failing(&mut self) {
        let confirmed = match self.make_durable().await {
            Ok(()) => self.send_status(false).await,
            Err(error) => Err(error),
        };
        if let Err(error) = confirmed {
            tracing::debug!(error = %crate::error::report(&error), "confirming before the session ends");
        }
    }

    /// Before a session ends on purpose: flushes the target, so the slot can be confirmed
    /// up to everything applied.
    async fn make_durable(&mut self) -> Result<(), Error> {
        self.settle().await?;
        let flush = self.ledger.flush(self.caught_up());
        if Ledger::has_work(flush) {
            self.worker.run(Job::MakeDurable(flush.idle)).await?;
            self.ledger.durable(flush);
        }
        Ok(())
    }

    /// A heartbeat committed at `commit_time` has come through the whole pipeline.
    fn heartbeat_arrived(&mut self, commit_time: UnixMicros) {
        let caught_up = self.caught_up();
        self.lag.heartbeat_arrived(commit_time, caught_up);
    }

    /// Also the moment to refresh the lag figures that only change with time: status updates
    /// go out at least every few seconds, whatever the traffic.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), Error> {
        let oldest = match &self.in_flight {
            Some(InFlight::Batch {
                oldest_commit: Some(oldest),
                ..
            }) => Some(*oldest),
            _ => self.batcher.oldest_commit(),
        };
        self.lag.waiting(oldest);
        let flushed = if self.mode.is_dry_run() {
            // A dry run confirms nothing: the server ignores an invalid (zero) position.
            Lsn::ZERO
        } else {
            self.ledger.report()
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
        // Status updates go out every few seconds, also while the session waits for the
        // target (`settle`) or writes a large transaction in parts.
        self.metrics.liveness().progress();
        Ok(())
    }
}
