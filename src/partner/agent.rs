//! The running partner agent's shared context: its durable state and the
//! policy's memory, what it last heard of its peer and the witness, what
//! it last read from PostgreSQL, and the views it shows others.
//!
//! `Agent` is created once by `partner::run` and shared (`Arc`) by every
//! task; cancelling its shutdown token ends them all. Role changes and the
//! supervisor's ticks run one at a time under `operations`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PartnerConfig;
use crate::control::{EndedAs, MirroringStatus, PeerView, RoleRow, StatusFigures};
use crate::partner::engine::Instance;
use crate::partner::policy::health::Server;
use crate::partner::policy::{
    Decision, Memory, Observation, PeerObservation, PostgresObservation, WitnessObservation,
};
use crate::partner::state::{SessionState, StateError, StateStore};
use crate::roles::{Epoch, MirroringState, Role, WitnessState};
use crate::shipper::positions::Positions;
use crate::shipper::relay::LinkCounters;
use crate::sync::lock;
use crate::tls::EndpointTls;
use crate::wire::lsn::Lsn;

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
    /// See `WitnessObservation::exposure_recorded_at`.
    pub exposure_recorded_at: Option<u64>,
}

/// What the supervisor last read from the local PostgreSQL.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    /// Read-write, or a standby and whether it streams (the health
    /// endpoints' `Server`).
    pub server: Server,
    /// Principal: flushed end of WAL; mirror: received end of WAL.
    pub end_of_log: Option<Lsn>,
    /// Mirror: replayed end of WAL.
    pub replayed: Option<Lsn>,
}

/// The running agent's context, shared (`Arc`) by every task; created by
/// `partner::run`, dropped when the last task ends.
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
    /// What the policy remembers between decisions (lost on restart).
    memory: Mutex<Memory>,
    /// Principal: send time of the last round trip answered by the witness
    /// or the mirror, on [`Agent::clock`]: where the lease starts (I1).
    lease_from: Mutex<Option<Duration>>,
    /// Mirror: when it last answered a ping of the principal (I1).
    answered_principal_at: Mutex<Option<Duration>>,
    pub observed: Mutex<Observed>,
    pub positions: Arc<Mutex<Positions>>,
    pub counters: Arc<LinkCounters>,
    /// Bumped to close every relayed stream (suspend, demotion).
    streams: watch::Sender<u64>,
    pub pg_major: u32,
    pub wal_relay_port: u16,
    pub last_error: Mutex<Option<String>>,
    pub pending_failover: AtomicBool,
    /// Wakes the fence feeder when the durable role changed (I1).
    pub fence_changed: tokio::sync::Notify,
    pub shutdown: CancellationToken,
    pub started_at: Instant,
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

    /// The agent's clock: time since it started. The policy sees every
    /// instant on it (`partner::policy`).
    pub fn clock(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Decides with the policy's memory held, and keeps the memory the
    /// decision leaves, so that concurrent loops never lose an update.
    pub fn decide(&self, decide: impl FnOnce(&Memory) -> Decision) -> Decision {
        let mut memory = lock(&self.memory);
        let decision = decide(&memory);
        *memory = decision.memory.clone();
        decision
    }

    pub fn memory(&self) -> Memory {
        lock(&self.memory).clone()
    }

    /// Changes the policy's memory (an action's outcome).
    pub fn remember(&self, change: impl FnOnce(&mut Memory)) {
        change(&mut lock(&self.memory));
    }

    /// A round trip sent at `sent` was answered by the witness or the
    /// mirror: the principal's lease runs from there (I1).
    pub fn renew_lease(&self, sent: Duration) {
        let mut from = lock(&self.lease_from);
        *from = (*from).max(Some(sent));
    }

    /// Where the principal's lease starts (see [`Agent::renew_lease`]).
    pub fn lease(&self) -> Option<Duration> {
        *lock(&self.lease_from)
    }

    /// Since this mirror last answered a ping of the principal or, if it
    /// has not since it started, since it started: its previous life may
    /// have answered just before (I1).
    pub fn principal_answered_ago(&self) -> Duration {
        let at = lock(&self.answered_principal_at).unwrap_or_default();
        self.clock().saturating_sub(at)
    }

    /// This mirror just answered a ping of the principal.
    pub fn answered_principal(&self) {
        *lock(&self.answered_principal_at) = Some(self.clock());
    }

    /// What the policy needs beyond PostgreSQL's own state.
    pub fn observation(&self, postgres: PostgresObservation) -> Observation {
        let peer = self.peer();
        let witness = self.witness_status();
        Observation {
            now: self.clock(),
            name: self.config.name.clone(),
            pg_major: self.pg_major,
            peer: PeerObservation {
                view: peer.view,
                connected: peer.connected,
            },
            witness: WitnessObservation {
                row: witness.row,
                connected: witness.connected,
                exposure_recorded_at: witness.exposure_recorded_at,
            },
            postgres,
            lease_from: *lock(&self.lease_from),
            answered_principal_at: *lock(&self.answered_principal_at),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.state().timeout_secs)
    }

    /// How often to ping the peer and report to the witness: a fifth of the
    /// TIMEOUT the lease is measured with (`policy::lease_timeout`), so that
    /// a lease measured with the witness's smaller TIMEOUT is still renewed.
    pub fn ping_every(&self) -> Duration {
        let row = self.witness_status().row;
        ping_interval(crate::partner::policy::lease_timeout(
            &self.state(),
            row.as_ref(),
        ))
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
        let state = shown(self.state());
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
            witness_id: self
                .witness_status()
                .row
                .filter(|_| state.witness.is_some())
                .map(|row| row.witness_id),
            figures: None,
        }
    }

    /// What this partner tells the witness: its view with its queues and
    /// rates, which the witness keeps as history samples.
    pub fn report_view(&self) -> PeerView {
        PeerView {
            figures: Some(StatusFigures::of(&self.status())),
            ..self.view()
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
        let state = shown(self.state());
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
            status.ended_as = Some(EndedAs {
                role: state.role,
                epoch: state.epoch,
            });
            return status;
        }
        let mirroring_state = self.current_state(&state);
        status.mirroring_guid = state.system_identifier.map(|id| format!("{id:016x}"));
        status.mirroring_state = Some(mirroring_state.code());
        status.mirroring_state_desc = Some(mirroring_state.desc().into());
        status.mirroring_role = Some(state.role.code());
        status.mirroring_role_desc = Some(state.role.desc().into());
        status.mirroring_role_sequence = Some(state.epoch.0);
        status.mirroring_safety_level = Some(state.safety.code());
        status.mirroring_safety_level_desc = Some(state.safety.desc().into());
        status.mirroring_safety_sequence = Some(state.safety_sequence);
        status.mirroring_partner_name = peer
            .view
            .as_ref()
            .map(|view| view.name.clone())
            .or(state.peer_name.clone());
        status.mirroring_partner_instance = Some(self.config.peer.to_string());
        status.mirroring_connection_timeout = Some(state.timeout_secs);
        let witness_state = match &state.witness {
            Some(_) if self.witness_status().connected => WitnessState::Connected,
            Some(_) => WitnessState::Disconnected,
            None => WitnessState::Unknown,
        };
        status.mirroring_witness_name = state.witness.as_ref().map(ToString::to_string);
        status.mirroring_witness_state = Some(witness_state.code());
        status.mirroring_witness_state_desc = Some(witness_state.desc().into());
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

/// The state as others may see it: until a promotion and its checkpoint
/// are done the partner still shows itself as the mirror of the previous
/// epoch (I3).
fn shown(mut state: SessionState) -> SessionState {
    if state.promoting {
        state.role = Role::Mirror;
        state.epoch = Epoch(state.epoch.0.saturating_sub(1));
    }
    state
}

impl Agent {
    /// The context `partner::run` builds once its listeners are bound.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: PartnerConfig,
        engine: Instance,
        tls: EndpointTls,
        store: StateStore,
        state: SessionState,
        pg_major: u32,
        wal_relay_port: u16,
        shutdown: CancellationToken,
    ) -> Agent {
        let (streams, _) = watch::channel(0);
        Agent {
            config,
            engine,
            tls,
            store,
            state: Mutex::new(state),
            operations: tokio::sync::Mutex::new(()),
            peer: Mutex::new(PeerStatus::default()),
            witness: Mutex::new(WitnessStatus::default()),
            memory: Mutex::new(Memory::new(Duration::ZERO)),
            lease_from: Mutex::new(None),
            answered_principal_at: Mutex::new(None),
            observed: Mutex::new(Observed::default()),
            positions: Arc::new(Mutex::new(Positions::new())),
            counters: Arc::new(LinkCounters::default()),
            streams,
            pg_major,
            wal_relay_port,
            last_error: Mutex::new(None),
            pending_failover: AtomicBool::new(false),
            fence_changed: tokio::sync::Notify::new(),
            shutdown,
            started_at: Instant::now(),
        }
    }

    /// A receiver that changes whenever [`Agent::close_streams`] is called.
    pub fn streams(&self) -> watch::Receiver<u64> {
        let mut generation = self.streams.subscribe();
        generation.mark_unchanged();
        generation
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
