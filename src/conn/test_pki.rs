//! Test-only certificates made with the `openssl` CLI, and a TLS server to shake hands with.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// A throwaway certificate authority, and a second one that signs nothing we trust. The
/// directory is removed on drop.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub other_ca_cert: PathBuf,
}

/// A server certificate and its key.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "usersync-conn-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create test directory");
        let pki = Self {
            ca_cert: dir.join("ca.crt"),
            other_ca_cert: dir.join("other-ca.crt"),
            dir,
        };
        pki.make_ca("ca");
        pki.make_ca("other-ca");
        pki
    }

    fn make_ca(&self, name: &str) {
        openssl(
            &self.dir,
            &format!(
                "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
                 -keyout {name}.key -out {name}.crt -subj /CN=usersync-test-{name} \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
            ),
        );
    }

    /// A server certificate signed by the test CA for `subject_alt_names` (openssl syntax,
    /// e.g. `DNS:localhost,IP:127.0.0.1`).
    pub fn issue(&self, name: &str, subject_alt_names: &str) -> ServerCert {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName={subject_alt_names}\n\
                 extendedKeyUsage=serverAuth\n\
                 basicConstraints=CA:FALSE\n"
            ),
        )
        .expect("write extension file");
        openssl(
            &self.dir,
            &format!(
                "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout {name}.key -out {name}.csr -subj /CN={name}"
            ),
        );
        openssl(
            &self.dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -set_serial 2 -days 2 \
                 -out {name}.crt -extfile {name}.ext"
            ),
        );
        self.server_cert(name)
    }

    /// A self-signed server certificate, as quick-start guides make them.
    pub fn self_signed(&self, name: &str, subject_alt_names: &str) -> ServerCert {
        openssl(
            &self.dir,
            &format!(
                "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
                 -keyout {name}.key -out {name}.crt -subj /CN={name} \
                 -addext subjectAltName={subject_alt_names}"
            ),
        );
        self.server_cert(name)
    }

    fn server_cert(&self, name: &str) -> ServerCert {
        ServerCert {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        }
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        // Best effort: a leftover directory in /tmp is harmless.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `openssl` with whitespace-separated arguments (none of ours contains a space).
fn openssl(dir: &Path, command_line: &str) {
    let args: Vec<&str> = command_line.split_whitespace().collect();
    let output = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("run the openssl CLI");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A rustls server configuration presenting `cert`.
pub fn server_config(cert: &ServerCert) -> Arc<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .expect("open certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("read certificate");
    let key = PrivateKeyDer::from_pem_file(&cert.key).expect("read key");
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate and key");
    Arc::new(config)
}
