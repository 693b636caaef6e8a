//! Transaction mode (`pool_mode = "transaction"`): a client holds a server
//! connection of its pool only while it runs a transaction. It takes one
//! when it sends a statement and gives it back at the ReadyForQuery that
//! says the server is idle outside a transaction with nothing outstanding.
//! The proxy logs the client in itself (proxy-side authentication is
//! required), greets it with what a connection of its pool reported with
//! the same parameters (kept by the pool, `pool::KeptGreeting`), and
//! carries what a session would keep: its parameters (the startup
//! packet's and its top-level SET/RESET, `settings`), applied to whichever
//! connection runs its next transaction, and its named prepared statements
//! (`statements`), prepared on each connection under a name of the
//! proxy's (`replies` keeps the replies in step). What needs a session of
//! its own is refused at the top level (`sql`).
//!
//! A failover is invisible to a client outside a transaction: the pool
//! drops the former principal's connections (I4) and its next statement
//! runs on a connection to the new one. A client inside a transaction,
//! with nothing in flight, keeps its connection and is told its
//! transaction is gone (`aborted`: 40001). A statement in flight at a
//! failover, or when the server connection is lost, may have committed on
//! the former principal without the mirror: the client gets 40003 and its
//! connection ends (I2), as the commit fence, which sees every reply too,
//! does for a commit whose wait for the mirror was cut short.

pub mod aborted;
pub mod replies;
pub mod settings;
pub mod sql;
pub mod statements;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use ::metrics::counter;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::metrics;
use crate::proxy::auth::Login;
use crate::proxy::clients::Registration;
use crate::proxy::connection::{hold_and_connect, refuse, ConnError, End};
use crate::proxy::fence::{
    CommitFence, FenceCause, Step, FRONTEND_AWAITS_READY, SQLSTATE_COMPLETION_UNKNOWN,
};
use crate::proxy::pool::{
    own_query, IdleServer, KeptGreeting, Lease, PoolHandle, PoolKey, OWN_REPLY_MAX,
};
use crate::proxy::routing::{Principal, Route, RouteChanges};
use crate::proxy::server_tls::ServerStream;
use crate::proxy::splice::{fenced, Duplex, SHUTTING_DOWN};
use crate::proxy::wake_filter::WakeFilter;
use crate::proxy::Context;
use crate::roles::Epoch;
use crate::wire::extended::{
    self, decode_bind, decode_parameter_status, decode_parse, decode_query, decode_target, BIND,
    CLOSE, CLOSE_COMPLETE, COPY_DONE, COPY_FAIL, DESCRIBE, EXECUTE, FLUSH, FUNCTION_CALL,
    PARAMETER_STATUS, PARSE, PARSE_COMPLETE, QUERY, SYNC, TARGET_STATEMENT, TERMINATE,
};
use crate::wire::frame::{FrameScanner, TAGGED_HEADER_LEN};
use crate::wire::startup::{
    backend_key_data, backend_message_len, decode_backend_key_data, ends_connection, error_code,
    error_message, error_response, startup_message, Severity, BACKEND_KEY_DATA, ERROR_RESPONSE,
    READY_FOR_QUERY,
};

use aborted::{Aborted, Next, SQLSTATE_SERIALIZATION_FAILURE};
use replies::{Disposition, Kind, Replies, Undo};
use settings::{ClientSettings, ServerSettings};
use statements::{ClientStatements, ServerStatements, Statement};

/// ReadyForQuery's status outside a transaction block.
const IDLE: u8 = b'I';
/// ReadyForQuery's status in a failed transaction block.
const TRANSACTION_FAILED: u8 = b'E';
/// Client messages that run nothing on the server: however many of them
/// were in flight when a server connection was lost, nothing changed.
const RUN_NOTHING: [u8; 6] = [PARSE, BIND, DESCRIBE, CLOSE, SYNC, FLUSH];
/// Server messages larger than this are streamed to the client as they
/// come instead of being read whole (rows, COPY data).
const WHOLE_MESSAGE_MAX: usize = 64 * 1024;
/// The most server bytes read at once.
const SERVER_READ: usize = 8 * 1024;
/// Bytes queued for one side before the proxy stops reading the other.
const QUEUE_MAX: usize = 256 * 1024;
/// The most room made at once for the rest of a client's message.
const CLIENT_READ: usize = 64 * 1024;

/// What a pooled server connection carries from one transaction-mode
/// client to the next (empty in session mode).
#[derive(Debug, Default)]
pub struct ServerState {
    pub prepared: ServerStatements,
    pub settings: Arc<ServerSettings>,
    /// The parameters the server reported (ParameterStatus), as now.
    pub reported: BTreeMap<String, String>,
    /// The server reported a change while a client's transaction ran.
    reported_in_transaction: bool,
    /// The server's BackendKeyData, for forwarding cancels.
    pub key: Option<(u32, u32)>,
    /// Its relay's buffers, empty between transactions.
    buffers: Buffers,
}

/// A server connection's relay buffers, kept with it from transaction to
/// transaction: a pool has few connections and many clients, so they cost
/// little memory and save allocating them for every transaction.
#[derive(Debug, Default)]
struct Buffers {
    to_server: Vec<u8>,
    raw: Vec<u8>,
    to_client: Vec<u8>,
    server_input: Vec<u8>,
    server_read: Vec<u8>,
    /// Empty: what the transaction awaited has all come.
    replies: Replies,
}

impl Buffers {
    /// Larger than a transaction usually needs: let go after a large
    /// result, not kept for the connection's life.
    const KEPT_MAX: usize = 64 * 1024;

    fn kept(self) -> Buffers {
        let keep = |buffer: Vec<u8>| {
            if buffer.capacity() > Self::KEPT_MAX {
                Vec::new()
            } else {
                buffer
            }
        };
        Buffers {
            to_server: keep(self.to_server),
            raw: keep(self.raw),
            to_client: keep(self.to_client),
            server_input: keep(self.server_input),
            server_read: keep(self.server_read),
            replies: self.replies,
        }
    }
}

/// A transaction-mode client after proxy-side authentication.
pub struct Client<'a> {
    pub ctx: &'a Context,
    pub registration: Registration,
    pub login: Login,
    pub key: PoolKey,
    pub routes: watch::Receiver<Route>,
    /// The startup packet's parameters, let go once read.
    pub params: Vec<(String, String)>,
    /// What it sent after its login messages.
    pub early: Vec<u8>,
}

/// A server connection held for one transaction.
struct Attached {
    lease: Lease,
    server: ServerStream,
    principal: Principal,
    epoch: Epoch,
    born: Instant,
    state: ServerState,
    /// The client's forwarded-cancel count when it got the connection.
    cancels: u64,
}

/// What a client's transaction ended in.
enum After {
    /// It ran; the client is idle.
    Idle,
    /// No server connection came in time: the client was told, and its
    /// messages up to the next Sync are skipped.
    Refused,
    /// A failover ended the open transaction; the client stays.
    Aborted(String),
    /// The client's connection ends.
    End(End),
}

/// What a transaction's run on its server connection ended in.
enum Turn {
    /// The server is idle: back to the pool (or closed).
    Done(Box<Attached>, Touched),
    /// A failover ended the open transaction; the client stays.
    Aborted(String),
    /// The server connection was lost while nothing ran; what the client
    /// was owed has been answered. `skipping`: its messages up to the next
    /// Sync are to be skipped.
    Settled { skipping: bool },
    /// The client's connection ends.
    End(End),
}

/// What a transaction did to session state that the proxy must learn.
#[derive(Debug, Default)]
struct Touched {
    names: BTreeMap<String, bool>,
    reset_all: bool,
    deallocate_all: bool,
}

impl Touched {
    fn note(&mut self, found: &sql::Inspection) {
        if found.reset_all {
            self.reset_all = true;
            self.names.clear();
        }
        self.deallocate_all |= found.deallocate_all;
        for (name, set) in &found.touched {
            self.names.insert(name.clone(), *set);
        }
    }

    fn is_empty(&self) -> bool {
        self.names.is_empty() && !self.reset_all && !self.deallocate_all
    }
}

/// The per-client state that outlives its server connections.
struct Session<'a> {
    ctx: &'a Context,
    registration: &'a Registration,
    login: Login,
    key: PoolKey,
    pool: PoolHandle,
    /// The startup packet every connection of the pool logs in with.
    startup: Arc<[u8]>,
    routes: watch::Receiver<Route>,
    settings: ClientSettings,
    statements: ClientStatements,
    /// The principal and epoch of its last server connection.
    last: Option<(String, Epoch)>,
    /// The proxy's shutdown, one wait for the client's whole life: made
    /// per transaction, its registration and removal took the token's
    /// locks twice for every statement. Filtered, it is polled only when
    /// the shutdown woke it.
    shutdown: Pin<Box<WakeFilter<WaitForCancellationFutureOwned>>>,
    /// The route's changes, one wait for the client's whole life, polled
    /// only when woken, as `shutdown`.
    route_changes: Pin<Box<WakeFilter<RouteChanges>>>,
}

/// Serves a transaction-mode client until it leaves.
/// The client comes boxed: its fields move into the session, and the
/// task does not keep room for them a second time.
pub(super) async fn serve<S: Duplex>(
    client: Box<Client<'_>>,
    mut stream: S,
) -> Result<End, ConnError> {
    let Client {
        ctx,
        registration,
        login,
        key,
        routes,
        params,
        early,
    } = *client;
    let Some(pool) = ctx.pools.pool(&key) else {
        return refuse(
            &mut stream,
            ConnError::Unexpected("transaction mode without a pool"),
        )
        .await;
    };
    let startup = startup_message(&[("user", &key.user), ("database", &key.database)]);
    let route_changes = Box::pin(WakeFilter::new(RouteChanges::new(routes.clone())));
    let mut session = Session {
        ctx,
        registration: &registration,
        login,
        key,
        pool,
        startup: startup.into(),
        routes,
        settings: ClientSettings::from_startup(&params),
        statements: ClientStatements::new(),
        last: None,
        shutdown: Box::pin(WakeFilter::new(ctx.shutdown.clone().cancelled_owned())),
        route_changes,
    };
    session.share_settings();
    drop(params);
    // Plain TCP splits without a lock between the halves, as in the splice.
    let (mut client_read, mut client_write) = stream.halves();
    // Allocated as the client sends, and let go while it is idle.
    let mut input = early;
    // The sub-futures are boxed: while the client is idle, its task holds
    // only what the wait for its next message needs.
    let greeted = Box::pin(session.greet(&mut client_read, &mut client_write, &mut input));
    if let Some(end) = greeted.await? {
        return Ok(end);
    }

    let mut aborted: Option<Aborted> = None;
    let mut skipping = false;
    loop {
        // Idle: no server connection until a whole message has come.
        let mut out = Vec::new();
        while !has_whole_message(&input)? {
            reserve_for_message(&mut input)?;
            let read = tokio::select! {
                read = client_read.read_buf(&mut input) => read?,
                _ = &mut session.shutdown => {
                    let bye = error_response(Severity::Fatal, "57P01", SHUTTING_DOWN);
                    let _ = client_write.write_all(&bye).await;
                    return Ok(End::Shutdown);
                }
            };
            if read == 0 {
                return Ok(End::ClientClosed);
            }
        }
        if skipping {
            // After a refused statement: up to its Sync (or the Query
            // itself), as PostgreSQL skips after an error.
            while let Some((tag, len)) = whole_message(&input)? {
                input.drain(..len);
                if tag == TERMINATE {
                    return Ok(End::ClientClosed);
                }
                if FRONTEND_AWAITS_READY.contains(&tag) {
                    skipping = false;
                    client_write
                        .write_all(&extended::ready_for_query(IDLE))
                        .await?;
                    client_write.flush().await?;
                    break;
                }
            }
            continue;
        }
        if let Some(failed) = aborted.as_mut() {
            let mut at = 0;
            while let Some((_, len)) = whole_message(&input[at..])? {
                let message = &input[at..at + len];
                at += len;
                match failed.message(message, &mut session.statements, &mut out) {
                    Next::Stay => {}
                    Next::Done => {
                        aborted = None;
                        break;
                    }
                    Next::Leave => return Ok(End::ClientClosed),
                }
            }
            input.drain(..at);
            client_write.write_all(&out).await?;
            client_write.flush().await?;
            continue;
        }
        if input.first() == Some(&TERMINATE) {
            return Ok(End::ClientClosed);
        }
        let transaction = session.transaction(&mut client_read, &mut client_write, &mut input);
        match Box::pin(transaction).await? {
            After::Idle => {}
            After::Refused => skipping = true,
            After::Aborted(reason) => aborted = Some(Aborted::new(reason)),
            After::End(end) => return Ok(end),
        }
        if input.is_empty() {
            input = Vec::new();
        }
    }
}

/// The length of the first whole message in `input`, if there is one.
fn whole_message(input: &[u8]) -> Result<Option<(u8, usize)>, ConnError> {
    Ok(backend_message_len(input)?.filter(|(_, len)| input.len() >= *len))
}

fn has_whole_message(input: &[u8]) -> Result<bool, ConnError> {
    Ok(whole_message(input)?.is_some())
}

/// Makes room for the rest of the first message in `input` (up to
/// [`CLIENT_READ`]), so that a statement longer than the 64 bytes an
/// empty buffer starts with comes in one more read, not in reads that
/// each grow the buffer by a little. A header's worth more: a read that
/// fills the buffer exactly leaves the socket marked readable, and the
/// next read finds nothing.
fn reserve_for_message(input: &mut Vec<u8>) -> Result<(), ConnError> {
    if let Some((_, len)) = backend_message_len(input)? {
        let rest = len.saturating_sub(input.len()).min(CLIENT_READ);
        input.reserve(rest + TAGGED_HEADER_LEN);
    }
    Ok(())
}

/// Why a client could not get a server connection.
enum Refusal {
    /// Told to the client as a FATAL of the proxy's.
    Proxy(ConnError),
    /// The server's own ErrorResponse (its login or the client's
    /// parameters failed), forwarded.
    Server(Vec<u8>),
}

impl From<ConnError> for Refusal {
    fn from(err: ConnError) -> Self {
        Refusal::Proxy(err.on_server())
    }
}

impl Refusal {
    /// The ErrorResponse a client that is already logged in gets instead
    /// of losing its connection; the refusal itself when its connection
    /// ends (the proxy stops, or the client left).
    fn mid_session(self) -> Result<Vec<u8>, Refusal> {
        let (code, message) = match &self {
            Refusal::Proxy(ConnError::ShuttingDown | ConnError::ClientLeft) => return Err(self),
            Refusal::Proxy(err) => (err.sqlstate().unwrap_or("08006"), err.client_message()),
            Refusal::Server(error) => (
                error_code(error).unwrap_or("08006"),
                format!(
                    "pgmirror proxy: could not get a server connection ready: {}",
                    error_message(error).unwrap_or("no message")
                ),
            ),
        };
        Ok(error_response(Severity::Error, code, &message))
    }

    async fn tell<W: AsyncWrite + Unpin>(self, client: &mut W) -> Result<End, ConnError> {
        match self {
            Refusal::Proxy(err) => refuse(client, err).await,
            Refusal::Server(error) => {
                let _ = client.write_all(&error).await;
                let _ = client.shutdown().await;
                Ok(End::ServerClosed)
            }
        }
    }
}

/// Whether a pooled connection is still open: a server that went away
/// (its PostgreSQL killed, or it ended the backend) has closed it or sent
/// a FATAL, which a read that does not wait finds.
fn alive(server: &mut ServerStream) -> bool {
    let mut byte = [0u8; 1];
    server.read(&mut byte).now_or_never().is_none()
}

impl Session<'_> {
    /// The login's end: the client's ParameterStatus are what a server
    /// connection reports with its parameters in force, kept by the pool
    /// from an earlier login with the same parameters or else seen now on
    /// a connection given them (a server refusing them refuses the login).
    /// Some when the client's connection ends instead.
    async fn greet<R, W>(
        &mut self,
        client_read: &mut R,
        client_write: &mut W,
        input: &mut Vec<u8>,
    ) -> Result<Option<End>, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let in_force = self.settings.in_force().clone();
        let from_pool = self.pool.kept_greeting(&in_force, &self.routes.borrow());
        let kept = match from_pool {
            Some(kept) => {
                // As if it had attached: a failover from here on counts
                // as its reattachment.
                self.last = Some((kept.principal.server_name.clone(), kept.epoch));
                kept
            }
            None => {
                let attached = match self.attach(client_read, input).await {
                    Ok(attached) => attached,
                    Err(refusal) => return refusal.tell(client_write).await.map(Some),
                };
                let reported = &attached.state.reported;
                let statuses_len = reported
                    .iter()
                    .map(|(name, value)| extended::parameter_status_len(name, value))
                    .sum();
                let mut statuses = Vec::with_capacity(statuses_len);
                for (name, value) in reported {
                    extended::put_parameter_status(&mut statuses, name, value);
                }
                let seen = Arc::new(KeptGreeting {
                    principal: attached.principal.clone(),
                    epoch: attached.epoch,
                    statuses,
                });
                self.pool.keep_greeting(&in_force, seen.clone());
                self.release(attached, Touched::default()).await;
                seen
            }
        };
        let registration = self.registration;
        let key_data = backend_key_data(registration.pid, &registration.secret);
        let ready = extended::ready_for_query(IDLE);
        let mut greeting = extended::authentication_ok();
        // Sized once: grown message by message, the greeting was a login's
        // largest run of reallocations.
        greeting.reserve(kept.statuses.len() + key_data.len() + ready.len());
        greeting.extend_from_slice(&kept.statuses);
        greeting.extend_from_slice(&key_data);
        greeting.extend_from_slice(&ready);
        client_write.write_all(&greeting).await?;
        client_write.flush().await?;
        Ok(None)
    }

    /// One transaction: a connection of the pool, the relay, and the
    /// connection back to the pool.
    async fn transaction<R, W>(
        &mut self,
        client_read: &mut R,
        client_write: &mut W,
        input: &mut Vec<u8>,
    ) -> Result<After, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let attached = match self.attach(client_read, input).await {
            Ok(attached) => attached,
            Err(refusal) => match refusal.mid_session() {
                // No server connection (none in time, or it failed
                // before anything of the client's was sent): the
                // statement did not run and the client keeps its
                // session (parameters, statements), as after any error
                // outside a transaction.
                Ok(error) => {
                    client_write.write_all(&error).await?;
                    return Ok(After::Refused);
                }
                Err(refusal) => return refusal.tell(client_write).await.map(After::End),
            },
        };
        Ok(
            match self.run(attached, client_read, client_write, input).await? {
                Turn::Done(attached, touched) => {
                    self.release(*attached, touched).await;
                    After::Idle
                }
                Turn::Aborted(reason) => After::Aborted(reason),
                Turn::Settled { skipping: true } => After::Refused,
                Turn::Settled { skipping: false } => After::Idle,
                Turn::End(end) => After::End(end),
            },
        )
    }

    /// Takes a connection of the pool (waiting for a slot, and for a
    /// principal while none serves, up to the hold timeout) and gives it
    /// this client's parameters.
    async fn attach<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut R,
        early: &mut Vec<u8>,
    ) -> Result<Attached, Refusal> {
        let ctx = self.ctx;
        let hold_deadline = Instant::now() + ctx.hold_timeout;
        let (mut attached, pooled) = loop {
            let checkout = self
                .pool
                .checkout(&self.startup, &self.routes, hold_deadline);
            let mut lease = checkout.await.map_err(ConnError::from)?;
            let reused = lease
                .reused
                .take()
                .and_then(|mut idle| alive(&mut idle.server).then_some(idle));
            let pooled = reused.is_some();
            let attached = match reused {
                Some(mut idle) => Attached {
                    state: std::mem::take(&mut idle.state),
                    server: idle.server,
                    principal: idle.principal,
                    epoch: idle.epoch,
                    born: idle.born,
                    lease,
                    cancels: 0,
                },
                None => self.connect(lease, client, early).await?,
            };
            // A failover while a new connection logged in: the client's
            // parameters and messages go to the new principal instead
            // (the relay's own check keeps every byte off this one, I4).
            let superseded = self
                .routes
                .borrow()
                .supersedes(attached.epoch, &attached.principal);
            if !superseded {
                break (attached, pooled);
            }
        };
        match self.apply_settings(&mut attached).await {
            Ok(()) => {}
            // A pooled connection whose server went away unseen (a
            // failover's former principal shutting down) before anything
            // of the client's was sent on it: a new connection serves.
            Err(Refusal::Proxy(_)) if pooled => {
                attached = self.connect(attached.lease, client, early).await?;
                self.apply_settings(&mut attached).await?;
            }
            Err(refusal) => return Err(refusal),
        }
        self.registration
            .set_server(&attached.principal.address, attached.state.key);
        attached.cancels = self.registration.cancels_forwarded();
        let here = (&attached.principal.server_name, attached.epoch);
        let last = self.last.as_ref().map(|(name, epoch)| (name, *epoch));
        if last != Some(here) {
            if last.is_some() {
                counter!(metrics::PROXY_POOL_REATTACHMENTS, metrics::SESSION => self.key.session.clone())
                    .increment(1);
            }
            self.last = Some((here.0.clone(), here.1));
        }
        Ok(attached)
    }

    /// Takes its pool's shared map of the client's parameters (so that a
    /// connection that had them is seen to at a glance).
    fn share_settings(&mut self) {
        let shared = self.pool.shared_settings(self.settings.in_force());
        self.settings.adopt(shared);
    }

    /// Gives a server connection the client's parameters, unless it has
    /// them already.
    async fn apply_settings(&self, attached: &mut Attached) -> Result<(), Refusal> {
        if let Some(sql) = settings::prelude(&self.settings, &attached.state.settings) {
            let reply = own_query(&mut attached.server, &sql).await?;
            attached.state.reported.extend(reply.statuses);
            if let Some(error) = reply.error {
                return Err(Refusal::Server(error));
            }
        }
        // The same values now, and the same map, for a glance next time.
        let in_force = self.settings.in_force();
        if !Arc::ptr_eq(in_force, &attached.state.settings) {
            attached.state.settings = in_force.clone();
        }
        Ok(())
    }

    /// Opens and logs in a new server connection for `lease`.
    async fn connect<R: AsyncRead + Unpin>(
        &mut self,
        lease: Lease,
        client: &mut R,
        early: &mut Vec<u8>,
    ) -> Result<Attached, Refusal> {
        let ctx = self.ctx;
        let session = &self.key.session;
        let connected =
            hold_and_connect(ctx, session, &mut self.routes, &self.startup, client, early);
        let mut connected = connected.await?;
        let deadline = Instant::now() + ctx.startup_timeout;
        let server = &mut connected.server;
        let pending = &mut connected.pending;
        let logged_in = self.login.log_in(server, pending, &self.key.user, deadline);
        logged_in.await.map_err(ConnError::from)?;
        let mut state = ServerState::default();
        // AuthenticationOk to ReadyForQuery: what it reports and its key.
        loop {
            while let Some((tag, len)) = whole_message(pending)? {
                let message = &pending[..len];
                match tag {
                    ERROR_RESPONSE => return Err(Refusal::Server(message.to_vec())),
                    PARAMETER_STATUS => {
                        if let Some((name, value)) = decode_parameter_status(message) {
                            state.reported.insert(name.to_string(), value.to_string());
                        }
                    }
                    BACKEND_KEY_DATA => state.key = decode_backend_key_data(message),
                    READY_FOR_QUERY => {
                        return Ok(Attached {
                            lease,
                            server: connected.server,
                            principal: connected.principal,
                            epoch: connected.epoch,
                            born: Instant::now(),
                            state,
                            cancels: 0,
                        })
                    }
                    _ => {}
                }
                pending.drain(..len);
            }
            if pending.len() > OWN_REPLY_MAX {
                return Err(ConnError::ServerTooChatty.into());
            }
            let read = tokio::time::timeout_at(deadline, server.read_buf(pending))
                .await
                .map_err(|_| ConnError::StartupTimeout(ctx.startup_timeout))?
                .map_err(ConnError::from)?;
            if read == 0 {
                let closed = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during its login",
                );
                return Err(ConnError::ServerIo(closed).into());
            }
        }
    }

    /// Gives a connection whose transaction ended back to the pool, after
    /// learning what the transaction did to the client's parameters. One
    /// for which a cancel was forwarded is closed instead: the cancel could
    /// still arrive and hit the next client's query.
    async fn release(&mut self, mut attached: Attached, touched: Touched) {
        self.registration.clear_server_key();
        if std::mem::take(&mut attached.state.reported_in_transaction) {
            self.pool.forget_greetings();
        }
        if !touched.is_empty() {
            let mut sql = String::new();
            if touched.reset_all {
                // Also undoes the client's startup parameters here; the
                // next transaction re-applies them.
                sql.push_str("RESET ALL;");
            }
            if touched.deallocate_all {
                sql.push_str("DEALLOCATE ALL;");
            }
            let names: Vec<String> = touched.names.keys().cloned().collect();
            if !names.is_empty() {
                sql.push_str(&settings::read_back(&names));
            }
            match own_query(&mut attached.server, &sql).await {
                Ok(reply) if reply.error.is_none() => {
                    let server_settings = Arc::make_mut(&mut attached.state.settings);
                    if touched.reset_all {
                        self.settings.reset_all();
                        server_settings.clear();
                    }
                    if touched.deallocate_all {
                        attached.state.prepared.clear();
                        self.statements.clear();
                    }
                    attached.state.reported.extend(reply.statuses);
                    for (name, value) in names.iter().zip(reply.row) {
                        let set = touched.names.get(name).copied().unwrap_or(true);
                        match value {
                            Some(value) => {
                                server_settings.insert(name.clone(), value.clone());
                                self.settings.record(name, set.then_some(value));
                            }
                            None => {
                                server_settings.remove(name);
                                self.settings.record(name, None);
                            }
                        }
                    }
                    self.share_settings();
                }
                // The connection's state is unknown: it is closed.
                _ => return,
            }
        }
        if self.registration.cancels_forwarded() != attached.cancels {
            return;
        }
        let Attached {
            lease,
            server,
            principal,
            epoch,
            born,
            state,
            ..
        } = attached;
        let mut idle = IdleServer::new(
            server,
            principal,
            epoch,
            self.startup.clone(),
            Vec::new(),
            born,
        );
        idle.state = state;
        lease.give_back(idle, &self.routes.borrow());
    }

    /// Relays one transaction between the client and its server connection
    /// until the server is idle again, the client leaves, or a failover or
    /// a lost server connection ends it.
    async fn run<R, W>(
        &mut self,
        attached: Attached,
        client_read: &mut R,
        client_write: &mut W,
        input: &mut Vec<u8>,
    ) -> Result<Turn, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut attached = attached;
        let (mut server_read, mut server_write) = attached.server.halves();
        let (epoch, principal) = (attached.epoch, &attached.principal);
        let state = &mut attached.state;
        let Buffers {
            to_server,
            raw,
            to_client,
            server_input,
            server_read: mut server_buf,
            replies,
        } = std::mem::take(&mut state.buffers);
        let mut relay = Relay {
            replies,
            fence: CommitFence::new(
                FrameScanner::backend(),
                self.registration.cancels_forwarded(),
            ),
            to_server,
            raw,
            to_client,
            server_input,
            streaming: None,
            status: IDLE,
            ready: false,
            awaiting_ready: false,
            touched: Touched::default(),
            search_path: self.settings.get("search_path").unwrap_or_default(),
            runs_at: None,
            sent: 0,
            server_ending: false,
        };
        // Read into without zeroing it first (most replies are small).
        server_buf.reserve(SERVER_READ);
        let bytes = &self.ctx.bytes;
        relay.take_client(input, state, &mut self.statements)?;
        let end = loop {
            if let Some(end) = relay.pass_through_fence(self.registration)? {
                break Some(end);
            }
            if relay.server_ending {
                break Some(relay.server_lost(&mut self.statements));
            }
            if relay.released() {
                break None;
            }
            if self.routes.borrow().supersedes(epoch, principal) {
                // I4: not one more byte to a superseded principal.
                break Some(relay.failover(principal, &mut self.statements));
            }
            reserve_for_message(input)?;
            tokio::select! {
                // Queued bytes go out first, then bytes in; a
                // wake-up for bytes polls nothing else. Writing first,
                // the relay does not poll both reads (and park their
                // wakers) between taking a message and sending it on.
                biased;
                written = server_write.write(&relay.to_server), if !relay.to_server.is_empty() => {
                    let Ok(n) = written else {
                        break Some(relay.server_lost(&mut self.statements));
                    };
                    relay.to_server.drain(..n);
                    relay.sent += n as u64;
                    if relay.to_server.is_empty() && server_write.flush().await.is_err() {
                        break Some(relay.server_lost(&mut self.statements));
                    }
                }
                written = client_write.write(&relay.to_client), if !relay.to_client.is_empty() => {
                    let n = written?;
                    relay.to_client.drain(..n);
                    if relay.to_client.is_empty() {
                        client_write.flush().await?;
                    }
                }
                read = client_read.read_buf(input), if relay.to_server.len() < QUEUE_MAX => {
                    let n = read?;
                    if n == 0 {
                        break Some(Ending::ClientLeft);
                    }
                    bytes.to_server.increment(n as u64);
                    if relay.take_client(input, state, &mut self.statements)? {
                        break Some(Ending::ClientLeft);
                    }
                }
                read = server_read.read_buf(&mut server_buf), if relay.to_client.len() < QUEUE_MAX => {
                    // A reset (its PostgreSQL killed) is the server lost,
                    // like a close: the client's connection is not.
                    let n = read.unwrap_or(0);
                    if n == 0 {
                        break Some(relay.server_lost(&mut self.statements));
                    }
                    bytes.to_client.increment(n as u64);
                    relay.take_server(&server_buf, state, &mut self.statements)?;
                    server_buf.clear();
                }
                // I4: checked at the top of the loop.
                () = &mut self.route_changes => {}
                _ = &mut self.shutdown => break Some(Ending::Fatal {
                    end: End::Shutdown,
                    code: "57P01",
                    message: SHUTTING_DOWN.into(),
                }),
            }
        };
        // What the client is owed goes out first, whatever comes next.
        client_write.write_all(&relay.to_client).await?;
        client_write.flush().await?;
        let Some(ending) = end else {
            let Relay {
                to_server,
                raw,
                mut to_client,
                server_input,
                touched,
                replies,
                ..
            } = relay;
            to_client.clear();
            server_buf.clear();
            attached.state.buffers = Buffers {
                to_server,
                raw,
                to_client,
                server_input,
                server_read: server_buf,
                replies,
            }
            .kept();
            return Ok(Turn::Done(Box::new(attached), touched));
        };
        // The server connection is closed (dropped) in every case below:
        // its transaction, if any, is rolled back with it.
        drop(attached);
        Ok(match ending {
            Ending::ClientLeft => Turn::End(End::ClientClosed),
            Ending::Abort(reason) => Turn::Aborted(reason),
            Ending::Settled { skipping } => Turn::Settled { skipping },
            Ending::Fatal { end, code, message } => {
                if relay.fence.abandon() {
                    let _ = client_write
                        .write_all(&error_response(Severity::Fatal, code, &message))
                        .await;
                }
                let _ = client_write.shutdown().await;
                Turn::End(end)
            }
            Ending::Fenced { cause, at_boundary } => {
                fenced(cause, at_boundary, client_write).await;
                Turn::End(End::CommitFenced(cause))
            }
        })
    }
}

/// Why a transaction's relay stopped before the server was idle.
enum Ending {
    ClientLeft,
    /// Nothing was in flight: the transaction is gone, the client stays.
    Abort(String),
    /// Only messages that run nothing were in flight: they are answered,
    /// the client stays (see [`Turn::Settled`]).
    Settled {
        skipping: bool,
    },
    /// The client's connection ends with a FATAL: a statement was in
    /// flight, or the proxy is stopping.
    Fatal {
        end: End,
        code: &'static str,
        message: String,
    },
    /// The commit fence replaced the rest of a response (I2).
    Fenced {
        cause: FenceCause,
        at_boundary: bool,
    },
}

/// One transaction's relay state.
struct Relay<'s> {
    replies: Replies,
    fence: CommitFence,
    to_server: Vec<u8>,
    /// Server messages (and the proxy's answers) not yet through the fence.
    raw: Vec<u8>,
    /// What the fence let through, to write to the client.
    to_client: Vec<u8>,
    /// Server bytes short of a whole message.
    server_input: Vec<u8>,
    /// A large message being streamed: its tag, bytes left, forwarded?
    streaming: Option<(u8, usize, bool)>,
    /// The last ReadyForQuery's status.
    status: u8,
    /// The last thing that happened was a ReadyForQuery saying idle with
    /// nothing outstanding.
    ready: bool,
    /// The client's last message awaits a ReadyForQuery (the fence's rule 3).
    awaiting_ready: bool,
    touched: Touched,
    /// The client's search_path, part of its statements' server names.
    search_path: &'s str,
    /// Where, in the bytes sent to the server since the relay began, the
    /// first client message that runs something (a Query, an Execute, a
    /// function call, COPY data) starts: before it, only messages that
    /// prepare, describe or close.
    runs_at: Option<u64>,
    /// Bytes written to the server since the relay began.
    sent: u64,
    /// The server said FATAL (it is going away) while nothing ran: the
    /// relay stops without sending it another byte.
    server_ending: bool,
}

impl Relay<'_> {
    /// Whether the transaction is over: the server said idle, nothing is
    /// outstanding, nothing waits to go either way.
    fn released(&self) -> bool {
        self.ready
            && self.to_server.is_empty()
            && self.raw.is_empty()
            && self.server_input.is_empty()
            && self.streaming.is_none()
    }

    /// A failover superseded the server's principal.
    fn failover(&mut self, principal: &Principal, statements: &mut ClientStatements) -> Ending {
        let address = &principal.address;
        let why = format!("a failover happened and {address} is no longer the principal");
        self.server_gone(End::Failover, &why, statements)
    }

    /// The server closed the connection.
    fn server_lost(&mut self, statements: &mut ClientStatements) -> Ending {
        if let Some(cause) = self.fence.server_closed() {
            // Rule 4: the client may get a message after what it has.
            return Ending::Fenced {
                cause,
                at_boundary: true,
            };
        }
        self.server_gone(
            End::ServerClosed,
            "the server connection was lost",
            statements,
        )
    }

    /// The transaction's server is gone (I4, or a lost connection): a
    /// statement in flight has an unknown outcome and costs the client its
    /// connection; a transaction between statements certainly did not
    /// commit, and the client keeps its connection.
    fn server_gone(&mut self, end: End, why: &str, statements: &mut ClientStatements) -> Ending {
        if !self.ran() && self.streaming.is_none() {
            // A driver preparing a statement, or closing one it dropped:
            // the client is answered as PostgreSQL answers an error, and
            // stays.
            let message =
                format!("pgmirror proxy: {why} before it answered; nothing ran. Run it again");
            let error = error_response(Severity::Error, SQLSTATE_SERIALIZATION_FAILURE, &message);
            let (undone, skipping) = self.replies.settle_lost(&error, &mut self.to_client);
            // Latest first: a Parse that reused a name a skipped Close
            // freed goes before the Close's statement comes back.
            for undone in undone.into_iter().rev() {
                undo(undone, None, statements);
            }
            return Ending::Settled { skipping };
        }
        if self.in_flight() {
            Ending::Fatal {
                end,
                code: SQLSTATE_COMPLETION_UNKNOWN,
                message: format!(
                    "pgmirror proxy: {why} while a statement was in flight: its outcome is unknown \
                     (a commit may have happened without reaching the mirror). Reconnect and check \
                     whether the transaction's effects are present before retrying it"
                ),
            }
        } else {
            counter!(metrics::PROXY_TRANSACTIONS_ABORTED).increment(1);
            Ending::Abort(format!(
                "pgmirror proxy: the transaction was rolled back because {why} while it was open; \
                 nothing it did was committed. Roll back and run it again"
            ))
        }
    }

    /// A message that runs something reached the server (its first byte,
    /// at least: what the kernel took may have arrived).
    fn ran(&self) -> bool {
        self.runs_at.is_some_and(|at| self.sent > at)
    }

    /// Something sent has not been answered.
    fn in_flight(&self) -> bool {
        !self.replies.is_settled() || !self.to_server.is_empty()
    }

    /// Runs what is ready for the client through the commit fence (I2).
    fn pass_through_fence(
        &mut self,
        registration: &Registration,
    ) -> Result<Option<Ending>, ConnError> {
        if self.raw.is_empty() {
            return Ok(None);
        }
        let awaiting = self.awaiting_ready;
        let step = self
            .fence
            .feed(&self.raw, awaiting, registration.cancels_forwarded())?;
        match step {
            Step::PassChunk => self.to_client.extend_from_slice(&self.raw),
            Step::Output => self.to_client.extend_from_slice(self.fence.output()),
            Step::Fence { cause, at_boundary } => {
                self.to_client.extend_from_slice(self.fence.output());
                self.raw.clear();
                return Ok(Some(Ending::Fenced { cause, at_boundary }));
            }
        }
        self.raw.clear();
        Ok(None)
    }

    /// Translates the client's whole messages in `input` for the server;
    /// true when the client sent Terminate.
    fn take_client(
        &mut self,
        input: &mut Vec<u8>,
        state: &mut ServerState,
        statements: &mut ClientStatements,
    ) -> Result<bool, ConnError> {
        let mut at = 0;
        let mut leaving = false;
        while let Some((tag, len)) = whole_message(&input[at..])? {
            let message = &input[at..at + len];
            at += len;
            if tag == TERMINATE {
                leaving = true;
                break;
            }
            self.ready = false;
            if self.runs_at.is_none() && !RUN_NOTHING.contains(&tag) {
                self.runs_at = Some(self.sent + self.to_server.len() as u64);
            }
            self.awaiting_ready = FRONTEND_AWAITS_READY.contains(&tag);
            self.translate(tag, message, state, statements)?;
        }
        input.drain(..at);
        self.replies.answers_due(&mut self.raw);
        Ok(leaving)
    }

    /// Prepares `statement` on this connection first if it is not there.
    fn ensure(&mut self, statement: &Statement, state: &mut ServerState) {
        if state.prepared.insert(statement.server_name.clone()) {
            self.to_server.extend_from_slice(&extended::encode_parse(
                &statement.server_name,
                &statement.query,
                &statement.types,
            ));
            self.replies.proxy(Kind::Parse {
                prepared: Some(statement.server_name.clone()),
                client: None,
            });
        }
    }

    fn translate(
        &mut self,
        tag: u8,
        message: &[u8],
        state: &mut ServerState,
        statements: &mut ClientStatements,
    ) -> Result<(), ConnError> {
        let malformed = || ConnError::Unexpected("malformed message from the client");
        match tag {
            QUERY => {
                let text = decode_query(message).ok_or_else(malformed)?;
                let found = sql::inspect(text);
                let dropped = found
                    .deallocated
                    .as_ref()
                    .and_then(|name| Some(name.clone()).zip(statements.get(name).cloned()));
                match (found.refused, dropped) {
                    (Some(what), _) => self
                        .to_server
                        .extend_from_slice(&extended::encode_query(&sql::refusal_sql(what))),
                    // A driver evicting a statement: the server's copy goes
                    // (prepared first if this connection lacks it, so that
                    // the client gets DEALLOCATE as PostgreSQL answers it);
                    // clients sharing it prepare it again when they use it.
                    (None, Some((name, statement))) => {
                        self.ensure(&statement, state);
                        state.prepared.remove(&statement.server_name);
                        statements.remove(&name);
                        self.to_server
                            .extend_from_slice(&extended::encode_query(&format!(
                                "DEALLOCATE {}",
                                statement.server_name
                            )));
                    }
                    (None, None) => self.to_server.extend_from_slice(message),
                }
                self.touched.note(&found);
                self.replies.client(Kind::Simple);
            }
            PARSE => {
                let parse = decode_parse(message).ok_or_else(malformed)?;
                let found = sql::inspect(parse.query);
                self.touched.note(&found);
                let refused = found.refused.map(sql::refusal_sql);
                let query = refused.as_deref().unwrap_or(parse.query);
                if parse.statement.is_empty() {
                    self.to_server.extend_from_slice(&extended::encode_parse(
                        "",
                        query,
                        parse.types,
                    ));
                    let statement = Statement::unnamed(query, parse.types);
                    self.replies.client(Kind::Parse {
                        prepared: None,
                        client: Some((String::new(), statement.serial)),
                    });
                    statements.insert(String::new(), statement);
                } else if let Some(existing) = statements.get(parse.statement).cloned() {
                    // PostgreSQL refuses a name in use (42P05): so does the
                    // server, for the name the statement has there.
                    self.ensure(&existing, state);
                    self.to_server.extend_from_slice(&extended::encode_parse(
                        &existing.server_name,
                        query,
                        parse.types,
                    ));
                    self.replies.client(Kind::Parse {
                        prepared: None,
                        client: None,
                    });
                } else {
                    let statement = Statement::new(query, parse.types, self.search_path);
                    let fresh = state.prepared.insert(statement.server_name.clone());
                    // In a failed transaction the server refuses any Parse
                    // (25P02): it must hear this one too.
                    if fresh || self.status == TRANSACTION_FAILED {
                        self.to_server.extend_from_slice(&extended::encode_parse(
                            &statement.server_name,
                            query,
                            parse.types,
                        ));
                        self.replies.client(Kind::Parse {
                            prepared: fresh.then(|| statement.server_name.clone()),
                            client: Some((parse.statement.to_string(), statement.serial)),
                        });
                    } else {
                        let undo = Undo::Parse {
                            prepared: None,
                            client: Some((parse.statement.to_string(), statement.serial)),
                        };
                        self.replies
                            .answer(extended::empty(PARSE_COMPLETE), Some(undo));
                    }
                    statements.insert(parse.statement.to_string(), statement);
                }
            }
            BIND => {
                let (portal, name, rest) = decode_bind(message).ok_or_else(malformed)?;
                match statements.get(name).filter(|_| !name.is_empty()).cloned() {
                    Some(statement) => {
                        self.ensure(&statement, state);
                        self.to_server.extend_from_slice(&extended::encode_bind(
                            portal,
                            &statement.server_name,
                            rest,
                        ));
                    }
                    // Unnamed, or unknown (the server says it does not exist).
                    None => self.to_server.extend_from_slice(message),
                }
                self.replies.client(Kind::Bind);
            }
            DESCRIBE => {
                let (target, name) = decode_target(message).ok_or_else(malformed)?;
                let known = statements.get(name).filter(|_| !name.is_empty()).cloned();
                match known.filter(|_| target == TARGET_STATEMENT) {
                    Some(statement) => {
                        self.ensure(&statement, state);
                        self.to_server.extend_from_slice(&extended::encode_target(
                            DESCRIBE,
                            TARGET_STATEMENT,
                            &statement.server_name,
                        ));
                    }
                    None => self.to_server.extend_from_slice(message),
                }
                self.replies.client(if target == TARGET_STATEMENT {
                    Kind::DescribeStatement
                } else {
                    Kind::DescribePortal
                });
            }
            CLOSE => {
                let (target, name) = decode_target(message).ok_or_else(malformed)?;
                if target == TARGET_STATEMENT && !name.is_empty() {
                    // Other clients may share it on the server: it stays
                    // there, and only this client forgets it.
                    let undo = statements.remove(name).map(|statement| Undo::Close {
                        client: name.to_string(),
                        statement,
                    });
                    self.replies.answer(extended::empty(CLOSE_COMPLETE), undo);
                } else {
                    self.to_server.extend_from_slice(message);
                    self.replies.client(Kind::Close);
                }
            }
            EXECUTE => {
                self.to_server.extend_from_slice(message);
                self.replies.client(Kind::Execute);
            }
            SYNC => {
                self.to_server.extend_from_slice(message);
                self.replies.client(Kind::Sync);
            }
            FUNCTION_CALL => {
                self.to_server.extend_from_slice(message);
                self.replies.client(Kind::Simple);
            }
            COPY_DONE | COPY_FAIL => {
                self.to_server.extend_from_slice(message);
                self.replies.copy_end();
            }
            // Flush, COPY data, and anything else, which the server judges.
            _ => self.to_server.extend_from_slice(message),
        }
        Ok(())
    }

    /// Takes server bytes: whole messages are looked at, large ones
    /// streamed; what the client gets goes to `raw`.
    fn take_server(
        &mut self,
        mut chunk: &[u8],
        state: &mut ServerState,
        statements: &mut ClientStatements,
    ) -> Result<(), ConnError> {
        if let Some((tag, left, forward)) = self.streaming {
            let n = left.min(chunk.len());
            if forward {
                self.raw.extend_from_slice(&chunk[..n]);
            }
            chunk = &chunk[n..];
            if n < left {
                self.streaming = Some((tag, left - n, forward));
                return Ok(());
            }
            self.streaming = None;
            self.ended(tag, state, statements);
        }
        // The common case reads from the chunk itself; only a message
        // split across reads is copied.
        let buffered;
        let input: &[u8] = if self.server_input.is_empty() {
            chunk
        } else {
            self.server_input.extend_from_slice(chunk);
            buffered = std::mem::take(&mut self.server_input);
            &buffered
        };
        let mut at = 0;
        while let Some((tag, len)) = backend_message_len(&input[at..])? {
            let available = input.len() - at;
            if available >= len {
                self.whole(&input[at..at + len], state, statements);
                at += len;
                continue;
            }
            if len > WHOLE_MESSAGE_MAX {
                let forward = self.replies.disposition(tag) == Disposition::Forward;
                if forward {
                    self.raw.extend_from_slice(&input[at..]);
                }
                self.streaming = Some((tag, len - available, forward));
                at = input.len();
            }
            break;
        }
        self.server_input.extend_from_slice(&input[at..]);
        Ok(())
    }

    /// One whole server message.
    fn whole(
        &mut self,
        message: &[u8],
        state: &mut ServerState,
        statements: &mut ClientStatements,
    ) {
        let tag = message[0];
        match tag {
            READY_FOR_QUERY => self.status = message.get(5).copied().unwrap_or(IDLE),
            PARAMETER_STATUS => {
                if let Some((name, value)) = decode_parameter_status(message) {
                    state.reported.insert(name.to_string(), value.to_string());
                    state.reported_in_transaction = true;
                }
            }
            _ => {}
        }
        // An error nobody asked for is the server ending the connection (a
        // demoted principal's FATAL 57P01): the client's connection is not
        // the server's, and hears of it only as its transaction's end. So
        // is a FATAL while nothing ran: the relay stops at once, and what
        // is owed is settled as for a lost connection (`server_gone`).
        if tag == ERROR_RESPONSE && self.replies.is_settled() {
            return;
        }
        if tag == ERROR_RESPONSE && !self.ran() && ends_connection(message) {
            self.server_ending = true;
            return;
        }
        if self.replies.disposition(tag) == Disposition::Forward {
            self.raw.extend_from_slice(message);
        }
        self.ended(tag, state, statements);
        if tag == READY_FOR_QUERY {
            self.ready = self.status == IDLE && self.replies.is_settled();
        }
    }

    /// A server message ended.
    fn ended(&mut self, tag: u8, state: &mut ServerState, statements: &mut ClientStatements) {
        for undone in self.replies.ended(tag).into_iter().rev() {
            undo(undone, Some(state), statements);
        }
        self.replies.answers_due(&mut self.raw);
    }
}

/// Undoes the proxy's record of a message PostgreSQL failed, skipped or
/// never got, on the server connection (`state`, unless it is gone) and
/// for the client.
fn undo(undo: Undo, state: Option<&mut ServerState>, statements: &mut ClientStatements) {
    match undo {
        Undo::Parse { prepared, client } => {
            if let (Some(state), Some(name)) = (state, prepared) {
                state.prepared.remove(&name);
            }
            // Not a statement a later Parse of the same name made.
            if let Some((name, serial)) = client {
                if statements
                    .get(&name)
                    .is_some_and(|made| made.serial == serial)
                {
                    statements.remove(&name);
                }
            }
        }
        // Not over a statement a later Parse of the same name made.
        Undo::Close { client, statement } => {
            statements.entry(client).or_insert(statement);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn a_long_statement_gets_room_for_its_rest_and_no_more_than_client_read() {
        let query = |len: u32| {
            let mut input = vec![b'Q'];
            input.extend_from_slice(&(len - 1).to_be_bytes());
            input.resize(64, b'x');
            input
        };
        // Half a kilobyte in hand after the first 64 bytes: its rest, and
        // a header's worth more so that the read does not fill it exactly.
        let mut input = query(512);
        reserve_for_message(&mut input).unwrap();
        assert!(input.capacity() >= 512 + TAGGED_HEADER_LEN);
        assert!(input.capacity() < 1024, "{}", input.capacity());
        // A claimed gigabyte gets CLIENT_READ at a time.
        let mut input = query(1 << 30);
        reserve_for_message(&mut input).unwrap();
        assert!(input.capacity() <= 64 + CLIENT_READ + TAGGED_HEADER_LEN);
        // No header yet: nothing to go by.
        let mut input = vec![b'Q', 0];
        reserve_for_message(&mut input).unwrap();
        assert_eq!(input.capacity(), 2);
    }

    /// The tags of the whole messages in `out`.
    pub(in crate::proxy::transaction) fn tags_of(mut out: &[u8]) -> Vec<u8> {
        let mut tags = Vec::new();
        while let Ok(Some((tag, len))) = backend_message_len(out) {
            tags.push(tag);
            out = &out[len.min(out.len())..];
        }
        tags
    }

    fn relay() -> Relay<'static> {
        Relay {
            replies: Replies::default(),
            fence: CommitFence::new(FrameScanner::backend(), 0),
            to_server: Vec::new(),
            raw: Vec::new(),
            to_client: Vec::new(),
            server_input: Vec::new(),
            streaming: None,
            status: IDLE,
            ready: false,
            awaiting_ready: false,
            touched: Touched::default(),
            search_path: "",
            runs_at: None,
            sent: 0,
            server_ending: false,
        }
    }

    /// A dropped statement's Close and Sync, then a COMMIT, taken from
    /// the client; the server connection is lost once `written` bytes
    /// past the Close and Sync reached it.
    fn lost_with_commit_written(written: u64) -> Ending {
        let mut relay = relay();
        let mut statements = ClientStatements::new();
        let commit = extended::encode_query("COMMIT");
        let close = extended::encode_target(CLOSE, TARGET_STATEMENT, "s1");
        let mut input = [close, extended::empty(SYNC), commit.clone()].concat();
        let mut state = ServerState::default();
        relay
            .take_client(&mut input, &mut state, &mut statements)
            .unwrap();
        let before_commit = (relay.to_server.len() - commit.len()) as u64;
        relay.sent = before_commit + written;
        relay.server_lost(&mut statements)
    }

    #[test]
    fn a_failed_parse_undoes_only_its_own_statement() {
        // Parse s1 (it fails) / Sync / Close s1 / Parse s1 / Sync, in one
        // pipeline: PostgreSQL ends with the second s1 prepared.
        let mut relay = relay();
        let mut statements = ClientStatements::new();
        let mut state = ServerState::default();
        let mut input = [
            extended::encode_parse("s1", "SELEC 1", &[0, 0]),
            extended::empty(SYNC),
            extended::encode_target(CLOSE, TARGET_STATEMENT, "s1"),
            extended::encode_parse("s1", "SELECT 1", &[0, 0]),
            extended::empty(SYNC),
        ]
        .concat();
        relay
            .take_client(&mut input, &mut state, &mut statements)
            .unwrap();
        let replies = [
            error_response(
                Severity::Error,
                "42601",
                "syntax error at or near \"SELEC\"",
            ),
            extended::ready_for_query(IDLE),
            extended::empty(PARSE_COMPLETE),
            extended::ready_for_query(IDLE),
        ]
        .concat();
        relay
            .take_server(&replies, &mut state, &mut statements)
            .unwrap();
        assert!(relay.replies.is_settled());
        let kept = statements
            .get("s1")
            .map(|statement| statement.query.as_str());
        assert_eq!(
            kept,
            Some("SELECT 1"),
            "the second Parse's statement was lost"
        );
        assert_eq!(tags_of(&relay.raw), b"EZ31Z", "what the client got");
    }

    #[test]
    fn a_statement_counts_as_run_once_a_byte_of_it_reached_the_server() {
        assert!(
            matches!(
                lost_with_commit_written(0),
                Ending::Settled { skipping: false }
            ),
            "a COMMIT never written is answered as not run"
        );
        assert!(
            matches!(
                lost_with_commit_written(1),
                Ending::Fatal {
                    code: SQLSTATE_COMPLETION_UNKNOWN,
                    ..
                }
            ),
            "a COMMIT partly written may have run: its outcome is unknown"
        );
    }
}
