//! Decoder and mapping speed on one core, in messages per second, with no I/O.
//!
//! `cargo bench --bench decode` (`USERSYNC_BENCH_DECODE_TXNS`, default 200,000 transactions
//! of Begin, one change, Commit: the steady-load shape, 60% inserts / 35% updates / 5%
//! deletes). Stages, each timed over the same hand-built pgoutput messages:
//!
//! 1. `PgOutputDecoder::decode`: bytes to [`LogicalMessage`];
//! 2. plus `TransactionAssembler::push`: messages to whole transactions;
//! 3. `usersync::map` (the generic profile's `map_row` / `map_key`) on the decoded rows.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use usersync::decode::{
    Assembled, LogicalMessage, OldTuple, PgOutputDecoder, RelationColumn, TransactionAssembler,
};
use usersync::map::{GenericMapping, Profile};

const RELATION_ID: u32 = 16_384;
/// Type OIDs of the bench table's columns.
const UUID: u32 = 2950;
const TEXT: u32 = 25;
const TIMESTAMPTZ: u32 = 1184;
const JSONB: u32 = 3802;
/// Repeat each stage this many times and keep the fastest, to shrug off a noisy neighbour.
const ROUNDS: usize = 3;

/// (name, type, part of the key) of the users table in benches/replication.rs.
const COLUMNS: [(&str, u32, bool); 6] = [
    ("id", UUID, true),
    ("email", TEXT, false),
    ("display_name", TEXT, false),
    ("created_at", TIMESTAMPTZ, false),
    ("metadata", JSONB, false),
    ("changed_at", TIMESTAMPTZ, false),
];

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

fn relation_message() -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'R');
    buf.put_u32(RELATION_ID);
    put_cstr(&mut buf, "public");
    put_cstr(&mut buf, "users");
    buf.put_u8(b'd');
    buf.put_i16(COLUMNS.len() as i16);
    for (name, type_oid, key) in COLUMNS {
        buf.put_u8(u8::from(key));
        put_cstr(&mut buf, name);
        buf.put_u32(type_oid);
        buf.put_i32(-1);
    }
    buf.freeze()
}

fn put_tuple(buf: &mut BytesMut, values: &[Option<&str>]) {
    buf.put_i16(values.len() as i16);
    for value in values {
        match value {
            Some(text) => {
                buf.put_u8(b't');
                buf.put_i32(text.len() as i32);
                buf.put_slice(text.as_bytes());
            }
            None => buf.put_u8(b'n'),
        }
    }
}

fn row(n: u64) -> (String, Vec<String>) {
    let id = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        n >> 32,
        n & 0xffff_ffff_ffff
    );
    let values = vec![
        id.clone(),
        format!("user{n}@example.com"),
        format!("User {n}"),
        "2024-05-01 12:34:56.789012+00".to_owned(),
        format!("{{\"n\": {n}, \"plan\": \"free\"}}"),
        "2025-01-02 03:04:05.678901+00".to_owned(),
    ];
    (id, values)
}

/// Begin, one change, Commit, for `transactions` transactions in the 60/35/5 mix.
fn messages(transactions: u64) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(transactions as usize * 3 + 1);
    out.push(relation_message());
    let mut lsn: u64 = 0x1_0000_0000;
    for n in 0..transactions {
        let mut begin = BytesMut::new();
        begin.put_u8(b'B');
        begin.put_u64(lsn + 200);
        begin.put_i64(800_000_000_000_000 + n as i64);
        begin.put_u32(1000 + n as u32);
        out.push(begin.freeze());

        let (id, values) = row(n);
        let values: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
        let mut change = BytesMut::new();
        match n % 20 {
            // 12 of 20 inserts, 7 updates, 1 delete.
            0..12 => {
                change.put_u8(b'I');
                change.put_u32(RELATION_ID);
                change.put_u8(b'N');
                put_tuple(&mut change, &values);
            }
            12..19 => {
                change.put_u8(b'U');
                change.put_u32(RELATION_ID);
                change.put_u8(b'N');
                put_tuple(&mut change, &values);
            }
            _ => {
                change.put_u8(b'D');
                change.put_u32(RELATION_ID);
                change.put_u8(b'K');
                let mut key = vec![None; COLUMNS.len()];
                key[0] = Some(id.as_str());
                put_tuple(&mut change, &key);
            }
        }
        out.push(change.freeze());

        let mut commit = BytesMut::new();
        commit.put_u8(b'C');
        commit.put_u8(0);
        commit.put_u64(lsn + 200);
        commit.put_u64(lsn + 256);
        commit.put_i64(800_000_000_000_000 + n as i64);
        out.push(commit.freeze());
        lsn += 256;
    }
    out
}

fn fastest(mut stage: impl FnMut() -> u64) -> (Duration, u64) {
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            let n = stage();
            (started.elapsed(), n)
        })
        .min_by_key(|(took, _)| *took)
        .expect("at least one round")
}

fn print(stage: &str, unit: &str, count: u64, took: Duration) {
    println!(
        "{stage:<40} {count:>9} {unit:<9} {:>8.1} ms {:>12.0} {unit}/s",
        took.as_secs_f64() * 1000.0,
        count as f64 / took.as_secs_f64()
    );
}

fn main() {
    let transactions: u64 = std::env::var("USERSYNC_BENCH_DECODE_TXNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let wire = messages(transactions);
    let wire_bytes: usize = wire.iter().map(Bytes::len).sum();
    println!(
        "{transactions} transactions, {} pgoutput messages, {wire_bytes} bytes; one core, best of {ROUNDS}",
        wire.len()
    );

    let (took, n) = fastest(|| {
        let mut decoder = PgOutputDecoder::new();
        for message in &wire {
            black_box(decoder.decode(message.clone()).expect("decode"));
        }
        wire.len() as u64
    });
    print("decode (PgOutputDecoder)", "messages", n, took);
    println!(
        "{:<40} {:>9} {:<9} {:>8} {:>12.1} MiB/s",
        "",
        "",
        "",
        "",
        wire_bytes as f64 / took.as_secs_f64() / (1 << 20) as f64
    );

    let (took, n) = fastest(|| {
        let mut decoder = PgOutputDecoder::new();
        let mut assembler = TransactionAssembler::new();
        let mut done = 0;
        for message in &wire {
            let decoded = decoder.decode(message.clone()).expect("decode");
            if let Assembled::Transaction(txn) = assembler
                .push_payload(decoded, message.clone())
                .expect("assemble")
            {
                black_box(&txn);
                done += 1;
            }
        }
        assert_eq!(done, transactions);
        wire.len() as u64
    });
    print(
        "decode + assemble (TransactionAssembler)",
        "messages",
        n,
        took,
    );
    print("  as transactions", "txns", transactions, took);

    // Mapping: decode once, outside the clock.
    let mut decoder = PgOutputDecoder::new();
    let decoded: Vec<LogicalMessage> = wire
        .iter()
        .map(|m| decoder.decode(m.clone()).expect("decode"))
        .collect();
    let LogicalMessage::Relation(relation) = &decoded[0] else {
        panic!("the first message is the relation");
    };
    let columns: Vec<RelationColumn> = relation.columns.clone();
    let mapper = Profile::from(GenericMapping::default())
        .bind(&columns)
        .expect("bind the generic profile");
    let (took, n) = fastest(|| {
        let mut mapped = 0;
        for message in &decoded {
            match message {
                LogicalMessage::Insert(insert) => {
                    black_box(mapper.map_row(&insert.new).expect("map"));
                }
                LogicalMessage::Update(update) => {
                    black_box(mapper.map_row(&update.new).expect("map"));
                }
                LogicalMessage::Delete(delete) => {
                    let (OldTuple::Key(key) | OldTuple::Full(key)) = &delete.old;
                    black_box(mapper.map_key(key).expect("map key"));
                }
                _ => continue,
            }
            mapped += 1;
        }
        mapped
    });
    print("map (generic profile, to raw_json)", "rows", n, took);

    let (took, n) = fastest(|| {
        let mut rendered = 0;
        for message in &decoded {
            if let LogicalMessage::Insert(insert) = message {
                if let Ok(usersync::map::RowOutcome::User(user)) = mapper.map_row(&insert.new) {
                    black_box(user.raw_json.to_vec());
                    rendered += 1;
                }
            }
        }
        rendered
    });
    print("map + serialize raw_json (inserts)", "rows", n, took);
}
