//! Property tests of every parser that reads bytes or text from outside the
//! process (wire frames, startup packets, replication messages, LSNs,
//! endpoints, admin statements, control frames, notices, authentication
//! messages, SCRAM exchanges and userlists, configuration files): they
//! never panic, refuse out-of-range lengths from the header alone, and give
//! back what an encoder wrote however the bytes arrive. `fuzz/` runs the
//! same parsers under libFuzzer for longer (not yet the authentication ones).

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use pgmirror::admin::statement::{self, PartnerOption, Statement};
use pgmirror::config::{self, Endpoint, PartnerConfig, ProxyConfig, WitnessConfig};
use pgmirror::control::codec::ControlCodec;
use pgmirror::control::{
    read_hello, Command, ControlError, Hello, PeerView, PromotionKind, PromotionRequest, Request,
    Response, StatusFigures, StreamPurpose, WitnessRequest, MAX_CONTROL_FRAME,
};
use pgmirror::roles::{Epoch, MirroringState, Role, Safety};
use pgmirror::wire::frame::{
    FrameError, FrameScanner, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_MESSAGE_LEN,
    MAX_STARTUP_PACKET_LENGTH, PREFIX_LEN, PROTOCOL_3_0, SSL_REQUEST_CODE,
};
use pgmirror::wire::lsn::Lsn;
use pgmirror::wire::notice::{decode_notice, NoticeError, NoticeFields, MAX_NOTICE_LEN};
use pgmirror::wire::replication::{
    decode_backend, decode_frontend, BeReplicationMessage, DecodeError, FeReplicationMessage,
    PRIMARY_KEEPALIVE_LEN, STANDBY_STATUS_UPDATE_LEN, XLOG_DATA_HEADER_LEN,
};
use pgmirror::wire::startup::{
    backend_key_data, backend_message_len, cancel_request, decode_backend_key_data, decode_startup,
    error_code, error_response, serve_protocol, startup_message, FeStartup, Severity, StartupError,
    BACKEND_KEY_DATA,
};

/// 512 cases per property unless `PROPTEST_CASES` says otherwise: enough
/// to catch shallow mistakes on every `cargo test` while the file stays
/// within seconds in the dev profile; `bench/fuzz` searches deeper.
fn cases() -> ProptestConfig {
    let from_env = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        from_env
    } else {
        ProptestConfig {
            cases: 512,
            ..from_env
        }
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Splits `stream` into consecutive chunks whose sizes cycle through
/// `sizes`, as a socket might deliver it.
fn chunked<'a>(stream: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = stream;
    let mut sizes = sizes.iter().cycle();
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = (*sizes.next()?).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// Chunk sizes from one byte (a header split everywhere) to a few frames.
fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1usize..8, 1usize..300], 1..16)
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// An untagged first packet with the given protocol code.
fn untagged(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut bytes = (rest.len() as u32 + 8).to_be_bytes().to_vec();
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(rest);
    bytes
}

fn protocol_code() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(PROTOCOL_3_0),
        Just(PROTOCOL_3_0 + 2),
        Just(SSL_REQUEST_CODE),
        Just(GSSENC_REQUEST_CODE),
        Just(CANCEL_REQUEST_CODE),
        any::<u32>(),
    ]
}

/// Startup parameter names and values: PostgreSQL strings cannot hold NUL.
fn param_text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

/// Pieces of a byte stream that get a parser past its first header: whole
/// messages, first packets, bare headers with any length, and garbage.
fn stream_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u8>(), vec(any::<u8>(), 0..100)).prop_map(|(tag, body)| tagged(tag, &body)),
        (protocol_code(), vec(any::<u8>(), 0..40)).prop_map(|(code, rest)| untagged(code, &rest)),
        (any::<u8>(), any::<u32>()).prop_map(|(tag, length)| {
            let mut header = vec![tag];
            header.extend_from_slice(&length.to_be_bytes());
            header
        }),
        vec(any::<u8>(), 0..16),
    ]
}

fn plausible_stream() -> impl Strategy<Value = Vec<u8>> {
    vec(stream_piece(), 0..10).prop_map(|pieces| pieces.concat())
}

/// First packets: valid StartupMessages (whole, cut short or with bytes
/// after them), special requests, and headers that lie about the length.
fn first_packet() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..24),
        (
            vec((param_text(), param_text()), 0..5),
            vec(any::<u8>(), 0..8),
            any::<bool>()
        )
            .prop_map(|(params, extra, cut)| {
                let params: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str()))
                    .collect();
                let mut packet = startup_message(&params);
                if cut {
                    packet.truncate(packet.len() - 1);
                }
                packet.extend(extra);
                packet
            }),
        (protocol_code(), vec(any::<u8>(), 0..48), -6i64..6).prop_map(|(code, rest, slack)| {
            let mut packet = untagged(code, &rest);
            let length = (packet.len() as i64 + slack).max(0) as u32;
            packet[..4].copy_from_slice(&length.to_be_bytes());
            packet
        }),
    ]
}

/// The declared startup lengths the postmaster refuses: below the length
/// field plus a protocol code, or above MAX_STARTUP_PACKET_LENGTH.
fn refused_startup_length() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..8, MAX_STARTUP_PACKET_LENGTH + 5..=u32::MAX]
}

proptest! {
    #![proptest_config(cases())]

    /// decode_startup follows the framing rules exactly on any input: a
    /// bad length is refused from the 4-byte header alone, a good one
    /// waits for the whole packet, and bytes after the packet are ignored.
    #[test]
    fn startup_decoder_obeys_the_length_field(buf in first_packet()) {
        let outcome = decode_startup(&buf);
        let Some(length) = be_u32(&buf, 0) else {
            prop_assert_eq!(outcome, Ok(None));
            return Ok(());
        };
        let refused = |error: FrameError| Err(StartupError::Frame(error));
        match length {
            0..=3 => prop_assert_eq!(
                outcome,
                refused(FrameError::LengthTooSmall { tag: None, length })
            ),
            4..=7 => prop_assert_eq!(
                outcome,
                refused(FrameError::StartupPacketTooShort { body_len: length - 4 })
            ),
            _ if length - 4 > MAX_STARTUP_PACKET_LENGTH => prop_assert_eq!(
                outcome,
                refused(FrameError::StartupPacketTooLong { body_len: length - 4 })
            ),
            _ if buf.len() < length as usize => prop_assert_eq!(outcome, Ok(None)),
            _ => {
                let packet = &buf[..length as usize];
                prop_assert_eq!(&outcome, &decode_startup(packet));
                if let Ok(Some((decoded, used))) = outcome {
                    prop_assert_eq!(used, packet.len());
                    if let FeStartup::Startup { minor, params, raw } = decoded {
                        prop_assert_eq!(raw, packet);
                        prop_assert_eq!(minor, be_u32(packet, 4).unwrap() & 0xFFFF);
                        for (name, value) in params {
                            prop_assert!(!name.contains('\0') && !value.contains('\0'));
                        }
                    }
                }
            }
        }
    }

    /// The proxy reads the 4-byte header and calls decode_startup on it
    /// before allocating the packet: an out-of-range length must fail
    /// right there, not ask for up to 4 GiB.
    #[test]
    fn startup_lengths_out_of_range_are_refused_from_the_header(
        length in refused_startup_length()
    ) {
        prop_assert!(decode_startup(&length.to_be_bytes()).is_err());
    }

    /// A StartupMessage gives back its parameters and raw bytes, and no
    /// strict prefix of it is mistaken for a whole packet.
    #[test]
    fn startup_message_round_trips(params in vec((param_text(), param_text()), 0..8)) {
        let borrowed: Vec<(&str, &str)> = params
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let packet = startup_message(&borrowed);
        let (decoded, used) = decode_startup(&packet).unwrap().unwrap();
        prop_assert_eq!(used, packet.len());
        prop_assert_eq!(decoded, FeStartup::Startup { minor: 0, params, raw: packet.clone() });
        for end in 0..packet.len() {
            prop_assert_eq!(decode_startup(&packet[..end]), Ok(None));
        }
    }

    #[test]
    fn cancel_request_round_trips(pid in any::<u32>(), secret in any::<u32>()) {
        let packet = cancel_request(pid, secret);
        prop_assert_eq!(
            decode_startup(&packet),
            Ok(Some((FeStartup::CancelRequest { pid, key: secret.to_be_bytes().to_vec() }, packet.len())))
        );
    }

    /// Whatever a client asks for, the server gets a protocol 3.0 startup
    /// with the client's ordinary parameters and none of its `_pq_.`
    /// options; the client is told of those options, and gets a long key
    /// exactly when it asked for 3.2 or newer.
    #[test]
    fn newer_protocols_reach_the_server_as_3_0(
        minor in 0u32..6,
        params in vec((prop_oneof![param_text(), param_text().prop_map(|name| format!("_pq_.{name}"))], param_text()), 0..6),
    ) {
        let borrowed: Vec<(&str, &str)> = params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut raw = startup_message(&borrowed);
        raw[4..8].copy_from_slice(&((3u32 << 16) | minor).to_be_bytes());
        let plan = serve_protocol(minor, &params, &raw);
        let Ok(Some((FeStartup::Startup { minor: 0, params: sent, .. }, _))) = decode_startup(&plan.to_server) else {
            panic!("the server is asked for 3.0");
        };
        let (options, plain): (Vec<_>, Vec<_>) = params.into_iter().partition(|(n, _)| n.starts_with("_pq_."));
        prop_assert_eq!(sent, plain);
        prop_assert_eq!(plan.negotiate.is_some(), minor > 2 || !options.is_empty());
        if let Some(negotiate) = plan.negotiate {
            prop_assert_eq!(be_u32(&negotiate, 5), Some(minor.min(2)));
            prop_assert_eq!(be_u32(&negotiate, 9), Some(options.len() as u32));
        }
        prop_assert_eq!(plan.cancel_key_len, if minor >= 2 { 32 } else { 4 });
    }
}

/// Messages as the proxy's authentication phase sees them, including
/// BackendKeyData with the 3.0 key, 3.2's longer keys, and liars.
fn backend_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u32>(), any::<u32>())
            .prop_map(|(pid, secret)| backend_key_data(pid, &secret.to_be_bytes())),
        (any::<u32>(), vec(any::<u8>(), 5..=256))
            .prop_map(|(pid, secret)| backend_key_data(pid, &secret)),
        vec(any::<u8>(), 0..300).prop_map(|body| tagged(BACKEND_KEY_DATA, &body)),
        (any::<u32>(), vec(any::<u8>(), 8..=8)).prop_map(|(length, key)| {
            let mut message = vec![BACKEND_KEY_DATA];
            message.extend_from_slice(&length.to_be_bytes());
            message.extend(key);
            message
        }),
        (any::<u8>(), vec(any::<u8>(), 0..100)).prop_map(|(tag, body)| tagged(tag, &body)),
        vec(any::<u8>(), 0..24),
    ]
}

proptest! {
    #![proptest_config(cases())]

    /// backend_message_len reports exactly the header's claim, or refuses
    /// it when it is below 4 or above PostgreSQL's MaxAllocSize.
    #[test]
    fn backend_message_len_obeys_the_length_field(buf in backend_message()) {
        let outcome = backend_message_len(&buf);
        let (Some(&tag), Some(length)) = (buf.first(), be_u32(&buf, 1)) else {
            prop_assert_eq!(outcome, Ok(None));
            return Ok(());
        };
        match length.checked_sub(4) {
            None => {
                let too_small = FrameError::LengthTooSmall { tag: Some(tag), length };
                prop_assert_eq!(outcome, Err(too_small));
            }
            Some(body_len) if body_len > MAX_MESSAGE_LEN => {
                let too_long = FrameError::MessageTooLong {
                    tag: Some(tag),
                    body_len,
                    limit: MAX_MESSAGE_LEN,
                };
                prop_assert_eq!(outcome, Err(too_long));
            }
            Some(body_len) => prop_assert_eq!(outcome, Ok(Some((tag, body_len as usize + 5)))),
        }
    }

    /// The proxy's authentication loop (take whole messages off a buffer
    /// filled by arbitrary reads) gives back exactly the messages sent.
    #[test]
    fn backend_messages_split_the_same_however_they_arrive(
        messages in vec((any::<u8>(), vec(any::<u8>(), 0..100)), 0..12),
        sizes in chunk_sizes(),
    ) {
        let sent: Vec<Vec<u8>> = messages.iter().map(|(tag, body)| tagged(*tag, body)).collect();
        let stream = sent.concat();
        let mut pending = Vec::new();
        let mut received = Vec::new();
        for chunk in chunked(&stream, &sizes) {
            pending.extend_from_slice(chunk);
            while let Some((tag, len)) = backend_message_len(&pending).unwrap() {
                let Some(message) = pending.get(..len) else { break };
                prop_assert_eq!(message.first(), Some(&tag));
                received.push(message.to_vec());
                pending.drain(..len);
            }
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(received, sent);
    }

    /// A BackendKeyData yields a key only when it is exactly the 3.0
    /// message for that key: a longer (3.2) or shorter key, a length field
    /// that disagrees with the bytes, or another tag yields none.
    #[test]
    fn backend_key_data_yields_a_key_only_for_the_exact_message(message in backend_message()) {
        let decoded = decode_backend_key_data(&message);
        let exact = message.len() == 13
            && message[0] == BACKEND_KEY_DATA
            && be_u32(&message, 1) == Some(12);
        prop_assert_eq!(decoded.is_some(), exact);
        if let Some((pid, secret)) = decoded {
            prop_assert_eq!(backend_key_data(pid, &secret.to_be_bytes()), message);
        }
    }

    #[test]
    fn error_response_round_trips_its_code(
        code in "[0-9A-Z]{5}",
        text in any::<String>(),
        fatal in any::<bool>(),
    ) {
        let severity = if fatal { Severity::Fatal } else { Severity::Error };
        let message = error_response(severity, &code, &text);
        prop_assert_eq!(backend_message_len(&message), Ok(Some((b'E', message.len()))));
        prop_assert_eq!(error_code(&message), Some(code.as_str()));
    }

    #[test]
    fn error_code_never_panics(message in backend_message()) {
        if let Some(code) = error_code(&message) {
            prop_assert!(!code.contains('\0'));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    tag: Option<u8>,
    body_len: u32,
    prefix: Vec<u8>,
    /// Offset just past the message in the whole stream.
    end: usize,
}

fn expected_seen(tag: Option<u8>, body: &[u8], end: usize) -> Seen {
    Seen {
        tag,
        body_len: body.len() as u32,
        prefix: body[..body.len().min(PREFIX_LEN)].to_vec(),
        end,
    }
}

/// Feeds `stream` in chunks and records every message and the error,
/// checking that an error is reported once and nothing is reported after it.
fn scan(
    scanner: &mut FrameScanner,
    stream: &[u8],
    sizes: &[usize],
) -> (Vec<Seen>, Option<FrameError>) {
    let mut seen = Vec::new();
    let mut error = None;
    let mut start = 0;
    for chunk in chunked(stream, sizes) {
        let seen_before = seen.len();
        let outcome = scanner.feed(chunk, |message| {
            seen.push(Seen {
                tag: message.tag,
                body_len: message.body_len,
                prefix: message.prefix.to_vec(),
                end: start + message.end,
            })
        });
        if error.is_some() {
            assert_eq!(outcome, Ok(()), "an error is reported once");
            assert_eq!(seen.len(), seen_before, "nothing is seen after an error");
        }
        if let Err(first) = outcome {
            assert!(scanner.is_failed());
            error = Some(first);
        }
        start += chunk.len();
    }
    (seen, error)
}

proptest! {
    #![proptest_config(cases())]

    /// Well-formed streams in both directions: every message is seen once,
    /// with its length, prefix and end offset, whatever the chunking.
    #[test]
    fn frame_scanner_finds_every_message_however_the_stream_is_chunked(
        params in vec((param_text(), param_text()), 0..4),
        messages in vec((any::<u8>(), vec(any::<u8>(), 0..200)), 0..12),
        frontend in any::<bool>(),
        sizes in chunk_sizes(),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        if frontend {
            let borrowed: Vec<(&str, &str)> = params
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            stream = startup_message(&borrowed);
            expected.push(expected_seen(None, &stream[4..], stream.len()));
        }
        for (tag, body) in &messages {
            stream.extend(tagged(*tag, body));
            expected.push(expected_seen(Some(*tag), body, stream.len()));
        }
        let mut scanner = if frontend { FrameScanner::frontend() } else { FrameScanner::backend() };
        let (seen, error) = scan(&mut scanner, &stream, &sizes);
        prop_assert_eq!(error, None);
        prop_assert_eq!(seen, expected);
        prop_assert!(scanner.at_message_boundary());
    }

    /// On any bytes, what the scanner reports (messages and first error)
    /// is the same fed whole or in pieces, and every message respects the
    /// limits the scanner enforces.
    #[test]
    fn frame_scanner_outcome_does_not_depend_on_chunking(
        stream in prop_oneof![plausible_stream(), vec(any::<u8>(), 0..200)],
        frontend in any::<bool>(),
        sizes in chunk_sizes(),
    ) {
        let scanner = || if frontend { FrameScanner::frontend() } else { FrameScanner::backend() };
        let whole = scan(&mut scanner(), &stream, &[stream.len().max(1)]);
        let pieces = scan(&mut scanner(), &stream, &sizes);
        prop_assert_eq!(&whole, &pieces);
        for message in &whole.0 {
            prop_assert_eq!(message.prefix.len(), (message.body_len as usize).min(PREFIX_LEN));
            prop_assert!(message.end <= stream.len());
            match message.tag {
                None => prop_assert!((4..=MAX_STARTUP_PACKET_LENGTH).contains(&message.body_len)),
                Some(_) => prop_assert!(message.body_len <= MAX_MESSAGE_LEN),
            }
        }
    }

    /// A header whose length is below 4 or above MaxAllocSize fails as
    /// soon as the header is complete, without waiting for a body.
    #[test]
    fn frame_scanner_refuses_out_of_range_lengths_from_the_header(
        tag in any::<u8>(),
        length in prop_oneof![0u32..4, MAX_MESSAGE_LEN + 5..=u32::MAX],
    ) {
        let mut header = vec![tag];
        header.extend_from_slice(&length.to_be_bytes());
        let (seen, error) = scan(&mut FrameScanner::backend(), &header, &[1]);
        prop_assert!(seen.is_empty());
        prop_assert!(matches!(
            error,
            Some(FrameError::LengthTooSmall { .. } | FrameError::MessageTooLong { .. })
        ), "{error:?}");
    }
}

/// A replication sub-message as the frame scanner hands it over: the
/// first PREFIX_LEN bytes of `fixed` followed by `data_len` unseen bytes.
fn as_seen(fixed: &[u8], data_len: u32) -> (Vec<u8>, u32) {
    let body_len = fixed.len() as u32 + data_len;
    let mut prefix = fixed.to_vec();
    prefix.resize(fixed.len().max((body_len as usize).min(PREFIX_LEN)), 0xAA);
    (prefix, body_len)
}

fn be_fields(tag: u8, fields: &[u64], flag: Option<u8>) -> Vec<u8> {
    let mut body = vec![tag];
    for field in fields {
        body.extend_from_slice(&field.to_be_bytes());
    }
    body.extend(flag);
    body
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn xlog_data_round_trips(
        start in any::<u64>(),
        end in any::<u64>(),
        time in any::<i64>(),
        data_len in prop_oneof![0u32..100, 0..=MAX_MESSAGE_LEN - XLOG_DATA_HEADER_LEN as u32],
    ) {
        let fixed = be_fields(b'w', &[start, end, time as u64], None);
        let (prefix, body_len) = as_seen(&fixed, data_len);
        prop_assert_eq!(
            decode_backend(&prefix, body_len),
            Ok(Some(BeReplicationMessage::XLogData {
                wal_start: Lsn(start),
                wal_end: Lsn(end),
                send_time: time,
                data_len,
            }))
        );
    }

    #[test]
    fn keepalive_round_trips(end in any::<u64>(), time in any::<i64>(), reply in any::<u8>()) {
        let body = be_fields(b'k', &[end, time as u64], Some(reply));
        prop_assert_eq!(
            decode_backend(&body, body.len() as u32),
            Ok(Some(BeReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(end),
                send_time: time,
                reply_requested: reply != 0,
            }))
        );
    }

    #[test]
    fn standby_status_update_round_trips(
        positions in any::<[u64; 3]>(),
        time in any::<i64>(),
        reply in any::<u8>(),
    ) {
        let [write, flush, apply] = positions;
        let body = be_fields(b'r', &[write, flush, apply, time as u64], Some(reply));
        prop_assert_eq!(
            decode_frontend(&body, body.len() as u32),
            Ok(Some(FeReplicationMessage::StandbyStatusUpdate {
                write: Lsn(write),
                flush: Lsn(flush),
                apply: Lsn(apply),
                send_time: time,
                reply_requested: reply != 0,
            }))
        );
    }

    /// Any prefix with any claimed body length: a known sub-message
    /// decodes only if both the prefix and the body hold its fixed part,
    /// and a truncation error says truthfully what was available.
    #[test]
    fn replication_decoders_check_the_fixed_part(
        mut prefix in vec(any::<u8>(), 0..=PREFIX_LEN),
        tag in prop::sample::select(b"wkrhx".to_vec()),
        body_len in prop_oneof![0u32..80, any::<u32>()],
    ) {
        if let Some(first) = prefix.first_mut() {
            *first = tag;
        }
        let available = prefix.len().min(body_len as usize);
        let check = |outcome: Result<bool, DecodeError>, needed: usize| match outcome {
            Ok(decoded) => decoded == (available >= needed),
            Err(DecodeError::Truncated { available: reported, needed: wanted, .. }) => {
                reported == available && wanted == needed && available < needed
            }
        };
        match prefix.first() {
            Some(b'w') => {
                let outcome = decode_backend(&prefix, body_len);
                if let Ok(Some(BeReplicationMessage::XLogData { data_len, .. })) = outcome {
                    prop_assert_eq!(data_len as usize, body_len as usize - XLOG_DATA_HEADER_LEN);
                }
                prop_assert!(check(outcome.map(|decoded| decoded.is_some()), XLOG_DATA_HEADER_LEN));
            }
            Some(b'k') => {
                let outcome = decode_backend(&prefix, body_len);
                prop_assert!(check(outcome.map(|decoded| decoded.is_some()), PRIMARY_KEEPALIVE_LEN));
            }
            Some(b'r') => {
                let outcome = decode_frontend(&prefix, body_len);
                prop_assert!(check(outcome.map(|decoded| decoded.is_some()), STANDBY_STATUS_UPDATE_LEN));
            }
            Some(b'h') => prop_assert_eq!(
                decode_frontend(&prefix, body_len),
                Ok(Some(FeReplicationMessage::HotStandbyFeedback))
            ),
            _ => {
                prop_assert_eq!(decode_backend(&prefix, body_len), Ok(None));
                prop_assert_eq!(decode_frontend(&prefix, body_len), Ok(None));
            }
        }
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn lsn_display_parse_round_trips(value in any::<u64>()) {
        let lsn = Lsn(value);
        prop_assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        let json = serde_json::to_string(&lsn).unwrap();
        prop_assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
    }

    /// pg_lsn's text form: 1 to 8 hex digits of either case on each side
    /// of '/', leading zeros allowed; PostgreSQL prints uppercase without
    /// zeros, so "0/16b3748" comes back as "0/16B3748".
    #[test]
    fn lsn_parses_exactly_the_pg_lsn_form(text in prop_oneof![
        "[0-9a-fA-F]{1,8}/[0-9a-fA-F]{1,8}",
        "[0-9a-fA-F/+ -]{0,20}",
        any::<String>(),
    ]) {
        let parsed = text.parse::<Lsn>();
        let halves = text.split_once('/').filter(|(high, low)| {
            [high, low].iter().all(|half| {
                (1..=8).contains(&half.len()) && half.bytes().all(|byte| byte.is_ascii_hexdigit())
            })
        });
        match halves {
            Some((high, low)) => {
                let lsn = parsed.unwrap();
                let high = u64::from_str_radix(high, 16).unwrap();
                let low = u64::from_str_radix(low, 16).unwrap();
                prop_assert_eq!(lsn, Lsn((high << 32) | low));
                prop_assert_eq!(lsn.to_string(), format!("{high:X}/{low:X}"));
            }
            None => prop_assert!(parsed.is_err()),
        }
    }
}

#[test]
fn lsn_matches_the_postgres_example() {
    let lsn: Lsn = "0/16B3748".parse().unwrap();
    assert_eq!(lsn, Lsn(0x16B_3748));
    assert_eq!(lsn.to_string(), "0/16B3748");
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
        any::<Ipv4Addr>().prop_map(|ip| ip.to_string()),
        any::<Ipv6Addr>().prop_map(|ip| ip.to_string()),
    ]
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (host(), 1u16..=u16::MAX).prop_map(|(host, port)| Endpoint { host, port })
}

proptest! {
    #![proptest_config(cases())]

    /// host:port, bracketed IPv6 and the reference's TCP:// form (any
    /// case) all parse to the endpoint written, which prints back.
    #[test]
    fn endpoint_round_trips(
        endpoint in endpoint(),
        scheme in prop::sample::select(vec!["", "TCP://", "tcp://", "Tcp://"]),
    ) {
        let written = format!("{scheme}{endpoint}");
        prop_assert_eq!(written.parse::<Endpoint>(), Ok(endpoint.clone()));
        let json = serde_json::to_string(&endpoint).unwrap();
        prop_assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), endpoint);
    }

    #[test]
    fn endpoint_refuses_port_zero_and_out_of_range(
        host in host(),
        port in prop_oneof![Just(0u32), 65_536u32..=u32::MAX],
    ) {
        let text = format!("{host}:{port}");
        prop_assert!(text.parse::<Endpoint>().is_err(), "{text} accepted");
    }

    /// Whatever text is accepted has a usable host and port, and prints as
    /// text that parses to the same endpoint (so configs and control
    /// messages carry it unchanged).
    #[test]
    fn accepted_endpoints_are_usable_and_stable(text in prop_oneof![
        "(tcp://|TCP://)?[\\[\\]a-z0-9:/ .]{0,16}:[+0-9]{0,6}",
        any::<String>(),
    ]) {
        if let Ok(endpoint) = text.parse::<Endpoint>() {
            prop_assert!(endpoint.port != 0);
            prop_assert!(!endpoint.host.is_empty());
            prop_assert!(!endpoint.host.contains(['/', ' ']));
            prop_assert_eq!(endpoint.to_string().parse::<Endpoint>(), Ok(endpoint));
        }
    }
}

/// A statement rendered as SQL: keywords to be written in any case, and
/// literal text (identifiers, strings, punctuation) kept as is.
#[derive(Debug, Clone)]
enum Sql {
    Keyword(&'static str),
    Text(String),
}

fn quoted(text: &str, quote: char) -> String {
    let doubled = text.replace(quote, &format!("{quote}{quote}"));
    format!("{quote}{doubled}{quote}")
}

/// A session name and how it is written: unquoted names fold to lower
/// case, double-quoted ones are kept exactly.
fn session() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        "[A-Za-z_][A-Za-z0-9_]{0,15}".prop_map(|name| (name.to_lowercase(), name)),
        "[^\u{0}]{1,12}".prop_map(|name| (name.clone(), quoted(&name, '"'))),
    ]
}

fn partner_option() -> impl Strategy<Value = (PartnerOption, Vec<Sql>)> {
    use PartnerOption::{Failover, ForceServiceAllowDataLoss, Off, Resume, Suspend, Timeout};
    prop_oneof![
        Just((Failover, vec![Sql::Keyword("FAILOVER")])),
        Just((
            ForceServiceAllowDataLoss,
            vec![Sql::Keyword("FORCE_SERVICE_ALLOW_DATA_LOSS")]
        )),
        Just((Suspend, vec![Sql::Keyword("SUSPEND")])),
        Just((Resume, vec![Sql::Keyword("RESUME")])),
        Just((Off, vec![Sql::Keyword("OFF")])),
        Just((
            PartnerOption::Safety(Safety::Full),
            vec![Sql::Keyword("SAFETY"), Sql::Keyword("FULL")]
        )),
        Just((
            PartnerOption::Safety(Safety::Off),
            vec![Sql::Keyword("SAFETY"), Sql::Keyword("OFF")]
        )),
        any::<u64>().prop_map(|seconds| (
            Timeout(seconds),
            vec![Sql::Keyword("TIMEOUT"), Sql::Text(seconds.to_string())]
        )),
    ]
}

fn admin_statement() -> impl Strategy<Value = (Statement, Vec<Sql>)> {
    let alter = |written: String| {
        vec![
            Sql::Keyword("ALTER"),
            Sql::Keyword("DATABASE"),
            Sql::Text(written),
            Sql::Keyword("SET"),
        ]
    };
    let set_partner =
        (session(), partner_option()).prop_map(move |((session, written), (option, words))| {
            let mut sql = alter(written);
            sql.push(Sql::Keyword("PARTNER"));
            sql.extend(words);
            (Statement::SetPartner { session, option }, sql)
        });
    let set_witness = (
        session(),
        prop::option::of(endpoint()),
        prop::sample::select(vec!["", "TCP://", "tcp://"]),
    )
        .prop_map(move |((session, written), witness, scheme)| {
            let mut sql = alter(written);
            sql.push(Sql::Keyword("WITNESS"));
            match &witness {
                Some(endpoint) => sql.extend([
                    Sql::Text("=".into()),
                    Sql::Text(quoted(&format!("{scheme}{endpoint}"), '\'')),
                ]),
                None => sql.push(Sql::Keyword("OFF")),
            }
            (Statement::SetWitness { session, witness }, sql)
        });
    let show = prop::sample::select(vec![
        (Statement::ShowClients, "CLIENTS"),
        (Statement::ShowServers, "SERVERS"),
        (Statement::ShowSessions, "SESSIONS"),
    ])
    .prop_map(|(statement, what)| (statement, vec![Sql::Keyword("SHOW"), Sql::Keyword(what)]));
    prop_oneof![set_partner, set_witness, show]
}

/// Writes `sql` with each keyword's letters in the case the bits of
/// `case_bits` say, and the separators (whitespace, comments) in turn.
fn render(sql: &[Sql], case_bits: u64, separators: &[&str], semicolons: usize) -> String {
    let mut text = String::new();
    let mut bit = 0;
    for (index, piece) in sql.iter().enumerate() {
        if index > 0 {
            text.push_str(separators[index % separators.len()]);
        }
        match piece {
            Sql::Keyword(word) => {
                for letter in word.chars() {
                    let upper = case_bits >> (bit % 64) & 1 == 1;
                    bit += 1;
                    text.push(if upper {
                        letter.to_ascii_uppercase()
                    } else {
                        letter.to_ascii_lowercase()
                    });
                }
            }
            Sql::Text(literal) => text.push_str(literal),
        }
    }
    text.push_str(&";".repeat(semicolons));
    text
}

/// Token soup from the console's vocabulary plus the tokenizer's tricky
/// starts (unterminated quotes and comments, dollar quoting, escapes).
fn admin_words() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "ALTER",
        "DATABASE",
        "shop",
        "SET",
        "PARTNER",
        "WITNESS",
        "=",
        "'w:5022'",
        "OFF",
        "SELECT",
        "*",
        "FROM",
        "sys",
        ".",
        "database_mirroring",
        "WHERE",
        "database_name",
        "TIMEOUT",
        "99999999999999999999999",
        "1.5e3",
        "-1",
        "SAFETY",
        "FULL",
        ";",
        "SHOW",
        "CLIENTS",
        "--",
        "/*",
        "*/",
        "'",
        "\"",
        "E'\\",
        "$$",
        "$a$",
        "U&'",
        "X'",
        "\u{0}",
        "é",
    ]);
    vec(word, 0..12).prop_map(|words| words.join(" "))
}

/// What may stand between two tokens: whitespace and both comment forms.
fn sql_separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![" ", "\n", "\t ", " /* c */ ", " -- c\n"])
}

proptest! {
    #![proptest_config(cases())]

    /// Every statement the console supports parses back to itself from
    /// SQL written in any keyword case, with any whitespace and comments
    /// between tokens and any number of trailing semicolons.
    #[test]
    fn admin_statements_round_trip(
        (expected, sql) in admin_statement(),
        case_bits in any::<u64>(),
        separators in vec(sql_separator(), 1..4),
        semicolons in 0usize..3,
    ) {
        let text = render(&sql, case_bits, &separators, semicolons);
        prop_assert_eq!(statement::parse(&text), Ok(expected), "{}", text);
    }

    /// Anything else is a syntax error that lists what is supported,
    /// never a panic.
    #[test]
    fn admin_parser_never_panics(text in prop_oneof![admin_words(), any::<String>()]) {
        if let Err(error) = statement::parse(&text) {
            prop_assert!(error.to_string().contains("supported statements"));
        }
    }
}

fn epoch() -> impl Strategy<Value = Epoch> {
    any::<u64>().prop_map(Epoch)
}

fn safety() -> impl Strategy<Value = Safety> {
    prop_oneof![Just(Safety::Full), Just(Safety::Off)]
}

fn promotion_kind() -> impl Strategy<Value = PromotionKind> {
    prop::sample::select(vec![
        PromotionKind::Automatic,
        PromotionKind::Manual,
        PromotionKind::Forced,
        PromotionKind::Handover,
    ])
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Suspend),
        Just(Command::Resume),
        safety().prop_map(Command::Safety),
        any::<u64>().prop_map(Command::Timeout),
        Just(Command::Failover),
        Just(Command::ForceServiceAllowDataLoss),
        Just(Command::Off),
        prop::option::of(endpoint()).prop_map(Command::Witness),
    ]
}

fn peer_view() -> impl Strategy<Value = PeerView> {
    let state = prop::sample::select(vec![
        MirroringState::Suspended,
        MirroringState::Disconnected,
        MirroringState::Synchronizing,
        MirroringState::PendingFailover,
        MirroringState::Synchronized,
        MirroringState::Unsynchronized,
    ]);
    (
        (
            any::<String>(),
            any::<String>(),
            any::<bool>(),
            epoch(),
            state,
            safety(),
        ),
        (
            any::<u64>(),
            any::<[bool; 2]>(),
            any::<Option<u64>>(),
            any::<u32>(),
        ),
        (
            any::<u64>(),
            prop::option::of(endpoint()),
            any::<Option<u64>>(),
            // Whole rates: any f64 would bring NaN, which JSON cannot carry.
            prop::option::of(any::<(Option<u64>, Option<u64>, Option<u32>)>()),
        ),
    )
        .prop_map(
            |(
                (session, name, principal, epoch, state, safety),
                (timeout_secs, [suspended, ended], system_identifier, pg_major),
                (safety_sequence, witness, witness_id, figures),
            )| PeerView {
                session,
                name,
                role: if principal {
                    Role::Principal
                } else {
                    Role::Mirror
                },
                epoch,
                state,
                safety,
                timeout_secs,
                suspended,
                ended,
                system_identifier,
                pg_major,
                safety_sequence,
                witness,
                witness_id,
                figures: figures.map(|(send_queue, redo_queue, rate)| StatusFigures {
                    send_queue_bytes: send_queue,
                    redo_queue_bytes: redo_queue,
                    send_rate_bytes_per_sec: rate.map(f64::from),
                    redo_rate_bytes_per_sec: None,
                    mirror_commit_overhead_ms: rate.map(f64::from),
                }),
            },
        )
}

fn witness_request() -> impl Strategy<Value = WitnessRequest> {
    let lsn = prop::option::of(any::<u64>().prop_map(Lsn));
    prop_oneof![
        peer_view().prop_map(|view| WitnessRequest::Report { view }),
        (
            any::<String>(),
            any::<String>(),
            epoch(),
            any::<bool>(),
            any::<Option<u64>>()
        )
            .prop_map(|(session, name, epoch, synchronized, based_on)| {
                WitnessRequest::SetSynchronized {
                    session,
                    name,
                    epoch,
                    synchronized,
                    based_on,
                }
            }),
        (
            any::<String>(),
            any::<String>(),
            epoch(),
            promotion_kind(),
            lsn,
            any::<Option<u64>>()
        )
            .prop_map(|(session, name, epoch, kind, failover_lsn, ago)| {
                WitnessRequest::Promote(PromotionRequest {
                    session,
                    name,
                    epoch,
                    kind,
                    failover_lsn,
                    principal_answered_ago_ms: ago,
                })
            }),
        (any::<String>(), any::<String>(), epoch()).prop_map(|(session, name, epoch)| {
            WitnessRequest::Detach {
                session,
                name,
                epoch,
            }
        }),
        Just(WitnessRequest::Sessions),
        (any::<Option<String>>(), any::<Option<i64>>())
            .prop_map(|(session, since_ms)| WitnessRequest::History { session, since_ms }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        command().prop_map(Request::Command),
        peer_view().prop_map(Request::Ping),
        (epoch(), any::<u64>(), promotion_kind()).prop_map(|(epoch, lsn, kind)| {
            Request::TakeOver {
                epoch,
                failover_lsn: Lsn(lsn),
                kind,
            }
        }),
        witness_request().prop_map(Request::Witness),
        any::<Option<i64>>().prop_map(|since_ms| Request::History { since_ms }),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    prop_oneof![
        Just(Hello::Control),
        (any::<String>(), any::<bool>()).prop_map(|(session, wal)| Hello::Stream {
            session,
            purpose: if wal {
                StreamPurpose::Wal
            } else {
                StreamPurpose::Tool
            },
        }),
    ]
}

fn frame(body: &[u8]) -> BytesMut {
    let mut wire = BytesMut::new();
    ControlCodec::default()
        .encode(Bytes::copy_from_slice(body), &mut wire)
        .unwrap();
    wire
}

/// Runs the codec over `stream` delivered in chunks, as `ControlStream`
/// does, until the first error.
fn decode_frames(stream: &[u8], sizes: &[usize]) -> (Vec<Vec<u8>>, Option<ControlError>, BytesMut) {
    let mut codec = ControlCodec::default();
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunked(stream, sizes) {
        buffer.extend_from_slice(chunk);
        loop {
            let capacity = buffer.capacity();
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame.to_vec()),
                Ok(None) => break,
                Err(error) => {
                    assert_eq!(
                        buffer.capacity(),
                        capacity,
                        "no room is made for a refused frame"
                    );
                    return (frames, Some(error), buffer);
                }
            }
        }
    }
    (frames, None, buffer)
}

proptest! {
    #![proptest_config(cases())]

    /// Typed requests go through JSON and the codec and come back equal,
    /// whatever the chunking of the connection.
    #[test]
    fn control_requests_round_trip_through_frames(
        requests in vec(request(), 1..6),
        sizes in chunk_sizes(),
    ) {
        let mut wire = BytesMut::new();
        for request in &requests {
            wire.extend_from_slice(&frame(&serde_json::to_vec(request).unwrap()));
        }
        let (frames, error, rest) = decode_frames(&wire, &sizes);
        prop_assert!(error.is_none());
        prop_assert!(rest.is_empty());
        let decoded: Vec<Request> = frames
            .iter()
            .map(|body| serde_json::from_slice(body).unwrap())
            .collect();
        prop_assert_eq!(decoded, requests);
    }

    /// A length above MAX_CONTROL_FRAME is refused from the 4-byte header,
    /// before any room is made for the body; any other bytes decode into
    /// frames no larger than the limit.
    #[test]
    fn control_codec_refuses_oversized_frames_from_the_header(
        stream in prop_oneof![plausible_stream(), vec(any::<u8>(), 0..64)],
        oversized in MAX_CONTROL_FRAME + 1..=u32::MAX,
        sizes in chunk_sizes(),
    ) {
        let (frames, error, _) = decode_frames(&oversized.to_be_bytes(), &[1]);
        prop_assert!(frames.is_empty());
        prop_assert!(
            matches!(error, Some(ControlError::TooLarge(len)) if len == oversized),
            "{error:?}"
        );

        let (frames, error, _) = decode_frames(&stream, &sizes);
        prop_assert!(frames.iter().all(|frame| frame.len() <= MAX_CONTROL_FRAME as usize));
        if let Some(error) = error {
            prop_assert!(
                matches!(error, ControlError::TooLarge(len) if len > MAX_CONTROL_FRAME),
                "{error:?}"
            );
        }
    }

    /// Damaged JSON is an error or a message, never a panic; what does
    /// decode is a value that encodes and decodes to itself.
    #[test]
    fn damaged_control_json_never_panics(
        request in request(),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let mut body = serde_json::to_vec(&request).unwrap();
        let at = position.index(body.len());
        if cut {
            body.truncate(at);
        } else {
            body[at] = byte;
        }
        if let Ok(decoded) = serde_json::from_slice::<Request>(&body) {
            let again = serde_json::to_vec(&decoded).unwrap();
            prop_assert_eq!(serde_json::from_slice::<Request>(&again).unwrap(), decoded);
        }
        let _ = serde_json::from_slice::<Response>(&body);
        let _ = serde_json::from_slice::<Hello>(&body);
        let _ = serde_json::from_slice::<WitnessRequest>(&body);
    }

    /// read_hello takes the Hello and not one byte more (the relayed
    /// PostgreSQL connection follows it on the same socket).
    #[test]
    fn hello_is_read_without_the_bytes_after_it(
        hello in hello(),
        after in vec(any::<u8>(), 0..64),
    ) {
        let mut wire = frame(&serde_json::to_vec(&hello).unwrap()).to_vec();
        wire.extend_from_slice(&after);
        let mut reader = wire.as_slice();
        let read = futures::executor::block_on(read_hello(&mut reader)).unwrap();
        prop_assert_eq!(read, Some(hello));
        prop_assert_eq!(reader, after.as_slice());
    }

    /// On any bytes read_hello returns (no panic), and an oversized length
    /// is refused without reading or allocating the body.
    #[test]
    fn read_hello_never_panics(stream in prop_oneof![plausible_stream(), vec(any::<u8>(), 0..64)]) {
        let mut reader = stream.as_slice();
        let outcome = futures::executor::block_on(read_hello(&mut reader));
        if let Some(length) = be_u32(&stream, 0).filter(|length| *length > MAX_CONTROL_FRAME) {
            prop_assert!(
                matches!(outcome, Err(ControlError::TooLarge(len)) if len == length),
                "{outcome:?}"
            );
            prop_assert_eq!(reader.len(), stream.len() - 4);
        }
    }
}

fn notice(fields: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in fields {
        body.push(*field);
        body.extend_from_slice(value);
        body.push(0);
    }
    body.push(0);
    tagged(b'N', &body)
}

fn notice_field() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (
        prop_oneof![prop::sample::select(b"VCFRMSDH".to_vec()), 1u8..=255],
        vec(1u8..=255, 0..24),
    )
}

proptest! {
    #![proptest_config(cases())]

    /// Each field the proxy looks at decodes to its first value in the
    /// notice, like PostgreSQL's own reader.
    #[test]
    fn notice_fields_round_trip(fields in vec(notice_field(), 0..10)) {
        let message = notice(&fields);
        let first = |wanted: u8| {
            fields
                .iter()
                .find(|(field, _)| *field == wanted)
                .map(|(_, value)| value.as_slice())
        };
        prop_assert_eq!(
            decode_notice(&message),
            Ok(NoticeFields {
                severity: first(b'V'),
                code: first(b'C'),
                file: first(b'F'),
                routine: first(b'R'),
                message: first(b'M'),
            })
        );
    }

    /// Any bytes: an error or fields, never a panic; fields only from a
    /// message whose length field matches, under the limit, NUL-ended.
    #[test]
    fn notice_decoder_checks_the_whole_message(
        mut message in prop_oneof![
            vec(notice_field(), 0..6).prop_map(|fields| notice(&fields)),
            vec(any::<u8>(), 0..64),
        ],
        damage in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        if let (Some((position, byte)), false) = (damage, message.is_empty()) {
            let at = position.index(message.len());
            message[at] = byte;
        }
        if decode_notice(&message).is_ok() {
            prop_assert!(message.len() <= MAX_NOTICE_LEN);
            prop_assert_eq!(be_u32(&message, 1), Some(message.len() as u32 - 1));
            prop_assert_eq!(message.last(), Some(&0));
        }
    }

    #[test]
    fn oversized_notices_are_refused(extra in 0usize..64) {
        let value = vec![b'x'; MAX_NOTICE_LEN + extra];
        let message = notice(&[(b'M', value)]);
        prop_assert_eq!(decode_notice(&message), Err(NoticeError::TooLong(message.len())));
    }
}

const PARTNER_EXAMPLE: &str = include_str!("../config/examples/partner-alpha.toml");
const WITNESS_EXAMPLE: &str = include_str!("../config/examples/witness.toml");
const PROXY_EXAMPLE: &str = include_str!("../config/examples/proxy.toml");

/// An example configuration with `inserted` replacing up to `deleted`
/// characters at a character boundary: near-valid TOML with a mistake
/// somewhere, possibly inside a multi-byte character's line.
fn damaged_example() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![PARTNER_EXAMPLE, WITNESS_EXAMPLE, PROXY_EXAMPLE]),
        any::<prop::sample::Index>(),
        0usize..8,
        prop_oneof!["[\"'=\\[\\]#\n .:0-9a-z]{0,6}", any::<String>()],
    )
        .prop_map(|(example, position, deleted, inserted)| {
            let boundaries: Vec<usize> = example
                .char_indices()
                .map(|(at, _)| at)
                .chain([example.len()])
                .collect();
            let at = boundaries[position.index(boundaries.len())];
            let end = boundaries
                .iter()
                .copied()
                .filter(|boundary| *boundary >= at)
                .nth(deleted)
                .unwrap_or(example.len());
            format!("{}{inserted}{}", &example[..at], &example[end..])
        })
}

proptest! {
    #![proptest_config(cases())]

    /// A broken configuration is an error that names the file, never a
    /// panic, whichever process's config it is read as.
    #[test]
    fn config_parser_never_panics(text in prop_oneof![damaged_example(), any::<String>()]) {
        for outcome in [
            config::parse::<PartnerConfig>("x.toml", &text).err(),
            config::parse::<WitnessConfig>("x.toml", &text).err(),
            config::parse::<ProxyConfig>("x.toml", &text).err(),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(outcome.to_string().starts_with("x.toml: "));
        }
    }
}

/// What a client or server may send during proxy-side authentication.
fn auth_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..80),
        "(n|y|p=tls-server-end-point|p=x),[a-z=]{0,3},n=[a-z]{0,4},r=[!-~]{0,12}(,[a-z]=[!-~]{0,8}){0,3}"
            .prop_map(String::into_bytes),
        "c=[A-Za-z0-9+/=]{0,12},r=[!-~]{0,12},p=[A-Za-z0-9+/=]{0,48}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(cases())]

    /// Authentication messages, SCRAM exchanges and userlists from anyone
    /// are errors, never panics; a frontend message's length is refused
    /// from its header alone past PostgreSQL's limit.
    #[test]
    fn authentication_parsers_never_panic(
        first in auth_bytes(),
        last in auth_bytes(),
        tag in any::<u8>(),
        length in any::<u32>(),
        text in "[\"a-zA-Z0-9$:=+/ \\n]{0,80}",
    ) {
        use pgmirror::proxy::auth::scram::{Binding, ScramServer, ScramVerifier};
        use pgmirror::wire::auth::{self, MAX_AUTH_TOKEN_LEN};

        let mut header = [tag, 0, 0, 0, 0];
        header[1..].copy_from_slice(&length.to_be_bytes());
        if let Ok(body_len) = auth::password_message_body_len(header) {
            prop_assert!(body_len <= MAX_AUTH_TOKEN_LEN);
        }
        let _ = auth::decode_authentication(&tagged(b'R', &first));
        let _ = auth::decode_sasl_initial_response(&first);
        let _ = auth::decode_password(&first);
        let verifier: ScramVerifier = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
            WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
            .parse()
            .unwrap();
        for binding in [Binding::Unavailable, Binding::EndPoint(vec![1; 32])] {
            for mechanism in binding.mechanisms() {
                if let Ok((server, _)) =
                    ScramServer::start(verifier.clone(), &mechanism, &first, &binding)
                {
                    // Nobody knows the key behind random bytes.
                    prop_assert!(server.finish(&last).is_err());
                }
            }
        }
        let _ = text.parse::<ScramVerifier>();
        let _ = pgmirror::proxy::auth::userlist::Userlist::parse(&text);
    }
}
