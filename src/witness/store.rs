//! The witness's durable role table in SQLite (schema: `sql/witness.sql`).
//!
//! Every change is one transaction that updates the row only if its epoch
//! is still the one the caller read (compare-and-set) and appends to the
//! history; SQLite runs with `synchronous = FULL`, so a change that returned
//! survives a crash of the witness or its machine.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::control::RoleRow;
use crate::history::now_ms;
use crate::roles::{Epoch, Safety};
use crate::witness::arbiter::Change;

const SCHEMA: &str = include_str!("../../sql/witness.sql");

/// The role table's columns in the order [`read_row`] reads them.
/// A row's version is the id of its latest history line, which every write
/// adds (AUTOINCREMENT: never reused, so versions only grow).
const COLUMNS: &str = "session, principal, mirror, epoch, safety, safety_sequence, suspended, \
                       synchronized, timeout_secs, failover_lsn, EXISTS (SELECT 1 FROM \
                       detached_sessions AS d WHERE d.session = role_table.session), \
                       COALESCE((SELECT MAX(h.id) FROM history AS h \
                       WHERE h.session = role_table.session), 0)";

#[derive(Debug, thiserror::Error)]
#[error("role table {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    #[source]
    source: rusqlite::Error,
}

/// One line of the history table.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub at_ms: i64,
    pub event: String,
    pub principal: String,
    pub epoch: u64,
    pub synchronized: bool,
}

pub struct RoleStore {
    path: PathBuf,
    connection: Connection,
    /// This witness's identity, drawn at the first open and kept.
    identity: u64,
}

impl RoleStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let wrap = |source| StoreError {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(wrap)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(wrap)?;
        connection.execute_batch(SCHEMA).map_err(wrap)?;
        connection
            .execute(
                "INSERT INTO witness_identity (id) SELECT ?1 \
                 WHERE NOT EXISTS (SELECT 1 FROM witness_identity)",
                params![(rand::random::<u64>() >> 1) as i64],
            )
            .map_err(wrap)?;
        let identity: i64 = connection
            .query_row("SELECT id FROM witness_identity", [], |r| r.get(0))
            .map_err(wrap)?;
        Ok(RoleStore {
            path: path.to_path_buf(),
            connection,
            identity: identity as u64,
        })
    }

    /// The SQLite file, which also holds the history's samples.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `row` as this witness answers with it: naming this witness.
    fn held(&self, row: RoleRow) -> RoleRow {
        RoleRow {
            witness_id: self.identity,
            ..row
        }
    }

    fn wrap(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    pub fn get(&self, session: &str) -> Result<Option<RoleRow>, StoreError> {
        self.connection
            .query_row(
                &format!("SELECT {COLUMNS} FROM role_table WHERE session = ?1"),
                params![session],
                read_row,
            )
            .optional()
            .map(|row| row.map(|row| self.held(row)))
            .map_err(|err| self.wrap(err))
    }

    pub fn all(&self) -> Result<Vec<RoleRow>, StoreError> {
        let mut statement = self
            .connection
            .prepare(&format!(
                "SELECT {COLUMNS} FROM role_table ORDER BY session"
            ))
            .map_err(|err| self.wrap(err))?;
        let rows = statement
            .query_map([], read_row)
            .and_then(|rows| rows.map(|row| row.map(|row| self.held(row))).collect())
            .map_err(|err| self.wrap(err));
        rows
    }

    /// Reads the session's row, lets `decide` choose a change, and writes
    /// it with its history line, all in one transaction: no other change can
    /// slip between the read and the write (I1-I3). Returns the row as it
    /// stands afterwards, or `decide`'s refusal.
    pub fn update(
        &mut self,
        session: &str,
        decide: impl FnOnce(Option<&RoleRow>) -> Result<Option<Change>, String>,
    ) -> Result<Result<Option<RoleRow>, String>, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError {
            path: path.clone(),
            source,
        };
        let transaction = self
            .connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(wrap)?;
        let current = transaction
            .query_row(
                &format!("SELECT {COLUMNS} FROM role_table WHERE session = ?1"),
                params![session],
                read_row,
            )
            .optional()
            .map_err(wrap)?
            .map(|row| RoleRow {
                witness_id: self.identity,
                ..row
            });
        let change = match decide(current.as_ref()) {
            Err(reason) => return Ok(Err(reason)),
            Ok(None) => return Ok(Ok(current)),
            Ok(Some(change)) => change,
        };
        let row = &change.row;
        let at = now_ms();
        transaction
            .execute(
                "INSERT INTO role_table (session, principal, mirror, epoch, safety, safety_sequence, \
                 suspended, synchronized, timeout_secs, failover_lsn, updated_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (session) DO UPDATE SET principal = ?2, mirror = ?3, epoch = ?4, \
                 safety = ?5, safety_sequence = ?6, suspended = ?7, synchronized = ?8, \
                 timeout_secs = ?9, failover_lsn = ?10, updated_at_ms = ?11",
                params![
                    row.session,
                    row.principal,
                    row.mirror,
                    row.epoch.0,
                    match row.safety {
                        Safety::Full => "full",
                        Safety::Off => "off",
                    },
                    row.safety_sequence,
                    row.suspended,
                    row.synchronized,
                    row.timeout_secs,
                    row.failover_lsn.map(|lsn| lsn.to_string()),
                    at
                ],
            )
            .map_err(wrap)?;
        let detached = if row.detached {
            "INSERT OR IGNORE INTO detached_sessions (session) VALUES (?1)"
        } else {
            "DELETE FROM detached_sessions WHERE session = ?1"
        };
        transaction
            .execute(detached, params![row.session])
            .map_err(wrap)?;
        transaction
            .execute(
                "INSERT INTO history (session, at_ms, event, principal, epoch, synchronized) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    row.session,
                    at,
                    change.event,
                    row.principal,
                    row.epoch.0,
                    row.synchronized
                ],
            )
            .map_err(wrap)?;
        let version = transaction.last_insert_rowid() as u64;
        transaction.commit().map_err(wrap)?;
        Ok(Ok(Some(RoleRow {
            witness_id: self.identity,
            version,
            ..change.row
        })))
    }

    pub fn history(&self, session: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT at_ms, event, principal, epoch, synchronized FROM history \
                 WHERE session = ?1 ORDER BY id",
            )
            .map_err(|err| self.wrap(err))?;
        let entries = statement
            .query_map(params![session], |r| {
                Ok(HistoryEntry {
                    at_ms: r.get(0)?,
                    event: r.get(1)?,
                    principal: r.get(2)?,
                    epoch: r.get(3)?,
                    synchronized: r.get(4)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|err| self.wrap(err));
        entries
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RoleRow> {
    let safety: String = r.get(4)?;
    let failover_lsn: Option<String> = r.get(9)?;
    Ok(RoleRow {
        session: r.get(0)?,
        principal: r.get(1)?,
        mirror: r.get(2)?,
        epoch: Epoch(r.get(3)?),
        safety: if safety == "off" {
            Safety::Off
        } else {
            Safety::Full
        },
        safety_sequence: r.get(5)?,
        suspended: r.get(6)?,
        synchronized: r.get(7)?,
        timeout_secs: r.get(8)?,
        failover_lsn: failover_lsn.and_then(|lsn| lsn.parse().ok()),
        // Not a column: the store names itself in every row it answers with.
        witness_id: 0,
        detached: r.get(10)?,
        version: r.get(11)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(epoch: u64, principal: &str) -> RoleRow {
        RoleRow {
            session: "shop".into(),
            principal: principal.into(),
            mirror: Some("beta".into()),
            epoch: Epoch(epoch),
            safety: Safety::Full,
            safety_sequence: 1,
            suspended: false,
            synchronized: true,
            timeout_secs: 10,
            failover_lsn: None,
            witness_id: 0,
            detached: false,
            version: 0,
        }
    }

    fn set(
        row: RoleRow,
        event: &'static str,
    ) -> impl FnOnce(Option<&RoleRow>) -> Result<Option<Change>, String> {
        move |current| {
            if current.is_some_and(|current| current.epoch >= row.epoch) {
                return Err(format!("stale: {event}"));
            }
            Ok(Some(Change { row, event }))
        }
    }

    #[test]
    fn a_decision_is_written_with_the_row_it_read_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.sqlite");
        let mut store = RoleStore::open(&path).unwrap();
        let identity = store.identity;
        // Each write is a new version of the row (I2: `arbiter::set_synchronized`).
        let row = |epoch, principal, version| RoleRow {
            witness_id: identity,
            version,
            ..row(epoch, principal)
        };
        let created = store.update("shop", set(row(1, "alpha", 0), "Session Created"));
        assert_eq!(created.unwrap(), Ok(Some(row(1, "alpha", 1))));
        let stale = store.update("shop", set(row(1, "beta", 0), "Session Created"));
        assert!(stale.unwrap().is_err());
        let failover = store.update("shop", set(row(2, "beta", 0), "Automatic Failover"));
        assert_eq!(failover.unwrap(), Ok(Some(row(2, "beta", 2))));
        let unchanged = store.update("shop", |_| Ok(None)).unwrap();
        assert_eq!(unchanged, Ok(Some(row(2, "beta", 2))));
        drop(store);
        let store = RoleStore::open(&path).unwrap();
        // The same witness after a restart: same identity, same row.
        assert_eq!(store.get("shop").unwrap(), Some(row(2, "beta", 2)));
        let other = RoleStore::open(&dir.path().join("other.sqlite")).unwrap();
        assert_ne!(other.identity, identity);
        let events: Vec<String> = store
            .history("shop")
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(events, ["Session Created", "Automatic Failover"]);
    }
}
