//! Which commands a partner may carry out right now (spec 37, 39, 45-49,
//! 54): pure checks over the durable state and what the agent knows of its
//! peer, so the refusals are unit-tested without PostgreSQL.
//!
//! pgmirror's readings where the reference contradicts itself (spec Q):
//! FAILOVER, RESUME, SAFETY and TIMEOUT are issued on the principal;
//! FORCE_SERVICE on the mirror; SUSPEND and OFF on either (a SUSPEND on the
//! mirror is forwarded to the principal, which owns the stream).
//!
//! Besides the checks, the durable change and the actions of each command
//! ([`apply`]) and of each step of the two role switches a command starts
//! (manual failover, forced service) are decided here, IO-free.

use crate::config::{MAX_TIMEOUT_SECS, MIN_TIMEOUT_SECS};
use crate::control::Command;
use crate::partner::policy::{
    become_principal, principal::stop_waiting, Action, Decision, Memory, Observation,
    PostgresObservation,
};
use crate::partner::state::{HandOver, SessionState};
use crate::roles::{Epoch, MirroringState, Role, Safety};
use crate::wire::lsn::Lsn;

/// What the agent knows beyond its durable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// The peer answered a ping within TIMEOUT.
    pub peer_connected: bool,
    /// None without a witness; else whether it answered within TIMEOUT.
    pub witness_connected: Option<bool>,
}

/// Where a command that passed its checks is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Here,
    /// Forward to the peer (the principal).
    Peer,
}

/// Checks `command` against the session; Err holds the reason for the user.
pub fn check(command: &Command, state: &SessionState, facts: Facts) -> Result<Route, String> {
    if state.ended {
        return Err("mirroring is off for this session (SET PARTNER OFF ended it)".into());
    }
    let principal = state.role == Role::Principal;
    let on_principal = |what: &str| -> Result<Route, String> {
        if principal {
            Ok(Route::Here)
        } else {
            Err(format!(
                "{what} must be issued on the principal (spec 54); this partner is the mirror"
            ))
        }
    };
    match command {
        Command::Suspend if !principal => {
            if facts.peer_connected {
                Ok(Route::Peer)
            } else {
                Err("the principal is not reachable, so there is no stream to suspend".into())
            }
        }
        Command::Suspend if state.suspended => Err("the session is already SUSPENDED".into()),
        Command::Suspend => Ok(Route::Here),
        Command::Resume => {
            on_principal("RESUME")?;
            if state.suspended {
                Ok(Route::Here)
            } else {
                Err(format!(
                    "the session is not suspended (it is {})",
                    state.state
                ))
            }
        }
        Command::Safety(_) => on_principal("SAFETY"),
        Command::Timeout(secs) => {
            on_principal("TIMEOUT")?;
            if (MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(secs) {
                Ok(Route::Here)
            } else {
                Err(format!(
                    "TIMEOUT {secs} is out of range: use {MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS} seconds"
                ))
            }
        }
        Command::Failover => {
            on_principal("FAILOVER")?;
            if state.safety != Safety::Full {
                return Err(
                    "manual failover needs SAFETY FULL (spec 37); in high-performance mode use \
                     FORCE_SERVICE_ALLOW_DATA_LOSS on the mirror once the principal is lost"
                        .into(),
                );
            }
            if !facts.peer_connected {
                return Err(
                    "the mirror is not connected; manual failover needs both partners".into(),
                );
            }
            if state.suspended || state.state != MirroringState::Synchronized {
                return Err(format!(
                    "the session is {}; manual failover needs SYNCHRONIZED (spec 37): \
                     wait until the mirror has caught up{}",
                    state.state,
                    if state.suspended {
                        " (RESUME it first)"
                    } else {
                        ""
                    }
                ));
            }
            Ok(Route::Here)
        }
        Command::ForceServiceAllowDataLoss => {
            if principal {
                return Err(
                    "FORCE_SERVICE_ALLOW_DATA_LOSS is issued on the mirror (spec 39); this partner \
                     is already the principal"
                        .into(),
                );
            }
            if facts.peer_connected {
                return Err(
                    "the principal is still connected; forced service is only for a lost \
                     principal (spec 39); use FAILOVER on the principal instead"
                        .into(),
                );
            }
            if !state.has_copy || state.needs_rewind {
                return Err("this partner holds no usable copy of the database".into());
            }
            if facts.witness_connected == Some(false) {
                return Err(
                    "a witness is configured but this mirror cannot reach it; forced service needs \
                     the witness connected to the mirror (spec 39)"
                        .into(),
                );
            }
            Ok(Route::Here)
        }
        Command::Off => Ok(Route::Here),
        Command::Witness(_) => on_principal("SET WITNESS"),
    }
}

/// How a command that passed [`check`] is carried out here.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// A change of settings: persist, then act.
    Change(Decision),
    /// The principal hands over to the mirror (spec 37-38): see
    /// [`failover_begins`] and [`failover_answered`].
    ManualFailover,
    /// The mirror takes over without its principal (spec 39-40): see
    /// [`forced_service`].
    ForcedService,
    /// SET WITNESS, or PARTNER OFF, on the principal: first the current
    /// witness (if any) releases the session (`Detach`: it records the mirror
    /// as not synchronized and grants nothing more for it), so that it can
    /// never grant a failover on what the principal no longer reports to it
    /// (I1-I3); if it cannot be told, the command is refused. Then persist
    /// and act.
    LeaveWitness(Decision),
}

/// What `command` changes on this partner. Commits stop waiting for the
/// mirror only once the witness (if any) recorded it (I2).
pub fn apply(
    command: &Command,
    state: &SessionState,
    memory: &Memory,
    observed: &Observation,
) -> Plan {
    let mut decision = Decision::new(memory);
    let running = observed.postgres != PostgresObservation::Stopped;
    let principal = state.role == Role::Principal && running;
    match command {
        Command::Suspend => {
            decision.change(state, |state| {
                state.suspended = true;
                state.synchronized = false;
                state.state = MirroringState::Suspended;
            });
            if principal {
                stop_waiting(state, observed, &mut decision);
            }
            decision.actions.push(Action::CloseStreams);
        }
        Command::Resume => decision.change(state, |state| {
            state.suspended = false;
            state.state = MirroringState::Synchronizing;
        }),
        Command::Safety(safety) => {
            decision.change(state, |state| {
                if state.safety != *safety {
                    state.safety = *safety;
                    state.safety_sequence += 1;
                }
                if *safety == Safety::Off {
                    state.synchronized = false;
                }
            });
            if *safety == Safety::Off && principal {
                stop_waiting(state, observed, &mut decision);
            }
        }
        Command::Timeout(secs) => decision.change(state, |state| state.timeout_secs = *secs),
        Command::Witness(witness) => {
            decision.change(state, |state| state.witness = witness.clone());
            return Plan::LeaveWitness(decision);
        }
        Command::Off => {
            decision.change(state, |state| {
                state.ended = true;
                state.synchronized = false;
            });
            decision.actions.push(Action::CloseStreams);
            if principal {
                // Without a mirror, waiting for one would block every commit.
                if state.witness.is_some() {
                    // The witness releases the session first (see Plan).
                    decision.memory.applied_sync = Some(false);
                    decision.actions.push(Action::RequireSync(false));
                    return Plan::LeaveWitness(decision);
                }
                stop_waiting(state, observed, &mut decision);
            }
        }
        Command::Failover => return Plan::ManualFailover,
        Command::ForceServiceAllowDataLoss => return Plan::ForcedService,
    }
    Plan::Change(decision)
}

/// The first step of a manual failover on the principal: stop PostgreSQL
/// fast, which ships every WAL record, the shutdown checkpoint included,
/// to the synchronous mirror. The agent then reads the checkpoint's LSN and
/// goes on with [`failover_hand_over`].
pub fn failover_begins(memory: &Memory) -> Decision {
    let mut decision = Decision::new(memory);
    decision.memory.expect_running = false;
    decision.act(Action::Stop(crate::partner::engine::StopMode::Fast))
}

/// The second step: record the request durably, then ask the mirror to
/// take over once it has received WAL up to `failover_lsn`.
pub fn failover_hand_over(state: &SessionState, memory: &Memory, failover_lsn: Lsn) -> Decision {
    let mut decision = Decision::new(memory);
    let hand_over = HandOver {
        epoch: state.epoch.next(),
        failover_lsn: Some(failover_lsn),
    };
    decision.change(state, |state| state.handing_over = Some(hand_over));
    decision.act(Action::HandOver(hand_over))
}

/// How the mirror answered a takeover request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOverAnswer {
    /// It is the principal at the requested epoch.
    Done,
    /// It said no (and so did not promote).
    Refused(String),
    /// No answer: lost, late or the connection broke.
    Lost(String),
}

/// The principal's last step of a handover (manual failover, or after its
/// PostgreSQL died): step down when the mirror took over; serve again when
/// it refused; with no answer stay stopped and ask again at the next tick,
/// since the mirror may have promoted (I1).
pub fn failover_answered(
    state: &SessionState,
    memory: &Memory,
    hand_over: HandOver,
    answer: &TakeOverAnswer,
) -> Decision {
    let mut decision = Decision::new(memory);
    if state.handing_over != Some(hand_over) {
        // Settled meanwhile (a later epoch demoted this partner).
        return decision;
    }
    match answer {
        TakeOverAnswer::Done => {
            decision.change(state, |state| {
                state.step_down(hand_over.epoch, false, hand_over.failover_lsn)
            });
            decision.memory.applied_sync = None;
            decision.memory.sync_target = None;
            decision.memory.expect_running = false;
            decision.actions.push(Action::CloseStreams);
        }
        TakeOverAnswer::Refused(reason) => {
            decision.refusal = Some(format!(
                "failover aborted, this partner stays the principal: {reason}"
            ));
            decision.change(state, |state| state.handing_over = None);
        }
        TakeOverAnswer::Lost(reason) => {
            decision.refusal = Some(format!(
                "the mirror did not answer the takeover request ({reason}); PostgreSQL stays \
                 stopped here until the mirror or the witness says which partner is principal"
            ));
        }
    }
    decision
}

/// Whether this mirror may take over at `epoch` when its principal asks:
/// Ok(true) when it already did (a repeated request whose answer was lost).
pub fn take_over_check(state: &SessionState, epoch: Epoch) -> Result<bool, String> {
    if state.role == Role::Principal && state.epoch >= epoch {
        // Done, or superseded: never a refusal that would let the asking
        // principal serve again at its older epoch (I1).
        return Ok(true);
    }
    if state.role != Role::Mirror || state.ended || !state.has_copy || state.needs_rewind {
        return Err("this partner is not a mirror holding a copy".into());
    }
    if state.epoch.next() != epoch {
        return Err(format!(
            "role_sequence mismatch: asked to become principal at {epoch}, this mirror is at {}",
            state.epoch
        ));
    }
    Ok(false)
}

/// How the witness answered a promotion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessAnswer {
    /// No witness is configured.
    NoWitness,
    Granted,
    Refused(String),
    Unreachable(String),
}

/// The mirror's last step of a takeover its principal asked for, once the
/// WAL up to the failover LSN arrived: promote unless the witness refused
/// (spec 24: with the witness lost, a manual failover is still allowed).
pub fn take_over(
    state: &SessionState,
    memory: &Memory,
    epoch: Epoch,
    failover_lsn: Option<Lsn>,
    witness: &WitnessAnswer,
) -> Result<Decision, String> {
    if let WitnessAnswer::Refused(reason) = witness {
        return Err(format!("the witness refused: {reason}"));
    }
    let mut decision = Decision::new(memory);
    become_principal(state, epoch, false, failover_lsn, &mut decision);
    Ok(decision)
}

/// A mirror about to ask the witness for the principal role (forced
/// service, or a takeover the principal asked for): it stops answering its
/// principal until the witness's row shows the outcome (I1,
/// [`super::asking`]).
pub fn promotion_asks(state: &SessionState, memory: &Memory) -> Decision {
    let mut decision = Decision::new(memory);
    super::asking(state, &mut decision);
    decision
}

/// Forced service on the mirror once the witness (if any) granted it:
/// principal at the next epoch, session SUSPENDED (spec 39-40).
pub fn forced_service(
    state: &SessionState,
    memory: &Memory,
    received: Option<Lsn>,
    witness: &WitnessAnswer,
) -> Result<Decision, String> {
    match witness {
        WitnessAnswer::NoWitness | WitnessAnswer::Granted => {}
        WitnessAnswer::Refused(reason) => return Err(format!("the witness refused: {reason}")),
        WitnessAnswer::Unreachable(reason) => {
            return Err(format!("the witness did not answer: {reason}"))
        }
    }
    let mut decision = Decision::new(memory);
    become_principal(state, state.epoch.next(), true, received, &mut decision);
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(role: Role, state: MirroringState) -> SessionState {
        let mut session = SessionState::new(role, Safety::Full, 10);
        session.state = state;
        session.has_copy = true;
        session
    }

    const CONNECTED: Facts = Facts {
        peer_connected: true,
        witness_connected: None,
    };
    const ALONE: Facts = Facts {
        peer_connected: false,
        witness_connected: None,
    };

    #[test]
    fn failover_needs_principal_full_connected_and_synchronized() {
        let synced = session(Role::Principal, MirroringState::Synchronized);
        assert_eq!(
            check(&Command::Failover, &synced, CONNECTED),
            Ok(Route::Here)
        );
        let on_mirror = session(Role::Mirror, MirroringState::Synchronized);
        assert!(check(&Command::Failover, &on_mirror, CONNECTED)
            .unwrap_err()
            .contains("principal"));
        let syncing = session(Role::Principal, MirroringState::Synchronizing);
        assert!(check(&Command::Failover, &syncing, CONNECTED)
            .unwrap_err()
            .contains("SYNCHRONIZING"));
        assert!(check(&Command::Failover, &synced, ALONE)
            .unwrap_err()
            .contains("not connected"));
        let mut async_mode = synced.clone();
        async_mode.safety = Safety::Off;
        assert!(check(&Command::Failover, &async_mode, CONNECTED)
            .unwrap_err()
            .contains("SAFETY FULL"));
    }

    #[test]
    fn forced_service_needs_a_mirror_whose_principal_is_gone() {
        let mirror = session(Role::Mirror, MirroringState::Disconnected);
        assert_eq!(
            check(&Command::ForceServiceAllowDataLoss, &mirror, ALONE),
            Ok(Route::Here)
        );
        assert!(
            check(&Command::ForceServiceAllowDataLoss, &mirror, CONNECTED)
                .unwrap_err()
                .contains("still connected")
        );
        let principal = session(Role::Principal, MirroringState::Disconnected);
        assert!(check(&Command::ForceServiceAllowDataLoss, &principal, ALONE).is_err());
        let witness_lost = Facts {
            peer_connected: false,
            witness_connected: Some(false),
        };
        assert!(
            check(&Command::ForceServiceAllowDataLoss, &mirror, witness_lost)
                .unwrap_err()
                .contains("witness")
        );
    }

    #[test]
    fn suspend_resume_and_settings() {
        let mut principal = session(Role::Principal, MirroringState::Synchronized);
        assert!(check(&Command::Resume, &principal, CONNECTED)
            .unwrap_err()
            .contains("not suspended"));
        principal.suspended = true;
        assert!(check(&Command::Suspend, &principal, CONNECTED)
            .unwrap_err()
            .contains("already"));
        assert_eq!(
            check(&Command::Resume, &principal, CONNECTED),
            Ok(Route::Here)
        );
        let mirror = session(Role::Mirror, MirroringState::Synchronized);
        assert_eq!(
            check(&Command::Suspend, &mirror, CONNECTED),
            Ok(Route::Peer)
        );
        assert!(check(&Command::Resume, &mirror, CONNECTED).is_err());
        assert!(check(&Command::Timeout(0), &principal, CONNECTED)
            .unwrap_err()
            .contains("out of range"));
        let mut ended = principal.clone();
        ended.ended = true;
        assert!(check(&Command::Off, &ended, CONNECTED)
            .unwrap_err()
            .contains("mirroring is off"));
    }
}
