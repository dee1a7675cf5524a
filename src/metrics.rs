//! Every metric usersync exports, named and described in this one module.
//!
//! Names carry the `usersync_` prefix and their unit (`_seconds`, `_bytes`, `_total`);
//! labels are few and bounded (`op`, `side`, `kind`, `status`, and `slot` on the one info
//! series, so rules can join a process to its slot). The lag histogram's buckets
//! are dense around the one-second target and include it exactly, so the share of changes
//! within target is a plain bucket ratio. The registry is encoded as OpenMetrics text by
//! [`Metrics::encode`] for `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::lag::LagWindow;
use crate::liveness::{self, Liveness};

/// Lag buckets in seconds: fine-grained below the target, which is one of them.
const LAG_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
];
/// The source's share of the lag: well under a millisecond on an idle source, a WAL flush or
/// more under load, seconds when its walsender falls behind.
const SEND_DELAY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The most one transaction adds to the source's share (a minute), past every bucket: a
/// server clock stepping forward, or a server sending nonsense, moves the sum that much.
const MAX_SEND_DELAY_MICROS: i64 = 60_000_000;
/// Changes per target transaction: 1 when idle, up to the batch limit under load.
const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
/// Time to apply one batch on the target.
const APPLY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// The kind of a source change, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// Which database a connection goes to, as the `side` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabel {
    slot: String,
    /// The source's system identifier once a session has read it (empty before): `status`
    /// believes this process's lag figures only for its own source and slot.
    system: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLabels {}

/// A route of a fan-out (`--routes`), by name: at most [`crate::routing::MAX_ROUTES`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStateLabel {
    route: String,
    state: &'static str,
}

/// The states a route of a fan-out can be in (see `replicator::fleet`).
pub const ROUTE_STATES: [&str; 6] = [
    "active", "copying", "joining", "draining", "detached", "evicted",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabel {
    quantile: &'static str,
}

/// The slot's possible `wal_status` values (PostgreSQL 13+).
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

type FloatGauge = Gauge<f64, AtomicU64>;

/// The replicator's measurements: Prometheus metrics plus the sliding lag window that
/// `demo` prints. Shared as `Arc<Metrics>`; every update is atomic.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    lag: Histogram,
    source_send_delay: Histogram,
    lag_current: FloatGauge,
    heartbeat_lag: FloatGauge,
    changes: Family<OpLabel, Counter>,
    transactions: Counter,
    skipped_transactions: Counter,
    patches_without_user: Counter,
    batches: Counter,
    batch_size: Histogram,
    apply_duration: Histogram,
    connected: Family<SideLabel, Gauge>,
    reconnects: Counter,
    errors: Family<KindLabel, Counter>,
    slot_retained_wal: Gauge,
    slot_safe_wal_size: Family<NoLabels, Gauge>,
    slot_wal_status: Family<StatusLabel, Gauge>,
    checkpoint_lsn: FloatGauge,
    checkpoint_commit_time: FloatGauge,
    clock_offset: FloatGauge,
    ready: Gauge,
    standby: Gauge,
    standby_since: Family<NoLabels, FloatGauge>,
    slot_info: Family<SlotLabel, Gauge>,
    lag_recent: Family<QuantileLabel, FloatGauge>,
    lag_recent_within_target: Family<NoLabels, FloatGauge>,
    route_state: Family<RouteStateLabel, Gauge>,
    route_lag: Family<RouteLabel, FloatGauge>,
    route_durable_lsn: Family<RouteLabel, FloatGauge>,
    route_changes: Family<RouteLabel, Counter>,
    /// Each route's current lag, in seconds, by its index: the process's current lag is
    /// the largest.
    route_lags: std::sync::Mutex<Vec<f64>>,
    /// Lag samples of the last minute, for percentiles printed by `demo`.
    pub lag_window: LagWindow,
    lag_target: Duration,
    /// The run loop's progress, for `/healthz` and systemd's watchdog: shared here because
    /// everything that reports on the process already shares the metrics.
    liveness: Liveness,
}

impl Metrics {
    pub fn new(lag_target: Duration) -> Metrics {
        let mut registry = Registry::with_prefix("usersync");
        let lag = Histogram::new(LAG_BUCKETS);
        registry.register_with_unit(
            "lag",
            "End-to-end lag per applied source transaction: source commit to target commit",
            Unit::Seconds,
            lag.clone(),
        );
        let source_send_delay = Histogram::new(SEND_DELAY_BUCKETS);
        registry.register_with_unit(
            "source_send_delay",
            "Source commit to its walsender sending the transaction, both by the source's clock: the source's share of the lag",
            Unit::Seconds,
            source_send_delay.clone(),
        );
        let lag_current = FloatGauge::default();
        registry.register_with_unit(
            "lag_current",
            "Current lag: the oldest unapplied commit's age, or the last heartbeat's lag when caught up",
            Unit::Seconds,
            lag_current.clone(),
        );
        let target = FloatGauge::default();
        target.set(lag_target.as_secs_f64());
        registry.register_with_unit(
            "lag_target",
            "The lag target the replicator is measured against",
            Unit::Seconds,
            target,
        );
        let heartbeat_lag = FloatGauge::default();
        registry.register_with_unit(
            "heartbeat_lag",
            "Lag of the last heartbeat message through the pipeline",
            Unit::Seconds,
            heartbeat_lag.clone(),
        );
        let changes = Family::<OpLabel, Counter>::default();
        registry.register(
            "changes_applied",
            "Source changes applied to the target, by operation",
            changes.clone(),
        );
        let transactions = Counter::default();
        registry.register(
            "transactions_applied",
            "Source transactions with changes for the target, applied (a heartbeat or a transaction of other tables alone is not counted)",
            transactions.clone(),
        );
        let skipped_transactions = Counter::default();
        registry.register(
            "transactions_skipped",
            "Source transactions received again after a restart and skipped (already applied)",
            skipped_transactions.clone(),
        );
        let patches_without_user = Counter::default();
        registry.register(
            "patches_without_user",
            "Parts of users (Stack Auth's primary email) that found no live user on the target to \
             merge into, so the target lacks them (usersync resync copies them again)",
            patches_without_user.clone(),
        );
        let batches = Counter::default();
        registry.register(
            "batches_applied",
            "Target transactions committed",
            batches.clone(),
        );
        let batch_size = Histogram::new(BATCH_SIZE_BUCKETS);
        registry.register(
            "batch_size_changes",
            "Source changes per target transaction",
            batch_size.clone(),
        );
        let apply_duration = Histogram::new(APPLY_BUCKETS);
        registry.register_with_unit(
            "apply_duration",
            "Time to apply one batch on the target, checkpoint and commit included",
            Unit::Seconds,
            apply_duration.clone(),
        );
        let connected = Family::<SideLabel, Gauge>::default();
        registry.register(
            "connected",
            "1 while the streaming session holds a connection to this side",
            connected.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Streaming sessions restarted after a transient failure",
            reconnects.clone(),
        );
        let errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "errors",
            "Errors that ended a streaming session, by kind (transient or definite)",
            errors.clone(),
        );
        let slot_retained_wal = Gauge::default();
        registry.register_with_unit(
            "slot_retained_wal",
            "WAL the replication slot holds back on the source",
            Unit::Bytes,
            slot_retained_wal.clone(),
        );
        let slot_safe_wal_size = Family::<NoLabels, Gauge>::default();
        registry.register_with_unit(
            "slot_safe_wal_size",
            "WAL that can still be written before the slot is at risk (absent when unlimited)",
            Unit::Bytes,
            slot_safe_wal_size.clone(),
        );
        let slot_wal_status = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "slot_wal_status",
            "1 for the slot's current wal_status, 0 for the others",
            slot_wal_status.clone(),
        );
        let checkpoint_lsn = FloatGauge::default();
        registry.register(
            "checkpoint_lsn",
            "LSN of the last applied source commit, as a number",
            checkpoint_lsn.clone(),
        );
        let checkpoint_commit_time = FloatGauge::default();
        registry.register_with_unit(
            "checkpoint_commit_timestamp",
            "Source commit time of the last applied transaction (Unix time)",
            Unit::Seconds,
            checkpoint_commit_time.clone(),
        );
        let clock_offset = FloatGauge::default();
        registry.register_with_unit(
            "clock_offset",
            "Estimated source server clock minus this host's clock",
            Unit::Seconds,
            clock_offset.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while streaming and not broken (as /readyz)",
            ready.clone(),
        );
        let standby = Gauge::default();
        registry.register(
            "standby",
            "1 while waiting for the slot's lock on the target, which another session holds",
            standby.clone(),
        );
        let standby_since = Family::<NoLabels, FloatGauge>::default();
        registry.register_with_unit(
            "standby_since_timestamp",
            "When this process began to stand by (Unix time; absent unless standing by)",
            Unit::Seconds,
            standby_since.clone(),
        );
        let slot_info = Family::<SlotLabel, Gauge>::default();
        registry.register(
            "slot_info",
            "1, labelled with the replication slot this process consumes",
            slot_info.clone(),
        );
        let lag_recent = Family::<QuantileLabel, FloatGauge>::default();
        registry.register_with_unit(
            "lag_recent",
            "Lag percentiles over the last minute, as `demo` and `status` show them",
            Unit::Seconds,
            lag_recent.clone(),
        );
        let lag_recent_within_target = Family::<NoLabels, FloatGauge>::default();
        registry.register(
            "lag_recent_within_target_ratio",
            "Share of the last minute's transactions applied within the lag target",
            lag_recent_within_target.clone(),
        );
        let route_state = Family::<RouteStateLabel, Gauge>::default();
        registry.register(
            "route_state",
            "1 for a fan-out route's state: active, copying (its users copied online), \
             joining (a new route's target being prepared), draining (too slow, applying what \
             it holds), detached (down, holding the slot), evicted (needs a resync)",
            route_state.clone(),
        );
        let route_lag = Family::<RouteLabel, FloatGauge>::default();
        registry.register_with_unit(
            "route_lag",
            "A fan-out route's current lag: source commit to visible on its target",
            Unit::Seconds,
            route_lag.clone(),
        );
        let route_durable_lsn = Family::<RouteLabel, FloatGauge>::default();
        registry.register(
            "route_durable_lsn",
            "The source position a fan-out route's target holds durably (the slot waits \
             for the lowest), as a number",
            route_durable_lsn.clone(),
        );
        let route_changes = Family::<RouteLabel, Counter>::default();
        registry.register(
            "route_changes",
            "Changes applied to a fan-out route's target",
            route_changes.clone(),
        );
        let metrics = Metrics {
            registry,
            lag,
            source_send_delay,
            lag_current,
            heartbeat_lag,
            changes,
            transactions,
            skipped_transactions,
            patches_without_user,
            batches,
            batch_size,
            apply_duration,
            connected,
            reconnects,
            errors,
            slot_retained_wal,
            slot_safe_wal_size,
            slot_wal_status,
            checkpoint_lsn,
            checkpoint_commit_time,
            clock_offset,
            ready,
            standby,
            standby_since,
            slot_info,
            lag_recent,
            lag_recent_within_target,
            route_state,
            route_lag,
            route_durable_lsn,
            route_changes,
            route_lags: std::sync::Mutex::new(Vec::new()),
            lag_window: LagWindow::default(),
            lag_target,
            liveness: Liveness::new(liveness::DEFAULT_BOUND),
        };
        // Series exist from the first scrape, so rates and alerts see zeros, not gaps.
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
            let _ = metrics.changes.get_or_create(&OpLabel { op: op.label() });
        }
        for kind in ["transient", "definite"] {
            let _ = metrics.errors.get_or_create(&KindLabel { kind });
        }
        metrics.set_connected(Side::Source, false);
        metrics.set_connected(Side::Target, false);
        metrics
    }

    /// The registry in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn lag_target(&self) -> Duration {
        self.lag_target
    }

    /// Records the lag of one applied source transaction.
    pub fn observe_lag(&self, now: std::time::Instant, lag: Duration) {
        self.lag.observe(lag.as_secs_f64());
        self.lag_window.record(now, lag);
    }

    /// Records how long after its commit the source's walsender sent a transaction (the
    /// message that completed it), both by the source's clock: while usersync keeps reading,
    /// a lag this large comes from the source (its WAL flush, which a walsender waits for,
    /// its CPU, its decoding), not from usersync or the target. A source clock stepping back
    /// between the two reads as 0, a delay over [`MAX_SEND_DELAY_MICROS`] as that.
    pub fn observe_source_send_delay(&self, commit_micros: i64, sent_micros: i64) {
        let delay = sent_micros
            .saturating_sub(commit_micros)
            .clamp(0, MAX_SEND_DELAY_MICROS);
        self.source_send_delay.observe(delay as f64 / 1_000_000.0);
    }

    /// Publishes the last minute's percentiles (absent when the minute had no transaction).
    pub fn refresh_recent_lag(&self, now: std::time::Instant) {
        match self.lag_window.summary(now, self.lag_target) {
            Some(summary) => {
                for (quantile, value) in [("0.5", summary.p50), ("0.99", summary.p99)] {
                    self.lag_recent
                        .get_or_create(&QuantileLabel { quantile })
                        .set(value.as_secs_f64());
                }
                self.lag_recent_within_target
                    .get_or_create(&NoLabels {})
                    .set(summary.within_target);
            }
            None => {
                self.lag_recent.clear();
                self.lag_recent_within_target.clear();
            }
        }
    }

    pub fn set_current_lag(&self, lag: Duration) {
        self.lag_current.set(lag.as_secs_f64());
    }

    pub fn current_lag(&self) -> Duration {
        Duration::from_secs_f64(self.lag_current.get().max(0.0))
    }

    /// Route number `index` (named `route`) has this lag now; the process's current lag is
    /// the largest of its routes'.
    pub fn set_route_lag(&self, index: usize, route: &str, lag: Duration) {
        let seconds = lag.as_secs_f64();
        self.route_lag
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .set(seconds);
        let mut lags = self.route_lags.lock().unwrap_or_else(|e| e.into_inner());
        if lags.len() <= index {
            lags.resize(index + 1, 0.0);
        }
        lags[index] = seconds;
        let largest = lags.iter().copied().fold(0.0, f64::max);
        self.lag_current.set(largest);
    }

    /// A route of a fan-out is in `state` (one of [`ROUTE_STATES`]) and holds `durable`.
    pub fn set_route_state(&self, route: &str, state: &'static str, durable: Option<u64>) {
        for candidate in ROUTE_STATES {
            self.route_state
                .get_or_create(&RouteStateLabel {
                    route: route.to_owned(),
                    state: candidate,
                })
                .set(i64::from(candidate == state));
        }
        if let Some(durable) = durable {
            self.route_durable_lsn
                .get_or_create(&RouteLabel {
                    route: route.to_owned(),
                })
                .set(durable as f64);
        }
    }

    /// `changes` more changes applied to a route's target.
    pub fn route_applied(&self, route: &str, changes: u64) {
        self.route_changes
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .inc_by(changes);
    }

    pub fn set_heartbeat_lag(&self, lag: Duration) {
        self.heartbeat_lag.set(lag.as_secs_f64());
    }

    pub fn add_changes(&self, op: Op, n: u64) {
        self.changes
            .get_or_create(&OpLabel { op: op.label() })
            .inc_by(n);
    }

    pub fn changes(&self, op: Op) -> u64 {
        self.changes
            .get_or_create(&OpLabel { op: op.label() })
            .get()
    }

    /// Records one committed target transaction.
    pub fn batch_applied(&self, transactions: usize, changes: usize, took: Duration) {
        self.transactions.inc_by(transactions as u64);
        self.batches.inc();
        self.batch_size.observe(changes as f64);
        self.apply_duration.observe(took.as_secs_f64());
    }

    pub fn transactions(&self) -> u64 {
        self.transactions.get()
    }

    pub fn batches(&self) -> u64 {
        self.batches.get()
    }

    pub fn transaction_skipped(&self) {
        self.skipped_transactions.inc();
    }

    /// Records patches that found no live user on the target.
    pub fn patches_without_user_found(&self, n: u64) {
        self.patches_without_user.inc_by(n);
    }

    pub fn patches_without_user(&self) -> u64 {
        self.patches_without_user.get()
    }

    pub fn set_connected(&self, side: Side, connected: bool) {
        let side = match side {
            Side::Source => "source",
            Side::Target => "target",
        };
        self.connected
            .get_or_create(&SideLabel { side })
            .set(i64::from(connected));
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    pub fn session_error(&self, transient: bool) {
        let kind = if transient { "transient" } else { "definite" };
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// Slot figures read from `pg_replication_slots`.
    pub fn set_slot(
        &self,
        retained_bytes: i64,
        safe_wal_size: Option<i64>,
        wal_status: Option<&str>,
    ) {
        self.slot_retained_wal.set(retained_bytes);
        match safe_wal_size {
            Some(bytes) => {
                self.slot_safe_wal_size
                    .get_or_create(&NoLabels {})
                    .set(bytes);
            }
            None => self.slot_safe_wal_size.clear(),
        }
        for status in WAL_STATUSES {
            self.slot_wal_status
                .get_or_create(&StatusLabel { status })
                .set(i64::from(wal_status == Some(status)));
        }
    }

    pub fn set_checkpoint(&self, lsn: crate::lsn::Lsn, commit_time_unix_micros: i64) {
        // An f64 holds LSNs exactly up to 2^53 bytes of WAL (8 PiB).
        self.checkpoint_lsn.set(lsn.0 as f64);
        self.checkpoint_commit_time
            .set(commit_time_unix_micros as f64 / 1_000_000.0);
    }

    pub fn set_clock_offset(&self, offset_seconds: f64) {
        self.clock_offset.set(offset_seconds);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Whether the run loop makes progress (as `/healthz`).
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Names the slot this process consumes (the `slot` label of `usersync_slot_info`).
    pub fn set_slot_name(&self, slot: &str) {
        self.set_slot_info(SlotLabel {
            slot: slot.to_owned(),
            system: String::new(),
        });
    }

    /// Names the source system a session of `slot` streams from (the `system` label of
    /// `usersync_slot_info`).
    pub fn set_source_system(&self, slot: &str, system: &str) {
        self.set_slot_info(SlotLabel {
            slot: slot.to_owned(),
            system: system.to_owned(),
        });
    }

    fn set_slot_info(&self, label: SlotLabel) {
        self.slot_info.clear();
        self.slot_info.get_or_create(&label).set(1);
    }

    /// Standing by since `since` (Unix seconds) for the slot's lock, or (`None`) not.
    pub fn set_standby(&self, since: Option<f64>) {
        self.standby.set(i64::from(since.is_some()));
        match since {
            Some(since) => {
                self.standby_since.get_or_create(&NoLabels {}).set(since);
            }
            None => self.standby_since.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_has_its_state_and_lag_and_the_process_shows_the_largest_lag() {
        let metrics = Metrics::new(Duration::from_secs(1));
        metrics.set_route_lag(0, "acme", Duration::from_millis(30));
        metrics.set_route_lag(1, "globex", Duration::from_millis(700));
        metrics.set_route_lag(0, "acme", Duration::from_millis(10));
        assert_eq!(metrics.current_lag(), Duration::from_millis(700));
        metrics.set_route_state("globex", "detached", Some(42));
        metrics.route_applied("acme", 5);
        let text = metrics.encode();
        for line in [
            "usersync_route_state{route=\"globex\",state=\"detached\"} 1",
            "usersync_route_state{route=\"globex\",state=\"active\"} 0",
            "usersync_route_lag_seconds{route=\"acme\"} 0.01",
            "usersync_route_durable_lsn{route=\"globex\"} 42.0",
            "usersync_route_changes_total{route=\"acme\"} 5",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn encodes_names_with_units_and_the_target_bucket() {
        let metrics = Metrics::new(Duration::from_secs(1));
        metrics.observe_lag(std::time::Instant::now(), Duration::from_millis(3));
        metrics.observe_source_send_delay(1_000_000, 1_000_700);
        metrics.observe_source_send_delay(1_000_000, 999_000);
        metrics.observe_source_send_delay(i64::MIN, i64::MAX);
        metrics.add_changes(Op::Insert, 2);
        metrics.set_slot(1024, None, Some("reserved"));
        let text = metrics.encode();
        for needle in [
            "usersync_lag_seconds_bucket{le=\"1.0\"} 1",
            "usersync_lag_seconds_count 1",
            "usersync_source_send_delay_seconds_bucket{le=\"0.0005\"} 1",
            "usersync_source_send_delay_seconds_bucket{le=\"0.001\"} 2",
            "usersync_source_send_delay_seconds_sum 60.0007",
            "usersync_source_send_delay_seconds_count 3",
            "usersync_lag_target_seconds 1.0",
            "usersync_changes_applied_total{op=\"insert\"} 2",
            "usersync_changes_applied_total{op=\"truncate\"} 0",
            "usersync_slot_retained_wal_bytes 1024",
            "usersync_slot_wal_status{status=\"reserved\"} 1",
            "usersync_slot_wal_status{status=\"lost\"} 0",
            "usersync_connected{side=\"source\"} 0",
            "usersync_errors_total{kind=\"definite\"} 0",
            "usersync_patches_without_user_total 0",
            "usersync_standby 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(!text.contains("usersync_slot_safe_wal_size_bytes "));
        metrics.set_slot(1024, Some(4096), Some("extended"));
        assert!(metrics
            .encode()
            .contains("usersync_slot_safe_wal_size_bytes 4096"));
        assert!(!text.contains("usersync_standby_since_timestamp_seconds "));
        metrics.set_slot_name("tenants");
        metrics.set_standby(Some(1_700_000_000.5));
        let text = metrics.encode();
        for needle in [
            "usersync_slot_info{slot=\"tenants\",system=\"\"} 1",
            "usersync_standby 1",
            "usersync_standby_since_timestamp_seconds 1700000000.5",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        metrics.set_standby(None);
        assert!(!metrics
            .encode()
            .contains("usersync_standby_since_timestamp_seconds "));
    }
}
