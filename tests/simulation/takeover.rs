//! The mirror's half of a takeover (`operations::take_over`): the real
//! `take_over_check`, the lease it must hold with a witness, the standby
//! started if PostgreSQL is stopped, the drain up to the failover LSN for
//! at most TIMEOUT (none for a handover after a crash), the witness asked,
//! then the real `commands::take_over`; and how the principal reads the
//! answer (`actions::ask_peer_to_take_over`).

use pgmirror::control::PromotionKind;
use pgmirror::partner::policy::commands::{
    promotion_asks, take_over, take_over_check, TakeOverAnswer, WitnessAnswer,
};
use pgmirror::partner::policy::Action;
use pgmirror::roles::{lease_holds, Epoch};
use pgmirror::wire::lsn::Lsn;

use crate::agent::AgentEv;
use crate::ops::{Stage, Wait};
use crate::postgres::PgRun;
use crate::world::{witness_of, Msg, TakeOverOutcome, World};

impl World {
    /// `operations::take_over` up to the drain, under the lock.
    pub fn begin_take_over(
        &mut self,
        a: usize,
        from: u8,
        req: u64,
        epoch: Epoch,
        lsn: Lsn,
        kind: PromotionKind,
    ) {
        let stage = Stage::TakeOver {
            from,
            req,
            epoch,
            lsn,
            kind,
            deadline: None,
        };
        self.hold(a, stage, None);
        match take_over_check(&self.agents[a].durable, epoch) {
            Err(_) => {
                self.log(a, "takeover refused", epoch.0, 0, "take_over_check");
                return self.refuse_and_release(a);
            }
            Ok(true) => {
                self.log(a, "takeover done", epoch.0, 0, "already principal");
                return self.release(a);
            }
            Ok(false) => {}
        }
        let agent = &self.agents[a];
        let state = &agent.durable;
        let lease = lease_holds(agent.obs.lease_from, self.agent_now(a), state.timeout());
        if state.witness.is_some() && !lease {
            // I1: it could not serve anyway; refused before recording anything.
            self.log(a, "takeover refused", epoch.0, 0, "no quorum lease");
            return self.refuse_and_release(a);
        }
        if self.pgs[a].run == PgRun::Stopped {
            // `start_mirror`; its failure answers Failed.
            if let Some(running) = self.agents[a].running.as_mut() {
                running.actions.push_back(Action::StartMirror);
            }
            return self.run_actions(a);
        }
        self.take_over_drain(a);
    }

    /// The drain begins: it gives up after TIMEOUT.
    pub fn take_over_drain(&mut self, a: usize) {
        let limit = self.agents[a].timeout_ms();
        let now = self.agent_now(a).as_millis() as u64;
        if let Some(Stage::TakeOver { deadline, .. }) =
            self.agents[a].running.as_mut().map(|r| &mut r.stage)
        {
            *deadline = Some(now + limit);
        }
        self.op_drain(a);
    }

    /// The mirror waits for the principal's last WAL before it promotes
    /// (nothing to wait for when the failover LSN is invalid).
    pub fn op_drain(&mut self, a: usize) {
        let Some(running) = self.agents[a].running.as_ref() else {
            return;
        };
        let Stage::TakeOver {
            epoch,
            lsn,
            kind,
            deadline: Some(deadline),
            ..
        } = running.stage
        else {
            return;
        };
        if !matches!(running.wait, Wait::Nothing | Wait::Drain) {
            return;
        }
        let received = self.pg_received(a);
        if lsn == Lsn::INVALID || received.is_some_and(|received| received > lsn) {
            if let Some(running) = self.agents[a].running.as_mut() {
                running.wait = Wait::Nothing;
            }
            let target = Some(lsn).filter(|lsn| *lsn != Lsn::INVALID);
            match self.agents[a].durable.witness.as_ref().map(witness_of) {
                Some(witness) => {
                    let agent = &self.agents[a];
                    let asks = promotion_asks(&agent.durable, &agent.memory);
                    self.decide(a, asks, "decide");
                    self.ask_witness_promote(a, witness, kind, target)
                }
                None => self.take_over_with(a, epoch, lsn, kind, &WitnessAnswer::NoWitness),
            }
        } else if self.agent_now(a).as_millis() as u64 >= deadline {
            self.log(a, "takeover refused", epoch.0, 0, "drain limit");
            self.refuse_and_release(a);
        } else {
            if let Some(running) = self.agents[a].running.as_mut() {
                running.wait = Wait::Drain;
            }
            self.agent_timer(a, 10, AgentEv::Drain);
        }
    }

    /// The mirror's last step of a takeover: the real `commands::take_over`.
    pub fn take_over_with(
        &mut self,
        a: usize,
        epoch: Epoch,
        lsn: Lsn,
        kind: PromotionKind,
        answer: &WitnessAnswer,
    ) {
        let lsn = Some(lsn).filter(|lsn| *lsn != Lsn::INVALID);
        let agent = &self.agents[a];
        match take_over(&agent.durable, &agent.memory, epoch, lsn, answer) {
            Err(_) => {
                self.log(a, "takeover refused", epoch.0, 0, "the witness refused");
                self.refuse_and_release(a);
            }
            Ok(decision) => {
                if !matches!(answer, WitnessAnswer::Granted) {
                    self.check.on_granted(epoch.0, kind);
                }
                if let Some(running) = self.agents[a].running.as_mut() {
                    running.then_tick = true;
                }
                self.decide(a, decision, "apply");
                self.run_actions(a);
            }
        }
    }
}

/// `ask_peer_to_take_over`: only Refused is a refusal; Failed (the mirror
/// may have recorded the principal role before it failed) is as good as no
/// answer (I1).
pub fn takeover_answer(reply: &Option<Msg>) -> TakeOverAnswer {
    match reply {
        Some(Msg::TakeOverReply {
            answer: TakeOverOutcome::Done,
            ..
        }) => TakeOverAnswer::Done,
        Some(Msg::TakeOverReply {
            answer: TakeOverOutcome::Refused,
            ..
        }) => TakeOverAnswer::Refused("refused".into()),
        Some(Msg::TakeOverReply {
            answer: TakeOverOutcome::Failed,
            ..
        }) => TakeOverAnswer::Lost("failed".into()),
        _ => TakeOverAnswer::Lost("no answer".into()),
    }
}
