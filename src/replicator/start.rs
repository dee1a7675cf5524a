//! How a session starts: the checks before streaming, the slot's lock and the slot itself,
//! where to resume, and the connections the [`Session`] then streams on.
//!
//! Every request here is bounded by a [`Limit`]: a connection stalled while a session starts
//! would otherwise hang it for good (the stream's own silence check comes later).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres_protocol::escape::escape_identifier;
use tokio::sync::watch;

use super::backfill::CopyKind;
use super::changes::ChangeMapper;
use super::fleet::{Fleet, RouteHealth};
use super::relations::StreamTables;
use super::session::{Parts, RouteStart, Session};
use super::{
    answered, stopped, AbortOnDrop, Ended, Limit, Mode, APPLICATION_NAME, STATUS_INTERVAL,
    TARGET_TIMEOUT,
};
use crate::apply::{self, ApplyWorker, TargetWriter};
use crate::config::Config;
use crate::conn;
use crate::error::Error;
use crate::lag::unix_micros_now;
use crate::lsn::Lsn;
use crate::metrics::{Metrics, Side};
use crate::source::monitor::{heartbeat_prefix, run_monitor};
use crate::source::{catalog, ReplicationConnection, ReplicationError, SourceError};

/// How often a standby tries to take the slot's lock.
pub(super) const STANDBY_POLL: Duration = Duration::from_secs(1);
/// How often a standby logs who holds the slot's lock while that does not change.
const STANDBY_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long a replay waits for a slot's lock before it says who holds it: long enough for
/// the backend of a session that just ended to exit, too short to stand by.
const REPLAY_LOCK_GRACE: Duration = Duration::from_secs(3);
const REPLAY_LOCK_POLL: Duration = Duration::from_millis(100);
/// A replay polls the server's position this often while it waits for the end.
const REPLAY_STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How long `run` waits for a slot held by another process (often its own previous
/// walsender, which has not noticed yet that the connection is gone).
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(15);
/// Added to the source's `wal_sender_timeout` when waiting for a lingering walsender.
const SLOT_BUSY_MARGIN: Duration = Duration::from_secs(5);
/// PostgreSQL 14 brought pgoutput protocol 2 (streaming of large in-progress transactions)
/// and the `messages` option (logical messages, which carry the heartbeats).
const PROTOCOL_2_MIN_VERSION: u32 = 140_000;
/// Caps the walsender's `logical_decoding_work_mem` at 8MB. Under that limit a transaction
/// waits in the walsender's memory until its commit, and only then is decoded into messages
/// and sent; over it, it streams while still open. With the default 64MB, a transaction of
/// 100,000 users was mostly sent after its commit, and the target waited for that; capped,
/// all but its last few megabytes have reached usersync when it commits (the bench's
/// 100,000-row transaction, three pairs: 2.5 s from commit to last row before, 1.9 to 2.0 s
/// after). usersync holds a streamed transaction until its commit (in memory, then in a
/// spill file), as it would have held it whole after the commit; what the cap costs is that
/// a transaction over it that then rolls back crosses the network first. The limit is
/// shared by all the transactions open at once. A lower setting of the server, database or
/// role stays, and so does one the source URL's `options` set
/// (`-c logical_decoding_work_mem=...`), which is how an operator chooses another.
const CAP_DECODING_MEMORY: &str =
    "SELECT pg_catalog.set_config('logical_decoding_work_mem', '8MB', false) \
     FROM pg_catalog.pg_settings WHERE name = 'logical_decoding_work_mem' \
     AND setting::bigint > 8192 AND source <> 'client'";

/// Whether the source streams large transactions while they are open (protocol 2).
fn streams(replication: &ReplicationConnection) -> bool {
    replication
        .server_version_num()
        .is_some_and(|v| v >= PROTOCOL_2_MIN_VERSION)
}

/// Runs [`CAP_DECODING_MEMORY`]. A server that refuses it (an error that is not the
/// connection's) streams at its own limit: worth a warning, not a stop.
async fn cap_decoding_memory(
    replication: &mut ReplicationConnection,
) -> Result<(), ReplicationError> {
    match replication.simple_query(CAP_DECODING_MEMORY).await {
        Ok(_) => Ok(()),
        Err(error @ ReplicationError::Server { .. }) if !error.is_transient() => {
            tracing::warn!(
                %error,
                "the source refused to lower logical_decoding_work_mem for usersync's session: \
                 a large transaction streams at the server's own limit (with the default 64MB, \
                 mostly after its commit, which delays it on the target)"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// A route's target, locked and read, before the source is asked anything.
struct OpenTarget {
    config: Config,
    client: tokio_postgres::Client,
    warnings: conn::sql::Warnings,
    shape: apply::TargetShape,
    checkpoint: apply::Checkpoint,
}

pub(super) async fn run_session(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &mut watch::Receiver<bool>,
    mode: Mode,
    fleet: &mut Fleet,
) -> Result<Ended, Error> {
    let health = &mut fleet.health;
    let target_limit = Limit::new(TARGET_TIMEOUT, metrics.liveness());
    let source_limit = Limit::new(config.source_timeout, metrics.liveness());
    // A replay is a one-off that must apply everything pending everywhere: there, any
    // route's failure ends it, as with one target.
    let route_configs = config.route_configs();
    let fan_out = config.routes.is_some() && mode == Mode::Service;
    // A fan-out's run stands by on the slot's lock on the source, held on a connection kept
    // for the session: a route's target restarting (its lock gone) must not let a standby
    // in. Each route's own lock is then only tried (an old session of this process may hold
    // one for a while). Then every target: its lock, then its checkpoint; in a fan-out, a
    // route whose target cannot be opened is left behind (see `fleet`): the others go on.
    let leader = if fan_out {
        let leader = answered(source_limit, "source", "preparing the session", async {
            conn::sql::connect(&config.source, APPLICATION_NAME)
                .await
                .map_err(Error::connect("source"))
        })
        .await?;
        if !hold_lock_on(
            LockSide::Source,
            &leader,
            &config.slot,
            mode,
            metrics,
            shutdown,
        )
        .await?
        {
            return Ok(Ended::Done);
        }
        Some(leader)
    } else {
        None
    };
    let mut targets = Vec::new();
    let mut failures = Failures::default();
    for (index, route) in route_configs.into_iter().enumerate() {
        if health[index].is_evicted() {
            targets.push(Opened::Evicted);
            continue;
        }
        let name = route.route_name().unwrap_or_default().to_owned();
        match open_target(route, metrics, shutdown, mode, !fan_out, fan_out).await {
            Ok(Some(opened)) => targets.push(opened),
            Ok(None) => return Ok(Ended::Done),
            Err(error) if fan_out => {
                let probe = failures.route_down(&name, error, &mut health[index]);
                targets.push(Opened::Down { probe });
            }
            Err(error) => return Err(error),
        }
    }
    if fan_out && !targets.iter().any(|t| matches!(t, Opened::Ready(_))) {
        if let Some(error) = failures.transient {
            // One blip (a shared server, the network, an old session's locks): retry.
            return Err(error);
        }
        if targets.iter().any(|t| matches!(t, Opened::Unset)) {
            // No route holds a checkpoint: nothing proves the slot is this fan-out's.
            return Err(Error::Config(format!(
                "no route's target holds a checkpoint for slot {}: run usersync setup \
                 --routes first",
                config.slot
            )));
        }
        return Err(failures.definite.unwrap_or_else(|| {
            Error::Config("every route is evicted: resync them (docs/fan-out.md)".into())
        }));
    }
    let dry_run = mode.is_dry_run();

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
        return Ok(Ended::Done);
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
        if streams(&replication) {
            cap_decoding_memory(&mut replication).await?;
        }
        Ok((replication, identity))
    })
    .await?;
    let mut routes = Vec::with_capacity(targets.len());
    for (index, target) in targets.into_iter().enumerate() {
        let target = match target {
            Opened::Ready(target) => *target,
            Opened::Down { probe } => {
                // Its checkpoint is unknown, and at or past the slot's position.
                routes.push(RouteStart::Down {
                    held: confirmed_flush,
                    probe,
                });
                continue;
            }
            Opened::Evicted => {
                routes.push(RouteStart::Evicted);
                continue;
            }
            Opened::Unset => {
                // Held where the slot stands: the copy's snapshot is taken later, past it.
                routes.push(RouteStart::Unset {
                    held: confirmed_flush,
                });
                continue;
            }
        };
        let resume_at = match resume_point(
            &target,
            &identity,
            confirmed_flush,
            source_in_recovery,
            dry_run,
            target_limit,
        )
        .await
        {
            Ok(resume_at) => resume_at,
            Err(Refusal::Unresumable(error)) if fan_out => {
                // Behind the slot (evicted, or restored) or from another source: the slot
                // cannot wait for what it already passed; this target needs a resync.
                tracing::error!(
                    route = target.config.route_name().unwrap_or_default(),
                    error = %crate::error::report(&error),
                    "the route cannot resume: it is left out until it is resynced"
                );
                health[index].evict();
                routes.push(RouteStart::Evicted);
                continue;
            }
            Err(Refusal::Failed(error)) if fan_out => {
                let name = target.config.route_name().unwrap_or_default().to_owned();
                let probe = failures.route_down(&name, error, &mut health[index]);
                routes.push(RouteStart::Down {
                    held: confirmed_flush,
                    probe,
                });
                continue;
            }
            Err(Refusal::Unresumable(error) | Refusal::Failed(error)) => return Err(error),
        };
        let OpenTarget {
            config: route,
            client,
            warnings,
            shape,
            checkpoint,
        } = target;
        let name = route.route_name().unwrap_or_default().to_owned();
        let writer = answered(target_limit, "target", "preparing statements", async {
            let mut writer =
                TargetWriter::new(client, shape, &route.checkpoint_key(), &identity.system_id)
                    .await?;
            writer.watch_warnings(warnings);
            // The checkpoint read above is only visible: the session that wrote it may have
            // committed it asynchronously and died before a synchronous commit covered it, and
            // a target crash (or a Neon compute restart) would undo it. It becomes the first
            // position this session reports, so first make it durable.
            writer.make_durable(None).await?;
            writer.use_async_commit().await?;
            writer.count_in(Arc::clone(metrics));
            Ok(writer)
        })
        .await;
        let writer = match writer {
            Ok(writer) => writer,
            Err(error) if fan_out => {
                // Its checkpoint, read above, is durable or about to be: the slot may wait
                // there only if it is no further than the slot's own position.
                let probe = failures.route_down(&name, error, &mut health[index]);
                routes.push(RouteStart::Down {
                    held: confirmed_flush,
                    probe,
                });
                continue;
            }
            Err(error) => return Err(error),
        };
        // A route alone writes a backlog over two connections (see `route::Companion`); the
        // routes of a fan-out (or its replay) keep one each, since theirs add up.
        let companion = if config.routes.is_some() || dry_run || fleet.one_connection {
            None
        } else {
            let opened = answered(
                target_limit,
                "target",
                "opening a second connection",
                async {
                    let holder = writer.session().await?;
                    let companion =
                        open_companion(&route, shape, &identity.system_id, metrics, holder).await?;
                    Ok(companion)
                },
            )
            .await;
            match opened {
                // The first needs no check: it holds the lock itself, for as long as it lives.
                Ok(companion) => Some(ApplyWorker::spawn(companion)),
                Err(error) => {
                    // One is enough: a role limited to one connection, or a pooler with one
                    // server connection, must not stop replication.
                    tracing::warn!(
                        error = %crate::error::report(&error),
                        "a second target connection could not be opened: writing with one \
                         (a backlog drains more slowly, and batches wait for each durability \
                         flush) until usersync restarts"
                    );
                    fleet.one_connection = true;
                    None
                }
            }
        };
        routes.push(RouteStart::Ready {
            worker: ApplyWorker::spawn(writer),
            companion,
            resume_at,
            copying: (fan_out && checkpoint.copying).then_some(if checkpoint.copy_reconciles {
                CopyKind::Reconcile
            } else {
                CopyKind::Fill
            }),
        });
    }
    let Some(resume_at) = routes
        .iter()
        .filter_map(|route| match route {
            RouteStart::Ready { resume_at, .. } => Some(*resume_at),
            _ => None,
        })
        .min()
    else {
        return Err(failures.transient.unwrap_or_else(|| {
            Error::Config(
                "every route is evicted or cannot resume (see the errors above): resync them"
                    .into(),
            )
        }));
    };
    let protocol_2 = streams(&replication);
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
    tracing::info!(
        slot = %config.slot,
        resume_at = %resume_at,
        system = %identity.system_id,
        routes = routes.len(),
        "streaming"
    );
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
    let tables = StreamTables::new(profile, &config.table).routed_by(config.routes.clone());
    Session::new(Parts {
        config,
        metrics,
        mode,
        status_interval,
        stream,
        routes,
        fleet,
        leader,
        changes: ChangeMapper::new(
            tables,
            heartbeat_prefix(&config.slot),
            config.routes.as_ref().map(|routes| routes.router()),
        ),
        slot_confirmed: confirmed_flush,
        monitor_started,
        system_id: identity.system_id.clone(),
    })
    .run(shutdown)
    .await
}

/// A route's target after [`open_target`].
enum Opened {
    Ready(Box<OpenTarget>),
    /// A route of a fan-out whose target holds no checkpoint yet (added to the routes file,
    /// or its copy interrupted): `run` copies it, then lets it join.
    Unset,
    /// Could not be opened (a fan-out only); `probe`: the failure may pass by itself.
    Down {
        probe: bool,
    },
    /// Evicted in an earlier session of this process.
    Evicted,
}

/// Why routes of a fan-out were left out of a session: the first transient and the first
/// definite error, so that a session no route can start fails with a transient one when
/// there is one (`run` retries it) rather than stop for good on a blip.
#[derive(Default)]
struct Failures {
    transient: Option<Error>,
    definite: Option<Error>,
}

impl Failures {
    /// Logs why route `name` is left out of this session, notes it in its health and keeps
    /// the error; returns whether to probe its target (a failure that may pass by itself)
    /// rather than leave it for the operator (a restart of `run` after the fix retries it).
    fn route_down(&mut self, name: &str, error: Error, health: &mut RouteHealth) -> bool {
        health.failed();
        let transient = error.is_transient();
        if transient {
            tracing::warn!(
                route = %name,
                error = %crate::error::report(&error),
                "cannot open the route's target: the other routes go on, the slot waits for \
                 this one, and its target is probed until it answers"
            );
            self.transient.get_or_insert(error);
        } else {
            tracing::error!(
                route = %name,
                error = %crate::error::report(&error),
                "the route cannot start until this is fixed: the other routes go on, and the \
                 slot waits for this one (restart usersync run once fixed, or let \
                 --evict-after release the slot)"
            );
            self.definite.get_or_insert(error);
        }
        transient
    }
}

/// Why a route cannot resume.
enum Refusal {
    /// Its checkpoint is behind the slot, or from another source: it needs a resync.
    Unresumable(Error),
    /// Anything else (a lost connection while taking over the checkpoint).
    Failed(Error),
}

/// Connects to a route's target, takes its lock (standing by while another process holds
/// it), brings usersync's tables up to this version and reads the checkpoint. `None` if
/// stopped while standing by.
async fn open_target(
    config: Config,
    metrics: &Arc<Metrics>,
    shutdown: &mut watch::Receiver<bool>,
    mode: Mode,
    stand_by: bool,
    copies_itself: bool,
) -> Result<Option<Opened>, Error> {
    // Every request before streaming is bounded: a connection stalled while a session starts
    // would otherwise hang it for good (the stream's own silence check comes later).
    let target_limit = Limit::new(TARGET_TIMEOUT, metrics.liveness());
    let prepared = answered(target_limit, "target", "preparing the session", async {
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
            if copies_itself {
                // A new route's target: `run` prepares it when the route joins.
                return Ok(None);
            }
            return Err(Error::Config(format!(
                "the target{} has no neon_auth.users_sync or usersync.state yet: run usersync setup first",
                route_label(&config)
            )));
        }
        if config.routes.is_none() {
            apply::refuse_route_target(&target, &config.slot).await?;
        }
        let shape = apply::check_shape(&target).await?;
        Ok(Some((target, warnings, shape)))
    })
    .await?;
    let Some((client, warnings, shape)) = prepared else {
        return Ok(Some(Opened::Unset));
    };
    metrics.set_connected(Side::Target, true);
    let key = config.checkpoint_key();
    if stand_by {
        if !hold_slot_lock(&client, &key, mode, metrics, shutdown).await? {
            return Ok(None);
        }
    } else {
        answered(
            target_limit,
            "target",
            "taking the slot's lock",
            try_route_lock(&client, &config),
        )
        .await?;
    }
    if !mode.is_dry_run() {
        // A checkpoint table of an older usersync gets what this one records; holding the
        // slot's lock, no other replicator of this slot writes to it meanwhile.
        answered(target_limit, "target", "upgrading usersync.state", async {
            Ok(apply::upgrade_state(&client).await?)
        })
        .await?;
    }
    // Read only now: a standby that just took over resumes where the other one stopped, once
    // the batch that one may still be committing on its second connection has ended.
    let checkpoint = answered(target_limit, "target", "reading the checkpoint", async {
        Ok(if mode.is_dry_run() {
            apply::read_checkpoint(&client, &key).await?
        } else {
            apply::read_checkpoint_waiting(&client, &key).await?
        })
    })
    .await?;
    // Without one, setup or resync has not finished its copy (or the checkpoint was
    // removed): streaming now would make a partial copy final, or race a copy in progress.
    // A route of a fan-out is copied by `run` itself ([`Opened::Unset`]).
    let Some(checkpoint) = checkpoint else {
        if copies_itself {
            return Ok(Some(Opened::Unset));
        }
        return Err(Error::Config(format!(
            "the target{} holds no checkpoint for slot {}: usersync setup (or resync) has not \
             finished its copy, or the checkpoint was removed; run usersync setup to finish a \
             first setup, or usersync resync if this target was fed before",
            route_label(&config),
            config.slot
        )));
    };
    Ok(Some(Opened::Ready(Box::new(OpenTarget {
        config,
        client,
        warnings,
        shape,
        checkpoint,
    }))))
}

/// The second writer of a route alone (see `route::Companion`), set up as the first is but
/// holding no lock: before each batch it commits, it checks that `holder`, the first's
/// session, still holds the slot's.
async fn open_companion(
    route: &Config,
    shape: apply::TargetShape,
    system_id: &str,
    metrics: &Arc<Metrics>,
    holder: apply::Session,
) -> Result<TargetWriter, Error> {
    let (client, warnings) = conn::sql::connect_counting_warnings(&route.target, APPLICATION_NAME)
        .await
        .map_err(Error::connect("target"))?;
    let mut writer = TargetWriter::new(client, shape, &route.checkpoint_key(), system_id).await?;
    writer.watch_warnings(warnings);
    writer.use_async_commit().await?;
    writer.count_in(Arc::clone(metrics));
    writer.check_lock_held_by(holder);
    Ok(writer)
}

/// Takes route `config`'s lock on its target (`client`) without waiting. Held by another
/// session: [`Error::Busy`], transient (often this process's previous session, whose backend
/// has not noticed yet that its connection is gone, which ends in time).
pub(super) async fn try_route_lock(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(), Error> {
    let Some(holders) = apply::slot_lock::try_take(client, &config.checkpoint_key()).await? else {
        return Ok(());
    };
    Err(Error::Busy(format!(
        "another session holds the lock of route {} on its target ({})",
        config.route_name().unwrap_or_default(),
        apply::slot_lock::describe(&holders)
    )))
}

/// Where a route's target resumes: its checkpoint, once checked against the source.
async fn resume_point(
    target: &OpenTarget,
    identity: &crate::source::SystemIdentity,
    confirmed_flush: Lsn,
    source_in_recovery: bool,
    dry_run: bool,
    target_limit: Limit<'_>,
) -> Result<Lsn, Refusal> {
    let OpenTarget {
        config, checkpoint, ..
    } = target;
    let route = route_label(config);
    if checkpoint.system_id != identity.system_id {
        return Err(Refusal::Unresumable(
            SourceError::Definite(format!(
                "the target's checkpoint{route} for slot {} comes from source system {}, but this \
             source is system {}; point usersync at the right source, or use another slot",
                config.slot, checkpoint.system_id, identity.system_id
            ))
            .into(),
        ));
    }
    // The slot is never confirmed past the checkpoint (`sql/usersync_state.sql`), so a slot
    // confirmed further means this target lost what it had applied; streaming on from the
    // slot would leave that gap for good. A checkpoint an older usersync wrote proves
    // nothing yet: it is taken over at the slot's position.
    // A route being resynced online is rebuilt whatever it missed: it resumes at the slot.
    // (Not from a standby: the copy writes transactions on the source.)
    let rebuilt =
        checkpoint.copying && checkpoint.copy_reconciles && !dry_run && !source_in_recovery;
    let behind = confirmed_flush > checkpoint.end_lsn;
    if checkpoint.slot_bounded && behind && !rebuilt {
        return Err(Refusal::Unresumable(target_behind_slot(
            config,
            confirmed_flush,
            checkpoint,
        )));
    }
    let take_over = (!checkpoint.slot_bounded || (rebuilt && behind)) && !dry_run;
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
        return Err(Refusal::Unresumable(
            SourceError::Definite(format!(
            "the target's checkpoint{route} for slot {} is at {}, past the end of the source's \
             WAL ({}): the source lost WAL this target had seen (it failed over to a standby \
             that lacked it, or was restored to an earlier point), and changes made there \
             since would be skipped; run usersync resync (it copies the table again and \
             soft-deletes the users the source no longer has)",
            config.slot, resume_at, identity.xlog_pos
        ))
            .into(),
        ));
    }
    if take_over {
        answered(
            target_limit,
            "target",
            "taking over the checkpoint",
            async {
                Ok(apply::take_over_checkpoint(
                    &target.client,
                    &config.checkpoint_key(),
                    &checkpoint.system_id,
                    confirmed_flush,
                )
                .await?)
            },
        )
        .await
        .map_err(Refusal::Failed)?;
        if rebuilt {
            tracing::info!(
                slot = %config.slot,
                route = config.route_name().unwrap_or_default(),
                checkpoint = %resume_at,
                "the route resumes at the slot's position: its online resync copies what it \
                 missed"
            );
            return Ok(resume_at);
        }
        // Once per upgrade; more often means something else writes usersync.state (a
        // trigger, a person), which turns the detection of a restored target off.
        tracing::warn!(
            slot = %config.slot,
            checkpoint = %resume_at,
            "took over a checkpoint that an older usersync (or something else) wrote: a \
             restore of the target to before this point cannot be detected"
        );
    }
    Ok(resume_at)
}

/// " of route NAME" in messages about a route's target; nothing for the one target.
fn route_label(config: &Config) -> String {
    config
        .route_name()
        .map(|name| format!(" of route {name}"))
        .unwrap_or_default()
}

/// A slot confirmed past the target's checkpoint, which bounds it: the target lost what it
/// had applied up to the slot's position, and the source no longer has it for this slot.
fn target_behind_slot(config: &Config, confirmed: Lsn, checkpoint: &apply::Checkpoint) -> Error {
    let slot = &config.slot;
    if let Some(route) = config.route_name() {
        return Error::Config(format!(
            "slot {slot} is confirmed up to {confirmed}, past the checkpoint of route {route} \
             ({}): the route was evicted (down past --evict-after), its target was restored \
             to an earlier point, or a run without this route streamed meanwhile; its target \
             lacks changes the slot no longer holds. Run usersync resync --routes <file> \
             --online {route}: it copies the route again while run streams, and soft-deletes \
             the users the source no longer has. See docs/fan-out.md#a-lost-slot-and-copying-a-route-again",
            checkpoint.end_lsn,
        ));
    }
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
    hold_lock_on(LockSide::Target, target, slot, mode, metrics, shutdown).await
}

/// Where a session takes the lock it stands by on: the one target's (or each route's in a
/// replay), or, for a fan-out's `run`, the source's (a lock no route's target could take from
/// it: a route whose target restarts loses its lock there, and a standby must not take over
/// on that).
#[derive(Clone, Copy)]
enum LockSide {
    Target,
    Source,
}

impl LockSide {
    fn name(self) -> &'static str {
        match self {
            LockSide::Target => "target",
            LockSide::Source => "source",
        }
    }

    fn error(self, context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
        move |error| match self {
            LockSide::Target => apply::ApplyError::sql(context)(error).into(),
            LockSide::Source => SourceError::sql(context)(error).into(),
        }
    }
}

async fn hold_lock_on(
    side: LockSide,
    client: &tokio_postgres::Client,
    slot: &str,
    mode: Mode,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    let result = wait_for_slot_lock(side, client, slot, mode, metrics, shutdown).await;
    // Holding it, stopped, or failed: not standing by any more.
    metrics.set_standby(None);
    result
}

async fn wait_for_slot_lock(
    side: LockSide,
    target: &tokio_postgres::Client,
    slot: &str,
    mode: Mode,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    let mut logged: Option<(Vec<apply::slot_lock::LockHolder>, Instant)> = None;
    let target_limit = Limit::new(TARGET_TIMEOUT, metrics.liveness());
    let started = Instant::now();
    let on = side.name();
    loop {
        let locked: bool = answered(target_limit, on, "taking the slot's lock", async {
            Ok(target
                .query_one(apply::slot_lock::TRY_LOCK, &[&slot])
                .await
                .map_err(side.error("taking the slot's lock"))?
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
        let holders = answered(target_limit, on, "reading the slot's lock", async {
            Ok(apply::slot_lock::holders(target, slot).await?)
        })
        .await?;
        if replay {
            // A replay is a one-off: it does not stand by behind a running replicator, which
            // applies what is pending anyway.
            return Err(Error::Config(format!(
                "another session holds slot {slot}'s lock on the {on} ({}): a usersync run \
                 replicates this slot, and applies what is pending itself; stop it first to \
                 replay (or to replay --dry-run)",
                apply::slot_lock::describe(&holders)
            )));
        }
        let now = Instant::now();
        if holders_worth_logging(logged.as_ref(), &holders, now) {
            tracing::info!(
                slot,
                on,
                holders = %apply::slot_lock::describe(&holders),
                "standby: another session holds the slot's lock (a usersync, or any session \
                 that took it); waiting to take over"
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
