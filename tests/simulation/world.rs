//! The simulated world: hosts with drifting clocks, links with delay, loss
//! and partitions, one event queue ordered by (time, sequence), and the
//! dispatch of each event to the model that owns it. Every other file of
//! the simulation adds the behaviour of one kind of node to [`World`].

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use pgmirror::config::Endpoint;
use pgmirror::control::{Command, MirroringStatus, PeerView, PromotionKind, RoleRow};
use pgmirror::roles::Epoch;
use pgmirror::wire::lsn::Lsn;

use crate::agent::{Agent, AgentEv};
use crate::checker::Checker;
use crate::faults::{FaultCounts, Scenario};
use crate::fence::Fence;
use crate::postgres::{Pg, PgEv, TxnAck};
use crate::proxy::Proxy;
use crate::rng::Rng;
use crate::stream::Stream;
use crate::trace::{Line, Trace};
use crate::witness::{Witness, WitnessEv};

pub const ALPHA: usize = 0;
pub const BETA: usize = 1;
pub const WIT_A: usize = 2;
pub const WIT_B: usize = 3;
pub const PROXY: usize = 4;
pub const HOSTS: usize = 5;
pub const HOST_NAMES: [&str; HOSTS] = ["alpha", "beta", "witness-a", "witness-b", "proxy"];
pub const SESSION: &str = "shop";

/// The endpoint of witness `w` (0 or 1) as the operator types it.
pub fn witness_endpoint(w: usize) -> Endpoint {
    Endpoint {
        host: HOST_NAMES[WIT_A + w].to_string(),
        port: 7000,
    }
}

/// Which witness process (0 or 1) an endpoint names.
pub fn witness_of(endpoint: &Endpoint) -> usize {
    usize::from(endpoint.host == HOST_NAMES[WIT_B])
}

/// A process messages are delivered to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    Agent(u8),
    Witness(u8),
    /// The proxy, and the operator's console beside it.
    Proxy,
}

impl Proc {
    pub fn host(self) -> usize {
        match self {
            Proc::Agent(a) => a as usize,
            Proc::Witness(w) => WIT_A + w as usize,
            Proc::Proxy => PROXY,
        }
    }
}

/// The witness's answer to a request: a row, or a refusal.
#[derive(Debug, Clone)]
pub enum WitnessReply {
    Row(Option<RoleRow>),
    Refused,
}

/// Control messages between processes (the agents' control API, the
/// witness protocol, the proxy's status polls).
#[derive(Debug, Clone)]
pub enum Msg {
    Ping {
        from: u8,
        req: u64,
        view: PeerView,
    },
    Pong {
        req: u64,
        view: PeerView,
    },
    /// Connection refused (the process is dead) or reset.
    Nack {
        req: u64,
    },
    /// A ping answered with Refused (a mirror refusing its principal).
    PingRefused {
        req: u64,
    },
    Report {
        from: u8,
        req: u64,
        view: PeerView,
    },
    SetSync {
        from: u8,
        req: u64,
        epoch: Epoch,
        synchronized: bool,
        based_on: Option<u64>,
    },
    Promote {
        from: u8,
        req: u64,
        epoch: Epoch,
        kind: PromotionKind,
        lsn: Option<Lsn>,
        /// `principal_answered_ago_ms` of the request.
        answered_ago_ms: Option<u64>,
    },
    Witness {
        req: u64,
        reply: WitnessReply,
    },
    Status {
        req: u64,
    },
    StatusReply {
        req: u64,
        status: Box<MirroringStatus>,
    },
    Command {
        from: Proc,
        req: u64,
        command: Command,
    },
    CommandReply {
        req: u64,
        ok: bool,
    },
    TakeOver {
        from: u8,
        req: u64,
        epoch: Epoch,
        lsn: Lsn,
        kind: PromotionKind,
    },
    TakeOverReply {
        req: u64,
        answer: TakeOverOutcome,
    },
    /// SET WITNESS: the principal leaves witness `to` (`WitnessRequest::Detach`).
    Detach {
        from: u8,
        req: u64,
        epoch: Epoch,
    },
}

/// How the mirror's `take_over` ended: Done, `OpError::Refused` (answered
/// Refused) or another error (answered Failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOverOutcome {
    Done,
    Refused,
    Failed,
}

impl Msg {
    /// Who waits for an answer to this request, if it is one.
    pub fn requester(&self) -> Option<(Proc, u64)> {
        match self {
            Msg::Ping { from, req, .. }
            | Msg::Report { from, req, .. }
            | Msg::SetSync { from, req, .. }
            | Msg::Detach { from, req, .. }
            | Msg::Promote { from, req, .. }
            | Msg::TakeOver { from, req, .. } => Some((Proc::Agent(*from), *req)),
            Msg::Status { req } => Some((Proc::Proxy, *req)),
            Msg::Command { from, req, .. } => Some((*from, *req)),
            _ => None,
        }
    }
}

/// Everything that happens, at a time.
pub enum E {
    Agent {
        a: u8,
        gen: u32,
        ev: AgentEv,
    },
    AgentRestart {
        a: u8,
    },
    Thaw {
        a: u8,
    },
    /// The timer of agent `a`'s fence process.
    Fence {
        a: u8,
        timer: u32,
    },
    Deliver {
        to: Proc,
        msg: Box<Msg>,
    },
    Pg {
        p: u8,
        pgen: u32,
        ev: PgEv,
    },
    Ship {
        sgen: u32,
        upto: u32,
    },
    StreamAck {
        sgen: u32,
        flush: u32,
    },
    Witness {
        w: u8,
        gen: u32,
        ev: WitnessEv,
    },
    WitnessRestart {
        w: u8,
    },
    ProxyPoll,
    ProxyTimeout {
        req: u64,
    },
    ClientGo {
        c: u8,
    },
    ClientTimeout {
        c: u8,
        txn: u64,
        cancelled: bool,
    },
    TxnArrive {
        p: u8,
        c: u8,
        txn: u64,
    },
    TxnCancel {
        p: u8,
        c: u8,
        txn: u64,
    },
    TxnReply {
        c: u8,
        txn: u64,
        ack: Option<TxnAck>,
    },
    LinkHeal {
        from: u8,
        to: u8,
    },
    Fault,
    FaultPhaseEnd,
    OperatorHeal,
}

struct Ev {
    t: u64,
    seq: u64,
    e: E,
}

impl PartialEq for Ev {
    fn eq(&self, other: &Self) -> bool {
        (self.t, self.seq) == (other.t, other.seq)
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ev {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest (time, sequence) first.
        (other.t, other.seq).cmp(&(self.t, self.seq))
    }
}

/// A host's clock: rate in parts per million of true time.
#[derive(Clone, Copy)]
pub struct Clock {
    pub rate_ppm: u64,
    base_true: u64,
    base_local: u64,
}

/// One direction of a link between two hosts.
#[derive(Clone, Copy)]
pub struct Link {
    /// Partitions in force (overlapping faults each add one).
    pub down: u8,
    pub delay_min: u64,
    pub delay_max: u64,
    /// Per mille of messages that need a retransmission (extra delay).
    pub loss: u64,
}

impl Link {
    pub fn up(&self) -> bool {
        self.down == 0
    }
}

pub struct World {
    pub t: u64,
    seq: u64,
    queue: BinaryHeap<Ev>,
    pub rng: Rng,
    pub clocks: [Clock; HOSTS],
    pub links: [[Link; HOSTS]; HOSTS],
    pub agents: [Agent; 2],
    pub fences: [Fence; 2],
    pub pgs: [Pg; 2],
    pub stream: Option<Stream>,
    pub sgen: u32,
    pub witnesses: [Witness; 2],
    pub proxy: Proxy,
    pub check: Checker,
    pub trace: Trace,
    pub faults: FaultCounts,
    pub scenario: Scenario,
    pub next_req: u64,
    pub next_rid: u32,
    pub events: u64,
    /// Data of established connections held by TCP while their link is
    /// cut: (from host, to, message), sent again when it heals.
    pub parked: Vec<(usize, Proc, Msg)>,
}

impl World {
    pub fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = Rng::new(seed);
        let clocks = std::array::from_fn(|_| Clock {
            rate_ppm: rng.range(990_000, 1_010_000),
            base_true: 0,
            base_local: 0,
        });
        let links = std::array::from_fn(|_| {
            std::array::from_fn(|_| {
                let delay_min = rng.range(1, 10);
                Link {
                    down: 0,
                    delay_min,
                    delay_max: delay_min + rng.range(0, 20),
                    loss: 0,
                }
            })
        });
        let scenario = Scenario::new(&mut rng);
        let timeout = scenario.timeout_secs;
        let mut world = World {
            t: 0,
            seq: 0,
            queue: BinaryHeap::with_capacity(256),
            clocks,
            links,
            agents: [
                Agent::new(ALPHA, timeout, scenario.witness),
                Agent::new(BETA, timeout, scenario.witness),
            ],
            fences: Default::default(),
            pgs: [Pg::new(), Pg::new()],
            stream: None,
            sgen: 0,
            witnesses: [Witness::new(), Witness::new()],
            proxy: Proxy::new(),
            check: Checker::default(),
            trace: Trace::new(verbose),
            faults: FaultCounts::default(),
            scenario,
            next_req: 1,
            next_rid: 1,
            events: 0,
            parked: Vec::new(),
            rng,
        };
        world.agent_start(ALPHA);
        world.agent_start(BETA);
        world.witness_start(0);
        world.witness_start(1);
        world.proxy_start();
        world.faults_start();
        world
    }

    /// Runs until the queue is empty or the scenario's end.
    pub fn run(&mut self) {
        while let Some(ev) = self.queue.pop() {
            if ev.t > self.scenario.end {
                break;
            }
            self.t = ev.t;
            self.events += 1;
            self.dispatch(ev.e);
            if self.check.done {
                break;
            }
        }
        self.finish();
    }

    pub fn at(&mut self, t: u64, e: E) {
        self.seq += 1;
        self.queue.push(Ev {
            t: t.max(self.t),
            seq: self.seq,
            e,
        });
    }

    pub fn after(&mut self, delay: u64, e: E) {
        self.at(self.t + delay, e);
    }

    /// The reading of `host`'s clock now, in ms.
    pub fn local_ms(&self, host: usize) -> u64 {
        let clock = &self.clocks[host];
        clock.base_local + (self.t - clock.base_true) * clock.rate_ppm / 1_000_000
    }

    /// Duration on `host`'s clock since `since_local` (a reading of it).
    pub fn since(&self, host: usize, since_local: u64) -> Duration {
        Duration::from_millis(self.local_ms(host).saturating_sub(since_local))
    }

    /// Schedules `e` after `local_ms` on `host`'s clock.
    pub fn after_local(&mut self, host: usize, local_ms: u64, e: E) {
        let rate = self.clocks[host].rate_ppm;
        let delay = (local_ms * 1_000_000).div_ceil(rate);
        self.after(delay, e);
    }

    pub fn set_rate(&mut self, host: usize, rate_ppm: u64) {
        let local = self.local_ms(host);
        self.clocks[host] = Clock {
            rate_ppm,
            base_true: self.t,
            base_local: local,
        };
        if host < 2 {
            self.fence_rearm(host);
        }
    }

    pub fn req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// The delay of one message over `from` -> `to`, or None when cut.
    pub fn link_delay(&mut self, from: usize, to: usize) -> Option<u64> {
        let link = self.links[from][to];
        if !link.up() {
            return None;
        }
        let mut delay = self.rng.range(link.delay_min, link.delay_max);
        if link.loss > 0 && self.rng.chance(link.loss) {
            // TCP retransmits a lost segment after an RTO.
            delay += self.rng.range(200, 1000);
        }
        Some(delay)
    }

    /// Sends `msg` on an established connection whose peer waits long for
    /// it (a takeover's or a command's answer): over a cut link TCP keeps
    /// it and delivers it once the link heals.
    pub fn send_held(&mut self, from: usize, to: Proc, msg: Msg) {
        if self.links[from][to.host()].up() {
            self.send(from, to, msg);
        } else {
            self.parked.push((from, to, msg));
        }
    }

    /// Sends the held data whose link carries it again.
    pub fn unpark(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        for (from, to, msg) in parked {
            self.send_held(from, to, msg);
        }
    }

    pub fn both_ways(&self, a: usize, b: usize) -> bool {
        self.links[a][b].up() && self.links[b][a].up()
    }

    /// Sends `msg` from `from`'s host; a cut link loses it.
    pub fn send(&mut self, from: usize, to: Proc, msg: Msg) {
        if let Some(delay) = self.link_delay(from, to.host()) {
            self.after(
                delay,
                E::Deliver {
                    to,
                    msg: Box::new(msg),
                },
            );
        }
    }

    pub fn log(&mut self, node: usize, what: &'static str, a: u64, b: u64, note: &'static str) {
        self.trace.push(Line {
            t: self.t,
            node: HOST_NAMES[node],
            what,
            a,
            b,
            note,
        });
    }

    fn dispatch(&mut self, e: E) {
        match e {
            E::Agent { a, gen, ev } => {
                let agent = &mut self.agents[a as usize];
                if !agent.alive || agent.gen != gen {
                    return;
                }
                if agent.frozen {
                    agent.deferred.push(E::Agent { a, gen, ev });
                    return;
                }
                self.agent_event(a as usize, ev);
            }
            E::AgentRestart { a } => self.agent_restart(a as usize),
            E::Thaw { a } => self.agent_thaw(a as usize),
            E::Fence { a, timer } => self.fence_timer(a as usize, timer),
            E::Deliver { to, msg } => self.deliver(to, msg),
            E::Pg { p, pgen, ev } => {
                if self.pgs[p as usize].pgen == pgen {
                    self.pg_event(p as usize, ev);
                }
            }
            E::Ship { sgen, upto } => self.stream_ship(sgen, upto),
            E::StreamAck { sgen, flush } => self.stream_ack(sgen, flush),
            E::Witness { w, gen, ev } => {
                let witness = &self.witnesses[w as usize];
                if witness.alive && witness.gen == gen {
                    self.witness_event(w as usize, ev);
                }
            }
            E::WitnessRestart { w } => self.witness_restart(w as usize),
            E::ProxyPoll => self.proxy_poll(),
            E::ProxyTimeout { req } => self.proxy_timeout(req),
            E::ClientGo { c } => self.client_go(c as usize),
            E::ClientTimeout { c, txn, cancelled } => {
                self.client_timeout(c as usize, txn, cancelled)
            }
            E::TxnArrive { p, c, txn } => self.txn_arrive(p as usize, c, txn),
            E::TxnCancel { p, c, txn } => self.txn_cancel(p as usize, c, txn),
            E::TxnReply { c, txn, ack } => self.client_reply(c as usize, txn, ack),
            E::LinkHeal { from, to } => {
                let link = &mut self.links[from as usize][to as usize];
                link.down = link.down.saturating_sub(1);
                self.unpark();
                self.stream_kick();
            }
            E::Fault => self.fault(),
            E::FaultPhaseEnd => self.fault_phase_end(),
            E::OperatorHeal => self.operator_heal(),
        }
    }

    fn deliver(&mut self, to: Proc, msg: Box<Msg>) {
        match to {
            Proc::Agent(a) => {
                let agent = &mut self.agents[a as usize];
                if !agent.alive {
                    self.refuse(to, &msg);
                } else if agent.frozen {
                    // The kernel holds it until SIGCONT.
                    agent.deferred.push(E::Deliver { to, msg });
                } else {
                    self.agent_message(a as usize, *msg);
                }
            }
            Proc::Witness(w) => {
                if self.witnesses[w as usize].alive {
                    self.witness_message(w as usize, *msg);
                } else {
                    self.refuse(to, &msg);
                }
            }
            Proc::Proxy => self.proxy_message(*msg),
        }
    }

    /// A request to a dead process: its host's kernel answers with a
    /// reset, over a cut link once it heals (the requester's TCP
    /// retransmits until then).
    fn refuse(&mut self, at: Proc, msg: &Msg) {
        if let Some((requester, req)) = msg.requester() {
            self.send_held(at.host(), requester, Msg::Nack { req });
        }
    }
}
