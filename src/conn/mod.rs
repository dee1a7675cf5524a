//! Connection settings, TLS, and ordinary SQL connections.
//!
//! usersync talks to two PostgreSQL servers: the identity store (source, over the replication
//! protocol, see `source/`) and Neon (target, over ordinary SQL). Both are configured with the
//! libpq-style URLs that users copy from the Neon or Supabase console, and both must mean the
//! same thing by them. This module owns that meaning:
//!
//! - [`url`] parses `postgresql://…` URLs and libpq `key=value` strings into a [`PgUrl`]. We
//!   parse them ourselves rather than with `tokio_postgres::Config::from_str` because
//!   tokio-postgres rejects libpq's `sslmode=verify-ca`/`verify-full` and `sslrootcert`, which
//!   are exactly the settings a careful operator pastes, and because the replication client is
//!   not tokio-postgres and needs the same settings. Unknown parameters fail at once, so a typo
//!   such as `sslmod=require` cannot silently downgrade security.
//! - [`tls`] turns the `sslmode` into a rustls configuration with libpq's meanings:
//!   `verify-full` checks the chain and the host name, `verify-ca` only the chain, and
//!   `require`/`prefer`/`allow` encrypt without authenticating the server (with a warning).
//!   The host name is sent as SNI (unless it is an IP address): Neon's proxy routes connections
//!   by it and requires TLS. It also computes the `tls-server-end-point` channel binding for SCRAM-SHA-256-PLUS.
//! - [`sql`] opens ordinary tokio-postgres connections with those settings and classifies
//!   failures as transient (retry) or definite (stop and tell the operator).
//! - [`auth_policy`] decides, for both clients, whether a password request may be answered: a
//!   cleartext or md5 password goes only inside TLS or to this machine, unless the operator
//!   passes `--allow-plaintext-password`. [`password_guard`] enforces it on tokio-postgres,
//!   which has no hook for it, by reading along the plaintext startup.
//!
//! Neon's pooled endpoints (`-pooler` in the host name) run PgBouncer in transaction mode and
//! cannot carry a replication stream, so the source URL must name the direct endpoint
//! ([`PgUrl::check_replication_endpoint`]).
//!
//! A connection that ends up unencrypted to a host that is not this machine logs a warning
//! ([`tls::plaintext_exposure`]): `sslmode=disable`, or `prefer`/`allow` with a server that
//! refused TLS.
//!
//! Passwords never leave [`Password`] except through [`Password::expose`]: every `Debug`, log
//! line and error in this module shows [`PgUrl::redacted`] instead of the URL as given.

pub mod auth_policy;
pub mod password_guard;
pub mod sql;
pub mod tls;
pub mod url;
pub mod version;

#[cfg(test)]
pub(crate) mod test_pki;

pub use auth_policy::{PasswordPolicy, PasswordRequest, PlaintextPasswordRefused};
pub use sql::{connect, ConnectError, ConnectErrorKind};
pub use tls::{
    client_config, plaintext_exposure, server_name, tls_requirement, tls_server_end_point,
    warn_if_plaintext, TlsError, TlsRequirement,
};
pub use url::{redact_secrets, ChannelBinding, Password, PgUrl, SslMode, SslRootCert, UrlError};
