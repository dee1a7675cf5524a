//! Bytes from the replication stream → owned messages → whole committed transactions.
//!
//! ```text
//! CopyData payload ─▶ replication.rs ─▶ XLogData { data } | PrimaryKeepalive
//! data             ─▶ pgoutput.rs    ─▶ LogicalMessage    (stateful: is a stream block open?)
//! LogicalMessage   ─▶ transaction.rs ─▶ Transaction       (committed work only, in commit order)
//! ```
//!
//! # Why decoding is pure
//!
//! Nothing in this module does I/O, reads a clock or awaits. The `source` module owns the
//! connection and hands over each CopyData payload as [`bytes::Bytes`]; what comes back is
//! owned values or a [`DecodeError`]. That keeps every protocol rule testable with hand-built
//! byte vectors and fuzzable with arbitrary ones, and no input can panic the process: reads
//! are checked, lengths from the wire are never trusted for allocation, and every error says
//! which field, tag or length was wrong.
//!
//! Column values are zero-copy slices of the CopyData buffer ([`ColumnValue::Text`] holds a
//! `Bytes`), so a row costs one small `Vec` and no per-column allocation. Only names
//! (relations, columns, types, origins, message prefixes) become `String`s; they are rare.
//!
//! # The two layers
//!
//! The [streaming replication protocol] wraps everything in CopyData messages of two kinds
//! ([`ReplicationMessage`]): XLogData (`'w'`), whose payload is one pgoutput message, and the
//! Primary Keepalive (`'k'`). The client answers with Standby Status Updates (`'r'`,
//! [`encode_standby_status_update`]). All times on this layer and in pgoutput are
//! microseconds since 2000-01-01 00:00:00 UTC, not the Unix epoch.
//!
//! # Keepalives
//!
//! The server sends a keepalive when it has nothing else to say, and with `reply_requested`
//! set when `wal_sender_timeout` is close: a client that does not answer soon is
//! disconnected. The keepalive's `wal_end` is also how an idle database makes progress: when
//! nothing is pending, the client may confirm it so the slot does not hold WAL forever.
//!
//! # pgoutput, protocol versions 1 and 2
//!
//! In protocol 1 the server decodes a transaction only once it has committed and sends it as
//! Begin, changes, Commit; transactions arrive one after another in commit order.
//!
//! Protocol 2 (PostgreSQL 14+, with the `streaming` option) adds streaming of large
//! in-progress transactions: once a transaction exceeds `logical_decoding_work_mem` (which
//! usersync caps at 8MB for its walsender, see `replicator::start`), the server sends what it has so far in a block between Stream Start (top-level xid) and
//! Stream Stop, and later more blocks, then Stream Commit or Stream Abort outside any block.
//! Blocks of different transactions interleave, and ordinary Begin..Commit transactions may
//! arrive between them. Inside a block, and only there, Relation, Type, Insert, Update,
//! Delete, Truncate and Message carry an extra leading xid: the xid of the *subtransaction*
//! that made the change (equal to the top-level xid outside savepoints). Because the same
//! tag has two layouts depending on whether a block is open, [`PgOutputDecoder`] keeps that
//! one bit of state. A Stream Abort names a subtransaction when only a `ROLLBACK TO
//! SAVEPOINT` happened; [`TransactionAssembler`] then drops just that part.
//!
//! # Unchanged TOAST values
//!
//! Large values live out of line in TOAST storage. When an UPDATE does not touch such a
//! column, the WAL does not contain the value and pgoutput sends the column as "unchanged"
//! ([`ColumnValue::UnchangedToast`]) instead of its contents. That is not NULL: the consumer
//! must keep the value it already has. It shows up in new tuples; an old tuple logged under
//! `REPLICA IDENTITY FULL` has its TOAST values inlined by the server.
//!
//! # Choices made here
//!
//! - Every message has a fixed layout and the documentation never allows extra bytes after
//!   it, so trailing bytes are an error ([`DecodeError::TrailingBytes`]): they mean a framing
//!   bug or a protocol version we did not ask for, and guessing would risk applying garbage.
//!   Only XLogData's payload runs to the end of the CopyData message by definition.
//! - Messages of protocol versions 3 and 4 (two-phase commit, parallel apply) are never
//!   requested, so their tags are unknown tags.
//! - Names and text values are taken as UTF-8 where they become `String`s; the server
//!   converts them to the connection's `client_encoding`, which must therefore be `UTF8`.
//!
//! [streaming replication protocol]: https://www.postgresql.org/docs/15/protocol-replication.html
//!
//! References: [Logical Streaming Replication Protocol](https://www.postgresql.org/docs/15/protocol-logical-replication.html),
//! [Logical Replication Message Formats](https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html).

mod pgoutput;
mod reader;
mod replication;
mod spill;
mod transaction;

pub use pgoutput::{
    Begin, ColumnValue, Commit, Delete, Insert, LogicalDecodingMessage, LogicalMessage, OldTuple,
    Origin, PgOutputDecoder, Relation, RelationColumn, ReplicaIdentity, StreamAbort, StreamCommit,
    StreamStart, Truncate, TupleData, TypeMessage, Update,
};
pub use replication::{
    decode_replication_message, encode_standby_status_update, pg_micros_to_unix_micros,
    unix_micros_to_pg_micros, ReplicationMessage, PG_EPOCH_UNIX_MICROS,
};
pub use spill::SpilledChanges;
pub use transaction::{Assembled, Transaction, TransactionAssembler, DEFAULT_MEMORY_LIMIT};

/// Why a replication message could not be decoded or did not fit the message flow.
///
/// Every variant but [`DecodeError::Spill`] is a protocol violation (or a bug on our side);
/// none is a transient fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field was complete.
    #[error("truncated {what}: needed {needed} bytes, {available} available")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    /// A tag byte that the protocol versions we speak do not define.
    #[error("unknown {context} tag {:?} ({tag:#04x})", char::from(*.tag))]
    UnknownTag { context: &'static str, tag: u8 },
    /// A name that is not UTF-8 (is the connection's `client_encoding` UTF8?).
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        what: &'static str,
        #[source]
        source: std::str::Utf8Error,
    },
    /// A string field without its terminating NUL byte.
    #[error("{what} has no terminating NUL byte")]
    MissingNul { what: &'static str },
    /// A length or count field that was negative.
    #[error("negative {what}: {length}")]
    NegativeLength { what: &'static str, length: i32 },
    /// Bytes left over after a message that has a fixed layout.
    #[error("{count} unexpected bytes after {what}")]
    TrailingBytes { what: &'static str, count: usize },
    /// A well-formed message that cannot occur at this point of the message flow.
    #[error("unexpected {message}: {reason}")]
    Unexpected {
        message: &'static str,
        reason: String,
    },
    /// The disk failed a transaction spilled past the memory limit: not a protocol
    /// violation, but the transaction cannot be assembled without it.
    #[error("{action} the spill file of a large transaction failed: {reason}")]
    Spill {
        action: &'static str,
        reason: String,
        /// The disk (or the quota) was full: that often passes (another process's files go,
        /// a volume grows), so the session is retried; any other failure stops usersync.
        full: bool,
    },
}
