//! The partner's role decisions, IO-free: what one partner should do next,
//! given its durable state, what it remembers since its start and what it
//! observed of its PostgreSQL, its peer and the witness (spec 17-33).
//!
//! The agent's loops (`supervisor`, `quorum`) only gather an
//! [`Observation`], call [`tick`] or [`quorum_check`], persist the
//! [`Decision`]'s state and carry out its [`Action`]s in order; the
//! deterministic simulation in `tests/` drives the same functions on
//! simulated time. Nothing here reads a clock: every instant is a
//! [`Duration`] on the calling node's own clock (its time since start), so
//! that drift between nodes is the caller's to model.
//!
//! Invariants relied on (DESIGN.md section 3): I1 (a principal without
//! quorum stops; a later epoch demotes), I2 (the state says "not
//! synchronized", and the witness records it, before commits stop waiting
//! for the mirror), I3 (only a synchronized mirror asks for automatic
//! failover).

pub mod commands;

use std::time::Duration;

use crate::partner::api::{PeerView, PromotionKind, RoleRow};
use crate::partner::engine::StopMode;
use crate::partner::state::SessionState;
use crate::roles::{Epoch, MirroringState, Role, Safety};
use crate::wire::lsn::Lsn;

/// What the partner observed just before deciding.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Now, on this node's clock.
    pub now: Duration,
    /// This partner's server name.
    pub name: String,
    /// The PostgreSQL major version of this partner's binaries.
    pub pg_major: u32,
    pub peer: PeerObservation,
    pub witness: WitnessObservation,
    pub postgres: PostgresObservation,
}

/// The peer as the ping loop last saw it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerObservation {
    /// Its last view, however old.
    pub view: Option<PeerView>,
    /// It answered (or pinged us) within TIMEOUT.
    pub connected: bool,
}

/// The witness as the report loop last saw it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WitnessObservation {
    /// The session's row as the witness last answered it.
    pub row: Option<RoleRow>,
    /// It answered a report within TIMEOUT.
    pub connected: bool,
}

/// The local PostgreSQL as the agent last read it.
#[derive(Debug, Clone, PartialEq)]
pub enum PostgresObservation {
    /// No postmaster.
    Stopped,
    /// Running read-write.
    Principal {
        /// `pg_current_wal_flush_lsn()`.
        flushed: Lsn,
        /// The mirror's walsender, if one is connected.
        standby: Option<StandbyObservation>,
    },
    /// Running in recovery.
    Mirror {
        /// `pg_last_wal_receive_lsn()`.
        received: Option<Lsn>,
    },
    /// A postmaster runs but SQL did not answer (starting, shutting down).
    Unreadable,
}

/// `pg_stat_replication` for the mirror's walsender.
#[derive(Debug, Clone, PartialEq)]
pub struct StandbyObservation {
    /// `state = 'streaming'` (not startup or catchup).
    pub streaming: bool,
    /// `sync_state = 'sync'`: commits wait for this standby now.
    pub sync: bool,
    /// `flush_lsn`: what the mirror has hardened.
    pub flushed: Lsn,
}

/// What the agent remembers between decisions but not across its restarts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Memory {
    /// When this agent started.
    pub started_at: Duration,
    /// PostgreSQL runs as principal by this agent's will: its absence is a crash.
    pub expect_running: bool,
    /// The synchronous requirement PostgreSQL was last configured with.
    pub applied_sync: Option<bool>,
    /// Since when the mirror has not been SYNCHRONIZED (principal only).
    pub unsynchronized_since: Option<Duration>,
}

impl Memory {
    pub fn new(started_at: Duration) -> Self {
        Memory {
            started_at,
            ..Memory::default()
        }
    }
}

/// One step the agent carries out, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask the peer to take over at `epoch` because PostgreSQL died here; on
    /// success the agent steps down ([`SessionState::step_down`]).
    HandOver { epoch: Epoch },
    /// Start PostgreSQL read-write (initdb on a first start).
    StartPrincipal { synchronous: bool },
    /// Start PostgreSQL as a standby fed by the shipper.
    StartMirror,
    /// Stop PostgreSQL.
    Stop(StopMode),
    /// End recovery: `pg_promote()` and a checkpoint. The durable state
    /// already names this partner principal.
    Promote,
    /// pg_rewind to the principal (the agent records `needs_rewind = false`
    /// or moves an unrewindable copy aside).
    Rewind,
    /// Take a base backup of the principal (or adopt the copy in place).
    TakeCopy,
    /// Make commits wait for the mirror (true) or not.
    RequireSync(bool),
    /// Ask the witness to record whether commits wait for the mirror.
    RecordAtWitness { synchronized: bool },
    /// Ask the witness to make this mirror principal at the next epoch.
    AskPromotion {
        kind: PromotionKind,
        failover_lsn: Option<Lsn>,
    },
    /// Close every relayed stream.
    CloseStreams,
}

/// What to do: persist `state` (when Some) first, keep `memory`, then carry
/// out `actions`; `refusal` is a problem to show in the status.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub state: Option<SessionState>,
    pub memory: Memory,
    pub actions: Vec<Action>,
    /// Why nothing could be done (shown as the agent's last error).
    pub refusal: Option<String>,
    /// A notable decision, for the log.
    pub note: Option<&'static str>,
}

impl Decision {
    fn new(memory: &Memory) -> Self {
        Decision {
            state: None,
            memory: memory.clone(),
            actions: Vec::new(),
            refusal: None,
            note: None,
        }
    }

    /// The state as it will be once this decision is persisted.
    fn current<'a>(&'a self, durable: &'a SessionState) -> &'a SessionState {
        self.state.as_ref().unwrap_or(durable)
    }

    fn change(&mut self, durable: &SessionState, change: impl FnOnce(&mut SessionState)) {
        let mut next = self.current(durable).clone();
        change(&mut next);
        self.state = (next != *durable).then_some(next);
    }

    fn act(mut self, action: Action) -> Self {
        self.actions.push(action);
        self
    }
}

impl SessionState {
    /// This partner lost the principal role at `epoch`: it becomes a mirror
    /// that rewinds before it follows the new principal (I1).
    pub fn step_down(&mut self, epoch: Epoch, suspended: bool, failover_lsn: Option<Lsn>) {
        self.assume_role(Role::Mirror, epoch, suspended);
        self.needs_rewind = true;
        self.failover_lsn = failover_lsn.or(self.failover_lsn);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// Spec 19-20: with a witness, at least two of the three must be connected.
pub fn has_quorum(state: &SessionState, observed: &Observation) -> bool {
    state.witness.is_none() || observed.peer.connected || observed.witness.connected
}

/// The fast check, run ten times a second outside the operations lock: a
/// principal that lost quorum stops PostgreSQL at once (I1).
pub fn quorum_check(state: &SessionState, memory: &Memory, observed: &Observation) -> Decision {
    let mut decision = Decision::new(memory);
    let running = observed.postgres != PostgresObservation::Stopped;
    if state.witness.is_some()
        && !state.ended
        && state.role == Role::Principal
        && running
        && !has_quorum(state, observed)
    {
        decision.memory.expect_running = false;
        decision.note = Some(
            "No Quorum: the principal hears neither the witness nor the mirror; stopping PostgreSQL",
        );
        return decision.act(Action::Stop(StopMode::Immediate));
    }
    decision
}

/// A synchronized mirror under FULL that lost its principal but still hears
/// the witness asks it for the principal role (spec 31-32, I3).
pub fn wants_automatic_failover(state: &SessionState, observed: &Observation) -> bool {
    let row_allows = observed.witness.row.as_ref().is_some_and(|row| {
        row.synchronized
            && !row.suspended
            && row.safety == Safety::Full
            && row.principal != observed.name
    });
    state.witness.is_some()
        && !state.ended
        && state.role == Role::Mirror
        && state.has_copy
        && !state.needs_rewind
        && observed.witness.connected
        && !observed.peer.connected
        && row_allows
}

/// The periodic decision: keep PostgreSQL in the role the durable state
/// gives it, follow a later epoch, derive the session state and apply the
/// safety level.
pub fn tick(state: &SessionState, memory: &Memory, observed: &Observation) -> Decision {
    let mut decision = Decision::new(memory);
    if follow_witness(state, observed, &mut decision) {
        return decision;
    }
    let peer = observed
        .peer
        .view
        .as_ref()
        .filter(|_| observed.peer.connected);
    if let Some(view) = peer {
        if view.ended && !state.ended {
            decision.change(state, |state| {
                state.ended = true;
                state.synchronized = false;
            });
            decision.note = Some("the peer ended mirroring (SET PARTNER OFF); ending it here too");
            let was_principal = state.role == Role::Principal;
            decision = decision.act(Action::CloseStreams);
            if was_principal && observed.postgres != PostgresObservation::Stopped {
                decision = decision.act(Action::RequireSync(false));
            }
            return decision;
        }
        learn_from_peer(state, view, &mut decision);
    }
    let current = decision.current(state).clone();
    if current.ended {
        return decision;
    }
    match current.role {
        Role::Principal => principal_tick(&current, observed, peer, decision),
        Role::Mirror => mirror_tick(&current, observed, peer, decision),
    }
}

/// The witness's row outranks what this partner remembers (spec 26): a
/// later epoch naming another principal demotes this one (I1); one naming
/// this partner finishes a failover. True when the decision is complete.
fn follow_witness(state: &SessionState, observed: &Observation, decision: &mut Decision) -> bool {
    let Some(row) = observed
        .witness
        .row
        .as_ref()
        .filter(|_| observed.witness.connected && state.witness.is_some())
    else {
        return false;
    };
    if row.epoch <= state.epoch || state.ended {
        return false;
    }
    if row.principal == observed.name {
        if state.role == Role::Mirror && state.has_copy && !state.needs_rewind {
            become_principal(state, row.epoch, row.suspended, row.failover_lsn, decision);
            decision.note = Some("the witness made this partner the principal");
            return true;
        }
        return false;
    }
    match state.role {
        Role::Principal => {
            demote(state, row.epoch, row.suspended, observed, decision);
            true
        }
        Role::Mirror => {
            decision.change(state, |state| state.epoch = row.epoch);
            false
        }
    }
}

/// Records this partner as principal at `epoch` (durable first), then
/// promotes PostgreSQL (starting it as a standby first if it is down).
pub fn become_principal(
    state: &SessionState,
    epoch: Epoch,
    suspended: bool,
    failover_lsn: Option<Lsn>,
    decision: &mut Decision,
) {
    decision.change(state, |state| {
        state.assume_role(Role::Principal, epoch, suspended);
        state.failover_lsn = failover_lsn;
    });
    decision.memory.applied_sync = None;
    decision.actions.push(Action::Promote);
    decision.actions.push(Action::RequireSync(false));
}

/// A principal that meets a principal of a later epoch becomes its mirror
/// (I1, spec 26): it stops serving at once and rewinds before following.
fn demote(
    state: &SessionState,
    epoch: Epoch,
    suspended: bool,
    observed: &Observation,
    decision: &mut Decision,
) {
    decision.change(state, |state| state.step_down(epoch, suspended, None));
    decision.memory.applied_sync = None;
    decision.memory.expect_running = false;
    decision.note = Some("another partner is principal at a later role_sequence: stepping down");
    decision.actions.push(Action::CloseStreams);
    if observed.postgres != PostgresObservation::Stopped {
        decision.actions.push(Action::Stop(StopMode::Fast));
    }
}

/// Facts the peer's ping settles: its name, and on a mirror the
/// principal's epoch, safety and timeout (spec 30: set on the principal only).
fn learn_from_peer(state: &SessionState, view: &PeerView, decision: &mut Decision) {
    decision.change(state, |state| {
        state.peer_name = Some(view.name.clone());
        if state.role == Role::Mirror && view.role == Role::Principal && view.epoch >= state.epoch {
            state.epoch = view.epoch;
            state.safety = view.safety;
            state.safety_sequence = view.safety_sequence;
            state.timeout_secs = view.timeout_secs;
            // SET WITNESS on the principal turns the witness on or off for
            // both; a mirror that already has one keeps its own address.
            if state.witness.is_some() != view.witness.is_some() {
                state.witness = view.witness.clone();
            }
        }
    });
}

fn principal_tick(
    state: &SessionState,
    observed: &Observation,
    peer: Option<&PeerView>,
    mut decision: Decision,
) -> Decision {
    if let Some(view) = peer.filter(|view| view.role == Role::Principal && view.epoch > state.epoch)
    {
        // I1: the peer became principal at a later epoch.
        demote(state, view.epoch, view.suspended, observed, &mut decision);
        return decision;
    }
    let (_flushed, standby) = match &observed.postgres {
        PostgresObservation::Principal { flushed, standby } => (*flushed, standby.as_ref()),
        PostgresObservation::Stopped => return start_principal(state, observed, peer, decision),
        // Starting, stopping, or in recovery still (a promotion in progress).
        PostgresObservation::Unreadable | PostgresObservation::Mirror { .. } => return decision,
    };
    let observed_state = if state.suspended {
        MirroringState::Suspended
    } else {
        match (standby, state.safety) {
            (None, _) => MirroringState::Disconnected,
            (Some(standby), Safety::Full) if standby.streaming => MirroringState::Synchronized,
            (Some(standby), Safety::Off) if standby.streaming => MirroringState::Unsynchronized,
            (Some(_), _) => MirroringState::Synchronizing,
        }
    };
    let caught_up = observed_state == MirroringState::Synchronized;
    if caught_up {
        decision.memory.unsynchronized_since = None;
    } else if decision.memory.unsynchronized_since.is_none() {
        decision.memory.unsynchronized_since = Some(observed.now);
    }
    let lapsed = decision
        .memory
        .unsynchronized_since
        .is_some_and(|since| observed.now.saturating_sub(since) >= state.timeout());
    // Under FULL a lost mirror holds commits for TIMEOUT, then the
    // principal runs exposed (spec 17, 21).
    let mut synchronized = match state.safety {
        Safety::Full => caught_up || (state.synchronized && !state.suspended && !lapsed),
        Safety::Off => false,
    };
    let witness_row = observed
        .witness
        .row
        .as_ref()
        .filter(|row| row.epoch == state.epoch && row.principal == observed.name);
    if state.witness.is_some() && state.synchronized && !synchronized {
        // I2: with a witness, run exposed only once it has recorded the
        // mirror as not synchronized; until then commits wait.
        if witness_row.is_none_or(|row| row.synchronized) {
            decision.actions.push(Action::RecordAtWitness {
                synchronized: false,
            });
            synchronized = true;
        }
    }
    if state.synchronized && !synchronized {
        decision.note = Some("principal running exposed: the mirror is not synchronized");
    }
    decision.change(state, |state| {
        state.state = observed_state;
        state.synchronized = synchronized;
    });
    if synchronized {
        // Commits wait for the mirror before the state says so.
        require_sync(state, true, &mut decision);
        if state.witness.is_some() && caught_up && witness_row.is_some_and(|row| !row.synchronized)
        {
            decision
                .actions
                .push(Action::RecordAtWitness { synchronized: true });
        }
    } else {
        // I2: the mirror is recorded as not synchronized before commits
        // stop waiting for it.
        require_sync(state, false, &mut decision);
    }
    decision
}

/// Queues a change of the synchronous requirement when it differs from the
/// one applied (none can be required before the peer's name is known).
fn require_sync(state: &SessionState, synchronous: bool, decision: &mut Decision) {
    let synchronous = synchronous && state.peer_name.is_some();
    if decision.memory.applied_sync != Some(synchronous) {
        decision.memory.applied_sync = Some(synchronous);
        decision.actions.push(Action::RequireSync(synchronous));
    }
}

/// PostgreSQL is down under this principal: a crash hands over to a
/// synchronized mirror; otherwise it restarts when quorum allows.
fn start_principal(
    state: &SessionState,
    observed: &Observation,
    peer: Option<&PeerView>,
    mut decision: Decision,
) -> Decision {
    let crashed = decision.memory.expect_running;
    decision.memory.expect_running = false;
    if crashed
        && state.witness.is_some()
        && state.safety == Safety::Full
        && state.synchronized
        && observed.peer.connected
    {
        decision.note =
            Some("PostgreSQL died under this principal; handing over to the synchronized mirror");
        return decision.act(Action::HandOver {
            epoch: state.epoch.next(),
        });
    }
    if state.witness.is_some() {
        // I1: with a witness, serve only with quorum (spec 20).
        if !has_quorum(state, observed) {
            decision.change(state, |state| state.state = MirroringState::Disconnected);
            return decision;
        }
    } else if peer.is_none()
        && observed.now.saturating_sub(decision.memory.started_at) < state.timeout()
    {
        // A restarted principal first asks its peer who is principal now
        // (spec 26); only a peer silent for TIMEOUT lets it serve alone.
        return decision;
    }
    decision.memory.expect_running = true;
    let synchronous = state.safety == Safety::Full && state.synchronized && !state.suspended;
    decision.memory.applied_sync = Some(synchronous && state.peer_name.is_some());
    decision.act(Action::StartPrincipal { synchronous })
}

fn mirror_tick(
    state: &SessionState,
    observed: &Observation,
    peer: Option<&PeerView>,
    mut decision: Decision,
) -> Decision {
    let principal = peer.filter(|view| view.role == Role::Principal);
    if let Some(view) = principal {
        if view.pg_major != observed.pg_major {
            decision.refusal = Some(format!(
                "the principal runs PostgreSQL {} and this partner {}: both partners need the same major version",
                view.pg_major, observed.pg_major
            ));
            return decision;
        }
        if let (Some(theirs), Some(ours)) = (view.system_identifier, state.system_identifier) {
            if theirs != ours {
                decision.refusal = Some(system_identifier_mismatch(theirs, ours));
                return decision;
            }
        }
    }
    if !state.has_copy {
        if principal.is_some_and(|view| !view.suspended && view.system_identifier.is_some()) {
            decision.actions.push(Action::TakeCopy);
        }
        return decision;
    }
    if state.needs_rewind {
        let followable = principal.filter(|view| !view.suspended && view.epoch == state.epoch);
        if followable.is_some() {
            return decision.act(Action::Rewind);
        }
        // A former principal does not bring its copy online until it is
        // rewound to the new principal (spec 26, 41).
        if observed.postgres != PostgresObservation::Stopped {
            decision.actions.push(Action::Stop(StopMode::Fast));
        }
        let shown = match principal {
            Some(view) if view.suspended => MirroringState::Suspended,
            Some(view) => view.state,
            None => MirroringState::Disconnected,
        };
        decision.change(state, |state| {
            state.state = shown;
            state.synchronized = false;
        });
        return decision;
    }
    if observed.postgres == PostgresObservation::Stopped {
        return decision.act(Action::StartMirror);
    }
    let shown = match principal {
        None => MirroringState::Disconnected,
        Some(view) if view.state == MirroringState::PendingFailover => MirroringState::Synchronized,
        Some(view) => view.state,
    };
    decision.change(state, |state| {
        state.state = shown;
        state.synchronized = shown == MirroringState::Synchronized;
    });
    decision
}

/// The refusal shown when the peer holds another database.
pub fn system_identifier_mismatch(theirs: u64, ours: u64) -> String {
    format!(
        "the principal's database (system identifier {theirs}) is not the one this partner holds \
         ({ours}): this data directory is not a copy of the principal; move it away so that the \
         agent takes a new base backup"
    )
}
