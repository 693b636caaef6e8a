//! The proxy as a fence (I4) on real PostgreSQL: it holds rather than
//! guess when more than one server accepts writes, and a proxy restarted
//! after a failover never routes below the epoch it saw, even when the old
//! principal's PostgreSQL is still writable and no agent answers; a
//! statement in flight on a principal superseded while its PostgreSQL stays
//! up ends at the route change. The read-write probe keeps one session per
//! server and replaces it when it is lost.

mod common;

use std::time::Duration;

use common::cluster::{ListenEndpoint, Pair, PairOptions, SLOW};
use common::proxy::ProxyHandle;
use common::{free_port, PgInstance};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgmirror::control::Command;

fn held(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_read_write_servers_with_no_agent_answering_hold() {
    let (first, second) = (PgInstance::start(), PgInstance::start());
    let text = format!(
        "hold_timeout = 2\n[sessions.shop]\npartners = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
         postgres = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\ndatabases = [\"postgres\"]\n",
        free_port(),
        free_port(),
        first.port(),
        second.port()
    );
    let proxy = ProxyHandle::start(&text).await;
    let err = proxy
        .connect("")
        .await
        .expect_err("two writable servers: the proxy must not pick one");
    assert!(held(&err), "{err:?}");
}

/// The backends of the proxy's read-write probe on `server`.
async fn probe_backends(server: &tokio_postgres::Client) -> Vec<i32> {
    server
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&pgmirror::proxy::routing::PROBE_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits up to 5 s for exactly one probe backend other than `not`.
async fn one_probe_backend(server: &tokio_postgres::Client, not: Option<i32>) -> i32 {
    for _ in 0..50 {
        if let [pid] = probe_backends(server).await[..] {
            if Some(pid) != not {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "not one new probe backend within 5 s: {:?}",
        probe_backends(server).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_write_probe_keeps_one_session_and_replaces_a_lost_one() {
    let pg = PgInstance::start();
    let proxy = ProxyHandle::start(&common::proxy::standalone_config(&pg, "")).await;
    let server = pg.connect().await;
    let first = one_probe_backend(&server, None).await;
    // Four poll rounds later, the same session answers the probe.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(probe_backends(&server).await, vec![first]);
    proxy.connect("").await.expect("routed by the probe");

    server
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    let second = one_probe_backend(&server, Some(first)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(probe_backends(&server).await, vec![second]);
    let client = proxy.connect("").await.expect("still routed by the probe");
    client.simple_query("SELECT 1").await.unwrap();
    proxy.stop().await;
}

fn agent_pid(partner: &common::cluster::Partner) -> Pid {
    Pid::from_raw(partner.agent.as_ref().expect("agent").pid() as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_never_routes_below_the_epoch_it_saw() {
    let pair = Pair::start(PairOptions {
        timeout: 3,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE marks (port int)")
        .await
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let pki = &pair.pki;
    // Long enough for a restarted proxy to poll, time out and probe.
    let text = format!(
        "hold_timeout = 12\nstate_dir = {:?}\n\
         [endpoint_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n\
         [sessions.shop]\npartners = [\"{}\", \"{}\"]\ndatabases = [\"postgres\"]\n\
         postgres = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
        state.path(),
        pki.join("tester.crt"),
        pki.join("tester.key"),
        pki.join("ca.crt"),
        pair.a.config.listen_endpoint(),
        pair.b.config.listen_endpoint(),
        pair.a.pg_port(),
        pair.b.pg_port(),
    );
    let proxy = ProxyHandle::start(&text).await;
    let served_by = async |proxy: &ProxyHandle| -> Result<i32, tokio_postgres::Error> {
        let client = proxy.connect("").await?;
        client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .map(|row| row.get(0))
    };
    assert_eq!(served_by(&proxy).await.unwrap(), pair.a.pg_port() as i32);
    // alpha's agent freezes (no witness: no lease, its PostgreSQL stays up
    // and writable); beta is forced into service at epoch 2.
    let alpha_agent = agent_pid(&pair.a);
    kill(alpha_agent, Signal::SIGSTOP).unwrap();
    pair.wait_for(&pair.b, "alone", SLOW, |status| !status.peer_connected)
        .await;
    pair.command(&pair.b, Command::ForceServiceAllowDataLoss)
        .await
        .expect("forced service");
    let deadline = std::time::Instant::now() + SLOW;
    while served_by(&proxy).await.ok() != Some(pair.b.pg_port() as i32) {
        assert!(std::time::Instant::now() < deadline, "never routed to beta");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.stop().await;
    // Now no agent answers and only the old principal answers writes.
    let beta_agent = agent_pid(&pair.b);
    kill(beta_agent, Signal::SIGSTOP).unwrap();
    pair.b.engine.signal_all(Signal::SIGSTOP);
    let restarted = ProxyHandle::start(&text).await;
    let attempt = restarted.connect("").await;
    let stolen: i64 = pair
        .a
        .sql()
        .await
        .query_one("SELECT count(*) FROM marks", &[])
        .await
        .unwrap()
        .get(0);
    pair.b.engine.signal_all(Signal::SIGCONT);
    kill(beta_agent, Signal::SIGCONT).unwrap();
    kill(alpha_agent, Signal::SIGCONT).unwrap();
    match attempt {
        Err(err) => assert!(held(&err), "{err:?}"),
        Ok(client) => {
            let port: i32 = client
                .query_one("SELECT inet_server_port()", &[])
                .await
                .map(|row| row.get(0))
                .unwrap_or_default();
            panic!("the restarted proxy routed to port {port}, below the epoch it saw");
        }
    }
    assert_eq!(stolen, 0);
}

/// I4 in session mode: a statement in flight on a principal that is
/// superseded while its PostgreSQL stays up (its agent frozen, no witness
/// and so no lease; the mirror forced into service) ends for its client at
/// the route change, with no byte more of the old principal's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_in_flight_on_a_superseded_principal_ends_at_the_route_change() {
    let pair = Pair::start(PairOptions {
        timeout: 3,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let proxy = ProxyHandle::in_front_of(&pair, "").await;
    let client = proxy.connect("").await.expect("client");
    let sleeping = tokio::spawn(async move {
        let answer = client.simple_query("SELECT pg_sleep(60)").await;
        (answer, client)
    });
    let alpha = pair.a.sql().await;
    common::pg::await_running(&alpha, "SELECT pg_sleep(60)", 1).await;
    kill(agent_pid(&pair.a), Signal::SIGSTOP).unwrap();
    pair.wait_for(&pair.b, "alone", SLOW, |status| !status.peer_connected)
        .await;
    pair.command(&pair.b, Command::ForceServiceAllowDataLoss)
        .await
        .expect("forced service");
    let forced = std::time::Instant::now();
    let (answer, client) = tokio::time::timeout(Duration::from_secs(30), sleeping)
        .await
        .expect("the statement in flight ended within 30 s of the forced service")
        .unwrap();
    let err = answer.expect_err("the old principal's answer is never relayed");
    println!("{:?} after FORCE_SERVICE: {err:?}", forced.elapsed());
    // Not a commit: the pass-through session ends as at any failover.
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{err:?}"
    );
    let message = err.as_db_error().map(|db| db.message()).unwrap_or_default();
    assert!(message.contains("is no longer the principal"), "{message}");
    let next = tokio::time::timeout(Duration::from_secs(10), client.simple_query("SELECT 1"))
        .await
        .expect("the next statement ended promptly");
    assert!(next.is_err(), "the connection was ended");
    proxy.stop().await;
}
