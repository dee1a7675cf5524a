//! Creating the slot and copying the users table as of its snapshot: the shared core of
//! `setup` and `resync`.
//!
//! Once the slot exists, and before the copy, the target records it
//! (`usersync.setup_progress`, see `apply::setup_progress`). The checkpoint (at the slot's
//! consistent point) is written in the very last target transaction, which deletes that
//! record, so a copy that is interrupted leaves the record and no checkpoint, and `setup` or
//! `resync` knows to start it again rather than present a half-copied table as done.
//!
//! The copy is a pipeline: one loop reads the snapshot, maps its rows and encodes pages of
//! users as binary COPY data, while [`COPY_WRITERS`] target connections write the pages
//! before them (see `apply::bulk`). A bounded channel between them keeps a few pages in
//! memory at most, whatever the size of the table.

use std::io::{IsTerminal, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::connect;
use crate::apply::bulk::{self, BulkWriter, CopyPage, UserPage};
use crate::apply::setup_progress::{self, SetupMode, SetupProgress};
use crate::apply::{
    self, ApplyError, Batch, CommitPosition, TargetShape, TargetWriter, UnixMicros,
};
use crate::config::Config;
use crate::decode::RelationColumn;
use crate::error::Error;
use crate::lag::unix_micros_now;
use crate::lsn::Lsn;
use crate::map::{RowMapper, RowOutcome};
use crate::replicator::APPLICATION_NAME;
use crate::source::replication::CreatedSlot;
use crate::source::snapshot::SnapshotRows;
use crate::source::{catalog, ReplicationConnection, SourceError};

/// PostgreSQL 17 brought failover slots (kept in sync on physical standbys).
const FAILOVER_MIN_VERSION: u32 = 170_000;
/// Users per target transaction during the copy: large enough that a commit costs little
/// next to its rows.
const PAGE_USERS: usize = 20_000;
/// Bytes per page at most, so memory stays bounded whatever the users hold: the pages in
/// flight are one being filled, one waiting per writer and one being written per writer.
const PAGE_BYTES: usize = 8 << 20;
/// Source rows parsed at a time.
const READ_CHUNK: usize = 1_000;
/// Target connections writing pages at once. Each is a server backend of its own, so the
/// target's work (parsing `jsonb`, maintaining the indexes) spreads over two cores; more
/// rarely pays on a small target, and the source and the mapping need a core too.
const COPY_WRITERS: usize = 2;
/// How long the copy's connections get to close once it is done (see
/// [`CopyJob::run_on_own_thread`]).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How often plain progress lines are printed (a terminal gets a bar, redrawn per page).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// What to do with the users already in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Copy them.
    Copy,
    /// Copy them and soft-delete live target users absent from the source (`resync`).
    CopyAndReconcile,
    /// Leave them (`setup --no-snapshot`).
    Skip,
}

/// What the copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOutcome {
    pub consistent_point: Lsn,
    pub copied: usize,
    pub soft_deleted: u64,
}

/// What the target records about the copy before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRecord {
    pub mode: SetupMode,
    /// `neon_auth.users_sync` was empty when the first attempt began.
    pub target_was_empty: bool,
}

/// A target to copy into, and what the copy does there.
pub struct CopyTarget {
    /// The target's config: a route's, with `--routes` (its share of the table is copied).
    pub config: Config,
    pub client: Client,
    pub mode: CopyMode,
    pub record: CopyRecord,
}

/// Creates the slot with an exported snapshot, and copies the table as of it into each
/// target (see [`copy_into`]), one after the other in that one snapshot.
pub async fn create_slot_and_copy(
    config: &Config,
    columns: &[RelationColumn],
    targets: Vec<CopyTarget>,
    failover: bool,
) -> Result<Vec<CopyOutcome>, Error> {
    let mut replication = ReplicationConnection::connect(&config.source, APPLICATION_NAME).await?;
    if failover {
        let version = replication.server_version_num().unwrap_or(0);
        if version < FAILOVER_MIN_VERSION {
            return Err(SourceError::Definite(format!(
                "--failover needs PostgreSQL 17 or later on the source (it runs {}.{}): \
                 failover slots are synchronised to standbys only from 17 on",
                version / 10_000,
                version % 10_000
            ))
            .into());
        }
    }
    let identity = replication.identify_system().await?;
    let export = targets.iter().any(|target| target.mode != CopyMode::Skip);
    let created = replication
        .create_logical_slot(&config.slot, export, failover)
        .await?;
    println!(
        "replication slot {} created at {}{}",
        config.slot,
        created.consistent_point,
        if failover { " (failover)" } else { "" }
    );
    let mut outcomes = Vec::with_capacity(targets.len());
    for target in targets {
        outcomes.push(copy_into(columns, target, &created, &identity.system_id).await?);
    }
    // Only now may the replication connection (and with it the snapshot) go.
    replication.close().await;
    Ok(outcomes)
}

/// Copies into targets that have no checkpoint while the slot exists already (routes added
/// to a fan-out): in the snapshot of a temporary slot, created now and gone with this
/// connection. Each target's checkpoint is that slot's consistent point, which the slot has
/// not passed (it is confirmed only up to what every route holds, and these routes held
/// nothing), so the stream brings every change after the copy, and the route skips those
/// before.
pub async fn copy_at_new_snapshot(
    config: &Config,
    columns: &[RelationColumn],
    targets: Vec<CopyTarget>,
) -> Result<Vec<CopyOutcome>, Error> {
    let mut replication = ReplicationConnection::connect(&config.source, APPLICATION_NAME).await?;
    let identity = replication.identify_system().await?;
    let name = format!(
        "usersync_copy_{}_{}",
        std::process::id(),
        unix_micros_now().rem_euclid(1_000_000_000)
    );
    let created = replication.create_temporary_logical_slot(&name).await?;
    println!(
        "temporary replication slot {name} created at {} for the copy",
        created.consistent_point
    );
    let mut outcomes = Vec::with_capacity(targets.len());
    for target in targets {
        outcomes.push(copy_into(columns, target, &created, &identity.system_id).await?);
    }
    replication.close().await;
    Ok(outcomes)
}

/// Records the copy on the target, copies the table (the route's share) in the snapshot,
/// and writes the checkpoint at the slot's consistent point.
async fn copy_into(
    columns: &[RelationColumn],
    target: CopyTarget,
    created: &CreatedSlot,
    system_id: &str,
) -> Result<CopyOutcome, Error> {
    let CopyTarget {
        config,
        client: mut target,
        mode,
        record,
    } = target;
    let config = &config;
    let key = config.checkpoint_key();
    if let Some(route) = config.route_name() {
        println!("route {route}: {}", config.target.redacted());
    }
    let progress = SetupProgress {
        slot: key.clone(),
        system_id: system_id.to_owned(),
        consistent_point: Some(created.consistent_point),
        mode: record.mode,
        target_was_empty: record.target_was_empty,
    };
    setup_progress::write(&mut target, &progress, false).await?;
    let shape = apply::check_shape(&target).await?;
    let mut writer = TargetWriter::new(target, shape, &key, system_id).await?;
    let copied_at = unix_micros_now();
    let mut outcome = CopyOutcome {
        consistent_point: created.consistent_point,
        copied: 0,
        soft_deleted: 0,
    };
    match created
        .snapshot_name
        .as_deref()
        .filter(|_| mode != CopyMode::Skip)
    {
        Some(snapshot) => {
            let job = CopyJob {
                config: config.clone(),
                columns: columns.to_vec(),
                snapshot: snapshot.to_owned(),
                shape,
                copied_at,
                reconcile: mode == CopyMode::CopyAndReconcile,
            };
            (outcome.copied, outcome.soft_deleted) = job.run_on_own_thread().await?;
        }
        None => {
            println!("initial copy skipped (--no-snapshot): only changes from now on replicate")
        }
    }
    let mut done = Batch::new();
    done.commit(
        CommitPosition {
            commit_lsn: created.consistent_point,
            end_lsn: created.consistent_point,
            commit_time: copied_at,
        },
        false,
    );
    // One transaction: the record of the setup goes with the first checkpoint.
    writer.apply_part(&Batch::new()).await?;
    setup_progress::delete(writer.client(), &key).await?;
    writer.apply_creating_checkpoint(&done).await?;
    Ok(outcome)
}

/// The copy of one target's users, owned, to run on a thread of its own.
struct CopyJob {
    config: Config,
    columns: Vec<RelationColumn>,
    snapshot: String,
    shape: TargetShape,
    copied_at: UnixMicros,
    /// Soft-delete the live users the snapshot does not have (`resync`).
    reconcile: bool,
}

impl CopyJob {
    /// Copies (and reconciles), on a single-threaded runtime on a thread of its own: the
    /// users copied and the users soft-deleted.
    ///
    /// Why: the copy is one pipeline of small steps (a source row arrives, is mapped, goes
    /// into a page, a page goes out), each handing over to the next through a connection's
    /// task. On the multi-threaded runtime most of those handovers woke another thread,
    /// which cost more than the mapping itself: on one thread usersync spends about a
    /// quarter less CPU per user, and where it shares the cores with the servers the copy
    /// is faster for it (docs/performance.md). By its CPU time one thread handles about
    /// 220,000 users a second, more than a target takes.
    ///
    /// The connections are the job's own, opened and closed on its runtime. When the caller
    /// stops waiting (its future is dropped), the job stops before its next step. Either way
    /// its connections then get [`CLOSE_GRACE`] to end as a dropped client's do (Terminate
    /// is sent, and the server rolls back a transaction left open), so that the servers log
    /// no connection lost; the thread waits for nothing else (not for a DNS lookup still
    /// running, which a dropped runtime would wait out).
    async fn run_on_own_thread(self) -> Result<(usize, u64), Error> {
        let (caller_alive, caller_gone) = tokio::sync::oneshot::channel::<()>();
        let thread = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::CopyThread)?;
            let done = runtime.block_on(async move {
                tokio::select! {
                    biased;
                    // Never sent: ready when the caller's end is dropped.
                    _ = caller_gone => None,
                    done = self.run() => Some(done),
                }
            });
            runtime.block_on(async {
                let metrics = tokio::runtime::Handle::current().metrics();
                let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
                while metrics.num_alive_tasks() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            runtime.shutdown_background();
            done.unwrap_or_else(|| {
                Err(Error::CopyThread(std::io::Error::other(
                    "the copy's caller went away",
                )))
            })
        });
        let done = thread.await;
        drop(caller_alive);
        match done {
            Ok(done) => done,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(Error::CopyThread(std::io::Error::other(error))),
        }
    }

    async fn run(self) -> Result<(usize, u64), Error> {
        let reconcile = match self.reconcile {
            true => Some(Reconciler::new(&self.config).await?),
            false => None,
        };
        let copied = copy(
            &self.config,
            &self.columns,
            &self.snapshot,
            self.shape,
            self.copied_at,
            reconcile.as_ref(),
        )
        .await?;
        let soft_deleted = match reconcile {
            Some(reconcile) => {
                reconcile
                    .soft_delete_absent(self.shape.has_updated_at, self.copied_at)
                    .await?
            }
            None => 0,
        };
        Ok((copied, soft_deleted))
    }
}

/// Reads the snapshot page by page while [`COPY_WRITERS`] connections write earlier pages,
/// so that the source read, the mapping and the target's inserts overlap.
async fn copy(
    config: &Config,
    columns: &[RelationColumn],
    snapshot: &str,
    shape: TargetShape,
    copied_at: UnixMicros,
    reconcile: Option<&Reconciler>,
) -> Result<usize, Error> {
    let reader = connect("source", &config.source).await?;
    let profile = catalog::resolve_profile(&reader, &config.table, &config.mapping).await?;
    let mapping = profile.bind(columns)?;
    let only = config
        .routes
        .as_ref()
        .zip(config.route)
        .map(|(routes, route)| routes.copy_filter(route, Some("u")));
    let select = profile.snapshot_select(&config.table, columns, only.as_deref());
    let width = profile.snapshot_width(columns);
    let mut clients = Vec::with_capacity(COPY_WRITERS);
    for _ in 0..COPY_WRITERS {
        clients.push(connect("target", &config.target).await?);
    }
    let inserts = Arc::new(AtomicBool::new(
        bulk::users_sync_is_empty(&clients[0]).await?,
    ));
    let mut writers = Vec::with_capacity(COPY_WRITERS);
    for client in clients {
        writers.push(BulkWriter::new(client, shape, Arc::clone(&inserts)).await?);
    }
    let mut rows = SnapshotRows::open(&reader, &select, width, snapshot).await?;
    let progress = Mutex::new(Progress::new(rows.total()));
    let (pages, received) = mpsc::channel(COPY_WRITERS);
    let received = tokio::sync::Mutex::new(received);
    let produce = read_pages(&mut rows, mapping.as_ref(), shape, copied_at, pages);
    let consume = try_join_all(
        writers
            .iter_mut()
            .map(|writer| write_pages(writer, &received, reconcile, &progress)),
    );
    let ((read, copied), _) = tokio::try_join!(produce, consume)?;
    progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .finish(read);
    if copied < read {
        println!(
            "initial copy: skipped {} of {read} rows, which the {} profile does not replicate",
            read - copied,
            profile.name()
        );
    }
    Ok(copied)
}

/// A page of users and how many source rows it accounts for (skipped ones included), which
/// is what the progress bar counts.
struct ReadPage {
    users: CopyPage,
    rows: usize,
}

/// Maps the snapshot's rows into pages for the writers; returns the rows read and the users
/// among them.
async fn read_pages(
    rows: &mut SnapshotRows,
    mapping: &dyn RowMapper,
    shape: TargetShape,
    copied_at: UnixMicros,
    pages: mpsc::Sender<ReadPage>,
) -> Result<(usize, usize), Error> {
    let (mut read, mut copied) = (0usize, 0usize);
    // Rows read up to the page being filled.
    let mut sent_rows = 0usize;
    let mut page = UserPage::new(shape);
    loop {
        let chunk = rows.next_page(READ_CHUNK).await?;
        if chunk.is_empty() {
            break;
        }
        for row in &chunk {
            read += 1;
            // A skipped row (anonymous, another realm) is not copied, and not "seen": a
            // resync soft-deletes a live target user that the source now skips.
            let (user, deleted_at) = match mapping.map_copied(row)? {
                RowOutcome::User(user) => (user, None),
                RowOutcome::Deleted { user, at } => (user, Some(at)),
                // The copy reads whole users (their other tables joined in), never parts.
                RowOutcome::Skip { .. }
                | RowOutcome::Patch { .. }
                | RowOutcome::ClearPartIf { .. } => continue,
            };
            // Where the user's part comes from (Stack Auth: the primary email channel),
            // recorded with the user in the same target transaction.
            let part_from = mapping.copied_part_from(row)?;
            copied += 1;
            // A second row for a user starts a new page: one statement cannot write a row twice.
            let full = page.len() >= PAGE_USERS || page.encoded_len() >= PAGE_BYTES;
            if full || page.contains(&user.id) {
                let users = std::mem::replace(&mut page, UserPage::new(shape)).finish();
                // This row goes to the next page.
                let rows = read - 1 - sent_rows;
                sent_rows += rows;
                if pages.send(ReadPage { users, rows }).await.is_err() {
                    // The writers are gone: their error is what the copy reports.
                    return Ok((read, copied));
                }
            }
            if let Some(from) = part_from {
                page.record_part(&user.id, from);
            }
            page.push(user, copied_at, deleted_at);
        }
    }
    // Sent even when empty, for the skipped rows' progress; dropping the sender afterwards
    // tells the writers that no page follows.
    let last = ReadPage {
        users: page.finish(),
        rows: read - sent_rows,
    };
    let _ = pages.send(last).await;
    Ok((read, copied))
}

/// Writes pages until there are no more, each in its own transaction.
async fn write_pages(
    writer: &mut BulkWriter,
    pages: &tokio::sync::Mutex<mpsc::Receiver<ReadPage>>,
    reconcile: Option<&Reconciler>,
    progress: &Mutex<Progress>,
) -> Result<(), Error> {
    loop {
        let page = pages.lock().await.recv().await;
        let Some(page) = page else {
            return Ok(());
        };
        if !page.users.is_empty() {
            writer.write(&page.users).await?;
            if let Some(reconcile) = reconcile {
                reconcile.saw(&page.users).await?;
            }
        }
        progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(page.rows);
    }
}

/// Remembers, on the target, which users the snapshot had, to soft-delete the others.
struct Reconciler {
    client: Client,
}

impl Reconciler {
    async fn new(config: &Config) -> Result<Reconciler, Error> {
        let client = connect("target", &config.target).await?;
        client
            .batch_execute("CREATE TEMPORARY TABLE usersync_resync_seen (id text PRIMARY KEY)")
            .await
            .map_err(ApplyError::sql("preparing the reconciliation"))?;
        Ok(Reconciler { client })
    }

    async fn saw(&self, page: &CopyPage) -> Result<(), Error> {
        let ids: Vec<&str> = page.ids().collect();
        self.client
            .execute(
                "INSERT INTO usersync_resync_seen SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                &[&ids],
            )
            .await
            .map_err(ApplyError::sql("recording copied users"))?;
        Ok(())
    }

    /// Soft-deletes live users the source no longer has, at the copy's time.
    async fn soft_delete_absent(&self, has_updated_at: bool, at: i64) -> Result<u64, Error> {
        let at = chrono::DateTime::from_timestamp_micros(at).unwrap_or_default();
        let sql = if has_updated_at {
            "UPDATE neon_auth.users_sync SET deleted_at = $1, updated_at = $1
              WHERE deleted_at IS NULL
                AND NOT EXISTS (SELECT 1 FROM usersync_resync_seen s WHERE s.id = users_sync.id)"
        } else {
            "UPDATE neon_auth.users_sync SET deleted_at = $1
              WHERE deleted_at IS NULL
                AND NOT EXISTS (SELECT 1 FROM usersync_resync_seen s WHERE s.id = users_sync.id)"
        };
        Ok(self
            .client
            .execute(sql, &[&at])
            .await
            .map_err(ApplyError::sql(
                "soft-deleting users absent from the source",
            ))?)
    }
}

/// A progress bar on a terminal, plain lines otherwise.
struct Progress {
    total: Option<u64>,
    written: usize,
    started: Instant,
    last_line: Instant,
    terminal: bool,
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        Progress {
            total,
            written: 0,
            started: Instant::now(),
            last_line: Instant::now(),
            terminal: std::io::stdout().is_terminal(),
        }
    }

    /// Counts `rows` more source rows written (or skipped), and shows it.
    fn add(&mut self, rows: usize) {
        self.written += rows;
        let copied = self.written;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-6);
        let rate = copied as f64 / elapsed;
        let eta = self
            .total
            .filter(|total| *total as f64 > copied as f64 && rate > 0.0)
            .map(|total| format!(", ETA {:.0}s", (total as f64 - copied as f64) / rate))
            .unwrap_or_default();
        if self.terminal {
            const WIDTH: usize = 30;
            let done = self.total.map_or(0, |total| {
                ((copied as f64 / total.max(1) as f64) * WIDTH as f64).min(WIDTH as f64) as usize
            });
            let total = self.total.map_or_else(String::new, |t| format!("/{t}"));
            print!(
                "\r[{}{}] {copied}{total} users, {rate:.0}/s{eta}   ",
                "#".repeat(done),
                " ".repeat(WIDTH - done)
            );
            let _ = std::io::stdout().flush();
        } else if self.last_line.elapsed() >= PROGRESS_INTERVAL {
            self.last_line = Instant::now();
            println!("initial copy: {copied} users ({rate:.0} users/s{eta})");
        }
    }

    fn finish(&self, copied: usize) {
        let elapsed = self.started.elapsed().as_secs_f64();
        if self.terminal {
            println!();
        }
        println!(
            "initial copy: {copied} users in {elapsed:.1}s ({:.0} users/s)",
            copied as f64 / elapsed.max(1e-6)
        );
    }
}
