//! `PgInstance`: a real PostgreSQL server in its own temp dir on a free port
//! of 127.0.0.1, run as the `postgres` user when the tests run as root.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use pgmirror::partner::engine::{Instance, PgBinaries, RunAs, StopMode};
use tempfile::TempDir;

use super::free_port;

/// Times a fresh port is tried when the server cannot bind the last one.
const START_ATTEMPTS: usize = 3;

pub struct PgInstance {
    pub engine: Instance,
    dir: TempDir,
}

impl PgInstance {
    /// initdb (trust auth, data checksums) and start.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like `start`, with extra postgresql.conf lines.
    pub fn start_with(settings: &[&str]) -> Self {
        Self::start_with_files(settings, &[])
    }

    /// `ssl = on` with this certificate and key (copied beside the data
    /// directory, owned by the server's user, as PostgreSQL demands of a key).
    pub fn start_with_tls(cert: &Path, key: &Path) -> Self {
        Self::start_with_files(
            &[
                "ssl = on",
                "ssl_cert_file = '../server.crt'",
                "ssl_key_file = '../server.key'",
            ],
            &[("server.crt", cert), ("server.key", key)],
        )
    }

    /// Like `start_with`, with files copied into the instance's directory
    /// first (mode 0600), which settings name relative to the data
    /// directory as `'../NAME'`.
    fn start_with_files(settings: &[&str], files: &[(&str, &Path)]) -> Self {
        let bin = PgBinaries::locate(None).expect("PostgreSQL binaries");
        let run_as = RunAs::detect().expect("an OS user to run PostgreSQL as");
        let dir = tempfile::Builder::new()
            .prefix("pgmirror-test-")
            .tempdir()
            .expect("temp dir");
        run_as.hand_over(dir.path()).expect("chown temp dir");
        for (name, source) in files {
            let copy = dir.path().join(name);
            std::fs::copy(source, &copy).expect("copy a server file");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))
                .expect("chmod a server file");
            run_as.hand_over(&copy).expect("chown a server file");
        }
        let mut engine = Instance {
            bin,
            run_as,
            data_dir: dir.path().join("data"),
            socket_dir: dir.path().to_path_buf(),
            port: free_port(),
        };
        engine.initdb("trust").expect("initdb");
        let settings: Vec<String> = settings.iter().map(|line| line.to_string()).collect();
        let mut attempt = 1;
        loop {
            engine
                .write_settings("127.0.0.1", &settings)
                .expect("write settings");
            match engine.start() {
                Ok(()) => break,
                Err(err) => assert!(attempt < START_ATTEMPTS, "PostgreSQL did not start: {err}"),
            }
            attempt += 1;
            engine.port = free_port();
        }
        PgInstance { engine, dir }
    }

    /// Password authentication over TCP: `method` (md5 or scram-sha-256)
    /// for every user but `postgres`, which stays trusted for setup.
    pub fn require_passwords(&self, method: &str) {
        let hba = format!(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 {method}\n"
        );
        std::fs::write(self.engine.data_dir.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        self.engine.reload().expect("reload PostgreSQL");
    }

    pub fn port(&self) -> u16 {
        self.engine.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.engine.port))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A libpq connection string for this server on `port`.
    pub fn conninfo(port: u16) -> String {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10")
    }

    /// A tokio-postgres client straight to the server.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect_port(self.port())
            .await
            .expect("connect to PostgreSQL")
    }

    /// The postmaster's pid, while the server runs.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.engine.postmaster_pid()
    }

    /// kill -9 of every process of the instance, like a crash.
    pub fn kill9(&self) {
        self.engine.signal_all(Signal::SIGKILL);
        assert!(
            self.engine.wait_gone(Duration::from_secs(10)),
            "postgres survived kill -9"
        );
    }

    /// SIGSTOP of every process of the instance, like a frozen machine.
    pub fn freeze(&self) {
        self.engine.signal_all(Signal::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.engine.signal_all(Signal::SIGCONT);
    }

    pub fn stop(&self) {
        self.engine.stop(StopMode::Fast).expect("pg_ctl stop");
    }
}

/// A tokio-postgres client to a server (or a link in front of one) on `port`.
pub async fn connect_port(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&PgInstance::conninfo(port), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

impl Drop for PgInstance {
    fn drop(&mut self) {
        if self.engine.postmaster_pid().is_none() {
            return;
        }
        // A frozen server cannot act on pg_ctl's signal.
        self.thaw();
        if self.engine.stop(StopMode::Immediate).is_err() {
            self.engine.signal_all(Signal::SIGKILL);
        }
        self.engine.wait_gone(Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log of {} ---\n{}",
                self.dir.path().display(),
                self.engine.log_tail(40)
            );
        }
    }
}

/// The server's current WAL insert position.
pub async fn current_lsn(client: &tokio_postgres::Client) -> pgmirror::wire::lsn::Lsn {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("pg_current_wal_lsn")
        .get(0);
    text.parse().expect("an LSN")
}

/// Waits (up to 5 s) until `count` statements like `pattern` are active on
/// the server `client` is connected to.
pub async fn await_running(client: &tokio_postgres::Client, pattern: &str, count: i64) {
    let mut running = 0;
    for _ in 0..100 {
        running = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active'",
                &[&pattern],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running == count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(running, count, "statements like {pattern:?} running");
}
