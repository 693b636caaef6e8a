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

/// Size of a CancelRequest packet: length, code, pid, secret
/// (protocol 3.0; 3.2's longer keys are not offered by the proxy).
pub const CANCEL_REQUEST_LEN: usize = 16;

/// Longest cancel key protocol 3.2 allows.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// The first packet a client sends, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeStartup {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        pid: u32,
        /// None: a protocol 3.2 key longer than the 4 bytes this proxy
        /// hands out, so none of its clients' keys.
        secret: Option<u32>,
    },
    /// A protocol 3 StartupMessage: its parameters and its raw bytes (to
    /// forward unchanged).
    Startup {
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
            let secret = match key.len() {
                4 => be_u32(key, 0),
                5..=MAX_CANCEL_KEY_LEN => None,
                _ => {
                    return Err(StartupError::Malformed(
                        "CancelRequest key of an invalid length",
                    ))
                }
            };
            FeStartup::CancelRequest { pid, secret }
        }
        // Any 3.x: the server answers a minor version it lacks with
        // NegotiateProtocolVersion, which the proxy relays.
        code if code >> 16 == PROTOCOL_MAJOR_3 => FeStartup::Startup {
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

/// A BackendKeyData message.
pub fn backend_key_data(pid: u32, secret: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(BACKEND_KEY_DATA_LEN);
    out.push(BACKEND_KEY_DATA);
    out.extend_from_slice(&((BACKEND_KEY_DATA_LEN - TAG_LEN) as u32).to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
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
        if field == b'C' {
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
        let FeStartup::Startup { params, raw } = decoded else {
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
                secret: Some(9)
            }
        );
        // Protocol 3.2: a longer key is parsed, and is none of the proxy's.
        let mut long = 48u32.to_be_bytes().to_vec();
        long.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        long.extend_from_slice(&7u32.to_be_bytes());
        long.extend_from_slice(&[1; 36]);
        assert_eq!(
            decode_startup(&long).unwrap().unwrap().0,
            FeStartup::CancelRequest {
                pid: 7,
                secret: None
            }
        );
        let mut short = 14u32.to_be_bytes().to_vec();
        short.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        short.extend_from_slice(&[0; 6]);
        assert!(decode_startup(&short).is_err());
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        assert_eq!(
            decode_startup(&ssl).unwrap().unwrap().0,
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
        let key = backend_key_data(1, 2);
        assert_eq!(backend_message_len(&key).unwrap(), Some((b'K', 13)));
        assert_eq!(decode_backend_key_data(&key), Some((1, 2)));
        // Thirteen bytes whose length field says otherwise are not a key.
        let mut lying = key.clone();
        lying[1..5].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(decode_backend_key_data(&lying), None);
        // Protocol 3.2's longer secret is not decoded either.
        let mut long_key = vec![BACKEND_KEY_DATA];
        long_key.extend_from_slice(&40u32.to_be_bytes());
        long_key.extend_from_slice(&[7; 36]);
        assert_eq!(decode_backend_key_data(&long_key), None);
        let error = error_response(Severity::Fatal, "57P01", "bye");
        assert_eq!(
            backend_message_len(&error).unwrap(),
            Some((b'E', error.len()))
        );
        assert_eq!(error_code(&error), Some("57P01"));
        assert_eq!(error_code(&key), None);
    }
}
