//! What the principal's agent learns by watching the replication stream it
//! relays: how much WAL was sent to the mirror, how far the mirror wrote,
//! flushed and applied it, how fast, and how long the mirror takes to harden
//! what it is sent (the commit overhead a FULL-safety commit pays).
//!
//! IO-free and clock-free: every method takes the current instant, so the
//! agent passes `Instant::now()` and tests pass whatever instants they like.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::wire::lsn::Lsn;
use crate::wire::replication::{BeReplicationMessage, FeReplicationMessage};

/// How many sent-but-unflushed XLogData ends are remembered for the overhead
/// measurement; beyond that the oldest are forgotten, which only makes the
/// next measurement start from a later send.
pub const MAX_PENDING_SENDS: usize = 1024;

/// Weight of the newest sample in the commit-overhead moving average.
pub const COMMIT_OVERHEAD_ALPHA: f64 = 0.2;

/// Minimum spacing of rate samples.
pub const RATE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Rates are measured over at least this span...
pub const MIN_RATE_WINDOW: Duration = Duration::from_secs(1);

/// ...and at most this one, so they follow changes within seconds.
pub const MAX_RATE_WINDOW: Duration = Duration::from_secs(5);

/// A point-in-time view of the replication progress, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PositionSnapshot {
    /// End of the WAL relayed to the mirror.
    pub sent: Lsn,
    /// What the mirror reported written.
    pub written: Lsn,
    /// What the mirror reported flushed (hardened).
    pub flushed: Lsn,
    /// What the mirror reported applied (replayed).
    pub applied: Lsn,
    /// Bytes per second of flush progress over the last few seconds.
    pub send_rate: f64,
    /// Bytes per second of apply progress over the last few seconds.
    pub redo_rate: f64,
    /// Moving average of the time from sending WAL to the mirror reporting
    /// it flushed; `None` until first measured.
    pub commit_overhead_ms: Option<f64>,
    /// Time since the mirror's last status update; `None` if none came yet.
    pub last_status_age_ms: Option<u64>,
}

/// The end of one XLogData and when it passed.
#[derive(Debug, Clone, Copy)]
struct PendingSend {
    end: Lsn,
    sent_at: Instant,
}

/// Flush and apply positions at one moment, for rates.
#[derive(Debug, Clone, Copy)]
struct RateSample {
    flushed: Lsn,
    applied: Lsn,
    taken_at: Instant,
}

/// Progress of the replication stream, fed by the relayed messages.
///
/// Positions only ever grow: a reconnecting walreceiver may restart from an
/// earlier point, but what was once flushed stays flushed.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    sent: Lsn,
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    principal_end: Lsn,
    /// XLogData ends not yet covered by a reported flush, oldest first, with
    /// strictly increasing ends.
    pending_sends: VecDeque<PendingSend>,
    commit_overhead_ms: Option<f64>,
    last_status_at: Option<Instant>,
    /// Oldest first, at least `RATE_SAMPLE_INTERVAL` apart.
    rate_samples: VecDeque<RateSample>,
}

impl Positions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The principal's end of WAL as last announced by its walsender.
    pub fn principal_end(&self) -> Lsn {
        self.principal_end
    }

    /// Learns from a message the principal sent to the mirror.
    pub fn on_backend(&mut self, message: &BeReplicationMessage, now: Instant) {
        match *message {
            BeReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data_len,
                ..
            } => {
                let end = Lsn(wal_start.0.saturating_add(u64::from(data_len)));
                self.sent = self.sent.max(end);
                // XLogData announces the server's end of WAL just as a
                // keepalive does.
                self.principal_end = self.principal_end.max(wal_end);
                self.remember_send(end, now);
            }
            BeReplicationMessage::PrimaryKeepalive { wal_end, .. } => {
                self.principal_end = self.principal_end.max(wal_end);
            }
        }
    }

    /// Learns from a message the mirror sent to the principal.
    pub fn on_frontend(&mut self, message: &FeReplicationMessage, now: Instant) {
        let FeReplicationMessage::StandbyStatusUpdate {
            write,
            flush,
            apply,
            ..
        } = *message
        else {
            return;
        };
        self.written = self.written.max(write);
        self.flushed = self.flushed.max(flush);
        self.applied = self.applied.max(apply);
        self.last_status_at = Some(now);
        self.measure_commit_overhead(flush, now);
        self.take_rate_sample(now);
    }

    /// A new stream connection started: sends on the old one will never be
    /// acknowledged as such, so forget them. Positions stay.
    pub fn reset_stream(&mut self) {
        self.pending_sends.clear();
    }

    /// The progress as of `now`.
    pub fn snapshot(&self, now: Instant) -> PositionSnapshot {
        let (send_rate, redo_rate) = self.rates(now);
        PositionSnapshot {
            sent: self.sent,
            written: self.written,
            flushed: self.flushed,
            applied: self.applied,
            send_rate,
            redo_rate,
            commit_overhead_ms: self.commit_overhead_ms,
            last_status_age_ms: self
                .last_status_at
                .map(|at| duration_ms(now.saturating_duration_since(at))),
        }
    }

    fn remember_send(&mut self, end: Lsn, now: Instant) {
        // Keep the first time an end was sent: the flush that covers it is
        // what a commit at that end waited for.
        if self
            .pending_sends
            .back()
            .is_some_and(|last| last.end >= end)
        {
            return;
        }
        if self.pending_sends.len() >= MAX_PENDING_SENDS {
            self.pending_sends.pop_front();
        }
        self.pending_sends
            .push_back(PendingSend { end, sent_at: now });
    }

    fn measure_commit_overhead(&mut self, flush: Lsn, now: Instant) {
        let mut newest_covered = None;
        while let Some(pending) = self.pending_sends.front().copied() {
            if pending.end > flush {
                break;
            }
            newest_covered = Some(pending);
            self.pending_sends.pop_front();
        }
        let Some(covered) = newest_covered else {
            return;
        };
        let sample_ms = now.saturating_duration_since(covered.sent_at).as_secs_f64() * 1000.0;
        self.commit_overhead_ms = Some(match self.commit_overhead_ms {
            None => sample_ms,
            Some(average) => {
                COMMIT_OVERHEAD_ALPHA * sample_ms + (1.0 - COMMIT_OVERHEAD_ALPHA) * average
            }
        });
    }

    fn take_rate_sample(&mut self, now: Instant) {
        let due = self.rate_samples.back().is_none_or(|last| {
            now.saturating_duration_since(last.taken_at) >= RATE_SAMPLE_INTERVAL
        });
        if !due {
            return;
        }
        // Samples older than the window can never be used again.
        while self
            .rate_samples
            .front()
            .is_some_and(|oldest| now.saturating_duration_since(oldest.taken_at) > MAX_RATE_WINDOW)
        {
            self.rate_samples.pop_front();
        }
        self.rate_samples.push_back(RateSample {
            flushed: self.flushed,
            applied: self.applied,
            taken_at: now,
        });
    }

    /// Flush and apply progress per second from the oldest sample inside the
    /// window up to now; zero when the window holds no usable sample.
    fn rates(&self, now: Instant) -> (f64, f64) {
        let oldest_in_window = self
            .rate_samples
            .iter()
            .find(|sample| now.saturating_duration_since(sample.taken_at) <= MAX_RATE_WINDOW);
        let Some(start) = oldest_in_window else {
            return (0.0, 0.0);
        };
        let span = now.saturating_duration_since(start.taken_at);
        if span < MIN_RATE_WINDOW {
            return (0.0, 0.0);
        }
        let seconds = span.as_secs_f64();
        (
            self.flushed.bytes_since(start.flushed) as f64 / seconds,
            self.applied.bytes_since(start.applied) as f64 / seconds,
        )
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlog(start: u64, data_len: u32) -> BeReplicationMessage {
        BeReplicationMessage::XLogData {
            wal_start: Lsn(start),
            wal_end: Lsn(start + u64::from(data_len)),
            send_time: 0,
            data_len,
        }
    }

    fn status(write: u64, flush: u64, apply: u64) -> FeReplicationMessage {
        FeReplicationMessage::StandbyStatusUpdate {
            write: Lsn(write),
            flush: Lsn(flush),
            apply: Lsn(apply),
            send_time: 0,
            reply_requested: false,
        }
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn positions_advance_and_never_go_back() {
        let start = Instant::now();
        let mut positions = Positions::new();
        positions.on_backend(&xlog(1000, 500), start);
        positions.on_backend(&xlog(1500, 100), start);
        assert_eq!(positions.snapshot(start).sent, Lsn(1600));
        positions.on_backend(&xlog(0, 10), start);
        assert_eq!(positions.snapshot(start).sent, Lsn(1600));

        positions.on_frontend(&status(1600, 1500, 1200), start + ms(1));
        positions.on_frontend(&status(900, 800, 700), start + ms(2));
        let snapshot = positions.snapshot(start + ms(2));
        assert_eq!(snapshot.written, Lsn(1600));
        assert_eq!(snapshot.flushed, Lsn(1500));
        assert_eq!(snapshot.applied, Lsn(1200));
        assert_eq!(snapshot.last_status_age_ms, Some(0));
        assert_eq!(
            positions.snapshot(start + ms(250)).last_status_age_ms,
            Some(248)
        );
    }

    #[test]
    fn keepalives_and_xlog_data_note_the_principal_end() {
        let now = Instant::now();
        let mut positions = Positions::new();
        positions.on_backend(
            &BeReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(5000),
                send_time: 0,
                reply_requested: true,
            },
            now,
        );
        assert_eq!(positions.principal_end(), Lsn(5000));
        positions.on_backend(&xlog(100, 10), now);
        assert_eq!(positions.principal_end(), Lsn(5000));
        assert_eq!(positions.snapshot(now).sent, Lsn(110));
    }

    #[test]
    fn commit_overhead_is_the_time_from_send_to_flush() {
        let start = Instant::now();
        let mut positions = Positions::new();
        assert_eq!(positions.snapshot(start).commit_overhead_ms, None);
        assert_eq!(positions.snapshot(start).last_status_age_ms, None);

        positions.on_backend(&xlog(0, 100), start);
        // Not covered yet: nothing measured.
        positions.on_frontend(&status(100, 50, 0), start + ms(2));
        assert_eq!(positions.snapshot(start).commit_overhead_ms, None);

        positions.on_frontend(&status(100, 100, 0), start + ms(5));
        let overhead = positions.snapshot(start + ms(5)).commit_overhead_ms;
        assert!(
            overhead.is_some_and(|value| (value - 5.0).abs() < 0.01),
            "{overhead:?}"
        );

        // The newest covered send counts: two sends, one flush covering both.
        positions.on_backend(&xlog(100, 100), start + ms(10));
        positions.on_backend(&xlog(200, 100), start + ms(20));
        positions.on_frontend(&status(300, 300, 0), start + ms(35));
        // 0.2 * 15 + 0.8 * 5
        let overhead = positions.snapshot(start + ms(35)).commit_overhead_ms;
        assert!(
            overhead.is_some_and(|value| (value - 7.0).abs() < 0.01),
            "{overhead:?}"
        );
    }

    #[test]
    fn reset_stream_forgets_pending_sends_but_keeps_positions() {
        let start = Instant::now();
        let mut positions = Positions::new();
        positions.on_backend(&xlog(0, 100), start);
        positions.reset_stream();
        positions.on_frontend(&status(100, 100, 100), start + ms(50));
        let snapshot = positions.snapshot(start + ms(50));
        assert_eq!(snapshot.commit_overhead_ms, None);
        assert_eq!(snapshot.sent, Lsn(100));
        assert_eq!(snapshot.flushed, Lsn(100));
    }

    #[test]
    fn pending_sends_are_bounded() {
        let start = Instant::now();
        let mut positions = Positions::new();
        for index in 0..(MAX_PENDING_SENDS as u64 * 3) {
            positions.on_backend(&xlog(index * 10, 10), start + ms(index));
        }
        assert_eq!(positions.pending_sends.len(), MAX_PENDING_SENDS);
        let last_end = MAX_PENDING_SENDS as u64 * 3 * 10;
        positions.on_frontend(&status(last_end, last_end, 0), start + ms(10_000));
        assert!(positions.pending_sends.is_empty());
    }

    #[test]
    fn rates_cover_the_last_few_seconds() {
        let start = Instant::now();
        let mut positions = Positions::new();
        // Every 500 ms the mirror flushes 1000 bytes more and applies 500.
        for step in 0..=20u64 {
            positions.on_frontend(
                &status(step * 1000, step * 1000, step * 500),
                start + ms(step * 500),
            );
        }
        let snapshot = positions.snapshot(start + ms(10_000));
        assert!((snapshot.send_rate - 2000.0).abs() < 1.0, "{snapshot:?}");
        assert!((snapshot.redo_rate - 1000.0).abs() < 1.0, "{snapshot:?}");
        assert!(positions.rate_samples.len() <= 7);

        // Progress stops: the rate falls and reaches zero once the window
        // holds no progress.
        let later = positions.snapshot(start + ms(12_000));
        assert!(
            later.send_rate < 2000.0 && later.send_rate > 0.0,
            "{later:?}"
        );
        positions.on_frontend(&status(20_000, 20_000, 10_000), start + ms(16_000));
        let stalled = positions.snapshot(start + ms(21_000));
        assert_eq!(stalled.send_rate, 0.0);
        assert_eq!(stalled.redo_rate, 0.0);
    }

    #[test]
    fn rates_need_a_window_of_at_least_a_second() {
        let start = Instant::now();
        let mut positions = Positions::new();
        assert_eq!(positions.snapshot(start).send_rate, 0.0);
        positions.on_frontend(&status(0, 0, 0), start);
        positions.on_frontend(&status(500, 500, 500), start + ms(500));
        assert_eq!(positions.snapshot(start + ms(500)).send_rate, 0.0);
        let rate = positions.snapshot(start + ms(1000)).send_rate;
        assert!((rate - 500.0).abs() < 1.0, "{rate}");
    }

    #[test]
    fn snapshot_serialises_lsns_as_text() {
        let snapshot = PositionSnapshot {
            sent: Lsn(0x1_0000_0000),
            ..PositionSnapshot::default()
        };
        let json = serde_json::to_value(snapshot).unwrap();
        assert_eq!(json["sent"], "1/0");
        let back: PositionSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, snapshot);
    }
}
