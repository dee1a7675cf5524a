//! The `supabase` profile: Supabase Auth's `auth.users` (GoTrue).
//!
//! | `auth.users` column                                  | `raw_json` key              |
//! |------------------------------------------------------|-----------------------------|
//! | `id` (uuid)                                          | `id`                        |
//! | `email`                                              | `primary_email`             |
//! | `email_confirmed_at` is not NULL                     | `primary_email_verified`    |
//! | `raw_user_meta_data ->> 'full_name'`, else `'name'`  | `display_name`              |
//! | `raw_user_meta_data ->> 'avatar_url'`, else `'picture'` | `profile_image_url`      |
//! | `created_at`                                         | `signed_up_at_millis`       |
//! | `raw_user_meta_data`                                 | `client_metadata`           |
//! | `raw_app_meta_data`                                  | `client_read_only_metadata` |
//! | —                                                    | `server_metadata` (null)    |
//!
//! **Metadata.** Stack Auth has three metadata objects: `client_metadata` (the user reads and
//! writes it), `client_read_only_metadata` (the user reads it, only the server writes it) and
//! `server_metadata` (server only). Supabase's `raw_user_meta_data` is what the user sets with
//! `auth.updateUser({ data })`, so it is `client_metadata`. `raw_app_meta_data` can be changed
//! only with the service role, but the user reads it (it is in their JWT and user object), so
//! it is `client_read_only_metadata`, not `server_metadata`: calling it server-only would
//! promise a secrecy it does not have. Supabase has nothing server-only, so `server_metadata`
//! is null.
//!
//! **Soft deletes.** `auth.admin.deleteUser(id, true)` keeps the row and sets `deleted_at`;
//! such a row becomes a soft-deleted user on the target with that `deleted_at`. Clearing it
//! brings the user back, as a re-insert does.
//!
//! **Anonymous users** (`is_anonymous = true`) are skipped unless `--include-anonymous`: they
//! are guest sessions, not people an application lists or joins to. When one links an email it
//! becomes a normal user and appears; when a replicated user becomes anonymous, or is skipped
//! for any reason by an update, the replicator soft-deletes it. GoTrue versions before 2024
//! have no `is_anonymous` column (and in some it is a generated column, which logical
//! replication does not publish); then a row with neither email nor phone counts as anonymous,
//! which is how GoTrue itself defined the column.
//!
//! **Never copied:** credentials and the state of verification flows: `encrypted_password`,
//! every `*_token*` column (`confirmation_token`, `recovery_token`, `email_change_token_new`,
//! `email_change_token_current`, `phone_change_token`, `reauthentication_token`), and the
//! `confirmation_*`, `recovery_*`, `reauthentication_*`, `email_change*` and `phone_change*`
//! columns (pending addresses and when codes were sent). Also never copied: any column whose
//! name says credential (`columns::is_credential`), should a later version add one. Every other
//! column passes through under its own name (`phone`, `last_sign_in_at`, `role`, `aud`,
//! `banned_until`, `is_sso_user`, `deleted_at`, …).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::columns::{
    is_credential, BoundColumn, ColumnNeed, OtherColumns, Relation, RowLayout, UserJson,
};
use super::profile::{MappingPlan, RowMapper, RowOutcome, SkipReason};
use super::selection::ColumnSelection;
use super::value::{self, oid};
use super::{key, MapError, MappedUser, Member};
use crate::decode::{ColumnValue, RelationColumn};

/// Where GoTrue creates its users.
pub const DEFAULT_TABLE: &str = "auth.users";
const PROFILE: &str = "supabase";

const JSON_TYPES: (&[u32], &str) = (&[oid::JSONB, oid::JSON], "jsonb or json");
const TIME_TYPES: (&[u32], &str) = (value::TIME_TYPES, "a timestamp");

const ID: ColumnNeed = ColumnNeed::named(PROFILE, &["id"]);
const EMAIL: ColumnNeed = ColumnNeed::named(PROFILE, &["email"]);
const PHONE: ColumnNeed = ColumnNeed::named(PROFILE, &["phone"]);
const EMAIL_CONFIRMED_AT: ColumnNeed =
    ColumnNeed::typed(PROFILE, &["email_confirmed_at"], TIME_TYPES);
const CREATED_AT: ColumnNeed = ColumnNeed::typed(PROFILE, &["created_at"], TIME_TYPES);
const USER_META_DATA: ColumnNeed = ColumnNeed::typed(PROFILE, &["raw_user_meta_data"], JSON_TYPES);
const APP_META_DATA: ColumnNeed = ColumnNeed::typed(PROFILE, &["raw_app_meta_data"], JSON_TYPES);
/// Added to GoTrue in 2022.
const DELETED_AT: ColumnNeed = ColumnNeed::typed(PROFILE, &["deleted_at"], TIME_TYPES);
/// Added to GoTrue in 2024.
const IS_ANONYMOUS: ColumnNeed =
    ColumnNeed::typed(PROFILE, &["is_anonymous"], (&[oid::BOOL], "boolean"));

/// `raw_user_meta_data` fields that name the user, preferred first (OAuth providers fill
/// `full_name` and `name`; sign-up forms usually one of them).
const DISPLAY_NAME_FIELDS: [&str; 2] = ["full_name", "name"];
/// `raw_user_meta_data` fields with a picture URL, preferred first.
const AVATAR_FIELDS: [&str; 2] = ["avatar_url", "picture"];

/// Prefixes of columns holding the state of a verification flow (pending addresses, when a
/// code was sent): not facts about the user, and next to the tokens they belong to.
const FLOW_PREFIXES: [&str; 5] = [
    "confirmation_",
    "recovery_",
    "reauthentication_",
    "email_change",
    "phone_change",
];

/// Whether a column is never copied into raw_json (see the module docs).
pub fn is_excluded(name: &str) -> bool {
    is_credential(name) || FLOW_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// The `supabase` profile's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SupabaseMapping {
    /// Replicate anonymous users too.
    pub include_anonymous: bool,
    /// Which other columns are copied (`--include-columns`, `--exclude-columns`).
    pub columns: ColumnSelection,
}

/// How a row is recognised as an anonymous user.
#[derive(Debug, Clone)]
enum AnonymousTest {
    /// `is_anonymous = true`.
    Flag(BoundColumn),
    /// No `is_anonymous` column: neither email nor phone, GoTrue's original definition.
    NoContact {
        email: BoundColumn,
        phone: Option<BoundColumn>,
    },
}

/// A [`SupabaseMapping`] resolved against `auth.users` as the Relation message describes it.
#[derive(Debug, Clone)]
pub struct BoundSupabase {
    layout: RowLayout,
    email: BoundColumn,
    email_confirmed_at: BoundColumn,
    created_at: BoundColumn,
    user_meta_data: BoundColumn,
    app_meta_data: BoundColumn,
    deleted_at: Option<BoundColumn>,
    /// `None` when anonymous users are included.
    anonymous: Option<AnonymousTest>,
    other: OtherColumns,
    notes: Vec<String>,
}

impl SupabaseMapping {
    pub fn bind(&self, columns: &[RelationColumn]) -> Result<BoundSupabase, MapError> {
        let relation = Relation::new(columns);
        let id = relation.require_id(&ID)?;
        let email = relation.require(&EMAIL)?;
        let email_confirmed_at = relation.require(&EMAIL_CONFIRMED_AT)?;
        let created_at = relation.require(&CREATED_AT)?;
        let user_meta_data = relation.require(&USER_META_DATA)?;
        let app_meta_data = relation.require(&APP_META_DATA)?;
        let deleted_at = relation.optional(&DELETED_AT)?;
        let mut notes = Vec::new();
        if deleted_at.is_none() {
            notes.push(
                "no deleted_at column (GoTrue before 2022): soft-deleted Supabase users \
                 cannot be recognised"
                    .to_owned(),
            );
        }
        let anonymous = if self.include_anonymous {
            None
        } else {
            Some(match relation.optional(&IS_ANONYMOUS)? {
                Some(flag) => AnonymousTest::Flag(flag),
                None => {
                    notes.push(
                        "no is_anonymous column in the replicated columns: rows with neither \
                         email nor phone count as anonymous users"
                            .to_owned(),
                    );
                    AnonymousTest::NoContact {
                        email: email.clone(),
                        phone: relation.optional(&PHONE)?,
                    }
                }
            })
        };

        let other = OtherColumns::bind(
            &relation,
            &[&id, &email, &created_at, &user_meta_data, &app_meta_data],
            is_excluded,
            &key::STACK_AUTH,
            &self.columns,
            &mut notes,
        )?;
        Ok(BoundSupabase {
            layout: relation.layout(id),
            email,
            email_confirmed_at,
            created_at,
            user_meta_data,
            app_meta_data,
            deleted_at,
            anonymous,
            other,
            notes,
        })
    }
}

impl BoundSupabase {
    fn map_user(&self, id: &str, values: &[ColumnValue]) -> Result<MappedUser, MapError> {
        let mut user = UserJson::new(id);
        user.set_string(key::PRIMARY_EMAIL, &self.email, values)?;
        user.set_email_verified(&self.email_confirmed_at, values)?;
        user.set_signed_up_at(&self.created_at, values)?;
        match self.user_meta_data.member(values, key::CLIENT_METADATA)? {
            // Unchanged TOAST: the keys derived from it did not change either.
            None => {
                for key in [
                    key::CLIENT_METADATA,
                    key::DISPLAY_NAME,
                    key::PROFILE_IMAGE_URL,
                ] {
                    user.set(key, None);
                }
            }
            Some(meta) => {
                // Read for the two fields; the document itself goes as the source holds it.
                let fields = NameFields::of(&meta);
                user.set(
                    key::DISPLAY_NAME,
                    Some(first_text(&[fields.full_name, fields.name])),
                );
                user.set(
                    key::PROFILE_IMAGE_URL,
                    Some(first_text(&[fields.avatar_url, fields.picture])),
                );
                user.set_member(key::CLIENT_METADATA, Some(meta));
            }
        }
        user.set_member(
            key::CLIENT_READ_ONLY_METADATA,
            self.app_meta_data
                .member(values, key::CLIENT_READ_ONLY_METADATA)?,
        );
        user.set(key::SERVER_METADATA, Some(Value::Null));
        user.pass_through(&self.other.passthrough, values)?;
        Ok(user.finish(id.to_owned()))
    }
}

/// The `raw_user_meta_data` fields that name the user and hold a picture, where they are
/// strings. A document's text is read for them alone: every other member is skipped without
/// being built, so they are found whatever else the document holds (a number beyond a
/// double, deep nesting). A key given twice keeps its last value, as in `jsonb`. (One of
/// these four holding a number beyond a double leaves all four unknown: serde_json reads a
/// value's number before it can be told it is not wanted.)
#[derive(Debug, Default)]
struct NameFields {
    full_name: Option<String>,
    name: Option<String>,
    avatar_url: Option<String>,
    picture: Option<String>,
}

impl NameFields {
    fn of(meta: &Member) -> NameFields {
        match meta {
            Member::Text(text) => serde_json::from_str(text).unwrap_or_default(),
            Member::Value(value) => {
                let mut fields = NameFields::default();
                if let Value::Object(object) = value {
                    for (key, value) in object {
                        if let Some(field) = fields.field(key) {
                            *field = value.as_str().map(str::to_owned);
                        }
                    }
                }
                fields
            }
        }
    }

    fn field(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "full_name" => Some(&mut self.full_name),
            "name" => Some(&mut self.name),
            "avatar_url" => Some(&mut self.avatar_url),
            "picture" => Some(&mut self.picture),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for NameFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = NameFields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NameFields, A::Error> {
                let mut fields = NameFields::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match fields.field(&key) {
                        Some(field) => *field = map.next_value::<Text>()?.0,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A value if it is a string; any other value is skipped.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text, E> {
                Ok(Text(Some(text.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// The first of `fields` that holds a non-blank string, or null.
fn first_text(fields: &[Option<String>]) -> Value {
    fields
        .iter()
        .filter_map(Option::as_deref)
        .map(str::trim)
        .find(|text| !text.is_empty())
        .map_or(Value::Null, |text| Value::String(text.to_owned()))
}

impl RowMapper for BoundSupabase {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn skip(&self, values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        let anonymous = match &self.anonymous {
            None => false,
            Some(AnonymousTest::Flag(flag)) => {
                flag.filter_value(values, "is_anonymous")? == Some("t")
            }
            Some(AnonymousTest::NoContact { email, phone }) => {
                let blank = |column: &BoundColumn| -> Result<bool, MapError> {
                    Ok(column
                        .filter_value(values, "is_anonymous")?
                        .is_none_or(str::is_empty))
                };
                blank(email)? && phone.as_ref().map_or(Ok(true), blank)?
            }
        };
        Ok(anonymous.then_some(SkipReason::Anonymous))
    }

    /// A live user, or a soft-deleted one when `deleted_at` is set.
    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError> {
        let deleted_at = match &self.deleted_at {
            Some(column) => match column.filter_value(values, "deleted_at")? {
                Some(text) => Some(
                    value::micros_from_text(column.type_oid, text)
                        .map_err(|source| column.error("deleted_at", source))?,
                ),
                None => None,
            },
            None => None,
        };
        let user = self.map_user(id, values)?;
        Ok(match deleted_at {
            Some(at) => RowOutcome::Deleted { user, at },
            None => RowOutcome::User(user),
        })
    }

    fn notes(&self) -> &[String] {
        &self.notes
    }

    fn plan(&self) -> MappingPlan {
        let meta = &self.user_meta_data.name;
        let mut rules = Vec::new();
        match &self.deleted_at {
            Some(column) => rules.push(format!(
                "{} set: the user is soft-deleted on the target at that time",
                column.name
            )),
            None => rules.push("no deleted_at column: Supabase soft deletes not recognised".into()),
        }
        rules.push(match &self.anonymous {
            None => "anonymous users are replicated (--include-anonymous)".into(),
            Some(AnonymousTest::Flag(flag)) => format!(
                "{} = true: skipped (--include-anonymous replicates them)",
                flag.name
            ),
            Some(AnonymousTest::NoContact { .. }) => {
                "no email and no phone: anonymous, skipped (--include-anonymous replicates them)"
                    .into()
            }
        });
        rules.push("an update that makes a user skipped soft-deletes it on the target".into());
        MappingPlan {
            keys: vec![
                (key::ID, self.layout.id.name.clone()),
                (key::PRIMARY_EMAIL, self.email.name.clone()),
                (
                    key::PRIMARY_EMAIL_VERIFIED,
                    format!("{} is not null", self.email_confirmed_at.name),
                ),
                (
                    key::DISPLAY_NAME,
                    format!("{meta} ->> {}", DISPLAY_NAME_FIELDS.join(", else ")),
                ),
                (
                    key::PROFILE_IMAGE_URL,
                    format!("{meta} ->> {}", AVATAR_FIELDS.join(", else ")),
                ),
                (key::SIGNED_UP_AT_MILLIS, self.created_at.name.clone()),
                (key::CLIENT_METADATA, meta.clone()),
                (
                    key::CLIENT_READ_ONLY_METADATA,
                    self.app_meta_data.name.clone(),
                ),
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

    const USER_ID: &str = "5b2d4ff4-7c3e-4a1d-9f45-0b8a7e1d2c3f";

    /// `auth.users` as GoTrue creates it, in its column order (`confirmed_at` is generated and
    /// not published, so a Relation message does not carry it).
    fn auth_users() -> Vec<RelationColumn> {
        relation(
            &[
                ("instance_id", oid::UUID),
                ("id", oid::UUID),
                ("aud", oid::VARCHAR),
                ("role", oid::VARCHAR),
                ("email", oid::VARCHAR),
                ("encrypted_password", oid::VARCHAR),
                ("email_confirmed_at", oid::TIMESTAMPTZ),
                ("invited_at", oid::TIMESTAMPTZ),
                ("confirmation_token", oid::VARCHAR),
                ("confirmation_sent_at", oid::TIMESTAMPTZ),
                ("recovery_token", oid::VARCHAR),
                ("recovery_sent_at", oid::TIMESTAMPTZ),
                ("email_change_token_new", oid::VARCHAR),
                ("email_change", oid::VARCHAR),
                ("email_change_sent_at", oid::TIMESTAMPTZ),
                ("last_sign_in_at", oid::TIMESTAMPTZ),
                ("raw_app_meta_data", oid::JSONB),
                ("raw_user_meta_data", oid::JSONB),
                ("is_super_admin", oid::BOOL),
                ("created_at", oid::TIMESTAMPTZ),
                ("updated_at", oid::TIMESTAMPTZ),
                ("phone", oid::TEXT),
                ("phone_confirmed_at", oid::TIMESTAMPTZ),
                ("phone_change", oid::TEXT),
                ("phone_change_token", oid::VARCHAR),
                ("phone_change_sent_at", oid::TIMESTAMPTZ),
                ("email_change_token_current", oid::VARCHAR),
                ("email_change_confirm_status", oid::INT2),
                ("banned_until", oid::TIMESTAMPTZ),
                ("reauthentication_token", oid::VARCHAR),
                ("reauthentication_sent_at", oid::TIMESTAMPTZ),
                ("is_sso_user", oid::BOOL),
                ("deleted_at", oid::TIMESTAMPTZ),
                ("is_anonymous", oid::BOOL),
            ],
            &["id"],
        )
    }

    fn ada(columns: &[RelationColumn], extra: &[(&str, ColumnValue)]) -> TupleData {
        row_changing(
            columns,
            &[
                ("id", text(USER_ID)),
                ("aud", text("authenticated")),
                ("role", text("authenticated")),
                ("email", text("ada@example.org")),
                ("encrypted_password", text("$2a$10$abcdefghijklmnopqrstuv")),
                ("email_confirmed_at", text("2024-01-02 03:05:00+00")),
                ("confirmation_token", text("tok-confirm")),
                ("recovery_token", text("tok-recover")),
                ("email_change", text("new@example.org")),
                (
                    "raw_app_meta_data",
                    text(r#"{"provider": "github", "providers": ["github"]}"#),
                ),
                (
                    "raw_user_meta_data",
                    text(
                        r#"{"full_name": "Ada Lovelace", "name": "ada", "avatar_url": "https://a.example/ada.png"}"#,
                    ),
                ),
                ("created_at", text("2024-01-02 03:04:05.123456+00")),
                ("phone", text("15550100")),
                ("is_sso_user", text("f")),
                ("is_anonymous", text("f")),
            ],
            extra,
        )
    }

    fn bind(include_anonymous: bool) -> BoundSupabase {
        SupabaseMapping {
            include_anonymous,
            ..SupabaseMapping::default()
        }
        .bind(&auth_users())
        .unwrap()
    }

    #[test]
    fn maps_auth_users_into_the_stack_auth_shape() {
        let mapping = bind(false);
        assert!(mapping.notes().is_empty(), "{:?}", mapping.notes());
        let user = live_user(mapping.map_row(&ada(&auth_users(), &[])).unwrap());
        assert_eq!(user.id, USER_ID);
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": USER_ID,
                "primary_email": "ada@example.org",
                "primary_email_verified": true,
                "display_name": "Ada Lovelace",
                "profile_image_url": "https://a.example/ada.png",
                "signed_up_at_millis": 1_704_164_645_123_i64,
                "client_metadata": {
                    "full_name": "Ada Lovelace",
                    "name": "ada",
                    "avatar_url": "https://a.example/ada.png",
                },
                "client_read_only_metadata": {"provider": "github", "providers": ["github"]},
                "server_metadata": null,
                "instance_id": null,
                "aud": "authenticated",
                "role": "authenticated",
                "email_confirmed_at": "2024-01-02T03:05:00Z",
                "invited_at": null,
                "last_sign_in_at": null,
                "is_super_admin": null,
                "updated_at": null,
                "phone": "15550100",
                "phone_confirmed_at": null,
                "banned_until": null,
                "is_sso_user": false,
                "deleted_at": null,
                "is_anonymous": false,
            })
        );
    }

    #[test]
    fn credentials_and_flow_state_never_reach_raw_json() {
        let mapping = bind(false);
        let excluded = mapping.plan().excluded;
        assert_eq!(
            excluded,
            [
                "encrypted_password",
                "confirmation_token",
                "confirmation_sent_at",
                "recovery_token",
                "recovery_sent_at",
                "email_change_token_new",
                "email_change",
                "email_change_sent_at",
                "phone_change",
                "phone_change_token",
                "phone_change_sent_at",
                "email_change_token_current",
                "email_change_confirm_status",
                "reauthentication_token",
                "reauthentication_sent_at",
            ]
        );
        let user = live_user(mapping.map_row(&ada(&auth_users(), &[])).unwrap());
        let text = String::from_utf8(user.raw_json.to_vec()).unwrap();
        for secret in ["$2a$10$", "tok-confirm", "tok-recover", "new@example.org"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn display_name_and_picture_fall_back_within_the_metadata() {
        let mapping = bind(false);
        let cases = [
            (
                r#"{"name": "ada", "picture": "p.png"}"#,
                json!("ada"),
                json!("p.png"),
            ),
            (
                r#"{"full_name": " ", "name": "ada"}"#,
                json!("ada"),
                Value::Null,
            ),
            (r#"{"full_name": 7}"#, Value::Null, Value::Null),
            ("{}", Value::Null, Value::Null),
            // Read from a document serde_json cannot hold as values (it stays whole in
            // client_metadata): the fields are found all the same.
            (
                &format!(
                    r#"{{"big": {}, "full_name": "Ada", "picture": "p.png"}}"#,
                    "9".repeat(400)
                ),
                json!("Ada"),
                json!("p.png"),
            ),
            (
                r#"{"name": {"first": "Ada"}, "avatar_url": ["a.png"], "picture": "p.png"}"#,
                Value::Null,
                json!("p.png"),
            ),
            // Not an object: no fields (an array's strings are not fields by position).
            (r#"["Ada", "ada", "a.png"]"#, Value::Null, Value::Null),
            // A key twice (not from PostgreSQL, whose jsonb keeps one): the last, as jsonb.
            (
                r#"{"name": "Ada", "name": "Lovelace"}"#,
                json!("Lovelace"),
                Value::Null,
            ),
        ];
        for (meta, name, picture) in cases {
            let row = ada(&auth_users(), &[("raw_user_meta_data", text(meta))]);
            let user = live_user(mapping.map_row(&row).unwrap());
            assert_eq!(user.raw_json["display_name"], name, "{meta}");
            assert_eq!(user.raw_json["profile_image_url"], picture, "{meta}");
        }
        let row = ada(&auth_users(), &[("raw_user_meta_data", ColumnValue::Null)]);
        let user = live_user(mapping.map_row(&row).unwrap());
        assert_eq!(user.raw_json["client_metadata"], Value::Null);
        assert_eq!(user.raw_json["display_name"], Value::Null);
    }

    #[test]
    fn unconfirmed_email_is_not_verified() {
        let row = ada(&auth_users(), &[("email_confirmed_at", ColumnValue::Null)]);
        let user = live_user(bind(false).map_row(&row).unwrap());
        assert_eq!(user.raw_json["primary_email_verified"], json!(false));
    }

    #[test]
    fn unchanged_metadata_leaves_its_derived_keys_to_apply() {
        let row = ada(
            &auth_users(),
            &[("raw_user_meta_data", ColumnValue::UnchangedToast)],
        );
        let user = live_user(bind(false).map_row(&row).unwrap());
        assert_eq!(
            user.unchanged_keys,
            ["client_metadata", "display_name", "profile_image_url"]
        );
        for key in &user.unchanged_keys {
            assert!(!user.raw_json.contains_key(key), "{key}");
        }
        assert_eq!(user.raw_json["primary_email"], "ada@example.org");
    }

    #[test]
    fn a_soft_deleted_user_is_deleted_at_its_own_time() {
        let row = ada(
            &auth_users(),
            &[("deleted_at", text("2024-03-04 05:06:07.654321+00"))],
        );
        match bind(false).map_row(&row).unwrap() {
            RowOutcome::Deleted { user, at } => {
                assert_eq!(at, 1_709_528_767_654_321);
                assert_eq!(user.id, USER_ID);
                assert_eq!(user.raw_json["deleted_at"], "2024-03-04T05:06:07.654321Z");
            }
            other => panic!("expected a soft-deleted user, got {other:?}"),
        }
    }

    #[test]
    fn anonymous_users_are_skipped_unless_included() {
        let row = ada(
            &auth_users(),
            &[
                ("is_anonymous", text("t")),
                ("email", ColumnValue::Null),
                ("phone", ColumnValue::Null),
            ],
        );
        assert_eq!(
            bind(false).map_row(&row).unwrap(),
            RowOutcome::Skip {
                id: USER_ID.to_owned(),
                reason: SkipReason::Anonymous
            }
        );
        assert_eq!(
            bind(false).skip_reason(&row),
            Ok(Some(SkipReason::Anonymous))
        );
        let included = live_user(bind(true).map_row(&row).unwrap());
        assert_eq!(included.raw_json["is_anonymous"], json!(true));
        assert_eq!(bind(true).skip_reason(&row), Ok(None));
        // Anonymous and deleted: still skipped, there is nothing to show.
        let row = ada(
            &auth_users(),
            &[
                ("is_anonymous", text("t")),
                ("deleted_at", text("2024-03-04 05:06:07+00")),
            ],
        );
        assert!(matches!(
            bind(false).map_row(&row),
            Ok(RowOutcome::Skip { .. })
        ));
    }

    #[test]
    fn without_is_anonymous_no_email_and_no_phone_means_anonymous() {
        let columns: Vec<_> = auth_users()
            .into_iter()
            .filter(|c| c.name != "is_anonymous" && c.name != "deleted_at")
            .collect();
        let mapping = SupabaseMapping::default().bind(&columns).unwrap();
        assert_eq!(mapping.notes().len(), 2, "{:?}", mapping.notes());
        let guest = ada(
            &columns,
            &[("email", text("")), ("phone", ColumnValue::Null)],
        );
        assert!(matches!(
            mapping.map_row(&guest),
            Ok(RowOutcome::Skip {
                reason: SkipReason::Anonymous,
                ..
            })
        ));
        let phone_only = ada(&columns, &[("email", ColumnValue::Null)]);
        assert!(matches!(
            mapping.map_row(&phone_only),
            Ok(RowOutcome::User(_))
        ));
    }

    #[test]
    fn bind_names_what_is_missing_or_wrong() {
        let columns: Vec<_> = auth_users()
            .into_iter()
            .filter(|c| c.name != "raw_app_meta_data")
            .collect();
        let error = SupabaseMapping::default().bind(&columns).unwrap_err();
        assert!(matches!(
            &error,
            MapError::ProfileColumnMissing { profile: "supabase", column, .. }
                if column == "raw_app_meta_data"
        ));
        assert!(error.to_string().contains("--table"), "{error}");

        let mut columns = auth_users();
        columns
            .iter_mut()
            .filter(|c| c.name == "raw_user_meta_data")
            .for_each(|c| c.type_oid = oid::TEXT);
        assert_eq!(
            SupabaseMapping::default()
                .bind(&columns)
                .unwrap_err()
                .to_string(),
            "column raw_user_meta_data (type oid 25) does not fit the supabase profile: \
             expected jsonb or json"
        );

        let mut columns = auth_users();
        columns
            .iter_mut()
            .for_each(|c| c.is_key = c.name == "email");
        assert!(matches!(
            SupabaseMapping::default().bind(&columns),
            Err(MapError::IdNotInReplicaIdentity { .. })
        ));
    }

    #[test]
    fn the_publication_needs_no_credential_and_no_flow_state() {
        let used = bind(false).layout().used().clone();
        let names = used.names();
        for left_out in [
            "encrypted_password",
            "confirmation_token",
            "recovery_token",
            "email_change_token_new",
            "email_change",
            "phone_change_token",
            "reauthentication_token",
        ] {
            assert!(
                !names.iter().any(|n| n == left_out),
                "{left_out}: {names:?}"
            );
        }
        // What decides a row, or fills a key, is needed; the rest is copied.
        assert_eq!(
            used.needed(),
            [
                "id",
                "email",
                "email_confirmed_at",
                "raw_app_meta_data",
                "raw_user_meta_data",
                "created_at",
                "deleted_at",
                "is_anonymous",
            ]
        );
        assert!(names.iter().any(|n| n == "last_sign_in_at"));
        // With anonymous users included, is_anonymous is only copied.
        let used = bind(true).layout().used().clone();
        assert!(!used.needed().iter().any(|n| n == "is_anonymous"));
        assert!(used.names().iter().any(|n| n == "is_anonymous"));
    }

    #[test]
    fn what_the_profile_reads_cannot_be_excluded_and_the_rest_can() {
        let with = |columns| SupabaseMapping {
            columns,
            ..SupabaseMapping::default()
        };
        let error = with(ColumnSelection::Exclude(vec!["deleted_at".into()]))
            .bind(&auth_users())
            .unwrap_err();
        assert_eq!(
            error,
            MapError::ExcludedColumnRead {
                column: "deleted_at".into()
            }
        );
        let mapping = with(ColumnSelection::Exclude(vec![
            "phone".into(),
            "role".into(),
        ]))
        .bind(&auth_users())
        .unwrap();
        let user = live_user(mapping.map_row(&ada(&auth_users(), &[])).unwrap());
        assert!(!user.raw_json.contains_key("phone") && !user.raw_json.contains_key("role"));
        assert!(user.raw_json.contains_key("aud"));
        // phone is read only to tell anonymous users without is_anonymous: here it is free.
        assert!(!mapping.layout().used().names().iter().any(|n| n == "phone"));

        let mapping = with(ColumnSelection::Include(vec!["aud".into()]))
            .bind(&auth_users())
            .unwrap();
        let user = live_user(mapping.map_row(&ada(&auth_users(), &[])).unwrap());
        let mut copied: Vec<&str> = user
            .raw_json
            .keys()
            .filter(|key| !key::STACK_AUTH.contains(key))
            .collect();
        copied.sort_unstable();
        // Only aud is copied: deleted_at and is_anonymous are read, but not included.
        assert_eq!(copied, ["aud"]);
    }

    #[test]
    fn the_plan_names_every_key() {
        let plan = bind(false).plan();
        let keys: Vec<&str> = plan.keys.iter().map(|(key, _)| *key).collect();
        for key in key::STACK_AUTH {
            assert!(keys.contains(&key), "{key}");
        }
        assert!(plan.passthrough.contains(&"last_sign_in_at".to_owned()));
        assert!(plan.rules.iter().any(|rule| rule.contains("is_anonymous")));
    }
}
