//! `usersync replay`: apply everything pending in the slot up to the source's current
//! position, then exit (batch or cron mode). `--dry-run` prints the pending changes as JSON
//! lines without applying them or advancing the slot; `--until-lsn` stops at a position.

use std::sync::Arc;

use tokio::sync::watch;

use super::connect;
use super::run::wait_for_signal;
use crate::config::Config;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::replicator;
use crate::source::SourceError;

pub async fn replay(config: &Config, until: Option<Lsn>, dry_run: bool) -> Result<(), Error> {
    let until = match until {
        Some(until) => until,
        None => current_end(config).await?,
    };
    tracing::info!(until = %until, dry_run, "replaying pending changes");
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop.send(true);
    });
    let metrics = Arc::new(Metrics::new(config.lag_target));
    replicator::replay(config, Arc::clone(&metrics), shutdown, until, dry_run).await?;
    if !dry_run {
        eprintln!(
            "replayed {} transactions in {} target transactions, up to {until}",
            metrics.transactions(),
            metrics.batches()
        );
    }
    Ok(())
}

/// Where "everything pending" ends. A marker message is exact: every transaction that
/// committed before it precedes it in the slot. Without the right to write one, the current
/// WAL position serves.
async fn current_end(config: &Config) -> Result<Lsn, Error> {
    let source = connect("source", &config.source).await?;
    let marker = source
        .query_one(
            "SELECT pg_logical_emit_message(true, $1::text, ''::text)::text",
            &[&format!("usersync_replay:{}", config.slot)],
        )
        .await;
    let text: String = match marker {
        Ok(row) => row.get(0),
        Err(_) => source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(SourceError::sql("reading the current WAL position"))?
            .get(0),
    };
    text.parse().map_err(|_| {
        SourceError::Definite(format!("the source reported an invalid LSN {text:?}")).into()
    })
}
