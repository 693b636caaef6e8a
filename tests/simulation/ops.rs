//! The agent's `operations` lock and what runs under it, one at a time:
//! supervisor ticks, operator commands (check, apply, manual failover,
//! forced service, forwarding), the mirror's half of a takeover and the
//! automatic failover request, like `src/partner/operations.rs` and
//! `quorum.rs`. A Decision is persisted atomically when it is made; its
//! actions then run in order, each taking simulated time, so a kill in the
//! middle loses the rest.

use std::collections::VecDeque;

use pgmirror::partner::api::{Command, PromotionKind};
use pgmirror::partner::policy::commands::{
    failover_answered, forced_service, take_over, take_over_check, TakeOverAnswer, WitnessAnswer,
};
use pgmirror::partner::policy::{
    become_principal, tick, wants_automatic_failover, Action, Decision,
};
use pgmirror::roles::{Epoch, Role};
use pgmirror::wire::lsn::Lsn;

use crate::actions::pack_actions;
use crate::agent::{AgentEv, Promotion};
use crate::world::{witness_of, Msg, Proc, WitnessReply, World};

/// `api::REQUEST_TIMEOUT`: how long a control call (TakeOver) may take.
const REQUEST_TIMEOUT_MS: u64 = 90_000;
/// `ControlClient::connect`: a fresh control connection over a cut link
/// fails after this.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// `TAKE_OVER_DRAIN_LIMIT`.
const DRAIN_LIMIT_MS: u64 = 30_000;

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
    Forward,
    Manual {
        epoch: Epoch,
        lsn: Lsn,
        answered: bool,
    },
    TakeOver {
        from: u8,
        req: u64,
        epoch: Epoch,
        lsn: Lsn,
        kind: PromotionKind,
        deadline: u64,
    },
    Forced {
        received: Option<Lsn>,
        asked: bool,
    },
    Auto {
        received: Option<Lsn>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    None,
    Stopped,
    StartPrincipal,
    PromoteAfterStart,
    Rewind,
    TakeCopy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    HandOver(Epoch),
    Record,
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
    pub failed: bool,
}

pub enum Started {
    Done,
    Wait(Wait),
    Failed,
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
        });
    }

    fn stage(&mut self, a: usize) -> Option<&mut Stage> {
        self.agents[a].running.as_mut().map(|r| &mut r.stage)
    }

    /// Persists the decision's state, keeps its memory, queues its actions.
    pub fn decide(&mut self, a: usize, decision: Decision, what: &'static str) {
        let packed = pack_actions(&decision.actions);
        let agent = &mut self.agents[a];
        if let Some(state) = decision.state {
            agent.durable = state;
            let (role, epoch) = (agent.durable.role, agent.durable.epoch.0);
            self.check.on_persist(role, epoch);
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
            | state.epoch.0 << 8;
        if packed != 0 || decision.note.is_some() || what != "decide" {
            self.log(a, what, packed, b, decision.note.unwrap_or(""));
        }
    }

    fn empty_decision(&self, a: usize) -> Decision {
        Decision {
            state: None,
            memory: self.agents[a].memory.clone(),
            actions: Vec::new(),
            refusal: None,
            note: None,
        }
    }

    fn begin(&mut self, a: usize, op: Op) {
        match op {
            Op::Tick => {
                self.hold(a, Stage::Tick, None);
                self.observe(a);
                let agent = &self.agents[a];
                let decision = tick(&agent.durable, &agent.memory, &agent.obs);
                if decision.actions.contains(&Action::Promote) {
                    self.agents[a].promotion = Promotion::FromRow;
                }
                self.decide(a, decision, "decide");
                self.run_actions(a);
            }
            Op::Command { command, from, req } => self.begin_command(a, command, from, req),
            Op::TakeOver {
                from,
                req,
                epoch,
                lsn,
                kind,
            } => {
                let deadline = self.agent_now(a).as_millis() as u64 + DRAIN_LIMIT_MS;
                self.hold(
                    a,
                    Stage::TakeOver {
                        from,
                        req,
                        epoch,
                        lsn,
                        kind,
                        deadline,
                    },
                    None,
                );
                if take_over_check(&self.agents[a].durable, epoch).is_err() {
                    self.log(a, "takeover refused", epoch.0, 0, "take_over_check");
                    self.fail_and_release(a);
                    return;
                }
                self.op_drain(a);
            }
            Op::AutoFailover => {
                self.hold(a, Stage::Auto { received: None }, None);
                let agent = &self.agents[a];
                let witness = agent.durable.witness.as_ref().map(witness_of);
                let wants = agent.durable.role == Role::Mirror
                    && wants_automatic_failover(&agent.durable, &agent.obs);
                let (Some(witness), true) = (witness, wants) else {
                    return self.release(a);
                };
                let received = self.pg_received(a);
                if let Some(Stage::Auto { received: r }) = self.stage(a) {
                    *r = received;
                }
                let epoch = self.agents[a].durable.epoch;
                self.log(a, "ask failover", epoch.0, 0, "automatic");
                self.ask_witness_promote(a, witness, epoch, PromotionKind::Automatic, received);
            }
        }
    }

    /// A call to the peer over a fresh connection: the connect fails after
    /// 10 s on a cut link, else the answer may take REQUEST_TIMEOUT.
    pub fn call_limit(&self, a: usize) -> u64 {
        if self.both_ways(a, 1 - a) {
            REQUEST_TIMEOUT_MS
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

    pub fn wait_request(&mut self, a: usize, req: u64, purpose: Purpose, timeout_ms: u64) {
        if let Some(running) = self.agents[a].running.as_mut() {
            running.wait = Wait::Request(req, purpose);
        }
        self.agent_timer(a, timeout_ms, AgentEv::ReqTimeout(req));
    }

    fn ask_witness_promote(
        &mut self,
        a: usize,
        witness: usize,
        epoch: Epoch,
        kind: PromotionKind,
        lsn: Option<Lsn>,
    ) {
        let req = self.req();
        self.send(
            a,
            Proc::Witness(witness as u8),
            Msg::Promote {
                from: a as u8,
                req,
                epoch,
                kind,
                lsn,
            },
        );
        let timeout = self.agents[a].timeout_ms();
        self.wait_request(a, req, Purpose::Op, timeout);
    }

    /// An answer (or None: timeout, refused connection) to request `req`.
    pub fn op_reply(&mut self, a: usize, req: u64, reply: Option<Msg>) {
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
            Purpose::HandOver(epoch) => {
                let answer = takeover_answer(&reply);
                let agent = &self.agents[a];
                let decision =
                    failover_answered(&agent.durable, &agent.memory, epoch, None, &answer);
                self.log(
                    a,
                    "handover answer",
                    epoch.0,
                    u64::from(answer == TakeOverAnswer::Done),
                    "",
                );
                if let Some(running) = self.agents[a].running.as_mut() {
                    running.actions.clear();
                }
                self.decide(a, decision, "apply");
                self.run_actions(a);
            }
            Purpose::Record => {
                if let Some(Msg::Witness {
                    reply: WitnessReply::Row(row),
                    ..
                }) = reply
                {
                    self.agents[a].obs.witness.row = row;
                }
                self.run_actions(a);
            }
            Purpose::Op => self.stage_reply(a, reply),
        }
    }

    fn stage_reply(&mut self, a: usize, reply: Option<Msg>) {
        let Some(running) = self.agents[a].running.as_mut() else {
            return;
        };
        match &mut running.stage {
            Stage::Forward => {
                running.failed = !matches!(reply, Some(Msg::CommandReply { ok: true, .. }));
                self.release(a);
            }
            Stage::Manual {
                epoch,
                lsn,
                answered,
            } => {
                let (epoch, lsn) = (*epoch, *lsn);
                *answered = true;
                let answer = takeover_answer(&reply);
                running.failed = answer != TakeOverAnswer::Done;
                self.agents[a].pending_failover = false;
                let agent = &self.agents[a];
                let decision =
                    failover_answered(&agent.durable, &agent.memory, epoch, Some(lsn), &answer);
                self.log(
                    a,
                    "takeover answer",
                    epoch.0,
                    u64::from(answer == TakeOverAnswer::Done),
                    "",
                );
                self.decide(a, decision, "apply");
                self.run_actions(a);
            }
            Stage::TakeOver {
                epoch, lsn, kind, ..
            } => {
                let (epoch, lsn, kind) = (*epoch, *lsn, *kind);
                let answer = witness_answer(&reply);
                let agent = &self.agents[a];
                match take_over(&agent.durable, &agent.memory, epoch, Some(lsn), &answer) {
                    Err(_) => self.fail_and_release(a),
                    Ok(decision) => {
                        self.agents[a].promotion = Promotion::Granted(kind);
                        self.decide(a, decision, "apply");
                        self.run_actions(a);
                    }
                }
            }
            Stage::Forced { received, .. } => {
                let received = *received;
                let answer = witness_answer(&reply);
                let agent = &self.agents[a];
                match forced_service(&agent.durable, &agent.memory, received, &answer) {
                    Err(_) => self.fail_and_release(a),
                    Ok(decision) => {
                        self.agents[a].promotion = Promotion::Granted(PromotionKind::Forced);
                        self.decide(a, decision, "apply");
                        self.run_actions(a);
                    }
                }
            }
            Stage::Auto { received } => {
                let received = *received;
                match reply {
                    Some(Msg::Witness {
                        reply: WitnessReply::Row(Some(row)),
                        ..
                    }) => {
                        self.agents[a].obs.witness.row = Some(row.clone());
                        let mut decision = self.empty_decision(a);
                        become_principal(
                            &self.agents[a].durable,
                            row.epoch,
                            row.suspended,
                            received,
                            &mut decision,
                        );
                        self.agents[a].promotion = Promotion::Granted(PromotionKind::Automatic);
                        self.decide(a, decision, "apply");
                        self.run_actions(a);
                    }
                    _ => self.release(a),
                }
            }
            Stage::Tick | Stage::Change => {}
        }
    }

    /// The queued actions are done: the stage's next step.
    pub fn stage_continue(&mut self, a: usize) {
        let Some(running) = self.agents[a].running.as_ref() else {
            return;
        };
        match running.stage {
            Stage::Manual {
                epoch,
                answered: false,
                ..
            } => {
                if running.failed {
                    // The stop failed: the failover is aborted.
                    return self.stage_reply(a, None);
                }
                let checkpoint = Lsn(self.pgs[a].checkpoint as u64);
                if let Some(Stage::Manual { lsn, .. }) = self.stage(a) {
                    *lsn = checkpoint;
                }
                let req = self.req();
                self.call_peer(
                    a,
                    Msg::TakeOver {
                        from: a as u8,
                        req,
                        epoch,
                        lsn: checkpoint,
                        kind: PromotionKind::Manual,
                    },
                );
                let limit = self.call_limit(a);
                self.wait_request(a, req, Purpose::Op, limit);
            }
            Stage::Forced { asked: false, .. } => {
                let lsn = self.pg_received(a);
                if let Some(Stage::Forced { asked, received }) = self.stage(a) {
                    *asked = true;
                    *received = lsn;
                }
                let epoch = self.agents[a].durable.epoch;
                match self.agents[a].durable.witness.as_ref().map(witness_of) {
                    Some(witness) => {
                        self.ask_witness_promote(a, witness, epoch, PromotionKind::Forced, lsn)
                    }
                    None => {
                        let agent = &self.agents[a];
                        match forced_service(
                            &agent.durable,
                            &agent.memory,
                            lsn,
                            &WitnessAnswer::NoWitness,
                        ) {
                            Err(_) => self.fail_and_release(a),
                            Ok(decision) => {
                                self.agents[a].promotion =
                                    Promotion::Granted(PromotionKind::Forced);
                                self.check.on_forced_without_witness(epoch.next());
                                self.decide(a, decision, "apply");
                                self.run_actions(a);
                            }
                        }
                    }
                }
            }
            _ => self.release(a),
        }
    }

    /// The mirror waits for the principal's last WAL before it promotes.
    pub fn op_drain(&mut self, a: usize) {
        let Some(running) = self.agents[a].running.as_ref() else {
            return;
        };
        let Stage::TakeOver {
            epoch,
            lsn,
            kind,
            deadline,
            ..
        } = running.stage
        else {
            return;
        };
        if !matches!(running.wait, Wait::Nothing | Wait::Drain) {
            return;
        }
        let received = self.pg_received(a);
        if received.is_some_and(|received| received > lsn) {
            let state = &self.agents[a].durable;
            let current = state.epoch;
            match state.witness.as_ref().map(witness_of) {
                Some(witness) => self.ask_witness_promote(a, witness, current, kind, Some(lsn)),
                None => {
                    let agent = &self.agents[a];
                    match take_over(
                        &agent.durable,
                        &agent.memory,
                        epoch,
                        Some(lsn),
                        &WitnessAnswer::NoWitness,
                    ) {
                        Err(_) => self.fail_and_release(a),
                        Ok(decision) => {
                            self.agents[a].promotion = Promotion::Granted(kind);
                            self.decide(a, decision, "apply");
                            self.run_actions(a);
                        }
                    }
                }
            }
        } else if self.agent_now(a).as_millis() as u64 >= deadline {
            self.log(a, "takeover refused", epoch.0, 0, "drain limit");
            self.fail_and_release(a);
        } else {
            if let Some(running) = self.agents[a].running.as_mut() {
                running.wait = Wait::Drain;
            }
            self.agent_timer(a, 10, AgentEv::Drain);
        }
    }

    pub fn fail_and_release(&mut self, a: usize) {
        if let Some(running) = self.agents[a].running.as_mut() {
            running.failed = true;
        }
        self.release(a);
    }

    /// Releases the lock: answers whoever waits, then the next operation.
    fn release(&mut self, a: usize) {
        let Some(running) = self.agents[a].running.take() else {
            return;
        };
        let ok = !running.failed;
        match running.stage {
            Stage::Tick => self.tick_done(a),
            Stage::Auto { .. } => self.watch_resume(a),
            Stage::TakeOver { from, req, .. } => {
                self.send(a, Proc::Agent(from), Msg::TakeOverReply { req, done: ok });
            }
            Stage::Manual { .. } => self.agents[a].pending_failover = false,
            _ => {}
        }
        if let Some((to, req)) = running.answer_to {
            self.send(a, to, Msg::CommandReply { req, ok });
        }
        self.start_next(a);
    }
}

fn takeover_answer(reply: &Option<Msg>) -> TakeOverAnswer {
    match reply {
        Some(Msg::TakeOverReply { done: true, .. }) => TakeOverAnswer::Done,
        Some(Msg::TakeOverReply { done: false, .. }) => TakeOverAnswer::Refused("refused".into()),
        _ => TakeOverAnswer::Lost("no answer".into()),
    }
}

/// How `ask_witness` ends for a promotion: granted, refused, or (timeout,
/// refused connection) unreachable. In a takeover any answer but a row is
/// a refusal; an unreachable witness lets a manual failover go on.
fn witness_answer(reply: &Option<Msg>) -> WitnessAnswer {
    match reply {
        Some(Msg::Witness {
            reply: WitnessReply::Row(Some(_)),
            ..
        }) => WitnessAnswer::Granted,
        Some(Msg::Witness { .. }) => WitnessAnswer::Refused("refused".into()),
        _ => WitnessAnswer::Unreachable("no answer".into()),
    }
}
