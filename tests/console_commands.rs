//! Admin console commands that finish what they start (issue 12, item 5),
//! on a real pair behind a real proxy: after PARTNER OFF the former
//! principal keeps serving through the proxy.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, WitnessChoice};
use common::proxy::{run_client, ProxyHandle, ADMIN};
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
    let took = psql_writes(&proxy, "CREATE TABLE after_off (id int)").await;
    assert!(
        took < Duration::from_secs(5),
        "a new client waited {took:?} for the former principal"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let states = mirroring_column(&console, "mirroring_state_desc").await;
        if states.len() == 2 && states.iter().all(|(_, state)| state.is_none()) {
            break;
        }
        assert!(Instant::now() < deadline, "mirroring still on: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The former principal, not the standby, took the write.
    let alpha = pair.a.sql().await;
    alpha
        .simple_query("INSERT INTO after_off VALUES (1)")
        .await
        .expect("alpha is a writable database");
}
