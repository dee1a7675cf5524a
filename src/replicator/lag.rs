//! A session's view of its lag: source commit to visible on the target, published to the
//! metrics as batches apply, heartbeats come through, and work waits.
//!
//! The source's clock is not this host's: every commit time is corrected by the offset
//! the reader observes in the server's own timestamps ([`ClockOffset`]) before it is
//! compared with now.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::UnixMicros;
use crate::decode::pg_micros_to_unix_micros;
use crate::lag::{lag_at_offset, local_time_at_offset, unix_micros_now, ClockOffset};
use crate::metrics::Metrics;

/// The last-minute lag percentiles are recomputed at most this often (a sort of the window).
const RECENT_LAG_REFRESH: Duration = Duration::from_secs(1);

/// The reader's estimate of the source's clock, kept up to date for the routes.
#[derive(Default)]
pub(super) struct ClockWatch {
    clock: ClockOffset,
    shared: SharedClock,
}

impl ClockWatch {
    /// What the routes read.
    pub fn shared(&self) -> SharedClock {
        self.shared.clone()
    }

    /// The server's clock read `server_time_micros` (PostgreSQL epoch) as it sent a message.
    pub fn observe_server_time(&mut self, server_time_micros: i64, metrics: &Metrics) {
        self.clock.observe(
            pg_micros_to_unix_micros(server_time_micros),
            unix_micros_now(),
        );
        let micros = self.clock.micros();
        self.shared.0.store(micros, Ordering::Relaxed);
        metrics.set_clock_offset(micros as f64 / 1_000_000.0);
    }
}

/// The source's clock minus this host's, in microseconds, as last estimated.
#[derive(Clone, Default)]
pub(super) struct SharedClock(Arc<AtomicI64>);

impl SharedClock {
    fn micros(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub(super) struct LagTracker {
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// When this session's monitor began to write heartbeats (this host's clock). Older
    /// heartbeats still in the slot were written by an earlier session (this process's before
    /// a reconnect, or another process's before a takeover): their age is the time nobody
    /// streamed, which no user waited for, so they move positions but measure no lag.
    monitor_started: UnixMicros,
    /// Whether the lag is over the target (to log crossings once).
    over_target: bool,
    /// When the last-minute percentiles were last published.
    recent_refreshed: Instant,
    /// The route of a fan-out this tracks (index, name): its lag is its own gauge's.
    route: Option<(usize, String)>,
}

impl LagTracker {
    pub fn new(
        metrics: Arc<Metrics>,
        clock: SharedClock,
        monitor_started: UnixMicros,
        route: Option<(usize, String)>,
    ) -> Self {
        LagTracker {
            metrics,
            clock,
            monitor_started,
            route,
            over_target: false,
            recent_refreshed: Instant::now()
                .checked_sub(RECENT_LAG_REFRESH)
                .unwrap_or_else(Instant::now),
        }
    }

    fn lag(&self, commit_time: UnixMicros, now: UnixMicros) -> Duration {
        lag_at_offset(self.clock.micros(), commit_time, now)
    }

    /// Caught up without heartbeats: the age of a keepalive the server sent at `sent_at`
    /// (Unix microseconds, its clock) is the best estimate of the idle lag.
    pub fn keepalive_while_idle(&mut self, sent_at: UnixMicros) {
        let lag = self.lag(sent_at, unix_micros_now());
        self.set_current(lag);
    }

    /// Transactions committed at `commit_times` became visible on the target just now.
    pub fn applied(&mut self, commit_times: &[UnixMicros]) {
        let applied_at = Instant::now();
        let applied_unix = unix_micros_now();
        let mut last_lag = Duration::ZERO;
        for commit_time in commit_times {
            last_lag = self.lag(*commit_time, applied_unix);
            self.metrics.observe_lag(applied_at, last_lag);
        }
        self.set_current(last_lag);
        self.note(last_lag);
    }

    /// A heartbeat committed at `commit_time` has come through the whole pipeline; caught
    /// up, its age is the current lag.
    pub fn heartbeat_arrived(&mut self, commit_time: UnixMicros, caught_up: bool) {
        if local_time_at_offset(self.clock.micros(), commit_time) < self.monitor_started {
            return;
        }
        let lag = self.lag(commit_time, unix_micros_now());
        self.metrics.set_heartbeat_lag(lag);
        if caught_up {
            self.set_current(lag);
            self.note(lag);
        }
    }

    /// While work waits, the current lag is the age of the oldest waiting commit. Also the
    /// moment to refresh the figures that only change with time: this is called at least
    /// every few seconds (with every status update), whatever the traffic.
    pub fn waiting(&mut self, oldest: Option<UnixMicros>) {
        if let Some(oldest) = oldest {
            let lag = self.lag(oldest, unix_micros_now());
            self.set_current(lag);
            self.note(lag);
        }
        if self.recent_refreshed.elapsed() >= RECENT_LAG_REFRESH {
            self.recent_refreshed = Instant::now();
            self.metrics.refresh_recent_lag(self.recent_refreshed);
        }
    }

    /// The current lag: the process's, or its route's (of which the process shows the largest).
    fn set_current(&self, lag: Duration) {
        match &self.route {
            None => self.metrics.set_current_lag(lag),
            Some((index, name)) => self.metrics.set_route_lag(*index, name, lag),
        }
    }

    /// Logs when the lag crosses the target, once each way.
    fn note(&mut self, lag: Duration) {
        let target = self.metrics.lag_target();
        let over = lag > target;
        let route = self.route.as_ref().map(|(_, name)| name.as_str());
        if over && !self.over_target {
            tracing::warn!(
                route,
                lag_ms = lag.as_millis() as u64,
                target_ms = target.as_millis() as u64,
                "lag is over the target"
            );
        } else if !over && self.over_target {
            tracing::info!(
                route,
                lag_ms = lag.as_millis() as u64,
                target_ms = target.as_millis() as u64,
                "lag is back under the target"
            );
        }
        self.over_target = over;
    }
}
