//! Admin console commands that finish what they start (issue 12, item 5),
//! on a real pair behind a real proxy: a FAILOVER returns once the new
//! principal serves and the view shows it, a second one right after waits
//! for SYNCHRONIZED, two at once never both run on one premise, and after
//! PARTNER OFF the former principal keeps serving through the proxy.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, WitnessChoice};
use common::proxy::{run_client, ProxyHandle, ADMIN};
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

/// `column` of every row of `sys.database_mirroring`, by server name.
async fn mirroring_column(
    console: &tokio_postgres::Client,
    column: &str,
) -> Vec<(String, Option<String>)> {
    console
        .simple_query("SELECT * FROM sys.database_mirroring")
        .await
        .expect("sys.database_mirroring")
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((
                row.get("server_name")?.to_string(),
                row.get(column).map(str::to_string),
            )),
            _ => None,
        })
        .collect()
}

/// A write by a new psql through the proxy, as a user would try; returns
/// how long it took.
async fn psql_writes(proxy: &ProxyHandle, sql: &str) -> Duration {
    let port = proxy.port.to_string();
    let sql = sql.to_string();
    let started = Instant::now();
    let (ok, output) = tokio::task::spawn_blocking(move || {
        run_client(
            "psql",
            &[
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                &sql,
            ],
            &[("PGCONNECT_TIMEOUT", "30")],
        )
    })
    .await
    .expect("psql task");
    assert!(ok, "psql through the proxy: {output}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_partner_off_the_former_principal_serves_through_the_proxy() {
    let pair = Pair::start(PairOptions {
        witness: WitnessChoice::Own,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let proxy = ProxyHandle::in_front_of(&pair, ADMIN).await;
    let console = proxy.console().await;
    psql_writes(&proxy, "CREATE TABLE before_off (id int)").await;

    console
        .simple_query("ALTER DATABASE shop SET PARTNER OFF")
        .await
        .expect("PARTNER OFF");
    // As soon as it returns, the view says mirroring is off (spec 49: the
    // mirroring columns are NULL) ...
    for column in ["mirroring_state_desc", "mirroring_role_desc"] {
        let values = mirroring_column(&console, column).await;
        assert_eq!(values.len(), 2, "{values:?}");
        assert!(
            values.iter().all(|(_, value)| value.is_none()),
            "{column} after OFF: {values:?}"
        );
    }
    // ... and a new client writes at once.
    let took = psql_writes(&proxy, "CREATE TABLE after_off (id int)").await;
    assert!(
        took < Duration::from_secs(5),
        "a new client waited {took:?} for the former principal"
    );
    // The former principal, not the standby, took the write.
    let alpha = pair.a.sql().await;
    alpha
        .simple_query("INSERT INTO after_off VALUES (1)")
        .await
        .expect("alpha is a writable database");
}

/// The roles the view shows, as `name=ROLE` sorted by name.
async fn roles(console: &tokio_postgres::Client) -> Vec<String> {
    let mut roles: Vec<String> = mirroring_column(console, "mirroring_role_desc")
        .await
        .into_iter()
        .map(|(name, role)| format!("{name}={}", role.unwrap_or_default()))
        .collect();
    roles.sort();
    roles
}

/// A new client through the proxy writes within 5 s.
async fn writes_at_once(proxy: &ProxyHandle, value: i32) {
    let write = async {
        let client = proxy.connect("").await?;
        client
            .execute("INSERT INTO ledger VALUES ($1)", &[&value])
            .await
    };
    tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .unwrap_or_else(|_| panic!("write {value} through the proxy took over 5 s"))
        .unwrap_or_else(|err| panic!("write {value} through the proxy: {err}"));
}

const SWAPPED: [&str; 2] = ["alpha=MIRROR", "beta=PRINCIPAL"];
const STARTED: [&str; 2] = ["alpha=PRINCIPAL", "beta=MIRROR"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_finish_before_they_return_and_never_race() {
    let pair = Pair::start(PairOptions {
        witness: WitnessChoice::Own,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let proxy = ProxyHandle::in_front_of(&pair, ADMIN).await;
    let console = proxy.console().await;
    let setup = proxy.connect("").await.expect("client through the proxy");
    setup
        .batch_execute("CREATE TABLE ledger (id int)")
        .await
        .unwrap();
    assert_eq!(roles(&console).await, STARTED);

    // Two FAILOVERs in a row, as a script sends them. The second is sent
    // while the session resynchronizes after the first: it waits for
    // SYNCHRONIZED (spec 37) instead of failing.
    console
        .simple_query("ALTER DATABASE shop SET PARTNER FAILOVER")
        .await
        .expect("first FAILOVER");
    assert_eq!(roles(&console).await, SWAPPED, "the view right after");
    let states = mirroring_column(&console, "mirroring_state_desc").await;
    println!("states right after the first FAILOVER: {states:?}");
    writes_at_once(&proxy, 1).await;
    console
        .simple_query("ALTER DATABASE shop SET PARTNER FAILOVER")
        .await
        .expect("second FAILOVER, sent while resynchronizing");
    assert_eq!(roles(&console).await, STARTED, "the view right after");
    writes_at_once(&proxy, 2).await;

    // Two FAILOVERs at once from two consoles: one runs; the other waited
    // its turn and is refused (40001), since the roles it meant to switch
    // were switched meanwhile.
    pair.wait_state("SYNCHRONIZED").await;
    let other = proxy.console().await;
    let failover = "ALTER DATABASE shop SET PARTNER FAILOVER";
    let (first, second) =
        tokio::join!(console.simple_query(failover), other.simple_query(failover));
    let outcomes = [first, second];
    let succeeded = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    for outcome in &outcomes {
        if let Err(err) = outcome {
            assert_eq!(
                err.code(),
                Some(&SqlState::T_R_SERIALIZATION_FAILURE),
                "the statement that lost: {err}"
            );
            let message = err.as_db_error().map(|db| db.message()).unwrap_or_default();
            assert!(message.contains("nothing was done"), "{message}");
        }
    }
    assert_eq!(succeeded, 1, "{outcomes:?}");
    assert_eq!(roles(&console).await, SWAPPED);
    writes_at_once(&proxy, 3).await;
}
