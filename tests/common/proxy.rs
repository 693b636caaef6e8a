//! `ProxyHandle`: a pgmirror proxy served in-process on a port-0 listener,
//! on a runtime of its own as the binary's, from TOML sessions the test
//! writes, stopped (its shutdown token cancelled) when the handle drops.
//! Plus the clients tests use through it: tokio-postgres connections, psql
//! and pgbench runs; and a server with password users whose verifiers a
//! userlist copies (proxy-side authentication).

use std::process::Command;
use std::time::Duration;

use pgmirror::config::ProxyConfig;
use pgmirror::runtime::{self, Threads};
use tokio_util::sync::CancellationToken;

pub struct ProxyHandle {
    pub port: u16,
    shutdown: CancellationToken,
    /// Resolves when the proxy's thread has ended.
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl ProxyHandle {
    /// Starts a proxy from config text (its `listen` is ignored: the proxy
    /// gets a fresh port), on a thread and runtime of its own, built from
    /// its `threads` as the binary builds them, so the tests exercise the
    /// runtime users get (one thread by default).
    pub async fn start(config_text: &str) -> ProxyHandle {
        let config: ProxyConfig =
            pgmirror::config::parse("proxy.toml", config_text).expect("valid proxy config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (finished, ended) = tokio::sync::oneshot::channel();
        let runtime = runtime::build(Threads::Exactly(config.threads)).expect("proxy runtime");
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                pgmirror::proxy::serve(listener, config, token)
                    .await
                    .expect("proxy serves");
            });
            let _ = finished.send(());
        });
        ProxyHandle {
            port,
            shutdown,
            ended: Some(ended),
        }
    }

    /// A proxy in front of a real mirrored pair (session `shop` for the
    /// dbname `postgres`), with `extra` config lines at the top.
    pub async fn in_front_of(pair: &super::cluster::Pair, extra: &str) -> ProxyHandle {
        ProxyHandle::in_front_of_with(pair, extra, "").await
    }

    /// As [`ProxyHandle::in_front_of`], with `session` lines (auth,
    /// pool_mode, ...) added to the session `shop`.
    pub async fn in_front_of_with(
        pair: &super::cluster::Pair,
        extra: &str,
        session: &str,
    ) -> ProxyHandle {
        use super::cluster::ListenEndpoint;
        let pki = &pair.pki;
        let text = format!(
            "hold_timeout = 60\n{extra}\n[endpoint_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n\
             [sessions.shop]\npartners = [\"{}\", \"{}\"]\ndatabases = [\"postgres\"]\n{session}",
            pki.join("tester.crt"),
            pki.join("tester.key"),
            pki.join("ca.crt"),
            pair.a.config.listen_endpoint(),
            pair.b.config.listen_endpoint(),
        );
        ProxyHandle::start(&text).await
    }

    /// Stops the proxy and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(ended) = self.ended.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), ended).await;
        }
    }

    /// A libpq connection string to the proxy.
    pub fn conninfo(&self, user: &str, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={dbname} connect_timeout=60",
            self.port
        )
    }

    /// A tokio-postgres client through the proxy.
    pub async fn connect(
        &self,
        extra: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.connect_as("postgres", extra).await
    }

    /// A tokio-postgres client through the proxy, logged in as `user`
    /// (`extra`: more conninfo, such as its password).
    pub async fn connect_as(
        &self,
        user: &str,
        extra: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let conninfo = format!("{} {extra}", self.conninfo(user, "postgres"));
        let (client, connection) =
            tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The admin console, logged in as `admin` / `secret`.
    pub async fn console(&self) -> tokio_postgres::Client {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=admin password=secret dbname=pgmirror",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("admin console login");
        tokio::spawn(connection);
        client
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `[admin]` section every test proxy gets.
pub const ADMIN: &str = "[admin]\nuser = \"admin\"\npassword = \"secret\"\n";

/// A proxy config for one standalone server: the session's agent endpoint
/// is a closed port, so the proxy finds the server by its read-write probe.
pub fn standalone_config(pg: &super::PgInstance, extra: &str) -> String {
    format!(
        "startup_timeout = 2\nhold_timeout = 5\n{extra}\n{ADMIN}\n\
         [sessions.shop]\npartners = [\"127.0.0.1:{}\"]\npostgres = [\"127.0.0.1:{}\"]\n\
         databases = [\"postgres\"]\n",
        super::free_port(),
        pg.port()
    )
}

/// Runs a client program (psql, pgbench) to completion; returns success
/// and combined output.
pub fn run_client(program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Generates a test CA and the proxy's certificate in `dir`; the `[tls]`
/// section of a proxy that terminates TLS with them.
pub fn tls_section(dir: &std::path::Path) -> String {
    pgmirror::tls::generate_pki(dir, &["proxy"]).expect("test certificates");
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        dir.join("proxy.crt"),
        dir.join("proxy.key")
    )
}

/// A TLS client config that trusts the test CA of `dir` (see
/// [`tls_section`]).
pub fn trusting_client(dir: &std::path::Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(dir.join("ca.crt")).expect("the test CA");
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("a usable CA");
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// A server whose `app` has a SCRAM verifier ("wonder") and `old` an md5
/// one ("legacy"); pg_hba asks `old` for md5 and everyone else but the
/// setup superuser for SCRAM.
pub async fn server_with_users() -> (super::PgInstance, tokio_postgres::Client) {
    let pg = super::PgInstance::start_with(&["password_encryption = 'scram-sha-256'"]);
    let setup = pg.connect().await;
    setup
        .batch_execute(
            "CREATE USER app PASSWORD 'wonder';
             SET password_encryption = 'md5'; CREATE USER old PASSWORD 'legacy';
             RESET password_encryption;",
        )
        .await
        .expect("create users");
    let hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
               host all old 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(pg.engine.data_dir.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    pg.engine.reload().expect("reload PostgreSQL");
    (pg, setup)
}

/// `pg_authid.rolpassword` of `user`, as an administrator copies it.
pub async fn verifier_of(setup: &tokio_postgres::Client, user: &str) -> String {
    setup
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .expect("read pg_authid")
        .get(0)
}

/// The README's SQL for the auth query (PgBouncer's SECURITY DEFINER
/// lookup function), taken from the README so that the two cannot drift,
/// with the password `lookup-only` for its role.
pub fn lookup_function() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sql = readme
        .split("**Proxy authentication.**")
        .nth(1)
        .and_then(|rest| rest.split("```sql").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the README's lookup function");
    assert!(sql.contains("SECURITY DEFINER"), "{sql}");
    sql.replace("PASSWORD '...'", "PASSWORD 'lookup-only'")
}

/// A fresh PostgreSQL behind a standalone proxy that offers TLS to its
/// clients, with the directory of the test CA and certificates (kept
/// for as long as the proxy runs).
pub async fn tls_proxy() -> (super::PgInstance, tempfile::TempDir, ProxyHandle) {
    let pg = super::PgInstance::start();
    let pki = tempfile::tempdir().unwrap();
    let tls = tls_section(pki.path());
    let proxy = ProxyHandle::start(&standalone_config(&pg, &tls)).await;
    (pg, pki, proxy)
}

/// Reads backend messages, as a client, up to ReadyForQuery within 10 s:
/// their tags and bodies.
pub async fn read_to_ready<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<(u8, Vec<u8>)> {
    let read = async {
        let mut messages = Vec::new();
        loop {
            let (tag, body) = read_message(stream).await;
            messages.push((tag, body));
            if tag == b'Z' {
                return messages;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("ReadyForQuery within 10 s")
}

/// Reads one backend message: its tag and body.
pub async fn read_message<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.expect("a message");
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.expect("its body");
    (header[0], body)
}
