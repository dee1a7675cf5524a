//! Loading the initial copy into `neon_auth.users_sync` with `COPY ... FROM STDIN`.
//!
//! The streaming upsert ([`super::writer`]) sends arrays of `jsonb` that the server unnests,
//! joins against the table for unchanged-TOAST keys and upserts row by row. A snapshot has no
//! unchanged TOAST, and most of the time it lands in an empty table, so it can take the
//! server's fastest way in: binary `COPY`, which inserts rows in batches. Two ways a page of
//! users lands:
//!
//! - **insert**: `COPY` straight into the table. Only when the table was empty when the copy
//!   began ([`users_sync_is_empty`]): then no source user can be there already, unless the
//!   source maps two rows to one id. Such a page fails with a unique violation (or, between
//!   two writers, a deadlock), is rolled back, and is written again as an upsert; every writer
//!   upserts from then on.
//! - **upsert**: `COPY` into a temporary staging table, then one `INSERT ... SELECT ... ON
//!   CONFLICT (id) DO UPDATE`, so an existing user is overwritten and a soft-deleted one
//!   revived or deleted as the source says, like the streaming upsert. Rows go in id order, so
//!   writers upserting concurrently lock rows in the same order and cannot deadlock.
//!
//! Pages are encoded ahead of time ([`UserPage`]) so that reading the source and writing the
//! target overlap, and several [`BulkWriter`]s (each its own connection, so its own server
//! backend) can write at once. A page never holds one id twice: a single statement cannot
//! upsert one row twice. Two source rows for one user (only possible when the id column is not
//! unique) land in different pages, and which of them the target keeps is no more defined
//! than the order in which the snapshot returns them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement, Transaction};

use super::batch::UnixMicros;
use super::schema::TargetShape;
use super::{ApplyError, STATEMENT_TIMEOUT};
use crate::decode::PG_EPOCH_UNIX_MICROS;
use crate::map::MappedUser;

/// Binary COPY's signature, flags (none) and header extension length (none).
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The tuple count that ends binary COPY data.
const COPY_TRAILER: i16 = -1;
/// `jsonb`'s binary format: a version byte, then the JSON text.
const JSONB_VERSION: u8 = 1;

/// The client-side bound on one page, for a stall the server cannot see.
const PAGE_TIMEOUT: Duration = Duration::from_secs(90);

const CREATE_STAGING: &str = "
CREATE TEMPORARY TABLE usersync_copy_page
    (raw_json jsonb, updated_at timestamptz, deleted_at timestamptz) ON COMMIT DELETE ROWS";
const CREATE_STAGING_NO_UPDATED_AT: &str = "
CREATE TEMPORARY TABLE usersync_copy_page
    (raw_json jsonb, deleted_at timestamptz) ON COMMIT DELETE ROWS";

const COPY_INTO_TABLE: &str =
    "COPY neon_auth.users_sync (raw_json, updated_at, deleted_at) FROM STDIN (FORMAT binary)";
const COPY_INTO_TABLE_NO_UPDATED_AT: &str =
    "COPY neon_auth.users_sync (raw_json, deleted_at) FROM STDIN (FORMAT binary)";
const COPY_INTO_STAGING: &str = "COPY usersync_copy_page FROM STDIN (FORMAT binary)";

const UPSERT_FROM_STAGING: &str = "
INSERT INTO neon_auth.users_sync (raw_json, updated_at, deleted_at)
SELECT raw_json, updated_at, deleted_at FROM usersync_copy_page ORDER BY raw_json ->> 'id'
ON CONFLICT (id) DO UPDATE
   SET raw_json = EXCLUDED.raw_json, updated_at = EXCLUDED.updated_at,
       deleted_at = EXCLUDED.deleted_at";
const UPSERT_FROM_STAGING_NO_UPDATED_AT: &str = "
INSERT INTO neon_auth.users_sync (raw_json, deleted_at)
SELECT raw_json, deleted_at FROM usersync_copy_page ORDER BY raw_json ->> 'id'
ON CONFLICT (id) DO UPDATE
   SET raw_json = EXCLUDED.raw_json, deleted_at = EXCLUDED.deleted_at";

/// Whether `neon_auth.users_sync` holds no row at all, so a copy may insert without upserting.
pub async fn users_sync_is_empty(client: &Client) -> Result<bool, ApplyError> {
    Ok(client
        .query_one("SELECT NOT EXISTS (SELECT FROM neon_auth.users_sync)", &[])
        .await
        .map_err(ApplyError::sql(
            "checking whether neon_auth.users_sync is empty",
        ))?
        .get(0))
}

/// Users encoded as binary COPY data for the table's shape, each id at most once.
#[derive(Debug)]
pub struct UserPage {
    data: BytesMut,
    ids: HashSet<String>,
    has_updated_at: bool,
    parts: PartRecords,
}

/// Users and the row each one's part comes from (`None`: none), as
/// `usersync.primary_email_channel` records them.
#[derive(Debug, Clone, Default)]
struct PartRecords {
    ids: Vec<String>,
    from: Vec<Option<String>>,
}

impl UserPage {
    pub fn new(shape: TargetShape) -> UserPage {
        let mut data = BytesMut::with_capacity(64 * 1024);
        data.put_slice(COPY_HEADER);
        UserPage {
            data,
            ids: HashSet::new(),
            has_updated_at: shape.has_updated_at,
            parts: PartRecords::default(),
        }
    }

    /// Records that user `id`'s part comes from row `from` (`None`: from none), written in
    /// the page's transaction: so a copy replaces what the target recorded of the users it
    /// copies, unknown records of an older usersync's copy included.
    pub fn record_part(&mut self, id: &str, from: Option<String>) {
        self.parts.ids.push(id.to_owned());
        self.parts.from.push(from);
    }

    /// Whether the page holds user `id` already: a second row for it goes to the next page.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Adds a user the page does not hold yet ([`UserPage::contains`]); `updated_at` and
    /// `deleted_at` are microseconds since the Unix epoch.
    pub fn push(
        &mut self,
        user: MappedUser,
        updated_at: UnixMicros,
        deleted_at: Option<UnixMicros>,
    ) {
        debug_assert!(!self.ids.contains(&user.id), "one row per user and page");
        let fields: i16 = if self.has_updated_at { 3 } else { 2 };
        self.data.put_i16(fields);
        // The length is known only once the JSON is written: reserve it, then fill it in.
        let length_at = self.data.len();
        self.data.put_i32(0);
        self.data.put_u8(JSONB_VERSION);
        user.raw_json
            .write(&mut (&mut self.data).writer())
            .expect("JSON text writes into memory");
        let length = i32::try_from(self.data.len() - length_at - 4).unwrap_or(i32::MAX);
        self.data[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
        if self.has_updated_at {
            put_timestamp(&mut self.data, Some(updated_at));
        }
        put_timestamp(&mut self.data, deleted_at);
        self.ids.insert(user.id);
    }

    /// Users in the page.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bytes of COPY data so far, to bound a page's memory.
    pub fn encoded_len(&self) -> usize {
        self.data.len()
    }

    /// Ends the COPY data: the page is ready to write.
    pub fn finish(mut self) -> CopyPage {
        self.data.put_i16(COPY_TRAILER);
        CopyPage {
            data: self.data.freeze(),
            ids: self.ids,
            parts: self.parts,
        }
    }
}

fn put_timestamp(data: &mut BytesMut, micros: Option<UnixMicros>) {
    match micros {
        Some(micros) => {
            data.put_i32(8);
            // Saturating keeps ±infinity (i64::MAX/MIN) what they are.
            data.put_i64(micros.saturating_sub(PG_EPOCH_UNIX_MICROS));
        }
        None => data.put_i32(-1),
    }
}

/// A finished page: complete binary COPY data, and the ids it holds.
#[derive(Debug, Clone)]
pub struct CopyPage {
    data: Bytes,
    ids: HashSet<String>,
    parts: PartRecords,
}

impl CopyPage {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().map(String::as_str)
    }
}

struct Statements {
    copy_into_table: Statement,
    copy_into_staging: Statement,
    upsert: Statement,
    record_parts: Statement,
}

/// Writes pages over one target connection, each page in its own transaction.
pub struct BulkWriter {
    client: Client,
    statements: Statements,
    /// Shared by the writers of one copy: whether pages may still be inserted.
    inserts: Arc<AtomicBool>,
}

impl BulkWriter {
    /// Prepares the session. Pages commit asynchronously: none of them is trusted until the
    /// checkpoint, written after the last page by a synchronous commit, and flushing that
    /// commit flushes every earlier one in the write-ahead log with it.
    ///
    /// `inserts` starts true only when the table was empty when the copy began.
    pub async fn new(
        client: Client,
        shape: TargetShape,
        inserts: Arc<AtomicBool>,
    ) -> Result<BulkWriter, ApplyError> {
        let (staging, copy_into_table, upsert) = if shape.has_updated_at {
            (CREATE_STAGING, COPY_INTO_TABLE, UPSERT_FROM_STAGING)
        } else {
            (
                CREATE_STAGING_NO_UPDATED_AT,
                COPY_INTO_TABLE_NO_UPDATED_AT,
                UPSERT_FROM_STAGING_NO_UPDATED_AT,
            )
        };
        client
            .batch_execute(&format!(
                "SET synchronous_commit = off; SET statement_timeout = '{STATEMENT_TIMEOUT}'; \
                 {staging}"
            ))
            .await
            .map_err(ApplyError::sql("preparing the copy session"))?;
        let prepare = |sql: &'static str| client.prepare(sql);
        let statements =
            Statements {
                copy_into_table: prepare(copy_into_table)
                    .await
                    .map_err(ApplyError::sql("preparing the copy"))?,
                copy_into_staging: prepare(COPY_INTO_STAGING)
                    .await
                    .map_err(ApplyError::sql("preparing the copy"))?,
                upsert: prepare(upsert)
                    .await
                    .map_err(ApplyError::sql("preparing the upsert of copied users"))?,
                record_parts: prepare(super::writer::RECORD_PARTS).await.map_err(
                    ApplyError::sql("preparing the primary email channels' record"),
                )?,
            };
        Ok(BulkWriter {
            client,
            statements,
            inserts,
        })
    }

    /// Writes the page in one transaction; a page with no answer within [`PAGE_TIMEOUT`]
    /// fails as [`ApplyError::Stalled`].
    pub async fn write(&mut self, page: &CopyPage) -> Result<(), ApplyError> {
        tokio::time::timeout(PAGE_TIMEOUT, self.write_unbounded(page))
            .await
            .map_err(|_| ApplyError::Stalled {
                timeout: PAGE_TIMEOUT,
            })?
    }

    async fn write_unbounded(&mut self, page: &CopyPage) -> Result<(), ApplyError> {
        if self.inserts.load(Ordering::Relaxed) {
            match self.insert(page).await {
                Ok(()) => return Ok(()),
                Err(error) if is_conflict(&error) => {
                    tracing::info!(
                        "the copy met users already on the target: upserting from now on"
                    );
                    self.inserts.store(false, Ordering::Relaxed);
                }
                Err(error) => {
                    return Err(ApplyError::sql("copying users into neon_auth.users_sync")(
                        error,
                    ))
                }
            }
        }
        self.upsert(page)
            .await
            .map_err(ApplyError::sql("upserting copied users"))
    }

    /// A transaction dropped on error rolls back.
    async fn insert(&mut self, page: &CopyPage) -> Result<(), tokio_postgres::Error> {
        let transaction = self.client.transaction().await?;
        copy_in(&transaction, &self.statements.copy_into_table, page).await?;
        record_parts(&transaction, &self.statements.record_parts, page).await?;
        transaction.commit().await
    }

    async fn upsert(&mut self, page: &CopyPage) -> Result<(), tokio_postgres::Error> {
        let transaction = self.client.transaction().await?;
        copy_in(&transaction, &self.statements.copy_into_staging, page).await?;
        transaction.execute(&self.statements.upsert, &[]).await?;
        record_parts(&transaction, &self.statements.record_parts, page).await?;
        transaction.commit().await
    }
}

/// Writes where the page's users' parts come from, in the page's transaction.
async fn record_parts(
    transaction: &Transaction<'_>,
    statement: &Statement,
    page: &CopyPage,
) -> Result<(), tokio_postgres::Error> {
    if !page.parts.ids.is_empty() {
        transaction
            .execute(statement, &[&page.parts.ids, &page.parts.from])
            .await?;
    }
    Ok(())
}

async fn copy_in(
    transaction: &Transaction<'_>,
    statement: &Statement,
    page: &CopyPage,
) -> Result<(), tokio_postgres::Error> {
    let sink = transaction.copy_in(statement).await?;
    pin_mut!(sink);
    sink.send(page.data.clone()).await?;
    sink.finish().await?;
    Ok(())
}

/// A user the page inserts is already there, or being inserted by another writer.
fn is_conflict(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(&SqlState::UNIQUE_VIOLATION) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(id: &str) -> MappedUser {
        let raw_json = json!({ "id": id, "display_name": "A\\B" });
        MappedUser {
            id: id.to_owned(),
            raw_json: raw_json.as_object().unwrap().clone().into(),
            unchanged_keys: Vec::new(),
        }
    }

    #[test]
    fn encodes_binary_copy_tuples() {
        let mut page = UserPage::new(TargetShape {
            has_updated_at: true,
        });
        page.push(user("u1"), PG_EPOCH_UNIX_MICROS + 1, None);
        assert!(page.contains("u1"));
        assert_eq!(page.len(), 1);
        let page = page.finish();
        let data = &page.data[..];
        assert_eq!(&data[..COPY_HEADER.len()], COPY_HEADER);
        let tuple = &data[COPY_HEADER.len()..];
        // Keys in jsonb's order: shorter first.
        let json = br#"{"id":"u1","display_name":"A\\B"}"#;
        let mut expected = vec![0, 3];
        expected.extend_from_slice(&(json.len() as i32 + 1).to_be_bytes());
        expected.push(JSONB_VERSION);
        expected.extend_from_slice(json);
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(&1i64.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(tuple, &expected[..]);
        assert_eq!(page.ids().collect::<Vec<_>>(), ["u1"]);
    }

    #[test]
    fn leaves_updated_at_out_for_a_table_without_it() {
        let mut page = UserPage::new(TargetShape {
            has_updated_at: false,
        });
        page.push(user("u1"), 0, Some(PG_EPOCH_UNIX_MICROS));
        let page = page.finish();
        let data = &page.data[COPY_HEADER.len()..];
        assert_eq!(&data[..2], &2i16.to_be_bytes());
        assert_eq!(&data[data.len() - 14..], {
            let mut tail = 8i32.to_be_bytes().to_vec();
            tail.extend_from_slice(&0i64.to_be_bytes());
            tail.extend_from_slice(&(-1i16).to_be_bytes());
            tail
        });
    }
}
