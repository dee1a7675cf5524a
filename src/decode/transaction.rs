//! Whole committed transactions from the pgoutput message stream, in commit order, so that
//! nothing downstream ever sees work that may still roll back.
//!
//! Protocol 1 sends each transaction whole after its commit: Begin, changes, Commit. Protocol 2
//! also streams large transactions while they are in progress, in blocks between Stream Start
//! and Stream Stop that interleave with each other and with ordinary transactions; their
//! changes are held here until Stream Commit (emitted then, which is commit order) or Stream
//! Abort (dropped, wholly or back to a rolled-back subtransaction).
//!
//! Memory is bounded: once the changes held pass the assembler's limit, the transaction
//! holding the most goes to a [spill file](super::spill), then the next, until the rest fits;
//! a spilled transaction takes its later changes there too, and is read back when it commits.

use std::collections::HashMap;

use bytes::Bytes;

use super::pgoutput::{
    Begin, Commit, LogicalDecodingMessage, LogicalMessage, Relation, StreamAbort, StreamCommit,
    StreamStart,
};
use super::spill::{SpillFile, SpilledChanges};
use super::DecodeError;
use crate::lsn::Lsn;

/// What a change is counted as beyond its payload: the decoded message and its columns.
const CHANGE_OVERHEAD: usize = 256;
/// The default memory limit of [`TransactionAssembler`].
pub const DEFAULT_MEMORY_LIMIT: usize = 16 << 20;

/// A committed source transaction.
///
/// Transactions without changes are emitted too: their `end_lsn` is progress to confirm.
#[derive(Debug, PartialEq, Eq)]
pub struct Transaction {
    /// The top-level transaction's xid.
    pub xid: u32,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once this is applied.
    pub end_lsn: Lsn,
    /// Microseconds since the PostgreSQL epoch, from the commit message.
    pub commit_time_micros: i64,
    /// Relation, Type, Insert, Update, Delete, Truncate and transactional Message, in order;
    /// empty when the transaction was spilled.
    pub changes: Vec<LogicalMessage>,
    /// The changes of a transaction that outgrew the memory limit, instead of `changes`.
    pub spilled: Option<SpilledChanges>,
}

impl Transaction {
    /// How many changes it has.
    pub fn len(&self) -> usize {
        self.changes.len() + self.spilled.as_ref().map_or(0, SpilledChanges::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its changes in order, read back from disk if it was spilled.
    pub fn into_changes(self) -> impl Iterator<Item = Result<LogicalMessage, DecodeError>> {
        self.changes
            .into_iter()
            .map(Ok)
            .chain(self.spilled.into_iter().flatten())
    }
}

/// What pushing one message produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// A transaction committed.
    Transaction(Transaction),
    /// A message emitted with `transactional = false`: it belongs to no transaction.
    NonTransactionalMessage(LogicalDecodingMessage),
    /// A relation sent outside any transaction. pgoutput sends them inside, before the first
    /// change that needs them, but nothing is lost by accepting them anywhere.
    Relation(Relation),
    /// The message was buffered or needs no action.
    Nothing,
}

/// Groups pgoutput messages into committed [`Transaction`]s.
///
/// Use one assembler per replication connection: after a reconnect the server streams
/// in-progress transactions again from their first segment. After an error the state is
/// not meaningful; stop and reconnect.
///
/// A transaction whose changes pass the memory limit is spilled to disk: each change comes
/// with the payload it was decoded from ([`push_payload`](Self::push_payload)), which is what
/// the spill file holds.
#[derive(Debug)]
pub struct TransactionAssembler {
    /// The non-streamed transaction between Begin and Commit.
    open: Option<OpenTransaction>,
    /// The streamed transaction whose block is open, out of `streamed` until Stream Stop.
    in_block: Option<StreamedTransaction>,
    /// Streamed transactions between blocks, waiting for more, a commit or an abort.
    streamed: HashMap<u32, StreamedTransaction>,
    /// Bytes of changes held in memory past which a transaction is spilled.
    memory_limit: usize,
}

impl Default for TransactionAssembler {
    fn default() -> Self {
        Self::with_memory_limit(DEFAULT_MEMORY_LIMIT)
    }
}

#[derive(Debug)]
struct OpenTransaction {
    begin: Begin,
    changes: Changes,
}

#[derive(Debug)]
struct StreamedTransaction {
    /// The top-level xid, from Stream Start.
    xid: u32,
    changes: Changes,
    /// For each (sub)transaction xid seen on a change, where its first change is: an abort
    /// of that subtransaction cuts `changes` back to there.
    first_change: HashMap<u32, Mark>,
}

impl StreamedTransaction {
    fn new(xid: u32) -> Self {
        Self {
            xid,
            changes: Changes::new(true),
            first_change: HashMap::new(),
        }
    }

    /// Moves its changes to a spill file, its subtransactions' marks with them.
    fn spill(&mut self) -> Result<(), DecodeError> {
        self.changes.spill(self.first_change.values_mut())
    }
}

/// Where a transaction the assembler holds is.
#[derive(Debug, Clone, Copy)]
enum Held {
    Open,
    InBlock,
    Streamed(u32),
}

/// A position in [`Changes`]: the number of changes before it and, once spilled, where it
/// is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    count: usize,
    offset: u64,
}

/// The changes of one transaction, in memory or spilled.
#[derive(Debug)]
struct Changes {
    in_memory: Vec<LogicalMessage>,
    /// The payload of each change in memory, while all are known: what a spill writes.
    payloads: Vec<Bytes>,
    /// What the changes in memory are counted as.
    bytes: usize,
    spill: Option<SpillFile>,
    /// Whether they come inside stream blocks (their payloads carry an xid).
    in_stream: bool,
}

impl Changes {
    fn new(in_stream: bool) -> Self {
        Changes {
            in_memory: Vec::new(),
            payloads: Vec::new(),
            bytes: 0,
            spill: None,
            in_stream,
        }
    }

    fn len(&self) -> usize {
        self.spill
            .as_ref()
            .map_or(self.in_memory.len(), SpillFile::len)
    }

    fn mark(&self) -> Mark {
        Mark {
            count: self.len(),
            offset: self.spill.as_ref().map_or(0, SpillFile::end),
        }
    }

    fn push(&mut self, change: LogicalMessage, payload: Option<Bytes>) -> Result<(), DecodeError> {
        match (&mut self.spill, payload) {
            (Some(file), Some(payload)) => file.append(&payload),
            (Some(_), None) => Err(unexpected(
                change.kind(),
                "without its payload, in a spilled transaction".to_owned(),
            )),
            (None, payload) => {
                self.bytes += CHANGE_OVERHEAD;
                if let Some(payload) = payload {
                    self.bytes += payload.len();
                    self.payloads.push(payload);
                }
                self.in_memory.push(change);
                Ok(())
            }
        }
    }

    /// Moves the changes in memory to a new spill file, and gives `marks` their offsets there.
    fn spill<'a>(
        &mut self,
        marks: impl IntoIterator<Item = &'a mut Mark>,
    ) -> Result<(), DecodeError> {
        let mut marks: Vec<&mut Mark> = marks.into_iter().collect();
        marks.sort_by_key(|mark| std::cmp::Reverse(mark.count));
        let mut file = SpillFile::create(self.in_stream)?;
        for (index, payload) in self.payloads.iter().enumerate() {
            while marks.last().is_some_and(|mark| mark.count == index) {
                if let Some(mark) = marks.pop() {
                    mark.offset = file.end();
                }
            }
            file.append(payload)?;
        }
        self.in_memory = Vec::new();
        self.payloads = Vec::new();
        self.bytes = 0;
        self.spill = Some(file);
        Ok(())
    }

    fn can_spill(&self) -> bool {
        self.spill.is_none() && self.payloads.len() == self.in_memory.len()
    }

    fn truncate(&mut self, mark: Mark) -> Result<(), DecodeError> {
        match &mut self.spill {
            Some(file) => file.truncate(mark.offset, mark.count),
            None => {
                self.in_memory.truncate(mark.count);
                self.payloads.truncate(mark.count);
                self.bytes = self.payloads.iter().map(Bytes::len).sum::<usize>()
                    + CHANGE_OVERHEAD * self.in_memory.len();
                Ok(())
            }
        }
    }

    fn into_parts(self) -> Result<(Vec<LogicalMessage>, Option<SpilledChanges>), DecodeError> {
        match self.spill {
            Some(file) => Ok((Vec::new(), Some(file.into_changes()?))),
            None => Ok((self.in_memory, None)),
        }
    }
}

impl TransactionAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that spills a transaction once the changes held in memory pass `bytes`
    /// (payloads plus an estimate of the decoded form).
    pub fn with_memory_limit(bytes: usize) -> Self {
        TransactionAssembler {
            open: None,
            in_block: None,
            streamed: HashMap::new(),
            memory_limit: bytes,
        }
    }

    /// Takes the next decoded message, in the order the server sent them, held in memory
    /// however large its transaction grows (tests build messages without their bytes).
    #[cfg(test)]
    pub fn push(&mut self, message: LogicalMessage) -> Result<Assembled, DecodeError> {
        self.push_inner(message, None)
    }

    /// Takes the next decoded message, in the order the server sent them, with the payload it
    /// was decoded from: what is written to disk if its transaction is spilled.
    pub fn push_payload(
        &mut self,
        message: LogicalMessage,
        payload: Bytes,
    ) -> Result<Assembled, DecodeError> {
        self.push_inner(message, Some(payload))
    }

    fn push_inner(
        &mut self,
        message: LogicalMessage,
        payload: Option<Bytes>,
    ) -> Result<Assembled, DecodeError> {
        match message {
            LogicalMessage::Begin(begin) => self.begin(begin),
            LogicalMessage::Commit(commit) => self.commit(commit),
            // Where a transaction came from does not change what it did.
            LogicalMessage::Origin(_) => Ok(Assembled::Nothing),
            LogicalMessage::StreamStart(start) => self.stream_start(start),
            LogicalMessage::StreamStop => self.stream_stop(),
            LogicalMessage::StreamCommit(commit) => self.stream_commit(commit),
            LogicalMessage::StreamAbort(abort) => self.stream_abort(abort),
            LogicalMessage::Message(message) if !message.transactional => {
                Ok(Assembled::NonTransactionalMessage(message))
            }
            change => self.change(change, payload),
        }
    }

    /// Whether no transaction is half-read: everything received has been emitted but the
    /// streamed transactions held until their commit. Only then may a replicator confirm a
    /// position it has not applied (a keepalive's). A held streamed transaction does not
    /// count: its commit comes after any position the server has sent, and a session that
    /// starts again before that commit is sent the whole transaction again (the slot's
    /// restart point stays before its first change), which is what PostgreSQL's own
    /// subscriber relies on too.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.in_block.is_none()
    }

    /// Changes held, in memory or spilled, in open and in-progress streamed transactions.
    #[cfg(test)]
    pub fn buffered_changes(&self) -> usize {
        self.all_changes().map(Changes::len).sum()
    }

    /// What the changes held in memory are counted as, in bytes.
    pub fn buffered_bytes(&self) -> usize {
        self.all_changes().map(|changes| changes.bytes).sum()
    }

    fn over_memory_limit(&self) -> bool {
        self.buffered_bytes() > self.memory_limit
    }

    /// Past the memory limit, spills the transaction holding the most in memory, then the
    /// next, until the rest fits: the one a change just came to may be a small one beside a
    /// large one, which would go to disk for nothing (PostgreSQL's reorder buffer picks the
    /// largest too).
    fn keep_within_limit(&mut self) -> Result<(), DecodeError> {
        while self.over_memory_limit() {
            let Some(largest) = self.largest_spillable() else {
                return Ok(());
            };
            match largest {
                Held::Open => {
                    if let Some(open) = &mut self.open {
                        open.changes.spill([])?;
                    }
                }
                Held::InBlock => {
                    if let Some(txn) = &mut self.in_block {
                        txn.spill()?;
                    }
                }
                Held::Streamed(xid) => {
                    if let Some(txn) = self.streamed.get_mut(&xid) {
                        txn.spill()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn largest_spillable(&self) -> Option<Held> {
        let open = self.open.iter().map(|open| (Held::Open, &open.changes));
        let in_block = self
            .in_block
            .iter()
            .map(|txn| (Held::InBlock, &txn.changes));
        let streamed = self
            .streamed
            .iter()
            .map(|(xid, txn)| (Held::Streamed(*xid), &txn.changes));
        open.chain(in_block)
            .chain(streamed)
            .filter(|(_, changes)| changes.bytes > 0 && changes.can_spill())
            .max_by_key(|(_, changes)| changes.bytes)
            .map(|(held, _)| held)
    }

    fn all_changes(&self) -> impl Iterator<Item = &Changes> {
        self.open
            .iter()
            .map(|open| &open.changes)
            .chain(self.in_block.iter().map(|txn| &txn.changes))
            .chain(self.streamed.values().map(|txn| &txn.changes))
    }

    fn begin(&mut self, begin: Begin) -> Result<Assembled, DecodeError> {
        self.expect_no_stream_block("Begin")?;
        if let Some(open) = &self.open {
            return Err(unexpected(
                "Begin",
                format!(
                    "of xid {} while xid {} is still open",
                    begin.xid, open.begin.xid
                ),
            ));
        }
        self.open = Some(OpenTransaction {
            begin,
            changes: Changes::new(false),
        });
        Ok(Assembled::Nothing)
    }

    fn commit(&mut self, commit: Commit) -> Result<Assembled, DecodeError> {
        let open = self.open.take().ok_or_else(|| {
            unexpected(
                "Commit",
                format!("at {} without a Begin", commit.commit_lsn),
            )
        })?;
        // Begin announces where the commit record will be; a different one means the
        // messages of two transactions got mixed up.
        if commit.commit_lsn != open.begin.final_lsn {
            return Err(unexpected(
                "Commit",
                format!(
                    "at {} for xid {}, whose Begin announced {}",
                    commit.commit_lsn, open.begin.xid, open.begin.final_lsn
                ),
            ));
        }
        let (changes, spilled) = open.changes.into_parts()?;
        Ok(Assembled::Transaction(Transaction {
            xid: open.begin.xid,
            commit_lsn: commit.commit_lsn,
            end_lsn: commit.end_lsn,
            commit_time_micros: commit.commit_time_micros,
            changes,
            spilled,
        }))
    }

    fn stream_start(&mut self, start: StreamStart) -> Result<Assembled, DecodeError> {
        self.expect_no_transaction("Stream Start")?;
        self.expect_no_stream_block("Stream Start")?;
        let txn = match (start.first_segment, self.streamed.remove(&start.xid)) {
            (true, None) => StreamedTransaction::new(start.xid),
            (false, Some(txn)) => txn,
            (true, Some(_)) => {
                return Err(unexpected(
                    "Stream Start",
                    format!(
                        "first segment of xid {}, which is already streaming",
                        start.xid
                    ),
                ))
            }
            (false, None) => {
                return Err(unexpected(
                    "Stream Start",
                    format!(
                        "continues xid {}, whose first segment was not received",
                        start.xid
                    ),
                ))
            }
        };
        self.in_block = Some(txn);
        Ok(Assembled::Nothing)
    }

    fn stream_stop(&mut self) -> Result<Assembled, DecodeError> {
        let txn = self
            .in_block
            .take()
            .ok_or_else(|| unexpected("Stream Stop", "no stream block is open".to_owned()))?;
        self.streamed.insert(txn.xid, txn);
        Ok(Assembled::Nothing)
    }

    fn stream_commit(&mut self, commit: StreamCommit) -> Result<Assembled, DecodeError> {
        self.expect_no_transaction("Stream Commit")?;
        self.expect_no_stream_block("Stream Commit")?;
        let txn = self.streamed.remove(&commit.xid).ok_or_else(|| {
            unexpected(
                "Stream Commit",
                format!("of xid {}, which is not streaming", commit.xid),
            )
        })?;
        let (changes, spilled) = txn.changes.into_parts()?;
        Ok(Assembled::Transaction(Transaction {
            xid: txn.xid,
            commit_lsn: commit.commit_lsn,
            end_lsn: commit.end_lsn,
            commit_time_micros: commit.commit_time_micros,
            changes,
            spilled,
        }))
    }

    /// Drops an aborted transaction, or cuts one back to before a rolled-back subtransaction.
    ///
    /// Everything from a subtransaction's first change on belongs to it or to its children,
    /// because a backend runs subtransactions one inside the other, never side by side; so
    /// truncating there is exact (PostgreSQL's apply worker does the same with its spool
    /// file). An abort of an xid or subxid that sent no changes has nothing to drop.
    fn stream_abort(&mut self, abort: StreamAbort) -> Result<Assembled, DecodeError> {
        self.expect_no_transaction("Stream Abort")?;
        self.expect_no_stream_block("Stream Abort")?;
        if abort.subxid == abort.xid {
            self.streamed.remove(&abort.xid);
        } else if let Some(txn) = self.streamed.get_mut(&abort.xid) {
            if let Some(&cut) = txn.first_change.get(&abort.subxid) {
                txn.changes.truncate(cut)?;
                txn.first_change.retain(|_, first| first.count < cut.count);
            }
        }
        Ok(Assembled::Nothing)
    }

    fn change(
        &mut self,
        change: LogicalMessage,
        payload: Option<Bytes>,
    ) -> Result<Assembled, DecodeError> {
        if let Some(txn) = &mut self.in_block {
            let subxid = streamed_xid(&change).unwrap_or(txn.xid);
            let mark = txn.changes.mark();
            txn.first_change.entry(subxid).or_insert(mark);
            txn.changes.push(change, payload)?;
            self.keep_within_limit()?;
            return Ok(Assembled::Nothing);
        }
        if let Some(open) = &mut self.open {
            open.changes.push(change, payload)?;
            self.keep_within_limit()?;
            return Ok(Assembled::Nothing);
        }
        match change {
            LogicalMessage::Relation(relation) => Ok(Assembled::Relation(relation)),
            change => Err(unexpected(
                change.kind(),
                "outside any transaction".to_owned(),
            )),
        }
    }

    fn expect_no_transaction(&self, message: &'static str) -> Result<(), DecodeError> {
        match &self.open {
            Some(open) => Err(unexpected(
                message,
                format!("inside the transaction of xid {}", open.begin.xid),
            )),
            None => Ok(()),
        }
    }

    fn expect_no_stream_block(&self, message: &'static str) -> Result<(), DecodeError> {
        match &self.in_block {
            Some(txn) => Err(unexpected(
                message,
                format!("inside the stream block of xid {}", txn.xid),
            )),
            None => Ok(()),
        }
    }
}

fn unexpected(message: &'static str, reason: String) -> DecodeError {
    DecodeError::Unexpected { message, reason }
}

/// The xid a change carries inside a stream block: that of its (sub)transaction.
fn streamed_xid(change: &LogicalMessage) -> Option<u32> {
    match change {
        LogicalMessage::Relation(relation) => relation.xid,
        LogicalMessage::Type(type_message) => type_message.xid,
        LogicalMessage::Insert(insert) => insert.xid,
        LogicalMessage::Update(update) => update.xid,
        LogicalMessage::Delete(delete) => delete.xid,
        LogicalMessage::Truncate(truncate) => truncate.xid,
        LogicalMessage::Message(message) => message.xid,
        LogicalMessage::Begin(_)
        | LogicalMessage::Commit(_)
        | LogicalMessage::Origin(_)
        | LogicalMessage::StreamStart(_)
        | LogicalMessage::StreamStop
        | LogicalMessage::StreamCommit(_)
        | LogicalMessage::StreamAbort(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{
        ColumnValue, Insert, Origin, PgOutputDecoder, ReplicaIdentity, TupleData, TypeMessage,
    };
    use bytes::Bytes;

    const A: u32 = 1_000;
    const A_SUB1: u32 = 1_001;
    const A_SUB2: u32 = 1_002;
    const B: u32 = 2_000;
    const C: u32 = 3_000;

    fn begin(xid: u32, final_lsn: u64) -> LogicalMessage {
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(final_lsn),
            commit_time_micros: 1,
            xid,
        })
    }

    fn commit(commit_lsn: u64) -> LogicalMessage {
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 0x30),
            commit_time_micros: 2,
        })
    }

    fn users(xid: Option<u32>) -> Relation {
        Relation {
            xid,
            id: 16_384,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: Vec::new(),
        }
    }

    fn relation(xid: Option<u32>) -> LogicalMessage {
        LogicalMessage::Relation(users(xid))
    }

    /// An insert whose single column value tells the tests' changes apart.
    fn insert(xid: Option<u32>, label: &'static str) -> LogicalMessage {
        LogicalMessage::Insert(Insert {
            xid,
            relation_id: 16_384,
            new: TupleData(vec![ColumnValue::Text(Bytes::from_static(
                label.as_bytes(),
            ))]),
        })
    }

    fn message(xid: Option<u32>, transactional: bool) -> LogicalDecodingMessage {
        LogicalDecodingMessage {
            xid,
            transactional,
            lsn: Lsn(9),
            prefix: "p".into(),
            content: Bytes::from_static(b"c"),
        }
    }

    fn stream_start(xid: u32, first_segment: bool) -> LogicalMessage {
        LogicalMessage::StreamStart(StreamStart { xid, first_segment })
    }

    fn stream_commit(xid: u32, commit_lsn: u64) -> LogicalMessage {
        LogicalMessage::StreamCommit(StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 0x30),
            commit_time_micros: 3,
        })
    }

    fn stream_abort(xid: u32, subxid: u32) -> LogicalMessage {
        LogicalMessage::StreamAbort(StreamAbort { xid, subxid })
    }

    /// Pushes messages that must all be absorbed.
    fn push_all(assembler: &mut TransactionAssembler, messages: Vec<LogicalMessage>) {
        for message in messages {
            let kind = message.kind();
            assert_eq!(assembler.push(message), Ok(Assembled::Nothing), "{kind}");
        }
    }

    fn committed(result: Result<Assembled, DecodeError>) -> Transaction {
        match result {
            Ok(Assembled::Transaction(txn)) => txn,
            other => panic!("expected a transaction, got {other:?}"),
        }
    }

    fn unexpected_message(result: Result<Assembled, DecodeError>) -> &'static str {
        match result {
            Err(DecodeError::Unexpected { message, .. }) => message,
            other => panic!("expected an Unexpected error, got {other:?}"),
        }
    }

    #[test]
    fn assembles_a_plain_transaction() {
        let mut assembler = TransactionAssembler::new();
        let origin = LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(1),
            name: "elsewhere".into(),
        });
        let type_message = LogicalMessage::Type(TypeMessage {
            xid: None,
            id: 90_001,
            namespace: "public".into(),
            name: "mood".into(),
        });
        push_all(
            &mut assembler,
            vec![
                begin(C, 0x500),
                origin,
                relation(None),
                type_message.clone(),
                insert(None, "one"),
                LogicalMessage::Message(message(None, true)),
                insert(None, "two"),
            ],
        );
        assert_eq!(assembler.buffered_changes(), 5);
        let txn = committed(assembler.push(commit(0x500)));
        assert_eq!(
            txn,
            Transaction {
                xid: C,
                commit_lsn: Lsn(0x500),
                end_lsn: Lsn(0x530),
                commit_time_micros: 2,
                changes: vec![
                    relation(None),
                    type_message,
                    insert(None, "one"),
                    LogicalMessage::Message(message(None, true)),
                    insert(None, "two"),
                ],
                spilled: None,
            }
        );
        assert_eq!(assembler.buffered_changes(), 0);
    }

    #[test]
    fn emits_empty_transactions_for_their_progress() {
        let mut assembler = TransactionAssembler::new();
        push_all(&mut assembler, vec![begin(C, 0x500)]);
        let txn = committed(assembler.push(commit(0x500)));
        assert!(txn.changes.is_empty());
        assert_eq!(txn.end_lsn, Lsn(0x530));
    }

    #[test]
    fn passes_through_relations_and_non_transactional_messages() {
        let mut assembler = TransactionAssembler::new();
        assert_eq!(
            assembler.push(relation(None)),
            Ok(Assembled::Relation(users(None)))
        );
        assert_eq!(
            assembler.push(LogicalMessage::Message(message(None, false))),
            Ok(Assembled::NonTransactionalMessage(message(None, false)))
        );
        // Not part of a transaction even when one is open.
        push_all(&mut assembler, vec![begin(C, 0x500)]);
        assert_eq!(
            assembler.push(LogicalMessage::Message(message(None, false))),
            Ok(Assembled::NonTransactionalMessage(message(None, false)))
        );
        assert!(committed(assembler.push(commit(0x500))).changes.is_empty());
    }

    #[test]
    fn assembles_interleaved_streamed_transactions() {
        let mut assembler = TransactionAssembler::new();
        push_all(
            &mut assembler,
            vec![
                stream_start(A, true),
                relation(Some(A)),
                insert(Some(A), "a1"),
                insert(Some(A_SUB1), "a-sub1-1"),
                insert(Some(A_SUB2), "a-sub2-1"),
                LogicalMessage::StreamStop,
                stream_start(B, true),
                insert(Some(B), "b1"),
                LogicalMessage::StreamStop,
            ],
        );
        assert_eq!(assembler.buffered_changes(), 5);
        // Between blocks, held streamed transactions leave nothing half-read.
        assert!(assembler.is_idle());
        push_all(&mut assembler, vec![stream_start(A, false)]);
        assert!(!assembler.is_idle(), "inside a block");
        push_all(&mut assembler, vec![LogicalMessage::StreamStop]);

        // An ordinary transaction between blocks commits on its own.
        push_all(&mut assembler, vec![begin(C, 0x500), insert(None, "c1")]);
        assert!(!assembler.is_idle(), "inside an ordinary transaction");
        let c = committed(assembler.push(commit(0x500)));
        assert_eq!((c.xid, c.changes), (C, vec![insert(None, "c1")]));

        push_all(
            &mut assembler,
            vec![
                stream_start(A, false),
                insert(Some(A_SUB1), "a-sub1-2"),
                LogicalMessage::StreamStop,
                // ROLLBACK TO the savepoint of A_SUB1: drops it and A_SUB2 nested in it.
                stream_abort(A, A_SUB1),
                stream_start(A, false),
                insert(Some(A), "a2"),
                LogicalMessage::StreamStop,
                // B rolls back entirely.
                stream_abort(B, B),
            ],
        );
        assert_eq!(assembler.buffered_changes(), 3);

        let a = committed(assembler.push(stream_commit(A, 0x900)));
        assert_eq!(
            a,
            Transaction {
                xid: A,
                commit_lsn: Lsn(0x900),
                end_lsn: Lsn(0x930),
                commit_time_micros: 3,
                changes: vec![
                    relation(Some(A)),
                    insert(Some(A), "a1"),
                    insert(Some(A), "a2"),
                ],
                spilled: None,
            }
        );
        assert_eq!(assembler.buffered_changes(), 0);
        assert_eq!(
            unexpected_message(assembler.push(stream_commit(B, 0x1000))),
            "Stream Commit"
        );
    }

    #[test]
    fn a_subtransaction_can_start_again_after_its_rollback() {
        let mut assembler = TransactionAssembler::new();
        push_all(
            &mut assembler,
            vec![
                stream_start(A, true),
                insert(Some(A), "a1"),
                insert(Some(A_SUB1), "dropped"),
                LogicalMessage::StreamStop,
                stream_abort(A, A_SUB1),
                // Aborting what sent nothing, or what is unknown, changes nothing.
                stream_abort(A, A_SUB2),
                stream_abort(B, B),
                stream_abort(B, 2_001),
                stream_start(A, false),
                insert(Some(A_SUB2), "kept"),
                LogicalMessage::StreamStop,
                stream_abort(A, A_SUB1),
            ],
        );
        let a = committed(assembler.push(stream_commit(A, 0x900)));
        assert_eq!(
            a.changes,
            vec![insert(Some(A), "a1"), insert(Some(A_SUB2), "kept")]
        );
    }

    #[test]
    fn a_streamed_transaction_can_be_committed_without_changes() {
        let mut assembler = TransactionAssembler::new();
        push_all(
            &mut assembler,
            vec![stream_start(A, true), LogicalMessage::StreamStop],
        );
        assert!(committed(assembler.push(stream_commit(A, 0x900)))
            .changes
            .is_empty());
    }

    #[test]
    fn rejects_messages_out_of_place() {
        let cases: Vec<(Vec<LogicalMessage>, LogicalMessage, &str)> = vec![
            (vec![begin(C, 0x500)], begin(B, 0x600), "Begin"),
            (vec![], commit(0x500), "Commit"),
            (vec![begin(C, 0x500)], commit(0x501), "Commit"),
            (vec![], insert(None, "x"), "Insert"),
            (
                vec![],
                LogicalMessage::Message(message(None, true)),
                "Message",
            ),
            (
                vec![],
                LogicalMessage::Type(TypeMessage {
                    xid: None,
                    id: 1,
                    namespace: "s".into(),
                    name: "t".into(),
                }),
                "Type",
            ),
            (vec![], stream_commit(A, 0x900), "Stream Commit"),
            (vec![], LogicalMessage::StreamStop, "Stream Stop"),
            (vec![begin(C, 0x500)], stream_start(A, true), "Stream Start"),
            (
                vec![stream_start(A, true)],
                stream_start(B, true),
                "Stream Start",
            ),
            (vec![stream_start(A, true)], begin(C, 0x500), "Begin"),
            (
                vec![stream_start(A, true)],
                stream_commit(A, 0x900),
                "Stream Commit",
            ),
            (
                vec![stream_start(A, true)],
                stream_abort(A, A),
                "Stream Abort",
            ),
            (vec![begin(C, 0x500)], stream_abort(A, A), "Stream Abort"),
            (
                vec![begin(C, 0x500)],
                stream_commit(A, 0x900),
                "Stream Commit",
            ),
            (vec![], stream_start(A, false), "Stream Start"),
            (
                vec![stream_start(A, true), LogicalMessage::StreamStop],
                stream_start(A, true),
                "Stream Start",
            ),
        ];
        for (before, message, expected) in cases {
            let mut assembler = TransactionAssembler::new();
            push_all(&mut assembler, before);
            assert_eq!(unexpected_message(assembler.push(message)), expected);
        }
    }

    /// An insert as [`insert`] makes it, with the payload it decodes from.
    fn insert_payload(xid: Option<u32>, label: &'static str) -> (LogicalMessage, Bytes) {
        let mut payload = vec![b'I'];
        if let Some(xid) = xid {
            payload.extend_from_slice(&xid.to_be_bytes());
        }
        payload.extend_from_slice(&16_384u32.to_be_bytes());
        payload.push(b'N');
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.push(b't');
        payload.extend_from_slice(&(label.len() as u32).to_be_bytes());
        payload.extend_from_slice(label.as_bytes());
        let payload = Bytes::from(payload);
        let message =
            PgOutputDecoder::decode_spilled(payload.clone(), xid.is_some()).expect("an insert");
        assert_eq!(message, insert(xid, label));
        (message, payload)
    }

    fn push_inserts(assembler: &mut TransactionAssembler, inserts: &[(Option<u32>, &'static str)]) {
        for &(xid, label) in inserts {
            let (message, payload) = insert_payload(xid, label);
            assert_eq!(
                assembler.push_payload(message, payload),
                Ok(Assembled::Nothing)
            );
        }
    }

    fn spilled_changes(txn: Transaction) -> Vec<LogicalMessage> {
        assert!(txn.spilled.is_some(), "the transaction was spilled");
        txn.into_changes().map(Result::unwrap).collect()
    }

    #[test]
    fn a_transaction_past_the_memory_limit_is_spilled_and_read_back_in_order() {
        let mut assembler = TransactionAssembler::with_memory_limit(3 * CHANGE_OVERHEAD);
        push_all(&mut assembler, vec![begin(C, 0x500)]);
        let labels = ["one", "two", "three", "four", "five"];
        push_inserts(&mut assembler, &labels.map(|label| (None, label)));
        assert_eq!(assembler.buffered_changes(), 5);
        assert_eq!(assembler.buffered_bytes(), 0, "all on disk");
        let txn = committed(assembler.push(commit(0x500)));
        assert_eq!(txn.len(), 5);
        assert_eq!(
            spilled_changes(txn),
            labels.map(|label| insert(None, label)).to_vec()
        );
        assert!(assembler.is_idle());
    }

    #[test]
    fn a_subtransaction_abort_cuts_a_spilled_stream_back() {
        // Spilled from the first change on: every mark is a file offset.
        let mut assembler = TransactionAssembler::with_memory_limit(1);
        push_all(&mut assembler, vec![stream_start(A, true)]);
        push_inserts(
            &mut assembler,
            &[(Some(A), "a1"), (Some(A_SUB1), "s1"), (Some(A_SUB1), "s2")],
        );
        push_all(&mut assembler, vec![LogicalMessage::StreamStop]);
        push_all(&mut assembler, vec![stream_abort(A, A_SUB1)]);
        push_all(&mut assembler, vec![stream_start(A, false)]);
        push_inserts(&mut assembler, &[(Some(A), "a2"), (Some(A_SUB2), "t1")]);
        push_all(&mut assembler, vec![LogicalMessage::StreamStop]);
        let txn = committed(assembler.push(stream_commit(A, 0x900)));
        assert_eq!(
            spilled_changes(txn),
            vec![
                insert(Some(A), "a1"),
                insert(Some(A), "a2"),
                insert(Some(A_SUB2), "t1")
            ]
        );
    }

    #[test]
    fn marks_taken_in_memory_hold_after_the_spill() {
        // The second change passes the limit: the first subtransaction's mark was taken in
        // memory and must point into the file afterwards.
        let mut assembler = TransactionAssembler::with_memory_limit(2 * CHANGE_OVERHEAD);
        push_all(&mut assembler, vec![stream_start(A, true)]);
        push_inserts(
            &mut assembler,
            &[(Some(A), "a1"), (Some(A_SUB1), "s1"), (Some(A_SUB1), "s2")],
        );
        push_all(
            &mut assembler,
            vec![LogicalMessage::StreamStop, stream_abort(A, A_SUB1)],
        );
        push_all(&mut assembler, vec![stream_start(A, false)]);
        push_inserts(&mut assembler, &[(Some(A), "a2")]);
        push_all(&mut assembler, vec![LogicalMessage::StreamStop]);
        let txn = committed(assembler.push(stream_commit(A, 0x900)));
        assert_eq!(
            spilled_changes(txn),
            vec![insert(Some(A), "a1"), insert(Some(A), "a2")]
        );
    }

    #[test]
    fn past_the_limit_the_largest_transaction_is_spilled() {
        // Three changes of a streamed transaction fit; the first of an ordinary transaction
        // beside it passes the limit: the large one goes to disk, not the small one.
        let mut assembler = TransactionAssembler::with_memory_limit(7 * CHANGE_OVERHEAD / 2);
        push_all(&mut assembler, vec![stream_start(A, true)]);
        push_inserts(
            &mut assembler,
            &[(Some(A), "a1"), (Some(A_SUB1), "s1"), (Some(A), "a2")],
        );
        push_all(&mut assembler, vec![LogicalMessage::StreamStop]);
        push_all(&mut assembler, vec![begin(C, 0x500)]);
        push_inserts(&mut assembler, &[(None, "c1")]);
        assert!(
            assembler.buffered_bytes() < 2 * CHANGE_OVERHEAD,
            "only c1 in memory"
        );
        let c = committed(assembler.push(commit(0x500)));
        assert!(
            c.spilled.is_none(),
            "the small transaction stayed in memory"
        );
        assert_eq!(c.changes, vec![insert(None, "c1")]);
        // The spilled one's subtransaction marks point into its file.
        push_all(&mut assembler, vec![stream_abort(A, A_SUB1)]);
        let a = committed(assembler.push(stream_commit(A, 0x900)));
        assert_eq!(spilled_changes(a), vec![insert(Some(A), "a1")]);
    }

    #[test]
    fn under_the_limit_nothing_is_spilled() {
        let mut assembler = TransactionAssembler::new();
        push_all(&mut assembler, vec![begin(C, 0x500)]);
        push_inserts(&mut assembler, &[(None, "one"), (None, "two")]);
        assert!(assembler.buffered_bytes() > 0);
        let txn = committed(assembler.push(commit(0x500)));
        assert!(txn.spilled.is_none());
        assert_eq!(txn.changes.len(), 2);
    }
}
