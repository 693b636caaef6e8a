//! The partner agent: runs beside one PostgreSQL instance, controls it, and
//! runs its half of the log shipper.
//!
//! `engine` drives the PostgreSQL binaries; the agent itself lands with
//! issue 3.

pub mod engine;
