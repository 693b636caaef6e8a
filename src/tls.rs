//! Mutual TLS for the mirroring endpoints: partner agents and the witness
//! talk to each other over TCP, and both ends of every connection present a
//! certificate signed by the deployment's CA (spec 69-70: "peers authenticate
//! with certificates; encryption required by default").
//!
//! [`EndpointTls`] is built once from a [`TlsConfig`] and then wraps every
//! connected or accepted socket into a [`BoxedStream`], so the protocol code
//! above never knows whether TLS is on. [`generate_pki`] makes a throwaway CA
//! and leaf certificates for the test harness and the local demo cluster.
//!
//! The ring crypto provider is passed explicitly to every config builder so
//! that nothing depends on a process-wide default provider being installed.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{TlsConfig, TlsMode};

/// A byte stream to a peer, plain or encrypted: what the endpoint code reads
/// and writes once a connection is established.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to a peer whose transport (TCP or TLS over TCP) is hidden.
pub type BoxedStream = Box<dyn Stream>;

/// File name of the CA certificate written by [`generate_pki`].
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key written by [`generate_pki`].
pub const CA_KEY_FILE: &str = "ca.key";

/// TLS material could not be loaded, or a PKI could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `mode = "on"` without one of the files; config validation normally
    /// catches this first, so it only happens with hand-built configs.
    #[error("tls.{key}: missing: mutual TLS needs cert, key and ca")]
    MissingPath { key: &'static str },
    /// `[server_tls]` with a verify mode and no `ca`; config validation
    /// normally catches this first.
    #[error(
        "server_tls.ca: missing: sslmode={0} checks the servers' certificates against a CA file"
    )]
    MissingServerCa(crate::config::ServerSslMode),
    /// The crypto provider refused the protocol versions asked for.
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not valid PEM: {source}", file.display())]
    Pem {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no certificate found", file.display())]
    NoCertificate { file: PathBuf },
    #[error("{}: no private key found (expected PKCS#8, PKCS#1 or SEC1 PEM)", file.display())]
    NoPrivateKey { file: PathBuf },
    #[error("{}: CA certificate rejected: {source}", file.display())]
    CaCertificate {
        file: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: cannot verify peers with this CA: {source}", file.display())]
    ClientVerifier {
        file: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The certificate and key do not form a usable identity (for example
    /// the key does not match the certificate).
    #[error("{} with key {}: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: cannot generate: {source}", file.display())]
    Generate {
        file: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: cannot write: {source}", file.display())]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How one mirroring endpoint secures its connections; cheap to clone (the
/// TLS configs are shared behind `Arc`s).
#[derive(Clone)]
pub struct EndpointTls {
    transport: Transport,
}

#[derive(Clone)]
enum Transport {
    Plain,
    Mutual {
        connector: TlsConnector,
        acceptor: TlsAcceptor,
    },
}

impl fmt::Debug for EndpointTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.is_on() {
            "mutual TLS"
        } else {
            "plain TCP"
        };
        f.debug_struct("EndpointTls").field("mode", &mode).finish()
    }
}

impl EndpointTls {
    /// Loads the certificates named by `config`; with TLS off, warns once
    /// that the endpoint is unauthenticated and unencrypted.
    pub fn from_config(config: &TlsConfig) -> Result<EndpointTls, TlsError> {
        if config.mode == TlsMode::Off {
            tracing::warn!(
                "TLS is off for the mirroring endpoint: peers are not authenticated \
                 and WAL crosses the network in clear"
            );
            return Ok(EndpointTls {
                transport: Transport::Plain,
            });
        }
        let cert_path = required_path(&config.cert, "cert")?;
        let key_path = required_path(&config.key, "key")?;
        let ca_path = required_path(&config.ca, "ca")?;

        let chain = load_certificates(cert_path)?;
        let key = load_private_key(key_path)?;
        let roots = Arc::new(load_roots(ca_path)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let identity_error = |source| TlsError::Identity {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        };

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    file: ca_path.to_path_buf(),
                    source,
                })?;
        let server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(identity_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(identity_error)?;
        let client_config = client_config(provider, roots, chain, key).map_err(identity_error)?;

        Ok(EndpointTls {
            transport: Transport::Mutual {
                connector: TlsConnector::from(Arc::new(client_config)),
                acceptor: TlsAcceptor::from(Arc::new(server_config)),
            },
        })
    }

    /// Whether connections are wrapped in mutual TLS.
    pub fn is_on(&self) -> bool {
        matches!(self.transport, Transport::Mutual { .. })
    }

    /// Secures an outgoing connection to `server_host` (an IP literal or a
    /// DNS name, which the peer's certificate must carry as a SAN).
    pub async fn connect(&self, tcp: TcpStream, server_host: &str) -> io::Result<BoxedStream> {
        let connector = match &self.transport {
            Transport::Plain => return Ok(Box::new(tcp)),
            Transport::Mutual { connector, .. } => connector,
        };
        // Endpoints print IPv6 literals in brackets; certificates carry the bare address.
        let host = server_host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string()).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{server_host:?} is not a valid TLS server name: {err}"),
            )
        })?;
        let stream = connector
            .connect(server_name, tcp)
            .await
            .map_err(|err| with_context(err, &format!("TLS handshake with {server_host}")))?;
        Ok(Box::new(stream))
    }

    /// Secures an incoming connection, requiring a client certificate
    /// signed by our CA.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<BoxedStream> {
        let acceptor = match &self.transport {
            Transport::Plain => return Ok(Box::new(tcp)),
            Transport::Mutual { acceptor, .. } => acceptor,
        };
        let peer = tcp
            .peer_addr()
            .map(|addr| addr.to_string())
            .unwrap_or_else(|_| "unknown peer".to_string());
        let stream = acceptor
            .accept(tcp)
            .await
            .map_err(|err| with_context(err, &format!("TLS handshake from {peer}")))?;
        Ok(Box::new(stream))
    }
}

fn client_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, rustls::Error> {
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
}

/// Keeps the error kind (callers may match on it) while saying which
/// handshake failed.
fn with_context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

fn required_path<'a>(path: &'a Option<PathBuf>, key: &'static str) -> Result<&'a Path, TlsError> {
    path.as_deref().ok_or(TlsError::MissingPath { key })
}

fn open(file: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(file)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            file: file.to_path_buf(),
            source,
        })
}

pub(crate) fn load_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader = open(file)?;
    let chain = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            file: file.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            file: file.to_path_buf(),
        });
    }
    Ok(chain)
}

pub(crate) fn load_private_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mut reader = open(file)?;
    rustls_pemfile::private_key(&mut reader)
        .map_err(|source| TlsError::Pem {
            file: file.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            file: file.to_path_buf(),
        })
}

pub(crate) fn load_roots(file: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(file)? {
        roots.add(cert).map_err(|source| TlsError::CaCertificate {
            file: file.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// The ALPN protocol name of PostgreSQL connections.
pub const POSTGRESQL_ALPN: &[u8] = b"postgresql";

/// A TLS acceptor for the proxy's clients: server authentication only,
/// with the certificate chain and key of the proxy's `[tls]` section.
pub fn client_facing_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = load_certificates(cert)?;
    let private_key = load_private_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity_error = |source| TlsError::Identity {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(identity_error)?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(identity_error)?;
    // PostgreSQL 17's ALPN name, which direct SSL requires (a client that
    // offers none still gets through after an SSLRequest).
    config.alpn_protocols = vec![POSTGRESQL_ALPN.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The config of endpoint `name` in a directory made by [`generate_pki`].
/// The `[tls]` section of a config file for `name`'s generated files in
/// `dir` (mode on), or the section that turns TLS off.
pub fn tls_section(dir: &Path, name: &str, on: bool) -> String {
    if !on {
        return "[tls]\nmode = \"off\"\n".to_string();
    }
    let files = tls_config_for(dir, name);
    let path = |file: Option<PathBuf>| file.unwrap_or_default().display().to_string();
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        path(files.cert),
        path(files.key),
        path(files.ca)
    )
}

pub fn tls_config_for(dir: &Path, name: &str) -> TlsConfig {
    TlsConfig {
        mode: TlsMode::On,
        cert: Some(dir.join(format!("{name}.crt"))),
        key: Some(dir.join(format!("{name}.key"))),
        ca: Some(dir.join(CA_CERT_FILE)),
    }
}

/// Writes a fresh self-signed CA (`ca.crt`, `ca.key`) into `dir` and, for
/// every name, a leaf `NAME.crt` + `NAME.key` signed by it, valid for the
/// name itself, `localhost`, `127.0.0.1` and `::1`, as both TLS server and
/// client. Key files are readable by the owner only.
pub fn generate_pki(dir: &Path, names: &[&str]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        file: dir.to_path_buf(),
        source,
    })?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let generate_error = |file: &Path| {
        let file = file.to_path_buf();
        move |source| TlsError::Generate { file, source }
    };

    let ca_key = rcgen::KeyPair::generate().map_err(generate_error(&ca_cert_path))?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pgmirror deployment CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(generate_error(&ca_cert_path))?;
    write_file(&ca_cert_path, &ca_cert.pem(), false)?;
    write_file(&dir.join(CA_KEY_FILE), &ca_key.serialize_pem(), true)?;

    for name in names {
        let cert_path = dir.join(format!("{name}.crt"));
        let leaf_key = rcgen::KeyPair::generate().map_err(generate_error(&cert_path))?;
        let mut leaf_params =
            rcgen::CertificateParams::new(vec![name.to_string(), "localhost".to_string()])
                .map_err(generate_error(&cert_path))?;
        // Added as addresses rather than strings so they become IP SANs,
        // which is what rustls matches an IP server name against.
        leaf_params.subject_alt_names.extend([
            rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            rcgen::SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]);
        leaf_params.subject_alt_names.dedup();
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *name);
        leaf_params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .map_err(generate_error(&cert_path))?;
        write_file(&cert_path, &leaf_cert.pem(), false)?;
        write_file(
            &dir.join(format!("{name}.key")),
            &leaf_key.serialize_pem(),
            true,
        )?;
    }
    Ok(())
}

fn write_file(file: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        file: file.to_path_buf(),
        source,
    };
    let mode = if secret { 0o600 } else { 0o644 };
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(file)
        .map_err(write_error)?;
    // `mode` only applies when the file is created; tighten a pre-existing
    // file too, before the secret goes into it.
    handle
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    handle.write_all(contents.as_bytes()).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const PING: &[u8] = b"ping from client";
    const PONG: &[u8] = b"pong from server";

    fn pki(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        generate_pki(dir.path(), names).unwrap();
        dir
    }

    fn endpoint(config: &TlsConfig) -> EndpointTls {
        EndpointTls::from_config(config).unwrap()
    }

    fn off() -> TlsConfig {
        TlsConfig {
            mode: TlsMode::Off,
            ..TlsConfig::default()
        }
    }

    /// What each side got: the server reads PING then writes PONG, the
    /// client writes PING then reads PONG; any failure is kept as text.
    struct Outcome {
        server: Result<Vec<u8>, String>,
        client: Result<Vec<u8>, String>,
    }

    async fn exchange(server_tls: EndpointTls, client_tls: EndpointTls, host: &str) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut stream = server_tls.accept(tcp).await.map_err(|e| e.to_string())?;
            let mut received = vec![0; PING.len()];
            stream
                .read_exact(&mut received)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(PONG).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(received)
        });
        let client = async {
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            let mut stream = client_tls
                .connect(tcp, host)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(PING).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            let mut received = vec![0; PONG.len()];
            stream
                .read_exact(&mut received)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(received)
        };
        let client = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("client timed out");
        let server = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server timed out")
            .unwrap();
        Outcome { server, client }
    }

    #[tokio::test]
    async fn mutual_tls_exchanges_bytes_by_ip_and_by_name() {
        let dir = pki(&["alpha", "beta"]);
        let alpha = endpoint(&tls_config_for(dir.path(), "alpha"));
        let beta = endpoint(&tls_config_for(dir.path(), "beta"));
        assert!(alpha.is_on());
        for host in ["127.0.0.1", "localhost", "alpha"] {
            let outcome = exchange(alpha.clone(), beta.clone(), host).await;
            assert_eq!(outcome.server.as_deref(), Ok(PING), "via {host}");
            assert_eq!(outcome.client.as_deref(), Ok(PONG), "via {host}");
        }
    }

    #[tokio::test]
    async fn ipv6_loopback_is_a_valid_server_name() {
        let dir = pki(&["alpha", "beta"]);
        let alpha = endpoint(&tls_config_for(dir.path(), "alpha"));
        let beta = endpoint(&tls_config_for(dir.path(), "beta"));
        // The connection itself is over IPv4; only the name check uses ::1.
        let outcome = exchange(alpha, beta, "[::1]").await;
        assert_eq!(outcome.client.as_deref(), Ok(PONG));
    }

    #[tokio::test]
    async fn server_name_missing_from_certificate_is_refused() {
        let dir = pki(&["alpha", "beta"]);
        let alpha = endpoint(&tls_config_for(dir.path(), "alpha"));
        let beta = endpoint(&tls_config_for(dir.path(), "beta"));
        let outcome = exchange(alpha, beta, "gamma.example").await;
        let client_error = outcome.client.unwrap_err();
        assert!(client_error.contains("TLS handshake with gamma.example"));
        assert!(outcome.server.is_err());
    }

    #[tokio::test]
    async fn client_certificate_from_another_ca_is_refused() {
        let dir = pki(&["alpha"]);
        let rogue_dir = pki(&["rogue"]);
        let alpha = endpoint(&tls_config_for(dir.path(), "alpha"));
        // The rogue trusts our CA (so it accepts alpha) but its own
        // certificate is signed by another CA: only the server can refuse.
        let rogue = endpoint(&TlsConfig {
            ca: Some(dir.path().join(CA_CERT_FILE)),
            ..tls_config_for(rogue_dir.path(), "rogue")
        });
        let outcome = exchange(alpha, rogue, "127.0.0.1").await;
        let server_error = outcome.server.unwrap_err();
        assert!(
            server_error.contains("TLS handshake from"),
            "{server_error}"
        );
        assert!(outcome.client.is_err());
    }

    #[tokio::test]
    async fn plain_client_cannot_talk_to_tls_server() {
        let dir = pki(&["alpha"]);
        let alpha = endpoint(&tls_config_for(dir.path(), "alpha"));
        let outcome = exchange(alpha, endpoint(&off()), "127.0.0.1").await;
        assert!(outcome.server.is_err());
        assert_ne!(outcome.client.as_deref(), Ok(PONG));
    }

    #[tokio::test]
    async fn mode_off_passes_bytes_through() {
        let plain = endpoint(&off());
        assert!(!plain.is_on());
        let outcome = exchange(plain.clone(), plain, "127.0.0.1").await;
        assert_eq!(outcome.server.as_deref(), Ok(PING));
        assert_eq!(outcome.client.as_deref(), Ok(PONG));
    }

    #[test]
    fn missing_cert_file_is_named() {
        let dir = pki(&["alpha"]);
        let missing = dir.path().join("nobody.crt");
        let config = TlsConfig {
            cert: Some(missing.clone()),
            ..tls_config_for(dir.path(), "alpha")
        };
        let error = EndpointTls::from_config(&config).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error:?}");
        assert!(error
            .to_string()
            .starts_with(&format!("{}: cannot read:", missing.display())));
    }

    #[test]
    fn file_without_certificate_is_named() {
        let dir = pki(&["alpha"]);
        // A key file holds PEM, but no certificate.
        let config = TlsConfig {
            cert: Some(dir.path().join("alpha.key")),
            ..tls_config_for(dir.path(), "alpha")
        };
        let error = EndpointTls::from_config(&config).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{}: no certificate found",
                dir.path().join("alpha.key").display()
            )
        );
    }

    #[test]
    fn file_without_key_is_named() {
        let dir = pki(&["alpha"]);
        let config = TlsConfig {
            key: Some(dir.path().join("alpha.crt")),
            ..tls_config_for(dir.path(), "alpha")
        };
        let error = EndpointTls::from_config(&config).unwrap_err();
        assert!(matches!(error, TlsError::NoPrivateKey { .. }), "{error:?}");
        assert!(error
            .to_string()
            .contains("alpha.crt: no private key found"));
    }

    #[test]
    fn mismatched_key_names_both_files() {
        let dir = pki(&["alpha", "beta"]);
        let config = TlsConfig {
            key: Some(dir.path().join("beta.key")),
            ..tls_config_for(dir.path(), "alpha")
        };
        let error = EndpointTls::from_config(&config).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, TlsError::Identity { .. }), "{error:?}");
        assert!(
            text.contains("alpha.crt") && text.contains("beta.key"),
            "{text}"
        );
    }

    #[test]
    fn generated_keys_are_private() {
        let dir = pki(&["alpha"]);
        for (file, expected) in [
            ("ca.key", 0o600),
            ("alpha.key", 0o600),
            ("ca.crt", 0o644),
            ("alpha.crt", 0o644),
        ] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, expected, "{file}");
        }
        // Regenerating over existing files keeps them private.
        generate_pki(dir.path(), &["alpha"]).unwrap();
        let mode = std::fs::metadata(dir.path().join("alpha.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
