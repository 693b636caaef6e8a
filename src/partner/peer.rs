//! The peer link's heartbeat: pings the peer agent with this partner's
//! view every interval and keeps what it answers (spec 28-29). A principal's
//! answered ping renews its lease (I1); a ping not answered within TIMEOUT
//! marks the peer lost and closes the relayed streams.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::control::{ControlClient, ControlError, PeerView};
use crate::partner::agent::{sleep_or_shutdown, Agent};
use crate::sync::lock;

/// Pings the peer over a control connection every interval; a ping not
/// answered within TIMEOUT, or a hard error, marks the peer lost (spec 28-29).
pub async fn ping_peer(agent: Arc<Agent>) {
    while !agent.shutdown.is_cancelled() {
        let timeout = agent.timeout();
        let interval = agent.ping_every();
        let connected = tokio::time::timeout(
            timeout,
            ControlClient::connect(&agent.config.peer, &agent.tls),
        )
        .await;
        let mut client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                peer_lost(&agent, &err.to_string());
                sleep_or_shutdown(&agent, interval).await;
                continue;
            }
            Err(_) => {
                peer_lost(&agent, "connect timed out");
                continue;
            }
        };
        loop {
            let timeout = agent.timeout();
            let sent = agent.clock();
            match client.ping_within(agent.view(), timeout).await {
                Ok(view) => {
                    // A peer that is principal at a later epoch answers,
                    // but grants no lease (I1).
                    let later = view.role == crate::roles::Role::Principal
                        && view.epoch > agent.state().epoch;
                    if !later {
                        agent.renew_lease(sent);
                    }
                    peer_heard(&agent, view);
                }
                Err(ControlError::Refused(reason)) => {
                    agent.set_error(Some(format!(
                        "peer {} refused this partner: {reason}",
                        agent.config.peer
                    )));
                    peer_lost(&agent, &reason);
                    break;
                }
                Err(ControlError::Unexpected { answer, .. }) => {
                    peer_lost(&agent, &format!("unexpected answer {answer}"));
                    break;
                }
                Err(err) => {
                    peer_lost(&agent, &err.to_string());
                    break;
                }
            }
            if !sleep_or_shutdown(&agent, agent.ping_every()).await {
                return;
            }
        }
    }
}

/// Records a ping from or an answer by the peer.
pub fn peer_heard(agent: &Agent, view: PeerView) {
    let mut peer = lock(&agent.peer);
    if !peer.connected {
        info!(peer = %view.name, role = %view.role, epoch = %view.epoch, "peer connected");
    }
    peer.connected = true;
    peer.last_heard = Some(Instant::now());
    peer.view = Some(view);
}

pub fn peer_lost(agent: &Agent, why: &str) {
    let mut peer = lock(&agent.peer);
    if peer.connected {
        warn!("connection with peer {} lost: {why}", agent.config.peer);
        peer.connected = false;
        drop(peer);
        // A black-holed link would keep the stream hanging; close it so the
        // walsender and walreceiver notice at once.
        agent.close_streams();
    }
}
