//! Which commands a partner may carry out right now (spec 37, 39, 45-49,
//! 54): pure checks over the durable state and what the agent knows of its
//! peer, so the refusals are unit-tested without PostgreSQL.
//!
//! pgmirror's readings where the reference contradicts itself (spec Q):
//! FAILOVER, RESUME, SAFETY and TIMEOUT are issued on the principal;
//! FORCE_SERVICE on the mirror; SUSPEND and OFF on either (a SUSPEND on the
//! mirror is forwarded to the principal, which owns the stream).

use crate::config::{MAX_TIMEOUT_SECS, MIN_TIMEOUT_SECS};
use crate::control::Command;
use crate::partner::state::SessionState;
use crate::roles::{MirroringState, Role, Safety};

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
