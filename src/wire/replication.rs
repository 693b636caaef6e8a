//! Decoders for the streaming-replication messages carried inside CopyData
//! (`'d'`) bodies, as the log shipper sees them relayed between a walsender
//! and a walreceiver
//! (<https://www.postgresql.org/docs/15/protocol-replication.html>).
//!
//! They work from a [`Message`](super::frame::Message)'s prefix and body
//! length, because the scanner never keeps whole bodies: every fixed part
//! decoded here fits in [`PREFIX_LEN`](super::frame::PREFIX_LEN) bytes.
//! All integers are big-endian.

use super::lsn::Lsn;

/// Sub-message byte of XLogData (server to client).
pub const XLOG_DATA_TAG: u8 = b'w';
/// Sub-message byte of a primary keepalive (server to client).
pub const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
/// Sub-message byte of a standby status update (client to server).
pub const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';
/// Sub-message byte of hot standby feedback (client to server).
pub const HOT_STANDBY_FEEDBACK_TAG: u8 = b'h';

/// XLogData header: byte, start, end, send time; the WAL follows.
pub const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// Primary keepalive: byte, end, send time, reply flag.
pub const PRIMARY_KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// Standby status update: byte, write, flush, apply, send time, reply flag.
pub const STANDBY_STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// A replication message sent by the server (the principal's walsender).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeReplicationMessage {
    /// A run of WAL.
    XLogData {
        /// Position of the first WAL byte in this message.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since 2000-01-01.
        send_time: i64,
        /// How many WAL bytes the message carries.
        data_len: u32,
    },
    /// A heartbeat, possibly asking for an immediate status update.
    PrimaryKeepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since 2000-01-01.
        send_time: i64,
        /// The server wants a status update right away.
        reply_requested: bool,
    },
}

/// A replication message sent by the client (the mirror's walreceiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeReplicationMessage {
    /// How far the standby has written, flushed and applied WAL.
    StandbyStatusUpdate {
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        /// Client clock at sending, microseconds since 2000-01-01.
        send_time: i64,
        /// The client wants the server to reply right away.
        reply_requested: bool,
    },
    /// Hot standby feedback (xmin horizons); recognised, not decoded.
    HotStandbyFeedback,
}

/// Why a CopyData body is not the replication message its first byte names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("replication message '{}' has {available} bytes, fewer than its {needed}-byte fixed part", char::from(*.tag))]
    Truncated {
        tag: u8,
        available: usize,
        needed: usize,
    },
}

/// Big-endian reads from the known-length fixed part of a message.
struct FixedPart<'a> {
    rest: &'a [u8],
}

impl<'a> FixedPart<'a> {
    /// The first `needed` bytes of the body, or an error naming what is short.
    /// The prefix may hold fewer bytes than the body (or, from a confused
    /// caller, more); only bytes both agree exist count.
    fn take(prefix: &'a [u8], body_len: u32, needed: usize) -> Result<Self, DecodeError> {
        let body_len = usize::try_from(body_len).unwrap_or(usize::MAX);
        let available = prefix.len().min(body_len);
        match prefix.get(..needed) {
            Some(fixed) if available >= needed => Ok(FixedPart { rest: fixed }),
            _ => Err(DecodeError::Truncated {
                tag: prefix.first().copied().unwrap_or_default(),
                available,
                needed,
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut bytes = [0; N];
        // `take` checked the length; a short read would leave zeros, not panic.
        if let Some((head, tail)) = self.rest.split_first_chunk::<N>() {
            bytes = *head;
            self.rest = tail;
        }
        bytes
    }

    fn byte(&mut self) -> u8 {
        let [byte] = self.array::<1>();
        byte
    }

    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.array())
    }

    fn lsn(&mut self) -> Lsn {
        Lsn(u64::from_be_bytes(self.array()))
    }
}

/// Decodes a CopyData body sent by the server. `Ok(None)` for an empty body
/// or a sub-message this module does not know.
pub fn decode_backend(
    prefix: &[u8],
    body_len: u32,
) -> Result<Option<BeReplicationMessage>, DecodeError> {
    match prefix.first() {
        Some(&XLOG_DATA_TAG) => {
            let mut fixed = FixedPart::take(prefix, body_len, XLOG_DATA_HEADER_LEN)?;
            fixed.byte();
            Ok(Some(BeReplicationMessage::XLogData {
                wal_start: fixed.lsn(),
                wal_end: fixed.lsn(),
                send_time: fixed.i64(),
                // take() checked body_len >= the header length.
                data_len: body_len.saturating_sub(XLOG_DATA_HEADER_LEN as u32),
            }))
        }
        Some(&PRIMARY_KEEPALIVE_TAG) => {
            let mut fixed = FixedPart::take(prefix, body_len, PRIMARY_KEEPALIVE_LEN)?;
            fixed.byte();
            Ok(Some(BeReplicationMessage::PrimaryKeepalive {
                wal_end: fixed.lsn(),
                send_time: fixed.i64(),
                reply_requested: fixed.byte() != 0,
            }))
        }
        _ => Ok(None),
    }
}

/// Decodes a CopyData body sent by the client. `Ok(None)` for an empty body
/// or a sub-message this module does not know.
pub fn decode_frontend(
    prefix: &[u8],
    body_len: u32,
) -> Result<Option<FeReplicationMessage>, DecodeError> {
    match prefix.first() {
        Some(&STANDBY_STATUS_UPDATE_TAG) => {
            let mut fixed = FixedPart::take(prefix, body_len, STANDBY_STATUS_UPDATE_LEN)?;
            fixed.byte();
            Ok(Some(FeReplicationMessage::StandbyStatusUpdate {
                write: fixed.lsn(),
                flush: fixed.lsn(),
                apply: fixed.lsn(),
                send_time: fixed.i64(),
                reply_requested: fixed.byte() != 0,
            }))
        }
        Some(&HOT_STANDBY_FEEDBACK_TAG) => Ok(Some(FeReplicationMessage::HotStandbyFeedback)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::PREFIX_LEN;

    fn xlog_data(start: u64, end: u64, time: i64, wal: &[u8]) -> Vec<u8> {
        let mut body = vec![XLOG_DATA_TAG];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.extend_from_slice(wal);
        body
    }

    fn keepalive(end: u64, time: i64, reply: u8) -> Vec<u8> {
        let mut body = vec![PRIMARY_KEEPALIVE_TAG];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.push(reply);
        body
    }

    fn status_update(write: u64, flush: u64, apply: u64, time: i64, reply: u8) -> Vec<u8> {
        let mut body = vec![STANDBY_STATUS_UPDATE_TAG];
        for value in [write, flush, apply] {
            body.extend_from_slice(&value.to_be_bytes());
        }
        body.extend_from_slice(&time.to_be_bytes());
        body.push(reply);
        body
    }

    /// What the frame scanner hands over: the prefix and the full length.
    fn as_seen(body: &[u8]) -> (&[u8], u32) {
        (&body[..body.len().min(PREFIX_LEN)], body.len() as u32)
    }

    #[test]
    fn decodes_xlog_data_with_a_large_payload() {
        let body = xlog_data(0x16_B374_D848, 0x16_B400_0000, -5, &[7; 8192]);
        let (prefix, body_len) = as_seen(&body);
        assert_eq!(
            decode_backend(prefix, body_len),
            Ok(Some(BeReplicationMessage::XLogData {
                wal_start: Lsn(0x16_B374_D848),
                wal_end: Lsn(0x16_B400_0000),
                send_time: -5,
                data_len: 8192,
            }))
        );
        let empty = xlog_data(1, 2, 3, &[]);
        let (prefix, body_len) = as_seen(&empty);
        assert!(matches!(
            decode_backend(prefix, body_len),
            Ok(Some(BeReplicationMessage::XLogData { data_len: 0, .. }))
        ));
    }

    #[test]
    fn decodes_keepalive() {
        let body = keepalive(0x1_0000_0010, 42, 1);
        let (prefix, body_len) = as_seen(&body);
        assert_eq!(
            decode_backend(prefix, body_len),
            Ok(Some(BeReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x1_0000_0010),
                send_time: 42,
                reply_requested: true,
            }))
        );
    }

    #[test]
    fn decodes_frontend_messages() {
        let body = status_update(30, 20, 10, 99, 0);
        let (prefix, body_len) = as_seen(&body);
        assert_eq!(
            decode_frontend(prefix, body_len),
            Ok(Some(FeReplicationMessage::StandbyStatusUpdate {
                write: Lsn(30),
                flush: Lsn(20),
                apply: Lsn(10),
                send_time: 99,
                reply_requested: false,
            }))
        );
        let feedback = [HOT_STANDBY_FEEDBACK_TAG; 25];
        assert_eq!(
            decode_frontend(&feedback, 25),
            Ok(Some(FeReplicationMessage::HotStandbyFeedback))
        );
    }

    #[test]
    fn unknown_or_empty_bodies_are_not_errors() {
        assert_eq!(decode_backend(&[], 0), Ok(None));
        assert_eq!(decode_backend(b"x123", 4), Ok(None));
        assert_eq!(decode_frontend(&[], 0), Ok(None));
        assert_eq!(decode_frontend(b"w", 1), Ok(None));
    }

    #[test]
    fn truncated_known_messages_are_errors() {
        let xlog = xlog_data(1, 2, 3, &[]);
        let keepalive = keepalive(1, 2, 0);
        let status = status_update(1, 2, 3, 4, 0);
        for cut in 1..xlog.len() {
            assert!(decode_backend(&xlog[..cut], cut as u32).is_err(), "{cut}");
        }
        for cut in 1..keepalive.len() {
            assert!(
                decode_backend(&keepalive[..cut], cut as u32).is_err(),
                "{cut}"
            );
        }
        for cut in 1..status.len() {
            let error = decode_frontend(&status[..cut], cut as u32).unwrap_err();
            assert_eq!(
                error,
                DecodeError::Truncated {
                    tag: b'r',
                    available: cut,
                    needed: STANDBY_STATUS_UPDATE_LEN
                }
            );
        }
        // A body length shorter than the prefix given is believed.
        assert!(decode_backend(&xlog, 10).is_err());
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = [b'w', b'k', b'r', b'h', b'x'];
        for _ in 0..5000 {
            let len = (next() % 80) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = body.first_mut() {
                *first = tags[(next() % tags.len() as u64) as usize];
            }
            let prefix = &body[..len.min(PREFIX_LEN)];
            // Body lengths both consistent and not with the prefix.
            for body_len in [len as u32, next() as u32] {
                let _ = decode_backend(prefix, body_len);
                let _ = decode_frontend(prefix, body_len);
            }
        }
    }
}
