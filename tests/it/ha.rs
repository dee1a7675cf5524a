//! Two `run` for one slot: exactly one replicates, the other stands by and takes over; and a
//! standby says who holds the slot's lock, since the lock's key is predictable and any role on
//! the target can take it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::send_signal;
use crate::harness::*;
use crate::lag::http_get;

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
    let slot_info = format!("usersync_slot_info{{slot=\"{}\",system=", pair.config.slot);
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

/// A `usersync run` child with its stderr read line by line; killed (SIGKILL) when dropped,
/// so that a failing test leaves no replicator behind, stopped or not.
pub struct Replicator {
    /// `None` once reaped.
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Where it serves /metrics, /healthz and /readyz.
    pub addr: SocketAddr,
}

impl Replicator {
    pub async fn start(pair: &Pair) -> Replicator {
        Self::start_with(pair, &[]).await
    }

    /// With more environment variables.
    pub async fn start_with(pair: &Pair, environment: &[(&str, &str)]) -> Replicator {
        let mut child = pair
            .command(&["run"])
            .envs(environment.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start usersync run");
        let lines = stderr_lines(&mut child);
        let mut seen = Vec::new();
        wait_for_line(&lines, &mut seen, &["serving /metrics"]).await;
        let addr = seen
            .last()
            .and_then(|line| line.split("addr=").nth(1))
            .and_then(|addr| addr.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {seen:?}"));
        Replicator {
            child: Some(child),
            lines,
            seen,
            addr,
        }
    }

    pub async fn wait_for(&mut self, needles: &[&str]) {
        wait_for_line(&self.lines, &mut self.seen, needles).await;
    }

    /// Everything it has written to stderr so far.
    pub fn log(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("running").id(), signal);
    }

    /// Status line of `GET path`, e.g. `HTTP/1.1 200 OK`.
    pub async fn get(&self, path: &'static str) -> String {
        let addr = self.addr;
        let (head, _) = tokio::task::spawn_blocking(move || http_get(addr, path))
            .await
            .unwrap();
        head.lines().next().unwrap_or_default().to_owned()
    }

    async fn reap(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    /// SIGTERM, then its exit status and whole log.
    pub async fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let status = self.reap().await;
        // The reader thread ends with the pipe.
        let deadline = Instant::now() + WAIT;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }

    /// SIGKILL, as a supervisor ends a process that stopped answering.
    pub async fn kill(mut self) {
        self.signal("KILL");
        self.reap().await;
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the slot is confirmed past everything the source has written so far: the
/// stream has come past it (heartbeats included) and confirmed it.
async fn wait_for_the_stream_to_pass_now(pair: &Pair) {
    let now = pair.source_wal_lsn().await;
    pair.wait_for_slot_confirmed(&now, true, "the slot never advanced past the takeover")
        .await;
}

/// The active replicator stops answering (SIGSTOP: its process hangs, its connections stay
/// open, and so does the target session that holds the slot's lock). The standby cannot take
/// over until whatever supervises the active kills it, as a liveness probe or systemd's
/// watchdog does; then it takes over at once. With an idle source, no user waited, so the
/// takeover reports no lag over the target: the heartbeats the hung active had written are
/// still in the slot, and their age is the time nobody streamed, not a user's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_active_once_killed_hands_over_without_false_lag() {
    let pair = Pair::new().await;
    pair.setup().await;
    let mut active = Replicator::start(&pair).await;
    active.wait_for(&["streaming"]).await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('before@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let mut standby = Replicator::start(&pair).await;
    standby.wait_for(&["standby"]).await;
    // Heartbeats go on meanwhile; the active confirms them only every few seconds, so
    // some are still in the slot when it hangs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for replicator in [&active, &standby] {
        let health = replicator.get("/healthz").await;
        assert!(health.contains(" 200 "), "{health}");
    }

    active.signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !standby.log().contains("took over"),
        "the stopped active still holds the lock: {}",
        standby.log()
    );
    // What a liveness probe sees: a connection (the kernel accepts it), and no answer.
    let addr = active.addr;
    let unanswered = tokio::task::spawn_blocking(move || {
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        write!(probe, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        probe.read(&mut [0; 64])
    })
    .await
    .unwrap();
    assert!(unanswered.is_err(), "{unanswered:?}");
    assert!(standby.get("/healthz").await.contains(" 200 "));
    active.kill().await;
    standby.wait_for(&["took over"]).await;
    wait_for_the_stream_to_pass_now(&pair).await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('after@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let (status, log) = standby.stop().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains("over the target"), "{log}");
}

/// The other side of the takeover's lag: changes made while nobody streamed did wait, from
/// their commit until the standby applied them, and that is reported as lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_waited_for_a_takeover_report_their_lag() {
    let pair = Pair::new().await;
    pair.setup().await;
    let mut active = Replicator::start(&pair).await;
    active.wait_for(&["streaming"]).await;
    let mut standby = Replicator::start(&pair).await;
    standby.wait_for(&["standby"]).await;
    active.signal("STOP");
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('waited@example.com')")
        .await
        .unwrap();
    let waited = Duration::from_secs(3);
    tokio::time::sleep(waited).await;
    active.kill().await;
    pair.wait_for_match().await;
    standby.wait_for(&["lag is over the target"]).await;
    let addr = standby.addr;
    let (_, metrics) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    // One transaction, applied late by at least the wait.
    assert_eq!(sample("usersync_lag_seconds_count"), 1.0, "{metrics}");
    assert!(
        sample("usersync_lag_seconds_sum") >= waited.as_secs_f64(),
        "{metrics}"
    );
    let (status, log) = standby.stop().await;
    assert!(status.success(), "{log}");
    let warning = log
        .lines()
        .find(|line| line.contains("lag is over the target"))
        .unwrap_or_else(|| panic!("{log}"));
    let lag_ms: u64 = warning
        .split("lag_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{warning}"));
    assert!(lag_ms >= waited.as_millis() as u64, "{warning}");
}
