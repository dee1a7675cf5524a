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
/// the largest of the recent samples (the one with the least delay) is the best estimate.
///
/// The reader observes every message (several per source transaction), so the window's
/// largest is kept as it slides rather than searched for: only samples that a later, larger
/// one has not beaten are kept, largest first, each with its number.
#[derive(Debug, Default)]
pub struct ClockOffset {
    /// (sample number, sample), samples strictly decreasing front to back.
    candidates: VecDeque<(u64, i64)>,
    /// Samples observed so far.
    observed: u64,
}

/// Samples the estimate looks back over: at one per message, a few seconds of traffic under
/// load, minutes of keepalives when idle.
const CLOCK_SAMPLES: u64 = 256;

impl ClockOffset {
    /// Adds one sample: the server's send time and our receive time, in Unix microseconds.
    pub fn observe(&mut self, server_unix_micros: i64, local_unix_micros: i64) {
        let sample = server_unix_micros.saturating_sub(local_unix_micros);
        while self
            .candidates
            .back()
            .is_some_and(|&(_, kept)| kept <= sample)
        {
            self.candidates.pop_back();
        }
        self.candidates.push_back((self.observed, sample));
        self.observed += 1;
        while self
            .candidates
            .front()
            .is_some_and(|&(number, _)| self.observed - number > CLOCK_SAMPLES)
        {
            self.candidates.pop_front();
        }
    }

    /// The estimate in microseconds (0 before any sample).
    pub fn micros(&self) -> i64 {
        self.candidates.front().map_or(0, |&(_, sample)| sample)
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

    #[test]
    fn the_estimate_is_the_largest_of_the_last_samples() {
        // Against the plain search over the window, on a sequence with runs up and down,
        // ties, and windows whose largest leaves them.
        let mut clock = ClockOffset::default();
        let mut samples = Vec::new();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..5_000_i64 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let noise = (state >> 40) as i64 % 1_000;
            let trend = if (step / 700) % 2 == 0 { step } else { -step };
            let sample = trend * 3 + noise - (noise % 7);
            clock.observe(sample, 0);
            samples.push(sample);
            let window = &samples[samples.len().saturating_sub(CLOCK_SAMPLES as usize)..];
            assert_eq!(clock.micros(), *window.iter().max().unwrap(), "at {step}");
        }
        assert!(clock.candidates.len() <= CLOCK_SAMPLES as usize);
    }
}
