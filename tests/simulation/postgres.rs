//! PostgreSQL 15 as the policy sees it: stopped, starting, principal,
//! in recovery (mirror) or stopping; a timeline; WAL as records; commits
//! that wait for the named synchronous standby's flush; and the WAL stream
//! through the two agents' relay (it flows only while both agents run and
//! the link carries it; a frozen agent stalls it, and the principal's
//! walsender stays 'streaming' until its agent closes it).
//!
//! LSNs are record positions: record `i` starts at `Lsn(i)` and ends at
//! `Lsn(i + 1)`, so a flush position is a record count.

use pgmirror::partner::policy::{PostgresObservation, StandbyObservation};
use pgmirror::roles::{Role, Safety};
use pgmirror::wire::lsn::Lsn;

use crate::world::{World, E, HOST_NAMES, PROXY};

/// Records the link carries per millisecond when catching up.
pub const SHIP_RECORDS_PER_MS: u64 = 20;
/// PostgreSQL's default wal_sender_timeout.
const WAL_SENDER_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRun {
    Stopped,
    Starting,
    Principal,
    /// In recovery.
    Mirror,
    Stopping,
}

/// One WAL record; `rid` is unique in the whole run, so two histories
/// agree up to a position iff their records there have the same rid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    pub rid: u32,
    pub tl: u16,
}

/// A backend waiting in SyncRepWaitForLSN.
pub struct Waiter {
    pos: u32,
    client: u8,
    txn: u64,
}

/// The principal's walsender for the mirror (pg_stat_replication).
#[derive(Debug, Clone, Copy)]
pub struct Standby {
    /// state = 'streaming': it has sent everything once.
    pub streaming: bool,
    /// flush_lsn as the mirror last reported it.
    pub flush: u32,
}

pub struct Pg {
    pub run: PgRun,
    /// Bumped whenever the postmaster stops or starts: pending events of
    /// an earlier incarnation are void.
    pub pgen: u32,
    pub wal: Vec<Rec>,
    pub tl: u16,
    /// Position of the last checkpoint record (pg_controldata).
    pub checkpoint: u32,
    /// The epoch of its agent's durable state when it became writable.
    pub serve_epoch: u64,
    /// synchronous_standby_names names the mirror (after the reload).
    pub sync_effective: bool,
    pub waiting: Vec<Waiter>,
    pub standby: Option<Standby>,
    /// Stopping: the walsender waits until the standby confirmed this.
    pub drain_to: Option<u32>,
}

/// What a commit's completion tells the client and the checker.
#[derive(Debug, Clone, Copy)]
pub struct TxnAck {
    pub rid: u32,
    pub pos: u32,
    pub epoch: u64,
    /// FULL, and the principal's durable state said synchronized.
    pub protected: bool,
    /// The wait for the standby was cancelled (visible, WARNING).
    pub edge: bool,
    /// Its agent could not stop it when its lease ended (the known gap).
    pub unfenced: bool,
    pub class: Protection,
}

/// How a commit completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// No synchronous requirement in force.
    Immediate,
    /// The standby's flush reached it.
    Flushed,
    /// The requirement was dropped while it waited.
    Released,
    /// Its client cancelled the wait.
    Cancelled,
}

/// Why a protected commit was protected, for the I2 report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// It waited for the mirror's flush.
    Waited,
    /// The principal's state said synchronized, but it did not wait.
    StateOnly,
    /// Only a witness's row still said synchronized.
    WitnessOnly,
}

#[derive(Debug, Clone, Copy)]
pub enum PgEv {
    Started {
        principal: bool,
        sync: bool,
        epoch: u64,
    },
    Stopped,
    Promoted,
    SyncEffective(bool),
    WalRetry,
}

impl Pg {
    pub fn new() -> Self {
        Pg {
            run: PgRun::Stopped,
            pgen: 0,
            wal: Vec::with_capacity(2048),
            tl: 1,
            checkpoint: 0,
            serve_epoch: 0,
            sync_effective: false,
            waiting: Vec::new(),
            standby: None,
            drain_to: None,
        }
    }

    pub fn len(&self) -> u32 {
        self.wal.len() as u32
    }

    /// Holds the record `rid` at `pos`.
    pub fn holds(&self, pos: u32, rid: u32) -> bool {
        self.wal.get(pos as usize).is_some_and(|rec| rec.rid == rid)
    }
}

impl World {
    pub fn pg_ev(&mut self, p: usize, delay: u64, ev: PgEv) {
        let pgen = self.pgs[p].pgen;
        self.after(
            delay,
            E::Pg {
                p: p as u8,
                pgen,
                ev,
            },
        );
    }

    fn append(&mut self, p: usize) -> u32 {
        let rid = self.next_rid;
        self.next_rid += 1;
        let pg = &mut self.pgs[p];
        pg.wal.push(Rec { rid, tl: pg.tl });
        pg.len() - 1
    }

    pub fn pg_observe(&self, p: usize) -> PostgresObservation {
        let pg = &self.pgs[p];
        match pg.run {
            PgRun::Stopped => PostgresObservation::Stopped,
            PgRun::Starting | PgRun::Stopping => PostgresObservation::Unreadable,
            PgRun::Principal => PostgresObservation::Principal {
                flushed: Lsn(pg.len() as u64),
                standby: pg.standby.map(|standby| StandbyObservation {
                    streaming: standby.streaming,
                    sync: standby.streaming && pg.sync_effective,
                    flushed: Lsn(standby.flush as u64),
                }),
            },
            PgRun::Mirror => PostgresObservation::Mirror {
                received: Some(Lsn(pg.len() as u64)),
            },
        }
    }

    /// `pg_last_wal_receive_lsn()`: None unless in recovery.
    pub fn pg_received(&self, p: usize) -> Option<Lsn> {
        (self.pgs[p].run == PgRun::Mirror).then(|| Lsn(self.pgs[p].len() as u64))
    }

    /// pg_ctl start; None when a postmaster is already there.
    pub fn pg_start(&mut self, p: usize, principal: bool, sync: bool) -> Option<u64> {
        if self.pgs[p].run != PgRun::Stopped {
            return None;
        }
        let epoch = self.agents[p].durable.epoch.0;
        self.pgs[p].run = PgRun::Starting;
        self.pgs[p].pgen += 1;
        let delay = self.rng.range(250, 400);
        self.pg_ev(
            p,
            delay,
            PgEv::Started {
                principal,
                sync,
                epoch,
            },
        );
        Some(delay)
    }

    /// pg_ctl stop; returns how long it takes. A fast stop of a principal
    /// writes the shutdown checkpoint and lets a flowing walsender send it.
    pub fn pg_stop(&mut self, p: usize, immediate: bool) -> u64 {
        let run = self.pgs[p].run;
        if run == PgRun::Stopped {
            return 0;
        }
        if run == PgRun::Stopping {
            return 100;
        }
        self.terminate_waiters(p);
        let mut delay = if immediate {
            self.rng.range(30, 80)
        } else {
            self.rng.range(100, 250)
        };
        let mut drain = false;
        if run == PgRun::Principal && !immediate {
            let pos = self.append(p);
            self.pgs[p].checkpoint = pos;
            self.stream_kick();
            // The walsender sends everything, the shutdown checkpoint
            // included, and exits only once the standby confirmed it
            // (WalSndDone) or wal_sender_timeout ends it.
            drain = self.stream.as_ref().is_some_and(|s| s.principal == p);
            if drain {
                delay = WAL_SENDER_TIMEOUT_MS;
                self.pgs[p].drain_to = Some(self.pgs[p].len());
            }
        }
        if self.stream.as_ref().is_some_and(|s| s.mirror == p) {
            self.stream_end();
        }
        self.pgs[p].run = PgRun::Stopping;
        self.pgs[p].pgen += 1;
        self.pg_ev(p, delay, PgEv::Stopped);
        if drain {
            self.stream_kick();
            50
        } else {
            delay
        }
    }

    /// A stopping principal's walsender is done (confirmed or closed).
    pub fn drained(&mut self, p: usize) {
        if self.pgs[p].run == PgRun::Stopping && self.pgs[p].drain_to.take().is_some() {
            self.pg_ev(p, 20, PgEv::Stopped);
        }
    }

    /// kill -9 of the postmaster: flushed WAL survives.
    pub fn pg_crash(&mut self, p: usize) {
        if self.pgs[p].run == PgRun::Stopped {
            return;
        }
        self.terminate_waiters(p);
        if self
            .stream
            .as_ref()
            .is_some_and(|s| s.mirror == p || s.principal == p)
        {
            self.stream_end();
        }
        let pg = &mut self.pgs[p];
        pg.run = PgRun::Stopped;
        pg.pgen += 1;
        pg.standby = None;
        pg.sync_effective = false;
        pg.drain_to = None;
    }

    /// pg_promote(); None unless in recovery.
    pub fn pg_promote(&mut self, p: usize) -> Option<u64> {
        if self.pgs[p].run != PgRun::Mirror {
            return None;
        }
        if self.stream.as_ref().is_some_and(|s| s.mirror == p) {
            self.stream_end();
        }
        self.pgs[p].pgen += 1;
        let delay = self.rng.range(150, 300);
        self.pg_ev(p, delay, PgEv::Promoted);
        Some(delay)
    }

    /// Writes synchronous_standby_names and reloads: it takes effect later.
    pub fn pg_require_sync(&mut self, p: usize, sync: bool) {
        if matches!(self.pgs[p].run, PgRun::Principal) {
            let delay = self.rng.range(10, 200);
            self.pg_ev(p, delay, PgEv::SyncEffective(sync));
        }
    }

    /// pg_rewind or pg_basebackup from `from`: this copy becomes the
    /// source's history.
    pub fn pg_copy_from(&mut self, p: usize, from: usize) {
        let (source, target) = if p < from {
            let (left, right) = self.pgs.split_at_mut(from);
            (&right[0], &mut left[p])
        } else {
            let (left, right) = self.pgs.split_at_mut(p);
            (&left[from], &mut right[0])
        };
        target.wal.clear();
        target.wal.extend_from_slice(&source.wal);
        target.tl = source.tl;
        target.checkpoint = source.checkpoint;
    }

    pub fn pg_event(&mut self, p: usize, ev: PgEv) {
        match ev {
            PgEv::Started {
                principal,
                sync,
                epoch,
            } => {
                let pg = &mut self.pgs[p];
                pg.standby = None;
                if principal {
                    pg.run = PgRun::Principal;
                    pg.sync_effective = sync;
                    pg.serve_epoch = epoch;
                    self.log(p, "pg started", epoch, u64::from(sync), "principal");
                    self.check.on_serving(p, epoch);
                } else {
                    pg.run = PgRun::Mirror;
                    pg.sync_effective = false;
                    self.log(p, "pg started", 0, 0, "mirror");
                    self.pg_ev(p, 50, PgEv::WalRetry);
                }
            }
            PgEv::Stopped => {
                if self.stream.as_ref().is_some_and(|s| s.principal == p) {
                    self.stream_end();
                }
                let pg = &mut self.pgs[p];
                pg.run = PgRun::Stopped;
                pg.pgen += 1;
                pg.standby = None;
                pg.sync_effective = false;
                pg.drain_to = None;
                self.log(p, "pg stopped", 0, 0, "");
            }
            PgEv::Promoted => {
                self.pgs[p].tl += 1;
                let pos = self.append(p);
                let epoch = self.agents[p].durable.epoch.0;
                let pg = &mut self.pgs[p];
                pg.checkpoint = pos;
                pg.run = PgRun::Principal;
                pg.serve_epoch = epoch;
                pg.sync_effective = false;
                pg.standby = None;
                self.log(p, "pg promoted", epoch, self.pgs[p].tl as u64, "");
                self.check.on_serving(p, epoch);
                let t = self.t;
                self.check
                    .on_promoted(t, epoch, &self.pgs[p], &mut self.trace);
            }
            PgEv::SyncEffective(sync) => {
                self.pgs[p].sync_effective = sync;
                if sync {
                    self.release_waiters(p);
                } else {
                    let waiting = std::mem::take(&mut self.pgs[p].waiting);
                    for waiter in &waiting {
                        self.pg_ack(p, waiter.pos, waiter.client, waiter.txn, Done::Released);
                    }
                    self.pgs[p].waiting = waiting;
                    self.pgs[p].waiting.clear();
                }
            }
            PgEv::WalRetry => self.stream_try(p),
        }
    }

    /// Backends waiting for the standby are terminated: their clients get
    /// no CommandComplete, so nothing is acknowledged.
    fn terminate_waiters(&mut self, p: usize) {
        self.pgs[p].waiting.clear();
    }

    pub fn txn_arrive(&mut self, p: usize, client: u8, txn: u64) {
        if self.pgs[p].run != PgRun::Principal {
            if let Some(delay) = self.link_delay(p, PROXY) {
                self.after(
                    delay,
                    E::TxnReply {
                        c: client,
                        txn,
                        ack: None,
                    },
                );
            }
            return;
        }
        let serve_epoch = self.pgs[p].serve_epoch;
        let t = self.t;
        let unfenced = self.unfenced(p);
        self.check
            .on_routed(t, serve_epoch, unfenced, &mut self.trace);
        let pos = self.append(p);
        let pg = &self.pgs[p];
        if pg.sync_effective {
            self.pgs[p].waiting.push(Waiter { pos, client, txn });
            self.release_waiters(p);
        } else {
            self.pg_ack(p, pos, client, txn, Done::Immediate);
        }
        self.stream_kick();
    }

    /// The client cancels its wait: PostgreSQL commits visibly and answers
    /// with a WARNING and success (an "edge" commit), which the proxy's
    /// commit fence turns into 40003.
    pub fn txn_cancel(&mut self, p: usize, client: u8, txn: u64) {
        let waiting = &mut self.pgs[p].waiting;
        if let Some(index) = waiting
            .iter()
            .position(|w| w.client == client && w.txn == txn)
        {
            let waiter = waiting.swap_remove(index);
            self.pg_ack(p, waiter.pos, client, txn, Done::Cancelled);
        }
    }

    pub fn release_waiters(&mut self, p: usize) {
        let pg = &self.pgs[p];
        let Some(standby) = pg.standby.filter(|s| s.streaming && pg.sync_effective) else {
            return;
        };
        if pg.waiting.iter().all(|w| w.pos >= standby.flush) {
            return;
        }
        let mut waiting = std::mem::take(&mut self.pgs[p].waiting);
        waiting.retain(|w| {
            if w.pos < standby.flush {
                self.pg_ack(p, w.pos, w.client, w.txn, Done::Flushed);
                false
            } else {
                true
            }
        });
        self.pgs[p].waiting = waiting;
    }

    /// The commit completes: the checker sees it, the client may.
    fn pg_ack(&mut self, p: usize, pos: u32, client: u8, txn: u64, done: Done) {
        // I2 protects a commit when the principal's durable state says its
        // commits wait for the mirror, or when a witness's role table still
        // records the mirror as synchronized (it may grant a failover).
        let state = &self.agents[p].durable;
        let epoch = self.pgs[p].serve_epoch;
        let by_state = state.role == Role::Principal
            && state.safety == Safety::Full
            && state.synchronized
            && !state.suspended
            && !state.ended;
        let by_witness = self.witnesses.iter().any(|w| {
            w.row.as_ref().is_some_and(|row| {
                row.principal == HOST_NAMES[p]
                    && row.epoch.0 == epoch
                    && row.synchronized
                    && !row.detached
                    && row.safety == Safety::Full
                    && !row.suspended
            })
        });
        let unfenced = self.unfenced(p);
        let protected = (by_state || by_witness) && !unfenced;
        let edge = done == Done::Cancelled;
        let class = if done == Done::Flushed {
            Protection::Waited
        } else if by_state {
            Protection::StateOnly
        } else {
            Protection::WitnessOnly
        };
        let ack = TxnAck {
            rid: self.pgs[p].wal[pos as usize].rid,
            pos,
            epoch: self.pgs[p].serve_epoch,
            protected,
            edge,
            unfenced,
            class,
        };
        let t = self.t;
        self.check.on_commit(t, ack, &mut self.trace);
        if let Some(delay) = self.link_delay(p, PROXY) {
            self.after(
                delay,
                E::TxnReply {
                    c: client,
                    txn,
                    ack: Some(ack),
                },
            );
        }
    }
}
