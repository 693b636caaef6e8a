//! The witness's decisions, IO-free: how a partner's report changes the
//! role table, and whether a mirror may become principal (I1, I3) or the
//! principal may run exposed (I2). The caller supplies the clock readings.

use std::time::Duration;

use crate::control::{PeerView, PromotionKind, PromotionRequest, RoleRow};
use crate::roles::{takeover_wait, Role, Safety};

/// A change to write, with the history event that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub row: RoleRow,
    pub event: &'static str,
}

/// How a partner's report changes the row, if at all.
pub fn on_report(row: Option<&RoleRow>, view: &PeerView) -> Option<Change> {
    let Some(row) = row else {
        return (view.role == Role::Principal).then(|| Change {
            row: RoleRow {
                session: view.session.clone(),
                principal: view.name.clone(),
                mirror: None,
                epoch: view.epoch,
                safety: view.safety,
                safety_sequence: view.safety_sequence,
                suspended: view.suspended,
                synchronized: false,
                timeout_secs: view.timeout_secs,
                failover_lsn: None,
                witness_id: 0,
                detached: false,
                version: 0,
            },
            event: "Session Created",
        });
    };
    let mut next = row.clone();
    let event;
    if view.role == Role::Principal && view.epoch > row.epoch {
        // The partners switched roles while the witness was away (a manual
        // failover is allowed without it, spec 24).
        next.mirror = Some(row.principal.clone())
            .filter(|old| *old != view.name)
            .or(next.mirror);
        next.principal = view.name.clone();
        next.epoch = view.epoch;
        next.synchronized = false;
        next.suspended = view.suspended;
        event = "Role Switch Reported";
    } else if view.name == row.principal && view.epoch == row.epoch {
        next.safety = view.safety;
        next.safety_sequence = view.safety_sequence;
        next.suspended = view.suspended;
        next.timeout_secs = view.timeout_secs;
        if view.suspended || view.safety == Safety::Off {
            next.synchronized = false;
        }
        event = if view.suspended && !row.suspended {
            "Mirroring Suspended"
        } else if !view.suspended && row.suspended {
            "Mirroring Resumed"
        } else {
            "Settings Changed"
        };
    } else if view.name != row.principal && row.mirror.as_deref() != Some(view.name.as_str()) {
        next.mirror = Some(view.name.clone());
        event = "Mirror Registered";
    } else {
        return None;
    }
    (next != *row).then_some(Change { row: next, event })
}

/// The principal records whether its commits wait for the mirror. "Not
/// synchronized" is also taken from a principal at a later epoch than the
/// row's (a role switch this witness missed, or a witness newly set): the
/// row then carries that epoch (I2).
///
/// SYNCHRONIZED is recorded only on the row version it was decided on
/// (`based_on`): a request that arrives late, after the principal recorded
/// "not synchronized" and let commits stop waiting, is refused (I2).
pub fn set_synchronized(
    row: Option<&RoleRow>,
    name: &str,
    epoch: crate::roles::Epoch,
    synchronized: bool,
    based_on: Option<u64>,
) -> Result<Change, String> {
    let row = row.ok_or("the witness has no row for this session yet")?;
    let carried = !synchronized && epoch > row.epoch;
    if !carried && (row.principal != name || row.epoch != epoch) {
        return Err(format!(
            "{name} at role_sequence {epoch} is not the principal; the witness has {} at {}",
            row.principal, row.epoch
        ));
    }
    if let Some(seen) = based_on.filter(|seen| synchronized && *seen != row.version) {
        return Err(format!(
            "the row changed since {name} read it (version {seen}, now {}); it reads it again",
            row.version
        ));
    }
    let mut next = row.clone();
    // The principal records a sync state here: it reports here again.
    next.detached = false;
    if carried {
        next.mirror = Some(row.principal.clone())
            .filter(|old| old != name)
            .or(next.mirror);
        next.principal = name.to_string();
        next.epoch = epoch;
    }
    next.synchronized = synchronized;
    Ok(Change {
        row: next,
        event: if synchronized {
            "Synchronized Principal with Witness"
        } else {
            "Principal Running Exposed"
        },
    })
}

/// The principal leaves this witness: the row records the mirror as not
/// synchronized and detached, so that nothing is granted here on what the
/// principal no longer reports (I1-I3). Carries a later epoch like
/// [`set_synchronized`].
pub fn detach(
    row: Option<&RoleRow>,
    name: &str,
    epoch: crate::roles::Epoch,
) -> Result<Option<Change>, String> {
    let Some(row) = row else {
        return Ok(None);
    };
    let mut change = set_synchronized(Some(row), name, epoch, false, None)?;
    change.row.detached = true;
    change.event = "Session Left the Witness";
    Ok(Some(change))
}

/// Whether the mirror asking in `request` may become principal at the
/// next epoch. `principal_silent` is how long the witness has not heard
/// from the current principal, on its own clock. Where the witness decides
/// alone (automatic failover, forced service), both that and the mirror's
/// last answer to the principal must be a whole [`takeover_wait`] ago: the
/// principal's lease has then ended and its PostgreSQL is fenced (I1).
pub fn promote(
    row: Option<&RoleRow>,
    request: &PromotionRequest,
    principal_silent: Duration,
) -> Result<Change, String> {
    let row = row.ok_or("the witness has no row for this session yet")?;
    let name = request.name.as_str();
    if row.principal == name {
        return Err(format!("{name} is already the principal"));
    }
    if row.epoch != request.epoch {
        return Err(format!(
            "stale request: {name} is at role_sequence {}, the witness at {}",
            request.epoch, row.epoch
        ));
    }
    if row.detached {
        return Err(format!(
            "the session's principal {} moved to another witness (or none); ask that one",
            row.principal
        ));
    }
    let wait = takeover_wait(Duration::from_secs(row.timeout_secs));
    let lease_over = || -> Result<(), String> {
        if principal_silent < wait {
            // I1 and spec 23: the witness still sees the principal, or
            // has not waited long enough for its lease to end.
            return Err(format!(
                "the witness heard the principal {} {:.1} s ago; a takeover needs {:.1} s of silence",
                row.principal,
                principal_silent.as_secs_f64(),
                wait.as_secs_f64()
            ));
        }
        let answered = request.principal_answered_ago_ms.map(Duration::from_millis);
        if let Some(answered) = answered.filter(|answered| *answered < wait) {
            return Err(format!(
                "{name} answered the principal {} {:.1} s ago; a takeover needs {:.1} s",
                row.principal,
                answered.as_secs_f64(),
                wait.as_secs_f64()
            ));
        }
        Ok(())
    };
    let event = match request.kind {
        PromotionKind::Automatic => {
            if row.safety != Safety::Full || row.suspended || !row.synchronized {
                // I3: only a mirror recorded as synchronized under FULL.
                return Err(format!(
                    "automatic failover needs a SYNCHRONIZED session under SAFETY FULL; the witness \
                     has safety {}, suspended {}, synchronized {}",
                    row.safety, row.suspended, row.synchronized
                ));
            }
            lease_over()?;
            "Automatic Failover"
        }
        PromotionKind::Manual => "Manual Failover",
        PromotionKind::Handover => "Automatic Failover (the principal's PostgreSQL failed)",
        PromotionKind::Forced => {
            lease_over().map_err(|reason| {
                format!("{reason}; forced service is only for a lost principal")
            })?;
            "Forced Service"
        }
    };
    let mut next = row.clone();
    next.mirror = Some(row.principal.clone());
    next.principal = name.to_string();
    next.epoch = request.epoch.next();
    next.synchronized = false;
    next.suspended = request.kind == PromotionKind::Forced;
    next.failover_lsn = request.failover_lsn.or(row.failover_lsn);
    Ok(Change { row: next, event })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::Epoch;

    fn view(name: &str, role: Role, epoch: u64) -> PeerView {
        PeerView::sample(name, role, epoch)
    }

    fn synchronized_row() -> RoleRow {
        let created = on_report(None, &view("alpha", Role::Principal, 1))
            .unwrap()
            .row;
        let with_mirror = on_report(Some(&created), &view("beta", Role::Mirror, 1))
            .unwrap()
            .row;
        set_synchronized(Some(&with_mirror), "alpha", Epoch(1), true, None)
            .unwrap()
            .row
    }

    #[test]
    fn the_principal_creates_the_row_and_the_mirror_registers() {
        assert!(on_report(None, &view("beta", Role::Mirror, 1)).is_none());
        let row = synchronized_row();
        assert_eq!(
            (row.principal.as_str(), row.mirror.as_deref()),
            ("alpha", Some("beta"))
        );
        assert!(on_report(Some(&row), &view("beta", Role::Mirror, 1)).is_none());
    }

    fn request(kind: PromotionKind, epoch: u64, answered_ago_ms: Option<u64>) -> PromotionRequest {
        PromotionRequest {
            session: "shop".into(),
            name: "beta".into(),
            epoch: Epoch(epoch),
            kind,
            failover_lsn: None,
            principal_answered_ago_ms: answered_ago_ms,
        }
    }

    #[test]
    fn automatic_failover_only_for_a_synchronized_mirror_once_the_principal_is_silent() {
        let row = synchronized_row();
        let quiet = takeover_wait(Duration::from_secs(2));
        let automatic = request(PromotionKind::Automatic, 1, None);
        let granted = promote(Some(&row), &automatic, quiet).unwrap();
        assert_eq!(
            (granted.row.principal.as_str(), granted.row.epoch),
            ("beta", Epoch(2))
        );
        assert!(!granted.row.synchronized);
        let heard = promote(Some(&row), &automatic, quiet - Duration::from_millis(1));
        assert!(heard.unwrap_err().contains("heard the principal"));
        // I1: the mirror's own recent answer to the principal may have
        // renewed the principal's lease.
        let answered = request(PromotionKind::Automatic, 1, Some(1000));
        assert!(promote(Some(&row), &answered, quiet)
            .unwrap_err()
            .contains("answered the principal"));
        let forced = request(PromotionKind::Forced, 1, None);
        assert!(promote(Some(&row), &forced, Duration::from_secs(2)).is_err());
        assert!(promote(Some(&row), &forced, quiet).unwrap().row.suspended);
        let exposed = set_synchronized(Some(&row), "alpha", Epoch(1), false, None)
            .unwrap()
            .row;
        let refused = promote(Some(&exposed), &automatic, quiet);
        assert!(refused.unwrap_err().contains("synchronized false"));
        let stale = promote(Some(&granted.row), &automatic, quiet);
        assert!(stale.is_err());
    }

    #[test]
    fn a_late_synchronized_record_never_undoes_a_later_exposure() {
        let exposed = RoleRow {
            synchronized: false,
            version: 8,
            ..synchronized_row()
        };
        // I2: decided on version 7, arriving after the exposure wrote 8.
        let late = set_synchronized(Some(&exposed), "alpha", Epoch(1), true, Some(7));
        assert!(late.unwrap_err().contains("changed since"));
        let current = set_synchronized(Some(&exposed), "alpha", Epoch(1), true, Some(8));
        assert!(current.unwrap().row.synchronized);
    }

    #[test]
    fn only_the_current_principal_may_run_exposed() {
        let row = synchronized_row();
        assert!(set_synchronized(Some(&row), "beta", Epoch(1), false, None).is_err());
        assert!(set_synchronized(Some(&row), "alpha", Epoch(0), false, None).is_err());
        // "Synchronized" only at the row's epoch ...
        assert!(set_synchronized(Some(&row), "beta", Epoch(2), true, None).is_err());
        // ... "not synchronized" also carries a later epoch to the row (I2).
        let carried = set_synchronized(Some(&row), "beta", Epoch(2), false, None)
            .unwrap()
            .row;
        assert_eq!(
            (
                carried.principal.as_str(),
                carried.epoch,
                carried.synchronized
            ),
            ("beta", Epoch(2), false)
        );
        assert_eq!(carried.mirror.as_deref(), Some("alpha"));
    }

    #[test]
    fn a_role_switch_made_without_the_witness_is_taken_over() {
        let row = synchronized_row();
        let change = on_report(Some(&row), &view("beta", Role::Principal, 2)).unwrap();
        assert_eq!(change.row.principal, "beta");
        assert_eq!(change.row.mirror.as_deref(), Some("alpha"));
        assert!(!change.row.synchronized);
    }
}
