//! rustls client configuration with libpq's `sslmode` meanings.
//!
//! | sslmode                  | TLS                      | chain verified          | host name verified |
//! |--------------------------|--------------------------|-------------------------|--------------------|
//! | `disable`                | never                    | –                       | –                  |
//! | `allow`, `prefer`        | if the server offers it  | only with a root file   | no                 |
//! | `require`                | always                   | only with a root file   | no                 |
//! | `verify-ca`              | always                   | yes, to the root file   | no                 |
//! | `verify-full`            | always                   | yes                     | yes                |
//!
//! "Root file" is `sslrootcert=/path`: libpq verifies the chain whenever it has a root
//! certificate file, which is why `require` with `sslrootcert` behaves as `verify-ca`.
//! `verify-ca` needs the file (libpq's default is `~/.postgresql/root.crt`, never the public web
//! CAs): without a name check, a public CA would vouch for every website. `verify-full` without
//! a file, or with `sslrootcert=system`, trusts the Mozilla roots from `webpki-roots`.
//!
//! The modes that do not verify still check the handshake signatures: the connection is
//! encrypted to whoever holds the presented certificate's key, which stops passive eavesdropping
//! but not an active man in the middle. Each such connection logs a warning.
//!
//! The host name is sent as SNI whenever it is a DNS name: Neon's proxy picks the endpoint by it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::url::{PgUrl, SslMode, SslRootCert, UrlError};

/// TLS cannot be set up, or the server's certificate was refused. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read sslrootcert file {path}")]
    RootCertUnreadable {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("sslrootcert file {path} contains no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    RootCertEmpty { path: PathBuf },
    #[error("sslrootcert file {path} holds a certificate that cannot be a trust anchor")]
    RootCertInvalid {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}", UrlError::VerifyCaWithoutRootCert)]
    VerifyCaWithoutRootCert,
    #[error("the ring crypto provider cannot be used for TLS")]
    Provider(#[source] rustls::Error),
    #[error("cannot build the certificate verifier")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    #[error("host `{host}` cannot be used as a TLS server name")]
    InvalidServerName {
        host: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error(
        "server certificate is not valid for host {host}; check the host name or use sslmode=verify-ca"
    )]
    NotValidForHost {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "server certificate of {host} is not signed by a trusted certificate authority; {advice}"
    )]
    UntrustedCertificate {
        host: String,
        advice: String,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "server certificate of {host} is expired or not yet valid; renew it, or check this machine's clock"
    )]
    CertificateExpired {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("server certificate of {host} was rejected")]
    CertificateRejected {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS handshake with {host} failed")]
    Handshake {
        host: String,
        #[source]
        source: rustls::Error,
    },
}

/// What the `sslmode` asks of the server's answer to SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRequirement {
    /// Do not send SSLRequest.
    Off,
    /// Send SSLRequest; an `N` reply means continue in plaintext.
    Optional,
    /// Send SSLRequest; an `N` reply is fatal.
    Required,
}

/// Whether to ask for TLS, and whether the server may refuse.
pub fn tls_requirement(mode: SslMode) -> TlsRequirement {
    match mode {
        SslMode::Disable => TlsRequirement::Off,
        SslMode::Allow | SslMode::Prefer => TlsRequirement::Optional,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => TlsRequirement::Required,
    }
}

/// How much of the server certificate to check.
enum Verification {
    /// Chain and host name.
    Full,
    /// Chain only (`verify-ca`).
    ChainOnly,
    /// Nothing but the handshake signatures (encrypt, don't authenticate).
    EncryptOnly,
}

/// Whether the URL's TLS settings verify the server's certificate chain (`verify-ca`,
/// `verify-full`, or any mode with a root file): whether TLS proves who the server is.
pub fn verifies_server(url: &PgUrl) -> bool {
    matches!(
        verification(url),
        Some(Verification::Full | Verification::ChainOnly)
    )
}

fn verification(url: &PgUrl) -> Option<Verification> {
    let has_root_file = matches!(url.sslrootcert, Some(SslRootCert::File(_)));
    match url.sslmode {
        SslMode::Disable => None,
        SslMode::VerifyFull => Some(Verification::Full),
        SslMode::VerifyCa => Some(Verification::ChainOnly),
        SslMode::Allow | SslMode::Prefer | SslMode::Require if has_root_file => {
            Some(Verification::ChainOnly)
        }
        SslMode::Allow | SslMode::Prefer | SslMode::Require => Some(Verification::EncryptOnly),
    }
}

/// The rustls configuration for `url`, or `None` for `sslmode=disable`.
///
/// Built fresh for each call, so a changed `sslrootcert` file is picked up on reconnect.
pub fn client_config(url: &PgUrl) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let Some(verification) = verification(url) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Provider)?;
    let config = match verification {
        Verification::Full => builder.with_root_certificates(root_store(url)?),
        Verification::ChainOnly => {
            // Without the name check, only a CA the operator named may vouch for the server. The
            // URL parser refuses this already; this guards a `PgUrl` built or changed in code.
            if !matches!(url.sslrootcert, Some(SslRootCert::File(_))) {
                return Err(TlsError::VerifyCaWithoutRootCert);
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(url)?), provider)
                    .build()
                    .map_err(TlsError::Verifier)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier { webpki }))
        }
        Verification::EncryptOnly => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnlyVerifier {
                    algorithms: provider.signature_verification_algorithms,
                    sslmode: url.sslmode,
                }))
        }
    };
    Ok(Some(Arc::new(config.with_no_client_auth())))
}

/// Why a connection to `url` that ended up unencrypted exposes its traffic, or `None` when it
/// does not: it is encrypted, or the server is on this machine (`localhost` or a loopback
/// address), where nothing crosses a network. `encrypted` is whether the TLS handshake took
/// place: `sslmode=prefer`/`allow` continue in plaintext when the server refuses TLS.
pub fn plaintext_exposure(url: &PgUrl, encrypted: bool) -> Option<&'static str> {
    if encrypted || url.is_loopback() {
        return None;
    }
    Some(match url.sslmode {
        SslMode::Disable => "sslmode=disable turns TLS off",
        SslMode::Allow | SslMode::Prefer => {
            "the server refused TLS, and sslmode=prefer/allow continue without it"
        }
        // These fail rather than continue unencrypted; named for completeness.
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "TLS was not negotiated",
    })
}

/// Warns, once per connection, when [`plaintext_exposure`] says the connection's traffic
/// (user rows, e-mail addresses, the authentication exchange) crosses a network unencrypted.
pub fn warn_if_plaintext(url: &PgUrl, encrypted: bool) {
    if let Some(reason) = plaintext_exposure(url, encrypted) {
        tracing::warn!(
            server = %url.redacted(),
            sslmode = url.sslmode.as_str(),
            reason,
            "the connection is NOT encrypted: user data crosses the network in plaintext to a \
             host that is not this machine; use sslmode=verify-full (with sslrootcert for a \
             private CA)"
        );
    }
}

/// The name to verify the certificate against and to send as SNI: the URL's host, as a DNS
/// name or, for an address, as an IP address (verified against IP subject alternative names).
pub fn server_name(url: &PgUrl) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(url.host.clone()).map_err(|source| TlsError::InvalidServerName {
        host: url.host.clone(),
        source,
    })
}

/// Turns a failed handshake into advice, if the failure came from TLS itself (a rustls error
/// inside the `io::Error` that tokio-rustls returns). `None` means a plain I/O failure, such as
/// a reset connection, which is worth retrying.
pub fn handshake_error(url: &PgUrl, error: &io::Error) -> Option<TlsError> {
    let source = error.get_ref()?.downcast_ref::<rustls::Error>()?.clone();
    let host = url.host.clone();
    let rustls::Error::InvalidCertificate(certificate_error) = &source else {
        return Some(TlsError::Handshake { host, source });
    };
    Some(match certificate_error {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            TlsError::NotValidForHost { host, source }
        }
        CertificateError::UnknownIssuer => TlsError::UntrustedCertificate {
            host,
            advice: untrusted_advice(url),
            source,
        },
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => {
            TlsError::CertificateExpired { host, source }
        }
        _ => TlsError::CertificateRejected { host, source },
    })
}

fn untrusted_advice(url: &PgUrl) -> String {
    match &url.sslrootcert {
        Some(SslRootCert::File(path)) => format!(
            "check that sslrootcert {} holds the CA certificate that signed the server's",
            path.display()
        ),
        Some(SslRootCert::System) | None => {
            "set sslrootcert=/path/to/ca.pem to the CA that signed \
             the server's certificate (the built-in roots are the public web CAs)"
                .to_owned()
        }
    }
}

fn root_store(url: &PgUrl) -> Result<RootCertStore, TlsError> {
    match &url.sslrootcert {
        Some(SslRootCert::File(path)) => {
            let unreadable = |source| TlsError::RootCertUnreadable {
                path: path.clone(),
                source,
            };
            let mut store = RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
                store
                    .add(certificate.map_err(unreadable)?)
                    .map_err(|source| TlsError::RootCertInvalid {
                        path: path.clone(),
                        source,
                    })?;
            }
            if store.is_empty() {
                return Err(TlsError::RootCertEmpty { path: path.clone() });
            }
            Ok(store)
        }
        Some(SslRootCert::System) | None => Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
    }
}

/// `verify-ca`: the full WebPKI check, with only a name mismatch forgiven. The name is the last
/// thing WebPKI checks, so when it fails the chain, validity period and key usage have passed.
#[derive(Debug)]
struct ChainOnlyVerifier {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            result => result,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `require`/`prefer`/`allow` without a root file: any certificate, but the handshake must be
/// signed by its key, so the session keys are shared with the certificate's holder only.
#[derive(Debug)]
struct EncryptOnlyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    sslmode: SslMode,
}

impl ServerCertVerifier for EncryptOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Called once per full handshake, so this warns once per connection.
        tracing::warn!(
            server = %server_name.to_str(),
            sslmode = self.sslmode.as_str(),
            "the server's certificate is not verified: the connection is encrypted but the server \
             is not authenticated; use sslmode=verify-full (with sslrootcert for a private CA)"
        );
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The `tls-server-end-point` channel binding (RFC 5929 §4.1) for SCRAM-SHA-256-PLUS: the hash
/// of the server's end-entity certificate (DER), with the hash function of the certificate's
/// signature algorithm, MD5 and SHA-1 replaced by SHA-256.
///
/// `None` when the algorithm is unknown or has no hash of its own (Ed25519, Ed448): then
/// channel binding is unavailable, as it is for PostgreSQL's own server.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let algorithm = signature_hash(cert_der)?;
    Some(ring::digest::digest(algorithm, cert_der).as_ref().to_vec())
}

/// DER tags used in certificates (X.690 §8.9, §8.19; X.680 §8.6 for context-specific tags).
const TAG_SEQUENCE: u8 = 0x30;
const TAG_OID: u8 = 0x06;
const TAG_CONTEXT_0: u8 = 0xA0;

/// Signature algorithm OIDs (RFC 4055, RFC 5758, RFC 8410), as DER contents.
const OID_MD5_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x04];
const OID_SHA1_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x05];
const OID_RSASSA_PSS: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0A];
const OID_SHA256_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B];
const OID_SHA384_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0C];
const OID_SHA512_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0D];
const OID_ECDSA_WITH_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01];
const OID_ECDSA_WITH_SHA256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02];
const OID_ECDSA_WITH_SHA384: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03];
const OID_ECDSA_WITH_SHA512: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x04];
/// Hash OIDs inside RSASSA-PSS parameters (RFC 4055 §2.1).
const OID_SHA1: &[u8] = &[0x2B, 0x0E, 0x03, 0x02, 0x1A];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const OID_SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];

/// The channel-binding hash for the certificate's `signatureAlgorithm`. Reads only
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, … }`.
fn signature_hash(cert_der: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    let (certificate, _) = der_expect(cert_der, TAG_SEQUENCE)?;
    let (_tbs_certificate, rest) = der_expect(certificate, TAG_SEQUENCE)?;
    let (algorithm_identifier, _) = der_expect(rest, TAG_SEQUENCE)?;
    let (oid, parameters) = der_expect(algorithm_identifier, TAG_OID)?;
    match oid {
        OID_MD5_WITH_RSA
        | OID_SHA1_WITH_RSA
        | OID_SHA256_WITH_RSA
        | OID_ECDSA_WITH_SHA1
        | OID_ECDSA_WITH_SHA256 => Some(&ring::digest::SHA256),
        OID_SHA384_WITH_RSA | OID_ECDSA_WITH_SHA384 => Some(&ring::digest::SHA384),
        OID_SHA512_WITH_RSA | OID_ECDSA_WITH_SHA512 => Some(&ring::digest::SHA512),
        OID_RSASSA_PSS => pss_hash(parameters),
        _ => None,
    }
}

/// The hash named in `RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier
/// DEFAULT sha1, … }`. SHA-1 (stated or by default) becomes SHA-256 as RFC 5929 asks; a hash
/// ring lacks (SHA-224) gives `None` rather than a binding the server would not compute.
fn pss_hash(parameters: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    let (pss_parameters, _) = der_expect(parameters, TAG_SEQUENCE)?;
    let Some((hash_algorithm, _)) = der_expect(pss_parameters, TAG_CONTEXT_0) else {
        return Some(&ring::digest::SHA256);
    };
    let (algorithm_identifier, _) = der_expect(hash_algorithm, TAG_SEQUENCE)?;
    let (oid, _) = der_expect(algorithm_identifier, TAG_OID)?;
    match oid {
        OID_SHA1 | OID_SHA256 => Some(&ring::digest::SHA256),
        OID_SHA384 => Some(&ring::digest::SHA384),
        OID_SHA512 => Some(&ring::digest::SHA512),
        _ => None,
    }
}

/// The contents of the DER element at the start of `input` if its tag is `tag`, and the bytes
/// after it.
fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&actual_tag, rest) = input.split_first()?;
    if actual_tag != tag {
        return None;
    }
    let (&first_length_byte, rest) = rest.split_first()?;
    let (length, rest) = if first_length_byte < 0x80 {
        (usize::from(first_length_byte), rest)
    } else {
        // Long form: the low bits count the length bytes. Zero would be BER's indefinite
        // length; more than four would describe a certificate larger than 4 GiB.
        let count = usize::from(first_length_byte & 0x7F);
        if count == 0 || count > 4 {
            return None;
        }
        let (length_bytes, rest) = rest.split_at_checked(count)?;
        let length = length_bytes
            .iter()
            .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
        (length, rest)
    };
    rest.split_at_checked(length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::test_pki::{self, ServerCert, TestPki};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn url(host: &str, query: &str) -> PgUrl {
        format!("postgresql://u@{host}/db?{query}")
            .parse()
            .expect("test URL")
    }

    fn with_root(mode: &str, root: &std::path::Path) -> String {
        format!("sslmode={mode}&sslrootcert={}", root.display())
    }

    /// A TLS handshake between our client configuration for `url` and a rustls server
    /// presenting `cert`, over loopback whatever `url.host` says.
    async fn handshake(url: &PgUrl, cert: &ServerCert) -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(test_pki::server_config(cert));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            acceptor.accept(tcp).await.map(drop)
        });
        let config = client_config(url)
            .expect("client config")
            .expect("TLS enabled");
        let name = server_name(url).expect("server name");
        let tcp = TcpStream::connect(address).await?;
        let result = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map(drop);
        server.abort();
        result
    }

    /// The advice for a handshake that must fail.
    async fn refused(url: &PgUrl, cert: &ServerCert) -> TlsError {
        let error = handshake(url, cert)
            .await
            .expect_err("handshake should fail");
        handshake_error(url, &error).expect("a TLS error, not plain I/O")
    }

    #[tokio::test]
    async fn verify_full_accepts_a_certificate_for_the_ip_address_or_name() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        for host in ["127.0.0.1", "localhost"] {
            let url = url(host, &with_root("verify-full", &pki.ca_cert));
            handshake(&url, &cert).await.expect("verify-full accepts");
        }
    }

    #[tokio::test]
    async fn verify_full_rejects_another_ca() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let url = url("localhost", &with_root("verify-full", &pki.other_ca_cert));
        let error = refused(&url, &cert).await;
        assert!(
            matches!(error, TlsError::UntrustedCertificate { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "server certificate of localhost is not signed by a trusted certificate authority; \
                 check that sslrootcert {} holds the CA certificate that signed the server's",
                pki.other_ca_cert.display()
            )
        );
    }

    #[tokio::test]
    async fn verify_full_rejects_a_wrong_host_name() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let url = url("db.example.com", &with_root("verify-full", &pki.ca_cert));
        let error = refused(&url, &cert).await;
        assert_eq!(
            error.to_string(),
            "server certificate is not valid for host db.example.com; check the host name or use \
             sslmode=verify-ca"
        );
        let source = std::error::Error::source(&error)
            .expect("rustls error kept")
            .to_string();
        assert!(
            source.contains("localhost"),
            "rustls names the presented names: {source}"
        );
    }

    #[tokio::test]
    async fn verify_full_without_sslrootcert_trusts_only_public_roots() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let error = refused(&url("localhost", "sslmode=verify-full"), &cert).await;
        assert!(
            matches!(error, TlsError::UntrustedCertificate { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("set sslrootcert="), "{error}");
    }

    #[tokio::test]
    async fn verify_ca_accepts_a_wrong_host_name_but_not_another_ca() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost,IP:127.0.0.1");
        let url_ok = url("db.example.com", &with_root("verify-ca", &pki.ca_cert));
        handshake(&url_ok, &cert)
            .await
            .expect("verify-ca ignores the name");
        let url_bad = url(
            "db.example.com",
            &with_root("verify-ca", &pki.other_ca_cert),
        );
        let error = refused(&url_bad, &cert).await;
        assert!(
            matches!(error, TlsError::UntrustedCertificate { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn require_accepts_a_self_signed_certificate() {
        let pki = TestPki::new();
        let cert = pki.self_signed("selfsigned", "DNS:elsewhere.example");
        for mode in ["require", "prefer", "allow"] {
            let url = url("127.0.0.1", &format!("sslmode={mode}"));
            handshake(&url, &cert)
                .await
                .expect("encrypt without authenticating");
        }
    }

    #[tokio::test]
    async fn require_with_sslrootcert_verifies_the_chain_like_libpq() {
        let pki = TestPki::new();
        let cert = pki.issue("server", "DNS:localhost");
        let trusted = url("127.0.0.1", &with_root("require", &pki.ca_cert));
        handshake(&trusted, &cert)
            .await
            .expect("chain ok, name not checked");
        let untrusted = url("127.0.0.1", &with_root("require", &pki.other_ca_cert));
        let error = refused(&untrusted, &cert).await;
        assert!(
            matches!(error, TlsError::UntrustedCertificate { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn disable_has_no_tls_configuration() {
        let config = client_config(&url("h", "sslmode=disable")).expect("no error");
        assert!(config.is_none());
    }

    #[test]
    fn unusable_root_files_are_named() {
        let pki = TestPki::new();
        let missing = pki.dir.join("missing.pem");
        let error = client_config(&url("h", &with_root("verify-full", &missing)))
            .expect_err("missing file");
        assert!(
            matches!(error, TlsError::RootCertUnreadable { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("cannot read sslrootcert file {}", missing.display())
        );

        let not_a_cert = pki.dir.join("ca.key");
        let error = client_config(&url("h", &with_root("verify-ca", &not_a_cert)))
            .expect_err("key, not certificate");
        assert_eq!(
            error.to_string(),
            format!(
                "sslrootcert file {} contains no PEM certificate (-----BEGIN CERTIFICATE-----)",
                not_a_cert.display()
            )
        );
    }

    #[test]
    fn verify_ca_never_falls_back_to_the_public_roots() {
        for roots in ["", "&sslrootcert=system"] {
            let mut url = url("h", &format!("sslmode=verify-full{roots}"));
            url.sslmode = SslMode::VerifyCa;
            let error = client_config(&url).expect_err("no root file");
            assert!(
                matches!(error, TlsError::VerifyCaWithoutRootCert),
                "{error:?}"
            );
        }
    }

    #[test]
    fn plain_io_errors_are_not_tls_errors() {
        let url = url("h", "sslmode=require");
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
        assert!(handshake_error(&url, &reset).is_none());
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        assert!(matches!(
            handshake_error(&url, &alert),
            Some(TlsError::Handshake { .. })
        ));
    }

    #[test]
    fn requirement_per_mode() {
        assert_eq!(tls_requirement(SslMode::Disable), TlsRequirement::Off);
        assert_eq!(tls_requirement(SslMode::Allow), TlsRequirement::Optional);
        assert_eq!(tls_requirement(SslMode::Prefer), TlsRequirement::Optional);
        assert_eq!(tls_requirement(SslMode::Require), TlsRequirement::Required);
        assert_eq!(tls_requirement(SslMode::VerifyCa), TlsRequirement::Required);
        assert_eq!(
            tls_requirement(SslMode::VerifyFull),
            TlsRequirement::Required
        );
    }

    #[test]
    fn plaintext_warns_only_off_this_machine() {
        for mode in ["disable", "allow", "prefer"] {
            let remote = url("db.example.com", &format!("sslmode={mode}"));
            assert!(plaintext_exposure(&remote, false).is_some(), "{mode}");
            assert_eq!(plaintext_exposure(&remote, true), None, "{mode} with TLS");
            for local in ["localhost", "127.0.0.1", "127.0.0.2", "[::1]"] {
                let local = url(local, &format!("sslmode={mode}"));
                assert_eq!(plaintext_exposure(&local, false), None, "{local}");
            }
        }
        assert_eq!(
            plaintext_exposure(&url("10.0.0.7", "sslmode=disable"), false),
            Some("sslmode=disable turns TLS off")
        );
        assert_eq!(
            plaintext_exposure(&url("db.internal", "sslmode=prefer"), false),
            Some("the server refused TLS, and sslmode=prefer/allow continue without it")
        );
        // A name that merely contains "localhost" is somewhere else.
        assert!(
            plaintext_exposure(&url("localhost.example.com", "sslmode=disable"), false).is_some()
        );
    }

    #[test]
    fn server_names() {
        let name = |host: &str| server_name(&url(host, "sslmode=require")).expect("valid");
        assert!(matches!(name("127.0.0.1"), ServerName::IpAddress(_)));
        assert!(matches!(name("[::1]"), ServerName::IpAddress(_)));
        assert_eq!(name("ep-x.aws.neon.tech").to_str(), "ep-x.aws.neon.tech");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("test certificate")
            .to_vec()
    }

    /// ecdsa-with-SHA384 on P-384, made with `openssl req -x509 -newkey ec -sha384`.
    const P384_SHA384_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBxjCCAUygAwIBAgIUNfjhnWhpAzqJ9zKfXkWKa6NAwQ0wCgYIKoZIzj0EAwMw
GTEXMBUGA1UEAwwOZW5kLXBvaW50LXAzODQwIBcNMjYxMTI3MDQxNTQxWhgPMjEy
NjExMDMwNDE1NDFaMBkxFzAVBgNVBAMMDmVuZC1wb2ludC1wMzg0MHYwEAYHKoZI
zj0CAQYFK4EEACIDYgAE0K/rtd7iujGqJxrk3dR8yFLX1BOmfWy1Kp3mQScj+Mia
Vn989OLl/wCDukstB9tJpPd9JbWwX68z2Z6PxcDqUgsq7p2+8HA+fYvQjxA9YzPi
Q1ovxAcjZ5tXmppHk5+Eo1MwUTAdBgNVHQ4EFgQU5qkMVaQTZdidVllg89riIrwI
nXAwHwYDVR0jBBgwFoAU5qkMVaQTZdidVllg89riIrwInXAwDwYDVR0TAQH/BAUw
AwEB/zAKBggqhkjOPQQDAwNoADBlAjEA+AuqZGeR4tgpurrSIyyUbTS4YYiKeqiu
ehzkkeg1EipultfOhrySkGZU5qVDQj5JAjAy8tH4pAGwItcJvWwYuBHo8cR+2VN9
VQsYezjdF3gbsXGkN2r0GCLg8kke6VT6R/c=
-----END CERTIFICATE-----";
    /// `openssl x509 -outform DER | openssl dgst -sha384` of the certificate above.
    const P384_SHA384_END_POINT: &str = "e7180994851f76c9b0ef6d290f6765d7bc48ad642e3d2966\
                                         7b2cb54482194efd1d826580de17c1783f2cd40591720224";

    /// RSASSA-PSS with SHA-512 in its parameters (`-sigopt rsa_padding_mode:pss -sha512`).
    const PSS_SHA512_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIDeTCCAi2gAwIBAgIUOuRdxEZMgGQMgl54nwVq7O5nf24wQQYJKoZIhvcNAQEK
MDSgDzANBglghkgBZQMEAgMFAKEcMBoGCSqGSIb3DQEBCDANBglghkgBZQMEAgMF
AKIDAgEgMBgxFjAUBgNVBAMMDWVuZC1wb2ludC1wc3MwIBcNMjYxMTI3MDQxNTQx
WhgPMjEyNjExMDMwNDE1NDFaMBgxFjAUBgNVBAMMDWVuZC1wb2ludC1wc3MwggEg
MAsGCSqGSIb3DQEBCgOCAQ8AMIIBCgKCAQEApq+CZidzgLFfEEEz14ZFWAmHu+pk
xRQVKJj8LLIfQi+BkKeV8KqXVtXCcIOh3a3ERoPVFriszBgIwkSjqrmq7kq3hW/F
5a0mpfYlNb0qA4ueN4UXHdNvz1XFTy8PCudY95Vdthvgq/d+5vFDw2Mjx3GCr7Ur
+G+y694GOchigcSfwA/k7tpPCVcsVJWicj/wokssbsvDLlhgTcWH+EsJ3TE8r/K8
U7O2c3f+g/DCyvIsSR7QfoD5EmyizINABqm7Ul+o2DCV/JbxpFNgtyDMmab5m3Vt
txtrp4eY+N5y1QMnzXnia6zc0CfRHmSm8wSrBX5Z5aIIR2e3De84lbGoWwIDAQAB
o1MwUTAdBgNVHQ4EFgQUjugbQyjx4DIkhT14zY8+syJexRMwHwYDVR0jBBgwFoAU
jugbQyjx4DIkhT14zY8+syJexRMwDwYDVR0TAQH/BAUwAwEB/zBBBgkqhkiG9w0B
AQowNKAPMA0GCWCGSAFlAwQCAwUAoRwwGgYJKoZIhvcNAQEIMA0GCWCGSAFlAwQC
AwUAogMCASADggEBAFacSh+2L5BOrhdcaqhUT0PWY0frMd2C19kn2aUYqVhtb7pw
on+qzbezWLV8kBlBCfaeTuQJgxjmvruh2NO6+YH+hrdhm9XX3vDB3kVygsmk1Ww4
NexXVDAJgvuR+OVMJiU6XD3af8eFzvu9DFF4gfjrMxzqpCaLI5T8gxA2fyV+Qgtk
MYxZU7i4aRpkWxCZyhpTt7mZHIl2T6vxd3NHrbOMNTeApWljD+vWiVcRLnPaGXB0
Qt8Yg9B+D7OgU7hA+SXWvQtKlXbrV9aRjoJuFZiV9XEGKDeKEnITFayy6NVS+eCh
WjkLc4iWT5Rl+wIOoC1BjPN3jPFenruqhuSL1Ig=
-----END CERTIFICATE-----";
    /// `openssl x509 -outform DER | openssl dgst -sha512` of the certificate above.
    const PSS_SHA512_END_POINT: &str = "41555ad6f8bd10f021cfc2da827b134b290988b3e17f7bd5a7d077e25d27bffc\
                                        fd84fc709ce9272baaca9e1e52e0e4d408da2e756034890794559010c5f799ac";

    /// Ed25519 signs without a separate hash, so RFC 5929 defines no binding for it.
    const ED25519_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBTzCCAQGgAwIBAgIUS0STYngspLvqWUlbczgFENIeiIswBQYDK2VwMBwxGjAY
BgNVBAMMEWVuZC1wb2ludC1lZDI1NTE5MCAXDTI2MTEyNzA0MTU0MVoYDzIxMjYx
MTAzMDQxNTQxWjAcMRowGAYDVQQDDBFlbmQtcG9pbnQtZWQyNTUxOTAqMAUGAytl
cAMhAJKNVk38ne40rsz8Hk1mVV1RyI/dXBiZfK7+mAtBNG+Po1MwUTAdBgNVHQ4E
FgQU1JCZW+OVFf/L6CCNARNem6FFh80wHwYDVR0jBBgwFoAU1JCZW+OVFf/L6CCN
ARNem6FFh80wDwYDVR0TAQH/BAUwAwEB/zAFBgMrZXADQQBvUNc1r/3I4P++nYqe
/OLpZL7nN1XsI1KsWNOXqdLHPYdA14OroTLxCGhUnGzo0axhaeLiok5WlF8ql/PJ
HHkC
-----END CERTIFICATE-----";

    #[test]
    fn end_point_of_real_certificates() {
        let p384 = tls_server_end_point(&der_of(P384_SHA384_CERT)).expect("SHA-384 binding");
        assert_eq!(hex(&p384), P384_SHA384_END_POINT);
        let pss = tls_server_end_point(&der_of(PSS_SHA512_CERT)).expect("SHA-512 binding");
        assert_eq!(hex(&pss), PSS_SHA512_END_POINT);
        assert_eq!(tls_server_end_point(&der_of(ED25519_CERT)), None);
    }

    /// DER element with a short-form length (contents under 128 bytes).
    fn element(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut der = vec![tag, u8::try_from(contents.len()).expect("short contents")];
        der.extend_from_slice(contents);
        der
    }

    /// The smallest structure `tls_server_end_point` reads: an empty tbsCertificate, the
    /// algorithm, and an empty signature.
    fn certificate_signed_with(oid: &[u8], parameters: &[u8]) -> Vec<u8> {
        let algorithm = element(
            TAG_SEQUENCE,
            &[element(TAG_OID, oid), parameters.to_vec()].concat(),
        );
        let signature = element(0x03, &[0]);
        element(
            TAG_SEQUENCE,
            &[element(TAG_SEQUENCE, &[]), algorithm, signature].concat(),
        )
    }

    #[test]
    fn end_point_hash_per_signature_algorithm() {
        use ring::digest::{SHA256, SHA384, SHA512};
        let null = [0x05, 0x00];
        let pss_with = |hash_oid: &[u8]| {
            let hash = element(
                TAG_SEQUENCE,
                &[element(TAG_OID, hash_oid), null.to_vec()].concat(),
            );
            element(TAG_SEQUENCE, &element(TAG_CONTEXT_0, &hash))
        };
        let cases: [(&[u8], Vec<u8>, &ring::digest::Algorithm); 12] = [
            (OID_MD5_WITH_RSA, null.to_vec(), &SHA256),
            (OID_SHA1_WITH_RSA, null.to_vec(), &SHA256),
            (OID_SHA256_WITH_RSA, null.to_vec(), &SHA256),
            (OID_SHA384_WITH_RSA, null.to_vec(), &SHA384),
            (OID_SHA512_WITH_RSA, null.to_vec(), &SHA512),
            (OID_ECDSA_WITH_SHA1, vec![], &SHA256),
            (OID_ECDSA_WITH_SHA256, vec![], &SHA256),
            (OID_ECDSA_WITH_SHA384, vec![], &SHA384),
            (OID_ECDSA_WITH_SHA512, vec![], &SHA512),
            (OID_RSASSA_PSS, element(TAG_SEQUENCE, &[]), &SHA256),
            (OID_RSASSA_PSS, pss_with(OID_SHA1), &SHA256),
            (OID_RSASSA_PSS, pss_with(OID_SHA384), &SHA384),
        ];
        for (oid, parameters, algorithm) in cases {
            let der = certificate_signed_with(oid, &parameters);
            let expected = ring::digest::digest(algorithm, &der);
            assert_eq!(
                tls_server_end_point(&der).as_deref(),
                Some(expected.as_ref()),
                "OID {}",
                hex(oid)
            );
        }
        let sha224 = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04];
        assert_eq!(
            tls_server_end_point(&certificate_signed_with(OID_RSASSA_PSS, &pss_with(&sha224))),
            None
        );
        let ed448 = [0x2B, 0x65, 0x71];
        assert_eq!(
            tls_server_end_point(&certificate_signed_with(&ed448, &[])),
            None
        );
    }

    #[test]
    fn end_point_of_malformed_input_is_none() {
        let der = der_of(P384_SHA384_CERT);
        for length in 0..der.len() {
            assert_eq!(tls_server_end_point(&der[..length]), None, "{length} bytes");
        }
        assert_eq!(
            tls_server_end_point(&[0x30, 0x80, 0x00, 0x00]),
            None,
            "indefinite length"
        );
        assert_eq!(
            tls_server_end_point(&[0x30, 0x85, 1, 1, 1, 1, 1]),
            None,
            "5 length bytes"
        );
        assert_eq!(
            tls_server_end_point(&[0x31, 0x00]),
            None,
            "SET, not SEQUENCE"
        );
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }
}
