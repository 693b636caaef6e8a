//! Named prepared statements in transaction mode. A client's statement
//! lives in the proxy under the client's name; on the server it is
//! prepared under a name derived from its text and parameter types
//! (`pgmirror_` and 32 hex digits of their SHA-256, with the client's
//! search_path, which decides what the text's names mean), so that clients
//! that prepare the same statement share it on each server connection and
//! different statements never share a name, whatever the clients called
//! them. A server connection remembers which of these it has. Pure.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

/// Numbers each statement a Parse makes, in the whole proxy.
static SERIALS: AtomicU64 = AtomicU64::new(1);

/// One statement a client prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub query: String,
    /// Parse's parameter type count and OIDs, as the client sent them.
    pub types: Vec<u8>,
    /// Its name on the servers.
    pub server_name: String,
    /// Tells it from another a later Parse made, even of the same name
    /// and text: undoing a Parse removes only what that Parse made.
    pub serial: u64,
}

impl Statement {
    pub fn new(query: &str, types: &[u8], search_path: &str) -> Statement {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(query.as_bytes());
        hash.update(&[0]);
        hash.update(search_path.as_bytes());
        hash.update(&[0]);
        hash.update(types);
        let digest = hash.finish();
        let hex = hex::encode(&digest.as_ref()[..16]);
        Statement {
            query: query.to_string(),
            types: types.to_vec(),
            server_name: format!("pgmirror_{hex}"),
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The unnamed statement, which is never renamed.
    pub fn unnamed(query: &str, types: &[u8]) -> Statement {
        Statement {
            query: query.to_string(),
            types: types.to_vec(),
            server_name: String::new(),
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// A client's statements, by the client's names ("" is the unnamed one,
/// kept only so that a transaction a failover ended can be told apart
/// from a ROLLBACK prepared unnamed).
pub type ClientStatements = HashMap<String, Statement>;

/// The server statements one server connection has prepared.
pub type ServerStatements = HashSet<String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_text_types_and_search_path() {
        let a = Statement::new("SELECT $1", &[0, 1, 0, 0, 0, 23], "");
        let b = Statement::new("SELECT $1", &[0, 1, 0, 0, 0, 25], "");
        let c = Statement::new("SELECT $1", &[0, 1, 0, 0, 0, 23], "");
        let d = Statement::new("SELECT $1", &[0, 1, 0, 0, 0, 23], "app");
        assert_ne!(a.server_name, b.server_name);
        assert_eq!(a.server_name, c.server_name);
        assert_ne!(a.server_name, d.server_name, "another search_path");
        assert_eq!(a.server_name.len(), "pgmirror_".len() + 32);
    }
}
