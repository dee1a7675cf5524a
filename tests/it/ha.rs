//! Two `run` for one slot: exactly one replicates, the other stands by and takes over; and a
//! standby says who holds the slot's lock, since the lock's key is predictable and any role on
//! the target can take it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::send_signal;
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replicates_the_other_stands_by_and_takes_over() {
    let pair = Pair::new().await;
    pair.setup().await;
    let first = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('one@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let second = pair.start();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(first.metrics.is_ready(), "the first one replicates");
    assert!(!second.metrics.is_ready(), "the second one stands by");
    let slot_info = format!("usersync_slot_info{{slot=\"{}\"}} 1", pair.config.slot);
    let (active, standby) = (first.metrics.encode(), second.metrics.encode());
    for (text, role) in [(&active, "0"), (&standby, "1")] {
        assert!(
            text.contains(&format!("usersync_standby {role}\n")),
            "{text}"
        );
        assert!(text.contains(&slot_info), "{text}");
    }
    assert!(!active.contains("usersync_standby_since_timestamp_seconds "));
    assert!(standby.contains("usersync_standby_since_timestamp_seconds "));
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('two@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert_eq!(
        second.metrics.transactions(),
        0,
        "the standby applied nothing"
    );
    // The active one dies (its connections drop): the standby takes over.
    first.abort();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('three@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert!(second.metrics.is_ready());
    assert!(second.metrics.transactions() > 0);
    let took_over = second.metrics.encode();
    assert!(took_over.contains("usersync_standby 0\n"), "{took_over}");
    assert!(!took_over.contains("usersync_standby_since_timestamp_seconds "));
    second.stop().await;
}

/// The lines a child writes to stderr, as they come.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// Waits for a line that contains every one of `needles`, keeping what came before in `seen`.
async fn wait_for_line(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>, needles: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        while let Ok(line) = lines.try_recv() {
            let found = needles.iter().all(|needle| line.contains(needle));
            seen.push(line);
            if found {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} within {WAIT:?}:\n{}",
            seen.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Anyone who may connect to the target can take the slot's advisory lock (its key is
/// `hashtextextended('usersync:' || slot, 0)`, on purpose: versions running side by side must
/// agree on it) and so keep every usersync on standby. The defence is that it shows: the
/// standby's log and `usersync status` name the session holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_and_status_name_the_session_holding_the_slot_lock() {
    let pair = Pair::new().await;
    pair.setup().await;
    let squatter = sql(pair.target_server, &pair.config.target.dbname).await;
    squatter
        .batch_execute(&format!(
            "SET application_name = 'lock-squatter';
             SELECT pg_advisory_lock(hashtextextended('usersync:' || '{}', 0));",
            pair.config.slot
        ))
        .await
        .unwrap();
    let pid: i32 = squatter
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let holder = format!("pid {pid}");

    let mut run = pair
        .command(&["run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start usersync run");
    let lines = stderr_lines(&mut run);
    let mut seen = Vec::new();
    wait_for_line(&lines, &mut seen, &["standby", &holder, "lock-squatter"]).await;

    // status, run as the least-privilege role: who holds it, and that no usersync streams.
    let status = pair.usersync(&["status"]);
    let said = text(&status);
    assert!(said.contains(&holder), "{said}");
    assert!(said.contains("lock-squatter"), "{said}");
    assert_eq!(status.status.code(), Some(5), "{said}");
    let json = pair.usersync(&["status", "--json"]);
    let json: Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", text(&json));
    });
    let holders = json["target"]["slot_lock_holders"]
        .as_array()
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(holders.len(), 1, "{json}");
    assert_eq!(holders[0]["pid"], pid, "{json}");
    assert_eq!(holders[0]["application_name"], "lock-squatter", "{json}");
    assert_eq!(holders[0]["usename"], "postgres", "{json}");
    assert_eq!(holders[0]["mode"], "ExclusiveLock", "{json}");
    // Without pg_read_all_stats the role sees no more of another role's session.
    for key in ["client_addr", "backend_start"] {
        assert!(holders[0][key].is_null(), "{key}: {json}");
    }
    assert!(
        json["problems"].to_string().contains(&holder),
        "the problem names the holder: {json}"
    );

    // The squatter goes: the standby takes over and replicates.
    drop(squatter);
    wait_for_line(&lines, &mut seen, &["took over"]).await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('after@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    send_signal(run.id(), "TERM");
    let output = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", seen.join("\n"));
    assert!(!seen.join("\n").contains(PASSWORD));
}
