//! kill -9 of the running service, again and again, under a steady write load: nothing lost,
//! nothing applied twice, nothing older applied over newer.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

/// How many times the service is killed mid-stream.
const KILLS: u32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_and_doubles_nothing() {
    let pair = Pair::new().await;
    pair.setup().await;
    install_write_log(&pair.target).await;

    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = Arc::clone(&writing);
        let client = sql(pair.server, pair.config.source.dbname.as_str()).await;
        tokio::spawn(async move {
            let mut n = 0u32;
            while writing.load(Ordering::Relaxed) {
                n += 1;
                let sql = match n % 20 {
                    0 => "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY version LIMIT 1)".to_owned(),
                    k if k % 3 == 0 => format!("INSERT INTO users (email) VALUES ('k{n}@example.com')"),
                    _ => "UPDATE users SET version = version + 1
                           WHERE id IN (SELECT id FROM users ORDER BY random() LIMIT 3)"
                        .to_owned(),
                };
                client.batch_execute(&sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };

    for kill in 0..KILLS {
        let mut child = pair
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700 + 250 * u64::from(kill))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    writing.store(false, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    assert!(changes > 100, "the writer made only {changes} changes");

    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;

    assert_write_log_ordered(&pair.target).await;
    assert!(
        soft_deleted_users(&pair.target).await > 0,
        "the load deleted users; the target must hold them soft-deleted"
    );
}

/// kill -9 while a backlog is written over two target connections (the next batch beside the
/// one being written, see `replicator::route`), writes made slow so that kills land while a
/// batch beside another waits for it: the second connection's backend outlives the process
/// for a moment, and must neither commit past what the next process resumes from nor be
/// applied again by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_backlog_is_written_over_two_connections_loses_and_doubles_nothing() {
    let pair = Pair::new().await;
    pair.setup().await;
    install_write_log(&pair.target).await;
    log_user_writers(&pair.target, 0.3).await;
    write_backlog(&pair.source, "k", 30_000, true, false).await;

    for kill in 0..4u64 {
        let mut child = pair
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1_000 + 300 * kill)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
    assert_write_log_ordered(&pair.target).await;
    let writers = user_writers(&pair.target).await;
    assert!(
        writers > 5,
        "{writers} target backends wrote users in 5 sessions: none wrote over two connections"
    );
}
