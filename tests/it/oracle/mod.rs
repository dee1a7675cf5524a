//! An independent oracle for the decoder (issue #13).
//!
//! Our decoder has been checked against itself (unit tests, proptest, the mutation fuzzer)
//! and end to end. Here the same captured pgoutput streams go through a decoder written by
//! other people from the same PostgreSQL documentation, the `pg_walstream` crate's parser,
//! and the two must agree message by message, field by field: frames (`'w'`, `'k'`), kinds,
//! xids, LSNs, times, relation ids, columns, tuple values (text, binary, null, unchanged
//! TOAST), old-tuple kinds, TRUNCATE options, logical messages and the stream messages.
//!
//! The streams are real: one database gets three slots, then a workload that makes the
//! server send every message and value kind we decode (see [`WORKLOAD`] and the streamed
//! transactions in [`run_workload`]). Each slot is read with other options, while the
//! workload runs: protocol 1, protocol 2 with streaming of large transactions, and protocol
//! 2 in binary. Reading stops at a last non-transactional message. Every kind of message and
//! value the workload is there for must have been seen, so a server that quietly sends less
//! fails the test.
//!
//! Server versions differ in what they send (PostgreSQL 14 sends transactions without
//! changes, 15 no longer does; 18 does not stream a transaction it knows aborted), never in
//! how: the same checks hold on 14 to 18.
//!
//! A second check covers `transaction.rs`, which no parser can: the transactions our
//! assembler builds from the streamed capture (blocks, interleaving, a rolled-back
//! savepoint, an aborted transaction, spill files) must equal those it builds from protocol
//! 1, where the server itself sends each transaction whole after it committed.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use bytes::Bytes;
use pg_walstream::LogicalReplicationParser;
use tokio::sync::{watch, OnceCell};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use usersync::decode::{
    decode_replication_message, encode_standby_status_update, unix_micros_to_pg_micros, Assembled,
    LogicalMessage, PgOutputDecoder, ReplicationMessage, TransactionAssembler,
};
use usersync::localpg::LocalPg;
use usersync::lsn::Lsn;
use usersync::source::ReplicationConnection;

use crate::harness::*;

mod common_form;

use common_form::{our_frame, their_frame, Column, Frame, OldRow, Seen, Value};

/// The publication the slots are read with: every table of the test database.
const PUBLICATION: &str = "oracle";
/// Prefix of the non-transactional message that ends the workload: reading stops there.
const END_PREFIX: &str = "usersync-oracle-end";
/// Rows of a transaction meant to stream: far past the shared server's 64 kB
/// `logical_decoding_work_mem`.
const STREAMED_ROWS: u32 = 1500;
/// Our assembler's memory limit in the assembly check: small, so that the large
/// transactions go through spill files too.
const ASSEMBLER_MEMORY_LIMIT: usize = 32 * 1024;
/// The origin LSN given to the transaction replayed "from elsewhere".
const ORIGIN_LSN: &str = "0/12345678";

/// Types, tables and the publication, made before the slots.
///
/// The large TOAST values are 10 kB of md5 hex in `STORAGE EXTERNAL` columns: stored out of
/// line, uncompressed, whatever the server version's compression defaults.
const WORKLOAD: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
CREATE TABLE kinds (
    id        uuid PRIMARY KEY,
    name      text,
    handle    varchar(40),
    code      char(3),
    active    bool,
    small     int2,
    medium    int4,
    large     int8,
    ratio     float4,
    precise   float8,
    amount    numeric(12, 2),
    seen_at   timestamptz,
    local_at  timestamp(3),
    born      date,
    profile   jsonb,
    raw       json,
    avatar    bytea,
    tags      text[],
    scores    int4[],
    ids       uuid[],
    docs      jsonb[],
    feeling   mood,
    feelings  mood[],
    contact   email
);
CREATE TABLE toasted (id int PRIMARY KEY, note text, big text);
ALTER TABLE toasted ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE full_identity (id int PRIMARY KEY, note text, big text);
ALTER TABLE full_identity ALTER COLUMN big SET STORAGE EXTERNAL;
ALTER TABLE full_identity REPLICA IDENTITY FULL;
CREATE TABLE index_identity (id int PRIMARY KEY, code text NOT NULL, note text);
CREATE UNIQUE INDEX index_identity_code ON index_identity (code);
ALTER TABLE index_identity REPLICA IDENTITY USING INDEX index_identity_code;
CREATE TABLE no_identity (note text);
ALTER TABLE no_identity REPLICA IDENTITY NOTHING;
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
CREATE TABLE counter (id serial PRIMARY KEY, note text);
CREATE TABLE bulk (id int PRIMARY KEY, payload text);
CREATE SCHEMA "Mixed Case";
CREATE TABLE "Mixed Case"."Tâble" ("Cölumn" text PRIMARY KEY, "UPPER" int);
CREATE PUBLICATION oracle FOR ALL TABLES;
"#;

/// Short transactions, each exercising a message or value kind: one statement, or an
/// explicit transaction, per entry.
const SHORT_TRANSACTIONS: &[&str] = &[
    // Every type, then every column NULL but the key, then edge values.
    r#"INSERT INTO kinds VALUES (
        '7c1c0c53-3f2a-4d5e-9b8a-0123456789ab', 'Zoë 🚀 "quoted" \ back', 'handle', 'abc', true,
        -32768, 2147483647, -9223372036854775808, 1.5, 3.141592653589793, 1234567890.12,
        '2024-02-29 12:34:56.789+05:30', '2024-02-29 12:34:56.789', '2024-02-29',
        '{"a": [1, 2, {"b": null}], "s": "é"}', '{"raw":   true,  "dup": 1, "dup": 2}',
        '\x00ff10'::bytea, '{"a b", NULL, "c\"d", ""}', '{1,2,3}',
        '{7c1c0c53-3f2a-4d5e-9b8a-0123456789ab}', ARRAY['{"k": 1}'::jsonb], 'happy',
        '{sad,happy}', 'x@y.z')"#,
    "INSERT INTO kinds (id) VALUES ('00000000-0000-0000-0000-000000000000')",
    "INSERT INTO kinds (id, name, seen_at, local_at, born, amount, precise, tags, avatar)
     VALUES ('ffffffff-ffff-ffff-ffff-ffffffffffff', E'', 'infinity', '-infinity',
             '4713-01-01 BC', 'NaN', '-Infinity', '{}', ''::bytea)",
    // DEFAULT identity: a plain update (no old tuple), a key change (old key), a delete.
    "UPDATE kinds SET name = NULL, active = false WHERE id = '7c1c0c53-3f2a-4d5e-9b8a-0123456789ab'",
    "UPDATE kinds SET id = '11111111-1111-1111-1111-111111111111'
      WHERE id = '7c1c0c53-3f2a-4d5e-9b8a-0123456789ab'",
    "DELETE FROM kinds WHERE id = '00000000-0000-0000-0000-000000000000'",
    // Unchanged TOAST: an update of another column, then of the key.
    "INSERT INTO toasted SELECT 1, 'first', string_agg(md5(i::text), '') FROM generate_series(1, 320) i",
    "UPDATE toasted SET note = 'second' WHERE id = 1",
    "UPDATE toasted SET id = 2 WHERE id = 1",
    "DELETE FROM toasted WHERE id = 2",
    // FULL identity: the whole old row, TOAST value included.
    "INSERT INTO full_identity SELECT 1, 'first', string_agg(md5(i::text), '') FROM generate_series(1, 320) i",
    "UPDATE full_identity SET note = 'second' WHERE id = 1",
    "UPDATE full_identity SET note = NULL WHERE id = 1",
    "DELETE FROM full_identity WHERE id = 1",
    // USING INDEX identity: the old key is the index's columns.
    "INSERT INTO index_identity VALUES (1, 'c1', 'n1'), (2, 'c2', NULL)",
    "UPDATE index_identity SET note = 'n2' WHERE id = 1",
    "UPDATE index_identity SET code = 'c3' WHERE id = 1",
    "UPDATE index_identity SET id = 5 WHERE id = 1",
    "DELETE FROM index_identity WHERE id = 5",
    "INSERT INTO no_identity VALUES ('nothing'), (NULL)",
    r#"INSERT INTO "Mixed Case"."Tâble" VALUES ('ü', 1)"#,
    // TRUNCATE: several tables; CASCADE; RESTART IDENTITY.
    "INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1);
     INSERT INTO counter (note) VALUES ('a'), ('b'); INSERT INTO bulk VALUES (1, 'x')",
    "TRUNCATE index_identity, no_identity",
    "TRUNCATE parent CASCADE",
    "TRUNCATE counter, bulk RESTART IDENTITY",
    "TRUNCATE toasted RESTART IDENTITY CASCADE",
    // Logical messages, alone and inside a transaction with changes, text and binary.
    "SELECT pg_logical_emit_message(true, 'oracle', 'transactional, alone')",
    "SELECT pg_logical_emit_message(false, 'oracle', 'not transactional')",
    r"BEGIN;
      INSERT INTO counter (note) VALUES ('with messages');
      SELECT pg_logical_emit_message(false, 'oracle', 'not transactional, inside');
      SELECT pg_logical_emit_message(true, 'oracle-bytes', '\x00ff00'::bytea);
      SELECT pg_logical_emit_message(true, '', '');
      COMMIT",
    // The relation changes: its Relation message is sent again.
    "ALTER TABLE kinds ADD COLUMN extra text DEFAULT 'x'",
    "ALTER TABLE kinds ALTER COLUMN handle TYPE varchar(80)",
    "INSERT INTO kinds (id, handle) VALUES ('22222222-2222-2222-2222-222222222222', 'after alter')",
];

/// One captured stream: the raw CopyData payloads of one slot.
struct Capture {
    name: &'static str,
    protocol: u32,
    payloads: Vec<Bytes>,
}

struct Captures {
    server_version_num: u32,
    protocol_1: Capture,
    streamed: Capture,
    binary: Capture,
}

/// The captures, made once for the tests of this module.
async fn captures() -> &'static Captures {
    static CAPTURES: OnceCell<Captures> = OnceCell::const_new();
    CAPTURES.get_or_init(capture_all).await
}

async fn capture_all() -> Captures {
    let server = shared_server();
    let dbname = unique("oracle");
    sql(server, "postgres")
        .await
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .expect("create the oracle's database");
    let client = sql(server, &dbname).await;
    client.batch_execute(WORKLOAD).await.expect("create tables");
    let slots = ["p1", "p2", "bin"].map(|suffix| format!("{dbname}_{suffix}"));
    let url = server.superuser_url(&dbname).parse().unwrap();
    let mut replication = ReplicationConnection::connect(&url, "usersync-oracle")
        .await
        .expect("open a replication connection");
    for slot in &slots {
        replication
            .create_logical_slot(slot, false, false)
            .await
            .expect("create a slot");
    }
    replication.close().await;

    // The slots are read while the workload runs, as a replicator would: PostgreSQL 18 no
    // longer streams a transaction that it already knows aborted when it decodes it, so
    // the aborted one must be decoded, and streamed, before it ends.
    let url = server.superuser_url(&dbname);
    let read = |slot: &String, name, protocol: u32, options: &[(&'static str, &str)]| {
        let mut all = vec![
            ("proto_version", protocol.to_string()),
            ("publication_names", PUBLICATION.to_owned()),
            ("messages", "true".to_owned()),
        ];
        all.extend(options.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Reader::start(url.clone(), slot.clone(), name, protocol, all)
    };
    let protocol_1 = read(&slots[0], "protocol 1", 1, &[]);
    let streamed = read(
        &slots[1],
        "protocol 2, streaming",
        2,
        &[("streaming", "on")],
    );
    let binary = read(
        &slots[2],
        "protocol 2, streaming, binary",
        2,
        &[("streaming", "on"), ("binary", "true")],
    );
    let origin = unique("oracle_origin");
    run_workload(
        server,
        &dbname,
        &origin,
        [streamed.stream_starts.clone(), binary.stream_starts.clone()],
    )
    .await;
    let captures = Captures {
        server_version_num: server.server_version_num(),
        protocol_1: protocol_1.finish().await,
        streamed: streamed.finish().await,
        binary: binary.finish().await,
    };
    // Leave nothing that holds WAL or shared catalogs on the shared server.
    for slot in &slots {
        drop_slot(&client, slot).await;
    }
    client
        .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
        .await
        .expect("drop the replication origin");
    captures
}

/// The workload: [`SHORT_TRANSACTIONS`], a transaction replayed under a replication origin,
/// and the large ones that protocol 2 streams.
async fn run_workload(
    server: &LocalPg,
    dbname: &str,
    origin: &str,
    stream_starts: [watch::Receiver<BTreeSet<u32>>; 2],
) {
    let client = sql(server, dbname).await;
    for statements in SHORT_TRANSACTIONS {
        client
            .batch_execute(statements)
            .await
            .unwrap_or_else(|e| panic!("{statements}: {e}"));
    }

    // As a subscriber's apply worker would: a session under an origin, with its origin LSN.
    // The second transaction streams: its Origin comes inside the first block, without LSN.
    let elsewhere = sql(server, dbname).await;
    elsewhere
        .execute("SELECT pg_replication_origin_create($1)", &[&origin])
        .await
        .unwrap();
    elsewhere
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .unwrap();
    elsewhere
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_replication_origin_xact_setup('{ORIGIN_LSN}', '2024-01-01 00:00:00+00');
             INSERT INTO counter (note) VALUES ('from elsewhere');
             COMMIT;
             BEGIN;
             SELECT pg_replication_origin_xact_setup('{ORIGIN_LSN}', '2024-01-01 00:00:00+00');
             INSERT INTO bulk SELECT i, 'from elsewhere' FROM generate_series(800001, 800000 + {STREAMED_ROWS}) i;
             COMMIT;
             SELECT pg_replication_origin_session_reset();"
        ))
        .await
        .unwrap();

    // Streamed and committed, with a savepoint rolled back after it streamed, a released
    // one, a TRUNCATE, a first use of tables (Relation and Type messages inside a block),
    // and messages of both kinds while it streams.
    let rows = STREAMED_ROWS;
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO bulk SELECT i, repeat('x', 200) FROM generate_series(1, {rows}) i;
             SAVEPOINT doomed;
             INSERT INTO bulk SELECT i, md5(i::text) FROM generate_series(100001, 100000 + {rows}) i;
             ROLLBACK TO SAVEPOINT doomed;
             SAVEPOINT kept;
             UPDATE bulk SET payload = 'kept' WHERE id <= 10;
             INSERT INTO kinds (id, feeling, contact) VALUES
               ('33333333-3333-3333-3333-333333333333', 'ok', 'in@stream');
             RELEASE SAVEPOINT kept;
             SELECT pg_logical_emit_message(true, 'oracle', 'transactional, streamed');
             SELECT pg_logical_emit_message(false, 'oracle', 'not transactional, while streaming');
             DELETE FROM bulk WHERE id > {rows} - 100;
             TRUNCATE counter;
             INSERT INTO bulk SELECT i, repeat('y', 200) FROM generate_series(200001, 200000 + {rows}) i;
             COMMIT;"
        ))
        .await
        .unwrap();

    // Two streamed transactions at once: their blocks interleave, and the one that began
    // second commits first.
    let other = sql(server, dbname).await;
    let insert = |from: u32| {
        format!(
            "INSERT INTO bulk SELECT i, repeat('z', 200) FROM generate_series({from}, {}) i",
            from + rows - 1
        )
    };
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute(&insert(300_001)).await.unwrap();
    other.batch_execute("BEGIN").await.unwrap();
    other.batch_execute(&insert(400_001)).await.unwrap();
    client.batch_execute(&insert(500_001)).await.unwrap();
    other.batch_execute(&insert(600_001)).await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();

    // Streamed, then aborted as a whole, once both streaming readers have had a block of it.
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute(&insert(700_001)).await.unwrap();
    let xid: i64 = client
        .query_one("SELECT txid_current() % 4294967296", &[])
        .await
        .unwrap()
        .get(0);
    let xid = u32::try_from(xid).unwrap();
    for mut starts in stream_starts {
        tokio::time::timeout(WAIT, starts.wait_for(|xids| xids.contains(&xid)))
            .await
            .expect("the transaction to abort streams")
            .expect("the reader is running");
    }
    client.batch_execute("ROLLBACK").await.unwrap();

    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, 'the end')",
            &[&END_PREFIX],
        )
        .await
        .unwrap();
}

/// A slot being read in the background, until the workload's last message.
struct Reader {
    task: JoinHandle<Capture>,
    /// The xids of the Stream Start messages received so far.
    stream_starts: watch::Receiver<BTreeSet<u32>>,
}

impl Reader {
    fn start(
        url: String,
        slot: String,
        name: &'static str,
        protocol: u32,
        options: Vec<(&'static str, String)>,
    ) -> Reader {
        let (starts, stream_starts) = watch::channel(BTreeSet::new());
        let task = tokio::spawn(async move {
            let payloads = read_slot(&url, &slot, name, &options, &starts).await;
            Capture {
                name,
                protocol,
                payloads,
            }
        });
        Reader {
            task,
            stream_starts,
        }
    }

    async fn finish(self) -> Capture {
        self.task.await.expect("the reader finishes")
    }
}

/// Reads `slot` from its start until the workload's last message, answering keepalives,
/// and announces each Stream Start's xid on `stream_starts`.
async fn read_slot(
    url: &str,
    slot: &str,
    name: &str,
    options: &[(&str, String)],
    stream_starts: &watch::Sender<BTreeSet<u32>>,
) -> Vec<Bytes> {
    let url = url.parse().unwrap();
    let mut stream = ReplicationConnection::connect(&url, "usersync-oracle")
        .await
        .expect("open a replication connection")
        .start_logical_replication(slot, Lsn::ZERO, options)
        .await
        .unwrap_or_else(|e| panic!("{name}: start replication: {e}"));
    let deadline = Instant::now() + WAIT;
    let mut payloads = Vec::new();
    loop {
        let payload = tokio::time::timeout_at(deadline, stream.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: the end of the workload did not arrive"))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: the server ended the stream"));
        payloads.push(payload.clone());
        match decode_replication_message(payload).expect("a replication message") {
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested: true,
                ..
            } => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_micros();
                let now = unix_micros_to_pg_micros(i64::try_from(now).unwrap());
                let update =
                    encode_standby_status_update(wal_end, Lsn::ZERO, Lsn::ZERO, now, false);
                stream.send(update).await.unwrap();
            }
            ReplicationMessage::XLogData { data, .. } if is_end_message(&data) => break,
            ReplicationMessage::XLogData { data, .. } => {
                if let Some(xid) = stream_start_xid(&data) {
                    stream_starts.send_modify(|xids| {
                        xids.insert(xid);
                    });
                }
            }
            ReplicationMessage::PrimaryKeepalive { .. } => {}
        }
    }
    stream.finish().await;
    payloads
}

/// The xid of a Stream Start message (tag `S`, then the xid), read from the bytes so that
/// the workload's pacing needs neither decoder.
fn stream_start_xid(data: &[u8]) -> Option<u32> {
    match data {
        [b'S', xid @ .., _first_segment] => Some(u32::from_be_bytes(xid.try_into().ok()?)),
        _ => None,
    }
}

/// Whether `data` is the Message that ends the workload (looked for in the bytes, so that
/// finding the end needs neither decoder).
fn is_end_message(data: &[u8]) -> bool {
    data.first() == Some(&b'M')
        && data.windows(END_PREFIX.len() + 1).any(|window| {
            window[..END_PREFIX.len()] == *END_PREFIX.as_bytes() && window[END_PREFIX.len()] == 0
        })
}

/// Drops a slot whose walsender may still be exiting.
async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return,
            // Still active while its walsender exits.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("drop slot {slot}: {e}"),
        }
    }
}

/// How much of a payload a failure shows.
const CONTEXT_BYTES: usize = 256;

/// Decodes `capture` with both decoders and compares each payload; returns what was seen
/// (for the coverage checks).
fn compare(capture: &Capture) -> BTreeSet<&'static str> {
    let mut ours = PgOutputDecoder::new();
    let mut theirs = LogicalReplicationParser::with_protocol_version(capture.protocol);
    let mut seen = BTreeSet::new();
    let mut relations: HashMap<u32, Vec<Column>> = HashMap::new();
    let mut block_xid = None;
    for (index, payload) in capture.payloads.iter().enumerate() {
        let context = || {
            let shown = payload.slice(..payload.len().min(CONTEXT_BYTES));
            let total = payload.len();
            format!(
                "{}, payload {index} ({total} bytes): {shown:?}",
                capture.name
            )
        };
        let frame = our_frame(payload);
        assert_eq!(frame, their_frame(payload), "frames differ ({})", context());
        let data = match frame {
            Frame::XLogData { data, .. } => data,
            Frame::Keepalive { .. } => {
                seen.insert("keepalive");
                continue;
            }
        };
        let our_message = ours
            .decode(data.clone())
            .unwrap_or_else(|e| panic!("ours failed: {e} ({})", context()));
        let their_message = theirs
            .parse_wal_message_bytes(data)
            .unwrap_or_else(|e| panic!("pg_walstream failed: {e} ({})", context()));
        let message = Seen::from_ours(&our_message);
        assert_eq!(
            message,
            Seen::from_theirs(&their_message),
            "decoders differ ({})",
            context()
        );
        note_coverage(&message, &mut block_xid, &mut relations, &mut seen);
    }
    seen
}

/// Adds what `message` exercises to `seen`.
fn note_coverage(
    message: &Seen,
    block_xid: &mut Option<u32>,
    relations: &mut HashMap<u32, Vec<Column>>,
    seen: &mut BTreeSet<&'static str>,
) {
    if let Some(xid) = message.change_xid() {
        seen.insert("change in a stream block");
        if Some(xid) != *block_xid {
            seen.insert("change of a subtransaction");
        }
    }
    let mut values = |values: &[Value]| {
        for value in values {
            seen.insert(match value {
                Value::Null => "null value",
                Value::UnchangedToast => "unchanged toast value",
                Value::Text(text) if text.is_empty() => "empty text value",
                Value::Text(_) => "text value",
                Value::Binary(_) => "binary value",
            });
        }
    };
    // The server inlines TOAST values in the old row (decode/mod.rs counts on it).
    let old_toast = |old: &OldRow| {
        assert!(
            !old.values.contains(&Value::UnchangedToast),
            "unchanged TOAST in an old row: {old:?}"
        );
    };
    match message {
        Seen::Begin { .. } => seen.insert("begin"),
        Seen::Commit { .. } => seen.insert("commit"),
        Seen::Origin { .. } if block_xid.is_some() => seen.insert("origin in a stream block"),
        Seen::Origin { .. } => seen.insert("origin"),
        Seen::Relation {
            id,
            identity,
            columns,
            ..
        } => {
            if relations
                .insert(*id, columns.clone())
                .is_some_and(|before| before != *columns)
            {
                seen.insert("relation changed");
            }
            seen.insert(match identity {
                b'd' => "identity default",
                b'n' => "identity nothing",
                b'f' => "identity full",
                b'i' => "identity index",
                _ => "identity unknown",
            })
        }
        Seen::Type { .. } => seen.insert("type"),
        Seen::Insert { new, .. } => {
            values(new);
            seen.insert("insert")
        }
        Seen::Update { old, new, .. } => {
            values(new);
            match old {
                None => seen.insert("update"),
                Some(old) => {
                    values(&old.values);
                    old_toast(old);
                    seen.insert(if old.kind == b'K' {
                        "update with old key"
                    } else {
                        "update with old row"
                    })
                }
            }
        }
        Seen::Delete { old, .. } => {
            values(&old.values);
            old_toast(old);
            seen.insert(if old.kind == b'K' {
                "delete with old key"
            } else {
                "delete with old row"
            })
        }
        Seen::Truncate {
            flags, relations, ..
        } => {
            if relations.len() > 1 {
                seen.insert("truncate of several tables");
            }
            if flags & 1 != 0 {
                seen.insert("truncate cascade");
            }
            if flags & 2 != 0 {
                seen.insert("truncate restart identity");
            }
            seen.insert("truncate")
        }
        Seen::Message { flags, .. } => seen.insert(if flags & 1 != 0 {
            "transactional message"
        } else {
            "non-transactional message"
        }),
        Seen::StreamStart { xid, first_segment } => {
            *block_xid = Some(*xid);
            seen.insert(if *first_segment {
                "stream start, first"
            } else {
                "stream start, later"
            })
        }
        Seen::StreamStop => {
            *block_xid = None;
            seen.insert("stream stop")
        }
        Seen::StreamCommit { .. } => seen.insert("stream commit"),
        Seen::StreamAbort { xid, subxid, .. } => seen.insert(if xid == subxid {
            "stream abort of a transaction"
        } else {
            "stream abort of a subtransaction"
        }),
    };
}

/// What every capture must show: the workload is there to make the server send it.
const ALWAYS: &[&str] = &[
    "begin",
    "commit",
    "origin",
    "identity default",
    "identity full",
    "identity index",
    "identity nothing",
    "relation changed",
    "type",
    "insert",
    "update",
    "update with old key",
    "update with old row",
    "delete with old key",
    "delete with old row",
    "truncate",
    "truncate of several tables",
    "truncate cascade",
    "truncate restart identity",
    "transactional message",
    "non-transactional message",
    "null value",
    "unchanged toast value",
];

/// What a capture with streaming must show besides.
const STREAMING: &[&str] = &[
    "stream start, first",
    "stream start, later",
    "stream stop",
    "stream commit",
    "stream abort of a transaction",
    "stream abort of a subtransaction",
    "origin in a stream block",
    "change in a stream block",
    "change of a subtransaction",
];

fn assert_covers(capture: &Capture, seen: &BTreeSet<&str>, required: &[&[&str]]) {
    let missing: Vec<_> = required
        .iter()
        .flat_map(|kinds| kinds.iter())
        .filter(|kind| !seen.contains(*kind))
        .collect();
    assert!(
        missing.is_empty(),
        "{}: the workload did not produce {missing:?} (seen: {seen:?})",
        capture.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_decoder_and_pg_walstream_agree_on_captured_streams() {
    let captures = captures().await;

    let seen = compare(&captures.protocol_1);
    assert_covers(
        &captures.protocol_1,
        &seen,
        &[ALWAYS, &["text value", "empty text value"]],
    );
    assert!(
        !STREAMING.iter().any(|kind| seen.contains(kind)),
        "protocol 1 streams nothing: {seen:?}"
    );

    let seen = compare(&captures.streamed);
    assert_covers(
        &captures.streamed,
        &seen,
        &[ALWAYS, STREAMING, &["text value", "empty text value"]],
    );
    assert!(!seen.contains("binary value"));

    let seen = compare(&captures.binary);
    assert_covers(
        &captures.binary,
        &seen,
        &[ALWAYS, STREAMING, &["binary value"]],
    );
    assert!(
        !seen.contains("text value"),
        "binary sends no text: {seen:?}"
    );
}

/// A transaction, or a message outside any, as our assembler hands it on.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Transaction {
        header: TransactionHeader,
        /// Without Relation and Type messages: the server sends those where it decides a
        /// receiver needs them, which differs between streamed and whole transactions.
        changes: Vec<Seen>,
    },
    NonTransactionalMessage(Seen),
}

#[derive(Debug, PartialEq, Eq)]
struct TransactionHeader {
    xid: u32,
    commit_lsn: u64,
    end_lsn: u64,
    time: i64,
}

/// Our decoder and assembler over a capture; also counts the transactions that spilled.
fn assemble(capture: &Capture) -> (Vec<Event>, usize) {
    let mut decoder = PgOutputDecoder::new();
    let mut assembler = TransactionAssembler::with_memory_limit(ASSEMBLER_MEMORY_LIMIT);
    let mut events = Vec::new();
    let mut spilled = 0;
    for payload in &capture.payloads {
        let Frame::XLogData { data, .. } = our_frame(payload) else {
            continue;
        };
        let message = decoder.decode(data.clone()).expect("decode");
        match assembler.push_payload(message, data).expect("assemble") {
            Assembled::Transaction(transaction) => {
                spilled += usize::from(transaction.spilled.is_some());
                events.push(Event::Transaction {
                    header: TransactionHeader {
                        xid: transaction.xid,
                        commit_lsn: transaction.commit_lsn.0,
                        end_lsn: transaction.end_lsn.0,
                        time: transaction.commit_time_micros,
                    },
                    changes: transaction
                        .into_changes()
                        .map(|change| Seen::from_ours(&change.expect("read back")).without_xid())
                        .filter(|change| {
                            !matches!(change, Seen::Relation { .. } | Seen::Type { .. })
                        })
                        .collect(),
                });
            }
            Assembled::NonTransactionalMessage(message) => events.push(
                Event::NonTransactionalMessage(Seen::from_ours(&LogicalMessage::Message(message))),
            ),
            Assembled::Relation(_) | Assembled::Nothing => {}
        }
    }
    assert!(
        assembler.is_idle(),
        "{}: a transaction left open",
        capture.name
    );
    (events, spilled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_assemble_into_what_protocol_1_sends_whole() {
    let captures = captures().await;
    let (whole, spilled_whole) = assemble(&captures.protocol_1);
    let (streamed, spilled_streamed) = assemble(&captures.streamed);
    assert!(
        spilled_whole > 0 && spilled_streamed > 0,
        "the large transactions spill ({spilled_whole}, {spilled_streamed})"
    );
    for (index, pair) in whole.iter().zip(&streamed).enumerate() {
        match pair {
            (
                Event::Transaction { header, changes },
                Event::Transaction {
                    header: streamed_header,
                    changes: streamed_changes,
                },
            ) => {
                assert_eq!(header, streamed_header, "event {index}");
                for (number, pair) in changes.iter().zip(streamed_changes).enumerate() {
                    assert_eq!(
                        pair.0, pair.1,
                        "event {index} ({header:?}), change {number}"
                    );
                }
                assert_eq!(
                    changes.len(),
                    streamed_changes.len(),
                    "event {index} ({header:?}): as many changes"
                );
            }
            (whole, streamed) => assert_eq!(whole, streamed, "event {index}"),
        }
    }
    assert_eq!(
        whole.len(),
        streamed.len(),
        "as many transactions and messages"
    );
    // PostgreSQL 15 stopped sending transactions without changes (DDL, here).
    let empty = whole
        .iter()
        .filter(|event| matches!(event, Event::Transaction { changes, .. } if changes.is_empty()))
        .count();
    assert_eq!(
        empty > 0,
        captures.server_version_num < 150_000,
        "empty transactions: {empty}"
    );
}
