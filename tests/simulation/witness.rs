//! The witness process as `src/witness/mod.rs` runs it: a durable role
//! table row (kept across kill -9), heard-times that restart with the
//! process, and the real `arbiter` deciding. Like the real store, a
//! request reads the row, and a change is written a little later (the
//! SQLite transaction and its fsync) with a compare-and-set on the epoch
//! only, so two requests in flight can interleave.

use pgmirror::partner::api::{PromotionKind, RoleRow};
use pgmirror::roles::Epoch;
use pgmirror::witness::arbiter::{self, Change};

use crate::world::{Msg, Proc, WitnessReply, World, E, HOST_NAMES, WIT_A};

pub struct Witness {
    /// The role table row (durable).
    pub row: Option<RoleRow>,
    /// When each partner was last heard, on this process's clock (volatile).
    pub heard: [Option<u64>; 2],
    pub alive: bool,
    pub gen: u32,
    pub started_local: u64,
}

/// A change read at `expected` and written after the store's latency.
pub struct Pending {
    expected: Option<Epoch>,
    /// The row as read, to notice a change made meanwhile (same epoch).
    read: Option<RoleRow>,
    change: Change,
    answer_to: (Proc, u64),
    /// A report is answered with the row as it is after the write; a
    /// decision with the written row, or a refusal.
    report: bool,
    promotion: Option<(u8, PromotionKind)>,
}

pub enum WitnessEv {
    Write(Box<Pending>),
}

impl Witness {
    pub fn new() -> Self {
        Witness {
            row: None,
            heard: [None; 2],
            alive: false,
            gen: 0,
            started_local: 0,
        }
    }
}

impl World {
    pub fn witness_start(&mut self, w: usize) {
        let local = self.local_ms(WIT_A + w);
        let witness = &mut self.witnesses[w];
        witness.alive = true;
        witness.gen += 1;
        witness.heard = [None; 2];
        witness.started_local = local;
        self.log(WIT_A + w, "witness start", 0, 0, "");
    }

    pub fn witness_restart(&mut self, w: usize) {
        if !self.witnesses[w].alive {
            self.witness_start(w);
        }
    }

    pub fn witness_kill(&mut self, w: usize) {
        if self.witnesses[w].alive {
            self.witnesses[w].alive = false;
            self.log(WIT_A + w, "witness killed", 0, 0, "");
        }
    }

    fn witness_now(&self, w: usize) -> u64 {
        self.local_ms(WIT_A + w)
    }

    /// `Witness::silent_for`: since the partner was last heard, or since
    /// the witness started.
    fn silent_for(&self, w: usize, name: &str) -> std::time::Duration {
        let witness = &self.witnesses[w];
        let index = usize::from(name == HOST_NAMES[1]);
        let heard = witness.heard[index].unwrap_or(witness.started_local);
        std::time::Duration::from_millis(self.witness_now(w).saturating_sub(heard))
    }

    pub fn witness_message(&mut self, w: usize, msg: Msg) {
        let now = self.witness_now(w);
        let host = WIT_A + w;
        match msg {
            Msg::Report { from, req, view } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let row = self.witnesses[w].row.clone();
                match arbiter::on_report(row.as_ref(), &view) {
                    Some(change) => self.witness_write(
                        w,
                        Pending {
                            expected: row.as_ref().map(|row| row.epoch),
                            read: row,
                            change,
                            answer_to: (Proc::Agent(from), req),
                            report: true,
                            promotion: None,
                        },
                    ),
                    None => self.send(
                        host,
                        Proc::Agent(from),
                        Msg::Witness {
                            req,
                            reply: WitnessReply::Row(row),
                        },
                    ),
                }
            }
            Msg::SetSync {
                from,
                req,
                epoch,
                synchronized,
            } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let row = self.witnesses[w].row.clone();
                let verdict = arbiter::set_synchronized(
                    row.as_ref(),
                    HOST_NAMES[from as usize],
                    epoch,
                    synchronized,
                );
                self.witness_decide(w, from, req, row, verdict, None);
            }
            Msg::Promote {
                from,
                req,
                epoch,
                kind,
                lsn,
            } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let row = self.witnesses[w].row.clone();
                let silent = row
                    .as_ref()
                    .map(|row| self.silent_for(w, &row.principal))
                    .unwrap_or_default();
                let verdict = arbiter::promote(
                    row.as_ref(),
                    HOST_NAMES[from as usize],
                    epoch,
                    kind,
                    lsn,
                    silent,
                );
                self.witness_decide(w, from, req, row, verdict, Some((from, kind)));
            }
            _ => {}
        }
    }

    fn witness_decide(
        &mut self,
        w: usize,
        from: u8,
        req: u64,
        row: Option<RoleRow>,
        verdict: Result<Change, String>,
        promotion: Option<(u8, PromotionKind)>,
    ) {
        match verdict {
            Err(_) => self.send(
                WIT_A + w,
                Proc::Agent(from),
                Msg::Witness {
                    req,
                    reply: WitnessReply::Refused,
                },
            ),
            Ok(change) => self.witness_write(
                w,
                Pending {
                    expected: row.as_ref().map(|row| row.epoch),
                    read: row,
                    change,
                    answer_to: (Proc::Agent(from), req),
                    report: false,
                    promotion,
                },
            ),
        }
    }

    fn witness_write(&mut self, w: usize, pending: Pending) {
        let delay = self.rng.range(1, 5);
        let gen = self.witnesses[w].gen;
        self.after(
            delay,
            E::Witness {
                w: w as u8,
                gen,
                ev: WitnessEv::Write(Box::new(pending)),
            },
        );
    }

    pub fn witness_event(&mut self, w: usize, ev: WitnessEv) {
        let WitnessEv::Write(pending) = ev;
        let witness = &mut self.witnesses[w];
        let written = witness.row.as_ref().map(|row| row.epoch) == pending.expected;
        if written {
            if witness.row != pending.read {
                // The compare-and-set on the epoch alone let this write
                // overwrite a change made since it read the row.
                self.check.lost_updates += 1;
                // a = 1: it records synchronized over a "not synchronized".
                let resynchronized = pending.change.row.synchronized
                    && witness.row.as_ref().is_some_and(|row| !row.synchronized);
                let a = u64::from(resynchronized);
                self.log(WIT_A + w, "LOST UPDATE", a, 0, pending.change.event);
            }
            let witness = &mut self.witnesses[w];
            witness.row = Some(pending.change.row.clone());
            let row = &pending.change.row;
            let (epoch, synchronized) = (row.epoch.0, row.synchronized);
            self.log(
                WIT_A + w,
                "row written",
                epoch,
                u64::from(synchronized),
                pending.change.event,
            );
            self.check
                .on_persist(pgmirror::roles::Role::Principal, epoch);
            if let Some((from, kind)) = pending.promotion {
                let old = 1 - from as usize;
                let t = self.t;
                let serving = self.pgs[old].run == crate::postgres::PgRun::Principal;
                self.check.on_grant(t, kind, serving, &mut self.trace);
            }
        }
        let reply = if pending.report {
            WitnessReply::Row(self.witnesses[w].row.clone())
        } else if written {
            WitnessReply::Row(Some(pending.change.row))
        } else {
            WitnessReply::Refused
        };
        let (to, req) = pending.answer_to;
        self.send(WIT_A + w, to, Msg::Witness { req, reply });
    }
}
