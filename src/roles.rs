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
    fn safety_parses_case_insensitively_and_rejects_others() {
        assert_eq!("FULL".parse::<Safety>(), Ok(Safety::Full));
        assert_eq!("off".parse::<Safety>(), Ok(Safety::Off));
        assert!("sync"
            .parse::<Safety>()
            .unwrap_err()
            .contains("full or off"));
    }
}
