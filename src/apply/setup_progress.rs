//! The target's record of a setup or resync under way (`usersync.setup_progress`).
//!
//! Without a checkpoint, a slot on the source may be this target's unfinished setup, or the
//! slot of another usersync feeding another target under the same name: only the target that
//! created it knows. Setup and resync record, once the slot exists (resync: already before
//! they delete the checkpoint), the slot's consistent point and what kind of copy follows; the
//! final commit writes the checkpoint and deletes the record in one transaction.

use tokio_postgres::Client;

use super::ApplyError;
use crate::lsn::Lsn;

/// Which command left the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupMode {
    Setup,
    Resync,
}

impl SetupMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            SetupMode::Setup => "setup",
            SetupMode::Resync => "resync",
        }
    }
}

/// A setup or resync that has not made its final commit (yet, or ever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupProgress {
    pub slot: String,
    pub system_id: String,
    /// The slot's consistent point; `None` while a resync has not created its slot.
    pub consistent_point: Option<Lsn>,
    pub mode: SetupMode,
    /// `neon_auth.users_sync` held no row when the first attempt began.
    pub target_was_empty: bool,
}

const READ: &str = "
SELECT system_identifier, consistent_point::text, mode, target_was_empty
  FROM usersync.setup_progress WHERE slot_name = $1";

const WRITE: &str = "
INSERT INTO usersync.setup_progress
       (slot_name, system_identifier, consistent_point, mode, target_was_empty, started_at)
VALUES ($1, $2, $3::text::pg_lsn, $4, $5, now())
ON CONFLICT (slot_name) DO UPDATE
   SET system_identifier = EXCLUDED.system_identifier,
       consistent_point = EXCLUDED.consistent_point, mode = EXCLUDED.mode,
       target_was_empty = EXCLUDED.target_was_empty, started_at = EXCLUDED.started_at";

const DELETE: &str = "DELETE FROM usersync.setup_progress WHERE slot_name = $1";

/// What resync removes in the transaction that records it: an interrupted resync must never
/// look like a finished one, nor like an interrupted setup.
const DELETE_CHECKPOINT: &str = "DELETE FROM usersync.state WHERE slot_name = $1";

/// Whether the table exists: a deployment set up by an older usersync gets it from the next
/// setup or resync (`sql/usersync_state.sql`).
async fn table_exists(client: &Client) -> Result<bool, ApplyError> {
    Ok(client
        .query_one(
            "SELECT to_regclass('usersync.setup_progress') IS NOT NULL",
            &[],
        )
        .await
        .map_err(ApplyError::sql("looking for usersync.setup_progress"))?
        .get(0))
}

/// The record for `slot`, if the target has the table and one.
pub async fn read(client: &Client, slot: &str) -> Result<Option<SetupProgress>, ApplyError> {
    if !table_exists(client).await? {
        return Ok(None);
    }
    let Some(row) = client
        .query_opt(READ, &[&slot])
        .await
        .map_err(ApplyError::sql("reading usersync.setup_progress"))?
    else {
        return Ok(None);
    };
    let consistent_point = row
        .get::<_, Option<&str>>(1)
        .map(|lsn| {
            lsn.parse().map_err(|_| {
                ApplyError::Shape("usersync.setup_progress holds an invalid LSN".into())
            })
        })
        .transpose()?;
    let mode = match row.get::<_, &str>(2) {
        "resync" => SetupMode::Resync,
        _ => SetupMode::Setup,
    };
    Ok(Some(SetupProgress {
        slot: slot.to_owned(),
        system_id: row.get(0),
        consistent_point,
        mode,
        target_was_empty: row.get(3),
    }))
}

/// Writes the record (replacing an earlier one) in a transaction of its own, committed
/// synchronously: a slot may exist only once the target durably says who made it.
/// With `delete_checkpoint` (resync), the slot's checkpoint goes in the same transaction.
pub async fn write(
    client: &mut Client,
    progress: &SetupProgress,
    delete_checkpoint: bool,
) -> Result<(), ApplyError> {
    let context = "recording the setup in usersync.setup_progress";
    let transaction = client
        .transaction()
        .await
        .map_err(ApplyError::sql(context))?;
    transaction
        .batch_execute("SET LOCAL synchronous_commit = on")
        .await
        .map_err(ApplyError::sql(context))?;
    if delete_checkpoint {
        transaction
            .execute(DELETE_CHECKPOINT, &[&progress.slot])
            .await
            .map_err(ApplyError::sql(context))?;
    }
    let consistent_point = progress.consistent_point.map(|lsn| lsn.to_string());
    transaction
        .execute(
            WRITE,
            &[
                &progress.slot,
                &progress.system_id,
                &consistent_point,
                &progress.mode.as_str(),
                &progress.target_was_empty,
            ],
        )
        .await
        .map_err(ApplyError::sql(context))?;
    transaction.commit().await.map_err(ApplyError::sql(context))
}

/// Deletes the record of `slot` where the table exists (teardown).
pub async fn delete_if_present(client: &Client, slot: &str) -> Result<u64, ApplyError> {
    if !table_exists(client).await? {
        return Ok(0);
    }
    delete(client, slot).await
}

/// Deletes the record of `slot`: in the final commit of setup or resync.
pub async fn delete(client: &Client, slot: &str) -> Result<u64, ApplyError> {
    client
        .execute(DELETE, &[&slot])
        .await
        .map_err(ApplyError::sql("deleting the record of the setup"))
}
