//! The `auth_file`: PgBouncer's userlist.txt format, one `"user" "secret"`
//! per line (a `""` inside quotes is one `"`; lines that do not start with
//! `"` are comments). A secret is a SCRAM-SHA-256 verifier or an md5
//! verifier, as `pg_authid.rolpassword` holds them, or a plaintext
//! password, which serves only as `auth_user`'s login for the auth query.
//! Parsed once at startup; pure apart from [`Userlist::load`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::md5::Md5Verifier;
use super::scram::ScramVerifier;

/// A user's secret as the proxy holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(ScramVerifier),
    Md5(Md5Verifier),
    /// Only for `auth_user` (a verifier cannot log in with tokio-postgres).
    Plaintext(Plaintext),
}

/// A plaintext password; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Plaintext(pub String);

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plaintext(<redacted>)")
    }
}

impl Secret {
    /// Reads a secret as stored in `pg_authid.rolpassword` or a userlist.
    pub fn parse(text: &str) -> Result<Secret, &'static str> {
        if text.starts_with("SCRAM-SHA-256$") {
            text.parse().map(Secret::Scram)
        } else if text.len() == 35 && text.starts_with("md5") {
            text.parse().map(Secret::Md5)
        } else if text.is_empty() {
            Err("empty secret")
        } else {
            Ok(Secret::Plaintext(Plaintext(text.to_string())))
        }
    }
}

/// A userlist file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UserlistError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: line {line}: {problem}", file.display())]
    Line {
        file: PathBuf,
        line: usize,
        problem: String,
    },
}

/// User name -> secret, from one auth_file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Userlist {
    users: HashMap<String, Secret>,
}

impl Userlist {
    pub fn load(file: &Path) -> Result<Userlist, UserlistError> {
        let text = std::fs::read_to_string(file).map_err(|source| UserlistError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Userlist::parse(&text).map_err(|(line, problem)| UserlistError::Line {
            file: file.to_path_buf(),
            line,
            problem,
        })
    }

    /// Parses userlist text; an error names its 1-based line.
    pub fn parse(text: &str) -> Result<Userlist, (usize, String)> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim_start();
            if !line.starts_with('"') {
                continue;
            }
            let (user, rest) = quoted(line).ok_or((line_no, "unterminated user name".into()))?;
            let (secret, _) = quoted(rest.trim_start()).ok_or((
                line_no,
                format!("user \"{user}\": expected a quoted secret after the user name"),
            ))?;
            let secret = Secret::parse(&secret)
                .map_err(|problem| (line_no, format!("user \"{user}\": {problem}")))?;
            users.insert(user, secret);
        }
        Ok(Userlist { users })
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }
}

/// One `"..."` field at the head of `text` (`""` is an escaped quote) and
/// what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let mut chars = body.char_indices();
    let mut value = String::new();
    while let Some((at, c)) = chars.next() {
        if c != '"' {
            value.push(c);
            continue;
        }
        if body.get(at + 1..)?.starts_with('"') {
            value.push('"');
            chars.next();
            continue;
        }
        return Some((value, body.get(at + 1..)?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
                         WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
                         wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    #[test]
    fn reads_pgbouncer_userlists() {
        let text = format!(
            ";; comment\n\"app\" \"{SCRAM}\"\n\"old\" \"md5{}\"\n\
             \"pgmirror_auth\" \"s3cr\"\"et\" \"ignored field\"\n\n  \"we\"\"ird\" \"x\"\n",
            "0123456789abcdef0123456789abcdef"
        );
        let list = Userlist::parse(&text).unwrap();
        assert!(matches!(list.get("app"), Some(Secret::Scram(v)) if v.iterations == 4096));
        assert!(matches!(list.get("old"), Some(Secret::Md5(_))));
        assert_eq!(
            list.get("pgmirror_auth"),
            Some(&Secret::Plaintext(Plaintext("s3cr\"et".into())))
        );
        assert!(list.get("we\"ird").is_some());
        assert!(list.get("nobody").is_none());
    }

    #[test]
    fn bad_lines_name_their_line() {
        assert_eq!(Userlist::parse("\"app\n").unwrap_err().0, 1);
        let err = Userlist::parse("\n\"app\" \"SCRAM-SHA-256$x\"\n").unwrap_err();
        assert_eq!(err.0, 2);
        assert!(err.1.contains("user \"app\""), "{}", err.1);
        assert!(Userlist::parse("\"app\"\n").is_err());
        assert!(Userlist::parse("\"app\" \"\"\n").is_err());
    }
}
