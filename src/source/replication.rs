//! A small client for PostgreSQL's streaming replication protocol.
//!
//! `tokio-postgres` from crates.io cannot open a replication stream (no `replication`
//! startup key, no CopyBoth), so this module speaks just enough of the protocol itself:
//! startup with `replication=database`, TLS (SSLRequest, then rustls with SNI), SCRAM-SHA-256
//! with or without channel binding, md5 and cleartext only inside TLS or to this machine
//! (unless allowed, see [`crate::conn::auth_policy`]), simple queries for the
//! replication commands, and the CopyBoth sub-protocol in which a walsender streams WAL.
//!
//! A logical walsender in PostgreSQL 15 cannot start streaming twice on one connection, so
//! every streaming session opens a fresh connection (see [`ReplicationConnection::start_logical_replication`],
//! which consumes the connection).
//!
//! Docs: <https://www.postgresql.org/docs/current/protocol-replication.html> and
//! <https://www.postgresql.org/docs/current/protocol-flow.html>.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{tls, PgUrl, SslMode, UrlError};
use crate::lsn::Lsn;
use crate::source::wire::{self, Frame, ServerMessage, WireError};

mod auth;

pub use auth::{AuthError, AuthMethod};

/// Session settings that fix the text form of the values pgoutput sends, whatever the
/// server's defaults: the mapping parses timestamps, floats and bytea in exactly this form.
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 \
     -c IntervalStyle=iso_8601 -c bytea_output=hex";

/// How long to wait for a TCP connection when the URL sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// Everything that can go wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot reach the source at {target}: {source}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to the source at {target}")]
    ConnectTimeout { target: String },
    #[error("TLS with the source at {target} failed: {source}")]
    TlsHandshake {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    TlsConfig(#[from] tls::TlsError),
    #[error("cannot replicate from {target}: {source}")]
    NotReplicable {
        target: String,
        #[source]
        source: UrlError,
    },
    #[error("the source at {target} does not accept TLS, but sslmode={mode} requires it")]
    TlsRefused { target: String, mode: &'static str },
    #[error("authentication with the source at {target} is not possible: {reason}")]
    Authentication {
        target: String,
        #[source]
        reason: AuthError,
    },
    #[error("the source {context} failed: {message}")]
    Server {
        context: String,
        message: Box<ServerMessage>,
    },
    #[error("the source sent an unexpected message {tag:?} while {context}")]
    Unexpected { context: &'static str, tag: char },
    #[error("the source sent a malformed reply to {command}: {what}")]
    BadReply { command: &'static str, what: String },
    /// A PostgreSQL server sends only small messages before authentication completes, so a long
    /// one means the other end is something else, or something in between tampers with it.
    #[error(
        "the source at {target} sent a message of {len} bytes (type {tag:?}) before \
         authentication completed, where PostgreSQL sends at most a few kilobytes; usersync \
         accepts {limit} bytes at that stage and read no further. Check that {target} is a \
         PostgreSQL server and that nothing in between (a proxy, a load balancer) alters the \
         connection"
    )]
    OversizedBeforeAuthentication {
        target: String,
        tag: char,
        len: u32,
        limit: usize,
    },
    #[error("the source closed the replication connection")]
    Closed,
    #[error(
        "the source at {target} sent nothing for {}s, not even a keepalive; the connection is \
         taken for dead",
        silent_for.as_secs()
    )]
    Silent {
        target: String,
        silent_for: Duration,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl ReplicationError {
    /// The SQLSTATE of a server-reported error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { message, .. } => Some(&message.code),
            _ => None,
        }
    }

    /// Whether reconnecting later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io { .. }
            | ReplicationError::ConnectTimeout { .. }
            | ReplicationError::TlsHandshake { .. }
            | ReplicationError::Closed
            | ReplicationError::Silent { .. } => true,
            ReplicationError::Server { message, .. } => is_transient_sqlstate(&message.code),
            _ => false,
        }
    }
}

/// SQLSTATEs that a retry can outlive: connection failures (class 08), the server shutting
/// down or starting (57P01-57P03), too many connections (53300), and the replication slot
/// being busy (55006), which happens when the previous walsender of this replicator has not
/// noticed yet that its client is gone.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "55006")
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// Rows of a simple query, all values in text form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let index = self.columns.iter().position(|name| name == column)?;
        self.rows.first()?.get(index)?.as_deref()
    }
}

/// What `CREATE_REPLICATION_SLOT` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

/// An open replication connection, before streaming.
pub struct ReplicationConnection {
    io: Box<dyn AsyncStream>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    target: String,
    server_version_num: Option<u32>,
    /// Whether the server has accepted the client (AuthenticationOk): until then, only small
    /// messages are read ([`wire::MAX_PRE_AUTH_FRAME_LEN`]).
    authenticated: bool,
}

impl ReplicationConnection {
    /// Connects and authenticates with `replication=database` to the URL's database.
    pub async fn connect(url: &PgUrl, application_name: &str) -> Result<Self, ReplicationError> {
        let target = url.redacted();
        // Config validation refuses this already; a library caller may not have validated.
        url.check_replication_endpoint()
            .map_err(|source| ReplicationError::NotReplicable {
                target: target.clone(),
                source,
            })?;
        let timeout = url.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((url.host.as_str(), url.port)))
            .await
            .map_err(|_| ReplicationError::ConnectTimeout {
                target: target.clone(),
            })?
            .map_err(|source| ReplicationError::Io {
                target: target.clone(),
                source,
            })?;
        // Status updates are tiny and latency-sensitive; don't let Nagle hold them back.
        tcp.set_nodelay(true)
            .map_err(|source| ReplicationError::Io {
                target: target.clone(),
                source,
            })?;
        let (io, channel_binding) = negotiate_tls(tcp, url, &target).await?;
        tls::warn_if_plaintext(url, channel_binding.is_some());
        let mut conn = ReplicationConnection {
            io,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            target,
            server_version_num: None,
            authenticated: false,
        };
        conn.startup(url, application_name, channel_binding).await?;
        Ok(conn)
    }

    /// The server's `server_version_num`, as reported at startup.
    pub fn server_version_num(&self) -> Option<u32> {
        self.server_version_num
    }

    async fn startup(
        &mut self,
        url: &PgUrl,
        application_name: &str,
        tls_end_point: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let application_name = url.application_name.as_deref().unwrap_or(application_name);
        // The URL's own options (Neon's `endpoint=...`, users' `-c` settings) come first, so
        // ours win where they overlap: the mapping depends on them.
        let options = match &url.options {
            Some(theirs) => format!("{theirs} {SESSION_OPTIONS}"),
            None => SESSION_OPTIONS.to_owned(),
        };
        let params = [
            ("user", url.user.as_str()),
            ("database", url.dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("options", options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)
            .map_err(|e| self.bad_reply("startup", e.to_string()))?;
        self.flush().await?;
        self.authenticate(url, tls_end_point).await?;
        // Small messages only until the server is ready: a server that let the client in
        // without proving anything (trust) must not get to reserve a gigabyte either.
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                wire::PARAMETER_STATUS => self.note_parameter(&frame.body),
                wire::BACKEND_KEY_DATA | wire::NOTICE_RESPONSE => {}
                wire::READY_FOR_QUERY => {
                    self.authenticated = true;
                    return Ok(());
                }
                wire::ERROR_RESPONSE => return Err(self.server_error("startup", &frame)?),
                tag => return Err(unexpected("starting up", tag)),
            }
        }
    }

    /// Servers report `server_version` (not `server_version_num`) at startup.
    fn note_parameter(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        if let (Some(b"server_version"), Some(value)) = (parts.next(), parts.next()) {
            self.server_version_num = std::str::from_utf8(value).ok().and_then(version_num);
        }
    }

    /// Answers the server's authentication requests until it accepts the client and the
    /// client accepts it (see [`auth`] for what is answered and what is refused).
    async fn authenticate(
        &mut self,
        url: &PgUrl,
        tls_end_point: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let mut authenticator = auth::Authenticator::new(url, tls_end_point);
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                wire::AUTHENTICATION => {}
                wire::ERROR_RESPONSE => return Err(self.server_error("authentication", &frame)?),
                tag => return Err(unexpected("authenticating", tag)),
            }
            let step = authenticator
                .answer(&frame.body, &mut self.write_buf)
                .map_err(|reason| ReplicationError::Authentication {
                    target: self.target.clone(),
                    reason,
                })?;
            match step {
                auth::Step::Authenticated => return Ok(()),
                auth::Step::Continue if self.write_buf.is_empty() => {}
                auth::Step::Continue => self.flush().await?,
            }
        }
    }

    /// Runs one simple-protocol query (replication commands included) and collects its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)
            .map_err(|e| self.bad_reply("query", e.to_string()))?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut failure = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                wire::ROW_DESCRIPTION => result.columns = wire::parse_row_description(&frame.body)?,
                wire::DATA_ROW => result.rows.push(wire::parse_data_row(&frame.body)?),
                wire::COMMAND_COMPLETE
                | wire::EMPTY_QUERY_RESPONSE
                | wire::NOTICE_RESPONSE
                | wire::PARAMETER_STATUS => {}
                wire::ERROR_RESPONSE => {
                    failure = Some(self.server_error(command_name(sql), &frame)?)
                }
                wire::READY_FOR_QUERY => {
                    return match failure {
                        Some(error) => Err(error),
                        None => Ok(result),
                    }
                }
                tag => return Err(unexpected("running a query", tag)),
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the cluster's identity, which the checkpoint is tied to.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let result = self.simple_query("IDENTIFY_SYSTEM").await?;
        let field = |name: &str| {
            result
                .first(name)
                .ok_or_else(|| ReplicationError::BadReply {
                    command: "IDENTIFY_SYSTEM",
                    what: format!("no {name}"),
                })
        };
        let bad = |what: &str| ReplicationError::BadReply {
            command: "IDENTIFY_SYSTEM",
            what: what.to_owned(),
        };
        Ok(SystemIdentity {
            system_id: field("systemid")?.to_owned(),
            timeline: field("timeline")?
                .parse()
                .map_err(|_| bad("bad timeline"))?,
            xlog_pos: field("xlogpos")?.parse().map_err(|_| bad("bad xlogpos"))?,
            dbname: result.first("dbname").map(str::to_owned),
        })
    }

    /// `CREATE_REPLICATION_SLOT ... LOGICAL pgoutput`. With `export_snapshot`, the snapshot
    /// stays usable by `SET TRANSACTION SNAPSHOT` until this connection runs another command.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = if failover {
            // Failover slots (PostgreSQL 17+) exist only in the option-list syntax.
            let snapshot = if export_snapshot { "export" } else { "nothing" };
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{snapshot}', FAILOVER true)",
                escape_identifier(slot)
            )
        } else {
            // The pre-15 keyword syntax, which PostgreSQL 15+ still accepts, keeps 14 working.
            let snapshot = if export_snapshot {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            };
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snapshot}",
                escape_identifier(slot)
            )
        };
        self.create_slot(&sql).await
    }

    /// `CREATE_REPLICATION_SLOT ... TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT`: a slot for
    /// its snapshot alone, dropped by the server when this connection ends.
    pub async fn create_temporary_logical_slot(
        &mut self,
        slot: &str,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            escape_identifier(slot)
        );
        self.create_slot(&sql).await
    }

    /// Runs a `CREATE_REPLICATION_SLOT` command and reads its reply.
    async fn create_slot(&mut self, sql: &str) -> Result<CreatedSlot, ReplicationError> {
        let result = self.simple_query(sql).await?;
        let consistent_point = result
            .first("consistent_point")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ReplicationError::BadReply {
                command: "CREATE_REPLICATION_SLOT",
                what: "no consistent_point".into(),
            })?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot_name: result.first("snapshot_name").map(str::to_owned),
        })
    }

    /// `START_REPLICATION SLOT ... LOGICAL`: switches the connection into CopyBoth mode.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let options = options
            .iter()
            .map(|(name, value)| format!("{} {}", escape_identifier(name), escape_literal(value)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            escape_identifier(slot)
        );
        frontend::query(&sql, &mut self.write_buf)
            .map_err(|e| self.bad_reply("START_REPLICATION", e.to_string()))?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                wire::COPY_BOTH_RESPONSE => return Ok(ReplicationStream { conn: self }),
                wire::NOTICE_RESPONSE | wire::PARAMETER_STATUS => {}
                wire::ERROR_RESPONSE => {
                    let error = self.server_error("START_REPLICATION", &frame)?;
                    // Drain to ReadyForQuery so the error is the one reported, not a hangup.
                    let _ = self.read_until_ready().await;
                    return Err(error);
                }
                tag => return Err(unexpected("starting replication", tag)),
            }
        }
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
    }

    async fn read_until_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            if self.read_frame().await?.tag == wire::READY_FOR_QUERY {
                return Ok(());
            }
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        let limit = if self.authenticated {
            wire::MAX_FRAME_LEN
        } else {
            wire::MAX_PRE_AUTH_FRAME_LEN
        };
        loop {
            match wire::take_frame(&mut self.read_buf, limit) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(WireError::TooLong { tag, len, .. }) if !self.authenticated => {
                    return Err(ReplicationError::OversizedBeforeAuthentication {
                        target: self.target.clone(),
                        tag,
                        len,
                        limit,
                    })
                }
                Err(error) => return Err(error.into()),
            }
            let read = self
                .io
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|source| self.io_error(source))?;
            if read == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        let result = async {
            self.io.write_all(&self.write_buf).await?;
            self.io.flush().await
        }
        .await;
        self.write_buf.clear();
        result.map_err(|source| self.io_error(source))
    }

    fn io_error(&self, source: std::io::Error) -> ReplicationError {
        ReplicationError::Io {
            target: self.target.clone(),
            source,
        }
    }

    fn bad_reply(&self, command: &'static str, what: String) -> ReplicationError {
        ReplicationError::BadReply { command, what }
    }

    fn server_error(
        &self,
        context: &str,
        frame: &Frame,
    ) -> Result<ReplicationError, ReplicationError> {
        let message = wire::parse_server_message(frame.tag, &frame.body)?;
        Ok(ReplicationError::Server {
            context: format!("{context} at {}", self.target),
            message: Box::new(message),
        })
    }
}

/// A connection in CopyBoth mode: WAL data in, status updates out.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next CopyData payload, or `None` when the server ended the stream.
    ///
    /// Cancel-safe: bytes read before a cancellation stay in the buffer, so this can sit in a
    /// `select!` next to timers.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ReplicationError> {
        loop {
            let frame = self.conn.read_frame().await?;
            match frame.tag {
                wire::COPY_DATA => return Ok(Some(frame.body)),
                wire::COPY_DONE => return Ok(None),
                // A walsender that shuts down (fast shutdown, switchover) once all it sent is
                // confirmed ends the stream with CommandComplete and no CopyDone (`WalSndDone`
                // in walsender.c): the end of the stream, to reconnect after, not a protocol
                // violation to stop for.
                wire::COMMAND_COMPLETE => return Ok(None),
                wire::NOTICE_RESPONSE | wire::PARAMETER_STATUS => {}
                wire::ERROR_RESPONSE => {
                    return Err(self.conn.server_error("replication stream", &frame)?)
                }
                tag => return Err(unexpected("streaming", tag)),
            }
        }
    }

    /// The error for a stream that has been silent for `silent_for`.
    pub fn silent(&self, silent_for: Duration) -> ReplicationError {
        ReplicationError::Silent {
            target: self.conn.target.clone(),
            silent_for,
        }
    }

    /// Sends one CopyData message (a Standby Status Update, in practice).
    pub async fn send(&mut self, payload: Bytes) -> Result<(), ReplicationError> {
        let copy = frontend::CopyData::new(payload)
            .map_err(|e| self.conn.bad_reply("CopyData", e.to_string()))?;
        copy.write(&mut self.conn.write_buf);
        self.conn.flush().await
    }

    /// Ends streaming: CopyDone, then waits (briefly) for the server to finish its side, and
    /// terminates the session. Errors are irrelevant at this point: the position was already
    /// reported in a status update.
    pub async fn finish(mut self) {
        frontend::copy_done(&mut self.conn.write_buf);
        if self.conn.flush().await.is_ok() {
            let drain = async {
                loop {
                    match self.conn.read_frame().await {
                        Ok(frame) if frame.tag == wire::READY_FOR_QUERY => break,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        self.conn.close().await;
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    url: &PgUrl,
    target: &str,
) -> Result<(Box<dyn AsyncStream>, Option<Vec<u8>>), ReplicationError> {
    let Some(config) = tls::client_config(url)? else {
        return Ok((Box::new(tcp), None));
    };
    let io_error = |source| ReplicationError::Io {
        target: target.to_owned(),
        source,
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(io_error)?;
    let answer = tcp.read_u8().await.map_err(io_error)?;
    match answer {
        b'S' => {}
        b'N' if matches!(url.sslmode, SslMode::Prefer | SslMode::Allow) => {
            // Warned about by the caller, unless the source is on this machine.
            tracing::debug!(source = %target, "the source refused TLS; continuing unencrypted as sslmode allows");
            return Ok((Box::new(tcp), None));
        }
        b'N' => {
            return Err(ReplicationError::TlsRefused {
                target: target.to_owned(),
                mode: url.sslmode.as_str(),
            })
        }
        other => return Err(unexpected("negotiating TLS", other)),
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
    let server_name = tls::server_name(url)?;
    let stream = connector
        .connect(server_name, tcp)
        .await
        .map_err(|source| match tls::handshake_error(url, &source) {
            Some(error) => ReplicationError::TlsConfig(error),
            None => ReplicationError::TlsHandshake {
                target: target.to_owned(),
                source,
            },
        })?;
    // An empty end point means "TLS, but no binding data for this certificate".
    let end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| tls::tls_server_end_point(cert.as_ref()))
        .unwrap_or_default();
    Ok((Box::new(stream), Some(end_point)))
}

fn unexpected(context: &'static str, tag: u8) -> ReplicationError {
    ReplicationError::Unexpected {
        context,
        tag: char::from(tag),
    }
}

/// `server_version` text (`15.18 (Debian 15.18-0+deb12u1)`, `17devel`, `9.6.3`) as
/// `server_version_num` (`150018`).
fn version_num(text: &str) -> Option<u32> {
    let numeric: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    // Checked: the text is the server's, and a hostile one may send any number.
    if major >= 10 {
        major.checked_mul(10_000)?.checked_add(minor)
    } else {
        let patch: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        major
            .checked_mul(10_000)?
            .checked_add(minor.checked_mul(100)?)?
            .checked_add(patch)
    }
}

/// The first word of a command, to name it in errors without echoing the whole text.
fn command_name(sql: &str) -> &str {
    sql.split_whitespace().next().unwrap_or("query")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_versions() {
        assert_eq!(version_num("15.18 (Debian 15.18-0+deb12u1)"), Some(150018));
        assert_eq!(version_num("17devel"), Some(170000));
        assert_eq!(version_num("18beta1"), Some(180000));
        assert_eq!(version_num("9.6.3"), Some(90603));
        assert_eq!(version_num("unknown"), None);
        // A hostile server's number overflows nothing.
        assert_eq!(version_num("4294967295"), None);
        assert_eq!(version_num("9.4294967295"), None);
    }

    use crate::conn::test_pki::{self, TestPki};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    /// Connects to a fake source that accepts SSLRequest, completes the TLS handshake and
    /// hangs up; returns the SNI the handshake carried.
    async fn sni_of_connection_to(host: &str) -> Option<String> {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let acceptor = TlsAcceptor::from(test_pki::server_config(&cert));
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let mut ssl_request = [0_u8; 8];
            tcp.read_exact(&mut ssl_request).await?;
            tcp.write_all(b"S").await?;
            let stream = acceptor.accept(tcp).await?;
            Ok::<_, std::io::Error>(stream.get_ref().1.server_name().map(str::to_owned))
        });
        let url: PgUrl = format!(
            "postgresql://u:pw@{host}:{port}/db?sslmode=verify-full&sslrootcert={}",
            pki.ca_cert.display()
        )
        .parse()
        .expect("test URL");
        let outcome = ReplicationConnection::connect(&url, "usersync-test").await;
        assert!(
            matches!(
                outcome,
                Err(ReplicationError::Closed | ReplicationError::Io { .. })
            ),
            "the fake server hangs up after the handshake"
        );
        server.await.expect("server task").expect("TLS handshake")
    }

    #[tokio::test]
    async fn tls_carries_the_host_name_as_sni() {
        assert_eq!(
            sni_of_connection_to("localhost").await.as_deref(),
            Some("localhost")
        );
        // RFC 6066 forbids IP addresses in SNI; the certificate is checked against IP SANs.
        assert_eq!(sni_of_connection_to("127.0.0.1").await, None);
    }

    #[tokio::test]
    async fn a_pooled_endpoint_is_refused_before_connecting() {
        // An unresolvable name: the refusal must come before any DNS or TCP.
        let url: PgUrl = "postgresql://u:pw@ep-x-pooler.invalid/db?sslmode=require"
            .parse()
            .expect("test URL");
        let error = ReplicationConnection::connect(&url, "usersync-test")
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(error, ReplicationError::NotReplicable { .. }),
            "{error:?}"
        );
        assert!(!error.is_transient());
        assert!(crate::error::report(&error).contains("use the direct endpoint ep-x.invalid"));
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    /// A stream whose server side the test writes to.
    fn stream_with_server() -> (ReplicationStream, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        let conn = ReplicationConnection {
            io: Box::new(client),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            target: "test".into(),
            server_version_num: None,
            authenticated: true,
        };
        (ReplicationStream { conn }, server)
    }

    #[tokio::test]
    async fn command_complete_at_shutdown_ends_the_stream() {
        let (mut stream, mut server) = stream_with_server();
        // CommandComplete "COPY 0", as a walsender sends it when the server shuts down.
        let mut frame = vec![b'C'];
        frame.extend_from_slice(&(4 + 7_i32).to_be_bytes());
        frame.extend_from_slice(b"COPY 0\0");
        server.write_all(&frame).await.unwrap();
        assert!(stream.recv().await.unwrap().is_none());
    }
}

#[cfg(test)]
mod hostile_server_tests;

#[cfg(test)]
mod password_policy_tests {
    use super::auth::{AUTH_CLEARTEXT, AUTH_MD5, AUTH_OK};
    use super::*;
    use crate::conn::PasswordRequest;

    /// An authentication request as the server sends it, followed by AuthenticationOk for a
    /// client that answers.
    fn request_then_ok(code: i32, data: &[u8]) -> Vec<u8> {
        let message = |body: &[u8]| {
            let length = i32::try_from(body.len() + 4).expect("small message");
            [&[wire::AUTHENTICATION][..], &length.to_be_bytes(), body].concat()
        };
        [
            message(&[&code.to_be_bytes()[..], data].concat()),
            message(&AUTH_OK.to_be_bytes()),
        ]
        .concat()
    }

    /// Authenticates without TLS against a server that sends `from_server`; returns the outcome
    /// and every byte the client wrote.
    async fn authenticate_without_tls(
        url: &PgUrl,
        from_server: &[u8],
    ) -> (Result<(), ReplicationError>, Vec<u8>) {
        authenticate_over(url, None, from_server).await
    }

    /// As if over TLS when `tls_end_point` is given (the certificate's hash).
    async fn authenticate_over(
        url: &PgUrl,
        tls_end_point: Option<Vec<u8>>,
        from_server: &[u8],
    ) -> (Result<(), ReplicationError>, Vec<u8>) {
        let (client, mut server) = tokio::io::duplex(1024);
        server.write_all(from_server).await.expect("server writes");
        let mut conn = ReplicationConnection {
            io: Box::new(client),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            target: url.redacted(),
            server_version_num: None,
            authenticated: false,
        };
        let outcome = conn.authenticate(url, tls_end_point).await;
        drop(conn);
        let mut written = Vec::new();
        server
            .read_to_end(&mut written)
            .await
            .expect("server reads");
        (outcome, written)
    }

    fn url(host: &str) -> PgUrl {
        url_with(host, "sslmode=prefer")
    }

    fn url_with(host: &str, settings: &str) -> PgUrl {
        format!("postgresql://u:s3cret-pw@{host}/db?{settings}")
            .parse()
            .expect("test URL")
    }

    #[tokio::test]
    async fn cleartext_and_md5_inside_unverified_tls_to_another_machine_send_nothing() {
        for (code, data) in [(AUTH_CLEARTEXT, &b""[..]), (AUTH_MD5, &b"salt"[..])] {
            for settings in ["sslmode=prefer", "sslmode=require"] {
                let remote = url_with("db.example.com", settings);
                let (outcome, written) =
                    authenticate_over(&remote, Some(vec![7; 32]), &request_then_ok(code, data))
                        .await;
                assert_eq!(written, b"", "{settings}: nothing may reach the socket");
                let error = outcome.expect_err("refused");
                assert!(
                    matches!(
                        &error,
                        ReplicationError::Authentication {
                            reason: auth::AuthError::Plaintext(refused),
                            ..
                        } if refused.encrypted
                    ),
                    "{error:?}"
                );
            }
            // A verified certificate proves the server: it gets its answer.
            let verified = url_with("db.example.com", "sslmode=verify-full");
            let (outcome, written) =
                authenticate_over(&verified, Some(vec![7; 32]), &request_then_ok(code, data)).await;
            outcome.expect("answered");
            assert_eq!(written.first(), Some(&b'p'));
        }
    }

    #[tokio::test]
    async fn cleartext_and_md5_without_tls_to_another_machine_send_nothing() {
        for (code, data, asked) in [
            (AUTH_CLEARTEXT, &b""[..], PasswordRequest::Cleartext),
            (AUTH_MD5, &b"salt"[..], PasswordRequest::Md5),
        ] {
            let remote = url("db.example.com");
            let (outcome, written) =
                authenticate_without_tls(&remote, &request_then_ok(code, data)).await;
            assert_eq!(written, b"", "{asked:?}: nothing may reach the socket");
            let error = outcome.expect_err("refused");
            assert!(!error.is_transient());
            let ReplicationError::Authentication {
                reason: auth::AuthError::Plaintext(source),
                ..
            } = &error
            else {
                panic!("expected a plaintext-password refusal, got {error:?}");
            };
            assert_eq!(source.request, asked);
            assert!(
                crate::error::report(&error).contains("--allow-plaintext-password"),
                "{error}"
            );

            let mut allowed = url("db.example.com");
            allowed.allow_plaintext_password = true;
            for url in [allowed, url("127.0.0.1"), url("localhost")] {
                let (outcome, written) =
                    authenticate_without_tls(&url, &request_then_ok(code, data)).await;
                outcome.expect("answered");
                assert_eq!(written.first(), Some(&b'p'), "{url:?}");
            }
        }
    }
}
