//! The control protocol every pgmirror process speaks over the mirroring
//! endpoints: partners ping each other and the witness, the proxy polls
//! status and sends admin commands, the tests drive both.
//!
//! Every connection opens with a [`Hello`] saying what it carries: a
//! control conversation (length-prefixed JSON requests and responses, one
//! at a time) or a relayed PostgreSQL connection (the log shipper, see
//! `shipper::relay`). `messages` holds the types (the wire format),
//! `codec` the framing, `client` the typed client. The servers (the
//! partner agent's endpoint, the witness) answer with [`ControlStream`];
//! what they answer is theirs to decide.

pub mod client;
pub mod codec;
pub mod messages;

use std::time::Duration;

pub use client::{ControlClient, REQUEST_TIMEOUT};
pub use codec::{read_hello, ControlStream, MAX_CONTROL_FRAME};
pub use messages::{
    Command, EndedAs, Hello, HistoryPage, HistoryRecord, MirroringStatus, PeerView, PromotionKind,
    PromotionRequest, Request, Response, RoleRow, StatusFigures, StreamPurpose, WitnessRequest,
};

/// Why a control exchange did not give the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
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
    /// The peer would not: the request's preconditions do not hold, and the
    /// reason says what to do.
    #[error("refused: {0}")]
    Refused(String),
    /// The peer tried and failed.
    #[error("failed: {0}")]
    Failed(String),
    /// An answer of the wrong kind, printed as received.
    #[error("unexpected answer to {request}: {answer}")]
    Unexpected {
        request: &'static str,
        answer: String,
    },
}
