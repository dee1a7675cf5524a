//! Both decoders' output in one form, with the wire's own encodings for flags and tags, so
//! that a field or flag that one decoder drops or reads differently shows up as a difference.

use std::fmt;

use bytes::Bytes;
use pg_walstream::{
    parse_keepalive_message, BufferReader, LogicalReplicationMessage as Theirs,
    StreamingReplicationMessage, TupleData as TheirTuple,
};
use usersync::decode::{
    decode_replication_message, ColumnValue, LogicalMessage, OldTuple, ReplicaIdentity,
    ReplicationMessage, TupleData,
};

/// A decoded pgoutput message in one form for both decoders, with the wire's own encodings
/// for flags and tags, so that a flag one decoder drops shows up as a difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Begin {
        final_lsn: u64,
        time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        time: i64,
    },
    Origin {
        lsn: u64,
        name: String,
    },
    Relation {
        xid: Option<u32>,
        id: u32,
        namespace: String,
        name: String,
        identity: u8,
        columns: Vec<Column>,
    },
    Type {
        xid: Option<u32>,
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        xid: Option<u32>,
        relation: u32,
        old: Option<OldRow>,
        new: Vec<Value>,
    },
    Delete {
        xid: Option<u32>,
        relation: u32,
        old: OldRow,
    },
    Truncate {
        xid: Option<u32>,
        flags: u8,
        relations: Vec<u32>,
    },
    Message {
        xid: Option<u32>,
        flags: u8,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        time: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
        /// Protocol 4 only (parallel apply), which we never ask for.
        abort_lsn_and_time: Option<(u64, i64)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// An old tuple with its tag: `K` (key) or `O` (whole row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRow {
    pub kind: u8,
    pub values: Vec<Value>,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

impl fmt::Debug for Value {
    /// Values of 10 kB would bury a difference: long ones show their length and ends.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, bytes) = match self {
            Value::Null => return f.write_str("Null"),
            Value::UnchangedToast => return f.write_str("UnchangedToast"),
            Value::Text(bytes) => ("Text", bytes),
            Value::Binary(bytes) => ("Binary", bytes),
        };
        if bytes.len() <= 80 {
            write!(f, "{kind}({:?})", bytes)
        } else {
            write!(
                f,
                "{kind}({} bytes: {:?}..{:?})",
                bytes.len(),
                bytes.slice(..32),
                bytes.slice(bytes.len() - 32..)
            )
        }
    }
}

impl Seen {
    /// Ours, in the common form.
    pub fn from_ours(message: &LogicalMessage) -> Seen {
        match message {
            LogicalMessage::Begin(m) => Seen::Begin {
                final_lsn: m.final_lsn.0,
                time: m.commit_time_micros,
                xid: m.xid,
            },
            LogicalMessage::Commit(m) => Seen::Commit {
                flags: m.flags,
                commit_lsn: m.commit_lsn.0,
                end_lsn: m.end_lsn.0,
                time: m.commit_time_micros,
            },
            LogicalMessage::Origin(m) => Seen::Origin {
                lsn: m.commit_lsn.0,
                name: m.name.clone(),
            },
            LogicalMessage::Relation(m) => Seen::Relation {
                xid: m.xid,
                id: m.id,
                namespace: m.namespace.clone(),
                name: m.name.clone(),
                identity: match m.replica_identity {
                    ReplicaIdentity::Default => b'd',
                    ReplicaIdentity::Nothing => b'n',
                    ReplicaIdentity::Full => b'f',
                    ReplicaIdentity::Index => b'i',
                },
                columns: m
                    .columns
                    .iter()
                    .map(|c| Column {
                        flags: u8::from(c.is_key),
                        name: c.name.clone(),
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                    })
                    .collect(),
            },
            LogicalMessage::Type(m) => Seen::Type {
                xid: m.xid,
                id: m.id,
                namespace: m.namespace.clone(),
                name: m.name.clone(),
            },
            LogicalMessage::Insert(m) => Seen::Insert {
                xid: m.xid,
                relation: m.relation_id,
                new: our_values(&m.new),
            },
            LogicalMessage::Update(m) => Seen::Update {
                xid: m.xid,
                relation: m.relation_id,
                old: m.old.as_ref().map(our_old_row),
                new: our_values(&m.new),
            },
            LogicalMessage::Delete(m) => Seen::Delete {
                xid: m.xid,
                relation: m.relation_id,
                old: our_old_row(&m.old),
            },
            LogicalMessage::Truncate(m) => Seen::Truncate {
                xid: m.xid,
                flags: u8::from(m.cascade) | u8::from(m.restart_identity) << 1,
                relations: m.relation_ids.clone(),
            },
            LogicalMessage::Message(m) => Seen::Message {
                xid: m.xid,
                flags: u8::from(m.transactional),
                lsn: m.lsn.0,
                prefix: m.prefix.clone(),
                content: m.content.clone(),
            },
            LogicalMessage::StreamStart(m) => Seen::StreamStart {
                xid: m.xid,
                first_segment: m.first_segment,
            },
            LogicalMessage::StreamStop => Seen::StreamStop,
            LogicalMessage::StreamCommit(m) => Seen::StreamCommit {
                xid: m.xid,
                flags: m.flags,
                commit_lsn: m.commit_lsn.0,
                end_lsn: m.end_lsn.0,
                time: m.commit_time_micros,
            },
            LogicalMessage::StreamAbort(m) => Seen::StreamAbort {
                xid: m.xid,
                subxid: m.subxid,
                abort_lsn_and_time: None,
            },
        }
    }

    /// pg_walstream's, in the common form. Its parser gives the xid of a change read inside
    /// a stream block beside the message.
    pub fn from_theirs(message: &StreamingReplicationMessage) -> Seen {
        let xid = message.xid;
        match &message.message {
            Theirs::Begin {
                final_lsn,
                timestamp,
                xid,
            } => Seen::Begin {
                final_lsn: *final_lsn,
                time: *timestamp,
                xid: *xid,
            },
            Theirs::Commit {
                flags,
                commit_lsn,
                end_lsn,
                timestamp,
            } => Seen::Commit {
                flags: *flags,
                commit_lsn: *commit_lsn,
                end_lsn: *end_lsn,
                time: *timestamp,
            },
            Theirs::Origin {
                origin_lsn,
                origin_name,
            } => Seen::Origin {
                lsn: *origin_lsn,
                name: origin_name.clone(),
            },
            Theirs::Relation {
                relation_id,
                namespace,
                relation_name,
                replica_identity,
                columns,
            } => Seen::Relation {
                xid,
                id: *relation_id,
                namespace: namespace.to_string(),
                name: relation_name.to_string(),
                identity: *replica_identity,
                columns: columns
                    .iter()
                    .map(|c| Column {
                        flags: c.flags,
                        name: c.name.to_string(),
                        type_oid: c.type_id,
                        type_modifier: c.type_modifier,
                    })
                    .collect(),
            },
            Theirs::Type {
                type_id,
                namespace,
                type_name,
            } => Seen::Type {
                xid,
                id: *type_id,
                namespace: namespace.clone(),
                name: type_name.clone(),
            },
            Theirs::Insert { relation_id, tuple } => Seen::Insert {
                xid,
                relation: *relation_id,
                new: their_values(tuple),
            },
            Theirs::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => Seen::Update {
                xid,
                relation: *relation_id,
                old: match (key_type, old_tuple) {
                    (Some(kind), Some(tuple)) => Some(their_old_row(*kind, tuple)),
                    (None, None) => None,
                    (kind, tuple) => panic!("pg_walstream: old tuple kind {kind:?} {tuple:?}"),
                },
                new: their_values(new_tuple),
            },
            Theirs::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => Seen::Delete {
                xid,
                relation: *relation_id,
                old: their_old_row(*key_type, old_tuple),
            },
            Theirs::Truncate {
                relation_ids,
                flags,
            } => Seen::Truncate {
                xid,
                flags: *flags,
                relations: relation_ids.clone(),
            },
            Theirs::Message {
                flags,
                lsn,
                prefix,
                content,
            } => Seen::Message {
                xid,
                flags: *flags,
                lsn: *lsn,
                prefix: prefix.clone(),
                content: content.clone(),
            },
            Theirs::StreamStart { xid, first_segment } => Seen::StreamStart {
                xid: *xid,
                first_segment: *first_segment,
            },
            Theirs::StreamStop => Seen::StreamStop,
            Theirs::StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                timestamp,
            } => Seen::StreamCommit {
                xid: *xid,
                flags: *flags,
                commit_lsn: *commit_lsn,
                end_lsn: *end_lsn,
                time: *timestamp,
            },
            Theirs::StreamAbort {
                xid,
                subtransaction_xid,
                abort_lsn,
                abort_timestamp,
            } => Seen::StreamAbort {
                xid: *xid,
                subxid: *subtransaction_xid,
                abort_lsn_and_time: abort_lsn.zip(*abort_timestamp),
            },
            other => panic!("pg_walstream read a message of a protocol not asked for: {other:?}"),
        }
    }

    /// The same change as protocol 1 sends it: without the xid that only stream blocks carry.
    pub fn without_xid(mut self) -> Seen {
        match &mut self {
            Seen::Relation { xid, .. }
            | Seen::Type { xid, .. }
            | Seen::Insert { xid, .. }
            | Seen::Update { xid, .. }
            | Seen::Delete { xid, .. }
            | Seen::Truncate { xid, .. }
            | Seen::Message { xid, .. } => *xid = None,
            _ => {}
        }
        self
    }

    /// The xid a change carries inside a stream block.
    pub fn change_xid(&self) -> Option<u32> {
        match self {
            Seen::Relation { xid, .. }
            | Seen::Type { xid, .. }
            | Seen::Insert { xid, .. }
            | Seen::Update { xid, .. }
            | Seen::Delete { xid, .. }
            | Seen::Truncate { xid, .. }
            | Seen::Message { xid, .. } => *xid,
            _ => None,
        }
    }
}

fn our_values(tuple: &TupleData) -> Vec<Value> {
    tuple
        .0
        .iter()
        .map(|value| match value {
            ColumnValue::Null => Value::Null,
            ColumnValue::UnchangedToast => Value::UnchangedToast,
            ColumnValue::Text(bytes) => Value::Text(bytes.clone()),
            ColumnValue::Binary(bytes) => Value::Binary(bytes.clone()),
        })
        .collect()
}

fn our_old_row(old: &OldTuple) -> OldRow {
    match old {
        OldTuple::Key(tuple) => OldRow {
            kind: b'K',
            values: our_values(tuple),
        },
        OldTuple::Full(tuple) => OldRow {
            kind: b'O',
            values: our_values(tuple),
        },
    }
}

fn their_values(tuple: &TheirTuple) -> Vec<Value> {
    tuple
        .columns
        .iter()
        .map(|column| match column.data_type {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => Value::Text(column.raw_bytes()),
            b'b' => Value::Binary(column.raw_bytes()),
            tag => panic!("pg_walstream: column kind {tag}"),
        })
        .collect()
}

fn their_old_row(kind: char, tuple: &TheirTuple) -> OldRow {
    OldRow {
        kind: u8::try_from(kind).expect("an ASCII tag"),
        values: their_values(tuple),
    }
}

/// A CopyData payload's replication-protocol frame, in one form for both.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    XLogData {
        wal_start: u64,
        wal_end: u64,
        time: i64,
        data: Bytes,
    },
    Keepalive {
        wal_end: u64,
        time: i64,
        reply_requested: bool,
    },
}

pub fn our_frame(payload: &Bytes) -> Frame {
    match decode_replication_message(payload.clone()).expect("ours: a replication message") {
        ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            server_time_micros,
            data,
        } => Frame::XLogData {
            wal_start: wal_start.0,
            wal_end: wal_end.0,
            time: server_time_micros,
            data,
        },
        ReplicationMessage::PrimaryKeepalive {
            wal_end,
            server_time_micros,
            reply_requested,
        } => Frame::Keepalive {
            wal_end: wal_end.0,
            time: server_time_micros,
            reply_requested,
        },
    }
}

/// pg_walstream parses keepalives on their own; XLogData only inside its connection layer,
/// so its header is read here with its reader, as the documentation lays it out.
pub fn their_frame(payload: &Bytes) -> Frame {
    match payload.first() {
        Some(b'k') => {
            let keepalive = parse_keepalive_message(payload).expect("pg_walstream: keepalive");
            Frame::Keepalive {
                wal_end: keepalive.wal_end,
                time: keepalive.timestamp,
                reply_requested: keepalive.reply_requested,
            }
        }
        Some(b'w') => {
            let mut reader = BufferReader::from_bytes(payload.slice(1..));
            let (wal_start, wal_end, time) =
                xlog_data_header(&mut reader).expect("pg_walstream: XLogData header");
            Frame::XLogData {
                wal_start,
                wal_end,
                time,
                data: payload.slice(1 + XLOG_DATA_HEADER_LEN..),
            }
        }
        other => panic!("a CopyData payload tagged {other:?}"),
    }
}

/// XLogData's header after its tag: WAL start, WAL end, server time.
const XLOG_DATA_HEADER_LEN: usize = 8 + 8 + 8;

fn xlog_data_header(reader: &mut BufferReader) -> pg_walstream::Result<(u64, u64, i64)> {
    Ok((reader.read_u64()?, reader.read_u64()?, reader.read_i64()?))
}
