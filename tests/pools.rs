//! Server connection pools (`pool_mode = "session"`) on real PostgreSQL 15,
//! through a session with proxy-side authentication (a userlist copied from
//! pg_authid): a client that leaves idle hands its server backend to the
//! next client, reset (DISCARD ALL); one that leaves inside a transaction
//! does not (its transaction is rolled back); a full pool makes a client
//! wait, then refuses it with 53300; pgbench with a connection per
//! transaction never makes more backends than pool_size; SHOW POOLS shows
//! the pool; a cancel on a reused connection cancels that client's query;
//! an idle connection past server_idle_timeout is closed.

mod common;

use std::time::Duration;

use common::proxy::{run_client, server_with_users, standalone_config, verifier_of, ProxyHandle};
use common::PgInstance;
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

/// A server with the SCRAM user `app` (password "wonder") and a proxy in
/// front of it whose session pools `app`'s connections, `pool_size` each,
/// with `extra` session keys.
async fn pooled(
    pool_size: usize,
    extra: &str,
) -> (PgInstance, tokio_postgres::Client, ProxyHandle) {
    let (pg, setup) = server_with_users().await;
    setup
        .batch_execute("CREATE TABLE items (n int); GRANT ALL ON items TO app;")
        .await
        .expect("create items");
    let userlist = pg.dir().join("userlist.txt");
    let list = format!("\"app\" \"{}\"\n", verifier_of(&setup, "app").await);
    std::fs::write(&userlist, list).unwrap();
    let config = format!(
        "{}auth = \"userlist\"\nauth_file = {userlist:?}\npool_mode = \"session\"\n\
         pool_size = {pool_size}\n{extra}",
        standalone_config(&pg, "")
    );
    let proxy = ProxyHandle::start(&config).await;
    (pg, setup, proxy)
}

/// A client of the pooled session, logged in as `app`.
async fn app(proxy: &ProxyHandle) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!("{} password=wonder", proxy.conninfo("app", "postgres"));
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

/// `SHOW POOLS` as (session, database, user, active, idle, waiting, max).
async fn pools(console: &tokio_postgres::Client) -> Vec<Vec<String>> {
    console
        .simple_query("SHOW POOLS")
        .await
        .expect("SHOW POOLS")
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Waits until `app`'s pool has `active` and `idle` connections.
async fn await_pool(console: &tokio_postgres::Client, active: &str, idle: &str) {
    let mut last = Vec::new();
    for _ in 0..100 {
        last = pools(console).await;
        if last
            .iter()
            .any(|row| row[2] == "app" && row[3] == active && row[4] == idle)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("app's pool never had {active} active and {idle} idle: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_leaves_its_backend_reset_for_the_next_and_show_pools_shows_it() {
    let (_pg, _setup, proxy) = pooled(20, "").await;
    let console = proxy.console().await;

    let first = app(&proxy).await.expect("first client");
    let pid = backend_pid(&first).await;
    first
        .batch_execute("SET search_path = nowhere; CREATE TEMP TABLE scratch (n int)")
        .await
        .unwrap();
    drop(first);
    await_pool(&console, "0", "1").await;
    assert_eq!(
        pools(&console).await,
        vec![vec!["shop", "postgres", "app", "0", "1", "0", "20"]],
        "SHOW POOLS"
    );
    let through_view = console
        .simple_query("SELECT idle, max FROM pgmirror.pools WHERE \"user\" = 'app'")
        .await
        .unwrap();
    let row = through_view.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => Some((row.get(0), row.get(1))),
        _ => None,
    });
    assert_eq!(row, Some((Some("1"), Some("20"))), "pgmirror.pools");

    let second = app(&proxy).await.expect("second client");
    assert_eq!(
        backend_pid(&second).await,
        pid,
        "the backend was not reused"
    );
    let state = second
        .query_one(
            "SELECT current_setting('search_path'), to_regclass('scratch') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        state.get::<_, String>(0),
        "\"$user\", public",
        "SET survived"
    );
    assert!(
        state.get::<_, bool>(1),
        "the first client's temp table survived"
    );
    await_pool(&console, "1", "0").await;

    // A cancel on the reused connection reaches its backend's query...
    let token = second.cancel_token();
    let sleeping = tokio::spawn(async move {
        let outcome = second.simple_query("SELECT pg_sleep(60)").await;
        (second, outcome)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel through the proxy");
    let (second, outcome) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancel came through in time")
        .unwrap();
    let err = outcome.expect_err("pg_sleep(60) was cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    // ...and such a connection is not reused: a late cancel could hit the
    // next client's query.
    drop(second);
    await_pool(&console, "0", "0").await;
    let third = app(&proxy).await.expect("third client");
    assert_ne!(backend_pid(&third).await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_inside_a_transaction_does_not_return_its_backend() {
    let (_pg, setup, proxy) = pooled(20, "").await;
    let console = proxy.console().await;

    let first = app(&proxy).await.expect("first client");
    let pid = backend_pid(&first).await;
    first
        .batch_execute("BEGIN; INSERT INTO items VALUES (1)")
        .await
        .unwrap();
    drop(first);
    await_pool(&console, "0", "0").await;

    let second = app(&proxy).await.expect("second client");
    assert_ne!(
        backend_pid(&second).await,
        pid,
        "a backend in a transaction was reused"
    );
    let count: i64 = second
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count, 0,
        "the first client's transaction was not rolled back"
    );
    // The old backend is gone, not parked somewhere.
    let old: i64 = setup
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_clients_wait_then_refuses_them_with_53300() {
    let (_pg, _setup, proxy) = pooled(1, "").await;
    let console = proxy.console().await;
    let first = app(&proxy).await.expect("first client");
    let pid = backend_pid(&first).await;

    // No slot comes free within hold_timeout (5 s): pool full.
    let started = std::time::Instant::now();
    let err = app(&proxy)
        .await
        .expect_err("a client beyond pool_size got in");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{err}");
    assert!(db.message().contains("pool full"), "{}", db.message());
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "it did not wait"
    );

    // A slot that comes free while a client waits goes to it.
    let waiter = tokio::spawn({
        let port = proxy.port;
        async move {
            let conninfo =
                format!("host=127.0.0.1 port={port} user=app dbname=postgres password=wonder");
            let (client, connection) =
                tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        }
    });
    let mut seen_waiting = false;
    for _ in 0..40 {
        if pools(&console).await.iter().any(|row| row[5] == "1") {
            seen_waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_waiting, "SHOW POOLS never showed the waiting client");
    assert!(!waiter.is_finished(), "the second client did not wait");
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiting client got the slot")
        .unwrap()
        .expect("second client");
    assert_eq!(
        backend_pid(&second).await,
        pid,
        "the backend was not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_a_connection_per_transaction_stays_within_pool_size() {
    const POOL_SIZE: i64 = 4;
    let (pg, setup, proxy) = pooled(POOL_SIZE as usize, "").await;
    let (ok, out) = run_client(
        "pgbench",
        &["-i", "-s", "1", &PgInstance::conninfo(pg.port())],
        &[],
    );
    assert!(ok, "pgbench -i: {out}");
    setup
        .batch_execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO app")
        .await
        .unwrap();

    // One thread per client: pgbench connects synchronously, so a thread
    // waiting for a slot would stall its other clients, which hold slots.
    let port = proxy.port.to_string();
    let bench = tokio::task::spawn_blocking(move || {
        run_client(
            "pgbench",
            &[
                "-n",
                "-C",
                "-S",
                "-c",
                "8",
                "-j",
                "8",
                "-T",
                "4",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "app",
                "postgres",
            ],
            &[("PGPASSWORD", "wonder")],
        )
    });
    let mut most = 0;
    while !bench.is_finished() {
        let backends: i64 = setup
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        most = most.max(backends);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out) = bench.await.unwrap();
    assert!(
        ok && out.contains("tps = "),
        "pgbench through the pool: {out}"
    );
    assert!(
        (1..=POOL_SIZE).contains(&most),
        "{most} backends for app, pool_size {POOL_SIZE}\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_past_server_idle_timeout_is_closed() {
    let (_pg, setup, proxy) = pooled(20, "server_idle_timeout = 1\n").await;
    let console = proxy.console().await;
    let client = app(&proxy).await.expect("client");
    let pid = backend_pid(&client).await;
    drop(client);
    await_pool(&console, "0", "1").await;
    await_pool(&console, "0", "0").await;
    for _ in 0..50 {
        let left: i64 = setup
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backend {pid} outlived its server_idle_timeout");
}
