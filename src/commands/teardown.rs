//! `usersync teardown --yes`: drops the slot and publication, and the slot's checkpoint on
//! the target. The users already on the target stay. So does the record of which Stack Auth
//! contact channel each user's email came from (`usersync.primary_email_channel`), which
//! describes those rows; but once no slot feeds the target, nothing keeps it up to date, so
//! teardown marks every channel unknown: a later setup's copy records them again, and a
//! change that would need one refuses rather than trust a stale record.
//!
//! Dropping a slot throws away the WAL it holds: changes usersync has not confirmed are then
//! never delivered. So teardown says how much is pending before it drops anything, and
//! without `--yes` it only says that.

use tokio_postgres::Client;

use super::connect;
use super::units::bytes;
use crate::apply;
use crate::config::Config;
use crate::error::Error;
use crate::source::catalog::{self, SlotInfo};
use crate::source::SourceError;

pub async fn teardown(config: &Config) -> Result<(), Error> {
    // Every target first, before anything is dropped: a route's target must not drop the
    // slot every route needs, and with --routes, a route whose target is out of reach would
    // keep a checkpoint of a slot that is gone.
    let mut targets = Vec::new();
    for route in config.route_configs() {
        let target = connect("target", &route.target).await?;
        if config.routes.is_none() {
            apply::refuse_route_target(&target, &config.slot).await?;
        }
        targets.push((route, target));
    }
    let source = connect("source", &config.source).await?;
    match catalog::slot_info(&source, &config.slot).await? {
        Some(slot) if slot.active => {
            return Err(SourceError::Definite(format!(
                "replication slot {} is in use by source backend pid {}: stop the usersync \
                 run that uses it first",
                config.slot,
                slot.active_pid.unwrap_or_default()
            ))
            .into())
        }
        Some(slot) => {
            warn_about_pending_changes(&source, &config.slot, &slot).await?;
            catalog::drop_slot(&source, &config.slot).await?;
            println!("replication slot {} dropped", config.slot);
        }
        None => println!("replication slot {} not found", config.slot),
    }
    match catalog::publication_owner(&source, &config.publication).await? {
        Some((_, true)) => {
            catalog::drop_publication(&source, &config.publication).await?;
            println!("publication {} dropped", config.publication);
        }
        // The least-privilege setup: an administrator made the publication, and only its
        // owner may drop it. The slot, which holds WAL, is gone; the publication costs nothing.
        Some((owner, false)) => println!(
            "publication {publication} left in place: it belongs to role {owner}, which \
             usersync's role is not; drop it as {owner} once nothing uses it: \
             DROP PUBLICATION {publication};",
            publication = postgres_protocol::escape::escape_identifier(&config.publication),
        ),
        None => println!("publication {} not found", config.publication),
    }
    for (route, target) in targets {
        forget_slot(&route, &target).await?;
    }
    Ok(())
}

/// Removes the slot's checkpoint and setup record from one target (a route's, with
/// `--routes`), and marks its channels unknown if nothing feeds it any more.
async fn forget_slot(config: &Config, target: &Client) -> Result<(), Error> {
    let key = config.checkpoint_key();
    if apply::target_tables(target).await?.state {
        // One transaction: a target left with no checkpoint but channels still recorded
        // would trust records nothing keeps up to date (an error ends the process, and the
        // connection with it, which rolls back).
        target
            .batch_execute("BEGIN")
            .await
            .map_err(apply::ApplyError::sql(
                "starting the teardown's target transaction",
            ))?;
        apply::delete_checkpoint(target, &key).await?;
        apply::setup_progress::delete_if_present(target, &key).await?;
        let unknown = forget_channels_if_unfed(target).await?;
        target
            .batch_execute("COMMIT")
            .await
            .map_err(apply::ApplyError::sql(
                "committing the teardown's target transaction",
            ))?;
        match config.route_name() {
            None => println!("checkpoint of slot {} removed from the target", config.slot),
            Some(route) => println!(
                "route {route}: checkpoint of slot {} removed from its target",
                config.slot
            ),
        }
        if unknown > 0 {
            println!(
                "usersync.primary_email_channel: {unknown} users' primary email channels marked \
                 unknown (no slot feeds this target any more; a setup's copy records them again)"
            );
        }
    }
    Ok(())
}

/// Marks every recorded channel unknown when the target holds no checkpoint any more (see
/// the module docs); returns how many.
async fn forget_channels_if_unfed(target: &Client) -> Result<u64, Error> {
    let row = target
        .query_one(
            "SELECT to_regclass('usersync.primary_email_channel') IS NOT NULL,
                    NOT EXISTS (SELECT FROM usersync.state)",
            &[],
        )
        .await
        .map_err(apply::ApplyError::sql(
            "looking for usersync.primary_email_channel",
        ))?;
    if !(row.get::<_, bool>(0) && row.get::<_, bool>(1)) {
        return Ok(0);
    }
    Ok(target
        .execute(
            "UPDATE usersync.primary_email_channel SET channel_id = NULL
              WHERE channel_id IS NOT NULL",
            &[],
        )
        .await
        .map_err(apply::ApplyError::sql(
            "marking the primary email channels unknown",
        ))?)
}

/// Without `--yes`: shows what dropping the slot would lose, before `main` refuses. Best
/// effort: the refusal stands even when the source cannot be reached.
pub async fn preview(config: &Config) {
    let result = async {
        let source = connect("source", &config.source).await?;
        if let Some(slot) = catalog::slot_info(&source, &config.slot).await? {
            warn_about_pending_changes(&source, &config.slot, &slot).await?;
        }
        Ok::<_, Error>(())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(error = %crate::error::report(&error), "cannot look at the slot's pending changes");
    }
}

/// Prints a warning on stderr when the slot holds WAL usersync has not confirmed.
async fn warn_about_pending_changes(
    source: &Client,
    name: &str,
    slot: &SlotInfo,
) -> Result<(), Error> {
    let current = catalog::current_wal_lsn(source).await?;
    let Some(pending) = slot.pending_bytes(current).filter(|&pending| pending > 0) else {
        return Ok(());
    };
    let amount = if pending < 1024 {
        format!("{pending} bytes")
    } else {
        format!("{pending} bytes ({})", bytes(pending))
    };
    eprintln!(
        "warning: replication slot {name} still holds {amount} of WAL that usersync has not \
         confirmed, from {} to {current}; any user changes in it are not on the target yet and \
         are lost when the slot is dropped (let usersync run catch up first to keep them)",
        slot.confirmed_flush_lsn.unwrap_or_default(),
    );
    Ok(())
}
