//! The proxy and its clients: every 500 ms it polls both agents' status
//! (2 s to answer), picks the route with the real `routing::choose` (or,
//! with no answer, probes the PostgreSQL servers for a read-write one, as
//! the real discovery does), and sends the workload's single-row commits to
//! the chosen principal's PostgreSQL. A route change closes the
//! connections to the old principal. The operator's console sits here too.

use pgmirror::partner::api::MirroringStatus;
use pgmirror::proxy::routing::choose;
use pgmirror::roles::Epoch;

use crate::postgres::{PgRun, TxnAck};
use crate::world::{Msg, Proc, World, E, HOST_NAMES, PROXY};

pub const CLIENTS: usize = 2;
const POLL_MS: u64 = 500;
const POLL_TIMEOUT_MS: u64 = 2000;
/// A client cancels a commit that waits longer than this.
const CLIENT_CANCEL_MS: u64 = 3000;

/// The route state the proxy keeps between polls, behind the interface of
/// the reworked routing (a RouteMemory and a step function): switching to
/// the new API is a matter of this impl.
#[derive(Default)]
pub struct RouteMemory {
    pub highest: Epoch,
}

impl RouteMemory {
    /// One poll round's answers in, the partner to route to out.
    pub fn step(&mut self, answers: &[MirroringStatus]) -> Option<usize> {
        let (highest, principal) = choose(self.highest, answers);
        self.highest = highest;
        let principal = principal?;
        HOST_NAMES[..2]
            .iter()
            .position(|name| *name == principal.server_name)
    }
}

#[derive(Default, Clone, Copy)]
pub struct Client {
    /// The transaction in flight (0: none) and where it went.
    pub txn: u64,
    pub at: u8,
    pub next: u64,
}

pub struct Proxy {
    pub memory: RouteMemory,
    pub principal: Option<usize>,
    pub polls: [u64; 2],
    pub answers: Vec<MirroringStatus>,
    pub clients: [Client; CLIENTS],
}

impl Proxy {
    pub fn new() -> Self {
        Proxy {
            memory: RouteMemory::default(),
            principal: None,
            polls: [0; 2],
            answers: Vec::with_capacity(2),
            clients: [Client::default(); CLIENTS],
        }
    }
}

impl World {
    pub fn proxy_start(&mut self) {
        self.after(10, E::ProxyPoll);
        for c in 0..CLIENTS {
            self.after(100 + c as u64 * 7, E::ClientGo { c: c as u8 });
        }
    }

    pub fn proxy_poll(&mut self) {
        self.proxy.answers.clear();
        for a in 0..2 {
            let req = self.req();
            self.proxy.polls[a] = req;
            self.send(PROXY, Proc::Agent(a as u8), Msg::Status { req });
            self.after_local(PROXY, POLL_TIMEOUT_MS, E::ProxyTimeout { req });
        }
    }

    pub fn proxy_timeout(&mut self, req: u64) {
        if let Some(a) = self.proxy.polls.iter().position(|r| *r == req) {
            self.proxy.polls[a] = 0;
            self.proxy_round_done();
        }
    }

    pub fn proxy_message(&mut self, msg: Msg) {
        match msg {
            Msg::StatusReply { req, status } => {
                if let Some(a) = self.proxy.polls.iter().position(|r| *r == req) {
                    self.proxy.polls[a] = 0;
                    self.proxy.answers.push(status);
                    self.proxy_round_done();
                }
            }
            Msg::Nack { req } => self.proxy_timeout(req),
            Msg::CommandReply { .. } => {}
            _ => {}
        }
    }

    /// Both polls answered or timed out: choose, then poll again later.
    fn proxy_round_done(&mut self) {
        if self.proxy.polls.iter().any(|r| *r != 0) {
            return;
        }
        let chosen = if self.proxy.answers.is_empty() {
            // libpq-style probe: the first read-write PostgreSQL.
            (0..2).find(|p| self.pgs[*p].run == PgRun::Principal && self.both_ways(PROXY, *p))
        } else {
            let answers = std::mem::take(&mut self.proxy.answers);
            let chosen = self.proxy.memory.step(&answers);
            self.proxy.answers = answers;
            chosen
        };
        if chosen != self.proxy.principal {
            self.log(
                PROXY,
                "route",
                chosen.map_or(9, |p| p as u64),
                self.proxy.memory.highest.0,
                "",
            );
            if let Some(old) = self.proxy.principal {
                // Connections to the old principal are closed.
                for c in 0..CLIENTS {
                    let client = self.proxy.clients[c];
                    if client.txn != 0 && client.at as usize == old {
                        self.proxy.clients[c].txn = 0;
                        self.after(1, E::ClientGo { c: c as u8 });
                    }
                }
            }
            self.proxy.principal = chosen;
        }
        self.after_local(PROXY, POLL_MS, E::ProxyPoll);
    }

    pub fn client_go(&mut self, c: usize) {
        if self.proxy.clients[c].txn != 0 {
            return;
        }
        let Some(p) = self.proxy.principal else {
            self.after(100, E::ClientGo { c: c as u8 });
            return;
        };
        self.proxy.clients[c].next += 1;
        let txn = self.proxy.clients[c].next;
        self.proxy.clients[c].txn = txn;
        self.proxy.clients[c].at = p as u8;
        if let Some(delay) = self.link_delay(PROXY, p) {
            self.after(
                delay,
                E::TxnArrive {
                    p: p as u8,
                    c: c as u8,
                    txn,
                },
            );
        }
        self.after(
            CLIENT_CANCEL_MS,
            E::ClientTimeout {
                c: c as u8,
                txn,
                cancelled: false,
            },
        );
    }

    pub fn client_timeout(&mut self, c: usize, txn: u64, cancelled: bool) {
        let client = self.proxy.clients[c];
        if client.txn != txn {
            return;
        }
        if cancelled {
            // No answer to the cancel either: give up on the connection.
            self.proxy.clients[c].txn = 0;
            self.after(10, E::ClientGo { c: c as u8 });
            return;
        }
        let p = client.at;
        if let Some(delay) = self.link_delay(PROXY, p as usize) {
            self.after(delay, E::TxnCancel { p, c: c as u8, txn });
        }
        self.after(
            1000,
            E::ClientTimeout {
                c: c as u8,
                txn,
                cancelled: true,
            },
        );
    }

    pub fn client_reply(&mut self, c: usize, txn: u64, ack: Option<TxnAck>) {
        if self.proxy.clients[c].txn != txn {
            return;
        }
        self.proxy.clients[c].txn = 0;
        if let Some(ack) = ack {
            let t = self.t;
            self.check.on_acknowledged(t, ack);
        }
        let think = self.rng.range(20, 80);
        self.after(think, E::ClientGo { c: c as u8 });
    }
}
