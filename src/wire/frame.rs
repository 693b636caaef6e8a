//! An incremental observer of one direction of a PostgreSQL protocol v3
//! connection: it splits the relayed bytes into messages and reports each
//! message's tag, length and the first few bytes of its body, without ever
//! buffering a whole body or allocating.
//!
//! The relay forwards bytes regardless of what this scanner makes of them;
//! observation is best effort. So after the first error the scanner stays
//! failed and silently ignores everything it is fed afterwards, and the caller
//! just stops learning from that connection.
//!
//! Framing (<https://www.postgresql.org/docs/current/protocol-overview.html>):
//! the first message a client sends is the untagged startup packet (int32
//! length including itself, then the body, which starts with the int32
//! protocol code); every other message in both directions is a tag byte, an
//! int32 length including itself but not the tag, and the body.

/// How many leading body bytes a [`Message`] carries: enough for every
/// fixed-size header the shipper and the proxy decode (the largest,
/// a StandbyStatusUpdate, is 34 bytes).
pub const PREFIX_LEN: usize = 64;

/// The largest body PostgreSQL will accept: `MaxAllocSize` (1 GiB - 1) from
/// `src/include/utils/memutils.h`. Anything longer is not PostgreSQL talking.
pub const MAX_MESSAGE_LEN: u32 = 0x3FFF_FFFF;

/// The largest startup packet body the postmaster accepts:
/// `MAX_STARTUP_PACKET_LENGTH` from `src/include/libpq/pqcomm.h`.
pub const MAX_STARTUP_PACKET_LENGTH: u32 = 10_000;

/// Size of the tag byte of a tagged message.
pub const TAG_LEN: usize = 1;

/// Size of the int32 length field, which counts itself.
pub const LENGTH_FIELD_LEN: usize = 4;

/// Header of every message after the startup packet: tag + length.
pub const TAGGED_HEADER_LEN: usize = TAG_LEN + LENGTH_FIELD_LEN;

/// Header of the startup packet: the length alone.
pub const STARTUP_HEADER_LEN: usize = LENGTH_FIELD_LEN;

/// Size of the protocol code that opens a startup packet body.
pub const PROTOCOL_CODE_LEN: usize = 4;

/// Major protocol version this scanner understands, as in `PG_PROTOCOL(3, 0)`.
pub const PROTOCOL_MAJOR_3: u32 = 3;

/// The protocol code of a protocol 3.0 startup packet (`PG_PROTOCOL(3, 0)`).
pub const PROTOCOL_3_0: u32 = 196_608;

/// Startup code asking the server to switch to TLS.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;

/// Startup code asking the server to switch to GSSAPI encryption.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// Startup code of a query cancellation (a connection of its own).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// One complete message seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The tag byte, or `None` for the startup packet.
    pub tag: Option<u8>,
    /// Length of the body, excluding tag and length field.
    pub body_len: u32,
    /// The first `min(body_len, PREFIX_LEN)` bytes of the body.
    pub prefix: &'a [u8],
    /// Offset, in the chunk being fed, just past this message's last byte.
    /// The message starts `TAGGED_HEADER_LEN + body_len` bytes earlier
    /// (for a tagged message), possibly in an earlier chunk.
    pub end: usize,
}

impl Message<'_> {
    /// Whether `prefix` holds the whole body.
    pub fn prefix_is_whole_body(&self) -> bool {
        usize::try_from(self.body_len).is_ok_and(|len| len == self.prefix.len())
    }
}

/// Why the byte stream is not (or no longer) protocol v3 framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message {} has length field {length}, less than the 4 bytes of the field itself", describe_tag(*.tag))]
    LengthTooSmall { tag: Option<u8>, length: u32 },
    #[error("message {} has a {body_len}-byte body, more than the limit of {limit}", describe_tag(*.tag))]
    MessageTooLong {
        tag: Option<u8>,
        body_len: u32,
        limit: u32,
    },
    #[error("startup packet body of {body_len} bytes is too short to hold a protocol code")]
    StartupPacketTooShort { body_len: u32 },
    #[error("startup packet body of {body_len} bytes exceeds the postmaster's limit of {MAX_STARTUP_PACKET_LENGTH}")]
    StartupPacketTooLong { body_len: u32 },
    #[error("startup packet has protocol code {code} ({}), not protocol 3", describe_protocol_code(*.code))]
    NotProtocol3 { code: u32 },
}

fn describe_tag(tag: Option<u8>) -> String {
    match tag {
        None => "startup packet".to_owned(),
        Some(byte) if byte.is_ascii_graphic() => format!("'{}'", char::from(byte)),
        Some(byte) => format!("tag 0x{byte:02X}"),
    }
}

fn describe_protocol_code(code: u32) -> &'static str {
    match code {
        SSL_REQUEST_CODE => "SSLRequest",
        GSSENC_REQUEST_CODE => "GSSENCRequest",
        CANCEL_REQUEST_CODE => "CancelRequest",
        _ => "unknown",
    }
}

/// Where the scanner is within the current message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Collecting the header; `header_filled` bytes of it are in `header`.
    Header,
    /// Passing over the body of a message whose header is complete.
    Body {
        tag: Option<u8>,
        body_len: u32,
        body_seen: u32,
    },
    /// An error was reported; everything further is ignored.
    Failed,
}

/// Splits one direction of a protocol v3 connection into [`Message`]s.
///
/// Feed it every chunk relayed in that direction, in order. It keeps a fixed
/// amount of state (a header buffer and a [`PREFIX_LEN`]-byte prefix buffer)
/// however large the messages are. After an error it stays failed: see
/// [`FrameScanner::feed`].
#[derive(Debug, Clone)]
pub struct FrameScanner {
    /// True until the startup packet has passed (frontend direction only).
    expecting_startup: bool,
    phase: Phase,
    header: [u8; TAGGED_HEADER_LEN],
    header_filled: usize,
    prefix: [u8; PREFIX_LEN],
    prefix_filled: usize,
    /// Longer tagged messages are a framing error (PostgreSQL's own limit
    /// unless [`FrameScanner::with_max_body_len`] lowers it).
    max_body_len: u32,
}

impl FrameScanner {
    /// Refuses tagged messages whose body is longer than `limit`, as soon
    /// as their header is seen.
    pub fn with_max_body_len(self, limit: u32) -> Self {
        FrameScanner {
            max_body_len: limit.min(MAX_MESSAGE_LEN),
            ..self
        }
    }

    /// Observer of the client-to-server direction, which opens with the
    /// untagged startup packet.
    pub fn frontend() -> Self {
        Self::new(true)
    }

    /// Observer of the server-to-client direction, where every message is
    /// tagged.
    pub fn backend() -> Self {
        Self::new(false)
    }

    fn new(expecting_startup: bool) -> Self {
        FrameScanner {
            expecting_startup,
            phase: Phase::Header,
            header: [0; TAGGED_HEADER_LEN],
            header_filled: 0,
            prefix: [0; PREFIX_LEN],
            prefix_filled: 0,
            max_body_len: MAX_MESSAGE_LEN,
        }
    }

    /// Whether an error stopped the observation.
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Whether everything fed so far ends exactly at a message boundary, so
    /// a message of our own may be inserted next (the proxy's goodbye).
    pub fn at_message_boundary(&self) -> bool {
        self.phase == Phase::Header && self.header_filled == 0
    }

    /// Consumes the next chunk of the stream, calling `on_message` for every
    /// message that completes inside it. Chunks may split messages anywhere,
    /// even inside the header.
    ///
    /// Returns the first framing error, once; from then on the scanner is
    /// failed and later calls return `Ok(())` without calling back, because
    /// the bytes keep being relayed and there is nothing more to report.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_message: impl FnMut(Message<'_>),
    ) -> Result<(), FrameError> {
        if self.is_failed() {
            return Ok(());
        }
        let outcome = self.scan(chunk, &mut on_message);
        if outcome.is_err() {
            self.phase = Phase::Failed;
        }
        outcome
    }

    fn header_len(&self) -> usize {
        if self.expecting_startup {
            STARTUP_HEADER_LEN
        } else {
            TAGGED_HEADER_LEN
        }
    }

    fn scan(
        &mut self,
        chunk: &[u8],
        on_message: &mut impl FnMut(Message<'_>),
    ) -> Result<(), FrameError> {
        let mut rest = chunk;
        while !rest.is_empty() {
            match self.phase {
                Phase::Failed => return Ok(()),
                Phase::Header => {
                    // Most messages arrive whole: read in place, not copied.
                    if let Some(whole) = self.whole_tagged(rest)? {
                        let (message, tail) = rest.split_at(whole);
                        rest = tail;
                        let body = &message[TAGGED_HEADER_LEN..];
                        on_message(Message {
                            tag: Some(message[0]),
                            body_len: body.len() as u32,
                            prefix: &body[..body.len().min(PREFIX_LEN)],
                            end: chunk.len() - rest.len(),
                        });
                        continue;
                    }
                    let header_len = self.header_len();
                    let take = (header_len - self.header_filled).min(rest.len());
                    let (head, tail) = rest.split_at(take);
                    self.header[self.header_filled..self.header_filled + take]
                        .copy_from_slice(head);
                    self.header_filled += take;
                    rest = tail;
                    if self.header_filled == header_len {
                        self.start_body()?;
                        // A message with an empty body is complete already.
                        self.finish_if_complete(chunk.len() - rest.len(), on_message);
                    }
                }
                Phase::Body {
                    tag,
                    body_len,
                    body_seen,
                } => {
                    let remaining = body_len - body_seen;
                    let take = usize::try_from(remaining)
                        .map_or(rest.len(), |remaining| remaining.min(rest.len()));
                    let (body_part, tail) = rest.split_at(take);
                    // Only the prefix is kept; the rest of the body passes by.
                    let kept = (PREFIX_LEN - self.prefix_filled).min(body_part.len());
                    self.prefix[self.prefix_filled..self.prefix_filled + kept]
                        .copy_from_slice(&body_part[..kept]);
                    self.prefix_filled += kept;
                    // take <= remaining, which is a u32, so this cannot truncate.
                    let body_seen = body_seen + take as u32;
                    self.phase = Phase::Body {
                        tag,
                        body_len,
                        body_seen,
                    };
                    rest = tail;
                    if tag.is_none() {
                        self.check_protocol_code()?;
                    }
                    self.finish_if_complete(chunk.len() - rest.len(), on_message);
                }
            }
        }
        Ok(())
    }

    /// The length of the tagged message `rest` starts with, when the
    /// scanner is between messages and `rest` holds all of it; its header
    /// is validated as [`FrameScanner::start_body`] does.
    fn whole_tagged(&self, rest: &[u8]) -> Result<Option<usize>, FrameError> {
        if self.expecting_startup || self.header_filled != 0 {
            return Ok(None);
        }
        let Some(&[tag, a, b, c, d]) = rest.first_chunk::<TAGGED_HEADER_LEN>() else {
            return Ok(None);
        };
        let body_len = self.body_len(Some(tag), u32::from_be_bytes([a, b, c, d]))?;
        // body_len <= MAX_MESSAGE_LEN, so this cannot overflow.
        let whole = TAGGED_HEADER_LEN + body_len as usize;
        Ok((rest.len() >= whole).then_some(whole))
    }

    /// Validates the completed header and moves on to the body.
    fn start_body(&mut self) -> Result<(), FrameError> {
        let [first, second, third, fourth, fifth] = self.header;
        let (tag, length) = if self.expecting_startup {
            (None, u32::from_be_bytes([first, second, third, fourth]))
        } else {
            (
                Some(first),
                u32::from_be_bytes([second, third, fourth, fifth]),
            )
        };
        let body_len = self.body_len(tag, length)?;
        self.header_filled = 0;
        self.prefix_filled = 0;
        self.phase = Phase::Body {
            tag,
            body_len,
            body_seen: 0,
        };
        Ok(())
    }

    /// The body length a header's length field gives, within the limits.
    fn body_len(&self, tag: Option<u8>, length: u32) -> Result<u32, FrameError> {
        // The length field is a signed int32; a negative one shows up here as
        // a huge value and fails the upper bound.
        let body_len = length
            .checked_sub(LENGTH_FIELD_LEN as u32)
            .ok_or(FrameError::LengthTooSmall { tag, length })?;
        if tag.is_none() {
            if body_len < PROTOCOL_CODE_LEN as u32 {
                return Err(FrameError::StartupPacketTooShort { body_len });
            }
            if body_len > MAX_STARTUP_PACKET_LENGTH {
                return Err(FrameError::StartupPacketTooLong { body_len });
            }
        } else if body_len > self.max_body_len {
            return Err(FrameError::MessageTooLong {
                tag,
                body_len,
                limit: self.max_body_len,
            });
        }
        Ok(body_len)
    }

    /// Rejects a startup packet that is not protocol 3 as soon as its code is
    /// known, so an SSLRequest fails before the TLS bytes that follow it.
    fn check_protocol_code(&self) -> Result<(), FrameError> {
        let Some(code_bytes) = self.prefix.get(..PROTOCOL_CODE_LEN) else {
            return Ok(());
        };
        if self.prefix_filled < PROTOCOL_CODE_LEN {
            return Ok(());
        }
        let mut code = [0; PROTOCOL_CODE_LEN];
        code.copy_from_slice(code_bytes);
        let code = u32::from_be_bytes(code);
        // Minor versions of protocol 3 (3.2 since PostgreSQL 18) share its
        // framing; the special request codes use major version 1234.
        if code >> 16 == PROTOCOL_MAJOR_3 {
            Ok(())
        } else {
            Err(FrameError::NotProtocol3 { code })
        }
    }

    /// Reports the current message if its body is complete; `end` is the
    /// offset in the chunk just past the bytes consumed so far.
    fn finish_if_complete(&mut self, end: usize, on_message: &mut impl FnMut(Message<'_>)) {
        let Phase::Body {
            tag,
            body_len,
            body_seen,
        } = self.phase
        else {
            return;
        };
        if body_seen != body_len {
            return;
        }
        let prefix = self.prefix.get(..self.prefix_filled).unwrap_or_default();
        on_message(Message {
            tag,
            body_len,
            prefix,
            end,
        });
        self.expecting_startup = false;
        self.prefix_filled = 0;
        self.phase = Phase::Header;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        tag: Option<u8>,
        body_len: u32,
        prefix: Vec<u8>,
    }

    fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn startup(code: u32, params: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(params.len() as u32 + 8).to_be_bytes());
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(params);
        bytes
    }

    fn feed_in_chunks(
        scanner: &mut FrameScanner,
        stream: &[u8],
        chunk_len: usize,
    ) -> (Vec<Seen>, Result<(), FrameError>) {
        let mut seen = Vec::new();
        for chunk in stream.chunks(chunk_len) {
            let outcome = scanner.feed(chunk, |message| {
                seen.push(Seen {
                    tag: message.tag,
                    body_len: message.body_len,
                    prefix: message.prefix.to_vec(),
                })
            });
            if outcome.is_err() {
                return (seen, outcome);
            }
        }
        (seen, Ok(()))
    }

    fn sample_frontend_stream() -> (Vec<u8>, Vec<Seen>) {
        let params = b"user\0postgres\0replication\0true\0\0";
        let mut stream = startup(PROTOCOL_3_0, params);
        stream.extend(tagged(b'Q', b"IDENTIFY_SYSTEM\0"));
        stream.extend(tagged(b'S', b""));
        stream.extend(tagged(b'd', &[b'r'; 34]));
        let mut startup_body = PROTOCOL_3_0.to_be_bytes().to_vec();
        startup_body.extend_from_slice(params);
        let expected = vec![
            Seen {
                tag: None,
                body_len: startup_body.len() as u32,
                prefix: startup_body,
            },
            Seen {
                tag: Some(b'Q'),
                body_len: 16,
                prefix: b"IDENTIFY_SYSTEM\0".to_vec(),
            },
            Seen {
                tag: Some(b'S'),
                body_len: 0,
                prefix: Vec::new(),
            },
            Seen {
                tag: Some(b'd'),
                body_len: 34,
                prefix: vec![b'r'; 34],
            },
        ];
        (stream, expected)
    }

    #[test]
    fn frontend_messages_survive_any_chunking() {
        let (stream, expected) = sample_frontend_stream();
        for chunk_len in [1, 2, 3, 4, 5, 7, 13, 64, stream.len()] {
            let mut scanner = FrameScanner::frontend();
            let (seen, outcome) = feed_in_chunks(&mut scanner, &stream, chunk_len);
            assert_eq!(outcome, Ok(()), "chunk length {chunk_len}");
            assert_eq!(seen, expected, "chunk length {chunk_len}");
            assert!(!scanner.is_failed());
        }
    }

    #[test]
    fn backend_messages_are_all_tagged() {
        let mut stream = tagged(b'R', &0u32.to_be_bytes());
        stream.extend(tagged(b'Z', b"I"));
        let mut scanner = FrameScanner::backend();
        let (seen, outcome) = feed_in_chunks(&mut scanner, &stream, 1);
        assert_eq!(outcome, Ok(()));
        let tags: Vec<_> = seen.iter().map(|message| message.tag).collect();
        assert_eq!(tags, vec![Some(b'R'), Some(b'Z')]);
        assert_eq!(seen[1].prefix, b"I");
    }

    #[test]
    fn end_offsets_point_just_past_each_message_in_its_chunk() {
        let mut stream = tagged(b'C', b"SELECT 1\0");
        stream.extend(tagged(b'Z', b"I"));
        let first_len = 5 + 9;
        for split in 0..=stream.len() {
            let mut scanner = FrameScanner::backend();
            let mut ends = Vec::new();
            for (index, chunk) in [&stream[..split], &stream[split..]].into_iter().enumerate() {
                scanner
                    .feed(chunk, |message| ends.push((index, message.end)))
                    .unwrap();
            }
            let expected: Vec<_> = [first_len, stream.len()]
                .into_iter()
                .map(|end| {
                    if end <= split {
                        (0, end)
                    } else {
                        (1, end - split)
                    }
                })
                .collect();
            assert_eq!(ends, expected, "split at {split}");
        }
    }

    #[test]
    fn big_copy_data_yields_one_message_with_a_prefix() {
        let body: Vec<u8> = (0..100 * 1024).map(|index| (index % 251) as u8).collect();
        let mut stream = tagged(b'd', &body);
        stream.extend(tagged(b'c', b""));
        for chunk_len in [1, 1000, 8192, stream.len()] {
            let mut scanner = FrameScanner::backend();
            let (seen, outcome) = feed_in_chunks(&mut scanner, &stream, chunk_len);
            assert_eq!(outcome, Ok(()));
            assert_eq!(seen.len(), 2);
            assert_eq!(seen[0].tag, Some(b'd'));
            assert_eq!(seen[0].body_len, body.len() as u32);
            assert_eq!(seen[0].prefix, &body[..PREFIX_LEN]);
            assert_eq!(seen[1].tag, Some(b'c'));
        }
    }

    #[test]
    fn length_below_four_fails_and_the_scanner_stays_failed() {
        let mut scanner = FrameScanner::backend();
        let (seen, outcome) = feed_in_chunks(&mut scanner, &[b'Z', 0, 0, 0, 3], 2);
        assert!(seen.is_empty());
        assert_eq!(
            outcome,
            Err(FrameError::LengthTooSmall {
                tag: Some(b'Z'),
                length: 3
            })
        );
        assert!(scanner.is_failed());
        let mut called = false;
        let later = scanner.feed(&tagged(b'Z', b"I"), |_| called = true);
        assert_eq!(later, Ok(()));
        assert!(!called);
    }

    #[test]
    fn oversized_messages_fail() {
        let mut scanner = FrameScanner::backend();
        let mut header = vec![b'd'];
        header.extend_from_slice(&(MAX_MESSAGE_LEN + 5).to_be_bytes());
        let (_, outcome) = feed_in_chunks(&mut scanner, &header, 5);
        assert!(matches!(outcome, Err(FrameError::MessageTooLong { .. })));

        // A negative int32 length is as bad.
        let mut scanner = FrameScanner::backend();
        let (_, outcome) = feed_in_chunks(&mut scanner, &[b'd', 0xFF, 0xFF, 0xFF, 0xFF], 5);
        assert!(matches!(outcome, Err(FrameError::MessageTooLong { .. })));

        // The limit itself is allowed.
        let mut scanner = FrameScanner::backend();
        let mut header = vec![b'd'];
        header.extend_from_slice(&(MAX_MESSAGE_LEN + 4).to_be_bytes());
        assert_eq!(scanner.feed(&header, |_| {}), Ok(()));
    }

    #[test]
    fn bad_startup_packets_fail() {
        let too_long = startup(
            PROTOCOL_3_0,
            &vec![b'x'; MAX_STARTUP_PACKET_LENGTH as usize],
        );
        let (_, outcome) = feed_in_chunks(&mut FrameScanner::frontend(), &too_long, 100);
        assert!(matches!(
            outcome,
            Err(FrameError::StartupPacketTooLong { .. })
        ));

        let too_short = [0, 0, 0, 7, 0, 3, 0];
        let (_, outcome) = feed_in_chunks(&mut FrameScanner::frontend(), &too_short, 100);
        assert_eq!(
            outcome,
            Err(FrameError::StartupPacketTooShort { body_len: 3 })
        );

        let (_, outcome) = feed_in_chunks(&mut FrameScanner::frontend(), &[0, 0, 0, 2], 1);
        assert!(matches!(
            outcome,
            Err(FrameError::LengthTooSmall { tag: None, .. })
        ));
    }

    #[test]
    fn non_protocol_3_requests_fail_before_emitting() {
        for code in [
            SSL_REQUEST_CODE,
            GSSENC_REQUEST_CODE,
            CANCEL_REQUEST_CODE,
            131_072,
        ] {
            let mut stream = startup(code, &[0; 8]);
            stream.extend_from_slice(b"\x16\x03\x01 TLS client hello follows");
            let mut scanner = FrameScanner::frontend();
            let (seen, outcome) = feed_in_chunks(&mut scanner, &stream, 1);
            assert!(seen.is_empty());
            assert_eq!(outcome, Err(FrameError::NotProtocol3 { code }));
            assert!(scanner.is_failed());
        }
        let message = FrameError::NotProtocol3 {
            code: SSL_REQUEST_CODE,
        }
        .to_string();
        assert!(message.contains("SSLRequest"), "{message}");
    }

    #[test]
    fn protocol_3_minor_versions_are_observed() {
        let stream = startup(PROTOCOL_3_0 + 2, b"\0");
        let (seen, outcome) = feed_in_chunks(&mut FrameScanner::frontend(), &stream, 3);
        assert_eq!(outcome, Ok(()));
        assert_eq!(seen.len(), 1);
    }

    /// xorshift64: a deterministic pseudo-random source without extra crates.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..2000 {
            let len = (random.next() % 512) as usize;
            let mut stream: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
            // Half the rounds use small plausible lengths so that scanning gets
            // past the first header.
            if round % 2 == 0 {
                let mut index = 0;
                while index + 5 <= stream.len() {
                    let length = (random.next() % 40) as u32;
                    stream[index + 1..index + 5].copy_from_slice(&length.to_be_bytes());
                    index += 1 + length as usize;
                }
            }
            let mut scanner = if round % 3 == 0 {
                FrameScanner::frontend()
            } else {
                FrameScanner::backend()
            };
            let mut offset = 0;
            while offset < stream.len() {
                let take = 1 + (random.next() % 17) as usize;
                let end = (offset + take).min(stream.len());
                let _ = scanner.feed(&stream[offset..end], |message| {
                    assert!(message.prefix.len() <= PREFIX_LEN);
                    assert!(message.prefix.len() as u64 <= u64::from(message.body_len));
                });
                offset = end;
            }
        }
    }
}
