//! The admin console's views, each defined once: a column's name, type,
//! description and value are one entry of its view's column list, which the
//! row builder, the SQL engine's table and the column documentation all
//! read, so adding a column is one edit. Views: `sys.database_mirroring`
//! (spec 2 columns, the monitoring figures of spec 63 and each partner's
//! addresses), `sys.database_mirroring_witnesses` (spec 3),
//! `sys.database_mirroring_endpoints`, `sys.database_mirroring_history`,
//! and `pgmirror.clients`, `pgmirror.servers`, `pgmirror.sessions`,
//! `pgmirror.pools` (the `SHOW` listings as tables). Pure, no IO.

use std::time::SystemTime;

use crate::admin::functions::system_time_text;
use crate::admin::sql::TableDef;
use crate::config::Endpoint;
use crate::control::{HistoryRecord, MirroringStatus, RoleRow};
use crate::proxy::clients::ClientEntry;
use crate::proxy::pool::PoolRow;
use crate::proxy::routing::{Discovery, PartnerView, Route};

/// A column's PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    Bool,
    Int4,
    Int8,
    Float8,
    Text,
    Timestamptz,
}

impl SqlType {
    /// The declared type of the column in the SQL engine's table; SQLite
    /// gives it back for columns selected as they are.
    pub fn declared(self) -> &'static str {
        match self {
            SqlType::Bool => "bool",
            SqlType::Int4 => "int4",
            SqlType::Int8 => "int8",
            SqlType::Float8 => "float8",
            SqlType::Text => "text",
            SqlType::Timestamptz => "timestamptz",
        }
    }

    /// The type of a declared column type.
    pub fn from_declared(declared: &str) -> Option<SqlType> {
        [
            SqlType::Bool,
            SqlType::Int4,
            SqlType::Int8,
            SqlType::Float8,
            SqlType::Text,
            SqlType::Timestamptz,
        ]
        .into_iter()
        .find(|ty| ty.declared().eq_ignore_ascii_case(declared))
    }
}

/// One value. Timestamps are held in the SQL engine's text form
/// (`admin::functions::timestamp_text`).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int4(i32),
    Int8(i64),
    Float8(f64),
    Text(String),
    Timestamptz(String),
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

impl From<Option<bool>> for Cell {
    fn from(value: Option<bool>) -> Self {
        value.map_or(Cell::Null, Cell::Bool)
    }
}

fn text(value: &str) -> Cell {
    Cell::Text(value.to_string())
}

fn time_ms(at_ms: i64) -> Cell {
    chrono::DateTime::from_timestamp_millis(at_ms).map_or(Cell::Null, |time| {
        Cell::Timestamptz(crate::admin::functions::timestamp_text(time))
    })
}

impl Cell {
    /// The value as a number, for metrics: NULL and text have none.
    pub fn number(&self) -> Option<f64> {
        match self {
            Cell::Bool(value) => Some(f64::from(u8::from(*value))),
            Cell::Int4(value) => Some(f64::from(*value)),
            Cell::Int8(value) => Some(*value as f64),
            Cell::Float8(value) => Some(*value),
            Cell::Null | Cell::Text(_) | Cell::Timestamptz(_) => None,
        }
    }
}

/// One column of a view: everything about it in one place.
pub struct Column<R> {
    pub name: &'static str,
    pub ty: SqlType,
    pub doc: &'static str,
    pub value: fn(&R) -> Cell,
}

/// A view: where it lives, what it is, its columns.
pub struct View<R: 'static> {
    pub schema: &'static str,
    pub name: &'static str,
    pub doc: &'static str,
    pub columns: &'static [Column<R>],
}

/// A table of typed rows: a view's content, or a query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSet {
    pub columns: Vec<(String, SqlType)>,
    pub rows: Vec<Vec<Cell>>,
}

impl<R> View<R> {
    /// The view's rows for `items`.
    pub fn rows(&self, items: &[R]) -> RowSet {
        RowSet {
            columns: self
                .columns
                .iter()
                .map(|column| (column.name.to_string(), column.ty))
                .collect(),
            rows: items
                .iter()
                .map(|item| {
                    self.columns
                        .iter()
                        .map(|column| (column.value)(item))
                        .collect()
                })
                .collect(),
        }
    }

    /// The view as the SQL engine knows it.
    pub fn def(&self) -> TableDef {
        TableDef {
            schema: self.schema,
            name: self.name,
            columns: self.columns.iter().map(|c| (c.name, c.ty)).collect(),
        }
    }
}

/// Every view, as the SQL engine knows them.
pub fn catalog() -> Vec<TableDef> {
    vec![
        DATABASE_MIRRORING.def(),
        DATABASE_MIRRORING_WITNESSES.def(),
        DATABASE_MIRRORING_ENDPOINTS.def(),
        DATABASE_MIRRORING_HISTORY.def(),
        CLIENTS.def(),
        SERVERS.def(),
        SESSIONS.def(),
        POOLS.def(),
    ]
}

/// A partner as the console sees it: its endpoint and last status (None
/// while unreachable).
pub struct PartnerRow {
    pub endpoint: Endpoint,
    pub status: MirroringStatus,
    pub reachable: bool,
}

impl PartnerRow {
    /// Rows for every partner of the given sessions' routes.
    pub fn of_routes(sessions: &[(String, Route)]) -> Vec<PartnerRow> {
        sessions
            .iter()
            .flat_map(|(session, route)| {
                route
                    .partners
                    .iter()
                    .map(move |partner| PartnerRow::of(session, partner))
            })
            .collect()
    }

    fn of(session: &str, partner: &PartnerView) -> PartnerRow {
        match &partner.status {
            Some(status) => PartnerRow {
                endpoint: partner.endpoint.clone(),
                status: status.clone(),
                reachable: true,
            },
            None => PartnerRow {
                endpoint: partner.endpoint.clone(),
                status: MirroringStatus {
                    database_name: session.to_string(),
                    server_name: partner.endpoint.to_string(),
                    last_error: partner.error.clone(),
                    ..Default::default()
                },
                reachable: false,
            },
        }
    }

    /// The row of a partner reporting `status` itself.
    pub fn reporting(status: MirroringStatus) -> PartnerRow {
        PartnerRow {
            endpoint: Endpoint {
                host: String::new(),
                port: 0,
            },
            status,
            reachable: true,
        }
    }

    /// A figure known only from a reachable partner (unknown, not zero).
    fn known<T>(&self, value: T) -> Option<T> {
        self.reachable.then_some(value)
    }
}

fn lsn(value: Option<crate::wire::lsn::Lsn>) -> Cell {
    value.map(|lsn| lsn.to_string()).into()
}

use SqlType::{Bool, Float8, Int4, Int8, Text, Timestamptz};

/// `sys.database_mirroring`: one row per partner per session.
pub static DATABASE_MIRRORING: View<PartnerRow> = View {
    schema: "sys",
    name: "database_mirroring",
    doc: "one row per partner of each mirroring session (spec 2)",
    columns: &[
        Column { name: "database_name", ty: Text, doc: "the mirroring session", value: |r| text(&r.status.database_name) },
        Column { name: "server_name", ty: Text, doc: "the partner's name", value: |r| text(&r.status.server_name) },
        Column { name: "endpoint", ty: Text, doc: "the partner agent's endpoint", value: |r| Cell::Text(r.endpoint.to_string()) },
        Column { name: "postgres_address", ty: Text, doc: "the partner's PostgreSQL", value: |r| text(&r.status.postgres_address) },
        Column { name: "mirroring_guid", ty: Text, doc: "the database's system identifier", value: |r| r.status.mirroring_guid.clone().into() },
        Column { name: "mirroring_state", ty: Int4, doc: "0 suspended, 1 disconnected, 2 synchronizing, 3 pending failover, 4 synchronized, 5 unsynchronized; NULL when mirroring is off", value: |r| r.status.mirroring_state.into() },
        Column { name: "mirroring_state_desc", ty: Text, doc: "the state's name", value: |r| r.status.mirroring_state_desc.clone().into() },
        Column { name: "mirroring_role", ty: Int4, doc: "1 principal, 2 mirror", value: |r| r.status.mirroring_role.into() },
        Column { name: "mirroring_role_desc", ty: Text, doc: "PRINCIPAL or MIRROR", value: |r| r.status.mirroring_role_desc.clone().into() },
        Column { name: "mirroring_role_sequence", ty: Int8, doc: "the epoch: grows with every role change", value: |r| r.status.mirroring_role_sequence.into() },
        Column { name: "mirroring_safety_level", ty: Int4, doc: "1 off (asynchronous), 2 full (synchronous)", value: |r| r.status.mirroring_safety_level.into() },
        Column { name: "mirroring_safety_level_desc", ty: Text, doc: "OFF or FULL", value: |r| r.status.mirroring_safety_level_desc.clone().into() },
        Column { name: "mirroring_safety_sequence", ty: Int8, doc: "grows with every safety change", value: |r| r.status.mirroring_safety_sequence.into() },
        Column { name: "mirroring_partner_name", ty: Text, doc: "the other partner's name", value: |r| r.status.mirroring_partner_name.clone().into() },
        Column { name: "mirroring_partner_instance", ty: Text, doc: "the other partner's endpoint", value: |r| r.status.mirroring_partner_instance.clone().into() },
        Column { name: "mirroring_witness_name", ty: Text, doc: "the witness's endpoint", value: |r| r.status.mirroring_witness_name.clone().into() },
        Column { name: "mirroring_witness_state", ty: Int4, doc: "0 unknown, 1 connected, 2 disconnected", value: |r| r.status.mirroring_witness_state.into() },
        Column { name: "mirroring_witness_state_desc", ty: Text, doc: "the witness state's name", value: |r| r.status.mirroring_witness_state_desc.clone().into() },
        Column { name: "mirroring_failover_lsn", ty: Text, doc: "the WAL position a failover must reach", value: |r| lsn(r.status.mirroring_failover_lsn) },
        Column { name: "mirroring_connection_timeout", ty: Int8, doc: "seconds without an answer before a partner counts as gone", value: |r| r.status.mirroring_connection_timeout.into() },
        Column { name: "mirroring_redo_queue", ty: Int8, doc: "the redo queue limit (NULL: unlimited)", value: |r| r.status.mirroring_redo_queue.into() },
        Column { name: "mirroring_redo_queue_type", ty: Text, doc: "UNLIMITED", value: |r| r.status.mirroring_redo_queue_type.clone().into() },
        Column { name: "mirroring_end_of_log_lsn", ty: Text, doc: "the end of WAL flushed on this partner", value: |r| lsn(r.status.mirroring_end_of_log_lsn) },
        Column { name: "mirroring_replication_lsn", ty: Text, doc: "the WAL position the mirror has flushed", value: |r| lsn(r.status.mirroring_replication_lsn) },
        Column { name: "send_queue_bytes", ty: Int8, doc: "WAL on the principal not yet sent", value: |r| r.status.send_queue_bytes.into() },
        Column { name: "redo_queue_bytes", ty: Int8, doc: "WAL on the mirror not yet replayed", value: |r| r.status.redo_queue_bytes.into() },
        Column { name: "send_rate_bytes_per_sec", ty: Float8, doc: "WAL sent per second", value: |r| r.status.send_rate_bytes_per_sec.into() },
        Column { name: "redo_rate_bytes_per_sec", ty: Float8, doc: "WAL replayed per second", value: |r| r.status.redo_rate_bytes_per_sec.into() },
        Column { name: "mirror_commit_overhead_ms", ty: Float8, doc: "time commits wait for the mirror", value: |r| r.status.mirror_commit_overhead_ms.into() },
        Column { name: "link_bytes_raw", ty: Int8, doc: "WAL bytes carried by the link", value: |r| r.known(r.status.link_bytes_raw).into() },
        Column { name: "link_bytes_compressed", ty: Int8, doc: "bytes the link sent after compression", value: |r| r.known(r.status.link_bytes_compressed).into() },
        Column { name: "peer_connected", ty: Bool, doc: "whether the partners reach each other", value: |r| r.known(r.status.peer_connected).into() },
        Column { name: "last_error", ty: Text, doc: "the last error, or why the partner is unreachable", value: |r| r.status.last_error.clone().into() },
    ],
};

/// `sys.database_mirroring_endpoints`: each partner agent's endpoint.
pub static DATABASE_MIRRORING_ENDPOINTS: View<PartnerRow> = View {
    schema: "sys",
    name: "database_mirroring_endpoints",
    doc: "each partner agent's endpoint, its TLS identity and state",
    columns: &[
        Column {
            name: "database_name",
            ty: Text,
            doc: "the mirroring session",
            value: |r| text(&r.status.database_name),
        },
        Column {
            name: "name",
            ty: Text,
            doc: "the partner's name",
            value: |r| text(&r.status.server_name),
        },
        Column {
            name: "endpoint",
            ty: Text,
            doc: "host:port of the agent's endpoint",
            value: |r| Cell::Text(r.endpoint.to_string()),
        },
        Column {
            name: "state_desc",
            ty: Text,
            doc: "STARTED when the agent answers, else UNREACHABLE",
            value: |r| {
                text(if r.reachable {
                    "STARTED"
                } else {
                    "UNREACHABLE"
                })
            },
        },
        Column {
            name: "role_desc",
            ty: Text,
            doc: "PARTNER: every agent endpoint serves a partner",
            value: |_| text("PARTNER"),
        },
        Column {
            name: "is_encryption_enabled",
            ty: Bool,
            doc: "always true: the endpoint speaks TLS only",
            value: |_| Cell::Bool(true),
        },
        Column {
            name: "connection_auth_desc",
            ty: Text,
            doc: "CERTIFICATE: mutual TLS against the session's CA",
            value: |_| text("CERTIFICATE"),
        },
        Column {
            name: "tls_identity",
            ty: Text,
            doc: "the name the agent's certificate must carry",
            value: |r| Cell::Text(r.endpoint.host.clone()),
        },
        Column {
            name: "postgres_address",
            ty: Text,
            doc: "the partner's PostgreSQL",
            value: |r| text(&r.status.postgres_address),
        },
        Column {
            name: "last_error",
            ty: Text,
            doc: "why the endpoint is unreachable",
            value: |r| r.status.last_error.clone().into(),
        },
    ],
};

/// A witness's row for a session, as the console fetched it.
pub struct WitnessRow {
    pub witness: String,
    pub row: RoleRow,
}

/// `sys.database_mirroring_witnesses`: the witness's view of each session.
pub static DATABASE_MIRRORING_WITNESSES: View<WitnessRow> = View {
    schema: "sys",
    name: "database_mirroring_witnesses",
    doc: "each witness's role-table row for each session it serves (spec 3)",
    columns: &[
        Column {
            name: "database_name",
            ty: Text,
            doc: "the mirroring session",
            value: |r| text(&r.row.session),
        },
        Column {
            name: "witness_name",
            ty: Text,
            doc: "the witness's endpoint",
            value: |r| text(&r.witness),
        },
        Column {
            name: "principal_server_name",
            ty: Text,
            doc: "the principal the witness records",
            value: |r| text(&r.row.principal),
        },
        Column {
            name: "mirror_server_name",
            ty: Text,
            doc: "the mirror the witness records",
            value: |r| r.row.mirror.clone().into(),
        },
        Column {
            name: "safety_level",
            ty: Int4,
            doc: "1 off, 2 full",
            value: |r| Cell::Int4(r.row.safety.code()),
        },
        Column {
            name: "safety_level_desc",
            ty: Text,
            doc: "OFF or FULL",
            value: |r| text(r.row.safety.desc()),
        },
        Column {
            name: "safety_sequence_number",
            ty: Int8,
            doc: "grows with every safety change",
            value: |r| Some(r.row.safety_sequence).into(),
        },
        Column {
            name: "role_sequence_number",
            ty: Int8,
            doc: "the epoch",
            value: |r| Some(r.row.epoch.0).into(),
        },
        Column {
            name: "is_suspended",
            ty: Bool,
            doc: "whether mirroring is paused",
            value: |r| Cell::Bool(r.row.suspended),
        },
        Column {
            name: "partner_sync_state",
            ty: Int4,
            doc: "4 synchronized, 5 not synchronized",
            value: |r| Cell::Int4(if r.row.synchronized { 4 } else { 5 }),
        },
        Column {
            name: "partner_sync_state_desc",
            ty: Text,
            doc: "SYNCHRONIZED: automatic failover allowed",
            value: |r| {
                text(if r.row.synchronized {
                    "SYNCHRONIZED"
                } else {
                    "UNSYNCHRONIZED"
                })
            },
        },
        Column {
            name: "failover_lsn",
            ty: Text,
            doc: "the WAL position a failover must reach",
            value: |r| lsn(r.row.failover_lsn),
        },
        Column {
            name: "is_detached",
            ty: Bool,
            doc: "the principal moved the session to another witness",
            value: |r| Cell::Bool(r.row.detached),
        },
    ],
};

/// `sys.database_mirroring_history`: role-table changes and status samples.
pub static DATABASE_MIRRORING_HISTORY: View<HistoryRecord> = View {
    schema: "sys",
    name: "database_mirroring_history",
    doc: "the witness's role-table changes and the partners' status samples, kept for the configured retention",
    columns: &[
        Column { name: "time", ty: Timestamptz, doc: "when it was recorded", value: |r| time_ms(r.at_ms) },
        Column { name: "database_name", ty: Text, doc: "the mirroring session", value: |r| text(&r.session) },
        Column { name: "source", ty: Text, doc: "the partner sampled, or witness for a role-table change", value: |r| text(&r.source) },
        Column { name: "kind", ty: Text, doc: "sample, or the role-table event", value: |r| text(&r.kind) },
        Column { name: "role", ty: Text, doc: "the partner's role", value: |r| r.role.clone().into() },
        Column { name: "state", ty: Text, doc: "the partner's mirroring state", value: |r| r.state.clone().into() },
        Column { name: "safety", ty: Text, doc: "the session's safety level (FULL or OFF)", value: |r| r.safety.clone().into() },
        Column { name: "role_sequence", ty: Int8, doc: "the epoch", value: |r| r.epoch.into() },
        Column { name: "principal", ty: Text, doc: "the principal the role table names", value: |r| r.principal.clone().into() },
        Column { name: "synchronized", ty: Bool, doc: "the role table's partner_sync_state", value: |r| r.synchronized.into() },
        Column { name: "send_queue_bytes", ty: Int8, doc: "WAL not yet sent", value: |r| r.send_queue_bytes.into() },
        Column { name: "redo_queue_bytes", ty: Int8, doc: "WAL not yet replayed", value: |r| r.redo_queue_bytes.into() },
        Column { name: "send_rate_bytes_per_sec", ty: Float8, doc: "WAL sent per second", value: |r| r.send_rate_bytes_per_sec.into() },
        Column { name: "redo_rate_bytes_per_sec", ty: Float8, doc: "WAL replayed per second", value: |r| r.redo_rate_bytes_per_sec.into() },
        Column { name: "mirror_commit_overhead_ms", ty: Float8, doc: "time commits waited for the mirror", value: |r| r.mirror_commit_overhead_ms.into() },
    ],
};

/// A client connection: the proxy's pid for it and its entry.
pub type ClientRow = (u32, ClientEntry);

fn connected_at(entry: &ClientEntry) -> Cell {
    Cell::Timestamptz(system_time_text(entry.connected_at))
}

fn seconds_since(time: SystemTime) -> Cell {
    let secs = SystemTime::now()
        .duration_since(time)
        .map(|age| age.as_secs())
        .unwrap_or_default();
    Some(secs).into()
}

/// `pgmirror.clients` and `SHOW CLIENTS`: one row per client connection.
pub static CLIENTS: View<ClientRow> = View {
    schema: "pgmirror",
    name: "clients",
    doc: "one row per client connection of the proxy",
    columns: &[
        Column {
            name: "pid",
            ty: Int8,
            doc: "the proxy's process id for the client (its cancel key)",
            value: |(pid, _)| Cell::Int8(i64::from(*pid)),
        },
        Column {
            name: "user",
            ty: Text,
            doc: "the user it logged in as",
            value: |(_, c)| text(&c.user),
        },
        Column {
            name: "database",
            ty: Text,
            doc: "the database it asked for",
            value: |(_, c)| text(&c.database),
        },
        Column {
            name: "session",
            ty: Text,
            doc: "the mirroring session routed to",
            value: |(_, c)| text(&c.session),
        },
        Column {
            name: "client_addr",
            ty: Text,
            doc: "the client's address",
            value: |(_, c)| Cell::Text(c.client_addr.to_string()),
        },
        Column {
            name: "tls",
            ty: Bool,
            doc: "whether the client uses TLS",
            value: |(_, c)| Cell::Bool(c.tls),
        },
        Column {
            name: "connected_at",
            ty: Timestamptz,
            doc: "when it connected",
            value: |(_, c)| connected_at(c),
        },
        Column {
            name: "connected_secs",
            ty: Int8,
            doc: "seconds since it connected",
            value: |(_, c)| seconds_since(c.connected_at),
        },
        Column {
            name: "server_addr",
            ty: Text,
            doc: "the PostgreSQL it is spliced to",
            value: |(_, c)| c.server().address.into(),
        },
    ],
};

/// `pgmirror.servers` and `SHOW SERVERS`: one row per server connection
/// (clients are spliced one to one).
pub static SERVERS: View<ClientRow> = View {
    schema: "pgmirror",
    name: "servers",
    doc: "one row per server connection of the proxy",
    columns: &[
        Column {
            name: "server_addr",
            ty: Text,
            doc: "the PostgreSQL connected to",
            value: |(_, c)| c.server().address.into(),
        },
        Column {
            name: "server_pid",
            ty: Int8,
            doc: "the server's backend pid",
            value: |(_, c)| {
                c.server()
                    .key
                    .map_or(Cell::Null, |(pid, _)| Cell::Int8(i64::from(pid)))
            },
        },
        Column {
            name: "session",
            ty: Text,
            doc: "the mirroring session",
            value: |(_, c)| text(&c.session),
        },
        Column {
            name: "user",
            ty: Text,
            doc: "the user",
            value: |(_, c)| text(&c.user),
        },
        Column {
            name: "database",
            ty: Text,
            doc: "the database",
            value: |(_, c)| text(&c.database),
        },
        Column {
            name: "client_pid",
            ty: Int8,
            doc: "the client's pid in pgmirror.clients",
            value: |(pid, _)| Cell::Int8(i64::from(*pid)),
        },
        Column {
            name: "connected_secs",
            ty: Int8,
            doc: "seconds since the client connected",
            value: |(_, c)| seconds_since(c.connected_at),
        },
    ],
};

/// A configured session as `pgmirror.sessions` shows it.
pub struct SessionRow {
    pub name: String,
    pub route: Route,
    pub databases: Vec<String>,
    pub clients: usize,
}

fn count(n: usize) -> Cell {
    Cell::Int8(i64::try_from(n).unwrap_or(i64::MAX))
}

/// `pgmirror.pools` and `SHOW POOLS`: one row per server connection pool
/// (session, database, user) of the pooled sessions.
pub static POOLS: View<PoolRow> = View {
    schema: "pgmirror",
    name: "pools",
    doc: "one row per server connection pool (pool_mode = \"session\")",
    columns: &[
        Column {
            name: "session",
            ty: Text,
            doc: "the mirroring session",
            value: |p| text(&p.key.session),
        },
        Column {
            name: "database",
            ty: Text,
            doc: "the database",
            value: |p| text(&p.key.database),
        },
        Column {
            name: "user",
            ty: Text,
            doc: "the user",
            value: |p| text(&p.key.user),
        },
        Column {
            name: "active",
            ty: Int8,
            doc: "server connections in use by a client (or being opened for one)",
            value: |p| count(p.active),
        },
        Column {
            name: "idle",
            ty: Int8,
            doc: "server connections reset and waiting for a client",
            value: |p| count(p.idle),
        },
        Column {
            name: "waiting",
            ty: Int8,
            doc: "clients waiting for a slot of the full pool",
            value: |p| count(p.waiting),
        },
        Column {
            name: "max",
            ty: Int8,
            doc: "pool_size: most server connections of the pool",
            value: |p| count(p.max),
        },
    ],
};

/// `pgmirror.sessions` and `SHOW SESSIONS`: one row per configured session.
pub static SESSIONS: View<SessionRow> = View {
    schema: "pgmirror",
    name: "sessions",
    doc: "one row per mirroring session the proxy routes",
    columns: &[
        Column {
            name: "session",
            ty: Text,
            doc: "the session's name",
            value: |s| text(&s.name),
        },
        Column {
            name: "epoch",
            ty: Int8,
            doc: "the highest epoch the proxy has seen",
            value: |s| Some(s.route.epoch.0).into(),
        },
        Column {
            name: "principal",
            ty: Text,
            doc: "the principal routed to",
            value: |s| {
                s.route
                    .principal
                    .as_ref()
                    .map(|p| p.server_name.clone())
                    .into()
            },
        },
        Column {
            name: "principal_address",
            ty: Text,
            doc: "its PostgreSQL",
            value: |s| s.route.principal.as_ref().map(|p| p.address.clone()).into(),
        },
        Column {
            name: "discovered_by",
            ty: Text,
            doc: "agent, or read-write probe",
            value: |s| {
                s.route
                    .principal
                    .as_ref()
                    .map(|p| match p.discovery {
                        Discovery::Agent => "agent".to_string(),
                        Discovery::Probe => "read-write probe".to_string(),
                    })
                    .into()
            },
        },
        Column {
            name: "partners",
            ty: Text,
            doc: "the partner agents' endpoints",
            value: |s| {
                Cell::Text(
                    s.route
                        .partners
                        .iter()
                        .map(|p| p.endpoint.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            },
        },
        Column {
            name: "databases",
            ty: Text,
            doc: "the databases routed to the session",
            value: |s| Cell::Text(s.databases.join(", ")),
        },
        Column {
            name: "clients",
            ty: Int8,
            doc: "connected clients",
            value: |s| Some(s.clients as u64).into(),
        },
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_partner_has_unknown_figures_not_zeros() {
        let route = Route {
            partners: vec![PartnerView {
                endpoint: Endpoint {
                    host: "127.0.0.1".into(),
                    port: 7001,
                },
                status: None,
                error: Some("refused".into()),
            }],
            ..Route::default()
        };
        let rows = PartnerRow::of_routes(&[("shop".into(), route)]);
        let table = DATABASE_MIRRORING.rows(&rows);
        let column = |name: &str| {
            let at = table.columns.iter().position(|(n, _)| n == name).unwrap();
            table.rows[0][at].clone()
        };
        assert_eq!(column("database_name"), Cell::Text("shop".into()));
        assert_eq!(column("link_bytes_raw"), Cell::Null);
        assert_eq!(column("peer_connected"), Cell::Null);
        assert_eq!(column("last_error"), Cell::Text("refused".into()));
        let endpoints = DATABASE_MIRRORING_ENDPOINTS.rows(&rows);
        assert!(endpoints.rows[0].contains(&Cell::Text("UNREACHABLE".into())));
    }

    #[test]
    fn every_column_has_a_unique_name_and_a_description() {
        fn check<R>(view: &View<R>) {
            let mut names: Vec<_> = view.columns.iter().map(|c| c.name).collect();
            assert!(
                view.columns.iter().all(|c| !c.doc.is_empty()),
                "{}",
                view.name
            );
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), view.columns.len(), "{}", view.name);
        }
        check(&DATABASE_MIRRORING);
        check(&DATABASE_MIRRORING_ENDPOINTS);
        check(&DATABASE_MIRRORING_WITNESSES);
        check(&DATABASE_MIRRORING_HISTORY);
        check(&CLIENTS);
        check(&SERVERS);
        check(&SESSIONS);
        check(&POOLS);
    }
}
