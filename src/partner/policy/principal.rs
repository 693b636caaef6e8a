//! The principal's periodic decision: serve with quorum, finish a
//! promotion, derive SYNCHRONIZED from the mirror's flush position and make
//! commits wait for the mirror or, with the witness's consent, not (I1-I3).

use crate::control::PeerView;
use crate::partner::policy::{
    demote, has_quorum, witness_allows_exposure, Action, Decision, Observation,
    PostgresObservation, StandbyObservation,
};
use crate::partner::state::{HandOver, SessionState};
use crate::roles::{MirroringState, Role, Safety};

pub(super) fn tick(
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
    if state.promoting {
        return finish_promotion(state, observed, decision);
    }
    match &observed.postgres {
        PostgresObservation::Principal { flushed, standby } => {
            serve(state, observed, *flushed, standby.as_ref(), decision)
        }
        PostgresObservation::Stopped => start(state, observed, peer, decision),
        // Starting or stopping: look again at the next tick.
        PostgresObservation::Unreadable | PostgresObservation::Mirror { .. } => decision,
    }
}

/// Promotion is atomic (I3): the durable state says `promoting` from the
/// witness's grant until PostgreSQL is read-write and checkpointed; an
/// agent restarted in between carries on from where PostgreSQL is.
fn finish_promotion(
    state: &SessionState,
    observed: &Observation,
    mut decision: Decision,
) -> Decision {
    match observed.postgres {
        PostgresObservation::Stopped => decision.act(Action::StartMirror),
        PostgresObservation::Mirror { .. } => decision.act(Action::Promote),
        PostgresObservation::Unreadable => decision,
        PostgresObservation::Principal { .. } => {
            if decision.memory.checkpointed == Some(state.epoch) {
                decision.change(state, |state| state.promoting = false);
                decision.memory.expect_running = true;
                decision.note = Some("promotion done: serving as principal");
                decision
            } else {
                decision.act(Action::FinishPromotion { epoch: state.epoch })
            }
        }
    }
}

/// PostgreSQL is down under this principal: a crash hands over to a
/// synchronized mirror; otherwise it restarts when quorum allows.
fn start(
    state: &SessionState,
    observed: &Observation,
    peer: Option<&PeerView>,
    mut decision: Decision,
) -> Decision {
    let crashed = decision.memory.expect_running;
    decision.memory.expect_running = false;
    decision.memory.sync_target = None;
    if let Some(hand_over) = state.handing_over {
        // I1: the mirror may have taken over; ask again, never serve here
        // at this epoch until it answers (or a later epoch demotes this one).
        return decision.act(Action::HandOver(hand_over));
    }
    if crashed
        && state.witness.is_some()
        && state.safety == Safety::Full
        && state.synchronized
        && observed.peer.connected
    {
        decision.note =
            Some("PostgreSQL died under this principal; handing over to the synchronized mirror");
        let hand_over = HandOver {
            epoch: state.epoch.next(),
            failover_lsn: None,
        };
        decision.change(state, |state| state.handing_over = Some(hand_over));
        return decision.act(Action::HandOver(hand_over));
    }
    if state.witness.is_some() {
        // I1: with a witness, serve only with a lease (spec 20).
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
    // I2 across restarts: commits wait for the mirror unless the durable
    // state and the witness both say they need not.
    let synchronous = (state.safety == Safety::Full && !state.suspended && state.synchronized)
        || !witness_allows_exposure(state, observed);
    decision.memory.expect_running = true;
    decision.memory.applied_sync = Some(synchronous && state.peer_name.is_some());
    decision.act(Action::StartPrincipal { synchronous })
}

/// The mirror's standing: SYNCHRONIZED only when its walsender is 'sync'
/// (the requirement is in force) and its flush position has reached the
/// principal's flush position read once that was seen (I2).
fn standing(
    state: &SessionState,
    flushed: crate::wire::lsn::Lsn,
    standby: Option<&StandbyObservation>,
    decision: &mut Decision,
) -> MirroringState {
    let required = decision.memory.applied_sync == Some(true);
    let in_force = standby.filter(|standby| required && standby.sync && standby.streaming);
    match in_force {
        Some(standby) => {
            let target = *decision.memory.sync_target.get_or_insert(flushed);
            if state.safety == Safety::Full && standby.flushed >= target {
                return MirroringState::Synchronized;
            }
        }
        None => decision.memory.sync_target = None,
    }
    match standby {
        None => MirroringState::Disconnected,
        Some(standby) if standby.streaming && state.safety == Safety::Off => {
            MirroringState::Unsynchronized
        }
        Some(_) => MirroringState::Synchronizing,
    }
}

fn serve(
    state: &SessionState,
    observed: &Observation,
    flushed: crate::wire::lsn::Lsn,
    standby: Option<&StandbyObservation>,
    mut decision: Decision,
) -> Decision {
    decision.memory.expect_running = true;
    let standing = standing(state, flushed, standby, &mut decision);
    let observed_state = if state.suspended {
        MirroringState::Suspended
    } else {
        standing
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
    let streaming = standby.is_some_and(|standby| standby.streaming);
    // Under FULL a lost mirror holds commits for TIMEOUT, then the
    // principal runs exposed (spec 17, 21); a streaming mirror is required
    // so that it can become synchronized.
    let (wait_for_mirror, synchronized) = match state.safety {
        Safety::Full if !state.suspended => {
            let synchronized = caught_up || (state.synchronized && !lapsed);
            (synchronized || streaming, synchronized)
        }
        _ => (false, false),
    };
    if state.synchronized && !synchronized {
        decision.note = Some("principal running exposed: the mirror is not synchronized");
    }
    decision.change(state, |state| {
        state.state = observed_state;
        state.synchronized = synchronized;
    });
    if wait_for_mirror {
        require(state, true, &mut decision);
        let row_unsynchronized = observed.witness.row.as_ref().is_some_and(|row| {
            row.epoch == state.epoch
                && row.principal == observed.name
                && (!row.synchronized || row.detached)
        });
        if state.witness.is_some() && synchronized && caught_up && row_unsynchronized {
            decision.actions.push(Action::RecordAtWitness {
                synchronized: true,
                based_on: observed.witness.row.as_ref().map(|row| row.version),
            });
        }
    } else {
        stop_waiting(state, observed, &mut decision);
    }
    decision
}

/// Commits stop waiting for the mirror, but with a witness only once it
/// has recorded the mirror as not synchronized at this epoch (I2); until
/// then the requirement stays and the witness is asked.
pub(super) fn stop_waiting(state: &SessionState, observed: &Observation, decision: &mut Decision) {
    if decision.memory.applied_sync == Some(false) {
        return;
    }
    if !witness_allows_exposure(state, observed) {
        decision.actions.push(Action::RecordAtWitness {
            synchronized: false,
            based_on: None,
        });
        return;
    }
    require(state, false, decision);
}

/// Queues a change of the synchronous requirement when it differs from the
/// one applied (none can be required before the peer's name is known).
fn require(state: &SessionState, synchronous: bool, decision: &mut Decision) {
    let synchronous = synchronous && state.peer_name.is_some();
    if decision.memory.applied_sync != Some(synchronous) {
        decision.memory.applied_sync = Some(synchronous);
        decision.memory.sync_target = None;
        decision.actions.push(Action::RequireSync(synchronous));
    }
}
