//! `usersync demo`: the whole product on one machine in one command. Two throwaway
//! PostgreSQL servers (an identity store and a stand-in for Neon), a generator of sign-ups,
//! profile updates and deletions, and usersync replicating between them, with a live line of
//! what was applied and the lag against the target. Ctrl-C (or `--duration`) stops, checks
//! that the target matches the source, and removes everything.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_postgres::Client;

use super::setup::{setup, SetupOptions};
use super::{connect, run::wait_for_signal};
use crate::cli::DemoArgs;
use crate::config::{
    parse_duration, Config, TableName, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_SOURCE_TIMEOUT,
};
use crate::conn::PgUrl;
use crate::decode::DEFAULT_MEMORY_LIMIT;
use crate::error::Error;
use crate::http;
use crate::localpg::{LocalPg, LocalPgOptions};
use crate::map::GenericMapping;
use crate::metrics::{Metrics, Op};
use crate::replicator;
use crate::source::SourceError;

const SOURCE_SCHEMA: &str = "
CREATE TABLE public.users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL UNIQUE,
    display_name   text,
    email_verified boolean NOT NULL DEFAULT false,
    plan           text NOT NULL DEFAULT 'free',
    metadata       jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
)";

/// How long to wait for the target to catch up after the generator stops.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn demo(args: &DemoArgs) -> Result<(), Error> {
    let duration = args.duration.as_deref().map(parse_duration).transpose()?;
    let lag_target = parse_duration(&args.lag_target)?;
    if args.rate == 0 {
        return Err(Error::Config("--rate must be at least 1".into()));
    }
    println!("starting two throwaway PostgreSQL servers (source and target)...");
    let password = format!("demo{:x}", seed());
    let (source_pg, target_pg) = tokio::join!(start_server(&password), start_server(&password));
    let (source_pg, target_pg) = (source_pg?, target_pg?);
    let url = |pg: &LocalPg| -> Result<PgUrl, Error> {
        pg.url("postgres", &password, "postgres")
            .parse()
            .map_err(|source| Error::Url {
                which: "demo",
                source,
            })
    };
    let config = Config {
        source: url(&source_pg)?,
        target: url(&target_pg)?,
        table: "public.users".parse::<TableName>()?,
        slot: "usersync".into(),
        publication: "usersync".into(),
        mapping: GenericMapping::default().into(),
        lag_target,
        heartbeat_interval: Some(DEFAULT_HEARTBEAT_INTERVAL),
        source_timeout: DEFAULT_SOURCE_TIMEOUT,
        spill_threshold: DEFAULT_MEMORY_LIMIT,
        routes: None,
        routes_file: None,
        route: None,
        evict_after: None,
        evict_after_wal: None,
    };
    println!(
        "source {} / target {}",
        config.source.redacted(),
        config.target.redacted()
    );
    let source = connect("source", &config.source).await?;
    source
        .batch_execute(SOURCE_SCHEMA)
        .await
        .map_err(SourceError::sql("creating the demo users table"))?;
    setup(&config, SetupOptions::default()).await?;

    let metrics = Arc::new(Metrics::new(lag_target));
    let (stop, shutdown) = watch::channel(false);
    if let Some(addr) = args.metrics_addr {
        let (bound, server) = http::bind(addr, Arc::clone(&metrics), shutdown.clone())
            .await
            .map_err(|error| Error::Config(error.to_string()))?;
        println!("metrics on http://{bound}/metrics");
        tokio::spawn(server);
    }
    let replicator = {
        let config = config.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move { replicator::run(&config, metrics, shutdown).await })
    };
    println!(
        "generating {} source transactions/s (60% sign-ups, 35% updates, 5% deletions); Ctrl-C stops",
        args.rate
    );
    let started = Instant::now();
    let stop_at = async {
        match duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    let generated = tokio::select! {
        result = generate(&source, args.rate, &metrics, lag_target) => result?,
        _ = wait_for_signal() => 0,
        _ = stop_at => 0,
    };
    let _ = generated;
    println!("stopping the generator; waiting for the target to catch up...");
    let target = connect("target", &config.target).await?;
    let verdict = wait_for_match(&source, &target).await?;
    let _ = stop.send(true);
    match replicator.await {
        Ok(result) => result?,
        Err(join) => {
            return Err(Error::Config(format!("the replicator task failed: {join}")));
        }
    }
    print_line(&metrics, lag_target, started);
    println!("{verdict}");
    println!("removing the throwaway servers");
    drop((source_pg, target_pg));
    Ok(())
}

async fn start_server(password: &str) -> Result<LocalPg, Error> {
    let options = LocalPgOptions {
        superuser_password: password.to_owned(),
        ..LocalPgOptions::default()
    };
    tokio::task::spawn_blocking(move || LocalPg::start(&options))
        .await
        .map_err(|join| Error::Config(format!("starting a demo server failed: {join}")))?
        .map_err(Error::from)
}

/// Writes changes at `rate` per second until cancelled, printing a line every second.
async fn generate(
    source: &Client,
    rate: u32,
    metrics: &Metrics,
    lag_target: Duration,
) -> Result<u64, Error> {
    let mut random = seed() | 1;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut next_report = Instant::now() + Duration::from_secs(1);
    let started = Instant::now();
    let mut count = 0u64;
    loop {
        ticker.tick().await;
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let roll = random % 100;
        let sql = if roll < 60 {
            format!(
                "INSERT INTO public.users (email, display_name, metadata) VALUES \
                 ('user{count}-{random:x}@example.com', 'User {count}', '{{\"source\": \"demo\", \"n\": {count}}}')"
            )
        } else if roll < 95 {
            format!(
                "UPDATE public.users SET display_name = 'User {count} (renamed)', \
                 email_verified = true, plan = 'pro' \
                 WHERE id = (SELECT id FROM public.users ORDER BY random() LIMIT 1)"
            )
        } else {
            "DELETE FROM public.users WHERE id = (SELECT id FROM public.users ORDER BY random() LIMIT 1)"
                .to_owned()
        };
        source
            .batch_execute(&sql)
            .await
            .map_err(SourceError::sql("writing demo changes"))?;
        count += 1;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            print_line(metrics, lag_target, started);
        }
    }
}

fn print_line(metrics: &Metrics, lag_target: Duration, started: Instant) {
    let lag = metrics.lag_window.summary(Instant::now(), lag_target);
    let lag = match lag {
        Some(lag) => format!(
            "lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {:.1}% within {} ms",
            ms(lag.p50),
            ms(lag.p99),
            ms(lag.max),
            lag.within_target * 100.0,
            lag_target.as_millis()
        ),
        None => "lag: no transactions in the last minute".to_owned(),
    };
    println!(
        "[{:>4}s] applied {} inserts, {} updates, {} deletes in {} transactions ({} batches) | {lag}",
        started.elapsed().as_secs(),
        metrics.changes(Op::Insert),
        metrics.changes(Op::Update),
        metrics.changes(Op::Delete),
        metrics.transactions(),
        metrics.batches(),
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Compares the source's users with the target's live users by content.
async fn wait_for_match(source: &Client, target: &Client) -> Result<String, Error> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let source_rows = source
            .query_one(
                "SELECT count(*), coalesce(md5(string_agg(id::text || ':' || email || ':' || coalesce(display_name, ''), ',' ORDER BY id::text)), '')
                   FROM public.users",
                &[],
            )
            .await
            .map_err(SourceError::sql("reading the demo users"))?;
        let target_rows = target
            .query_one(
                "SELECT count(*) FILTER (WHERE deleted_at IS NULL),
                        coalesce(md5(string_agg(id || ':' || email || ':' || coalesce(name, ''), ',' ORDER BY id) FILTER (WHERE deleted_at IS NULL)), ''),
                        count(*) FILTER (WHERE deleted_at IS NOT NULL)
                   FROM neon_auth.users_sync",
                &[],
            )
            .await
            .map_err(crate::apply::ApplyError::sql("reading the replicated users"))?;
        let (source_count, source_sum): (i64, String) = (source_rows.get(0), source_rows.get(1));
        let (live, target_sum, deleted): (i64, String, i64) =
            (target_rows.get(0), target_rows.get(1), target_rows.get(2));
        if source_count == live && source_sum == target_sum {
            return Ok(format!(
                "target matches source: {live} live users (same ids, emails and names; checksum {}), {deleted} soft-deleted",
                &target_sum[..target_sum.len().min(8)]
            ));
        }
        if Instant::now() >= deadline {
            return Ok(format!(
                "target does NOT match source after {}s: source {source_count} users, target {live} live",
                CATCH_UP_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
}
