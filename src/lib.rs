//! pgmirror: SQL Server-style database mirroring for PostgreSQL.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into the
//! modules here, one per process plus the shared vocabulary, so that the
//! integration tests in `tests/` drive exactly the code the binary runs.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod control;
pub mod demo;
pub mod history;
pub mod logging;
pub mod metrics;
pub mod partner;
pub mod proxy;
pub mod roles;
pub mod runtime;
pub mod shipper;
pub mod sync;
pub mod tls;
pub mod wire;
pub mod witness;
