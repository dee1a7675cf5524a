//! Whether `run` makes progress, as `/healthz` and systemd's watchdog see it: long waits that
//! are no hang (a standby waiting for the lock, the backoff between reconnects) keep it alive,
//! and the binary speaks systemd's notification protocol.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use usersync::metrics::Metrics;

use crate::ha::Replicator;
use crate::harness::*;
use crate::lag::http_get;

/// A bound far shorter than the real one (90 s), so that a test outlasts it in seconds.
const SHORT_BOUND: Duration = Duration::from_secs(2);

/// Runs the replicator in this process with `config`, its liveness bound [`SHORT_BOUND`],
/// serving its endpoint on a free port. Returns the address, the metrics and the stop sender
/// (dropping it stops the replicator and the endpoint).
async fn start_in_process(
    config: usersync::config::Config,
) -> (
    std::net::SocketAddr,
    Arc<Metrics>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), usersync::Error>>,
) {
    let metrics = Arc::new(Metrics::new(config.lag_target));
    metrics.liveness().set_bound(SHORT_BOUND);
    let (stop, shutdown) = watch::channel(false);
    let (addr, server) = usersync::http::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::clone(&metrics),
        shutdown.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(server);
    let task_metrics = Arc::clone(&metrics);
    let task =
        tokio::spawn(
            async move { usersync::replicator::run(&config, task_metrics, shutdown).await },
        );
    (addr, metrics, stop, task)
}

/// Asks `/healthz` every 200 ms for `duration`; panics at the first answer that is not 200.
async fn healthy_throughout(addr: std::net::SocketAddr, duration: Duration, doing: &str) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        let (head, body) = tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
            .await
            .unwrap();
        assert!(head.contains(" 200 "), "while {doing}: {head}\n{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A standby waits for the lock as long as the active one lives: hours, maybe. Each attempt
/// to take the lock is progress, so it stays alive however long it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_stays_alive_however_long_it_waits() {
    let pair = Pair::new().await;
    pair.setup().await;
    let active = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('alive@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let (addr, standby, stop, task) = start_in_process(pair.config.clone()).await;
    healthy_throughout(addr, SHORT_BOUND * 3, "standing by").await;
    assert!(
        standby.encode().contains("usersync_standby 1\n"),
        "it stood by all along"
    );
    let _ = stop.send(true);
    task.await.unwrap().expect("the standby stops cleanly");
    active.stop().await;
}

/// Reconnecting after failures backs off up to 30 s between attempts: a sleep, which always
/// ends, so no hang. The source here refuses every connection, and the backoff grows past the
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_off_between_reconnects_stays_alive() {
    let pair = Pair::new().await;
    pair.setup().await;
    let mut config = pair.config.clone();
    config.source.port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (addr, metrics, stop, task) = start_in_process(config).await;
    // Backoff 0.25, 0.5, 1, 2, 4, 8 s (each ±25%): within 12 s the fifth, of at least 3 s,
    // has begun at the latest 10 s in, and outlasted the bound before the end.
    healthy_throughout(addr, Duration::from_secs(12), "backing off").await;
    let text = metrics.encode();
    let reconnects: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("usersync_reconnects_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(reconnects >= 5.0, "{text}");
    let _ = stop.send(true);
    task.await.unwrap().expect("stopped while backing off");
}

/// The binary under systemd (`Type=notify`, `WatchdogSec=`): `READY=1` once it runs, even on
/// standby, `WATCHDOG=1` at half the watchdog interval while it makes progress, `STOPPING=1`
/// when asked to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_tells_systemd_it_is_ready_alive_and_stopping() {
    let pair = Pair::new().await;
    pair.setup().await;
    // Another replicator holds the slot, so this one stands by: ready and alive all the same.
    let active = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('notify@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let dir = std::env::temp_dir().join(unique("usersync-notify"));
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("notify");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let received = move || {
        let mut buffer = [0; 256];
        systemd
            .recv(&mut buffer)
            .ok()
            .map(|length| String::from_utf8_lossy(&buffer[..length]).into_owned())
    };
    let mut standby = Replicator::start_with(
        &pair,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            // One second: fed every half second.
            ("WATCHDOG_USEC", "1000000"),
        ],
    )
    .await;
    standby.wait_for(&["standby"]).await;
    let (received, messages) = tokio::task::spawn_blocking(move || {
        let mut messages = Vec::new();
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            messages.extend(received());
        }
        (received, messages)
    })
    .await
    .unwrap();
    assert_eq!(messages.first().map(String::as_str), Some("READY=1"));
    let fed = messages.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(fed >= 4, "{messages:?}");
    assert_eq!(messages.len(), fed + 1, "{messages:?}");
    assert!(standby.get("/healthz").await.contains(" 200 "));
    let (status, log) = standby.stop().await;
    assert!(status.success(), "{log}");
    let after = tokio::task::spawn_blocking(move || std::iter::from_fn(received).collect())
        .await
        .unwrap();
    let after: Vec<String> = after;
    assert!(after.contains(&"STOPPING=1".to_owned()), "{after:?}");
    active.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A large source transaction goes to the target in parts; while the target is slow (here:
/// a lock on users_sync held for longer than the bound), the session waits for each part.
/// The status updates that keep going out meanwhile are its progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_waiting_for_a_slow_target_stays_alive() {
    // Status updates go out every 10 s at most (the source's wal_sender_timeout is 60 s):
    // the bound must be longer than that, and the wait longer than the bound.
    let bound = Duration::from_secs(12);
    let pair = Pair::new().await;
    pair.setup().await;
    let (addr, metrics, stop, task) = start_in_process(pair.config.clone()).await;
    metrics.liveness().set_bound(bound);
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('first@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let mut blocker = sql(pair.target_server, &pair.config.target.dbname).await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE neon_auth.users_sync IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'bulk' || n || '@example.com'
               FROM generate_series(1, 25000) AS n",
        )
        .await
        .unwrap();
    healthy_throughout(
        addr,
        bound + Duration::from_secs(3),
        "waiting for the target",
    )
    .await;
    lock.rollback().await.unwrap();
    pair.wait_for_match().await;
    let _ = stop.send(true);
    task.await.unwrap().expect("the replicator stops cleanly");
}

/// A large source transaction whose changes are nearly all for other rows than the target's
/// (another table of the publication here; the same holds for rows the mapping skips, such as
/// another tenancy's users) is read back from its spill file and mapped with no part filling
/// up. Status updates must keep going out meanwhile (the crash-seat review's case): without
/// them the source's wal_sender_timeout (2 s on this server) ends the connection, and
/// liveness shows no progress, after which every retry reads the same transaction again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_back_a_large_transaction_of_other_rows_shows_progress() {
    static SERVER: std::sync::OnceLock<usersync::localpg::LocalPg> = std::sync::OnceLock::new();
    let server =
        SERVER.get_or_init(|| start_server(vec![("wal_sender_timeout".into(), "2s".into())]));
    let pair = Pair::on(server, USERS_TABLE).await;
    pair.setup().await;
    pair.source
        .batch_execute(
            "CREATE TABLE public.other (id bigint PRIMARY KEY, a text);
             ALTER PUBLICATION usersync ADD TABLE public.other;",
        )
        .await
        .unwrap();
    let (_addr, metrics, stop, task) = start_in_process(pair.config.clone()).await;
    // Only the longest silence matters here, not /healthz's verdict.
    metrics.liveness().set_bound(Duration::from_secs(3600));
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('before@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let reconnects = metrics.reconnects();
    pair.source
        .batch_execute(
            "BEGIN;
             INSERT INTO public.other SELECT g, 'a' FROM generate_series(1, 1500000) g;
             INSERT INTO users (email) VALUES ('after@example.com');
             COMMIT;",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut longest = Duration::ZERO;
    loop {
        longest = longest.max(metrics.liveness().silent_for());
        let arrived: bool = pair
            .target
            .query_one(
                "SELECT EXISTS (SELECT FROM neon_auth.users_sync
                                 WHERE raw_json ->> 'primary_email' = 'after@example.com')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if arrived {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the transaction never arrived ({} reconnects); longest silence {longest:?}",
            metrics.reconnects() - reconnects
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metrics.reconnects(),
        reconnects,
        "the source dropped the connection while the transaction was read back; longest \
         silence {longest:?}"
    );
    assert!(
        longest < Duration::from_secs(2),
        "longest silence {longest:?}"
    );
    let _ = stop.send(true);
    task.await.unwrap().expect("the replicator stops cleanly");
}
