//! A target that goes back in time (a backup restored, a Neon branch reset) while the slot
//! stays where that target had confirmed it: the changes in between are gone from the target
//! and from the slot. `run` must refuse it and name `resync`, never stream on with the gap.
//!
//! That is only decidable if the slot is never confirmed past the target's checkpoint, idle
//! or not: an idle position is written to the checkpoint (durably) before it is confirmed.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Waits until the slot is confirmed past `lsn` by idle traffic alone (heartbeats, another
/// table's transactions).
async fn idle_until_confirmed_past(pair: &Pair, lsn: &str) {
    pair.source
        .batch_execute("CREATE TABLE IF NOT EXISTS other (x int); INSERT INTO other VALUES (1)")
        .await
        .unwrap();
    pair.wait_for_slot_confirmed(lsn, true, "idle traffic never moved the slot on")
        .await;
}

/// The slot's confirmed position and the checkpoint's end, read in that order: the end only
/// grows, so `confirmed <= end` read this way holds at the moment of the first read.
async fn confirmed_and_end(pair: &Pair) -> (bool, String, String) {
    let confirmed = pair.slot_confirmed().await;
    let end = pair.checkpoint_end().await;
    let within: bool = pair
        .source
        .query_one(
            "SELECT $1::text::pg_lsn <= $2::text::pg_lsn",
            &[&confirmed, &end],
        )
        .await
        .unwrap()
        .get(0);
    (within, confirmed, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_never_confirmed_past_the_targets_checkpoint_even_idle() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .execute("INSERT INTO users (email) VALUES ('a@example.com')", &[])
        .await
        .unwrap();
    pair.wait_for_match().await;
    let applied = pair.checkpoint_end().await;
    // Idle for a while: keepalives, heartbeats and another table move the slot on.
    let deadline = Instant::now() + Duration::from_secs(4);
    idle_until_confirmed_past(&pair, &applied).await;
    while Instant::now() < deadline {
        let (within, confirmed, end) = confirmed_and_end(&pair).await;
        assert!(
            within,
            "the slot was confirmed to {confirmed}, past the target's checkpoint {end}: a \
             target restored to that checkpoint could not be told from an intact one"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    let (within, confirmed, end) = confirmed_and_end(&pair).await;
    assert!(
        within,
        "after the stop: confirmed {confirmed}, checkpoint {end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_restored_to_an_earlier_point_is_refused_and_resync_repairs_it() {
    let pair = Pair::new().await;
    pair.setup().await;
    let running = pair.start();
    pair.source
        .execute(
            "INSERT INTO users (email) VALUES ('before@example.com')",
            &[],
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    // The backup: the checkpoint as it is now (the users are restored by deleting the later one).
    let backup = pair
        .target
        .query_one(
            "SELECT commit_lsn::text, end_lsn::text, commit_time FROM usersync.state",
            &[],
        )
        .await
        .unwrap();
    let (commit_lsn, end_lsn): (String, String) = (backup.get(0), backup.get(1));
    let commit_time: Option<std::time::SystemTime> = backup.get(2);
    pair.source
        .execute("INSERT INTO users (email) VALUES ('lost@example.com')", &[])
        .await
        .unwrap();
    pair.wait_for_match().await;
    idle_until_confirmed_past(&pair, &pair.checkpoint_end().await).await;
    running.stop().await;

    // The restore: the target as it was at the backup.
    pair.target
        .execute(
            "UPDATE usersync.state SET commit_lsn = $1::text::pg_lsn, end_lsn = $2::text::pg_lsn,
                    commit_time = $3",
            &[&commit_lsn, &end_lsn, &commit_time],
        )
        .await
        .unwrap();
    pair.target
        .execute(
            "DELETE FROM neon_auth.users_sync WHERE email = 'lost@example.com'",
            &[],
        )
        .await
        .unwrap();
    pair.source
        .execute(
            "INSERT INTO users (email) VALUES ('after@example.com')",
            &[],
        )
        .await
        .unwrap();

    let error = pair.start().failure().await;
    assert_eq!(error.exit_code(), 78, "{error}");
    let said = usersync::error::report(&error);
    assert!(said.contains("usersync resync"), "{said}");
    assert!(said.contains(&end_lsn), "names the checkpoint: {said}");
    // Refused before streaming: nothing of the gap's aftermath was applied either.
    assert_eq!(
        target_user_count(&pair.target).await,
        1,
        "run applied changes to a target with a gap"
    );
    let status = pair.usersync(&["status", "--lag-target", "1h"]);
    assert_eq!(status.status.code(), Some(5), "{}", text(&status));
    assert!(
        text(&status).contains("usersync resync"),
        "{}",
        text(&status)
    );

    let resync = pair.usersync(&["resync"]);
    assert!(resync.status.success(), "{}", text(&resync));
    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
}

/// A checkpoint written by an older usersync, which confirmed idle positions without
/// recording them: its slot is past its checkpoint, and that is no sign of a restore. `run`
/// takes it over once, then keeps the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_an_older_usersync_is_taken_over_not_refused() {
    let pair = Pair::new().await;
    pair.setup().await;
    // The table as older versions created it.
    pair.target
        .batch_execute("ALTER TABLE usersync.state DROP COLUMN bounded_at")
        .await
        .unwrap();
    // As an older usersync did while idle: the slot confirmed past the checkpoint, up to
    // another table's transaction; then a user waits in the slot.
    confirm_idle_as_an_older_usersync(&pair).await;
    pair.source
        .execute(
            "INSERT INTO users (email) VALUES ('pending@example.com')",
            &[],
        )
        .await
        .unwrap();

    let running = pair.start();
    pair.wait_for_match().await;
    running.stop().await;
    let (within, confirmed, end) = confirmed_and_end(&pair).await;
    assert!(within, "confirmed {confirmed}, checkpoint {end}");
    assert!(
        checkpoint_bounded(&pair).await,
        "the older checkpoint was not taken over"
    );
    // And from now on the rule holds: a second start is not refused.
    let running = pair.start();
    pair.source
        .execute(
            "INSERT INTO users (email) VALUES ('later@example.com')",
            &[],
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;

    // An older usersync runs the slot again (a downgrade, an old standby taking over): it
    // writes the checkpoint as it always did, then confirms idle positions past it.
    pair.target
        .batch_execute("UPDATE usersync.state SET updated_at = now()")
        .await
        .unwrap();
    confirm_idle_as_an_older_usersync(&pair).await;
    assert!(!checkpoint_bounded(&pair).await);
    let running = pair.start();
    pair.source
        .execute(
            "INSERT INTO users (email) VALUES ('after-old@example.com')",
            &[],
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
    assert!(checkpoint_bounded(&pair).await);
}

/// Confirms the slot past the checkpoint, up to another table's transaction, as an older
/// usersync did while idle (without recording it on the target).
async fn confirm_idle_as_an_older_usersync(pair: &Pair) {
    pair.source
        .batch_execute("CREATE TABLE IF NOT EXISTS other (x int); INSERT INTO other VALUES (1)")
        .await
        .unwrap();
    let idle = pair.source_wal_lsn().await;
    pair.source
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&pair.config.slot, &idle],
        )
        .await
        .unwrap();
}

/// The upgrade of an older checkpoint table waits for its exclusive lock only briefly (it
/// would otherwise queue every other use of the table behind it): held by someone's open
/// transaction, the session fails transiently and is retried, and goes on once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_behind_a_held_lock_is_retried_not_queued() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute("ALTER TABLE usersync.state DROP COLUMN bounded_at")
        .await
        .unwrap();
    let holder = sql(pair.target_server, &pair.config.target.dbname).await;
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM usersync.state")
        .await
        .unwrap();
    let running = pair.start();
    // Another reader of the table waits behind an attempt of the upgrade (at most its 5 s
    // lock timeout), not for as long as the holder holds the table.
    let reader = sql(pair.target_server, &pair.config.target.dbname).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let read = tokio::time::timeout(
        Duration::from_secs(8),
        reader.query_one("SELECT count(*) FROM usersync.state", &[]),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "a reader waited behind the upgrade's lock"
    );
    assert!(!running.is_finished(), "a held lock ended run");
    assert!(
        running.metrics.reconnects() > 0,
        "the upgrade did not give up waiting and retry"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    pair.source
        .execute(
            "INSERT INTO users (email) VALUES ('after-lock@example.com')",
            &[],
        )
        .await
        .unwrap();
    pair.wait_for_match().await;
    running.stop().await;
    assert!(checkpoint_bounded(&pair).await);
}

/// Whether the checkpoint bounds the slot, as usersync reads it.
async fn checkpoint_bounded(pair: &Pair) -> bool {
    usersync::apply::read_checkpoint(&pair.target, &pair.config.slot)
        .await
        .unwrap()
        .expect("a checkpoint")
        .slot_bounded
}

/// A source that lost WAL the target had seen (a failover to a standby that lacked it): new
/// transactions there may have positions the checkpoint counts as applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_past_the_end_of_the_sources_wal_is_refused() {
    let pair = Pair::new().await;
    pair.setup().await;
    pair.target
        .batch_execute(
            "UPDATE usersync.state SET end_lsn = 'FF/0', updated_at = now(), bounded_at = now()",
        )
        .await
        .unwrap();
    let error = pair.start().failure().await;
    assert_eq!(error.exit_code(), 78, "{error}");
    let said = usersync::error::report(&error);
    assert!(said.contains("past the end of the source's WAL"), "{said}");
    assert!(said.contains("usersync resync"), "{said}");
}
