//! Observability (issue 6): the metrics endpoints of real partner agents
//! and a real witness pass `promtool check metrics` and show the session;
//! a manual failover is counted; the shipped alert rules pass `promtool
//! check rules`; every query of the Grafana dashboard and of the alert
//! rules names a metric of `pgmirror::metrics::ALL`; the compose configs
//! load; and `docker-compose config` accepts the compose file.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, WitnessChoice, SLOW};
use pgmirror::control::Command;
use pgmirror::metrics::{Kind, ALL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// GET of a Prometheus endpoint: the body, or None while it is not up.
async fn scrape(port: u16) -> Option<String> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// Scrapes `port` until the body has a line starting with every prefix.
async fn scrape_until(port: u16, what: &str, prefixes: &[&str]) -> String {
    let deadline = Instant::now() + SLOW;
    loop {
        if let Some(body) = scrape(port).await {
            let found = |prefix: &&str| body.lines().any(|line| line.starts_with(prefix));
            if prefixes.iter().all(found) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never exported {prefixes:?}; last scrape:\n{body}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: metrics endpoint never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `promtool check metrics` on an exposition, which also lints names.
fn promtool_check_metrics(what: &str, body: &str) {
    let mut child = Process::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool ran");
    assert!(
        output.status.success(),
        "promtool check metrics failed on {what}: {}{}\n{body}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_and_witness_endpoints_pass_promtool_and_count_a_failover() {
    let pair = Pair::start(PairOptions {
        timeout: 3,
        witness: WitnessChoice::Own,
        warnings: "unsent_log_kb = 1048576\nunrestored_log_kb = 1048576\n\
                   oldest_unsent_transaction_minutes = 60\nmirror_commit_overhead_ms = 60000",
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    pair.wait_witness_synchronized().await;

    let alpha = scrape_until(
        pair.a.metrics_port,
        "alpha",
        &[
            r#"pgmirror_role{session="shop",partner="alpha"} 1"#,
            r#"pgmirror_state{session="shop",partner="alpha"} 4"#,
            r#"pgmirror_witness_state{session="shop",partner="alpha"} 1"#,
            "pgmirror_send_queue_bytes{",
            "pgmirror_link_bytes_raw_total{",
            "pgmirror_failovers_total{",
            "pgmirror_build_info{",
            r#"pgmirror_warning_breached{session="shop",partner="alpha",threshold="unsent_log"} 0"#,
            r#"pgmirror_warning_breached{session="shop",partner="alpha",threshold="mirror_commit_overhead"} 0"#,
        ],
    )
    .await;
    promtool_check_metrics("alpha", &alpha);
    let beta = scrape_until(
        pair.b.metrics_port,
        "beta",
        &[
            r#"pgmirror_role{session="shop",partner="beta"} 2"#,
            "pgmirror_redo_queue_bytes{",
        ],
    )
    .await;
    promtool_check_metrics("beta", &beta);
    let witness_port = pair.witness.as_ref().expect("witness").metrics_port;
    let witness = scrape_until(
        witness_port,
        "witness",
        &[
            r#"pgmirror_witness_principal{session="shop",partner="alpha"} 1"#,
            r#"pgmirror_witness_synchronized{session="shop"} 1"#,
        ],
    )
    .await;
    promtool_check_metrics("witness", &witness);

    let done = pair.command(&pair.a, Command::Failover).await;
    assert!(done.is_ok(), "{done:?}");
    let beta = scrape_until(
        pair.b.metrics_port,
        "beta after failover",
        &[
            r#"pgmirror_failovers_total{session="shop",partner="beta",kind="manual"} 1"#,
            r#"pgmirror_role{session="shop",partner="beta"} 1"#,
        ],
    )
    .await;
    promtool_check_metrics("beta after failover", &beta);
    scrape_until(
        witness_port,
        "witness after failover",
        &[
            r#"pgmirror_witness_principal{session="shop",partner="beta"} 1"#,
            r#"pgmirror_witness_promotions_total{session="shop",partner="beta",kind="manual"} 1"#,
        ],
    )
    .await;
}

#[test]
fn alert_rules_pass_promtool() {
    let output = Process::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file("prometheus/alerts.yml"))
        .output()
        .expect("promtool is installed");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `pgmirror_*` names in a PromQL expression, with the `_bucket`,
/// `_sum` and `_count` series of a histogram mapped to its name.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("pgmirror_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn is_exported(name: &str) -> bool {
    ALL.iter().any(|metric| {
        metric.name == name
            || (metric.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{}{suffix}", metric.name)))
    })
}

/// Every panel, including those nested in rows.
fn panels(value: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut found = Vec::new();
    for panel in value["panels"].as_array().into_iter().flatten() {
        found.push(panel);
        found.extend(panels(panel));
    }
    found
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let path = repo_file("grafana/dashboards/pgmirror.json");
    let text = std::fs::read_to_string(&path).expect("dashboard JSON");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["title"], "pgmirror");
    let mut queries = 0;
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {:?}: {expr} names no metric",
                panel["title"]
            );
            for name in names {
                assert!(
                    is_exported(&name),
                    "panel {:?} queries {name}, which src/metrics.rs does not define",
                    panel["title"]
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 10, "only {queries} queries in the dashboard");
}

#[test]
fn every_alert_rule_names_an_exported_metric() {
    let text = std::fs::read_to_string(repo_file("prometheus/alerts.yml")).expect("alerts.yml");
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("expr:"))
        .collect();
    assert!(
        exprs.len() >= 6,
        "expected the alert rules, found {exprs:?}"
    );
    for expr in exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr} names no metric");
        for name in names {
            assert!(is_exported(&name), "alert rule uses unknown metric {name}");
        }
    }
}

#[test]
fn compose_configs_load() {
    use pgmirror::config::{load, PartnerConfig, ProxyConfig, WitnessConfig};
    for name in ["alpha", "beta"] {
        let path = repo_file(&format!("docker/partner-{name}.toml"));
        let config: PartnerConfig = load(&path).expect("partner config loads");
        assert!(config.metrics.is_some() && config.warnings.unsent_log_kb.is_some());
    }
    let witness: WitnessConfig = load(&repo_file("docker/witness.toml")).expect("witness config");
    assert!(witness.metrics.is_some());
    let proxy: ProxyConfig = load(&repo_file("docker/proxy.toml")).expect("proxy config");
    assert!(proxy.metrics.is_some());
}

#[test]
fn docker_compose_config_passes() {
    let output = Process::new("docker-compose")
        .args(["config", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match output {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            println!("docker-compose is not installed; skipping the compose file check");
        }
        Err(err) => panic!("docker-compose: {err}"),
        Ok(output) => assert!(
            output.status.success(),
            "docker-compose config: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}
