//! Seeded fault schedules against a real [`Pair`]: kills, freezes, cut
//! links, agent and witness restarts, and operator commands sent through
//! the agents' control API. [`schedule`] is a pure function of the seed (the
//! same seed gives the same faults), [`apply`] acts on the pair, and
//! [`heal_all`] undoes every lasting fault. Used by `tests/witness.rs` and
//! `benches/soak_real.rs`. `apply` and `heal_all` are not cancel-safe: a
//! fault dropped half-way may leave one partner frozen (the pair's drop
//! still cleans up).

use std::time::Duration;

use nix::sys::signal::Signal;
use pgmirror::control::Command;

use super::cluster::{Pair, Partner};

/// How long an operator command or a status query may take before the
/// schedule moves on (a frozen agent never answers).
const CONTROL_LIMIT: Duration = Duration::from_secs(3);

/// One step of a fault schedule. Partners are 0 (alpha) and 1 (beta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the agent and of PostgreSQL: the server died.
    KillServer(usize),
    /// kill -9 of PostgreSQL only.
    KillPostgres(usize),
    /// SIGSTOP of the agent and of PostgreSQL (not of the fence).
    Freeze(usize),
    Thaw(usize),
    RestartAgent(usize),
    CutPartners,
    HealPartners,
    CutWitness(usize),
    HealWitness(usize),
    RestartWitness,
    /// FAILOVER sent to the principal's agent.
    Failover,
    /// SUSPEND sent to the principal's agent.
    Suspend,
    /// RESUME sent to the principal's agent.
    Resume,
}

/// Which faults a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// Process and network faults only (the witness test's schedules).
    Faults,
    /// Those plus operator commands (FAILOVER, SUSPEND, RESUME).
    WithCommands,
}

/// What the schedule knows of the cluster, to pick faults that apply.
#[derive(Default, Clone)]
pub struct Model {
    dead: [bool; 2],
    frozen: [bool; 2],
    partners_cut: bool,
    witness_cut: [bool; 2],
    suspended: bool,
}

/// `steps` faults drawn from `kinds`, determined by `seed`. With
/// [`Kinds::Faults`] a seed gives the schedules it always gave.
pub fn schedule(seed: u64, steps: usize, kinds: Kinds) -> Vec<Fault> {
    let mut random = seed.max(1);
    let mut next = move |bound: u64| {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random % bound
    };
    let choices = match kinds {
        Kinds::Faults => 10,
        Kinds::WithCommands => 13,
    };
    let mut model = Model::default();
    let mut faults = Vec::new();
    while faults.len() < steps {
        let partner = next(2) as usize;
        let fault = match next(choices) {
            0 if !model.dead[partner] && !model.frozen[partner] => Fault::KillServer(partner),
            1 if !model.dead[partner] && !model.frozen[partner] => Fault::KillPostgres(partner),
            2 if !model.dead[partner] && !model.frozen[partner] => Fault::Freeze(partner),
            3 | 4 if model.frozen[partner] => Fault::Thaw(partner),
            3 | 4 if model.dead[partner] => Fault::RestartAgent(partner),
            5 if !model.partners_cut => Fault::CutPartners,
            6 if model.partners_cut => Fault::HealPartners,
            7 if !model.witness_cut[partner] => Fault::CutWitness(partner),
            8 if model.witness_cut[partner] => Fault::HealWitness(partner),
            9 => Fault::RestartWitness,
            10 => Fault::Failover,
            11 if !model.suspended => Fault::Suspend,
            12 if model.suspended => Fault::Resume,
            _ => continue,
        };
        match fault {
            Fault::KillServer(p) => model.dead[p] = true,
            Fault::Freeze(p) => model.frozen[p] = true,
            Fault::Thaw(p) => model.frozen[p] = false,
            Fault::RestartAgent(p) => model.dead[p] = false,
            Fault::CutPartners => model.partners_cut = true,
            Fault::HealPartners => model.partners_cut = false,
            Fault::CutWitness(p) => model.witness_cut[p] = true,
            Fault::HealWitness(p) => model.witness_cut[p] = false,
            Fault::Suspend => model.suspended = true,
            Fault::Resume => model.suspended = false,
            Fault::KillPostgres(_) | Fault::RestartWitness | Fault::Failover => {}
        }
        faults.push(fault);
    }
    faults
}

pub fn signal_agent(partner: &Partner, signal: Signal) {
    if let Some(agent) = &partner.agent {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), signal);
    }
}

pub fn target(pair: &mut Pair, index: usize) -> &mut Partner {
    if index == 0 {
        &mut pair.a
    } else {
        &mut pair.b
    }
}

/// The partner (0 or 1) that says it is principal, at the highest epoch
/// if both do; None when neither answers as principal in time.
pub async fn principal(pair: &Pair) -> Option<usize> {
    let (a, b) = tokio::join!(
        principal_epoch(pair, &pair.a),
        principal_epoch(pair, &pair.b)
    );
    match (a, b) {
        (Some(a), Some(b)) => Some(if b > a { 1 } else { 0 }),
        (Some(_), None) => Some(0),
        (None, Some(_)) => Some(1),
        (None, None) => None,
    }
}

/// `partner`'s epoch if it answers in time as principal.
async fn principal_epoch(pair: &Pair, partner: &Partner) -> Option<u64> {
    let status = tokio::time::timeout(CONTROL_LIMIT, async {
        pair.control(partner).await.status().await
    })
    .await
    .ok()?
    .ok()?;
    (status.mirroring_role_desc.as_deref() == Some("PRINCIPAL"))
        .then_some(status.mirroring_role_sequence.unwrap_or_default())
}

/// Sends `command` to the principal's agent; returns what happened, for
/// the log (a refusal or an unreachable principal is not an error here).
async fn command_principal(pair: &Pair, command: Command) -> String {
    let Some(index) = principal(pair).await else {
        return "no principal answered".into();
    };
    let partner = if index == 0 { &pair.a } else { &pair.b };
    match tokio::time::timeout(CONTROL_LIMIT, pair.command(partner, command)).await {
        Ok(Ok(answer)) => format!("{}: {answer}", partner.name),
        Ok(Err(err)) => format!("{}: {err}", partner.name),
        Err(_) => format!("{}: no answer within {CONTROL_LIMIT:?}", partner.name),
    }
}

/// Applies `fault` to the pair (which needs links and a witness for the
/// link faults); returns a note for the log.
pub async fn apply(pair: &mut Pair, fault: Fault) -> String {
    match fault {
        Fault::KillServer(p) => target(pair, p).kill9(),
        Fault::KillPostgres(p) => target(pair, p).engine.signal_all(Signal::SIGKILL),
        Fault::Freeze(p) => {
            let partner = target(pair, p);
            signal_agent(partner, Signal::SIGSTOP);
            partner.engine.signal_all(Signal::SIGSTOP);
        }
        Fault::Thaw(p) => {
            let partner = target(pair, p);
            signal_agent(partner, Signal::SIGCONT);
            partner.engine.signal_all(Signal::SIGCONT);
        }
        Fault::RestartAgent(p) => target(pair, p).start_agent(),
        Fault::CutPartners => pair.cut_partners(),
        Fault::HealPartners => pair.heal_partners(),
        Fault::CutWitness(p) | Fault::HealWitness(p) => {
            let (a, b) = pair.witness_links.as_ref().expect("a pair with links");
            let link = if p == 0 { a } else { b };
            if matches!(fault, Fault::CutWitness(_)) {
                link.black_hole()
            } else {
                link.heal()
            }
        }
        Fault::RestartWitness => {
            let witness = pair.witness.as_mut().expect("a pair with a witness");
            witness.kill9();
            witness.start();
        }
        Fault::Failover => return command_principal(pair, Command::Failover).await,
        Fault::Suspend => return command_principal(pair, Command::Suspend).await,
        Fault::Resume => return command_principal(pair, Command::Resume).await,
    }
    String::new()
}

/// Undoes every lasting process and network fault: thaws both partners,
/// heals every link, restarts agents that are gone. Operator state (a
/// suspended session) is the caller's to undo.
pub async fn heal_all(pair: &mut Pair) {
    for index in 0..2 {
        apply(pair, Fault::Thaw(index)).await;
        apply(pair, Fault::HealWitness(index)).await;
        let partner = target(pair, index);
        if partner
            .agent
            .as_mut()
            .is_none_or(|agent| agent.has_exited())
        {
            partner.start_agent();
        }
    }
    apply(pair, Fault::HealPartners).await;
}

/// Sends `signal` to `partner`'s fence process (`pgmirror fence`, a child
/// of its agent in a process group of its own, which `Freeze` spares).
pub fn signal_fence(partner: &Partner, signal: Signal) {
    let Some(agent) = &partner.agent else {
        return;
    };
    for pid in super::process::descendants(agent.pid()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|byte| *byte == 0).nth(1) == Some(b"fence".as_slice()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }
}
