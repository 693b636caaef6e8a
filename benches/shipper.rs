//! Benchmark of the log shipper (issue 3), run by `bench/shipper`: pgbench
//! TPC-B under SAFETY FULL through pgmirror against the same two kinds of
//! instance under PostgreSQL's own synchronous streaming replication, the
//! link's bytes per WAL byte, and manual failover time.
//!
//! Prints numbers; asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions};
use common::PgInstance;
use pgmirror::control::Command;
use pgmirror::partner::engine::Instance;
use pgmirror::wire::lsn::Lsn;

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

fn pgbench(port: u16, args: &[&str]) -> String {
    let output = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

fn tps(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .expect("tps in pgbench output")
}

fn tpcb(port: u16) -> f64 {
    pgbench(port, &["-i", "-q", "-s", "10"]);
    let duration = seconds().to_string();
    tps(&pgbench(port, &["-c", "8", "-j", "2", "-T", &duration]))
}

async fn wal_lsn(port: u16) -> Lsn {
    let client = common::pg::connect_port(port).await.expect("connect");
    common::pg::current_lsn(&client).await
}

/// PostgreSQL's own synchronous streaming replication between two local instances.
async fn baseline() -> f64 {
    let primary = PgInstance::start_with(&[
        "max_wal_senders = 10",
        "synchronous_standby_names = 'standby'",
    ]);
    let client = primary.connect().await;
    client
        .batch_execute("SELECT pg_create_physical_replication_slot('bench')")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    primary.engine.run_as.hand_over(dir.path()).unwrap();
    let standby = Instance {
        data_dir: dir.path().join("data"),
        socket_dir: dir.path().to_path_buf(),
        port: common::free_port(),
        ..primary.engine.clone()
    };
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=standby",
        primary.port()
    );
    standby.base_backup(&conninfo, "bench").unwrap();
    standby
        .write_settings(
            "127.0.0.1",
            &[
                format!("primary_conninfo = '{conninfo}'"),
                "primary_slot_name = 'bench'".into(),
            ],
        )
        .unwrap();
    standby.set_standby(true).unwrap();
    standby.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = client
            .query_opt("SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'", &[])
            .await
            .unwrap();
        if row.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the baseline standby never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tps = tpcb(primary.port());
    let _ = standby.stop(pgmirror::partner::engine::StopMode::Immediate);
    tps
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "pgbench TPC-B -s 10 -c 8 -j 2 -T {} under synchronous commit",
        seconds()
    );
    let baseline_tps = baseline().await;
    println!("  PostgreSQL synchronous streaming replication: {baseline_tps:.0} tps");

    let pair = Pair::start(PairOptions::default());
    pair.wait_state("SYNCHRONIZED").await;
    let port = pair.a.pg_port();
    let wal_start = wal_lsn(port).await;
    let before = pair.status(&pair.a).await;
    let pgmirror_tps = tpcb(port);
    let wal = wal_lsn(port).await.bytes_since(wal_start);
    pair.wait_for(&pair.a, "caught up", Duration::from_secs(120), |status| {
        status.send_queue_bytes == Some(0)
    })
    .await;
    let after = pair.status(&pair.a).await;
    let compressed = after.link_bytes_compressed - before.link_bytes_compressed;
    println!("  pgmirror shipper, SAFETY FULL, mutual TLS + zstd: {pgmirror_tps:.0} tps");
    println!(
        "  ratio pgmirror / PostgreSQL: {:.2} (target >= 0.9)",
        pgmirror_tps / baseline_tps
    );
    println!(
        "link bytes / WAL bytes: {compressed} / {wal} = {:.3} (target <= 0.35); raw link bytes {}",
        compressed as f64 / wal as f64,
        after.link_bytes_raw - before.link_bytes_raw
    );

    let mut timings = Vec::new();
    for round in 0..6 {
        let (from, to) = if round % 2 == 0 {
            (&pair.a, &pair.b)
        } else {
            (&pair.b, &pair.a)
        };
        pair.wait_state("SYNCHRONIZED").await;
        let started = Instant::now();
        let response = pair.command(from, Command::Failover).await;
        assert!(response.is_ok(), "{response:?}");
        let client = to.sql().await;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS probe (id int); INSERT INTO probe VALUES (1)",
            )
            .await
            .unwrap();
        timings.push(started.elapsed());
    }
    timings.sort();
    println!(
        "manual FAILOVER, command to first write on the new principal: median {:?}, min {:?}, max {:?} over {} runs (target < 1 s)",
        timings[timings.len() / 2],
        timings[0],
        timings[timings.len() - 1],
        timings.len()
    );
}
