//! The `better-auth` profile: Better Auth's `"user"` table.
//!
//! | `"user"` column                   | `raw_json` key           |
//! |-----------------------------------|--------------------------|
//! | `id` (text)                       | `id`                     |
//! | `email`                           | `primary_email`          |
//! | `"emailVerified"`                 | `primary_email_verified` |
//! | `name`                            | `display_name`           |
//! | `image`                           | `profile_image_url`      |
//! | `"createdAt"`                     | `signed_up_at_millis`    |
//! | —                                 | `client_metadata`, `client_read_only_metadata`, `server_metadata` (null) |
//!
//! Better Auth's own migrations (`npx @better-auth/cli migrate`) name columns in camelCase;
//! schemas generated for Drizzle or Prisma often use snake_case (`email_verified`,
//! `created_at`), so both spellings are accepted. Every other column passes through under its
//! own name: `"updatedAt"`, and what plugins add (`role`, `banned`, `"banReason"`,
//! `"banExpires"`, `username`, `"twoFactorEnabled"`, …). Better Auth keeps passwords and OAuth
//! tokens in its `account` table, not here; a column whose name says it holds a credential
//! (`password`, `token`, `secret`, `pass`, `hash`, …: `columns::is_credential`) is still never
//! copied.
//!
//! **Anonymous users.** The anonymous plugin adds `"isAnonymous"`; such users are skipped
//! unless `--include-anonymous`, as with Supabase, and a user who becomes anonymous again is
//! soft-deleted.

use serde_json::Value;

use super::columns::{
    is_credential, BoundColumn, ColumnNeed, OtherColumns, Relation, RowLayout, UserJson,
};
use super::profile::{MappingPlan, RowMapper, RowOutcome, SkipReason};
use super::selection::ColumnSelection;
use super::value::{self, oid};
use super::{key, MapError, MappedUser};
use crate::decode::{ColumnValue, RelationColumn};

/// Better Auth names its table `user`, in the database's default schema.
pub const DEFAULT_TABLE: &str = "public.user";
const PROFILE: &str = "better-auth";

const ID: ColumnNeed = ColumnNeed::named(PROFILE, &["id"]);
const NAME: ColumnNeed = ColumnNeed::named(PROFILE, &["name"]);
const EMAIL: ColumnNeed = ColumnNeed::named(PROFILE, &["email"]);
const IMAGE: ColumnNeed = ColumnNeed::named(PROFILE, &["image"]);
const EMAIL_VERIFIED: ColumnNeed = ColumnNeed::typed(
    PROFILE,
    &["emailVerified", "email_verified"],
    (value::VERIFIED_TYPES, "a boolean"),
);
const CREATED_AT: ColumnNeed = ColumnNeed::typed(
    PROFILE,
    &["createdAt", "created_at"],
    (value::MILLIS_TYPES, "a timestamp"),
);
/// Added by the anonymous plugin.
const IS_ANONYMOUS: ColumnNeed = ColumnNeed::typed(
    PROFILE,
    &["isAnonymous", "is_anonymous"],
    (&[oid::BOOL], "boolean"),
);

/// The `better-auth` profile's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BetterAuthMapping {
    /// Replicate the anonymous plugin's guest users too.
    pub include_anonymous: bool,
    /// Which other columns are copied (`--include-columns`, `--exclude-columns`).
    pub columns: ColumnSelection,
}

impl BetterAuthMapping {
    pub fn bind(&self, columns: &[RelationColumn]) -> Result<BoundBetterAuth, MapError> {
        let relation = Relation::new(columns);
        let id = relation.require_id(&ID)?;
        let name = relation.require(&NAME)?;
        let email = relation.require(&EMAIL)?;
        let email_verified = relation.require(&EMAIL_VERIFIED)?;
        let image = relation.require(&IMAGE)?;
        let created_at = relation.require(&CREATED_AT)?;
        // Looked up only when it decides something: a column looked up is one the mapping
        // reads, which the publication must carry and --exclude-columns cannot drop.
        let is_anonymous = if self.include_anonymous {
            None
        } else {
            relation.optional(&IS_ANONYMOUS)?
        };

        let mut notes = Vec::new();
        let other = OtherColumns::bind(
            &relation,
            &[&id, &name, &email, &email_verified, &image, &created_at],
            is_credential,
            &key::STACK_AUTH,
            &self.columns,
            &mut notes,
        )?;
        Ok(BoundBetterAuth {
            layout: relation.layout(id),
            name,
            email,
            email_verified,
            image,
            created_at,
            is_anonymous,
            include_anonymous: self.include_anonymous,
            other,
            notes,
        })
    }
}

/// A [`BetterAuthMapping`] resolved against `"user"` as the Relation message describes it.
#[derive(Debug, Clone)]
pub struct BoundBetterAuth {
    layout: RowLayout,
    name: BoundColumn,
    email: BoundColumn,
    email_verified: BoundColumn,
    image: BoundColumn,
    created_at: BoundColumn,
    /// The flag that skips a row; `None` when anonymous users are included or unknown.
    is_anonymous: Option<BoundColumn>,
    include_anonymous: bool,
    other: OtherColumns,
    notes: Vec<String>,
}

impl BoundBetterAuth {
    fn map_user(&self, id: &str, values: &[ColumnValue]) -> Result<MappedUser, MapError> {
        let mut user = UserJson::new(id);
        user.set_string(key::PRIMARY_EMAIL, &self.email, values)?;
        user.set_email_verified(&self.email_verified, values)?;
        user.set_string(key::DISPLAY_NAME, &self.name, values)?;
        // Some apps store a data: URL here, large enough to be TOASTed.
        user.set_string(key::PROFILE_IMAGE_URL, &self.image, values)?;
        user.set_signed_up_at(&self.created_at, values)?;
        for key in [
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

impl RowMapper for BoundBetterAuth {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn skip(&self, values: &[ColumnValue]) -> Result<Option<SkipReason>, MapError> {
        Ok(match &self.is_anonymous {
            Some(flag) if flag.filter_value(values, "isAnonymous")? == Some("t") => {
                Some(SkipReason::Anonymous)
            }
            _ => None,
        })
    }

    fn map_values(&self, id: &str, values: &[ColumnValue]) -> Result<RowOutcome, MapError> {
        self.map_user(id, values).map(RowOutcome::User)
    }

    fn notes(&self) -> &[String] {
        &self.notes
    }

    fn plan(&self) -> MappingPlan {
        let rules = match (&self.is_anonymous, self.include_anonymous) {
            (Some(flag), _) => vec![
                format!(
                    "{} = true: skipped (--include-anonymous replicates them)",
                    flag.name
                ),
                "an update that makes a user anonymous soft-deletes it on the target".into(),
            ],
            (None, true) => vec!["anonymous users are replicated (--include-anonymous)".into()],
            (None, false) => vec!["every row is a live user (no isAnonymous column)".into()],
        };
        MappingPlan {
            keys: vec![
                (key::ID, self.layout.id.name.clone()),
                (key::PRIMARY_EMAIL, self.email.name.clone()),
                (
                    key::PRIMARY_EMAIL_VERIFIED,
                    self.email_verified.name.clone(),
                ),
                (key::DISPLAY_NAME, self.name.name.clone()),
                (key::PROFILE_IMAGE_URL, self.image.name.clone()),
                (key::SIGNED_UP_AT_MILLIS, self.created_at.name.clone()),
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

    /// `"user"` as `@better-auth/cli migrate` creates it on PostgreSQL, with the admin and
    /// anonymous plugins.
    fn user_table() -> Vec<RelationColumn> {
        relation(
            &[
                ("id", oid::TEXT),
                ("name", oid::TEXT),
                ("email", oid::TEXT),
                ("emailVerified", oid::BOOL),
                ("image", oid::TEXT),
                ("createdAt", oid::TIMESTAMPTZ),
                ("updatedAt", oid::TIMESTAMPTZ),
                ("role", oid::TEXT),
                ("banned", oid::BOOL),
                ("isAnonymous", oid::BOOL),
            ],
            &["id"],
        )
    }

    fn linus(columns: &[RelationColumn], extra: &[(&str, ColumnValue)]) -> TupleData {
        row_changing(
            columns,
            &[
                ("id", text("u_9XkTf2")),
                ("name", text("Linus")),
                ("email", text("linus@example.org")),
                ("emailVerified", text("f")),
                ("email_verified", text("f")),
                ("image", text("https://i.example/l.png")),
                ("createdAt", text("2024-01-02 03:04:05.123+00")),
                ("created_at", text("2024-01-02 03:04:05.123")),
                ("updatedAt", text("2024-02-02 00:00:00+00")),
                ("role", text("user")),
                ("isAnonymous", text("f")),
            ],
            extra,
        )
    }

    fn bind(include_anonymous: bool) -> BoundBetterAuth {
        BetterAuthMapping {
            include_anonymous,
            ..BetterAuthMapping::default()
        }
        .bind(&user_table())
        .unwrap()
    }

    #[test]
    fn maps_the_user_table_into_the_stack_auth_shape() {
        let mapping = bind(false);
        assert!(mapping.notes().is_empty(), "{:?}", mapping.notes());
        let user = live_user(mapping.map_row(&linus(&user_table(), &[])).unwrap());
        assert_eq!(
            user.raw_json.to_value(),
            json!({
                "id": "u_9XkTf2",
                "primary_email": "linus@example.org",
                "primary_email_verified": false,
                "display_name": "Linus",
                "profile_image_url": "https://i.example/l.png",
                "signed_up_at_millis": 1_704_164_645_123_i64,
                "client_metadata": null,
                "client_read_only_metadata": null,
                "server_metadata": null,
                "updatedAt": "2024-02-02T00:00:00Z",
                "role": "user",
                "banned": null,
                "isAnonymous": false,
            })
        );
    }

    #[test]
    fn snake_case_columns_are_accepted() {
        let columns = relation(
            &[
                ("id", oid::TEXT),
                ("name", oid::TEXT),
                ("email", oid::TEXT),
                ("email_verified", oid::BOOL),
                ("image", oid::TEXT),
                ("created_at", oid::TIMESTAMP),
                ("updated_at", oid::TIMESTAMP),
            ],
            &["id"],
        );
        let mapping = BetterAuthMapping::default().bind(&columns).unwrap();
        let user = live_user(mapping.map_row(&linus(&columns, &[])).unwrap());
        assert_eq!(user.raw_json["signed_up_at_millis"], 1_704_164_645_123_i64);
        assert_eq!(user.raw_json["primary_email_verified"], false);
        assert!(!user.raw_json.contains_key("created_at"));
        assert!(mapping.plan().rules[0].contains("no isAnonymous"));
    }

    #[test]
    fn anonymous_users_are_skipped_unless_included() {
        let row = linus(&user_table(), &[("isAnonymous", text("t"))]);
        assert_eq!(
            bind(false).map_row(&row).unwrap(),
            RowOutcome::Skip {
                id: "u_9XkTf2".into(),
                reason: SkipReason::Anonymous
            }
        );
        assert!(matches!(bind(true).map_row(&row), Ok(RowOutcome::User(_))));
        assert_eq!(bind(true).skip_reason(&row), Ok(None));
    }

    #[test]
    fn an_unchanged_image_is_left_for_apply() {
        let row = linus(&user_table(), &[("image", ColumnValue::UnchangedToast)]);
        let user = live_user(bind(false).map_row(&row).unwrap());
        assert_eq!(user.unchanged_keys, ["profile_image_url"]);
    }

    #[test]
    fn bind_names_the_missing_column_with_both_spellings() {
        let columns: Vec<_> = user_table()
            .into_iter()
            .filter(|c| c.name != "emailVerified")
            .collect();
        let error = BetterAuthMapping::default().bind(&columns).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("needs column emailVerified or email_verified"),
            "{error}"
        );
    }
}
