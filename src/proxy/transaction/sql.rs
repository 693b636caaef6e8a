//! What a statement sent at the top level does to session state, as far as a
//! transaction-mode pool must know: which parameters SET and RESET touch,
//! whether it resets everything or drops every prepared statement, and
//! whether it needs a session of its own (LISTEN, session advisory locks,
//! WITH HOLD cursors, temporary tables, SQL PREPARE) and is refused. Only
//! the statement's own words are read, with a small lexer that knows
//! PostgreSQL's quoting and comments; what a function does inside cannot
//! be seen (documented in the README). Pure, no SQL parser on the hot path.

use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind};

/// What the proxy learned from one Query (or Parse) text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Parameters set (true) or reset (false), in statement order.
    pub touched: Vec<(String, bool)>,
    /// RESET ALL or DISCARD ALL: every parameter back to its default.
    pub reset_all: bool,
    /// DISCARD ALL or DEALLOCATE ALL: every prepared statement dropped.
    pub deallocate_all: bool,
    /// What needs a session of its own, when something does.
    pub refused: Option<&'static str>,
    /// The statement's name when the text is one `DEALLOCATE name`.
    pub deallocated: Option<String>,
}

/// One token of a statement: a lower-cased word, a quoted identifier as
/// written, or a single punctuation character.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Punct(char),
    /// A string or number literal (its value is not needed).
    Literal,
}

impl Token {
    fn is(&self, word: &str) -> bool {
        matches!(self, Token::Word(w) if w == word)
    }
}

/// Splits `sql` into statements of tokens, dropping comments and literals'
/// contents.
fn statements(sql: &str) -> Vec<Vec<Token>> {
    let chars: Vec<char> = sql.chars().collect();
    let mut all = Vec::new();
    let mut current = Vec::new();
    let mut at = 0;
    let peek = |i: usize| chars.get(i).copied();
    while let Some(ch) = peek(at) {
        match ch {
            ';' => {
                if !current.is_empty() {
                    all.push(std::mem::take(&mut current));
                }
                at += 1;
            }
            '-' if peek(at + 1) == Some('-') => {
                while peek(at).is_some_and(|c| c != '\n') {
                    at += 1;
                }
            }
            '/' if peek(at + 1) == Some('*') => {
                let mut depth = 0;
                while let Some(c) = peek(at) {
                    if c == '/' && peek(at + 1) == Some('*') {
                        depth += 1;
                        at += 2;
                    } else if c == '*' && peek(at + 1) == Some('/') {
                        depth -= 1;
                        at += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        at += 1;
                    }
                }
            }
            '\'' => {
                // E'...' strings take backslash escapes.
                let escapes = matches!(current.last(), Some(Token::Word(w)) if w == "e")
                    && at > 0
                    && matches!(peek(at - 1), Some('e' | 'E'));
                if escapes {
                    current.pop();
                }
                at += 1;
                while let Some(c) = peek(at) {
                    at += 1;
                    if escapes && c == '\\' {
                        at += 1;
                    } else if c == '\'' {
                        if peek(at) == Some('\'') {
                            at += 1;
                        } else {
                            break;
                        }
                    }
                }
                current.push(Token::Literal);
            }
            '"' => {
                let mut name = String::new();
                at += 1;
                while let Some(c) = peek(at) {
                    at += 1;
                    if c == '"' {
                        if peek(at) == Some('"') {
                            name.push('"');
                            at += 1;
                        } else {
                            break;
                        }
                    } else {
                        name.push(c);
                    }
                }
                current.push(Token::Quoted(name));
            }
            '$' if dollar_tag(&chars, at).is_some() => {
                let tag = dollar_tag(&chars, at).unwrap_or_default();
                at += tag.len();
                while at < chars.len() && !chars[at..].starts_with(&tag) {
                    at += 1;
                }
                at = (at + tag.len()).min(chars.len());
                current.push(Token::Literal);
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = at;
                while peek(at).is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                    at += 1;
                }
                let word: String = chars[start..at].iter().collect();
                current.push(Token::Word(word.to_lowercase()));
            }
            c if c.is_ascii_digit() => {
                while peek(at).is_some_and(|c| c.is_alphanumeric() || c == '.') {
                    at += 1;
                }
                current.push(Token::Literal);
            }
            c if c.is_whitespace() => at += 1,
            c => {
                current.push(Token::Punct(c));
                at += 1;
            }
        }
    }
    if !current.is_empty() {
        all.push(current);
    }
    all
}

/// The `$tag$` opening a dollar-quoted string at `at`, if one does.
fn dollar_tag(chars: &[char], at: usize) -> Option<Vec<char>> {
    let rest = chars.get(at + 1..)?;
    let end = rest
        .iter()
        .position(|c| !(c.is_alphanumeric() || *c == '_'))?;
    if rest.get(end) != Some(&'$') || rest.first().is_some_and(char::is_ascii_digit) {
        return None;
    }
    chars.get(at..at + end + 2).map(<[char]>::to_vec)
}

/// Session advisory lock functions (the `_xact_` forms end with their
/// transaction and are fine).
const SESSION_LOCKS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// The words of [`mentions_session_state`].
const SESSION_WORDS: [&str; 9] = [
    "set",
    "discard",
    "deallocate",
    "declare",
    "listen",
    "prepare",
    "create",
    "temp",
    "advisory",
];

/// Whether `sql` may say anything [`inspect`] reports: every word it acts
/// on contains one of [`SESSION_WORDS`] (ASCII case aside, as PostgreSQL
/// folds only ASCII in keywords). Most statements mention none, and are
/// not lexed; this runs on every Query and Parse, so it is one pass of a
/// prebuilt automaton, a DFA: a few KiB for these words, and the fastest
/// kind to search with.
fn mentions_session_state(sql: &str) -> bool {
    static WORDS: LazyLock<AhoCorasick> = LazyLock::new(|| {
        AhoCorasick::builder()
            .kind(Some(AhoCorasickKind::DFA))
            .ascii_case_insensitive(true)
            .build(SESSION_WORDS)
            .expect("a handful of fixed words always build")
    });
    WORDS.is_match(sql)
}

/// Reads every top-level statement of `sql`.
pub fn inspect(sql: &str) -> Inspection {
    let mut found = Inspection::default();
    if !mentions_session_state(sql) {
        return found;
    }
    let all = statements(sql);
    for tokens in &all {
        statement(tokens, &mut found);
    }
    if let [tokens] = all.as_slice() {
        found.deallocated = deallocated(tokens);
    }
    found
}

/// A parameter name: words joined by dots (`custom.setting`).
fn parameter(tokens: &[Token]) -> Option<String> {
    let mut name = String::new();
    let mut parts = tokens.iter();
    loop {
        match parts.next()? {
            Token::Word(w) | Token::Quoted(w) => name.push_str(w),
            _ => return None,
        }
        match parts.next() {
            Some(Token::Punct('.')) => name.push('.'),
            _ => return Some(name),
        }
    }
}

/// Names that SET and RESET spell with special syntax.
fn special_parameter(tokens: &[Token]) -> Option<Vec<&'static str>> {
    let first = tokens.first()?;
    let second = tokens.get(1);
    let names: &[&'static str] = if first.is("time") && second.is_some_and(|t| t.is("zone")) {
        &["timezone"]
    } else if first.is("names") {
        &["client_encoding"]
    } else if first.is("schema") {
        &["search_path"]
    } else if first.is("role") {
        &["role"]
    } else if first.is("xml") {
        &["xmloption"]
    } else if first.is("session") && second.is_some_and(|t| t.is("authorization")) {
        &["session_authorization"]
    } else if first.is("session") && second.is_some_and(|t| t.is("characteristics")) {
        &[
            "default_transaction_isolation",
            "default_transaction_read_only",
            "default_transaction_deferrable",
        ]
    } else {
        return None;
    };
    Some(names.to_vec())
}

/// The parameters SET or RESET names with what follows it.
fn parameters_named(tokens: &[Token]) -> Vec<String> {
    special_parameter(tokens)
        .map(|names| names.into_iter().map(str::to_string).collect())
        .or_else(|| parameter(tokens).map(|name| vec![name]))
        .unwrap_or_default()
}

fn statement(tokens: &[Token], found: &mut Inspection) {
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => w.as_str(),
        _ => "",
    };
    if tokens
        .iter()
        .any(|t| SESSION_LOCKS.iter().any(|lock| t.is(lock)))
    {
        found.refused = Some("session advisory locks (use the pg_advisory_xact_lock forms)");
        return;
    }
    // SELECT ... INTO TEMP, and anything made in pg_temp by name.
    let temporary = tokens.windows(2).any(|pair| {
        (pair[0].is("into") && (pair[1].is("temp") || pair[1].is("temporary")))
            || (pair[0].is("pg_temp") && pair[1] == Token::Punct('.'))
    });
    if temporary {
        found.refused = Some("temporary tables");
        return;
    }
    match word(0) {
        "set" => {
            let rest = match word(1) {
                "local" | "transaction" => return,
                "session" if !matches!(word(2), "authorization" | "characteristics") => {
                    &tokens[2..]
                }
                _ => &tokens[1..],
            };
            for name in parameters_named(rest) {
                found.touched.push((name, true));
            }
        }
        "reset" => {
            let rest = &tokens[1..];
            if word(1) == "all" {
                found.reset_all = true;
                found.touched.clear();
                return;
            }
            for name in parameters_named(rest) {
                found.touched.push((name, false));
            }
        }
        "discard" if word(1) == "all" => {
            found.reset_all = true;
            found.deallocate_all = true;
            found.touched.clear();
        }
        "deallocate" if word(1) == "all" || (word(1) == "prepare" && word(2) == "all") => {
            found.deallocate_all = true;
        }
        "listen" => found.refused = Some("LISTEN"),
        "prepare" => {
            found.refused = Some(
                "SQL PREPARE (protocol-level prepared statements work: they are kept per client)",
            )
        }
        "declare" => {
            let with_hold = tokens
                .windows(2)
                .any(|pair| pair[0].is("with") && pair[1].is("hold"));
            if with_hold {
                found.refused = Some("cursors WITH HOLD");
            }
        }
        "create" => {
            // CREATE [OR REPLACE] [LOCAL | GLOBAL] TEMP[ORARY] ...
            let temporary = tokens
                .iter()
                .skip(1)
                .find(|t| !(t.is("or") || t.is("replace") || t.is("local") || t.is("global")))
                .is_some_and(|t| t.is("temp") || t.is("temporary"));
            if temporary {
                found.refused = Some("temporary tables");
            }
        }
        _ => {}
    }
}

/// SQL that makes the server itself raise the refusal, so that the client
/// sees an ordinary error wherever it is (inside a transaction block it
/// aborts the block, as any error does there).
pub fn refusal_sql(what: &str) -> String {
    let message = refusal_message(what).replace('\'', "''");
    format!(
        "DO $pgmirror$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = '{message}'; END$pgmirror$"
    )
}

/// The refusal's text.
pub fn refusal_message(what: &str) -> String {
    format!(
        "pgmirror proxy: {what} cannot be used with pool_mode = \"transaction\": each transaction \
         may run on another server connection, so session state other than SET parameters and \
         prepared statements is not kept; use a database with pool_mode = \"session\" for this client"
    )
}

/// The statement name of one statement `DEALLOCATE [PREPARE] name` (not
/// ALL), as a driver evicting a statement from its cache sends it.
fn deallocated(tokens: &[Token]) -> Option<String> {
    let rest = match tokens {
        [first, rest @ ..] if first.is("deallocate") => rest,
        _ => return None,
    };
    let rest = match rest {
        [first, rest @ ..] if first.is("prepare") => rest,
        rest => rest,
    };
    match rest {
        [Token::Word(name)] if name != "all" => Some(name.clone()),
        [Token::Quoted(name)] => Some(name.clone()),
        _ => None,
    }
}

/// Whether `sql` is just a transaction end (ROLLBACK, ABORT, COMMIT, END),
/// which the proxy may answer itself for a transaction a failover ended.
pub fn is_transaction_end(sql: &str) -> bool {
    let all = statements(sql);
    let [tokens] = all.as_slice() else {
        return false;
    };
    let first = tokens.first();
    let ends = ["rollback", "abort", "commit", "end"]
        .iter()
        .any(|word| first.is_some_and(|t| t.is(word)));
    // ROLLBACK TO SAVEPOINT and ROLLBACK PREPARED are not ends.
    ends && tokens
        .iter()
        .skip(1)
        .all(|t| t.is("work") || t.is("transaction") || t.is("and") || t.is("no") || t.is("chain"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_statements_report_nothing_and_the_words_are_found_in_any_case() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            "UPDATE t SET x = 1",
            "insert into t values ('reset')",
        ] {
            assert_eq!(inspect(sql), Inspection::default(), "{sql}");
        }
        assert!(!mentions_session_state("SELECT 1; COMMIT"));
        for sql in [
            "SeT search_path = a",
            "select pg_ADVISORY_lock(1)",
            "CREATE TEMP TABLE t ()",
            "DEALLOCATE s1",
        ] {
            assert!(mentions_session_state(sql), "{sql}");
        }
        assert_eq!(inspect("DEALLOCATE s1").deallocated.as_deref(), Some("s1"));
    }

    fn touched(sql: &str) -> Vec<(String, bool)> {
        inspect(sql).touched
    }

    #[test]
    fn set_and_reset_name_the_parameters_they_touch() {
        assert_eq!(
            touched("SET search_path TO app, public"),
            [("search_path".into(), true)]
        );
        assert_eq!(
            touched("set SESSION Application_Name = 'x'; RESET statement_timeout;"),
            [
                ("application_name".into(), true),
                ("statement_timeout".into(), false)
            ]
        );
        assert_eq!(touched("SET TIME ZONE 'UTC'"), [("timezone".into(), true)]);
        assert_eq!(
            touched("SET NAMES 'UTF8'"),
            [("client_encoding".into(), true)]
        );
        assert_eq!(touched("SET my.custom = 1"), [("my.custom".into(), true)]);
        assert_eq!(touched("SET LOCAL search_path = x"), []);
        assert_eq!(touched("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), []);
        assert_eq!(
            touched("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").len(),
            3
        );
        assert!(inspect("RESET ALL").reset_all);
        let discard = inspect("DISCARD ALL");
        assert!(discard.reset_all && discard.deallocate_all);
        assert!(inspect("DEALLOCATE ALL").deallocate_all);
        assert!(!inspect("DEALLOCATE s1").deallocate_all);
    }

    #[test]
    fn words_inside_literals_and_comments_are_not_statements() {
        assert_eq!(touched("SELECT 'a; SET x = 1'"), []);
        assert_eq!(touched("SELECT $$; LISTEN x$$, $t$;SET y=1$t$"), []);
        assert_eq!(
            touched("/* ; SET a = 1 /* nested */ ; */ SELECT 1 -- ; SET b = 2"),
            []
        );
        assert_eq!(touched("SELECT E'\\'; SET c = 1'"), []);
        assert_eq!(touched("SELECT \"; SET d = 1\""), []);
        assert_eq!(inspect("SELECT 'pg_advisory_lock(1)'").refused, None);
        assert_eq!(inspect("SELECT 1; SET e = 2").touched, [("e".into(), true)]);
    }

    #[test]
    fn session_features_are_refused() {
        for sql in [
            "LISTEN orders",
            "select pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1, 2)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (n int)",
            "create global temporary table t (n int)",
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            "SELECT 1 AS n INTO TEMP scratch",
            "SELECT 1 AS n INTO TEMPORARY TABLE scratch",
            "CREATE TABLE pg_temp.scratch (n int)",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(inspect(sql).refused.is_some(), "{sql} not refused");
        }
        for sql in [
            "SELECT pg_advisory_xact_lock(1)",
            "DECLARE c CURSOR FOR SELECT 1",
            "CREATE TABLE temp (n int)",
            "SELECT 1 AS n INTO scratch",
            "SELECT * FROM pg_temp_1",
            "UNLISTEN *",
            "NOTIFY orders",
        ] {
            assert_eq!(inspect(sql).refused, None, "{sql} refused");
        }
        assert!(refusal_sql("LISTEN").contains("pool_mode = \"transaction\""));
    }

    #[test]
    fn a_lone_deallocate_names_its_statement() {
        assert_eq!(
            inspect("DEALLOCATE _pg3_1").deallocated,
            Some("_pg3_1".into())
        );
        assert_eq!(
            inspect("deallocate prepare \"S_1\";").deallocated,
            Some("S_1".into())
        );
        assert_eq!(inspect("DEALLOCATE ALL").deallocated, None);
        assert_eq!(inspect("DEALLOCATE a; SELECT 1").deallocated, None);
        assert_eq!(inspect("SELECT 1").deallocated, None);
    }

    #[test]
    fn transaction_ends_are_recognised() {
        for sql in [
            "ROLLBACK",
            "rollback;",
            "ABORT WORK",
            "COMMIT",
            "END TRANSACTION",
        ] {
            assert!(is_transaction_end(sql), "{sql}");
        }
        for sql in [
            "ROLLBACK TO SAVEPOINT a",
            "SELECT 1",
            "ROLLBACK; SELECT 1",
            "",
        ] {
            assert!(!is_transaction_end(sql), "{sql}");
        }
    }
}
