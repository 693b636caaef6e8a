//! The commit fence: invariant I2 at the proxy's edge. PostgreSQL reports a
//! commit as done when its wait for the synchronous standby (the mirror) is
//! cut short; no client of the proxy may take such a commit for a durable
//! one. [`CommitFence`] watches the server-to-client bytes of one spliced
//! connection and tells the connection task what to forward, what to hold
//! back, and when to replace the rest of a response with an ErrorResponse of
//! SQLSTATE 40003 (statement_completion_unknown) and end the connection.
//!
//! It is pure: bytes and two facts from the other direction in, a [`Step`]
//! out; the connection task (`connection::splice`) does the IO. It never
//! panics on server bytes, and it buffers at most [`MAX_HELD_RESPONSE`]
//! bytes of a response (plus one partial notice of at most
//! `MAX_NOTICE_LEN`).
//!
//! The rules (a *response* is everything up to and including the next
//! ReadyForQuery):
//! 1. The notice of a cut wait: a NoticeResponse whose non-localized fields
//!    say WARNING / SyncRepWaitForLSN / syncrep.c / 01000 or 57P01
//!    (`wire::notice`). It fences at once: the notice and everything held
//!    are dropped. With the simple protocol it precedes the commit's
//!    CommandComplete; with the extended protocol in autocommit the commit
//!    happens at Sync, so the notice comes after CommandComplete, just
//!    before ReadyForQuery (rule 3 holds that CommandComplete back); on
//!    termination the backend sends nothing after it.
//! 2. A forwarded cancel: when the proxy forwarded a CancelRequest for this
//!    client since the last ReadyForQuery, the response fences at its first
//!    CommandComplete, or at its ReadyForQuery if a CommandComplete passed
//!    before the cancel. This covers clients that hide the notice
//!    (`client_min_messages = error`). It is conservative on purpose: the
//!    command tag does not tell whether a commit happened (a SELECT may call
//!    a function that writes, and an implicit transaction commits whatever
//!    its statements did), so any successful completion in a response
//!    during which a cancel was forwarded is treated as a commit of unknown
//!    outcome. A cancel that hit a statement ends it with an ErrorResponse
//!    (57014) and no CommandComplete, and is left alone; the price is that a
//!    cancel racing with the normal end of a command costs the client its
//!    connection.
//! 3. Holding back: a CommandComplete that arrives while the client's last
//!    message was Sync, Query or FunctionCall (so a ReadyForQuery is coming
//!    without further client input) is held back, with everything after it,
//!    until that ReadyForQuery, so a client never sees the completion of a
//!    commit that then turns out cut. The hold ends early (bytes forwarded
//!    as they are) on CopyInResponse/CopyBothResponse (the client must
//!    answer) and beyond [`MAX_HELD_RESPONSE`] bytes; rules 1 and 2 still
//!    apply then, and the ErrorResponse still comes before ReadyForQuery,
//!    which in PostgreSQL's protocol voids the implicit transaction's
//!    earlier completions.
//! 4. A server that closes while a CommandComplete is held gets the client
//!    a 40003 too (the outcome of its commit is unknown).
//!
//! Only NoticeResponse bodies are decoded; of other messages only the tag
//! is looked at, and a chunk without anything held passes through
//! untouched ([`Step::PassChunk`]).

use crate::wire::frame::{FrameError, FrameScanner, LENGTH_FIELD_LEN, TAGGED_HEADER_LEN, TAG_LEN};
use crate::wire::notice::{decode_notice, SyncRepCut, MAX_NOTICE_LEN, NOTICE_RESPONSE};
use crate::wire::startup::READY_FOR_QUERY;

/// Tag of CommandComplete.
pub const COMMAND_COMPLETE: u8 = b'C';
/// Tag of CopyInResponse.
pub const COPY_IN_RESPONSE: u8 = b'G';
/// Tag of CopyBothResponse.
pub const COPY_BOTH_RESPONSE: u8 = b'W';
/// Frontend tags after which the server answers with ReadyForQuery on its
/// own: Sync, Query, FunctionCall.
pub const FRONTEND_AWAITS_READY: [u8; 3] = [b'S', b'Q', b'F'];

/// The most bytes of one response held back behind a CommandComplete
/// (rule 3). A commit's CommandComplete is normally followed by at most a
/// few notices and ReadyForQuery; a pipeline may put whole result sets
/// behind it, and those are then forwarded rather than buffered.
pub const MAX_HELD_RESPONSE: usize = 256 * 1024;

/// SQLSTATE statement_completion_unknown.
pub const SQLSTATE_COMPLETION_UNKNOWN: &str = "40003";

/// Why a response was fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceCause {
    /// The server's notice: the wait was cancelled (01000).
    WaitCancelled,
    /// The server's notice: the backend is terminating (57P01).
    WaitTerminated,
    /// The proxy forwarded a cancel during a response that completed.
    CancelForwarded,
    /// The server closed while a CommandComplete was held back.
    ServerClosed,
}

impl FenceCause {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            FenceCause::WaitCancelled => "wait_cancelled",
            FenceCause::WaitTerminated => "wait_terminated",
            FenceCause::CancelForwarded => "cancel_forwarded",
            FenceCause::ServerClosed => "server_closed",
        }
    }

    /// The message of the 40003 ErrorResponse the client gets.
    pub fn client_message(self) -> String {
        let why = match self {
            FenceCause::WaitCancelled => {
                "the server cancelled its wait for the mirror to confirm the commit"
            }
            FenceCause::WaitTerminated => {
                "the server connection was terminated while waiting for the mirror to confirm the commit"
            }
            FenceCause::CancelForwarded => {
                "a cancel request reached the server while the command was completing, so the \
                 mirror may not have confirmed its commit"
            }
            FenceCause::ServerClosed => {
                "the server closed the connection before confirming the commit"
            }
        };
        format!(
            "pgmirror proxy: the transaction's outcome is unknown: its commit was not confirmed \
             by the mirror ({why}); it may be committed on the principal and lost on failover. \
             Reconnect and check whether the transaction's effects are present before retrying it"
        )
    }
}

impl From<SyncRepCut> for FenceCause {
    fn from(cut: SyncRepCut) -> Self {
        match cut {
            SyncRepCut::Cancelled => FenceCause::WaitCancelled,
            SyncRepCut::Terminated => FenceCause::WaitTerminated,
        }
    }
}

/// What the connection task does with a chunk it fed to the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Forward the whole chunk as it is; nothing is held (the hot path).
    PassChunk,
    /// Forward [`CommitFence::output`] (possibly empty); the rest is held.
    Output,
    /// Forward [`CommitFence::output`]; then, if `at_boundary`, the 40003
    /// ErrorResponse ([`FenceCause::client_message`]); then end the
    /// connection. Everything else of the response is dropped.
    Fence {
        cause: FenceCause,
        at_boundary: bool,
    },
}

/// Where the stream seen so far ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// At a message boundary.
    Boundary,
    /// Inside a CommandComplete, ReadyForQuery or small NoticeResponse,
    /// whose bytes are held from offset `at` of `held`.
    Held { at: usize },
    /// Inside any other message, forwarded as it comes (unless a held
    /// response covers it).
    Passing,
}

/// A message of interest that completed inside a chunk.
#[derive(Debug, Clone, Copy)]
struct Event {
    tag: u8,
    /// Tag, length field and body.
    total: usize,
    /// Offset just past the message in the chunk.
    end: usize,
}

/// The commit fence of one spliced connection's server-to-client direction.
/// Created by the connection task once authentication is done (it takes
/// over the frame scanner) and dropped with the connection.
#[derive(Debug)]
pub struct CommitFence {
    /// Message boundaries of the server's bytes.
    scanner: FrameScanner,
    /// Bytes received but not forwarded; they start at a message boundary.
    held: Vec<u8>,
    /// What the last [`Step::Output`] or [`Step::Fence`] forwards.
    output: Vec<u8>,
    /// A notice split across chunks, reassembled for decoding.
    scratch: Vec<u8>,
    /// Messages of interest of the chunk being fed (reused).
    events: Vec<Event>,
    tail: Tail,
    /// A CommandComplete of this response is held (rule 3).
    holding_response: bool,
    /// Rule 3 was given up for the rest of this response.
    no_hold_until_ready: bool,
    /// A CommandComplete passed (or is held) in this response.
    completed: bool,
    /// The client's forwarded-cancel count at the last ReadyForQuery.
    cancels_at_ready: u64,
}

impl CommitFence {
    /// A fence continuing `scanner` (which has seen everything up to the
    /// end of authentication), with the client's forwarded-cancel count.
    pub fn new(scanner: FrameScanner, cancels: u64) -> Self {
        CommitFence {
            tail: if scanner.at_message_boundary() {
                Tail::Boundary
            } else {
                Tail::Passing
            },
            scanner,
            held: Vec::new(),
            output: Vec::new(),
            scratch: Vec::new(),
            events: Vec::new(),
            holding_response: false,
            no_hold_until_ready: false,
            completed: false,
            cancels_at_ready: cancels,
        }
    }

    /// The bytes to forward after [`Step::Output`] or [`Step::Fence`].
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// How many bytes are held back.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Whether the bytes forwarded so far end at a message boundary, so
    /// that the proxy may insert a message of its own.
    pub fn forwarded_at_boundary(&self) -> bool {
        !self.held.is_empty() || self.tail != Tail::Passing
    }

    /// Feeds the next chunk from the server. `awaiting_ready`: the client's
    /// last message was one of [`FRONTEND_AWAITS_READY`]; `cancels`: how
    /// many cancels the proxy forwarded for this client so far. A framing
    /// error means the server is not speaking PostgreSQL's protocol: the
    /// connection must end.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        awaiting_ready: bool,
        cancels: u64,
    ) -> Result<Step, FrameError> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let mut last_end = None;
        self.scanner.feed(chunk, |message| {
            last_end = Some(message.end);
            let Some(tag) = message.tag else { return };
            if matches!(
                tag,
                NOTICE_RESPONSE
                    | COMMAND_COMPLETE
                    | READY_FOR_QUERY
                    | COPY_IN_RESPONSE
                    | COPY_BOTH_RESPONSE
            ) {
                let body = usize::try_from(message.body_len).unwrap_or(usize::MAX);
                events.push(Event {
                    tag,
                    total: body.saturating_add(TAGGED_HEADER_LEN),
                    end: message.end,
                });
            }
        })?;
        let step = self.decide(chunk, &events, last_end, awaiting_ready, cancels);
        self.events = events;
        Ok(step)
    }

    /// Tells the fence the server closed its side. Some cause when a
    /// CommandComplete was held back (rule 4); held bytes are dropped.
    pub fn server_closed(&mut self) -> Option<FenceCause> {
        let held_completion = self.holding_response;
        self.abandon();
        held_completion.then_some(FenceCause::ServerClosed)
    }

    /// Drops whatever is held (the connection is ending for another
    /// reason); returns whether the client may still get a message.
    pub fn abandon(&mut self) -> bool {
        let at_boundary = self.forwarded_at_boundary();
        self.held.clear();
        self.holding_response = false;
        self.tail = if at_boundary {
            Tail::Boundary
        } else {
            Tail::Passing
        };
        at_boundary
    }

    /// Applies the rules to the events of one chunk. Offsets below are in
    /// the concatenation of `held` and `chunk`.
    fn decide(
        &mut self,
        chunk: &[u8],
        events: &[Event],
        last_end: Option<usize>,
        awaiting_ready: bool,
        cancels: u64,
    ) -> Step {
        let base = self.held.len();
        let held_before = base > 0;
        // Everything from `hold_at` on stays held.
        let mut hold_at = held_before.then_some(0);
        for event in events {
            let cancelled = cancels != self.cancels_at_ready;
            let end = base + event.end;
            // None: the message began in bytes already forwarded.
            let start = end.checked_sub(event.total);
            match event.tag {
                NOTICE_RESPONSE => {
                    let cut = start.and_then(|start| self.notice_cut(chunk, start, end));
                    if let Some(cut) = cut {
                        return self.fence(chunk, cut.into(), hold_at.or(start));
                    }
                    if !self.holding_response && hold_at.is_some() && hold_at == start {
                        hold_at = None;
                    }
                }
                COMMAND_COMPLETE => {
                    self.completed = true;
                    if cancelled {
                        return self.fence(chunk, FenceCause::CancelForwarded, hold_at.or(start));
                    }
                    if awaiting_ready && !self.holding_response && !self.no_hold_until_ready {
                        if let Some(start) = start {
                            self.holding_response = true;
                            hold_at = Some(hold_at.map_or(start, |at| at.min(start)));
                        }
                    } else if !self.holding_response && hold_at.is_some() && hold_at == start {
                        hold_at = None;
                    }
                }
                COPY_IN_RESPONSE | COPY_BOTH_RESPONSE => {
                    // The client must answer before ReadyForQuery comes.
                    hold_at = None;
                    self.holding_response = false;
                    self.no_hold_until_ready = true;
                }
                READY_FOR_QUERY => {
                    if cancelled && self.completed {
                        return self.fence(chunk, FenceCause::CancelForwarded, hold_at.or(start));
                    }
                    hold_at = None;
                    self.holding_response = false;
                    self.no_hold_until_ready = false;
                    self.completed = false;
                    self.cancels_at_ready = cancels;
                }
                _ => {}
            }
        }

        // Where the stream now ends, and whether its partial message is held.
        let total = base + chunk.len();
        let tail_start = match (last_end, self.tail) {
            _ if self.scanner.at_message_boundary() => None,
            (Some(end), _) => Some(base + end),
            (None, Tail::Boundary) => Some(base),
            (None, Tail::Held { at }) => Some(at),
            (None, Tail::Passing) => None,
        };
        self.tail = if self.scanner.at_message_boundary() {
            Tail::Boundary
        } else {
            Tail::Passing
        };
        if let Some(at) = tail_start {
            // Already forwarded bytes cannot be held back.
            let holdable = held_before || at >= base;
            if holdable && self.small_interesting_message(chunk, at) {
                self.tail = Tail::Held { at };
                hold_at = Some(hold_at.map_or(at, |held| held.min(at)));
            }
        }
        // Rule 3's bound: forward the response, keep only a held tail.
        if self.holding_response && hold_at.is_some_and(|at| total - at > MAX_HELD_RESPONSE) {
            self.holding_response = false;
            self.no_hold_until_ready = true;
            hold_at = match self.tail {
                Tail::Held { at } => Some(at),
                _ => None,
            };
        }
        self.keep_from(chunk, hold_at)
    }

    /// The cut a complete notice at `start..end` reports, if any.
    fn notice_cut(&mut self, chunk: &[u8], start: usize, end: usize) -> Option<SyncRepCut> {
        if end - start > MAX_NOTICE_LEN {
            return None;
        }
        let base = self.held.len();
        let fields = if start >= base {
            decode_notice(chunk.get(start - base..end - base)?)
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(self.held.get(start..)?);
            self.scratch.extend_from_slice(chunk.get(..end - base)?);
            decode_notice(&self.scratch)
        };
        // A malformed notice is forwarded like any other.
        SyncRepCut::from_notice(&fields.ok()?)
    }

    /// Whether the partial message starting at `at` is one the fence may
    /// have to drop: CommandComplete, ReadyForQuery, or a NoticeResponse
    /// whose length (once known) is within `MAX_NOTICE_LEN`.
    fn small_interesting_message(&self, chunk: &[u8], at: usize) -> bool {
        let base = self.held.len();
        let byte = |offset: usize| -> Option<u8> {
            if offset < base {
                self.held.get(offset).copied()
            } else {
                chunk.get(offset - base).copied()
            }
        };
        match byte(at) {
            Some(COMMAND_COMPLETE | READY_FOR_QUERY) => true,
            Some(NOTICE_RESPONSE) => {
                let mut length = [0u8; LENGTH_FIELD_LEN];
                for (index, slot) in length.iter_mut().enumerate() {
                    match byte(at + TAG_LEN + index) {
                        Some(value) => *slot = value,
                        // Length not known yet: hold until it is.
                        None => return true,
                    }
                }
                usize::try_from(u32::from_be_bytes(length))
                    .is_ok_and(|length| length < MAX_NOTICE_LEN)
            }
            _ => false,
        }
    }

    /// Forwards everything before `hold_at` and holds the rest.
    fn keep_from(&mut self, chunk: &[u8], hold_at: Option<usize>) -> Step {
        let base = self.held.len();
        let Some(at) = hold_at else {
            if base == 0 {
                return Step::PassChunk;
            }
            self.output.clear();
            self.output.append(&mut self.held);
            self.output.extend_from_slice(chunk);
            return Step::Output;
        };
        self.output.clear();
        if at >= base {
            let split = at - base;
            self.output.append(&mut self.held);
            self.output
                .extend_from_slice(chunk.get(..split).unwrap_or_default());
            self.held
                .extend_from_slice(chunk.get(split..).unwrap_or_default());
        } else {
            self.output
                .extend_from_slice(self.held.get(..at).unwrap_or_default());
            self.held.drain(..at);
            self.held.extend_from_slice(chunk);
        }
        if let Tail::Held { at: tail_at } = self.tail {
            self.tail = Tail::Held {
                at: tail_at.saturating_sub(at),
            };
        }
        Step::Output
    }

    /// Forwards everything before `cut` (the start of the held bytes or of
    /// the fencing message) and drops the rest.
    fn fence(&mut self, chunk: &[u8], cause: FenceCause, cut: Option<usize>) -> Step {
        let base = self.held.len();
        self.output.clear();
        let at_boundary = match cut {
            Some(at) if at >= base => {
                self.output.append(&mut self.held);
                self.output
                    .extend_from_slice(chunk.get(..at - base).unwrap_or_default());
                true
            }
            Some(at) => {
                self.output
                    .extend_from_slice(self.held.get(..at).unwrap_or_default());
                true
            }
            // The fencing message began in forwarded bytes: the client
            // holds part of it and can only be disconnected.
            None => false,
        };
        self.held.clear();
        self.holding_response = false;
        self.tail = Tail::Passing;
        Step::Fence { cause, at_boundary }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::notice::notice;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn complete(tag: &str) -> Vec<u8> {
        message(b'C', format!("{tag}\0").as_bytes())
    }

    fn ready(status: u8) -> Vec<u8> {
        message(b'Z', &[status])
    }

    fn sync_rep_notice(code: &str) -> Vec<u8> {
        notice(&[
            (b'S', "WARNING"),
            (b'V', "WARNING"),
            (b'C', code),
            (
                b'M',
                "canceling wait for synchronous replication due to user request",
            ),
            (
                b'D',
                "The transaction has already committed locally, but might not have been \
                 replicated to the standby.",
            ),
            (b'F', "syncrep.c"),
            (b'L', "287"),
            (b'R', "SyncRepWaitForLSN"),
        ])
    }

    fn other_notice() -> Vec<u8> {
        notice(&[
            (b'S', "WARNING"),
            (b'V', "WARNING"),
            (b'C', "01000"),
            (b'M', "just a warning"),
            (b'F', "pl_exec.c"),
            (b'R', "exec_stmt_raise"),
        ])
    }

    /// What the client received, and how the connection ended.
    #[derive(Debug, Default)]
    struct Run {
        forwarded: Vec<u8>,
        fenced: Option<(FenceCause, bool)>,
    }

    /// Feeds `stream` in chunks of `chunk_len`; `cancel_after` bumps the
    /// forwarded-cancel count once that many bytes have been fed.
    fn run(
        stream: &[u8],
        chunk_len: usize,
        awaiting_ready: bool,
        cancel_after: Option<usize>,
    ) -> Run {
        let mut fence = CommitFence::new(FrameScanner::backend(), 0);
        let mut out = Run::default();
        let mut fed = 0;
        for chunk in stream.chunks(chunk_len) {
            let cancels = u64::from(cancel_after.is_some_and(|after| fed >= after));
            fed += chunk.len();
            match fence.feed(chunk, awaiting_ready, cancels).unwrap() {
                Step::PassChunk => out.forwarded.extend_from_slice(chunk),
                Step::Output => out.forwarded.extend_from_slice(fence.output()),
                Step::Fence { cause, at_boundary } => {
                    out.forwarded.extend_from_slice(fence.output());
                    out.fenced = Some((cause, at_boundary));
                    return out;
                }
            }
        }
        out
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    const CHUNKINGS: [usize; 7] = [1, 2, 3, 5, 7, 64, 4096];

    #[test]
    fn normal_responses_pass_unchanged_in_any_chunking() {
        let stream = concat(&[
            &message(b'1', b""),
            &message(b'2', b""),
            &complete("INSERT 0 1"),
            &other_notice(),
            &ready(b'I'),
            &message(b'T', b"\0\0"),
            &message(b'D', &[7; 300]),
            &complete("SELECT 1"),
            &ready(b'I'),
        ]);
        for chunk_len in CHUNKINGS {
            for awaiting in [false, true] {
                let out = run(&stream, chunk_len, awaiting, None);
                assert_eq!(out.forwarded, stream, "chunk {chunk_len}");
                assert!(out.fenced.is_none());
            }
        }
        // One chunk with nothing of interest held: the hot path.
        let mut fence = CommitFence::new(FrameScanner::backend(), 0);
        assert_eq!(fence.feed(&stream, true, 0), Ok(Step::PassChunk));
    }

    #[test]
    fn simple_protocol_notice_before_command_complete_fences() {
        let before = concat(&[&message(b'T', b"\0\0"), &message(b'D', b"xyz")]);
        let stream = concat(&[
            &before,
            &sync_rep_notice("01000"),
            &complete("COMMIT"),
            &ready(b'I'),
        ]);
        for chunk_len in CHUNKINGS {
            for awaiting in [false, true] {
                let out = run(&stream, chunk_len, awaiting, None);
                assert_eq!(
                    out.fenced,
                    Some((FenceCause::WaitCancelled, true)),
                    "chunk {chunk_len}"
                );
                assert_eq!(out.forwarded, before, "chunk {chunk_len}");
            }
        }
    }

    #[test]
    fn extended_protocol_command_complete_is_held_until_the_notice() {
        let before = concat(&[&message(b'1', b""), &message(b'2', b"")]);
        let stream = concat(&[
            &before,
            &complete("INSERT 0 1"),
            &other_notice(),
            &sync_rep_notice("01000"),
            &ready(b'I'),
        ]);
        for chunk_len in CHUNKINGS {
            let out = run(&stream, chunk_len, true, None);
            assert_eq!(out.fenced, Some((FenceCause::WaitCancelled, true)));
            assert_eq!(out.forwarded, before, "chunk {chunk_len}");
        }
        // Without a Sync outstanding the completion is not held, but the
        // error still comes before ReadyForQuery.
        let out = run(&stream, 4096, false, None);
        assert_eq!(out.fenced, Some((FenceCause::WaitCancelled, true)));
        assert!(out.forwarded.ends_with(&other_notice()));
    }

    #[test]
    fn termination_notice_fences_and_nothing_follows() {
        let stream = concat(&[&complete("INSERT 0 1"), &sync_rep_notice("57P01")]);
        for chunk_len in CHUNKINGS {
            let out = run(&stream, chunk_len, true, None);
            assert_eq!(out.fenced, Some((FenceCause::WaitTerminated, true)));
            assert!(out.forwarded.is_empty());
        }
    }

    #[test]
    fn held_completion_then_server_close_is_unknown() {
        let mut fence = CommitFence::new(FrameScanner::backend(), 0);
        let step = fence.feed(&complete("INSERT 0 1"), true, 0).unwrap();
        assert_eq!(step, Step::Output);
        assert!(fence.output().is_empty());
        assert!(fence.forwarded_at_boundary());
        assert_eq!(fence.server_closed(), Some(FenceCause::ServerClosed));
        // Not held (no Sync outstanding): nothing to say.
        let mut fence = CommitFence::new(FrameScanner::backend(), 0);
        assert_eq!(
            fence.feed(&complete("INSERT 0 1"), false, 0),
            Ok(Step::PassChunk)
        );
        assert_eq!(fence.server_closed(), None);
    }

    #[test]
    fn a_forwarded_cancel_fences_the_next_completion() {
        // Simple protocol, notice hidden (client_min_messages = error): the
        // cancel was forwarded before CommandComplete arrived.
        let before = message(b'T', b"\0\0");
        let stream = concat(&[&before, &complete("COMMIT"), &ready(b'I')]);
        for chunk_len in CHUNKINGS {
            for awaiting in [false, true] {
                let out = run(&stream, chunk_len, awaiting, Some(0));
                assert_eq!(out.fenced, Some((FenceCause::CancelForwarded, true)));
                assert_eq!(out.forwarded, before);
            }
        }
        // Extended protocol: CommandComplete held, then the cancel, then
        // ReadyForQuery.
        let stream = concat(&[&message(b'2', b""), &complete("INSERT 0 1"), &ready(b'I')]);
        let cancel_at = stream.len() - ready(b'I').len();
        for chunk_len in [1, 2, 3, 6] {
            let out = run(&stream, chunk_len, true, Some(cancel_at));
            assert_eq!(
                out.fenced,
                Some((FenceCause::CancelForwarded, true)),
                "chunk {chunk_len}"
            );
            assert_eq!(out.forwarded, message(b'2', b""), "chunk {chunk_len}");
        }
    }

    #[test]
    fn a_cancel_that_ends_a_statement_with_an_error_is_left_alone() {
        let stream = concat(&[
            &message(b'E', b"SERROR\0C57014\0\0"),
            &ready(b'I'),
            &complete("SELECT 1"),
            &ready(b'I'),
        ]);
        for chunk_len in CHUNKINGS {
            let out = run(&stream, chunk_len, true, Some(0));
            assert!(out.fenced.is_none());
            assert_eq!(out.forwarded, stream);
        }
    }

    #[test]
    fn copy_in_releases_the_hold() {
        let stream = concat(&[&complete("INSERT 0 1"), &message(b'G', b"\0\0\0")]);
        let out = run(&stream, 4096, true, None);
        assert_eq!(out.forwarded, stream);
        assert!(out.fenced.is_none());
    }

    #[test]
    fn a_long_response_behind_a_completion_is_forwarded_beyond_the_bound() {
        let rows = message(b'D', &vec![1; MAX_HELD_RESPONSE]);
        let stream = concat(&[&complete("INSERT 0 1"), &rows, &complete("SELECT 1")]);
        let out = run(&stream, 8192, true, None);
        assert!(out.fenced.is_none());
        // Everything but the last CommandComplete (a held tail or hold).
        assert!(out.forwarded.len() >= stream.len() - complete("SELECT 1").len());
        // The notice still fences, before ReadyForQuery.
        let stream = concat(&[&stream, &sync_rep_notice("01000"), &ready(b'I')]);
        let out = run(&stream, 8192, true, None);
        assert_eq!(out.fenced, Some((FenceCause::WaitCancelled, true)));
    }

    #[test]
    fn an_oversized_notice_passes_undecoded() {
        let big = notice(&[(b'M', &"x".repeat(MAX_NOTICE_LEN))]);
        let stream = concat(&[&big, &ready(b'I')]);
        for chunk_len in [1000, 8192] {
            let out = run(&stream, chunk_len, false, None);
            assert_eq!(out.forwarded, stream);
        }
    }

    #[test]
    fn a_message_split_before_the_fence_started_cannot_be_cut_cleanly() {
        let mut fence = CommitFence::new(FrameScanner::backend(), 0);
        let rows = message(b'D', b"abcdef");
        assert_eq!(fence.feed(&rows[..3], false, 0), Ok(Step::PassChunk));
        assert!(!fence.forwarded_at_boundary());
        assert!(!fence.abandon());
    }

    #[test]
    fn framing_errors_are_reported() {
        let mut fence = CommitFence::new(FrameScanner::backend(), 0);
        assert!(fence.feed(&[b'C', 0, 0, 0, 1], false, 0).is_err());
    }

    #[test]
    fn random_streams_never_panic_and_forward_a_prefix() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces = [
            complete("INSERT 0 1"),
            complete("COMMIT"),
            ready(b'I'),
            ready(b'T'),
            sync_rep_notice("01000"),
            sync_rep_notice("57P01"),
            other_notice(),
            message(b'D', &[3; 100]),
            message(b'G', b"\0\0\0"),
            message(b'2', b""),
        ];
        for _ in 0..3000 {
            let mut stream = Vec::new();
            for _ in 0..(next() % 12) {
                stream.extend_from_slice(&pieces[(next() % pieces.len() as u64) as usize]);
            }
            let chunk_len = 1 + (next() % 40) as usize;
            let cancel_after = (next() % 3 == 0).then(|| (next() % 200) as usize);
            let out = run(&stream, chunk_len, next() % 2 == 0, cancel_after);
            assert!(stream.starts_with(&out.forwarded));
            // A stream ending with ReadyForQuery is forwarded whole unless
            // fenced: holding never loses or reorders bytes.
            if out.fenced.is_none() && stream.ends_with(&ready(b'I')) {
                assert_eq!(out.forwarded, stream);
            }
        }
    }
}
