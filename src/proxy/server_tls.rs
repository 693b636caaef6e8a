//! TLS from the proxy to the servers (`[server_tls]`, libpq's sslmode):
//! every connection the proxy opens to a PostgreSQL server (a client's
//! data path, a forwarded CancelRequest, a read-write probe) goes through
//! [`ServerTls::connect`], which sends the proxy's own SSLRequest and
//! returns a [`ServerStream`], plain or encrypted, that the splice reads
//! and writes without knowing which.
//!
//! What each mode checks: `disable` sends no SSLRequest; `prefer` encrypts
//! when the server answers 'S' and stays plain on 'N'; `require` encrypts
//! but accepts any certificate ([`AcceptAnyCertificate`]); `verify-ca`
//! checks the chain against `ca` but not the name ([`ChainOnlyVerifier`]);
//! `verify-full` is rustls' own verifier: chain and host name (an IP
//! address as an IP SAN). A server that answers 'N' to `require` or
//! stronger, or whose handshake fails for a TLS reason, is a
//! [`ServerTlsError`]: a configuration problem that a retry will not fix,
//! kept apart from plain IO errors (a server down or restarting).
//!
//! The client side's TLS (the proxy as a server) is in `crate::tls`.
//! [`ServerTls::connect`] is cancel-safe: dropping it closes the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Endpoint, ServerSslMode, ServerTlsConfig, TcpConfig};
use crate::tls::{load_certificates, load_private_key, load_roots, TlsError};
use crate::wire::startup::ssl_request;

/// The server's answer to an SSLRequest when it will do TLS.
const SSL_ACCEPTED: u8 = b'S';
/// The server's answer to an SSLRequest when it will not.
const SSL_REFUSED: u8 = b'N';

/// How the proxy opens connections to servers: TCP options and the TLS
/// mode. Built once by `proxy::serve`, cloned into the route discovery
/// tasks (cheap: the rustls config is shared).
#[derive(Clone)]
pub struct ServerTls {
    mode: ServerSslMode,
    /// None for `disable`.
    connector: Option<TlsConnector>,
    /// Keepalives and TCP_USER_TIMEOUT, set on the TCP socket under TLS.
    tcp: TcpConfig,
}

/// A connection to a server, plain or encrypted; one enum rather than a
/// boxed trait object, so the splice's reads and writes are static calls.
pub enum ServerStream {
    Plain(TcpStream),
    /// Boxed: a TLS stream is large, a plain one is not.
    Tls(Box<TlsStream<TcpStream>>),
}

/// The server's TLS is not what `sslmode` asks for. Clone, so that the
/// route can carry a probe's failure to every held client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerTlsError {
    #[error(
        "server {address} does not accept TLS (it answered 'N' to SSLRequest), which \
         sslmode={mode} requires"
    )]
    NotOffered {
        address: String,
        mode: ServerSslMode,
    },
    #[error("TLS to server {address} failed (sslmode={mode}): {reason}")]
    Handshake {
        address: String,
        mode: ServerSslMode,
        reason: String,
    },
}

/// Why [`ServerTls::connect`] gave no stream.
#[derive(Debug, thiserror::Error)]
pub enum ServerConnectError {
    /// Unreachable, refused, reset: the server may be down or restarting.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Tls(#[from] ServerTlsError),
}

impl ServerTls {
    /// Loads the CA and client certificate that `config` names.
    pub fn new(config: &ServerTlsConfig, tcp: TcpConfig) -> Result<ServerTls, TlsError> {
        let connector = match config.sslmode {
            ServerSslMode::Disable => None,
            _ => Some(TlsConnector::from(Arc::new(client_config(config)?))),
        };
        Ok(ServerTls {
            mode: config.sslmode,
            connector,
            tcp,
        })
    }

    /// Connects to `address` (host:port) and negotiates TLS as the mode
    /// says; the stream is ready for a startup packet or CancelRequest.
    pub async fn connect(&self, address: &str) -> Result<ServerStream, ServerConnectError> {
        let mut tcp = TcpStream::connect(address).await?;
        crate::proxy::socket::tune(&tcp, &self.tcp)?;
        let Some(connector) = &self.connector else {
            return Ok(ServerStream::Plain(tcp));
        };
        tcp.write_all(&ssl_request()).await?;
        // Exactly one byte: anything the server sent after it must go
        // through the TLS handshake, not be taken as plain data.
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        let tls_error = |reason: String| ServerTlsError::Handshake {
            address: address.to_string(),
            mode: self.mode,
            reason,
        };
        match answer {
            [SSL_ACCEPTED] => {}
            [SSL_REFUSED] if self.mode == ServerSslMode::Prefer => {
                return Ok(ServerStream::Plain(tcp))
            }
            [SSL_REFUSED] => {
                return Err(ServerTlsError::NotOffered {
                    address: address.to_string(),
                    mode: self.mode,
                }
                .into())
            }
            [other] => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("server {address} answered {other:#04x} to SSLRequest"),
                )
                .into())
            }
        }
        let name = server_name(address).map_err(tls_error)?;
        match connector.connect(name, tcp).await {
            Ok(stream) => Ok(ServerStream::Tls(Box::new(stream))),
            // tokio-rustls reports TLS failures (a certificate refused, an
            // alert from the server) as io errors wrapping rustls' error.
            Err(err) => match err
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
            {
                Some(rustls_error) => Err(tls_error(rustls_error.to_string()).into()),
                None => Err(err.into()),
            },
        }
    }
}

/// The name the server's certificate must carry: the host of `address`,
/// an IP literal (IPv6 without brackets) or a DNS name.
fn server_name(address: &str) -> Result<ServerName<'static>, String> {
    let endpoint: Endpoint = address.parse()?;
    ServerName::try_from(endpoint.host.clone())
        .map_err(|err| format!("{:?} is not a valid TLS server name: {err}", endpoint.host))
}

fn client_config(config: &ServerTlsConfig) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match config.sslmode {
        ServerSslMode::VerifyFull | ServerSslMode::VerifyCa => {
            // Config validation requires `ca` here; a hand-built config
            // without one must not fall back to checking nothing.
            let ca = config
                .ca
                .as_ref()
                .ok_or(TlsError::MissingServerCa(config.sslmode))?;
            let roots = Arc::new(load_roots(ca)?);
            if config.sslmode == ServerSslMode::VerifyFull {
                builder.with_root_certificates(roots)
            } else {
                let chain = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|source| TlsError::ClientVerifier {
                        file: ca.clone(),
                        source,
                    })?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier { chain }))
            }
        }
        ServerSslMode::Disable | ServerSslMode::Prefer | ServerSslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider })),
    };
    let mut tls = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certificates(cert)?, load_private_key(key)?)
            .map_err(|source| TlsError::Identity {
                cert: cert.clone(),
                key: key.clone(),
                source,
            })?,
        _ => builder.with_no_client_auth(),
    };
    // PostgreSQL 17 checks the ALPN name when a client offers one.
    tls.alpn_protocols = vec![crate::tls::POSTGRESQL_ALPN.to_vec()];
    Ok(tls)
}

/// `sslmode=require`: the connection is encrypted, but any certificate is
/// accepted (as libpq's require without a root file), so it does not stop
/// a man in the middle. The handshake's signatures are still checked
/// against the certificate presented.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode=verify-ca`: rustls' verifier, with a certificate for another
/// name accepted. rustls checks the name only after the chain, so a
/// name error means the chain was good.
#[derive(Debug)]
struct ChainOnlyVerifier {
    chain: Arc<WebPkiServerVerifier>,
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
        let verified = self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verified {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ServerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
