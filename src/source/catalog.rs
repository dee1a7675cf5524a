//! What usersync needs to know and manage on the source through ordinary SQL: settings,
//! the replicated table, privileges, the publication and the slot.

use postgres_protocol::escape::escape_identifier;
use tokio_postgres::Client;

use super::SourceError;
use crate::config::TableName;
use crate::decode::RelationColumn;
use crate::lsn::Lsn;
use crate::map::{keycloak, KeycloakMapping, Profile};

/// `pg_replication_slots` as far as usersync cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot risks being lost; `None` when
    /// `max_slot_wal_keep_size` is unlimited (PostgreSQL 13+).
    pub safe_wal_size: Option<i64>,
    /// Why the server invalidated the slot (PostgreSQL 17+: `wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`; 18 adds `idle_timeout`); `None` while it is valid, and
    /// always before 17.
    pub invalidation_reason: Option<String>,
}

impl SlotInfo {
    /// Whether the server gave up on the slot: it cannot stream the changes it held, and
    /// only a new slot and a new copy bring the target back.
    pub fn is_invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }

    /// What became of an invalidated slot, for messages that follow "replication slot X".
    pub fn invalidation(&self) -> String {
        describe_invalidation(self.invalidation_reason.as_deref())
    }

    /// WAL not yet confirmed by the slot's consumer at `current`: `current − confirmed_flush_lsn`.
    pub fn pending_bytes(&self, current: Lsn) -> Option<u64> {
        self.confirmed_flush_lsn
            .map(|confirmed| current.0.saturating_sub(confirmed.0))
    }

    /// WAL the server keeps for the slot at `current`: `current − restart_lsn`.
    pub fn retained_bytes(&self, current: Lsn) -> Option<u64> {
        self.restart_lsn
            .map(|restart| current.0.saturating_sub(restart.0))
    }
}

/// What became of an invalidated slot, from `invalidation_reason` (`None` before 17), for
/// messages that follow "replication slot X".
pub fn describe_invalidation(reason: Option<&str>) -> String {
    match reason {
        None | Some("wal_removed") => "has lost WAL it still needed (wal_status lost)".into(),
        Some("idle_timeout") => "was invalidated by the server for being inactive longer than \
                                 idle_replication_slot_timeout (invalidation_reason idle_timeout)"
            .into(),
        Some("rows_removed") => "was invalidated by the server because rows it needed were \
                                 removed (invalidation_reason rows_removed)"
            .into(),
        Some("wal_level_insufficient") => "was invalidated by the server because wal_level is \
                                           below logical (invalidation_reason \
                                           wal_level_insufficient)"
            .into(),
        Some(other) => format!(
            "was invalidated by the server (invalidation_reason {})",
            other.escape_default()
        ),
    }
}

/// Checks that the source can do logical decoding at all.
pub async fn check_wal_level(client: &Client) -> Result<(), SourceError> {
    let level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(SourceError::sql("reading wal_level"))?
        .get(0);
    if level != "logical" {
        return Err(SourceError::Definite(format!(
            "the source has wal_level={level}, but logical replication needs wal_level=logical: \
             run ALTER SYSTEM SET wal_level = logical and restart the server (on Neon: enable \
             logical replication in the project settings)"
        )));
    }
    Ok(())
}

/// Checks that the role may replicate and read the table, and that the table can be
/// replicated: it exists, and updates and deletes carry a usable key.
pub async fn check_table(client: &Client, table: &TableName) -> Result<(), SourceError> {
    let row = client
        .query_opt(
            "SELECT c.relreplident::text, c.relkind::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    has_table_privilege(c.oid, 'SELECT')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(SourceError::sql("looking up the source table"))?;
    let Some(row) = row else {
        return Err(SourceError::Definite(format!(
            "the source has no table {table}; set --table SCHEMA.NAME (USERSYNC_TABLE) to the \
             users table"
        )));
    };
    let (identity, kind, has_pk, can_select): (String, String, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if kind != "r" && kind != "p" {
        return Err(SourceError::Definite(format!(
            "{table} is not a table (relkind {kind}); logical replication publishes tables only"
        )));
    }
    if !can_select {
        return Err(SourceError::Definite(format!(
            "the source role may not read {table}: GRANT SELECT ON {} TO <role>",
            table.quoted()
        )));
    }
    match identity.as_str() {
        "d" if !has_pk => Err(SourceError::Definite(format!(
            "{table} has no primary key, so its updates and deletes carry no key to replicate; \
             add one, or run ALTER TABLE {} REPLICA IDENTITY FULL",
            table.quoted()
        ))),
        "n" => Err(SourceError::Definite(format!(
            "{table} has REPLICA IDENTITY NOTHING, so deletes cannot be replicated; run ALTER \
             TABLE {} REPLICA IDENTITY DEFAULT (with a primary key) or FULL",
            table.quoted()
        ))),
        _ => Ok(()),
    }
}

/// Checks that the role may use a replication connection.
pub async fn check_replication_privilege(client: &Client) -> Result<(), SourceError> {
    let allowed: bool = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(SourceError::sql("reading the role's privileges"))?
        .get(0);
    if !allowed {
        return Err(SourceError::Definite(
            "the source role lacks the REPLICATION attribute: ALTER ROLE <role> REPLICATION \
             (on Neon, roles created in the console have it once logical replication is on)"
                .into(),
        ));
    }
    Ok(())
}

/// The table's columns as a Relation message would describe them, so the mapping can be
/// checked before any change streams. Generated columns are left out, as pgoutput leaves
/// them out of its Relation messages.
pub async fn table_columns(
    source: &Client,
    table: &TableName,
) -> Result<Vec<RelationColumn>, SourceError> {
    let rows = source
        .query(
            // A column is a key when the replica identity includes it: all columns for FULL,
            // the chosen index for USING INDEX, the primary key for DEFAULT.
            "SELECT a.attname::text, a.atttypid::oid, a.atttypmod,
                    CASE c.relreplident
                      WHEN 'f' THEN true
                      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                                               AND i.indisreplident AND a.attnum = ANY (i.indkey))
                      WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                                               AND i.indisprimary AND a.attnum = ANY (i.indkey))
                      ELSE false
                    END
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid
              WHERE n.nspname = $1 AND c.relname = $2
                AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(SourceError::sql("reading the source table's columns"))?;
    Ok(rows
        .iter()
        .map(|row| RelationColumn {
            name: row.get(0),
            type_oid: row.get(1),
            type_modifier: row.get(2),
            is_key: row.get(3),
        })
        .collect())
}

/// Reads the slot's row, if the slot exists.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            // to_jsonb: invalidation_reason exists from PostgreSQL 17 only.
            "SELECT plugin::text, database::text, active, active_pid,
                    confirmed_flush_lsn::text, restart_lsn::text, wal_status, safe_wal_size,
                    to_jsonb(s) ->> 'invalidation_reason'
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::sql("looking up the replication slot"))?;
    Ok(row.map(|row| SlotInfo {
        plugin: row.get(0),
        database: row.get(1),
        active: row.get(2),
        active_pid: row.get(3),
        confirmed_flush_lsn: row.get::<_, Option<&str>>(4).and_then(|v| v.parse().ok()),
        restart_lsn: row.get::<_, Option<&str>>(5).and_then(|v| v.parse().ok()),
        wal_status: row.get(6),
        safe_wal_size: row.get(7),
        invalidation_reason: row.get(8),
    }))
}

/// Whether the slot is a failover slot (PostgreSQL 17+; always false before).
pub async fn slot_is_failover(client: &Client, slot: &str) -> Result<bool, SourceError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(SourceError::sql("reading the server version"))?
        .get(0);
    if version < 170_000 {
        return Ok(false);
    }
    let row = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::sql("reading the slot's failover flag"))?;
    Ok(row.is_some_and(|row| row.get(0)))
}

/// Drops the slot; fails with the holder's pid when a process is streaming from it.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(SourceError::sql("dropping the replication slot"))?;
    Ok(())
}

/// Drops the publication if it exists.
/// The owner of `publication`, and whether this session may drop it (is, or has the
/// privileges of, that role); `None` when there is no such publication.
pub async fn publication_owner(
    client: &Client,
    publication: &str,
) -> Result<Option<(String, bool)>, SourceError> {
    let row = client
        .query_opt(
            "SELECT pubowner::regrole::text, pg_has_role(current_user, pubowner, 'USAGE')
               FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(SourceError::sql("looking up the publication's owner"))?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

pub async fn drop_publication(client: &Client, publication: &str) -> Result<(), SourceError> {
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            escape_identifier(publication)
        ))
        .await
        .map_err(SourceError::sql("dropping the publication"))
}

/// The columns of `table`'s primary key, in the key's order, each with its type as
/// `format_type` spells it; empty without a primary key. A route's online copy reads the
/// table in the key's order, in chunks after the last key read (see
/// `replicator::backfill`).
pub async fn primary_key(
    client: &Client,
    table: &TableName,
) -> Result<Vec<(String, String)>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = (SELECT c.oid FROM pg_class c
                                    JOIN pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname = $1 AND c.relname = $2)
                AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(SourceError::sql("reading the source table's primary key"))?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The source's current WAL position, to show how far a slot is behind.
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn, SourceError> {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(SourceError::sql("reading the current WAL position"))?
        .get(0);
    text.parse()
        .map_err(|_| SourceError::Definite(format!("the source reported an invalid LSN {text:?}")))
}

/// The profile completed with what only the source knows. For Keycloak, that is the id of the
/// realm `--realm` names: user rows carry the realm's id (a UUID for realms created in the
/// admin console), while people know realms by name. A realm that cannot be resolved is
/// refused: taken as an id that no user has, it would make every user of the realm "another
/// realm's", so the copy would take none and each update would soft-delete one (or, with
/// REPLICA IDENTITY FULL, be dropped while the slot moves past it).
pub async fn resolve_profile(
    client: &Client,
    table: &TableName,
    profile: &Profile,
) -> Result<Profile, SourceError> {
    let Profile::Keycloak(mapping) = profile else {
        return Ok(profile.clone());
    };
    let realm_table = TableName {
        schema: table.schema.clone(),
        name: keycloak::REALM_TABLE.to_owned(),
    };
    let readable: Option<bool> = client
        .query_opt(
            "SELECT has_table_privilege(c.oid, 'SELECT')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&realm_table.schema, &realm_table.name],
        )
        .await
        .map_err(SourceError::sql("looking up Keycloak's realm table"))?
        .map(|row| row.get(0));
    if readable != Some(true) {
        return realm_given_as_id(client, table, &realm_table, readable.is_some(), mapping).await;
    }
    let realms: Vec<(String, String)> = client
        .query(
            &format!(
                "SELECT id, name FROM {} ORDER BY name",
                realm_table.quoted()
            ),
            &[],
        )
        .await
        .map_err(SourceError::sql("reading Keycloak's realms"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let wanted = &mapping.realm;
    let found = realms
        .iter()
        .find(|(id, _)| id == wanted)
        .or_else(|| realms.iter().find(|(_, name)| name == wanted));
    match found {
        Some((id, _)) => Ok(Profile::Keycloak(KeycloakMapping {
            realm_id: Some(id.clone()),
            ..mapping.clone()
        })),
        None => {
            let known: Vec<String> = realms
                .iter()
                .map(|(id, name)| format!("{name} (id {id})"))
                .collect();
            Err(SourceError::Definite(format!(
                "Keycloak has no realm {wanted:?} (by name or id); its realms are: {}; \
                 set --realm (USERSYNC_REALM) to one of them",
                known.join(", ")
            )))
        }
    }
}

/// Without Keycloak's realm table to look names up in, `--realm` is usable only as an id that
/// users carry (`user_entity.realm_id`); anything else is refused with the grant to run.
async fn realm_given_as_id(
    client: &Client,
    table: &TableName,
    realm_table: &TableName,
    realm_table_exists: bool,
    mapping: &KeycloakMapping,
) -> Result<Profile, SourceError> {
    // The users table must be readable anyway; its own check says how.
    check_table(client, table).await?;
    let carried: bool = client
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE realm_id = $1::text)",
                table.quoted()
            ),
            &[&mapping.realm],
        )
        .await
        .map_err(SourceError::sql(
            "looking for the realm id among Keycloak's users",
        ))?
        .get(0);
    if carried {
        tracing::info!(
            table = %realm_table,
            "Keycloak's realm table cannot be read; --realm is a realm id its users carry"
        );
        return Ok(Profile::Keycloak(KeycloakMapping {
            realm_id: Some(mapping.realm.clone()),
            ..mapping.clone()
        }));
    }
    let why = if realm_table_exists {
        format!("the source role may not read {realm_table}, where realm names are looked up")
    } else {
        format!("the source has no table {realm_table}, where Keycloak keeps its realms")
    };
    Err(SourceError::Definite(format!(
        "cannot tell which Keycloak realm --realm {:?} is: {why}, and no user in {table} has \
         realm_id {:?}; GRANT SELECT ON {} TO <usersync's source role> (sql/source_role.sql \
         with -v profile=keycloak does), or set --realm (USERSYNC_REALM) to the realm's id",
        mapping.realm,
        mapping.realm,
        realm_table.quoted()
    )))
}

/// The source's system identifier over plain SQL: the same value `IDENTIFY_SYSTEM` reports
/// on a replication connection, and the one a checkpoint records.
pub async fn system_identifier(client: &Client) -> Result<String, SourceError> {
    Ok(client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(SourceError::sql("reading the system identifier"))?
        .get(0))
}

/// The lag the source server measured for the walsender with this pid
/// (`pg_stat_replication.flush_lag`): time from sending a commit to the consumer confirming
/// it flushed. `None` when the server has no measurement (it clears it once the consumer has
/// confirmed everything sent), or when the role may not see that walsender's statistics.
pub async fn walsender_flush_lag(
    client: &Client,
    pid: i32,
) -> Result<Option<std::time::Duration>, SourceError> {
    let row = client
        .query_opt(
            "SELECT extract(epoch FROM flush_lag)::float8 FROM pg_stat_replication WHERE pid = $1",
            &[&pid],
        )
        .await
        .map_err(SourceError::sql("reading pg_stat_replication"))?;
    Ok(row
        .and_then(|row| row.get::<_, Option<f64>>(0))
        .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds).ok()))
}
