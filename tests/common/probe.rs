//! Write probes: one single-row commit on each PostgreSQL every 50 ms, with
//! a `synchronous_commit` that does not wait for the mirror, to see exactly
//! when each server acknowledges writes (I1: never two at once).

use std::time::{Duration, Instant};

/// Probes each port until `run_for` passes (the table `probes` must exist
/// where writes are expected); returns when each probe was acknowledged,
/// per port.
pub fn writes(
    ports: Vec<u16>,
    synchronous_commit: &'static str,
    run_for: Duration,
) -> tokio::task::JoinHandle<Vec<Vec<Instant>>> {
    tokio::spawn(async move {
        let mut accepted = vec![Vec::new(); ports.len()];
        let deadline = Instant::now() + run_for;
        let mut clients: Vec<Option<tokio_postgres::Client>> = ports.iter().map(|_| None).collect();
        let write = format!(
            "SET synchronous_commit = {synchronous_commit}; INSERT INTO probes VALUES (now())"
        );
        while Instant::now() < deadline {
            for (index, port) in ports.iter().enumerate() {
                if clients[index].is_none() {
                    clients[index] = tokio::time::timeout(
                        Duration::from_millis(500),
                        super::pg::connect_port(*port),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok);
                }
                let Some(client) = &clients[index] else {
                    continue;
                };
                match tokio::time::timeout(Duration::from_millis(300), client.batch_execute(&write))
                    .await
                {
                    Ok(Ok(())) => accepted[index].push(Instant::now()),
                    _ => clients[index] = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        accepted
    })
}
