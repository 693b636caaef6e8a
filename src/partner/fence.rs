//! The fence: PostgreSQL never outlives its agent's lease (I1). A tiny
//! process per partner (`pgmirror fence`, started by the agent in its own
//! process group, single-threaded, memory locked) reads lease deadlines
//! from a pipe and SIGKILLs the postmaster and its children when the
//! deadline passes (minus [`FENCE_MARGIN`]) or when the pipe closes
//! because the agent died. A frozen or killed agent therefore cannot leave
//! a principal acknowledging writes after the witness let the mirror take
//! over: nothing inside PostgreSQL checks a clock at commit, and SIGTERM or
//! a fast stop would still let an in-flight commit answer.
//!
//! The agent's side is [`Fence`]: it writes one line per quorum check
//! (`lease MS`, `hold` or `exit`) without ever blocking on the pipe.
//! What remains unfenced: the fence process itself frozen (SIGSTOP of it,
//! not of its group), and the whole machine paused (a VM stopped), which
//! also stops the fence's clock.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use tokio::io::AsyncWriteExt;
use tracing::{error, warn};

use crate::partner::engine::processes_of;

/// Taken off every deadline: the kill must be done when the lease ends.
pub const FENCE_MARGIN: Duration = Duration::from_millis(100);

/// Longest line the fence accepts; its lines are a few bytes.
const MAX_LINE: usize = 64;

/// What the agent tells its fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The principal's lease ends this long from now.
    Lease(Duration),
    /// No lease applies (a mirror, or no witness): only the agent's death
    /// fences PostgreSQL.
    Hold,
    /// The agent stops PostgreSQL itself and leaves: the fence just exits.
    Exit,
}

impl Order {
    pub fn line(self) -> String {
        match self {
            Order::Lease(left) => format!("lease {}\n", left.as_millis()),
            Order::Hold => "hold\n".into(),
            Order::Exit => "exit\n".into(),
        }
    }

    pub fn parse(line: &str) -> Result<Order, String> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("lease"), Some(ms), None) => ms
                .parse::<u64>()
                .map(|ms| Order::Lease(Duration::from_millis(ms)))
                .map_err(|err| format!("bad lease {ms:?}: {err}")),
            (Some("hold"), None, None) => Ok(Order::Hold),
            (Some("exit"), None, None) => Ok(Order::Exit),
            _ => Err(format!("unknown order {line:?}")),
        }
    }
}

/// The fence's one decision: when to kill, given the last order received
/// at `received` (its own clock).
pub fn deadline(order: Order, received: Instant) -> Option<Instant> {
    match order {
        // A lease past what an Instant can hold never ends (no panic).
        Order::Lease(left) => received.checked_add(left.saturating_sub(FENCE_MARGIN)),
        Order::Hold | Order::Exit => None,
    }
}

/// SIGKILL of the postmaster serving `data_dir` and of every child it has.
pub fn kill_postgres(data_dir: &Path) -> usize {
    let processes = processes_of(data_dir);
    for pid in &processes {
        let _ = signal::kill(*pid, Signal::SIGKILL);
    }
    processes.len()
}

/// `pgmirror fence`: runs until its agent says `exit`, or kills PostgreSQL
/// and exits when the pipe closes. An unreadable order is treated as the
/// agent's death.
pub fn run(data_dir: &Path) {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    if let Err(err) = mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        warn!("fence: cannot lock its memory ({err}); it may be paged out under pressure");
    }
    let stdin = std::io::stdin();
    let mut pending: Vec<u8> = Vec::new();
    let mut until: Option<Instant> = None;
    loop {
        let wait = until.map(|at| at.saturating_duration_since(Instant::now()));
        if !readable(&stdin, wait) {
            // A principal not yet granted a lease (just started) has an
            // ended one; only a kill is worth an error.
            let killed = kill_postgres(data_dir);
            if killed > 0 {
                error!(
                    processes = killed,
                    "fence: the agent's lease ended; PostgreSQL killed (I1)"
                );
            }
            until = None;
            continue;
        }
        // Unbuffered, so that poll and read agree on what is pending.
        let mut chunk = [0u8; 256];
        let read = match nix::unistd::read(stdin.as_raw_fd(), &mut chunk) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(read) => read,
            Err(_) => 0,
        };
        if read == 0 {
            let killed = kill_postgres(data_dir);
            if killed > 0 {
                error!(
                    processes = killed,
                    "fence: the agent is gone; PostgreSQL killed (I1)"
                );
            }
            return;
        }
        pending.extend_from_slice(&chunk[..read]);
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match Order::parse(String::from_utf8_lossy(&line).trim()) {
                Ok(Order::Exit) => return,
                Ok(order) => until = deadline(order, Instant::now()),
                Err(reason) => {
                    error!("fence: {reason}; killing PostgreSQL");
                    kill_postgres(data_dir);
                    return;
                }
            }
        }
        if pending.len() > MAX_LINE {
            error!("fence: an order longer than {MAX_LINE} bytes; killing PostgreSQL");
            kill_postgres(data_dir);
            return;
        }
    }
}

/// Waits until stdin has input (or closed); false when `wait` passed first.
fn readable(stdin: &std::io::Stdin, wait: Option<Duration>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = match wait {
        None => PollTimeout::NONE,
        Some(wait) => PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX),
    };
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    // Readable, hung up or failed: reading tells which.
    !matches!(poll(&mut fds, timeout), Ok(0))
}

/// The agent's handle on its fence process. Dropped with the agent: the
/// pipe closes and the fence kills PostgreSQL unless told `exit` first.
pub struct Fence {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
}

impl Fence {
    /// Starts `pgmirror fence` for `data_dir` in its own process group.
    pub fn start(data_dir: &Path) -> std::io::Result<Fence> {
        let program = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(program)
            .arg("fence")
            .arg("--data-dir")
            .arg(PathBuf::from(data_dir))
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Fence { child, stdin })
    }

    /// Sends one order; a fence that cannot take it is reported, never
    /// waited for (a full pipe means the fence is frozen).
    pub async fn order(&mut self, order: Order) {
        let Some(stdin) = &mut self.stdin else {
            return;
        };
        let line = order.line();
        let sent =
            tokio::time::timeout(Duration::from_millis(50), stdin.write_all(line.as_bytes()));
        match sent.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                error!("the fence process is gone ({err}): PostgreSQL is no longer fenced");
                self.stdin = None;
            }
            Err(_) => warn!("the fence process is not reading its orders"),
        }
    }

    /// Tells the fence to leave without killing, and waits for it.
    pub async fn exit(mut self) {
        self.order(Order::Exit).await;
        drop(self.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_trip_and_garbage_is_refused() {
        for order in [
            Order::Lease(Duration::from_millis(2500)),
            Order::Hold,
            Order::Exit,
        ] {
            assert_eq!(Order::parse(order.line().trim()), Ok(order));
        }
        assert!(Order::parse("lease").is_err());
        assert!(Order::parse("lease -1").is_err());
        assert!(Order::parse("lease 1 2").is_err());
        assert!(Order::parse("kill everything").is_err());
    }

    #[test]
    fn the_deadline_is_the_lease_minus_the_margin_and_hold_has_none() {
        let now = Instant::now();
        assert_eq!(
            deadline(Order::Lease(Duration::from_secs(2)), now),
            Some(now + Duration::from_secs(2) - FENCE_MARGIN)
        );
        assert_eq!(deadline(Order::Lease(Duration::ZERO), now), Some(now));
        assert_eq!(deadline(Order::Hold, now), None);
    }
}
