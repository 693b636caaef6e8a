//! The proxy and its clients: every 500 ms it polls both agents' status
//! (2 s to answer) and picks the route with the real pure step
//! `routing::choose` (probing the PostgreSQL servers for a read-write one
//! when it asks for that), as `Discoverer::run` does. Each client holds a
//! connection to the principal it was routed to and sends the workload's
//! single-row commits over it; a route that supersedes the connection's
//! epoch or principal (`Route::supersedes`) closes it. The proxy's commit
//! fence (`proxy::fence`) turns a commit whose synchronous wait was
//! cancelled, or any completion of a response during which it forwarded the
//! client's cancel, into SQLSTATE 40003 and ends the connection: the client
//! takes it as "outcome unknown", never as a success. The operator's
//! console sits here too.

use pgmirror::control::MirroringStatus;
use pgmirror::proxy::routing::{choose, AgentAnswer, Decision, PollRound, Route, RouteMemory};
use pgmirror::roles::Epoch;

use crate::postgres::{PgRun, TxnAck};
use crate::world::{Msg, Proc, World, E, HOST_NAMES, PROXY};

pub const CLIENTS: usize = 2;
const POLL_MS: u64 = 500;
const POLL_TIMEOUT_MS: u64 = 2000;
/// A client cancels a commit that waits longer than this.
const CLIENT_CANCEL_MS: u64 = 3000;

/// A client's connection through the proxy to one principal.
#[derive(Clone)]
pub struct Connection {
    pub at: usize,
    pub epoch: Epoch,
    pub principal: pgmirror::proxy::routing::Principal,
}

#[derive(Default, Clone)]
pub struct Client {
    /// The transaction in flight (0: none).
    pub txn: u64,
    pub conn: Option<Connection>,
    pub next: u64,
    /// The proxy forwarded a cancel for the transaction in flight (counted
    /// before it is sent, `CancelTarget`): its completion is fenced.
    pub cancel_forwarded: bool,
}

pub struct Proxy {
    pub memory: RouteMemory,
    /// The route published to the connections.
    pub route: Route,
    pub polls: [u64; 2],
    pub answers: [Option<AgentAnswer>; 2],
    pub clients: [Client; CLIENTS],
}

impl Proxy {
    pub fn new() -> Self {
        Proxy {
            memory: RouteMemory::default(),
            route: Route::default(),
            polls: [0; 2],
            answers: [None, None],
            clients: std::array::from_fn(|_| Client::default()),
        }
    }
}

/// The partner whose PostgreSQL listens at `address`.
fn partner_at(address: &str) -> Option<usize> {
    HOST_NAMES[..2]
        .iter()
        .position(|name| address == format!("{name}:5432"))
}

impl World {
    pub fn proxy_start(&mut self) {
        self.after(10, E::ProxyPoll);
        for c in 0..CLIENTS {
            self.after(100 + c as u64 * 7, E::ClientGo { c: c as u8 });
        }
    }

    pub fn proxy_poll(&mut self) {
        self.proxy.answers = [None, None];
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
                    self.proxy.answers[a] = Some(AgentAnswer::from(&*status as &MirroringStatus));
                    self.proxy_round_done();
                }
            }
            Msg::Nack { req } => self.proxy_timeout(req),
            _ => {}
        }
    }

    /// Both polls answered or timed out: choose, publish, poll again later.
    fn proxy_round_done(&mut self) {
        if self.proxy.polls.iter().any(|r| *r != 0) {
            return;
        }
        let mut round = PollRound {
            answers: self.proxy.answers.to_vec(),
            read_write: None,
        };
        let (mut next, decision) = choose(&self.proxy.memory, &round);
        if decision == Decision::Probe {
            // SELECT pg_is_in_recovery() on every PostgreSQL it reaches.
            let read_write = (0..2)
                .filter(|p| self.pgs[*p].run == PgRun::Principal && self.both_ways(PROXY, *p))
                .map(|p| format!("{}:5432", HOST_NAMES[p]))
                .collect();
            round.read_write = Some(read_write);
            next = choose(&self.proxy.memory, &round).0;
        }
        self.proxy.memory = next;
        let epoch = self.proxy.memory.highest;
        let principal = self.proxy.memory.principal.clone();
        let route = &self.proxy.route;
        if route.epoch != epoch || route.principal != principal {
            let at = principal
                .as_ref()
                .and_then(|p| partner_at(&p.address))
                .map_or(9, |p| p as u64);
            self.log(PROXY, "route", at, epoch.0, "a: partner (9 none), b: epoch");
            self.proxy.route.epoch = epoch;
            self.proxy.route.principal = principal;
            // Connections the new route supersedes are closed.
            for c in 0..CLIENTS {
                let superseded = self.proxy.clients[c]
                    .conn
                    .as_ref()
                    .is_some_and(|conn| self.proxy.route.supersedes(conn.epoch, &conn.principal));
                if superseded {
                    let client = &mut self.proxy.clients[c];
                    client.conn = None;
                    if client.txn != 0 {
                        client.txn = 0;
                        self.after(1, E::ClientGo { c: c as u8 });
                    }
                }
            }
        }
        self.after_local(PROXY, POLL_MS, E::ProxyPoll);
    }

    pub fn client_go(&mut self, c: usize) {
        if self.proxy.clients[c].txn != 0 {
            return;
        }
        if self.proxy.clients[c].conn.is_none() {
            // A new connection goes to the route's principal, if any.
            let route = &self.proxy.route;
            let conn = route.principal.as_ref().and_then(|principal| {
                partner_at(&principal.address).map(|at| Connection {
                    at,
                    epoch: route.epoch,
                    principal: principal.clone(),
                })
            });
            self.proxy.clients[c].conn = conn;
        }
        let Some(p) = self.proxy.clients[c].conn.as_ref().map(|conn| conn.at) else {
            self.after(100, E::ClientGo { c: c as u8 });
            return;
        };
        self.proxy.clients[c].next += 1;
        let txn = self.proxy.clients[c].next;
        self.proxy.clients[c].txn = txn;
        self.proxy.clients[c].cancel_forwarded = false;
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
        if self.proxy.clients[c].txn != txn {
            return;
        }
        let Some(p) = self.proxy.clients[c]
            .conn
            .as_ref()
            .map(|conn| conn.at as u8)
        else {
            return;
        };
        if cancelled {
            // No answer to the cancel either: give up on the connection.
            self.proxy.clients[c].txn = 0;
            self.proxy.clients[c].conn = None;
            self.after(10, E::ClientGo { c: c as u8 });
            return;
        }
        // The client's CancelRequest goes through the proxy.
        self.proxy.clients[c].cancel_forwarded = true;
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
        let cancel_forwarded = self.proxy.clients[c].cancel_forwarded;
        match ack {
            // The commit fence: the WARNING of a cut wait (rule 1), or a
            // completion after a forwarded cancel (rule 2): 40003, and the
            // connection ends.
            Some(ack) if ack.edge || cancel_forwarded => {
                self.check.on_fenced(ack);
                self.proxy.clients[c].conn = None;
            }
            Some(ack) => {
                let t = self.t;
                self.check.on_acknowledged(t, ack);
            }
            // The server refused or closed: connect again.
            None => self.proxy.clients[c].conn = None,
        }
        let think = self.rng.range(20, 80);
        self.after(think, E::ClientGo { c: c as u8 });
    }
}
