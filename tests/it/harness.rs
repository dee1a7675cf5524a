//! Test harness: shared throwaway PostgreSQL servers, per-test databases, helpers to run
//! usersync in-process or as the real binary, and content comparison.
//!
//! # Server versions
//!
//! The source and the target may run different PostgreSQL versions: [`SOURCE_PG_BIN_ENV`]
//! and [`TARGET_PG_BIN_ENV`] name the directories of their server binaries (default: the
//! machine's, as [`LocalPgOptions::bin_dir`] finds them). While the two are the same, one
//! shared server holds both the source and the target databases, as always; when they
//! differ, each role gets its own shared server. `scripts/compat-matrix.sh` sets them.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use usersync::config::{Config, TableName};
use usersync::localpg::{LocalPg, LocalPgOptions};
use usersync::map::GenericMapping;
use usersync::metrics::Metrics;

/// The password of every test server's superuser; tests grep output for it.
pub const PASSWORD: &str = "s3cret-Test-pw";

/// The users table most tests replicate.
pub const USERS_TABLE: &str = "
CREATE TABLE public.users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email        text,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    version      int NOT NULL DEFAULT 1,
    metadata     jsonb NOT NULL DEFAULT '{}'
)";

/// `neon_auth.users_sync` in an older shape, without `updated_at`.
pub const USERS_SYNC_WITHOUT_UPDATED_AT: &str = "
CREATE SCHEMA neon_auth;
CREATE TABLE neon_auth.users_sync (
  raw_json jsonb NOT NULL,
  id text GENERATED ALWAYS AS (raw_json ->> 'id') STORED NOT NULL PRIMARY KEY,
  name text GENERATED ALWAYS AS (raw_json ->> 'display_name') STORED,
  email text GENERATED ALWAYS AS (raw_json ->> 'primary_email') STORED,
  deleted_at timestamptz)";

/// Takes the right to write logical messages from PUBLIC in one database, in every form the
/// server has (PostgreSQL 17 added a fourth argument, so the signatures differ by version).
pub const REVOKE_EMIT_MESSAGE: &str = "
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname = 'pg_logical_emit_message' LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$";

/// How long a test waits for replication before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Directory of the source servers' binaries (`initdb`, `pg_ctl`, `postgres`).
pub const SOURCE_PG_BIN_ENV: &str = "USERSYNC_TEST_SOURCE_PG_BIN";

/// Directory of the target servers' binaries.
pub const TARGET_PG_BIN_ENV: &str = "USERSYNC_TEST_TARGET_PG_BIN";

/// The bin directory `variable` names; `None` (the machine's default) if unset or empty.
pub fn bin_dir_from_env(variable: &str) -> Option<PathBuf> {
    std::env::var_os(variable)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
}

/// The source's and the target's bin directories differ: they need a server each.
pub fn separate_target_server() -> bool {
    bin_dir_from_env(SOURCE_PG_BIN_ENV) != bin_dir_from_env(TARGET_PG_BIN_ENV)
}

/// Settings of the shared servers: a tiny decoding memory makes every transaction of more
/// than a few rows stream (protocol 2), and a short sender timeout makes idle keepalives
/// frequent.
fn shared_server_conf() -> Vec<(String, String)> {
    vec![
        ("logical_decoding_work_mem".into(), "64kB".into()),
        ("wal_sender_timeout".into(), "4s".into()),
    ]
}

/// The server shared by the tests that don't break their server: the source server, and
/// the target server too unless the target runs other binaries ([`shared_target_server`]).
pub fn shared_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    SERVER.get_or_init(|| start_server(shared_server_conf()))
}

/// The server that holds the target databases of [`Pair::new`]: [`shared_server`], unless
/// [`TARGET_PG_BIN_ENV`] names other binaries than [`SOURCE_PG_BIN_ENV`].
pub fn shared_target_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    if !separate_target_server() {
        return shared_server();
    }
    SERVER.get_or_init(|| {
        start_server_from(bin_dir_from_env(TARGET_PG_BIN_ENV), shared_server_conf())
    })
}

/// A source server of its own (from [`SOURCE_PG_BIN_ENV`]'s binaries) with extra settings.
pub fn start_server(extra_conf: Vec<(String, String)>) -> LocalPg {
    start_server_from(bin_dir_from_env(SOURCE_PG_BIN_ENV), extra_conf)
}

/// Settings under which asynchronous commits stay unflushed for up to ten seconds, as they
/// would be lost by an OS crash or a Neon compute restart: the WAL writer wakes rarely and
/// never flushes for volume, the background writer writes no pages (writing a page flushes
/// the WAL up to it) and no checkpoint comes in a test's time. An immediate stop then loses
/// the unflushed tail too: it is in shared memory, not yet handed to the OS.
pub fn lazy_wal_conf() -> Vec<(String, String)> {
    vec![
        ("wal_writer_delay".into(), "10s".into()),
        ("wal_writer_flush_after".into(), "1GB".into()),
        ("bgwriter_lru_maxpages".into(), "0".into()),
        ("checkpoint_timeout".into(), "1h".into()),
        ("max_wal_size".into(), "10GB".into()),
    ]
}

/// A target server of its own (from [`TARGET_PG_BIN_ENV`]'s binaries) with extra settings.
pub fn start_target_server(extra_conf: Vec<(String, String)>) -> LocalPg {
    start_server_from(bin_dir_from_env(TARGET_PG_BIN_ENV), extra_conf)
}

fn start_server_from(bin_dir: Option<PathBuf>, extra_conf: Vec<(String, String)>) -> LocalPg {
    LocalPg::start(&LocalPgOptions {
        superuser_password: PASSWORD.to_owned(),
        extra_conf,
        bin_dir,
    })
    .expect("start a throwaway PostgreSQL server")
}

/// A unique, valid name per test (databases, slots).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn sql(server: &LocalPg, dbname: &str) -> Client {
    let url = server.url("postgres", PASSWORD, dbname);
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(connection);
    client
}

/// psql as the superuser over the server's Unix socket (trusted), stopping at the first error.
pub fn psql(pg: &LocalPg, dbname: &str, arguments: &[&str]) -> Output {
    // Server-only builds (scripts/fetch-postgres.sh) have no psql: any psql will do.
    let beside_server = pg.bin_dir().join("psql");
    let program = if beside_server.is_file() {
        beside_server
    } else {
        "psql".into()
    };
    Command::new(program)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(pg.socket_dir())
        .args([
            "-p",
            &pg.port().to_string(),
            "-U",
            pg.superuser(),
            "-d",
            dbname,
        ])
        .args(arguments)
        .output()
        .expect("run psql")
}

/// Applies one of the role scripts in `sql/` with psql as the superuser.
pub fn apply_role_script(pg: &LocalPg, dbname: &str, script: &str, variables: &[(&str, &str)]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sql")
        .join(script);
    let mut arguments = Vec::new();
    for (name, value) in variables {
        arguments.push("-v".to_owned());
        arguments.push(format!("{name}={value}"));
    }
    arguments.push("-f".to_owned());
    arguments.push(path.display().to_string());
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let output = psql(pg, dbname, &arguments);
    assert!(output.status.success(), "{script}: {}", text(&output));
}

/// Makes `role` usersync's least-privilege source role for `table` of `dbname` with
/// `sql/source_role.sql`.
fn apply_source_role(pg: &LocalPg, dbname: &str, role: &str, table: &TableName) {
    apply_role_script(
        pg,
        dbname,
        "source_role.sql",
        &[
            ("role", role),
            ("password", PASSWORD),
            ("schema", &table.schema),
            ("table", &table.name),
        ],
    );
}

/// Makes `role` usersync's least-privilege target role in `dbname` with
/// `sql/target_role.sql`.
fn apply_target_role(pg: &LocalPg, dbname: &str, role: &str) {
    apply_role_script(
        pg,
        dbname,
        "target_role.sql",
        &[("role", role), ("password", PASSWORD)],
    );
}

/// Creates an empty database on `pg`.
pub async fn create_database(pg: &LocalPg, dbname: &str) {
    sql(pg, "postgres")
        .await
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .expect("create a test database");
}

/// A source database with the users table and a target database.
pub struct Pair {
    /// The server of the source database.
    pub server: &'static LocalPg,
    /// The server of the target database: `server` itself, except for pairs on the shared
    /// server when the target runs other binaries (see the module docs).
    pub target_server: &'static LocalPg,
    pub config: Config,
    pub source_url: String,
    pub target_url: String,
    pub source: Client,
    pub target: Client,
    /// The role usersync connects to the source as (the superuser for [`Roles::Superuser`]).
    source_role: String,
    /// The role usersync connects to the target as.
    target_role: String,
    roles: Roles,
}

/// Whom usersync connects as in a [`Pair`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Roles {
    /// Roles made by `sql/source_role.sql` and `sql/target_role.sql`, as in production.
    LeastPrivilege,
    /// The servers' superuser, for tests that need what the roles may not do.
    Superuser,
}

impl Pair {
    /// A pair on the shared server; usersync connects as least-privilege roles.
    pub async fn new() -> Pair {
        Self::on(shared_server(), USERS_TABLE).await
    }

    /// A pair on the shared server; usersync connects as the superuser.
    pub async fn as_superuser() -> Pair {
        Self::on_as_superuser(shared_server(), USERS_TABLE).await
    }

    /// A pair whose source is on `server`, with `public.users` made by `table_ddl`;
    /// usersync connects as least-privilege roles.
    pub async fn on(server: &'static LocalPg, table_ddl: &str) -> Pair {
        Self::with(server, table_ddl, "public.users", Roles::LeastPrivilege).await
    }

    /// A pair whose source is on `server`, usersync connecting as the superuser.
    pub async fn on_as_superuser(server: &'static LocalPg, table_ddl: &str) -> Pair {
        Self::with(server, table_ddl, "public.users", Roles::Superuser).await
    }

    /// A pair on the shared server whose users table is `table` (`schema.name`, made by
    /// `table_ddl`), as an identity store other than `public.users` has it; usersync
    /// connects as least-privilege roles.
    pub async fn for_table(table_ddl: &str, table: &str) -> Pair {
        Self::with(shared_server(), table_ddl, table, Roles::LeastPrivilege).await
    }

    /// A pair whose source is on `server`, replicating `table` made by `table_ddl`. Its
    /// target is on the same server, except on the shared server, whose pairs get their
    /// target on [`shared_target_server`].
    ///
    /// With [`Roles::LeastPrivilege`], the role scripts run as the superuser once the table
    /// exists: the source script creates publication `usersync` for `table` as its owner (its
    /// choice A), the target script creates `neon_auth.users_sync`; usersync setup then
    /// finds both. The helper clients `source` and `target` stay superuser either way.
    pub async fn with(
        server: &'static LocalPg,
        table_ddl: &str,
        table: &str,
        roles: Roles,
    ) -> Pair {
        let target_server = if std::ptr::eq(server, shared_server()) {
            shared_target_server()
        } else {
            server
        };
        let table: TableName = table.parse().unwrap();
        let name = unique("t");
        let (source_db, target_db) = (format!("src_{name}"), format!("tgt_{name}"));
        for (dbname, on) in [(&source_db, server), (&target_db, target_server)] {
            create_database(on, dbname).await;
        }
        let source = sql(server, &source_db).await;
        source
            .batch_execute(table_ddl)
            .await
            .expect("create the users table");
        let target = sql(target_server, &target_db).await;
        let (source_role, target_role) = match roles {
            Roles::Superuser => (
                server.superuser().to_owned(),
                target_server.superuser().to_owned(),
            ),
            Roles::LeastPrivilege => {
                let (source_role, target_role) = (source_db.clone(), target_db.clone());
                apply_source_role(server, &source_db, &source_role, &table);
                apply_target_role(target_server, &target_db, &target_role);
                (source_role, target_role)
            }
        };
        let source_url = server.url(&source_role, PASSWORD, &source_db);
        let target_url = target_server.url(&target_role, PASSWORD, &target_db);
        let config = Config {
            source: source_url.parse().unwrap(),
            target: target_url.parse().unwrap(),
            table,
            slot: format!("slot_{name}"),
            publication: "usersync".into(),
            mapping: GenericMapping::default().into(),
            lag_target: Duration::from_secs(1),
            heartbeat_interval: Some(usersync::config::DEFAULT_HEARTBEAT_INTERVAL),
            source_timeout: usersync::config::DEFAULT_SOURCE_TIMEOUT,
            spill_threshold: usersync::decode::DEFAULT_MEMORY_LIMIT,
            routes: None,
            routes_file: None,
            route: None,
            evict_after: None,
            evict_after_wal: None,
        };
        Pair {
            server,
            target_server,
            config,
            source_url,
            target_url,
            source,
            target,
            source_role,
            target_role,
            roles,
        }
    }

    /// Lets usersync's source role read another table of the source database, as the
    /// operator would: the source role script again, for that table (the publication
    /// exists by now, so the script only grants). Nothing to do for a superuser pair.
    pub fn grant_source_table(&self, table: &TableName) {
        if self.roles == Roles::LeastPrivilege {
            apply_source_role(
                self.server,
                &self.config.source.dbname,
                &self.source_role,
                table,
            );
        }
    }

    /// Lets usersync's source role read what `profile` (a `--profile` name) reads besides
    /// the users table, as the operator would: the source role script again, with
    /// `-v profile=...`. Nothing to do for a superuser pair.
    pub fn grant_source_profile(&self, profile: &str) {
        if self.roles == Roles::LeastPrivilege {
            let table = &self.config.table;
            apply_role_script(
                self.server,
                &self.config.source.dbname,
                "source_role.sql",
                &[
                    ("role", &self.source_role),
                    ("password", PASSWORD),
                    ("schema", &table.schema),
                    ("table", &table.name),
                    ("profile", profile),
                ],
            );
        }
    }

    /// The role usersync connects to the target as.
    pub fn target_role(&self) -> &str {
        &self.target_role
    }

    /// Lets usersync's target role hard-delete users for `purge`, as docs/deployment.md tells
    /// operators: the target role script again, with `-v purge=on`. Nothing to do for a
    /// superuser pair.
    pub fn grant_purge(&self) {
        if self.roles == Roles::LeastPrivilege {
            apply_role_script(
                self.target_server,
                &self.config.target.dbname,
                "target_role.sql",
                &[
                    ("role", &self.target_role),
                    ("password", PASSWORD),
                    ("purge", "on"),
                ],
            );
        }
    }

    /// Puts the pair's target database on another server (a new, empty one there), with
    /// the target role script applied to it as on the first.
    pub async fn move_target(&mut self, server: &'static LocalPg) {
        let dbname = format!("moved_{}", self.config.target.dbname);
        create_database(server, &dbname).await;
        self.retarget(server, &dbname).await;
    }

    /// Makes the source database the target as well, as on a Neon branch whose Neon Auth
    /// keeps its users next to `neon_auth.users_sync`: the target role script is applied to
    /// the source database, and usersync's target URL names it.
    pub async fn target_the_source_database(&mut self) {
        let dbname = self.config.source.dbname.clone();
        self.retarget(self.server, &dbname).await;
    }

    /// Points usersync's target (and the `target` client) at `dbname` on `server`, with the
    /// target role script applied there.
    async fn retarget(&mut self, server: &'static LocalPg, dbname: &str) {
        if self.roles == Roles::LeastPrivilege {
            apply_target_role(server, dbname, &self.target_role);
        }
        self.target_server = server;
        self.target_url = server.url(&self.target_role, PASSWORD, dbname);
        self.config.target = self.target_url.parse().unwrap();
        self.target = sql(server, dbname).await;
    }

    /// The source database's URL for the superuser, for the test's own clients.
    pub fn source_admin_url(&self) -> String {
        self.server.superuser_url(&self.config.source.dbname)
    }

    /// The target database's URL for the superuser, for the test's own clients.
    pub fn target_admin_url(&self) -> String {
        self.target_server.superuser_url(&self.config.target.dbname)
    }

    pub async fn setup(&self) {
        usersync::commands::setup::setup(&self.config, Default::default())
            .await
            .expect("usersync setup");
    }

    /// The end LSN of the last transaction the target's checkpoint holds.
    pub async fn checkpoint_end(&self) -> String {
        self.target
            .query_one("SELECT end_lsn::text FROM usersync.state", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Starts the replicator in this process.
    pub fn start(&self) -> Running {
        let (stop, shutdown) = watch::channel(false);
        let metrics = Arc::new(Metrics::new(self.config.lag_target));
        let config = self.config.clone();
        let task_metrics = Arc::clone(&metrics);
        let task = tokio::spawn(async move {
            usersync::replicator::run(&config, task_metrics, shutdown).await
        });
        Running {
            stop,
            task,
            metrics,
        }
    }

    /// Source users as (id, email, display_name, version), sorted by id.
    pub async fn source_users(&self) -> Vec<(String, Option<String>, Option<String>, i32)> {
        self.source
            .query(
                "SELECT id::text, email, display_name, version FROM public.users ORDER BY id::text",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    /// Live target users in the same form.
    pub async fn target_users(&self) -> Vec<(String, Option<String>, Option<String>, i32)> {
        self.target
            .query(
                "SELECT id, email, name, (raw_json ->> 'version')::int FROM neon_auth.users_sync
                  WHERE deleted_at IS NULL ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    /// The source's current WAL position.
    pub async fn source_wal_lsn(&self) -> String {
        self.source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The slot's `confirmed_flush_lsn`.
    pub async fn slot_confirmed(&self) -> String {
        self.source
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.slot],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the slot is confirmed at `lsn` or past it (only past it, `strictly`), or
    /// panics with `failure`.
    pub async fn wait_for_slot_confirmed(&self, lsn: &str, strictly: bool, failure: &str) {
        let comparison = if strictly { ">" } else { ">=" };
        let query = format!(
            "SELECT confirmed_flush_lsn {comparison} $1::text::pg_lsn
               FROM pg_replication_slots WHERE slot_name = $2"
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let advanced: bool = self
                .source
                .query_one(&query, &[&lsn, &self.config.slot])
                .await
                .unwrap()
                .get(0);
            if advanced {
                return;
            }
            assert!(Instant::now() < deadline, "{failure}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the live target users equal the source users, or panics with both.
    pub async fn wait_for_match(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (source, target) = (self.source_users().await, self.target_users().await);
            if source == target {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "target did not match source within {WAIT:?}:\nsource {} rows, target {} rows\n\
                     only in source: {:?}\nonly in target: {:?}",
                    source.len(),
                    target.len(),
                    source.iter().filter(|r| !target.contains(r)).take(5).collect::<Vec<_>>(),
                    target.iter().filter(|r| !source.contains(r)).take(5).collect::<Vec<_>>(),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `query` on the target to return true.
    pub async fn wait_target(&self, query: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let done: bool = self.target.query_one(query, &[]).await.unwrap().get(0);
            if done {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {query}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the real binary with this pair's URLs in the environment.
    pub fn usersync(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run usersync")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_usersync"));
        command
            .args(args)
            .env("USERSYNC_SOURCE_URL", &self.source_url)
            .env("USERSYNC_TARGET_URL", &self.target_url)
            .env("USERSYNC_SLOT", &self.config.slot)
            // Tests run in parallel: each service takes a free port for /metrics.
            .env("USERSYNC_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info");
        command
    }
}

/// A replicator running in this process.
pub struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), usersync::Error>>,
    pub metrics: Arc<Metrics>,
}

impl Running {
    /// Asks it to stop (as SIGTERM does) and waits; panics if it failed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("replicator task")
            .expect("replicator stops cleanly");
    }

    /// Whether it has ended by itself (an error, with `run`; see [`Running::stop`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Ends it abruptly, as a crash would: its connections just drop.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Waits for it to end by itself (an error) and returns the error.
    pub async fn failure(self) -> usersync::Error {
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(Err(error))) => error,
            Ok(Ok(Ok(()))) => panic!("the replicator ended without an error"),
            Ok(Err(join)) => panic!("the replicator task panicked: {join}"),
            Err(_) => panic!("the replicator did not stop within {WAIT:?}"),
        }
    }
}

/// Logs every write usersync makes to a live user of the target in `write_log`
/// (`seq`, `id`, `version` from `raw_json`), to catch a change applied twice or out of order
/// ([`assert_write_log_ordered`]). The trigger function is `SECURITY DEFINER`: it writes the
/// log as its owner, so usersync's least-privilege target role needs no grant on it.
pub async fn install_write_log(target: &Client) {
    target
        .batch_execute(
            "CREATE TABLE write_log (seq bigserial, id text, version int);
             CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
               INSERT INTO write_log (id, version) VALUES (NEW.id, (NEW.raw_json ->> 'version')::int);
               RETURN NEW;
             END $$;
             CREATE TRIGGER log_write AFTER INSERT OR UPDATE ON neon_auth.users_sync
               FOR EACH ROW WHEN (NEW.deleted_at IS NULL) EXECUTE FUNCTION log_write();",
        )
        .await
        .expect("install the write log");
}

/// Writes a backlog on the source, one change per transaction: `inserts` new users (emails
/// `{prefix}{i}@example.com`), with `updates` a version bump every third insert of the user
/// inserted 500 before (of half as many early on), and with `deletes` a delete of one every
/// fiftieth, so that consecutive batches (a batch closes at 2,000 changes) share users.
pub async fn write_backlog(
    source: &Client,
    prefix: &str,
    inserts: u32,
    updates: bool,
    deletes: bool,
) {
    let update = if updates {
        format!(
            "IF i % 3 = 0 THEN
               UPDATE users SET version = version + 1
                WHERE email = '{prefix}' || (i - least(i / 2, 500)) || '@example.com';
               COMMIT;
             END IF;"
        )
    } else {
        String::new()
    };
    let delete = if deletes {
        format!(
            "IF i % 50 = 0 THEN
               DELETE FROM users WHERE email = '{prefix}' || (i / 5) || '@example.com';
               COMMIT;
             END IF;"
        )
    } else {
        String::new()
    };
    source
        .batch_execute(&format!(
            "DO $$
             BEGIN
               FOR i IN 1..{inserts} LOOP
                 INSERT INTO users (email) VALUES ('{prefix}' || i || '@example.com');
                 COMMIT;
                 {update}
                 {delete}
               END LOOP;
             END $$;"
        ))
        .await
        .expect("write the backlog");
}

/// Records which server process writes users on the target (a statement trigger, which also
/// sleeps `seconds` in each such statement); [`user_writers`] counts them.
pub async fn log_user_writers(target: &Client, seconds: f64) {
    target
        .batch_execute(&format!(
            "CREATE TABLE write_pids (pid int);
             CREATE FUNCTION log_writer() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
               INSERT INTO write_pids VALUES (pg_backend_pid());
               PERFORM pg_sleep({seconds});
               RETURN NULL;
             END $$;
             CREATE TRIGGER log_writer AFTER INSERT OR UPDATE ON neon_auth.users_sync
               FOR EACH STATEMENT EXECUTE FUNCTION log_writer();"
        ))
        .await
        .expect("log the target's writers");
}

/// How many server processes wrote users since [`log_user_writers`].
pub async fn user_writers(target: &Client) -> i64 {
    target
        .query_one("SELECT count(DISTINCT pid) FROM write_pids", &[])
        .await
        .unwrap()
        .get(0)
}

/// Panics if the write log shows a user's version written again or going back: a change
/// applied twice or out of order.
pub async fn assert_write_log_ordered(target: &Client) {
    let bad: Vec<(String, i32, i32)> = target
        .query(
            "SELECT id, version, previous FROM (
                SELECT id, version, lag(version) OVER (PARTITION BY id ORDER BY seq) AS previous
                  FROM write_log) w
              WHERE version <= previous",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        bad.is_empty(),
        "applied twice or out of order (id, version, previous): {bad:?}"
    );
}

/// How many checkpoint rows the target holds (one per slot, or per route of a fan-out).
pub async fn checkpoint_rows(target: &Client) -> i64 {
    target
        .query_one("SELECT count(*) FROM usersync.state", &[])
        .await
        .unwrap()
        .get(0)
}

/// How many users the target holds, live or soft-deleted.
pub async fn target_user_count(target: &Client) -> i64 {
    target
        .query_one("SELECT count(*) FROM neon_auth.users_sync", &[])
        .await
        .unwrap()
        .get(0)
}

/// How many users the target holds soft-deleted.
pub async fn soft_deleted_users(target: &Client) -> i64 {
    target
        .query_one(
            "SELECT count(*) FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the real binary with this pair's URLs until `interrupt` says so, then kills it
/// (SIGKILL, as a crash or an OOM kill would), and returns what it had printed.
/// `interrupt` sees each stdout line as it comes; it is also asked every 20 ms with `None`.
pub async fn crash_usersync(
    pair: &Pair,
    args: &[&str],
    mut interrupt: impl FnMut(Option<&str>) -> bool,
) -> String {
    use std::io::BufRead;
    let mut child = pair
        .command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start usersync");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line.expect("utf-8 stdout")).is_err() {
                return;
            }
        }
    });
    let mut said = String::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let line = received.try_recv().ok();
        if let Some(line) = &line {
            said.push_str(line);
            said.push('\n');
        }
        if interrupt(line.as_deref()) {
            break;
        }
        assert!(
            child.try_wait().expect("poll usersync").is_none(),
            "usersync {args:?} ended before it could be interrupted: {said}"
        );
        assert!(Instant::now() < deadline, "never interrupted: {said}");
        if line.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    child.kill().expect("kill usersync");
    child.wait().expect("reap usersync");
    said
}
