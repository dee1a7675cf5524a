//! usersync against PostgreSQL's own logical replication, on the same two throwaway servers
//! in the same run.
//!
//! ```text
//! cargo bench --bench replication                  # full scale, about 6 minutes on 2 cores
//! USERSYNC_BENCH_SCALE=0.1 cargo bench --bench replication -- --json
//! ```
//!
//! Contenders, both replicating `public.users` of the source server through the publication
//! `bench`:
//!
//! - **usersync**, in this process (`usersync::replicator::run`), into `neon_auth.users_sync`
//!   of the target database `usersync_target`;
//! - **native**, a subscription (`bench_native`) into a plain copy of the users table in the
//!   target database `native_target`.
//!
//! Only one contender runs during a measurement; the other is stopped (usersync) or disabled
//! (native) and catches up, unmeasured, before its own turn, so both targets stay complete.
//!
//! The workload is the one of an independent benchmark that found usersync far behind native
//! replication near saturation (issue #15):
//!
//! - **Rows**: `public.users (id uuid PRIMARY KEY, email, display_name, created_at,
//!   updated_at, raw jsonb, changed_at)`, where `raw` is an identity store's user document of
//!   about 530 bytes (as text): id, email, two providers (email and a social login with its
//!   uid and link time), metadata (name, locale, plan, sign-in and failed sign-in counts, three
//!   flags, last sign-in) and timestamps as strings. Names, emails, providers and sign-up times
//!   are drawn from each user's id, the rest from the bench's generator, so no two documents
//!   are alike. usersync maps it with the generic profile (`id`, `email`, `display_name`,
//!   `created_at` named explicitly), so `raw`, `updated_at` and `changed_at` ride along in
//!   `raw_json`. Every section writes these rows, through `COPY` for the preloaded users and
//!   the large transactions. `USERSYNC_BENCH_ROWS=light` writes a `raw` of about 40 bytes
//!   instead, all else equal, to see what the row size alone changes.
//! - **Preloaded users**: the snapshot's users; updates and deletes pick at random from
//!   100,000 of them, spread over the whole table (times `USERSYNC_BENCH_SCALE`; a deleted
//!   user leaves the pool).
//! - **Load**: 8 client connections sharing a fixed total rate (or, for the backlog, as fast
//!   as they go); each transaction is one statement: 60% inserts of a new user (full row,
//!   fresh document), 35% updates of `display_name`, `raw` (the same user's document with new
//!   values) and `updated_at` of a preloaded user, 5% deletes of a preloaded user.
//! - **Durability**: both servers run with PostgreSQL's defaults `fsync`, `full_page_writes`
//!   and `synchronous_commit` on (the test servers of `usersync::localpg` turn them off).
//!
//! Sections, each printed as usersync, native and usersync/native:
//!
//! 1. **snapshot**: initial copy of `USERSYNC_BENCH_SNAPSHOT_USERS` (1,000,000) users, usersync
//!    `setup` against `CREATE SUBSCRIPTION` with `copy_data` until its table is copied (rows/s);
//!    each turn from recycled WAL segments after a checkpoint, usersync's table vacuumed
//!    before native's turn.
//! 2. **steady load** (servers checkpointed and the tables vacuumed before each turn, and who
//!    goes first alternating by rate): the load above at each total rate of `USERSYNC_BENCH_RATES`
//!    (200,1000,5000 tx/s) for `USERSYNC_BENCH_SECONDS` (10) seconds. Lag is measured
//!    identically for both: every source write sets `changed_at = clock_timestamp()` (the
//!    column default on insert, explicitly on update), and a deferred constraint trigger on the
//!    target table (fired at commit) records `clock_timestamp() - changed_at` (both servers
//!    share this host's clock). Deletes are not sampled (native deletes the row; usersync soft-deletes).
//!    The achieved load rate is reported next to the requested one.
//! 3. **backlog drain**: `USERSYNC_BENCH_BACKLOG` (100,000) such transactions written while
//!    both are stopped, then time to catch up (tx/s), from the moment each consumer streams
//!    from its slot (the apply worker starts seconds after `ENABLE`); plus `pg_recvlogical` decoding the same
//!    backlog from a second slot into /dev/null, the slot's raw decode rate (physical limit).
//! 4. **bulk transaction**: one transaction of `USERSYNC_BENCH_BULK` (100,000) inserts, from
//!    commit to the last row visible on the target (rows/s).
//! 5. **peak memory**: the real binary (`usersync run`, built by cargo for this bench with the
//!    bench profile, `CARGO_BIN_EXE_usersync`) replicating one transaction of
//!    `USERSYNC_BENCH_RSS_USERS` (1,000,000) inserts; peak RSS is `VmHWM` from
//!    `/proc/<pid>/status`. No native figure: the apply worker's RSS counts shared buffers.
//!
//! usersync runs on a runtime of its own (one worker thread per core, as `usersync run`;
//! `USERSYNC_BENCH_WORKERS` sets another count).
//!
//! `USERSYNC_BENCH_TARGET_FLUSH_DELAY_US` makes every synchronous commit on the target wait
//! that many microseconds before its WAL flush (`commit_delay`, with `commit_siblings = 0`),
//! as a Neon compute waits for its safekeepers; asynchronous commits (usersync's batches,
//! the apply worker's transactions) do not wait.
//!
//! `USERSYNC_BENCH_SCALE` multiplies every size and the duration (`0.1` for a quick run; `0.02`
//! takes about two minutes on 2 cores). `USERSYNC_BENCH_SECTIONS` (e.g. `steady,drain`; also `bulk`, `rss`) runs only some sections; the
//! snapshot always runs, because it fills the source. `--json` (or `USERSYNC_BENCH_JSON=1`)
//! prints the table as one JSON object on stdout after the text table; progress goes to stderr.
//!
//! For usersync the steady-load, drain and bulk sections also print where the time goes, from
//! its own metrics: target transactions, the share of them that carried a single change (the
//! first bucket of `usersync_batch_size_changes`), mean changes per target transaction and
//! mean apply time. The notes also give the measured average size of `raw` on the source and
//! of `raw_json` on the target.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::SinkExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use usersync::commands::setup::{setup, SetupOptions};
use usersync::config::Config;
use usersync::localpg::{LocalPg, LocalPgOptions};
use usersync::map::GenericMapping;
use usersync::metrics::Metrics;

const PASSWORD: &str = "bench";
const PUBLICATION: &str = "bench";
const SLOT: &str = "bench";
const NATIVE_SUBSCRIPTION: &str = "bench_native";
const DECODE_SLOT: &str = "bench_decode";
const USERSYNC_DB: &str = "usersync_target";
const NATIVE_DB: &str = "native_target";

/// The source table: an identity store's users, each with its `raw` user document (see
/// [`User`]). `changed_at` is the source-side timestamp every lag sample starts from.
const USERS_TABLE: &str = "
CREATE TABLE public.users (
    id           uuid PRIMARY KEY,
    email        text NOT NULL,
    display_name text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    raw          jsonb NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
)";

/// One lag sample per applied insert or update, taken when the target transaction commits.
const LAG_TABLE: &str = "
CREATE UNLOGGED TABLE public.bench_lag (
    source_ts  timestamptz NOT NULL,
    applied_at timestamptz NOT NULL
)";

const USERSYNC_LAG_TRIGGER: &str = "
CREATE FUNCTION public.bench_record_lag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_lag
    VALUES ((NEW.raw_json ->> 'changed_at')::timestamptz, clock_timestamp());
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_lag AFTER INSERT OR UPDATE ON neon_auth.users_sync
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.deleted_at IS NULL)
    EXECUTE FUNCTION public.bench_record_lag();
ALTER TABLE neon_auth.users_sync ENABLE ALWAYS TRIGGER bench_lag;";

/// `ENABLE ALWAYS`: the apply worker runs with `session_replication_role = replica`, under
/// which ordinary triggers do not fire.
const NATIVE_LAG_TRIGGER: &str = "
CREATE FUNCTION public.bench_record_lag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_lag VALUES (NEW.changed_at, clock_timestamp());
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_lag AFTER INSERT OR UPDATE ON public.users
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION public.bench_record_lag();
ALTER TABLE public.users ENABLE ALWAYS TRIGGER bench_lag;";

const LAG_PERCENTILES: &str = "
SELECT count(*),
       percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY extract(epoch FROM applied_at - source_ts)::float8),
       max(extract(epoch FROM applied_at - source_ts)::float8)
  FROM public.bench_lag";

/// How long any wait for replication may take before the bench gives up.
const WAIT_LIMIT: Duration = Duration::from_secs(900);
/// Poll interval for "is the marker row on the target yet".
const POLL: Duration = Duration::from_millis(10);
/// Client connections writing the steady load (at a fixed total rate) and the backlog (as
/// fast as they go), as in the independent benchmark of issue #15.
const LOAD_CONNECTIONS: usize = 8;
/// Preloaded users the load updates and deletes at random (times `USERSYNC_BENCH_SCALE`).
const PRELOADED_ID_POOL: f64 = 100_000.0;
/// The generic profile's columns, named for the in-process replicator and `usersync run` alike.
const ID_COLUMN: &str = "id";
const EMAIL_COLUMN: &str = "email";
const DISPLAY_NAME_COLUMN: &str = "display_name";
const SIGNED_UP_AT_COLUMN: &str = "created_at";
/// PostgreSQL's durable defaults, which `localpg` turns off for its throwaway test servers: a
/// production source and target flush every commit, and both contenders pay for it.
const DURABLE_SETTINGS: [(&str, &str); 3] = [
    ("fsync", "on"),
    ("full_page_writes", "on"),
    ("synchronous_commit", "on"),
];
/// Bytes of COPY data sent at a time when filling the source.
const COPY_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Usersync,
    Native,
}

/// Which `raw` documents the bench writes (`USERSYNC_BENCH_ROWS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowWeight {
    /// About 530 bytes: an identity store's user document (the default).
    Realistic,
    /// About 40 bytes (`plan` and a sign-in count), everything else the same: to see what
    /// the row size alone changes.
    Light,
}

struct Settings {
    rows: RowWeight,
    snapshot_users: u64,
    /// Preloaded users the load's updates and deletes pick from.
    id_pool: u64,
    rates: Vec<f64>,
    seconds: f64,
    backlog: u64,
    bulk: u64,
    rss_users: u64,
    sections: Option<Vec<String>>,
    json: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let scale: f64 = env_parse("USERSYNC_BENCH_SCALE").unwrap_or(1.0);
        let scaled = |name: &str, default: f64| -> u64 {
            env_parse(name).unwrap_or((default * scale).round().max(1.0) as u64)
        };
        let rates = std::env::var("USERSYNC_BENCH_RATES")
            .unwrap_or_else(|_| "200,1000,5000".into())
            .split(',')
            .map(|r| r.trim().parse().expect("USERSYNC_BENCH_RATES: numbers"))
            .collect();
        let rows = match std::env::var("USERSYNC_BENCH_ROWS").as_deref() {
            Err(_) | Ok("realistic") => RowWeight::Realistic,
            Ok("light") => RowWeight::Light,
            Ok(other) => panic!("USERSYNC_BENCH_ROWS: realistic or light, not {other:?}"),
        };
        Settings {
            rows,
            snapshot_users: scaled("USERSYNC_BENCH_SNAPSHOT_USERS", 1_000_000.0),
            id_pool: (PRELOADED_ID_POOL * scale).round().max(1.0) as u64,
            rates,
            seconds: env_parse("USERSYNC_BENCH_SECONDS").unwrap_or((10.0 * scale).max(2.0)),
            backlog: scaled("USERSYNC_BENCH_BACKLOG", 100_000.0),
            bulk: scaled("USERSYNC_BENCH_BULK", 100_000.0),
            rss_users: scaled("USERSYNC_BENCH_RSS_USERS", 1_000_000.0),
            sections: std::env::var("USERSYNC_BENCH_SECTIONS")
                .ok()
                .map(|s| s.split(',').map(|s| s.trim().to_owned()).collect()),
            json: std::env::args().any(|a| a == "--json")
                || std::env::var("USERSYNC_BENCH_JSON").is_ok_and(|v| v == "1"),
        }
    }

    fn runs(&self, section: &str) -> bool {
        self.sections
            .as_ref()
            .is_none_or(|s| s.iter().any(|s| s == section))
    }
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One line of the result table.
struct Figure {
    section: String,
    metric: String,
    unit: &'static str,
    usersync: Option<f64>,
    native: Option<f64>,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
    notes: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        section: &str,
        metric: &str,
        unit: &'static str,
        usersync: Option<f64>,
        native: Option<f64>,
    ) {
        self.figures.push(Figure {
            section: section.into(),
            metric: metric.into(),
            unit,
            usersync,
            native,
        });
    }

    fn note(&mut self, note: String) {
        eprintln!("  {note}");
        self.notes.push(note);
    }

    fn print(&self) {
        let cell = |v: Option<f64>| v.map_or("-".to_owned(), format_value);
        println!(
            "\n{:<32} {:<36} {:>12} {:>12} {:>9}",
            "section", "figure", "usersync", "native", "us/native"
        );
        for f in &self.figures {
            let ratio = match (f.usersync, f.native) {
                (Some(u), Some(n)) if n != 0.0 => format!("{:.2}x", u / n),
                _ => "-".into(),
            };
            println!(
                "{:<32} {:<36} {:>12} {:>12} {:>9}",
                f.section,
                format!("{} ({})", f.metric, f.unit),
                cell(f.usersync),
                cell(f.native),
                ratio
            );
        }
        println!("(rates: higher is better; lag and memory: lower is better)");
        for note in &self.notes {
            println!("note: {note}");
        }
    }

    fn json(&self) -> serde_json::Value {
        let figures: Vec<_> = self
            .figures
            .iter()
            .map(|f| {
                json!({
                    "section": f.section,
                    "figure": f.metric,
                    "unit": f.unit,
                    "usersync": f.usersync,
                    "native": f.native,
                    "ratio": match (f.usersync, f.native) {
                        (Some(u), Some(n)) if n != 0.0 => Some(u / n),
                        _ => None,
                    },
                })
            })
            .collect();
        json!({ "figures": figures, "notes": self.notes })
    }
}

fn format_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// The two servers, the connections the bench drives them with, and the running contenders.
struct Bench {
    source_pg: LocalPg,
    _target_pg: LocalPg,
    source_url: String,
    target_url: String,
    source: Client,
    usersync_target: Client,
    native_target: Client,
    config: Config,
    usersync: Option<InProcess>,
    native_enabled: bool,
    /// Preloaded users the load generator may update or delete; deleted ones leave it.
    id_pool: Vec<String>,
    rows: RowWeight,
    rng: Rng,
}

struct InProcess {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), usersync::Error>>,
    metrics: Arc<Metrics>,
}

impl Bench {
    async fn contender_start(&mut self, who: Who) {
        match who {
            Who::Usersync if self.usersync.is_none() => {
                let (stop, shutdown) = watch::channel(false);
                let metrics = Arc::new(Metrics::new(self.config.lag_target));
                let config = self.config.clone();
                let task_metrics = Arc::clone(&metrics);
                let task = usersync_runtime().spawn(async move {
                    usersync::replicator::run(&config, task_metrics, shutdown).await
                });
                self.usersync = Some(InProcess {
                    stop,
                    task,
                    metrics,
                });
            }
            Who::Native if !self.native_enabled => {
                self.native_target
                    .batch_execute(&format!("ALTER SUBSCRIPTION {NATIVE_SUBSCRIPTION} ENABLE"))
                    .await
                    .unwrap();
                self.native_enabled = true;
            }
            _ => {}
        }
    }

    async fn contender_stop(&mut self, who: Who) {
        match who {
            Who::Usersync => {
                if let Some(running) = self.usersync.take() {
                    let _ = running.stop.send(true);
                    running
                        .task
                        .await
                        .expect("replicator task")
                        .expect("replicator stops cleanly");
                }
            }
            Who::Native if self.native_enabled => {
                self.native_target
                    .batch_execute(&format!("ALTER SUBSCRIPTION {NATIVE_SUBSCRIPTION} DISABLE"))
                    .await
                    .unwrap();
                self.native_enabled = false;
                // The apply worker leaves asynchronously; wait until its slot is free.
                self.wait_slot_inactive(NATIVE_SUBSCRIPTION).await;
            }
            Who::Native => {}
        }
    }

    async fn wait_slot_inactive(&self, slot: &str) {
        self.wait_slot_active_is(slot, false).await;
    }

    /// Waits until a consumer streams from `slot`: the drain is timed from there, so that
    /// the subscription's apply worker, which the launcher starts up to
    /// `wal_retrieve_retry_interval` (5 s) after `ENABLE`, is not charged its start.
    async fn wait_slot_active(&self, slot: &str) {
        self.wait_slot_active_is(slot, true).await;
    }

    async fn wait_slot_active_is(&self, slot: &str, wanted: bool) {
        let started = Instant::now();
        loop {
            let active: bool = self
                .source
                .query_one(
                    "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            if active == wanted {
                return;
            }
            assert!(
                started.elapsed() < WAIT_LIMIT,
                "slot {slot} never became {}",
                if wanted { "active" } else { "inactive" }
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Checkpoints both servers and vacuums the three tables, so that a measurement does not
    /// pay for the dirty buffers and dead rows of what ran before it (the million-user copy
    /// above all, which otherwise burdened whoever measured first).
    async fn settle_servers(&self) {
        for (client, table) in [
            (&self.source, "public.users"),
            (&self.usersync_target, "neon_auth.users_sync"),
            (&self.native_target, "public.users"),
        ] {
            // Apart: VACUUM may not run in the implicit transaction of a multi-statement query.
            client
                .batch_execute(&format!("VACUUM (ANALYZE) {table}"))
                .await
                .unwrap();
            client.batch_execute("CHECKPOINT").await.unwrap();
        }
    }

    /// Runs `who` alone and waits until it has applied everything written so far.
    async fn only(&mut self, who: Who) {
        let other = match who {
            Who::Usersync => Who::Native,
            Who::Native => Who::Usersync,
        };
        self.contender_stop(other).await;
        self.contender_start(who).await;
        self.catch_up(who).await;
    }

    async fn catch_up(&mut self, who: Who) -> Duration {
        let marker = self.new_user();
        insert_user(&self.source, &marker).await;
        self.wait_visible(who, &marker.id).await
    }

    /// Inserts `rows` new users in one transaction. Returns the last user's id, the instant the
    /// commit returned and how long the transaction took on the source (with generating it).
    async fn bulk_insert(&mut self, rows: u64) -> (String, Instant, Duration) {
        let started = Instant::now();
        self.source.batch_execute("BEGIN").await.unwrap();
        let mut last = String::new();
        let users = (0..rows).map(|_| {
            let user = User::generate(self.rng.uuid(), &mut self.rng, self.rows);
            last.clone_from(&user.id);
            user
        });
        copy_users(&self.source, users).await;
        self.source.batch_execute("COMMIT").await.unwrap();
        (last, Instant::now(), started.elapsed())
    }

    fn new_user(&mut self) -> User {
        let id = self.rng.uuid();
        User::generate(id, &mut self.rng, self.rows)
    }

    fn target(&self, who: Who) -> &Client {
        match who {
            Who::Usersync => &self.usersync_target,
            Who::Native => &self.native_target,
        }
    }

    /// Polls until the user `id` is on `who`'s target; returns how long that took.
    async fn wait_visible(&self, who: Who, id: &str) -> Duration {
        let query = match who {
            Who::Usersync => "SELECT EXISTS (SELECT 1 FROM neon_auth.users_sync WHERE id = $1)",
            Who::Native => "SELECT EXISTS (SELECT 1 FROM public.users WHERE id = $1::text::uuid)",
        };
        let statement = self.target(who).prepare(query).await.unwrap();
        let started = Instant::now();
        loop {
            let seen: bool = self
                .target(who)
                .query_one(&statement, &[&id])
                .await
                .unwrap()
                .get(0);
            if seen {
                return started.elapsed();
            }
            if let Some(running) = &self.usersync {
                assert!(
                    !running.task.is_finished(),
                    "the in-process replicator stopped"
                );
            }
            assert!(
                started.elapsed() < WAIT_LIMIT,
                "{who:?} did not replicate {id} within {WAIT_LIMIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn reset_lag(&self, who: Who) {
        self.target(who)
            .batch_execute("TRUNCATE public.bench_lag")
            .await
            .unwrap();
    }

    /// (samples, p50, p95, p99, max) in seconds.
    async fn lag(&self, who: Who) -> (i64, [f64; 4]) {
        let row = self
            .target(who)
            .query_one(LAG_PERCENTILES, &[])
            .await
            .unwrap();
        let count: i64 = row.get(0);
        let percentiles: Option<Vec<f64>> = row.get(1);
        let max: Option<f64> = row.get(2);
        let p = percentiles.unwrap_or_else(|| vec![f64::NAN; 3]);
        (count, [p[0], p[1], p[2], max.unwrap_or(f64::NAN)])
    }

    fn usersync_metrics(&self) -> Option<MetricSnapshot> {
        self.usersync
            .as_ref()
            .map(|r| MetricSnapshot::read(&r.metrics))
    }

    async fn current_wal_lsn(&self) -> String {
        self.source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// Sums of usersync's batch histograms at one moment; differences give a phase's breakdown.
#[derive(Clone, Copy, Default)]
struct MetricSnapshot {
    batches: f64,
    /// Target transactions that carried at most one change (the histogram's first bucket).
    single_change_batches: f64,
    changes: f64,
    apply_seconds: f64,
}

impl MetricSnapshot {
    fn read(metrics: &Metrics) -> MetricSnapshot {
        let text = metrics.encode();
        let value = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        MetricSnapshot {
            batches: value("usersync_batch_size_changes_count"),
            single_change_batches: value("usersync_batch_size_changes_bucket{le=\"1.0\"}"),
            changes: value("usersync_batch_size_changes_sum"),
            apply_seconds: value("usersync_apply_duration_seconds_sum"),
        }
    }

    fn describe_since(&self, before: &MetricSnapshot, wall: Duration) -> String {
        let batches = self.batches - before.batches;
        let single = self.single_change_batches - before.single_change_batches;
        let changes = self.changes - before.changes;
        let apply = self.apply_seconds - before.apply_seconds;
        format!(
            "{batches:.0} target transactions ({:.0}% with a single change), {:.1} changes \
             each, {:.2} ms apply each, apply {:.0}% of {:.1}s",
            single * 100.0 / batches.max(1.0),
            changes / batches.max(1.0),
            apply * 1000.0 / batches.max(1.0),
            apply * 100.0 / wall.as_secs_f64().max(1e-9),
            wall.as_secs_f64()
        )
    }
}

/// SplitMix64: ids and choices need to differ, not to be secret. (Not xorshift: seeding a
/// task with the next output of another xorshift generator would replay its sequence.)
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
}

/// FNV-1a of a user id: the seed of what never changes about that user.
fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

const FIRST_NAMES: [&str; 16] = [
    "Olivia", "Liam", "Amara", "Noah", "Sofia", "Mateo", "Yuki", "Aarav", "Chloe", "Lucas",
    "Fatima", "Ethan", "Ingrid", "Kwame", "Mei", "Tomasz",
];
const LAST_NAMES: [&str; 16] = [
    "Johnson",
    "Garcia",
    "Okafor",
    "Müller",
    "Rossi",
    "Tanaka",
    "Patel",
    "Dubois",
    "Silva",
    "Kowalski",
    "Nguyen",
    "Larsen",
    "Haddad",
    "Smith",
    "Fernández",
    "Ivanova",
];
const EMAIL_DOMAINS: [&str; 6] = [
    "gmail.com",
    "outlook.com",
    "proton.me",
    "icloud.com",
    "example.org",
    "acme-corp.io",
];
const SOCIAL_PROVIDERS: [&str; 4] = ["google", "github", "apple", "microsoft"];
const LOCALES: [&str; 8] = [
    "en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "pt-BR", "ja-JP", "pl-PL",
];
const PLANS: [&str; 4] = ["free", "free", "pro", "team"];
/// The documents' clock: sign-ups spread over the three years before 2025-01-01.
const DOCUMENT_EPOCH_MICROS: i64 = 1_735_689_600_000_000;
const SIGN_UP_SPAN_MICROS: usize = 3 * 365 * 86_400 * 1_000_000;

/// One user of the source table. What never changes about a user (name, email, providers,
/// sign-up time) is drawn from its id, so an update rewrites the same user; what does (display
/// name, plan, counts, flags, last sign-in) is drawn from the caller's generator.
struct User {
    id: String,
    email: String,
    display_name: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The `raw` jsonb as JSON text.
    raw: String,
}

impl User {
    fn generate(id: String, rng: &mut Rng, weight: RowWeight) -> User {
        let mut stable = Rng::new(seed_of(&id));
        let first = stable.pick(&FIRST_NAMES);
        let last = stable.pick(&LAST_NAMES);
        let email = format!(
            "{}.{}.{}@{}",
            first.to_lowercase(),
            last.to_lowercase(),
            &id[..6],
            stable.pick(&EMAIL_DOMAINS)
        );
        // At least a microsecond before the epoch, so every span below is positive.
        let created = DOCUMENT_EPOCH_MICROS - 1 - stable.below(SIGN_UP_SPAN_MICROS) as i64;
        let since_sign_up = (DOCUMENT_EPOCH_MICROS - created) as usize;
        let linked = created + stable.below(since_sign_up) as i64;
        let social = stable.pick(&SOCIAL_PROVIDERS);
        let social_uid = stable.next() % 10u64.pow(19);

        let display_name = match rng.below(3) {
            0 => format!("{first} {last}"),
            1 => format!("{first} {}.", last.chars().next().unwrap_or('X')),
            _ => format!("{first}{}", rng.below(1000)),
        };
        let last_sign_in = linked + rng.below((DOCUMENT_EPOCH_MICROS - linked) as usize) as i64;
        let updated = last_sign_in + rng.below(60_000_000) as i64;
        let raw = match weight {
            RowWeight::Realistic => json!({
                "id": id,
                "email": email,
                "providers": [
                    {"provider": "email"},
                    {
                        "provider": social,
                        "uid": social_uid.to_string(),
                        "linked_at": rfc3339(linked),
                    },
                ],
                "metadata": {
                    "name": display_name,
                    "locale": rng.pick(&LOCALES),
                    "plan": rng.pick(&PLANS),
                    "sign_in_count": 1 + rng.below(500),
                    "failed_sign_ins": rng.below(4),
                    "mfa_enabled": rng.chance(20),
                    "newsletter": rng.chance(50),
                    "banned": rng.chance(1),
                    "last_sign_in_at": rfc3339(last_sign_in),
                },
                "created_at": rfc3339(created),
                "updated_at": rfc3339(updated),
            }),
            RowWeight::Light => json!({
                "plan": rng.pick(&PLANS),
                "sign_in_count": 1 + rng.below(500),
            }),
        }
        .to_string();
        User {
            id,
            email,
            display_name,
            created_at: timestamp(created),
            updated_at: timestamp(updated),
            raw,
        }
    }

    /// The parameters of [`INSERT_USER`].
    fn insert_params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.id,
            &self.email,
            &self.display_name,
            &self.created_at,
            &self.updated_at,
            &self.raw,
        ]
    }

    /// Appends this user as one line of `COPY_USERS`'s text format.
    fn write_copy_line(&self, out: &mut BytesMut) {
        let created_at = self.created_at.to_rfc3339();
        let updated_at = self.updated_at.to_rfc3339();
        let fields = [
            self.id.as_str(),
            &self.email,
            &self.display_name,
            &created_at,
            &updated_at,
            &self.raw,
        ];
        for (i, field) in fields.into_iter().enumerate() {
            if i > 0 {
                out.put_u8(b'\t');
            }
            for byte in field.bytes() {
                match byte {
                    b'\\' => out.put_slice(b"\\\\"),
                    b'\t' => out.put_slice(b"\\t"),
                    b'\n' => out.put_slice(b"\\n"),
                    b'\r' => out.put_slice(b"\\r"),
                    byte => out.put_u8(byte),
                }
            }
        }
        out.put_u8(b'\n');
    }
}

fn timestamp(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).expect("a timestamp within chrono's range")
}

/// Timestamps in the documents are strings, as identity stores write them.
fn rfc3339(micros: i64) -> String {
    timestamp(micros).to_rfc3339_opts(SecondsFormat::Millis, true)
}

const INSERT_USER: &str =
    "INSERT INTO public.users (id, email, display_name, created_at, updated_at, raw)
     VALUES ($1::text::uuid, $2, $3, $4, $5, $6::text::jsonb)";
/// `changed_at` is set explicitly: its default only applies to inserts.
const UPDATE_USER: &str = "UPDATE public.users
        SET display_name = $2, raw = $3::text::jsonb, updated_at = now(),
            changed_at = clock_timestamp()
      WHERE id = $1::text::uuid";
const DELETE_USER: &str = "DELETE FROM public.users WHERE id = $1::text::uuid";
const COPY_USERS: &str =
    "COPY public.users (id, email, display_name, created_at, updated_at, raw) FROM STDIN";

async fn insert_user(client: &Client, user: &User) {
    client
        .execute(INSERT_USER, &user.insert_params())
        .await
        .unwrap();
}

/// Writes `users` into the source table with one COPY (inside the client's transaction, if
/// one is open); returns the number of rows.
async fn copy_users(client: &Client, users: impl IntoIterator<Item = User>) -> u64 {
    let sink = client.copy_in(COPY_USERS).await.unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut buffer = BytesMut::with_capacity(2 * COPY_CHUNK_BYTES);
    for user in users {
        user.write_copy_line(&mut buffer);
        if buffer.len() >= COPY_CHUNK_BYTES {
            sink.send(buffer.split().freeze()).await.unwrap();
        }
    }
    if !buffer.is_empty() {
        sink.send(buffer.split().freeze()).await.unwrap();
    }
    sink.as_mut().finish().await.unwrap()
}

/// How a load run is paced.
#[derive(Clone, Copy)]
enum Pace {
    /// This many transactions per second for this long.
    Rate { per_second: f64, seconds: f64 },
    /// This many transactions, as fast as the connections go.
    Count(u64),
}

struct LoadResult {
    transactions: u64,
    elapsed: Duration,
}

/// Writes the 60/35/5 insert/update/delete mix, one change per transaction, on
/// [`LOAD_CONNECTIONS`] connections. Updates and deletes pick preloaded users at random.
async fn generate_load(bench: &mut Bench, pace: Pace) -> LoadResult {
    let mut pool = std::mem::take(&mut bench.id_pool);
    let share = pool.len() / LOAD_CONNECTIONS;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..LOAD_CONNECTIONS {
        let ids: Vec<String> = pool.split_off(pool.len() - share);
        let url = bench.source_url.clone();
        let seed = bench.rng.next();
        let rows = bench.rows;
        tasks.push(load_runtime().spawn(async move {
            load_connection(url, ids, seed, rows, pace, index, started).await
        }));
    }
    let mut transactions = 0;
    for task in tasks {
        let (done, ids) = task.await.expect("load task");
        transactions += done;
        pool.extend(ids);
    }
    bench.id_pool = pool;
    LoadResult {
        transactions,
        elapsed: started.elapsed(),
    }
}

/// One load connection; returns its transactions and its share of the pool, less the users it
/// deleted.
async fn load_connection(
    url: String,
    mut ids: Vec<String>,
    seed: u64,
    rows: RowWeight,
    pace: Pace,
    index: usize,
    started: Instant,
) -> (u64, Vec<String>) {
    let client = connect_url(&url).await;
    let insert = client.prepare(INSERT_USER).await.unwrap();
    let update = client.prepare(UPDATE_USER).await.unwrap();
    let delete = client.prepare(DELETE_USER).await.unwrap();
    let mut rng = Rng::new(seed);
    let mut done: u64 = 0;
    let connections = LOAD_CONNECTIONS as u64;
    loop {
        match pace {
            Pace::Rate {
                per_second,
                seconds,
            } => {
                // Transaction n of this connection is due at (n * connections + index) / rate:
                // an absolute schedule, so a slow round trip is made up, not lost.
                let due = ((done * connections + index as u64) as f64) / per_second;
                if due >= seconds {
                    break;
                }
                let due = started + Duration::from_secs_f64(due);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            Pace::Count(total) => {
                if done * connections + index as u64 >= total {
                    break;
                }
            }
        }
        let roll = rng.below(100);
        if roll < 60 || ids.is_empty() {
            let id = rng.uuid();
            let user = User::generate(id, &mut rng, rows);
            client
                .execute(&insert, &user.insert_params())
                .await
                .unwrap();
        } else if roll < 95 {
            let id = ids[rng.below(ids.len())].clone();
            let user = User::generate(id, &mut rng, rows);
            let updated = client
                .execute(&update, &[&user.id, &user.display_name, &user.raw])
                .await
                .unwrap();
            assert_eq!(updated, 1, "the pool holds only live preloaded users");
        } else {
            let id = ids.swap_remove(rng.below(ids.len()));
            let deleted = client.execute(&delete, &[&id]).await.unwrap();
            assert_eq!(deleted, 1, "the pool holds only live preloaded users");
        }
        done += 1;
    }
    (done, ids)
}

/// The load generator's own runtime and threads: on the bench's runtime, the in-process
/// usersync's tasks queued behind the 8 load connections' tasks, which native's apply worker,
/// a process of its own, never does.
fn load_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-load")
            .enable_all()
            .build()
            .expect("the load generator's runtime")
    })
}

/// In-process usersync gets a runtime of its own, as `usersync run` has: one worker per core
/// (tokio's default, as in `main.rs`), or `USERSYNC_BENCH_WORKERS`, which measures what the
/// thread count does to lag under saturation.
fn usersync_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(workers) = env_parse::<usize>("USERSYNC_BENCH_WORKERS").filter(|&w| w > 0) {
            builder.worker_threads(workers);
        }
        builder
            .thread_name("usersync")
            .enable_all()
            .build()
            .expect("usersync's runtime")
    })
}

async fn connect_url(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

#[tokio::main]
async fn main() {
    let settings = Settings::from_env();
    let mut report = Report::default();
    let mut bench = start(&settings, &mut report).await;

    if settings.runs("steady") {
        steady(&mut bench, &settings, &mut report).await;
    }
    if settings.runs("drain") {
        drain(&mut bench, &settings, &mut report).await;
    }
    if settings.runs("bulk") {
        bulk(&mut bench, &settings, &mut report).await;
    }
    if settings.runs("rss") {
        peak_rss(&mut bench, &settings, &mut report).await;
    }
    bench.contender_stop(Who::Usersync).await;
    bench.contender_stop(Who::Native).await;

    report.print();
    if settings.json {
        println!("{}", report.json());
    }
}

/// Servers, the source table filled, and section 1: both initial copies.
async fn start(settings: &Settings, report: &mut Report) -> Bench {
    let options = LocalPgOptions {
        superuser_password: PASSWORD.into(),
        extra_conf: DURABLE_SETTINGS
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect(),
        ..LocalPgOptions::default()
    };
    let source_pg = LocalPg::start(&options).expect("start the source server");
    let mut target_options = options.clone();
    if let Some(delay) = env_parse::<u32>("USERSYNC_BENCH_TARGET_FLUSH_DELAY_US") {
        target_options.extra_conf.extend([
            ("commit_delay".to_owned(), delay.to_string()),
            ("commit_siblings".to_owned(), "0".to_owned()),
        ]);
    }
    let target_pg = LocalPg::start(&target_options).expect("start the target server");
    eprintln!(
        "servers up: PostgreSQL {} (source port {}, target port {})",
        source_pg.server_version_num(),
        source_pg.port(),
        target_pg.port()
    );
    let source_url = source_pg.url("postgres", PASSWORD, "postgres");
    let source = connect_url(&source_url).await;
    source.batch_execute(USERS_TABLE).await.unwrap();
    let users = settings.snapshot_users;
    let fill = Instant::now();
    let mut rng = Rng::new(0x5eed_cafe_f00d);
    // Every stride-th preloaded user joins the pool, so the load touches the whole table.
    let stride = (users / settings.id_pool).max(1);
    let mut id_pool = Vec::new();
    let preloaded = (0..users).map(|n| {
        let user = User::generate(rng.uuid(), &mut rng, settings.rows);
        if n % stride == 0 && (id_pool.len() as u64) < settings.id_pool {
            id_pool.push(user.id.clone());
        }
        user
    });
    copy_users(&source, preloaded).await;
    source.batch_execute("VACUUM ANALYZE users").await.unwrap();
    eprintln!(
        "source filled with {users} users in {:.1}s",
        fill.elapsed().as_secs_f64()
    );
    let sizes = source
        .query_one(
            "SELECT avg(octet_length(raw::text))::float8, avg(pg_column_size(raw))::float8,
                    avg(pg_column_size(users.*))::float8
               FROM public.users",
            &[],
        )
        .await
        .unwrap();
    report.note(format!(
        "{:?} rows: raw averages {:.0} bytes as text, {:.0} bytes stored \
         (pg_column_size); a whole row {:.0} bytes; {} preloaded users in the load's pool, \
         {LOAD_CONNECTIONS} load connections; source and target with {}",
        settings.rows,
        sizes.get::<_, f64>(0),
        sizes.get::<_, f64>(1),
        sizes.get::<_, f64>(2),
        id_pool.len(),
        DURABLE_SETTINGS
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let admin = connect_url(&target_pg.url("postgres", PASSWORD, "postgres")).await;
    for database in [USERSYNC_DB, NATIVE_DB] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
    }

    let config = Config {
        source: source_url.parse().unwrap(),
        target: target_pg
            .url("postgres", PASSWORD, USERSYNC_DB)
            .parse()
            .unwrap(),
        table: "public.users".parse().unwrap(),
        slot: SLOT.into(),
        publication: PUBLICATION.into(),
        // Named, not defaulted: a column missing from the table fails setup instead of being
        // skipped. Every other column (raw, updated_at, changed_at) rides along in raw_json.
        mapping: GenericMapping {
            id_column: ID_COLUMN.into(),
            email_column: Some(EMAIL_COLUMN.into()),
            display_name_column: Some(DISPLAY_NAME_COLUMN.into()),
            signed_up_at_column: Some(SIGNED_UP_AT_COLUMN.into()),
            ..GenericMapping::default()
        }
        .into(),
        lag_target: Duration::from_secs(1),
        // No heartbeats: they would be extra source transactions only usersync writes.
        heartbeat_interval: None,
        source_timeout: usersync::config::DEFAULT_SOURCE_TIMEOUT,
        spill_threshold: usersync::decode::DEFAULT_MEMORY_LIMIT,
        routes: None,
        routes_file: None,
        route: None,
        evict_after: None,
        evict_after_wal: None,
    };
    // A new cluster creates (and zero-fills) every WAL segment it writes until checkpoints
    // start recycling them: whoever copies first would pay for it alone (about a quarter of
    // the target writers' time in a profile of the copy). Both turns start from recycled
    // segments and a checkpoint instead.
    warm_wal(&admin).await;
    source.batch_execute("CHECKPOINT").await.unwrap();
    eprintln!("snapshot: usersync setup");
    let started = Instant::now();
    setup(&config, SetupOptions::default())
        .await
        .expect("usersync setup");
    let ours = started.elapsed();

    eprintln!("snapshot: native copy_data");
    let native_target = connect_url(&target_pg.url("postgres", PASSWORD, NATIVE_DB)).await;
    native_target.batch_execute(USERS_TABLE).await.unwrap();
    // Autovacuum would otherwise take on usersync's freshly copied table during native's turn.
    connect_url(&target_pg.url("postgres", PASSWORD, USERSYNC_DB))
        .await
        .batch_execute("VACUUM (ANALYZE) neon_auth.users_sync")
        .await
        .unwrap();
    for client in [&source, &admin] {
        client.batch_execute("CHECKPOINT").await.unwrap();
    }
    let started = Instant::now();
    native_target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {NATIVE_SUBSCRIPTION} CONNECTION '{}' PUBLICATION {PUBLICATION}",
            source_url.replace('\'', "''")
        ))
        .await
        .unwrap();
    // Copied ('f', committed with the data) is native's end of the copy, as the end of
    // `setup` is usersync's: both then catch up with the stream. Ready ('r') would add up to a
    // second of waiting for the apply worker's next look at its tables.
    loop {
        let ready: bool = native_target
            .query_one(
                "SELECT count(*) > 0 AND bool_and(srsubstate IN ('f', 's', 'r'))
                   FROM pg_subscription_rel",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ready {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let theirs = started.elapsed();
    let rate = |took: Duration| users as f64 / took.as_secs_f64();
    report.add(
        &format!("snapshot {users} users"),
        "copy rate",
        "rows/s",
        Some(rate(ours)),
        Some(rate(theirs)),
    );
    report.add(
        &format!("snapshot {users} users"),
        "copy time",
        "s",
        Some(ours.as_secs_f64()),
        Some(theirs.as_secs_f64()),
    );

    let target_url = target_pg.url("postgres", PASSWORD, USERSYNC_DB);
    let usersync_target = connect_url(&target_url).await;
    usersync_target
        .batch_execute(&format!("{LAG_TABLE}; {USERSYNC_LAG_TRIGGER}"))
        .await
        .unwrap();
    native_target
        .batch_execute(&format!("{LAG_TABLE}; {NATIVE_LAG_TRIGGER}"))
        .await
        .unwrap();
    let mut bench = Bench {
        source_pg,
        _target_pg: target_pg,
        source_url,
        target_url,
        source,
        usersync_target,
        native_target,
        config,
        usersync: None,
        native_enabled: true,
        id_pool,
        rows: settings.rows,
        rng,
    };
    bench.contender_start(Who::Usersync).await;
    bench.catch_up(Who::Usersync).await;
    bench.catch_up(Who::Native).await;
    let sample = bench
        .usersync_target
        .query_one(
            "SELECT min(raw_json ->> 'changed_at'), bool_and(raw_json ? 'raw'),
                    avg(pg_column_size(raw_json))::float8
               FROM (SELECT raw_json FROM neon_auth.users_sync LIMIT 10000) sample",
            &[],
        )
        .await
        .unwrap();
    report.note(format!(
        "usersync raw_json carries changed_at (e.g. {:?}) and raw ({}), {:.0} bytes stored",
        sample.get::<_, Option<String>>(0),
        match sample.get::<_, Option<bool>>(1) {
            Some(true) => "every row",
            _ => "NOT every row",
        },
        sample.get::<_, Option<f64>>(2).unwrap_or(f64::NAN)
    ));
    bench
}

/// Writes and switches through a `max_wal_size` of WAL segments, then checkpoints, so that the
/// server recycles them for what comes next instead of creating new ones.
async fn warm_wal(client: &Client) {
    let segments: i64 = client
        .query_one(
            "SELECT pg_size_bytes(current_setting('max_wal_size'))
                    / pg_size_bytes(current_setting('wal_segment_size'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for _ in 0..segments {
        client
            .batch_execute(
                "SELECT pg_logical_emit_message(false, 'usersync_bench', 'warm');
                 SELECT pg_switch_wal()",
            )
            .await
            .unwrap();
    }
    client.batch_execute("CHECKPOINT").await.unwrap();
}

/// Section 2: lag under a fixed rate.
async fn steady(bench: &mut Bench, settings: &Settings, report: &mut Report) {
    for (turn, &rate) in settings.rates.iter().enumerate() {
        let section = format!("steady {rate:.0} tx/s, {:.0}s", settings.seconds);
        let mut lags: [[Option<f64>; 4]; 2] = [[None; 4]; 2];
        let mut achieved = [None; 2];
        // Who goes first alternates, so that neither always meets what the previous
        // section left running on the servers.
        let order = if turn % 2 == 0 {
            [Who::Usersync, Who::Native]
        } else {
            [Who::Native, Who::Usersync]
        };
        for who in order {
            let slot = usize::from(who == Who::Native);
            eprintln!("{section}: {who:?}");
            bench.only(who).await;
            bench.settle_servers().await;
            bench.reset_lag(who).await;
            let before = bench.usersync_metrics();
            let load = generate_load(
                bench,
                Pace::Rate {
                    per_second: rate,
                    seconds: settings.seconds,
                },
            )
            .await;
            let drained = bench.catch_up(who).await;
            let wall = load.elapsed + drained;
            let rate_achieved = load.transactions as f64 / load.elapsed.as_secs_f64();
            achieved[slot] = Some(rate_achieved);
            let (samples, lag) = bench.lag(who).await;
            for (i, value) in lag.iter().enumerate() {
                lags[slot][i] = Some(*value * 1000.0);
            }
            eprintln!(
                "  {} tx in {:.1}s ({rate_achieved:.0}/s), {samples} lag samples, p50 {:.1} ms, p99 {:.1} ms",
                load.transactions,
                load.elapsed.as_secs_f64(),
                lag[0] * 1000.0,
                lag[2] * 1000.0
            );
            if let (Some(before), Some(after)) = (before, bench.usersync_metrics()) {
                report.note(format!(
                    "{section}, usersync: {}",
                    after.describe_since(&before, wall)
                ));
            }
        }
        report.add(&section, "load achieved", "tx/s", achieved[0], achieved[1]);
        for (i, name) in ["lag p50", "lag p95", "lag p99", "lag max"]
            .into_iter()
            .enumerate()
        {
            report.add(&section, name, "ms", lags[0][i], lags[1][i]);
        }
    }
}

/// Section 3: a backlog written while both are stopped, then each catches up alone.
async fn drain(bench: &mut Bench, settings: &Settings, report: &mut Report) {
    let section = format!("backlog drain {} tx", settings.backlog);
    eprintln!("{section}: both catching up, then stopping");
    bench.contender_start(Who::Usersync).await;
    bench.contender_start(Who::Native).await;
    bench.catch_up(Who::Usersync).await;
    bench.catch_up(Who::Native).await;
    bench.contender_stop(Who::Usersync).await;
    bench.contender_stop(Who::Native).await;
    bench
        .source
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{DECODE_SLOT}', 'pgoutput')"
        ))
        .await
        .unwrap();
    let started = Instant::now();
    let load = generate_load(bench, Pace::Count(settings.backlog)).await;
    let marker = bench.new_user();
    insert_user(&bench.source, &marker).await;
    let transactions = load.transactions + 1;
    let end_lsn = bench.current_wal_lsn().await;
    eprintln!(
        "  backlog of {transactions} tx written in {:.1}s, ending at {end_lsn}",
        started.elapsed().as_secs_f64()
    );
    let retained: String = bench
        .source
        .query_one(
            "SELECT pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = $1",
            &[&DECODE_SLOT],
        )
        .await
        .unwrap()
        .get(0);
    report.note(format!("{section}: the backlog is {retained} of WAL"));

    // The physical limit: the walsender decoding the same WAL through pgoutput, nothing applied.
    let pg_recvlogical = bench.source_pg.bin_dir().join("pg_recvlogical");
    let started = Instant::now();
    let status = Command::new(&pg_recvlogical)
        .args(["-d", &bench.source_url, "--slot", DECODE_SLOT, "--start"])
        .args(["-E", &end_lsn, "--no-loop", "-f", "/dev/null"])
        .args(["-o", "proto_version=2", "-o"])
        .arg(format!("publication_names={PUBLICATION}"))
        .stdout(Stdio::null())
        .status()
        .expect("run pg_recvlogical");
    let decode = started.elapsed();
    assert!(status.success(), "pg_recvlogical failed: {status}");
    bench
        .source
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{DECODE_SLOT}')"))
        .await
        .unwrap();

    let mut took = [Duration::ZERO; 2];
    for (slot, who) in [Who::Usersync, Who::Native].into_iter().enumerate() {
        eprintln!("{section}: {who:?}");
        bench.settle_servers().await;
        bench.contender_start(who).await;
        bench
            .wait_slot_active(match who {
                Who::Usersync => SLOT,
                Who::Native => NATIVE_SUBSCRIPTION,
            })
            .await;
        let started = Instant::now();
        let before = bench.usersync_metrics();
        bench.wait_visible(who, &marker.id).await;
        took[slot] = started.elapsed();
        if let (Some(before), Some(after)) = (before, bench.usersync_metrics()) {
            report.note(format!(
                "{section}, usersync: {}",
                after.describe_since(&before, took[slot])
            ));
        }
        bench.contender_stop(who).await;
    }
    let rate = |d: Duration| transactions as f64 / d.as_secs_f64();
    report.add(
        &section,
        "catch-up rate",
        "tx/s",
        Some(rate(took[0])),
        Some(rate(took[1])),
    );
    report.add(
        &section,
        "catch-up time",
        "s",
        Some(took[0].as_secs_f64()),
        Some(took[1].as_secs_f64()),
    );
    report.add(
        &section,
        "pg_recvlogical decode rate",
        "tx/s",
        Some(rate(decode)),
        Some(rate(decode)),
    );
    report.note(format!(
        "{section}: pg_recvlogical (proto_version=2, into /dev/null) decoded it in {:.2}s; \
         usersync reaches {:.0}% of that rate, native {:.0}%",
        decode.as_secs_f64(),
        100.0 * decode.as_secs_f64() / took[0].as_secs_f64(),
        100.0 * decode.as_secs_f64() / took[1].as_secs_f64()
    ));
}

/// Section 4: one large transaction, from its commit to its last row on the target.
async fn bulk(bench: &mut Bench, settings: &Settings, report: &mut Report) {
    let rows = settings.bulk;
    let section = format!("bulk 1 tx of {rows} inserts");
    let mut took = [Duration::ZERO; 2];
    for (slot, who) in [Who::Usersync, Who::Native].into_iter().enumerate() {
        eprintln!("{section}: {who:?}");
        bench.only(who).await;
        bench.settle_servers().await;
        let before = bench.usersync_metrics();
        let (last, commit, _) = bench.bulk_insert(rows).await;
        bench.wait_visible(who, &last).await;
        took[slot] = commit.elapsed();
        if let (Some(before), Some(after)) = (before, bench.usersync_metrics()) {
            report.note(format!(
                "{section}, usersync: {}",
                after.describe_since(&before, took[slot])
            ));
        }
    }
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    report.add(
        &section,
        "commit to last row",
        "rows/s",
        Some(rate(took[0])),
        Some(rate(took[1])),
    );
    report.add(
        &section,
        "commit to last row",
        "s",
        Some(took[0].as_secs_f64()),
        Some(took[1].as_secs_f64()),
    );
}

/// Section 5: the real binary's peak RSS through one very large transaction.
async fn peak_rss(bench: &mut Bench, settings: &Settings, report: &mut Report) {
    let rows = settings.rss_users;
    let section = format!("memory, 1 tx of {rows} inserts");
    eprintln!("{section}: usersync run (child process)");
    bench.contender_stop(Who::Native).await;
    bench.contender_stop(Who::Usersync).await;
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_usersync"));
    let mut child = Command::new(&binary)
        .arg("run")
        .env("USERSYNC_SOURCE_URL", &bench.source_url)
        .env("USERSYNC_TARGET_URL", &bench.target_url)
        .env("USERSYNC_SLOT", SLOT)
        .env("USERSYNC_PUBLICATION", PUBLICATION)
        .env("USERSYNC_TABLE", "public.users")
        .env("USERSYNC_PROFILE", "generic")
        .env("USERSYNC_ID_COLUMN", ID_COLUMN)
        .env("USERSYNC_EMAIL_COLUMN", EMAIL_COLUMN)
        .env("USERSYNC_DISPLAY_NAME_COLUMN", DISPLAY_NAME_COLUMN)
        .env("USERSYNC_SIGNED_UP_AT_COLUMN", SIGNED_UP_AT_COLUMN)
        .env("USERSYNC_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start usersync run");
    let pid = child.id();
    bench.catch_up(Who::Usersync).await;
    let idle = vm_hwm_kib(pid).unwrap_or(0);
    let (last, commit, source_took) = bench.bulk_insert(rows).await;
    bench.wait_visible(Who::Usersync, &last).await;
    let replicated = commit.elapsed();
    // VmHWM is the kernel's own high-water mark: one read after the fact is the peak.
    let peak = vm_hwm_kib(pid).unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    report.add(
        &section,
        "usersync run peak RSS",
        "MiB",
        Some(peak as f64 / 1024.0),
        None,
    );
    report.add(
        &section,
        "commit to last row",
        "rows/s",
        Some(rows as f64 / replicated.as_secs_f64()),
        None,
    );
    report.note(format!(
        "{section}: VmHWM {:.1} MiB when idle, {:.1} MiB after; the source took {:.1}s to \
         write it, usersync {:.1}s from commit to last row (native not measured: the apply \
         worker's RSS counts shared buffers)",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        source_took.as_secs_f64(),
        replicated.as_secs_f64()
    ));
}

/// `VmHWM` (peak resident set) of a process in KiB, or `None` once it has gone.
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
