//! The control protocol's client side: [`open`] makes an endpoint
//! connection and says hello, [`ControlClient`] asks one typed question at
//! a time of an agent (status, ping, commands, take-over) or of the witness
//! (report, set-synchronized, promote, sessions).
//!
//! Each method turns the answer it expects into its value and every other
//! answer into a [`ControlError`]: `Refused` and `Failed` keep the peer's
//! reason, anything else is `Unexpected`. What a refusal means is left to
//! the caller. No method is cancel-safe: a caller that gives up on one
//! (every method has a time limit) drops the client.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::Endpoint;
use crate::control::codec::ControlStream;
use crate::control::messages::{
    Command, Hello, HistoryRecord, MirroringStatus, PeerView, PromotionKind, PromotionRequest,
    Request, Response, RoleRow, WitnessRequest,
};
use crate::control::ControlError;
use crate::roles::Epoch;
use crate::tls::{BoxedStream, EndpointTls};
use crate::wire::lsn::Lsn;

/// How long a control request may take before the caller gives up. A
/// manual failover waits for the mirror to drain, hence the margin.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Most records a history read returns; past it the oldest are dropped
/// (a week of 15 s samples of one pair is about 81,000).
pub const MAX_HISTORY_RECORDS: usize = 100_000;

/// How long [`ControlClient::connect`] waits for TCP, TLS and the hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens an endpoint connection (TCP, then TLS when on) and says hello;
/// the connection is raw again after the hello.
pub async fn open(
    endpoint: &Endpoint,
    tls: &EndpointTls,
    hello: &Hello,
    limit: Duration,
) -> Result<BoxedStream, ControlError> {
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        tcp.set_nodelay(true)?;
        let stream = tls.connect(tcp, &endpoint.host).await?;
        let mut framed = ControlStream::new(stream);
        framed
            .send(hello)
            .await
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        Ok(framed.into_inner())
    };
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ControlError::Connect {
            endpoint: endpoint.to_string(),
            source,
        }),
        Err(_) => Err(ControlError::Timeout(limit)),
    }
}

/// The peer's error answers become errors; any other answer was not the
/// one `request` expects.
fn not_expected(request: &'static str, answer: Response) -> ControlError {
    match answer {
        Response::Refused(reason) => ControlError::Refused(reason),
        Response::Failed(reason) => ControlError::Failed(reason),
        other => ControlError::Unexpected {
            request,
            answer: format!("{other:?}"),
        },
    }
}

/// A control connection to one agent or witness: the typed API the admin
/// console, the proxy, the peer agent and the tests call.
///
/// Created by [`ControlClient::connect`] and dropped by its caller, which
/// may keep it for many requests (the proxy's status polls, the pings).
pub struct ControlClient {
    stream: ControlStream<BoxedStream>,
}

impl ControlClient {
    pub async fn connect(endpoint: &Endpoint, tls: &EndpointTls) -> Result<Self, ControlError> {
        let stream = open(endpoint, tls, &Hello::Control, CONNECT_TIMEOUT).await?;
        Ok(ControlClient {
            stream: ControlStream::new(stream),
        })
    }

    /// Sends one request and waits up to `limit` for its response.
    async fn call_within(
        &mut self,
        request: &Request,
        limit: Duration,
    ) -> Result<Response, ControlError> {
        let exchange = async {
            self.stream.send(request).await?;
            self.stream.recv().await?.ok_or_else(|| {
                ControlError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection",
                ))
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ControlError::Timeout(limit))?
    }

    /// The agent's row of `sys.database_mirroring`.
    pub async fn status(&mut self) -> Result<MirroringStatus, ControlError> {
        self.status_within(REQUEST_TIMEOUT).await
    }

    pub async fn status_within(
        &mut self,
        limit: Duration,
    ) -> Result<MirroringStatus, ControlError> {
        match self.call_within(&Request::Status, limit).await? {
            Response::Status(status) => Ok(*status),
            other => Err(not_expected("status", other)),
        }
    }

    /// Tells the peer agent this partner's view; answered with the peer's.
    pub async fn ping(&mut self, view: PeerView) -> Result<PeerView, ControlError> {
        self.ping_within(view, REQUEST_TIMEOUT).await
    }

    pub async fn ping_within(
        &mut self,
        view: PeerView,
        limit: Duration,
    ) -> Result<PeerView, ControlError> {
        match self.call_within(&Request::Ping(view), limit).await? {
            Response::Pong(view) => Ok(view),
            other => Err(not_expected("ping", other)),
        }
    }

    /// Carries out an `ALTER DATABASE ... SET PARTNER` option; Ok is the
    /// agent's message saying what it did.
    pub async fn command(&mut self, command: Command) -> Result<String, ControlError> {
        match self
            .call_within(&Request::Command(command), REQUEST_TIMEOUT)
            .await?
        {
            Response::Done(message) => Ok(message),
            other => Err(not_expected("command", other)),
        }
    }

    /// Manual failover or handover: asks the mirror to become principal at
    /// `epoch` once it has everything up to `failover_lsn`.
    pub async fn take_over(
        &mut self,
        epoch: Epoch,
        failover_lsn: Lsn,
        kind: PromotionKind,
        limit: Duration,
    ) -> Result<String, ControlError> {
        let request = Request::TakeOver {
            epoch,
            failover_lsn,
            kind,
        };
        match self.call_within(&request, limit).await? {
            Response::Done(message) => Ok(message),
            other => Err(not_expected("take_over", other)),
        }
    }

    /// Witness: a partner's ping; answered with the session's row.
    pub async fn report(&mut self, view: PeerView) -> Result<Option<RoleRow>, ControlError> {
        self.report_within(view, REQUEST_TIMEOUT).await
    }

    pub async fn report_within(
        &mut self,
        view: PeerView,
        limit: Duration,
    ) -> Result<Option<RoleRow>, ControlError> {
        let request = Request::Witness(WitnessRequest::Report { view });
        match self.call_within(&request, limit).await? {
            Response::Row(row) => Ok(row),
            other => Err(not_expected("report", other)),
        }
    }

    /// Witness: the principal records whether its commits wait for the
    /// mirror (SYNCHRONIZED only on the row version `based_on`, when given);
    /// answered with the session's row.
    pub async fn set_synchronized_within(
        &mut self,
        session: String,
        name: String,
        epoch: Epoch,
        synchronized: bool,
        based_on: Option<u64>,
        limit: Duration,
    ) -> Result<Option<RoleRow>, ControlError> {
        let request = Request::Witness(WitnessRequest::SetSynchronized {
            session,
            name,
            epoch,
            synchronized,
            based_on,
        });
        match self.call_within(&request, limit).await? {
            Response::Row(row) => Ok(row),
            other => Err(not_expected("set_synchronized", other)),
        }
    }

    /// Witness: the principal leaves this witness (SET WITNESS elsewhere or
    /// OFF); Ok is the detached row.
    pub async fn detach_within(
        &mut self,
        session: String,
        name: String,
        epoch: Epoch,
        limit: Duration,
    ) -> Result<Option<RoleRow>, ControlError> {
        let request = Request::Witness(WitnessRequest::Detach {
            session,
            name,
            epoch,
        });
        match self.call_within(&request, limit).await? {
            Response::Row(row) => Ok(row),
            other => Err(not_expected("detach", other)),
        }
    }

    /// Witness: a mirror asks to become principal at `epoch` + 1; Ok is
    /// the row that makes it so, a refusal is `ControlError::Refused`.
    pub async fn promote_within(
        &mut self,
        request: PromotionRequest,
        limit: Duration,
    ) -> Result<RoleRow, ControlError> {
        let request = Request::Witness(WitnessRequest::Promote(request));
        match self.call_within(&request, limit).await? {
            Response::Row(Some(row)) => Ok(row),
            other => Err(not_expected("promote", other)),
        }
    }

    /// Witness: the history view's lines (role-table changes and partners'
    /// samples) of `session`, or of every session, at or after `since_ms`,
    /// oldest first; at most [`MAX_HISTORY_RECORDS`], the newest.
    pub async fn witness_history(
        &mut self,
        session: Option<String>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HistoryRecord>, ControlError> {
        self.history_pages("witness_history", since_ms, |since_ms| {
            Request::Witness(WitnessRequest::History {
                session: session.clone(),
                since_ms,
            })
        })
        .await
    }

    /// Agent: its own status samples (kept while the session has no
    /// witness) at or after `since_ms`, as [`ControlClient::witness_history`].
    pub async fn history(
        &mut self,
        since_ms: Option<i64>,
    ) -> Result<Vec<HistoryRecord>, ControlError> {
        self.history_pages("history", since_ms, |since_ms| Request::History {
            since_ms,
        })
        .await
    }

    /// Asks for pages until the last one, keeping the newest
    /// [`MAX_HISTORY_RECORDS`].
    async fn history_pages(
        &mut self,
        name: &'static str,
        mut since_ms: Option<i64>,
        request: impl Fn(Option<i64>) -> Request,
    ) -> Result<Vec<HistoryRecord>, ControlError> {
        let mut records = VecDeque::new();
        loop {
            let page = match self
                .call_within(&request(since_ms), REQUEST_TIMEOUT)
                .await?
            {
                Response::History(page) => page,
                other => return Err(not_expected(name, other)),
            };
            records.extend(page.records);
            let excess = records.len().saturating_sub(MAX_HISTORY_RECORDS);
            records.drain(..excess);
            match page.next_ms {
                None => return Ok(records.into()),
                // A next page that does not move on would be asked forever.
                Some(next) if since_ms.is_some_and(|since| next <= since) => {
                    return Err(ControlError::Unexpected {
                        request: name,
                        answer: format!("a page ending at {next}, asked from {since_ms:?}"),
                    })
                }
                Some(next) => since_ms = Some(next),
            }
        }
    }

    /// Witness: every session's row.
    pub async fn sessions(&mut self) -> Result<Vec<RoleRow>, ControlError> {
        match self
            .call_within(&Request::Witness(WitnessRequest::Sessions), REQUEST_TIMEOUT)
            .await?
        {
            Response::Rows(rows) => Ok(rows),
            other => Err(not_expected("sessions", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;
    use crate::roles::Safety;

    /// A client whose peer answers every request with `answer`.
    fn client_answering(answer: Response) -> ControlClient {
        let (near, far) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut far: ControlStream<DuplexStream> = ControlStream::new(far);
            while let Ok(Some(_)) = far.recv::<Request>().await {
                if far.send(&answer).await.is_err() {
                    return;
                }
            }
        });
        ControlClient {
            stream: ControlStream::new(Box::new(near)),
        }
    }

    #[tokio::test]
    async fn a_command_answer_is_its_message_or_a_typed_refusal() {
        let mut client = client_answering(Response::Done("suspended".into()));
        assert_eq!(client.command(Command::Suspend).await.unwrap(), "suspended");
        let mut client = client_answering(Response::Refused("not now".into()));
        assert!(matches!(
            client.command(Command::Safety(Safety::Off)).await,
            Err(ControlError::Refused(reason)) if reason == "not now"
        ));
        let mut client = client_answering(Response::Failed("pg_ctl".into()));
        assert!(matches!(
            client.command(Command::Resume).await,
            Err(ControlError::Failed(reason)) if reason == "pg_ctl"
        ));
    }

    #[tokio::test]
    async fn an_answer_of_the_wrong_kind_names_the_request_and_the_answer() {
        let mut client = client_answering(Response::Rows(Vec::new()));
        let err = client.status().await.unwrap_err();
        assert!(matches!(
            err,
            ControlError::Unexpected {
                request: "status",
                ..
            }
        ));
        assert_eq!(err.to_string(), "unexpected answer to status: Rows([])");
        let mut client = client_answering(Response::Row(None));
        assert!(matches!(
            client
                .promote_within(
                    PromotionRequest {
                        session: "shop".into(),
                        name: "beta".into(),
                        epoch: Epoch(1),
                        kind: PromotionKind::Manual,
                        failover_lsn: None,
                        principal_answered_ago_ms: None,
                    },
                    REQUEST_TIMEOUT
                )
                .await,
            Err(ControlError::Unexpected {
                request: "promote",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_closed_connection_is_an_error_not_an_answer() {
        let (near, far) = tokio::io::duplex(4096);
        drop(far);
        let mut client = ControlClient {
            stream: ControlStream::new(Box::new(near)),
        };
        assert!(matches!(client.sessions().await, Err(ControlError::Io(_))));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (near, _far) = tokio::io::duplex(4096);
        let mut client = ControlClient {
            stream: ControlStream::new(Box::new(near)),
        };
        let limit = Duration::from_millis(50);
        assert!(matches!(
            client.status_within(limit).await,
            Err(ControlError::Timeout(waited)) if waited == limit
        ));
    }
}
