//! Principal discovery: one task per session polls the session's partner
//! agents every [`POLL_INTERVAL`] and publishes a [`Route`] on a watch
//! channel that every client connection of the session holds.
//!
//! Invariant I4: a route names only the principal of the highest epoch
//! (`mirroring_role_sequence`) ever seen by this proxy, and never a partner
//! that is in PENDING_FAILOVER (it is about to stop serving). When no agent
//! answers, the partners' PostgreSQL servers are probed like libpq's
//! `target_session_attrs=read-write`; the epoch then stays the highest seen.
//! The choice itself ([`choose`]) is pure and unit-tested; the task only
//! does the IO. The task ends when the shutdown token is cancelled.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Endpoint, ProbeConfig, ProxySession};
use crate::control::{Command, ControlClient, ControlError, MirroringStatus};
use crate::roles::{Epoch, Role};
use crate::tls::EndpointTls;

/// How often the agents are asked for their status.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one status request or probe may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// How the principal was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// Its agent said so, at the route's epoch.
    Agent,
    /// No agent answered; its PostgreSQL accepts writes.
    Probe,
}

/// The partner that serves clients now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// host:port of its PostgreSQL.
    pub address: String,
    pub server_name: String,
    pub discovery: Discovery,
}

/// One partner as last polled, for the admin console.
#[derive(Debug, Clone)]
pub struct PartnerView {
    pub endpoint: Endpoint,
    pub status: Option<MirroringStatus>,
    pub error: Option<String>,
}

/// What a session's connections route by; published on a watch channel.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// The highest epoch seen so far; never decreases.
    pub epoch: Epoch,
    /// None while no principal serves (failover in progress, all down).
    pub principal: Option<Principal>,
    pub partners: Vec<PartnerView>,
}

impl Route {
    /// Whether a connection made to `address` at `epoch` must be closed
    /// because a newer or different principal is known (I4).
    pub fn supersedes(&self, epoch: Epoch, address: &str) -> bool {
        self.epoch > epoch
            || self
                .principal
                .as_ref()
                .is_some_and(|principal| principal.address != address)
    }
}

/// Picks the principal from the agents' answers (pure). `highest` is the
/// highest epoch seen before; returns the new highest and the principal.
pub fn choose(highest: Epoch, answers: &[MirroringStatus]) -> (Epoch, Option<Principal>) {
    let highest = answers
        .iter()
        .filter_map(|status| status.mirroring_role_sequence)
        .map(Epoch)
        .fold(highest, Epoch::max);
    let mut candidates = answers.iter().filter(|status| {
        status.role() == Some(Role::Principal)
            && status.mirroring_role_sequence == Some(highest.0)
            && status.state() != Some("PENDING_FAILOVER")
    });
    let principal = match (candidates.next(), candidates.next()) {
        (Some(status), None) => Some(Principal {
            address: status.postgres_address.clone(),
            server_name: status.server_name.clone(),
            discovery: Discovery::Agent,
        }),
        // Two principals at one epoch cannot happen (I1); route nowhere.
        _ => None,
    };
    (highest, principal)
}

/// Where the discovery task sends its findings and what it needs.
pub struct Discoverer {
    pub session: String,
    pub config: ProxySession,
    pub probe: ProbeConfig,
    pub tls: EndpointTls,
    pub publish: watch::Sender<Route>,
}

impl Discoverer {
    /// Polls until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut clients: Vec<Option<ControlClient>> =
            self.config.partners.iter().map(|_| None).collect();
        let mut known_postgres: Vec<String> =
            self.config.postgres.iter().map(|e| e.to_string()).collect();
        loop {
            let polls = self
                .config
                .partners
                .iter()
                .zip(clients.iter_mut())
                .map(|(endpoint, client)| poll(endpoint, client, &self.tls));
            let results = futures::future::join_all(polls).await;
            let mut answers = Vec::new();
            let mut partners = Vec::new();
            for (endpoint, result) in self.config.partners.iter().zip(results) {
                match result {
                    Ok(status) => {
                        if !status.postgres_address.is_empty()
                            && !known_postgres.contains(&status.postgres_address)
                        {
                            known_postgres.push(status.postgres_address.clone());
                        }
                        answers.push(status.clone());
                        partners.push(PartnerView {
                            endpoint: endpoint.clone(),
                            status: Some(status),
                            error: None,
                        });
                    }
                    Err(error) => partners.push(PartnerView {
                        endpoint: endpoint.clone(),
                        status: None,
                        error: Some(error),
                    }),
                }
            }
            let highest = self.publish.borrow().epoch;
            let (epoch, principal) = if answers.is_empty() {
                (highest, probe_all(&known_postgres, &self.probe).await)
            } else {
                choose(highest, &answers)
            };
            self.publish.send_if_modified(|route| {
                let changed = route.epoch != epoch || route.principal != principal;
                if changed {
                    tracing::info!(
                        session = %self.session,
                        epoch = %epoch,
                        principal = ?principal.as_ref().map(|p| &p.address),
                        "route changed"
                    );
                }
                route.epoch = epoch;
                route.principal = principal;
                route.partners = partners;
                changed
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }
}

/// One status request, reusing the partner's control connection.
async fn poll(
    endpoint: &Endpoint,
    client: &mut Option<ControlClient>,
    tls: &EndpointTls,
) -> Result<MirroringStatus, String> {
    if client.is_none() {
        let connected = tokio::time::timeout(POLL_TIMEOUT, ControlClient::connect(endpoint, tls))
            .await
            .map_err(|_| format!("no answer from {endpoint} within {POLL_TIMEOUT:?}"))?
            .map_err(|err| err.to_string())?;
        *client = Some(connected);
    }
    let Some(connected) = client.as_mut() else {
        return Err("not connected".into());
    };
    match connected.status_within(POLL_TIMEOUT).await {
        Ok(status) => Ok(status),
        Err(err) => {
            *client = None;
            Err(err.to_string())
        }
    }
}

/// The first PostgreSQL in `addresses` that accepts writes.
async fn probe_all(addresses: &[String], probe: &ProbeConfig) -> Option<Principal> {
    for address in addresses {
        if probe_read_write(address, probe).await {
            return Some(Principal {
                address: address.clone(),
                server_name: address.clone(),
                discovery: Discovery::Probe,
            });
        }
    }
    None
}

/// `SELECT pg_is_in_recovery()` is false: the server is read-write.
async fn probe_read_write(address: &str, probe: &ProbeConfig) -> bool {
    let Ok(endpoint) = address.parse::<Endpoint>() else {
        return false;
    };
    let mut config = tokio_postgres::Config::new();
    config
        .host(&endpoint.host)
        .port(endpoint.port)
        .user(&probe.user)
        .dbname(&probe.database)
        .application_name("pgmirror-proxy-probe")
        .connect_timeout(POLL_TIMEOUT);
    if let Some(password) = &probe.password {
        config.password(password);
    }
    let attempt = async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.ok()?;
        let connection = tokio::spawn(connection);
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .ok();
        drop(client);
        let _ = connection.await;
        row.and_then(|row| row.try_get::<_, bool>(0).ok())
    };
    matches!(
        tokio::time::timeout(POLL_TIMEOUT, attempt).await,
        Ok(Some(false))
    )
}

/// Sends one admin command to a partner agent; Ok is the agent's message.
pub async fn send_command(
    endpoint: &Endpoint,
    tls: &EndpointTls,
    command: Command,
) -> Result<String, ControlError> {
    let mut client = ControlClient::connect(endpoint, tls).await?;
    client.command(command).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, role: i32, epoch: u64, state: &str) -> MirroringStatus {
        MirroringStatus {
            server_name: name.into(),
            mirroring_role: Some(role),
            mirroring_role_sequence: Some(epoch),
            mirroring_state_desc: Some(state.into()),
            postgres_address: format!("{name}:5432"),
            ..Default::default()
        }
    }

    #[test]
    fn routes_to_the_principal_of_the_highest_epoch() {
        let answers = [
            status("a", 1, 3, "SYNCHRONIZED"),
            status("b", 2, 3, "SYNCHRONIZED"),
        ];
        let (epoch, principal) = choose(Epoch(1), &answers);
        assert_eq!(epoch, Epoch(3));
        assert_eq!(principal.unwrap().server_name, "a");
    }

    #[test]
    fn a_fenced_principal_is_never_chosen() {
        // a still thinks it is principal at 3, b was promoted at 4 (I4).
        let answers = [
            status("a", 1, 3, "DISCONNECTED"),
            status("b", 1, 4, "DISCONNECTED"),
        ];
        assert_eq!(choose(Epoch(3), &answers).1.unwrap().server_name, "b");
        // Only a answers, but epoch 4 was seen before: hold.
        let (epoch, principal) = choose(Epoch(4), &answers[..1]);
        assert_eq!((epoch, principal), (Epoch(4), None));
    }

    #[test]
    fn pending_failover_holds_new_connections() {
        let answers = [status("a", 1, 3, "PENDING_FAILOVER")];
        assert_eq!(choose(Epoch(3), &answers).1, None);
    }

    #[test]
    fn supersedes_on_epoch_or_address_change() {
        let route = Route {
            epoch: Epoch(4),
            principal: Some(Principal {
                address: "b:5432".into(),
                server_name: "b".into(),
                discovery: Discovery::Agent,
            }),
            partners: Vec::new(),
        };
        assert!(route.supersedes(Epoch(3), "b:5432"));
        assert!(route.supersedes(Epoch(4), "a:5432"));
        assert!(!route.supersedes(Epoch(4), "b:5432"));
        let unknown = Route {
            principal: None,
            ..route
        };
        assert!(!unknown.supersedes(Epoch(4), "a:5432"));
    }
}
