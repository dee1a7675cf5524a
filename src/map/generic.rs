//! The `generic` profile: a plain `users(id, email, display_name | name, created_at, …)` table.
//!
//! Which column feeds which Stack Auth key is decided once per Relation message by
//! [`GenericMapping::bind`], so mapping a row is a walk over precomputed indices.
//!
//! - `id`: `--id-column` (default `id`); must exist and be in the replica identity, or deletes
//!   could not be matched to users.
//! - `primary_email`: `--email-column` (default `email`, then `primary_email`).
//! - `display_name`: `--display-name-column`, else `display_name`, then `name`.
//! - `signed_up_at_millis`: `--signed-up-at-column` (default `created_at`, then
//!   `signed_up_at_millis`), of a type [`value::timestamp_millis`] accepts.
//! - `primary_email_verified`: `email_verified`, then `primary_email_verified`, of a type
//!   [`value::verified_from_text`] accepts; false when there is none.
//!
//! A column named explicitly must exist (and fit); a default that is absent, or of a type that
//! cannot feed its key, is skipped, because most tables will not have all of them. Skipped
//! defaults and columns hidden by a computed key are reported by [`BoundMapping::notes`] so
//! the caller can log them once at startup. An `email_column` or `signed_up_at_column` of
//! `None` means "no such column".
//!
//! Every other column passes through under its own name with its JSON value, except a
//! column whose name says it holds a credential (the rule of every profile,
//! `columns::is_credential`: `password_hash`, `reset_token`, `totp_secret`, `user_pass`,
//! `api_key`), and a column whose name is a computed key (say an `id serial` beside
//! `--id-column user_uuid`): writing it would overwrite the computed value. `--include-columns` and `--exclude-columns` narrow or
//! widen that (see the `selection` module). Every row is a live user: the generic profile
//! never skips a row.

use serde_json::Value;

use super::columns::{is_credential, BoundColumn, OtherColumns, Relation, RowLayout, UserJson};
use super::profile::{MappingPlan, RowMapper, RowOutcome};
use super::selection::ColumnSelection;
use super::value::{self, ValueError};
use super::{key, MapError};
use crate::decode::{ColumnValue, RelationColumn, TupleData};

/// Every profile produces the same output; re-exported so it can be named from the profile too.
pub use super::MappedUser;

/// The users table when `--table` is not given.
pub const DEFAULT_TABLE: &str = "public.users";
pub const DEFAULT_ID_COLUMN: &str = "id";
pub const DEFAULT_EMAIL_COLUMN: &str = "email";
pub const DEFAULT_SIGNED_UP_AT_COLUMN: &str = "created_at";
/// Tried in order when no display name column is configured.
pub const DISPLAY_NAME_COLUMNS: [&str; 2] = ["display_name", "name"];
/// Tried in order; there is no option, since a verification flag rarely has another name.
pub const EMAIL_VERIFIED_COLUMNS: [&str; 2] = ["email_verified", key::PRIMARY_EMAIL_VERIFIED];

/// Options named in error messages, so an operator knows what to set.
const EMAIL_OPTION: &str = "--email-column";
const DISPLAY_NAME_OPTION: &str = "--display-name-column";
const SIGNED_UP_AT_OPTION: &str = "--signed-up-at-column";

/// Which source columns feed the Stack Auth keys, as the operator configured them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenericMapping {
    pub id_column: String,
    /// `Some("email")` (the default) also accepts a table without it.
    pub email_column: Option<String>,
    /// `None`: `display_name` if present, else `name`, else no display name.
    pub display_name_column: Option<String>,
    /// `Some("created_at")` (the default) also accepts a table without it.
    pub signed_up_at_column: Option<String>,
    /// Which other columns are copied (`--include-columns`, `--exclude-columns`).
    pub columns: ColumnSelection,
}

impl Default for GenericMapping {
    fn default() -> Self {
        GenericMapping {
            id_column: DEFAULT_ID_COLUMN.to_owned(),
            email_column: Some(DEFAULT_EMAIL_COLUMN.to_owned()),
            display_name_column: None,
            signed_up_at_column: Some(DEFAULT_SIGNED_UP_AT_COLUMN.to_owned()),
            columns: ColumnSelection::default(),
        }
    }
}

/// A [`GenericMapping`] resolved against one relation's columns. Rebind on every Relation
/// message: column positions and types may have changed.
#[derive(Debug, Clone)]
pub struct BoundMapping {
    layout: RowLayout,
    email: Option<BoundColumn>,
    display_name: Option<BoundColumn>,
    signed_up_at: Option<BoundColumn>,
    email_verified: Option<BoundColumn>,
    other: OtherColumns,
    notes: Vec<String>,
}

fn require(
    relation: &Relation<'_>,
    name: &str,
    option: &'static str,
) -> Result<BoundColumn, MapError> {
    relation
        .find(name)
        .ok_or_else(|| MapError::ConfiguredColumnMissing {
            option,
            column: name.to_owned(),
            available: relation.names(),
        })
}

impl GenericMapping {
    /// Fails on what the operator must fix before any row can be replicated correctly.
    pub fn bind(&self, columns: &[RelationColumn]) -> Result<BoundMapping, MapError> {
        let relation = Relation::new(columns);
        let id = relation
            .find(&self.id_column)
            .ok_or_else(|| MapError::IdColumnMissing {
                column: self.id_column.clone(),
                available: relation.names(),
            })?;
        if !relation.is_key(&id) {
            return Err(MapError::IdNotInReplicaIdentity { column: id.name });
        }

        let mut notes = Vec::new();
        let email = match self.email_column.as_deref() {
            None => None,
            Some(DEFAULT_EMAIL_COLUMN) => {
                relation.first_of(&[DEFAULT_EMAIL_COLUMN, key::PRIMARY_EMAIL])
            }
            Some(name) => Some(require(&relation, name, EMAIL_OPTION)?),
        };
        let display_name = match self.display_name_column.as_deref() {
            None => relation.first_of(&DISPLAY_NAME_COLUMNS),
            Some(name) => Some(require(&relation, name, DISPLAY_NAME_OPTION)?),
        };
        let signed_up_at = match self.signed_up_at_column.as_deref() {
            None => None,
            Some(DEFAULT_SIGNED_UP_AT_COLUMN) => relation.first_of_type(
                &[DEFAULT_SIGNED_UP_AT_COLUMN, key::SIGNED_UP_AT_MILLIS],
                value::MILLIS_TYPES,
                (key::SIGNED_UP_AT_MILLIS, ValueError::NotMillisType),
                &mut notes,
            ),
            Some(name) => {
                let column = require(&relation, name, SIGNED_UP_AT_OPTION)?;
                if !value::MILLIS_TYPES.contains(&column.type_oid) {
                    return Err(column.error(key::SIGNED_UP_AT_MILLIS, ValueError::NotMillisType));
                }
                Some(column)
            }
        };
        let email_verified = relation.first_of_type(
            &EMAIL_VERIFIED_COLUMNS,
            value::VERIFIED_TYPES,
            (key::PRIMARY_EMAIL_VERIFIED, ValueError::NotVerifiedType),
            &mut notes,
        );

        let feeding_keys: Vec<&BoundColumn> =
            [&email, &display_name, &signed_up_at, &email_verified]
                .into_iter()
                .flatten()
                .chain([&id])
                .collect();
        let other = OtherColumns::bind(
            &relation,
            &feeding_keys,
            is_credential,
            &key::COMPUTED,
            &self.columns,
            &mut notes,
        )?;

        Ok(BoundMapping {
            layout: relation.layout(id),
            email,
            display_name,
            signed_up_at,
            email_verified,
            other,
            notes,
        })
    }
}

impl BoundMapping {
    /// Choices the operator may not expect (skipped defaults, hidden columns), to log once.
    /// They name columns and types only.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The relation width rows must have.
    pub fn column_count(&self) -> usize {
        self.layout.column_count
    }

    /// Maps an Insert's tuple or an Update's new tuple.
    pub fn map_user(&self, row: &TupleData) -> Result<MappedUser, MapError> {
        let values = self.layout.values(row)?;
        self.user(self.layout.id(values)?, values)
    }

    fn user(&self, id: &str, values: &[ColumnValue]) -> Result<MappedUser, MapError> {
        let mut user = UserJson::new(id);
        for (column, key) in [
            (&self.email, key::PRIMARY_EMAIL),
            (&self.display_name, key::DISPLAY_NAME),
        ] {
            let json = match column {
                None => Some(Value::Null),
                Some(column) => column.string(values, key)?,
            };
            user.set(key, json);
        }
        match &self.email_verified {
            None => user.set(key::PRIMARY_EMAIL_VERIFIED, Some(Value::Bool(false))),
            Some(column) => user.set_email_verified(column, values)?,
        }
        if let Some(column) = &self.signed_up_at {
            user.set_signed_up_at(column, values)?;
        }
        user.pass_through(&self.other.passthrough, values)?;
        Ok(user.finish(id.to_owned()))
    }
}

/// Every row is a live user: the generic profile never skips one.
impl RowMapper for BoundMapping {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError> {
        self.user(id, values).map(RowOutcome::User)
    }

    fn notes(&self) -> &[String] {
        &self.notes
    }

    fn plan(&self) -> MappingPlan {
        let source = |column: &Option<BoundColumn>, otherwise: &str| {
            column
                .as_ref()
                .map_or_else(|| otherwise.to_owned(), |column| column.name.clone())
        };
        MappingPlan {
            keys: vec![
                (key::ID, self.layout.id.name.clone()),
                (key::PRIMARY_EMAIL, source(&self.email, "(none: null)")),
                (
                    key::DISPLAY_NAME,
                    source(&self.display_name, "(none: null)"),
                ),
                (
                    key::SIGNED_UP_AT_MILLIS,
                    source(&self.signed_up_at, "(none: left out)"),
                ),
                (
                    key::PRIMARY_EMAIL_VERIFIED,
                    source(&self.email_verified, "(none: false)"),
                ),
            ],
            passthrough: self.other.passthrough_names(),
            excluded: self.other.excluded.clone(),
            rules: vec!["every row is a live user; a source delete is a soft delete".into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ColumnValue;
    use crate::map::columns::fixtures::{column, row, text};
    use crate::map::columns::PASSTHROUGH_TARGET;
    use crate::map::value::oid;
    use bytes::Bytes;
    use serde_json::json;

    /// A typical application table.
    fn users_columns() -> Vec<RelationColumn> {
        vec![
            column("id", oid::UUID, true),
            column("email", oid::TEXT, false),
            column("display_name", oid::VARCHAR, false),
            column("created_at", oid::TIMESTAMPTZ, false),
            column("email_verified", oid::BOOL, false),
            column("profile_image_url", oid::TEXT, false),
            column("server_metadata", oid::JSONB, false),
            column("login_count", oid::INT4, false),
            column("roles", oid::TEXT_ARRAY, false),
        ]
    }

    const USER_ID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn users_row() -> TupleData {
        row(vec![
            text(USER_ID),
            text("ada@example.org"),
            text("Ada Lovelace"),
            text("2024-01-02 03:04:05.123456+00"),
            text("t"),
            ColumnValue::Null,
            text(r#"{"plan": "pro", "seats": 3}"#),
            text("17"),
            text(r#"{admin,"billing team"}"#),
        ])
    }

    fn bind_default(columns: &[RelationColumn]) -> BoundMapping {
        GenericMapping::default().bind(columns).unwrap()
    }

    #[test]
    fn maps_a_full_row_into_the_stack_auth_shape() {
        let mapping = bind_default(&users_columns());
        assert!(mapping.notes().is_empty(), "{:?}", mapping.notes());
        let user = mapping.map_user(&users_row()).unwrap();
        assert_eq!(user.id, USER_ID);
        assert!(user.unchanged_keys.is_empty());
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": USER_ID,
                "primary_email": "ada@example.org",
                "display_name": "Ada Lovelace",
                "signed_up_at_millis": 1_704_164_645_123_i64,
                "primary_email_verified": true,
                "profile_image_url": null,
                "server_metadata": {"plan": "pro", "seats": 3},
                "login_count": 17,
                "roles": ["admin", "billing team"],
            })
        );
    }

    #[test]
    fn credential_columns_are_never_copied() {
        let columns = vec![
            column("id", oid::UUID, true),
            column("email", oid::TEXT, false),
            column("password_hash", oid::TEXT, false),
            column("encrypted_password", oid::TEXT, false),
            column("reset_token", oid::TEXT, false),
            column("totp_secret", oid::TEXT, false),
            column("plan", oid::TEXT, false),
        ];
        let mapping = bind_default(&columns);
        let user = mapping
            .map_user(&row(vec![
                text(USER_ID),
                text("ada@example.org"),
                text("$argon2id$v=19$m=65536,t=3,p=4$planted"),
                text("$2a$10$planted"),
                text("planted-reset-token"),
                text("planted-totp-secret"),
                text("pro"),
            ]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": USER_ID,
                "primary_email": "ada@example.org",
                "display_name": null,
                "primary_email_verified": false,
                "plan": "pro",
            })
        );
        let plan = mapping.plan();
        assert_eq!(plan.passthrough, ["plan"]);
        for name in [
            "password_hash",
            "encrypted_password",
            "reset_token",
            "totp_secret",
        ] {
            assert!(plan.excluded.iter().any(|e| e == name), "{name}: {plan:?}");
        }
    }

    /// An application table with a credential, a credential-looking fact and a secret-free
    /// column, as the selection tests use it.
    fn accounts_columns() -> Vec<RelationColumn> {
        vec![
            column("id", oid::TEXT, true),
            column("email", oid::TEXT, false),
            column("password_hash", oid::TEXT, false),
            column("password_changed_at", oid::TIMESTAMPTZ, false),
            column("plan", oid::TEXT, false),
            column("locale", oid::TEXT, false),
        ]
    }

    fn accounts_row() -> TupleData {
        row(vec![
            text("u1"),
            text("a@b.c"),
            text("$argon2id$planted"),
            text("2024-01-02 03:04:05+00"),
            text("pro"),
            text("en"),
        ])
    }

    fn with_columns(columns: ColumnSelection) -> GenericMapping {
        GenericMapping {
            columns,
            ..GenericMapping::default()
        }
    }

    fn copied_keys(mapping: &BoundMapping) -> Vec<String> {
        let user = mapping.map_user(&accounts_row()).unwrap();
        let computed = [
            "id",
            "primary_email",
            "display_name",
            "primary_email_verified",
        ];
        let mut keys: Vec<String> = user
            .raw_json
            .keys()
            .filter(|key| !computed.contains(key))
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn exclude_columns_is_a_deny_list_on_top_of_the_credential_rule() {
        let mapping = with_columns(ColumnSelection::Exclude(vec!["locale".into()]))
            .bind(&accounts_columns())
            .unwrap();
        // password_changed_at merely looks like a credential, but the rule goes by the name:
        // only --include-columns brings it in.
        assert_eq!(copied_keys(&mapping), ["plan"]);
        assert_eq!(
            mapping.plan().excluded,
            [
                "password_hash",
                "password_changed_at",
                "locale (--exclude-columns)"
            ]
        );
        // Excluding a credential the rule leaves out anyway is allowed (belt and braces).
        let mapping = with_columns(ColumnSelection::Exclude(vec!["password_hash".into()]))
            .bind(&accounts_columns())
            .unwrap();
        assert_eq!(copied_keys(&mapping), ["locale", "plan"]);
    }

    #[test]
    fn include_columns_is_an_allow_list_that_can_name_a_credential_looking_column() {
        let mapping = with_columns(ColumnSelection::Include(vec![
            "plan".into(),
            "password_changed_at".into(),
        ]))
        .bind(&accounts_columns())
        .unwrap();
        assert_eq!(copied_keys(&mapping), ["password_changed_at", "plan"]);
        assert_eq!(
            mapping.plan().excluded,
            ["password_hash", "locale (not in --include-columns)"]
        );
        assert!(
            mapping
                .notes()
                .iter()
                .any(|note| note.contains("password_changed_at is copied")),
            "{:?}",
            mapping.notes()
        );
        // Naming a column the profile reads anyway changes nothing.
        let mapping = with_columns(ColumnSelection::Include(vec!["email".into()]))
            .bind(&accounts_columns())
            .unwrap();
        assert!(copied_keys(&mapping).is_empty());
        let user = mapping.map_user(&accounts_row()).unwrap();
        assert_eq!(
            user.raw_json.to_value().get("primary_email"),
            Some(&json!("a@b.c"))
        );
    }

    #[test]
    fn a_column_the_profile_reads_cannot_be_excluded() {
        for read in ["id", "email"] {
            let error = with_columns(ColumnSelection::Exclude(vec![read.into()]))
                .bind(&accounts_columns())
                .unwrap_err();
            assert_eq!(
                error,
                MapError::ExcludedColumnRead {
                    column: read.to_owned()
                }
            );
            assert!(error.to_string().contains("--exclude-columns"), "{error}");
        }
    }

    #[test]
    fn a_column_named_like_a_computed_key_cannot_be_included() {
        let columns = vec![
            column("user_uuid", oid::UUID, true),
            column("id", oid::INT4, false),
        ];
        let error = GenericMapping {
            id_column: "user_uuid".into(),
            ..with_columns(ColumnSelection::Include(vec!["id".into()]))
        }
        .bind(&columns)
        .unwrap_err();
        assert_eq!(
            error,
            MapError::IncludedComputedKey {
                column: "id".into()
            }
        );
    }

    #[test]
    fn the_columns_used_are_those_read_copied_or_in_the_replica_identity() {
        let columns = vec![
            column("tenant", oid::TEXT, true),
            column("id", oid::TEXT, true),
            column("email", oid::TEXT, false),
            column("password_hash", oid::TEXT, false),
            column("created_at", oid::TEXT, false),
            column("plan", oid::TEXT, false),
            column("locale", oid::TEXT, false),
        ];
        let mapping = with_columns(ColumnSelection::Exclude(vec![
            "tenant".into(),
            "locale".into(),
        ]))
        .bind(&columns)
        .unwrap();
        let used = mapping.layout().used();
        // created_at (text) is not a sign-up time, so it is only copied; tenant is excluded
        // from raw_json but stays needed: it is in the replica identity.
        assert_eq!(
            used.names(),
            ["tenant", "id", "email", "created_at", "plan"]
        );
        assert_eq!(used.needed(), ["tenant", "id", "email"]);
    }

    #[test]
    fn rows_of_a_relation_narrowed_by_a_column_list_map_by_name() {
        // What a publication's column list sends: the used columns only, in table order.
        let published = vec![
            column("id", oid::TEXT, true),
            column("email", oid::TEXT, false),
            column("plan", oid::TEXT, false),
        ];
        let mapping = bind_default(&published);
        let user = mapping
            .map_user(&row(vec![text("u1"), text("a@b.c"), text("pro")]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": "u1",
                "primary_email": "a@b.c",
                "display_name": null,
                "primary_email_verified": false,
                "plan": "pro",
            })
        );
    }

    #[test]
    fn ids_are_strings_whatever_their_type() {
        let columns = vec![column("id", oid::INT8, true)];
        let mapping = bind_default(&columns);
        let user = mapping
            .map_user(&row(vec![text("9007199254740993")]))
            .unwrap();
        assert_eq!(user.id, "9007199254740993");
        assert_eq!(
            user.raw_json.to_value().get("id"),
            Some(&json!("9007199254740993"))
        );
    }

    #[test]
    fn a_bare_table_gets_nulls_false_and_no_sign_up_time() {
        let columns = vec![column("id", oid::TEXT, true)];
        let mapping = bind_default(&columns);
        let user = mapping.map_user(&row(vec![text("u1")])).unwrap();
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": "u1",
                "primary_email": null,
                "display_name": null,
                "primary_email_verified": false,
            })
        );
    }

    #[test]
    fn display_name_falls_back_to_name() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("name", oid::TEXT, false),
        ];
        let user = bind_default(&columns)
            .map_user(&row(vec![text("u1"), text("Grace")]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value().get("display_name"),
            Some(&json!("Grace"))
        );
        assert_eq!(user.raw_json.to_value().get("name"), None);

        // With both present, display_name wins and name passes through.
        let columns = vec![
            column("id", oid::TEXT, true),
            column("name", oid::TEXT, false),
            column("display_name", oid::TEXT, false),
        ];
        let user = bind_default(&columns)
            .map_user(&row(vec![text("u1"), text("grace"), text("Grace H.")]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value().get("display_name"),
            Some(&json!("Grace H."))
        );
        assert_eq!(user.raw_json.to_value().get("name"), Some(&json!("grace")));
    }

    #[test]
    fn configured_columns_replace_the_defaults() {
        let columns = vec![
            column("user_id", oid::INT4, true),
            column("mail", oid::TEXT, false),
            column("full_name", oid::TEXT, false),
            column("joined_on", oid::DATE, false),
            column("email", oid::TEXT, false),
        ];
        let mapping = GenericMapping {
            id_column: "user_id".to_owned(),
            email_column: Some("mail".to_owned()),
            display_name_column: Some("full_name".to_owned()),
            signed_up_at_column: Some("joined_on".to_owned()),
            columns: ColumnSelection::Profile,
        }
        .bind(&columns)
        .unwrap();
        let user = mapping
            .map_user(&row(vec![
                text("7"),
                text("a@b.c"),
                text("A B"),
                text("2024-01-02"),
                text("old@b.c"),
            ]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": "7",
                "primary_email": "a@b.c",
                "display_name": "A B",
                "signed_up_at_millis": 1_704_153_600_000_i64,
                "primary_email_verified": false,
                "email": "old@b.c",
            })
        );
    }

    #[test]
    fn none_means_no_email_and_no_sign_up_time() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("email", oid::TEXT, false),
            column("created_at", oid::TIMESTAMPTZ, false),
        ];
        let mapping = GenericMapping {
            email_column: None,
            signed_up_at_column: None,
            ..GenericMapping::default()
        }
        .bind(&columns)
        .unwrap();
        let user = mapping
            .map_user(&row(vec![
                text("u1"),
                text("a@b.c"),
                text("2024-01-02 03:04:05+00"),
            ]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value().get("primary_email"),
            Some(&Value::Null)
        );
        assert_eq!(user.raw_json.to_value().get("signed_up_at_millis"), None);
        assert_eq!(user.raw_json.to_value().get("email"), Some(&json!("a@b.c")));
        assert_eq!(
            user.raw_json.to_value().get("created_at"),
            Some(&json!("2024-01-02T03:04:05Z"))
        );
    }

    #[test]
    fn stack_auth_named_columns_feed_their_keys() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("primary_email", oid::TEXT, false),
            column("signed_up_at_millis", oid::INT8, false),
            column("primary_email_verified", oid::BOOL, false),
        ];
        let user = bind_default(&columns)
            .map_user(&row(vec![
                text("u1"),
                text("a@b.c"),
                text("1704164645123"),
                text("t"),
            ]))
            .unwrap();
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": "u1",
                "primary_email": "a@b.c",
                "display_name": null,
                "signed_up_at_millis": 1_704_164_645_123_i64,
                "primary_email_verified": true,
            })
        );
    }

    #[test]
    fn columns_named_like_computed_keys_are_left_out_with_a_note() {
        let columns = vec![
            column("id", oid::INT4, false),
            column("user_uuid", oid::UUID, true),
            column("email", oid::TEXT, false),
        ];
        let mapping = GenericMapping {
            id_column: "user_uuid".to_owned(),
            ..GenericMapping::default()
        }
        .bind(&columns)
        .unwrap();
        assert_eq!(mapping.notes().len(), 1);
        assert!(mapping.notes()[0].contains("column id is left out"));
        let user = mapping
            .map_user(&row(vec![text("1"), text(USER_ID), text("a@b.c")]))
            .unwrap();
        assert_eq!(user.raw_json.to_value().get("id"), Some(&json!(USER_ID)));
    }

    #[test]
    fn a_default_column_of_the_wrong_type_is_skipped_with_a_note() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("created_at", oid::TEXT, false),
            column("email_verified", oid::TEXT, false),
        ];
        let mapping = bind_default(&columns);
        assert_eq!(
            mapping.notes(),
            [
                "column created_at (type oid 25) is not used for signed_up_at_millis: \
                 expected a timestamp, date or integer milliseconds",
                "column email_verified (type oid 25) is not used for primary_email_verified: \
                 expected a boolean, an integer, or a timestamp whose presence means verified",
            ]
        );
        let user = mapping
            .map_user(&row(vec![text("u1"), text("yesterday"), text("yes")]))
            .unwrap();
        assert_eq!(user.raw_json.to_value().get("signed_up_at_millis"), None);
        assert_eq!(
            user.raw_json.to_value().get("created_at"),
            Some(&json!("yesterday"))
        );
        assert_eq!(
            user.raw_json.to_value().get("primary_email_verified"),
            Some(&json!(false))
        );
        assert_eq!(
            user.raw_json.to_value().get("email_verified"),
            Some(&json!("yes"))
        );
    }

    #[test]
    fn verification_from_a_timestamp_is_its_presence() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("email_verified", oid::TIMESTAMPTZ, false),
        ];
        let mapping = bind_default(&columns);
        let verified = mapping
            .map_user(&row(vec![text("u1"), text("2024-01-02 03:04:05+00")]))
            .unwrap();
        assert_eq!(
            verified.raw_json.to_value().get("primary_email_verified"),
            Some(&json!(true))
        );
        let unverified = mapping
            .map_user(&row(vec![text("u1"), ColumnValue::Null]))
            .unwrap();
        assert_eq!(
            unverified.raw_json.to_value().get("primary_email_verified"),
            Some(&json!(false))
        );
    }

    #[test]
    fn null_columns() {
        let mapping = bind_default(&users_columns());
        let mut values = users_row().0;
        for value in &mut values[1..] {
            *value = ColumnValue::Null;
        }
        let user = mapping.map_user(&row(values)).unwrap();
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": USER_ID,
                "primary_email": null,
                "display_name": null,
                "primary_email_verified": false,
                "profile_image_url": null,
                "server_metadata": null,
                "login_count": null,
                "roles": null,
            })
        );
    }

    #[test]
    fn unchanged_toast_is_left_for_apply() {
        let mapping = bind_default(&users_columns());
        let mut values = users_row().0;
        values[1] = ColumnValue::UnchangedToast;
        values[3] = ColumnValue::UnchangedToast;
        values[6] = ColumnValue::UnchangedToast;
        let user = mapping.map_user(&row(values)).unwrap();
        assert_eq!(
            user.unchanged_keys,
            ["primary_email", "signed_up_at_millis", "server_metadata"]
        );
        for key in &user.unchanged_keys {
            assert!(!user.raw_json.contains_key(key), "{key}");
        }
        assert_eq!(
            user.raw_json.to_value().get("display_name"),
            Some(&json!("Ada Lovelace"))
        );
    }

    #[test]
    fn the_id_must_be_present() {
        let mapping = bind_default(&users_columns());
        let mut values = users_row().0;
        values[0] = ColumnValue::Null;
        assert_eq!(
            mapping.map_user(&row(values.clone())),
            Err(MapError::NullId {
                column: "id".to_owned()
            })
        );
        values[0] = ColumnValue::UnchangedToast;
        assert_eq!(
            mapping.map_user(&row(values)),
            Err(MapError::UnchangedToastId {
                column: "id".to_owned()
            })
        );
    }

    #[test]
    fn rows_must_match_the_relation_width() {
        let mapping = bind_default(&users_columns());
        let mut values = users_row().0;
        values.pop();
        let expected = Err(MapError::ColumnCount {
            expected: 9,
            actual: 8,
        });
        assert_eq!(
            mapping.map_user(&row(values.clone())).map(|u| u.id),
            expected
        );
        assert_eq!(mapping.map_key(&row(values)), expected);
    }

    #[test]
    fn conversion_errors_name_column_and_type_but_not_the_value() {
        let mapping = bind_default(&users_columns());
        let mut values = users_row().0;
        values[7] = text("secret-value");
        let error = mapping.map_user(&row(values)).unwrap_err();
        assert_eq!(
            error,
            MapError::Column {
                column: "login_count".to_owned(),
                type_oid: oid::INT4,
                target: PASSTHROUGH_TARGET,
                source: ValueError::NotInteger,
            }
        );
        let message = error.to_string();
        assert_eq!(
            message,
            "column login_count (type oid 23) cannot become a JSON value"
        );
        assert!(!message.contains("secret"));

        let mut values = users_row().0;
        values[3] = text("03/04/2024");
        let error = mapping.map_user(&row(values)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "column created_at (type oid 1184) cannot become signed_up_at_millis"
        );

        let mut values = users_row().0;
        values[2] = ColumnValue::Binary(Bytes::from_static(b"Ada"));
        assert!(matches!(
            mapping.map_user(&row(values)),
            Err(MapError::Column {
                source: ValueError::BinaryFormat,
                ..
            })
        ));
    }

    #[test]
    fn map_key_reads_a_key_only_tuple() {
        let mapping = bind_default(&users_columns());
        let mut key_tuple = vec![ColumnValue::Null; 9];
        key_tuple[0] = text(USER_ID);
        assert_eq!(mapping.map_key(&row(key_tuple)), Ok(USER_ID.to_owned()));
        // REPLICA IDENTITY FULL sends the whole old row, including unconvertible values that
        // map_key must not care about.
        let mut full = users_row().0;
        full[7] = text("not a number");
        assert_eq!(mapping.map_key(&row(full)), Ok(USER_ID.to_owned()));
        assert_eq!(
            mapping.map_key(&row(vec![ColumnValue::Null; 9])),
            Err(MapError::NullId {
                column: "id".to_owned()
            })
        );
    }

    #[test]
    fn bind_requires_the_id_column_and_names_the_option() {
        let columns = vec![
            column("user_id", oid::UUID, true),
            column("email", oid::TEXT, false),
        ];
        let error = GenericMapping::default().bind(&columns).unwrap_err();
        assert_eq!(
            error,
            MapError::IdColumnMissing {
                column: "id".to_owned(),
                available: "user_id, email".to_owned(),
            }
        );
        let message = error.to_string();
        assert!(message.contains("user_id, email"), "{message}");
        assert!(message.contains("--id-column"), "{message}");
    }

    #[test]
    fn bind_requires_the_id_in_the_replica_identity() {
        let columns = vec![
            column("pk", oid::INT8, true),
            column("id", oid::UUID, false),
        ];
        assert_eq!(
            GenericMapping::default().bind(&columns).unwrap_err(),
            MapError::IdNotInReplicaIdentity {
                column: "id".to_owned()
            }
        );
    }

    #[test]
    fn bind_requires_explicitly_configured_columns() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("email", oid::TEXT, false),
        ];
        let cases = [
            (
                GenericMapping {
                    email_column: Some("mail".to_owned()),
                    ..GenericMapping::default()
                },
                EMAIL_OPTION,
                "mail",
            ),
            (
                GenericMapping {
                    display_name_column: Some("display_name".to_owned()),
                    ..GenericMapping::default()
                },
                DISPLAY_NAME_OPTION,
                "display_name",
            ),
            (
                GenericMapping {
                    signed_up_at_column: Some("inserted_at".to_owned()),
                    ..GenericMapping::default()
                },
                SIGNED_UP_AT_OPTION,
                "inserted_at",
            ),
        ];
        for (mapping, option, missing) in cases {
            let error = mapping.bind(&columns).unwrap_err();
            assert_eq!(
                error,
                MapError::ConfiguredColumnMissing {
                    option,
                    column: missing.to_owned(),
                    available: "id, email".to_owned(),
                }
            );
            assert!(error.to_string().contains(option));
        }
    }

    #[test]
    fn bind_rejects_a_configured_sign_up_column_of_the_wrong_type() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("joined", oid::TEXT, false),
        ];
        let error = GenericMapping {
            signed_up_at_column: Some("joined".to_owned()),
            ..GenericMapping::default()
        }
        .bind(&columns)
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "column joined (type oid 25) cannot become signed_up_at_millis"
        );
        let reason = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(
            reason.as_deref(),
            Some("expected a timestamp, date or integer milliseconds")
        );
    }

    #[test]
    fn one_column_can_feed_two_keys() {
        let columns = vec![column("email", oid::TEXT, true)];
        let mapping = GenericMapping {
            id_column: "email".to_owned(),
            ..GenericMapping::default()
        }
        .bind(&columns)
        .unwrap();
        let user = mapping.map_user(&row(vec![text("a@b.c")])).unwrap();
        assert_eq!(user.raw_json.to_value().get("id"), Some(&json!("a@b.c")));
        assert_eq!(
            user.raw_json.to_value().get("primary_email"),
            Some(&json!("a@b.c"))
        );
        assert_eq!(user.raw_json.to_value().get("email"), None);
    }
}
