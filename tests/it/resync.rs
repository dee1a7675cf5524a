//! A slot that lost WAL: `run` refuses with advice, `resync` repairs it and reconciles.

use std::sync::OnceLock;

use usersync::localpg::LocalPg;

use crate::harness::*;

/// A server whose slots lose WAL quickly: any slot more than 1 MB behind at a checkpoint.
fn forgetful_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    SERVER.get_or_init(|| {
        start_server(vec![
            ("max_slot_wal_keep_size".into(), "1MB".into()),
            ("wal_keep_size".into(), "0".into()),
        ])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_refused_by_run_and_repaired_by_resync() {
    let pair = Pair::on(forgetful_server(), USERS_TABLE).await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 30) g",
        )
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;

    // While nobody consumes the slot: users change, and the WAL moves on without it.
    pair.source
        .batch_execute(
            "DELETE FROM users WHERE email LIKE 'u1%';
             UPDATE users SET display_name = 'renamed', version = 2 WHERE email LIKE 'u2%';
             INSERT INTO users (email) VALUES ('new@example.com');
             CREATE TABLE filler (blob text);",
        )
        .await
        .unwrap();
    for _ in 0..4 {
        pair.source
            .batch_execute(
                "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 2000) g;
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    pair.source.batch_execute("CHECKPOINT").await.unwrap();
    let status: String = pair
        .source
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&pair.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost", "the test could not make the slot lose WAL");

    let run = pair.usersync(&["run"]);
    assert_eq!(run.status.code(), Some(78), "{}", text(&run));
    assert!(text(&run).contains("usersync resync"), "{}", text(&run));
    // status and setup give the same advice (teardown and setup would copy without
    // soft-deleting the users deleted meanwhile).
    let status = pair.usersync(&["status", "--lag-target", "1h"]);
    assert_eq!(status.status.code(), Some(5), "{}", text(&status));
    assert!(
        text(&status).contains("run usersync resync"),
        "{}",
        text(&status)
    );
    assert!(!text(&status).contains("teardown"), "{}", text(&status));
    let setup = pair.usersync(&["setup"]);
    assert_eq!(setup.status.code(), Some(78), "{}", text(&setup));
    assert!(text(&setup).contains("usersync resync"), "{}", text(&setup));

    let resync = pair.usersync(&["resync"]);
    let said = text(&resync);
    assert!(resync.status.success(), "{said}");
    assert!(said.contains("soft-deleted"), "{said}");
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
    // The users deleted while the slot was lost are soft-deleted, not gone.
    let deleted: i64 = pair
        .target
        .query_one(
            "SELECT count(*) FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL AND email LIKE 'u1%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deleted, 11);
}

/// A resync killed mid-copy has deleted the checkpoint: to setup that looks like its own
/// unfinished first copy, and setup, which does not soft-delete, would leave the users deleted
/// since live. setup refuses and names resync, status advises resync, and resync run again
/// redoes it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_resync_is_finished_by_resync_not_setup() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 100000) g",
        )
        .await
        .unwrap();
    pair.setup().await;
    pair.source
        .batch_execute("DELETE FROM users WHERE email = 'u7@example.com'")
        .await
        .unwrap();

    let slot_created = format!("replication slot {} created", pair.config.slot);
    let said = crash_usersync(&pair, &["resync"], |line| {
        line.is_some_and(|line| line.starts_with(&slot_created))
    })
    .await;
    let checkpoints = checkpoint_rows(&pair.target).await;
    assert_eq!(
        checkpoints, 0,
        "the resync was not interrupted mid-copy: {said}"
    );

    let status = pair.usersync(&["status", "--lag-target", "1h"]);
    let status_said = text(&status);
    assert_eq!(status.status.code(), Some(5), "{status_said}");
    assert!(status_said.contains("run usersync resync"), "{status_said}");
    assert!(!status_said.contains("run usersync setup"), "{status_said}");

    let setup = pair.usersync(&["setup"]);
    let setup_said = text(&setup);
    assert_eq!(setup.status.code(), Some(78), "{setup_said}");
    assert!(setup_said.contains("usersync resync"), "{setup_said}");

    let resync = pair.usersync(&["resync"]);
    assert!(resync.status.success(), "{}", text(&resync));
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
    let gone: bool = pair
        .target
        .query_one(
            "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE email = 'u7@example.com'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone, "the user deleted before the resync is soft-deleted");
}

/// One source, several targets (one per tenancy), the same slot name by mistake: a resync
/// against a target that has no record of the slot must not drop it, or the target it feeds
/// loses every change since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_does_not_drop_a_slot_this_target_has_no_record_of() {
    let pair = Pair::new().await;
    pair.setup().await;
    // As if another target's usersync had made the slot: this target knows nothing of it.
    pair.target
        .batch_execute("DELETE FROM usersync.state; DELETE FROM usersync.setup_progress;")
        .await
        .unwrap();
    let before = pair.slot_confirmed().await;
    let resync = pair.usersync(&["resync"]);
    let said = text(&resync);
    assert_eq!(resync.status.code(), Some(78), "{said}");
    assert!(said.contains("another usersync may use it"), "{said}");
    assert_eq!(
        pair.slot_confirmed().await,
        before,
        "the slot was dropped: {said}"
    );
    let progress: i64 = pair
        .target
        .query_one("SELECT count(*) FROM usersync.setup_progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(progress, 0, "the refused resync left a record behind");
}
