//! The service loop: source → decode → map → apply, one streaming session after another.
//!
//! A session opens the target (to read the checkpoint), then a fresh replication connection
//! (PostgreSQL 15 cannot restart logical streaming on one connection), and streams from the
//! checkpoint. Whole source transactions are grouped into target transactions, written by
//! an [`ApplyWorker`] on its own task while the stream goes on being read and mapped: a batch
//! goes to the worker as soon as no more WAL is immediately readable and the worker is free,
//! or when it reaches [`MAX_BATCH_CHANGES`] or [`MAX_BATCH_AGE`]. That adapts by itself: one
//! change per target transaction when idle (lowest lag), large batches under load (highest
//! throughput).
//!
//! Positions only move forward. Target transactions commit asynchronously: a batch is
//! visible at once, and known durable once a later synchronous commit on the target returns
//! (at most every [`DURABLE_INTERVAL`]). The slot is confirmed (Standby Status Update
//! `flush`) up to the `end_lsn` of the last transaction whose target transaction is known
//! durable, never further. Caught up, the server's keepalive position (nothing for the
//! target up to it) is written to the checkpoint by such a synchronous commit before it is
//! confirmed, so the slot advances on an idle database (Neon drops slots that make no
//! progress) and still never passes the checkpoint: a slot found past it at the start of a
//! session means the target lost what it had applied (restored to an earlier point), and
//! the session refuses to stream over that gap. After any
//! failure the next session resumes from the checkpoint and skips transactions it already
//! holds (`commit_lsn < checkpoint.end_lsn`): nothing lost, nothing applied twice.
//!
//! A silent source is a dead one. While idle, a walsender sends a keepalive every half
//! `wal_sender_timeout`; a connection that brings nothing at all, neither data nor keepalive,
//! for `source_timeout` (default 60 s, the server's default `wal_sender_timeout`) is most
//! likely half-open: the network stalled, or the server vanished without a FIN. Waiting on it
//! would hang replication for as long as the kernel cares to wait (hours), so the session ends
//! with a transient error and a new connection is made. Halfway there, a status update asks
//! the server for a reply (`reply_requested`), so a live but quiet server always answers in
//! time, whatever its own `wal_sender_timeout`.
//! <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-STANDBY-STATUS-UPDATE>
//!
//! Transient failures reconnect with exponential backoff and jitter; definite ones end `run`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use postgres_protocol::escape::escape_identifier;
use tokio::sync::watch;

mod relations;

use relations::StreamTables;

use crate::apply::{self, ApplyWorker, Batch, CommitPosition, Done, Job, TargetWriter, UnixMicros};
use crate::config::Config;
use crate::conn;
use crate::decode::{
    decode_replication_message, encode_standby_status_update, pg_micros_to_unix_micros,
    unix_micros_to_pg_micros, Assembled, LogicalMessage, OldTuple, PgOutputDecoder,
    ReplicationMessage, Transaction, TransactionAssembler, TupleData,
};
use crate::error::Error;
use crate::lag::{unix_micros_now, ClockOffset};
use crate::liveness::Liveness;
use crate::lsn::Lsn;
use crate::map::{MappedUser, RowMapper, RowOutcome};
use crate::metrics::{Metrics, Op, Side};
use crate::source::monitor::{heartbeat_prefix, run_monitor};
use crate::source::{catalog, ReplicationConnection, ReplicationStream, SourceError};

/// Name shown in `pg_stat_activity` and `pg_stat_replication`.
pub const APPLICATION_NAME: &str = "usersync";

/// Most changes in one target transaction: bounds memory and the target transaction's size.
pub const MAX_BATCH_CHANGES: usize = 10_000;
/// Changes per part of a large transaction ([`Session::add_in_parts`]): a part is held
/// twice over (being written while the next one is mapped), as parsed `raw_json` and as the
/// statement's encoded parameters, so this bounds the memory a transaction of any size
/// takes; a round trip per part is little beside the writing of its rows.
const PART_CHANGES: usize = 2_000;
/// Longest a batch collects while WAL keeps arriving (a backlog), so lag stays bounded.
pub const MAX_BATCH_AGE: Duration = Duration::from_millis(100);
/// Status updates are sent at least this often, and at least three times per the source's
/// `wal_sender_timeout` (60 s by default): while a slow batch pauses the reading of the
/// stream, the server's requests for a reply go unseen, and only these keep it from ending
/// the connection as timed out.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How often, at most, applied batches are made durable (a synchronous commit on the target),
/// which lets the slot be confirmed up to them.
const DURABLE_INTERVAL: Duration = Duration::from_millis(200);
/// How often, at most, an idle position is recorded in the checkpoint (a small synchronous
/// target transaction) so that the slot can be confirmed there: while the source is idle,
/// one such write per interval; under load it rides on the durability flushes. The slot
/// needs progress over minutes (retained WAL, Neon's inactive-slot rule), not seconds.
const IDLE_RECORD_INTERVAL: Duration = Duration::from_secs(10);
/// How often a standby tries to take the slot's lock.
const STANDBY_POLL: Duration = Duration::from_secs(1);
/// How often a standby logs who holds the slot's lock while that does not change.
const STANDBY_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long a replay waits for a slot's lock before it says who holds it: long enough for
/// the backend of a session that just ended to exit, too short to stand by.
const REPLAY_LOCK_GRACE: Duration = Duration::from_secs(3);
const REPLAY_LOCK_POLL: Duration = Duration::from_millis(100);
/// The last-minute lag percentiles are recomputed at most this often (a sort of the window).
const RECENT_LAG_REFRESH: Duration = Duration::from_secs(1);
/// A replay polls the server's position this often while it waits for the end.
const REPLAY_STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How long `run` waits for a slot held by another process (often its own previous
/// walsender, which has not noticed yet that the connection is gone).
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(15);
/// Added to the source's `wal_sender_timeout` when waiting for a lingering walsender.
const SLOT_BUSY_MARGIN: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that ran this long, or applied a batch, counts as healthy: the next failure
/// starts backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// Time for the work around a request, on top of the longest one, before `/healthz` and
/// systemd's watchdog take the run loop for hung.
const LIVENESS_MARGIN: Duration = Duration::from_secs(30);
/// PostgreSQL 14 brought pgoutput protocol 2 (streaming of large in-progress transactions)
/// and the `messages` option (logical messages, which carry the heartbeats).
const PROTOCOL_2_MIN_VERSION: u32 = 140_000;

/// How long `run` may show no progress before it counts as hung (see [`crate::liveness`]):
/// longer than any one request of a session may take (a [`Limit`]), the longest wait without
/// progress; every other wait shows progress at least every [`STATUS_INTERVAL`].
pub fn liveness_bound(source_timeout: Duration) -> Duration {
    TARGET_TIMEOUT.max(source_timeout) + LIVENESS_MARGIN
}

/// Streams until `shutdown` turns true, reconnecting after transient failures.
pub async fn run(
    config: &Config,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut backoff = BACKOFF_MIN;
    metrics.set_slot_name(&config.slot);
    loop {
        let started = Instant::now();
        let batches_before = metrics.batches();
        let result = run_session(config, &metrics, &mut shutdown, Mode::Service).await;
        metrics.set_ready(false);
        metrics.set_connected(Side::Source, false);
        metrics.set_connected(Side::Target, false);
        if let Err(error) = &result {
            metrics.session_error(error.is_transient());
        }
        match result {
            Ok(()) => return Ok(()),
            Err(error) if error.is_transient() => {
                // Progress means the failure interrupted working replication, not that it keeps
                // failing: otherwise a blip every few seconds would grow backoff to its maximum.
                if started.elapsed() >= HEALTHY_SESSION || metrics.batches() > batches_before {
                    backoff = BACKOFF_MIN;
                }
                let delay = with_jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                metrics.reconnected();
                tracing::warn!(error = %crate::error::report(&error), retry_in_ms = delay.as_millis() as u64, "replication interrupted; reconnecting");
                tokio::select! {
                    _ = metrics.liveness().sleep(delay) => {}
                    _ = stopped(&mut shutdown) => return Ok(()),
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// Resolves once a stop is requested (or the sender is gone, which means the same).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Up to ±25% of the delay, so that many replicators restarting together spread out.
fn with_jitter(delay: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    delay.mul_f64(factor)
}

/// How a streaming session ends and what it does with changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stream until stopped (`run`).
    Service,
    /// Apply what commits before `until`, then end (`replay`); with `dry_run`, print the
    /// changes as JSON lines instead, and confirm nothing new.
    Replay { until: Lsn, dry_run: bool },
}

impl Mode {
    /// A replay that prints what it would apply and writes nothing.
    fn is_dry_run(self) -> bool {
        matches!(self, Mode::Replay { dry_run: true, .. })
    }
}

/// One session that ends by itself when the replay position is reached (no reconnects, no
/// heartbeats: a replay of what is pending should not itself add WAL to wait for).
pub async fn replay(
    config: &Config,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    until: Lsn,
    dry_run: bool,
) -> Result<(), Error> {
    let mode = Mode::Replay { until, dry_run };
    let result = run_session(config, &metrics, &mut shutdown, mode).await;
    metrics.set_ready(false);
    result
}

async fn run_session(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &mut watch::Receiver<bool>,
    mode: Mode,
) -> Result<(), Error> {
    // Every request before streaming is bounded: a connection stalled while a session starts
    // would otherwise hang it for good (the stream's own silence check comes later).
    let target_limit = Limit::new(TARGET_TIMEOUT, metrics.liveness());
    let source_limit = Limit::new(config.source_timeout, metrics.liveness());
    let (target, warnings, shape) = answered(target_limit, "target", "preparing the session", async {
        let (target, warnings) =
            conn::sql::connect_counting_warnings(&config.target, APPLICATION_NAME)
                .await
                .map_err(Error::connect("target"))?;
        conn::version::check_target(&target).await?;
        let exists: bool = target
            .query_one("SELECT to_regclass('neon_auth.users_sync') IS NOT NULL AND to_regclass('usersync.state') IS NOT NULL", &[])
            .await
            .map_err(apply::ApplyError::sql("looking for neon_auth.users_sync"))?
            .get(0);
        if !exists {
            return Err(Error::Config(
                "the target has no neon_auth.users_sync or usersync.state yet: run usersync setup first"
                    .into(),
            ));
        }
        let shape = apply::check_shape(&target).await?;
        Ok((target, warnings, shape))
    })
    .await?;
    metrics.set_connected(Side::Target, true);
    if !hold_slot_lock(&target, &config.slot, mode, metrics, shutdown).await? {
        return Ok(());
    }
    let dry_run = mode.is_dry_run();
    if !dry_run {
        // A checkpoint table of an older usersync gets what this one records; holding the
        // slot's lock, no other replicator of this slot writes to it meanwhile.
        answered(target_limit, "target", "upgrading usersync.state", async {
            Ok(apply::upgrade_state(&target).await?)
        })
        .await?;
    }
    // Read only now: a standby that just took over resumes where the other one stopped.
    let checkpoint = answered(target_limit, "target", "reading the checkpoint", async {
        Ok(apply::read_checkpoint(&target, &config.slot).await?)
    })
    .await?;
    // Without one, setup or resync has not finished its copy (or the checkpoint was
    // removed): streaming now would make a partial copy final, or race a copy in progress.
    let Some(checkpoint) = checkpoint else {
        return Err(Error::Config(format!(
            "the target holds no checkpoint for slot {}: usersync setup (or resync) has not \
             finished its copy, or the checkpoint was removed; run usersync setup to finish a \
             first setup, or usersync resync if this target was fed before",
            config.slot
        )));
    };

    let source = answered(source_limit, "source", "preparing the session", async {
        let source = conn::sql::connect(&config.source, APPLICATION_NAME)
            .await
            .map_err(Error::connect("source"))?;
        conn::version::check_source(&source).await?;
        Ok(source)
    })
    .await?;
    let Some(SlotReady {
        sender_timeout,
        confirmed_flush,
    }) = wait_for_slot(&source, &config.slot, source_limit, shutdown).await?
    else {
        return Ok(());
    };
    // Facts the profile needs from the source (Keycloak: the realm's id for its name), and
    // whether the publication carries the columns the mapping needs (PostgreSQL 15+).
    let profile = answered(
        source_limit,
        "source",
        "reading the profile's facts",
        async {
            let profile = catalog::resolve_profile(&source, &config.table, &config.mapping).await?;
            crate::source::publication::check_published_columns(
                &source,
                &config.publication,
                &config.table,
                &profile,
            )
            .await?;
            Ok(profile)
        },
    )
    .await?;
    let source_in_recovery: bool = answered(
        source_limit,
        "source",
        "asking whether it is a standby",
        async {
            Ok(source
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(SourceError::sql("asking whether the source is a standby"))?
                .get(0))
        },
    )
    .await?;
    drop(source);

    let (replication, identity) = answered(source_limit, "source", "opening replication", async {
        let mut replication =
            ReplicationConnection::connect(&config.source, APPLICATION_NAME).await?;
        let identity = replication.identify_system().await?;
        Ok((replication, identity))
    })
    .await?;
    if checkpoint.system_id != identity.system_id {
        return Err(SourceError::Definite(format!(
            "the target's checkpoint for slot {} comes from source system {}, but this \
             source is system {}; point usersync at the right source, or use another slot",
            config.slot, checkpoint.system_id, identity.system_id
        ))
        .into());
    }
    // The slot is never confirmed past the checkpoint (`sql/usersync_state.sql`), so a slot
    // confirmed further means this target lost what it had applied; streaming on from the
    // slot would leave that gap for good. A checkpoint an older usersync wrote proves
    // nothing yet: it is taken over at the slot's position.
    if checkpoint.slot_bounded && confirmed_flush > checkpoint.end_lsn {
        return Err(target_behind_slot(
            &config.slot,
            confirmed_flush,
            &checkpoint,
        ));
    }
    let take_over = !checkpoint.slot_bounded && !dry_run;
    let resume_at = if take_over {
        checkpoint.end_lsn.max(confirmed_flush)
    } else {
        checkpoint.end_lsn
    };
    // Every position the session resumes from came from this source's WAL: one past the end
    // of a primary's WAL means the source lost WAL since (a failover to a standby that
    // lacked it, a restore), and its new transactions there would be skipped as already
    // applied. A standby source may just not have replayed that far yet (it has restarted):
    // the walsender waits for it.
    if resume_at > identity.xlog_pos && !source_in_recovery {
        return Err(SourceError::Definite(format!(
            "the target's checkpoint for slot {} is at {}, past the end of the source's WAL \
             ({}): the source lost WAL this target had seen (it failed over to a standby that \
             lacked it, or was restored to an earlier point), and changes made there since \
             would be skipped; run usersync resync (it copies the table again and \
             soft-deletes the users the source no longer has)",
            config.slot, resume_at, identity.xlog_pos
        ))
        .into());
    }
    if take_over {
        answered(
            target_limit,
            "target",
            "taking over the checkpoint",
            async {
                Ok(apply::take_over_checkpoint(
                    &target,
                    &config.slot,
                    &checkpoint.system_id,
                    confirmed_flush,
                )
                .await?)
            },
        )
        .await?;
        // Once per upgrade; more often means something else writes usersync.state (a
        // trigger, a person), which turns the detection of a restored target off.
        tracing::warn!(
            slot = %config.slot,
            checkpoint = %resume_at,
            "took over a checkpoint that an older usersync (or something else) wrote: a \
             restore of the target to before this point cannot be detected"
        );
    }
    let writer = answered(target_limit, "target", "preparing statements", async {
        let mut writer =
            TargetWriter::new(target, shape, &config.slot, &identity.system_id).await?;
        writer.watch_warnings(warnings);
        // The checkpoint read above is only visible: the session that wrote it may have
        // committed it asynchronously and died before a synchronous commit covered it, and a
        // target crash (or a Neon compute restart) would undo it. It becomes the first
        // position this session reports, so first make it durable.
        writer.make_durable(None).await?;
        writer.use_async_commit().await?;
        writer.count_in(Arc::clone(metrics));
        Ok(writer)
    })
    .await?;
    let protocol_2 = replication
        .server_version_num()
        .is_some_and(|v| v >= PROTOCOL_2_MIN_VERSION);
    let mut options = vec![
        (
            "proto_version",
            if protocol_2 { "2" } else { "1" }.to_owned(),
        ),
        ("publication_names", escape_identifier(&config.publication)),
    ];
    if protocol_2 {
        options.push(("streaming", "on".to_owned()));
        options.push(("messages", "true".to_owned()));
    }
    let stream = answered(source_limit, "source", "starting replication", async {
        Ok(replication
            .start_logical_replication(&config.slot, resume_at, &options)
            .await?)
    })
    .await?;
    metrics.set_source_system(&config.slot, &identity.system_id);
    tracing::info!(slot = %config.slot, resume_at = %resume_at, system = %identity.system_id, "streaming");
    metrics.set_connected(Side::Source, true);
    metrics.set_ready(true);
    // Heartbeats need logical messages, which protocol 1 servers cannot send.
    let heartbeat = config
        .heartbeat_interval
        .filter(|_| protocol_2 && mode == Mode::Service);
    let monitor_started = unix_micros_now();
    let _monitor = AbortOnDrop(tokio::spawn(run_monitor(
        config.source.clone(),
        config.slot.clone(),
        heartbeat,
        Arc::clone(metrics),
    )));
    let status_interval = match mode {
        Mode::Service if !sender_timeout.is_zero() => STATUS_INTERVAL.min(sender_timeout / 3),
        Mode::Service => STATUS_INTERVAL,
        Mode::Replay { .. } => REPLAY_STATUS_INTERVAL,
    };
    let mut session = Session {
        config,
        status_interval,
        metrics,
        heartbeat_prefix: heartbeat_prefix(&config.slot),
        clock: ClockOffset::default(),
        pending_heartbeat: None,
        monitor_started,
        in_large_transaction: false,
        over_target: false,
        stream,
        worker: ApplyWorker::spawn(writer),
        in_flight: None,
        decoder: PgOutputDecoder::new(),
        assembler: TransactionAssembler::with_memory_limit(config.spill_threshold),
        tables: StreamTables::new(profile, &config.table),
        skip_before: resume_at,
        confirmed: resume_at,
        reported_flush: confirmed_flush,
        unflushed: VecDeque::new(),
        last_durable: Instant::now(),
        received: resume_at,
        idle_position: resume_at,
        batch: Batch::new(),
        batch_started: None,
        last_status: Instant::now(),
        last_message: Instant::now(),
        reply_requested: false,
        reading_paused: false,
        mode,
        recent_refreshed: Instant::now()
            .checked_sub(RECENT_LAG_REFRESH)
            .unwrap_or_else(Instant::now),
        finished: false,
    };
    session.stream_until(shutdown).await?;
    session.stream.finish().await;
    Ok(())
}

/// A slot confirmed past the target's checkpoint, which bounds it: the target lost what it
/// had applied up to the slot's position, and the source no longer has it for this slot.
fn target_behind_slot(slot: &str, confirmed: Lsn, checkpoint: &apply::Checkpoint) -> Error {
    Error::Config(format!(
        "slot {slot} is confirmed up to {confirmed}, past this target's checkpoint ({}), which \
         usersync never lets it pass: this target may have lost changes, and the slot no \
         longer holds them. Restored from a backup or to an earlier point: run usersync \
         resync. A copy (a branch) of the target this slot feeds: never use this slot for it; \
         run usersync resync --slot <a new name>. See \
         docs/changes.md#restoring-the-target-to-an-earlier-point",
        checkpoint.end_lsn
    ))
}

/// Waits until this process holds the slot's lock on the target, so that of several
/// `usersync run` for one slot (two replicas, a second unit started by mistake) exactly one
/// replicates and the others stand by. The lock is a session advisory lock on the connection
/// that writes the batches: if the active process dies, its session ends, the lock is free,
/// and a standby takes over within [`STANDBY_POLL`]. Returns false if stopped while waiting.
///
/// Any session on the target may hold the lock (its key is well known, see
/// [`apply::slot_lock`]), so a standby names the holders when it starts waiting, whenever they
/// change, and every [`STANDBY_LOG_INTERVAL`]; the metrics say since when it stands by.
async fn hold_slot_lock(
    target: &tokio_postgres::Client,
    slot: &str,
    mode: Mode,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    let result = wait_for_slot_lock(target, slot, mode, metrics, shutdown).await;
    // Holding it, stopped, or failed: not standing by any more.
    metrics.set_standby(None);
    result
}

async fn wait_for_slot_lock(
    target: &tokio_postgres::Client,
    slot: &str,
    mode: Mode,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    let mut logged: Option<(Vec<apply::slot_lock::LockHolder>, Instant)> = None;
    let target_limit = Limit::new(TARGET_TIMEOUT, metrics.liveness());
    let started = Instant::now();
    loop {
        let locked: bool = answered(target_limit, "target", "taking the slot's lock", async {
            Ok(target
                .query_one(apply::slot_lock::TRY_LOCK, &[&slot])
                .await
                .map_err(apply::ApplyError::sql("taking the slot's lock"))?
                .get(0))
        })
        .await?;
        if locked {
            if logged.is_some() {
                tracing::info!(slot, "took over: this process now replicates the slot");
            }
            return Ok(true);
        }
        let replay = matches!(mode, Mode::Replay { .. });
        // A session that just ended (a replay before this one, a run just stopped) may hold
        // the lock for some milliseconds more: its server backend releases it only as it
        // exits, after the process is gone. A replay gives it that long, and stands by for
        // no more.
        if replay && started.elapsed() < REPLAY_LOCK_GRACE {
            tokio::select! {
                _ = tokio::time::sleep(REPLAY_LOCK_POLL) => continue,
                _ = stopped(shutdown) => return Ok(false),
            }
        }
        if logged.is_none() && !replay {
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            metrics.set_standby(Some(since.as_secs_f64()));
        }
        let holders = answered(target_limit, "target", "reading the slot's lock", async {
            Ok(apply::slot_lock::holders(target, slot).await?)
        })
        .await?;
        if replay {
            // A replay is a one-off: it does not stand by behind a running replicator, which
            // applies what is pending anyway.
            return Err(Error::Config(format!(
                "another session holds slot {slot}'s lock on the target ({}): a usersync run \
                 replicates this slot, and applies what is pending itself; stop it first to \
                 replay (or to replay --dry-run)",
                apply::slot_lock::describe(&holders)
            )));
        }
        let now = Instant::now();
        if holders_worth_logging(logged.as_ref(), &holders, now) {
            tracing::info!(
                slot,
                holders = %apply::slot_lock::describe(&holders),
                "standby: another session holds the slot's lock on the target (a usersync, or \
                 any session that took it); waiting to take over"
            );
            logged = Some((holders, now));
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_POLL) => {}
            _ = stopped(shutdown) => return Ok(false),
        }
    }
}

/// Whether a standby logs the lock's holders now: when it starts waiting, when they change
/// (a holder that went between the failed attempt and the look at `pg_locks` is no change),
/// and every [`STANDBY_LOG_INTERVAL`] while they stay.
fn holders_worth_logging(
    logged: Option<&(Vec<apply::slot_lock::LockHolder>, Instant)>,
    holders: &[apply::slot_lock::LockHolder],
    now: Instant,
) -> bool {
    match logged {
        None => true,
        Some((before, at)) => {
            (!holders.is_empty() && holders != before.as_slice())
                || now.duration_since(*at) >= STANDBY_LOG_INTERVAL
        }
    }
}

/// What a session learns of its slot before it streams.
struct SlotReady {
    /// The source's `wal_sender_timeout` (zero if the server has it off).
    sender_timeout: Duration,
    /// Where the slot is confirmed already: no status update reports less.
    confirmed_flush: Lsn,
}

/// Fails with advice when the slot is missing or lost; waits a little while it is busy.
///
/// The wait lasts at least as long as the source's `wal_sender_timeout` (plus a margin): a
/// predecessor that died without closing its connection (a crashed host, after which a
/// standby takes over) keeps the slot busy until its walsender times out. `None` if stopped
/// while waiting.
async fn wait_for_slot(
    source: &tokio_postgres::Client,
    slot: &str,
    source_limit: Limit<'_>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<SlotReady>, Error> {
    let sender_timeout: i32 = answered(source_limit, "source", "reading settings", async {
        Ok(source
            .query_one(
                "SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'",
                &[],
            )
            .await
            .map_err(SourceError::sql("reading wal_sender_timeout"))?
            .get(0))
    })
    .await?;
    let sender_timeout = Duration::from_millis(u64::try_from(sender_timeout).unwrap_or(0));
    let wait = SLOT_BUSY_WAIT.max(sender_timeout + SLOT_BUSY_MARGIN);
    let deadline = Instant::now() + wait;
    let mut said_busy = false;
    loop {
        let info = answered(source_limit, "source", "reading the slot", async {
            Ok(catalog::slot_info(source, slot).await?)
        })
        .await?;
        let Some(info) = info else {
            return Err(SourceError::Definite(format!(
                "replication slot {slot} does not exist on the source: run usersync setup for \
                 a first start, or usersync resync if it existed before (changes made since it \
                 was dropped never reached the target; resync copies the table again)"
            ))
            .into());
        };
        if info.is_invalidated() {
            return Err(SourceError::Definite(format!(
                "replication slot {slot} {}, so changes are missing from it: run usersync \
                 resync to recreate it and copy the table again",
                info.invalidation()
            ))
            .into());
        }
        if info.plugin.as_deref() != Some("pgoutput") {
            return Err(SourceError::Definite(format!(
                "replication slot {slot} uses plugin {}, not pgoutput; use another --slot",
                info.plugin.as_deref().unwrap_or("(none: a physical slot)")
            ))
            .into());
        }
        match info.active_pid {
            Some(pid) if info.active => {
                if Instant::now() >= deadline {
                    return Err(SourceError::Definite(format!(
                        "replication slot {slot} is in use by another process (source backend \
                         pid {pid}): another usersync is running for this slot, or a tool such \
                         as pg_recvlogical; stop it first"
                    ))
                    .into());
                }
                if !said_busy {
                    tracing::info!(slot, pid, "slot busy; waiting for it to be released");
                    said_busy = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stopped(shutdown) => return Ok(None),
                }
            }
            _ => {
                return Ok(Some(SlotReady {
                    sender_timeout,
                    confirmed_flush: info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO),
                }))
            }
        }
    }
}

/// One source change as it will reach the target.
enum UserChange {
    /// `deleted_at`: the source keeps the row but marks the user deleted at that time.
    Upsert {
        user: MappedUser,
        inserted: bool,
        deleted_at: Option<i64>,
        /// The user's old id when the update changed it: its unchanged values are that user's.
        moved_from: Option<String>,
    },
    /// Part of a user changed (a row of another table of the profile).
    Patch {
        id: String,
        keys: serde_json::Map<String, serde_json::Value>,
        /// The part's row went away: the patch clears the part (see `Batch::clear_part`).
        clears: bool,
    },
    SoftDelete(String),
    SoftDeleteAll,
    /// This replicator's heartbeat message (never reaches the target).
    Heartbeat,
}

impl UserChange {
    /// The change of a row whose id an update changed from `from` (`None`: it did not).
    fn moved_from(self, from: Option<String>) -> Self {
        match self {
            UserChange::Upsert {
                user,
                inserted,
                deleted_at,
                ..
            } => UserChange::Upsert {
                user,
                inserted,
                deleted_at,
                moved_from: from,
            },
            other => other,
        }
    }
}

/// What the session remembers of the batch the worker is writing.
struct InFlight {
    oldest_commit: Option<UnixMicros>,
    heartbeat: Option<i64>,
    /// How many of the oldest unflushed batches a [`Job::MakeDurable`] covers.
    makes_durable: usize,
    /// The idle position it records in the checkpoint.
    records_idle: Option<Lsn>,
}

/// Whether a transaction goes to the target in parts rather than in a batch.
fn is_large(transaction: &Transaction) -> bool {
    transaction.spilled.is_some() || transaction.len() > MAX_BATCH_CHANGES
}

/// How long a target request may go unanswered while a session starts; afterwards the
/// writer's own `statement_timeout` and batch timeout bound every request.
const TARGET_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a request may go unanswered, and the liveness its start shows progress to.
#[derive(Clone, Copy)]
struct Limit<'a> {
    after: Duration,
    liveness: &'a Liveness,
}

impl<'a> Limit<'a> {
    fn new(after: Duration, liveness: &'a Liveness) -> Self {
        Limit { after, liveness }
    }
}

/// `request`, or [`Error::Unanswered`] if it is not done within the limit. Its start is
/// progress (see [`crate::liveness`]): it ends within the limit, one way or the other.
async fn answered<T>(
    limit: Limit<'_>,
    which: &'static str,
    what: &'static str,
    request: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let Limit { after, liveness } = limit;
    liveness.progress();
    tokio::time::timeout(after, request)
        .await
        .unwrap_or(Err(Error::Unanswered { which, what, after }))
}

/// Ends a background task when its owner goes away, on every path.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Session<'a> {
    config: &'a Config,
    metrics: &'a Arc<Metrics>,
    heartbeat_prefix: String,
    clock: ClockOffset,
    /// Commit time of a heartbeat waiting behind the open batch.
    pending_heartbeat: Option<i64>,
    /// When this session's monitor began to write heartbeats (this host's clock). Older
    /// heartbeats still in the slot were written by an earlier session (this process's before
    /// a reconnect, or another process's before a takeover): their age is the time nobody
    /// streamed, which no user waited for, so they move positions but measure no lag.
    monitor_started: UnixMicros,
    /// A large transaction is being applied in parts.
    in_large_transaction: bool,
    /// Whether the lag is over the target (to log crossings once).
    over_target: bool,
    mode: Mode,
    /// How often a status update goes out, whatever happens.
    status_interval: Duration,
    /// When the last-minute percentiles were last published.
    recent_refreshed: Instant,
    /// A replay reached its end position.
    finished: bool,
    stream: ReplicationStream,
    worker: ApplyWorker,
    /// The batch being written: its oldest commit time, and a heartbeat that came behind it.
    in_flight: Option<InFlight>,
    decoder: PgOutputDecoder,
    assembler: TransactionAssembler,
    /// The configured profile, completed with what the source told us, and its tables as
    /// the stream has described them so far.
    tables: StreamTables,
    /// Transactions committed before this position are on the target already.
    skip_before: Lsn,
    /// The position the target holds durably (the checkpoint's `end_lsn`).
    confirmed: Lsn,
    /// The furthest flush position sent to the source, starting at the slot's own: what was
    /// reported once is never taken back (a crash between recording a position and
    /// confirming it leaves the checkpoint ahead of the slot, never behind).
    reported_flush: Lsn,
    /// Applied batches not yet known durable: the source position each takes the checkpoint to.
    unflushed: VecDeque<Lsn>,
    last_durable: Instant,
    /// The furthest WAL position the server has reported.
    received: Lsn,
    /// A position with nothing for the target up to it, confirmable while caught up.
    idle_position: Lsn,
    batch: Batch,
    batch_started: Option<Instant>,
    last_status: Instant,
    /// When the source last sent anything (data or keepalive).
    last_message: Instant,
    /// A reply was requested since `last_message`, because the source had been quiet.
    reply_requested: bool,
    /// The stream is not being read (the next batch waits for a busy worker), so the
    /// source's silence means nothing: its messages wait in the socket.
    reading_paused: bool,
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
            let durable_due = if self.unflushed.is_empty() {
                // Only an idle position to record, if any.
                self.idle_to_record()
                    .map(|_| self.last_durable + IDLE_RECORD_INTERVAL)
            } else {
                Some(self.last_durable + DURABLE_INTERVAL)
            };
            if worker_free && durable_due.is_some_and(|due| Instant::now() >= due) {
                self.submit_durable().await?;
                continue;
            }
            if self.batch_is_due() && worker_free {
                self.submit_batch().await?;
                continue;
            }
            let status_due = self.last_status + self.status_interval;
            let may_read = worker_free || !self.batch_is_due();
            if !may_read {
                self.reading_paused = true;
            } else if self.reading_paused {
                // The silence is measured again from now: a target slower than the source
                // timeout is not a silent source.
                self.reading_paused = false;
                self.heard_from_source();
            }
            let mut timer = status_due;
            if may_read {
                timer = timer.min(self.silence_check_due());
            }
            if let Some(durable_due) = durable_due.filter(|_| worker_free) {
                // (A busy worker wakes the loop itself when it is done.)
                timer = timer.min(durable_due);
            }
            tokio::select! {
                biased;
                _ = stopped(shutdown) => {
                    self.apply_batch().await?;
                    self.make_durable().await?;
                    self.send_status(false).await?;
                    tracing::info!(confirmed = %self.confirmed, "stopped");
                    return Ok(());
                }
                done = self.worker.recv(), if !worker_free => self.on_done(done?).await?,
                payload = self.stream.recv(), if may_read => match payload? {
                    Some(payload) => {
                        self.handle(payload).await?;
                        // After handling: a large transaction is written while nothing is read.
                        self.heard_from_source();
                    }
                    None => return Err(SourceError::Replication(
                        crate::source::ReplicationError::Closed,
                    ).into()),
                },
                // Nothing more is readable right now: write what we have.
                _ = std::future::ready(()), if worker_free && !self.batch.is_empty() => {
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

    /// The source has just been heard from, or could not be listened to until now.
    fn heard_from_source(&mut self) {
        self.last_message = Instant::now();
        self.reply_requested = false;
    }

    /// When the source's silence next needs a look: halfway, to ask for a reply, then at
    /// the timeout.
    fn silence_check_due(&self) -> Instant {
        let timeout = self.config.source_timeout;
        if self.reply_requested {
            self.last_message + timeout
        } else {
            self.last_message + timeout / 2
        }
    }

    /// Asks a quiet source for a reply; gives up on one silent for the whole timeout.
    async fn check_silence(&mut self) -> Result<(), Error> {
        let silent_for = self.last_message.elapsed();
        let timeout = self.config.source_timeout;
        if silent_for >= timeout {
            return Err(SourceError::Replication(self.stream.silent(silent_for)).into());
        }
        if silent_for >= timeout / 2 && !self.reply_requested {
            tracing::debug!(
                silent_ms = silent_for.as_millis() as u64,
                "the source is quiet; asking for a reply"
            );
            self.reply_requested = true;
            self.send_status(true).await?;
        }
        Ok(())
    }

    fn batch_is_due(&self) -> bool {
        self.batch.changes() >= MAX_BATCH_CHANGES
            || self
                .batch_started
                .is_some_and(|started| started.elapsed() >= MAX_BATCH_AGE)
    }

    async fn handle(&mut self, payload: Bytes) -> Result<(), Error> {
        match decode_replication_message(payload)? {
            ReplicationMessage::XLogData {
                wal_end,
                data,
                server_time_micros,
                ..
            } => {
                self.observe_server_time(server_time_micros);
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
                            if !self.batch.is_empty() {
                                self.apply_batch().await?;
                            }
                            self.confirm_before_failing().await;
                            return Err(error);
                        }
                    }
                    Assembled::Relation(relation) => self.tables.note(relation)?,
                    Assembled::NonTransactionalMessage(_) | Assembled::Nothing => {}
                }
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested,
                server_time_micros,
            } => {
                self.observe_server_time(server_time_micros);
                self.received = self.received.max(wal_end);
                if let Mode::Replay { until, .. } = self.mode {
                    // Everything before `until` has been sent once a keepalive is past it.
                    if wal_end >= until && self.caught_up() {
                        self.finished = true;
                    }
                }
                if self.caught_up() {
                    self.idle_position = self.idle_position.max(wal_end);
                    if self.config.heartbeat_interval.is_none() {
                        // No heartbeats: a keepalive while caught up is the best idle estimate.
                        let lag = self.clock.lag(
                            pg_micros_to_unix_micros(server_time_micros),
                            unix_micros_now(),
                        );
                        self.metrics.set_current_lag(lag);
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
        self.batch.is_empty()
            && self.in_flight.is_none()
            && self.assembler.is_idle()
            && !self.in_large_transaction
    }

    /// Whether a committed transaction is still to be applied: not one the target holds
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

    /// Maps the whole transaction first, then adds it to the batch: a row that cannot be
    /// mapped fails the transaction before any of it reaches the batch.
    fn add_transaction(&mut self, transaction: Transaction) -> Result<(), Error> {
        if !self.wanted(&transaction) {
            return self.tables.note_skipped(transaction);
        }
        let mut changes = Vec::with_capacity(transaction.changes.len());
        for change in transaction.changes {
            self.map_change(change, &mut changes)?;
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
        if changes.is_empty() && self.batch.is_empty() {
            // Nothing for the target: no target transaction just to move the checkpoint.
            self.idle_position = self.idle_position.max(transaction.end_lsn);
            if heartbeat {
                // It has come through once the batch being written has.
                match &mut self.in_flight {
                    Some(in_flight) => in_flight.heartbeat = Some(at),
                    None => self.heartbeat_arrived(at),
                }
            }
            return Ok(());
        }
        if heartbeat {
            self.pending_heartbeat = Some(at);
        }
        let carried = !changes.is_empty();
        self.add_changes(changes, at);
        self.batch.commit(
            CommitPosition {
                commit_lsn: transaction.commit_lsn,
                end_lsn: transaction.end_lsn,
                commit_time: at,
            },
            carried,
        );
        self.batch_started.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Adds mapped changes of a source transaction committed at `at` to the batch.
    fn add_changes(&mut self, changes: impl IntoIterator<Item = UserChange>, at: UnixMicros) {
        for change in changes {
            let op = match change {
                UserChange::Upsert {
                    user,
                    inserted,
                    deleted_at,
                    moved_from,
                } => {
                    match (moved_from, deleted_at) {
                        (Some(from), deleted_at) => {
                            self.batch.upsert_moved(user, from, deleted_at, at)
                        }
                        (None, Some(deleted_at)) => self.batch.upsert_deleted(user, deleted_at, at),
                        (None, None) => self.batch.upsert(user, at),
                    }
                    if inserted {
                        Op::Insert
                    } else {
                        Op::Update
                    }
                }
                UserChange::Patch { id, keys, clears } => {
                    if clears {
                        self.batch.clear_part(id, keys, at);
                    } else {
                        self.batch.patch(id, keys, at);
                    }
                    Op::Update
                }
                UserChange::SoftDelete(id) => {
                    self.batch.soft_delete(id, at);
                    Op::Delete
                }
                UserChange::SoftDeleteAll => {
                    self.batch.soft_delete_all(at);
                    Op::Truncate
                }
                UserChange::Heartbeat => continue,
            };
            self.metrics.add_changes(op, 1);
        }
    }

    /// A transaction too large for one batch (or spilled to disk) goes to the target in
    /// parts, read, mapped and written [`PART_CHANGES`] at a time into one target
    /// transaction that commits with the checkpoint: memory stays bounded and the target
    /// still sees the source transaction whole or not at all. Status updates keep going
    /// out meanwhile, so the source does not time the connection out.
    async fn add_large_transaction(&mut self, transaction: Transaction) -> Result<(), Error> {
        if !self.wanted(&transaction) {
            return self.tables.note_skipped(transaction);
        }
        if !self.batch.is_empty() {
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
                self.batch = Batch::new();
                self.batch_started = None;
                self.confirm_before_failing().await;
                return Err(error);
            }
        };
        if self.mode.is_dry_run() {
            return Ok(());
        }
        self.batch.commit(position, carried);
        self.batch_started.get_or_insert_with(Instant::now);
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
            self.map_change(change?, &mut changes)?;
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
            self.add_changes(changes.drain(..), at);
            if all.peek().is_some() {
                // The worker writes this part while the next one is read and mapped.
                self.settle().await?;
                let part = std::mem::take(&mut self.batch);
                self.worker.send(Job::Part(part)).await?;
                self.in_flight = Some(InFlight {
                    oldest_commit: None,
                    heartbeat: None,
                    makes_durable: 0,
                    records_idle: None,
                });
            }
            if self.last_status.elapsed() >= self.status_interval {
                self.send_status(false).await?;
            }
        }
        Ok(carried)
    }

    fn map_change(
        &mut self,
        change: LogicalMessage,
        out: &mut Vec<UserChange>,
    ) -> Result<(), Error> {
        match change {
            LogicalMessage::Relation(relation) => self.tables.note(relation)?,
            LogicalMessage::Insert(insert) => {
                if let Some(mapping) = self.tables.mapping_of(insert.relation_id)? {
                    // A skipped new row has no user on the target to correct.
                    out.extend(change_of(mapping.map_insert(&insert.new)?, true));
                }
            }
            LogicalMessage::Update(update) => {
                let Some(mapping) = self.tables.mapping_of(update.relation_id)? else {
                    return Ok(());
                };
                let outcome = mapping.map_row(&update.new)?;
                // Whether the old row was skipped: a whole old row (REPLICA IDENTITY FULL)
                // tells; so does a key that decides skips (a tenancy) when the update left
                // it unchanged or sent it.
                let skipped_before = match &update.old {
                    Some(OldTuple::Full(old)) => mapping.skip_reason(old)?,
                    Some(OldTuple::Key(old)) => mapping.key_skip_reason(old)?,
                    None => mapping.key_skip_reason(&update.new)?,
                }
                .is_some();
                let old_id = match &update.old {
                    Some(old) => Some(mapping.map_key(old_tuple(old))?),
                    None => None,
                };
                let moved_from = old_id.filter(|old_id| old_id != outcome.id());
                let id_changed = moved_from.is_some();
                let moved_from = moved_from.filter(|_| !skipped_before);
                if let Some(old_id) = &moved_from {
                    // The primary key changed: the old user is gone, a new one appears, with
                    // the old user's values where the new row left them unchanged (TOAST).
                    out.push(removal(mapping, old_id.clone()));
                }
                if let RowOutcome::Skip { id, reason } = &outcome {
                    // The row is no longer one of ours (it became anonymous, moved to another
                    // realm, is no longer the primary email): a user replicated before must
                    // not stay live, a part replicated before must not stay.
                    if !skipped_before && !id_changed {
                        tracing::debug!(%reason, "an updated row is no longer replicated");
                        out.push(removal(mapping, id.clone()));
                    }
                }
                out.extend(change_of(outcome, false).map(|change| change.moved_from(moved_from)));
            }
            LogicalMessage::Delete(delete) => {
                let Some(mapping) = self.tables.mapping_of(delete.relation_id)? else {
                    return Ok(());
                };
                let id = mapping.map_key(old_tuple(&delete.old))?;
                let skipped = match &delete.old {
                    OldTuple::Full(old) => mapping.skip_reason(old)?,
                    OldTuple::Key(old) => mapping.key_skip_reason(old)?,
                };
                if skipped.is_none() {
                    out.push(removal(mapping, id));
                }
            }
            LogicalMessage::Truncate(truncate) => {
                let truncated = self.tables.truncated(&truncate.relation_ids)?;
                if truncated.contains(&0) {
                    out.push(UserChange::SoftDeleteAll);
                } else if !truncated.is_empty() {
                    tracing::warn!(
                        "a table holding part of the users was truncated alone; users on the \
                         target keep those keys until they change (usersync resync copies \
                         them again)"
                    );
                }
            }
            LogicalMessage::Message(message) if message.prefix == self.heartbeat_prefix => {
                out.push(UserChange::Heartbeat);
            }
            _ => {}
        }
        Ok(())
    }

    /// Hands the batch to the worker; the worker must be free.
    async fn submit_batch(&mut self) -> Result<(), Error> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_started = None;
        self.in_flight = Some(InFlight {
            oldest_commit: batch.commit_times().first().copied(),
            heartbeat: self.pending_heartbeat.take(),
            makes_durable: 0,
            records_idle: None,
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
        if !self.batch.is_empty() {
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
                let (covered, idle) = in_flight.map_or((0, None), |in_flight| {
                    (in_flight.makes_durable, in_flight.records_idle)
                });
                self.durable(covered, idle);
                return self.send_status(false).await;
            }
            Done::Part | Done::Abandoned => return Ok(()),
        };
        let applied_at = Instant::now();
        let applied_unix = unix_micros_now();
        let mut last_lag = Duration::ZERO;
        for commit_time in batch.commit_times() {
            last_lag = self.clock.lag(*commit_time, applied_unix);
            self.metrics.observe_lag(applied_at, last_lag);
        }
        self.metrics.set_current_lag(last_lag);
        self.note_lag(last_lag);
        self.metrics
            .batch_applied(batch.user_transactions(), batch.changes(), took);
        self.metrics
            .set_checkpoint(position.end_lsn, position.commit_time);
        if let Some(heartbeat) = in_flight.and_then(|in_flight| in_flight.heartbeat) {
            self.heartbeat_arrived(heartbeat);
        }
        debug_assert!(
            position.end_lsn >= self.skip_before,
            "the checkpoint only moves forward"
        );
        self.skip_before = self.skip_before.max(position.end_lsn);
        self.unflushed.push_back(position.end_lsn);
        self.send_status(false).await
    }

    /// Asks the worker to make the batches applied so far durable, and to record the idle
    /// position if there is one, without waiting for it.
    async fn submit_durable(&mut self) -> Result<(), Error> {
        self.last_durable = Instant::now();
        let idle = self.idle_to_record();
        self.in_flight = Some(InFlight {
            oldest_commit: None,
            heartbeat: None,
            makes_durable: self.unflushed.len(),
            records_idle: idle,
        });
        self.worker.send(Job::MakeDurable(idle)).await?;
        Ok(())
    }

    /// A durability flush returned: the oldest `covered` applied batches and the idle position
    /// it recorded are durable, and the slot may be confirmed up to them.
    fn durable(&mut self, covered: usize, idle: Option<Lsn>) {
        for end_lsn in self.unflushed.drain(..covered).chain(idle) {
            self.confirmed = self.confirmed.max(end_lsn);
        }
    }

    /// A position past the durable checkpoint with nothing for the target up to it: caught
    /// up, the server's latest. The slot may be confirmed there once the checkpoint records
    /// it ([`TargetWriter::make_durable`]); a dry run records nothing.
    fn idle_to_record(&self) -> Option<Lsn> {
        let dry_run = self.mode.is_dry_run();
        let past = self
            .unflushed
            .back()
            .map_or(self.confirmed, |&end| end.max(self.confirmed));
        (!dry_run && self.caught_up() && self.idle_position > past).then_some(self.idle_position)
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
        let idle = self.idle_to_record();
        if !self.unflushed.is_empty() || idle.is_some() {
            self.worker.run(Job::MakeDurable(idle)).await?;
            self.durable(self.unflushed.len(), idle);
        }
        Ok(())
    }

    fn observe_server_time(&mut self, server_time_micros: i64) {
        self.clock.observe(
            pg_micros_to_unix_micros(server_time_micros),
            unix_micros_now(),
        );
        self.metrics
            .set_clock_offset(self.clock.micros() as f64 / 1_000_000.0);
    }

    /// A heartbeat committed at `commit_time` has come through the whole pipeline.
    fn heartbeat_arrived(&mut self, commit_time: i64) {
        if self.clock.local_time(commit_time) < self.monitor_started {
            return;
        }
        let lag = self.clock.lag(commit_time, unix_micros_now());
        self.metrics.set_heartbeat_lag(lag);
        if self.caught_up() {
            self.metrics.set_current_lag(lag);
            self.note_lag(lag);
        }
    }

    /// While work waits, the current lag is the age of the oldest waiting commit.
    fn update_current_lag(&mut self) {
        let oldest = match &self.in_flight {
            Some(InFlight {
                oldest_commit: Some(oldest),
                ..
            }) => Some(*oldest),
            _ => self.batch.commit_times().first().copied(),
        };
        if let Some(oldest) = oldest {
            let lag = self.clock.lag(oldest, unix_micros_now());
            self.metrics.set_current_lag(lag);
            self.note_lag(lag);
        }
    }

    /// Logs when the lag crosses the target, once each way.
    fn note_lag(&mut self, lag: Duration) {
        let target = self.metrics.lag_target();
        let over = lag > target;
        if over && !self.over_target {
            tracing::warn!(
                lag_ms = lag.as_millis() as u64,
                target_ms = target.as_millis() as u64,
                "lag is over the target"
            );
        } else if !over && self.over_target {
            tracing::info!(
                lag_ms = lag.as_millis() as u64,
                target_ms = target.as_millis() as u64,
                "lag is back under the target"
            );
        }
        self.over_target = over;
    }

    /// Also the moment to refresh the lag figures that only change with time: status updates
    /// go out at least every few seconds, whatever the traffic.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), Error> {
        self.update_current_lag();
        if self.recent_refreshed.elapsed() >= RECENT_LAG_REFRESH {
            self.recent_refreshed = Instant::now();
            self.metrics.refresh_recent_lag(self.recent_refreshed);
        }
        let flushed = if self.mode.is_dry_run() {
            // A dry run confirms nothing: the server ignores an invalid (zero) position.
            Lsn::ZERO
        } else {
            self.reported_flush = self.reported_flush.max(self.confirmed);
            self.reported_flush
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

/// A transaction's position and time, as printed by `replay --dry-run`.
fn transaction_meta(
    commit_lsn: &Lsn,
    commit_time: i64,
) -> serde_json::Map<String, serde_json::Value> {
    let mut meta = serde_json::Map::new();
    meta.insert("lsn".into(), commit_lsn.to_string().into());
    let time = chrono::DateTime::from_timestamp_micros(commit_time)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    meta.insert("commit_time".into(), time.into());
    meta
}

/// One JSON line per change on stdout: lsn, commit time, op, id, raw_json.
fn print_changes(meta: &serde_json::Map<String, serde_json::Value>, changes: &[UserChange]) {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for change in changes {
        let mut line = meta.clone();
        let (op, id, raw_json) = match change {
            UserChange::Upsert {
                user,
                inserted,
                deleted_at,
                ..
            } => {
                if let Some(deleted_at) = deleted_at {
                    // The source keeps the row but marks the user deleted.
                    let time = chrono::DateTime::from_timestamp_micros(*deleted_at)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
                    line.insert("deleted_at".into(), time.into());
                }
                (
                    if *inserted { "insert" } else { "update" },
                    Some(user.id.as_str()),
                    Some(serde_json::Value::Object(user.raw_json.clone())),
                )
            }
            UserChange::Patch { id, keys, .. } => (
                "patch",
                Some(id.as_str()),
                Some(serde_json::Value::Object(keys.clone())),
            ),
            UserChange::SoftDelete(id) => ("delete", Some(id.as_str()), None),
            UserChange::SoftDeleteAll => ("truncate", None, None),
            UserChange::Heartbeat => continue,
        };
        line.insert("op".into(), op.into());
        line.insert("id".into(), id.into());
        line.insert("raw_json".into(), raw_json.into());
        let _ = writeln!(out, "{}", serde_json::Value::Object(line));
    }
}

fn old_tuple(old: &OldTuple) -> &TupleData {
    match old {
        OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
    }
}

/// What a row of the profile going away means for user `id`: a soft delete, or (a table
/// holding part of a user) a patch clearing that part.
fn removal(mapping: &dyn RowMapper, id: String) -> UserChange {
    match mapping
        .removed(&id)
        .and_then(|outcome| change_of(outcome, false))
    {
        Some(UserChange::Patch { id, keys, .. }) => UserChange::Patch {
            id,
            keys,
            clears: true,
        },
        Some(change) => change,
        None => UserChange::SoftDelete(id),
    }
}

/// The change a mapped row asks for, if any.
fn change_of(outcome: RowOutcome, inserted: bool) -> Option<UserChange> {
    match outcome {
        RowOutcome::User(user) => Some(UserChange::Upsert {
            user,
            inserted,
            deleted_at: None,
            moved_from: None,
        }),
        RowOutcome::Deleted { user, at } => Some(UserChange::Upsert {
            user,
            inserted,
            deleted_at: Some(at),
            moved_from: None,
        }),
        RowOutcome::Patch { id, keys } => Some(UserChange::Patch {
            id,
            keys,
            clears: false,
        }),
        RowOutcome::Skip { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::slot_lock::LockHolder;

    fn holder(pid: i32, application_name: &str) -> LockHolder {
        LockHolder {
            pid: Some(pid),
            mode: "ExclusiveLock".into(),
            application_name: Some(application_name.into()),
            usename: Some("mallory".into()),
            client_addr: None,
            backend_start: None,
        }
    }

    #[test]
    fn the_liveness_bound_outlasts_every_wait_without_progress() {
        assert_eq!(
            liveness_bound(crate::config::DEFAULT_SOURCE_TIMEOUT),
            crate::liveness::DEFAULT_BOUND
        );
        let short = liveness_bound(Duration::from_secs(2));
        for wait in [TARGET_TIMEOUT, STATUS_INTERVAL, STANDBY_POLL, MAX_BATCH_AGE] {
            assert!(wait < short, "{wait:?}");
        }
        assert_eq!(
            liveness_bound(Duration::from_secs(300)),
            Duration::from_secs(330)
        );
    }

    #[test]
    fn a_standby_names_the_holders_at_first_on_change_and_every_interval() {
        let start = Instant::now();
        let squatter = vec![holder(7, "psql")];
        assert!(holders_worth_logging(None, &squatter, start));
        assert!(holders_worth_logging(None, &[], start));
        let logged = (squatter.clone(), start);
        let soon = start + Duration::from_secs(5);
        assert!(!holders_worth_logging(Some(&logged), &squatter, soon));
        // Released between the attempt and the look: nothing new to say.
        assert!(!holders_worth_logging(Some(&logged), &[], soon));
        assert!(holders_worth_logging(
            Some(&logged),
            &[holder(8, "usersync")],
            soon
        ));
        assert!(holders_worth_logging(
            Some(&logged),
            &[holder(7, "renamed")],
            soon
        ));
        assert!(holders_worth_logging(
            Some(&logged),
            &squatter,
            start + STANDBY_LOG_INTERVAL
        ));
    }
}
