//! The control API's request handler: status, the peer's pings, operator
//! commands (SUSPEND, RESUME, SAFETY, TIMEOUT, SET WITNESS, manual
//! failover, forced service, OFF) and the principal's takeover request.
//!
//! What a command may do and what it changes is the policy's
//! (`policy::commands`); this module sequences the IO between the steps
//! and carries each decision out under the agent's `operations` lock.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::control::{
    Command, ControlClient, ControlError, PeerView, PromotionKind, Request, Response,
};
use crate::history;
use crate::partner::actions::{
    ask_witness, blocking, carry_out, observe_postgres, promotion_request, received_lsn,
    start_mirror, OpError,
};
use crate::partner::agent::Agent;
use crate::partner::peer::peer_heard;
use crate::partner::policy;
use crate::partner::policy::commands::{self, check, Facts, Plan, Route, WitnessAnswer};
use crate::partner::supervisor;
use crate::roles::{Epoch, Role};
use crate::wire::lsn::Lsn;

/// Answers one control request.
pub async fn handle(agent: &Arc<Agent>, request: Request) -> Response {
    match request {
        Request::Status => Response::Status(Box::new(agent.status())),
        Request::Ping(view) => answer_ping(agent, view),
        Request::Command(command) => run_command(agent, command).await,
        Request::History { since_ms } => history_page(agent, since_ms).await,
        Request::Witness(_) => Response::Refused(
            "this is a partner agent, not a witness: point the witness address at `pgmirror witness`".into(),
        ),
        Request::TakeOver {
            epoch,
            failover_lsn,
            kind,
        } => {
            let _guard = agent.operations.lock().await;
            match take_over(agent, epoch, failover_lsn, kind).await {
                Ok(message) => Response::Done(message),
                Err(OpError::Refused(reason)) => Response::Refused(reason),
                Err(err) => Response::Failed(err.to_string()),
            }
        }
    }
}

/// A page of the agent's own history samples, read on a blocking thread.
async fn history_page(agent: &Agent, since_ms: Option<i64>) -> Response {
    let path = agent.config.state_dir.join(history::AGENT_FILE);
    let read = tokio::task::spawn_blocking(move || {
        history::read_page(&path, history::Owner::Agent, None, since_ms)
    });
    match read.await {
        Ok(Ok(page)) => Response::History(page),
        Ok(Err(err)) => Response::Failed(err.to_string()),
        Err(err) => Response::Failed(format!("history read: {err}")),
    }
}

/// A mirror that is asking the witness for the principal role does not
/// answer its principal, whose lease must run out first (I1).
fn answer_ping(agent: &Agent, view: PeerView) -> Response {
    if let Err(reason) = check_peer(agent, &view) {
        agent.set_error(Some(reason.clone()));
        return Response::Refused(reason);
    }
    let state = agent.state();
    if state.promoting && view.role == Role::Principal && view.epoch < state.epoch {
        // I1: while this partner's promotion is not shown, its Pong would
        // look like a mirror's and renew the old principal's lease. Once it
        // is shown, the Pong tells the old principal to step down (and
        // renews nothing, see `peer`).
        return Response::Refused(format!(
            "this partner is the principal at role_sequence {}; {} is at {}",
            state.epoch, view.name, view.epoch
        ));
    }
    let from_principal = view.role == Role::Principal && state.role == Role::Mirror;
    if from_principal && policy::refuses_principal(&state, &agent.memory()) {
        return Response::Refused(
            "this mirror has lost its principal and is asking the witness for the principal role"
                .into(),
        );
    }
    peer_heard(agent, view);
    if from_principal {
        agent.answered_principal();
    }
    Response::Pong(agent.view())
}

/// A partner refuses a peer of another session, another major version or
/// another database (spec 52-53).
fn check_peer(agent: &Agent, view: &PeerView) -> Result<(), String> {
    if view.session != agent.config.session {
        return Err(format!(
            "partner {} belongs to session {:?}, this one to {:?}",
            view.name, view.session, agent.config.session
        ));
    }
    if view.name == agent.config.name {
        return Err(format!(
            "both partners are named {:?}; give each its own name",
            view.name
        ));
    }
    if view.pg_major != agent.pg_major {
        return Err(format!(
            "partner {} runs PostgreSQL {}, this partner {}: both partners need the same major version",
            view.name, view.pg_major, agent.pg_major
        ));
    }
    let ours = agent
        .state()
        .system_identifier
        .filter(|_| agent.state().has_copy);
    if let (Some(theirs), Some(ours)) = (view.system_identifier, ours) {
        if theirs != ours {
            return Err(format!(
                "partner {}'s database has system identifier {theirs}, this one {ours}: they are \
                 not copies of one database; rebuild the mirror from the principal",
                view.name
            ));
        }
    }
    Ok(())
}

async fn run_command(agent: &Arc<Agent>, command: Command) -> Response {
    let guard = agent.operations.lock().await;
    let facts = Facts {
        peer_connected: agent.peer_connected(),
        witness_connected: agent
            .state()
            .witness
            .as_ref()
            .map(|_| agent.witness_status().connected),
    };
    let route = match check(&command, &agent.state(), facts) {
        Ok(route) => route,
        Err(reason) => {
            info!(?command, "refused: {reason}");
            return Response::Refused(reason);
        }
    };
    let outcome = match route {
        Route::Peer => {
            // Not under the lock: the peer may be waiting on this partner
            // (a takeover request) while it carries the command out.
            drop(guard);
            forward(agent, &command).await
        }
        Route::Here => {
            info!(?command, "carrying out");
            execute(agent, &command).await.map(Response::Done)
        }
    };
    outcome.unwrap_or_else(|err| match err {
        OpError::Refused(reason) => Response::Refused(reason),
        err => {
            warn!(?command, "failed: {err}");
            Response::Failed(err.to_string())
        }
    })
}

async fn forward(agent: &Agent, command: &Command) -> Result<Response, OpError> {
    let mut client = ControlClient::connect(&agent.config.peer, &agent.tls).await?;
    match client.command(command.clone()).await {
        Ok(message) => Ok(Response::Done(message)),
        Err(ControlError::Refused(reason)) => Ok(Response::Refused(reason)),
        Err(ControlError::Failed(reason)) => Ok(Response::Failed(reason)),
        Err(err) => Err(err.into()),
    }
}

async fn execute(agent: &Arc<Agent>, command: &Command) -> Result<String, OpError> {
    let observed = agent.observation(observe_postgres(agent).await);
    let state = agent.state();
    let memory = agent.memory();
    match commands::apply(command, &state, &memory, &observed) {
        Plan::ManualFailover => return manual_failover(agent).await,
        Plan::ForcedService => return force_service(agent).await,
        Plan::LeaveWitness(decision) => {
            // I1-I3: the witness the session leaves must not grant a
            // failover on what the principal no longer reports to it.
            if let (Role::Principal, Some(old)) = (state.role, state.witness.clone()) {
                release(agent, &old).await?;
            }
            agent.decide(|_| decision.clone());
            // Nothing the old witness said counts for the new one.
            *crate::sync::lock(&agent.witness) = Default::default();
            carry_out(agent, decision).await?;
        }
        Plan::Change(decision) => {
            agent.decide(|_| decision.clone());
            carry_out(agent, decision).await?;
        }
    }
    let state = agent.state();
    Ok(match command {
        Command::Suspend => format!(
            "mirroring SUSPENDED: the principal runs exposed (once the witness, if any, recorded \
             it) and keeps its WAL in slot {} until RESUME",
            agent.slot_name()
        ),
        Command::Resume => "mirroring RESUMED: the mirror is SYNCHRONIZING".into(),
        Command::Safety(safety) => format!(
            "SAFETY {safety} (safety_sequence {})",
            state.safety_sequence
        ),
        Command::Timeout(secs) => format!("TIMEOUT {secs} seconds"),
        Command::Witness(Some(witness)) => {
            format!("WITNESS {witness}: automatic failover and the quorum rule are on")
        }
        Command::Witness(None) => {
            "WITNESS OFF: no automatic failover; the principal no longer needs quorum".into()
        }
        Command::Off => {
            "mirroring is OFF: the session ended; a mirror stays a standby (restoring)".into()
        }
        Command::Failover | Command::ForceServiceAllowDataLoss => String::new(),
    })
}

/// Asks the witness the session leaves (SET WITNESS, PARTNER OFF) to
/// release it; until it has, it could still grant the mirror a failover on
/// what the principal no longer reports to it, so the command is refused
/// (I1, I3). A witness that is gone for good is replaced by starting
/// `pgmirror witness` at its address (an empty store will do: it holds no
/// row, so it grants nothing and releases at once).
async fn release(agent: &Agent, old: &crate::config::Endpoint) -> Result<(), OpError> {
    let state = agent.state();
    let session = agent.config.session.clone();
    let name = agent.config.name.clone();
    let detach = async |client: &mut ControlClient, limit| {
        client
            .detach_within(session, name, state.epoch, limit)
            .await
    };
    match ask_witness(agent, old, detach).await {
        Ok(_) => Ok(()),
        Err(OpError::Api(ControlError::Refused(reason))) => Err(OpError::Refused(format!(
            "the current witness {old} refused to let the session go: {reason}"
        ))),
        Err(err) => Err(OpError::Refused(format!(
            "the current witness {old} could not be told that the session leaves it ({err}): \
             until it is, it could still grant the mirror a failover; bring it back (or, if it \
             is gone for good, start `pgmirror witness` at {old}; an empty store will do), then \
             try again"
        ))),
    }
}

/// Manual failover (spec 37-38), on the principal: a fast stop ships every
/// WAL record to the synchronous mirror, which takes over once it has it.
async fn manual_failover(agent: &Arc<Agent>) -> Result<String, OpError> {
    agent.pending_failover.store(true, Ordering::SeqCst);
    let outcome = async {
        let stop = agent.decide(commands::failover_begins);
        carry_out(agent, stop).await?;
        let failover_lsn = blocking(agent, |engine| engine.control_data())
            .await?
            .checkpoint;
        let state = agent.state();
        let hand_over =
            agent.decide(|memory| commands::failover_hand_over(&state, memory, failover_lsn));
        carry_out(agent, hand_over).await
    }
    .await;
    agent.pending_failover.store(false, Ordering::SeqCst);
    let refusal = outcome?;
    let state = agent.state();
    if state.role == Role::Mirror {
        let peer = state
            .peer_name
            .clone()
            .unwrap_or_else(|| agent.config.peer.to_string());
        info!(epoch = %state.epoch, "manual failover done: {peer} is the principal");
        return Ok(format!(
            "failover complete: {peer} is the principal at role_sequence {}; this partner is now \
             the mirror and resynchronizes",
            state.epoch
        ));
    }
    let reason = refusal.unwrap_or_else(|| "the mirror did not take over".into());
    warn!("manual failover: {reason}");
    Err(OpError::Refused(reason))
}

/// The witness's answer to a promotion request, for the policy.
async fn ask_witness_to_promote(
    agent: &Agent,
    kind: PromotionKind,
    failover_lsn: Option<Lsn>,
) -> WitnessAnswer {
    let Some(witness) = agent.state().witness else {
        return WitnessAnswer::NoWitness;
    };
    // A row that already names this partner at the next epoch is a grant
    // whose answer was lost.
    let state = agent.state();
    let granted = agent
        .witness_status()
        .row
        .is_some_and(|row| row.principal == agent.config.name && row.epoch == state.epoch.next());
    if granted {
        return WitnessAnswer::Granted;
    }
    let answered = Some(agent.principal_answered_ago());
    let request = promotion_request(agent, kind, failover_lsn, answered);
    let ask = async |client: &mut ControlClient, limit| client.promote_within(request, limit).await;
    match ask_witness(agent, &witness, ask).await {
        Ok(_) => WitnessAnswer::Granted,
        Err(OpError::Api(ControlError::Refused(reason) | ControlError::Failed(reason))) => {
            WitnessAnswer::Refused(reason)
        }
        Err(err) => WitnessAnswer::Unreachable(err.to_string()),
    }
}

/// The mirror's half of a handover: drain up to the failover LSN, then
/// promote unless the witness refuses.
async fn take_over(
    agent: &Arc<Agent>,
    epoch: Epoch,
    failover_lsn: Lsn,
    kind: PromotionKind,
) -> Result<String, OpError> {
    let state = agent.state();
    if commands::take_over_check(&state, epoch).map_err(OpError::Refused)? {
        return Ok(format!("principal at role_sequence {epoch} already"));
    }
    let lease = crate::roles::lease_holds(agent.lease(), agent.clock(), state.timeout());
    if state.witness.is_some() && !lease {
        // I1: it could not serve anyway; refuse before recording anything.
        return Err(OpError::Refused(
            "this mirror has no quorum lease (neither the witness nor the principal answered it \
             lately): it would be stopped at once as principal"
                .into(),
        ));
    }
    if agent.engine.postmaster_pid().is_none() {
        start_mirror(agent).await?;
    }
    // A handover after a crash has nothing to drain (failover_lsn invalid).
    let drain = state.timeout();
    let deadline = tokio::time::Instant::now() + drain;
    loop {
        let received = received_lsn(agent).await;
        if failover_lsn == Lsn::INVALID || received.is_some_and(|received| received > failover_lsn)
        {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(OpError::Refused(format!(
                "the mirror did not receive WAL up to {failover_lsn} within TIMEOUT ({drain:?}); it has {}",
                received.map(|lsn| lsn.to_string()).unwrap_or_else(|| "none".into())
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lsn = Some(failover_lsn).filter(|lsn| *lsn != Lsn::INVALID);
    if agent.state().witness.is_some() {
        let asks = agent.decide(|memory| commands::promotion_asks(&agent.state(), memory));
        carry_out(agent, asks).await?;
    }
    let witness = ask_witness_to_promote(agent, kind, lsn).await;
    if let WitnessAnswer::Unreachable(reason) = &witness {
        // Spec 24: with the witness lost, a handover is still allowed; the
        // witness takes the switch over from the next report.
        warn!("taking over without the witness: {reason}");
    }
    let state = agent.state();
    let decision = commands::take_over(&state, &agent.memory(), epoch, lsn, &witness)
        .map_err(OpError::Refused)?;
    agent.decide(|_| decision.clone());
    carry_out(agent, decision).await?;
    // Finish the promotion now, so that the role is shown when we answer.
    supervisor::tick(agent).await?;
    crate::metrics::count_failover(&agent.config.session, &agent.config.name, kind);
    info!(%epoch, %failover_lsn, ?kind, "promoted by the principal's handover");
    Ok(format!("principal at role_sequence {epoch}"))
}

/// Forced service (spec 39-40), on the mirror: promote now, session SUSPENDED.
async fn force_service(agent: &Arc<Agent>) -> Result<String, OpError> {
    if agent.engine.postmaster_pid().is_none() {
        start_mirror(agent).await?;
    }
    let received = received_lsn(agent).await;
    if agent.state().witness.is_some() {
        let asks = agent.decide(|memory| commands::promotion_asks(&agent.state(), memory));
        carry_out(agent, asks).await?;
    }
    let witness = ask_witness_to_promote(agent, PromotionKind::Forced, received).await;
    let state = agent.state();
    let decision = commands::forced_service(&state, &agent.memory(), received, &witness)
        .map_err(OpError::Refused)?;
    agent.decide(|_| decision.clone());
    carry_out(agent, decision).await?;
    supervisor::tick(agent).await?;
    let epoch = agent.state().epoch;
    crate::metrics::count_failover(
        &agent.config.session,
        &agent.config.name,
        PromotionKind::Forced,
    );
    warn!(%epoch, "forced service: this partner is principal; the old principal's unsent WAL is lost");
    // With a witness the old principal's lease had ended (its fence killed
    // PostgreSQL); without one nothing here can fence it (spec 17, 55).
    let unfenced = if agent.state().witness.is_none() {
        "; without a witness the old principal could not be fenced from here: if it still \
         runs, its PostgreSQL may accept writes from clients connected to it directly (the \
         proxy routes only to this partner) until its agent sees this role_sequence"
    } else {
        ""
    };
    Ok(format!(
        "service forced: this partner is the principal at role_sequence {epoch}; mirroring is \
         SUSPENDED; when the old principal is back, RESUME rewinds it (its unsent transactions \
         are lost){unfenced}"
    ))
}
