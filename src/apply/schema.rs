//! The target's tables: created when absent, checked when present, never altered.
//!
//! App developers join to `neon_auth.users_sync` with foreign keys, so usersync must not
//! change its shape. Neon's own DDL is in `sql/users_sync.sql`; variants exist in the wild
//! (older tables without `updated_at`), so the shape is read from the catalog and the
//! statements adapt where that is safe.

use tokio_postgres::Client;

use super::ApplyError;

/// Neon's DDL for the users table, applied only when the table does not exist.
const USERS_SYNC_DDL: &str = include_str!("../../sql/users_sync.sql");
/// usersync's own checkpoint table.
const STATE_DDL: &str = include_str!("../../sql/usersync_state.sql");
/// What an older usersync's checkpoint table lacks.
const STATE_UPGRADE: &str = include_str!("../../sql/usersync_state_upgrade.sql");

/// What the existing `neon_auth.users_sync` can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetShape {
    pub has_updated_at: bool,
}

/// The live users of `neon_auth.users_sync` (as `u`, with their record in
/// `usersync.primary_email_channel` as `r`, LEFT JOINed) whose primary email channel the
/// target does not know: a Stack Auth user showing an email with no record, or a record with
/// no channel. The one definition `status` counts, `setup` counts and fills, and
/// `sql/usersync_state_upgrade.sql` marks unknown, so that they never disagree about which users
/// need what: a user soft-deleted or showing no email needs no channel (a clear changes
/// nothing on it), and only the stack-auth profile writes `primary_email_auth_enabled`.
pub const UNKNOWN_PRIMARY_EMAIL_CHANNELS: &str = "
neon_auth.users_sync u
LEFT JOIN usersync.primary_email_channel r ON r.user_id = u.id
WHERE u.deleted_at IS NULL AND u.raw_json ->> 'primary_email' IS NOT NULL
  AND u.raw_json ? 'primary_email_auth_enabled' AND r.channel_id IS NULL";

/// Counts [`UNKNOWN_PRIMARY_EMAIL_CHANNELS`]; the caller knows the table exists.
pub async fn count_unknown_primary_email_channels(client: &Client) -> Result<i64, ApplyError> {
    Ok(client
        .query_one(
            &format!("SELECT count(*) FROM {UNKNOWN_PRIMARY_EMAIL_CHANNELS}"),
            &[],
        )
        .await
        .map_err(ApplyError::sql("counting unknown primary email channels"))?
        .get(0))
}

/// Whether setup found or made the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    Found,
}

/// Which of the tables usersync works with exist on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetTables {
    /// `neon_auth.users_sync`.
    pub users_sync: bool,
    /// `usersync.state`, the checkpoint table.
    pub state: bool,
    /// `usersync.primary_email_channel` (Stack Auth). Looked up here, in its own query,
    /// because a query that names it fails to parse when it is absent, whatever a
    /// `CASE WHEN to_regclass(...)` around the name says.
    pub primary_email_channel: bool,
}

/// Looks the tables up without touching them.
pub async fn target_tables(client: &Client) -> Result<TargetTables, ApplyError> {
    let row = client
        .query_one(
            "SELECT to_regclass('neon_auth.users_sync') IS NOT NULL,
                    to_regclass('usersync.state') IS NOT NULL,
                    to_regclass('usersync.primary_email_channel') IS NOT NULL",
            &[],
        )
        .await
        .map_err(ApplyError::sql("looking for the target tables"))?;
    Ok(TargetTables {
        users_sync: row.get(0),
        state: row.get(1),
        primary_email_channel: row.get(2),
    })
}

/// Creates what is missing and checks what exists.
pub async fn ensure_target_schema(client: &Client) -> Result<(TargetShape, Created), ApplyError> {
    let created = if target_tables(client).await?.users_sync {
        Created::Found
    } else {
        client
            .batch_execute(USERS_SYNC_DDL)
            .await
            .map_err(ApplyError::sql("creating neon_auth.users_sync"))?;
        Created::Created
    };
    client
        .batch_execute(STATE_DDL)
        .await
        .map_err(ApplyError::sql("creating the usersync schema"))?;
    upgrade_state(client).await?;
    Ok((check_shape(client).await?, created))
}

/// Adds to `usersync.state` what this version needs and an older one did not create, so
/// that a new binary resumes without a manual step; a no-op once done.
///
/// One query string is one implicit transaction, so the `SET LOCAL` bounds only the wait for
/// the table's exclusive lock: behind a transaction that holds the table (someone's open
/// `SELECT`), the ALTER would otherwise queue every other use of the table behind it, and
/// its backend would go on waiting after the client gave up. A timeout is retried.
pub async fn upgrade_state(client: &Client) -> Result<(), ApplyError> {
    client
        .batch_execute(&format!("SET LOCAL lock_timeout = '5s';\n{STATE_UPGRADE}"))
        .await
        .map_err(ApplyError::sql(
            "upgrading usersync's tables to this version (adding a column to usersync.state \
             needs the table's owner, and creating usersync.primary_email_channel needs CREATE \
             on schema usersync: run sql/target_role.sql again, which makes the target role \
             own schema usersync, usersync.state and usersync.primary_email_channel; or, as \
             their owner, ALTER TABLE usersync.state OWNER TO the target role, and the same \
             for usersync.primary_email_channel if it exists)",
        ))
}

/// Reads the shape of `neon_auth.users_sync` and refuses one usersync cannot write.
pub async fn check_shape(client: &Client) -> Result<TargetShape, ApplyError> {
    let rows = client
        .query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
               FROM pg_attribute a
              WHERE a.attrelid = 'neon_auth.users_sync'::regclass
                AND a.attnum > 0 AND NOT a.attisdropped",
            &[],
        )
        .await
        .map_err(ApplyError::sql(
            "reading the columns of neon_auth.users_sync",
        ))?;
    let column = |name: &str| {
        rows.iter()
            .find(|row| row.get::<_, &str>(0) == name)
            .map(|row| (row.get::<_, String>(1), row.get::<_, bool>(2)))
    };
    let require = |name: &str, wanted: &str| -> Result<(), ApplyError> {
        match column(name) {
            Some((ty, false)) if ty == wanted => Ok(()),
            Some((ty, generated)) => Err(ApplyError::Shape(format!(
                "neon_auth.users_sync.{name} is {ty}{} but usersync writes it as {wanted}; \
                 fix the column or let usersync create the table (drop it on a fresh target)",
                if generated { " (generated)" } else { "" }
            ))),
            None => Err(ApplyError::Shape(format!(
                "neon_auth.users_sync has no column {name}; usersync needs a writable \
                 {name} {wanted} column (see sql/users_sync.sql for Neon's definition)"
            ))),
        }
    };
    require("raw_json", "jsonb")?;
    require("deleted_at", "timestamp with time zone")?;
    let has_updated_at = match column("updated_at") {
        None => false,
        Some(_) => {
            require("updated_at", "timestamp with time zone")?;
            true
        }
    };
    match column("id") {
        Some((ty, true)) if ty == "text" => {}
        _ => {
            return Err(ApplyError::Shape(
                "neon_auth.users_sync.id must be text GENERATED ALWAYS AS (raw_json ->> 'id'), \
                 as Neon defines it; usersync derives the id from raw_json"
                    .into(),
            ))
        }
    }
    let id_unique: bool = client
        .query_one(
            "SELECT EXISTS (
                SELECT 1 FROM pg_index i
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = 'neon_auth.users_sync'::regclass
                   AND i.indisunique AND i.indnatts = 1 AND a.attname = 'id'
                   AND i.indpred IS NULL)",
            &[],
        )
        .await
        .map_err(ApplyError::sql(
            "reading the indexes of neon_auth.users_sync",
        ))?
        .get(0);
    if !id_unique {
        return Err(ApplyError::Shape(
            "neon_auth.users_sync has no primary key or unique index on id; usersync upserts \
             by id: ALTER TABLE neon_auth.users_sync ADD PRIMARY KEY (id)"
                .into(),
        ));
    }
    Ok(TargetShape { has_updated_at })
}
