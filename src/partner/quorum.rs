//! The partner's side of the witness: pings it with this partner's view,
//! keeps the session's role-table row it answers with, and enforces the
//! quorum rules (spec 19-33):
//!
//! - a principal that hears neither witness nor mirror stops PostgreSQL
//!   within TIMEOUT (I1); the witness waits TIMEOUT plus a margin before it
//!   lets the mirror take over;
//! - a mirror that lost its principal asks the witness to promote it; the
//!   witness agrees only for a synchronized session whose principal it lost
//!   too (I3).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Endpoint;
use crate::control::{ControlClient, ControlError, PromotionKind, RoleRow};
use crate::partner::agent::{ping_interval, sleep_or_shutdown, Agent};
use crate::partner::engine::StopMode;
use crate::partner::operations::{self, OpError};
use crate::roles::{Role, Safety};
use crate::sync::lock;
use crate::wire::lsn::Lsn;

/// How often the quorum rules are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// One request to the witness over a fresh connection, within TIMEOUT:
/// `request` gets the connection and the time limit.
pub async fn ask_witness<T>(
    agent: &Agent,
    witness: &Endpoint,
    request: impl AsyncFnOnce(&mut ControlClient, Duration) -> Result<T, ControlError>,
) -> Result<T, OpError> {
    let timeout = agent.timeout();
    let connect = tokio::time::timeout(timeout, ControlClient::connect(witness, &agent.tls))
        .await
        .map_err(|_| {
            OpError::Refused(format!(
                "the witness {witness} did not answer within {timeout:?}"
            ))
        })??;
    let mut client = connect;
    Ok(request(&mut client, timeout).await?)
}

/// Pings the witness with this partner's view every interval.
pub async fn ping_witness(agent: Arc<Agent>) {
    loop {
        let timeout = agent.timeout();
        let Some(witness) = agent.state().witness else {
            *lock(&agent.witness) = Default::default();
            if !sleep_or_shutdown(&agent, ping_interval(timeout)).await {
                return;
            }
            continue;
        };
        let connected =
            tokio::time::timeout(timeout, ControlClient::connect(&witness, &agent.tls)).await;
        let mut client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                witness_lost(&agent, &err.to_string());
                if !sleep_or_shutdown(&agent, ping_interval(timeout)).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                witness_lost(&agent, "connect timed out");
                continue;
            }
        };
        loop {
            if agent.state().witness.as_ref() != Some(&witness) {
                break;
            }
            match client.report_within(agent.view(), agent.timeout()).await {
                Ok(row) => {
                    let mut status = lock(&agent.witness);
                    if !status.connected {
                        info!(%witness, "witness connected");
                    }
                    status.connected = true;
                    status.last_heard = Some(Instant::now());
                    status.row = row;
                }
                Err(ControlError::Unexpected { answer, .. }) => {
                    witness_lost(&agent, &format!("unexpected answer {answer}"));
                    break;
                }
                Err(err) => {
                    witness_lost(&agent, &err.to_string());
                    break;
                }
            }
            if !sleep_or_shutdown(&agent, ping_interval(agent.timeout())).await {
                return;
            }
        }
    }
}

fn witness_lost(agent: &Agent, why: &str) {
    let mut status = lock(&agent.witness);
    if status.connected {
        warn!("connection with the witness lost: {why}");
    }
    status.connected = false;
}

/// Checks the quorum rules ten times a second.
pub async fn watch_quorum(agent: Arc<Agent>) {
    let mut last_request = Instant::now() - Duration::from_secs(60);
    while sleep_or_shutdown(&agent, WATCH_INTERVAL).await {
        let state = agent.state();
        if state.witness.is_none() || state.ended {
            continue;
        }
        match state.role {
            Role::Principal => {
                if !agent.has_quorum() && agent.engine.postmaster_pid().is_some() {
                    stop_without_quorum(&agent).await;
                }
            }
            Role::Mirror => {
                let may_ask = last_request.elapsed() >= Duration::from_millis(200);
                if may_ask && wants_automatic_failover(&agent) {
                    last_request = Instant::now();
                    if let Err(err) = request_automatic_failover(&agent).await {
                        warn!("automatic failover: {err}");
                    }
                }
            }
        }
    }
}

/// I1: no quorum, no service. Not under the operations lock: a command or
/// tick in progress must not delay this.
async fn stop_without_quorum(agent: &Arc<Agent>) {
    error!(
        "No Quorum: the principal hears neither the witness nor the mirror; stopping PostgreSQL"
    );
    agent.quorum_lost.store(true, Ordering::SeqCst);
    agent.expect_running.store(false, Ordering::SeqCst);
    let engine = agent.engine.clone();
    let stopped = tokio::task::spawn_blocking(move || engine.stop(StopMode::Immediate)).await;
    if !matches!(stopped, Ok(Ok(()))) {
        agent.engine.signal_all(nix::sys::signal::Signal::SIGKILL);
    }
}

/// A synchronized mirror under FULL that lost its principal but still hears
/// the witness (spec 31-32).
fn wants_automatic_failover(agent: &Agent) -> bool {
    let state = agent.state();
    let witness = agent.witness_status();
    let row_allows = witness.row.as_ref().is_some_and(|row| {
        row.synchronized
            && !row.suspended
            && row.safety == Safety::Full
            && row.principal != agent.config.name
    });
    state.has_copy
        && !state.needs_rewind
        && witness.connected
        && !agent.peer_connected()
        && row_allows
}

async fn request_automatic_failover(agent: &Arc<Agent>) -> Result<(), OpError> {
    let _guard = agent.operations.lock().await;
    let state = agent.state();
    let Some(witness) = state.witness.clone() else {
        return Ok(());
    };
    if state.role != Role::Mirror || !wants_automatic_failover(agent) {
        return Ok(());
    }
    let received = operations::received_lsn(agent).await;
    let session = agent.config.session.clone();
    let name = agent.config.name.clone();
    let request = async |client: &mut ControlClient, limit| {
        let kind = PromotionKind::Automatic;
        client
            .promote_within(session, name, state.epoch, kind, received, limit)
            .await
    };
    match ask_witness(agent, &witness, request).await {
        Ok(row) => {
            warn!(epoch = %row.epoch, "Automatic Failover: the witness made this partner the principal");
            become_principal(agent, &row, received).await?;
            crate::metrics::count_failover(
                &agent.config.session,
                &agent.config.name,
                PromotionKind::Automatic,
            );
            Ok(())
        }
        Err(OpError::Api(ControlError::Refused(reason))) => {
            tracing::debug!("automatic failover refused: {reason}");
            Ok(())
        }
        Err(OpError::Api(ControlError::Unexpected { answer, .. })) => {
            Err(OpError::Refused(format!("unexpected answer {answer}")))
        }
        Err(err) => Err(err),
    }
}

/// Takes the principal role the witness's row gives this partner: after an
/// automatic failover, or to finish one interrupted by a restart.
pub async fn become_principal(
    agent: &Arc<Agent>,
    row: &RoleRow,
    failover_lsn: Option<Lsn>,
) -> Result<(), OpError> {
    lock(&agent.witness).row = Some(row.clone());
    operations::promote_to(agent, row.epoch, row.suspended, failover_lsn).await
}
