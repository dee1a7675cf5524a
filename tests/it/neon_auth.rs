//! Neon Auth as it is now: Better Auth's users live in `neon_auth."user"` on the branch
//! itself, while apps (and Drizzle's `usersSync` helper) still read `neon_auth.users_sync`.
//! usersync with the better-auth profile, and one database as both its source and its target,
//! keeps that table in step, with the apps' foreign keys to it (docs/neon-auth.md).
//!
//! One database means the slot decodes usersync's own writes to the target too (users_sync,
//! its checkpoint). The publication carries the identity store's table alone, so none of them
//! may come back as a change to apply: the counts of changes, transactions and target writes
//! below are exact, and they stay put while nothing happens.

use std::time::Duration;

use usersync::map::{BetterAuthMapping, Profile};
use usersync::metrics::Op;

use crate::harness::*;
use crate::profiles::{profile_pair, wait_live_match};

/// `neon_auth."user"` as Neon Auth creates it on a branch: Better Auth's user table with the
/// admin plugin's columns, as public schema dumps of Neon branches show it.
const NEON_AUTH_USER: &str = r#"
CREATE SCHEMA neon_auth;
CREATE TABLE neon_auth."user" (
    id              uuid DEFAULT gen_random_uuid() NOT NULL PRIMARY KEY,
    name            text NOT NULL,
    email           text NOT NULL UNIQUE,
    "emailVerified" boolean NOT NULL,
    image           text,
    "createdAt"     timestamptz DEFAULT CURRENT_TIMESTAMP NOT NULL,
    "updatedAt"     timestamptz DEFAULT CURRENT_TIMESTAMP NOT NULL,
    role            text,
    banned          boolean,
    "banReason"     text,
    "banExpires"    timestamptz
)"#;

/// Each user as the source has it: id, email, name, verified, sign-up millis, and a checksum
/// of the image and the admin plugin's role.
const SOURCE_USERS: &str = r#"
SELECT id::text, email, name, "emailVerified",
       floor(extract(epoch FROM "createdAt") * 1000)::bigint,
       md5(coalesce(image, '') || '/' || coalesce(role, ''))
  FROM neon_auth."user" ORDER BY 1"#;

/// The live users of users_sync in the same form.
const TARGET_LIVE_USERS: &str = "
SELECT id, email, name, (raw_json ->> 'primary_email_verified')::bool,
       (raw_json ->> 'signed_up_at_millis')::bigint,
       md5(coalesce(raw_json ->> 'profile_image_url', '') || '/' || coalesce(raw_json ->> 'role', ''))
  FROM neon_auth.users_sync WHERE deleted_at IS NULL ORDER BY 1";

/// Logs every row written to users_sync, soft deletes included. `SECURITY DEFINER`: it writes
/// the log as its owner, so usersync's least-privilege target role needs no grant on it.
const LOG_USERS_SYNC_WRITES: &str = "
CREATE TABLE public.users_sync_writes (seq bigserial, id text, deleted boolean);
CREATE FUNCTION public.log_users_sync_write() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER AS $$
BEGIN
  INSERT INTO public.users_sync_writes (id, deleted)
  VALUES (NEW.id, NEW.deleted_at IS NOT NULL);
  RETURN NULL;
END $$;
CREATE TRIGGER log_users_sync_write AFTER INSERT OR UPDATE ON neon_auth.users_sync
  FOR EACH ROW EXECUTE FUNCTION public.log_users_sync_write();";

/// An app's table as Neon advises it: personal data goes with its user.
const APP_TABLE: &str = "
CREATE TABLE public.todos (
    id      serial PRIMARY KEY,
    user_id text NOT NULL REFERENCES neon_auth.users_sync (id) ON DELETE CASCADE,
    task    text NOT NULL
)";

/// How long nothing may happen at the end: several of the replicator's status intervals.
const IDLE: Duration = Duration::from_secs(3);

async fn count(pair: &Pair, query: &str) -> i64 {
    pair.target.query_one(query, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_sync_follows_neon_auth_user_in_the_same_database() {
    let mut pair = profile_pair(
        NEON_AUTH_USER,
        "neon_auth.user",
        Profile::BetterAuth(BetterAuthMapping::default()),
    )
    .await;
    pair.target_the_source_database().await;
    assert_eq!(pair.config.source.dbname, pair.config.target.dbname);
    // The counts below are exact: a heartbeat that arrives with a batch counts as one of its
    // transactions.
    pair.config.heartbeat_interval = None;
    pair.source
        .batch_execute(
            r#"INSERT INTO neon_auth."user" (name, email, "emailVerified", "createdAt")
               VALUES ('Ada', 'ada@example.com', true, '2025-01-02 03:04:05.678+00'),
                      ('Brian', 'brian@example.com', false, now())"#,
        )
        .await
        .unwrap();
    pair.target
        .batch_execute(LOG_USERS_SYNC_WRITES)
        .await
        .unwrap();

    let setup = pair.usersync(&[
        "setup",
        "--profile",
        "better-auth",
        "--table",
        "neon_auth.user",
    ]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("target table neon_auth.users_sync found"),
        "{said}"
    );
    assert!(said.contains("initial copy: 2 users"), "{said}");
    // The publication carries the identity store's table alone: usersync's writes to
    // users_sync and usersync.state are decoded by the slot, and never sent.
    let published: Vec<String> = pair
        .source
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables
              WHERE pubname = 'usersync'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(published, ["neon_auth.user"]);
    wait_live_match(&pair, SOURCE_USERS, TARGET_LIVE_USERS).await;
    pair.target.batch_execute(APP_TABLE).await.unwrap();
    pair.target
        .batch_execute(
            "INSERT INTO public.todos (user_id, task)
             SELECT id, 'file the expenses' FROM neon_auth.users_sync
              WHERE email = 'brian@example.com'",
        )
        .await
        .unwrap();

    let running = pair.start();
    let before_delete: chrono::DateTime<chrono::Utc> = pair
        .source
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    for change in [
        r#"INSERT INTO neon_auth."user" (name, email, "emailVerified")
           VALUES ('Grace', 'grace@example.com', false)"#,
        r#"UPDATE neon_auth."user" SET name = 'Ada Lovelace', role = 'admin', "updatedAt" = now()
            WHERE email = 'ada@example.com'"#,
        r#"UPDATE neon_auth."user" SET "emailVerified" = true, image = 'https://example.com/g.png'
            WHERE email = 'grace@example.com'"#,
        r#"DELETE FROM neon_auth."user" WHERE email = 'brian@example.com'"#,
    ] {
        pair.source.batch_execute(change).await.unwrap();
        wait_live_match(&pair, SOURCE_USERS, TARGET_LIVE_USERS).await;
        // Once the slot is confirmed up to the checkpoint, the target's writes for this change
        // (its batch, and the synchronous commit that made it durable) are in the WAL before
        // the next change: PostgreSQL 14 sends them as empty transactions, which must not be
        // counted with the next one.
        let applied = pair.checkpoint_end().await;
        pair.wait_for_slot_confirmed(&applied, false, "the slot was not confirmed")
            .await;
    }

    // The delete is a soft delete at the source commit time: the row and the app's todo stay.
    let deleted_in_time: bool = pair
        .target
        .query_one(
            "SELECT deleted_at BETWEEN $1 AND now() FROM neon_auth.users_sync
              WHERE email = 'brian@example.com'",
            &[&before_delete],
        )
        .await
        .unwrap()
        .get(0);
    assert!(deleted_in_time, "brian is not soft-deleted at the commit");
    assert_eq!(count(&pair, "SELECT count(*) FROM public.todos").await, 1);
    assert_eq!(target_user_count(&pair.target).await, 3);

    // Nothing comes back: while the source is idle, the target's own WAL (the last batch, the
    // synchronous commits, the idle positions they record) goes through the slot and applies
    // nothing: the last applied commit stays.
    let last_applied = "SELECT commit_lsn::text FROM usersync.state";
    let checkpoint: String = pair
        .target
        .query_one(last_applied, &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(IDLE).await;
    let after: String = pair
        .target
        .query_one(last_applied, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        after, checkpoint,
        "a source transaction was applied while the source was idle"
    );
    let metrics = &running.metrics;
    assert_eq!(metrics.transactions(), 4, "source transactions applied");
    assert_eq!(
        [Op::Insert, Op::Update, Op::Delete].map(|op| metrics.changes(op)),
        [1, 2, 1],
        "changes applied (insert, update, delete)"
    );
    // The copy's two users, then one row written per source change.
    assert_eq!(
        count(&pair, "SELECT count(*) FROM public.users_sync_writes").await,
        2 + 4
    );
    running.stop().await;
}
