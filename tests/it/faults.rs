//! Fault injection under a steady write load: servers restarted (fast and immediate), backends
//! terminated, connections cut or stalled by a proxy, again and again. After the last fault
//! the target must equal the source (a per-row `version` counter shows a lost change), and a
//! write log on the target must never see a user's version repeat or go back (a doubled or
//! reordered change).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use usersync::localpg::{LocalPg, StopMode};

use crate::harness::*;

/// Faults per test: enough to hit each kind a few times, few enough for well under a minute.
const FAULTS: u32 = 12;
/// The replicator's `source_timeout` in these tests: a stalled connection is given up quickly.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a fault waits for the replicator to apply again before it counts as a hang.
const RECOVERY: Duration = Duration::from_secs(30);

/// The servers these tests break; a short sender timeout releases a cut-off slot quickly.
fn breakable_conf() -> Vec<(String, String)> {
    vec![
        ("logical_decoding_work_mem".into(), "64kB".into()),
        ("wal_sender_timeout".into(), "3s".into()),
    ]
}

fn restart_source_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    SERVER.get_or_init(|| start_server(breakable_conf()))
}

fn restart_target_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    SERVER.get_or_init(|| start_server(breakable_conf()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    SourceFastRestart,
    SourceCrash,
    TargetFastRestart,
    TargetCrash,
    TerminateWalsender,
    TerminateTargetSessions,
    CutSource,
    StallSource,
    CutTarget,
    /// usersync killed and started again, then the target crashing 0-300 ms later: the new
    /// session's first moments meet a target that loses its unflushed WAL tail.
    ReplicatorKilledThenTargetCrash,
}

/// Restarts and terminations, on a source server and a separate target server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_terminations_lose_and_double_nothing() {
    let (source_server, target_server) = (restart_source_server(), restart_target_server());
    let mut pair = Pair::on(source_server, USERS_TABLE).await;
    pair.move_target(target_server).await;
    let kinds = [
        Fault::SourceFastRestart,
        Fault::SourceCrash,
        Fault::TargetFastRestart,
        Fault::TargetCrash,
        Fault::TerminateWalsender,
        Fault::TerminateTargetSessions,
    ];
    run_faults(&mut pair, &kinds, None, Some(target_server)).await;
}

/// Crashes of the target (immediate stop), alone and right after usersync was killed and
/// started again, round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crashes_around_restarts_lose_and_double_nothing() {
    static SOURCE: OnceLock<LocalPg> = OnceLock::new();
    static TARGET: OnceLock<LocalPg> = OnceLock::new();
    let source_server = SOURCE.get_or_init(|| start_server(breakable_conf()));
    // Its WAL writer nearly asleep: an immediate stop loses the unflushed tail of commits,
    // as an OS crash would, so a confirmation past it would show as a lost change.
    let target_server = TARGET.get_or_init(|| {
        start_target_server(
            breakable_conf()
                .into_iter()
                .chain(lazy_wal_conf())
                .collect(),
        )
    });
    let mut pair = Pair::on(source_server, USERS_TABLE).await;
    pair.move_target(target_server).await;
    let kinds = [Fault::TargetCrash, Fault::ReplicatorKilledThenTargetCrash];
    run_faults_for(&mut pair, &kinds, None, Some(target_server), CRASH_ROUNDS).await;
}

/// Rounds of [`target_crashes_around_restarts_lose_and_double_nothing`]: dozens, as each is
/// quick.
const CRASH_ROUNDS: u32 = 24;

/// Connections cut and stalled between usersync and both servers, and backends terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cuts_and_stalls_lose_and_double_nothing() {
    let mut pair = Pair::new().await;
    let source_proxy = Proxy::start(pair.server.port()).await;
    let target_proxy = Proxy::start(pair.target_server.port()).await;
    let proxies = Proxies {
        source: source_proxy,
        target: target_proxy,
    };
    let kinds = [
        Fault::CutSource,
        Fault::StallSource,
        Fault::CutTarget,
        Fault::TerminateWalsender,
        Fault::TerminateTargetSessions,
    ];
    run_faults(&mut pair, &kinds, Some(&proxies), None).await;
}

struct Proxies {
    source: Proxy,
    target: Proxy,
}

async fn run_faults(
    pair: &mut Pair,
    kinds: &[Fault],
    proxies: Option<&Proxies>,
    target_server: Option<&'static LocalPg>,
) {
    run_faults_for(pair, kinds, proxies, target_server, FAULTS).await;
}

async fn run_faults_for(
    pair: &mut Pair,
    kinds: &[Fault],
    proxies: Option<&Proxies>,
    target_server: Option<&'static LocalPg>,
    rounds: u32,
) {
    // RUST_LOG=usersync=debug shows the replicator's side of a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    pair.setup().await;
    install_write_log(&pair.target).await;
    // The test's own clients (the write load, the final comparison) are the superuser's:
    // usersync's roles may only read the source, and not read the write log at all.
    let (source_url, target_url) = (pair.source_admin_url(), pair.target_admin_url());
    if let Some(proxies) = proxies {
        pair.config.source = via(&pair.source_url, pair.server.port(), proxies.source.port);
        pair.config.target = via(
            &pair.target_url,
            pair.target_server.port(),
            proxies.target.port,
        );
    }
    pair.config.source_timeout = SOURCE_TIMEOUT;

    let writing = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn(write_load(source_url.clone(), Arc::clone(&writing)));
    let mut running = pair.start();
    let mut random = Random::seeded();
    let mut injected = Vec::new();
    for round in 0..rounds {
        // Each fault hits working replication: wait for a batch since the last one.
        let want = running.metrics.batches() + 1;
        running = wait_for_batches(running, want).await;
        tokio::time::sleep(Duration::from_millis(200 + random.below(600))).await;
        let fault = kinds[random.below(kinds.len() as u64) as usize];
        eprintln!("faults: round {round}: {fault:?}");
        if fault == Fault::ReplicatorKilledThenTargetCrash {
            running.abort();
            running = pair.start();
            tokio::time::sleep(Duration::from_millis(random.below(300))).await;
        }
        inject(fault, pair, proxies, target_server).await;
        injected.push(fault);
    }
    let want = running.metrics.batches() + 1;
    let running = wait_for_batches(running, want).await;
    writing.store(false, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    // The test's own clients may have died with a restart.
    pair.source = reconnect(&source_url).await;
    pair.target = reconnect(&target_url).await;
    pair.wait_for_match().await;
    let reconnects = running.metrics.reconnects();
    running.stop().await;
    eprintln!(
        "faults: {} injected ({injected:?}); {changes} source statements; {reconnects} \
         reconnects; {:.1}s",
        injected.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(changes > 100, "the writer made only {changes} changes");
    assert_write_log_ordered(&pair.target).await;
    assert!(
        soft_deleted_users(&pair.target).await > 0,
        "the load deleted users; the target must hold them soft-deleted"
    );
}

async fn inject(
    fault: Fault,
    pair: &Pair,
    proxies: Option<&Proxies>,
    target_server: Option<&'static LocalPg>,
) {
    let admin_url = |server: &LocalPg| server.superuser_url("postgres");
    match fault {
        Fault::SourceFastRestart => restart(pair.server, StopMode::Fast).await,
        Fault::SourceCrash => restart(pair.server, StopMode::Immediate).await,
        Fault::TargetFastRestart => restart(target_server.unwrap(), StopMode::Fast).await,
        Fault::TargetCrash | Fault::ReplicatorKilledThenTargetCrash => {
            restart(target_server.unwrap(), StopMode::Immediate).await
        }
        Fault::TerminateWalsender => {
            let admin = reconnect(&admin_url(pair.server)).await;
            let slot = &pair.config.slot;
            admin
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                      WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[slot],
                )
                .await
                .unwrap();
        }
        Fault::TerminateTargetSessions => {
            let admin = reconnect(&admin_url(pair.target_server)).await;
            let dbname = pair.config.target.dbname.as_str();
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE application_name = 'usersync' AND datname = $1",
                    &[&dbname],
                )
                .await
                .unwrap();
        }
        Fault::CutSource => proxies.unwrap().source.cut(),
        Fault::StallSource => proxies.unwrap().source.stall(),
        Fault::CutTarget => proxies.unwrap().target.cut(),
    }
}

/// Restarts a server off the async runtime (pg_ctl blocks for a second or so).
async fn restart(server: &'static LocalPg, mode: StopMode) {
    tokio::task::spawn_blocking(move || server.restart(mode))
        .await
        .unwrap()
        .expect("restart the server");
}

/// Waits for the replicator's applied-batch count to reach `count`; if it ended instead (a
/// definite error), stops it, which panics with that error.
async fn wait_for_batches(running: Running, count: u64) -> Running {
    let deadline = Instant::now() + RECOVERY;
    while running.metrics.batches() < count {
        if running.is_finished() {
            running.stop().await;
            panic!("the replicator ended by itself after a fault");
        }
        assert!(
            Instant::now() < deadline,
            "the replicator applied nothing for {RECOVERY:?} after a fault: it hangs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running
}

/// Inserts, updates that bump `version`, and deletes, until told to stop; rides out the
/// source's restarts by reconnecting. Returns how many statements it ran.
async fn write_load(url: String, writing: Arc<AtomicBool>) -> u32 {
    let mut client = reconnect(&url).await;
    let mut n = 0u32;
    while writing.load(Ordering::Relaxed) {
        n += 1;
        let sql = match n % 20 {
            0 => "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY version LIMIT 1)"
                .to_owned(),
            k if k % 3 == 0 => format!("INSERT INTO users (email) VALUES ('f{n}@example.com')"),
            _ => "UPDATE users SET version = version + 1
                   WHERE id IN (SELECT id FROM users ORDER BY random() LIMIT 3)"
                .to_owned(),
        };
        // A statement cut off by a restart may or may not have committed: either is fine,
        // the comparison reads the source as it ends up.
        if let Err(error) = client.batch_execute(&sql).await {
            // tokio-postgres shows a server's error as a bare "db error": print the message.
            match error.as_db_error() {
                Some(db_error) => eprintln!("faults: writer: {db_error}"),
                None => eprintln!("faults: writer: {error}"),
            }
            client = reconnect(&url).await;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    n
}

/// Connects, retrying while a server restarts.
async fn reconnect(url: &str) -> Client {
    let deadline = Instant::now() + RECOVERY;
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "cannot reconnect: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The URL with the server's port replaced by the proxy's.
fn via(url: &str, server_port: u16, proxy_port: u16) -> usersync::conn::PgUrl {
    url.replace(&format!(":{server_port}/"), &format!(":{proxy_port}/"))
        .parse()
        .unwrap()
}

/// A loopback TCP proxy to a server that can cut every connection it carries (both sides
/// closed) or stall them (nothing forwarded, nothing closed: a half-open network). New
/// connections after a fault are forwarded normally.
struct Proxy {
    port: u16,
    cuts: watch::Sender<u64>,
    stalls: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cuts, _) = watch::channel(0);
        let (stalls, _) = watch::channel(0);
        let accept = {
            let (cuts, stalls) = (cuts.clone(), stalls.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(forward(
                        client,
                        upstream,
                        cuts.subscribe(),
                        stalls.subscribe(),
                    ));
                }
            })
        };
        Proxy {
            port,
            cuts,
            stalls,
            accept,
        }
    }

    /// Closes every connection (stalled ones too).
    fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Stops forwarding on every open connection, leaving them open.
    fn stall(&self) {
        self.stalls.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connection tasks end when the senders go (their `changed` fails).
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: u16,
    mut cuts: watch::Receiver<u64>,
    mut stalls: watch::Receiver<u64>,
) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = cuts.changed() => return,
        _ = stalls.changed() => {}
    }
    // Stalled: hold both sockets open, forwarding nothing, until a cut or the proxy's end.
    let _ = cuts.changed().await;
}

/// A small xorshift generator; the seed is printed so a failing sequence can be replayed
/// (`FAULTS_SEED=<seed>`).
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos() as u64
                    | 1
            });
        eprintln!("faults: seed {seed}");
        Random(seed.max(1))
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// A source that accepts connections and then answers nothing, as a stalled network does
/// while a session starts: each attempt must give up after the source timeout and retry,
/// never hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_answers_nothing_while_a_session_starts_is_retried() {
    let mut pair = Pair::new().await;
    pair.setup().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    pair.config.source = via(&pair.source_url, pair.server.port(), silent_port);
    pair.config.source_timeout = SOURCE_TIMEOUT;
    let running = pair.start();
    let deadline = Instant::now() + RECOVERY;
    while running.metrics.reconnects() < 2 {
        assert!(
            !running.is_finished(),
            "a silent source is not a definite error"
        );
        assert!(
            Instant::now() < deadline,
            "a session start hangs on a source that answers nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    silent.abort();
}

/// A batch that takes longer than the source timeout (a slow target) pauses the reading of
/// the stream while the next batch waits; the source's silence in that time is not its
/// fault, and must not end a healthy session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_slower_than_the_source_timeout_is_not_a_silent_source() {
    let mut pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(&format!(
            "CREATE FUNCTION slow_user() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$;
                 CREATE TRIGGER slow_user BEFORE INSERT ON neon_auth.users_sync FOR EACH ROW
                   WHEN (NEW.raw_json ->> 'primary_email' = 'slow@example.com')
                   EXECUTE FUNCTION slow_user();",
            SOURCE_TIMEOUT.as_secs() + 2
        ))
        .await
        .unwrap();
    pair.config.source_timeout = SOURCE_TIMEOUT;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('slow@example.com')")
        .await
        .unwrap();
    // Changes keep coming while the slow batch is written, so the next batch is due and
    // waits: reading pauses.
    let until = Instant::now() + SOURCE_TIMEOUT + Duration::from_secs(2);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        pair.source
            .execute(
                "INSERT INTO users (email) VALUES ($1)",
                &[&format!("after{n}@example.com")],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pair.wait_for_match().await;
    assert_eq!(
        running.metrics.reconnects(),
        0,
        "a slow target ended the session as if the source were silent"
    );
    running.stop().await;
}

/// A large source transaction goes to the target in parts; a part slower than the source's
/// `wal_sender_timeout` (4 s on the shared server) must not get the connection ended: status
/// updates go out while the session waits for the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_part_of_a_large_transaction_keeps_the_source_connection() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(
            "CREATE FUNCTION slow_part() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(6); RETURN NEW; END $$;
             CREATE TRIGGER slow_part BEFORE INSERT ON neon_auth.users_sync FOR EACH ROW
               WHEN (NEW.raw_json ->> 'primary_email' = 'slow1@example.com')
               EXECUTE FUNCTION slow_part();",
        )
        .await
        .unwrap();
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'slow' || g || '@example.com'
               FROM generate_series(1, 25000) g",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert_eq!(
        running.metrics.reconnects(),
        0,
        "the source ended the connection while a slow part was written"
    );
    running.stop().await;
}

/// The parts of a large transaction are written into one target transaction, open between
/// them: a durability flush must never run on that connection meanwhile, or it would commit
/// the parts so far (the target would show half a source transaction, and the session would
/// fail and apply them again). Here a batch is applied, not yet flushed, just before the
/// transaction's first part (it waited behind a slow one), and the reader is slow between
/// parts (a long run of logical messages that map to nothing, read back from the spill
/// file), so the writer sits idle with a flush due between parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_flush_runs_between_the_parts_of_a_large_transaction() {
    let mut pair = Pair::new().await;
    pair.config.spill_threshold = 64 << 10;
    pair.setup().await;
    pair.target
        .batch_execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$;
             CREATE TRIGGER slow_row BEFORE INSERT ON neon_auth.users_sync FOR EACH ROW
               WHEN (NEW.raw_json ->> 'primary_email' = 'slow@example.com')
               EXECUTE FUNCTION slow_row();",
        )
        .await
        .unwrap();
    let running = pair.start();
    // The large transaction is written first and committed last, so that it reaches the
    // replicator whole (streamed while in progress) right behind the two small ones.
    let database: String = pair
        .source
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let other = sql(pair.server, &database).await;
    pair.source
        .batch_execute(
            "BEGIN;
             INSERT INTO users (email)
               SELECT 'big' || g || '@example.com' FROM generate_series(1, 2500) g;
             SELECT count(pg_logical_emit_message(true, 'filler', 'x'))
               FROM generate_series(1, 400000);
             INSERT INTO users (email) VALUES ('last@example.com');",
        )
        .await
        .unwrap();
    other
        .batch_execute(
            "INSERT INTO users (email) VALUES ('slow@example.com');
             INSERT INTO users (email) VALUES ('waiting@example.com');",
        )
        .await
        .unwrap();
    pair.source.batch_execute("COMMIT").await.unwrap();
    pair.wait_for_match().await;
    assert_eq!(
        running.metrics.reconnects(),
        0,
        "the session failed: a flush ran inside the large transaction"
    );
    running.stop().await;
}

/// With one target, a large transaction's next part waits in the writer's queue while one is
/// written. The target's connection is cut while a part is written and the next is queued:
/// the session fails as a lost connection and is retried (not stopped as a bug in
/// usersync), the open target transaction is rolled back, and the transaction is applied
/// whole by the next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_target_connection_with_parts_queued_is_retried() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(
            "CREATE FUNCTION slow_part() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
             CREATE TRIGGER slow_part BEFORE INSERT ON neon_auth.users_sync FOR EACH ROW
               WHEN (NEW.raw_json ->> 'primary_email' = 'queued3000@example.com')
               EXECUTE FUNCTION slow_part();",
        )
        .await
        .unwrap();
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'queued' || g || '@example.com'
               FROM generate_series(1, 25000) g",
        )
        .await
        .unwrap();
    // The second part sleeps on the target; the third is queued behind it by then.
    let started = Instant::now();
    let cut = loop {
        let cut: i64 = pair
            .target
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE application_name = 'usersync' AND wait_event = 'PgSleep'
                    AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if cut > 0 || started.elapsed() > Duration::from_secs(60) {
            break cut;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(cut, 1, "the writer never reached the slow part");
    pair.wait_for_match().await;
    assert!(
        running.metrics.reconnects() >= 1,
        "the cut connection was not retried"
    );
    running.stop().await;
}

/// Makes every statement that does `events` on `table` of the target sleep `seconds` at its
/// end, by a trigger (the superuser's).
async fn slow_statements(target: &Client, table: &str, events: &str, seconds: f64) {
    target
        .batch_execute(&format!(
            "CREATE FUNCTION slow_statement() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               PERFORM pg_sleep({seconds});
               RETURN NULL;
             END $$;
             CREATE TRIGGER slow_statement AFTER {events} ON {table}
               FOR EACH STATEMENT EXECUTE FUNCTION slow_statement();"
        ))
        .await
        .unwrap();
}

/// A backlog is written over two target connections, the next batch beside the one being
/// written (see `replicator::route`). Checkpoints are made slow by a trigger, so the next
/// batch waits for the one before on the checkpoint row; then the connection writing that is
/// terminated there: the batch beside must not commit past it (its checkpoint moves only
/// from where that batch would have left it), the session is retried, and every change
/// lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_beside_one_that_is_lost_commits_nothing() {
    let pair = Pair::as_superuser().await;
    pair.setup().await;
    log_user_writers(&pair.target, 0.0).await;
    slow_statements(&pair.target, "usersync.state", "UPDATE", 1.0).await;
    // So that consecutive batches share users.
    write_backlog(&pair.source, "b", 12_000, true, true).await;
    let running = pair.start();
    // A usersync backend waiting for another's lock: the batch beside, waiting for the one
    // before. Once a batch has committed (so that the cut is not of the very first pair, which
    // would leave only the retried session's writers), terminate the one it waits for.
    let deadline = Instant::now() + Duration::from_secs(60);
    let terminated = loop {
        let row = pair
            .target
            .query_opt(
                "SELECT pg_terminate_backend(blocker)
                   FROM pg_stat_activity a, unnest(pg_blocking_pids(a.pid)) AS blocker
                  WHERE a.application_name = 'usersync' AND a.datname = current_database()
                    AND EXISTS (SELECT FROM neon_auth.users_sync)
                  LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get::<_, bool>(0);
        }
        assert!(
            Instant::now() < deadline,
            "no batch was ever written beside another"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(terminated);
    pair.wait_for_match().await;
    assert!(
        running.metrics.reconnects() >= 1,
        "the cut connection was not retried"
    );
    running.stop().await;
    // Before the cut and after the retry.
    let writers = user_writers(&pair.target).await;
    assert!(writers >= 3, "{writers} target backends wrote users");
}

/// A role allowed a single target connection still replicates: the second connection a route
/// alone opens for backlogs is done without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_role_allowed_one_connection_still_replicates() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(&format!(
            "ALTER ROLE \"{}\" CONNECTION LIMIT 1",
            pair.target_role()
        ))
        .await
        .unwrap();
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'one' || g || '@example.com' FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
}

/// A backlog written over two target connections still confirms the slot as it drains: a
/// flush that is due breaks the run of batches written beside one another (otherwise the
/// source would keep the whole backlog's WAL until the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_over_two_connections_is_confirmed_as_it_drains() {
    let pair = Pair::as_superuser().await;
    pair.setup().await;
    slow_statements(&pair.target, "usersync.state", "UPDATE", 0.2).await;
    write_backlog(&pair.source, "c", 40_000, false, false).await;
    let running = pair.start();
    // The positions the slot was confirmed at while the backlog was being written.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while target_user_count(&pair.target).await < 40_000 {
        let confirmed = pair.slot_confirmed().await;
        if seen.last() != Some(&confirmed) {
            seen.push(confirmed);
        }
        assert!(Instant::now() < deadline, "the backlog did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.len() >= 3,
        "the slot was confirmed at {seen:?} while the backlog drained, not as it went"
    );
    pair.wait_for_match().await;
    running.stop().await;
}

/// A large transaction on a slow target, with the second connection a route alone opens:
/// its last part waits long enough to count as a backlog's batch, and must still be
/// committed in the transaction its parts opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_on_a_slow_target_lands_whole() {
    let mut pair = Pair::as_superuser().await;
    // Written in parts.
    pair.config.spill_threshold = 64 << 10;
    pair.setup().await;
    slow_statements(
        &pair.target,
        "neon_auth.users_sync",
        "INSERT OR UPDATE",
        0.15,
    )
    .await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'large' || g || '@example.com'
               FROM generate_series(1, 9000) g",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert_eq!(
        running.metrics.reconnects(),
        0,
        "the large transaction failed on the way"
    );
    running.stop().await;
}
