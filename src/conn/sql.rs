//! Ordinary SQL connections (setup, snapshot, apply, status) with the URL's TLS settings.
//!
//! tokio-postgres only knows `sslmode` disable/prefer/require and verifies nothing itself; the
//! verification libpq's `verify-ca`/`verify-full` promise is done by our rustls configuration
//! from [`super::tls::client_config`], which tokio-postgres-rustls runs for the handshake.
//!
//! usersync opens the TCP connection itself and hands it to tokio-postgres
//! (`Config::connect_raw`) inside a [`PasswordGuard`], because tokio-postgres would answer a
//! cleartext or md5 password request on a connection without TLS, which
//! [`super::auth_policy`] refuses.

use std::error::Error as _;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_postgres::error::Severity;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::auth_policy::{PasswordPolicy, PlaintextPasswordRefused};
use super::password_guard::PasswordGuard;
use super::tls::{self, TlsError};
use super::url::{ChannelBinding, PgUrl, SslMode};

/// TCP keepalive probes start after this much silence on an idle connection...
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ...repeat this often...
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and this many unanswered ones close the connection (about a minute in all).
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Data left unacknowledged this long closes the connection (Linux `TCP_USER_TIMEOUT`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection attempt failed, decided once here so callers only ask
/// [`ConnectErrorKind::is_transient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// Wrong password, or no `pg_hba.conf` entry (definite).
    Authentication,
    /// `channel_binding=require`, but the server did not bind the channel (no TLS, or no
    /// SCRAM-SHA-256 password to authenticate with; definite).
    ChannelBinding,
    /// The database named in the URL does not exist (SQLSTATE 3D000, definite).
    DatabaseMissing,
    /// The role may not connect to the database (SQLSTATE 42501, definite).
    PermissionDenied,
    /// TLS settings or the server certificate are wrong (definite).
    Tls,
    /// The server asked for a cleartext or md5 password without TLS, which usersync refuses to
    /// send to another machine (definite).
    PlaintextPassword,
    /// Network trouble, timeout, or a server that is starting, shutting down, or full
    /// (57P0x, 53xxx, 08xxx, 58xxx). Retrying later may succeed.
    Unavailable,
    /// The server refused for another reason (definite).
    Rejected,
}

impl ConnectErrorKind {
    /// Whether reconnecting later may help, as opposed to stopping with advice.
    pub fn is_transient(self) -> bool {
        self == Self::Unavailable
    }

    fn advice(self) -> &'static str {
        match self {
            Self::Authentication => {
                "authentication failed; check the user name and password, and that pg_hba.conf \
                 admits this user from this host"
            }
            Self::ChannelBinding => {
                "channel_binding=require, but the server did not use channel binding; it needs \
                 TLS (sslmode=require or better) and a SCRAM-SHA-256 password for this user"
            }
            Self::DatabaseMissing => {
                "the database does not exist; check the database name in the URL"
            }
            Self::PermissionDenied => {
                "permission denied; the user needs LOGIN and CONNECT on the database"
            }
            Self::Tls => {
                "TLS could not be negotiated; a server without TLS needs sslmode=prefer or disable"
            }
            Self::PlaintextPassword => {
                "the server asked for the password in a form readable on the network"
            }
            Self::Unavailable => "the server is unreachable or not accepting connections now",
            Self::Rejected => "the server refused the connection",
        }
    }
}

/// A failed [`connect`]. The URL in it is always [`PgUrl::redacted`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {url}")]
    Tls {
        url: String,
        #[source]
        source: TlsError,
    },
    #[error("cannot connect to {url}: {}", kind.advice())]
    Postgres {
        url: String,
        kind: ConnectErrorKind,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "cannot connect to {url}: no connection within {}s (connect_timeout); check that the host \
         and port are right and reachable",
        timeout.as_secs()
    )]
    Timeout { url: String, timeout: Duration },
    #[error("cannot connect to {url}: {}", ConnectErrorKind::Unavailable.advice())]
    Network {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {url}")]
    PlaintextPassword {
        url: String,
        #[source]
        source: PlaintextPasswordRefused,
    },
}

impl ConnectError {
    /// The classification, for retry decisions and exit codes.
    pub fn kind(&self) -> ConnectErrorKind {
        match self {
            Self::Tls { .. } => ConnectErrorKind::Tls,
            Self::Postgres { kind, .. } => *kind,
            Self::Timeout { .. } | Self::Network { .. } => ConnectErrorKind::Unavailable,
            Self::PlaintextPassword { .. } => ConnectErrorKind::PlaintextPassword,
        }
    }

    /// Whether reconnecting later may help.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

/// Opens a connection and spawns the task that drives it; the task ends when the returned client
/// is dropped. `application_name` is used unless the URL sets its own. An unencrypted
/// connection to another machine logs a warning ([`tls::warn_if_plaintext`]).
pub async fn connect(url: &PgUrl, application_name: &str) -> Result<Client, ConnectError> {
    Ok(connect_counting_warnings(url, application_name).await?.0)
}

/// [`connect`], with a count of the WARNING notices the server sends on the connection: the
/// only sign that a commit returned without the wait it was asked for (a cancelled wait for
/// synchronous replication commits locally, warns, and reports success).
pub async fn connect_counting_warnings(
    url: &PgUrl,
    application_name: &str,
) -> Result<(Client, Warnings), ConnectError> {
    let warnings = Warnings::default();
    let (client, encrypted) = open(url, application_name, warnings.clone()).await?;
    tls::warn_if_plaintext(url, encrypted);
    Ok((client, warnings))
}

/// How many WARNING notices a connection's server has sent. Counted by the task that drives
/// the connection, which reads them in order with the replies: a warning sent before a
/// command's completion is counted before the command's caller is answered.
#[derive(Debug, Clone, Default)]
pub struct Warnings(Arc<AtomicU64>);

impl Warnings {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// [`connect`], and whether the connection is encrypted.
async fn open(
    url: &PgUrl,
    application_name: &str,
    warnings: Warnings,
) -> Result<(Client, bool), ConnectError> {
    // tokio-postgres applies connect_timeout to each TCP connect only; libpq's covers the whole
    // attempt, so a server that accepts but never answers the handshake is bounded too.
    // Settings that cannot work fail before anything connects.
    let tls_config = tls::client_config(url).map_err(|source| ConnectError::Tls {
        url: url.redacted(),
        source,
    })?;
    let connecting = async {
        let tcp = connect_tcp(url).await?;
        open_on(tcp, url, tls_config, application_name, warnings).await
    };
    match url.connect_timeout {
        Some(timeout) => tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ConnectError::Timeout {
                url: url.redacted(),
                timeout,
            })?,
        None => connecting.await,
    }
}

/// The session on an open `stream` to the server `url` names: TLS with `tls_config` (`None`
/// for `sslmode=disable`), startup, and authentication through a [`PasswordGuard`]. Separate
/// from [`open`] so that tests can connect a URL naming another machine to a fake server here.
async fn open_on<S>(
    stream: S,
    url: &PgUrl,
    tls_config: Option<Arc<rustls::ClientConfig>>,
    application_name: &str,
    warnings: Warnings,
) -> Result<(Client, bool), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = postgres_config(url, application_name);
    let stream = PasswordGuard::new(stream, PasswordPolicy::of(url));
    let encrypted = Arc::new(AtomicBool::new(false));
    let result = match tls_config {
        Some(tls_config) => {
            let mut connector = RecordTls {
                inner: MakeRustlsConnect::new((*tls_config).clone()),
                encrypted: Arc::clone(&encrypted),
                policy: PasswordPolicy::of(url),
            };
            let made =
                MakeTlsConnect::<PasswordGuard<S>>::make_tls_connect(&mut connector, &url.host);
            let connector = match made {
                Ok(connector) => connector,
                Err(never) => match never {},
            };
            config
                .connect_raw(stream, connector)
                .await
                .map(|(client, connection)| {
                    spawn_connection(connection, url.redacted(), warnings);
                    client
                })
        }
        None => config
            .connect_raw(stream, NoTls)
            .await
            .map(|(client, connection)| {
                spawn_connection(connection, url.redacted(), warnings);
                client
            }),
    };
    let client = result.map_err(|error| classify(url, error))?;
    Ok((client, encrypted.load(Ordering::Relaxed)))
}

/// A TCP connection to the URL's host, trying each address it resolves to in turn (as libpq
/// and tokio-postgres do), with the socket options tokio-postgres would set.
async fn connect_tcp(url: &PgUrl) -> Result<TcpStream, ConnectError> {
    let network = |source| ConnectError::Network {
        url: url.redacted(),
        source,
    };
    let addresses = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(network)?;
    let mut last_error = None;
    for address in addresses {
        let attempt = TcpStream::connect(address);
        let connected = match url.connect_timeout {
            Some(timeout) => tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::TimedOut))),
            None => attempt.await,
        };
        match connected {
            Ok(tcp) => {
                configure_socket(&tcp).map_err(network)?;
                return Ok(tcp);
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(network(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} resolves to no address", url.host),
        )
    })))
}

/// A peer that vanished without closing (a stalled network, a half-open connection) is noticed
/// by the kernel: keepalives while idle, a bound on unacknowledged data otherwise. No Nagle
/// delay: queries are small and latency matters.
fn configure_socket(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = SockRef::from(tcp);
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_RETRIES),
    )?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    Ok(())
}

/// A TLS connector that records whether it was used, and guards what comes through the TLS
/// stream. tokio-postgres calls [`TlsConnect::connect`] only after the server accepted
/// SSLRequest; under `sslmode=prefer` it continues in plaintext after a refusal without
/// telling its caller, and whether that happened decides the plaintext warning. Inside TLS
/// that verifies nobody, a cleartext or md5 request is refused as without TLS: the
/// [`PasswordGuard`] under TLS cannot read it, the one over it can.
struct RecordTls<M> {
    inner: M,
    encrypted: Arc<AtomicBool>,
    policy: PasswordPolicy,
}

impl<S, M> MakeTlsConnect<S> for RecordTls<M>
where
    M: MakeTlsConnect<S>,
    M::Stream: Unpin,
    <M::TlsConnect as TlsConnect<S>>::Future: Send + 'static,
{
    type Stream = PasswordGuard<M::Stream>;
    type TlsConnect = RecordTlsConnect<M::TlsConnect>;
    type Error = M::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(RecordTlsConnect {
            inner: self.inner.make_tls_connect(domain)?,
            encrypted: Arc::clone(&self.encrypted),
            policy: self.policy.clone(),
        })
    }
}

/// The per-connection half of [`RecordTls`].
struct RecordTlsConnect<T> {
    inner: T,
    encrypted: Arc<AtomicBool>,
    policy: PasswordPolicy,
}

impl<S, T> TlsConnect<S> for RecordTlsConnect<T>
where
    T: TlsConnect<S>,
    T::Stream: Unpin,
    T::Future: Send + 'static,
{
    type Stream = PasswordGuard<T::Stream>;
    type Error = T::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Stream, Self::Error>> + Send>,
    >;

    fn connect(self, stream: S) -> Self::Future {
        // A failed handshake fails the whole connection, so setting this early is exact.
        self.encrypted.store(true, Ordering::Relaxed);
        let policy = self.policy;
        let handshake = self.inner.connect(stream);
        Box::pin(async move {
            let tls = handshake.await?;
            Ok(PasswordGuard::inside_tls(tls, policy))
        })
    }
}

/// The tokio-postgres settings for `url`, field by field (there is deliberately no round trip
/// through a connection string, which would need the password in it). Host, port, timeouts and
/// socket options are not among them: usersync opens the socket ([`connect_tcp`]).
fn postgres_config(url: &PgUrl, application_name: &str) -> Config {
    let mut config = Config::new();
    config
        .user(&url.user)
        .dbname(&url.dbname)
        .application_name(url.application_name.as_deref().unwrap_or(application_name))
        .channel_binding(match url.channel_binding {
            ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        })
        // Whether to ask for TLS only; what to verify is in our rustls configuration.
        .ssl_mode(match url.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
    if let Some(password) = url.password() {
        config.password(password.expose());
    }
    if let Some(options) = &url.options {
        config.options(options);
    }
    config
}

/// Drives the connection until the client is dropped or the connection fails. Failures are
/// logged at debug level only: the next query on the client reports them as an error anyway.
fn spawn_connection<S, T>(
    mut connection: Connection<S, T>,
    redacted_url: String,
    warnings: Warnings,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    if notice.parsed_severity() == Some(Severity::Warning) {
                        warnings.0.fetch_add(1, Ordering::SeqCst);
                    }
                    tracing::debug!(url = %redacted_url, notice = %notice.message(), "postgres notice");
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(url = %redacted_url, %error, "postgres connection ended with an error");
                    break;
                }
                None => break,
            }
        }
    });
}

/// Decides, once, what a failed connection attempt means. tokio-postgres errors carry no
/// password (its `Config` is never part of them), and we add only the redacted URL.
fn classify(url: &PgUrl, error: tokio_postgres::Error) -> ConnectError {
    let refusal = io_error(&error)
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<PlaintextPasswordRefused>());
    if let Some(refusal) = refusal {
        return ConnectError::PlaintextPassword {
            url: url.redacted(),
            source: refusal.clone(),
        };
    }
    if let Some(tls_error) = io_error(&error).and_then(|io| tls::handshake_error(url, io)) {
        return ConnectError::Tls {
            url: url.redacted(),
            source: tls_error,
        };
    }
    let kind = match kind_of(&error) {
        // tokio-postgres says only "authentication error" with the reason in its source.
        ConnectErrorKind::Authentication
            if url.channel_binding == ChannelBinding::Require
                && error
                    .source()
                    .is_some_and(|reason| reason.to_string().contains("channel binding")) =>
        {
            ConnectErrorKind::ChannelBinding
        }
        kind => kind,
    };
    ConnectError::Postgres {
        url: url.redacted(),
        kind,
        source: error,
    }
}

fn io_error(error: &tokio_postgres::Error) -> Option<&io::Error> {
    error.source()?.downcast_ref::<io::Error>()
}

fn kind_of(error: &tokio_postgres::Error) -> ConnectErrorKind {
    if let Some(code) = error.code() {
        return kind_of_sqlstate(code.code());
    }
    if io_error(error).is_some() || error.is_closed() {
        return ConnectErrorKind::Unavailable;
    }
    // tokio-postgres keeps its error kinds private; their Display texts are what we can see.
    // These are the failures that come without an I/O error or a server message: the server
    // refused SSLRequest under sslmode=require, or the client could not authenticate (channel
    // binding required but not offered, password needed but not given).
    match error.to_string().as_str() {
        "error performing TLS handshake" => ConnectErrorKind::Tls,
        "authentication error" | "invalid configuration" => ConnectErrorKind::Authentication,
        _ => ConnectErrorKind::Rejected,
    }
}

/// SQLSTATE classes from PostgreSQL's Appendix A.
fn kind_of_sqlstate(code: &str) -> ConnectErrorKind {
    match code {
        // invalid_password, invalid_authorization_specification (includes no pg_hba.conf entry)
        "28P01" | "28000" => ConnectErrorKind::Authentication,
        // invalid_catalog_name
        "3D000" => ConnectErrorKind::DatabaseMissing,
        // insufficient_privilege (no CONNECT on the database)
        "42501" => ConnectErrorKind::PermissionDenied,
        // connection_exception, insufficient_resources (too_many_connections), operator
        // intervention (admin_shutdown, crash_shutdown, cannot_connect_now), system_error
        _ if code.starts_with("08")
            || code.starts_with("53")
            || code.starts_with("57P")
            || code.starts_with("58") =>
        {
            ConnectErrorKind::Unavailable
        }
        _ => ConnectErrorKind::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::sync::Arc;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::conn::test_pki::{self, TestPki};

    /// The SSLRequest code from the frontend/backend protocol.
    const SSL_REQUEST_CODE: i32 = 80_877_103;
    const PASSWORD: &str = "s3cret-pw";

    /// What a fake server saw of the client.
    #[derive(Debug, Default)]
    struct Seen {
        sni: Option<String>,
        startup: Vec<(String, String)>,
    }

    /// A fake PostgreSQL server for one connection: answers SSLRequest with `S` (when it has a
    /// certificate) or `N`, reads the startup packet, sends `reply`, and waits for the client to
    /// hang up.
    async fn fake_server(
        tls: Option<Arc<rustls::ServerConfig>>,
        reply: Vec<u8>,
    ) -> (u16, JoinHandle<io::Result<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let mut first = read_message(&mut tcp).await?;
            if first.get(..4) != Some(&SSL_REQUEST_CODE.to_be_bytes()[..]) {
                return respond(&mut tcp, &first, &reply, None).await;
            }
            let Some(tls) = tls else {
                tcp.write_all(b"N").await?;
                first = read_message(&mut tcp).await?;
                return respond(&mut tcp, &first, &reply, None).await;
            };
            tcp.write_all(b"S").await?;
            let mut stream = TlsAcceptor::from(tls).accept(tcp).await?;
            let sni = stream.get_ref().1.server_name().map(str::to_owned);
            let startup = read_message(&mut stream).await?;
            respond(&mut stream, &startup, &reply, sni).await
        });
        (port, server)
    }

    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        startup: &[u8],
        reply: &[u8],
        sni: Option<String>,
    ) -> io::Result<Seen> {
        stream.write_all(reply).await?;
        stream.flush().await?;
        let mut rest = Vec::new();
        // The client hangs up after an error, or when the test drops it after success.
        let _ = stream.read_to_end(&mut rest).await;
        Ok(Seen {
            sni,
            startup: startup_parameters(startup),
        })
    }

    /// A length-prefixed message without a type byte (SSLRequest, StartupMessage).
    async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
        let length = stream.read_i32().await?;
        let mut body = vec![0; usize::try_from(length - 4).expect("positive length")];
        stream.read_exact(&mut body).await?;
        Ok(body)
    }

    /// The name/value pairs after the protocol version of a StartupMessage.
    fn startup_parameters(body: &[u8]) -> Vec<(String, String)> {
        let strings: Vec<String> = body[4..]
            .split(|&byte| byte == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        strings
            .chunks(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect()
    }

    fn backend_message(tag: u8, body: &[u8]) -> Vec<u8> {
        let length = i32::try_from(body.len() + 4).expect("small message");
        [&[tag][..], &length.to_be_bytes(), body].concat()
    }

    fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', sqlstate),
            (b'M', message),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        backend_message(b'E', &body)
    }

    /// AuthenticationOk then ReadyForQuery: a successful startup without a password.
    fn startup_ok() -> Vec<u8> {
        [
            backend_message(b'R', &0_i32.to_be_bytes()),
            backend_message(b'Z', b"I"),
        ]
        .concat()
    }

    fn url(port: u16, query: &str) -> PgUrl {
        format!("postgresql://app:{PASSWORD}@127.0.0.1:{port}/appdb?{query}")
            .parse()
            .expect("test URL")
    }

    /// Every way the error can be shown, none of which may contain the password.
    fn assert_no_password(error: &ConnectError) {
        let mut shown = vec![format!("{error:?}")];
        let mut next: Option<&dyn Error> = Some(error);
        while let Some(current) = next {
            shown.push(current.to_string());
            next = current.source();
        }
        for text in shown {
            assert!(!text.contains(PASSWORD), "{text}");
        }
    }

    async fn failed_connect(url: &PgUrl) -> ConnectError {
        let error = connect(url, "usersync-test")
            .await
            .expect_err("connect should fail");
        assert_no_password(&error);
        assert!(error.to_string().contains(&url.redacted()), "{error}");
        error
    }

    #[tokio::test]
    async fn verify_full_connects_with_sni_and_application_name() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let (port, server) = fake_server(Some(test_pki::server_config(&cert)), startup_ok()).await;
        let url: PgUrl = format!(
            "postgresql://app@localhost:{port}/appdb?sslmode=verify-full&sslrootcert={}",
            pki.ca_cert.display()
        )
        .parse()
        .expect("test URL");
        let (client, encrypted) = open(&url, "usersync-test", Warnings::default())
            .await
            .expect("connect");
        assert!(encrypted);
        drop(client);
        let seen = server.await.expect("server task").expect("server I/O");
        assert_eq!(seen.sni.as_deref(), Some("localhost"));
        let parameter = |name: &str| {
            seen.startup
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(parameter("user"), Some("app"));
        assert_eq!(parameter("database"), Some("appdb"));
        assert_eq!(parameter("application_name"), Some("usersync-test"));
    }

    #[tokio::test]
    async fn certificate_for_another_host_is_a_definite_tls_error() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:db.example.com");
        let (port, _server) = fake_server(Some(test_pki::server_config(&cert)), startup_ok()).await;
        let url = url(
            port,
            &format!("sslmode=verify-full&sslrootcert={}", pki.ca_cert.display()),
        );
        let error = failed_connect(&url).await;
        assert_eq!(error.kind(), ConnectErrorKind::Tls);
        assert!(!error.is_transient());
        let ConnectError::Tls {
            source: TlsError::NotValidForHost { host, .. },
            ..
        } = &error
        else {
            panic!("expected a host name mismatch, got {error:?}");
        };
        assert_eq!(host, "127.0.0.1");
    }

    #[tokio::test]
    async fn wrong_password_is_a_definite_authentication_error() {
        let pki = TestPki::new();
        let cert = pki.self_signed("server", "DNS:localhost");
        let reply = error_response("28P01", "password authentication failed for user \"app\"");
        let (port, _server) = fake_server(Some(test_pki::server_config(&cert)), reply).await;
        let error = failed_connect(&url(port, "sslmode=require")).await;
        assert_eq!(error.kind(), ConnectErrorKind::Authentication);
        assert!(!error.is_transient());
        assert_eq!(
            error.to_string(),
            format!(
                "cannot connect to postgresql://app:***@127.0.0.1:{port}/appdb?sslmode=require: \
                 authentication failed; check the user name and password, and that pg_hba.conf \
                 admits this user from this host"
            )
        );
    }

    #[tokio::test]
    async fn server_errors_are_classified_by_sqlstate() {
        let cases = [
            ("3D000", ConnectErrorKind::DatabaseMissing, false),
            ("42501", ConnectErrorKind::PermissionDenied, false),
            ("28000", ConnectErrorKind::Authentication, false),
            ("57P03", ConnectErrorKind::Unavailable, true),
            ("53300", ConnectErrorKind::Unavailable, true),
            ("XX000", ConnectErrorKind::Rejected, false),
        ];
        for (sqlstate, kind, transient) in cases {
            let (port, _server) = fake_server(None, error_response(sqlstate, "no")).await;
            let error = failed_connect(&url(port, "sslmode=disable")).await;
            assert_eq!(error.kind(), kind, "{sqlstate}");
            assert_eq!(error.is_transient(), transient, "{sqlstate}");
        }
    }

    #[tokio::test]
    async fn prefer_continues_in_plaintext_when_the_server_refuses_tls() {
        let (port, server) = fake_server(None, startup_ok()).await;
        let (client, encrypted) = open(
            &url(port, "sslmode=prefer"),
            "usersync-test",
            Warnings::default(),
        )
        .await
        .expect("connect");
        assert!(!encrypted, "plaintext after the refusal, and known to be");
        drop(client);
        let seen = server.await.expect("server task").expect("server I/O");
        assert_eq!(seen.sni, None);
    }

    #[tokio::test]
    async fn channel_binding_required_but_not_used_is_explained() {
        // The server refuses TLS (prefer continues) and lets the client in without SCRAM.
        let (port, _server) = fake_server(None, startup_ok()).await;
        let error = failed_connect(&url(port, "sslmode=prefer&channel_binding=require")).await;
        assert_eq!(error.kind(), ConnectErrorKind::ChannelBinding);
        assert!(!error.is_transient());
        assert!(
            error.to_string().ends_with(
                "channel_binding=require, but the server did not use channel binding; it needs \
                 TLS (sslmode=require or better) and a SCRAM-SHA-256 password for this user"
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn require_fails_when_the_server_refuses_tls() {
        let (port, _server) = fake_server(None, startup_ok()).await;
        let error = failed_connect(&url(port, "sslmode=require")).await;
        assert_eq!(error.kind(), ConnectErrorKind::Tls);
        assert!(!error.is_transient());
    }

    #[tokio::test]
    async fn missing_password_is_an_authentication_error() {
        // AuthenticationCleartextPassword, to a URL without a password.
        let (port, _server) = fake_server(None, backend_message(b'R', &3_i32.to_be_bytes())).await;
        let url: PgUrl = format!("postgresql://app@127.0.0.1:{port}/appdb?sslmode=disable")
            .parse()
            .expect("test URL");
        let error = failed_connect(&url).await;
        assert_eq!(error.kind(), ConnectErrorKind::Authentication);
    }

    #[tokio::test]
    async fn refused_connection_is_transient() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        drop(listener);
        let error = failed_connect(&url(port, "sslmode=disable")).await;
        assert_eq!(error.kind(), ConnectErrorKind::Unavailable);
        assert!(error.is_transient());
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        // Accepts (the kernel does, via the backlog) but never answers SSLRequest.
        let error = failed_connect(&url(port, "sslmode=require&connect_timeout=2")).await;
        assert!(matches!(error, ConnectError::Timeout { .. }), "{error:?}");
        assert!(error.is_transient());
        drop(listener);
    }

    /// A hostile server for one connection: declines TLS, asks for the password with `request`,
    /// and answers a PasswordMessage with success. Returns every message the client sent after
    /// its startup message, as (tag, body).
    async fn password_phisher(
        request: Vec<u8>,
    ) -> (u16, JoinHandle<io::Result<Vec<(u8, Vec<u8>)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let first = read_message(&mut tcp).await?;
            if first.get(..4) == Some(&SSL_REQUEST_CODE.to_be_bytes()[..]) {
                tcp.write_all(b"N").await?;
                read_message(&mut tcp).await?;
            }
            tcp.write_all(&request).await?;
            let mut sent = Vec::new();
            loop {
                let tag = match tcp.read_u8().await {
                    Ok(tag) => tag,
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(sent),
                    Err(error) => return Err(error),
                };
                let body = read_message(&mut tcp).await?;
                if tag == b'p' {
                    tcp.write_all(&startup_ok()).await?;
                }
                sent.push((tag, body));
            }
        });
        (port, server)
    }

    /// A URL naming another machine (never resolved: the tests connect the socket themselves).
    fn remote_url(port: u16, query: &str) -> PgUrl {
        format!("postgresql://app:{PASSWORD}@db.example.com:{port}/appdb?{query}")
            .parse()
            .expect("test URL")
    }

    /// [`open_on`] a connection to the fake server on `port`, as if it were `url`'s host.
    async fn open_as(url: &PgUrl, port: u16) -> Result<(Client, bool), ConnectError> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the fake server");
        let tls_config = tls::client_config(url).expect("TLS settings");
        open_on(tcp, url, tls_config, "usersync-test", Warnings::default()).await
    }

    fn cleartext_request() -> Vec<u8> {
        backend_message(b'R', &3_i32.to_be_bytes())
    }

    fn md5_request() -> Vec<u8> {
        backend_message(b'R', &[&5_i32.to_be_bytes()[..], b"salt"].concat())
    }

    #[tokio::test]
    async fn a_remote_server_without_tls_asking_for_a_cleartext_or_md5_password_gets_nothing() {
        for (request, asked) in [
            (cleartext_request(), "in cleartext"),
            (md5_request(), "as an md5 hash"),
        ] {
            // prefer is libpq's default: whoever answers "no TLS" gets to ask.
            for sslmode in ["disable", "allow", "prefer"] {
                let (port, server) = password_phisher(request.clone()).await;
                let url = remote_url(port, &format!("sslmode={sslmode}"));
                let error = open_as(&url, port).await.expect_err("refused");
                assert_no_password(&error);
                assert_eq!(
                    error.kind(),
                    ConnectErrorKind::PlaintextPassword,
                    "{error:?}"
                );
                assert!(!error.is_transient());
                let said = crate::error::report(&error);
                for expected in [
                    format!("db.example.com asks for the password {asked}"),
                    "on a connection without TLS".to_owned(),
                ] {
                    assert!(said.contains(&expected), "{said}");
                }
                assert!(said.contains("--allow-plaintext-password"), "{said}");
                let sent = server.await.expect("server task").expect("server I/O");
                assert_eq!(sent, [], "{sslmode}: the client sent {sent:?}");
            }
        }
    }

    /// A hostile server for one connection that answers SSLRequest with `answer` (a byte that
    /// is neither `S` nor `N`), then asks for the password in cleartext. Returns every byte
    /// the client sent after its startup message.
    async fn odd_ssl_answer_phisher(answer: u8) -> (u16, JoinHandle<io::Result<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            read_message(&mut tcp).await?;
            tcp.write_all(&[answer]).await?;
            read_message(&mut tcp).await?;
            tcp.write_all(&cleartext_request()).await?;
            let mut sent = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sent)).await;
            Ok(sent)
        });
        (port, server)
    }

    #[tokio::test]
    async fn an_answer_to_ssl_request_other_than_s_or_n_gets_nothing() {
        // tokio-postgres takes any byte but `S` for "no TLS" and drops it; a guard that took
        // the byte for the start of a message would lose track of the stream.
        for answer in [b'X', b'E', b'R'] {
            let (port, server) = odd_ssl_answer_phisher(answer).await;
            let url = remote_url(port, "sslmode=prefer");
            let error = open_as(&url, port).await.expect_err("refused");
            assert_no_password(&error);
            let sent = server.await.expect("server task").expect("server I/O");
            assert!(
                !sent
                    .windows(PASSWORD.len())
                    .any(|w| w == PASSWORD.as_bytes()),
                "answer {:?}: the client sent the password",
                answer as char
            );
            assert_eq!(
                sent, b"",
                "answer {:?}: the client sent {sent:?}",
                answer as char
            );
        }
    }

    /// A hostile server that accepts TLS with `tls` (a certificate nobody trusts, say), then
    /// asks for the password with `request`. Returns every byte the client sent after its
    /// startup message, decrypted.
    async fn tls_phisher(
        tls: Arc<rustls::ServerConfig>,
        request: Vec<u8>,
    ) -> (u16, JoinHandle<io::Result<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            read_message(&mut tcp).await?;
            tcp.write_all(b"S").await?;
            let mut tls = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await?;
            read_message(&mut tls).await?;
            tls.write_all(&request).await?;
            tls.flush().await?;
            let mut sent = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), tls.read_to_end(&mut sent)).await;
            Ok(sent)
        });
        (port, server)
    }

    #[tokio::test]
    async fn unverified_tls_does_not_earn_a_cleartext_or_md5_password() {
        // A man in the middle answers `S` as easily as `N`: under prefer or require any
        // certificate passes, so TLS alone proves nothing about who asks.
        let pki = TestPki::new();
        let mitm = test_pki::server_config(&pki.self_signed("mitm", "DNS:db.example.com"));
        for request in [cleartext_request(), md5_request()] {
            for sslmode in ["prefer", "require"] {
                let (port, server) = tls_phisher(Arc::clone(&mitm), request.clone()).await;
                let url = remote_url(port, &format!("sslmode={sslmode}"));
                let error = open_as(&url, port).await.expect_err("refused");
                assert_no_password(&error);
                assert_eq!(
                    error.kind(),
                    ConnectErrorKind::PlaintextPassword,
                    "{sslmode}: {error:?}"
                );
                let sent = server.await.expect("server task").expect("server I/O");
                assert_eq!(sent, b"", "{sslmode}: the client sent {sent:?}");
            }
        }
        // A verified server gets its answer.
        let real = test_pki::server_config(&pki.issue("real", "DNS:db.example.com"));
        let (port, server) = tls_phisher(real, cleartext_request()).await;
        let url = remote_url(
            port,
            &format!("sslmode=verify-full&sslrootcert={}", pki.ca_cert.display()),
        );
        let _ = open_as(&url, port).await;
        let sent = server.await.expect("server task").expect("server I/O");
        assert_eq!(sent.first(), Some(&b'p'), "verified TLS: {sent:?}");
    }

    #[tokio::test]
    async fn with_the_opt_in_the_password_is_sent() {
        for request in [cleartext_request(), md5_request()] {
            let (port, server) = password_phisher(request.clone()).await;
            let mut url = remote_url(port, "sslmode=prefer");
            url.allow_plaintext_password = true;
            let (client, encrypted) = open_as(&url, port).await.expect("connect");
            assert!(!encrypted);
            drop(client);
            let sent = server.await.expect("server task").expect("server I/O");
            let (tag, body) = sent.first().expect("a password message");
            assert_eq!(*tag, b'p');
            let shows_password = body
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes());
            assert_eq!(shows_password, request == cleartext_request());
        }
    }

    #[tokio::test]
    async fn to_this_machine_the_password_is_sent_without_tls() {
        for request in [cleartext_request(), md5_request()] {
            let (port, server) = password_phisher(request).await;
            let client = connect(&url(port, "sslmode=prefer"), "usersync-test")
                .await
                .expect("loopback is exempt");
            drop(client);
            let sent = server.await.expect("server task").expect("server I/O");
            assert_eq!(sent.first().map(|(tag, _)| *tag), Some(b'p'));
        }
    }

    #[test]
    fn unreadable_root_file_is_reported_before_connecting() {
        let url = url(1, "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let error = runtime
            .block_on(connect(&url, "x"))
            .expect_err("no root file");
        assert!(matches!(
            error,
            ConnectError::Tls {
                source: TlsError::RootCertUnreadable { .. },
                ..
            }
        ));
        assert!(!error.is_transient());
    }

    #[test]
    fn config_is_built_field_by_field() {
        use tokio_postgres::config::{ChannelBinding as PgChannelBinding, SslMode as PgSslMode};
        let url: PgUrl = "postgresql://u:pw@db.example.com:6000/d?sslmode=verify-ca\
                          &sslrootcert=/ca.pem&channel_binding=require&application_name=mine\
                          &connect_timeout=5&options=-c%20x%3Dy"
            .parse()
            .expect("test URL");
        let config = postgres_config(&url, "usersync");
        // The socket is ours: tokio-postgres never resolves or connects (connect_raw).
        assert_eq!(config.get_hosts(), &[]);
        assert_eq!(config.get_connect_timeout(), None);
        assert_eq!(config.get_user(), Some("u"));
        assert_eq!(config.get_password(), Some(&b"pw"[..]));
        assert_eq!(config.get_dbname(), Some("d"));
        assert_eq!(
            config.get_application_name(),
            Some("mine"),
            "the URL's name wins"
        );
        assert_eq!(config.get_options(), Some("-c x=y"));
        assert_eq!(config.get_channel_binding(), PgChannelBinding::Require);
        assert_eq!(config.get_ssl_mode(), PgSslMode::Require);

        let modes = [
            ("disable", PgSslMode::Disable),
            ("allow", PgSslMode::Prefer),
            ("prefer", PgSslMode::Prefer),
            ("require", PgSslMode::Require),
            ("verify-full", PgSslMode::Require),
        ];
        for (mode, expected) in modes {
            let url: PgUrl = format!("host=h user=u sslmode={mode}")
                .parse()
                .expect("test URL");
            let config = postgres_config(&url, "usersync");
            assert_eq!(config.get_ssl_mode(), expected, "{mode}");
            assert_eq!(config.get_application_name(), Some("usersync"));
            assert_eq!(config.get_password(), None);
        }
    }
}
