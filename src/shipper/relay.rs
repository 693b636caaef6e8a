//! The log shipper's hot path: one PostgreSQL connection (the mirror's
//! walreceiver, pg_basebackup or pg_rewind) carried between a local socket
//! and the agent link, zstd-compressed on the link, counted both before and
//! after compression, and observed for replication positions on the
//! principal's side.
//!
//! The relay never interprets what it carries: observation is best effort
//! and cannot alter or stop the bytes. Cancel-safe: dropping the future
//! drops both connections.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_compression::tokio::bufread::ZstdDecoder;
use async_compression::tokio::write::ZstdEncoder;
use async_compression::Level;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::shipper::positions::Positions;
use crate::tls::BoxedStream;
use crate::wire::frame::{FrameScanner, Message};
use crate::wire::replication::{decode_backend, decode_frontend};

/// zstd level on the link: level 1 keeps up with WAL bursts on one core
/// and already removes most of the redundancy of full-page images.
const COMPRESSION_LEVEL: i32 = 1;

/// Read size on the local socket; a walsender writes up to 128 kB at a time.
const CHUNK: usize = 64 * 1024;

/// Bytes carried on agent links, before and after compression, both ways.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub raw: AtomicU64,
    pub compressed: AtomicU64,
}

impl LinkCounters {
    pub fn raw(&self) -> u64 {
        self.raw.load(Ordering::Relaxed)
    }

    pub fn compressed(&self) -> u64 {
        self.compressed.load(Ordering::Relaxed)
    }
}

/// Which side of a relay ended it, and how (STYLE 17, 24).
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached end of stream.
    Finished,
    /// The local PostgreSQL side failed.
    Local(io::Error),
    /// The agent link failed (the peer agent died or the network broke).
    Link(io::Error),
}

/// Which end of the PostgreSQL connection the local socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEnd {
    /// The local socket is a PostgreSQL server (we are the principal's agent).
    Server,
    /// The local socket is a client (walreceiver, pg_basebackup, pg_rewind).
    Client,
}

/// Carries one PostgreSQL connection until both sides finish or one fails.
/// `positions` observes the stream when this is the principal's end of the
/// mirror's WAL stream.
pub async fn relay(
    local: TcpStream,
    link: BoxedStream,
    local_end: LocalEnd,
    counters: Arc<LinkCounters>,
    positions: Option<Arc<Mutex<Positions>>>,
) -> RelayEnd {
    let _ = local.set_nodelay(true);
    let (mut local_read, mut local_write) = local.into_split();
    let (link_read, link_write) = tokio::io::split(link);
    let link_read = Counting::new(link_read, counters.clone());
    let link_write = Counting::new(link_write, counters.clone());
    // From the local server come backend messages, from a local client frontend ones.
    let (outbound_scanner, inbound_scanner) = match local_end {
        LocalEnd::Server => (FrameScanner::backend(), FrameScanner::frontend()),
        LocalEnd::Client => (FrameScanner::frontend(), FrameScanner::backend()),
    };
    let outbound_observer = Observer::new(outbound_scanner, local_end, positions.clone());
    let inbound_observer = Observer::new(inbound_scanner, local_end, positions);

    let outbound = async {
        let mut encoder = ZstdEncoder::with_quality(link_write, Level::Precise(COMPRESSION_LEVEL));
        let mut observer = outbound_observer;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = local_read.read(&mut buf).await.map_err(RelayEnd::Local)?;
            if n == 0 {
                return encoder.shutdown().await.map_err(RelayEnd::Link);
            }
            counters.raw.fetch_add(n as u64, Ordering::Relaxed);
            observer.observe(&buf[..n], true);
            encoder.write_all(&buf[..n]).await.map_err(RelayEnd::Link)?;
            // A zstd flush per read keeps latency at one round trip: a
            // synchronous commit waits for exactly these bytes.
            encoder.flush().await.map_err(RelayEnd::Link)?;
        }
    };
    let inbound = async {
        let mut decoder = ZstdDecoder::new(BufReader::new(link_read));
        let mut observer = inbound_observer;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = decoder.read(&mut buf).await.map_err(RelayEnd::Link)?;
            if n == 0 {
                return local_write.shutdown().await.map_err(RelayEnd::Local);
            }
            counters.raw.fetch_add(n as u64, Ordering::Relaxed);
            observer.observe(&buf[..n], false);
            local_write
                .write_all(&buf[..n])
                .await
                .map_err(RelayEnd::Local)?;
        }
    };
    // Either side failing ends the whole connection: PostgreSQL's
    // replication protocol has no use for a half-dead stream.
    match tokio::try_join!(outbound, inbound) {
        Ok(_) => RelayEnd::Finished,
        Err(end) => end,
    }
}

/// Feeds one direction's bytes to the position tracker.
struct Observer {
    scanner: FrameScanner,
    local_end: LocalEnd,
    positions: Option<Arc<Mutex<Positions>>>,
}

impl Observer {
    fn new(
        scanner: FrameScanner,
        local_end: LocalEnd,
        positions: Option<Arc<Mutex<Positions>>>,
    ) -> Self {
        Observer {
            scanner,
            local_end,
            positions,
        }
    }

    /// `from_local`: the bytes came from the local socket.
    fn observe(&mut self, bytes: &[u8], from_local: bool) {
        let Some(positions) = &self.positions else {
            return;
        };
        let from_server = from_local == (self.local_end == LocalEnd::Server);
        let now = Instant::now();
        let _ = self.scanner.feed(bytes, |message: Message<'_>| {
            if message.tag != Some(b'd') {
                return;
            }
            let Ok(mut positions) = positions.lock() else {
                return;
            };
            if from_server {
                if let Ok(Some(decoded)) = decode_backend(message.prefix, message.body_len) {
                    positions.on_backend(&decoded, now);
                }
            } else if let Ok(Some(decoded)) = decode_frontend(message.prefix, message.body_len) {
                positions.on_frontend(&decoded, now);
            }
        });
    }
}

/// Counts the compressed bytes that cross the agent link.
struct Counting<T> {
    inner: T,
    counters: Arc<LinkCounters>,
}

impl<T> Counting<T> {
    fn new(inner: T, counters: Arc<LinkCounters>) -> Self {
        Counting { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters
            .compressed
            .fetch_add(read as u64, Ordering::Relaxed);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &poll {
            self.counters
                .compressed
                .fetch_add(*written as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Two relays back to back over an in-memory link: what a client writes
    /// arrives unchanged at the server and back, and the link carries less
    /// than it was given for repetitive data.
    #[tokio::test]
    async fn bytes_cross_two_relays_unchanged_and_compressed() {
        let server_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server_listener.local_addr().unwrap();
        let client_addr = client_listener.local_addr().unwrap();
        let (link_a, link_b) = tokio::io::duplex(1 << 16);
        let counters = Arc::new(LinkCounters::default());

        let client = tokio::spawn(TcpStream::connect(client_addr));
        let (client_side, _) = client_listener.accept().await.unwrap();
        let mut client = client.await.unwrap().unwrap();
        let mirror_end = tokio::spawn(relay(
            client_side,
            Box::new(link_a),
            LocalEnd::Client,
            counters.clone(),
            None,
        ));
        let server_side = TcpStream::connect(server_addr).await.unwrap();
        let (mut server, _) = server_listener.accept().await.unwrap();
        let principal_end = tokio::spawn(relay(
            server_side,
            Box::new(link_b),
            LocalEnd::Server,
            counters.clone(),
            None,
        ));

        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 7) as u8).collect();
        client.write_all(&payload).await.unwrap();
        let mut received = vec![0u8; payload.len()];
        server.read_exact(&mut received).await.unwrap();
        assert_eq!(received, payload);
        server.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");

        drop(client);
        drop(server);
        mirror_end.await.unwrap();
        principal_end.await.unwrap();
        assert!(counters.raw() >= 2 * payload.len() as u64);
        assert!(counters.compressed() * 10 < counters.raw(), "{counters:?}");
    }
}
