//! The proxy's commit fence (invariant I2 at the edge) against a real
//! PostgreSQL whose `synchronous_standby_names` names a standby that never
//! connects, so every commit waits for it until cancelled or terminated:
//! - the notice PostgreSQL sends when that wait is cut short, read off the
//!   raw protocol and pinned per major version (V, R, F, C) together with
//!   where it comes relative to CommandComplete and ReadyForQuery;
//! - through the real proxy with tokio-postgres (simple and extended
//!   protocol, explicit and implicit transactions, pipelining,
//!   `client_min_messages = error`), a cancelled or terminated commit never
//!   reaches the client as a success, while normal commits see nothing
//!   unusual; the same for transaction pooling.
//!
//! psycopg and pgjdbc are not installed on the test machines; tokio-postgres
//! covers the extended protocol (autocommit commits at Sync) here.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{standalone_config, ProxyHandle};
use common::PgInstance;
use pgmirror::wire::notice::{decode_notice, SyncRepCut};
use pgmirror::wire::startup::{backend_message_len, decode_backend_key_data, startup_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// The standby named in `synchronous_standby_names`; it never connects.
const ABSENT_STANDBY: &str = "absent_mirror";

/// The notice's identifying fields, per PostgreSQL major version: (major,
/// V, R, F, C of a cancelled wait, C of a terminated one). Checked by
/// `the_notice_of_a_cut_wait_is_pinned_on_a_real_server`; add a row after
/// running it on a new major version.
const PINNED: &[(u32, &str, &str, &str, &str, &str)] = &[(
    15,
    "WARNING",
    "SyncRepWaitForLSN",
    "syncrep.c",
    "01000",
    "57P01",
)];

/// A server where every commit waits for a standby that never comes, with
/// table `t` created (by a session that does not wait).
async fn waiting_server() -> (PgInstance, tokio_postgres::Client) {
    let pg = PgInstance::start_with(&[&format!("synchronous_standby_names = '{ABSENT_STANDBY}'")]);
    let admin = pg.connect().await;
    admin
        .batch_execute(
            "SET synchronous_commit = local;
             CREATE TABLE t (id int PRIMARY KEY, note text)",
        )
        .await
        .expect("create table");
    (pg, admin)
}

/// Waits until backend `pid` waits for the synchronous standby.
async fn wait_for_sync_rep(admin: &tokio_postgres::Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = admin
            .query_opt(
                "SELECT wait_event FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity");
        let event: Option<String> = row.and_then(|row| row.get(0));
        if event.as_deref() == Some("SyncRep") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never waited for the synchronous standby (wait_event {event:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether row `id` is visible within a few seconds: a cut wait is
/// reported before the backend finishes its commit (the row becomes
/// visible just after the notice is sent).
async fn row_exists(admin: &tokio_postgres::Client, id: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = admin
            .query_opt("SELECT 1 FROM t WHERE id = $1", &[&id])
            .await
            .expect("look up row")
            .is_some();
        if found || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------
// The raw protocol, to see every message PostgreSQL sends.

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// BackendKeyData: the server's, or the proxy's own through the proxy.
    pid: i32,
    secret: u32,
}

impl Raw {
    /// Connects and authenticates (trust) as postgres.
    async fn connect(pg: &PgInstance) -> Raw {
        Raw::connect_to(pg.addr()).await
    }

    async fn connect_to(addr: std::net::SocketAddr) -> Raw {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(&startup_message(&[
                ("user", "postgres"),
                ("database", "postgres"),
            ]))
            .await
            .unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
            pid: 0,
            secret: 0,
        };
        loop {
            let (tag, message) = raw.next().await.expect("startup answer");
            if tag == b'K' {
                let (pid, secret) = decode_backend_key_data(&message).expect("BackendKeyData");
                (raw.pid, raw.secret) = (pid as i32, secret);
            }
            assert_ne!(tag, b'E', "startup failed");
            if tag == b'Z' {
                return raw;
            }
        }
    }

    /// The next whole message (tag and all its bytes), None at EOF.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((tag, len)) = backend_message_len(&self.buf).expect("framing") {
                if self.buf.len() >= len {
                    let message: Vec<u8> = self.buf.drain(..len).collect();
                    return Some((tag, message));
                }
            }
            let read =
                tokio::time::timeout(Duration::from_secs(30), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("server answered in time")
                    .ok()?;
            if read == 0 {
                return None;
            }
        }
    }

    /// Every message until ReadyForQuery (included) or EOF.
    async fn response(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut messages = Vec::new();
        while let Some((tag, message)) = self.next().await {
            messages.push((tag, message));
            if tag == b'Z' {
                break;
            }
        }
        messages
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }
}

fn frontend(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

fn simple_query(sql: &str) -> Vec<u8> {
    frontend(b'Q', format!("{sql}\0").as_bytes())
}

/// Parse, Bind, Execute and Sync of one unnamed statement without
/// parameters: autocommit commits at Sync.
fn extended_query(sql: &str) -> Vec<u8> {
    let mut parse = format!("\0{sql}\0").into_bytes();
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut execute = b"\0".to_vec();
    execute.extend_from_slice(&0u32.to_be_bytes());
    [
        frontend(b'P', &parse),
        frontend(b'B', &bind),
        frontend(b'E', &execute),
        frontend(b'S', b""),
    ]
    .concat()
}

/// The tags of a response, as a string ("CNZ").
fn tags(messages: &[(u8, Vec<u8>)]) -> String {
    messages.iter().map(|(tag, _)| char::from(*tag)).collect()
}

/// Asserts the response holds exactly one notice of a cut wait, with the
/// pinned fields, and returns the decoder's verdict.
fn pinned_cut(messages: &[(u8, Vec<u8>)], major: u32, terminated: bool) -> SyncRepCut {
    let row = PINNED.iter().find(|row| row.0 == major).unwrap_or_else(|| {
        panic!(
            "PostgreSQL {major} is not pinned: check the notice's fields below and add a row \
                 to PINNED: {:?}",
            messages
                .iter()
                .filter(|(tag, _)| *tag == b'N')
                .map(|(_, message)| String::from_utf8_lossy(message).into_owned())
                .collect::<Vec<_>>()
        )
    });
    let notices: Vec<_> = messages
        .iter()
        .filter(|(tag, _)| *tag == b'N')
        .map(|(_, message)| decode_notice(message).expect("a well-formed notice"))
        .collect();
    assert_eq!(notices.len(), 1, "one notice: {}", tags(messages));
    let fields = notices[0];
    let text =
        |value: Option<&[u8]>| value.map(|value| String::from_utf8_lossy(value).into_owned());
    assert_eq!(text(fields.severity).as_deref(), Some(row.1), "V");
    assert_eq!(text(fields.routine).as_deref(), Some(row.2), "R");
    assert_eq!(text(fields.file).as_deref(), Some(row.3), "F");
    let code = if terminated { row.5 } else { row.4 };
    assert_eq!(text(fields.code).as_deref(), Some(code), "C");
    SyncRepCut::from_notice(&fields).expect("the decoder recognises the notice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notice_of_a_cut_wait_is_pinned_on_a_real_server() {
    let (pg, admin) = waiting_server().await;
    let version: String = admin
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    let major: u32 = version.parse::<u32>().unwrap() / 10_000;
    println!("PostgreSQL major version {major}");

    // Simple protocol, cancelled: the notice comes before CommandComplete,
    // and the commit is reported as a success.
    let mut raw = Raw::connect(&pg).await;
    raw.send(&simple_query("INSERT INTO t VALUES (1)")).await;
    wait_for_sync_rep(&admin, raw.pid).await;
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&raw.pid])
        .await
        .unwrap();
    let response = raw.response().await;
    assert_eq!(tags(&response), "NCZ");
    assert_eq!(pinned_cut(&response, major, false), SyncRepCut::Cancelled);
    assert!(row_exists(&admin, 1).await, "committed locally");

    // Extended protocol in autocommit: the commit happens at Sync, so
    // CommandComplete comes first and the notice just before ReadyForQuery.
    raw.send(&extended_query("INSERT INTO t VALUES (2)")).await;
    wait_for_sync_rep(&admin, raw.pid).await;
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&raw.pid])
        .await
        .unwrap();
    let response = raw.response().await;
    assert_eq!(tags(&response), "12CNZ");
    assert_eq!(pinned_cut(&response, major, false), SyncRepCut::Cancelled);

    // An explicit COMMIT: the notice comes before its CommandComplete.
    raw.send(&simple_query("BEGIN")).await;
    assert_eq!(tags(&raw.response().await), "CZ");
    raw.send(&simple_query("INSERT INTO t VALUES (3)")).await;
    assert_eq!(tags(&raw.response().await), "CZ");
    raw.send(&simple_query("COMMIT")).await;
    wait_for_sync_rep(&admin, raw.pid).await;
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&raw.pid])
        .await
        .unwrap();
    let response = raw.response().await;
    assert_eq!(tags(&response), "NCZ");
    assert_eq!(pinned_cut(&response, major, false), SyncRepCut::Cancelled);

    // client_min_messages = error hides the notice altogether.
    raw.send(&simple_query("SET client_min_messages = error"))
        .await;
    assert_eq!(tags(&raw.response().await), "CZ");
    raw.send(&simple_query("INSERT INTO t VALUES (4)")).await;
    wait_for_sync_rep(&admin, raw.pid).await;
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&raw.pid])
        .await
        .unwrap();
    assert_eq!(tags(&raw.response().await), "CZ");

    // Terminated: the notice (57P01), then nothing at all.
    for (id, query) in [
        (5, simple_query("INSERT INTO t VALUES (5)")),
        (6, extended_query("INSERT INTO t VALUES (6)")),
    ] {
        let mut raw = Raw::connect(&pg).await;
        raw.send(&query).await;
        wait_for_sync_rep(&admin, raw.pid).await;
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&raw.pid])
            .await
            .unwrap();
        let response = raw.response().await;
        let expected = if id == 5 { "N" } else { "12CN" };
        assert_eq!(tags(&response), expected, "then EOF");
        assert_eq!(pinned_cut(&response, major, true), SyncRepCut::Terminated);
        assert!(row_exists(&admin, id).await, "committed locally");
    }
}

/// Waits until the backend running `query` waits for the standby.
async fn wait_for_sync_rep_of(admin: &tokio_postgres::Client, query: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid: Option<i32> = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE query = $1 AND wait_event = 'SyncRep'",
                &[&query],
            )
            .await
            .expect("pg_stat_activity")
            .map(|row| row.get(0));
        if pid.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{query} never waited for the standby"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_forwards_the_completion_of_a_cut_commit() {
    // Every message the client gets, read off the raw protocol through the
    // proxy: no CommandComplete, no ReadyForQuery, only 40003 then EOF (with
    // the extended protocol the CommandComplete came before the notice and
    // was held back).
    let setup = setup().await;
    let proxy_addr = std::net::SocketAddr::from(([127, 0, 0, 1], setup.proxy.port));
    let mut failures = Failures::default();
    let mut id = 400;
    // (hide warnings, cancel through the proxy): a pg_cancel_backend from
    // another session is seen only through the notice (rules 1 and 3); with
    // the notice hidden too it is the hole the README documents.
    for (hide_warnings, through_proxy) in [(false, true), (true, true), (false, false)] {
        for extended in [false, true] {
            id += 1;
            let what = format!(
                "raw, extended {extended}, hide warnings {hide_warnings}, cancel through the \
                 proxy {through_proxy}"
            );
            let mut raw = Raw::connect_to(proxy_addr).await;
            if hide_warnings {
                raw.send(&simple_query("SET client_min_messages = error"))
                    .await;
                assert_eq!(tags(&raw.response().await), "CZ");
            }
            let insert = format!("INSERT INTO t VALUES ({id})");
            let message = if extended {
                extended_query(&insert)
            } else {
                simple_query(&insert)
            };
            raw.send(&message).await;
            wait_for_sync_rep_of(&setup.admin, &insert).await;
            if through_proxy {
                let mut cancel = TcpStream::connect(proxy_addr).await.unwrap();
                cancel
                    .write_all(&pgmirror::wire::startup::cancel_request(
                        raw.pid as u32,
                        raw.secret,
                    ))
                    .await
                    .unwrap();
            } else {
                setup
                    .admin
                    .execute(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = $1",
                        &[&insert],
                    )
                    .await
                    .unwrap();
            }
            let response = raw.response().await;
            let expected = if extended { "12E" } else { "E" };
            failures.check(tags(&response) == expected, || {
                format!(
                    "{what}: got {} instead of {expected} then EOF",
                    tags(&response)
                )
            });
            if let Some((_, error)) = response.last().filter(|(tag, _)| *tag == b'E') {
                failures.check(
                    pgmirror::wire::startup::error_code(error) == Some("40003"),
                    || format!("{what}: {}", String::from_utf8_lossy(error)),
                );
            }
            assert!(
                row_exists(&setup.admin, id).await,
                "{what}: committed locally"
            );
        }
    }
    failures.assert_none();
}

// ---------------------------------------------------------------------
// Through the proxy, with tokio-postgres.

/// A waiting server, a proxy in front of it, and a direct admin session.
struct Setup {
    _pg: PgInstance,
    admin: tokio_postgres::Client,
    proxy: ProxyHandle,
}

async fn setup() -> Setup {
    let (pg, admin) = waiting_server().await;
    let proxy = ProxyHandle::start(&standalone_config(&pg, "")).await;
    Setup {
        _pg: pg,
        admin,
        proxy,
    }
}

impl Setup {
    /// A client through the proxy, and its backend's pid.
    async fn client(&self, extra: &str) -> (tokio_postgres::Client, i32) {
        let client = self
            .proxy
            .connect(extra)
            .await
            .expect("connect through the proxy");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        (client, pid)
    }
}

/// How the client's commit is cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// A CancelRequest sent to the proxy with the client's cancel token.
    CancelThroughProxy,
    /// pg_terminate_backend from a direct session.
    Terminate,
}

/// Waits until `pid` waits for the standby, then cuts the wait.
async fn cut_when_waiting(setup: &Setup, pid: i32, token: tokio_postgres::CancelToken, cut: Cut) {
    wait_for_sync_rep(&setup.admin, pid).await;
    match cut {
        Cut::CancelThroughProxy => token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel request sent to the proxy"),
        Cut::Terminate => {
            setup
                .admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .unwrap();
        }
    }
}

/// Failures of one test's cases, collected so that a run with the fence
/// switched off lists every case that fails, not just the first.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    /// The outcome a client must see for a cut commit: 40003, or (with
    /// `closed_is_enough`, when the server went away without a word the
    /// proxy could act on) a closed connection; never a success.
    fn not_success<T: std::fmt::Debug>(
        &mut self,
        outcome: Result<T, tokio_postgres::Error>,
        closed_is_enough: bool,
        what: &str,
    ) {
        let err = match outcome {
            Ok(value) => {
                return self.0.push(format!(
                    "{what}: a cut commit reached the client as a success: {value:?}"
                ))
            }
            Err(err) => err,
        };
        match err.as_db_error() {
            Some(db) => self.check(
                db.code() == &SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN
                    && db.message().contains("outcome is unknown"),
                || format!("{what}: not 40003 but {err}"),
            ),
            None => self.check(closed_is_enough && err.is_closed(), || {
                format!("{what}: not 40003 but {err}")
            }),
        }
    }

    /// After the fence the proxy has ended the connection.
    async fn ended(&mut self, client: &tokio_postgres::Client, what: &str) {
        let next = tokio::time::timeout(Duration::from_secs(10), client.simple_query("SELECT 1"))
            .await
            .expect("the next query ended promptly");
        self.check(next.is_err(), || {
            format!("{what}: the connection is still usable")
        });
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "failed cases:\n{}", self.0.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_commit_through_the_proxy_ends_in_40003() {
    let setup = setup().await;
    let mut failures = Failures::default();
    let mut id = 100;
    for hide_warnings in [false, true] {
        let extra = if hide_warnings {
            "options='-c client_min_messages=error'"
        } else {
            ""
        };
        let hidden = if hide_warnings {
            ", client_min_messages = error"
        } else {
            ""
        };

        // Extended protocol in autocommit: the commit happens at Sync.
        id += 1;
        let what = format!("extended protocol autocommit{hidden}");
        let (client, pid) = setup.client(extra).await;
        let token = client.cancel_token();
        let insert = format!("INSERT INTO t VALUES ({id})");
        let (outcome, ()) = tokio::join!(
            client.execute(insert.as_str(), &[]),
            cut_when_waiting(&setup, pid, token, Cut::CancelThroughProxy)
        );
        failures.not_success(outcome, false, &what);
        assert!(
            row_exists(&setup.admin, id).await,
            "{what}: committed locally"
        );
        failures.ended(&client, &what).await;

        // An explicit BEGIN / INSERT / COMMIT with the simple protocol.
        id += 1;
        let what = format!("explicit COMMIT, simple protocol{hidden}");
        let (client, pid) = setup.client(extra).await;
        client.simple_query("BEGIN").await.unwrap();
        client
            .simple_query(&format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap();
        let token = client.cancel_token();
        let (outcome, ()) = tokio::join!(
            client.simple_query("COMMIT"),
            cut_when_waiting(&setup, pid, token, Cut::CancelThroughProxy)
        );
        failures.not_success(outcome, false, &what);
        assert!(
            row_exists(&setup.admin, id).await,
            "{what}: committed locally"
        );
        failures.ended(&client, &what).await;

        // A statement pipelined after the commit (extended protocol: both
        // Bind/Execute/Sync groups are sent before any answer).
        id += 1;
        let what = format!("extended protocol, a statement pipelined after the commit{hidden}");
        let (client, pid) = setup.client(extra).await;
        let insert = client
            .prepare(&format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap();
        let select = client.prepare("SELECT 42").await.unwrap();
        let token = client.cancel_token();
        let (inserted, selected, ()) = tokio::join!(
            client.execute(&insert, &[]),
            client.query(&select, &[]),
            cut_when_waiting(&setup, pid, token, Cut::CancelThroughProxy)
        );
        failures.not_success(inserted, false, &what);
        failures.check(selected.is_err(), || {
            format!("{what}: the pipelined statement ran on")
        });
        assert!(
            row_exists(&setup.admin, id).await,
            "{what}: committed locally"
        );

        // Simple protocol in autocommit, pipelined with a second query.
        id += 1;
        let what = format!("simple protocol autocommit, a query pipelined after it{hidden}");
        let (client, pid) = setup.client(extra).await;
        let token = client.cancel_token();
        let insert = format!("INSERT INTO t VALUES ({id})");
        let (inserted, selected, ()) = tokio::join!(
            client.simple_query(&insert),
            client.simple_query("SELECT 42"),
            cut_when_waiting(&setup, pid, token, Cut::CancelThroughProxy)
        );
        failures.not_success(inserted, false, &what);
        failures.check(selected.is_err(), || {
            format!("{what}: the pipelined query ran on")
        });
        assert!(
            row_exists(&setup.admin, id).await,
            "{what}: committed locally"
        );
    }
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_commit_through_the_proxy_is_never_a_success() {
    let setup = setup().await;
    let mut failures = Failures::default();
    let mut id = 200;
    for hide_warnings in [false, true] {
        let extra = if hide_warnings {
            "options='-c client_min_messages=error'"
        } else {
            ""
        };
        for extended in [false, true] {
            id += 1;
            let (client, pid) = setup.client(extra).await;
            let token = client.cancel_token();
            let insert = format!("INSERT INTO t VALUES ({id})");
            let what = format!("terminated, extended {extended}, hide warnings {hide_warnings}");
            let cut = cut_when_waiting(&setup, pid, token, Cut::Terminate);
            // With the notice hidden PostgreSQL says nothing at all (with
            // the extended protocol, it never flushes the CommandComplete
            // that Execute buffered): the connection just ends.
            if extended {
                let (outcome, ()) = tokio::join!(client.execute(insert.as_str(), &[]), cut);
                failures.not_success(outcome, hide_warnings, &what);
            } else {
                let (outcome, ()) = tokio::join!(client.simple_query(&insert), cut);
                failures.not_success(outcome, hide_warnings, &what);
            }
            assert!(
                row_exists(&setup.admin, id).await,
                "{what}: committed locally"
            );
            failures.ended(&client, &what).await;
        }
    }
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_that_complete_normally_see_nothing_unusual() {
    let setup = setup().await;
    // These sessions do not wait for the standby, like a server whose
    // mirror confirms every commit.
    let (client, pid) = setup.client("options='-c synchronous_commit=local'").await;
    assert_eq!(
        client
            .execute("INSERT INTO t VALUES (301)", &[])
            .await
            .unwrap(),
        1
    );
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (302); COMMIT")
        .await
        .unwrap();
    client.simple_query("BEGIN").await.unwrap();
    client
        .simple_query("INSERT INTO t VALUES (303)")
        .await
        .unwrap();
    client.simple_query("COMMIT").await.unwrap();
    // Other warnings (same severity and SQLSTATE as a cancelled wait) pass.
    client
        .batch_execute(
            "DO $$ BEGIN RAISE WARNING 'canceling wait for synchronous replication'; END $$",
        )
        .await
        .unwrap();
    // Pipelined statements.
    let insert = client.prepare("INSERT INTO t VALUES (304)").await.unwrap();
    let select = client.prepare("SELECT count(*) FROM t").await.unwrap();
    let (inserted, counted) =
        tokio::join!(client.execute(&insert, &[]), client.query_one(&select, &[]));
    assert_eq!(inserted.unwrap(), 1);
    assert!(counted.unwrap().get::<_, i64>(0) >= 4);

    // A cancel that ends a statement with an error leaves the connection
    // alone, and the next commit is a normal one.
    let token = client.cancel_token();
    let sleeping = client.simple_query("SELECT pg_sleep(30)");
    let cancel = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let event: Option<String> = setup
                .admin
                .query_one(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if event.as_deref() == Some("PgSleep") {
                break;
            }
            assert!(Instant::now() < deadline, "never slept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    };
    let (slept, ()) = tokio::join!(sleeping, cancel);
    let err = slept.expect_err("pg_sleep was cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert_eq!(
        client
            .execute("INSERT INTO t VALUES (305)", &[])
            .await
            .unwrap(),
        1
    );
    for id in 301..=305 {
        assert!(row_exists(&setup.admin, id).await, "row {id}");
    }
    setup.proxy.stop().await;
}

/// Transaction mode (`pool_mode = "transaction"`): a commit's replies run
/// through the fence too, whichever pooled connection runs it. A SCRAM
/// user `app` (password `wonder`) in a userlist; two server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_commit_in_transaction_mode_ends_in_40003() {
    let (pg, admin) = waiting_server().await;
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE USER app PASSWORD 'wonder'; \
             GRANT ALL ON t TO app",
        )
        .await
        .unwrap();
    pg.require_passwords("scram-sha-256");
    let userlist = pg.dir().join("userlist.txt");
    let verifier = common::proxy::verifier_of(&admin, "app").await;
    std::fs::write(&userlist, format!("\"app\" \"{verifier}\"\n")).unwrap();
    let config = format!(
        "{}auth = \"userlist\"\nauth_file = {userlist:?}\npool_mode = \"transaction\"\n\
         pool_size = 2\n",
        standalone_config(&pg, "")
    );
    let proxy = ProxyHandle::start(&config).await;
    let mut failures = Failures::default();
    for (id, cancel_through_proxy, explicit) in [
        (701, true, false),
        (702, false, false),
        (703, true, true),
        (704, false, true),
    ] {
        let what = format!(
            "transaction mode, explicit COMMIT {explicit}, cancel through the proxy \
             {cancel_through_proxy}"
        );
        let client = proxy
            .connect_as("app", "password=wonder")
            .await
            .expect("app through the proxy");
        let insert = format!("INSERT INTO t VALUES ({id})");
        let waiting = if explicit {
            client.batch_execute("BEGIN").await.unwrap();
            client.batch_execute(&insert).await.unwrap();
            "COMMIT".to_string()
        } else {
            insert
        };
        let token = client.cancel_token();
        let cut = async {
            wait_for_sync_rep_of(&admin, &waiting).await;
            if cancel_through_proxy {
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
            } else {
                admin
                    .execute(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
                         WHERE query = $1 AND usename = 'app'",
                        &[&waiting],
                    )
                    .await
                    .unwrap();
            }
        };
        let (outcome, ()) = tokio::join!(client.simple_query(&waiting), cut);
        failures.not_success(outcome, false, &what);
        assert!(row_exists(&admin, id).await, "{what}: committed locally");
        failures.ended(&client, &what).await;
    }
    failures.assert_none();
}
