//! A route's users copied while the stream goes on: a route added to a running fan-out (or
//! resynced with `resync --online`) gets the users it does not have without a second slot
//! and without stopping the other routes.
//!
//! The technique is the watermark one of Netflix's DBLog and Debezium's incremental
//! snapshots, made exact for PostgreSQL by transaction visibility rather than by position:
//!
//! 1. The route joins the stream: from now on it is fed every transaction the reader
//!    decodes, and the reader records which users each of them (by xid) touched for it.
//! 2. A snapshot is read on the source and the copy waits until every transaction it shows
//!    running has ended. Every transaction that committed before the route joined is then
//!    visible to any later snapshot: what the stream did not bring, the chunks will.
//! 3. The copy reads the route's rows in chunks in primary-key order, each in a transaction
//!    of its own whose snapshot it notes, hands the chunk to the reader, then commits a
//!    transactional logical message (the watermark) naming it.
//! 4. When the reader decodes the watermark, every transaction committed before it has been
//!    fed to the route. A chunk row whose user a transaction *not visible to the chunk's
//!    snapshot* touched is older than what the route has (or will have, before the row)
//!    and is left out; the copy reads it again in a later chunk, with a newer snapshot (so a
//!    user the stream changed before the copy reached it still gets its whole row: values
//!    an update left out, a part from another table). Every other row is the user as of the
//!    watermark, and goes to the route at the watermark's position, in stream order.
//!
//! Position order alone would not do: a transaction may commit (in WAL) before the
//! watermark and still be invisible to a snapshot taken after it, and visibility is what a
//! chunk's rows reflect.
//!
//! Until the copy is done the route's checkpoint is marked as copying
//! (`usersync.state.copy_started_at`); a copy interrupted (a crash, a restart, the route
//! failing) starts again from the beginning in the next session, which is correct whatever
//! the route's checkpoint says (step 2). The mark goes once the last chunk is durable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::Client;

use super::changes::UserChange;
use super::{APPLICATION_NAME, BACKOFF_MAX, BACKOFF_MIN};
use crate::apply::{self, ApplyWorker, SetupMode, TargetWriter};
use crate::config::Config;
use crate::decode::{ColumnValue, TupleData};
use crate::error::Error;
use crate::lag::unix_micros_now;
use crate::lsn::Lsn;
use crate::map::{RowMapper, RowOutcome};
use crate::metrics::Metrics;
use crate::source::{catalog, snapshot, SourceError};
use crate::{conn, routing::Routes};

/// Rows per chunk: enough that a chunk's round trip (a transaction on the source, a
/// watermark through the stream) costs little beside its rows; few enough that a chunk is a
/// small transaction for the route.
pub(super) const CHUNK_ROWS: usize = 1_000;
/// How often the copy looks whether the transactions open when the route joined are done.
const OPEN_TRANSACTIONS_POLL: Duration = Duration::from_millis(50);
/// After how long waiting for them is logged (with who holds them).
const OPEN_TRANSACTIONS_LOG: Duration = Duration::from_secs(10);
/// How often, while the copy waits for open transactions, an empty chunk lets the reader
/// forget the stream's changes every snapshot sees.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);
/// A user read again this many times is "hot" (see [`RowKind::Copied`]).
const HOT_AFTER: u32 = 3;
/// A user read again this many times (the stream changes it faster than a chunk goes
/// round) is said so: the copy cannot finish while it does.
const REQUEUE_WARN: u32 = 100;

/// The prefix of this slot's watermark messages; other slots' are ignored.
pub fn prefix(slot: &str) -> String {
    format!("usersync_copy:{slot}")
}

/// A source snapshot, as `pg_current_snapshot()` prints it: which transactions it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// The transactions running when it was taken, as the stream names them (32 bits).
    running: HashSet<u32>,
}

impl Snapshot {
    /// `xmin:xmax:xip,...`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin: u64 = parts.next()?.parse().ok()?;
        let xmax: u64 = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        let running = if list.is_empty() {
            HashSet::new()
        } else {
            list.split(',')
                .map(|xid| xid.parse::<u64>().ok().map(|xid| xid as u32))
                .collect::<Option<_>>()?
        };
        (xmin <= xmax).then_some(Snapshot {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether the transaction `xid` (the stream's 32 bits of it) had committed when this
    /// snapshot was taken. The xids compared are recent (a stream's transactions against a
    /// snapshot of the same minutes), far within the 2^31 that wraparound leaves.
    pub fn sees(&self, xid: u32) -> bool {
        let offset = xid.wrapping_sub(self.xmin as u32);
        if (offset as i32) < 0 {
            return true;
        }
        let span = (self.xmax - self.xmin).min(i32::MAX as u64) as u32;
        offset < span && !self.running.contains(&xid)
    }
}

/// A chunk of a route's copy, as the copy hands it to the reader.
pub(super) struct Chunk {
    attempt: u64,
    seq: u64,
    snapshot: Snapshot,
    rows: Vec<ChunkRow>,
    /// The copy asks which users the stream left incomplete (see [`Applied::incomplete`]).
    ask: bool,
}

/// One user of a chunk, by its id.
pub(super) struct ChunkRow {
    id: String,
    kind: RowKind,
    changes: Vec<UserChange>,
}

/// What a chunk says of a user.
pub(super) enum RowKind {
    /// Its row as the chunk read it; `key`: its source key, to read it again; `hot`: read
    /// again several times already (the stream keeps changing it).
    Copied { key: Vec<String>, hot: bool },
    /// Looked for by id (the stream moved it) and not found: nothing to copy.
    Absent,
    /// At a resync's end, a live user of the target the copy did not find, looked for by id
    /// and not found: its soft delete.
    Tombstone,
}

/// The reader's answer to a chunk.
pub(super) struct Applied {
    attempt: u64,
    seq: u64,
    /// The keys of the users to read again (the stream changed them after the snapshot).
    again: Vec<Vec<String>>,
    /// If asked: the users the stream gave a new id without writing them whole, and that no
    /// chunk wrote since (see [`Window::moved`]).
    incomplete: Option<Vec<String>>,
}

/// Where the copy hands the reader a chunk before it commits the chunk's watermark: one at
/// a time, so that the copy runs at most a chunk ahead of the stream.
#[derive(Default)]
pub(super) struct Handoff {
    chunk: Mutex<Option<Chunk>>,
    taken: Notify,
}

impl Handoff {
    /// Waits until no chunk of `attempt` waits for the reader: the next one is read only
    /// then, so that its snapshot is as close as can be to its watermark (fewer users to
    /// read again).
    async fn wait_taken(&self, attempt: u64) {
        loop {
            {
                let slot = self.chunk.lock().unwrap_or_else(|e| e.into_inner());
                if slot.as_ref().is_none_or(|held| held.attempt < attempt) {
                    return;
                }
            }
            self.taken.notified().await;
        }
    }

    /// Leaves `chunk` for the reader once the one before is taken (a chunk of an earlier
    /// attempt, whose watermark never came, is replaced).
    async fn put(&self, chunk: Chunk) {
        let mut chunk = Some(chunk);
        loop {
            {
                let mut slot = self.chunk.lock().unwrap_or_else(|e| e.into_inner());
                let free = match &*slot {
                    None => true,
                    Some(held) => chunk.as_ref().is_some_and(|c| held.attempt < c.attempt),
                };
                if free {
                    *slot = chunk.take();
                    return;
                }
            }
            self.taken.notified().await;
        }
    }
}

/// What the reader keeps of a route being copied.
pub(super) struct Window {
    handoff: Arc<Handoff>,
    replies: mpsc::UnboundedSender<Applied>,
    /// The stream's changes for the route not yet visible to a chunk's snapshot: (xid, user,
    /// whether the change wrote the user's own row whole but for its part); user `None`:
    /// every user (a TRUNCATE).
    touched: Vec<(u32, Option<String>, bool)>,
    /// The users the stream wrote whole since the route joined (an insert, an update that
    /// sent every value, a move into the route): the target has them, as new as any chunk.
    whole: HashSet<String>,
    /// The users the stream gave a new id (a primary key changed) without writing them
    /// whole, and that no chunk wrote since: their new key may be behind the copy's cursor,
    /// so they are read by id at the end.
    moved: HashSet<String>,
    /// The keys of a user's part kept in another table: an upsert without them is not whole.
    part_keys: &'static [&'static str],
}

impl Window {
    /// Notes the users transaction `xid` changed for the route.
    pub fn record(&mut self, xid: u32, changes: &[UserChange]) {
        for change in changes {
            // Its own row whole: every value sent but the part's (Stack Auth's update of a
            // user leaves the email keys to the target's row).
            let own_row = matches!(change, UserChange::Upsert { user, moved_from: None, .. }
                if user.unchanged_keys.iter().all(|key| self.part_keys.contains(&key.as_str())));
            let (id, also) = match change {
                UserChange::Upsert {
                    user, moved_from, ..
                } => {
                    let whole = user.unchanged_keys.is_empty()
                        && self
                            .part_keys
                            .iter()
                            .all(|key| user.raw_json.contains_key(key));
                    if whole {
                        self.whole.insert(user.id.clone());
                        self.moved.remove(&user.id);
                    } else if moved_from.is_some() && !self.whole.contains(&user.id) {
                        self.moved.insert(user.id.clone());
                    }
                    (Some(&user.id), moved_from.as_ref())
                }
                UserChange::Patch { id, .. }
                | UserChange::ClearPartIf { id, .. }
                | UserChange::SoftDelete(id)
                | UserChange::MovedAway(id) => (Some(id), None),
                UserChange::SoftDeleteAll => (None, None),
                UserChange::Heartbeat => continue,
            };
            self.touched.push((xid, id.cloned(), own_row));
            if let Some(also) = also {
                self.touched.push((xid, Some(also.clone()), false));
            }
        }
    }

    /// At chunk `seq`'s watermark: the chunk's changes for the users the stream has not
    /// changed since its snapshot; the others are sent back to be read again. A user the
    /// stream has written whole since the route joined is the target's already, at least as
    /// new as the chunk's row (every change since reached the route): its row is left out
    /// (writing it again would change nothing, or go back). `None`: not this route's chunk.
    pub fn take(&mut self, attempt: u64, seq: u64) -> Option<Vec<UserChange>> {
        let chunk = {
            let mut slot = self.handoff.chunk.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(held) if held.attempt == attempt && held.seq == seq => slot.take()?,
                _ => return None,
            }
        };
        self.handoff.taken.notify_one();
        let Chunk {
            snapshot,
            rows,
            ask,
            ..
        } = chunk;
        let mut everyone = false;
        // The users changed since the snapshot, and whether each change only wrote the
        // user's own row whole (its part, if it has one, unchanged).
        let mut changed: HashMap<String, bool> = HashMap::new();
        // What the snapshot sees, every later one sees: it matters no more.
        self.touched.retain(|(xid, id, own_row)| {
            if snapshot.sees(*xid) {
                return false;
            }
            match id {
                Some(id) => {
                    *changed.entry(id.clone()).or_insert(true) &= *own_row;
                }
                None => everyone = true,
            }
            true
        });
        let mut changes = Vec::new();
        let mut again = Vec::new();
        for row in rows {
            let unchanged = !everyone && !changed.contains_key(&row.id);
            match row.kind {
                // Not in the source as of the snapshot, looked for by id (a live user of the
                // target, at a resync's end; or one the stream moved), and unchanged since:
                // gone now. One the stream changed since is the stream's.
                RowKind::Tombstone | RowKind::Absent => {
                    if unchanged {
                        self.moved.remove(&row.id);
                        changes.extend(row.changes);
                    }
                }
                RowKind::Copied { key, hot } => {
                    if self.whole.contains(&row.id) {
                        continue;
                    }
                    if unchanged {
                        self.moved.remove(&row.id);
                        changes.extend(row.changes);
                        continue;
                    }
                    // A user the stream keeps changing (read again and again): when every
                    // change since the snapshot wrote its own row whole, the target has that
                    // row newer than the chunk, and lacks only its part, which no change
                    // touched: the part goes alone.
                    let own_rows = !everyone && changed.get(&row.id) == Some(&true);
                    let part: Vec<UserChange> = row
                        .changes
                        .into_iter()
                        .filter(|change| matches!(change, UserChange::Patch { .. }))
                        .collect();
                    if hot && own_rows && !part.is_empty() {
                        self.moved.remove(&row.id);
                        changes.extend(part);
                    } else {
                        again.push(key);
                    }
                }
            }
        }
        let incomplete = ask.then(|| self.moved.iter().cloned().collect());
        // The copy is gone if nobody listens: its task says why.
        let _ = self.replies.send(Applied {
            attempt,
            seq,
            again,
            incomplete,
        });
        Some(changes)
    }
}

/// A message of this slot's copies, as the stream brings it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Mark {
    /// A chunk's watermark: its attempt and number.
    Chunk(u64, u64),
    /// `resync --online` of the route so named: copy it again, reconciling.
    Resync(String),
}

/// The content of a copy message (see [`Mark`]).
pub(super) fn parse_mark(content: &[u8]) -> Option<Mark> {
    let text = std::str::from_utf8(content).ok()?;
    if let Some(route) = text.strip_prefix("resync:") {
        return Some(Mark::Resync(route.to_owned()));
    }
    let (attempt, seq) = text.split_once(':')?;
    Some(Mark::Chunk(attempt.parse().ok()?, seq.parse().ok()?))
}

/// The content of the message that asks a running `run` to resync route `route` online.
pub fn resync_message(route: &str) -> String {
    format!("resync:{route}")
}

/// What an online copy does besides copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyKind {
    /// Fills a new route's target: users there from elsewhere stay.
    Fill,
    /// `resync --online`: live users of the target the source no longer has (in the
    /// route's share) are soft-deleted.
    Reconcile,
}

/// A new route's target made ready to join the stream: the reader attaches it and answers
/// with its durable position's handle.
pub(super) struct Joined {
    pub route: usize,
    pub worker: ApplyWorker,
    pub resume_at: Lsn,
    pub attached: oneshot::Sender<Arc<AtomicU64>>,
}

/// How the copy of a route starts.
pub(super) enum Start {
    /// A route without a checkpoint: its target is prepared first, with a checkpoint at
    /// `held` (where the slot waits for it), then it joins.
    Join {
        held: Lsn,
        joined: mpsc::UnboundedSender<Joined>,
    },
    /// A route attached already, copying since an earlier session: its durable position.
    Attached(Arc<AtomicU64>),
}

/// What a route's copy task needs.
pub(super) struct Copy {
    pub route: usize,
    pub kind: CopyKind,
    pub config: Config,
    pub system_id: String,
    pub metrics: Arc<Metrics>,
    pub handoff: Arc<Handoff>,
    pub replies: mpsc::UnboundedReceiver<Applied>,
}

/// A new copy for route `route`: the task's half and the reader's.
pub(super) fn pair(
    route: usize,
    kind: CopyKind,
    config: Config,
    system_id: String,
    metrics: Arc<Metrics>,
) -> (Copy, Window) {
    let part_keys = config.mapping.part_keys();
    let handoff = Arc::new(Handoff::default());
    let (replies, received) = mpsc::unbounded_channel();
    (
        Copy {
            route,
            kind,
            config,
            system_id,
            metrics,
            handoff: Arc::clone(&handoff),
            replies: received,
        },
        Window {
            handoff,
            replies,
            touched: Vec::new(),
            whole: HashSet::new(),
            moved: HashSet::new(),
            part_keys,
        },
    )
}

/// How a copy task ended.
pub(super) enum CopyEnd {
    /// Every user is on the target, durably; the mark is gone.
    Done,
    /// The route's target has a checkpoint already (`setup --routes` copied it meanwhile):
    /// it joins through a new session, which checks that checkpoint.
    HasCheckpoint,
}

/// Copies route `copy.route` (after preparing and attaching it, for [`Start::Join`]);
/// retries what may pass by itself, with backoff; ends with the first definite error.
pub(super) async fn run(mut copy: Copy, start: Start) -> Result<CopyEnd, Error> {
    let name = copy.config.route_name().unwrap_or_default().to_owned();
    let mut wait = Duration::ZERO;
    let confirmed = match start {
        Start::Attached(confirmed) => confirmed,
        Start::Join { held, joined } => loop {
            tokio::time::sleep(wait).await;
            match join(&copy, held).await {
                Ok(Some((worker, kind))) => {
                    copy.kind = kind;
                    let (attached, answer) = oneshot::channel();
                    let joined = joined.send(Joined {
                        route: copy.route,
                        worker,
                        resume_at: held,
                        attached,
                    });
                    if joined.is_err() {
                        // The session is ending: the next one starts the copy again.
                        std::future::pending::<()>().await;
                    }
                    match answer.await {
                        Ok(confirmed) => break confirmed,
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
                Ok(None) => return Ok(CopyEnd::HasCheckpoint),
                Err(error) if error.is_transient() => {
                    tracing::warn!(
                        route = %name,
                        error = %crate::error::report(&error),
                        "preparing the new route's target failed; retrying"
                    );
                    wait = (wait * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                }
                Err(error) => return Err(error),
            }
        },
    };
    tracing::info!(
        route = %name,
        "copying the route's users while it streams (online, in chunks)"
    );
    // Attempts count up from a value no earlier session used, so a watermark of an earlier
    // attempt (or session) never matches a chunk of this one.
    let mut attempt = (unix_micros_now().unsigned_abs() << 10) | (copy.route as u64 & 0x3ff);
    wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait).await;
        let started = Instant::now();
        match copy_users(&mut copy, &confirmed, attempt).await {
            Ok(copied) => {
                tracing::info!(
                    route = %name,
                    users = copied,
                    seconds = started.elapsed().as_secs_f64(),
                    "the route's users are copied: it holds every user now"
                );
                return Ok(CopyEnd::Done);
            }
            Err(error) if error.is_transient() => {
                tracing::warn!(
                    route = %name,
                    error = %crate::error::report(&error),
                    "copying the route failed; starting it again"
                );
                wait = (wait * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                // The low bits are the route's.
                attempt += 1 << 10;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Prepares a new route's target: its tables, its lock, its checkpoint at `held`, marked as
/// copying; returns its worker and what the copy does. `None`: it has a checkpoint already.
async fn join(copy: &Copy, held: Lsn) -> Result<Option<(ApplyWorker, CopyKind)>, Error> {
    let config = &copy.config;
    let key = config.checkpoint_key();
    let (client, warnings) = conn::sql::connect_counting_warnings(&config.target, APPLICATION_NAME)
        .await
        .map_err(Error::connect("target"))?;
    conn::version::check_target(&client).await?;
    let (shape, _) = apply::ensure_target_schema(&client).await?;
    super::start::try_route_lock(&client, config).await?;
    apply::upgrade_state(&client).await?;
    if apply::read_checkpoint(&client, &key).await?.is_some() {
        return Ok(None);
    }
    let earlier = apply::setup_progress::read(&client, &key).await?;
    if earlier
        .as_ref()
        .is_some_and(|earlier| earlier.mode == SetupMode::Resync)
    {
        return Err(Error::ResyncUnfinished { slot: key });
    }
    // An interrupted `setup --routes` copy of it is superseded by this one.
    client
        .batch_execute("BEGIN")
        .await
        .map_err(apply::ApplyError::sql("creating the route's checkpoint"))?;
    if earlier.is_some() {
        apply::setup_progress::delete(&client, &key).await?;
    }
    // As `setup` decides on a rerun: a target that was empty when an interrupted copy began
    // holds only what usersync wrote, so users the source no longer has are soft-deleted;
    // any other keeps the users it has from elsewhere.
    let kind = if earlier
        .as_ref()
        .is_some_and(|earlier| earlier.target_was_empty)
    {
        CopyKind::Reconcile
    } else {
        CopyKind::Fill
    };
    apply::create_copying_checkpoint(
        &client,
        &key,
        &copy.system_id,
        held,
        kind == CopyKind::Reconcile,
    )
    .await?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(apply::ApplyError::sql("creating the route's checkpoint"))?;
    let mut writer = TargetWriter::new(client, shape, &key, &copy.system_id).await?;
    writer.watch_warnings(warnings);
    writer.use_async_commit().await?;
    writer.count_in(Arc::clone(&copy.metrics));
    Ok(Some((ApplyWorker::spawn(writer), kind)))
}

/// How the copy reads the route's rows: the profile's copy select, limited to the route and
/// ordered by the table's primary key.
struct Reading {
    mapping: Box<dyn RowMapper>,
    /// The select without order or limit, and what restricts it to the route.
    columns: Vec<crate::decode::RelationColumn>,
    profile: crate::map::Profile,
    route_filter: String,
    /// The key's columns: their place among the copied columns, quoted name, type.
    key: Vec<(usize, String, String)>,
    width: usize,
    part_keys: &'static [&'static str],
    /// The source column users' ids come from, quoted.
    id_column: String,
}

impl Reading {
    async fn new(
        source: &Client,
        config: &Config,
        routes: &Routes,
        route: usize,
    ) -> Result<Self, Error> {
        let profile = catalog::resolve_profile(source, &config.table, &config.mapping).await?;
        let table_columns = catalog::table_columns(source, &config.table).await?;
        let bound = profile.bind_table(0, &table_columns)?;
        let columns = crate::commands::setup::copied_columns(&table_columns, bound.layout().used());
        let mapping = profile.bind(&columns)?;
        let primary_key = catalog::primary_key(source, &config.table).await?;
        if primary_key.is_empty() {
            return Err(Error::Config(format!(
                "{} has no primary key: a route's online copy reads it in the key's order",
                config.table
            )));
        }
        // A uuid routing column (Stack Auth's tenancy) compared as uuid as well: the text
        // compare that decides routing cannot use the key's index, this one can (a tenancy's
        // rows are then read alone, not every tenancy before it). The values are checked
        // first to be spelled as PostgreSQL prints the column's type (a route added on SIGHUP
        // has not been yet), so they cast back.
        routes.column_in(&config.table, &table_columns)?;
        let mut route_filter = routes.copy_filter(route, Some("u"));
        let typed = primary_key
            .iter()
            .find(|(name, ty)| *name == routes.by && ty == "uuid");
        if let (Some((name, ty)), false) = (typed, routes.default == Some(route)) {
            let values: Vec<String> = routes.routes[route]
                .values
                .iter()
                .map(|value| format!("{}::{ty}", escape_literal(value)))
                .collect();
            route_filter = format!(
                "{route_filter} AND u.{} IN ({})",
                escape_identifier(name),
                values.join(", ")
            );
        }
        let mut key = Vec::with_capacity(primary_key.len());
        for (name, ty) in primary_key {
            let Some(place) = columns.iter().position(|column| column.name == name) else {
                return Err(Error::Config(format!(
                    "{}.{name} (part of its primary key) is not a column the profile reads: a \
                     route's online copy needs the whole key",
                    config.table
                )));
            };
            key.push((place, format!("u.{}", escape_identifier(&name)), ty));
        }
        let id_column = format!("u.{}", escape_identifier(mapping.layout().id_column()));
        Ok(Reading {
            id_column,
            mapping,
            width: profile.snapshot_width(&columns),
            part_keys: config.mapping.part_keys(),
            route_filter,
            columns,
            profile,
            key,
        })
    }

    fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|(_, column, _)| column.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_literal(&self, values: &[String]) -> String {
        let literals: Vec<String> = values
            .iter()
            .zip(&self.key)
            .map(|(value, (_, _, ty))| format!("{}::{ty}", escape_literal(value)))
            .collect();
        format!("({})", literals.join(", "))
    }

    /// The next chunk's select: the route's rows after `after` (from the first without).
    fn after(&self, config: &Config, after: Option<&[String]>) -> String {
        let only = match after {
            Some(after) => format!(
                "{} AND ({}) > {}",
                self.route_filter,
                self.key_list(),
                self.key_literal(after)
            ),
            None => self.route_filter.clone(),
        };
        format!(
            "{} ORDER BY {} LIMIT {CHUNK_ROWS}",
            self.profile
                .snapshot_select(&config.table, &self.columns, Some(&only)),
            self.key_list()
        )
    }

    /// The select of the rows with these keys, to read again.
    fn again(&self, config: &Config, keys: &[Vec<String>]) -> String {
        let list: Vec<String> = keys.iter().map(|key| self.key_literal(key)).collect();
        let only = format!(
            "{} AND ({}) IN ({})",
            self.route_filter,
            self.key_list(),
            list.join(", ")
        );
        self.profile
            .snapshot_select(&config.table, &self.columns, Some(&only))
    }

    /// The select of the users with these ids.
    fn by_id(&self, config: &Config, ids: &[String]) -> String {
        let list: Vec<String> = ids.iter().map(|id| escape_literal(id)).collect();
        let only = format!(
            "{} AND {}::text IN ({})",
            self.route_filter,
            self.id_column,
            list.join(", ")
        );
        self.profile
            .snapshot_select(&config.table, &self.columns, Some(&only))
    }

    /// A row's key, as text.
    fn key_of(&self, row: &TupleData) -> Result<Vec<String>, Error> {
        self.key
            .iter()
            .map(|(place, _, _)| match row.0.get(*place) {
                // Not lossy: a key that does not read back as itself would be read again
                // and again.
                Some(ColumnValue::Text(text)) => String::from_utf8(text.to_vec()).map_err(|_| {
                    SourceError::Definite(
                        "a key of the route's copy is not valid UTF-8 (a SQL_ASCII source?)".into(),
                    )
                    .into()
                }),
                _ => Err(SourceError::Definite(
                    "a row of the route's copy has no key value".into(),
                )
                .into()),
            })
            .collect()
    }

    /// What copied rows mean for the target (rows the profile skips are left out).
    fn rows(&self, rows: &[TupleData], hot: bool) -> Result<Vec<ChunkRow>, Error> {
        let mut mapped = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(row) = self.row(row, hot)? {
                mapped.push(row);
            }
        }
        Ok(mapped)
    }

    /// What a copied row means for the target, as the stream would say it.
    fn row(&self, row: &TupleData, hot: bool) -> Result<Option<ChunkRow>, Error> {
        let (user, deleted_at) = match self.mapping.map_copied(row)? {
            RowOutcome::User(user) => (user, None),
            RowOutcome::Deleted { user, at } => (user, Some(at)),
            RowOutcome::Skip { .. } | RowOutcome::Patch { .. } | RowOutcome::ClearPartIf { .. } => {
                return Ok(None)
            }
        };
        let part_from = self.mapping.copied_part_from(row)?;
        let id = user.id.clone();
        let mut changes = Vec::with_capacity(2);
        // A patch after the upsert says which row the part's keys come from (none: the user
        // has no such row), as the initial copy records it; a hot user gets it alone.
        let part = part_from.map(|from| UserChange::Patch {
            id: id.clone(),
            keys: self
                .part_keys
                .iter()
                .filter_map(|key| {
                    user.raw_json
                        .get(key)
                        .map(|member| ((*key).to_owned(), member.to_value()))
                })
                .collect(),
            from,
            clears: false,
        });
        changes.push(UserChange::Upsert {
            user,
            inserted: false,
            deleted_at,
            moved_from: None,
        });
        changes.extend(part);
        Ok(Some(ChunkRow {
            id,
            kind: RowKind::Copied {
                key: self.key_of(row)?,
                hot,
            },
            changes,
        }))
    }
}

/// One attempt at the copy; returns the users copied.
async fn copy_users(copy: &mut Copy, confirmed: &AtomicU64, attempt: u64) -> Result<usize, Error> {
    let config = &copy.config.clone();
    let (Some(routes), Some(route)) = (config.routes.as_deref(), config.route) else {
        return Err(Error::Config(
            "only a route of a fan-out is copied online".into(),
        ));
    };
    let key = config.checkpoint_key();
    let target = conn::sql::connect(&config.target, APPLICATION_NAME)
        .await
        .map_err(Error::connect("target"))?;
    // Done clears only the request this attempt serves: one made meanwhile stays. A resync
    // asked for since the copy began (its message not read yet) is what this attempt does.
    let asked = apply::copy_asked(&target, &key).await?;
    if asked.as_ref().is_some_and(|(_, reconciles)| *reconciles) {
        copy.kind = CopyKind::Reconcile;
    }
    let reconcile = copy.kind == CopyKind::Reconcile;
    if reconcile && asked.is_none() {
        // Soft-deleting users is for a target marked so (resync --online), never otherwise:
        // the mark is gone (an earlier attempt finished, its answer lost): nothing to do.
        tracing::info!(
            route = config.route_name().unwrap_or_default(),
            "the route is not marked for a resync any more: done"
        );
        return Ok(0);
    }
    if reconcile {
        target
            .batch_execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS usersync_copy_seen (id text PRIMARY KEY);
                 TRUNCATE usersync_copy_seen",
            )
            .await
            .map_err(apply::ApplyError::sql(
                "preparing the resync's reconciliation",
            ))?;
    }
    let source = conn::sql::connect(&config.source, APPLICATION_NAME)
        .await
        .map_err(Error::connect("source"))?;
    let reading = Reading::new(&source, config, routes, route).await?;
    let mut handing = Handing {
        copy,
        source: &source,
        prefix: prefix(&config.slot),
        attempt,
        seq: 0,
        last_mark: None,
        progress: Progress::default(),
    };
    handing.wait_for_open_transactions().await?;
    let mut after: Option<Vec<String>> = None;
    let mut read_all = false;
    let mut swept_after: Option<String> = None;
    let mut swept_all = false;
    let mut copied = 0_usize;
    loop {
        handing.take_replies();
        // One chunk at a time: its snapshot as close to its watermark as can be.
        handing.copy.handoff.wait_taken(attempt).await;
        let progress = &mut handing.progress;
        let next = if !read_all {
            Next::Range
        } else if !progress.again.is_empty() {
            // The hot ones together (see `RowKind::Copied`), the others in key order.
            let times = &progress.times_again;
            let is_hot = |key: &Vec<String>| times.get(key).copied().unwrap_or(0) >= HOT_AFTER;
            let hot = progress.again.iter().any(is_hot);
            let (mut picked, rest): (Vec<Vec<String>>, Vec<Vec<String>>) =
                std::mem::take(&mut progress.again)
                    .into_iter()
                    .partition(|key| is_hot(key) == hot);
            progress.again = rest;
            if picked.len() > CHUNK_ROWS {
                progress.again.extend(picked.split_off(CHUNK_ROWS));
            }
            Next::Again(picked, hot)
        } else if !progress.waiting.is_empty() {
            handing.wait_reply().await?;
            continue;
        } else if let Some(ids) = progress.incomplete.as_mut().filter(|ids| !ids.is_empty()) {
            // Users the stream moved to a new id without writing them whole, by id.
            let take = ids.len().min(CHUNK_ROWS);
            let picked: Vec<String> = ids.drain(..take).collect();
            if ids.is_empty() {
                // Asked again once these are read.
                progress.incomplete = None;
            }
            Next::ById(picked)
        } else if reconcile && !swept_all {
            // Every user of the route is copied: the target's live users the copy did not
            // find, a page at a time, looked for by id: gone, they are soft-deleted through
            // the stream like chunks; there now (come since their place was read), copied.
            let unseen = unseen_users(&target, swept_after.as_deref()).await?;
            swept_all = unseen.len() < CHUNK_ROWS;
            swept_after = unseen.last().cloned().or(swept_after);
            // Asked again after the sweep: the last word is the reader's.
            progress.incomplete = None;
            if unseen.is_empty() {
                continue;
            }
            Next::Sweep(unseen)
        } else if progress.incomplete.is_none() {
            Next::Ask
        } else {
            break;
        };
        // The chunk's transaction: its snapshot, its rows, then its watermark at its commit.
        let snapshot = handing.begin().await?;
        let ask = matches!(next, Next::Ask);
        let rows =
            match next {
                Next::Range => {
                    let select = reading.after(config, after.as_deref());
                    let rows = snapshot::copy_rows(&source, &select, reading.width).await?;
                    read_all = rows.len() < CHUNK_ROWS;
                    if let Some(last) = rows.last() {
                        after = Some(reading.key_of(last)?);
                    }
                    reading.rows(&rows, false)?
                }
                Next::Again(keys, hot) => {
                    let select = reading.again(config, &keys);
                    reading.rows(
                        &snapshot::copy_rows(&source, &select, reading.width).await?,
                        hot,
                    )?
                }
                Next::ById(ids) => {
                    let select = reading.by_id(config, &ids);
                    let mut rows = reading.rows(
                        &snapshot::copy_rows(&source, &select, reading.width).await?,
                        false,
                    )?;
                    let found: HashSet<String> = rows.iter().map(|row| row.id.clone()).collect();
                    rows.extend(ids.into_iter().filter(|id| !found.contains(id)).map(|id| {
                        ChunkRow {
                            id,
                            kind: RowKind::Absent,
                            changes: Vec::new(),
                        }
                    }));
                    rows
                }
                Next::Sweep(ids) => {
                    let select = reading.by_id(config, &ids);
                    let mut rows = reading.rows(
                        &snapshot::copy_rows(&source, &select, reading.width).await?,
                        false,
                    )?;
                    let found: HashSet<String> = rows.iter().map(|row| row.id.clone()).collect();
                    rows.extend(ids.into_iter().filter(|id| !found.contains(id)).map(|id| {
                        ChunkRow {
                            changes: vec![UserChange::SoftDelete(id.clone())],
                            id,
                            kind: RowKind::Tombstone,
                        }
                    }));
                    rows
                }
                Next::Ask => Vec::new(),
            };
        record_seen(&target, reconcile, &rows).await?;
        copied += rows
            .iter()
            .filter(|row| matches!(row.kind, RowKind::Copied { hot: false, .. }))
            .count();
        handing.commit(&snapshot, rows, ask).await?;
    }
    // Done once the route's target holds the last chunk durably.
    if let Some(mark) = handing.last_mark {
        while confirmed.load(Ordering::Acquire) < mark.0 {
            tokio::time::sleep(OPEN_TRANSACTIONS_POLL).await;
        }
    }
    if let Some(asked) = asked {
        // On a connection of its own: the copy's may have idled out, and the copy, durable,
        // must not start again for that.
        let target = conn::sql::connect(&config.target, APPLICATION_NAME)
            .await
            .map_err(Error::connect("target"))?;
        apply::copy_done(&target, &key, &asked).await?;
    }
    Ok(copied)
}

/// What the copy reads next.
enum Next {
    /// The next chunk of the route's rows in key order.
    Range,
    /// Users to read again, by key; `true`: the hot ones.
    Again(Vec<Vec<String>>, bool),
    /// Users the stream moved to a new id, by id.
    ById(Vec<String>),
    /// Live users of the target the copy did not find (a resync), by id.
    Sweep(Vec<String>),
    /// Nothing: the reader says which users the stream moved.
    Ask,
}

/// A resync remembers, on the target, which users the copy found in the source.
async fn record_seen(target: &Client, reconcile: bool, rows: &[ChunkRow]) -> Result<(), Error> {
    if !reconcile {
        return Ok(());
    }
    let ids: Vec<&str> = rows
        .iter()
        .filter(|row| matches!(row.kind, RowKind::Copied { .. }))
        .map(|row| row.id.as_str())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    target
        .execute(
            "INSERT INTO usersync_copy_seen SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            &[&ids],
        )
        .await
        .map_err(apply::ApplyError::sql("recording copied users"))?;
    Ok(())
}

/// The copy's side of the handoff: its chunks' numbers and watermarks, and the reader's
/// answers.
struct Handing<'a> {
    copy: &'a mut Copy,
    source: &'a Client,
    prefix: String,
    attempt: u64,
    seq: u64,
    /// Past the last watermark's commit.
    last_mark: Option<Lsn>,
    progress: Progress,
}

impl Handing<'_> {
    /// Takes the answers that came.
    fn take_replies(&mut self) {
        while let Ok(applied) = self.copy.replies.try_recv() {
            take_reply(applied, self.attempt, &mut self.progress, &self.copy.config);
        }
    }

    /// Waits for the next answer.
    async fn wait_reply(&mut self) -> Result<(), Error> {
        let Some(applied) = self.copy.replies.recv().await else {
            return Err(apply::ApplyError::WorkerGone.into());
        };
        take_reply(applied, self.attempt, &mut self.progress, &self.copy.config);
        Ok(())
    }

    /// Opens a chunk's transaction on the source: its snapshot (as text).
    async fn begin(&self) -> Result<String, Error> {
        self.source
            .batch_execute(&format!(
                "{}; BEGIN ISOLATION LEVEL REPEATABLE READ",
                snapshot::SESSION_SETTINGS
            ))
            .await
            .map_err(SourceError::sql("starting a chunk of the route's copy"))?;
        // The transaction's snapshot is taken by its first statement: this one.
        Ok(self
            .source
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(SourceError::sql("reading the chunk's snapshot"))?
            .try_get(0)
            .map_err(SourceError::sql("reading the chunk's snapshot"))?)
    }

    /// Hands the chunk (`rows`, read in `snapshot`) to the reader and commits its watermark
    /// in the chunk's own transaction, so that little can come between the two; without
    /// rows (and not asking), just ends the transaction.
    async fn commit(
        &mut self,
        snapshot: &str,
        rows: Vec<ChunkRow>,
        ask: bool,
    ) -> Result<(), Error> {
        if rows.is_empty() && !ask {
            self.source
                .batch_execute("COMMIT")
                .await
                .map_err(SourceError::sql("ending a chunk of the route's copy"))?;
            return Ok(());
        }
        let snapshot = Snapshot::parse(snapshot).ok_or_else(|| {
            SourceError::Definite(format!(
                "the source printed a snapshot usersync cannot read: {snapshot}"
            ))
        })?;
        let seq = self.seq;
        self.seq += 1;
        self.progress.waiting.insert(seq);
        if ask {
            self.progress.incomplete = None;
        }
        self.copy
            .handoff
            .put(Chunk {
                attempt: self.attempt,
                seq,
                snapshot,
                rows,
                ask,
            })
            .await;
        // A transactional message: the stream brings it at the transaction's commit, in
        // order, and the commit is flushed at once (a message outside a transaction waits
        // for the WAL writer). Should this fail, the attempt ends; the next one's chunks
        // replace this one in the handoff.
        self.source
            .batch_execute(&format!(
                "SELECT pg_logical_emit_message(true, {}, {}); COMMIT",
                escape_literal(&self.prefix),
                escape_literal(&format!("{}:{seq}", self.attempt))
            ))
            .await
            .map_err(SourceError::sql(
                "committing the copy's watermark (pg_logical_emit_message)",
            ))?;
        // The insert position is past the watermark's commit record, whatever the role's
        // synchronous_commit: the route holds the chunk once durable past it.
        let past: String = self
            .source
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(SourceError::sql("reading the source's WAL position"))?
            .try_get(0)
            .map_err(SourceError::sql("reading the source's WAL position"))?;
        let past: Lsn = past.parse().map_err(|_| {
            SourceError::Definite(format!(
                "the source printed an LSN usersync cannot read: {past}"
            ))
        })?;
        self.last_mark = Some(past);
        Ok(())
    }

    /// Waits until every transaction that may have committed before the route joined the
    /// stream is visible to every later snapshot: those with an xid below one taken now
    /// (xids are handed out in order, so each one decoded before the join has a lower one),
    /// as PostgreSQL does when it creates a slot. Meanwhile, empty chunks let the reader
    /// forget what it recorded that every snapshot sees.
    async fn wait_for_open_transactions(&mut self) -> Result<(), Error> {
        let now: String = self
            .source
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .map_err(SourceError::sql("reading a transaction id"))?
            .get(0);
        let started = Instant::now();
        let mut logged = false;
        let mut pruned = Instant::now();
        loop {
            let done: bool = self
                .source
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
                    &[&now],
                )
                .await
                .map_err(SourceError::sql("waiting for open transactions"))?
                .get(0);
            if done {
                return Ok(());
            }
            if !logged && started.elapsed() >= OPEN_TRANSACTIONS_LOG {
                logged = true;
                tracing::warn!(
                    route = self.copy.config.route_name().unwrap_or_default(),
                    "the route's copy waits for transactions open on the source since it \
                     started (pg_stat_activity shows them: state 'idle in transaction', long \
                     queries; pg_prepared_xacts, prepared ones)"
                );
            }
            if pruned.elapsed() >= PRUNE_INTERVAL {
                pruned = Instant::now();
                self.take_replies();
                self.copy.handoff.wait_taken(self.attempt).await;
                let snapshot = self.begin().await?;
                self.commit(&snapshot, Vec::new(), false).await?;
            }
            tokio::time::sleep(OPEN_TRANSACTIONS_POLL).await;
        }
    }
}

/// Live users of the target not among those the copy found (`usersync_copy_seen`), after
/// `after`, a page at a time, in id order.
async fn unseen_users(target: &Client, after: Option<&str>) -> Result<Vec<String>, Error> {
    let rows = target
        .query(
            &format!(
                "SELECT id FROM neon_auth.users_sync u
                  WHERE deleted_at IS NULL AND ($1::text IS NULL OR id COLLATE \"C\" > $1)
                    AND NOT EXISTS (SELECT 1 FROM usersync_copy_seen s WHERE s.id = u.id)
                  ORDER BY id COLLATE \"C\" LIMIT {CHUNK_ROWS}"
            ),
            &[&after],
        )
        .await
        .map_err(apply::ApplyError::sql(
            "finding the users the source no longer has",
        ))?;
    rows.iter()
        .map(|row| {
            row.try_get::<_, String>(0)
                .map_err(apply::ApplyError::sql("reading the users of the target"))
                .map_err(Error::from)
        })
        .collect()
}

/// What the copy keeps of the reader's answers.
#[derive(Default)]
struct Progress {
    /// Chunks handed over and not answered yet.
    waiting: HashSet<u64>,
    /// Keys to read again.
    again: Vec<Vec<String>>,
    times_again: HashMap<Vec<String>, u32>,
    /// Users to read by id, from the last answer that was asked for them; `None`: not
    /// asked since the last chunk.
    incomplete: Option<Vec<String>>,
}

fn take_reply(applied: Applied, attempt: u64, progress: &mut Progress, config: &Config) {
    let Progress {
        waiting,
        again,
        times_again,
        incomplete,
    } = progress;
    if applied.attempt != attempt {
        return;
    }
    waiting.remove(&applied.seq);
    if let Some(answer) = applied.incomplete {
        *incomplete = Some(answer);
    }
    for key in applied.again {
        let times = times_again.entry(key.clone()).or_default();
        *times += 1;
        if *times == REQUEUE_WARN {
            tracing::warn!(
                route = config.route_name().unwrap_or_default(),
                "a user of the route changes faster than its copy can read it; the copy \
                 finishes once it settles"
            );
        }
        again.push(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_committed_before_it() {
        let snapshot = Snapshot::parse("100:105:100,103").unwrap();
        assert!(snapshot.sees(99));
        assert!(!snapshot.sees(100), "running");
        assert!(snapshot.sees(101));
        assert!(!snapshot.sees(103), "running");
        assert!(snapshot.sees(104));
        assert!(!snapshot.sees(105), "began after it");
        assert!(!snapshot.sees(4_000));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.sees(6) && !empty.sees(7));
        assert_eq!(Snapshot::parse("5:4:"), None);
        assert_eq!(Snapshot::parse("nonsense"), None);
        assert_eq!(Snapshot::parse("1:2:x"), None);
    }

    #[test]
    fn xids_compare_across_wraparound_and_epochs() {
        // Epoch 1, xmin just below 2^32: the stream's xid 3 (after the wrap) is later.
        let base = (1_u64 << 32) + u64::from(u32::MAX) - 2;
        let snapshot = Snapshot::parse(&format!("{base}:{}:", base + 4)).unwrap();
        assert!(snapshot.sees(u32::MAX - 3), "before xmin");
        assert!(snapshot.sees(u32::MAX), "between xmin and xmax");
        assert!(snapshot.sees(0));
        assert!(!snapshot.sees(1), "at xmax");
        assert!(!snapshot.sees(10));
    }

    fn upsert(id: &str, whole: bool) -> UserChange {
        UserChange::Upsert {
            user: crate::map::MappedUser {
                id: id.into(),
                raw_json: crate::map::RawJson::new(),
                unchanged_keys: if whole {
                    Vec::new()
                } else {
                    vec!["big".into()]
                },
            },
            inserted: false,
            deleted_at: None,
            moved_from: None,
        }
    }

    fn copied(id: &str) -> ChunkRow {
        ChunkRow {
            id: id.into(),
            kind: RowKind::Copied {
                key: vec![format!("key-{id}")],
                hot: false,
            },
            changes: vec![upsert(id, true)],
        }
    }

    fn ids(changes: &[UserChange]) -> Vec<&str> {
        changes
            .iter()
            .map(|change| match change {
                UserChange::Upsert { user, .. } => user.id.as_str(),
                UserChange::SoftDelete(id) => id.as_str(),
                _ => "?",
            })
            .collect()
    }

    #[tokio::test]
    async fn a_chunk_leaves_out_what_the_stream_has_newer_or_whole() {
        let handoff = Arc::new(Handoff::default());
        let (replies, mut answers) = mpsc::unbounded_channel();
        let mut window = Window {
            handoff: Arc::clone(&handoff),
            replies,
            touched: Vec::new(),
            whole: HashSet::new(),
            moved: HashSet::new(),
            part_keys: &[],
        };
        // a: written whole by the stream; b: an update that left a value out, seen by the
        // snapshot; c: changed after the snapshot; e: changed in part, never in a chunk.
        window.record(10, &[upsert("a", true)]);
        window.record(11, &[upsert("b", false)]);
        window.record(12, &[upsert("c", false), upsert("e", false)]);
        let snapshot = Snapshot::parse("11:13:12").unwrap();
        handoff
            .put(Chunk {
                attempt: 7,
                seq: 0,
                snapshot: snapshot.clone(),
                rows: vec![copied("a"), copied("b"), copied("c"), copied("d")],
                ask: false,
            })
            .await;
        assert!(window.take(7, 1).is_none(), "another chunk's watermark");
        assert!(window.take(6, 0).is_none(), "another attempt's watermark");
        let applied = window.take(7, 0).unwrap();
        assert_eq!(ids(&applied), ["b", "d"]);
        let answer = answers.try_recv().unwrap();
        assert_eq!(answer.again, vec![vec!["key-c".to_owned()]]);
        assert!(answer.incomplete.is_none());
        // Read again in a snapshot that sees its change, c is written whole; e, changed in
        // part only, the copy reads by id, and finds it gone.
        handoff
            .put(Chunk {
                attempt: 7,
                seq: 1,
                snapshot: Snapshot::parse("13:13:").unwrap(),
                rows: vec![
                    copied("c"),
                    ChunkRow {
                        id: "e".into(),
                        kind: RowKind::Absent,
                        changes: Vec::new(),
                    },
                ],
                ask: false,
            })
            .await;
        assert_eq!(ids(&window.take(7, 1).unwrap()), ["c"]);
        handoff
            .put(Chunk {
                attempt: 7,
                seq: 2,
                snapshot: Snapshot::parse("13:13:").unwrap(),
                rows: vec![
                    ChunkRow {
                        id: "a".into(),
                        kind: RowKind::Tombstone,
                        changes: vec![UserChange::SoftDelete("a".into())],
                    },
                    ChunkRow {
                        id: "z".into(),
                        kind: RowKind::Tombstone,
                        changes: vec![UserChange::SoftDelete("z".into())],
                    },
                ],
                ask: true,
            })
            .await;
        let applied = window.take(7, 2).unwrap();
        assert_eq!(
            ids(&applied),
            ["a", "z"],
            "gone as of a snapshot that sees every change"
        );
        answers.try_recv().unwrap();
        let answer = answers.try_recv().unwrap();
        assert_eq!(answer.incomplete, Some(Vec::new()));
        assert!(window.touched.is_empty(), "every change is seen by now");
        // A user given a new id by an update that left a value out is read by id at the end;
        // a tombstone of a user changed after its snapshot is the stream's.
        let mut moved = upsert("m", false);
        if let UserChange::Upsert { moved_from, .. } = &mut moved {
            *moved_from = Some("old".into());
        }
        window.record(20, &[moved]);
        handoff
            .put(Chunk {
                attempt: 7,
                seq: 3,
                snapshot: Snapshot::parse("20:21:20").unwrap(),
                rows: vec![ChunkRow {
                    id: "m".into(),
                    kind: RowKind::Tombstone,
                    changes: vec![UserChange::SoftDelete("m".into())],
                }],
                ask: true,
            })
            .await;
        assert!(window.take(7, 3).unwrap().is_empty());
        let answer = answers.try_recv().unwrap();
        assert_eq!(answer.incomplete, Some(vec!["m".to_owned()]));
    }

    #[tokio::test]
    async fn a_hot_user_gets_its_part_alone_once_the_stream_has_its_row() {
        let handoff = Arc::new(Handoff::default());
        let (replies, mut answers) = mpsc::unbounded_channel();
        let mut window = Window {
            handoff: Arc::clone(&handoff),
            replies,
            touched: Vec::new(),
            whole: HashSet::new(),
            moved: HashSet::new(),
            part_keys: &["primary_email"],
        };
        // Its own row written whole, its part (the email) left as it was (as Stack Auth's
        // update of a user does: the email keys unchanged); and a user whose email the
        // stream changed.
        let mut own_row = upsert("h", true);
        if let UserChange::Upsert { user, .. } = &mut own_row {
            user.unchanged_keys = vec!["primary_email".into()];
        }
        window.record(30, &[own_row, upsert("p", true)]);
        window.record(
            31,
            &[UserChange::Patch {
                id: "p".into(),
                keys: serde_json::Map::new(),
                from: None,
                clears: false,
            }],
        );
        let row = |id: &str, hot: bool| {
            let mut row = copied(id);
            row.kind = RowKind::Copied {
                key: vec![id.to_owned()],
                hot,
            };
            row.changes.push(UserChange::Patch {
                id: id.into(),
                keys: serde_json::Map::new(),
                from: Some(format!("channel-{id}")),
                clears: false,
            });
            row
        };
        handoff
            .put(Chunk {
                attempt: 1,
                seq: 0,
                snapshot: Snapshot::parse("30:30:").unwrap(),
                rows: vec![row("h", false), row("h2", true), row("p", true)],
                ask: false,
            })
            .await;
        window.record(32, &[upsert("h2", true)]);
        let applied = window.take(1, 0).unwrap();
        assert_eq!(applied.len(), 1, "h2's part alone");
        assert!(matches!(&applied[0], UserChange::Patch { id, .. } if id == "h2"));
        let answer = answers.try_recv().unwrap();
        assert_eq!(
            answer.again,
            vec![vec!["h".to_owned()], vec!["p".to_owned()]],
            "h is not hot yet; p's part changed"
        );
    }

    #[test]
    fn watermarks_name_an_attempt_and_a_chunk() {
        assert_eq!(parse_mark(b"17:3"), Some(Mark::Chunk(17, 3)));
        assert_eq!(
            parse_mark(resync_message("a:b").as_bytes()),
            Some(Mark::Resync("a:b".into()))
        );
        assert_eq!(parse_mark(b"17"), None);
        assert_eq!(parse_mark(b"a:3"), None);
        assert_eq!(parse_mark(&[0xff, b':', b'1']), None);
    }
}
