//! The agent's `operations` lock and what runs under it, one at a time:
//! supervisor ticks, operator commands (check, apply, SET WITNESS and
//! PARTNER OFF leaving the witness, manual failover, forced service; a
//! command for the peer is forwarded outside the lock, in `commands.rs`),
//! the mirror's half of a takeover (its steps in `takeover.rs`) and the
//! automatic failover request, like `src/partner/operations.rs`,
//! `supervisor.rs` and `quorum.rs`. A Decision is persisted when it is
//! carried out (`actions::carry_out`); its actions then run in order, each
//! taking simulated time, so a kill in the middle loses the rest. An action
//! may answer with a follow-up decision (a takeover's answer, a witness's
//! grant) that replaces the rest of the list, or drop the rest (a witness
//! that did not record).

use std::collections::VecDeque;

use pgmirror::control::{Command, PromotionKind};
use pgmirror::partner::policy::commands::{
    failover_answered, failover_hand_over, forced_service, promotion_asks, TakeOverAnswer,
    WitnessAnswer,
};
use pgmirror::partner::policy::{automatic_failover, granted, tick, Action, Decision};
use pgmirror::partner::state::HandOver;
use pgmirror::roles::{Epoch, Role};
use pgmirror::wire::lsn::Lsn;

use crate::actions::pack_actions;
use crate::agent::AgentEv;
use crate::takeover::takeover_answer;
use crate::world::{witness_of, Msg, Proc, TakeOverOutcome, WitnessReply, World, WIT_A};

/// `control::REQUEST_TIMEOUT`: how long a forwarded command may take.
const REQUEST_TIMEOUT_MS: u64 = 90_000;
/// `ControlClient::connect`: a fresh control connection over a cut link
/// fails after this.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// `actions::TAKE_OVER_PROMOTION`: the takeover request waits 2 x TIMEOUT
/// and this (the mirror drains up to TIMEOUT, then promotes).
const TAKE_OVER_PROMOTION_MS: u64 = 20_000;

/// Work waiting for the operations lock.
pub enum Op {
    Tick,
    Command {
        command: Command,
        from: Proc,
        req: u64,
    },
    TakeOver {
        from: u8,
        req: u64,
        epoch: Epoch,
        lsn: Lsn,
        kind: PromotionKind,
    },
    AutoFailover,
}

/// Where the operation holding the lock is.
pub enum Stage {
    Tick,
    /// A command's change of settings; answered when its actions are done.
    Change,
    /// SET WITNESS or PARTNER OFF on the principal (`Plan::LeaveWitness`):
    /// the current witness is told the session leaves it (Detach) while
    /// `decision` is Some; then the decision is carried out. Not told (or
    /// refused): the command is refused (`operations::release`).
    LeaveWitness {
        decision: Option<Box<Decision>>,
        command: Command,
    },
    /// Manual failover: the fast stop (`handing_over` false), then the
    /// handover decision and its answer.
    Manual {
        handing_over: bool,
    },
    TakeOver {
        from: u8,
        req: u64,
        epoch: Epoch,
        lsn: Lsn,
        kind: PromotionKind,
        /// When the drain gives up; None while the standby starts.
        deadline: Option<u64>,
    },
    Forced {
        received: Option<Lsn>,
        asked: bool,
    },
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    None,
    Stopped,
    StartPrincipal,
    PromoteAfterStart,
    Checkpointed(Epoch),
    Rewind,
    TakeCopy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Action::HandOver: the answer goes to `failover_answered`.
    HandOver(HandOver),
    /// Action::RecordAtWitness (of this sync state): no row drops the
    /// rest of the list.
    Record(bool),
    /// Action::AskPromotion: a row is a grant (`policy::granted`).
    Ask,
    /// The stage's own request.
    Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Nothing,
    Action { token: u64, post: Post },
    Request(u64, Purpose),
    Drain,
}

pub struct Running {
    pub stage: Stage,
    /// Who gets the command's answer.
    pub answer_to: Option<(Proc, u64)>,
    pub actions: VecDeque<Action>,
    pub wait: Wait,
    /// An action failed (the real code's `?`).
    pub failed: bool,
    /// The failure is a refusal (`OpError::Refused`), not an error.
    pub refused: bool,
    /// A supervisor tick runs under the lock once the actions are done
    /// (a granted promotion is finished at once).
    pub then_tick: bool,
}

pub enum Started {
    Done,
    Wait(Wait),
    Failed,
    /// The rest of the list relied on what did not happen.
    Stop,
}

impl World {
    pub fn enqueue(&mut self, a: usize, op: Op) {
        self.agents[a].queue.push_back(op);
        self.start_next(a);
    }

    fn start_next(&mut self, a: usize) {
        while self.agents[a].running.is_none() && self.agents[a].alive {
            let Some(op) = self.agents[a].queue.pop_front() else {
                return;
            };
            self.begin(a, op);
        }
    }

    pub fn hold(&mut self, a: usize, stage: Stage, answer_to: Option<(Proc, u64)>) {
        self.agents[a].running = Some(Running {
            stage,
            answer_to,
            actions: VecDeque::new(),
            wait: Wait::Nothing,
            failed: false,
            refused: false,
            then_tick: false,
        });
    }

    pub fn stage(&mut self, a: usize) -> Option<&mut Stage> {
        self.agents[a].running.as_mut().map(|r| &mut r.stage)
    }

    /// `carry_out`'s first step: persists the decision's state, keeps its
    /// memory and queues its actions.
    pub fn decide(&mut self, a: usize, decision: Decision, what: &'static str) {
        let packed = pack_actions(&decision.actions);
        let agent = &mut self.agents[a];
        if let Some(state) = decision.state {
            let changed = (agent.durable.role, agent.durable.epoch) != (state.role, state.epoch);
            agent.durable = state;
            let (role, epoch) = (agent.durable.role, agent.durable.epoch.0);
            self.check.on_persist(role, epoch);
            if changed {
                // `Agent::fence_changed` wakes the feeder at once.
                self.feed_fence(a);
            }
        }
        let agent = &mut self.agents[a];
        agent.memory = decision.memory;
        if let Some(running) = agent.running.as_mut() {
            running.actions.extend(decision.actions);
        }
        let state = &agent.durable;
        let b = u64::from(state.role == Role::Principal)
            | u64::from(state.synchronized) << 1
            | u64::from(state.suspended) << 2
            | u64::from(state.promoting) << 3
            | u64::from(state.handing_over.is_some()) << 4
            | state.epoch.0 << 8;
        if packed != 0 || decision.note.is_some() || what != "decide" {
            self.log(a, what, packed, b, decision.note.unwrap_or(""));
        }
    }

    /// A follow-up decision replaces the rest of the action list.
    fn follow_up(&mut self, a: usize, decision: Decision) {
        if let Some(running) = self.agents[a].running.as_mut() {
            running.actions.clear();
        }
        self.decide(a, decision, "apply");
        self.run_actions(a);
    }

    /// `supervisor::tick`: observe, decide, carry out.
    fn tick_now(&mut self, a: usize) {
        self.observe(a);
        let agent = &self.agents[a];
        let decision = tick(&agent.durable, &agent.memory, &agent.obs);
        self.decide(a, decision, "decide");
        self.run_actions(a);
    }

    fn begin(&mut self, a: usize, op: Op) {
        match op {
            Op::Tick => {
                self.hold(a, Stage::Tick, None);
                self.tick_now(a);
            }
            Op::Command { command, from, req } => self.begin_command(a, command, from, req),
            Op::TakeOver {
                from,
                req,
                epoch,
                lsn,
                kind,
            } => self.begin_take_over(a, from, req, epoch, lsn, kind),
            Op::AutoFailover => {
                // Decide again under the lock: a tick may have changed the
                // state. PostgreSQL as the watch saw it.
                self.hold(a, Stage::Auto, None);
                let postgres = if self.pgs[a].run == crate::postgres::PgRun::Stopped {
                    pgmirror::partner::policy::PostgresObservation::Stopped
                } else {
                    pgmirror::partner::policy::PostgresObservation::Unreadable
                };
                self.observe_as(a, postgres);
                let agent = &self.agents[a];
                let decision = automatic_failover(&agent.durable, &agent.memory, &agent.obs);
                if let Some(running) = self.agents[a].running.as_mut() {
                    running.then_tick = true;
                }
                self.decide(a, decision, "decide");
                self.run_actions(a);
            }
        }
    }

    /// A command forwarded to the peer over a fresh connection: the
    /// connect fails after 10 s on a cut link, else the answer may take
    /// REQUEST_TIMEOUT.
    pub fn call_limit(&self, a: usize) -> u64 {
        if self.both_ways(a, 1 - a) {
            REQUEST_TIMEOUT_MS
        } else {
            CONNECT_TIMEOUT_MS
        }
    }

    /// `ask_peer_to_take_over`: the connect fails after 10 s on a cut
    /// link, else the answer may take 2 x TIMEOUT + 20 s.
    pub fn takeover_limit(&self, a: usize) -> u64 {
        if self.both_ways(a, 1 - a) {
            2 * self.agents[a].timeout_ms() + TAKE_OVER_PROMOTION_MS
        } else {
            CONNECT_TIMEOUT_MS
        }
    }

    /// A request over a fresh control connection to the peer: without
    /// both directions the connect fails and nothing is delivered.
    pub fn call_peer(&mut self, a: usize, msg: Msg) {
        if self.both_ways(a, 1 - a) {
            self.send(a, Proc::Agent((1 - a) as u8), msg);
        }
    }

    /// `actions::ask_witness`: a fresh connection to witness `w` within
    /// TIMEOUT, then the request within TIMEOUT. Returns the request id.
    pub fn call_witness(&mut self, a: usize, w: usize, msg: Msg, purpose: Purpose) {
        let req = match &msg {
            Msg::SetSync { req, .. } | Msg::Detach { req, .. } | Msg::Promote { req, .. } => *req,
            _ => 0,
        };
        if self.both_ways(a, WIT_A + w) {
            self.send(a, Proc::Witness(w as u8), msg);
        }
        let timeout = self.agents[a].timeout_ms();
        self.wait_request(a, req, purpose, timeout);
    }

    pub fn wait_request(&mut self, a: usize, req: u64, purpose: Purpose, timeout_ms: u64) {
        if let Some(running) = self.agents[a].running.as_mut() {
            running.wait = Wait::Request(req, purpose);
        }
        self.agent_timer(a, timeout_ms, AgentEv::ReqTimeout(req));
    }

    /// `operations::ask_witness_to_promote`: a row of the witness that
    /// already names this partner at the next epoch is a grant whose answer
    /// was lost (Granted without asking); else the request, which always
    /// says how long ago this mirror last answered the principal (since its
    /// start if it has not: `Agent::principal_answered_ago`).
    pub fn ask_witness_promote(
        &mut self,
        a: usize,
        witness: usize,
        kind: PromotionKind,
        lsn: Option<Lsn>,
    ) {
        let agent = &self.agents[a];
        let epoch = agent.durable.epoch;
        let granted = agent
            .obs
            .witness
            .row
            .as_ref()
            .is_some_and(|row| row.principal == agent.obs.name && row.epoch == epoch.next());
        if granted {
            self.log(
                a,
                "granted",
                epoch.0,
                kind as u64,
                "the witness's row names it",
            );
            return self.promotion_answered(a, &WitnessAnswer::Granted);
        }
        let req = self.req();
        let answered_ago_ms = Some(self.principal_answered_ago_ms(a));
        self.log(a, "ask promotion", epoch.0, kind as u64, "");
        self.call_witness(
            a,
            witness,
            Msg::Promote {
                from: a as u8,
                req,
                epoch,
                kind,
                lsn,
                answered_ago_ms,
            },
            Purpose::Op,
        );
    }

    /// `Agent::principal_answered_ago`: since this mirror last answered a
    /// ping of the principal, or since this agent started.
    pub fn principal_answered_ago_ms(&self, a: usize) -> u64 {
        let at = self.agents[a].obs.answered_principal_at.unwrap_or_default();
        self.agent_now(a).saturating_sub(at).as_millis() as u64
    }

    /// An answer (or None: timeout, refused connection) to request `req`.
    pub fn op_reply(&mut self, a: usize, req: u64, reply: Option<Msg>) {
        if self.forward_answered(a, req, &reply) {
            return;
        }
        let Some(Wait::Request(r, purpose)) = self.agents[a].running.as_ref().map(|r| r.wait)
        else {
            return;
        };
        if r != req {
            return;
        }
        if let Some(running) = self.agents[a].running.as_mut() {
            running.wait = Wait::Nothing;
        }
        match purpose {
            Purpose::HandOver(hand_over) => {
                let answer = takeover_answer(&reply);
                let agent = &self.agents[a];
                let decision = failover_answered(&agent.durable, &agent.memory, hand_over, &answer);
                let code = match answer {
                    TakeOverAnswer::Done => 1,
                    TakeOverAnswer::Refused(_) => 2,
                    TakeOverAnswer::Lost(_) => 3,
                };
                self.log(
                    a,
                    "handover answer",
                    hand_over.epoch.0,
                    code,
                    "1 done 2 refused 3 lost",
                );
                self.follow_up(a, decision);
            }
            Purpose::Record(synchronized) => {
                if let Some(Msg::Witness {
                    reply: WitnessReply::Row(row),
                    ..
                }) = reply
                {
                    let witness = &mut self.agents[a].obs.witness;
                    if !synchronized {
                        witness.exposure_recorded_at = row.as_ref().map(|row| row.witness_id);
                    }
                    witness.row = row;
                } else {
                    self.log(a, "not recorded", 0, 0, "the rest of the actions dropped");
                    if let Some(running) = self.agents[a].running.as_mut() {
                        running.actions.clear();
                    }
                }
                self.run_actions(a);
            }
            Purpose::Ask => match reply {
                Some(Msg::Witness {
                    reply: WitnessReply::Row(Some(row)),
                    ..
                }) => {
                    self.agents[a].obs.witness.row = Some(row.clone());
                    let agent = &self.agents[a];
                    let decision = granted(&agent.durable, &agent.memory, &row);
                    self.follow_up(a, decision);
                }
                _ => {
                    if let Some(running) = self.agents[a].running.as_mut() {
                        running.actions.clear();
                    }
                    self.run_actions(a);
                }
            },
            Purpose::Op => self.stage_reply(a, reply),
        }
    }

    fn stage_reply(&mut self, a: usize, reply: Option<Msg>) {
        match self.stage(a) {
            Some(Stage::LeaveWitness { .. }) => self.leave_witness_answered(a, reply),
            Some(Stage::TakeOver { .. } | Stage::Forced { .. }) => {
                self.promotion_answered(a, &witness_answer(&reply))
            }
            _ => {}
        }
    }

    /// The witness's answer to the stage's promotion request.
    fn promotion_answered(&mut self, a: usize, answer: &WitnessAnswer) {
        match self.stage(a) {
            Some(Stage::TakeOver {
                epoch, lsn, kind, ..
            }) => {
                let (epoch, lsn, kind) = (*epoch, *lsn, *kind);
                self.take_over_with(a, epoch, lsn, kind, answer);
            }
            Some(Stage::Forced { received, .. }) => {
                let received = *received;
                self.forced_with(a, received, answer);
            }
            _ => {}
        }
    }

    /// Forced service once the witness answered (`operations::force_service`).
    fn forced_with(&mut self, a: usize, received: Option<Lsn>, answer: &WitnessAnswer) {
        let agent = &self.agents[a];
        match forced_service(&agent.durable, &agent.memory, received, answer) {
            Err(_) => self.refuse_and_release(a),
            Ok(decision) => {
                let epoch = self.agents[a].durable.epoch.next();
                if matches!(answer, WitnessAnswer::NoWitness) {
                    self.check.on_forced_without_witness(epoch);
                    self.check.on_granted(epoch.0, PromotionKind::Forced);
                }
                if let Some(running) = self.agents[a].running.as_mut() {
                    running.then_tick = true;
                }
                self.decide(a, decision, "apply");
                self.run_actions(a);
            }
        }
    }

    /// The queued actions are done: the stage's next step.
    pub fn stage_continue(&mut self, a: usize) {
        let Some(running) = self.agents[a].running.as_mut() else {
            return;
        };
        if running.then_tick && !running.failed {
            running.then_tick = false;
            return self.tick_now(a);
        }
        let next = match &running.stage {
            Stage::Manual {
                handing_over: false,
            } if !running.failed => 1,
            Stage::Forced { asked: false, .. } if !running.failed => 2,
            Stage::TakeOver { deadline: None, .. } if !running.failed => 3,
            _ => 0,
        };
        match next {
            1 => {
                // The stop is done: read the shutdown checkpoint's LSN
                // (pg_controldata), then ask the mirror.
                let checkpoint = Lsn(self.pgs[a].checkpoint as u64);
                if let Some(Stage::Manual { handing_over }) = self.stage(a) {
                    *handing_over = true;
                }
                let agent = &self.agents[a];
                let decision = failover_hand_over(&agent.durable, &agent.memory, checkpoint);
                self.decide(a, decision, "apply");
                self.run_actions(a);
            }
            2 => {
                let lsn = self.pg_received(a);
                if let Some(Stage::Forced { asked, received }) = self.stage(a) {
                    *asked = true;
                    *received = lsn;
                }
                match self.agents[a].durable.witness.as_ref().map(witness_of) {
                    Some(witness) => {
                        let agent = &self.agents[a];
                        let asks = promotion_asks(&agent.durable, &agent.memory);
                        self.decide(a, asks, "decide");
                        self.ask_witness_promote(a, witness, PromotionKind::Forced, lsn)
                    }
                    None => self.forced_with(a, lsn, &WitnessAnswer::NoWitness),
                }
            }
            // The standby started: the drain begins.
            3 => self.take_over_drain(a),
            _ => self.release(a),
        }
    }

    /// The operation ends with an error (answered Failed).
    pub fn fail_and_release(&mut self, a: usize) {
        if let Some(running) = self.agents[a].running.as_mut() {
            running.failed = true;
        }
        self.release(a);
    }

    /// The operation ends with `OpError::Refused` (answered Refused).
    pub fn refuse_and_release(&mut self, a: usize) {
        if let Some(running) = self.agents[a].running.as_mut() {
            running.failed = true;
            running.refused = true;
        }
        self.release(a);
    }

    /// Releases the lock: answers whoever waits, then the next operation.
    pub fn release(&mut self, a: usize) {
        let Some(mut running) = self.agents[a].running.take() else {
            return;
        };
        match running.stage {
            Stage::Tick => self.tick_done(a),
            Stage::Auto => self.watch_resume(a),
            Stage::TakeOver { from, req, .. } => {
                let answer = match (running.failed, running.refused) {
                    (false, _) => TakeOverOutcome::Done,
                    (true, true) => TakeOverOutcome::Refused,
                    (true, false) => TakeOverOutcome::Failed,
                };
                self.send_held(a, Proc::Agent(from), Msg::TakeOverReply { req, answer });
            }
            Stage::Manual { .. } => {
                self.agents[a].pending_failover = false;
                // Done only when this partner stepped down.
                running.failed |= self.agents[a].durable.role != Role::Mirror;
            }
            _ => {}
        }
        if let Some((to, req)) = running.answer_to {
            let ok = !running.failed;
            self.send_held(a, to, Msg::CommandReply { req, ok });
        }
        self.start_next(a);
    }
}

/// How `ask_witness` ends for a promotion: granted, refused, or (timeout,
/// refused connection) unreachable.
pub fn witness_answer(reply: &Option<Msg>) -> WitnessAnswer {
    match reply {
        Some(Msg::Witness {
            reply: WitnessReply::Row(Some(_)),
            ..
        }) => WitnessAnswer::Granted,
        Some(Msg::Witness { .. }) => WitnessAnswer::Refused("refused".into()),
        _ => WitnessAnswer::Unreachable("no answer".into()),
    }
}
