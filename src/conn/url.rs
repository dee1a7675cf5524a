//! libpq connection strings: `postgresql://` URLs and `key=value` pairs.
//!
//! The grammar follows libpq's "Connection Strings" chapter, restricted to what usersync can
//! honour: one TCP host, password authentication, and the TLS settings implemented in
//! [`super::tls`]. Every other parameter is refused by name, so that a typo (`sslmod=require`)
//! or a setting we would silently ignore (`sslcert=…`) fails before any connection is made.
//!
//! No error quotes text that could hold a password. URLs pasted from elsewhere (in quotes, with
//! an uppercase scheme, SQLAlchemy's `postgresql+driver://`, JDBC's) are recognised and named,
//! rather than read as `key=value` pairs whose unknown first "key" would be the URL itself.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rustls::pki_types::ServerName;

/// PostgreSQL's registered port, libpq's default.
const DEFAULT_PORT: u16 = 5432;

/// libpq rounds a `connect_timeout` of 1 s up to this, because a timeout shorter than the
/// clock's granularity could fire before the connection had any chance.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Parameters with a meaning here, for "did you mean" suggestions.
const SUPPORTED_PARAMETERS: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "channel_binding",
    "application_name",
    "connect_timeout",
    "options",
];

/// A parsed connection string: where to connect, as whom, and how to secure it.
///
/// `Debug` and [`fmt::Display`] never show the password; `Display` is [`PgUrl::redacted`].
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: Option<Password>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<SslRootCert>,
    pub channel_binding: ChannelBinding,
    pub application_name: Option<String>,
    /// `None` waits indefinitely (libpq: absent, zero or negative).
    pub connect_timeout: Option<Duration>,
    /// Backend command-line options (libpq `options`, e.g. `-c search_path=x`). Neon also reads
    /// `endpoint=<id>` from it for clients that cannot send SNI; it must reach the server in the
    /// startup packet of both the SQL and the replication connection.
    pub options: Option<String>,
    /// Whether a cleartext or md5 password may be sent without TLS to another machine
    /// ([`super::auth_policy`]). Not a libpq parameter, so never read from or written into the
    /// connection string: `--allow-plaintext-password` sets it.
    pub allow_plaintext_password: bool,
}

/// A password that does not print itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// The password itself, for the authentication exchange and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// libpq's `sslmode`, with its default [`SslMode::Prefer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// libpq tries plaintext first and TLS only if the server insists. We treat it exactly as
    /// [`SslMode::Prefer`]: asking for TLS first never sends the startup packet in the clear to
    /// a server that could have encrypted it, and costs one round trip with one that cannot.
    Allow,
    /// TLS if the server offers it, without authenticating the server.
    #[default]
    Prefer,
    /// TLS or nothing, without authenticating the server (unless `sslrootcert` names a file, in
    /// which case the chain is verified as libpq does).
    Require,
    /// TLS, and the certificate chain must lead to a trusted root; the host name is not checked.
    VerifyCa,
    /// TLS, a trusted chain, and a certificate issued for the host name.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Self, UrlError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(invalid_value(
                    "sslmode",
                    value,
                    "disable, allow, prefer, require, verify-ca or verify-full",
                ))
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SslRootCert {
    /// `sslrootcert=system` (libpq 16): the platform's roots. We use the Mozilla roots compiled
    /// in from `webpki-roots`, which is also the default when `sslrootcert` is absent.
    System,
    /// A PEM file with one or more CA certificates.
    File(PathBuf),
}

/// libpq's `channel_binding` for SCRAM-SHA-256-PLUS, default [`ChannelBinding::Prefer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    Disable,
    #[default]
    Prefer,
    Require,
}

impl ChannelBinding {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
        }
    }

    fn parse(value: &str) -> Result<Self, UrlError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            _ => {
                return Err(invalid_value(
                    "channel_binding",
                    value,
                    "disable, prefer or require",
                ))
            }
        })
    }
}

impl PgUrl {
    /// The password, if the connection string has one.
    pub fn password(&self) -> Option<&Password> {
        self.password.as_ref()
    }

    /// The connection string as a URL with the password replaced by `***`, for every log line
    /// and error message. It parses back to the same settings (with password `***`).
    pub fn redacted(&self) -> String {
        let mut url = String::from("postgresql://");
        url.push_str(&percent_encode(&self.user, false));
        if self.password.is_some() {
            url.push_str(":***");
        }
        url.push('@');
        if self.host.parse::<Ipv6Addr>().is_ok() {
            url.push_str(&format!("[{}]", self.host));
        } else {
            url.push_str(&percent_encode(&self.host, false));
        }
        url.push_str(&format!(":{}/", self.port));
        url.push_str(&percent_encode(&self.dbname, false));
        url.push_str(&format!("?sslmode={}", self.sslmode));
        match &self.sslrootcert {
            Some(SslRootCert::System) => url.push_str("&sslrootcert=system"),
            Some(SslRootCert::File(path)) => {
                let path = path.to_string_lossy();
                url.push_str(&format!("&sslrootcert={}", percent_encode(&path, true)));
            }
            None => {}
        }
        if self.channel_binding != ChannelBinding::default() {
            url.push_str(&format!(
                "&channel_binding={}",
                self.channel_binding.as_str()
            ));
        }
        if let Some(name) = &self.application_name {
            url.push_str(&format!("&application_name={}", percent_encode(name, true)));
        }
        if let Some(timeout) = self.connect_timeout {
            url.push_str(&format!("&connect_timeout={}", timeout.as_secs()));
        }
        if let Some(options) = &self.options {
            url.push_str(&format!("&options={}", percent_encode(options, true)));
        }
        url
    }

    /// Refuses a host that cannot carry a replication connection: a pooled endpoint, whose
    /// first label ends with `-pooler` (Neon's naming: `ep-cool-123-pooler.us-east-2.aws.neon.tech`
    /// is PgBouncer in transaction mode in front of `ep-cool-123.us-east-2.aws.neon.tech`).
    /// PgBouncer refuses the `replication` startup parameter, so without this check the
    /// operator would see a confusing server error after connecting, or a retry loop.
    /// Refuses a pooled host (as [`PgUrl::check_replication_endpoint`] tells them) for the
    /// target of a replicator, which needs a session of its own.
    pub fn check_session_endpoint(&self) -> Result<(), UrlError> {
        match direct_endpoint(&self.host) {
            Some(direct_host) => Err(UrlError::PoolerCannotHoldSession {
                host: self.host.clone(),
                direct_host,
            }),
            None => Ok(()),
        }
    }

    pub fn check_replication_endpoint(&self) -> Result<(), UrlError> {
        match direct_endpoint(&self.host) {
            Some(direct_host) => Err(UrlError::PoolerCannotReplicate {
                host: self.host.clone(),
                direct_host,
            }),
            None => Ok(()),
        }
    }

    /// Whether the server is on this machine (`localhost` or a loopback address), where an
    /// unauthenticated or plaintext connection is a reasonable choice.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<IpAddr>()
                .is_ok_and(|address| address.is_loopback())
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for PgUrl {
    // Written out rather than derived so that adding a secret field cannot leak it by accident.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("channel_binding", &self.channel_binding)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("options", &self.options)
            .field("allow_plaintext_password", &self.allow_plaintext_password)
            .finish()
    }
}

/// A connection string that cannot be used. Messages never quote a password, not even when the
/// string is malformed around it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "expected a postgresql:// URL or libpq key=value pairs (host=... user=... dbname=...)"
    )]
    NotAConnectionString,
    #[error(
        "the connection string starts with a quote ({quote}), which is part of the value, not \
         quoting (docker run --env-file, for one, keeps quotes); remove the quotes around it"
    )]
    Quoted { quote: char },
    #[error(
        "the URL scheme must be lowercase postgresql:// or postgres:// (libpq and psql recognise \
         no other spelling)"
    )]
    SchemeNotLowercase,
    #[error(
        "postgresql+{driver}:// is a SQLAlchemy URL; usersync takes libpq's: remove +{driver} \
         (postgresql://user:password@host/db)"
    )]
    SqlAlchemyDriver { driver: String },
    #[error(
        "a JDBC URL (jdbc:postgresql://) cannot be used; write it as libpq's \
         postgresql://user:password@host:port/db"
    )]
    Jdbc,
    #[error("{scheme}:// is not a PostgreSQL URL; expected postgresql://user:password@host/db")]
    OtherScheme { scheme: String },
    #[error(
        "the connection string is neither a postgresql:// URL nor libpq key=value pairs: the text \
         before an `=` is not a parameter name (not shown: it may hold a password)"
    )]
    NotAParameterName,
    #[error(
        "the user name or password in the URL contains an unescaped `/`, `?` or `@`; \
         percent-encode it (%2F, %3F, %40)"
    )]
    UnescapedUserinfo,
    #[error("invalid percent-encoding in the {component}; write a literal `%` as %25")]
    PercentEncoding { component: String },
    #[error("the {component} is not valid UTF-8 after percent-decoding")]
    NotUtf8 { component: String },
    #[error("unterminated `[` in the host; write an IPv6 address as [::1]")]
    UnterminatedBracket,
    #[error("invalid IPv6 address `{0}` in brackets")]
    InvalidIpv6(String),
    #[error("unexpected text after the `]` of an IPv6 host; expected `:port` or nothing")]
    TextAfterBracket,
    #[error("invalid host name `{0}`")]
    InvalidHost(String),
    #[error(
        "unix-domain socket `{0}` is not supported; connect over TCP (for example host=127.0.0.1)"
    )]
    UnixSocket(String),
    #[error("usersync connects to one host, but the connection string lists several (`{0}`)")]
    MultipleHosts(String),
    #[error("invalid port `{0}`; expected a number from 1 to 65535")]
    InvalidPort(String),
    #[error("invalid {parameter} `{value}`; expected {expected}")]
    InvalidValue {
        parameter: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("unsupported connection parameter `{name}`{}", suggestion_text(.suggestion))]
    UnsupportedParameter {
        name: String,
        suggestion: Option<&'static str>,
    },
    #[error("{parameter}={value} is not supported: {reason}")]
    UnsupportedValue {
        parameter: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("a query parameter has no `=`; write name=value")]
    QueryWithoutEquals,
    #[error("{}", missing_equals_text(.after))]
    MissingEquals { after: Option<String> },
    #[error(
        "unterminated quoted value for `{0}`; close it with `'` (write a quote inside as \\')"
    )]
    UnterminatedQuote(String),
    #[error(
        "the connection string names no host; add one (postgresql://user@HOST/db or host=HOST)"
    )]
    MissingHost,
    #[error(
        "the connection string names no user; add one (postgresql://USER@host/db or user=USER)"
    )]
    MissingUser,
    #[error("sslmode={0} may not be used with sslrootcert=system; use sslmode=verify-full")]
    WeakSslModeWithSystemRoots(SslMode),
    #[error(
        "sslmode=verify-ca needs sslrootcert=/path/to/ca.pem, the CA that signed the server's \
         certificate: verify-ca does not check the host name, so the public web CAs would let \
         any website's certificate pass; or use sslmode=verify-full (with sslrootcert=system \
         for a server whose certificate a public CA issued, as Neon's)"
    )]
    VerifyCaWithoutRootCert,
    #[error("channel_binding=require needs TLS, but sslmode=disable; use sslmode=verify-full")]
    ChannelBindingWithoutTls,
    #[error(
        "host {host} is a pooled endpoint (Neon's -pooler, PgBouncer in transaction mode), which \
         cannot carry logical replication; use the direct endpoint {direct_host} (the same host \
         name without -pooler)"
    )]
    PoolerCannotReplicate { host: String, direct_host: String },
    #[error(
        "host {host} is a pooled endpoint (Neon's -pooler, PgBouncer in transaction mode), which \
         does not keep a session: usersync's target connection needs one (the standby's lock \
         is a session advisory lock, and the settings and temporary tables of a copy live in \
         the session); use the direct endpoint {direct_host} (the same host name without \
         -pooler)"
    )]
    PoolerCannotHoldSession { host: String, direct_host: String },
}

fn suggestion_text(suggestion: &Option<&'static str>) -> String {
    suggestion.map_or_else(String::new, |name| format!("; did you mean `{name}`?"))
}

fn missing_equals_text(after: &Option<String>) -> String {
    match after {
        Some(key) => format!(
            "expected key=value after the value of `{key}`; quote values that contain spaces: key='a value'"
        ),
        None => "expected key=value at the start of the connection string".to_owned(),
    }
}

impl FromStr for PgUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let parameters = match form_of(text)? {
            Form::Uri(rest) => uri_parameters(rest)?,
            Form::KeyValue => key_value_parameters(text)?,
        };
        let mut builder = Builder::default();
        for (key, value) in parameters {
            builder.set(&key, value)?;
        }
        builder.build()
    }
}

/// The two grammars of a connection string.
enum Form<'a> {
    /// After `postgresql://` or `postgres://`.
    Uri(&'a str),
    KeyValue,
}

/// Which grammar `text` is written in. Shapes that are neither but common when a URL is pasted
/// from elsewhere are named, so that they are not read as `key=value` pairs, whose first "key"
/// would then be the whole URL up to its first `=`, password included.
fn form_of(text: &str) -> Result<Form<'_>, UrlError> {
    if let Some(quote) = text
        .chars()
        .next()
        .filter(|c| matches!(c, '"' | '\'' | '`'))
    {
        return Err(UrlError::Quoted { quote });
    }
    if let Some(rest) = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
    {
        return Ok(Form::Uri(rest));
    }
    // In key=value pairs `://` can only follow an `=` (in a value).
    if let Some((scheme, _)) = text.split_once("://") {
        if !scheme.contains(|c: char| c == '=' || c.is_whitespace()) {
            return Err(scheme_error(scheme));
        }
    }
    if text.contains('=') {
        Ok(Form::KeyValue)
    } else {
        Err(UrlError::NotAConnectionString)
    }
}

/// Why a URL with this scheme (the text before `://`) cannot be used.
fn scheme_error(scheme: &str) -> UrlError {
    /// Longer "schemes" are text that merely contains `://`.
    const MAX_SCHEME_LEN: usize = 32;
    let lowercase = scheme.to_ascii_lowercase();
    let is_postgres = |name: &str| name == "postgresql" || name == "postgres";
    // RFC 3986 §3.1: a letter, then letters, digits, `+`, `-` and `.`. Only such a scheme is
    // shown: it cannot hold the `user:password@` that follows `://`.
    let is_scheme = scheme.len() <= MAX_SCHEME_LEN
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if lowercase == "jdbc:postgresql" {
        return UrlError::Jdbc;
    }
    if !is_scheme {
        return UrlError::NotAConnectionString;
    }
    if is_postgres(&lowercase) {
        return UrlError::SchemeNotLowercase;
    }
    match lowercase.split_once('+') {
        Some((base, driver)) if is_postgres(base) => UrlError::SqlAlchemyDriver {
            driver: driver.to_owned(),
        },
        _ => UrlError::OtherScheme {
            scheme: scheme.to_owned(),
        },
    }
}

/// Whether `key` can be a parameter name, and so may be quoted in an error. Anything else is
/// more likely a mangled URL than a typo, and may hold a password.
fn is_parameter_name(key: &str) -> bool {
    /// libpq's longest name is 25 characters (`fallback_application_name`).
    const MAX_NAME_LEN: usize = 64;
    key.len() <= MAX_NAME_LEN
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Settings collected from the connection string before defaults and cross-checks apply.
/// Later occurrences of a parameter replace earlier ones, as in libpq.
#[derive(Default)]
struct Builder {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<Password>,
    dbname: Option<String>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<SslRootCert>,
    channel_binding: Option<ChannelBinding>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    options: Option<String>,
}

impl Builder {
    fn set(&mut self, key: &str, value: String) -> Result<(), UrlError> {
        // libpq treats an empty value as "not set" for these.
        let non_empty = |value: String| (!value.is_empty()).then_some(value);
        match key {
            "host" => self.host = non_empty(value),
            "port" => self.port = parse_port(&value)?,
            "user" => self.user = non_empty(value),
            "password" => self.password = non_empty(value).map(Password),
            "dbname" => self.dbname = non_empty(value),
            "sslmode" => self.sslmode = Some(SslMode::parse(&value)?),
            "sslrootcert" => {
                self.sslrootcert = match value.as_str() {
                    "" => None,
                    "system" => Some(SslRootCert::System),
                    _ => Some(SslRootCert::File(PathBuf::from(value))),
                }
            }
            "channel_binding" => self.channel_binding = Some(ChannelBinding::parse(&value)?),
            "application_name" => self.application_name = non_empty(value),
            "connect_timeout" => self.connect_timeout = parse_connect_timeout(&value)?,
            "options" => self.options = non_empty(value),
            // Accepted and ignored, each for a reason:
            // - usersync always sets application_name, so libpq's fallback would never apply;
            // - TLS compression no longer exists in any TLS library, rustls included.
            "fallback_application_name" | "sslcompression" => {}
            // The defaults of these are what we do; any other value asks for something we don't.
            "target_session_attrs" => accept_only(
                "target_session_attrs",
                &value,
                "any",
                "usersync connects to one host and does not check its role",
            )?,
            "sslsni" => accept_only(
                "sslsni",
                &value,
                "1",
                "usersync always sends the host name (Neon routes connections by it)",
            )?,
            "sslnegotiation" => accept_only(
                "sslnegotiation",
                &value,
                "postgres",
                "usersync negotiates TLS with SSLRequest",
            )?,
            "gssencmode" => {
                // `prefer` falls back to no GSSAPI encryption, which is what we do anyway.
                if value != "disable" && value != "prefer" {
                    return Err(UrlError::UnsupportedValue {
                        parameter: "gssencmode",
                        value,
                        reason: "usersync does not implement GSSAPI encryption",
                    });
                }
            }
            _ => {
                return Err(UrlError::UnsupportedParameter {
                    name: key.to_owned(),
                    suggestion: suggest_parameter(key),
                })
            }
        }
        Ok(())
    }

    fn build(self) -> Result<PgUrl, UrlError> {
        let host = self.host.ok_or(UrlError::MissingHost)?;
        validate_host(&host)?;
        let user = self.user.ok_or(UrlError::MissingUser)?;
        // libpq 16: sslrootcert=system makes verify-full the default and refuses anything weaker,
        // because trusting public CAs without checking the name would trust every website.
        let sslmode = match (self.sslmode, &self.sslrootcert) {
            (Some(mode), Some(SslRootCert::System)) if mode != SslMode::VerifyFull => {
                return Err(UrlError::WeakSslModeWithSystemRoots(mode))
            }
            (None, Some(SslRootCert::System)) => SslMode::VerifyFull,
            (mode, _) => mode.unwrap_or_default(),
        };
        // libpq's verify-ca trusts ~/.postgresql/root.crt and fails without it; it never falls
        // back to public roots, which without a name check would accept any public website.
        if sslmode == SslMode::VerifyCa && !matches!(self.sslrootcert, Some(SslRootCert::File(_))) {
            return Err(UrlError::VerifyCaWithoutRootCert);
        }
        let channel_binding = self.channel_binding.unwrap_or_default();
        if channel_binding == ChannelBinding::Require && sslmode == SslMode::Disable {
            return Err(UrlError::ChannelBindingWithoutTls);
        }
        Ok(PgUrl {
            host,
            port: self.port.unwrap_or(DEFAULT_PORT),
            dbname: self.dbname.unwrap_or_else(|| user.clone()),
            user,
            password: self.password,
            sslmode,
            sslrootcert: self.sslrootcert,
            channel_binding,
            application_name: self.application_name,
            connect_timeout: self.connect_timeout,
            options: self.options,
            allow_plaintext_password: false,
        })
    }
}

/// Neon's pooled-endpoint suffix on the first label of the host name.
const POOLER_SUFFIX: &str = "-pooler";

/// The direct endpoint behind a pooled one (`ep-x-pooler.region.aws.neon.tech` →
/// `ep-x.region.aws.neon.tech`), or `None` when `host` is not a pooled endpoint. Host names
/// are case-insensitive, so the suffix is too; IP addresses have no labels to match.
fn direct_endpoint(host: &str) -> Option<String> {
    let (first_label, rest) = match host.split_once('.') {
        Some((first_label, rest)) => (first_label, Some(rest)),
        None => (host, None),
    };
    let base_len = first_label.len().checked_sub(POOLER_SUFFIX.len())?;
    // Comparing bytes first keeps the slicing below on a character boundary.
    let suffix = &first_label.as_bytes()[base_len..];
    if base_len == 0 || !suffix.eq_ignore_ascii_case(POOLER_SUFFIX.as_bytes()) {
        return None;
    }
    let base = &first_label[..base_len];
    Some(match rest {
        Some(rest) => format!("{base}.{rest}"),
        None => base.to_owned(),
    })
}

fn invalid_value(parameter: &'static str, value: &str, expected: &'static str) -> UrlError {
    UrlError::InvalidValue {
        parameter,
        value: value.to_owned(),
        expected,
    }
}

fn accept_only(
    parameter: &'static str,
    value: &str,
    accepted: &str,
    reason: &'static str,
) -> Result<(), UrlError> {
    if value == accepted {
        Ok(())
    } else {
        Err(UrlError::UnsupportedValue {
            parameter,
            value: value.to_owned(),
            reason,
        })
    }
}

fn parse_port(value: &str) -> Result<Option<u16>, UrlError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.contains(',') {
        return Err(UrlError::MultipleHosts(value.to_owned()));
    }
    match value.parse::<u16>() {
        Ok(port) if port != 0 => Ok(Some(port)),
        _ => Err(UrlError::InvalidPort(value.to_owned())),
    }
}

/// libpq: whole seconds; zero or negative waits indefinitely; 1 is raised to 2.
fn parse_connect_timeout(value: &str) -> Result<Option<Duration>, UrlError> {
    if value.is_empty() {
        return Ok(None);
    }
    let seconds: i64 = value.parse().map_err(|_| {
        invalid_value(
            "connect_timeout",
            value,
            "whole seconds (0 waits indefinitely)",
        )
    })?;
    Ok(u64::try_from(seconds)
        .ok()
        .filter(|&seconds| seconds > 0)
        .map(|seconds| Duration::from_secs(seconds).max(MIN_CONNECT_TIMEOUT)))
}

fn validate_host(host: &str) -> Result<(), UrlError> {
    if host.contains(',') {
        return Err(UrlError::MultipleHosts(host.to_owned()));
    }
    // libpq reads a host starting with `/` (or `@`, Linux abstract namespace) as a socket path.
    if host.starts_with('/') || host.starts_with('@') {
        return Err(UrlError::UnixSocket(host.to_owned()));
    }
    // The same check the TLS layer applies, done now so that a bad host fails before connecting.
    ServerName::try_from(host)
        .map(|_| ())
        .map_err(|_| UrlError::InvalidHost(host.to_owned()))
}

/// The closest supported parameter name, if the unknown one looks like a typo of it.
fn suggest_parameter(name: &str) -> Option<&'static str> {
    // JDBC and some drivers spell TLS as `ssl=true`.
    if name == "ssl" {
        return Some("sslmode");
    }
    /// More edits than this and the names are probably unrelated.
    const MAX_TYPO_DISTANCE: usize = 2;
    SUPPORTED_PARAMETERS
        .iter()
        .map(|&candidate| (edit_distance(name, candidate), candidate))
        .filter(|&(distance, _)| distance <= MAX_TYPO_DISTANCE)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over bytes (parameter names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &a_byte) in a.as_bytes().iter().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, &b_byte) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_byte != b_byte);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// `user:password@host:port/dbname?key=value&…` (after the scheme) as (key, value) pairs in
/// libpq's order: URL components first, then query parameters, which may override them.
fn uri_parameters(rest: &str) -> Result<Vec<(String, String)>, UrlError> {
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    // A `/` or `?` inside an unencoded password ends the authority early; the `@` then shows up
    // later. Refuse without quoting anything, because what follows could be half a password.
    if !authority.contains('@') && (path.contains('@') || query.contains('@')) {
        return Err(UrlError::UnescapedUserinfo);
    }
    let mut parameters = Vec::new();
    let host_port = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            parameters.push(("user".to_owned(), percent_decode(user, "user name")?));
            if let Some(password) = password {
                parameters.push(("password".to_owned(), percent_decode(password, "password")?));
            }
            host_port
        }
        None => authority,
    };
    let (host, port) = split_host_port(host_port)?;
    parameters.push(("host".to_owned(), host));
    parameters.push(("port".to_owned(), port));
    parameters.push(("dbname".to_owned(), percent_decode(path, "database name")?));
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or(UrlError::QueryWithoutEquals)?;
        let key = percent_decode(key, "name of a query parameter")?;
        if !is_parameter_name(&key) {
            return Err(UrlError::NotAParameterName);
        }
        let value = percent_decode(value, &format!("value of `{key}`"))?;
        parameters.push((key, value));
    }
    Ok(parameters)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, percent-decoded.
fn split_host_port(host_port: &str) -> Result<(String, String), UrlError> {
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let (address, after) = bracketed
            .split_once(']')
            .ok_or(UrlError::UnterminatedBracket)?;
        if address.parse::<Ipv6Addr>().is_err() {
            return Err(UrlError::InvalidIpv6(address.to_owned()));
        }
        let port = match after.strip_prefix(':') {
            Some(port) => port,
            None if after.is_empty() => "",
            None => return Err(UrlError::TextAfterBracket),
        };
        return Ok((address.to_owned(), percent_decode(port, "port")?));
    }
    if host_port.contains(',') {
        return Err(UrlError::MultipleHosts(host_port.to_owned()));
    }
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, ""));
    Ok((percent_decode(host, "host")?, percent_decode(port, "port")?))
}

/// libpq's percent-decoding: `%XX` only (`+` stays `+`), and the result must be UTF-8.
fn percent_decode(text: &str, component: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| UrlError::PercentEncoding {
                    component: component.to_owned(),
                })?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(byte);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| UrlError::NotUtf8 {
        component: component.to_owned(),
    })
}

/// `text` with every password it may hold replaced by `***`: the password of each
/// `scheme://user:password@host` URL (whatever the scheme's spelling, quoted or not) and the
/// value of each `password=` pair (`PASSWORD=`, `PGPASSWORD=` too). For messages that quote
/// input usersync has not parsed, such as clap's "unexpected argument '…'" when a URL is pasted
/// without `--source`, and as the last step before any error is printed. It would rather hide
/// too much than too little: a URL's password runs to the last `@` before the next space (a
/// quote may be part of the password), and an unquoted `password=` value to the next space or
/// quote.
pub fn redact_secrets(text: &str) -> String {
    redact_key_value_passwords(&redact_url_passwords(&decode_percent_letters(text)))
}

/// `%XX` escapes of ASCII letters, decoded: the URL parser takes `pass%77ord=` for
/// `password=`, so the redaction must see it that way too. (Letters only: nothing that changes
/// where a token ends.)
fn decode_percent_letters(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                if byte.is_ascii_alphabetic() {
                    decoded.push(char::from(byte));
                    i += 3;
                    continue;
                }
            }
        }
        let c = text[i..].chars().next().expect("a char at a char boundary");
        decoded.push(c);
        i += c.len_utf8();
    }
    decoded
}

/// Characters that end an unquoted value quoted inside a message.
fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\'' | '"' | '`')
}

fn redact_url_passwords(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + "://".len();
        redacted.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        let token_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let token = &rest[..token_len];
        match token.rfind('@') {
            Some(at) => match token[..at].find(':') {
                Some(colon) => {
                    redacted.push_str(&token[..=colon]);
                    redacted.push_str("***");
                    redacted.push_str(&token[at..]);
                }
                None => redacted.push_str(token),
            },
            None => {
                // `user:pass word@host`: a password with a space ends the token early. A
                // `user:` with no `/` after it, and an `@` later on the line, is taken for one.
                let line_len = rest.find('\n').unwrap_or(rest.len());
                let spaced_at = token
                    .find(':')
                    .filter(|&colon| !token[colon..].contains('/'))
                    .and_then(|colon| Some((colon, rest[..line_len].find('@')?)));
                if let Some((colon, at)) = spaced_at {
                    redacted.push_str(&rest[..=colon]);
                    redacted.push_str("***");
                    rest = &rest[at..];
                    continue;
                }
                redacted.push_str(token)
            }
        }
        rest = &rest[token_len..];
    }
    redacted.push_str(rest);
    redacted
}

fn redact_key_value_passwords(text: &str) -> String {
    const KEY: &str = "password";
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    // ASCII lowercasing keeps every byte offset, so positions found in it index `rest` too.
    while let Some(key_at) = rest.to_ascii_lowercase().find(KEY) {
        let after_key = &rest[key_at + KEY.len()..];
        let after_spaces = after_key.trim_start();
        let Some(value) = after_spaces.strip_prefix('=') else {
            // "password" in prose, not a key: keep it and look further.
            redacted.push_str(&rest[..key_at + KEY.len()]);
            rest = after_key;
            continue;
        };
        let value = value.trim_start();
        let value_start = rest.len() - value.len();
        let value_len = if let Some(quote) = value.chars().next().filter(|&c| c == '\'' || c == '"')
        {
            // libpq quoting (or double quotes): up to the next quote not escaped by a backslash.
            let quoted = &value[1..];
            let mut escaped = false;
            let close = quoted.char_indices().find_map(|(index, c)| {
                let closes = c == quote && !escaped;
                escaped = c == '\\' && !escaped;
                closes.then_some(index)
            });
            close.map_or(value.len(), |index| index + 2)
        } else if let Some(quoted) = value.strip_prefix("\\\"") {
            // A Debug-quoted string's escaped quotes: `password=\"...\"`.
            quoted.find("\\\"").map_or(value.len(), |index| index + 4)
        } else {
            value.find(ends_token).unwrap_or(value.len())
        };
        redacted.push_str(&rest[..value_start]);
        if value_len > 0 {
            redacted.push_str("***");
        }
        rest = &rest[value_start + value_len..];
    }
    redacted.push_str(rest);
    redacted
}

/// Percent-encodes all but RFC 3986 unreserved characters (and `/` where a path reads better).
fn percent_encode(text: &str, keep_slash: bool) -> String {
    let mut encoded = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        let unreserved = byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
        if unreserved || (keep_slash && byte == b'/') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// libpq's `key = value` form: values may be single-quoted, and `\` escapes the next character
/// inside or outside quotes.
fn key_value_parameters(text: &str) -> Result<Vec<(String, String)>, UrlError> {
    let mut parameters = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_whitespace = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_whitespace(&mut chars);
        if chars.peek().is_none() {
            return Ok(parameters);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if !key.is_empty() && !is_parameter_name(&key) {
            return Err(UrlError::NotAParameterName);
        }
        skip_whitespace(&mut chars);
        if chars.next() != Some('=') || key.is_empty() {
            // Name the previous key, never the stray text: it may be half a password.
            return Err(UrlError::MissingEquals {
                after: parameters
                    .last()
                    .map(|(key, _): &(String, String)| key.clone()),
            });
        }
        skip_whitespace(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => return Err(UrlError::UnterminatedQuote(key)),
                    },
                    Some(c) => value.push(c),
                    None => return Err(UrlError::UnterminatedQuote(key)),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    // libpq keeps a trailing backslash as is.
                    value.push(chars.next().unwrap_or('\\'));
                } else {
                    value.push(c);
                }
            }
        }
        parameters.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PgUrl {
        text.parse()
            .unwrap_or_else(|error| panic!("{text} should parse: {error}"))
    }

    fn error(text: &str) -> UrlError {
        match text.parse::<PgUrl>() {
            Ok(url) => panic!("{text} should not parse, got {url:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn neon_url() {
        let url = parse(
            "postgresql://alex:AbC123dEf@ep-cool-darkness-123456.us-east-2.aws.neon.tech/neondb\
             ?sslmode=require&channel_binding=require",
        );
        assert_eq!(url.host, "ep-cool-darkness-123456.us-east-2.aws.neon.tech");
        assert_eq!(url.port, 5432);
        assert_eq!(url.user, "alex");
        assert_eq!(url.password().map(Password::expose), Some("AbC123dEf"));
        assert_eq!(url.dbname, "neondb");
        assert_eq!(url.sslmode, SslMode::Require);
        assert_eq!(url.sslrootcert, None);
        assert_eq!(url.channel_binding, ChannelBinding::Require);
        assert_eq!(url.application_name, None);
        assert_eq!(url.connect_timeout, None);
        assert_eq!(url.options, None);
    }

    #[test]
    fn supabase_url_with_all_supported_parameters() {
        let url = parse(
            "postgres://postgres.abcdefgh:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres\
             ?sslmode=verify-full&sslrootcert=/etc/ssl/supabase.crt&application_name=my%20app\
             &connect_timeout=10&options=-c%20search_path%3Dauth",
        );
        assert_eq!(url.user, "postgres.abcdefgh");
        assert_eq!(url.port, 6543);
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(
            url.sslrootcert,
            Some(SslRootCert::File(PathBuf::from("/etc/ssl/supabase.crt")))
        );
        assert_eq!(url.application_name.as_deref(), Some("my app"));
        assert_eq!(url.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(url.options.as_deref(), Some("-c search_path=auth"));
    }

    #[test]
    fn defaults() {
        let url = parse("postgresql://bob@db.internal");
        assert_eq!(url.port, 5432);
        assert_eq!(
            url.dbname, "bob",
            "libpq's default database is the user name"
        );
        assert_eq!(url.password(), None);
        assert_eq!(url.sslmode, SslMode::Prefer);
        assert_eq!(url.channel_binding, ChannelBinding::Prefer);
        assert_eq!(parse("postgresql://bob@db.internal:/").port, 5432);
    }

    #[test]
    fn percent_decoding() {
        let url = parse("postgresql://us%40er:p%40ss%2Fw%3Ad+x%25@host/my%20db");
        assert_eq!(url.user, "us@er");
        assert_eq!(url.password().map(Password::expose), Some("p@ss/w:d+x%"));
        assert_eq!(url.dbname, "my db");
        let url = parse("postgresql://u:%C3%A9t%C3%A9@host/db");
        assert_eq!(url.password().map(Password::expose), Some("été"));
    }

    #[test]
    fn password_may_contain_a_colon_and_an_unencoded_at() {
        let url = parse("postgresql://u:a:b@c@host/db");
        assert_eq!(url.user, "u");
        assert_eq!(url.password().map(Password::expose), Some("a:b@c"));
        assert_eq!(url.host, "host");
    }

    #[test]
    fn ipv6_hosts() {
        let url = parse("postgresql://u@[::1]:5433/db");
        assert_eq!(url.host, "::1");
        assert_eq!(url.port, 5433);
        assert!(url.is_loopback());
        assert!(url.redacted().contains("@[::1]:5433/"));
        assert_eq!(parse("postgresql://u@[2001:db8::7]/db").host, "2001:db8::7");
        assert_eq!(parse("host=::1 user=u").host, "::1");
    }

    #[test]
    fn query_parameters_override_url_components() {
        let url = parse("postgresql:///app?host=db.internal&port=6000&user=bob&password=pw");
        assert_eq!(url.host, "db.internal");
        assert_eq!(url.port, 6000);
        assert_eq!(url.user, "bob");
        assert_eq!(url.dbname, "app");
        assert_eq!(url.password().map(Password::expose), Some("pw"));
        assert_eq!(
            parse("postgresql://u@h/db?sslmode=disable&sslmode=require").sslmode,
            SslMode::Require
        );
    }

    #[test]
    fn key_value_form() {
        let url = parse(
            "host=localhost port=5433 user=bob password='it\\'s a secret' dbname=app \
             sslmode=verify-ca sslrootcert=/tmp/ca.pem",
        );
        assert_eq!(url.host, "localhost");
        assert_eq!(url.port, 5433);
        assert_eq!(url.user, "bob");
        assert_eq!(url.password().map(Password::expose), Some("it's a secret"));
        assert_eq!(url.dbname, "app");
        assert_eq!(url.sslmode, SslMode::VerifyCa);
        assert_eq!(
            url.sslrootcert,
            Some(SslRootCert::File(PathBuf::from("/tmp/ca.pem")))
        );
    }

    #[test]
    fn key_value_spacing_escapes_and_empty_values() {
        let url = parse("  host = h\tuser=a\\ b   password=''  application_name='' ");
        assert_eq!(url.host, "h");
        assert_eq!(url.user, "a b");
        assert_eq!(
            url.password(),
            None,
            "an empty password is no password, as in libpq"
        );
        assert_eq!(url.application_name, None);
        assert_eq!(
            parse("host=h user=u password=p%41")
                .password()
                .map(Password::expose),
            Some("p%41")
        );
    }

    #[test]
    fn connect_timeout_follows_libpq() {
        let timeout =
            |value: &str| parse(&format!("host=h user=u connect_timeout={value}")).connect_timeout;
        assert_eq!(timeout("10"), Some(Duration::from_secs(10)));
        assert_eq!(timeout("1"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("0"), None);
        assert_eq!(timeout("-5"), None);
        assert!(matches!(
            error("host=h user=u connect_timeout=10s"),
            UrlError::InvalidValue {
                parameter: "connect_timeout",
                ..
            }
        ));
    }

    #[test]
    fn sslrootcert_system_means_verify_full() {
        let url = parse("postgresql://u@h/db?sslrootcert=system");
        assert_eq!(url.sslrootcert, Some(SslRootCert::System));
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(
            error("postgresql://u@h/db?sslrootcert=system&sslmode=require"),
            UrlError::WeakSslModeWithSystemRoots(SslMode::Require)
        );
        assert_eq!(
            error("postgresql://u@h/db?sslrootcert=system&sslmode=verify-ca").to_string(),
            "sslmode=verify-ca may not be used with sslrootcert=system; use sslmode=verify-full"
        );
    }

    #[test]
    fn verify_ca_needs_a_root_certificate_file() {
        for text in [
            "postgresql://u@h/db?sslmode=verify-ca",
            "host=h user=u sslmode=verify-ca sslrootcert=",
        ] {
            assert_eq!(error(text), UrlError::VerifyCaWithoutRootCert, "{text}");
        }
        let advice = error("postgresql://u@h/db?sslmode=verify-ca").to_string();
        assert!(advice.contains("sslrootcert=/path/to/ca.pem"), "{advice}");
        assert!(advice.contains("sslmode=verify-full"), "{advice}");
        assert_eq!(
            parse("postgresql://u@h/db?sslmode=verify-ca&sslrootcert=/ca.pem").sslmode,
            SslMode::VerifyCa
        );
        // verify-full checks the host name, so the public roots stay meaningful for it.
        let full = parse("postgresql://u@h/db?sslmode=verify-full");
        assert_eq!(
            (full.sslmode, full.sslrootcert),
            (SslMode::VerifyFull, None)
        );
    }

    #[test]
    fn sslmode_names() {
        for mode in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(
                parse(&format!("host=h user=u sslmode={mode} sslrootcert=/ca.pem")).sslmode,
                mode
            );
        }
        assert_eq!(
            error("host=h user=u sslmode=verify_full").to_string(),
            "invalid sslmode `verify_full`; expected disable, allow, prefer, require, verify-ca or verify-full"
        );
    }

    #[test]
    fn ignored_parameters() {
        let url = parse(
            "postgresql://u@h/db?fallback_application_name=psql&sslcompression=0\
             &target_session_attrs=any&sslsni=1&sslnegotiation=postgres&gssencmode=disable",
        );
        assert_eq!(url, parse("postgresql://u@h/db"));
    }

    #[test]
    fn unsupported_parameters_fail_by_name() {
        assert_eq!(
            error("postgresql://u@h/db?sslmod=require").to_string(),
            "unsupported connection parameter `sslmod`; did you mean `sslmode`?"
        );
        assert_eq!(
            error("host=h user=u pasword=x").to_string(),
            "unsupported connection parameter `pasword`; did you mean `password`?"
        );
        assert_eq!(
            error("postgresql://u@h/db?ssl=true").to_string(),
            "unsupported connection parameter `ssl`; did you mean `sslmode`?"
        );
        assert_eq!(
            error("postgresql://u@h/db?sslcert=/c.pem").to_string(),
            "unsupported connection parameter `sslcert`"
        );
        assert!(matches!(
            error("postgresql://u@h/db?target_session_attrs=read-write"),
            UrlError::UnsupportedValue {
                parameter: "target_session_attrs",
                ..
            }
        ));
        assert!(matches!(
            error("postgresql://u@h/db?gssencmode=require"),
            UrlError::UnsupportedValue {
                parameter: "gssencmode",
                ..
            }
        ));
        assert!(matches!(
            error("postgresql://u@h/db?sslsni=0"),
            UrlError::UnsupportedValue {
                parameter: "sslsni",
                ..
            }
        ));
    }

    #[test]
    fn structural_errors() {
        assert_eq!(error("just some text"), UrlError::NotAConnectionString);
        assert_eq!(
            error("mysql://u@h/db"),
            UrlError::OtherScheme {
                scheme: "mysql".into()
            }
        );
        assert_eq!(error("postgresql://h/db"), UrlError::MissingUser);
        assert_eq!(error("postgresql://u@/db"), UrlError::MissingHost);
        assert_eq!(error("user=u dbname=d"), UrlError::MissingHost);
        assert_eq!(
            error("postgresql://u@h1,h2:5433/db").to_string(),
            "usersync connects to one host, but the connection string lists several (`h1,h2:5433`)"
        );
        assert!(matches!(
            error("host=a,b user=u"),
            UrlError::MultipleHosts(_)
        ));
        assert!(matches!(
            error("host=a port=1,2 user=u"),
            UrlError::MultipleHosts(_)
        ));
        assert_eq!(
            error("postgresql://u@h:0/db"),
            UrlError::InvalidPort("0".into())
        );
        assert_eq!(
            error("postgresql://u@h:70000/db"),
            UrlError::InvalidPort("70000".into())
        );
        assert_eq!(
            error("postgresql://u@h:1:2/db"),
            UrlError::InvalidPort("1:2".into())
        );
        assert_eq!(
            error("host=/var/run/postgresql user=u"),
            UrlError::UnixSocket("/var/run/postgresql".into())
        );
        assert_eq!(
            error("postgresql://u@%2Ftmp/db"),
            UrlError::UnixSocket("/tmp".into())
        );
        assert_eq!(
            error("postgresql://u@[::1/db"),
            UrlError::UnterminatedBracket
        );
        assert_eq!(
            error("postgresql://u@[db.host]/db"),
            UrlError::InvalidIpv6("db.host".into())
        );
        assert_eq!(
            error("postgresql://u@[::1]x/db"),
            UrlError::TextAfterBracket
        );
        assert_eq!(
            error("postgresql://u@bad%20host/db"),
            UrlError::InvalidHost("bad host".into())
        );
        assert_eq!(
            error("postgresql://u@h/db?sslmode"),
            UrlError::QueryWithoutEquals
        );
        assert_eq!(
            error("postgresql://u@h/db%zz"),
            UrlError::PercentEncoding {
                component: "database name".into()
            }
        );
        assert_eq!(
            error("postgresql://u@h/db%FF"),
            UrlError::NotUtf8 {
                component: "database name".into()
            }
        );
        assert_eq!(
            error("postgresql://u@h/db?sslmode=dis%5"),
            UrlError::PercentEncoding {
                component: "value of `sslmode`".into()
            }
        );
        assert_eq!(
            error("host=h user='u"),
            UrlError::UnterminatedQuote("user".into())
        );
        assert_eq!(error("=h user=u"), UrlError::MissingEquals { after: None });
        assert_eq!(
            error("host=h user=u dbname"),
            UrlError::MissingEquals {
                after: Some("user".into())
            }
        );
        assert_eq!(
            error("postgresql://u@h/db?sslmode=disable&channel_binding=require"),
            UrlError::ChannelBindingWithoutTls
        );
        assert!(matches!(
            error("postgresql://u@h/db?channel_binding=yes"),
            UrlError::InvalidValue {
                parameter: "channel_binding",
                ..
            }
        ));
    }

    /// URLs as they arrive from other tools: each shape is named, and none is read as
    /// key=value pairs (whose first "key" would be the URL up to its first `=`, password and all).
    #[test]
    fn pasted_url_shapes_are_named() {
        let quoted = |quote| UrlError::Quoted { quote };
        let driver = |name: &str| UrlError::SqlAlchemyDriver {
            driver: name.into(),
        };
        let cases = [
            // docker run --env-file keeps quotes.
            (
                "\"postgresql://u:s3cret@h/db?sslmode=require\"",
                quoted('"'),
            ),
            ("'postgresql://u:s3cret@h/db?sslmode=require'", quoted('\'')),
            ("\"postgresql://u:s3cret@h/db?sslmode=require", quoted('"')),
            ("  `host=h password=s3cret`", quoted('`')),
            ("\"host=h password=s3cret\"", quoted('"')),
            // libpq matches the scheme case-sensitively.
            (
                "POSTGRESQL://u:s3cret@h/db?sslmode=require",
                UrlError::SchemeNotLowercase,
            ),
            ("Postgres://u:s3cret@h/db", UrlError::SchemeNotLowercase),
            // SQLAlchemy names the driver in the scheme.
            (
                "postgresql+psycopg://u:s3cret@h/db?sslmode=require",
                driver("psycopg"),
            ),
            ("postgres+asyncpg://u:s3cret@h/db", driver("asyncpg")),
            (
                "POSTGRESQL+PSYCOPG2://u:s3cret@h/db?sslmode=require",
                driver("psycopg2"),
            ),
            (
                "jdbc:postgresql://h/db?user=u&password=s3cret",
                UrlError::Jdbc,
            ),
            (
                "mysql://u:s3cret@h/db?ssl=true",
                UrlError::OtherScheme {
                    scheme: "mysql".into(),
                },
            ),
            // Not recognisable as a URL: an "unknown key" that must not be quoted.
            (
                "postgresql:/u:s3cret@h/db?sslmode=require",
                UrlError::NotAParameterName,
            ),
            (
                "u:s3cret@h:5432/db?sslmode=require",
                UrlError::NotAParameterName,
            ),
            (
                "post gres://u:s3cret@h/db?sslmode=require",
                UrlError::MissingEquals { after: None },
            ),
            (
                "postgresql://u@h/db?pw:s3cret=x",
                UrlError::NotAParameterName,
            ),
            ("host=h user=u s3cret/x=y", UrlError::NotAParameterName),
        ];
        for (text, expected) in cases {
            assert_eq!(error(text), expected, "{text}");
        }
        assert_eq!(
            driver("psycopg").to_string(),
            "postgresql+psycopg:// is a SQLAlchemy URL; usersync takes libpq's: remove +psycopg \
             (postgresql://user:password@host/db)"
        );
        assert!(quoted('"').to_string().contains("remove the quotes"));
        // A value may contain `://`; it is still key=value.
        assert_eq!(
            parse("host=h user=u application_name=a://b")
                .application_name
                .as_deref(),
            Some("a://b")
        );
    }

    /// Malformed connection strings with the password `s3cret` (or `Zq9`…`Xw7` around a
    /// reserved character) in them: no error may show any of it.
    #[test]
    fn errors_never_contain_the_password() {
        let cases = [
            "postgresql://u:s3cret@host:notaport/db",
            "postgresql://u:s3cret@host:5432:6/db",
            "postgresql://u:s3cret@host/db?sslmod=require",
            "postgresql://u:s3cret@h1,h2/db",
            "postgresql://u:s3cret@[::1/db",
            "postgresql://u:s3cret@[zz]/db",
            "postgresql://u:s3cret@[::1]zz/db",
            "postgresql://u:s3cret%zz@host/db",
            "postgresql://u:s3cret%FF@host/db",
            "postgresql://u:s3cret@host/db?sslmode=bogus",
            "postgresql://u:s3cret@/db",
            "postgresql://:s3cret@host/db",
            "postgresql://u:s3cret@host/db?sslrootcert=system&sslmode=require",
            "postgresql://u:s3cret@host/db?sslmode=disable&channel_binding=require",
            "postgresql://u:Zq9/Xw7@host/db",
            "postgresql://u:Zq9?Xw7@host/db",
            "postgresql://u:Zq9?a=Xw7@host/db",
            "postgresql://u:Zq9@Xw7@h:x/db",
            "host=h password=s3cret port=x user=u",
            "host=h password='s3cret user=u",
            "host=h password=s3cret bogus",
            "host=h password=s3cret sslmod=require user=u",
            "host=h password=s3cret",
            "password=s3cret user=u",
            "s3cret",
            "\"postgresql://u:s3cret@h/db?sslmode=require\"",
            "POSTGRESQL://u:s3cret@h/db?sslmode=require",
            "postgresql+psycopg://u:s3cret@h/db?sslmode=require",
            "jdbc:postgresql://h/db?user=u&password=s3cret",
            "mysql://u:s3cret@h/db?ssl=true",
            "postgresql:/u:s3cret@h/db?sslmode=require",
            "u:s3cret@h/db?sslmode=require x",
            "host=h user=u postgresql://u:s3cret@h/db?sslmode=require",
        ];
        for case in cases {
            let error = error(case);
            for shown in [error.to_string(), format!("{error:?}")] {
                for secret in ["s3cret", "Zq9", "Xw7"] {
                    assert!(!shown.contains(secret), "{case} gave {shown}");
                }
            }
        }
    }

    #[test]
    fn debug_display_and_redacted_hide_the_password() {
        let url = parse("postgresql://u:s3cret@host/db?sslmode=verify-full");
        for shown in [
            format!("{url:?}"),
            url.to_string(),
            url.redacted(),
            format!("{:?}", url.password()),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        assert_eq!(
            url.redacted(),
            "postgresql://u:***@host:5432/db?sslmode=verify-full"
        );
        assert_eq!(
            parse("postgresql://u@host/db").redacted(),
            "postgresql://u@host:5432/db?sslmode=prefer"
        );
    }

    #[test]
    fn redacted_parses_back_to_the_same_settings() {
        let url = parse(
            "host=::1 port=6000 user='us er@x' password=pw dbname=d/b sslmode=verify-ca \
             sslrootcert='/etc/my certs/ca.pem' channel_binding=disable application_name=a&b \
             connect_timeout=7 options='-c statement_timeout=0'",
        );
        let reparsed = parse(&url.redacted());
        assert_eq!(reparsed.password().map(Password::expose), Some("***"));
        assert_eq!(
            PgUrl {
                password: url.password.clone(),
                ..reparsed
            },
            url,
            "{}",
            url.redacted()
        );
        let system = parse("postgresql://u@h/db?sslrootcert=system");
        assert_eq!(parse(&system.redacted()), system);
    }

    #[test]
    fn host_names_that_docker_and_dns_allow() {
        assert_eq!(parse("host=db_1 user=u").host, "db_1");
        assert_eq!(parse("host=db.example.com. user=u").host, "db.example.com.");
    }

    #[test]
    fn pooled_endpoints_cannot_replicate() {
        let check = |host: &str| parse(&format!("host={host} user=u")).check_replication_endpoint();
        let error = check("ep-cool-123-pooler.us-east-2.aws.neon.tech").expect_err("pooler");
        assert_eq!(
            error,
            UrlError::PoolerCannotReplicate {
                host: "ep-cool-123-pooler.us-east-2.aws.neon.tech".into(),
                direct_host: "ep-cool-123.us-east-2.aws.neon.tech".into(),
            }
        );
        assert_eq!(
            error.to_string(),
            "host ep-cool-123-pooler.us-east-2.aws.neon.tech is a pooled endpoint (Neon's -pooler, \
             PgBouncer in transaction mode), which cannot carry logical replication; use the \
             direct endpoint ep-cool-123.us-east-2.aws.neon.tech (the same host name without \
             -pooler)"
        );
        assert!(matches!(
            check("EP-X-POOLER.c-2.eu-central-1.aws.neon.tech"),
            Err(UrlError::PoolerCannotReplicate { direct_host, .. })
                if direct_host == "EP-X.c-2.eu-central-1.aws.neon.tech"
        ));
        assert!(matches!(
            check("db-pooler"),
            Err(UrlError::PoolerCannotReplicate { direct_host, .. }) if direct_host == "db"
        ));
        for direct in [
            "ep-cool-123.us-east-2.aws.neon.tech",
            // Only the first label names the endpoint.
            "ep-cool-123.pooler-east.aws.neon.tech",
            "ep-cool-123.us-east-2-pooler.aws.neon.tech",
            // Supabase's pooler host has no -pooler label; it is refused by the server instead.
            "aws-0-eu-central-1.pooler.supabase.com",
            "pooler.example.com",
            "127.0.0.1",
            "::1",
            "localhost",
        ] {
            assert_eq!(check(direct), Ok(()), "{direct}");
        }
        assert_eq!(direct_endpoint("-pooler.example.com"), None);
        // Never a panic on a character boundary (the URL parser refuses such hosts anyway).
        assert_eq!(direct_endpoint("\u{e9}\u{e9}\u{e9}\u{e9}"), None);
        assert_eq!(direct_endpoint("\u{e9}-pooler"), Some("\u{e9}".to_owned()));
    }

    #[test]
    fn secrets_are_redacted_however_the_input_spells_them() {
        // Shapes a review got past the redaction, through clap's echo of a misplaced argument
        // and Debug-quoted option values.
        for text in [
            r#"error: unexpected argument 'postgresql://u@h/db?pass%77ord=Zq9PW' found"#,
            r#"error: unexpected argument 'host=h password="Zq9PW"' found"#,
            r#"invalid value "host=h password=\"Zq9PW\"" for '--slot'"#,
            "error: unexpected argument 'postgresql://u:Zq9 PW@h/db' found",
            "tip: postgresql://u:Zq9 PW@h/db?sslmode=require",
        ] {
            let redacted = redact_secrets(text);
            assert!(
                !redacted.contains("Zq9") && !redacted.contains("PW"),
                "{text:?} became {redacted:?}"
            );
        }
        // Prose keeps its words: no password there.
        let prose = "100%AB done: postgresql://h:5432/db, ask admin@example.com";
        assert_eq!(redact_secrets(prose), prose);
    }

    #[test]
    fn secrets_are_redacted_from_free_text() {
        let cases = [
            (
                "error: unexpected argument 'postgresql://u:s3cret@host:5432/db' found",
                "error: unexpected argument 'postgresql://u:***@host:5432/db' found",
            ),
            (
                "postgres://u:a:b@c%40d@h/db?sslmode=require and postgresql://v:x@h2",
                "postgres://u:***@h/db?sslmode=require and postgresql://v:***@h2",
            ),
            ("postgresql://u@h/db", "postgresql://u@h/db"),
            ("postgresql://h:5432/db", "postgresql://h:5432/db"),
            (
                "'host=h password=s3cret user=u'",
                "'host=h password=*** user=u'",
            ),
            (
                "host=h password = 'it\\'s s3cret' user=u",
                "host=h password = *** user=u",
            ),
            ("password='s3cret", "password=***"),
            ("password=", "password="),
            (
                "wrong password; password=s3cret",
                "wrong password; password=***",
            ),
            (
                "postgresql://u@h/db?password=s3cret&sslmode=require",
                "postgresql://u@h/db?password=***",
            ),
            (
                "password authentication failed for user \"u\"",
                "password authentication failed for user \"u\"",
            ),
            (
                "d\u{e9}j\u{e0} password=\u{e9}t\u{e9} vu",
                "d\u{e9}j\u{e0} password=*** vu",
            ),
            // Any spelling of any scheme, in quotes or not.
            (
                "\"POSTGRESQL://u:s3cret@h/db?sslmode=require\"",
                "\"POSTGRESQL://u:***@h/db?sslmode=require\"",
            ),
            (
                "'postgresql+psycopg://u:s3cret@h/db'",
                "'postgresql+psycopg://u:***@h/db'",
            ),
            (
                "jdbc:postgresql://u:s3cret@h/db",
                "jdbc:postgresql://u:***@h/db",
            ),
            // A quote inside the password does not end the URL.
            ("postgresql://u:s3'cr\"et@h/db", "postgresql://u:***@h/db"),
            (
                "PASSWORD=s3cret PGPASSWORD='s3cret' Password = s3cret",
                "PASSWORD=*** PGPASSWORD=*** Password = ***",
            ),
            (
                "jdbc:postgresql://h/db?user=u&Password=s3cret",
                "jdbc:postgresql://h/db?user=u&Password=***",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(redact_secrets(text), expected, "{text}");
        }
    }

    #[test]
    fn loopback() {
        assert!(parse("host=localhost user=u").is_loopback());
        assert!(parse("host=LOCALHOST user=u").is_loopback());
        assert!(parse("host=127.0.0.1 user=u").is_loopback());
        assert!(parse("host=127.1.2.3 user=u").is_loopback());
        assert!(!parse("host=db.example.com user=u").is_loopback());
        assert!(!parse("host=10.0.0.1 user=u").is_loopback());
    }
}
