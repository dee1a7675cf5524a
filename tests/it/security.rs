//! Security end to end: TLS against a real server with a test CA (verify-full, verify-ca,
//! channel binding), the refusal of Neon's pooler as a replication source, passwords kept out
//! of every output, URLs read from files, and the least-privilege role scripts in `sql/`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use tokio_postgres::NoTls;
use usersync::localpg::{LocalPg, StopMode};
use usersync::source::ReplicationConnection;

use crate::cli::send_signal;
use crate::harness::*;

/// A server with TLS on, presenting a certificate that a test CA issued for `localhost` only
/// (no IP address), so that one server shows both a good and a wrong host name.
struct TlsServer {
    pg: LocalPg,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing this server presents.
    other_ca: PathBuf,
}

fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let pg = start_server(Vec::new());
        // In the server's own directory, so it goes when the server goes (statics never drop).
        let pki = pg.socket_dir().join("pki");
        fs::create_dir(&pki).expect("create the PKI directory");
        make_ca(&pki, "ca");
        make_ca(&pki, "other-ca");
        issue_server_cert(&pki, "ca", "DNS:localhost");
        for name in ["server.crt", "server.key"] {
            let contents = fs::read_to_string(pki.join(name)).expect("read the server PKI");
            pg.write_data_file(name, &contents)
                .expect("install the server certificate");
        }
        // ALTER SYSTEM rather than LocalPgOptions::extra_conf: the certificate files are
        // installed in the data directory, which exists only once the server has started.
        let output = psql(
            &pg,
            "postgres",
            &[
                "-c",
                "ALTER SYSTEM SET ssl = on",
                "-c",
                "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
                "-c",
                "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            ],
        );
        assert!(output.status.success(), "{}", text(&output));
        pg.restart(StopMode::Fast).expect("restart with TLS on");
        TlsServer {
            ca: pki.join("ca.crt"),
            other_ca: pki.join("other-ca.crt"),
            pg,
        }
    })
}

/// Runs the `openssl` CLI in `dir` with whitespace-separated arguments.
fn openssl(dir: &Path, arguments: &str) {
    let output = Command::new("openssl")
        .args(arguments.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {arguments}: {}",
        text(&output)
    );
}

/// A self-signed CA certificate `<name>.crt` with its key `<name>.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
             -subj /CN=usersync-security-test-{name} -keyout {name}.key -out {name}.crt \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
        ),
    );
}

/// `server.crt` and `server.key`, signed by `ca` for `subject_alt_names`.
fn issue_server_cert(dir: &Path, ca: &str, subject_alt_names: &str) {
    fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName={subject_alt_names}\nextendedKeyUsage=serverAuth\n\
             basicConstraints=CA:FALSE\n"
        ),
    )
    .expect("write the extensions file");
    openssl(
        dir,
        "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
         -keyout server.key -out server.csr",
    );
    openssl(
        dir,
        &format!(
            "x509 -req -in server.csr -CA {ca}.crt -CAkey {ca}.key -set_serial 1 -days 2 \
             -extfile server.ext -out server.crt"
        ),
    );
}

/// A URL for the superuser on `host` (a name or address of the loopback server).
fn url_on(pg: &LocalPg, host: &str, dbname: &str, query: &str) -> String {
    format!(
        "postgresql://postgres:{PASSWORD}@{host}:{}/{dbname}?{query}",
        pg.port()
    )
}

/// The pair's source and target URLs on `host` with `query`.
fn pair_urls(pair: &Pair, host: &str, query: &str) -> (String, String) {
    (
        url_on(pair.server, host, &pair.config.source.dbname, query),
        url_on(pair.target_server, host, &pair.config.target.dbname, query),
    )
}

fn verify(mode: &str, ca: &Path) -> String {
    format!("sslmode={mode}&sslrootcert={}", ca.display())
}

/// The real binary with these URLs instead of the pair's.
fn command_with(pair: &Pair, args: &[&str], (source, target): &(String, String)) -> Command {
    let mut command = pair.command(args);
    command
        .env("USERSYNC_SOURCE_URL", source)
        .env("USERSYNC_TARGET_URL", target);
    command
}

/// A definite failure (exit 78) that says `needle` and not the password.
fn assert_definite(output: &Output, needle: &str) {
    let said = text(output);
    assert_eq!(output.status.code(), Some(78), "{said}");
    assert!(said.contains(needle), "expected {needle:?} in: {said}");
    assert!(!said.contains(PASSWORD), "the password leaked: {said}");
}

/// Starts `usersync run`, waits until `change` reaches the target, stops it with SIGTERM,
/// and returns its output (it must have exited 0).
async fn run_until_replicated(pair: &Pair, mut command: Command, change: &str) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start usersync run");
    pair.source.batch_execute(change).await.unwrap();
    pair.wait_for_match().await;
    send_signal(child.id(), "TERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    output
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_replicates_with_tls_on_every_connection() {
    let tls = tls_server();
    let pair = Pair::on(&tls.pg, USERS_TABLE).await;
    let urls = pair_urls(&pair, "localhost", &verify("verify-full", &tls.ca));
    let setup = command_with(&pair, &["setup"], &urls).output().unwrap();
    assert!(setup.status.success(), "{}", text(&setup));

    let mut run = command_with(&pair, &["run"], &urls);
    let child = run
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    pair.source
        .batch_execute("INSERT INTO users (email) VALUES ('tls@example.com')")
        .await
        .unwrap();
    pair.wait_for_match().await;
    // While it runs: its walsender (source) and its apply connection (target) are both TLS.
    let sessions: Vec<(String, String, bool)> = pair
        .source
        .query(
            "SELECT a.datname::text, a.backend_type, s.ssl
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name = 'usersync' AND a.datname = ANY ($1)",
            &[&vec![
                pair.config.source.dbname.clone(),
                pair.config.target.dbname.clone(),
            ]],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    send_signal(child.id(), "TERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        sessions.iter().all(|(_, _, ssl)| *ssl),
        "a plaintext session: {sessions:?}"
    );
    let has = |dbname: &str, backend_type: &str| {
        sessions
            .iter()
            .any(|(db, kind, _)| db == dbname && kind == backend_type)
    };
    assert!(has(&pair.config.source.dbname, "walsender"), "{sessions:?}");
    assert!(
        has(&pair.config.target.dbname, "client backend"),
        "{sessions:?}"
    );
    let said = format!("{}{}", text(&setup), text(&output));
    assert!(!said.contains("not verified"), "{said}");
    assert!(!said.contains("NOT encrypted"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_client_verifies_like_the_sql_client() {
    let tls = tls_server();
    let dbname = "postgres";
    let connect = |host: &str, query: String| {
        let url = url_on(&tls.pg, host, dbname, &query).parse().unwrap();
        async move { ReplicationConnection::connect(&url, "usersync-test").await }
    };

    let mut good = connect("localhost", verify("verify-full", &tls.ca))
        .await
        .expect("verify-full to the certificate's name");
    let ssl = good
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    assert_eq!(ssl.first("ssl"), Some("t"));
    good.close().await;

    let error = connect("localhost", verify("verify-full", &tls.other_ca))
        .await
        .err()
        .expect("another CA");
    assert!(!error.is_transient(), "{error:?}");
    let said = usersync::error::report(&error);
    assert!(
        said.contains("not signed by a trusted certificate authority"),
        "{said}"
    );

    let error = connect("127.0.0.1", verify("verify-full", &tls.ca))
        .await
        .err()
        .expect("a name the certificate does not have");
    assert!(!error.is_transient(), "{error:?}");
    assert!(
        usersync::error::report(&error).contains("not valid for host 127.0.0.1"),
        "{error}"
    );

    connect("127.0.0.1", verify("verify-ca", &tls.ca))
        .await
        .expect("verify-ca does not check the name")
        .close()
        .await;

    connect(
        "localhost",
        format!("{}&channel_binding=require", verify("verify-full", &tls.ca)),
    )
    .await
    .expect("SCRAM-SHA-256-PLUS over TLS")
    .close()
    .await;

    // The client says "no binding" (GS2 'n'); 'y' would tell a server that offered
    // SCRAM-SHA-256-PLUS that its offer was stripped on the way, and it would refuse.
    connect(
        "localhost",
        format!("{}&channel_binding=disable", verify("verify-full", &tls.ca)),
    )
    .await
    .expect("SCRAM-SHA-256 over TLS without binding")
    .close()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_is_refused_with_advice() {
    let tls = tls_server();
    let pair = Pair::on(&tls.pg, USERS_TABLE).await;
    let urls = pair_urls(&pair, "localhost", &verify("verify-full", &tls.other_ca));
    for command in ["setup", "run"] {
        let output = command_with(&pair, &[command], &urls).output().unwrap();
        assert_definite(
            &output,
            &format!(
                "server certificate of localhost is not signed by a trusted certificate \
                 authority; check that sslrootcert {} holds the CA certificate that signed \
                 the server's",
                tls.other_ca.display()
            ),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_name_is_refused_but_verify_ca_accepts_it() {
    let tls = tls_server();
    let pair = Pair::on(&tls.pg, USERS_TABLE).await;
    // The certificate names localhost; 127.0.0.1 is the same server under another name.
    let full = pair_urls(&pair, "127.0.0.1", &verify("verify-full", &tls.ca));
    let output = command_with(&pair, &["setup"], &full).output().unwrap();
    assert_definite(
        &output,
        "server certificate is not valid for host 127.0.0.1; check the host name or use \
         sslmode=verify-ca",
    );
    // verify-ca checks the chain only: setup (SQL and the replication connection that creates
    // the slot) succeeds.
    let ca_only = pair_urls(&pair, "127.0.0.1", &verify("verify-ca", &tls.ca));
    let output = command_with(&pair, &["setup"], &ca_only).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("replication slot"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_works_over_tls_and_is_refused_without() {
    let tls = tls_server();
    let pair = Pair::on(&tls.pg, USERS_TABLE).await;
    let bound = pair_urls(
        &pair,
        "localhost",
        &format!("{}&channel_binding=require", verify("verify-full", &tls.ca)),
    );
    // setup authenticates three times: SQL to source and target, and the replication
    // connection that creates the slot; each must have used SCRAM-SHA-256-PLUS.
    let setup = command_with(&pair, &["setup"], &bound).output().unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    run_until_replicated(
        &pair,
        command_with(&pair, &["run"], &bound),
        "INSERT INTO users (email) VALUES ('bound@example.com')",
    )
    .await;

    let disabled = pair_urls(
        &pair,
        "localhost",
        "sslmode=disable&channel_binding=require",
    );
    let output = command_with(&pair, &["setup"], &disabled).output().unwrap();
    assert_definite(
        &output,
        "invalid source URL: channel_binding=require needs TLS, but sslmode=disable",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_fails_against_a_server_without_tls() {
    let pair = Pair::new().await;
    let urls = pair_urls(&pair, "127.0.0.1", "sslmode=prefer&channel_binding=require");
    let output = command_with(&pair, &["setup"], &urls).output().unwrap();
    assert_definite(
        &output,
        "channel_binding=require, but the server did not use channel binding",
    );
    assert!(
        !text(&output).contains("check the user name and password"),
        "{}",
        text(&output)
    );
}

/// verify-ca checks no host name, so it needs a CA file: with the public web CAs it would accept
/// any website's certificate. Refused while parsing the URL, before any connection.
#[test]
fn verify_ca_without_a_root_file_is_refused_before_connecting() {
    // A closed loopback port: should the check ever regress, the attempt fails fast, exit 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/db?sslmode=verify-ca");
    let other = "postgresql://u@127.0.0.1/db";
    for (source, target) in [(url.as_str(), other), (other, url.as_str())] {
        let output = Command::new(env!("CARGO_BIN_EXE_usersync"))
            .args(["setup", "--source", source, "--target", target])
            .output()
            .unwrap();
        assert_definite(
            &output,
            "sslmode=verify-ca needs sslrootcert=/path/to/ca.pem",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Neon's pooler

#[test]
fn a_pooled_source_is_refused_before_connecting() {
    let pooled = format!(
        "postgresql://neondb_owner:{PASSWORD}@ep-cool-123-pooler.us-east-2.aws.neon.tech/\
         neondb?sslmode=require"
    );
    for command in ["setup", "run"] {
        let output = Command::new(env!("CARGO_BIN_EXE_usersync"))
            .arg(command)
            .env("USERSYNC_SOURCE_URL", &pooled)
            // The pooler is fine as a target.
            .env("USERSYNC_TARGET_URL", &pooled)
            .output()
            .unwrap();
        assert_definite(
            &output,
            "invalid source URL: host ep-cool-123-pooler.us-east-2.aws.neon.tech is a pooled \
             endpoint",
        );
        assert!(
            text(&output).contains("use the direct endpoint ep-cool-123.us-east-2.aws.neon.tech"),
            "{}",
            text(&output)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// A password no output may contain, with `@` so that URLs must percent-encode it.
const SECRET: &str = "Quokka@7431-s3cr3t";
/// A wrong password, equally distinctive.
const WRONG_SECRET: &str = "Wombat@9902-n0t1t";

/// Every form in which `secret` could leak: as is, percent-encoded, and its distinctive tail.
fn leaked_forms(secret: &str) -> Vec<String> {
    let tail = secret.split('@').nth(1).expect("secret with @").to_owned();
    vec![secret.to_owned(), secret.replace('@', "%40"), tail]
}

fn assert_no_secret(label: &str, output: &Output) {
    let said = text(output);
    for secret in [SECRET, WRONG_SECRET] {
        for form in leaked_forms(secret) {
            assert!(!said.contains(&form), "{label} leaked {form:?}: {said}");
        }
    }
}

/// Creates a role with the distinctive password that may do everything setup and run do.
async fn role_with_secret(pair: &Pair) -> String {
    let role = unique("secretive");
    let create = format!("CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{SECRET}'");
    pair.source.batch_execute(&create).await.unwrap();
    // Roles belong to a server: a target on a server of its own needs the role too.
    if !std::ptr::eq(pair.server, pair.target_server) {
        pair.target.batch_execute(&create).await.unwrap();
    }
    role
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_ever_contains_the_password() {
    let pair = Pair::new().await;
    let role = role_with_secret(&pair).await;
    let server = pair.server;
    let good = (
        server.url(&role, SECRET, &pair.config.source.dbname),
        pair.target_server
            .url(&role, SECRET, &pair.config.target.dbname),
    );
    assert!(good.0.contains("Quokka%407431"), "{}", good.0);
    // Everything logged, down to dependencies' trace output.
    let command = |args: &[&str], urls: &(String, String)| {
        let mut command = command_with(&pair, args, urls);
        command.env("RUST_LOG", "trace");
        command
    };
    let mut outputs: Vec<(String, Output)> = Vec::new();

    let setup = command(&["setup"], &good).output().unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    outputs.push(("setup".into(), setup));
    let run = run_until_replicated(
        &pair,
        command(&["run"], &good),
        "INSERT INTO users (email) VALUES ('secret@example.com')",
    )
    .await;
    outputs.push(("run then SIGTERM".into(), run));

    let wrong = (
        server.url(&role, WRONG_SECRET, &pair.config.source.dbname),
        pair.target_server
            .url(&role, WRONG_SECRET, &pair.config.target.dbname),
    );
    for args in [&["setup"][..], &["run"], &["teardown", "--yes"]] {
        let output = command(args, &wrong).output().unwrap();
        assert_eq!(output.status.code(), Some(78), "{}", text(&output));
        assert!(
            text(&output).contains("password authentication failed"),
            "{}",
            text(&output)
        );
        outputs.push((format!("{args:?} with a wrong password"), output));
    }

    let port = server.port();
    let malformed = [
        format!("postgresql://{role}:Quokka%407431-s3cr3t@127.0.0.1:notaport/db"),
        format!("postgresql://{role}:Quokka%407431-s3cr3t@127.0.0.1:{port}/db?sslmod=require"),
        format!("postgresql://{role}:Quokka%407431-s3cr3t@127.0.0.1:{port}/db?sslmode=bogus"),
        format!("postgresql://{role}:Quokka%407431-s3cr3t@ep-x-pooler.example.com/db"),
        format!("host=127.0.0.1 user={role} password='{SECRET} port={port}"),
        format!("host=127.0.0.1 user={role} password={SECRET} bogus"),
        format!("postgresql://{role}:{SECRET}@127.0.0.1:{port}/db"),
        // Pasted from elsewhere (every way to give them: pasted_url_shapes_never_show_the_password).
        format!("\"postgresql://{role}:Quokka%407431-s3cr3t@127.0.0.1:{port}/db?sslmode=disable\""),
        format!("POSTGRESQL://{role}:Quokka%407431-s3cr3t@127.0.0.1:{port}/db?sslmode=disable"),
        format!(
            "postgresql+psycopg://{role}:Quokka%407431-s3cr3t@127.0.0.1:{port}/db?sslmode=disable"
        ),
    ];
    for bad in malformed {
        let output = command(&["setup"], &(bad.clone(), good.1.clone()))
            .output()
            .unwrap();
        assert_ne!(output.status.code(), Some(0), "{bad}: {}", text(&output));
        outputs.push((format!("setup with source {bad}"), output));
    }

    let missing_table = command(&["setup", "--table", "public.nobody"], &good)
        .output()
        .unwrap();
    assert_eq!(missing_table.status.code(), Some(78));
    outputs.push(("missing table".into(), missing_table));
    let json = command(
        &["--log-format", "json", "setup", "--table", "public.nobody"],
        &good,
    )
    .output()
    .unwrap();
    assert_eq!(json.status.code(), Some(78));
    outputs.push(("missing table, JSON logs".into(), json));
    let teardown = command(&["teardown"], &good).output().unwrap();
    assert_eq!(teardown.status.code(), Some(2));
    outputs.push(("teardown without --yes".into(), teardown));

    // Help shows that the variables are set, never their values.
    for args in [&["--help"][..], &["setup", "--help"], &["run", "--help"]] {
        let output = command(args, &good).output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
        if args.len() > 1 {
            assert!(text(&output).contains("[env: USERSYNC_SOURCE_URL]"));
        }
        outputs.push((format!("{args:?}"), output));
    }
    // A URL given as an option, next to a mistake clap reports.
    let output = command(&["setup", "--source", &good.0, "--no-such-option"], &good)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    outputs.push(("unknown option next to --source".into(), output));
    // A URL pasted without --source: clap quotes the argument it cannot place.
    let output = command(&["setup", &good.0], &good).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains(&format!("unexpected argument 'postgresql://{role}:***@")),
        "{}",
        text(&output)
    );
    outputs.push(("URL as a stray argument".into(), output));

    for (label, output) in &outputs {
        assert_no_secret(label, output);
    }
}

/// URLs as they arrive from other tools (Docker's --env-file keeps quotes, SQLAlchemy names a
/// driver, some write the scheme in capitals, JDBC prefixes its own) and key=value strings with
/// mistakes next to the password: each is refused as configuration (exit 78) wherever it is
/// given, and no output shows the password. No server is needed: nothing gets to connect.
#[test]
fn pasted_url_shapes_never_show_the_password() {
    let encoded = SECRET.replace('@', "%40");
    let variants = [
        format!("\"postgresql://postgres:{encoded}@127.0.0.1:1/db?sslmode=require\""),
        format!("'postgresql://postgres:{encoded}@127.0.0.1:1/db?sslmode=require'"),
        format!("\"postgresql://postgres:{SECRET}@127.0.0.1:1/db?sslmode=require\""),
        format!("POSTGRESQL://postgres:{encoded}@127.0.0.1:1/db?sslmode=require"),
        format!("Postgres://postgres:{SECRET}@127.0.0.1:1/db"),
        format!("postgresql+psycopg://postgres:{encoded}@127.0.0.1:1/db?sslmode=require"),
        format!("postgresql+asyncpg://postgres:{SECRET}@127.0.0.1:1/db?ssl=require"),
        format!("jdbc:postgresql://127.0.0.1:1/db?user=postgres&password={encoded}"),
        format!("mysql://postgres:{encoded}@127.0.0.1:1/db?ssl=true"),
        format!("postgresql:/postgres:{encoded}@127.0.0.1:1/db?sslmode=require"),
        format!("postgres:{encoded}@127.0.0.1:1/db?sslmode=require"),
        format!("\"host=127.0.0.1 port=1 user=postgres password={SECRET}\""),
        format!("host=127.0.0.1 port=1 user=postgres password={SECRET} sslmod=require"),
        format!("host=127.0.0.1 port=1 PASSWORD={SECRET} user=postgres"),
        format!("host=127.0.0.1 port=1 password='{SECRET} user=postgres"),
        format!("host=127.0.0.1 port=1 user=postgres password={SECRET} bogus"),
    ];
    // Valid, on a closed port: it is never used, because the other URL fails first or after.
    let valid = "postgresql://u@127.0.0.1:1/db";
    let dir = std::env::temp_dir().join(unique("usersync-pasted-urls"));
    fs::create_dir(&dir).unwrap();
    let file = dir.join("url");
    let usersync = |command: &str| {
        let mut usersync = Command::new(env!("CARGO_BIN_EXE_usersync"));
        usersync.arg(command).env_clear().env("RUST_LOG", "trace");
        if command == "purge" {
            usersync.args(["--older-than", "30d"]);
        }
        usersync
    };
    let mut checked = 0;
    for bad in &variants {
        fs::write(&file, format!("{bad}\n")).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        for which in ["source", "target"] {
            let other = if which == "source" {
                "target"
            } else {
                "source"
            };
            let variable = format!("USERSYNC_{}_URL", which.to_uppercase());
            let other_variable = format!("USERSYNC_{}_URL", other.to_uppercase());
            let commands: &[&str] = if which == "target" {
                &["setup", "status", "purge"]
            } else {
                &["setup", "status"]
            };
            for &command in commands {
                let mut given_as = Vec::new();
                let mut option = usersync(command);
                option.args([format!("--{which}"), bad.clone()]);
                given_as.push(("option", option));
                let mut variable_set = usersync(command);
                variable_set.env(&variable, bad);
                given_as.push(("variable", variable_set));
                let mut in_file = usersync(command);
                in_file.env(format!("{variable}_FILE"), &file);
                given_as.push(("file", in_file));
                for (how, mut usersync) in given_as {
                    if command != "purge" {
                        usersync.env(&other_variable, valid);
                    }
                    let output = usersync.output().unwrap();
                    let label = format!("{command} with the {which} URL {bad} as {how}");
                    assert_no_secret(&label, &output);
                    assert_eq!(output.status.code(), Some(78), "{label}: {}", text(&output));
                    assert!(
                        text(&output).contains(&format!("invalid {which} URL")),
                        "{label}: {}",
                        text(&output)
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, variants.len() * 15);
    fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_are_read_from_files() {
    let pair = Pair::new().await;
    let dir = std::env::temp_dir().join(unique("usersync-url-files"));
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let source_file = dir.join("source-url");
    let target_file = dir.join("target-url");
    // As Kubernetes and `echo >` write them: a trailing newline.
    fs::write(&source_file, format!("{}\n", pair.source_url)).unwrap();
    fs::write(&target_file, format!("{}\n", pair.target_url)).unwrap();
    for file in [&source_file, &target_file] {
        fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let from_files = |args: &[&str]| {
        let mut command = pair.command(args);
        command
            .env_remove("USERSYNC_SOURCE_URL")
            .env_remove("USERSYNC_TARGET_URL")
            .env("USERSYNC_SOURCE_URL_FILE", &source_file)
            .env("USERSYNC_TARGET_URL_FILE", &target_file);
        command
    };

    let setup = from_files(&["setup"]).output().unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    let run = run_until_replicated(
        &pair,
        from_files(&["run"]),
        "INSERT INTO users (email) VALUES ('file@example.com')",
    )
    .await;
    assert!(!text(&run).contains(PASSWORD));

    let missing = dir.join("no-such-file");
    let output = from_files(&["setup"])
        .env("USERSYNC_TARGET_URL_FILE", &missing)
        .output()
        .unwrap();
    assert_definite(
        &output,
        &format!(
            "cannot read the target URL from USERSYNC_TARGET_URL_FILE={}",
            missing.display()
        ),
    );
    // A malformed URL in a file is reported without the file's contents.
    fs::write(
        &source_file,
        format!("postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/db"),
    )
    .unwrap();
    let output = from_files(&["setup"]).output().unwrap();
    assert_definite(&output, "invalid source URL");

    fs::remove_dir_all(&dir).unwrap();
}

/// A URL file others may read is warned about (without its contents); a URL both in a variable
/// and in a file is refused, naming both. Neither needs a server: configuration fails first.
#[test]
fn url_files_are_private_and_unambiguous() {
    let dir = std::env::temp_dir().join(unique("usersync-url-file-modes"));
    fs::create_dir(&dir).unwrap();
    let file = dir.join("source-url");
    fs::write(
        &file,
        format!(
            "postgresql://postgres:{}@127.0.0.1:1/db\n",
            SECRET.replace('@', "%40")
        ),
    )
    .unwrap();
    let setup = |mode: u32| {
        fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
        // No target: configuration stops after reading the source's file.
        let output = Command::new(env!("CARGO_BIN_EXE_usersync"))
            .arg("setup")
            .env_clear()
            .env("USERSYNC_SOURCE_URL_FILE", &file)
            .output()
            .unwrap();
        assert_definite(&output, "no target URL");
        assert_no_secret(&format!("mode {mode:o}"), &output);
        text(&output)
    };
    let warning = "the source URL file, which holds a password, may be read by other users";
    for mode in [0o644, 0o604, 0o660] {
        let said = setup(mode);
        assert!(said.contains(warning), "{mode:o}: {said}");
        assert!(said.contains(&file.display().to_string()), "{said}");
        assert!(said.contains(&format!("mode={mode:04o}")), "{said}");
    }
    for mode in [0o600, 0o400] {
        let said = setup(mode);
        assert!(!said.contains(warning), "{mode:o}: {said}");
    }

    for command in ["setup", "run", "status", "purge"] {
        let mut both = Command::new(env!("CARGO_BIN_EXE_usersync"));
        both.arg(command)
            .env_clear()
            .env("USERSYNC_TARGET_URL", "postgresql://u@127.0.0.1:1/db")
            .env("USERSYNC_TARGET_URL_FILE", &file)
            .env("USERSYNC_SOURCE_URL", "postgresql://u@127.0.0.1:1/db");
        if command == "purge" {
            both.args(["--older-than", "30d"]);
        }
        let output = both.output().unwrap();
        assert_definite(
            &output,
            "both USERSYNC_TARGET_URL and USERSYNC_TARGET_URL_FILE are set; unset one of them",
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Least-privilege roles

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_roles_from_the_sql_scripts_replicate() {
    let pair = Pair::new().await;
    let server = pair.server;
    let (source_db, target_db) = (
        pair.config.source.dbname.clone(),
        pair.config.target.dbname.clone(),
    );
    let source_role = unique("usersync_source");
    let target_role = unique("usersync_target");
    pair.source
        .batch_execute("CREATE TABLE public.payment_methods (id int PRIMARY KEY, card text)")
        .await
        .unwrap();
    // Twice: the scripts may be run again (the second run updates and re-grants).
    for _ in 0..2 {
        apply_role_script(
            server,
            &source_db,
            "source_role.sql",
            &[("role", &source_role), ("password", PASSWORD)],
        );
        apply_role_script(
            pair.target_server,
            &target_db,
            "target_role.sql",
            &[("role", &target_role), ("password", PASSWORD)],
        );
    }
    let urls = (
        server.url(&source_role, PASSWORD, &source_db),
        pair.target_server.url(&target_role, PASSWORD, &target_db),
    );

    let setup = command_with(&pair, &["setup"], &urls).output().unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    let said = text(&setup);
    assert!(said.contains("publication usersync found"), "{said}");
    assert!(said.contains("users_sync found"), "{said}");
    run_until_replicated(
        &pair,
        command_with(&pair, &["run"], &urls),
        "INSERT INTO users (email) VALUES ('a@example.com'), ('b@example.com');
         UPDATE users SET display_name = 'A' WHERE email = 'a@example.com';
         DELETE FROM users WHERE email = 'b@example.com';",
    )
    .await;
    let soft_deleted: i64 = pair
        .target
        .query_one(
            "SELECT count(*) FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(soft_deleted, 1);

    // The source role: the heartbeat function needs nothing more; other tables are closed.
    let as_source = connect_as(&urls.0).await;
    as_source
        .query_one(
            "SELECT pg_logical_emit_message(false, 'usersync', 'heartbeat')",
            &[],
        )
        .await
        .expect("pg_logical_emit_message needs no grant");
    let refused = as_source
        .query("SELECT * FROM public.payment_methods", &[])
        .await
        .expect_err("no SELECT on other tables");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let (superuser, createdb, replication): (bool, bool, bool) = {
        let row = as_source
            .query_one(
                "SELECT rolsuper, rolcreatedb, rolreplication FROM pg_roles
                  WHERE rolname = current_user",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((superuser, createdb, replication), (false, false, true));

    // The target role: users_sync and its own schema, nothing else; hard deletes (purge)
    // only with `-v purge=on`, and running the script again without it takes them back.
    let as_target = connect_as(&urls.1).await;
    const HARD_DELETE: &str = "BEGIN;
         DELETE FROM neon_auth.users_sync WHERE deleted_at IS NOT NULL;
         ROLLBACK;";
    for purge in [None, Some("on"), None] {
        let mut variables = vec![("role", target_role.as_str()), ("password", PASSWORD)];
        variables.extend(purge.map(|on| ("purge", on)));
        apply_role_script(
            pair.target_server,
            &target_db,
            "target_role.sql",
            &variables,
        );
        let deleted = as_target.batch_execute(HARD_DELETE).await;
        if purge.is_some() {
            deleted.expect("DELETE is granted with -v purge=on");
        } else {
            let error = deleted.expect_err("no DELETE without -v purge=on");
            assert_eq!(
                error.code(),
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                "{error}"
            );
            as_target.batch_execute("ROLLBACK").await.unwrap();
        }
    }
    // Before PostgreSQL 15 every role may create tables in `public` (a default the schema's
    // owner revokes, as docs/deployment.md says); that is the server's grant, not the script's.
    let version: i32 = as_target
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let public_create = (version >= 150_000).then_some("CREATE TABLE public.extra (id int)");
    for forbidden in [
        "CREATE TABLE neon_auth.extra (id int)",
        "CREATE SCHEMA extra",
        "ALTER TABLE neon_auth.users_sync ADD COLUMN extra int",
        "TRUNCATE neon_auth.users_sync",
    ]
    .into_iter()
    .chain(public_create)
    {
        let error = as_target
            .batch_execute(forbidden)
            .await
            .expect_err(forbidden);
        assert!(
            matches!(
                error.code(),
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
            ) || error.to_string().contains("must be owner"),
            "{forbidden}: {error}"
        );
    }
    let owner: String = as_target
        .query_one(
            "SELECT tableowner::text FROM pg_tables
              WHERE schemaname = 'usersync' AND tablename = 'state'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, target_role);
}

async fn connect_as(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect as the role");
    tokio::spawn(connection);
    client
}

#[test]
fn role_scripts_refuse_to_run_without_a_password() {
    let server = shared_server();
    for script in ["source_role.sql", "target_role.sql"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("sql")
            .join(script);
        let output = psql(
            server,
            "postgres",
            &[
                "-v",
                "role=never_created",
                "-f",
                &path.display().to_string(),
            ],
        );
        assert!(!output.status.success(), "{script}: {}", text(&output));
        assert!(
            text(&output).contains("missing psql variable: password"),
            "{script}: {}",
            text(&output)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Deployment files (deploy/): no Docker engine or cluster here, so they are checked by
// parsers, systemd-analyze and kubectl's offline kustomize when those are installed.

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Whether `program` runs at all (is installed and on PATH).
fn available(program: &str, probe: &[&str]) -> bool {
    Command::new(program)
        .args(probe)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The Kubernetes manifests as JSON documents, parsed by PyYAML; `None` when python3 or
/// PyYAML is missing (the test then says it skipped).
fn kubernetes_documents() -> Option<Vec<serde_json::Value>> {
    if !available("python3", &["-c", "import yaml"]) {
        eprintln!("skipped: python3 with PyYAML is not installed (pip install pyyaml)");
        return None;
    }
    let mut manifests: Vec<PathBuf> = fs::read_dir(repo_path("deploy/kubernetes"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    manifests.sort();
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = []\n\
             for path in sys.argv[1:]:\n\
             \x20   with open(path) as f:\n\
             \x20       docs.extend(d for d in yaml.safe_load_all(f) if d is not None)\n\
             json.dump(docs, sys.stdout)",
        ])
        .args(&manifests)
        .output()
        .unwrap();
    assert!(output.status.success(), "YAML error: {}", text(&output));
    Some(serde_json::from_slice(&output.stdout).expect("JSON from python"))
}

/// The document of `kind` named `name`.
fn manifest<'a>(documents: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    documents
        .iter()
        .find(|document| document["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

/// Environment variables usersync reads: every `[env: NAME]` of `run --help`, the URL
/// files, RUST_LOG, and `--metrics-addr` from the metrics work (DESIGN §5).
fn known_environment() -> Vec<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = text(&help);
    let mut names: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split([']', '=']).next().unwrap().to_owned())
        .collect();
    names.extend(
        [
            "USERSYNC_SOURCE_URL_FILE",
            "USERSYNC_TARGET_URL_FILE",
            "USERSYNC_METRICS_ADDR",
            "RUST_LOG",
        ]
        .map(String::from),
    );
    names
}

#[test]
fn kubernetes_manifests_parse_and_fit_together() {
    let Some(documents) = kubernetes_documents() else {
        return;
    };
    for document in &documents {
        for field in ["apiVersion", "kind"] {
            assert!(document[field].is_string(), "{field} missing: {document}");
        }
    }
    let deployment = manifest(&documents, "Deployment");
    let secret = manifest(&documents, "Secret");
    let config = manifest(&documents, "ConfigMap");
    let service = manifest(&documents, "Service");
    let monitor = manifest(&documents, "ServiceMonitor");

    // One consumer per slot.
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    for selector in [
        &deployment["spec"]["selector"]["matchLabels"],
        &service["spec"]["selector"],
        &monitor["spec"]["selector"]["matchLabels"],
    ] {
        for (key, value) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[key], value, "selector {key}");
        }
    }
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);

    let init = &pod["spec"]["initContainers"][0];
    let main = &pod["spec"]["containers"][0];
    assert_eq!(init["args"], serde_json::json!(["setup"]));
    assert_eq!(main["args"], serde_json::json!(["run"]));
    assert_eq!(main["ports"][0]["containerPort"], 9753);
    let port_name = &main["ports"][0]["name"];
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(main[probe]["httpGet"]["path"], path);
        assert_eq!(&main[probe]["httpGet"]["port"], port_name);
    }
    for container in [init, main] {
        for bound in ["requests", "limits"] {
            assert!(
                container["resources"][bound]["memory"].is_string(),
                "{}: resources.{bound}",
                container["name"]
            );
        }
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["envFrom"][0]["configMapRef"]["name"],
            config["metadata"]["name"]
        );
    }

    // The root filesystem is read-only, so large transactions spill to a volume at /tmp
    // (TMPDIR's default), bounded in size.
    let tmp = main["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["mountPath"] == "/tmp")
        .expect("a writable /tmp for spill files");
    let spill = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == tmp["name"])
        .expect("the /tmp volume");
    assert!(spill["emptyDir"]["sizeLimit"].is_string(), "{spill}");
    assert_ne!(tmp["readOnly"], true);

    // The Secret's keys are mounted where the ConfigMap's *_FILE variables point.
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["secret"].is_object())
        .expect("a secret volume");
    assert_eq!(volume["secret"]["secretName"], secret["metadata"]["name"]);
    let mount = main["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["name"] == volume["name"])
        .expect("the secret is mounted");
    let mount_path = mount["mountPath"].as_str().unwrap();
    for (variable, key) in [
        ("USERSYNC_SOURCE_URL_FILE", "source-url"),
        ("USERSYNC_TARGET_URL_FILE", "target-url"),
    ] {
        assert!(secret["stringData"][key].is_string(), "secret key {key}");
        let item = volume["secret"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["key"] == key)
            .unwrap_or_else(|| panic!("{key} is not mounted"));
        assert_eq!(
            config["data"][variable].as_str(),
            Some(format!("{mount_path}/{}", item["path"].as_str().unwrap()).as_str()),
            "{variable}"
        );
    }
    let known = known_environment();
    for variable in config["data"].as_object().unwrap().keys() {
        assert!(known.contains(variable), "usersync reads no {variable}");
    }
    assert_eq!(config["data"]["USERSYNC_METRICS_ADDR"], "0.0.0.0:9753");

    // Prometheus finds the metrics port by annotation or ServiceMonitor.
    let annotations = &service["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9753");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(service["spec"]["ports"][0]["port"], 9753);
    assert_eq!(&service["spec"]["ports"][0]["targetPort"], port_name);
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    // The alert rules expect job="usersync", which the ServiceMonitor takes from the name.
    assert_eq!(service["metadata"]["name"], "usersync");
}

#[test]
fn kustomization_builds_offline() {
    if !available("kubectl", &["version", "--client"]) {
        eprintln!("skipped: kubectl is not installed");
        return;
    }
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_path("deploy/kubernetes"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let built = String::from_utf8_lossy(&output.stdout);
    for kind in ["kind: ConfigMap", "kind: Deployment", "kind: Service"] {
        assert!(built.contains(kind), "{kind} missing: {built}");
    }
}

#[test]
fn systemd_unit_keeps_secrets_in_credentials_and_verifies() {
    let unit = fs::read_to_string(repo_path("deploy/systemd/usersync.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for line in [
        "ExecStart=/usr/local/bin/usersync run",
        // usersync says READY=1 and feeds the watchdog while its loop makes progress, so a
        // hung replicator (which keeps the slot's lock) is restarted.
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "Restart=on-failure",
        // A definite error (78) or an argument error (2) would fail the same way again.
        "RestartPreventExitStatus=2 78",
        "LoadCredential=source-url:/etc/usersync/source-url",
        "LoadCredential=target-url:/etc/usersync/target-url",
        "Environment=USERSYNC_SOURCE_URL_FILE=%d/source-url",
        "Environment=USERSYNC_TARGET_URL_FILE=%d/target-url",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(lines.contains(&line), "{line} missing");
    }
    assert!(
        !lines
            .iter()
            .any(|line| line.starts_with("Environment=USERSYNC_SOURCE_URL=")),
        "URLs belong in credentials, not the environment"
    );
    if !available("systemd-analyze", &["--version"]) {
        eprintln!("skipped systemd-analyze verify: not installed");
        return;
    }
    // verify wants an executable at ExecStart: point it at the binary cargo built.
    let dir = std::env::temp_dir().join(unique("usersync-unit"));
    fs::create_dir(&dir).unwrap();
    let copy = dir.join("usersync.service");
    fs::write(
        &copy,
        unit.replace("/usr/local/bin/usersync", env!("CARGO_BIN_EXE_usersync")),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    fs::remove_dir_all(&dir).unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).trim().is_empty(),
        "systemd-analyze warns: {}",
        text(&output)
    );
}

#[test]
fn dockerfile_builds_from_what_the_context_keeps() {
    let dockerfile = fs::read_to_string(repo_path("deploy/Dockerfile")).unwrap();
    let ignored: Vec<String> = fs::read_to_string(repo_path(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_end_matches('/').to_owned())
        .collect();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .collect();
    let has = |prefix: &str| instructions.iter().any(|line| line.starts_with(prefix));
    assert!(has("FROM rust:1-bookworm AS build"));
    assert!(has("FROM debian:bookworm-slim"));
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("ca-certificates"));
    assert!(has("EXPOSE 9753"));
    assert!(has(r#"ENTRYPOINT ["usersync"]"#));
    assert!(has(r#"CMD ["run"]"#));
    let user = instructions
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("a USER instruction");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "{user}"
    );

    // Every COPY from the context exists and survives .dockerignore.
    let mut copied = Vec::new();
    for line in &instructions {
        let Some(arguments) = line.strip_prefix("COPY ") else {
            continue;
        };
        if arguments.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = arguments.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(repo_path(source).exists(), "COPY {source}: not in the repo");
            assert!(
                !ignored.iter().any(|pattern| pattern == source),
                "COPY {source}: excluded by .dockerignore"
            );
            copied.push(source.trim_end_matches('/').to_owned());
        }
    }
    // Files the code compiles in must be in the image's build context too.
    let mut pending = vec![repo_path("src")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let code = fs::read_to_string(&path).unwrap();
            for included in code.split("include_str!(\"").skip(1) {
                let relative = included.split('"').next().unwrap();
                let file = path
                    .parent()
                    .unwrap()
                    .join(relative)
                    .canonicalize()
                    .unwrap();
                let in_repo = file
                    .strip_prefix(repo_path("").canonicalize().unwrap())
                    .unwrap()
                    .to_owned();
                let top = in_repo.components().next().unwrap().as_os_str();
                assert!(
                    copied.iter().any(|source| source.as_str() == top),
                    "{} includes {} but the Dockerfile does not COPY {}",
                    path.display(),
                    in_repo.display(),
                    top.to_string_lossy()
                );
            }
        }
    }
}
