//! The `stack-auth` profile: Stack Auth's `"ProjectUser"` and `"ContactChannel"` tables.
//!
//! | column                                   | `raw_json` key               |
//! |------------------------------------------|------------------------------|
//! | `"ProjectUser"."projectUserId"` (uuid)   | `id`                         |
//! | `"displayName"`                          | `display_name`               |
//! | `"createdAt"`                            | `signed_up_at_millis`        |
//! | `"profileImageUrl"`                      | `profile_image_url`          |
//! | `"clientMetadata"`                       | `client_metadata`            |
//! | `"clientReadOnlyMetadata"`               | `client_read_only_metadata`  |
//! | `"serverMetadata"`                       | `server_metadata`            |
//! | `"ContactChannel".value`                 | `primary_email`              |
//! | `"ContactChannel"."isVerified"`          | `primary_email_verified`     |
//! | `"ContactChannel"."usedForAuth"` = TRUE  | `primary_email_auth_enabled` |
//!
//! of the user's contact channel with `type = 'EMAIL'` and `"isPrimary" = 'TRUE'` (Prisma's
//! `BooleanTrue` enum: `TRUE` or NULL, so a unique index allows one primary per user and type).
//!
//! **Two tables, one target row.** A `"ProjectUser"` row carries no email, so its update
//! leaves the three email keys to the target (as unchanged TOAST does), and its insert sets
//! them to "none yet": the foreign key from `"ContactChannel"` means no channel can exist
//! before its user. A contact channel change maps to a [`RowOutcome::Patch`] of the three
//! keys for its user; batch and apply merge it into an upsert pending in the same batch, or
//! into the row on the target (`raw_json || patch`), never touching `deleted_at`. A channel
//! that stops being the primary email (deleted, or `"isPrimary"` cleared) clears the keys.
//!
//! **Which channel was the primary email.** A deleted channel, or one updated so that it is
//! no longer the primary email, says whether it *was* only with its old row, which the source
//! sends under `REPLICA IDENTITY FULL` alone. That is an `ALTER TABLE` on a schema Stack Auth's
//! migrations own, and it grows the WAL, so it is not required: the target keeps, in
//! `usersync.primary_email_channel` (see `sql/usersync_state.sql`), the id of the channel each
//! user's email keys come from, written with those keys ([`RowOutcome::Patch`]'s `from`). A
//! channel that went away known by its key only (the default replica identity, the primary
//! key `"tenancyId", "projectUserId", id`) becomes a [`RowOutcome::ClearPartIf`]: the target
//! clears the keys if it recorded that channel. Under FULL the old row decides, as before, and
//! the record is kept right all the same (switching to FULL on PostgreSQL 15+ needs the
//! publication's column list off first: see `docs/profiles.md`).
//!
//! **Hard deletes.** Stack Auth deletes users; the foreign key cascades to their contact
//! channels in the same transaction, after the user's own delete. The user is soft-deleted,
//! and a patch for a user already deleted in the batch is dropped, so the target keeps one
//! soft-deleted user with its last email. An application that deletes the channels first,
//! then the user, in one transaction gets the same: the clearing patch ([`RowMapper::removed`])
//! is undone by the user's delete that follows it (see `apply::batch`).
//!
//! **Tenancies.** One database holds every project (tenancy). `--tenancy-id` replicates one:
//! rows of other tenancies are skipped, here and (PostgreSQL 15+) by the publication's row
//! filter. `"tenancyId"` is in both primary keys, so it is in every old key tuple as well.

use postgres_protocol::escape::{escape_identifier, escape_literal};
use serde_json::{Map, Value};

use super::columns::{
    is_credential, BoundColumn, ColumnNeed, OtherColumns, Relation, RowLayout, UserJson,
};
use super::profile::{map_unless_skipped, Gone, MappingPlan, RowMapper, RowOutcome, SkipReason};
use super::selection::ColumnSelection;
use super::value::{self, oid};
use super::{key, MapError};
use crate::config::TableName;
use crate::decode::{ColumnValue, RelationColumn, TupleData};

/// Stack Auth's Prisma schema names tables after its models, in the default schema.
pub const DEFAULT_TABLE: &str = "public.ProjectUser";
/// The contact channel table, in the users table's schema.
pub const CONTACT_CHANNEL_TABLE: &str = "ContactChannel";

/// `"ContactChannel"` beside the users table `users_table`.
pub fn contact_channel_table(users_table: &TableName) -> TableName {
    TableName {
        schema: users_table.schema.clone(),
        name: CONTACT_CHANNEL_TABLE.to_owned(),
    }
}
const PROFILE: &str = "stack-auth";

/// Prisma's `BooleanTrue` enum has this one value; NULL means false.
const BOOLEAN_TRUE: &str = "TRUE";
/// `ContactChannelType` for an email address (the only type Stack Auth has so far).
const EMAIL_TYPE: &str = "EMAIL";

/// The keys a contact channel sets; a user row leaves them alone.
pub(crate) const EMAIL_KEYS: [&str; 3] = [
    key::PRIMARY_EMAIL,
    key::PRIMARY_EMAIL_VERIFIED,
    key::PRIMARY_EMAIL_AUTH_ENABLED,
];

/// Columns the initial copy appends to each `"ProjectUser"` row (the primary email channel's
/// `value`, `"isVerified"`, `"usedForAuth"` and `id`), see [`StackAuthMapping::snapshot_select`].
pub const JOINED_EMAIL_COLUMNS: usize = 4;

const JSON_TYPES: (&[u32], &str) = (&[oid::JSONB, oid::JSON], "jsonb or json");

const TENANCY_ID: ColumnNeed = ColumnNeed::named(PROFILE, &["tenancyId"]);
const PROJECT_USER_ID: ColumnNeed = ColumnNeed::named(PROFILE, &["projectUserId"]);
const DISPLAY_NAME: ColumnNeed = ColumnNeed::named(PROFILE, &["displayName"]);
const CREATED_AT: ColumnNeed = ColumnNeed::typed(
    PROFILE,
    &["createdAt"],
    (value::MILLIS_TYPES, "a timestamp"),
);
const PROFILE_IMAGE_URL: ColumnNeed = ColumnNeed::named(PROFILE, &["profileImageUrl"]);
const CLIENT_METADATA: ColumnNeed = ColumnNeed::typed(PROFILE, &["clientMetadata"], JSON_TYPES);
const CLIENT_READ_ONLY_METADATA: ColumnNeed =
    ColumnNeed::typed(PROFILE, &["clientReadOnlyMetadata"], JSON_TYPES);
const SERVER_METADATA: ColumnNeed = ColumnNeed::typed(PROFILE, &["serverMetadata"], JSON_TYPES);

const CHANNEL_TYPE: ColumnNeed = ColumnNeed::named(PROFILE, &["type"]);
const IS_PRIMARY: ColumnNeed = ColumnNeed::named(PROFILE, &["isPrimary"]);
const USED_FOR_AUTH: ColumnNeed = ColumnNeed::named(PROFILE, &["usedForAuth"]);
const IS_VERIFIED: ColumnNeed = ColumnNeed::typed(
    PROFILE,
    &["isVerified"],
    (value::VERIFIED_TYPES, "a boolean"),
);
const VALUE: ColumnNeed = ColumnNeed::named(PROFILE, &["value"]);
const CHANNEL_ID: ColumnNeed = ColumnNeed::named(PROFILE, &["id"]);

/// The `stack-auth` profile's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackAuthMapping {
    /// Replicate only this tenancy (a uuid, lowercase as PostgreSQL prints it).
    pub tenancy_id: Option<String>,
    /// Which other `"ProjectUser"` columns are copied (`--include-columns`, ...).
    pub columns: ColumnSelection,
}

impl StackAuthMapping {
    /// `("tenancyId" = '…')` when one tenancy is replicated.
    pub fn row_filter(&self) -> Option<String> {
        self.tenancy_id
            .as_deref()
            .map(|tenancy| format!("(\"tenancyId\" = {})", escape_literal(tenancy)))
    }

    /// The users with their primary email: `"ProjectUser"`'s columns, then the primary email
    /// channel's `value`, `"isVerified"`, `"usedForAuth"` and `id` (NULL when the user has
    /// none); the id is what the target records as the channel the email comes from.
    pub fn snapshot_select(
        &self,
        users_table: &TableName,
        columns: &[RelationColumn],
        only: Option<&str>,
    ) -> String {
        let list = columns
            .iter()
            .map(|column| format!("u.{}", escape_identifier(&column.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let channels = contact_channel_table(users_table);
        let conditions: Vec<String> = self
            .tenancy_id
            .as_deref()
            .map(|tenancy| format!("u.\"tenancyId\" = {}", escape_literal(tenancy)))
            .into_iter()
            .chain(only.map(str::to_owned))
            .collect();
        let only_tenancy = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        format!(
            "SELECT {list}, c.value, c.\"isVerified\", c.\"usedForAuth\", c.id::text \
               FROM {} u LEFT JOIN {} c \
                 ON c.\"tenancyId\" = u.\"tenancyId\" AND c.\"projectUserId\" = u.\"projectUserId\" \
                AND c.type = {} AND c.\"isPrimary\" = {}{only_tenancy}",
            users_table.quoted(),
            channels.quoted(),
            escape_literal(EMAIL_TYPE),
            escape_literal(BOOLEAN_TRUE),
        )
    }

    /// Every primary email channel now, as (user id, channel id) text: what `setup` records
    /// for the users whose channel the target does not know (see `commands::setup`).
    pub fn primary_channels_select(&self, users_table: &TableName) -> String {
        let channels = contact_channel_table(users_table);
        let only_tenancy = self
            .tenancy_id
            .as_deref()
            .map(|tenancy| format!(" AND \"tenancyId\" = {}", escape_literal(tenancy)))
            .unwrap_or_default();
        format!(
            "SELECT \"projectUserId\"::text, id::text FROM {} \
              WHERE type = {} AND \"isPrimary\" = {}{only_tenancy}",
            channels.quoted(),
            escape_literal(EMAIL_TYPE),
            escape_literal(BOOLEAN_TRUE),
        )
    }

    /// `--tenancy-id` with the `"tenancyId"` column of the table being bound.
    fn tenancy(&self, column: BoundColumn) -> Tenancy {
        Tenancy {
            wanted: self.tenancy_id.clone(),
            column,
        }
    }

    pub fn bind(&self, columns: &[RelationColumn]) -> Result<BoundProjectUser, MapError> {
        let relation = Relation::new(columns);
        let tenancy_id = relation.require(&TENANCY_ID)?;
        let id = relation.require_id(&PROJECT_USER_ID)?;
        let display_name = relation.require(&DISPLAY_NAME)?;
        let created_at = relation.require(&CREATED_AT)?;
        let profile_image_url = relation.require(&PROFILE_IMAGE_URL)?;
        let client_metadata = relation.require(&CLIENT_METADATA)?;
        let client_read_only_metadata = relation.require(&CLIENT_READ_ONLY_METADATA)?;
        let server_metadata = relation.require(&SERVER_METADATA)?;
        if self.tenancy_id.is_some() && !relation.is_key(&tenancy_id) {
            // Only then can a deleted row be told to be of another tenancy.
            return Err(MapError::IdNotInReplicaIdentity {
                column: tenancy_id.name,
            });
        }

        let mut notes = Vec::new();
        let other = OtherColumns::bind(
            &relation,
            &[
                &id,
                &display_name,
                &created_at,
                &profile_image_url,
                &client_metadata,
                &client_read_only_metadata,
                &server_metadata,
            ],
            is_credential,
            &[key::STACK_AUTH.as_slice(), &EMAIL_KEYS].concat(),
            &self.columns,
            &mut notes,
        )?;
        Ok(BoundProjectUser {
            layout: relation.layout(id),
            tenancy: self.tenancy(tenancy_id),
            display_name,
            created_at,
            profile_image_url,
            client_metadata,
            client_read_only_metadata,
            server_metadata,
            other,
            notes,
        })
    }

    pub fn bind_contact_channel(
        &self,
        columns: &[RelationColumn],
    ) -> Result<BoundContactChannel, MapError> {
        let relation = Relation::new(columns);
        // The generic advice (another index, --id-column) does not fit a table Stack Auth's
        // migrations own: its primary key is the identity it needs.
        let require_key = |need| {
            relation.require_id(need).map_err(|error| match error {
                MapError::IdNotInReplicaIdentity { column } => {
                    MapError::ChannelIdNotInReplicaIdentity { column }
                }
                other => other,
            })
        };
        let tenancy_id = relation.require(&TENANCY_ID)?;
        let user_id = require_key(&PROJECT_USER_ID)?;
        let channel_type = relation.require(&CHANNEL_TYPE)?;
        let is_primary = relation.require(&IS_PRIMARY)?;
        let used_for_auth = relation.require(&USED_FOR_AUTH)?;
        let is_verified = relation.require(&IS_VERIFIED)?;
        let value = relation.require(&VALUE)?;
        // In the key (the primary key is the default replica identity): a deleted channel
        // is then known by it, and the target's record of the user's primary email channel
        // tells whether it was that one.
        let channel_id = require_key(&CHANNEL_ID)?;
        Ok(BoundContactChannel {
            layout: relation.layout(user_id),
            tenancy: self.tenancy(tenancy_id),
            channel_id,
            channel_type,
            is_primary,
            used_for_auth,
            is_verified,
            value,
        })
    }
}

/// `--tenancy-id` bound to a table's `"tenancyId"` column.
#[derive(Debug, Clone)]
struct Tenancy {
    /// `None`: every tenancy is replicated.
    wanted: Option<String>,
    column: BoundColumn,
}

impl Tenancy {
    /// Whether a row is of a tenancy other than the one replicated. The column is in the
    /// primary key, so a key tuple answers as well as a whole row.
    fn skip(&self, values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        let Some(wanted) = self.wanted.as_deref() else {
            return Ok(None);
        };
        let other = self.column.filter_value(values, "tenancyId")? != Some(wanted);
        Ok(other.then_some(SkipReason::OtherTenancy))
    }

    /// The rule `setup` prints, when one tenancy is replicated.
    fn rule(&self) -> Option<String> {
        self.wanted
            .as_deref()
            .map(|tenancy| format!("{} other than {tenancy}: skipped", self.column.name))
    }
}

/// The three email keys of a primary email channel, or of none.
fn email_keys(email: Value, verified: bool, auth_enabled: bool) -> Map<String, Value> {
    let mut keys = Map::new();
    keys.insert(key::PRIMARY_EMAIL.to_owned(), email);
    keys.insert(
        key::PRIMARY_EMAIL_VERIFIED.to_owned(),
        Value::Bool(verified),
    );
    keys.insert(
        key::PRIMARY_EMAIL_AUTH_ENABLED.to_owned(),
        Value::Bool(auth_enabled),
    );
    keys
}

/// The email keys from a channel's `value`, `"isVerified"` and `"usedForAuth"`; all NULL
/// (no primary email) gives no email.
fn channel_email(
    value: &BoundColumn,
    is_verified: &BoundColumn,
    used_for_auth: &BoundColumn,
    values: &[ColumnValue],
) -> Result<Map<String, Value>, MapError> {
    let email = value.string(values, key::PRIMARY_EMAIL)?.ok_or_else(|| {
        MapError::UnchangedToastFilter {
            column: value.name.clone(),
        }
    })?;
    let verified = match is_verified.filter_value(values, key::PRIMARY_EMAIL_VERIFIED)? {
        Some(text) => value::verified_from_text(is_verified.type_oid, text)
            .map_err(|source| is_verified.error(key::PRIMARY_EMAIL_VERIFIED, source))?,
        None => false,
    };
    let auth_enabled =
        used_for_auth.filter_value(values, key::PRIMARY_EMAIL_AUTH_ENABLED)? == Some(BOOLEAN_TRUE);
    Ok(email_keys(email, verified, auth_enabled))
}

/// Where a user's email keys come from.
enum Emails<'v> {
    /// An update of the user row: the target keeps them.
    Keep,
    /// A new user: no contact channel yet.
    NoneYet,
    /// The initial copy: the joined primary email channel's columns.
    Joined(&'v [ColumnValue]),
}

/// A [`StackAuthMapping`] resolved against `"ProjectUser"`.
#[derive(Debug, Clone)]
pub struct BoundProjectUser {
    layout: RowLayout,
    tenancy: Tenancy,
    display_name: BoundColumn,
    created_at: BoundColumn,
    profile_image_url: BoundColumn,
    client_metadata: BoundColumn,
    client_read_only_metadata: BoundColumn,
    server_metadata: BoundColumn,
    other: OtherColumns,
    notes: Vec<String>,
}

impl BoundProjectUser {
    fn map_user(
        &self,
        id: &str,
        values: &[ColumnValue],
        emails: Emails<'_>,
    ) -> Result<RowOutcome, MapError> {
        let mut user = UserJson::new(id);
        user.set_string(key::DISPLAY_NAME, &self.display_name, values)?;
        user.set_signed_up_at(&self.created_at, values)?;
        // Stack Auth accepts data: URLs here, large enough to be TOASTed.
        user.set_string(key::PROFILE_IMAGE_URL, &self.profile_image_url, values)?;
        for (column, key) in [
            (&self.client_metadata, key::CLIENT_METADATA),
            (
                &self.client_read_only_metadata,
                key::CLIENT_READ_ONLY_METADATA,
            ),
            (&self.server_metadata, key::SERVER_METADATA),
        ] {
            user.set_member(key, column.member(values, key)?);
        }
        match emails {
            Emails::Keep => EMAIL_KEYS.iter().for_each(|key| user.set(key, None)),
            Emails::NoneYet => {
                for (key, value) in email_keys(Value::Null, false, false) {
                    user.set(&key, Some(value));
                }
            }
            Emails::Joined(joined) => {
                let (value, verified, auth, _) = joined_email_columns();
                for (key, value) in channel_email(&value, &verified, &auth, joined)? {
                    user.set(&key, Some(value));
                }
            }
        }
        user.pass_through(&self.other.passthrough, values)?;
        Ok(RowOutcome::User(user.finish(id.to_owned())))
    }
}

impl BoundProjectUser {
    /// A copied row as the user's columns and the joined email columns.
    fn split_copied<'r>(
        &self,
        row: &'r TupleData,
    ) -> Result<(&'r [ColumnValue], &'r [ColumnValue]), MapError> {
        let expected = self.layout.column_count + JOINED_EMAIL_COLUMNS;
        if row.0.len() != expected {
            return Err(MapError::ColumnCount {
                expected,
                actual: row.0.len(),
            });
        }
        Ok(row.0.split_at(self.layout.column_count))
    }
}

/// The email columns a copied row appends, as positions in that tail, the channel's id last.
fn joined_email_columns() -> (BoundColumn, BoundColumn, BoundColumn, BoundColumn) {
    let column = |index: usize, name: &str, type_oid: u32| BoundColumn {
        index,
        name: name.to_owned(),
        type_oid,
    };
    (
        column(0, "value", oid::TEXT),
        column(1, "isVerified", oid::BOOL),
        column(2, "usedForAuth", oid::TEXT),
        column(3, "id", oid::TEXT),
    )
}

impl RowMapper for BoundProjectUser {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn skip(&self, values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        self.tenancy.skip(values)
    }

    /// An update of the user row: the email keys stay as the target has them.
    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError> {
        self.map_user(id, values, Emails::Keep)
    }

    fn map_insert(&self, row: &TupleData) -> Result<RowOutcome, MapError> {
        let values = self.layout.values(row)?;
        map_unless_skipped(self, values, |id| {
            self.map_user(id, values, Emails::NoneYet)
        })
    }

    fn map_copied(&self, row: &TupleData) -> Result<RowOutcome, MapError> {
        let (user, email) = self.split_copied(row)?;
        map_unless_skipped(self, user, |id| {
            self.map_user(id, user, Emails::Joined(email))
        })
    }

    /// The joined channel's id: the target records it with the email it gives.
    fn copied_part_from(&self, row: &TupleData) -> Result<Option<Option<String>>, MapError> {
        let (_, email) = self.split_copied(row)?;
        let (.., channel_id) = joined_email_columns();
        Ok(Some(
            channel_id.filter_value(email, "id")?.map(str::to_owned),
        ))
    }

    /// Only the tenancy skips a user, and it is in the key.
    fn key_skip_reason(&self, key: &TupleData) -> Result<Option<SkipReason>, MapError> {
        self.skip_reason(key)
    }

    fn notes(&self) -> &[String] {
        &self.notes
    }

    fn plan(&self) -> MappingPlan {
        let channel = format!(
            "\"{CONTACT_CHANNEL_TABLE}\" (type = {EMAIL_TYPE}, isPrimary = {BOOLEAN_TRUE})"
        );
        MappingPlan {
            keys: vec![
                (key::ID, self.layout.id.name.clone()),
                (key::DISPLAY_NAME, self.display_name.name.clone()),
                (key::SIGNED_UP_AT_MILLIS, self.created_at.name.clone()),
                (key::PROFILE_IMAGE_URL, self.profile_image_url.name.clone()),
                (key::CLIENT_METADATA, self.client_metadata.name.clone()),
                (
                    key::CLIENT_READ_ONLY_METADATA,
                    self.client_read_only_metadata.name.clone(),
                ),
                (key::SERVER_METADATA, self.server_metadata.name.clone()),
                (key::PRIMARY_EMAIL, format!("{channel}.value")),
                (key::PRIMARY_EMAIL_VERIFIED, format!("{channel}.isVerified")),
                (
                    key::PRIMARY_EMAIL_AUTH_ENABLED,
                    format!("{channel}.usedForAuth = {BOOLEAN_TRUE}"),
                ),
            ],
            passthrough: self.other.passthrough_names(),
            excluded: self.other.excluded.clone(),
            rules: self
                .tenancy
                .rule()
                .into_iter()
                .chain(["a deleted user is soft-deleted (its contact channels with it)".into()])
                .collect(),
        }
    }
}

/// A [`StackAuthMapping`] resolved against `"ContactChannel"`: its rows patch users.
#[derive(Debug, Clone)]
pub struct BoundContactChannel {
    layout: RowLayout,
    tenancy: Tenancy,
    /// The channel's own id, in the replica identity.
    channel_id: BoundColumn,
    channel_type: BoundColumn,
    is_primary: BoundColumn,
    used_for_auth: BoundColumn,
    is_verified: BoundColumn,
    value: BoundColumn,
}

impl RowMapper for BoundContactChannel {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn skip(&self, values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        if let Some(reason) = self.tenancy.skip(values)? {
            return Ok(Some(reason));
        }
        let email = self.channel_type.filter_value(values, "type")? == Some(EMAIL_TYPE);
        let primary = self.is_primary.filter_value(values, "isPrimary")? == Some(BOOLEAN_TRUE);
        Ok((!(email && primary)).then_some(SkipReason::NotPrimaryEmail))
    }

    /// The primary email channel: its email keys patch the user, and the target records
    /// that they come from this channel.
    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError> {
        let keys = channel_email(&self.value, &self.is_verified, &self.used_for_auth, values)?;
        Ok(RowOutcome::Patch {
            id: id.to_owned(),
            keys,
            from: Some(self.channel_id.id_text(values)?.to_owned()),
        })
    }

    fn map_copied(&self, _row: &TupleData) -> Result<RowOutcome, MapError> {
        unreachable!("the initial copy reads contact channels joined to their users")
    }

    /// The key holds the tenancy, but not the type or whether the channel is primary.
    fn key_skip_reason(&self, key: &TupleData) -> Result<Option<SkipReason>, MapError> {
        self.tenancy.skip(self.layout.values(key)?)
    }

    /// Its old row said it was the primary email: the email keys are cleared. Known by its
    /// key only: cleared if the target recorded this channel as the user's primary email.
    fn removed(&self, id: &str, gone: Gone<'_>) -> Result<Option<RowOutcome>, MapError> {
        let keys = email_keys(Value::Null, false, false);
        Ok(Some(match gone {
            Gone::WholeRow => RowOutcome::Patch {
                id: id.to_owned(),
                keys,
                from: None,
            },
            Gone::Key(key) => RowOutcome::ClearPartIf {
                id: id.to_owned(),
                row: self
                    .channel_id
                    .id_text(self.layout.values(key)?)?
                    .to_owned(),
                keys,
            },
        }))
    }

    fn notes(&self) -> &[String] {
        &[]
    }

    fn plan(&self) -> MappingPlan {
        MappingPlan {
            keys: vec![
                (key::ID, self.layout.id.name.clone()),
                (key::PRIMARY_EMAIL, self.value.name.clone()),
                (key::PRIMARY_EMAIL_VERIFIED, self.is_verified.name.clone()),
                (
                    key::PRIMARY_EMAIL_AUTH_ENABLED,
                    format!("{} = {BOOLEAN_TRUE}", self.used_for_auth.name),
                ),
            ],
            passthrough: Vec::new(),
            excluded: vec!["(every other column)".into()],
            rules: self
                .tenancy
                .rule()
                .into_iter()
                .chain([format!(
                    "{} = {EMAIL_TYPE} and {} = {BOOLEAN_TRUE}: sets the user's email keys; \
                     deleted or no longer primary: clears them (primary_email null) if they \
                     came from it (the target records each user's primary email channel in \
                     usersync.primary_email_channel)",
                    self.channel_type.name, self.is_primary.name
                )])
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::map::columns::fixtures::{column, live_user, relation, row_changing, row_of, text};

    const TENANCY: &str = "4f1b2c3d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
    const USER_ID: &str = "0c5b1f1e-8d1e-4f7a-9d7e-3c1f2b4a5d6e";
    const CHANNEL_ID: &str = "9d0c3b4a-1e2f-4a5b-8c7d-6e5f4a3b2c1d";

    /// `"ProjectUser"` as Stack Auth's Prisma migrations create it (enum-free columns).
    fn project_user() -> Vec<RelationColumn> {
        relation(
            &[
                ("tenancyId", oid::UUID),
                ("projectUserId", oid::UUID),
                ("mirroredProjectId", oid::TEXT),
                ("mirroredBranchId", oid::TEXT),
                ("createdAt", oid::TIMESTAMP),
                ("updatedAt", oid::TIMESTAMP),
                ("displayName", oid::TEXT),
                ("serverMetadata", oid::JSONB),
                ("clientReadOnlyMetadata", oid::JSONB),
                ("clientMetadata", oid::JSONB),
                ("profileImageUrl", oid::TEXT),
                ("requiresTotpMfa", oid::BOOL),
                ("totpSecret", oid::BYTEA),
                ("isAnonymous", oid::BOOL),
            ],
            &["tenancyId", "projectUserId"],
        )
    }

    /// `"ContactChannel"` with REPLICA IDENTITY FULL (`full`) or its default, the primary key;
    /// `type`, `isPrimary` and `usedForAuth` are enums (their oids are the database's own).
    fn contact_channel(full: bool) -> Vec<RelationColumn> {
        [
            ("tenancyId", oid::UUID),
            ("projectUserId", oid::UUID),
            ("id", oid::UUID),
            ("createdAt", oid::TIMESTAMP),
            ("updatedAt", oid::TIMESTAMP),
            ("type", 16_400),
            ("isPrimary", 16_401),
            ("usedForAuth", 16_401),
            ("isVerified", oid::BOOL),
            ("value", oid::TEXT),
        ]
        .into_iter()
        .map(|(name, type_oid)| {
            let key = full || ["tenancyId", "projectUserId", "id"].contains(&name);
            column(name, type_oid, key)
        })
        .collect()
    }

    fn ada(extra: &[(&str, ColumnValue)]) -> TupleData {
        row_changing(
            &project_user(),
            &[
                ("tenancyId", text(TENANCY)),
                ("projectUserId", text(USER_ID)),
                ("mirroredProjectId", text("internal")),
                ("mirroredBranchId", text("main")),
                ("createdAt", text("2024-01-02 03:04:05.123")),
                ("updatedAt", text("2024-01-02 03:04:05.123")),
                ("displayName", text("Ada Lovelace")),
                ("serverMetadata", text(r#"{"plan": "pro"}"#)),
                ("clientMetadata", text(r#"{"theme": "dark"}"#)),
                ("profileImageUrl", text("https://example.org/ada.png")),
                ("requiresTotpMfa", text("f")),
                ("totpSecret", text("\\xdeadbeef")),
                ("isAnonymous", text("f")),
            ],
            extra,
        )
    }

    fn channel(extra: &[(&str, ColumnValue)]) -> TupleData {
        row_changing(
            &contact_channel(true),
            &[
                ("tenancyId", text(TENANCY)),
                ("projectUserId", text(USER_ID)),
                ("id", text(CHANNEL_ID)),
                ("type", text("EMAIL")),
                ("isPrimary", text("TRUE")),
                ("usedForAuth", text("TRUE")),
                ("isVerified", text("t")),
                ("value", text("ada@example.org")),
            ],
            extra,
        )
    }

    #[test]
    fn a_new_project_user_has_no_email_yet() {
        let mapping = StackAuthMapping::default().bind(&project_user()).unwrap();
        assert!(mapping.notes().is_empty(), "{:?}", mapping.notes());
        let user = live_user(mapping.map_insert(&ada(&[])).unwrap());
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": USER_ID,
                "display_name": "Ada Lovelace",
                "signed_up_at_millis": 1_704_164_645_123_i64,
                "profile_image_url": "https://example.org/ada.png",
                "client_metadata": {"theme": "dark"},
                "client_read_only_metadata": null,
                "server_metadata": {"plan": "pro"},
                "primary_email": null,
                "primary_email_verified": false,
                "primary_email_auth_enabled": false,
                "tenancyId": TENANCY,
                "mirroredProjectId": "internal",
                "mirroredBranchId": "main",
                "updatedAt": "2024-01-02T03:04:05.123",
                "requiresTotpMfa": false,
                "isAnonymous": false,
            })
        );
        assert!(user.unchanged_keys.is_empty());
        assert_eq!(mapping.plan().excluded, ["totpSecret"]);
    }

    #[test]
    fn an_updated_project_user_leaves_the_email_to_the_target() {
        let mapping = StackAuthMapping::default().bind(&project_user()).unwrap();
        let user = live_user(mapping.map_row(&ada(&[])).unwrap());
        assert!(!user.raw_json.contains_key("primary_email"));
        assert_eq!(user.unchanged_keys, EMAIL_KEYS.map(str::to_owned));
    }

    #[test]
    fn the_copy_takes_the_joined_primary_email() {
        let mapping = StackAuthMapping::default().bind(&project_user()).unwrap();
        let mut row = ada(&[]);
        row.0.extend([
            text("ada@example.org"),
            text("t"),
            ColumnValue::Null,
            text(CHANNEL_ID),
        ]);
        assert_eq!(
            mapping.copied_part_from(&row).unwrap(),
            Some(Some(CHANNEL_ID.to_owned()))
        );
        let copied = live_user(mapping.map_copied(&row).unwrap());
        assert_eq!(copied.raw_json["primary_email"], "ada@example.org");
        assert_eq!(copied.raw_json["primary_email_verified"], true);
        assert_eq!(copied.raw_json["primary_email_auth_enabled"], false);
        let mut without = ada(&[]);
        without.0.extend(std::iter::repeat_n(ColumnValue::Null, 4));
        assert_eq!(mapping.copied_part_from(&without).unwrap(), Some(None));
        let copied = live_user(mapping.map_copied(&without).unwrap());
        assert_eq!(copied.raw_json["primary_email"], Value::Null);
        assert_eq!(copied.raw_json["primary_email_verified"], false);
        assert!(matches!(
            mapping.map_copied(&ada(&[])),
            Err(MapError::ColumnCount { .. })
        ));
    }

    #[test]
    fn the_primary_email_channel_patches_its_user() {
        let mapping = StackAuthMapping::default()
            .bind_contact_channel(&contact_channel(true))
            .unwrap();
        let patch = |outcome| match outcome {
            RowOutcome::Patch { id, keys, from } => {
                assert_eq!(id, USER_ID);
                let mut patch = keys;
                patch.insert("from".into(), from.into());
                Value::Object(patch)
            }
            other => panic!("expected a patch, got {other:?}"),
        };
        assert_eq!(
            patch(mapping.map_row(&channel(&[])).unwrap()),
            json!({
                "primary_email": "ada@example.org",
                "primary_email_verified": true,
                "primary_email_auth_enabled": true,
                "from": CHANNEL_ID,
            })
        );
        let unverified = channel(&[
            ("isVerified", text("f")),
            ("usedForAuth", ColumnValue::Null),
        ]);
        assert_eq!(
            patch(mapping.map_row(&unverified).unwrap()),
            json!({
                "primary_email": "ada@example.org",
                "primary_email_verified": false,
                "primary_email_auth_enabled": false,
                "from": CHANNEL_ID,
            })
        );
        // The old row said it was the primary email (REPLICA IDENTITY FULL).
        assert_eq!(
            patch(mapping.removed(USER_ID, Gone::WholeRow).unwrap().unwrap()),
            json!({
                "primary_email": null,
                "primary_email_verified": false,
                "primary_email_auth_enabled": false,
                "from": null,
            })
        );
        let secondary = channel(&[("isPrimary", ColumnValue::Null)]);
        assert_eq!(
            mapping.map_row(&secondary).unwrap(),
            RowOutcome::Skip {
                id: USER_ID.into(),
                reason: SkipReason::NotPrimaryEmail
            }
        );
        assert_eq!(
            mapping.skip_reason(&secondary),
            Ok(Some(SkipReason::NotPrimaryEmail))
        );
        assert_eq!(mapping.skip_reason(&channel(&[])), Ok(None));
        assert_eq!(mapping.map_key(&channel(&[])).unwrap(), USER_ID);
    }

    #[test]
    fn a_channel_known_by_its_key_alone_is_cleared_if_the_target_recorded_it() {
        // The default replica identity: the primary key.
        let columns = contact_channel(false);
        let mapping = StackAuthMapping::default()
            .bind_contact_channel(&columns)
            .unwrap();
        let key = row_of(
            &columns,
            &[
                ("tenancyId", text(TENANCY)),
                ("projectUserId", text(USER_ID)),
                ("id", text(CHANNEL_ID)),
            ],
        );
        assert_eq!(mapping.map_key(&key).unwrap(), USER_ID);
        assert_eq!(mapping.key_skip_reason(&key), Ok(None));
        assert_eq!(
            mapping.removed(USER_ID, Gone::Key(&key)).unwrap(),
            Some(RowOutcome::ClearPartIf {
                id: USER_ID.into(),
                row: CHANNEL_ID.into(),
                keys: email_keys(Value::Null, false, false),
            })
        );
        // The channel's id is published with the key; a replica identity without it cannot
        // tell a deleted channel.
        assert!(mapping.layout().used().names().contains(&"id".to_owned()));
        let without_id: Vec<_> = columns
            .into_iter()
            .map(|mut column| {
                column.is_key = column.name != "id" && column.is_key;
                column
            })
            .collect();
        assert!(matches!(
            StackAuthMapping::default().bind_contact_channel(&without_id),
            Err(MapError::ChannelIdNotInReplicaIdentity { column }) if column == "id"
        ));
    }

    #[test]
    fn other_tenancies_are_skipped_by_row_and_by_key() {
        let mapping = StackAuthMapping {
            tenancy_id: Some(TENANCY.into()),
            ..StackAuthMapping::default()
        };
        let users = mapping.bind(&project_user()).unwrap();
        let channels = mapping
            .bind_contact_channel(&contact_channel(true))
            .unwrap();
        let other = [("tenancyId", text("00000000-0000-4000-8000-000000000000"))];
        assert!(matches!(
            users.map_row(&ada(&other)).unwrap(),
            RowOutcome::Skip {
                reason: SkipReason::OtherTenancy,
                ..
            }
        ));
        assert!(matches!(
            users.map_insert(&ada(&[])).unwrap(),
            RowOutcome::User(_)
        ));
        let key = row_of(
            &project_user(),
            &[other[0].clone(), ("projectUserId", text(USER_ID))],
        );
        assert_eq!(
            users.key_skip_reason(&key),
            Ok(Some(SkipReason::OtherTenancy))
        );
        assert_eq!(users.key_skip_reason(&ada(&[])), Ok(None));
        assert_eq!(
            channels.skip_reason(&channel(&other)),
            Ok(Some(SkipReason::OtherTenancy))
        );
        assert_eq!(
            mapping.row_filter().as_deref(),
            Some(format!("(\"tenancyId\" = '{TENANCY}')").as_str())
        );
        let select = mapping.snapshot_select(
            &"public.ProjectUser".parse().unwrap(),
            &project_user(),
            None,
        );
        assert!(
            select.contains("LEFT JOIN \"public\".\"ContactChannel\" c"),
            "{select}"
        );
        assert!(
            select.ends_with(&format!("WHERE u.\"tenancyId\" = '{TENANCY}'")),
            "{select}"
        );
    }
}
