//! The shared vocabulary of a mirroring session: safety levels, roles and the
//! epoch, used by the agents, the witness and the proxy alike.
//!
//! Pure data; no IO.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

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

impl Safety {
    /// The numeric `mirroring_safety_level` column (spec 2).
    pub fn code(self) -> i32 {
        match self {
            Safety::Off => 1,
            Safety::Full => 2,
        }
    }

    /// The `mirroring_safety_level_desc` column.
    pub fn desc(self) -> &'static str {
        match self {
            Safety::Full => "FULL",
            Safety::Off => "OFF",
        }
    }
}

impl fmt::Display for Safety {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.desc())
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

impl Role {
    /// The numeric `mirroring_role` column (spec 2).
    pub fn code(self) -> i32 {
        match self {
            Role::Principal => 1,
            Role::Mirror => 2,
        }
    }

    /// The `mirroring_role_desc` column.
    pub fn desc(self) -> &'static str {
        match self {
            Role::Principal => "PRINCIPAL",
            Role::Mirror => "MIRROR",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.desc())
    }
}

/// How a partner sees its session's witness (spec 2,
/// `mirroring_witness_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WitnessState {
    /// No witness is set, or it was never heard.
    Unknown,
    Connected,
    Disconnected,
}

impl WitnessState {
    /// The numeric `mirroring_witness_state` column.
    pub fn code(self) -> i32 {
        match self {
            WitnessState::Unknown => 0,
            WitnessState::Connected => 1,
            WitnessState::Disconnected => 2,
        }
    }

    /// The `mirroring_witness_state_desc` column.
    pub fn desc(self) -> &'static str {
        match self {
            WitnessState::Unknown => "UNKNOWN",
            WitnessState::Connected => "CONNECTED",
            WitnessState::Disconnected => "DISCONNECTED",
        }
    }
}

/// The quorum lease (I1), written once for the partner that holds it and
/// the witness that waits it out. A principal with a witness keeps serving
/// only while it holds a lease: it starts at the send time of its last
/// round trip answered by the witness or the mirror and lasts
/// [`lease_length`] on the principal's own clock. The witness lets another
/// partner take over only [`takeover_wait`] after both the principal's last
/// report and the mirror's last answer to the principal, on its own clock.
///
/// Why that is enough: a clock runs at a rate within 1 +/- [`CLOCK_DRIFT`].
/// A lease of `T(1-d) - m` local time lasts at most `T - m/(1-d) < T` real
/// time from the round trip's send instant, which precedes both the
/// witness's receipt of the report and the mirror's answer. The fence
/// kills PostgreSQL within [`STOP_BOUND`] of the lease's end. The witness's
/// `T(1+d)/(1-d) + STOP_BOUND` of local time is at least `T + STOP_BOUND`
/// of real time however the two clocks drift, so the old principal has
/// stopped acknowledging writes before the new one starts.
pub mod lease {
    use std::time::Duration;

    /// The largest clock drift allowed between any two nodes' rates.
    pub const CLOCK_DRIFT: f64 = 0.01;
    /// Taken off the lease for the quorum check's period (100 ms) and the
    /// time to notice its end.
    pub const LEASE_MARGIN: Duration = Duration::from_millis(250);
    /// How long stopping PostgreSQL (SIGKILL of the postmaster and its
    /// children, or an immediate shutdown) may take after the lease ended.
    pub const STOP_BOUND: Duration = Duration::from_millis(1000);

    /// How long a round trip answered at `sent` keeps the principal serving.
    pub fn lease_length(timeout: Duration) -> Duration {
        timeout
            .mul_f64(1.0 - CLOCK_DRIFT)
            .saturating_sub(LEASE_MARGIN)
    }

    /// How long the witness (and the mirror) wait after the principal was
    /// last heard before another partner may serve.
    pub fn takeover_wait(timeout: Duration) -> Duration {
        timeout.mul_f64((1.0 + CLOCK_DRIFT) / (1.0 - CLOCK_DRIFT)) + STOP_BOUND
    }
}

/// The lease arithmetic as the partner and the witness use it.
pub use lease::{lease_length, takeover_wait};

/// Whether a lease that started at `from` still holds at `now` (both on the
/// holder's clock).
pub fn lease_holds(from: Option<Duration>, now: Duration, timeout: Duration) -> bool {
    from.is_some_and(|from| now < from + lease_length(timeout))
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
    fn the_lease_ends_before_the_witness_lets_another_partner_serve() {
        for secs in [1, 2, 5, 10, 3600] {
            let timeout = Duration::from_secs(secs);
            let lease = lease_length(timeout);
            let wait = takeover_wait(timeout);
            // Worst case: the holder's clock runs slow (its lease lasts
            // longer in real time), the witness's runs fast.
            let lease_real = lease.as_secs_f64() / (1.0 - lease::CLOCK_DRIFT);
            let wait_real = wait.as_secs_f64() / (1.0 + lease::CLOCK_DRIFT);
            let stop = lease::STOP_BOUND.as_secs_f64();
            assert!(
                lease_real + stop < wait_real,
                "TIMEOUT {secs}: {lease_real} + {stop} >= {wait_real}"
            );
        }
        assert_eq!(takeover_wait(Duration::from_secs(2)).as_millis(), 3040);
        assert!(lease_holds(
            Some(Duration::from_secs(1)),
            Duration::from_millis(2000),
            Duration::from_secs(2)
        ));
        assert!(!lease_holds(
            Some(Duration::from_secs(1)),
            Duration::from_millis(2800),
            Duration::from_secs(2)
        ));
        assert!(!lease_holds(None, Duration::ZERO, Duration::from_secs(2)));
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
