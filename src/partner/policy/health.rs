//! What the health endpoints answer, IO-free: the agent's durable state,
//! the policy's [`Observation`] (lease, witness row, peer) and what the
//! agent last read of its PostgreSQL in, an HTTP status out. A load
//! balancer asks them as it would ask Patroni's REST API; `partner::health`
//! serves them.
//!
//! `/primary` is never laxer than the agent's own write fence (I1): it
//! answers 200 only while this partner is the principal of the highest
//! epoch it knows, serving (not promoting, handing over or failing over),
//! with PostgreSQL read-write and, with a witness, a lease that still holds
//! when the fence process would act ([`FENCE_MARGIN`] before its end). It
//! does not wait for the quorum check or the fence to stop PostgreSQL. The
//! witness lets another partner serve only once that lease has surely
//! ended, so two partners never answer 200 at once; without a witness the
//! reference's rules stand (a manual failover hands over first, spec 24).

use hyper::StatusCode;

use crate::partner::fence::{Order, FENCE_MARGIN};
use crate::partner::policy::{fence_order, has_quorum, Observation};
use crate::partner::state::SessionState;
use crate::roles::{MirroringState, Role};

/// An endpoint, with what its query asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `GET /primary`: the writable principal of the current epoch.
    Primary,
    /// `GET /replica[?lag=BYTES]`: a streaming mirror whose redo queue is
    /// at most `max_lag` bytes.
    Replica { max_lag: Option<u64> },
    /// `GET /synchronized`: the session is SYNCHRONIZED here.
    Synchronized,
    /// `GET /health`: the agent and its PostgreSQL run.
    Health,
    /// `GET /status`: always 200, with the node's status row.
    Status,
}

/// Why a request names no check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("no such endpoint {0:?}; try /primary, /replica, /synchronized, /health or /status")]
    NotFound(String),
    #[error("lag={0:?} is not a number of bytes")]
    BadLag(String),
}

impl CheckError {
    pub fn status(&self) -> StatusCode {
        match self {
            CheckError::NotFound(_) => StatusCode::NOT_FOUND,
            CheckError::BadLag(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl Check {
    /// The check a request's path and query name. Unknown query keys are
    /// ignored, as Patroni does.
    pub fn parse(path: &str, query: Option<&str>) -> Result<Check, CheckError> {
        match path.trim_end_matches('/') {
            "/primary" => Ok(Check::Primary),
            "/replica" => {
                let lag = query
                    .into_iter()
                    .flat_map(|query| query.split('&'))
                    .find_map(|pair| pair.strip_prefix("lag="));
                let max_lag = lag
                    .map(|bytes| {
                        bytes
                            .parse::<u64>()
                            .map_err(|_| CheckError::BadLag(bytes.into()))
                    })
                    .transpose()?;
                Ok(Check::Replica { max_lag })
            }
            "/synchronized" => Ok(Check::Synchronized),
            "/health" => Ok(Check::Health),
            "/status" => Ok(Check::Status),
            _ => Err(CheckError::NotFound(path.into())),
        }
    }
}

/// The local PostgreSQL as the agent last read it; `Down` whenever no
/// postmaster runs right now, however recent the last reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Server {
    #[default]
    Down,
    /// Not in recovery.
    ReadWrite,
    /// A standby; `streaming` when its walreceiver streams from the
    /// principal (`pg_stat_wal_receiver.status`).
    Recovery { streaming: bool },
}

/// What the answers need beyond the policy's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Local {
    pub server: Server,
    /// Mirror: WAL received and not replayed, in bytes.
    pub redo_queue: Option<u64>,
    /// A manual failover is under way here (PENDING_FAILOVER).
    pub pending_failover: bool,
}

/// The HTTP status `check` answers.
pub fn answer(
    check: Check,
    state: &SessionState,
    observed: &Observation,
    local: &Local,
) -> StatusCode {
    let yes = match check {
        Check::Primary => writable_principal(state, observed, local),
        Check::Replica { max_lag } => {
            !state.ended
                && state.role == Role::Mirror
                && local.server == (Server::Recovery { streaming: true })
                && max_lag.is_none_or(|max| local.redo_queue.is_some_and(|lag| lag <= max))
        }
        Check::Synchronized => {
            !state.ended
                && !local.pending_failover
                && local.server != Server::Down
                && state.state == MirroringState::Synchronized
        }
        Check::Health => local.server != Server::Down,
        Check::Status => true,
    };
    if yes {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `/primary` (I1): see the module's comment.
fn writable_principal(state: &SessionState, observed: &Observation, local: &Local) -> bool {
    let serving = !state.ended
        && state.role == Role::Principal
        && !state.promoting
        && state.handing_over.is_none()
        && !local.pending_failover
        && local.server == Server::ReadWrite;
    serving && !superseded(state, observed) && holds_lease(state, observed)
}

/// The witness or the peer names another principal at a later epoch.
fn superseded(state: &SessionState, observed: &Observation) -> bool {
    let row = observed
        .witness
        .row
        .as_ref()
        .is_some_and(|row| row.epoch > state.epoch && row.principal != observed.name);
    let peer = observed
        .peer
        .view
        .as_ref()
        .is_some_and(|view| view.role == Role::Principal && view.epoch > state.epoch);
    row || peer
}

/// The quorum the agent serves with ([`has_quorum`]), ending where the
/// fence would kill PostgreSQL ([`fence_order`] less [`FENCE_MARGIN`]),
/// which is a little earlier.
fn holds_lease(state: &SessionState, observed: &Observation) -> bool {
    let fence_waits = match fence_order(state, observed) {
        Order::Lease(left) => left > FENCE_MARGIN,
        Order::Hold => true,
        Order::Exit => false,
    };
    has_quorum(state, observed) && fence_waits
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::control::PeerView;
    use crate::partner::policy::tests::{mirror, observed, principal, row};
    use crate::partner::state::HandOver;
    use crate::roles::{lease_length, Epoch};

    fn serving() -> Local {
        Local {
            server: Server::ReadWrite,
            ..Local::default()
        }
    }

    fn streaming(redo_queue: u64) -> Local {
        Local {
            server: Server::Recovery { streaming: true },
            redo_queue: Some(redo_queue),
            pending_failover: false,
        }
    }

    fn primary(state: &SessionState, seen: &Observation, local: &Local) -> StatusCode {
        answer(Check::Primary, state, seen, local)
    }

    #[test]
    fn i1_the_serving_principal_with_a_lease_is_primary() {
        assert_eq!(
            primary(&principal(), &observed("alpha"), &serving()),
            StatusCode::OK
        );
    }

    #[test]
    fn i1_primary_ends_with_the_lease_before_the_fence_acts() {
        let state = principal();
        let mut seen = observed("alpha");
        let lease = lease_length(state.timeout());
        // Where the fence's deadline falls: the lease's end less its margin.
        seen.lease_from = Some(seen.now + FENCE_MARGIN - lease);
        assert_eq!(
            primary(&state, &seen, &serving()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        seen.lease_from = Some(seen.now + FENCE_MARGIN - lease + Duration::from_millis(1));
        assert_eq!(primary(&state, &seen, &serving()), StatusCode::OK);
        // No round trip answered since this agent started: no lease.
        seen.lease_from = None;
        assert_eq!(
            primary(&state, &seen, &serving()),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn i1_primary_does_not_wait_for_postgresql_to_stop() {
        // PostgreSQL still read-write (frozen, or the stop in progress).
        let state = principal();
        let mut seen = observed("alpha");
        seen.now += lease_length(state.timeout());
        assert!(!has_quorum(&state, &seen));
        assert_eq!(
            primary(&state, &seen, &serving()),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn without_a_witness_no_lease_applies() {
        // Spec 17, 55: a principal without a witness serves alone.
        let mut state = principal();
        state.witness = None;
        let mut seen = observed("alpha");
        seen.lease_from = None;
        assert_eq!(primary(&state, &seen, &serving()), StatusCode::OK);
    }

    #[test]
    fn i1_a_later_epoch_elsewhere_ends_primary() {
        let state = principal();
        let mut seen = observed("alpha");
        seen.witness.row = Some(row("beta", 2, false));
        assert_eq!(
            primary(&state, &seen, &serving()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let mut seen = observed("alpha");
        seen.peer.view = Some(PeerView::sample("beta", Role::Principal, 2));
        assert_eq!(
            primary(&state, &seen, &serving()),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn only_a_serving_principal_is_primary() {
        let seen = observed("alpha");
        let refused = |state: &SessionState, local: &Local| {
            assert_eq!(
                primary(state, &seen, local),
                StatusCode::SERVICE_UNAVAILABLE,
                "{state:?} {local:?}"
            );
        };
        // I3: a promotion is shown once its checkpoint is done.
        let mut promoting = principal();
        promoting.promoting = true;
        refused(&promoting, &serving());
        let mut handing_over = principal();
        handing_over.handing_over = Some(HandOver {
            epoch: Epoch(2),
            failover_lsn: None,
        });
        refused(&handing_over, &serving());
        let mut ended = principal();
        ended.ended = true;
        refused(&ended, &serving());
        refused(&mirror(), &serving());
        refused(&principal(), &Local::default());
        refused(&principal(), &streaming(0));
        let failing_over = Local {
            pending_failover: true,
            ..serving()
        };
        refused(&principal(), &failing_over);
    }

    #[test]
    fn replica_is_a_streaming_mirror_within_the_lag_asked() {
        let state = mirror();
        let seen = observed("beta");
        let replica =
            |max_lag, local: &Local| answer(Check::Replica { max_lag }, &state, &seen, local);
        assert_eq!(replica(None, &streaming(5000)), StatusCode::OK);
        assert_eq!(replica(Some(5000), &streaming(5000)), StatusCode::OK);
        assert_eq!(
            replica(Some(4999), &streaming(5000)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let unknown = Local {
            redo_queue: None,
            ..streaming(0)
        };
        assert_eq!(replica(Some(1), &unknown), StatusCode::SERVICE_UNAVAILABLE);
        let not_streaming = Local {
            server: Server::Recovery { streaming: false },
            ..streaming(0)
        };
        assert_eq!(
            replica(None, &not_streaming),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            answer(
                Check::Replica { max_lag: None },
                &principal(),
                &seen,
                &streaming(0)
            ),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn synchronized_follows_the_session_state_on_either_partner() {
        let seen = observed("alpha");
        let mut state = principal();
        assert_eq!(
            answer(Check::Synchronized, &state, &seen, &serving()),
            StatusCode::OK
        );
        let mut mirror = mirror();
        mirror.state = MirroringState::Synchronized;
        assert_eq!(
            answer(Check::Synchronized, &mirror, &seen, &streaming(0)),
            StatusCode::OK
        );
        assert_eq!(
            answer(Check::Synchronized, &state, &seen, &Local::default()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.state = MirroringState::Synchronizing;
        assert_eq!(
            answer(Check::Synchronized, &state, &seen, &serving()),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn health_is_a_running_postgresql_and_status_always_answers() {
        let seen = observed("alpha");
        let state = principal();
        assert_eq!(
            answer(Check::Health, &state, &seen, &streaming(0)),
            StatusCode::OK
        );
        assert_eq!(
            answer(Check::Health, &state, &seen, &Local::default()),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            answer(Check::Status, &state, &seen, &Local::default()),
            StatusCode::OK
        );
    }

    #[test]
    fn requests_name_their_check() {
        assert_eq!(Check::parse("/primary", None), Ok(Check::Primary));
        assert_eq!(Check::parse("/primary/", Some("x=1")), Ok(Check::Primary));
        assert_eq!(
            Check::parse("/replica", Some("a=b&lag=1024")),
            Ok(Check::Replica {
                max_lag: Some(1024)
            })
        );
        assert_eq!(
            Check::parse("/replica", None),
            Ok(Check::Replica { max_lag: None })
        );
        assert_eq!(
            Check::parse("/replica", Some("lag=1MB")),
            Err(CheckError::BadLag("1MB".into()))
        );
        assert_eq!(
            Check::parse("/master", None).map_err(|err| err.status()),
            Err(StatusCode::NOT_FOUND)
        );
    }
}
