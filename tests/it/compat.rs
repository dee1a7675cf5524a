//! The harness runs the PostgreSQL versions it is asked for (`scripts/compat-matrix.sh`).

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_servers_run_the_requested_binaries() {
    let pair = Pair::new().await;
    assert_eq!(
        std::ptr::eq(pair.server, pair.target_server),
        !separate_target_server(),
        "one shared server exactly when source and target binaries are the same"
    );
    let sides = [
        (SOURCE_PG_BIN_ENV, pair.server, &pair.source),
        (TARGET_PG_BIN_ENV, pair.target_server, &pair.target),
    ];
    for (variable, server, client) in sides {
        if let Some(dir) = bin_dir_from_env(variable) {
            assert_eq!(server.bin_dir(), dir, "{variable}");
        }
        let running: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            u32::try_from(running).unwrap(),
            server.server_version_num(),
            "{variable}"
        );
    }
}
