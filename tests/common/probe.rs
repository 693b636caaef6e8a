//! Write probes: one single-row commit on each PostgreSQL every 50 ms, with
//! a `synchronous_commit` that does not wait for the mirror, to see exactly
//! when each server acknowledges writes (I1: never two at once).
//! Probing is cancel-safe: dropping the task loses only the answers so far.

use std::time::{Duration, Instant};

/// One probe round: every port probed once, in order.
#[derive(Debug, Clone)]
pub struct Round {
    /// When the round began.
    pub began: Instant,
    /// Per port, when its probe was acknowledged (None: refused, timed out
    /// or unreachable).
    pub acked: Vec<Option<Instant>>,
}

impl Round {
    /// Ports that acknowledged their probe this round.
    pub fn writers(&self) -> usize {
        self.acked.iter().filter(|ack| ack.is_some()).count()
    }
}

/// Probes each port until `run_for` passes (the table `probes` must exist
/// where writes are expected); returns when each probe was acknowledged,
/// per port.
pub fn writes(
    ports: Vec<u16>,
    synchronous_commit: &'static str,
    run_for: Duration,
) -> tokio::task::JoinHandle<Vec<Vec<Instant>>> {
    let rounds = rounds(ports.clone(), synchronous_commit, run_for);
    tokio::spawn(async move {
        let rounds = rounds.await.expect("probe task");
        (0..ports.len())
            .map(|index| {
                rounds
                    .iter()
                    .filter_map(|round| round.acked[index])
                    .collect()
            })
            .collect()
    })
}

/// Like [`writes`], round by round, so that two servers acknowledging in
/// the same round (two writers, I1) can be seen.
pub fn rounds(
    ports: Vec<u16>,
    synchronous_commit: &'static str,
    run_for: Duration,
) -> tokio::task::JoinHandle<Vec<Round>> {
    tokio::spawn(async move {
        let mut rounds = Vec::new();
        let deadline = Instant::now() + run_for;
        let mut clients: Vec<Option<tokio_postgres::Client>> = ports.iter().map(|_| None).collect();
        let write = format!(
            "SET synchronous_commit = {synchronous_commit}; INSERT INTO probes VALUES (now())"
        );
        while Instant::now() < deadline {
            let mut round = Round {
                began: Instant::now(),
                acked: vec![None; ports.len()],
            };
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
                    Ok(Ok(())) => round.acked[index] = Some(Instant::now()),
                    _ => clients[index] = None,
                }
            }
            rounds.push(round);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rounds
    })
}
