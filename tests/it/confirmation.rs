//! When the slot is confirmed: never past a checkpoint the target has not made durable, at
//! any moment, including the first status update of a session.
//!
//! The target runs with its WAL writer nearly asleep (`wal_writer_delay = 10s`), so that its
//! asynchronous commits stay unflushed for seconds, as they would stay lost after an OS crash
//! or a Neon compute restart. A trigger on `usersync.state` records where in the target's WAL
//! each checkpoint was written, and a watcher samples the slot's `confirmed_flush_lsn` every
//! few milliseconds: a sample at or past the `end_lsn` of a checkpoint still beyond the
//! target's `pg_current_wal_flush_lsn()` is a confirmation that a crash could turn into loss.
//!
//! An immediate stop of the target keeps what PostgreSQL handed to the OS, so a crash test
//! cannot show this by itself: hence the rule is asserted directly.

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use usersync::localpg::LocalPg;

use crate::harness::*;

/// A target server whose asynchronous commits stay unflushed for up to ten seconds
/// ([`lazy_wal_conf`]).
fn lazy_target_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    SERVER.get_or_init(|| start_target_server(lazy_wal_conf()))
}

/// Records the target WAL position at which each checkpoint row is written. The function is
/// `SECURITY DEFINER`, so usersync's target role needs no grant on the log.
const CHECKPOINT_LOG: &str = "
CREATE TABLE checkpoint_log (end_lsn pg_lsn NOT NULL, wal_lsn pg_lsn NOT NULL);
CREATE FUNCTION log_checkpoint() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  INSERT INTO checkpoint_log VALUES (NEW.end_lsn, pg_current_wal_insert_lsn());
  RETURN NEW;
END $$;
CREATE TRIGGER log_checkpoint AFTER INSERT OR UPDATE ON usersync.state
  FOR EACH ROW EXECUTE FUNCTION log_checkpoint();";

/// Checkpoints whose commit cannot be durable yet: written at or past the flush position.
/// The commit record comes after the trigger's position, so this misses some (a commit
/// between the two), never reports a durable one.
const NOT_DURABLE: &str = "
SELECT end_lsn::text, wal_lsn::text, pg_current_wal_flush_lsn()::text
  FROM checkpoint_log WHERE wal_lsn >= pg_current_wal_flush_lsn()";

/// Samples the slot's confirmation against the target's durable checkpoints until stopped.
struct Watcher {
    stop: Arc<AtomicBool>,
    /// Samples that found a checkpoint not yet durable on the target (the test's premise).
    undurable_seen: Arc<AtomicU64>,
    task: JoinHandle<(u64, Vec<String>)>,
}

impl Watcher {
    async fn start(pair: &Pair) -> Watcher {
        let source = sql(pair.server, &pair.config.source.dbname).await;
        let target = sql(pair.target_server, &pair.config.target.dbname).await;
        let slot = pair.config.slot.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let undurable_seen = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, undurable_seen) = (Arc::clone(&stop), Arc::clone(&undurable_seen));
            tokio::spawn(async move {
                let mut samples = 0;
                let mut violations = Vec::new();
                let mut furthest: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    // The slot first: the flush position only grows, so reading it second can
                    // only make a checkpoint look durable too early, never too late.
                    let confirmed: Option<String> = source
                        .query_opt(
                            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots
                              WHERE slot_name = $1",
                            &[&slot],
                        )
                        .await
                        .unwrap()
                        .and_then(|row| row.get(0));
                    // What was confirmed once is never taken back, not even by a new session.
                    if let (Some(now), Some(before)) = (&confirmed, &furthest) {
                        let back: bool = source
                            .query_one("SELECT $1::text::pg_lsn < $2::text::pg_lsn", &[now, before])
                            .await
                            .unwrap()
                            .get(0);
                        if back {
                            violations.push(format!(
                                "the slot's confirmation went back from {before} to {now}"
                            ));
                        } else {
                            furthest = Some(now.clone());
                        }
                    } else if confirmed.is_some() {
                        furthest = confirmed.clone();
                    }
                    let pending = target
                        .query(
                            &format!("{NOT_DURABLE} AND end_lsn <= $1::text::pg_lsn"),
                            &[&confirmed.clone().unwrap_or_else(|| "0/0".into())],
                        )
                        .await
                        .unwrap();
                    let undurable: i64 = target
                        .query_one(&format!("SELECT count(*) FROM ({NOT_DURABLE}) n"), &[])
                        .await
                        .unwrap()
                        .get(0);
                    if undurable > 0 {
                        undurable_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    for row in pending {
                        let (end, wal, flush): (String, String, String) =
                            (row.get(0), row.get(1), row.get(2));
                        violations.push(format!(
                            "slot confirmed at {} while the checkpoint ending at {end}, written \
                             at target WAL {wal}, was beyond the target's flush position {flush}",
                            confirmed.as_deref().unwrap_or("?")
                        ));
                    }
                    samples += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (samples, violations)
            })
        };
        Watcher {
            stop,
            undurable_seen,
            task,
        }
    }

    /// Whether any sample so far saw a checkpoint the target had not made durable.
    fn saw_undurable(&self) -> bool {
        self.undurable_seen.load(Ordering::Relaxed) > 0
    }

    /// Stops sampling; panics on any confirmation past a checkpoint that was not durable.
    async fn finish(self, scenario: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, violations) = self.task.await.unwrap();
        // A handful at least: the machine may be busy, and a scenario may end early.
        assert!(samples >= 20, "{scenario}: only {samples} samples");
        assert!(
            violations.is_empty(),
            "{scenario}: the slot was confirmed past what the target held durably \
             ({} of {samples} samples), first: {}",
            violations.len(),
            violations[0]
        );
    }
}

/// Inserts a user every 20 ms until dropped.
struct Load {
    writing: Arc<AtomicBool>,
}

impl Load {
    async fn start(pair: &Pair) -> Load {
        let client = sql(pair.server, &pair.config.source.dbname).await;
        let writing = Arc::new(AtomicBool::new(true));
        let still = Arc::clone(&writing);
        tokio::spawn(async move {
            let mut n = 0u32;
            while still.load(Ordering::Relaxed) {
                n += 1;
                client
                    .batch_execute(&format!(
                        "INSERT INTO users (email) VALUES ('c{n}@example.com')"
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Load { writing }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.writing.store(false, Ordering::Relaxed);
    }
}

/// A pair whose target is on the lazy server, set up, with the checkpoint log installed.
async fn lazy_pair() -> Pair {
    let mut pair = Pair::new().await;
    pair.move_target(lazy_target_server()).await;
    pair.setup().await;
    pair.target.batch_execute(CHECKPOINT_LOG).await.unwrap();
    pair
}

fn spawn_run(pair: &Pair) -> Child {
    pair.command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills `child` (SIGKILL) once the target holds checkpoints it has not made durable, so the
/// next session starts from a checkpoint that is only visible.
async fn kill_while_undurable(pair: &Pair, mut child: Child) {
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let undurable: i64 = pair
            .target
            .query_one(&format!("SELECT count(*) FROM ({NOT_DURABLE}) n"), &[])
            .await
            .unwrap()
            .get(0);
        if undurable > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target never held an undurable checkpoint: the test proves nothing"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_never_confirmed_past_what_the_target_holds_durably() {
    let pair = lazy_pair().await;
    let watcher = Watcher::start(&pair).await;
    let load = Load::start(&pair).await;

    // A fresh session after kill -9, again and again.
    let mut child = spawn_run(&pair);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill_while_undurable(&pair, child).await;
        child = spawn_run(&pair);
    }

    // A standby taking over from a killed active one.
    let standby = spawn_run(&pair);
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_while_undurable(&pair, child).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A replay, and a dry one, after the service was killed.
    kill_while_undurable(&pair, standby).await;
    for args in [&["replay", "--dry-run"][..], &["replay"][..]] {
        let output = pair.usersync(args);
        assert!(output.status.success(), "{args:?}: {}", text(&output));
    }
    drop(load);
    assert!(
        watcher.saw_undurable(),
        "the premise: undurable checkpoints"
    );
    watcher.finish("restarts, takeover, replays").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_checkpoint_row_confirms_nothing_and_stops_with_advice() {
    let pair = lazy_pair().await;
    let watcher = Watcher::start(&pair).await;
    let mut child = pair
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Two users in quick succession, so that the second batch waits for the next durable
    // commit (at most every 200 ms after the one the first batch triggered); the row goes in
    // between, in a commit that does not flush the WAL either.
    let mut status = None;
    for n in 0..40 {
        for k in 0..2 {
            let email = format!("m{n}_{k}@example.com");
            pair.source
                .execute("INSERT INTO users (email) VALUES ($1)", &[&email])
                .await
                .unwrap();
            wait_for_user(&pair, &email).await;
        }
        pair.target
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = off; DELETE FROM usersync.state; COMMIT",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
    }
    watcher.finish("a missing checkpoint row").await;
    let Some(status) = status else {
        child.kill().unwrap();
        panic!("the row never went missing before a durable commit");
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(status.code(), Some(78), "{stderr}");
    // Found missing by the durable commit, or by the next batch's checkpoint.
    assert!(stderr.contains("usersync.state"), "{stderr}");
    assert!(stderr.contains("usersync resync"), "{stderr}");
}

/// Waits, polling often, until the target holds the user with `email`.
async fn wait_for_user(pair: &Pair, email: &str) {
    let deadline = Instant::now() + WAIT;
    while pair
        .target
        .query_opt(
            "SELECT 1 FROM neon_auth.users_sync WHERE email = $1",
            &[&email],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "{email} never reached the target"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Idle, the slot is confirmed up to the server's latest position (past the last checkpoint);
/// the next change must not take that confirmation back while it waits to be made durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_confirmation_is_never_taken_back() {
    let pair = lazy_pair().await;
    let watcher = Watcher::start(&pair).await;
    let running = pair.start();
    for round in 0..3 {
        pair.source
            .execute(
                "INSERT INTO users (email) VALUES ($1)",
                &[&format!("idle{round}@example.com")],
            )
            .await
            .unwrap();
        wait_for_user(&pair, &format!("idle{round}@example.com")).await;
        // Idle long enough for heartbeats and keepalives to move the confirmation on.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    running.stop().await;
    watcher.finish("idle confirmations").await;
}

/// A target whose synchronous commits wait for a standby that never answers (as a Neon
/// compute waits for its safekeepers), and someone cancels usersync's wait: PostgreSQL then
/// commits locally, warns and reports success. Nothing may be confirmed on that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_for_synchronous_replication_confirms_nothing() {
    static TARGET: OnceLock<LocalPg> = OnceLock::new();
    let target_server = TARGET.get_or_init(|| start_target_server(Vec::new()));
    cancelled_wait_confirms_nothing(target_server, false).await;
}

/// The same, with the WARNING that tells a cancelled wait hidden by the role's own
/// `client_min_messages`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_confirms_nothing_whatever_the_roles_client_min_messages() {
    static TARGET: OnceLock<LocalPg> = OnceLock::new();
    let target_server = TARGET.get_or_init(|| start_target_server(Vec::new()));
    cancelled_wait_confirms_nothing(target_server, true).await;
}

async fn cancelled_wait_confirms_nothing(target_server: &'static LocalPg, hide_warnings: bool) {
    let mut pair = Pair::new().await;
    pair.move_target(target_server).await;
    pair.setup().await;
    if hide_warnings {
        pair.target
            .batch_execute(&format!(
                "ALTER ROLE \"{}\" IN DATABASE \"{}\" SET client_min_messages = error",
                pair.config.target.user, pair.config.target.dbname
            ))
            .await
            .unwrap();
    }
    let (running, admin) = start_then_lose_the_standby(&pair, target_server).await;

    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('stuck@example.com')")
        .await
        .unwrap();
    wait_for_user(&pair, "stuck@example.com").await;
    let applied = pair.checkpoint_end().await;
    let mut cancelled = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        cancelled += admin
            .query(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                  WHERE application_name = 'usersync' AND wait_event = 'SyncRep'",
                &[],
            )
            .await
            .unwrap()
            .len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cancelled > 0,
        "usersync never waited for synchronous replication"
    );
    let confirmed_past = slot_confirmed_at(&pair, &applied).await;

    set_system(&admin, "RESET synchronous_standby_names").await;
    pair.wait_for_match().await;
    running.stop().await;
    assert!(
        !confirmed_past,
        "the slot was confirmed past {applied}, which only a cancelled wait had 'made durable'"
    );
}

/// A durability flush waits for the target's WAL to be flushed (on Neon, for the
/// safekeepers): batches written after it must not wait with it. Here every synchronous
/// commit on the target waits for a standby that is missing, so the flush never returns
/// until the standby is no longer required; users go on reaching the target meanwhile, and
/// the slot is confirmed past them only once the flush returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_reach_the_target_while_a_flush_waits() {
    static TARGET: OnceLock<LocalPg> = OnceLock::new();
    let target_server = TARGET.get_or_init(|| start_target_server(Vec::new()));
    let mut pair = Pair::new().await;
    pair.move_target(target_server).await;
    pair.config.heartbeat_interval = None;
    pair.setup().await;
    let (running, admin) = start_then_lose_the_standby(&pair, target_server).await;

    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('first@example.com')")
        .await
        .unwrap();
    wait_for_user(&pair, "first@example.com").await;
    let first = pair.checkpoint_end().await;
    // The flush after it is due at once (nothing was applied for a while before it).
    let deadline = Instant::now() + WAIT;
    while admin
        .query_opt(
            "SELECT 1 FROM pg_stat_activity
              WHERE application_name = 'usersync' AND wait_event = 'SyncRep'",
            &[],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "usersync never flushed the target's WAL"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for n in 0..20 {
        pair.source
            .batch_execute(&format!(
                "INSERT INTO users (email) VALUES ('later{n}@example.com')"
            ))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair
        .target
        .query_opt(
            "SELECT 1 FROM neon_auth.users_sync WHERE email = 'later19@example.com'",
            &[],
        )
        .await
        .unwrap()
        .is_none()
    {
        if Instant::now() > deadline {
            set_system(&admin, "RESET synchronous_standby_names").await;
            running.stop().await;
            panic!("users waited for the flush before them to reach the target");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let later = pair.checkpoint_end().await;
    let confirmed_past = slot_confirmed_at(&pair, &first).await;

    set_system(&admin, "RESET synchronous_standby_names").await;
    pair.wait_for_slot_confirmed(&later, false, "the slot was never confirmed once durable")
        .await;
    pair.wait_for_match().await;
    running.stop().await;
    assert!(
        !confirmed_past,
        "the slot was confirmed past {first} while its flush still waited"
    );
}

/// Starts the replicator; once a first user is on the target, made durable and confirmed,
/// every synchronous commit on `target_server` waits for a standby that is missing. Returns
/// the running replicator and a superuser connection to the target server.
async fn start_then_lose_the_standby(
    pair: &Pair,
    target_server: &LocalPg,
) -> (Running, tokio_postgres::Client) {
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('before@example.com')")
        .await
        .unwrap();
    wait_for_user(pair, "before@example.com").await;
    let before = pair.checkpoint_end().await;
    pair.wait_for_slot_confirmed(&before, false, "the first user was never confirmed")
        .await;
    let admin = sql(target_server, "postgres").await;
    set_system(&admin, "SET synchronous_standby_names = 'nobody'").await;
    (running, admin)
}

/// Whether the slot is confirmed at `lsn` or past it, now.
async fn slot_confirmed_at(pair: &Pair, lsn: &str) -> bool {
    pair.source
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots
              WHERE slot_name = $1",
            &[&pair.config.slot, &lsn],
        )
        .await
        .unwrap()
        .get(0)
}

/// `ALTER SYSTEM {setting}`, in effect once this returns.
async fn set_system(admin: &tokio_postgres::Client, setting: &str) {
    admin
        .batch_execute(&format!("ALTER SYSTEM {setting}"))
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}
