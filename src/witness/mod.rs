//! `pgmirror witness`: keeps the role table of every session it serves and
//! arbitrates automatic failover (spec 19-33).
//!
//! Partners ping it with their view; it answers with the session's row and
//! remembers when it last heard each partner. `arbiter` decides, `store`
//! keeps the table durable. The witness holds no state that a restart loses
//! except those heard-times, which restart at the witness's start: a
//! restarted witness waits a full TIMEOUT before it grants a failover.
//! With a `metrics` address it exports each row it answers with and the
//! promotions it grants (`crate::metrics`).

pub mod arbiter;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::WitnessConfig;
use crate::control::{
    read_hello, ControlError, ControlStream, Hello, Request, Response, RoleRow, WitnessRequest,
};
use crate::sync::lock;
use crate::tls::EndpointTls;
use arbiter::Change;
use store::{RoleStore, StoreError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The running witness, shared by its connection tasks.
pub struct Witness {
    store: Mutex<RoleStore>,
    /// When each (session, partner) was last heard.
    heard: Mutex<HashMap<(String, String), Instant>>,
    started_at: Instant,
}

impl Witness {
    pub fn new(store: RoleStore) -> Self {
        Witness {
            store: Mutex::new(store),
            heard: Mutex::new(HashMap::new()),
            started_at: Instant::now(),
        }
    }

    fn silent_for(&self, session: &str, name: &str) -> Duration {
        let heard = lock(&self.heard);
        heard
            .get(&(session.to_string(), name.to_string()))
            .copied()
            .unwrap_or(self.started_at)
            .elapsed()
    }

    fn write(
        &self,
        expected: Option<crate::roles::Epoch>,
        change: &Change,
    ) -> Result<bool, StoreError> {
        let written = lock(&self.store).compare_and_set(expected, &change.row, change.event)?;
        if written {
            info!(
                session = %change.row.session,
                principal = %change.row.principal,
                epoch = %change.row.epoch,
                synchronized = change.row.synchronized,
                "{}",
                change.event
            );
        }
        Ok(written)
    }

    /// Answers one request.
    pub fn handle(&self, request: WitnessRequest) -> Response {
        match self.try_handle(request) {
            Ok(response) => {
                if let Response::Row(Some(row)) = &response {
                    crate::metrics::record_witness_row(row);
                }
                response
            }
            Err(err) => {
                warn!("role table: {err}");
                Response::Failed(err.to_string())
            }
        }
    }

    fn try_handle(&self, request: WitnessRequest) -> Result<Response, StoreError> {
        match request {
            WitnessRequest::Report { view } => {
                lock(&self.heard).insert((view.session.clone(), view.name.clone()), Instant::now());
                let row = lock(&self.store).get(&view.session)?;
                if let Some(change) = arbiter::on_report(row.as_ref(), &view) {
                    self.write(row.as_ref().map(|row| row.epoch), &change)?;
                }
                Ok(Response::Row(lock(&self.store).get(&view.session)?))
            }
            WitnessRequest::SetSynchronized {
                session,
                name,
                epoch,
                synchronized,
            } => {
                lock(&self.heard).insert((session.clone(), name.clone()), Instant::now());
                let row = lock(&self.store).get(&session)?;
                self.decide(
                    row.as_ref(),
                    arbiter::set_synchronized(row.as_ref(), &name, epoch, synchronized),
                )
            }
            WitnessRequest::Promote {
                session,
                name,
                epoch,
                kind,
                failover_lsn,
            } => {
                lock(&self.heard).insert((session.clone(), name.clone()), Instant::now());
                let row = lock(&self.store).get(&session)?;
                let silent = row
                    .as_ref()
                    .map(|row| self.silent_for(&session, &row.principal))
                    .unwrap_or_default();
                let verdict =
                    arbiter::promote(row.as_ref(), &name, epoch, kind, failover_lsn, silent);
                if let Err(reason) = &verdict {
                    debug!(%session, %name, ?kind, "promotion refused: {reason}");
                }
                let response = self.decide(row.as_ref(), verdict)?;
                if matches!(response, Response::Row(Some(_))) {
                    crate::metrics::count_witness_promotion(&session, &name, kind);
                }
                Ok(response)
            }
            WitnessRequest::Sessions => Ok(Response::Rows(lock(&self.store).all()?)),
        }
    }

    fn decide(
        &self,
        row: Option<&RoleRow>,
        verdict: Result<Change, String>,
    ) -> Result<Response, StoreError> {
        match verdict {
            Err(reason) => Ok(Response::Refused(reason)),
            Ok(change) => {
                if self.write(row.map(|row| row.epoch), &change)? {
                    Ok(Response::Row(Some(change.row)))
                } else {
                    Ok(Response::Refused(
                        "the role table changed meanwhile; retry".into(),
                    ))
                }
            }
        }
    }

    /// The role table's history of one session, oldest first.
    pub fn history(&self, session: &str) -> Result<Vec<store::HistoryEntry>, StoreError> {
        lock(&self.store).history(session)
    }
}

/// Runs the witness until `shutdown` is cancelled.
pub async fn run(config: WitnessConfig, shutdown: CancellationToken) -> Result<(), WitnessError> {
    let tls = EndpointTls::from_config(&config.tls)?;
    if let Some(parent) = config.store.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let witness = Arc::new(Witness::new(RoleStore::open(&config.store)?));
    if let Some(metrics) = config.metrics {
        crate::metrics::serve(metrics.0)?;
        for row in lock(&witness.store).all()? {
            crate::metrics::record_witness_row(&row);
        }
    }
    let listener =
        TcpListener::bind(config.listen.0)
            .await
            .map_err(|source| WitnessError::Bind {
                addr: config.listen.0,
                source,
            })?;
    info!(endpoint = %config.listen.0, store = %config.store.display(), "witness started");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match accepted {
            Ok((tcp, from)) => {
                let (witness, tls) = (witness.clone(), tls.clone());
                tokio::spawn(async move {
                    if let Err(err) = serve(&witness, &tls, tcp).await {
                        debug!(%from, "witness connection ended: {err}");
                    }
                });
            }
            Err(err) => {
                warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(witness: &Witness, tls: &EndpointTls, tcp: TcpStream) -> Result<(), ControlError> {
    tcp.set_nodelay(true)?;
    let handshake = async {
        let mut stream = tls.accept(tcp).await?;
        let hello = read_hello(&mut stream).await?;
        Ok::<_, ControlError>((stream, hello))
    };
    let (stream, hello) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ControlError::Timeout(HANDSHAKE_TIMEOUT))??;
    if hello != Some(Hello::Control) {
        return Ok(());
    }
    let mut stream = ControlStream::new(stream);
    while let Some(request) = stream.recv::<Request>().await? {
        let response = match request {
            Request::Witness(request) => witness.handle(request),
            other => Response::Refused(format!(
                "this is a witness; it answers witness requests only, not {other:?}"
            )),
        };
        stream.send(&response).await?;
    }
    Ok(())
}
