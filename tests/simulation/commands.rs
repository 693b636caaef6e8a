//! Operator commands on an agent, under its operations lock: the real
//! `commands::check` decides where a command runs (here, forwarded to the
//! principal, or refused), `commands::apply` what it changes; SET WITNESS,
//! manual failover and forced service go on as stages of `ops`, like
//! `src/partner/operations.rs`.

use pgmirror::control::Command;
use pgmirror::partner::policy::commands::{apply, check, failover_begins, Facts, Plan, Route};
use pgmirror::partner::policy::Action;
use pgmirror::roles::Role;

use crate::ops::{Purpose, Stage};
use crate::postgres::PgRun;
use crate::world::{witness_of, Msg, Proc, World};

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
                self.hold(a, Stage::Forward, Some((from, req)));
                let forwarded = self.req();
                self.call_peer(
                    a,
                    Msg::Command {
                        from: Proc::Agent(a as u8),
                        req: forwarded,
                        command,
                    },
                );
                let limit = self.call_limit(a);
                self.wait_request(a, forwarded, Purpose::Op, limit);
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
                            Stage::MoveWitness {
                                decision: Box::new(decision.clone()),
                            },
                            Some((from, req)),
                        );
                        match current.filter(|_| principal) {
                            // I2, I3: the witness the session leaves is
                            // told first (`WitnessRequest::Detach`): it
                            // records the mirror as not synchronized and
                            // grants nothing more for the session.
                            Some(witness) => {
                                let req = self.req();
                                self.log(a, "detach", witness as u64, epoch.0, "old witness");
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
                            None => self.move_witness(a, decision),
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
