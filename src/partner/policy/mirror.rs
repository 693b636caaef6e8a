//! The mirror's periodic decision: take a copy of the principal, rewind a
//! former principal before it follows, keep the standby running and show
//! the state the principal reports.

use crate::control::PeerView;
use crate::partner::engine::StopMode;
use crate::partner::policy::{
    system_identifier_mismatch, Action, Decision, Observation, PostgresObservation,
};
use crate::partner::state::SessionState;
use crate::roles::{MirroringState, Role};

pub(super) fn tick(
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
