//! Applying source changes to `neon_auth.users_sync`.
//!
//! Inserts and updates upsert `raw_json`; deletes are *soft* (`deleted_at` set, row kept),
//! because app tables reference users with foreign keys whose `ON DELETE` rules must not fire
//! on a source delete, and readers filter `deleted_at IS NULL`. Only `raw_json`,
//! `updated_at` and `deleted_at` are written: the other columns are generated from `raw_json`.

pub mod batch;
pub mod bulk;
pub mod schema;
pub mod setup_progress;
pub mod slot_lock;
pub mod worker;
pub mod writer;

pub use batch::{Batch, CommitPosition, UnixMicros, UserKeys};
pub use schema::{
    check_shape, count_unknown_primary_email_channels, ensure_target_schema, target_tables,
    upgrade_state, TargetShape, TargetTables, UNKNOWN_PRIMARY_EMAIL_CHANNELS,
};
pub use setup_progress::{SetupMode, SetupProgress};
pub use worker::{ApplyWorker, Done, Job};
pub use writer::{
    copy_asked, copy_done, create_copying_checkpoint, delete_checkpoint, mark_resyncing,
    read_checkpoint, read_checkpoint_waiting, take_over_checkpoint, Checkpoint, Session,
    TargetWriter,
};

use crate::lsn::Lsn;

/// Refuses a command without `--routes` on a target that holds checkpoints of routes of
/// slot `slot` (keyed `slot:route`): it would treat the route's target as a whole one (copy
/// every tenancy into it, drop the fan-out's slot). Nothing to check where usersync's table
/// does not exist yet.
pub async fn refuse_route_target(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), crate::error::Error> {
    if !target_tables(client).await?.state {
        return Ok(());
    }
    let routes: Vec<String> = client
        .query(
            "SELECT substr(slot_name, length($1) + 2) FROM usersync.state
              WHERE left(slot_name, length($1) + 1) = $1 || ':' ORDER BY 1",
            &[&slot],
        )
        .await
        .map_err(ApplyError::sql("looking for routes of the slot"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if routes.is_empty() {
        return Ok(());
    }
    Err(crate::error::Error::Config(format!(
        "this target is route {} of a fan-out of slot {slot} (set up with --routes): use the \
         same command with --routes and the routes file; without it, usersync would take this \
         database for the only target of the slot (copy every tenancy into it, or drop the \
         slot every route needs)",
        routes.join(", ")
    )))
}

/// Every target session's `statement_timeout`: generous (a batch or a page takes a fraction
/// of a second), but a statement stuck behind a lock or a stalled server ends, and the session
/// reconnects.
const STATEMENT_TIMEOUT: &str = "60s";

/// Errors of the target side.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("target: {context} failed: {source}")]
    Sql {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("target table has an unusable shape: {0}")]
    Shape(String),
    #[error(
        "the target refused to move the checkpoint of slot {slot} to {end_lsn}: usersync.state \
         holds none for the slot (removed by usersync teardown or resync, or by hand), a later \
         position, or one from another source system; check that no other usersync writes this \
         slot's checkpoint (usersync status shows it), and if it was removed, let a resync under \
         way finish, or run usersync resync"
    )]
    CheckpointRefused { slot: String, end_lsn: Lsn },
    #[error(
        "the checkpoint of slot {slot} is gone from usersync.state on the target (removed by \
         usersync teardown or resync, or by hand) while this replicator was applying to it, so \
         nothing past the durable position was confirmed; if a resync or teardown is under way \
         let it finish, otherwise run usersync resync"
    )]
    CheckpointGone { slot: String },
    /// Hard deletes are opt-in for the target role (`sql/target_role.sql -v purge=on`).
    #[error(
        "role {role} may not DELETE from neon_auth.users_sync, which purge needs to hard-delete \
         users (the target role script grants it only when asked): as the table's owner run \
         `GRANT DELETE ON TABLE neon_auth.users_sync TO {role}`, or run sql/target_role.sql \
         again with -v purge=on; purge --scrub needs no DELETE"
    )]
    DeleteNotGranted {
        /// The role, quoted as an SQL identifier.
        role: String,
    },
    #[error(
        "target: the synchronous commit that makes applied batches durable returned with a \
         warning (a cancelled wait for synchronous replication commits locally only), so \
         nothing was confirmed; reconnecting to make them durable again"
    )]
    DurabilityUnconfirmed,
    /// See `sql/usersync_state.sql` (`usersync.primary_email_channel`).
    #[error(
        "a Stack Auth contact channel was deleted, or updated into a row that is not the \
         primary email (it may never have been), and the source sent only its key \
         (\"ContactChannel\" has its default replica identity), but the target does not know \
         whether its user's email came from it (a user copied or written by an older \
         usersync, or left by a teardown), so the change cannot be applied without guessing: \
         stop every older usersync run, run usersync setup, which records such users' \
         channels from the source, then start usersync run again; only if it stops again with \
         this error (setup says some stay unknown), run usersync resync (keep REPLICA \
         IDENTITY FULL on \"ContactChannel\" if it is still set, until the channels are \
         known)"
    )]
    PartSourceUnknown,
    /// See `slot_lock::CHECK_HELD_BY` and `TargetWriter::check_lock_held_by`.
    #[error(
        "target: the connection holding the slot's lock is gone, or the second connection \
         reached another server, so the second connection committed nothing (neither a batch \
         written beside the first's nor a durability flush); reconnecting"
    )]
    LockLost,
    #[error("an empty batch was handed to the writer")]
    EmptyBatch,
    #[error(
        "target: no answer to a batch within {}s; the network or the target is stalled",
        timeout.as_secs()
    )]
    Stalled { timeout: std::time::Duration },
    #[error("the target writer task ended unexpectedly; this is a bug in usersync")]
    WorkerGone,
    #[error(
        "a durability flush was asked for while a large transaction's parts were being \
         written; nothing was committed; this is a bug in usersync"
    )]
    FlushInsideTransaction,
}

impl ApplyError {
    /// Wraps a tokio-postgres error with what usersync was doing.
    pub fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::Sql { context, source }
    }

    /// The target's deadlock detector ended the statement: two of usersync's connections
    /// (see `replicator::route`'s two writers), or one of them and another client, waited on
    /// each other.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, ApplyError::Sql { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED))
    }

    /// Whether reconnecting may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Sql { source, .. } => crate::error::is_transient_pg(source),
            ApplyError::Stalled { .. }
            | ApplyError::DurabilityUnconfirmed
            | ApplyError::LockLost => true,
            _ => false,
        }
    }
}
