//! The publication: which tables, rows and columns of the source cross the wire.
//!
//! **Column lists (PostgreSQL 15+).** A table published with a column list is sent with only
//! those columns: the Relation message lists them, and every tuple carries them alone. usersync
//! lists exactly the columns its mapping uses ([`RowLayout::used`]: read into a key or a row
//! decision, copied into `raw_json`, or in the replica identity), so a password hash or a
//! token never reaches the replication stream, usersync's memory or its spill files. The
//! mapping binds columns by name, so a narrower relation maps like the whole table. PostgreSQL
//! 14 has no column lists: there every column crosses the wire, and only the mapping keeps
//! credentials out of `raw_json`.
//!
//! **The replica identity bites.** PostgreSQL refuses UPDATE and DELETE *on the source
//! table*, the application's own writes ("Column list used by the publication does not cover
//! the replica identity"), while a column list leaves out a replica identity column; and with
//! `REPLICA IDENTITY FULL` it refuses any column list, even one naming every column. So the
//! list always holds the identity, and a table whose identity is every column gets no list.
//! Whoever changes a table's primary key or replica identity later must run `setup` again.
//!
//! **Changing a list.** A later `setup` whose mapping uses other columns (other
//! `--include-columns`/`--exclude-columns`, a new column, a new usersync) replaces the table's
//! entry: `DROP TABLE` and `ADD TABLE` with the new list, in one transaction, which leaves the
//! publication's other tables alone. The walsender decodes each change with the catalog as of
//! that change, so the new list applies from the commit of the `ALTER` on, and a running
//! `usersync run` receives a new Relation message and rebinds.
//!
//! **Migrations of the source table.** PostgreSQL records that a publication depends on each
//! column of its list, and then refuses to drop such a column or change its type (`cannot
//! drop column ... because other objects depend on it`). Before such a migration the column
//! must leave the list (`--exclude-columns` and `setup`); `setup` says so when it sets a
//! list.
//!
//! **Privileges.** Changing a publication takes ownership of it and of the table; the
//! least-privilege role of `sql/source_role.sql` has neither. Then `setup` prints the
//! statement for the owner: a table missing, or a list lacking a column the mapping uses, stops
//! it (exit 78), since replication would be wrong; a publication that only carries more than
//! the mapping uses (one created before usersync set column lists) is reported with the
//! statement, and `setup` goes on, since only the wire carries too much.

use postgres_protocol::escape::escape_identifier;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::catalog;
use super::SourceError;
use crate::config::TableName;
use crate::decode::RelationColumn;
use crate::error::Error;
use crate::map::{ColumnUse, MapError, Profile};

/// PostgreSQL 15 brought publication row filters (`FOR TABLE t WHERE (...)`) and column lists
/// (`FOR TABLE t (a, b)`).
const ROW_FILTER_MIN_VERSION: i32 = 150_000;
const COLUMN_LIST_MIN_VERSION: i32 = 150_000;

/// A table the publication must carry, and what its mapping uses.
#[derive(Debug, Clone)]
pub struct PublishedTable {
    table: TableName,
    /// Every column of the table, in its order.
    columns: Vec<String>,
    /// The columns the mapping uses.
    used: ColumnUse,
    /// Every column is in the replica identity (`REPLICA IDENTITY FULL`, or a key over
    /// all of them): no column list could leave one out, and FULL allows none at all.
    identity_is_every_column: bool,
}

impl PublishedTable {
    /// `table` with its columns (from the catalog) and what the mapping bound to them uses.
    pub fn new(table: TableName, columns: &[RelationColumn], used: ColumnUse) -> Self {
        PublishedTable {
            table,
            columns: columns.iter().map(|column| column.name.clone()).collect(),
            used,
            identity_is_every_column: columns.iter().all(|column| column.is_key),
        }
    }

    /// The column list the table should be published with; `None`: no list (every column).
    fn column_list(&self, version: i32) -> Option<Vec<String>> {
        (version >= COLUMN_LIST_MIN_VERSION && !self.identity_is_every_column)
            .then(|| self.used.names())
    }

    /// `"schema"."name" ("a", "b") WHERE (...)`, as `CREATE`/`ALTER PUBLICATION` take it.
    fn spec(&self, version: i32, filter: &str) -> String {
        let columns = self
            .column_list(version)
            .map(|names| {
                let quoted: Vec<String> =
                    names.iter().map(|name| escape_identifier(name)).collect();
                format!(" ({})", quoted.join(", "))
            })
            .unwrap_or_default();
        format!("{}{columns}{filter}", self.table.quoted())
    }
}

/// How the publication carries a table now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Carried {
    /// Not at all.
    No,
    /// Through `FOR ALL TABLES` or `FOR TABLES IN SCHEMA`: every column, and no list can be
    /// set on the table alone.
    ThroughAllOrSchema,
    /// As a table of its own, with its column list (`None`: every column).
    AsTable(Option<Vec<String>>),
}

/// The publication's state for `table`; `None` when there is no such publication.
async fn carried(
    client: &Client,
    version: i32,
    publication: &str,
    table: &TableName,
) -> Result<Option<Carried>, SourceError> {
    let sql = if version >= COLUMN_LIST_MIN_VERSION {
        "SELECT t.attnames IS NOT NULL, r.oid IS NOT NULL,
                CASE WHEN r.prattrs IS NOT NULL THEN t.attnames::text[] END
           FROM pg_publication p
           LEFT JOIN pg_publication_tables t
                  ON t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3
           LEFT JOIN pg_publication_rel r
                  ON r.prpubid = p.oid AND r.prrelid = (
                     SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $2 AND c.relname = $3)
          WHERE p.pubname = $1"
    } else {
        "SELECT p.puballtables OR EXISTS (
                    SELECT 1 FROM pg_publication_tables t
                     WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3),
                r.oid IS NOT NULL, NULL::text[]
           FROM pg_publication p
           LEFT JOIN pg_publication_rel r
                  ON r.prpubid = p.oid AND r.prrelid = (
                     SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $2 AND c.relname = $3)
          WHERE p.pubname = $1"
    };
    let row = client
        .query_opt(sql, &[&publication, &table.schema, &table.name])
        .await
        .map_err(SourceError::sql("looking up the publication"))?;
    Ok(row.map(|row| {
        let (published, member): (bool, bool) = (row.get(0), row.get(1));
        match (published, member) {
            (false, _) => Carried::No,
            (true, false) => Carried::ThroughAllOrSchema,
            (true, true) => Carried::AsTable(row.get(2)),
        }
    }))
}

/// The server's version number (`server_version_num`).
async fn server_version(client: &Client) -> Result<i32, SourceError> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(SourceError::sql("reading the server version"))?
        .get(0))
}

/// `names` of `of` that are not in `within`, as a comma-separated list.
fn missing_from(of: &[String], within: &[String]) -> Vec<String> {
    of.iter()
        .filter(|name| !within.contains(name))
        .cloned()
        .collect()
}

fn names(tables: &[&PublishedTable]) -> String {
    let names: Vec<String> = tables.iter().map(|t| t.table.to_string()).collect();
    names.join(", ")
}

/// Makes the publication carry `tables`, each with its column list (15+) and `row_filter`
/// (15+; usersync filters rows itself as well): creates it, adds the tables it lacks, and
/// replaces a column list that differs from what the mapping uses. Returns lines saying what
/// it found and did.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[PublishedTable],
    row_filter: Option<&str>,
) -> Result<Vec<String>, SourceError> {
    let version = server_version(client).await?;
    let filter = row_filter
        .filter(|_| version >= ROW_FILTER_MIN_VERSION)
        .map(|filter| format!(" WHERE {filter}"))
        .unwrap_or_default();
    let quoted = escape_identifier(publication);
    let mut said = Vec::new();
    let mut exists = false;
    let mut missing: Vec<&PublishedTable> = Vec::new();
    // Tables whose list must change, with what it lacks and what it has too much.
    let mut changed: Vec<(&PublishedTable, Vec<String>, Vec<String>)> = Vec::new();
    for table in tables {
        let state = carried(client, version, publication, &table.table).await?;
        exists |= state.is_some();
        let wanted = table.column_list(version);
        match (state.unwrap_or(Carried::No), &wanted) {
            (Carried::No, _) => missing.push(table),
            (Carried::ThroughAllOrSchema, Some(_)) => said.push(format!(
                "publication {publication} carries {} through FOR ALL TABLES or FOR TABLES IN \
                 SCHEMA, which allows no column list: every column of it crosses the wire \
                 (usersync copies only the mapped ones); publish the table on its own to \
                 narrow it",
                table.table
            )),
            (Carried::ThroughAllOrSchema, None) | (Carried::AsTable(None), None) => {}
            (Carried::AsTable(current), wanted) => {
                let all = table.used.names();
                let wanted_names = wanted.as_ref().unwrap_or(&all);
                let lacks = current
                    .as_ref()
                    .map(|current| missing_from(wanted_names, current))
                    .unwrap_or_default();
                let extra = missing_from(current.as_ref().unwrap_or(&table.columns), wanted_names);
                let same = lacks.is_empty()
                    && current.as_ref().map(Vec::len) == wanted.as_ref().map(Vec::len);
                if !same {
                    changed.push((table, lacks, extra));
                }
            }
        }
    }

    let mut statements = Vec::new();
    let all: Vec<&PublishedTable> = tables.iter().collect();
    if !exists {
        let specs: Vec<String> = tables.iter().map(|t| t.spec(version, &filter)).collect();
        statements.push(format!(
            "CREATE PUBLICATION {quoted} FOR TABLE {}",
            specs.join(", ")
        ));
    } else if !missing.is_empty() {
        let specs: Vec<String> = missing.iter().map(|t| t.spec(version, &filter)).collect();
        statements.push(format!(
            "ALTER PUBLICATION {quoted} ADD TABLE {}",
            specs.join(", ")
        ));
    }
    for (table, _, _) in &changed {
        statements.push(format!(
            "ALTER PUBLICATION {quoted} DROP TABLE {}",
            table.table.quoted()
        ));
        statements.push(format!(
            "ALTER PUBLICATION {quoted} ADD TABLE {}",
            table.spec(version, &filter)
        ));
    }

    if !statements.is_empty() {
        // One simple query: its statements commit together or not at all.
        let sql = statements.join("; ");
        // What the owner is to run, as one transaction too: between a DROP TABLE and its ADD
        // TABLE committed apart, the table's changes are not published, and are lost.
        let owner_sql = if statements.len() > 1 {
            format!("BEGIN; {sql}; COMMIT")
        } else {
            sql.clone()
        };
        if let Err(error) = client.batch_execute(&sql).await {
            if error.code() != Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                return Err(SourceError::sql("creating or changing the publication")(
                    error,
                ));
            }
            let needs_change = !exists
                || !missing.is_empty()
                || changed.iter().any(|(_, lacks, _)| !lacks.is_empty());
            if needs_change {
                return Err(SourceError::Definite(format!(
                    "the source role may not create or change publication {publication} \
                     (that takes ownership of the publication and of {}, or a superuser); \
                     have the owner run: {owner_sql}",
                    names(&all)
                )));
            }
            said.insert(
                0,
                format!(
                    "publication {publication} found, publishing {}",
                    names(&all)
                ),
            );
            for (table, _, extra) in &changed {
                said.push(if extra.is_empty() {
                    // Every column is mapped today; one the table gains later would not be.
                    format!(
                        "warning: publication {publication} publishes {} without a column \
                         list, so a column the table gains later would be sent too, and this \
                         role may not change it; to publish only the columns usersync uses, \
                         have the owner run: {owner_sql}",
                        table.table
                    )
                } else {
                    format!(
                        "warning: publication {publication} publishes columns of {} that \
                         usersync does not use ({}), and this role may not change it; to keep \
                         them off the wire, have the owner run: {owner_sql}",
                        table.table,
                        extra.join(", ")
                    )
                });
            }
            return Ok(said);
        }
    }

    let with_filter = if filter.is_empty() {
        ""
    } else {
        " with a row filter"
    };
    if !exists {
        said.insert(
            0,
            format!(
                "publication {publication} created for {}{with_filter}",
                names(&all)
            ),
        );
    } else if !missing.is_empty() {
        said.insert(
            0,
            format!(
                "publication {publication} found; added {} to it{with_filter}",
                names(&missing)
            ),
        );
    } else {
        said.insert(
            0,
            format!(
                "publication {publication} found, publishing {}",
                names(&all)
            ),
        );
    }
    for table in tables {
        let was = changed.iter().find(|(t, _, _)| std::ptr::eq(*t, table));
        match (table.column_list(version), was) {
            (Some(list), Some(_)) => said.push(format!(
                "publication {publication}: column list of {} changed to {}",
                table.table,
                list.join(", ")
            )),
            (Some(list), None) => said.push(format!(
                "publication {publication}: {} publishes only the columns the mapping uses: {}",
                table.table,
                list.join(", ")
            )),
            (None, was) => {
                if was.is_some() {
                    said.push(format!(
                        "publication {publication}: column list of {} removed",
                        table.table
                    ));
                }
                if version >= COLUMN_LIST_MIN_VERSION {
                    said.push(format!(
                        "publication {publication}: every column of {} is in its replica \
                         identity, which no column list may leave out (REPLICA IDENTITY FULL \
                         allows none): all of them cross the wire",
                        table.table
                    ));
                }
            }
        }
    }
    let list_set = !exists || !missing.is_empty() || !changed.is_empty();
    if list_set
        && tables
            .iter()
            .any(|table| table.column_list(version).is_some())
    {
        said.push(
            "note: PostgreSQL refuses to drop a listed column or change its type; before such \
             a migration of the source table, leave the column out (--exclude-columns) and run \
             usersync setup"
                .to_owned(),
        );
    }
    if version < COLUMN_LIST_MIN_VERSION {
        said.push(format!(
            "PostgreSQL {} has no publication column lists (15+): every column of {} crosses \
             the wire; usersync copies only the mapped ones into raw_json",
            version / 10_000,
            names(&all)
        ));
    }
    Ok(said)
}

/// The columns the publication carries of `table` (`pg_publication_tables.attnames`,
/// PostgreSQL 15+); `None` when it does not carry the table, or the server is older.
pub async fn published_columns(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<Option<Vec<String>>, SourceError> {
    if server_version(client).await? < COLUMN_LIST_MIN_VERSION {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT attnames::text[] FROM pg_publication_tables
              WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await
        .map_err(SourceError::sql("reading the publication's columns"))?;
    Ok(row.map(|row| row.get(0)))
}

/// What `run` checks before it streams: that the column options name columns of the users
/// table, and (PostgreSQL 15+) that the publication carries every column the mapping needs of each
/// table (the replica identity included), naming the missing ones, with `setup` as the fix.
/// Columns that would only be copied, or columns carried but not used, are logged as
/// warnings: replication stays correct. A table the mapping does not fit as it is now is
/// left to the stream, which may still hold changes from before it changed.
pub async fn check_published_columns(
    client: &Client,
    publication: &str,
    users_table: &TableName,
    profile: &Profile,
) -> Result<(), Error> {
    let version = server_version(client).await?;
    for (index, table) in profile.tables(users_table).iter().enumerate() {
        let columns = catalog::table_columns(client, table).await?;
        if index == 0 {
            profile.columns().check_names(&columns)?;
        }
        if version < COLUMN_LIST_MIN_VERSION {
            continue;
        }
        let used = match profile.bind_table(index, &columns) {
            Ok(mapping) => mapping.layout().used().clone(),
            // The column options themselves are wrong: no stream position changes that.
            Err(
                error
                @ (MapError::ExcludedColumnRead { .. } | MapError::IncludedComputedKey { .. }),
            ) => return Err(error.into()),
            // The table as it is now does not fit (a column the mapping reads was dropped):
            // the changes still pending were written before, under the old shape, and the
            // stream's own Relation messages decide where replication must stop.
            Err(error) => {
                tracing::debug!(table = %table, %error, "not checking the publication's columns: the mapping does not fit the table as it is now");
                continue;
            }
        };
        let Some(published) = published_columns(client, publication, table).await? else {
            return Err(SourceError::Definite(format!(
                "publication {publication} does not publish {table}: run usersync setup"
            ))
            .into());
        };
        let lacks = missing_from(&used.needed(), &published);
        if !lacks.is_empty() {
            return Err(SourceError::Definite(format!(
                "publication {publication} does not publish column(s) {} of {table}, which the \
                 mapping reads or which are in the table's replica identity; run usersync \
                 setup (as the owner of the publication and the table, or do what it prints)",
                lacks.join(", ")
            ))
            .into());
        }
        let not_copied = missing_from(&used.names(), &published);
        if !not_copied.is_empty() {
            tracing::warn!(
                table = %table,
                columns = %not_copied.join(", "),
                "the publication does not carry these columns, so raw_json will not have \
                 them; run usersync setup to publish them"
            );
        }
        let every_column = columns.iter().all(|column| column.is_key);
        let unused = missing_from(&published, &used.names());
        if !unused.is_empty() && !every_column {
            tracing::warn!(
                table = %table,
                columns = %unused.join(", "),
                "the publication carries columns usersync does not use; to keep them off the \
                 wire, run usersync setup (or have the publication's owner run what it prints)"
            );
        }
    }
    Ok(())
}
