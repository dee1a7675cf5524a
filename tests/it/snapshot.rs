//! The initial copy in `setup`: consistent with the slot, even under writes; resumable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_writes_misses_and_doubles_nothing() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email, display_name)
             SELECT 'pre' || g || '@example.com', 'Pre ' || g FROM generate_series(1, 12000) g",
        )
        .await
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = Arc::clone(&writing);
        let client = sql(pair.server, pair.config.source.dbname.as_str()).await;
        tokio::spawn(async move {
            let mut n = 0u32;
            while writing.load(Ordering::Relaxed) {
                n += 1;
                let sql = match n % 4 {
                    0 => format!("INSERT INTO users (email) VALUES ('during{n}@example.com')"),
                    1 => "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)".to_owned(),
                    _ => "UPDATE users SET version = version + 1, display_name = 'changed'
                           WHERE id IN (SELECT id FROM users ORDER BY random() LIMIT 2)"
                        .to_owned(),
                };
                client.batch_execute(&sql).await.unwrap();
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    pair.setup().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    writing.store(false, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    assert!(changes > 20, "the writer made only {changes} changes");
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
}

/// A slot without a checkpoint and without this target's record of having created it (what an
/// unfinished setup of an older usersync leaves, or a slot of another deployment): setup does
/// not drop it, and says how to, if it is a leftover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_without_a_checkpoint_or_a_setup_record_is_left_alone() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'old' || g || '@example.com' FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    let first = pair.usersync(&["setup"]);
    assert!(first.status.success(), "{}", text(&first));
    pair.target
        .batch_execute("DELETE FROM usersync.state")
        .await
        .unwrap();
    let again = pair.usersync(&["setup"]);
    let said = text(&again);
    assert_eq!(again.status.code(), Some(78), "{said}");
    assert!(said.contains("this target did not create it"), "{said}");
    assert!(
        said.contains(&format!("pg_drop_replication_slot('{}')", pair.config.slot)),
        "{said}"
    );
    // Following the advice completes the setup.
    pair.source
        .query_one(
            "SELECT pg_drop_replication_slot($1)::text",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    let last = pair.usersync(&["setup"]);
    assert!(last.status.success(), "{}", text(&last));
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_replicates_only_new_changes() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('before@example.com')")
        .await
        .unwrap();
    let setup = pair.usersync(&["setup", "--no-snapshot"]);
    assert!(setup.status.success(), "{}", text(&setup));
    assert!(text(&setup).contains("initial copy skipped"));
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('after@example.com')")
        .await
        .unwrap();
    pair.wait_target(
        "SELECT coalesce(array_agg(email) = ARRAY['after@example.com'], false) FROM neon_auth.users_sync",
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_over_a_table_with_users_overwrites_and_revives_them() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email) VALUES
               ('00000000-0000-0000-0000-000000000001', 'new1@example.com'),
               ('00000000-0000-0000-0000-000000000002', 'new2@example.com'),
               ('00000000-0000-0000-0000-000000000003', 'new3@example.com')",
        )
        .await
        .unwrap();
    // What an earlier replication (of another slot) left: a stale user, a soft-deleted one and
    // one the source no longer has.
    pair.target
        .batch_execute(
            "INSERT INTO neon_auth.users_sync (raw_json, updated_at, deleted_at) VALUES
               ('{\"id\": \"00000000-0000-0000-0000-000000000001\", \"primary_email\": \"old1@example.com\"}',
                '2020-01-01', NULL),
               ('{\"id\": \"00000000-0000-0000-0000-000000000002\", \"primary_email\": \"old2@example.com\"}',
                '2020-01-01', '2020-01-01'),
               ('{\"id\": \"00000000-0000-0000-0000-000000000009\", \"primary_email\": \"gone@example.com\"}',
                '2020-01-01', NULL)",
        )
        .await
        .unwrap();
    pair.setup().await;
    let rows = pair
        .target
        .query(
            "SELECT id, email, deleted_at IS NULL, updated_at > '2021-01-01'
               FROM neon_auth.users_sync ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let users: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let user = |n: u8, email: &str, live: bool, updated: bool| {
        (
            format!("00000000-0000-0000-0000-00000000000{n}"),
            email.to_owned(),
            live,
            updated,
        )
    };
    assert_eq!(
        users,
        [
            user(1, "new1@example.com", true, true),
            user(2, "new2@example.com", true, true),
            user(3, "new3@example.com", true, true),
            // setup does not reconcile (resync does): a user it does not copy is left alone.
            user(9, "gone@example.com", true, false),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_on_two_source_rows_is_copied_once() {
    // With REPLICA IDENTITY FULL the id column need not be unique; the copy into the empty
    // target meets the user twice and must upsert rather than fail.
    let mut pair = Pair::on(
        shared_server(),
        "CREATE TABLE public.users (pk int PRIMARY KEY, uid text NOT NULL, email text);
         ALTER TABLE public.users REPLICA IDENTITY FULL",
    )
    .await;
    pair.config.mapping = usersync::map::GenericMapping {
        id_column: "uid".into(),
        ..Default::default()
    }
    .into();
    pair.source
        .batch_execute(
            "INSERT INTO users VALUES (1, 'a', 'a@example.com'), (2, 'b', 'b@example.com'),
                                      (3, 'a', 'a@example.com'), (4, 'c', 'c@example.com')",
        )
        .await
        .unwrap();
    pair.setup().await;
    let users: Vec<(String, String)> = pair
        .target
        .query(
            "SELECT id, email FROM neon_auth.users_sync WHERE deleted_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let user = |id: &str| (id.to_owned(), format!("{id}@example.com"));
    assert_eq!(users, [user("a"), user("b"), user("c")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_and_resyncs_into_a_target_without_updated_at() {
    // Superuser: it creates users_sync in an older shape first.
    let pair = Pair::as_superuser().await;
    pair.target
        .batch_execute(USERS_SYNC_WITHOUT_UPDATED_AT)
        .await
        .unwrap();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('kept@example.com'), ('gone@example.com')",
        )
        .await
        .unwrap();
    // Into the empty table: inserted.
    pair.setup().await;
    pair.wait_for_match().await;
    pair.source
        .batch_execute(
            "DELETE FROM users WHERE email = 'gone@example.com';
             UPDATE users SET display_name = 'Kept';
             INSERT INTO users (email) VALUES ('new@example.com');",
        )
        .await
        .unwrap();
    // Over the users: upserted, and the one the source lost soft-deleted.
    let resync = pair.usersync(&["resync"]);
    assert!(resync.status.success(), "{}", text(&resync));
    let users: Vec<(String, Option<String>, bool)> = pair
        .target
        .query(
            "SELECT email, name, deleted_at IS NULL FROM neon_auth.users_sync ORDER BY email",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        users,
        [
            ("gone@example.com".to_owned(), None, false),
            ("kept@example.com".to_owned(), Some("Kept".to_owned()), true),
            ("new@example.com".to_owned(), None, true),
        ]
    );
}

/// Returns once some of [`MANY_USERS`] are on the target.
async fn until_some_copied(target: &Client) {
    loop {
        let some: bool = target
            .query_one(
                "SELECT to_regclass('neon_auth.users_sync') IS NOT NULL
                    AND EXISTS (SELECT FROM neon_auth.users_sync WHERE email LIKE 'big%')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if some {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills `usersync setup` once its copy has put some users on the target, before it wrote
/// the checkpoint; returns the email of one copied user.
async fn interrupt_setup(pair: &Pair) -> String {
    let copied = Arc::new(AtomicBool::new(false));
    let watcher = {
        let copied = Arc::clone(&copied);
        let target = sql(pair.target_server, &pair.config.target.dbname).await;
        tokio::spawn(async move {
            until_some_copied(&target).await;
            copied.store(true, Ordering::Relaxed);
        })
    };
    let said = crash_usersync(pair, &["setup"], |_| copied.load(Ordering::Relaxed)).await;
    watcher.await.unwrap();
    let checkpoints = checkpoint_rows(&pair.target).await;
    assert_eq!(checkpoints, 0, "setup was not interrupted mid-copy: {said}");
    pair.target
        .query_one(
            "SELECT email FROM neon_auth.users_sync WHERE email LIKE 'big%' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

const MANY_USERS: &str = "INSERT INTO users (email)
    SELECT 'big' || g || '@example.com' FROM generate_series(1, 100000) g";

/// A first setup into an empty `users_sync` killed mid-copy, then users deleted on the source
/// before setup runs again: every row on the target came from the interrupted copy, so the
/// rerun soft-deletes the users the source no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_first_setup_rerun_soft_deletes_users_deleted_meanwhile() {
    let pair = Pair::new().await;
    pair.source.batch_execute(MANY_USERS).await.unwrap();
    let copied = interrupt_setup(&pair).await;
    pair.source
        .execute("DELETE FROM users WHERE email = $1", &[&copied])
        .await
        .unwrap();

    let again = pair.usersync(&["setup"]);
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    assert!(said.contains("did not finish its initial copy"), "{said}");
    let gone: bool = pair
        .target
        .query_one(
            "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE email = $1",
            &[&copied],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        gone,
        "the user deleted since the interrupted copy is soft-deleted: {said}"
    );
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
}

/// The same, into a `users_sync` that already held users from elsewhere: the rerun cannot
/// tell the interrupted copy's users from those, so it leaves both, and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_setup_over_foreign_users_rerun_warns_and_leaves_them() {
    let pair = Pair::new().await;
    pair.source.batch_execute(MANY_USERS).await.unwrap();
    // neon_auth.users_sync exists already (the target role script made it).
    pair.target
        .batch_execute(
            "INSERT INTO neon_auth.users_sync (raw_json, updated_at) VALUES
               ('{\"id\": \"foreign-1\", \"primary_email\": \"foreign@example.com\"}', '2020-01-01')",
        )
        .await
        .unwrap();
    let copied = interrupt_setup(&pair).await;
    pair.source
        .execute("DELETE FROM users WHERE email = $1", &[&copied])
        .await
        .unwrap();

    let again = pair.usersync(&["setup"]);
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    assert!(said.contains("may stay live"), "{said}");
    assert!(said.contains("usersync resync"), "{said}");
    let live: Vec<bool> = pair
        .target
        .query(
            "SELECT deleted_at IS NULL FROM neon_auth.users_sync WHERE email IN ($1, 'foreign@example.com')",
            &[&copied],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(live, [true, true], "{said}");
}

/// `setup` dropped mid-copy (a caller's timeout, a shutdown) stops copying: nothing of the
/// copy goes on writing to the target for a caller that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_dropped_mid_copy_stops_writing() {
    let pair = Pair::new().await;
    pair.source.batch_execute(MANY_USERS).await.unwrap();
    tokio::select! {
        () = pair.setup() => panic!("the copy ended before a page of it was seen on the target"),
        () = until_some_copied(&pair.target) => {}
    }

    // The setup future is gone: its sessions on the target end, and the users stop coming.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let copying: i64 = pair
            .target
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'usersync'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if copying == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{copying} usersync sessions still on the target 10 s after setup was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count = || async {
        let users: i64 = pair
            .target
            .query_one("SELECT count(*) FROM neon_auth.users_sync", &[])
            .await
            .unwrap()
            .get(0);
        users
    };
    let before = count().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count().await,
        before,
        "users still arrive after setup was dropped"
    );
    assert!(before < 100_000, "the whole copy landed: {before} users");
}

/// The copy's connections end as a client's should (the snapshot's transaction closed,
/// then Terminate), not cut off: the servers' logs hold no lost connection after a setup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_closes_its_connections_cleanly() {
    static SERVER: std::sync::OnceLock<usersync::localpg::LocalPg> = std::sync::OnceLock::new();
    let server = SERVER.get_or_init(|| start_server(vec![]));
    let pair = Pair::on(server, USERS_TABLE).await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email)
             SELECT 'u' || g || '@example.com' FROM generate_series(1, 1000) g",
        )
        .await
        .unwrap();
    pair.setup().await;
    // The server logs a connection's end once its backend sees it: give it that moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read_to_string(server.log_file()).unwrap();
    assert!(
        !log.contains("unexpected EOF on client connection"),
        "a connection of setup's was cut off: {log}"
    );
}

/// A row the copy cannot map fails `setup` as before the copy ran on a thread of its own: a
/// definite error (exit 78) naming the column, no row value, and no checkpoint, so that
/// `setup` runs the whole copy again once the row is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_copy_cannot_map_fails_setup_definitely() {
    let pair = Pair::on(
        shared_server(),
        "CREATE TABLE public.users (id text PRIMARY KEY, email text, signed_up numeric)",
    )
    .await;
    pair.source
        .batch_execute(
            "INSERT INTO users VALUES ('good', 'good@example.com', 1700000000000),
                                      ('bad', 'bad@example.com', 1.5)",
        )
        .await
        .unwrap();
    let output = pair
        .command(&["setup", "--signed-up-at-column", "signed_up"])
        .output()
        .unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(78), "{said}");
    assert!(said.contains("signed_up"), "{said}");
    assert!(
        !said.contains("bad@example.com"),
        "row values stay out of errors: {said}"
    );
    let checkpoints = checkpoint_rows(&pair.target).await;
    assert_eq!(checkpoints, 0, "no checkpoint after a failed copy: {said}");
}
