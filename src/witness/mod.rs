//! `pgmirror witness`: keeps the role table of every session it serves and
//! arbitrates automatic failover (spec 19-33).
//!
//! Partners ping it with their view; it answers with the session's row and
//! remembers when it last heard each partner. `arbiter` decides, `store`
//! keeps the table durable. The witness holds no state that a restart loses
//! except those heard-times, which restart at the witness's start: a
//! restarted witness waits a full TIMEOUT before it grants a failover.
//! With a `metrics` address it exports each row it answers with and the
//! promotions it grants (`crate::metrics`). The status figures the reports
//! carry go to `crate::history`, off the arbitration's path, and a
//! `History` request reads them back with the role table's history.

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
use crate::history::{self, History, HistoryError, Owner, Retention, Sample};
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
    History(#[from] HistoryError),
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
    /// The reports' status samples, in the store's database.
    samples: History,
}

impl Witness {
    /// The witness over `store`, keeping samples with `retention` in the
    /// same database.
    pub fn new(store: RoleStore, retention: Retention) -> Result<Self, HistoryError> {
        let samples = History::open(store.path(), Owner::Witness, retention)?;
        Ok(Witness {
            store: Mutex::new(store),
            heard: Mutex::new(HashMap::new()),
            started_at: Instant::now(),
            samples,
        })
    }

    fn silent_for(&self, session: &str, name: &str) -> Duration {
        let heard = lock(&self.heard);
        heard
            .get(&(session.to_string(), name.to_string()))
            .copied()
            .unwrap_or(self.started_at)
            .elapsed()
    }

    /// Decides on the session's row and writes the change in one store
    /// transaction, under the store's lock (I1-I3).
    fn decide(
        &self,
        session: &str,
        decide: impl FnOnce(Option<&RoleRow>) -> Result<Option<Change>, String>,
    ) -> Result<Result<Option<RoleRow>, String>, StoreError> {
        let mut event = None;
        let outcome = lock(&self.store).update(session, |row| {
            let change = decide(row)?;
            event = change.as_ref().map(|change| change.event);
            Ok(change)
        })?;
        if let (Some(event), Ok(Some(row))) = (event, &outcome) {
            info!(
                session = %row.session,
                principal = %row.principal,
                epoch = %row.epoch,
                synchronized = row.synchronized,
                "{event}"
            );
        }
        Ok(outcome)
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
        let answer = |outcome: Result<Option<RoleRow>, String>| match outcome {
            Ok(row) => Response::Row(row),
            Err(reason) => Response::Refused(reason),
        };
        match request {
            WitnessRequest::Report { view } => {
                self.heard(&view.session, &view.name);
                let outcome =
                    self.decide(&view.session, |row| Ok(arbiter::on_report(row, &view)))?;
                if outcome.is_ok() {
                    self.samples.offer(Sample::of(&view, history::now_ms()));
                }
                Ok(answer(outcome))
            }
            WitnessRequest::SetSynchronized {
                session,
                name,
                epoch,
                synchronized,
                based_on,
            } => {
                self.heard(&session, &name);
                let outcome = self.decide(&session, |row| {
                    arbiter::set_synchronized(row, &name, epoch, synchronized, based_on).map(Some)
                })?;
                Ok(answer(outcome))
            }
            WitnessRequest::Promote(request) => {
                self.heard(&request.session, &request.name);
                let outcome = self.decide(&request.session, |row| {
                    let silent = row
                        .map(|row| self.silent_for(&request.session, &row.principal))
                        .unwrap_or_default();
                    arbiter::promote(row, &request, silent).map(Some)
                })?;
                match &outcome {
                    Ok(_) => crate::metrics::count_witness_promotion(
                        &request.session,
                        &request.name,
                        request.kind,
                    ),
                    Err(reason) => debug!(
                        session = %request.session,
                        name = %request.name,
                        kind = ?request.kind,
                        "promotion refused: {reason}"
                    ),
                }
                Ok(answer(outcome))
            }
            WitnessRequest::Detach {
                session,
                name,
                epoch,
            } => {
                self.heard(&session, &name);
                let outcome = self.decide(&session, |row| arbiter::detach(row, &name, epoch))?;
                Ok(answer(outcome))
            }
            WitnessRequest::Sessions => Ok(Response::Rows(lock(&self.store).all()?)),
            // A page read on a connection of its own: the store's lock,
            // which every ping takes, is not held meanwhile.
            WitnessRequest::History { session, since_ms } => {
                Ok(match self.samples.page(session.as_deref(), since_ms) {
                    Ok(page) => Response::History(page),
                    Err(err) => {
                        warn!("{err}");
                        Response::Failed(err.to_string())
                    }
                })
            }
        }
    }

    /// Records that a partner was heard now: a round trip it sent earlier
    /// is being answered (I1: the principal's lease started before this).
    fn heard(&self, session: &str, name: &str) {
        lock(&self.heard).insert((session.to_string(), name.to_string()), Instant::now());
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
    let retention = Retention::new(config.history_sample_secs, config.history_retention_days);
    let witness = Arc::new(Witness::new(RoleStore::open(&config.store)?, retention)?);
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
    let endpoint = listener.local_addr().unwrap_or(config.listen.0);
    info!(%endpoint, store = %config.store.display(), "witness started");
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
