//! Counters of what the replicator has done, shared with whoever reports them (`demo`'s
//! live line today; the metrics endpoint later). Atomics, so the hot path never waits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::lag::LagWindow;

#[derive(Debug, Default)]
pub struct Progress {
    pub inserts: AtomicU64,
    pub updates: AtomicU64,
    pub deletes: AtomicU64,
    pub truncates: AtomicU64,
    pub transactions: AtomicU64,
    /// Transactions received again after a restart and skipped (already on the target).
    pub skipped_transactions: AtomicU64,
    pub batches: AtomicU64,
    pub reconnects: AtomicU64,
    /// Whether a streaming session is up right now.
    pub streaming: AtomicBool,
    pub lag: LagWindow,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
