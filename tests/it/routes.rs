//! Fan-out (`--routes`): one slot feeding a target per tenancy. Each target must hold exactly
//! its tenancies' users, every change applied once, across kill -9 of the service; a route
//! added later is copied in a snapshot of its own and then streamed, with nothing lost or
//! doubled at the seam.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::harness::*;

/// A users table whose rows carry their tenancy; the tenancy is in the replica identity
/// (FULL), as routing needs.
const TENANT_USERS: &str = "
CREATE TABLE public.users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant       text,
    email        text,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    version      int NOT NULL DEFAULT 1,
    metadata     jsonb NOT NULL DEFAULT '{}'
);
ALTER TABLE public.users REPLICA IDENTITY FULL";

/// A route of the test: its name, the tenancies it takes (none: the default) and its
/// target database.
struct TestRoute {
    name: &'static str,
    tenants: Vec<&'static str>,
    dbname: String,
    /// The superuser's URL of its target database.
    url: String,
    client: Client,
}

struct FanOut {
    pair: Pair,
    routes: Vec<TestRoute>,
    dir: std::path::PathBuf,
}

impl FanOut {
    async fn new(routes: &[(&'static str, &[&'static str])]) -> FanOut {
        let pair = Pair::on_as_superuser(shared_server(), TENANT_USERS).await;
        let mut made = Vec::new();
        for (name, tenants) in routes {
            made.push(Self::route(&pair, name, tenants).await);
        }
        let dir = std::env::temp_dir().join(unique("routes"));
        std::fs::create_dir_all(&dir).unwrap();
        FanOut {
            pair,
            routes: made,
            dir,
        }
    }

    async fn route(pair: &Pair, name: &'static str, tenants: &[&'static str]) -> TestRoute {
        Self::route_on(pair, pair.target_server, name, tenants).await
    }

    /// A route whose target database is on `server`.
    async fn route_on(
        pair: &Pair,
        server: &usersync::localpg::LocalPg,
        name: &'static str,
        tenants: &[&'static str],
    ) -> TestRoute {
        let dbname = format!("{}_{name}", pair.config.target.dbname);
        create_database(server, &dbname).await;
        TestRoute {
            name,
            tenants: tenants.to_vec(),
            url: server.superuser_url(&dbname),
            client: sql(server, &dbname).await,
            dbname,
        }
    }

    /// Writes the routes file (mode 0600: it names the targets' URLs) and returns its path.
    fn routes_file(&self) -> std::path::PathBuf {
        let mut text = String::from("route_by = \"tenant\"\n");
        for route in &self.routes {
            let url = &route.url;
            text.push_str(&format!("\n[[route]]\nname = \"{}\"\n", route.name));
            if route.tenants.is_empty() {
                text.push_str("default = true\n");
            } else {
                let values: Vec<String> =
                    route.tenants.iter().map(|t| format!("\"{t}\"")).collect();
                text.push_str(&format!("values = [{}]\n", values.join(", ")));
            }
            let url_file = self.dir.join(format!("{}.url", route.name));
            std::fs::write(&url_file, url).unwrap();
            std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
            text.push_str(&format!("target_file = \"{}\"\n", url_file.display()));
        }
        let path = self.dir.join("routes.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// The binary with the source and the routes file, and no --target.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = self.pair.command(args);
        command
            .env_remove("USERSYNC_TARGET_URL")
            .env("USERSYNC_ROUTES_FILE", self.routes_file());
        command
    }

    fn usersync(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run usersync")
    }

    /// Source users of the route's tenancies as (id, email, version); the default route
    /// takes every tenancy no other route names.
    async fn expected(&self, route: &TestRoute) -> Vec<(String, Option<String>, i32)> {
        let named: Vec<String> = self
            .routes
            .iter()
            .flat_map(|r| r.tenants.iter().map(|t| t.to_string()))
            .collect();
        let (sql, values) = if route.tenants.is_empty() {
            ("(tenant IS NULL OR NOT (tenant = ANY($1)))", named)
        } else {
            (
                "tenant = ANY($1)",
                route.tenants.iter().map(|t| t.to_string()).collect(),
            )
        };
        self.pair
            .source
            .query(
                &format!(
                    "SELECT id::text, email, version FROM public.users WHERE {sql} ORDER BY id::text"
                ),
                &[&values],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Waits until every route's target holds exactly its share of the source, live.
    async fn wait_for_match(&self) {
        self.wait_for_match_of(&[]).await
    }

    /// [`FanOut::wait_for_match`] but for the routes named in `except`.
    async fn wait_for_match_of(&self, except: &[&str]) {
        if let Err(differ) = self.matched_within(except).await {
            panic!(
                "targets did not match their tenancies within {WAIT:?} (route: source rows, \
                 target rows): {differ:?}"
            );
        }
    }

    /// Waits until every route's target but those in `except` holds exactly its share of
    /// the source, live; else the routes that differ (source rows, target rows).
    async fn matched_within(
        &self,
        except: &[&str],
    ) -> Result<(), BTreeMap<&'static str, (usize, usize)>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut differ = BTreeMap::new();
            for route in self.routes.iter().filter(|r| !except.contains(&r.name)) {
                let expected = self.expected(route).await;
                let actual = live_users(&route.client).await;
                if expected != actual {
                    differ.insert(route.name, (expected.len(), actual.len()));
                }
            }
            if differ.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(differ);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn live_users(target: &Client) -> Vec<(String, Option<String>, i32)> {
    target
        .query(
            "SELECT id, email, (raw_json ->> 'version')::int FROM neon_auth.users_sync
              WHERE deleted_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Inserts, updates (some moving a user to another tenancy) and deletes across tenancies
/// until stopped; returns how many statements it ran.
fn spawn_load(
    client: Client,
    tenants: &'static [&'static str],
    writing: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut n = 0u32;
        while writing.load(Ordering::Relaxed) {
            n += 1;
            let tenant = tenants[n as usize % tenants.len()];
            let sql = match n % 25 {
                0 => "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY version LIMIT 1)"
                    .to_owned(),
                // A user moves to another tenancy: gone from one target, new on another.
                7 => format!(
                    "UPDATE users SET tenant = '{tenant}', version = version + 1
                      WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)"
                ),
                k if k % 3 == 0 => format!(
                    "INSERT INTO users (tenant, email) VALUES ('{tenant}', 'u{n}@{tenant}.example')"
                ),
                _ => "UPDATE users SET version = version + 1
                       WHERE id IN (SELECT id FROM users ORDER BY random() LIMIT 3)"
                    .to_owned(),
            };
            client.batch_execute(&sql).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        n
    })
}

const TENANTS: &[&str] = &["acme", "globex", "initech", "umbrella"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_feeds_each_target_its_tenancies_exactly_once_across_kill_9() {
    let fan_out = FanOut::new(&[
        ("acme", &["acme"]),
        ("globex", &["globex", "umbrella"]),
        ("rest", &[]),
    ])
    .await;
    let source = &fan_out.pair.source;
    source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','globex','initech','umbrella'])[1 + i % 4], 'pre' || i || '@example.com'
               FROM generate_series(1, 200) AS i;
             -- No tenancy at all: the default route's, in the copy as in the stream.
             INSERT INTO users (tenant, email) VALUES (NULL, 'orphan1@example.com'), (NULL, 'orphan2@example.com')",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    let said = text(&setup);
    assert!(said.contains("route acme"), "{said}");
    fan_out.wait_for_match().await;
    for route in &fan_out.routes {
        install_write_log(&route.client).await;
        let key: String = route
            .client
            .query_one("SELECT slot_name FROM usersync.state", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(key, format!("{}:{}", fan_out.pair.config.slot, route.name));
    }

    // One target much slower than the others: the slot must wait for it, never confirming
    // what only the fast ones hold (a restart would find it past this route's checkpoint).
    fan_out.routes[2]
        .client
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON neon_auth.users_sync
               FOR EACH STATEMENT EXECUTE FUNCTION slow();",
        )
        .await
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = spawn_load(
        sql(fan_out.pair.server, &fan_out.pair.config.source.dbname).await,
        TENANTS,
        Arc::clone(&writing),
    );
    for kill in 0..4u64 {
        let mut child = fan_out
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(900 + 300 * kill)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    writing.store(false, Ordering::Relaxed);
    let statements = writer.await.unwrap();
    assert!(
        statements > 100,
        "the load ran only {statements} statements"
    );

    let mut child = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    fan_out.wait_for_match().await;
    // The slot moves on to what every route holds: wait for it to pass the end of the load.
    let end = fan_out.pair.source_wal_lsn().await;
    fan_out
        .pair
        .wait_for_slot_confirmed(&end, false, "the slot never reached the end of the load")
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    for route in &fan_out.routes {
        assert_write_log_ordered(&route.client).await;
        assert!(
            soft_deleted_users(&route.client).await > 0,
            "route {}: users deleted or moved away must stay soft-deleted",
            route.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_added_later_is_copied_then_streamed_without_a_gap() {
    let mut fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    let source = &fan_out.pair.source;
    source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','globex','initech'])[1 + i % 3], 'pre' || i || '@example.com'
               FROM generate_series(1, 90) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));

    // Streaming, with changes to the tenancy no route takes yet.
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    source
        .batch_execute("UPDATE users SET version = version + 1 WHERE tenant = 'initech'")
        .await
        .unwrap();
    fan_out.wait_for_match().await;

    fan_out
        .routes
        .push(FanOut::route(&fan_out.pair, "initech", &["initech"]).await);
    // The write log sees the copy's rows too: a change before the copy applied again on top
    // of it would write a version twice.
    let new_target = &fan_out.routes[2].client;
    new_target
        .batch_execute(include_str!("../../sql/users_sync.sql"))
        .await
        .unwrap();
    install_write_log(new_target).await;
    // While run streams from the slot, the new route cannot be copied: run would move the
    // slot past its copy without feeding it.
    wait_until_streaming(&fan_out.pair).await;
    let refused = fan_out.usersync(&["setup"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("is in use"), "{}", text(&refused));
    run.kill().unwrap();
    run.wait().unwrap();

    // Changes while nothing streams: before the copy, for the old routes and the new one.
    source
        .batch_execute(
            "UPDATE users SET version = version + 1;
             DELETE FROM users WHERE id IN (SELECT id FROM users WHERE tenant = 'initech' LIMIT 3)",
        )
        .await
        .unwrap();
    let added = fan_out.usersync(&["setup"]);
    assert!(added.status.success(), "setup: {}", text(&added));
    assert!(
        text(&added).contains("temporary replication slot"),
        "{}",
        text(&added)
    );
    // And after the copy, before run: the new route must get these, once.
    source
        .batch_execute("UPDATE users SET version = version + 1 WHERE tenant = 'initech'")
        .await
        .unwrap();
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    fan_out.wait_for_match().await;
    run.kill().unwrap();
    run.wait().unwrap();
    assert_write_log_ordered(&fan_out.routes[2].client).await;
}

/// Stops a server off the async runtime (pg_ctl blocks for a second or so).
async fn stop_server(server: usersync::localpg::LocalPg) -> usersync::localpg::LocalPg {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.stop().expect("stop the target server");
        server
    })
    .await
    .unwrap()
}

async fn start_again(server: usersync::localpg::LocalPg) -> usersync::localpg::LocalPg {
    tokio::task::spawn_blocking(move || {
        server
            .restart(usersync::localpg::StopMode::Fast)
            .expect("start the target server again");
        server
    })
    .await
    .unwrap()
}

/// A fan-out with route acme on a server of its own, which the test stops; the others on
/// the shared server. Users of every tenancy are copied by setup.
async fn fan_out_with_own_server() -> (FanOut, usersync::localpg::LocalPg) {
    let own = start_target_server(vec![]);
    let mut fan_out = FanOut::new(&[("globex", &["globex"]), ("rest", &[])]).await;
    let acme = FanOut::route_on(&fan_out.pair, &own, "acme", &["acme"]).await;
    fan_out.routes.insert(0, acme);
    fan_out
        .pair
        .source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','globex','initech'])[1 + i % 3], 'pre' || i || '@example.com'
               FROM generate_series(1, 90) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    fan_out.wait_for_match().await;
    for route in &fan_out.routes {
        install_write_log(&route.client).await;
    }
    (fan_out, own)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_holds_back_only_the_slot_and_catches_up_once() {
    let (mut fan_out, own) = fan_out_with_own_server().await;
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = spawn_load(
        sql(fan_out.pair.server, &fan_out.pair.config.source.dbname).await,
        &["acme", "globex", "initech"],
        Arc::clone(&writing),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let own = stop_server(own).await;
    // Down: the others go on. A marker per live route, then they must match the source.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fan_out.wait_for_match_of(&["acme"]).await;
    let own = start_again(own).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    // Back: it catches up from its own checkpoint, the slot having waited for it.
    fan_out.routes[0].client = sql(&own, &fan_out.routes[0].dbname).await;
    fan_out.wait_for_match().await;
    run.kill().unwrap();
    run.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("route=\"acme\""), "{said}");
    assert!(said.contains("answers again"), "{said}");
    for route in &fan_out.routes {
        assert_write_log_ordered(&route.client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_down_past_evict_after_stops_holding_the_slot() {
    let (mut fan_out, own) = fan_out_with_own_server().await;
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run", "--evict-after", "1s"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let own = stop_server(own).await;
    fan_out
        .pair
        .source
        .batch_execute("UPDATE users SET version = version + 1")
        .await
        .unwrap();
    fan_out.wait_for_match_of(&["acme"]).await;
    // Evicted: the slot moves on past what acme holds.
    let end = fan_out.pair.source_wal_lsn().await;
    fan_out
        .pair
        .wait_for_slot_confirmed(&end, false, "the slot still waits for the evicted route")
        .await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("evicted"), "{said}");
    // Back, it stays out (it needs a resync), and the others go on.
    let own = start_again(own).await;
    fan_out.routes[0].client = sql(&own, &fan_out.routes[0].dbname).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    fan_out
        .pair
        .source
        .batch_execute("UPDATE users SET version = version + 1 WHERE tenant = 'globex'")
        .await
        .unwrap();
    fan_out.wait_for_match_of(&["acme"]).await;
    assert!(run.try_wait().unwrap().is_none(), "run ended");
    run.kill().unwrap();
    run.wait().unwrap();
    // A new process finds acme's checkpoint behind the slot: still out, the others go on.
    let log = fan_out.dir.join("run2.log");
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    fan_out
        .pair
        .source
        .batch_execute("UPDATE users SET version = version + 1")
        .await
        .unwrap();
    fan_out.wait_for_match_of(&["acme"]).await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("cannot resume"), "{said}");
    assert!(run.try_wait().unwrap().is_none(), "run ended: {said}");
    // An online resync brings it back while run streams: a new session lets it in at the
    // slot's position, and its copy rebuilds what it missed.
    let resync = fan_out.usersync(&["resync", "--online", "acme"]);
    assert!(
        resync.status.success(),
        "resync --online: {}",
        text(&resync)
    );
    wait_for_log(&log, "the route's users are copied").await;
    matched_or_log(&fan_out, &log).await;
    assert!(run.try_wait().unwrap().is_none(), "run ended");
    run.kill().unwrap();
    run.wait().unwrap();
}

/// `resync --online` of one route while run streams under load: its target, tampered with
/// (users hard-deleted, changed, one that the source never had), ends equal to its share of
/// the source; the other routes are not touched, nor is the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_online_repairs_one_route_while_run_streams() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    fan_out
        .pair
        .source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','globex'])[1 + i % 2], 'pre' || i || '@example.com'
               FROM generate_series(1, 6000) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    install_write_log(&fan_out.routes[1].client).await;
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = spawn_load(
        sql(fan_out.pair.server, &fan_out.pair.config.source.dbname).await,
        &["acme", "globex"],
        Arc::clone(&writing),
    );
    fan_out.wait_for_match().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acme = &fan_out.routes[0].client;
    acme.batch_execute(
        "DELETE FROM neon_auth.users_sync WHERE id IN
           (SELECT id FROM neon_auth.users_sync ORDER BY id LIMIT 50);
         UPDATE neon_auth.users_sync SET raw_json = raw_json || '{\"email\": \"wrong@example.com\"}'
          WHERE id IN (SELECT id FROM neon_auth.users_sync ORDER BY id DESC LIMIT 50);
         INSERT INTO neon_auth.users_sync (raw_json)
         VALUES ('{\"id\": \"stranger\", \"email\": \"s@example.com\", \"version\": 1,
                   \"signed_up_at_millis\": 0}')",
    )
    .await
    .unwrap();
    let resync = fan_out.usersync(&["resync", "--online", "acme"]);
    assert!(
        resync.status.success(),
        "resync --online: {}",
        text(&resync)
    );
    wait_for_log(&log, "the route's users are copied").await;
    writing.store(false, Ordering::Relaxed);
    let statements = writer.await.unwrap();
    assert!(
        statements > 100,
        "the load ran only {statements} statements"
    );
    matched_or_log(&fan_out, &log).await;
    let stranger: Option<bool> = acme
        .query_opt(
            "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE id = 'stranger'",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get(0));
    assert_eq!(
        stranger,
        Some(true),
        "a user the source never had is soft-deleted"
    );
    assert!(run.try_wait().unwrap().is_none(), "run ended");
    run.kill().unwrap();
    run.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("new session"), "{said}");
    // The other route saw nothing again.
    assert_write_log_ordered(&fan_out.routes[1].client).await;
    let copying: bool = acme
        .query_one(
            "SELECT copy_started_at IS NOT NULL FROM usersync.state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!copying, "the resync's mark stays");
    // Without --routes, or naming no route, it refuses.
    let unknown = fan_out.usersync(&["resync", "--online", "nobody"]);
    assert_eq!(unknown.status.code(), Some(78), "{}", text(&unknown));
    let single = fan_out
        .pair
        .command(&["resync", "--online", "acme"])
        .output()
        .unwrap();
    assert_eq!(single.status.code(), Some(2), "{}", text(&single));
}

/// `--evict-after-wal`: a route down while the source writes more WAL than that stops holding
/// the slot, however short the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_down_past_evict_after_wal_stops_holding_the_slot() {
    let (fan_out, own) = fan_out_with_own_server().await;
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run", "--evict-after-wal", "1MB"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_log(&log, "streaming").await;
    let _own = stop_server(own).await;
    // Within the limit: the slot still waits.
    fan_out
        .pair
        .source
        .batch_execute("UPDATE users SET version = version + 1")
        .await
        .unwrap();
    fan_out.wait_for_match_of(&["acme"]).await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("the route is evicted"), "{said}");
    // Two megabytes of WAL past it.
    fan_out
        .pair
        .source
        .batch_execute("SELECT pg_logical_emit_message(true, 'filler', repeat('x', 2000000))")
        .await
        .unwrap();
    let end = fan_out.pair.source_wal_lsn().await;
    fan_out
        .pair
        .wait_for_slot_confirmed(&end, false, "the slot still waits for the route")
        .await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("past --evict-after-wal"), "{said}");
    assert!(run.try_wait().unwrap().is_none(), "run ended");
    run.kill().unwrap();
    run.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_too_slow_is_left_behind_and_rejoins_later() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    let slow = &fan_out.routes[0].client;
    install_write_log(slow).await;
    install_write_log(&fan_out.routes[1].client).await;
    slow.batch_execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON neon_auth.users_sync
           FOR EACH STATEMENT EXECUTE FUNCTION slow();",
    )
    .await
    .unwrap();
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run", "--lag-target", "400ms"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Many small transactions for both tenancies, faster than acme's target takes them (a
    // second per batch): its feed fills while globex's does not.
    // Rounds until acme is left behind: how soon its feed fills depends on the machine.
    let source = &fan_out.pair.source;
    let mut round = 0;
    // Until a deadline, not a count of rounds: on a fast machine 40 rounds are written
    // before the reader has waited its 200 ms for room.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut script = String::new();
        for i in 0..1000 {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            script.push_str(&format!(
                "BEGIN; INSERT INTO users (tenant, email) VALUES ('{tenant}', 'u{round}_{i}@example.com'); COMMIT;"
            ));
        }
        source.batch_execute(&script).await.unwrap();
        round += 1;
        let said = std::fs::read_to_string(&log).unwrap();
        if said.contains("cannot keep up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acme was never left behind: {said}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // globex keeps up while acme cannot.
    fan_out.wait_for_match_of(&["acme"]).await;
    slow.batch_execute("DROP TRIGGER slow ON neon_auth.users_sync")
        .await
        .unwrap();
    fan_out.wait_for_match().await;
    run.kill().unwrap();
    run.wait().unwrap();
    for route in &fan_out.routes {
        assert_write_log_ordered(&route.client).await;
    }
}

/// Routes of the scale test: 40 on one target server, 10 on another that is stopped a while.
const SCALE_ROUTES: usize = 50;
const STOPPED_ROUTES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_routes_one_server_stopped_each_target_its_slice_exactly_once() {
    let connections = || vec![("max_connections".to_owned(), "200".to_owned())];
    let steady = start_target_server(connections());
    let stopped = start_target_server(connections());
    let mut fan_out = FanOut::new(&[]).await;
    let tenants: &'static [&'static str] = Box::leak(
        (0..SCALE_ROUTES)
            .map(|i| &*Box::leak(format!("t{i:02}").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    let names: &'static [&'static str] = Box::leak(
        (0..SCALE_ROUTES)
            .map(|i| &*Box::leak(format!("r{i:02}").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    for i in 0..SCALE_ROUTES {
        let server = if i < STOPPED_ROUTES {
            &stopped
        } else {
            &steady
        };
        let route = FanOut::route_on(&fan_out.pair, server, names[i], &tenants[i..=i]).await;
        fan_out.routes.push(route);
    }
    fan_out
        .pair
        .source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT 't' || lpad((i % 50)::text, 2, '0'), 'pre' || i || '@example.com'
               FROM generate_series(1, 2000) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    fan_out.wait_for_match().await;
    for route in &fan_out.routes {
        install_write_log(&route.client).await;
    }
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = spawn_load(
        sql(fan_out.pair.server, &fan_out.pair.config.source.dbname).await,
        tenants,
        Arc::clone(&writing),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = stop_server(stopped).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The 40 routes on the other server keep up while 10 are down.
    let down: Vec<&str> = names[..STOPPED_ROUTES].to_vec();
    fan_out.wait_for_match_of(&down).await;
    let stopped = start_again(stopped).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.store(false, Ordering::Relaxed);
    let statements = writer.await.unwrap();
    assert!(
        statements > 100,
        "the load ran only {statements} statements"
    );
    for route in fan_out.routes.iter_mut().take(STOPPED_ROUTES) {
        route.client = sql(&stopped, &route.dbname).await;
    }
    fan_out.wait_for_match().await;
    run.kill().unwrap();
    run.wait().unwrap();
    for route in &fan_out.routes {
        assert_write_log_ordered(&route.client).await;
    }
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("answers again"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_moving_tenancy_arrives_whole_with_its_large_values() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    let source = &fan_out.pair.source;
    // Metadata large and incompressible enough to be stored out of line (TOAST): an update
    // that leaves it alone does not send it.
    source
        .batch_execute(
            "INSERT INTO users (tenant, email, metadata)
             SELECT 'acme', 'big@example.com',
                    jsonb_build_object('blob', string_agg(md5(i::text), ''))
               FROM generate_series(1, 400) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    source
        .batch_execute("UPDATE users SET tenant = 'globex', version = version + 1")
        .await
        .unwrap();
    fan_out.wait_for_match().await;
    let blob_length: Option<i32> = fan_out.routes[1]
        .client
        .query_one(
            "SELECT length(raw_json -> 'metadata' ->> 'blob') FROM neon_auth.users_sync",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        blob_length,
        Some(400 * 32),
        "the moved user lost its large value"
    );
    let gone: bool = fan_out.routes[0]
        .client
        .query_one(
            "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone, "the user must be soft-deleted on the route it left");
    run.kill().unwrap();
    run.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_without_routes_refuse_a_routes_target() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    fan_out
        .pair
        .source
        .batch_execute("INSERT INTO users (tenant, email) VALUES ('globex', 'g@example.com')")
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    // The acme route's target as if it were the only one: setup would copy every tenancy
    // into it, teardown would drop the slot every route needs.
    for args in [
        &["setup"][..],
        &["teardown", "--yes"],
        &["status"],
        &["resync"],
        &["replay"],
    ] {
        let output = fan_out
            .pair
            .command(args)
            .env("USERSYNC_TARGET_URL", &fan_out.routes[0].url)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}: {}", text(&output));
        assert!(
            text(&output).contains("is route acme of a fan-out"),
            "{args:?}: {}",
            text(&output)
        );
    }
    let slot_exists: bool = fan_out
        .pair
        .source
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)",
            &[&fan_out.pair.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(slot_exists, "the fan-out's slot was dropped");
    assert!(live_users(&fan_out.routes[0].client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_each_route_and_the_worst_verdict() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    fan_out
        .pair
        .source
        .batch_execute("INSERT INTO users (tenant, email) VALUES ('acme', 'a@example.com')")
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    let status = fan_out.usersync(&["status"]);
    let said = text(&status);
    assert!(said.contains("== route acme"), "{said}");
    assert!(said.contains("== route globex"), "{said}");
    let json = fan_out.usersync(&["status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON object");
    let routes = report["routes"].as_array().expect("routes");
    assert_eq!(routes.len(), 2, "{report}");
    assert_eq!(routes[0]["route"], "acme");
    assert_eq!(routes[0]["report"]["target"]["users_live"], 1, "{report}");
    // A route whose checkpoint is gone is copied online by run: lagging until then, and so
    // is the verdict.
    fan_out.routes[1]
        .client
        .batch_execute("DELETE FROM usersync.state")
        .await
        .unwrap();
    let lagging = fan_out.usersync(&["status", "--json"]);
    assert_eq!(lagging.status.code(), Some(3), "{}", text(&lagging));
    let report: serde_json::Value = serde_json::from_slice(&lagging.stdout).unwrap();
    assert_eq!(report["verdict"], "lagging");
    assert!(
        report["routes"][1]["report"]["problems"]
            .to_string()
            .contains("copies it online"),
        "{report}"
    );
    assert_eq!(
        report["routes"][0]["report"]["verdict"], "healthy",
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resync_and_teardown_take_routes() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    let source = &fan_out.pair.source;
    source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','globex'])[1 + i % 2], 'pre' || i || '@example.com'
               FROM generate_series(1, 40) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    source
        .batch_execute("UPDATE users SET version = version + 1 WHERE tenant = 'acme'")
        .await
        .unwrap();
    // replay --dry-run names each change's route; replay applies it to that route.
    let dry = fan_out.usersync(&["replay", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&dry.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 20, "{}", text(&dry));
    assert!(lines.iter().all(|line| line["route"] == "acme"));
    let replay = fan_out.usersync(&["replay"]);
    assert!(replay.status.success(), "{}", text(&replay));
    fan_out.wait_for_match().await;

    // The slot lost, and a user deleted on the source meanwhile: resync copies every route
    // again and soft-deletes what the source no longer has.
    source
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{}');
             DELETE FROM users WHERE email IN ('pre1@example.com', 'pre2@example.com')",
            fan_out.pair.config.slot
        ))
        .await
        .unwrap();
    let refused = fan_out.usersync(&["setup"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("resync --routes"),
        "{}",
        text(&refused)
    );
    let resync = fan_out.usersync(&["resync"]);
    assert!(resync.status.success(), "resync: {}", text(&resync));
    assert!(text(&resync).contains("route acme:"), "{}", text(&resync));
    fan_out.wait_for_match().await;
    for route in &fan_out.routes {
        assert_eq!(soft_deleted_users(&route.client).await, 1, "{}", route.name);
    }

    // teardown drops the slot and every route's checkpoint.
    let teardown = fan_out.usersync(&["teardown", "--yes"]);
    assert!(teardown.status.success(), "teardown: {}", text(&teardown));
    for route in &fan_out.routes {
        let left = checkpoint_rows(&route.client).await;
        assert_eq!(left, 0, "route {} keeps a checkpoint", route.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_added_on_sighup_is_copied_while_the_others_stream() {
    let mut fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    // The new tenancy has several chunks' worth of users, changed by the load while its
    // copy reads them.
    fan_out
        .pair
        .source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','globex','initech','initech'])[1 + i % 4], 'pre' || i || '@example.com'
               FROM generate_series(1, 8000) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    for route in &fan_out.routes {
        install_write_log(&route.client).await;
    }
    let log = fan_out.dir.join("run.log");
    let mut run = fan_out
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = spawn_load(
        sql(fan_out.pair.server, &fan_out.pair.config.source.dbname).await,
        &["acme", "globex", "initech"],
        Arc::clone(&writing),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    // A new tenancy's route, written into the file run reads, then SIGHUP. Its write log
    // sees the copy's rows too: a change applied again on top of the copy would show.
    fan_out
        .routes
        .push(FanOut::route(&fan_out.pair, "initech", &["initech"]).await);
    let new_target = &fan_out.routes[2].client;
    new_target
        .batch_execute(include_str!("../../sql/users_sync.sql"))
        .await
        .unwrap();
    install_write_log(new_target).await;
    fan_out.routes_file();
    let hup = Command::new("kill")
        .args(["-HUP", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for_log(&log, "the route's users are copied").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.store(false, Ordering::Relaxed);
    let statements = writer.await.unwrap();
    assert!(
        statements > 100,
        "the load ran only {statements} statements"
    );
    matched_or_log(&fan_out, &log).await;
    assert!(run.try_wait().unwrap().is_none(), "run ended");
    run.kill().unwrap();
    run.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("route added from the routes file"), "{said}");
    assert!(said.contains("the new route joins the stream"), "{said}");
    // Online: no temporary slot, no new session for the others.
    assert!(!said.contains("new session"), "{said}");
    assert!(!said.contains("temporary"), "{said}");
    for route in &fan_out.routes {
        assert_write_log_ordered(&route.client).await;
    }
    let copying: bool = new_target
        .query_one(
            "SELECT copy_started_at IS NOT NULL FROM usersync.state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!copying, "the copy's mark stays");
}

/// A route new in the routes file when run starts joins at once and is copied online;
/// kill -9 in the middle of its copy leaves it marked as copying, and the next run copies
/// it again from the start: every target ends with its share, the new one never holding
/// a user older than it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_midway_starts_again_and_loses_nothing() {
    let mut fan_out = FanOut::new(&[("acme", &["acme"])]).await;
    fan_out
        .pair
        .source
        .batch_execute(
            "INSERT INTO users (tenant, email)
             SELECT (ARRAY['acme','initech','initech','initech'])[1 + i % 4], 'pre' || i || '@example.com'
               FROM generate_series(1, 40000) AS i",
        )
        .await
        .unwrap();
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    install_write_log(&fan_out.routes[0].client).await;
    fan_out
        .routes
        .push(FanOut::route(&fan_out.pair, "initech", &["initech"]).await);
    let new_target = &fan_out.routes[1].client;
    new_target
        .batch_execute(include_str!("../../sql/users_sync.sql"))
        .await
        .unwrap();
    install_write_log(new_target).await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = spawn_load(
        sql(fan_out.pair.server, &fan_out.pair.config.source.dbname).await,
        &["acme", "initech"],
        Arc::clone(&writing),
    );
    let log = fan_out.dir.join("run.log");
    let spawn = || {
        fan_out
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut run = spawn();
    wait_for_log(&log, "the new route joins the stream").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        !said.contains("the route's users are copied"),
        "the copy was done before the kill: {said}"
    );
    let copying: bool = new_target
        .query_one(
            "SELECT copy_started_at IS NOT NULL FROM usersync.state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(copying, "a copy cut short must stay marked");
    let mut run = spawn();
    wait_for_log(&log, "the route's users are copied").await;
    writing.store(false, Ordering::Relaxed);
    let statements = writer.await.unwrap();
    assert!(
        statements > 100,
        "the load ran only {statements} statements"
    );
    matched_or_log(&fan_out, &log).await;
    run.kill().unwrap();
    run.wait().unwrap();
    assert_write_log_ordered(&fan_out.routes[0].client).await;
    // A copy started again writes again what the first attempt wrote: never older.
    let older: i64 = new_target
        .query_one(
            "SELECT count(*) FROM (
                SELECT version, lag(version) OVER (PARTITION BY id ORDER BY seq) AS previous
                  FROM write_log) w
              WHERE version < previous",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(older, 0, "a user went back to an older version");
    let copying: bool = new_target
        .query_one(
            "SELECT copy_started_at IS NOT NULL FROM usersync.state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!copying, "the copy's mark stays");
}

/// Waits until `log` has a line with `line`.
async fn wait_for_log(log: &std::path::Path, line: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let said = std::fs::read_to_string(log).unwrap_or_default();
        if said.contains(line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {line:?} in the log within {WAIT:?}: {said}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`FanOut::wait_for_match`], showing run's log if it fails.
async fn matched_or_log(fan_out: &FanOut, log: &std::path::Path) {
    if let Err(differ) = fan_out.matched_within(&[]).await {
        panic!(
            "targets did not match their tenancies within {WAIT:?} (route: source rows, target \
             rows): {differ:?}; run's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_standby_takes_over_and_sighup_never_stops_a_single_target() {
    let fan_out = FanOut::new(&[("acme", &["acme"]), ("globex", &["globex"])]).await;
    let setup = fan_out.usersync(&["setup"]);
    assert!(setup.status.success(), "setup: {}", text(&setup));
    let spawn = |name: &str| {
        let log = fan_out.dir.join(name);
        let child = fan_out
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    };
    let (mut active, _) = spawn("active.log");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut standby, standby_log) = spawn("standby.log");
    let source = &fan_out.pair.source;
    source
        .batch_execute("INSERT INTO users (tenant, email) VALUES ('acme', 'a1@example.com'), ('globex', 'g1@example.com')")
        .await
        .unwrap();
    fan_out.wait_for_match().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let said = std::fs::read_to_string(&standby_log).unwrap();
        if said.contains("standby") {
            break;
        }
        assert!(Instant::now() < deadline, "never stood by: {said}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    active.kill().unwrap();
    active.wait().unwrap();
    source
        .batch_execute("INSERT INTO users (tenant, email) VALUES ('acme', 'a2@example.com'), ('globex', 'g2@example.com')")
        .await
        .unwrap();
    fan_out.wait_for_match().await;
    assert!(standby.try_wait().unwrap().is_none(), "the standby ended");
    standby.kill().unwrap();
    standby.wait().unwrap();

    // One target: SIGHUP (a `systemctl reload`) is logged, never a stop.
    let pair = Pair::new().await;
    pair.setup().await;
    let log = fan_out.dir.join("single.log");
    let mut single = pair
        .command(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    Command::new("kill")
        .args(["-HUP", &single.id().to_string()])
        .status()
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('after-hup@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let said = std::fs::read_to_string(&log).unwrap();
        if said.contains("nothing to read again") {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP not logged: {said}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(single.try_wait().unwrap().is_none(), "SIGHUP stopped run");
    single.kill().unwrap();
    single.wait().unwrap();
}

/// Waits until a process streams from the pair's slot.
async fn wait_until_streaming(pair: &Pair) {
    let deadline = Instant::now() + WAIT;
    loop {
        let active: bool = pair
            .source
            .query_one(
                "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)",
                &[&pair.config.slot],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            return;
        }
        assert!(Instant::now() < deadline, "nothing streams from the slot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
