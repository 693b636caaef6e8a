//! The history view's data (issue 12) on a real pair: the witness keeps
//! its role-table changes and a sample per partner from their reports,
//! and an agent without a witness keeps its own samples. Sampling is every
//! second here so that a few seconds show several.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, WitnessChoice, SLOW};
use pgmirror::control::HistoryRecord;

fn samples_of<'a>(
    records: &'a [HistoryRecord],
    name: &'a str,
) -> impl Iterator<Item = &'a HistoryRecord> + 'a {
    records
        .iter()
        .filter(move |r| r.kind == "sample" && r.source == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_witness_history_has_its_line_and_both_partners_samples() {
    let mut pair = Pair::start(PairOptions {
        timeout: 3,
        witness: WitnessChoice::Own,
        history_sample_secs: Some(1),
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    pair.wait_witness_synchronized().await;
    if let Some(agent) = &mut pair.a.agent {
        agent.kill9();
    }
    pair.wait_for(&pair.b, "principal", SLOW, |status| {
        status.mirroring_role_desc.as_deref() == Some("PRINCIPAL")
    })
    .await;

    let deadline = Instant::now() + SLOW;
    let records = loop {
        let records = pair.witness_history().await;
        // beta reports itself as principal after its promotion.
        let promoted_sample =
            samples_of(&records, "beta").any(|r| r.role.as_deref() == Some("PRINCIPAL"));
        if promoted_sample {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "no sample of beta as principal: {records:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        records.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "oldest first"
    );
    assert!(records.iter().all(|r| r.session == "shop"));
    let failover = records
        .iter()
        .find(|r| r.kind.starts_with("Automatic Failover"))
        .unwrap_or_else(|| panic!("no failover line: {records:#?}"));
    assert_eq!(failover.source, "witness");
    assert_eq!(failover.principal.as_deref(), Some("beta"));
    assert_eq!(failover.epoch, Some(2));
    assert!(records.iter().any(|r| r.kind == "Session Created"));
    // alpha was sampled as the principal before it was killed, with the
    // figures only a principal measures.
    let alpha = samples_of(&records, "alpha")
        .find(|r| r.role.as_deref() == Some("PRINCIPAL"))
        .unwrap_or_else(|| panic!("no sample of alpha: {records:#?}"));
    assert!(alpha.at_ms < failover.at_ms);
    assert_eq!(alpha.epoch, Some(1));
    assert_eq!(alpha.safety.as_deref(), Some("FULL"));
    assert!(alpha.send_rate_bytes_per_sec.is_some());
    assert!(samples_of(&records, "beta").any(|r| r.role.as_deref() == Some("MIRROR")));
    // At most one sample per partner and second (history_sample_secs = 1).
    let beta: Vec<i64> = samples_of(&records, "beta").map(|r| r.at_ms).collect();
    assert!(beta.windows(2).all(|w| w[1] - w[0] >= 1000), "{beta:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_witness_keeps_its_own_samples() {
    let pair = Pair::start(PairOptions {
        history_sample_secs: Some(1),
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let mut client = pair.control(&pair.a).await;
    let deadline = Instant::now() + SLOW;
    let records = loop {
        let records = client.history(None).await.expect("agent history");
        if records.len() >= 3 {
            break records;
        }
        assert!(Instant::now() < deadline, "too few samples: {records:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        samples_of(&records, "alpha").count() == records.len(),
        "{records:#?}"
    );
    let last = records.last().expect("a sample");
    assert_eq!(last.role.as_deref(), Some("PRINCIPAL"));
    let since = records[1].at_ms;
    let later = client.history(Some(since)).await.expect("agent history");
    assert_eq!(later.first().map(|r| r.at_ms), Some(since));
    assert!(later.iter().all(|r| r.at_ms >= since));
}
