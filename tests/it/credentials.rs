//! Credentials never reach the target, nor the wire (issue #12): a users table with a
//! password hash and a token, replicated with the generic profile. The strongest check
//! records every byte between usersync and the source (a loopback proxy, no TLS) and reads
//! the spill file of a large transaction while it is open, and finds no planted secret in
//! either; the publication's column list (PostgreSQL 15+) is why. On 14, which has no column
//! lists, only `raw_json` is checked (and the tests about the lists end early).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cli::send_signal;
use crate::harness::*;

/// The users table of most tests here, with two credentials beside the usual columns.
const USERS_WITH_CREDENTIALS: &str = "
CREATE TABLE public.users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text,
    display_name  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    version       int NOT NULL DEFAULT 1,
    metadata      jsonb NOT NULL DEFAULT '{}',
    password_hash text,
    reset_token   text
)";

/// Every planted credential value starts with this.
const SECRET: &str = "planted-secret";

/// The columns the generic profile uses of [`USERS_WITH_CREDENTIALS`].
const USED: [&str; 6] = [
    "id",
    "email",
    "display_name",
    "created_at",
    "version",
    "metadata",
];

/// Whether the source has publication column lists (PostgreSQL 15+). On 14 every column
/// crosses the wire, as documented: only `raw_json` is kept clean there.
fn column_lists(pair: &Pair) -> bool {
    pair.server.server_version_num() >= 150_000
}

/// `pg_publication_tables.attnames` of the pair's users table.
async fn published_columns(pair: &Pair) -> Vec<String> {
    pair.source
        .query_one(
            "SELECT attnames::text[] FROM pg_publication_tables
              WHERE pubname = 'usersync' AND tablename = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// How many target users have a credential key of [`USERS_WITH_CREDENTIALS`], or a planted
/// value anywhere in `raw_json`.
async fn users_with_credentials(pair: &Pair) -> i64 {
    users_with_any_of(pair, &["password_hash", "reset_token"]).await
}

/// How many target users have one of `keys`, or a planted value anywhere in `raw_json`.
async fn users_with_any_of(pair: &Pair, keys: &[&str]) -> i64 {
    pair.target
        .query_one(
            &format!(
                "SELECT count(*) FROM neon_auth.users_sync
                  WHERE raw_json ?| $1 OR raw_json::text LIKE '%{SECRET}%'"
            ),
            &[&keys],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_cross_neither_the_wire_nor_the_spill_file_nor_reach_raw_json() {
    // Superuser: setup may then set the publication's column list itself.
    let pair = Pair::on_as_superuser(shared_server(), USERS_WITH_CREDENTIALS).await;
    pair.source
        .batch_execute(&format!(
            "INSERT INTO users (email, password_hash, reset_token)
             VALUES ('copied@example.com', '{SECRET}-hash-0', '{SECRET}-token-0')"
        ))
        .await
        .unwrap();
    let proxy = RecordingProxy::start(pair.server.port()).await;
    let via_proxy = pair.source_url.replace(
        &format!(":{}/", pair.server.port()),
        &format!(":{}/", proxy.port),
    );

    // The initial copy goes through the proxy too.
    let setup = pair
        .command(&["setup"])
        .env("USERSYNC_SOURCE_URL", &via_proxy)
        .output()
        .unwrap();
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains("never copied: password_hash, reset_token"),
        "{said}"
    );
    let lists = column_lists(&pair);
    if lists {
        assert!(
            said.contains(
                "publication usersync: public.users publishes only the columns the mapping \
                 uses: id, email, display_name, created_at, version, metadata"
            ),
            "{said}"
        );
        assert_eq!(published_columns(&pair).await, USED);
    }

    // A transaction far past the spill threshold, left open: the server streams it (its
    // logical_decoding_work_mem is 64kB), and usersync keeps it in a spill file until it
    // commits, so the file can be read while it exists.
    let spill_dir = std::env::temp_dir().join(unique("usersync-spill-dir"));
    std::fs::create_dir(&spill_dir).unwrap();
    let mut run = pair
        .command(&["run", "--spill-threshold", "64kB"])
        .env("USERSYNC_SOURCE_URL", &via_proxy)
        .env("TMPDIR", &spill_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writer = sql(pair.server, &pair.config.source.dbname).await;
    writer
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO users (email, password_hash, reset_token)
             SELECT 'spilled' || g || '@example.com', '{SECRET}-hash-' || g, '{SECRET}-token-' || g
               FROM generate_series(1, 20000) g;"
        ))
        .await
        .unwrap();
    let (spilled, mode) = read_open_spill_file(&mut run, &spill_dir, "spilled1").await;
    assert_eq!(mode & 0o777, 0o600, "the spill file's mode is {mode:o}");
    assert_eq!(
        contains(&spilled, SECRET),
        !lists,
        "a secret in the spill file (expected only without column lists)"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    pair.wait_target("SELECT count(*) = 20001 FROM neon_auth.users_sync")
        .await;
    send_signal(run.id(), "TERM");
    let stopped = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(stopped.status.success(), "{}", text(&stopped));
    std::fs::remove_dir_all(&spill_dir).unwrap();

    assert_eq!(users_with_credentials(&pair).await, 0);
    let streams = proxy.streams();
    assert!(
        streams.iter().any(|bytes| contains(bytes, "spilled20000@")),
        "the proxy saw the rows go by"
    );
    assert!(
        streams
            .iter()
            .any(|bytes| contains(bytes, "copied@example")),
        "the proxy saw the initial copy"
    );
    if lists {
        for bytes in &streams {
            assert!(!contains(bytes, SECRET), "a secret crossed the wire");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_options_change_the_column_list_and_raw_json() {
    let mut pair = Pair::on_as_superuser(shared_server(), USERS_WITH_CREDENTIALS).await;
    if !column_lists(&pair) {
        eprintln!("skipped: no publication column lists before PostgreSQL 15");
        return;
    }
    let setup = pair.usersync(&["setup"]);
    assert!(setup.status.success(), "{}", text(&setup));
    assert_eq!(published_columns(&pair).await, USED);

    // A deny-list: metadata leaves raw_json and the column list, and setup says so.
    let excluded = pair.usersync(&["setup", "--exclude-columns", "metadata"]);
    let said = text(&excluded);
    assert!(excluded.status.success(), "{said}");
    assert!(
        said.contains(
            "columns: not copied, on top of the profile's rule (--exclude-columns): metadata"
        ),
        "{said}"
    );
    assert!(
        said.contains("never copied: metadata (--exclude-columns), password_hash, reset_token"),
        "{said}"
    );
    assert!(
        said.contains(
            "publication usersync: column list of public.users changed to id, email, \
             display_name, created_at, version"
        ),
        "{said}"
    );
    assert_eq!(published_columns(&pair).await, &USED[..5]);

    // An allow-list may name a column that only looks like a credential.
    pair.source
        .batch_execute("ALTER TABLE users ADD COLUMN password_changed_at timestamptz")
        .await
        .unwrap();
    let included = pair
        .command(&["setup"])
        .env("USERSYNC_INCLUDE_COLUMNS", "version,password_changed_at")
        .output()
        .unwrap();
    let said = text(&included);
    assert!(included.status.success(), "{said}");
    assert!(
        said.contains("passed through: version, password_changed_at"),
        "{said}"
    );
    assert_eq!(
        published_columns(&pair).await,
        [
            "id",
            "email",
            "display_name",
            "created_at",
            "version",
            "password_changed_at"
        ]
    );
    pair.config.mapping = usersync::map::GenericMapping {
        columns: usersync::map::ColumnSelection::Include(vec![
            "version".into(),
            "password_changed_at".into(),
        ]),
        ..Default::default()
    }
    .into();
    let running = pair.start();
    pair.source
        .batch_execute(&format!(
            "INSERT INTO users (email, password_hash, password_changed_at, metadata)
             VALUES ('a@example.com', '{SECRET}', '2024-01-02 03:04:05+00', '{{\"plan\": 1}}')"
        ))
        .await
        .unwrap();
    pair.wait_target("SELECT count(*) = 1 FROM neon_auth.users_sync")
        .await;
    running.stop().await;
    let raw: serde_json::Value = pair
        .target
        .query_one("SELECT raw_json FROM neon_auth.users_sync", &[])
        .await
        .unwrap()
        .get(0);
    let mut keys: Vec<&str> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "display_name",
            "id",
            "password_changed_at",
            "primary_email",
            "primary_email_verified",
            "signed_up_at_millis",
            "version"
        ]
    );

    // Mistakes stop setup before it changes anything, and run before it streams.
    let before = published_columns(&pair).await;
    for (args, code, needle) in [
        (
            &["setup", "--exclude-columns", "metadata,nickname"][..],
            78,
            "--exclude-columns names nickname, which the table does not have (its columns: \
             id, email, display_name, created_at, version, metadata, password_hash, \
             reset_token, password_changed_at)",
        ),
        (
            &["setup", "--exclude-columns", "email"],
            78,
            "column email cannot be excluded",
        ),
        (
            &["run", "--include-columns", "version,nickname"],
            78,
            "--include-columns names nickname, which the table does not have",
        ),
        (
            &["setup", "--include-columns", "a", "--exclude-columns", "b"],
            2,
            "cannot be used with",
        ),
    ] {
        let output = pair.usersync(args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&output)
        );
        assert!(
            text(&output).contains(needle),
            "{args:?}: {}",
            text(&output)
        );
    }
    assert_eq!(published_columns(&pair).await, before);

    // PostgreSQL keeps a listed column from being dropped (or retyped): a migration of the
    // source table leaves the column out first.
    let refused = pair
        .source
        .batch_execute("ALTER TABLE users DROP COLUMN version")
        .await
        .unwrap_err();
    assert!(format!("{refused:?}").contains("depend"), "{refused:?}");
    let narrowed = pair.usersync(&["setup", "--include-columns", "password_changed_at"]);
    assert!(narrowed.status.success(), "{}", text(&narrowed));
    pair.source
        .batch_execute("ALTER TABLE users DROP COLUMN version")
        .await
        .expect("a column no longer listed can be dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_role_gets_the_statement_for_the_owner() {
    // The role script published the table without a column list, as its owner.
    let pair = Pair::on(shared_server(), USERS_WITH_CREDENTIALS).await;
    if !column_lists(&pair) {
        eprintln!("skipped: no publication column lists before PostgreSQL 15");
        return;
    }
    let setup = pair.usersync(&["setup"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(
        said.contains(
            "warning: publication usersync publishes columns of public.users that usersync \
             does not use (password_hash, reset_token), and this role may not change it"
        ),
        "{said}"
    );
    let owner_sql = owner_statement(&said);
    // One transaction: a change committed between the DROP and the ADD would not be published.
    assert!(
        owner_sql
            .starts_with(r#"BEGIN; ALTER PUBLICATION "usersync" DROP TABLE "public"."users"; "#),
        "{said}"
    );
    assert!(owner_sql.trim_end().ends_with("; COMMIT"), "{said}");
    pair.source.batch_execute(&owner_sql).await.unwrap();
    assert_eq!(published_columns(&pair).await, USED);
    let again = pair.usersync(&["setup"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(!text(&again).contains("warning"), "{}", text(&again));

    // A list that lacks a column the mapping uses stops setup, and run.
    let lacking = pair.usersync(&["setup", "--include-columns", "reset_token"]);
    let said = text(&lacking);
    assert_eq!(lacking.status.code(), Some(78), "{said}");
    assert!(said.contains("have the owner run: "), "{said}");
    pair.source
        .batch_execute(
            r#"ALTER PUBLICATION usersync SET TABLE public.users (id, created_at, version)"#,
        )
        .await
        .unwrap();
    let run = pair.usersync(&["run"]);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(78), "{said}");
    assert!(
        said.contains(
            "publication usersync does not publish column(s) email, display_name of \
             public.users, which the mapping reads"
        ),
        "{said}"
    );
    assert!(said.contains("run usersync setup"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_identity_is_every_column_gets_no_column_list() {
    let pair = Pair::on_as_superuser(shared_server(), USERS_WITH_CREDENTIALS).await;
    if !column_lists(&pair) {
        eprintln!("skipped: no publication column lists before PostgreSQL 15");
        return;
    }
    let setup = pair.usersync(&["setup"]);
    assert!(setup.status.success(), "{}", text(&setup));
    assert_eq!(published_columns(&pair).await, USED);
    // PostgreSQL refuses writes to a table with REPLICA IDENTITY FULL while a publication
    // lists some of its columns; setup is the fix, and says what it did.
    pair.source
        .batch_execute(
            "INSERT INTO users (email) VALUES ('a@example.com');
             ALTER TABLE users REPLICA IDENTITY FULL",
        )
        .await
        .unwrap();
    let refused = pair
        .source
        .batch_execute("UPDATE users SET version = 2")
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("does not cover the replica identity")
            || format!("{refused:?}").contains("does not cover the replica identity"),
        "{refused:?}"
    );
    let again = pair.usersync(&["setup"]);
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    assert!(
        said.contains("publication usersync: column list of public.users removed"),
        "{said}"
    );
    assert!(
        said.contains("every column of public.users is in its replica identity"),
        "{said}"
    );
    pair.source
        .batch_execute("UPDATE users SET version = 2")
        .await
        .expect("writes work again");
    let columns = published_columns(&pair).await;
    assert!(columns.contains(&"password_hash".to_owned()), "{columns:?}");
}

/// A WordPress-shaped users table (`wp_users`, with the generic profile's default column
/// names for the id, email and sign-up time): its password hash and activation key are named
/// without `password`, `token` or `secret`, which the credential rule once required.
const WORDPRESS_USERS: &str = "
CREATE TABLE public.users (
    id                  bigserial PRIMARY KEY,
    user_login          text NOT NULL,
    user_pass           text NOT NULL,
    user_nicename       text,
    email               text,
    user_url            text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    user_activation_key text NOT NULL DEFAULT '',
    user_status         int NOT NULL DEFAULT 0,
    display_name        text
)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordpress_password_hashes_and_activation_keys_stay_behind() {
    let pair = Pair::on_as_superuser(shared_server(), WORDPRESS_USERS).await;
    let insert = |n: u32| {
        format!(
            "INSERT INTO users (user_login, user_pass, email, user_activation_key, display_name)
             VALUES ('user{n}', '$P$B{SECRET}-pass-{n}', 'user{n}@example.com',
                     '{SECRET}-key-{n}', 'User {n}')"
        )
    };
    pair.source.batch_execute(&insert(1)).await.unwrap();

    let setup = pair.usersync(&["setup"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    let never_copied = said
        .lines()
        .find_map(|line| line.trim().strip_prefix("never copied: "))
        .unwrap_or_else(|| panic!("no never-copied line in: {said}"));
    for credential in ["user_pass", "user_activation_key"] {
        assert!(never_copied.contains(credential), "{said}");
    }
    if column_lists(&pair) {
        assert_eq!(
            published_columns(&pair).await,
            [
                "id",
                "user_login",
                "user_nicename",
                "email",
                "user_url",
                "created_at",
                "user_status",
                "display_name"
            ]
        );
    }

    // A user streamed after setup, beside the one the initial copy brought.
    let running = pair.start();
    pair.source.batch_execute(&insert(2)).await.unwrap();
    pair.wait_target("SELECT count(*) = 2 FROM neon_auth.users_sync")
        .await;
    running.stop().await;
    assert_eq!(
        users_with_any_of(&pair, &["user_pass", "user_activation_key"]).await,
        0
    );
    let copied: Vec<String> = pair
        .target
        .query(
            "SELECT raw_json->>'user_login' FROM neon_auth.users_sync ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(copied, ["user1", "user2"], "the other columns are copied");
}

/// The statement `setup` printed for the publication's owner.
fn owner_statement(said: &str) -> String {
    said.split_once("have the owner run: ")
        .unwrap_or_else(|| panic!("no statement for the owner in: {said}"))
        .1
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Waits until `child` has an unlinked spill file in `dir` whose bytes contain `marker`, and
/// returns the bytes and the file's mode, read through `/proc/<pid>/fd` (Linux).
async fn read_open_spill_file(child: &mut Child, dir: &Path, marker: &str) -> (Vec<u8>, u32) {
    use std::os::unix::fs::PermissionsExt;
    let deadline = Instant::now() + WAIT;
    let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("usersync run ended ({status}) before spilling: {stderr}");
        }
        for entry in std::fs::read_dir(&fds).into_iter().flatten().flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if !target.starts_with(dir) {
                continue;
            }
            let (Ok(bytes), Ok(metadata)) =
                (std::fs::read(entry.path()), std::fs::metadata(entry.path()))
            else {
                continue;
            };
            if contains(&bytes, marker) {
                return (bytes, metadata.permissions().mode());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no spill file in {}",
            dir.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The bytes one direction of one connection carried.
type Recorded = Arc<Mutex<Vec<u8>>>;

/// A loopback TCP proxy that keeps every byte it forwards, per connection and direction.
struct RecordingProxy {
    port: u16,
    streams: Arc<Mutex<Vec<Recorded>>>,
    accept: JoinHandle<()>,
}

impl RecordingProxy {
    async fn start(upstream: u16) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let accept = {
            let streams = Arc::clone(&streams);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                        let seen: Recorded = Arc::default();
                        streams.lock().unwrap().push(Arc::clone(&seen));
                        tokio::spawn(copy_recording(from, to, seen));
                    }
                }
            })
        };
        RecordingProxy {
            port,
            streams,
            accept,
        }
    }

    /// What went through so far, one byte string per connection and direction.
    fn streams(&self) -> Vec<Vec<u8>> {
        self.streams
            .lock()
            .unwrap()
            .iter()
            .map(|seen| seen.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn copy_recording(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Recorded,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.lock().unwrap().extend_from_slice(&buffer[..n]);
                if to.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Every column of the table is mapped, but the role script published it without a column
/// list: setup says a column added later would be sent too, instead of "columns usersync
/// does not use ()".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_a_column_list_of_mapped_columns_only_is_named_so() {
    const MAPPED_ONLY: &str = "
        CREATE TABLE users (
            id    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            email text,
            display_name text,
            created_at timestamptz NOT NULL DEFAULT now()
        )";
    let pair = Pair::on(shared_server(), MAPPED_ONLY).await;
    if !column_lists(&pair) {
        eprintln!("skipped: no publication column lists before PostgreSQL 15");
        return;
    }
    let setup = pair.usersync(&["setup"]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(!said.contains("does not use ()"), "{said}");
    assert!(
        said.contains(
            "warning: publication usersync publishes public.users without a column list, so a \
             column the table gains later would be sent too"
        ),
        "{said}"
    );
}
