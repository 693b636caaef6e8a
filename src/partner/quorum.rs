//! The partner's side of the witness: reports this partner's view to it,
//! keeps the session's role-table row it answers with, and enforces the
//! quorum rules (spec 19-33) the policy decides:
//!
//! - a principal whose lease ended (no round trip answered by the witness
//!   or the mirror for the lease's length) stops PostgreSQL at once, ten
//!   checks a second, outside the operations lock (I1);
//! - a synchronized mirror that lost its principal stops answering it and
//!   then asks the witness for the principal role (I1, I3).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::control::{ControlClient, ControlError};
use crate::partner::actions::carry_out;
use crate::partner::agent::{sleep_or_shutdown, Agent};
use crate::partner::fence::Fence;
use crate::partner::policy::{self, PostgresObservation};
use crate::partner::supervisor;
use crate::sync::lock;

/// How often the quorum rules are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How often a mirror may ask the witness for the principal role.
const PROMOTION_RETRY: Duration = Duration::from_millis(200);

/// Reports to the witness every interval; an answered report renews the
/// principal's lease from its send time (I1).
pub async fn ping_witness(agent: Arc<Agent>) {
    loop {
        let timeout = agent.timeout();
        let Some(witness) = agent.state().witness else {
            *lock(&agent.witness) = Default::default();
            if !sleep_or_shutdown(&agent, agent.ping_every()).await {
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
                if !sleep_or_shutdown(&agent, agent.ping_every()).await {
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
                // Another witness: nothing this one said counts there.
                *lock(&agent.witness) = Default::default();
                break;
            }
            let sent = agent.clock();
            match client
                .report_within(agent.report_view(), agent.timeout())
                .await
            {
                Ok(row) => {
                    // A row naming another principal at a later epoch grants
                    // no lease (I1).
                    let state = agent.state();
                    let superseded = row.as_ref().is_some_and(|row| {
                        row.epoch > state.epoch && row.principal != agent.config.name
                    });
                    if !superseded {
                        agent.renew_lease(sent);
                    }
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
            if !sleep_or_shutdown(&agent, agent.ping_every()).await {
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

/// Tells the fence process the lease every [`WATCH_INTERVAL`], and at once
/// when the durable role changes ([`Agent::fence_changed`]), on a task of
/// its own: no lock and no failover in progress may delay it (I1). At
/// shutdown the fence leaves without killing (the agent stops PostgreSQL
/// itself).
pub async fn feed_fence(agent: Arc<Agent>, mut fence: Fence) {
    loop {
        let state = agent.state();
        let observed = observe_without_sql(&agent);
        fence.order(policy::fence_order(&state, &observed)).await;
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = agent.fence_changed.notified() => {}
            _ = agent.shutdown.cancelled() => break,
        }
    }
    fence.exit().await;
}

/// What the fence and the quorum rules need, without asking PostgreSQL
/// anything: only whether a postmaster runs (they must not wait on SQL).
pub fn observe_without_sql(agent: &Agent) -> policy::Observation {
    let postgres = match agent.engine.postmaster_pid() {
        Some(_) => PostgresObservation::Unreadable,
        None => PostgresObservation::Stopped,
    };
    agent.observation(postgres)
}

/// Checks the quorum rules ten times a second.
pub async fn watch_quorum(agent: Arc<Agent>) {
    let mut last_request = Instant::now() - PROMOTION_RETRY;
    while sleep_or_shutdown(&agent, WATCH_INTERVAL).await {
        let state = agent.state();
        let observed = observe_without_sql(&agent);
        let fence = agent.decide(|memory| policy::quorum_check(&state, memory, &observed));
        if !fence.actions.is_empty() {
            // I1: not under the operations lock, so that a command or tick
            // in progress cannot delay it.
            error!("{}", fence.note.unwrap_or("stopping PostgreSQL"));
            if let Err(err) = carry_out(&agent, fence).await {
                error!("could not stop PostgreSQL: {err}");
            }
            continue;
        }
        let wanted = agent.decide(|memory| policy::automatic_failover(&state, memory, &observed));
        if wanted.actions.is_empty() || last_request.elapsed() < PROMOTION_RETRY {
            continue;
        }
        last_request = Instant::now();
        let _guard = agent.operations.lock().await;
        // Decide again under the lock: a tick may have changed the state.
        let state = agent.state();
        let observed = agent.observation(observed.postgres.clone());
        let decision = agent.decide(|memory| policy::automatic_failover(&state, memory, &observed));
        let promoted = async {
            carry_out(&agent, decision).await?;
            // A granted promotion is finished at once, not at the next tick.
            supervisor::tick(&agent).await
        };
        if let Err(err) = promoted.await {
            warn!("automatic failover: {err}");
        }
    }
}
