//! The admin console as a database (issue 12, items 1-3), on a real pair
//! with a witness behind a real proxy: tokio-postgres (extended protocol,
//! binary results), psycopg and pgjdbc query the views with bound
//! parameters; Grafana's PostgreSQL data source queries (its test query and
//! time series over the history view with expanded `$__timeFilter`
//! predicates, `::timestamptz` casts and date_trunc) return the right rows
//! with the right types; the views join.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::cluster::{Pair, PairOptions, WitnessChoice};
use common::proxy::{run_client, ProxyHandle, ADMIN};
use tokio_postgres::types::Type;

/// RFC 3339 in UTC, as Grafana writes the bounds of `$__timeFilter`.
fn rfc3339(time: SystemTime) -> String {
    let time: chrono::DateTime<chrono::Utc> = time.into();
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_and_grafana_query_the_console_views() {
    let pair = Pair::start(PairOptions {
        witness: WitnessChoice::Own,
        history_sample_secs: Some(1),
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let started = SystemTime::now() - Duration::from_secs(60);
    let proxy = ProxyHandle::in_front_of(&pair, ADMIN).await;
    let console = proxy.console().await;
    let session = PairOptions::default().session;

    // Grafana's test query, and what health checks send.
    let one = console.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(one.columns()[0].name(), "?column?");
    assert_eq!(one.columns()[0].type_(), &Type::INT4);
    assert_eq!(one.get::<_, i32>(0), 1);
    let version: String = console
        .query_one("SELECT version()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("PostgreSQL 15"), "{version}");

    // Bound parameters, typed by what they are compared with.
    let rows = console
        .query(
            "SELECT server_name, mirroring_role_desc, mirroring_role_sequence \
             FROM sys.database_mirroring \
             WHERE database_name = $1 AND mirroring_role_sequence >= $2 ORDER BY server_name",
            &[&session, &1i64],
        )
        .await
        .unwrap();
    let roles: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        roles,
        [
            ("alpha".into(), "PRINCIPAL".into()),
            ("beta".into(), "MIRROR".into())
        ]
    );
    assert_eq!(rows[0].columns()[2].type_(), &Type::INT8);

    // The history fills from the witness's samples (every second here).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let samples: i64 = console
            .query_one(
                "SELECT count(*) FROM sys.database_mirroring_history WHERE kind = 'sample'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if samples >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no samples in the history view");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (from, to) = (
        rfc3339(started),
        rfc3339(SystemTime::now() + Duration::from_secs(60)),
    );

    // A Grafana time series, as its macros expand: $__timeFilter with
    // ::timestamptz casts, $__timeGroup as date_trunc, through the extended
    // protocol with binary results.
    let series = console
        .query(
            &format!(
                "SELECT date_trunc('minute', \"time\") AS \"time\", source AS metric, \
                 max(send_queue_bytes) AS value FROM sys.database_mirroring_history \
                 WHERE \"time\" BETWEEN '{from}'::timestamptz AND '{to}'::timestamptz \
                 AND kind = 'sample' GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .unwrap();
    assert!(!series.is_empty(), "a time series over the history");
    assert_eq!(series[0].columns()[0].type_(), &Type::TIMESTAMPTZ);
    assert_eq!(series[0].columns()[2].type_(), &Type::INT8);
    for row in &series {
        let time: SystemTime = row.get(0);
        assert!(time >= started - Duration::from_secs(60) && time <= SystemTime::now());
        let metric: String = row.get(1);
        assert!(metric == "alpha" || metric == "beta", "{metric}");
    }
    // The same with the filter's bounds uncast (PostgreSQL reads them as
    // timestamps because the column is one), an epoch column and interval
    // arithmetic, through the simple protocol.
    let simple = console
        .simple_query(&format!(
            "SELECT extract(epoch from \"time\")::bigint AS time_sec, source FROM \
             sys.database_mirroring_history WHERE \"time\" BETWEEN '{from}' AND '{to}' \
             AND \"time\" > now() - interval '1 hour' AND kind = 'sample' ORDER BY 1 LIMIT 3"
        ))
        .await
        .unwrap();
    let epochs: Vec<i64> = simple
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
            _ => None,
        })
        .collect();
    assert_eq!(epochs.len(), 3, "{simple:?}");
    // A time bound as a parameter, the way Grafana's $__timeFrom() can be.
    let newest: SystemTime = console
        .query_one(
            "SELECT max(\"time\") FROM sys.database_mirroring_history WHERE \"time\" > $1",
            &[&started],
        )
        .await
        .unwrap()
        .get(0);
    assert!(newest > started);

    // A join of the live view with the history.
    let joined = console
        .query(
            "SELECT m.server_name, m.mirroring_role_desc, count(*) AS samples \
             FROM sys.database_mirroring m JOIN sys.database_mirroring_history h \
             ON h.source = m.server_name AND h.kind = 'sample' \
             GROUP BY m.server_name, m.mirroring_role_desc ORDER BY m.server_name",
            &[],
        )
        .await
        .unwrap();
    let joined: Vec<(String, i64)> = joined.iter().map(|r| (r.get(0), r.get(2))).collect();
    assert_eq!(joined.len(), 2, "{joined:?}");
    assert!(joined.iter().all(|(_, samples)| *samples > 0), "{joined:?}");

    // The witness's own view of the session, and the endpoints.
    let witness = console
        .query_one(
            "SELECT principal_server_name, role_sequence_number, partner_sync_state_desc \
             FROM sys.database_mirroring_witnesses WHERE database_name = $1",
            &[&session],
        )
        .await
        .unwrap();
    assert_eq!(witness.get::<_, String>(0), "alpha");
    assert_eq!(witness.get::<_, String>(2), "SYNCHRONIZED");
    let started_endpoints: i64 = console
        .query_one(
            "SELECT count(*) FROM sys.database_mirroring_endpoints WHERE state_desc = 'STARTED'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(started_endpoints, 2);

    // Mistakes are refused with what is supported, and the connection goes on.
    let err = console
        .simple_query("SELECT * FROM pg_catalog.pg_class")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    let message = err.as_db_error().map(|db| db.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("sys.database_mirroring")),
        "{message:?}"
    );

    let conninfo = format!(
        "host=127.0.0.1 port={} user=admin password=secret dbname=pgmirror",
        proxy.port
    );
    // psycopg 3: server-side binding (extended protocol) with parameters.
    let (ok, out) = run_client(
        "python3",
        &[
            "-c",
            r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    cur = conn.execute(
        "SELECT server_name, mirroring_role_sequence FROM sys.database_mirroring "
        "WHERE database_name = %s AND mirroring_role_sequence >= %s ORDER BY server_name",
        (sys.argv[2], 1))
    print("rows", [row[0] for row in cur.fetchall()])
    cur = conn.execute("SELECT max(time) AS newest FROM sys.database_mirroring_history")
    print("type", cur.description[0].type_code, type(cur.fetchone()[0]).__name__)
    print("show", conn.execute("SHOW server_version").fetchone()[0])
"#,
            &conninfo,
            session,
        ],
        &[],
    );
    assert!(ok, "psycopg: {out}");
    assert!(out.contains("rows ['alpha', 'beta']"), "{out}");
    assert!(out.contains("type 1184 datetime"), "{out}");
    assert!(out.contains("show 15.0"), "{out}");

    // pgjdbc (Debian's libpostgresql-jdbc-java): a PreparedStatement run
    // more often than its prepareThreshold, so the driver switches to a
    // named server-side statement.
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        std::path::Path::new(jar).exists(),
        "pgjdbc is missing: apt-get install -y libpostgresql-jdbc-java"
    );
    let java_dir = tempfile::tempdir().unwrap();
    let source = java_dir.path().join("ConsoleQuery.java");
    std::fs::write(
        &source,
        r#"
import java.sql.*;
public class ConsoleQuery {
    public static void main(String[] args) throws Exception {
        try (Connection conn = DriverManager.getConnection(args[0], "admin", "secret")) {
            PreparedStatement statement = conn.prepareStatement(
                "SELECT server_name, mirroring_role_sequence FROM sys.database_mirroring "
                + "WHERE database_name = ? AND mirroring_role_sequence >= ? ORDER BY server_name");
            String names = "";
            for (int run = 0; run < 7; run++) {
                statement.setString(1, args[1]);
                statement.setLong(2, 1L);
                names = "";
                try (ResultSet rows = statement.executeQuery()) {
                    while (rows.next()) {
                        names += rows.getString(1) + ":" + rows.getLong(2) + " ";
                    }
                }
            }
            System.out.println("jdbc rows " + names.trim());
            try (ResultSet one = conn.createStatement().executeQuery("SELECT 1")) {
                one.next();
                System.out.println("jdbc one " + one.getInt(1));
            }
        }
    }
}
"#,
    )
    .unwrap();
    let url = format!("jdbc:postgresql://127.0.0.1:{}/pgmirror", proxy.port);
    let (ok, out) = run_client(
        "java",
        &["-cp", jar, source.to_str().unwrap(), &url, session],
        &[],
    );
    assert!(ok, "pgjdbc: {out}");
    assert!(out.contains("jdbc rows alpha:1 beta:1"), "{out}");
    assert!(out.contains("jdbc one 1"), "{out}");
    proxy.stop().await;
}
