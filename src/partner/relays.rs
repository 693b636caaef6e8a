//! The log shipper's loopback side: the ports through which the local
//! walreceiver and tools (pg_basebackup, pg_rewind) reach the peer's
//! PostgreSQL over the agent link, and [`carry`], which relays one stream
//! until it ends, the agent closes all streams (suspend, demotion, a lease
//! that ended) or the agent shuts down.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::control::client::open;
use crate::control::{Hello, StreamPurpose};
use crate::partner::agent::Agent;
use crate::shipper::positions::Positions;
use crate::shipper::relay::{relay, LocalEnd, RelayEnd};

/// Relays one stream until it ends or the agent closes all streams.
pub async fn carry(
    agent: &Agent,
    local: TcpStream,
    link: crate::tls::BoxedStream,
    local_end: LocalEnd,
    positions: Option<Arc<Mutex<Positions>>>,
) {
    let mut generation = agent.streams();
    tokio::select! {
        end = relay(local, link, local_end, agent.counters.clone(), positions) => match end {
            RelayEnd::Finished => debug!("stream finished"),
            RelayEnd::Local(err) => debug!("stream ended by local PostgreSQL: {err}"),
            RelayEnd::Link(err) => debug!("stream ended by the agent link: {err}"),
        },
        _ = generation.changed() => debug!("stream closed by the agent"),
        _ = agent.shutdown.cancelled() => {}
    }
}

/// Carries local PostgreSQL clients (the walreceiver, or a tool) to the peer.
async fn serve_local_relay(agent: Arc<Agent>, listener: TcpListener, purpose: StreamPurpose) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = agent.shutdown.cancelled() => return,
        };
        let Ok((local, _)) = accepted else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let hello = Hello::Stream {
                session: agent.config.session.clone(),
                purpose,
            };
            match open(&agent.config.peer, &agent.tls, &hello, agent.timeout()).await {
                Ok(link) => carry(&agent, local, link, LocalEnd::Client, None).await,
                Err(err) => debug!("cannot reach the peer for a {purpose:?} stream: {err}"),
            }
        });
    }
}

pub async fn serve_wal_relay(agent: Arc<Agent>, listener: TcpListener) {
    serve_local_relay(agent, listener, StreamPurpose::Wal).await
}

/// Runs `tool` (pg_basebackup, pg_rewind) with a one-off loopback relay to
/// the peer's PostgreSQL; `tool` gets the relay's libpq connection string.
pub async fn with_tool_relay<T: Send + 'static>(
    agent: &Arc<Agent>,
    tool: impl FnOnce(String) -> T + Send + 'static,
) -> std::io::Result<T> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    // Not the mirror's name: the principal must not take a tool's WAL
    // stream for the mirror's walreceiver.
    let conninfo = agent.conninfo_via(listener.local_addr()?.port(), "pgmirror_tool");
    let relay_task = tokio::spawn(serve_local_relay(
        agent.clone(),
        listener,
        StreamPurpose::Tool,
    ));
    let result = tokio::task::spawn_blocking(move || tool(conninfo)).await;
    relay_task.abort();
    result.map_err(std::io::Error::other)
}
