//! The one place that changes PostgreSQL and asks the witness or the peer
//! on the policy's behalf: [`carry_out`] persists a [`Decision`]'s state,
//! then carries out its actions in order (pg_ctl, pg_promote, pg_rewind,
//! pg_basebackup, the synchronous requirement, witness requests, the
//! handover to the peer). Whatever an action learns goes back to the
//! policy as the next observation, never decided here.
//!
//! Callers hold the agent's `operations` lock, except for the quorum
//! fence's immediate stop. Dropping a future between actions leaves the
//! durable state as persisted; the next tick decides again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Endpoint;
use crate::control::{ControlClient, ControlError, PeerView, PromotionKind, PromotionRequest};
use crate::partner::agent::Agent;
use crate::partner::engine::{EngineError, Instance, StopMode};
use crate::partner::policy::commands::{self, TakeOverAnswer};
use crate::partner::policy::health::Server;
use crate::partner::policy::{self, Action, Decision, PostgresObservation, StandbyObservation};
use crate::partner::relays::with_tool_relay;
use crate::partner::state::{HandOver, StateError};
use crate::sync::lock;
use crate::wire::lsn::Lsn;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("local PostgreSQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Api(#[from] ControlError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// Persists `decision`'s state, then carries out its actions; an action
/// may answer with a follow-up decision (a takeover's answer), carried out
/// next. Returns the last refusal the policy gave, for the caller to show.
pub async fn carry_out(agent: &Arc<Agent>, decision: Decision) -> Result<Option<String>, OpError> {
    let mut pending = Some(decision);
    let mut refusal = None;
    while let Some(decision) = pending.take() {
        if let Some(note) = decision.note {
            warn!(session = %agent.config.session, "{note}");
        }
        if let Some(next) = decision.state {
            let before = agent.state();
            agent.update(|state| *state = next)?;
            let after = agent.state();
            if (before.role, before.epoch) != (after.role, after.epoch) {
                // A principal's lease reaches the fence before it serves.
                agent.fence_changed.notify_one();
            }
            if (before.role, before.epoch, before.state) != (after.role, after.epoch, after.state) {
                info!(
                    session = %agent.config.session,
                    "role {} -> {} at role_sequence {}, state {} -> {}",
                    before.role, after.role, after.epoch, before.state, after.state
                );
            }
        }
        if decision.refusal.is_some() {
            refusal = decision.refusal.clone();
        }
        agent.set_error(decision.refusal);
        for action in decision.actions {
            match carry_out_one(agent, action).await? {
                Next::Go => {}
                Next::Stop => break,
                Next::Then(follow) => {
                    pending = Some(*follow);
                    break;
                }
            }
        }
    }
    Ok(refusal)
}

/// What comes after one action.
enum Next {
    Go,
    /// The rest of the list relied on what did not happen.
    Stop,
    Then(Box<Decision>),
}

async fn carry_out_one(agent: &Arc<Agent>, action: Action) -> Result<Next, OpError> {
    match action {
        Action::HandOver(hand_over) => {
            let answer = ask_peer_to_take_over(agent, hand_over).await;
            if matches!(answer, TakeOverAnswer::Done) {
                warn!(epoch = %hand_over.epoch, "the peer took over the principal role");
            }
            let state = agent.state();
            return Ok(Next::Then(Box::new(agent.decide(|memory| {
                commands::failover_answered(&state, memory, hand_over, &answer)
            }))));
        }
        Action::StartPrincipal { synchronous } => start_principal(agent, synchronous).await?,
        Action::StartMirror => start_mirror(agent).await?,
        Action::Stop(mode) => stop(agent, mode).await,
        Action::Promote => {
            if agent.engine.postmaster_pid().is_none() {
                start_mirror(agent).await?;
            }
            blocking(agent, |engine| engine.promote()).await?;
        }
        Action::FinishPromotion { epoch } => {
            let client = local_sql(agent).await?;
            client.batch_execute("CHECKPOINT").await?;
            ensure_slot(agent).await?;
            agent.remember(|memory| memory.checkpointed = Some(epoch));
            info!(%epoch, "promotion checkpointed");
        }
        Action::Rewind => rewind(agent).await?,
        Action::TakeCopy => {
            if let Some(view) = agent.peer().view {
                take_copy(agent, &view).await?;
            }
        }
        Action::RequireSync(synchronous) => require_sync(agent, synchronous).await?,
        Action::RecordAtWitness {
            synchronized,
            based_on,
        } => {
            if !record_at_witness(agent, synchronized, based_on).await {
                return Ok(Next::Stop);
            }
        }
        Action::AskPromotion {
            kind,
            principal_answered_ago,
        } => return ask_promotion(agent, kind, Some(principal_answered_ago)).await,
        Action::CloseStreams => agent.close_streams(),
    }
    Ok(Next::Go)
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

/// The local PostgreSQL as the policy needs it, and the positions the
/// status shows. A server that does not answer SQL yet is `Unreadable`.
pub async fn observe_postgres(agent: &Agent) -> PostgresObservation {
    if agent.engine.postmaster_pid().is_none() {
        *lock(&agent.observed) = Default::default();
        return PostgresObservation::Stopped;
    }
    let Ok(client) = local_sql(agent).await else {
        return PostgresObservation::Unreadable;
    };
    let peer = agent.state().peer_name.unwrap_or_default();
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
              ELSE pg_current_wal_flush_lsn() END)::text, \
             pg_last_wal_replay_lsn()::text, r.state, r.sync_state, r.flush_lsn::text, \
             coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false) \
             FROM (SELECT 1) AS one LEFT JOIN LATERAL \
             (SELECT state, sync_state, flush_lsn FROM pg_stat_replication \
              WHERE application_name = $1 ORDER BY backend_start DESC LIMIT 1) AS r ON true",
            &[&peer],
        )
        .await;
    let Ok(row) = row else {
        return PostgresObservation::Unreadable;
    };
    let lsn = |index: usize| {
        row.get::<_, Option<String>>(index)
            .and_then(|lsn| lsn.parse::<Lsn>().ok())
    };
    let in_recovery: bool = row.get(0);
    *lock(&agent.observed) = crate::partner::agent::Observed {
        server: if in_recovery {
            Server::Recovery {
                streaming: row.get(6),
            }
        } else {
            Server::ReadWrite
        },
        end_of_log: lsn(1),
        replayed: lsn(2).filter(|_| in_recovery),
    };
    if in_recovery {
        // A slot this copy held as principal would keep WAL here forever.
        let _ = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active",
                &[&agent.slot_name()],
            )
            .await;
        return PostgresObservation::Mirror { received: lsn(1) };
    }
    let standby = row
        .get::<_, Option<String>>(3)
        .map(|state| StandbyObservation {
            streaming: state == "streaming",
            sync: row.get::<_, Option<String>>(4).as_deref() == Some("sync"),
            flushed: lsn(5).unwrap_or(Lsn::INVALID),
        });
    PostgresObservation::Principal {
        flushed: lsn(1).unwrap_or(Lsn::INVALID),
        standby,
    }
}

pub async fn received_lsn(agent: &Agent) -> Option<Lsn> {
    let client = local_sql(agent).await.ok()?;
    let row = client
        .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
        .await
        .ok()?;
    row.get::<_, Option<String>>(0)?.parse().ok()
}

/// Stops PostgreSQL; if pg_ctl fails, SIGKILL ends every process of it.
async fn stop(agent: &Agent, mode: StopMode) {
    if agent.engine.postmaster_pid().is_none() {
        return;
    }
    if !matches!(
        blocking(agent, move |engine| engine.stop(mode)).await,
        Ok(())
    ) {
        agent.engine.signal_all(nix::sys::signal::Signal::SIGKILL);
    }
}

/// How long the mirror may take to promote and checkpoint once drained.
const TAKE_OVER_PROMOTION: Duration = Duration::from_secs(20);

/// Asks the peer to take the principal role as `hand_over` says.
async fn ask_peer_to_take_over(agent: &Agent, hand_over: HandOver) -> TakeOverAnswer {
    let kind = match hand_over.failover_lsn {
        Some(_) => PromotionKind::Manual,
        None => PromotionKind::Handover,
    };
    let failover_lsn = hand_over.failover_lsn.unwrap_or(Lsn::INVALID);
    // The mirror drains for up to TIMEOUT, then promotes and checkpoints.
    let limit = agent.timeout() * 2 + TAKE_OVER_PROMOTION;
    let answer = async {
        let mut client = ControlClient::connect(&agent.config.peer, &agent.tls).await?;
        client
            .take_over(hand_over.epoch, failover_lsn, kind, limit)
            .await
    };
    match answer.await {
        Ok(_) => TakeOverAnswer::Done,
        Err(ControlError::Refused(reason)) => TakeOverAnswer::Refused(reason),
        // Failed: the mirror may have recorded the principal role before it
        // failed; as good as no answer (I1).
        Err(err) => TakeOverAnswer::Lost(err.to_string()),
    }
}

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

/// Asks the witness to record whether this principal's commits wait for
/// the mirror; false when it did not.
pub async fn record_at_witness(agent: &Agent, synchronized: bool, based_on: Option<u64>) -> bool {
    let state = agent.state();
    let Some(witness) = state.witness.clone() else {
        return true;
    };
    // Until answered, this record (or, at start, one of an earlier run)
    // may land: no exposure rests on an older row (I2).
    lock(&agent.witness).exposure_recorded_at = None;
    let session = agent.config.session.clone();
    let name = agent.config.name.clone();
    let request = async |client: &mut ControlClient, limit| {
        client
            .set_synchronized_within(session, name, state.epoch, synchronized, based_on, limit)
            .await
    };
    match ask_witness(agent, &witness, request).await {
        Ok(row) => {
            let mut status = lock(&agent.witness);
            if !synchronized {
                status.exposure_recorded_at = row.as_ref().map(|row| row.witness_id);
            }
            status.row = row;
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

/// A promotion request to the witness for this partner.
pub fn promotion_request(
    agent: &Agent,
    kind: PromotionKind,
    failover_lsn: Option<Lsn>,
    principal_answered_ago: Option<Duration>,
) -> PromotionRequest {
    PromotionRequest {
        session: agent.config.session.clone(),
        name: agent.config.name.clone(),
        epoch: agent.state().epoch,
        kind,
        failover_lsn,
        principal_answered_ago_ms: principal_answered_ago.map(|ago| ago.as_millis() as u64),
    }
}

/// Automatic failover (spec 31-32): the witness decides; a grant is taken
/// at once.
async fn ask_promotion(
    agent: &Arc<Agent>,
    kind: PromotionKind,
    principal_answered_ago: Option<Duration>,
) -> Result<Next, OpError> {
    let Some(witness) = agent.state().witness else {
        return Ok(Next::Stop);
    };
    let received = received_lsn(agent).await;
    let request = promotion_request(agent, kind, received, principal_answered_ago);
    let ask = async |client: &mut ControlClient, limit| client.promote_within(request, limit).await;
    match ask_witness(agent, &witness, ask).await {
        Ok(row) => {
            lock(&agent.witness).row = Some(row.clone());
            crate::metrics::count_failover(&agent.config.session, &agent.config.name, kind);
            let state = agent.state();
            Ok(Next::Then(Box::new(
                agent.decide(|memory| policy::granted(&state, memory, &row)),
            )))
        }
        Err(OpError::Api(ControlError::Refused(reason))) => {
            tracing::debug!("automatic failover refused: {reason}");
            Ok(Next::Stop)
        }
        Err(err) => {
            warn!("automatic failover: {err}");
            Ok(Next::Stop)
        }
    }
}

/// Makes commits wait for the mirror, or not.
async fn require_sync(agent: &Agent, synchronous: bool) -> Result<(), OpError> {
    if agent.engine.postmaster_pid().is_none() {
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
    Ok(())
}

/// Starts PostgreSQL as principal (creating the cluster on a first start),
/// its commits waiting for the mirror when `synchronous` (I2 across restarts).
async fn start_principal(agent: &Arc<Agent>, synchronous: bool) -> Result<(), OpError> {
    if !agent.engine.has_cluster() {
        info!(
            "no cluster in {}: running initdb",
            agent.engine.data_dir.display()
        );
        prepare_data_dir(agent)?;
        blocking(agent, |engine| engine.initdb("trust")).await?;
    }
    let settings = principal_settings(agent, synchronous);
    let listen = agent.config.postgres.listen_addresses.clone();
    blocking(agent, move |engine| {
        engine.write_settings(&listen, &settings)?;
        engine.set_standby(false)?;
        engine.start()
    })
    .await?;
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

/// Session setup on the mirror (spec 52-53): adopt a copy the operator
/// restored, or take a base backup from the principal through the shipper.
async fn take_copy(agent: &Arc<Agent>, view: &PeerView) -> Result<(), OpError> {
    let Some(theirs) = view.system_identifier else {
        return Ok(());
    };
    let in_progress = agent.config.state_dir.join(BASE_BACKUP_IN_PROGRESS);
    if in_progress.exists() {
        // A base backup was interrupted: that copy is never adopted.
        warn!(
            "a base backup into {} was interrupted; removing that copy and taking a new one",
            agent.engine.data_dir.display()
        );
        if agent.engine.data_dir.exists() {
            std::fs::remove_dir_all(&agent.engine.data_dir)?;
        }
    }
    if agent.engine.has_cluster() {
        let ours = blocking(agent, |engine| engine.control_data())
            .await?
            .system_identifier;
        if ours != theirs {
            return Err(OpError::Refused(policy::system_identifier_mismatch(
                theirs, ours,
            )));
        }
        info!("adopting the existing copy of the principal in the data directory");
    } else {
        info!("taking a base backup of the principal through the shipper");
        prepare_data_dir(agent)?;
        let engine = agent.engine.clone();
        let slot = agent.slot_name();
        let started = Instant::now();
        write_synced(&in_progress)?;
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
    if in_progress.exists() {
        std::fs::remove_file(&in_progress)?;
    }
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
        blocking(agent, |engine| engine.stop(StopMode::Fast)).await?;
    }
    if agent.state().rewind_started {
        // PostgreSQL's documentation: a target whose pg_rewind did not
        // finish is likely not recoverable. Run again, pg_rewind first
        // crash-recovers such a copy onto the source's timeline, writing
        // WAL of its own there, and then finds "no rewind required" while
        // the copy diverges: its standby would loop on "record with
        // incorrect prev-link" forever.
        return set_aside(agent, "an earlier pg_rewind of it did not finish");
    }
    info!("rewinding this copy to the new principal's history");
    let engine = agent.engine.clone();
    let marking = agent.clone();
    let rewound = with_tool_relay(agent, move |conninfo| -> Result<String, OpError> {
        engine.checkpoint_source(&conninfo)?;
        marking.update(|state| state.rewind_started = true)?;
        Ok(engine.rewind(&conninfo)?)
    });
    match rewound.await? {
        Ok(output) => {
            info!("pg_rewind: {}", output.trim().replace('\n', "; "));
            agent.update(|state| {
                state.needs_rewind = false;
                state.rewind_started = false;
            })?;
        }
        // This copy's WAL back to the common checkpoint is gone or torn.
        Err(err) if cannot_rewind(&err.to_string()) => set_aside(agent, &err.to_string())?,
        Err(err) => return Err(err),
    }
    Ok(())
}

/// Rewinding this copy is impossible (`why`): it is kept aside for manual
/// reconciliation and the principal is cloned afresh (I1: the diverged
/// copy never comes online).
fn set_aside(agent: &Agent, why: &str) -> Result<(), OpError> {
    let aside = diverged_name(&agent.engine.data_dir);
    warn!(
        "pg_rewind cannot rewind ({why}); moving the copy to {} and taking a new base backup",
        aside.display()
    );
    std::fs::rename(&agent.engine.data_dir, &aside)?;
    keep_newest_diverged(&agent.engine.data_dir, agent.config.keep_diverged);
    agent.update(|state| {
        state.needs_rewind = false;
        state.rewind_started = false;
        state.has_copy = false;
    })?;
    Ok(())
}

/// Marks, in the agent's state directory, a base backup under way: a copy
/// found with it is a half-finished one.
const BASE_BACKUP_IN_PROGRESS: &str = "base-backup.in-progress";

/// Creates `path` and syncs it and its directory.
fn write_synced(path: &Path) -> std::io::Result<()> {
    std::fs::File::create(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `DATA.diverged-<unix ms>`: where a copy that cannot be rewound is kept.
fn diverged_name(data_dir: &Path) -> PathBuf {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_millis())
        .unwrap_or_default();
    let name = data_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    data_dir.with_file_name(format!("{name}.diverged-{at}"))
}

/// Removes all but the `keep` newest diverged copies of `data_dir`.
fn keep_newest_diverged(data_dir: &Path, keep: usize) {
    let (Some(parent), Some(name)) = (data_dir.parent(), data_dir.file_name()) else {
        return;
    };
    let prefix = format!("{}.diverged-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut copies: Vec<(u128, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let at = file_name.strip_prefix(&prefix)?.parse().ok()?;
            Some((at, entry.path()))
        })
        .collect();
    copies.sort();
    let excess = copies.len().saturating_sub(keep);
    for (_, old) in copies.into_iter().take(excess) {
        match std::fs::remove_dir_all(&old) {
            Ok(()) => warn!(
                "removed the diverged copy {} (keep_diverged = {keep})",
                old.display()
            ),
            Err(err) => warn!("cannot remove the diverged copy {}: {err}", old.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_diverged_copies_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        for at in [100, 300, 200, 400] {
            std::fs::create_dir_all(dir.path().join(format!("data.diverged-{at}"))).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("data.diverged-notatime")).unwrap();
        std::fs::create_dir_all(dir.path().join("other.diverged-1")).unwrap();
        keep_newest_diverged(&data, 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "data.diverged-300",
                "data.diverged-400",
                "data.diverged-notatime",
                "other.diverged-1"
            ]
        );
        let named = diverged_name(&data);
        assert!(named
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("data.diverged-"));
    }
}
