//! Benchmark of a failover under a transaction-mode pool (issue 13), run by
//! `bench/pool`: 1,000 idle clients (BENCH_IDLE_CLIENTS), each with its own
//! search_path and application_name, logged in through the proxy in front
//! of a pair with a witness; a manual FAILOVER; then every client runs a
//! statement. Per run: clients that saw an error (or ran anywhere but on
//! the new principal, or without their own settings), and the seconds from
//! the FAILOVER until all of them had run on the new principal. Runs
//! BENCH_RUNS (default 3) failovers back and forth, and prints the median,
//! min and max on a line starting with `summary:`.
//!
//! The baseline is not measured here: PgBouncer, and this proxy with
//! pass-through authentication, end every client's connection at a
//! failover, so each of the 1,000 sees an error.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::PairOptions;
use common::pooled_pair::{
    check_all, create_tenant_schemas, not_on_principal, Failover, PooledPair, TenantClient,
};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count = env_or("BENCH_IDLE_CLIENTS", 1000);
    let runs = env_or("BENCH_RUNS", 3);
    let mut pooled = PooledPair::start(
        PairOptions {
            timeout: 3,
            ..PairOptions::default()
        },
        20,
        "",
    )
    .await;
    create_tenant_schemas(&pooled.pair.a.sql().await, count).await;
    let started = Instant::now();
    let clients = TenantClient::connect_many(&pooled, count).await;
    println!("{count} clients logged in in {:?}", started.elapsed());
    let warm = check_all(&clients, 0, Duration::from_secs(120)).await;
    let failed = warm.iter().filter(|outcome| outcome.is_err()).count();
    assert_eq!(
        failed,
        0,
        "before any failover: {:?}",
        warm.iter().find(|o| o.is_err())
    );

    let mut errors = Vec::new();
    let mut seconds = Vec::new();
    for run in 1..=runs {
        // The last FAILOVER's resynchronization, so that this one starts
        // at once.
        pooled.pair.wait_state("SYNCHRONIZED").await;
        let started = Instant::now();
        let port = pooled.fail_over(Failover::Manual).await;
        let switched = started.elapsed();
        let outcomes = check_all(&clients, run as i32, Duration::from_secs(120)).await;
        let took = started.elapsed().as_secs_f64();
        let bad = not_on_principal(outcomes, port);
        println!(
            "run {run}: FAILOVER returned after {switched:?}; {} of {count} clients saw an error; \
             all ran on the new principal {took:.2} s after the FAILOVER{}",
            bad.len(),
            bad.first()
                .map(|first| format!(" (first error: {first})"))
                .unwrap_or_default()
        );
        errors.push(bad.len() as f64);
        seconds.push(took);
    }
    let summary = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        format!(
            "median {median:.2}, min {:.2}, max {:.2}",
            values[0],
            values[values.len() - 1]
        )
    };
    println!(
        "summary: {count} idle clients, {runs} manual FAILOVERs: clients with an error {}; \
         seconds until all ran on the new principal {}",
        summary(&mut errors),
        summary(&mut seconds)
    );
}
