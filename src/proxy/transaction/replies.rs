//! Which server reply answers which client message, in transaction mode,
//! where the proxy sends the server messages the client did not (a Parse
//! that prepares the client's statement on this server connection) and
//! answers some client messages itself (a Parse of a statement the
//! connection already has, a Close of a statement other clients share).
//! Replies come in the order of the messages, so a queue of what is
//! expected says what to do with each server message: forward it, swallow
//! it (the answer to the proxy's own message), and when to insert the
//! proxy's own answers. An ErrorResponse in the extended protocol makes the
//! server skip everything up to the next Sync, so the expectations up to
//! it are dropped too, the proxy's own answers among them, as PostgreSQL
//! would not have answered them either. Pure.

use std::collections::VecDeque;

use super::statements::Statement;
use super::IDLE;
use crate::proxy::fence::COPY_IN_RESPONSE;
use crate::wire::extended::{
    empty, ready_for_query, BIND_COMPLETE, CLOSE_COMPLETE, COMMAND_COMPLETE, EMPTY_QUERY, NO_DATA,
    PARSE_COMPLETE, PORTAL_SUSPENDED, ROW_DESCRIPTION,
};
use crate::wire::startup::{ERROR_RESPONSE, READY_FOR_QUERY};

/// What a message sent to the server is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// ParseComplete; `prepared` names the server statement the Parse
    /// creates and `client` the client's name for it with the statement's
    /// serial, both forgotten again if it fails (PostgreSQL keeps nothing
    /// of a failed Parse).
    Parse {
        prepared: Option<String>,
        client: Option<(String, u64)>,
    },
    Bind,
    Close,
    /// ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    DescribePortal,
    /// Rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    Sync,
    /// Query or FunctionCall: everything up to ReadyForQuery.
    Simple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// A reply the client gets.
    Client(Kind),
    /// A reply to the proxy's own message, swallowed.
    Proxy(Kind),
    /// The proxy's own answer to a client message, inserted in its turn,
    /// and what undoes the message if the server skips past it.
    Answer { reply: Vec<u8>, undo: Option<Undo> },
    /// The client's CopyDone or CopyFail: the Syncs before it, back to a
    /// COPY FROM STDIN's Execute, are ignored by the server.
    CopyEnd,
}

/// What the proxy undoes of a message PostgreSQL skipped (after an error
/// in the extended protocol) or never got (its connection lost): the
/// server keeps nothing of it, so neither may the proxy's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// A Parse: the server statement it created on its connection, and
    /// the client's name for it with the serial of what it made.
    Parse {
        prepared: Option<String>,
        client: Option<(String, u64)>,
    },
    /// A Close of a client's statement, which the proxy answered: the
    /// statement comes back.
    Close {
        client: String,
        statement: Statement,
    },
}

impl Undo {
    /// What undoes a message of `kind` (only a Parse leaves anything).
    fn of(kind: Kind) -> Option<Undo> {
        match kind {
            Kind::Parse { prepared, client } => Some(Undo::Parse { prepared, client }),
            _ => None,
        }
    }
}

/// What to do with one server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Swallow,
}

/// The replies outstanding on one server connection.
#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Expect>,
    /// In COPY FROM STDIN with no CopyDone yet: the client's Syncs are
    /// ignored by the server (PostgreSQL ignores Sync in copy-in mode).
    copying_in: bool,
}

impl Replies {
    /// The client's message was forwarded.
    pub fn client(&mut self, kind: Kind) {
        if kind == Kind::Sync && self.copying_in {
            return;
        }
        self.queue.push_back(Expect::Client(kind));
    }

    /// The client sent CopyDone or CopyFail.
    pub fn copy_end(&mut self) {
        if self.copying_in {
            self.copying_in = false;
        } else {
            self.queue.push_back(Expect::CopyEnd);
        }
    }

    /// The server sent CopyInResponse: the Syncs the client sent since the
    /// COPY, up to its CopyDone, will never be answered.
    fn copy_in_started(&mut self) {
        let mut at = 1;
        while at < self.queue.len() {
            match self.queue[at] {
                Expect::CopyEnd => {
                    self.queue.remove(at);
                    return;
                }
                Expect::Client(Kind::Sync) => {
                    self.queue.remove(at);
                }
                _ => at += 1,
            }
        }
        self.copying_in = true;
    }

    /// The proxy sent a message of its own.
    pub fn proxy(&mut self, kind: Kind) {
        self.queue.push_back(Expect::Proxy(kind));
    }

    /// The proxy answers a client message itself with `reply`; `undo`
    /// if the server skips past it.
    pub fn answer(&mut self, reply: Vec<u8>, undo: Option<Undo>) {
        self.queue.push_back(Expect::Answer { reply, undo });
    }

    /// Nothing outstanding: every message sent has been answered.
    pub fn is_settled(&self) -> bool {
        self.queue.is_empty()
    }

    /// Moves the proxy's answers that are next in turn to `out` (and drops
    /// CopyDone marks of statements that were no COPY).
    pub fn answers_due(&mut self, out: &mut Vec<u8>) {
        while let Some(Expect::Answer { .. } | Expect::CopyEnd) = self.queue.front() {
            if let Some(Expect::Answer { reply, .. }) = self.queue.pop_front() {
                out.extend_from_slice(&reply);
            }
        }
    }

    /// Whether the message tagged `tag` (seen at its start) goes to the
    /// client. Asynchronous messages (notices, parameter status,
    /// notifications) and anything unexpected are forwarded.
    pub fn disposition(&self, tag: u8) -> Disposition {
        match self.queue.front() {
            Some(Expect::Proxy(kind)) if tag != ERROR_RESPONSE && answers(kind, tag).is_some() => {
                Disposition::Swallow
            }
            _ => Disposition::Forward,
        }
    }

    /// The message tagged `tag` has ended; returns what an error undid:
    /// the message it answers and those the server then skipped.
    pub fn ended(&mut self, tag: u8) -> Vec<Undo> {
        let mut undone = Vec::new();
        let Some(Expect::Client(kind) | Expect::Proxy(kind)) = self.queue.front() else {
            return undone;
        };
        if tag == ERROR_RESPONSE && *kind != Kind::Simple {
            // The server skips to the next Sync: nothing else is answered.
            while let Some(next) = self.queue.front() {
                if matches!(next, Expect::Client(Kind::Sync) | Expect::Proxy(Kind::Sync)) {
                    break;
                }
                match self.queue.pop_front() {
                    Some(Expect::Client(kind) | Expect::Proxy(kind)) => {
                        undone.extend(Undo::of(kind))
                    }
                    Some(Expect::Answer { undo, .. }) => undone.extend(undo),
                    _ => {}
                }
            }
            return undone;
        }
        let done = answers(kind, tag) == Some(true);
        if tag == COPY_IN_RESPONSE {
            self.copy_in_started();
        }
        if done {
            self.queue.pop_front();
        }
        undone
    }

    /// The server connection is gone while nothing that runs a statement
    /// reached it (only Parse, Bind, Describe, Close, Sync, Flush, and
    /// messages not yet sent): answers what is still owed as PostgreSQL
    /// answers after an error. The first message that needed the server
    /// gets `error` and the rest up to Sync go unanswered, except a Close,
    /// which gets CloseComplete (what it closed went with the connection);
    /// each Sync gets ReadyForQuery, idle, and so does a Query after its
    /// error. Appends the answers to `out`; returns what is undone, and
    /// whether the error still waits for its Sync (the client's messages
    /// up to it are to be skipped).
    pub fn settle_lost(&mut self, error: &[u8], out: &mut Vec<u8>) -> (Vec<Undo>, bool) {
        let mut undone = Vec::new();
        let mut skipping = false;
        for expect in self.queue.drain(..) {
            match expect {
                Expect::Client(Kind::Sync) | Expect::Proxy(Kind::Sync) => {
                    if let Expect::Client(_) = expect {
                        out.extend_from_slice(&ready_for_query(IDLE));
                    }
                    skipping = false;
                }
                Expect::CopyEnd => {}
                Expect::Answer { reply, .. } if !skipping => out.extend_from_slice(&reply),
                Expect::Answer { undo, .. } => undone.extend(undo),
                Expect::Client(Kind::Close) if !skipping => {
                    out.extend_from_slice(&empty(CLOSE_COMPLETE))
                }
                // A Query (or function call) never sent: its error and
                // its own ReadyForQuery, with nothing to skip.
                Expect::Client(Kind::Simple) if !skipping => {
                    out.extend_from_slice(error);
                    out.extend_from_slice(&ready_for_query(IDLE));
                }
                Expect::Client(kind) => {
                    if !skipping {
                        out.extend_from_slice(error);
                        skipping = true;
                    }
                    undone.extend(Undo::of(kind));
                }
                Expect::Proxy(kind) => undone.extend(Undo::of(kind)),
            }
        }
        self.copying_in = false;
        (undone, skipping)
    }
}

/// Whether `tag` belongs to the reply to `kind`: Some(true) when it ends
/// it, Some(false) when more follows, None when it is not part of it.
fn answers(kind: &Kind, tag: u8) -> Option<bool> {
    let ends = match kind {
        Kind::Parse { .. } => tag == PARSE_COMPLETE,
        Kind::Bind => tag == BIND_COMPLETE,
        Kind::Close => tag == CLOSE_COMPLETE,
        Kind::DescribeStatement | Kind::DescribePortal => {
            matches!(tag, ROW_DESCRIPTION | NO_DATA)
        }
        Kind::Execute => matches!(tag, COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED),
        Kind::Sync | Kind::Simple => tag == READY_FOR_QUERY,
    };
    if ends {
        return Some(true);
    }
    let part = match kind {
        Kind::DescribeStatement => tag == crate::wire::extended::PARAMETER_DESCRIPTION,
        Kind::Execute | Kind::Simple => true,
        _ => false,
    };
    part.then_some(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::transaction::tests::tags_of;
    use crate::wire::extended::{empty, PARAMETER_DESCRIPTION};

    /// Feeds server tags; returns (forwarded tags, answers inserted).
    fn run(replies: &mut Replies, tags: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (mut forwarded, mut out) = (Vec::new(), Vec::new());
        replies.answers_due(&mut out);
        for &tag in tags {
            if replies.disposition(tag) == Disposition::Forward {
                forwarded.push(tag);
            }
            replies.ended(tag);
            replies.answers_due(&mut out);
        }
        (forwarded, out.iter().step_by(5).copied().collect())
    }

    #[test]
    fn a_prepare_the_proxy_added_is_swallowed() {
        let mut replies = Replies::default();
        replies.proxy(Kind::Parse {
            prepared: Some("pgmirror_1".into()),
            client: None,
        });
        replies.client(Kind::Bind);
        replies.client(Kind::Execute);
        replies.client(Kind::Sync);
        let (forwarded, _) = run(&mut replies, b"12DDCZ");
        assert_eq!(forwarded, b"2DDCZ");
        assert!(replies.is_settled());
    }

    #[test]
    fn the_proxys_answers_come_in_their_turn() {
        let mut replies = Replies::default();
        replies.client(Kind::Bind);
        parse_answered(&mut replies, "s1");
        replies.client(Kind::DescribeStatement);
        replies.client(Kind::Sync);
        let mut out = Vec::new();
        replies.answers_due(&mut out);
        assert!(out.is_empty(), "answered before the Bind's reply");
        assert_eq!(replies.disposition(BIND_COMPLETE), Disposition::Forward);
        replies.ended(BIND_COMPLETE);
        replies.answers_due(&mut out);
        assert_eq!(out, empty(PARSE_COMPLETE));
        let (forwarded, _) = run(&mut replies, &[PARAMETER_DESCRIPTION, NO_DATA, b'Z']);
        assert_eq!(forwarded, [PARAMETER_DESCRIPTION, NO_DATA, b'Z']);
        assert!(replies.is_settled());
    }

    #[test]
    fn an_error_drops_everything_up_to_sync() {
        let mut replies = Replies::default();
        replies.client(parse("pgmirror_2", "s2"));
        let undo = close_answered(&mut replies, "s1");
        replies.client(Kind::Bind);
        replies.client(Kind::Sync);
        assert_eq!(
            replies.ended(ERROR_RESPONSE),
            [unparse("pgmirror_2", "s2"), undo],
            "the skipped Close's statement does not come back"
        );
        let (forwarded, answers) = run(&mut replies, b"Z");
        assert_eq!(forwarded, b"Z");
        assert!(answers.is_empty(), "a skipped message was answered");
        assert!(replies.is_settled());
    }

    #[test]
    fn errors_inside_a_simple_query_do_not_skip() {
        let mut replies = Replies::default();
        replies.client(Kind::Simple);
        replies.client(Kind::Simple);
        let (forwarded, _) = run(&mut replies, b"TDCEZCZ");
        assert_eq!(forwarded, b"TDCEZCZ");
        assert!(replies.is_settled());
    }

    #[test]
    fn syncs_sent_during_copy_in_are_not_answered() {
        // tokio-postgres: Bind, Execute, Sync, data, CopyDone, Sync.
        let mut replies = Replies::default();
        replies.client(Kind::Bind);
        replies.client(Kind::Execute);
        replies.client(Kind::Sync);
        replies.copy_end();
        replies.client(Kind::Sync);
        let (forwarded, _) = run(&mut replies, b"2GCZ");
        assert_eq!(forwarded, b"2GCZ");
        assert!(replies.is_settled(), "{replies:?}");
        // The COPY's response before the client's CopyDone.
        replies.client(Kind::Simple);
        run(&mut replies, b"G");
        replies.client(Kind::Sync);
        replies.copy_end();
        run(&mut replies, b"CZ");
        assert!(replies.is_settled(), "{replies:?}");
        // A CopyDone mark of a statement that was no COPY goes unnoticed.
        replies.client(Kind::Execute);
        replies.copy_end();
        replies.client(Kind::Sync);
        run(&mut replies, b"CZ");
        assert!(replies.is_settled(), "{replies:?}");
    }

    #[test]
    fn notices_and_status_pass_without_ending_anything() {
        let mut replies = Replies::default();
        replies.proxy(Kind::Parse {
            prepared: None,
            client: None,
        });
        assert_eq!(replies.disposition(b'N'), Disposition::Forward);
        replies.ended(b'N');
        assert!(!replies.is_settled());
        assert_eq!(replies.disposition(PARSE_COMPLETE), Disposition::Swallow);
        replies.ended(PARSE_COMPLETE);
        assert!(replies.is_settled());
    }

    fn parse(server: &str, client: &str) -> Kind {
        Kind::Parse {
            prepared: Some(server.into()),
            client: Some((client.into(), 7)),
        }
    }

    fn unparse(server: &str, client: &str) -> Undo {
        Undo::of(parse(server, client)).unwrap()
    }

    /// The proxy answers a Close of `client` itself; what undoes it.
    fn close_answered(replies: &mut Replies, client: &str) -> Undo {
        let statement = Statement::new("SELECT 1", &[0, 0], "");
        let undo = Undo::Close {
            client: client.into(),
            statement,
        };
        replies.answer(empty(CLOSE_COMPLETE), Some(undo.clone()));
        undo
    }

    /// The proxy answers a Parse of `client` itself (its connection has
    /// the statement); what undoes it.
    fn parse_answered(replies: &mut Replies, client: &str) -> Undo {
        let undo = Undo::Parse {
            prepared: None,
            client: Some((client.into(), 7)),
        };
        replies.answer(empty(PARSE_COMPLETE), Some(undo.clone()));
        undo
    }

    #[test]
    fn an_error_undoes_the_parses_the_server_skips() {
        let mut replies = Replies::default();
        replies.client(Kind::Bind);
        replies.proxy(parse("pgmirror_3", "s3"));
        replies.client(parse("pgmirror_4", "s4"));
        let undo = parse_answered(&mut replies, "s5");
        replies.client(Kind::Sync);
        let undone = replies.ended(ERROR_RESPONSE);
        assert_eq!(
            undone,
            [
                unparse("pgmirror_3", "s3"),
                unparse("pgmirror_4", "s4"),
                undo
            ],
            "a skipped Parse, the server's or the proxy's answer, is not kept"
        );
        let (forwarded, _) = run(&mut replies, b"Z");
        assert_eq!(forwarded, b"Z");
        assert!(replies.is_settled());
    }

    #[test]
    fn an_error_in_the_commit_at_sync_is_answered_by_that_sync() {
        let mut replies = Replies::default();
        replies.client(Kind::Sync);
        replies.client(Kind::Sync);
        assert!(replies.ended(ERROR_RESPONSE).is_empty());
        run(&mut replies, b"Z");
        assert!(
            !replies.is_settled(),
            "one ReadyForQuery answered two Syncs"
        );
        run(&mut replies, b"Z");
        assert!(replies.is_settled());
    }

    #[test]
    fn a_dropped_statement_in_flight_when_the_server_is_lost_is_answered_by_the_proxy() {
        // tokio-postgres drops two statements: Close, Sync, Close, Sync.
        let mut replies = Replies::default();
        for name in ["s1", "s2"] {
            close_answered(&mut replies, name);
            replies.client(Kind::Sync);
        }
        let mut out = Vec::new();
        replies.answers_due(&mut out);
        let (undone, skipping) = replies.settle_lost(b"E", &mut out);
        assert!(undone.is_empty());
        assert!(!skipping);
        assert_eq!(tags_of(&out), b"3Z3Z");
        assert_eq!(&out[out.len() - 6..], ready_for_query(IDLE).as_slice());
        assert!(replies.is_settled());
    }

    #[test]
    fn a_query_never_sent_gets_its_error_and_ready_for_query() {
        let mut replies = Replies::default();
        replies.client(Kind::Simple);
        replies.client(Kind::Simple);
        let mut out = Vec::new();
        let (undone, skipping) = replies.settle_lost(b"E\0\0\0\x04", &mut out);
        assert!(undone.is_empty());
        assert!(!skipping, "a Query's error skips nothing after it");
        assert_eq!(tags_of(&out), b"EZEZ");
    }

    #[test]
    fn a_prepare_in_flight_when_the_server_is_lost_gets_one_error_and_its_sync() {
        let mut replies = Replies::default();
        replies.proxy(parse("pgmirror_5", "s5"));
        replies.client(parse("pgmirror_6", "s6"));
        replies.client(Kind::DescribeStatement);
        let undo = close_answered(&mut replies, "s0");
        replies.client(Kind::Sync);
        // The unnamed statement's Close, which the server answers.
        replies.client(Kind::Close);
        replies.client(Kind::Sync);
        replies.client(parse("pgmirror_7", "s7"));
        let mut out = Vec::new();
        let (undone, skipping) = replies.settle_lost(b"E\0\0\0\x04", &mut out);
        assert_eq!(
            undone,
            [
                unparse("pgmirror_5", "s5"),
                unparse("pgmirror_6", "s6"),
                undo,
                unparse("pgmirror_7", "s7")
            ]
        );
        assert!(skipping, "the last Parse's error still waits for its Sync");
        assert_eq!(
            tags_of(&out),
            b"EZ3ZE",
            "one error per Sync, nothing skipped answered"
        );
        assert!(replies.is_settled());
    }
}
