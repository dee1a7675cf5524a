//! What `usersync status` reports and the verdict drawn from it. Pure: `mod.rs` gathers the
//! facts; here they are judged and printed, as a table for people or as one JSON object for
//! scripts (the key names are a stable interface, documented in docs/commands.md).

use std::fmt::{self, Write as _};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::apply::slot_lock::{self, LockHolder};
use crate::commands::units::{bytes, duration, Rfc3339};
use crate::lsn::Lsn;
use crate::replicator::APPLICATION_NAME;
use crate::source::catalog::describe_invalidation;

/// The overall state; the worst problem decides it. Each has its own exit code, so cron jobs
/// and probes can act on it without parsing the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Healthy,
    /// The lag is over `--lag-target`.
    Lagging,
    /// The slot may soon lose WAL it needs (`wal_status` unreserved, or little safe WAL left).
    SlotAtRisk,
    /// Replication cannot go on without someone fixing something.
    Broken,
}

impl Verdict {
    /// The process exit code: 0 healthy, 3 lagging, 4 slot at risk, 5 broken (1, 2 and 78
    /// keep their meaning for failures, usage and configuration errors).
    pub const fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Lagging => 3,
            Verdict::SlotAtRisk => 4,
            Verdict::Broken => 5,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Lagging => "lagging",
            Verdict::SlotAtRisk => "slot at risk",
            Verdict::Broken => "broken",
        }
    }
}

/// One thing wrong, with the verdict it calls for and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub verdict: Verdict,
    pub message: String,
}

/// How the lag figure was arrived at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LagEstimate {
    /// The slot's consumer has confirmed all WAL: no lag.
    CaughtUp,
    /// The active usersync's own measurement, read from its `/metrics`: the age of the
    /// oldest commit it has not applied yet, or, caught up, the last heartbeat's lag from
    /// source commit to visible on the target.
    Replicator,
    /// A usersync is streaming but its `/metrics` did not answer: the source server's
    /// `pg_stat_replication.flush_lag` for it (0 when the server has no measurement because
    /// everything sent was confirmed). It runs to the *durable* confirmation, so it is a
    /// little above the replicator's own figure.
    SourceServer,
    /// Nobody is streaming and WAL is waiting: time since the last commit the target holds,
    /// an upper bound (the waiting WAL may hold no user changes at all).
    SinceLastApplied,
    /// Nobody is streaming, WAL is waiting, and the target holds no commit yet; or no slot.
    Unknown,
}

/// The report, as printed. Every key is always present; unknown values are `null`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The route this report is of, in a fan-out (its name is in the JSON around it).
    #[serde(skip)]
    pub route: Option<String>,
    pub verdict: Verdict,
    pub exit_code: u8,
    pub problems: Vec<Problem>,
    pub checked_at: Rfc3339,
    pub source: SourceStatus,
    pub slot: SlotStatus,
    pub checkpoint: Option<CheckpointStatus>,
    pub target: TargetStatus,
    pub lag: LagStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    /// The URL with the password redacted.
    pub url: String,
    pub system_identifier: String,
    pub current_wal_lsn: LsnText,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub plugin: Option<String>,
    /// The database the slot decodes (a slot belongs to one database of the server).
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<LsnText>,
    pub restart_lsn: Option<LsnText>,
    pub wal_status: Option<String>,
    /// Why the server invalidated the slot (PostgreSQL 17+); `null` while it is valid.
    pub invalidation_reason: Option<String>,
    /// `null` when `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_size_bytes: Option<i64>,
    /// WAL kept for the slot: current position − `restart_lsn`.
    pub retained_wal_bytes: Option<u64>,
    /// WAL not yet confirmed: current position − `confirmed_flush_lsn`.
    pub pending_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointStatus {
    pub system_identifier: String,
    pub commit_lsn: LsnText,
    pub end_lsn: LsnText,
    pub commit_time: Option<Rfc3339>,
    pub written_at: Rfc3339,
    /// The slot is never confirmed past `end_lsn` (false for a checkpoint of an older
    /// usersync that `run` has not taken over yet).
    pub slot_bounded: bool,
    /// A route's online copy is under way (added while running, or `resync --online`): its
    /// target lacks users from before it joined until `run` is done with it.
    pub copying: bool,
    /// That copy is `resync --online`'s: it also soft-deletes the users the source no
    /// longer has, and the route may resume at the slot's position (behind it is no fault).
    pub copy_reconciles: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    /// The URL with the password redacted.
    pub url: String,
    /// `neon_auth.users_sync` and `usersync.state` both exist.
    pub tables_present: bool,
    pub users_live: Option<i64>,
    pub users_soft_deleted: Option<i64>,
    /// The sessions holding the slot's lock on the target (the active usersync, normally).
    pub slot_lock_holders: Vec<LockHolder>,
    /// `"setup"` or `"resync"` while the target records one of them under way for the slot
    /// (`usersync.setup_progress`): interrupted, if no checkpoint goes with it.
    pub unfinished: Option<&'static str>,
    /// Live users showing an email whose Stack Auth contact channel the target does not know
    /// (`usersync.primary_email_channel`); `None` without that table.
    pub primary_email_channels_unknown: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LagStatus {
    pub seconds: Option<f64>,
    pub target_seconds: f64,
    pub estimate: LagEstimate,
    /// The running replicator's own figures, when its `/metrics` answered.
    pub last_minute: Option<RecentLag>,
}

/// Lag over the last minute as the running replicator measured it (the figures `demo`
/// prints); each is `null` when the minute had no applied transaction.
#[derive(Debug, Clone, Serialize)]
pub struct RecentLag {
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    pub within_target_ratio: Option<f64>,
    pub metrics_addr: String,
}

/// An LSN, printed as PostgreSQL prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsnText(pub Lsn);

impl Serialize for LsnText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// The lag from what is known without decoding the pending WAL.
///
/// `replicator_lag` is the active replicator's own current lag, when its `/metrics` answered;
/// `consumer_flush_lag` is `Some(measurement)` when a process is streaming from the slot.
/// The replicator's figure wins over the server's: the server measures up to the durable
/// confirmation, which usersync sends on its own cadence, so on an idle system it swings
/// with that cadence while the lag a user sees stays at a few milliseconds.
pub fn estimate_lag(
    pending_bytes: Option<u64>,
    replicator_lag: Option<Duration>,
    consumer_flush_lag: Option<Option<Duration>>,
    last_applied_commit: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (Option<Duration>, LagEstimate) {
    match (pending_bytes, consumer_flush_lag, last_applied_commit) {
        (None, _, _) => (None, LagEstimate::Unknown),
        (Some(0), _, _) => (Some(Duration::ZERO), LagEstimate::CaughtUp),
        (Some(_), Some(_), _) if replicator_lag.is_some() => {
            (replicator_lag, LagEstimate::Replicator)
        }
        (Some(_), Some(measured), _) => (
            Some(measured.unwrap_or(Duration::ZERO)),
            LagEstimate::SourceServer,
        ),
        (Some(_), None, Some(commit)) => (
            Some((now - commit).to_std().unwrap_or(Duration::ZERO)),
            LagEstimate::SinceLastApplied,
        ),
        (Some(_), None, None) => (None, LagEstimate::Unknown),
    }
}

/// Thresholds the facts are judged against.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub lag_target: Duration,
    pub min_safe_wal_size: u64,
}

impl StatusReport {
    /// Finds the slot, lag and checkpoint problems (the caller adds those it found while
    /// gathering, such as a target table of the wrong shape) and sets the verdict.
    pub fn judge(&mut self, thresholds: Thresholds) {
        let slot = &self.slot;
        let mut found = Vec::new();
        let mut problem = |verdict, message: String| found.push(Problem { verdict, message });
        let unfinished = match (&self.checkpoint, self.target.unfinished) {
            (None, Some(mode)) => Some(mode),
            _ => None,
        };
        if unfinished == Some("resync") {
            // setup would finish it without soft-deleting the users the source no longer has.
            problem(
                Verdict::Broken,
                format!(
                    "an earlier usersync resync of slot {} did not finish (the target holds no \
                     checkpoint): run usersync resync again",
                    slot.name
                ),
            );
        } else if unfinished.is_some() && slot.exists {
            problem(
                Verdict::Broken,
                format!(
                    "an earlier usersync setup of slot {} did not finish its initial copy (the \
                     target holds no checkpoint): run usersync setup again",
                    slot.name
                ),
            );
        }
        if !slot.exists && unfinished != Some("resync") {
            problem(
                Verdict::Broken,
                match &self.checkpoint {
                    // The target was fed from it: setup alone would miss the deletes of the gap.
                    Some(checkpoint) => format!(
                        "replication slot {} does not exist on the source, but the target holds \
                         its checkpoint (up to {}): changes made since then are not on the \
                         target; run usersync resync (it copies the table again and \
                         soft-deletes the users the source no longer has)",
                        slot.name, checkpoint.end_lsn.0
                    ),
                    None => format!(
                        "replication slot {} does not exist on the source: run usersync setup",
                        slot.name
                    ),
                },
            );
        } else {
            if slot.plugin.as_deref() != Some("pgoutput") {
                problem(
                    Verdict::Broken,
                    format!(
                        "replication slot {} uses {}, not pgoutput; use another --slot",
                        slot.name,
                        slot.plugin.as_deref().unwrap_or("no plugin (physical)")
                    ),
                );
            }
            let invalidated =
                slot.wal_status.as_deref() == Some("lost") || slot.invalidation_reason.is_some();
            match slot.wal_status.as_deref() {
                _ if invalidated => problem(
                    Verdict::Broken,
                    format!(
                        "replication slot {} {}: changes are missing from the target; run \
                         usersync resync (it creates the slot again, copies the table and \
                         soft-deletes the users the source no longer has)",
                        slot.name,
                        describe_invalidation(slot.invalidation_reason.as_deref())
                    ),
                ),
                Some("unreserved") => problem(
                    Verdict::SlotAtRisk,
                    format!(
                        "replication slot {} holds more WAL than max_slot_wal_keep_size allows \
                         (wal_status unreserved): it is lost at the next checkpoint unless \
                         usersync catches up",
                        slot.name
                    ),
                ),
                _ => {}
            }
            if let Some(safe) = slot.safe_wal_size_bytes {
                if safe < i64::try_from(thresholds.min_safe_wal_size).unwrap_or(i64::MAX) {
                    problem(
                        Verdict::SlotAtRisk,
                        format!(
                            "replication slot {} can fall only {} further behind before it risks \
                             losing WAL (safe_wal_size, below --min-safe-wal-size {}): make sure \
                             usersync runs and keeps up, or raise max_slot_wal_keep_size",
                            slot.name,
                            bytes(safe.max(0) as u64),
                            bytes(thresholds.min_safe_wal_size)
                        ),
                    );
                }
            }
        }
        if let Some(checkpoint) = &self.checkpoint {
            if checkpoint.system_identifier != self.source.system_identifier {
                problem(
                    Verdict::Broken,
                    format!(
                        "the target's checkpoint for slot {} comes from source system {}, but \
                         this source is system {}: point usersync at the right source, or use \
                         another slot",
                        slot.name, checkpoint.system_identifier, self.source.system_identifier
                    ),
                );
            }
            let confirmed = slot.confirmed_flush_lsn.as_ref().map(|lsn| lsn.0);
            if slot.exists
                && checkpoint.slot_bounded
                && checkpoint.system_identifier == self.source.system_identifier
                && confirmed.is_some_and(|confirmed| confirmed > checkpoint.end_lsn.0)
            {
                match &self.route {
                    Some(route) if checkpoint.copying && checkpoint.copy_reconciles => problem(
                        Verdict::Lagging,
                        format!(
                            "route {route} is behind the slot and being resynced online: \
                             usersync run lets it in at the slot's position, and its copy \
                             rebuilds what it missed (start run if none is running)"
                        ),
                    ),
                    Some(route) => problem(
                        Verdict::Broken,
                        format!(
                            "replication slot {} is confirmed up to {}, past the checkpoint of \
                             route {route} ({}): the route was evicted, or its target restored \
                             to an earlier point; run usersync resync --routes <file> --online \
                             {route}, which copies it again while run streams",
                            slot.name,
                            confirmed.unwrap_or_default(),
                            checkpoint.end_lsn.0
                        ),
                    ),
                    None => problem(
                        Verdict::Broken,
                        format!(
                        "replication slot {} is confirmed up to {}, past the target's checkpoint \
                         ({}): the target may have lost changes, which the slot no longer \
                         holds; if it was restored to an earlier point, run usersync resync; \
                         if it is a copy (a branch) of the target this slot feeds, never use \
                         this slot for it: usersync resync --slot <a new name>",
                        slot.name,
                        confirmed.unwrap_or_default(),
                        checkpoint.end_lsn.0
                    ),
                    ),
                }
            }
        }
        // Anyone may take the slot's lock: a holder that is not a usersync, while nobody
        // streams, keeps every usersync run standing by.
        let foreign_holders: Vec<LockHolder> = self
            .target
            .slot_lock_holders
            .iter()
            .filter(|holder| holder.application_name.as_deref() != Some(APPLICATION_NAME))
            .cloned()
            .collect();
        if slot.exists && !slot.active && !foreign_holders.is_empty() {
            problem(
                Verdict::Broken,
                format!(
                    "nobody streams from slot {} and its lock on the target is held by {}, \
                     which is not a usersync: every usersync run for the slot stands by until \
                     that session lets go. Find out who runs it; if it has no business there, \
                     end it as an administrator (SELECT pg_terminate_backend(pid)) and take \
                     the right to connect from its role",
                    slot.name,
                    slot_lock::describe(&foreign_holders)
                ),
            );
        }
        let consumer = match slot.active_pid {
            Some(pid) if slot.active => format!("usersync (pid {pid}) is streaming"),
            _ => "no usersync is streaming from the slot".to_owned(),
        };
        let pending = slot.pending_bytes.unwrap_or(0);
        match self.lag.seconds {
            Some(lag) if lag > thresholds.lag_target.as_secs_f64() => problem(
                Verdict::Lagging,
                format!(
                    "lag {} is over the target {}; {consumer}, {} of WAL wait",
                    duration(Duration::from_secs_f64(lag)),
                    duration(thresholds.lag_target),
                    bytes(pending)
                ),
            ),
            None if slot.exists && pending > 0 && unfinished.is_none() => problem(
                Verdict::Lagging,
                format!(
                    "{consumer} and {} of WAL wait; the lag is unknown (the target holds no \
                     checkpoint yet): start usersync run",
                    bytes(pending)
                ),
            ),
            _ => {}
        }
        self.problems.extend(found);
        self.problems
            .sort_by_key(|problem| std::cmp::Reverse(problem.verdict));
        self.verdict = self
            .problems
            .iter()
            .map(|problem| problem.verdict)
            .max()
            .unwrap_or(Verdict::Healthy);
        self.exit_code = self.verdict.exit_code();
    }

    /// The table people read.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let mut row = |key: &str, value: String| {
            let _ = writeln!(out, "{key:<20}{value}");
        };
        let slot = &self.slot;
        row(
            "source",
            format!(
                "{} (system {})",
                self.source.url, self.source.system_identifier
            ),
        );
        row("current WAL", self.source.current_wal_lsn.0.to_string());
        if slot.exists {
            let activity = match slot.active_pid {
                Some(pid) if slot.active => format!("active (pid {pid})"),
                _ => "inactive".to_owned(),
            };
            row(
                "slot",
                format!(
                    "{}: {activity}, {}, wal_status {}",
                    slot.name,
                    slot.plugin.as_deref().unwrap_or("physical"),
                    slot.wal_status.as_deref().unwrap_or("-")
                ),
            );
            row(
                "  confirmed flush",
                optional(slot.confirmed_flush_lsn.map(|l| l.0)),
            );
            row("  restart", optional(slot.restart_lsn.map(|l| l.0)));
            row(
                "  safe WAL size",
                slot.safe_wal_size_bytes
                    .map_or_else(|| "unlimited".to_owned(), |safe| bytes(safe.max(0) as u64)),
            );
            row(
                "  WAL retained",
                optional(slot.retained_wal_bytes.map(bytes)),
            );
            row("  pending", optional(slot.pending_bytes.map(bytes)));
        } else {
            row("slot", format!("{}: does not exist", slot.name));
        }
        match &self.checkpoint {
            Some(checkpoint) => row(
                "checkpoint",
                format!(
                    "{} (end {}), committed {}, written {}",
                    checkpoint.commit_lsn.0,
                    checkpoint.end_lsn.0,
                    optional(checkpoint.commit_time),
                    checkpoint.written_at
                ),
            ),
            None => row("checkpoint", "none".to_owned()),
        }
        row("target", self.target.url.clone());
        row(
            "  users",
            match (self.target.users_live, self.target.users_soft_deleted) {
                (Some(live), Some(deleted)) => format!("{live} live, {deleted} soft-deleted"),
                _ => "- (no neon_auth.users_sync)".to_owned(),
            },
        );
        if let Some(mode) = self.target.unfinished {
            row(
                "  unfinished",
                format!("a usersync {mode} of the slot (usersync.setup_progress)"),
            );
        }
        if let Some(unknown) = self
            .target
            .primary_email_channels_unknown
            .filter(|&n| n > 0)
        {
            row(
                "  email channels",
                format!(
                    "{unknown} users' primary email channel unknown (copied or written by an \
                     older usersync, or left by a teardown): keep REPLICA IDENTITY FULL on \
                     \"ContactChannel\" if it is still set, until usersync setup or resync \
                     records them"
                ),
            );
        }
        row(
            "  slot lock",
            if self.target.slot_lock_holders.is_empty() {
                "free (no usersync run holds it)".to_owned()
            } else {
                format!(
                    "held by {}",
                    slot_lock::describe(&self.target.slot_lock_holders)
                )
            },
        );
        let target = duration(Duration::from_secs_f64(self.lag.target_seconds));
        row(
            "lag",
            match self.lag.seconds {
                Some(lag) => format!(
                    "{} (target {target}; {})",
                    duration(Duration::from_secs_f64(lag)),
                    match self.lag.estimate {
                        LagEstimate::CaughtUp => "caught up",
                        LagEstimate::Replicator => "measured by usersync",
                        LagEstimate::SourceServer => "measured by the source server",
                        LagEstimate::SinceLastApplied => "since the last applied commit",
                        LagEstimate::Unknown => "unknown",
                    }
                ),
                None => format!("unknown (target {target})"),
            },
        );
        row(
            "lag, last minute",
            match &self.lag.last_minute {
                Some(RecentLag {
                    p50_seconds: Some(p50),
                    p99_seconds: Some(p99),
                    within_target_ratio: Some(within),
                    ..
                }) => format!(
                    "p50 {}, p99 {}, {:.1}% within target",
                    duration(Duration::from_secs_f64(*p50)),
                    duration(Duration::from_secs_f64(*p99)),
                    within * 100.0
                ),
                Some(recent) => format!(
                    "no transaction applied in the last minute (usersync at {})",
                    recent.metrics_addr
                ),
                None => "- (no usersync /metrics answered; see --metrics-addr)".to_owned(),
            },
        );
        for problem in &self.problems {
            row(
                "problem",
                format!("{}: {}", problem.verdict.as_str(), problem.message),
            );
        }
        row("verdict", self.verdict.as_str().to_owned());
        out
    }
}

fn optional<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        let now = Utc::now();
        StatusReport {
            route: None,
            verdict: Verdict::Healthy,
            exit_code: 0,
            problems: Vec::new(),
            checked_at: Rfc3339(now),
            source: SourceStatus {
                url: "postgresql://u:***@h:5432/db?sslmode=verify-full".into(),
                system_identifier: "7".into(),
                current_wal_lsn: LsnText(Lsn(0x200)),
            },
            slot: SlotStatus {
                name: "usersync".into(),
                exists: true,
                plugin: Some("pgoutput".into()),
                database: Some("auth".into()),
                active: true,
                active_pid: Some(42),
                confirmed_flush_lsn: Some(LsnText(Lsn(0x200))),
                restart_lsn: Some(LsnText(Lsn(0x100))),
                wal_status: Some("reserved".into()),
                invalidation_reason: None,
                safe_wal_size_bytes: None,
                retained_wal_bytes: Some(0x100),
                pending_bytes: Some(0),
            },
            checkpoint: Some(CheckpointStatus {
                system_identifier: "7".into(),
                commit_lsn: LsnText(Lsn(0x1F0)),
                end_lsn: LsnText(Lsn(0x200)),
                commit_time: Some(Rfc3339(now)),
                written_at: Rfc3339(now),
                slot_bounded: true,
                copying: false,
                copy_reconciles: false,
            }),
            target: TargetStatus {
                url: "postgresql://u:***@t:5432/db?sslmode=verify-full".into(),
                tables_present: true,
                users_live: Some(3),
                users_soft_deleted: Some(1),
                slot_lock_holders: Vec::new(),
                unfinished: None,
                primary_email_channels_unknown: Some(0),
            },
            lag: LagStatus {
                seconds: Some(0.0),
                target_seconds: 1.0,
                estimate: LagEstimate::CaughtUp,
                last_minute: None,
            },
        }
    }

    const THRESHOLDS: Thresholds = Thresholds {
        lag_target: Duration::from_secs(1),
        min_safe_wal_size: 1 << 30,
    };

    fn judged(change: impl FnOnce(&mut StatusReport)) -> StatusReport {
        let mut report = report();
        change(&mut report);
        report.judge(THRESHOLDS);
        report
    }

    #[test]
    fn the_worst_problem_decides() {
        assert_eq!(judged(|_| {}).verdict, Verdict::Healthy);
        let lagging = judged(|r| r.lag.seconds = Some(2.5));
        assert_eq!((lagging.verdict, lagging.exit_code), (Verdict::Lagging, 3));
        let at_risk = judged(|r| {
            r.lag.seconds = Some(2.5);
            r.slot.safe_wal_size_bytes = Some(1 << 20);
        });
        assert_eq!(at_risk.verdict, Verdict::SlotAtRisk);
        assert_eq!(at_risk.problems.len(), 2);
        assert_eq!(
            judged(|r| r.slot.wal_status = Some("unreserved".into())).verdict,
            Verdict::SlotAtRisk
        );
        assert_eq!(
            judged(|r| r.slot.wal_status = Some("lost".into())).verdict,
            Verdict::Broken
        );
        let foreign = judged(|r| {
            if let Some(checkpoint) = &mut r.checkpoint {
                checkpoint.system_identifier = "8".into();
            }
        });
        assert_eq!((foreign.verdict, foreign.exit_code), (Verdict::Broken, 5));
        assert!(foreign.problems[0].message.contains("source system 8"));
    }

    #[test]
    fn a_missing_slot_is_broken() {
        let report = judged(|r| {
            r.slot.exists = false;
            r.slot.plugin = None;
        });
        assert_eq!(report.verdict, Verdict::Broken);
        assert_eq!(report.problems.len(), 1);
        assert!(report.human().contains("does not exist"));
        // The target holds its checkpoint: only resync brings back the deletes of the gap.
        assert!(report.problems[0].message.contains("run usersync resync"));
        let fresh = judged(|r| {
            r.slot.exists = false;
            r.checkpoint = None;
        });
        assert!(fresh.problems[0].message.contains("run usersync setup"));
        let idle = judged(|r| {
            r.slot.wal_status = Some("lost".into());
            r.slot.invalidation_reason = Some("idle_timeout".into());
        });
        assert_eq!(idle.verdict, Verdict::Broken);
        assert!(
            idle.problems[0]
                .message
                .contains("idle_replication_slot_timeout"),
            "{:?}",
            idle.problems
        );
        let lost = judged(|r| r.slot.wal_status = Some("lost".into()));
        assert!(lost.problems[0].message.contains("run usersync resync"));
    }

    #[test]
    fn an_unfinished_resync_is_left_to_resync() {
        for exists in [true, false] {
            let report = judged(|r| {
                r.slot.exists = exists;
                r.checkpoint = None;
                r.target.unfinished = Some("resync");
            });
            assert_eq!(report.verdict, Verdict::Broken);
            let said = format!("{:?}", report.problems);
            assert!(said.contains("run usersync resync"), "{said}");
            assert!(!said.contains("run usersync setup"), "{said}");
        }
        let setup = judged(|r| {
            r.checkpoint = None;
            r.target.unfinished = Some("setup");
            r.slot.pending_bytes = Some(100);
        });
        assert_eq!(setup.verdict, Verdict::Broken);
        assert_eq!(setup.problems.len(), 1, "{:?}", setup.problems);
        assert!(setup.problems[0]
            .message
            .contains("run usersync setup again"));
        // A record left beside a checkpoint is not an interruption.
        let done = judged(|r| r.target.unfinished = Some("setup"));
        assert_eq!(done.verdict, Verdict::Healthy);
    }

    #[test]
    fn waiting_wal_without_a_consumer_or_checkpoint_is_lagging() {
        let report = judged(|r| {
            r.slot.active = false;
            r.slot.pending_bytes = Some(100);
            r.checkpoint = None;
            r.lag.seconds = None;
        });
        assert_eq!(report.verdict, Verdict::Lagging);
        assert!(report.problems[0]
            .message
            .contains("no usersync is streaming"));
    }

    #[test]
    fn a_slot_lock_held_by_another_program_while_nobody_streams_is_broken() {
        let holder = |application_name: &str| LockHolder {
            pid: Some(4242),
            mode: "ExclusiveLock".into(),
            application_name: Some(application_name.into()),
            usename: Some("mallory".into()),
            client_addr: None,
            backend_start: None,
        };
        let squatted = judged(|r| {
            r.slot.active = false;
            r.target.slot_lock_holders = vec![holder("psql")];
        });
        assert_eq!(squatted.verdict, Verdict::Broken);
        assert!(squatted.problems[0].message.contains("pid 4242"));
        assert!(squatted
            .human()
            .contains("slot lock         held by pid 4242"));
        // A usersync holding it (starting up, or streaming) is no problem.
        let starting = judged(|r| {
            r.slot.active = false;
            r.target.slot_lock_holders = vec![holder("usersync")];
        });
        assert_eq!(starting.verdict, Verdict::Healthy);
        let streaming = judged(|r| r.target.slot_lock_holders = vec![holder("psql")]);
        assert_eq!(streaming.verdict, Verdict::Healthy);
        assert!(judged(|_| {}).human().contains("slot lock         free"));
    }

    #[test]
    fn lag_is_estimated_from_what_is_known() {
        let now = Utc::now();
        let commit = now - chrono::Duration::seconds(90);
        let measured = Some(Duration::from_millis(40));
        let own = Some(Duration::from_millis(3));
        assert_eq!(
            estimate_lag(Some(0), own, Some(measured), Some(commit), now),
            (Some(Duration::ZERO), LagEstimate::CaughtUp)
        );
        // The replicator's own figure wins over the server's, while it streams.
        assert_eq!(
            estimate_lag(Some(10), own, Some(measured), Some(commit), now),
            (own, LagEstimate::Replicator)
        );
        assert_eq!(
            estimate_lag(Some(10), None, Some(measured), Some(commit), now),
            (measured, LagEstimate::SourceServer)
        );
        assert_eq!(
            estimate_lag(Some(10), None, Some(None), Some(commit), now),
            (Some(Duration::ZERO), LagEstimate::SourceServer)
        );
        assert_eq!(
            estimate_lag(Some(10), None, None, Some(commit), now),
            (Some(Duration::from_secs(90)), LagEstimate::SinceLastApplied)
        );
        // Nobody streams: a figure from /metrics (another slot's replicator) is not used.
        assert_eq!(
            estimate_lag(Some(10), own, None, Some(commit), now),
            (Some(Duration::from_secs(90)), LagEstimate::SinceLastApplied)
        );
        assert_eq!(
            estimate_lag(Some(10), None, None, None, now),
            (None, LagEstimate::Unknown)
        );
        assert_eq!(
            estimate_lag(None, own, None, Some(commit), now),
            (None, LagEstimate::Unknown)
        );
    }

    #[test]
    fn json_has_stable_keys_and_typed_values() {
        let json = serde_json::to_value(judged(|_| {})).unwrap();
        assert_eq!(json["verdict"], "healthy");
        assert_eq!(json["slot"]["confirmed_flush_lsn"], "0/200");
        assert_eq!(json["slot"]["pending_bytes"], 0);
        assert!(json["slot"]["safe_wal_size_bytes"].is_null());
        assert_eq!(json["lag"]["estimate"], "caught_up");
        assert!(json["checked_at"].as_str().unwrap().ends_with('Z'));
    }
}
