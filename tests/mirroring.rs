//! Mirroring sessions without a witness, on real PostgreSQL: setup, the
//! safety levels, pause and resume, manual failover, forced service and the
//! refusals of commands in the wrong state.

mod common;

use std::time::Duration;

use common::cluster::{Pair, PairOptions, SLOW};
use pgmirror::partner::api::{Command, Response};

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_synchronizes_and_ships_rows() {
    let pair = Pair::start(PairOptions::default());
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + SLOW;
    loop {
        let status = pair.status(&pair.a).await;
        if let Some(state) = status.state() {
            if seen.last().map(String::as_str) != Some(state) {
                seen.push(state.to_string());
            }
            if state == "SYNCHRONIZED" {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never synchronized: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("principal states during setup: {seen:?}");
    assert!(
        seen.iter().any(|state| state == "SYNCHRONIZING"),
        "{seen:?}"
    );
    pair.wait_state("SYNCHRONIZED").await;

    let principal = pair.a.sql().await;
    principal
        .batch_execute("CREATE TABLE items (id int primary key, body text)")
        .await
        .unwrap();
    for batch in 0..100 {
        principal
            .execute(
                "INSERT INTO items SELECT g, md5(g::text) FROM generate_series($1::int, $1::int + 99) g",
                &[&(batch * 100)],
            )
            .await
            .unwrap();
    }
    let mirror = pair.b.sql().await;
    let deadline = std::time::Instant::now() + SLOW;
    while count(&mirror, "items").await != 10_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "rows never reached the mirror"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = pair.status(&pair.b).await;
    assert_eq!(status.mirroring_role_desc.as_deref(), Some("MIRROR"));
    let principal_status = pair.status(&pair.a).await;
    assert_eq!(
        principal_status.mirroring_partner_name.as_deref(),
        Some("beta")
    );
    assert!(principal_status.link_bytes_compressed > 0);
}
