//! Source row → `raw_json`: the identity store's user in Stack Auth's shape.
//!
//! Neon's `neon_auth.users_sync` derives every readable column from one `raw_json` object
//! (DESIGN.md §2), so mapping a row means building that object:
//!
//! | key                      | JSON type          | feeds the target column            |
//! |--------------------------|--------------------|------------------------------------|
//! | `id`                     | string             | `id` (primary key)                 |
//! | `display_name`           | string or null     | `name`                             |
//! | `primary_email`          | string or null     | `email`                            |
//! | `primary_email_verified` | bool               | —                                  |
//! | `signed_up_at_millis`    | integer (or absent)| `created_at` (cast to bigint)      |
//! | any other source column  | its JSON value     | — (apps read it from `raw_json`)   |
//!
//! Stack Auth's own users also carry `profile_image_url`, `client_metadata`,
//! `client_read_only_metadata` and `server_metadata`. The named profiles fill them from the
//! store's own columns; with `generic`, a source column of that name lands there by passing
//! through under its own name.
//!
//! **Why `id` is always a JSON string.** The target computes `id` as `raw_json ->> 'id'`, and
//! apps join it to text and uuid columns. A string carries a uuid, a text key or a bigint
//! exactly; a JSON number would be re-spelled by jsonb and rounded by JavaScript clients above
//! 2^53.
//!
//! **Why `signed_up_at_millis` can be absent.** The generated `created_at` casts the key to
//! bigint, so a non-integer fails the insert. When the source has no sign-up time column, or
//! the value is NULL, the key is left out and `created_at` is NULL: an honest "unknown" rather
//! than a made-up 1970.
//!
//! **Why unchanged TOAST is deferred to apply.** For an UPDATE, pgoutput does not resend a
//! large out-of-line ("TOASTed") value that did not change; the tuple says only "unchanged".
//! The mapper cannot know the value and must not write null over it, so it leaves the key out
//! and reports it in [`MappedUser::unchanged_keys`]; the apply step keeps those keys from the
//! row already on the target. This keeps mapping pure: no lookups, no I/O.
//!
//! **Which rows are users** is the profile's call too: a row may be a live user, a user the
//! store marks deleted, or no user of ours at all (an anonymous user, another Keycloak realm);
//! see [`RowOutcome`] and the [`profile`] module.
//!
//! One file per identity-store profile: [`generic`], [`supabase`], [`keycloak`],
//! [`better_auth`], [`stack_auth`] (two tables: users and their contact channels). Conversions they share
//! live in [`value`], and column binding and `raw_json` building in `columns`. Which other
//! columns a profile copies (never credentials, unless the operator names them) is the
//! [`selection`] module's subject.
//!
//! Every [`MapError`] is definite: retrying the same row gives the same error, so the operator
//! has to change the configuration or the source schema.

pub mod better_auth;
mod columns;
pub mod generic;
pub mod keycloak;
pub mod profile;
mod raw_json;
pub mod selection;
pub mod stack_auth;
pub mod supabase;
pub mod value;

pub use better_auth::BetterAuthMapping;
pub use columns::{ColumnUse, UsedColumn};
pub use generic::{BoundMapping, GenericMapping};
pub use keycloak::KeycloakMapping;
pub use profile::{
    BoundProfile, Gone, MappingPlan, Profile, RowLayout, RowMapper, RowOutcome, SkipReason,
};
pub use raw_json::{Member, RawJson};
pub use selection::ColumnSelection;
pub use stack_auth::StackAuthMapping;
pub use supabase::SupabaseMapping;
pub use value::{timestamp_millis, TextValue, ValueError};

/// The Stack Auth keys a profile computes rather than copies; a source column with one of these
/// names would otherwise overwrite the computed value.
pub mod key {
    pub const ID: &str = "id";
    pub const DISPLAY_NAME: &str = "display_name";
    pub const PRIMARY_EMAIL: &str = "primary_email";
    pub const PRIMARY_EMAIL_VERIFIED: &str = "primary_email_verified";
    pub const SIGNED_UP_AT_MILLIS: &str = "signed_up_at_millis";

    pub const PROFILE_IMAGE_URL: &str = "profile_image_url";
    pub const CLIENT_METADATA: &str = "client_metadata";
    pub const CLIENT_READ_ONLY_METADATA: &str = "client_read_only_metadata";
    pub const SERVER_METADATA: &str = "server_metadata";
    /// Stack Auth: the primary email can be used to sign in (magic link, password reset).
    pub const PRIMARY_EMAIL_AUTH_ENABLED: &str = "primary_email_auth_enabled";

    /// What the generic profile computes; the other keys pass through by name there.
    pub const COMPUTED: [&str; 5] = [
        ID,
        DISPLAY_NAME,
        PRIMARY_EMAIL,
        PRIMARY_EMAIL_VERIFIED,
        SIGNED_UP_AT_MILLIS,
    ];

    /// Stack Auth's user shape: the named profiles write every one of these keys.
    pub const STACK_AUTH: [&str; 9] = [
        ID,
        DISPLAY_NAME,
        PRIMARY_EMAIL,
        PRIMARY_EMAIL_VERIFIED,
        SIGNED_UP_AT_MILLIS,
        PROFILE_IMAGE_URL,
        CLIENT_METADATA,
        CLIENT_READ_ONLY_METADATA,
        SERVER_METADATA,
    ];
}

/// One source row as the target stores it. Shared by all profiles so apply needs to know none.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedUser {
    /// The same text as `raw_json["id"]`, kept apart so apply can key on it without a lookup.
    pub id: String,
    pub raw_json: RawJson,
    /// Keys whose source value was unchanged TOAST: apply keeps the target's current value.
    pub unchanged_keys: Vec<String>,
}

/// Why a relation cannot be mapped or a row cannot be converted. Messages name columns and
/// types, never values: rows hold personal data and errors reach logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error(
        "id column {column:?} not found (the table has columns {available}); \
         set --id-column to the column that holds the user id"
    )]
    IdColumnMissing { column: String, available: String },

    #[error("column {column:?} given with {option} not found (the table has columns {available})")]
    ConfiguredColumnMissing {
        option: &'static str,
        column: String,
        available: String,
    },

    #[error(
        "id column {column:?} is not part of the table's replica identity, so deletes would \
         arrive without it; make it the primary key, or run ALTER TABLE … REPLICA IDENTITY \
         USING INDEX <a unique index on {column}> (or REPLICA IDENTITY FULL), \
         or (generic profile) set --id-column to a primary-key column"
    )]
    IdNotInReplicaIdentity { column: String },

    /// Stack Auth's `"ContactChannel"`: its key must say which channel went away (the
    /// target's record of each user's primary email channel is matched against it).
    #[error(
        "\"ContactChannel\".{column} is not part of that table's replica identity, so a \
         deleted or updated contact channel would arrive without it and usersync could not \
         tell whether it gave its user's email; give the table back its default replica \
         identity, the primary key: ALTER TABLE \"ContactChannel\" REPLICA IDENTITY DEFAULT"
    )]
    ChannelIdNotInReplicaIdentity { column: String },

    #[error(
        "the {profile} profile needs column {column} (the table has columns {available}); \
         check that --table names the {profile} users table"
    )]
    ProfileColumnMissing {
        profile: &'static str,
        column: String,
        available: String,
    },

    #[error(
        "column {column} (type oid {type_oid}) does not fit the {profile} profile: \
         expected {expected}"
    )]
    ProfileColumnType {
        profile: &'static str,
        column: String,
        type_oid: u32,
        expected: &'static str,
    },

    #[error(
        "column {column} decides whether a row is replicated, but arrived as an unchanged \
         TOAST value"
    )]
    UnchangedToastFilter { column: String },

    #[error(
        "the row has {actual} columns but the relation has {expected}; \
         the relation was probably altered without a new Relation message"
    )]
    ColumnCount { expected: usize, actual: usize },

    #[error("id column {column} is NULL, so the user cannot be identified")]
    NullId { column: String },

    #[error(
        "id column {column} arrived as an unchanged TOAST value, so the user cannot be identified"
    )]
    UnchangedToastId { column: String },

    #[error(
        "{option} names {columns}, which the table does not have (its columns: {available}); \
         names are matched exactly, as the catalog spells them"
    )]
    UnknownSelectedColumns {
        option: &'static str,
        columns: String,
        available: String,
    },

    #[error(
        "column {column} cannot be excluded (--exclude-columns): the profile reads it, for a \
         raw_json key or to decide which rows are users; remove it from the list"
    )]
    ExcludedColumnRead { column: String },

    #[error(
        "column {column} cannot be included (--include-columns): the profile computes the \
         raw_json key {column}, which the column would overwrite"
    )]
    IncludedComputedKey { column: String },

    #[error("column {column} (type oid {type_oid}) cannot become {target}")]
    Column {
        column: String,
        type_oid: u32,
        /// The raw_json key, or "a JSON value" for a column passed through.
        target: &'static str,
        #[source]
        source: ValueError,
    },

    #[error("type oid {type_oid} cannot become signed_up_at_millis")]
    SignedUpAt {
        type_oid: u32,
        #[source]
        source: ValueError,
    },
}
