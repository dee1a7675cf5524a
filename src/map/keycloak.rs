//! The `keycloak` profile: Keycloak's `user_entity` table (schema `public` by default).
//!
//! | `user_entity` column                           | `raw_json` key           |
//! |------------------------------------------------|--------------------------|
//! | `id` (varchar uuid)                            | `id`                     |
//! | `email`                                        | `primary_email`          |
//! | `email_verified`                               | `primary_email_verified` |
//! | `first_name` + `last_name`, else `username`    | `display_name`           |
//! | `created_timestamp` (bigint ms)                | `signed_up_at_millis`    |
//! | —                                              | `profile_image_url`, `client_metadata`, `client_read_only_metadata`, `server_metadata` (null) |
//!
//! Every other column passes through (`username`, `first_name`, `last_name`, `enabled`,
//! `realm_id`, `federation_link`, `not_before`, …) except `email_constraint`, Keycloak's
//! internal uniqueness key (the email, or the id when there is none), and any column whose
//! name says it holds a credential. Keycloak keeps credentials in `credential` and custom
//! attributes in `user_attribute`; neither is replicated.
//!
//! **Realms.** One Keycloak database holds every realm, including `master` with its
//! administrators, and user ids are unique across them. An application's users are one
//! realm's users, so `--realm` is required: replicating "all realms" would put Keycloak's own
//! administrators into the application's users table. Rows of other realms are skipped, and a
//! user moved out of the realm (an update of `realm_id`) is soft-deleted like a delete.
//! `user_entity.realm_id` holds the realm's *id*, a UUID for realms created in the admin
//! console, while operators know realms by name; `--realm` takes either, and usersync looks
//! the name up in Keycloak's `realm` table when it starts ([`KeycloakMapping::realm_id`]). A
//! value it cannot resolve (no realm of that name or id; or, when the role may not read
//! `realm`, no user carrying it as `realm_id`) is refused: taken as an id, it would make every
//! user of the realm another realm's.
//!
//! **Service accounts** (`service_account_client_link` set) are a client's identity, not a
//! person, and are skipped like users of another realm.
//!
//! `enabled = false` users stay live users (with `enabled: false` in raw_json): a disabled
//! account still exists, owns data, and may be enabled again.

use serde_json::Value;

use super::columns::{
    is_credential, BoundColumn, ColumnNeed, OtherColumns, Relation, RowLayout, UserJson,
};
use super::profile::{MappingPlan, RowMapper, RowOutcome, SkipReason};
use super::selection::ColumnSelection;
use super::value::{self, oid, TextValue};
use super::{key, MapError, MappedUser};
use crate::decode::{ColumnValue, RelationColumn};

/// Keycloak creates its tables in the database's default schema.
pub const DEFAULT_TABLE: &str = "public.user_entity";
/// Keycloak's realms, in the same schema as `user_entity`: `--realm` names are looked up here.
pub const REALM_TABLE: &str = "realm";
const PROFILE: &str = "keycloak";

const ID: ColumnNeed = ColumnNeed::named(PROFILE, &["id"]);
const EMAIL: ColumnNeed = ColumnNeed::named(PROFILE, &["email"]);
const FIRST_NAME: ColumnNeed = ColumnNeed::named(PROFILE, &["first_name"]);
const LAST_NAME: ColumnNeed = ColumnNeed::named(PROFILE, &["last_name"]);
const USERNAME: ColumnNeed = ColumnNeed::named(PROFILE, &["username"]);
const REALM_ID: ColumnNeed = ColumnNeed::named(PROFILE, &["realm_id"]);
const SERVICE_ACCOUNT: ColumnNeed = ColumnNeed::named(PROFILE, &["service_account_client_link"]);
const EMAIL_VERIFIED: ColumnNeed =
    ColumnNeed::typed(PROFILE, &["email_verified"], (&[oid::BOOL], "boolean"));
const CREATED_TIMESTAMP: ColumnNeed = ColumnNeed::typed(
    PROFILE,
    &["created_timestamp"],
    (value::MILLIS_TYPES, "bigint milliseconds"),
);
/// Keycloak's own uniqueness helper, not a fact about the user.
const EMAIL_CONSTRAINT: &str = "email_constraint";

/// The `keycloak` profile's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeycloakMapping {
    /// `--realm` as given: a realm name or id.
    pub realm: String,
    /// The realm's id (`user_entity.realm_id`) once resolved on the source
    /// (`source::catalog::resolve_profile`, which every command runs before mapping rows);
    /// until then `realm` stands for the id.
    pub realm_id: Option<String>,
    /// Which other columns are copied (`--include-columns`, `--exclude-columns`).
    pub columns: ColumnSelection,
}

impl KeycloakMapping {
    pub fn new(realm: impl Into<String>) -> Self {
        KeycloakMapping {
            realm: realm.into(),
            realm_id: None,
            columns: ColumnSelection::default(),
        }
    }

    /// The `realm_id` whose users are replicated.
    pub fn realm_id(&self) -> &str {
        self.realm_id.as_deref().unwrap_or(&self.realm)
    }

    pub fn bind(&self, columns: &[RelationColumn]) -> Result<BoundKeycloak, MapError> {
        let relation = Relation::new(columns);
        let id = relation.require_id(&ID)?;
        let email = relation.require(&EMAIL)?;
        let email_verified = relation.require(&EMAIL_VERIFIED)?;
        let first_name = relation.require(&FIRST_NAME)?;
        let last_name = relation.require(&LAST_NAME)?;
        let username = relation.require(&USERNAME)?;
        let created_timestamp = relation.require(&CREATED_TIMESTAMP)?;
        let realm_id = relation.require(&REALM_ID)?;
        let service_account = relation.optional(&SERVICE_ACCOUNT)?;

        let mut notes = Vec::new();
        let other = OtherColumns::bind(
            &relation,
            &[&id, &email, &email_verified, &created_timestamp],
            |name| name == EMAIL_CONSTRAINT || is_credential(name),
            &key::STACK_AUTH,
            &self.columns,
            &mut notes,
        )?;
        Ok(BoundKeycloak {
            layout: relation.layout(id),
            realm: self.realm.clone(),
            wanted_realm_id: self.realm_id().to_owned(),
            email,
            email_verified,
            first_name,
            last_name,
            username,
            created_timestamp,
            realm_id,
            service_account,
            other,
            notes,
        })
    }
}

/// A [`KeycloakMapping`] resolved against `user_entity` as the Relation message describes it.
#[derive(Debug, Clone)]
pub struct BoundKeycloak {
    layout: RowLayout,
    realm: String,
    wanted_realm_id: String,
    email: BoundColumn,
    email_verified: BoundColumn,
    first_name: BoundColumn,
    last_name: BoundColumn,
    username: BoundColumn,
    created_timestamp: BoundColumn,
    realm_id: BoundColumn,
    service_account: Option<BoundColumn>,
    other: OtherColumns,
    notes: Vec<String>,
}

impl BoundKeycloak {
    /// `first_name last_name` (either may be missing), else `username`; `None` (the target
    /// keeps its display name) when a part is unchanged TOAST. A part goes out of line only
    /// when the row outgrows 2 kB, which `varchar(255)` names reach only in 4-byte
    /// characters; should the other part change in that same update, the kept display name
    /// lags until an update sends both parts. The mapper cannot do better without the
    /// target's row, and apply keeps whole keys, not their ingredients.
    fn display_name(&self, values: &[ColumnValue]) -> Result<Option<Value>, MapError> {
        let mut parts = Vec::with_capacity(2);
        for column in [&self.first_name, &self.last_name] {
            match column.value(values, key::DISPLAY_NAME)? {
                TextValue::Text(text) => parts.push(text.trim()),
                TextValue::Null => {}
                TextValue::UnchangedToast => return Ok(None),
            }
        }
        let full_name = parts
            .into_iter()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if !full_name.is_empty() {
            return Ok(Some(Value::String(full_name)));
        }
        self.username.string(values, key::DISPLAY_NAME)
    }

    fn map_user(&self, id: &str, values: &[ColumnValue]) -> Result<MappedUser, MapError> {
        let mut user = UserJson::new(id);
        user.set_string(key::PRIMARY_EMAIL, &self.email, values)?;
        user.set_email_verified(&self.email_verified, values)?;
        user.set(key::DISPLAY_NAME, self.display_name(values)?);
        user.set_signed_up_at(&self.created_timestamp, values)?;
        for key in [
            key::PROFILE_IMAGE_URL,
            key::CLIENT_METADATA,
            key::CLIENT_READ_ONLY_METADATA,
            key::SERVER_METADATA,
        ] {
            user.set(key, Some(Value::Null));
        }
        user.pass_through(&self.other.passthrough, values)?;
        Ok(user.finish(id.to_owned()))
    }
}

impl RowMapper for BoundKeycloak {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn skip(&self, values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        let realm = self.realm_id.filter_value(values, "realm_id")?;
        if realm != Some(self.wanted_realm_id.as_str()) {
            return Ok(Some(SkipReason::OtherRealm));
        }
        if let Some(link) = &self.service_account {
            if link
                .filter_value(values, "service_account_client_link")?
                .is_some()
            {
                return Ok(Some(SkipReason::ServiceAccount));
            }
        }
        Ok(None)
    }

    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError> {
        self.map_user(id, values).map(RowOutcome::User)
    }

    fn notes(&self) -> &[String] {
        &self.notes
    }

    fn plan(&self) -> MappingPlan {
        let realm = if self.realm == self.wanted_realm_id {
            format!("realm {}", self.realm)
        } else {
            format!("realm {} (id {})", self.realm, self.wanted_realm_id)
        };
        let mut rules = vec![format!(
            "{} other than that of {realm}: skipped; a user moved to another realm is \
             soft-deleted",
            self.realm_id.name
        )];
        if let Some(link) = &self.service_account {
            rules.push(format!("{} set (service accounts): skipped", link.name));
        }
        MappingPlan {
            keys: vec![
                (key::ID, self.layout.id.name.clone()),
                (key::PRIMARY_EMAIL, self.email.name.clone()),
                (
                    key::PRIMARY_EMAIL_VERIFIED,
                    self.email_verified.name.clone(),
                ),
                (
                    key::DISPLAY_NAME,
                    format!(
                        "{} + ' ' + {}, else {}",
                        self.first_name.name, self.last_name.name, self.username.name
                    ),
                ),
                (
                    key::SIGNED_UP_AT_MILLIS,
                    self.created_timestamp.name.clone(),
                ),
                (key::PROFILE_IMAGE_URL, "(none: null)".into()),
                (key::CLIENT_METADATA, "(none: null)".into()),
                (key::CLIENT_READ_ONLY_METADATA, "(none: null)".into()),
                (key::SERVER_METADATA, "(none: null)".into()),
            ],
            passthrough: self.other.passthrough_names(),
            excluded: self.other.excluded.clone(),
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::decode::TupleData;
    use crate::map::columns::fixtures::{live_user, relation, row_changing, text};

    const USER_ID: &str = "0c5b1f1e-8d1e-4f7a-9d7e-3c1f2b4a5d6e";
    const REALM_ID: &str = "7d8f3a2e-1b4c-4e5f-8a9b-0c1d2e3f4a5b";

    /// `user_entity` as Keycloak's Liquibase changelog creates it.
    fn user_entity() -> Vec<RelationColumn> {
        relation(
            &[
                ("id", oid::VARCHAR),
                ("email", oid::VARCHAR),
                ("email_constraint", oid::VARCHAR),
                ("email_verified", oid::BOOL),
                ("enabled", oid::BOOL),
                ("federation_link", oid::VARCHAR),
                ("first_name", oid::VARCHAR),
                ("last_name", oid::VARCHAR),
                ("realm_id", oid::VARCHAR),
                ("username", oid::VARCHAR),
                ("created_timestamp", oid::INT8),
                ("service_account_client_link", oid::VARCHAR),
                ("not_before", oid::INT4),
            ],
            &["id"],
        )
    }

    fn grace(extra: &[(&str, ColumnValue)]) -> TupleData {
        row_changing(
            &user_entity(),
            &[
                ("id", text(USER_ID)),
                ("email", text("grace@example.org")),
                ("email_constraint", text("grace@example.org")),
                ("email_verified", text("t")),
                ("enabled", text("t")),
                ("first_name", text("Grace")),
                ("last_name", text("Hopper")),
                ("realm_id", text(REALM_ID)),
                ("username", text("grace")),
                ("created_timestamp", text("1704164645123")),
                ("not_before", text("0")),
            ],
            extra,
        )
    }

    fn bind() -> BoundKeycloak {
        KeycloakMapping {
            realm_id: Some(REALM_ID.into()),
            ..KeycloakMapping::new("acme")
        }
        .bind(&user_entity())
        .unwrap()
    }

    #[test]
    fn maps_user_entity_into_the_stack_auth_shape() {
        let mapping = bind();
        assert!(mapping.notes().is_empty(), "{:?}", mapping.notes());
        let user = live_user(mapping.map_row(&grace(&[])).unwrap());
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": USER_ID,
                "primary_email": "grace@example.org",
                "primary_email_verified": true,
                "display_name": "Grace Hopper",
                "signed_up_at_millis": 1_704_164_645_123_i64,
                "profile_image_url": null,
                "client_metadata": null,
                "client_read_only_metadata": null,
                "server_metadata": null,
                "enabled": true,
                "federation_link": null,
                "first_name": "Grace",
                "last_name": "Hopper",
                "realm_id": REALM_ID,
                "username": "grace",
                "service_account_client_link": null,
                "not_before": 0,
            })
        );
        assert_eq!(mapping.plan().excluded, ["email_constraint"]);
    }

    #[test]
    fn display_name_uses_what_names_there_are_then_the_username() {
        let mapping = bind();
        let cases = [
            (text("Grace"), ColumnValue::Null, json!("Grace")),
            (ColumnValue::Null, text("Hopper"), json!("Hopper")),
            (text(" "), text(""), json!("grace")),
            (ColumnValue::Null, ColumnValue::Null, json!("grace")),
        ];
        for (first, last, expected) in cases {
            let row = grace(&[("first_name", first), ("last_name", last)]);
            let user = live_user(mapping.map_row(&row).unwrap());
            assert_eq!(user.raw_json["display_name"], expected);
        }
        let row = grace(&[("first_name", ColumnValue::UnchangedToast)]);
        let user = live_user(mapping.map_row(&row).unwrap());
        assert!(user.unchanged_keys.contains(&"display_name".to_owned()));
        assert!(user.unchanged_keys.contains(&"first_name".to_owned()));
    }

    #[test]
    fn other_realms_and_service_accounts_are_skipped() {
        let mapping = bind();
        for (row, reason) in [
            (
                grace(&[("realm_id", text("master"))]),
                SkipReason::OtherRealm,
            ),
            (
                grace(&[("realm_id", ColumnValue::Null)]),
                SkipReason::OtherRealm,
            ),
            (
                grace(&[("service_account_client_link", text("client-uuid"))]),
                SkipReason::ServiceAccount,
            ),
        ] {
            assert_eq!(
                mapping.map_row(&row).unwrap(),
                RowOutcome::Skip {
                    id: USER_ID.into(),
                    reason
                }
            );
            assert_eq!(mapping.skip_reason(&row), Ok(Some(reason)));
        }
        assert_eq!(mapping.skip_reason(&grace(&[])), Ok(None));
        assert_eq!(
            mapping.skip_reason(&grace(&[("realm_id", ColumnValue::UnchangedToast)])),
            Err(MapError::UnchangedToastFilter {
                column: "realm_id".into()
            })
        );
    }

    #[test]
    fn an_unresolved_realm_is_taken_as_the_id() {
        let mapping = KeycloakMapping::new(REALM_ID);
        assert_eq!(mapping.realm_id(), REALM_ID);
        let bound = mapping.bind(&user_entity()).unwrap();
        assert!(matches!(
            bound.map_row(&grace(&[])),
            Ok(RowOutcome::User(_))
        ));
        assert!(bound.plan().rules[0].contains(&format!("realm {REALM_ID}:")));
        assert!(bind().plan().rules[0].contains(&format!("realm acme (id {REALM_ID})")));
    }

    #[test]
    fn disabled_users_stay_live() {
        let user = live_user(bind().map_row(&grace(&[("enabled", text("f"))])).unwrap());
        assert_eq!(user.raw_json["enabled"], json!(false));
    }

    #[test]
    fn bind_requires_the_realm_column() {
        let columns: Vec<_> = user_entity()
            .into_iter()
            .filter(|c| c.name != "realm_id")
            .collect();
        assert!(matches!(
            KeycloakMapping::new("acme").bind(&columns),
            Err(MapError::ProfileColumnMissing { profile: "keycloak", column, .. })
                if column == "realm_id"
        ));
    }
}
