//! The proxy's front door on real PostgreSQL: a client that stalls before
//! reading a large result over TLS still gets every byte, a client that
//! leaves while held frees its slot, a full proxy refuses new clients with
//! 53300 at once while established ones keep working, the admin console
//! wants TLS, hides which user exists and limits failed logins, and what a
//! client sends along with its login packets is handed on, except after an
//! SSLRequest, where it is refused.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{
    read_message, read_to_ready, standalone_config, tls_proxy, tls_section, trusting_client,
    ProxyHandle,
};
use common::PgInstance;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Rows of 1,000 bytes each: 20 MB in all.
const ROWS: usize = 20_000;

/// A StartupMessage (protocol 3.0) for `user` and `database`.
fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (key, value) in [("user", user), ("database", database)] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    message.extend_from_slice(sql.as_bytes());
    message.push(0);
    message
}

/// Reads backend messages until ReadyForQuery; returns how many DataRows
/// came and their total length. Panics on an ErrorResponse. With `pace`,
/// it pauses that long after every 64 KiB, as a slow client does.
async fn read_until_ready<S: AsyncRead + Unpin>(
    stream: &mut S,
    pace: Option<Duration>,
) -> (usize, usize) {
    let (mut rows, mut bytes, mut since_pause) = (0, 0, 0);
    loop {
        let (tag, body) = read_message(stream).await;
        let len = body.len() + 4;
        since_pause += len + 1;
        if let Some(pause) = pace.filter(|_| since_pause >= 64 * 1024) {
            since_pause = 0;
            tokio::time::sleep(pause).await;
        }
        match tag {
            b'D' => {
                rows += 1;
                bytes += len;
            }
            b'E' => panic!("server error: {}", String::from_utf8_lossy(&body)),
            b'Z' => return (rows, bytes),
            _ => {}
        }
    }
}

/// A TLS client of the proxy, its certificate checked against the test CA.
async fn tls_client(
    port: u16,
    pki: &std::path::Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S", "the proxy accepts SSLRequest");
    let config = trusting_client(pki);
    let name = rustls::pki_types::ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the proxy")
}

async fn login<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    stream
        .write_all(&startup_message("postgres", "postgres"))
        .await
        .unwrap();
    read_until_ready(stream, None).await;
}

/// How a reader takes a large result: after a stall, at full speed, or
/// slowly (a pause per 64 KiB: about 6 MB/s).
const READERS: [(&str, Duration, Option<Duration>); 3] = [
    ("stalled 2 s", Duration::from_secs(2), None),
    ("fast", Duration::ZERO, None),
    ("slow", Duration::ZERO, Some(Duration::from_millis(10))),
];

/// `bench/tls-slow` sets PGMIRROR_TLS_ROUNDS (rounds of [`READERS`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_stalls_before_reading_gets_every_byte() {
    let (_pg, pki, proxy) = tls_proxy().await;
    let rounds: usize = std::env::var("PGMIRROR_TLS_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(1);
    let mut times: Vec<(&str, Duration)> = Vec::new();
    for _ in 0..rounds {
        for (reader, stall, pace) in READERS {
            let mut client = tls_client(proxy.port, pki.path()).await;
            login(&mut client).await;
            let sql = format!("SELECT repeat('x', 1000) FROM generate_series(1, {ROWS})");
            client.write_all(&query_message(&sql)).await.unwrap();
            // The proxy fills the socket buffers and must then keep the
            // rest moving as the client drains them.
            tokio::time::sleep(stall).await;
            let started = Instant::now();
            let read = read_until_ready(&mut client, pace);
            let (rows, bytes) = tokio::time::timeout(Duration::from_secs(120), read)
                .await
                .unwrap_or_else(|_| {
                    panic!("the result stopped arriving ({reader}): unflushed TLS records")
                });
            assert_eq!(rows, ROWS, "every row arrives ({reader})");
            assert!(bytes > ROWS * 1000, "{bytes} bytes");
            times.push((reader, started.elapsed()));
            // The end of the connection is a TLS close_notify, not a cut.
            client.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
            let mut rest = Vec::new();
            let closed = client.read_to_end(&mut rest);
            tokio::time::timeout(Duration::from_secs(10), closed)
                .await
                .expect("the proxy closes")
                .expect("a clean TLS close (close_notify)");
        }
    }
    for (reader, ..) in READERS {
        let mut taken: Vec<Duration> = times
            .iter()
            .filter(|(name, _)| *name == reader)
            .map(|(_, time)| *time)
            .collect();
        taken.sort();
        println!(
            "20 MB through TLS, {reader} reader: {} of {} complete, read in median {:?} (min {:?}, max {:?})",
            taken.len(),
            rounds,
            taken[taken.len() / 2],
            taken[0],
            taken[taken.len() - 1]
        );
    }
    proxy.stop().await;
}

/// The client addresses SHOW CLIENTS lists.
async fn listed_clients(console: &tokio_postgres::Client) -> Vec<String> {
    let mut listed = Vec::new();
    for message in console.simple_query("SHOW CLIENTS").await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            listed.push(row.get("client_addr").unwrap_or_default().to_string());
        }
    }
    listed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_proxy_refuses_at_once_while_its_clients_keep_working() {
    let pg = PgInstance::start();
    let proxy = ProxyHandle::start(&standalone_config(&pg, "max_clients = 2")).await;
    let first = proxy.connect("").await.expect("first client");
    let second = proxy.connect("").await.expect("second client");
    let started = Instant::now();
    let third = tokio::time::timeout(Duration::from_secs(10), proxy.connect(""))
        .await
        .expect("an answer, not a wait in the backlog");
    let Err(refused) = third else {
        panic!("a third client is refused")
    };
    let waited = started.elapsed();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    assert!(waited < Duration::from_secs(3), "refused after {waited:?}");
    println!("third client refused with 53300 after {waited:?}");
    for client in [&first, &second] {
        let row = client.query_one("SELECT 40 + 2", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    }
    // A slot given back admits the next client.
    drop(first);
    let admitted = async {
        loop {
            if let Ok(client) = proxy.connect("").await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let third = tokio::time::timeout(Duration::from_secs(10), admitted)
        .await
        .expect("admitted once a slot is free");
    third.simple_query("SELECT 1").await.unwrap();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_the_hold_frees_its_slot_at_once() {
    // No server behind the session: every client is held.
    let config = format!(
        "hold_timeout = 30\n{}\n[sessions.shop]\npartners = [\"127.0.0.1:{}\"]\n\
         postgres = [\"127.0.0.1:{}\"]\ndatabases = [\"postgres\"]\n",
        common::proxy::ADMIN,
        common::free_port(),
        common::free_port()
    );
    let proxy = ProxyHandle::start(&config).await;
    let console = proxy.console().await;
    let mut held = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    held.write_all(&startup_message("postgres", "postgres"))
        .await
        .unwrap();
    let address = held.local_addr().unwrap().to_string();
    let listed = async {
        while !listed_clients(&console).await.contains(&address) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), listed)
        .await
        .expect("the held client is listed");
    drop(held);
    let left = Instant::now();
    let gone = async {
        while listed_clients(&console).await.contains(&address) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), gone)
        .await
        .expect("gone from SHOW CLIENTS within a second");
    println!(
        "held client gone from SHOW CLIENTS {:?} after it left",
        left.elapsed()
    );
    // Shutdown releases held clients with 57P01 rather than keeping them.
    let mut another = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    another
        .write_all(&startup_message("postgres", "postgres"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    let answer = tokio::spawn(async move {
        let mut answer = Vec::new();
        let read = another.read_to_end(&mut answer);
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        (
            String::from_utf8_lossy(&answer).to_string(),
            stopping.elapsed(),
        )
    });
    drop(console);
    proxy.stop().await;
    let (answer, after) = answer.await.unwrap();
    assert!(
        answer.contains("57P01"),
        "held client told the proxy stops: {answer:?}"
    );
    assert!(after < Duration::from_secs(2), "told after {after:?}");
}

/// A console login's error, or None when it succeeded.
async fn console_login(
    port: u16,
    user: &str,
    password: &str,
    tls: Option<&std::path::Path>,
) -> Option<String> {
    let conninfo =
        format!("host=127.0.0.1 port={port} user={user} password={password} dbname=pgmirror");
    let connected = match tls {
        None => tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| {
                tokio::spawn(connection);
                client
            }),
        Some(pki) => {
            let config = trusting_client(pki);
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
            tokio_postgres::connect(&format!("{conninfo} sslmode=require"), tls)
                .await
                .map(|(client, connection)| {
                    tokio::spawn(connection);
                    client
                })
        }
    };
    match connected {
        Ok(client) => {
            client.simple_query("SHOW CLIENTS").await.unwrap();
            None
        }
        Err(err) => Some(
            err.as_db_error()
                .map(|db| format!("{}: {}", db.code().code(), db.message()))
                .unwrap_or_else(|| err.to_string()),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_wants_tls_hides_its_user_and_limits_failed_logins() {
    let pg = PgInstance::start();
    let pki = tempfile::tempdir().unwrap();
    // plaintext = "never" stands for a client on another host.
    let config = format!(
        "startup_timeout = 2\n{}\
         [admin]\nuser = \"admin\"\npassword = \"secret\"\nplaintext = \"never\"\n\
         [sessions.shop]\npartners = [\"127.0.0.1:{}\"]\npostgres = [\"127.0.0.1:{}\"]\n\
         databases = [\"postgres\"]\n",
        tls_section(pki.path()),
        common::free_port(),
        pg.port()
    );
    let proxy = ProxyHandle::start(&config).await;
    let ca = pki.path();
    let plain = console_login(proxy.port, "admin", "secret", None).await;
    assert!(
        plain
            .as_deref()
            .is_some_and(|e| e.starts_with("28000") && e.contains("need TLS")),
        "{plain:?}"
    );
    assert_eq!(
        console_login(proxy.port, "admin", "secret", Some(ca)).await,
        None
    );
    // An unknown user and a wrong password look alike.
    let unknown = console_login(proxy.port, "root", "secret", Some(ca)).await;
    let wrong = console_login(proxy.port, "admin", "guess", Some(ca)).await;
    assert!(
        unknown.is_some() && unknown == wrong,
        "{unknown:?} / {wrong:?}"
    );
    // Five failures from one address: even the right password waits now.
    for _ in 0..3 {
        assert!(console_login(proxy.port, "admin", "guess", Some(ca))
            .await
            .is_some());
    }
    let limited = console_login(proxy.port, "admin", "secret", Some(ca)).await;
    assert!(
        limited
            .as_deref()
            .is_some_and(|e| e.contains("too many failed admin console logins")),
        "{limited:?}"
    );
    proxy.stop().await;
}

/// Runs a psycopg 3 script (PyPI's build bundles libpq 18); its output.
fn psycopg(script: &str, conninfo: &str) -> String {
    let (ok, out) = common::proxy::run_client("python3", &["-c", script, conninfo], &[]);
    assert!(ok, "psycopg script failed: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_with_a_login_packet_are_handed_on_but_not_after_an_ssl_request() {
    let (_pg, _pki, proxy) = tls_proxy().await;

    // A startup packet and a query in one write (pass-through, trust).
    let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let mut both = startup_message("postgres", "postgres");
    both.extend_from_slice(&query_message("SELECT repeat('x', 10)"));
    client.write_all(&both).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        read_until_ready(&mut client, None).await;
        read_until_ready(&mut client, None).await
    })
    .await
    .expect("the pipelined query was answered within 10 s");
    assert_eq!(answered, (1, 4 + 2 + 4 + 10), "one row of 10 bytes");

    // Plain bytes after an SSLRequest, before its answer: as PostgreSQL,
    // the proxy refuses them rather than let them pass for encrypted ones.
    let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let mut both = vec![0, 0, 0, 8, 4, 210, 22, 47];
    both.extend_from_slice(&startup_message("postgres", "postgres"));
    client.write_all(&both).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
        .await
        .expect("the proxy answered and closed within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(answer.first(), Some(&b'E'), "not refused: {text}");
    assert!(
        text.contains("08P01") && text.contains("unencrypted data after SSL request"),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_18_asks_for_protocol_3_2_and_direct_ssl_through_the_proxy() {
    let (_pg, _pki, proxy) = tls_proxy().await;
    let conninfo = proxy.conninfo("postgres", "postgres");
    // Protocol 3.2 asked for: the proxy serves it (PostgreSQL 15 behind
    // it is asked for 3.0) and hands out a 32-byte cancel key, with which a
    // cancel stops the right query and only that one.
    let out = psycopg(
        r#"
import sys, threading, time, psycopg
conninfo = sys.argv[1] + " max_protocol_version=3.2 sslmode=disable"
with psycopg.connect(conninfo, autocommit=True) as busy, psycopg.connect(conninfo, autocommit=True) as idle:
    print("protocol", busy.pgconn.full_protocol_version, "libpq", psycopg.pq.version())
    threading.Timer(0.5, busy.cancel_safe).start()
    started = time.time()
    try:
        busy.execute("SELECT pg_sleep(30)")
        print("not cancelled")
    except psycopg.errors.QueryCanceled:
        print("cancelled after", round(time.time() - started, 1))
    print("idle still works", idle.execute("SELECT 41 + 1").fetchone()[0])
"#,
        &conninfo,
    );
    println!("{out}");
    assert!(out.contains("protocol 30002 libpq 18"), "{out}");
    assert!(out.contains("cancelled after"), "{out}");
    assert!(out.contains("idle still works 42"), "{out}");
    // Direct SSL: TLS from the first byte, ALPN "postgresql".
    let out = psycopg(
        r#"
import sys, psycopg
conninfo = sys.argv[1] + " sslmode=require sslnegotiation=direct"
with psycopg.connect(conninfo) as conn:
    print("ssl", conn.pgconn.ssl_in_use, conn.execute("SELECT 6 * 7").fetchone()[0])
"#,
        &conninfo,
    );
    assert!(out.contains("ssl True 42"), "{out}");
    proxy.stop().await;
}

/// A client asking for a newer minor version with a protocol option gets
/// NegotiateProtocolVersion first (3.2, the option listed), as PostgreSQL
/// 18 answers, then a 32-byte key, and a working session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_protocol_with_options_is_negotiated_down_to_3_2() {
    let pg = PgInstance::start();
    let proxy = ProxyHandle::start(&standalone_config(&pg, "")).await;
    let mut startup = pgmirror::wire::startup::startup_message(&[
        ("user", "postgres"),
        ("_pq_.compression", "zstd"),
        ("database", "postgres"),
    ]);
    startup[4..8].copy_from_slice(&((3u32 << 16) | 5).to_be_bytes());
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    stream.write_all(&startup).await.unwrap();
    let messages = read_to_ready(&mut stream).await;
    for (tag, body) in &messages {
        assert_ne!(*tag, b'E', "{}", String::from_utf8_lossy(body));
    }
    let (tag, negotiate) = &messages[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion comes first");
    assert_eq!(negotiate[..8], [0, 0, 0, 2, 0, 0, 0, 1]);
    assert_eq!(&negotiate[8..], b"_pq_.compression\0");
    let key = messages
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("BackendKeyData");
    assert_eq!(key.1.len(), 4 + 32, "a 3.2 client gets a 32-byte key");
    stream
        .write_all(&query_message("SELECT 6 * 7"))
        .await
        .unwrap();
    assert_eq!(read_until_ready(&mut stream, None).await.0, 1);
    proxy.stop().await;
}
