//! The frontend messages a transaction-mode proxy rewrites (Query, Parse,
//! Bind, Describe, Close), decoded from and encoded to whole messages, and
//! the small backend messages it writes itself (ParseComplete, ReadyForQuery,
//! ParameterStatus, ...). Decoders never panic: a malformed message is None,
//! and the caller refuses the client with 08P01.

use crate::wire::frame::{LENGTH_FIELD_LEN, TAGGED_HEADER_LEN};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const CLOSE: u8 = b'C';
pub const EXECUTE: u8 = b'E';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const TERMINATE: u8 = b'X';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';

pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_STATUS: u8 = b'S';
pub const DATA_ROW: u8 = b'D';
pub const FUNCTION_RESULT: u8 = b'V';

/// What Describe and Close name: a prepared statement or a portal.
pub const TARGET_STATEMENT: u8 = b'S';
pub const TARGET_PORTAL: u8 = b'P';

/// A Parse message's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a str,
    pub query: &'a str,
    /// The parameter type count and OIDs, as sent.
    pub types: &'a [u8],
}

/// A message's body (after tag and length).
fn body(message: &[u8]) -> &[u8] {
    message.get(TAGGED_HEADER_LEN..).unwrap_or_default()
}

/// Splits a NUL-terminated string off the front.
fn cstr(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().position(|byte| *byte == 0)?;
    let text = std::str::from_utf8(bytes.get(..end)?).ok()?;
    Some((text, bytes.get(end + 1..)?))
}

/// A Query message's SQL text.
pub fn decode_query(message: &[u8]) -> Option<&str> {
    cstr(body(message)).map(|(text, _)| text)
}

pub fn decode_parse(message: &[u8]) -> Option<Parse<'_>> {
    let (statement, rest) = cstr(body(message))?;
    let (query, types) = cstr(rest)?;
    Some(Parse {
        statement,
        query,
        types,
    })
}

/// A Bind message's portal and statement names, and the rest of its body.
pub fn decode_bind(message: &[u8]) -> Option<(&str, &str, &[u8])> {
    let (portal, rest) = cstr(body(message))?;
    let (statement, rest) = cstr(rest)?;
    Some((portal, statement, rest))
}

/// A Describe or Close message's target kind and name.
pub fn decode_target(message: &[u8]) -> Option<(u8, &str)> {
    let (&kind, rest) = body(message).split_first()?;
    let (name, _) = cstr(rest)?;
    matches!(kind, TARGET_STATEMENT | TARGET_PORTAL).then_some((kind, name))
}

/// An Execute message's portal name.
pub fn decode_execute(message: &[u8]) -> Option<&str> {
    cstr(body(message)).map(|(portal, _)| portal)
}

/// A DataRow's values as text (None for NULL); a truncated row ends early.
pub fn decode_data_row(message: &[u8]) -> Vec<Option<String>> {
    let mut values = Vec::new();
    // The body starts with the column count.
    let mut rest = body(message).get(2..).unwrap_or_default();
    while let Some((len, after)) = rest.split_first_chunk::<4>() {
        rest = after;
        match usize::try_from(i32::from_be_bytes(*len)) {
            Ok(len) if len <= rest.len() => {
                values.push(Some(String::from_utf8_lossy(&rest[..len]).into_owned()));
                rest = &rest[len..];
            }
            Ok(_) => break,
            Err(_) => values.push(None),
        }
    }
    values
}

/// A message of `tag` whose body is `parts` concatenated.
pub fn message(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    let mut out = Vec::with_capacity(TAGGED_HEADER_LEN + len);
    out.push(tag);
    // Bodies here are bounded by messages that were themselves valid.
    out.extend_from_slice(&((len + LENGTH_FIELD_LEN) as u32).to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// `text` as a NUL-terminated string (NULs inside dropped).
fn c(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 1);
    put_c(&mut out, text);
    out
}

/// Appends `text` to `out` as [`c`] makes it.
fn put_c(out: &mut Vec<u8>, text: &str) {
    // A whole slice when there is no NUL (always, for the strings a server
    // reported): a byte-by-byte filter cost a login's greeting thousands of
    // instructions.
    if text.as_bytes().contains(&0) {
        out.extend(text.bytes().filter(|byte| *byte != 0));
    } else {
        out.extend_from_slice(text.as_bytes());
    }
    out.push(0);
}

pub fn encode_query(sql: &str) -> Vec<u8> {
    message(QUERY, &[&c(sql)])
}

pub fn encode_parse(statement: &str, query: &str, types: &[u8]) -> Vec<u8> {
    message(PARSE, &[&c(statement), &c(query), types])
}

pub fn encode_bind(portal: &str, statement: &str, rest: &[u8]) -> Vec<u8> {
    message(BIND, &[&c(portal), &c(statement), rest])
}

pub fn encode_target(tag: u8, kind: u8, name: &str) -> Vec<u8> {
    message(tag, &[&[kind], &c(name)])
}

pub fn ready_for_query(status: u8) -> Vec<u8> {
    message(b'Z', &[&[status]])
}

pub fn command_complete(tag: &str) -> Vec<u8> {
    message(COMMAND_COMPLETE, &[&c(tag)])
}

/// Appends a ParameterStatus to `out`, without a buffer of its own: a
/// login's greeting holds one for each parameter the server reports.
pub fn put_parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    out.reserve(parameter_status_len(name, value));
    let start = out.len();
    out.push(PARAMETER_STATUS);
    out.extend_from_slice(&[0; LENGTH_FIELD_LEN]);
    put_c(out, name);
    put_c(out, value);
    // Bounded by the server's own ParameterStatus messages.
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + TAGGED_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// The bytes of a ParameterStatus for `name` and `value`: header, and two
/// NUL-terminated strings.
pub fn parameter_status_len(name: &str, value: &str) -> usize {
    TAGGED_HEADER_LEN + name.len() + value.len() + 2
}

/// A ParameterStatus message's name and value.
pub fn decode_parameter_status(message: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(body(message))?;
    let (value, _) = cstr(rest)?;
    Some((name, value))
}

/// AuthenticationOk.
pub fn authentication_ok() -> Vec<u8> {
    message(b'R', &[&0u32.to_be_bytes()])
}

/// A message with an empty body (ParseComplete, BindComplete, NoData...).
pub fn empty(tag: u8) -> Vec<u8> {
    message(tag, &[])
}

/// A ParameterDescription without parameters.
pub fn no_parameters() -> Vec<u8> {
    message(PARAMETER_DESCRIPTION, &[&0u16.to_be_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bind_and_targets_round_trip() {
        let types = [0u8, 1, 0, 0, 0, 23];
        let parse = encode_parse("s1", "SELECT $1", &types);
        assert_eq!(
            decode_parse(&parse),
            Some(Parse {
                statement: "s1",
                query: "SELECT $1",
                types: &types
            })
        );
        let bind = encode_bind("", "s1", &[0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decode_bind(&bind),
            Some(("", "s1", &[0u8, 0, 0, 0, 0, 0][..]))
        );
        let close = encode_target(CLOSE, TARGET_STATEMENT, "s1");
        assert_eq!(decode_target(&close), Some((TARGET_STATEMENT, "s1")));
        assert_eq!(decode_query(&encode_query("SELECT 1")), Some("SELECT 1"));
        let mut status = vec![b'x'];
        put_parameter_status(&mut status, "application_name", "app");
        assert_eq!(status.len(), 1 + TAGGED_HEADER_LEN + 21);
        assert_eq!(
            decode_parameter_status(&status[1..]),
            Some(("application_name", "app"))
        );
        assert_eq!(
            status[1..],
            message(PARAMETER_STATUS, &[b"application_name\0", b"app\0"])[..]
        );
        assert_eq!(
            status.len(),
            1 + parameter_status_len("application_name", "app")
        );
        // A NUL inside a string would end it early: it is dropped.
        assert_eq!(
            decode_query(&encode_query("SELECT\0 1\0")),
            Some("SELECT 1")
        );
    }

    #[test]
    fn execute_and_data_row_decode() {
        let execute = message(EXECUTE, &[b"c1\0", &0i32.to_be_bytes()]);
        assert_eq!(decode_execute(&execute), Some("c1"));
        let null = (-1i32).to_be_bytes();
        let row = message(
            DATA_ROW,
            &[&2u16.to_be_bytes(), &2i32.to_be_bytes(), b"on", &null],
        );
        assert_eq!(decode_data_row(&row), [Some("on".into()), None]);
        // A length past the message's end stops the row, no panic.
        let cut = message(DATA_ROW, &[&1u16.to_be_bytes(), &9i32.to_be_bytes(), b"x"]);
        assert_eq!(decode_data_row(&cut), []);
    }

    #[test]
    fn malformed_messages_decode_to_none() {
        assert_eq!(decode_parse(b"P\0\0\0\x06s1"), None);
        assert_eq!(decode_target(b"D\0\0\0\x07Xs1\0"), None);
        assert_eq!(decode_query(b"Q"), None);
        assert_eq!(decode_bind(b""), None);
    }
}
