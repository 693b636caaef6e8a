//! The history view's data (`sys.database_mirroring_history`, issue 12):
//! the partners' status samples, kept beside the witness's role-table
//! history for a retention, and read back a page at a time.
//!
//! A sample (one partner's role, state, epoch, safety, queues and rates)
//! is kept at most every `history_sample_secs` per (session, partner);
//! samples and role-table lines older than `history_retention_days` are
//! deleted at most once a minute. The witness keeps the samples its
//! partners' reports carry, in its role-table database; an agent whose
//! session has no witness keeps its own in [`AGENT_FILE`] in its state
//! directory. Both use this module; [`Schedule`] decides when (pure).
//!
//! The witness's critical path never waits for a sample: [`History::offer`]
//! hands it to a thread of its own through a bounded channel (dropping it
//! when the thread is behind), and that thread writes on its own SQLite
//! connection at `synchronous = NORMAL`. In WAL mode that costs no fsync
//! per sample, and a crash may lose the last samples but never a role-table
//! change, which the store commits at `synchronous = FULL` on its own
//! connection. [`read_page`] reads on a read-only connection of its own, so
//! a history request never holds the role store's lock. Nothing here is
//! async: a caller on the runtime runs [`read_page`] on a blocking thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags};
use tracing::{debug, warn};

use crate::control::messages::HISTORY_PAGE_RECORDS;
use crate::control::{HistoryPage, HistoryRecord, PeerView, StatusFigures};

const SCHEMA: &str = include_str!("../sql/samples.sql");

/// The file an agent keeps its samples in, inside its state directory.
pub const AGENT_FILE: &str = "history.sqlite";

/// The `source` of a role-table line.
pub const WITNESS_SOURCE: &str = "witness";

/// The `kind` of a sample.
pub const SAMPLE_KIND: &str = "sample";

/// How often old lines are deleted, at most.
pub const PRUNE_EVERY_MS: i64 = 60_000;

/// Longest session or partner name a sample is kept for: the names the
/// configs accept (`config::validate_name`), which bound a page's size.
pub const MAX_NAME_LEN: usize = 63;

/// Samples waiting for the writer thread; more are dropped. Pings bring at
/// most a few a second per partner, so only a stalled disk fills it.
const QUEUE: usize = 1024;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot start the history writer: {0}")]
    Thread(#[source] std::io::Error),
}

/// Milliseconds since the Unix epoch: the history's time axis.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

/// How often to sample and how long to keep lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub sample_every_ms: i64,
    pub keep_ms: i64,
}

impl Retention {
    pub fn new(sample_secs: u64, retention_days: u64) -> Retention {
        Retention {
            sample_every_ms: i64::try_from(sample_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            keep_ms: i64::try_from(retention_days)
                .unwrap_or(i64::MAX)
                .saturating_mul(DAY_MS),
        }
    }
}

/// Whether `every_ms` has passed since `last_ms`. A clock that went back
/// counts as passed, so that a step of the wall clock does not stop the
/// sampling for as long as it stepped.
fn passed(last_ms: i64, now_ms: i64, every_ms: i64) -> bool {
    now_ms < last_ms || now_ms - last_ms >= every_ms
}

/// When to keep a sample and when to prune: the writer thread's memory.
#[derive(Debug)]
pub struct Schedule {
    retention: Retention,
    /// When each (session, partner) was last sampled.
    sampled: HashMap<(String, String), i64>,
    pruned_at: Option<i64>,
}

impl Schedule {
    pub fn new(retention: Retention) -> Schedule {
        Schedule {
            retention,
            sampled: HashMap::new(),
            pruned_at: None,
        }
    }

    /// Whether a sample of `name` in `session` at `now_ms` is kept; a kept
    /// one starts the next interval.
    pub fn take(&mut self, session: &str, name: &str, now_ms: i64) -> bool {
        let every = self.retention.sample_every_ms;
        let key = (session.to_string(), name.to_string());
        let due = self
            .sampled
            .get(&key)
            .is_none_or(|&last| passed(last, now_ms, every));
        if due {
            self.sampled.insert(key, now_ms);
        }
        due
    }

    /// When a prune is due at `now_ms`: the time before which lines go.
    pub fn prune(&mut self, now_ms: i64) -> Option<i64> {
        let due = self
            .pruned_at
            .is_none_or(|last| passed(last, now_ms, PRUNE_EVERY_MS));
        if !due {
            return None;
        }
        self.pruned_at = Some(now_ms);
        Some(now_ms.saturating_sub(self.retention.keep_ms))
    }
}

/// One partner's status at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at_ms: i64,
    pub session: String,
    pub name: String,
    pub role: String,
    pub state: String,
    pub epoch: u64,
    pub safety: String,
    pub figures: StatusFigures,
}

impl Sample {
    /// A partner's report (or an agent's own view) at `at_ms`; a view of a
    /// previous version has no figures.
    pub fn of(view: &PeerView, at_ms: i64) -> Sample {
        Sample {
            at_ms,
            session: view.session.clone(),
            name: view.name.clone(),
            role: view.role.to_string(),
            state: view.state.to_string(),
            epoch: view.epoch.0,
            safety: view.safety.to_string(),
            figures: view.figures.unwrap_or_default(),
        }
    }
}

/// Whose database it is: the witness's also holds the role-table history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Witness,
    Agent,
}

/// The history of one database: created by the witness (`witness::run`)
/// or an agent's supervisor, it starts the writer thread, which ends when
/// this is dropped.
pub struct History {
    path: PathBuf,
    owner: Owner,
    samples: SyncSender<Sample>,
}

impl History {
    /// Opens (creating) the samples table in the SQLite file at `path` and
    /// starts its writer thread.
    pub fn open(path: &Path, owner: Owner, retention: Retention) -> Result<History, HistoryError> {
        let wrap = |source| HistoryError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(wrap)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .map_err(wrap)?;
        connection.execute_batch(SCHEMA).map_err(wrap)?;
        let (samples, queue) = sync_channel(QUEUE);
        let writer = Writer {
            path: path.to_path_buf(),
            connection,
            owner,
            schedule: Schedule::new(retention),
        };
        std::thread::Builder::new()
            .name("history".into())
            .spawn(move || writer.run(queue))
            .map_err(HistoryError::Thread)?;
        Ok(History {
            path: path.to_path_buf(),
            owner,
            samples,
        })
    }

    /// Hands a sample to the writer, which keeps it if it is due; never
    /// waits.
    pub fn offer(&self, sample: Sample) {
        if sample.session.len() > MAX_NAME_LEN || sample.name.len() > MAX_NAME_LEN {
            return;
        }
        match self.samples.try_send(sample) {
            Ok(()) => {}
            Err(TrySendError::Full(sample)) => {
                debug!(session = %sample.session, name = %sample.name, "history writer behind; sample dropped");
            }
            Err(TrySendError::Disconnected(_)) => debug!("history writer gone; sample dropped"),
        }
    }

    /// One page of this database's lines; see [`read_page`].
    pub fn page(
        &self,
        session: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<HistoryPage, HistoryError> {
        read_page(&self.path, self.owner, session, since_ms)
    }
}

/// The writer thread: keeps due samples and prunes old lines.
struct Writer {
    path: PathBuf,
    connection: Connection,
    owner: Owner,
    schedule: Schedule,
}

impl Writer {
    fn run(mut self, queue: Receiver<Sample>) {
        while let Ok(sample) = queue.recv() {
            if self
                .schedule
                .take(&sample.session, &sample.name, sample.at_ms)
            {
                if let Err(err) = insert(&self.connection, &sample) {
                    warn!(path = %self.path.display(), "history: cannot keep a sample: {err}");
                }
            }
            if let Some(before_ms) = self.schedule.prune(sample.at_ms) {
                if let Err(err) = prune(&self.connection, self.owner, before_ms) {
                    warn!(path = %self.path.display(), "history: cannot delete old lines: {err}");
                }
            }
        }
    }
}

fn insert(connection: &Connection, sample: &Sample) -> rusqlite::Result<()> {
    let figures = &sample.figures;
    connection.execute(
        "INSERT INTO samples (at_ms, session, name, role, state, epoch, safety, \
         send_queue_bytes, redo_queue_bytes, send_rate_bytes_per_sec, redo_rate_bytes_per_sec, \
         mirror_commit_overhead_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            sample.at_ms,
            sample.session,
            sample.name,
            sample.role,
            sample.state,
            sample.epoch,
            sample.safety,
            figures.send_queue_bytes,
            figures.redo_queue_bytes,
            figures.send_rate_bytes_per_sec,
            figures.redo_rate_bytes_per_sec,
            figures.mirror_commit_overhead_ms,
        ],
    )?;
    Ok(())
}

/// Deletes the lines from before `before_ms`. The newest role-table line of
/// each session stays whatever its age: its id is the row's version
/// (`witness::store`), which must never go back (I2).
fn prune(connection: &Connection, owner: Owner, before_ms: i64) -> rusqlite::Result<()> {
    connection.execute("DELETE FROM samples WHERE at_ms < ?1", params![before_ms])?;
    if owner == Owner::Witness {
        connection.execute(
            "DELETE FROM history WHERE at_ms < ?1 \
             AND id NOT IN (SELECT MAX(id) FROM history GROUP BY session)",
            params![before_ms],
        )?;
    }
    Ok(())
}

/// The samples as history records, with the parameters of [`read_page`].
const SAMPLE_LINES: &str = "SELECT at_ms, session, name, 'sample', role, state, safety, epoch, \
    NULL, NULL, send_queue_bytes, redo_queue_bytes, send_rate_bytes_per_sec, \
    redo_rate_bytes_per_sec, mirror_commit_overhead_ms, rowid FROM samples \
    WHERE (?1 IS NULL OR session = ?1) AND at_ms >= ?2";

/// The role-table lines as history records.
const ROLE_LINES: &str = "SELECT at_ms, session, 'witness', event, NULL, NULL, NULL, epoch, \
    principal, synchronized, NULL, NULL, NULL, NULL, NULL, id FROM history \
    WHERE (?1 IS NULL OR session = ?1) AND at_ms >= ?2";

/// The lines of `session` (all when None) at or after `since_ms`, oldest
/// first, one page ([`HISTORY_PAGE_RECORDS`]) at a time. A database not
/// yet created has no lines.
pub fn read_page(
    path: &Path,
    owner: Owner,
    session: Option<&str>,
    since_ms: Option<i64>,
) -> Result<HistoryPage, HistoryError> {
    if !path.exists() {
        return Ok(HistoryPage::default());
    }
    let wrap = |source| HistoryError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let connection =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(wrap)?;
    let lines = match owner {
        Owner::Witness => format!("{SAMPLE_LINES} UNION ALL {ROLE_LINES}"),
        Owner::Agent => SAMPLE_LINES.to_string(),
    };
    let mut statement = connection
        // Lines of one millisecond by source, each source's in the order written.
        .prepare(&format!("{lines} ORDER BY 1, 3, 16 LIMIT ?3"))
        .map_err(wrap)?;
    let records = statement
        .query_map(
            params![
                session,
                since_ms.unwrap_or(i64::MIN),
                HISTORY_PAGE_RECORDS as i64 + 1
            ],
            |r| {
                Ok(HistoryRecord {
                    at_ms: r.get(0)?,
                    session: r.get(1)?,
                    source: r.get(2)?,
                    kind: r.get(3)?,
                    role: r.get(4)?,
                    state: r.get(5)?,
                    safety: r.get(6)?,
                    epoch: r.get(7)?,
                    principal: r.get(8)?,
                    synchronized: r.get(9)?,
                    send_queue_bytes: r.get(10)?,
                    redo_queue_bytes: r.get(11)?,
                    send_rate_bytes_per_sec: r.get(12)?,
                    redo_rate_bytes_per_sec: r.get(13)?,
                    mirror_commit_overhead_ms: r.get(14)?,
                })
            },
        )
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(wrap)?;
    Ok(cut(records))
}

/// Makes a page of up to [`HISTORY_PAGE_RECORDS`] records out of one more
/// than that (oldest first), ending on a whole millisecond. Only when a
/// single millisecond holds more than a page are its further lines skipped.
fn cut(mut records: Vec<HistoryRecord>) -> HistoryPage {
    let Some(next_ms) = records.get(HISTORY_PAGE_RECORDS).map(|r| r.at_ms) else {
        return HistoryPage {
            records,
            next_ms: None,
        };
    };
    records.truncate(HISTORY_PAGE_RECORDS);
    match records.iter().position(|r| r.at_ms == next_ms) {
        Some(0) => HistoryPage {
            records,
            next_ms: Some(next_ms.saturating_add(1)),
        },
        Some(whole) => {
            records.truncate(whole);
            HistoryPage {
                records,
                next_ms: Some(next_ms),
            }
        }
        None => HistoryPage {
            records,
            next_ms: Some(next_ms),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Response, RoleRow, MAX_CONTROL_FRAME};
    use crate::roles::{Epoch, Role, Safety};
    use crate::witness::arbiter::Change;
    use crate::witness::store::RoleStore;

    const SECOND: i64 = 1000;

    fn retention() -> Retention {
        Retention::new(15, 7)
    }

    #[test]
    fn a_partner_is_sampled_at_most_once_an_interval_and_each_on_its_own() {
        let mut schedule = Schedule::new(retention());
        assert!(schedule.take("shop", "alpha", 100 * SECOND));
        assert!(!schedule.take("shop", "alpha", 101 * SECOND));
        assert!(!schedule.take("shop", "alpha", 115 * SECOND - 1));
        // Another partner, or the same name in another session, has its own.
        assert!(schedule.take("shop", "beta", 101 * SECOND));
        assert!(schedule.take("bank", "alpha", 101 * SECOND));
        assert!(schedule.take("shop", "alpha", 115 * SECOND));
        // The interval runs from the sample kept, not from the last offered.
        assert!(!schedule.take("shop", "alpha", 129 * SECOND));
        assert!(schedule.take("shop", "alpha", 130 * SECOND));
        // A wall clock stepped back does not stop the sampling.
        assert!(schedule.take("shop", "alpha", 50 * SECOND));
        assert!(!schedule.take("shop", "alpha", 51 * SECOND));
    }

    #[test]
    fn pruning_is_due_once_a_minute_and_cuts_at_the_retention() {
        let week = 7 * DAY_MS;
        let mut schedule = Schedule::new(retention());
        let start = 30 * DAY_MS;
        assert_eq!(schedule.prune(start), Some(start - week));
        assert_eq!(schedule.prune(start + 59 * SECOND), None);
        let later = start + 60 * SECOND;
        assert_eq!(schedule.prune(later), Some(later - week));
        assert_eq!(
            Retention::new(1, 2),
            Retention {
                sample_every_ms: 1000,
                keep_ms: 2 * DAY_MS
            }
        );
    }

    fn record(at_ms: i64) -> HistoryRecord {
        HistoryRecord {
            at_ms,
            ..HistoryRecord::default()
        }
    }

    fn times(page: &HistoryPage) -> Vec<i64> {
        page.records.iter().map(|r| r.at_ms).collect()
    }

    #[test]
    fn a_page_ends_on_a_whole_millisecond() {
        let short = cut((0..3).map(record).collect());
        assert_eq!((times(&short), short.next_ms), (vec![0, 1, 2], None));
        // One past a page: the lines at the page's last millisecond move
        // to the next page with the line that did not fit.
        let mut records: Vec<_> = (0..HISTORY_PAGE_RECORDS as i64 - 2).map(record).collect();
        records.extend([record(5000), record(5000), record(5000)]);
        let page = cut(records);
        assert_eq!(page.records.len(), HISTORY_PAGE_RECORDS - 2);
        assert_eq!(page.next_ms, Some(5000));
        let full: Vec<_> = (0..=HISTORY_PAGE_RECORDS as i64).map(record).collect();
        let page = cut(full);
        assert_eq!(page.records.len(), HISTORY_PAGE_RECORDS);
        assert_eq!(page.next_ms, Some(HISTORY_PAGE_RECORDS as i64));
        // More than a page in one millisecond: the rest of it is skipped
        // rather than asked for forever.
        let crowded = cut(vec![record(7); HISTORY_PAGE_RECORDS + 1]);
        assert_eq!(crowded.next_ms, Some(8));
    }

    #[test]
    fn a_page_of_the_largest_records_fits_in_a_control_frame() {
        let name = "n".repeat(MAX_NAME_LEN);
        let largest = HistoryRecord {
            at_ms: i64::MIN,
            session: name.clone(),
            source: name.clone(),
            // Longer than any event name.
            kind: "e".repeat(64),
            role: Some("PRINCIPAL".into()),
            state: Some("PENDING_FAILOVER".into()),
            safety: Some("FULL".into()),
            epoch: Some(u64::MAX),
            principal: Some(name),
            synchronized: Some(false),
            send_queue_bytes: Some(u64::MAX),
            redo_queue_bytes: Some(u64::MAX),
            send_rate_bytes_per_sec: Some(-f64::MAX),
            redo_rate_bytes_per_sec: Some(-f64::MIN_POSITIVE),
            mirror_commit_overhead_ms: Some(-f64::MAX),
        };
        let page = Response::History(HistoryPage {
            records: vec![largest; HISTORY_PAGE_RECORDS],
            next_ms: Some(i64::MIN),
        });
        let size = serde_json::to_vec(&page).unwrap().len();
        assert!(
            size < MAX_CONTROL_FRAME as usize,
            "{size} bytes of {MAX_CONTROL_FRAME}"
        );
    }

    fn sample(at_ms: i64, name: &str) -> Sample {
        Sample {
            figures: StatusFigures {
                send_queue_bytes: Some(4096),
                send_rate_bytes_per_sec: Some(1.5),
                ..StatusFigures::default()
            },
            ..Sample::of(&PeerView::sample(name, Role::Principal, 3), at_ms)
        }
    }

    fn role_change(store: &mut RoleStore, epoch: u64, principal: &str, event: &'static str) {
        let row = RoleRow {
            session: "shop".into(),
            principal: principal.into(),
            mirror: None,
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
        };
        store
            .update("shop", |_| Ok(Some(Change { row, event })))
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_witness_database_reads_back_both_kinds_and_prunes_all_but_the_row_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.sqlite");
        let mut store = RoleStore::open(&path).unwrap();
        role_change(&mut store, 1, "alpha", "Session Created");
        role_change(&mut store, 2, "beta", "Automatic Failover");
        let history = History::open(&path, Owner::Witness, retention()).unwrap();
        let writer = Connection::open(&path).unwrap();
        // One millisecond after the role changes: lines of one millisecond
        // are ordered by source, not by the order they were written in.
        let now = now_ms() + 1;
        let old = now - 8 * DAY_MS;
        insert(&writer, &sample(old, "alpha")).unwrap();
        insert(&writer, &sample(now, "alpha")).unwrap();
        let page = history.page(Some("shop"), None).unwrap();
        let kinds: Vec<_> = page.records.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["sample", "Session Created", "Automatic Failover", "sample"]
        );
        let newest = page.records.last().unwrap();
        assert_eq!(
            (newest.source.as_str(), newest.role.as_deref(), newest.epoch),
            ("alpha", Some("PRINCIPAL"), Some(3))
        );
        assert_eq!(
            (newest.send_queue_bytes, newest.send_rate_bytes_per_sec),
            (Some(4096), Some(1.5))
        );
        let failover = &page.records[2];
        assert_eq!(
            (
                failover.source.as_str(),
                failover.principal.as_deref(),
                failover.synchronized
            ),
            (WITNESS_SOURCE, Some("beta"), Some(true))
        );
        assert!(history.page(Some("bank"), None).unwrap().records.is_empty());
        assert_eq!(history.page(None, Some(now)).unwrap().records.len(), 1);

        // Everything is older than a retention of 0 ms, yet the session's
        // newest role-table line stays: it is the row's version (I2).
        let version = store.get("shop").unwrap().unwrap().version;
        prune(&writer, Owner::Witness, now + 1).unwrap();
        let page = history.page(None, None).unwrap();
        let kinds: Vec<_> = page.records.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["Automatic Failover"]);
        assert_eq!(store.get("shop").unwrap().unwrap().version, version);
    }

    #[test]
    fn offered_samples_are_written_by_the_thread_and_old_ones_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AGENT_FILE);
        assert_eq!(
            read_page(&path, Owner::Agent, None, None).unwrap(),
            HistoryPage::default()
        );
        let history = History::open(&path, Owner::Agent, retention()).unwrap();
        let writer = Connection::open(&path).unwrap();
        insert(&writer, &sample(now_ms() - 8 * DAY_MS, "alpha")).unwrap();
        // The first offer is due and so is the first prune, which removes
        // the week-old sample; the second offer is within the interval.
        history.offer(sample(now_ms(), "alpha"));
        history.offer(sample(now_ms(), "alpha"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let page = history.page(None, None).unwrap();
            if page.records.len() == 1 && page.records[0].at_ms > now_ms() - DAY_MS {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{page:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
