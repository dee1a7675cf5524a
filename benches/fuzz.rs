//! A mutation fuzzer for everything that parses bytes from the source: the replication
//! framing, the pgoutput decoder (in and out of streamed blocks), the transaction
//! assembler, and the mapping of the tuples it yields. None of them may panic, whatever the
//! input; a panic is a bug.
//!
//! `cargo bench --bench fuzz` runs for `USERSYNC_FUZZ_SECONDS` (default 60) and prints the
//! executions; it exits non-zero on the first panic, printing the input as hex.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use usersync::decode::{
    decode_replication_message, Assembled, LogicalMessage, PgOutputDecoder, RelationColumn,
    TransactionAssembler,
};
use usersync::map::{GenericMapping, Profile};

/// A tiny xorshift generator: reproducible from the seed printed at start.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn cstr(buf: &mut BytesMut, text: &str) {
    buf.put_slice(text.as_bytes());
    buf.put_u8(0);
}

fn tuple(buf: &mut BytesMut, values: &[Option<&str>]) {
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

/// Valid messages of every kind, the starting points for mutation.
fn seeds() -> Vec<Bytes> {
    let mut seeds = Vec::new();
    let mut push = |build: &dyn Fn(&mut BytesMut)| {
        let mut buf = BytesMut::new();
        build(&mut buf);
        seeds.push(buf.freeze());
    };
    push(&|b| {
        b.put_u8(b'B');
        b.put_i64(0x1000);
        b.put_i64(700_000_000_000_000);
        b.put_i32(42);
    });
    push(&|b| {
        b.put_u8(b'R');
        b.put_u32(16384);
        cstr(b, "public");
        cstr(b, "users");
        b.put_u8(b'd');
        b.put_i16(4);
        for (key, name, oid) in [
            (1, "id", 25),
            (0, "email", 25),
            (0, "created_at", 1184),
            (0, "meta", 3802),
        ] {
            b.put_u8(key);
            cstr(b, name);
            b.put_u32(oid);
            b.put_i32(-1);
        }
    });
    let row = [
        Some("u1"),
        Some("a@example.com"),
        Some("2024-01-02 03:04:05.678+00"),
        Some("{\"a\": [1, 2.5, null]}"),
    ];
    push(&|b| {
        b.put_u8(b'I');
        b.put_u32(16384);
        b.put_u8(b'N');
        tuple(b, &row);
    });
    push(&|b| {
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'K');
        tuple(b, &[Some("u0"), None, None, None]);
        b.put_u8(b'N');
        tuple(b, &row);
    });
    push(&|b| {
        b.put_u8(b'D');
        b.put_u32(16384);
        b.put_u8(b'K');
        tuple(b, &[Some("u1"), None, None, None]);
    });
    push(&|b| {
        b.put_u8(b'T');
        b.put_i32(1);
        b.put_u8(1);
        b.put_u32(16384);
    });
    push(&|b| {
        b.put_u8(b'M');
        b.put_u8(1);
        b.put_i64(0x1010);
        cstr(b, "usersync_heartbeat:usersync");
        b.put_i32(3);
        b.put_slice(b"123");
    });
    push(&|b| {
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_i64(0x1000);
        b.put_i64(0x1020);
        b.put_i64(700_000_000_000_000);
    });
    push(&|b| {
        b.put_u8(b'S');
        b.put_i32(43);
        b.put_u8(1);
    });
    push(&|b| b.put_u8(b'E'));
    push(&|b| {
        b.put_u8(b'c');
        b.put_i32(43);
        b.put_u8(0);
        b.put_i64(0x2000);
        b.put_i64(0x2020);
        b.put_i64(700_000_000_000_000);
    });
    push(&|b| {
        b.put_u8(b'A');
        b.put_i32(43);
        b.put_i32(44);
    });
    push(&|b| {
        b.put_u8(b'k');
        b.put_i64(0x3000);
        b.put_i64(700_000_000_000_000);
        b.put_u8(1);
    });
    seeds
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] = [0, 0xff, 0x7f, 0x80, b'n', b'u', b't'][rng.below(7)];
            }
            2 => data.truncate(rng.below(data.len() + 1)),
            3 => {
                let at = rng.below(data.len() + 1);
                data.insert(at, rng.next() as u8);
            }
            4 if data.len() > 4 => {
                // Overwrite a length-sized word with an extreme value.
                let at = rng.below(data.len() - 3);
                let value = [0i32, -1, i32::MAX, i32::MIN, 1 << 20][rng.below(5)];
                data[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            _ => {}
        }
    }
    data
}

fn wrap_xlogdata(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'w');
    buf.put_i64(0x1000);
    buf.put_i64(0x2000);
    buf.put_i64(700_000_000_000_000);
    buf.put_slice(payload);
    buf.freeze()
}

/// One execution's inputs: a short sequence of messages, mostly mutated.
fn generate(rng: &mut Rng, seeds: &[Bytes]) -> Vec<Vec<u8>> {
    (0..1 + rng.below(6))
        .map(|_| {
            let seed = &seeds[rng.below(seeds.len())];
            if rng.below(3) == 0 {
                seed.to_vec()
            } else {
                mutate(rng, seed)
            }
        })
        .collect()
}

/// Runs the inputs through the whole parsing path, as a replication session would.
fn execute(inputs: &[Vec<u8>], columns: &[RelationColumn]) {
    let profile: Profile = GenericMapping::default().into();
    let mapping = profile.bind(columns).ok();
    let mut decoder = PgOutputDecoder::new();
    // A small memory limit, so that spilling and reading back are fuzzed too.
    let mut assembler = TransactionAssembler::with_memory_limit(4096);
    for input in inputs {
        let _ = decode_replication_message(wrap_xlogdata(input));
        let _ = decode_replication_message(Bytes::from(input.clone()));
        let payload = Bytes::from(input.clone());
        let Ok(message) = decoder.decode(payload.clone()) else {
            continue;
        };
        if let (LogicalMessage::Insert(insert), Some(mapping)) = (&message, &mapping) {
            let _ = mapping.map_row(&insert.new);
            let _ = mapping.map_key(&insert.new);
        }
        if let Ok(Assembled::Transaction(transaction)) = assembler.push_payload(message, payload) {
            for change in transaction.into_changes().flatten() {
                if let (LogicalMessage::Update(update), Some(mapping)) = (&change, &mapping) {
                    let _ = mapping.map_row(&update.new);
                }
            }
        }
    }
}

fn main() {
    let seconds: u64 = std::env::var("USERSYNC_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let seeds = seeds();
    let columns: Vec<RelationColumn> = [
        ("id", 25, true),
        ("email", 25, false),
        ("created_at", 1184, false),
        ("meta", 3802, false),
    ]
    .iter()
    .map(|(name, oid, key)| RelationColumn {
        is_key: *key,
        name: (*name).to_owned(),
        type_oid: *oid,
        type_modifier: -1,
    })
    .collect();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut executions = 0u64;
    println!("fuzzing for {seconds}s (seed {seed})");
    while started.elapsed() < Duration::from_secs(seconds) {
        let inputs = generate(&mut rng, &seeds);
        let outcome = catch_unwind(AssertUnwindSafe(|| execute(&inputs, &columns)));
        executions += 1;
        if outcome.is_err() {
            eprintln!("PANIC after {executions} executions; inputs:");
            for input in inputs {
                eprintln!(
                    "  {}",
                    input.iter().map(|b| format!("{b:02x}")).collect::<String>()
                );
            }
            std::process::exit(1);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{executions} executions in {elapsed:.0}s ({:.0}/s), no panic",
        executions as f64 / elapsed
    );
}
