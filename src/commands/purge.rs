//! `usersync purge --older-than DURATION`: the retention end of soft deletes.
//!
//! A source delete only sets `deleted_at`, so the `ON DELETE CASCADE` / `SET NULL` rules that
//! Neon tells app developers to put on their foreign keys never fire. Purge hard-deletes the
//! users soft-deleted longer ago than the retention, and then they do. Or, with `--scrub`, it
//! keeps the rows and strips `raw_json` down to `id` and `signed_up_at_millis`, so nothing
//! personal stays while the ids app tables point to remain.
//!
//! The table must stay readable and writable throughout (usersync itself may be applying
//! changes), so the work is done in small transactions: each locks at most `--batch-size`
//! rows, skips rows someone else holds (`FOR UPDATE SKIP LOCKED`) instead of waiting, and
//! is followed by a short pause. The cutoff is fixed once at the start, on the target's clock.
//! A user re-inserted on the source meanwhile has `deleted_at = NULL` again, which the row
//! lock's re-check sees, so it is never removed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres_protocol::escape::escape_identifier;
use tokio_postgres::Client;

use super::connect;
use super::units::Rfc3339;
use crate::apply::{self, ApplyError};
use crate::config::{PurgeAction, PurgeConfig};
use crate::error::Error;

/// Between batches: lets the replicator and app writers in, and keeps WAL and replica
/// traffic from coming in one burst.
const PAUSE_BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// The rows an action takes: past the retention; for scrub, only those still holding more
/// than the two kept keys, so scrubbing again finds nothing.
fn eligible(action: PurgeAction) -> &'static str {
    match action {
        PurgeAction::Delete => "deleted_at < $1",
        PurgeAction::Scrub => {
            "deleted_at < $1 AND raw_json - 'id' - 'signed_up_at_millis' <> '{}'::jsonb"
        }
    }
}

/// One batch: at most `$2` eligible rows, skipping those another transaction holds.
/// `jsonb_strip_nulls` leaves `signed_up_at_millis` out when the user had none.
///
/// With `channels` (the target has `usersync.primary_email_channel`), the record of which
/// Stack Auth contact channel a purged user's email came from goes in the same transaction:
/// the row it describes is gone, or no longer holds an email.
fn batch_statement(action: PurgeAction, channels: bool) -> String {
    let batch = format!(
        "SELECT id FROM neon_auth.users_sync WHERE {} LIMIT $2 FOR UPDATE SKIP LOCKED",
        eligible(action)
    );
    let purge = match action {
        PurgeAction::Delete => format!("DELETE FROM neon_auth.users_sync WHERE id IN ({batch})"),
        PurgeAction::Scrub => format!(
            "UPDATE neon_auth.users_sync
                SET raw_json = jsonb_strip_nulls(jsonb_build_object(
                        'id', raw_json -> 'id',
                        'signed_up_at_millis', raw_json -> 'signed_up_at_millis'))
              WHERE id IN ({batch})"
        ),
    };
    if !channels {
        return purge;
    }
    // The outer SELECT returns one row per purged user: what the batch counts.
    format!(
        "WITH purged AS ({purge} RETURNING id), forgotten AS (
             DELETE FROM usersync.primary_email_channel AS r USING purged p
              WHERE r.user_id = p.id)
         SELECT FROM purged"
    )
}

/// What a purge did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Users removed or scrubbed; in a dry run, the users that would be.
    pub users: u64,
    /// Eligible users left behind because another transaction held them.
    pub skipped_locked: u64,
    pub batches: u64,
}

/// Runs the purge and prints what it did.
pub async fn purge(config: &PurgeConfig) -> Result<PurgeOutcome, Error> {
    let target = connect("target", &config.target).await?;
    let tables = apply::target_tables(&target).await?;
    if !tables.users_sync {
        return Err(Error::Config(
            "the target has no neon_auth.users_sync: nothing to purge (check --target)".into(),
        ));
    }
    if config.action == PurgeAction::Delete {
        check_delete_granted(&target).await?;
    }
    let cutoff: DateTime<Utc> = target
        .query_one(
            "SELECT now() - make_interval(secs => $1)",
            &[&config.older_than.as_secs_f64()],
        )
        .await
        .map_err(ApplyError::sql("computing the cutoff"))?
        .get(0);
    let outcome = if config.dry_run {
        PurgeOutcome {
            users: count_eligible(&target, config.action, cutoff).await?,
            skipped_locked: 0,
            batches: 0,
        }
    } else {
        let statement = batch_statement(config.action, tables.primary_email_channel);
        let mut outcome = run_batches(&target, &statement, cutoff, config.batch_size).await?;
        outcome.skipped_locked = count_eligible(&target, config.action, cutoff).await?;
        outcome
    };
    let (verb, what) = match config.action {
        PurgeAction::Delete => ("removed", ""),
        PurgeAction::Scrub => (
            "scrubbed",
            " (raw_json kept only id and signed_up_at_millis)",
        ),
    };
    if config.dry_run {
        println!(
            "dry run: {} users soft-deleted before {} would be {verb}{what}; nothing changed",
            outcome.users,
            Rfc3339(cutoff)
        );
    } else {
        println!(
            "{verb} {} users soft-deleted before {} in {} batch{}{what}",
            outcome.users,
            Rfc3339(cutoff),
            outcome.batches,
            if outcome.batches == 1 { "" } else { "es" }
        );
        if outcome.skipped_locked > 0 {
            println!(
                "{} more were locked by other transactions and skipped: run purge again later",
                outcome.skipped_locked
            );
        }
    }
    Ok(outcome)
}

/// Refuses before anything is deleted (or counted, in a dry run, which would otherwise promise
/// a purge that cannot happen) when the role may not hard-delete: the role scripts grant
/// DELETE only on request.
async fn check_delete_granted(target: &Client) -> Result<(), Error> {
    let row = target
        .query_one(
            "SELECT has_table_privilege('neon_auth.users_sync', 'DELETE'), current_user::text",
            &[],
        )
        .await
        .map_err(ApplyError::sql("checking the right to delete users"))?;
    if row.get(0) {
        return Ok(());
    }
    let role: String = row.get(1);
    Err(ApplyError::DeleteNotGranted {
        role: escape_identifier(&role),
    }
    .into())
}

/// One short transaction per batch, until a batch finds fewer rows than it may take.
async fn run_batches(
    target: &Client,
    statement: &str,
    cutoff: DateTime<Utc>,
    batch_size: i64,
) -> Result<PurgeOutcome, Error> {
    let statement = target
        .prepare(statement)
        .await
        .map_err(ApplyError::sql("preparing the purge"))?;
    let mut outcome = PurgeOutcome {
        users: 0,
        skipped_locked: 0,
        batches: 0,
    };
    loop {
        // Each statement commits on its own (autocommit): one batch, one short transaction.
        let done = target
            .execute(&statement, &[&cutoff, &batch_size])
            .await
            .map_err(ApplyError::sql("purging a batch of users"))?;
        outcome.users += done;
        if done > 0 {
            outcome.batches += 1;
            tracing::info!(users = done, total = outcome.users, "purge batch committed");
        }
        if done < batch_size as u64 {
            return Ok(outcome);
        }
        tokio::time::sleep(PAUSE_BETWEEN_BATCHES).await;
    }
}

async fn count_eligible(
    target: &Client,
    action: PurgeAction,
    cutoff: DateTime<Utc>,
) -> Result<u64, Error> {
    let n: i64 = target
        .query_one(
            &format!(
                "SELECT count(*) FROM neon_auth.users_sync WHERE {}",
                eligible(action)
            ),
            &[&cutoff],
        )
        .await
        .map_err(ApplyError::sql("counting the users to purge"))?
        .get(0);
    Ok(n as u64)
}
