//! Bad input and bad environments: a clear message, a definite exit code, no password.

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
    let keyless = pair
        .command(&["setup", "--table", "public.keyless"])
        .output()
        .unwrap();
    assert_definite(&keyless, "REPLICA IDENTITY FULL");
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
    let url = pair
        .source_url
        .replacen("postgres:", &format!("{role}:"), 1);
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
    assert!(said.contains("cannot connect to the target"), "{said}");
    assert!(!said.contains(PASSWORD), "{said}");
}

#[test]
fn bad_configuration_fails_before_connecting() {
    let cases: &[(&[&str], &str)] = &[
        (&["setup", "--profile", "okta"], "unknown profile"),
        (&["setup", "--slot", "Bad-Slot"], "invalid slot name"),
        (&["setup", "--table", "a.b.c"], "invalid table name"),
        (&["run", "--lag-target", "soon"], "invalid duration"),
    ];
    for (args, needle) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
            .args(*args)
            .env(
                "USERSYNC_SOURCE_URL",
                format!("postgresql://u:{PASSWORD}@127.0.0.1:1/db"),
            )
            .env(
                "USERSYNC_TARGET_URL",
                format!("postgresql://u:{PASSWORD}@127.0.0.1:1/db"),
            )
            .output()
            .unwrap();
        assert_definite(&output, needle);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_explained() {
    static SERVER: std::sync::OnceLock<LocalPg> = std::sync::OnceLock::new();
    let server = SERVER.get_or_init(|| start_server(vec![("wal_level".into(), "replica".into())]));
    let pair = Pair::on(server, USERS_TABLE).await;
    let output = pair.usersync(&["setup"]);
    assert_definite(&output, "wal_level=logical");
}
