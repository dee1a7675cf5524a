//! Around replication: `status` (JSON schema, table, verdicts and exit codes), the retention
//! `purge` (hard delete firing app foreign keys, dry run, scrub) and teardown's warning about
//! changes the slot still holds.

use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use usersync::localpg::LocalPg;

use crate::harness::*;

/// Runs `status --json` and parses its stdout, which must be exactly one JSON object.
fn status_json(pair: &Pair, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(extra);
    let output = pair.usersync(&args);
    let stdout = String::from_utf8(output.stdout.clone()).expect("utf-8 stdout");
    assert_eq!(stdout.lines().count(), 1, "{}", text(&output));
    let json: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", text(&output)));
    assert!(json.is_object());
    assert!(!text(&output).contains(PASSWORD), "{}", text(&output));
    (output.status.code(), json)
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

fn assert_lsn(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("LSN not a string: {value}"));
    assert!(
        text.parse::<usersync::lsn::Lsn>().is_ok(),
        "not an X/Y LSN: {text}"
    );
}

fn assert_time(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("time not a string: {value}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(text).is_ok(),
        "not RFC 3339: {text}"
    );
}

fn problems(json: &Value) -> String {
    json["problems"].to_string()
}

/// A pair whose target holds one replicated user and a checkpoint, with the replicator
/// stopped and the slot released.
async fn replicated_then_stopped() -> Pair {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('applied@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
    wait_slot_inactive(&pair).await;
    pair
}

/// Waits until no process streams from the slot any more (the walsender of a stopped
/// replicator exits a moment after it).
async fn wait_slot_inactive(pair: &Pair) {
    let deadline = Instant::now() + WAIT;
    loop {
        let active: bool = pair
            .source
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&pair.config.slot],
            )
            .await
            .unwrap()
            .get(0);
        if !active {
            return;
        }
        assert!(Instant::now() < deadline, "the slot stayed active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_healthy_slot_as_json_and_as_a_table() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('a@example.com'), ('b@example.com'), ('c@example.com');
             DELETE FROM users WHERE email = 'c@example.com'",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.wait_target(
        "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL) = 1 FROM neon_auth.users_sync",
    )
    .await;

    // A generous lag target: this is about the schema, not about how busy the machine is.
    let (code, json) = status_json(&pair, &["--lag-target", "1h"]);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["verdict"], "healthy", "{json}");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["problems"], Value::Array(vec![]));
    assert_time(&json["checked_at"]);
    assert_eq!(
        keys(&json),
        [
            "checked_at",
            "checkpoint",
            "exit_code",
            "lag",
            "problems",
            "slot",
            "source",
            "target",
            "verdict"
        ]
    );

    let source = &json["source"];
    assert_eq!(
        keys(source),
        ["current_wal_lsn", "system_identifier", "url"]
    );
    let system_id: String = pair
        .source
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(source["system_identifier"], system_id.as_str());
    assert_lsn(&source["current_wal_lsn"]);
    assert!(source["url"].as_str().unwrap().contains(":***@"));

    let slot = &json["slot"];
    assert_eq!(
        keys(slot),
        [
            "active",
            "active_pid",
            "confirmed_flush_lsn",
            "database",
            "exists",
            "invalidation_reason",
            "name",
            "pending_bytes",
            "plugin",
            "restart_lsn",
            "retained_wal_bytes",
            "safe_wal_size_bytes",
            "wal_status"
        ]
    );
    assert_eq!(slot["name"], pair.config.slot.as_str());
    assert_eq!(slot["exists"], true);
    assert_eq!(slot["active"], true);
    assert!(slot["active_pid"].is_i64(), "{slot}");
    assert_eq!(slot["plugin"], "pgoutput");
    assert_lsn(&slot["confirmed_flush_lsn"]);
    assert_lsn(&slot["restart_lsn"]);
    assert_eq!(slot["wal_status"], "reserved");
    // max_slot_wal_keep_size is unlimited on the test server.
    assert!(slot["safe_wal_size_bytes"].is_null());
    assert!(slot["retained_wal_bytes"].is_u64(), "{slot}");
    assert!(slot["pending_bytes"].is_u64(), "{slot}");

    let checkpoint = &json["checkpoint"];
    assert_eq!(
        keys(checkpoint),
        [
            "commit_lsn",
            "commit_time",
            "copy_reconciles",
            "copying",
            "end_lsn",
            "slot_bounded",
            "system_identifier",
            "written_at"
        ]
    );
    assert_eq!(checkpoint["system_identifier"], system_id.as_str());
    assert_lsn(&checkpoint["commit_lsn"]);
    assert_lsn(&checkpoint["end_lsn"]);
    assert_time(&checkpoint["commit_time"]);
    assert_time(&checkpoint["written_at"]);
    assert_eq!(checkpoint["slot_bounded"], true);

    let target = &json["target"];
    assert_eq!(
        keys(target),
        [
            "primary_email_channels_unknown",
            "slot_lock_holders",
            "tables_present",
            "unfinished",
            "url",
            "users_live",
            "users_soft_deleted"
        ]
    );
    assert_eq!(target["unfinished"], Value::Null);
    assert_eq!(target["primary_email_channels_unknown"], 0);
    assert_eq!(target["tables_present"], true);
    // The running replicator holds the slot's lock on the target.
    let holders = target["slot_lock_holders"].as_array().expect("an array");
    assert_eq!(holders.len(), 1, "{json}");
    assert_eq!(
        keys(&holders[0]),
        [
            "application_name",
            "backend_start",
            "client_addr",
            "mode",
            "pid",
            "usename"
        ]
    );
    assert_eq!(holders[0]["application_name"], "usersync");
    assert_eq!(target["users_live"], 2);
    assert_eq!(target["users_soft_deleted"], 1);

    let lag = &json["lag"];
    assert_eq!(
        keys(lag),
        ["estimate", "last_minute", "seconds", "target_seconds"]
    );
    // No `usersync run` serves /metrics for this pair.
    assert!(lag["last_minute"].is_null(), "{lag}");
    assert!(lag["seconds"].is_f64(), "{lag}");
    assert_eq!(lag["target_seconds"], 3600.0);
    assert!(
        ["caught_up", "source_server"].contains(&lag["estimate"].as_str().unwrap()),
        "{lag}"
    );

    let table = pair.usersync(&["status", "--lag-target", "1h"]);
    let said = text(&table);
    assert_eq!(table.status.code(), Some(0), "{said}");
    assert!(!said.contains(PASSWORD), "{said}");
    assert!(said.contains(":***@"), "{said}");
    assert!(said.contains(&pair.config.slot), "{said}");
    assert!(said.contains("2 live, 1 soft-deleted"), "{said}");
    assert!(
        said.lines()
            .any(|line| line.starts_with("verdict") && line.ends_with("healthy")),
        "{said}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_lagging_while_changes_wait_for_a_stopped_replicator() {
    let pair = replicated_then_stopped().await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('waiting@example.com')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let (code, json) = status_json(&pair, &["--lag-target", "10ms"]);
    assert_eq!(code, Some(3), "{json}");
    assert_eq!(json["verdict"], "lagging");
    assert_eq!(json["slot"]["active"], false);
    assert!(json["slot"]["active_pid"].is_null());
    assert!(
        json["slot"]["pending_bytes"].as_u64().unwrap() > 0,
        "{json}"
    );
    assert_eq!(json["lag"]["estimate"], "since_last_applied");
    assert!(json["lag"]["seconds"].as_f64().unwrap() > 0.01, "{json}");
    assert_eq!(json["problems"][0]["verdict"], "lagging");
    assert!(
        problems(&json).contains("no usersync is streaming"),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_broken_without_tables_slot_or_with_a_foreign_checkpoint() {
    // Nothing set up: no slot, no target tables.
    // Superuser: it needs a target without neon_auth.users_sync, which the target role
    // script creates.
    let bare = Pair::as_superuser().await;
    let (code, json) = status_json(&bare, &[]);
    assert_eq!(code, Some(5), "{json}");
    assert_eq!(json["verdict"], "broken");
    assert_eq!(json["slot"]["exists"], false);
    assert!(json["slot"]["confirmed_flush_lsn"].is_null());
    assert!(json["checkpoint"].is_null());
    assert_eq!(json["target"]["tables_present"], false);
    assert!(json["target"]["users_live"].is_null());
    assert!(json["lag"]["seconds"].is_null());
    assert!(problems(&json).contains("run usersync setup"), "{json}");

    let pair = replicated_then_stopped().await;

    pair.target
        .batch_execute("UPDATE usersync.state SET system_identifier = '12345'")
        .await
        .unwrap();
    let (code, json) = status_json(&pair, &["--lag-target", "1h"]);
    assert_eq!(code, Some(5), "{json}");
    assert_eq!(json["verdict"], "broken");
    assert_eq!(json["checkpoint"]["system_identifier"], "12345");
    assert!(problems(&json).contains("source system 12345"), "{json}");

    pair.source
        .query_one(
            "SELECT pg_drop_replication_slot($1)::text",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    let (code, json) = status_json(&pair, &["--lag-target", "1h"]);
    assert_eq!(code, Some(5), "{json}");
    assert_eq!(json["slot"]["exists"], false);
    assert!(
        problems(&json).contains("does not exist on the source"),
        "{json}"
    );
    let table = pair.usersync(&["status"]);
    assert_eq!(table.status.code(), Some(5), "{}", text(&table));
    assert!(text(&table).contains("broken"), "{}", text(&table));
    assert!(!text(&table).contains(PASSWORD));

    // A slot of that name for another database of the server is not this source's.
    let other_db = unique("other");
    pair.source
        .batch_execute(&format!("CREATE DATABASE {other_db}"))
        .await
        .unwrap();
    let other = sql(pair.server, &other_db).await;
    other
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    let (code, json) = status_json(&pair, &["--lag-target", "1h"]);
    other
        .query_one(
            "SELECT pg_drop_replication_slot($1)::text",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    assert_eq!(code, Some(5), "{json}");
    assert_eq!(json["slot"]["database"], other_db.as_str(), "{json}");
    assert!(
        problems(&json).contains(&format!("belongs to database {other_db}")),
        "{json}"
    );
}

/// A slot dropped while the target holds its checkpoint: the changes of the gap are gone from
/// the source, so `setup` (which copies without soft-deleting) would leave users deleted in the
/// gap live. It refuses and names `resync`, which repairs it; `status` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_after_a_dropped_slot_refuses_and_names_resync() {
    let pair = replicated_then_stopped().await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('gone@example.com')")
        .await
        .unwrap();
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
    wait_slot_inactive(&pair).await;
    pair.source
        .query_one(
            "SELECT pg_drop_replication_slot($1)::text",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    // In the gap: a user is deleted, another signs up.
    pair.source
        .batch_execute(
            "DELETE FROM users WHERE email = 'gone@example.com';
             INSERT INTO users (email) VALUES ('gap@example.com')",
        )
        .await
        .unwrap();

    let (code, json) = status_json(&pair, &["--lag-target", "1h"]);
    assert_eq!(code, Some(5), "{json}");
    assert!(problems(&json).contains("run usersync resync"), "{json}");
    assert!(!problems(&json).contains("run usersync setup"), "{json}");

    let before = users_snapshot(&pair).await;
    let checkpoint = pair.checkpoint_end().await;
    let setup = pair.usersync(&["setup"]);
    let said = text(&setup);
    assert_eq!(setup.status.code(), Some(78), "{said}");
    assert!(said.contains("usersync resync"), "{said}");
    assert!(!said.contains(PASSWORD), "{said}");
    // Nothing changed: no slot, the same users and checkpoint on the target.
    let slots: i64 = pair
        .source
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&pair.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "{said}");
    assert_eq!(users_snapshot(&pair).await, before);
    assert_eq!(pair.checkpoint_end().await, checkpoint);

    let resync = pair.usersync(&["resync"]);
    assert!(resync.status.success(), "{}", text(&resync));
    pair.wait_for_match().await;
    let gone: bool = pair
        .target
        .query_one(
            "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE email = 'gone@example.com'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone, "the user deleted in the gap is soft-deleted");
    // And setup is content again.
    let setup = pair.usersync(&["setup"]);
    assert!(setup.status.success(), "{}", text(&setup));
    assert!(text(&setup).contains("found"), "{}", text(&setup));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_calls_a_slot_at_risk_when_little_safe_wal_is_left() {
    // A limit on the WAL a slot may hold gives it a safe_wal_size, necessarily below the
    // default threshold of 1GB.
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    let server =
        SERVER.get_or_init(|| start_server(vec![("max_slot_wal_keep_size".into(), "64MB".into())]));
    let pair = Pair::on(server, USERS_TABLE).await;
    pair.setup().await;
    let (code, json) = status_json(&pair, &["--lag-target", "1h"]);
    assert_eq!(code, Some(4), "{json}");
    assert_eq!(json["verdict"], "slot_at_risk");
    let safe = json["slot"]["safe_wal_size_bytes"]
        .as_i64()
        .expect("a size");
    // About the limit, rounded to WAL segments; well below the threshold.
    assert!(safe > 0 && safe < 1 << 30, "{json}");
    assert!(problems(&json).contains("safe_wal_size"), "{json}");
    let (code, json) = status_json(&pair, &["--lag-target", "1h", "--min-safe-wal-size", "1MB"]);
    assert_ne!(code, Some(4), "{json}");
}

/// `usersync purge ARGS`, as it ran, whatever the outcome.
fn try_purge(pair: &Pair, args: &[&str]) -> Output {
    let mut all = vec!["purge"];
    all.extend_from_slice(args);
    // Purge needs only the target.
    pair.command(&all)
        .env_remove("USERSYNC_SOURCE_URL")
        .output()
        .expect("run usersync purge")
}

fn purge(pair: &Pair, args: &[&str]) -> Output {
    let output = try_purge(pair, args);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains(PASSWORD));
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn count(pair: &Pair, query: &str) -> i64 {
    pair.target.query_one(query, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_users_past_retention_and_fires_on_delete_cascade() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'u' || n || '@example.com' FROM generate_series(1, 5) n;
             DELETE FROM users WHERE email <> 'u5@example.com'",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.wait_target(
        "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL) = 4 FROM neon_auth.users_sync",
    )
    .await;
    running.stop().await;
    // An app table as Neon recommends, and the deletions of u1..u3 long ago; u4's is recent.
    pair.target
        .batch_execute(
            "CREATE TABLE app_notes (
                 user_id text NOT NULL REFERENCES neon_auth.users_sync (id) ON DELETE CASCADE,
                 note    text);
             INSERT INTO app_notes SELECT id, 'note of ' || email FROM neon_auth.users_sync;
             UPDATE neon_auth.users_sync SET deleted_at = now() - interval '40 days'
              WHERE email IN ('u1@example.com', 'u2@example.com', 'u3@example.com')",
        )
        .await
        .unwrap();

    // Hard deletes are opt-in for the target role, as docs/deployment.md tells operators.
    pair.grant_purge();
    let dry = purge(&pair, &["--older-than", "30d", "--dry-run"]);
    assert!(
        stdout(&dry).contains("dry run: 3 users soft-deleted before"),
        "{}",
        text(&dry)
    );
    assert_eq!(
        count(&pair, "SELECT count(*) FROM neon_auth.users_sync").await,
        5
    );
    assert_eq!(count(&pair, "SELECT count(*) FROM app_notes").await, 5);

    let done = purge(&pair, &["--older-than", "30d", "--batch-size", "2"]);
    assert!(
        stdout(&done).contains("removed 3 users soft-deleted before"),
        "{}",
        text(&done)
    );
    assert!(stdout(&done).contains("in 2 batches"), "{}", text(&done));
    let left: Vec<String> = pair
        .target
        .query("SELECT email FROM neon_auth.users_sync ORDER BY email", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, ["u4@example.com", "u5@example.com"]);
    // The cascade fired for the purged users, and only for them.
    let notes: Vec<String> = pair
        .target
        .query("SELECT note FROM app_notes ORDER BY note", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(notes, ["note of u4@example.com", "note of u5@example.com"]);

    let again = purge(&pair, &["--older-than", "30d"]);
    assert!(
        stdout(&again).contains("removed 0 users"),
        "{}",
        text(&again)
    );
}

/// The target role script grants no DELETE by default: purge (and its dry run) refuses
/// before touching anything, and names the statement that grants it; once that ran, purge
/// works. Scrubbing needs no DELETE (`purge_scrub_keeps_only_id_and_sign_up_time_once` runs
/// under the default role).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_without_the_opt_in_delete_grant_refuses_with_the_grant_to_run() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(
            "INSERT INTO neon_auth.users_sync (raw_json, deleted_at)
             VALUES ('{\"id\": \"old\", \"signed_up_at_millis\": 1700000000000}', now() - interval '40 days'),
                    ('{\"id\": \"live\", \"signed_up_at_millis\": 1700000000000}', NULL);
             -- As Stack Auth's profile records where their emails came from.
             INSERT INTO usersync.primary_email_channel VALUES ('old', 'c1'), ('live', 'c2');",
        )
        .await
        .unwrap();
    let grant = format!(
        "GRANT DELETE ON TABLE neon_auth.users_sync TO \"{}\"",
        pair.target_role()
    );
    for args in [
        &["--older-than", "30d"][..],
        &["--older-than", "30d", "--dry-run"],
    ] {
        let refused = try_purge(&pair, args);
        let said = text(&refused);
        assert_eq!(refused.status.code(), Some(78), "{args:?}: {said}");
        assert!(said.contains(&grant), "{args:?}: {said}");
        assert!(said.contains("-v purge=on"), "{args:?}: {said}");
        assert!(!said.contains(PASSWORD), "{said}");
        assert_eq!(
            count(&pair, "SELECT count(*) FROM neon_auth.users_sync").await,
            2,
            "{args:?} deleted nothing"
        );
    }

    // The statement it printed, run by the table's owner, is all it takes.
    pair.target.batch_execute(&grant).await.unwrap();
    let done = purge(&pair, &["--older-than", "30d"]);
    assert!(
        stdout(&done).contains("removed 1 users soft-deleted before"),
        "{}",
        text(&done)
    );
    assert_eq!(
        count(&pair, "SELECT count(*) FROM neon_auth.users_sync").await,
        1
    );
    // The purged user's record went with it.
    assert_eq!(
        channel_records(&pair).await,
        [("live".to_owned(), Some("c2".to_owned()))]
    );
}

/// `usersync.primary_email_channel`, by user.
async fn channel_records(pair: &Pair) -> Vec<(String, Option<String>)> {
    pair.target
        .query(
            "SELECT user_id, channel_id FROM usersync.primary_email_channel ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Every target user as (id, raw_json, created_at, deleted_at), by id.
async fn users_snapshot(pair: &Pair) -> Vec<(String, String, String, Option<String>)> {
    pair.target
        .query(
            "SELECT id, raw_json::text, created_at::text, deleted_at::text
               FROM neon_auth.users_sync ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_scrub_keeps_only_id_and_sign_up_time_once() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(
            r#"INSERT INTO neon_auth.users_sync (raw_json, deleted_at)
               SELECT jsonb_build_object(
                          'id', id, 'primary_email', id || '@example.com', 'display_name', upper(id),
                          'signed_up_at_millis', 1700000000000, 'primary_email_verified', true,
                          'client_metadata', '{"plan": "pro"}'::jsonb),
                      deleted_at
                 FROM (VALUES ('old1', now() - interval '40 days'),
                              ('old2', now() - interval '31 days'),
                              ('recent', now() - interval '1 day'),
                              ('live', NULL::timestamptz)) AS u(id, deleted_at);
               INSERT INTO usersync.primary_email_channel VALUES ('old1', 'c1'), ('live', 'c2');"#,
        )
        .await
        .unwrap();
    let before = users_snapshot(&pair).await;

    let dry = purge(&pair, &["--older-than", "30d", "--scrub", "--dry-run"]);
    assert!(
        stdout(&dry).contains("dry run: 2 users soft-deleted before"),
        "{}",
        text(&dry)
    );
    assert_eq!(users_snapshot(&pair).await, before);

    let done = purge(&pair, &["--older-than", "30d", "--scrub"]);
    assert!(
        stdout(&done).contains("scrubbed 2 users"),
        "{}",
        text(&done)
    );
    let after = users_snapshot(&pair).await;
    assert_eq!(after.len(), 4, "scrub keeps the rows");
    // A scrubbed user shows no email, so no record says where it came from.
    assert_eq!(
        channel_records(&pair).await,
        [("live".to_owned(), Some("c2".to_owned()))]
    );
    for (old, new) in before.iter().zip(&after) {
        let (id, _, created_at, deleted_at) = old;
        assert_eq!((&new.0, &new.2, &new.3), (id, created_at, deleted_at));
        if id.starts_with("old") {
            let raw: Value = serde_json::from_str(&new.1).unwrap();
            assert_eq!(
                raw,
                serde_json::json!({"id": id, "signed_up_at_millis": 1700000000000_i64})
            );
        } else {
            assert_eq!(new, old, "{id} is within the retention or alive");
        }
    }
    let email: Option<String> = pair
        .target
        .query_one(
            "SELECT email FROM neon_auth.users_sync WHERE id = 'old1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(email, None);

    let again = purge(&pair, &["--older-than", "30d", "--scrub"]);
    assert!(
        stdout(&again).contains("scrubbed 0 users"),
        "{}",
        text(&again)
    );
    assert_eq!(users_snapshot(&pair).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_warns_about_pending_changes_before_dropping() {
    // Superuser: teardown drops the publication, which only its owner may; under the roles
    // that is the table owner who ran sql/source_role.sql, not usersync's role.
    let pair = Pair::as_superuser().await;
    pair.setup().await;
    // Changes nobody has consumed yet.
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('p1@example.com'), ('p2@example.com')")
        .await
        .unwrap();
    let slot_exists = || async {
        pair.source
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&pair.config.slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    };

    let refused = pair.usersync(&["teardown"]);
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("--yes"), "{said}");
    assert!(pending_warning(&refused) > 0, "{said}");
    assert!(slot_exists().await, "nothing is dropped without --yes");

    let done = pair.usersync(&["teardown", "--yes"]);
    assert!(done.status.success(), "{}", text(&done));
    assert!(pending_warning(&done) > 0, "{}", text(&done));
    assert!(
        stdout(&done).contains(&format!("replication slot {} dropped", pair.config.slot)),
        "{}",
        text(&done)
    );
    assert!(!slot_exists().await);
    assert!(!text(&done).contains(PASSWORD));
}

/// The pending bytes the teardown warning on stderr names.
fn pending_warning(output: &Output) -> u64 {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.starts_with("warning: replication slot"))
        .unwrap_or_else(|| panic!("no warning in: {stderr}"));
    assert!(line.contains("not confirmed"), "{line}");
    assert!(line.contains("lost when the slot is dropped"), "{line}");
    let (_, rest) = line
        .split_once(" still holds ")
        .expect("still holds N bytes");
    let (number, _) = rest.split_once(" bytes").expect("still holds N bytes");
    number.parse().expect("a byte count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_as_the_least_privilege_role_leaves_the_publication_to_its_owner() {
    let pair = Pair::new().await;
    pair.setup().await;
    // As the stack-auth profile records where users' emails came from.
    pair.target
        .batch_execute("INSERT INTO usersync.primary_email_channel VALUES ('u1', 'c1')")
        .await
        .unwrap();
    let done = pair.usersync(&["teardown", "--yes"]);
    let said = text(&done);
    assert!(done.status.success(), "{said}");
    // No slot feeds the target any more: nothing keeps the record up to date.
    assert!(
        said.contains("1 users' primary email channels marked unknown"),
        "{said}"
    );
    assert_eq!(channel_records(&pair).await, [("u1".to_owned(), None)]);
    assert!(
        stdout(&done).contains(&format!("replication slot {} dropped", pair.config.slot)),
        "{said}"
    );
    assert!(said.contains("left in place"), "{said}");
    assert!(
        said.contains(&format!(
            "DROP PUBLICATION \"{}\";",
            pair.config.publication
        )),
        "{said}"
    );
    let (slots, publications, checkpoints): (i64, i64, i64) = {
        let source = pair
            .source
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1),
                        (SELECT count(*) FROM pg_publication WHERE pubname = $2)",
                &[&pair.config.slot, &pair.config.publication],
            )
            .await
            .unwrap();
        let target = pair
            .target
            .query_one(
                "SELECT count(*) FROM usersync.state WHERE slot_name = $1",
                &[&pair.config.slot],
            )
            .await
            .unwrap();
        (source.get(0), source.get(1), target.get(0))
    };
    assert_eq!((slots, publications, checkpoints), (0, 1, 0));
}

/// One slot name, two targets: setup against the second target (by mistake, with the default
/// slot name) finds a slot without a checkpoint *there*, but it feeds the first target. It
/// must not take it for its own unfinished setup and drop it: the first deployment would lose
/// every change between its checkpoint and a new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_against_a_second_target_leaves_a_slot_it_did_not_create() {
    let mut pair = replicated_then_stopped().await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('pending@example.com')")
        .await
        .unwrap();
    let confirmed = pair.slot_confirmed().await;
    let checkpoint = pair.checkpoint_end().await;
    let first = (
        pair.config.clone(),
        pair.target_url.clone(),
        pair.target_server,
    );

    pair.move_target(pair.target_server).await;
    let setup = pair.usersync(&["setup"]);
    let said = text(&setup);
    assert_eq!(setup.status.code(), Some(78), "{said}");
    assert!(said.contains("this target did not create it"), "{said}");
    assert!(
        said.contains(&format!("pg_drop_replication_slot('{}')", pair.config.slot)),
        "{said}"
    );
    assert!(!said.contains(PASSWORD), "{said}");
    assert_eq!(pair.slot_confirmed().await, confirmed, "{said}");

    // The first deployment carries on from its checkpoint, the change made meanwhile included.
    (pair.config, pair.target_url, pair.target_server) = first;
    pair.target = sql(pair.target_server, &pair.config.target.dbname).await;
    assert_eq!(pair.checkpoint_end().await, checkpoint);
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('after@example.com')")
        .await
        .unwrap();
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
}

/// A target without a checkpoint for the slot (setup or resync interrupted before the end of
/// its copy, or the row removed): `run` must not stream, which would make a partial copy final
/// or race a copy in progress, and must not confirm anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_checkpoint_refuses_and_confirms_nothing() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute("DELETE FROM usersync.state")
        .await
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('after@example.com')")
        .await
        .unwrap();
    let before = pair.slot_confirmed().await;
    for command in ["run", "replay"] {
        let output = pair.usersync(&[command]);
        let said = text(&output);
        assert_eq!(output.status.code(), Some(78), "{command}: {said}");
        assert!(said.contains("no checkpoint for slot"), "{command}: {said}");
        assert!(said.contains("usersync resync"), "{command}: {said}");
    }
    assert_eq!(
        pair.slot_confirmed().await,
        before,
        "nothing may be confirmed"
    );
    assert_eq!(target_user_count(&pair.target).await, 0);
}
