//! End-to-end replication through a real slot: every kind of change, batching, TOAST,
//! streamed transactions, restarts.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use usersync::localpg::LocalPg;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_and_deletes_replicate_with_soft_delete() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email, display_name, created_at) VALUES
               ('00000000-0000-0000-0000-000000000001', 'a@example.com', 'Ann', '2024-01-02 03:04:05.678+00'),
               ('00000000-0000-0000-0000-000000000002', 'b@example.com', 'Bob', now()),
               ('00000000-0000-0000-0000-000000000003', 'c@example.com', NULL, now());
             UPDATE users SET display_name = 'Bobby', version = version + 1
              WHERE id = '00000000-0000-0000-0000-000000000002';
             DELETE FROM users WHERE id = '00000000-0000-0000-0000-000000000003';",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    let row = pair
        .target
        .query_one(
            "SELECT raw_json, created_at = '2024-01-02 03:04:05.678+00', deleted_at IS NULL, updated_at IS NOT NULL
               FROM neon_auth.users_sync WHERE id = '00000000-0000-0000-0000-000000000001'",
            &[],
        )
        .await
        .unwrap();
    let raw: serde_json::Value = row.get(0);
    assert_eq!(raw["primary_email"], "a@example.com");
    assert_eq!(raw["display_name"], "Ann");
    assert_eq!(raw["signed_up_at_millis"], 1_704_164_645_678_i64);
    assert_eq!(raw["version"], 1);
    assert!(raw["metadata"].is_object());
    assert!(
        row.get::<_, bool>(1),
        "created_at derives from signed_up_at_millis"
    );
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    let deleted = pair
        .target
        .query_one(
            "SELECT deleted_at IS NOT NULL, email FROM neon_auth.users_sync
              WHERE id = '00000000-0000-0000-0000-000000000003'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        deleted.get::<_, bool>(0),
        "a source delete is a soft delete"
    );
    assert_eq!(
        deleted.get::<_, Option<String>>(1).as_deref(),
        Some("c@example.com")
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinsert_revives_and_truncate_soft_deletes_all() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email) VALUES ('00000000-0000-0000-0000-00000000000a', 'x@example.com');
             DELETE FROM users;
             INSERT INTO users (id, email) VALUES ('00000000-0000-0000-0000-00000000000a', 'x2@example.com');",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.source
        .batch_execute(
            "INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.source.batch_execute("TRUNCATE users").await.unwrap();
    pair.wait_target(
        "SELECT count(*) = 21 AND count(*) FILTER (WHERE deleted_at IS NULL) = 0 FROM neon_auth.users_sync",
    )
    .await;
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email) VALUES ('00000000-0000-0000-0000-00000000000a', 'back@example.com')",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_key_change_soft_deletes_the_old_id() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email) VALUES ('00000000-0000-0000-0000-0000000000b1', 'k@example.com');
             UPDATE users SET id = '00000000-0000-0000-0000-0000000000b2'
              WHERE id = '00000000-0000-0000-0000-0000000000b1';",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.wait_target(
        "SELECT deleted_at IS NOT NULL FROM neon_auth.users_sync WHERE id = '00000000-0000-0000-0000-0000000000b1'",
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_transactions_arrive_exactly_once() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    // One transaction per change, as an identity store writes them.
    pair.source
        .batch_execute(
            "DO $$
             BEGIN
               FOR i IN 1..600 LOOP
                 INSERT INTO users (email, version) VALUES ('m' || i || '@example.com', 1);
                 COMMIT;
                 UPDATE users SET version = version + 1 WHERE email = 'm' || (i / 2 + 1) || '@example.com';
                 COMMIT;
                 IF i % 10 = 0 THEN
                   DELETE FROM users WHERE email = 'm' || (i - 5) || '@example.com';
                   COMMIT;
                 END IF;
               END LOOP;
             END $$;",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert!(running.metrics.batches() <= running.metrics.transactions());
    running.stop().await;
}

/// A `jsonb` column reaches `raw_json` as the document PostgreSQL holds: numbers with every
/// digit (beyond what a 64-bit float holds) and nesting deeper than a JSON library's default
/// limit; a `json` column as `jsonb` reads it (the last of duplicate keys). Through the initial
/// copy and the stream alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_reach_the_target_exactly() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute("ALTER TABLE users ADD COLUMN settings json")
        .await
        .unwrap();
    const DOCUMENTS: &str = r#"
        INSERT INTO users (id, email, metadata, settings)
        SELECT ('00000000-0000-0000-0000-0000000000' || n)::uuid, n || '@example.com',
               jsonb_build_object('n', n, 'exact', 12345678901234567890.123456789012345678901,
                                  'tiny', 1e-40, 'deep', repeat('[', 300) || repeat(']', 300),
                                  'text', E'café "quoted" \\ 	')
               || jsonb_build_object('nested', (repeat('[', 300) || repeat(']', 300))::jsonb),
               ('{"b": 1, "a": [1.5, null], "b": 2}')::json
          FROM generate_series(:from, :to) n"#;
    pair.source
        .batch_execute(&DOCUMENTS.replace(":from", "10").replace(":to", "11"))
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(&DOCUMENTS.replace(":from", "12").replace(":to", "13"))
        .await
        .unwrap();
    pair.wait_target("SELECT count(*) = 4 FROM neon_auth.users_sync")
        .await;
    let source: Vec<(String, String, String)> = pair
        .source
        .query(
            "SELECT id::text, metadata::text, settings::jsonb::text FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let target: Vec<(String, String, String)> = pair
        .target
        .query(
            "SELECT id, (raw_json -> 'metadata')::text, (raw_json -> 'settings')::text
               FROM neon_auth.users_sync ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(source.len(), 4);
    assert_eq!(target.len(), source.len());
    for (target, source) in target.iter().zip(&source) {
        assert_eq!(target.0, source.0);
        assert!(
            target.1 == source.1 && target.2 == source.2,
            "user {}: the target holds {:.60}... and {:.60}..., the source {:.60}... and {:.60}...",
            source.0,
            target.1,
            target.2,
            source.1,
            source.2
        );
    }
    running.stop().await;
}

/// A `json` column may hold what `jsonb` (so `raw_json`) cannot: `\u0000`, a lone surrogate,
/// a number beyond `numeric`. The document is kept whole as a string, so the user still
/// arrives and nothing of the document is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_document_jsonb_cannot_hold_arrives_as_its_text() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute("ALTER TABLE users ADD COLUMN settings json")
        .await
        .unwrap();
    const DOCUMENTS: [&str; 3] = [
        r#"{"note": "a\u0000b", "n": 1}"#,
        r#"{"s": "\ud800"}"#,
        r#"{"n": 1e1000000}"#,
    ];
    let insert = |first: usize| {
        DOCUMENTS
            .iter()
            .enumerate()
            .map(|(n, document)| {
                format!(
                    "INSERT INTO users (id, email, settings)
                     VALUES ('00000000-0000-0000-0000-0000000000{0}', '{0}@example.com', '{document}');",
                    first + n
                )
            })
            .collect::<String>()
    };
    pair.source.batch_execute(&insert(20)).await.unwrap();
    pair.setup().await;
    let running = pair.start();
    pair.source.batch_execute(&insert(30)).await.unwrap();
    pair.wait_target("SELECT count(*) = 6 FROM neon_auth.users_sync")
        .await;
    let kept: Vec<String> = pair
        .target
        .query(
            "SELECT raw_json ->> 'settings' FROM neon_auth.users_sync ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(kept, [DOCUMENTS, DOCUMENTS].concat());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_keeps_the_value_on_the_target() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute("ALTER TABLE users ALTER COLUMN metadata SET STORAGE EXTERNAL")
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    // ~8 KB of incompressible JSON: stored out of line (TOAST).
    pair.source
        .batch_execute(
            "INSERT INTO users (id, email, metadata)
             SELECT '00000000-0000-0000-0000-0000000000c1', 't@example.com',
                    jsonb_build_object('blob', string_agg(md5(g::text), ''))
               FROM generate_series(1, 250) g;
             UPDATE users SET display_name = 'Toasty', version = 2
              WHERE id = '00000000-0000-0000-0000-0000000000c1';",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    // A second update in its own transaction, applied against the row already on the target.
    pair.source
        .batch_execute(
            "UPDATE users SET version = 3 WHERE id = '00000000-0000-0000-0000-0000000000c1'",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    let source_blob: String = pair
        .source
        .query_one("SELECT metadata ->> 'blob' FROM users", &[])
        .await
        .unwrap()
        .get(0);
    let target_blob: Option<String> = pair
        .target
        .query_one(
            "SELECT raw_json -> 'metadata' ->> 'blob' FROM neon_auth.users_sync",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(target_blob.as_deref(), Some(source_blob.as_str()));
    running.stop().await;
}

/// A primary-key change sends the new row's large values as "unchanged TOAST": they are on
/// the target under the *old* id, whether the old row reached the target in an earlier batch
/// or in the same one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_change_keeps_unchanged_toast_values() {
    let pair = Pair::new().await;
    pair.source
        .batch_execute("ALTER TABLE users ALTER COLUMN metadata SET STORAGE EXTERNAL")
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    // ~8 KB of incompressible JSON each: stored out of line (TOAST).
    let insert = |id: &str| {
        format!(
            "INSERT INTO users (id, email, metadata)
             SELECT '{id}', '{id}@example.com',
                    jsonb_build_object('blob', string_agg(md5(g::text || '{id}'), ''))
               FROM generate_series(1, 250) g;"
        )
    };
    let (earlier, moved_earlier) = (
        "00000000-0000-0000-0000-0000000000d1",
        "00000000-0000-0000-0000-0000000000d2",
    );
    let (reused, moved_reused) = (
        "00000000-0000-0000-0000-0000000000f1",
        "00000000-0000-0000-0000-0000000000f2",
    );
    pair.source
        .batch_execute(&format!("{}{}", insert(earlier), insert(reused)))
        .await
        .unwrap();
    pair.wait_for_match().await;
    // The old row is on the target: the move comes in a batch of its own.
    pair.source
        .batch_execute(&format!(
            "UPDATE users SET id = '{moved_earlier}' WHERE id = '{earlier}'"
        ))
        .await
        .unwrap();
    // The old id is taken again by another user in the same batch: the moved user's values
    // are still the ones the old id held before.
    pair.source
        .batch_execute(&format!(
            "BEGIN; UPDATE users SET id = '{moved_reused}' WHERE id = '{reused}';
             INSERT INTO users (id, email, metadata) VALUES ('{reused}', 'new@example.com', '{{}}');
             COMMIT;"
        ))
        .await
        .unwrap();
    // The old row and the move in one source transaction (so one batch).
    let (same, moved_same) = (
        "00000000-0000-0000-0000-0000000000e1",
        "00000000-0000-0000-0000-0000000000e2",
    );
    pair.source
        .batch_execute(&format!(
            "BEGIN; {} UPDATE users SET id = '{moved_same}' WHERE id = '{same}'; COMMIT;",
            insert(same)
        ))
        .await
        .unwrap();
    pair.wait_for_match().await;
    for new in [moved_earlier, moved_same, moved_reused] {
        let source_blob: String = pair
            .source
            .query_one(
                "SELECT metadata ->> 'blob' FROM users WHERE id = $1::text::uuid",
                &[&new],
            )
            .await
            .unwrap()
            .get(0);
        let target_blob: Option<String> = pair
            .target
            .query_one(
                "SELECT raw_json -> 'metadata' ->> 'blob' FROM neon_auth.users_sync WHERE id = $1",
                &[&new],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            target_blob.as_ref().map(String::len),
            Some(source_blob.len()),
            "the moved user {new} keeps its unchanged TOAST value"
        );
        assert_eq!(target_blob.as_deref(), Some(source_blob.as_str()));
    }
    // The old ids: soft-deleted, or (taken again) the new user's.
    let old_ids: Vec<(String, bool, Option<String>)> = pair
        .target
        .query(
            "SELECT id, deleted_at IS NOT NULL, raw_json ->> 'primary_email'
               FROM neon_auth.users_sync WHERE id = ANY($1) ORDER BY id",
            &[&vec![earlier, same, reused]],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        old_ids,
        vec![
            (
                earlier.to_owned(),
                true,
                Some(format!("{earlier}@example.com"))
            ),
            (same.to_owned(), true, Some(format!("{same}@example.com"))),
            (reused.to_owned(), false, Some("new@example.com".to_owned())),
        ]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_transactions_with_savepoint_rollback() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    // Far more than logical_decoding_work_mem (64kB on the shared server): streamed in
    // protocol 2 while in progress, with a rolled-back subtransaction in the middle.
    pair.source
        .batch_execute(
            "BEGIN;
             INSERT INTO users (email) SELECT 'big' || g || '@example.com' FROM generate_series(1, 3000) g;
             SAVEPOINT s1;
             INSERT INTO users (email) SELECT 'gone' || g || '@example.com' FROM generate_series(1, 2000) g;
             ROLLBACK TO SAVEPOINT s1;
             UPDATE users SET version = 2 WHERE email LIKE 'big1%';
             COMMIT;
             BEGIN;
             INSERT INTO users (email) SELECT 'aborted' || g || '@example.com' FROM generate_series(1, 3000) g;
             ROLLBACK;",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
}

/// Streamed transactions (stream_txns) and stream blocks (stream_count) the source has sent
/// from `slot`, once its statistics are reported.
async fn streamed(pair: &Pair, slot: &str) -> (i64, i64) {
    let row = pair
        .source
        .query_opt(
            "SELECT stream_txns, stream_count FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.map_or((0, 0), |row| (row.get(0), row.get(1)))
}

/// Waits (a bounded time) for `slot`'s statistics to count `transactions` streamed ones.
async fn wait_streamed(pair: &Pair, slot: &str, transactions: i64) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = streamed(pair, slot).await;
        if seen.0 >= transactions || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server of its own with PostgreSQL's default `logical_decoding_work_mem` (64MB), and
/// its slot statistics to itself: PostgreSQL 14 sends them over a lossy channel, which the
/// shared server's traffic could overflow.
fn default_decoding_memory_server() -> &'static LocalPg {
    static SERVER: OnceLock<LocalPg> = OnceLock::new();
    SERVER.get_or_init(|| start_server(Vec::new()))
}

/// One transaction of `rows` users with a 1kB document each, applied.
async fn large_transaction(pair: &Pair, rows: usize) {
    pair.source
        .batch_execute(&format!(
            "INSERT INTO users (email, metadata)
             SELECT 'big' || g || '-' || gen_random_uuid() || '@example.com',
                    jsonb_build_object('pad', repeat('x', 1000))
               FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    pair.wait_for_match().await;
}

/// Replicates one transaction of `rows` users, which must be the `nth` the source streamed
/// from the slot; returns the stream blocks it has sent from the slot in all.
async fn stream_one(pair: &Pair, rows: usize, nth: i64) -> i64 {
    let running = pair.start();
    large_transaction(pair, rows).await;
    let (transactions, blocks) = wait_streamed(pair, &pair.config.slot, nth).await;
    running.stop().await;
    assert_eq!(
        transactions, nth,
        "transaction {nth} was streamed while open"
    );
    blocks
}

/// A large transaction reaches usersync while it is still open (streamed) on a source whose
/// `logical_decoding_work_mem` is the default 64MB: usersync caps it at 8MB for its session,
/// so after the commit only the last few megabytes are left to decode and send. A lower
/// setting of the source stays, one the source URL sets stays, and a source that refuses
/// the cap is still replicated from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_streams_while_open_whatever_the_sources_limit() {
    let mut pair = Pair::on(default_decoding_memory_server(), USERS_TABLE).await;
    let role_limit = |value: Option<&str>| {
        let change = value.map_or("RESET logical_decoding_work_mem".to_owned(), |value| {
            format!("SET logical_decoding_work_mem = '{value}'")
        });
        format!(
            "ALTER ROLE {} IN DATABASE {} {change}",
            pair.config.source.user, pair.config.source.dbname
        )
    };
    pair.setup().await;

    // About 14MB in the walsender's memory: under the server's 64MB, over the cap.
    let blocks = stream_one(&pair, 12_000, 1).await;
    assert!((1..=3).contains(&blocks), "in blocks of 8MB: {blocks}");

    // Lower than the cap, for the role: it stays.
    pair.source
        .batch_execute(&role_limit(Some("64kB")))
        .await
        .unwrap();
    let after = stream_one(&pair, 2_000, 2).await;
    assert!(
        after - blocks >= 20,
        "in blocks of 64kB: {}",
        after - blocks
    );
    pair.source.batch_execute(&role_limit(None)).await.unwrap();

    // Set by the source URL, higher than the cap: it stays too. (A streamed transaction's
    // count of blocks includes the last one, sent at its commit.)
    pair.config.source.options = Some("-c logical_decoding_work_mem=32MB".into());
    let latest = stream_one(&pair, 34_000, 3).await;
    assert!(
        (1..=3).contains(&(latest - after)),
        "in blocks of 32MB (6 or more of 8MB): {}",
        latest - after
    );
    pair.config.source.options = None;

    // A source that refuses the cap: replicated from all the same, at its own limit.
    pair.source
        .batch_execute(
            "REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC",
        )
        .await
        .unwrap();
    let running = pair.start();
    large_transaction(&pair, 100).await;
    running.stop().await;
}

/// Without heartbeats, keepalives move the slot on while a streamed transaction is still open
/// (usersync holds it until its commit, which comes after any position the server has sent),
/// and a restart before its commit gets it again, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_advance_the_slot_past_an_open_streamed_transaction() {
    let mut pair = Pair::new().await;
    pair.config.heartbeat_interval = None;
    pair.setup().await;
    let running = pair.start();
    // Over the shared server's 64kB: streamed while open.
    let open = sql(pair.server, &pair.config.source.dbname).await;
    open.batch_execute(
        "BEGIN;
         INSERT INTO users (email) SELECT 'open' || g || '@example.com' FROM generate_series(1, 2000) g",
    )
    .await
    .unwrap();
    // Nothing commits: only keepalives tell usersync the WAL moved on past it (no transaction
    // of its own, not even an empty one, which PostgreSQL 14 would send).
    let written = pair.source_wal_lsn().await;
    pair.wait_for_slot_confirmed(
        &written,
        false,
        "the slot never advanced while a streamed transaction was open",
    )
    .await;
    running.stop().await;
    open.batch_execute("COMMIT").await.unwrap();
    let running = pair.start();
    pair.wait_for_match().await;
    assert_eq!(target_user_count(&pair.target).await, 2000);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_checkpoint_without_doubling() {
    let pair = Pair::new().await;
    pair.setup().await;
    install_write_log(&pair.target).await;
    for round in 1..=3 {
        let running = pair.start();
        pair.source
            .batch_execute(&format!(
                "INSERT INTO users (email) VALUES ('r{round}a@example.com'), ('r{round}b@example.com');
                 UPDATE users SET version = version + 1;"
            ))
            .await
            .unwrap();
        pair.wait_for_match().await;
        running.stop().await;
        // Changes made while usersync is down are picked up by the next round.
        pair.source
            .batch_execute(&format!(
                "INSERT INTO users (email) VALUES ('down{round}@example.com')"
            ))
            .await
            .unwrap();
    }
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
    assert_write_log_ordered(&pair.target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_is_confirmed_past_unrelated_writes() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.source
        .batch_execute("CREATE TABLE unrelated (n int)")
        .await
        .unwrap();
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('idle@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.source
        .batch_execute("INSERT INTO unrelated SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let written = pair.source_wal_lsn().await;
    pair.wait_for_slot_confirmed(&written, false, "the idle slot never advanced")
        .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_target_without_updated_at_is_used_as_is() {
    // Superuser: it creates users_sync in an older shape first, which the target role
    // script would already have created in Neon's.
    let pair = Pair::as_superuser().await;
    pair.target
        .batch_execute(USERS_SYNC_WITHOUT_UPDATED_AT)
        .await
        .unwrap();
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('old@example.com'), ('gone@example.com');
             DELETE FROM users WHERE email = 'gone@example.com';",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    pair.wait_target("SELECT count(*) = 1 FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL")
        .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_another_source_system_is_refused() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('sys@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
    pair.target
        .batch_execute("UPDATE usersync.state SET system_identifier = '42'")
        .await
        .unwrap();
    let error = pair.start().failure().await;
    assert!(!error.is_transient());
    assert!(error.to_string().contains("source system 42"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_failover_makes_a_failover_slot_where_the_source_has_them() {
    let pair = Pair::new().await;
    let version: i32 = pair
        .source
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let output = pair.usersync(&["setup", "--failover"]);
    if version < 170_000 {
        assert_eq!(output.status.code(), Some(78), "{}", text(&output));
        assert!(
            text(&output).contains("--failover needs PostgreSQL 17"),
            "{}",
            text(&output)
        );
        return;
    }
    assert!(output.status.success(), "{}", text(&output));
    let failover: bool = pair
        .source
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&pair.config.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover);
    let running = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('failover@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
    // resync recreates it as a failover slot.
    let resync = pair.usersync(&["resync"]);
    assert!(resync.status.success(), "{}", text(&resync));
    assert!(text(&resync).contains("(failover)"), "{}", text(&resync));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_past_the_spill_threshold_go_through_disk_whole() {
    let mut pair = Pair::new().await;
    pair.config.spill_threshold = 64 << 10;
    pair.setup().await;
    // Which target transactions wrote users: a large source transaction is applied in parts,
    // all in one target transaction.
    pair.target
        .batch_execute(
            "CREATE TABLE write_txids (txid bigint);
             CREATE FUNCTION log_txid() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
               INSERT INTO write_txids VALUES (txid_current());
               RETURN NULL;
             END $$;
             CREATE TRIGGER log_txid AFTER INSERT OR UPDATE ON neon_auth.users_sync
               FOR EACH STATEMENT EXECUTE FUNCTION log_txid();",
        )
        .await
        .unwrap();
    let running = pair.start();
    // Several times the spill threshold, and more changes than one batch holds; a
    // subtransaction rolled back after the spill began, updates and deletes after it.
    pair.source
        .batch_execute(
            "BEGIN;
             INSERT INTO users (email) SELECT 'big' || g || '@example.com' FROM generate_series(1, 25000) g;
             SAVEPOINT s1;
             INSERT INTO users (email) SELECT 'gone' || g || '@example.com' FROM generate_series(1, 5000) g;
             ROLLBACK TO SAVEPOINT s1;
             UPDATE users SET version = 2 WHERE email LIKE 'big1%';
             DELETE FROM users WHERE email LIKE 'big2%';
             COMMIT;",
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
    let target_transactions: i64 = pair
        .target
        .query_one("SELECT count(DISTINCT txid) FROM write_txids", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(target_transactions, 1, "the source transaction was split");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_checkpoint_writes_nothing_of_its_batch() {
    use usersync::apply::{ApplyError, Batch, CommitPosition, TargetWriter};
    let pair = Pair::new().await;
    pair.setup().await;
    let checkpoint = usersync::apply::read_checkpoint(&pair.target, &pair.config.slot)
        .await
        .unwrap()
        .expect("setup wrote a checkpoint");
    // Another writer has taken the checkpoint past what the batch covers.
    pair.target
        .execute(
            "UPDATE usersync.state SET end_lsn = 'FFFF/0' WHERE slot_name = $1",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    let (client, connection) = tokio_postgres::connect(&pair.target_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let shape = usersync::apply::check_shape(&client).await.unwrap();
    let mut writer = TargetWriter::new(client, shape, &pair.config.slot, &checkpoint.system_id)
        .await
        .unwrap();
    let mut batch = Batch::new();
    let mut raw_json = serde_json::Map::new();
    raw_json.insert("id".into(), "refused".into());
    batch.upsert(
        usersync::map::MappedUser {
            id: "refused".into(),
            raw_json: raw_json.into(),
            unchanged_keys: Vec::new(),
        },
        0,
    );
    batch.commit(
        CommitPosition {
            commit_lsn: usersync::lsn::Lsn(0x100),
            end_lsn: usersync::lsn::Lsn(0x200),
            commit_time: 0,
        },
        true,
    );
    let error = writer.apply(&batch).await.unwrap_err();
    assert!(
        matches!(error, ApplyError::CheckpointRefused { .. }),
        "{error}"
    );
    assert_eq!(
        target_user_count(&pair.target).await,
        0,
        "the batch's users were written without its checkpoint"
    );
}

/// A batch written beside the one before it (a second connection, while a backlog drains)
/// commits only once that one has, and not at all if that one rolls back: its checkpoint moves
/// from exactly where the one before leaves it. A user both write ends as the later one left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_beside_another_commits_only_after_it() {
    use usersync::apply::{ApplyError, Batch, CommitPosition, TargetWriter};
    use usersync::lsn::Lsn;
    let pair = Pair::new().await;
    pair.setup().await;
    let checkpoint = usersync::apply::read_checkpoint(&pair.target, &pair.config.slot)
        .await
        .unwrap()
        .expect("setup wrote a checkpoint");
    let first_end = Lsn(checkpoint.end_lsn.0 + 0x1000);
    let second_end = Lsn(first_end.0 + 0x100);
    // Users (id, display name), committed at the source just before `end`.
    let batch_of = |users: &[(&str, &str)], end: Lsn| {
        let mut batch = Batch::new();
        for (id, name) in users {
            let mut raw_json = serde_json::Map::new();
            raw_json.insert("id".into(), (*id).into());
            raw_json.insert("display_name".into(), (*name).into());
            batch.upsert(
                usersync::map::MappedUser {
                    id: (*id).into(),
                    raw_json: raw_json.into(),
                    unchanged_keys: Vec::new(),
                },
                0,
            );
        }
        batch.commit(
            CommitPosition {
                commit_lsn: Lsn(end.0 - 0x10),
                end_lsn: end,
                commit_time: 0,
            },
            true,
        );
        batch
    };
    let writer = || async {
        let (client, connection) = tokio_postgres::connect(&pair.target_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let shape = usersync::apply::check_shape(&client).await.unwrap();
        TargetWriter::new(client, shape, &pair.config.slot, &checkpoint.system_id)
            .await
            .unwrap()
    };
    let names = || async {
        let rows = pair
            .target
            .query("SELECT id, name FROM neon_auth.users_sync ORDER BY id", &[])
            .await
            .unwrap();
        rows.iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };

    // The slot's lock, held by a connection of the same process: the batch beside commits
    // only while it is.
    let (locker, connection) = tokio_postgres::connect(&pair.target_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = locker
        .query_one(
            "SELECT pid, backend_start FROM pg_stat_activity, \
               (SELECT pg_advisory_lock(hashtextextended('usersync:' || $1, 0))) AS l \
              WHERE pid = pg_backend_pid()",
            &[&pair.config.slot],
        )
        .await
        .unwrap();
    let holder = usersync::apply::Session {
        pid: row.get(0),
        started: row.get(1),
    };

    #[derive(PartialEq)]
    enum Case {
        BeforeRollsBack,
        LockLost,
        BeforeCommits,
    }
    for case in [Case::BeforeRollsBack, Case::LockLost, Case::BeforeCommits] {
        let commits = case != Case::BeforeRollsBack;
        let mut first = writer().await;
        let first_batch = batch_of(&[("shared", "first")], first_end);
        first.begin_holding_checkpoint().await.unwrap();
        let mut second = writer().await;
        second.check_lock_held_by(holder);
        if case == Case::LockLost {
            // Another session of its own is not the holder.
            second.check_lock_held_by(first.session().await.unwrap());
        }
        let mut second_batch = batch_of(&[("beside", "second"), ("shared", "second")], second_end);
        assert!(second_batch
            .split_beside(&first_batch.user_keys().unwrap())
            .is_some());
        let (held, mut holding) = tokio::sync::oneshot::channel();
        let task =
            tokio::spawn(async move { second.apply_after(&second_batch, first_end, held).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        if task.is_finished() {
            panic!(
                "the batch beside did not wait for the one before: {:?}",
                task.await.unwrap()
            );
        }
        assert_eq!(target_user_count(&pair.target).await, 0);
        assert!(
            holding.try_recv().is_err(),
            "the batch beside held the checkpoint row while the one before did"
        );
        if commits {
            first.apply(&first_batch).await.unwrap();
        } else {
            first.abandon().await.unwrap();
        }
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the batch beside ended")
            .unwrap();
        let held = usersync::apply::read_checkpoint(&pair.target, &pair.config.slot)
            .await
            .unwrap()
            .unwrap();
        if case == Case::LockLost {
            let error = result.unwrap_err();
            assert!(matches!(error, ApplyError::LockLost), "{error}");
            assert!(error.is_transient());
            assert_eq!(
                names().await,
                [("shared".to_owned(), "first".to_owned())],
                "a batch beside committed without the slot's lock held"
            );
            assert_eq!(held.end_lsn, first_end);
            // The next case starts from scratch.
            pair.target
                .batch_execute(&format!(
                    "DELETE FROM neon_auth.users_sync; UPDATE usersync.state SET end_lsn = '{}'",
                    checkpoint.end_lsn
                ))
                .await
                .unwrap();
        } else if commits {
            result.expect("the batch beside commits after the one before");
            assert!(
                holding.try_recv().is_ok(),
                "the batch beside held the row in turn"
            );
            assert_eq!(
                names().await,
                [
                    ("beside".to_owned(), "second".to_owned()),
                    ("shared".to_owned(), "second".to_owned())
                ],
                "the later batch's values win"
            );
            assert_eq!(held.end_lsn, second_end);
        } else {
            let error = result.unwrap_err();
            assert!(
                matches!(error, ApplyError::CheckpointRefused { .. }),
                "{error}"
            );
            assert_eq!(
                target_user_count(&pair.target).await,
                0,
                "a batch committed past one that rolled back"
            );
            assert_eq!(held.end_lsn, checkpoint.end_lsn);
        }
    }
}
