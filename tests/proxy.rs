//! The proxy on real PostgreSQL: psql, pgbench and tokio-postgres (with
//! TLS) through it, password users, cancel requests, hostile startups, and
//! with a real mirrored pair: the admin console, FAILOVER while clients
//! write, and every ALTER DATABASE form.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, SLOW};
use common::proxy::{
    run_client, standalone_config, tls_proxy, trusting_client, ProxyHandle, ADMIN,
};
use common::{free_port, PgInstance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_pgbench_and_tls_clients_work_through_the_proxy() {
    let (_pg, pki, proxy) = tls_proxy().await;
    let port = proxy.port.to_string();

    let (ok, out) = run_client(
        "psql",
        &[
            "-X",
            "-At",
            "-c",
            "SELECT 40 + 2",
            &format!("{} sslmode=require", proxy.conninfo("postgres", "postgres")),
        ],
        &[],
    );
    assert!(ok && out.trim() == "42", "psql over TLS: {out}");
    let (ok, out) = run_client(
        "psql",
        &[
            "-X",
            "-At",
            "-c",
            "SELECT current_database()",
            &format!("{} sslmode=disable", proxy.conninfo("postgres", "postgres")),
        ],
        &[],
    );
    assert!(ok && out.trim() == "postgres", "psql in clear: {out}");

    // tokio-postgres with TLS, verifying the proxy's certificate.
    let config = trusting_client(pki.path());
    let (client, connection) = tokio_postgres::connect(
        &format!("{} sslmode=require", proxy.conninfo("postgres", "postgres")),
        tokio_postgres_rustls::MakeRustlsConnect::new(config),
    )
    .await
    .expect("tokio-postgres over TLS");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    let (ok, out) = run_client(
        "pgbench",
        &[
            "-i",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ],
        &[],
    );
    assert!(ok, "pgbench -i: {out}");
    for protocol in ["simple", "extended", "prepared"] {
        let (ok, out) = run_client(
            "pgbench",
            &[
                "-M",
                protocol,
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                "3",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "postgres",
            ],
            &[],
        );
        assert!(ok, "pgbench -M {protocol}: {out}");
        assert!(
            out.contains("number of failed transactions: 0"),
            "{protocol}: {out}"
        );
        println!("pgbench -M {protocol} through the proxy:\n{out}");
    }
    // An unmapped dbname with no default session gets a clear FATAL.
    let (ok, out) = run_client(
        "psql",
        &[
            "-X",
            "-c",
            "SELECT 1",
            &proxy.conninfo("postgres", "elsewhere"),
        ],
        &[],
    );
    assert!(
        !ok && out.contains("not mapped to any mirroring session"),
        "{out}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_scram_users_authenticate_through_the_proxy() {
    for method in ["md5", "scram-sha-256"] {
        let pg = PgInstance::start();
        let setup = pg.connect().await;
        setup
            .batch_execute(&format!(
                "SET password_encryption = '{method}'; CREATE USER alice PASSWORD 'wonder';"
            ))
            .await
            .unwrap();
        pg.require_passwords(method);
        let proxy = ProxyHandle::start(&standalone_config(&pg, "")).await;
        let good = format!(
            "host=127.0.0.1 port={} user=alice password=wonder dbname=postgres",
            proxy.port
        );
        let (client, connection) = tokio_postgres::connect(&good, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("{method} login through the proxy: {err}"));
        tokio::spawn(connection);
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, "alice");
        let (ok, out) = run_client(
            "psql",
            &[
                "-X",
                "-At",
                "-c",
                "SELECT 1",
                &format!("{} user=alice", proxy.conninfo("alice", "postgres")),
            ],
            &[("PGPASSWORD", "wonder")],
        );
        assert!(ok && out.trim() == "1", "psql {method}: {out}");
        let bad = good.replace("wonder", "wrong");
        let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{method}: a wrong password was accepted"));
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{method}: {err}"
        );
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_cancels_only_its_query() {
    cancels_only_its_query("").await;
}

/// The same on a proxy with `threads = 3`: the cancel request and its
/// query's client may be served by different workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_cancels_only_its_query_on_a_proxy_of_several_threads() {
    cancels_only_its_query("threads = 3").await;
}

/// One long query cancelled through the proxy while 20 other clients run
/// short ones; `extra` goes into the proxy's config.
async fn cancels_only_its_query(extra: &str) {
    let pg = PgInstance::start_with(&["max_connections = 60"]);
    let proxy = Arc::new(ProxyHandle::start(&standalone_config(&pg, extra)).await);
    let sleeper = proxy.connect("").await.unwrap();
    let token = sleeper.cancel_token();
    let long = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await });

    let stop = Instant::now() + Duration::from_secs(4);
    let mut others = Vec::new();
    for _ in 0..20 {
        let client = proxy.connect("").await.unwrap();
        others.push(tokio::spawn(async move {
            let mut done = 0;
            while Instant::now() < stop {
                client.simple_query("SELECT pg_sleep(0.05)").await?;
                done += 1;
            }
            Ok::<_, tokio_postgres::Error>(done)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request sent to the proxy");
    let outcome = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("the long query ended after the cancel")
        .unwrap();
    let err = outcome.expect_err("pg_sleep(60) was cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    for other in others {
        let done = other
            .await
            .unwrap()
            .expect("other connections were not cancelled");
        assert!(done > 0);
    }
    // A cancel with an unknown key is dropped silently.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    stream
        .write_all(&pgmirror::wire::startup::cancel_request(12345, 678))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(buf.is_empty());
}

/// The server's (or proxy's) message of an error.
fn message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_startups_leave_the_proxy_serving() {
    let pg = PgInstance::start();
    let proxy = Arc::new(
        ProxyHandle::start(
            &standalone_config(&pg, "startup_timeout = 1\n").replace("startup_timeout = 2\n", ""),
        )
        .await,
    );
    let healthy = proxy.connect("").await.unwrap();
    healthy.simple_query("SELECT 1").await.unwrap();
    let before = rss_kib();
    let port = proxy.port;
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..50 {
        let attempts = attempts.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20 {
                let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                else {
                    continue;
                };
                let kind = (worker + round) % 5;
                let bytes: Vec<u8> = match kind {
                    // Oversized startup packet.
                    0 => 1_000_000u32.to_be_bytes().to_vec(),
                    // Garbage.
                    1 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                    // Protocol 2.
                    2 => [8u32.to_be_bytes(), (2u32 << 16).to_be_bytes()].concat(),
                    // Slow: half a header, then silence (startup_timeout).
                    3 => vec![0, 0],
                    // Unterminated parameters.
                    _ => [
                        13u32.to_be_bytes().to_vec(),
                        196_608u32.to_be_bytes().to_vec(),
                        b"user\0".to_vec(),
                    ]
                    .concat(),
                };
                let _ = stream.write_all(&bytes).await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink))
                    .await;
                if kind != 3 {
                    assert!(
                        sink.first() == Some(&b'E') || sink.is_empty(),
                        "kind {kind}: {sink:?}"
                    );
                }
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        }));
        // Other clients keep working meanwhile.
        if worker % 10 == 0 {
            healthy
                .simple_query("SELECT 1")
                .await
                .expect("healthy client during the storm");
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(attempts.load(Ordering::Relaxed), 1000);
    healthy
        .simple_query("SELECT 1")
        .await
        .expect("healthy client after the storm");
    let fresh = proxy.connect("").await.expect("new client after the storm");
    fresh.simple_query("SELECT 1").await.unwrap();
    let after = rss_kib();
    println!("RSS of the test process: before {before} KiB, after {after} KiB");
    assert!(
        after < before + 32 * 1024,
        "memory grew from {before} to {after} KiB"
    );
}

/// A proxy in front of a real mirrored pair, with the admin console.
async fn pair_proxy(pair: &Pair) -> ProxyHandle {
    ProxyHandle::in_front_of(pair, ADMIN).await
}

async fn principal_name(console: &tokio_postgres::Client) -> Option<String> {
    let rows = console.simple_query("SHOW SESSIONS").await.ok()?;
    rows.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get("principal").map(str::to_string),
        _ => None,
    })
}

async fn wait_principal(console: &tokio_postgres::Client, name: &str) {
    let deadline = Instant::now() + SLOW;
    while principal_name(console).await.as_deref() != Some(name) {
        assert!(
            Instant::now() < deadline,
            "the proxy never routed to {name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_from_the_admin_console_keeps_clients_writing() {
    let pair = Pair::start(PairOptions::default());
    pair.wait_state("SYNCHRONIZED").await;
    let proxy = Arc::new(pair_proxy(&pair).await);
    let console = proxy.console().await;
    wait_principal(&console, "alpha").await;

    let rows = console
        .simple_query("SELECT * FROM sys.database_mirroring WHERE database_name = 'shop'")
        .await
        .unwrap();
    let roles: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(format!(
                "{}={}",
                row.get("server_name").unwrap_or("?"),
                row.get("mirroring_role_desc").unwrap_or("?")
            )),
            _ => None,
        })
        .collect();
    assert_eq!(roles, ["alpha=PRINCIPAL", "beta=MIRROR"]);

    let setup = proxy.connect("").await.unwrap();
    setup
        .batch_execute("CREATE TABLE ledger (id serial primary key, writer int)")
        .await
        .unwrap();

    // Writers: each reconnects on error, counting failures per connection.
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..3i32 {
        let proxy = proxy.clone();
        let stopped = stopped.clone();
        writers.push(tokio::spawn(async move {
            let mut worst = 0usize;
            let mut written = 0usize;
            let mut connect_failures = 0usize;
            while !stopped.load(Ordering::Relaxed) {
                let client = match proxy.connect("").await {
                    Ok(client) => client,
                    Err(err) => {
                        eprintln!("writer {writer}: connect failed: {err}");
                        connect_failures += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let mut failures = 0usize;
                while !stopped.load(Ordering::Relaxed) {
                    match client
                        .execute("INSERT INTO ledger (writer) VALUES ($1)", &[&writer])
                        .await
                    {
                        Ok(_) => written += 1,
                        Err(err) => {
                            eprintln!("writer {writer}: {err}");
                            failures += 1;
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                worst = worst.max(failures);
            }
            (worst, written, connect_failures)
        }));
    }
    // An idle connection to the old principal, whose connection task
    // reports the proxy's goodbye.
    let (idle, idle_connection) = tokio_postgres::connect(
        &proxy.conninfo("postgres", "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let idle_connection = tokio::spawn(idle_connection);
    idle.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    console
        .simple_query("ALTER DATABASE shop SET PARTNER FAILOVER")
        .await
        .expect("FAILOVER accepted");
    // Connections opened during the failover wait, then succeed.
    let mut late = Vec::new();
    for _ in 0..5 {
        let proxy = proxy.clone();
        late.push(tokio::spawn(async move {
            let client = proxy.connect("").await?;
            client
                .execute("INSERT INTO ledger (writer) VALUES (99)", &[])
                .await
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_principal(&console, "beta").await;
    let goodbye = tokio::time::timeout(SLOW, idle_connection)
        .await
        .expect("the idle connection was closed")
        .unwrap()
        .expect_err("closed with an error");
    assert_eq!(
        goodbye.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{goodbye}"
    );
    // The proxy says "a failover happened" when it sees the new epoch
    // first; the old principal's own shutdown may beat it to the client
    // with the same SQLSTATE.
    println!("idle connection closed with: {}", message(&goodbye));
    drop(idle);
    for task in late {
        task.await
            .unwrap()
            .expect("a connection opened during the failover waited and then wrote");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stopped.store(true, Ordering::Relaxed);
    stop.notify_waiters();
    for writer in writers {
        let (worst, written, connect_failures) = writer.await.unwrap();
        assert!(worst <= 1, "a connection failed {worst} transactions");
        assert_eq!(
            connect_failures, 0,
            "a connection was refused during the failover"
        );
        assert!(written > 0);
    }
    let beta = pair.b.sql().await;
    let rows: i64 = beta
        .query_one("SELECT count(*) FROM ledger WHERE writer = 99", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alter_database_form_works_or_is_refused_with_its_reason() {
    let pair = Pair::start(PairOptions::default());
    pair.wait_state("SYNCHRONIZED").await;
    let proxy = pair_proxy(&pair).await;
    let console = proxy.console().await;
    wait_principal(&console, "alpha").await;

    let run = |sql: &'static str| {
        let console = &console;
        async move {
            match console.simple_query(sql).await {
                Ok(_) => Ok(()),
                Err(err) => Err(err
                    .as_db_error()
                    .map(|db| db.message().to_string())
                    .unwrap_or_else(|| err.to_string())),
            }
        }
    };
    run("ALTER DATABASE shop SET PARTNER TIMEOUT 20")
        .await
        .expect("TIMEOUT");
    run("ALTER DATABASE shop SET PARTNER SAFETY OFF")
        .await
        .expect("SAFETY OFF");
    let refused = run("ALTER DATABASE shop SET PARTNER FAILOVER")
        .await
        .unwrap_err();
    assert!(refused.contains("SAFETY FULL"), "{refused}");
    run("ALTER DATABASE shop SET PARTNER SAFETY FULL")
        .await
        .expect("SAFETY FULL");
    let refused = run("ALTER DATABASE shop SET PARTNER FORCE_SERVICE_ALLOW_DATA_LOSS")
        .await
        .unwrap_err();
    assert!(refused.contains("still connected"), "{refused}");
    // Nothing listens at this address: the witness shows DISCONNECTED.
    run("ALTER DATABASE shop SET WITNESS = '127.0.0.1:7022'")
        .await
        .expect("SET WITNESS =");
    for partner in [&pair.a, &pair.b] {
        pair.wait_for(partner, "a disconnected witness", SLOW, |s| {
            s.mirroring_witness_name.as_deref() == Some("127.0.0.1:7022")
                && s.mirroring_witness_state_desc.as_deref() == Some("DISCONNECTED")
        })
        .await;
    }
    // The unreachable witness must release the session first (I1, I3)...
    let refused = run("ALTER DATABASE shop SET WITNESS OFF")
        .await
        .unwrap_err();
    assert!(refused.contains("could not be told"), "{refused}");
    // ... and a witness started at its address (an empty store) does.
    let _stand_in = pair.witness_at(7022);
    let deadline = Instant::now() + SLOW;
    while let Err(err) = run("ALTER DATABASE shop SET WITNESS OFF").await {
        assert!(Instant::now() < deadline, "SET WITNESS OFF: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pair.wait_for(&pair.a, "no witness", SLOW, |s| {
        s.mirroring_witness_name.is_none()
    })
    .await;
    run("ALTER DATABASE shop SET PARTNER SUSPEND")
        .await
        .expect("SUSPEND");
    pair.wait_for(&pair.a, "SUSPENDED", SLOW, |s| {
        s.state() == Some("SUSPENDED")
    })
    .await;
    run("ALTER DATABASE shop SET PARTNER RESUME")
        .await
        .expect("RESUME");
    pair.wait_state("SYNCHRONIZED").await;
    let unknown = run("ALTER DATABASE nowhere SET PARTNER RESUME")
        .await
        .unwrap_err();
    assert!(unknown.contains("no mirroring session"), "{unknown}");
    let syntax = run("DROP TABLE ledger").await.unwrap_err();
    assert!(syntax.contains("supported statements"), "{syntax}");
    for show in ["SHOW CLIENTS", "SHOW SERVERS", "SHOW SESSIONS"] {
        run(show)
            .await
            .unwrap_or_else(|err| panic!("{show}: {err}"));
    }
    run("ALTER DATABASE shop SET PARTNER OFF")
        .await
        .expect("OFF ends the session");
    // The wrong admin password is refused.
    let bad = format!(
        "host=127.0.0.1 port={} user=admin password=nope dbname=pgmirror",
        proxy.port
    );
    assert!(tokio_postgres::connect(&bad, tokio_postgres::NoTls)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_principal_new_connections_are_held_then_refused_clearly() {
    let text = format!(
        "hold_timeout = 2\n[sessions.shop]\npartners = [\"127.0.0.1:{}\"]\n\
         postgres = [\"127.0.0.1:{}\"]\ndatabases = [\"postgres\"]\n",
        free_port(),
        free_port()
    );
    let proxy = ProxyHandle::start(&text).await;
    let started = Instant::now();
    let err = proxy.connect("").await.expect_err("no principal serves");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(10),
        "held for {waited:?}"
    );
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{err}"
    );
    assert!(message(&err).contains("no principal"), "{err:?}");
    // Shutdown with a held client does not hang.
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_connected_clients_and_stops_accepting() {
    let pg = PgInstance::start();
    let proxy = ProxyHandle::start(&standalone_config(&pg, "")).await;
    let port = proxy.port;
    let (client, connection) = tokio_postgres::connect(
        &proxy.conninfo("postgres", "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    proxy.stop().await;
    let goodbye = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection was closed at shutdown")
        .unwrap()
        .expect_err("closed with an error");
    assert_eq!(
        goodbye.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{goodbye:?}"
    );
    assert!(message(&goodbye).contains("shutting down"), "{goodbye:?}");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_subcommand_serves_clients() {
    let pg = PgInstance::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n{}",
            standalone_config(&pg, "")
        ),
    )
    .unwrap();
    let _process = common::Pgmirror::spawn(
        "proxy",
        dir.path(),
        &["proxy", "--config", config.to_str().unwrap()],
    );
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = run_client("psql", &["-X", "-At", "-c", "SELECT 7 * 6", &conninfo], &[]);
        if ok {
            assert_eq!(out.trim(), "42");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pgmirror proxy never served: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
