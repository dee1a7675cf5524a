//! The messages of the built-in `pgoutput` plugin, protocol versions 1 and 2, as laid out in
//! [Logical Replication Message Formats](https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html).
//!
//! Each XLogData payload is exactly one message: a tag byte, then fixed fields. Column values
//! stay views of the payload; only names are copied into `String`s.

use bytes::Bytes;

use super::reader::Reader;
use super::DecodeError;
use crate::lsn::Lsn;

const BEGIN: u8 = b'B';
const COMMIT: u8 = b'C';
const ORIGIN: u8 = b'O';
const RELATION: u8 = b'R';
const TYPE: u8 = b'Y';
const INSERT: u8 = b'I';
const UPDATE: u8 = b'U';
const DELETE: u8 = b'D';
const TRUNCATE: u8 = b'T';
const MESSAGE: u8 = b'M';
const STREAM_START: u8 = b'S';
const STREAM_STOP: u8 = b'E';
const STREAM_COMMIT: u8 = b'c';
const STREAM_ABORT: u8 = b'A';

/// Marks the tuple that follows as the new row (Insert, Update).
const NEW_TUPLE: u8 = b'N';
/// Marks the tuple that follows as the old replica identity key (Update, Delete).
const KEY_TUPLE: u8 = b'K';
/// Marks the tuple that follows as the whole old row, under `REPLICA IDENTITY FULL`.
const OLD_TUPLE: u8 = b'O';

const COLUMN_NULL: u8 = b'n';
const COLUMN_UNCHANGED_TOAST: u8 = b'u';
const COLUMN_TEXT: u8 = b't';
const COLUMN_BINARY: u8 = b'b';

const IDENTITY_DEFAULT: u8 = b'd';
const IDENTITY_NOTHING: u8 = b'n';
const IDENTITY_FULL: u8 = b'f';
const IDENTITY_INDEX: u8 = b'i';

/// Relation column flag: the column is part of the replica identity key.
const COLUMN_FLAG_KEY: u8 = 1;
/// Truncate option bit for `TRUNCATE ... CASCADE`.
const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit for `TRUNCATE ... RESTART IDENTITY`.
const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Message flag bit: the message was emitted with `transactional = true`.
const MESSAGE_TRANSACTIONAL: u8 = 1;

/// The smallest Relation column on the wire: flags, an empty name's NUL, type OID, modifier.
/// Counts from the wire only size allocations up to what the rest of the message can hold.
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
/// The smallest tuple column on the wire: its kind byte alone (null or unchanged TOAST).
const MIN_TUPLE_COLUMN_LEN: usize = 1;
/// A relation OID in a Truncate message.
const RELATION_ID_LEN: usize = 4;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalDecodingMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

impl LogicalMessage {
    /// The message's name as the PostgreSQL documentation spells it, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Begin(_) => "Begin",
            Self::Commit(_) => "Commit",
            Self::Origin(_) => "Origin",
            Self::Relation(_) => "Relation",
            Self::Type(_) => "Type",
            Self::Insert(_) => "Insert",
            Self::Update(_) => "Update",
            Self::Delete(_) => "Delete",
            Self::Truncate(_) => "Truncate",
            Self::Message(_) => "Message",
            Self::StreamStart(_) => "Stream Start",
            Self::StreamStop => "Stream Stop",
            Self::StreamCommit(_) => "Stream Commit",
            Self::StreamAbort(_) => "Stream Abort",
        }
    }
}

/// Start of a transaction sent whole after it committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The commit record's LSN; the matching Commit repeats it as `commit_lsn`.
    pub final_lsn: Lsn,
    /// Microseconds since the PostgreSQL epoch.
    pub commit_time_micros: i64,
    pub xid: u32,
}

/// End of a transaction opened by [`Begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently unused by PostgreSQL.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is applied.
    pub end_lsn: Lsn,
    /// Microseconds since the PostgreSQL epoch.
    pub commit_time_micros: i64,
}

/// The replication origin a transaction came from, sent after Begin when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// A table's shape, sent before the first change to it (and again after it changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    /// The table's OID, which later changes refer to.
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// A table's `REPLICA IDENTITY` setting: what the old tuple of an Update or Delete contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key columns.
    Default,
    /// Nothing: updates and deletes cannot be published.
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    fn from_tag(tag: u8) -> Result<Self, DecodeError> {
        match tag {
            IDENTITY_DEFAULT => Ok(Self::Default),
            IDENTITY_NOTHING => Ok(Self::Nothing),
            IDENTITY_FULL => Ok(Self::Full),
            IDENTITY_INDEX => Ok(Self::Index),
            tag => Err(DecodeError::UnknownTag {
                context: "replica identity",
                tag,
            }),
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, for example a `varchar`'s length; -1 when there is none.
    pub type_modifier: i32,
}

/// A data type's name, sent before a change that uses a non-built-in type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    pub id: u32,
    pub namespace: String,
    pub name: String,
}

/// A new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub new: TupleData,
}

/// A changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    pub relation_id: u32,
    /// Present when the update changed a key column, and always under `REPLICA IDENTITY
    /// FULL`; otherwise the key is unchanged and found in `new`.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

/// A removed row, identified by its replica identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub old: OldTuple,
}

/// `TRUNCATE` of one or more tables in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// The (sub)transaction's xid; present only inside a stream block.
    pub xid: Option<u32>,
    /// Transactional messages arrive inside their transaction; others as soon as decoded.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Opens a block of changes of an in-progress transaction (protocol 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction's xid.
    pub xid: u32,
    /// The first block of this transaction.
    pub first_segment: bool,
}

/// A streamed transaction committed (protocol 2); sent outside any stream block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    /// Currently unused by PostgreSQL.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is applied.
    pub end_lsn: Lsn,
    /// Microseconds since the PostgreSQL epoch.
    pub commit_time_micros: i64,
}

/// A streamed transaction, or one of its subtransactions, rolled back (protocol 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    /// Equal to `xid` when the whole transaction aborted.
    pub subxid: u32,
}

/// The old row of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns are meaningful; the others are null.
    Key(TupleData),
    /// The whole row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

/// A row's columns, in the order of the [`Relation`]'s columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleData(pub Vec<ColumnValue>);

/// One column of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    Null,
    /// A TOASTed value the change did not touch and the server did not send: keep the old one.
    UnchangedToast,
    /// The type's text output, in the connection's `client_encoding`.
    Text(Bytes),
    /// The type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

/// Decodes pgoutput messages, remembering whether a stream block is open.
///
/// Inside a block (protocol 2) change messages carry an extra xid, so the same bytes mean
/// different things depending on what came before; see the [module essay](super).
#[derive(Debug, Default)]
pub struct PgOutputDecoder {
    in_stream: bool,
}

impl PgOutputDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes a change read back from a spill file: `in_stream` says whether it came inside
    /// a stream block.
    pub fn decode_spilled(data: Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
        PgOutputDecoder { in_stream }.decode(data)
    }

    /// Decodes one XLogData payload. A message that fails to decode leaves the state as it was.
    pub fn decode(&mut self, data: Bytes) -> Result<LogicalMessage, DecodeError> {
        let mut reader = Reader::new(data);
        let in_stream = self.in_stream;
        let message = match reader.u8("pgoutput message tag")? {
            BEGIN => LogicalMessage::Begin(Begin::decode(&mut reader)?),
            COMMIT => LogicalMessage::Commit(Commit::decode(&mut reader)?),
            ORIGIN => LogicalMessage::Origin(Origin::decode(&mut reader)?),
            RELATION => LogicalMessage::Relation(Relation::decode(&mut reader, in_stream)?),
            TYPE => LogicalMessage::Type(TypeMessage::decode(&mut reader, in_stream)?),
            INSERT => LogicalMessage::Insert(Insert::decode(&mut reader, in_stream)?),
            UPDATE => LogicalMessage::Update(Update::decode(&mut reader, in_stream)?),
            DELETE => LogicalMessage::Delete(Delete::decode(&mut reader, in_stream)?),
            TRUNCATE => LogicalMessage::Truncate(Truncate::decode(&mut reader, in_stream)?),
            MESSAGE => {
                LogicalMessage::Message(LogicalDecodingMessage::decode(&mut reader, in_stream)?)
            }
            STREAM_START => LogicalMessage::StreamStart(StreamStart::decode(&mut reader)?),
            STREAM_STOP => LogicalMessage::StreamStop,
            STREAM_COMMIT => LogicalMessage::StreamCommit(StreamCommit::decode(&mut reader)?),
            STREAM_ABORT => LogicalMessage::StreamAbort(StreamAbort::decode(&mut reader)?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "pgoutput message",
                    tag,
                })
            }
        };
        reader.finish(message.kind())?;
        match (&message, in_stream) {
            (LogicalMessage::StreamStart(start), true) => {
                return Err(DecodeError::Unexpected {
                    message: "Stream Start",
                    reason: format!("xid {} while a stream block is open", start.xid),
                });
            }
            (LogicalMessage::StreamStop, false) => {
                return Err(DecodeError::Unexpected {
                    message: "Stream Stop",
                    reason: "no stream block is open".to_owned(),
                });
            }
            (LogicalMessage::StreamStart(_), false) => self.in_stream = true,
            (LogicalMessage::StreamStop, true) => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }
}

/// Reads the xid that messages carry only inside a stream block.
fn streamed_xid(
    reader: &mut Reader,
    in_stream: bool,
    what: &'static str,
) -> Result<Option<u32>, DecodeError> {
    if in_stream {
        reader.u32(what).map(Some)
    } else {
        Ok(None)
    }
}

/// A count from the wire as a `usize`, rejecting negative values.
fn count(length: i32, what: &'static str) -> Result<usize, DecodeError> {
    usize::try_from(length).map_err(|_| DecodeError::NegativeLength { what, length })
}

/// Reads a tuple marker byte that must be `expected`.
fn expect_marker(reader: &mut Reader, expected: u8, what: &'static str) -> Result<(), DecodeError> {
    match reader.u8(what)? {
        tag if tag == expected => Ok(()),
        tag => Err(DecodeError::UnknownTag { context: what, tag }),
    }
}

impl Begin {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            final_lsn: reader.lsn("Begin final LSN")?,
            commit_time_micros: reader.i64("Begin commit time")?,
            xid: reader.u32("Begin xid")?,
        })
    }
}

impl Commit {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            flags: reader.u8("Commit flags")?,
            commit_lsn: reader.lsn("Commit LSN")?,
            end_lsn: reader.lsn("Commit end LSN")?,
            commit_time_micros: reader.i64("Commit time")?,
        })
    }
}

impl Origin {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            commit_lsn: reader.lsn("Origin commit LSN")?,
            name: reader.string("Origin name")?,
        })
    }
}

impl Relation {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        let xid = streamed_xid(reader, in_stream, "Relation xid")?;
        let id = reader.u32("Relation id")?;
        let namespace = reader.string("Relation namespace")?;
        let name = reader.string("Relation name")?;
        let replica_identity = ReplicaIdentity::from_tag(reader.u8("Relation replica identity")?)?;
        let column_count = count(
            reader.i16("Relation column count")?.into(),
            "Relation column count",
        )?;
        let mut columns =
            Vec::with_capacity(column_count.min(reader.remaining() / MIN_RELATION_COLUMN_LEN));
        for _ in 0..column_count {
            columns.push(RelationColumn {
                is_key: reader.u8("Relation column flags")? & COLUMN_FLAG_KEY != 0,
                name: reader.string("Relation column name")?,
                type_oid: reader.u32("Relation column type OID")?,
                type_modifier: reader.i32("Relation column type modifier")?,
            });
        }
        Ok(Self {
            xid,
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}

impl TypeMessage {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        Ok(Self {
            xid: streamed_xid(reader, in_stream, "Type xid")?,
            id: reader.u32("Type id")?,
            namespace: reader.string("Type namespace")?,
            name: reader.string("Type name")?,
        })
    }
}

impl Insert {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        let xid = streamed_xid(reader, in_stream, "Insert xid")?;
        let relation_id = reader.u32("Insert relation id")?;
        expect_marker(reader, NEW_TUPLE, "Insert tuple marker")?;
        Ok(Self {
            xid,
            relation_id,
            new: TupleData::decode(reader)?,
        })
    }
}

impl Update {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        let xid = streamed_xid(reader, in_stream, "Update xid")?;
        let relation_id = reader.u32("Update relation id")?;
        let old = match reader.u8("Update tuple marker")? {
            KEY_TUPLE => Some(OldTuple::Key(TupleData::decode(reader)?)),
            OLD_TUPLE => Some(OldTuple::Full(TupleData::decode(reader)?)),
            NEW_TUPLE => None,
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "Update tuple marker",
                    tag,
                })
            }
        };
        if old.is_some() {
            expect_marker(reader, NEW_TUPLE, "Update new tuple marker")?;
        }
        Ok(Self {
            xid,
            relation_id,
            old,
            new: TupleData::decode(reader)?,
        })
    }
}

impl Delete {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        let xid = streamed_xid(reader, in_stream, "Delete xid")?;
        let relation_id = reader.u32("Delete relation id")?;
        let old = match reader.u8("Delete tuple marker")? {
            KEY_TUPLE => OldTuple::Key(TupleData::decode(reader)?),
            OLD_TUPLE => OldTuple::Full(TupleData::decode(reader)?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "Delete tuple marker",
                    tag,
                })
            }
        };
        Ok(Self {
            xid,
            relation_id,
            old,
        })
    }
}

impl Truncate {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        let xid = streamed_xid(reader, in_stream, "Truncate xid")?;
        let relation_count = count(
            reader.i32("Truncate relation count")?,
            "Truncate relation count",
        )?;
        let options = reader.u8("Truncate options")?;
        let mut relation_ids =
            Vec::with_capacity(relation_count.min(reader.remaining() / RELATION_ID_LEN));
        for _ in 0..relation_count {
            relation_ids.push(reader.u32("Truncate relation id")?);
        }
        Ok(Self {
            xid,
            cascade: options & TRUNCATE_CASCADE != 0,
            restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
            relation_ids,
        })
    }
}

impl LogicalDecodingMessage {
    fn decode(reader: &mut Reader, in_stream: bool) -> Result<Self, DecodeError> {
        Ok(Self {
            xid: streamed_xid(reader, in_stream, "Message xid")?,
            transactional: reader.u8("Message flags")? & MESSAGE_TRANSACTIONAL != 0,
            lsn: reader.lsn("Message LSN")?,
            prefix: reader.string("Message prefix")?,
            content: reader.length_prefixed("Message content")?,
        })
    }
}

impl StreamStart {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            xid: reader.u32("Stream Start xid")?,
            first_segment: reader.u8("Stream Start first segment")? != 0,
        })
    }
}

impl StreamCommit {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            xid: reader.u32("Stream Commit xid")?,
            flags: reader.u8("Stream Commit flags")?,
            commit_lsn: reader.lsn("Stream Commit LSN")?,
            end_lsn: reader.lsn("Stream Commit end LSN")?,
            commit_time_micros: reader.i64("Stream Commit time")?,
        })
    }
}

impl StreamAbort {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Ok(Self {
            xid: reader.u32("Stream Abort xid")?,
            subxid: reader.u32("Stream Abort subxid")?,
        })
    }
}

impl TupleData {
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        let column_count = count(
            reader.i16("tuple column count")?.into(),
            "tuple column count",
        )?;
        let mut values =
            Vec::with_capacity(column_count.min(reader.remaining() / MIN_TUPLE_COLUMN_LEN));
        for _ in 0..column_count {
            values.push(match reader.u8("column kind")? {
                COLUMN_NULL => ColumnValue::Null,
                COLUMN_UNCHANGED_TOAST => ColumnValue::UnchangedToast,
                COLUMN_TEXT => ColumnValue::Text(reader.length_prefixed("text column value")?),
                COLUMN_BINARY => {
                    ColumnValue::Binary(reader.length_prefixed("binary column value")?)
                }
                tag => {
                    return Err(DecodeError::UnknownTag {
                        context: "column kind",
                        tag,
                    })
                }
            });
        }
        Ok(Self(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    const XID: u32 = 700;
    const SUBXID: u32 = 701;

    /// A test-only encoder: builds messages field by field, the way pgoutput writes them.
    struct Wire(BytesMut);

    impl Wire {
        fn new(tag: u8) -> Self {
            let mut buf = BytesMut::new();
            buf.put_u8(tag);
            Self(buf)
        }

        fn u8(mut self, value: u8) -> Self {
            self.0.put_u8(value);
            self
        }

        fn i16(mut self, value: i16) -> Self {
            self.0.put_i16(value);
            self
        }

        fn i32(mut self, value: i32) -> Self {
            self.0.put_i32(value);
            self
        }

        fn u32(mut self, value: u32) -> Self {
            self.0.put_u32(value);
            self
        }

        fn i64(mut self, value: i64) -> Self {
            self.0.put_i64(value);
            self
        }

        fn u64(mut self, value: u64) -> Self {
            self.0.put_u64(value);
            self
        }

        fn xid(self, xid: Option<u32>) -> Self {
            match xid {
                Some(xid) => self.u32(xid),
                None => self,
            }
        }

        fn string(mut self, value: &str) -> Self {
            self.0.put_slice(value.as_bytes());
            self.0.put_u8(0);
            self
        }

        fn counted(mut self, value: &[u8]) -> Self {
            self.0.put_i32(value.len().try_into().unwrap());
            self.0.put_slice(value);
            self
        }

        fn tuple(mut self, tuple: &TupleData) -> Self {
            self = self.i16(tuple.0.len().try_into().unwrap());
            for value in &tuple.0 {
                self = match value {
                    ColumnValue::Null => self.u8(COLUMN_NULL),
                    ColumnValue::UnchangedToast => self.u8(COLUMN_UNCHANGED_TOAST),
                    ColumnValue::Text(text) => self.u8(COLUMN_TEXT).counted(text),
                    ColumnValue::Binary(binary) => self.u8(COLUMN_BINARY).counted(binary),
                };
            }
            self
        }

        fn build(self) -> Bytes {
            self.0.freeze()
        }
    }

    fn text(value: &'static str) -> ColumnValue {
        ColumnValue::Text(Bytes::from_static(value.as_bytes()))
    }

    fn row() -> TupleData {
        TupleData(vec![
            text("42"),
            ColumnValue::Null,
            ColumnValue::UnchangedToast,
            ColumnValue::Binary(Bytes::from_static(&[0, 0, 0, 7])),
            text(""),
        ])
    }

    fn key() -> TupleData {
        TupleData(vec![
            text("42"),
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
        ])
    }

    fn decoder_in_stream() -> PgOutputDecoder {
        let mut decoder = PgOutputDecoder::new();
        decoder
            .decode(Wire::new(STREAM_START).u32(XID).u8(1).build())
            .unwrap();
        decoder
    }

    /// Messages that carry the optional xid, encoded with `xid`, and what they decode to.
    fn change_samples(xid: Option<u32>) -> Vec<(Bytes, LogicalMessage)> {
        vec![
            (
                Wire::new(RELATION)
                    .xid(xid)
                    .u32(16_384)
                    .string("public")
                    .string("users")
                    .u8(IDENTITY_DEFAULT)
                    .i16(2)
                    .u8(COLUMN_FLAG_KEY)
                    .string("id")
                    .u32(25)
                    .i32(-1)
                    .u8(0)
                    .string("name")
                    .u32(1043)
                    .i32(68)
                    .build(),
                LogicalMessage::Relation(Relation {
                    xid,
                    id: 16_384,
                    namespace: "public".into(),
                    name: "users".into(),
                    replica_identity: ReplicaIdentity::Default,
                    columns: vec![
                        RelationColumn {
                            is_key: true,
                            name: "id".into(),
                            type_oid: 25,
                            type_modifier: -1,
                        },
                        RelationColumn {
                            is_key: false,
                            name: "name".into(),
                            type_oid: 1043,
                            type_modifier: 68,
                        },
                    ],
                }),
            ),
            (
                Wire::new(TYPE)
                    .xid(xid)
                    .u32(90_001)
                    .string("public")
                    .string("mood")
                    .build(),
                LogicalMessage::Type(TypeMessage {
                    xid,
                    id: 90_001,
                    namespace: "public".into(),
                    name: "mood".into(),
                }),
            ),
            (
                Wire::new(INSERT)
                    .xid(xid)
                    .u32(16_384)
                    .u8(NEW_TUPLE)
                    .tuple(&row())
                    .build(),
                LogicalMessage::Insert(Insert {
                    xid,
                    relation_id: 16_384,
                    new: row(),
                }),
            ),
            (
                Wire::new(UPDATE)
                    .xid(xid)
                    .u32(16_384)
                    .u8(NEW_TUPLE)
                    .tuple(&row())
                    .build(),
                LogicalMessage::Update(Update {
                    xid,
                    relation_id: 16_384,
                    old: None,
                    new: row(),
                }),
            ),
            (
                Wire::new(UPDATE)
                    .xid(xid)
                    .u32(16_384)
                    .u8(KEY_TUPLE)
                    .tuple(&key())
                    .u8(NEW_TUPLE)
                    .tuple(&row())
                    .build(),
                LogicalMessage::Update(Update {
                    xid,
                    relation_id: 16_384,
                    old: Some(OldTuple::Key(key())),
                    new: row(),
                }),
            ),
            (
                Wire::new(UPDATE)
                    .xid(xid)
                    .u32(16_384)
                    .u8(OLD_TUPLE)
                    .tuple(&row())
                    .u8(NEW_TUPLE)
                    .tuple(&TupleData(vec![]))
                    .build(),
                LogicalMessage::Update(Update {
                    xid,
                    relation_id: 16_384,
                    old: Some(OldTuple::Full(row())),
                    new: TupleData(vec![]),
                }),
            ),
            (
                Wire::new(DELETE)
                    .xid(xid)
                    .u32(16_384)
                    .u8(KEY_TUPLE)
                    .tuple(&key())
                    .build(),
                LogicalMessage::Delete(Delete {
                    xid,
                    relation_id: 16_384,
                    old: OldTuple::Key(key()),
                }),
            ),
            (
                Wire::new(DELETE)
                    .xid(xid)
                    .u32(16_384)
                    .u8(OLD_TUPLE)
                    .tuple(&row())
                    .build(),
                LogicalMessage::Delete(Delete {
                    xid,
                    relation_id: 16_384,
                    old: OldTuple::Full(row()),
                }),
            ),
            (
                Wire::new(TRUNCATE)
                    .xid(xid)
                    .i32(3)
                    .u8(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY)
                    .u32(16_384)
                    .u32(16_390)
                    .u32(16_400)
                    .build(),
                LogicalMessage::Truncate(Truncate {
                    xid,
                    cascade: true,
                    restart_identity: true,
                    relation_ids: vec![16_384, 16_390, 16_400],
                }),
            ),
            (
                Wire::new(TRUNCATE)
                    .xid(xid)
                    .i32(1)
                    .u8(TRUNCATE_RESTART_IDENTITY)
                    .u32(16_384)
                    .build(),
                LogicalMessage::Truncate(Truncate {
                    xid,
                    cascade: false,
                    restart_identity: true,
                    relation_ids: vec![16_384],
                }),
            ),
            (
                Wire::new(MESSAGE)
                    .xid(xid)
                    .u8(MESSAGE_TRANSACTIONAL)
                    .u64(0x16_0000_0100)
                    .string("usersync")
                    .counted(b"hello")
                    .build(),
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional: true,
                    lsn: Lsn(0x16_0000_0100),
                    prefix: "usersync".into(),
                    content: Bytes::from_static(b"hello"),
                }),
            ),
            (
                Wire::new(MESSAGE)
                    .xid(xid)
                    .u8(0)
                    .u64(0x16_0000_0200)
                    .string("heartbeat")
                    .counted(b"")
                    .build(),
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional: false,
                    lsn: Lsn(0x16_0000_0200),
                    prefix: "heartbeat".into(),
                    content: Bytes::new(),
                }),
            ),
        ]
    }

    /// Messages whose layout does not depend on being in a stream block, decoded outside one.
    fn control_samples() -> Vec<(Bytes, LogicalMessage)> {
        vec![
            (
                Wire::new(BEGIN)
                    .u64(0x16_0000_1000)
                    .i64(757_000_000_000_000)
                    .u32(XID)
                    .build(),
                LogicalMessage::Begin(Begin {
                    final_lsn: Lsn(0x16_0000_1000),
                    commit_time_micros: 757_000_000_000_000,
                    xid: XID,
                }),
            ),
            (
                Wire::new(COMMIT)
                    .u8(0)
                    .u64(0x16_0000_1000)
                    .u64(0x16_0000_1030)
                    .i64(757_000_000_000_001)
                    .build(),
                LogicalMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: Lsn(0x16_0000_1000),
                    end_lsn: Lsn(0x16_0000_1030),
                    commit_time_micros: 757_000_000_000_001,
                }),
            ),
            (
                Wire::new(ORIGIN)
                    .u64(0x10_0000_0000)
                    .string("pg_16385")
                    .build(),
                LogicalMessage::Origin(Origin {
                    commit_lsn: Lsn(0x10_0000_0000),
                    name: "pg_16385".into(),
                }),
            ),
            (
                Wire::new(STREAM_START).u32(XID).u8(0).build(),
                LogicalMessage::StreamStart(StreamStart {
                    xid: XID,
                    first_segment: false,
                }),
            ),
            (
                Wire::new(STREAM_COMMIT)
                    .u32(XID)
                    .u8(0)
                    .u64(0x16_0000_2000)
                    .u64(0x16_0000_2030)
                    .i64(-1)
                    .build(),
                LogicalMessage::StreamCommit(StreamCommit {
                    xid: XID,
                    flags: 0,
                    commit_lsn: Lsn(0x16_0000_2000),
                    end_lsn: Lsn(0x16_0000_2030),
                    commit_time_micros: -1,
                }),
            ),
            (
                Wire::new(STREAM_ABORT).u32(XID).u32(SUBXID).build(),
                LogicalMessage::StreamAbort(StreamAbort {
                    xid: XID,
                    subxid: SUBXID,
                }),
            ),
        ]
    }

    /// A valid message, whether it must be decoded inside a stream block, and its meaning.
    struct Sample {
        in_stream: bool,
        bytes: Bytes,
        expected: LogicalMessage,
    }

    impl Sample {
        fn decoder(&self) -> PgOutputDecoder {
            if self.in_stream {
                decoder_in_stream()
            } else {
                PgOutputDecoder::new()
            }
        }
    }

    fn all_samples() -> Vec<Sample> {
        let outside = control_samples()
            .into_iter()
            .chain(change_samples(None))
            .map(|(bytes, expected)| Sample {
                in_stream: false,
                bytes,
                expected,
            });
        let inside = change_samples(Some(SUBXID))
            .into_iter()
            .chain([(Wire::new(STREAM_STOP).build(), LogicalMessage::StreamStop)])
            .map(|(bytes, expected)| Sample {
                in_stream: true,
                bytes,
                expected,
            });
        outside.chain(inside).collect()
    }

    #[test]
    fn decodes_every_message_type() {
        for sample in all_samples() {
            assert_eq!(
                sample.decoder().decode(sample.bytes.clone()),
                Ok(sample.expected)
            );
        }
    }

    #[test]
    fn every_truncated_message_is_an_error() {
        for sample in all_samples() {
            for len in 0..sample.bytes.len() {
                let result = sample.decoder().decode(sample.bytes.slice(..len));
                assert!(
                    matches!(
                        result,
                        Err(DecodeError::Truncated { .. } | DecodeError::MissingNul { .. })
                    ),
                    "{} cut to {len} bytes: {result:?}",
                    sample.expected.kind()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for sample in all_samples() {
            let mut longer = BytesMut::from(&sample.bytes[..]);
            longer.put_u8(0);
            assert_eq!(
                sample.decoder().decode(longer.freeze()),
                Err(DecodeError::TrailingBytes {
                    what: sample.expected.kind(),
                    count: 1
                })
            );
        }
    }

    #[test]
    fn change_messages_read_an_xid_only_inside_a_stream_block() {
        let mut decoder = PgOutputDecoder::new();
        let (outside, _) = &change_samples(None)[2];
        let (inside, _) = &change_samples(Some(SUBXID))[2];
        // Read with the wrong layout, each is garbage: too long, or too short.
        assert!(decoder.decode(inside.clone()).is_err());
        assert!(decoder_in_stream().decode(outside.clone()).is_err());

        decoder
            .decode(Wire::new(STREAM_START).u32(XID).u8(1).build())
            .unwrap();
        assert!(matches!(
            decoder.decode(inside.clone()),
            Ok(LogicalMessage::Insert(Insert {
                xid: Some(SUBXID),
                ..
            }))
        ));
        assert_eq!(
            decoder.decode(Wire::new(STREAM_STOP).build()),
            Ok(LogicalMessage::StreamStop)
        );
        assert!(matches!(
            decoder.decode(outside.clone()),
            Ok(LogicalMessage::Insert(Insert { xid: None, .. }))
        ));
    }

    #[test]
    fn stream_blocks_do_not_nest() {
        let mut decoder = PgOutputDecoder::new();
        assert!(matches!(
            decoder.decode(Wire::new(STREAM_STOP).build()),
            Err(DecodeError::Unexpected {
                message: "Stream Stop",
                ..
            })
        ));
        let start = Wire::new(STREAM_START).u32(XID).u8(1).build();
        decoder.decode(start.clone()).unwrap();
        assert!(matches!(
            decoder.decode(start),
            Err(DecodeError::Unexpected {
                message: "Stream Start",
                ..
            })
        ));
        // The failed Stream Start left the block open.
        assert!(decoder.decode(Wire::new(STREAM_STOP).build()).is_ok());
    }

    #[test]
    fn a_failed_decode_keeps_the_stream_state() {
        let mut decoder = decoder_in_stream();
        let stop_with_garbage = Wire::new(STREAM_STOP).u8(0).build();
        assert!(decoder.decode(stop_with_garbage).is_err());
        let (inside, _) = &change_samples(Some(SUBXID))[2];
        assert!(decoder.decode(inside.clone()).is_ok());
    }

    #[test]
    fn column_values_are_views_of_the_input() {
        let (bytes, _) = &change_samples(None)[2];
        let Ok(LogicalMessage::Insert(insert)) = PgOutputDecoder::new().decode(bytes.clone())
        else {
            panic!("not an Insert");
        };
        let ColumnValue::Text(value) = &insert.new.0[0] else {
            panic!("not text");
        };
        let input = bytes.as_ptr_range();
        assert!(input.contains(&value.as_ptr()));
    }

    #[test]
    fn rejects_unknown_tags() {
        let mut decoder = PgOutputDecoder::new();
        // 'P' is protocol 3's Prepare, which we never ask for.
        assert_eq!(
            decoder.decode(Wire::new(b'P').build()),
            Err(DecodeError::UnknownTag {
                context: "pgoutput message",
                tag: b'P'
            })
        );
        let bad_identity = Wire::new(RELATION)
            .u32(1)
            .string("s")
            .string("t")
            .u8(b'x')
            .i16(0)
            .build();
        assert!(matches!(
            decoder.decode(bad_identity),
            Err(DecodeError::UnknownTag {
                context: "replica identity",
                tag: b'x'
            })
        ));
        let bad_column_kind = Wire::new(INSERT)
            .u32(1)
            .u8(NEW_TUPLE)
            .i16(1)
            .u8(b'z')
            .build();
        assert!(matches!(
            decoder.decode(bad_column_kind),
            Err(DecodeError::UnknownTag {
                context: "column kind",
                tag: b'z'
            })
        ));
        let insert_with_key = Wire::new(INSERT).u32(1).u8(KEY_TUPLE).tuple(&key()).build();
        assert!(matches!(
            decoder.decode(insert_with_key),
            Err(DecodeError::UnknownTag {
                context: "Insert tuple marker",
                tag: KEY_TUPLE
            })
        ));
        let update_without_new = Wire::new(UPDATE)
            .u32(1)
            .u8(KEY_TUPLE)
            .tuple(&key())
            .u8(KEY_TUPLE)
            .tuple(&key())
            .build();
        assert!(matches!(
            decoder.decode(update_without_new),
            Err(DecodeError::UnknownTag {
                context: "Update new tuple marker",
                tag: KEY_TUPLE
            })
        ));
        let update_bad_marker = Wire::new(UPDATE).u32(1).u8(b'X').build();
        assert!(matches!(
            decoder.decode(update_bad_marker),
            Err(DecodeError::UnknownTag {
                context: "Update tuple marker",
                ..
            })
        ));
        let delete_with_new = Wire::new(DELETE).u32(1).u8(NEW_TUPLE).tuple(&row()).build();
        assert!(matches!(
            decoder.decode(delete_with_new),
            Err(DecodeError::UnknownTag {
                context: "Delete tuple marker",
                tag: NEW_TUPLE
            })
        ));
    }

    #[test]
    fn rejects_negative_lengths_and_counts() {
        let mut decoder = PgOutputDecoder::new();
        let negative_value = Wire::new(INSERT)
            .u32(1)
            .u8(NEW_TUPLE)
            .i16(1)
            .u8(COLUMN_TEXT)
            .i32(-1)
            .build();
        assert_eq!(
            decoder.decode(negative_value),
            Err(DecodeError::NegativeLength {
                what: "text column value",
                length: -1
            })
        );
        let negative_columns = Wire::new(INSERT).u32(1).u8(NEW_TUPLE).i16(-2).build();
        assert_eq!(
            decoder.decode(negative_columns),
            Err(DecodeError::NegativeLength {
                what: "tuple column count",
                length: -2
            })
        );
        let negative_relations = Wire::new(TRUNCATE).i32(i32::MIN).u8(0).build();
        assert!(matches!(
            decoder.decode(negative_relations),
            Err(DecodeError::NegativeLength {
                length: i32::MIN,
                ..
            })
        ));
    }

    #[test]
    fn huge_counts_fail_without_huge_allocations() {
        let mut decoder = PgOutputDecoder::new();
        let truncate = Wire::new(TRUNCATE).i32(i32::MAX).u8(0).u32(1).build();
        assert!(matches!(
            decoder.decode(truncate),
            Err(DecodeError::Truncated {
                what: "Truncate relation id",
                ..
            })
        ));
        let relation = Wire::new(RELATION)
            .u32(1)
            .string("s")
            .string("t")
            .u8(IDENTITY_FULL)
            .i16(i16::MAX)
            .build();
        assert!(matches!(
            decoder.decode(relation),
            Err(DecodeError::Truncated {
                what: "Relation column flags",
                ..
            })
        ));
    }

    #[test]
    fn names_must_be_utf8() {
        let origin = Wire::new(ORIGIN).u64(1).u8(0xC3).u8(0x28).u8(0).build();
        assert!(matches!(
            PgOutputDecoder::new().decode(origin),
            Err(DecodeError::InvalidUtf8 {
                what: "Origin name",
                ..
            })
        ));
    }

    #[test]
    fn empty_input_is_truncated() {
        assert_eq!(
            PgOutputDecoder::new().decode(Bytes::new()),
            Err(DecodeError::Truncated {
                what: "pgoutput message tag",
                needed: 1,
                available: 0
            })
        );
    }

    const TAGS: [u8; 14] = [
        BEGIN,
        COMMIT,
        ORIGIN,
        RELATION,
        TYPE,
        INSERT,
        UPDATE,
        DELETE,
        TRUNCATE,
        MESSAGE,
        STREAM_START,
        STREAM_STOP,
        STREAM_COMMIT,
        STREAM_ABORT,
    ];

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let _ = PgOutputDecoder::new().decode(Bytes::from(bytes.clone()));
            let _ = decoder_in_stream().decode(Bytes::from(bytes));
        }

        #[test]
        fn arbitrary_bodies_after_known_tags_never_panic(
            tag in proptest::sample::select(&TAGS[..]),
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut bytes = vec![tag];
            bytes.extend_from_slice(&body);
            let _ = PgOutputDecoder::new().decode(Bytes::from(bytes.clone()));
            let _ = decoder_in_stream().decode(Bytes::from(bytes));
        }

        #[test]
        fn prefixes_and_corruptions_of_valid_messages_never_panic(
            sample in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
            position in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let samples = all_samples();
            let bytes = &sample.get(&samples).bytes;
            let prefix = bytes.slice(..cut.index(bytes.len() + 1));
            let mut corrupted = bytes.to_vec();
            corrupted[position.index(bytes.len())] = byte;
            for input in [prefix, Bytes::from(corrupted)] {
                let _ = PgOutputDecoder::new().decode(input.clone());
                let _ = decoder_in_stream().decode(input);
            }
        }
    }
}
