//! Configuration files of the long-running processes (`partner`, `witness`,
//! `proxy`): TOML read with serde into one struct per process and validated
//! at load, so that a mistake stops the process before it binds anything.
//!
//! Every error names the file, the key and what is wrong with it, e.g.
//! `proxy.toml: listen: "127.0.0.1:99999" is not a valid address`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::roles::{Role, Safety};

/// Shortest TIMEOUT accepted. The reference raises anything under 5 s to 5 s
/// (spec 30); pgmirror allows 1 s because its pings are cheap and loopback or
/// LAN deployments want fast failover. Below 1 s a GC pause or a busy core
/// would cause false failovers.
pub const MIN_TIMEOUT_SECS: u64 = 1;
/// Longest TIMEOUT accepted: past an hour nobody means "automatic" any more.
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// TIMEOUT when none is configured (spec 30).
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {key}{problem}")]
    Invalid {
        file: String,
        /// `key: ` with its trailing separator, or empty for a whole-file problem.
        key: String,
        problem: String,
    },
}

/// A problem found in one key while validating an already-parsed config.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub problem: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Checks that go beyond what the types already guarantee.
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid>;
}

/// Reads, parses and validates one configuration file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// Parses and validates configuration text; `file` is only used in errors.
pub fn parse<T: DeserializeOwned + Validate>(file: &str, text: &str) -> Result<T, ConfigError> {
    let invalid = |key: String, problem: String| ConfigError::Invalid {
        file: file.to_string(),
        key,
        problem,
    };
    let deserializer = toml::Deserializer::new(text);
    let config: T = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let line = inner
            .span()
            .map(|span| format!(" (line {})", line_of(text, span.start)))
            .unwrap_or_default();
        let key = if path == "." {
            String::new()
        } else {
            format!("{path}: ")
        };
        invalid(key, format!("{}{line}", inner.message().trim_end()))
    })?;
    config
        .validate()
        .map_err(|bad| invalid(format!("{}: ", bad.key), bad.problem))?;
    Ok(config)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A local address to listen on, `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ListenAddr(pub SocketAddr);

impl TryFrom<String> for ListenAddr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse().map(ListenAddr).map_err(|_| {
            format!("{text:?} is not a valid address (expected ip:port, e.g. \"127.0.0.1:5430\")")
        })
    }
}

/// A remote endpoint, `host:port` or the reference's `TCP://host:port`
/// (spec 51); IPv6 literals go in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("{text:?} is not a valid endpoint (expected host:port or TCP://host:port)");
        let rest = match text.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case("tcp://") => &text[6..],
            _ => text,
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 || host.contains(['/', ' ']) {
            return Err(bad());
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }
}

impl TryFrom<String> for Endpoint {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Endpoint> for String {
    fn from(endpoint: Endpoint) -> String {
        endpoint.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Whether a mirroring endpoint uses mutual TLS (spec 69-70: required by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    On,
    /// Plain TCP; only when set explicitly, and logged as a warning.
    Off,
}

/// Certificates for a mirroring endpoint: our identity and the CA that signs peers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub mode: TlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl TlsConfig {
    fn validate(&self, section: &str) -> Result<(), Invalid> {
        if self.mode == TlsMode::Off {
            return Ok(());
        }
        for (name, value) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
            if value.is_none() {
                return Err(Invalid::new(
                    format!("{section}.{name}"),
                    "missing: mutual TLS needs cert, key and ca (or set mode = \"off\" to run without TLS)",
                ));
            }
        }
        Ok(())
    }
}

fn validate_timeout(key: &str, secs: u64) -> Result<(), Invalid> {
    if (MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(Invalid::new(
            key,
            format!("{secs} is out of range ({MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS} seconds)"),
        ))
    }
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

/// The PostgreSQL instance a partner agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Directory of initdb, pg_ctl, pg_basebackup, pg_rewind; found like the
    /// test harness does when absent (PGMIRROR_PG_BIN, PATH, pg_config).
    pub bin_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Addresses PostgreSQL listens on for clients (its `listen_addresses`).
    #[serde(default = "default_pg_listen")]
    pub listen_addresses: String,
    /// host:port clients (the proxy) use to reach this PostgreSQL; by
    /// default 127.0.0.1 and `port`.
    pub advertise: Option<Endpoint>,
    /// The database superuser the agent and the replication stream use.
    #[serde(default = "default_pg_user")]
    pub user: String,
}

fn default_pg_listen() -> String {
    "127.0.0.1".into()
}

fn default_pg_user() -> String {
    "postgres".into()
}

/// `pgmirror partner`: the agent beside one PostgreSQL instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// The mirroring session (e.g. `shop`).
    pub session: String,
    /// This partner's server name as shown in status views.
    pub name: String,
    /// The role this partner takes when the session is first set up.
    pub initial_role: Role,
    /// This partner's mirroring endpoint.
    pub listen: ListenAddr,
    /// The other partner's mirroring endpoint.
    pub peer: Endpoint,
    /// The witness's endpoint, when the session has one.
    pub witness: Option<Endpoint>,
    /// Where the agent keeps its durable state (role, epoch, session state).
    pub state_dir: PathBuf,
    #[serde(default)]
    pub safety: Safety,
    /// Seconds of silence after which a connection counts as lost (spec 29-30).
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// Threads the agent's tasks run on. One (the default) keeps the WAL
    /// relays' wake-ups on one thread, the least CPU per WAL message; its
    /// blocking work (pg_ctl, pg_rewind, pg_basebackup) runs on threads of
    /// its own either way.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Prometheus metrics listener.
    pub metrics: Option<ListenAddr>,
    /// HTTP health endpoints for load balancers (`/primary`, `/replica`,
    /// `/synchronized`, `/health`, `/status`).
    pub health: Option<ListenAddr>,
    /// How many diverged copies (data directories pg_rewind could not
    /// rewind, moved aside as `DATA.diverged-<unix ms>`) are kept; older
    /// ones are removed, each with a log line.
    #[serde(default = "default_keep_diverged")]
    pub keep_diverged: usize,
    /// Warning thresholds (spec 64); none is set by default.
    #[serde(default)]
    pub warnings: WarningsConfig,
    /// While the session has no witness, the agent keeps a status sample
    /// this often (seconds) for the history view, in its state directory.
    #[serde(default = "default_history_sample_secs")]
    pub history_sample_secs: u64,
    /// Days the agent keeps its samples.
    #[serde(default = "default_history_retention_days")]
    pub history_retention_days: u64,
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub tls: TlsConfig,
}

fn default_keep_diverged() -> usize {
    2
}

/// The history view's sampling interval (issue 12).
fn default_history_sample_secs() -> u64 {
    15
}

/// How long the history is kept: the reference's monitor keeps a week.
fn default_history_retention_days() -> u64 {
    7
}

/// Both history options are at least 1: a sample every 0 s would write on
/// every ping, and a retention of 0 days would keep nothing.
fn validate_history(sample_secs: u64, retention_days: u64) -> Result<(), Invalid> {
    if sample_secs == 0 {
        return Err(Invalid::new(
            "history_sample_secs",
            "0 is out of range (at least 1 second)",
        ));
    }
    if retention_days == 0 {
        return Err(Invalid::new(
            "history_retention_days",
            "0 is out of range (at least 1 day)",
        ));
    }
    Ok(())
}

/// The partner's warning thresholds (spec 64). A breach logs a warning once
/// and sets `pgmirror_warning_breached`; `prometheus/alerts.yml` alerts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WarningsConfig {
    /// Principal: send queue above this many kilobytes.
    pub unsent_log_kb: Option<u64>,
    /// Mirror: redo queue above this many kilobytes.
    pub unrestored_log_kb: Option<u64>,
    /// Principal: the oldest unsent WAL older than this many minutes.
    pub oldest_unsent_transaction_minutes: Option<u64>,
    /// Principal: mirror commit overhead above this many milliseconds.
    pub mirror_commit_overhead_ms: Option<u64>,
}

impl Validate for PartnerConfig {
    fn validate(&self) -> Result<(), Invalid> {
        validate_name("session", &self.session)?;
        validate_name("name", &self.name)?;
        validate_timeout("timeout", self.timeout)?;
        validate_threads(self.threads)?;
        if self.postgres.port == 0 {
            return Err(Invalid::new("postgres.port", "0 is not a valid port"));
        }
        if let Some(health) = self.health {
            let taken = [("listen", Some(self.listen)), ("metrics", self.metrics)];
            if let Some((key, _)) = taken.iter().find(|(_, addr)| *addr == Some(health)) {
                return Err(Invalid::new(
                    "health",
                    format!("{} is also the {key} address", health.0),
                ));
            }
        }
        validate_history(self.history_sample_secs, self.history_retention_days)?;
        self.tls.validate("tls")
    }
}

/// `pgmirror witness`: keeps the role table and arbitrates failover.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The witness's endpoint, for partners and proxies.
    pub listen: ListenAddr,
    /// The SQLite file holding the role table.
    pub store: PathBuf,
    pub metrics: Option<ListenAddr>,
    /// How often (seconds) a status sample of each partner is kept from
    /// its reports, for the history view.
    #[serde(default = "default_history_sample_secs")]
    pub history_sample_secs: u64,
    /// Days samples and role-table history lines are kept.
    #[serde(default = "default_history_retention_days")]
    pub history_retention_days: u64,
    #[serde(default)]
    pub tls: TlsConfig,
}

impl Validate for WitnessConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.store.as_os_str().is_empty() {
            return Err(Invalid::new("store", "must name a file"));
        }
        validate_history(self.history_sample_secs, self.history_retention_days)?;
        self.tls.validate("tls")
    }
}

/// One session as the proxy sees it: where its partners are (the reference's
/// Failover Partner list, spec 56) and which client dbnames map to it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySession {
    /// The partner agents' mirroring endpoints.
    pub partners: Vec<Endpoint>,
    pub witness: Option<Endpoint>,
    /// Client dbnames routed to this session.
    #[serde(default)]
    pub databases: Vec<String>,
    /// The partners' PostgreSQL addresses, probed like libpq's
    /// `target_session_attrs=read-write` when no agent answers. Addresses
    /// the agents report are probed too.
    #[serde(default)]
    pub postgres: Vec<Endpoint>,
    /// Who authenticates this session's clients (see [`AuthMode`]).
    #[serde(default)]
    pub auth: AuthMode,
    /// PgBouncer's userlist.txt format: the verifiers for `auth =
    /// "userlist"`; for `auth = "query"`, auth_user's password.
    pub auth_file: Option<PathBuf>,
    /// `auth = "query"`: the user the auth query runs as.
    pub auth_user: Option<String>,
    /// `auth = "query"`: the query, `$1` the client's user name; by
    /// default [`DEFAULT_AUTH_QUERY`].
    pub auth_query: Option<String>,
    /// `auth = "query"`: the database the auth query runs in; by default
    /// the client's.
    pub auth_dbname: Option<String>,
    /// Server connection pooling ([`PoolMode`]); absent: none, every
    /// client gets a server connection of its own. Needs proxy-side
    /// authentication (a pooled connection was not logged in with the next
    /// client's own password).
    pub pool_mode: Option<PoolMode>,
    /// Most server connections per pool (session, database, user);
    /// default [`DEFAULT_POOL_SIZE`].
    pub pool_size: Option<usize>,
    /// Seconds an idle pooled connection is kept; default
    /// [`DEFAULT_SERVER_IDLE_TIMEOUT`].
    pub server_idle_timeout: Option<u64>,
    /// Seconds after its login a pooled connection is no longer reused;
    /// default [`DEFAULT_SERVER_LIFETIME`].
    pub server_lifetime: Option<u64>,
    /// Run on a server connection before it goes back to the pool; default
    /// [`DEFAULT_SERVER_RESET_QUERY`].
    pub server_reset_query: Option<String>,
}

/// How server connections are shared (`pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps its server connection until it leaves; then the
    /// connection is reset and serves the next client.
    Session,
    /// A client holds a server connection only for a transaction; its
    /// parameters and prepared statements are carried by the proxy.
    Transaction,
}

pub const DEFAULT_POOL_SIZE: usize = 20;
pub const DEFAULT_SERVER_IDLE_TIMEOUT: u64 = 600;
pub const DEFAULT_SERVER_LIFETIME: u64 = 3600;
pub const DEFAULT_SERVER_RESET_QUERY: &str = "DISCARD ALL";

/// A pooled session's pool settings, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: usize,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    pub reset_query: String,
}

/// PgBouncer's recommended form: a SECURITY DEFINER function, so that
/// auth_user needs no access to pg_authid (README: "Proxy authentication").
pub const DEFAULT_AUTH_QUERY: &str = "SELECT uname, phash FROM pgmirror_auth.user_lookup($1)";

/// Who authenticates a session's clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The server, through the proxy (the authentication exchange is
    /// relayed; session mode only).
    #[default]
    Passthrough,
    /// The proxy, against the verifiers of `auth_file`.
    Userlist,
    /// The proxy, against verifiers fetched with `auth_query`.
    Query,
}

impl ProxySession {
    fn validate_auth(&self, name: &str) -> Result<(), Invalid> {
        let key = |field: &str| format!("sessions.{name}.{field}");
        let set = [
            ("auth_file", self.auth_file.is_some()),
            ("auth_user", self.auth_user.is_some()),
            ("auth_query", self.auth_query.is_some()),
            ("auth_dbname", self.auth_dbname.is_some()),
        ];
        let allowed: &[&str] = match self.auth {
            AuthMode::Passthrough => &[],
            AuthMode::Userlist => &["auth_file"],
            AuthMode::Query => &["auth_file", "auth_user", "auth_query", "auth_dbname"],
        };
        if let Some((field, _)) = set
            .iter()
            .find(|(field, is_set)| *is_set && !allowed.contains(field))
        {
            let used_with = if *field == "auth_file" {
                "auth = \"userlist\" or \"query\""
            } else {
                "auth = \"query\""
            };
            return Err(Invalid::new(
                key(field),
                format!(
                    "only used with {used_with} (this session has auth = \"{}\")",
                    self.auth.name()
                ),
            ));
        }
        match self.auth {
            AuthMode::Userlist if self.auth_file.is_none() => Err(Invalid::new(
                key("auth_file"),
                "missing: auth = \"userlist\" needs a file of verifiers (PgBouncer's userlist.txt format)",
            )),
            AuthMode::Query if self.auth_user.as_deref().is_none_or(str::is_empty) => Err(Invalid::new(
                key("auth_user"),
                "missing: auth = \"query\" needs the user the auth query runs as",
            )),
            AuthMode::Query if self.auth_query.as_deref().is_some_and(|q| !q.contains("$1")) => {
                Err(Invalid::new(
                    key("auth_query"),
                    "must take the user name as $1",
                ))
            }
            _ => Ok(()),
        }
    }
}

impl ProxySession {
    /// The pool settings of a pooled session; None when it is not pooled.
    pub fn pool(&self) -> Option<PoolSettings> {
        Some(PoolSettings {
            mode: self.pool_mode?,
            size: self.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
            idle_timeout: Duration::from_secs(
                self.server_idle_timeout
                    .unwrap_or(DEFAULT_SERVER_IDLE_TIMEOUT),
            ),
            lifetime: Duration::from_secs(self.server_lifetime.unwrap_or(DEFAULT_SERVER_LIFETIME)),
            reset_query: self
                .server_reset_query
                .clone()
                .unwrap_or_else(|| DEFAULT_SERVER_RESET_QUERY.to_string()),
        })
    }

    fn validate_pool(&self, name: &str) -> Result<(), Invalid> {
        let key = |field: &str| format!("sessions.{name}.{field}");
        let set = [
            ("pool_size", self.pool_size.is_some()),
            ("server_idle_timeout", self.server_idle_timeout.is_some()),
            ("server_lifetime", self.server_lifetime.is_some()),
            ("server_reset_query", self.server_reset_query.is_some()),
        ];
        let Some(mode) = self.pool_mode else {
            return match set.iter().find(|(_, is_set)| *is_set) {
                Some((field, _)) => Err(Invalid::new(
                    key(field),
                    "only used with pool_mode = \"session\" or \"transaction\" (this session is not pooled)",
                )),
                None => Ok(()),
            };
        };
        if mode == PoolMode::Transaction && self.server_reset_query.is_some() {
            return Err(Invalid::new(
                key("server_reset_query"),
                "only used with pool_mode = \"session\": in transaction mode a connection is not \
                 reset between clients, each client's parameters are applied to it instead",
            ));
        }
        if self.auth == AuthMode::Passthrough {
            return Err(Invalid::new(
                key("pool_mode"),
                "pass-through sessions are never pooled: a server connection is logged in with \
                 its client's own password, so it cannot serve another client; set auth = \
                 \"userlist\" or \"query\" to pool",
            ));
        }
        if self.pool_size == Some(0) {
            return Err(Invalid::new(key("pool_size"), "must be at least 1"));
        }
        for (field, secs) in [
            ("server_idle_timeout", self.server_idle_timeout),
            ("server_lifetime", self.server_lifetime),
        ] {
            if secs == Some(0) {
                return Err(Invalid::new(key(field), "must be at least 1 second"));
            }
        }
        if self
            .server_reset_query
            .as_deref()
            .is_some_and(|query| query.trim().is_empty() || query.contains('\0'))
        {
            return Err(Invalid::new(
                key("server_reset_query"),
                "must be a non-empty query without NUL bytes (the default is DISCARD ALL)",
            ));
        }
        Ok(())
    }
}

impl AuthMode {
    fn name(self) -> &'static str {
        match self {
            AuthMode::Passthrough => "passthrough",
            AuthMode::Userlist => "userlist",
            AuthMode::Query => "query",
        }
    }
}

/// The admin console's login (`dbname=pgmirror`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub user: String,
    pub password: String,
    /// From where a login without TLS is accepted (default: loopback).
    #[serde(default)]
    pub plaintext: AdminPlaintext,
    /// Seconds an ALTER DATABASE statement may take to finish what it
    /// started (for FAILOVER: a wait for SYNCHRONIZED, the role switch and
    /// the new principal serving) before it fails with SQLSTATE 57014.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: u64,
}

fn default_command_timeout() -> u64 {
    60
}

/// Where the admin console accepts logins that are not over TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminPlaintext {
    /// Only from a loopback address: the password never crosses a network
    /// in the clear.
    #[default]
    Loopback,
    /// Never: TLS for every login.
    Never,
    /// From anywhere (a trusted network only).
    Anywhere,
}

impl AdminPlaintext {
    pub fn allows(self, from: std::net::IpAddr) -> bool {
        match self {
            AdminPlaintext::Loopback => from.is_loopback(),
            AdminPlaintext::Never => false,
            AdminPlaintext::Anywhere => true,
        }
    }
}

/// Never prints the password, so configs can be logged.
impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("plaintext", &self.plaintext)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// Credentials of the proxy's read-write probes (`SELECT pg_is_in_recovery()`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    #[serde(default = "default_pg_user")]
    pub user: String,
    pub password: Option<String>,
    #[serde(default = "default_probe_database")]
    pub database: String,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            user: default_pg_user(),
            password: None,
            database: default_probe_database(),
        }
    }
}

fn default_probe_database() -> String {
    "postgres".into()
}

/// Never prints the password.
impl fmt::Debug for ProbeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeConfig")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .finish()
    }
}

/// Server certificate for TLS to clients; absent means SSLRequest gets 'N'.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the proxy secures its connections to the servers (libpq's sslmode,
/// PgBouncer's `server_tls_sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Plain TCP, no SSLRequest.
    #[default]
    Disable,
    /// TLS when the server offers it, plain TCP when it answers 'N'.
    Prefer,
    /// TLS or nothing; the server's certificate is not checked.
    Require,
    /// TLS with the certificate chain checked against `ca`, not its name.
    VerifyCa,
    /// TLS with the chain checked against `ca` and the certificate valid
    /// for the server's host (an IP address as an IP SAN).
    VerifyFull,
}

impl ServerSslMode {
    /// Whether the server's certificate is checked against `ca`.
    pub fn verifies(self) -> bool {
        matches!(self, ServerSslMode::VerifyCa | ServerSslMode::VerifyFull)
    }
}

impl fmt::Display for ServerSslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerSslMode::Disable => "disable",
            ServerSslMode::Prefer => "prefer",
            ServerSslMode::Require => "require",
            ServerSslMode::VerifyCa => "verify-ca",
            ServerSslMode::VerifyFull => "verify-full",
        })
    }
}

/// `[server_tls]` of the proxy: TLS to the servers, for the data path,
/// cancel requests and read-write probes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    #[serde(default)]
    pub sslmode: ServerSslMode,
    /// The CA that signs the servers' certificates (verify-ca, verify-full).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, for servers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ServerTlsConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let mode = self.sslmode;
        match (&self.ca, mode.verifies()) {
            (None, true) => {
                return Err(Invalid::new(
                    "server_tls.ca",
                    format!("missing: sslmode = \"{mode}\" checks the servers' certificates against a CA file"),
                ))
            }
            (Some(_), false) => {
                // libpq would quietly verify with it under require; here
                // the mode alone says what is checked.
                return Err(Invalid::new(
                    "server_tls.ca",
                    format!("only used by sslmode = \"verify-ca\" or \"verify-full\"; with \"{mode}\" no certificate is checked"),
                ));
            }
            _ => {}
        }
        match (&self.cert, &self.key) {
            (Some(_), None) | (None, Some(_)) => Err(Invalid::new(
                "server_tls",
                "cert and key go together (a client certificate and its private key)",
            )),
            (Some(_), Some(_)) if mode == ServerSslMode::Disable => Err(Invalid::new(
                "server_tls.cert",
                "a client certificate needs TLS: sslmode = \"disable\" never sends it",
            )),
            _ => Ok(()),
        }
    }
}

fn default_proxy_listen() -> ListenAddr {
    ListenAddr(SocketAddr::from(([127, 0, 0, 1], 6432)))
}
fn default_max_clients() -> usize {
    1000
}
/// More threads than any machine a process runs on has cores.
const MAX_THREADS: usize = 1024;
fn default_threads() -> usize {
    1
}

/// A process's `threads`: 1 up to [`MAX_THREADS`].
fn validate_threads(threads: usize) -> Result<(), Invalid> {
    if (1..=MAX_THREADS).contains(&threads) {
        Ok(())
    } else {
        Err(Invalid::new(
            "threads",
            format!("must be 1 to {MAX_THREADS} (1, the default, suits most machines)"),
        ))
    }
}
fn default_startup_timeout() -> u64 {
    10
}
fn default_hold_timeout() -> u64 {
    30
}

/// `[tcp]` of the proxy: how a dead peer is noticed on an idle or stuck
/// connection (a client that vanished, a server behind a cut link).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Seconds of silence before the first keepalive probe; 0 turns
    /// keepalives off.
    pub keepalive_idle: u64,
    /// Seconds between probes.
    pub keepalive_interval: u64,
    /// Unanswered probes before the connection is dropped.
    pub keepalive_count: u32,
    /// Seconds sent data may stay unacknowledged before the connection is
    /// dropped (TCP_USER_TIMEOUT); 0 leaves the system's default, as
    /// PgBouncer's tcp_user_timeout does.
    pub user_timeout: u64,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            keepalive_idle: 30,
            keepalive_interval: 10,
            keepalive_count: 3,
            user_timeout: 0,
        }
    }
}

/// `pgmirror proxy`: routes clients to the current principal.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_proxy_listen")]
    pub listen: ListenAddr,
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Threads that serve clients. One (the default, as PgBouncer) costs
    /// the least CPU per transaction: no wake-up crosses threads. More
    /// spread clients over work-stealing workers, for a proxy with cores
    /// of its own.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Seconds a client has to finish startup and authentication.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: u64,
    /// Seconds a new connection is held while no principal serves.
    #[serde(default = "default_hold_timeout")]
    pub hold_timeout: u64,
    /// TCP keepalive and TCP_USER_TIMEOUT on client and server sockets.
    #[serde(default)]
    pub tcp: TcpConfig,
    /// The session for dbnames no session lists.
    pub default_session: Option<String>,
    pub metrics: Option<ListenAddr>,
    pub tls: Option<ClientTlsConfig>,
    /// TLS to the servers; plain TCP by default.
    #[serde(default)]
    pub server_tls: ServerTlsConfig,
    pub admin: Option<AdminConfig>,
    /// The proxy's certificate for the partner agents' mirroring endpoints
    /// (mutual TLS); absent means plain TCP, with a warning.
    pub endpoint_tls: Option<TlsConfig>,
    #[serde(default)]
    pub probe: ProbeConfig,
    /// Where the proxy keeps the highest epoch seen per session, so that a
    /// restarted proxy never routes below it (I4). Without it the proxy
    /// starts from nothing and warns.
    pub state_dir: Option<PathBuf>,
    pub sessions: BTreeMap<String, ProxySession>,
}

impl Validate for ProxyConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.sessions.is_empty() {
            return Err(Invalid::new("sessions", "at least one session is needed"));
        }
        for (name, session) in &self.sessions {
            validate_name(&format!("sessions.{name}"), name)?;
            if session.partners.is_empty() {
                return Err(Invalid::new(
                    format!("sessions.{name}.partners"),
                    "at least one partner endpoint is needed",
                ));
            }
            session.validate_auth(name)?;
            session.validate_pool(name)?;
        }
        if let Some(default) = &self.default_session {
            if !self.sessions.contains_key(default) {
                return Err(Invalid::new(
                    "default_session",
                    format!("{default:?} is not one of the [sessions]"),
                ));
            }
        }
        if self.max_clients == 0 {
            return Err(Invalid::new("max_clients", "must be at least 1"));
        }
        validate_threads(self.threads)?;
        if let Some(tls) = &self.endpoint_tls {
            tls.validate("endpoint_tls")?;
        }
        self.server_tls.validate()?;
        if self.tcp.keepalive_idle > 0
            && (self.tcp.keepalive_interval == 0 || self.tcp.keepalive_count == 0)
        {
            return Err(Invalid::new(
                "tcp",
                "keepalive_interval and keepalive_count must be at least 1 when keepalive_idle is set (keepalive_idle = 0 turns keepalives off)",
            ));
        }
        if let Some(admin) = &self.admin {
            validate_timeout("admin.command_timeout", admin.command_timeout)?;
        }
        validate_timeout("startup_timeout", self.startup_timeout)?;
        validate_timeout("hold_timeout", self.hold_timeout)
    }
}

/// Session and server names end up in file names, metric labels and SQL
/// identifiers, so they are kept to a safe alphabet.
fn validate_name(key: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            key,
            format!("{name:?} is not a valid name (1-63 letters, digits, '_' or '-')"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: &str = r#"
listen = "127.0.0.1:6432"
[sessions.shop]
partners = ["127.0.0.1:5431", "TCP://[::1]:5441"]
"#;

    #[test]
    fn endpoints_accept_reference_and_ipv6_forms() {
        let config: ProxyConfig = parse("proxy.toml", PROXY).unwrap();
        let partners = &config.sessions["shop"].partners;
        assert_eq!(partners[0].to_string(), "127.0.0.1:5431");
        assert_eq!(partners[1].host, "::1");
        assert_eq!(partners[1].to_string(), "[::1]:5441");
    }

    #[test]
    fn bad_listen_address_names_file_key_and_value() {
        let text = PROXY.replace("127.0.0.1:6432", "127.0.0.1:99999");
        let err = parse::<ProxyConfig>("proxy.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(r#"proxy.toml: listen: "127.0.0.1:99999" is not a valid address"#),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let text = format!("default_session = \"nope\"\n{PROXY}");
        let err = parse::<ProxyConfig>("p.toml", &text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"p.toml: default_session: "nope" is not one of the [sessions]"#
        );
    }

    #[test]
    fn the_proxy_runs_on_one_thread_unless_told_otherwise() {
        let config: ProxyConfig = parse("proxy.toml", PROXY).unwrap();
        assert_eq!(config.threads, 1);
        let config: ProxyConfig = parse("proxy.toml", &format!("threads = 4\n{PROXY}")).unwrap();
        assert_eq!(config.threads, 4);
        let err = parse::<ProxyConfig>("p.toml", &format!("threads = 0\n{PROXY}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "p.toml: threads: must be 1 to 1024 (1, the default, suits most machines)"
        );
    }

    #[test]
    fn server_tls_defaults_to_disable_and_checks_its_ca() {
        let config: ProxyConfig = parse("proxy.toml", PROXY).unwrap();
        assert_eq!(config.server_tls.sslmode, ServerSslMode::Disable);
        let with = |section: &str| {
            let text = format!("{PROXY}[server_tls]\n{section}\n");
            parse::<ProxyConfig>("p.toml", &text).map_err(|err| err.to_string())
        };
        let config = with("sslmode = \"verify-full\"\nca = \"/etc/ca.crt\"").unwrap();
        assert_eq!(config.server_tls.sslmode, ServerSslMode::VerifyFull);
        assert_eq!(
            with("sslmode = \"verify-ca\"").unwrap_err(),
            r#"p.toml: server_tls.ca: missing: sslmode = "verify-ca" checks the servers' certificates against a CA file"#
        );
        assert_eq!(
            with("sslmode = \"require\"\nca = \"/etc/ca.crt\"").unwrap_err(),
            r#"p.toml: server_tls.ca: only used by sslmode = "verify-ca" or "verify-full"; with "require" no certificate is checked"#
        );
        assert!(with("sslmode = \"require\"\ncert = \"c.crt\"")
            .unwrap_err()
            .starts_with("p.toml: server_tls: cert and key go together"));
        let err = with("sslmode = \"verify\"").unwrap_err();
        assert!(
            err.starts_with("p.toml: server_tls.sslmode: unknown variant `verify`"),
            "{err}"
        );
    }

    #[test]
    fn auth_keys_are_checked_against_the_mode() {
        let error = |lines: &str| {
            parse::<ProxyConfig>("p.toml", &format!("{PROXY}{lines}"))
                .unwrap_err()
                .to_string()
        };
        let config: ProxyConfig = parse("p.toml", PROXY).unwrap();
        assert_eq!(config.sessions["shop"].auth, AuthMode::Passthrough);
        assert_eq!(
            error("auth = \"userlist\"\n"),
            "p.toml: sessions.shop.auth_file: missing: auth = \"userlist\" needs a file of \
             verifiers (PgBouncer's userlist.txt format)"
        );
        assert_eq!(
            error("auth_user = \"lookup\"\n"),
            "p.toml: sessions.shop.auth_user: only used with auth = \"query\" (this session has \
             auth = \"passthrough\")"
        );
        assert!(error("auth = \"query\"\n").contains("sessions.shop.auth_user: missing"));
        assert!(
            error("auth = \"query\"\nauth_user = \"a\"\nauth_query = \"SELECT 1\"\n")
                .contains("must take the user name as $1")
        );
        assert!(error("auth = \"ldap\"\n").contains("sessions.shop.auth: unknown variant"));
        let query: ProxyConfig = parse(
            "p.toml",
            &format!("{PROXY}auth = \"query\"\nauth_user = \"lookup\"\n"),
        )
        .unwrap();
        assert_eq!(query.sessions["shop"].auth, AuthMode::Query);
    }

    #[test]
    fn pool_keys_need_session_mode_and_proxy_side_authentication() {
        let userlist = "auth = \"userlist\"\nauth_file = \"u.txt\"\n";
        let parsed = |lines: &str| parse::<ProxyConfig>("p.toml", &format!("{PROXY}{lines}"));
        let error = |lines: &str| parsed(lines).unwrap_err().to_string();
        assert_eq!(
            parse::<ProxyConfig>("p.toml", PROXY).unwrap().sessions["shop"].pool(),
            None
        );
        let pooled = parsed(&format!("{userlist}pool_mode = \"session\"\n")).unwrap();
        assert_eq!(
            pooled.sessions["shop"].pool(),
            Some(PoolSettings {
                mode: PoolMode::Session,
                size: 20,
                idle_timeout: Duration::from_secs(600),
                lifetime: Duration::from_secs(3600),
                reset_query: "DISCARD ALL".into(),
            })
        );
        let transaction = parsed(&format!("{userlist}pool_mode = \"transaction\"\n")).unwrap();
        assert_eq!(
            transaction.sessions["shop"].pool().map(|pool| pool.mode),
            Some(PoolMode::Transaction)
        );
        assert!(error(&format!(
            "{userlist}pool_mode = \"transaction\"\nserver_reset_query = \"DISCARD ALL\"\n"
        ))
        .contains("server_reset_query: only used with pool_mode = \"session\""));
        assert!(error("pool_mode = \"transaction\"\n").starts_with(
            "p.toml: sessions.shop.pool_mode: pass-through sessions are never pooled"
        ));
        assert!(error("pool_mode = \"session\"\n").starts_with(
            "p.toml: sessions.shop.pool_mode: pass-through sessions are never pooled"
        ));
        assert_eq!(
            error(&format!("{userlist}pool_size = 5\n")),
            "p.toml: sessions.shop.pool_size: only used with pool_mode = \"session\" or \
             \"transaction\" (this session is not pooled)"
        );
        let session = format!("{userlist}pool_mode = \"session\"\n");
        assert!(
            error(&format!("{session}pool_size = 0\n")).contains("pool_size: must be at least 1")
        );
        assert!(error(&format!("{session}server_lifetime = 0\n"))
            .contains("server_lifetime: must be at least 1 second"));
        assert!(error(&format!("{session}server_reset_query = \" \"\n"))
            .contains("server_reset_query: must be a non-empty query"));
        assert!(error("pool_mode = \"statement\"\n").contains("pool_mode: unknown variant"));
    }
}
