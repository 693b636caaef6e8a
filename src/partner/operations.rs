//! Role operations of the partner agent: the control API's request handler
//! and the commands it carries out (SUSPEND, RESUME, SAFETY, TIMEOUT, manual
//! failover, forced service, OFF), plus the steps the supervisor shares with
//! them (starting PostgreSQL in a role, applying the safety level, demotion).
//!
//! Every role or safety change is made durable before PostgreSQL is told,
//! and runs under the agent's `operations` lock.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::partner::agent::{lock, peer_heard, Agent};
use crate::partner::api::{
    ApiError, Command, ControlClient, PeerView, PromotionKind, Request, Response, WitnessRequest,
};
use crate::partner::engine::{EngineError, Instance, StopMode};
use crate::partner::policy::commands::{check, Facts, Route};
use crate::partner::quorum::ask_witness;
use crate::partner::state::StateError;
use crate::roles::{Epoch, MirroringState, Role, Safety};
use crate::wire::lsn::Lsn;

/// How long the mirror waits for the principal's last WAL in a manual failover.
const TAKE_OVER_DRAIN_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("local PostgreSQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// Runs a blocking engine call off the async threads.
pub async fn blocking<T: Send + 'static>(
    agent: &Agent,
    call: impl FnOnce(&Instance) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, OpError> {
    let engine = agent.engine.clone();
    Ok(tokio::task::spawn_blocking(move || call(&engine))
        .await
        .map_err(std::io::Error::other)??)
}

/// A fresh connection to the local PostgreSQL over its unix socket.
pub async fn local_sql(agent: &Agent) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user={} dbname=postgres connect_timeout=5",
        agent.engine.socket_dir.display(),
        agent.engine.port,
        agent.config.postgres.user
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Answers one control request.
pub async fn handle(agent: &Arc<Agent>, request: Request) -> Response {
    match request {
        Request::Status => Response::Status(Box::new(agent.status())),
        Request::Ping(view) => match check_peer(agent, &view) {
            Ok(()) => {
                peer_heard(agent, view);
                Response::Pong(agent.view())
            }
            Err(reason) => {
                agent.set_error(Some(reason.clone()));
                Response::Refused(reason)
            }
        },
        Request::Command(command) => run_command(agent, command).await,
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
    let _guard = agent.operations.lock().await;
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
        Route::Peer => forward(agent, &command).await,
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
    Ok(client.command(command.clone()).await?)
}

async fn execute(agent: &Arc<Agent>, command: &Command) -> Result<String, OpError> {
    match command {
        Command::Suspend => {
            agent.update(|state| {
                state.suspended = true;
                state.synchronized = false;
                state.state = MirroringState::Suspended;
            })?;
            apply_sync(agent, false).await?;
            agent.close_streams();
            Ok(format!(
                "mirroring SUSPENDED: the principal runs exposed and keeps its WAL in slot {} until RESUME",
                agent.slot_name()
            ))
        }
        Command::Resume => {
            agent.update(|state| {
                state.suspended = false;
                state.state = MirroringState::Synchronizing;
            })?;
            Ok("mirroring RESUMED: the mirror is SYNCHRONIZING".into())
        }
        Command::Safety(safety) => {
            let state = agent.update(|state| {
                if state.safety != *safety {
                    state.safety = *safety;
                    state.safety_sequence += 1;
                }
                if *safety == Safety::Off {
                    state.synchronized = false;
                }
            })?;
            if *safety == Safety::Off {
                apply_sync(agent, false).await?;
            }
            Ok(format!(
                "SAFETY {safety} (safety_sequence {})",
                state.safety_sequence
            ))
        }
        Command::Timeout(secs) => {
            agent.update(|state| state.timeout_secs = *secs)?;
            Ok(format!("TIMEOUT {secs} seconds"))
        }
        Command::Witness(witness) => {
            agent.update(|state| state.witness = witness.clone())?;
            Ok(match witness {
                Some(witness) => {
                    format!("WITNESS {witness}: automatic failover and the quorum rule are on")
                }
                None => "WITNESS OFF: no automatic failover; the principal no longer needs quorum"
                    .into(),
            })
        }
        Command::Failover => manual_failover(agent).await,
        Command::ForceServiceAllowDataLoss => force_service(agent).await,
        Command::Off => {
            // The peer learns it from the next ping and ends its side too.
            end_session(agent)?;
            Ok("mirroring is OFF: the session ended; a mirror stays a standby (restoring)".into())
        }
    }
}

/// SET PARTNER OFF on this partner (spec 49).
pub fn end_session(agent: &Agent) -> Result<(), OpError> {
    agent.update(|state| {
        state.ended = true;
        state.synchronized = false;
    })?;
    agent.close_streams();
    let was_principal = agent.state().role == Role::Principal;
    if was_principal && agent.engine.postmaster_pid().is_some() {
        // Without a mirror, waiting for one would block every commit.
        let settings = principal_settings(agent, false);
        agent
            .engine
            .write_settings(&agent.config.postgres.listen_addresses, &settings)?;
        agent.engine.reload()?;
        *lock(&agent.applied_sync) = Some(false);
    }
    Ok(())
}

/// Manual failover (spec 37-38), on the principal.
async fn manual_failover(agent: &Arc<Agent>) -> Result<String, OpError> {
    let epoch = agent.state().epoch.next();
    agent.pending_failover.store(true, Ordering::SeqCst);
    let handed_over = async {
        agent.expect_running.store(false, Ordering::SeqCst);
        // A fast shutdown ends the sessions, rolls back what is in flight and
        // waits until the mirror has flushed all WAL, the shutdown checkpoint included.
        blocking(agent, |engine| engine.stop(StopMode::Fast)).await?;
        let failover_lsn = blocking(agent, |engine| engine.control_data())
            .await?
            .checkpoint;
        let mut client = ControlClient::connect(&agent.config.peer, &agent.tls).await?;
        match client
            .call(&Request::TakeOver {
                epoch,
                failover_lsn,
                kind: PromotionKind::Manual,
            })
            .await?
        {
            Response::Done(_) => Ok(failover_lsn),
            Response::Refused(reason) | Response::Failed(reason) => Err(OpError::Refused(reason)),
            other => Err(OpError::Refused(format!("unexpected answer {other:?}"))),
        }
    }
    .await;
    agent.pending_failover.store(false, Ordering::SeqCst);
    match handed_over {
        Ok(failover_lsn) => {
            step_down(agent, epoch, false, Some(failover_lsn))?;
            let peer = agent
                .state()
                .peer_name
                .unwrap_or_else(|| agent.config.peer.to_string());
            info!(%epoch, %failover_lsn, "manual failover done: {peer} is the principal");
            Ok(format!(
                "failover complete: {peer} is the principal at role_sequence {epoch}; this partner \
                 is now the mirror and resynchronizes"
            ))
        }
        Err(err) => {
            warn!("manual failover aborted: {err}");
            start_principal(agent).await?;
            Err(OpError::Refused(format!(
                "failover aborted, this partner stays the principal: {err}"
            )))
        }
    }
}

/// The principal's PostgreSQL died: with a witness and a synchronized
/// mirror, hand the role over at once instead of restarting here (the
/// mirror holds every acknowledged commit, I2), then follow it.
pub async fn hand_over_after_crash(agent: &Arc<Agent>) -> Result<(), OpError> {
    let state = agent.state();
    let epoch = state.epoch.next();
    let mut client = ControlClient::connect(&agent.config.peer, &agent.tls).await?;
    let request = Request::TakeOver {
        epoch,
        failover_lsn: Lsn::INVALID,
        kind: PromotionKind::Handover,
    };
    match client.call(&request).await? {
        Response::Done(_) => {}
        Response::Refused(reason) | Response::Failed(reason) => {
            return Err(OpError::Refused(reason))
        }
        other => return Err(OpError::Refused(format!("unexpected answer {other:?}"))),
    }
    step_down(agent, epoch, false, None)?;
    warn!(%epoch, "handed the principal role to the mirror after PostgreSQL failed here");
    Ok(())
}

/// The mirror's half of a manual failover: drain, then promote.
async fn take_over(
    agent: &Arc<Agent>,
    epoch: Epoch,
    failover_lsn: Lsn,
    kind: PromotionKind,
) -> Result<String, OpError> {
    let state = agent.state();
    if state.role != Role::Mirror || state.ended || !state.has_copy || state.needs_rewind {
        return Err(OpError::Refused(
            "this partner is not a mirror holding a copy".into(),
        ));
    }
    if state.epoch.next() != epoch {
        return Err(OpError::Refused(format!(
            "role_sequence mismatch: asked to become principal at {epoch}, this mirror is at {}",
            state.epoch
        )));
    }
    let deadline = tokio::time::Instant::now() + TAKE_OVER_DRAIN_LIMIT;
    loop {
        let received = received_lsn(agent).await;
        if received.is_some_and(|received| received > failover_lsn) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(OpError::Refused(format!(
                "the mirror did not receive WAL up to {failover_lsn} within {TAKE_OVER_DRAIN_LIMIT:?} (it has {})",
                received.map(|lsn| lsn.to_string()).unwrap_or_else(|| "none".into())
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(witness) = state.witness.clone() {
        let request = WitnessRequest::Promote {
            session: agent.config.session.clone(),
            name: agent.config.name.clone(),
            epoch: state.epoch,
            kind,
            failover_lsn: Some(failover_lsn),
        };
        // Spec 24: with the witness lost, manual failover is still allowed;
        // the witness takes the switch over from the next report.
        match ask_witness(agent, &witness, request).await {
            Ok(Response::Row(Some(_))) => {}
            Ok(Response::Refused(reason)) => {
                return Err(OpError::Refused(format!("the witness refused: {reason}")))
            }
            Ok(other) => {
                return Err(OpError::Refused(format!(
                    "unexpected witness answer {other:?}"
                )))
            }
            Err(err) => warn!("manual failover without the witness: {err}"),
        }
    }
    promote_to(agent, epoch, false, Some(failover_lsn)).await?;
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
    let state = agent.state();
    let epoch = state.epoch.next();
    if let Some(witness) = state.witness.clone() {
        let request = WitnessRequest::Promote {
            session: agent.config.session.clone(),
            name: agent.config.name.clone(),
            epoch: state.epoch,
            kind: PromotionKind::Forced,
            failover_lsn: received,
        };
        match ask_witness(agent, &witness, request).await? {
            Response::Row(Some(_)) => {}
            Response::Refused(reason) => {
                return Err(OpError::Refused(format!("the witness refused: {reason}")))
            }
            other => {
                return Err(OpError::Refused(format!(
                    "unexpected witness answer {other:?}"
                )))
            }
        }
    }
    promote_to(agent, epoch, true, received).await?;
    crate::metrics::count_failover(
        &agent.config.session,
        &agent.config.name,
        PromotionKind::Forced,
    );
    warn!(%epoch, "forced service: this partner is principal; the old principal's unsent WAL is lost");
    Ok(format!(
        "service forced: this partner is the principal at role_sequence {epoch}; mirroring is \
         SUSPENDED; when the old principal is back, RESUME rewinds it (its unsent transactions are lost)"
    ))
}

pub async fn received_lsn(agent: &Agent) -> Option<Lsn> {
    let client = local_sql(agent).await.ok()?;
    let row = client
        .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
        .await
        .ok()?;
    row.get::<_, Option<String>>(0)?.parse().ok()
}

/// Records this partner as principal at `epoch` (durable first), then
/// promotes PostgreSQL. A forced service leaves the session suspended.
pub async fn promote_to(
    agent: &Arc<Agent>,
    epoch: Epoch,
    suspended: bool,
    failover_lsn: Option<Lsn>,
) -> Result<(), OpError> {
    agent.update(|state| {
        state.assume_role(Role::Principal, epoch, suspended);
        state.failover_lsn = failover_lsn;
    })?;
    if agent.engine.postmaster_pid().is_none() {
        start_mirror(agent).await?;
    }
    promote(agent).await
}

/// Ends recovery and reconfigures the server as principal, running exposed
/// until the mirror has caught up.
async fn promote(agent: &Arc<Agent>) -> Result<(), OpError> {
    blocking(agent, |engine| engine.promote()).await?;
    // The new timeline reaches the control file only with the next
    // checkpoint; until then pg_rewind on the old principal would see one
    // timeline and find nothing to rewind.
    local_sql(agent).await?.batch_execute("CHECKPOINT").await?;
    *lock(&agent.applied_sync) = None;
    apply_sync(agent, false).await?;
    ensure_slot(agent).await
}

/// The postgresql.conf lines every partner runs with.
fn common_settings() -> Vec<String> {
    [
        "wal_level = replica",
        "max_wal_senders = 10",
        "max_replication_slots = 10",
        "hot_standby = on",
        "wal_log_hints = on",
        "synchronous_commit = on",
        // pg_rewind reads the old principal's WAL back to the last common
        // checkpoint; keep that much at hand.
        "wal_keep_size = '1GB'",
        // Fresh positions for the shipper and a quick reconnect after RESUME.
        "wal_receiver_status_interval = '1s'",
        "wal_retrieve_retry_interval = '500ms'",
    ]
    .map(String::from)
    .to_vec()
}

pub fn principal_settings(agent: &Agent, synchronous: bool) -> Vec<String> {
    let names = match (&agent.state().peer_name, synchronous) {
        (Some(peer), true) => format!("'\"{peer}\"'"),
        _ => "''".into(),
    };
    let mut settings = common_settings();
    settings.push(format!("synchronous_standby_names = {names}"));
    settings
}

fn mirror_settings(agent: &Agent) -> Vec<String> {
    let mut settings = common_settings();
    settings.push(format!(
        "primary_conninfo = '{}'",
        agent.conninfo_via(agent.wal_relay_port, &agent.config.name)
    ));
    settings.push(format!("primary_slot_name = '{}'", agent.slot_name()));
    settings.push("synchronous_standby_names = ''".into());
    settings
}

/// Makes commits wait for the mirror or not, when that changes.
pub async fn apply_sync(agent: &Agent, synchronous: bool) -> Result<(), OpError> {
    let synchronous = synchronous && agent.state().peer_name.is_some();
    if *lock(&agent.applied_sync) == Some(synchronous) || agent.engine.postmaster_pid().is_none() {
        return Ok(());
    }
    let settings = principal_settings(agent, synchronous);
    let listen = agent.config.postgres.listen_addresses.clone();
    blocking(agent, move |engine| {
        engine.write_settings(&listen, &settings)?;
        engine.reload()
    })
    .await?;
    info!(synchronous, "synchronous_standby_names applied");
    *lock(&agent.applied_sync) = Some(synchronous);
    Ok(())
}

/// Creates the data directory for initdb or pg_basebackup, owned by the
/// user PostgreSQL runs as.
pub fn prepare_data_dir(agent: &Agent) -> Result<(), OpError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &agent.engine.data_dir;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    agent.engine.run_as.hand_over(dir)?;
    Ok(())
}

/// Starts PostgreSQL as principal (creating the cluster on a first start),
/// requiring the mirror's acknowledgement only if the durable state says
/// it was synchronized (I2 across restarts).
pub async fn start_principal(agent: &Arc<Agent>) -> Result<(), OpError> {
    if !agent.engine.has_cluster() {
        info!(
            "no cluster in {}: running initdb",
            agent.engine.data_dir.display()
        );
        prepare_data_dir(agent)?;
        blocking(agent, |engine| engine.initdb("trust")).await?;
    }
    let state = agent.state();
    let synchronous = state.safety == Safety::Full && state.synchronized && !state.suspended;
    let settings = principal_settings(agent, synchronous);
    let listen = agent.config.postgres.listen_addresses.clone();
    blocking(agent, move |engine| {
        engine.write_settings(&listen, &settings)?;
        engine.set_standby(false)?;
        engine.start()
    })
    .await?;
    *lock(&agent.applied_sync) = Some(synchronous && state.peer_name.is_some());
    agent.expect_running.store(true, Ordering::SeqCst);
    let control = blocking(agent, |engine| engine.control_data()).await?;
    agent.update(|state| state.system_identifier = Some(control.system_identifier))?;
    info!(synchronous, "PostgreSQL started as principal");
    ensure_slot(agent).await
}

/// Starts PostgreSQL as a standby fed by the shipper.
pub async fn start_mirror(agent: &Arc<Agent>) -> Result<(), OpError> {
    let settings = mirror_settings(agent);
    let listen = agent.config.postgres.listen_addresses.clone();
    blocking(agent, move |engine| {
        engine.write_settings(&listen, &settings)?;
        engine.set_standby(true)?;
        engine.start_with(false)
    })
    .await?;
    info!("PostgreSQL started as mirror");
    Ok(())
}

/// The principal's physical replication slot keeps WAL the mirror has not
/// received, across disconnections and SUSPEND (spec 46).
async fn ensure_slot(agent: &Agent) -> Result<(), OpError> {
    let client = local_sql(agent).await?;
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&agent.slot_name()],
        )
        .await?;
    Ok(())
}

/// Records this partner as a mirror at `epoch` that rewinds before it
/// follows the new principal, and stops feeding any stream (I1).
fn step_down(
    agent: &Agent,
    epoch: Epoch,
    suspended: bool,
    failover_lsn: Option<Lsn>,
) -> Result<(), OpError> {
    agent.update(|state| {
        state.assume_role(Role::Mirror, epoch, suspended);
        state.needs_rewind = true;
        state.failover_lsn = failover_lsn.or(state.failover_lsn);
    })?;
    agent.close_streams();
    *lock(&agent.applied_sync) = None;
    agent.expect_running.store(false, Ordering::SeqCst);
    Ok(())
}

/// A principal that meets a principal of a later epoch becomes its mirror
/// (I1, spec 26): it stops serving at once and rewinds before following.
pub async fn demote(
    agent: &Arc<Agent>,
    epoch: Epoch,
    suspended: bool,
    told_by: &str,
) -> Result<(), OpError> {
    warn!(
        %epoch,
        "{told_by} says another partner is principal at a later role_sequence: this partner becomes the mirror"
    );
    step_down(agent, epoch, suspended, None)?;
    let running = agent.engine.postmaster_pid().is_some();
    if running
        && blocking(agent, |engine| engine.stop(StopMode::Fast))
            .await
            .is_err()
    {
        blocking(agent, |engine| engine.stop(StopMode::Immediate)).await?;
    }
    Ok(())
}
