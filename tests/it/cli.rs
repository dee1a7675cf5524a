//! The binary as an operator uses it: setup, run with SIGTERM, teardown, exit codes.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_and_says_what_it_did() {
    let pair = Pair::new().await;
    let first = pair.usersync(&["setup"]);
    assert!(first.status.success(), "{}", text(&first));
    let said = text(&first);
    assert!(said.contains("publication usersync created"), "{said}");
    assert!(said.contains("neon_auth.users_sync created"), "{said}");
    assert!(
        said.contains(&format!("replication slot {} created", pair.config.slot)),
        "{said}"
    );
    let second = pair.usersync(&["setup"]);
    assert!(second.status.success(), "{}", text(&second));
    let said = text(&second);
    assert!(said.contains("publication usersync found"), "{said}");
    assert!(said.contains("users_sync found"), "{said}");
    assert!(
        said.contains(&format!("replication slot {} found", pair.config.slot)),
        "{said}"
    );
    assert!(!said.contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_replicates_and_stops_cleanly_on_sigterm() {
    let pair = Pair::new().await;
    pair.setup().await;
    let child = pair
        .command(&["run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('cli@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    send_signal(child.id(), "TERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains(PASSWORD));
    // The final status update confirmed everything applied.
    let confirmed: bool = pair
        .source
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&pair.config.slot, &checkpoint_end(&pair).await],
        )
        .await
        .unwrap()
        .get(0);
    assert!(confirmed);
}

async fn checkpoint_end(pair: &Pair) -> String {
    pair.target
        .query_one("SELECT end_lsn::text FROM usersync.state", &[])
        .await
        .unwrap()
        .get(0)
}

pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_needs_yes_then_drops_slot_and_publication() {
    let pair = Pair::new().await;
    pair.setup().await;
    let refused = pair.usersync(&["teardown"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("--yes"));
    let done = pair.usersync(&["teardown", "--yes"]);
    assert!(done.status.success(), "{}", text(&done));
    let left: i64 = pair
        .source
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)
                  + (SELECT count(*) FROM pg_publication WHERE pubname = 'usersync')",
            &[&pair.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // Without a slot, run refuses with advice instead of silently recreating it.
    let run = pair.usersync(&["run"]);
    assert_eq!(run.status.code(), Some(78), "{}", text(&run));
    assert!(text(&run).contains("run usersync setup"), "{}", text(&run));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_of_the_slot_is_told_the_pid() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('first@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let second = tokio::task::spawn_blocking({
        let mut command = pair.command(&["run"]);
        move || command.output().unwrap()
    });
    let output = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second run gives up")
        .unwrap();
    assert_eq!(output.status.code(), Some(78), "{}", text(&output));
    assert!(
        text(&output).contains("in use by another process (source backend pid"),
        "{}",
        text(&output)
    );
    running.stop().await;
}
