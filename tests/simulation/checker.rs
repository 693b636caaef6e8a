//! The invariants of DESIGN.md section 3, checked as the run goes (I1 at
//! every commit, I3 at every grant and promotion, I4 at every commit a
//! routed client reaches) and at its end (I2 on the final principal's
//! history, liveness). Commits acknowledged by a PostgreSQL that outlived
//! its frozen or dead agent's lease (its fence, `fence.rs`, had no deadline
//! for it: fed only by the quorum watch) are counted apart as "unfenced".
//! A commit whose
//! synchronous wait was cancelled reaches its client through the proxy's
//! commit fence as 40003, not as a success: it is counted as "fenced by the
//! proxy", and "edge" (such a commit acknowledged) must stay 0.

use pgmirror::control::PromotionKind;
use pgmirror::roles::Role;

use crate::postgres::{Pg, PgRun, Protection, TxnAck};
use crate::trace::{Line, Trace};
use crate::world::World;

#[derive(Default, Clone, Copy, Debug)]
pub struct Failures {
    pub i1: u64,
    pub i2: u64,
    pub i3: u64,
    pub i4: u64,
    pub liveness: u64,
    /// I3's atomicity: a partner shows the principal role while its
    /// PostgreSQL is still in recovery.
    pub i3_atomic: u64,
}

impl Failures {
    pub fn any(&self) -> bool {
        self.i1 + self.i2 + self.i3 + self.i4 + self.liveness + self.i3_atomic > 0
    }

    pub fn add(&mut self, other: &Failures) {
        self.i1 += other.i1;
        self.i2 += other.i2;
        self.i3 += other.i3;
        self.i4 += other.i4;
        self.liveness += other.liveness;
        self.i3_atomic += other.i3_atomic;
    }
}

#[derive(Default)]
pub struct Checker {
    pub done: bool,
    /// The highest epoch granted by the witness or taken by a role switch.
    pub highest_epoch: u64,
    /// The highest epoch whose principal has completed a commit.
    completed_epoch: u64,
    /// Epochs begun by forced service without a witness: the operator
    /// accepted two writers (the reference's split brain); not counted.
    forced_alone: Vec<u64>,
    /// Acknowledged under FULL while synchronized: (pos, rid, epoch).
    protected: Vec<(u32, u32, u64, Protection)>,
    /// How each epoch was granted (by a witness, or by a takeover or
    /// forced service without one).
    grants: Vec<(u64, PromotionKind)>,
    pub acknowledged: u64,
    /// Commits acknowledged although their synchronous wait was cut (the
    /// proxy's commit fence lets none through: must be 0).
    pub edge: u64,
    /// Commits whose cut wait the proxy turned into 40003 (outcome unknown).
    pub fenced: u64,
    /// Commits completed normally that the proxy turned into 40003 because
    /// it had forwarded the client's cancel meanwhile.
    pub fenced_cancel: u64,
    /// Commits acknowledged by an unfenced PostgreSQL (the fence's gap).
    pub unfenced: u64,
    /// Events the gap explains: an unfenced commit or routed client at an
    /// older epoch, a grant while the old principal still serves unfenced.
    pub unfenced_events: u64,
    pub failures: Failures,
    /// Both agents' states at a liveness failure (`World::log_state`).
    pub final_states: String,
    /// The first failure: when, and which.
    pub first: Option<(u64, &'static str)>,
}

impl Checker {
    fn fail(&mut self, t: u64, what: &'static str, trace: &mut Trace, a: u64, b: u64) {
        trace.push(Line {
            t,
            node: "CHECKER",
            what: "VIOLATION",
            a,
            b,
            note: what,
        });
        if self.first.is_none() {
            self.first = Some((t, what));
        }
    }

    fn forced_between(&self, low: u64, high: u64) -> bool {
        self.forced_alone.iter().any(|e| *e > low && *e <= high)
    }

    pub fn on_forced_without_witness(&mut self, epoch: pgmirror::roles::Epoch) {
        self.forced_alone.push(epoch.0);
    }

    pub fn on_persist(&mut self, role: Role, epoch: u64) {
        if role == Role::Principal {
            self.highest_epoch = self.highest_epoch.max(epoch);
        }
    }

    pub fn on_serving(&mut self, _p: usize, epoch: u64) {
        self.highest_epoch = self.highest_epoch.max(epoch);
    }

    /// Epoch `epoch` was granted as `kind`.
    pub fn on_granted(&mut self, epoch: u64, kind: PromotionKind) {
        self.grants.push((epoch, kind));
    }

    /// I1: a commit completes on a principal of an epoch older than one
    /// that already completed a commit.
    pub fn on_commit(&mut self, t: u64, ack: TxnAck, trace: &mut Trace) {
        let stale = ack.epoch < self.completed_epoch
            && !self.forced_between(ack.epoch, self.completed_epoch);
        if stale && ack.unfenced {
            self.unfenced_events += 1;
        } else if stale {
            self.failures.i1 += 1;
            self.fail(
                t,
                "I1: a commit completed at an older epoch after one at a newer epoch",
                trace,
                ack.epoch,
                self.completed_epoch,
            );
        }
        self.completed_epoch = self.completed_epoch.max(ack.epoch);
    }

    /// The client received the commit's success.
    pub fn on_acknowledged(&mut self, _t: u64, ack: TxnAck) {
        self.acknowledged += 1;
        if ack.unfenced {
            self.unfenced += 1;
        } else if ack.edge {
            self.edge += 1;
        } else if ack.protected {
            self.protected
                .push((ack.pos, ack.rid, ack.epoch, ack.class));
        }
    }

    /// The proxy's commit fence answered the client 40003 instead.
    pub fn on_fenced(&mut self, ack: TxnAck) {
        if ack.edge {
            self.fenced += 1;
        } else {
            self.fenced_cancel += 1;
        }
    }

    /// I4: a routed client is served by a PostgreSQL below the highest
    /// epoch granted.
    pub fn on_routed(&mut self, t: u64, serve_epoch: u64, unfenced: bool, trace: &mut Trace) {
        let stale = serve_epoch < self.highest_epoch
            && !self.forced_between(serve_epoch, self.highest_epoch);
        if stale && unfenced {
            self.unfenced_events += 1;
        } else if stale {
            self.failures.i4 += 1;
            self.fail(
                t,
                "I4: a client was served by a PostgreSQL below the highest epoch granted",
                trace,
                serve_epoch,
                self.highest_epoch,
            );
        }
    }

    /// I3 at the grant: the witness lets a mirror take over automatically
    /// while the old principal's PostgreSQL still serves.
    pub fn on_grant(
        &mut self,
        t: u64,
        epoch: u64,
        kind: PromotionKind,
        old_serving: bool,
        old_unfenced: bool,
        trace: &mut Trace,
    ) {
        self.on_granted(epoch, kind);
        if kind == PromotionKind::Automatic && old_serving && old_unfenced {
            self.unfenced_events += 1;
        } else if kind == PromotionKind::Automatic && old_serving {
            self.failures.i3 += 1;
            self.fail(
                t,
                "I3: automatic failover granted while the old principal's PostgreSQL still serves",
                trace,
                0,
                0,
            );
        }
    }

    pub fn on_shown_early(&mut self, t: u64, trace: &mut Trace) {
        self.failures.i3_atomic += 1;
        self.fail(
            t,
            "I3-atomic: the principal role is shown while PostgreSQL is still in recovery",
            trace,
            0,
            0,
        );
    }

    /// I3 at the promotion: an automatic promotion (or a handover) of a
    /// mirror that lacks a commit acknowledged under FULL.
    pub fn on_promoted(&mut self, t: u64, epoch: u64, pg: &Pg, trace: &mut Trace) {
        let automatic = self.grants.iter().any(|(granted, kind)| {
            *granted == epoch && matches!(kind, PromotionKind::Automatic | PromotionKind::Handover)
        });
        if !automatic {
            return;
        }
        let missing = self
            .protected
            .iter()
            .filter(|(pos, rid, acked, _)| *acked < epoch && !pg.holds(*pos, *rid))
            .count();
        if missing > 0 {
            self.failures.i3 += 1;
            self.fail(
                t,
                "I3: automatic promotion of a mirror missing commits acknowledged under FULL",
                trace,
                missing as u64,
                epoch,
            );
        }
    }

    /// I2 at the end: every protected commit is in the final history.
    fn final_history(&mut self, t: u64, pg: &Pg, trace: &mut Trace) {
        let mut first = None;
        let mut missing = 0;
        for (pos, rid, _, class) in &self.protected {
            if !pg.holds(*pos, *rid) {
                missing += 1;
                first.get_or_insert(*class);
            }
        }
        if let Some(class) = first {
            self.failures.i2 += missing;
            let what = match class {
                Protection::Waited => {
                    "I2: commits acknowledged under FULL are missing from the final principal \
                     (the first had waited for the mirror's flush)"
                }
                Protection::StateOnly => {
                    "I2: commits acknowledged under FULL are missing from the final principal \
                     (the first did not wait: the state said synchronized, the requirement was \
                     not in force)"
                }
                Protection::WitnessOnly => {
                    "I2: commits acknowledged under FULL are missing from the final principal \
                     (the first did not wait: only the witness still recorded synchronized)"
                }
            };
            self.fail(t, what, trace, missing, 0);
        }
    }
}

impl World {
    /// The end of the run: liveness and I2.
    pub fn finish(&mut self) {
        let t = self.t;
        if !self.scenario.ended && self.scenario.synchronized_at.is_none() {
            for a in 0..2 {
                self.log_state(a);
            }
            self.check.failures.liveness += 1;
            self.check.fail(
                t,
                "liveness: not SYNCHRONIZED within the bound after the heal",
                &mut self.trace,
                self.scenario.deadline,
                0,
            );
        }
        // The final principal: the principal of the highest epoch, serving
        // if one does.
        let candidates = (0..2).filter(|a| self.agents[*a].durable.role == Role::Principal);
        let final_principal = candidates.max_by_key(|a| {
            (
                self.pgs[*a].run == PgRun::Principal,
                self.agents[*a].durable.epoch,
            )
        });
        if let Some(p) = final_principal {
            self.check.final_history(t, &self.pgs[p], &mut self.trace);
        }
    }
}

impl World {
    /// One line of what agent `a` is at: a = role (1 principal), promoting
    /// (2), handing over (4), suspended (8), safety off (16), peer connected
    /// (32), witness connected (64), refusing (128), epoch << 8; b = its
    /// PostgreSQL (0 stopped, 1 starting, 2 principal, 3 mirror, 4
    /// stopping); the note: what holds its operations lock.
    pub fn log_state(&mut self, a: usize) {
        use crate::ops::Stage;
        let agent = &self.agents[a];
        let state = &agent.durable;
        let bits = u64::from(state.role == Role::Principal)
            | u64::from(state.promoting) << 1
            | u64::from(state.handing_over.is_some()) << 2
            | u64::from(state.suspended) << 3
            | u64::from(state.safety == pgmirror::roles::Safety::Off) << 4
            | u64::from(agent.obs.peer.connected) << 5
            | u64::from(agent.obs.witness.connected) << 6
            | u64::from(agent.memory.refusing_principal) << 7
            | state.epoch.0 << 8;
        let pg = match self.pgs[a].run {
            PgRun::Stopped => 0,
            PgRun::Starting => 1,
            PgRun::Principal => 2,
            PgRun::Mirror => 3,
            PgRun::Stopping => 4,
        };
        let note = match agent.running.as_ref().map(|r| &r.stage) {
            None => "lock free",
            Some(Stage::Tick) => "lock: tick",
            Some(Stage::Change) => "lock: command",
            Some(Stage::LeaveWitness { .. }) => "lock: leaving the witness",
            Some(Stage::Manual { .. }) => "lock: FAILOVER",
            Some(Stage::TakeOver { .. }) => "lock: takeover",
            Some(Stage::Forced { .. }) => "lock: FORCE_SERVICE",
            Some(Stage::Auto) => "lock: automatic failover",
        };
        let note = if !agent.alive {
            "dead"
        } else if agent.frozen {
            "frozen"
        } else {
            note
        };
        self.log(a, "state", bits, pg, note);
        use std::fmt::Write;
        let _ = write!(
            self.check.final_states,
            " | {}: {bits:#x} pg {pg} {note}",
            crate::world::HOST_NAMES[a]
        );
    }
}
