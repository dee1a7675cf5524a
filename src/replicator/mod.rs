//! The service loop: source → decode → map → apply, one streaming session after another.
//!
//! A session ([`start`]) opens the target (to read the checkpoint), then a fresh replication
//! connection (PostgreSQL 15 cannot restart logical streaming on one connection), and
//! streams from the checkpoint ([`session`]). Each decoded change is mapped to what it means
//! for the target's users ([`changes`]); whole source transactions are grouped into target
//! transactions ([`batcher`]), written by an [`ApplyWorker`](crate::apply::ApplyWorker) on its
//! own task while the stream goes on being read and mapped.
//!
//! Positions only move forward. Target transactions commit asynchronously; the slot is
//! confirmed only up to what a later synchronous commit has made durable, and never past the
//! target's checkpoint ([`ledger`]): a slot found past it at the start of a session means the
//! target lost what it had applied (restored to an earlier point), and the session refuses
//! to stream over that gap. After any failure the next session resumes from the checkpoint
//! and skips transactions it already holds (`commit_lsn < checkpoint.end_lsn`): nothing
//! lost, nothing applied twice. A connection that stays silent is taken for dead
//! ([`silence`]); lag is measured beside it all ([`lag`]).
//!
//! Transient failures reconnect with exponential backoff and jitter; definite ones end `run`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

mod backfill;
mod batcher;
mod changes;
mod fleet;
mod lag;
mod ledger;
mod relations;
mod route;
mod session;
mod silence;
mod start;

use crate::config::Config;
use crate::error::Error;
use crate::liveness::Liveness;
use crate::lsn::Lsn;
use crate::metrics::{Metrics, Side};
use crate::routing::Routes;
pub use backfill::{prefix as copy_message_prefix, resync_message};
use fleet::Fleet;
pub use fleet::RouteHealth;
use start::run_session;

/// Name shown in `pg_stat_activity` and `pg_stat_replication`.
pub const APPLICATION_NAME: &str = "usersync";

/// Status updates are sent at least this often, and at least three times per the source's
/// `wal_sender_timeout` (60 s by default): while a slow batch pauses the reading of the
/// stream, the server's requests for a reply go unseen, and only these keep it from ending
/// the connection as timed out.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that ran this long, or applied a batch, counts as healthy: the next failure
/// starts backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// Time for the work around a request, on top of the longest one, before `/healthz` and
/// systemd's watchdog take the run loop for hung.
const LIVENESS_MARGIN: Duration = Duration::from_secs(30);

/// How long `run` may show no progress before it counts as hung (see [`crate::liveness`]):
/// longer than any one request of a session may take (a [`Limit`]), the longest wait without
/// progress; every other wait shows progress at least every [`STATUS_INTERVAL`].
pub fn liveness_bound(source_timeout: Duration) -> Duration {
    TARGET_TIMEOUT.max(source_timeout) + LIVENESS_MARGIN
}

/// Streams until `shutdown` turns true, reconnecting after transient failures.
pub async fn run(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    run_with_reload(config, metrics, shutdown, None).await
}

/// [`run`], taking the routes files `reload` brings (SIGHUP): their new routes join the
/// fan-out while it streams (see [`fleet`]).
pub async fn run_with_reload(
    config: &Config,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    reload: Option<watch::Receiver<Option<Arc<Routes>>>>,
) -> Result<(), Error> {
    let mut backoff = BACKOFF_MIN;
    metrics.set_slot_name(&config.slot);
    let mut current = config.clone();
    let mut fleet = Fleet::new(config.route_configs().len(), reload);
    let mut rejoined: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let batches_before = metrics.batches();
        // The routes file is the truth at every session's start (a standby taking over, a
        // restart after routes were added): its new routes join.
        add_routes_from_file(&mut current, &mut fleet);
        let result =
            run_session(&current, &metrics, &mut shutdown, Mode::Service, &mut fleet).await;
        if let Some(next) = fleet.next_config.take() {
            // Routes added while streaming: the next session has them.
            current = next;
        }
        metrics.set_ready(false);
        metrics.set_connected(Side::Source, false);
        metrics.set_connected(Side::Target, false);
        if let Err(error) = &result {
            metrics.session_error(error.is_transient());
        }
        match result {
            Ok(Ended::Done) => return Ok(()),
            Ok(Ended::Rejoin) => {
                // A route comes back: at once, but not more often than a route rejoins.
                let wait = rejoined
                    .map(|at| fleet::REJOIN_INTERVAL.saturating_sub(at.elapsed()))
                    .unwrap_or_default();
                rejoined = Some(Instant::now());
                tokio::select! {
                    _ = metrics.liveness().sleep(wait) => {}
                    _ = stopped(&mut shutdown) => return Ok(()),
                }
            }
            Err(error) if error.is_transient() => {
                if matches!(&error, Error::Target(error) if error.is_deadlock())
                    && !fleet.one_connection
                {
                    // Writing the next batch beside the one before cannot deadlock by itself
                    // (their users differ until the one waits for the other), but a trigger
                    // on users_sync that locks rows of its own can: do without it rather than
                    // meet it again on every retry.
                    tracing::warn!(
                        "the target detected a deadlock: a route alone writes with one target \
                         connection from now on, until usersync restarts"
                    );
                    fleet.one_connection = true;
                }
                // Progress means the failure interrupted working replication, not that it keeps
                // failing: otherwise a blip every few seconds would grow backoff to its maximum.
                if started.elapsed() >= HEALTHY_SESSION || metrics.batches() > batches_before {
                    backoff = BACKOFF_MIN;
                }
                let delay = with_jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                metrics.reconnected();
                tracing::warn!(error = %crate::error::report(&error), retry_in_ms = delay.as_millis() as u64, "replication interrupted; reconnecting");
                tokio::select! {
                    _ = metrics.liveness().sleep(delay) => {}
                    _ = stopped(&mut shutdown) => return Ok(()),
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// Reads the routes file of a fan-out again and adds its new routes to `config` (see
/// [`fleet::merge_added`]); a file that cannot be read changes nothing, and is said so.
fn add_routes_from_file(config: &mut Config, fleet: &mut Fleet) {
    let (Some(path), Some(routes)) = (&config.routes_file, &config.routes) else {
        return;
    };
    let loaded = Routes::load_allowing(
        path,
        config.mapping.routing_column(),
        config.target.allow_plaintext_password,
    );
    let new = match loaded {
        Ok(new) => new,
        Err(error) => {
            tracing::warn!(
                error = %crate::error::report(&error),
                "the routes file cannot be read again; its routes stay as they were"
            );
            return;
        }
    };
    if let Some(route) = new
        .routes
        .iter()
        .find(|route| route.target.check_session_endpoint().is_err())
    {
        tracing::warn!(
            route = %route.name,
            "the routes file names a target usersync cannot keep a session on (a pooled \
             endpoint); its routes stay as they were"
        );
        return;
    }
    let (merged, added) = fleet::merge_added(routes, &new);
    if added.is_empty() {
        return;
    }
    for index in &added {
        tracing::info!(route = %merged.routes[*index].name, "route added from the routes file");
    }
    fleet
        .health
        .resize(merged.routes.len(), RouteHealth::default());
    config.routes = Some(Arc::new(merged));
}

/// Resolves once a stop is requested (or the sender is gone, which means the same).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Up to ±25% of the delay, so that many replicators restarting together spread out.
fn with_jitter(delay: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    delay.mul_f64(factor)
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Stopped, or a replay done.
    Done,
    /// A route that went away can come back: a new session lets it catch up.
    Rejoin,
}

/// How a streaming session ends and what it does with changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stream until stopped (`run`).
    Service,
    /// Apply what commits before `until`, then end (`replay`); with `dry_run`, print the
    /// changes as JSON lines instead, and confirm nothing new.
    Replay { until: Lsn, dry_run: bool },
}

impl Mode {
    /// A replay that prints what it would apply and writes nothing.
    fn is_dry_run(self) -> bool {
        matches!(self, Mode::Replay { dry_run: true, .. })
    }
}

/// One session that ends by itself when the replay position is reached (no reconnects, no
/// heartbeats: a replay of what is pending should not itself add WAL to wait for).
pub async fn replay(
    config: &Config,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    until: Lsn,
    dry_run: bool,
) -> Result<(), Error> {
    let mode = Mode::Replay { until, dry_run };
    let mut fleet = Fleet::new(config.route_configs().len(), None);
    let result = run_session(config, &metrics, &mut shutdown, mode, &mut fleet).await;
    metrics.set_ready(false);
    result.map(|_| ())
}

/// How long a target request may go unanswered while a session starts; afterwards the
/// writer's own `statement_timeout` and batch timeout bound every request.
const TARGET_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a request may go unanswered, and the liveness its start shows progress to.
#[derive(Clone, Copy)]
struct Limit<'a> {
    after: Duration,
    liveness: &'a Liveness,
}

impl<'a> Limit<'a> {
    fn new(after: Duration, liveness: &'a Liveness) -> Self {
        Limit { after, liveness }
    }
}

/// `request`, or [`Error::Unanswered`] if it is not done within the limit. Its start is
/// progress (see [`crate::liveness`]): it ends within the limit, one way or the other.
async fn answered<T>(
    limit: Limit<'_>,
    which: &'static str,
    what: &'static str,
    request: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let Limit { after, liveness } = limit;
    liveness.progress();
    tokio::time::timeout(after, request)
        .await
        .unwrap_or(Err(Error::Unanswered { which, what, after }))
}

/// Ends a background task when its owner goes away, on every path.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_liveness_bound_outlasts_every_wait_without_progress() {
        assert_eq!(
            liveness_bound(crate::config::DEFAULT_SOURCE_TIMEOUT),
            crate::liveness::DEFAULT_BOUND
        );
        let short = liveness_bound(Duration::from_secs(2));
        for wait in [
            TARGET_TIMEOUT,
            STATUS_INTERVAL,
            start::STANDBY_POLL,
            batcher::MAX_BATCH_AGE,
        ] {
            assert!(wait < short, "{wait:?}");
        }
        assert_eq!(
            liveness_bound(Duration::from_secs(300)),
            Duration::from_secs(330)
        );
    }
}
