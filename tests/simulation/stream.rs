//! The WAL stream: the mirror's walreceiver connects through its agent's
//! relay and the agents' link to the principal's walsender. Records flow
//! only while both agents run (a frozen agent stalls the stream) and the
//! link carries them; the principal's walsender stays 'streaming' until
//! its agent closes it or it sees the connection reset.

use pgmirror::roles::Role;

use crate::postgres::{PgEv, PgRun, Standby, SHIP_RECORDS_PER_MS};
use crate::world::{World, E};

/// The mirror's walreceiver connected through both agents.
pub struct Stream {
    pub sgen: u32,
    pub principal: usize,
    pub mirror: usize,
    /// Highest position sent (scheduled) to the mirror.
    pub shipped: u32,
    /// Highest flush position sent back.
    pub acked: u32,
}

impl World {
    /// Data (true) or acknowledgements (false) can pass between the agents.
    pub fn stream_flows(&self, data: bool) -> bool {
        let Some(stream) = &self.stream else {
            return false;
        };
        let (p, m) = (stream.principal, stream.mirror);
        let running = |a: usize| self.agents[a].alive && !self.agents[a].frozen;
        let link = if data {
            self.links[p][m].up()
        } else {
            self.links[m][p].up()
        };
        running(p) && running(m) && link
    }

    /// The walreceiver (re)connects through its agent to the principal's.
    pub fn stream_try(&mut self, m: usize) {
        if self.pgs[m].run != PgRun::Mirror || self.stream.is_some() {
            if self.pgs[m].run == PgRun::Mirror {
                self.pg_ev(m, 500, PgEv::WalRetry);
            }
            return;
        }
        let p = 1 - m;
        let running = |a: usize| self.agents[a].alive && !self.agents[a].frozen;
        let principal = &self.agents[p].durable;
        let serving = principal.role == Role::Principal && !principal.ended && !principal.suspended;
        let (mirror_wal, principal_wal) = (&self.pgs[m].wal, &self.pgs[p].wal);
        let followable = mirror_wal.len() <= principal_wal.len()
            && mirror_wal
                .last()
                .is_none_or(|rec| principal_wal[mirror_wal.len() - 1] == *rec);
        if !(running(m)
            && running(p)
            && self.both_ways(m, p)
            && serving
            && self.pgs[p].run == PgRun::Principal
            && followable)
        {
            self.pg_ev(m, 500, PgEv::WalRetry);
            return;
        }
        self.sgen += 1;
        let flush = self.pgs[m].len();
        self.stream = Some(Stream {
            sgen: self.sgen,
            principal: p,
            mirror: m,
            shipped: flush,
            acked: flush,
        });
        self.pgs[p].standby = Some(Standby {
            streaming: flush == self.pgs[p].len(),
            flush,
        });
        self.log(m, "stream up", flush as u64, self.pgs[p].len() as u64, "");
        self.stream_kick();
    }

    /// Sends what the mirror lacks and re-sends a flush report the
    /// principal lacks, when the stream can carry them.
    pub fn stream_kick(&mut self) {
        for p in 0..2 {
            // A stopping principal's walsender sends its last WAL over a
            // connection the mirror's side already closed: once the link
            // carries it, the reset ends the walsender.
            let stale = self.stream.as_ref().is_none_or(|s| s.principal != p);
            if stale
                && self.pgs[p].drain_to.is_some()
                && self.links[p][1 - p].up()
                && self.links[1 - p][p].up()
                && !self.agents[1 - p].frozen
            {
                self.drained(p);
            }
        }
        let Some(stream) = &self.stream else {
            return;
        };
        let (sgen, p, m) = (stream.sgen, stream.principal, stream.mirror);
        let (shipped, acked) = (stream.shipped, stream.acked);
        if self.stream_flows(true) {
            let end = self.pgs[p].len();
            if end > shipped {
                if let Some(delay) = self.link_delay(p, m) {
                    let backlog = (end - shipped) as u64 / SHIP_RECORDS_PER_MS;
                    self.after(delay + backlog, E::Ship { sgen, upto: end });
                    if let Some(stream) = &mut self.stream {
                        stream.shipped = end;
                    }
                    if let Some(standby) = &mut self.pgs[p].standby {
                        standby.streaming = true;
                    }
                }
            }
        }
        let flushed = self.pgs[m].len();
        if flushed > acked && self.stream_flows(false) {
            if let Some(delay) = self.link_delay(m, p) {
                self.after(
                    delay,
                    E::StreamAck {
                        sgen,
                        flush: flushed,
                    },
                );
                if let Some(stream) = &mut self.stream {
                    stream.acked = flushed;
                }
            }
        }
    }

    pub fn stream_ship(&mut self, sgen: u32, upto: u32) {
        let Some(stream) = &self.stream else {
            return;
        };
        if stream.sgen != sgen {
            return;
        }
        let (p, m) = (stream.principal, stream.mirror);
        if !self.stream_flows(true) || self.pgs[m].run != PgRun::Mirror {
            // Stalled: what was in flight is sent again once it flows.
            let flushed = self.pgs[m].len();
            if let Some(stream) = &mut self.stream {
                stream.shipped = flushed;
            }
            return;
        }
        let from = self.pgs[m].len() as usize;
        if from < upto as usize {
            let (principal, mirror) = if p < m {
                let (left, right) = self.pgs.split_at_mut(m);
                (&left[p], &mut right[0])
            } else {
                let (left, right) = self.pgs.split_at_mut(p);
                (&right[0], &mut left[m])
            };
            mirror
                .wal
                .extend_from_slice(&principal.wal[from..upto as usize]);
        }
        self.stream_kick();
    }

    pub fn stream_ack(&mut self, sgen: u32, flush: u32) {
        let Some(stream) = &self.stream else {
            return;
        };
        if stream.sgen != sgen {
            return;
        }
        let p = stream.principal;
        if !self.stream_flows(false) {
            let known = self.pgs[p].standby.map(|s| s.flush).unwrap_or(0);
            if let Some(stream) = &mut self.stream {
                stream.acked = known;
            }
            return;
        }
        if let Some(standby) = &mut self.pgs[p].standby {
            standby.flush = standby.flush.max(flush);
        }
        if self.pgs[p].drain_to.is_some_and(|to| flush >= to) {
            self.drained(p);
        }
        self.release_waiters(p);
    }

    /// Both ends of the stream close: the walsender exits, the
    /// walreceiver retries.
    pub fn stream_end(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.pgs[stream.principal].standby = None;
            self.drained(stream.principal);
            self.stream_lost_by_mirror(stream.mirror);
        }
    }

    fn stream_lost_by_mirror(&mut self, m: usize) {
        if self.pgs[m].run == PgRun::Mirror {
            self.pg_ev(m, 500, PgEv::WalRetry);
        }
    }

    /// Agent `a` closes its relayed streams (CloseStreams, peer lost, or
    /// its death). The principal's walsender learns of it at once when the
    /// principal's agent closes; when the mirror's agent closes, only if
    /// the link carries the reset, else it stays 'streaming' (stale).
    pub fn close_streams(&mut self, a: usize) {
        match &self.stream {
            Some(stream) if stream.principal == a => self.stream_end(),
            Some(stream) if stream.mirror == a => {
                let p = stream.principal;
                if self.links[a][p].up() && self.agents[p].alive && !self.agents[p].frozen {
                    self.stream_end();
                } else {
                    self.stream = None;
                    self.stream_lost_by_mirror(a);
                }
            }
            _ => {
                // Its relay's connection to its own walsender closes: a
                // stale walsender exits (and a fast stop waiting for it
                // goes on).
                if matches!(self.pgs[a].run, PgRun::Principal | PgRun::Stopping) {
                    self.pgs[a].standby = None;
                }
                self.drained(a);
            }
        }
    }
}
