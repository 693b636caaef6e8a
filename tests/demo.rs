//! `pgmirror demo` as a user runs it: the built binary, a fresh directory,
//! the printed summary, a write, SIGTERM, and nothing left behind.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Pgmirror;
use pgmirror::partner::engine::RunAs;

/// Every process whose command line mentions `dir`.
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}

/// Fetches the metrics page whose URL the summary prints on the line
/// containing `label`.
async fn scrape(summary: &str, label: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = summary
        .lines()
        .find(|line| line.contains(label))
        .and_then(|line| line.split("http://").nth(1))
        .unwrap_or_else(|| panic!("no metrics URL for {label} in the summary"));
    let address = url.split('/').next().unwrap_or_default();
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: demo\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// `promtool check metrics` on a scraped page (HTTP headers stripped).
fn promtool_accepts(page: &str) {
    use std::io::Write;
    let body = page.split("\r\n\r\n").nth(1).unwrap_or(page);
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls sys.database_mirroring until every row shows `state`.
async fn wait_console_state(admin: &tokio_postgres::Client, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = admin
            .simple_query("SELECT * FROM sys.database_mirroring")
            .await
            .unwrap();
        let states: Vec<String> = rows
            .iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    row.get("mirroring_state_desc").map(str::to_string)
                }
                _ => None,
            })
            .collect();
        if states.len() == 2 && states.iter().all(|s| s == state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sys.database_mirroring never showed {state}: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client of the demo's proxy, as the summary says (user postgres,
/// password pgmirror), named `application`.
async fn through_proxy(port: u16, application: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user=postgres password={} dbname=postgres \
             application_name={application}",
            pgmirror::demo::DEMO_PASSWORD
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect through the demo's proxy");
    tokio::spawn(connection);
    client
}

/// The SQL statements of the README's five-minute tour: each starts after
/// `pgmirror=> ` and runs to its `;`, comments left out.
fn tour_statements() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let tour = readme
        .split("### A five-minute tour")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("the README's tour block");
    let mut statements = Vec::new();
    let mut current: Option<String> = None;
    for line in tour.lines() {
        let code = line.split(" --").next().unwrap_or_default();
        let text = match code.split_once("pgmirror=> ") {
            Some((_, text)) => {
                current = Some(String::new());
                text
            }
            None => code,
        };
        if let Some(statement) = current.as_mut() {
            statement.push_str(text.trim());
            statement.push(' ');
            if text.trim_end().ends_with(';') {
                statements.push(statement.trim().to_string());
                current = None;
            }
        }
    }
    statements
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_serves_and_stops_cleanly() {
    let dir = tempfile::Builder::new()
        .prefix("pgmirror-demo-")
        .tempdir()
        .unwrap();
    RunAs::detect().unwrap().hand_over(dir.path()).unwrap();
    let demo_dir = dir.path().join("cluster");
    let proxy_port = common::free_port().to_string();
    let args = [
        "demo",
        "--dir",
        demo_dir.to_str().unwrap(),
        "--timeout",
        "3",
        "--port",
        &proxy_port,
    ];
    let mut demo = Pgmirror::spawn("demo", dir.path(), &args);
    let deadline = Instant::now() + Duration::from_secs(180);
    let summary = loop {
        let output = demo.output();
        if output.contains("is mirrored") {
            break output;
        }
        assert!(!demo.has_exited(), "the demo exited: {output}");
        assert!(Instant::now() < deadline, "no summary: {output}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{summary}");
    let port: u16 = summary
        .lines()
        .find(|line| line.contains("psql through the proxy"))
        .and_then(|line| line.split("-p ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .expect("the proxy's port in the summary");
    // Transaction pooling: this client stays connected, idle, across the
    // tour's failover, with its own parameters.
    let client = through_proxy(port, "tour").await;
    client
        .batch_execute(
            "CREATE SCHEMA tour; CREATE TABLE tour.hello (id int); \
             INSERT INTO tour.hello VALUES (1); SET search_path = tour, public",
        )
        .await
        .unwrap();

    // The admin console, as the summary says: every statement of the
    // README's tour, taken from the README, through psql.
    let (admin, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=admin password=pgmirror dbname=pgmirror"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("admin console login");
    tokio::spawn(connection);
    wait_console_state(&admin, "SYNCHRONIZED").await;
    let tour = tour_statements();
    assert!(tour.len() >= 5, "the README's tour: {tour:#?}");
    let port_text = port.to_string();
    for statement in &tour {
        let (ok, output) = common::proxy::run_client(
            "psql",
            &[
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port_text,
                "-U",
                "admin",
                "-d",
                "pgmirror",
                "-c",
                statement,
            ],
            &[("PGPASSWORD", "pgmirror")],
        );
        println!("pgmirror=> {statement}\n{output}");
        assert!(
            ok,
            "the README's tour statement {statement:?} failed: {output}"
        );
    }
    // The idle client was not disconnected: its next statement ran on the
    // new principal (beta), with its search_path and application_name.
    let row = client
        .query_one(
            "INSERT INTO hello VALUES (2) RETURNING current_setting('search_path'), \
             current_setting('application_name'), inet_server_port()",
            &[],
        )
        .await
        .expect("the idle client writes on the new principal without reconnecting");
    let (search_path, application, server_port): (String, String, i32) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (search_path.as_str(), application.as_str()),
        ("tour, public", "tour")
    );
    let beta: pgmirror::config::PartnerConfig =
        pgmirror::config::load(&demo_dir.join("beta.toml")).unwrap();
    assert_eq!(server_port, i32::from(beta.postgres.port), "ran on beta");
    let roles: Vec<(String, String)> = admin
        .simple_query("SELECT * FROM sys.database_mirroring")
        .await
        .unwrap()
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some((
                row.get("server_name")?.to_string(),
                row.get("mirroring_role_desc")?.to_string(),
            )),
            _ => None,
        })
        .collect();
    assert!(
        roles.contains(&("beta".into(), "PRINCIPAL".into())),
        "{roles:?}"
    );
    assert!(
        roles.contains(&("alpha".into(), "MIRROR".into())),
        "{roles:?}"
    );
    let alpha_metrics = scrape(&summary, "alpha agent endpoint").await;
    assert!(
        alpha_metrics.contains("pgmirror_role"),
        "alpha's metrics: {alpha_metrics}"
    );
    let proxy_metrics = scrape(&summary, "proxy metrics").await;
    promtool_accepts(&proxy_metrics);
    for name in [
        "pgmirror_proxy_connect_duration_seconds",
        "pgmirror_proxy_bytes_total",
    ] {
        assert!(
            proxy_metrics.contains(name),
            "proxy metrics lack {name}: {proxy_metrics}"
        );
    }
    for config in ["alpha.toml", "beta.toml", "witness.toml"] {
        assert!(
            demo_dir.join(config).is_file(),
            "{config} is written for the user to copy"
        );
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = demo
        .wait(Duration::from_secs(90))
        .expect("the demo stops on SIGTERM");
    assert!(status.success(), "{status:?}: {}", demo.output());
    let left = processes_using(&demo_dir);
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(
        demo_dir.join("alpha/data/PG_VERSION").is_file(),
        "the directory is kept"
    );
}

/// A port the demo chose and wrote into its configs, taken by someone else
/// before the process it was meant for bound it: the demo notices, moves to
/// free ports, says so, and comes up anyway. The mirror's PostgreSQL port
/// is the one taken: it is bound seconds after the configs are written
/// (after the base backup), so the test always takes it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_whose_port_is_taken_during_its_start_still_comes_up() {
    let dir = tempfile::Builder::new()
        .prefix("pgmirror-demo-")
        .tempdir()
        .unwrap();
    RunAs::detect().unwrap().hand_over(dir.path()).unwrap();
    let demo_dir = dir.path().join("cluster");
    let args = [
        "demo",
        "--dir",
        demo_dir.to_str().unwrap(),
        "--timeout",
        "3",
        "--port",
        "0",
    ];
    let mut demo = Pgmirror::spawn("demo", dir.path(), &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    let taken_port = loop {
        let written =
            pgmirror::config::load::<pgmirror::config::PartnerConfig>(&demo_dir.join("beta.toml"));
        if let Ok(beta) = written {
            break beta.postgres.port;
        }
        assert!(Instant::now() < deadline, "no configs: {}", demo.output());
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", taken_port))
        .expect("the mirror's port is still free just after the configs are written");
    let deadline = Instant::now() + Duration::from_secs(180);
    let summary = loop {
        let output = demo.output();
        if output.contains("is mirrored") {
            break output;
        }
        assert!(!demo.has_exited(), "the demo exited: {output}");
        assert!(Instant::now() < deadline, "no summary: {output}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(summary.contains("beta found a port taken"), "{summary}");
    assert!(
        summary.contains(&format!("beta PostgreSQL {taken_port}")),
        "{summary}"
    );
    let beta: pgmirror::config::PartnerConfig =
        pgmirror::config::load(&demo_dir.join("beta.toml")).unwrap();
    assert_ne!(beta.postgres.port, taken_port, "the mirror moved");
    // The summary's proxy port (chosen by the demo for --port 0) serves.
    let proxy_port = summary
        .lines()
        .find(|line| line.contains("psql through the proxy"))
        .and_then(|line| line.split(" -p ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the proxy's port in the summary");
    assert_ne!(proxy_port, "0");
    let client = through_proxy(proxy_port.parse().unwrap(), "port-taken").await;
    let answer: i32 = client.query_one("SELECT 42", &[]).await.unwrap().get(0);
    assert_eq!(answer, 42);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = demo
        .wait(Duration::from_secs(90))
        .expect("the demo stops on SIGTERM");
    assert!(status.success(), "{status:?}: {}", demo.output());
    let left = processes_using(&demo_dir);
    assert!(left.is_empty(), "left behind: {left:#?}");
}
