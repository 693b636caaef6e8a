//! The partner agent process: its durable SessionState (kept across kill
//! -9), its volatile policy Memory, lease and observations (lost), and the
//! loops of `src/partner/peer.rs`, `quorum.rs` and `supervisor.rs` on
//! simulated time (the rounds themselves and the control API's answers
//! are in `peer.rs`): the peer ping and the witness report every TIMEOUT/5
//! (200 ms..2 s) with TIMEOUT to answer (an answered one renews the lease
//! from its send time), the supervisor tick every 500 ms and the quorum
//! watch every 100 ms (the fence outside the operations lock, the
//! automatic failover request under it). A mirror refusing its principal
//! answers its pings with Refused. A frozen agent (SIGSTOP) defers every
//! timer and message until SIGCONT; its PostgreSQL keeps running until its
//! fence process (`fence.rs`, fed by the watch) kills it at the lease's end;
//! a killed agent's fence kills PostgreSQL at once.

use std::collections::VecDeque;
use std::time::Duration;

use pgmirror::control::{MirroringStatus, PeerView};
use pgmirror::partner::policy::{
    automatic_failover, fence_order, quorum_check, Memory, Observation, PeerObservation,
    PostgresObservation, WitnessObservation,
};
use pgmirror::partner::state::SessionState;
use pgmirror::roles::{lease_length, Epoch, MirroringState, Role, Safety};

use crate::ops::{Op, Running, Stage};
use crate::postgres::PgRun;
use crate::world::{witness_endpoint, Msg, Proc, World, E, HOST_NAMES, SESSION};

/// The system identifier initdb gives the principal's cluster.
pub const SYSTEM_IDENTIFIER: u64 = 7_000_000_007;
const TICK_MS: u64 = 500;
const WATCH_MS: u64 = 100;
/// `quorum::PROMOTION_RETRY`.
const PROMOTION_RETRY_MS: u64 = 200;
/// How long an agent that runs again may take to stop a PostgreSQL whose
/// lease ended while it could not: its first tick (500 ms) and
/// `roles::lease::STOP_BOUND`.
const RETURN_BOUND_MS: u64 = TICK_MS + 1000;

#[derive(Debug, Clone, Copy)]
pub enum AgentEv {
    Tick,
    Watch,
    /// `quorum::feed_fence`: its own task, never blocked.
    Feed,
    Ping,
    Report,
    ActionDone(u64),
    Drain,
    ReqTimeout(u64),
}

pub struct Agent {
    pub durable: SessionState,
    pub alive: bool,
    pub frozen: bool,
    /// Incarnation: events of a killed process are void.
    pub gen: u32,
    /// Its host clock's reading when this process started.
    pub started_local: u64,
    pub deferred: Vec<E>,
    pub memory: Memory,
    /// What the policy sees; `lease_from` and `answered_principal_at` are
    /// the agent's own (`Agent::renew_lease`, `answered_principal`).
    pub obs: Observation,
    pub pending_failover: bool,
    pub ping_req: u64,
    /// When the ping in flight was sent, on this agent's clock.
    pub ping_sent: Duration,
    pub report_req: u64,
    pub report_sent: Duration,
    /// The ping loop's control connection is established.
    pub ping_connected: bool,
    /// Commands forwarded to the peer outside the operations lock
    /// (`operations::forward`): the forwarded request and who gets its
    /// answer.
    pub forwards: Vec<(u64, (Proc, u64))>,
    /// The report loop's connection, to which witness.
    pub report_connected: Option<usize>,
    pub running: Option<Running>,
    pub queue: VecDeque<Op>,
    pub watch_blocked: bool,
    pub last_auto_request: Option<u64>,
    /// For the checker: the host clock's reading at the send of the last
    /// round trip that renewed a lease of this agent (any incarnation).
    pub lease_from_local: Option<u64>,
    /// For the checker: the host clock's reading when this agent last
    /// started or was thawed.
    pub available_since_local: u64,
    /// For the checker: at that return its lease had ended while it was
    /// away (any lease it renews since does not make its PostgreSQL fenced).
    pub returned_lapsed: bool,
}

impl Agent {
    pub fn new(idx: usize, timeout_secs: u64, witness: bool) -> Self {
        let role = if idx == 0 {
            Role::Principal
        } else {
            Role::Mirror
        };
        let mut durable = SessionState::new(role, Safety::Full, timeout_secs);
        durable.witness = witness.then(|| witness_endpoint(0));
        durable.session = Some(SESSION.to_string());
        Agent {
            durable,
            alive: false,
            frozen: false,
            gen: 0,
            started_local: 0,
            deferred: Vec::new(),
            memory: Memory::default(),
            obs: Observation {
                now: Duration::ZERO,
                name: HOST_NAMES[idx].to_string(),
                pg_major: 15,
                peer: PeerObservation::default(),
                witness: WitnessObservation::default(),
                postgres: PostgresObservation::Stopped,
                lease_from: None,
                answered_principal_at: None,
            },
            pending_failover: false,
            ping_req: 0,
            ping_sent: Duration::ZERO,
            report_req: 0,
            report_sent: Duration::ZERO,
            ping_connected: false,
            forwards: Vec::new(),
            report_connected: None,
            running: None,
            queue: VecDeque::new(),
            watch_blocked: false,
            last_auto_request: None,
            lease_from_local: None,
            available_since_local: 0,
            returned_lapsed: false,
        }
    }

    pub fn timeout_ms(&self) -> u64 {
        self.durable.timeout_secs * 1000
    }

    /// `Agent::ping_every`: a fifth of the lease's TIMEOUT (the smaller of
    /// its own and the witness row's), 200 ms to 2 s.
    pub fn interval_ms(&self) -> u64 {
        let row = self
            .obs
            .witness
            .row
            .as_ref()
            .map(|row| row.timeout_secs * 1000);
        let lease = row.map_or(self.timeout_ms(), |row| row.min(self.timeout_ms()));
        (lease / 5).clamp(200, 2000)
    }

    /// `agent::shown`: until a promotion and its checkpoint are done the
    /// partner shows itself as the mirror of the previous epoch (I3).
    pub fn shown(&self) -> (Role, Epoch) {
        let state = &self.durable;
        if state.promoting {
            (Role::Mirror, Epoch(state.epoch.0.saturating_sub(1)))
        } else {
            (state.role, state.epoch)
        }
    }
}

impl World {
    pub fn agent_timer(&mut self, a: usize, local_ms: u64, ev: AgentEv) {
        let gen = self.agents[a].gen;
        self.after_local(
            a,
            local_ms,
            E::Agent {
                a: a as u8,
                gen,
                ev,
            },
        );
    }

    /// Now on agent `a`'s clock, since its process started.
    pub fn agent_now(&self, a: usize) -> Duration {
        self.since(a, self.agents[a].started_local)
    }

    fn agent_now_ms(&self, a: usize) -> u64 {
        self.agent_now(a).as_millis() as u64
    }

    /// Starts the agent process (first start or restart after kill -9).
    pub fn agent_start(&mut self, a: usize) {
        let local = self.local_ms(a);
        let lapsed = self.gen_lapsed(a);
        self.fence_start(a);
        let agent = &mut self.agents[a];
        agent.returned_lapsed = lapsed;
        agent.alive = true;
        agent.frozen = false;
        agent.gen += 1;
        agent.started_local = local;
        agent.available_since_local = local;
        agent.deferred.clear();
        agent.memory = Memory::new(Duration::ZERO);
        agent.obs.peer = PeerObservation::default();
        agent.obs.witness = WitnessObservation::default();
        agent.obs.lease_from = None;
        agent.obs.answered_principal_at = None;
        agent.pending_failover = false;
        agent.ping_req = 0;
        agent.report_req = 0;
        agent.ping_connected = false;
        agent.forwards.clear();
        agent.report_connected = None;
        agent.running = None;
        agent.queue.clear();
        agent.watch_blocked = false;
        agent.last_auto_request = None;
        let gen = agent.gen as u64;
        self.log(a, "agent start", gen, 0, "");
        self.agent_timer(a, TICK_MS, AgentEv::Tick);
        self.agent_timer(a, WATCH_MS, AgentEv::Watch);
        self.agent_timer(a, WATCH_MS, AgentEv::Feed);
        self.agent_timer(a, 1, AgentEv::Ping);
        self.agent_timer(a, 1, AgentEv::Report);
    }

    pub fn agent_restart(&mut self, a: usize) {
        if !self.agents[a].alive {
            self.agent_start(a);
        }
    }

    /// kill -9: the process and its relays die; PostgreSQL does not.
    pub fn agent_kill(&mut self, a: usize) {
        if !self.agents[a].alive {
            return;
        }
        self.agents[a].alive = false;
        self.agents[a].frozen = false;
        // Its kernel closes its connections: whoever waits for an answer
        // gets an error, over a cut link once it heals (TCP retransmits
        // the FIN like data).
        let mut waiting = Vec::new();
        for e in std::mem::take(&mut self.agents[a].deferred) {
            if let E::Deliver { msg, .. } = e {
                waiting.extend(msg.requester());
            }
        }
        let forwards = std::mem::take(&mut self.agents[a].forwards);
        waiting.extend(forwards.into_iter().map(|(_, to)| to));
        if let Some(running) = self.agents[a].running.take() {
            waiting.extend(running.answer_to);
            if let Stage::TakeOver { from, req, .. } = running.stage {
                waiting.push((Proc::Agent(from), req));
            }
        }
        for op in std::mem::take(&mut self.agents[a].queue) {
            match op {
                Op::Command { from, req, .. } => waiting.push((from, req)),
                Op::TakeOver { from, req, .. } => waiting.push((Proc::Agent(from), req)),
                Op::Tick | Op::AutoFailover => {}
            }
        }
        for (to, req) in waiting {
            self.send_held(a, to, Msg::Nack { req });
        }
        self.close_streams(a);
        self.log(a, "agent killed", 0, 0, "");
        // Its pipe closes: the fence kills PostgreSQL at once.
        self.fence_agent_gone(a);
    }

    pub fn agent_freeze(&mut self, a: usize) {
        if self.agents[a].alive {
            self.agents[a].frozen = true;
            self.log(a, "agent SIGSTOP", 0, 0, "");
        }
    }

    pub fn agent_thaw(&mut self, a: usize) {
        if !self.agents[a].frozen {
            return;
        }
        self.agents[a].returned_lapsed = self.gen_lapsed(a);
        self.agents[a].frozen = false;
        self.agents[a].available_since_local = self.local_ms(a);
        self.log(a, "agent SIGCONT", 0, 0, "");
        // Expired timers and buffered messages run now, in their order.
        let deferred = std::mem::take(&mut self.agents[a].deferred);
        for e in deferred {
            self.after(0, e);
        }
        self.stream_kick();
    }

    /// The fence's gap (DESIGN.md I1): agent `p` (with a witness, so with
    /// a lease) could not stop its PostgreSQL when its lease ended, and its
    /// fence (`fence.rs`) did not kill it: it had no deadline for it (it is
    /// fed only by the quorum watch, which does not run while it waits for
    /// or holds the operations lock). Either the agent is frozen or dead
    /// now and its lease is over, or it runs again since less than its
    /// first tick and the stop bound, and its lease had ended while it was
    /// away (a lease it renews on its return does not undo that: the
    /// witness may have granted the role meanwhile).
    pub fn unfenced(&self, p: usize) -> bool {
        let agent = &self.agents[p];
        if agent.durable.witness.is_none() {
            return false;
        }
        if !agent.alive || agent.frozen {
            return self.lease_over(p);
        }
        agent.returned_lapsed && self.local_ms(p) < agent.available_since_local + RETURN_BOUND_MS
    }

    /// Agent `p`'s last lease (any incarnation) has ended, on its clock.
    fn lease_over(&self, p: usize) -> bool {
        let agent = &self.agents[p];
        let length = lease_length(agent.durable.timeout()).as_millis() as u64;
        let end = agent.lease_from_local.map(|from| from + length);
        end.is_none_or(|end| self.local_ms(p) >= end)
    }

    /// At its return (start, SIGCONT): whether agent `p` was away with a
    /// lease that ended meanwhile and its PostgreSQL still running.
    fn gen_lapsed(&self, p: usize) -> bool {
        self.agents[p].durable.witness.is_some()
            && matches!(self.pgs[p].run, PgRun::Principal | PgRun::Stopping)
            && self.lease_over(p)
    }

    /// What this partner tells its peer and the witness (`Agent::view`).
    pub fn agent_view(&self, a: usize) -> PeerView {
        let agent = &self.agents[a];
        let state = &agent.durable;
        let (role, epoch) = agent.shown();
        PeerView {
            session: SESSION.to_string(),
            name: agent.obs.name.clone(),
            role,
            epoch,
            state: if agent.pending_failover {
                MirroringState::PendingFailover
            } else {
                state.state
            },
            safety: state.safety,
            timeout_secs: state.timeout_secs,
            suspended: state.suspended,
            ended: state.ended,
            system_identifier: state.has_copy.then_some(state.system_identifier).flatten(),
            pg_major: 15,
            safety_sequence: state.safety_sequence,
            witness: state.witness.clone(),
            witness_id: agent
                .obs
                .witness
                .row
                .as_ref()
                .filter(|_| state.witness.is_some())
                .map(|row| row.witness_id),
            figures: None,
        }
    }

    /// The row of sys.database_mirroring the proxy polls.
    pub fn agent_status(&self, a: usize) -> MirroringStatus {
        let agent = &self.agents[a];
        let state = &agent.durable;
        let mut status = MirroringStatus {
            database_name: SESSION.to_string(),
            server_name: agent.obs.name.clone(),
            postgres_address: format!("{}:5432", HOST_NAMES[a]),
            peer_connected: agent.obs.peer.connected,
            ..MirroringStatus::default()
        };
        if state.ended {
            status.ended_as = Some(pgmirror::control::EndedAs {
                role: state.role,
                epoch: state.epoch,
            });
            return status;
        }
        let shown = if agent.pending_failover {
            MirroringState::PendingFailover
        } else {
            state.state
        };
        let (role, epoch) = agent.shown();
        status.mirroring_state = Some(shown.code());
        status.mirroring_state_desc = Some(shown.desc().into());
        status.mirroring_role = Some(match role {
            Role::Principal => 1,
            Role::Mirror => 2,
        });
        status.mirroring_role_desc = Some(role.to_string());
        status.mirroring_role_sequence = Some(epoch.0);
        status
    }

    /// Observation as of now (the supervisor reads PostgreSQL first).
    pub fn observe(&mut self, a: usize) {
        let postgres = self.pg_observe(a);
        self.observe_as(a, postgres);
    }

    /// Observation as of now with `postgres` as read.
    pub fn observe_as(&mut self, a: usize, postgres: PostgresObservation) {
        let now = self.agent_now(a);
        let obs = &mut self.agents[a].obs;
        obs.now = now;
        obs.postgres = postgres;
    }

    pub fn agent_event(&mut self, a: usize, ev: AgentEv) {
        match ev {
            AgentEv::Tick => self.enqueue(a, Op::Tick),
            AgentEv::Watch => self.watch(a),
            AgentEv::Feed => {
                self.feed_fence(a);
                self.agent_timer(a, WATCH_MS, AgentEv::Feed);
            }
            AgentEv::Ping => self.ping_peer(a),
            AgentEv::Report => self.report_witness(a),
            AgentEv::ActionDone(token) => self.action_done(a, token),
            AgentEv::Drain => self.op_drain(a),
            AgentEv::ReqTimeout(req) => self.request_failed(a, req),
        }
    }

    /// `quorum::observe_without_sql`: only whether a postmaster runs.
    fn observe_without_sql(&mut self, a: usize) {
        let postgres = if self.pgs[a].run == PgRun::Stopped {
            PostgresObservation::Stopped
        } else {
            PostgresObservation::Unreadable
        };
        self.observe_as(a, postgres);
    }

    /// `quorum::feed_fence`: the lease to the fence process, every 100 ms
    /// and at once when the durable role changes, never behind a lock.
    pub fn feed_fence(&mut self, a: usize) {
        self.observe_without_sql(a);
        let agent = &self.agents[a];
        let order = fence_order(&agent.durable, &agent.obs);
        self.fence_order(a, order);
    }

    /// The quorum watch (`quorum::watch_quorum`), ten times a second: the
    /// quorum check outside the operations lock, then the automatic
    /// failover decision, carried out under the lock.
    fn watch(&mut self, a: usize) {
        if self.agents[a].watch_blocked {
            return;
        }
        self.observe_without_sql(a);
        let agent = &self.agents[a];
        let fence = quorum_check(&agent.durable, &agent.memory, &agent.obs);
        self.agents[a].memory = fence.memory;
        if !fence.actions.is_empty() {
            self.log(
                a,
                "no quorum",
                0,
                0,
                "lease ended: stopping PostgreSQL immediately",
            );
            // carry_out waits for the stop before the watch goes on.
            let delay = self.pg_stop(a, true);
            self.agent_timer(a, delay + WATCH_MS, AgentEv::Watch);
            return;
        }
        let agent = &self.agents[a];
        let wanted = automatic_failover(&agent.durable, &agent.memory, &agent.obs);
        let refusing = wanted.memory.refusing_principal;
        if refusing != self.agents[a].memory.refusing_principal {
            let note = if refusing {
                "refusing the principal's pings"
            } else {
                "answering the principal again"
            };
            self.log(a, "refusing", u64::from(refusing), 0, note);
        }
        self.agents[a].memory = wanted.memory;
        let now = self.agent_now_ms(a);
        let may_ask = self.agents[a]
            .last_auto_request
            .is_none_or(|last| now.saturating_sub(last) >= PROMOTION_RETRY_MS);
        if !wanted.actions.is_empty() && may_ask {
            self.agents[a].last_auto_request = Some(now);
            self.agents[a].watch_blocked = true;
            self.enqueue(a, Op::AutoFailover);
            return;
        }
        self.agent_timer(a, WATCH_MS, AgentEv::Watch);
    }

    /// The automatic failover request finished: the watch goes on.
    pub fn watch_resume(&mut self, a: usize) {
        if self.agents[a].watch_blocked {
            self.agents[a].watch_blocked = false;
            self.agent_timer(a, WATCH_MS, AgentEv::Watch);
        }
    }

    pub fn tick_done(&mut self, a: usize) {
        self.agent_timer(a, TICK_MS, AgentEv::Tick);
    }
}
