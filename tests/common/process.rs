//! `Pgmirror`: a `pgmirror` subcommand started from the built binary, its
//! output captured in a file that is shown when the test fails, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary cargo built for this test run.
pub const BINARY: &str = env!("CARGO_BIN_EXE_pgmirror");

pub struct Pgmirror {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Pgmirror {
    /// Starts `pgmirror ARGS` with its stdout and stderr in `dir/NAME.log`.
    pub fn spawn(name: &str, dir: &Path, args: &[&str]) -> Pgmirror {
        Self::start(Command::new(BINARY), name, dir, args)
    }

    /// As [`Pgmirror::spawn`], in a session of its own (`setsid`), as a
    /// service manager starts a daemon: with the kernel's autogroup
    /// scheduling it then gets a CPU share of its own instead of sharing the
    /// caller's (and pgbench's). Benchmarks use it; tests do not, so that
    /// Ctrl-C still reaches what they start.
    pub fn spawn_in_own_session(name: &str, dir: &Path, args: &[&str]) -> Pgmirror {
        let mut setsid = Command::new("setsid");
        // Not a process group leader, so setsid execs in place: the pid is
        // the agent's.
        setsid.arg(BINARY);
        Self::start(setsid, name, dir, args)
    }

    fn start(mut command: Command, name: &str, dir: &Path, args: &[&str]) -> Pgmirror {
        let log = dir.join(format!("{name}.log"));
        // Appended to, so a restarted process keeps its earlier output.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("process log file");
        let child = command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start pgmirror");
        Pgmirror {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pgmirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pgmirror {} output ---\n{}", self.name, self.output());
        }
    }
}

/// Runs `pgmirror ARGS` to completion (at most a minute) and returns its
/// exit code and combined output.
pub fn run(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut process = Pgmirror::spawn("run", dir.path(), args);
    let status = process
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("pgmirror {args:?} did not exit"));
    (status.code(), process.output())
}

/// Every process below `pid`, read from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let parent = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(child, _)| *child),
        );
        index += 1;
    }
    found.split_off(1)
}
