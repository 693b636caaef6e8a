//! The integration-test harness shared by every file in `tests/`: real
//! PostgreSQL instances, cuttable TCP links and `pgmirror` processes, each a
//! handle that cleans up after itself when dropped, even when the test panics.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod bank;
pub mod cluster;
pub mod faults;
pub mod http;
pub mod link;
pub mod pg;
pub mod pooled_pair;
pub mod probe;
pub mod process;
pub mod proxy;

pub use link::Link;
pub use pg::PgInstance;
pub use process::Pgmirror;

use std::net::TcpListener;

/// A port that was free a moment ago on 127.0.0.1. Callers that bind it
/// later retry on a collision with another test.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}
