//! Initial-copy speed: `usersync setup` against PostgreSQL's own `CREATE SUBSCRIPTION ...
//! copy_data`, on the same two throwaway servers in the same run.
//!
//! `cargo bench --bench snapshot` (1,000,000 users; `USERSYNC_BENCH_USERS` to change) prints
//! one line per contender and the ratio, then `usersync resync` over the copied table: the
//! same copy as upserts into a table that holds every user (plus the reconcile), which has no
//! native counterpart.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use usersync::commands::resync::resync;
use usersync::commands::setup::{setup, SetupOptions};
use usersync::config::{Config, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_SOURCE_TIMEOUT};
use usersync::localpg::{LocalPg, LocalPgOptions};
use usersync::map::GenericMapping;

const PASSWORD: &str = "bench";

const USERS_TABLE: &str = "
CREATE TABLE public.users (
    id           uuid PRIMARY KEY,
    email        text NOT NULL,
    display_name text,
    created_at   timestamptz NOT NULL,
    metadata     jsonb NOT NULL
)";

#[tokio::main]
async fn main() {
    let users: i64 = std::env::var("USERSYNC_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let options = LocalPgOptions {
        superuser_password: PASSWORD.into(),
        ..LocalPgOptions::default()
    };
    let source_pg = LocalPg::start(&options).expect("start the source server");
    let target_pg = LocalPg::start(&options).expect("start the target server");
    let source = client(&source_pg, "postgres").await;
    source.batch_execute(USERS_TABLE).await.unwrap();
    let fill = Instant::now();
    source
        .batch_execute(&format!(
            "INSERT INTO users
             SELECT gen_random_uuid(), 'user' || g || '@example.com', 'User ' || g,
                    now() - g * interval '1 minute', jsonb_build_object('plan', 'free', 'n', g)
               FROM generate_series(1, {users}) g"
        ))
        .await
        .unwrap();
    source.batch_execute("VACUUM ANALYZE users").await.unwrap();
    eprintln!(
        "source filled with {users} users in {:.1}s",
        fill.elapsed().as_secs_f64()
    );

    let admin = client(&target_pg, "postgres").await;
    admin
        .batch_execute("CREATE DATABASE usersync_target")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE native_target")
        .await
        .unwrap();

    // usersync: slot, snapshot, COPY out, map, binary COPY into the empty neon_auth.users_sync.
    let config = Config {
        source: source_pg
            .url("postgres", PASSWORD, "postgres")
            .parse()
            .unwrap(),
        target: target_pg
            .url("postgres", PASSWORD, "usersync_target")
            .parse()
            .unwrap(),
        table: "public.users".parse().unwrap(),
        slot: "bench".into(),
        publication: "bench".into(),
        mapping: GenericMapping::default().into(),
        lag_target: Duration::from_secs(1),
        heartbeat_interval: Some(DEFAULT_HEARTBEAT_INTERVAL),
        source_timeout: DEFAULT_SOURCE_TIMEOUT,
        spill_threshold: usersync::decode::DEFAULT_MEMORY_LIMIT,
        routes: None,
        routes_file: None,
        route: None,
        evict_after: None,
        evict_after_wal: None,
    };
    let started = Instant::now();
    setup(&config, SetupOptions::default())
        .await
        .expect("usersync setup");
    let ours = started.elapsed();

    // Native: a subscription copying the same table into a plain copy of it.
    let native = client(&target_pg, "native_target").await;
    native.batch_execute(USERS_TABLE).await.unwrap();
    let started = Instant::now();
    native
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION bench_native CONNECTION '{}' PUBLICATION bench",
            source_pg
                .url("postgres", PASSWORD, "postgres")
                .replace('\'', "''")
        ))
        .await
        .unwrap();
    loop {
        let ready: bool = native
            .query_one(
                "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let theirs = started.elapsed();
    native
        .batch_execute("ALTER SUBSCRIPTION bench_native DISABLE; ALTER SUBSCRIPTION bench_native SET (slot_name = NONE); DROP SUBSCRIPTION bench_native")
        .await
        .unwrap();

    // After native's turn, so that it had the machine to itself.
    let started = Instant::now();
    resync(&config).await.expect("usersync resync");
    let resynced = started.elapsed();

    let rate = |took: Duration| users as f64 / took.as_secs_f64();
    println!("initial copy of {users} users");
    println!(
        "  usersync setup      {:>8.2}s  {:>10.0} users/s",
        ours.as_secs_f64(),
        rate(ours)
    );
    println!(
        "  native copy_data    {:>8.2}s  {:>10.0} users/s",
        theirs.as_secs_f64(),
        rate(theirs)
    );
    println!("  usersync / native   {:>8.2}x", rate(ours) / rate(theirs));
    println!(
        "  usersync resync     {:>8.2}s  {:>10.0} users/s  (upserts over every user)",
        resynced.as_secs_f64(),
        rate(resynced)
    );
}

async fn client(pg: &LocalPg, dbname: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(&pg.url("postgres", PASSWORD, dbname), NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    client
}
