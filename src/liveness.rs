//! Whether the run loop still makes progress: what `/healthz` and systemd's watchdog report.
//!
//! A replicator can hang without dying. The slot's lock is held by the active process's
//! session on the target (see [`crate::apply::slot_lock`]), and a process that is stopped
//! (SIGSTOP, a frozen VM) or whose loop waits on something that never comes keeps that session
//! open: its kernel still answers TCP keepalives, so the server never ends it, and every
//! standby waits for good. Only whatever supervises the process can end it, and it needs a
//! signal that tells a hung process from a busy one. A process that answers HTTP is not enough:
//! the endpoint runs on its own task and answers while the loop is stuck.
//!
//! So the loop records an instant of progress whenever it shows it is not stuck, at least
//! every few seconds whatever it does: each turn of the streaming loop and each status update
//! (which go out every few seconds even when idle, and while a slow target or a large
//! transaction is written); each request while a session starts or a standby tries the lock
//! (every one bounded in time, so it ends within its timeout, with an answer or an error);
//! and the backoff between sessions. The process is alive while that instant is no older
//! than the bound, which is longer than any of those requests may take.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The bound for the default timeouts (see `replicator::liveness_bound`): the longest a single
/// request may take (60 s: the target's requests, `statement_timeout` and the default
/// `--source-timeout`), plus a margin for the work around it.
pub const DEFAULT_BOUND: Duration = Duration::from_secs(90);

/// How often a long sleep shows progress (the backoff before a reconnect).
const SLEEP_PROGRESS: Duration = Duration::from_secs(1);

/// The instant of the run loop's last progress, shared between the loop and whoever asks.
#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    /// Milliseconds from `origin` to the last progress: an atomic, so that the loop records
    /// progress without a lock the endpoint could hold up.
    last_progress: AtomicU64,
    /// Milliseconds without progress that mean the loop hangs.
    bound: AtomicU64,
    /// `last_progress + 1` of the hang last reported (0: none), so that a hang is logged once
    /// however often the endpoint is asked.
    reported: AtomicU64,
}

impl Liveness {
    /// Progress now, hanging after `bound` without more.
    pub fn new(bound: Duration) -> Self {
        Self::starting_at(Instant::now(), bound)
    }

    fn starting_at(origin: Instant, bound: Duration) -> Self {
        Liveness {
            origin,
            last_progress: AtomicU64::new(0),
            bound: AtomicU64::new(millis(bound)),
            reported: AtomicU64::new(0),
        }
    }

    /// The run loop shows progress now.
    pub fn progress(&self) {
        self.progress_at(Instant::now());
    }

    fn progress_at(&self, now: Instant) {
        let at = millis(now.saturating_duration_since(self.origin));
        // Two tasks may race: the later instant wins, whoever stores last.
        self.last_progress.fetch_max(at, Ordering::Relaxed);
    }

    /// How long the loop has shown no progress.
    pub fn silent_for(&self) -> Duration {
        self.silent_at(Instant::now())
    }

    fn silent_at(&self, now: Instant) -> Duration {
        let last = self.origin + Duration::from_millis(self.last_progress.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Whether the loop has shown progress within the bound.
    pub fn is_alive(&self) -> bool {
        self.is_alive_at(Instant::now())
    }

    fn is_alive_at(&self, now: Instant) -> bool {
        self.silent_at(now) <= self.bound()
    }

    /// Whether the current hang (no progress since the last) is reported for the first time:
    /// true once per hang, so that anyone who can reach `/healthz` cannot flood the log.
    pub fn first_report_of_this_hang(&self) -> bool {
        let mark = self.last_progress.load(Ordering::Relaxed) + 1;
        self.reported.swap(mark, Ordering::Relaxed) != mark
    }

    /// How long without progress means the loop hangs.
    pub fn bound(&self) -> Duration {
        Duration::from_millis(self.bound.load(Ordering::Relaxed))
    }

    /// `run` derives the bound from its timeouts; tests shorten it.
    pub fn set_bound(&self, bound: Duration) {
        self.bound.store(millis(bound), Ordering::Relaxed);
    }

    /// Sleeps for `duration`, showing progress meanwhile: a sleep always ends, so it is no
    /// hang, however long it is.
    pub async fn sleep(&self, duration: Duration) {
        self.sleep_showing_progress(duration, SLEEP_PROGRESS).await;
    }

    async fn sleep_showing_progress(&self, duration: Duration, every: Duration) {
        let until = tokio::time::Instant::now() + duration;
        loop {
            self.progress();
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep_until(until.min(now + every)).await;
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(90);

    #[test]
    fn alive_until_the_bound_passes_without_progress() {
        let start = Instant::now();
        let liveness = Liveness::starting_at(start, BOUND);
        assert!(liveness.is_alive_at(start));
        assert!(liveness.is_alive_at(start + BOUND));
        assert!(!liveness.is_alive_at(start + BOUND + Duration::from_millis(1)));
        // Progress now and then keeps it alive for good.
        for seconds in (10..=600).step_by(10) {
            let now = start + Duration::from_secs(seconds);
            liveness.progress_at(now);
            assert!(liveness.is_alive_at(now + BOUND), "at {seconds} s");
            assert_eq!(liveness.silent_at(now + BOUND), BOUND);
        }
        // Then none: hanging once the bound has passed since the last.
        let last = start + Duration::from_secs(600);
        assert!(!liveness.is_alive_at(last + BOUND + Duration::from_secs(1)));
    }

    #[test]
    fn an_older_progress_recorded_late_does_not_go_back() {
        let start = Instant::now();
        let liveness = Liveness::starting_at(start, BOUND);
        liveness.progress_at(start + Duration::from_secs(50));
        liveness.progress_at(start + Duration::from_secs(20));
        assert_eq!(
            liveness.silent_at(start + Duration::from_secs(60)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn the_bound_can_change() {
        let start = Instant::now();
        let liveness = Liveness::starting_at(start, BOUND);
        liveness.set_bound(Duration::from_secs(2));
        assert_eq!(liveness.bound(), Duration::from_secs(2));
        assert!(!liveness.is_alive_at(start + Duration::from_secs(3)));
    }

    #[tokio::test]
    async fn a_long_sleep_shows_progress_all_along() {
        let bound = Duration::from_millis(200);
        let liveness = Liveness::new(bound);
        let started = Instant::now();
        let sleep = liveness.sleep_showing_progress(Duration::from_millis(700), bound / 4);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    assert!(liveness.is_alive(), "silent for {:?}", liveness.silent_for());
                }
            }
        }
        assert!(started.elapsed() >= Duration::from_millis(700));
        assert!(liveness.silent_for() < bound);
    }

    #[test]
    fn a_hang_is_reported_once_until_progress_resumes() {
        let start = Instant::now();
        let liveness = Liveness::starting_at(start, Duration::from_secs(1));
        assert!(liveness.first_report_of_this_hang());
        assert!(!liveness.first_report_of_this_hang());
        liveness.progress_at(start + Duration::from_secs(5));
        assert!(liveness.first_report_of_this_hang());
        assert!(!liveness.first_report_of_this_hang());
    }
}
