//! Bad input and bad environments: a clear message, a definite exit code, no password.

use std::time::{Duration, Instant};

use crate::harness::*;
use usersync::localpg::LocalPg;

fn assert_definite(output: &std::process::Output, needle: &str) {
    let said = text(output);
    assert_eq!(output.status.code(), Some(78), "{said}");
    assert!(said.contains(needle), "expected {needle:?} in: {said}");
    assert!(!said.contains(PASSWORD), "the password leaked: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_definite_and_not_echoed() {
    let pair = Pair::new().await;
    let wrong = pair.source_url.replace(PASSWORD, "not-the-password");
    let output = pair
        .command(&["setup"])
        .env("USERSYNC_SOURCE_URL", &wrong)
        .output()
        .unwrap();
    assert_definite(&output, "password authentication failed");
    assert!(!text(&output).contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_and_missing_key_are_explained() {
    let pair = Pair::new().await;
    let missing = pair
        .command(&["setup", "--table", "public.nobody"])
        .output()
        .unwrap();
    assert_definite(&missing, "has no table public.nobody");
    pair.source
        .batch_execute("CREATE TABLE public.keyless (id text, email text)")
        .await
        .unwrap();
    pair.grant_source_table(&"public.keyless".parse().unwrap());
    let keyless = pair
        .command(&["setup", "--table", "public.keyless"])
        .output()
        .unwrap();
    assert_definite(&keyless, "REPLICA IDENTITY FULL");
}

/// The URL of the pair's source database as `role`, which the test made with less than
/// usersync needs.
fn source_url_as(pair: &Pair, role: &str) -> String {
    pair.server
        .url(role, PASSWORD, pair.config.source.dbname.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_replication_privilege_is_explained() {
    let pair = Pair::new().await;
    let role = unique("plain");
    pair.source
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'; GRANT SELECT ON users TO {role};"
        ))
        .await
        .unwrap();
    let url = source_url_as(&pair, &role);
    let output = pair
        .command(&["setup"])
        .env("USERSYNC_SOURCE_URL", &url)
        .output()
        .unwrap();
    assert_definite(&output, "REPLICATION");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_is_reported_with_the_redacted_url() {
    let pair = Pair::new().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dead = format!("postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/nowhere?sslmode=disable");
    let output = pair
        .command(&["setup"])
        .env("USERSYNC_TARGET_URL", &dead)
        .output()
        .unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("target: cannot connect to postgresql:"),
        "{said}"
    );
    assert!(!said.contains(PASSWORD), "{said}");
}

#[test]
fn bad_configuration_fails_before_connecting() {
    // Every wrong value exits 78, whether clap or usersync found it (docs/commands.md).
    let cases: &[(&[&str], &str)] = &[
        (&["setup", "--profile", "okta"], "okta"),
        (&["setup", "--slot", "Bad-Slot"], "invalid slot name"),
        (&["setup", "--table", "a.b.c"], "invalid table name"),
        (&["run", "--lag-target", "soon"], "invalid duration"),
        (&["run", "--metrics-addr", "nowhere"], "nowhere"),
        (&["replay", "--until-lsn", "banana"], "banana"),
        (
            &["purge", "--older-than", "30d", "--batch-size", "many"],
            "many",
        ),
        (&["--log-format", "xml", "status"], "xml"),
    ];
    for (args, needle) in cases {
        let output = unreachable_servers_command(args).output().unwrap();
        assert_definite(&output, needle);
    }
    // The shape of the command line (an option or command it does not know, no command)
    // is a usage error: 2.
    let shapes: &[&[&str]] = &[&["setup", "--no-such-option"], &["sync"], &[]];
    for args in shapes {
        let output = unreachable_servers_command(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output));
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args([
            "setup",
            "--source",
            &format!("postgresql://u:{PASSWORD}@host:notaport/db"),
        ])
        .env("USERSYNC_TARGET_URL", "postgresql://u@127.0.0.1:1/db")
        .output()
        .unwrap();
    assert_definite(&output, "invalid source URL");
}

/// The binary with URLs of servers that are not there (port 1), passwords included.
fn unreachable_servers_command(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"));
    command
        .args(args)
        .env(
            "USERSYNC_SOURCE_URL",
            format!("postgresql://u:{PASSWORD}@127.0.0.1:1/db"),
        )
        .env(
            "USERSYNC_TARGET_URL",
            format!("postgresql://u:{PASSWORD}@127.0.0.1:1/db"),
        );
    command
}

#[test]
fn an_error_is_printed_once() {
    // (run retries an unreachable server, so it gets a definite error instead.)
    let cases: &[(&[&str], &str, i32)] = &[
        (&["setup"], "cannot connect to", 1),
        (&["status"], "cannot connect to", 1),
        (&["replay"], "cannot connect to", 1),
        (&["resync"], "cannot connect to", 1),
        (&["run", "--slot", "Bad-Slot"], "invalid slot name", 78),
    ];
    for (args, needle, code) in cases {
        let output = unreachable_servers_command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(*code), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|line| line.contains(needle)).count(),
            1,
            "{args:?}: the error should be printed once: {stderr}"
        );
        // Only the service logs that it stopped; the other commands just fail.
        assert_eq!(
            stderr.contains("usersync stopped"),
            args[0] == "run",
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains(PASSWORD), "{stderr}");
    }
}

#[test]
fn status_json_prints_one_object_even_when_it_cannot_connect() {
    let output = unreachable_servers_command(&["status", "--json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("not one JSON object ({error}): {stdout:?}"));
    assert_eq!(json["verdict"], "unknown", "{json}");
    assert_eq!(json["exit_code"], 1, "{json}");
    let error = json["error"].as_str().unwrap();
    assert!(
        error.starts_with("source: cannot connect to postgresql:"),
        "{json}"
    );
    assert!(!stdout.contains(PASSWORD), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_explained() {
    static SERVER: std::sync::OnceLock<LocalPg> = std::sync::OnceLock::new();
    let server = SERVER.get_or_init(|| start_server(vec![("wal_level".into(), "replica".into())]));
    let pair = Pair::on(server, USERS_TABLE).await;
    let output = pair.usersync(&["setup"]);
    assert_definite(&output, "wal_level=logical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_mapped_column_is_refused_at_setup() {
    let pair = Pair::new().await;
    let output = pair
        .command(&["setup", "--id-column", "user_key"])
        .output()
        .unwrap();
    assert_definite(&output, "user_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_table_missing_a_writable_column_is_refused() {
    // Superuser: it makes neon_auth.users_sync in a broken shape, where the target role script
    // would already have made it in Neon's (and the role may not make it at all).
    let pair = Pair::as_superuser().await;
    pair.target
        .batch_execute(
            "CREATE SCHEMA neon_auth;
             CREATE TABLE neon_auth.users_sync (
               raw_json jsonb NOT NULL,
               id text GENERATED ALWAYS AS (raw_json ->> 'id') STORED NOT NULL PRIMARY KEY);",
        )
        .await
        .unwrap();
    let output = pair.usersync(&["setup"]);
    assert_definite(&output, "neon_auth.users_sync has no column deleted_at");
}

/// A pair set up with sign-up times in a numeric column, where a fraction cannot be mapped.
async fn numeric_sign_up_pair() -> Pair {
    let pair = Pair::on(
        shared_server(),
        "CREATE TABLE public.users (id text PRIMARY KEY, email text, signed_up numeric)",
    )
    .await;
    let setup = pair
        .command(&["setup", "--signed-up-at-column", "signed_up"])
        .output()
        .unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    pair
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_row_stops_replication_before_confirming_it() {
    let pair = numeric_sign_up_pair().await;
    // Two source transactions: the first maps, the second cannot.
    for insert in [
        "INSERT INTO users VALUES ('good', 'good@example.com', 1700000000000)",
        "INSERT INTO users VALUES ('bad', 'bad@example.com', 1.5)",
    ] {
        pair.source.batch_execute(insert).await.unwrap();
    }
    let output = pair
        .command(&["run", "--signed-up-at-column", "signed_up"])
        .output()
        .unwrap();
    assert_definite(&output, "signed_up");
    assert!(
        !text(&output).contains("bad@example.com"),
        "row values stay out of errors"
    );
    // The good transaction is on the target; the bad one is neither applied nor confirmed.
    let (live, checkpoint): (i64, String) = {
        let row = pair
            .target
            .query_one(
                "SELECT (SELECT count(*) FROM neon_auth.users_sync), (SELECT end_lsn::text FROM usersync.state)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(live, 1);
    let behind: bool = pair
        .source
        .query_one(
            "SELECT confirmed_flush_lsn <= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&pair.config.slot, &checkpoint],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        behind,
        "the slot was confirmed past the last applied transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_select_privilege_is_explained() {
    let pair = Pair::new().await;
    let role = unique("noselect");
    pair.source
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PASSWORD}'"
        ))
        .await
        .unwrap();
    let url = source_url_as(&pair, &role);
    let output = pair
        .command(&["setup"])
        .env("USERSYNC_SOURCE_URL", &url)
        .output()
        .unwrap();
    assert_definite(&output, "GRANT SELECT ON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_row_in_a_spilled_transaction_applies_none_of_it() {
    let pair = numeric_sign_up_pair().await;
    // A good transaction, then one past the spill threshold and one batch whose very last
    // row cannot be mapped: its first parts are on the target before the bad row is read.
    pair.source
        .batch_execute("INSERT INTO users VALUES ('good', 'good@example.com', 1700000000000)")
        .await
        .unwrap();
    pair.source
        .batch_execute(
            "BEGIN;
             INSERT INTO users SELECT 'big' || g, 'big' || g || '@example.com', 1700000000000
               FROM generate_series(1, 25000) g;
             INSERT INTO users VALUES ('bad', 'bad@example.com', 1.5);
             COMMIT;",
        )
        .await
        .unwrap();
    let output = pair
        .command(&[
            "run",
            "--signed-up-at-column",
            "signed_up",
            "--spill-threshold",
            "64kB",
        ])
        .output()
        .unwrap();
    assert_definite(&output, "signed_up");
    assert_eq!(
        target_user_count(&pair.target).await,
        1,
        "only the good transaction is on the target"
    );
}

/// A large transaction that fails to map before its first part is written must not take
/// the transactions before it along: one still waiting for the target (the writer busy with
/// a slow one) is applied and confirmed before the error ends the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_large_transaction_keeps_the_transactions_waiting_before_it() {
    let pair = numeric_sign_up_pair().await;
    pair.target
        .batch_execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
             CREATE TRIGGER slow_row BEFORE INSERT ON neon_auth.users_sync FOR EACH ROW
               WHEN (NEW.raw_json ->> 'primary_email' = 'slow@example.com')
               EXECUTE FUNCTION slow_row();",
        )
        .await
        .unwrap();
    let run = pair
        .command(&[
            "run",
            "--signed-up-at-column",
            "signed_up",
            "--spill-threshold",
            "64kB",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users VALUES ('slow', 'slow@example.com', 1700000000000)")
        .await
        .unwrap();
    // The next ones arrive while the slow one is being written.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sleeping: i64 = pair
            .target
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE wait_event = 'PgSleep' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if sleeping > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the slow row never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pair.source
        .batch_execute(
            "BEGIN;
             INSERT INTO users VALUES ('good', 'good@example.com', 1700000000000);
             COMMIT;
             BEGIN;
             INSERT INTO users VALUES ('bad', 'bad@example.com', 1.5);
             INSERT INTO users SELECT 'big' || g, 'big' || g || '@example.com', 1700000000000
               FROM generate_series(1, 3000) g;
             COMMIT;",
        )
        .await
        .unwrap();
    let output = run.wait_with_output().unwrap();
    assert_definite(&output, "signed_up");
    assert_eq!(
        target_user_count(&pair.target).await,
        2,
        "both transactions before the bad one are on the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_directory_that_cannot_be_written_is_explained() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'spill' || g || '@example.com' FROM generate_series(1, 5000) g",
        )
        .await
        .unwrap();
    let output = pair
        .command(&["run", "--spill-threshold", "64kB"])
        .env("TMPDIR", "/nonexistent/usersync-spill")
        .output()
        .unwrap();
    assert_definite(&output, "/nonexistent/usersync-spill");
    let said = text(&output);
    assert!(said.contains("TMPDIR"), "{said}");
    assert!(!said.contains("please report"), "{said}");
    assert_eq!(
        target_user_count(&pair.target).await,
        0,
        "nothing of the transaction reached the target"
    );
}
