//! PostgreSQL never outlives its fence (issue 10, item 1; I1): with only the
//! principal's agent frozen or killed, its PostgreSQL first keeps
//! acknowledging writes that do not wait for the mirror (the hole), then is
//! killed by the fence process before the mirror takes over, so no write is
//! acknowledged by the old principal after the new one acknowledged one.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, WitnessChoice, SLOW};
use common::probe;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgmirror::control::Command;
use pgmirror::roles::Safety;

const TIMEOUT: u64 = 3;

async fn witnessed(safety: Safety) -> Pair {
    let pair = Pair::start(PairOptions {
        timeout: TIMEOUT,
        witness: WitnessChoice::Own,
        safety,
        ..PairOptions::default()
    });
    let state = match safety {
        Safety::Full => "SYNCHRONIZED",
        Safety::Off => "UNSYNCHRONIZED",
    };
    pair.wait_state(state).await;
    if safety == Safety::Full {
        pair.wait_witness_synchronized().await;
    }
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE probes (at timestamptz)")
        .await
        .unwrap();
    pair
}

fn agent_pid(pair: &Pair) -> Pid {
    Pid::from_raw(pair.a.agent.as_ref().expect("alpha's agent").pid() as i32)
}

/// Runs `fault` on alpha's agent under write probes with `synchronous_commit`
/// set to `commit`; `take_over` makes beta the principal. Checks that alpha
/// acknowledged a probe after the fault when `frozen` (the hole the fence
/// closes: PostgreSQL outlives a frozen agent until the lease ends), that
/// its postmaster is gone, and that none of its probes came after beta's first.
async fn fenced_after(
    pair: &mut Pair,
    commit: &'static str,
    frozen: bool,
    fault: impl FnOnce(&mut Pair),
    take_over: impl AsyncFnOnce(&Pair),
) {
    let ports = vec![pair.a.pg_port(), pair.b.pg_port()];
    let probes = probe::writes(ports, commit, Duration::from_secs(8 * TIMEOUT));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Instant::now();
    fault(pair);
    take_over(pair).await;
    pair.wait_for(&pair.b, "the principal", SLOW, |status| {
        status.mirroring_role_desc.as_deref() == Some("PRINCIPAL")
    })
    .await;
    let accepted = probes.await.unwrap();
    let (alpha, beta) = (&accepted[0], &accepted[1]);
    let alpha_after_fault = alpha.iter().filter(|at| **at > fault_at).count();
    println!(
        "alpha acknowledged {alpha_after_fault} probes after the fault, the last {:?} after it; \
         beta's first {:?} after it",
        alpha
            .last()
            .map(|at| at.saturating_duration_since(fault_at)),
        beta.first()
            .map(|at| at.saturating_duration_since(fault_at)),
    );
    assert!(
        !frozen || alpha_after_fault > 0,
        "alpha's PostgreSQL acknowledged nothing after the freeze: the hole was not staged"
    );
    let first_beta = *beta.first().expect("beta never acknowledged a write");
    assert!(
        alpha.iter().all(|at| *at < first_beta),
        "alpha acknowledged a write after beta's first: two writers (I1)"
    );
    assert!(
        pair.a.engine.postmaster_pid().is_none(),
        "alpha's postmaster outlived its agent's lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agents_postgres_is_fenced_before_the_mirror_takes_over() {
    let mut pair = witnessed(Safety::Full).await;
    let frozen = agent_pid(&pair);
    fenced_after(
        &mut pair,
        "local",
        true,
        |_| kill(frozen, Signal::SIGSTOP).unwrap(),
        async |_| {},
    )
    .await;
    kill(frozen, Signal::SIGCONT).unwrap();
    pair.wait_mirror_again(&pair.a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_postgres_is_fenced_at_once() {
    let mut pair = witnessed(Safety::Full).await;
    fenced_after(
        &mut pair,
        "local",
        false,
        |pair| {
            if let Some(agent) = &mut pair.a.agent {
                agent.kill9();
            }
            // The pipe closed: the fence kills PostgreSQL at once.
            assert!(pair.a.engine.wait_gone(Duration::from_secs(2)));
        },
        async |_| {},
    )
    .await;
    pair.a.start_agent();
    pair.wait_state("SYNCHRONIZED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_off_a_frozen_agents_postgres_is_fenced_before_forced_service() {
    let mut pair = witnessed(Safety::Off).await;
    let frozen = agent_pid(&pair);
    fenced_after(
        &mut pair,
        "off",
        true,
        |_| kill(frozen, Signal::SIGSTOP).unwrap(),
        async |pair| {
            // The witness grants forced service only once the principal's
            // lease has surely ended; retry until it does.
            let deadline = Instant::now() + SLOW;
            loop {
                match pair
                    .command(&pair.b, Command::ForceServiceAllowDataLoss)
                    .await
                {
                    Ok(_) => return,
                    Err(err) => println!("forced service not yet: {err}"),
                }
                assert!(Instant::now() < deadline, "forced service never granted");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        },
    )
    .await;
    kill(frozen, Signal::SIGCONT).unwrap();
}
