//! The shared vocabulary of a mirroring session: safety levels, roles and the
//! epoch, used by the agents, the witness and the proxy alike.
//!
//! Pure data; no IO.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How commits wait for the mirror (spec 13-16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Safety {
    /// Synchronous: a commit returns once the mirror flushed its WAL.
    #[default]
    Full,
    /// Asynchronous: a commit returns once the principal flushed its WAL.
    Off,
}

/// What a partner is in its session (spec 2, `mirroring_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Principal,
    Mirror,
}

/// `mirroring_state` of spec 2 and 4-11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MirroringState {
    /// Paused, forced service, or an old principal back after forced
    /// service: no WAL moves until RESUME (spec 6).
    Suspended,
    /// The partners cannot reach each other (spec 8).
    Disconnected,
    /// The mirror is catching up (spec 4).
    Synchronizing,
    /// Only on the principal, while a manual failover runs (spec 7).
    PendingFailover,
    /// The mirror has caught up (spec 5).
    Synchronized,
    /// High performance (SAFETY OFF): the mirror streams asynchronously, so
    /// it is never known to be synchronized and failover is not possible
    /// without data loss (spec 2, code 5).
    Unsynchronized,
}

impl MirroringState {
    /// The numeric `mirroring_state` column (spec 2).
    pub fn code(self) -> i32 {
        match self {
            MirroringState::Suspended => 0,
            MirroringState::Disconnected => 1,
            MirroringState::Synchronizing => 2,
            MirroringState::PendingFailover => 3,
            MirroringState::Synchronized => 4,
            MirroringState::Unsynchronized => 5,
        }
    }

    /// The `mirroring_state_desc` column.
    pub fn desc(self) -> &'static str {
        match self {
            MirroringState::Suspended => "SUSPENDED",
            MirroringState::Disconnected => "DISCONNECTED",
            MirroringState::Synchronizing => "SYNCHRONIZING",
            MirroringState::PendingFailover => "PENDING_FAILOVER",
            MirroringState::Synchronized => "SYNCHRONIZED",
            MirroringState::Unsynchronized => "UNSYNCHRONIZED",
        }
    }
}

impl fmt::Display for MirroringState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.desc())
    }
}

/// `mirroring_role_sequence`: grows by one at every role switch and fences
/// stale principals (I1, I4).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Safety {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Safety::Full => "FULL",
            Safety::Off => "OFF",
        })
    }
}

impl FromStr for Safety {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Safety::Full),
            "off" => Ok(Safety::Off),
            _ => Err(format!("{s:?} is not a safety level (use full or off)")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Principal => "PRINCIPAL",
            Role::Mirror => "MIRROR",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_codes_follow_the_reference() {
        assert_eq!(MirroringState::Suspended.code(), 0);
        assert_eq!(MirroringState::Synchronized.code(), 4);
        assert_eq!(MirroringState::PendingFailover.desc(), "PENDING_FAILOVER");
        assert_eq!(Epoch(1).next(), Epoch(2));
    }

    #[test]
    fn safety_parses_case_insensitively_and_rejects_others() {
        assert_eq!("FULL".parse::<Safety>(), Ok(Safety::Full));
        assert_eq!("off".parse::<Safety>(), Ok(Safety::Off));
        assert!("sync"
            .parse::<Safety>()
            .unwrap_err()
            .contains("full or off"));
    }
}
