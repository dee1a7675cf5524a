//! `usersync resync`: for when the slot was lost, invalidated or dropped (`wal_status =
//! lost`, a restored Neon branch). Changes since then are gone from the source's WAL, so the
//! only way back is a new slot and a new copy of the table, reconciled with the target: users
//! present on the source are upserted, live users absent from it are soft-deleted, and the
//! checkpoint moves to the new slot.

use super::initial_copy::{create_slot_and_copy, CopyMode};
use super::setup::{check_slot_fits, prepare, Prepared};
use crate::apply;
use crate::config::Config;
use crate::error::Error;
use crate::source::{catalog, SourceError};

pub async fn resync(config: &Config) -> Result<(), Error> {
    let Prepared {
        source,
        target,
        columns,
    } = prepare(config).await?;
    // A failover slot is recreated as one.
    let failover = catalog::slot_is_failover(&source, &config.slot).await?;
    if let Some(slot) = catalog::slot_info(&source, &config.slot).await? {
        check_slot_fits(config, &slot)?;
        if let (true, Some(pid)) = (slot.active, slot.active_pid) {
            return Err(SourceError::Definite(format!(
                "replication slot {} is in use by source backend pid {pid}: stop usersync run \
                 before resync",
                config.slot
            ))
            .into());
        }
        catalog::drop_slot(&source, &config.slot).await?;
        println!(
            "replication slot {} dropped (wal_status was {})",
            config.slot,
            slot.wal_status.as_deref().unwrap_or("unknown")
        );
    }
    // Without a checkpoint an interrupted resync is recognised and redone by setup or resync.
    apply::delete_checkpoint(&target, &config.slot).await?;
    let outcome = create_slot_and_copy(
        config,
        &columns,
        target,
        CopyMode::CopyAndReconcile,
        failover,
    )
    .await?;
    println!(
        "resync done: {} users copied, {} absent from the source soft-deleted; checkpoint reset to {}",
        outcome.copied, outcome.soft_deleted, outcome.consistent_point
    );
    println!("start replication with usersync run");
    Ok(())
}
