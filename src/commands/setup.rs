//! `usersync setup`: checks the source, creates (or finds) the publication, the slot and the
//! target tables, and copies the users already there, consistently with the slot.
//! Idempotent: run it again and it says what it found.
//!
//! What it does with the slot depends on the target's checkpoint for it:
//!
//! | slot                | checkpoint | setup                                               |
//! |---------------------|------------|-----------------------------------------------------|
//! | none                | none       | creates it and copies (a first setup)               |
//! | found               | none       | if this target recorded creating it (see            |
//! |                     |            | `apply::setup_progress`) and nobody consumed from   |
//! |                     |            | it: an earlier setup stopped before its copy was    |
//! |                     |            | done; drops it, creates it again and copies.        |
//! |                     |            | Otherwise it may feed another target: refuses       |
//! | found               | found      | nothing to do                                       |
//! | none, or WAL lost   | found      | refuses and names `resync`: the changes since the   |
//! |                     |            | checkpoint are gone, and a copy alone would leave   |
//! |                     |            | the users deleted meanwhile live                    |
//!
//! A record of an unfinished *resync* makes setup refuse and name `resync`, which reconciles.
//! The copy that finishes an interrupted setup reconciles too (soft-deletes the users the
//! source no longer has) when `users_sync` was empty before the first attempt: then every row
//! on it came from usersync's copy.

use futures_util::TryStreamExt;
use tokio_postgres::Client;

use super::connect;
use super::initial_copy::{
    copy_at_new_snapshot, create_slot_and_copy, CopyMode, CopyRecord, CopyTarget,
};
use crate::apply::setup_progress::{self, SetupMode, SetupProgress};
use crate::apply::{self, bulk, schema::Created};
use crate::config::Config;
use crate::conn::version;
use crate::decode::RelationColumn;
use crate::error::Error;
use crate::map::{ColumnUse, MappingPlan};
use crate::source::catalog::SlotInfo;
use crate::source::publication::{self, PublishedTable};
use crate::source::{catalog, SourceError};

/// What `setup` does beyond the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupOptions {
    /// Copy the users already in the table (inside the slot's snapshot).
    pub snapshot: bool,
    /// Create a failover slot (PostgreSQL 17+), which a promoted standby keeps.
    pub failover: bool,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            snapshot: true,
            failover: false,
        }
    }
}

/// A checked source and a ready target: what `setup` and `resync` both start from.
pub(crate) struct Prepared {
    pub source: Client,
    pub target: Client,
    /// The users table's columns the mapping uses: all the initial copy reads.
    pub columns: Vec<RelationColumn>,
    /// See [`crate::map::Profile::part_sources_select`].
    pub part_sources_select: Option<String>,
}

/// Checks the source (settings, privileges, table, mapping), ensures the publication and the
/// target tables, and says what it found or made.
pub(crate) async fn prepare(config: &Config) -> Result<Prepared, Error> {
    let source = prepare_source(config).await?;
    let target = prepare_target(config).await?;
    Ok(Prepared {
        source: source.client,
        target,
        columns: source.columns,
        part_sources_select: source.part_sources_select,
    })
}

/// A checked source: what [`prepare`] learns there.
pub(crate) struct PreparedSource {
    pub client: Client,
    pub columns: Vec<RelationColumn>,
    pub part_sources_select: Option<String>,
}

/// The source's half of [`prepare`]: checks, and the publication.
pub(crate) async fn prepare_source(config: &Config) -> Result<PreparedSource, Error> {
    let source = connect("source", &config.source).await?;
    version::check_source(&source).await?;
    catalog::check_wal_level(&source).await?;
    catalog::check_replication_privilege(&source).await?;
    let profile = catalog::resolve_profile(&source, &config.table, &config.mapping).await?;
    let tables = profile.tables(&config.table);
    let mut columns = Vec::new();
    let mut published = Vec::new();
    for (index, table) in tables.iter().enumerate() {
        catalog::check_table(&source, table).await?;
        let table_columns = catalog::table_columns(&source, table).await?;
        if index == 0 {
            profile.columns().check_names(&table_columns)?;
        }
        let mapping = profile.bind_table(index, &table_columns)?;
        for note in mapping.notes() {
            println!("mapping note: {note}");
        }
        println!(
            "source table {table}: {} columns, profile {}; {}",
            table_columns.len(),
            profile.name(),
            if index == 0 {
                "raw_json will be:"
            } else {
                "its rows set these keys of their user:"
            }
        );
        print!("{}", describe(&mapping.plan()));
        let used = mapping.layout().used().clone();
        if index == 0 {
            if let Some(selection) = profile.columns().describe() {
                println!("  columns: {selection}");
            }
            columns = copied_columns(&table_columns, &used);
        }
        published.push(PublishedTable::new(table.clone(), &table_columns, used));
    }
    for line in publication::ensure_publication(
        &source,
        &config.publication,
        &published,
        profile.row_filter().as_deref(),
    )
    .await?
    {
        println!("{line}");
    }

    Ok(PreparedSource {
        client: source,
        columns,
        part_sources_select: profile.part_sources_select(&config.table),
    })
}

/// The target's half of [`prepare`]: checks, and usersync's tables.
pub(crate) async fn prepare_target(config: &Config) -> Result<Client, Error> {
    let target = connect("target", &config.target).await?;
    version::check_target(&target).await?;
    if config.routes.is_none() {
        apply::refuse_route_target(&target, &config.slot).await?;
    }
    let (_, created) = apply::ensure_target_schema(&target).await?;
    println!(
        "{}target table neon_auth.users_sync {}; checkpoint table usersync.state ready",
        config
            .route_name()
            .map(|name| format!("route {name}: "))
            .unwrap_or_default(),
        match created {
            Created::Created => "created",
            Created::Found => "found (its shape fits)",
        }
    );

    Ok(target)
}

/// Runs the checks and creations, printing one line per step on stdout.
pub async fn setup(config: &Config, options: SetupOptions) -> Result<(), Error> {
    if config.routes.is_some() {
        return setup_routes(config, options).await;
    }
    let Prepared {
        source,
        target,
        columns,
        part_sources_select,
    } = prepare(config).await?;
    let checkpoint = apply::read_checkpoint(&target, &config.slot).await?;
    let slot = catalog::slot_info(&source, &config.slot).await?;
    if let Some(checkpoint) = &checkpoint {
        // The target was fed from this slot: if the slot is gone or lost, so are the changes
        // since the checkpoint, deletes included, and a new copy alone would not notice them.
        let state = match &slot {
            None => Some("does not exist on the source".to_owned()),
            Some(slot) if slot.is_invalidated() => Some(slot.invalidation()),
            Some(_) => None,
        };
        if let Some(state) = state {
            return Err(Error::ResyncNeeded {
                slot: config.slot.clone(),
                state,
                checkpoint: checkpoint.end_lsn,
            });
        }
    }
    // Without a checkpoint, what this target recorded of an earlier attempt, if any.
    let earlier = match checkpoint {
        Some(_) => None,
        None => setup_progress::read(&target, &config.slot).await?,
    };
    if earlier
        .as_ref()
        .is_some_and(|earlier| earlier.mode == SetupMode::Resync)
    {
        return Err(Error::ResyncUnfinished {
            slot: config.slot.clone(),
        });
    }
    let copy = match slot {
        Some(slot) => {
            check_slot_fits(config, &slot)?;
            if checkpoint.is_some() {
                println!(
                    "replication slot {} found (confirmed up to {})",
                    config.slot,
                    slot.confirmed_flush_lsn
                        .map_or_else(|| "-".to_owned(), |lsn| lsn.to_string())
                );
                false
            } else {
                let system_id = catalog::system_identifier(&source).await?;
                if !created_here_unconsumed(&slot, earlier.as_ref(), &system_id) {
                    return Err(Error::SlotNotCreatedHere {
                        slot: config.slot.clone(),
                    });
                }
                // This target made the slot and nobody consumed from it: an earlier setup
                // stopped before its copy was complete, and only a new snapshot can finish it.
                if let (true, Some(pid)) = (slot.active, slot.active_pid) {
                    return Err(SourceError::Definite(format!(
                        "replication slot {} has no checkpoint on the target (its setup did not \
                         finish) and is in use by source backend pid {pid}; stop that process and \
                         run setup again",
                        config.slot
                    ))
                    .into());
                }
                println!(
                    "replication slot {} found without a checkpoint: an earlier setup did not \
                         finish its initial copy; creating the slot again with a new snapshot",
                    config.slot
                );
                catalog::drop_slot(&source, &config.slot).await?;
                true
            }
        }
        None => true,
    };
    if copy {
        let target_was_empty = match &earlier {
            // The rows on the target now may be the earlier attempt's: what counts is what
            // the target held before it.
            Some(earlier) => earlier.target_was_empty,
            None => bulk::users_sync_is_empty(&target).await?,
        };
        let mode = copy_mode(options, earlier.is_some(), target_was_empty);
        // Not filled now: read before the slot exists, the channels could miss a change made
        // before the slot's start, and a wrong record is worse than an unknown one (which
        // stops run loudly). Once the slot exists, setup again fills them.
        if let (CopyMode::Skip, Some(_)) = (mode, &part_sources_select) {
            let unknown = apply::count_unknown_primary_email_channels(&target).await?;
            if unknown > 0 {
                println!(
                    "usersync.primary_email_channel: {unknown} users' primary email channel is \
                     unknown; without a snapshot setup cannot record them before the slot \
                     exists: run usersync setup again (before usersync run) to record them"
                );
            }
        }
        if earlier.is_some() && mode == CopyMode::Copy {
            println!(
                "warning: neon_auth.users_sync held users before the interrupted setup began, \
                 so setup cannot tell them from the users it copied: users deleted on the \
                 source since the interrupted copy may stay live; run usersync resync after \
                 setup to soft-delete them"
            );
        }
        create_slot_and_copy(
            config,
            &columns,
            vec![CopyTarget {
                config: config.clone(),
                client: target,
                mode,
                record: CopyRecord {
                    mode: SetupMode::Setup,
                    target_was_empty,
                },
            }],
            options.failover,
        )
        .await?;
    } else if let Some(select) = &part_sources_select {
        record_unknown_part_sources(config, &source, &target, select).await?;
    }
    println!("ready: start replication with usersync run");
    Ok(())
}

/// `setup --routes`: the source and the slot as for one target, then each route's target.
/// Routes without a checkpoint are copied, their share of the table only: all of them in
/// the new slot's snapshot when the slot is created now, else (routes added to a fan-out,
/// or a setup interrupted after the slot) in a temporary slot's snapshot, which needs the
/// slot idle: a `run` streaming from it would confirm it past the new routes' checkpoints
/// without feeding them.
async fn setup_routes(config: &Config, options: SetupOptions) -> Result<(), Error> {
    let PreparedSource {
        client: source,
        columns,
        part_sources_select,
    } = prepare_source(config).await?;
    check_routing_column(config, &source).await?;
    let slot = catalog::slot_info(&source, &config.slot).await?;
    if let Some(slot) = &slot {
        check_slot_fits(config, slot)?;
    }
    let lost = match &slot {
        None => None,
        Some(slot) if slot.is_invalidated() => Some(slot.invalidation()),
        Some(_) => None,
    };
    let system_id = catalog::system_identifier(&source).await?;
    let mut missing = Vec::new();
    let mut holding = Vec::new();
    let mut ours = false;
    for route in config.route_configs() {
        let name = route.route_name().unwrap_or_default().to_owned();
        let target = prepare_target(&route).await?;
        let key = route.checkpoint_key();
        if let Some(checkpoint) = apply::read_checkpoint(&target, &key).await? {
            if slot.is_none() || lost.is_some() {
                holding.push(name);
                continue;
            }
            println!(
                "route {name}: checkpoint at {}, nothing to copy",
                checkpoint.end_lsn
            );
            ours = true;
            if let Some(select) = &part_sources_select {
                record_unknown_part_sources(&route, &source, &target, select).await?;
            }
            continue;
        }
        let earlier = setup_progress::read(&target, &key).await?;
        if let Some(earlier) = &earlier {
            if earlier.mode == SetupMode::Resync {
                return Err(Error::ResyncUnfinished { slot: key });
            }
            ours |= slot
                .as_ref()
                .is_some_and(|slot| created_here_unconsumed(slot, Some(earlier), &system_id));
        }
        let target_was_empty = match &earlier {
            Some(earlier) => earlier.target_was_empty,
            None => bulk::users_sync_is_empty(&target).await?,
        };
        let mode = copy_mode(options, earlier.is_some(), target_was_empty);
        missing.push(CopyTarget {
            config: route,
            client: target,
            mode,
            record: CopyRecord {
                mode: SetupMode::Setup,
                target_was_empty,
            },
        });
    }
    if !holding.is_empty() {
        // The changes since those checkpoints are gone with the slot.
        return Err(Error::Config(format!(
            "replication slot {} {}, but routes {} hold checkpoints from it: the changes since \
             are lost for them; run usersync resync --routes, which creates the slot again, \
             copies every route anew and soft-deletes the users the source no longer has \
             (docs/fan-out.md#a-lost-slot-and-copying-a-route-again)",
            config.slot,
            lost.unwrap_or_else(|| "does not exist on the source".to_owned()),
            holding.join(", "),
        )));
    }
    if missing.is_empty() {
        println!("ready: start replication with usersync run --routes");
        return Ok(());
    }
    match &slot {
        None => {
            create_slot_and_copy(config, &columns, missing, options.failover).await?;
        }
        Some(slot) => {
            if let Some(lost) = &lost {
                return Err(SourceError::Definite(format!(
                    "replication slot {} {lost}: drop it (SELECT pg_drop_replication_slot('{}') \
                     on the source) and run usersync setup --routes again",
                    config.slot, config.slot
                ))
                .into());
            }
            if !ours {
                // No route holds a checkpoint from it or recorded creating it: it may feed
                // another usersync's target under the same name.
                return Err(Error::SlotNotCreatedHere {
                    slot: config.slot.clone(),
                });
            }
            if slot.active {
                return Err(SourceError::Definite(format!(
                    "replication slot {} is in use{}: routes {} have no checkpoint yet, and a \
                     usersync run streaming meanwhile would move the slot past their copy \
                     without feeding them; stop usersync run, run setup --routes again, then \
                     start run with the new routes file",
                    config.slot,
                    slot.active_pid
                        .map(|pid| format!(" by source backend pid {pid}"))
                        .unwrap_or_default(),
                    missing
                        .iter()
                        .filter_map(|target| target.config.route_name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .into());
            }
            // A `run` starting meanwhile (systemd restarting it) stands by on these locks;
            // one that still streams with an older routes file is caught below.
            let _locks = hold_route_locks(config).await?;
            let keys: Vec<String> = missing
                .iter()
                .map(|target| target.config.checkpoint_key())
                .collect();
            let copies: Vec<Config> = missing.iter().map(|t| t.config.clone()).collect();
            let outcomes = copy_at_new_snapshot(config, &columns, missing).await?;
            let copied_at = outcomes
                .iter()
                .map(|outcome| outcome.consistent_point)
                .min();
            let confirmed = catalog::slot_info(&source, &config.slot)
                .await?
                .and_then(|slot| slot.confirmed_flush_lsn);
            if let (Some(copied_at), Some(confirmed)) = (copied_at, confirmed) {
                if confirmed > copied_at {
                    // Something streamed from the slot past the copies without feeding them:
                    // their checkpoints would skip what it confirmed.
                    for (route, key) in copies.iter().zip(&keys) {
                        let target = super::connect("target", &route.target).await?;
                        apply::delete_checkpoint(&target, key).await?;
                    }
                    return Err(SourceError::Definite(format!(
                        "replication slot {} moved to {confirmed} during the copy, past it \
                         ({copied_at}): a usersync run streamed from it meanwhile (with a \
                         routes file without these routes); the new routes' checkpoints are \
                         removed again: stop every usersync run of this slot and run setup \
                         --routes again",
                        config.slot
                    ))
                    .into());
                }
            }
        }
    }
    println!("ready: start replication with usersync run --routes");
    Ok(())
}

/// Takes the slot's lock of every route on its target, on connections kept until the
/// returned clients are dropped; refuses if one is held (a `run` of this fan-out).
async fn hold_route_locks(config: &Config) -> Result<Vec<Client>, Error> {
    let mut held = Vec::new();
    for route in config.route_configs() {
        let target = super::connect("target", &route.target).await?;
        if let Some(holders) = apply::slot_lock::try_take(&target, &route.checkpoint_key()).await? {
            return Err(Error::Config(format!(
                "route {}: another session holds its lock on the target ({}): a usersync run \
                 of this fan-out; stop it, run setup --routes, then start run with the new \
                 routes file",
                route.route_name().unwrap_or_default(),
                apply::slot_lock::describe(&holders)
            )));
        }
        held.push(target);
    }
    Ok(held)
}

/// Checks, before any slot exists, what `run` checks at the first change: the routing
/// column is in every table of the profile, in its replica identity, of a type usersync
/// matches reliably, with every value spelled as PostgreSQL prints it; and says which
/// values match no row yet (a typo sends nothing anywhere, or everything to the default).
pub(crate) async fn check_routing_column(config: &Config, source: &Client) -> Result<(), Error> {
    let Some(routes) = &config.routes else {
        return Ok(());
    };
    let profile = catalog::resolve_profile(source, &config.table, &config.mapping).await?;
    for table in profile.tables(&config.table) {
        let columns = catalog::table_columns(source, &table).await?;
        routes.column_in(&table, &columns)?;
    }
    let values: Vec<&str> = routes
        .routes
        .iter()
        .flat_map(|route| route.values.iter().map(String::as_str))
        .collect();
    let found: Vec<String> = source
        .query(
            &format!(
                "SELECT DISTINCT v FROM unnest($1::text[]) AS v
                  WHERE EXISTS (SELECT FROM {} u WHERE u.{}::text = v)",
                config.table.quoted(),
                postgres_protocol::escape::escape_identifier(&routes.by)
            ),
            &[&values],
        )
        .await
        .map_err(SourceError::sql("looking for the routes' values"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for route in &routes.routes {
        let unmatched = route
            .values
            .iter()
            .filter(|value| !found.contains(value))
            .count();
        if unmatched > 0 {
            println!(
                "route {}: {unmatched} of its {} values match no row of {} yet (a new \
                 tenancy, or a misspelled value)",
                route.name,
                route.values.len(),
                config.table
            );
        }
    }
    Ok(())
}

/// Channels recorded per target statement.
const PART_SOURCES_CHUNK: usize = 10_000;

/// Gives the users whose primary email channel the target does not know
/// ([`apply::UNKNOWN_PRIMARY_EMAIL_CHANNELS`]: copied by a usersync older than the record,
/// written by one running beside this version, or left by a teardown) the channel the
/// source has now, so that `run` needs no `REPLICA IDENTITY FULL` for them. A copy does this
/// too; this spares one.
///
/// The source is read as it is now, which may be ahead of what the target holds, and the
/// stream then converges: a user has one primary email channel at a time, so if the channel
/// read now is not the one the target's email came from, that one stopped being primary
/// before the channel read now became primary, and the stream still holds both changes, in
/// that order: the first finds the record naming another channel and keeps the email, the
/// second sets the email and the record. (A change to the channel read now, before it became
/// primary, may clear the email early; the second change sets it again.) Changes after the
/// read find the record right. A user without a primary email on the source now stays
/// unknown.
///
/// That holds only while nothing else writes emails: a usersync older than the record
/// changes a user's email without changing its record, which would leave a record that is
/// wrong rather than unknown. So while the slot is in use on the source or its lock is held
/// on the target, this records nothing, and refuses if there is something to record (run
/// and setup again are an ordinary pair, as in the switches of replica identity).
async fn record_unknown_part_sources(
    config: &Config,
    source: &Client,
    target: &Client,
    select: &str,
) -> Result<(), Error> {
    let unknown = apply::count_unknown_primary_email_channels(target).await?;
    if unknown == 0 {
        return Ok(());
    }
    let active = catalog::slot_info(source, &config.slot)
        .await?
        .filter(|slot| slot.active)
        .map(|slot| match slot.active_pid {
            Some(pid) => format!(
                "replication slot {} is in use by source backend pid {pid}",
                config.slot
            ),
            None => format!("replication slot {} is in use", config.slot),
        });
    let holders = apply::slot_lock::holders(target, &config.checkpoint_key()).await?;
    let busy = match (active, holders.is_empty()) {
        (None, true) => None,
        (Some(active), true) => Some(active),
        (active, false) => Some(format!(
            "{}the slot's lock on the target is held by {}",
            active
                .map(|active| format!("{active}, and "))
                .unwrap_or_default(),
            apply::slot_lock::describe(&holders)
        )),
    };
    let rows = source
        .query_raw(select, std::iter::empty::<&str>())
        .await
        .map_err(SourceError::sql("reading the primary email channels"))?;
    futures_util::pin_mut!(rows);
    let (mut users, mut channels) = (Vec::new(), Vec::new());
    let (mut recorded, mut fillable) = (0, 0);
    // The same users as counted, those the source names: `v, u LEFT JOIN r` joins `v` to
    // the whole LEFT JOIN (a comma binds looser than JOIN). One row per user, should the
    // source name a user twice (the same id in two tenancies).
    let matching = format!(
        "SELECT DISTINCT ON (u.id) u.id, v.channel_id
           FROM unnest($1::text[], $2::text[]) AS v(user_id, channel_id),
                {} AND u.id = v.user_id
          ORDER BY u.id",
        apply::UNKNOWN_PRIMARY_EMAIL_CHANNELS.trim()
    );
    let fill = format!(
        "INSERT INTO usersync.primary_email_channel AS rec (user_id, channel_id)
         {matching}
         ON CONFLICT (user_id) DO UPDATE SET channel_id = EXCLUDED.channel_id
          WHERE rec.channel_id IS NULL"
    );
    let count = format!("SELECT count(*) FROM ({matching}) AS fillable");
    loop {
        let row = rows
            .try_next()
            .await
            .map_err(SourceError::sql("reading the primary email channels"))?;
        if let Some(row) = &row {
            users.push(row.get::<_, String>(0));
            channels.push(row.get::<_, String>(1));
        }
        if users.len() >= PART_SOURCES_CHUNK || (row.is_none() && !users.is_empty()) {
            // While something else may write the target, only count what would be written.
            if busy.is_some() {
                let found: i64 = target
                    .query_one(&count, &[&users, &channels])
                    .await
                    .map_err(apply::ApplyError::sql("counting primary email channels"))?
                    .get(0);
                fillable += found;
            } else {
                recorded += target
                    .execute(&fill, &[&users, &channels])
                    .await
                    .map_err(apply::ApplyError::sql("recording primary email channels"))?;
            }
            users.clear();
            channels.clear();
        }
        if row.is_none() {
            break;
        }
    }
    if let Some(busy) = busy {
        if fillable > 0 {
            return Err(Error::Config(format!(
                "{fillable} users' primary email channel is unknown on the target and the source \
                 has it, and setup records them only while no usersync writes the target, but \
                 {busy}: a usersync older than this version changes emails without recording \
                 their channel. Stop every older usersync run on this slot (standbys included), \
                 then run usersync setup again before starting this version's usersync run"
            )));
        }
        // Nothing setup could record (the unknown users have no primary email on the
        // source now): nothing to wait for.
        println!(
            "usersync.primary_email_channel: {unknown} users' primary email channel is unknown \
             and none of them has a primary email on the source now: keep REPLICA IDENTITY \
             FULL on \"ContactChannel\" if it is still set, until usersync resync records \
             them, or a change to their channels stops usersync run"
        );
        return Ok(());
    }
    let left = apply::count_unknown_primary_email_channels(target).await?;
    println!(
        "usersync.primary_email_channel: recorded the primary email channel of {recorded} of \
         the {unknown} users whose channel the target did not know{}",
        if left > 0 {
            format!(
                "; {left} have no primary email on the source now: keep REPLICA IDENTITY FULL \
                 on \"ContactChannel\" if it is still set, until usersync resync records \
                 them, or a change to their channels stops usersync run"
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Whether `slot` is the one an earlier setup against this target created (the target's
/// record names it, on this source system) and nobody consumed from it since: its
/// `confirmed_flush_lsn` is still at the consistent point it was created at. Anything else
/// may be another usersync's slot, fed to another target under the same name.
fn created_here_unconsumed(
    slot: &SlotInfo,
    earlier: Option<&SetupProgress>,
    system_id: &str,
) -> bool {
    let Some(earlier) = earlier else {
        return false;
    };
    match (earlier.consistent_point, slot.confirmed_flush_lsn) {
        (Some(consistent_point), Some(confirmed)) => {
            earlier.mode == SetupMode::Setup
                && earlier.system_id == system_id
                && confirmed <= consistent_point
        }
        _ => false,
    }
}

/// The mapping as lines for people: one per Stack Auth key, then what else happens.
fn describe(plan: &MappingPlan) -> String {
    let width = plan
        .keys
        .iter()
        .map(|(key, _)| key.len())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (key, source) in &plan.keys {
        text.push_str(&format!("  {key:<width$} <- {source}\n"));
    }
    let list = |names: &[String]| {
        if names.is_empty() {
            "(none)".to_owned()
        } else {
            names.join(", ")
        }
    };
    text.push_str(&format!("  passed through: {}\n", list(&plan.passthrough)));
    text.push_str(&format!("  never copied: {}\n", list(&plan.excluded)));
    for rule in &plan.rules {
        text.push_str(&format!("  rows: {rule}\n"));
    }
    text
}

/// The columns of the users table the initial copy reads: those the mapping reads or copies,
/// in the table's order, so that no other column (a password hash) leaves the source through
/// the copy either. The replica identity is left out unless read: only the stream needs it.
pub(crate) fn copied_columns(columns: &[RelationColumn], used: &ColumnUse) -> Vec<RelationColumn> {
    columns
        .iter()
        .filter(|column| {
            used.columns
                .iter()
                .any(|used| used.name == column.name && (used.read || used.copied))
        })
        .cloned()
        .collect()
}

/// A rerun after an interrupted copy into an empty `users_sync` reconciles: every row on the
/// target came from usersync's copy, so one the source no longer has was deleted there since.
/// Otherwise setup does not soft-delete rows it did not copy: they may come from elsewhere.
fn copy_mode(options: SetupOptions, rerun: bool, target_was_empty: bool) -> CopyMode {
    match (options.snapshot, rerun && target_was_empty) {
        (false, _) => CopyMode::Skip,
        (true, true) => CopyMode::CopyAndReconcile,
        (true, false) => CopyMode::Copy,
    }
}

pub(crate) fn check_slot_fits(config: &Config, slot: &SlotInfo) -> Result<(), Error> {
    if slot.plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::Definite(format!(
            "a slot named {} exists but uses {}, not pgoutput; choose another --slot",
            config.slot,
            slot.plugin.as_deref().unwrap_or("no plugin (physical)")
        ))
        .into());
    }
    if slot.database.as_deref() != Some(config.source.dbname.as_str()) {
        return Err(SourceError::Definite(format!(
            "slot {} belongs to database {}, not {}; choose another --slot",
            config.slot,
            slot.database.as_deref().unwrap_or("?"),
            config.source.dbname
        ))
        .into());
    }
    Ok(())
}
