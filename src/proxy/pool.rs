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
//! A client finds its pool once ([`Pools::pool`], a [`PoolHandle`]) and
//! takes a [`Lease`] (a slot of the pool, with an idle connection or
//! without) before it connects; dropping the lease frees the slot,
//! [`Lease::give_back`] returns the connection. A freed slot goes straight
//! to the client that has waited longest, with its connection, which that
//! client checks against its own route (I4). [`Reuse`] is what the splice
//! learns on the way about whether the connection may go back; it is pure.
//! [`reset`] runs the reset query; dropping it drops the stream, which is
//! then closed, never pooled. Each pool's lock is a std mutex: it is held
//! for a few comparisons, never across an await.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ::metrics::{counter, gauge, Counter, Gauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PoolSettings;
use crate::metrics;
use crate::proxy::connection::ConnError;
use crate::proxy::fence::FRONTEND_AWAITS_READY;
use crate::proxy::routing::{Principal, Route};
use crate::proxy::server_tls::ServerStream;
use crate::proxy::transaction::settings::ServerSettings;
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
    pub startup: Arc<[u8]>,
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

/// One pool's connections and waiting clients.
struct Pool {
    idle: Vec<IdleServer>,
    /// Slots leased to clients (each with a server connection or about to
    /// open one).
    active: usize,
    /// Clients waiting for a slot, longest-waiting first. A slot that
    /// frees goes straight to the first one still waiting (with its
    /// connection, if any): no wake-up to look, no race to lose.
    waiting: VecDeque<oneshot::Sender<Lease>>,
    /// Its metrics, looked up once: a transaction-mode client takes and
    /// gives back a slot per transaction.
    gauges: [Gauge; 3],
    /// One shared map per set of session parameters its clients have in
    /// force, so that a connection's parameters and its next client's are
    /// usually the same map (see `transaction::settings`), and the greeting
    /// kept for it. Forgotten when no client or connection holds them any
    /// more.
    parameter_sets: BTreeMap<ServerSettings, ParameterSet>,
}

/// A set of session parameters that clients of a pool have in force.
struct ParameterSet {
    shared: Weak<ServerSettings>,
    greeting: Option<Arc<KeptGreeting>>,
}

/// The ParameterStatus messages a connection of a pool reported with a set
/// of parameters in force, and the principal and epoch it was opened for:
/// the next client with the same parameters is greeted with them without
/// taking a connection, as PgBouncer greets its clients, while the route
/// still names that principal at that epoch (I4).
pub struct KeptGreeting {
    pub principal: Principal,
    pub epoch: Epoch,
    pub statuses: Vec<u8>,
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
            waiting: VecDeque::new(),
            parameter_sets: BTreeMap::new(),
            gauges: [
                gauge!(metrics::PROXY_POOL_ACTIVE, &labels),
                gauge!(metrics::PROXY_POOL_IDLE, &labels),
                gauge!(metrics::PROXY_POOL_WAITING, &labels),
            ],
        }
    }

    /// Publishes its sizes as gauges.
    fn record(&self) {
        let [active, idle, waiting] = &self.gauges;
        active.set(self.active as f64);
        idle.set(self.idle.len() as f64);
        waiting.set(self.waiting.len() as f64);
    }

    /// Hands a slot that frees (with `server`, if any) to the client that
    /// has waited longest and still waits; the slot stays counted in
    /// `active`. Gives `server` back when no one waits.
    fn hand_off(
        &mut self,
        shared: &Arc<Shared>,
        mut server: Option<Box<IdleServer>>,
    ) -> Result<(), Option<Box<IdleServer>>> {
        while let Some(waiter) = self.waiting.pop_front() {
            let lease = Lease {
                pool: shared.clone(),
                reused: server,
                slot: true,
            };
            match waiter.send(lease) {
                Ok(()) => {
                    self.record();
                    return Ok(());
                }
                // It stopped waiting: the next one.
                Err(mut unwanted) => {
                    unwanted.slot = false;
                    server = unwanted.reused.take();
                }
            }
        }
        Err(server)
    }
}

/// One pool, shared by the clients that use it and their leases.
struct Shared {
    key: PoolKey,
    settings: PoolSettings,
    reuses: Counter,
    /// A std mutex: held for a few comparisons, never across an await.
    pool: Mutex<Pool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding the lock leaves counts, never a broken
        // invariant about which server a client reaches.
        self.pool
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
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
    pools: Arc<Mutex<BTreeMap<PoolKey, Arc<Shared>>>>,
}

/// One (session, database, user)'s pool, as a client holds it: found once,
/// used for each of its transactions.
#[derive(Clone)]
pub struct PoolHandle(Arc<Shared>);

/// A client's slot in a pool, with the idle connection it got (if any).
/// Dropped without [`Lease::give_back`], it frees the slot (to the next
/// waiting client) and its server connection (if any) is simply closed by
/// its owner.
pub struct Lease {
    pool: Arc<Shared>,
    /// Boxed: the lease lives as long as its client, the idle connection
    /// only until it is taken.
    pub reused: Option<Box<IdleServer>>,
    /// Still counted in `active` (give_back frees it itself).
    slot: bool,
}

impl Route {
    /// Whether an idle connection may serve a client now: the route names
    /// its principal, at its epoch (I4).
    fn serves(&self, idle: &IdleServer) -> bool {
        self.names(&idle.principal, idle.epoch)
    }

    /// Whether the route names `principal` at `epoch`. A route that names
    /// no principal (held) names none.
    fn names(&self, principal: &Principal, epoch: Epoch) -> bool {
        self.epoch == epoch
            && self.principal.as_ref().is_some_and(|current| {
                current.server_name == principal.server_name && current.address == principal.address
            })
    }
}

/// A client waiting for a slot. Dropped before a slot came (its deadline
/// passed, or its task ended), it leaves the queue; a slot handed to it in
/// that very moment goes on to the next client.
struct Waiter<'a> {
    shared: &'a Shared,
    slot: oneshot::Receiver<Lease>,
    served: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        self.slot.close();
        let late = self.slot.try_recv().ok();
        {
            let mut pool = self.shared.lock();
            pool.waiting.retain(|waiter| !waiter.is_closed());
            pool.record();
        }
        // Outside the lock: dropping it frees its slot, which locks.
        drop(late);
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

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PoolKey, Arc<Shared>>> {
        self.pools
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// `key`'s pool (made on first use); None when its session is not
    /// pooled.
    pub fn pool(&self, key: &PoolKey) -> Option<PoolHandle> {
        let settings = self.settings(&key.session)?;
        let mut pools = self.lock();
        let shared = pools.entry(key.clone()).or_insert_with(|| {
            Arc::new(Shared {
                key: key.clone(),
                settings: settings.clone(),
                reuses: counter!(metrics::PROXY_POOL_REUSES, metrics::SESSION => key.session.clone()),
                pool: Mutex::new(Pool::new(key)),
            })
        });
        Some(PoolHandle(shared.clone()))
    }

    /// Closes the idle connections of `session` that are past their time
    /// or whose principal `route` no longer names (I4). (No client waits
    /// while a connection is idle: one that frees goes to a waiting client.)
    fn reap(&self, session: &str, route: &Route) {
        let now = Instant::now();
        for shared in self.of_session(session) {
            let mut pool = shared.lock();
            let before = pool.idle.len();
            close_all(&mut pool.idle, |idle| {
                idle.expired(&shared.settings, now) || route.supersedes(idle.epoch, &idle.principal)
            });
            pool.parameter_sets
                .retain(|_, set| set.shared.strong_count() > 0);
            if pool.idle.len() != before {
                pool.record();
            }
        }
    }

    /// The pools of `session`.
    fn of_session(&self, session: &str) -> Vec<Arc<Shared>> {
        let pools = self.lock();
        pools
            .iter()
            .filter(|(key, _)| key.session == session)
            .map(|(_, shared)| shared.clone())
            .collect()
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
        for shared in self.of_session(&session) {
            close_all(&mut shared.lock().idle, |_| true);
        }
    }

    /// The pools, for `SHOW POOLS`.
    pub fn snapshot(&self) -> Vec<PoolRow> {
        let pools = self.lock();
        pools
            .values()
            .map(|shared| {
                let pool = shared.lock();
                PoolRow {
                    key: shared.key.clone(),
                    active: pool.active,
                    idle: pool.idle.len(),
                    // Not yet pruned: clients that stopped waiting.
                    waiting: pool.waiting.iter().filter(|w| !w.is_closed()).count(),
                    max: shared.settings.size,
                }
            })
            .collect()
    }
}

impl PoolHandle {
    /// The pool's shared map of the parameters `in_force` holds: the one
    /// its other clients with the same values use, or `in_force` itself.
    pub fn shared_settings(&self, in_force: &Arc<ServerSettings>) -> Arc<ServerSettings> {
        let mut pool = self.0.lock();
        let set = pool.parameter_sets.get(&**in_force);
        if let Some(shared) = set.and_then(|set| set.shared.upgrade()) {
            return shared;
        }
        let set = ParameterSet {
            shared: Arc::downgrade(in_force),
            greeting: None,
        };
        pool.parameter_sets.insert((**in_force).clone(), set);
        in_force.clone()
    }

    /// The greeting kept for clients with `in_force`'s parameters, while
    /// `route` still names the principal and epoch it came from (I4).
    pub fn kept_greeting(
        &self,
        in_force: &ServerSettings,
        route: &Route,
    ) -> Option<Arc<KeptGreeting>> {
        let pool = self.0.lock();
        let greeting = pool.parameter_sets.get(in_force)?.greeting.as_ref()?;
        route
            .names(&greeting.principal, greeting.epoch)
            .then(|| greeting.clone())
    }

    /// Keeps `greeting` for the next client with `in_force`'s parameters.
    pub fn keep_greeting(&self, in_force: &ServerSettings, greeting: Arc<KeptGreeting>) {
        if let Some(set) = self.0.lock().parameter_sets.get_mut(in_force) {
            set.greeting = Some(greeting);
        }
    }

    /// Forgets every kept greeting: a server reported a change in a
    /// transaction (a client's SET, or a reload of its configuration), and
    /// the next login takes a connection to see what it reports now.
    pub fn forget_greetings(&self) {
        for set in self.0.lock().parameter_sets.values_mut() {
            set.greeting = None;
        }
    }

    /// Takes a slot in the pool, with an idle connection whose startup
    /// packet is `startup` and whose principal and epoch `route` still
    /// names (I4); waits for a free slot until `deadline`. An idle
    /// connection of another startup packet gives its slot up when the
    /// pool is full.
    pub async fn checkout(
        &self,
        startup: &[u8],
        route: &watch::Receiver<Route>,
        deadline: Instant,
    ) -> Result<Lease, PoolFull> {
        let shared = &self.0;
        let settings = &shared.settings;
        let started = Instant::now();
        let slot = {
            let mut pool = shared.lock();
            let current = route.borrow();
            // The most recently returned first: the last one usually
            // serves, and the scan stops there. What it passes that is
            // past its time or superseded is closed on the way.
            let now = started;
            let mut found = None;
            let mut at = pool.idle.len();
            while at > 0 {
                at -= 1;
                let idle = &pool.idle[at];
                if idle.expired(settings, now) || current.supersedes(idle.epoch, &idle.principal) {
                    close(pool.idle.swap_remove(at).server);
                } else if *idle.startup == *startup && current.serves(idle) {
                    found = Some(Box::new(pool.idle.swap_remove(at)));
                    break;
                }
            }
            let full = pool.active + pool.idle.len() >= settings.size;
            if found.is_some() || !full || !pool.idle.is_empty() {
                if found.is_none() && full {
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
                if found.is_some() {
                    shared.reuses.increment(1);
                }
                pool.record();
                return Ok(Lease {
                    pool: shared.clone(),
                    reused: found,
                    slot: true,
                });
            }
            let (sender, receiver) = oneshot::channel();
            pool.waiting.push_back(sender);
            pool.record();
            receiver
        };
        let mut waiter = Waiter {
            shared,
            slot,
            served: false,
        };
        let Ok(Ok(mut lease)) = tokio::time::timeout_at(deadline, &mut waiter.slot).await else {
            // Its deadline passed (a queue that is dropped only with the
            // pool cannot close first).
            return Err(PoolFull {
                max: settings.size,
                waited: started.elapsed(),
                user: shared.key.user.clone(),
                database: shared.key.database.clone(),
            });
        };
        waiter.served = true;
        // Handed over by a client that just finished with it: it serves
        // this client only if the route still names its principal (I4)
        // and it logged in with the same startup packet.
        if let Some(idle) = lease.reused.take() {
            if *idle.startup == *startup && route.borrow().serves(&idle) {
                shared.reuses.increment(1);
                lease.reused = Some(idle);
            } else {
                close(idle.server);
            }
        }
        Ok(lease)
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
    /// its lifetime or `route` no longer names its principal (I4): to the
    /// client that has waited longest, or to the idle ones. The slot is
    /// handed on or freed in the same step.
    pub fn give_back(mut self, mut server: IdleServer, route: &Route) {
        let now = Instant::now();
        server.idle_since = now;
        if server.expired(&self.pool.settings, now) || !route.serves(&server) {
            close(server.server);
            // Dropping the lease hands the bare slot on.
            return;
        }
        self.slot = false;
        let shared = &self.pool;
        let mut pool = shared.lock();
        if let Err(Some(server)) = pool.hand_off(shared, Some(Box::new(server))) {
            pool.idle.push(*server);
            pool.active = pool.active.saturating_sub(1);
            pool.record();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.slot {
            return;
        }
        let mut pool = self.pool.lock();
        if pool.hand_off(&self.pool, None).is_err() {
            pool.active = pool.active.saturating_sub(1);
            pool.record();
        }
    }
}

impl IdleServer {
    pub fn new(
        server: ServerStream,
        principal: Principal,
        epoch: Epoch,
        startup: Arc<[u8]>,
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
            if input.len() > OWN_REPLY_MAX {
                return Err(ConnError::ServerTooChatty);
            }
            if server.read_buf(&mut input).await? == 0 {
                let closed = std::io::ErrorKind::UnexpectedEof;
                return Err(ConnError::ServerIo(closed.into()));
            }
        }
    };
    tokio::time::timeout(OWN_QUERY_TIMEOUT, run)
        .await
        .map_err(|_| ConnError::ServerIo(std::io::ErrorKind::TimedOut.into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolMode;
    use crate::proxy::routing::Discovery;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

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

    /// The pools of session `shop`, two connections each, in `mode`.
    fn shop_pools(mode: PoolMode) -> Pools {
        let settings = PoolSettings {
            mode,
            size: 2,
            idle_timeout: Duration::from_secs(600),
            lifetime: Duration::from_secs(3600),
            reset_query: "DISCARD ALL".into(),
        };
        Pools::new(BTreeMap::from([("shop".to_string(), settings)]))
    }

    /// A pool of `app` in session `shop` holding one idle connection made
    /// for `made_for`; the server's end of it.
    async fn one_idle(made_for: &Route) -> (Pools, TcpStream) {
        let pools = shop_pools(PoolMode::Session);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_end, _) = listener.accept().await.unwrap();
        let (_publish, routes) = watch::channel(made_for.clone());
        let lease = checkout(&pools, &routes, Instant::now()).await.unwrap();
        lease.give_back(idle_server(client, made_for), made_for);
        (pools, server_end)
    }

    #[test]
    fn a_kept_greeting_serves_only_its_parameters_principal_and_epoch() {
        let pools = shop_pools(PoolMode::Transaction);
        let pool = pools.pool(&key()).expect("a pooled session");
        let set = |name: &str| {
            let values = ServerSettings::from([("application_name".into(), name.into())]);
            pool.shared_settings(&Arc::new(values))
        };
        let (web, batch) = (set("web"), set("batch"));
        let made_for = route(3, "a");
        let greeting = KeptGreeting {
            principal: made_for.principal.clone().unwrap(),
            epoch: made_for.epoch,
            statuses: b"S".to_vec(),
        };
        pool.keep_greeting(&web, Arc::new(greeting));

        assert!(pool.kept_greeting(&web, &made_for).is_some());
        assert!(
            pool.kept_greeting(&batch, &made_for).is_none(),
            "other parameters"
        );
        // I4: a greeting from a former principal or epoch is not served.
        assert!(
            pool.kept_greeting(&web, &route(4, "a")).is_none(),
            "a newer epoch"
        );
        assert!(
            pool.kept_greeting(&web, &route(3, "b")).is_none(),
            "another principal"
        );
        let held = Route {
            epoch: made_for.epoch,
            ..Default::default()
        };
        assert!(pool.kept_greeting(&web, &held).is_none(), "no principal");
        pool.forget_greetings();
        assert!(pool.kept_greeting(&web, &made_for).is_none(), "forgotten");
    }

    /// A connection made for `made_for`, logged in with `b"startup"`.
    fn idle_server(client: TcpStream, made_for: &Route) -> IdleServer {
        IdleServer::new(
            ServerStream::Plain(client),
            made_for.principal.clone().unwrap(),
            made_for.epoch,
            Arc::from(&b"startup"[..]),
            Vec::new(),
            Instant::now(),
        )
    }

    /// A slot of the `shop` pool for `b"startup"`.
    async fn checkout(
        pools: &Pools,
        routes: &watch::Receiver<Route>,
        deadline: Instant,
    ) -> Result<Lease, PoolFull> {
        let pool = pools.pool(&key()).expect("a pooled session");
        pool.checkout(b"startup", routes, deadline).await
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
                let pool = pools.pool(&key()).expect("a pooled session");
                let lease = pool.checkout(startup, &routes, Instant::now()).await;
                lease.unwrap().reused.is_some()
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
            assert_closed_politely(&mut server).await;
        }
    }

    /// The server hears Terminate, then the close.
    async fn assert_closed_politely(server: &mut TcpStream) {
        let mut goodbye = Vec::new();
        let read = tokio::time::timeout(CLOSE_TIMEOUT * 2, server.read_to_end(&mut goodbye));
        read.await.unwrap().unwrap();
        assert_eq!(goodbye, [TERMINATE, 0, 0, 0, 4]);
    }

    #[tokio::test]
    async fn a_full_pool_refuses_after_the_deadline() {
        let (pools, _server) = one_idle(&route(3, "a")).await;
        let (_publish, routes) = watch::channel(route(3, "a"));
        // Slot 1 of 2 (reusing the idle one), then slot 2 (fresh).
        let _first = checkout(&pools, &routes, Instant::now()).await;
        let _second = checkout(&pools, &routes, Instant::now()).await;
        let deadline = Instant::now() + Duration::from_millis(200);
        let third = checkout(&pools, &routes, deadline).await;
        assert_eq!(third.err().map(|full| full.max), Some(2));
        assert_eq!(pools.snapshot()[0].waiting, 0);
    }

    /// The pool's (active, idle, waiting).
    fn counts(pools: &Pools) -> (usize, usize, usize) {
        let row = &pools.snapshot()[0];
        (row.active, row.idle, row.waiting)
    }

    /// The `shop` pool (size 2) with both slots leased (the first with the
    /// idle connection made for `made_for`) and a client waiting, whose
    /// route is `waiter_route`; the server's end of that connection.
    async fn full_with_a_waiter(
        made_for: &Route,
        waiter_route: &Route,
    ) -> (
        Pools,
        [Lease; 2],
        JoinHandle<Result<Lease, PoolFull>>,
        TcpStream,
    ) {
        let (pools, server) = one_idle(made_for).await;
        let (_publish, routes) = watch::channel(made_for.clone());
        let first = checkout(&pools, &routes, Instant::now()).await.unwrap();
        let second = checkout(&pools, &routes, Instant::now()).await.unwrap();
        let later = Instant::now() + Duration::from_secs(5);
        let (waiting_pools, waiter_route) = (pools.clone(), waiter_route.clone());
        let waiting = tokio::spawn(async move {
            let (_publish, routes) = watch::channel(waiter_route);
            checkout(&waiting_pools, &routes, later).await
        });
        while counts(&pools).2 == 0 {
            tokio::task::yield_now().await;
        }
        (pools, [first, second], waiting, server)
    }

    #[tokio::test]
    async fn a_connection_given_back_goes_straight_to_the_longest_waiting_client() {
        let at_3 = route(3, "a");
        let (pools, [mut first, _second], waiting, _server) =
            full_with_a_waiter(&at_3, &at_3).await;
        // A client that gave up waiting is skipped, never handed the slot.
        let (_publish, routes) = watch::channel(at_3.clone());
        let gave_up = checkout(&pools, &routes, Instant::now()).await;
        assert!(gave_up.is_err());
        let connection = *first.reused.take().expect("the idle one");
        first.give_back(connection, &at_3);
        let handed = waiting.await.unwrap().expect("a slot");
        assert!(handed.reused.is_some(), "handed its connection");
        assert_eq!(counts(&pools), (2, 0, 0));
    }

    #[tokio::test]
    async fn a_handed_connection_the_waiting_client_s_route_no_longer_names_is_closed() {
        let at_3 = route(3, "a");
        // The waiting client already knows of epoch 4; the one giving back
        // does not yet (I4: the receiver checks too).
        let (pools, [mut first, _second], waiting, mut server) =
            full_with_a_waiter(&at_3, &route(4, "a")).await;
        let connection = *first.reused.take().expect("the idle one");
        first.give_back(connection, &at_3);
        let handed = waiting.await.unwrap().expect("a slot");
        assert!(handed.reused.is_none(), "a bare slot");
        assert_eq!(counts(&pools), (2, 0, 0));
        assert_closed_politely(&mut server).await;
    }

    #[tokio::test]
    async fn a_slot_dropped_goes_to_a_waiting_client() {
        let at_3 = route(3, "a");
        let (pools, [first, second], waiting, _server) = full_with_a_waiter(&at_3, &at_3).await;
        drop(first);
        let handed = waiting.await.unwrap().expect("a slot");
        assert_eq!(counts(&pools), (2, 0, 0));
        drop((second, handed));
        assert_eq!(counts(&pools), (0, 0, 0));
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
