//! Case-by-case tests of the partner's decisions, each naming the
//! invariant it defends.

use std::time::Duration;

use super::commands::{self, Plan, TakeOverAnswer};
use super::*;
use crate::config::Endpoint;
use crate::control::{Command, PeerView, RoleRow};
use crate::roles::lease_length;
use crate::roles::MirroringState;

const SECOND: Duration = Duration::from_secs(1);

fn witness() -> Endpoint {
    "127.0.0.1:7000".parse().unwrap()
}

pub(super) fn principal() -> SessionState {
    let mut state = SessionState::new(Role::Principal, Safety::Full, 2);
    state.peer_name = Some("beta".into());
    state.witness = Some(witness());
    state.synchronized = true;
    state.state = MirroringState::Synchronized;
    state
}

pub(super) fn mirror() -> SessionState {
    let mut state = SessionState::new(Role::Mirror, Safety::Full, 2);
    state.peer_name = Some("alpha".into());
    state.witness = Some(witness());
    state.has_copy = true;
    state
}

pub(super) fn row(principal: &str, epoch: u64, synchronized: bool) -> RoleRow {
    RoleRow {
        session: "shop".into(),
        principal: principal.into(),
        mirror: None,
        epoch: Epoch(epoch),
        safety: Safety::Full,
        safety_sequence: 1,
        suspended: false,
        synchronized,
        timeout_secs: 2,
        failover_lsn: None,
        witness_id: 1,
        detached: false,
        version: 4,
    }
}

fn view(name: &str, role: Role, epoch: u64) -> PeerView {
    PeerView {
        witness: Some(witness()),
        witness_id: Some(1),
        ..PeerView::sample(name, role, epoch)
    }
}

fn standby(sync: bool, flushed: u64) -> Option<StandbyObservation> {
    Some(StandbyObservation {
        streaming: true,
        sync,
        flushed: Lsn(flushed),
    })
}

/// alpha, principal at epoch 1, with a fresh lease, its mirror streaming
/// and synchronized, the witness agreeing.
pub(super) fn observed(name: &str) -> Observation {
    Observation {
        now: 10 * SECOND,
        name: name.into(),
        pg_major: 15,
        peer: PeerObservation {
            view: Some(view(
                if name == "alpha" { "beta" } else { "alpha" },
                Role::Mirror,
                1,
            )),
            connected: true,
        },
        witness: WitnessObservation {
            row: Some(row("alpha", 1, true)),
            connected: true,
            exposure_recorded_at: None,
        },
        postgres: PostgresObservation::Principal {
            flushed: Lsn(100),
            standby: standby(true, 100),
        },
        lease_from: Some(10 * SECOND - Duration::from_millis(300)),
        answered_principal_at: None,
    }
}

fn synchronous_memory() -> Memory {
    Memory {
        applied_sync: Some(true),
        expect_running: true,
        ..Memory::new(Duration::ZERO)
    }
}

#[test]
fn i1_a_principal_whose_lease_ended_stops_postgresql() {
    let state = principal();
    let mut seen = observed("alpha");
    assert!(quorum_check(&state, &Memory::default(), &seen)
        .actions
        .is_empty());
    seen.lease_from = Some(seen.now - lease_length(state.timeout()));
    let decision = quorum_check(&state, &Memory::default(), &seen);
    assert_eq!(
        decision.actions,
        [Action::CloseStreams, Action::Stop(StopMode::Immediate)]
    );
    // Connected flags do not count, only answered round trips.
    seen.peer.connected = true;
    seen.witness.connected = true;
    assert!(!quorum_check(&state, &Memory::default(), &seen)
        .actions
        .is_empty());
    // Without a witness there is no lease (spec 17, 55).
    let mut alone = state.clone();
    alone.witness = None;
    assert!(quorum_check(&alone, &Memory::default(), &seen)
        .actions
        .is_empty());
}

#[test]
fn i1_without_a_lease_a_stopped_principal_does_not_start() {
    let state = principal();
    let mut seen = observed("alpha");
    seen.postgres = PostgresObservation::Stopped;
    seen.lease_from = None;
    let decision = tick(&state, &Memory::default(), &seen);
    assert!(decision.actions.is_empty(), "{decision:?}");
    seen.lease_from = Some(seen.now);
    let decision = tick(&state, &Memory::default(), &seen);
    assert_eq!(
        decision.actions,
        [Action::StartPrincipal { synchronous: true }]
    );
}

#[test]
fn i1_a_later_epoch_at_the_witness_demotes_the_principal() {
    let state = principal();
    let mut seen = observed("alpha");
    seen.witness.row = Some(row("beta", 2, false));
    let decision = tick(&state, &synchronous_memory(), &seen);
    let next = decision.state.unwrap();
    assert_eq!(
        (next.role, next.epoch, next.needs_rewind),
        (Role::Mirror, Epoch(2), true)
    );
    assert_eq!(
        decision.actions,
        [Action::CloseStreams, Action::Stop(StopMode::Fast)]
    );
}

#[test]
fn i2_the_principal_runs_exposed_only_after_the_witness_recorded_it() {
    let state = principal();
    let mut memory = synchronous_memory();
    memory.unsynchronized_since = Some(SECOND);
    let mut seen = observed("alpha");
    seen.postgres = PostgresObservation::Principal {
        flushed: Lsn(200),
        standby: None,
    };
    // TIMEOUT lapsed without the mirror: ask the witness, keep waiting.
    let decision = tick(&state, &memory, &seen);
    assert_eq!(
        decision.actions,
        [Action::RecordAtWitness {
            synchronized: false,
            based_on: None
        }]
    );
    assert_eq!(decision.memory.applied_sync, Some(true));
    // The row says so, but not in answer to this agent's record: a
    // SYNCHRONIZED record whose answer was lost may have landed since.
    seen.witness.row = Some(row("alpha", 1, false));
    let decision = tick(&state, &memory, &seen);
    assert!(!decision.actions.contains(&Action::RequireSync(false)));
    // Once the witness answered this agent's record, commits stop waiting.
    seen.witness.exposure_recorded_at = Some(1);
    let decision = tick(&state, &memory, &seen);
    assert_eq!(decision.actions, [Action::RequireSync(false)]);
    // A row of another epoch does not count.
    seen.witness.row = Some(row("alpha", 0, false));
    let decision = tick(&state, &memory, &seen);
    assert!(!decision.actions.contains(&Action::RequireSync(false)));
}

#[test]
fn i2_a_restarted_principal_waits_for_the_mirror_until_the_witness_agrees() {
    let mut state = principal();
    state.synchronized = false;
    let mut seen = observed("alpha");
    seen.postgres = PostgresObservation::Stopped;
    seen.witness.row = None;
    let decision = tick(&state, &Memory::default(), &seen);
    assert_eq!(
        decision.actions,
        [Action::StartPrincipal { synchronous: true }]
    );
    seen.witness.row = Some(row("alpha", 1, false));
    seen.witness.exposure_recorded_at = Some(1);
    let decision = tick(&state, &Memory::default(), &seen);
    assert_eq!(
        decision.actions,
        [Action::StartPrincipal { synchronous: false }]
    );
}

#[test]
fn i2_synchronized_means_the_requirement_is_in_force_and_the_mirror_flushed() {
    let mut state = principal();
    state.synchronized = false;
    state.state = MirroringState::Synchronizing;
    let mut seen = observed("alpha");
    seen.witness.row = Some(row("alpha", 1, false));
    // Streaming but not yet required: require it, not synchronized yet.
    seen.postgres = PostgresObservation::Principal {
        flushed: Lsn(500),
        standby: standby(false, 500),
    };
    let memory = Memory {
        applied_sync: Some(false),
        ..Memory::default()
    };
    let decision = tick(&state, &memory, &seen);
    assert_eq!(decision.actions, [Action::RequireSync(true)]);
    assert!(!decision
        .state
        .as_ref()
        .is_some_and(|state| state.synchronized));
    // 'sync' now, but the mirror has not flushed what the principal had.
    seen.postgres = PostgresObservation::Principal {
        flushed: Lsn(600),
        standby: standby(true, 550),
    };
    let decision = tick(&state, &decision.memory, &seen);
    assert_eq!(decision.memory.sync_target, Some(Lsn(600)));
    assert!(decision.actions.is_empty(), "{decision:?}");
    // Flushed past the target: SYNCHRONIZED, and the witness is told.
    seen.postgres = PostgresObservation::Principal {
        flushed: Lsn(700),
        standby: standby(true, 600),
    };
    let decision = tick(&state, &decision.memory, &seen);
    let next = decision.state.unwrap();
    assert_eq!(
        (next.state, next.synchronized),
        (MirroringState::Synchronized, true)
    );
    assert_eq!(
        decision.actions,
        [Action::RecordAtWitness {
            synchronized: true,
            based_on: Some(4)
        }]
    );
}

#[test]
fn i2_suspend_records_at_the_witness_before_commits_stop_waiting() {
    let state = principal();
    let seen = observed("alpha");
    let Plan::Change(decision) =
        commands::apply(&Command::Suspend, &state, &synchronous_memory(), &seen)
    else {
        panic!("SUSPEND is a change");
    };
    assert!(decision.state.as_ref().unwrap().suspended);
    assert_eq!(
        decision.actions,
        [
            Action::RecordAtWitness {
                synchronized: false,
                based_on: None
            },
            Action::CloseStreams
        ]
    );
    let mut agreed = seen.clone();
    agreed.witness.row = Some(row("alpha", 1, false));
    agreed.witness.exposure_recorded_at = Some(1);
    let Plan::Change(decision) = commands::apply(
        &Command::Safety(Safety::Off),
        &state,
        &synchronous_memory(),
        &agreed,
    ) else {
        panic!("SAFETY is a change");
    };
    assert_eq!(decision.actions, [Action::RequireSync(false)]);
}

#[test]
fn i3_a_promotion_is_shown_only_once_checkpointed() {
    let state = mirror();
    let mut seen = observed("beta");
    seen.peer.connected = false;
    seen.witness.row = Some(row("beta", 2, false));
    seen.postgres = PostgresObservation::Mirror {
        received: Some(Lsn(100)),
    };
    let decision = tick(&state, &Memory::default(), &seen);
    let promoting = decision.state.clone().unwrap();
    assert!(promoting.promoting && promoting.role == Role::Principal);
    assert_eq!(
        decision.actions,
        [Action::Promote, Action::FinishPromotion { epoch: Epoch(2) }]
    );
    // Restarted in the middle: PostgreSQL read-write, no checkpoint known.
    seen.postgres = PostgresObservation::Principal {
        flushed: Lsn(120),
        standby: None,
    };
    let decision = tick(&promoting, &Memory::default(), &seen);
    assert_eq!(
        decision.actions,
        [Action::FinishPromotion { epoch: Epoch(2) }]
    );
    assert!(decision.state.is_none());
    let checkpointed = Memory {
        checkpointed: Some(Epoch(2)),
        ..Memory::default()
    };
    let decision = tick(&promoting, &checkpointed, &seen);
    assert!(!decision.state.unwrap().promoting);
    // Still in recovery after a restart: promote again.
    seen.postgres = PostgresObservation::Mirror { received: None };
    assert_eq!(
        tick(&promoting, &Memory::default(), &seen).actions,
        [Action::Promote]
    );
}

#[test]
fn i1_the_mirror_stops_answering_before_it_asks_for_the_principal_role() {
    let state = mirror();
    let mut seen = observed("beta");
    seen.peer.connected = false;
    seen.postgres = PostgresObservation::Mirror {
        received: Some(Lsn(100)),
    };
    seen.answered_principal_at = Some(seen.now - SECOND);
    let decision = automatic_failover(&state, &Memory::default(), &seen);
    assert!(decision.memory.refusing_principal);
    assert!(decision.actions.is_empty());
    seen.answered_principal_at = Some(seen.now - takeover_wait(state.timeout()));
    let decision = automatic_failover(&state, &Memory::default(), &seen);
    // A restarted agent that has not answered yet counts from its start.
    let restarted = Memory::new(seen.now - SECOND);
    let mut fresh = seen.clone();
    fresh.answered_principal_at = None;
    assert!(automatic_failover(&state, &restarted, &fresh)
        .actions
        .is_empty());
    assert!(matches!(
        decision.actions[..],
        [Action::AskPromotion {
            kind: PromotionKind::Automatic,
            ..
        }]
    ));
    // The request is on record before it leaves: restarted, the mirror
    // still refuses its principal (whose lease a grant it missed would
    // otherwise renew) until the witness's row shows no grant.
    let asked = decision.state.clone().expect("recorded before asking");
    assert!(refuses_principal(&asked, &Memory::default()));
    let mut back = observed("beta");
    back.postgres = seen.postgres.clone();
    back.witness.row = None;
    back.witness.connected = false;
    let unheard = tick(&asked, &Memory::default(), &back).state;
    assert!(refuses_principal(
        unheard.as_ref().unwrap_or(&asked),
        &Memory::default()
    ));
    back.witness.connected = true;
    back.witness.row = Some(row("alpha", 1, true));
    let heard = tick(&asked, &Memory::default(), &back).state.unwrap();
    assert!(!refuses_principal(&heard, &Memory::default()));
    // A witness without a row for the session granted nothing either.
    back.witness.row = None;
    let rowless = tick(&asked, &Memory::default(), &back).state.unwrap();
    assert!(!refuses_principal(&rowless, &Memory::default()));
    // I3: not for a row the witness holds as not synchronized.
    seen.witness.row = Some(row("alpha", 1, false));
    let decision = automatic_failover(&state, &Memory::default(), &seen);
    assert!(decision.actions.is_empty() && !decision.memory.refusing_principal);
}

#[test]
fn i1_a_lost_takeover_answer_keeps_the_old_principal_stopped() {
    let state = principal();
    let memory = commands::failover_begins(&synchronous_memory()).memory;
    let asked = commands::failover_hand_over(&state, &memory, Lsn(900));
    let handing = asked.state.clone().unwrap();
    let Action::HandOver(hand_over) = asked.actions[0] else {
        panic!("{asked:?}");
    };
    assert_eq!(hand_over.epoch, Epoch(2));
    let lost = commands::failover_answered(
        &handing,
        &memory,
        hand_over,
        &TakeOverAnswer::Lost("timed out".into()),
    );
    assert!(lost.state.is_none() && lost.actions.is_empty());
    let mut seen = observed("alpha");
    seen.postgres = PostgresObservation::Stopped;
    let retry = tick(&handing, &memory, &seen);
    assert_eq!(retry.actions, [Action::HandOver(hand_over)]);
    let done = commands::failover_answered(&handing, &memory, hand_over, &TakeOverAnswer::Done);
    let stepped = done.state.unwrap();
    assert_eq!(
        (stepped.role, stepped.epoch, stepped.handing_over),
        (Role::Mirror, Epoch(2), None)
    );
    let refused = commands::failover_answered(
        &handing,
        &memory,
        hand_over,
        &TakeOverAnswer::Refused("not synchronized".into()),
    );
    assert_eq!(refused.state.unwrap().handing_over, None);
}

#[test]
fn a_repeated_takeover_request_is_answered_done() {
    let mut state = mirror();
    assert_eq!(commands::take_over_check(&state, Epoch(2)), Ok(false));
    assert!(commands::take_over_check(&state, Epoch(3)).is_err());
    state.assume_role(Role::Principal, Epoch(2), false);
    assert_eq!(commands::take_over_check(&state, Epoch(2)), Ok(true));
}

#[test]
fn what_the_peer_says_is_kept_when_the_role_tick_changes_nothing_more() {
    let mut state = mirror();
    state.witness = None;
    state.state = MirroringState::Synchronized;
    state.synchronized = true;
    let mut seen = observed("beta");
    seen.postgres = PostgresObservation::Mirror {
        received: Some(Lsn(100)),
    };
    let mut principal_view = view("alpha", Role::Principal, 1);
    principal_view.witness = Some(witness());
    seen.peer.view = Some(principal_view);
    let decision = tick(&state, &Memory::default(), &seen);
    assert_eq!(decision.state.unwrap().witness, Some(witness()));
}

#[test]
fn i3_the_mirror_follows_its_principal_to_another_witness() {
    let state = mirror();
    let mut seen = observed("beta");
    seen.postgres = PostgresObservation::Mirror {
        received: Some(Lsn(100)),
    };
    let other: Endpoint = "127.0.0.1:7001".parse().unwrap();
    let mut principal_view = view("alpha", Role::Principal, 1);
    principal_view.witness = Some(other.clone());
    // Same witness by identity, reached at another address: keep ours.
    seen.peer.view = Some(principal_view.clone());
    let decision = tick(&state, &Memory::default(), &seen);
    assert!(decision
        .state
        .is_none_or(|next| next.witness == Some(witness())));
    // Another witness: follow the principal.
    principal_view.witness_id = Some(2);
    seen.peer.view = Some(principal_view);
    let decision = tick(&state, &Memory::default(), &seen);
    assert_eq!(decision.state.unwrap().witness, Some(other));
}

#[test]
fn i1_a_raised_timeout_does_not_lengthen_the_lease_before_the_witness_knows_it() {
    let mut state = principal();
    state.timeout_secs = 20;
    let mut seen = observed("alpha");
    // The witness's row still says 2 s: the lease is measured with 2 s.
    seen.lease_from = Some(seen.now - lease_length(Duration::from_secs(2)));
    assert!(!has_quorum(&state, &seen));
    assert_eq!(
        quorum_check(&state, &Memory::default(), &seen).actions,
        [Action::CloseStreams, Action::Stop(StopMode::Immediate)]
    );
    let mut row = row("alpha", 1, true);
    row.timeout_secs = 20;
    seen.witness.row = Some(row);
    assert!(has_quorum(&state, &seen));
}
