//! Identity-store profiles end to end: each store's users table as its published schema
//! creates it (reduced to the users table, columns faithful), replicated through a real slot.
//! Each test compares the live users on both sides by content, then checks the profile's
//! special cases: Supabase soft deletes and anonymous users, Keycloak realms, Better Auth
//! anonymous users, and unchanged TOAST values.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;
use usersync::map::{
    BetterAuthMapping, KeycloakMapping, Profile, StackAuthMapping, SupabaseMapping,
};
use usersync::metrics::Op;

use crate::harness::*;

/// `auth.users` as Supabase Auth (GoTrue) creates it, indexes left out.
const SUPABASE_USERS: &str = "
CREATE SCHEMA auth;
CREATE TABLE auth.users (
    instance_id                 uuid,
    id                          uuid NOT NULL,
    aud                         varchar(255),
    role                        varchar(255),
    email                       varchar(255),
    encrypted_password          varchar(255),
    email_confirmed_at          timestamptz,
    invited_at                  timestamptz,
    confirmation_token          varchar(255),
    confirmation_sent_at        timestamptz,
    recovery_token              varchar(255),
    recovery_sent_at            timestamptz,
    email_change_token_new      varchar(255),
    email_change                varchar(255),
    email_change_sent_at        timestamptz,
    last_sign_in_at             timestamptz,
    raw_app_meta_data           jsonb,
    raw_user_meta_data          jsonb,
    is_super_admin              boolean,
    created_at                  timestamptz,
    updated_at                  timestamptz,
    phone                       text DEFAULT NULL::character varying UNIQUE,
    phone_confirmed_at          timestamptz,
    phone_change                text DEFAULT ''::character varying,
    phone_change_token          varchar(255) DEFAULT ''::character varying,
    phone_change_sent_at        timestamptz,
    confirmed_at                timestamptz
                                GENERATED ALWAYS AS (LEAST(email_confirmed_at, phone_confirmed_at)) STORED,
    email_change_token_current  varchar(255) DEFAULT ''::character varying,
    email_change_confirm_status smallint DEFAULT 0
                                CHECK (email_change_confirm_status >= 0 AND email_change_confirm_status <= 2),
    banned_until                timestamptz,
    reauthentication_token      varchar(255) DEFAULT ''::character varying,
    reauthentication_sent_at    timestamptz,
    is_sso_user                 boolean NOT NULL DEFAULT false,
    deleted_at                  timestamptz,
    is_anonymous                boolean NOT NULL DEFAULT false,
    CONSTRAINT users_pkey PRIMARY KEY (id)
)";

/// Keycloak's `realm` (reduced to the columns usersync reads; Keycloak has dozens of realm
/// settings more) and `user_entity` (complete), as its Liquibase changelog creates them.
const KEYCLOAK_TABLES: &str = "
CREATE TABLE public.realm (
    id      varchar(36) NOT NULL,
    name    varchar(255),
    enabled boolean DEFAULT false NOT NULL,
    CONSTRAINT constraint_4a PRIMARY KEY (id),
    CONSTRAINT uk_orvsdmla56612eaefiq6wl5oi UNIQUE (name)
);
CREATE TABLE public.user_entity (
    id                          varchar(36) NOT NULL,
    email                       varchar(255),
    email_constraint            varchar(255),
    email_verified              boolean DEFAULT false NOT NULL,
    enabled                     boolean DEFAULT false NOT NULL,
    federation_link             varchar(255),
    first_name                  varchar(255),
    last_name                   varchar(255),
    realm_id                    varchar(255),
    username                    varchar(255),
    created_timestamp           bigint,
    service_account_client_link varchar(255),
    not_before                  integer DEFAULT 0 NOT NULL,
    CONSTRAINT constraint_fb PRIMARY KEY (id),
    CONSTRAINT uk_dykn684sl8up1crfei6eckhd7 UNIQUE (realm_id, email_constraint),
    CONSTRAINT uk_ru8tt6t700s9v50bu18ws5ha6 UNIQUE (realm_id, username)
);
INSERT INTO public.realm (id, name, enabled) VALUES
    ('master', 'master', true),
    ('9c3e6a2b-5d41-4f0e-8b7a-2f1d3c4b5a69', 'acme', true)";

const ACME_REALM_ID: &str = "9c3e6a2b-5d41-4f0e-8b7a-2f1d3c4b5a69";

/// `"user"` as `npx @better-auth/cli migrate` creates it on PostgreSQL, with the anonymous
/// plugin's column.
const BETTER_AUTH_USER: &str = r#"
CREATE TABLE "user" (
    "id"            text NOT NULL PRIMARY KEY,
    "name"          text NOT NULL,
    "email"         text NOT NULL UNIQUE,
    "emailVerified" boolean NOT NULL,
    "image"         text,
    "createdAt"     timestamptz DEFAULT CURRENT_TIMESTAMP NOT NULL,
    "updatedAt"     timestamptz DEFAULT CURRENT_TIMESTAMP NOT NULL,
    "isAnonymous"   boolean
)"#;

/// What both sides must agree on for each live user: id, email, display name, verified,
/// sign-up millis, and a checksum of the profile's larger values.
pub(crate) type LiveUser = (
    String,
    Option<String>,
    Option<String>,
    bool,
    Option<i64>,
    String,
);

/// A pair whose source holds the store's tables (`ddl`), replicating `table` with `profile`
/// as the least-privilege roles: the source role script, given the profile, lets the role
/// read every table the profile reads.
pub(crate) async fn profile_pair(ddl: &str, table: &str, profile: Profile) -> Pair {
    let mut pair = Pair::for_table(ddl, table).await;
    pair.grant_source_profile(profile.name());
    pair.config.mapping = profile;
    pair
}

pub(crate) async fn live_users(client: &Client, sql: &str) -> Vec<LiveUser> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

/// Waits until the target's live users equal what the source says they should be.
pub(crate) async fn wait_live_match(pair: &Pair, source_sql: &str, target_sql: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let source = live_users(&pair.source, source_sql).await;
        let target = live_users(&pair.target, target_sql).await;
        if source == target {
            assert!(!source.is_empty(), "the comparison compared nothing");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "live users differ after {WAIT:?}:\nsource {source:#?}\ntarget {target:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn target_has(pair: &Pair, query: &str) -> bool {
    pair.target.query_one(query, &[]).await.unwrap().get(0)
}

const SUPABASE_SOURCE_LIVE: &str = "
SELECT id::text, email::text,
       coalesce(nullif(btrim(raw_user_meta_data ->> 'full_name'), ''),
                nullif(btrim(raw_user_meta_data ->> 'name'), '')),
       email_confirmed_at IS NOT NULL,
       floor(extract(epoch FROM created_at) * 1000)::bigint,
       md5(coalesce(raw_user_meta_data::text, 'null') || coalesce(raw_app_meta_data::text, 'null'))
  FROM auth.users WHERE NOT is_anonymous AND deleted_at IS NULL ORDER BY 1";

const SUPABASE_TARGET_LIVE: &str = "
SELECT id, email, name, (raw_json ->> 'primary_email_verified')::bool,
       (raw_json ->> 'signed_up_at_millis')::bigint,
       md5(coalesce((raw_json -> 'client_metadata')::text, 'null')
           || coalesce((raw_json -> 'client_read_only_metadata')::text, 'null'))
  FROM neon_auth.users_sync WHERE deleted_at IS NULL ORDER BY 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_users_soft_deletes_and_anonymous_users() {
    let pair = profile_pair(
        SUPABASE_USERS,
        "auth.users",
        Profile::Supabase(SupabaseMapping::default()),
    )
    .await;
    // setup through the binary: --table defaults to auth.users, and the mapping is printed.
    let setup = pair
        .command(&["setup", "--profile", "supabase"])
        .output()
        .unwrap();
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(said.contains("source table auth.users"), "{said}");
    assert!(
        said.contains("client_read_only_metadata <- raw_app_meta_data"),
        "{said}"
    );
    assert!(said.contains("never copied: encrypted_password"), "{said}");
    let passed = said
        .lines()
        .find_map(|line| line.trim().strip_prefix("passed through: "))
        .unwrap_or_default();
    assert!(passed.split(", ").any(|c| c == "last_sign_in_at"), "{said}");
    assert!(
        !passed.split(", ").any(|c| c == "confirmed_at"),
        "a generated column is not published: {said}"
    );

    let running = pair.start();
    pair.source
        .batch_execute(
            r#"INSERT INTO auth.users (id, aud, role, email, encrypted_password, email_confirmed_at,
                                     confirmation_token, raw_app_meta_data, raw_user_meta_data,
                                     created_at, updated_at)
               VALUES ('00000000-0000-4000-8000-00000000a001', 'authenticated', 'authenticated',
                       'ada@example.com', '$2a$10$secretsecretsecretsecret', '2024-01-02 03:05:00+00',
                       'tok-confirm-ada', '{"provider": "github", "providers": ["github"]}',
                       '{"full_name": "Ada Lovelace", "avatar_url": "https://i.example/ada.png"}',
                       '2024-01-02 03:04:05.678+00', now()),
                      ('00000000-0000-4000-8000-00000000b002', 'authenticated', 'authenticated',
                       'bob@example.com', NULL, NULL, 'tok-confirm-bob', '{"provider": "email"}',
                       '{"name": "bob"}', now(), now()),
                      ('00000000-0000-4000-8000-00000000c003', 'authenticated', 'authenticated',
                       'carol@example.com', NULL, now(), '', '{}', '{}', now(), now());
               INSERT INTO auth.users (id, aud, role, is_anonymous, raw_app_meta_data,
                                       raw_user_meta_data, created_at)
               VALUES ('00000000-0000-4000-8000-00000000d004', 'authenticated', 'authenticated',
                       true, '{}', '{}', now());
               UPDATE auth.users SET last_sign_in_at = now()
                WHERE id = '00000000-0000-4000-8000-00000000a001';"#,
        )
        .await
        .unwrap();
    wait_live_match(&pair, SUPABASE_SOURCE_LIVE, SUPABASE_TARGET_LIVE).await;
    assert!(
        target_has(
            &pair,
            "SELECT NOT EXISTS (SELECT 1 FROM neon_auth.users_sync
                                 WHERE id = '00000000-0000-4000-8000-00000000d004')"
        )
        .await,
        "an anonymous user is not replicated"
    );
    let ada: serde_json::Value = pair
        .target
        .query_one(
            "SELECT raw_json FROM neon_auth.users_sync
              WHERE id = '00000000-0000-4000-8000-00000000a001'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ada["profile_image_url"], "https://i.example/ada.png");
    assert_eq!(ada["client_read_only_metadata"]["provider"], "github");
    assert_eq!(ada["signed_up_at_millis"], 1_704_164_645_678_i64);
    assert!(ada["last_sign_in_at"].is_string());
    assert!(
        target_has(
            &pair,
            "SELECT bool_and(NOT raw_json ?| array['encrypted_password', 'confirmation_token',
                                                   'recovery_token', 'email_change_token_new']
                             AND raw_json::text NOT LIKE '%tok-confirm%'
                             AND raw_json::text NOT LIKE '%secretsecret%')
               FROM neon_auth.users_sync"
        )
        .await,
        "no password hash or token reaches the target"
    );

    // The anonymous user links an email (becomes a user); bob turns anonymous (must not stay
    // live); ada is soft-deleted by Supabase; carol is deleted for real. Each its own
    // transaction, as GoTrue writes them.
    for statement in [
        "UPDATE auth.users SET email = 'dave@example.com', is_anonymous = false,
                raw_user_meta_data = '{\"full_name\": \"Dave\"}'
          WHERE id = '00000000-0000-4000-8000-00000000d004'",
        "UPDATE auth.users SET is_anonymous = true WHERE id = '00000000-0000-4000-8000-00000000b002'",
        "UPDATE auth.users SET deleted_at = '2024-05-06 07:08:09.123456+00', email = 'obfuscated@example.invalid'
          WHERE id = '00000000-0000-4000-8000-00000000a001'",
        "DELETE FROM auth.users WHERE id = '00000000-0000-4000-8000-00000000c003'",
    ] {
        pair.source.batch_execute(statement).await.unwrap();
    }
    wait_live_match(&pair, SUPABASE_SOURCE_LIVE, SUPABASE_TARGET_LIVE).await;
    pair.wait_target(
        "SELECT deleted_at = '2024-05-06 07:08:09.123456+00'
                AND email = 'obfuscated@example.invalid'
                AND raw_json ->> 'deleted_at' = '2024-05-06T07:08:09.123456Z'
           FROM neon_auth.users_sync WHERE id = '00000000-0000-4000-8000-00000000a001'",
    )
    .await;
    pair.wait_target(
        "SELECT count(*) = 2 FROM neon_auth.users_sync
          WHERE deleted_at IS NOT NULL
            AND id IN ('00000000-0000-4000-8000-00000000b002', '00000000-0000-4000-8000-00000000c003')",
    )
    .await;

    // Undoing a Supabase soft delete brings the user back.
    pair.source
        .batch_execute(
            "UPDATE auth.users SET deleted_at = NULL WHERE id = '00000000-0000-4000-8000-00000000a001'",
        )
        .await
        .unwrap();
    wait_live_match(&pair, SUPABASE_SOURCE_LIVE, SUPABASE_TARGET_LIVE).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_unchanged_toast_metadata_keeps_its_derived_keys() {
    let pair = profile_pair(
        SUPABASE_USERS,
        "auth.users",
        Profile::Supabase(SupabaseMapping::default()),
    )
    .await;
    pair.source
        .batch_execute(
            "ALTER TABLE auth.users ALTER COLUMN raw_user_meta_data SET STORAGE EXTERNAL;
             ALTER TABLE auth.users ALTER COLUMN raw_app_meta_data SET STORAGE EXTERNAL;",
        )
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    // ~8 KB of metadata each: stored out of line, so updates that do not touch them send
    // "unchanged" instead of the value. The update in the same transaction is merged in the
    // batch; the later one is merged with the row already on the target.
    pair.source
        .batch_execute(
            "INSERT INTO auth.users (id, email, raw_user_meta_data, raw_app_meta_data, created_at)
             SELECT '00000000-0000-4000-8000-0000000000e1', 'toast@example.com',
                    jsonb_build_object('full_name', 'Tess Toast', 'avatar_url', 'https://i.example/t.png',
                                       'bio', string_agg(md5(g::text), '')),
                    jsonb_build_object('provider', 'email', 'roles', string_agg(md5((-g)::text), '')),
                    now()
               FROM generate_series(1, 250) g;
             UPDATE auth.users SET last_sign_in_at = now()
              WHERE id = '00000000-0000-4000-8000-0000000000e1';",
        )
        .await
        .unwrap();
    wait_live_match(&pair, SUPABASE_SOURCE_LIVE, SUPABASE_TARGET_LIVE).await;
    pair.source
        .batch_execute(
            "UPDATE auth.users SET email_confirmed_at = now(), updated_at = now()
              WHERE id = '00000000-0000-4000-8000-0000000000e1'",
        )
        .await
        .unwrap();
    pair.wait_target(
        "SELECT (raw_json ->> 'primary_email_verified')::bool FROM neon_auth.users_sync",
    )
    .await;
    wait_live_match(&pair, SUPABASE_SOURCE_LIVE, SUPABASE_TARGET_LIVE).await;
    assert!(
        target_has(
            &pair,
            "SELECT name = 'Tess Toast' AND raw_json ->> 'profile_image_url' = 'https://i.example/t.png'
                    AND length(raw_json -> 'client_metadata' ->> 'bio') = 8000
               FROM neon_auth.users_sync"
        )
        .await,
        "keys derived from unchanged metadata are kept"
    );
    running.stop().await;
}

const KEYCLOAK_SOURCE_LIVE: &str = "
SELECT u.id::text, u.email::text,
       coalesce(nullif(concat_ws(' ', nullif(btrim(u.first_name), ''), nullif(btrim(u.last_name), '')), ''),
                u.username)::text,
       u.email_verified, u.created_timestamp,
       md5(concat_ws('|', u.username, u.enabled::text, u.realm_id, u.first_name, u.last_name))
  FROM public.user_entity u JOIN public.realm r ON r.id = u.realm_id
 WHERE r.name = 'acme' AND u.service_account_client_link IS NULL ORDER BY 1";

const KEYCLOAK_TARGET_LIVE: &str = "
SELECT id, email, name, (raw_json ->> 'primary_email_verified')::bool,
       (raw_json ->> 'signed_up_at_millis')::bigint,
       md5(concat_ws('|', raw_json ->> 'username', raw_json ->> 'enabled', raw_json ->> 'realm_id',
                     raw_json ->> 'first_name', raw_json ->> 'last_name'))
  FROM neon_auth.users_sync WHERE deleted_at IS NULL ORDER BY 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_replicates_one_realm() {
    let pair = profile_pair(
        KEYCLOAK_TABLES,
        "public.user_entity",
        Profile::Keycloak(KeycloakMapping::new("acme")),
    )
    .await;
    // Whole old rows, so changes to other realms' users cost the target nothing.
    pair.source
        .batch_execute(
            "ALTER TABLE public.user_entity REPLICA IDENTITY FULL;
             ALTER TABLE public.user_entity ALTER COLUMN first_name SET STORAGE EXTERNAL;
             ALTER TABLE public.user_entity ALTER COLUMN last_name SET STORAGE EXTERNAL;",
        )
        .await
        .unwrap();

    let unknown = pair
        .command(&["setup", "--profile", "keycloak", "--realm", "nope"])
        .output()
        .unwrap();
    let said = text(&unknown);
    assert_eq!(unknown.status.code(), Some(78), "{said}");
    assert!(said.contains("no realm \"nope\""), "{said}");
    assert!(
        said.contains(&format!("acme (id {ACME_REALM_ID})")),
        "{said}"
    );

    // --table defaults to public.user_entity; the realm is found by name.
    let setup = pair
        .command(&["setup", "--profile", "keycloak", "--realm", "acme"])
        .output()
        .unwrap();
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(said.contains("source table public.user_entity"), "{said}");
    assert!(
        said.contains(&format!("realm acme (id {ACME_REALM_ID})")),
        "{said}"
    );
    assert!(said.contains("never copied: email_constraint"), "{said}");

    let running = pair.start();
    // Names of 255 four-byte characters: the row outgrows 2 kB and a name goes out of line.
    pair.source
        .batch_execute(&format!(
            "INSERT INTO public.user_entity (id, email, email_constraint, email_verified, enabled,
                                             first_name, last_name, realm_id, username,
                                             created_timestamp, service_account_client_link)
             VALUES ('k-1', 'kim@example.com', 'kim@example.com', true, true, 'Kim', 'Lee',
                     '{ACME_REALM_ID}', 'kim', 1704164645123, NULL),
                    ('k-2', 'admin@example.com', 'admin@example.com', true, true, NULL, NULL,
                     'master', 'admin', 1704164645000, NULL),
                    ('k-3', NULL, 'k-3', false, true, NULL, NULL,
                     '{ACME_REALM_ID}', 'service-account-backend', 1704164645000, 'client-1'),
                    ('k-4', 'wide@example.com', 'wide@example.com', false, true,
                     repeat('😀', 255), repeat('🙂', 255), '{ACME_REALM_ID}', 'wide', NULL, NULL);
             UPDATE public.user_entity SET enabled = false WHERE id = 'k-2';
             DELETE FROM public.user_entity WHERE id = 'k-2';"
        ))
        .await
        .unwrap();
    wait_live_match(&pair, KEYCLOAK_SOURCE_LIVE, KEYCLOAK_TARGET_LIVE).await;
    assert!(
        target_has(
            &pair,
            "SELECT count(*) = 2 FROM neon_auth.users_sync WHERE id IN ('k-1', 'k-4')"
        )
        .await,
        "only acme's people reach the target"
    );
    assert_eq!(
        running.metrics.changes(Op::Delete),
        0,
        "with whole old rows, changes to other realms' users write nothing"
    );

    // An update that leaves the long names alone: they arrive as unchanged TOAST. (An
    // uncompressed value stored out of line reports its bare length as its column size.)
    let out_of_line: bool = pair
        .source
        .query_one(
            "SELECT pg_column_size(first_name) = octet_length(first_name)
                    OR pg_column_size(last_name) = octet_length(last_name)
               FROM public.user_entity WHERE id = 'k-4'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(out_of_line, "a long name is stored out of line");
    pair.source
        .batch_execute("UPDATE public.user_entity SET enabled = false WHERE id = 'k-4'")
        .await
        .unwrap();
    pair.wait_target(
        "SELECT raw_json ->> 'enabled' = 'false' FROM neon_auth.users_sync WHERE id = 'k-4'",
    )
    .await;
    wait_live_match(&pair, KEYCLOAK_SOURCE_LIVE, KEYCLOAK_TARGET_LIVE).await;

    // Moving a user to another realm is that realm's gain and acme's delete; moving back
    // revives it; a rename shows; a delete is a soft delete.
    pair.source
        .batch_execute("UPDATE public.user_entity SET realm_id = 'master' WHERE id = 'k-1'")
        .await
        .unwrap();
    pair.wait_target("SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE id = 'k-1'")
        .await;
    for statement in [
        &format!("UPDATE public.user_entity SET realm_id = '{ACME_REALM_ID}' WHERE id = 'k-1'"),
        "UPDATE public.user_entity SET first_name = 'Kimberly' WHERE id = 'k-1'",
    ] {
        pair.source.batch_execute(statement).await.unwrap();
    }
    wait_live_match(&pair, KEYCLOAK_SOURCE_LIVE, KEYCLOAK_TARGET_LIVE).await;
    assert!(
        target_has(
            &pair,
            "SELECT name = 'Kimberly Lee' FROM neon_auth.users_sync WHERE id = 'k-1'"
        )
        .await
    );
    pair.source
        .batch_execute("DELETE FROM public.user_entity WHERE id = 'k-4'")
        .await
        .unwrap();
    pair.wait_target(
        "SELECT deleted_at IS NOT NULL AND raw_json ->> 'username' = 'wide'
           FROM neon_auth.users_sync WHERE id = 'k-4'",
    )
    .await;
    running.stop().await;
}

/// A realm usersync cannot resolve is refused, never taken as an id that matches no user (then
/// setup copied nothing and every update of the realm's users became a soft delete): the
/// least-privilege role without `SELECT` on Keycloak's `realm` table gets the GRANT to run,
/// and a realm id that users carry needs no lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_refuses_a_realm_it_cannot_resolve() {
    // The role script for the users table only: no SELECT on realm.
    let mut pair = Pair::for_table(KEYCLOAK_TABLES, "public.user_entity").await;
    pair.config.mapping = Profile::Keycloak(KeycloakMapping::new("acme"));
    pair.source
        .batch_execute(&format!(
            "INSERT INTO public.user_entity (id, email, email_constraint, realm_id, username,
                                             created_timestamp)
             VALUES ('k-1', 'kim@example.com', 'kim@example.com', '{ACME_REALM_ID}', 'kim',
                     1704164645123),
                    ('k-2', 'admin@example.com', 'admin@example.com', 'master', 'admin',
                     1704164645000)"
        ))
        .await
        .unwrap();
    let slots = || async {
        pair.source
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&pair.config.slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    for realm in ["acme", "nope"] {
        let refused = pair.usersync(&["setup", "--profile", "keycloak", "--realm", realm]);
        let said = text(&refused);
        assert_eq!(refused.status.code(), Some(78), "{said}");
        assert!(
            said.contains(r#"GRANT SELECT ON "public"."realm""#),
            "{said}"
        );
        assert!(said.contains("profile=keycloak"), "{said}");
        assert_eq!(slots().await, 0, "{said}");
    }

    // An id that users carry needs no lookup.
    let setup = pair.usersync(&["setup", "--profile", "keycloak", "--realm", ACME_REALM_ID]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(said.contains("skipped 1 of 2 rows"), "{said}");
    assert_eq!(slots().await, 1);

    // A least-privilege run after that setup: the name is refused at start, before any change
    // is taken for another realm's.
    let run = pair.usersync(&["run", "--profile", "keycloak", "--realm", "acme"]);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(78), "{said}");
    assert!(
        said.contains(r#"GRANT SELECT ON "public"."realm""#),
        "{said}"
    );

    // With what the role script grants for the profile, the name resolves.
    pair.grant_source_profile("keycloak");
    let setup = pair.usersync(&["setup", "--profile", "keycloak", "--realm", "acme"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains(&format!("realm acme (id {ACME_REALM_ID})")),
        "{said}"
    );
    let running = pair.start();
    pair.source
        .batch_execute("UPDATE public.user_entity SET first_name = 'Kim' WHERE id = 'k-1'")
        .await
        .unwrap();
    pair.wait_target(
        "SELECT name = 'Kim' AND deleted_at IS NULL FROM neon_auth.users_sync WHERE id = 'k-1'",
    )
    .await;
    running.stop().await;
}

const BETTER_AUTH_SOURCE_LIVE: &str = r#"
SELECT id, email, name, "emailVerified", floor(extract(epoch FROM "createdAt") * 1000)::bigint,
       md5(coalesce(image, ''))
  FROM "user" WHERE NOT coalesce("isAnonymous", false) ORDER BY 1"#;

const BETTER_AUTH_TARGET_LIVE: &str = "
SELECT id, email, name, (raw_json ->> 'primary_email_verified')::bool,
       (raw_json ->> 'signed_up_at_millis')::bigint,
       md5(coalesce(raw_json ->> 'profile_image_url', ''))
  FROM neon_auth.users_sync WHERE deleted_at IS NULL ORDER BY 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn better_auth_users_with_anonymous_and_toast() {
    let pair = profile_pair(
        BETTER_AUTH_USER,
        "public.user",
        Profile::BetterAuth(BetterAuthMapping::default()),
    )
    .await;
    pair.source
        .batch_execute(r#"ALTER TABLE "user" ALTER COLUMN "image" SET STORAGE EXTERNAL"#)
        .await
        .unwrap();
    let setup = pair
        .command(&["setup", "--profile", "better-auth"])
        .output()
        .unwrap();
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(said.contains("source table public.user"), "{said}");
    assert!(
        said.lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>()
                == ["primary_email_verified", "<-", "emailVerified"]),
        "{said}"
    );

    let running = pair.start();
    // An avatar stored as a data: URL of ~8 kB goes out of line.
    pair.source
        .batch_execute(
            r#"INSERT INTO "user" (id, name, email, "emailVerified", image, "createdAt")
               SELECT 'ba-1', 'Linus', 'linus@example.com', false,
                      'data:image/png;base64,' || string_agg(md5(g::text), ''),
                      '2024-01-02 03:04:05.678+00'
                 FROM generate_series(1, 250) g;
               INSERT INTO "user" (id, name, email, "emailVerified", "isAnonymous")
               VALUES ('ba-2', 'Anonymous', 'temp-ba-2@anon.example', false, true),
                      ('ba-3', 'Margaret', 'margaret@example.com', true, false);"#,
        )
        .await
        .unwrap();
    wait_live_match(&pair, BETTER_AUTH_SOURCE_LIVE, BETTER_AUTH_TARGET_LIVE).await;
    for statement in [
        // Leaves the image alone: unchanged TOAST, kept from the target.
        r#"UPDATE "user" SET "emailVerified" = true, "updatedAt" = now() WHERE id = 'ba-1'"#,
        // The guest signs up: now a user.
        r#"UPDATE "user" SET email = 'guest@example.com', name = 'Guest', "isAnonymous" = false WHERE id = 'ba-2'"#,
        // Turned anonymous again: must not stay live.
        r#"UPDATE "user" SET "isAnonymous" = true WHERE id = 'ba-3'"#,
    ] {
        pair.source.batch_execute(statement).await.unwrap();
    }
    wait_live_match(&pair, BETTER_AUTH_SOURCE_LIVE, BETTER_AUTH_TARGET_LIVE).await;
    pair.wait_target("SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE id = 'ba-3'")
        .await;
    pair.source
        .batch_execute(r#"DELETE FROM "user" WHERE id = 'ba-1'"#)
        .await
        .unwrap();
    pair.wait_target(
        "SELECT deleted_at IS NOT NULL AND length(raw_json ->> 'profile_image_url') > 8000
           FROM neon_auth.users_sync WHERE id = 'ba-1'",
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_refuses_a_table_that_is_not_its_store() {
    let pair = Pair::new().await;
    let output = pair
        .command(&["setup", "--profile", "supabase", "--table", "public.users"])
        .output()
        .unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(78), "{said}");
    assert!(
        said.contains("the supabase profile needs column email_confirmed_at"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_initial_copy_and_resync_follow_the_profile() {
    let pair = profile_pair(
        SUPABASE_USERS,
        "auth.users",
        Profile::Supabase(SupabaseMapping::default()),
    )
    .await;
    pair.source
        .batch_execute(
            r#"INSERT INTO auth.users (id, email, is_anonymous, deleted_at, raw_user_meta_data, created_at)
               VALUES ('00000000-0000-4000-8000-0000000000f1', 'fay@example.com', false, NULL,
                       '{"full_name": "Fay"}', now()),
                      ('00000000-0000-4000-8000-0000000000f2', NULL, true, NULL, '{}', now()),
                      ('00000000-0000-4000-8000-0000000000f3', 'gone@example.com', false,
                       '2024-02-03 04:05:06.5+00', '{}', now());"#,
        )
        .await
        .unwrap();
    let setup = pair.usersync(&["setup", "--profile", "supabase", "--include-anonymous"]);
    assert!(setup.status.success(), "{}", text(&setup));
    assert!(
        target_has(
            &pair,
            "SELECT count(*) FILTER (WHERE deleted_at IS NULL) = 2
                    AND bool_or(deleted_at = '2024-02-03 04:05:06.5+00'
                                AND id = '00000000-0000-4000-8000-0000000000f3')
               FROM neon_auth.users_sync"
        )
        .await,
        "the copy takes the anonymous user (included) and the soft-deleted one (deleted)"
    );

    // Without --include-anonymous the anonymous user is no longer one of ours.
    let resync = pair.usersync(&["resync", "--profile", "supabase"]);
    let said = text(&resync);
    assert!(resync.status.success(), "{said}");
    assert!(
        said.contains("skipped 1 of 3 rows, which the supabase profile does not replicate"),
        "{said}"
    );
    assert!(
        said.contains("1 absent from the source soft-deleted"),
        "{said}"
    );
    assert!(
        target_has(
            &pair,
            "SELECT count(*) FILTER (WHERE deleted_at IS NULL) = 1
                    AND bool_or(deleted_at IS NOT NULL AND id = '00000000-0000-4000-8000-0000000000f2')
                    AND bool_or(deleted_at = '2024-02-03 04:05:06.5+00'
                                AND id = '00000000-0000-4000-8000-0000000000f3')
               FROM neon_auth.users_sync"
        )
        .await,
        "resync soft-deletes the user the profile now skips, and keeps the store's deletion time"
    );
}

/// Stack Auth's `"ProjectUser"` and `"ContactChannel"` as its Prisma migrations create them
/// (ProjectUser reduced to the columns of its own; the enums and unique indexes faithful),
/// with the foreign key that cascades a user's deletion to its contact channels.
const STACK_AUTH_TABLES: &str = r#"
CREATE TYPE "ContactChannelType" AS ENUM ('EMAIL');
CREATE TYPE "BooleanTrue" AS ENUM ('TRUE');
CREATE TABLE "ProjectUser" (
    "tenancyId"              uuid NOT NULL,
    "projectUserId"          uuid NOT NULL,
    "mirroredProjectId"      text NOT NULL,
    "mirroredBranchId"       text NOT NULL,
    "createdAt"              timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt"              timestamp(3) NOT NULL,
    "lastActiveAt"           timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "sequenceId"             bigint,
    "shouldUpdateSequenceId" boolean NOT NULL DEFAULT true,
    "displayName"            text,
    "serverMetadata"         jsonb,
    "clientReadOnlyMetadata" jsonb,
    "clientMetadata"         jsonb,
    "profileImageUrl"        text,
    "requiresTotpMfa"        boolean NOT NULL DEFAULT false,
    "totpSecret"             bytea,
    "isAnonymous"            boolean NOT NULL DEFAULT false,
    "projectId"              text,
    CONSTRAINT "ProjectUser_pkey" PRIMARY KEY ("tenancyId", "projectUserId")
);
CREATE TABLE "ContactChannel" (
    "tenancyId"              uuid NOT NULL,
    "projectUserId"          uuid NOT NULL,
    "id"                     uuid NOT NULL,
    "createdAt"              timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt"              timestamp(3) NOT NULL,
    "sequenceId"             bigint,
    "shouldUpdateSequenceId" boolean NOT NULL DEFAULT true,
    "type"                   "ContactChannelType" NOT NULL,
    "isPrimary"              "BooleanTrue",
    "usedForAuth"            "BooleanTrue",
    "isVerified"             boolean NOT NULL,
    "value"                  text NOT NULL,
    CONSTRAINT "ContactChannel_pkey" PRIMARY KEY ("tenancyId", "projectUserId", "id"),
    CONSTRAINT "ContactChannel_tenancyId_projectUserId_fkey" FOREIGN KEY ("tenancyId", "projectUserId")
        REFERENCES "ProjectUser" ("tenancyId", "projectUserId") ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE UNIQUE INDEX "ContactChannel_tenancyId_projectUserId_type_isPrimary_key"
    ON "ContactChannel" ("tenancyId", "projectUserId", "type", "isPrimary");
CREATE UNIQUE INDEX "ContactChannel_tenancyId_projectUserId_type_value_key"
    ON "ContactChannel" ("tenancyId", "projectUserId", "type", "value");
CREATE UNIQUE INDEX "ContactChannel_tenancyId_type_value_usedForAuth_key"
    ON "ContactChannel" ("tenancyId", "type", "value", "usedForAuth");
"#;

const TENANCY: &str = "11111111-1111-4111-8111-111111111111";
const OTHER_TENANCY: &str = "22222222-2222-4222-8222-222222222222";

/// Users of `TENANCY` with their primary email, as the target should hold them.
const STACK_AUTH_SOURCE_LIVE: &str = r#"
SELECT u."projectUserId"::text, c.value, u."displayName", coalesce(c."isVerified", false),
       floor(extract(epoch FROM u."createdAt") * 1000)::bigint,
       md5(coalesce(u."clientMetadata"::text, 'null') || coalesce(u."serverMetadata"::text, 'null')
           || coalesce((c."usedForAuth" IS NOT NULL)::text, 'false'))
  FROM "ProjectUser" u
  LEFT JOIN "ContactChannel" c
    ON c."tenancyId" = u."tenancyId" AND c."projectUserId" = u."projectUserId"
   AND c.type = 'EMAIL' AND c."isPrimary" = 'TRUE'
 WHERE u."tenancyId" = '11111111-1111-4111-8111-111111111111' ORDER BY 1"#;

const STACK_AUTH_TARGET_LIVE: &str = "
SELECT id, email, name, (raw_json ->> 'primary_email_verified')::bool,
       (raw_json ->> 'signed_up_at_millis')::bigint,
       md5(coalesce((raw_json -> 'client_metadata')::text, 'null')
           || coalesce((raw_json -> 'server_metadata')::text, 'null')
           || (raw_json ->> 'primary_email_auth_enabled'))
  FROM neon_auth.users_sync WHERE deleted_at IS NULL ORDER BY 1";

/// A `"ProjectUser"` insert of user number `n` of a tenancy.
fn project_user(tenancy: &str, n: u32, name: &str) -> String {
    format!(
        r#"INSERT INTO "ProjectUser" ("tenancyId", "projectUserId", "mirroredProjectId",
                                      "mirroredBranchId", "createdAt", "updatedAt", "displayName",
                                      "clientMetadata", "serverMetadata", "totpSecret")
           VALUES ('{tenancy}', '{}', 'proj', 'main', '2024-01-02 03:04:05.{n:03}', now(),
                   '{name}', '{{"n": {n}}}', '{{"plan": "pro"}}', '\xdeadbeef');"#,
        user_id(n)
    )
}

fn user_id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A contact channel insert: the user's email `value`, primary or not.
fn channel(tenancy: &str, n: u32, channel: u32, value: &str, primary: bool) -> String {
    format!(
        r#"INSERT INTO "ContactChannel" ("tenancyId", "projectUserId", id, "updatedAt", type,
                                         "isPrimary", "usedForAuth", "isVerified", value)
           VALUES ('{tenancy}', '{}', '00000000-0000-4000-9000-{channel:012}', now(), 'EMAIL',
                   {}, 'TRUE', false, '{value}');"#,
        user_id(n),
        if primary { "'TRUE'" } else { "NULL" }
    )
}

async fn raw_json_of(pair: &Pair, n: u32) -> serde_json::Value {
    pair.target
        .query_one(
            "SELECT raw_json FROM neon_auth.users_sync WHERE id = $1",
            &[&user_id(n)],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_users_their_primary_email_and_one_tenancy() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping {
            tenancy_id: Some(TENANCY.into()),
            ..StackAuthMapping::default()
        }),
    )
    .await;
    // Users before setup: the initial copy joins their primary email.
    let mut before = String::new();
    before += &project_user(TENANCY, 1, "Ada");
    before += &channel(TENANCY, 1, 1, "ada@example.org", true);
    before += &channel(TENANCY, 1, 2, "ada@work.example", false);
    before += &project_user(TENANCY, 2, "Bob");
    before += &project_user(OTHER_TENANCY, 3, "Olga");
    before += &channel(OTHER_TENANCY, 3, 3, "olga@example.org", true);
    pair.source.batch_execute(&before).await.unwrap();

    let args = ["setup", "--profile", "stack-auth", "--tenancy-id", TENANCY];
    // Not required (see stack_auth_without_replica_identity_full_clears_the_email_its_channel_gave),
    // but where it is set, the old rows decide, and the target's record is kept right as well.
    pair.source
        .batch_execute(r#"ALTER TABLE "ContactChannel" REPLICA IDENTITY FULL"#)
        .await
        .unwrap();
    // The role script published "ProjectUser" only; adding "ContactChannel" takes its owner,
    // who runs what setup says, row filter included.
    let refused = pair.usersync(&args);
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(78), "{said}");
    let (_, owner_sql) = said
        .split_once("have the owner run: ")
        .unwrap_or_else(|| panic!("no statement for the owner in: {said}"));
    let owner_sql = owner_sql.lines().next().unwrap_or_default();
    assert!(
        owner_sql
            .trim_start_matches("BEGIN; ")
            .starts_with(r#"ALTER PUBLICATION "usersync" ADD TABLE "public"."ContactChannel""#),
        "{said}"
    );
    pair.source.batch_execute(owner_sql).await.unwrap();
    let setup = pair.usersync(&args);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("source table public.ContactChannel"),
        "{said}"
    );
    assert!(said.contains("never copied: totpSecret"), "{said}");
    assert!(said.contains("initial copy: 2 users"), "{said}");
    // Row filters came with PostgreSQL 15; on 14 usersync filters the tenancy itself.
    if pair.server.server_version_num() >= 150_000 {
        let filter: Option<String> = pair
            .source
            .query_one(
                "SELECT rowfilter FROM pg_publication_tables WHERE tablename = 'ContactChannel'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(filter.is_some_and(|f| f.contains(TENANCY)));
    }
    wait_live_match(&pair, STACK_AUTH_SOURCE_LIVE, STACK_AUTH_TARGET_LIVE).await;
    assert_eq!(
        raw_json_of(&pair, 1).await["primary_email"],
        "ada@example.org"
    );
    assert!(raw_json_of(&pair, 2).await["primary_email"].is_null());

    let running = pair.start();
    // A user and its email in one transaction; a user whose email comes later.
    let mut sql = format!("BEGIN; {}", project_user(TENANCY, 4, "Cleo"));
    sql += &channel(TENANCY, 4, 4, "cleo@example.org", true);
    sql += "COMMIT;";
    sql += &project_user(TENANCY, 5, "Dan");
    pair.source.batch_execute(&sql).await.unwrap();
    pair.source
        .batch_execute(&channel(TENANCY, 5, 5, "dan@example.org", true))
        .await
        .unwrap();
    // Email change and verification; a user row update keeps the email.
    pair.source
        .batch_execute(
            r#"UPDATE "ContactChannel" SET value = 'ada@new.example' WHERE id = '00000000-0000-4000-9000-000000000001';
               UPDATE "ContactChannel" SET "isVerified" = true WHERE id = '00000000-0000-4000-9000-000000000004';
               UPDATE "ProjectUser" SET "displayName" = 'Ada L.', "clientMetadata" = '{"n": 11}'
                WHERE "projectUserId" = '00000000-0000-4000-8000-000000000001';"#,
        )
        .await
        .unwrap();
    // A primary switch in one transaction, as Stack Auth does it (the unique index allows
    // one primary at a time), then an email deleted.
    pair.source
        .batch_execute(
            r#"BEGIN;
               UPDATE "ContactChannel" SET "isPrimary" = NULL WHERE id = '00000000-0000-4000-9000-000000000001';
               UPDATE "ContactChannel" SET "isPrimary" = 'TRUE' WHERE id = '00000000-0000-4000-9000-000000000002';
               COMMIT;
               DELETE FROM "ContactChannel" WHERE id = '00000000-0000-4000-9000-000000000005';"#,
        )
        .await
        .unwrap();
    // The other tenancy changes too: none of it may reach the target.
    let mut other = project_user(OTHER_TENANCY, 6, "Otto");
    other += &channel(OTHER_TENANCY, 6, 6, "otto@example.org", true);
    other += r#"UPDATE "ProjectUser" SET "displayName" = 'O.' WHERE "projectUserId" = '00000000-0000-4000-8000-000000000003';
                DELETE FROM "ProjectUser" WHERE "projectUserId" = '00000000-0000-4000-8000-000000000003';"#;
    pair.source.batch_execute(&other).await.unwrap();
    assert_stack_auth_matches(&pair).await;
    let ada = raw_json_of(&pair, 1).await;
    assert_eq!(ada["primary_email"], "ada@work.example");
    assert_eq!(ada["display_name"], "Ada L.");
    assert_eq!(raw_json_of(&pair, 4).await["primary_email_verified"], true);
    let dan = raw_json_of(&pair, 5).await;
    assert!(dan["primary_email"].is_null(), "{dan}");
    assert_eq!(dan["primary_email_auth_enabled"], false);
    assert!(
        target_has(
            &pair,
            "SELECT count(*) = 4 AND bool_and(raw_json ->> 'tenancyId' = '11111111-1111-4111-8111-111111111111')
               FROM neon_auth.users_sync"
        )
        .await,
        "only the tenancy's users reach the target"
    );

    // Unchanged TOAST: ~8 KB of server metadata stored out of line, then an update that
    // leaves it alone; the target keeps it (the checksums compare it).
    pair.source
        .batch_execute(
            r#"ALTER TABLE "ProjectUser" ALTER COLUMN "serverMetadata" SET STORAGE EXTERNAL;
               UPDATE "ProjectUser"
                  SET "serverMetadata" = (SELECT jsonb_build_object('blob', string_agg(md5(g::text), ''))
                                            FROM generate_series(1, 250) g)
                WHERE "projectUserId" = '00000000-0000-4000-8000-000000000001';"#,
        )
        .await
        .unwrap();
    wait_live_match(&pair, STACK_AUTH_SOURCE_LIVE, STACK_AUTH_TARGET_LIVE).await;
    pair.source
        .batch_execute(
            r#"UPDATE "ProjectUser" SET "displayName" = 'Ada Lovelace'
                WHERE "projectUserId" = '00000000-0000-4000-8000-000000000001';"#,
        )
        .await
        .unwrap();
    wait_live_match(&pair, STACK_AUTH_SOURCE_LIVE, STACK_AUTH_TARGET_LIVE).await;
    assert_eq!(raw_json_of(&pair, 1).await["display_name"], "Ada Lovelace");

    // A hard delete cascades to the contact channels: one soft-deleted user, email kept.
    pair.source
        .batch_execute(
            r#"DELETE FROM "ProjectUser" WHERE "projectUserId" = '00000000-0000-4000-8000-000000000004'"#,
        )
        .await
        .unwrap();
    pair.wait_target(
        "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync
          WHERE id = '00000000-0000-4000-8000-000000000004'",
    )
    .await;
    let cleo = raw_json_of(&pair, 4).await;
    assert_eq!(cleo["primary_email"], "cleo@example.org");
    assert_stack_auth_matches(&pair).await;

    // An application that deletes the contact channels first, then the user, in one
    // transaction: the same end as the cascade.
    pair.source
        .batch_execute(
            r#"BEGIN;
               DELETE FROM "ContactChannel" WHERE "projectUserId" = '00000000-0000-4000-8000-000000000001';
               DELETE FROM "ProjectUser" WHERE "projectUserId" = '00000000-0000-4000-8000-000000000001';
               COMMIT;"#,
        )
        .await
        .unwrap();
    pair.wait_target(
        "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync
          WHERE id = '00000000-0000-4000-8000-000000000001'",
    )
    .await;
    let ada = raw_json_of(&pair, 1).await;
    assert_eq!(
        (&ada["primary_email"], &ada["display_name"]),
        (&json!("ada@work.example"), &json!("Ada Lovelace"))
    );

    // A patch whose user is not on the target (here: removed behind usersync's back) is
    // counted, not only logged at debug level.
    assert_eq!(running.metrics.patches_without_user(), 0);
    pair.target
        .execute(
            "DELETE FROM neon_auth.users_sync WHERE id = $1",
            &[&user_id(2)],
        )
        .await
        .unwrap();
    pair.source
        .batch_execute(&channel(TENANCY, 2, 7, "bob@example.org", true))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while running.metrics.patches_without_user() == 0 {
        assert!(Instant::now() < deadline, "the lost patch was not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running.metrics.patches_without_user(), 1);
    assert!(running
        .metrics
        .encode()
        .contains("usersync_patches_without_user_total 1"));
    running.stop().await;
}

/// Stack Auth's primary email channels as the target should record them: the source's
/// primary email channel of each user live on the target.
const STACK_AUTH_SOURCE_CHANNELS: &str = r#"
SELECT c."projectUserId"::text, c.id::text FROM "ContactChannel" c
 WHERE c.type = 'EMAIL' AND c."isPrimary" = 'TRUE' ORDER BY 1"#;

const STACK_AUTH_TARGET_CHANNELS: &str = "
SELECT r.user_id, r.channel_id FROM usersync.primary_email_channel r
  JOIN neon_auth.users_sync u ON u.id = r.user_id AND u.deleted_at IS NULL ORDER BY 1";

async fn pairs_of(client: &Client, sql: &str) -> Vec<(String, Option<String>)> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `usersync status --json`'s count of live users whose primary email channel the target
/// does not know.
fn unknown_channels(pair: &Pair) -> i64 {
    let output = pair.usersync(&["status", "--json", "--lag-target", "1h"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", text(&output)));
    json["target"]["primary_email_channels_unknown"]
        .as_i64()
        .unwrap_or_else(|| panic!("no count in {json}"))
}

/// Runs `usersync setup` for the stack-auth profile as an operator would: the role script
/// published `"ProjectUser"` only, so the first attempt asks the owner to add
/// `"ContactChannel"`, which the owner (here: the test's superuser) does.
fn setup_stack_auth(pair: &Pair, args: &[&str]) -> String {
    let refused = pair.usersync(args);
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(78), "{said}");
    let (_, owner_sql) = said
        .split_once("have the owner run: ")
        .unwrap_or_else(|| panic!("no statement for the owner in: {said}"));
    let owner_sql = owner_sql.lines().next().unwrap_or_default().to_owned();
    let mut owner = psql(
        pair.server,
        &pair.config.source.dbname,
        &["-v", "ON_ERROR_STOP=1", "-c", &owner_sql],
    );
    assert!(owner.status.success(), "{}", text(&owner));
    let setup = pair.usersync(args);
    owner = setup;
    let said = text(&owner);
    assert!(owner.status.success(), "{said}");
    said
}

fn channel_id(channel: u32) -> String {
    format!("00000000-0000-4000-9000-{channel:012}")
}

/// Makes `"ContactChannel"` row `channel` the primary email of its user, or not.
fn set_primary(channel: u32, primary: bool) -> String {
    format!(
        r#"UPDATE "ContactChannel" SET "isPrimary" = {} WHERE id = '{}';"#,
        if primary { "'TRUE'" } else { "NULL" },
        channel_id(channel)
    )
}

fn delete_channel(channel: u32) -> String {
    format!(
        r#"DELETE FROM "ContactChannel" WHERE id = '{}';"#,
        channel_id(channel)
    )
}

/// Runs `sql` on the source, then a barrier: a change to user `barrier`'s display name,
/// which the target shows only once everything before it is applied (in commit order).
async fn apply_then_barrier(pair: &Pair, sql: &str, barrier: u32, round: u32) {
    pair.source.batch_execute(sql).await.unwrap();
    pair.source
        .batch_execute(&format!(
            r#"UPDATE "ProjectUser" SET "displayName" = 'barrier {round}'
                WHERE "projectUserId" = '{}';"#,
            user_id(barrier)
        ))
        .await
        .unwrap();
    pair.wait_target(&format!(
        "SELECT EXISTS (SELECT FROM neon_auth.users_sync
                         WHERE id = '{}' AND name = 'barrier {round}')",
        user_id(barrier)
    ))
    .await;
}

async fn email_of(pair: &Pair, n: u32) -> Option<String> {
    raw_json_of(pair, n).await["primary_email"]
        .as_str()
        .map(str::to_owned)
}

/// Both sides agree on every live user, email included, and on which channel each user's
/// email came from.
async fn assert_stack_auth_matches(pair: &Pair) {
    wait_live_match(pair, STACK_AUTH_SOURCE_LIVE, STACK_AUTH_TARGET_LIVE).await;
    let source = pairs_of(&pair.source, STACK_AUTH_SOURCE_CHANNELS).await;
    let live: Vec<String> = live_users(&pair.target, STACK_AUTH_TARGET_LIVE)
        .await
        .into_iter()
        .map(|user| user.0)
        .collect();
    let source: Vec<_> = source
        .into_iter()
        .filter(|(user, _)| live.contains(user))
        .collect();
    assert_eq!(
        pairs_of(&pair.target, STACK_AUTH_TARGET_CHANNELS).await,
        source
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_without_replica_identity_full_clears_the_email_its_channel_gave() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    // "ContactChannel" keeps its default replica identity (the primary key) throughout.
    let mut before = String::new();
    for (n, name) in [(1, "Ada"), (2, "Bob"), (3, "Cleo"), (9, "Barrier")] {
        before += &project_user(TENANCY, n, name);
    }
    before += &channel(TENANCY, 1, 1, "ada@example.org", true);
    before += &channel(TENANCY, 1, 2, "ada@work.example", false);
    before += &channel(TENANCY, 2, 3, "bob@example.org", true);
    pair.source.batch_execute(&before).await.unwrap();
    let said = setup_stack_auth(&pair, &["setup", "--profile", "stack-auth"]);
    assert!(said.contains("initial copy: 4 users"), "{said}");
    // The copy recorded where each email came from.
    assert_stack_auth_matches(&pair).await;
    assert_eq!(
        pairs_of(&pair.target, STACK_AUTH_TARGET_CHANNELS).await,
        [
            (user_id(1), Some(channel_id(1))),
            (user_id(2), Some(channel_id(3)))
        ]
    );

    let running = pair.start();
    // Across batches, each step applied before the next is made.
    // A non-primary channel deleted: the email stays.
    apply_then_barrier(&pair, &delete_channel(2), 9, 1).await;
    assert_eq!(email_of(&pair, 1).await.as_deref(), Some("ada@example.org"));
    // A primary email set on a user that had none, then moved to another channel.
    apply_then_barrier(
        &pair,
        &channel(TENANCY, 3, 4, "cleo@example.org", true),
        9,
        2,
    )
    .await;
    assert_eq!(
        email_of(&pair, 3).await.as_deref(),
        Some("cleo@example.org")
    );
    apply_then_barrier(
        &pair,
        &format!(
            "BEGIN; {}{}{}COMMIT;",
            set_primary(4, false),
            channel(TENANCY, 3, 5, "cleo@work.example", false),
            set_primary(5, true)
        ),
        9,
        3,
    )
    .await;
    assert_eq!(
        email_of(&pair, 3).await.as_deref(),
        Some("cleo@work.example")
    );
    assert_stack_auth_matches(&pair).await;
    // The old primary, no longer primary, deleted: the email stays.
    apply_then_barrier(&pair, &delete_channel(4), 9, 4).await;
    assert_eq!(
        email_of(&pair, 3).await.as_deref(),
        Some("cleo@work.example")
    );
    // The primary channel deleted: the email goes.
    apply_then_barrier(&pair, &delete_channel(1), 9, 5).await;
    let ada = raw_json_of(&pair, 1).await;
    assert!(ada["primary_email"].is_null(), "{ada}");
    assert_eq!(ada["primary_email_verified"], false);
    // The primary channel updated so that it is no longer primary: the email goes.
    apply_then_barrier(&pair, &set_primary(3, false), 9, 6).await;
    assert!(email_of(&pair, 2).await.is_none());
    assert_stack_auth_matches(&pair).await;

    // Within one source transaction, so one batch: the batch decides what it knows, the
    // target what it records (user 3's channel 5, recorded by an earlier batch).
    apply_then_barrier(
        &pair,
        &format!(
            "BEGIN; {}{}{}{}{}{}{}{}{}COMMIT;",
            // User 1: set, moved, the old one deleted, the new one cleared, set again.
            channel(TENANCY, 1, 6, "ada@new.example", true),
            set_primary(6, false),
            channel(TENANCY, 1, 7, "ada@newer.example", true),
            delete_channel(6),
            set_primary(7, false),
            set_primary(7, true),
            // User 3: a non-primary channel added and deleted, then the recorded primary
            // (from an earlier batch) deleted.
            channel(TENANCY, 3, 8, "cleo@old.example", false),
            delete_channel(8),
            delete_channel(5),
        ),
        9,
        7,
    )
    .await;
    assert_eq!(
        email_of(&pair, 1).await.as_deref(),
        Some("ada@newer.example")
    );
    assert!(email_of(&pair, 3).await.is_none());
    assert_stack_auth_matches(&pair).await;

    // Many source transactions, no barrier between them: they may share batches in any way.
    for round in 0..20u32 {
        let channel_n = 100 + round;
        let mut sql = channel(
            TENANCY,
            2,
            channel_n,
            &format!("bob{round}@example.org"),
            false,
        );
        sql += "BEGIN; ";
        if round > 0 {
            sql += &set_primary(channel_n - 1, false);
        }
        sql += &set_primary(channel_n, true);
        sql += "COMMIT;";
        if round > 0 {
            sql += &delete_channel(channel_n - 1);
        }
        pair.source.batch_execute(&sql).await.unwrap();
    }
    pair.source
        .batch_execute(&delete_channel(119))
        .await
        .unwrap();
    // A crash while they are being applied: the next session resumes from the checkpoint,
    // which commits with the emails and the records, so each applies once.
    running.abort();
    let running = pair.start();
    apply_then_barrier(&pair, "", 9, 8).await;
    assert!(email_of(&pair, 2).await.is_none());
    assert_stack_auth_matches(&pair).await;

    // A restart in the middle: changes made while usersync is stopped apply once.
    apply_then_barrier(
        &pair,
        &channel(TENANCY, 2, 200, "bob@again.example", true),
        9,
        9,
    )
    .await;
    running.stop().await;
    pair.source
        .batch_execute(&format!(
            "{}{}{}",
            delete_channel(200),
            channel(TENANCY, 3, 201, "cleo@again.example", true),
            channel(TENANCY, 3, 202, "cleo@spare.example", false),
        ))
        .await
        .unwrap();
    let running = pair.start();
    apply_then_barrier(&pair, &delete_channel(202), 9, 10).await;
    assert!(email_of(&pair, 2).await.is_none());
    assert_eq!(
        email_of(&pair, 3).await.as_deref(),
        Some("cleo@again.example")
    );
    assert_stack_auth_matches(&pair).await;

    // A user deleted: its channels cascade after it; the user is soft-deleted with its
    // last email, and the record of where it came from stays with it.
    apply_then_barrier(
        &pair,
        &format!(
            r#"DELETE FROM "ProjectUser" WHERE "projectUserId" = '{}';"#,
            user_id(3)
        ),
        9,
        11,
    )
    .await;
    let cleo = raw_json_of(&pair, 3).await;
    assert_eq!(cleo["primary_email"], "cleo@again.example");
    assert!(
        target_has(
            &pair,
            &format!(
                "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE id = '{}'",
                user_id(3)
            )
        )
        .await
    );
    assert_stack_auth_matches(&pair).await;
    running.stop().await;
}

/// A target an older usersync copied (it required `REPLICA IDENTITY FULL` and kept no record
/// of the channels): the upgrade marks its users' channels unknown, FULL keeps working,
/// `setup` records the channels from the source, and a change that would need an unknown
/// channel stops `run` rather than guess, until `resync` records every channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_target_copied_by_an_older_usersync_needs_full_until_setup_or_resync() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    let mut before = String::new();
    for (n, name) in [
        (1, "Ada"),
        (2, "Bob"),
        (3, "Cleo"),
        (4, "Dan"),
        (9, "Barrier"),
    ] {
        before += &project_user(TENANCY, n, name);
    }
    for n in 1..=4 {
        before += &channel(TENANCY, n, n, &format!("user{n}@example.org"), true);
    }
    before += r#"ALTER TABLE "ContactChannel" REPLICA IDENTITY FULL;"#;
    pair.source.batch_execute(&before).await.unwrap();
    setup_stack_auth(&pair, &["setup", "--profile", "stack-auth"]);
    // What an older usersync left: no record at all.
    pair.target
        .batch_execute("DROP TABLE usersync.primary_email_channel")
        .await
        .unwrap();

    // run upgrades the target: every live user showing an email has an unknown channel.
    let running = pair.start();
    apply_then_barrier(&pair, "", 9, 1).await;
    assert_eq!(
        pairs_of(&pair.target, STACK_AUTH_TARGET_CHANNELS).await,
        (1..=4).map(|n| (user_id(n), None)).collect::<Vec<_>>()
    );
    // Under FULL the old row says it was the primary email: cleared, record forgotten. A
    // primary email set again is recorded.
    apply_then_barrier(
        &pair,
        &format!(
            "{}{}",
            delete_channel(1),
            r#"UPDATE "ContactChannel" SET value = 'new2@example.org'
                WHERE id = '00000000-0000-4000-9000-000000000002';"#
        ),
        9,
        2,
    )
    .await;
    assert!(email_of(&pair, 1).await.is_none());
    assert_eq!(
        email_of(&pair, 2).await.as_deref(),
        Some("new2@example.org")
    );
    assert_eq!(
        pairs_of(&pair.target, STACK_AUTH_TARGET_CHANNELS).await,
        [
            (user_id(2), Some(channel_id(2))),
            (user_id(3), None),
            (user_id(4), None)
        ]
    );

    // status says how many channels are unknown; setup, run again, records them from the
    // source.
    running.stop().await;
    assert_eq!(unknown_channels(&pair), 2);
    let status = pair.usersync(&["status", "--lag-target", "1h"]);
    assert!(
        text(&status).contains("2 users' primary email channel unknown"),
        "{}",
        text(&status)
    );
    let setup = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("recorded the primary email channel of 2 of the 2 users"),
        "{said}"
    );
    assert_stack_auth_matches(&pair).await;
    assert_eq!(unknown_channels(&pair), 0);

    // Now FULL can go.
    pair.source
        .batch_execute(r#"ALTER TABLE "ContactChannel" REPLICA IDENTITY DEFAULT"#)
        .await
        .unwrap();
    let running = pair.start();
    apply_then_barrier(&pair, &delete_channel(3), 9, 3).await;
    assert!(email_of(&pair, 3).await.is_none());
    assert_stack_auth_matches(&pair).await;

    // A channel still unknown (here by hand) and a change that needs it: run stops rather
    // than guess, and applies nothing of that batch.
    pair.target
        .batch_execute(
            "UPDATE usersync.primary_email_channel SET channel_id = NULL
              WHERE user_id = '00000000-0000-4000-8000-000000000004'",
        )
        .await
        .unwrap();
    pair.source
        .batch_execute(&set_primary(4, false))
        .await
        .unwrap();
    let error = running.failure().await;
    assert!(
        matches!(
            &error,
            usersync::Error::Target(usersync::apply::ApplyError::PartSourceUnknown)
        ),
        "{error:?}"
    );
    assert!(!error.is_transient(), "{error:?}");
    assert!(error.to_string().contains("run usersync setup"), "{error}");
    assert_eq!(
        email_of(&pair, 4).await.as_deref(),
        Some("user4@example.org")
    );
    // The source has no primary email for that user now: setup cannot tell, and says so.
    let setup = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("1 have no primary email on the source now"),
        "{said}"
    );

    // resync records every channel; run then carries on without FULL.
    let deadline = Instant::now() + WAIT;
    loop {
        let resync = pair.usersync(&["resync", "--profile", "stack-auth"]);
        if resync.status.success() {
            break;
        }
        // The failed session's walsender may hold the slot a moment longer.
        assert!(
            Instant::now() < deadline && text(&resync).contains("in use"),
            "{}",
            text(&resync)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(email_of(&pair, 4).await.is_none());
    assert_eq!(
        pairs_of(&pair.target, STACK_AUTH_TARGET_CHANNELS).await,
        [(user_id(2), Some(channel_id(2)))]
    );
    let running = pair.start();
    apply_then_barrier(&pair, &delete_channel(2), 9, 4).await;
    assert!(email_of(&pair, 2).await.is_none());
    assert_stack_auth_matches(&pair).await;
    running.stop().await;
}

/// A target with `neon_auth.users_sync` but no usersync schema (Neon created the table,
/// usersync never ran): `status` reports that setup is needed, not an SQL error from looking
/// into a table that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_a_target_with_users_sync_but_no_usersync_tables_says_run_setup() {
    let pair = Pair::as_superuser().await;
    pair.target
        .batch_execute(include_str!("../../sql/users_sync.sql"))
        .await
        .unwrap();
    pair.target
        .batch_execute("DROP SCHEMA IF EXISTS usersync CASCADE")
        .await
        .unwrap();
    let output = pair.usersync(&["status", "--json"]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(5), "{said}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {said}"));
    assert_eq!(json["verdict"], "broken", "{json}");
    assert_eq!(json["target"]["tables_present"], false, "{json}");
    assert_eq!(json["target"]["users_live"], 0, "{json}");
    assert!(
        json["target"]["primary_email_channels_unknown"].is_null(),
        "{json}"
    );
    assert!(
        json["problems"].to_string().contains("run usersync setup"),
        "{json}"
    );
}

/// `setup` beside this version's running `run` (as the replica identity switches ask for):
/// unknown users the source has no primary email for leave setup nothing to record, so it
/// goes through, saying so, instead of refusing as if an older usersync were running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_setup_beside_run_with_nothing_to_record_goes_through() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    let mut before = String::new();
    for (n, name) in [(1, "Ada"), (2, "Bob"), (9, "Barrier")] {
        before += &project_user(TENANCY, n, name);
    }
    before += &channel(TENANCY, 1, 1, "ada@example.org", true);
    before += &channel(TENANCY, 2, 2, "bob@work.example", false);
    pair.source.batch_execute(&before).await.unwrap();
    setup_stack_auth(&pair, &["setup", "--profile", "stack-auth"]);
    // Bob shows an email nobody recorded, and has no primary email on the source.
    pair.target
        .batch_execute(&format!(
            r#"UPDATE neon_auth.users_sync
                  SET raw_json = raw_json || '{{"primary_email": "bob@old.example"}}'
                WHERE id = '{0}';
               DELETE FROM usersync.primary_email_channel WHERE user_id = '{0}'"#,
            user_id(2)
        ))
        .await
        .unwrap();
    assert_eq!(unknown_channels(&pair), 1);
    let running = pair.start();
    apply_then_barrier(&pair, "", 9, 1).await;
    let setup = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("none of them has a primary email on the source now"),
        "{said}"
    );
    assert_eq!(unknown_channels(&pair), 1);
    running.stop().await;
}

/// A live user showing an email with no record at all (written by a usersync older than the
/// record while the record already existed) is unknown as much as one recorded NULL: status
/// counts it, setup fills it (and ignores records that do not matter: users soft-deleted or
/// showing no email), a change that needs it stops run instead of doing nothing, and setup
/// refuses to fill records while another usersync may be writing emails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_a_user_with_an_email_but_no_record_is_unknown() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    let mut before = String::new();
    for (n, name) in [(1, "Ada"), (2, "Bob"), (9, "Barrier")] {
        before += &project_user(TENANCY, n, name);
    }
    before += &channel(TENANCY, 1, 1, "ada@example.org", true);
    before += &channel(TENANCY, 1, 3, "ada@work.example", false);
    before += &channel(TENANCY, 2, 2, "bob@example.org", true);
    pair.source.batch_execute(&before).await.unwrap();
    setup_stack_auth(&pair, &["setup", "--profile", "stack-auth"]);
    assert_eq!(unknown_channels(&pair), 0);

    // A record that does not matter (a user showing no email): neither counted nor read.
    pair.target
        .batch_execute(&format!(
            "INSERT INTO usersync.primary_email_channel VALUES ('{}', NULL)",
            user_id(9)
        ))
        .await
        .unwrap();
    assert_eq!(unknown_channels(&pair), 0);
    let setup = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        !said.contains("recorded the primary email channel"),
        "{said}"
    );

    // The records of users 1 and 2 gone: both unknown.
    pair.target
        .batch_execute(&format!(
            "DELETE FROM usersync.primary_email_channel WHERE user_id IN ('{}', '{}', '{}')",
            user_id(1),
            user_id(2),
            user_id(9)
        ))
        .await
        .unwrap();
    assert_eq!(unknown_channels(&pair), 2);
    // Without FULL on "ContactChannel" the next change to their channels stops run: status
    // warns.
    let status = pair.usersync(&["status", "--json", "--lag-target", "1h"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status.status.code(), Some(3), "{json}");
    assert!(
        json["problems"]
            .to_string()
            .contains("is not REPLICA IDENTITY FULL"),
        "{json}"
    );

    // setup does not fill them while a usersync runs on the slot (it may be an older one,
    // writing emails without records), nor while another session holds the slot's lock.
    let running = pair.start();
    apply_then_barrier(&pair, "", 9, 1).await;
    let refused = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(78), "{said}");
    assert!(said.contains("Stop every older usersync run"), "{said}");
    running.stop().await;
    let lock = format!(
        "SELECT pg_advisory_lock(hashtextextended('usersync:' || '{}', 0))",
        pair.config.slot
    );
    pair.target.batch_execute(&lock).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        let refused = pair.usersync(&["setup", "--profile", "stack-auth"]);
        // The stopped session's walsender may hold the slot a moment longer.
        if !text(&refused).contains("in use by source") || Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(78), "{said}");
    assert!(said.contains("Stop every older usersync run"), "{said}");
    assert!(said.contains("lock"), "{said}");
    pair.target
        .batch_execute(&lock.replace("pg_advisory_lock", "pg_advisory_unlock"))
        .await
        .unwrap();
    assert_eq!(unknown_channels(&pair), 2);

    // Now setup fills both.
    let setup = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("recorded the primary email channel of 2 of the 2 users"),
        "{said}"
    );
    assert_eq!(unknown_channels(&pair), 0);
    assert_stack_auth_matches(&pair).await;

    // User 1's record gone again, and a key-only change to its other channel: run cannot
    // tell whether that channel gave the email, and stops rather than do nothing.
    pair.target
        .batch_execute(&format!(
            "DELETE FROM usersync.primary_email_channel WHERE user_id = '{}'",
            user_id(1)
        ))
        .await
        .unwrap();
    let running = pair.start();
    pair.source.batch_execute(&delete_channel(3)).await.unwrap();
    let error = running.failure().await;
    assert!(
        matches!(
            &error,
            usersync::Error::Target(usersync::apply::ApplyError::PartSourceUnknown)
        ),
        "{error:?}"
    );
    assert_eq!(email_of(&pair, 1).await.as_deref(), Some("ada@example.org"));
}

/// In one source transaction a user's primary channel is deleted, then the user's id
/// changes: the new id shows no email and has no record, as applying the changes one by one
/// gives; a user whose id changes with its email keeps the email and its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_an_id_change_after_the_primary_channel_went_away() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    let mut before = String::new();
    for (n, name) in [(1, "Ada"), (2, "Bob"), (9, "Barrier")] {
        before += &project_user(TENANCY, n, name);
    }
    before += &channel(TENANCY, 1, 1, "ada@example.org", true);
    before += &channel(TENANCY, 2, 2, "bob@example.org", true);
    pair.source.batch_execute(&before).await.unwrap();
    setup_stack_auth(&pair, &["setup", "--profile", "stack-auth"]);
    let running = pair.start();
    let rename = |from: u32, to: u32| {
        format!(
            r#"UPDATE "ProjectUser" SET "projectUserId" = '{}' WHERE "projectUserId" = '{}';"#,
            user_id(to),
            user_id(from)
        )
    };
    apply_then_barrier(
        &pair,
        &format!(
            "BEGIN; {}{}COMMIT; {}",
            delete_channel(1),
            rename(1, 7),
            rename(2, 8)
        ),
        9,
        1,
    )
    .await;
    assert!(email_of(&pair, 7).await.is_none());
    assert_eq!(email_of(&pair, 8).await.as_deref(), Some("bob@example.org"));
    assert_stack_auth_matches(&pair).await;
    running.stop().await;
}

/// `setup --no-snapshot` reads the source before its slot exists, too early to record
/// channels from: it leaves them unknown and says to run setup again, which records them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_setup_without_a_snapshot_leaves_channels_unknown_until_setup_again() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    let mut before = String::new();
    for (n, name) in [(1, "Ada"), (2, "Bob")] {
        before += &project_user(TENANCY, n, name);
        before += &channel(TENANCY, n, n, &format!("user{n}@example.org"), true);
    }
    pair.source.batch_execute(&before).await.unwrap();
    setup_stack_auth(&pair, &["setup", "--profile", "stack-auth"]);
    let teardown = pair.usersync(&["teardown", "--yes"]);
    assert!(teardown.status.success(), "{}", text(&teardown));
    assert_eq!(unknown_channels(&pair), 2);

    let args = ["setup", "--profile", "stack-auth", "--no-snapshot"];
    let mut setup = pair.usersync(&args);
    if let Some((_, owner_sql)) = text(&setup).split_once("have the owner run: ") {
        let owner_sql = owner_sql.lines().next().unwrap_or_default().to_owned();
        let owner = psql(
            pair.server,
            &pair.config.source.dbname,
            &["-v", "ON_ERROR_STOP=1", "-c", &owner_sql],
        );
        assert!(owner.status.success(), "{}", text(&owner));
        setup = pair.usersync(&args);
    }
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        !said.contains("recorded the primary email channel"),
        "{said}"
    );
    assert!(said.contains("run usersync setup again"), "{said}");
    assert_eq!(unknown_channels(&pair), 2);

    let setup = pair.usersync(&["setup", "--profile", "stack-auth"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("recorded the primary email channel of 2 of the 2 users"),
        "{said}"
    );
    assert_eq!(unknown_channels(&pair), 0);
    assert_stack_auth_matches(&pair).await;
}

/// A Stack Auth tenancy added to a running fan-out is copied online while its users change
/// (display names, which leave the email out of the update; emails, which patch it; new
/// users; a deleted one): its target ends with every user and the right primary email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_auth_a_route_added_while_running_gets_its_users_and_their_emails() {
    let pair = profile_pair(
        STACK_AUTH_TABLES,
        "public.ProjectUser",
        Profile::StackAuth(StackAuthMapping::default()),
    )
    .await;
    let mut before = String::new();
    for n in 1..=300 {
        let tenancy = if n % 3 == 0 { TENANCY } else { OTHER_TENANCY };
        before += &project_user(tenancy, n, &format!("User {n}"));
        if n % 5 != 0 {
            before += &channel(tenancy, n, n, &format!("u{n}@example.org"), true);
        }
        if n % 7 == 0 {
            before += &channel(tenancy, n, 1000 + n, &format!("u{n}@work.example"), false);
        }
    }
    pair.source.batch_execute(&before).await.unwrap();
    let dir = std::env::temp_dir().join(unique("stack_routes"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut targets = Vec::new();
    for name in ["one", "two"] {
        let dbname = format!("{}_{name}", pair.config.target.dbname);
        create_database(pair.target_server, &dbname).await;
        targets.push((
            pair.target_server.superuser_url(&dbname),
            sql(pair.target_server, &dbname).await,
        ));
    }
    let write_routes = |routes: &[(&str, &str)]| {
        let mut text = String::new();
        for (index, (name, tenancy)) in routes.iter().enumerate() {
            let url_file = dir.join(format!("{name}.url"));
            std::fs::write(&url_file, &targets[index].0).unwrap();
            std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
            text += &format!(
                "[[route]]\nname = \"{name}\"\nvalues = [\"{tenancy}\"]\ntarget_file = \"{}\"\n",
                url_file.display()
            );
        }
        let path = dir.join("routes.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let routes = write_routes(&[("one", TENANCY)]);
    let command = |args: &[&str]| {
        let mut command = pair.command(args);
        command
            .env_remove("USERSYNC_TARGET_URL")
            .env("USERSYNC_ROUTES_FILE", &routes)
            .env("USERSYNC_PROFILE", "stack-auth");
        command
    };
    let setup = command(&["setup"]).output().unwrap();
    let said = text(&setup);
    if let Some((_, owner_sql)) = said.split_once("have the owner run: ") {
        // The role script published "ProjectUser" only: the owner adds "ContactChannel".
        let owner_sql = owner_sql.lines().next().unwrap_or_default();
        pair.source.batch_execute(owner_sql).await.unwrap();
        let setup = command(&["setup"]).output().unwrap();
        assert!(setup.status.success(), "setup: {}", text(&setup));
    } else {
        assert!(setup.status.success(), "setup: {said}");
    }
    let log = dir.join("run.log");
    let mut run = command(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Changes to the new tenancy's users before and while it is copied.
    let change = |round: u32| {
        let n = 1 + (round * 7) % 299;
        let n = if n.is_multiple_of(3) { n + 1 } else { n };
        let mut sql = format!(
            r#"UPDATE "ProjectUser" SET "displayName" = 'Renamed {round}', "updatedAt" = now()
                WHERE "projectUserId" = '{}';
               UPDATE "ContactChannel" SET value = 'changed{round}@example.org', "updatedAt" = now()
                WHERE "projectUserId" = '{}' AND "isPrimary" = 'TRUE';"#,
            user_id(n),
            user_id(n + 1)
        );
        if round.is_multiple_of(10) {
            let new = 1000 + round;
            sql += &project_user(OTHER_TENANCY, new, "New");
            sql += &channel(
                OTHER_TENANCY,
                new,
                5000 + new,
                &format!("new{new}@example.org"),
                true,
            );
        }
        if round.is_multiple_of(12) {
            // Known by its key only: the target must know the channel the email came from.
            sql += &format!(
                r#"DELETE FROM "ContactChannel" WHERE "projectUserId" = '{}' AND "isPrimary" = 'TRUE';"#,
                user_id(n + 3)
            );
        }
        if round.is_multiple_of(15) && !(n + 2).is_multiple_of(3) {
            sql += &format!(
                r#"DELETE FROM "ProjectUser" WHERE "projectUserId" = '{}';"#,
                user_id(n + 2)
            );
        }
        sql
    };
    let writer = sql(pair.server, &pair.config.source.dbname).await;
    for round in 0..20 {
        writer.batch_execute(&change(round)).await.unwrap();
    }
    // One user changed without pause (as Stack Auth's lastActiveAt is): its copy cannot
    // wait for it to settle.
    let hot_writer = sql(pair.server, &pair.config.source.dbname).await;
    let hot = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hot_loop = {
        let hot = std::sync::Arc::clone(&hot);
        tokio::spawn(async move {
            let mut n = 0u32;
            while hot.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                hot_writer
                    .batch_execute(&format!(
                        r#"UPDATE "ProjectUser" SET "displayName" = 'Hot {n}', "updatedAt" = now()
                            WHERE "projectUserId" = '{}'"#,
                        user_id(2)
                    ))
                    .await
                    .unwrap();
            }
            n
        })
    };
    write_routes(&[("one", TENANCY), ("two", OTHER_TENANCY)]);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    for round in 20..200 {
        writer.batch_execute(&change(round)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("the route's users are copied")
    {
        assert!(
            Instant::now() < deadline,
            "the copy did not finish while one user kept changing: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hot.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(hot_loop.await.unwrap() > 100, "the hot user hardly changed");
    let deadline = Instant::now() + WAIT;
    let other_live = STACK_AUTH_SOURCE_LIVE.replace(TENANCY, OTHER_TENANCY);
    for (index, source_sql) in [STACK_AUTH_SOURCE_LIVE, other_live.as_str()]
        .iter()
        .enumerate()
    {
        loop {
            let source = live_users(&pair.source, source_sql).await;
            let target = live_users(&targets[index].1, STACK_AUTH_TARGET_LIVE).await;
            if source == target && !source.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "route {index} differs:\nsource {source:#?}\ntarget {target:#?}\nrun's log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("the route's users are copied"), "{said}");
    assert!(run.try_wait().unwrap().is_none(), "run ended: {said}");
    run.kill().unwrap();
    run.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
