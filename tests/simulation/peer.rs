//! The agent's peer ping and witness report loops and its answers on the
//! control API, like `src/partner/peer.rs` (`ping_peer`), `quorum.rs`
//! (`ping_witness`) and `operations.rs` (`answer_ping`): an answered ping
//! or report renews the lease from its send time, unless it names a
//! principal at a later epoch than this agent's (I1); a partner whose
//! promotion is not shown yet refuses the ping of a principal of an earlier
//! epoch, a mirror refusing its principal answers Refused.

use std::time::Duration;

use pgmirror::control::PeerView;
use pgmirror::partner::policy::{refuses_principal, WitnessObservation};
use pgmirror::roles::Role;

use crate::agent::AgentEv;
use crate::ops::Op;
use crate::postgres::PgRun;
use crate::world::{witness_of, Msg, Proc, WitnessReply, World, WIT_A};

impl World {
    /// A round trip sent at `sent` (agent clock) was answered by the
    /// witness or the peer: the lease runs from there (`renew_lease`).
    pub fn renew_lease(&mut self, a: usize, sent: Duration) {
        let agent = &mut self.agents[a];
        agent.obs.lease_from = agent.obs.lease_from.max(Some(sent));
        let local = agent.started_local + sent.as_millis() as u64;
        agent.lease_from_local = agent.lease_from_local.max(Some(local));
    }

    pub fn ping_peer(&mut self, a: usize) {
        let req = self.req();
        self.agents[a].ping_req = req;
        self.agents[a].ping_sent = self.agent_now(a);
        let view = self.agent_view(a);
        // A new connection needs both directions (SYN, SYN-ACK); an
        // established one carries the request one way.
        if self.agents[a].ping_connected || self.both_ways(a, 1 - a) {
            self.agents[a].ping_connected = true;
            self.send(
                a,
                Proc::Agent((1 - a) as u8),
                Msg::Ping {
                    from: a as u8,
                    req,
                    view,
                },
            );
        }
        let timeout = self.agents[a].timeout_ms();
        self.agent_timer(a, timeout, AgentEv::ReqTimeout(req));
    }

    pub fn report_witness(&mut self, a: usize) {
        let Some(witness) = self.agents[a].durable.witness.as_ref().map(witness_of) else {
            self.agents[a].obs.witness = WitnessObservation::default();
            self.agents[a].report_connected = None;
            let interval = self.agents[a].interval_ms();
            self.agent_timer(a, interval, AgentEv::Report);
            return;
        };
        if self.agents[a]
            .report_connected
            .is_some_and(|connected| connected != witness)
        {
            // Another witness: nothing the old one said counts there.
            self.agents[a].obs.witness = WitnessObservation::default();
            self.agents[a].report_connected = None;
        }
        let req = self.req();
        self.agents[a].report_req = req;
        self.agents[a].report_sent = self.agent_now(a);
        let view = self.agent_view(a);
        let connected = self.agents[a].report_connected == Some(witness);
        if connected || self.both_ways(a, WIT_A + witness) {
            self.agents[a].report_connected = Some(witness);
            self.send(
                a,
                Proc::Witness(witness as u8),
                Msg::Report {
                    from: a as u8,
                    req,
                    view,
                },
            );
        }
        let timeout = self.agents[a].timeout_ms();
        self.agent_timer(a, timeout, AgentEv::ReqTimeout(req));
    }

    fn peer_heard(&mut self, a: usize, view: PeerView) {
        let peer = &mut self.agents[a].obs.peer;
        if !peer.connected {
            self.log(a, "peer connected", view.epoch.0, 0, "");
        }
        let peer = &mut self.agents[a].obs.peer;
        peer.connected = true;
        peer.view = Some(view);
    }

    fn peer_lost(&mut self, a: usize) {
        if self.agents[a].obs.peer.connected {
            self.agents[a].obs.peer.connected = false;
            self.log(a, "peer lost", 0, 0, "");
            self.close_streams(a);
        }
    }

    fn witness_lost(&mut self, a: usize) {
        if self.agents[a].obs.witness.connected {
            self.agents[a].obs.witness.connected = false;
            self.log(a, "witness lost", 0, 0, "");
        }
    }

    /// A request of agent `a` got no answer in time, or was refused.
    pub fn request_failed(&mut self, a: usize, req: u64) {
        if req == self.agents[a].ping_req {
            self.agents[a].ping_req = 0;
            self.agents[a].ping_connected = false;
            self.peer_lost(a);
            // A refused connection sleeps; a timed-out one reconnects at once
            // (the connect then waits TIMEOUT itself).
            self.agent_timer(a, 1, AgentEv::Ping);
        } else if req == self.agents[a].report_req {
            self.agents[a].report_req = 0;
            self.agents[a].report_connected = None;
            self.witness_lost(a);
            self.agent_timer(a, 1, AgentEv::Report);
        } else {
            self.op_reply(a, req, None);
        }
    }

    pub fn agent_message(&mut self, a: usize, msg: Msg) {
        match msg {
            Msg::Ping { from, req, view } => self.answer_ping(a, from, req, view),
            Msg::Pong { req, view } if req == self.agents[a].ping_req => {
                self.agents[a].ping_req = 0;
                // A peer that is principal at a later epoch answers, but
                // grants no lease (I1).
                let later =
                    view.role == Role::Principal && view.epoch > self.agents[a].durable.epoch;
                if !later {
                    let sent = self.agents[a].ping_sent;
                    self.renew_lease(a, sent);
                }
                self.peer_heard(a, view);
                let interval = self.agents[a].interval_ms();
                self.agent_timer(a, interval, AgentEv::Ping);
            }
            Msg::PingRefused { req } if req == self.agents[a].ping_req => {
                // `ping_peer`: a refusal marks the peer lost and reconnects
                // at once.
                self.agents[a].ping_req = 0;
                self.agents[a].ping_connected = false;
                self.peer_lost(a);
                self.agent_timer(a, 1, AgentEv::Ping);
            }
            Msg::Nack { req } if req == self.agents[a].ping_req => {
                self.agents[a].ping_req = 0;
                self.agents[a].ping_connected = false;
                self.peer_lost(a);
                let interval = self.agents[a].interval_ms();
                self.agent_timer(a, interval, AgentEv::Ping);
            }
            Msg::Witness { req, reply } if req == self.agents[a].report_req => {
                self.agents[a].report_req = 0;
                match reply {
                    WitnessReply::Row(row) => {
                        // A row naming another principal at a later epoch
                        // grants no lease (I1).
                        let agent = &self.agents[a];
                        let superseded = row.as_ref().is_some_and(|row| {
                            row.epoch > agent.durable.epoch && row.principal != agent.obs.name
                        });
                        if !superseded {
                            let sent = self.agents[a].report_sent;
                            self.renew_lease(a, sent);
                        }
                        let witness = &mut self.agents[a].obs.witness;
                        if !witness.connected {
                            self.log(a, "witness connected", 0, 0, "");
                        }
                        let witness = &mut self.agents[a].obs.witness;
                        witness.connected = true;
                        witness.row = row;
                    }
                    WitnessReply::Refused => {
                        self.agents[a].report_connected = None;
                        self.witness_lost(a);
                    }
                }
                let interval = self.agents[a].interval_ms();
                self.agent_timer(a, interval, AgentEv::Report);
            }
            Msg::Nack { req } if req == self.agents[a].report_req => {
                self.agents[a].report_req = 0;
                self.agents[a].report_connected = None;
                self.witness_lost(a);
                let interval = self.agents[a].interval_ms();
                self.agent_timer(a, interval, AgentEv::Report);
            }
            Msg::Status { req } => {
                let status = self.agent_status(a);
                if status.mirroring_role == Some(1) && self.pgs[a].run == PgRun::Mirror {
                    // I3: the new role is shown before the promotion is done.
                    let t = self.t;
                    self.check.on_shown_early(t, &mut self.trace);
                }
                self.send(
                    a,
                    Proc::Proxy,
                    Msg::StatusReply {
                        req,
                        status: Box::new(status),
                    },
                );
            }
            Msg::Command { from, req, command } => {
                self.enqueue(a, Op::Command { command, from, req })
            }
            Msg::TakeOver {
                from,
                req,
                epoch,
                lsn,
                kind,
            } => self.enqueue(
                a,
                Op::TakeOver {
                    from,
                    req,
                    epoch,
                    lsn,
                    kind,
                },
            ),
            Msg::Nack { req } | Msg::PingRefused { req } => self.op_reply(a, req, None),
            reply
            @ (Msg::Witness { .. } | Msg::CommandReply { .. } | Msg::TakeOverReply { .. }) => {
                let req = match &reply {
                    Msg::Witness { req, .. }
                    | Msg::CommandReply { req, .. }
                    | Msg::TakeOverReply { req, .. } => *req,
                    _ => 0,
                };
                self.op_reply(a, req, Some(reply));
            }
            _ => {}
        }
    }

    /// `operations::answer_ping`: a partner whose promotion is not shown
    /// yet (durable `promoting`) refuses the ping of a principal of an
    /// earlier epoch, since its Pong would look like a mirror's (I1); once
    /// shown, the Pong tells the old principal to step down and renews no
    /// lease there. A mirror that is asking the witness for the principal
    /// role (`policy::refuses_principal`) refuses its principal's ping (I1);
    /// otherwise it records the peer and, for its principal, when it
    /// answered.
    fn answer_ping(&mut self, a: usize, from: u8, req: u64, view: PeerView) {
        let state = &self.agents[a].durable;
        if state.promoting && view.role == Role::Principal && view.epoch < state.epoch {
            self.send(a, Proc::Agent(from), Msg::PingRefused { req });
            return;
        }
        let from_principal = view.role == Role::Principal && state.role == Role::Mirror;
        if from_principal && refuses_principal(state, &self.agents[a].memory) {
            self.send(a, Proc::Agent(from), Msg::PingRefused { req });
            return;
        }
        self.peer_heard(a, view);
        if from_principal {
            self.agents[a].obs.answered_principal_at = Some(self.agent_now(a));
        }
        let view = self.agent_view(a);
        self.send(a, Proc::Agent(from), Msg::Pong { req, view });
    }
}
