//! The supervisor: twice a second it observes the local PostgreSQL, asks
//! the policy what to do (`policy::tick`) and carries it out, under the
//! agent's `operations` lock so that it never overlaps a command. A failing
//! tick is logged and retried on the next one. After every tick the
//! agent's metrics and warning thresholds are updated and, while the
//! session has no witness to keep them, a history sample is offered to the
//! agent's own history (`crate::history`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::history::{self, History, Owner, Retention, Sample};
use crate::partner::actions::{carry_out, observe_postgres, OpError};
use crate::partner::agent::Agent;
use crate::partner::policy;
use crate::partner::telemetry::Telemetry;

const TICK: Duration = Duration::from_millis(500);

pub async fn supervise(agent: Arc<Agent>) {
    let mut telemetry = Telemetry::new(agent.config.warnings);
    let history = open_history(&agent);
    crate::metrics::register_failovers(&agent.config.session, &agent.config.name);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = agent.shutdown.cancelled() => return,
        }
        let _guard = agent.operations.lock().await;
        if agent.shutdown.is_cancelled() {
            return;
        }
        if let Err(err) = tick(&agent).await {
            warn!("supervisor: {err}");
            agent.set_error(Some(err.to_string()));
        }
        telemetry.record(&agent.status(), Instant::now());
        if let Some(history) = history.as_ref().filter(|_| agent.state().witness.is_none()) {
            history.offer(Sample::of(&agent.report_view(), history::now_ms()));
        }
    }
}

/// The agent's own history; without it the agent runs on, unsampled.
fn open_history(agent: &Agent) -> Option<History> {
    let config = &agent.config;
    let retention = Retention::new(config.history_sample_secs, config.history_retention_days);
    let path = config.state_dir.join(history::AGENT_FILE);
    History::open(&path, Owner::Agent, retention)
        .inspect_err(|err| warn!("no history samples: {err}"))
        .ok()
}

/// One decision of the policy, carried out. The caller holds `operations`.
pub async fn tick(agent: &Arc<Agent>) -> Result<(), OpError> {
    let observed = agent.observation(observe_postgres(agent).await);
    let state = agent.state();
    let decision = agent.decide(|memory| policy::tick(&state, memory, &observed));
    carry_out(agent, decision).await.map(drop)
}
