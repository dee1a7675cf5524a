//! The profile's tables as the stream describes them.
//!
//! pgoutput sends a Relation message before the first change to a table in each walsender
//! session, and again after the table's definition changes; later changes name the table by
//! its OID only. So every Relation message is recorded, whatever becomes of the transaction
//! that carried it: one inside a transaction the session skips (the target holds it already)
//! still describes the table for the transactions after it.

use std::collections::HashSet;
use std::sync::Arc;

use crate::config::TableName;
use crate::decode::{ColumnValue, DecodeError, LogicalMessage, Relation, Transaction, TupleData};
use crate::error::Error;
use crate::map::{BoundProfile, Profile, RowMapper};
use crate::routing::Routes;

/// A table of the profile as the current Relation message describes it.
struct KnownTable {
    id: u32,
    /// Its index in the profile's tables: 0 is the users table.
    table: usize,
    mapping: BoundProfile,
    /// Where its rows hold the routing column (`--routes`).
    route_column: Option<usize>,
}

/// The profile, and what the stream has said so far of its tables.
pub(super) struct StreamTables {
    profile: Profile,
    /// The profile's tables, the users table first.
    tables: Vec<TableName>,
    known: Vec<KnownTable>,
    /// Every relation id a Relation message has described, the profile's or not. A change
    /// naming any other id breaks pgoutput's promise; dropping it as "not ours" could drop
    /// a user's change without a word, so it stops replication instead.
    described: HashSet<u32>,
    /// With `--routes`: whose column picks a row's route.
    routes: Option<Arc<Routes>>,
}

impl StreamTables {
    pub fn new(profile: Profile, users_table: &TableName) -> Self {
        StreamTables {
            tables: profile.tables(users_table),
            profile,
            known: Vec::new(),
            described: HashSet::new(),
            routes: None,
        }
    }

    /// Routes by `routes` from now on: the routing column is the same (a routes file that
    /// changes it takes effect on a restart), so the tables stay bound as they are.
    pub fn set_routes(&mut self, routes: Arc<Routes>) {
        self.routes = Some(routes);
    }

    /// Tables whose rows are routed (`--routes`).
    pub fn routed_by(mut self, routes: Option<Arc<Routes>>) -> Self {
        self.routes = routes;
        self
    }

    /// Records a Relation message: binds the profile to a table of its own, forgets one that
    /// was renamed or moved away.
    pub fn note(&mut self, relation: Relation) -> Result<(), Error> {
        let table = self
            .tables
            .iter()
            .position(|table| relation.namespace == table.schema && relation.name == table.name);
        self.described.insert(relation.id);
        self.known
            .retain(|known| known.id != relation.id && Some(known.table) != table);
        if let Some(table) = table {
            let mapping = self.profile.bind_table(table, &relation.columns)?;
            for note in mapping.notes() {
                tracing::info!(table = %self.tables[table], note = %note, "mapping");
            }
            let route_column = match &self.routes {
                Some(routes) => Some(routes.column_in(&self.tables[table], &relation.columns)?),
                None => None,
            };
            self.known.push(KnownTable {
                id: relation.id,
                table,
                mapping,
                route_column,
            });
        }
        Ok(())
    }

    /// Records the Relation messages of a transaction that is not applied.
    pub fn note_skipped(&mut self, transaction: Transaction) -> Result<(), Error> {
        for change in transaction.into_changes() {
            if let LogicalMessage::Relation(relation) = change? {
                self.note(relation)?;
            }
        }
        Ok(())
    }

    /// The bound profile for a relation id, if it is one of the profile's tables; an error
    /// for an id no Relation message has described.
    pub fn mapping_of(&self, relation_id: u32) -> Result<Option<&dyn RowMapper>, Error> {
        match self.known.iter().find(|known| known.id == relation_id) {
            Some(known) => Ok(Some(known.mapping.as_ref())),
            None => self.described(relation_id).map(|()| None),
        }
    }

    /// The routing column's value in a row of relation `relation_id` (one of the profile's
    /// tables): `None` for SQL NULL. Any tuple does, an old key's too: the column is in the
    /// replica identity (see [`route_column`]).
    pub fn route_value<'t>(
        &self,
        relation_id: u32,
        tuple: &'t TupleData,
    ) -> Result<Option<&'t str>, Error> {
        let Some((index, known)) = self
            .known
            .iter()
            .find(|known| known.id == relation_id)
            .and_then(|known| Some((known.route_column?, known)))
        else {
            return Ok(None);
        };
        let column = self.routes.as_ref().map_or("", |routes| routes.by.as_str());
        let unroutable = |what: &str| {
            Error::Config(format!(
                "a row of {} has {what} in its routing column {column}, so usersync cannot \
                 tell which route it goes to",
                self.tables[known.table]
            ))
        };
        match tuple.0.get(index) {
            Some(ColumnValue::Null) => Ok(None),
            Some(ColumnValue::Text(text)) => std::str::from_utf8(text)
                .map(Some)
                .map_err(|_| unroutable("text that is not UTF-8")),
            Some(ColumnValue::UnchangedToast) => Err(unroutable("an unchanged TOASTed value")),
            Some(ColumnValue::Binary(_)) | None => Err(unroutable("no text value")),
        }
    }

    /// The name of the profile's table relation `relation_id` is, for messages.
    pub fn table_of(&self, relation_id: u32) -> String {
        self.known
            .iter()
            .find(|known| known.id == relation_id)
            .map_or_else(
                || format!("relation {relation_id}"),
                |known| self.tables[known.table].to_string(),
            )
    }

    /// Which of the profile's tables (by index, 0 the users table) a TRUNCATE names.
    pub fn truncated(&self, relation_ids: &[u32]) -> Result<Vec<usize>, Error> {
        for &id in relation_ids {
            self.described(id)?;
        }
        Ok(self
            .known
            .iter()
            .filter(|known| relation_ids.contains(&known.id))
            .map(|known| known.table)
            .collect())
    }

    fn described(&self, relation_id: u32) -> Result<(), Error> {
        if self.described.contains(&relation_id) {
            return Ok(());
        }
        Err(DecodeError::Unexpected {
            message: "change",
            reason: format!(
                "it names relation {relation_id}, which no Relation message of this session \
                 described"
            ),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{RelationColumn, ReplicaIdentity};
    use crate::lsn::Lsn;
    use crate::map::GenericMapping;

    fn users(id: u32) -> Relation {
        let column = |name: &str, type_oid: u32, is_key: bool| RelationColumn {
            is_key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Relation {
            xid: None,
            id,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", 25, true),
                column("email", 25, false),
                column("created_at", 1184, false),
            ],
        }
    }

    fn transaction(changes: Vec<LogicalMessage>) -> Transaction {
        Transaction {
            xid: 7,
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x130),
            commit_time_micros: 1,
            changes,
            spilled: None,
        }
    }

    fn tables() -> StreamTables {
        let table: TableName = "public.users".parse().unwrap();
        StreamTables::new(GenericMapping::default().into(), &table)
    }

    #[test]
    fn a_relation_inside_a_skipped_transaction_still_describes_the_table() {
        let mut tables = tables();
        tables
            .note_skipped(transaction(vec![LogicalMessage::Relation(users(16_384))]))
            .unwrap();
        assert!(
            tables.mapping_of(16_384).unwrap().is_some(),
            "a later change to the table would be dropped"
        );
    }

    #[test]
    fn a_change_to_a_relation_never_described_stops_replication() {
        let mut tables = tables();
        let mut other = users(20_000);
        other.name = "sessions".into();
        tables.note(other).unwrap();
        // Another table of the publication, described: not ours, skipped.
        assert!(tables.mapping_of(20_000).unwrap().is_none());
        // Never described: it could be the users table; dropping it could lose a change.
        let Err(error) = tables.mapping_of(16_384) else {
            panic!("a change to an undescribed relation was accepted");
        };
        let error = error.to_string();
        assert!(error.contains("relation 16384"), "{error}");
        assert!(tables.truncated(&[20_000, 16_384]).is_err());
    }

    #[test]
    fn a_table_renamed_away_is_forgotten_and_truncates_are_mapped_to_tables() {
        let mut tables = tables();
        tables.note(users(16_384)).unwrap();
        let mut other = users(99);
        other.name = "sessions".into();
        tables.note(other).unwrap();
        assert_eq!(tables.truncated(&[16_384, 99]).unwrap(), vec![0]);
        let mut renamed = users(16_384);
        renamed.name = "old_users".into();
        tables.note(renamed).unwrap();
        assert!(tables.mapping_of(16_384).unwrap().is_none());
        assert!(tables.truncated(&[16_384]).unwrap().is_empty());
    }
}
