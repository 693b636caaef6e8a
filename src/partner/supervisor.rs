//! The supervisor: twice a second it keeps the local PostgreSQL in the role
//! the durable state gives it, derives the session state from what the
//! server and the peer report, and applies the safety level.
//!
//! Each tick runs under the agent's `operations` lock, so it never overlaps
//! a command. A failing tick is logged and retried on the next one. After
//! every tick the agent's metrics and warning thresholds are updated.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::control::{ControlClient, PeerView};
use crate::partner::agent::{with_tool_relay, Agent};
use crate::partner::operations::{self, blocking, local_sql, OpError};
use crate::partner::quorum::ask_witness;
use crate::partner::telemetry::Telemetry;
use crate::roles::{MirroringState, Role, Safety};
use crate::sync::lock;
use crate::wire::lsn::Lsn;

const TICK: Duration = Duration::from_millis(500);

pub async fn supervise(agent: Arc<Agent>) {
    let mut telemetry = Telemetry::new(agent.config.warnings);
    crate::metrics::register_failovers(&agent.config.session, &agent.config.name);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = agent.shutdown.cancelled() => return,
        }
        let _guard = agent.operations.lock().await;
        if agent.shutdown.is_cancelled() {
            return;
        }
        match tick(&agent).await {
            Ok(()) => {}
            Err(err) => {
                warn!("supervisor: {err}");
                agent.set_error(Some(err.to_string()));
            }
        }
        telemetry.record(&agent.status(), Instant::now());
    }
}

async fn tick(agent: &Arc<Agent>) -> Result<(), OpError> {
    if learn_from_witness(agent).await? {
        return Ok(());
    }
    let peer = agent.peer();
    let view = peer.view.clone().filter(|_| peer.connected);
    if let Some(view) = &view {
        learn_from_peer(agent, view)?;
    }
    let state = agent.state();
    if state.ended {
        return Ok(());
    }
    match state.role {
        Role::Principal => principal_tick(agent, view.as_ref()).await,
        Role::Mirror => mirror_tick(agent, view.as_ref()).await,
    }
}

/// The witness's row outranks what this partner remembers (spec 26): a
/// later epoch naming another principal demotes this one (I1); one naming
/// this partner finishes a failover. True when the role changed.
async fn learn_from_witness(agent: &Arc<Agent>) -> Result<bool, OpError> {
    let witness = agent.witness_status();
    let state = agent.state();
    let Some(row) = witness
        .row
        .filter(|_| witness.connected && state.witness.is_some())
    else {
        return Ok(false);
    };
    if row.epoch <= state.epoch || state.ended {
        return Ok(false);
    }
    if row.principal == agent.config.name {
        if state.role == Role::Mirror && state.has_copy && !state.needs_rewind {
            crate::partner::quorum::become_principal(agent, &row, row.failover_lsn).await?;
            return Ok(true);
        }
        return Ok(false);
    }
    match state.role {
        Role::Principal => {
            operations::demote(agent, row.epoch, row.suspended, "the witness").await?;
            Ok(true)
        }
        Role::Mirror => {
            agent.update(|state| state.epoch = row.epoch)?;
            Ok(false)
        }
    }
}

/// Facts the peer's ping settles: its name, the end of the session, and on
/// a mirror the principal's epoch, safety and timeout (spec 30: set on the
/// principal only).
fn learn_from_peer(agent: &Agent, view: &PeerView) -> Result<(), OpError> {
    let state = agent.state();
    if view.ended && !state.ended {
        info!("the peer ended mirroring (SET PARTNER OFF); ending it here too");
        return operations::end_session(agent);
    }
    agent.update(|state| {
        state.peer_name = Some(view.name.clone());
        if state.role == Role::Mirror && view.role == Role::Principal && view.epoch >= state.epoch {
            state.epoch = view.epoch;
            state.safety = view.safety;
            state.safety_sequence = view.safety_sequence;
            state.timeout_secs = view.timeout_secs;
            // SET WITNESS on the principal turns the witness on or off for
            // both; a mirror that already has one keeps its own address for
            // it, which may be a different route to the same witness.
            if state.witness.is_some() != view.witness.is_some() {
                state.witness = view.witness.clone();
            }
        }
    })?;
    Ok(())
}

async fn principal_tick(agent: &Arc<Agent>, view: Option<&PeerView>) -> Result<(), OpError> {
    let state = agent.state();
    if let Some(view) = view.filter(|view| view.role == Role::Principal && view.epoch > state.epoch)
    {
        // I1: the peer became principal at a later epoch (forced service, or
        // a failover this partner missed); this copy must not serve.
        return operations::demote(agent, view.epoch, view.suspended, "the peer").await;
    }
    if agent.engine.postmaster_pid().is_none() {
        let crashed = agent
            .expect_running
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if crashed
            && state.witness.is_some()
            && state.safety == Safety::Full
            && state.synchronized
            && agent.peer_connected()
        {
            warn!("PostgreSQL died under this principal; handing over to the synchronized mirror");
            match operations::hand_over_after_crash(agent).await {
                Ok(()) => return Ok(()),
                Err(err) => warn!("handover failed, restarting PostgreSQL here: {err}"),
            }
        }
        if state.witness.is_some() {
            // I1: with a witness, serve only with quorum (spec 20).
            if !agent.has_quorum() {
                return record_state(agent, MirroringState::Disconnected, state.synchronized);
            }
        } else if view.is_none() && agent.started_at.elapsed() < agent.timeout() {
            // A restarted principal first asks its peer who is principal
            // now (spec 26); only a peer silent for TIMEOUT lets it serve alone.
            return Ok(());
        }
        agent
            .quorum_lost
            .store(false, std::sync::atomic::Ordering::SeqCst);
        operations::start_principal(agent).await?;
    }
    let peer_name = state.peer_name.clone().unwrap_or_default();
    let client = local_sql(agent).await?;
    let row = client
        .query_one(
            "SELECT pg_current_wal_flush_lsn()::text, \
             (SELECT state FROM pg_stat_replication WHERE application_name = $1 \
              ORDER BY backend_start DESC LIMIT 1)",
            &[&peer_name],
        )
        .await?;
    let flushed: Option<Lsn> = row
        .get::<_, Option<String>>(0)
        .and_then(|lsn| lsn.parse().ok());
    let walsender: Option<String> = row.get(1);
    *lock(&agent.observed) = crate::partner::agent::Observed {
        running: true,
        end_of_log: flushed,
        replayed: None,
    };

    let observed_state = if state.suspended {
        MirroringState::Suspended
    } else {
        match (walsender.as_deref(), state.safety) {
            (None, _) => MirroringState::Disconnected,
            (Some("streaming"), Safety::Full) => MirroringState::Synchronized,
            (Some("streaming"), Safety::Off) => MirroringState::Unsynchronized,
            (Some(_), _) => MirroringState::Synchronizing,
        }
    };
    let caught_up = observed_state == MirroringState::Synchronized;
    let lapsed = {
        let mut since = lock(&agent.unsynchronized_since);
        if caught_up {
            *since = None;
        } else if since.is_none() {
            *since = Some(Instant::now());
        }
        since.is_some_and(|since| since.elapsed() >= agent.timeout())
    };
    // Under FULL a lost mirror holds commits for TIMEOUT, then the
    // principal runs exposed (spec 17, 21).
    let mut synchronized = match state.safety {
        Safety::Full => caught_up || (state.synchronized && !state.suspended && !lapsed),
        Safety::Off => false,
    };
    if let Some(witness) = &state.witness {
        if state.synchronized && !synchronized && !record_at_witness(agent, witness, false).await {
            // I2: with a witness, run exposed only once it has recorded
            // the mirror as not synchronized; until then commits wait.
            synchronized = true;
        }
    }
    if state.synchronized && !synchronized {
        warn!("principal running exposed: the mirror is {observed_state}");
    }
    if synchronized {
        // Commits wait for the mirror before the state says so.
        operations::apply_sync(agent, true).await?;
        record_state(agent, observed_state, true)?;
        let witness_row = agent.witness_status().row;
        if let Some(witness) = &state.witness {
            if caught_up
                && witness_row.is_some_and(|row| !row.synchronized && row.epoch == state.epoch)
            {
                record_at_witness(agent, witness, true).await;
            }
        }
    } else {
        // I2: the mirror is recorded as not synchronized before commits
        // stop waiting for it.
        record_state(agent, observed_state, false)?;
        operations::apply_sync(agent, false).await?;
    }
    Ok(())
}

/// Asks the witness to record whether this principal's commits wait for
/// the mirror; false when it did not.
async fn record_at_witness(
    agent: &Agent,
    witness: &crate::config::Endpoint,
    synchronized: bool,
) -> bool {
    let session = agent.config.session.clone();
    let name = agent.config.name.clone();
    let epoch = agent.state().epoch;
    let request = async |client: &mut ControlClient, limit| {
        client
            .set_synchronized_within(session, name, epoch, synchronized, limit)
            .await
    };
    match ask_witness(agent, witness, request).await {
        Ok(row) => {
            lock(&agent.witness).row = row;
            true
        }
        Err(err) => {
            warn!(
                synchronized,
                "the witness did not record the sync state: {err}"
            );
            false
        }
    }
}

fn record_state(agent: &Agent, next: MirroringState, synchronized: bool) -> Result<(), OpError> {
    let before = agent.state().state;
    agent.update(|state| {
        state.state = next;
        state.synchronized = synchronized;
    })?;
    if before != next {
        info!(session = %agent.config.session, role = %agent.state().role, "state {before} -> {next}");
    }
    Ok(())
}

async fn mirror_tick(agent: &Arc<Agent>, view: Option<&PeerView>) -> Result<(), OpError> {
    let state = agent.state();
    let principal = view.filter(|view| view.role == Role::Principal);
    if let Some(view) = principal {
        if view.pg_major != agent.pg_major {
            return Err(OpError::Refused(format!(
                "the principal runs PostgreSQL {} and this partner {}: both partners need the same major version",
                view.pg_major, agent.pg_major
            )));
        }
        if let (Some(theirs), Some(ours)) = (view.system_identifier, state.system_identifier) {
            if theirs != ours {
                return Err(OpError::Refused(system_identifier_mismatch(theirs, ours)));
            }
        }
    }
    if !state.has_copy {
        return match principal.filter(|view| !view.suspended) {
            Some(view) => take_copy(agent, view).await,
            None => Ok(()),
        };
    }
    if state.needs_rewind {
        let followable = principal.filter(|view| !view.suspended && view.epoch == state.epoch);
        match followable {
            Some(_) => {
                rewind(agent).await?;
                if !agent.state().has_copy {
                    return Ok(());
                }
            }
            None => {
                // A former principal does not bring its copy online until it
                // is rewound to the new principal (spec 26, 41).
                if agent.engine.postmaster_pid().is_some() {
                    blocking(agent, |engine| {
                        engine.stop(crate::partner::engine::StopMode::Fast)
                    })
                    .await?;
                }
                let shown = match principal {
                    Some(view) if view.suspended => MirroringState::Suspended,
                    Some(view) => view.state,
                    None => MirroringState::Disconnected,
                };
                return record_state(agent, shown, false);
            }
        }
    }
    if agent.engine.postmaster_pid().is_none() {
        operations::start_mirror(agent).await?;
        return Ok(());
    }
    observe_mirror(agent).await;
    let shown = match principal {
        None => MirroringState::Disconnected,
        Some(view) if view.state == MirroringState::PendingFailover => MirroringState::Synchronized,
        Some(view) => view.state,
    };
    record_state(agent, shown, shown == MirroringState::Synchronized)
}

fn system_identifier_mismatch(theirs: u64, ours: u64) -> String {
    format!(
        "the principal's database (system identifier {theirs}) is not the one this partner holds \
         ({ours}): this data directory is not a copy of the principal; move it away so that the \
         agent takes a new base backup"
    )
}

/// Reads the receive and replay positions; a standby still starting up
/// answers nothing yet, which is not an error.
async fn observe_mirror(agent: &Agent) {
    let Ok(client) = local_sql(agent).await else {
        return;
    };
    let Ok(row) = client
        .query_one(
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
    else {
        return;
    };
    let lsn = |index: usize| {
        row.get::<_, Option<String>>(index)
            .and_then(|lsn| lsn.parse().ok())
    };
    *lock(&agent.observed) = crate::partner::agent::Observed {
        running: true,
        end_of_log: lsn(0),
        replayed: lsn(1),
    };
    // A slot this copy held as principal would keep WAL here forever.
    let _ = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&agent.slot_name()],
        )
        .await;
}

/// Session setup on the mirror (spec 52-53): adopt a copy the operator
/// restored, or take a base backup from the principal through the shipper.
async fn take_copy(agent: &Arc<Agent>, view: &PeerView) -> Result<(), OpError> {
    let Some(theirs) = view.system_identifier else {
        return Ok(());
    };
    if agent.engine.has_cluster() {
        let ours = blocking(agent, |engine| engine.control_data())
            .await?
            .system_identifier;
        if ours != theirs {
            return Err(OpError::Refused(system_identifier_mismatch(theirs, ours)));
        }
        info!("adopting the existing copy of the principal in the data directory");
    } else {
        info!("taking a base backup of the principal through the shipper");
        operations::prepare_data_dir(agent)?;
        let engine = agent.engine.clone();
        let slot = agent.slot_name();
        let started = Instant::now();
        with_tool_relay(agent, move |conninfo| engine.base_backup(&conninfo, &slot)).await??;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "base backup done"
        );
    }
    agent.update(|state| {
        state.has_copy = true;
        state.system_identifier = Some(theirs);
    })?;
    Ok(())
}

/// Whether pg_rewind failed on this copy's own WAL (gone, or torn by an
/// interrupted earlier rewind), as opposed to a source that is not ready.
fn cannot_rewind(error: &str) -> bool {
    [
        "could not find previous WAL record",
        "could not read WAL record",
        "pg_wal/",
    ]
    .iter()
    .any(|sign| error.contains(sign))
        && !error.contains("connection to server")
}

/// Rolls a former principal back to the new principal's history
/// (pg_rewind through the shipper) so it can follow it.
async fn rewind(agent: &Arc<Agent>) -> Result<(), OpError> {
    if agent.engine.postmaster_pid().is_some() {
        blocking(agent, |engine| {
            engine.stop(crate::partner::engine::StopMode::Fast)
        })
        .await?;
    }
    info!("rewinding this copy to the new principal's history");
    let engine = agent.engine.clone();
    match with_tool_relay(agent, move |conninfo| engine.rewind(&conninfo)).await? {
        Ok(output) => {
            info!("pg_rewind: {}", output.trim().replace('\n', "; "));
            agent.update(|state| state.needs_rewind = false)?;
        }
        Err(err) if cannot_rewind(&err.to_string()) => {
            // This copy's WAL back to the common checkpoint is gone or torn:
            // rewinding is impossible, so keep the diverged copy aside for manual
            // reconciliation and clone the principal afresh.
            let aside = agent.engine.data_dir.with_extension("diverged");
            warn!("pg_rewind cannot rewind ({err}); moving the copy to {} and taking a new base backup", aside.display());
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(&agent.engine.data_dir, &aside)?;
            agent.update(|state| {
                state.needs_rewind = false;
                state.has_copy = false;
            })?;
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}
