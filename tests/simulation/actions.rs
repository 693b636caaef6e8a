//! The actions of a Decision as `src/partner/actions.rs` carries them out
//! (pg_ctl start and stop, pg_promote, the checkpoint after it, pg_rewind,
//! pg_basebackup, synchronous_standby_names and reload, the witness and the
//! peer asked), each taking simulated time; the operation holding the lock
//! waits for one before starting the next, and a failed one drops the rest
//! (the real code's `?`).

use pgmirror::control::PromotionKind;
use pgmirror::partner::engine::StopMode;
use pgmirror::partner::policy::Action;
use pgmirror::partner::state::HandOver;
use pgmirror::roles::Role;
use pgmirror::wire::lsn::Lsn;

use crate::agent::{AgentEv, SYSTEM_IDENTIFIER};
use crate::ops::{Post, Purpose, Started, Wait};
use crate::postgres::PgRun;
use crate::world::{witness_of, Msg, World};

/// Action codes for the trace (see `trace::render`).
pub fn pack_actions(actions: &[Action]) -> u64 {
    let mut packed = 0u64;
    for (i, action) in actions.iter().take(10).enumerate() {
        let (code, flag) = match action {
            Action::HandOver { .. } => (1, false),
            Action::StartPrincipal { synchronous } => (2, *synchronous),
            Action::StartMirror => (3, false),
            Action::Stop(mode) => (4, *mode == StopMode::Immediate),
            Action::Promote => (5, false),
            Action::Rewind => (6, false),
            Action::TakeCopy => (7, false),
            Action::RequireSync(sync) => (8, *sync),
            Action::RecordAtWitness { synchronized, .. } => (9, *synchronized),
            Action::AskPromotion { .. } => (10, false),
            Action::CloseStreams => (11, false),
            Action::FinishPromotion { .. } => (12, false),
        };
        packed |= (code | if flag { 0x20 } else { 0 }) << (6 * i);
    }
    packed
}

impl World {
    /// Runs the queued actions until one has to wait; then the stage goes on.
    pub fn run_actions(&mut self, a: usize) {
        loop {
            let Some(running) = self.agents[a].running.as_mut() else {
                return;
            };
            let Some(action) = running.actions.pop_front() else {
                running.wait = Wait::Nothing;
                return self.stage_continue(a);
            };
            match self.start_action(a, action) {
                Started::Done => {}
                Started::Wait(wait) => {
                    if let Some(running) = self.agents[a].running.as_mut() {
                        running.wait = wait;
                    }
                    return;
                }
                Started::Failed => {
                    self.log(a, "action failed", 0, 0, "");
                    if let Some(running) = self.agents[a].running.as_mut() {
                        running.failed = true;
                        running.actions.clear();
                    }
                }
                Started::Stop => {
                    if let Some(running) = self.agents[a].running.as_mut() {
                        running.actions.clear();
                    }
                }
            }
        }
    }

    fn wait_action(&mut self, a: usize, delay: u64, post: Post) -> Started {
        let token = self.req();
        self.after(
            delay + 1,
            crate::world::E::Agent {
                a: a as u8,
                gen: self.agents[a].gen,
                ev: AgentEv::ActionDone(token),
            },
        );
        Started::Wait(Wait::Action { token, post })
    }

    fn start_action(&mut self, a: usize, action: Action) -> Started {
        match action {
            Action::HandOver(hand_over) => {
                let HandOver {
                    epoch,
                    failover_lsn,
                } = hand_over;
                let kind = match failover_lsn {
                    Some(_) => PromotionKind::Manual,
                    None => PromotionKind::Handover,
                };
                let req = self.req();
                self.log(a, "ask takeover", epoch.0, kind as u64, "");
                self.call_peer(
                    a,
                    Msg::TakeOver {
                        from: a as u8,
                        req,
                        epoch,
                        lsn: failover_lsn.unwrap_or(Lsn::INVALID),
                        kind,
                    },
                );
                let limit = self.takeover_limit(a);
                self.agent_timer(a, limit, AgentEv::ReqTimeout(req));
                Started::Wait(Wait::Request(req, Purpose::HandOver(hand_over)))
            }
            Action::StartPrincipal { synchronous } => {
                let sync = synchronous && self.agents[a].durable.peer_name.is_some();
                match self.pg_start(a, true, sync) {
                    Some(delay) => self.wait_action(a, delay, Post::StartPrincipal),
                    None => Started::Failed,
                }
            }
            // pg_ctl start -W: a standby is started without waiting.
            Action::StartMirror => match self.pg_start(a, false, false) {
                Some(_) => {
                    let delay = self.rng.range(5, 20);
                    self.wait_action(a, delay, Post::None)
                }
                None => Started::Failed,
            },
            Action::Stop(mode) => {
                let delay = self.pg_stop(a, mode == StopMode::Immediate);
                self.wait_action(a, delay, Post::Stopped)
            }
            Action::Promote => match self.pgs[a].run {
                PgRun::Stopped => match self.pg_start(a, false, false) {
                    Some(delay) => self.wait_action(a, delay, Post::PromoteAfterStart),
                    None => Started::Failed,
                },
                PgRun::Mirror => match self.pg_promote(a) {
                    Some(delay) => self.wait_action(a, delay, Post::None),
                    None => Started::Failed,
                },
                _ => Started::Failed,
            },
            // CHECKPOINT and the slot over a local SQL connection.
            Action::FinishPromotion { epoch } => match self.pgs[a].run {
                PgRun::Principal | PgRun::Mirror => {
                    let delay = self.rng.range(20, 150);
                    self.wait_action(a, delay, Post::Checkpointed(epoch))
                }
                _ => Started::Failed,
            },
            Action::Rewind => {
                let stop = self.pg_stop(a, false);
                let delay = stop + self.rng.range(800, 1500);
                self.wait_action(a, delay, Post::Rewind)
            }
            Action::TakeCopy => {
                let delay = self.rng.range(1500, 2500);
                self.wait_action(a, delay, Post::TakeCopy)
            }
            Action::RequireSync(sync) => {
                if self.pgs[a].run == PgRun::Stopped {
                    return Started::Done;
                }
                self.pg_require_sync(a, sync);
                let delay = self.rng.range(5, 20);
                self.wait_action(a, delay, Post::None)
            }
            Action::RecordAtWitness {
                synchronized,
                based_on,
            } => {
                let Some(witness) = self.agents[a].durable.witness.as_ref().map(witness_of) else {
                    return Started::Done;
                };
                // `actions::record_at_witness`: until answered, it may land.
                self.agents[a].obs.witness.exposure_recorded_at = None;
                let req = self.req();
                let epoch = self.agents[a].durable.epoch;
                self.log(a, "record", witness as u64, u64::from(synchronized), "");
                self.call_witness(
                    a,
                    witness,
                    Msg::SetSync {
                        from: a as u8,
                        req,
                        epoch,
                        synchronized,
                        based_on,
                    },
                    Purpose::Record(synchronized),
                );
                Started::Wait(Wait::Request(req, Purpose::Record(synchronized)))
            }
            Action::AskPromotion {
                kind,
                principal_answered_ago,
            } => {
                let Some(witness) = self.agents[a].durable.witness.as_ref().map(witness_of) else {
                    return Started::Stop;
                };
                let req = self.req();
                let epoch = self.agents[a].durable.epoch;
                let lsn = self.pg_received(a);
                self.log(a, "ask promotion", epoch.0, kind as u64, "automatic");
                self.call_witness(
                    a,
                    witness,
                    Msg::Promote {
                        from: a as u8,
                        req,
                        epoch,
                        kind,
                        lsn,
                        answered_ago_ms: Some(principal_answered_ago.as_millis() as u64),
                    },
                    Purpose::Ask,
                );
                Started::Wait(Wait::Request(req, Purpose::Ask))
            }
            Action::CloseStreams => {
                self.close_streams(a);
                Started::Done
            }
        }
    }

    /// pg_rewind and pg_basebackup reach the principal through a tool relay.
    fn tool_reachable(&self, a: usize) -> bool {
        let p = 1 - a;
        let peer = &self.agents[p];
        peer.alive
            && !peer.frozen
            && self.both_ways(a, p)
            && peer.durable.role == Role::Principal
            && !peer.durable.ended
            && self.pgs[p].run == PgRun::Principal
    }

    pub fn action_done(&mut self, a: usize, token: u64) {
        let Some(Wait::Action { token: t, post }) = self.agents[a].running.as_ref().map(|r| r.wait)
        else {
            return;
        };
        if t != token {
            return;
        }
        let ok = match post {
            Post::None => true,
            Post::Stopped if self.pgs[a].run != PgRun::Stopped => {
                // pg_ctl stop waits for the postmaster to exit.
                if let Started::Wait(wait) = self.wait_action(a, 50, Post::Stopped) {
                    if let Some(running) = self.agents[a].running.as_mut() {
                        running.wait = wait;
                    }
                }
                return;
            }
            Post::Stopped => true,
            Post::StartPrincipal => {
                if self.pgs[a].run == PgRun::Principal {
                    let agent = &mut self.agents[a];
                    agent.durable.system_identifier = Some(SYSTEM_IDENTIFIER);
                }
                true
            }
            Post::Checkpointed(epoch) => {
                let ok = matches!(self.pgs[a].run, PgRun::Principal | PgRun::Mirror);
                if ok {
                    self.agents[a].memory.checkpointed = Some(epoch);
                }
                ok
            }
            Post::PromoteAfterStart => match self.pg_promote(a) {
                Some(delay) => {
                    if let Started::Wait(wait) = self.wait_action(a, delay, Post::None) {
                        if let Some(running) = self.agents[a].running.as_mut() {
                            running.wait = wait;
                        }
                    }
                    return;
                }
                None => false,
            },
            Post::Rewind | Post::TakeCopy => {
                let ok = self.tool_reachable(a) && self.pgs[a].run == PgRun::Stopped;
                if ok {
                    self.pg_copy_from(a, 1 - a);
                    let state = &mut self.agents[a].durable;
                    if post == Post::Rewind {
                        state.needs_rewind = false;
                    } else {
                        state.has_copy = true;
                        state.system_identifier = Some(SYSTEM_IDENTIFIER);
                    }
                    self.log(
                        a,
                        if post == Post::Rewind {
                            "rewound"
                        } else {
                            "copy taken"
                        },
                        self.pgs[a].len() as u64,
                        0,
                        "",
                    );
                }
                ok
            }
        };
        if !ok {
            self.log(a, "action failed", 0, 0, "");
            if let Some(running) = self.agents[a].running.as_mut() {
                running.failed = true;
                running.actions.clear();
            }
        }
        self.run_actions(a);
    }
}
