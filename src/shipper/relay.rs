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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::shipper::positions::Positions;
use crate::tls::BoxedStream;
use crate::wire::frame::{FrameScanner, Message};
use crate::wire::replication::{decode_backend, decode_frontend};

/// zstd level on the link. Every relayed read is its own flushed block, so
/// per-block costs dominate: in the agents' profile under TPC-B, level 1
/// spent most of zstd's time finding matches and building Huffman tables
/// for a few hundred bytes at a time. Level -1 (the fast strategy with
/// literals left unencoded) takes 30-50% less time per 600-byte to 4 kB
/// piece of pgbench WAL and keeps the ratio close: 0.15-0.17 vs 0.12-0.15
/// of WAL right after a checkpoint (full-page images), 0.10-0.12 either
/// way later on.
const COMPRESSION_LEVEL: i32 = -1;

/// Read size on either socket; a walsender writes up to 128 kB at a time.
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
    let (local_read, local_write) = local.into_split();
    let (link_read, link_write) = tokio::io::split(link);
    // From the local server come backend messages, from a local client frontend ones.
    let (outbound_scanner, inbound_scanner) = match local_end {
        LocalEnd::Server => (FrameScanner::backend(), FrameScanner::frontend()),
        LocalEnd::Client => (FrameScanner::frontend(), FrameScanner::backend()),
    };
    let outbound = Observer::new(outbound_scanner, local_end, positions.clone());
    let inbound = Observer::new(inbound_scanner, local_end, positions);
    // Either side failing ends the whole connection: PostgreSQL's
    // replication protocol has no use for a half-dead stream.
    match tokio::try_join!(
        compress(local_read, link_write, outbound, &counters),
        decompress(link_read, local_write, inbound, &counters),
    ) {
        Ok(_) => RelayEnd::Finished,
        Err(end) => end,
    }
}

/// Local socket to link: each read becomes one zstd-flushed piece of the
/// link's single zstd frame, written with one `write_all` and flushed.
///
/// The flush per read keeps latency at one round trip (a synchronous commit
/// waits for exactly these bytes), and bytes reach the link in the order
/// they were read, so nothing the local side sent later (a flush reply)
/// can overtake what it sent earlier.
async fn compress(
    mut local: impl AsyncRead + Unpin,
    mut link: impl AsyncWrite + Unpin,
    mut observer: Observer,
    counters: &LinkCounters,
) -> Result<(), RelayEnd> {
    let mut encoder = Encoder::new(COMPRESSION_LEVEL).map_err(RelayEnd::Link)?;
    let mut input = vec![0u8; CHUNK];
    // One allocation for the life of the relay: a flushed piece is at most
    // the read's compress bound plus a block header.
    let mut output = Vec::with_capacity(zstd::compress_bound(CHUNK) + 64);
    loop {
        let n = local.read(&mut input).await.map_err(RelayEnd::Local)?;
        output.clear();
        if n == 0 {
            finish(&mut encoder, &mut output).map_err(RelayEnd::Link)?;
            link.write_all(&output).await.map_err(RelayEnd::Link)?;
            return link.shutdown().await.map_err(RelayEnd::Link);
        }
        counters.raw.fetch_add(n as u64, Ordering::Relaxed);
        observer.observe(&input[..n], true);
        compress_flushed(&mut encoder, &input[..n], &mut output).map_err(RelayEnd::Link)?;
        link.write_all(&output).await.map_err(RelayEnd::Link)?;
        link.flush().await.map_err(RelayEnd::Link)?;
        counters
            .compressed
            .fetch_add(output.len() as u64, Ordering::Relaxed);
    }
}

/// Appends `data`, compressed and flushed to a block boundary (so the peer
/// can decode all of it now), to `output`.
fn compress_flushed(
    encoder: &mut Encoder<'_>,
    data: &[u8],
    output: &mut Vec<u8>,
) -> io::Result<()> {
    let mut input = InBuffer::around(data);
    while input.pos() < data.len() {
        output.reserve(zstd::compress_bound(data.len() - input.pos()));
        let pos = output.len();
        encoder.run(&mut input, &mut OutBuffer::around_pos(output, pos))?;
    }
    loop {
        output.reserve(CHUNK);
        let pos = output.len();
        if encoder.flush(&mut OutBuffer::around_pos(output, pos))? == 0 {
            return Ok(());
        }
    }
}

/// Appends the end of the zstd frame to `output`.
fn finish(encoder: &mut Encoder<'_>, output: &mut Vec<u8>) -> io::Result<()> {
    loop {
        output.reserve(CHUNK);
        let pos = output.len();
        if encoder.finish(&mut OutBuffer::around_pos(output, pos), true)? == 0 {
            return Ok(());
        }
    }
}

/// Link to local socket: decodes what arrives and writes out each decoded
/// batch before reading the link again.
async fn decompress(
    mut link: impl AsyncRead + Unpin,
    mut local: impl AsyncWrite + Unpin,
    mut observer: Observer,
    counters: &LinkCounters,
) -> Result<(), RelayEnd> {
    let mut decoder = Decoder::new().map_err(RelayEnd::Link)?;
    let mut input = vec![0u8; CHUNK];
    let mut output = Vec::with_capacity(CHUNK);
    // Whether the peer's zstd frame is still open: the link may end only
    // at a frame's end, anything else is a cut stream.
    let mut in_frame = false;
    loop {
        let n = link.read(&mut input).await.map_err(RelayEnd::Link)?;
        if n == 0 {
            if in_frame {
                return Err(RelayEnd::Link(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent link ended inside a zstd frame",
                )));
            }
            return local.shutdown().await.map_err(RelayEnd::Local);
        }
        counters.compressed.fetch_add(n as u64, Ordering::Relaxed);
        let mut compressed = InBuffer::around(&input[..n]);
        loop {
            output.clear();
            // 0 means a frame was completely decoded and flushed.
            in_frame = decoder
                .run(&mut compressed, &mut OutBuffer::around(&mut output))
                .map_err(RelayEnd::Link)?
                != 0;
            if !output.is_empty() {
                counters
                    .raw
                    .fetch_add(output.len() as u64, Ordering::Relaxed);
                observer.observe(&output, false);
                local.write_all(&output).await.map_err(RelayEnd::Local)?;
            }
            // A full output buffer may leave decoded bytes inside zstd.
            if compressed.pos() == n && output.len() < output.capacity() {
                break;
            }
        }
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

    /// The link may end only where the peer ended its zstd frame: a link
    /// cut inside it is a link failure, not a clean end of stream passed on
    /// to the local side, yet every byte decoded before the cut arrives.
    #[tokio::test]
    async fn a_link_cut_inside_a_frame_is_a_link_failure() {
        for clean in [true, false] {
            let mut encoder = Encoder::new(COMPRESSION_LEVEL).unwrap();
            let mut sent = Vec::new();
            compress_flushed(&mut encoder, b"some WAL", &mut sent).unwrap();
            if clean {
                finish(&mut encoder, &mut sent).unwrap();
            }
            let (mut peer, link) = tokio::io::duplex(1024);
            peer.write_all(&sent).await.unwrap();
            drop(peer);
            let (local, mut received) = tokio::io::duplex(1024);
            let observer = Observer::new(FrameScanner::backend(), LocalEnd::Client, None);
            let end = decompress(link, local, observer, &LinkCounters::default()).await;
            match (clean, end) {
                (true, Ok(())) => {}
                (false, Err(RelayEnd::Link(err))) => {
                    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof)
                }
                (_, end) => panic!("clean {clean}: {end:?}"),
            }
            let mut bytes = Vec::new();
            received.read_to_end(&mut bytes).await.unwrap();
            assert_eq!(bytes, b"some WAL");
        }
    }
}
