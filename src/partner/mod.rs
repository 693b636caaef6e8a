//! The partner agent: runs beside one PostgreSQL instance, controls it, and
//! runs its half of the log shipper.
//!
//! `agent` holds the running agent and its endpoints, `supervisor` the
//! periodic work that keeps PostgreSQL in its role, `operations` the role
//! changes (failover, forced service, rewind), `quorum` the witness link
//! and the quorum rules, `policy` the IO-free role decisions
//! (what to do next, what a command may do now), `state` the durable
//! session state, `engine` the PostgreSQL binaries and `telemetry` the
//! measures and warning thresholds behind the metrics.

pub mod agent;
pub mod engine;
pub mod operations;
pub mod policy;
pub mod quorum;
pub mod state;
pub mod supervisor;
pub mod telemetry;
