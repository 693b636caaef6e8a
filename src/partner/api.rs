//! The partner agent's typed control API, served on its mirroring endpoint:
//! commands (SUSPEND, FAILOVER, ...), status, and the agent-to-agent pings.
//!
//! Every connection to an endpoint opens with a [`Hello`] saying what it
//! carries: a control conversation (length-prefixed JSON requests and
//! responses, one at a time) or a relayed PostgreSQL connection (the log
//! shipper, see `shipper::relay`). Reads are cancel-safe only between frames;
//! callers drop the whole connection on timeout.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Endpoint;
use crate::roles::{Epoch, MirroringState, Role, Safety};
use crate::tls::{BoxedStream, EndpointTls};
use crate::wire::lsn::Lsn;

/// Largest control frame accepted; status and commands are far smaller.
pub const MAX_CONTROL_FRAME: u32 = 1 << 20;

/// How long a control request may take before the caller gives up. A
/// manual failover waits for the mirror to drain, hence the margin.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// First frame on every endpoint connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "hello", rename_all = "snake_case")]
pub enum Hello {
    /// Requests and responses follow.
    Control,
    /// A relayed PostgreSQL connection to the principal follows, compressed.
    Stream {
        session: String,
        purpose: StreamPurpose,
    },
}

/// What a relayed PostgreSQL connection is for; only the mirror's WAL
/// stream feeds the send/redo positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamPurpose {
    /// The mirror's walreceiver.
    Wal,
    /// pg_basebackup or pg_rewind.
    Tool,
}

/// The reference's `ALTER DATABASE ... SET PARTNER` options (spec 50) that
/// an agent carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", content = "value", rename_all = "snake_case")]
pub enum Command {
    Suspend,
    Resume,
    Safety(Safety),
    Timeout(u64),
    Failover,
    ForceServiceAllowDataLoss,
    Off,
    /// SET WITNESS = 'addr' (Some) or SET WITNESS OFF (None), spec 55.
    Witness(Option<Endpoint>),
}

/// What one partner tells the other on every ping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub session: String,
    pub name: String,
    pub role: Role,
    pub epoch: Epoch,
    pub state: MirroringState,
    pub safety: Safety,
    pub timeout_secs: u64,
    pub suspended: bool,
    pub ended: bool,
    /// None until this partner holds a copy of the database.
    pub system_identifier: Option<u64>,
    /// The PostgreSQL major version of this partner's binaries.
    pub pg_major: u32,
    // Defaults keep pings working with an agent of the previous version
    // during a rolling upgrade.
    #[serde(default)]
    pub safety_sequence: u64,
    /// The session's witness (set on the principal, spec 54-55).
    #[serde(default)]
    pub witness: Option<Endpoint>,
}

/// The witness's row for one session (spec 3), changed only by
/// compare-and-set on `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRow {
    pub session: String,
    pub principal: String,
    pub mirror: Option<String>,
    pub epoch: Epoch,
    pub safety: Safety,
    pub safety_sequence: u64,
    pub suspended: bool,
    /// partner_sync_state: the principal waits for the mirror's flush. The
    /// principal clears it here before it runs exposed (I2); only a row
    /// with it set allows automatic failover (I3).
    pub synchronized: bool,
    pub timeout_secs: u64,
    pub failover_lsn: Option<Lsn>,
}

/// Why a mirror asks the witness to make it principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionKind {
    /// The witness and the mirror both lost the principal (spec 31-32).
    Automatic,
    /// The principal handed over (spec 37-38).
    Manual,
    /// FORCE_SERVICE_ALLOW_DATA_LOSS (spec 39-40).
    Forced,
    /// The principal's PostgreSQL failed and its agent handed over to the
    /// synchronized mirror: an automatic failover asked for by the principal.
    Handover,
}

/// What partners ask of the witness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "witness", rename_all = "snake_case")]
pub enum WitnessRequest {
    /// A ping: the partner's view; answered with the session's row.
    Report { view: PeerView },
    /// The principal records whether commits wait for the mirror.
    SetSynchronized {
        session: String,
        name: String,
        epoch: Epoch,
        synchronized: bool,
    },
    /// A mirror asks to become principal at `epoch` + 1.
    Promote {
        session: String,
        name: String,
        epoch: Epoch,
        kind: PromotionKind,
        failover_lsn: Option<Lsn>,
    },
    /// Every session's row.
    Sessions,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", content = "body", rename_all = "snake_case")]
pub enum Request {
    Status,
    Command(Command),
    Ping(PeerView),
    /// Manual failover, principal to mirror: become principal at `epoch`
    /// once everything up to `failover_lsn` has arrived.
    TakeOver {
        epoch: Epoch,
        failover_lsn: Lsn,
        kind: PromotionKind,
    },
    Witness(WitnessRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", content = "body", rename_all = "snake_case")]
pub enum Response {
    Status(Box<MirroringStatus>),
    Pong(PeerView),
    Row(Option<RoleRow>),
    Rows(Vec<RoleRow>),
    Done(String),
    /// The command's preconditions do not hold; the reason says what to do.
    Refused(String),
    Failed(String),
}

/// One partner's row of `sys.database_mirroring` (spec 2) plus the
/// monitoring figures of spec 63. Mirroring columns are None once the
/// session has ended (spec 1, 49).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MirroringStatus {
    pub database_name: String,
    pub server_name: String,
    pub mirroring_guid: Option<String>,
    pub mirroring_state: Option<i32>,
    pub mirroring_state_desc: Option<String>,
    pub mirroring_role: Option<i32>,
    pub mirroring_role_desc: Option<String>,
    pub mirroring_role_sequence: Option<u64>,
    pub mirroring_safety_level: Option<i32>,
    pub mirroring_safety_level_desc: Option<String>,
    pub mirroring_safety_sequence: Option<u64>,
    pub mirroring_partner_name: Option<String>,
    pub mirroring_partner_instance: Option<String>,
    pub mirroring_witness_name: Option<String>,
    pub mirroring_witness_state: Option<i32>,
    pub mirroring_witness_state_desc: Option<String>,
    pub mirroring_failover_lsn: Option<Lsn>,
    pub mirroring_connection_timeout: Option<u64>,
    pub mirroring_redo_queue: Option<u64>,
    pub mirroring_redo_queue_type: Option<String>,
    pub mirroring_end_of_log_lsn: Option<Lsn>,
    pub mirroring_replication_lsn: Option<Lsn>,
    /// The PostgreSQL address clients reach this partner at.
    pub postgres_address: String,
    pub send_queue_bytes: Option<u64>,
    pub redo_queue_bytes: Option<u64>,
    pub send_rate_bytes_per_sec: Option<f64>,
    pub redo_rate_bytes_per_sec: Option<f64>,
    pub mirror_commit_overhead_ms: Option<f64>,
    pub link_bytes_raw: u64,
    pub link_bytes_compressed: u64,
    pub peer_connected: bool,
    /// The last problem the agent could not resolve by itself.
    pub last_error: Option<String>,
}

impl MirroringStatus {
    pub fn role(&self) -> Option<Role> {
        match self.mirroring_role {
            Some(1) => Some(Role::Principal),
            Some(2) => Some(Role::Mirror),
            _ => None,
        }
    }

    pub fn state(&self) -> Option<&str> {
        self.mirroring_state_desc.as_deref()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connection to {endpoint} failed: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {0} bytes exceeds the {MAX_CONTROL_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed control frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Writes one length-prefixed JSON frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    value: &T,
) -> Result<(), ApiError> {
    let body = serde_json::to_vec(value)?;
    let len = u32::try_from(body.len()).map_err(|_| ApiError::TooLarge(u32::MAX))?;
    if len > MAX_CONTROL_FRAME {
        return Err(ApiError::TooLarge(len));
    }
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(&body).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one length-prefixed JSON frame; None at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<Option<T>, ApiError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_CONTROL_FRAME {
        return Err(ApiError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Opens an endpoint connection (TCP, then TLS when on) and says hello.
pub async fn open(
    endpoint: &Endpoint,
    tls: &EndpointTls,
    hello: &Hello,
    limit: Duration,
) -> Result<BoxedStream, ApiError> {
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        tcp.set_nodelay(true)?;
        let mut stream = tls.connect(tcp, &endpoint.host).await?;
        write_frame(&mut stream, hello)
            .await
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        Ok(stream)
    };
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ApiError::Connect {
            endpoint: endpoint.to_string(),
            source,
        }),
        Err(_) => Err(ApiError::Timeout(limit)),
    }
}

/// A control connection to one agent: the typed API the admin console,
/// the peer agent and the tests call.
pub struct ControlClient {
    stream: BoxedStream,
}

impl ControlClient {
    pub async fn connect(endpoint: &Endpoint, tls: &EndpointTls) -> Result<Self, ApiError> {
        let stream = open(endpoint, tls, &Hello::Control, Duration::from_secs(10)).await?;
        Ok(ControlClient { stream })
    }

    /// Sends one request and waits up to `limit` for its response.
    pub async fn call_within(
        &mut self,
        request: &Request,
        limit: Duration,
    ) -> Result<Response, ApiError> {
        let exchange = async {
            write_frame(&mut self.stream, request).await?;
            read_frame(&mut self.stream).await?.ok_or_else(|| {
                ApiError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection",
                ))
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ApiError::Timeout(limit))?
    }

    pub async fn call(&mut self, request: &Request) -> Result<Response, ApiError> {
        self.call_within(request, REQUEST_TIMEOUT).await
    }

    pub async fn status(&mut self) -> Result<MirroringStatus, ApiError> {
        match self.call(&Request::Status).await? {
            Response::Status(status) => Ok(*status),
            other => Err(ApiError::Io(std::io::Error::other(format!(
                "unexpected answer to status: {other:?}"
            )))),
        }
    }

    pub async fn command(&mut self, command: Command) -> Result<Response, ApiError> {
        self.call(&Request::Command(command)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let request = Request::Command(Command::Safety(Safety::Off));
        write_frame(&mut a, &request).await.unwrap();
        assert_eq!(
            read_frame::<_, Request>(&mut b).await.unwrap(),
            Some(request)
        );
        a.write_all(&(MAX_CONTROL_FRAME + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            read_frame::<_, Request>(&mut b).await,
            Err(ApiError::TooLarge(_))
        ));
        drop(a);
        assert_eq!(read_frame::<_, Request>(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn garbage_is_a_malformed_frame_not_a_panic() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{{{{{").await.unwrap();
        assert!(matches!(
            read_frame::<_, Request>(&mut b).await,
            Err(ApiError::Malformed(_))
        ));
    }
}
