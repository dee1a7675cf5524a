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
//! **Adding a profile.** A single-table profile is one file in `map/` with a mapping type
//! (options), its `bind`, and a bound type implementing [`RowMapper`]; then one arm in each
//! `match` here and in `config.rs`. A profile spread over two tables (Stack Auth's
//! `ProjectUser` + `ContactChannel`) needs more than this module: the replicator follows one
//! relation today, and a row of the second table changes part of a user it did not send
//! (that is a batch/apply change, sketched in the README's "Profiles" section).

use std::fmt;

use super::better_auth::BetterAuthMapping;
use super::generic::GenericMapping;
use super::keycloak::KeycloakMapping;
use super::supabase::SupabaseMapping;
use super::{MapError, MappedUser};
use crate::decode::{RelationColumn, TupleData};

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
}

impl RowOutcome {
    /// The user id the row has, whatever the outcome.
    pub fn id(&self) -> &str {
        match self {
            RowOutcome::User(user) | RowOutcome::Deleted { user, .. } => &user.id,
            RowOutcome::Skip { id, .. } => id,
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
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::Anonymous => "anonymous user",
            SkipReason::OtherRealm => "user of another realm",
            SkipReason::ServiceAccount => "service account",
        })
    }
}

/// A profile bound to one relation: maps its rows. Pure: no I/O, no clock.
pub trait RowMapper: fmt::Debug + Send + Sync {
    /// An Insert's tuple or an Update's new tuple.
    fn map_row(&self, row: &TupleData) -> Result<RowOutcome, MapError>;

    /// The user id from a Delete's or Update's old tuple: a 'K' tuple (replica identity
    /// columns only, NULL elsewhere) or an 'O' tuple (REPLICA IDENTITY FULL).
    fn map_key(&self, old_key_or_full: &TupleData) -> Result<String, MapError>;

    /// Whether a whole row (an 'O' tuple) is one this profile skips; only the columns that
    /// decide it are read.
    fn skip_reason(&self, full_row: &TupleData) -> Result<Option<SkipReason>, MapError>;

    /// Choices the operator may not expect, to log once. They name columns, never values.
    fn notes(&self) -> &[String];

    /// The mapping as `setup` prints it.
    fn plan(&self) -> MappingPlan;
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
    pub const NAMES: [&'static str; 4] = ["generic", "supabase", "keycloak", "better-auth"];

    pub fn name(&self) -> &'static str {
        match self {
            Profile::Generic(_) => "generic",
            Profile::Supabase(_) => "supabase",
            Profile::Keycloak(_) => "keycloak",
            Profile::BetterAuth(_) => "better-auth",
        }
    }

    /// The users table when `--table` is not given, as the store creates it.
    pub fn default_table(&self) -> &'static str {
        match self {
            Profile::Generic(_) => super::generic::DEFAULT_TABLE,
            Profile::Supabase(_) => super::supabase::DEFAULT_TABLE,
            Profile::Keycloak(_) => super::keycloak::DEFAULT_TABLE,
            Profile::BetterAuth(_) => super::better_auth::DEFAULT_TABLE,
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
        })
    }
}
