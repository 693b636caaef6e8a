//! Clients of a transaction-mode pool across failovers (issue 13 item 5;
//! I2 and I4 at the proxy), on a real pair with a witness behind the proxy,
//! with proxy-side SCRAM authentication:
//! - 200 idle clients, each with its own search_path and application_name,
//!   run a statement on the new principal after a manual FAILOVER and again
//!   after a kill -9 of the principal, without reconnecting and without
//!   seeing an error, their settings still in force;
//! - a transaction open across a failover gets 40001 at its next statement
//!   (simple and extended protocol), its ROLLBACK succeeds and the
//!   connection runs the next transaction on the new principal;
//! - a commit in flight at the failover (SAFETY FULL, the mirror link
//!   black-holed so the commit waits, shown waiting in pg_stat_activity)
//!   never reaches its client as a success whose row is missing on the new
//!   principal: it gets 40003 (or its connection ends with an error), and
//!   the connection is ended;
//! - a statement in flight on a principal the proxy can no longer hear (its
//!   link black-holed) when a manual FAILOVER demotes it gets 40003 at the
//!   route change.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{PairOptions, Partner, SLOW};
use common::pooled_pair::{
    check_all, create_tenant_schemas, describe, hits_in_own_schema, not_on_principal, Failover,
    PooledPair, TenantClient,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Seconds of TIMEOUT: an automatic failover after a kill -9 takes a few.
const TIMEOUT: u64 = 3;

const IDLE_CLIENTS: usize = 200;

/// Fewer server connections than clients, as a pool is used.
const POOL_SIZE: usize = 20;

fn options() -> PairOptions {
    PairOptions {
        timeout: TIMEOUT,
        ..PairOptions::default()
    }
}

/// Runs round `round` of checks and asserts that every client ran on the
/// writable server on `port`, its own settings in force, and that every hit
/// landed in its own schema.
async fn everyone_runs_on(clients: &[TenantClient], round: i32, port: u16) {
    let started = Instant::now();
    let outcomes = check_all(clients, round, Duration::from_secs(90)).await;
    println!(
        "round {round}: {} clients answered in {:?}",
        clients.len(),
        started.elapsed()
    );
    let failed = not_on_principal(outcomes, port);
    assert!(
        failed.is_empty(),
        "round {round}: {} of {} clients failed; the first: {:#?}",
        failed.len(),
        clients.len(),
        &failed[..failed.len().min(10)]
    );
    let principal = common::pg::connect_port(port).await.expect("principal");
    assert_eq!(
        hits_in_own_schema(&principal, round).await,
        clients.len() as i64,
        "round {round}: hits in the clients' own schemas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_keep_their_connections_and_settings_across_failovers() {
    let mut pooled = PooledPair::start(options(), POOL_SIZE, "").await;
    create_tenant_schemas(&pooled.pair.a.sql().await, IDLE_CLIENTS).await;
    let clients = TenantClient::connect_many(&pooled, IDLE_CLIENTS).await;
    everyone_runs_on(&clients, 0, pooled.pair.a.pg_port()).await;

    for (round, how) in [(1, Failover::Manual), (2, Failover::Kill9)] {
        let started = Instant::now();
        let port = pooled.fail_over(how).await;
        println!(
            "{how:?}: the new principal (port {port}) shown after {:?}",
            started.elapsed()
        );
        everyone_runs_on(&clients, round, port).await;
    }
}

/// Opens a transaction with a row in it: `simple` with the simple
/// protocol, else with the extended one.
async fn open_transaction(client: &Client, id: i32, simple: bool) {
    if simple {
        client
            .batch_execute(&format!("BEGIN; INSERT INTO ledger VALUES ({id})"))
            .await
            .expect("open a transaction");
    } else {
        client.batch_execute("BEGIN").await.expect("BEGIN");
        client
            .execute("INSERT INTO ledger VALUES ($1)", &[&id])
            .await
            .expect("INSERT in the transaction");
    }
}

/// Table `ledger (id)` on alpha, the first principal, for `app`.
async fn create_ledger(pooled: &PooledPair) {
    pooled
        .pair
        .a
        .sql()
        .await
        .batch_execute("CREATE TABLE ledger (id int); GRANT INSERT, SELECT ON ledger TO app")
        .await
        .expect("create ledger");
}

/// The ids in `ledger` on `partner`.
async fn ledger(partner: &Partner) -> BTreeSet<i32> {
    partner
        .sql()
        .await
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("read ledger")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What one client, whose transaction was open across the failover to the
/// server on `port`, sees next: 40001 for its next statement (`next`, run
/// by the caller), then a ROLLBACK that succeeds and a new transaction (row
/// `id`) on the new principal. Returns what went wrong.
async fn goes_on_after_40001(
    client: &Client,
    next: Result<(), tokio_postgres::Error>,
    id: i32,
    port: u16,
) -> Result<(), String> {
    match next {
        Ok(()) => return Err("a statement of a transaction begun before the failover ran".into()),
        Err(err) if err.code() != Some(&SqlState::T_R_SERIALIZATION_FAILURE) => {
            return Err(format!("not 40001 but {}", describe(&err)))
        }
        Err(_) => {}
    }
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(|err| format!("ROLLBACK after 40001: {}", describe(&err)))?;
    let messages = client
        .simple_query(&format!(
            "BEGIN; INSERT INTO ledger VALUES ({id}); \
             SELECT inet_server_port(), pg_is_in_recovery(); COMMIT"
        ))
        .await
        .map_err(|err| format!("the next transaction: {}", describe(&err)))?;
    let served = messages.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some((row.get(0), row.get(1))),
        _ => None,
    });
    let expected = port.to_string();
    match served {
        Some((Some(ran_on), Some("f"))) if ran_on == expected => Ok(()),
        other => Err(format!(
            "the next transaction ran on {other:?}, not the principal on {port}"
        )),
    }
}

/// Two clients (simple and extended protocol) with a transaction open
/// across a failover `how`.
async fn transactions_across(how: Failover) {
    let mut pooled = PooledPair::start(options(), 4, "").await;
    create_ledger(&pooled).await;
    let simple = pooled.app("").await.expect("client (simple protocol)");
    let extended = pooled.app("").await.expect("client (extended protocol)");
    open_transaction(&simple, 1, true).await;
    open_transaction(&extended, 2, false).await;
    let port = pooled.fail_over(how).await;

    let next_simple = simple
        .simple_query("INSERT INTO ledger VALUES (11)")
        .await
        .map(|_| ());
    let next_extended = extended
        .execute("INSERT INTO ledger VALUES (12)", &[])
        .await
        .map(|_| ());
    let mut failures = Vec::new();
    let mut committed = BTreeSet::new();
    for (what, client, next, id) in [
        ("simple protocol", &simple, next_simple, 3),
        ("extended protocol", &extended, next_extended, 4),
    ] {
        match goes_on_after_40001(client, next, id, port).await {
            Ok(()) => {
                committed.insert(id);
            }
            Err(failure) => failures.push(format!("{what}: {failure}")),
        }
    }
    assert!(failures.is_empty(), "{how:?}:\n{}", failures.join("\n"));
    let principal = if pooled.pair.a.pg_port() == port {
        &pooled.pair.a
    } else {
        &pooled.pair.b
    };
    assert_eq!(
        ledger(principal).await,
        committed,
        "{how:?}: only the transactions after the failover committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_across_a_manual_failover_gets_40001_and_its_connection_goes_on() {
    transactions_across(Failover::Manual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_across_a_kill9_failover_gets_40001_and_its_connection_goes_on() {
    transactions_across(Failover::Kill9).await;
}

// ---------------------------------------------------------------------
// A commit in flight at the failover.

/// Waits until `count` backends of `app` on `partner` wait for the mirror
/// to flush their commit.
async fn wait_for_sync_rep(partner: &Partner, count: i64) {
    let admin = partner.sql().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = 'app' AND wait_event = 'SyncRep'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} of {count} commits waited for the mirror"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the principal is made to give way while commits wait for its
/// black-holed mirror.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9 of its PostgreSQL and agent.
    Kill9,
    /// Its link to the witness black-holed too: its lease ends, its fence
    /// stops its PostgreSQL, and the witness promotes the mirror.
    CutFromBoth,
}

/// Two commits wait for the black-holed mirror (an explicit COMMIT with
/// the simple protocol, an autocommit INSERT with the extended one); the
/// principal gives way by `fault`. Neither may reach its client as a
/// success, and the row of a commit its client was told succeeded must be
/// on the new principal.
async fn commits_in_flight_at_a_failover(fault: Fault) {
    // TIMEOUT 10: the principal must not run exposed (releasing the
    // commits as successes, legitimately: I2) before the fault.
    let mut pooled = PooledPair::start(
        PairOptions {
            links: true,
            ..PairOptions::default()
        },
        4,
        "",
    )
    .await;
    create_ledger(&pooled).await;
    let explicit = pooled.app("").await.expect("client");
    let autocommit = pooled.app("").await.expect("client");
    explicit
        .batch_execute("BEGIN; INSERT INTO ledger VALUES (1)")
        .await
        .unwrap();
    // Warm the extended-protocol client: its connection is idle, not new.
    autocommit.query_one("SELECT 1", &[]).await.unwrap();

    pooled.pair.cut_partners();
    let commit = explicit.simple_query("COMMIT");
    let insert = autocommit.execute("INSERT INTO ledger VALUES (2)", &[]);
    let pair = &mut pooled.pair;
    let failover = async {
        // The test is about commits that wait: show that they do.
        wait_for_sync_rep(&pair.a, 2).await;
        match fault {
            Fault::Kill9 => pair.a.kill9(),
            Fault::CutFromBoth => {
                let (a_to_witness, _) = pair.witness_links.as_ref().expect("witness links");
                a_to_witness.black_hole();
            }
        }
        pair.wait_for(&pair.b, "principal", SLOW, |status| {
            status.mirroring_role_desc.as_deref() == Some("PRINCIPAL")
        })
        .await;
    };
    let limit = Duration::from_secs(90);
    let (committed, inserted, ()) = tokio::join!(
        tokio::time::timeout(limit, commit),
        tokio::time::timeout(limit, insert),
        failover
    );
    let on_new_principal = ledger(&pooled.pair.b).await;
    let mut failures = Vec::new();
    for (id, what, outcome) in [
        (
            1,
            "explicit COMMIT (simple protocol)",
            committed.map(|outcome| outcome.map(|_| ())),
        ),
        (
            2,
            "autocommit INSERT (extended protocol)",
            inserted.map(|outcome| outcome.map(|_| ())),
        ),
    ] {
        match outcome {
            Err(_) => failures.push(format!("{what}: no answer within {limit:?}")),
            Ok(Ok(())) if on_new_principal.contains(&id) => {
                println!("{what}: a success, and its row is on the new principal")
            }
            Ok(Ok(())) => failures.push(format!(
                "{what}: reached its client as a success, and its row is missing on the new \
                 principal"
            )),
            // Any error is no success; the one that says the outcome is
            // unknown is 40003 (others are noted for the reader).
            Ok(Err(err)) => match err.code() {
                Some(code) if code == &SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN => {
                    println!("{what}: 40003 as it should: {}", describe(&err))
                }
                Some(_) => println!("{what}: NOTE: an error, but not 40003: {}", describe(&err)),
                None => println!("{what}: its connection ended: {}", describe(&err)),
            },
        }
    }
    // After an outcome left unknown the proxy has ended the connection.
    for (what, client) in [("explicit", &explicit), ("autocommit", &autocommit)] {
        let next = tokio::time::timeout(Duration::from_secs(30), client.simple_query("SELECT 1"))
            .await
            .expect("the next statement ended promptly");
        if next.is_ok() {
            failures.push(format!(
                "{what}: the connection is still usable after its commit's outcome was unknown"
            ));
        }
    }
    assert!(failures.is_empty(), "{fault:?}:\n{}", failures.join("\n"));
    // A new client writes on the new principal.
    let fresh = pooled.app("").await.expect("a new client");
    fresh
        .execute("INSERT INTO ledger VALUES (3)", &[])
        .await
        .expect("a write through the proxy after the failover");
    assert!(ledger(&pooled.pair.b).await.contains(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_flight_when_the_principal_is_killed_is_never_a_silent_success() {
    commits_in_flight_at_a_failover(Fault::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_flight_when_the_principal_is_cut_off_is_never_a_silent_success() {
    commits_in_flight_at_a_failover(Fault::CutFromBoth).await;
}

/// I4 when the proxy can no longer hear the old principal: a statement in
/// flight on it when a manual FAILOVER demotes it, behind a link to its
/// PostgreSQL that went black (neither an answer nor the connection's end
/// reaches the proxy), ends for its client at the route change with 40003,
/// not whenever TCP would give up. The relay's wait on the routes does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_on_a_principal_the_proxy_cannot_hear_ends_at_the_failover() {
    let mut pooled = PooledPair::start(
        PairOptions {
            client_links: true,
            ..options()
        },
        2,
        "",
    )
    .await;
    let client = pooled.app("").await.expect("client");
    let sleeping = tokio::spawn(async move {
        let answer = client.simple_query("SELECT pg_sleep(60)").await;
        (answer, client)
    });
    let alpha = pooled.pair.a.sql().await;
    common::pg::await_running(&alpha, "SELECT pg_sleep(60)", 1).await;
    drop(alpha);
    let (to_alpha, _) = pooled.pair.client_links.as_ref().expect("client links");
    to_alpha.black_hole();
    let failover_started = Instant::now();
    let port = pooled.fail_over(Failover::Manual).await;
    assert_eq!(port, pooled.pair.b.pg_port(), "beta is the new principal");
    let (answer, client) = tokio::time::timeout(Duration::from_secs(30), sleeping)
        .await
        .expect("the statement in flight ended within 30 s of the failover")
        .unwrap();
    let err = answer.expect_err("no answer can come from the old principal");
    assert_eq!(
        err.code(),
        Some(&SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN),
        "{}",
        describe(&err)
    );
    println!(
        "40003 {:?} after the FAILOVER began",
        failover_started.elapsed()
    );
    let next = tokio::time::timeout(Duration::from_secs(10), client.simple_query("SELECT 1"))
        .await
        .expect("the next statement ended promptly");
    assert!(next.is_err(), "the connection was ended");
}
