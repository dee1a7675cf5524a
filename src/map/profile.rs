//! Profiles: which identity store the source table belongs to, and so how its rows become
//! users.
//!
//! A [`Profile`] is configuration (validated before anything connects): its name, its default
//! table, its options. Bound to a relation's columns ([`Profile::bind`], once per Relation
//! message) it becomes a [`RowMapper`], which turns each row into a [`RowOutcome`]:
//!
//! - [`RowOutcome::User`]: a live user, upserted;
//! - [`RowOutcome::Deleted`]: a user the store keeps but marks deleted (Supabase's soft
//!   delete), upserted with `deleted_at` set to the store's own deletion time;
//! - [`RowOutcome::Skip`]: a row that is not a user of this replicator (an anonymous user, a
//!   user of another realm). Nothing is written for it, but the replicator makes sure a user
//!   that *was* replicated does not stay live: an update that turns a row into a skipped one
//!   soft-deletes the user (see `replicator.rs`).
//!
//! - [`RowOutcome::Patch`]: part of a user, kept in another table (Stack Auth's primary email
//!   in `ContactChannel`): those keys are merged into the user's `raw_json`, the rest kept;
//! - [`RowOutcome::ClearPartIf`]: such a row went away, known by its key only: the target,
//!   which records which row each user's part comes from, decides whether it clears the part.
//!
//! **Adding a profile.** A single-table profile is one file in `map/` with a mapping type
//! (options, `columns` among them), its `bind`, and a bound type implementing [`RowMapper`]'s
//! hooks (its [`RowLayout`], which rows it skips, how it maps the others); then one arm in
//! each `match` here and in `config.rs`. `bind` looks columns up through `columns::Relation`,
//! sorts the rest with `OtherColumns::bind` (the credential rule and the operator's
//! [`ColumnSelection`]) and ends with `relation.layout(id)`, which then knows every column the
//! mapping uses: the publication's column list. A profile spread over several tables names them
//! ([`Profile::tables`], the users table first) and binds each ([`Profile::bind_table`]); a
//! row of a table other than the users table maps to patches ([`RowMapper::removed`] says
//! what its removal clears), and the initial copy joins the tables
//! ([`Profile::snapshot_select`], [`RowMapper::map_copied`]).

use std::fmt;

use postgres_protocol::escape::escape_identifier;
use serde_json::{Map, Value};

use super::better_auth::BetterAuthMapping;
pub use super::columns::RowLayout;
use super::generic::GenericMapping;
use super::keycloak::KeycloakMapping;
use super::selection::ColumnSelection;
use super::stack_auth::StackAuthMapping;
use super::supabase::SupabaseMapping;
use super::{MapError, MappedUser};
use crate::config::TableName;
use crate::decode::{ColumnValue, RelationColumn, TupleData};

/// What one source row means for the target.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// A live user: upsert it, `deleted_at` NULL.
    User(MappedUser),
    /// A user the source marks deleted without removing the row: upsert it with
    /// `deleted_at` = `at`, microseconds since the Unix epoch (the source's own time).
    Deleted { user: MappedUser, at: i64 },
    /// Not a user this replicator carries; `id` so a user replicated earlier can be
    /// soft-deleted.
    Skip { id: String, reason: SkipReason },
    /// Part of user `id` changed (a row of a table that holds part of a user): merge `keys`
    /// into its `raw_json`, keep the other keys, leave `deleted_at` alone. `from`: the row the
    /// part comes from now (Stack Auth: the primary email channel's id), `None` when it comes
    /// from none (the part is cleared); the target records it, so that the row's removal can
    /// be told apart later without the old row ([`RowOutcome::ClearPartIf`]).
    Patch {
        id: String,
        keys: Map<String, Value>,
        from: Option<String>,
    },
    /// Row `row` of a table holding part of user `id` went away, known by its key alone (no
    /// `REPLICA IDENTITY FULL`), so whether the user's part came from it is not known here:
    /// if the target records that it did, the part is cleared (`keys` merged, as a
    /// [`RowOutcome::Patch`] would) and the record forgotten; otherwise nothing changes.
    ClearPartIf {
        id: String,
        row: String,
        keys: Map<String, Value>,
    },
}

impl RowOutcome {
    /// The user id the row has, whatever the outcome.
    pub fn id(&self) -> &str {
        match self {
            RowOutcome::User(user) | RowOutcome::Deleted { user, .. } => &user.id,
            RowOutcome::Skip { id, .. }
            | RowOutcome::Patch { id, .. }
            | RowOutcome::ClearPartIf { id, .. } => id,
        }
    }
}

/// Why a row is not replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// An anonymous (guest) user; `--include-anonymous` replicates them.
    Anonymous,
    /// A Keycloak user of a realm other than `--realm`.
    OtherRealm,
    /// A Keycloak service account: a client's identity, not a person.
    ServiceAccount,
    /// A Stack Auth row of a tenancy other than `--tenancy-id`.
    OtherTenancy,
    /// A Stack Auth contact channel that is not the primary email.
    NotPrimaryEmail,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::Anonymous => "anonymous user",
            SkipReason::OtherRealm => "user of another realm",
            SkipReason::ServiceAccount => "service account",
            SkipReason::OtherTenancy => "row of another tenancy",
            SkipReason::NotPrimaryEmail => "contact channel that is not the primary email",
        })
    }
}

/// A profile bound to one relation: maps its rows. Pure: no I/O, no clock.
///
/// Every profile reads a row the same way: check its width, read the user id (a row without
/// one is an error whatever else it holds), then ask the profile whether to skip it, and only
/// then map it. So a profile supplies the hooks ([`RowMapper::layout`], [`RowMapper::skip`],
/// [`RowMapper::map_values`]) and the entry points the replicator calls are provided here.
pub trait RowMapper: fmt::Debug + Send + Sync {
    /// Hook: the bound relation's width and id column.
    fn layout(&self) -> &RowLayout;

    /// Hook: why a row is not replicated, from its values (already checked against the
    /// width); only the columns that decide it are read. By default every row is replicated.
    fn skip(&self, _values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        Ok(None)
    }

    /// Hook: what a row that is not skipped means, from its id and its checked values.
    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError>;

    /// An Insert's tuple or an Update's new tuple.
    fn map_row(&self, row: &TupleData) -> Result<RowOutcome, MapError> {
        let values = self.layout().values(row)?;
        map_unless_skipped(self, values, |id| self.map_values(id, values))
    }

    /// An Insert's tuple. A profile whose users table leaves keys to another table sets
    /// them here to "none yet", where an update would keep the target's values.
    fn map_insert(&self, row: &TupleData) -> Result<RowOutcome, MapError> {
        self.map_row(row)
    }

    /// A row of the initial copy, as [`Profile::snapshot_select`] reads it.
    fn map_copied(&self, row: &TupleData) -> Result<RowOutcome, MapError> {
        self.map_insert(row)
    }

    /// What it means for user `id` that a row this mapper may have replicated went away
    /// (deleted, or updated into one it skips): `None` for a users table (the user is
    /// soft-deleted); for a table holding part of a user, the patch that clears its part, or,
    /// when only the row's key is known, the clear the target decides
    /// ([`RowOutcome::ClearPartIf`]).
    fn removed(&self, _id: &str, _gone: Gone<'_>) -> Result<Option<RowOutcome>, MapError> {
        Ok(None)
    }

    /// For a row of the initial copy ([`Profile::snapshot_select`]), the row its user's part
    /// comes from, which the target records as [`RowOutcome::Patch`]'s `from` does:
    /// `Some(None)` when none does; `None` for a profile whose users have no such part.
    fn copied_part_from(&self, _row: &TupleData) -> Result<Option<Option<String>>, MapError> {
        Ok(None)
    }

    /// Whether the replica identity columns alone make a row skipped (a tenancy in the
    /// primary key). An update that leaves the key unchanged sends no old tuple, and the old
    /// row was then skipped for the same reason as the new one.
    fn key_skip_reason(&self, _key: &TupleData) -> Result<Option<SkipReason>, MapError> {
        Ok(None)
    }

    /// The user id from a Delete's or Update's old tuple: a 'K' tuple (replica identity
    /// columns only, NULL elsewhere) or an 'O' tuple (REPLICA IDENTITY FULL).
    fn map_key(&self, old_key_or_full: &TupleData) -> Result<String, MapError> {
        let layout = self.layout();
        layout
            .id(layout.values(old_key_or_full)?)
            .map(str::to_owned)
    }

    /// Whether a whole row (an 'O' tuple) is one this profile skips; only the columns that
    /// decide it are read.
    fn skip_reason(&self, full_row: &TupleData) -> Result<Option<SkipReason>, MapError> {
        self.skip(self.layout().values(full_row)?)
    }

    /// Choices the operator may not expect, to log once. They name columns, never values.
    fn notes(&self) -> &[String];

    /// The mapping as `setup` prints it.
    fn plan(&self) -> MappingPlan;
}

/// How the replicator knows a row that went away (see [`RowMapper::removed`]).
#[derive(Debug, Clone, Copy)]
pub enum Gone<'r> {
    /// By its whole old row (`REPLICA IDENTITY FULL`), which the mapper replicated.
    WholeRow,
    /// By its replica identity columns only (a key tuple, or the new row of an update that
    /// left the key alone): whether the mapper replicated it is not known.
    Key(&'r TupleData),
}

/// A row's outcome from its checked values: the id first, then the profile's skip decision,
/// then `map` with the id. For the entry points a profile overrides ([`RowMapper::map_insert`],
/// [`RowMapper::map_copied`]) to map the same row another way.
pub(super) fn map_unless_skipped<M: RowMapper + ?Sized>(
    mapper: &M,
    values: &[ColumnValue],
    map: impl FnOnce(&str) -> Result<RowOutcome, MapError>,
) -> Result<RowOutcome, MapError> {
    let id = mapper.layout().id(values)?;
    match mapper.skip(values)? {
        Some(reason) => Ok(RowOutcome::Skip {
            id: id.to_owned(),
            reason,
        }),
        None => map(id),
    }
}

/// A bound profile, whichever it is.
pub type BoundProfile = Box<dyn RowMapper>;

/// How a bound profile fills `raw_json`, for people to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingPlan {
    /// Stack Auth key and where its value comes from.
    pub keys: Vec<(&'static str, String)>,
    /// Columns copied under their own names.
    pub passthrough: Vec<String>,
    /// Columns never copied, each with the reason.
    pub excluded: Vec<String>,
    /// Which rows are skipped or soft-deleted, and why.
    pub rules: Vec<String>,
}

/// Which identity store the source is, with that profile's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    Generic(GenericMapping),
    Supabase(SupabaseMapping),
    Keycloak(KeycloakMapping),
    BetterAuth(BetterAuthMapping),
    StackAuth(StackAuthMapping),
}

impl Default for Profile {
    fn default() -> Self {
        Profile::Generic(GenericMapping::default())
    }
}

impl From<GenericMapping> for Profile {
    fn from(mapping: GenericMapping) -> Self {
        Profile::Generic(mapping)
    }
}

impl Profile {
    /// The names `--profile` accepts.
    pub const NAMES: [&'static str; 5] = [
        "generic",
        "supabase",
        "keycloak",
        "better-auth",
        "stack-auth",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Profile::Generic(_) => "generic",
            Profile::Supabase(_) => "supabase",
            Profile::Keycloak(_) => "keycloak",
            Profile::BetterAuth(_) => "better-auth",
            Profile::StackAuth(_) => "stack-auth",
        }
    }

    /// Which columns besides the keys the users table's rows copy into `raw_json`.
    pub fn columns(&self) -> &ColumnSelection {
        match self {
            Profile::Generic(mapping) => &mapping.columns,
            Profile::Supabase(mapping) => &mapping.columns,
            Profile::Keycloak(mapping) => &mapping.columns,
            Profile::BetterAuth(mapping) => &mapping.columns,
            Profile::StackAuth(mapping) => &mapping.columns,
        }
    }

    /// The profile with `columns` deciding what else its users table copies.
    pub fn with_columns(mut self, columns: ColumnSelection) -> Self {
        match &mut self {
            Profile::Generic(mapping) => mapping.columns = columns,
            Profile::Supabase(mapping) => mapping.columns = columns,
            Profile::Keycloak(mapping) => mapping.columns = columns,
            Profile::BetterAuth(mapping) => mapping.columns = columns,
            Profile::StackAuth(mapping) => mapping.columns = columns,
        }
        self
    }

    /// The users table when `--table` is not given, as the store creates it.
    pub fn default_table(&self) -> &'static str {
        match self {
            Profile::Generic(_) => super::generic::DEFAULT_TABLE,
            Profile::Supabase(_) => super::supabase::DEFAULT_TABLE,
            Profile::Keycloak(_) => super::keycloak::DEFAULT_TABLE,
            Profile::BetterAuth(_) => super::better_auth::DEFAULT_TABLE,
            Profile::StackAuth(_) => super::stack_auth::DEFAULT_TABLE,
        }
    }

    /// The source tables the profile replicates, the users table (`--table`) first; the
    /// others are found in the same schema.
    pub fn tables(&self, users_table: &TableName) -> Vec<TableName> {
        let mut tables = vec![users_table.clone()];
        if let Profile::StackAuth(_) = self {
            tables.push(super::stack_auth::contact_channel_table(users_table));
        }
        tables
    }

    /// The one tenancy replicated (stack-auth `--tenancy-id`), if any.
    pub fn tenancy_filter(&self) -> Option<&str> {
        match self {
            Profile::StackAuth(mapping) => mapping.tenancy_id.as_deref(),
            _ => None,
        }
    }

    /// The column a routes file routes by unless it names one: the tenancy, where the
    /// profile has tenancies in its every table's key (Stack Auth).
    pub fn routing_column(&self) -> Option<&'static str> {
        match self {
            Profile::StackAuth(_) => Some("tenancyId"),
            _ => None,
        }
    }

    /// Rows a table of the profile publishes, as a publication row filter (PostgreSQL 15+);
    /// `None`: every row. usersync applies the same filter itself, so an older server, or a
    /// publication created without it, only costs decoding.
    pub fn row_filter(&self) -> Option<String> {
        match self {
            Profile::StackAuth(mapping) => mapping.row_filter(),
            _ => None,
        }
    }

    /// The SELECT the initial copy reads (inside the slot's snapshot); its rows go to
    /// [`RowMapper::map_copied`]. `columns` are the users table's; `only`, a condition on
    /// the users table (named `u`) that a row must meet (a route's share, see
    /// [`crate::routing::Routes::copy_filter`]).
    pub fn snapshot_select(
        &self,
        users_table: &TableName,
        columns: &[RelationColumn],
        only: Option<&str>,
    ) -> String {
        match self {
            Profile::StackAuth(mapping) => mapping.snapshot_select(users_table, columns, only),
            _ => {
                let list = columns
                    .iter()
                    .map(|column| format!("u.{}", escape_identifier(&column.name)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let only = only
                    .map(|only| format!(" WHERE {only}"))
                    .unwrap_or_default();
                format!("SELECT {list} FROM {} u{only}", users_table.quoted())
            }
        }
    }

    /// The keys of the part of each user that comes from another table (Stack Auth: the
    /// three email keys, from `"ContactChannel"`); none for a profile without parts. The
    /// batch needs them to know when an upsert sets the part itself.
    pub fn part_keys(&self) -> &'static [&'static str] {
        match self {
            Profile::StackAuth(_) => &super::stack_auth::EMAIL_KEYS,
            _ => &[],
        }
    }

    /// The rows users' parts come from now, as (user id, row id) text, for a profile whose
    /// users have parts in another table (Stack Auth: the primary email channels): `setup`
    /// records them for the users whose row the target does not know.
    pub fn part_sources_select(&self, users_table: &TableName) -> Option<String> {
        match self {
            Profile::StackAuth(mapping) => Some(mapping.primary_channels_select(users_table)),
            _ => None,
        }
    }

    /// Columns per row of [`Profile::snapshot_select`].
    pub fn snapshot_width(&self, columns: &[RelationColumn]) -> usize {
        match self {
            Profile::StackAuth(_) => columns.len() + super::stack_auth::JOINED_EMAIL_COLUMNS,
            _ => columns.len(),
        }
    }

    /// Resolves the profile against the columns of its table number `table` (an index into
    /// [`Profile::tables`]).
    pub fn bind_table(
        &self,
        table: usize,
        columns: &[RelationColumn],
    ) -> Result<BoundProfile, MapError> {
        match (self, table) {
            (_, 0) => self.bind(columns),
            (Profile::StackAuth(mapping), 1) => {
                Ok(Box::new(mapping.bind_contact_channel(columns)?))
            }
            _ => unreachable!("the profile has no table {table}"),
        }
    }

    /// Resolves the profile against one relation's columns. Fails on what the operator must
    /// fix before any row can be replicated correctly.
    pub fn bind(&self, columns: &[RelationColumn]) -> Result<BoundProfile, MapError> {
        Ok(match self {
            Profile::Generic(mapping) => Box::new(mapping.bind(columns)?),
            Profile::Supabase(mapping) => Box::new(mapping.bind(columns)?),
            Profile::Keycloak(mapping) => Box::new(mapping.bind(columns)?),
            Profile::BetterAuth(mapping) => Box::new(mapping.bind(columns)?),
            Profile::StackAuth(mapping) => Box::new(mapping.bind(columns)?),
        })
    }
}
