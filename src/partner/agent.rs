//! The running partner agent: its shared context, its two listeners (the
//! mirroring endpoint for peers and control clients, and the loopback port
//! the local walreceiver connects to) and the peer ping loop.
//!
//! `Agent` is created once by [`run`] and shared (`Arc`) by every task;
//! dropping the shutdown token ends them all. Role changes and the
//! supervisor's ticks run one at a time under `operations`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::PartnerConfig;
use crate::control::client::open;
use crate::control::{
    read_hello, ControlClient, ControlError, ControlStream, Hello, MirroringStatus, PeerView,
    Request, RoleRow, StreamPurpose,
};
use crate::partner::engine::{Instance, PgBinaries, RunAs, StopMode};
use crate::partner::state::{SessionState, StateError, StateStore};
use crate::roles::{MirroringState, Role, Safety};
use crate::shipper::positions::Positions;
use crate::shipper::relay::{relay, LinkCounters, LocalEnd, RelayEnd};
use crate::sync::lock;
use crate::tls::EndpointTls;
use crate::wire::lsn::Lsn;

/// How long a new endpoint connection has to finish TLS and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent last learned of its peer.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    pub view: Option<PeerView>,
    pub last_heard: Option<Instant>,
    pub connected: bool,
}

/// What the agent last learned from the witness.
#[derive(Debug, Clone, Default)]
pub struct WitnessStatus {
    /// The session's row in the witness's role table.
    pub row: Option<RoleRow>,
    pub last_heard: Option<Instant>,
    pub connected: bool,
}

/// What the supervisor last read from the local PostgreSQL.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    pub running: bool,
    /// Principal: flushed end of WAL; mirror: received end of WAL.
    pub end_of_log: Option<Lsn>,
    /// Mirror: replayed end of WAL.
    pub replayed: Option<Lsn>,
}

pub struct Agent {
    pub config: PartnerConfig,
    pub engine: Instance,
    pub tls: EndpointTls,
    store: StateStore,
    /// The durable state; every change goes through [`Agent::update`].
    state: Mutex<SessionState>,
    /// Serialises role changes and supervisor ticks.
    pub operations: tokio::sync::Mutex<()>,
    pub peer: Mutex<PeerStatus>,
    pub witness: Mutex<WitnessStatus>,
    /// Set while PostgreSQL is down because this principal lost quorum (I1).
    pub quorum_lost: AtomicBool,
    /// PostgreSQL runs as principal by this agent's will: its absence is a crash.
    pub expect_running: AtomicBool,
    pub observed: Mutex<Observed>,
    pub positions: Arc<Mutex<Positions>>,
    pub counters: Arc<LinkCounters>,
    /// Bumped to close every relayed stream (suspend, demotion).
    streams: watch::Sender<u64>,
    pub pg_major: u32,
    pub wal_relay_port: u16,
    pub last_error: Mutex<Option<String>>,
    pub pending_failover: AtomicBool,
    /// The synchronous_standby_names requirement PostgreSQL runs with now.
    pub applied_sync: Mutex<Option<bool>>,
    /// Since when the mirror has not been SYNCHRONIZED (principal only).
    pub unsynchronized_since: Mutex<Option<Instant>>,
    pub shutdown: CancellationToken,
    pub started_at: Instant,
}

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

impl Agent {
    /// A copy of the durable state.
    pub fn state(&self) -> SessionState {
        lock(&self.state).clone()
    }

    /// Applies `change` to the durable state and saves it before returning,
    /// so that callers act only on what is already durable.
    pub fn update(
        &self,
        change: impl FnOnce(&mut SessionState),
    ) -> Result<SessionState, StateError> {
        let mut guard = lock(&self.state);
        let mut next = guard.clone();
        change(&mut next);
        if next != *guard {
            self.store.save(&next)?;
            *guard = next.clone();
        }
        Ok(next)
    }

    pub fn peer(&self) -> PeerStatus {
        lock(&self.peer).clone()
    }

    pub fn peer_connected(&self) -> bool {
        self.peer().connected
    }

    pub fn witness_status(&self) -> WitnessStatus {
        lock(&self.witness).clone()
    }

    /// Spec 19-20: with a witness, at least two of the three must be connected.
    pub fn has_quorum(&self) -> bool {
        self.state().witness.is_none() || self.peer_connected() || self.witness_status().connected
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.state().timeout_secs)
    }

    /// Closes every relayed stream: the walreceiver reconnects and finds
    /// out what the new situation allows.
    pub fn close_streams(&self) {
        self.streams.send_modify(|generation| *generation += 1);
    }

    pub fn set_error(&self, error: Option<String>) {
        *lock(&self.last_error) = error;
    }

    pub fn slot_name(&self) -> String {
        format!(
            "pgmirror_{}",
            self.config.session.to_lowercase().replace('-', "_")
        )
    }

    /// libpq connection string to the peer's PostgreSQL through a local
    /// relay port. TLS is off inside the relay: the agent link encrypts, and
    /// the shipper reads the protocol frames.
    pub fn conninfo_via(&self, port: u16, application_name: &str) -> String {
        format!(
            "host=127.0.0.1 port={port} user={} dbname=postgres application_name={application_name} sslmode=disable gssencmode=disable",
            self.config.postgres.user
        )
    }

    /// What this partner tells its peer.
    pub fn view(&self) -> PeerView {
        let state = self.state();
        PeerView {
            session: self.config.session.clone(),
            name: self.config.name.clone(),
            role: state.role,
            epoch: state.epoch,
            state: self.current_state(&state),
            safety: state.safety,
            timeout_secs: state.timeout_secs,
            suspended: state.suspended,
            ended: state.ended,
            system_identifier: state.has_copy.then_some(state.system_identifier).flatten(),
            pg_major: self.pg_major,
            safety_sequence: state.safety_sequence,
            witness: state.witness.clone(),
        }
    }

    fn current_state(&self, state: &SessionState) -> MirroringState {
        if self.pending_failover.load(Ordering::SeqCst) {
            MirroringState::PendingFailover
        } else {
            state.state
        }
    }

    /// This partner's row of sys.database_mirroring.
    pub fn status(&self) -> MirroringStatus {
        let state = self.state();
        let peer = self.peer();
        let observed = *lock(&self.observed);
        let positions = lock(&self.positions).snapshot(Instant::now());
        let mut status = MirroringStatus {
            database_name: self.config.session.clone(),
            server_name: self.config.name.clone(),
            postgres_address: self
                .config
                .postgres
                .advertise
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("127.0.0.1:{}", self.config.postgres.port)),
            link_bytes_raw: self.counters.raw(),
            link_bytes_compressed: self.counters.compressed(),
            peer_connected: peer.connected,
            last_error: lock(&self.last_error).clone(),
            ..MirroringStatus::default()
        };
        if state.ended {
            return status;
        }
        let mirroring_state = self.current_state(&state);
        status.mirroring_guid = state.system_identifier.map(|id| format!("{id:016x}"));
        status.mirroring_state = Some(mirroring_state.code());
        status.mirroring_state_desc = Some(mirroring_state.desc().into());
        status.mirroring_role = Some(match state.role {
            Role::Principal => 1,
            Role::Mirror => 2,
        });
        status.mirroring_role_desc = Some(state.role.to_string());
        status.mirroring_role_sequence = Some(state.epoch.0);
        status.mirroring_safety_level = Some(match state.safety {
            Safety::Off => 1,
            Safety::Full => 2,
        });
        status.mirroring_safety_level_desc = Some(state.safety.to_string());
        status.mirroring_safety_sequence = Some(state.safety_sequence);
        status.mirroring_partner_name = peer
            .view
            .as_ref()
            .map(|view| view.name.clone())
            .or(state.peer_name.clone());
        status.mirroring_partner_instance = Some(self.config.peer.to_string());
        status.mirroring_connection_timeout = Some(state.timeout_secs);
        if let Some(witness) = &state.witness {
            let connected = self.witness_status().connected;
            status.mirroring_witness_name = Some(witness.to_string());
            status.mirroring_witness_state = Some(if connected { 1 } else { 2 });
            status.mirroring_witness_state_desc = Some(
                if connected {
                    "CONNECTED"
                } else {
                    "DISCONNECTED"
                }
                .into(),
            );
        } else {
            status.mirroring_witness_state = Some(0);
            status.mirroring_witness_state_desc = Some("UNKNOWN".into());
        }
        status.mirroring_redo_queue_type = Some("UNLIMITED".into());
        status.mirroring_end_of_log_lsn = observed.end_of_log;
        status.mirroring_failover_lsn = state.failover_lsn;
        match state.role {
            Role::Principal => {
                let streaming = positions.flushed != Lsn::INVALID;
                status.mirroring_replication_lsn = streaming.then_some(positions.flushed);
                if streaming && mirroring_state == MirroringState::Synchronized {
                    status.mirroring_failover_lsn = Some(positions.flushed);
                }
                status.send_queue_bytes = observed
                    .end_of_log
                    .filter(|_| streaming)
                    .map(|end| end.bytes_since(positions.flushed));
                status.redo_queue_bytes =
                    streaming.then(|| positions.flushed.bytes_since(positions.applied));
                status.send_rate_bytes_per_sec = Some(positions.send_rate);
                status.redo_rate_bytes_per_sec = Some(positions.redo_rate);
                status.mirror_commit_overhead_ms = positions.commit_overhead_ms;
            }
            Role::Mirror => {
                status.mirroring_replication_lsn = observed.replayed;
                status.redo_queue_bytes = observed
                    .end_of_log
                    .zip(observed.replayed)
                    .map(|(received, replayed)| received.bytes_since(replayed));
            }
        }
        status
    }
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
    let endpoint = TcpListener::bind(config.listen.0)
        .await
        .map_err(|source| AgentError::Bind {
            addr: config.listen.0,
            source,
        })?;
    let wal_relay = bind_wal_relay(state.wal_relay_port).await?;
    let wal_relay_port = wal_relay
        .local_addr()
        .map(|addr| addr.port())
        .unwrap_or_default();
    let (streams, _) = watch::channel(0);
    let agent = Arc::new(Agent {
        config,
        engine,
        tls,
        store,
        state: Mutex::new(state),
        operations: tokio::sync::Mutex::new(()),
        peer: Mutex::new(PeerStatus::default()),
        witness: Mutex::new(WitnessStatus::default()),
        quorum_lost: AtomicBool::new(false),
        expect_running: AtomicBool::new(false),
        observed: Mutex::new(Observed::default()),
        positions: Arc::new(Mutex::new(Positions::new())),
        counters: Arc::new(LinkCounters::default()),
        streams,
        pg_major,
        wal_relay_port,
        last_error: Mutex::new(None),
        pending_failover: AtomicBool::new(false),
        applied_sync: Mutex::new(None),
        unsynchronized_since: Mutex::new(None),
        shutdown: shutdown.clone(),
        started_at: Instant::now(),
    });
    let session = agent.config.session.clone();
    agent.update(|state| {
        state.wal_relay_port = Some(wal_relay_port);
        state.session = Some(session);
    })?;
    info!(
        session = %agent.config.session,
        name = %agent.config.name,
        endpoint = %agent.config.listen.0,
        role = %agent.state().role,
        epoch = %agent.state().epoch,
        "partner agent started"
    );

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(serve_endpoint(agent.clone(), endpoint));
    tasks.spawn(serve_wal_relay(agent.clone(), wal_relay));
    tasks.spawn(ping_peer(agent.clone()));
    tasks.spawn(crate::partner::quorum::ping_witness(agent.clone()));
    tasks.spawn(crate::partner::quorum::watch_quorum(agent.clone()));
    tasks.spawn(crate::partner::supervisor::supervise(agent.clone()));
    tasks.close();
    shutdown.cancelled().await;
    tasks.wait().await;
    let _guard = agent.operations.lock().await;
    agent.expect_running.store(false, Ordering::SeqCst);
    let engine = agent.engine.clone();
    if engine.postmaster_pid().is_some() {
        info!("stopping PostgreSQL");
        let _ = tokio::task::spawn_blocking(move || engine.stop(StopMode::Fast)).await;
    }
    Ok(())
}

async fn bind_wal_relay(saved: Option<u16>) -> Result<TcpListener, AgentError> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    if let Some(port) = saved {
        if let Ok(listener) = TcpListener::bind(loopback(port)).await {
            return Ok(listener);
        }
        warn!(port, "the saved WAL relay port is taken; using a new one");
    }
    TcpListener::bind(loopback(0))
        .await
        .map_err(|source| AgentError::Bind {
            addr: loopback(0),
            source,
        })
}

/// Accepts peers, control clients and relayed streams on the mirroring endpoint.
async fn serve_endpoint(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = agent.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((tcp, from)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(err) = handle_endpoint_connection(&agent, tcp).await {
                        debug!(%from, "endpoint connection ended: {err}");
                    }
                });
            }
            Err(err) => {
                warn!("accept on the mirroring endpoint failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_endpoint_connection(
    agent: &Arc<Agent>,
    tcp: TcpStream,
) -> Result<(), ControlError> {
    tcp.set_nodelay(true)?;
    let handshake = async {
        let mut stream = agent.tls.accept(tcp).await?;
        // Exact reads: after a Hello::Stream the raw stream goes to the relay.
        let hello = read_hello(&mut stream).await?;
        Ok::<_, ControlError>((stream, hello))
    };
    let (stream, hello) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ControlError::Timeout(HANDSHAKE_TIMEOUT))??;
    match hello {
        None => Ok(()),
        Some(Hello::Control) => {
            let mut control = ControlStream::new(stream);
            while let Some(request) = control.recv::<Request>().await? {
                let response = crate::partner::operations::handle(agent, request).await;
                control.send(&response).await?;
            }
            Ok(())
        }
        Some(Hello::Stream { session, purpose }) => {
            if session != agent.config.session {
                warn!(%session, "refused a stream for another session");
                return Ok(());
            }
            let state = agent.state();
            let serving = state.role == Role::Principal
                && !state.ended
                && (purpose == StreamPurpose::Tool || !state.suspended);
            if !serving {
                debug!(?purpose, "refused a stream: not an active principal");
                return Ok(());
            }
            let local = TcpStream::connect(("127.0.0.1", agent.config.postgres.port)).await?;
            let positions = (purpose == StreamPurpose::Wal).then(|| {
                lock(&agent.positions).reset_stream();
                agent.positions.clone()
            });
            carry(agent, local, stream, LocalEnd::Server, positions).await;
            Ok(())
        }
    }
}

/// Relays one stream until it ends or the agent closes all streams.
async fn carry(
    agent: &Agent,
    local: TcpStream,
    link: crate::tls::BoxedStream,
    local_end: LocalEnd,
    positions: Option<Arc<Mutex<Positions>>>,
) {
    let mut generation = agent.streams.subscribe();
    generation.mark_unchanged();
    tokio::select! {
        end = relay(local, link, local_end, agent.counters.clone(), positions) => match end {
            RelayEnd::Finished => debug!("stream finished"),
            RelayEnd::Local(err) => debug!("stream ended by local PostgreSQL: {err}"),
            RelayEnd::Link(err) => debug!("stream ended by the agent link: {err}"),
        },
        _ = generation.changed() => debug!("stream closed by the agent"),
        _ = agent.shutdown.cancelled() => {}
    }
}

/// Carries local PostgreSQL clients (the walreceiver, or a tool) to the peer.
async fn serve_local_relay(agent: Arc<Agent>, listener: TcpListener, purpose: StreamPurpose) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = agent.shutdown.cancelled() => return,
        };
        let Ok((local, _)) = accepted else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let hello = Hello::Stream {
                session: agent.config.session.clone(),
                purpose,
            };
            match open(&agent.config.peer, &agent.tls, &hello, agent.timeout()).await {
                Ok(link) => carry(&agent, local, link, LocalEnd::Client, None).await,
                Err(err) => debug!("cannot reach the peer for a {purpose:?} stream: {err}"),
            }
        });
    }
}

async fn serve_wal_relay(agent: Arc<Agent>, listener: TcpListener) {
    serve_local_relay(agent, listener, StreamPurpose::Wal).await
}

/// Runs `tool` (pg_basebackup, pg_rewind) with a one-off loopback relay to
/// the peer's PostgreSQL; `tool` gets the relay's libpq connection string.
pub async fn with_tool_relay<T: Send + 'static>(
    agent: &Arc<Agent>,
    tool: impl FnOnce(String) -> T + Send + 'static,
) -> std::io::Result<T> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    // Not the mirror's name: the principal must not take a tool's WAL
    // stream for the mirror's walreceiver.
    let conninfo = agent.conninfo_via(listener.local_addr()?.port(), "pgmirror_tool");
    let relay_task = tokio::spawn(serve_local_relay(
        agent.clone(),
        listener,
        StreamPurpose::Tool,
    ));
    let result = tokio::task::spawn_blocking(move || tool(conninfo)).await;
    relay_task.abort();
    result.map_err(std::io::Error::other)
}

/// Pings the peer over a control connection every interval; a ping not
/// answered within TIMEOUT, or a hard error, marks the peer lost (spec 28-29).
async fn ping_peer(agent: Arc<Agent>) {
    while !agent.shutdown.is_cancelled() {
        let timeout = agent.timeout();
        let interval = ping_interval(timeout);
        let connected = tokio::time::timeout(
            timeout,
            ControlClient::connect(&agent.config.peer, &agent.tls),
        )
        .await;
        let mut client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                peer_lost(&agent, &err.to_string());
                sleep_or_shutdown(&agent, interval).await;
                continue;
            }
            Err(_) => {
                peer_lost(&agent, "connect timed out");
                continue;
            }
        };
        loop {
            let timeout = agent.timeout();
            match client.ping_within(agent.view(), timeout).await {
                Ok(view) => peer_heard(&agent, view),
                Err(ControlError::Refused(reason)) => {
                    agent.set_error(Some(format!(
                        "peer {} refused this partner: {reason}",
                        agent.config.peer
                    )));
                    peer_lost(&agent, &reason);
                    break;
                }
                Err(ControlError::Unexpected { answer, .. }) => {
                    peer_lost(&agent, &format!("unexpected answer {answer}"));
                    break;
                }
                Err(err) => {
                    peer_lost(&agent, &err.to_string());
                    break;
                }
            }
            if !sleep_or_shutdown(&agent, ping_interval(timeout)).await {
                return;
            }
        }
    }
}

/// A fifth of TIMEOUT, so several pings fit in it, between 200 ms and 2 s.
pub fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

/// Sleeps; false when the agent is shutting down.
pub async fn sleep_or_shutdown(agent: &Agent, duration: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => true,
        _ = agent.shutdown.cancelled() => false,
    }
}

/// Records a ping from or an answer by the peer.
pub fn peer_heard(agent: &Agent, view: PeerView) {
    let mut peer = lock(&agent.peer);
    if !peer.connected {
        info!(peer = %view.name, role = %view.role, epoch = %view.epoch, "peer connected");
    }
    peer.connected = true;
    peer.last_heard = Some(Instant::now());
    peer.view = Some(view);
}

fn peer_lost(agent: &Agent, why: &str) {
    let mut peer = lock(&agent.peer);
    if peer.connected {
        warn!("connection with peer {} lost: {why}", agent.config.peer);
        peer.connected = false;
        drop(peer);
        // A black-holed link would keep the stream hanging; close it so the
        // walsender and walreceiver notice at once.
        agent.close_streams();
    }
}
