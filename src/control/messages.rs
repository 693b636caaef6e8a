//! The control protocol's messages: the [`Hello`] that opens every endpoint
//! connection, the [`Request`]s partners, the proxy and the tests send, the
//! [`Response`]s agents and the witness give, and the values they carry.
//!
//! Plain serde types, no IO: `codec` frames them, `client` sends them. The
//! serde attributes are the wire format; changing one breaks a rolling
//! upgrade.

use serde::{Deserialize, Serialize};

use crate::config::Endpoint;
use crate::roles::{Epoch, MirroringState, Role, Safety};
use crate::wire::lsn::Lsn;

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
    /// The identity of the witness this partner last heard, whatever the
    /// address it reaches it at.
    #[serde(default)]
    pub witness_id: Option<u64>,
    /// This partner's queues and rates, sent to the witness (which keeps
    /// them as history samples); None in pings to the peer, which has no
    /// use for them.
    #[serde(default)]
    pub figures: Option<StatusFigures>,
}

/// The monitoring figures of a partner's `MirroringStatus` that the
/// history keeps (spec 63); each is None where the role does not measure it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct StatusFigures {
    #[serde(default)]
    pub send_queue_bytes: Option<u64>,
    #[serde(default)]
    pub redo_queue_bytes: Option<u64>,
    #[serde(default)]
    pub send_rate_bytes_per_sec: Option<f64>,
    #[serde(default)]
    pub redo_rate_bytes_per_sec: Option<f64>,
    #[serde(default)]
    pub mirror_commit_overhead_ms: Option<f64>,
}

impl StatusFigures {
    pub fn of(status: &MirroringStatus) -> StatusFigures {
        StatusFigures {
            send_queue_bytes: status.send_queue_bytes,
            redo_queue_bytes: status.redo_queue_bytes,
            send_rate_bytes_per_sec: status.send_rate_bytes_per_sec,
            redo_rate_bytes_per_sec: status.redo_rate_bytes_per_sec,
            mirror_commit_overhead_ms: status.mirror_commit_overhead_ms,
        }
    }
}

#[cfg(test)]
impl PeerView {
    /// A synchronized partner of session `shop` under FULL, for tests.
    pub fn sample(name: &str, role: Role, epoch: u64) -> PeerView {
        PeerView {
            session: "shop".into(),
            name: name.into(),
            role,
            epoch: Epoch(epoch),
            state: MirroringState::Synchronized,
            safety: Safety::Full,
            timeout_secs: 2,
            suspended: false,
            ended: false,
            system_identifier: Some(7),
            pg_major: 15,
            safety_sequence: 1,
            witness: None,
            witness_id: None,
            figures: None,
        }
    }
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
    /// The identity of the witness that holds this row.
    #[serde(default)]
    pub witness_id: u64,
    /// The principal moved the session to another witness: no promotion is
    /// granted here (I1, I3).
    #[serde(default)]
    pub detached: bool,
    /// Grows with every write of the row at this witness (its history line's
    /// id): a principal records SYNCHRONIZED only on the row it read, so a
    /// late request never undoes a later "not synchronized" (I2).
    #[serde(default)]
    pub version: u64,
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

/// A mirror's request to become principal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromotionRequest {
    pub session: String,
    pub name: String,
    /// The epoch the mirror is at; it asks for the next one.
    pub epoch: Epoch,
    pub kind: PromotionKind,
    pub failover_lsn: Option<Lsn>,
    /// Since the mirror last answered a ping of the principal, on its own
    /// clock; None: not since it started. The principal's lease may have
    /// been renewed by that answer (I1).
    #[serde(default)]
    pub principal_answered_ago_ms: Option<u64>,
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
        /// SYNCHRONIZED is recorded only while the row is still at this
        /// version (the one the principal decided on).
        #[serde(default)]
        based_on: Option<u64>,
    },
    /// A mirror asks to become principal at `epoch` + 1.
    Promote(PromotionRequest),
    /// The principal moves the session to another witness (or none): this
    /// one records the mirror as not synchronized and grants nothing for
    /// the session until its principal records a sync state here again.
    Detach {
        session: String,
        name: String,
        epoch: Epoch,
    },
    /// Every session's row.
    Sessions,
    /// One page of the history view's lines (`crate::history`): role-table
    /// changes and partners' samples of `session` (every session when
    /// None) at or after `since_ms`, oldest first.
    History {
        session: Option<String>,
        since_ms: Option<i64>,
    },
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
    /// An agent's own status samples (kept while its session has no
    /// witness) at or after `since_ms`: one page, oldest first.
    History {
        since_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", content = "body", rename_all = "snake_case")]
pub enum Response {
    Status(Box<MirroringStatus>),
    Pong(PeerView),
    Row(Option<RoleRow>),
    Rows(Vec<RoleRow>),
    History(HistoryPage),
    Done(String),
    /// The command's preconditions do not hold; the reason says what to do.
    Refused(String),
    Failed(String),
}

/// One line of the history view (`sys.database_mirroring_history`): a
/// role-table change recorded by the witness or a partner's status sample.
/// Role, state and safety are their display names (`PRINCIPAL`,
/// `SYNCHRONIZED`, `FULL`), so a reader of another version never fails on
/// a name it does not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HistoryRecord {
    /// Milliseconds since the Unix epoch, on the recorder's clock.
    pub at_ms: i64,
    pub session: String,
    /// The partner's name for a sample, `witness` for a role-table line.
    pub source: String,
    /// `sample`, or the role-table event (e.g. `Automatic Failover`).
    pub kind: String,
    /// Samples: the partner's role, state and safety as it reported them.
    pub role: Option<String>,
    pub state: Option<String>,
    pub safety: Option<String>,
    /// mirroring_role_sequence: the partner's (sample) or the row's.
    pub epoch: Option<u64>,
    /// Role-table lines: the principal and partner_sync_state they record.
    pub principal: Option<String>,
    pub synchronized: Option<bool>,
    pub send_queue_bytes: Option<u64>,
    pub redo_queue_bytes: Option<u64>,
    pub send_rate_bytes_per_sec: Option<f64>,
    pub redo_rate_bytes_per_sec: Option<f64>,
    pub mirror_commit_overhead_ms: Option<f64>,
}

/// Most records in one [`HistoryPage`]. A record with every field set,
/// names of the 63 bytes configs allow and the longest numbers is under
/// 600 bytes of JSON, so a page stays well under `MAX_CONTROL_FRAME`
/// (1 MiB; `history`'s tests check it).
pub const HISTORY_PAGE_RECORDS: usize = 1000;

/// One answer to a history request: at most `history::PAGE_RECORDS`
/// records, oldest first. `next_ms` is where the next page starts, None
/// on the last page; a page ends on a whole millisecond, so paging neither
/// repeats nor skips a line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HistoryPage {
    pub records: Vec<HistoryRecord>,
    pub next_ms: Option<i64>,
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
    /// Set once SET PARTNER OFF ended the session (the mirroring columns
    /// are then NULL): the role and role_sequence this partner held then,
    /// so that the proxy keeps routing to the former principal (I4).
    #[serde(default)]
    pub ended_as: Option<EndedAs>,
}

/// What a partner was when SET PARTNER OFF ended its session (spec 49).
/// An ended partner never takes part in a role switch again, so this is
/// the last role it will ever have had in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedAs {
    pub role: Role,
    pub epoch: Epoch,
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
