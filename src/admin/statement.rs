//! The admin console's commands: the reference's `ALTER DATABASE ... SET
//! PARTNER / SET WITNESS` (spec 50, 54) and PgBouncer-style `SHOW CLIENTS |
//! SERVERS | SESSIONS | POOLS`, parsed into the typed [`Statement`] enum. Queries
//! go to `admin::sql` instead.
//!
//! sqlparser's PostgreSQL tokenizer splits the text (so quoting, comments
//! and case follow SQL rules); the token stream is then matched by hand
//! because sqlparser's parser has no `SET PARTNER FAILOVER` form. Pure
//! functions, no IO.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::config::Endpoint;
use crate::roles::Safety;

/// `ALTER DATABASE <session> SET PARTNER ...` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartnerOption {
    Failover,
    ForceServiceAllowDataLoss,
    Suspend,
    Resume,
    Safety(Safety),
    Timeout(u64),
    Off,
}

/// One admin console statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    SetPartner {
        session: String,
        option: PartnerOption,
    },
    /// `SET WITNESS = 'addr'` (Some) or `SET WITNESS OFF` (None).
    SetWitness {
        session: String,
        witness: Option<Endpoint>,
    },
    ShowClients,
    ShowServers,
    ShowSessions,
    ShowPools,
}

/// The statements the console understands, for syntax errors.
pub const SUPPORTED: &str = "supported statements: \
SELECT over the views sys.database_mirroring, sys.database_mirroring_witnesses, \
sys.database_mirroring_endpoints, sys.database_mirroring_history, pgmirror.clients, \
pgmirror.servers, pgmirror.sessions, pgmirror.pools (PostgreSQL's SQL: WHERE, joins, aggregates, ORDER BY, LIMIT); \
SHOW <setting>; \
ALTER DATABASE <session> SET PARTNER { FAILOVER | FORCE_SERVICE_ALLOW_DATA_LOSS | SUSPEND | RESUME | SAFETY { FULL | OFF } | TIMEOUT <seconds> | OFF }; \
ALTER DATABASE <session> SET WITNESS { = '<host:port>' | OFF }; \
SHOW CLIENTS; SHOW SERVERS; SHOW SESSIONS; SHOW POOLS";

/// Why a statement was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; {SUPPORTED}")]
pub struct SyntaxError {
    pub problem: String,
}

fn syntax(problem: impl Into<String>) -> SyntaxError {
    SyntaxError {
        problem: problem.into(),
    }
}

/// A token stream without whitespace, with a cursor.
struct Tokens {
    tokens: Vec<Token>,
    at: usize,
}

impl Tokens {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    /// The next token as an unquoted keyword, upper-cased.
    fn keyword(&mut self) -> Option<String> {
        match self.next()? {
            Token::Word(word) if word.quote_style.is_none() => Some(word.value.to_uppercase()),
            _ => None,
        }
    }

    fn expect(&mut self, wanted: &str) -> Result<(), SyntaxError> {
        match self.keyword() {
            Some(word) if word == wanted => Ok(()),
            Some(word) => Err(syntax(format!("expected {wanted}, found {word}"))),
            None => Err(syntax(format!("expected {wanted}"))),
        }
    }

    /// An identifier: a word (folded to lower case unless quoted).
    fn identifier(&mut self) -> Result<String, SyntaxError> {
        match self.next() {
            Some(Token::Word(word)) if word.quote_style.is_some() => Ok(word.value),
            Some(Token::Word(word)) => Ok(word.value.to_lowercase()),
            _ => Err(syntax("expected a session name")),
        }
    }

    fn end(&mut self) -> Result<(), SyntaxError> {
        while self.peek() == Some(&Token::SemiColon) {
            self.at += 1;
        }
        match self.peek() {
            None | Some(Token::EOF) => Ok(()),
            Some(token) => Err(syntax(format!("unexpected {token} at the end"))),
        }
    }
}

fn tokens(sql: &str) -> Result<Tokens, SyntaxError> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|err| syntax(err.to_string()))?
        .into_iter()
        .filter(|token| !matches!(token, Token::Whitespace(_)))
        .collect();
    Ok(Tokens { tokens, at: 0 })
}

/// Whether `sql` is one of these commands (ALTER ..., SHOW CLIENTS |
/// SERVERS | SESSIONS | POOLS) rather than a query or `SHOW <setting>`.
pub fn is_command(sql: &str) -> bool {
    let Ok(mut tokens) = tokens(sql) else {
        return false;
    };
    match tokens.keyword().as_deref() {
        Some("ALTER") => true,
        Some("SHOW") => matches!(
            tokens.keyword().as_deref(),
            Some("CLIENTS" | "SERVERS" | "SESSIONS" | "POOLS")
        ),
        _ => false,
    }
}

/// Parses one command.
pub fn parse(sql: &str) -> Result<Statement, SyntaxError> {
    let mut tokens = tokens(sql)?;
    let statement = match tokens.keyword().as_deref() {
        Some("ALTER") => alter(&mut tokens)?,
        Some("SHOW") => match tokens.keyword().as_deref() {
            Some("CLIENTS") => Statement::ShowClients,
            Some("SERVERS") => Statement::ShowServers,
            Some("SESSIONS") => Statement::ShowSessions,
            Some("POOLS") => Statement::ShowPools,
            _ => return Err(syntax("SHOW needs CLIENTS, SERVERS, SESSIONS or POOLS")),
        },
        _ => return Err(syntax("unsupported statement")),
    };
    tokens.end()?;
    Ok(statement)
}

fn alter(tokens: &mut Tokens) -> Result<Statement, SyntaxError> {
    tokens.expect("DATABASE")?;
    let session = tokens.identifier()?;
    tokens.expect("SET")?;
    match tokens.keyword().as_deref() {
        Some("PARTNER") => {
            let option = match tokens.keyword().as_deref() {
                Some("FAILOVER") => PartnerOption::Failover,
                Some("FORCE_SERVICE_ALLOW_DATA_LOSS") => PartnerOption::ForceServiceAllowDataLoss,
                Some("SUSPEND") => PartnerOption::Suspend,
                Some("RESUME") => PartnerOption::Resume,
                Some("OFF") => PartnerOption::Off,
                Some("SAFETY") => match tokens.keyword().as_deref() {
                    Some("FULL") => PartnerOption::Safety(Safety::Full),
                    Some("OFF") => PartnerOption::Safety(Safety::Off),
                    _ => return Err(syntax("SAFETY needs FULL or OFF")),
                },
                Some("TIMEOUT") => match tokens.next() {
                    Some(Token::Number(digits, _)) => {
                        PartnerOption::Timeout(digits.parse().map_err(|_| {
                            syntax(format!("TIMEOUT {digits} is not a whole number of seconds"))
                        })?)
                    }
                    _ => return Err(syntax("TIMEOUT needs a number of seconds")),
                },
                _ => return Err(syntax("unknown SET PARTNER option")),
            };
            Ok(Statement::SetPartner { session, option })
        }
        Some("WITNESS") => {
            let witness = match tokens.next() {
                Some(Token::Eq) => match tokens.next() {
                    Some(Token::SingleQuotedString(address)) => {
                        Some(address.parse::<Endpoint>().map_err(syntax)?)
                    }
                    _ => return Err(syntax("SET WITNESS = needs a quoted 'host:port'")),
                },
                Some(Token::Word(word)) if word.value.eq_ignore_ascii_case("OFF") => None,
                _ => return Err(syntax("SET WITNESS needs = '<host:port>' or OFF")),
            };
            Ok(Statement::SetWitness { session, witness })
        }
        _ => Err(syntax(
            "ALTER DATABASE supports SET PARTNER and SET WITNESS",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partner(sql: &str) -> PartnerOption {
        match parse(sql).unwrap() {
            Statement::SetPartner { session, option } => {
                assert_eq!(session, "shop");
                option
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_set_partner_form_parses() {
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER FAILOVER"),
            PartnerOption::Failover
        );
        assert_eq!(
            partner("alter database Shop set partner force_service_allow_data_loss;"),
            PartnerOption::ForceServiceAllowDataLoss
        );
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER SUSPEND"),
            PartnerOption::Suspend
        );
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER RESUME"),
            PartnerOption::Resume
        );
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER SAFETY OFF"),
            PartnerOption::Safety(Safety::Off)
        );
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER SAFETY FULL"),
            PartnerOption::Safety(Safety::Full)
        );
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER TIMEOUT 30"),
            PartnerOption::Timeout(30)
        );
        assert_eq!(
            partner("ALTER DATABASE shop SET PARTNER OFF"),
            PartnerOption::Off
        );
    }

    #[test]
    fn witness_and_show_parse() {
        assert_eq!(
            parse("ALTER DATABASE shop SET WITNESS = 'TCP://w.example:5022'").unwrap(),
            Statement::SetWitness {
                session: "shop".into(),
                witness: Some("w.example:5022".parse().unwrap()),
            }
        );
        assert_eq!(
            parse("ALTER DATABASE shop SET WITNESS OFF").unwrap(),
            Statement::SetWitness {
                session: "shop".into(),
                witness: None
            }
        );
        assert!(is_command("show Clients;") && is_command("alter database x set partner off"));
        assert!(!is_command("SHOW server_version") && !is_command("SELECT 1"));
        assert_eq!(parse("show clients").unwrap(), Statement::ShowClients);
        assert_eq!(parse("SHOW SERVERS").unwrap(), Statement::ShowServers);
        assert_eq!(parse("SHOW SESSIONS;").unwrap(), Statement::ShowSessions);
        assert_eq!(parse("show pools").unwrap(), Statement::ShowPools);
    }

    #[test]
    fn mistakes_list_what_is_supported() {
        for bad in [
            "DROP TABLE x",
            "ALTER DATABASE shop SET PARTNER",
            "ALTER DATABASE shop SET PARTNER TIMEOUT soon",
            "ALTER DATABASE shop SET PARTNER SAFETY MEDIUM",
            "ALTER DATABASE shop SET WITNESS = 'nope'",
            "SHOW LISTS",
            "'unterminated",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("supported statements"), "{bad}: {err}");
        }
    }
}
