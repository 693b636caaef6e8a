//! Engine control: finding the PostgreSQL binaries and running them against
//! one data directory (initdb, pg_ctl start/stop, signals to the whole
//! instance).
//!
//! PostgreSQL refuses to run as root, so when our euid is 0 every server
//! binary runs as the `postgres` OS user and the directories it writes are
//! handed to that user. Everything here blocks; async callers use
//! `spawn_blocking`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};

use crate::wire::lsn::Lsn;
use nix::unistd::{Gid, Pid, Uid, User};

/// The OS user that runs PostgreSQL when we are root.
pub const POSTGRES_OS_USER: &str = "postgres";

/// pgmirror's own settings file in the data directory, included last from
/// postgresql.conf.
pub const SETTINGS_FILE: &str = "pgmirror.conf";

/// How long pg_ctl may wait for a start or stop.
const PG_CTL_WAIT_SECS: u32 = 120;

/// How long a server started without waiting is watched for opening its
/// sockets; a server that is merely slow is left to go on after that.
const LISTEN_WATCH: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "no PostgreSQL server binaries found (looked in PGMIRROR_PG_BIN, PATH, `pg_config --bindir` \
         and /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install postgresql`, \
         or set PGMIRROR_PG_BIN"
    )]
    BinariesNotFound,
    #[error("running as root but there is no `{POSTGRES_OS_USER}` OS user to run PostgreSQL as")]
    NoPostgresUser,
    #[error("{program} failed to start: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("PostgreSQL exited while starting, before it listened (is its port {port} taken?); its log:\n{log}")]
    ExitedAtStart { port: u16, log: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot hand to the {POSTGRES_OS_USER} user: {source}")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The directory holding a PostgreSQL installation's server binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    pub dir: PathBuf,
}

impl PgBinaries {
    /// The configured directory, or the first of: `$PGMIRROR_PG_BIN`, the
    /// directory of `initdb` on PATH, `pg_config --bindir`, the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn locate(configured: Option<&Path>) -> Result<Self, EngineError> {
        let candidates = configured
            .map(Path::to_path_buf)
            .into_iter()
            .chain(std::env::var_os("PGMIRROR_PG_BIN").map(PathBuf::from))
            .chain(initdb_on_path())
            .chain(pg_config_bindir())
            .chain(newest_debian_bindir());
        for dir in candidates {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(PgBinaries { dir });
            }
        }
        Err(EngineError::BinariesNotFound)
    }

    pub fn path(&self, program: &str) -> PathBuf {
        self.dir.join(program)
    }
}

fn initdb_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("initdb"))
        .find(|candidate| candidate.is_file())
        .and_then(|initdb| initdb.canonicalize().ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    output
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

fn newest_debian_bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// Who PostgreSQL runs as: ourselves, or `postgres` when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    Myself,
    User { uid: Uid, gid: Gid },
}

impl RunAs {
    pub fn detect() -> Result<Self, EngineError> {
        if !Uid::effective().is_root() {
            return Ok(RunAs::Myself);
        }
        let user = User::from_name(POSTGRES_OS_USER)
            .ok()
            .flatten()
            .ok_or(EngineError::NoPostgresUser)?;
        Ok(RunAs::User {
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// A command for `program` that runs as this user.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        if let RunAs::User { uid, gid } = *self {
            use std::os::unix::process::CommandExt;
            command.uid(uid.as_raw()).gid(gid.as_raw());
            command.env("HOME", std::env::temp_dir());
        }
        command
    }

    /// Makes `path` writable by the user PostgreSQL runs as.
    pub fn hand_over(&self, path: &Path) -> Result<(), EngineError> {
        if let RunAs::User { uid, gid } = *self {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|source| {
                EngineError::Chown {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// Runs a command to completion and turns a non-zero exit into an error
/// carrying its stderr.
pub fn run(mut command: Command) -> Result<Output, EngineError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|source| EngineError::Spawn {
        program: program.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(EngineError::Failed {
            program,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// What `pg_controldata` says about a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: u64,
    pub checkpoint: Lsn,
    /// e.g. "in production", "shut down", "in archive recovery".
    pub state: String,
}

/// How pg_ctl stops a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Roll back open transactions, disconnect clients, checkpoint.
    Fast,
    /// Abort without a checkpoint; crash recovery runs at next start.
    Immediate,
}

/// One PostgreSQL instance: a data directory served on 127.0.0.1:`port`
/// with its unix socket in `socket_dir`.
#[derive(Debug, Clone)]
pub struct Instance {
    pub bin: PgBinaries,
    pub run_as: RunAs,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl Instance {
    /// `initdb` with data checksums (pg_rewind needs them or wal_log_hints),
    /// and the include line for pgmirror's own settings file.
    pub fn initdb(&self, auth: &str) -> Result<(), EngineError> {
        let mut command = self.run_as.command(self.bin.path("initdb"));
        command
            .arg("--data-checksums")
            .arg("--no-sync")
            .args([
                "-U",
                POSTGRES_OS_USER,
                "-A",
                auth,
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg("-D")
            .arg(&self.data_dir);
        run(command)?;
        append(
            &self.data_dir.join("postgresql.conf"),
            &format!("\n# Settings managed by pgmirror; they override the ones above.\ninclude_if_exists = '{SETTINGS_FILE}'\n"),
        )
    }

    /// Whether the data directory holds a cluster.
    pub fn has_cluster(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    /// Rewrites pgmirror's settings file: where the server listens, plus
    /// `extra` lines. pg_basebackup and pg_rewind copy the peer's file, so
    /// it is rewritten before every start.
    pub fn write_settings(
        &self,
        listen_addresses: &str,
        extra: &[String],
    ) -> Result<(), EngineError> {
        let mut settings = format!(
            "# Written by pgmirror before every start; edits are lost.\nport = {}\nlisten_addresses = '{}'\nunix_socket_directories = '{}'\n",
            self.port,
            listen_addresses,
            self.socket_dir.display()
        );
        for line in extra {
            let _ = writeln!(settings, "{line}");
        }
        let path = self.data_dir.join(SETTINGS_FILE);
        std::fs::write(&path, settings).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        self.run_as.hand_over(&path)?;
        let conf = self.data_dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).map_err(|source| EngineError::Io {
            path: conf.clone(),
            source,
        })?;
        if !text.contains(SETTINGS_FILE) {
            append(&conf, &format!("\ninclude_if_exists = '{SETTINGS_FILE}'\n"))?;
        }
        Ok(())
    }

    /// Creates or removes `standby.signal`, which makes the server start as a standby.
    pub fn set_standby(&self, standby: bool) -> Result<(), EngineError> {
        let path = self.data_dir.join("standby.signal");
        let result = if standby {
            std::fs::write(&path, "")
                .and_then(|_| self.run_as.hand_over(&path).map_err(std::io::Error::other))
        } else {
            match std::fs::remove_file(&path) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        result.map_err(|source| EngineError::Io { path, source })
    }

    /// Tells a running server to reread its configuration.
    pub fn reload(&self) -> Result<(), EngineError> {
        let mut command = self.run_as.command(self.bin.path("pg_ctl"));
        command.arg("reload").arg("-D").arg(&self.data_dir);
        run(command).map(drop)
    }

    /// Ends recovery on a standby and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), EngineError> {
        let mut command = self.run_as.command(self.bin.path("pg_ctl"));
        command
            .args(["promote", "-w", "-t", &PG_CTL_WAIT_SECS.to_string(), "-D"])
            .arg(&self.data_dir);
        run(command).map(drop)
    }

    /// Copies the principal reachable at `conninfo` into the (absent or
    /// empty) data directory, streaming WAL through replication `slot`.
    pub fn base_backup(&self, conninfo: &str, slot: &str) -> Result<(), EngineError> {
        let mut command = self.run_as.command(self.bin.path("pg_basebackup"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg(format!("--dbname={conninfo}"))
            .args(["-X", "stream", "-S", slot, "-c", "fast", "--no-password"]);
        run(command).map(drop)
    }

    /// CHECKPOINT on the server at `conninfo`. A newly promoted source
    /// records its new timeline in its control file only at its first
    /// checkpoint after promotion; before that, pg_rewind reads both copies
    /// on one timeline, says "no rewind required" and leaves this copy
    /// diverged (its standby then stops on "record with incorrect
    /// prev-link"). So [`Instance::rewind`] runs after this.
    pub fn checkpoint_source(&self, conninfo: &str) -> Result<(), EngineError> {
        let mut checkpoint = self.run_as.command(self.bin.path("psql"));
        checkpoint.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            "CHECKPOINT",
        ]);
        run(checkpoint).map(drop)
    }

    /// Rolls this (stopped) data directory back to where it diverged from
    /// the server at `conninfo`, so it can follow that server's timeline.
    /// Prints "no rewind required" and changes nothing when it has not diverged.
    /// pg_rewind syncs the directory to disk before it returns, so a copy
    /// recorded as rewound is one that survives a crash.
    pub fn rewind(&self, conninfo: &str) -> Result<String, EngineError> {
        let mut command = self.run_as.command(self.bin.path("pg_rewind"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg(format!("--source-server={conninfo}"));
        run(command).map(|output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text
        })
    }

    /// Facts from `pg_controldata`: the system identifier and the last checkpoint.
    pub fn control_data(&self) -> Result<ControlData, EngineError> {
        let mut command = self.run_as.command(self.bin.path("pg_controldata"));
        command.arg("-D").arg(&self.data_dir);
        let output = run(command)?;
        let text = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| rest.trim_start_matches(':').trim().to_string())
        };
        let bad = |what: &str| EngineError::Failed {
            program: "pg_controldata".into(),
            status: output.status,
            stderr: format!("no {what} in its output"),
        };
        let system_identifier = field("Database system identifier")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("system identifier"))?;
        let checkpoint = field("Latest checkpoint location")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("checkpoint location"))?;
        let state = field("Database cluster state").ok_or_else(|| bad("cluster state"))?;
        Ok(ControlData {
            system_identifier,
            checkpoint,
            state,
        })
    }

    /// The major version of the binaries (e.g. 15).
    pub fn major_version(&self) -> Result<u32, EngineError> {
        let mut command = Command::new(self.bin.path("pg_ctl"));
        command.arg("--version");
        let output = run(command)?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.split_whitespace()
            .last()
            .and_then(|version| version.split('.').next())
            .and_then(|major| major.parse().ok())
            .ok_or_else(|| EngineError::Failed {
                program: "pg_ctl --version".into(),
                status: output.status,
                stderr: format!("unexpected output {text:?}"),
            })
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Result<(), EngineError> {
        self.start_with(true)
    }

    /// Starts the server; with `wait`, until it accepts connections. A
    /// standby is started without waiting: it accepts connections only once
    /// it has replayed to a consistent point, which needs the stream.
    pub fn start_with(&self, wait: bool) -> Result<(), EngineError> {
        let mut command = self.run_as.command(self.bin.path("pg_ctl"));
        command
            .args([
                "start",
                if wait { "-w" } else { "-W" },
                "-t",
                &PG_CTL_WAIT_SECS.to_string(),
                "-D",
            ])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.log_file())
            // pg_ctl's child keeps stdout open; without this output() would
            // wait for the server to exit.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let log_before = std::fs::metadata(self.log_file()).map_or(0, |meta| meta.len());
        let status = command.status().map_err(|source| EngineError::Spawn {
            program: "pg_ctl".into(),
            source,
        })?;
        if status.success() {
            if wait {
                Ok(())
            } else {
                self.watch_listening(log_before)
            }
        } else {
            Err(EngineError::Failed {
                program: "pg_ctl start".into(),
                status,
                stderr: self.log_tail(20),
            })
        }
    }

    /// After a start without waiting: Ok once the postmaster has opened
    /// its sockets (its lock file has the status line, written after
    /// them), an error when it exited first with a FATAL in its log (a
    /// taken port, for one), and Ok when it is still starting at the end of
    /// [`LISTEN_WATCH`].
    fn watch_listening(&self, log_before: u64) -> Result<(), EngineError> {
        let deadline = Instant::now() + LISTEN_WATCH;
        while Instant::now() < deadline {
            let lock_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid"));
            let running = self.postmaster_pid().is_some();
            if running && lock_file.is_ok_and(|text| text.lines().count() >= 8) {
                return Ok(());
            }
            let log = std::fs::read(self.log_file()).unwrap_or_default();
            let since_start = log.get(log_before as usize..).unwrap_or_default();
            let since_start = String::from_utf8_lossy(since_start);
            if !running && since_start.contains("FATAL") {
                return Err(EngineError::ExitedAtStart {
                    port: self.port,
                    log: self.log_tail(10),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn stop(&self, mode: StopMode) -> Result<(), EngineError> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let mut command = self.run_as.command(self.bin.path("pg_ctl"));
        command
            .args([
                "stop",
                "-w",
                "-t",
                &PG_CTL_WAIT_SECS.to_string(),
                "-m",
                mode,
                "-D",
            ])
            .arg(&self.data_dir);
        run(command).map(drop)
    }

    /// The server's own log, written by pg_ctl; beside the socket, in a
    /// directory the server's user owns.
    pub fn log_file(&self) -> PathBuf {
        self.socket_dir.join("postgresql.log")
    }

    /// The last `lines` lines of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The postmaster's pid while a server runs on this data directory.
    pub fn postmaster_pid(&self) -> Option<Pid> {
        postmaster_of(&self.data_dir)
    }

    /// The postmaster and all its children (backends, walsender, ...).
    pub fn processes(&self) -> Vec<Pid> {
        processes_of(&self.data_dir)
    }

    /// Sends `sig` to every process of the instance at once, the way a crash
    /// or a frozen machine hits all of them.
    pub fn signal_all(&self, sig: Signal) {
        for pid in self.processes() {
            let _ = signal::kill(pid, sig);
        }
    }

    /// Waits until no process of the instance is left, up to `limit`.
    pub fn wait_gone(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.postmaster_pid().is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// The pid of the postmaster serving `data_dir`, while it runs.
pub fn postmaster_of(data_dir: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid = Pid::from_raw(text.lines().next()?.trim().parse().ok()?);
    is_alive(pid).then_some(pid)
}

/// The postmaster serving `data_dir` and all its children.
pub fn processes_of(data_dir: &Path) -> Vec<Pid> {
    let Some(postmaster) = postmaster_of(data_dir) else {
        return Vec::new();
    };
    let mut pids = vec![postmaster];
    pids.extend(children_of(postmaster));
    pids
}

fn append(path: &Path, text: &str) -> Result<(), EngineError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `pid` runs; a zombie waiting for its parent to reap it does not.
fn is_alive(pid: Pid) -> bool {
    signal::kill(pid, None).is_ok()
        && proc_stat_fields(pid).is_none_or(|fields| fields.first() != Some(&"Z".to_string()))
}

/// The fields of /proc/PID/stat after the command name: state, ppid, ...
/// (the name may hold spaces and parentheses, so it is skipped by its last ')').
fn proc_stat_fields(pid: Pid) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_string).collect())
}

/// Direct children of `parent`, read from /proc.
fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid = Pid::from_raw(entry.ok()?.file_name().to_str()?.parse().ok()?);
            let ppid: i32 = proc_stat_fields(pid)?.get(1)?.parse().ok()?;
            (ppid == parent.as_raw()).then_some(pid)
        })
        .collect()
}
