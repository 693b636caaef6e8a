//! Benchmark of the log shipper (issues 3 and 14), run by `bench/shipper`:
//! pgbench TPC-B under SAFETY FULL through pgmirror (mutual TLS and zstd on
//! the link) beside two baselines from the same run: PostgreSQL's own
//! synchronous streaming replication, and the same replication carried
//! through two chained bare TCP relays (the shipper's two extra hops without
//! TLS, compression or parsing: the physical limit of any relaying design).
//! Also the commit latency that the synchronous wait adds, the link's bytes
//! per WAL byte, and manual failover time.
//!
//! The three setups run side by side and are measured in interleaved rounds
//! (`BENCH_ROUNDS`, default 3), so that a neighbour's load on this shared
//! machine hits them alike; each round's figures are printed beside their
//! baselines, then the median, min and max over the rounds.
//!
//! The agents and the relays each run in a session of their own, as
//! PostgreSQL's servers do (pg_ctl starts them so) and as a service manager
//! starts a daemon: with the kernel's autogroup scheduling, a process left in
//! this bench's session would share one CPU share with pgbench.
//!
//! Prints numbers; asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions};
use common::PgInstance;
use pgmirror::control::Command;
use pgmirror::partner::engine::{Instance, StopMode};
use pgmirror::wire::lsn::Lsn;
use tempfile::TempDir;

/// Length of each pgbench run.
fn seconds() -> u64 {
    env_number("BENCH_SECONDS", 10)
}

fn rounds() -> usize {
    env_number("BENCH_ROUNDS", 3) as usize
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How a commit waits in one pgbench run: for the standby (the setup under
/// test) or only for the local flush (the same server with the synchronous
/// wait switched off for pgbench's sessions: what the wait adds is the
/// difference).
#[derive(Clone, Copy)]
enum Commit {
    Synchronous,
    Local,
}

/// One pgbench TPC-B run: its throughput and every transaction's latency.
struct Run {
    tps: f64,
    /// Microseconds, sorted.
    latencies: Vec<u64>,
}

impl Run {
    /// The `q` quantile of the transaction latencies, in milliseconds.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[index] as f64 / 1000.0
    }
}

fn pgbench(port: u16, commit: Commit, args: &[&str]) -> String {
    let mut command = std::process::Command::new("pgbench");
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres");
    if let Commit::Local = commit {
        command.env("PGOPTIONS", "-c synchronous_commit=local");
    }
    let output = command.output().expect("run pgbench");
    assert!(
        output.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn tps(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .expect("tps in pgbench output")
}

/// TPC-B with `clients` clients for `seconds()`, every transaction logged
/// (`--log`: the third field of each line is its latency in microseconds).
fn tpcb(port: u16, clients: u32, commit: Commit) -> Run {
    let logs = TempDir::new().expect("log dir");
    let prefix = logs.path().join("tx");
    let clients_arg = clients.to_string();
    let threads = clients.min(2).to_string();
    let duration = seconds().to_string();
    let report = pgbench(
        port,
        commit,
        &[
            "-c",
            &clients_arg,
            "-j",
            &threads,
            "-T",
            &duration,
            "--log",
            "--log-prefix",
            prefix.to_str().expect("utf-8 temp path"),
        ],
    );
    let mut latencies = transaction_latencies(logs.path());
    latencies.sort_unstable();
    Run {
        tps: tps(&report),
        latencies,
    }
}

fn transaction_latencies(dir: &Path) -> Vec<u64> {
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read log dir") {
        let text = std::fs::read_to_string(entry.expect("log entry").path()).expect("read log");
        latencies.extend(
            text.lines()
                .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    latencies
}

async fn wal_lsn(port: u16) -> Lsn {
    let client = common::pg::connect_port(port).await.expect("connect");
    common::pg::current_lsn(&client).await
}

/// Checkpoints now and not again during the bench: a timed checkpoint
/// inside one setup's run and not the others' (its full-page images
/// multiply the WAL) made rounds differ by up to 15% between setups.
async fn no_checkpoint_in_runs(port: u16) {
    let client = common::pg::connect_port(port).await.expect("connect");
    // One statement at a time: ALTER SYSTEM refuses a transaction block,
    // which a multi-statement query is.
    for statement in [
        "ALTER SYSTEM SET checkpoint_timeout = '1h'",
        "ALTER SYSTEM SET max_wal_size = '8GB'",
        "SELECT pg_reload_conf()",
        "CHECKPOINT",
    ] {
        client.batch_execute(statement).await.expect(statement);
    }
}

/// A bare relay (`examples/relay.rs`, whose path `bench/shipper` passes in
/// `PGMIRROR_BENCH_RELAY`): accepts on loopback and copies every connection
/// both ways to `to` with tokio's `copy_bidirectional`, nothing else. Each
/// relay is a process in a session of its own, as each pgmirror agent is
/// (see [`common::Pgmirror::spawn_in_own_session`]). Killed on drop.
struct BareRelay {
    port: u16,
    process: std::process::Child,
}

impl BareRelay {
    fn start(to: SocketAddr) -> BareRelay {
        let binary = std::env::var("PGMIRROR_BENCH_RELAY")
            .expect("PGMIRROR_BENCH_RELAY: run this benchmark with bench/shipper");
        let port = common::free_port();
        let process = std::process::Command::new("setsid")
            .arg(binary)
            .arg(format!("127.0.0.1:{port}"))
            .arg(to.to_string())
            .spawn()
            .expect("start the bare relay");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the bare relay never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        BareRelay { port, process }
    }
}

impl Drop for BareRelay {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A primary and a standby under PostgreSQL's own synchronous streaming
/// replication; with `relays`, the standby reaches the primary through two
/// chained bare relays.
struct SyncPair {
    primary: PgInstance,
    standby: Instance,
    _standby_dir: TempDir,
    /// The two chained relays, when the standby streams through them.
    _relays: Vec<BareRelay>,
}

impl SyncPair {
    async fn start(relays: bool) -> SyncPair {
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
        let conninfo = |port: u16| {
            format!("host=127.0.0.1 port={port} user=postgres application_name=standby")
        };
        standby
            .base_backup(&conninfo(primary.port()), "bench")
            .unwrap();
        let mut chain = Vec::new();
        if relays {
            let near = BareRelay::start(primary.addr());
            chain.push(BareRelay::start(([127, 0, 0, 1], near.port).into()));
            chain.push(near);
        }
        let stream_port = chain.first().map_or(primary.port(), |far| far.port);
        standby
            .write_settings(
                "127.0.0.1",
                &[
                    format!("primary_conninfo = '{}'", conninfo(stream_port)),
                    "primary_slot_name = 'bench'".into(),
                ],
            )
            .unwrap();
        standby.set_standby(true).unwrap();
        standby.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = client
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'",
                    &[],
                )
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
        pgbench(primary.port(), Commit::Local, &["-i", "-q", "-s", "10"]);
        SyncPair {
            primary,
            standby,
            _standby_dir: dir,
            _relays: chain,
        }
    }
}

impl Drop for SyncPair {
    fn drop(&mut self) {
        let _ = self.standby.stop(StopMode::Immediate);
    }
}

/// The four pgbench runs of one setup in one round.
struct Figures {
    c8: Run,
    c8_local: Run,
    c1: Run,
    c1_local: Run,
}

impl Figures {
    fn measure(port: u16) -> Figures {
        Figures::after(port, tpcb(port, 8, Commit::Synchronous))
    }

    /// The other three runs, after the synchronous `-c8` one.
    fn after(port: u16, c8: Run) -> Figures {
        Figures {
            c8,
            c8_local: tpcb(port, 8, Commit::Local),
            c1: tpcb(port, 1, Commit::Synchronous),
            c1_local: tpcb(port, 1, Commit::Local),
        }
    }

    /// The synchronous and the local run with `clients` clients.
    fn runs(&self, clients: u32) -> [&Run; 2] {
        match clients {
            1 => [&self.c1, &self.c1_local],
            _ => [&self.c8, &self.c8_local],
        }
    }

    /// Milliseconds the synchronous wait adds at quantile `q`.
    fn added_ms(&self, clients: u32, q: f64) -> f64 {
        let [wait, local] = self.runs(clients);
        wait.quantile_ms(q) - local.quantile_ms(q)
    }
}

/// pgmirror's runs of one round, with the link's byte counts over its
/// synchronous -c8 run alone (the -c1 runs ship smaller messages).
struct ShipperFigures {
    figures: Figures,
    wal: u64,
    /// Link bytes before compression, both ways.
    raw: u64,
    /// Link bytes after compression, both ways.
    compressed: u64,
}

impl ShipperFigures {
    async fn measure(pair: &Pair) -> ShipperFigures {
        let port = pair.a.pg_port();
        let wal_start = wal_lsn(port).await;
        let before = pair.status(&pair.a).await;
        let c8 = tpcb(port, 8, Commit::Synchronous);
        let wal = wal_lsn(port).await.bytes_since(wal_start);
        pair.wait_for(&pair.a, "caught up", Duration::from_secs(120), |status| {
            status.send_queue_bytes == Some(0)
        })
        .await;
        let after = pair.status(&pair.a).await;
        ShipperFigures {
            figures: Figures::after(port, c8),
            wal,
            raw: after.link_bytes_raw - before.link_bytes_raw,
            compressed: after.link_bytes_compressed - before.link_bytes_compressed,
        }
    }
}

/// One figure of all three setups, per round and summarised.
struct Series {
    label: &'static str,
    unit: &'static str,
    /// Per round: PostgreSQL direct, through bare relays, through pgmirror.
    values: Vec<[f64; 3]>,
}

impl Series {
    fn line(&self, values: &[f64; 3]) -> String {
        format!(
            "{}: PostgreSQL {:.2}{u} | bare relays {:.2}{u} | pgmirror {:.2}{u}",
            self.label,
            values[0],
            values[1],
            values[2],
            u = self.unit
        )
    }

    fn summary(&self) -> String {
        let stats = |index: usize| {
            let (median, min, max) = median_min_max(self.values.iter().map(|v| v[index]));
            format!("{median:.2}{u} ({min:.2}-{max:.2})", u = self.unit)
        };
        format!(
            "{}: PostgreSQL {} | bare relays {} | pgmirror {}",
            self.label,
            stats(0),
            stats(1),
            stats(2)
        )
    }
}

fn median_min_max(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "pgbench TPC-B -s 10, -T {} per run, {} rounds; 'added' latency = synchronous minus \
         synchronous_commit=local on the same server",
        seconds(),
        rounds()
    );
    let direct = SyncPair::start(false).await;
    let relayed = SyncPair::start(true).await;
    let pair = Pair::start(PairOptions {
        own_sessions: true,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let port = pair.a.pg_port();
    let wal_start = wal_lsn(port).await;
    let before = pair.status(&pair.a).await;
    pgbench(port, Commit::Local, &["-i", "-q", "-s", "10"]);
    let wal = wal_lsn(port).await.bytes_since(wal_start);
    pair.wait_for(&pair.a, "caught up", Duration::from_secs(120), |status| {
        status.send_queue_bytes == Some(0)
    })
    .await;
    let after = pair.status(&pair.a).await;
    let compressed = after.link_bytes_compressed - before.link_bytes_compressed;
    // Issue 3's figure covered pgbench -i and the run after it; the data
    // load's WAL (new pages) compresses far better than TPC-B's.
    println!(
        "link bytes / WAL bytes over pgbench -i -s 10: {compressed} / {wal} = {:.3}",
        compressed as f64 / wal as f64
    );

    for port in [direct.primary.port(), relayed.primary.port(), port] {
        no_checkpoint_in_runs(port).await;
    }

    let mut tps = Series {
        label: "tps -c8",
        unit: "",
        values: Vec::new(),
    };
    let mut latency = [
        (1, 0.5, "added p50 -c1"),
        (1, 0.99, "added p99 -c1"),
        (8, 0.5, "added p50 -c8"),
        (8, 0.99, "added p99 -c8"),
    ]
    .map(|(clients, q, label)| {
        (
            clients,
            q,
            Series {
                label,
                unit: " ms",
                values: Vec::new(),
            },
        )
    });
    let mut ratios = Vec::new();
    let mut link_ratios = Vec::new();
    for round in 1..=rounds() {
        // Each round starts with another setup, so that none always runs
        // first (after the previous round's load) or last.
        let (mut baseline, mut relays, mut shipper) = (None, None, None);
        for setup in 0..3 {
            match (round + setup) % 3 {
                0 => baseline = Some(Figures::measure(direct.primary.port())),
                1 => relays = Some(Figures::measure(relayed.primary.port())),
                _ => shipper = Some(ShipperFigures::measure(&pair).await),
            }
        }
        let (baseline, relays, shipper) = (baseline.unwrap(), relays.unwrap(), shipper.unwrap());
        let ShipperFigures {
            figures: shipper,
            wal,
            raw,
            compressed,
        } = shipper;
        let all = [&baseline, &relays, &shipper];

        println!("round {round}:");
        tps.values.push(all.map(|f| f.c8.tps));
        println!("  {}", tps.line(tps.values.last().unwrap()));
        let ratio = (
            relays.c8.tps / baseline.c8.tps,
            shipper.c8.tps / baseline.c8.tps,
        );
        ratios.push(ratio);
        println!(
            "  tps / PostgreSQL's: bare relays {:.3}, pgmirror {:.3} (target >= 0.95)",
            ratio.0, ratio.1
        );
        for (clients, q, series) in &mut latency {
            series.values.push(all.map(|f| f.added_ms(*clients, *q)));
            println!("  {}", series.line(series.values.last().unwrap()));
        }
        for (clients, label) in [(1, "p50/p99 -c1"), (8, "p50/p99 -c8")] {
            let row = all.map(|f| {
                f.runs(clients)
                    .map(|run| [run.quantile_ms(0.5), run.quantile_ms(0.99)])
            });
            println!(
                "  latency {label} ms, synchronous (local): PostgreSQL {:.2}/{:.2} ({:.2}/{:.2}) | \
                 bare relays {:.2}/{:.2} ({:.2}/{:.2}) | pgmirror {:.2}/{:.2} ({:.2}/{:.2})",
                row[0][0][0], row[0][0][1], row[0][1][0], row[0][1][1],
                row[1][0][0], row[1][0][1], row[1][1][0], row[1][1][1],
                row[2][0][0], row[2][0][1], row[2][1][0], row[2][1][1],
            );
        }
        let link_ratio = compressed as f64 / wal as f64;
        link_ratios.push(link_ratio);
        println!(
            "  link bytes / WAL bytes: {compressed} / {wal} = {link_ratio:.3} (target <= 0.20); \
             raw link bytes {raw}"
        );
    }

    println!("median (min-max) over {} rounds:", rounds());
    println!("  {}", tps.summary());
    let (median, min, max) = median_min_max(ratios.iter().map(|r| r.0));
    println!("  tps bare relays / PostgreSQL: {median:.3} ({min:.3}-{max:.3})");
    let (median, min, max) = median_min_max(ratios.iter().map(|r| r.1));
    println!("  tps pgmirror / PostgreSQL: {median:.3} ({min:.3}-{max:.3}) (target >= 0.95)");
    for (_, _, series) in &latency {
        println!("  {}", series.summary());
    }
    let (median, min, max) = median_min_max(link_ratios.iter().copied());
    println!("  link bytes / WAL bytes: {median:.3} ({min:.3}-{max:.3}) (target <= 0.20)");

    drop(relayed);
    drop(direct);
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
