//! The agent's durable copy of its session: role, epoch, safety, suspended
//! flag and the other facts that must survive a restart (spec 6, 26).
//!
//! Every change is written to a temporary file, fsynced and renamed over
//! `state.json`, then the directory is fsynced, so a crash leaves either the
//! old or the new state and never a torn one. Callers persist *before* they
//! act on a change (e.g. record the mirror as not synchronized before the
//! principal runs exposed, I2).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::roles::{Epoch, MirroringState, Role, Safety};
use crate::wire::lsn::Lsn;

const STATE_FILE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a pgmirror state file ({source}); move it away to start the session afresh"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What one partner remembers about its session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// The session this file belongs to; an agent refuses another's file.
    pub session: Option<String>,
    /// The peer's server name, once heard: the principal names it in
    /// synchronous_standby_names even before the peer answers after a restart.
    pub peer_name: Option<String>,
    /// `mirroring_guid`: the principal's PostgreSQL system identifier, which
    /// both copies share.
    pub system_identifier: Option<u64>,
    pub role: Role,
    /// `mirroring_role_sequence`.
    pub epoch: Epoch,
    pub safety: Safety,
    pub safety_sequence: u64,
    pub timeout_secs: u64,
    /// Paused by SUSPEND or forced service; survives restarts (spec 6).
    pub suspended: bool,
    /// Whether the principal last recorded the mirror as synchronized. The
    /// principal may run exposed under FULL only once this is false (I2).
    pub synchronized: bool,
    /// The last state this partner reported.
    pub state: MirroringState,
    pub failover_lsn: Option<Lsn>,
    /// The mirror holds a copy of the principal (base backup done).
    pub has_copy: bool,
    /// This partner was principal and lost the role: its WAL may have
    /// diverged, so it rewinds before following the new principal.
    pub needs_rewind: bool,
    /// pg_rewind was started on this copy and its end not recorded: the
    /// copy may be half rewound and is never rewound again (I1).
    #[serde(default)]
    pub rewind_started: bool,
    /// SET PARTNER OFF ended the session (spec 49).
    pub ended: bool,
    /// The loopback port the mirror's walreceiver connects to.
    pub wal_relay_port: Option<u16>,
    /// The session's witness; None: no automatic failover, no quorum rule.
    pub witness: Option<crate::config::Endpoint>,
    /// Principal at `epoch` by promotion, but PostgreSQL's promotion and its
    /// checkpoint are not known to be done: the new role is not shown to
    /// anyone yet, and a restart finishes the promotion (I3).
    #[serde(default)]
    pub promoting: bool,
    /// The principal asked its mirror to take over and has not heard the
    /// answer: it stays stopped and asks again until the peer or the
    /// witness says who is principal (I1).
    #[serde(default)]
    pub handing_over: Option<HandOver>,
    /// This mirror asked the witness for the principal role at this epoch
    /// and has not seen the witness's row since: until it has, it answers
    /// no ping of the principal, across restarts too (I1: a grant it missed
    /// would otherwise be followed by answers renewing the old lease).
    #[serde(default)]
    pub asked_promotion: Option<Epoch>,
}

/// A takeover this principal asked of its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOver {
    /// The epoch the mirror is to take.
    pub epoch: Epoch,
    /// Manual failover: the shutdown checkpoint the mirror must have
    /// received first. None: PostgreSQL died here (no drain).
    pub failover_lsn: Option<Lsn>,
}

impl SessionState {
    /// A session as first configured: epoch 1, SYNCHRONIZING (spec 4, 14).
    pub fn new(role: Role, safety: Safety, timeout_secs: u64) -> Self {
        SessionState {
            session: None,
            peer_name: None,
            system_identifier: None,
            role,
            epoch: Epoch(1),
            safety,
            safety_sequence: 1,
            timeout_secs,
            suspended: false,
            synchronized: false,
            state: MirroringState::Synchronizing,
            failover_lsn: None,
            has_copy: role == Role::Principal,
            needs_rewind: false,
            rewind_started: false,
            ended: false,
            wal_relay_port: None,
            witness: None,
            promoting: false,
            handing_over: None,
            asked_promotion: None,
        }
    }
}

impl SessionState {
    /// Takes `role` at `epoch`: after any role switch the mirror is not yet
    /// synchronized (I2), and a suspended session stays SUSPENDED.
    pub fn assume_role(&mut self, role: Role, epoch: Epoch, suspended: bool) {
        self.role = role;
        self.epoch = epoch;
        self.suspended = suspended;
        self.synchronized = false;
        self.promoting = false;
        self.handing_over = None;
        self.asked_promotion = None;
        self.state = if suspended {
            MirroringState::Suspended
        } else {
            MirroringState::Synchronizing
        };
    }
}

/// The state file in the agent's state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        StateStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state, or None on first start.
    pub fn load(&self) -> Result<Option<SessionState>, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    /// Writes `state` durably (see the module comment).
    pub fn save(&self, state: &SessionState) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let temporary = self.dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: temporary.clone(),
            source,
        })?;
        let mut file = File::create(&temporary).map_err(io(&temporary))?;
        file.write_all(&text).map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        fs::rename(&temporary, self.path()).map_err(io(&self.path()))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_state_loads_back_and_first_start_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(&dir.path().join("agent"));
        assert_eq!(store.load().unwrap(), None);
        let mut state = SessionState::new(Role::Mirror, Safety::Full, 10);
        state.epoch = Epoch(7);
        state.suspended = true;
        state.failover_lsn = Some(Lsn(0x16_B374_D848));
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
    }

    #[test]
    fn a_corrupt_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let err = StateStore::new(dir.path()).load().unwrap_err().to_string();
        assert!(
            err.contains("state.json: not a pgmirror state file"),
            "{err}"
        );
    }
}
