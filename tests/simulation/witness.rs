//! The witness process as `src/witness/mod.rs` runs it: a durable role
//! table row and a persistent identity (kept across kill -9), heard-times
//! that restart with the process, and the real `arbiter` deciding. Like the
//! real store (`RoleStore::update`), a request reads, decides and writes in
//! one atomic step; only the answer leaves after the transaction's fsync,
//! and a witness killed in between never sends it.

use pgmirror::control::{PromotionKind, PromotionRequest, RoleRow};
use pgmirror::witness::arbiter::{self, Change};

use crate::world::{Msg, Proc, WitnessReply, World, E, HOST_NAMES, SESSION, WIT_A};

/// The identity witness `w` drew when its store was created.
pub fn witness_identity(w: usize) -> u64 {
    0x5eed_0000 + w as u64
}

pub struct Witness {
    /// The role table row (durable).
    pub row: Option<RoleRow>,
    /// When each partner was last heard, on this process's clock (volatile).
    pub heard: [Option<u64>; 2],
    pub alive: bool,
    pub gen: u32,
    pub started_local: u64,
}

pub enum WitnessEv {
    /// The answer to a request, sent once the transaction is durable.
    Answer {
        to: Proc,
        req: u64,
        reply: WitnessReply,
    },
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

    /// The row as the store reads it: with this witness's identity.
    fn witness_row(&self, w: usize) -> Option<RoleRow> {
        self.witnesses[w].row.clone().map(|row| RoleRow {
            witness_id: witness_identity(w),
            ..row
        })
    }

    pub fn witness_message(&mut self, w: usize, msg: Msg) {
        let now = self.witness_now(w);
        match msg {
            Msg::Report { from, req, view } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let outcome =
                    self.witness_update(w, None, |row| Ok(arbiter::on_report(row, &view)));
                self.witness_answer(w, Proc::Agent(from), req, outcome);
            }
            Msg::SetSync {
                from,
                req,
                epoch,
                synchronized,
                based_on,
            } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let name = HOST_NAMES[from as usize];
                let outcome = self.witness_update(w, None, |row| {
                    arbiter::set_synchronized(row, name, epoch, synchronized, based_on).map(Some)
                });
                self.witness_answer(w, Proc::Agent(from), req, outcome);
            }
            Msg::Detach { from, req, epoch } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let name = HOST_NAMES[from as usize];
                let outcome = self.witness_update(w, None, |row| arbiter::detach(row, name, epoch));
                self.witness_answer(w, Proc::Agent(from), req, outcome);
            }
            Msg::Promote {
                from,
                req,
                epoch,
                kind,
                lsn,
                answered_ago_ms,
            } => {
                self.witnesses[w].heard[from as usize] = Some(now);
                let silent = self.witnesses[w]
                    .row
                    .as_ref()
                    .map(|row| self.silent_for(w, &row.principal))
                    .unwrap_or_default();
                let request = PromotionRequest {
                    session: SESSION.to_string(),
                    name: HOST_NAMES[from as usize].to_string(),
                    epoch,
                    kind,
                    failover_lsn: lsn,
                    principal_answered_ago_ms: answered_ago_ms,
                };
                let outcome = self.witness_update(w, Some((from, kind)), |row| {
                    arbiter::promote(row, &request, silent).map(Some)
                });
                self.witness_answer(w, Proc::Agent(from), req, outcome);
            }
            _ => {}
        }
    }

    /// `RoleStore::update`: read, decide and write in one transaction.
    fn witness_update(
        &mut self,
        w: usize,
        promotion: Option<(u8, PromotionKind)>,
        decide: impl FnOnce(Option<&RoleRow>) -> Result<Option<Change>, String>,
    ) -> Result<Option<RoleRow>, String> {
        let current = self.witness_row(w);
        let change = match decide(current.as_ref())? {
            None => return Ok(current),
            Some(change) => change,
        };
        // The store's version: the id of the history line each write adds.
        let row = RoleRow {
            witness_id: witness_identity(w),
            version: current.map_or(0, |row| row.version) + 1,
            ..change.row
        };
        self.witnesses[w].row = Some(row.clone());
        let (epoch, synchronized) = (row.epoch.0, row.synchronized);
        self.log(
            WIT_A + w,
            "row written",
            epoch,
            u64::from(synchronized),
            change.event,
        );
        self.check
            .on_persist(pgmirror::roles::Role::Principal, epoch);
        if let Some((from, kind)) = promotion {
            let old = 1 - from as usize;
            let t = self.t;
            let serving = self.pgs[old].run == crate::postgres::PgRun::Principal;
            let unfenced = self.unfenced(old);
            self.check
                .on_grant(t, epoch, kind, serving, unfenced, &mut self.trace);
        }
        Ok(Some(row))
    }

    /// The answer leaves once the transaction is durable (its fsync).
    fn witness_answer(
        &mut self,
        w: usize,
        to: Proc,
        req: u64,
        outcome: Result<Option<RoleRow>, String>,
    ) {
        let reply = match outcome {
            Ok(row) => WitnessReply::Row(row),
            Err(_) => WitnessReply::Refused,
        };
        let delay = self.rng.range(1, 5);
        let gen = self.witnesses[w].gen;
        self.after(
            delay,
            E::Witness {
                w: w as u8,
                gen,
                ev: WitnessEv::Answer { to, req, reply },
            },
        );
    }

    pub fn witness_event(&mut self, w: usize, ev: WitnessEv) {
        let WitnessEv::Answer { to, req, reply } = ev;
        self.send(WIT_A + w, to, Msg::Witness { req, reply });
    }
}
