//! Replication lag: from a source transaction's commit to the moment the target transaction
//! holding it committed. Kept as a sliding window of samples so that `demo` can print
//! p50/p99 over the last minute; an idle replicator has no lag, not a growing one.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back the percentiles look.
pub const LAG_WINDOW: Duration = Duration::from_secs(60);

/// Most samples kept, so memory stays bounded at any rate (≈ 1.5 MiB).
const MAX_SAMPLES: usize = 100_000;

/// Lag percentiles over the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagSummary {
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Share of samples at or under the lag target.
    pub within_target: f64,
}

/// A thread-safe sliding window of lag samples.
#[derive(Debug, Default)]
pub struct LagWindow {
    samples: Mutex<VecDeque<(Instant, Duration)>>,
}

impl LagWindow {
    pub fn record(&self, now: Instant, lag: Duration) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back((now, lag));
    }

    /// Percentiles of the samples taken within [`LAG_WINDOW`] of `now`.
    pub fn summary(&self, now: Instant, target: Duration) -> Option<LagSummary> {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > LAG_WINDOW)
        {
            samples.pop_front();
        }
        if samples.is_empty() {
            return None;
        }
        let mut lags: Vec<Duration> = samples.iter().map(|(_, lag)| *lag).collect();
        drop(samples);
        lags.sort_unstable();
        let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
        let within = lags.partition_point(|lag| *lag <= target);
        Some(LagSummary {
            samples: lags.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: lags[lags.len() - 1],
            within_target: within as f64 / lags.len() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_the_window() {
        let window = LagWindow::default();
        let start = Instant::now();
        for ms in 1..=100 {
            window.record(start, Duration::from_millis(ms));
        }
        let summary = window.summary(start, Duration::from_millis(90)).unwrap();
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.p50, Duration::from_millis(51));
        assert_eq!(summary.p99, Duration::from_millis(99));
        assert_eq!(summary.max, Duration::from_millis(100));
        assert!((summary.within_target - 0.9).abs() < 1e-9);
    }

    #[test]
    fn old_samples_leave_the_window() {
        let window = LagWindow::default();
        let start = Instant::now();
        window.record(start, Duration::from_secs(5));
        let later = start + LAG_WINDOW + Duration::from_secs(1);
        assert_eq!(window.summary(later, Duration::from_secs(1)), None);
    }
}

/// This host's clock in microseconds since the Unix epoch (the unit of source commit times).
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Estimates the source server's clock minus this host's clock.
///
/// Commit times come from the source's clock, apply times from ours; a skew between them
/// would show up as lag (or negative lag). Every message from the walsender carries the
/// server's send time; `send time − receive time` is the offset minus the network delay, so
/// the largest recent sample (the one with the least delay) is the best estimate.
#[derive(Debug, Default)]
pub struct ClockOffset {
    samples: VecDeque<i64>,
}

/// Samples kept: at one per message, a few seconds of traffic under load, minutes of
/// keepalives when idle.
const CLOCK_SAMPLES: usize = 256;

impl ClockOffset {
    /// Adds one sample: the server's send time and our receive time, in Unix microseconds.
    pub fn observe(&mut self, server_unix_micros: i64, local_unix_micros: i64) {
        if self.samples.len() == CLOCK_SAMPLES {
            self.samples.pop_front();
        }
        self.samples
            .push_back(server_unix_micros.saturating_sub(local_unix_micros));
    }

    /// The estimate in microseconds (0 before any sample).
    pub fn micros(&self) -> i64 {
        self.samples.iter().copied().max().unwrap_or(0)
    }
}

/// When a source time (Unix microseconds by the source's clock) was by this host's clock,
/// given the [`ClockOffset`]'s estimate. It errs late, by the least network delay seen,
/// never early.
pub fn local_time_at_offset(offset_micros: i64, source_unix_micros: i64) -> i64 {
    source_unix_micros.saturating_sub(offset_micros)
}

/// The lag of a source commit applied at `local_unix_micros`, corrected by the
/// [`ClockOffset`]'s estimate.
pub fn lag_at_offset(
    offset_micros: i64,
    commit_unix_micros: i64,
    local_unix_micros: i64,
) -> Duration {
    let lag = local_unix_micros
        .saturating_sub(commit_unix_micros)
        .saturating_add(offset_micros);
    Duration::from_micros(lag.max(0) as u64)
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn the_least_delayed_sample_wins() {
        let mut clock = ClockOffset::default();
        // Source 5 s ahead; delays of 3 ms, 1 ms, 8 ms.
        for (sent, received) in [
            (5_000_000, 3_000),
            (6_000_000, 1_001_000),
            (7_000_000, 2_008_000),
        ] {
            clock.observe(sent, received);
        }
        assert_eq!(clock.micros(), 4_999_000);
        // A commit at source time 10 s applied at local 5.02 s: 21 ms late (1 ms of it skew error).
        assert_eq!(
            lag_at_offset(clock.micros(), 10_000_000, 5_020_000),
            Duration::from_micros(19_000)
        );
        assert_eq!(
            lag_at_offset(ClockOffset::default().micros(), 10, 5),
            Duration::ZERO
        );
        // Source time 10 s was local 5.001 s: 1 ms late, the least delay seen.
        assert_eq!(local_time_at_offset(clock.micros(), 10_000_000), 5_001_000);
    }
}
