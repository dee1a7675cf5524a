//! When a password may be answered: one rule for both clients, tokio-postgres for SQL (through
//! [`super::password_guard`]) and our own replication client.
//!
//! A server asks for a password in one of three ways (the `'R'` message's request code):
//!
//! - SCRAM-SHA-256 (10): the password never crosses the wire, and what does is useless for
//!   logging in elsewhere; an eavesdropper could only guess passwords against it, slowly (4096
//!   PBKDF2 rounds per guess). Always answered.
//! - md5 (5): a salted MD5 of an MD5 of the password. Whoever reads it can test billions of
//!   guesses a second, and a fake server picks the salt.
//! - cleartext (3): the password itself.
//!
//! The last two are answered only inside TLS or to this machine (`localhost`, a loopback
//! address), where nothing crosses a network; anything else needs the operator's explicit
//! `--allow-plaintext-password`. Without TLS there is no way to tell the real server from
//! anyone on the path, and under `sslmode=prefer` (libpq's default) such a party need only
//! answer "no TLS" and ask for the password in cleartext. (`channel_binding=require` is
//! stricter still: SCRAM with channel binding or nothing.)

use std::fmt;

use super::url::PgUrl;

/// A request for the password in a form that exposes it without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordRequest {
    /// `AuthenticationCleartextPassword` (request code 3).
    Cleartext,
    /// `AuthenticationMD5Password` (request code 5).
    Md5,
}

impl fmt::Display for PasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cleartext => "in cleartext",
            Self::Md5 => "as an md5 hash (quick to crack)",
        })
    }
}

/// A password request refused by [`PasswordPolicy::check`]: nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{host} asks for the password {request} on a connection {}; usersync did not send it. Use \
     sslmode=verify-full (with sslrootcert=/path/ca.pem for a private CA), or have the server \
     ask for scram-sha-256 (password_encryption and pg_hba.conf); to send it anyway, pass \
     --allow-plaintext-password (or set USERSYNC_ALLOW_PLAINTEXT_PASSWORD to true)",
    if *encrypted {
        "whose server has not proven who it is (TLS without a verified certificate: anyone on \
         the network path can present one)"
    } else {
        "without TLS, which anyone on the network path could read"
    }
)]
pub struct PlaintextPasswordRefused {
    pub host: String,
    pub request: PasswordRequest,
    /// Whether the connection was TLS (not verified) rather than plaintext.
    pub encrypted: bool,
}

/// What decides whether a password request is answered, taken from a URL so that it can travel
/// with a connection (into the stream adapter, which outlives the borrow of the URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPolicy {
    host: String,
    on_this_machine: bool,
    plaintext_allowed: bool,
    /// The URL's TLS settings verify the server's certificate (`verify-ca`, `verify-full`,
    /// or a root file): only then does TLS prove who asks.
    tls_verifies_server: bool,
}

impl PasswordPolicy {
    pub fn of(url: &PgUrl) -> Self {
        PasswordPolicy {
            host: url.host.clone(),
            on_this_machine: url.is_loopback(),
            plaintext_allowed: url.allow_plaintext_password,
            tls_verifies_server: super::tls::verifies_server(url),
        }
    }

    /// Whether to answer `request` on a connection that is `encrypted` (TLS) or not. TLS
    /// counts only with a verified certificate: a man in the middle answers "TLS" as easily
    /// as "no TLS", with a certificate of its own, under `prefer` and `require`.
    pub fn check(
        &self,
        request: PasswordRequest,
        encrypted: bool,
    ) -> Result<(), PlaintextPasswordRefused> {
        let proven = encrypted && self.tls_verifies_server;
        if proven || self.on_this_machine || self.plaintext_allowed {
            return Ok(());
        }
        Err(PlaintextPasswordRefused {
            host: self.host.clone(),
            request,
            encrypted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(url: &str) -> PasswordPolicy {
        PasswordPolicy::of(&url.parse().expect("test URL"))
    }

    #[test]
    fn exposing_requests_are_answered_only_with_tls_locally_or_when_allowed() {
        use PasswordRequest::{Cleartext, Md5};
        let remote = policy("postgresql://u:pw@db.example.com/db?sslmode=prefer");
        for request in [Cleartext, Md5] {
            for encrypted in [false, true] {
                assert_eq!(
                    remote.check(request, encrypted),
                    Err(PlaintextPasswordRefused {
                        host: "db.example.com".into(),
                        request,
                        encrypted,
                    }),
                    "prefer's TLS verifies nobody"
                );
            }
            let verified = policy("postgresql://u:pw@db.example.com/db?sslmode=verify-full");
            assert_eq!(verified.check(request, true), Ok(()), "inside verified TLS");
            assert!(verified.check(request, false).is_err());
            for local in ["localhost", "127.0.0.1", "[::1]"] {
                let local = policy(&format!("postgresql://u:pw@{local}/db?sslmode=disable"));
                assert_eq!(local.check(request, false), Ok(()), "{local:?}");
            }
            // A name is not this machine just because it contains "localhost".
            let lookalike = policy("postgresql://u:pw@localhost.example.com/db");
            assert!(lookalike.check(request, false).is_err());
        }
        let mut url: PgUrl = "postgresql://u:pw@10.0.0.7/db?sslmode=disable"
            .parse()
            .expect("test URL");
        url.allow_plaintext_password = true;
        assert_eq!(PasswordPolicy::of(&url).check(Cleartext, false), Ok(()));
    }

    #[test]
    fn the_refusal_says_what_to_do() {
        let refusal = PlaintextPasswordRefused {
            host: "db.example.com".into(),
            request: PasswordRequest::Md5,
            encrypted: false,
        }
        .to_string();
        for advice in [
            "db.example.com asks for the password as an md5 hash",
            "usersync did not send it",
            "sslmode=verify-full",
            "scram-sha-256",
            "--allow-plaintext-password",
            "set USERSYNC_ALLOW_PLAINTEXT_PASSWORD to true",
        ] {
            assert!(refusal.contains(advice), "{advice}: {refusal}");
        }
    }
}
