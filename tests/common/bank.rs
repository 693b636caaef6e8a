//! The bank-transfer workload the failover tests run: a fixed total across
//! accounts, concurrent transfers, and the ids of the transfers whose COMMIT
//! was acknowledged. Each client writes to whichever instance is the
//! principal and reconnects after an error, like an application would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::pg::connect_port;

pub const ACCOUNTS: i64 = 50;
pub const OPENING_BALANCE: i64 = 1_000;
/// A commit that has not answered in this long is abandoned (the connection
/// is dropped, so it is never counted as acknowledged).
const COMMIT_LIMIT: Duration = Duration::from_secs(5);

pub async fn create(client: &tokio_postgres::Client) {
    client
        .batch_execute(&format!(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, {OPENING_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
             CREATE TABLE transfers (id bigint PRIMARY KEY, source bigint, target bigint, amount bigint)"
        ))
        .await
        .expect("create the bank");
}

/// One acknowledged transfer and when its COMMIT began and returned.
#[derive(Debug, Clone, Copy)]
pub struct Acknowledged {
    pub id: i64,
    pub started_ms: i64,
    pub acked_ms: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

pub struct Workload {
    acknowledged: Arc<Mutex<Vec<Acknowledged>>>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

/// The port of whichever instance accepts writes now, if any.
pub async fn writable(ports: &[u16]) -> Option<(u16, tokio_postgres::Client)> {
    for &port in ports {
        if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(2), connect_port(port)).await
        {
            if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !row.get::<_, bool>(0) {
                    return Some((port, client));
                }
            }
        }
    }
    None
}

impl Workload {
    pub fn start(ports: Vec<u16>, clients: i64, seed: u64) -> Workload {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|client_index| {
                let (acknowledged, stop, mut ports) = (acknowledged.clone(), stop.clone(), ports.clone());
                tokio::spawn(async move {
                    let mut random = seed ^ (client_index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let mut next = move || {
                        random ^= random << 13;
                        random ^= random >> 7;
                        random ^= random << 17;
                        random
                    };
                    let mut sequence = 0i64;
                    while !stop.load(Ordering::SeqCst) {
                        let Some((_, client)) = writable(&ports).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        while !stop.load(Ordering::SeqCst) {
                            sequence += 1;
                            let id = client_index * 1_000_000_000 + sequence;
                            let source = (next() % ACCOUNTS as u64) as i64 + 1;
                            let target = (next() % ACCOUNTS as u64) as i64 + 1;
                            let amount = (next() % 50) as i64 + 1;
                            let transfer = format!(
                                "BEGIN;
                                 UPDATE accounts SET balance = balance - {amount} WHERE id = {source};
                                 UPDATE accounts SET balance = balance + {amount} WHERE id = {target};
                                 INSERT INTO transfers VALUES ({id}, {source}, {target}, {amount});
                                 COMMIT;"
                            );
                            let started_ms = now_ms();
                            match tokio::time::timeout(COMMIT_LIMIT, client.batch_execute(&transfer)).await {
                                Ok(Ok(())) => acknowledged.lock().unwrap().push(Acknowledged {
                                    id,
                                    started_ms,
                                    acked_ms: now_ms(),
                                }),
                                _ => break,
                            }
                        }
                        // Like the reference's client (spec 58), try the other
                        // partner first after a failure: a server whose agent
                        // died may still look writable but cannot commit.
                        ports.rotate_left(1);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            })
            .collect();
        Workload {
            acknowledged,
            stop,
            clients,
        }
    }

    pub fn acknowledged_count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Waits until `more` further transfers have been acknowledged.
    pub async fn wait_for_progress(&self, more: usize, limit: Duration) {
        let target = self.acknowledged_count() + more;
        let deadline = std::time::Instant::now() + limit;
        while self.acknowledged_count() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the workload made no progress"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) -> Vec<Acknowledged> {
        self.stop.store(true, Ordering::SeqCst);
        for client in self.clients {
            let _ = tokio::time::timeout(COMMIT_LIMIT + Duration::from_secs(5), client).await;
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        acknowledged
    }
}

/// What [`audit`] found: the bank's total and the acknowledged transfers
/// that are missing.
#[derive(Debug, Clone)]
pub struct Audit {
    pub total: i64,
    pub lost: Vec<i64>,
}

impl Audit {
    pub fn total_ok(&self) -> bool {
        self.total == ACCOUNTS * OPENING_BALANCE
    }
}

/// Reads the total and looks up every acknowledged transfer on `client`.
pub async fn audit(
    client: &tokio_postgres::Client,
    acknowledged: &[Acknowledged],
) -> Result<Audit, tokio_postgres::Error> {
    let total: i64 = client
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .await?
        .get(0);
    let present: std::collections::HashSet<i64> = client
        .query("SELECT id FROM transfers", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost = acknowledged
        .iter()
        .map(|ack| ack.id)
        .filter(|id| !present.contains(id))
        .collect();
    Ok(Audit { total, lost })
}

/// The total is intact and every acknowledged transfer is present.
pub async fn verify(client: &tokio_postgres::Client, acknowledged: &[Acknowledged]) {
    let audit = audit(client, acknowledged).await.expect("audit the bank");
    assert_eq!(
        audit.total,
        ACCOUNTS * OPENING_BALANCE,
        "the bank's total changed"
    );
    let lost = audit.lost;
    assert!(
        lost.is_empty(),
        "{} acknowledged transfers lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}
