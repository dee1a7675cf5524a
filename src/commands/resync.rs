//! `usersync resync`: for when the slot was lost, invalidated or dropped (`wal_status =
//! lost`, a restored Neon branch). Changes since then are gone from the source's WAL, so the
//! only way back is a new slot and a new copy of the table, reconciled with the target: users
//! present on the source are upserted, live users absent from it are soft-deleted, and the
//! checkpoint moves to the new slot.

use super::initial_copy::{create_slot_and_copy, CopyMode, CopyRecord, CopyTarget};
use super::setup::{
    check_routing_column, check_slot_fits, prepare, prepare_source, prepare_target, Prepared,
    PreparedSource,
};
use crate::apply::setup_progress::{self, SetupMode, SetupProgress};
use crate::apply::{self, bulk};
use crate::config::Config;
use crate::error::Error;
use crate::source::{catalog, SourceError};

pub async fn resync(config: &Config) -> Result<(), Error> {
    if config.routes.is_some() {
        return resync_routes(config).await;
    }
    let Prepared {
        source,
        mut target,
        columns,
        ..
    } = prepare(config).await?;
    let (slot, failover) = slot_to_recreate(config, &source).await?;
    let system_id = catalog::system_identifier(&source).await?;
    let earlier = setup_progress::read(&target, &config.slot).await?;
    if let Some(slot) = &slot {
        if !slot.is_invalidated()
            && !records_slot(&target, config, &system_id, earlier.as_ref()).await?
        {
            // Of use to whoever consumes it, and this target cannot tell who that is.
            return Err(Error::SlotNotCreatedHere {
                slot: config.slot.clone(),
            });
        }
    }
    // Before anything is dropped, and with the checkpoint's deletion: from now until the
    // final commit the target says a resync is under way, which setup refuses to finish
    // (it would not soft-delete) and resync, rerun, redoes.
    let target_was_empty = match &earlier {
        Some(earlier) => earlier.target_was_empty,
        None => bulk::users_sync_is_empty(&target).await?,
    };
    let progress = SetupProgress {
        slot: config.slot.clone(),
        system_id,
        consistent_point: None,
        mode: SetupMode::Resync,
        target_was_empty,
    };
    setup_progress::write(&mut target, &progress, true).await?;
    if let Some(slot) = slot {
        catalog::drop_slot(&source, &config.slot).await?;
        println!(
            "replication slot {} dropped (wal_status was {})",
            config.slot,
            slot.wal_status.as_deref().unwrap_or("unknown")
        );
    }
    let outcomes = create_slot_and_copy(
        config,
        &columns,
        vec![CopyTarget {
            config: config.clone(),
            client: target,
            mode: CopyMode::CopyAndReconcile,
            record: CopyRecord {
                mode: SetupMode::Resync,
                target_was_empty,
            },
        }],
        failover,
    )
    .await?;
    let outcome = outcomes[0];
    println!(
        "resync done: {} users copied, {} absent from the source soft-deleted; checkpoint reset to {}",
        outcome.copied, outcome.soft_deleted, outcome.consistent_point
    );
    println!("start replication with usersync run");
    Ok(())
}

/// `resync --routes FILE --online ROUTE`: marks the route's target as resyncing (its
/// checkpoint's `copy_reconciles`), then tells a running `run` through the slot itself (a
/// logical message): it copies the route again online, beside the stream, and soft-deletes
/// the users the source no longer has (`replicator::backfill`). Without a running `run`,
/// the next one does it. The slot stays: it must still be there.
pub async fn resync_online(config: &Config, name: &str) -> Result<(), Error> {
    let Some(route) = config
        .route_configs()
        .into_iter()
        .find(|route| route.route_name() == Some(name))
    else {
        return Err(Error::Config(format!(
            "the routes file has no route named {name}"
        )));
    };
    let source = super::connect("source", &config.source).await?;
    crate::conn::version::check_source(&source).await?;
    let (standby, database): (bool, String) = source
        .query_one("SELECT pg_is_in_recovery(), current_database()::text", &[])
        .await
        .map(|row| (row.get(0), row.get(1)))
        .map_err(SourceError::sql("asking whether the source is a standby"))?;
    if standby {
        return Err(Error::Config(
            "the source is a standby: an online copy writes transactions on the source (its \
             watermarks); point --source at the primary"
                .into(),
        ));
    }
    match catalog::slot_info(&source, &config.slot).await? {
        None => {
            return Err(Error::Config(format!(
                "slot {} does not exist on the source: an online resync streams on from it; \
                 run usersync resync --routes (without --online), which creates it again and \
                 copies every route",
                config.slot
            )))
        }
        Some(slot) if slot.is_invalidated() => {
            return Err(Error::Config(format!(
                "slot {} {}: an online resync streams on from it; run usersync resync \
                 --routes (without --online), which creates it again and copies every route",
                config.slot,
                slot.invalidation()
            )))
        }
        Some(slot) if slot.database.as_deref() != Some(database.as_str()) => {
            return Err(Error::Config(format!(
                "slot {} belongs to another database of the source than --source names: the \
                 message that tells usersync run would never reach it",
                config.slot
            )))
        }
        Some(_) => {}
    }
    let target = super::connect("target", &route.target).await?;
    crate::conn::version::check_target(&target).await?;
    let key = route.checkpoint_key();
    apply::upgrade_state(&target).await?;
    let checkpoint = apply::read_checkpoint(&target, &key).await?;
    if checkpoint.is_none() || !apply::mark_resyncing(&target, &key).await? {
        return Err(Error::Config(format!(
            "route {name} has no checkpoint on its target: usersync run copies a route new to \
             the routes file by itself"
        )));
    }
    source
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[
                &crate::replicator::copy_message_prefix(&config.slot),
                &crate::replicator::resync_message(name),
            ],
        )
        .await
        .map_err(SourceError::sql(
            "telling usersync run (pg_logical_emit_message)",
        ))?;
    println!(
        "route {name}: marked for an online resync; a running usersync run copies it again now \
         (usersync status --routes shows it copying until done), else the next one does"
    );
    Ok(())
}

/// `resync --routes`: the slot recreated once, and every route copied anew in its one
/// snapshot (its share of the table) and reconciled: users of its target the source no
/// longer has in that share are soft-deleted.
async fn resync_routes(config: &Config) -> Result<(), Error> {
    let PreparedSource {
        client: source,
        columns,
        ..
    } = prepare_source(config).await?;
    check_routing_column(config, &source).await?;
    let (slot, failover) = slot_to_recreate(config, &source).await?;
    let system_id = catalog::system_identifier(&source).await?;
    let mut routes = Vec::new();
    let mut recorded = false;
    for route in config.route_configs() {
        let target = prepare_target(&route).await?;
        let earlier = setup_progress::read(&target, &route.checkpoint_key()).await?;
        recorded |= records_slot(&target, &route, &system_id, earlier.as_ref()).await?;
        let target_was_empty = match &earlier {
            Some(earlier) => earlier.target_was_empty,
            None => bulk::users_sync_is_empty(&target).await?,
        };
        routes.push((route, target, target_was_empty));
    }
    if slot.as_ref().is_some_and(|slot| !slot.is_invalidated()) && !recorded {
        // No route has a record of it: it may feed another usersync's targets.
        return Err(Error::SlotNotCreatedHere {
            slot: config.slot.clone(),
        });
    }
    // As for one target: each route's record says a resync is under way until its final
    // commit, which writes its checkpoint.
    let mut targets = Vec::with_capacity(routes.len());
    for (route, mut target, target_was_empty) in routes {
        let progress = SetupProgress {
            slot: route.checkpoint_key(),
            system_id: system_id.clone(),
            consistent_point: None,
            mode: SetupMode::Resync,
            target_was_empty,
        };
        setup_progress::write(&mut target, &progress, true).await?;
        targets.push(CopyTarget {
            config: route,
            client: target,
            mode: CopyMode::CopyAndReconcile,
            record: CopyRecord {
                mode: SetupMode::Resync,
                target_was_empty,
            },
        });
    }
    if let Some(slot) = slot {
        catalog::drop_slot(&source, &config.slot).await?;
        println!(
            "replication slot {} dropped (wal_status was {})",
            config.slot,
            slot.wal_status.as_deref().unwrap_or("unknown")
        );
    }
    let names: Vec<String> = targets
        .iter()
        .map(|target| target.config.route_name().unwrap_or_default().to_owned())
        .collect();
    let outcomes = create_slot_and_copy(config, &columns, targets, failover).await?;
    for (name, outcome) in names.iter().zip(outcomes) {
        println!(
            "route {name}: {} users copied, {} absent from the source soft-deleted; checkpoint \
             reset to {}",
            outcome.copied, outcome.soft_deleted, outcome.consistent_point
        );
    }
    println!("resync done: start replication with usersync run --routes");
    Ok(())
}

/// The slot resync will drop and create again, if it exists, and whether it is a failover
/// slot (it is recreated as one); refuses one that is not pgoutput of this database, or is in
/// use.
async fn slot_to_recreate(
    config: &Config,
    source: &tokio_postgres::Client,
) -> Result<(Option<catalog::SlotInfo>, bool), Error> {
    let failover = catalog::slot_is_failover(source, &config.slot).await?;
    let slot = catalog::slot_info(source, &config.slot).await?;
    if let Some(slot) = &slot {
        check_slot_fits(config, slot)?;
        if let (true, Some(pid)) = (slot.active, slot.active_pid) {
            return Err(SourceError::Definite(format!(
                "replication slot {} is in use by source backend pid {pid}: stop usersync run \
                 before resync",
                config.slot
            ))
            .into());
        }
    }
    Ok((slot, failover))
}

/// Whether this target has a record of the slot, as the source `system_id` names it: its
/// checkpoint, or a setup or resync of it under way. Only such a slot is resync's to drop
/// while it still holds its WAL; one without a record may feed another target under the
/// same name (one identity store, a target per tenancy).
async fn records_slot(
    target: &tokio_postgres::Client,
    config: &Config,
    system_id: &str,
    earlier: Option<&SetupProgress>,
) -> Result<bool, Error> {
    if earlier.is_some_and(|earlier| earlier.system_id == system_id) {
        return Ok(true);
    }
    Ok(apply::read_checkpoint(target, &config.checkpoint_key())
        .await?
        .is_some_and(|checkpoint| checkpoint.system_id == system_id))
}
