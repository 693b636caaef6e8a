//! The untagged first packet of a PostgreSQL connection (StartupMessage,
//! SSLRequest, GSSENCRequest, CancelRequest) and the few backend messages
//! the proxy writes or rewrites itself (ErrorResponse, BackendKeyData,
//! CancelRequest to a server), as pure functions over byte buffers.
//!
//! Decoders never panic and never allocate before a packet is whole and its
//! length checked against [`MAX_STARTUP_PACKET_LENGTH`]; the proxy's IO code
//! only fills buffers and calls them. Nothing here is async.

use crate::wire::frame::{
    FrameError, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, LENGTH_FIELD_LEN, MAX_MESSAGE_LEN,
    MAX_STARTUP_PACKET_LENGTH, PROTOCOL_MAJOR_3, SSL_REQUEST_CODE, TAGGED_HEADER_LEN, TAG_LEN,
};

/// Tag of BackendKeyData.
pub const BACKEND_KEY_DATA: u8 = b'K';
/// Tag of ReadyForQuery.
pub const READY_FOR_QUERY: u8 = b'Z';
/// Tag of ErrorResponse.
pub const ERROR_RESPONSE: u8 = b'E';
/// Tag of AuthenticationRequest.
pub const AUTHENTICATION: u8 = b'R';

/// Tag of NegotiateProtocolVersion.
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

/// Size of a protocol 3.0 CancelRequest packet: length, code, pid, secret.
pub const CANCEL_REQUEST_LEN: usize = 16;

/// Longest cancel key protocol 3.2 allows.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// The newest protocol 3 minor version the proxy serves to clients: 3.2,
/// whose only change from 3.0 is the cancel key's length, which the proxy
/// owns (it hands out its own keys). Servers are always asked for 3.0.
pub const NEWEST_MINOR: u32 = 2;

/// Length of the keys the proxy hands to protocol 3.2 clients, as long as
/// PostgreSQL 18's; 3.0 and 3.1 clients get the 4 bytes 3.0 defines.
pub const LONG_CANCEL_KEY_LEN: usize = 32;

/// Prefix of protocol options in a StartupMessage; the proxy knows none.
const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// The first packet a client sends, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeStartup {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        pid: u32,
        /// 4 bytes in protocol 3.0, up to [`MAX_CANCEL_KEY_LEN`] in 3.2.
        key: Vec<u8>,
    },
    /// A protocol 3 StartupMessage: the minor version asked for, its
    /// parameters and its raw bytes (to forward unchanged when they suit).
    Startup {
        minor: u32,
        params: Vec<(String, String)>,
        raw: Vec<u8>,
    },
}

impl FeStartup {
    /// The value of a startup parameter (`user`, `database`, ...); of a
    /// repeated one the last, as PostgreSQL resolves it.
    pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Why a first packet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unsupported frontend protocol {major}.{minor}: the proxy supports 3.x")]
    UnsupportedProtocol { major: u32, minor: u32 },
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at.checked_add(4)?)?;
    let mut word = [0; 4];
    word.copy_from_slice(slice);
    Some(u32::from_be_bytes(word))
}

/// Decodes the first packet in `buf`: `Ok(None)` while more bytes are
/// needed, else the packet and how many bytes it used.
pub fn decode_startup(buf: &[u8]) -> Result<Option<(FeStartup, usize)>, StartupError> {
    let Some(length) = be_u32(buf, 0) else {
        return Ok(None);
    };
    let body_len = length
        .checked_sub(LENGTH_FIELD_LEN as u32)
        .ok_or(FrameError::LengthTooSmall { tag: None, length })?;
    if body_len < 4 {
        return Err(FrameError::StartupPacketTooShort { body_len }.into());
    }
    if body_len > MAX_STARTUP_PACKET_LENGTH {
        return Err(FrameError::StartupPacketTooLong { body_len }.into());
    }
    // body_len <= 10_000, so this cannot overflow.
    let total = length as usize;
    let Some(packet) = buf.get(..total) else {
        return Ok(None);
    };
    let code = be_u32(packet, 4).ok_or(StartupError::Malformed("no protocol code"))?;
    let decoded = match code {
        SSL_REQUEST_CODE => FeStartup::SslRequest,
        GSSENC_REQUEST_CODE => FeStartup::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let pid = be_u32(packet, 8).ok_or(StartupError::Malformed("short CancelRequest"))?;
            // Protocol 3.2: the key runs to the end of the packet.
            let key = packet.get(12..).unwrap_or_default();
            if !(4..=MAX_CANCEL_KEY_LEN).contains(&key.len()) {
                return Err(StartupError::Malformed(
                    "CancelRequest key of an invalid length",
                ));
            }
            FeStartup::CancelRequest {
                pid,
                key: key.to_vec(),
            }
        }
        // Any 3.x: see [`serve_protocol`] for what a newer minor gets.
        code if code >> 16 == PROTOCOL_MAJOR_3 => FeStartup::Startup {
            minor: code & 0xFFFF,
            params: decode_params(packet.get(8..).unwrap_or_default())?,
            raw: packet.to_vec(),
        },
        code => {
            return Err(StartupError::UnsupportedProtocol {
                major: code >> 16,
                minor: code & 0xFFFF,
            })
        }
    };
    Ok(Some((decoded, total)))
}

/// Startup parameters: NUL-terminated name/value pairs ending with a NUL.
fn decode_params(mut bytes: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    let next = |bytes: &mut &[u8]| -> Result<String, StartupError> {
        let end = bytes
            .iter()
            .position(|byte| *byte == 0)
            .ok_or(StartupError::Malformed("unterminated parameter"))?;
        let text = std::str::from_utf8(bytes.get(..end).unwrap_or_default())
            .map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?
            .to_string();
        *bytes = bytes.get(end + 1..).unwrap_or_default();
        Ok(text)
    };
    loop {
        if bytes.first() == Some(&0) && bytes.len() == 1 {
            return Ok(params);
        }
        if bytes.is_empty() {
            return Err(StartupError::Malformed("missing final terminator"));
        }
        let name = next(&mut bytes)?;
        let value = next(&mut bytes)?;
        params.push((name, value));
    }
}

/// The tag and total length (tag included) of the first backend message in
/// `buf`, or `Ok(None)` while its header is incomplete.
pub fn backend_message_len(buf: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
    let (Some(&tag), Some(length)) = (buf.first(), be_u32(buf, 1)) else {
        return Ok(None);
    };
    let body_len =
        length
            .checked_sub(LENGTH_FIELD_LEN as u32)
            .ok_or(FrameError::LengthTooSmall {
                tag: Some(tag),
                length,
            })?;
    if body_len > MAX_MESSAGE_LEN {
        return Err(FrameError::MessageTooLong {
            tag: Some(tag),
            body_len,
            limit: MAX_MESSAGE_LEN,
        });
    }
    Ok(Some((tag, body_len as usize + TAGGED_HEADER_LEN)))
}

/// Size of a protocol 3.0 BackendKeyData: tag, length, pid, secret.
const BACKEND_KEY_DATA_LEN: usize = 13;

/// Decodes a whole BackendKeyData message (tag included) into pid and secret.
/// Protocol 3.2's longer secrets are not decoded (the proxy asks for 3.0),
/// and neither is a message whose length field disagrees with its size:
/// the key the proxy would record is then not the one the server meant.
pub fn decode_backend_key_data(message: &[u8]) -> Option<(u32, u32)> {
    let declared = be_u32(message, TAG_LEN)?;
    if message.first() != Some(&BACKEND_KEY_DATA)
        || message.len() != BACKEND_KEY_DATA_LEN
        || usize::try_from(declared) != Ok(BACKEND_KEY_DATA_LEN - TAG_LEN)
    {
        return None;
    }
    Some((be_u32(message, 5)?, be_u32(message, 9)?))
}

/// A BackendKeyData message; `secret` is 4 bytes in protocol 3.0 and at
/// most [`MAX_CANCEL_KEY_LEN`] in 3.2 (the proxy's own keys, so bounded).
pub fn backend_key_data(pid: u32, secret: &[u8]) -> Vec<u8> {
    let length = LENGTH_FIELD_LEN + 4 + secret.len();
    let mut out = Vec::with_capacity(TAG_LEN + length);
    out.push(BACKEND_KEY_DATA);
    out.extend_from_slice(&(length as u32).to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(secret);
    out
}

/// How the proxy serves a client's StartupMessage over a server that
/// speaks protocol 3.0, as a PostgreSQL 18 server would answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolPlan {
    /// The startup packet for the server: the client's own when it asked
    /// for plain 3.0, else a 3.0 one without the `_pq_.` options.
    pub to_server: Vec<u8>,
    /// NegotiateProtocolVersion for the client, first: when it asked for a
    /// minor newer than [`NEWEST_MINOR`] or for protocol options.
    pub negotiate: Option<Vec<u8>>,
    /// Length of the cancel key the client gets.
    pub cancel_key_len: usize,
}

/// Plans the answer to a StartupMessage of minor version `minor`.
pub fn serve_protocol(minor: u32, params: &[(String, String)], raw: &[u8]) -> ProtocolPlan {
    let served = minor.min(NEWEST_MINOR);
    let (options, plain): (Vec<_>, Vec<_>) = params
        .iter()
        .partition(|(name, _)| name.starts_with(PROTOCOL_OPTION_PREFIX));
    let to_server = if minor == 0 && options.is_empty() {
        raw.to_vec()
    } else {
        let plain: Vec<_> = plain
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        startup_message(&plain)
    };
    let negotiate = (minor > NEWEST_MINOR || !options.is_empty()).then(|| {
        let names: Vec<&str> = options.iter().map(|(name, _)| name.as_str()).collect();
        negotiate_protocol_version(served, &names)
    });
    ProtocolPlan {
        to_server,
        negotiate,
        cancel_key_len: if served >= 2 { LONG_CANCEL_KEY_LEN } else { 4 },
    }
}

/// A NegotiateProtocolVersion: the newest minor served and the protocol
/// options not recognised (bounded by the startup packet they came in).
fn negotiate_protocol_version(minor: u32, options: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&minor.to_be_bytes());
    body.extend_from_slice(&(options.len() as u32).to_be_bytes());
    for option in options {
        body.extend_from_slice(option.as_bytes());
        body.push(0);
    }
    let mut out = vec![NEGOTIATE_PROTOCOL_VERSION];
    out.extend_from_slice(&((body.len() + LENGTH_FIELD_LEN) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An SSLRequest packet for a server: the proxy's own, before its
/// startup packet or CancelRequest.
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// A CancelRequest packet for a server.
pub fn cancel_request(pid: u32, secret: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(CANCEL_REQUEST_LEN);
    out.extend_from_slice(&(CANCEL_REQUEST_LEN as u32).to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    out
}

/// Severity of an ErrorResponse the proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An ErrorResponse with severity, SQLSTATE and message (NULs removed).
pub fn error_response(severity: Severity, code: &str, message: &str) -> Vec<u8> {
    let severity = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let mut body = Vec::with_capacity(32 + message.len());
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend(value.bytes().filter(|byte| *byte != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + TAGGED_HEADER_LEN);
    out.push(ERROR_RESPONSE);
    // Bounded by the message text the proxy itself writes.
    out.extend_from_slice(&((body.len() + LENGTH_FIELD_LEN) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The SQLSTATE of a whole ErrorResponse message (tag included).
pub fn error_code(message: &[u8]) -> Option<&str> {
    error_field(message, b'C')
}

/// The primary message of a whole ErrorResponse message (tag included).
pub fn error_message(message: &[u8]) -> Option<&str> {
    error_field(message, b'M')
}

/// Whether a whole ErrorResponse ends the server's connection (severity
/// FATAL or PANIC, as PostgreSQL 9.6 and later send it untranslated).
pub fn ends_connection(message: &[u8]) -> bool {
    matches!(error_field(message, b'V'), Some("FATAL" | "PANIC"))
}

/// One field of a whole ErrorResponse message (tag included).
fn error_field(message: &[u8], wanted: u8) -> Option<&str> {
    if message.first() != Some(&ERROR_RESPONSE) {
        return None;
    }
    let mut fields = message.get(TAGGED_HEADER_LEN..)?;
    while let Some((&field, rest)) = fields.split_first() {
        if field == 0 {
            return None;
        }
        let end = rest.iter().position(|byte| *byte == 0)?;
        let value = rest.get(..end)?;
        if field == wanted {
            return std::str::from_utf8(value).ok();
        }
        fields = rest.get(end + 1..)?;
    }
    None
}

/// A StartupMessage for protocol 3.0 with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&crate::wire::frame::PROTOCOL_3_0.to_be_bytes());
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + LENGTH_FIELD_LEN) as u32)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_message_round_trips_and_needs_whole_packet() {
        let packet = startup_message(&[("user", "alice"), ("database", "shop")]);
        assert_eq!(decode_startup(&packet[..packet.len() - 1]).unwrap(), None);
        let (decoded, used) = decode_startup(&packet).unwrap().unwrap();
        assert_eq!(used, packet.len());
        let FeStartup::Startup { params, raw, .. } = decoded else {
            panic!("not a startup message");
        };
        assert_eq!(FeStartup::param(&params, "database"), Some("shop"));
        assert_eq!(raw, packet);
        // Repeated, the last wins, as in PostgreSQL; and 3.2 is accepted.
        let mut repeated = startup_message(&[
            ("database", "pgmirror"),
            ("user", "a"),
            ("database", "shop"),
        ]);
        repeated[4..8].copy_from_slice(&((3u32 << 16) | 2).to_be_bytes());
        let (FeStartup::Startup { params, .. }, _) = decode_startup(&repeated).unwrap().unwrap()
        else {
            panic!("a protocol 3.2 startup message");
        };
        assert_eq!(FeStartup::param(&params, "database"), Some("shop"));
    }

    #[test]
    fn special_requests_decode() {
        let cancel = cancel_request(7, 9);
        assert_eq!(
            decode_startup(&cancel).unwrap().unwrap().0,
            FeStartup::CancelRequest {
                pid: 7,
                key: 9u32.to_be_bytes().to_vec()
            }
        );
        // Protocol 3.2: a longer key runs to the end of the packet.
        let mut long = 48u32.to_be_bytes().to_vec();
        long.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        long.extend_from_slice(&7u32.to_be_bytes());
        long.extend_from_slice(&[1; 36]);
        assert_eq!(
            decode_startup(&long).unwrap().unwrap().0,
            FeStartup::CancelRequest {
                pid: 7,
                key: vec![1; 36]
            }
        );
        let mut short = 14u32.to_be_bytes().to_vec();
        short.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        short.extend_from_slice(&[0; 6]);
        assert!(decode_startup(&short).is_err());
        assert_eq!(
            decode_startup(&ssl_request()).unwrap().unwrap().0,
            FeStartup::SslRequest
        );
    }

    #[test]
    fn bad_packets_are_errors_not_panics() {
        let huge = 20_000u32.to_be_bytes();
        assert!(matches!(
            decode_startup(&huge),
            Err(StartupError::Frame(FrameError::StartupPacketTooLong { .. }))
        ));
        assert!(decode_startup(&[0, 0, 0, 2]).is_err());
        assert!(decode_startup(&[0, 0, 0, 4, 0, 0]).is_err());
        let mut v2 = 8u32.to_be_bytes().to_vec();
        v2.extend_from_slice(&(2u32 << 16).to_be_bytes());
        assert!(matches!(
            decode_startup(&v2),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        // Unterminated parameters.
        let mut bad = startup_message(&[("user", "x")]);
        let last = bad.len() - 1;
        bad[last] = b'y';
        bad[last - 1] = b'y';
        assert!(decode_startup(&bad).is_err());
        // Any prefix of garbage never panics.
        let garbage: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        for end in 0..garbage.len() {
            let _ = decode_startup(&garbage[..end]);
            let _ = backend_message_len(&garbage[..end]);
        }
    }

    #[test]
    fn backend_messages() {
        let key = backend_key_data(1, &2u32.to_be_bytes());
        assert_eq!(backend_message_len(&key).unwrap(), Some((b'K', 13)));
        assert_eq!(decode_backend_key_data(&key), Some((1, 2)));
        // Thirteen bytes whose length field says otherwise are not a key.
        let mut lying = key.clone();
        lying[1..5].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(decode_backend_key_data(&lying), None);
        // Protocol 3.2's longer secret is not decoded either (servers are
        // asked for 3.0), though the proxy writes one for 3.2 clients.
        let long_key = backend_key_data(7, &[7; 36]);
        assert_eq!(backend_message_len(&long_key).unwrap(), Some((b'K', 45)));
        assert_eq!(decode_backend_key_data(&long_key), None);
        let error = error_response(Severity::Fatal, "57P01", "bye");
        assert_eq!(
            backend_message_len(&error).unwrap(),
            Some((b'E', error.len()))
        );
        assert_eq!(error_code(&error), Some("57P01"));
        assert_eq!(error_code(&key), None);
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn newer_protocols_are_served_as_postgresql_18_serves_them() {
        let plain = params(&[("user", "a"), ("database", "d")]);
        let raw_3_0 = startup_message(&[("user", "a"), ("database", "d")]);
        // 3.0: the client's packet as it came, a 4-byte key.
        let plan = serve_protocol(0, &plain, &raw_3_0);
        assert_eq!(
            (
                plan.to_server.as_slice(),
                plan.negotiate,
                plan.cancel_key_len
            ),
            (raw_3_0.as_slice(), None, 4)
        );
        // 3.2: served without negotiation, the server asked for 3.0, a long key.
        let plan = serve_protocol(2, &plain, b"ignored");
        assert_eq!(
            (
                plan.to_server.as_slice(),
                plan.negotiate,
                plan.cancel_key_len
            ),
            (raw_3_0.as_slice(), None, LONG_CANCEL_KEY_LEN)
        );
        // 3.9 with an option: NegotiateProtocolVersion down to 3.2, the
        // option listed and kept from the server.
        let with_option = params(&[("user", "a"), ("_pq_.compression", "on"), ("database", "d")]);
        let plan = serve_protocol(9, &with_option, b"ignored");
        assert_eq!(plan.to_server, raw_3_0);
        assert_eq!(plan.cancel_key_len, LONG_CANCEL_KEY_LEN);
        let mut expected = vec![NEGOTIATE_PROTOCOL_VERSION];
        expected.extend_from_slice(&29u32.to_be_bytes());
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(b"_pq_.compression\0");
        assert_eq!(plan.negotiate, Some(expected.clone()));
        assert_eq!(
            backend_message_len(&expected).unwrap(),
            Some((b'v', expected.len()))
        );
        // 3.0 with an option: negotiated down to 3.0, a 4-byte key.
        let plan = serve_protocol(0, &with_option, b"ignored");
        assert_eq!(plan.cancel_key_len, 4);
        assert_eq!(plan.negotiate.unwrap()[5..9], 0u32.to_be_bytes());
    }
}
