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
