//! The partner agents' health endpoints (issue 12, item 6) on a real
//! mirrored pair with a witness: `/primary` answers 200 on exactly one
//! partner before and after a failover, on none once the principal's lease
//! has ended (even while its PostgreSQL still lives), never on two at once
//! (I1); and HAProxy checking `/primary` sends a client to the principal
//! after a failover.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, Partner, WitnessChoice, SLOW};
use common::faults::signal_fence;
use common::http::get;
use nix::sys::signal::Signal;
use pgmirror::control::Command;
use pgmirror::roles::lease_length;

const TIMEOUT: u64 = 3;

async fn witnessed_pair(links: bool) -> Pair {
    let pair = Pair::start(PairOptions {
        timeout: TIMEOUT,
        witness: WitnessChoice::Own,
        links,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    pair.wait_witness_synchronized().await;
    pair
}

async fn code(partner: &Partner, path: &str) -> Option<u16> {
    get(partner.health_port, path).await.map(|(code, _)| code)
}

/// Asks both partners `/primary` at once: which answer 200.
async fn primaries(ports: [u16; 2]) -> [bool; 2] {
    let (a, b) = tokio::join!(get(ports[0], "/primary"), get(ports[1], "/primary"));
    [a, b].map(|answer| answer.is_some_and(|(code, _)| code == 200))
}

/// Polls until `/primary` answers 200 on `which` partner (0 alpha, 1 beta)
/// and only there.
async fn wait_sole_primary(pair: &Pair, which: usize) {
    let deadline = Instant::now() + SLOW;
    let ports = [pair.a.health_port, pair.b.health_port];
    loop {
        let answers = primaries(ports).await;
        if answers[which] && !answers[1 - which] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/primary never answered 200 on partner {which} alone: {answers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples `/primary` on both partners every 50 ms until stopped (and at
/// least ten times); returns
/// how many samples found two partners answering 200 (I1).
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, usize)>,
}

impl Sampler {
    fn start(pair: &Pair) -> Sampler {
        let ports = [pair.a.health_port, pair.b.health_port];
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut samples, mut both) = (0, 0);
                // At least ten samples, however fast the failover was.
                while !(stop.load(Ordering::SeqCst) && samples >= 10) {
                    samples += 1;
                    if primaries(ports).await == [true, true] {
                        both += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (samples, both)
            }
        });
        Sampler { stop, task }
    }

    async fn assert_never_two(self) {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, both) = self.task.await.expect("sampler");
        assert_eq!(
            both, 0,
            "{both} of {samples} samples had two partners answering 200 on /primary (I1)"
        );
    }
}

/// HAProxy in front of both PostgreSQL servers, routing to the one whose
/// agent answers 200 on `/primary`. Killed on drop.
struct Haproxy {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(pair: &Pair) -> Haproxy {
        let found = std::process::Command::new("haproxy")
            .arg("-v")
            .output()
            .is_ok_and(|output| output.status.success());
        assert!(
            found,
            "haproxy is not on PATH: install it with `apt-get install -y haproxy` (.ci/run does)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = common::free_port();
        let server = |name: &str, partner: &Partner| {
            format!(
                "    server {name} 127.0.0.1:{} check port {}\n",
                partner.pg_port(),
                partner.health_port
            )
        };
        let config = format!(
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend postgres\n    bind 127.0.0.1:{port}\n    default_backend principal\n\n\
             backend principal\n    option httpchk GET /primary\n    http-check expect status 200\n\
             \x20   default-server inter 500ms fall 1 rise 1 on-marked-down shutdown-sessions\n{}{}",
            server("alpha", &pair.a),
            server("beta", &pair.b),
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("haproxy.cfg");
        let child = std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy");
        Haproxy {
            port,
            child,
            _dir: dir,
        }
    }

    /// Connects through HAProxy until a session lands on a read-write
    /// server that takes a write, and returns that server's port.
    async fn write_through(&self, value: i32) -> u16 {
        let deadline = Instant::now() + SLOW;
        loop {
            let attempt = async {
                let client = common::pg::connect_port(self.port).await.ok()?;
                let row = client
                    .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
                    .await
                    .ok()?;
                let (recovery, port): (bool, i32) = (row.get(0), row.get(1));
                if recovery {
                    return None;
                }
                client
                    .execute("INSERT INTO through_haproxy VALUES ($1)", &[&value])
                    .await
                    .ok()?;
                u16::try_from(port).ok()
            };
            if let Some(port) = attempt.await {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "no write through HAProxy reached a principal"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_answers_on_exactly_one_partner_and_haproxy_follows_a_failover() {
    let pair = witnessed_pair(false).await;
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE through_haproxy (value int)")
        .await
        .expect("create table");
    wait_sole_primary(&pair, 0).await;
    assert_eq!(code(&pair.b, "/replica").await, Some(200));
    assert_eq!(code(&pair.b, "/replica?lag=bytes").await, Some(400));
    assert_eq!(code(&pair.a, "/replica").await, Some(503));
    for partner in [&pair.a, &pair.b] {
        assert_eq!(code(partner, "/health").await, Some(200));
        assert_eq!(code(partner, "/synchronized").await, Some(200));
    }
    let (status, body) = get(pair.b.health_port, "/status").await.expect("/status");
    let row: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
    assert_eq!((status, &row["server_name"]), (200, &"beta".into()));
    assert_eq!(row["mirroring_role_desc"], "MIRROR");

    let haproxy = Haproxy::start(&pair);
    assert_eq!(haproxy.write_through(1).await, pair.a.pg_port());

    let sampler = Sampler::start(&pair);
    pair.command(&pair.a, Command::Failover)
        .await
        .expect("failover");
    wait_sole_primary(&pair, 1).await;
    sampler.assert_never_two().await;

    let landed = haproxy.write_through(2).await;
    assert_eq!(
        landed,
        pair.b.pg_port(),
        "HAProxy did not follow the failover"
    );
    let rows: i64 = pair
        .b
        .sql()
        .await
        .query_one("SELECT count(*) FROM through_haproxy", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 2);
}

/// PostgreSQL and the fence of the cut principal frozen: only the lease
/// can end its `/primary` (I1). Thawed on drop, even when the test fails.
struct Frozen<'a>(&'a Partner);

impl<'a> Frozen<'a> {
    fn freeze(partner: &'a Partner) -> Frozen<'a> {
        partner.engine.signal_all(Signal::SIGSTOP);
        signal_fence(partner, Signal::SIGSTOP);
        Frozen(partner)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        signal_fence(self.0, Signal::SIGCONT);
        self.0.engine.signal_all(Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_ends_with_the_lease_even_while_postgresql_lives() {
    let pair = witnessed_pair(true).await;
    wait_sole_primary(&pair, 0).await;
    let sampler = Sampler::start(&pair);
    let frozen = Frozen::freeze(&pair.a);
    let (a_to_witness, _) = pair.witness_links.as_ref().expect("witness links");
    let cut = Instant::now();
    pair.cut_partners();
    a_to_witness.black_hole();

    // The lease ran from a round trip sent before the cut.
    let bound = lease_length(Duration::from_secs(TIMEOUT)) + Duration::from_secs(2);
    loop {
        if code(&pair.a, "/primary").await == Some(503) {
            break;
        }
        assert!(
            cut.elapsed() < bound,
            "alpha still answers 200 on /primary {:?} after it was cut off",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "alpha's /primary said 503 {:?} after the cut",
        cut.elapsed()
    );
    assert!(
        pair.a.engine.postmaster_pid().is_some(),
        "alpha's PostgreSQL is gone: this run did not show the lease alone"
    );

    wait_sole_primary(&pair, 1).await;
    println!("beta answers /primary {:?} after the cut", cut.elapsed());
    sampler.assert_never_two().await;
    drop(frozen);
    pair.heal_partners();
    a_to_witness.heal();
}
