//! Small synchronisation helpers shared by the partner agent and the
//! witness. Nothing here is async.

use std::sync::{Mutex, MutexGuard};

/// Locks a std mutex, recovering the data if a panicking holder poisoned it:
/// every value guarded with it stays consistent between statements.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
