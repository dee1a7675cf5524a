//! Fan-out bench: one `usersync run --routes` feeding N target databases from one slot, at a
//! fixed total rate spread over N tenancies.
//!
//! ```sh
//! cargo bench --bench fanout
//! USERSYNC_BENCH_ROUTES=1,10,100 USERSYNC_BENCH_RATE=1000 USERSYNC_BENCH_SECONDS=20 cargo bench --bench fanout
//! ```
//!
//! For each route count: a source database whose users table has a tenancy in its primary key
//! (as Stack Auth's), `USERSYNC_BENCH_USERS` (10,000) users spread over the tenancies, one
//! target database per tenancy on a second server, `usersync setup --routes`, then the real
//! binary (`usersync run --routes`) while `USERSYNC_BENCH_RATE` transactions a second (80%
//! updates of a random user of a random tenancy, 20% sign-ups) run for
//! `USERSYNC_BENCH_SECONDS`. Lag is measured on each target by a trigger (source-side
//! `clock_timestamp()` at the change to target-side `clock_timestamp()` at the commit that
//! makes it visible; one host, one clock). Reported per route count: lag p50/p99 over all
//! changes, the worst route's p99, the peak RSS of the process (`VmHWM`), its CPU time per
//! change, and the connections it holds on the source and the targets.
//!
//! With `USERSYNC_BENCH_COPY_USERS=N`, a tenancy of N more users, in no route at first, gets a
//! route of its own one second into the load (routes file rewritten, SIGHUP): its online copy
//! runs beside the load, and the table gains its time and rate (users a second until the
//! new target holds them all); the lag figures then cover the other routes during the copy.
//!
//! With `USERSYNC_BENCH_STOP_ROUTES=N`, the first N routes' targets live on a server of their
//! own, stopped for the middle third of the load and started again: the lag figures then
//! cover the other routes only (while those N are down), and the table gains how long the N
//! took to catch up once their server was back.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use usersync::localpg::{LocalPg, LocalPgOptions};

const PASSWORD: &str = "bench";
const SLOT: &str = "fanout";
const LOAD_CONNECTIONS: usize = 8;
const WAIT_LIMIT: Duration = Duration::from_secs(600);

const USERS_TABLE: &str = "
CREATE TABLE public.users (
    tenant       text NOT NULL,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    email        text NOT NULL,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    version      int NOT NULL DEFAULT 1,
    plan         text NOT NULL DEFAULT 'free',
    locale       text NOT NULL DEFAULT 'en-US',
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant, id)
)";

const LAG: &str = "
CREATE UNLOGGED TABLE public.bench_lag (source_ts timestamptz NOT NULL, applied_at timestamptz NOT NULL);
CREATE FUNCTION public.bench_record_lag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_lag VALUES ((NEW.raw_json ->> 'changed_at')::timestamptz, clock_timestamp());
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_lag AFTER INSERT OR UPDATE ON neon_auth.users_sync
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.deleted_at IS NULL)
    EXECUTE FUNCTION public.bench_record_lag();";

struct Settings {
    routes: Vec<usize>,
    rate: f64,
    seconds: f64,
    users: usize,
    copy_users: usize,
    stop_routes: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` from `cargo test --benches` too.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let settings = Settings {
        routes: std::env::var("USERSYNC_BENCH_ROUTES")
            .unwrap_or_else(|_| "1,10,100".into())
            .split(',')
            .map(|n| n.trim().parse().expect("USERSYNC_BENCH_ROUTES: numbers"))
            .collect(),
        rate: env_or("USERSYNC_BENCH_RATE", 1000.0),
        seconds: env_or("USERSYNC_BENCH_SECONDS", 20.0),
        users: env_or("USERSYNC_BENCH_USERS", 10_000),
        copy_users: env_or("USERSYNC_BENCH_COPY_USERS", 0),
        stop_routes: env_or("USERSYNC_BENCH_STOP_ROUTES", 0),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(settings));
}

fn server(extra: &[(&str, &str)]) -> LocalPg {
    LocalPg::start(&LocalPgOptions {
        superuser_password: PASSWORD.into(),
        extra_conf: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        bin_dir: None,
    })
    .expect("start a throwaway PostgreSQL server")
}

async fn connect(pg: &LocalPg, dbname: &str) -> Client {
    connect_url(&pg.superuser_url(dbname)).await
}

/// usersync's connections to the server `admin` is connected to.
async fn usersync_connections(admin: &Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'usersync'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn connect_url(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// One row of the result table.
struct Row {
    routes: usize,
    changes: u64,
    p50_ms: f64,
    p99_ms: f64,
    worst_route_p99_ms: f64,
    rss_mib: f64,
    cpu_us_per_change: f64,
    source_connections: i64,
    target_connections: i64,
    /// The online copy's time, if one ran.
    copy_seconds: Option<f64>,
    /// With routes stopped: how long their server was down, and how long they took to
    /// catch up after it came back.
    stopped: Option<(f64, f64)>,
}

async fn bench(settings: Settings) {
    let durable = [("fsync", "on"), ("synchronous_commit", "on")];
    let source_pg = server(&durable);
    let mut target_conf = durable.to_vec();
    target_conf.push(("max_connections", "500"));
    let target_pg = server(&target_conf);
    let admin = connect(&source_pg, "postgres").await;
    let target_admin = connect(&target_pg, "postgres").await;
    // The stopped routes' server, shared with the task that stops it.
    let down_pg = (settings.stop_routes > 0)
        .then(|| std::sync::Arc::new(std::sync::Mutex::new(server(&target_conf))));
    let down_url = |dbname: &str| {
        down_pg
            .as_ref()
            .map(|pg| pg.lock().unwrap().superuser_url(dbname))
    };
    let mut down_admin = match down_url("postgres") {
        Some(url) => Some(connect_url(&url).await),
        None => None,
    };
    let dir = std::env::temp_dir().join(format!("usersync-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = Vec::new();
    for (round, &routes) in settings.routes.iter().enumerate() {
        eprintln!("fanout: {routes} routes at {} tx/s", settings.rate);
        let source_db = format!("src_{round}");
        admin
            .batch_execute(&format!("CREATE DATABASE {source_db}"))
            .await
            .unwrap();
        let source = connect(&source_pg, &source_db).await;
        source.batch_execute(USERS_TABLE).await.unwrap();
        source
            .batch_execute(&format!(
                "INSERT INTO users (tenant, email, display_name)
                 SELECT 't' || (i % {routes}), 'user' || i || '@example.com', 'User ' || i
                   FROM generate_series(1, {}) AS i",
                settings.users
            ))
            .await
            .unwrap();
        if settings.copy_users > 0 {
            source
                .batch_execute(&format!(
                    "INSERT INTO users (tenant, email, display_name)
                     SELECT 'tnew', 'copied' || i || '@example.com', 'Copied ' || i
                       FROM generate_series(1, {}) AS i",
                    settings.copy_users
                ))
                .await
                .unwrap();
            target_admin
                .batch_execute(&format!("CREATE DATABASE tgt_{round}_new"))
                .await
                .unwrap();
        }
        let mut routes_file = String::from("route_by = \"tenant\"\n");
        let mut targets = Vec::new();
        let stopped = settings.stop_routes.min(routes);
        for r in 0..routes {
            let dbname = format!("tgt_{round}_{r}");
            let (admin_of, url) = match (&down_admin, r < stopped) {
                (Some(down_admin), true) => (down_admin, down_url(&dbname).unwrap()),
                _ => (&target_admin, target_pg.superuser_url(&dbname)),
            };
            admin_of
                .batch_execute(&format!("CREATE DATABASE {dbname}"))
                .await
                .unwrap();
            routes_file.push_str(&format!(
                "[[route]]\nname = \"r{r}\"\nvalues = [\"t{r}\"]\ntarget = \"{url}\"\n"
            ));
            targets.push((dbname, url));
        }
        let routes_path = dir.join(format!("routes_{round}.toml"));
        std::fs::write(&routes_path, routes_file).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&routes_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let usersync = |args: &[&str]| {
            let mut command = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_usersync")));
            command
                .args(args)
                .env("USERSYNC_SOURCE_URL", source_pg.superuser_url(&source_db))
                .env("USERSYNC_ROUTES_FILE", &routes_path)
                .env("USERSYNC_SLOT", SLOT)
                .env("USERSYNC_PUBLICATION", "fanout")
                .env("USERSYNC_METRICS_ADDR", "127.0.0.1:0")
                .env("RUST_LOG", "warn");
            command
        };
        let setup = usersync(&["setup"]).output().unwrap();
        assert!(
            setup.status.success(),
            "setup: {}",
            String::from_utf8_lossy(&setup.stderr)
        );
        let mut target_clients = Vec::new();
        for (_, url) in &targets {
            let client = connect_url(url).await;
            client.batch_execute(LAG).await.unwrap();
            target_clients.push(client);
        }
        let mut run = usersync(&["run"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start usersync run");
        let pid = run.id();
        wait_for_markers(&source, &target_clients, "warmup").await;
        for client in &target_clients {
            client
                .batch_execute("TRUNCATE public.bench_lag")
                .await
                .unwrap();
        }
        let cpu_before = cpu_ticks(pid);
        let copy = async {
            if settings.copy_users == 0 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let dbname = format!("tgt_{round}_new");
            let grown = format!(
                "{}[[route]]\nname = \"new\"\nvalues = [\"tnew\"]\ntarget = \"{}\"\n",
                std::fs::read_to_string(&routes_path).unwrap(),
                target_pg.superuser_url(&dbname)
            );
            std::fs::write(&routes_path, grown).unwrap();
            let started = Instant::now();
            let _ = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
            let new_target = connect(&target_pg, &dbname).await;
            let deadline = Instant::now() + WAIT_LIMIT;
            loop {
                let done = new_target
                    .query_one(
                        "SELECT count(*) FROM neon_auth.users_sync WHERE deleted_at IS NULL",
                        &[],
                    )
                    .await
                    .map(|row| row.get::<_, i64>(0) as usize >= settings.copy_users)
                    .unwrap_or(false);
                if done {
                    return Some(started.elapsed().as_secs_f64());
                }
                assert!(Instant::now() < deadline, "the online copy never finished");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let stop = async {
            let pg = down_pg.as_ref().filter(|_| stopped > 0)?;
            let third = Duration::from_secs_f64(settings.seconds / 3.0);
            tokio::time::sleep(third).await;
            let down = std::sync::Arc::clone(pg);
            let since = Instant::now();
            tokio::task::spawn_blocking(move || down.lock().unwrap().stop().unwrap())
                .await
                .unwrap();
            tokio::time::sleep(third).await;
            let up = std::sync::Arc::clone(pg);
            tokio::task::spawn_blocking(move || {
                up.lock()
                    .unwrap()
                    .restart(usersync::localpg::StopMode::Fast)
                    .unwrap()
            })
            .await
            .unwrap();
            Some((since.elapsed().as_secs_f64(), Instant::now()))
        };
        let (changes, copy_seconds, down) =
            tokio::join!(load(&source_pg, &source_db, routes, &settings), copy, stop);
        // The stopped routes' connections died with their server.
        if down.is_some() {
            for (r, (_, url)) in targets.iter().enumerate().take(stopped) {
                target_clients[r] = connect_url(url).await;
            }
            down_admin = Some(connect_url(&down_url("postgres").unwrap()).await);
        }
        wait_for_markers(&source, &target_clients, "done").await;
        let stopped_figures = down.map(|(seconds, back)| (seconds, back.elapsed().as_secs_f64()));
        let cpu_after = cpu_ticks(pid);
        let rss = vm_hwm_kib(pid).unwrap_or(0) as f64 / 1024.0;
        let source_connections = usersync_connections(&admin).await;
        let mut target_connections = 0;
        for admin_of in std::iter::once(&target_admin).chain(down_admin.iter()) {
            target_connections += usersync_connections(admin_of).await;
        }
        let mut all = Vec::new();
        let mut worst_p99: f64 = 0.0;
        // With routes stopped: the others' lag, while those were down.
        for client in target_clients
            .iter()
            .skip(if down.is_some() { stopped } else { 0 })
        {
            let lags: Vec<f64> = client
                .query(
                    "SELECT extract(epoch FROM applied_at - source_ts)::float8 * 1000 FROM public.bench_lag",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            worst_p99 = worst_p99.max(percentile(&lags, 0.99));
            all.extend(lags);
        }
        let ticks_per_second = 100.0; // USER_HZ on Linux
        let cpu_seconds = (cpu_after - cpu_before) as f64 / ticks_per_second;
        rows.push(Row {
            routes,
            changes,
            p50_ms: percentile(&all, 0.5),
            p99_ms: percentile(&all, 0.99),
            worst_route_p99_ms: worst_p99,
            rss_mib: rss,
            cpu_us_per_change: cpu_seconds * 1e6 / changes.max(1) as f64,
            source_connections,
            target_connections,
            copy_seconds,
            stopped: stopped_figures,
        });
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = run.wait();
        drop(source);
        drop(target_clients);
        admin
            .batch_execute(&format!("SELECT pg_drop_replication_slot('{SLOT}')"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("DROP DATABASE {source_db} WITH (FORCE)"))
            .await
            .unwrap();
        for (r, (dbname, _)) in targets.iter().enumerate() {
            let admin_of = match (&down_admin, r < stopped) {
                (Some(down_admin), true) => down_admin,
                _ => &target_admin,
            };
            admin_of
                .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
                .await
                .unwrap();
        }
        if settings.copy_users > 0 {
            target_admin
                .batch_execute(&format!("DROP DATABASE tgt_{round}_new WITH (FORCE)"))
                .await
                .unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\n| routes | changes | lag p50 | lag p99 | worst route p99 | peak RSS | CPU per change | connections (source / targets) | online copy | routes stopped |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let copy = row.copy_seconds.map_or("-".to_owned(), |seconds| {
            format!(
                "{} users in {seconds:.1} s ({:.0}/s)",
                settings.copy_users,
                settings.copy_users as f64 / seconds
            )
        });
        let stopped = row.stopped.map_or("-".to_owned(), |(down, caught_up)| {
            format!(
                "{} down {down:.1} s, caught up {caught_up:.1} s after",
                settings.stop_routes
            )
        });
        println!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} MiB | {:.0} µs | {} / {} | {copy} | {stopped} |",
            row.routes,
            row.changes,
            row.p50_ms,
            row.p99_ms,
            row.worst_route_p99_ms,
            row.rss_mib,
            row.cpu_us_per_change,
            row.source_connections,
            row.target_connections
        );
    }
}

/// Writes one user per tenancy named `tag` and waits until every target has its own.
async fn wait_for_markers(source: &Client, targets: &[Client], tag: &str) {
    let routes = targets.len();
    source
        .batch_execute(&format!(
            "INSERT INTO users (tenant, email)
             SELECT 't' || r, '{tag}-' || r || '@marker' FROM generate_series(0, {}) AS r",
            routes - 1
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT_LIMIT;
    for (r, target) in targets.iter().enumerate() {
        let email = format!("{tag}-{r}@marker");
        loop {
            let found: bool = target
                .query_one(
                    "SELECT EXISTS (SELECT FROM neon_auth.users_sync WHERE email = $1)",
                    &[&email],
                )
                .await
                .unwrap()
                .get(0);
            if found {
                break;
            }
            assert!(Instant::now() < deadline, "route r{r} never caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The steady load: `settings.rate` transactions a second over the tenancies, from
/// [`LOAD_CONNECTIONS`] connections, for `settings.seconds`; returns the changes written.
async fn load(pg: &LocalPg, dbname: &str, routes: usize, settings: &Settings) -> u64 {
    let per_connection = settings.rate / LOAD_CONNECTIONS as f64;
    let interval = Duration::from_secs_f64(1.0 / per_connection);
    let until = Instant::now() + Duration::from_secs_f64(settings.seconds);
    let mut tasks = Vec::new();
    for c in 0..LOAD_CONNECTIONS {
        let client = connect(pg, dbname).await;
        let users = settings.users;
        tasks.push(tokio::spawn(async move {
            let update = client
                .prepare(
                    "UPDATE users SET version = version + 1, changed_at = clock_timestamp()
                      WHERE tenant = $1 AND email = $2",
                )
                .await
                .unwrap();
            let insert = client
                .prepare("INSERT INTO users (tenant, email) VALUES ($1, $2)")
                .await
                .unwrap();
            let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (c as u64 + 1);
            let mut next = Instant::now();
            let mut written = 0u64;
            let mut n = 0u64;
            while Instant::now() < until {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let user = (seed % users as u64) as usize + 1;
                n += 1;
                if n.is_multiple_of(5) {
                    let tenant = format!("t{}", seed as usize % routes);
                    let email = format!("new-{c}-{n}@example.com");
                    client.execute(&insert, &[&tenant, &email]).await.unwrap();
                } else {
                    let tenant = format!("t{}", user % routes);
                    let email = format!("user{user}@example.com");
                    client.execute(&update, &[&tenant, &email]).await.unwrap();
                }
                written += 1;
                next += interval;
                tokio::time::sleep_until(next.into()).await;
            }
            written
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: indexes 11 and 12 after the name.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// `VmHWM` (peak resident set) of a process in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
