//! Two `run` for one slot: exactly one replicates, the other stands by and takes over.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replicates_the_other_stands_by_and_takes_over() {
    let pair = Pair::new().await;
    pair.setup().await;
    let first = pair.start();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('one@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    let second = pair.start();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(first.metrics.is_ready(), "the first one replicates");
    assert!(!second.metrics.is_ready(), "the second one stands by");
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('two@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert_eq!(
        second.metrics.transactions(),
        0,
        "the standby applied nothing"
    );
    // The active one dies (its connections drop): the standby takes over.
    first.abort();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('three@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    assert!(second.metrics.is_ready());
    assert!(second.metrics.transactions() > 0);
    second.stop().await;
}
