//! The tokio runtime a long-lived process runs on, sized by its `threads`
//! setting (the binary and the tests build it the same way).

use std::io;

use tokio::runtime::{Builder, Runtime};

/// The threads a process's runtime runs its tasks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// A work-stealing worker per core.
    PerCore,
    /// This many; one is a runtime without work stealing, whose wake-ups
    /// stay on its own thread.
    Exactly(usize),
}

/// Builds the runtime for `threads`, with IO and timers enabled.
pub fn build(threads: Threads) -> io::Result<Runtime> {
    match threads {
        Threads::PerCore => Runtime::new(),
        Threads::Exactly(1) => Builder::new_current_thread().enable_all().build(),
        Threads::Exactly(count) => Builder::new_multi_thread()
            .worker_threads(count)
            .enable_all()
            .build(),
    }
}
