//! NoticeResponse decoding, and the one notice the proxy acts on:
//! PostgreSQL's report that a commit's wait for the synchronous standby
//! ended early (invariant I2, see `proxy::fence`).
//!
//! [`decode_notice`] is a pure function over one whole message (tag
//! included) that returns the fields it carries or an error; it checks every
//! length before reading, never panics and allocates nothing. The proxy
//! collects a notice's bytes itself (bounded by [`MAX_NOTICE_LEN`]) and only
//! then calls it. Nothing here is async.
//!
//! Field layout (<https://www.postgresql.org/docs/current/protocol-message-formats.html>,
//! NoticeResponse, and <https://www.postgresql.org/docs/current/protocol-error-fields.html>):
//! after the tag and int32 length, a sequence of (field type byte,
//! NUL-terminated string), ended by a single NUL.
//!
//! Only fields that do not depend on `lc_messages` identify the notice: the
//! non-localized severity `V` (sent since PostgreSQL 9.6), the SQLSTATE `C`,
//! the source file `F` (a base name: `errstart` in
//! `src/backend/utils/error/elog.c` strips the directory) and the routine `R`.

use crate::wire::frame::{LENGTH_FIELD_LEN, TAG_LEN};

/// Tag of NoticeResponse.
pub const NOTICE_RESPONSE: u8 = b'N';

/// The largest NoticeResponse (tag included) the proxy collects and decodes.
/// PostgreSQL bounds a message only by `MaxAllocSize`
/// (`src/include/utils/memutils.h`), but the notice of
/// `SyncRepWaitForLSN` (`src/backend/replication/syncrep.c`) is made of
/// fixed catalog strings (message, detail: under 1 KiB in any translation)
/// plus, for a COMMIT inside a procedure, the call stack in the context
/// field; 64 KiB leaves that stack plenty of room. Longer notices pass
/// through undecoded.
pub const MAX_NOTICE_LEN: usize = 64 * 1024;

/// Field type of the non-localized severity (PostgreSQL 9.6 and later).
pub const FIELD_SEVERITY_NONLOCALIZED: u8 = b'V';
/// Field type of the SQLSTATE.
pub const FIELD_CODE: u8 = b'C';
/// Field type of the source file name.
pub const FIELD_FILE: u8 = b'F';
/// Field type of the source routine name.
pub const FIELD_ROUTINE: u8 = b'R';
/// Field type of the (localized) primary message.
pub const FIELD_MESSAGE: u8 = b'M';

/// What identifies the notice of a cut synchronous-replication wait, in
/// every PostgreSQL major version from 9.6 on (checked against a real
/// PostgreSQL 15 by `tests/commit_fence.rs`).
pub const SYNC_REP_SEVERITY: &[u8] = b"WARNING";
/// `__func__` of the wait loop.
pub const SYNC_REP_ROUTINE: &[u8] = b"SyncRepWaitForLSN";
/// The wait loop's source file.
pub const SYNC_REP_FILE: &[u8] = b"syncrep.c";
/// `ERRCODE_WARNING`, the default code of a WARNING: the wait was cancelled
/// (`QueryCancelPending`: a cancel request, or a statement timeout).
pub const SQLSTATE_WARNING: &[u8] = b"01000";
/// `ERRCODE_ADMIN_SHUTDOWN`: the backend is terminating (`ProcDiePending`:
/// pg_terminate_backend, a fast shutdown).
pub const SQLSTATE_ADMIN_SHUTDOWN: &[u8] = b"57P01";

/// The fields of a NoticeResponse that the proxy looks at; each borrows the
/// message (without its NUL) and is None when the notice lacks it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoticeFields<'a> {
    /// `V`: WARNING, NOTICE, ... never translated.
    pub severity: Option<&'a [u8]>,
    /// `C`: the SQLSTATE.
    pub code: Option<&'a [u8]>,
    /// `F`: the source file's base name.
    pub file: Option<&'a [u8]>,
    /// `R`: the source routine.
    pub routine: Option<&'a [u8]>,
    /// `M`: the primary message, in the server's `lc_messages` (for logs).
    pub message: Option<&'a [u8]>,
}

/// Why bytes are not one whole, well-formed NoticeResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error("message is empty or shorter than a tagged header")]
    Truncated,
    #[error("message has tag 0x{0:02X}, not NoticeResponse ('N')")]
    NotANotice(u8),
    #[error("NoticeResponse of {0} bytes exceeds the proxy's limit of {MAX_NOTICE_LEN}")]
    TooLong(usize),
    #[error(
        "NoticeResponse length field says {declared} bytes after the tag, but {actual} are given"
    )]
    LengthMismatch { declared: u32, actual: usize },
    #[error("NoticeResponse field '{}' has no terminating NUL", char::from(*.0))]
    UnterminatedField(u8),
    #[error("NoticeResponse has no final NUL after its fields")]
    MissingTerminator,
    #[error("NoticeResponse has {0} bytes after its final NUL")]
    TrailingBytes(usize),
}

/// Decodes one whole NoticeResponse (tag, length and body). Repeated field
/// types keep their first value (PostgreSQL never repeats them).
pub fn decode_notice(message: &[u8]) -> Result<NoticeFields<'_>, NoticeError> {
    let (&tag, rest) = message.split_first().ok_or(NoticeError::Truncated)?;
    if tag != NOTICE_RESPONSE {
        return Err(NoticeError::NotANotice(tag));
    }
    if message.len() > MAX_NOTICE_LEN {
        return Err(NoticeError::TooLong(message.len()));
    }
    let (length, body) = rest
        .split_first_chunk::<LENGTH_FIELD_LEN>()
        .ok_or(NoticeError::Truncated)?;
    let declared = u32::from_be_bytes(*length);
    // message.len() <= MAX_NOTICE_LEN, so these cannot overflow.
    let actual = message.len() - TAG_LEN;
    if usize::try_from(declared) != Ok(actual) {
        return Err(NoticeError::LengthMismatch { declared, actual });
    }

    let mut fields = NoticeFields::default();
    let mut rest = body;
    loop {
        let (&field, after_type) = rest.split_first().ok_or(NoticeError::MissingTerminator)?;
        if field == 0 {
            return match after_type.len() {
                0 => Ok(fields),
                trailing => Err(NoticeError::TrailingBytes(trailing)),
            };
        }
        let nul = after_type
            .iter()
            .position(|byte| *byte == 0)
            .ok_or(NoticeError::UnterminatedField(field))?;
        let (value, after_value) = after_type.split_at(nul);
        let slot = match field {
            FIELD_SEVERITY_NONLOCALIZED => Some(&mut fields.severity),
            FIELD_CODE => Some(&mut fields.code),
            FIELD_FILE => Some(&mut fields.file),
            FIELD_ROUTINE => Some(&mut fields.routine),
            FIELD_MESSAGE => Some(&mut fields.message),
            // Other fields (S, D, H, W, L, ...) are skipped.
            _ => None,
        };
        if let Some(slot) = slot {
            slot.get_or_insert(value);
        }
        // after_value starts with the NUL found above.
        rest = after_value.get(1..).unwrap_or_default();
    }
}

/// How a commit's wait for the synchronous standby ended early. Either way
/// PostgreSQL has committed locally and the mirror may not have the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRepCut {
    /// The wait was cancelled (SQLSTATE 01000): the backend goes on and
    /// reports the commit as successful.
    Cancelled,
    /// The backend is terminating (SQLSTATE 57P01): it sends nothing more.
    Terminated,
}

impl SyncRepCut {
    /// Recognises the notice of `SyncRepWaitForLSN` by its non-localized
    /// fields; every one of V, R, F and C must match, so that no other
    /// notice with the same SQLSTATE (a RAISE WARNING, a shutdown notice)
    /// is taken for it.
    pub fn from_notice(fields: &NoticeFields<'_>) -> Option<SyncRepCut> {
        if fields.severity != Some(SYNC_REP_SEVERITY)
            || fields.routine != Some(SYNC_REP_ROUTINE)
            || fields.file != Some(SYNC_REP_FILE)
        {
            return None;
        }
        match fields.code? {
            SQLSTATE_WARNING => Some(SyncRepCut::Cancelled),
            SQLSTATE_ADMIN_SHUTDOWN => Some(SyncRepCut::Terminated),
            _ => None,
        }
    }
}

/// A NoticeResponse with the given fields, as PostgreSQL frames it (tests).
#[cfg(test)]
pub(crate) fn notice(fields: &[(u8, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in fields {
        body.push(*field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = vec![NOTICE_RESPONSE];
    message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    message.extend_from_slice(&body);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::TAGGED_HEADER_LEN;

    /// The notice PostgreSQL 15 sends when a commit's wait is cancelled, in
    /// German, to show that localized fields play no part.
    fn cancelled_wait(code: &str) -> Vec<u8> {
        notice(&[
            (b'S', "WARNUNG"),
            (b'V', "WARNING"),
            (b'C', code),
            (
                b'M',
                "breche Warten auf synchrone Replikation ab wegen Benutzeraufforderung",
            ),
            (b'D', "Die Transaktion wurde lokal bereits committet, ..."),
            (b'F', "syncrep.c"),
            (b'L', "287"),
            (b'R', "SyncRepWaitForLSN"),
        ])
    }

    #[test]
    fn the_sync_rep_notice_is_recognised_by_its_fixed_fields() {
        let message = cancelled_wait("01000");
        let fields = decode_notice(&message).unwrap();
        assert_eq!(fields.severity, Some(&b"WARNING"[..]));
        assert_eq!(fields.code, Some(&b"01000"[..]));
        assert_eq!(fields.file, Some(&b"syncrep.c"[..]));
        assert_eq!(fields.routine, Some(&b"SyncRepWaitForLSN"[..]));
        assert_eq!(
            SyncRepCut::from_notice(&fields),
            Some(SyncRepCut::Cancelled)
        );
        let terminated = cancelled_wait("57P01");
        assert_eq!(
            SyncRepCut::from_notice(&decode_notice(&terminated).unwrap()),
            Some(SyncRepCut::Terminated)
        );
    }

    #[test]
    fn the_sqlstate_alone_is_not_enough() {
        let base = [
            (b'V', "WARNING"),
            (b'C', "01000"),
            (b'F', "syncrep.c"),
            (b'R', "SyncRepWaitForLSN"),
        ];
        // Drop or change each identifying field in turn.
        for skip in 0..base.len() {
            let without: Vec<_> = base
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != skip)
                .map(|(_, field)| *field)
                .collect();
            assert!(decode_notice(&notice(&without)).is_ok());
            assert_eq!(
                SyncRepCut::from_notice(&decode_notice(&notice(&without)).unwrap()),
                None,
                "without field {}",
                base[skip].0 as char
            );
            let mut changed = base.to_vec();
            changed[skip].1 = "other";
            assert_eq!(
                SyncRepCut::from_notice(&decode_notice(&notice(&changed)).unwrap()),
                None
            );
        }
        // A RAISE WARNING (same V and C, plpgsql's file and routine).
        let raise = notice(&[
            (b'S', "WARNING"),
            (b'V', "WARNING"),
            (b'C', "01000"),
            (b'M', "canceling wait for synchronous replication"),
            (b'F', "pl_exec.c"),
            (b'R', "exec_stmt_raise"),
        ]);
        assert_eq!(
            SyncRepCut::from_notice(&decode_notice(&raise).unwrap()),
            None
        );
        // Another SQLSTATE from the right place is not one of the two cuts.
        let other = notice(&[
            (b'V', "WARNING"),
            (b'C', "57014"),
            (b'F', "syncrep.c"),
            (b'R', "SyncRepWaitForLSN"),
        ]);
        assert_eq!(
            SyncRepCut::from_notice(&decode_notice(&other).unwrap()),
            None
        );
    }

    #[test]
    fn repeated_fields_keep_the_first_value() {
        let message = notice(&[(b'C', "01000"), (b'C', "57P01")]);
        assert_eq!(decode_notice(&message).unwrap().code, Some(&b"01000"[..]));
    }

    #[test]
    fn malformed_notices_are_errors() {
        assert_eq!(decode_notice(&[]), Err(NoticeError::Truncated));
        assert_eq!(decode_notice(b"N\0\0"), Err(NoticeError::Truncated));
        assert_eq!(
            decode_notice(b"E\0\0\0\x05\0"),
            Err(NoticeError::NotANotice(b'E'))
        );
        // Length field disagreeing with the bytes given.
        assert_eq!(
            decode_notice(b"N\0\0\0\x06\0"),
            Err(NoticeError::LengthMismatch {
                declared: 6,
                actual: 5
            })
        );
        assert_eq!(
            decode_notice(b"N\xff\xff\xff\xff\0"),
            Err(NoticeError::LengthMismatch {
                declared: u32::MAX,
                actual: 5
            })
        );
        // An empty body has no final NUL.
        assert_eq!(
            decode_notice(b"N\0\0\0\x04"),
            Err(NoticeError::MissingTerminator)
        );
        // A field without its NUL.
        assert_eq!(
            decode_notice(b"N\0\0\0\x07Cab"),
            Err(NoticeError::UnterminatedField(b'C'))
        );
        // Fields but no final NUL.
        assert_eq!(
            decode_notice(b"N\0\0\0\x07Ca\0"),
            Err(NoticeError::MissingTerminator)
        );
        // Bytes after the final NUL.
        assert_eq!(
            decode_notice(b"N\0\0\0\x07\0xy"),
            Err(NoticeError::TrailingBytes(2))
        );
        // Over the limit, whatever its content.
        let mut long = vec![b'N'];
        long.extend_from_slice(&(MAX_NOTICE_LEN as u32).to_be_bytes());
        long.resize(MAX_NOTICE_LEN + 1, b'x');
        assert_eq!(
            decode_notice(&long),
            Err(NoticeError::TooLong(MAX_NOTICE_LEN + 1))
        );
        // A minimal notice is fine.
        assert_eq!(decode_notice(b"N\0\0\0\x05\0"), Ok(NoticeFields::default()));
    }

    #[test]
    fn every_truncation_of_a_real_notice_is_an_error_not_a_panic() {
        let message = cancelled_wait("01000");
        for end in 0..message.len() {
            assert!(decode_notice(&message[..end]).is_err(), "prefix of {end}");
        }
        // Truncated bytes with a length field patched to match them.
        for end in TAGGED_HEADER_LEN..message.len() {
            let mut cut = message[..end].to_vec();
            cut[1..5].copy_from_slice(&(end as u32 - 1).to_be_bytes());
            assert!(decode_notice(&cut).is_err(), "patched prefix of {end}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = (next() % 80) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| (next() % 6) as u8 + b'A' - 1).collect();
            for byte in bytes.iter_mut() {
                if next() % 4 == 0 {
                    *byte = 0;
                }
            }
            if len >= TAGGED_HEADER_LEN {
                bytes[0] = NOTICE_RESPONSE;
                bytes[1..5].copy_from_slice(&(len as u32 - 1).to_be_bytes());
            }
            if let Ok(fields) = decode_notice(&bytes) {
                let _ = SyncRepCut::from_notice(&fields);
            }
        }
    }
}
