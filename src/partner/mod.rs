//! The partner agent: runs beside one PostgreSQL instance, controls it, and
//! runs its half of the log shipper.
//!
//! `agent` holds the running agent and its endpoints, `supervisor` the
//! periodic work that keeps PostgreSQL in its role, `operations` the role
//! changes (failover, forced service, rewind), `quorum` the witness link
//! and the quorum rules, `commands` the IO-free checks
//! of what may be done now, `state` the durable session state, `engine` the PostgreSQL binaries and `telemetry` the
//! measures and warning thresholds behind the metrics.

pub mod agent;
pub mod commands;
pub mod engine;
pub mod operations;
pub mod quorum;
pub mod state;
pub mod supervisor;
pub mod telemetry;
