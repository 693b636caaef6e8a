//! The authentication messages the proxy speaks itself when it
//! authenticates clients (proxy-side authentication): the backend's
//! AuthenticationRequest variants (Ok, MD5Password, SASL, SASLContinue,
//! SASLFinal) and the frontend's PasswordMessage / SASLInitialResponse /
//! SASLResponse (all tagged 'p'), as pure encoders and decoders.
//!
//! Decoders take whole messages, check every length before they slice and
//! never panic; the bound on a frontend message is PostgreSQL's own
//! [`MAX_AUTH_TOKEN_LEN`]. What the SCRAM or md5 payloads mean is
//! `proxy::auth`'s business. Nothing here is async.

use crate::wire::frame::{LENGTH_FIELD_LEN, TAGGED_HEADER_LEN};
use crate::wire::startup::AUTHENTICATION;

/// Tag of PasswordMessage, SASLInitialResponse and SASLResponse.
pub const PASSWORD_MESSAGE: u8 = b'p';

/// Longest body of a frontend authentication message PostgreSQL reads:
/// `PG_MAX_AUTH_TOKEN_LENGTH` in src/include/libpq/auth.h.
pub const MAX_AUTH_TOKEN_LEN: usize = 65535;

const AUTH_OK: u32 = 0;
const AUTH_MD5_PASSWORD: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

/// An AuthenticationRequest ('R'), decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeAuth {
    Ok,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    /// A method the proxy does not answer (cleartext, GSS, SSPI...).
    Other(u32),
}

/// An authentication message that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthWireError {
    #[error("malformed authentication message: {0}")]
    Malformed(&'static str),
    #[error("authentication message of {0} bytes, longer than PostgreSQL's {MAX_AUTH_TOKEN_LEN}")]
    TooLong(usize),
    #[error("expected a password message ('p'), got tag {0:?}")]
    UnexpectedTag(char),
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TAGGED_HEADER_LEN + body.len());
    out.push(tag);
    // Bodies are the proxy's own or bounded by MAX_AUTH_TOKEN_LEN.
    out.extend_from_slice(&((body.len() + LENGTH_FIELD_LEN) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Encodes an AuthenticationRequest.
pub fn authentication(request: &BeAuth) -> Vec<u8> {
    let mut body = Vec::new();
    let (code, payload): (u32, &[u8]) = match request {
        BeAuth::Ok => (AUTH_OK, &[]),
        BeAuth::Md5Password { salt } => (AUTH_MD5_PASSWORD, salt),
        BeAuth::Sasl { mechanisms } => {
            body.extend_from_slice(&AUTH_SASL.to_be_bytes());
            for mechanism in mechanisms {
                body.extend_from_slice(mechanism.as_bytes());
                body.push(0);
            }
            body.push(0);
            return tagged(AUTHENTICATION, &body);
        }
        BeAuth::SaslContinue(data) => (AUTH_SASL_CONTINUE, data),
        BeAuth::SaslFinal(data) => (AUTH_SASL_FINAL, data),
        BeAuth::Other(code) => (*code, &[]),
    };
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(payload);
    tagged(AUTHENTICATION, &body)
}

/// Decodes a whole AuthenticationRequest message (tag included).
pub fn decode_authentication(message: &[u8]) -> Result<BeAuth, AuthWireError> {
    if message.first() != Some(&AUTHENTICATION) {
        return Err(AuthWireError::Malformed("not an authentication request"));
    }
    let body = message.get(TAGGED_HEADER_LEN..).unwrap_or_default();
    let (code, payload) = match (body.get(..4), body.get(4..)) {
        (Some(code), Some(payload)) => {
            let mut word = [0; 4];
            word.copy_from_slice(code);
            (u32::from_be_bytes(word), payload)
        }
        _ => return Err(AuthWireError::Malformed("no request code")),
    };
    Ok(match code {
        AUTH_OK => BeAuth::Ok,
        AUTH_MD5_PASSWORD => {
            let salt = payload
                .try_into()
                .map_err(|_| AuthWireError::Malformed("md5 salt is not 4 bytes"))?;
            BeAuth::Md5Password { salt }
        }
        AUTH_SASL => {
            let mut mechanisms = Vec::new();
            for name in payload.split(|byte| *byte == 0) {
                if name.is_empty() {
                    break;
                }
                let name = std::str::from_utf8(name)
                    .map_err(|_| AuthWireError::Malformed("SASL mechanism is not UTF-8"))?;
                mechanisms.push(name.to_string());
            }
            BeAuth::Sasl { mechanisms }
        }
        AUTH_SASL_CONTINUE => BeAuth::SaslContinue(payload.to_vec()),
        AUTH_SASL_FINAL => BeAuth::SaslFinal(payload.to_vec()),
        other => BeAuth::Other(other),
    })
}

/// The body length of a frontend password message from its 5-byte header,
/// checked against [`MAX_AUTH_TOKEN_LEN`] before anything is allocated.
pub fn password_message_body_len(header: [u8; TAGGED_HEADER_LEN]) -> Result<usize, AuthWireError> {
    let [tag, length @ ..] = header;
    if tag != PASSWORD_MESSAGE {
        return Err(AuthWireError::UnexpectedTag(char::from(tag)));
    }
    let length = u32::from_be_bytes(length) as usize;
    let body = length
        .checked_sub(LENGTH_FIELD_LEN)
        .ok_or(AuthWireError::Malformed(
            "length shorter than its own field",
        ))?;
    if body > MAX_AUTH_TOKEN_LEN {
        return Err(AuthWireError::TooLong(body));
    }
    Ok(body)
}

/// A PasswordMessage carrying a NUL-terminated password (an md5 answer).
pub fn password_message(password: &str) -> Vec<u8> {
    let mut body = password.as_bytes().to_vec();
    body.push(0);
    tagged(PASSWORD_MESSAGE, &body)
}

/// The password of a PasswordMessage body (without its NUL).
pub fn decode_password(body: &[u8]) -> Result<&str, AuthWireError> {
    let text = body
        .strip_suffix(&[0])
        .ok_or(AuthWireError::Malformed("password not NUL-terminated"))?;
    std::str::from_utf8(text).map_err(|_| AuthWireError::Malformed("password is not UTF-8"))
}

/// A SASLInitialResponse: mechanism name, then the length-prefixed data.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as u32).to_be_bytes());
    body.extend_from_slice(data);
    tagged(PASSWORD_MESSAGE, &body)
}

/// The mechanism and data of a SASLInitialResponse body.
pub fn decode_sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8]), AuthWireError> {
    let end = body
        .iter()
        .position(|byte| *byte == 0)
        .ok_or(AuthWireError::Malformed(
            "SASL mechanism not NUL-terminated",
        ))?;
    let mechanism = std::str::from_utf8(body.get(..end).unwrap_or_default())
        .map_err(|_| AuthWireError::Malformed("SASL mechanism is not UTF-8"))?;
    let rest = body.get(end + 1..).unwrap_or_default();
    let (Some(length), Some(data)) = (rest.get(..4), rest.get(4..)) else {
        return Err(AuthWireError::Malformed("SASL data length missing"));
    };
    let mut word = [0; 4];
    word.copy_from_slice(length);
    // The protocol's -1 ("no initial response") is refused too: SCRAM
    // always starts with data.
    if u32::from_be_bytes(word) as usize != data.len() {
        return Err(AuthWireError::Malformed("SASL data length disagrees"));
    }
    Ok((mechanism, data))
}

/// A SASLResponse: the data alone.
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    tagged(PASSWORD_MESSAGE, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            BeAuth::Ok,
            BeAuth::Md5Password { salt: [1, 2, 3, 4] },
            BeAuth::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            },
            BeAuth::SaslContinue(b"r=abc,s=xyz,i=4096".to_vec()),
            BeAuth::SaslFinal(b"v=xyz".to_vec()),
            BeAuth::Other(3),
        ] {
            let encoded = authentication(&request);
            assert_eq!(
                crate::wire::startup::backend_message_len(&encoded).unwrap(),
                Some((AUTHENTICATION, encoded.len()))
            );
            assert_eq!(decode_authentication(&encoded).unwrap(), request);
        }
    }

    #[test]
    fn frontend_messages_round_trip_and_bad_ones_are_errors() {
        let initial = sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc");
        let header: [u8; 5] = initial[..5].try_into().unwrap();
        assert_eq!(
            password_message_body_len(header).unwrap(),
            initial.len() - 5
        );
        assert_eq!(
            decode_sasl_initial_response(&initial[5..]).unwrap(),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );
        let password = password_message("md5abc");
        assert_eq!(decode_password(&password[5..]).unwrap(), "md5abc");
        assert_eq!(sasl_response(b"c=biws")[5..], b"c=biws"[..]);

        let mut huge = [PASSWORD_MESSAGE, 0, 0, 0, 0];
        huge[1..].copy_from_slice(&1_000_000u32.to_be_bytes());
        assert!(matches!(
            password_message_body_len(huge),
            Err(AuthWireError::TooLong(_))
        ));
        assert!(password_message_body_len([b'Q', 0, 0, 0, 4]).is_err());
        assert!(password_message_body_len([b'p', 0, 0, 0, 3]).is_err());
        let garbage: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(91)).collect();
        for end in 0..garbage.len() {
            let _ = decode_sasl_initial_response(&garbage[..end]);
            let _ = decode_password(&garbage[..end]);
            let mut message = vec![AUTHENTICATION, 0, 0, 0, 0];
            message.extend_from_slice(&garbage[..end]);
            let _ = decode_authentication(&message);
        }
        assert!(decode_sasl_initial_response(b"SCRAM\0\0\0\0\x09abc").is_err());
    }
}
