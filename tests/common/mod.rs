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

use std::sync::{Mutex, OnceLock};

/// A port that was free a moment ago on 127.0.0.1, below the kernel's
/// ephemeral range (so no outgoing connection takes it before it is bound)
/// and never handed out before in this test process: a port picked by
/// binding port 0 once came back twice in one pair, and its PostgreSQL could
/// not start beside the agent that held it.
pub fn free_port() -> u16 {
    static PICKER: OnceLock<Mutex<pgmirror::demo::PortPicker>> = OnceLock::new();
    PICKER
        .get_or_init(Default::default)
        .lock()
        .expect("port picker")
        .pick()
        .expect("no free port on 127.0.0.1")
}
