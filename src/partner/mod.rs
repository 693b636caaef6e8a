//! The partner agent: runs beside one PostgreSQL instance, controls it, and
//! runs its half of the log shipper.
//!
//! `policy` decides, IO-free, what to do next and what a command may do;
//! the loops only observe and carry out its decisions: `supervisor` (the
//! periodic tick), `quorum` (the witness link, the lease and automatic
//! failover), `peer` (the peer's heartbeat) and `operations` (control
//! requests and commands), all through `actions`, the one place that
//! changes PostgreSQL. `agent` is the shared context, `endpoint` the
//! mirroring endpoint, `relays` the shipper's loopback side, `fence` the
//! process that kills PostgreSQL when the lease ends, `state` the durable
//! session state, `engine` the PostgreSQL binaries, `telemetry` the
//! measures behind the metrics and `health` the HTTP endpoints a load
//! balancer asks (`policy::health` decides their answers).

pub mod actions;
pub mod agent;
pub mod endpoint;
pub mod engine;
pub mod fence;
pub mod health;
pub mod operations;
pub mod peer;
pub mod policy;
pub mod quorum;
pub mod relays;
pub mod state;
pub mod supervisor;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::PartnerConfig;
use crate::tls::EndpointTls;
use agent::Agent;
use engine::{Instance, PgBinaries, RunAs, StopMode};
use state::{SessionState, StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Engine(#[from] crate::partner::engine::EngineError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("state file belongs to session {found:?}, but the config names {configured:?}")]
    WrongSession { found: String, configured: String },
}

/// Runs the agent until `shutdown` is cancelled, then stops PostgreSQL.
pub async fn run(config: PartnerConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let tls = EndpointTls::from_config(&config.tls)?;
    let bin = PgBinaries::locate(config.postgres.bin_dir.as_deref())?;
    let run_as = RunAs::detect()?;
    let socket_dir = config.state_dir.join("run");
    std::fs::create_dir_all(&socket_dir).map_err(|source| StateError::Io {
        path: socket_dir.clone(),
        source,
    })?;
    run_as.hand_over(&socket_dir)?;
    let engine = Instance {
        bin,
        run_as,
        data_dir: config.postgres.data_dir.clone(),
        socket_dir,
        port: config.postgres.port,
    };
    let pg_major = tokio::task::spawn_blocking({
        let engine = engine.clone();
        move || engine.major_version()
    })
    .await
    .map_err(|err| StateError::Io {
        path: engine.bin.dir.clone(),
        source: std::io::Error::other(err),
    })??;
    let store = StateStore::new(&config.state_dir);
    let state = match store.load()? {
        Some(state) => state,
        None => {
            let mut state = SessionState::new(config.initial_role, config.safety, config.timeout);
            state.witness = config.witness.clone();
            store.save(&state)?;
            state
        }
    };
    if let Some(found) = &state.session {
        if *found != config.session {
            return Err(AgentError::WrongSession {
                found: found.clone(),
                configured: config.session.clone(),
            });
        }
    }

    if let Some(metrics) = config.metrics {
        crate::metrics::serve(metrics.0)?;
    }
    let health = match config.health {
        Some(addr) => Some(
            TcpListener::bind(addr.0)
                .await
                .map_err(|source| AgentError::Bind {
                    addr: addr.0,
                    source,
                })?,
        ),
        None => None,
    };
    let endpoint = TcpListener::bind(config.listen.0)
        .await
        .map_err(|source| AgentError::Bind {
            addr: config.listen.0,
            source,
        })?;
    let wal_relay = endpoint::bind_wal_relay(state.wal_relay_port).await?;
    let wal_relay_port = wal_relay
        .local_addr()
        .map(|addr| addr.port())
        .unwrap_or_default();
    let agent = Arc::new(Agent::new(
        config,
        engine,
        tls,
        store,
        state,
        pg_major,
        wal_relay_port,
        shutdown.clone(),
    ));
    let session = agent.config.session.clone();
    agent.update(|state| {
        state.wal_relay_port = Some(wal_relay_port);
        state.session = Some(session);
    })?;
    info!(
        session = %agent.config.session,
        name = %agent.config.name,
        endpoint = %endpoint.local_addr().unwrap_or(agent.config.listen.0),
        role = %agent.state().role,
        epoch = %agent.state().epoch,
        "partner agent started"
    );

    // I1: PostgreSQL never outlives this agent or its lease.
    let fence = fence::Fence::start(&agent.engine.data_dir).map_err(|source| StateError::Io {
        path: agent.engine.data_dir.clone(),
        source,
    })?;
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(endpoint::serve_endpoint(agent.clone(), endpoint));
    tasks.spawn(relays::serve_wal_relay(agent.clone(), wal_relay));
    tasks.spawn(peer::ping_peer(agent.clone()));
    tasks.spawn(quorum::ping_witness(agent.clone()));
    tasks.spawn(quorum::feed_fence(agent.clone(), fence));
    tasks.spawn(quorum::watch_quorum(agent.clone()));
    tasks.spawn(supervisor::supervise(agent.clone()));
    if let Some(health) = health {
        info!(
            addr = %health.local_addr().unwrap_or(agent.config.listen.0),
            "health endpoints started"
        );
        tasks.spawn(health::serve_health(agent.clone(), health));
    }
    tasks.close();
    shutdown.cancelled().await;
    tasks.wait().await;
    let _guard = agent.operations.lock().await;
    agent.remember(|memory| memory.expect_running = false);
    let engine = agent.engine.clone();
    if engine.postmaster_pid().is_some() {
        info!("stopping PostgreSQL");
        let _ = tokio::task::spawn_blocking(move || engine.stop(StopMode::Fast)).await;
    }
    Ok(())
}
