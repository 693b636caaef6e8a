//! TLS from the proxy to PostgreSQL (`[server_tls]`) against a real
//! PostgreSQL 15 with `ssl = on` and a certificate for 127.0.0.1 signed by a
//! test CA: the data path is encrypted (pg_stat_ssl), verify-full takes
//! the right CA and refuses another (the client told why, at once), verify-ca
//! skips only the name, require refuses a server without TLS, a cancel
//! reaches the server through it, the auth query goes over it too, and (as
//! the README says) a SCRAM client with TLS on both sides needs
//! `channel_binding=disable`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::{lookup_function, run_client, standalone_config, ProxyHandle};
use common::PgInstance;
use pgmirror::config::{ServerSslMode, ServerTlsConfig, TcpConfig};
use pgmirror::proxy::server_tls::ServerTls;

/// The query that tells, on the server, whether this session uses TLS.
const SESSION_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// A test CA and a certificate for 127.0.0.1 (`server.crt`, `server.key`).
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pgmirror::tls::generate_pki(dir.path(), &["server"]).unwrap();
    dir
}

fn server_tls(mode: &str, ca: Option<&Path>) -> String {
    let ca = ca.map(|ca| format!("ca = {ca:?}\n")).unwrap_or_default();
    format!("[server_tls]\nsslmode = \"{mode}\"\n{ca}")
}

/// Connects through the proxy; Err is the server's (or proxy's) error text.
async fn through(proxy: &ProxyHandle) -> Result<tokio_postgres::Client, String> {
    proxy
        .connect("")
        .await
        .map_err(|err| match err.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => err.to_string(),
        })
}

async fn session_uses_tls(client: &tokio_postgres::Client) -> bool {
    client.query_one(SESSION_SSL, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_and_verify_full_encrypt_the_data_path() {
    let pki = pki();
    let pg = PgInstance::start_with_tls(
        &pki.path().join("server.crt"),
        &pki.path().join("server.key"),
    );
    let ca = pki.path().join("ca.crt");
    for section in [
        server_tls("require", None),
        server_tls("verify-full", Some(&ca)),
    ] {
        let proxy = ProxyHandle::start(&standalone_config(&pg, &section)).await;
        let client = through(&proxy).await.expect(&section);
        assert!(session_uses_tls(&client).await, "{section}");
        // A query bigger than one TLS record, both ways.
        let echoed: String = client
            .query_one("SELECT repeat('x', 100000)", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(echoed.len(), 100_000);
        drop(client);
        proxy.stop().await;
    }
    // The default stays plain.
    let proxy = ProxyHandle::start(&standalone_config(&pg, "")).await;
    let client = through(&proxy).await.unwrap();
    assert!(!session_uses_tls(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_another_ca_refuses_the_client_with_the_reason() {
    let pki = pki();
    let pg = PgInstance::start_with_tls(
        &pki.path().join("server.crt"),
        &pki.path().join("server.key"),
    );
    let other = tempfile::tempdir().unwrap();
    pgmirror::tls::generate_pki(other.path(), &[]).unwrap();
    let section = server_tls("verify-full", Some(&other.path().join("ca.crt")));
    let proxy = ProxyHandle::start(&standalone_config(&pg, &section)).await;

    let started = Instant::now();
    let err = through(&proxy)
        .await
        .expect_err("a wrong certificate refused");
    // Both test CAs carry the same name, so the chain finds an "issuer"
    // whose key did not sign the certificate (a CA of another name would
    // say UnknownIssuer).
    let expected = format!(
        "08006 pgmirror proxy: TLS to server 127.0.0.1:{} failed (sslmode=verify-full): \
         invalid peer certificate: BadSignature",
        pg.port()
    );
    assert_eq!(err, expected);
    // Refused at once, not held for the whole hold_timeout (5 s) as if
    // the server were down.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The data path's connect says the same, and never gets a stream.
    let config = ServerTlsConfig {
        sslmode: ServerSslMode::VerifyFull,
        ca: Some(other.path().join("ca.crt")),
        ..Default::default()
    };
    let tls = ServerTls::new(&config, TcpConfig::default()).unwrap();
    let err = tls.connect(&pg.addr().to_string()).await.err().unwrap();
    assert_eq!(format!("08006 pgmirror proxy: {err}"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_skips_the_name_that_verify_full_checks() {
    let pki = pki();
    // Same CA, but a certificate for another host only.
    let (cert, key) = certificate_for(pki.path(), "db.example");
    let pg = PgInstance::start_with_tls(&cert, &key);
    let ca = pki.path().join("ca.crt");
    let address = pg.addr().to_string();
    let connect = |mode| {
        let config = ServerTlsConfig {
            sslmode: mode,
            ca: Some(ca.clone()),
            ..Default::default()
        };
        let tls = ServerTls::new(&config, TcpConfig::default()).unwrap();
        let address = address.clone();
        async move {
            tls.connect(&address)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert_eq!(connect(ServerSslMode::VerifyCa).await, Ok(()));
    let err = connect(ServerSslMode::VerifyFull).await.unwrap_err();
    assert!(
        err.contains("(sslmode=verify-full): invalid peer certificate: certificate not valid for name \"127.0.0.1\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_a_server_without_tls() {
    let pg = PgInstance::start();
    let proxy = ProxyHandle::start(&standalone_config(&pg, &server_tls("require", None))).await;
    let started = Instant::now();
    let err = through(&proxy).await.expect_err("a plain server refused");
    assert_eq!(
        err,
        format!(
            "08006 pgmirror proxy: server 127.0.0.1:{} does not accept TLS (it answered 'N' to \
             SSLRequest), which sslmode=require requires",
            pg.port()
        )
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    proxy.stop().await;
    // prefer falls back to plain TCP.
    let proxy = ProxyHandle::start(&standalone_config(&pg, &server_tls("prefer", None))).await;
    let client = through(&proxy).await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_server_over_tls() {
    let pki = pki();
    let pg = PgInstance::start_with_tls(
        &pki.path().join("server.crt"),
        &pki.path().join("server.key"),
    );
    let proxy = ProxyHandle::start(&standalone_config(&pg, &server_tls("require", None))).await;
    let client = through(&proxy).await.unwrap();
    assert!(session_uses_tls(&client).await);
    let cancel = client.cancel_token();
    let started = Instant::now();
    let sleep = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), sleep)
        .await
        .expect("the query ends")
        .unwrap();
    let err = result.expect_err("the query cancelled");
    assert_eq!(
        err.as_db_error().map(|db| db.code().code()),
        Some("57014"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_through_tls_on_both_sides_needs_channel_binding_disabled() {
    let pki = tempfile::tempdir().unwrap();
    pgmirror::tls::generate_pki(pki.path(), &["server", "proxy"]).unwrap();
    let pg = PgInstance::start_with_tls(
        &pki.path().join("server.crt"),
        &pki.path().join("server.key"),
    );
    let setup = pg.connect().await;
    setup
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE USER alice PASSWORD 'wonder';",
        )
        .await
        .unwrap();
    pg.require_passwords("scram-sha-256");
    let sections = format!(
        "{}[tls]\ncert = {:?}\nkey = {:?}\n",
        server_tls("require", None),
        pki.path().join("proxy.crt"),
        pki.path().join("proxy.key")
    );
    let proxy = ProxyHandle::start(&standalone_config(&pg, &sections)).await;
    let psql = |options: &str| {
        let conninfo = format!(
            "{} sslmode=require {options}",
            proxy.conninfo("alice", "postgres")
        );
        run_client(
            "psql",
            &["-X", "-At", "-c", "SELECT 1", &conninfo],
            &[("PGPASSWORD", "wonder")],
        )
    };
    // libpq's default (channel_binding=prefer) picks SCRAM-SHA-256-PLUS,
    // bound to the proxy's certificate; the server checks its own.
    let (ok, out) = psql("");
    assert!(!ok && out.contains("channel binding"), "{out}");
    let (ok, out) = psql("channel_binding=disable");
    assert!(ok && out.trim() == "1", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_query_goes_over_tls_too() {
    let pki = pki();
    let pg = PgInstance::start_with_tls(
        &pki.path().join("server.crt"),
        &pki.path().join("server.key"),
    );
    let setup = pg.connect().await;
    setup
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; CREATE USER app PASSWORD 'wonder'; {}",
            lookup_function()
        ))
        .await
        .unwrap();
    // Over TCP, TLS or nothing: a plain auth query would be rejected (the
    // proxy's read-write probe logs in as postgres).
    let hba = "local all all trust\nhostssl all postgres 127.0.0.1/32 trust\n\
               hostssl all all 127.0.0.1/32 scram-sha-256\n\
               hostnossl all all 127.0.0.1/32 reject\n";
    std::fs::write(pg.engine.data_dir.join("pg_hba.conf"), hba).unwrap();
    pg.engine.reload().unwrap();
    let userlist = pki.path().join("userlist.txt");
    std::fs::write(&userlist, "\"pgmirror_auth\" \"lookup-only\"\n").unwrap();
    let config = format!(
        "{}auth = \"query\"\nauth_user = \"pgmirror_auth\"\nauth_file = {userlist:?}\n",
        standalone_config(&pg, &server_tls("require", None))
    );
    let proxy = ProxyHandle::start(&config).await;
    let (client, connection) = tokio_postgres::connect(
        &format!("{} password=wonder", proxy.conninfo("app", "postgres")),
        tokio_postgres::NoTls,
    )
    .await
    .expect("the auth query ran over TLS and app logged in");
    tokio::spawn(connection);
    assert!(session_uses_tls(&client).await);
}

/// A certificate for `host` only, signed by the CA of `dir` (made by
/// `generate_pki`); returns its certificate and key files.
fn certificate_for(dir: &Path, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    // The issuer's name and key are what a signature needs; rebuild it.
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pgmirror deployment CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (cert_file, key_file) = (dir.join("other.crt"), dir.join("other.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file, key_file)
}
