//! What one statement sent to the console asks for: a command (ALTER
//! DATABASE, SHOW CLIENTS ...), a query over the views, a setting, or a
//! statement drivers send that the console accepts and ignores (SET,
//! BEGIN, COMMIT, ROLLBACK). Anything else is refused with what is
//! supported. Pure.

use sqlparser::ast::Statement as SqlStatement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::admin::sql::{self, Prepared, SqlError, TableDef};
use crate::admin::statement::{self, Statement, SUPPORTED};
use crate::admin::{settings, view::SqlType};

/// One statement for the console.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Command(Statement),
    Query(Prepared),
    /// `SHOW <name>`, or every setting for `SHOW ALL`.
    Show(Option<String>),
    /// Accepted and ignored, answered with this command tag.
    Ignored(&'static str),
    TransactionStart,
    TransactionEnd(&'static str),
}

impl Request {
    /// The result columns it returns.
    pub fn columns(&self) -> Vec<(String, SqlType)> {
        use crate::admin::view::{CLIENTS, POOLS, SERVERS, SESSIONS};
        let of = |columns: Vec<(&str, SqlType)>| {
            columns
                .into_iter()
                .map(|(name, ty)| (name.to_string(), ty))
                .collect()
        };
        match self {
            Request::Query(prepared) => prepared.columns.clone(),
            Request::Show(Some(name)) => vec![(name.to_lowercase(), SqlType::Text)],
            Request::Show(None) => of(vec![("name", SqlType::Text), ("setting", SqlType::Text)]),
            Request::Command(Statement::ShowClients) => of(CLIENTS.def().columns),
            Request::Command(Statement::ShowServers) => of(SERVERS.def().columns),
            Request::Command(Statement::ShowSessions) => of(SESSIONS.def().columns),
            Request::Command(Statement::ShowPools) => of(POOLS.def().columns),
            _ => Vec::new(),
        }
    }
}

/// Parses what one Query message (or one Parse message, `single`) holds.
pub fn parse(text: &str, catalog: &[TableDef], single: bool) -> Result<Vec<Request>, SqlError> {
    if statement::is_command(text) {
        let command = statement::parse(text).map_err(|err| SqlError {
            code: "42601",
            message: err.to_string(),
        })?;
        return Ok(vec![Request::Command(command)]);
    }
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, text).map_err(|err| SqlError {
        code: "42601",
        message: format!("{err}; {SUPPORTED}"),
    })?;
    if single && statements.len() > 1 {
        return Err(SqlError {
            code: "42601",
            message: "cannot insert multiple commands into a prepared statement".into(),
        });
    }
    statements
        .into_iter()
        .map(|parsed| request(parsed, catalog))
        .collect()
}

fn request(parsed: SqlStatement, catalog: &[TableDef]) -> Result<Request, SqlError> {
    Ok(match parsed {
        SqlStatement::Query(query) => Request::Query(sql::prepare(*query, catalog)?),
        SqlStatement::ShowVariable { variable } => {
            let name = variable
                .iter()
                .map(|ident| ident.value.to_lowercase())
                .collect::<Vec<_>>()
                .join(" ");
            if name == "all" {
                Request::Show(None)
            } else if settings::value(&name).is_some() {
                Request::Show(Some(name))
            } else {
                return Err(SqlError {
                    code: "42704",
                    message: format!(
                        "unrecognized configuration parameter \"{name}\"; the console shows {}",
                        settings::names()
                    ),
                });
            }
        }
        SqlStatement::Set(_) => Request::Ignored("SET"),
        SqlStatement::StartTransaction { .. } => Request::TransactionStart,
        SqlStatement::Commit { .. } => Request::TransactionEnd("COMMIT"),
        SqlStatement::Rollback { .. } => Request::TransactionEnd("ROLLBACK"),
        other => {
            let text = other.to_string();
            let first = text.split_whitespace().next().unwrap_or_default();
            return Err(SqlError {
                code: "0A000",
                message: format!("{first} is not supported by the pgmirror console; {SUPPORTED}"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::view::catalog;

    #[test]
    fn each_kind_of_statement_is_recognised() {
        let one = |text: &str| parse(text, &catalog(), false).map(|mut all| all.remove(0));
        assert_eq!(
            one("SHOW SESSIONS").unwrap(),
            Request::Command(Statement::ShowSessions)
        );
        assert!(matches!(one("SELECT 1").unwrap(), Request::Query(_)));
        assert_eq!(
            one("SHOW server_version").unwrap(),
            Request::Show(Some("server_version".into()))
        );
        assert_eq!(one("show all").unwrap(), Request::Show(None));
        assert_eq!(
            one("SET application_name = 'x'").unwrap(),
            Request::Ignored("SET")
        );
        assert_eq!(one("BEGIN").unwrap(), Request::TransactionStart);
        assert_eq!(
            one("ROLLBACK").unwrap(),
            Request::TransactionEnd("ROLLBACK")
        );
        assert_eq!(one("SHOW no_such_thing").unwrap_err().code, "42704");
        let refused = one("DROP TABLE sys.database_mirroring").unwrap_err();
        assert_eq!(refused.code, "0A000");
        assert!(
            refused.message.contains("supported statements"),
            "{}",
            refused.message
        );
        assert_eq!(
            parse("SELECT 1; SELECT 2", &catalog(), false)
                .unwrap()
                .len(),
            2
        );
        assert!(parse("SELECT 1; SELECT 2", &catalog(), true).is_err());
    }
}
