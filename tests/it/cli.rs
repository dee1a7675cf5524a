//! The binary as an operator uses it: setup, run with SIGTERM, teardown, exit codes.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_and_says_what_it_did() {
    // Superuser: it checks what setup says when it creates the publication and
    // neon_auth.users_sync itself; under the roles, the role scripts create both first.
    let pair = Pair::as_superuser().await;
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
            &[&pair.config.slot, &pair.checkpoint_end().await],
        )
        .await
        .unwrap()
        .get(0);
    assert!(confirmed);
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
    // Superuser: teardown drops the publication, which only its owner may; under the roles
    // that is the table owner who ran sql/source_role.sql, not usersync's role.
    let pair = Pair::as_superuser().await;
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
async fn a_slot_held_by_another_tool_is_reported_with_its_pid() {
    let pair = Pair::new().await;
    pair.setup().await;
    let holder = hold_slot_as_another_tool(&pair).await;
    let mut child = pair
        .command(&["run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(78), "{}", text(&output));
    assert!(
        text(&output).contains("in use by another process (source backend pid"),
        "{}",
        text(&output)
    );
    holder.abort();
}

/// Another consumer (as pg_recvlogical would be) streaming from the pair's slot, answering
/// keepalives so that the server keeps it (wal_sender_timeout is short here).
async fn hold_slot_as_another_tool(pair: &Pair) -> tokio::task::JoinHandle<()> {
    let mut holder =
        usersync::source::ReplicationConnection::connect(&pair.config.source, "other-tool")
            .await
            .unwrap()
            .start_logical_replication(
                &pair.config.slot,
                usersync::lsn::Lsn::ZERO,
                &[
                    ("proto_version", "1".to_owned()),
                    ("publication_names", "usersync".to_owned()),
                ],
            )
            .await
            .unwrap();
    tokio::spawn(async move {
        use usersync::decode::{
            decode_replication_message, encode_standby_status_update, ReplicationMessage,
        };
        while let Ok(Some(payload)) = holder.recv().await {
            if let Ok(ReplicationMessage::PrimaryKeepalive { wal_end, .. }) =
                decode_replication_message(payload)
            {
                let zero = usersync::lsn::Lsn::ZERO;
                let reply = encode_standby_status_update(wal_end, zero, zero, 0, false);
                if holder.send(reply).await.is_err() {
                    break;
                }
            }
        }
    })
}

/// SIGTERM while `run` waits for a slot another tool holds: it stops at once, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_waiting_for_a_busy_slot_is_obeyed() {
    let pair = Pair::new().await;
    pair.setup().await;
    let holder = hold_slot_as_another_tool(&pair).await;
    let child = pair
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    send_signal(child.id(), "TERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    holder.abort();
}

fn usersync_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let output = usersync_output(&["--version"]);
    assert!(output.status.success(), "{}", text(&output));
    let version = String::from_utf8_lossy(&output.stdout);
    // "usersync 0.1.0 (commit 6b1d16d)", or "(commit unknown)" outside a git checkout.
    let commit = version
        .trim()
        .strip_prefix(&format!("usersync {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {version:?}"));
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{version:?}"
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef usersync"),
        ("fish", "complete -c usersync"),
    ] {
        let output = usersync_output(&["completions", shell]);
        assert!(output.status.success(), "{shell}: {}", text(&output));
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("replay"),
            "{shell}: no subcommands in {script}"
        );
    }
    let unknown = usersync_output(&["completions", "tcsh"]);
    assert_eq!(unknown.status.code(), Some(78), "{}", text(&unknown));
}

#[test]
fn help_lists_the_profiles_and_shows_examples() {
    let run = usersync_output(&["run", "--help"]);
    let help = String::from_utf8_lossy(&run.stdout);
    assert!(
        help.contains("[possible values: generic, supabase, keycloak, better-auth, stack-auth]"),
        "{help}"
    );
    for command in [
        "setup", "run", "status", "replay", "resync", "purge", "teardown",
    ] {
        let output = usersync_output(&[command, "--help"]);
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.contains("Examples:"), "{command} --help: {help}");
        assert!(
            help.contains(&format!("usersync {command}")),
            "{command}: {help}"
        );
    }
    let top = usersync_output(&["--help"]);
    assert!(String::from_utf8_lossy(&top.stdout).contains("Examples:"));
}
