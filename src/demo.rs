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

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{self, Endpoint, PartnerConfig, ProxyConfig, WitnessConfig};
use crate::control::ControlClient;
use crate::partner::engine::{PgBinaries, RunAs};
use crate::roles::Safety;
use crate::tls::{generate_pki, tls_config_for, tls_section, EndpointTls};

/// How long the demo waits for the session to become SYNCHRONIZED.
const SETUP_LIMIT: Duration = Duration::from_secs(180);
/// How long each process gets to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// The admin console's password in the demo (printed in the summary).
pub const DEMO_ADMIN_PASSWORD: &str = "pgmirror";

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
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

/// Writes the configs on a first run; later runs reuse them.
fn write_configs(options: &DemoOptions) -> anyhow::Result<()> {
    let dir = &options.dir;
    let pki = dir.join("pki");
    if !pki.join("ca.crt").exists() {
        generate_pki(&pki, &["alpha", "beta", "witness", "proxy", "admin"])?;
    }
    if dir.join("alpha.toml").exists() {
        return Ok(());
    }
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
    std::fs::write(
        dir.join("proxy.toml"),
        format!(
            "# The demo's proxy: clients connect here and reach the current principal.\n\
             listen = \"127.0.0.1:{}\"\ndefault_session = \"demo\"\nmetrics = \"127.0.0.1:{}\"\n\
             state_dir = {:?}\n\n\
             [admin]\nuser = \"admin\"\npassword = \"{DEMO_ADMIN_PASSWORD}\"\n\n\
             [endpoint_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n\
             [sessions.demo]\npartners = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             databases = [\"postgres\", \"demo\"]\npostgres = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
            options.port,
            free_port()?,
            dir.join("proxy"),
            pki.join("proxy.crt"),
            pki.join("proxy.key"),
            pki.join("ca.crt"),
            endpoints[0],
            endpoints[1],
            pg_ports[0],
            pg_ports[1],
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
             state_dir = {:?}\nsafety = \"{}\"\ntimeout = {}\nmetrics = \"127.0.0.1:{}\"\n\n\
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
    Ok(Component { name, child, log })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Waits until the principal reports SYNCHRONIZED (or, without a mirror to
/// wait for under SAFETY OFF, UNSYNCHRONIZED), watching for a process that died.
async fn wait_synchronized(
    components: &mut [Component],
    endpoint: &Endpoint,
    tls: &EndpointTls,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_LIMIT;
    loop {
        for component in components.iter_mut() {
            if let Some(status) = component.child.try_wait()? {
                bail!(
                    "{} exited ({status}) during setup; its log {}:\n{}",
                    component.name,
                    component.log.display(),
                    log_tail(&component.log)
                );
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
            bail!("the session did not synchronize within {SETUP_LIMIT:?}; see the logs in the demo directory");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.cancelled() => bail!("interrupted during setup"),
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
    write_configs(&options)?;
    let dir = &options.dir;
    let alpha: PartnerConfig = config::load(&dir.join("alpha.toml"))?;
    let beta: PartnerConfig = config::load(&dir.join("beta.toml"))?;
    let witness: Option<WitnessConfig> = if dir.join("witness.toml").exists() {
        Some(config::load(&dir.join("witness.toml"))?)
    } else {
        None
    };
    let with_witness = witness.is_some();

    let mut components = Vec::new();
    if with_witness {
        components.push(spawn(dir, "witness", "witness", &dir.join("witness.toml"))?);
    }
    components.push(spawn(dir, "alpha", "partner", &dir.join("alpha.toml"))?);
    components.push(spawn(dir, "beta", "partner", &dir.join("beta.toml"))?);
    components.push(spawn(dir, "proxy", "proxy", &dir.join("proxy.toml"))?);
    let proxy: ProxyConfig = config::load(&dir.join("proxy.toml"))?;
    let admin_tls = EndpointTls::from_config(&tls_config_for(&dir.join("pki"), "admin"))?;
    let alpha_endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port: alpha.listen.0.port(),
    };
    if let Err(err) =
        wait_synchronized(&mut components, &alpha_endpoint, &admin_tls, &shutdown).await
    {
        stop_all(components).await;
        return Err(err);
    }
    println!(
        "\npgmirror demo: session \"demo\" is mirrored\n\
         \n  psql through the proxy:        psql -h 127.0.0.1 -p {} -U postgres\
         \n  admin console:                 psql -h 127.0.0.1 -p {} -U admin pgmirror   (password {DEMO_ADMIN_PASSWORD})\
         \n  proxy metrics:                 {}\
         \n  principal (alpha) PostgreSQL:  psql -h 127.0.0.1 -p {} -U postgres\
         \n  mirror (beta) PostgreSQL:      psql -h 127.0.0.1 -p {} -U postgres   (read-only hot standby)\
         \n  alpha agent endpoint:          {}   metrics {}\
         \n  beta agent endpoint:           {}   metrics {}{}\
         \n  configs, certificates, data:   {}\
         \n  logs:                          {}\
         \n\nPress Ctrl-C to stop every process (the directory is kept; a second run reuses it).\n",
        proxy.listen.0.port(),
        proxy.listen.0.port(),
        metrics_url(proxy.metrics),
        alpha.postgres.port,
        beta.postgres.port,
        alpha.listen.0,
        metrics_url(alpha.metrics),
        beta.listen.0,
        metrics_url(beta.metrics),
        match &witness {
            Some(witness) => format!(
                "\n  witness endpoint:              {}   metrics {}",
                witness.listen.0,
                metrics_url(witness.metrics)
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

fn metrics_url(addr: Option<config::ListenAddr>) -> String {
    addr.map(|addr| format!("http://{}/metrics", addr.0))
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
