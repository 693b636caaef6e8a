//! Proxy-side authentication, per session (`auth` in `[sessions.<name>]`):
//! `passthrough` (the default) leaves authentication to the server, as
//! before; `userlist` and `query` make the proxy authenticate the client
//! itself, with SCRAM-SHA-256 (and -PLUS, bound to the proxy's own
//! certificate, over TLS) or md5, against a verifier from the `auth_file`
//! or from the principal's `auth_query`, and then log in to the server as
//! that client with what the client proved (a SCRAM ClientKey, or the md5
//! verifier): no plaintext password of a client is needed anywhere.
//!
//! [`Auth`] is built once at startup from the config; [`Auth::authenticate`]
//! runs the client side before the proxy connects (so an unauthenticated
//! client never costs a server connection) and [`Login::log_in`] the server
//! side, on the fresh server connection, before the splice forwards the
//! server's AuthenticationOk, ParameterStatus and the rest. Both are
//! cancel-safe: dropping them drops the sockets' use, nothing else.

mod exchange;
pub mod md5;
pub mod query;
pub mod scram;
pub mod userlist;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::{digest, hmac};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use x509_certificate::certificate::CapturedX509Certificate;
use x509_certificate::SignatureAlgorithm;

use crate::config::{AuthMode, ProxyConfig, DEFAULT_AUTH_QUERY};
use crate::proxy::routing::Route;
use crate::proxy::server_tls::ServerTls;
use crate::wire::auth::AuthWireError;
use md5::Md5Verifier;
use query::{AuthQuery, QueryError};
use scram::{Binding, ClientKey, ScramError, ScramVerifier};
use userlist::{Secret, Userlist, UserlistError};

/// Where a session's verifiers come from.
enum Verifiers {
    Passthrough,
    Userlist(Userlist),
    Query(AuthQuery),
}

/// Every session's authentication, and what the SCRAM exchanges share.
pub struct Auth {
    sessions: BTreeMap<String, Verifiers>,
    /// Derives decoy salts for unknown users; random per process.
    mock_key: hmac::Key,
    /// tls-server-end-point hash of the proxy's certificate (RFC 5929),
    /// when it has one whose signature algorithm defines the hash.
    end_point: Option<Vec<u8>>,
}

/// Authentication could not be set up at startup.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("sessions.{session}.auth_file: {source}")]
    Userlist {
        session: String,
        #[source]
        source: UserlistError,
    },
    #[error("{}: cannot read the certificate for channel binding: {reason}", file.display())]
    Certificate { file: PathBuf, reason: String },
}

/// Why a client was not let in, or its server login failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// PostgreSQL's words, for a wrong password and an unknown user alike.
    #[error("password authentication failed for user \"{0}\"")]
    WrongPassword(String),
    #[error("{0}")]
    Protocol(String),
    #[error("malformed authentication message: {0}")]
    Wire(#[from] AuthWireError),
    #[error("auth_query failed (unexpected response from login query): {0}")]
    Query(#[from] QueryError),
    #[error("no principal of the session is serving to run the auth_query; try again later")]
    NoPrincipal,
    #[error("the server asks for {asked} authentication of user \"{user}\", which the proxy cannot answer with the {held} verifier it holds")]
    ServerMethod {
        user: String,
        asked: String,
        held: &'static str,
    },
    #[error("logging in to the server: {0}")]
    Server(String),
    #[error("the client did not finish authentication within startup_timeout")]
    Timeout,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

impl From<ScramError> for AuthError {
    fn from(err: ScramError) -> Self {
        match err {
            // Mapped by the caller, who knows the user.
            ScramError::WrongProof => AuthError::Protocol(err.to_string()),
            ScramError::Protocol(message) => AuthError::Protocol(message),
            ScramError::Server(message) => AuthError::Server(message),
        }
    }
}

impl AuthError {
    /// The SQLSTATE the client is told; None for a client that left.
    pub fn sqlstate(&self) -> Option<&'static str> {
        match self {
            AuthError::Io(_) => None,
            AuthError::WrongPassword(_) => Some("28P01"),
            AuthError::ServerMethod { .. } => Some("28000"),
            AuthError::Protocol(_) | AuthError::Wire(_) | AuthError::Query(_) => Some("08P01"),
            AuthError::NoPrincipal => Some("57P03"),
            AuthError::Server(_) | AuthError::Timeout => Some("08006"),
        }
    }

    /// The ErrorResponse text: PostgreSQL's own for a failed password,
    /// else marked as the proxy's.
    pub fn client_message(&self) -> String {
        match self {
            AuthError::WrongPassword(_) => self.to_string(),
            _ => format!("pgmirror proxy: {self}"),
        }
    }
}

/// Who a client says it is, from its startup packet and socket.
#[derive(Debug, Clone, Copy)]
pub struct ClientId<'a> {
    pub session: &'a str,
    pub user: &'a str,
    pub database: &'a str,
    /// Whether it came over the proxy's TLS (channel binding possible).
    pub tls: bool,
}

/// What a client proved: enough to log in to the server as it.
#[derive(Clone)]
pub enum Login {
    Scram {
        client_key: ClientKey,
        verifier: ScramVerifier,
    },
    Md5(Md5Verifier),
}

impl Auth {
    /// Reads every session's auth_file and the proxy's certificate.
    pub fn from_config(config: &ProxyConfig) -> Result<Auth, AuthSetupError> {
        let mut sessions = BTreeMap::new();
        for (name, session) in &config.sessions {
            let userlist = match &session.auth_file {
                Some(file) => Userlist::load(file).map_err(|source| AuthSetupError::Userlist {
                    session: name.clone(),
                    source,
                })?,
                None => Userlist::default(),
            };
            let verifiers = match session.auth {
                AuthMode::Passthrough => Verifiers::Passthrough,
                AuthMode::Userlist => Verifiers::Userlist(userlist),
                AuthMode::Query => {
                    // Validation made sure auth_user is set.
                    let user = session.auth_user.clone().unwrap_or_default();
                    let password = match userlist.get(&user) {
                        Some(Secret::Plaintext(password)) => Some(password.clone()),
                        Some(_) => {
                            tracing::warn!(session = %name, "auth_file holds a verifier for auth_user \"{user}\", which cannot log in; the auth query logs in without a password (pg_hba trust or cert for the proxy)");
                            None
                        }
                        None => None,
                    };
                    let query = session
                        .auth_query
                        .clone()
                        .unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_string());
                    Verifiers::Query(AuthQuery::new(
                        user,
                        password,
                        query,
                        session.auth_dbname.clone(),
                    ))
                }
            };
            sessions.insert(name.clone(), verifiers);
        }
        let needs_binding = sessions
            .values()
            .any(|verifiers| !matches!(verifiers, Verifiers::Passthrough));
        let end_point = match &config.tls {
            Some(tls) if needs_binding => tls_server_end_point(&tls.cert)?,
            _ => None,
        };
        let mock_secret: [u8; 32] = rand::random();
        Ok(Auth {
            sessions,
            mock_key: hmac::Key::new(hmac::HMAC_SHA256, &mock_secret),
            end_point,
        })
    }

    /// Authenticates `who` on `client`, when its session authenticates in
    /// the proxy; None for pass-through. `routes` names the principal an
    /// auth query runs on (waited for up to `hold_timeout`); the exchange
    /// with the client runs until `deadline`.
    pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        who: &ClientId<'_>,
        client: &mut S,
        routes: &mut watch::Receiver<Route>,
        server_tls: &ServerTls,
        hold_timeout: Duration,
        deadline: Instant,
    ) -> Result<Option<Login>, AuthError> {
        let ClientId {
            session,
            user,
            database,
            tls,
        } = *who;
        let secret = match self.sessions.get(session) {
            None | Some(Verifiers::Passthrough) => return Ok(None),
            Some(Verifiers::Userlist(list)) => list.get(user).cloned(),
            Some(Verifiers::Query(query)) => {
                let address = principal_address(routes, hold_timeout).await?;
                query.lookup(&address, server_tls, database, user).await?
            }
        };
        let binding = match (&self.end_point, tls) {
            (Some(hash), true) => Binding::EndPoint(hash.clone()),
            _ => Binding::Unavailable,
        };
        let verifier = match secret {
            Some(Secret::Md5(verifier)) => {
                return exchange::client_md5(client, user, verifier, deadline)
                    .await
                    .map(Some)
            }
            Some(Secret::Scram(verifier)) => verifier,
            // Unknown, or a plaintext entry (which serves only auth_user):
            // a full exchange that cannot succeed, as PostgreSQL's mock
            // authentication, so that nobody learns which users exist.
            Some(Secret::Plaintext(_)) | None => ScramVerifier::decoy(user, &self.mock_key),
        };
        exchange::client_scram(client, user, verifier, &binding, deadline)
            .await
            .map(Some)
    }
}

impl Login {
    /// Answers the server's authentication requests on a fresh connection
    /// whose first bytes are in `pending`, until the server's
    /// AuthenticationOk or ErrorResponse, which stay in `pending` for the
    /// client.
    pub async fn log_in<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        server: &mut S,
        pending: &mut Vec<u8>,
        user: &str,
        deadline: Instant,
    ) -> Result<(), AuthError> {
        exchange::server_login(self, server, pending, user, deadline).await
    }
}

/// The current principal's address, waiting for one up to `hold_timeout`.
async fn principal_address(
    routes: &mut watch::Receiver<Route>,
    hold_timeout: Duration,
) -> Result<String, AuthError> {
    let deadline = Instant::now() + hold_timeout;
    loop {
        if let Some(principal) = &routes.borrow().principal {
            return Ok(principal.address.clone());
        }
        match tokio::time::timeout_at(deadline, routes.changed()).await {
            Ok(Ok(())) => {}
            _ => return Err(AuthError::NoPrincipal),
        }
    }
}

/// The tls-server-end-point channel binding data of the certificate in
/// `file` (RFC 5929 section 4.1): a hash of its DER with the signature's
/// hash function, SHA-256 for MD5 and SHA-1. None (a warning) for
/// algorithms where RFC 5929 defines none (Ed25519): SCRAM-SHA-256-PLUS is
/// then not offered.
fn tls_server_end_point(file: &Path) -> Result<Option<Vec<u8>>, AuthSetupError> {
    let failed = |reason: String| AuthSetupError::Certificate {
        file: file.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(file).map_err(|err| failed(err.to_string()))?;
    let certs =
        CapturedX509Certificate::from_pem_multiple(&pem).map_err(|err| failed(err.to_string()))?;
    let cert = certs
        .first()
        .ok_or_else(|| failed("no certificate in the file".into()))?;
    let algorithm = match cert.signature_algorithm() {
        Some(
            SignatureAlgorithm::RsaSha1
            | SignatureAlgorithm::RsaSha256
            | SignatureAlgorithm::EcdsaSha256,
        ) => &digest::SHA256,
        Some(SignatureAlgorithm::RsaSha384 | SignatureAlgorithm::EcdsaSha384) => &digest::SHA384,
        Some(SignatureAlgorithm::RsaSha512) => &digest::SHA512,
        other => {
            tracing::warn!(file = %file.display(), ?other, "no tls-server-end-point hash for this certificate's signature algorithm: SCRAM-SHA-256-PLUS is not offered");
            return Ok(None);
        }
    };
    Ok(Some(
        digest::digest(algorithm, cert.constructed_data())
            .as_ref()
            .to_vec(),
    ))
}
