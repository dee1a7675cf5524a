//! Coalescing source changes into one target transaction.
//!
//! Many source transactions share one target transaction (that is how a client-side
//! replicator keeps up with PostgreSQL's own apply worker), and within it only the last state
//! of each user matters: ten updates to one user become one upsert. What must survive
//! coalescing is the *effect* of applying every change in order:
//! - a delete after an upsert in the same batch leaves a soft-deleted row carrying the
//!   upserted `raw_json` (the row may not exist on the target yet);
//! - an upsert after a delete brings the user back (`deleted_at` cleared);
//! - an upsert of a user the source marks deleted (Supabase's soft delete) carries its row
//!   and its own `deleted_at`, and replaces what came before it like any upsert;
//! - unchanged-TOAST keys of a later upsert are filled from an earlier upsert in the batch,
//!   and only the keys still unknown are left for the target to fill from its current row;
//! - after a primary-key change the unchanged-TOAST values are the *old* user's: taken from
//!   its pending upsert or patch in the batch, else from its row on the target (as
//!   PostgreSQL's own apply takes them from the old row), which the change soft-deletes;
//! - a patch (part of a user, kept in another source table) is merged into an upsert pending
//!   for that user, fills the keys a later upsert left to the target, and otherwise is merged
//!   into the live row on the target; a patch for a user deleted earlier in the batch is
//!   dropped (Stack Auth's cascade deletes a user's contact channels after the user), so a
//!   patch never revives a user or changes when it was deleted;
//! - a patch that clears a part because its row went away (a contact channel deleted, or no
//!   longer the primary email) is undone when the next change to that user in the same source
//!   transaction is its delete: an application that deletes the channel before the user gets
//!   what the cascade (user first) gets, a soft-deleted user with its last email. A source
//!   transaction never showed the user without it. (Within one batch or one part of a large
//!   transaction: parts are written as they fill.)
//! - a TRUNCATE soft-deletes every live row on the target, so the rows pending before it are
//!   written first: the batch is a sequence of segments, each applied in order.
//!
//! **Where a part comes from.** The target records, for each user, the row its part comes
//! from (Stack Auth: which contact channel the email keys hold, in
//! `usersync.primary_email_channel`), written with the part's keys: a patch records its row
//! (`from`), a clearing patch forgets it, a patch that changes nothing (after the user's
//! delete, or undone) leaves it. A part's row that went away known by its key only (no
//! `REPLICA IDENTITY FULL`) clears the part only if it is the recorded row
//! ([`Batch::clear_part_if`]). Within a batch the record is either known from an earlier
//! change of the batch, and the batch decides at once, or not, and then the target decides:
//! - known (a patch or a clear earlier in the segment, or an upsert that wrote all the part's
//!   keys itself, as a Stack Auth insert does with "none yet": the part then comes from no
//!   row, and the target forgets any record it held): the part is cleared now if the record
//!   names that row, like [`Batch::clear_part`], and otherwise nothing changes;
//! - unknown: the user carries a [`ClearIf`], which the target applies *before* the segment's
//!   other statements for that user. That order is the batch's own: a `ClearIf` exists only
//!   while no earlier change of the segment touched the part, and the one change before it
//!   that does not commute with it by itself, an upsert that leaves the part's keys to the
//!   target and revives a row the target holds soft-deleted, is named in it
//!   ([`ClearIf::after_upsert`]), so that the target decides against the row as that upsert
//!   leaves it. Later changes go after it as usual: a patch sets the part again over
//!   whatever it left (one that sets every key of the part makes it moot, and drops it), an
//!   upsert takes the part's keys from the row it left;
//! - the other rules hold as for any clearing patch: after the user's delete in the batch it
//!   changes nothing, and just before it (same source transaction) it is undone.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::lsn::Lsn;
use crate::map::{MappedUser, RawJson};

/// Microseconds since the Unix epoch (the source commit time of a change).
pub type UnixMicros = i64;

/// The final state of one user within a segment.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUser {
    /// The full user when the batch upserted it; `None` when the batch only deleted it.
    pub raw_json: Option<RawJson>,
    /// Keys whose value the target row already holds (unchanged TOAST on the source).
    pub keep_keys: Vec<String>,
    /// The user whose target row holds `keep_keys` when not this one: the old id of a
    /// primary-key change. The target reads it as it was before the segment.
    pub keep_from: Option<String>,
    /// With no upsert: keys to merge into the live row on the target (`raw_json || patch`).
    pub patch: Map<String, Value>,
    pub updated_at: UnixMicros,
    pub deleted_at: Option<UnixMicros>,
    /// The record of the row the user's part comes from, as the batch leaves it:
    /// `None`: untouched; `Some(None)`: forgotten (the part is cleared); `Some(Some(row))`.
    pub part_from: Option<Option<String>>,
    /// Applied first, by the target: see [`ClearIf`].
    pub clear_if: Option<ClearIf>,
    /// With `part_from` untouched: the part's keys are kept from `keep_from`'s row on the
    /// target (the old id of a primary-key change), so its record is copied there too, after
    /// the conditional clears (which may forget it) and with the keys it describes.
    pub part_from_keep: bool,
    /// `raw_json` as JSON text, once [`Batch::encode_documents`] has run.
    pub encoded: Option<Box<[u8]>>,
}

/// Clears a user's part if the target records that it comes from one of `rows` (which went
/// away, known by their keys only), and forgets the record; otherwise changes nothing. Only
/// while the batch knows nothing of the record (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ClearIf {
    pub rows: Vec<String>,
    /// The keys that clear the part.
    pub keys: Map<String, Value>,
    /// When the first of them went away: the user's `updated_at` if it clears.
    pub at: UnixMicros,
    /// An upsert of the user came before it in the segment, so the target decides against
    /// the row as that upsert leaves it, live: a row the target holds soft-deleted (a
    /// TRUNCATE in an earlier segment) is revived by the upsert, with the part's keys it
    /// holds, and the clear must reach them as it would applied in order.
    pub after_upsert: bool,
}

impl PendingUser {
    /// A user the batch has not changed yet.
    fn nothing(at: UnixMicros) -> Self {
        PendingUser {
            raw_json: None,
            keep_keys: Vec::new(),
            keep_from: None,
            patch: Map::new(),
            updated_at: at,
            deleted_at: None,
            part_from: None,
            clear_if: None,
            part_from_keep: false,
            encoded: None,
        }
    }
}

/// A run of changes that can be applied as one upsert and one soft delete, or a truncate.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Users(HashMap<String, PendingUser>),
    /// Soft-delete every live user at this time.
    SoftDeleteAll(UnixMicros),
}

/// The last source transaction a batch covers: what the checkpoint records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPosition {
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: UnixMicros,
}

/// Changes of one or more whole source transactions, in commit order.
#[derive(Debug, Default)]
pub struct Batch {
    /// The keys of the users' part ([`crate::map::Profile::part_keys`]; none for a profile
    /// without parts): an upsert that writes all of them sets the part itself ("none yet"
    /// for a Stack Auth user inserted), so the batch knows it comes from no row.
    part_keys: &'static [&'static str],
    segments: Vec<Segment>,
    /// Users whose last change in the current source transaction cleared a part, with what
    /// the batch held for them before (`None`: nothing), to undo it if the user's delete
    /// follows.
    cleared: HashMap<String, Option<PendingUser>>,
    last_commit: Option<CommitPosition>,
    transactions: usize,
    /// Of `transactions`, those that carried a change for the target (not a heartbeat or
    /// marker message alone, not only other tables' or skipped rows).
    user_transactions: usize,
    changes: usize,
    /// Commit times of the transactions in the batch, for lag accounting after apply.
    commit_times: Vec<UnixMicros>,
    /// Set by [`Batch::split_beside`]: the segment from which the batch's statements wait for
    /// the batch before it to commit (past the last: only the checkpoint waits).
    waits_from: Option<usize>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch for a profile whose users have a part made of `part_keys`.
    pub fn with_part_keys(part_keys: &'static [&'static str]) -> Self {
        Batch {
            part_keys,
            ..Self::default()
        }
    }

    /// Records that one source transaction's changes were all added; `carried` says whether
    /// it had any change for the target.
    pub fn commit(&mut self, position: CommitPosition, carried: bool) {
        if let Some(previous) = self.last_commit {
            debug_assert!(
                previous.end_lsn <= position.end_lsn,
                "commits arrive in order"
            );
        }
        self.last_commit = Some(position);
        self.cleared.clear();
        self.transactions += 1;
        self.user_transactions += usize::from(carried);
        self.commit_times.push(position.commit_time);
    }

    /// Encodes the documents of the users the batch upserts, which the writer then sends as
    /// they are. The route does it while its worker writes the batch or part before this one,
    /// instead of the worker between the two (a document takes microseconds, a batch thousands
    /// of them). Nothing may be added afterwards: an encoding would not see it.
    pub fn encode_documents(&mut self) {
        for segment in &mut self.segments {
            if let Segment::Users(users) = segment {
                for user in users.values_mut() {
                    user.encoded = user
                        .raw_json
                        .as_ref()
                        .map(|raw_json| raw_json.to_vec().into_boxed_slice());
                }
            }
        }
    }

    pub fn upsert(&mut self, user: MappedUser, at: UnixMicros) {
        self.upsert_with(user, at, None, None);
    }

    /// Upserts a user whose row the source keeps but marks deleted at `deleted_at`: the target
    /// row gets the latest `raw_json` and that `deleted_at`.
    pub fn upsert_deleted(&mut self, user: MappedUser, deleted_at: UnixMicros, at: UnixMicros) {
        self.upsert_with(user, at, Some(deleted_at), None);
    }

    /// Upserts a user whose id an update changed from `from` (whose removal the caller adds
    /// too): its unchanged-TOAST keys hold the values user `from` has.
    pub fn upsert_moved(
        &mut self,
        user: MappedUser,
        from: String,
        deleted_at: Option<UnixMicros>,
        at: UnixMicros,
    ) {
        self.upsert_with(user, at, deleted_at, Some(from));
    }

    fn upsert_with(
        &mut self,
        user: MappedUser,
        at: UnixMicros,
        deleted_at: Option<UnixMicros>,
        moved_from: Option<String>,
    ) {
        self.changes += 1;
        let MappedUser {
            id,
            raw_json,
            unchanged_keys,
        } = user;
        self.cleared.remove(&id);
        // Sets the part itself: from no row, whatever came before (see the module docs).
        let part_keys = self.part_keys;
        let writes_part = !part_keys.is_empty()
            && part_keys.iter().all(|key| {
                raw_json.contains_key(key) && !unchanged_keys.iter().any(|kept| kept == key)
            });
        // Takes the part from the old id of a primary-key change, with its record.
        let moves_part = moved_from.is_some()
            && !part_keys.is_empty()
            && part_keys
                .iter()
                .all(|key| unchanged_keys.iter().any(|kept| kept == key));
        let users = self.users_segment();
        // What the batch knows of the user whose values the unchanged keys hold.
        let earlier = users.remove(&id);
        // The record of the user's part stays the user's own (see the module docs).
        let (part_from, clear_if, part_from_keep) = earlier
            .as_ref()
            .map(|earlier| {
                (
                    earlier.part_from.clone(),
                    earlier.clear_if.clone(),
                    earlier.part_from_keep,
                )
            })
            .unwrap_or_default();
        // The old id's record, where the batch knows it: its keys are the ones merged below.
        let moved_part_from = match &moved_from {
            Some(from) if moves_part => users.get(from).and_then(|old| old.part_from.clone()),
            _ => None,
        };
        let earlier = match &moved_from {
            Some(from) if !unchanged_keys.is_empty() => users.get(from).cloned(),
            Some(_) => None,
            None => earlier,
        };
        let pending = match earlier {
            Some(PendingUser {
                raw_json: Some(earlier),
                keep_keys: earlier_keep,
                keep_from: earlier_from,
                ..
            }) => merge_unchanged(
                raw_json,
                unchanged_keys,
                earlier,
                earlier_keep,
                earlier_from.or(moved_from),
            ),
            Some(PendingUser {
                raw_json: None,
                patch,
                ..
            }) if !patch.is_empty() => {
                // What the patch holds is known; the other keys still come from the target.
                let keep_keys = unchanged_keys.clone();
                merge_unchanged(
                    raw_json,
                    unchanged_keys,
                    RawJson::from(patch),
                    keep_keys,
                    moved_from,
                )
            }
            _ => PendingUser {
                keep_from: moved_from.filter(|_| !unchanged_keys.is_empty()),
                raw_json: Some(raw_json),
                keep_keys: unchanged_keys,
                patch: Map::new(),
                updated_at: at,
                deleted_at: None,
                part_from: None,
                clear_if: None,
                part_from_keep: false,
                encoded: None,
            },
        };
        let (part_from, part_from_keep) = if writes_part {
            (Some(None), false)
        } else if moves_part {
            match moved_part_from {
                Some(known) => (Some(known), false),
                // Kept from the old id's row on the target: so is the record.
                None => (
                    None,
                    pending.keep_from.is_some()
                        && part_keys
                            .iter()
                            .all(|key| pending.keep_keys.iter().any(|kept| kept == key)),
                ),
            }
        } else {
            (part_from, part_from_keep)
        };
        // A pending clear of a part this upsert sets anew from no row changes nothing left
        // standing; left to the target it could only stop run on an unknown record.
        let clear_if = clear_if.filter(|_| !writes_part);
        users.insert(
            id,
            PendingUser {
                updated_at: at,
                deleted_at,
                part_from,
                clear_if,
                part_from_keep,
                ..pending
            },
        );
    }

    pub fn soft_delete(&mut self, id: String, at: UnixMicros) {
        self.soft_delete_with(id, at, true);
    }

    /// The removal half of a primary-key change (its upsert follows, [`Batch::upsert_moved`]):
    /// a delete, except that a clear just before it stands. The user lives on under its new
    /// id, which takes the old one's part as the clear left it.
    pub fn soft_delete_moved(&mut self, id: String, at: UnixMicros) {
        self.soft_delete_with(id, at, false);
    }

    fn soft_delete_with(&mut self, id: String, at: UnixMicros, undoes_clear: bool) {
        self.changes += 1;
        let undo = self.cleared.remove(&id).filter(|_| undoes_clear);
        let users = self.users_segment();
        match undo {
            Some(Some(before)) => {
                users.insert(id.clone(), before);
            }
            Some(None) => {
                users.remove(&id);
            }
            None => {}
        }
        let pending = users.entry(id).or_insert_with(|| PendingUser::nothing(at));
        pending.updated_at = at;
        pending.deleted_at.get_or_insert(at);
    }

    /// Sets `keys` of user `id`, the part that comes from row `from` now (`None`: from
    /// none), and keeps its other keys (see the module docs).
    pub fn patch(
        &mut self,
        id: String,
        keys: Map<String, Value>,
        from: Option<String>,
        at: UnixMicros,
    ) {
        self.changes += 1;
        self.cleared.remove(&id);
        // A pending clear of keys this patch all sets anew changes nothing the patch leaves
        // (the patch writes the record too); left to the target it could only stop run
        // where the target does not know the record.
        // (Not for a user the batch deleted: the patch changes nothing of it.)
        if let Some(pending) = self.users_segment().get_mut(&id) {
            if pending.deleted_at.is_none()
                && pending
                    .clear_if
                    .as_ref()
                    .is_some_and(|clear_if| clear_if.keys.keys().all(|key| keys.contains_key(key)))
            {
                pending.clear_if = None;
            }
        }
        self.patch_keys(id, keys, from, at);
    }

    /// A patch clearing a part of user `id` whose row went away: undone if the user's delete
    /// is the next change to it in the same source transaction (see the module docs).
    pub fn clear_part(&mut self, id: String, keys: Map<String, Value>, at: UnixMicros) {
        self.changes += 1;
        let before = self.users_segment().get(&id).cloned();
        self.cleared.entry(id.clone()).or_insert(before);
        self.patch_keys(id, keys, None, at);
    }

    /// Row `row`, from which user `id`'s part may come, went away, known by its key only:
    /// the part (`keys`) is cleared if it comes from that row, decided by what the batch knows
    /// or else by the target (see the module docs); undone like [`Batch::clear_part`].
    pub fn clear_part_if(
        &mut self,
        id: String,
        row: String,
        keys: Map<String, Value>,
        at: UnixMicros,
    ) {
        self.changes += 1;
        let users = self.users_segment();
        let before = users.get(&id).cloned();
        let pending = users
            .entry(id.clone())
            .or_insert_with(|| PendingUser::nothing(at));
        if pending.deleted_at.is_some() {
            // As any patch after the user's delete: the user keeps its last part.
            return;
        }
        let after_upsert = pending.raw_json.is_some();
        let clears_now = match (&pending.part_from, &mut pending.clear_if) {
            (Some(from), _) => from.as_ref() == Some(&row),
            (None, Some(clear_if)) => {
                clear_if.rows.push(row);
                // The row the target decides against is the one the upsert leaves; for
                // the clear before the upsert that is the same row when it was live.
                clear_if.after_upsert |= after_upsert;
                false
            }
            (None, None) => {
                pending.clear_if = Some(ClearIf {
                    rows: vec![row],
                    keys: keys.clone(),
                    at,
                    after_upsert,
                });
                false
            }
        };
        self.cleared.entry(id.clone()).or_insert(before);
        if clears_now {
            self.patch_keys(id, keys, None, at);
        }
    }

    /// Counted by the caller.
    fn patch_keys(
        &mut self,
        id: String,
        keys: Map<String, Value>,
        from: Option<String>,
        at: UnixMicros,
    ) {
        let users = self.users_segment();
        let pending = users.entry(id).or_insert_with(|| PendingUser::nothing(at));
        if pending.deleted_at.is_some() {
            return;
        }
        pending.part_from = Some(from);
        pending.part_from_keep = false;
        pending.updated_at = at;
        match &mut pending.raw_json {
            Some(raw_json) => {
                pending.keep_keys.retain(|key| !keys.contains_key(key));
                raw_json.extend(keys);
            }
            None => pending.patch.extend(keys),
        }
    }

    pub fn soft_delete_all(&mut self, at: UnixMicros) {
        self.changes += 1;
        self.cleared.clear();
        self.segments.push(Segment::SoftDeleteAll(at));
    }

    fn users_segment(&mut self) -> &mut HashMap<String, PendingUser> {
        if !matches!(self.segments.last(), Some(Segment::Users(_))) {
            self.segments.push(Segment::Users(HashMap::new()));
        }
        match self.segments.last_mut() {
            Some(Segment::Users(users)) => users,
            _ => unreachable!("a users segment was just pushed"),
        }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn last_commit(&self) -> Option<CommitPosition> {
        self.last_commit
    }

    pub fn transactions(&self) -> usize {
        self.transactions
    }

    /// The source transactions in the batch that carried changes for the target: what
    /// `usersync_transactions_total` and `replay`'s summary count.
    pub fn user_transactions(&self) -> usize {
        self.user_transactions
    }

    pub fn changes(&self) -> usize {
        self.changes
    }

    pub fn commit_times(&self) -> &[UnixMicros] {
        &self.commit_times
    }

    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    /// The users this batch's statements write on the target, hashed: the rows, and the
    /// rows of `usersync.primary_email_channel`, they lock. `None` unless the batch is one
    /// segment (a TRUNCATE reaches every row) whose users' values are all their own (a moved
    /// user's come from its old id's row, which another user's statements may change):
    /// only such a batch is written beside another ([`Batch::split_beside`]).
    pub fn user_keys(&self) -> Option<UserKeys> {
        self.lone_users()
            .map(|users| UserKeys(users.keys().map(|id| UserKeys::hash(id)).collect()))
    }

    /// See [`Batch::user_keys`].
    fn lone_users(&self) -> Option<&HashMap<String, PendingUser>> {
        let [Segment::Users(users)] = self.segments.as_slice() else {
            return None;
        };
        (!users.values().any(|user| user.keep_from.is_some())).then_some(users)
    }

    /// Prepares the batch to be written beside the batch before it, whose users are
    /// `before`, while that one is still being written: the users that one does not write go
    /// first, then the statements wait for it to commit, then come the users it does write
    /// (their rows are locked until it commits, and must be written after it), then the
    /// checkpoint. Two segments of users no statement shares are the one segment they came
    /// from. Returns the batch's users ([`Batch::user_keys`]), or `None`, the batch unchanged,
    /// when it cannot be written beside another.
    pub fn split_beside(&mut self, before: &UserKeys) -> Option<UserKeys> {
        let keys = self.user_keys()?;
        let Some(Segment::Users(users)) = self.segments.pop() else {
            unreachable!("user_keys checked that the batch is one users segment");
        };
        let (later, first): (HashMap<_, _>, HashMap<_, _>) = users
            .into_iter()
            .partition(|(id, _)| before.0.contains(&UserKeys::hash(id)));
        // From the later users, or past the end when there are none.
        self.waits_from = Some(usize::from(!first.is_empty()));
        self.segments = [first, later]
            .into_iter()
            .filter(|users| !users.is_empty())
            .map(Segment::Users)
            .collect();
        Some(keys)
    }

    /// See [`Batch::split_beside`]: where the statements wait for the batch before.
    pub fn waits_from(&self) -> Option<usize> {
        self.waits_from
    }
}

/// The users a batch writes, by a hash of their ids ([`Batch::user_keys`]). Two ids with one
/// hash only make a user look shared: it is then written after the batch before commits,
/// which is always correct.
#[derive(Debug, Default)]
pub struct UserKeys(std::collections::HashSet<u64>);

impl UserKeys {
    fn hash(id: &str) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
    }
}

/// A later upsert takes the earlier upsert's values for the keys it left unchanged; the keys
/// the earlier one left to the target stay with the target row it named (`earlier_from`).
fn merge_unchanged(
    mut raw_json: RawJson,
    unchanged_keys: Vec<String>,
    mut earlier: RawJson,
    earlier_keep: Vec<String>,
    earlier_from: Option<String>,
) -> PendingUser {
    let mut keep_keys = Vec::new();
    for key in unchanged_keys {
        match earlier.remove(&key) {
            Some(value) => {
                raw_json.insert(key, value);
            }
            None if earlier_keep.contains(&key) => keep_keys.push(key),
            // The earlier upsert sent the whole row without this key: it no longer exists.
            None => {}
        }
    }
    PendingUser {
        raw_json: Some(raw_json),
        keep_from: earlier_from.filter(|_| !keep_keys.is_empty()),
        keep_keys,
        patch: Map::new(),
        updated_at: 0,
        deleted_at: None,
        part_from: None,
        clear_if: None,
        part_from_keep: false,
        encoded: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(id: &str, fields: Value, unchanged: &[&str]) -> MappedUser {
        let mut raw_json = fields.as_object().cloned().unwrap_or_default();
        raw_json.insert("id".into(), json!(id));
        MappedUser {
            id: id.to_owned(),
            raw_json: raw_json.into(),
            unchanged_keys: unchanged.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn only_users(batch: &Batch) -> &HashMap<String, PendingUser> {
        match batch.segments() {
            [Segment::Users(users)] => users,
            other => panic!("expected one users segment, got {other:?}"),
        }
    }

    fn users_batch(ids: &[&str]) -> Batch {
        let mut batch = Batch::new();
        for id in ids {
            batch.upsert(user(id, json!({}), &[]), 1);
        }
        batch
    }

    fn segment_ids(batch: &Batch) -> Vec<Vec<String>> {
        batch
            .segments()
            .iter()
            .map(|segment| match segment {
                Segment::Users(users) => {
                    let mut ids: Vec<String> = users.keys().cloned().collect();
                    ids.sort();
                    ids
                }
                Segment::SoftDeleteAll(_) => vec!["TRUNCATE".into()],
            })
            .collect()
    }

    #[test]
    fn a_batch_beside_another_writes_that_ones_users_after_it() {
        let before = users_batch(&["b", "x"]).user_keys().unwrap();
        let mut batch = users_batch(&["a", "b", "c"]);
        batch.soft_delete("d".into(), 2);
        assert!(batch.split_beside(&before).is_some());
        assert_eq!(
            segment_ids(&batch),
            [vec!["a", "c", "d"], vec!["b"]],
            "the users the batch before writes come last"
        );
        assert_eq!(batch.waits_from(), Some(1));
        assert_eq!(batch.changes(), 4);

        // None shared: only the checkpoint waits.
        let mut batch = users_batch(&["a", "c"]);
        assert!(batch.split_beside(&before).is_some());
        assert_eq!(segment_ids(&batch), [vec!["a", "c"]]);
        assert_eq!(batch.waits_from(), Some(1));

        // All shared: everything waits.
        let mut batch = users_batch(&["x", "b"]);
        assert!(batch.split_beside(&before).is_some());
        assert_eq!(segment_ids(&batch), [vec!["b", "x"]]);
        assert_eq!(batch.waits_from(), Some(0));
    }

    #[test]
    fn a_truncate_or_a_moved_user_is_never_written_beside_another() {
        let before = users_batch(&["b"]).user_keys().unwrap();
        let mut truncated = users_batch(&["a"]);
        truncated.soft_delete_all(2);
        truncated.upsert(user("c", json!({}), &[]), 3);
        assert!(truncated.user_keys().is_none());
        assert!(truncated.split_beside(&before).is_none());
        assert_eq!(
            segment_ids(&truncated),
            [vec!["a"], vec!["TRUNCATE"], vec!["c"]]
        );

        // Its values come from another user's row, which the batch before may change.
        let mut moved = users_batch(&["a"]);
        moved.upsert_moved(user("m", json!({}), &["k"]), "old".into(), None, 2);
        assert!(moved.user_keys().is_none());
        assert!(moved.split_beside(&before).is_none());
        assert_eq!(moved.waits_from(), None);
    }

    #[test]
    fn last_upsert_wins() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"display_name": "A1"}), &[]), 1);
        batch.upsert(user("a", json!({"display_name": "A2"}), &[]), 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json.as_ref().unwrap()["display_name"], "A2");
        assert_eq!((a.updated_at, a.deleted_at), (2, None));
        assert_eq!(batch.changes(), 2);
    }

    #[test]
    fn delete_after_upsert_keeps_the_row_soft_deleted() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"display_name": "A"}), &[]), 1);
        batch.soft_delete("a".into(), 2);
        let a = &only_users(&batch)["a"];
        assert!(a.raw_json.is_some());
        assert_eq!((a.updated_at, a.deleted_at), (2, Some(2)));
    }

    #[test]
    fn upsert_after_delete_revives() {
        let mut batch = Batch::new();
        batch.soft_delete("a".into(), 1);
        batch.upsert(user("a", json!({}), &[]), 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.deleted_at, None);
        assert!(a.raw_json.is_some());
    }

    #[test]
    fn a_soft_deleted_row_carries_its_json_and_its_own_time() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"n": 1, "big": "x"}), &[]), 1);
        batch.upsert_deleted(user("a", json!({"n": 2}), &["big"]), 5, 7);
        let a = &only_users(&batch)["a"];
        let raw = a.raw_json.as_ref().unwrap();
        assert_eq!(
            (raw["n"].clone(), raw["big"].clone()),
            (json!(2), json!("x"))
        );
        assert_eq!((a.updated_at, a.deleted_at), (7, Some(5)));
        // A later hard delete keeps the source's deletion time; a live upsert revives.
        batch.soft_delete("a".into(), 9);
        assert_eq!(only_users(&batch)["a"].deleted_at, Some(5));
        batch.upsert(user("a", json!({"n": 3}), &[]), 10);
        assert_eq!(only_users(&batch)["a"].deleted_at, None);
        assert_eq!(batch.changes(), 4);
    }

    #[test]
    fn repeated_delete_keeps_the_first_time() {
        let mut batch = Batch::new();
        batch.soft_delete("a".into(), 1);
        batch.soft_delete("a".into(), 3);
        assert_eq!(only_users(&batch)["a"].deleted_at, Some(1));
    }

    #[test]
    fn unchanged_toast_is_filled_from_an_earlier_upsert() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"big": "x", "n": 1}), &[]), 1);
        batch.upsert(user("a", json!({"n": 2}), &["big"]), 2);
        let a = &only_users(&batch)["a"];
        let raw = a.raw_json.as_ref().unwrap();
        assert_eq!(
            (raw["big"].clone(), raw["n"].clone()),
            (json!("x"), json!(2))
        );
        assert!(a.keep_keys.is_empty());
    }

    #[test]
    fn unchanged_toast_twice_is_left_to_the_target() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"n": 1}), &["big"]), 1);
        batch.upsert(user("a", json!({"n": 2}), &["big"]), 2);
        assert_eq!(only_users(&batch)["a"].keep_keys, vec!["big".to_owned()]);
    }

    #[test]
    fn a_moved_user_keeps_unchanged_values_of_the_old_row_on_the_target() {
        let mut batch = Batch::new();
        batch.soft_delete("a".into(), 1);
        batch.upsert_moved(user("b", json!({"n": 1}), &["big"]), "a".into(), None, 1);
        let b = &only_users(&batch)["b"];
        assert_eq!(b.keep_keys, vec!["big".to_owned()]);
        assert_eq!(b.keep_from.as_deref(), Some("a"));
        // Later updates of the moved user still take them from there, and so does a second
        // move.
        batch.upsert(user("b", json!({"n": 2}), &["big"]), 2);
        assert_eq!(only_users(&batch)["b"].keep_from.as_deref(), Some("a"));
        batch.soft_delete("b".into(), 3);
        batch.upsert_moved(user("c", json!({"n": 3}), &["big"]), "b".into(), None, 3);
        let users = only_users(&batch);
        assert_eq!(users["c"].keep_from.as_deref(), Some("a"));
        assert_eq!(users["c"].keep_keys, vec!["big".to_owned()]);
        assert_eq!(users["a"].deleted_at, Some(1));
        assert_eq!(users["b"].deleted_at, Some(3));
    }

    #[test]
    fn a_moved_user_keeps_unchanged_values_of_the_old_row_in_the_batch() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"big": "x", "n": 1}), &[]), 1);
        batch.soft_delete("a".into(), 2);
        batch.upsert_moved(user("b", json!({"n": 2}), &["big"]), "a".into(), None, 2);
        let b = &only_users(&batch)["b"];
        assert_eq!(b.raw_json.as_ref().unwrap()["big"], "x");
        assert!(b.keep_keys.is_empty());
        assert_eq!(b.keep_from, None);
        // The old user keeps its own row, soft-deleted.
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json.as_ref().unwrap()["big"], "x");
        assert_eq!(a.deleted_at, Some(2));
    }

    #[test]
    fn a_move_replaces_what_the_batch_held_under_the_new_id() {
        let mut batch = Batch::new();
        batch.upsert(user("b", json!({"big": "old b"}), &[]), 1);
        batch.soft_delete("b".into(), 1);
        batch.upsert_moved(user("b", json!({"n": 1}), &["big"]), "a".into(), None, 2);
        let b = &only_users(&batch)["b"];
        assert_eq!(b.raw_json.as_ref().unwrap().get("big"), None);
        assert_eq!(
            (b.keep_keys.clone(), b.keep_from.as_deref()),
            (vec!["big".to_owned()], Some("a"))
        );
        assert_eq!(b.deleted_at, None);
    }

    fn keys(fields: Value) -> Map<String, Value> {
        fields.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_patch_merges_into_a_pending_upsert() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"primary_email": null, "n": 1}), &[]), 1);
        batch.patch(
            "a".into(),
            keys(json!({"primary_email": "a@x.org"})),
            None,
            1,
        );
        let a = &only_users(&batch)["a"];
        let raw = a.raw_json.as_ref().unwrap();
        assert_eq!(
            (raw["primary_email"].clone(), raw["n"].clone()),
            (json!("a@x.org"), json!(1))
        );
        assert!(a.patch.is_empty());
        // A later update of the user row keeps the patched email, pending or not.
        batch.upsert(user("a", json!({"n": 2}), &["primary_email", "big"]), 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json.as_ref().unwrap()["primary_email"], "a@x.org");
        assert!(a.keep_keys.is_empty(), "{:?}", a.keep_keys);
        assert_eq!(batch.changes(), 3);
    }

    #[test]
    fn a_patch_fills_keys_an_upsert_left_to_the_target() {
        let mut batch = Batch::new();
        batch.upsert(
            user("a", json!({"n": 1}), &["primary_email", "verified"]),
            1,
        );
        batch.patch(
            "a".into(),
            keys(json!({"primary_email": "a@x.org"})),
            None,
            2,
        );
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json.as_ref().unwrap()["primary_email"], "a@x.org");
        assert_eq!(a.keep_keys, vec!["verified".to_owned()]);
        assert_eq!(a.updated_at, 2);
    }

    #[test]
    fn patches_without_an_upsert_add_up_and_feed_a_later_upsert() {
        let mut batch = Batch::new();
        batch.patch(
            "a".into(),
            keys(json!({"primary_email": null, "v": false})),
            None,
            1,
        );
        batch.patch(
            "a".into(),
            keys(json!({"primary_email": "b@x.org"})),
            None,
            2,
        );
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json, None);
        assert_eq!(
            a.patch,
            keys(json!({"primary_email": "b@x.org", "v": false}))
        );
        assert_eq!((a.updated_at, a.deleted_at), (2, None));
        batch.upsert(user("a", json!({"n": 1}), &["primary_email", "other"]), 3);
        let a = &only_users(&batch)["a"];
        let raw = a.raw_json.as_ref().unwrap();
        assert_eq!(raw["primary_email"], "b@x.org");
        assert_eq!(a.keep_keys, vec!["other".to_owned()]);
    }

    #[test]
    fn a_patch_after_a_delete_changes_nothing() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({"primary_email": "a@x.org"}), &[]), 1);
        batch.soft_delete("a".into(), 2);
        batch.patch("a".into(), keys(json!({"primary_email": null})), None, 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json.as_ref().unwrap()["primary_email"], "a@x.org");
        assert_eq!(a.deleted_at, Some(2));
        batch.soft_delete("b".into(), 3);
        batch.patch("b".into(), keys(json!({"primary_email": null})), None, 3);
        let b = &only_users(&batch)["b"];
        assert!(b.patch.is_empty());
        assert_eq!(b.deleted_at, Some(3));
    }

    fn position(n: u64) -> CommitPosition {
        CommitPosition {
            commit_lsn: Lsn(n),
            end_lsn: Lsn(n),
            commit_time: n as i64,
        }
    }

    #[test]
    fn a_part_cleared_just_before_the_delete_of_its_user_is_kept() {
        let cleared = || keys(json!({"primary_email": null}));
        let mut batch = Batch::new();
        // On the target only: the clearing patch goes, the delete stays.
        batch.clear_part("a".into(), cleared(), 1);
        batch.soft_delete("a".into(), 1);
        let a = &only_users(&batch)["a"];
        assert!(a.patch.is_empty() && a.raw_json.is_none());
        assert_eq!(a.deleted_at, Some(1));
        // Upserted earlier in the batch: the row keeps its email.
        batch.commit(position(1), true);
        batch.upsert(user("b", json!({"primary_email": "b@x.org"}), &[]), 2);
        batch.commit(position(2), true);
        batch.clear_part("b".into(), cleared(), 3);
        batch.soft_delete("b".into(), 3);
        let b = &only_users(&batch)["b"];
        assert_eq!(b.raw_json.as_ref().unwrap()["primary_email"], "b@x.org");
        assert_eq!((b.updated_at, b.deleted_at), (3, Some(3)));
        assert_eq!(batch.changes(), 5);
    }

    #[test]
    fn a_part_cleared_in_an_earlier_transaction_or_before_another_change_stays_cleared() {
        let cleared = || keys(json!({"primary_email": null}));
        let mut batch = Batch::new();
        // The user lived without the part for a while: that is its last state.
        batch.clear_part("a".into(), cleared(), 1);
        batch.commit(position(1), true);
        batch.soft_delete("a".into(), 2);
        assert_eq!(only_users(&batch)["a"].patch, cleared());
        // Another change to the user in between: the clear stands.
        batch.clear_part("b".into(), cleared(), 3);
        batch.patch(
            "b".into(),
            keys(json!({"primary_email": "new@x.org"})),
            None,
            3,
        );
        batch.soft_delete("b".into(), 3);
        assert_eq!(
            only_users(&batch)["b"].patch,
            keys(json!({"primary_email": "new@x.org"}))
        );
    }

    fn email(value: Option<&str>) -> Map<String, Value> {
        keys(json!({"primary_email": value, "primary_email_verified": value.is_some()}))
    }

    fn cleared() -> Map<String, Value> {
        email(None)
    }

    #[test]
    fn a_patch_records_where_the_part_comes_from_and_a_clear_forgets_it() {
        let mut batch = Batch::new();
        batch.patch("a".into(), email(Some("a@x.org")), Some("c1".into()), 1);
        assert_eq!(
            only_users(&batch)["a"].part_from,
            Some(Some("c1".to_owned()))
        );
        batch.commit(position(1), true);
        batch.clear_part("a".into(), cleared(), 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(
            (a.part_from.clone(), a.patch.clone()),
            (Some(None), cleared())
        );
        // Merged into an upsert, the record goes with it.
        batch.upsert(user("b", json!({"n": 1}), &["primary_email"]), 3);
        batch.patch("b".into(), email(Some("b@x.org")), Some("c2".into()), 3);
        let b = &only_users(&batch)["b"];
        assert_eq!(b.raw_json.as_ref().unwrap()["primary_email"], "b@x.org");
        assert_eq!(b.part_from, Some(Some("c2".to_owned())));
        // A later upsert of the user row keeps the record.
        batch.upsert(user("b", json!({"n": 2}), &["primary_email"]), 4);
        assert_eq!(
            only_users(&batch)["b"].part_from,
            Some(Some("c2".to_owned()))
        );
    }

    #[test]
    fn a_part_row_gone_by_its_key_is_decided_by_the_batch_when_it_knows() {
        let mut batch = Batch::new();
        // The batch recorded c1: c2 going away changes nothing, c1 going away clears.
        batch.patch("a".into(), email(Some("a@x.org")), Some("c1".into()), 1);
        batch.commit(position(1), true);
        batch.clear_part_if("a".into(), "c2".into(), cleared(), 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.patch, email(Some("a@x.org")));
        assert_eq!(a.clear_if, None);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 3);
        let a = &only_users(&batch)["a"];
        assert_eq!(
            (a.patch.clone(), a.part_from.clone()),
            (cleared(), Some(None))
        );
        assert_eq!(a.updated_at, 3);
        // Known to come from no row (cleared earlier in the batch): nothing more to clear.
        batch.commit(position(3), true);
        batch.clear_part_if("a".into(), "c3".into(), cleared(), 4);
        assert_eq!(only_users(&batch)["a"].clear_if, None);
        assert_eq!(batch.changes(), 4);
    }

    #[test]
    fn a_part_row_gone_by_its_key_is_left_to_the_target_when_the_batch_does_not_know() {
        let mut batch = Batch::new();
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 1);
        batch.commit(position(1), true);
        let a = &only_users(&batch)["a"];
        assert_eq!(
            a.clear_if,
            Some(ClearIf {
                rows: vec!["c1".into()],
                keys: cleared(),
                at: 1,
                after_upsert: false,
            })
        );
        assert!(a.patch.is_empty() && a.raw_json.is_none() && a.part_from.is_none());
        // Another one still unknown: either row clears it.
        batch.clear_part_if("a".into(), "c2".into(), cleared(), 2);
        batch.commit(position(2), true);
        assert_eq!(
            only_users(&batch)["a"].clear_if.as_ref().unwrap().rows,
            ["c1", "c2"]
        );
        // A new primary email afterwards sets every key the clear would: the clear is moot
        // (and would stop run for nothing where the target does not know the record).
        batch.patch("a".into(), email(Some("new@x.org")), Some("c3".into()), 3);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.clear_if, None);
        assert_eq!(a.part_from, Some(Some("c3".to_owned())));
        assert_eq!(a.patch, email(Some("new@x.org")));
        // From then on the batch knows.
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 4);
        assert_eq!(only_users(&batch)["a"].patch, email(Some("new@x.org")));
    }

    #[test]
    fn an_upsert_keeps_a_clear_left_to_the_target_and_takes_the_part_from_the_row_it_leaves() {
        let mut batch = Batch::new();
        // Before or after the clear, an upsert that leaves the email to the target: the
        // target clears first, and the upsert takes the email from the row as cleared or not.
        batch.upsert(user("a", json!({"n": 1}), &["primary_email"]), 1);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 2);
        batch.commit(position(2), true);
        batch.upsert(user("a", json!({"n": 2}), &["primary_email"]), 3);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.clear_if.as_ref().unwrap().rows, ["c1"]);
        assert_eq!(a.keep_keys, ["primary_email"]);
        assert_eq!(a.part_from, None);
    }

    #[test]
    fn a_part_row_gone_by_its_key_follows_the_delete_rules() {
        let mut batch = Batch::new();
        // After the user's delete (Stack Auth's cascade): the user keeps its last email, and
        // the record that says where it came from.
        batch.soft_delete("a".into(), 1);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 1);
        let a = &only_users(&batch)["a"];
        assert_eq!((a.clear_if.clone(), a.part_from.clone()), (None, None));
        assert_eq!(a.deleted_at, Some(1));
        // Just before the delete, in the same source transaction: undone.
        batch.commit(position(1), true);
        batch.clear_part_if("b".into(), "c2".into(), cleared(), 2);
        batch.soft_delete("b".into(), 2);
        let b = &only_users(&batch)["b"];
        assert_eq!(b.clear_if, None);
        assert_eq!(b.deleted_at, Some(2));
        // ... also when the batch knew the record and cleared at once.
        batch.commit(position(2), true);
        batch.patch("c".into(), email(Some("c@x.org")), Some("c3".into()), 3);
        batch.commit(position(3), true);
        batch.clear_part_if("c".into(), "c3".into(), cleared(), 4);
        batch.soft_delete("c".into(), 4);
        let c = &only_users(&batch)["c"];
        assert_eq!(c.patch, email(Some("c@x.org")));
        assert_eq!(c.part_from, Some(Some("c3".to_owned())));
        assert_eq!(c.deleted_at, Some(4));
        // In an earlier source transaction: the user lived without it, the clear stands and
        // the target applies it before the delete.
        batch.commit(position(4), true);
        batch.clear_part_if("d".into(), "c4".into(), cleared(), 5);
        batch.commit(position(5), true);
        batch.soft_delete("d".into(), 6);
        let d = &only_users(&batch)["d"];
        assert_eq!(d.clear_if.as_ref().unwrap().rows, ["c4"]);
        assert_eq!(d.deleted_at, Some(6));
    }

    /// The part's keys in these tests, as [`Profile::part_keys`] gives them for Stack Auth.
    ///
    /// [`Profile::part_keys`]: crate::map::Profile::part_keys
    const PART: &[&str] = &["primary_email", "primary_email_verified"];

    /// A user row inserted: the part's keys "none yet".
    fn inserted(id: &str, n: i64) -> MappedUser {
        user(
            id,
            json!({"n": n, "primary_email": null, "primary_email_verified": false}),
            &[],
        )
    }

    fn last_users(batch: &Batch) -> &HashMap<String, PendingUser> {
        match batch.segments().last() {
            Some(Segment::Users(users)) => users,
            other => panic!("expected a users segment last, got {other:?}"),
        }
    }

    #[test]
    fn an_upsert_writing_the_part_keys_makes_the_part_come_from_none() {
        let mut batch = Batch::with_part_keys(PART);
        batch.upsert(inserted("a", 1), 1);
        assert_eq!(only_users(&batch)["a"].part_from, Some(None));
        // One that leaves them to the target says nothing of the record.
        batch.upsert(user("b", json!({"n": 1}), PART), 1);
        assert_eq!(only_users(&batch)["b"].part_from, None);
        // Without part keys (other profiles) an upsert never touches the record.
        let mut batch = Batch::new();
        batch.upsert(inserted("a", 1), 1);
        assert_eq!(only_users(&batch)["a"].part_from, None);
    }

    #[test]
    fn a_clear_by_key_after_a_delete_and_an_insert_is_decided_in_the_batch() {
        // T0 deletes a, T1 inserts it again, T2 removes one of its channels by key: applied
        // one by one, the clear finds "none yet" and changes nothing; it must not reach the
        // target, which would stop run where it does not know a's record.
        let mut batch = Batch::with_part_keys(PART);
        batch.soft_delete("a".into(), 1);
        batch.commit(position(1), true);
        batch.upsert(inserted("a", 1), 2);
        batch.commit(position(2), true);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 3);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.clear_if, None);
        assert_eq!(a.part_from, Some(None));
        assert_eq!(a.deleted_at, None);
        assert_eq!(a.raw_json.as_ref().unwrap()["primary_email"], Value::Null);
    }

    #[test]
    fn an_insert_after_a_delete_does_not_carry_the_record_of_the_email_before() {
        // T1 sets a's email from c1, T2 deletes a, T3 inserts a again: the email is "none
        // yet", and so must the record be.
        let mut batch = Batch::with_part_keys(PART);
        batch.patch("a".into(), email(Some("a@x.org")), Some("c1".into()), 1);
        batch.commit(position(1), true);
        batch.soft_delete("a".into(), 2);
        batch.commit(position(2), true);
        batch.upsert(inserted("a", 1), 3);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.raw_json.as_ref().unwrap()["primary_email"], Value::Null);
        assert_eq!(a.part_from, Some(None));
    }

    #[test]
    fn a_clear_by_key_after_an_upsert_that_revives_knows_it() {
        // A truncate soft-deletes a on the target; an update revives it, its email kept from
        // the target row; then a channel goes away by key. The target must decide against the
        // row the upsert revives, not skip it as deleted.
        let mut batch = Batch::with_part_keys(PART);
        batch.soft_delete_all(1);
        batch.upsert(user("a", json!({"n": 1}), PART), 2);
        batch.commit(position(2), true);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 3);
        let a = &last_users(&batch)["a"];
        assert_eq!(a.deleted_at, None);
        assert!(a.clear_if.as_ref().unwrap().after_upsert);
        // A clear with no upsert before it in the segment does not.
        let mut batch = Batch::with_part_keys(PART);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 1);
        assert!(
            !only_users(&batch)["a"]
                .clear_if
                .as_ref()
                .unwrap()
                .after_upsert
        );
        // An upsert between two clears: the target decides both against the revived row.
        batch.commit(position(1), true);
        batch.upsert(user("a", json!({"n": 1}), PART), 2);
        batch.commit(position(2), true);
        batch.clear_part_if("a".into(), "c2".into(), cleared(), 3);
        let clear_if = only_users(&batch)["a"].clear_if.clone().unwrap();
        assert_eq!((clear_if.rows.len(), clear_if.after_upsert), (2, true));
    }

    #[test]
    fn a_patch_setting_every_key_of_the_part_drops_a_pending_clear() {
        let mut batch = Batch::with_part_keys(PART);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 1);
        batch.commit(position(1), true);
        // Only some of the keys: the clear still matters for the others.
        batch.patch(
            "a".into(),
            keys(json!({"primary_email_verified": true})),
            Some("c2".into()),
            2,
        );
        assert!(only_users(&batch)["a"].clear_if.is_some());
        batch.patch("a".into(), email(Some("a@x.org")), Some("c2".into()), 3);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.clear_if, None);
        assert_eq!(a.part_from, Some(Some("c2".to_owned())));
    }

    #[test]
    fn an_upsert_setting_every_key_of_the_part_drops_a_pending_clear() {
        // The upsert sets the part from no row: the clear before it changes nothing left
        // standing, and left to the target it could only stop run on an unknown record.
        let mut batch = Batch::with_part_keys(PART);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 1);
        batch.commit(position(1), true);
        let fields = json!({
            "n": 1,
            "primary_email": "a@x.org",
            "primary_email_verified": true,
            "primary_email_auth_enabled": true
        });
        batch.upsert(user("a", fields, &[]), 2);
        let a = &only_users(&batch)["a"];
        assert_eq!(a.clear_if, None);
        assert_eq!(a.part_from, Some(None));
    }

    #[test]
    fn a_patch_after_the_users_delete_leaves_its_pending_clear() {
        // The patch changes nothing of a deleted user, so the clear before the delete stands.
        let mut batch = Batch::with_part_keys(PART);
        batch.clear_part_if("a".into(), "c1".into(), cleared(), 1);
        batch.commit(position(1), true);
        batch.soft_delete("a".into(), 2);
        batch.commit(position(2), true);
        batch.patch("a".into(), email(Some("a@x.org")), Some("c2".into()), 3);
        assert!(only_users(&batch)["a"].clear_if.is_some());
    }

    #[test]
    fn an_id_change_after_a_clear_keeps_the_clear_and_carries_the_record() {
        // One source transaction: u's primary channel c1 goes away by key, then u's id
        // changes to v. The removal half of the id change is no delete: the clear stands, and
        // v takes u's email keys and their record.
        let mut batch = Batch::with_part_keys(PART);
        batch.patch("u".into(), email(Some("u@x.org")), Some("c1".into()), 1);
        batch.commit(position(1), true);
        batch.clear_part_if("u".into(), "c1".into(), cleared(), 2);
        batch.soft_delete_moved("u".into(), 2);
        batch.upsert_moved(user("v", json!({"n": 1}), PART), "u".into(), None, 2);
        let v = &only_users(&batch)["v"];
        assert_eq!(v.raw_json.as_ref().unwrap()["primary_email"], Value::Null);
        assert_eq!(v.part_from, Some(None));
        assert!(!v.part_from_keep);
        // The same with the record unknown to the batch: u's clear is left to the target,
        // before v's upsert reads u's row, and v's record is u's, copied on the target.
        let mut batch = Batch::with_part_keys(PART);
        batch.clear_part_if("u".into(), "c1".into(), cleared(), 2);
        batch.soft_delete_moved("u".into(), 2);
        batch.upsert_moved(user("v", json!({"n": 1}), PART), "u".into(), None, 2);
        let users = only_users(&batch);
        assert_eq!(users["u"].clear_if.as_ref().unwrap().rows, ["c1"]);
        assert_eq!(users["u"].deleted_at, Some(2));
        let v = &users["v"];
        assert_eq!(v.keep_from.as_deref(), Some("u"));
        assert_eq!(v.part_from, None);
        assert!(v.part_from_keep);
        // A later update of v that still leaves the email to the target keeps that.
        batch.upsert(user("v", json!({"n": 2}), PART), 3);
        assert!(only_users(&batch)["v"].part_from_keep);
        // A patch of v's email records its own row instead.
        batch.patch("v".into(), email(Some("v@x.org")), Some("c9".into()), 4);
        let v = &only_users(&batch)["v"];
        assert_eq!(v.part_from, Some(Some("c9".to_owned())));
        assert!(!v.part_from_keep);
    }

    #[test]
    fn truncate_starts_a_new_segment() {
        let mut batch = Batch::new();
        batch.upsert(user("a", json!({}), &[]), 1);
        batch.soft_delete_all(2);
        batch.upsert(user("b", json!({}), &[]), 3);
        assert!(matches!(
            batch.segments(),
            [
                Segment::Users(_),
                Segment::SoftDeleteAll(2),
                Segment::Users(_)
            ]
        ));
    }

    #[test]
    fn commit_tracks_the_last_position() {
        let mut batch = Batch::new();
        assert!(batch.is_empty());
        let first = CommitPosition {
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: 5,
        };
        let second = CommitPosition {
            commit_lsn: Lsn(30),
            end_lsn: Lsn(40),
            commit_time: 6,
        };
        batch.commit(first, true);
        batch.commit(second, true);
        assert_eq!(batch.last_commit(), Some(second));
        assert_eq!(batch.transactions(), 2);
        assert_eq!(batch.user_transactions(), 2);
        assert_eq!(batch.commit_times(), &[5, 6]);
    }
}
