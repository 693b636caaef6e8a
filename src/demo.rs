//! `pgmirror demo`: a whole mirrored cluster on this machine, in the
//! foreground, for a first try and for tests: a witness and two partner
//! agents (each agent runs its own PostgreSQL) on 127.0.0.1, with generated
//! certificates and config files a user can copy for a real deployment.
//!
//! The demo only writes files and starts `pgmirror` subprocesses; everything
//! else is the same code a deployment runs. A second run on the same
//! directory reuses its configs and data. Ctrl-C or SIGTERM stops every
//! process it started.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{self, Endpoint, PartnerConfig, ProxyConfig, WitnessConfig};
use crate::control::ControlClient;
use crate::partner::engine::{PgBinaries, RunAs};
use crate::proxy::auth::scram::ScramVerifier;
use crate::roles::Safety;
use crate::tls::{generate_pki, tls_config_for, tls_section, EndpointTls};

/// How long the demo waits for the session to become SYNCHRONIZED.
const SETUP_LIMIT: Duration = Duration::from_secs(180);
/// How long each process gets to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// The admin console's password in the demo (printed in the summary).
pub const DEMO_ADMIN_PASSWORD: &str = "pgmirror";
/// The password of the demo's `postgres` user through the proxy, which
/// authenticates clients itself (transaction pooling needs it); the
/// servers themselves trust local connections.
pub const DEMO_PASSWORD: &str = "pgmirror";
/// PostgreSQL's default SCRAM iteration count.
const SCRAM_ITERATIONS: u32 = 4096;

/// What `pgmirror demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub port: u16,
    pub safety: Safety,
    pub witness: bool,
    pub timeout: u64,
}

/// One process of the demo.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// Length of the log when this process started: what it wrote since.
    log_start: u64,
}

/// What a process or its PostgreSQL logs when a port it was given is taken.
const PORT_TAKEN: &str = "Address already in use";

/// How many times the demo starts again on fresh ports when one of its
/// ports was taken between choosing it and binding it.
const START_ATTEMPTS: u32 = 3;

/// Why a start did not reach a synchronized session.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    /// A process (or the PostgreSQL it started) found its port taken.
    #[error("{0} found its port taken")]
    PortTaken(&'static str),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Picks the demo's ports below the kernel's ephemeral range: a port picked
/// by binding port 0 comes from that range, which is also where the local
/// ports of outgoing connections come from, so one of those could take it
/// before the demo's process binds it. Below the range only listeners
/// compete, and every pick is checked free. The integration tests pick
/// their ports with it too.
pub struct PortPicker {
    picked: std::collections::HashSet<u16>,
    range: std::ops::Range<u16>,
}

impl Default for PortPicker {
    fn default() -> Self {
        Self::new()
    }
}

impl PortPicker {
    pub fn new() -> Self {
        let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let end = ephemeral_start.max(2048);
        PortPicker {
            picked: Default::default(),
            range: end.saturating_sub(12_000).max(1024)..end,
        }
    }

    /// A port free now and never picked before by this picker.
    pub fn pick(&mut self) -> anyhow::Result<u16> {
        let width = u32::from(self.range.end - self.range.start);
        for _ in 0..1000 {
            let port = self.range.start + (rand::random::<u32>() % width) as u16;
            if !self.picked.contains(&port) && port_is_free(port) {
                self.picked.insert(port);
                return Ok(port);
            }
        }
        bail!("no free port found in {:?} on 127.0.0.1", self.range)
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The ports an earlier run's configs listen on, with what each is for
/// (the proxy's own port is the user's `--port`, not moved).
fn configured_ports(dir: &Path) -> anyhow::Result<Vec<(String, u16)>> {
    let mut ports = Vec::new();
    for name in ["alpha", "beta"] {
        let partner: PartnerConfig = config::load(&dir.join(format!("{name}.toml")))?;
        ports.push((format!("{name} endpoint"), partner.listen.0.port()));
        ports.push((format!("{name} PostgreSQL"), partner.postgres.port));
        ports.extend(
            partner
                .metrics
                .map(|m| (format!("{name} metrics"), m.0.port())),
        );
        ports.extend(
            partner
                .health
                .map(|h| (format!("{name} health endpoints"), h.0.port())),
        );
    }
    if dir.join("witness.toml").exists() {
        let witness: WitnessConfig = config::load(&dir.join("witness.toml"))?;
        ports.push(("witness endpoint".into(), witness.listen.0.port()));
        ports.extend(
            witness
                .metrics
                .map(|m| ("witness metrics".into(), m.0.port())),
        );
    }
    let proxy: ProxyConfig = config::load(&dir.join("proxy.toml"))?;
    ports.extend(proxy.metrics.map(|m| ("proxy metrics".into(), m.0.port())));
    Ok(ports)
}

/// Writes the configs on a first run. A later run reuses them, unless one
/// of their ports is taken now: then they are written again with free
/// ports (the data is kept), and the moved ports are returned.
fn prepare_configs(options: &DemoOptions) -> anyhow::Result<Vec<(String, u16)>> {
    if !options.dir.join("alpha.toml").exists() {
        write_configs(options)?;
        return Ok(Vec::new());
    }
    let ports = configured_ports(&options.dir)?;
    let taken: Vec<_> = ports
        .iter()
        .filter(|(_, port)| !port_is_free(*port))
        .cloned()
        .collect();
    if taken.is_empty() {
        return Ok(taken);
    }
    if taken.len() == ports.len() {
        bail!(
            "every port of the demo in {} is in use: is that demo running already?",
            options.dir.display()
        );
    }
    write_configs(options)?;
    Ok(taken)
}

/// The PostgreSQL user must reach the data directories when we are root.
fn check_reachable(dir: &Path, run_as: RunAs) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let RunAs::User { uid, .. } = run_as else {
        return Ok(());
    };
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)?;
        if meta.mode() & 0o001 == 0 && meta.uid() != uid.as_raw() {
            bail!(
                "{} is not reachable by the postgres user that runs PostgreSQL ({} is closed to it); \
                 choose another --dir, e.g. /tmp/pgmirror-demo",
                dir.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// Writes every config file with freshly picked ports.
fn write_configs(options: &DemoOptions) -> anyhow::Result<()> {
    let dir = &options.dir;
    let pki = dir.join("pki");
    if !pki.join("ca.crt").exists() {
        generate_pki(&pki, &["alpha", "beta", "witness", "proxy", "admin"])?;
    }
    let mut ports = PortPicker::new();
    let mut free_port = || ports.pick();
    let endpoints = [free_port()?, free_port()?];
    let witness_port = free_port()?;
    if options.witness {
        std::fs::write(
            dir.join("witness.toml"),
            format!(
                "# The demo's witness.\nlisten = \"127.0.0.1:{witness_port}\"\nstore = {:?}\n\
                 metrics = \"127.0.0.1:{}\"\n\n{}",
                dir.join("witness/witness.sqlite"),
                free_port()?,
                tls_section(&pki, "witness", true)
            ),
        )?;
    }
    let pg_ports = [free_port()?, free_port()?];
    let salt: [u8; 16] = rand::random();
    let verifier = ScramVerifier::from_password(DEMO_PASSWORD, &salt, SCRAM_ITERATIONS);
    let userlist = dir.join("userlist.txt");
    std::fs::write(
        &userlist,
        format!("\"postgres\" \"{}\"\n", verifier.to_text()),
    )?;
    std::fs::write(
        dir.join("proxy.toml"),
        format!(
            "# The demo's proxy: clients connect here and reach the current principal.\n\
             listen = \"127.0.0.1:{}\"\ndefault_session = \"demo\"\nmetrics = \"127.0.0.1:{}\"\n\
             state_dir = {:?}\n\n\
             [admin]\nuser = \"admin\"\npassword = \"{DEMO_ADMIN_PASSWORD}\"\n\n\
             [endpoint_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n\
             [sessions.demo]\npartners = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             databases = [\"postgres\", \"demo\"]\npostgres = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             # Transaction pooling: idle clients keep their connections across a failover.\n\
             auth = \"userlist\"\nauth_file = {:?}\npool_mode = \"transaction\"\npool_size = 20\n",
            match options.port {
                0 => free_port()?,
                port => port,
            },
            free_port()?,
            dir.join("proxy"),
            pki.join("proxy.crt"),
            pki.join("proxy.key"),
            pki.join("ca.crt"),
            endpoints[0],
            endpoints[1],
            pg_ports[0],
            pg_ports[1],
            userlist,
        ),
    )?;
    for (index, (name, role)) in [("alpha", "principal"), ("beta", "mirror")]
        .into_iter()
        .enumerate()
    {
        let witness = if options.witness {
            format!("witness = \"127.0.0.1:{witness_port}\"\n")
        } else {
            String::new()
        };
        let text = format!(
            "# The demo's partner {name}; copy and adapt for a real deployment.\n\
             session = \"demo\"\nname = \"{name}\"\ninitial_role = \"{role}\"\n\
             listen = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\n{witness}\
             state_dir = {:?}\nsafety = \"{}\"\ntimeout = {}\nmetrics = \"127.0.0.1:{}\"\n\
             health = \"127.0.0.1:{}\"\n\n\
             [postgres]\ndata_dir = {:?}\nport = {}\n\n{}",
            endpoints[index],
            endpoints[1 - index],
            dir.join(name).join("agent"),
            match options.safety {
                Safety::Full => "full",
                Safety::Off => "off",
            },
            options.timeout,
            free_port()?,
            free_port()?,
            dir.join(name).join("data"),
            pg_ports[index],
            tls_section(&pki, name, true)
        );
        std::fs::write(dir.join(format!("{name}.toml")), text)?;
    }
    Ok(())
}

fn spawn(
    dir: &Path,
    name: &'static str,
    subcommand: &str,
    config: &Path,
) -> anyhow::Result<Component> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let log_start = file.metadata()?.len();
    let child = Command::new(std::env::current_exe().context("locating the pgmirror binary")?)
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Component {
        name,
        child,
        log,
        log_start,
    })
}

/// The first process whose log says, since it started, that a port it
/// (or its PostgreSQL) was to listen on is taken.
fn port_taken(components: &[Component]) -> Option<&'static str> {
    components.iter().find_map(|component| {
        let log = std::fs::read(&component.log).unwrap_or_default();
        let since_start = log.get(component.log_start as usize..)?;
        String::from_utf8_lossy(since_start)
            .contains(PORT_TAKEN)
            .then_some(component.name)
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Waits until the principal reports SYNCHRONIZED (or, without a mirror to
/// wait for under SAFETY OFF, UNSYNCHRONIZED), watching for a process that
/// died or found its port taken.
async fn wait_synchronized(
    components: &mut [Component],
    endpoint: &Endpoint,
    tls: &EndpointTls,
    shutdown: &CancellationToken,
) -> Result<(), SetupError> {
    let deadline = Instant::now() + SETUP_LIMIT;
    loop {
        if let Some(name) = port_taken(components) {
            return Err(SetupError::PortTaken(name));
        }
        for component in components.iter_mut() {
            if let Some(status) = component.child.try_wait().map_err(anyhow::Error::from)? {
                if let Some(name) = port_taken(std::slice::from_ref(component)) {
                    return Err(SetupError::PortTaken(name));
                }
                return Err(anyhow!(
                    "{} exited ({status}) during setup; its log {}:\n{}",
                    component.name,
                    component.log.display(),
                    log_tail(&component.log)
                )
                .into());
            }
        }
        if let Ok(mut client) = ControlClient::connect(endpoint, tls).await {
            if let Ok(status) = client.status().await {
                if matches!(status.state(), Some("SYNCHRONIZED" | "UNSYNCHRONIZED")) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(anyhow!("the session did not synchronize within {SETUP_LIMIT:?}; see the logs in the demo directory").into());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.cancelled() => return Err(anyhow!("interrupted during setup").into()),
        }
    }
}

async fn stop_all(components: Vec<Component>) {
    for mut component in components.into_iter().rev() {
        if let Some(pid) = component.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(STOP_GRACE, component.child.wait())
            .await
            .is_err()
        {
            let _ = component.child.kill().await;
        }
        info!("{} stopped", component.name);
    }
}

/// Starts the witness (when configured), both partners and the proxy.
fn start_components(dir: &Path) -> anyhow::Result<Vec<Component>> {
    let mut components = Vec::new();
    if dir.join("witness.toml").exists() {
        components.push(spawn(dir, "witness", "witness", &dir.join("witness.toml"))?);
    }
    components.push(spawn(dir, "alpha", "partner", &dir.join("alpha.toml"))?);
    components.push(spawn(dir, "beta", "partner", &dir.join("beta.toml"))?);
    components.push(spawn(dir, "proxy", "proxy", &dir.join("proxy.toml"))?);
    Ok(components)
}

/// Runs the demo until `shutdown` is cancelled.
pub async fn run(options: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    PgBinaries::locate(None)?;
    let run_as = RunAs::detect()?;
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let options = DemoOptions {
        dir: options.dir.canonicalize()?,
        ..options
    };
    check_reachable(&options.dir, run_as)?;
    let dir = &options.dir;
    let mut attempt = 1;
    let mut components = loop {
        let moved = prepare_configs(&options)?;
        if !moved.is_empty() {
            let list: Vec<String> = moved
                .iter()
                .map(|(what, port)| format!("{what} {port}"))
                .collect();
            println!(
                "pgmirror demo: ports chosen earlier are taken now ({}); the configs were \
                 written again with free ports (data kept)",
                list.join(", ")
            );
        }
        let mut components = start_components(dir)?;
        let alpha: PartnerConfig = config::load(&dir.join("alpha.toml"))?;
        let admin_tls = EndpointTls::from_config(&tls_config_for(&dir.join("pki"), "admin"))?;
        let alpha_endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: alpha.listen.0.port(),
        };
        match wait_synchronized(&mut components, &alpha_endpoint, &admin_tls, &shutdown).await {
            Ok(()) => break components,
            Err(SetupError::PortTaken(name)) if attempt < START_ATTEMPTS => {
                println!(
                    "pgmirror demo: {name} found a port taken since the demo chose it \
                     (attempt {attempt} of {START_ATTEMPTS}); starting again on free ports"
                );
                stop_all(components).await;
                attempt += 1;
            }
            Err(err) => {
                stop_all(components).await;
                return Err(err.into());
            }
        }
    };
    let alpha: PartnerConfig = config::load(&dir.join("alpha.toml"))?;
    let beta: PartnerConfig = config::load(&dir.join("beta.toml"))?;
    let witness: Option<WitnessConfig> = if dir.join("witness.toml").exists() {
        Some(config::load(&dir.join("witness.toml"))?)
    } else {
        None
    };
    let proxy: ProxyConfig = config::load(&dir.join("proxy.toml"))?;
    println!(
        "\npgmirror demo: session \"demo\" is mirrored\n\
         \n  psql through the proxy:        psql -h 127.0.0.1 -p {} -U postgres   (password {DEMO_PASSWORD}; transaction pooling: stays connected across a failover)\
         \n  admin console:                 psql -h 127.0.0.1 -p {} -U admin pgmirror   (password {DEMO_ADMIN_PASSWORD})\
         \n  proxy metrics:                 {}\
         \n  principal (alpha) PostgreSQL:  psql -h 127.0.0.1 -p {} -U postgres\
         \n  mirror (beta) PostgreSQL:      psql -h 127.0.0.1 -p {} -U postgres   (read-only hot standby)\
         \n  alpha agent endpoint:          {}   metrics {}\
         \n  beta agent endpoint:           {}   metrics {}\
         \n  alpha health endpoints:        {}   (also /replica, /synchronized, /health, /status)\
         \n  beta health endpoints:         {}   (also /replica, /synchronized, /health, /status){}\
         \n  configs, certificates, data:   {}\
         \n  logs:                          {}\
         \n\nPress Ctrl-C to stop every process (the directory is kept; a second run reuses it).\n",
        proxy.listen.0.port(),
        proxy.listen.0.port(),
        http_url(proxy.metrics, "metrics"),
        alpha.postgres.port,
        beta.postgres.port,
        alpha.listen.0,
        http_url(alpha.metrics, "metrics"),
        beta.listen.0,
        http_url(beta.metrics, "metrics"),
        http_url(alpha.health, "primary"),
        http_url(beta.health, "primary"),
        match &witness {
            Some(witness) => format!(
                "\n  witness endpoint:              {}   metrics {}",
                witness.listen.0,
                http_url(witness.metrics, "metrics")
            ),
            None => String::new(),
        },
        dir.display(),
        dir.join("logs").display(),
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        exited = wait_any(&mut components) => println!("{exited}; stopping the demo"),
    }
    stop_all(components).await;
    println!("pgmirror demo stopped; {} kept", dir.display());
    Ok(())
}

/// `http://ADDR/PATH`, or "(off)" when the process serves no such listener.
fn http_url(addr: Option<config::ListenAddr>, path: &str) -> String {
    addr.map(|addr| format!("http://{}/{path}", addr.0))
        .unwrap_or_else(|| "(off)".into())
}

async fn wait_any(components: &mut [Component]) -> String {
    loop {
        for component in components.iter_mut() {
            if let Ok(Some(status)) = component.child.try_wait() {
                return format!(
                    "{} exited ({status}), see {}",
                    component.name,
                    component.log.display()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_directory_moves_off_ports_taken_since() {
        let dir = tempfile::tempdir().unwrap();
        let options = DemoOptions {
            dir: dir.path().to_path_buf(),
            port: 6432,
            safety: Safety::Full,
            witness: true,
            timeout: 5,
        };
        assert!(prepare_configs(&options).unwrap().is_empty());
        let first = configured_ports(dir.path()).unwrap();
        let below_ephemeral = PortPicker::new().range;
        assert!(first.iter().all(|(_, port)| below_ephemeral.contains(port)));
        // Nothing taken: the configs are reused as they are.
        assert!(prepare_configs(&options).unwrap().is_empty());
        assert_eq!(configured_ports(dir.path()).unwrap(), first);
        // A port taken in between: that run moves to free ports.
        let (what, port) = first[0].clone();
        let _holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        assert_eq!(prepare_configs(&options).unwrap(), vec![(what, port)]);
        let moved = configured_ports(dir.path()).unwrap();
        assert!(moved.iter().all(|(_, p)| *p != port && port_is_free(*p)));
    }
}
