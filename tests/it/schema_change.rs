//! Schema changes on the source while streaming: a new Relation message arrives mid-stream.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unneeded_columns_come_and_go_freely() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('a@example.com');
             ALTER TABLE users ADD COLUMN plan text DEFAULT 'pro';
             INSERT INTO users (email) VALUES ('b@example.com');",
        )
        .await
        .unwrap();
    pair.wait_target(
        "SELECT coalesce(bool_or(raw_json ->> 'plan' = 'pro'), false)
           FROM neon_auth.users_sync WHERE email = 'b@example.com'",
    )
    .await;
    pair.source
        .batch_execute(
            "ALTER TABLE users DROP COLUMN plan;
             ALTER TABLE users RENAME COLUMN display_name TO nickname;
             UPDATE users SET nickname = 'Nick', version = 2 WHERE email = 'b@example.com';",
        )
        .await
        .unwrap();
    pair.wait_target(
        "SELECT coalesce(bool_or(raw_json ->> 'nickname' = 'Nick' AND NOT raw_json ? 'plan'), false)
           FROM neon_auth.users_sync WHERE email = 'b@example.com'",
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_column_disappearing_stops_before_confirming_past_it() {
    let pair = Pair::on(
        shared_server(),
        "CREATE TABLE public.users (id text PRIMARY KEY, mail text, created_at timestamptz DEFAULT now())",
    )
    .await;
    let setup = pair
        .command(&["setup", "--email-column", "mail"])
        .output()
        .unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    for sql in [
        "INSERT INTO users (id, mail) VALUES ('good', 'good@example.com')",
        "ALTER TABLE users DROP COLUMN mail",
    ] {
        pair.source.batch_execute(sql).await.unwrap();
    }
    // The bad transaction commits after this position. The slot may be confirmed up to it
    // (PostgreSQL 14 sends the DDL's transaction, empty, and it may be confirmed as nothing
    // for the target), never past it.
    let before_bad = pair.source_wal_lsn().await;
    pair.source
        .batch_execute("INSERT INTO users (id) VALUES ('after')")
        .await
        .unwrap();
    let output = pair
        .command(&["run", "--email-column", "mail"])
        .output()
        .unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(78), "{said}");
    assert!(said.contains("mail"), "{said}");
    let live: Vec<String> = pair
        .target
        .query("SELECT id FROM neon_auth.users_sync", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(live, vec!["good".to_owned()]);
    let behind: bool = pair
        .source
        .query_one(
            "SELECT s.confirmed_flush_lsn <= $2::text::pg_lsn
               FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&pair.config.slot, &before_bad],
        )
        .await
        .unwrap()
        .get(0);
    assert!(behind, "the slot was confirmed past the bad transaction");
}
