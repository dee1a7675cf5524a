//! Throwaway local PostgreSQL servers, for the integration tests and `usersync demo`.
//!
//! Logical replication can only be tested against a real server with `wal_level = logical`,
//! so [`LocalPg::start`] builds one from scratch: `initdb` into a private temporary directory,
//! then `pg_ctl start` on a free loopback port. Each server is fully isolated (its own data
//! directory, Unix socket directory and log file) so parallel test processes never share
//! state, and it is tuned for speed rather than durability (`fsync = off`), because its data
//! is thrown away.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root (a compromised server must not own the machine). CI runs
//! as root, so when our effective uid is 0 every server-side program (`initdb`, `pg_ctl`, and
//! through it `postgres`) is launched as the `postgres` OS user with `setpriv`, and the
//! temporary directory is handed to that user with `chown`. `setpriv` (util-linux, present on
//! every Debian system) execs the program directly: no PAM session and no intermediate
//! process, unlike `su`/`runuser`. The postgres user must be able to traverse the parents of
//! [`std::env::temp_dir`]; `/tmp` allows it.
//!
//! # No leftovers
//!
//! A server must never outlive the process that started it, and its directory must go with it:
//!
//! - Dropping a [`LocalPg`] stops the server (`pg_ctl stop -m immediate`) and removes the
//!   directory before `drop` returns.
//! - That is not enough on its own: tests keep a shared server in a `static OnceLock<LocalPg>`
//!   (statics are never dropped) and `cargo test` may be killed outright. So each server gets a
//!   *watchdog*: a tiny `sh` child whose stdin is a pipe that only this process holds. When
//!   this process ends, however it ends (even `SIGKILL`), the kernel closes the pipe, the
//!   watchdog's `read` sees end-of-file, and it runs `pg_ctl stop -m immediate` and
//!   `rm -rf` of the directory. End-of-file on a pipe is immediate and cannot be fooled by pid
//!   reuse, which polling the parent pid with `kill -0` can. The watchdog sits in its own
//!   process group and ignores `SIGINT`/`SIGTERM`, so a Ctrl-C aimed at the test run cannot
//!   kill it before it has cleaned up; `pg_ctl` already puts the server in its own session, so
//!   that Ctrl-C does not reach the server either, and `usersync demo` stays in charge of the
//!   shutdown order.
//!
//! # Authentication
//!
//! Local (Unix-socket) connections are trusted; TCP connections from 127.0.0.1, ordinary and
//! replication alike, need SCRAM-SHA-256, because that is what the product meets in production
//! (Neon) and what its own replication client must speak. The superuser is `postgres`.
//!
//! Everything here is synchronous (`std::process`), so tests can use it without a runtime and
//! async callers can use `spawn_blocking`.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable naming the directory that holds `initdb`, `pg_ctl` and `postgres`.
pub const PG_BIN_ENV: &str = "USERSYNC_PG_BIN";

/// Superuser password used by [`LocalPgOptions::default`]. The server only listens on
/// loopback and lives as long as one process, so a well-known password is acceptable.
pub const DEFAULT_SUPERUSER_PASSWORD: &str = "usersync-local";

/// Debian and Ubuntu install server binaries per major version, off `PATH`; newest first.
const DEBIAN_BIN_DIRS: [&str; 5] = [
    "/usr/lib/postgresql/18/bin",
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/14/bin",
];

/// The programs a bin directory must hold for us to build and run a cluster.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// The OS user that runs the server when we are root (created by Debian's `postgresql`).
const POSTGRES_OS_USER: &str = "postgres";

/// The database superuser created by `initdb -U`.
const SUPERUSER: &str = "postgres";

/// The server listens on IPv4 loopback only: nothing outside this machine can reach it.
const HOST: &str = "127.0.0.1";

/// Starts tried with a fresh port: another process can take the port we probed before the
/// server binds it.
const START_ATTEMPTS: u32 = 5;

/// `pg_ctl -t` for start, restart and immediate stop. A start takes ~1.4 s; a loaded CI
/// machine can be far slower, and a hung start must still end.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// `pg_ctl -t` for the polite (fast) stop in [`LocalPg::stop`]; after it we stop immediately.
const PG_CTL_FAST_STOP_TIMEOUT_SECS: &str = "10";

/// Lines of the server log quoted in a start error: enough for the FATAL and its context.
const LOG_TAIL_LINES: usize = 30;

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// File in the data directory that holds our settings; included from `postgresql.conf` and
/// rewritten with a new port when a start has to be retried.
const SETTINGS_FILE: &str = "usersync.conf";

/// Replaces initdb's `pg_hba.conf`, so the rules do not depend on the initdb version's
/// defaults. The first matching line wins.
const PG_HBA_CONF: &str = "\
# Written by usersync's localpg: Unix-socket connections are trusted; TCP connections from
# loopback, ordinary and replication alike, must authenticate with SCRAM-SHA-256.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
";

/// The watchdog (see the module docs). Arguments: temp dir, data dir, then the command that
/// runs `pg_ctl` (possibly prefixed with `setpriv ...`). Its stdin is a pipe only the parent
/// holds; the loop ends at end-of-file, that is when the parent has gone.
const WATCHDOG_SCRIPT: &str = r#"
trap '' HUP INT QUIT TERM
dir=$1 data=$2
shift 2
while read -r _; do :; done
"$@" stop -D "$data" -m immediate -w -t 30 >/dev/null 2>&1
rm -rf -- "$dir"
"#;

/// What went wrong starting or controlling a local server; each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalPgError {
    /// No directory with `initdb`, `pg_ctl` and `postgres` was found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found ({searched}): \
         install PostgreSQL server binaries: apt-get install postgresql, \
         or set {PG_BIN_ENV} to the directory that holds them"
    )]
    BinariesNotFound {
        /// Where we looked.
        searched: String,
    },
    /// An option or the environment cannot produce a working server.
    #[error("cannot start a local PostgreSQL server: {0}")]
    InvalidOption(String),
    /// We are root, and the OS user PostgreSQL must run as does not exist.
    #[error(
        "running as root, so PostgreSQL must run as the OS user `{POSTGRES_OS_USER}`, which \
         does not exist: apt-get install postgresql creates it \
         (or: useradd --system --user-group {POSTGRES_OS_USER})"
    )]
    NoPostgresUser,
    /// A program could not be executed at all.
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why the operating system refused.
        #[source]
        source: io::Error,
    },
    /// The kernel would not give us a loopback port.
    #[error("could not find a free TCP port on {HOST}")]
    NoFreePort {
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A file operation in the server's directory failed.
    #[error("could not {action} {}", path.display())]
    Io {
        /// What we tried, as a verb phrase.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// `initdb` failed; its own output says why.
    #[error("initdb failed ({status}): {output}{hint}")]
    InitDb {
        /// initdb's exit status.
        status: ExitStatus,
        /// initdb's stderr and stdout.
        output: String,
        /// Advice for a known cause, or empty.
        hint: String,
    },
    /// The server did not come up (or back up, after a restart); the log says why.
    #[error(
        "PostgreSQL did not start on {HOST}:{port}: {pg_ctl_output}\n\
         last lines of the server log {}:\n{log_tail}",
        log_file.display()
    )]
    Start {
        /// The port it was meant to listen on.
        port: u16,
        /// What `pg_ctl` printed.
        pg_ctl_output: String,
        /// The server log.
        log_file: PathBuf,
        /// The log's last lines written during this attempt.
        log_tail: String,
    },
    /// Another helper command failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command, for the reader.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr and stdout.
        output: String,
    },
}

impl LocalPgError {
    /// True when the server could not bind its port: a retry with another port may succeed.
    fn is_port_taken(&self) -> bool {
        match self {
            LocalPgError::Start { log_tail, .. } => {
                log_tail.contains("could not bind")
                    || log_tail.contains("Address already in use")
                    || log_tail.contains("could not create any TCP/IP sockets")
            }
            _ => false,
        }
    }
}

/// How to build a server.
#[derive(Clone)]
pub struct LocalPgOptions {
    /// Directory with `initdb`, `pg_ctl` and `postgres`. When `None`: `$USERSYNC_PG_BIN`, else
    /// the newest `/usr/lib/postgresql/{18..14}/bin` that has `initdb`, else `initdb` on `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Password of the `postgres` superuser for TCP (SCRAM) connections. Must not be empty.
    pub superuser_password: String,
    /// Extra `postgresql.conf` settings, applied after (so overriding) ours.
    pub extra_conf: Vec<(String, String)>,
}

impl Default for LocalPgOptions {
    fn default() -> Self {
        LocalPgOptions {
            bin_dir: None,
            superuser_password: DEFAULT_SUPERUSER_PASSWORD.to_owned(),
            extra_conf: Vec::new(),
        }
    }
}

impl fmt::Debug for LocalPgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPgOptions")
            .field("bin_dir", &self.bin_dir)
            .field("superuser_password", &"<redacted>")
            .field("extra_conf", &self.extra_conf)
            .finish()
    }
}

/// How `pg_ctl` shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, then write a shutdown checkpoint: a clean stop.
    Fast,
    /// Quit at once, as in a crash; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_pg_ctl_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A running PostgreSQL server in its own temporary directory, stopped and removed on drop.
pub struct LocalPg {
    /// The private temporary directory: Unix socket, server log, and `data/`.
    dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    superuser_password: String,
    server_version_num: u32,
    run_as: RunAs,
    /// Cleans up if this process dies without dropping us; `None` only while starting.
    watchdog: Option<Child>,
}

impl fmt::Debug for LocalPg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPg")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("bin_dir", &self.bin_dir)
            .field("server_version_num", &self.server_version_num)
            .finish_non_exhaustive()
    }
}

impl LocalPg {
    /// Creates a cluster in a new temporary directory and starts it on a free loopback port.
    ///
    /// Takes about a second and a half. On error nothing is left behind.
    pub fn start(opts: &LocalPgOptions) -> Result<LocalPg, LocalPgError> {
        validate_options(opts)?;
        let bin_dir = find_bin_dir(opts.bin_dir.as_deref())?;
        let version_from_binary = server_version_from_binary(&bin_dir)?;
        let run_as = RunAs::detect()?;
        let dir = create_private_dir()?;
        let data_dir = dir.join("data");
        let log_file = dir.join("server.log");
        // From here on, `pg`'s Drop removes whatever exists if a step fails.
        let mut pg = LocalPg {
            dir,
            data_dir,
            log_file,
            bin_dir,
            port: 0,
            superuser_password: opts.superuser_password.clone(),
            server_version_num: version_from_binary.unwrap_or(0),
            run_as,
            watchdog: None,
        };
        pg.check_socket_dir()?;
        pg.watchdog = Some(pg.spawn_watchdog()?);
        pg.init_cluster()?;
        if version_from_binary.is_none() {
            pg.server_version_num = pg.server_version_from_data_dir()?;
        }
        pg.start_on_free_port(&opts.extra_conf)?;
        tracing::info!(
            port = pg.port,
            data_dir = %pg.data_dir.display(),
            server_version_num = pg.server_version_num,
            "local postgres started"
        );
        Ok(pg)
    }

    /// The TCP port the server listens on (on [`LocalPg::host`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: IPv4 loopback.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The database superuser's name.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The database superuser's password (from [`LocalPgOptions::superuser_password`]).
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// A libpq-style URL for a TCP connection; user and password are percent-encoded.
    pub fn url(&self, user: &str, password: &str, dbname: &str) -> String {
        let mut url = format!("postgresql://{}", percent_encode(user));
        if !password.is_empty() {
            url.push(':');
            url.push_str(&percent_encode(password));
        }
        // Plain loopback: the server has no certificate.
        let _ = write!(
            url,
            "@{HOST}:{}/{}?sslmode=disable",
            self.port,
            percent_encode(dbname)
        );
        url
    }

    /// [`LocalPg::url`] for the superuser.
    pub fn superuser_url(&self, dbname: &str) -> String {
        self.url(SUPERUSER, &self.superuser_password, dbname)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server's Unix socket, where local connections are trusted
    /// (`psql -h <socket_dir> -p <port>` needs no password).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `contents` to the file `name` in the data directory, readable only by the OS user
    /// the server runs as (mode 0600, handed to it when we are root), and returns its path.
    /// For files that settings name relative to the data directory, such as `ssl_cert_file`
    /// and `ssl_key_file`: PostgreSQL refuses a key file that it does not own or that others
    /// may read.
    pub fn write_data_file(&self, name: &str, contents: &str) -> Result<PathBuf, LocalPgError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(LocalPgError::InvalidOption(format!(
                "data file name {name:?} must be a plain file name"
            )));
        }
        let path = self.data_dir.join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("create", &path))?;
        file.write_all(contents.as_bytes())
            .map_err(io_error("write", &path))?;
        // `mode` applies only to a new file; an existing one keeps its bits otherwise.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(io_error("set permissions of", &path))?;
        self.run_as.give_to_postgres(&[&path])?;
        Ok(path)
    }

    /// The server log; worth reading when a test fails.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The directory the server programs came from (it usually holds `psql` too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server version as in `SHOW server_version_num`, e.g. `150018` for 15.18.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Stops the server with `mode` and starts it again on the same port, for tests that
    /// inject faults. Starts it if it was stopped.
    pub fn restart(&self, mode: StopMode) -> Result<(), LocalPgError> {
        self.pg_ctl_start(Some(mode))?;
        tracing::info!(port = self.port, ?mode, "local postgres restarted");
        Ok(())
    }

    /// Stops the server: a fast (clean) shutdown, or an immediate one if that does not finish.
    /// Does nothing if it is not running. The directory stays until drop.
    pub fn stop(&mut self) -> Result<(), LocalPgError> {
        if let Err(error) = self.stop_with(StopMode::Fast, PG_CTL_FAST_STOP_TIMEOUT_SECS) {
            tracing::warn!(
                port = self.port,
                error = %error,
                "fast shutdown failed, stopping immediately"
            );
            self.stop_with(StopMode::Immediate, PG_CTL_TIMEOUT_SECS)?;
        }
        Ok(())
    }

    fn stop_with(&self, mode: StopMode, timeout_secs: &str) -> Result<(), LocalPgError> {
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let mut pg_ctl = self.run_as.command(&self.bin_dir.join("pg_ctl"));
        pg_ctl.arg("stop").arg("-D").arg(&self.data_dir);
        pg_ctl.args(["-m", mode.as_pg_ctl_arg(), "-w", "-t", timeout_secs]);
        let output = run(&mut pg_ctl, "pg_ctl")?;
        // A server killed with SIGKILL leaves a stale postmaster.pid, and pg_ctl stop fails
        // with "No such process": that is stopped too.
        if output.status.success() || !self.is_running()? {
            return Ok(());
        }
        Err(LocalPgError::Command {
            command: format!("pg_ctl stop -m {}", mode.as_pg_ctl_arg()),
            status: output.status,
            output: combined_output(&output),
        })
    }

    fn is_running(&self) -> Result<bool, LocalPgError> {
        let mut pg_ctl = self.run_as.command(&self.bin_dir.join("pg_ctl"));
        pg_ctl.arg("status").arg("-D").arg(&self.data_dir);
        let output = run(&mut pg_ctl, "pg_ctl")?;
        // pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
        Ok(!matches!(output.status.code(), Some(3 | 4)))
    }

    /// Refuses temp dirs whose socket path would be too long, or that postgresql.conf's
    /// comma-separated `unix_socket_directories` could misread.
    fn check_socket_dir(&self) -> Result<(), LocalPgError> {
        let socket = self.dir.join(".s.PGSQL.65535");
        let text = socket.to_str().ok_or_else(|| {
            LocalPgError::InvalidOption(format!(
                "temp dir {} is not UTF-8: set TMPDIR to a plain path",
                self.dir.display()
            ))
        })?;
        if text.len() > MAX_SOCKET_PATH_BYTES {
            return Err(LocalPgError::InvalidOption(format!(
                "Unix socket path {text} is longer than {MAX_SOCKET_PATH_BYTES} bytes: \
                 set TMPDIR to a shorter path"
            )));
        }
        if text.contains(|c: char| c.is_whitespace() || c.is_control() || ",'\"\\".contains(c)) {
            return Err(LocalPgError::InvalidOption(format!(
                "temp dir {text} contains quotes, commas, backslashes or spaces: \
                 set TMPDIR to a plain path"
            )));
        }
        Ok(())
    }

    fn spawn_watchdog(&self) -> Result<Child, LocalPgError> {
        let mut watchdog = Command::new("sh");
        watchdog
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("usersync-pg-watchdog")
            .arg(&self.dir)
            .arg(&self.data_dir)
            .args(self.run_as.prefix())
            .arg(self.bin_dir.join("pg_ctl"))
            .current_dir("/")
            // Our end of this pipe is close-on-exec, so no other child inherits it.
            .stdin(Stdio::piped())
            // Not inherited: a test runner waits for its test's stdout and stderr to close.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of the terminal's foreground group: Ctrl-C must not kill the cleaner.
            .process_group(0);
        watchdog.spawn().map_err(|source| LocalPgError::Spawn {
            program: "sh (watchdog)".to_owned(),
            source,
        })
    }

    fn init_cluster(&self) -> Result<(), LocalPgError> {
        // initdb reads the password from a file, so it never appears in a process listing.
        let password_file = self.dir.join("superuser-password");
        write_private_file(&password_file, &format!("{}\n", self.superuser_password))?;
        self.run_as.give_to_postgres(&[&self.dir])?;
        let mut initdb = self.run_as.command(&self.bin_dir.join("initdb"));
        initdb.arg("-D").arg(&self.data_dir);
        initdb.args([
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ]);
        initdb.arg(format!("--pwfile={}", password_file.display()));
        // --no-sync: the data is thrown away, so durability is wasted time.
        initdb.args(["-E", "UTF8", "--locale=C", "--no-sync"]);
        let result = run(&mut initdb, "initdb");
        let removed = fs::remove_file(&password_file);
        let output = result?;
        if !output.status.success() {
            let text = combined_output(&output);
            let hint = if matches!(self.run_as, RunAs::Postgres { .. })
                && text.contains("Permission denied")
            {
                format!(
                    " (the OS user {POSTGRES_OS_USER} must be able to reach {}: \
                     check the permissions of its parents, or set TMPDIR)",
                    self.dir.display()
                )
            } else {
                String::new()
            };
            return Err(LocalPgError::InitDb {
                status: output.status,
                output: text,
                hint,
            });
        }
        removed.map_err(io_error("remove", &password_file))?;

        self.write_server_file(&self.data_dir.join("pg_hba.conf"), PG_HBA_CONF)?;
        let postgresql_conf = self.data_dir.join("postgresql.conf");
        let mut conf = OpenOptions::new()
            .append(true)
            .open(&postgresql_conf)
            .map_err(io_error("open", &postgresql_conf))?;
        writeln!(
            conf,
            "\n# Throwaway server settings from usersync's localpg\ninclude '{SETTINGS_FILE}'"
        )
        .map_err(io_error("append to", &postgresql_conf))?;
        Ok(())
    }

    fn server_version_from_data_dir(&self) -> Result<u32, LocalPgError> {
        let path = self.data_dir.join("PG_VERSION");
        let text = fs::read_to_string(&path).map_err(io_error("read", &path))?;
        parse_server_version(text.trim()).ok_or_else(|| {
            LocalPgError::InvalidOption(format!("unrecognised PG_VERSION {:?}", text.trim()))
        })
    }

    fn start_on_free_port(&mut self, extra_conf: &[(String, String)]) -> Result<(), LocalPgError> {
        let mut attempt = 1;
        loop {
            self.port = free_loopback_port()?;
            let settings = render_settings(&server_settings(self.port, &self.dir), extra_conf);
            self.write_server_file(&self.data_dir.join(SETTINGS_FILE), &settings)?;
            match self.pg_ctl_start(None) {
                Err(error) if error.is_port_taken() && attempt < START_ATTEMPTS => {
                    tracing::warn!(
                        port = self.port,
                        attempt,
                        "port taken before postgres bound it, retrying"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// `pg_ctl start`, or `pg_ctl restart` when a stop mode is given.
    fn pg_ctl_start(&self, restart: Option<StopMode>) -> Result<(), LocalPgError> {
        // Only this attempt's log lines explain this attempt's failure.
        let log_offset = fs::metadata(&self.log_file).map_or(0, |meta| meta.len());
        let mut pg_ctl = self.run_as.command(&self.bin_dir.join("pg_ctl"));
        match restart {
            None => pg_ctl.arg("start"),
            Some(mode) => pg_ctl.args(["restart", "-m", mode.as_pg_ctl_arg()]),
        };
        pg_ctl
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file);
        pg_ctl.args(["-w", "-t", PG_CTL_TIMEOUT_SECS]);
        let output = run(&mut pg_ctl, "pg_ctl")?;
        if output.status.success() {
            return Ok(());
        }
        Err(LocalPgError::Start {
            port: self.port,
            pg_ctl_output: combined_output(&output),
            log_file: self.log_file.clone(),
            log_tail: read_log_tail(&self.log_file, log_offset),
        })
    }

    /// Writes a file the server reads, owned by the user it runs as.
    fn write_server_file(&self, path: &Path, contents: &str) -> Result<(), LocalPgError> {
        fs::write(path, contents).map_err(io_error("write", path))?;
        self.run_as.give_to_postgres(&[path])
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        // Immediate: the data is about to be deleted, so a clean shutdown buys nothing.
        match self.stop_with(StopMode::Immediate, PG_CTL_TIMEOUT_SECS) {
            Ok(()) => {
                if let Err(error) = fs::remove_dir_all(&self.dir) {
                    if error.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            error = %error,
                            "could not remove local postgres directory"
                        );
                    }
                }
                if let Some(mut watchdog) = self.watchdog.take() {
                    // SIGKILL: it ignores the polite signals by design.
                    let _ = watchdog.kill();
                    let _ = watchdog.wait();
                }
                tracing::debug!(port = self.port, "local postgres stopped and removed");
            }
            Err(error) => {
                // Never delete a running server's files. Dropping the watchdog's handle closes
                // its pipe, so it tries the stop and the removal once more by itself.
                tracing::warn!(
                    port = self.port,
                    data_dir = %self.data_dir.display(),
                    error = %error,
                    "could not stop local postgres, leaving it to the watchdog"
                );
                self.watchdog.take();
            }
        }
    }
}

/// How server programs are launched: as ourselves, or as the postgres OS user when we are
/// root (PostgreSQL refuses to run as root).
#[derive(Debug, Clone)]
enum RunAs {
    CurrentUser,
    Postgres { prefix: Vec<OsString> },
}

impl RunAs {
    fn detect() -> Result<RunAs, LocalPgError> {
        if effective_uid()? != 0 {
            return Ok(RunAs::CurrentUser);
        }
        // The user's primary group: setpriv would otherwise keep root's group.
        let output = run(Command::new("id").args(["-g", POSTGRES_OS_USER]), "id")?;
        let gid = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() || gid.parse::<u32>().is_err() {
            return Err(LocalPgError::NoPostgresUser);
        }
        let prefix = [
            "setpriv".to_owned(),
            format!("--reuid={POSTGRES_OS_USER}"),
            format!("--regid={gid}"),
            "--init-groups".to_owned(),
            "--".to_owned(),
        ];
        Ok(RunAs::Postgres {
            prefix: prefix.into_iter().map(OsString::from).collect(),
        })
    }

    /// The words to put before a program to run it as the server's user.
    fn prefix(&self) -> &[OsString] {
        match self {
            RunAs::CurrentUser => &[],
            RunAs::Postgres { prefix } => prefix,
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = match self.prefix().split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
        };
        command
            // The postgres user may not be allowed into our working directory.
            .current_dir("/")
            .stdin(Stdio::null())
            // Messages we match on (and show) are the untranslated ones.
            .env("LC_ALL", "C");
        command
    }

    /// Hands files to the server's user (`chown -R`); nothing to do when not root.
    fn give_to_postgres(&self, paths: &[&Path]) -> Result<(), LocalPgError> {
        if let RunAs::CurrentUser = self {
            return Ok(());
        }
        let mut chown = Command::new("chown");
        chown
            .args(["-R", &format!("{POSTGRES_OS_USER}:")])
            .args(paths);
        let output = run(&mut chown, "chown")?;
        if !output.status.success() {
            return Err(LocalPgError::Command {
                command: "chown".to_owned(),
                status: output.status,
                output: combined_output(&output),
            });
        }
        Ok(())
    }
}

/// Our effective uid, from `/proc/self/status` (no libc), else from `id -u`.
fn effective_uid() -> Result<u32, LocalPgError> {
    if let Some(uid) = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_effective_uid(&status))
    {
        return Ok(uid);
    }
    let output = run(Command::new("id").arg("-u"), "id")?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            LocalPgError::InvalidOption("could not tell our user id from `id -u`".to_owned())
        })
}

/// The effective uid from `/proc/<pid>/status`: its `Uid:` line is real, effective, saved, fs.
fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn validate_options(opts: &LocalPgOptions) -> Result<(), LocalPgError> {
    let password = &opts.superuser_password;
    if password.is_empty() {
        return Err(LocalPgError::InvalidOption(
            "superuser_password is empty: SCRAM authentication needs a password".to_owned(),
        ));
    }
    if password.contains(['\n', '\r', '\0']) {
        return Err(LocalPgError::InvalidOption(
            "superuser_password contains a line break or NUL: initdb reads only its first line"
                .to_owned(),
        ));
    }
    for (name, value) in &opts.extra_conf {
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !name_ok {
            return Err(LocalPgError::InvalidOption(format!(
                "extra_conf setting name {name:?} is not a PostgreSQL parameter name"
            )));
        }
        if value.contains(|c: char| c.is_control()) {
            return Err(LocalPgError::InvalidOption(format!(
                "extra_conf value for {name} contains a control character"
            )));
        }
    }
    Ok(())
}

/// Finds a directory holding `initdb`, `pg_ctl` and `postgres` (see [`LocalPgOptions::bin_dir`]).
/// An explicit choice that lacks them is an error, not a reason to look elsewhere.
fn find_bin_dir(configured: Option<&Path>) -> Result<PathBuf, LocalPgError> {
    let has_programs = |dir: &Path| SERVER_PROGRAMS.iter().all(|p| dir.join(p).is_file());
    let explicit = configured
        .map(|dir| (dir.to_path_buf(), "LocalPgOptions::bin_dir"))
        .or_else(|| {
            std::env::var_os(PG_BIN_ENV)
                .filter(|dir| !dir.is_empty())
                .map(|dir| (PathBuf::from(dir), PG_BIN_ENV))
        });
    if let Some((dir, origin)) = explicit {
        if has_programs(&dir) {
            return Ok(dir);
        }
        return Err(LocalPgError::BinariesNotFound {
            searched: format!("{} from {origin}", dir.display()),
        });
    }
    if let Some(dir) = DEBIAN_BIN_DIRS
        .iter()
        .map(Path::new)
        .find(|dir| dir.join("initdb").is_file())
    {
        return Ok(dir.to_path_buf());
    }
    // initdb on PATH is often a symlink (/usr/local/bin/initdb); its siblings, postgres
    // included, live where it points.
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("initdb"))
        .find(|initdb| initdb.is_file())
        .and_then(|initdb| fs::canonicalize(initdb).ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .filter(|dir| has_programs(dir));
    on_path.ok_or_else(|| LocalPgError::BinariesNotFound {
        searched: format!(
            "{PG_BIN_ENV} unset, {}/initdb missing, no initdb on PATH",
            "/usr/lib/postgresql/{18,17,16,15,14}/bin"
        ),
    })
}

/// `postgres --version`, parsed; `None` if the output has an unfamiliar shape.
fn server_version_from_binary(bin_dir: &Path) -> Result<Option<u32>, LocalPgError> {
    let postgres = bin_dir.join("postgres");
    // --version is answered before the server's refuse-to-run-as-root check.
    let output = run(
        Command::new(&postgres).arg("--version"),
        "postgres --version",
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_once("(PostgreSQL)")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(parse_server_version);
    if version.is_none() {
        tracing::debug!(output = %text.trim(), "unrecognised postgres --version output");
    }
    Ok(version)
}

/// `15.18` → 150018, `9.6.24` → 90624, `17beta1` → 170000 (as `server_version_num`).
fn parse_server_version(version: &str) -> Option<u32> {
    let mut parts = Vec::new();
    for part in version.split('.') {
        let digits_end = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        if digits_end == 0 {
            break;
        }
        parts.push(part[..digits_end].parse::<u32>().ok()?);
        if digits_end < part.len() {
            break; // "17beta1", "16devel": no minor version yet.
        }
    }
    let part = |i: usize| parts.get(i).copied().unwrap_or(0);
    match parts.first()? {
        // From 10 on, versions have two parts; before, three.
        major if *major >= 10 => Some(major * 10_000 + part(1)),
        major => Some(major * 10_000 + part(1) * 100 + part(2)),
    }
}

/// Our settings for a fast, disposable, logical-replication-ready server.
fn server_settings(port: u16, socket_dir: &Path) -> Vec<(&'static str, String)> {
    let fixed = [
        ("listen_addresses", HOST),
        ("wal_level", "logical"),
        // Each test has its own slots (some several) and walsender; tests share a server, and
        // its slots stay until it goes.
        ("max_replication_slots", "256"),
        ("max_wal_senders", "64"),
        ("max_connections", "200"),
        // Durability is wasted on data that is thrown away.
        ("fsync", "off"),
        ("full_page_writes", "off"),
        ("shared_buffers", "128MB"),
        // pg_ctl -l sends the server's stderr to the log file; no collector process needed.
        ("logging_collector", "off"),
        ("log_min_messages", "warning"),
        ("password_encryption", "scram-sha-256"),
    ];
    let mut settings = vec![
        ("port", port.to_string()),
        ("unix_socket_directories", socket_dir.display().to_string()),
    ];
    settings.extend(
        fixed
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    settings
}

/// The settings file: ours, then the caller's (later lines win).
fn render_settings(ours: &[(&str, String)], extra: &[(String, String)]) -> String {
    let mut text = String::from("# Written by usersync's localpg for a throwaway server.\n");
    let all = ours
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .chain(
            extra
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
    for (name, value) in all {
        let _ = writeln!(text, "{name} = {}", quote_conf_value(value));
    }
    text
}

/// A postgresql.conf string literal: quotes are doubled and backslashes escaped, because the
/// config parser reads backslash escapes inside quotes.
fn quote_conf_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL user, password and
/// database names.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// Asks the kernel for a free port on loopback. The port is free again when the listener
/// closes, so the server may lose a race for it; [`LocalPg::start`] retries.
fn free_loopback_port() -> Result<u16, LocalPgError> {
    let no_port = |source| LocalPgError::NoFreePort { source };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(no_port)?;
    Ok(listener.local_addr().map_err(no_port)?.port())
}

/// Creates `usersync-pg-<pid>-<counter>-<nanos>` under the temp dir, mode 0700: the server
/// requires its data directory to be private, and the password file lives here briefly.
fn create_private_dir() -> Result<PathBuf, LocalPgError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mut base = std::env::temp_dir();
    if base.is_relative() {
        // The server and the watchdog run elsewhere ("/"): paths must be absolute.
        let cwd = std::env::current_dir().map_err(io_error("read", Path::new(".")))?;
        base = cwd.join(base);
    }
    let dir = base.join(format!(
        "usersync-pg-{}-{counter}-{nanos}",
        std::process::id()
    ));
    // Fails if it exists: the name is ours alone.
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io_error("create", &dir))?;
    // The umask may have taken bits off; the server checks for exactly 0700 or 0750.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(io_error("set permissions of", &dir))?;
    Ok(dir)
}

fn write_private_file(path: &Path, contents: &str) -> Result<(), LocalPgError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    file.write_all(contents.as_bytes())
        .map_err(io_error("write", path))
}

/// The last lines written to the log at or after `offset`, or a note saying why there are none.
fn read_log_tail(log_file: &Path, offset: u64) -> String {
    let bytes = match fs::read(log_file) {
        Ok(bytes) => bytes,
        Err(error) => return format!("(could not read the log: {error})"),
    };
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if tail.trim().is_empty() {
        "(the log is empty)".to_owned()
    } else {
        tail
    }
}

/// Runs a command to completion, capturing its output.
fn run(command: &mut Command, program: &str) -> Result<Output, LocalPgError> {
    tracing::debug!(command = ?command, "running");
    command.output().map_err(|source| LocalPgError::Spawn {
        program: program.to_owned(),
        source,
    })
}

fn combined_output(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    [stderr.trim(), stdout.trim()]
        .into_iter()
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> LocalPgError + 'a {
    move |source| LocalPgError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pg_can_live_in_a_static() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LocalPg>();
    }

    #[test]
    fn parses_server_versions() {
        assert_eq!(parse_server_version("15.18"), Some(150_018));
        assert_eq!(parse_server_version("10.0"), Some(100_000));
        assert_eq!(parse_server_version("9.6.24"), Some(90_624));
        assert_eq!(parse_server_version("17beta1"), Some(170_000));
        assert_eq!(parse_server_version("16devel"), Some(160_000));
        assert_eq!(parse_server_version("18"), Some(180_000));
        assert_eq!(parse_server_version("beta"), None);
        assert_eq!(parse_server_version(""), None);
    }

    #[test]
    fn parses_effective_uid_from_proc_status() {
        let status = "Name:\tcargo\nUid:\t1000\t0\t0\t0\nGid:\t100\t100\t100\t100\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn percent_encodes_reserved_characters() {
        assert_eq!(percent_encode("plain-user_1.x~"), "plain-user_1.x~");
        assert_eq!(
            percent_encode("p@ss:w/rd%?#é"),
            "p%40ss%3Aw%2Frd%25%3F%23%C3%A9"
        );
    }

    #[test]
    fn quotes_conf_values() {
        assert_eq!(quote_conf_value("logical"), "'logical'");
        assert_eq!(quote_conf_value(r"it's a\b"), r"'it''s a\\b'");
    }

    #[test]
    fn caller_settings_come_after_ours() {
        let ours = server_settings(5433, Path::new("/tmp/x"));
        let extra = [("wal_level".to_owned(), "replica".to_owned())];
        let text = render_settings(&ours, &extra);
        assert!(text.contains("port = '5433'\n"));
        assert!(text.contains("unix_socket_directories = '/tmp/x'\n"));
        let ours_at = text.find("wal_level = 'logical'").unwrap();
        let theirs_at = text.find("wal_level = 'replica'").unwrap();
        assert!(ours_at < theirs_at);
    }

    #[test]
    fn rejects_unusable_options() {
        let empty_password = LocalPgOptions {
            superuser_password: String::new(),
            ..LocalPgOptions::default()
        };
        assert!(validate_options(&empty_password).is_err());
        let bad_name = LocalPgOptions {
            extra_conf: vec![("work_mem = 1\nfsync".to_owned(), "on".to_owned())],
            ..LocalPgOptions::default()
        };
        assert!(validate_options(&bad_name).is_err());
        assert!(validate_options(&LocalPgOptions::default()).is_ok());
    }

    #[test]
    fn options_debug_hides_the_password() {
        let opts = LocalPgOptions {
            superuser_password: "hunter2".to_owned(),
            ..LocalPgOptions::default()
        };
        assert!(!format!("{opts:?}").contains("hunter2"));
    }

    #[test]
    fn explicit_bin_dir_without_programs_is_an_actionable_error() {
        let error = find_bin_dir(Some(Path::new("/nonexistent/bin"))).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains(PG_BIN_ENV), "{message}");
        assert!(message.contains("/nonexistent/bin"), "{message}");
    }

    #[test]
    fn recognises_port_conflicts_in_the_log() {
        let error = LocalPgError::Start {
            port: 1,
            pg_ctl_output: String::new(),
            log_file: PathBuf::new(),
            log_tail: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
                .to_owned(),
        };
        assert!(error.is_port_taken());
    }
}
