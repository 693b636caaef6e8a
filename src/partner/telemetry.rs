//! What the partner agent measures beyond `sys.database_mirroring` each
//! supervisor tick: the age of the oldest unsent WAL and the warning
//! thresholds (spec 64). It logs a breach once, when it starts, and a note
//! when it ends, and hands the result to `crate::metrics::record_partner`.
//!
//! `Telemetry` is created by the supervisor and lives in its loop; it is
//! IO-free apart from logging and the (global) metrics recorder, so tests
//! feed it statuses and instants.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::WarningsConfig;
use crate::control::MirroringStatus;
use crate::metrics::{self, Derived};
use crate::roles::Role;
use crate::wire::lsn::Lsn;

/// At two ticks a second this keeps about 80 minutes of samples; an older
/// unsent WAL shows as that age (a lower bound).
const MAX_SAMPLES: usize = 10_000;

/// The age of the oldest WAL still in the principal's send queue.
///
/// It remembers when each end-of-log position was first seen. The oldest
/// unsent WAL is the first byte past the mirror's flush position; its age
/// is the time since the first sample whose end of log lay past that
/// position. The error is at most one sample interval (one tick), which
/// beats the brief's alternative (send queue / rate of new WAL), as that
/// estimate is undefined whenever the principal writes nothing.
#[derive(Debug, Default)]
pub struct UnsentAge {
    samples: VecDeque<(Instant, Lsn)>,
}

impl UnsentAge {
    /// Records the principal's end of log and the mirror's flush position
    /// and returns the age (zero when nothing is unsent).
    pub fn observe(&mut self, now: Instant, end_of_log: Lsn, sent: Lsn) -> Duration {
        if self
            .samples
            .back()
            .is_none_or(|&(_, last)| end_of_log > last)
        {
            self.samples.push_back((now, end_of_log));
            if self.samples.len() > MAX_SAMPLES {
                self.samples.pop_front();
            }
        }
        // Samples at or before the sent position can never be the oldest
        // unsent WAL again: the sent position only grows.
        while self.samples.front().is_some_and(|&(_, lsn)| lsn <= sent) {
            self.samples.pop_front();
        }
        match self.samples.front() {
            Some(&(since, _)) => now.saturating_duration_since(since),
            None => Duration::ZERO,
        }
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }
}

/// One warning threshold of spec 64, by its `threshold` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    UnsentLog,
    UnrestoredLog,
    OldestUnsentTransaction,
    MirrorCommitOverhead,
}

impl Threshold {
    const ALL: [Threshold; 4] = [
        Threshold::UnsentLog,
        Threshold::UnrestoredLog,
        Threshold::OldestUnsentTransaction,
        Threshold::MirrorCommitOverhead,
    ];

    /// The `threshold` label value.
    pub fn label(self) -> &'static str {
        match self {
            Threshold::UnsentLog => "unsent_log",
            Threshold::UnrestoredLog => "unrestored_log",
            Threshold::OldestUnsentTransaction => "oldest_unsent_transaction",
            Threshold::MirrorCommitOverhead => "mirror_commit_overhead",
        }
    }

    /// The configured limit in the unit of [`Threshold::measure`].
    fn limit(self, config: &WarningsConfig) -> Option<f64> {
        match self {
            Threshold::UnsentLog => config.unsent_log_kb.map(|kb| kb as f64 * 1024.0),
            Threshold::UnrestoredLog => config.unrestored_log_kb.map(|kb| kb as f64 * 1024.0),
            Threshold::OldestUnsentTransaction => config
                .oldest_unsent_transaction_minutes
                .map(|minutes| minutes as f64 * 60.0),
            Threshold::MirrorCommitOverhead => config.mirror_commit_overhead_ms.map(|ms| ms as f64),
        }
    }

    /// The current value (bytes, seconds or milliseconds) where the
    /// reference evaluates it: unrestored log on the mirror, the others on
    /// the principal.
    fn measure(self, status: &MirroringStatus, oldest_unsent: Option<Duration>) -> Option<f64> {
        let role = status.role()?;
        match (self, role) {
            (Threshold::UnsentLog, Role::Principal) => status.send_queue_bytes.map(|b| b as f64),
            (Threshold::UnrestoredLog, Role::Mirror) => status.redo_queue_bytes.map(|b| b as f64),
            (Threshold::OldestUnsentTransaction, Role::Principal) => {
                oldest_unsent.map(|age| age.as_secs_f64())
            }
            (Threshold::MirrorCommitOverhead, Role::Principal) => status.mirror_commit_overhead_ms,
            _ => None,
        }
    }
}

/// The per-tick measurements and the breach state of each threshold.
#[derive(Debug)]
pub struct Telemetry {
    warnings: WarningsConfig,
    unsent: UnsentAge,
    breached: [bool; 4],
}

impl Telemetry {
    pub fn new(warnings: WarningsConfig) -> Self {
        Telemetry {
            warnings,
            unsent: UnsentAge::default(),
            breached: [false; 4],
        }
    }

    /// Derives the extra measures from `status`, logs threshold changes
    /// and returns what to export.
    pub fn observe(&mut self, status: &MirroringStatus, now: Instant) -> Derived {
        let streaming = status.role() == Some(Role::Principal);
        let oldest_unsent = match (
            status.mirroring_end_of_log_lsn,
            status.mirroring_replication_lsn,
        ) {
            (Some(end), Some(sent)) if streaming => Some(self.unsent.observe(now, end, sent)),
            _ => {
                self.unsent.clear();
                None
            }
        };
        let mut warnings = Vec::new();
        for (index, threshold) in Threshold::ALL.into_iter().enumerate() {
            let Some(limit) = threshold.limit(&self.warnings) else {
                continue;
            };
            let value = threshold.measure(status, oldest_unsent);
            let breached = value.is_some_and(|value| value > limit);
            if breached != self.breached[index] {
                self.breached[index] = breached;
                let name = threshold.label();
                match value {
                    Some(value) if breached => warn!(
                        session = %status.database_name,
                        threshold = name,
                        value,
                        limit,
                        "warning threshold {name} exceeded"
                    ),
                    _ => {
                        info!(session = %status.database_name, threshold = name, "warning threshold {name} no longer exceeded")
                    }
                }
            }
            warnings.push((threshold.label(), breached));
        }
        Derived {
            oldest_unsent,
            warnings,
        }
    }

    /// Observes `status` and records every partner metric.
    pub fn record(&mut self, status: &MirroringStatus, now: Instant) {
        let derived = self.observe(status, now);
        metrics::record_partner(status, &derived);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(send_queue: u64, end: u64, sent: u64) -> MirroringStatus {
        MirroringStatus {
            mirroring_role: Some(1),
            send_queue_bytes: Some(send_queue),
            mirroring_end_of_log_lsn: Some(Lsn(end)),
            mirroring_replication_lsn: Some(Lsn(sent)),
            mirror_commit_overhead_ms: Some(3.0),
            ..MirroringStatus::default()
        }
    }

    #[test]
    fn unsent_age_is_the_time_since_wal_past_the_sent_position_appeared() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut age = UnsentAge::default();
        assert_eq!(age.observe(at(0), Lsn(100), Lsn(100)), Duration::ZERO);
        assert_eq!(age.observe(at(1), Lsn(200), Lsn(100)), Duration::ZERO);
        assert_eq!(
            age.observe(at(3), Lsn(300), Lsn(100)),
            Duration::from_secs(2)
        );
        // The mirror got past 200: the oldest unsent WAL appeared at 3 s.
        assert_eq!(
            age.observe(at(5), Lsn(300), Lsn(250)),
            Duration::from_secs(2)
        );
        // An idle principal: nothing new is written, the age still grows.
        assert_eq!(
            age.observe(at(9), Lsn(300), Lsn(250)),
            Duration::from_secs(6)
        );
        assert_eq!(age.observe(at(10), Lsn(300), Lsn(300)), Duration::ZERO);
    }

    #[test]
    fn a_breach_is_reported_while_it_lasts_and_only_where_configured() {
        let mut telemetry = Telemetry::new(WarningsConfig {
            unsent_log_kb: Some(1),
            mirror_commit_overhead_ms: Some(10),
            ..WarningsConfig::default()
        });
        let now = Instant::now();
        let quiet = telemetry.observe(&principal(100, 1000, 900), now);
        assert_eq!(
            quiet.warnings,
            vec![("unsent_log", false), ("mirror_commit_overhead", false)]
        );
        let behind = telemetry.observe(&principal(4096, 5000, 904), now);
        assert_eq!(behind.warnings[0], ("unsent_log", true));
        assert!(telemetry.breached[0]);
        let mirror = MirroringStatus {
            mirroring_role: Some(2),
            redo_queue_bytes: Some(1 << 30),
            ..MirroringStatus::default()
        };
        let derived = telemetry.observe(&mirror, now);
        assert_eq!(derived.warnings[0], ("unsent_log", false));
        assert_eq!(derived.oldest_unsent, None);
    }
}
