//! The splice of one client connection to its server, once the server has
//! been chosen and sent the startup packet: the authentication exchange
//! relayed with the server's BackendKeyData swapped for the proxy's, then
//! bytes copied both ways without parsing queries until one side ends.
//! The server-to-client direction tracks message boundaries (tag+length)
//! so that, when a failover supersedes the connection's principal (I4) or
//! the proxy shuts down, a FATAL 57P01 can be inserted between messages,
//! and runs them through the commit fence (`fence`, I2). The
//! client-to-server direction tracks only the last message's tag (does the
//! client await ReadyForQuery?), which the fence needs, and for a pooled
//! client whether its server may be reused (`pool::Reuse`).
//! The caller (`connection::dispatch`) chooses the server and gives a
//! reusable one back to its pool. Dropping the splice's future closes
//! both sockets, so it is cancel-safe.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ::metrics::{counter, Counter};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{tcp, TcpStream};
use tokio::time::Instant;
use tokio_util::either::Either;

use crate::metrics;
use crate::proxy::clients::Registration;
use crate::proxy::connection::{ConnError, Connected, End};
use crate::proxy::fence::{
    CommitFence, FenceCause, Step, FRONTEND_AWAITS_READY, SQLSTATE_COMPLETION_UNKNOWN,
};
use crate::proxy::pool::{self, Reuse, TERMINATE};
use crate::proxy::routing::{superseded, Route};
use crate::proxy::server_tls::ServerStream;
use crate::proxy::wake_filter::WakeFilter;
use crate::proxy::Context;
use crate::wire::frame::FrameScanner;
use crate::wire::startup::{
    backend_key_data, backend_message_len, decode_backend_key_data, error_response, Severity,
    BACKEND_KEY_DATA, READY_FOR_QUERY,
};

/// The FATAL (57P01) a client gets when the proxy stops.
pub(super) const SHUTTING_DOWN: &str =
    "terminating connection: the pgmirror proxy is shutting down";
/// How long the goodbye (TLS close_notify) to a client may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Initial read buffer per splice direction; it doubles whenever a read
/// fills it. 1 KiB is the largest size glibc's per-thread cache serves: a
/// buffer taken and given back for every message costs little.
const SPLICE_BUFFER_MIN: usize = 1024;
/// Largest buffer per splice direction, for bulk transfers.
const SPLICE_BUFFER_MAX: usize = 64 * 1024;

/// The splice's deadline for the rest of the login, and for a pooled
/// client where to record whether its server connection may be reused.
pub(super) struct SpliceOptions<'a> {
    pub(super) deadline: Instant,
    pub(super) reuse: Option<&'a Mutex<Reuse>>,
}

/// Locks a splice's [`Reuse`]; a panic elsewhere only spoils reuse.
fn tracked(reuse: Option<&Mutex<Reuse>>) -> Option<std::sync::MutexGuard<'_, Reuse>> {
    reuse.map(|reuse| reuse.lock().unwrap_or_else(|poison| poison.into_inner()))
}

/// A stream the splice drives in both directions at once from one task.
/// Plain TCP splits by reference, with no lock between the halves; TLS
/// keeps its session state in one place, so its halves share a lock
/// (`tokio::io::split`).
pub(super) trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {
    type Reader<'a>: Readable
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

/// The read half of a [`Duplex`].
pub(super) trait Readable: AsyncRead + Unpin + Send {
    /// Resolves when a read would not wait, so that the splice needs a
    /// buffer only then. A reader with bytes of its own that the socket
    /// cannot tell about (TLS) resolves at once and keeps its buffer.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Whether [`Readable::readable`] follows the socket's readiness, which
    /// can be stale (a read that exactly filled its buffer leaves it set):
    /// a read that then finds nothing gives its buffer back and waits on
    /// `readable` again. False for TLS, whose `readable` never waits.
    fn follows_socket(&self) -> bool;
}

impl Duplex for TcpStream {
    type Reader<'a> = tcp::ReadHalf<'a>;
    type Writer<'a> = tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}

impl Duplex for tokio_rustls::server::TlsStream<TcpStream> {
    type Reader<'a> = ReadHalf<&'a mut Self>;
    type Writer<'a> = WriteHalf<&'a mut Self>;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }
}

/// A TLS stream to a server, as [`ServerStream::Tls`] holds it.
type ServerTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

impl Duplex for ServerStream {
    type Reader<'a> = Either<tcp::ReadHalf<'a>, ReadHalf<&'a mut ServerTlsStream>>;
    type Writer<'a> = Either<tcp::WriteHalf<'a>, WriteHalf<&'a mut ServerTlsStream>>;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        match self {
            ServerStream::Plain(tcp) => {
                let (read, write) = tcp.split();
                (Either::Left(read), Either::Left(write))
            }
            ServerStream::Tls(tls) => {
                let (read, write) = tokio::io::split(tls.as_mut());
                (Either::Right(read), Either::Right(write))
            }
        }
    }
}

impl Readable for tcp::ReadHalf<'_> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tcp::ReadHalf::readable(self)
    }

    fn follows_socket(&self) -> bool {
        true
    }
}

impl<T: AsyncRead + Send> Readable for ReadHalf<T> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn follows_socket(&self) -> bool {
        false
    }
}

impl<L: Readable, R: Readable> Readable for Either<L, R> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        match self {
            Either::Left(left) => Either::Left(left.readable()),
            Either::Right(right) => Either::Right(right.readable()),
        }
    }

    fn follows_socket(&self) -> bool {
        match self {
            Either::Left(left) => left.follows_socket(),
            Either::Right(right) => right.follows_socket(),
        }
    }
}

/// The proxy's byte counters, looked up once (a transaction-mode client
/// relays many transactions).
pub struct ByteCounters {
    pub to_server: Counter,
    pub to_client: Counter,
}

impl Default for ByteCounters {
    fn default() -> Self {
        ByteCounters {
            to_server: counter!(metrics::PROXY_BYTES, "direction" => "client_to_server"),
            to_client: counter!(metrics::PROXY_BYTES, "direction" => "server_to_client"),
        }
    }
}

/// One direction's read buffer, held only while its peer is sending: an
/// idle connection (the common case for a proxy's clients) holds none.
/// It starts at [`SPLICE_BUFFER_MIN`] and doubles whenever a read fills it,
/// up to [`SPLICE_BUFFER_MAX`].
#[derive(Default)]
struct ReadBuffer {
    bytes: Vec<u8>,
    /// The size the next allocation takes (0 before the first).
    size: usize,
}

impl ReadBuffer {
    /// Reads what `reader` has (empty at its end), allocating only once it
    /// has something. Cancel-safe: dropped before it resolves, it has
    /// consumed nothing.
    async fn read_from<R: Readable>(&mut self, reader: &mut R) -> io::Result<&[u8]> {
        let read = loop {
            if self.bytes.capacity() == 0 {
                reader.readable().await?;
            }
            self.size = self.size.max(SPLICE_BUFFER_MIN);
            if self.bytes.capacity() < self.size {
                self.bytes = Vec::with_capacity(self.size);
            }
            self.bytes.clear();
            // Into the spare capacity: nothing to zero first.
            if !reader.follows_socket() {
                break reader.read_buf(&mut self.bytes).await?;
            }
            match reader.read_buf(&mut self.bytes).now_or_never() {
                Some(read) => break read?,
                // Stale readiness: the read cleared it, so the next wait
                // is a real one, and an idle connection waits bufferless.
                None => self.bytes = Vec::new(),
            }
        };
        if read == self.bytes.capacity() && self.size < SPLICE_BUFFER_MAX {
            // Bulk transfer: fewer, larger reads from now on.
            self.size *= 2;
        }
        Ok(&self.bytes)
    }
}

/// Runs one chunk of server bytes through the commit fence and writes what
/// it lets through; Some(end) when the fence ended the connection.
async fn forward<W: AsyncWrite + Unpin>(
    fence: &mut CommitFence,
    chunk: &[u8],
    awaiting_ready: &AtomicBool,
    registration: &Registration,
    client: &mut W,
) -> Result<Option<End>, ConnError> {
    if chunk.is_empty() {
        return Ok(None);
    }
    let awaiting = awaiting_ready.load(Ordering::Relaxed);
    match fence.feed(chunk, awaiting, registration.cancels_forwarded())? {
        Step::PassChunk => client.write_all(chunk).await?,
        Step::Output if fence.output().is_empty() => return Ok(None),
        Step::Output => client.write_all(fence.output()).await?,
        Step::Fence { cause, at_boundary } => {
            if !fence.output().is_empty() {
                client.write_all(fence.output()).await?;
            }
            fenced(cause, at_boundary, client).await;
            return Ok(Some(End::CommitFenced(cause)));
        }
    }
    // The proxy waits for the server next: a TLS stream must not keep the
    // tail of what it was given (a no-op on plain TCP).
    client.flush().await?;
    Ok(None)
}

/// Tells the client its commit's outcome is unknown (40003), when a message
/// can be inserted, and closes its side.
pub(super) async fn fenced<W: AsyncWrite + Unpin>(
    cause: FenceCause,
    at_boundary: bool,
    client: &mut W,
) {
    counter!(metrics::PROXY_COMMITS_FENCED, metrics::CAUSE => cause.label()).increment(1);
    tracing::warn!(
        cause = cause.label(),
        "commit not confirmed by the mirror: client told 40003 and disconnected (I2)"
    );
    if at_boundary {
        let error = error_response(
            Severity::Fatal,
            SQLSTATE_COMPLETION_UNKNOWN,
            &cause.client_message(),
        );
        let _ = client.write_all(&error).await;
    }
    let _ = client.shutdown().await;
}

/// Relays the authentication exchange, then splices until one side ends.
/// A pooled client's Terminate is not forwarded, and its server connection
/// is given back when the client ended cleanly with the server idle
/// ([`Reuse::is_idle`]); otherwise the server connection is closed.
pub(super) async fn splice<S>(
    ctx: &Context,
    mut client: S,
    connected: Connected,
    early: Vec<u8>,
    registration: &Registration,
    mut routes: tokio::sync::watch::Receiver<Route>,
    options: SpliceOptions<'_>,
) -> Result<(End, Option<ServerStream>), ConnError>
where
    S: Duplex,
{
    let Connected {
        mut server,
        principal,
        epoch,
        pending,
    } = connected;
    let address = &principal.address;
    let (mut client_read, mut client_write) = client.halves();
    let (mut server_read, mut server_write) = server.halves();
    let shutdown = ctx.shutdown.clone();
    let startup_timeout = ctx.startup_timeout;
    let SpliceOptions { deadline, reuse } = options;

    let ByteCounters {
        to_server: bytes_to_server,
        to_client: bytes_to_client,
    } = &ctx.bytes;
    let client_routes = routes.clone();
    // Whether the client's last message was Sync, Query or FunctionCall, so
    // that a ReadyForQuery comes without more client input (the fence's
    // rule 3). Both directions run in this task; the atomic only makes the
    // shared flag Send.
    let awaiting_ready = AtomicBool::new(false);
    let client_to_server = async {
        let mut buf = ReadBuffer::default();
        // Every client message after the startup packet is tagged.
        let mut scanner = FrameScanner::backend();
        if !early.is_empty() {
            // Sent during the hold; the fence's flag needs no update yet
            // (authentication comes first). A Terminate among them goes
            // to the server, which then ends.
            {
                let mut reuse = tracked(reuse);
                let _ = scanner.feed(&early, |message| {
                    if let (Some(reuse), Some(tag)) = (reuse.as_mut(), message.tag) {
                        reuse.client_message(tag);
                    }
                });
            }
            server_write.write_all(&early).await?;
            server_write.flush().await?;
        }
        loop {
            let chunk = buf.read_from(&mut client_read).await?;
            bytes_to_server.increment(chunk.len() as u64);
            if chunk.is_empty() {
                // A pooled server connection stays open for its next
                // client (or is closed by the caller).
                if reuse.is_none() {
                    let _ = server_write.shutdown().await;
                }
                return Ok::<End, ConnError>(End::ClientClosed);
            }
            let mut last_tag = None;
            // Where a pooled client's Terminate starts, if it sent one;
            // None inside when it began in an earlier chunk.
            let mut terminate = None;
            let fed = {
                let mut tracking = tracked(reuse);
                let fed = scanner.feed(chunk, |message| {
                    last_tag = message.tag;
                    match (tracking.as_mut(), message.tag) {
                        (Some(_), Some(TERMINATE)) => {
                            terminate.get_or_insert(pool::terminate_start(message.end));
                        }
                        (Some(reuse), Some(tag)) => reuse.client_message(tag),
                        _ => {}
                    }
                });
                if let Some(reuse) = tracking.as_mut() {
                    if fed.is_err() || terminate == Some(None) {
                        reuse.spoil();
                    }
                }
                fed
            };
            if let Some(Some(start)) = terminate {
                // The client is leaving: what came before its Terminate
                // goes on, the Terminate itself does not.
                let before = chunk.get(..start).unwrap_or_default();
                if !before.is_empty() && !client_routes.borrow().supersedes(epoch, &principal) {
                    server_write.write_all(before).await?;
                    server_write.flush().await?;
                }
                return Ok(End::ClientClosed);
            }
            if fed.is_err() {
                // Not protocol 3 any more: never hold (the fence's other
                // rules do not depend on this flag).
                awaiting_ready.store(false, Ordering::Relaxed);
            } else if let Some(tag) = last_tag {
                let awaits = FRONTEND_AWAITS_READY.contains(&tag) && !scanner.is_failed();
                awaiting_ready.store(awaits, Ordering::Relaxed);
            }
            if client_routes.borrow().supersedes(epoch, &principal) {
                // I4: not one more client byte to a superseded principal;
                // the other direction ends the connection with 57P01.
                std::future::pending::<()>().await;
            }
            server_write.write_all(chunk).await?;
            // A TLS stream may keep the tail of a write (a no-op on TCP).
            server_write.flush().await?;
        }
    };

    let server_to_client = async {
        // Authentication: whole messages, BackendKeyData swapped.
        let mut pending = pending;
        let mut out = Vec::new();
        'auth: loop {
            let mut ready = false;
            while let Some((tag, len)) = backend_message_len(&pending)? {
                let Some(message) = pending.get(..len) else {
                    break;
                };
                if let Some(reuse) = tracked(reuse).as_mut() {
                    reuse.greeting.extend_from_slice(message);
                }
                match tag {
                    BACKEND_KEY_DATA => match decode_backend_key_data(message) {
                        Some((pid, secret)) => {
                            registration.set_server_key(pid, secret);
                            out.extend_from_slice(&backend_key_data(
                                registration.pid,
                                &registration.secret,
                            ));
                        }
                        None => {
                            // Never the server's key to the client: the
                            // proxy's own, which no cancel can use.
                            tracing::warn!(
                                len = message.len(),
                                "BackendKeyData of an unexpected form: cancel requests of this client cannot be forwarded"
                            );
                            out.extend_from_slice(&backend_key_data(
                                registration.pid,
                                &registration.secret,
                            ));
                        }
                    },
                    READY_FOR_QUERY => {
                        out.extend_from_slice(message);
                        ready = true;
                    }
                    _ => out.extend_from_slice(message),
                }
                pending.drain(..len);
                if ready {
                    client_write.write_all(&out).await?;
                    client_write.flush().await?;
                    break 'auth;
                }
            }
            if !out.is_empty() {
                client_write.write_all(&out).await?;
                client_write.flush().await?;
                out.clear();
            }
            if pending.len() > crate::proxy::connection::MAX_AUTH_BUFFER {
                return Err(ConnError::ServerTooChatty);
            }
            let read = tokio::time::timeout_at(deadline, server_read.read_buf(&mut pending))
                .await
                .map_err(|_| ConnError::StartupTimeout(startup_timeout))??;
            if read == 0 {
                return Ok(End::ServerClosed);
            }
        }
        drop(out);

        // The hot path: bytes as they come, boundaries tracked, commits
        // fenced. Bytes after the authentication's ReadyForQuery go first.
        let mut fence = CommitFence::new(FrameScanner::backend(), registration.cancels_forwarded());
        if let Some(reuse) = tracked(reuse).as_mut() {
            reuse.server_bytes(&pending);
        }
        let early = forward(
            &mut fence,
            &pending,
            &awaiting_ready,
            registration,
            &mut client_write,
        )
        .await?;
        drop(pending);
        let mut buf = ReadBuffer::default();
        // Made once, not per read, and polled only when woken: each poll
        // of a pending wait takes its Notify's lock.
        let mut superseded = pin!(WakeFilter::new(superseded(&mut routes, epoch, &principal)));
        let mut cancelled = pin!(WakeFilter::new(shutdown.cancelled()));
        let end = loop {
            if let Some(end) = early {
                break end;
            }
            // Bytes first: a wake-up for bytes polls nothing else. A
            // stream that never pauses still yields to the others once
            // tokio's cooperative budget is spent.
            tokio::select! {
                biased;
                read = buf.read_from(&mut server_read) => {
                    let chunk = read?;
                    bytes_to_client.increment(chunk.len() as u64);
                    if chunk.is_empty() {
                        if let Some(cause) = fence.server_closed() {
                            fenced(cause, true, &mut client_write).await;
                            break End::CommitFenced(cause);
                        }
                        break End::ServerClosed;
                    }
                    // Before any await: a chunk read is always seen.
                    if let Some(reuse) = tracked(reuse).as_mut() {
                        reuse.server_bytes(chunk);
                    }
                    let fed = forward(&mut fence, chunk, &awaiting_ready, registration, &mut client_write)
                        .await?;
                    if let Some(end) = fed {
                        break end;
                    }
                }
                () = &mut superseded => break End::Failover,
                () = &mut cancelled => break End::Shutdown,
            }
        };
        let goodbye = match end {
            End::Failover => Some(format!(
                "terminating connection: a failover happened and {address} is no longer the \
                 principal; reconnect to reach the new principal"
            )),
            End::Shutdown => Some(SHUTTING_DOWN.into()),
            _ => None,
        };
        if let Some(message) = goodbye {
            // A held completion is dropped: its ReadyForQuery never came.
            if fence.abandon() {
                let _ = client_write
                    .write_all(&error_response(Severity::Fatal, "57P01", &message))
                    .await;
            }
            let _ = client_write.shutdown().await;
        }
        Ok(end)
    };

    let end = tokio::select! {
        end = client_to_server => end,
        end = server_to_client => end,
    };
    // TLS: close_notify, so that the client can tell an end from a cut.
    let _ = tokio::time::timeout(CLOSE_GRACE, client_write.shutdown()).await;
    let end = end?;
    let idle = end == End::ClientClosed && tracked(reuse).is_some_and(|reuse| reuse.is_idle());
    drop((server_read, server_write));
    Ok((end, idle.then_some(server)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A read that fills its buffer exactly leaves the socket's readiness
    /// set; a client that then goes quiet must still be waited on without
    /// a buffer (an idle client's memory).
    #[tokio::test]
    async fn a_quiet_peer_is_awaited_without_a_buffer_even_after_a_full_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut ours, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = ours.split();
        let mut buffer = ReadBuffer::default();
        peer.write_all(&[7u8; SPLICE_BUFFER_MIN]).await.unwrap();
        let mut got = 0;
        while got < SPLICE_BUFFER_MIN {
            got += buffer.read_from(&mut reader).await.unwrap().len();
        }
        assert!(
            buffer.read_from(&mut reader).now_or_never().is_none(),
            "the peer sent nothing more"
        );
        assert_eq!(buffer.bytes.capacity(), 0, "a buffer held while waiting");
        peer.write_all(b"more").await.unwrap();
        assert_eq!(buffer.read_from(&mut reader).await.unwrap(), b"more");
    }
}
