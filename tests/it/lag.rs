//! Lag measurement and its export: heartbeats while idle, agreement with an independent
//! probe, the HTTP endpoint, and a real Prometheus scraping it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use usersync::metrics::Metrics;

use crate::harness::*;

/// Plain HTTP/1.0 GET on loopback: status line and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_owned(), body.to_owned())
}

/// Serves `metrics` on a free loopback port until the returned sender is dropped.
async fn serve(metrics: &Arc<Metrics>) -> (SocketAddr, watch::Sender<bool>) {
    let (stop, shutdown) = watch::channel(false);
    let (addr, server) = usersync::http::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::clone(metrics),
        shutdown,
    )
    .await
    .unwrap();
    tokio::spawn(server);
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_an_idle_slot_and_idle_is_not_lag() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('hb@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let before = pair.source_wal_lsn().await;
    // No writes from the test from here on: only heartbeats move the slot.
    pair.wait_for_slot_confirmed(&before, true, "the idle slot never advanced")
        .await;
    let text = running.metrics.encode();
    let heartbeat_lag = gauge(&text, "usersync_heartbeat_lag_seconds");
    assert!(heartbeat_lag > 0.0, "no heartbeat came through:\n{text}");
    // Idle: the current lag is a heartbeat's trip, far under the target, not the time
    // since the last change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let current = running.metrics.current_lag();
    assert!(
        current < pair.config.lag_target,
        "idle lag reads {current:?}"
    );
    running.stop().await;
}

fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_lag_agrees_with_an_independent_probe() {
    let pair = Pair::on(
        shared_server(),
        "CREATE TABLE public.users (
            id bigserial PRIMARY KEY, email text,
            probe_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await;
    pair.setup().await;
    // The target records when each user became visible, by its own clock (the same host's).
    pair.target
        .batch_execute(
            "CREATE TABLE probe (id text, written timestamptz, seen timestamptz);
             CREATE FUNCTION probe() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
               INSERT INTO probe VALUES (NEW.id, (NEW.raw_json ->> 'probe_at')::timestamptz, clock_timestamp());
               RETURN NEW;
             END $$;
             CREATE TRIGGER probe AFTER INSERT ON neon_auth.users_sync
               FOR EACH ROW EXECUTE FUNCTION probe();",
        )
        .await
        .unwrap();
    let running = pair.start();
    for n in 0..40 {
        pair.source
            .batch_execute(&format!(
                "INSERT INTO users (email) VALUES ('p{n}@example.com')"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pair.wait_target("SELECT count(*) = 40 FROM probe").await;
    let probe_p50: f64 = pair
        .target
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM seen - written))::float8 FROM probe",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let reported = running
        .metrics
        .lag_window
        .summary(Instant::now(), pair.config.lag_target)
        .expect("lag samples");
    running.stop().await;
    let reported_p50 = reported.p50.as_secs_f64();
    // Both measure the same 40 commits, one from inside the databases, one from usersync;
    // they differ by the commits' own duration, so agreement is loose but meaningful.
    let tolerance = (probe_p50 * 0.5).max(0.02);
    assert!(
        (reported_p50 - probe_p50).abs() <= tolerance,
        "usersync reports p50 {reported_p50:.4}s, the probe measured {probe_p50:.4}s"
    );
    assert!(reported.samples >= 40);
}

/// The source's share of the lag is exported apart: the time from a transaction's commit to
/// the walsender sending it, both by the source's clock. A walsender sends a transaction
/// only once its commit is flushed to the WAL, and `commit_delay` (on a server with `fsync`
/// on) holds a commit's flush that long: so each delayed transaction's share is at least
/// the delay. A backlog is not the source's: a transaction committed while usersync was
/// stopped is left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sources_share_of_the_lag_is_measured() {
    static SERVER: std::sync::OnceLock<usersync::localpg::LocalPg> = std::sync::OnceLock::new();
    let server = SERVER.get_or_init(|| start_server(vec![("fsync".into(), "on".into())]));
    let pair = Pair::on(server, USERS_TABLE).await;
    pair.setup().await;
    let running = pair.start();
    // Counting starts once the walsender has sent everything (it waits for WAL): here, once
    // the monitor's heartbeats (one a second) are counted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gauge(
        &running.metrics.encode(),
        "usersync_source_send_delay_seconds_count",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no transaction counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slow_and_sum = |text: &str| {
        let count = gauge(text, "usersync_source_send_delay_seconds_count");
        let fast = gauge(
            text,
            "usersync_source_send_delay_seconds_bucket{le=\"0.025\"}",
        );
        (
            count - fast,
            gauge(text, "usersync_source_send_delay_seconds_sum"),
        )
    };
    let (slow_before, sum_before) = slow_and_sum(&running.metrics.encode());
    const DELAYED: u32 = 5;
    for n in 0..DELAYED {
        pair.source
            .batch_execute(&format!(
                "BEGIN; SET LOCAL commit_siblings = 0; SET LOCAL commit_delay = 60000;
                 INSERT INTO users (email) VALUES ('d{n}@example.com'); COMMIT"
            ))
            .await
            .unwrap();
    }
    pair.wait_for_match().await;
    let text = running.metrics.encode();
    running.stop().await;
    let (slow, sum) = slow_and_sum(&text);
    assert!(
        slow - slow_before >= f64::from(DELAYED) && sum - sum_before >= 0.06 * f64::from(DELAYED),
        "{} transactions over 25 ms and {:.3} s in all, for {DELAYED} delayed by 60 ms:\n{text}",
        slow - slow_before,
        sum - sum_before
    );
    // Committed while nothing streamed: the wait was usersync's absence, not the source.
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('while-stopped@example.com')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let running = pair.start();
    pair.wait_for_match().await;
    let text = running.metrics.encode();
    running.stop().await;
    // Its 600 ms and more would be over 0.5 s; a heartbeat's slow flush would not.
    let count = gauge(&text, "usersync_source_send_delay_seconds_count");
    let within = gauge(
        &text,
        "usersync_source_send_delay_seconds_bucket{le=\"0.5\"}",
    );
    assert_eq!(
        within, count,
        "the backlog counted as the source's share:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_openmetrics_health_and_readiness() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    let (addr, _stop) = serve(&running.metrics).await;
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('m@example.com'); DELETE FROM users;")
        .await
        .unwrap();
    pair.wait_target("SELECT count(*) = 1 FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL")
        .await;
    let (head, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(head.contains("application/openmetrics-text"), "{head}");
    for needle in [
        "usersync_changes_applied_total{op=\"insert\"} 1",
        "usersync_changes_applied_total{op=\"delete\"} 1",
        "usersync_connected{side=\"source\"} 1",
        "usersync_ready 1",
        "usersync_lag_target_seconds 1.0",
        "# EOF",
    ] {
        assert!(body.contains(needle), "{needle} missing from:\n{body}");
    }
    let (health, _) = tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
        .await
        .unwrap();
    assert!(
        health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"),
        "{health}"
    );
    let (ready, _) = tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
        .await
        .unwrap();
    assert!(ready.contains(" 200 "), "{ready}");
    running.stop().await;
    let (not_ready, _) = tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
        .await
        .unwrap();
    assert!(not_ready.contains(" 503 "), "{not_ready}");
}

/// A child process for one test (a Prometheus server, a `usersync run`), killed on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_lag_and_evaluates_the_slo_rule() {
    let Ok(binary) = which("prometheus") else {
        eprintln!(
            "skipped: no prometheus binary on PATH (apt-get install prometheus; .ci/run does)"
        );
        return;
    };
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    let (addr, _stop) = serve(&running.metrics).await;
    let dir = std::env::temp_dir().join(unique("usersync-prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/prometheus/usersync-rules.yml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: usersync\n    static_configs:\n      - targets: ['{addr}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _prometheus = KillOnDrop(
        Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    for n in 0..20 {
        pair.source
            .batch_execute(&format!(
                "INSERT INTO users (email) VALUES ('prom{n}@example.com')"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for query in [
        "usersync_lag_seconds_count",
        "usersync_changes_applied_total",
        "usersync:lag_within_target:ratio_rate5m",
    ] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = format!("/api/v1/query?query={query}");
            let (_, body) = tokio::task::spawn_blocking(move || http_get(web, &path))
                .await
                .unwrap();
            // A non-empty vector result: the series was scraped (or the rule evaluated).
            if body.contains("\"result\":[{") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never answered {query}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    running.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|path| path.is_file())
        })
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_running_replicators_last_minute() {
    let pair = Pair::new().await;
    pair.setup().await;
    let port = free_port();
    let mut child = pair
        .command(&["run"])
        .env("USERSYNC_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for n in 0..5 {
        pair.source
            .batch_execute(&format!(
                "INSERT INTO users (email) VALUES ('s{n}@example.com')"
            ))
            .await
            .unwrap();
    }
    pair.wait_for_match().await;
    let deadline = Instant::now() + WAIT;
    let last_minute = loop {
        let output = pair
            .command(&["status", "--json", "--lag-target", "1h"])
            .env("USERSYNC_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let last_minute = json["lag"]["last_minute"].clone();
        if last_minute["p99_seconds"].is_f64() {
            break last_minute;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the figures: {json}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(last_minute["p50_seconds"].as_f64().unwrap() >= 0.0);
    assert!(last_minute["within_target_ratio"].as_f64().unwrap() > 0.0);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_to_emit_heartbeats_replication_goes_on() {
    let pair = Pair::new().await;
    // This database only: the source role may no longer write logical messages.
    pair.source
        .batch_execute(REVOKE_EMIT_MESSAGE)
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('nohb@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = running.metrics.encode();
    assert_eq!(
        gauge(&text, "usersync_heartbeat_lag_seconds"),
        0.0,
        "{text}"
    );
    assert!(running.metrics.is_ready());
    assert!(running.metrics.current_lag() < pair.config.lag_target);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_heartbeats_keepalives_advance_the_slot_and_estimate_idle_lag() {
    let mut pair = Pair::new().await;
    pair.config.heartbeat_interval = None;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('nohb@example.com');
             CREATE TABLE unrelated (n int)",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    // Writes usersync does not replicate: only keepalives tell it the WAL moved on.
    pair.source
        .batch_execute("INSERT INTO unrelated VALUES (1)")
        .await
        .unwrap();
    let written = pair.source_wal_lsn().await;
    pair.wait_for_slot_confirmed(
        &written,
        false,
        "the slot never advanced without heartbeats",
    )
    .await;
    let text = running.metrics.encode();
    assert_eq!(
        gauge(&text, "usersync_heartbeat_lag_seconds"),
        0.0,
        "a heartbeat came through with heartbeats off:\n{text}"
    );
    let current = running.metrics.current_lag();
    assert!(
        current < pair.config.lag_target,
        "idle lag reads {current:?}"
    );
    running.stop().await;
}

/// An idle, healthy replicator: `status` must say healthy every time, whether it reads the
/// running replicator's own lag from /metrics or, from another host, falls back to the
/// source server's measurement (which swung around the 1 s target with each reply before
/// usersync confirmed idle WAL promptly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_an_idle_healthy_system_does_not_flap() {
    let pair = Pair::new().await;
    pair.setup().await;
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let child = pair
        .command(&["run"])
        .env("USERSYNC_METRICS_ADDR", &metrics)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('idle@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    // Let it settle into idle: heartbeats only.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = |metrics_addr: &str| {
        let output = pair
            .command(&["status", "--json", "--lag-target", "1s"])
            .env("USERSYNC_METRICS_ADDR", metrics_addr)
            .output()
            .unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}", text(&output)));
        (output.status.code(), json)
    };
    let mut estimates = std::collections::BTreeSet::new();
    for _ in 0..16 {
        // With /metrics: usersync's own measurement.
        let (code, json) = status(&metrics);
        assert_eq!(code, Some(0), "{json}");
        let estimate = json["lag"]["estimate"].as_str().unwrap().to_owned();
        assert!(
            ["caught_up", "replicator"].contains(&estimate.as_str()),
            "{json}"
        );
        estimates.insert(estimate);
        // Without it (nothing listens on port 1): the source server's figure.
        let (code, json) = status("127.0.0.1:1");
        assert_eq!(code, Some(0), "{json}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(estimates.contains("replicator"), "{estimates:?}");
}
