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
pub mod health;
mod mirror;
pub(crate) mod principal;

use std::time::Duration;

use crate::control::{PeerView, PromotionKind, RoleRow};
use crate::partner::engine::StopMode;
use crate::partner::state::{HandOver, SessionState};
use crate::roles::{lease_holds, lease_length, takeover_wait, Epoch, Role, Safety};
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
    /// Principal with a witness: the send time of its last round trip
    /// answered by the witness or the mirror, where its lease starts (I1).
    pub lease_from: Option<Duration>,
    /// Mirror: when it last answered a ping of the principal.
    pub answered_principal_at: Option<Duration>,
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
    /// The identity of the witness that answered this agent's last record
    /// of the sync state, when that record was "not synchronized". None
    /// since a SYNCHRONIZED record was sent (it may still land), after a
    /// record failed, and at start (a record of an earlier run may).
    pub exposure_recorded_at: Option<u64>,
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
    /// Principal under FULL: the flush position the mirror must reach to be
    /// synchronized, read once its walsender was seen as 'sync' (I2:
    /// synchronized means flushed, with the requirement in force).
    pub sync_target: Option<Lsn>,
    /// Mirror: it stopped answering the principal's pings so that the
    /// principal's lease runs out before it asks for the principal role (I1).
    pub refusing_principal: bool,
    /// The checkpoint after promotion was taken at this epoch (I3).
    pub checkpointed: Option<Epoch>,
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
    /// Ask the peer to take over (the durable state holds the request in
    /// `handing_over`); the agent then decides on the answer with
    /// [`commands::failover_answered`].
    HandOver(HandOver),
    /// Start PostgreSQL read-write (initdb on a first start).
    StartPrincipal { synchronous: bool },
    /// Start PostgreSQL as a standby fed by the shipper.
    StartMirror,
    /// Stop PostgreSQL.
    Stop(StopMode),
    /// End recovery (`pg_promote()`, waiting until it is done). The durable
    /// state already names this partner principal, still `promoting`.
    Promote,
    /// CHECKPOINT, so that the new timeline reaches the control file and
    /// pg_rewind on the old principal sees the divergence, and the mirror's
    /// replication slot. On success the agent sets [`Memory::checkpointed`]
    /// to `epoch`.
    FinishPromotion { epoch: Epoch },
    /// pg_rewind to the principal (the agent records `needs_rewind = false`
    /// or moves an unrewindable copy aside).
    Rewind,
    /// Take a base backup of the principal (or adopt the copy in place).
    TakeCopy,
    /// Make commits wait for the mirror (true) or not.
    RequireSync(bool),
    /// Ask the witness to record whether commits wait for the mirror. If it
    /// does not, the rest of the action list is dropped (I2: whatever
    /// follows may rely on it).
    /// SYNCHRONIZED is recorded only on the row version it was decided on.
    RecordAtWitness {
        synchronized: bool,
        based_on: Option<u64>,
    },
    /// Ask the witness to make this mirror principal at the next epoch;
    /// `principal_answered_ago`: since this mirror last answered the
    /// principal (or, if it did not, since it started), on its own clock.
    AskPromotion {
        kind: PromotionKind,
        principal_answered_ago: Duration,
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

    /// Changes the state this decision will persist (on top of its earlier
    /// changes); `durable` is the state the decision started from.
    fn change(&mut self, durable: &SessionState, change: impl FnOnce(&mut SessionState)) {
        let mut next = self.current(durable).clone();
        change(&mut next);
        if next != *self.current(durable) {
            self.state = Some(next);
        }
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

/// Whether a principal may serve: without a witness always (spec 17, 55:
/// a principal that lost its mirror runs exposed after TIMEOUT); with one
/// only while its lease holds (I1, [`crate::roles::lease`]).
pub fn has_quorum(state: &SessionState, observed: &Observation) -> bool {
    state.witness.is_none()
        || lease_holds(
            observed.lease_from,
            observed.now,
            lease_timeout(state, observed.witness.row.as_ref()),
        )
}

/// The TIMEOUT a lease is measured with: this partner's, but never more
/// than the one the witness's row holds, which is what the witness waits
/// out (I1: a TIMEOUT raised here must not lengthen the lease before the
/// witness knows it).
pub fn lease_timeout(state: &SessionState, witness_row: Option<&RoleRow>) -> Duration {
    let witness = witness_row.map(|row| Duration::from_secs(row.timeout_secs));
    witness.map_or(state.timeout(), |witness| witness.min(state.timeout()))
}

/// Whether the witness's row says, at this principal's epoch, that commits
/// need not wait for the mirror, and this agent's own last record there
/// wrote it: a SYNCHRONIZED record whose answer was lost may have landed
/// after the row was read, and one that lands after the exposure is refused
/// by its version. Only then, or without a witness, may commits stop
/// waiting (I2).
pub fn witness_allows_exposure(state: &SessionState, observed: &Observation) -> bool {
    state.witness.is_none()
        || observed.witness.row.as_ref().is_some_and(|row| {
            row.epoch == state.epoch
                && row.principal == observed.name
                && !row.synchronized
                && observed.witness.exposure_recorded_at == Some(row.witness_id)
        })
}

/// What the fence process is told (`partner::fence`): the principal's
/// lease, or no deadline when no lease applies (I1).
pub fn fence_order(state: &SessionState, observed: &Observation) -> crate::partner::fence::Order {
    use crate::partner::fence::Order;
    if state.ended || state.role != Role::Principal || state.witness.is_none() {
        return Order::Hold;
    }
    let end = observed
        .lease_from
        .map(|from| from + lease_length(lease_timeout(state, observed.witness.row.as_ref())))
        .unwrap_or_default();
    Order::Lease(end.saturating_sub(observed.now))
}

/// The fast check, run ten times a second outside the operations lock: a
/// principal whose lease ended stops PostgreSQL at once (I1).
pub fn quorum_check(state: &SessionState, memory: &Memory, observed: &Observation) -> Decision {
    let mut decision = Decision::new(memory);
    let running = observed.postgres != PostgresObservation::Stopped;
    if !state.ended && state.role == Role::Principal && running && !has_quorum(state, observed) {
        decision.memory.expect_running = false;
        decision.note = Some(
            "No Quorum: the principal's lease ended (neither the witness nor the mirror answered); stopping PostgreSQL",
        );
        // No flush reply of the mirror may release a commit any more.
        decision.actions.push(Action::CloseStreams);
        return decision.act(Action::Stop(StopMode::Immediate));
    }
    decision
}

/// A synchronized mirror under FULL that lost its principal but still hears
/// the witness (spec 31-32, I3) first stops answering the principal, so
/// that its lease cannot be renewed through this mirror, and asks the
/// witness for the principal role once a whole takeover wait has passed
/// since it last answered (I1).
pub fn automatic_failover(
    state: &SessionState,
    memory: &Memory,
    observed: &Observation,
) -> Decision {
    let mut decision = Decision::new(memory);
    let row_allows = observed.witness.row.as_ref().is_some_and(|row| {
        row.synchronized
            && !row.suspended
            && row.safety == Safety::Full
            && row.epoch == state.epoch
            && row.principal != observed.name
    });
    let wants = state.witness.is_some()
        && !state.ended
        && state.role == Role::Mirror
        && state.has_copy
        && !state.needs_rewind
        && observed.witness.connected
        && !observed.peer.connected
        && row_allows;
    // A grant this partner has not recorded yet (see `follow_witness`)
    // keeps it refusing the old principal too.
    let granted = observed.witness.row.as_ref().is_some_and(|row| {
        row.principal == observed.name && row.epoch > state.epoch && state.role == Role::Mirror
    });
    decision.memory.refusing_principal = wants || granted;
    if !wants {
        return decision;
    }
    // Not since this agent started: its previous life may have answered
    // just before, so count from the start.
    let answered_at = observed
        .answered_principal_at
        .unwrap_or(decision.memory.started_at);
    let answered_ago = observed.now.saturating_sub(answered_at);
    if answered_ago < takeover_wait(state.timeout()) {
        return decision;
    }
    asking(state, &mut decision);
    decision.act(Action::AskPromotion {
        kind: PromotionKind::Automatic,
        principal_answered_ago: answered_ago,
    })
}

/// This mirror is about to ask the witness for the principal role: from
/// now on, across restarts too, it answers no ping of its principal until
/// the witness's row shows the outcome (I1; see [`refuses_principal`]).
pub fn asking(state: &SessionState, decision: &mut Decision) {
    if state.asked_promotion != Some(state.epoch) {
        decision.change(state, |state| state.asked_promotion = Some(state.epoch));
    }
}

/// The witness answered this agent (since it started) with no row, or with
/// one that makes it principal at no later epoch (a detached row grants
/// nothing).
fn witness_grants_nothing(observed: &Observation) -> bool {
    observed.witness.connected
        && observed
            .witness
            .row
            .as_ref()
            .is_none_or(|row| row.principal != observed.name || row.detached)
}

/// Whether this partner refuses a ping of its principal: while it asks the
/// witness for the principal role, and, after a restart, until the witness
/// has shown it the row its last request may have changed (I1).
pub fn refuses_principal(state: &SessionState, memory: &Memory) -> bool {
    state.role == Role::Mirror
        && (memory.refusing_principal || state.asked_promotion == Some(state.epoch))
}

/// The periodic decision: keep PostgreSQL in the role the durable state
/// gives it, follow a later epoch, derive the session state and apply the
/// safety level.
pub fn tick(state: &SessionState, memory: &Memory, observed: &Observation) -> Decision {
    let mut decision = Decision::new(memory);
    if follow_witness(state, observed, &mut decision) {
        return decision;
    }
    let granting = state.witness.is_some() && !witness_grants_nothing(observed);
    if state.asked_promotion.is_some() && observed.peer.connected && !granting {
        // A request of this mirror was refused or never arrived, or its
        // principal left that witness (which then grants nothing): it may
        // answer its principal again.
        decision.change(state, |state| state.asked_promotion = None);
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
            decision.actions.push(Action::CloseStreams);
            if state.role == Role::Principal && observed.postgres != PostgresObservation::Stopped {
                principal::stop_waiting(state, observed, &mut decision);
            }
            return decision;
        }
        learn_from_peer(state, observed, view, &mut decision);
    }
    let current = decision.current(state).clone();
    if current.ended {
        return decision;
    }
    match current.role {
        Role::Principal => principal::tick(&current, observed, peer, decision),
        Role::Mirror => mirror::tick(&current, observed, peer, decision),
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
            // A grant this partner did not record (it restarted, or the
            // answer was lost) may have been followed by answers to the old
            // principal that renewed its lease: stop answering it and wait
            // a whole takeover wait since the last one (I1).
            decision.memory.refusing_principal = true;
            let answered_at = observed
                .answered_principal_at
                .unwrap_or(decision.memory.started_at);
            if observed.now.saturating_sub(answered_at) < takeover_wait(state.timeout()) {
                return true;
            }
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

/// Records this partner as principal at `epoch`, still `promoting` (durable
/// first), then promotes PostgreSQL; the promotion is shown to others only
/// once its checkpoint is done ([`principal::finish_promotion`], I3).
pub fn become_principal(
    state: &SessionState,
    epoch: Epoch,
    suspended: bool,
    failover_lsn: Option<Lsn>,
    decision: &mut Decision,
) {
    decision.change(state, |state| {
        state.assume_role(Role::Principal, epoch, suspended);
        state.promoting = true;
        state.failover_lsn = failover_lsn;
    });
    decision.memory.applied_sync = None;
    decision.memory.sync_target = None;
    decision.memory.refusing_principal = false;
    decision.actions.push(Action::Promote);
    decision.actions.push(Action::FinishPromotion { epoch });
}

/// The witness granted this mirror the principal role in `row` (automatic
/// failover): take it as [`tick`] would on seeing the row.
pub fn granted(state: &SessionState, memory: &Memory, row: &RoleRow) -> Decision {
    let mut decision = Decision::new(memory);
    if row.epoch > state.epoch && state.role == Role::Mirror {
        become_principal(
            state,
            row.epoch,
            row.suspended,
            row.failover_lsn,
            &mut decision,
        );
        decision.note = Some("Automatic Failover: the witness made this partner the principal");
    }
    decision
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
    decision.memory.sync_target = None;
    decision.memory.expect_running = false;
    decision.note = Some("another partner is principal at a later role_sequence: stepping down");
    decision.actions.push(Action::CloseStreams);
    if observed.postgres != PostgresObservation::Stopped {
        decision.actions.push(Action::Stop(StopMode::Fast));
    }
}

/// Facts the peer's ping settles: its name, and on a mirror the
/// principal's epoch, safety and timeout (spec 30: set on the principal only).
fn learn_from_peer(
    state: &SessionState,
    observed: &Observation,
    view: &PeerView,
    decision: &mut Decision,
) {
    let ours = observed.witness.row.as_ref().map(|row| row.witness_id);
    decision.change(state, |state| {
        state.peer_name = Some(view.name.clone());
        if state.role == Role::Mirror && view.role == Role::Principal && view.epoch >= state.epoch {
            state.epoch = view.epoch;
            state.safety = view.safety;
            state.safety_sequence = view.safety_sequence;
            state.timeout_secs = view.timeout_secs;
            // The mirror follows the principal's witness (SET WITNESS is
            // issued there, spec 55), but keeps its own address for it
            // while both reach the same witness by identity: it may be
            // another route to it. A mirror never asks a witness its
            // principal left (I1, I3).
            let other_witness = match (view.witness_id, ours) {
                (Some(theirs), Some(ours)) => theirs != ours,
                _ => false,
            };
            if state.witness.is_some() != view.witness.is_some() || other_witness {
                state.witness = view.witness.clone();
            }
        }
    });
}

/// The refusal shown when the peer holds another database.
pub fn system_identifier_mismatch(theirs: u64, ours: u64) -> String {
    format!(
        "the principal's database (system identifier {theirs}) is not the one this partner holds \
         ({ours}): this data directory is not a copy of the principal; move it away so that the \
         agent takes a new base backup"
    )
}

#[cfg(test)]
mod tests;
