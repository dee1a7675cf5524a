//! Groups whole source transactions into the next target transaction.
//!
//! A batch goes to the writer as soon as no more WAL is immediately readable and the writer
//! is free, or when it reaches [`MAX_BATCH_CHANGES`] or [`MAX_BATCH_AGE`]. That adapts by
//! itself: one change per target transaction when idle (lowest lag), large batches under
//! load (highest throughput).

use std::time::{Duration, Instant};

use super::changes::UserChange;
use crate::apply::{Batch, CommitPosition, UnixMicros, UserKeys};
use crate::metrics::{Metrics, Op};

/// Changes at which a batch takes no more transactions (a transaction is taken whole, so one
/// of up to 10,000 changes, the most that does not go in parts, may take it past that):
/// bounds memory and the target transaction's size. In a backlog, batches of 2,000 drained
/// 8% faster than of 10,000 (six alternating pairs of the bench's drain, 47.1k against 43.7k
/// tx/s on average): the two target connections overlap more, and the server builds smaller
/// arrays per statement.
pub(super) const MAX_BATCH_CHANGES: usize = 2_000;
/// Longest a batch collects while WAL keeps arriving (a backlog), so lag stays bounded.
pub(super) const MAX_BATCH_AGE: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(super) struct Batcher {
    batch: Batch,
    /// Most changes in a batch (see [`Batcher::limited_to`]).
    max_changes: usize,
    /// See [`Batch::with_part_keys`]: every batch of the session gets them.
    part_keys: &'static [&'static str],
    /// When the first transaction entered the batch.
    started: Option<Instant>,
    /// Commit time of a heartbeat waiting behind the batch.
    heartbeat: Option<UnixMicros>,
    /// The batch's documents are encoded already ([`Batcher::encode_ahead`]).
    encoded: bool,
}

impl Batcher {
    /// A batcher for a profile whose users' part is made of `part_keys`.
    pub fn with_part_keys(part_keys: &'static [&'static str]) -> Self {
        Batcher {
            batch: Batch::with_part_keys(part_keys),
            part_keys,
            max_changes: MAX_BATCH_CHANGES,
            ..Self::default()
        }
    }

    /// At most `max_changes` changes per batch (of a route among many, whose batches share
    /// the process's memory), never more than [`MAX_BATCH_CHANGES`].
    pub fn limited_to(mut self, max_changes: usize) -> Self {
        self.max_changes = max_changes.clamp(1, MAX_BATCH_CHANGES);
        self
    }

    fn fresh(&self) -> Batch {
        Batch::with_part_keys(self.part_keys)
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// The batch is full, or old enough to go whether or not more WAL is readable.
    pub fn is_due(&self) -> bool {
        self.batch.changes() >= self.max_changes
            || self
                .started
                .is_some_and(|started| started.elapsed() >= MAX_BATCH_AGE)
    }

    /// The commit time of the oldest transaction waiting in the batch.
    pub fn oldest_commit(&self) -> Option<UnixMicros> {
        self.batch.commit_times().first().copied()
    }

    /// Adds mapped changes of a source transaction committed at `at`.
    pub fn add(
        &mut self,
        changes: impl IntoIterator<Item = UserChange>,
        at: UnixMicros,
        metrics: &Metrics,
    ) {
        self.encoded = false;
        for change in changes {
            let op = match change {
                UserChange::Upsert {
                    user,
                    inserted,
                    deleted_at,
                    moved_from,
                } => {
                    match (moved_from, deleted_at) {
                        (Some(from), deleted_at) => {
                            self.batch.upsert_moved(user, from, deleted_at, at)
                        }
                        (None, Some(deleted_at)) => self.batch.upsert_deleted(user, deleted_at, at),
                        (None, None) => self.batch.upsert(user, at),
                    }
                    if inserted {
                        Op::Insert
                    } else {
                        Op::Update
                    }
                }
                UserChange::Patch {
                    id,
                    keys,
                    from,
                    clears,
                } => {
                    if clears {
                        self.batch.clear_part(id, keys, at);
                    } else {
                        self.batch.patch(id, keys, from, at);
                    }
                    Op::Update
                }
                UserChange::ClearPartIf { id, row, keys } => {
                    self.batch.clear_part_if(id, row, keys, at);
                    Op::Update
                }
                UserChange::SoftDelete(id) => {
                    self.batch.soft_delete(id, at);
                    Op::Delete
                }
                UserChange::MovedAway(id) => {
                    self.batch.soft_delete_moved(id, at);
                    Op::Delete
                }
                UserChange::SoftDeleteAll => {
                    self.batch.soft_delete_all(at);
                    Op::Truncate
                }
                UserChange::Heartbeat => continue,
            };
            metrics.add_changes(op, 1);
        }
    }

    /// The source transaction whose changes were added last committed at `position`;
    /// `carried`: whether any of them was for the target.
    pub fn commit(&mut self, position: CommitPosition, carried: bool) {
        self.batch.commit(position, carried);
        self.started.get_or_insert_with(Instant::now);
    }

    /// A heartbeat committed at `at` came behind the batch: it has come through once the
    /// batch has.
    pub fn heartbeat_behind(&mut self, at: UnixMicros) {
        self.heartbeat = Some(at);
    }

    /// [`take`](Self::take), for a batch written beside the batch before it, which writes
    /// `before`'s users ([`Batch::split_beside`]), with the batch's own users; `None`, the
    /// batch kept, if it cannot be.
    pub fn take_beside(
        &mut self,
        before: &UserKeys,
    ) -> Option<(Batch, Option<UnixMicros>, UserKeys)> {
        let users = self.batch.split_beside(before)?;
        let (batch, heartbeat) = self.take();
        Some((batch, heartbeat, users))
    }

    /// The batch to write, and the heartbeat that came behind it.
    pub fn take(&mut self) -> (Batch, Option<UnixMicros>) {
        self.started = None;
        (self.take_encoded(), self.heartbeat.take())
    }

    /// The changes added so far, as a part of a large transaction (not committed yet).
    pub fn take_part(&mut self) -> Batch {
        self.take_encoded()
    }

    /// The batch, its documents encoded ([`Batch::encode_documents`]) once nothing more can
    /// change them, on the route's task: a part is encoded while the worker writes the one
    /// before it.
    fn take_encoded(&mut self) -> Batch {
        let fresh = self.fresh();
        let mut batch = std::mem::replace(&mut self.batch, fresh);
        if !std::mem::take(&mut self.encoded) {
            batch.encode_documents();
        }
        batch
    }

    /// Encodes the batch's documents now, ahead of [`take`](Self::take): for a batch that is
    /// due while the worker writes the one before, which takes nothing more until it goes
    /// (a backlog), so the worker gets it encoded. Anything added later encodes it again.
    pub fn encode_ahead(&mut self) {
        if !self.encoded {
            self.batch.encode_documents();
            self.encoded = true;
        }
    }

    /// Drops what was added: the transaction it came from failed.
    pub fn discard(&mut self) {
        self.batch = self.fresh();
        self.started = None;
        self.encoded = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::batch::{PendingUser, Segment};
    use crate::map::MappedUser;

    fn upsert(name: &str) -> UserChange {
        let mut raw_json = serde_json::Map::new();
        raw_json.insert("id".into(), "u1".into());
        raw_json.insert("display_name".into(), name.into());
        UserChange::Upsert {
            user: MappedUser {
                id: "u1".into(),
                raw_json: raw_json.into(),
                unchanged_keys: Vec::new(),
            },
            inserted: false,
            deleted_at: None,
            moved_from: None,
        }
    }

    fn sent(batch: &Batch) -> String {
        let [Segment::Users(users)] = batch.segments() else {
            panic!("one users segment");
        };
        let user: &PendingUser = &users["u1"];
        String::from_utf8(user.encoded.as_deref().unwrap().to_vec()).unwrap()
    }

    #[test]
    fn a_batch_encoded_ahead_and_then_changed_is_encoded_again() {
        let metrics = Metrics::new(Duration::from_secs(1));
        let mut batcher = Batcher::with_part_keys(&[]);
        batcher.add([upsert("before")], 1, &metrics);
        batcher.encode_ahead();
        batcher.add([upsert("after")], 2, &metrics);
        let (batch, _) = batcher.take();
        assert!(sent(&batch).contains("after"), "{}", sent(&batch));

        batcher.add([upsert("ahead")], 3, &metrics);
        batcher.encode_ahead();
        let (batch, _) = batcher.take();
        assert!(sent(&batch).contains("ahead"));
        // The next batch starts unencoded.
        batcher.add([upsert("next")], 4, &metrics);
        assert!(sent(&batcher.take_part()).contains("next"));
    }
}
