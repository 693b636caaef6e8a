//! The agent's health endpoints: a small HTTP/1.1 server on the partner's
//! `health` address, beside the metrics exporter, for load balancers such
//! as HAProxy (`GET /primary`, `/replica[?lag=BYTES]`, `/synchronized`,
//! `/health`, `/status`). Each request gathers the agent's facts afresh and
//! lets `policy::health::answer` decide; the body is always the node's
//! `sys.database_mirroring` row as JSON, as Patroni's REST API answers.
//!
//! [`serve_health`] takes an already-bound listener, takes a permit before
//! each accept, bounds every connection's life and stops accepting when
//! the agent shuts down; cancelling it drops connections in flight, which
//! hold nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::partner::agent::Agent;
use crate::partner::policy::health::{answer, Check, Local, Server};
use crate::partner::quorum::observe_without_sql;
use crate::sync::lock;

/// Health checkers are few; more connections than this wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// A checker sends its request at once.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, kept-alive requests included.
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// Serves the health endpoints until the agent shuts down.
pub async fn serve_health(agent: Arc<Agent>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => tokio::select! {
                    accepted = listener.accept() => accepted.map(|(stream, _)| (stream, permit)),
                    _ = agent.shutdown.cancelled() => return,
                },
                Err(_) => return,
            },
            _ = agent.shutdown.cancelled() => return,
        };
        let (stream, permit) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                debug!("health endpoint: accept failed: {err}");
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(|request| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(respond(&agent, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A checker that overstays is cut off: nothing is lost.
            if let Ok(Err(err)) = tokio::time::timeout(CONNECTION_LIMIT, connection).await {
                debug!("health endpoint: {err}");
            }
        });
    }
}

/// One request's answer, with the node's status row as its body.
fn respond(agent: &Agent, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n".into());
    }
    let check = match Check::parse(request.uri().path(), request.uri().query()) {
        Ok(check) => check,
        Err(err) => return plain(err.status(), format!("{err}\n")),
    };
    let state = agent.state();
    let observed = observe_without_sql(agent);
    let status = agent.status();
    let local = Local {
        // A reading is only as good as the postmaster still running.
        server: match agent.engine.postmaster_pid() {
            Some(_) => lock(&agent.observed).server,
            None => Server::Down,
        },
        redo_queue: status.redo_queue_bytes,
        pending_failover: agent
            .pending_failover
            .load(std::sync::atomic::Ordering::SeqCst),
    };
    let code = answer(check, &state, &observed, &local);
    let mut body = serde_json::to_vec(&status).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(code: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = code;
    response
}
