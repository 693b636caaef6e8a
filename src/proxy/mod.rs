//! `pgmirror proxy`: accepts PostgreSQL connections, routes each to its
//! session's current principal (invariant I4) and splices bytes both ways;
//! `dbname=pgmirror` reaches the admin console instead.
//!
//! [`serve`] takes an already-bound listener and a shutdown token (tests
//! bind port 0). It caps connections with a semaphore acquired before
//! `accept`; on shutdown it stops accepting, tells spliced clients (FATAL
//! 57P01) and waits up to [`SHUTDOWN_GRACE`] for connection tasks.
//! Submodules: `connection` (one client), `routing` (principal discovery),
//! `clients` (cancel keys and the client registry), `console` (pgwire),
//! `commands` (console statements carried out until the views show them),
//! `fence` (the commit fence: a commit whose wait for the mirror was cut
//! short reaches the client as 40003, invariant I2), `server_tls` (TLS to
//! the servers), `auth` (proxy-side authentication: SCRAM and md5 against
//! a userlist or an auth query), `pool` (server connection pools of
//! sessions with proxy-side authentication, session mode).

pub mod auth;
pub mod clients;
pub mod commands;
pub mod connection;
pub mod console;
pub mod console_door;
pub mod epochs;
pub mod fence;
pub mod pool;
pub mod routing;
pub mod server_tls;
pub mod socket;
mod splice;
pub mod transaction;
mod wake_filter;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ProxyConfig, TlsConfig, TlsMode};
use crate::tls::{EndpointTls, TlsError};
use clients::Clients;
use routing::{Discoverer, Route};
use server_tls::ServerTls;

/// How long connection tasks get to finish after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections accepted beyond `max_clients` only to be told 53300 at
/// once: a few at a time, so that refusing stays cheap.
const REFUSAL_SLOTS: usize = 16;

/// The slot an accepted connection holds while it runs: a client slot
/// (`admitted`), or a refusal slot (it gets 53300, or the admin console).
struct Admission {
    _slot: OwnedSemaphorePermit,
    admitted: bool,
}

impl Admission {
    fn new(slot: OwnedSemaphorePermit, admitted: bool) -> Self {
        Admission {
            _slot: slot,
            admitted,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("admin console socket: {0}")]
    Console(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("authentication: {0}")]
    Auth(#[from] auth::AuthSetupError),
}

/// What every connection task reads; built once by [`serve`].
pub struct Context {
    pub startup_timeout: Duration,
    pub hold_timeout: Duration,
    pub tcp: crate::config::TcpConfig,
    /// `max_clients`, for the refusal of one more.
    pub max_clients: usize,
    /// dbname -> session, plus the default.
    databases: BTreeMap<String, String>,
    default_session: Option<String>,
    routes: BTreeMap<String, watch::Receiver<Route>>,
    pub clients: Clients,
    pub tls: Option<TlsAcceptor>,
    /// How server connections are opened (`[server_tls]`, `[tcp]`).
    pub server_tls: ServerTls,
    pub admin_socket: Option<PathBuf>,
    pub admin_plaintext: crate::config::AdminPlaintext,
    pub console_logins: console_door::LoginLimiter,
    /// Each session's authentication: pass-through or in the proxy.
    pub auth: auth::Auth,
    /// The server connection pools of pooled sessions.
    pub pools: pool::Pools,
    pub bytes: splice::ByteCounters,
    pub shutdown: CancellationToken,
}

impl Context {
    /// The session a dbname routes to and its route channel.
    pub fn route_for(&self, database: &str) -> Option<(String, watch::Receiver<Route>)> {
        let session = self
            .databases
            .get(database)
            .or(self.default_session.as_ref())?;
        Some((session.clone(), self.routes.get(session)?.clone()))
    }
}

/// Binds `config.listen` and serves until `shutdown`.
pub async fn run(config: ProxyConfig, shutdown: CancellationToken) -> Result<(), ProxyError> {
    let address = config.listen.0;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| ProxyError::Bind {
            address: address.to_string(),
            source,
        })?;
    // The port actually bound, which differs from the config's for port 0.
    let address = listener.local_addr().unwrap_or(address);
    tracing::info!(%address, "proxy listening");
    if let Some(metrics) = config.metrics {
        crate::metrics::serve(metrics.0)?;
    }
    serve(listener, config, shutdown).await
}

/// Serves clients on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    socket::tune_listener(&listener, &config.tcp).map_err(|source| ProxyError::Bind {
        address: listener.local_addr().map_or_else(
            |_| "the proxy's socket".into(),
            |address| address.to_string(),
        ),
        source,
    })?;
    let tls = match &config.tls {
        Some(files) => Some(crate::tls::client_facing_acceptor(&files.cert, &files.key)?),
        None => None,
    };
    let auth = auth::Auth::from_config(&config)?;
    let endpoint_tls =
        EndpointTls::from_config(&config.endpoint_tls.clone().unwrap_or(TlsConfig {
            mode: TlsMode::Off,
            ..Default::default()
        }))?;
    let server_tls = ServerTls::new(&config.server_tls, config.tcp.clone())?;
    if config.state_dir.is_none() {
        tracing::warn!(
            "no state_dir: the highest epoch seen is not kept across restarts, so a restarted \
             proxy may probe its way to a fenced principal; set state_dir (I4)"
        );
    }
    let tracker = TaskTracker::new();
    let mut routes = BTreeMap::new();
    let mut databases = BTreeMap::new();
    let mut console_sessions = BTreeMap::new();
    for (name, session) in &config.sessions {
        let (publish, receive) = watch::channel(Route {
            partners: Vec::new(),
            ..Default::default()
        });
        for database in &session.databases {
            databases.insert(database.clone(), name.clone());
        }
        // A session's own name routes to it too.
        databases
            .entry(name.clone())
            .or_insert_with(|| name.clone());
        let discoverer = Discoverer {
            session: name.clone(),
            config: session.clone(),
            probe: config.probe.clone(),
            tls: endpoint_tls.clone(),
            server_tls: server_tls.clone(),
            publish,
            epochs: config
                .state_dir
                .as_deref()
                .map(|dir| epochs::EpochStore::new(dir, name)),
        };
        tracker.spawn(discoverer.run(shutdown.clone()));
        console_sessions.insert(name.clone(), (session.clone(), receive.clone()));
        routes.insert(name.clone(), receive);
    }
    let clients = Clients::default();
    let pools = pool::Pools::new(
        config
            .sessions
            .iter()
            .filter_map(|(name, session)| Some((name.clone(), session.pool()?)))
            .collect(),
    );
    for (name, route) in &routes {
        if pools.settings(name).is_some() {
            tracker.spawn(
                pools
                    .clone()
                    .keep(name.clone(), route.clone(), shutdown.clone()),
            );
        }
    }
    let console = match &config.admin {
        Some(admin) => Some(
            console::start(
                Arc::new(console::ConsoleState {
                    sessions: console_sessions,
                    clients: clients.clone(),
                    pools: pools.clone(),
                    endpoint_tls: endpoint_tls.clone(),
                    admin: admin.clone(),
                    turns: Default::default(),
                }),
                shutdown.clone(),
            )
            .map_err(ProxyError::Console)?,
        ),
        None => None,
    };
    let ctx = Arc::new(Context {
        startup_timeout: Duration::from_secs(config.startup_timeout),
        hold_timeout: Duration::from_secs(config.hold_timeout),
        tcp: config.tcp.clone(),
        max_clients: config.max_clients,
        databases,
        default_session: config.default_session.clone(),
        routes,
        clients,
        tls,
        server_tls,
        admin_socket: console.as_ref().map(|socket| socket.path.clone()),
        admin_plaintext: config
            .admin
            .as_ref()
            .map(|admin| admin.plaintext)
            .unwrap_or_default(),
        console_logins: console_door::LoginLimiter::default(),
        auth,
        pools,
        bytes: Default::default(),
        shutdown: shutdown.clone(),
    });

    let limit = Arc::new(Semaphore::new(config.max_clients));
    let refusals = Arc::new(Semaphore::new(REFUSAL_SLOTS));
    loop {
        // A client slot is taken before accept; when none is free, a
        // refusal slot lets the next client hear 53300 instead of waiting
        // unanswered in the kernel's backlog.
        let admission = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => Admission::new(permit, true),
                Err(_) => break,
            },
            refusal = refusals.clone().acquire_owned() => match refusal {
                Ok(refusal) => Admission::new(refusal, false),
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!("accept: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A client slot may have been freed while accept waited.
        let admission = if admission.admitted {
            admission
        } else {
            match limit.clone().try_acquire_owned() {
                Ok(permit) => Admission::new(permit, true),
                Err(_) => admission,
            }
        };
        let ctx = ctx.clone();
        tracker.spawn(async move {
            let admitted = admission.admitted;
            let _admission = admission;
            match connection::handle(ctx, tcp, peer, admitted).await {
                Ok(end) => tracing::debug!(%peer, ?end, "connection ended"),
                Err(err) if err.is_expected() => tracing::debug!(%peer, "connection: {err}"),
                // A person must fix the certificates or the server's ssl.
                Err(err @ connection::ConnError::ServerTls(_)) => {
                    tracing::warn!(%peer, "connection refused: {err}")
                }
                Err(err) => tracing::info!(%peer, "connection refused or failed: {err}"),
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    drop(console);
    Ok(())
}
