//! `replay`: apply what is pending and exit; `--dry-run` shows it without applying;
//! `--until-lsn` stops at a position.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_applies_what_is_pending_and_exits() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('r1@example.com'), ('r2@example.com');
             UPDATE users SET version = 2 WHERE email = 'r1@example.com';",
        )
        .await
        .unwrap();
    pair.source
        .batch_execute("DELETE FROM users WHERE email = 'r2@example.com'")
        .await
        .unwrap();
    // Each dry run leaves its end marker (a logical message in a transaction of its own)
    // in the slot: the replay's summary counts the two user transactions only.
    for _ in 0..2 {
        let dry_run = pair.usersync(&["replay", "--dry-run"]);
        assert!(dry_run.status.success(), "{}", text(&dry_run));
    }
    let output = pair.usersync(&["replay"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("replayed 2 transactions"),
        "{}",
        text(&output)
    );
    assert_eq!(pair.source_users().await, pair.target_users().await);
    // Nothing pending: a second replay has nothing to do and still ends.
    let again = pair.usersync(&["replay"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("replayed 0 transactions"),
        "{}",
        text(&again)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_changes_and_applies_nothing() {
    let pair = Pair::new().await;
    pair.setup().await;
    let before = pair.slot_confirmed().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email, metadata) VALUES ('00000000-0000-0000-0000-0000000000d1',
                 'dry@example.com', '{\"exact\": 12345678901234567890.123456789}');",
        )
        .await
        .unwrap();
    pair.source
        .batch_execute("DELETE FROM users")
        .await
        .unwrap();
    let output = pair.usersync(&["replay", "--dry-run"]);
    assert!(output.status.success(), "{}", text(&output));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["op"], "insert");
    assert_eq!(lines[0]["id"], "00000000-0000-0000-0000-0000000000d1");
    assert_eq!(lines[0]["raw_json"]["primary_email"], "dry@example.com");
    // The document as it would be written: an object, every digit of its number kept.
    assert!(lines[0]["raw_json"]["metadata"].is_object(), "{lines:?}");
    assert!(String::from_utf8_lossy(&output.stdout)
        .contains(r#""metadata":{"exact": 12345678901234567890.123456789}"#));
    assert!(lines[0]["lsn"].as_str().unwrap().contains('/'));
    assert!(lines[0]["commit_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["op"], "delete");
    let applied: i64 = pair
        .target
        .query_one("SELECT count(*) FROM neon_auth.users_sync", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 0);
    assert_eq!(
        pair.slot_confirmed().await,
        before,
        "a dry run must not advance the slot"
    );
    // The changes are still there for a real replay.
    let output = pair.usersync(&["replay"]);
    assert!(output.status.success(), "{}", text(&output));
    pair.wait_target("SELECT count(*) = 1 FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_lsn_stops_at_the_position() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('early@example.com')")
        .await
        .unwrap();
    let position = pair.source_wal_lsn().await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('late@example.com')")
        .await
        .unwrap();
    let output = pair.usersync(&["replay", "--until-lsn", &position]);
    assert!(output.status.success(), "{}", text(&output));
    let emails: Vec<String> = pair
        .target
        .query("SELECT email FROM neon_auth.users_sync", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(emails, vec!["early@example.com".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_to_write_a_marker_replay_ends_at_the_current_position() {
    let pair = Pair::new().await;
    pair.setup().await;
    // This database only: the source role may no longer write logical messages.
    pair.source
        .batch_execute(REVOKE_EMIT_MESSAGE)
        .await
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('m1@example.com'), ('m2@example.com')")
        .await
        .unwrap();
    let output = pair.usersync(&["replay"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(pair.source_users().await, pair.target_users().await);
}

/// A replay while `run` replicates the slot fails at once with advice, rather than standing
/// by behind it for good (a cron job would pile up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_run_holds_the_slot_fails_fast() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('busy@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    for args in [&["replay"][..], &["replay", "--dry-run"][..]] {
        let mut command = pair.command(args);
        let output = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || command.output().unwrap()),
        )
        .await
        .unwrap_or_else(|_| panic!("{args:?} stood by behind the running replicator"))
        .unwrap();
        let said = text(&output);
        assert_eq!(output.status.code(), Some(78), "{args:?}: {said}");
        assert!(said.contains("stop it first"), "{args:?}: {said}");
    }
    running.stop().await;
}
