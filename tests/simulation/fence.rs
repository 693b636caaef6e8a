//! The partner's fence process (`src/partner/fence.rs`): fed an order by
//! every quorum watch (`policy::fence_order`), it SIGKILLs PostgreSQL when
//! the last lease it was told ends, minus `FENCE_MARGIN`, on its host's
//! clock, and at once when its agent dies (the pipe closes). It is a
//! process of its own: a SIGSTOP of the agent does not stop it, so a
//! frozen agent's PostgreSQL dies at the end of the lease the agent last
//! fed. A restarted agent starts a new fence with no order yet.

use pgmirror::partner::fence::{Order, FENCE_MARGIN};

use crate::world::{World, E};

/// The fence of one partner.
#[derive(Default)]
pub struct Fence {
    /// When it kills PostgreSQL, on its host's clock (ms); None: no lease
    /// applies (`Order::Hold`, or no order yet).
    pub until: Option<u64>,
    /// Incarnation of its armed timer: older timer events are void.
    pub timer: u32,
    /// The host clock reading its armed timer fires at.
    pub armed: Option<u64>,
}

impl World {
    /// The agent's quorum watch tells the fence `order` (`Fence::order`).
    pub fn fence_order(&mut self, a: usize, order: Order) {
        let now = self.local_ms(a);
        let until = match order {
            Order::Lease(left) => Some(now + left.saturating_sub(FENCE_MARGIN).as_millis() as u64),
            Order::Hold | Order::Exit => None,
        };
        self.fences[a].until = until;
        if let Some(until) = until {
            if self.fences[a].armed.is_none_or(|armed| until < armed) {
                self.fence_arm(a, until);
            }
        }
    }

    /// Arms the fence's timer for `at` on its host's clock.
    fn fence_arm(&mut self, a: usize, at: u64) {
        let fence = &mut self.fences[a];
        fence.timer += 1;
        fence.armed = Some(at);
        let timer = fence.timer;
        let wait = at.saturating_sub(self.local_ms(a));
        self.after_local(a, wait, E::Fence { a: a as u8, timer });
    }

    /// Its host's clock changed rate: the armed timer is set again.
    pub fn fence_rearm(&mut self, a: usize) {
        if let Some(at) = self.fences[a].armed {
            self.fence_arm(a, at);
        }
    }

    /// The fence's timer fired: past the deadline it kills PostgreSQL.
    pub fn fence_timer(&mut self, a: usize, timer: u32) {
        if self.fences[a].timer != timer {
            return;
        }
        self.fences[a].armed = None;
        let Some(until) = self.fences[a].until else {
            return;
        };
        if self.local_ms(a) < until {
            return self.fence_arm(a, until);
        }
        self.fences[a].until = None;
        self.fence_kill(a, "fence: the lease ended, PostgreSQL killed");
    }

    /// A new fence process, with no order yet (its timer events void).
    pub fn fence_start(&mut self, a: usize) {
        let fence = &mut self.fences[a];
        fence.timer += 1;
        fence.until = None;
        fence.armed = None;
    }

    /// The agent died: its fence kills PostgreSQL and exits.
    pub fn fence_agent_gone(&mut self, a: usize) {
        self.fence_start(a);
        self.fence_kill(a, "fence: the agent is gone, PostgreSQL killed");
    }

    fn fence_kill(&mut self, a: usize, note: &'static str) {
        if self.pgs[a].run != crate::postgres::PgRun::Stopped {
            self.pg_crash(a);
            self.log(a, "fence kill", 0, 0, note);
        }
    }
}
