//! The admin console's row sets: `sys.database_mirroring` (spec 2 columns,
//! plus the monitoring figures of spec 63 and each partner's addresses), and
//! the `SHOW CLIENTS`, `SHOW SERVERS`, `SHOW SESSIONS` listings, built as
//! plain typed tables from the proxy's routes and client registry. Pure, no
//! IO: the pgwire server encodes them.

use std::time::SystemTime;

use crate::control::MirroringStatus;
use crate::proxy::clients::ClientEntry;
use crate::proxy::routing::{Discovery, Route};

/// A column's PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Int4,
    Int8,
    Float8,
    Text,
    Bool,
}

/// One value.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int4(i32),
    Int8(i64),
    Float8(f64),
    Text(String),
    Bool(bool),
}

impl From<Option<i32>> for Cell {
    fn from(value: Option<i32>) -> Self {
        value.map_or(Cell::Null, Cell::Int4)
    }
}

impl From<Option<u64>> for Cell {
    fn from(value: Option<u64>) -> Self {
        value.map_or(Cell::Null, |v| {
            Cell::Int8(i64::try_from(v).unwrap_or(i64::MAX))
        })
    }
}

impl From<Option<f64>> for Cell {
    fn from(value: Option<f64>) -> Self {
        value.map_or(Cell::Null, Cell::Float8)
    }
}

impl From<Option<String>> for Cell {
    fn from(value: Option<String>) -> Self {
        value.map_or(Cell::Null, Cell::Text)
    }
}

/// A result table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSet {
    pub columns: Vec<(&'static str, ColumnType)>,
    pub rows: Vec<Vec<Cell>>,
}

use ColumnType::{Bool, Float8, Int4, Int8, Text};

/// The columns of `sys.database_mirroring`, in order.
pub const MIRRORING_COLUMNS: &[(&str, ColumnType)] = &[
    ("database_name", Text),
    ("server_name", Text),
    ("endpoint", Text),
    ("postgres_address", Text),
    ("mirroring_guid", Text),
    ("mirroring_state", Int4),
    ("mirroring_state_desc", Text),
    ("mirroring_role", Int4),
    ("mirroring_role_desc", Text),
    ("mirroring_role_sequence", Int8),
    ("mirroring_safety_level", Int4),
    ("mirroring_safety_level_desc", Text),
    ("mirroring_safety_sequence", Int8),
    ("mirroring_partner_name", Text),
    ("mirroring_partner_instance", Text),
    ("mirroring_witness_name", Text),
    ("mirroring_witness_state", Int4),
    ("mirroring_witness_state_desc", Text),
    ("mirroring_failover_lsn", Text),
    ("mirroring_connection_timeout", Int8),
    ("mirroring_redo_queue", Int8),
    ("mirroring_redo_queue_type", Text),
    ("mirroring_end_of_log_lsn", Text),
    ("mirroring_replication_lsn", Text),
    ("send_queue_bytes", Int8),
    ("redo_queue_bytes", Int8),
    ("send_rate_bytes_per_sec", Float8),
    ("redo_rate_bytes_per_sec", Float8),
    ("mirror_commit_overhead_ms", Float8),
    ("link_bytes_raw", Int8),
    ("link_bytes_compressed", Int8),
    ("peer_connected", Bool),
    ("last_error", Text),
];

fn mirroring_row(endpoint: String, status: &MirroringStatus) -> Vec<Cell> {
    let s = status.clone();
    let lsn = |lsn: Option<crate::wire::lsn::Lsn>| Cell::from(lsn.map(|l| l.to_string()));
    vec![
        Cell::Text(s.database_name),
        Cell::Text(s.server_name),
        Cell::Text(endpoint),
        Cell::Text(s.postgres_address),
        s.mirroring_guid.into(),
        s.mirroring_state.into(),
        s.mirroring_state_desc.into(),
        s.mirroring_role.into(),
        s.mirroring_role_desc.into(),
        s.mirroring_role_sequence.into(),
        s.mirroring_safety_level.into(),
        s.mirroring_safety_level_desc.into(),
        s.mirroring_safety_sequence.into(),
        s.mirroring_partner_name.into(),
        s.mirroring_partner_instance.into(),
        s.mirroring_witness_name.into(),
        s.mirroring_witness_state.into(),
        s.mirroring_witness_state_desc.into(),
        lsn(s.mirroring_failover_lsn),
        s.mirroring_connection_timeout.into(),
        s.mirroring_redo_queue.into(),
        s.mirroring_redo_queue_type.into(),
        lsn(s.mirroring_end_of_log_lsn),
        lsn(s.mirroring_replication_lsn),
        s.send_queue_bytes.into(),
        s.redo_queue_bytes.into(),
        s.send_rate_bytes_per_sec.into(),
        s.redo_rate_bytes_per_sec.into(),
        s.mirror_commit_overhead_ms.into(),
        Some(s.link_bytes_raw).into(),
        Some(s.link_bytes_compressed).into(),
        Cell::Bool(s.peer_connected),
        s.last_error.into(),
    ]
}

/// One row per partner per session; unreachable partners get a row with
/// their endpoint and the error, the mirroring columns NULL.
pub fn database_mirroring(sessions: &[(String, Route)], only: Option<&str>) -> RowSet {
    let mut rows = Vec::new();
    for (session, route) in sessions {
        if only.is_some_and(|name| name != session) {
            continue;
        }
        for partner in &route.partners {
            let endpoint = partner.endpoint.to_string();
            match &partner.status {
                Some(status) => rows.push(mirroring_row(endpoint, status)),
                None => {
                    let placeholder = MirroringStatus {
                        database_name: session.clone(),
                        server_name: endpoint.clone(),
                        last_error: partner.error.clone(),
                        ..Default::default()
                    };
                    let mut row = mirroring_row(endpoint, &placeholder);
                    // Unknown, not zero.
                    for (cell, (name, _)) in row.iter_mut().zip(MIRRORING_COLUMNS) {
                        if name.starts_with("link_bytes") || *name == "peer_connected" {
                            *cell = Cell::Null;
                        }
                    }
                    rows.push(row);
                }
            }
        }
    }
    RowSet {
        columns: MIRRORING_COLUMNS.to_vec(),
        rows,
    }
}

fn seconds_since(time: SystemTime) -> Cell {
    let secs = SystemTime::now()
        .duration_since(time)
        .map(|age| age.as_secs())
        .unwrap_or_default();
    Some(secs).into()
}

/// `SHOW CLIENTS`: one row per client connection.
pub fn show_clients(clients: &[(u32, ClientEntry)]) -> RowSet {
    RowSet {
        columns: vec![
            ("pid", Int8),
            ("user", Text),
            ("database", Text),
            ("session", Text),
            ("client_addr", Text),
            ("tls", Bool),
            ("connected_secs", Int8),
            ("server_addr", Text),
        ],
        rows: clients
            .iter()
            .map(|(pid, entry)| {
                vec![
                    Cell::Int8(i64::from(*pid)),
                    Cell::Text(entry.user.clone()),
                    Cell::Text(entry.database.clone()),
                    Cell::Text(entry.session.clone()),
                    Cell::Text(entry.client_addr.to_string()),
                    Cell::Bool(entry.tls),
                    seconds_since(entry.connected_at),
                    entry.server_addr.clone().into(),
                ]
            })
            .collect(),
    }
}

/// `SHOW SERVERS`: one row per server connection (clients are spliced one
/// to one, so this is the server side of the connected clients).
pub fn show_servers(clients: &[(u32, ClientEntry)]) -> RowSet {
    RowSet {
        columns: vec![
            ("server_addr", Text),
            ("server_pid", Int8),
            ("session", Text),
            ("user", Text),
            ("database", Text),
            ("client_pid", Int8),
            ("connected_secs", Int8),
        ],
        rows: clients
            .iter()
            .filter_map(|(pid, entry)| {
                let address = entry.server_addr.clone()?;
                Some(vec![
                    Cell::Text(address),
                    entry
                        .server_key
                        .map_or(Cell::Null, |(pid, _)| Cell::Int8(i64::from(pid))),
                    Cell::Text(entry.session.clone()),
                    Cell::Text(entry.user.clone()),
                    Cell::Text(entry.database.clone()),
                    Cell::Int8(i64::from(*pid)),
                    seconds_since(entry.connected_at),
                ])
            })
            .collect(),
    }
}

/// `SHOW SESSIONS`: one row per configured session.
pub fn show_sessions(
    sessions: &[(String, Route)],
    databases: impl Fn(&str) -> Vec<String>,
    clients: &[(u32, ClientEntry)],
) -> RowSet {
    RowSet {
        columns: vec![
            ("session", Text),
            ("epoch", Int8),
            ("principal", Text),
            ("principal_address", Text),
            ("discovered_by", Text),
            ("partners", Text),
            ("databases", Text),
            ("clients", Int8),
        ],
        rows: sessions
            .iter()
            .map(|(session, route)| {
                let principal = route.principal.as_ref();
                let partners: Vec<String> = route
                    .partners
                    .iter()
                    .map(|p| p.endpoint.to_string())
                    .collect();
                let count = clients
                    .iter()
                    .filter(|(_, c)| &c.session == session)
                    .count();
                vec![
                    Cell::Text(session.clone()),
                    Some(route.epoch.0).into(),
                    principal.map(|p| p.server_name.clone()).into(),
                    principal.map(|p| p.address.clone()).into(),
                    principal
                        .map(|p| match p.discovery {
                            Discovery::Agent => "agent".to_string(),
                            Discovery::Probe => "read-write probe".to_string(),
                        })
                        .into(),
                    Cell::Text(partners.join(", ")),
                    Cell::Text(databases(session).join(", ")),
                    Some(count as u64).into(),
                ]
            })
            .collect(),
    }
}
