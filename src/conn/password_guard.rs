//! A stream that stops tokio-postgres from answering a password request [`PasswordPolicy`]
//! refuses.
//!
//! tokio-postgres answers the server's authentication request itself, with no hook to decline
//! one, but it reads through whatever stream it is given (`Config::connect_raw`). So the stream
//! reads along while the startup is in plaintext, following the protocol
//! (<https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>):
//!
//! 1. If the client's first message was SSLRequest, the server's first byte answers it: `S`
//!    means everything after it is TLS, which this guard cannot read; a second guard inside
//!    the TLS stream ([`PasswordGuard::inside_tls`]) takes over there. Any other byte means
//!    plaintext follows: tokio-postgres takes every answer but `S` for "no TLS" and drops the
//!    byte, and so does this guard, to stay in step with what the client will parse.
//! 2. In plaintext, each backend message is a tag byte and a 4-byte length that counts itself.
//!    An `'R'` message's first four body bytes are the request code: 3 (cleartext) or 5 (md5)
//!    go to the policy; 0 (AuthenticationOk) ends authentication and the inspection.
//!
//! A refused request fails the read that completes its request code, with an `io::Error`
//! carrying [`PlaintextPasswordRefused`], and the bytes of that read are withdrawn: the client
//! never sees a complete request, so it never writes a PasswordMessage. Every later read and
//! write fails the same way.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::auth_policy::{PasswordPolicy, PasswordRequest, PlaintextPasswordRefused};

/// SSLRequest as the frontend sends it: length 8, then the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F];
/// The server's answers to SSLRequest.
const TLS_ACCEPTED: u8 = b'S';
/// The tag of Authentication* messages.
const AUTHENTICATION: u8 = b'R';
/// Authentication request codes.
const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
/// A tag byte and a 4-byte length.
const HEADER_LEN: usize = 5;
/// The length field counts itself.
const LENGTH_LEN: usize = 4;
/// An authentication message's body starts with its request code.
const REQUEST_CODE_LEN: usize = 4;

/// `inner`, with the password requests that `policy` refuses refused.
pub struct PasswordGuard<S> {
    inner: S,
    policy: PasswordPolicy,
    state: State,
    /// The first bytes the client wrote, until they show whether it sent SSLRequest.
    first_written: Vec<u8>,
    /// Whether `inner` is the TLS stream (the connection is encrypted).
    encrypted: bool,
}

enum State {
    /// Nothing read yet.
    Start,
    /// SSLRequest sent: the next byte read is the server's answer.
    AwaitingTlsAnswer,
    /// Plaintext backend messages, up to the end of authentication.
    Messages(MessageReader),
    /// TLS from here on, or authentication is over.
    PassThrough,
    /// A request was refused; the connection is dead.
    Refused(PlaintextPasswordRefused),
}

impl<S> PasswordGuard<S> {
    pub fn new(inner: S, policy: PasswordPolicy) -> Self {
        PasswordGuard {
            inner,
            policy,
            state: State::Start,
            first_written: Vec::with_capacity(SSL_REQUEST.len()),
            encrypted: false,
        }
    }

    /// A guard on the decrypted side of TLS, from the first message after the handshake.
    pub fn inside_tls(inner: S, policy: PasswordPolicy) -> Self {
        PasswordGuard {
            inner,
            policy,
            state: State::Messages(MessageReader::default()),
            first_written: Vec::new(),
            encrypted: true,
        }
    }

    /// Follows the startup through bytes the server just sent.
    fn inspect(&mut self, mut bytes: &[u8]) -> Result<(), PlaintextPasswordRefused> {
        loop {
            match &mut self.state {
                State::PassThrough => return Ok(()),
                State::Refused(refusal) => return Err(refusal.clone()),
                State::Start => {
                    self.state = if self.first_written[..] == SSL_REQUEST {
                        State::AwaitingTlsAnswer
                    } else {
                        State::Messages(MessageReader::default())
                    };
                }
                State::AwaitingTlsAnswer => {
                    let Some((&answer, rest)) = bytes.split_first() else {
                        return Ok(());
                    };
                    if answer == TLS_ACCEPTED {
                        self.state = State::PassThrough;
                        return Ok(());
                    }
                    // `N`, or any other byte, which the client drops as it drops `N`.
                    self.state = State::Messages(MessageReader::default());
                    bytes = rest;
                }
                State::Messages(reader) => {
                    let policy = &self.policy;
                    let encrypted = self.encrypted;
                    let mut verdict = Ok(());
                    let mut authenticated = false;
                    reader.feed(bytes, |code| match code {
                        AUTH_OK => {
                            authenticated = true;
                            false
                        }
                        AUTH_CLEARTEXT | AUTH_MD5 => {
                            let request = if code == AUTH_CLEARTEXT {
                                PasswordRequest::Cleartext
                            } else {
                                PasswordRequest::Md5
                            };
                            verdict = policy.check(request, encrypted);
                            verdict.is_ok()
                        }
                        // SASL and its continuations, or methods the client will refuse itself.
                        _ => true,
                    });
                    if let Err(refusal) = &verdict {
                        self.state = State::Refused(refusal.clone());
                    } else if authenticated {
                        self.state = State::PassThrough;
                    }
                    return verdict;
                }
            }
        }
    }

    fn refusal(&self) -> Option<io::Error> {
        match &self.state {
            State::Refused(refusal) => Some(refused(refusal.clone())),
            _ => None,
        }
    }
}

fn refused(refusal: PlaintextPasswordRefused) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, refusal)
}

impl<S: AsyncRead + Unpin> AsyncRead for PasswordGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.refusal() {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if let State::PassThrough = self.state {
            return Poll::Ready(Ok(()));
        }
        if let Err(refusal) = self.inspect(&buf.filled()[before..]) {
            // Withdraw the bytes, so that not even a careless caller sees the request.
            buf.set_filled(before);
            return Poll::Ready(Err(refused(refusal)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PasswordGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.refusal() {
            return Poll::Ready(Err(error));
        }
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        if let State::Start = self.state {
            let wanted = SSL_REQUEST.len().saturating_sub(self.first_written.len());
            let take = wanted.min(written);
            self.first_written.extend_from_slice(&buf[..take]);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// tokio-postgres asks its TLS stream for the channel-binding data; the guard passes it on.
impl<S: tokio_postgres::tls::TlsStream + Unpin> tokio_postgres::tls::TlsStream
    for PasswordGuard<S>
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.inner.channel_binding()
    }
}

/// Finds backend message boundaries in bytes split anywhere, keeping only the current message's
/// header and, for an authentication message, its request code.
#[derive(Debug, Default)]
struct MessageReader {
    header: [u8; HEADER_LEN],
    header_len: usize,
    body_left: usize,
    code: [u8; REQUEST_CODE_LEN],
    code_len: usize,
}

impl MessageReader {
    /// Reads `bytes`, calling `on_request_code` with the request code of each authentication
    /// message as soon as the code is complete (before the message is: a client acts only on
    /// whole messages); it returns whether to read on.
    fn feed(&mut self, mut bytes: &[u8], mut on_request_code: impl FnMut(u32) -> bool) {
        while !bytes.is_empty() {
            if self.header_len < HEADER_LEN {
                let take = (HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == HEADER_LEN {
                    let [_, length @ ..] = self.header;
                    // A length under 4 is a violation the client reports; taking the body as
                    // empty keeps the reader on message boundaries until it does.
                    self.body_left = usize::try_from(u32::from_be_bytes(length))
                        .unwrap_or(usize::MAX)
                        .saturating_sub(LENGTH_LEN);
                    self.code_len = 0;
                    if self.body_left == 0 {
                        self.header_len = 0;
                    }
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            let (body, rest) = bytes.split_at(take);
            bytes = rest;
            self.body_left -= take;
            if self.header[0] == AUTHENTICATION && self.code_len < REQUEST_CODE_LEN {
                let code_take = (REQUEST_CODE_LEN - self.code_len).min(body.len());
                self.code[self.code_len..self.code_len + code_take]
                    .copy_from_slice(&body[..code_take]);
                self.code_len += code_take;
                if self.code_len == REQUEST_CODE_LEN
                    && !on_request_code(u32::from_be_bytes(self.code))
                {
                    return;
                }
            }
            if self.body_left == 0 {
                self.header_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::conn::PgUrl;

    const STARTUP: &[u8] = b"\0\0\0\x08\0\x03\0\0";

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let length = u32::try_from(body.len() + LENGTH_LEN).expect("small message");
        [&[tag][..], &length.to_be_bytes(), body].concat()
    }

    fn authentication(code: u32, data: &[u8]) -> Vec<u8> {
        message(AUTHENTICATION, &[&code.to_be_bytes()[..], data].concat())
    }

    fn policy(host: &str) -> PasswordPolicy {
        let url: PgUrl = format!("postgresql://u:pw@{host}/db")
            .parse()
            .expect("test URL");
        PasswordPolicy::of(&url)
    }

    /// The client writes `first` through the guard; the server then sends `from_server`, at most
    /// `chunk` bytes a read. Returns what the client read, and the error that ended reading.
    async fn read_through(
        policy: PasswordPolicy,
        first: &[u8],
        from_server: Vec<u8>,
        chunk: usize,
    ) -> (Vec<u8>, Option<io::Error>) {
        let (client, mut server) = tokio::io::duplex(chunk);
        let expected = first.len();
        let server = tokio::spawn(async move {
            let mut request = vec![0; expected];
            server.read_exact(&mut request).await?;
            // Dropped after writing: the client reads what is buffered, then end of file.
            server.write_all(&from_server).await
        });
        let mut guard = PasswordGuard::new(client, policy);
        guard.write_all(first).await.expect("write");
        let mut seen = Vec::new();
        let mut buf = [0; 64];
        let error = loop {
            match guard.read(&mut buf).await {
                Ok(0) => break None,
                Ok(read) => seen.extend_from_slice(&buf[..read]),
                Err(error) => break Some(error),
            }
        };
        server.abort();
        (seen, error)
    }

    fn refusal_of(error: Option<io::Error>) -> PlaintextPasswordRefused {
        let error = error.expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<PlaintextPasswordRefused>())
            .cloned()
            .expect("a typed refusal")
    }

    #[tokio::test]
    async fn cleartext_and_md5_without_tls_are_refused_before_the_client_sees_them() {
        let scram = authentication(10, b"SCRAM-SHA-256\0\0");
        for (code, data, request) in [
            (AUTH_CLEARTEXT, &b""[..], PasswordRequest::Cleartext),
            (AUTH_MD5, &b"salt"[..], PasswordRequest::Md5),
        ] {
            let ask = authentication(code, data);
            let cases = [
                // sslmode=disable: no SSLRequest, messages from the first byte.
                (STARTUP, ask.clone()),
                // prefer/allow, and the server (or someone in between) declines TLS.
                (&SSL_REQUEST[..], [&b"N"[..], &ask].concat()),
                // An earlier notice and a SASL offer the client could not use.
                (
                    &SSL_REQUEST[..],
                    [&b"N"[..], &message(b'N', b"SNOTICE\0\0"), &scram, &ask].concat(),
                ),
            ];
            for (first, from_server) in cases {
                // Every split of the server's bytes, down to one byte a read.
                for chunk in [1, 2, 3, 5, 64] {
                    let (seen, error) =
                        read_through(policy("db.example.com"), first, from_server.clone(), chunk)
                            .await;
                    let refusal = refusal_of(error);
                    assert_eq!(refusal.request, request);
                    assert_eq!(refusal.host, "db.example.com");
                    // The client never holds the complete request code.
                    let code_end = from_server.len() - data.len();
                    assert!(seen.len() < code_end, "{chunk}: saw {seen:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn allowed_requests_and_everything_inside_tls_pass_unchanged() {
        let cleartext = authentication(AUTH_CLEARTEXT, b"");
        let md5 = authentication(AUTH_MD5, b"salt");
        let after_ok = [
            authentication(AUTH_OK, b""),
            message(b'Z', b"I"),
            // Not a request any more: after AuthenticationOk nothing is inspected.
            cleartext.clone(),
        ]
        .concat();
        let allowed = {
            let mut url: PgUrl = "postgresql://u:pw@db.example.com/db"
                .parse()
                .expect("test URL");
            url.allow_plaintext_password = true;
            PasswordPolicy::of(&url)
        };
        let cases = [
            // This machine.
            (policy("127.0.0.1"), STARTUP, cleartext.clone()),
            (
                policy("localhost"),
                &SSL_REQUEST[..],
                [&b"N"[..], &md5].concat(),
            ),
            // The operator's opt-in.
            (allowed.clone(), STARTUP, [&md5[..], &after_ok].concat()),
            // TLS: the bytes after `S` are TLS records, whatever they look like.
            (
                policy("db.example.com"),
                &SSL_REQUEST[..],
                [&b"S"[..], &cleartext].concat(),
            ),
            // SCRAM, then the end of authentication.
            (
                policy("db.example.com"),
                STARTUP,
                [&authentication(10, b"SCRAM-SHA-256\0\0")[..], &after_ok].concat(),
            ),
            // An old server answering SSLRequest with an error.
            (
                policy("db.example.com"),
                &SSL_REQUEST[..],
                message(b'E', b"SFATAL\0Munsupported frontend protocol\0\0"),
            ),
        ];
        for (policy, first, from_server) in cases {
            for chunk in [1, 4, 64] {
                let (seen, error) =
                    read_through(policy.clone(), first, from_server.clone(), chunk).await;
                assert!(error.is_none(), "{error:?}");
                assert_eq!(seen, from_server);
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connection_stays_refused_and_writes_nothing() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut guard = PasswordGuard::new(client, policy("db.example.com"));
        guard.write_all(STARTUP).await.expect("startup");
        server
            .write_all(&authentication(AUTH_CLEARTEXT, b""))
            .await
            .expect("request");
        let mut buf = [0; 64];
        refusal_of(guard.read(&mut buf).await.err());
        refusal_of(guard.read(&mut buf).await.err());
        refusal_of(guard.write_all(b"p\0\0\0\x07pw\0").await.err());
        drop(guard);
        let mut written = Vec::new();
        server.read_to_end(&mut written).await.expect("read");
        assert_eq!(written, STARTUP, "nothing after the startup message");
    }
}
