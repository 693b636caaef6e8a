//! Every Prometheus metric pgmirror exports, in one place: names (prefix
//! `pgmirror_`), label keys, help texts, the HTTP exporter each process
//! starts on its configured `metrics` address, and the functions that
//! record what the partner agent and the witness know.
//!
//! Partner metrics carry the labels `session` and `partner` (the partner's
//! server name). The agent's supervisor records its gauges once per tick
//! from `sys.database_mirroring` ([`record_partner`]); the failover code
//! paths count failovers ([`count_failover`]); the proxy records the
//! `pgmirror_proxy_*` metrics. `grafana/` and `prometheus/alerts.yml` use
//! only the names in [`ALL`], which a test checks.
//!
//! The exporter binds its own listener (the `metrics-exporter-prometheus`
//! crate owns it) and runs until the process exits. Nothing here is async.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Label, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::admin::view;
use crate::control::{MirroringStatus, PromotionKind, RoleRow};

/// Label: the mirroring session (the proxy and the witness use it too).
pub const SESSION: &str = "session";
/// Label: the partner's server name; on proxy metrics, the partner the
/// connection went to.
pub const PARTNER: &str = "partner";
/// Label of [`FAILOVERS`]: `manual`, `automatic`, `forced` or `handover`.
pub const KIND: &str = "kind";
/// Label of [`WARNING_BREACHED`]: which warning threshold (spec 64).
pub const THRESHOLD: &str = "threshold";
/// Label of [`PROXY_BYTES`]: `client_to_server` or `server_to_client`.
pub const DIRECTION: &str = "direction";
/// Label of [`PROXY_COMMITS_FENCED`]: `wait_cancelled`, `wait_terminated`,
/// `cancel_forwarded` or `server_closed`.
pub const CAUSE: &str = "cause";

/// Always 1; its `version` label says which pgmirror runs.
pub const BUILD_INFO: &str = "pgmirror_build_info";

/// `mirroring_role`: 1 principal, 2 mirror, 0 when mirroring ended.
pub const ROLE: &str = "pgmirror_role";
/// `mirroring_state` code: 0 suspended, 1 disconnected, 2 synchronizing,
/// 3 pending failover, 4 synchronized, 5 unsynchronized (SAFETY OFF).
pub const STATE: &str = "pgmirror_state";
/// `mirroring_role_sequence`: the epoch.
pub const EPOCH: &str = "pgmirror_epoch";
/// `mirroring_safety_level`: 1 OFF, 2 FULL.
pub const SAFETY_LEVEL: &str = "pgmirror_safety_level";
/// `mirroring_witness_state`: 0 unknown (no witness), 1 connected, 2 disconnected.
pub const WITNESS_STATE: &str = "pgmirror_witness_state";
/// 1 while this partner hears its peer.
pub const PEER_CONNECTED: &str = "pgmirror_peer_connected";
/// Principal: WAL flushed here and not yet flushed by the mirror.
pub const SEND_QUEUE_BYTES: &str = "pgmirror_send_queue_bytes";
/// WAL the mirror holds and has not replayed yet.
pub const REDO_QUEUE_BYTES: &str = "pgmirror_redo_queue_bytes";
pub const SEND_RATE: &str = "pgmirror_send_rate_bytes_per_second";
pub const REDO_RATE: &str = "pgmirror_redo_rate_bytes_per_second";
/// Mean time from sending WAL to the mirror's flush of it (spec 63).
pub const COMMIT_OVERHEAD: &str = "pgmirror_mirror_commit_overhead_seconds";
/// How long the oldest WAL still in the send queue has waited; see
/// `partner::telemetry::UnsentAge` for how it is measured.
pub const OLDEST_UNSENT: &str = "pgmirror_oldest_unsent_transaction_seconds";
/// Send queue / send rate (spec 63); +Inf when the queue does not move.
pub const TIME_TO_SEND: &str = "pgmirror_estimated_time_to_send_seconds";
/// Redo queue / redo rate (spec 63); +Inf when replay does not move.
pub const TIME_TO_RESTORE: &str = "pgmirror_estimated_time_to_restore_seconds";
/// Bytes carried over the agent link before compression.
pub const LINK_BYTES_RAW: &str = "pgmirror_link_bytes_raw_total";
/// Bytes on the wire of the agent link after compression.
pub const LINK_BYTES_COMPRESSED: &str = "pgmirror_link_bytes_compressed_total";
/// Role switches that made this partner the principal, by kind.
pub const FAILOVERS: &str = "pgmirror_failovers_total";
/// 1 while a configured warning threshold is exceeded (spec 64).
pub const WARNING_BREACHED: &str = "pgmirror_warning_breached";

/// Witness: the session's epoch in the role table.
pub const WITNESS_EPOCH: &str = "pgmirror_witness_epoch";
/// Witness: 1 for the partner the role table names principal, 0 for the mirror.
pub const WITNESS_PRINCIPAL: &str = "pgmirror_witness_principal";
/// Witness: 1 while the role table records the session as synchronized.
pub const WITNESS_SYNCHRONIZED: &str = "pgmirror_witness_synchronized";
/// Witness: promotions it granted, by kind (labels session, partner, kind).
pub const WITNESS_PROMOTIONS: &str = "pgmirror_witness_promotions_total";

// The proxy records these (labels session and, once routed, partner).
/// Proxy: client connections open now.
pub const PROXY_CLIENT_CONNECTIONS: &str = "pgmirror_proxy_client_connections";
/// Proxy: server connections (to a principal) open now.
pub const PROXY_SERVER_CONNECTIONS: &str = "pgmirror_proxy_server_connections";
/// Proxy: bytes spliced, by direction.
pub const PROXY_BYTES: &str = "pgmirror_proxy_bytes_total";
/// Proxy: time to connect to the principal, a histogram.
pub const PROXY_CONNECT_SECONDS: &str = "pgmirror_proxy_connect_duration_seconds";
/// Proxy: connections held while no principal serves.
pub const PROXY_HELD_CONNECTIONS: &str = "pgmirror_proxy_held_connections";
/// Proxy: CancelRequests forwarded.
pub const PROXY_CANCEL_REQUESTS: &str = "pgmirror_proxy_cancel_requests_total";
/// Proxy: responses replaced by 40003 because a commit's wait for the
/// mirror was cut short (invariant I2), by cause.
pub const PROXY_COMMITS_FENCED: &str = "pgmirror_proxy_commits_fenced_total";
/// Proxy: pooled server connections leased to clients, per pool (labels
/// session, database, user).
pub const PROXY_POOL_ACTIVE: &str = "pgmirror_proxy_pool_active_connections";
/// Proxy: pooled server connections idle, waiting for a client, per pool.
pub const PROXY_POOL_IDLE: &str = "pgmirror_proxy_pool_idle_connections";
/// Proxy: clients waiting for a slot of a full pool, per pool.
pub const PROXY_POOL_WAITING: &str = "pgmirror_proxy_pool_waiting_clients";
/// Proxy: clients given an idle pooled connection instead of a new one.
pub const PROXY_POOL_REUSES: &str = "pgmirror_proxy_pool_reuses_total";
/// Proxy: transaction-mode clients whose next transaction ran on a new
/// principal after a failover, without reconnecting.
pub const PROXY_POOL_REATTACHMENTS: &str = "pgmirror_proxy_pool_reattachments_total";
/// Proxy: transaction-mode transactions a failover or a lost server
/// connection ended while open (the client got 40001).
pub const PROXY_TRANSACTIONS_ABORTED: &str = "pgmirror_proxy_transactions_aborted_total";

/// Histogram buckets of [`PROXY_CONNECT_SECONDS`], in seconds.
const CONNECT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a metric is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn metric(name: &'static str, kind: Kind, unit: Option<Unit>, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        unit,
        help,
    }
}

/// Every metric any pgmirror process exports.
pub const ALL: &[Metric] = &[
    metric(BUILD_INFO, Kind::Gauge, None, "Always 1; the version label names the pgmirror build."),
    metric(ROLE, Kind::Gauge, None, "mirroring_role: 1 principal, 2 mirror, 0 ended."),
    metric(STATE, Kind::Gauge, None, "mirroring_state: 0 suspended, 1 disconnected, 2 synchronizing, 3 pending failover, 4 synchronized, 5 unsynchronized."),
    metric(EPOCH, Kind::Gauge, None, "mirroring_role_sequence: grows by one at every role switch."),
    metric(SAFETY_LEVEL, Kind::Gauge, None, "mirroring_safety_level: 1 OFF, 2 FULL."),
    metric(WITNESS_STATE, Kind::Gauge, None, "mirroring_witness_state: 0 unknown (no witness), 1 connected, 2 disconnected."),
    metric(PEER_CONNECTED, Kind::Gauge, None, "1 while this partner hears its peer."),
    metric(SEND_QUEUE_BYTES, Kind::Gauge, Some(Unit::Bytes), "WAL flushed on the principal and not yet flushed by the mirror."),
    metric(REDO_QUEUE_BYTES, Kind::Gauge, Some(Unit::Bytes), "WAL the mirror received and has not replayed yet."),
    metric(SEND_RATE, Kind::Gauge, None, "WAL bytes per second flushed by the mirror."),
    metric(REDO_RATE, Kind::Gauge, None, "WAL bytes per second replayed by the mirror."),
    metric(COMMIT_OVERHEAD, Kind::Gauge, Some(Unit::Seconds), "Mean delay from sending WAL to the mirror's flush of it."),
    metric(OLDEST_UNSENT, Kind::Gauge, Some(Unit::Seconds), "Age of the oldest WAL in the send queue."),
    metric(TIME_TO_SEND, Kind::Gauge, Some(Unit::Seconds), "Send queue divided by send rate; +Inf when nothing is sent."),
    metric(TIME_TO_RESTORE, Kind::Gauge, Some(Unit::Seconds), "Redo queue divided by redo rate; +Inf when nothing is replayed."),
    metric(LINK_BYTES_RAW, Kind::Counter, Some(Unit::Bytes), "Bytes carried over the agent link, before compression."),
    metric(LINK_BYTES_COMPRESSED, Kind::Counter, Some(Unit::Bytes), "Bytes sent and received on the agent link, compressed."),
    metric(FAILOVERS, Kind::Counter, None, "Role switches that made this partner the principal, by kind."),
    metric(WARNING_BREACHED, Kind::Gauge, None, "1 while a configured warning threshold is exceeded."),
    metric(WITNESS_EPOCH, Kind::Gauge, None, "The session's epoch in the witness's role table."),
    metric(WITNESS_PRINCIPAL, Kind::Gauge, None, "1 for the partner the role table names principal, 0 for the mirror."),
    metric(WITNESS_SYNCHRONIZED, Kind::Gauge, None, "1 while the role table records the session as synchronized."),
    metric(WITNESS_PROMOTIONS, Kind::Counter, None, "Promotions the witness granted, by kind."),
    metric(PROXY_CLIENT_CONNECTIONS, Kind::Gauge, None, "Client connections open on the proxy."),
    metric(PROXY_SERVER_CONNECTIONS, Kind::Gauge, None, "Connections from the proxy to a principal."),
    metric(PROXY_BYTES, Kind::Counter, Some(Unit::Bytes), "Bytes the proxy spliced, by direction."),
    metric(PROXY_CONNECT_SECONDS, Kind::Histogram, Some(Unit::Seconds), "Time the proxy took to connect to the principal."),
    metric(PROXY_HELD_CONNECTIONS, Kind::Gauge, None, "Client connections held while no principal serves."),
    metric(PROXY_CANCEL_REQUESTS, Kind::Counter, None, "CancelRequests the proxy forwarded."),
    metric(PROXY_POOL_ACTIVE, Kind::Gauge, None, "Pooled server connections leased to clients, per pool."),
    metric(PROXY_POOL_IDLE, Kind::Gauge, None, "Pooled server connections idle in their pool."),
    metric(PROXY_POOL_WAITING, Kind::Gauge, None, "Clients waiting for a slot of a full pool."),
    metric(PROXY_POOL_REUSES, Kind::Counter, None, "Clients given an idle pooled server connection."),
    metric(PROXY_POOL_REATTACHMENTS, Kind::Counter, None, "Transaction-mode clients moved to the new principal after a failover without reconnecting."),
    metric(PROXY_TRANSACTIONS_ABORTED, Kind::Counter, None, "Transaction-mode transactions ended by a failover or a lost server connection while open (40001 to the client)."),
    metric(PROXY_COMMITS_FENCED, Kind::Counter, None, "Commits whose wait for the mirror was cut short, turned into 40003 for the client, by cause."),
];

#[derive(Debug, thiserror::Error)]
#[error("cannot start the metrics listener on {addr}: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    #[source]
    source: BuildError,
}

/// Installs the process-wide Prometheus recorder with an HTTP listener on
/// `addr` (any path answers) and describes every metric. Call once per
/// process, inside the tokio runtime; the listener runs until exit.
pub fn serve(addr: SocketAddr) -> Result<(), MetricsError> {
    let error = |source| MetricsError { addr, source };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(PROXY_CONNECT_SECONDS.into()), CONNECT_BUCKETS)
        .map_err(error)?
        .install()
        .map_err(error)?;
    for metric in ALL {
        match (metric.kind, metric.unit) {
            (Kind::Gauge, Some(unit)) => describe_gauge!(metric.name, unit, metric.help),
            (Kind::Gauge, None) => describe_gauge!(metric.name, metric.help),
            (Kind::Counter, Some(unit)) => describe_counter!(metric.name, unit, metric.help),
            (Kind::Counter, None) => describe_counter!(metric.name, metric.help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(metric.name, unit, metric.help),
            (Kind::Histogram, None) => describe_histogram!(metric.name, metric.help),
        }
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    tracing::info!(%addr, "metrics listener started");
    Ok(())
}

/// Holds one unit of a gauge (an open connection, a held client) for as
/// long as it lives.
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The `session` and `partner` labels of one partner.
pub fn partner_labels(session: &str, partner: &str) -> Vec<Label> {
    vec![
        Label::new(SESSION, session.to_owned()),
        Label::new(PARTNER, partner.to_owned()),
    ]
}

fn with_label(labels: &[Label], key: &'static str, value: &'static str) -> Vec<Label> {
    let mut labels = labels.to_vec();
    labels.push(Label::new(key, value));
    labels
}

/// The `kind` label value of a promotion.
pub fn kind_label(kind: PromotionKind) -> &'static str {
    match kind {
        PromotionKind::Automatic => "automatic",
        PromotionKind::Manual => "manual",
        PromotionKind::Forced => "forced",
        PromotionKind::Handover => "handover",
    }
}

const KINDS: [PromotionKind; 4] = [
    PromotionKind::Manual,
    PromotionKind::Automatic,
    PromotionKind::Forced,
    PromotionKind::Handover,
];

/// Creates the failover counters at zero, so that `increase()` sees the
/// first failover.
pub fn register_failovers(session: &str, partner: &str) {
    let labels = partner_labels(session, partner);
    for kind in KINDS {
        counter!(FAILOVERS, with_label(&labels, KIND, kind_label(kind))).increment(0);
    }
}

/// Counts a role switch that made this partner the principal.
pub fn count_failover(session: &str, partner: &str, kind: PromotionKind) {
    let labels = with_label(&partner_labels(session, partner), KIND, kind_label(kind));
    counter!(FAILOVERS, labels).increment(1);
}

/// What the agent derives per tick beyond `sys.database_mirroring`.
#[derive(Debug, Clone, Default)]
pub struct Derived {
    pub oldest_unsent: Option<Duration>,
    /// Every configured threshold and whether it is exceeded now.
    pub warnings: Vec<(&'static str, bool)>,
}

/// Seconds to drain `queue` at `rate` bytes per second: 0 for an empty
/// queue, +Inf when the queue does not move.
pub fn drain_seconds(queue: u64, rate: f64) -> f64 {
    if queue == 0 {
        0.0
    } else if rate > 0.0 {
        queue as f64 / rate
    } else {
        f64::INFINITY
    }
}

/// The gauge exporting a column of `sys.database_mirroring`, and the factor
/// from the column's unit to the metric's.
fn column_metric(column: &str) -> Option<(&'static str, f64)> {
    Some(match column {
        "mirroring_state" => (STATE, 1.0),
        "mirroring_role_sequence" => (EPOCH, 1.0),
        "mirroring_safety_level" => (SAFETY_LEVEL, 1.0),
        "mirroring_witness_state" => (WITNESS_STATE, 1.0),
        "peer_connected" => (PEER_CONNECTED, 1.0),
        "send_queue_bytes" => (SEND_QUEUE_BYTES, 1.0),
        "redo_queue_bytes" => (REDO_QUEUE_BYTES, 1.0),
        "send_rate_bytes_per_sec" => (SEND_RATE, 1.0),
        "redo_rate_bytes_per_sec" => (REDO_RATE, 1.0),
        "mirror_commit_overhead_ms" => (COMMIT_OVERHEAD, 0.001),
        _ => return None,
    })
}

/// Sets one partner's gauges from its status row. Values the partner does
/// not know in its role (a mirror's send queue) are exported as NaN, so
/// graphs show a gap rather than a stale value.
pub fn record_partner(status: &MirroringStatus, derived: &Derived) {
    let labels = partner_labels(&status.database_name, &status.server_name);
    let set = |name: &'static str, value: Option<f64>| {
        gauge!(name, labels.clone()).set(value.unwrap_or(f64::NAN));
    };
    set(ROLE, Some(status.mirroring_role.unwrap_or(0).into()));
    // The other figures are columns of sys.database_mirroring, read through
    // the view's one definition of each.
    let row = view::PartnerRow::reporting(status.clone());
    for column in view::DATABASE_MIRRORING.columns {
        if let Some((metric, scale)) = column_metric(column.name) {
            set(
                metric,
                (column.value)(&row).number().map(|value| value * scale),
            );
        }
    }
    set(
        OLDEST_UNSENT,
        derived.oldest_unsent.map(|age| age.as_secs_f64()),
    );
    set(
        TIME_TO_SEND,
        status
            .send_queue_bytes
            .zip(status.send_rate_bytes_per_sec)
            .map(|(queue, rate)| drain_seconds(queue, rate)),
    );
    set(
        TIME_TO_RESTORE,
        status
            .redo_queue_bytes
            .zip(status.redo_rate_bytes_per_sec)
            .map(|(queue, rate)| drain_seconds(queue, rate)),
    );
    counter!(LINK_BYTES_RAW, labels.clone()).absolute(status.link_bytes_raw);
    counter!(LINK_BYTES_COMPRESSED, labels.clone()).absolute(status.link_bytes_compressed);
    for (threshold, breached) in &derived.warnings {
        gauge!(WARNING_BREACHED, with_label(&labels, THRESHOLD, threshold))
            .set(f64::from(u8::from(*breached)));
    }
}

/// Sets the witness's gauges for one row of its role table.
pub fn record_witness_row(row: &RoleRow) {
    let session = [Label::new(SESSION, row.session.clone())];
    gauge!(WITNESS_EPOCH, session.to_vec()).set(row.epoch.0 as f64);
    gauge!(WITNESS_SYNCHRONIZED, session.to_vec()).set(f64::from(u8::from(row.synchronized)));
    gauge!(
        WITNESS_PRINCIPAL,
        partner_labels(&row.session, &row.principal)
    )
    .set(1.0);
    if let Some(mirror) = &row.mirror {
        gauge!(WITNESS_PRINCIPAL, partner_labels(&row.session, mirror)).set(0.0);
    }
}

/// Counts a promotion the witness granted.
pub fn count_witness_promotion(session: &str, partner: &str, kind: PromotionKind) {
    let labels = with_label(&partner_labels(session, partner), KIND, kind_label(kind));
    counter!(WITNESS_PROMOTIONS, labels).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for metric in ALL {
            assert!(seen.insert(metric.name), "{} listed twice", metric.name);
            assert!(metric.name.starts_with("pgmirror_"), "{}", metric.name);
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                metric.name
            );
        }
    }

    #[test]
    fn drain_time_is_queue_over_rate() {
        assert_eq!(drain_seconds(0, 0.0), 0.0);
        assert_eq!(drain_seconds(1000, 500.0), 2.0);
        assert!(drain_seconds(1, 0.0).is_infinite());
    }
}
