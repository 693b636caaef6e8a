//! `auth = "query"`: a user's verifier fetched from the principal with the
//! session's `auth_query`, run as `auth_user` (as PgBouncer's auth_user /
//! auth_query) with the client's user name as `$1`, and cached for
//! [`CACHE_TTL`] per (database, user), found or not, so that a storm of
//! logins costs the server one query per user.
//!
//! Each lookup opens its own short connection (tokio-postgres over a
//! stream made as `[server_tls]` says) under [`QUERY_TIMEOUT`]; dropping the future drops it, so it is
//! cancel-safe. Failures are never cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::userlist::{Plaintext, Secret};
use crate::proxy::server_tls::ServerTls;

/// How long a looked-up verifier (or its absence) is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// How long one lookup (connect, log in, query) may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most cached users per session; past it, expired entries go first and
/// then the whole cache (a bound, not an eviction policy).
const CACHE_MAX: usize = 10_000;

/// Why a lookup failed (the client is told, as PgBouncer's "unexpected
/// response from login query").
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot run the auth_query as \"{user}\" on {address}: {reason}")]
    Postgres {
        user: String,
        address: String,
        /// The server's message, or the connection's error chain.
        reason: String,
    },
    #[error("the auth_query did not finish within {QUERY_TIMEOUT:?}")]
    Timeout,
    #[error("the auth_query returned {0} rows for one user")]
    Rows(usize),
    #[error(
        "the auth_query returned a secret that is neither a SCRAM-SHA-256 nor an md5 verifier"
    )]
    Unusable,
}

/// (database, user) -> when it was looked up, and its verifier if any.
type Cache = HashMap<(String, String), (Instant, Option<Secret>)>;

/// One session's auth query and its cache; lives as long as the proxy.
pub struct AuthQuery {
    user: String,
    password: Option<Plaintext>,
    query: String,
    /// The database to run it in; None: the client's own.
    dbname: Option<String>,
    /// A std mutex: held only to copy an entry, never across an await.
    cache: Mutex<Cache>,
}

impl AuthQuery {
    pub fn new(
        user: String,
        password: Option<Plaintext>,
        query: String,
        dbname: Option<String>,
    ) -> AuthQuery {
        AuthQuery {
            user,
            password,
            query,
            dbname,
            cache: Mutex::default(),
        }
    }

    /// The verifier of `user` for a client of `database`, from the cache
    /// or from the server at `address`; None when the user has none.
    pub async fn lookup(
        &self,
        address: &str,
        server_tls: &ServerTls,
        database: &str,
        user: &str,
    ) -> Result<Option<Secret>, QueryError> {
        let dbname = self.dbname.as_deref().unwrap_or(database);
        let key = (dbname.to_string(), user.to_string());
        if let Some((at, secret)) = self.cached(&key) {
            if at.elapsed() < CACHE_TTL {
                return Ok(secret);
            }
        }
        let secret =
            tokio::time::timeout(QUERY_TIMEOUT, self.run(address, server_tls, dbname, user))
                .await
                .map_err(|_| QueryError::Timeout)??;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), secret.clone()));
        Ok(secret)
    }

    fn cached(&self, key: &(String, String)) -> Option<(Instant, Option<Secret>)> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        cache.get(key).cloned()
    }

    /// Runs the query over a connection made as `[server_tls]` says, like
    /// every other connection of the proxy to a server.
    async fn run(
        &self,
        address: &str,
        server_tls: &ServerTls,
        dbname: &str,
        user: &str,
    ) -> Result<Option<Secret>, QueryError> {
        let failed = |err: tokio_postgres::Error| QueryError::Postgres {
            user: self.user.clone(),
            address: address.to_string(),
            reason: describe(&err),
        };
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "5432"));
        let mut config = tokio_postgres::Config::new();
        config
            .host(host.trim_start_matches('[').trim_end_matches(']'))
            .port(port.parse().unwrap_or(5432))
            .user(&self.user)
            .dbname(dbname)
            .application_name("pgmirror auth_query")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(QUERY_TIMEOUT);
        if let Some(password) = &self.password {
            config.password(&password.0);
        }
        let stream = server_tls
            .connect(address)
            .await
            .map_err(|err| QueryError::Postgres {
                user: self.user.clone(),
                address: address.to_string(),
                reason: err.to_string(),
            })?;
        let (client, connection) = config
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map_err(failed)?;
        let connection = tokio::spawn(connection);
        let rows = client.query(&self.query, &[&user]).await.map_err(failed);
        drop(client);
        let _ = connection.await;
        let rows = rows?;
        let row = match rows.as_slice() {
            [] => return Ok(None),
            [row] => row,
            rows => return Err(QueryError::Rows(rows.len())),
        };
        let secret: Option<String> = row.try_get(1).map_err(failed)?;
        match secret.as_deref().map(Secret::parse) {
            // No password (NULL): nobody can log in as that user.
            None => Ok(None),
            Some(Ok(Secret::Plaintext(_)) | Err(_)) => Err(QueryError::Unusable),
            Some(Ok(secret)) => Ok(Some(secret)),
        }
    }
}

/// A tokio-postgres error with what its Display leaves out: the server's
/// own message ("function ... does not exist") or the IO cause.
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}
