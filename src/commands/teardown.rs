//! `usersync teardown --yes`: drops the slot and publication, and the slot's checkpoint on
//! the target. The users already on the target stay.

use super::connect;
use crate::apply;
use crate::config::Config;
use crate::error::Error;
use crate::source::{catalog, SourceError};

pub async fn teardown(config: &Config) -> Result<(), Error> {
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
            let behind = match slot.confirmed_flush_lsn {
                Some(confirmed) => {
                    let current = catalog::current_wal_lsn(&source).await?;
                    current.0.saturating_sub(confirmed.0)
                }
                None => 0,
            };
            catalog::drop_slot(&source, &config.slot).await?;
            println!(
                "replication slot {} dropped ({behind} bytes of WAL were not yet confirmed)",
                config.slot
            );
        }
        None => println!("replication slot {} not found", config.slot),
    }
    catalog::drop_publication(&source, &config.publication).await?;
    println!("publication {} dropped", config.publication);
    let target = connect("target", &config.target).await?;
    let exists: bool = target
        .query_one("SELECT to_regclass('usersync.state') IS NOT NULL", &[])
        .await
        .map_err(apply::ApplyError::sql("looking for usersync.state"))?
        .get(0);
    if exists {
        apply::delete_checkpoint(&target, &config.slot).await?;
        println!("checkpoint of slot {} removed from the target", config.slot);
    }
    Ok(())
}
