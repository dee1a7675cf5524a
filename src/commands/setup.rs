//! `usersync setup`: checks the source, creates (or finds) the publication, the slot and the
//! target tables, and copies the users already there, consistently with the slot.
//! Idempotent: run it again and it says what it found.
//!
//! What it does with the slot depends on the target's checkpoint for it:
//!
//! | slot                | checkpoint | setup                                               |
//! |---------------------|------------|-----------------------------------------------------|
//! | none                | none       | creates it and copies (a first setup)               |
//! | found               | none       | an earlier setup stopped before its copy was done:  |
//! |                     |            | drops it, creates it again and copies               |
//! | found               | found      | nothing to do                                       |
//! | none, or WAL lost   | found      | refuses and names `resync`: the changes since the   |
//! |                     |            | checkpoint are gone, and a copy alone would leave   |
//! |                     |            | the users deleted meanwhile live                    |

use tokio_postgres::Client;

use super::connect;
use super::initial_copy::{create_slot_and_copy, CopyMode};
use crate::apply::{self, schema::Created};
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
}

/// Checks the source (settings, privileges, table, mapping), ensures the publication and the
/// target tables, and says what it found or made.
pub(crate) async fn prepare(config: &Config) -> Result<Prepared, Error> {
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

    let target = connect("target", &config.target).await?;
    version::check_target(&target).await?;
    let (_, created) = apply::ensure_target_schema(&target).await?;
    println!(
        "target table neon_auth.users_sync {}; checkpoint table usersync.state ready",
        match created {
            Created::Created => "created",
            Created::Found => "found (its shape fits)",
        }
    );

    Ok(Prepared {
        source,
        target,
        columns,
    })
}

/// Runs the checks and creations, printing one line per step on stdout.
pub async fn setup(config: &Config, options: SetupOptions) -> Result<(), Error> {
    let Prepared {
        source,
        target,
        columns,
    } = prepare(config).await?;
    let checkpoint = apply::read_checkpoint(&target, &config.slot).await?;
    let slot = catalog::slot_info(&source, &config.slot).await?;
    if let Some(checkpoint) = &checkpoint {
        // The target was fed from this slot: if the slot is gone or lost, so are the changes
        // since the checkpoint, deletes included, and a new copy alone would not notice them.
        let state = match &slot {
            None => Some("does not exist on the source"),
            Some(slot) if slot.wal_status.as_deref() == Some("lost") => {
                Some("has lost WAL it still needed (wal_status lost)")
            }
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
                // Setup writes the checkpoint last: without one, an earlier setup stopped
                // before its initial copy was complete, and only a new snapshot can finish it.
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
        create_slot_and_copy(
            config,
            &columns,
            target,
            copy_mode(options),
            options.failover,
        )
        .await?;
    }
    println!("ready: start replication with usersync run");
    Ok(())
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
fn copied_columns(columns: &[RelationColumn], used: &ColumnUse) -> Vec<RelationColumn> {
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

fn copy_mode(options: SetupOptions) -> CopyMode {
    if options.snapshot {
        CopyMode::Copy
    } else {
        CopyMode::Skip
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
