//! The map step of the stream: what each decoded change means for the target's users.
//!
//! A row of the users table becomes an upsert or a soft delete; a row of another table of
//! the profile (a contact channel) a patch of part of a user; a row that stops being
//! replicated (anonymous, another tenancy, no longer the primary email) a removal, so that
//! nothing replicated before stays live. The batch and the writer take it from there.

use super::relations::StreamTables;
use crate::decode::{ColumnValue, LogicalMessage, OldTuple, Relation, Transaction, TupleData};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::map::{Gone, MappedUser, Member, RawJson, RowMapper, RowOutcome};
use crate::routing::Router;

/// One source change as it will reach the target.
pub(super) enum UserChange {
    /// `deleted_at`: the source keeps the row but marks the user deleted at that time.
    Upsert {
        user: MappedUser,
        inserted: bool,
        deleted_at: Option<i64>,
        /// The user's old id when the update changed it: its unchanged values are that user's.
        moved_from: Option<String>,
    },
    /// Part of a user changed (a row of another table of the profile).
    Patch {
        id: String,
        keys: serde_json::Map<String, serde_json::Value>,
        /// The row the part comes from now, `None`: none (see `RowOutcome::Patch`).
        from: Option<String>,
        /// The part's row went away: the patch clears the part (see `Batch::clear_part`).
        clears: bool,
    },
    /// A row holding part of a user went away, known by its key only: the target decides
    /// whether the part came from it (see `Batch::clear_part_if`).
    ClearPartIf {
        id: String,
        row: String,
        keys: serde_json::Map<String, serde_json::Value>,
    },
    SoftDelete(String),
    /// The old id of a primary-key change, removed: see `Batch::soft_delete_moved`.
    MovedAway(String),
    SoftDeleteAll,
    /// This replicator's heartbeat message (never reaches the target).
    Heartbeat,
}

impl UserChange {
    /// The change of a row whose id an update changed from `from` (`None`: it did not).
    pub fn moved_from(self, from: Option<String>) -> Self {
        match self {
            UserChange::Upsert {
                user,
                inserted,
                deleted_at,
                ..
            } => UserChange::Upsert {
                user,
                inserted,
                deleted_at,
                moved_from: from,
            },
            other => other,
        }
    }
}

/// The changes of a transaction (or of a part of one), for each route.
pub(super) struct Routed {
    routes: Vec<Vec<UserChange>>,
    len: usize,
}

impl Routed {
    pub fn new(routes: usize) -> Self {
        Routed {
            routes: (0..routes).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    /// Changes for all routes together.
    pub fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, route: usize, change: UserChange) {
        self.routes[route].push(change);
        self.len += 1;
    }

    fn push_all(&mut self, change: impl Fn() -> UserChange) {
        for route in 0..self.routes.len() {
            self.push(route, change());
        }
    }

    /// Route `route`'s changes.
    pub fn of(&self, route: usize) -> &[UserChange] {
        &self.routes[route]
    }

    /// Takes route `route`'s changes out.
    pub fn take(&mut self, route: usize) -> Vec<UserChange> {
        let changes = std::mem::take(&mut self.routes[route]);
        self.len -= changes.len();
        changes
    }

    pub fn clear(&mut self) {
        self.routes.iter_mut().for_each(Vec::clear);
        self.len = 0;
    }
}

/// Maps decoded changes with the profile's tables as the stream has described them so far,
/// and routes them (`--routes`; without it everything goes to route 0).
pub(super) struct ChangeMapper {
    tables: StreamTables,
    /// The prefix of this replicator's heartbeat messages.
    heartbeat_prefix: String,
    router: Option<Router>,
}

impl ChangeMapper {
    pub fn new(tables: StreamTables, heartbeat_prefix: String, router: Option<Router>) -> Self {
        ChangeMapper {
            tables,
            heartbeat_prefix,
            router,
        }
    }

    /// Routes by `routes` from now on (routes added while streaming).
    pub fn set_routes(&mut self, routes: std::sync::Arc<crate::routing::Routes>) {
        self.router = Some(routes.router());
        self.tables.set_routes(routes);
    }

    /// The route of a row of relation `relation_id`; `None`: no route takes it.
    fn route_of(&self, relation_id: u32, tuple: &TupleData) -> Result<Option<usize>, Error> {
        match &self.router {
            None => Ok(Some(0)),
            Some(router) => Ok(router.route(self.tables.route_value(relation_id, tuple)?)),
        }
    }

    /// A relation described outside a transaction's changes.
    pub fn note(&mut self, relation: Relation) -> Result<(), Error> {
        self.tables.note(relation)
    }

    /// A transaction the target has already: only the relations it describes matter.
    pub fn note_skipped(&mut self, transaction: Transaction) -> Result<(), Error> {
        self.tables.note_skipped(transaction)
    }

    /// Adds what `change` means for the targets' users to `out`, on the route of the row.
    pub fn map(&mut self, change: LogicalMessage, out: &mut Routed) -> Result<(), Error> {
        match change {
            LogicalMessage::Relation(relation) => self.tables.note(relation)?,
            LogicalMessage::Insert(insert) => {
                if let Some(mapping) = self.tables.mapping_of(insert.relation_id)? {
                    // A skipped new row has no user on the target to correct.
                    if let Some(change) = change_of(mapping.map_insert(&insert.new)?, true) {
                        if let Some(route) = self.route_of(insert.relation_id, &insert.new)? {
                            out.push(route, change);
                        }
                    }
                }
            }
            LogicalMessage::Update(update) => {
                let Some(mapping) = self.tables.mapping_of(update.relation_id)? else {
                    return Ok(());
                };
                let route = self.route_of(update.relation_id, &update.new)?;
                // The route of the row as it was: the old key holds the routing column (it
                // is in the replica identity), and is sent when the key changed.
                let route_before = match &update.old {
                    Some(old) => self.route_of(update.relation_id, old_tuple(old))?,
                    None => route,
                };
                let outcome = mapping.map_row(&update.new)?;
                // Whether the old row was skipped: a whole old row (REPLICA IDENTITY FULL)
                // tells; so does a key that decides skips (a tenancy) when the update left
                // it unchanged or sent it.
                let skipped_before = match &update.old {
                    Some(OldTuple::Full(old)) => mapping.skip_reason(old)?,
                    Some(OldTuple::Key(old)) => mapping.key_skip_reason(old)?,
                    None => mapping.key_skip_reason(&update.new)?,
                }
                .is_some();
                // How the row as it was is known, should it have gone: by the whole old row
                // (REPLICA IDENTITY FULL), else by its key, which is the new row's when the
                // update sent no old key.
                let gone = match &update.old {
                    Some(OldTuple::Full(_)) => Gone::WholeRow,
                    Some(OldTuple::Key(old)) => Gone::Key(old),
                    None => Gone::Key(&update.new),
                };
                let old_id = match &update.old {
                    Some(old) => Some(mapping.map_key(old_tuple(old))?),
                    None => None,
                };
                if route_before != route {
                    // The row moved to another route (its tenancy changed): there it is gone,
                    // here it is new, whole: the new route's target has no row to take the
                    // values the update left out (unchanged TOAST) from.
                    if let (Some(before), false) = (route_before, skipped_before) {
                        let id = old_id.unwrap_or_else(|| outcome.id().to_owned());
                        out.push(before, removal(mapping, id, gone)?);
                    }
                    if let Some(route) = route {
                        let whole = whole_row(&update.new, update.old.as_ref()).map_err(|()| {
                            Error::Config(format!(
                                "a row of {} moved to another route with values the update \
                                 did not send (unchanged large values): its new route's target \
                                 cannot get them; set REPLICA IDENTITY FULL on that table, \
                                 which sends them",
                                self.tables.table_of(update.relation_id)
                            ))
                        })?;
                        let outcome = match whole {
                            Some(whole) => mapping.map_row(&whole)?,
                            None => outcome,
                        };
                        if let Some(change) = change_of(outcome, false) {
                            out.push(route, change);
                        }
                    }
                    return Ok(());
                }
                let Some(route) = route else {
                    return Ok(());
                };
                let moved_from = old_id.filter(|old_id| old_id != outcome.id());
                let id_changed = moved_from.is_some();
                let moved_from = moved_from.filter(|_| !skipped_before);
                if let Some(old_id) = &moved_from {
                    // The primary key changed: the old user is gone, a new one appears, with
                    // the old user's values where the new row left them unchanged (TOAST).
                    // Not a delete: a clear of its part just before stands (see
                    // `Batch::soft_delete_moved`).
                    out.push(
                        route,
                        match removal(mapping, old_id.clone(), gone)? {
                            UserChange::SoftDelete(id) => UserChange::MovedAway(id),
                            other => other,
                        },
                    );
                }
                if let RowOutcome::Skip { id, reason } = &outcome {
                    // The row is no longer one of ours (it became anonymous, moved to another
                    // realm, is no longer the primary email): a user replicated before must
                    // not stay live, a part replicated before must not stay.
                    if !skipped_before && !id_changed {
                        tracing::debug!(%reason, "an updated row is no longer replicated");
                        out.push(route, removal(mapping, id.clone(), gone)?);
                    }
                }
                if let Some(change) = change_of(outcome, false) {
                    out.push(route, change.moved_from(moved_from));
                }
            }
            LogicalMessage::Delete(delete) => {
                let Some(mapping) = self.tables.mapping_of(delete.relation_id)? else {
                    return Ok(());
                };
                let Some(route) = self.route_of(delete.relation_id, old_tuple(&delete.old))? else {
                    return Ok(());
                };
                let id = mapping.map_key(old_tuple(&delete.old))?;
                let (skipped, gone) = match &delete.old {
                    OldTuple::Full(old) => (mapping.skip_reason(old)?, Gone::WholeRow),
                    OldTuple::Key(old) => (mapping.key_skip_reason(old)?, Gone::Key(old)),
                };
                if skipped.is_none() {
                    out.push(route, removal(mapping, id, gone)?);
                }
            }
            LogicalMessage::Truncate(truncate) => {
                let truncated = self.tables.truncated(&truncate.relation_ids)?;
                if truncated.contains(&0) {
                    out.push_all(|| UserChange::SoftDeleteAll);
                } else if !truncated.is_empty() {
                    tracing::warn!(
                        "a table holding part of the users was truncated alone; users on the \
                         target keep those keys until they change (usersync resync copies \
                         them again)"
                    );
                }
            }
            LogicalMessage::Message(message) if message.prefix == self.heartbeat_prefix => {
                out.push_all(|| UserChange::Heartbeat);
            }
            _ => {}
        }
        Ok(())
    }
}

/// A transaction's position and time, as printed by `replay --dry-run`.
pub(super) fn transaction_meta(
    commit_lsn: &Lsn,
    commit_time: i64,
) -> serde_json::Map<String, serde_json::Value> {
    let mut meta = serde_json::Map::new();
    meta.insert("lsn".into(), commit_lsn.to_string().into());
    let time = chrono::DateTime::from_timestamp_micros(commit_time)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    meta.insert("commit_time".into(), time.into());
    meta
}

/// One JSON line per change on stdout: lsn, commit time, op, id, raw_json.
pub(super) fn print_changes<'c>(
    meta: &serde_json::Map<String, serde_json::Value>,
    changes: impl IntoIterator<Item = &'c UserChange>,
) {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for change in changes {
        let mut line = meta.clone();
        // The user's document goes as it would be written (a jsonb column's text as sent).
        let (op, id, document) = match change {
            UserChange::Upsert {
                user,
                inserted,
                deleted_at,
                ..
            } => {
                if let Some(deleted_at) = deleted_at {
                    // The source keeps the row but marks the user deleted.
                    let time = chrono::DateTime::from_timestamp_micros(*deleted_at)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
                    line.insert("deleted_at".into(), time.into());
                }
                (
                    if *inserted { "insert" } else { "update" },
                    Some(user.id.as_str()),
                    Some(Member::from(&user.raw_json)),
                )
            }
            UserChange::Patch { id, keys, .. } => {
                ("patch", Some(id.as_str()), Some(patch_keys(keys)))
            }
            UserChange::ClearPartIf { id, row, keys } => {
                // Applied only if the target says the part came from that row.
                line.insert("if_part_from".into(), row.as_str().into());
                ("patch", Some(id.as_str()), Some(patch_keys(keys)))
            }
            UserChange::SoftDelete(id) | UserChange::MovedAway(id) => {
                ("delete", Some(id.as_str()), None)
            }
            UserChange::SoftDeleteAll => ("truncate", None, None),
            UserChange::Heartbeat => continue,
        };
        line.insert("op".into(), op.into());
        line.insert("id".into(), id.into());
        let mut line = RawJson::from(line);
        line.insert(
            "raw_json".into(),
            document.unwrap_or(Member::Value(serde_json::Value::Null)),
        );
        let _ = line.write(&mut out).and_then(|()| out.write_all(b"\n"));
    }
}

/// A patch's keys as they would be written: in `jsonb`'s order, like a whole document.
fn patch_keys(keys: &serde_json::Map<String, serde_json::Value>) -> Member {
    Member::from(&RawJson::from(keys.clone()))
}

/// The new row of an update with the values it left out (unchanged TOAST) taken from the
/// whole old row; `None`: it left none out; `Err`: it did, and there is no whole old row.
fn whole_row(new: &TupleData, old: Option<&OldTuple>) -> Result<Option<TupleData>, ()> {
    let unchanged = |value: &ColumnValue| matches!(value, ColumnValue::UnchangedToast);
    if !new.0.iter().any(unchanged) {
        return Ok(None);
    }
    let Some(OldTuple::Full(old)) = old else {
        return Err(());
    };
    let values = new
        .0
        .iter()
        .zip(&old.0)
        .map(|(new, old)| {
            if unchanged(new) {
                old.clone()
            } else {
                new.clone()
            }
        })
        .collect();
    Ok(Some(TupleData(values)))
}

fn old_tuple(old: &OldTuple) -> &TupleData {
    match old {
        OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
    }
}

/// What a row of the profile going away means for user `id`: a soft delete, or (a table
/// holding part of a user) a patch clearing that part, or one the target decides on.
fn removal(mapping: &dyn RowMapper, id: String, gone: Gone<'_>) -> Result<UserChange, Error> {
    Ok(
        match mapping
            .removed(&id, gone)?
            .and_then(|outcome| change_of(outcome, false))
        {
            Some(UserChange::Patch { id, keys, from, .. }) => UserChange::Patch {
                id,
                keys,
                from,
                clears: true,
            },
            Some(change) => change,
            None => UserChange::SoftDelete(id),
        },
    )
}

/// The change a mapped row asks for, if any.
fn change_of(outcome: RowOutcome, inserted: bool) -> Option<UserChange> {
    match outcome {
        RowOutcome::User(user) => Some(UserChange::Upsert {
            user,
            inserted,
            deleted_at: None,
            moved_from: None,
        }),
        RowOutcome::Deleted { user, at } => Some(UserChange::Upsert {
            user,
            inserted,
            deleted_at: Some(at),
            moved_from: None,
        }),
        RowOutcome::Patch { id, keys, from } => Some(UserChange::Patch {
            id,
            keys,
            from,
            clears: false,
        }),
        RowOutcome::ClearPartIf { id, row, keys } => {
            Some(UserChange::ClearPartIf { id, row, keys })
        }
        RowOutcome::Skip { .. } => None,
    }
}
