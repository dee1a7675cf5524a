//! The replication client against a hostile fake source.
//!
//! The fake server speaks just enough of the protocol (SSLRequest and TLS, StartupMessage, the
//! authentication requests, ReadyForQuery) to ask for what an attacker would: a cleartext
//! password, an md5 hash, `trust`, a SCRAM exchange it cannot finish honestly, a giant message.
//! It records every byte the client writes (after TLS, in the clear, as a man in the middle
//! that terminates TLS sees them) and the tests assert that no secret reached the socket, the
//! way PostgreSQL's own `src/test/ssl/t/002_scram.pl` and `src/test/authentication/` test libpq.
//! It can also run an honest SCRAM exchange, which checks the client's proof and signs with the
//! password: that shows what GS2 header and channel binding the client chose.

use std::num::NonZeroU32;
use std::sync::OnceLock;

use ring::{digest, hmac, pbkdf2};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::auth::{
    AUTH_CLEARTEXT, AUTH_GSS, AUTH_MD5, AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
};
use super::*;
use crate::conn::test_pki::{self, TestPki};

const USER: &str = "replicator";
/// Planted in every URL: no byte sequence of it, or of its md5 forms, may reach the server
/// unless the test expects the client to send it.
const PASSWORD: &str = "planted-Pa55word-7f3c";
/// The salt of the fake server's md5 request.
const MD5_SALT: [u8; 4] = [0x5a, 0x17, 0xc0, 0xde];
/// The fake server's SCRAM parameters (the iteration count is PostgreSQL's default).
const SALT: &[u8] = b"fake-server-salt";
const ITERATIONS: u32 = 4096;
const SERVER_NONCE: &str = "fakeServerNonce";
/// `SSLRequest`'s protocol code (1234.5679).
const SSL_REQUEST_CODE: u32 = 80_877_103;
/// A client that neither fails nor succeeds by then is waiting for something it should not.
const WAIT: Duration = Duration::from_secs(10);

/// What the fake server does after the StartupMessage.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// AuthenticationCleartextPassword; AuthenticationOk for whatever comes back.
    Cleartext,
    /// AuthenticationMD5Password; AuthenticationOk for whatever comes back.
    Md5,
    /// AuthenticationOk at once, as `trust` in pg_hba.conf does.
    Trust,
    /// AuthenticationGSS, which usersync does not speak.
    Gss,
    /// AuthenticationSASL offering these mechanisms, then the exchange ends as [`Finish`] says.
    Scram(&'static [&'static str], Finish),
    /// SASLContinue with no SASL exchange started.
    ContinueFirst,
    /// SASLFinal right after the client's first message, skipping SASLContinue.
    FinalFirst,
    /// A SCRAM exchange, then a request for an md5 hash in the middle of it.
    Md5DuringScram,
    /// The header of a 1 GiB authentication request, and then nothing.
    HugeFrame,
}

/// How the fake server ends a SCRAM exchange after the client's final message.
#[derive(Clone, Copy, Debug)]
enum Finish {
    /// SASLFinal with the signature made from the password, AuthenticationOk, ReadyForQuery.
    Honestly,
    /// AuthenticationOk without SASLFinal: the server never proves that it knows the password.
    OkBeforeFinal,
    /// SASLFinal with a signature made without the password, then AuthenticationOk.
    WrongSignature,
}

const BOTH: &[&str] = &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"];
const PLAIN_ONLY: &[&str] = &["SCRAM-SHA-256"];

/// What the client wrote to the fake server.
#[derive(Debug, Default)]
struct Recorded {
    /// Every byte, in the clear (TLS decrypted).
    bytes: Vec<u8>,
    /// Where the StartupMessage ends in `bytes`.
    startup_end: usize,
    /// The mechanism and the client-first-message of the client's SASLInitialResponse.
    sasl_initial: Option<(String, String)>,
    /// The client's client-final-message.
    client_final: Option<String>,
    /// Whether the client's SCRAM proof was made with the planted password.
    proof_verified: bool,
}

impl Recorded {
    /// What the client wrote after its StartupMessage.
    fn after_startup(&self) -> &[u8] {
        &self.bytes[self.startup_end..]
    }

    fn gs2_header(&self) -> &str {
        let (_, client_first) = self.sasl_initial.as_ref().expect("a SASLInitialResponse");
        let end = client_first
            .match_indices(',')
            .nth(1)
            .expect("a GS2 header")
            .0;
        &client_first[..=end]
    }
}

/// The fake server's side of one connection.
struct Peer {
    io: Box<dyn AsyncStream>,
    record: Recorded,
}

impl Peer {
    async fn read_exact(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.io.read_exact(&mut buf).await?;
        self.record.bytes.extend_from_slice(&buf);
        Ok(buf)
    }

    /// One frontend message: its tag and body.
    async fn read_message(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let header = self.read_exact(5).await?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let body = self.read_exact(len.saturating_sub(4)).await?;
        Ok((header[0], body))
    }

    async fn send(&mut self, tag: u8, body: &[u8]) -> std::io::Result<()> {
        let mut message = vec![tag];
        message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        message.extend_from_slice(body);
        self.io.write_all(&message).await?;
        self.io.flush().await
    }

    async fn send_auth(&mut self, code: i32, data: &[u8]) -> std::io::Result<()> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        self.send(b'R', &body).await
    }

    /// AuthenticationOk and ReadyForQuery: the end of a successful startup.
    async fn let_in(&mut self) -> std::io::Result<()> {
        self.send_auth(AUTH_OK, &[]).await?;
        self.send(b'Z', b"I").await
    }

    /// Records whatever else the client writes, until it hangs up.
    async fn drain(&mut self) {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, self.io.read_to_end(&mut rest)).await;
        self.record.bytes.extend_from_slice(&rest);
    }
}

/// The fake server's certificate (from the test PKI) and its `tls-server-end-point` hash.
fn tls_identity() -> &'static (Arc<ServerConfig>, Vec<u8>) {
    static IDENTITY: OnceLock<(Arc<ServerConfig>, Vec<u8>)> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        // The PKI's directory goes when `pki` drops; the configuration holds the DER.
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let der = CertificateDer::pem_file_iter(&cert.cert)
            .expect("open the certificate")
            .next()
            .expect("a certificate")
            .expect("read the certificate");
        let end_point = tls::tls_server_end_point(der.as_ref()).expect("an ECDSA certificate");
        (test_pki::server_config(&cert), end_point)
    })
}

/// A fake source on a free loopback port that plays `scenario` with one client; `tls` says
/// whether it accepts an SSLRequest. The task returns what the client wrote.
async fn start_fake_source(scenario: Scenario, tls: bool) -> (u16, JoinHandle<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        let mut peer = match accept(&listener, tls).await {
            Ok(peer) => peer,
            Err(error) => panic!("the fake source could not accept the client: {error}"),
        };
        // The client hanging up midway is the point of most scenarios, not a failure.
        let _ = play(&mut peer, scenario).await;
        peer.drain().await;
        peer.record
    });
    (port, task)
}

/// Accepts one client: SSLRequest (answered `S` and TLS, or `N`), then the StartupMessage.
async fn accept(listener: &TcpListener, tls: bool) -> std::io::Result<Peer> {
    let (mut tcp, _) = listener.accept().await?;
    let mut head = [0_u8; 8];
    tcp.read_exact(&mut head).await?;
    let ssl_request = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) == SSL_REQUEST_CODE;
    let io: Box<dyn AsyncStream> = match (ssl_request, tls) {
        (true, true) => {
            tcp.write_all(b"S").await?;
            let acceptor = TlsAcceptor::from(Arc::clone(&tls_identity().0));
            Box::new(acceptor.accept(tcp).await?)
        }
        (true, false) => {
            tcp.write_all(b"N").await?;
            Box::new(tcp)
        }
        (false, _) => Box::new(tcp),
    };
    let mut peer = Peer {
        io,
        record: Recorded {
            bytes: head.to_vec(),
            ..Recorded::default()
        },
    };
    let header = if ssl_request {
        peer.read_exact(8).await?
    } else {
        head.to_vec()
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    peer.read_exact(len.saturating_sub(8)).await?;
    peer.record.startup_end = peer.record.bytes.len();
    Ok(peer)
}

async fn play(peer: &mut Peer, scenario: Scenario) -> std::io::Result<()> {
    match scenario {
        Scenario::Cleartext => {
            peer.send_auth(AUTH_CLEARTEXT, &[]).await?;
            peer.read_message().await?;
            peer.let_in().await
        }
        Scenario::Md5 => {
            peer.send_auth(AUTH_MD5, &MD5_SALT).await?;
            peer.read_message().await?;
            peer.let_in().await
        }
        Scenario::Trust => peer.let_in().await,
        Scenario::Gss => {
            peer.send_auth(AUTH_GSS, &[]).await?;
            peer.read_message().await?;
            peer.let_in().await
        }
        Scenario::Scram(mechanisms, finish) => {
            let auth_message = scram_until_client_final(peer, mechanisms).await?;
            match finish {
                Finish::Honestly => {
                    let signature = server_signature(PASSWORD.as_bytes(), &auth_message);
                    let message = format!("v={}", base64(&signature));
                    peer.send_auth(AUTH_SASL_FINAL, message.as_bytes()).await?;
                }
                Finish::OkBeforeFinal => {}
                Finish::WrongSignature => {
                    let signature = server_signature(b"not the password", &auth_message);
                    let message = format!("v={}", base64(&signature));
                    peer.send_auth(AUTH_SASL_FINAL, message.as_bytes()).await?;
                }
            }
            peer.let_in().await
        }
        Scenario::ContinueFirst => {
            peer.send_auth(AUTH_SASL_CONTINUE, b"r=abc,s=c2FsdA==,i=4096")
                .await?;
            peer.read_message().await?;
            peer.let_in().await
        }
        Scenario::FinalFirst => {
            peer.send_auth(AUTH_SASL, &mechanism_list(PLAIN_ONLY))
                .await?;
            read_sasl_initial(peer).await?;
            peer.send_auth(AUTH_SASL_FINAL, b"v=c2lnbmF0dXJl").await?;
            peer.let_in().await
        }
        Scenario::Md5DuringScram => {
            peer.send_auth(AUTH_SASL, &mechanism_list(PLAIN_ONLY))
                .await?;
            read_sasl_initial(peer).await?;
            peer.send_auth(AUTH_MD5, &MD5_SALT).await?;
            peer.read_message().await?;
            peer.let_in().await
        }
        Scenario::HugeFrame => {
            // 'R', length 1 GiB, and the start of an AuthenticationOk that never ends.
            let mut header = vec![b'R'];
            header.extend_from_slice(&(1_u32 << 30).to_be_bytes());
            header.extend_from_slice(&0_i32.to_be_bytes());
            peer.io.write_all(&header).await?;
            peer.io.flush().await
        }
    }
}

/// The SASL mechanism list of an AuthenticationSASL request.
fn mechanism_list(mechanisms: &[&str]) -> Vec<u8> {
    let mut list = Vec::new();
    for mechanism in mechanisms {
        list.extend_from_slice(mechanism.as_bytes());
        list.push(0);
    }
    list.push(0);
    list
}

/// Reads a SASLInitialResponse; returns its client-first-message.
async fn read_sasl_initial(peer: &mut Peer) -> std::io::Result<String> {
    let (tag, body) = peer.read_message().await?;
    assert_eq!(tag, b'p', "a SASLInitialResponse");
    let end = body.iter().position(|&b| b == 0).expect("a mechanism name");
    let mechanism = String::from_utf8(body[..end].to_vec()).expect("UTF-8");
    let client_first = String::from_utf8(body[end + 5..].to_vec()).expect("UTF-8");
    peer.record.sasl_initial = Some((mechanism, client_first.clone()));
    Ok(client_first)
}

/// Runs SCRAM (RFC 5802) as a server up to the client-final-message, checking the client's
/// proof; returns the AuthMessage that both signatures sign.
async fn scram_until_client_final(peer: &mut Peer, mechanisms: &[&str]) -> std::io::Result<String> {
    peer.send_auth(AUTH_SASL, &mechanism_list(mechanisms))
        .await?;
    let client_first = read_sasl_initial(peer).await?;
    let bare_start = client_first
        .match_indices(',')
        .nth(1)
        .expect("GS2 header")
        .0
        + 1;
    let client_first_bare = &client_first[bare_start..];
    let client_nonce = client_first_bare
        .split(',')
        .find_map(|attribute| attribute.strip_prefix("r="))
        .expect("a client nonce");
    let server_first = format!(
        "r={client_nonce}{SERVER_NONCE},s={},i={ITERATIONS}",
        base64(SALT)
    );
    peer.send_auth(AUTH_SASL_CONTINUE, server_first.as_bytes())
        .await?;
    let (tag, body) = peer.read_message().await?;
    assert_eq!(tag, b'p', "a SASLResponse");
    let client_final = String::from_utf8(body).expect("UTF-8");
    let (without_proof, proof) = client_final.rsplit_once(",p=").expect("a proof");
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    peer.record.proof_verified = proof == base64(&client_proof(PASSWORD.as_bytes(), &auth_message));
    peer.record.client_final = Some(client_final.clone());
    Ok(auth_message)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn salted_password(password: &[u8]) -> [u8; 32] {
    let mut salted = [0; 32];
    let iterations = NonZeroU32::new(ITERATIONS).expect("non-zero");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        SALT,
        password,
        &mut salted,
    );
    salted
}

/// ServerSignature := HMAC(HMAC(SaltedPassword, "Server Key"), AuthMessage).
fn server_signature(password: &[u8], auth_message: &str) -> Vec<u8> {
    let server_key = hmac_sha256(&salted_password(password), b"Server Key");
    hmac_sha256(&server_key, auth_message.as_bytes())
}

/// ClientProof := ClientKey XOR HMAC(H(ClientKey), AuthMessage).
fn client_proof(password: &[u8], auth_message: &str) -> Vec<u8> {
    let client_key = hmac_sha256(&salted_password(password), b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, &client_key);
    let signature = hmac_sha256(stored_key.as_ref(), auth_message.as_bytes());
    client_key
        .iter()
        .zip(signature)
        .map(|(k, s)| k ^ s)
        .collect()
}

/// Standard base64 with padding, as SCRAM uses it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let triple = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(triple >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Connects to a fake source playing `scenario` with these URL settings; returns how the
/// connection ended and what the client wrote.
async fn connect_to(
    scenario: Scenario,
    server_tls: bool,
    settings: &str,
) -> (Result<(), ReplicationError>, Recorded) {
    let (port, server) = start_fake_source(scenario, server_tls).await;
    let url: PgUrl = format!("postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/db?{settings}")
        .parse()
        .expect("test URL");
    let outcome = tokio::time::timeout(WAIT, ReplicationConnection::connect(&url, "usersync-test"))
        .await
        .unwrap_or_else(|_| {
            panic!("{scenario:?} with {settings}: the client neither failed nor succeeded")
        });
    let outcome = match outcome {
        Ok(conn) => {
            conn.close().await;
            Ok(())
        }
        Err(error) => Err(error),
    };
    (outcome, server.await.expect("the fake source"))
}

/// The password, and both md5 forms of it (the stored `md5(password || user)` that logs a
/// user in by itself, and the salted answer to the fake server's request), in hex.
fn secrets() -> Vec<String> {
    let stored = postgres_protocol::password::md5(PASSWORD.as_bytes(), USER);
    let salted =
        postgres_protocol::authentication::md5_hash(USER.as_bytes(), PASSWORD.as_bytes(), MD5_SALT);
    vec![
        PASSWORD.to_owned(),
        stored.trim_start_matches("md5").to_owned(),
        salted.trim_start_matches("md5").to_owned(),
    ]
}

fn assert_no_secret_sent(recorded: &Recorded) {
    for secret in secrets() {
        assert!(
            !recorded
                .bytes
                .windows(secret.len())
                .any(|window| window == secret.as_bytes()),
            "the client wrote {secret:?} to the socket"
        );
    }
}

/// The connection failed with a definite error that says `expected` (and not the password).
fn assert_refused(outcome: Result<(), ReplicationError>, expected: &str) -> ReplicationError {
    let error = outcome.expect_err("the client must refuse");
    let report = crate::error::report(&error);
    assert!(
        report.contains(expected),
        "expected {expected:?} in: {report}"
    );
    assert!(!report.contains(PASSWORD), "{report}");
    assert!(!error.is_transient(), "a refusal is definite: {report}");
    error
}

/// Refused with `expected`, having written nothing at all after the StartupMessage.
async fn assert_refused_before_answering(scenario: Scenario, settings: &str, expected: &str) {
    let (outcome, recorded) = connect_to(scenario, true, settings).await;
    assert_no_secret_sent(&recorded);
    assert!(
        recorded.after_startup().is_empty(),
        "{scenario:?} with {settings}: the client answered with {:?}",
        String::from_utf8_lossy(recorded.after_startup())
    );
    assert_refused(outcome, expected);
}

const REQUIRE: &str = "sslmode=require&channel_binding=require";

// ---------------------------------------------------------------------------------------------
// channel_binding=require answers nothing but SCRAM-SHA-256-PLUS

#[tokio::test]
async fn require_refuses_a_cleartext_request_before_sending_the_password() {
    assert_refused_before_answering(
        Scenario::Cleartext,
        REQUIRE,
        "the server asked for a cleartext password, but channel_binding=require",
    )
    .await;
}

#[tokio::test]
async fn require_refuses_an_md5_request_before_sending_the_hash() {
    assert_refused_before_answering(
        Scenario::Md5,
        REQUIRE,
        "the server asked for an md5 password hash, but channel_binding=require",
    )
    .await;
}

#[tokio::test]
async fn require_refuses_md5_on_a_connection_the_server_kept_unencrypted() {
    // sslmode=prefer lets a server (or whoever answers) refuse TLS.
    let settings = "sslmode=prefer&channel_binding=require";
    let (outcome, recorded) = connect_to(Scenario::Md5, false, settings).await;
    assert_no_secret_sent(&recorded);
    assert!(recorded.after_startup().is_empty());
    assert_refused(
        outcome,
        "the server asked for an md5 password hash, but channel_binding=require",
    );
}

#[tokio::test]
async fn require_refuses_trust() {
    assert_refused_before_answering(
        Scenario::Trust,
        REQUIRE,
        "without any authentication (trust), but channel_binding=require",
    )
    .await;
}

#[tokio::test]
async fn require_refuses_gssapi() {
    assert_refused_before_answering(
        Scenario::Gss,
        REQUIRE,
        "the server asked for GSSAPI authentication, but channel_binding=require",
    )
    .await;
}

#[tokio::test]
async fn require_refuses_scram_without_channel_binding() {
    assert_refused_before_answering(
        Scenario::Scram(PLAIN_ONLY, Finish::Honestly),
        REQUIRE,
        "the server offers SCRAM-SHA-256 without channel binding",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// SCRAM counts only when complete: the server must prove that it knows the password

#[tokio::test]
async fn success_before_the_servers_signature_is_refused() {
    for settings in [
        "sslmode=require&channel_binding=prefer",
        REQUIRE,
        "sslmode=require&channel_binding=disable",
    ] {
        let (outcome, recorded) =
            connect_to(Scenario::Scram(BOTH, Finish::OkBeforeFinal), true, settings).await;
        assert_no_secret_sent(&recorded);
        assert_refused(
            outcome,
            "the server reported success before completing SCRAM",
        );
    }
}

#[tokio::test]
async fn a_wrong_server_signature_is_refused() {
    let (outcome, recorded) = connect_to(
        Scenario::Scram(BOTH, Finish::WrongSignature),
        true,
        "sslmode=require",
    )
    .await;
    assert_no_secret_sent(&recorded);
    assert_refused(outcome, "the server's SCRAM signature is wrong");
}

#[tokio::test]
async fn scram_messages_out_of_order_are_refused() {
    for scenario in [Scenario::ContinueFirst, Scenario::FinalFirst] {
        let (outcome, recorded) = connect_to(scenario, true, "sslmode=require").await;
        assert_no_secret_sent(&recorded);
        assert_refused(outcome, "out of order");
    }
}

#[tokio::test]
async fn a_password_request_in_the_middle_of_scram_is_refused() {
    let (outcome, recorded) = connect_to(Scenario::Md5DuringScram, true, "sslmode=require").await;
    assert_no_secret_sent(&recorded);
    assert_refused(outcome, "out of order");
}

// ---------------------------------------------------------------------------------------------
// Message sizes before authentication

#[tokio::test]
async fn a_giant_message_before_authentication_is_refused_without_allocating() {
    let (outcome, recorded) = connect_to(Scenario::HugeFrame, true, "sslmode=require").await;
    assert_no_secret_sent(&recorded);
    assert_refused(outcome, "before authentication");
}

// ---------------------------------------------------------------------------------------------
// What the client says about channel binding (the GS2 header), as libpq does

/// Runs an honest SCRAM exchange offering `mechanisms`; returns what the client wrote.
async fn honest_scram(mechanisms: &'static [&'static str], tls: bool, settings: &str) -> Recorded {
    let (outcome, recorded) =
        connect_to(Scenario::Scram(mechanisms, Finish::Honestly), tls, settings).await;
    if let Err(error) = outcome {
        panic!("{settings}: {}", crate::error::report(&error));
    }
    assert!(
        recorded.proof_verified,
        "{settings}: the client's proof is made with the password"
    );
    recorded
}

#[tokio::test]
async fn require_binds_to_the_servers_certificate() {
    let recorded = honest_scram(BOTH, true, REQUIRE).await;
    let (mechanism, _) = recorded.sasl_initial.as_ref().unwrap();
    assert_eq!(mechanism, "SCRAM-SHA-256-PLUS");
    assert_eq!(recorded.gs2_header(), "p=tls-server-end-point,,");
    // c= carries the GS2 header and the hash of the certificate this server presented.
    let mut binding = b"p=tls-server-end-point,,".to_vec();
    binding.extend_from_slice(&tls_identity().1);
    let client_final = recorded.client_final.as_deref().unwrap();
    assert!(
        client_final.starts_with(&format!("c={},", base64(&binding))),
        "{client_final}"
    );
}

#[tokio::test]
async fn prefer_binds_when_the_server_offers_plus() {
    let recorded = honest_scram(BOTH, true, "sslmode=require").await;
    assert_eq!(
        recorded.sasl_initial.as_ref().unwrap().0,
        "SCRAM-SHA-256-PLUS"
    );
    assert_eq!(recorded.gs2_header(), "p=tls-server-end-point,,");
}

#[tokio::test]
async fn prefer_over_tls_without_plus_offered_says_binding_was_not_offered() {
    let recorded = honest_scram(PLAIN_ONLY, true, "sslmode=require").await;
    assert_eq!(recorded.sasl_initial.as_ref().unwrap().0, "SCRAM-SHA-256");
    // 'y': the client could bind; a real server that did offer PLUS then detects the downgrade.
    assert_eq!(recorded.gs2_header(), "y,,");
}

#[tokio::test]
async fn disable_over_tls_says_no_binding() {
    let recorded = honest_scram(BOTH, true, "sslmode=require&channel_binding=disable").await;
    assert_eq!(recorded.sasl_initial.as_ref().unwrap().0, "SCRAM-SHA-256");
    // 'n', as libpq sends: 'y' would tell a server that offered PLUS that it was stripped,
    // and PostgreSQL refuses the connection.
    assert_eq!(recorded.gs2_header(), "n,,");
}

#[tokio::test]
async fn without_tls_the_client_says_no_binding() {
    let recorded = honest_scram(PLAIN_ONLY, false, "sslmode=prefer").await;
    assert_eq!(recorded.gs2_header(), "n,,");
}

#[tokio::test]
async fn plus_offered_without_tls_is_refused_as_a_stripped_connection() {
    // The fake server refuses TLS, which sslmode=prefer allows, then offers PLUS.
    let (outcome, recorded) = connect_to(
        Scenario::Scram(BOTH, Finish::Honestly),
        false,
        "sslmode=prefer",
    )
    .await;
    assert!(recorded.after_startup().is_empty());
    assert_refused(outcome, "SCRAM-SHA-256-PLUS on a connection without TLS");
}

// ---------------------------------------------------------------------------------------------
// What still works

#[tokio::test]
async fn prefer_still_answers_a_cleartext_request_inside_tls() {
    let (outcome, recorded) = connect_to(Scenario::Cleartext, true, "sslmode=require").await;
    outcome.expect("cleartext inside TLS, channel binding not required");
    // The server asked, and without channel_binding=require the client answers.
    assert!(recorded
        .after_startup()
        .windows(PASSWORD.len())
        .any(|window| window == PASSWORD.as_bytes()));
}
