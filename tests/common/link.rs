//! `Link`: a TCP relay the harness puts between two components, and can cut.
//!
//! Modes: healthy (bytes flow), black hole (bytes are held back and new
//! connections hang, nothing is refused: what a pulled cable looks like to
//! TCP; on heal the held bytes flow on, as TCP retransmission would deliver
//! them; so does the end of a connection, FIN or RST, which a pulled cable
//! does not carry either) and reset (every connection is torn down with
//! RST, new ones too).
//! The relay runs on its own thread and runtime so that it keeps working
//! whatever the test's own runtime is doing.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    Healthy,
    BlackHole,
    Reset,
}

pub struct Link {
    addr: SocketAddr,
    mode: watch::Sender<LinkMode>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Link {
    /// A healthy relay from a fresh port on 127.0.0.1 to `target`.
    pub fn new(target: SocketAddr) -> Link {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind link");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("link address");
        let (mode, mode_rx) = watch::channel(LinkMode::Healthy);
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("link runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("link listener");
                tokio::select! {
                    _ = accept_loop(listener, target, mode_rx) => {}
                    _ = shutdown_rx => {}
                }
            });
        });
        Link {
            addr,
            mode,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Where components connect to go through the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn black_hole(&self) {
        self.mode.send_replace(LinkMode::BlackHole);
    }

    pub fn reset(&self) {
        self.mode.send_replace(LinkMode::Reset);
    }

    pub fn heal(&self) {
        self.mode.send_replace(LinkMode::Healthy);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<LinkMode>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(relay(client, target, mode.clone()));
    }
}

async fn relay(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<LinkMode>) {
    if wait_healthy(&mut mode).await.is_err() {
        abort(&client);
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        abort(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, mode.clone()),
        pump(server_read, client_write, mode),
    );
}

/// Waits until the link is healthy; an error when it is reset meanwhile.
async fn wait_healthy(mode: &mut watch::Receiver<LinkMode>) -> io::Result<()> {
    let reset = || io::Error::new(io::ErrorKind::ConnectionReset, "link reset");
    match *mode
        .wait_for(|m| *m != LinkMode::BlackHole)
        .await
        .map_err(|_| reset())?
    {
        LinkMode::Healthy => Ok(()),
        _ => Err(reset()),
    }
}

/// Closes with RST instead of FIN.
fn abort(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Moves bytes one way until EOF, an error, or a reset of the link.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = mode.wait_for(|m| *m == LinkMode::Reset) => break,
        };
        let n = match read {
            Ok(0) => {
                if wait_healthy(&mut mode).await.is_ok() {
                    let _ = to.shutdown().await;
                    return;
                }
                break;
            }
            Ok(n) => n,
            Err(_) => {
                let _ = wait_healthy(&mut mode).await;
                break;
            }
        };
        if wait_healthy(&mut mode).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    abort(from.as_ref());
    abort(to.as_ref());
}
