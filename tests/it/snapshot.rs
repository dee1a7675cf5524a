//! The initial copy in `setup`: consistent with the slot, even under writes; resumable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_setup_is_completed_by_running_setup_again() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'old' || g || '@example.com' FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    // What an interrupted setup leaves: a slot, target tables, part of the users, no checkpoint.
    let first = pair.usersync(&["setup"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    pair.target
        .batch_execute(
            "DELETE FROM usersync.state; DELETE FROM neon_auth.users_sync WHERE email LIKE 'old1%'",
        )
        .await
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('meanwhile@example.com')")
        .await
        .unwrap();
    let again = pair.usersync(&["setup"]);
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    assert!(said.contains("did not finish its initial copy"), "{said}");
    assert!(said.contains("initial copy: 51 users"), "{said}");
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
