//! Benchmark of automatic failover (issue 4), run by `bench/failover`: with
//! TIMEOUT 2 s and a witness, the time from kill -9 of the principal (its
//! PostgreSQL and its agent: the server died) to the first acknowledged
//! write on the new principal, over 10 runs. With `BENCH_FAULT=freeze` the
//! fault is a SIGSTOP of the principal's agent alone: its PostgreSQL keeps
//! running until the fence kills it at the end of the lease (issue 10).
//!
//! For comparison, pg_auto_failover's defaults take 20-50 s and Patroni's
//! about 30-40 s (published defaults; not measured here).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, WitnessChoice};

const TIMEOUT_SECS: u64 = 2;

/// Time until a write on `port` is acknowledged; a connect may take up to
/// `connect_limit` (the proxy holds new connections during a failover).
async fn first_write(port: u16, connect_limit: Duration, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(Ok(client)) =
            tokio::time::timeout(connect_limit, common::pg::connect_port(port)).await
        {
            let write = client.batch_execute("INSERT INTO beats VALUES (now())");
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), write).await {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut pair = Pair::start(PairOptions {
        timeout: TIMEOUT_SECS,
        witness: WitnessChoice::Own,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    pair.wait_witness_synchronized().await;
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE beats (at timestamptz)")
        .await
        .unwrap();
    let freeze = std::env::var("BENCH_FAULT").as_deref() == Ok("freeze");
    let fault = if freeze {
        "SIGSTOP of the principal's agent"
    } else {
        "kill -9"
    };
    let proxy = common::proxy::ProxyHandle::in_front_of(&pair, "").await;
    let mut timings = Vec::new();
    let mut through_proxy = Vec::new();
    for run in 0..runs {
        let a_is_principal =
            pair.status(&pair.a).await.mirroring_role_desc.as_deref() == Some("PRINCIPAL");
        let (principal, mirror) = if a_is_principal {
            (&mut pair.a, &mut pair.b)
        } else {
            (&mut pair.b, &mut pair.a)
        };
        let mirror_port = mirror.pg_port();
        let agent = principal
            .agent
            .as_ref()
            .map(|agent| nix::unistd::Pid::from_raw(agent.pid() as i32));
        if freeze {
            if let Some(agent) = agent {
                let _ = nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP);
            }
        } else {
            principal.kill9();
        }
        let limit = Duration::from_secs(60);
        let (direct, proxied) = tokio::join!(
            first_write(mirror_port, Duration::from_millis(200), limit),
            first_write(proxy.port, limit, limit)
        );
        let (Some(direct), Some(proxied)) = (direct, proxied) else {
            panic!("run {run}: no write within 60 s (direct {direct:?}, proxy {proxied:?})");
        };
        println!(
            "run {run}: {fault} to first acknowledged write on the new principal: direct {direct:?}, through the proxy {proxied:?}"
        );
        timings.push(direct);
        through_proxy.push(proxied);
        match (freeze, agent) {
            (true, Some(agent)) => {
                let _ = nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT);
            }
            _ => principal.start_agent(),
        }
        pair.wait_state("SYNCHRONIZED").await;
        pair.wait_witness_synchronized().await;
    }
    timings.sort();
    through_proxy.sort();
    println!(
        "through the proxy: median {:?}, min {:?}, max {:?}",
        through_proxy[through_proxy.len() / 2],
        through_proxy[0],
        through_proxy[through_proxy.len() - 1]
    );
    println!(
        "automatic failover after {fault} with TIMEOUT {TIMEOUT_SECS} s (direct connection): median {:?}, min {:?}, max {:?} over {} runs (target <= TIMEOUT + 1.5 s = {} s)",
        timings[timings.len() / 2],
        timings[0],
        timings[timings.len() - 1],
        timings.len(),
        TIMEOUT_SECS as f64 + 1.5
    );
}
