//! Authentication of the replication connection: which of the server's requests to answer,
//! with what, and which to refuse.
//!
//! After the StartupMessage the server leads: it sends authentication requests (`'R'` messages)
//! until AuthenticationOk or an ErrorResponse, and the client answers each. The server picks
//! the method, so a client that answers whatever it is asked hands its secret to whoever is on
//! the other end of the socket. With `sslmode=require` any certificate passes: a man in the
//! middle that terminates TLS only has to ask for a cleartext password. The rules, as libpq
//! applies them (`check_expected_areq` and `pg_SASL_init` in `fe-auth.c`,
//! `build_client_first_message` in `fe-auth-scram.c`):
//!
//! - **`channel_binding=require`** answers nothing but SASL with SCRAM-SHA-256-PLUS. A request
//!   for a cleartext password, an md5 hash, GSSAPI or SSPI, a SASL offer without PLUS, and an
//!   AuthenticationOk with no SCRAM at all (`trust`) are refused before any byte of the
//!   password, or of anything computed from it, is written. PLUS binds the proof to the
//!   server's certificate (`tls-server-end-point`): a man in the middle presents its own
//!   certificate, and the real server rejects the proof relayed through it.
//! - **Once SCRAM has started, it must finish.** AuthenticationOk counts only after
//!   AuthenticationSASLFinal carried the server's signature and it verified: that signature is
//!   the server's proof that it knows the password. Without it a server that does not know the
//!   password could let the client "in" and collect a proof to attack offline. libpq accepts
//!   such a partial exchange unless `channel_binding` or `require_auth` says otherwise;
//!   tokio-postgres, like this module, never does. SASLContinue and SASLFinal come once each,
//!   in that order; anything else in the middle of the exchange is refused.
//! - **The GS2 header** of the client-first-message says what the client knows about binding:
//!   `p=tls-server-end-point` when it binds; `y` when it could (TLS) but the server did not offer
//!   PLUS, so that a server that did offer it knows the offer was stripped on the way and
//!   refuses; `n` without TLS or with `channel_binding=disable`.
//!
//! Every refusal is an [`AuthError`] that says what to check. None of them, and nothing here,
//! ever contains the password. The module is pure (requests in, messages to send out); the
//! connection reads and writes, and caps the size of what it reads before authentication.

use std::fmt;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding as ScramChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;

use crate::conn::{
    ChannelBinding, PasswordPolicy, PasswordRequest, PgUrl, PlaintextPasswordRefused,
};

/// SASL mechanism names (RFC 7677 and PostgreSQL's channel-binding variant).
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Authentication request codes of the `'R'` message.
pub(super) const AUTH_OK: i32 = 0;
const AUTH_KERBEROS_V5: i32 = 2;
pub(super) const AUTH_CLEARTEXT: i32 = 3;
pub(super) const AUTH_MD5: i32 = 5;
const AUTH_SCM_CREDENTIAL: i32 = 6;
pub(super) const AUTH_GSS: i32 = 7;
const AUTH_GSS_CONTINUE: i32 = 8;
const AUTH_SSPI: i32 = 9;
pub(super) const AUTH_SASL: i32 = 10;
pub(super) const AUTH_SASL_CONTINUE: i32 = 11;
pub(super) const AUTH_SASL_FINAL: i32 = 12;

/// An authentication method other than SCRAM, named for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Cleartext,
    Md5,
    KerberosV5,
    ScmCredential,
    Gss,
    Sspi,
    Unknown(i32),
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthMethod::Cleartext => f.write_str("a cleartext password"),
            AuthMethod::Md5 => f.write_str("an md5 password hash"),
            AuthMethod::KerberosV5 => f.write_str("Kerberos V5 authentication"),
            AuthMethod::ScmCredential => f.write_str("SCM credentials"),
            AuthMethod::Gss => f.write_str("GSSAPI authentication"),
            AuthMethod::Sspi => f.write_str("SSPI authentication"),
            AuthMethod::Unknown(code) => write!(f, "authentication method {code}"),
        }
    }
}

/// Why the client refused to authenticate, or could not. Definite: retrying changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the server asked for {asked}, but channel_binding=require accepts only \
         SCRAM-SHA-256-PLUS, so usersync answered nothing; check that you are connecting to the \
         real server (something in between that terminates TLS, which sslmode=require does not \
         detect, would ask for exactly this) and that pg_hba.conf uses scram-sha-256 for this \
         user"
    )]
    NotChannelBound { asked: AuthMethod },
    #[error(
        "the server let usersync in without any authentication (trust), but \
         channel_binding=require needs the server to prove itself with SCRAM-SHA-256-PLUS; check \
         that you are connecting to the real server and that pg_hba.conf uses scram-sha-256 for \
         this user"
    )]
    Trust,
    #[error(
        "channel_binding=require, but the server offers {offered} without channel binding (no \
         SCRAM-SHA-256-PLUS) although the connection uses TLS, where PostgreSQL 11 and later \
         offer it; check that you are connecting to the real server and that nothing in between \
         terminates TLS"
    )]
    PlusNotOffered { offered: String },
    #[error(
        "channel_binding=require, but the connection is not encrypted (the server refused TLS, \
         which this sslmode allows) and channel binding needs TLS; use sslmode=verify-full"
    )]
    BindingNeedsTls,
    #[error(
        "the server offers channel binding, but its certificate is signed with an algorithm that \
         gives no tls-server-end-point hash (such as Ed25519), so usersync cannot bind to it; \
         give the server a certificate signed with RSA or ECDSA (or, to authenticate without \
         binding, set channel_binding=disable)"
    )]
    NoEndPoint,
    #[error(
        "the server offered SCRAM-SHA-256-PLUS on a connection without TLS, which PostgreSQL \
         never does: something in between may have stripped TLS; check that you are connecting \
         to the real server, and use sslmode=verify-full"
    )]
    PlusWithoutTls,
    #[error(
        "channel_binding=require, but the server completed authentication without channel \
         binding; check that you are connecting to the real server"
    )]
    Unbound,
    #[error(
        "the server reported success before completing SCRAM: it never sent its signature \
         (AuthenticationSASLFinal), the proof that it knows the password, which PostgreSQL always \
         sends; check that you are connecting to the real server"
    )]
    IncompleteScram,
    #[error(
        "the server's SCRAM signature is wrong: it did not prove that it knows the password; \
         check that you are connecting to the real server"
    )]
    WrongSignature(#[source] std::io::Error),
    #[error("the server's SCRAM challenge is invalid")]
    BadChallenge(#[source] std::io::Error),
    #[error(
        "the server sent {got} out of order (expected {expected}); check that you are connecting \
         to the real server"
    )]
    OutOfOrder { got: String, expected: &'static str },
    /// A cleartext or md5 password without TLS, to another machine, not allowed by the
    /// operator: the rule every connection follows ([`PasswordPolicy`]).
    #[error(transparent)]
    Plaintext(#[from] PlaintextPasswordRefused),
    #[error("the server asks for a password, but the URL has none")]
    NoPassword,
    #[error(
        "the server offers no SASL mechanism usersync supports ({offered}); use scram-sha-256 in \
         pg_hba.conf"
    )]
    NoSupportedMechanism { offered: String },
    #[error(
        "the server asks for {asked}, which usersync does not support; use scram-sha-256 in \
         pg_hba.conf"
    )]
    Unsupported { asked: AuthMethod },
    #[error("the server sent a malformed authentication request: {0}")]
    Malformed(&'static str),
    #[error("cannot encode the answer to the server")]
    Encode(#[source] std::io::Error),
}

/// One authentication request, decoded.
enum Request<'a> {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<&'a [u8]>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// A method usersync does not speak.
    Other(AuthMethod),
}

impl<'a> Request<'a> {
    /// Decodes the body of an `'R'` message.
    fn parse(body: &'a [u8]) -> Result<Self, AuthError> {
        let (code, data) = body
            .split_first_chunk::<4>()
            .ok_or(AuthError::Malformed("no request code"))?;
        Ok(match i32::from_be_bytes(*code) {
            AUTH_OK => Request::Ok,
            AUTH_CLEARTEXT => Request::Cleartext,
            AUTH_MD5 => Request::Md5 {
                salt: *data
                    .first_chunk::<4>()
                    .ok_or(AuthError::Malformed("md5 without salt"))?,
            },
            AUTH_SASL => Request::Sasl {
                mechanisms: data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect(),
            },
            AUTH_SASL_CONTINUE => Request::SaslContinue(data),
            AUTH_SASL_FINAL => Request::SaslFinal(data),
            AUTH_KERBEROS_V5 => Request::Other(AuthMethod::KerberosV5),
            AUTH_SCM_CREDENTIAL => Request::Other(AuthMethod::ScmCredential),
            AUTH_GSS | AUTH_GSS_CONTINUE => Request::Other(AuthMethod::Gss),
            AUTH_SSPI => Request::Other(AuthMethod::Sspi),
            code => Request::Other(AuthMethod::Unknown(code)),
        })
    }

    /// The method, for a request that asks for something other than SCRAM.
    fn non_scram_method(&self) -> Option<AuthMethod> {
        match self {
            Request::Cleartext => Some(AuthMethod::Cleartext),
            Request::Md5 { .. } => Some(AuthMethod::Md5),
            Request::Other(method) => Some(*method),
            Request::Ok
            | Request::Sasl { .. }
            | Request::SaslContinue(_)
            | Request::SaslFinal(_) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Request::Ok => "AuthenticationOk".into(),
            Request::Sasl { .. } => "AuthenticationSASL".into(),
            Request::SaslContinue(_) => "AuthenticationSASLContinue".into(),
            Request::SaslFinal(_) => "AuthenticationSASLFinal".into(),
            Request::Cleartext => format!("a request for {}", AuthMethod::Cleartext),
            Request::Md5 { .. } => format!("a request for {}", AuthMethod::Md5),
            Request::Other(method) => format!("a request for {method}"),
        }
    }
}

/// How far authentication has come.
enum Progress {
    /// No request answered yet.
    Started,
    /// A cleartext password or an md5 hash was sent; only AuthenticationOk may follow.
    PasswordSent,
    /// SASLInitialResponse sent; AuthenticationSASLContinue must follow.
    ScramStarted { scram: ScramSha256, bound: bool },
    /// The client's proof sent; AuthenticationSASLFinal must follow.
    ScramProofSent { scram: ScramSha256, bound: bool },
    /// The server's signature verified; AuthenticationOk must follow.
    ScramVerified { bound: bool },
    /// Accepted, or refused: no request is valid any more.
    Over,
}

impl Progress {
    fn expecting(&self) -> &'static str {
        match self {
            Progress::Started => "a request for credentials",
            Progress::PasswordSent | Progress::ScramVerified { .. } => "AuthenticationOk",
            Progress::ScramStarted { .. } => "AuthenticationSASLContinue",
            Progress::ScramProofSent { .. } => "AuthenticationSASLFinal",
            Progress::Over => "nothing more",
        }
    }
}

/// What the connection does after [`Authenticator::answer`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Send what was written (if anything) and read the next request.
    Continue,
    /// The server accepted the client, and the client accepts the server.
    Authenticated,
}

/// The client side of authentication for one connection.
pub(super) struct Authenticator<'a> {
    user: &'a str,
    password: Option<&'a str>,
    channel_binding: ChannelBinding,
    /// Whether a cleartext or md5 password may be sent at all.
    policy: PasswordPolicy,
    /// `None` without TLS; with TLS, the `tls-server-end-point` hash of the server's
    /// certificate, empty when its signature algorithm gives none.
    tls_end_point: Option<Vec<u8>>,
    progress: Progress,
}

impl<'a> Authenticator<'a> {
    pub(super) fn new(url: &'a PgUrl, tls_end_point: Option<Vec<u8>>) -> Self {
        Authenticator {
            user: &url.user,
            password: url.password().map(|p| p.expose()),
            channel_binding: url.channel_binding,
            policy: PasswordPolicy::of(url),
            tls_end_point,
            progress: Progress::Started,
        }
    }

    /// Answers one authentication request (the body of an `'R'` message), writing the answer
    /// to `out`. On an error `out` is left as it was: nothing is to be sent.
    pub(super) fn answer(&mut self, body: &[u8], out: &mut BytesMut) -> Result<Step, AuthError> {
        let unanswered = out.len();
        let step = self.answer_request(body, out);
        if step.is_err() {
            out.truncate(unanswered);
        }
        step
    }

    fn answer_request(&mut self, body: &[u8], out: &mut BytesMut) -> Result<Step, AuthError> {
        let request = Request::parse(body)?;
        let progress = std::mem::replace(&mut self.progress, Progress::Over);
        let require = self.channel_binding == ChannelBinding::Require;
        if let Request::Ok = request {
            return self.accept(progress);
        }
        if let (true, Some(asked)) = (require, request.non_scram_method()) {
            return Err(AuthError::NotChannelBound { asked });
        }
        self.progress = match (request, progress) {
            (Request::Cleartext, Progress::Started) => {
                self.policy
                    .check(PasswordRequest::Cleartext, self.tls_end_point.is_some())?;
                let password = self.password()?;
                frontend::password_message(password.as_bytes(), out).map_err(AuthError::Encode)?;
                Progress::PasswordSent
            }
            (Request::Md5 { salt }, Progress::Started) => {
                self.policy
                    .check(PasswordRequest::Md5, self.tls_end_point.is_some())?;
                let password = self.password()?;
                let hash = md5_hash(self.user.as_bytes(), password.as_bytes(), salt);
                frontend::password_message(hash.as_bytes(), out).map_err(AuthError::Encode)?;
                Progress::PasswordSent
            }
            (Request::Sasl { mechanisms }, Progress::Started) => {
                self.start_scram(&mechanisms, out)?
            }
            (Request::SaslContinue(challenge), Progress::ScramStarted { mut scram, bound }) => {
                scram.update(challenge).map_err(AuthError::BadChallenge)?;
                frontend::sasl_response(scram.message(), out).map_err(AuthError::Encode)?;
                Progress::ScramProofSent { scram, bound }
            }
            (Request::SaslFinal(outcome), Progress::ScramProofSent { mut scram, bound }) => {
                scram.finish(outcome).map_err(AuthError::WrongSignature)?;
                Progress::ScramVerified { bound }
            }
            (Request::Other(asked), Progress::Started) => {
                return Err(AuthError::Unsupported { asked })
            }
            (request, progress) => {
                return Err(AuthError::OutOfOrder {
                    got: request.describe(),
                    expected: progress.expecting(),
                })
            }
        };
        Ok(Step::Continue)
    }

    /// AuthenticationOk: accepted only after a complete exchange, and a bound one when
    /// channel binding is required.
    fn accept(&self, progress: Progress) -> Result<Step, AuthError> {
        let require = self.channel_binding == ChannelBinding::Require;
        match progress {
            Progress::Started if require => Err(AuthError::Trust),
            Progress::ScramVerified { bound: false } if require => Err(AuthError::Unbound),
            Progress::Started | Progress::PasswordSent | Progress::ScramVerified { .. } => {
                Ok(Step::Authenticated)
            }
            Progress::ScramStarted { .. } | Progress::ScramProofSent { .. } => {
                Err(AuthError::IncompleteScram)
            }
            Progress::Over => Err(AuthError::OutOfOrder {
                got: Request::Ok.describe(),
                expected: Progress::Over.expecting(),
            }),
        }
    }

    /// Picks the mechanism and channel binding from the server's offer and sends the
    /// client-first-message.
    fn start_scram(&self, mechanisms: &[&[u8]], out: &mut BytesMut) -> Result<Progress, AuthError> {
        let offers = |name: &str| mechanisms.contains(&name.as_bytes());
        // The GS2 header: `unsupported()` is 'n', `unrequested()` is 'y' (postgres-protocol).
        let (mechanism, binding, bound) = match (&self.tls_end_point, self.channel_binding) {
            (None, ChannelBinding::Require) => return Err(AuthError::BindingNeedsTls),
            // PostgreSQL offers PLUS only over TLS: TLS was stripped in between, and answering
            // would authenticate whoever stripped it (libpq refuses here too).
            (None, _) if offers(SCRAM_SHA_256_PLUS) => return Err(AuthError::PlusWithoutTls),
            // Nothing to bind to.
            (None, _) => (SCRAM_SHA_256, ScramChannelBinding::unsupported(), false),
            // 'n', as libpq sends: 'y' would tell a server that offered PLUS that the offer was
            // stripped on the way, and PostgreSQL refuses the connection.
            (Some(_), ChannelBinding::Disable) => {
                (SCRAM_SHA_256, ScramChannelBinding::unsupported(), false)
            }
            // A certificate without a tls-server-end-point hash cannot be bound to; libpq fails
            // here too. Falling back to 'n' would let a man in the middle with such a
            // certificate turn binding off without the real server noticing.
            (Some(end_point), _) if offers(SCRAM_SHA_256_PLUS) && end_point.is_empty() => {
                return Err(AuthError::NoEndPoint)
            }
            (Some(end_point), _) if offers(SCRAM_SHA_256_PLUS) => (
                SCRAM_SHA_256_PLUS,
                ScramChannelBinding::tls_server_end_point(end_point.clone()),
                true,
            ),
            (Some(_), ChannelBinding::Require) => {
                return Err(AuthError::PlusNotOffered {
                    offered: list(mechanisms),
                })
            }
            // The client could bind, the server did not offer it: 'y'.
            (Some(_), ChannelBinding::Prefer) => {
                (SCRAM_SHA_256, ScramChannelBinding::unrequested(), false)
            }
        };
        if !offers(mechanism) {
            return Err(AuthError::NoSupportedMechanism {
                offered: list(mechanisms),
            });
        }
        let password = self.password()?;
        let scram = ScramSha256::new(password.as_bytes(), binding);
        frontend::sasl_initial_response(mechanism, scram.message(), out)
            .map_err(AuthError::Encode)?;
        Ok(Progress::ScramStarted { scram, bound })
    }

    fn password(&self) -> Result<&'a str, AuthError> {
        self.password.ok_or(AuthError::NoPassword)
    }
}

/// The server's mechanism list, for errors.
fn list(mechanisms: &[&[u8]]) -> String {
    if mechanisms.is_empty() {
        return "no mechanism".into();
    }
    mechanisms
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: &[&str] = &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256];
    const PLAIN_ONLY: &[&str] = &[SCRAM_SHA_256];
    const END_POINT: &[u8] = &[0xab; 32];

    /// Answers an AuthenticationSASL offering `offered`; returns the mechanism chosen and the
    /// GS2 header of the client-first-message, or the refusal (with nothing written).
    fn first_message(
        settings: &str,
        tls_end_point: Option<&[u8]>,
        offered: &[&str],
    ) -> Result<(String, String), AuthError> {
        let url: PgUrl = format!("postgresql://u:pw@h/db?{settings}")
            .parse()
            .expect("test URL");
        let mut authenticator = Authenticator::new(&url, tls_end_point.map(<[u8]>::to_vec));
        let mut request = AUTH_SASL.to_be_bytes().to_vec();
        for mechanism in offered {
            request.extend_from_slice(mechanism.as_bytes());
            request.push(0);
        }
        request.push(0);
        let mut out = BytesMut::new();
        let answered = authenticator.answer(&request, &mut out);
        if let Err(error) = answered {
            assert!(out.is_empty(), "{error}: nothing may be sent");
            return Err(error);
        }
        // SASLInitialResponse: 'p', length, mechanism, NUL, length of the message, message.
        let body = &out[5..];
        let end = body.iter().position(|&b| b == 0).expect("mechanism");
        let mechanism = String::from_utf8(body[..end].to_vec()).expect("UTF-8");
        let message = String::from_utf8(body[end + 5..].to_vec()).expect("UTF-8");
        let header_end = message.match_indices(',').nth(1).expect("GS2 header").0;
        Ok((mechanism, message[..=header_end].to_owned()))
    }

    fn chose(mechanism: &str, header: &str) -> Result<(String, String), AuthError> {
        Ok((mechanism.to_owned(), header.to_owned()))
    }

    #[test]
    fn the_gs2_header_follows_libpq() {
        let tls = Some(END_POINT);
        let cases = [
            ("channel_binding=disable", tls, BOTH, SCRAM_SHA_256, "n,,"),
            (
                "channel_binding=disable",
                tls,
                PLAIN_ONLY,
                SCRAM_SHA_256,
                "n,,",
            ),
            (
                "channel_binding=prefer",
                tls,
                BOTH,
                SCRAM_SHA_256_PLUS,
                "p=tls-server-end-point,,",
            ),
            (
                "channel_binding=prefer",
                tls,
                PLAIN_ONLY,
                SCRAM_SHA_256,
                "y,,",
            ),
            (
                "channel_binding=require",
                tls,
                BOTH,
                SCRAM_SHA_256_PLUS,
                "p=tls-server-end-point,,",
            ),
            (
                "channel_binding=prefer",
                None,
                PLAIN_ONLY,
                SCRAM_SHA_256,
                "n,,",
            ),
            (
                "channel_binding=disable",
                None,
                PLAIN_ONLY,
                SCRAM_SHA_256,
                "n,,",
            ),
            // A certificate without a binding hash matters only if binding is wanted.
            (
                "channel_binding=disable",
                Some(&[][..]),
                BOTH,
                SCRAM_SHA_256,
                "n,,",
            ),
        ];
        for (settings, tls, offered, mechanism, header) in cases {
            assert_eq!(
                first_message(settings, tls, offered).map_err(|e| e.to_string()),
                chose(mechanism, header).map_err(|e| e.to_string()),
                "{settings}, TLS: {}, offered: {offered:?}",
                tls.is_some()
            );
        }
    }

    #[test]
    fn binding_that_cannot_happen_is_refused_before_answering() {
        let refused = |settings, tls, offered| first_message(settings, tls, offered).unwrap_err();
        assert!(matches!(
            refused("channel_binding=require", Some(END_POINT), PLAIN_ONLY),
            AuthError::PlusNotOffered { offered } if offered == "SCRAM-SHA-256"
        ));
        assert!(matches!(
            refused("channel_binding=require", None, PLAIN_ONLY),
            AuthError::BindingNeedsTls
        ));
        for settings in ["channel_binding=require", "channel_binding=prefer"] {
            assert!(matches!(
                refused(settings, Some(&[][..]), BOTH),
                AuthError::NoEndPoint
            ));
        }
        for settings in ["channel_binding=prefer", "channel_binding=disable"] {
            assert!(matches!(
                refused(settings, None, BOTH),
                AuthError::PlusWithoutTls
            ));
        }
        assert!(matches!(
            refused("channel_binding=prefer", Some(END_POINT), &["OAUTHBEARER"]),
            AuthError::NoSupportedMechanism { offered } if offered == "OAUTHBEARER"
        ));
    }
}
