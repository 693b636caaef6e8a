//! The agent's mirroring endpoint: control requests from the peer, the
//! proxy and the admin console, and relayed PostgreSQL streams to the local
//! server (`relays` carries them). Each connection runs in its own task and
//! ends with the agent's shutdown or with [`Agent::close_streams`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::control::{read_hello, ControlError, ControlStream, Hello, Request, StreamPurpose};
use crate::partner::agent::Agent;
use crate::partner::relays::carry;
use crate::partner::AgentError;
use crate::roles::Role;
use crate::shipper::relay::LocalEnd;
use crate::sync::lock;

/// How long a new endpoint connection has to finish TLS and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn bind_wal_relay(saved: Option<u16>) -> Result<TcpListener, AgentError> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    if let Some(port) = saved {
        if let Ok(listener) = TcpListener::bind(loopback(port)).await {
            return Ok(listener);
        }
        warn!(port, "the saved WAL relay port is taken; using a new one");
    }
    TcpListener::bind(loopback(0))
        .await
        .map_err(|source| AgentError::Bind {
            addr: loopback(0),
            source,
        })
}

/// Accepts peers, control clients and relayed streams on the mirroring endpoint.
pub async fn serve_endpoint(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = agent.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((tcp, from)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(err) = handle_endpoint_connection(&agent, tcp).await {
                        debug!(%from, "endpoint connection ended: {err}");
                    }
                });
            }
            Err(err) => {
                warn!("accept on the mirroring endpoint failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_endpoint_connection(
    agent: &Arc<Agent>,
    tcp: TcpStream,
) -> Result<(), ControlError> {
    tcp.set_nodelay(true)?;
    let handshake = async {
        let mut stream = agent.tls.accept(tcp).await?;
        // Exact reads: after a Hello::Stream the raw stream goes to the relay.
        let hello = read_hello(&mut stream).await?;
        Ok::<_, ControlError>((stream, hello))
    };
    let (stream, hello) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ControlError::Timeout(HANDSHAKE_TIMEOUT))??;
    match hello {
        None => Ok(()),
        Some(Hello::Control) => {
            let mut control = ControlStream::new(stream);
            while let Some(request) = control.recv::<Request>().await? {
                let response = crate::partner::operations::handle(agent, request).await;
                control.send(&response).await?;
            }
            Ok(())
        }
        Some(Hello::Stream { session, purpose }) => {
            if session != agent.config.session {
                warn!(%session, "refused a stream for another session");
                return Ok(());
            }
            let state = agent.state();
            let serving = state.role == Role::Principal
                && !state.ended
                && (purpose == StreamPurpose::Tool || !state.suspended);
            if !serving {
                debug!(?purpose, "refused a stream: not an active principal");
                return Ok(());
            }
            let local = TcpStream::connect(("127.0.0.1", agent.config.postgres.port)).await?;
            let positions = (purpose == StreamPurpose::Wal).then(|| {
                lock(&agent.positions).reset_stream();
                agent.positions.clone()
            });
            carry(agent, local, stream, LocalEnd::Server, positions).await;
            Ok(())
        }
    }
}
