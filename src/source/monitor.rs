//! A companion task on an ordinary SQL connection to the source, beside each streaming
//! session: it writes heartbeats and reads the slot's WAL figures.
//!
//! A heartbeat is a transactional logical message (`pg_logical_emit_message`) whose prefix
//! names the slot. It travels through the slot like any transaction, so its arrival times
//! the whole pipeline even when no user changes (idle is then measured as near-zero lag,
//! not as "time since the last change"), and its commit gives the replicator a position to
//! confirm, so the slot advances on an idle database. Without the privilege to emit
//! messages usersync warns once and falls back to keepalive-based estimates.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

use crate::conn::{self, PgUrl};
use crate::metrics::Metrics;

/// How often the slot's figures are read.
const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Pause before reconnecting after the monitor's connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// The prefix of this slot's heartbeat messages; other slots' heartbeats are ignored.
pub fn heartbeat_prefix(slot: &str) -> String {
    format!("usersync_heartbeat:{slot}")
}

/// Runs until the task is aborted (when its streaming session ends).
pub async fn run_monitor(
    url: PgUrl,
    slot: String,
    heartbeat_interval: Option<Duration>,
    metrics: Arc<Metrics>,
) {
    let prefix = heartbeat_prefix(&slot);
    let mut heartbeats_allowed = true;
    loop {
        match conn::sql::connect(&url, crate::replicator::APPLICATION_NAME).await {
            Ok(client) => {
                let error = monitor_with(
                    &client,
                    &slot,
                    &prefix,
                    heartbeat_interval,
                    &mut heartbeats_allowed,
                    &metrics,
                )
                .await;
                tracing::debug!(error = %error, "source monitor connection failed");
            }
            Err(error) => tracing::debug!(error = %error, "source monitor cannot connect"),
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

async fn monitor_with(
    client: &Client,
    slot: &str,
    prefix: &str,
    heartbeat_interval: Option<Duration>,
    heartbeats_allowed: &mut bool,
    metrics: &Metrics,
) -> tokio_postgres::Error {
    let tick = heartbeat_interval
        .unwrap_or(SLOT_POLL_INTERVAL)
        .min(SLOT_POLL_INTERVAL);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_poll: Option<std::time::Instant> = None;
    loop {
        ticker.tick().await;
        if heartbeat_interval.is_some() && *heartbeats_allowed {
            if let Err(error) = emit_heartbeat(client, prefix).await {
                if error.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                    let function = emit_message_signature(client).await;
                    tracing::warn!(
                        "heartbeats disabled: the source role may not call pg_logical_emit_message; \
                         lag while idle is estimated from keepalives. To enable them: GRANT EXECUTE \
                         ON FUNCTION {function} TO <role>"
                    );
                    *heartbeats_allowed = false;
                } else {
                    return error;
                }
            }
        }
        if last_poll.is_none_or(|at| at.elapsed() >= SLOT_POLL_INTERVAL) {
            last_poll = Some(std::time::Instant::now());
            if let Err(error) = poll_slot(client, slot, metrics).await {
                return error;
            }
        }
    }
}

/// The text form of `pg_logical_emit_message` that heartbeats call, as a GRANT names it: its
/// signature differs by version (PostgreSQL 17 added a fourth argument, `flush`).
pub async fn emit_message_signature(client: &Client) -> String {
    const SIGNATURE: &str = "SELECT oid::regprocedure::text FROM pg_proc
        WHERE proname = 'pg_logical_emit_message' AND proargtypes[2] = 'text'::regtype";
    match client.query_opt(SIGNATURE, &[]).await {
        Ok(Some(row)) => row.get(0),
        _ => "pg_logical_emit_message(boolean, text, text) (on PostgreSQL 17 and later: \
              pg_logical_emit_message(boolean, text, text, boolean))"
            .to_owned(),
    }
}

async fn emit_heartbeat(client: &Client, prefix: &str) -> Result<(), tokio_postgres::Error> {
    let sent = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
        .to_string();
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
            &[&prefix, &sent],
        )
        .await
        .map(drop)
}

async fn poll_slot(
    client: &Client,
    slot: &str,
    metrics: &Metrics,
) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT wal_status, safe_wal_size,
                    COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(row) = row {
        let wal_status: Option<String> = row.get(0);
        metrics.set_slot(row.get(2), row.get(1), wal_status.as_deref());
    }
    Ok(())
}
