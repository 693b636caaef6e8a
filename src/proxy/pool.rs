//! Server connection pools. In session mode (`pool_mode = "session"`), for
//! a session with proxy-side authentication, a server connection whose
//! client left cleanly while it was idle is reset (`server_reset_query`)
//! and kept for the next client of the same (session, database, user)
//! whose startup packet is the same. In transaction mode
//! (`proxy::transaction`) a client holds a slot only for a transaction.
//!
//! [`Pools`] is built once by `proxy::serve` and shared by the connection
//! tasks (through the `Context`), the console (`SHOW POOLS`) and one
//! [`Pools::keep`] task per pooled session, which closes idle connections
//! past `server_idle_timeout` or `server_lifetime` and, at once, every idle
//! connection of a session whose route's epoch or principal changed (I4).
//! A connection task takes a [`Lease`] (a slot of the pool, with an idle
//! connection or without) before it connects; dropping the lease frees the
//! slot, [`Lease::give_back`] returns the connection. [`Reuse`] is what the
//! splice learns on the way about whether the connection may go back; it
//! is pure. [`reset`] runs the reset query; dropping it drops the stream,
//! which is then closed, never pooled. The pool's lock is a std mutex: it
//! is held for a few comparisons, never across an await.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::metrics::{counter, gauge, Counter, Gauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PoolSettings;
use crate::metrics;
use crate::proxy::connection::ConnError;
use crate::proxy::fence::FRONTEND_AWAITS_READY;
use crate::proxy::routing::{Principal, Route};
use crate::proxy::server_tls::ServerStream;
use crate::proxy::transaction::ServerState;
use crate::roles::Epoch;
use crate::wire::extended::{
    self, decode_data_row, decode_parameter_status, DATA_ROW, PARAMETER_STATUS,
};
use crate::wire::frame::{FrameScanner, TAGGED_HEADER_LEN};
use crate::wire::startup::{backend_message_len, READY_FOR_QUERY};

/// The frontend's Terminate message tag.
pub const TERMINATE: u8 = b'X';
/// ReadyForQuery's status outside a transaction block.
const IDLE: u8 = b'I';
/// The backend's ErrorResponse tag.
const ERROR_RESPONSE: u8 = b'E';
/// How often a keeper looks for expired idle connections.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest single wait of a client for a slot before it looks again (a
/// wake-up can be missed when several slots free at once).
const SLOT_RECHECK: Duration = Duration::from_millis(100);
/// How long the proxy's own queries (a reset, transaction mode's
/// parameters) may take before the connection is closed.
const OWN_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest reply to the proxy's own queries and logins.
pub const OWN_REPLY_MAX: usize = 256 * 1024;
/// How long a closed connection's Terminate may take to send.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Which pool: connections are shared only within one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PoolKey {
    pub session: String,
    pub database: String,
    pub user: String,
}

/// A server connection waiting in a pool for its next client.
pub struct IdleServer {
    pub server: ServerStream,
    /// The principal and epoch it was opened for (I4: reused only while
    /// the route still names them).
    pub principal: Principal,
    pub epoch: Epoch,
    /// The startup packet it logged in with; a client is given it only if
    /// its own is the same.
    pub startup: Vec<u8>,
    /// The login's messages from AuthenticationOk to ReadyForQuery, the
    /// server's BackendKeyData among them: replayed to the next client.
    pub greeting: Vec<u8>,
    /// When it logged in, for `server_lifetime`.
    pub born: Instant,
    /// What transaction mode carries from client to client.
    pub state: ServerState,
    idle_since: Instant,
}

impl IdleServer {
    fn expired(&self, settings: &PoolSettings, now: Instant) -> bool {
        now.duration_since(self.idle_since) >= settings.idle_timeout
            || now.duration_since(self.born) >= settings.lifetime
    }
}

/// One pool's connections.
struct Pool {
    idle: Vec<IdleServer>,
    /// Slots leased to clients (each with a server connection or about to
    /// open one).
    active: usize,
    waiting: usize,
    /// Wakes a client waiting for a slot.
    freed: Arc<Notify>,
    /// Its metrics, looked up once: a transaction-mode client takes and
    /// gives back a slot per transaction.
    gauges: [Gauge; 3],
    reuses: Counter,
}

impl Pool {
    fn new(key: &PoolKey) -> Pool {
        let labels = [
            (metrics::SESSION, key.session.clone()),
            ("database", key.database.clone()),
            ("user", key.user.clone()),
        ];
        Pool {
            idle: Vec::new(),
            active: 0,
            waiting: 0,
            freed: Arc::default(),
            gauges: [
                gauge!(metrics::PROXY_POOL_ACTIVE, &labels),
                gauge!(metrics::PROXY_POOL_IDLE, &labels),
                gauge!(metrics::PROXY_POOL_WAITING, &labels),
            ],
            reuses: counter!(metrics::PROXY_POOL_REUSES, metrics::SESSION => key.session.clone()),
        }
    }

    /// Publishes its sizes as gauges.
    fn record(&self) {
        let [active, idle, waiting] = &self.gauges;
        active.set(self.active as f64);
        idle.set(self.idle.len() as f64);
        waiting.set(self.waiting as f64);
    }
}

/// A pool as `pgmirror.pools` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRow {
    pub key: PoolKey,
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
    pub max: usize,
}

/// Every pool of the proxy; cheap to clone.
#[derive(Clone, Default)]
pub struct Pools {
    /// The pooled sessions' settings; sessions not here are never pooled.
    settings: Arc<BTreeMap<String, PoolSettings>>,
    pools: Arc<Mutex<BTreeMap<PoolKey, Pool>>>,
}

/// A client's slot in a pool, with the idle connection it got (if any).
/// Dropped without [`Lease::give_back`], it frees the slot and its server
/// connection (if any) is simply closed by its owner.
pub struct Lease {
    pools: Pools,
    key: PoolKey,
    /// Boxed: the lease lives as long as its client, the idle connection
    /// only until it is taken.
    pub reused: Option<Box<IdleServer>>,
    /// Still counted in `active` (give_back frees it itself).
    slot: bool,
}

impl Route {
    /// Whether an idle connection may serve a client now: the route names
    /// its principal, at its epoch (I4). A route that names no principal
    /// (held) serves none.
    fn serves(&self, idle: &IdleServer) -> bool {
        self.epoch == idle.epoch
            && self.principal.as_ref().is_some_and(|principal| {
                principal.server_name == idle.principal.server_name
                    && principal.address == idle.principal.address
            })
    }
}

/// Counts a client among its pool's waiting ones until dropped (also when
/// the waiting client's task is dropped).
struct Waiter<'a> {
    pools: &'a Pools,
    key: &'a PoolKey,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get_mut(self.key) {
            pool.waiting = pool.waiting.saturating_sub(1);
            pool.record();
        }
    }
}

/// A client found no slot in its pool within the hold timeout.
#[derive(Debug, thiserror::Error)]
#[error(
    "pool full: {user}@{database} already has {max} server connections (pool_size) and none \
     came free within {:.1} s",
    .waited.as_secs_f64()
)]
pub struct PoolFull {
    pub user: String,
    pub database: String,
    pub max: usize,
    pub waited: Duration,
}

impl Pools {
    pub fn new(settings: BTreeMap<String, PoolSettings>) -> Pools {
        Pools {
            settings: Arc::new(settings),
            pools: Arc::default(),
        }
    }

    /// The settings of a pooled session.
    pub fn settings(&self, session: &str) -> Option<&PoolSettings> {
        self.settings.get(session)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PoolKey, Pool>> {
        // A panic while holding the lock leaves counts, never a broken
        // invariant about which server a client reaches.
        self.pools
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Takes a slot in `key`'s pool, with an idle connection whose startup
    /// packet is `startup` and whose principal and epoch `route` still
    /// names (I4); waits for a free slot until `deadline`. An idle
    /// connection of another startup packet gives its slot up when the
    /// pool is full.
    pub async fn checkout(
        &self,
        key: PoolKey,
        startup: &[u8],
        route: &watch::Receiver<Route>,
        deadline: Instant,
    ) -> Result<Option<Lease>, PoolFull> {
        let Some(settings) = self.settings(&key.session) else {
            return Ok(None);
        };
        let started = Instant::now();
        loop {
            let (freed, _waiter) = {
                let mut pools = self.lock();
                let pool = match pools.get_mut(&key) {
                    Some(pool) => pool,
                    None => pools.entry(key.clone()).or_insert_with(|| Pool::new(&key)),
                };
                let now = Instant::now();
                let current = route.borrow();
                close_all(&mut pool.idle, |idle| {
                    idle.expired(settings, now) || current.supersedes(idle.epoch, &idle.principal)
                });
                let found = pool
                    .idle
                    .iter()
                    .position(|idle| idle.startup == startup && current.serves(idle));
                let full = pool.active + pool.idle.len() >= settings.size;
                if found.is_some() || !full || !pool.idle.is_empty() {
                    let reused = found.map(|at| Box::new(pool.idle.swap_remove(at)));
                    if reused.is_none() && full {
                        // The oldest idle one of other parameters makes room.
                        let oldest = pool
                            .idle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, idle)| idle.born);
                        if let Some(at) = oldest.map(|(at, _)| at) {
                            close(pool.idle.swap_remove(at).server);
                        }
                    }
                    pool.active += 1;
                    if reused.is_some() {
                        pool.reuses.increment(1);
                    }
                    pool.record();
                    return Ok(Some(Lease {
                        pools: self.clone(),
                        key,
                        reused,
                        slot: true,
                    }));
                }
                pool.waiting += 1;
                pool.record();
                let waiter = Waiter {
                    pools: self,
                    key: &key,
                };
                (pool.freed.clone(), waiter)
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PoolFull {
                    max: settings.size,
                    waited: started.elapsed(),
                    user: key.user.clone(),
                    database: key.database.clone(),
                });
            }
            let _ = tokio::time::timeout(left.min(SLOT_RECHECK), freed.notified()).await;
        }
    }

    /// Closes the idle connections of `session` that are past their time
    /// or whose principal `route` no longer names (I4).
    fn reap(&self, session: &str, route: &Route) {
        let Some(settings) = self.settings(session) else {
            return;
        };
        let now = Instant::now();
        let mut pools = self.lock();
        for (_, pool) in pools.iter_mut().filter(|(key, _)| key.session == session) {
            let before = pool.idle.len();
            close_all(&mut pool.idle, |idle| {
                idle.expired(settings, now) || route.supersedes(idle.epoch, &idle.principal)
            });
            if pool.idle.len() != before {
                pool.record();
            }
        }
    }

    /// Keeps `session`'s pools until `shutdown`: closes expired idle
    /// connections every [`REAP_INTERVAL`], and at once those of a
    /// superseded principal when the route changes (I4). On shutdown every
    /// idle connection is closed.
    pub async fn keep(
        self,
        session: String,
        mut routes: watch::Receiver<Route>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        let mut watching = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                changed = routes.changed(), if watching => watching = changed.is_ok(),
            }
            let route = routes.borrow_and_update().clone();
            self.reap(&session, &route);
        }
        let mut pools = self.lock();
        for (_, pool) in pools.iter_mut().filter(|(key, _)| key.session == session) {
            close_all(&mut pool.idle, |_| true);
        }
    }

    /// The pools, for `SHOW POOLS`.
    pub fn snapshot(&self) -> Vec<PoolRow> {
        let pools = self.lock();
        pools
            .iter()
            .map(|(key, pool)| PoolRow {
                key: key.clone(),
                active: pool.active,
                idle: pool.idle.len(),
                waiting: pool.waiting,
                max: self.settings(&key.session).map_or(0, |s| s.size),
            })
            .collect()
    }
}

/// Closes the idle connections `expired` picks.
fn close_all(idle: &mut Vec<IdleServer>, expired: impl Fn(&IdleServer) -> bool) {
    let mut at = 0;
    while at < idle.len() {
        if expired(&idle[at]) {
            close(idle.swap_remove(at).server);
        } else {
            at += 1;
        }
    }
}

/// Ends a server connection politely (Terminate), off the caller's path.
fn close(mut server: ServerStream) {
    tokio::spawn(async move {
        let goodbye = async {
            server.write_all(&[TERMINATE, 0, 0, 0, 4]).await?;
            server.shutdown().await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
    });
}

impl Lease {
    /// Returns a connection that [`reset`] left idle, unless it is past
    /// its lifetime or `route` no longer names its principal (I4); the
    /// slot is freed either way, in the same step, so that a waiting
    /// client finds the connection.
    pub fn give_back(mut self, mut server: IdleServer, route: &Route) {
        let Some(settings) = self.pools.settings(&self.key.session) else {
            return;
        };
        let now = Instant::now();
        server.idle_since = now;
        if server.expired(settings, now) || !route.serves(&server) {
            close(server.server);
            return;
        }
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get_mut(&self.key) {
            pool.idle.push(server);
            pool.active = pool.active.saturating_sub(1);
            self.slot = false;
            pool.freed.notify_one();
            pool.record();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.slot {
            return;
        }
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get_mut(&self.key) {
            pool.active = pool.active.saturating_sub(1);
            pool.freed.notify_one();
            pool.record();
        }
    }
}

impl IdleServer {
    pub fn new(
        server: ServerStream,
        principal: Principal,
        epoch: Epoch,
        startup: Vec<u8>,
        greeting: Vec<u8>,
        born: Instant,
    ) -> IdleServer {
        IdleServer {
            server,
            principal,
            epoch,
            startup,
            greeting,
            born,
            state: ServerState::default(),
            idle_since: Instant::now(),
        }
    }
}

/// What the splice learns about a pooled server connection: whether, when
/// the client leaves, nothing is in flight and no transaction is open, so
/// that the connection may be reset and reused. Anything unusual spoils it
/// for good: the connection is then closed with its client.
#[derive(Debug)]
pub struct Reuse {
    /// Message boundaries of the server's bytes after authentication.
    server: FrameScanner,
    /// Sync, Query and FunctionCall sent whose ReadyForQuery has not come.
    syncs_pending: usize,
    /// The client's last message was not one of those (an extended-query
    /// message before its Sync, COPY data): the server is not settled.
    unsynced: bool,
    /// The last ReadyForQuery's transaction status.
    status: u8,
    spoiled: bool,
    /// The login's messages, AuthenticationOk to ReadyForQuery.
    pub greeting: Vec<u8>,
}

impl Default for Reuse {
    fn default() -> Self {
        Reuse {
            server: FrameScanner::backend(),
            syncs_pending: 0,
            unsynced: false,
            status: IDLE,
            spoiled: false,
            greeting: Vec::new(),
        }
    }
}

impl Reuse {
    /// A message the client sent on to the server.
    pub fn client_message(&mut self, tag: u8) {
        if FRONTEND_AWAITS_READY.contains(&tag) {
            self.syncs_pending += 1;
            self.unsynced = false;
        } else {
            self.unsynced = true;
        }
    }

    /// Bytes the server sent after its login's ReadyForQuery.
    pub fn server_bytes(&mut self, chunk: &[u8]) {
        let (mut readies, mut status) = (0, None);
        let fed = self.server.feed(chunk, |message| {
            if message.tag == Some(READY_FOR_QUERY) {
                readies += 1;
                status = message.prefix.first().copied();
            }
        });
        if fed.is_err() {
            self.spoil();
        }
        self.syncs_pending = self.syncs_pending.saturating_sub(readies);
        if let Some(status) = status {
            self.status = status;
        }
    }

    /// Something happened that a reset cannot be trusted to undo.
    pub fn spoil(&mut self) {
        self.spoiled = true;
    }

    /// Whether the server is idle outside a transaction with nothing in
    /// flight, at a message boundary.
    pub fn is_idle(&self) -> bool {
        !self.spoiled
            && self.syncs_pending == 0
            && !self.unsynced
            && self.status == IDLE
            && self.server.at_message_boundary()
            && !self.server.is_failed()
    }
}

/// Where a Terminate starts in the chunk whose message ends at `end`, when
/// the whole message is in that chunk.
pub fn terminate_start(end: usize) -> Option<usize> {
    end.checked_sub(TAGGED_HEADER_LEN)
}

/// Runs `query` on an idle server connection and reads to its
/// ReadyForQuery; true when it succeeded and left the server idle outside
/// a transaction, so that the connection may be pooled.
pub async fn reset(server: &mut ServerStream, query: &str) -> bool {
    own_query(server, query)
        .await
        .is_ok_and(|reply| reply.error.is_none() && reply.quiet)
}

/// What the proxy's own simple query returned.
#[derive(Debug, Default)]
pub struct OwnReply {
    pub statuses: Vec<(String, String)>,
    /// The first row's values.
    pub row: Vec<Option<String>>,
    pub error: Option<Vec<u8>>,
    /// The server ended idle outside a transaction with nothing after its
    /// ReadyForQuery: the next client's first byte meets a quiet server.
    pub quiet: bool,
}

/// Runs `sql` on an idle server connection and reads to its ReadyForQuery.
pub async fn own_query(server: &mut ServerStream, sql: &str) -> Result<OwnReply, ConnError> {
    let run = async {
        server.write_all(&extended::encode_query(sql)).await?;
        server.flush().await?;
        let mut reply = OwnReply::default();
        let mut input = Vec::with_capacity(512);
        loop {
            while let Some((tag, len)) =
                backend_message_len(&input)?.filter(|(_, len)| input.len() >= *len)
            {
                let message = &input[..len];
                match tag {
                    PARAMETER_STATUS => {
                        if let Some((name, value)) = decode_parameter_status(message) {
                            reply.statuses.push((name.to_string(), value.to_string()));
                        }
                    }
                    DATA_ROW if reply.row.is_empty() => reply.row = decode_data_row(message),
                    ERROR_RESPONSE => reply.error = Some(message.to_vec()),
                    READY_FOR_QUERY => {
                        reply.quiet =
                            message.get(TAGGED_HEADER_LEN) == Some(&IDLE) && input.len() == len;
                        return Ok(reply);
                    }
                    _ => {}
                }
                input.drain(..len);
            }
            if input.len() > OWN_REPLY_MAX || server.read_buf(&mut input).await? == 0 {
                return Err(ConnError::Unexpected("server connection lost"));
            }
        }
    };
    tokio::time::timeout(OWN_QUERY_TIMEOUT, run)
        .await
        .map_err(|_| ConnError::Unexpected("no answer from the server in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::routing::Discovery;
    use tokio::net::{TcpListener, TcpStream};

    fn route(epoch: u64, name: &str) -> Route {
        Route {
            epoch: Epoch(epoch),
            principal: Some(Principal {
                address: "127.0.0.1:5432".into(),
                server_name: name.into(),
                discovery: Discovery::Agent,
            }),
            ..Default::default()
        }
    }

    /// A pool of `app` in session `shop` holding one idle connection made
    /// for `made_for`; the server's end of it.
    async fn one_idle(made_for: &Route) -> (Pools, TcpStream) {
        let settings = PoolSettings {
            mode: crate::config::PoolMode::Session,
            size: 2,
            idle_timeout: Duration::from_secs(600),
            lifetime: Duration::from_secs(3600),
            reset_query: "DISCARD ALL".into(),
        };
        let pools = Pools::new(BTreeMap::from([("shop".to_string(), settings)]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_end, _) = listener.accept().await.unwrap();
        let (_publish, routes) = watch::channel(made_for.clone());
        let lease = pools
            .checkout(key(), b"startup", &routes, Instant::now())
            .await
            .unwrap()
            .expect("a pooled session");
        let principal = made_for.principal.clone().unwrap();
        let idle = IdleServer::new(
            ServerStream::Plain(client),
            principal,
            made_for.epoch,
            b"startup".to_vec(),
            Vec::new(),
            Instant::now(),
        );
        lease.give_back(idle, made_for);
        (pools, server_end)
    }

    fn key() -> PoolKey {
        PoolKey {
            session: "shop".into(),
            database: "postgres".into(),
            user: "app".into(),
        }
    }

    fn idle_count(pools: &Pools) -> usize {
        pools.snapshot().iter().map(|row| row.idle).sum()
    }

    #[tokio::test]
    async fn idle_connections_serve_only_their_principal_and_epoch() {
        let at_3 = route(3, "a");
        let checkout = |pools: &Pools, route: &Route, startup: &'static [u8]| {
            let (_publish, routes) = watch::channel(route.clone());
            let pools = pools.clone();
            async move {
                let lease = pools
                    .checkout(key(), startup, &routes, Instant::now())
                    .await;
                lease.unwrap().expect("a pooled session").reused.is_some()
            }
        };
        let (pools, _server) = one_idle(&at_3).await;
        // While no principal is routed (a hold), or for another startup
        // packet: kept, not given.
        let held = Route {
            epoch: Epoch(3),
            ..Default::default()
        };
        assert!(!checkout(&pools, &held, b"startup").await);
        assert!(!checkout(&pools, &at_3, b"other").await);
        assert_eq!(idle_count(&pools), 1);
        assert!(checkout(&pools, &at_3, b"startup").await);
        // Another principal or a newer epoch: closed, never given (I4).
        for newer in [route(3, "b"), route(4, "a")] {
            let (pools, _server) = one_idle(&at_3).await;
            assert!(!checkout(&pools, &newer, b"startup").await, "{newer:?}");
            assert_eq!(idle_count(&pools), 0, "{newer:?}");
        }
    }

    #[tokio::test]
    async fn a_new_epoch_or_principal_closes_idle_connections() {
        for newer in [route(4, "a"), route(3, "b")] {
            let (pools, mut server) = one_idle(&route(3, "a")).await;
            pools.reap("shop", &route(3, "a"));
            assert_eq!(idle_count(&pools), 1, "the same route keeps it");
            pools.reap("shop", &newer);
            assert_eq!(idle_count(&pools), 0, "{newer:?}");
            // The server hears Terminate, then the close.
            let mut goodbye = Vec::new();
            let read = tokio::time::timeout(CLOSE_TIMEOUT * 2, server.read_to_end(&mut goodbye));
            read.await.unwrap().unwrap();
            assert_eq!(goodbye, [TERMINATE, 0, 0, 0, 4]);
        }
    }

    #[tokio::test]
    async fn a_full_pool_refuses_after_the_deadline() {
        let (pools, _server) = one_idle(&route(3, "a")).await;
        let (_publish, routes) = watch::channel(route(3, "a"));
        // Slot 1 of 2 (reusing the idle one), then slot 2 (fresh).
        let _first = pools
            .checkout(key(), b"startup", &routes, Instant::now())
            .await;
        let _second = pools
            .checkout(key(), b"startup", &routes, Instant::now())
            .await;
        let deadline = Instant::now() + Duration::from_millis(200);
        let third = pools.checkout(key(), b"startup", &routes, deadline).await;
        assert_eq!(third.err().map(|full| full.max), Some(2));
        assert_eq!(pools.snapshot()[0].waiting, 0);
    }

    fn ready(status: u8) -> Vec<u8> {
        vec![READY_FOR_QUERY, 0, 0, 0, 5, status]
    }

    #[test]
    fn idle_after_each_query_answered() {
        let mut reuse = Reuse::default();
        assert!(reuse.is_idle());
        reuse.client_message(b'Q');
        assert!(!reuse.is_idle(), "a query in flight");
        reuse.server_bytes(&ready(IDLE));
        assert!(reuse.is_idle());
    }

    #[test]
    fn pipelined_queries_wait_for_every_ready() {
        let mut reuse = Reuse::default();
        reuse.client_message(b'Q');
        reuse.client_message(b'Q');
        reuse.server_bytes(&ready(IDLE));
        assert!(!reuse.is_idle());
        reuse.server_bytes(&ready(IDLE));
        assert!(reuse.is_idle());
    }

    #[test]
    fn not_idle_inside_a_transaction_or_before_sync() {
        let mut reuse = Reuse::default();
        reuse.client_message(b'Q');
        reuse.server_bytes(&ready(b'T'));
        assert!(!reuse.is_idle(), "in a transaction block");
        reuse.client_message(b'Q');
        reuse.server_bytes(&ready(IDLE));
        assert!(reuse.is_idle());
        reuse.client_message(b'P');
        assert!(!reuse.is_idle(), "Parse without Sync");
        reuse.client_message(b'S');
        reuse.server_bytes(&ready(b'E'));
        assert!(!reuse.is_idle(), "failed transaction");
    }

    #[test]
    fn a_split_message_or_a_spoil_is_not_idle() {
        let mut reuse = Reuse::default();
        let message = ready(IDLE);
        reuse.server_bytes(&message[..3]);
        assert!(!reuse.is_idle(), "inside a message");
        reuse.server_bytes(&message[3..]);
        assert!(reuse.is_idle());
        reuse.spoil();
        assert!(!reuse.is_idle());
    }

    #[test]
    fn terminate_start_needs_the_whole_message() {
        assert_eq!(terminate_start(5), Some(0));
        assert_eq!(terminate_start(12), Some(7));
        assert_eq!(terminate_start(3), None);
    }
}
