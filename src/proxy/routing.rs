//! Principal discovery: one task per session polls the session's partner
//! agents every [`POLL_INTERVAL`] and publishes a [`Route`] on a watch
//! channel that every client connection of the session holds.
//!
//! Invariant I4: the proxy never routes to a fenced node. The route choice
//! is the pure step function [`choose`]: what the proxy remembers
//! ([`RouteMemory`]) and one poll round ([`PollRound`]) in, the new memory
//! and a [`Decision`] out. The [`Discoverer`] task only does the IO (status
//! requests, read-write probes) and publishes the result; a deterministic
//! simulation can call [`choose`] directly. The rules:
//!
//! 1. **Probe only before any epoch.** The partners' PostgreSQL servers are
//!    probed like libpq's `target_session_attrs=read-write` (`SELECT
//!    pg_is_in_recovery()`) only in a round where no agent answers and no
//!    agent has ever reported an epoch since this proxy started (issue 10
//!    will persist that). Once one has, a round in which no agent answers
//!    holds; a probe never overrides an epoch.
//! 2. **Two read-write servers hold.** When more than one server answers
//!    the probe read-write, no principal is chosen.
//! 3. **Never below the highest epoch.** The route's epoch is the highest
//!    `mirroring_role_sequence` seen and never decreases; only an agent
//!    claiming PRINCIPAL at that epoch, and not in PENDING_FAILOVER, is
//!    routed to.
//! 4. **Identity, not address.** A principal is the partner the role table
//!    names, its `server_name`; [`Route::supersedes`] compares that name and
//!    the epoch, so a principal reporting a new address is still the same
//!    principal. A server found by the probe has no role-table name; its
//!    address stands in for one.
//! 5. **One missed round changes nothing.** When the principal's agent does
//!    not answer (timeout, refused) and nothing contradicts it (no answer at
//!    a higher epoch, no other principal), the route stays; the
//!    [`MISSED_ROUNDS_TO_HOLD`]th consecutive missed round holds. An answer
//!    from that agent saying it is no longer principal or is in
//!    PENDING_FAILOVER, or any answer at a higher epoch, changes the route
//!    at once.
//! 6. **Two principals hold.** Two agents claiming PRINCIPAL at the highest
//!    epoch (which I1 rules out) route nowhere.
//! 7. **Mirroring off keeps the last principal.** A partner whose session
//!    SET PARTNER OFF ended reports no role (its mirroring columns are
//!    NULL, spec 49) but says what it was ([`MirroringStatus::ended_as`]);
//!    it answers with that role and epoch, so the former principal, now a
//!    standalone writable PostgreSQL, is routed to by rules 3-6 like any
//!    principal: only at the highest epoch seen, never the former mirror (a
//!    standby), never a principal superseded before OFF. An ended partner
//!    takes part in no role switch again, so no higher epoch can follow.
//!
//! The task ends when the shutdown token is cancelled.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, ReusableBoxFuture};

use crate::config::{Endpoint, ProbeConfig, ProxySession};
use crate::control::{Command, ControlClient, ControlError, MirroringStatus};
use crate::proxy::epochs::EpochStore;
use crate::proxy::server_tls::{ServerConnectError, ServerTls, ServerTlsError};
use crate::roles::{Epoch, Role};
use crate::tls::EndpointTls;

/// The application_name of the proxy's read-write probes, as
/// pg_stat_activity shows them.
pub const PROBE_APPLICATION_NAME: &str = "pgmirror-proxy-probe";

/// How often the agents are asked for their status.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a poll round still waits for the other agents once one
/// reported the principal role at a higher epoch.
const ROUND_GRACE: Duration = Duration::from_millis(300);
/// How long one status request or probe may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive poll rounds the principal's agent may miss, uncontradicted,
/// before the route drops to a hold (rule 5): one missed round keeps it.
pub const MISSED_ROUNDS_TO_HOLD: u32 = 2;

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
    /// Its identity: the role table's name for it (found by probe: its
    /// address).
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
    /// Set while no principal is routed and the last read-write probe could
    /// not use a server because of its TLS (`[server_tls]`): held clients
    /// are refused with it at once, since waiting will not change a
    /// certificate.
    pub tls_failure: Option<ServerTlsError>,
}

impl Route {
    /// Whether a connection made to `principal` at `epoch` must be closed
    /// because a newer epoch or a different principal is known (I4). The
    /// principals are compared by identity (`server_name`), not address.
    pub fn supersedes(&self, epoch: Epoch, principal: &Principal) -> bool {
        self.epoch > epoch
            || self
                .principal
                .as_ref()
                .is_some_and(|current| current.server_name != principal.server_name)
    }
}

/// Resolves once `routes` supersedes a connection made to `principal` at
/// `epoch` (I4); never, once no more route changes can come.
pub async fn superseded(routes: &mut watch::Receiver<Route>, epoch: Epoch, principal: &Principal) {
    loop {
        if routes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if routes.borrow_and_update().supersedes(epoch, principal) {
            return;
        }
    }
}

/// Every change of a route, one after another: a wait made once for a
/// client's whole life, where [`superseded`] is made per connection. A
/// transaction-mode client relays many transactions on many connections,
/// and making the wait per transaction cost an allocation and two takes of
/// the watch's lock each time. Ready when the route changed (once or more)
/// since it was last ready; the caller reads the route itself.
pub struct RouteChanges {
    next: ReusableBoxFuture<'static, watch::Receiver<Route>>,
}

impl RouteChanges {
    pub fn new(routes: watch::Receiver<Route>) -> RouteChanges {
        RouteChanges {
            next: ReusableBoxFuture::new(changed(routes)),
        }
    }
}

/// The next change of `routes` (never, once no more can come).
async fn changed(mut routes: watch::Receiver<Route>) -> watch::Receiver<Route> {
    if routes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    routes
}

impl Future for RouteChanges {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut seen = false;
        // The wait for the next change is registered before this returns,
        // so that a change after it still wakes the task.
        while let Poll::Ready(mut routes) = self.next.poll(cx) {
            routes.borrow_and_update();
            self.next.set(changed(routes));
            seen = true;
        }
        if seen {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// One agent's answer to a status request, as [`choose`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAnswer {
    /// The partner's identity in the role table.
    pub server_name: String,
    pub role: Option<Role>,
    /// Its `mirroring_role_sequence`; None when it reports none.
    pub epoch: Option<Epoch>,
    /// Its `mirroring_state_desc`, e.g. `SYNCHRONIZED`, `PENDING_FAILOVER`.
    pub state: Option<String>,
    /// host:port of its PostgreSQL.
    pub postgres_address: String,
}

impl From<&MirroringStatus> for AgentAnswer {
    /// A partner whose session ended answers with the role and epoch it
    /// ended with (rule 7).
    fn from(status: &MirroringStatus) -> Self {
        AgentAnswer {
            server_name: status.server_name.clone(),
            role: status.role().or(status.ended_as.map(|ended| ended.role)),
            epoch: status
                .mirroring_role_sequence
                .map(Epoch)
                .or(status.ended_as.map(|ended| ended.epoch)),
            state: status.state().map(str::to_string),
            postgres_address: status.postgres_address.clone(),
        }
    }
}

/// One poll round, the input of [`choose`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollRound {
    /// One entry per configured partner agent; None when it did not answer
    /// (timeout, connection refused, an unexpected reply).
    pub answers: Vec<Option<AgentAnswer>>,
    /// The addresses whose PostgreSQL answered the read-write probe; None
    /// when no probe was run this round.
    pub read_write: Option<Vec<String>>,
}

/// What the route choice carries from one poll round to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMemory {
    /// The highest epoch seen; never decreases.
    pub highest: Epoch,
    /// Whether any agent has reported an epoch since this proxy started.
    pub epoch_reported: bool,
    /// The principal routed to now; None while holding.
    pub principal: Option<Principal>,
    /// Consecutive rounds in which `principal`'s agent did not answer.
    pub missed_rounds: u32,
}

/// Why no principal is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// No agent answered and an epoch was reported before, so the probe
    /// may not decide (rule 1).
    NoAgentAnswered,
    /// The principal's agent missed [`MISSED_ROUNDS_TO_HOLD`] rounds in a
    /// row (rule 5).
    PrincipalSilent,
    /// Agents answered, none claims PRINCIPAL at the highest epoch.
    NoPrincipal,
    /// The principal of the highest epoch is in PENDING_FAILOVER.
    PendingFailover,
    /// Two agents claim PRINCIPAL at the highest epoch (rule 6).
    TwoPrincipals,
    /// The probe found no read-write server.
    NoReadWrite,
    /// More than one server answered the probe read-write (rule 2).
    TwoReadWrite,
}

/// The outcome of one [`choose`] step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Route new connections to this principal.
    Route(Principal),
    /// No principal: hold new connections.
    Hold(Hold),
    /// Probe the PostgreSQL servers, then call [`choose`] again with the
    /// same memory and `read_write` set (rule 1).
    Probe,
}

/// Whether a round with these agent answers needs the read-write probe:
/// no agent answered and none has ever reported an epoch (rule 1).
pub fn needs_probe(memory: &RouteMemory, answers: &[Option<AgentAnswer>]) -> bool {
    !memory.epoch_reported && answers.iter().all(Option::is_none)
}

/// Picks the route from one poll round (pure; invariant I4).
///
/// `memory` is what the previous step returned ([`RouteMemory::default`]
/// when the proxy starts); the returned memory's `highest` is the route's
/// epoch and its `principal` the route's principal. The rules, numbered as
/// in the module comment:
///
/// 1. When [`needs_probe`] holds and `round.read_write` is None, returns
///    [`Decision::Probe`] and `memory` unchanged; the caller probes and
///    calls again. Otherwise `round.read_write` is ignored: once an agent
///    reported an epoch, a round with no answer never routes by probe.
/// 2. Exactly one read-write address routes to it; two or more hold.
/// 3. The epoch is the highest of `memory.highest` and every answer's;
///    only a PRINCIPAL claim at that epoch, not in PENDING_FAILOVER, routes.
/// 4. Principals are one partner when their `server_name`s are equal.
/// 5. If no agent claims PRINCIPAL at the highest epoch, the epoch did not
///    rise and the current principal's agent is simply absent from the
///    answers, the route is kept until its agent has missed
///    [`MISSED_ROUNDS_TO_HOLD`] rounds in a row. Any answer from that agent
///    is taken at its word at once.
/// 6. Claims by two different partners at the highest epoch hold.
pub fn choose(memory: &RouteMemory, round: &PollRound) -> (RouteMemory, Decision) {
    let answers: Vec<&AgentAnswer> = round.answers.iter().flatten().collect();
    let highest = answers
        .iter()
        .filter_map(|answer| answer.epoch)
        .fold(memory.highest, Epoch::max);
    let epoch_reported = memory.epoch_reported || answers.iter().any(|a| a.epoch.is_some());
    let mut missed_rounds = 0;

    let decision = if needs_probe(memory, &round.answers) {
        let Some(read_write) = &round.read_write else {
            return (memory.clone(), Decision::Probe);
        };
        let mut servers: Vec<&String> = read_write.iter().collect();
        servers.sort();
        servers.dedup();
        match servers.as_slice() {
            [] => Decision::Hold(Hold::NoReadWrite),
            [address] => Decision::Route(Principal {
                address: (*address).clone(),
                server_name: (*address).clone(),
                discovery: Discovery::Probe,
            }),
            _ => Decision::Hold(Hold::TwoReadWrite),
        }
    } else {
        let claims: Vec<&AgentAnswer> = answers
            .iter()
            .copied()
            .filter(|answer| answer.role == Some(Role::Principal) && answer.epoch == Some(highest))
            .collect();
        match claims.first() {
            Some(first) if claims.iter().any(|c| c.server_name != first.server_name) => {
                // Two principals at one epoch cannot happen (I1).
                Decision::Hold(Hold::TwoPrincipals)
            }
            Some(_)
                if claims
                    .iter()
                    .any(|c| c.state.as_deref() == Some("PENDING_FAILOVER")) =>
            {
                Decision::Hold(Hold::PendingFailover)
            }
            Some(first) => Decision::Route(Principal {
                address: first.postgres_address.clone(),
                server_name: first.server_name.clone(),
                discovery: Discovery::Agent,
            }),
            None => match &memory.principal {
                Some(principal)
                    if principal.discovery == Discovery::Agent
                        && highest == memory.highest
                        && !answers
                            .iter()
                            .any(|answer| answer.server_name == principal.server_name) =>
                {
                    missed_rounds = memory.missed_rounds + 1;
                    if missed_rounds < MISSED_ROUNDS_TO_HOLD {
                        Decision::Route(principal.clone())
                    } else {
                        missed_rounds = 0;
                        Decision::Hold(Hold::PrincipalSilent)
                    }
                }
                _ if answers.is_empty() => Decision::Hold(Hold::NoAgentAnswered),
                _ => Decision::Hold(Hold::NoPrincipal),
            },
        }
    };
    let principal = match &decision {
        Decision::Route(principal) => Some(principal.clone()),
        _ => None,
    };
    let memory = RouteMemory {
        highest,
        epoch_reported,
        principal,
        missed_rounds,
    };
    (memory, decision)
}

/// Where the discovery task sends its findings and what it needs.
pub struct Discoverer {
    pub session: String,
    pub config: ProxySession,
    pub probe: ProbeConfig,
    pub tls: EndpointTls,
    /// How the read-write probes reach the servers.
    pub server_tls: ServerTls,
    pub publish: watch::Sender<Route>,
    /// Where the highest epoch is kept across restarts (I4).
    pub epochs: Option<EpochStore>,
}

impl Discoverer {
    /// Polls until `shutdown` is cancelled; [`choose`] decides.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut clients: Vec<Option<ControlClient>> =
            self.config.partners.iter().map(|_| None).collect();
        let mut known_postgres: Vec<String> =
            self.config.postgres.iter().map(|e| e.to_string()).collect();
        let mut probes = ProbeConnections::default();
        let mut memory = RouteMemory::default();
        if let Some(store) = &self.epochs {
            match store.load() {
                Ok(Some(epoch)) => {
                    // I4: an epoch was reported before this proxy's restart.
                    memory.highest = epoch;
                    memory.epoch_reported = true;
                }
                Ok(None) => {}
                Err(err) => tracing::error!(session = %self.session, "{err}"),
            }
        }
        loop {
            let results = poll_round(&self.config.partners, &mut clients, &self.tls, &memory).await;
            let mut round = PollRound::default();
            let mut partners = Vec::new();
            for (endpoint, result) in self.config.partners.iter().zip(results) {
                match result {
                    Ok(status) => {
                        if !status.postgres_address.is_empty()
                            && !known_postgres.contains(&status.postgres_address)
                        {
                            known_postgres.push(status.postgres_address.clone());
                        }
                        round.answers.push(Some(AgentAnswer::from(&status)));
                        partners.push(PartnerView {
                            endpoint: endpoint.clone(),
                            status: Some(status),
                            error: None,
                        });
                    }
                    Err(error) => {
                        round.answers.push(None);
                        partners.push(PartnerView {
                            endpoint: endpoint.clone(),
                            status: None,
                            error: Some(error),
                        });
                    }
                }
            }
            let (mut next, mut decision) = choose(&memory, &round);
            let mut tls_failure = None;
            if decision == Decision::Probe {
                let probed = probes
                    .probe_all(&known_postgres, &self.probe, &self.server_tls)
                    .await;
                round.read_write = Some(probed.read_write);
                tls_failure = probed.tls_failure;
                (next, decision) = choose(&memory, &round);
            } else {
                // Agents answer: no backend is kept for probes that
                // will not run again until they all fall silent.
                probes.close_all();
            }
            if next.highest > memory.highest {
                if let Some(store) = &self.epochs {
                    if let Err(err) = store.save(next.highest) {
                        tracing::error!(session = %self.session, "{err}");
                    }
                }
            }
            memory = next;
            if memory.missed_rounds > 0 {
                tracing::debug!(
                    session = %self.session,
                    missed = memory.missed_rounds,
                    "the principal's agent missed a poll round; route kept"
                );
            }
            let epoch = memory.highest;
            let principal = memory.principal.clone();
            let tls_failure = tls_failure.filter(|_| principal.is_none());
            self.publish.send_if_modified(|route| {
                if tls_failure.is_some() && route.tls_failure != tls_failure {
                    if let Some(failure) = &tls_failure {
                        tracing::warn!(session = %self.session, "read-write probe: {failure}");
                    }
                }
                let changed = route.epoch != epoch
                    || route.principal != principal
                    || route.tls_failure != tls_failure;
                if changed {
                    tracing::info!(
                        session = %self.session,
                        epoch = %epoch,
                        principal = ?principal.as_ref().map(|p| &p.address),
                        ?decision,
                        "route changed"
                    );
                }
                route.epoch = epoch;
                route.principal = principal;
                route.partners = partners;
                route.tls_failure = tls_failure;
                changed
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }
}

/// One poll round: every agent's status, in the partners' order. Once an
/// agent says it is the principal at an epoch above the route's, the round
/// waits only [`ROUND_GRACE`] more for the others, not a silent one's whole
/// poll timeout (a frozen old principal's agent would hold the new route
/// back); an agent that has not answered by then counts as a missed round.
async fn poll_round(
    partners: &[Endpoint],
    clients: &mut [Option<ControlClient>],
    tls: &EndpointTls,
    memory: &RouteMemory,
) -> Vec<Result<MirroringStatus, String>> {
    use futures::StreamExt;
    let mut results: Vec<Result<MirroringStatus, String>> = partners
        .iter()
        .map(|endpoint| Err(format!("no answer from {endpoint} in this round")))
        .collect();
    let mut polls: futures::stream::FuturesUnordered<_> = partners
        .iter()
        .zip(clients.iter_mut())
        .enumerate()
        .map(
            |(index, (endpoint, client))| async move { (index, poll(endpoint, client, tls).await) },
        )
        .collect();
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let next = match grace {
            None => polls.next().await,
            Some(until) => tokio::time::timeout_at(until, polls.next())
                .await
                .ok()
                .flatten(),
        };
        let Some((index, result)) = next else {
            break;
        };
        let promoted = result.as_ref().is_ok_and(|status| {
            status.role() == Some(Role::Principal)
                && status
                    .mirroring_role_sequence
                    .is_some_and(|epoch| Epoch(epoch) > memory.highest)
                && status.state() != Some("PENDING_FAILOVER")
        });
        if let Some(slot) = results.get_mut(index) {
            *slot = result;
        }
        if promoted && grace.is_none() {
            grace = Some(tokio::time::Instant::now() + ROUND_GRACE);
        }
    }
    results
}

/// One status request, reusing the partner's control connection. The
/// connection is taken out for the call, so that a call dropped mid-way
/// (a round that ended early) leaves none with a pending answer.
async fn poll(
    endpoint: &Endpoint,
    client: &mut Option<ControlClient>,
    tls: &EndpointTls,
) -> Result<MirroringStatus, String> {
    let mut connected = match client.take() {
        Some(connected) => connected,
        None => tokio::time::timeout(POLL_TIMEOUT, ControlClient::connect(endpoint, tls))
            .await
            .map_err(|_| format!("no answer from {endpoint} within {POLL_TIMEOUT:?}"))?
            .map_err(|err| err.to_string())?,
    };
    let status = connected
        .status_within(POLL_TIMEOUT)
        .await
        .map_err(|err| err.to_string())?;
    *client = Some(connected);
    Ok(status)
}

/// What one round of read-write probes found.
struct Probed {
    /// The addresses whose server accepts writes.
    read_write: Vec<String>,
    /// The first server whose TLS the proxy refused (or that refused TLS).
    tls_failure: Option<ServerTlsError>,
}

/// The read-write probes' connections, one per server address, kept from
/// one round to the next as the agents' control connections are: a fresh
/// connection every round forked a backend on each server twice a second
/// for as long as no agent answered (15 ms of PostgreSQL's CPU a second,
/// and a line per probe in a log with log_connections). A connection that
/// fails is replaced within the same round, and one is renewed after
/// [`PROBE_SESSION_LIFETIME`].
#[derive(Default)]
struct ProbeConnections {
    open: std::collections::HashMap<String, ProbeConnection>,
}

/// A probe's session: its client, the probe's statement prepared on it,
/// and the task that runs its connection.
struct ProbeConnection {
    client: tokio_postgres::Client,
    question: tokio_postgres::Statement,
    connection: tokio::task::JoinHandle<()>,
    opened: tokio::time::Instant,
}

/// How long a probe's session is kept: a smart shutdown (`pg_ctl stop -m
/// smart`) waits for every session to end, so the probe's must not live
/// forever.
const PROBE_SESSION_LIFETIME: Duration = Duration::from_secs(60);

impl ProbeConnection {
    /// Whether the server is in recovery; None when the session failed.
    async fn ask(&self) -> Option<Option<bool>> {
        let row = self.client.query_one(&self.question, &[]).await.ok()?;
        Some(row.try_get::<_, bool>(0).ok())
    }
}

impl Drop for ProbeConnection {
    fn drop(&mut self) {
        // A connection to a frozen server would otherwise wait on it
        // until TCP gives up.
        self.connection.abort();
    }
}

/// The probe's question: false is a read-write server. It reads the
/// server's current state, so a kept session sees a promotion.
const PROBE_QUERY: &str = "SELECT pg_is_in_recovery()";

impl ProbeConnections {
    /// Every PostgreSQL in `addresses` that accepts writes, probed at
    /// once. Connections to addresses no longer known are closed.
    async fn probe_all(
        &mut self,
        addresses: &[String],
        probe: &ProbeConfig,
        server_tls: &ServerTls,
    ) -> Probed {
        // Connections to addresses no longer known drop with `open`.
        let mut open = std::mem::take(&mut self.open);
        let mut held: Vec<Option<ProbeConnection>> = addresses
            .iter()
            .map(|address| open.remove(address))
            .collect();
        drop(open);
        let probes = addresses
            .iter()
            .zip(held.iter_mut())
            .map(|(address, held)| probe_read_write(address, probe, server_tls, held));
        let outcomes = futures::future::join_all(probes).await;
        let mut probed = Probed {
            read_write: Vec::new(),
            tls_failure: None,
        };
        for ((address, outcome), held) in addresses.iter().zip(outcomes).zip(held) {
            match outcome {
                Ok(true) => probed.read_write.push(address.clone()),
                Ok(false) => {}
                Err(failure) => {
                    probed.tls_failure.get_or_insert(failure);
                }
            }
            if let Some(connection) = held {
                self.open.insert(address.clone(), connection);
            }
        }
        probed
    }

    fn close_all(&mut self) {
        self.open.clear();
    }
}

/// `SELECT pg_is_in_recovery()` is false: the server is read-write. The
/// question goes on the connection kept in `held` when it still works,
/// else on a new one, opened like a client's (`[server_tls]`), with
/// tokio-postgres running over it without TLS of its own; `held` keeps a
/// connection that answered. A probe that runs out of time drops its
/// connection.
async fn probe_read_write(
    address: &str,
    probe: &ProbeConfig,
    server_tls: &ServerTls,
    held: &mut Option<ProbeConnection>,
) -> Result<bool, ServerTlsError> {
    let attempt = async {
        let kept = held
            .take()
            .filter(|kept| kept.opened.elapsed() < PROBE_SESSION_LIFETIME);
        if let Some(kept) = kept {
            if let Some(in_recovery) = kept.ask().await {
                *held = Some(kept);
                return Ok(in_recovery);
            }
        }
        let mut config = tokio_postgres::Config::new();
        config
            .user(&probe.user)
            .dbname(&probe.database)
            .application_name(PROBE_APPLICATION_NAME)
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        if let Some(password) = &probe.password {
            config.password(password);
        }
        let stream = match server_tls.connect(address).await {
            Ok(stream) => stream,
            Err(ServerConnectError::Tls(failure)) => return Err(failure),
            Err(ServerConnectError::Io(_)) => return Ok(None),
        };
        let Ok((client, connection)) = config.connect_raw(stream, tokio_postgres::NoTls).await
        else {
            return Ok(None);
        };
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        // Prepared once per session: a kept session's rounds are then a
        // Bind and an Execute, not a Parse and a Close every 0.5 s.
        let Ok(question) = client.prepare(PROBE_QUERY).await else {
            connection.abort();
            return Ok(None);
        };
        let opened = ProbeConnection {
            client,
            question,
            connection,
            opened: tokio::time::Instant::now(),
        };
        let Some(in_recovery) = opened.ask().await else {
            return Ok(None);
        };
        *held = Some(opened);
        Ok(in_recovery)
    };
    match tokio::time::timeout(POLL_TIMEOUT, attempt).await {
        Ok(Ok(in_recovery)) => Ok(in_recovery == Some(false)),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Ok(false),
    }
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

    fn answer(name: &str, role: Role, epoch: u64, state: &str) -> Option<AgentAnswer> {
        Some(AgentAnswer {
            server_name: name.into(),
            role: Some(role),
            epoch: Some(Epoch(epoch)),
            state: Some(state.into()),
            postgres_address: format!("{name}:5432"),
        })
    }

    fn round(answers: Vec<Option<AgentAnswer>>) -> PollRound {
        PollRound {
            answers,
            read_write: None,
        }
    }

    fn probed(read_write: &[&str]) -> PollRound {
        PollRound {
            answers: vec![None, None],
            read_write: Some(read_write.iter().map(|a| a.to_string()).collect()),
        }
    }

    fn principal(name: &str) -> Principal {
        Principal {
            address: format!("{name}:5432"),
            server_name: name.into(),
            discovery: Discovery::Agent,
        }
    }

    /// The memory after alpha was routed to at `epoch`.
    fn routed(name: &str, epoch: u64) -> RouteMemory {
        RouteMemory {
            highest: Epoch(epoch),
            epoch_reported: true,
            principal: Some(principal(name)),
            missed_rounds: 0,
        }
    }

    #[test]
    fn routes_to_the_principal_of_the_highest_epoch() {
        let answers = vec![
            answer("a", Role::Principal, 3, "SYNCHRONIZED"),
            answer("b", Role::Mirror, 3, "SYNCHRONIZED"),
        ];
        let start = RouteMemory {
            highest: Epoch(1),
            ..Default::default()
        };
        let (memory, decision) = choose(&start, &round(answers));
        assert_eq!(decision, Decision::Route(principal("a")));
        assert_eq!(memory, routed("a", 3));
    }

    #[test]
    fn a_lower_epoch_principal_answer_never_routes() {
        // a still thinks it is principal at 3, b was promoted at 4 (I4).
        let answers = vec![
            answer("a", Role::Principal, 3, "DISCONNECTED"),
            answer("b", Role::Principal, 4, "DISCONNECTED"),
        ];
        let (memory, decision) = choose(&routed("a", 3), &round(answers.clone()));
        assert_eq!(decision, Decision::Route(principal("b")));
        assert_eq!(memory.highest, Epoch(4));
        // Only a answers, at 3: it is never routed to. b missing one round
        // is not contradicted by an answer below its epoch, so b is kept
        // once, then the route holds at 4.
        let only_a = round(vec![answers[0].clone(), None]);
        let (memory, decision) = choose(&memory, &only_a);
        assert_eq!(decision, Decision::Route(principal("b")));
        let (memory, decision) = choose(&memory, &only_a);
        assert_eq!(decision, Decision::Hold(Hold::PrincipalSilent));
        assert_eq!((memory.highest, memory.principal.clone()), (Epoch(4), None));
        let (memory, decision) = choose(&memory, &only_a);
        assert_eq!(decision, Decision::Hold(Hold::NoPrincipal));
        assert_eq!((memory.highest, memory.principal), (Epoch(4), None));
    }

    #[test]
    fn pending_failover_holds_new_connections() {
        let answers = vec![answer("a", Role::Principal, 3, "PENDING_FAILOVER"), None];
        let (memory, decision) = choose(&routed("a", 3), &round(answers));
        assert_eq!(decision, Decision::Hold(Hold::PendingFailover));
        assert_eq!(memory.principal, None);
    }

    #[test]
    fn two_principals_at_the_highest_epoch_hold() {
        let answers = vec![
            answer("a", Role::Principal, 3, "SYNCHRONIZED"),
            answer("b", Role::Principal, 3, "SYNCHRONIZED"),
        ];
        let (memory, decision) = choose(&routed("a", 3), &round(answers));
        assert_eq!(decision, Decision::Hold(Hold::TwoPrincipals));
        assert_eq!(memory.principal, None);
    }

    #[test]
    fn one_missed_round_keeps_the_route_two_drop_it() {
        let mirror_only = round(vec![None, answer("b", Role::Mirror, 3, "DISCONNECTED")]);
        let (once, decision) = choose(&routed("a", 3), &mirror_only);
        assert_eq!(decision, Decision::Route(principal("a")));
        assert_eq!(once.missed_rounds, 1);
        let (twice, decision) = choose(&once, &mirror_only);
        assert_eq!(decision, Decision::Hold(Hold::PrincipalSilent));
        assert_eq!((twice.principal, twice.missed_rounds), (None, 0));

        // No agent answering at all counts the same; an answer resets it.
        let silent = round(vec![None, None]);
        let (once, decision) = choose(&routed("a", 3), &silent);
        assert_eq!(decision, Decision::Route(principal("a")));
        let back = round(vec![answer("a", Role::Principal, 3, "SYNCHRONIZED"), None]);
        let (again, _) = choose(&once, &back);
        assert_eq!(again, routed("a", 3));
        let (once_more, decision) = choose(&again, &silent);
        assert_eq!(decision, Decision::Route(principal("a")));
        let (_, decision) = choose(&once_more, &silent);
        assert_eq!(decision, Decision::Hold(Hold::PrincipalSilent));
    }

    #[test]
    fn a_contradicted_missed_round_changes_the_route_at_once() {
        // The mirror answers at a higher epoch: a is fenced.
        let higher = round(vec![None, answer("b", Role::Mirror, 4, "DISCONNECTED")]);
        let (memory, decision) = choose(&routed("a", 3), &higher);
        assert_eq!(decision, Decision::Hold(Hold::NoPrincipal));
        assert_eq!((memory.highest, memory.principal), (Epoch(4), None));
        // Another principal answers at a higher epoch.
        let promoted = round(vec![None, answer("b", Role::Principal, 4, "DISCONNECTED")]);
        assert_eq!(
            choose(&routed("a", 3), &promoted).1,
            Decision::Route(principal("b"))
        );
        // The principal's own agent says it is no longer principal.
        let demoted = round(vec![answer("a", Role::Mirror, 3, "SUSPENDED"), None]);
        assert_eq!(
            choose(&routed("a", 3), &demoted).1,
            Decision::Hold(Hold::NoPrincipal)
        );
    }

    #[test]
    fn the_probe_runs_only_before_any_epoch() {
        let fresh = RouteMemory::default();
        let silent = round(vec![None, None]);
        assert!(needs_probe(&fresh, &silent.answers));
        assert_eq!(choose(&fresh, &silent), (fresh.clone(), Decision::Probe));
        let (memory, decision) = choose(&fresh, &probed(&["a:5432"]));
        assert_eq!(
            decision,
            Decision::Route(Principal {
                address: "a:5432".into(),
                server_name: "a:5432".into(),
                discovery: Discovery::Probe,
            })
        );
        assert!(!memory.epoch_reported);

        // An agent answers once with an epoch; from then on a silent
        // round holds, whatever a probe would say.
        let (memory, _) = choose(
            &memory,
            &round(vec![answer("a", Role::Mirror, 1, "DISCONNECTED"), None]),
        );
        assert!(memory.epoch_reported);
        assert!(!needs_probe(&memory, &silent.answers));
        let (memory, decision) = choose(&memory, &probed(&["a:5432"]));
        assert_eq!(decision, Decision::Hold(Hold::NoAgentAnswered));
        assert_eq!((memory.highest, memory.principal), (Epoch(1), None));

        // Answers without an epoch neither probe nor count as reported.
        let unset = AgentAnswer {
            server_name: "a".into(),
            role: None,
            epoch: None,
            state: None,
            postgres_address: "a:5432".into(),
        };
        let (memory, decision) = choose(&fresh, &round(vec![Some(unset), None]));
        assert_eq!(decision, Decision::Hold(Hold::NoPrincipal));
        assert!(!memory.epoch_reported);
    }

    /// The status of a partner that SET PARTNER OFF ended as `role` at
    /// `epoch`: no mirroring columns, only `ended_as`.
    fn ended(name: &str, role: Role, epoch: u64) -> Option<AgentAnswer> {
        let status = MirroringStatus {
            server_name: name.into(),
            postgres_address: format!("{name}:5432"),
            ended_as: Some(crate::control::EndedAs {
                role,
                epoch: Epoch(epoch),
            }),
            ..MirroringStatus::default()
        };
        Some(AgentAnswer::from(&status))
    }

    #[test]
    fn mirroring_off_keeps_routing_to_the_last_principal_only() {
        // OFF on a synchronized pair: a stays routed to, as a standalone
        // writable server; b, a standby, never is (rule 7).
        let off = round(vec![
            ended("a", Role::Principal, 3),
            ended("b", Role::Mirror, 3),
        ]);
        let (memory, decision) = choose(&routed("a", 3), &off);
        assert_eq!(decision, Decision::Route(principal("a")));
        assert_eq!(memory, routed("a", 3));
        // A proxy that starts after OFF finds it too, without a probe.
        let (memory, decision) = choose(&RouteMemory::default(), &off);
        assert_eq!(decision, Decision::Route(principal("a")));
        assert!(memory.epoch_reported);
        // The former mirror alone is never routed to.
        let mirror_only = round(vec![None, ended("b", Role::Mirror, 3)]);
        assert_eq!(
            choose(&RouteMemory::default(), &mirror_only).1,
            Decision::Hold(Hold::NoPrincipal)
        );
        // I4: a principal superseded before OFF ended it (b was promoted
        // at 4, a ended still thinking it led at 3) is never routed to.
        let stale = round(vec![ended("a", Role::Principal, 3), None]);
        let mut memory = routed("b", 4);
        for _ in 0..3 {
            let decision;
            (memory, decision) = choose(&memory, &stale);
            assert_ne!(decision, Decision::Route(principal("a")));
            assert_eq!(memory.highest, Epoch(4));
        }
        assert_eq!(memory.principal, None);
    }

    #[test]
    fn two_read_write_servers_hold() {
        let (memory, decision) = choose(&RouteMemory::default(), &probed(&["a:5432", "b:5432"]));
        assert_eq!(decision, Decision::Hold(Hold::TwoReadWrite));
        assert_eq!(memory.principal, None);
        let (_, decision) = choose(&RouteMemory::default(), &probed(&[]));
        assert_eq!(decision, Decision::Hold(Hold::NoReadWrite));
    }

    #[test]
    fn principals_are_compared_by_server_name() {
        let route = Route {
            epoch: Epoch(4),
            principal: Some(principal("b")),
            ..Route::default()
        };
        let moved = Principal {
            address: "elsewhere:6432".into(),
            ..principal("b")
        };
        let same_address_other_name = Principal {
            server_name: "a".into(),
            ..principal("b")
        };
        assert!(!route.supersedes(Epoch(4), &principal("b")));
        assert!(!route.supersedes(Epoch(4), &moved));
        assert!(route.supersedes(Epoch(4), &same_address_other_name));
        assert!(route.supersedes(Epoch(4), &principal("a")));
        assert!(route.supersedes(Epoch(3), &principal("b")));
        let held = Route {
            principal: None,
            ..route
        };
        assert!(!held.supersedes(Epoch(4), &principal("a")));

        // The same partner reporting a new address is routed to there, and
        // its connections made at the old address are not superseded.
        let mut relocated = answer("b", Role::Principal, 4, "SYNCHRONIZED");
        if let Some(answer) = relocated.as_mut() {
            answer.postgres_address = "elsewhere:6432".into();
        }
        let (memory, decision) = choose(&routed("b", 4), &round(vec![None, relocated]));
        assert_eq!(decision, Decision::Route(moved.clone()));
        let route = Route {
            epoch: memory.highest,
            principal: memory.principal,
            ..Route::default()
        };
        assert!(!route.supersedes(Epoch(4), &principal("b")));
    }

    #[tokio::test]
    async fn route_changes_are_seen_one_wait_after_another() {
        use crate::proxy::wake_filter::WakeFilter;
        use futures::FutureExt;
        let at = |epoch, name: &str| Route {
            epoch: Epoch(epoch),
            principal: Some(principal(name)),
            ..Route::default()
        };
        let (publish, routes) = watch::channel(at(3, "alpha"));
        // As the relay waits: polled only when its own wait woke it.
        let mut changes = Box::pin(WakeFilter::new(RouteChanges::new(routes)));
        assert_eq!((&mut changes).now_or_never(), None, "no change yet");
        // Two changes before a poll are seen as one.
        publish.send(at(3, "alpha")).unwrap();
        publish.send(at(4, "beta")).unwrap();
        assert_eq!((&mut changes).now_or_never(), Some(()));
        assert_eq!((&mut changes).now_or_never(), None, "seen already");
        // Waiting, it wakes for the next change: the wait was made again.
        let publisher = tokio::spawn(async move {
            tokio::task::yield_now().await;
            publish.send(at(5, "alpha")).unwrap();
            publish
        });
        tokio::time::timeout(Duration::from_secs(5), &mut changes)
            .await
            .expect("the change woke the wait");
        let publish = publisher.await.unwrap();
        assert_eq!((&mut changes).now_or_never(), None);
        // Once no change can come, it never resolves.
        drop(publish);
        assert_eq!((&mut changes).now_or_never(), None);
    }
}
