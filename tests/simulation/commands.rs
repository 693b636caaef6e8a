//! Operator commands on an agent, like `src/partner/operations.rs`
//! (`run_command`, `execute`, `release`): under
//! the operations lock the real `commands::check` decides where a command
//! runs (here, or refused; one for the peer is forwarded with the lock
//! released), `commands::apply` what it changes; leaving the witness (SET
//! WITNESS, PARTNER OFF on the principal), manual failover and forced
//! service go on as stages of `ops`.

use pgmirror::control::Command;
use pgmirror::partner::policy::commands::{apply, check, failover_begins, Facts, Plan, Route};
use pgmirror::partner::policy::{Action, Decision};
use pgmirror::roles::Role;

use crate::agent::AgentEv;
use crate::ops::{Purpose, Stage};
use crate::postgres::PgRun;
use crate::world::{witness_of, Msg, Proc, WitnessReply, World};

impl World {
    pub fn begin_command(&mut self, a: usize, command: Command, from: Proc, req: u64) {
        let agent = &self.agents[a];
        let facts = Facts {
            peer_connected: agent.obs.peer.connected,
            witness_connected: agent
                .durable
                .witness
                .as_ref()
                .map(|_| agent.obs.witness.connected),
        };
        match check(&command, &agent.durable, facts) {
            Err(_) => {
                self.hold(a, Stage::Change, Some((from, req)));
                self.log(a, "refused", 0, 0, command_name(&command));
                self.fail_and_release(a);
            }
            Ok(Route::Peer) => {
                // `forward`, with the lock released: the peer may be
                // waiting on this partner (a takeover) while it carries the
                // command out.
                let forwarded = self.req();
                self.log(a, "forward", 0, 0, command_name(&command));
                self.call_peer(
                    a,
                    Msg::Command {
                        from: Proc::Agent(a as u8),
                        req: forwarded,
                        command,
                    },
                );
                self.agents[a].forwards.push((forwarded, (from, req)));
                let limit = self.call_limit(a);
                self.agent_timer(a, limit, AgentEv::ReqTimeout(forwarded));
            }
            Ok(Route::Here) => {
                self.observe(a);
                let agent = &self.agents[a];
                match apply(&command, &agent.durable, &agent.memory, &agent.obs) {
                    Plan::Change(decision) => {
                        self.hold(a, Stage::Change, Some((from, req)));
                        self.decide(a, decision, "apply");
                        self.log(a, "command", 0, 0, command_name(&command));
                        self.run_actions(a);
                    }
                    Plan::LeaveWitness(decision) => {
                        let state = &self.agents[a].durable;
                        let current = state.witness.as_ref().map(witness_of);
                        let epoch = state.epoch;
                        let principal = state.role == Role::Principal;
                        self.hold(
                            a,
                            Stage::LeaveWitness {
                                decision: Some(Box::new(decision.clone())),
                                command: command.clone(),
                            },
                            Some((from, req)),
                        );
                        match current.filter(|_| principal) {
                            // I1-I3 (`release`): the witness the session
                            // leaves is told first (`WitnessRequest::
                            // Detach`): it records the mirror as not
                            // synchronized and grants nothing more for the
                            // session.
                            Some(witness) => {
                                let req = self.req();
                                let name = command_name(&command);
                                self.log(a, "detach", witness as u64, epoch.0, name);
                                self.call_witness(
                                    a,
                                    witness,
                                    Msg::Detach {
                                        from: a as u8,
                                        req,
                                        epoch,
                                    },
                                    Purpose::Op,
                                );
                            }
                            None => self.leave_witness(a, decision),
                        }
                    }
                    Plan::ManualFailover => {
                        let epoch = self.agents[a].durable.epoch.next();
                        self.hold(
                            a,
                            Stage::Manual {
                                handing_over: false,
                            },
                            Some((from, req)),
                        );
                        self.agents[a].pending_failover = true;
                        let decision = failover_begins(&self.agents[a].memory);
                        self.decide(a, decision, "apply");
                        self.log(a, "command", epoch.0, 0, "FAILOVER");
                        self.run_actions(a);
                    }
                    Plan::ForcedService => {
                        self.hold(
                            a,
                            Stage::Forced {
                                received: None,
                                asked: false,
                            },
                            Some((from, req)),
                        );
                        self.log(a, "command", 0, 0, "FORCE_SERVICE_ALLOW_DATA_LOSS");
                        if self.pgs[a].run == PgRun::Stopped {
                            if let Some(running) = self.agents[a].running.as_mut() {
                                running.actions.push_back(Action::StartMirror);
                            }
                        }
                        self.run_actions(a);
                    }
                }
            }
        }
    }
}

impl World {
    /// The answer to a command forwarded to the peer (None: no answer in
    /// time, a refused or broken connection) goes to whoever sent it here.
    pub fn forward_answered(&mut self, a: usize, req: u64, reply: &Option<Msg>) -> bool {
        let forwards = &mut self.agents[a].forwards;
        let Some(index) = forwards.iter().position(|(forwarded, _)| *forwarded == req) else {
            return false;
        };
        let (_, (to, req)) = forwards.swap_remove(index);
        let ok = matches!(reply, Some(Msg::CommandReply { ok: true, .. }));
        self.send_held(a, to, Msg::CommandReply { req, ok });
        true
    }

    /// `release`: the old witness answered the Detach, or did not.
    /// Released: go on. Refused, or not told (no answer, a refused
    /// connection): the command is refused, SET WITNESS like PARTNER OFF
    /// (I1, I3).
    pub fn leave_witness_answered(&mut self, a: usize, reply: Option<Msg>) {
        let Some(Stage::LeaveWitness { decision, command }) = self.stage(a) else {
            return;
        };
        let Some(decision) = decision.take() else {
            return;
        };
        let name = command_name(command);
        match reply {
            Some(Msg::Witness {
                reply: WitnessReply::Row(_),
                ..
            }) => self.leave_witness(a, *decision),
            Some(Msg::Witness {
                reply: WitnessReply::Refused,
                ..
            }) => {
                self.log(a, "refused", 0, 0, "the old witness refused to let go");
                self.refuse_and_release(a);
            }
            _ => {
                self.log(a, "refused", 0, 0, name);
                self.refuse_and_release(a);
            }
        }
    }

    /// The command goes on: the decision persisted, the witness
    /// observation cleared (nothing the old witness said counts for the
    /// new one), then carried out.
    pub fn leave_witness(&mut self, a: usize, decision: Decision) {
        let name = match self.stage(a) {
            Some(Stage::LeaveWitness { command, .. }) => command_name(command),
            _ => "",
        };
        let agent = &mut self.agents[a];
        agent.obs.witness = Default::default();
        agent.report_connected = None;
        self.decide(a, decision, "apply");
        self.log(a, "command", 0, 0, name);
        self.run_actions(a);
    }
}

pub fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Suspend => "SUSPEND",
        Command::Resume => "RESUME",
        Command::Safety(pgmirror::roles::Safety::Full) => "SAFETY FULL",
        Command::Safety(pgmirror::roles::Safety::Off) => "SAFETY OFF",
        Command::Timeout(_) => "TIMEOUT",
        Command::Failover => "FAILOVER",
        Command::ForceServiceAllowDataLoss => "FORCE_SERVICE_ALLOW_DATA_LOSS",
        Command::Off => "PARTNER OFF",
        Command::Witness(Some(_)) => "SET WITNESS",
        Command::Witness(None) => "WITNESS OFF",
    }
}
