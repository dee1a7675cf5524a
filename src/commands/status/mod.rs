//! `usersync status`: one look at the slot on the source, the checkpoint and users on the
//! target, and the lag, with a verdict and an exit code for cron jobs and probes.
//!
//! Everything is read over ordinary SQL; nothing is written and the slot is not touched, so
//! status is safe to run while `usersync run` streams. What the pending WAL holds is not
//! decoded (that would need the slot), so the lag is an estimate: see
//! [`report::estimate_lag`].

pub mod report;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::Client;

use super::connect;
use super::units::Rfc3339;
use crate::apply::{self, ApplyError};
use crate::config::Config;
use crate::error::Error;
use crate::source::catalog;
use report::{
    estimate_lag, CheckpointStatus, LagStatus, LsnText, Problem, RecentLag, SlotStatus,
    SourceStatus, StatusReport, TargetStatus, Thresholds, Verdict,
};

/// How to report, beyond the connection settings.
#[derive(Debug, Clone, Copy)]
pub struct StatusOptions {
    /// One JSON object on stdout instead of the table.
    pub json: bool,
    /// `safe_wal_size` below this makes the slot at risk.
    pub min_safe_wal_size: u64,
    /// Where a running `usersync run` serves `/metrics`, for its last-minute lag figures.
    pub metrics_addr: SocketAddr,
}

/// Prints the report and returns the verdict (whose exit code `main` uses).
pub async fn status(config: &Config, options: StatusOptions) -> Result<Verdict, Error> {
    if config.routes.is_some() {
        return routes_status(config, options).await;
    }
    let report = match gather(config, options).await {
        Ok(report) => report,
        Err(error) => {
            if options.json {
                // Scripts get their one object even now; the error also goes to stderr.
                println!("{}", unknown_json(&error));
            }
            return Err(error);
        }
    };
    if options.json {
        let json = serde_json::to_string(&report)
            .expect("a status report has only string keys and plain values");
        println!("{json}");
    } else {
        // The slot's plugin, wal_status and the like are the server's words.
        print!("{}", crate::error::escape_controls(&report.human()));
    }
    Ok(report.verdict)
}

/// `status --routes`: each route judged as one target would be (the slot's facts are the
/// same in each), then a line per route; the worst verdict decides. A route whose target
/// cannot be read is broken; the others are still reported.
async fn routes_status(config: &Config, options: StatusOptions) -> Result<Verdict, Error> {
    let mut routes = Vec::new();
    for route in config.route_configs() {
        let name = route.route_name().unwrap_or_default().to_owned();
        // One tenant's database that does not answer (a lock on users_sync, a stalled
        // server) must not keep the others' verdicts from being said.
        let mut report = tokio::time::timeout(ROUTE_STATUS_TIMEOUT, gather(&route, options))
            .await
            .unwrap_or_else(|_| {
                Err(Error::Unanswered {
                    which: "target",
                    what: "reading a route's status",
                    after: ROUTE_STATUS_TIMEOUT,
                })
            });
        if let Ok(report) = &mut report {
            // A route new to the file (or its checkpoint removed) is copied online by run,
            // and one marked copying is on its way: neither holds every user yet.
            let message = match &report.checkpoint {
                None if report.target.unfinished.is_none() => Some(format!(
                    "route {name} has no checkpoint on its target yet: usersync run copies it \
                     online by itself (start run if none is running)"
                )),
                Some(checkpoint) if checkpoint.copying => Some(format!(
                    "route {name} is being copied online: its target lacks users from before \
                     it joined until usersync run is done (start run if none is running)"
                )),
                _ => None,
            };
            if let Some(message) = message {
                report.problems.push(Problem {
                    verdict: Verdict::Lagging,
                    message,
                });
                report.verdict = report.verdict.max(Verdict::Lagging);
                report.exit_code = report.verdict.exit_code();
            }
        }
        routes.push((name, report));
    }
    let verdict = routes
        .iter()
        .map(|(_, report)| match report {
            Ok(report) => report.verdict,
            Err(_) => Verdict::Broken,
        })
        .max()
        .unwrap_or(Verdict::Healthy);
    if options.json {
        let routes: Vec<serde_json::Value> = routes
            .iter()
            .map(|(name, report)| match report {
                Ok(report) => serde_json::json!({ "route": name, "report": report }),
                Err(error) => serde_json::json!({
                    "route": name,
                    "verdict": "unknown",
                    "error": crate::error::report(error),
                }),
            })
            .collect();
        let json = serde_json::json!({
            "verdict": verdict,
            "exit_code": verdict.exit_code(),
            "routes": routes,
        });
        println!("{json}");
        return Ok(verdict);
    }
    let mut out = String::new();
    for (name, report) in &routes {
        out.push_str(&format!("== route {name}\n"));
        match report {
            Ok(report) => out.push_str(&report.human()),
            Err(error) => out.push_str(&format!(
                "verdict             broken: {}\n",
                crate::error::report(error)
            )),
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<20}{:<14}{:<16}{:<12}{}\n",
        "route", "verdict", "checkpoint", "lag", "live users"
    ));
    for (name, report) in &routes {
        let (state, checkpoint, lag, users) = match report {
            Ok(report) => (
                report.verdict.as_str().to_owned(),
                report
                    .checkpoint
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |c| c.end_lsn.0.to_string()),
                report
                    .lag
                    .seconds
                    .map_or_else(|| "-".to_owned(), |s| format!("{:.3}s", s)),
                report
                    .target
                    .users_live
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            ),
            Err(_) => ("broken".into(), "-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "{name:<20}{state:<14}{checkpoint:<16}{lag:<12}{users}\n"
        ));
    }
    out.push_str(&format!(
        "verdict             {} (the worst route's)\n",
        verdict.as_str()
    ));
    print!("{}", crate::error::escape_controls(&out));
    Ok(verdict)
}

/// What `status --json` prints when it could not gather the facts: no verdict can be drawn,
/// the exit code is the error's, and the error says why (passwords redacted).
fn unknown_json(error: &Error) -> serde_json::Value {
    serde_json::json!({
        "verdict": "unknown",
        "exit_code": error.exit_code(),
        "error": crate::error::report(error),
    })
}

/// Reads the source and the target and judges what it found.
pub async fn gather(config: &Config, options: StatusOptions) -> Result<StatusReport, Error> {
    let source = connect("source", &config.source).await?;
    let system_identifier = catalog::system_identifier(&source).await?;
    let slot = catalog::slot_info(&source, &config.slot).await?;
    let current = catalog::current_wal_lsn(&source).await?;
    // The measurement the source server keeps for the process streaming from the slot.
    let consumer_flush_lag = match slot.as_ref().and_then(|slot| slot.active_pid) {
        Some(pid) if slot.as_ref().is_some_and(|slot| slot.active) => {
            Some(catalog::walsender_flush_lag(&source, pid).await?)
        }
        _ => None,
    };
    let contact_channel_full = contact_channel_replica_identity_full(&source, config).await?;
    drop(source);

    let target = connect("target", &config.target).await?;
    if config.routes.is_none() {
        apply::refuse_route_target(&target, &config.slot).await?;
    }
    let mut problems = Vec::new();
    if let Some(database) = slot.as_ref().and_then(|slot| slot.database.as_deref()) {
        // A slot of that name for another database of the server is not this source's.
        if database != config.source.dbname {
            problems.push(Problem {
                verdict: Verdict::Broken,
                message: format!(
                    "replication slot {} belongs to database {}, not {}: it is not this \
                     source's slot; use the --slot of this source",
                    config.slot,
                    database.escape_default(),
                    config.source.dbname
                ),
            });
        }
    }
    let (target_status, checkpoint) = read_target(&target, config, &mut problems).await?;
    if let (Some(unknown), Some(false)) = (
        target_status
            .primary_email_channels_unknown
            .filter(|&n| n > 0),
        contact_channel_full,
    ) {
        // Not broken yet: run goes on until one of those users' channels changes.
        problems.push(Problem {
            verdict: Verdict::Lagging,
            message: format!(
                "{unknown} users' primary email channel is unknown on the target and \
                 \"ContactChannel\" is not REPLICA IDENTITY FULL: the next change to one of \
                 their channels stops usersync run; stop every older usersync run, then run \
                 usersync setup to record them (see docs/profiles.md, stack-auth)"
            ),
        });
    }

    let now = Utc::now();
    let pending_bytes = slot.as_ref().and_then(|slot| slot.pending_bytes(current));
    let replicator = replicator_metrics(options.metrics_addr).await;
    // Its own lag counts only if it is the active replicator of this very slot.
    let streaming = slot.as_ref().is_some_and(|slot| slot.active);
    let replicator_lag = replicator
        .as_ref()
        .filter(|metrics| streaming && metrics.is_active_for(&config.slot, &system_identifier))
        .and_then(|metrics| metrics.current_lag(config.route_name()));
    let (lag, estimate) = estimate_lag(
        pending_bytes,
        replicator_lag,
        consumer_flush_lag,
        checkpoint
            .as_ref()
            .and_then(|checkpoint| checkpoint.commit_time),
        now,
    );
    let mut report = StatusReport {
        route: config.route_name().map(str::to_owned),
        verdict: Verdict::Healthy,
        exit_code: Verdict::Healthy.exit_code(),
        problems,
        checked_at: Rfc3339(now),
        source: SourceStatus {
            url: config.source.redacted(),
            system_identifier,
            current_wal_lsn: LsnText(current),
        },
        slot: SlotStatus {
            name: config.slot.clone(),
            exists: slot.is_some(),
            plugin: slot.as_ref().and_then(|slot| slot.plugin.clone()),
            database: slot.as_ref().and_then(|slot| slot.database.clone()),
            active: slot.as_ref().is_some_and(|slot| slot.active),
            active_pid: slot.as_ref().and_then(|slot| slot.active_pid),
            confirmed_flush_lsn: slot
                .as_ref()
                .and_then(|slot| slot.confirmed_flush_lsn)
                .map(LsnText),
            restart_lsn: slot.as_ref().and_then(|slot| slot.restart_lsn).map(LsnText),
            wal_status: slot.as_ref().and_then(|slot| slot.wal_status.clone()),
            invalidation_reason: slot
                .as_ref()
                .and_then(|slot| slot.invalidation_reason.clone()),
            safe_wal_size_bytes: slot.as_ref().and_then(|slot| slot.safe_wal_size),
            retained_wal_bytes: slot.as_ref().and_then(|slot| slot.retained_bytes(current)),
            pending_bytes,
        },
        checkpoint: checkpoint.map(|checkpoint| CheckpointStatus {
            system_identifier: checkpoint.system_id,
            commit_lsn: LsnText(checkpoint.commit_lsn),
            end_lsn: LsnText(checkpoint.end_lsn),
            commit_time: checkpoint.commit_time.map(Rfc3339),
            written_at: Rfc3339(checkpoint.written_at),
            slot_bounded: checkpoint.slot_bounded,
            copying: checkpoint.copying,
            copy_reconciles: checkpoint.copy_reconciles,
        }),
        target: target_status,
        lag: LagStatus {
            seconds: lag.map(|lag| lag.as_secs_f64()),
            target_seconds: config.lag_target.as_secs_f64(),
            estimate,
            last_minute: replicator.as_ref().map(ReplicatorMetrics::recent_lag),
        },
    };
    report.judge(Thresholds {
        lag_target: config.lag_target,
        min_safe_wal_size: options.min_safe_wal_size,
    });
    Ok(report)
}

/// How long `status --routes` waits for one route's facts.
const ROUTE_STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `status` waits for a running usersync's `/metrics`.
const METRICS_TIMEOUT: Duration = Duration::from_secs(1);

/// What a running `usersync run` serves at `/metrics`.
struct ReplicatorMetrics {
    addr: SocketAddr,
    body: String,
}

impl ReplicatorMetrics {
    /// The value of the sample `name` (with its labels, as exported), if present.
    fn value(&self, name: &str) -> Option<f64> {
        self.body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<f64>().ok())
    }

    /// Whether it consumes `slot` of the source system `system` as the active replicator
    /// (not a standby, not starting). The endpoint is unauthenticated: naming the source
    /// system keeps another usersync's figures (another source, the same default slot name)
    /// out, and a process that merely squats the port must know the system identifier.
    fn is_active_for(&self, slot: &str, system: &str) -> bool {
        let info = format!("usersync_slot_info{{slot=\"{slot}\",system=\"{system}\"}}");
        self.value(&info) == Some(1.0)
            && self.value("usersync_standby") == Some(0.0)
            && self.value("usersync_ready") == Some(1.0)
    }

    /// Its current lag (of route `route` of a fan-out, only while that route is active: a
    /// route left behind keeps its last figure): the oldest unapplied commit's age, or,
    /// caught up, the last heartbeat's lag through the whole pipeline.
    fn current_lag(&self, route: Option<&str>) -> Option<Duration> {
        let name = match route {
            None => "usersync_lag_current_seconds".to_owned(),
            Some(route) => {
                let active = format!("usersync_route_state{{route=\"{route}\",state=\"active\"}}");
                if self.value(&active) != Some(1.0) {
                    return None;
                }
                format!("usersync_route_lag_seconds{{route=\"{route}\"}}")
            }
        };
        self.value(&name)
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
    }

    /// Its figures over the last minute (the same ones `demo` prints).
    fn recent_lag(&self) -> RecentLag {
        RecentLag {
            p50_seconds: self.value("usersync_lag_recent_seconds{quantile=\"0.5\"}"),
            p99_seconds: self.value("usersync_lag_recent_seconds{quantile=\"0.99\"}"),
            within_target_ratio: self.value("usersync_lag_recent_within_target_ratio"),
            metrics_addr: self.addr.to_string(),
        }
    }
}

/// The largest `/metrics` response read: a replicator's is a few KiB; whatever else answers
/// there must not make status hold gigabytes.
const METRICS_MAX_BYTES: u64 = 1 << 20;

/// The running replicator's `/metrics`; `None` when nothing answers there (or something
/// that is not one: no 200, over [`METRICS_MAX_BYTES`], not UTF-8).
async fn replicator_metrics(addr: SocketAddr) -> Option<ReplicatorMetrics> {
    let body = tokio::time::timeout(METRICS_TIMEOUT, http_get_metrics(addr))
        .await
        .ok()?
        .ok()?;
    Some(ReplicatorMetrics { addr, body })
}

async fn http_get_metrics(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    (&mut stream)
        .take(METRICS_MAX_BYTES + 1)
        .read_to_end(&mut response)
        .await?;
    if response.len() as u64 > METRICS_MAX_BYTES {
        return Err(std::io::Error::other("/metrics answered too much"));
    }
    let mut response = String::from_utf8(response).map_err(std::io::Error::other)?;
    let Some(body_at) = response.find("\r\n\r\n") else {
        return Err(std::io::Error::other("/metrics answered no HTTP response"));
    };
    if !(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")) {
        return Err(std::io::Error::other("/metrics did not answer 200"));
    }
    Ok(response.split_off(body_at + 4))
}

/// Whether `"ContactChannel"`, next to the users table, has `REPLICA IDENTITY FULL`; `None`
/// when there is no such table. Asked whatever `--profile` says: status is often run without
/// it, and only matters when the target holds Stack Auth users with unknown channels.
async fn contact_channel_replica_identity_full(
    source: &Client,
    config: &Config,
) -> Result<Option<bool>, Error> {
    let row = source
        .query_opt(
            "SELECT c.relreplident = 'f' FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[
                &config.table.schema,
                &crate::map::stack_auth::CONTACT_CHANNEL_TABLE,
            ],
        )
        .await
        .map_err(crate::source::SourceError::sql(
            "reading the replica identity of \"ContactChannel\"",
        ))?;
    Ok(row.map(|row| row.get(0)))
}

/// The target's tables, users and checkpoint; a missing table or an unusable shape is a
/// problem to report, not an error.
async fn read_target(
    target: &Client,
    config: &Config,
    problems: &mut Vec<Problem>,
) -> Result<(TargetStatus, Option<apply::Checkpoint>), Error> {
    let tables = apply::target_tables(target).await?;
    let mut status = TargetStatus {
        url: config.target.redacted(),
        tables_present: tables.users_sync && tables.state,
        users_live: None,
        users_soft_deleted: None,
        slot_lock_holders: apply::slot_lock::holders(target, &config.checkpoint_key()).await?,
        unfinished: None,
        primary_email_channels_unknown: None,
    };
    if !status.tables_present {
        problems.push(match config.route_name() {
            // A new route's target: run prepares it when the route joins.
            Some(route) => Problem {
                verdict: Verdict::Lagging,
                message: format!(
                    "route {route}'s target has no neon_auth.users_sync or usersync.state yet: \
                     usersync run prepares it when the route joins, then copies it online \
                     (start run if none is running)"
                ),
            },
            None => Problem {
                verdict: Verdict::Broken,
                message:
                    "the target has no neon_auth.users_sync or usersync.state: run usersync setup"
                        .into(),
            },
        });
    }
    if tables.users_sync {
        match apply::check_shape(target).await {
            Ok(_) => {}
            Err(ApplyError::Shape(message)) => problems.push(Problem {
                verdict: Verdict::Broken,
                message,
            }),
            Err(error) => return Err(error.into()),
        }
        let row = target
            .query_one(
                "SELECT count(*) FILTER (WHERE deleted_at IS NULL),
                        count(*) FILTER (WHERE deleted_at IS NOT NULL)
                   FROM neon_auth.users_sync",
                &[],
            )
            .await
            .map_err(ApplyError::sql("counting the users"))?;
        status.users_live = Some(row.get(0));
        status.users_soft_deleted = Some(row.get(1));
        if tables.primary_email_channel {
            status.primary_email_channels_unknown =
                Some(apply::count_unknown_primary_email_channels(target).await?);
        }
    }
    let checkpoint = if tables.state {
        let key = config.checkpoint_key();
        status.unfinished = apply::setup_progress::read(target, &key)
            .await?
            .map(|progress| progress.mode.as_str());
        apply::read_checkpoint(target, &key).await?
    } else {
        None
    };
    Ok((status, checkpoint))
}

#[cfg(test)]
mod attack_tests {
    //! Whatever answers on `--metrics-addr` (the attacker-seat review's cases).

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Reads the GET, so that closing the socket after answering does not reset it.
    async fn read_request(stream: &mut TcpStream) {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            request.push(byte[0]);
        }
    }

    /// A hostile process on --metrics-addr must not make status hold as much as loopback
    /// carries in a second (gigabytes); a real /metrics body is a few KiB.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attack_a_huge_metrics_body_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        const BODY: usize = 64 << 20;
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await;
            stream
                .write_all(b"HTTP/1.0 200 OK\r\n\r\nusersync_ready 1\n")
                .await
                .unwrap();
            let chunk = vec![b'#'; 1 << 20];
            for _ in 0..BODY >> 20 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let read = replicator_metrics(addr).await.map(|m| m.body.len());
        assert!(
            read.is_none_or(|len| len <= 1 << 20),
            "status kept a /metrics body of {read:?} bytes in memory"
        );
    }

    /// Naming the slot is not enough to be believed: another usersync for another source
    /// with the same (default) slot name, or a process squatting the port, must also name
    /// this source's system identifier.
    #[tokio::test]
    async fn attack_any_process_on_the_metrics_port_sets_the_lag() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await;
            stream
                .write_all(
                    b"HTTP/1.0 200 OK\r\n\r\n\
                      usersync_slot_info{slot=\"usersync\"} 1\n\
                      usersync_standby 0\n\
                      usersync_ready 1\n\
                      usersync_lag_current_seconds 0\n",
                )
                .await
                .unwrap();
        });
        let metrics = replicator_metrics(addr).await.expect("answered");
        let believed = metrics.is_active_for("usersync", "7312345678901234567")
            && metrics.current_lag(None).is_some();
        assert!(
            !believed,
            "status took lag {:?} from an unauthenticated process at {addr}",
            metrics.current_lag(None)
        );
    }
}
