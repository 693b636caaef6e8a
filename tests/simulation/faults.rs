//! The seeded fault schedule: kills (agent, PostgreSQL, both, witness),
//! SIGSTOP/SIGCONT, one-way and full partitions, loss and delay, clock
//! drift and operator commands at random times during the fault phase;
//! then everything heals, the operator undoes SUSPEND and SAFETY OFF, and
//! the liveness check waits for SYNCHRONIZED.

use pgmirror::control::Command;
use pgmirror::roles::{takeover_wait, MirroringState, Role, Safety};

use crate::ops::CONNECT_TIMEOUT_MS;
use crate::postgres::{PgRun, SHIP_RECORDS_PER_MS};
use crate::rng::Rng;
use crate::world::{witness_endpoint, witness_of, Msg, Proc, World, E, PROXY, WIT_A, WIT_B};

/// When faults start: after the session's setup (initdb, base backup,
/// first synchronization) has had time to finish.
const FAULTS_FROM_MS: u64 = 6_000;
const HEAL_CHECK_MS: u64 = 250;

pub const KINDS: [&str; 20] = [
    "kill agent",
    "kill postgres",
    "kill agent+postgres",
    "kill witness",
    "freeze agent",
    "partition one-way",
    "partition full",
    "link loss/delay",
    "clock drift",
    "FAILOVER",
    "FORCE_SERVICE",
    "SUSPEND",
    "RESUME",
    "SAFETY FULL",
    "SAFETY OFF",
    "TIMEOUT",
    "SET WITNESS other",
    "WITNESS OFF",
    "WITNESS ON",
    "PARTNER OFF",
];
/// Relative weights of the kinds above.
const WEIGHTS: [u64; 20] = [8, 8, 5, 5, 7, 8, 8, 3, 2, 5, 2, 3, 4, 3, 3, 2, 3, 2, 2, 1];

#[derive(Default, Clone)]
pub struct FaultCounts(pub [u64; KINDS.len()]);

impl FaultCounts {
    pub fn add(&mut self, other: &FaultCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0.iter()) {
            *mine += theirs;
        }
    }
}

pub struct Scenario {
    pub timeout_secs: u64,
    pub witness: bool,
    pub fault_end: u64,
    pub end: u64,
    pub healed_at: Option<u64>,
    pub deadline: u64,
    pub synchronized_at: Option<u64>,
    pub ended: bool,
    heal_checks: u64,
}

impl Scenario {
    pub fn new(rng: &mut Rng) -> Self {
        let timeout_secs = rng.range(2, 5);
        let fault_end = FAULTS_FROM_MS + rng.range(20_000, 40_000);
        Scenario {
            timeout_secs,
            witness: rng.chance(900),
            fault_end,
            // Updated at the heal with the liveness bound.
            end: fault_end + 60_000,
            healed_at: None,
            deadline: u64::MAX,
            synchronized_at: None,
            ended: false,
            heal_checks: 0,
        }
    }
}

impl World {
    pub fn faults_start(&mut self) {
        let first = FAULTS_FROM_MS + self.rng.below(1000);
        self.at(first, E::Fault);
        let end = self.scenario.fault_end;
        self.at(end, E::FaultPhaseEnd);
    }

    fn principal(&self) -> usize {
        let [alpha, beta] = &self.agents;
        match (alpha.durable.role, beta.durable.role) {
            (Role::Principal, Role::Mirror) => 0,
            (Role::Mirror, Role::Principal) => 1,
            _ => usize::from(beta.durable.epoch > alpha.durable.epoch),
        }
    }

    fn operator(&mut self, a: usize, command: Command) {
        let req = self.req();
        self.send(
            PROXY,
            Proc::Agent(a as u8),
            Msg::Command {
                from: Proc::Proxy,
                req,
                command,
            },
        );
    }

    pub fn fault(&mut self) {
        if self.t >= self.scenario.fault_end {
            return;
        }
        if self.agents.iter().any(|agent| agent.durable.ended) {
            // PARTNER OFF ended the session: nothing more to inject.
            self.scenario.ended = true;
            return;
        }
        let total: u64 = WEIGHTS.iter().sum();
        let mut pick = self.rng.below(total);
        let mut kind = 0;
        while pick >= WEIGHTS[kind] {
            pick -= WEIGHTS[kind];
            kind += 1;
        }
        self.faults.0[kind] += 1;
        let a = self.rng.below(2) as usize;
        let timeout = self.agents[self.principal()].timeout_ms();
        let mut target = a;
        match kind {
            0 => {
                self.agent_kill(a);
                let delay = self.rng.range(200, 4000);
                self.after(delay, E::AgentRestart { a: a as u8 });
            }
            1 => self.pg_crash(a),
            2 => {
                self.agent_kill(a);
                self.pg_crash(a);
                let delay = self.rng.range(200, 4000);
                self.after(delay, E::AgentRestart { a: a as u8 });
            }
            3 => {
                let w = self.rng.below(2) as usize;
                target = WIT_A + w;
                self.witness_kill(w);
                let delay = self.rng.range(300, 5000);
                self.after(delay, E::WitnessRestart { w: w as u8 });
            }
            4 => {
                self.agent_freeze(a);
                let delay = self.rng.range(200, timeout * 3);
                self.after(delay, E::Thaw { a: a as u8 });
            }
            5 | 6 => {
                let (x, y) = self.pick_pair();
                target = x;
                let delay = self.rng.range(200, timeout * 3);
                self.links[x][y].down += 1;
                self.after(
                    delay,
                    E::LinkHeal {
                        from: x as u8,
                        to: y as u8,
                    },
                );
                if kind == 6 {
                    self.links[y][x].down += 1;
                    self.after(
                        delay,
                        E::LinkHeal {
                            from: y as u8,
                            to: x as u8,
                        },
                    );
                }
            }
            7 => {
                let (x, y) = self.pick_pair();
                target = x;
                let loss = self.rng.range(0, 300);
                let slow = self.rng.range(1, 50);
                for (from, to) in [(x, y), (y, x)] {
                    let link = &mut self.links[from][to];
                    link.loss = loss;
                    link.delay_max = link.delay_min.max(slow);
                }
            }
            8 => {
                target = self.rng.below(5) as usize;
                let rate = self.rng.range(990_000, 1_010_000);
                self.set_rate(target, rate);
            }
            _ => target = self.operator_fault(kind),
        }
        self.log(target, "FAULT", kind as u64, 0, KINDS[kind]);
        let gap = self.rng.gap(900);
        self.after(gap.max(50), E::Fault);
    }

    /// A pair of hosts whose link matters, the partners' link most often.
    fn pick_pair(&mut self) -> (usize, usize) {
        const PAIRS: [(usize, usize); 9] = [
            (0, 1),
            (0, 1),
            (0, WIT_A),
            (1, WIT_A),
            (0, WIT_B),
            (1, WIT_B),
            (PROXY, 0),
            (PROXY, 1),
            (0, 1),
        ];
        let (x, y) = PAIRS[self.rng.below(PAIRS.len() as u64) as usize];
        if self.rng.chance(500) {
            (y, x)
        } else {
            (x, y)
        }
    }

    fn operator_fault(&mut self, kind: usize) -> usize {
        let principal = self.principal();
        let mirror = 1 - principal;
        let to = if self.rng.chance(800) {
            principal
        } else {
            mirror
        };
        let current = self.agents[principal]
            .durable
            .witness
            .as_ref()
            .map(witness_of);
        let (a, command) = match kind {
            9 => (to, Command::Failover),
            10 => (mirror, Command::ForceServiceAllowDataLoss),
            11 => (to, Command::Suspend),
            12 => (to, Command::Resume),
            13 => (to, Command::Safety(Safety::Full)),
            14 => (to, Command::Safety(Safety::Off)),
            15 => (to, Command::Timeout(self.rng.range(1, 5))),
            16 => (
                to,
                Command::Witness(Some(witness_endpoint(1 - current.unwrap_or(1)))),
            ),
            17 => (to, Command::Witness(None)),
            18 => (
                to,
                Command::Witness(Some(witness_endpoint(current.unwrap_or(0)))),
            ),
            _ => (to, Command::Off),
        };
        self.operator(a, command);
        a
    }

    /// The end of the fault phase: every fault heals.
    pub fn fault_phase_end(&mut self) {
        for from in 0..self.links.len() {
            for to in 0..self.links.len() {
                let link = &mut self.links[from][to];
                link.down = 0;
                link.loss = 0;
            }
        }
        self.unpark();
        for a in 0..2 {
            self.agent_thaw(a);
            self.agent_restart(a);
        }
        for w in 0..2 {
            self.witness_restart(w);
        }
        self.stream_kick();
        self.scenario.ended |= self.agents.iter().any(|agent| agent.durable.ended);
        // Liveness bound: two TIMEOUTs (a lost peer or witness is noticed
        // within one), a takeover wait (`roles::takeover_wait`: a mirror
        // that refused its principal, or the witness, waits out the lease),
        // one operator round (RESUME, SAFETY FULL), and 8 s of setup: a
        // rewind (<= 1.5 s) or a base backup (<= 2.5 s), PostgreSQL starts
        // and a promotion with its checkpoint (<= 1 s), supervisor ticks
        // (0.5 s; a principal that lost a takeover answer asks again at
        // each), walreceiver retries (0.5 s), ping intervals (<= 2 s) and a
        // restarted agent's first round; plus the connect timeout of a
        // request to the peer started over a cut link just before the heal
        // (`ops::CONNECT_TIMEOUT_MS`: TCP's SYN retries are not modelled, so
        // it ends only then), and the unsent WAL at the link's speed.
        let timeout = self
            .agents
            .iter()
            .map(|a| a.timeout_ms())
            .max()
            .unwrap_or(0);
        let takeover_wait =
            takeover_wait(std::time::Duration::from_millis(timeout)).as_millis() as u64;
        let backlog = self.pgs[0].len().abs_diff(self.pgs[1].len()) as u64;
        let bound = 2 * timeout
            + takeover_wait
            + 1000
            + 8000
            + CONNECT_TIMEOUT_MS
            + backlog / SHIP_RECORDS_PER_MS;
        self.scenario.healed_at = Some(self.t);
        self.scenario.deadline = self.t + bound;
        self.scenario.end = self.t + bound + 1;
        self.log(
            PROXY,
            "HEALED",
            bound,
            0,
            "all faults healed; liveness bound (ms)",
        );
        self.after(HEAL_CHECK_MS, E::OperatorHeal);
    }

    /// After the heal: the operator undoes SUSPEND and SAFETY OFF once a
    /// second; the liveness check looks four times a second.
    pub fn operator_heal(&mut self) {
        // PARTNER OFF may land after the heal (a queued command): an ended
        // session has no SYNCHRONIZED to reach.
        self.scenario.ended |= self.agents.iter().any(|agent| agent.durable.ended);
        if self.scenario.ended {
            self.check.done = true;
            return;
        }
        if self.synchronized_now() {
            self.scenario.synchronized_at = Some(self.t);
            self.log(PROXY, "SYNCHRONIZED", 0, 0, "liveness reached");
            self.check.done = true;
            return;
        }
        self.scenario.heal_checks += 1;
        if self.scenario.heal_checks.is_multiple_of(4) {
            let p = self.principal();
            let state = &self.agents[p].durable;
            if state.role == Role::Principal && !state.ended {
                if state.suspended {
                    self.operator(p, Command::Resume);
                } else if state.safety == Safety::Off {
                    self.operator(p, Command::Safety(Safety::Full));
                }
            }
        }
        self.after(HEAL_CHECK_MS, E::OperatorHeal);
    }

    /// Both partners run, the principal is SYNCHRONIZED under FULL and its
    /// commits wait for the streaming mirror.
    pub fn synchronized_now(&self) -> bool {
        let p = self.principal();
        let m = 1 - p;
        let (principal, mirror) = (&self.agents[p], &self.agents[m]);
        let state = &principal.durable;
        principal.alive
            && mirror.alive
            && state.role == Role::Principal
            && mirror.durable.role == Role::Mirror
            && state.safety == Safety::Full
            && state.synchronized
            && state.state == MirroringState::Synchronized
            && self.pgs[p].run == PgRun::Principal
            && self.pgs[m].run == PgRun::Mirror
            && self.pgs[p].sync_effective
            && self.pgs[p].standby.is_some_and(|s| s.streaming)
            && self.stream.as_ref().is_some_and(|s| s.principal == p)
    }
}
