//! `Pair`: two `pgmirror partner` agents, each beside its own PostgreSQL, in
//! one temp dir with generated certificates, optionally with a cuttable
//! [`Link`] on each agent-to-agent path. Every agent and the witness export
//! metrics on a port of their own; every agent serves its health endpoints
//! on another. Dropping it kills the agents and the
//! servers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgmirror::config::{PartnerConfig, TlsMode};
use pgmirror::control::{
    Command, ControlClient, ControlError, HistoryRecord, MirroringStatus, RoleRow,
};
use pgmirror::partner::engine::{Instance, PgBinaries, RunAs, StopMode};
use pgmirror::roles::Safety;
use pgmirror::tls::{generate_pki, tls_config_for, tls_section, EndpointTls};
use tempfile::TempDir;

use super::{free_port, Link, Pgmirror};

/// Generous bound for anything a healthy pair does (setup, failover, resync).
pub const SLOW: Duration = Duration::from_secs(90);

/// One partner: its config, its agent process and its PostgreSQL.
pub struct Partner {
    pub name: String,
    pub config: PartnerConfig,
    /// The agent's Prometheus endpoint, `http://127.0.0.1:{metrics_port}/metrics`.
    pub metrics_port: u16,
    /// The agent's health endpoints, `http://127.0.0.1:{health_port}/primary`.
    pub health_port: u16,
    config_path: PathBuf,
    dir: PathBuf,
    pub agent: Option<Pgmirror>,
    pub engine: Instance,
    /// Start the agent in a session of its own ([`PairOptions::own_sessions`]).
    own_session: bool,
}

impl Partner {
    pub fn start_agent(&mut self) {
        let config = self.config_path.to_str().expect("utf-8 path").to_string();
        let spawn = if self.own_session {
            Pgmirror::spawn_in_own_session
        } else {
            Pgmirror::spawn
        };
        self.agent = Some(spawn(
            &self.name,
            &self.dir,
            &["partner", "--config", &config],
        ));
    }

    /// kill -9 of the agent, the tools it runs (pg_rewind, pg_basebackup)
    /// and every PostgreSQL process: the server died.
    pub fn kill9(&mut self) {
        self.engine.signal_all(Signal::SIGKILL);
        if let Some(agent) = &mut self.agent {
            for child in super::process::descendants(agent.pid()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child as i32),
                    Signal::SIGKILL,
                );
            }
            agent.kill9();
        }
        assert!(self.engine.wait_gone(Duration::from_secs(10)));
    }

    pub fn pg_port(&self) -> u16 {
        self.config.postgres.port
    }

    /// A client straight to this partner's PostgreSQL.
    pub async fn sql(&self) -> tokio_postgres::Client {
        super::pg::connect_port(self.pg_port())
            .await
            .expect("connect to partner PostgreSQL")
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The agent's output is shown by its process handle; the
            // server's log says why a standby would not stream.
            eprintln!(
                "--- {} PostgreSQL log (last 30 lines) ---\n{}",
                self.name,
                self.engine.log_tail(30)
            );
            // A standby that loops on one record hides, beyond the tail,
            // which timeline and start point its walreceiver asked for.
            let log = std::fs::read_to_string(self.engine.log_file()).unwrap_or_default();
            let streaming: Vec<&str> = log
                .lines()
                .filter(|line| {
                    ["walreceiver", "timeline", "streaming", "FATAL", "redo"]
                        .iter()
                        .any(|word| line.contains(word))
                })
                .collect();
            eprintln!(
                "--- {} PostgreSQL log, replication lines (last 60) ---\n{}",
                self.name,
                streaming[streaming.len().saturating_sub(60)..].join("\n")
            );
        }
        if let Some(agent) = &mut self.agent {
            agent.kill9();
        }
        if self.engine.postmaster_pid().is_some() {
            self.engine.signal_all(Signal::SIGCONT);
            if self.engine.stop(StopMode::Immediate).is_err() {
                self.engine.signal_all(Signal::SIGKILL);
            }
            self.engine.wait_gone(Duration::from_secs(10));
        }
    }
}

pub struct PairOptions {
    pub safety: Safety,
    pub timeout: u64,
    pub tls: bool,
    /// Put a cuttable link on each agent-to-agent path.
    pub links: bool,
    /// Put a cuttable link in front of each partner's PostgreSQL for its
    /// clients: the agents advertise the link's address, so the proxy
    /// reaches the servers through it.
    pub client_links: bool,
    /// Give the mirror a data directory of its own (another database).
    pub foreign_mirror: bool,
    /// Start a witness (`Some(existing)` shares another pair's witness).
    pub witness: WitnessChoice,
    pub session: &'static str,
    /// The body of each partner's `[warnings]` section (spec 64).
    pub warnings: &'static str,
    /// `history_sample_secs` of the witness and the partners, when not the
    /// default.
    pub history_sample_secs: Option<u64>,
    /// Each partner's `[postgres] bin_dir`, when not found as usual.
    pub bin_dir: Option<PathBuf>,
    /// Start each agent in a session of its own, as a service manager would
    /// (benchmarks: see [`Pgmirror::spawn_in_own_session`]).
    pub own_sessions: bool,
}

#[derive(Clone, Default)]
pub enum WitnessChoice {
    #[default]
    None,
    /// A witness of this pair's own.
    Own,
    /// Another pair's witness, by port.
    Shared(u16),
}

/// A `pgmirror witness` process.
pub struct WitnessProcess {
    pub port: u16,
    /// The witness's Prometheus endpoint.
    pub metrics_port: u16,
    config_path: PathBuf,
    dir: PathBuf,
    pub process: Option<Pgmirror>,
}

impl WitnessProcess {
    /// Writes a witness config in `dir` (free ports, its own store) and
    /// starts it.
    pub fn launch(dir: &Path, tls: &str) -> WitnessProcess {
        Self::launch_at(dir, tls, free_port())
    }

    /// As [`WitnessProcess::launch`], listening on `port`.
    pub fn launch_at(dir: &Path, tls: &str, port: u16) -> WitnessProcess {
        Self::launch_with(dir, tls, port, "")
    }

    /// As [`WitnessProcess::launch_at`], with `settings` (top-level lines)
    /// added to the config.
    pub fn launch_with(dir: &Path, tls: &str, port: u16, settings: &str) -> WitnessProcess {
        let metrics_port = free_port();
        std::fs::create_dir_all(dir).expect("witness dir");
        let config_path = dir.join("witness.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\
                 store = {:?}\n{settings}\n{tls}",
                dir.join("witness.sqlite")
            ),
        )
        .expect("witness config");
        let mut witness = WitnessProcess {
            port,
            metrics_port,
            config_path,
            dir: dir.to_path_buf(),
            process: None,
        };
        witness.start();
        witness
    }

    pub fn endpoint(&self) -> pgmirror::config::Endpoint {
        pgmirror::config::Endpoint {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    pub fn start(&mut self) {
        let config = self.config_path.to_str().expect("utf-8 path").to_string();
        self.process = Some(Pgmirror::spawn(
            "witness",
            &self.dir,
            &["witness", "--config", &config],
        ));
    }

    pub fn kill9(&mut self) {
        if let Some(process) = &mut self.process {
            process.kill9();
        }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("witness.sqlite")
    }
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            safety: Safety::Full,
            timeout: 10,
            tls: true,
            links: false,
            foreign_mirror: false,
            client_links: false,
            witness: WitnessChoice::None,
            session: "shop",
            warnings: "",
            history_sample_secs: None,
            bin_dir: None,
            own_sessions: false,
        }
    }
}

pub struct Pair {
    pub a: Partner,
    pub b: Partner,
    /// a -> b and b -> a, when asked for.
    pub links: Option<(Link, Link)>,
    /// a -> witness and b -> witness, when asked for with a witness.
    pub witness_links: Option<(Link, Link)>,
    /// Clients -> a's PostgreSQL and -> b's, when asked for.
    pub client_links: Option<(Link, Link)>,
    pub witness: Option<WitnessProcess>,
    tls: EndpointTls,
    /// Whether the endpoints run TLS.
    tls_on: bool,
    /// The generated certificates (`ca.crt`, `alpha`, `beta`, `tester`).
    pub pki: PathBuf,
    // Last: removed after the partners are gone.
    _dir: TempDir,
}

impl Pair {
    /// Starts alpha (initial principal) and beta (initial mirror).
    pub fn start(options: PairOptions) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("pgmirror-pair-")
            .tempdir()
            .expect("temp dir");
        let run_as = RunAs::detect().expect("run-as user");
        run_as.hand_over(dir.path()).expect("chown pair dir");
        let pki = dir.path().join("pki");
        generate_pki(&pki, &["alpha", "beta", "witness", "tester"]).expect("certificates");
        let endpoints = [free_port(), free_port()];
        let links = options.links.then(|| {
            (
                Link::new(([127, 0, 0, 1], endpoints[1]).into()),
                Link::new(([127, 0, 0, 1], endpoints[0]).into()),
            )
        });
        let peer_ports = match &links {
            Some((to_b, to_a)) => [to_b.port(), to_a.port()],
            None => [endpoints[1], endpoints[0]],
        };
        let history_line = options
            .history_sample_secs
            .map(|secs| format!("history_sample_secs = {secs}\n"))
            .unwrap_or_default();
        let witness = match options.witness {
            WitnessChoice::Own => Some(WitnessProcess::launch_with(
                &dir.path().join("witness"),
                &tls_section(&pki, "witness", options.tls),
                free_port(),
                &history_line,
            )),
            _ => None,
        };
        let witness_port = match (&options.witness, &witness) {
            (WitnessChoice::Shared(port), _) => Some(*port),
            (_, Some(witness)) => Some(witness.port),
            _ => None,
        };
        let witness_links = witness_port.filter(|_| options.links).map(|port| {
            (
                Link::new(([127, 0, 0, 1], port).into()),
                Link::new(([127, 0, 0, 1], port).into()),
            )
        });
        let witness_ports = match (&witness_links, witness_port) {
            (Some((a, b)), _) => [Some(a.port()), Some(b.port())],
            (None, port) => [port, port],
        };
        let pg_ports = [free_port(), free_port()];
        let client_links = options.client_links.then(|| {
            (
                Link::new(([127, 0, 0, 1], pg_ports[0]).into()),
                Link::new(([127, 0, 0, 1], pg_ports[1]).into()),
            )
        });
        let advertise_lines = match &client_links {
            Some((a, b)) => {
                [a.port(), b.port()].map(|port| format!("advertise = \"127.0.0.1:{port}\"\n"))
            }
            None => [String::new(), String::new()],
        };
        let bin_line = options
            .bin_dir
            .as_ref()
            .map(|dir| format!("bin_dir = {dir:?}\n"))
            .unwrap_or_default();
        let make = |index: usize, name: &str, role: &str| {
            let partner_dir = dir.path().join(name);
            std::fs::create_dir_all(&partner_dir).expect("partner dir");
            let tls = tls_section(&pki, name, options.tls);
            let witness_line = witness_ports[index]
                .map(|port| format!("witness = \"127.0.0.1:{port}\"\n"))
                .unwrap_or_default();
            let metrics_port = free_port();
            let health_port = free_port();
            let text = format!(
                "session = \"{}\"\n{witness_line}{history_line}metrics = \"127.0.0.1:{metrics_port}\"\n\
                 health = \"127.0.0.1:{health_port}\"\nname = \"{name}\"\ninitial_role = \"{role}\"\n\
                 listen = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\nstate_dir = {:?}\n\
                 safety = \"{}\"\ntimeout = {}\n\n[postgres]\n{bin_line}data_dir = {:?}\nport = {}\n{}\n{tls}\n[warnings]\n{}\n",
                options.session,
                endpoints[index],
                peer_ports[index],
                partner_dir.join("agent"),
                match options.safety {
                    Safety::Full => "full",
                    Safety::Off => "off",
                },
                options.timeout,
                partner_dir.join("data"),
                pg_ports[index],
                advertise_lines[index],
                options.warnings,
            );
            let config_path = partner_dir.join("partner.toml");
            std::fs::write(&config_path, text).expect("write config");
            let config: PartnerConfig = pgmirror::config::load(&config_path).expect("valid config");
            let engine = Instance {
                bin: PgBinaries::locate(None).expect("PostgreSQL binaries"),
                run_as,
                data_dir: config.postgres.data_dir.clone(),
                socket_dir: config.state_dir.join("run"),
                port: config.postgres.port,
            };
            if options.foreign_mirror && role == "mirror" {
                run_as.hand_over(&partner_dir).expect("chown partner dir");
                engine.initdb("trust").expect("initdb of a foreign mirror");
            }
            let mut partner = Partner {
                name: name.to_string(),
                config,
                metrics_port,
                health_port,
                config_path,
                dir: partner_dir,
                agent: None,
                engine,
                own_session: options.own_sessions,
            };
            partner.start_agent();
            partner
        };
        let a = make(0, "alpha", "principal");
        let b = make(1, "beta", "mirror");
        let tester = if options.tls {
            tls_config_for(&pki, "tester")
        } else {
            pgmirror::config::TlsConfig {
                mode: TlsMode::Off,
                ..Default::default()
            }
        };
        Pair {
            a,
            b,
            links,
            witness_links,
            client_links,
            witness,
            tls: EndpointTls::from_config(&tester).expect("tester TLS"),
            tls_on: options.tls,
            pki,
            _dir: dir,
        }
    }

    pub async fn control(&self, partner: &Partner) -> ControlClient {
        let deadline = Instant::now() + SLOW;
        loop {
            match ControlClient::connect(&partner.config.listen_endpoint(), &self.tls).await {
                Ok(client) => return client,
                Err(err) if Instant::now() > deadline => {
                    panic!("control connection to {}: {err}", partner.name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub async fn status(&self, partner: &Partner) -> MirroringStatus {
        self.control(partner).await.status().await.expect("status")
    }

    /// Ok is the agent's message; a refusal is `ControlError::Refused`.
    pub async fn command(
        &self,
        partner: &Partner,
        command: Command,
    ) -> Result<String, ControlError> {
        self.control(partner).await.command(command).await
    }

    /// Polls `partner`'s status until `ready` holds, up to `limit`.
    pub async fn wait_for(
        &self,
        partner: &Partner,
        what: &str,
        limit: Duration,
        ready: impl Fn(&MirroringStatus) -> bool,
    ) -> MirroringStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(mut client) =
                ControlClient::connect(&partner.config.listen_endpoint(), &self.tls).await
            {
                if let Ok(status) = client.status().await {
                    if ready(&status) {
                        return status;
                    }
                    if Instant::now() > deadline {
                        panic!(
                            "{} never became {what}; last status: {status:#?}",
                            partner.name
                        );
                    }
                }
            }
            assert!(
                Instant::now() <= deadline,
                "{} never became {what} (unreachable)",
                partner.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Black-holes both agent-to-agent links (the pair needs `links`).
    pub fn cut_partners(&self) {
        let (to_b, to_a) = self.links.as_ref().expect("a pair with links");
        to_b.black_hole();
        to_a.black_hole();
    }

    pub fn heal_partners(&self) {
        let (to_b, to_a) = self.links.as_ref().expect("a pair with links");
        to_b.heal();
        to_a.heal();
    }

    /// A second witness for this pair (to move the session to).
    pub fn another_witness(&self) -> WitnessProcess {
        let dir = self.pki.parent().expect("pair dir").join("witness-2");
        WitnessProcess::launch(&dir, &tls_section(&self.pki, "witness", self.tls_on))
    }

    /// A witness with an empty store of its own on `port`.
    pub fn witness_at(&self, port: u16) -> WitnessProcess {
        let dir = self
            .pki
            .parent()
            .expect("pair dir")
            .join(format!("witness-{port}"));
        WitnessProcess::launch_at(&dir, &tls_section(&self.pki, "witness", self.tls_on), port)
    }

    /// The witness's row for this pair's session.
    pub async fn witness_row(&self) -> Option<RoleRow> {
        self.row_at(&self.witness.as_ref()?.endpoint()).await
    }

    /// The history view's lines of this pair's session at its witness.
    pub async fn witness_history(&self) -> Vec<HistoryRecord> {
        let witness = self.witness.as_ref().expect("a pair with a witness");
        let mut client = ControlClient::connect(&witness.endpoint(), &self.tls)
            .await
            .expect("witness connection");
        client
            .witness_history(Some(self.a.config.session.clone()), None)
            .await
            .expect("witness history")
    }

    /// The row for this pair's session at the witness at `endpoint`.
    pub async fn row_at(&self, endpoint: &pgmirror::config::Endpoint) -> Option<RoleRow> {
        let mut client = ControlClient::connect(endpoint, &self.tls).await.ok()?;
        client
            .sessions()
            .await
            .ok()?
            .into_iter()
            .find(|row| row.session == self.a.config.session)
    }

    /// Waits until the witness records the session as synchronized: the
    /// precondition of automatic failover.
    pub async fn wait_witness_synchronized(&self) {
        let deadline = Instant::now() + SLOW;
        loop {
            if self
                .witness_row()
                .await
                .is_some_and(|row| row.synchronized && row.mirror.is_some())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the witness never recorded the session as synchronized"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `partner`, a former principal, is a SYNCHRONIZED mirror.
    pub async fn wait_mirror_again(&self, partner: &Partner) {
        self.wait_for(partner, "the mirror again", SLOW, |status| {
            status.mirroring_role_desc.as_deref() == Some("MIRROR")
                && status.state() == Some("SYNCHRONIZED")
        })
        .await;
    }

    /// Waits until both partners report `state`.
    pub async fn wait_state(&self, state: &str) {
        for partner in [&self.a, &self.b] {
            self.wait_for(partner, state, SLOW, |status| status.state() == Some(state))
                .await;
        }
    }
}

/// The endpoint a control client dials for a partner's `listen` address.
pub trait ListenEndpoint {
    fn listen_endpoint(&self) -> pgmirror::config::Endpoint;
}

impl ListenEndpoint for PartnerConfig {
    fn listen_endpoint(&self) -> pgmirror::config::Endpoint {
        pgmirror::config::Endpoint {
            host: self.listen.0.ip().to_string(),
            port: self.listen.0.port(),
        }
    }
}
