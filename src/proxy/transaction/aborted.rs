//! A client whose transaction a failover ended (its server connection was
//! on the former principal): the proxy answers it as PostgreSQL answers a
//! client in a failed transaction, until it ends the transaction. The
//! first message gets SQLSTATE 40001 (serialization_failure: the
//! transaction certainly did not commit, so drivers and ORMs may retry
//! it), later ones 25P02; a ROLLBACK (or COMMIT, ABORT, END), by the simple
//! or the extended protocol, is answered with ROLLBACK and the client is
//! back outside a transaction; after an error in the extended protocol
//! everything up to Sync is discarded. Pure.

use std::collections::HashSet;

use crate::proxy::transaction::sql::is_transaction_end;
use crate::proxy::transaction::statements::{ClientStatements, Statement};
use crate::wire::extended::{
    self, decode_bind, decode_parse, decode_query, decode_target, BIND, BIND_COMPLETE, CLOSE,
    CLOSE_COMPLETE, DESCRIBE, EXECUTE, FLUSH, NO_DATA, PARSE, PARSE_COMPLETE, QUERY, SYNC,
    TARGET_PORTAL, TARGET_STATEMENT, TERMINATE,
};
use crate::wire::startup::{error_response, Severity};

/// SQLSTATE serialization_failure.
pub const SQLSTATE_SERIALIZATION_FAILURE: &str = "40001";
/// SQLSTATE in_failed_sql_transaction.
const SQLSTATE_IN_FAILED_TRANSACTION: &str = "25P02";
const TRANSACTION_FAILED: u8 = b'E';
const IDLE: u8 = b'I';

/// What the client does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Still in the failed transaction.
    Stay,
    /// It ended the transaction: serve it normally again.
    Done,
    /// It sent Terminate.
    Leave,
}

/// The failed transaction of one client.
#[derive(Debug)]
pub struct Aborted {
    /// The 40001 message, until it has been sent.
    first_error: Option<String>,
    /// An extended-protocol error was sent: discard until Sync.
    skipping: bool,
    /// A ROLLBACK ran: the next ReadyForQuery says idle.
    ended: bool,
    /// Portals bound to a transaction end.
    ending_portals: HashSet<String>,
}

impl Aborted {
    /// `reason` is the 40001 message the client's next message gets.
    pub fn new(reason: String) -> Aborted {
        Aborted {
            first_error: Some(reason),
            skipping: false,
            ended: false,
            ending_portals: HashSet::new(),
        }
    }

    /// Answers one whole client message into `out`.
    pub fn message(
        &mut self,
        message: &[u8],
        statements: &mut ClientStatements,
        out: &mut Vec<u8>,
    ) -> Next {
        let tag = message.first().copied().unwrap_or_default();
        if tag == TERMINATE {
            return Next::Leave;
        }
        if tag == SYNC {
            self.skipping = false;
            let status = if self.ended { IDLE } else { TRANSACTION_FAILED };
            out.extend_from_slice(&extended::ready_for_query(status));
            return if self.ended { Next::Done } else { Next::Stay };
        }
        if self.skipping {
            return Next::Stay;
        }
        let ends = |name: &str, statements: &ClientStatements| {
            statements
                .get(name)
                .is_some_and(|statement| is_transaction_end(&statement.query))
        };
        let answered = match tag {
            QUERY => {
                if decode_query(message).is_some_and(is_transaction_end) {
                    out.extend_from_slice(&extended::command_complete("ROLLBACK"));
                    out.extend_from_slice(&extended::ready_for_query(IDLE));
                    return Next::Done;
                }
                self.error(out);
                out.extend_from_slice(&extended::ready_for_query(TRANSACTION_FAILED));
                return Next::Stay;
            }
            PARSE => match decode_parse(message) {
                Some(parse) if is_transaction_end(parse.query) => {
                    // No search_path: a transaction end names nothing.
                    let statement = Statement::new(parse.query, parse.types, "");
                    statements.insert(parse.statement.to_string(), statement);
                    out.extend_from_slice(&extended::empty(PARSE_COMPLETE));
                    true
                }
                _ => false,
            },
            BIND => match decode_bind(message) {
                Some((portal, statement, _)) if ends(statement, statements) => {
                    self.ending_portals.insert(portal.to_string());
                    out.extend_from_slice(&extended::empty(BIND_COMPLETE));
                    true
                }
                _ => false,
            },
            DESCRIBE => match decode_target(message) {
                Some((TARGET_STATEMENT, name)) if ends(name, statements) => {
                    out.extend_from_slice(&extended::no_parameters());
                    out.extend_from_slice(&extended::empty(NO_DATA));
                    true
                }
                Some((TARGET_PORTAL, name)) if self.ending_portals.contains(name) => {
                    out.extend_from_slice(&extended::empty(NO_DATA));
                    true
                }
                _ => false,
            },
            EXECUTE => {
                let portal = extended::decode_execute(message);
                if portal.is_some_and(|portal| self.ending_portals.contains(portal)) {
                    self.ended = true;
                    out.extend_from_slice(&extended::command_complete("ROLLBACK"));
                    true
                } else {
                    false
                }
            }
            CLOSE => {
                if let Some((TARGET_STATEMENT, name)) = decode_target(message) {
                    statements.remove(name);
                }
                out.extend_from_slice(&extended::empty(CLOSE_COMPLETE));
                true
            }
            // Flush, and COPY data of a COPY the failover ended.
            FLUSH => true,
            _ => true,
        };
        if !answered {
            self.error(out);
            self.skipping = true;
        }
        Next::Stay
    }

    /// The 40001 the first time, 25P02 after.
    fn error(&mut self, out: &mut Vec<u8>) {
        let error = match self.first_error.take() {
            Some(reason) => {
                error_response(Severity::Error, SQLSTATE_SERIALIZATION_FAILURE, &reason)
            }
            None => error_response(
                Severity::Error,
                SQLSTATE_IN_FAILED_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            ),
        };
        out.extend_from_slice(&error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::extended::{encode_bind, encode_parse, encode_query, encode_target, message};
    use crate::wire::startup::error_code;

    /// Tags and SQLSTATEs of what the proxy answered.
    fn replies(out: &[u8]) -> Vec<String> {
        let mut all = Vec::new();
        let mut rest = out;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
            let (one, tail) = rest.split_at(len);
            all.push(match error_code(one) {
                Some(code) => format!("E{code}"),
                None if one[0] == b'Z' => format!("Z{}", one[5] as char),
                None => (one[0] as char).to_string(),
            });
            rest = tail;
        }
        all
    }

    #[test]
    fn simple_protocol_gets_40001_then_25p02_then_rollback_works() {
        let mut aborted = Aborted::new("failover".into());
        let mut statements = ClientStatements::new();
        let mut out = Vec::new();
        let insert = encode_query("INSERT INTO t VALUES (1)");
        assert_eq!(
            aborted.message(&insert, &mut statements, &mut out),
            Next::Stay
        );
        assert_eq!(
            aborted.message(&insert, &mut statements, &mut out),
            Next::Stay
        );
        let rollback = encode_query("ROLLBACK");
        assert_eq!(
            aborted.message(&rollback, &mut statements, &mut out),
            Next::Done
        );
        assert_eq!(replies(&out), ["E40001", "ZE", "E25P02", "ZE", "C", "ZI"]);
    }

    #[test]
    fn extended_protocol_discards_until_sync_and_rolls_back() {
        let mut aborted = Aborted::new("failover".into());
        let mut statements = ClientStatements::new();
        let mut out = Vec::new();
        for message in [
            encode_parse("", "INSERT INTO t VALUES (1)", &[0, 0]),
            encode_bind("", "", &[0, 0, 0, 0, 0, 0]),
            message(EXECUTE, &[b"\0", &[0, 0, 0, 0]]),
            message(SYNC, &[]),
            encode_parse("r", "ROLLBACK", &[0, 0]),
            encode_bind("", "r", &[0, 0, 0, 0, 0, 0]),
            encode_target(DESCRIBE, TARGET_PORTAL, ""),
            message(EXECUTE, &[b"\0", &[0, 0, 0, 0]]),
        ] {
            assert_eq!(
                aborted.message(&message, &mut statements, &mut out),
                Next::Stay
            );
        }
        let sync = message(SYNC, &[]);
        assert_eq!(
            aborted.message(&sync, &mut statements, &mut out),
            Next::Done
        );
        assert_eq!(replies(&out), ["E40001", "ZE", "1", "2", "n", "C", "ZI"]);
        assert!(
            statements.contains_key("r"),
            "the ROLLBACK statement is kept"
        );
    }
}
