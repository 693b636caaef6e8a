//! Soak of real fault schedules (issue 10 item 6), run by `bench/soak-real`:
//! for seed after seed while the time budget lasts, a witnessed pair with
//! cuttable links (TIMEOUT 2 s, SAFETY FULL), a proxy in front of it, the
//! bank workload through the proxy, write probes with `synchronous_commit =
//! local` straight to both PostgreSQL servers, and a seeded schedule of
//! faults (kills, freezes, cut links, agent and witness restarts, FAILOVER,
//! SUSPEND, RESUME) 1.5 s apart. Then everything is healed, the pair must
//! synchronize again, and the bench checks:
//!
//! - every acknowledged transfer is present on the principal and the bank's
//!   total is intact (I2);
//! - no probe round in which both servers acknowledged a write (I1; a
//!   conservative check: a round probes alpha then beta within a few
//!   hundred ms, far less than any legitimate hand-over takes);
//! - after each freeze of the principal, the failover write gap: from the
//!   freeze to the first write acknowledged through the proxy by the other
//!   server.
//!
//! A failing schedule (a check, a panic, a timeout) is recorded and the run
//! goes on; the summary names the first failing seed and how to rerun it.
//! Configured by `SOAK_BUDGET_MINUTES` and `SOAK_START_SEED` (the script's
//! arguments).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bank::{self, Workload};
use common::cluster::{Pair, PairOptions, WitnessChoice, SLOW};
use common::faults::{self, Fault, Kinds};
use common::probe;
use common::proxy::ProxyHandle;

const TIMEOUT_SECS: u64 = 2;
const FAULTS: usize = 10;
const STEP: Duration = Duration::from_millis(1500);
/// A failover write gap longer than this counts as "no write".
const GAP_LIMIT: Duration = Duration::from_secs(60);
/// A schedule that has not finished in this long is abandoned (a failure).
const SCHEDULE_LIMIT: Duration = Duration::from_secs(480);

/// What came after a freeze of the principal.
#[derive(Debug, Clone, Copy)]
enum Gap {
    /// The other server acknowledged a write through the proxy this long
    /// after the freeze.
    Failover(Duration),
    /// The frozen principal, thawed, served again before any takeover.
    Thawed,
    /// No write through the proxy within [`GAP_LIMIT`].
    None,
}

/// One schedule's figures.
#[derive(Debug, Default)]
struct Outcome {
    faults: Vec<Fault>,
    acknowledged: usize,
    lost: Vec<i64>,
    total_ok: bool,
    /// Probe rounds in which both servers acknowledged, described.
    two_writers: Vec<String>,
    gaps: Vec<Gap>,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.lost.is_empty() && self.total_ok && self.two_writers.is_empty()
    }
}

/// Writes through the proxy from `frozen_at` until a server other than
/// the one on `old_port` acknowledges one.
async fn failover_gap(proxy_port: u16, old_port: u16, frozen_at: Instant) -> Gap {
    let write = "INSERT INTO probes VALUES (now()) RETURNING current_setting('port')::int";
    while frozen_at.elapsed() < GAP_LIMIT {
        let remaining = GAP_LIMIT.saturating_sub(frozen_at.elapsed());
        let Ok(Ok(client)) =
            tokio::time::timeout(remaining, common::pg::connect_port(proxy_port)).await
        else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // A write that fails or hangs (the frozen principal) costs this
        // connection; the next one goes where the proxy routes now.
        let answer = tokio::time::timeout(Duration::from_secs(1), client.query_one(write, &[]));
        if let Ok(Ok(row)) = answer.await {
            let port: i32 = row.get(0);
            return if i32::from(old_port) == port {
                Gap::Thawed
            } else {
                Gap::Failover(frozen_at.elapsed())
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Gap::None
}

/// Resumes a suspended session and waits until both partners are
/// SYNCHRONIZED.
async fn settle(pair: &mut Pair) {
    let deadline = Instant::now() + SLOW;
    loop {
        let states = futures::future::join_all([&pair.a, &pair.b].map(|partner| async {
            tokio::time::timeout(Duration::from_secs(3), async {
                pair.control(partner).await.status().await
            })
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|status| status.state().map(str::to_string))
        }))
        .await;
        if states
            .iter()
            .all(|state| state.as_deref() == Some("SYNCHRONIZED"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pair never synchronized again after healing: {states:?}"
        );
        if states
            .iter()
            .any(|state| state.as_deref() == Some("SUSPENDED"))
        {
            faults::apply(pair, Fault::Resume).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints every process's log (agents and witness) of a failed schedule.
fn print_logs(pair: &Pair) {
    for partner in [&pair.a, &pair.b] {
        if let Some(agent) = &partner.agent {
            eprintln!(
                "--- pgmirror {} output ---\n{}",
                partner.name,
                agent.output()
            );
        }
    }
    if let Some(process) = pair.witness.as_ref().and_then(|w| w.process.as_ref()) {
        eprintln!("--- pgmirror witness output ---\n{}", process.output());
    }
}

async fn run_schedule(seed: u64) -> Outcome {
    let faults = faults::schedule(seed, FAULTS, Kinds::WithCommands);
    let mut pair = Pair::start(PairOptions {
        timeout: TIMEOUT_SECS,
        witness: WitnessChoice::Own,
        links: true,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    pair.wait_witness_synchronized().await;
    let setup = pair.a.sql().await;
    bank::create(&setup).await;
    setup
        .batch_execute("CREATE TABLE probes (at timestamptz)")
        .await
        .expect("create probes");
    let pg_ports = vec![pair.a.pg_port(), pair.b.pg_port()];
    let proxy = ProxyHandle::in_front_of(&pair, "").await;
    let workload = Workload::start(vec![proxy.port], 4, seed);
    workload.wait_for_progress(50, SLOW).await;
    let probes_began = Instant::now();
    let probes = probe::rounds(
        pg_ports.clone(),
        "local",
        STEP * FAULTS as u32 + Duration::from_secs(10),
    );
    let mut gaps = Vec::new();
    for (step, fault) in faults.iter().enumerate() {
        let frozen_principal = match fault {
            Fault::Freeze(p) => faults::principal(&pair).await == Some(*p),
            _ => false,
        };
        let at = Instant::now();
        let mut note = faults::apply(&mut pair, *fault).await;
        if let (true, Fault::Freeze(p)) = (frozen_principal, fault) {
            gaps.push(tokio::spawn(failover_gap(proxy.port, pg_ports[*p], at)));
            note.push_str("(the principal: write gap measured from here)");
        }
        println!(
            "  seed {seed} step {step} at {:.1}s: {fault:?} {note}",
            at.duration_since(probes_began).as_secs_f64()
        );
        tokio::time::sleep(STEP).await;
    }
    faults::heal_all(&mut pair).await;
    settle(&mut pair).await;
    workload.wait_for_progress(50, SLOW).await;
    let acknowledged = workload.stop().await;
    let rounds = probes.await.expect("probe task");
    let mut outcome = Outcome {
        faults,
        acknowledged: acknowledged.len(),
        ..Outcome::default()
    };
    for gap in gaps {
        outcome.gaps.push(gap.await.expect("gap task"));
    }
    outcome.two_writers = rounds
        .iter()
        .filter(|round| round.writers() > 1)
        .map(|round| {
            let at = |ack: Option<Instant>| {
                ack.map(|ack| format!("{:.3}s", ack.duration_since(probes_began).as_secs_f64()))
                    .unwrap_or_default()
            };
            format!(
                "round at {:.3}s: alpha acked {}, beta acked {}",
                round.began.duration_since(probes_began).as_secs_f64(),
                at(round.acked[0]),
                at(round.acked[1])
            )
        })
        .collect();
    let (_, client) = bank::writable(&pg_ports)
        .await
        .expect("a principal after the schedule");
    let audit = bank::audit(&client, &acknowledged)
        .await
        .expect("audit the bank");
    outcome.total_ok = audit.total_ok();
    outcome.lost = audit.lost;
    if !outcome.passed() {
        print_logs(&pair);
    }
    proxy.stop().await;
    outcome
}

fn seconds(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let budget = Duration::from_secs(60 * var("SOAK_BUDGET_MINUTES", 30));
    let start_seed = var("SOAK_START_SEED", 1);
    let began = Instant::now();
    println!(
        "soak-real: seeds from {start_seed}, budget {budget:?}, {FAULTS} faults {STEP:?} apart, TIMEOUT {TIMEOUT_SECS} s, SAFETY FULL, witness, bank workload through the proxy"
    );
    let (mut runs, mut lost, mut two_writers, mut acknowledged) = (0usize, 0usize, 0usize, 0usize);
    let mut gaps = Vec::new();
    let (mut thawed, mut no_write) = (0usize, 0usize);
    let mut failed: Vec<(u64, String)> = Vec::new();
    let mut seed = start_seed;
    while began.elapsed() < budget {
        let started = Instant::now();
        let task = tokio::spawn(run_schedule(seed));
        let abort = task.abort_handle();
        let result = tokio::time::timeout(SCHEDULE_LIMIT, task).await;
        runs += 1;
        let elapsed = seconds(started.elapsed());
        match result {
            Ok(Ok(outcome)) => {
                lost += outcome.lost.len();
                two_writers += outcome.two_writers.len();
                acknowledged += outcome.acknowledged;
                for gap in &outcome.gaps {
                    match gap {
                        Gap::Failover(gap) => gaps.push(*gap),
                        Gap::Thawed => thawed += 1,
                        Gap::None => no_write += 1,
                    }
                }
                let gap_text: Vec<String> = outcome
                    .gaps
                    .iter()
                    .map(|gap| match gap {
                        Gap::Failover(gap) => seconds(*gap),
                        Gap::Thawed => "thawed first".into(),
                        Gap::None => "no write".into(),
                    })
                    .collect();
                println!(
                    "seed {seed}: faults {:?}; {} acknowledged, {} lost{}, total {}, {} two-writer rounds, freeze gaps [{}] ({elapsed})",
                    outcome.faults,
                    outcome.acknowledged,
                    outcome.lost.len(),
                    if outcome.lost.is_empty() {
                        String::new()
                    } else {
                        format!(" {:?}", &outcome.lost[..outcome.lost.len().min(10)])
                    },
                    if outcome.total_ok { "ok" } else { "CHANGED" },
                    outcome.two_writers.len(),
                    gap_text.join(", ")
                );
                for round in &outcome.two_writers {
                    println!("  seed {seed} two writers: {round}");
                }
                if !outcome.passed() {
                    failed.push((seed, "a check failed".into()));
                }
            }
            Ok(Err(err)) => {
                let reason = if err.is_panic() {
                    let panic = err.into_panic();
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into())
                } else {
                    err.to_string()
                };
                println!("seed {seed}: FAILED ({elapsed}): {reason}");
                failed.push((seed, reason));
            }
            Err(_) => {
                abort.abort();
                println!("seed {seed}: FAILED: not finished within {SCHEDULE_LIMIT:?}");
                failed.push((seed, format!("not finished within {SCHEDULE_LIMIT:?}")));
            }
        }
        seed += 1;
    }
    gaps.sort();
    println!("--- soak-real summary ---");
    println!(
        "schedules run: {runs} (seeds {start_seed}..={}), in {}; failed: {}",
        seed - 1,
        seconds(began.elapsed()),
        failed.len()
    );
    println!(
        "transfers acknowledged: {acknowledged}; acknowledged transfers lost: {lost} (target 0)"
    );
    println!("two-writer probe rounds: {two_writers} (target 0)");
    if gaps.is_empty() {
        println!("failover write gap after a frozen principal: no measurement");
    } else {
        println!(
            "failover write gap after a frozen principal (TIMEOUT {TIMEOUT_SECS} s, through the proxy): median {}, min {}, max {} over {} freezes ({thawed} thawed before a takeover, {no_write} with no write within {GAP_LIMIT:?})",
            seconds(gaps[gaps.len() / 2]),
            seconds(gaps[0]),
            seconds(gaps[gaps.len() - 1]),
            gaps.len()
        );
    }
    for (seed, reason) in &failed {
        println!("failed seed {seed}: {reason}");
    }
    if let Some((seed, _)) = failed.first() {
        println!("first failing seed: {seed}; rerun it with: bench/soak-real 5 {seed}");
        std::process::exit(1);
    }
}
