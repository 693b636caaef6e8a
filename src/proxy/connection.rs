//! One client connection, from its first byte to its close: SSLRequest and
//! GSSENCRequest negotiation, CancelRequest forwarding, the StartupMessage,
//! routing to the session's principal (holding the client while none
//! serves), the authentication exchange relayed with the server's
//! BackendKeyData swapped for the proxy's, and then the splice. A session
//! with proxy-side authentication (`auth`) has the client authenticated
//! before the proxy connects and the server's requests answered by the
//! proxy; the server's AuthenticationOk onwards is relayed the same way.
//! A pooled session's client (`pool`) first takes a slot of its pool: with
//! an idle server connection, whose login messages are replayed to it in
//! place of a fresh login; when it leaves cleanly with its server idle,
//! its Terminate is not forwarded and the connection is reset and given
//! back.
//!
//! The splice (`splice`) then copies bytes both ways, with the commit
//! fence (I2) and the failover goodbye (I4) on the server's side.
//! The client's reads up to the end of its login are buffered, and what
//! the buffer read past the login is the first input of its session; only
//! before the answer to an SSLRequest is nothing allowed to come early.
//! The first packets (and TLS handshake) run under the startup timeout;
//! the hold while no principal serves runs under the hold timeout; the
//! authentication exchange then gets a fresh startup timeout. Dropping the
//! future closes both sockets, so it is cancel-safe.

use ::metrics::{counter, gauge, histogram};

use crate::metrics::{self, GaugeGuard};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::PoolMode;
use crate::proxy::auth::Login;
use crate::proxy::auth::{AuthError, ClientId};
use crate::proxy::clients::{ClientEntry, Registration};
use crate::proxy::console_door;
use crate::proxy::fence::FenceCause;
use crate::proxy::pool::{self, IdleServer, PoolFull, PoolKey, Reuse};
use crate::proxy::routing::{Principal, Route};
use crate::proxy::server_tls::{ServerConnectError, ServerStream, ServerTls, ServerTlsError};
use crate::proxy::{splice, transaction, Context};
use crate::roles::Epoch;
use crate::wire::startup::{
    backend_message_len, cancel_request, decode_startup, error_code, error_response,
    serve_protocol, FeStartup, Severity, StartupError,
};

/// The dbname of the admin console.
pub const ADMIN_DATABASE: &str = "pgmirror";
/// Largest amount of server output buffered before ReadyForQuery.
pub(super) const MAX_AUTH_BUFFER: usize = 256 * 1024;
/// How long one connect to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// First pause between connect attempts while a client is held; it
/// doubles up to [`HOLD_RETRY_MAX`], each drawn with ±50% jitter.
const HOLD_RETRY_FIRST: Duration = Duration::from_millis(100);
const HOLD_RETRY_MAX: Duration = Duration::from_secs(2);
/// What a held client may send before it is authenticated (a pipelining
/// client's first messages), kept for its server.
const MAX_EARLY_CLIENT_BYTES: usize = 64 * 1024;
/// The client's reads up to the end of its login go through a buffer of
/// this size: a login message then takes one read instead of two (its
/// header, then its body), and a read that leaves room tells tokio the
/// socket is drained, which spares the read that would find nothing.
const LOGIN_READ_BUFFER: usize = 1024;

/// Why a connection ended, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("startup and authentication did not finish within {0:?}")]
    StartupTimeout(Duration),
    #[error("unexpected {0} during startup")]
    Unexpected(&'static str),
    #[error(
        "database \"{0}\" is not mapped to any mirroring session and there is no default_session"
    )]
    NoSession(String),
    #[error("the admin console is not enabled (no [admin] in the proxy's configuration)")]
    NoAdmin,
    #[error("no principal of session \"{session}\" is serving after waiting {waited:?} (failover in progress or all partners down); try again later")]
    NoPrincipal { session: String, waited: Duration },
    #[error(transparent)]
    ServerTls(#[from] ServerTlsError),
    #[error("server sent a malformed message: {0}")]
    Server(#[from] crate::wire::frame::FrameError),
    /// The server's connection failed while the proxy was getting it
    /// ready for a client (its login, the client's parameters).
    #[error("the server connection failed: {0}")]
    ServerIo(std::io::Error),
    #[error("server sent more than {MAX_AUTH_BUFFER} bytes before ReadyForQuery")]
    ServerTooChatty,
    #[error("sorry, too many clients already: this proxy serves at most {0} (max_clients)")]
    TooManyClients(usize),
    #[error("the client left while it was held")]
    ClientLeft,
    #[error("the client sent more than {MAX_EARLY_CLIENT_BYTES} bytes before authentication")]
    ClientTooChatty,
    #[error("received unencrypted data after SSL request; this could be a client bug or an attempted man-in-the-middle attack")]
    DataAfterSslRequest,
    #[error("the pgmirror proxy is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    AdminRefused(String),
    #[error("admin console message refused: {0}")]
    ConsoleMessage(crate::wire::frame::FrameError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    PoolFull(#[from] PoolFull),
}

impl ConnError {
    /// The SQLSTATE of errors the client should be told about; None for
    /// plain disconnects.
    pub(crate) fn sqlstate(&self) -> Option<&'static str> {
        match self {
            ConnError::Io(_) | ConnError::ClientLeft => None,
            ConnError::TooManyClients(_) | ConnError::PoolFull(_) => Some("53300"),
            ConnError::ClientTooChatty | ConnError::DataAfterSslRequest => Some("08P01"),
            ConnError::ShuttingDown => Some("57P01"),
            ConnError::AdminRefused(_) => Some("28000"),
            ConnError::ConsoleMessage(_) => Some("08P01"),
            ConnError::Startup(_) | ConnError::Unexpected(_) => Some("08P01"),
            ConnError::StartupTimeout(_) => Some("08006"),
            ConnError::NoSession(_) | ConnError::NoAdmin => Some("3D000"),
            ConnError::NoPrincipal { .. } => Some("57P03"),
            ConnError::Server(_)
            | ConnError::ServerIo(_)
            | ConnError::ServerTooChatty
            | ConnError::ServerTls(_) => Some("08006"),
            ConnError::Auth(err) => err.sqlstate(),
        }
    }

    /// The ErrorResponse text; PostgreSQL's own words where the proxy
    /// stands in for the server (a failed password).
    pub(crate) fn client_message(&self) -> String {
        match self {
            ConnError::Auth(err) => err.client_message(),
            err => format!("pgmirror proxy: {err}"),
        }
    }

    /// An error met while getting a server connection ready, where the
    /// client is neither read nor written: a failed read or write is the
    /// server's, and the client is told so.
    pub(crate) fn on_server(self) -> ConnError {
        match self {
            ConnError::Io(err) | ConnError::Auth(AuthError::Io(err)) => ConnError::ServerIo(err),
            err => err,
        }
    }

    /// Expected disconnects are logged at debug level only.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            ConnError::Io(_) | ConnError::ClientLeft | ConnError::Auth(AuthError::Io(_))
        )
    }
}

/// How a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    ServerClosed,
    /// A newer principal superseded this connection's server.
    Failover,
    Shutdown,
    /// A CancelRequest was handled (or dropped).
    Cancel,
    /// An admin console connection ended.
    Admin,
    /// The commit fence replaced a response with 40003 (I2).
    CommitFenced(FenceCause),
}

/// Serves one accepted TCP connection until it ends; one not `admitted`
/// (the proxy is full) is refused with 53300 after its startup packet,
/// unless it is a cancel request or for the admin console.
pub async fn handle(
    ctx: Arc<Context>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: bool,
) -> Result<End, ConnError> {
    // Each phase in an allocation of its own, freed when it ends: the
    // task of a connection, idle for most of its life, then holds only
    // what its last phase waits on, not the opening's largest state.
    let opening = Box::pin(open(&ctx, tcp, peer, admitted)).await?;
    match opening {
        Opening::Ended(end) => Ok(end),
        Opening::In(client, ClientStream::Plain(tcp)) => client.serve(tcp).await,
        Opening::In(client, ClientStream::Tls(tls)) => client.serve(*tls).await,
    }
}

/// Where the opening of a connection left it.
enum Opening<'a> {
    /// Served already: a cancel request, the admin console.
    Ended(End),
    /// A client in, to be served by its session's pool mode.
    In(InClient<'a>, ClientStream),
}

/// A client's stream once its opening is over.
enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl From<TcpStream> for ClientStream {
    fn from(tcp: TcpStream) -> Self {
        ClientStream::Plain(tcp)
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for ClientStream {
    fn from(tls: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        ClientStream::Tls(Box::new(tls))
    }
}

/// A client past its login, with the gauge that counts it.
struct InClient<'a> {
    mode: InMode<'a>,
    counted: GaugeGuard,
}

enum InMode<'a> {
    Session(Box<SessionClient<'a>>),
    Transaction(Box<transaction::Client<'a>>),
}

impl<'a> InClient<'a> {
    /// The rest of the client's life, in its own allocation.
    fn serve<S: splice::Duplex + 'a>(
        self,
        stream: S,
    ) -> futures::future::BoxFuture<'a, Result<End, ConnError>> {
        let InClient { mode, counted } = self;
        match mode {
            InMode::Session(client) => Box::pin(async move {
                let _counted = counted;
                serve_session(client, stream).await
            }),
            InMode::Transaction(client) => Box::pin(async move {
                let _counted = counted;
                transaction::serve(client, stream).await
            }),
        }
    }
}

/// TLS, the first packets and the login: what happens before a client is
/// in (or refused).
async fn open(
    ctx: &Arc<Context>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: bool,
) -> Result<Opening<'_>, ConnError> {
    crate::proxy::socket::tune_accepted(&tcp, &ctx.tcp)?;
    let deadline = Instant::now() + ctx.startup_timeout;
    if let Some(acceptor) = ctx.tls.clone() {
        // Direct SSL (sslnegotiation=direct): a TLS handshake where a
        // packet length would be (whose first byte is always 0).
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first))
            .await
            .map_err(|_| ConnError::StartupTimeout(ctx.startup_timeout))??;
        if peeked == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            // Boxed: inline, the TLS path nearly doubles every
            // connection's future (10.7 KiB against 5.7 KiB in release).
            let tls = serve_tls(ctx, acceptor, tcp, peer, admitted, deadline, true);
            return Box::pin(tls).await;
        }
    }
    let mut negotiated_ssl = false;
    let mut negotiated_gss = false;
    let mut tcp = BufReader::with_capacity(LOGIN_READ_BUFFER, tcp);
    loop {
        let packet = match read_first(&mut tcp, deadline, ctx.startup_timeout).await {
            Ok(packet) => packet,
            Err(err) => return refuse(&mut tcp, err).await,
        };
        match packet {
            FeStartup::SslRequest if !negotiated_ssl => {
                negotiated_ssl = true;
                if let Some(acceptor) = ctx.tls.clone() {
                    // Bytes that came before the answer came in plain
                    // text; passing them on as if they had come through
                    // TLS is the injection PostgreSQL refuses since
                    // CVE-2021-23214.
                    if !tcp.buffer().is_empty() {
                        return refuse(&mut tcp, ConnError::DataAfterSslRequest).await;
                    }
                    let mut tcp = tcp.into_inner();
                    tcp.write_all(b"S").await?;
                    let tls = serve_tls(ctx, acceptor, tcp, peer, admitted, deadline, false);
                    return Box::pin(tls).await;
                }
                tcp.write_all(b"N").await?;
            }
            FeStartup::GssEncRequest if !negotiated_gss => {
                negotiated_gss = true;
                tcp.write_all(b"N").await?;
            }
            packet => return dispatch(ctx, tcp, peer, false, admitted, packet).await,
        }
    }
}

/// The TLS handshake, then the client's first packet inside it. `direct`:
/// no SSLRequest came first, and the client must name PostgreSQL's ALPN
/// protocol, as PostgreSQL 17 requires (so that no other protocol's client
/// is taken for one).
async fn serve_tls(
    ctx: &Arc<Context>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: bool,
    deadline: Instant,
    direct: bool,
) -> Result<Opening<'_>, ConnError> {
    let accept = acceptor.accept(tcp);
    let tls = tokio::time::timeout_at(deadline, accept)
        .await
        .map_err(|_| ConnError::StartupTimeout(ctx.startup_timeout))??;
    let mut tls = BufReader::with_capacity(LOGIN_READ_BUFFER, tls);
    if direct && tls.get_ref().get_ref().1.alpn_protocol() != Some(crate::tls::POSTGRESQL_ALPN) {
        return refuse(
            &mut tls,
            ConnError::Unexpected("direct SSL without ALPN \"postgresql\""),
        )
        .await;
    }
    let packet = match read_first(&mut tls, deadline, ctx.startup_timeout).await {
        Ok(packet) => packet,
        Err(err) => return refuse(&mut tls, err).await,
    };
    dispatch(ctx, tls, peer, true, admitted, packet).await
}

/// Writes a FATAL for user-facing errors, then returns the error.
pub(super) async fn refuse<S: AsyncWrite + Unpin, T>(
    stream: &mut S,
    err: ConnError,
) -> Result<T, ConnError> {
    if let Some(code) = err.sqlstate() {
        let message = error_response(Severity::Fatal, code, &err.client_message());
        let _ = stream.write_all(&message).await;
        let _ = stream.shutdown().await;
    }
    Err(err)
}

/// Reads one untagged first packet, bounded in size and time.
async fn read_first<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Instant,
    limit: Duration,
) -> Result<FeStartup, ConnError> {
    let read = async {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await?;
        // Checks the length (at most MAX_STARTUP_PACKET_LENGTH) first.
        if let Some((packet, _)) = decode_startup(&header)? {
            return Ok(packet);
        }
        let length = u32::from_be_bytes(header) as usize;
        let mut packet = vec![0u8; length];
        packet
            .get_mut(..4)
            .ok_or(ConnError::Unexpected("short packet"))?
            .copy_from_slice(&header);
        stream
            .read_exact(packet.get_mut(4..).unwrap_or_default())
            .await?;
        decode_startup(&packet)?
            .map(|(packet, _)| packet)
            .ok_or(ConnError::Unexpected("incomplete startup packet"))
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| ConnError::StartupTimeout(limit))?
}

/// A client past its first packet: its login, then the client in. The
/// bytes it sent beyond its login messages, which the login buffer read
/// ahead, are the first of its session.
async fn dispatch<S>(
    ctx: &Arc<Context>,
    mut stream: BufReader<S>,
    peer: SocketAddr,
    tls: bool,
    admitted: bool,
    packet: FeStartup,
) -> Result<Opening<'_>, ConnError>
where
    S: splice::Duplex + Into<ClientStream>,
{
    let (minor, params, raw) = match packet {
        FeStartup::CancelRequest { pid, key } => {
            // Boxed, as below: only what every connection waits on is
            // inline in its task.
            Box::pin(forward_cancel(ctx, pid, &key)).await;
            return Ok(Opening::Ended(End::Cancel));
        }
        FeStartup::Startup { minor, params, raw } => (minor, params, raw),
        FeStartup::SslRequest | FeStartup::GssEncRequest => {
            return refuse(
                &mut stream,
                ConnError::Unexpected("second encryption request"),
            )
            .await
        }
    };
    let user = FeStartup::param(&params, "user")
        .unwrap_or_default()
        .to_string();
    let database = FeStartup::param(&params, "database")
        .unwrap_or(user.as_str())
        .to_string();
    if database == ADMIN_DATABASE {
        let Some(socket) = &ctx.admin_socket else {
            return refuse(&mut stream, ConnError::NoAdmin).await;
        };
        if let Some(reason) =
            console_door::refusal(ctx.admin_plaintext, &ctx.console_logins, peer, tls)
        {
            return refuse(&mut stream, ConnError::AdminRefused(reason)).await;
        }
        let logins = &ctx.console_logins;
        let relay = console_door::relay(stream, socket, &raw, peer, logins, ctx.startup_timeout);
        return Box::pin(relay).await.map(Opening::Ended);
    }
    if !admitted {
        return refuse(&mut stream, ConnError::TooManyClients(ctx.max_clients)).await;
    }
    let Some((session, routes)) = ctx.route_for(&database) else {
        return refuse(&mut stream, ConnError::NoSession(database)).await;
    };
    let plan = serve_protocol(minor, &params, &raw);
    if let Some(negotiate) = &plan.negotiate {
        stream.write_all(negotiate).await?;
        stream.flush().await?;
    }
    let registration = ctx.clients.register(
        ClientEntry {
            secret: Vec::new(),
            client_addr: peer,
            user: user.clone(),
            database: database.clone(),
            session: session.clone(),
            tls,
            connected_at: SystemTime::now(),
            link: Arc::default(),
            cancels: Arc::default(),
        },
        plan.cancel_key_len,
    );
    let counted = GaugeGuard::new(
        gauge!(metrics::PROXY_CLIENT_CONNECTIONS, metrics::SESSION => session.clone()),
    );
    let mut routes = routes;
    // Proxy-side authentication (none for pass-through) comes first, so an
    // unauthenticated client never costs a server connection.
    let deadline = Instant::now() + ctx.startup_timeout;
    let who = ClientId {
        session: &session,
        user: &user,
        database: &database,
        tls,
    };
    // The login's and the splice's futures are boxed: the task of every
    // connection (a transaction-mode client's too) is then sized for
    // what it waits on now, not for the largest of them.
    let authenticated = Box::pin(ctx.auth.authenticate(
        &who,
        &mut stream,
        &mut routes,
        &ctx.server_tls,
        ctx.hold_timeout,
        deadline,
    ));
    let login = match authenticated.await {
        Ok(login) => login,
        Err(err) => return refuse(&mut stream, err.into()).await,
    };
    let key = PoolKey {
        session: session.clone(),
        database: database.clone(),
        user: user.clone(),
    };
    let transaction_mode = ctx
        .pools
        .settings(&session)
        .is_some_and(|settings| settings.mode == PoolMode::Transaction);
    let early = stream.buffer().to_vec();
    let mode = match login {
        Some(login) if transaction_mode => InMode::Transaction(Box::new(transaction::Client {
            ctx,
            registration,
            login,
            key,
            routes,
            params,
            early,
        })),
        login => InMode::Session(Box::new(SessionClient {
            ctx,
            registration,
            login,
            key,
            routes,
            startup: plan.to_server,
            early,
        })),
    };
    let stream = stream.into_inner().into();
    Ok(Opening::In(InClient { mode, counted }, stream))
}

/// A session-mode client past its login (proxy-side or none yet).
struct SessionClient<'a> {
    ctx: &'a Context,
    registration: Registration,
    login: Option<Login>,
    key: PoolKey,
    routes: watch::Receiver<Route>,
    /// The startup packet for its server.
    startup: Vec<u8>,
    /// What it sent after its login messages, for its server.
    early: Vec<u8>,
}

/// Serves a session-mode client: a slot of its pool (if pooled) and a
/// pooled or new server connection, then the splice; a pooled connection
/// left idle goes back after its reset.
async fn serve_session<S: splice::Duplex>(
    client: Box<SessionClient<'_>>,
    mut stream: S,
) -> Result<End, ConnError> {
    let SessionClient {
        ctx,
        registration,
        login,
        key,
        mut routes,
        startup,
        early,
    } = *client;
    let server = take_server(
        ctx,
        &key,
        &startup,
        &mut routes,
        &mut stream,
        login.as_ref(),
        early,
    );
    let TakenServer {
        lease,
        connected,
        early,
        born,
        deadline,
    } = match Box::pin(server).await {
        Ok(taken) => taken,
        Err(err) => return refuse(&mut stream, err).await,
    };
    let _server = GaugeGuard::new(
        gauge!(metrics::PROXY_SERVER_CONNECTIONS, metrics::SESSION => key.session.clone()),
    );
    registration.set_server(&connected.principal.address, None);
    // Only a pooled client's splice tracks whether its server can be reused.
    let reuse = lease.as_ref().map(|_| Mutex::new(Reuse::default()));
    let (principal, epoch) = (connected.principal.clone(), connected.epoch);
    let route = routes.clone();
    let spliced = Box::pin(splice::splice(
        ctx,
        stream,
        connected,
        early,
        &registration,
        routes,
        splice::SpliceOptions {
            deadline,
            reuse: reuse.as_ref(),
        },
    ));
    let (end, server) = spliced.await?;
    let (Some(lease), Some(reuse), Some(mut server)) = (lease, reuse, server) else {
        return Ok(end);
    };
    // A cancel forwarded for this client could still reach the server and
    // hit the next client's query: such a connection is not reused. Once
    // the registration is gone no cancel can find this client; one that
    // found it just before is counted (before it is sent) by the time the
    // reset's round trip is over, so the count is read again after it.
    let cancels = registration.cancel_counter();
    drop(registration);
    let quiet = || cancels.load(Ordering::SeqCst) == 0;
    let reset_query = ctx
        .pools
        .settings(&key.session)
        .map(|s| s.reset_query.as_str());
    let reset = Box::pin(pool::reset(&mut server, reset_query.unwrap_or_default()));
    if quiet() && reset.await && quiet() {
        let greeting = reuse
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .greeting;
        let idle = IdleServer::new(server, principal, epoch, startup.into(), greeting, born);
        lease.give_back(idle, &route.borrow());
    }
    Ok(end)
}

/// A session-mode client's server connection, with what came with it.
struct TakenServer {
    lease: Option<pool::Lease>,
    connected: Connected,
    /// What the client sent while it was held.
    early: Vec<u8>,
    /// When the server connection logged in.
    born: Instant,
    /// The rest of the login's deadline.
    deadline: Instant,
}

/// A slot of the pool (if pooled) and a pooled connection or a new one,
/// logged in for the client when the proxy authenticates.
async fn take_server<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Context,
    key: &PoolKey,
    startup: &[u8],
    routes: &mut watch::Receiver<Route>,
    stream: &mut S,
    login: Option<&Login>,
    mut early: Vec<u8>,
) -> Result<TakenServer, ConnError> {
    // A pooled session's client takes a slot of its pool first (waiting,
    // up to the hold timeout, while the pool is full), perhaps with an
    // idle server connection of its principal and epoch (I4).
    let hold_deadline = Instant::now() + ctx.hold_timeout;
    let mut lease = match ctx.pools.pool(key) {
        Some(pool) => Some(pool.checkout(startup, routes, hold_deadline).await?),
        None => None,
    };
    // The hold does not count against authentication: the rest of the
    // login gets a full startup_timeout from the moment a server is had.
    let (connected, born, deadline) = match lease.as_mut().and_then(|lease| lease.reused.take()) {
        // Replayed to the client as if the server had just logged it in;
        // the splice swaps the server's BackendKeyData for the proxy's
        // and records it as this client's cancel target.
        Some(idle) => {
            let connected = Connected {
                server: idle.server,
                principal: idle.principal,
                epoch: idle.epoch,
                pending: idle.greeting,
            };
            let deadline = Instant::now() + ctx.startup_timeout;
            (connected, idle.born, deadline)
        }
        None => {
            let held = hold_and_connect(ctx, &key.session, routes, startup, stream, &mut early);
            let mut connected = held.await?;
            let deadline = Instant::now() + ctx.startup_timeout;
            if let Some(login) = login {
                // The server's requests answered as the client; its
                // AuthenticationOk (or error) is left for the splice to
                // forward.
                let server = &mut connected.server;
                let logged_in = login.log_in(server, &mut connected.pending, &key.user, deadline);
                logged_in.await?;
            }
            (connected, Instant::now(), deadline)
        }
    };
    Ok(TakenServer {
        lease,
        connected,
        early,
        born,
        deadline,
    })
}

/// A server connection whose startup packet has been sent.
pub(super) struct Connected {
    pub(super) server: ServerStream,
    /// The principal connected to; `principal.address` is the server's.
    pub(super) principal: Principal,
    pub(super) epoch: Epoch,
    /// Server bytes already read (its first message, at least).
    pub(super) pending: Vec<u8>,
}

/// Waits (up to the hold timeout) for the session's principal to serve,
/// connects and sends the startup packet. A server that answers "starting
/// up" (57P03), as a promoted mirror may, is retried like an absent one,
/// after a pause that grows with jitter, so that held clients do not knock
/// all together; a route change wakes them at once. A client that leaves
/// meanwhile frees its slot at once; what it sends is kept in `early`.
/// A server whose TLS is not what `[server_tls]` asks (a certificate that
/// fails verification, 'N' to a required SSLRequest) refuses the client at
/// once with the reason: a restart does not change a certificate, and
/// holding would only hide the cause behind "no principal".
pub(super) async fn hold_and_connect<S: AsyncRead + Unpin>(
    ctx: &Context,
    session: &str,
    routes: &mut tokio::sync::watch::Receiver<Route>,
    startup: &[u8],
    client: &mut S,
    early: &mut Vec<u8>,
) -> Result<Connected, ConnError> {
    let started = Instant::now();
    let hold_deadline = started + ctx.hold_timeout;
    let mut _held = None;
    let mut pause = HOLD_RETRY_FIRST;
    let mut watching = true;
    loop {
        let (epoch, principal, tls_failure) = {
            let route = routes.borrow_and_update();
            (
                route.epoch,
                route.principal.clone(),
                route.tls_failure.clone(),
            )
        };
        if let Some(failure) = tls_failure {
            return Err(ConnError::ServerTls(failure));
        }
        if let Some(principal) = principal {
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                try_server(&principal, epoch, startup, &ctx.server_tls),
            );
            if let Some(connected) = attempt.await.unwrap_or(Ok(None))? {
                histogram!(metrics::PROXY_CONNECT_SECONDS, metrics::SESSION => session.to_string())
                    .record(started.elapsed().as_secs_f64());
                return Ok(connected);
            }
        }
        if _held.is_none() {
            _held = Some(GaugeGuard::new(gauge!(
                metrics::PROXY_HELD_CONNECTIONS,
                metrics::SESSION => session.to_string()
            )));
        }
        if Instant::now() >= hold_deadline {
            return Err(ConnError::NoPrincipal {
                session: session.to_string(),
                waited: ctx.hold_timeout,
            });
        }
        let jittered = pause.mul_f64(0.5 + rand::random::<f64>());
        pause = (pause * 2).min(HOLD_RETRY_MAX);
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            changed = routes.changed(), if watching => watching = changed.is_ok(),
            _ = ctx.shutdown.cancelled() => return Err(ConnError::ShuttingDown),
            read = client.read_buf(early) => match read {
                Ok(0) | Err(_) => return Err(ConnError::ClientLeft),
                Ok(_) if early.len() > MAX_EARLY_CLIENT_BYTES => {
                    return Err(ConnError::ClientTooChatty)
                }
                Ok(_) => {}
            },
        }
    }
}

/// Connects to `principal` (over TLS as `[server_tls]` says) and sends the
/// startup packet; None when the server is unreachable or not accepting
/// connections yet, an error when its TLS is refused.
async fn try_server(
    principal: &Principal,
    epoch: Epoch,
    startup: &[u8],
    server_tls: &ServerTls,
) -> Result<Option<Connected>, ServerTlsError> {
    match server_tls.connect(&principal.address).await {
        Ok(server) => Ok(send_startup(server, principal, epoch, startup).await),
        Err(ServerConnectError::Tls(failure)) => Err(failure),
        Err(ServerConnectError::Io(_)) => Ok(None),
    }
}

/// Sends the startup packet and reads the server's first message; None
/// when the server goes away or answers "starting up" (57P03).
async fn send_startup(
    mut server: ServerStream,
    principal: &Principal,
    epoch: Epoch,
    startup: &[u8],
) -> Option<Connected> {
    server.write_all(startup).await.ok()?;
    server.flush().await.ok()?;
    let mut pending = Vec::with_capacity(512);
    loop {
        if server.read_buf(&mut pending).await.ok()? == 0 {
            return None;
        }
        match backend_message_len(&pending) {
            Ok(Some((_, len))) if pending.len() >= len => {
                if error_code(pending.get(..len)?) == Some("57P03") {
                    return None;
                }
                break;
            }
            Ok(_) if pending.len() < MAX_AUTH_BUFFER => {}
            _ => break,
        }
    }
    Some(Connected {
        server,
        principal: principal.clone(),
        epoch,
        pending,
    })
}

/// Forwards a CancelRequest with a known key; unknown keys are dropped.
async fn forward_cancel(ctx: &Context, pid: u32, secret: &[u8]) {
    let Some(target) = ctx.clients.cancel_target(pid, secret) else {
        tracing::debug!("cancel request with an unknown key dropped");
        return;
    };
    let address = &target.address;
    let (server_pid, server_secret) = target.server_key;
    // The cancel was counted when it was found, before the server can act
    // on it: the commit fence (I2) must know.
    let send = async {
        // Over TLS too when `[server_tls]` asks: PostgreSQL takes an
        // SSLRequest before a CancelRequest.
        let mut server = ctx.server_tls.connect(address).await?;
        server
            .write_all(&cancel_request(server_pid, server_secret))
            .await?;
        server.flush().await?;
        // The server closes once it has read the request.
        let mut byte = [0u8; 1];
        let _ = server.read(&mut byte).await;
        Ok::<_, ServerConnectError>(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, send).await {
        Ok(Ok(())) => {
            counter!(metrics::PROXY_CANCEL_REQUESTS).increment(1);
            tracing::debug!(%address, "cancel request forwarded");
        }
        Ok(Err(err)) => tracing::warn!(%address, "cancel request not delivered: {err}"),
        Err(_) => tracing::warn!(%address, "cancel request not delivered in time"),
    }
}
