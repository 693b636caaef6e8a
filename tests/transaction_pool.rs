//! Transaction pooling (`pool_mode = "transaction"`, issue 13 item 4) on real
//! PostgreSQL 15, through a standalone proxy with proxy-side authentication
//! (a userlist) and more clients than server connections: psycopg, pgjdbc
//! and node-postgres with server-side prepared statements, pgbench -M
//! prepared and -M simple, two clients with the same statement name (raw
//! protocol), named statements answering as PostgreSQL itself does,
//! pipelined queries, COPY, a cancel that reaches only its own query,
//! session state (SET, RESET, startup parameters) carried across server
//! connections, a client that leaves mid-transaction or mid-query, a wait
//! for a busy pool up to hold_timeout, a login greeted while its pool is
//! busy (from the pool's kept greeting), a pooled connection that dies while
//! idle, session features refused with 0A000, a stopping proxy telling idle
//! and busy clients 57P01, and the config that refuses
//! transaction mode with pass-through authentication.
mod common;

use std::time::Duration;

use common::process::run;
use common::proxy::{run_client, server_with_users, standalone_config, verifier_of, ProxyHandle};
use common::PgInstance;
use pgmirror::proxy::auth::md5::Md5Verifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Schemas `t0` .. `t{SCHEMAS - 1}`, each with a table `marker` whose one
/// row says the schema's name: a client's search_path shows in its rows.
const SCHEMAS: usize = 8;

/// A server with the SCRAM user `app` ("wonder") and the md5 user `old`
/// ("legacy"), and a proxy in front of it pooling both in transaction mode,
/// `pool_size` server connections each. Fields drop top to bottom.
struct Pooled {
    proxy: ProxyHandle,
    setup: Client,
    pg: PgInstance,
}

async fn pooled(pool_size: usize) -> Pooled {
    let (pg, setup) = server_with_users().await;
    let mut schemas = String::from("CREATE TABLE items (n int); GRANT ALL ON items TO app;");
    for i in 0..SCHEMAS {
        schemas.push_str(&format!(
            "CREATE SCHEMA t{i}; CREATE TABLE t{i}.marker AS SELECT 't{i}'::text AS v; \
             GRANT USAGE ON SCHEMA t{i} TO app, old; GRANT SELECT ON t{i}.marker TO app, old;"
        ));
    }
    // A name whose column type depends on the search_path.
    schemas.push_str(
        "CREATE TABLE t0.typed AS SELECT 1 AS v; CREATE TABLE t1.typed AS SELECT 'one'::text AS v; \
         GRANT SELECT ON t0.typed, t1.typed TO app, old;",
    );
    setup.batch_execute(&schemas).await.expect("create schemas");
    let userlist = pg.dir().join("userlist.txt");
    let list = format!(
        "\"app\" \"{}\"\n\"old\" \"{}\"\n",
        verifier_of(&setup, "app").await,
        verifier_of(&setup, "old").await
    );
    std::fs::write(&userlist, list).unwrap();
    let config = format!(
        "{}auth = \"userlist\"\nauth_file = {userlist:?}\npool_mode = \"transaction\"\n\
         pool_size = {pool_size}\n",
        // Drivers that compute SCRAM proofs in script (node-postgres) can
        // take longer than the harness's 2 s to log in on a loaded machine.
        standalone_config(&pg, "").replace("startup_timeout = 2\n", "startup_timeout = 20\n")
    );
    let proxy = ProxyHandle::start(&config).await;
    Pooled { proxy, setup, pg }
}

impl Pooled {
    /// A tokio-postgres client of `app` through the proxy, with `extra`
    /// connection parameters (application_name, options).
    async fn app(&self, extra: &str) -> Client {
        let conninfo = format!(
            "{} password=wonder {extra}",
            self.proxy.conninfo("app", "postgres")
        );
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("{conninfo}: {err}"));
        tokio::spawn(connection);
        client
    }

    /// How many backends `user` has on the server right now.
    async fn backends_of(&self, user: &str) -> i64 {
        self.setup
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&user],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }

    /// Ends every backend of `user` (pg_terminate_backend) and waits until
    /// they are gone.
    async fn terminate_backends_of(&self, user: &str) {
        self.setup
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&user],
            )
            .await
            .unwrap();
        for _ in 0..100 {
            if self.backends_of(user).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            self.backends_of(user).await,
            0,
            "the backends of {user} outlived pg_terminate_backend"
        );
    }

    /// `SHOW POOLS` rows as (column name, value) pairs.
    async fn pools(&self, console: &Client) -> Vec<Vec<(String, String)>> {
        let _ = self;
        rows(
            console
                .simple_query("SHOW POOLS")
                .await
                .expect("SHOW POOLS"),
        )
    }
}

/// The rows of a simple query's answer as (column name, value) pairs.
fn rows(messages: Vec<SimpleQueryMessage>) -> Vec<Vec<(String, String)>> {
    messages
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, column)| {
                        let value = row.get(i).unwrap_or("NULL").to_string();
                        (column.name().to_string(), value)
                    })
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The first column of the first row `sql` returns (simple protocol).
async fn value(client: &Client, sql: &str) -> String {
    let answer = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err:?}"));
    rows(answer)
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next())
        .unwrap_or_else(|| panic!("{sql} returned no row"))
        .1
}

/// Runs a client program off the runtime's threads (the proxy shares
/// them) and returns its output; panics, with the output, if it failed.
async fn run_script(
    program: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, out) = run_client(program, &args, &env);
        assert!(ok, "{program} failed:\n{out}");
        out
    })
    .await
    .expect("client program")
}

/// Clients of the driver tests, three per server connection; fewer than
/// SCHEMAS - 2, as the psycopg threads also visit t6 and t7.
const DRIVER_CLIENTS: usize = 6;
const DRIVER_POOL: usize = 2;
/// Executions of each statement per client: past every driver's threshold
/// for server-side preparation (5).
const ROUNDS: usize = 12;

/// Runs a driver's program with `args`, then the client count and rounds,
/// against a pool of `DRIVER_POOL`; returns its output once it checked
/// that the server never had more backends than that for `app`.
async fn run_driver(
    pooled: &Pooled,
    program: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
) -> String {
    let mut args = args;
    args.extend([DRIVER_CLIENTS.to_string(), ROUNDS.to_string()]);
    let out = run_script(program, args, env).await;
    let backends = pooled.backends_of("app").await;
    assert!(
        backends <= DRIVER_POOL as i64,
        "{backends} backends for app"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_threads_keep_their_prepared_statements_and_search_path() {
    let pooled = pooled(DRIVER_POOL).await;
    // Every psycopg connection names its prepared statements _pg3_0,
    // _pg3_1, ...: the threads' own texts collide on the server side
    // unless the proxy keeps them apart.
    let script = r#"
import sys, threading, psycopg
conninfo, clients, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errors = []
def work(i):
    try:
        with psycopg.connect(conninfo, autocommit=True, application_name=f"py{i}") as conn:
            conn.execute(f"SET search_path = t{i}, public")
            for r in range(rounds):
                # Prepared by psycopg after prepare_threshold (5) executions.
                row = conn.execute("SELECT v, %s::int * 2 FROM marker", (r,)).fetchone()
                assert row == (f"t{i}", r * 2), f"marker round {r}: {row}"
                # Prepared at once; a text of this thread's own.
                row = conn.execute(f"SELECT %s::int + {i * 1000}", (r,), prepare=True).fetchone()
                assert row == (r + i * 1000,), f"own round {r}: {row}"
                # Pipeline mode: many Syncs in flight, SETs among them.
                other = 7 - i % 2
                with conn.pipeline():
                    sums = [conn.execute("SELECT %s::int + %s", (i, k)) for k in range(5)]
                    conn.execute(f"SET search_path = t{other}, public")
                    marker = conn.execute("SELECT v FROM marker")
                    conn.execute(f"SET search_path = t{i}, public")
                got = [cur.fetchone()[0] for cur in sums] + [marker.fetchone()[0]]
                assert got == [i + k for k in range(5)] + [f"t{other}"], f"pipeline round {r}: {got}"
                with conn.transaction():
                    row = conn.execute("SHOW search_path").fetchone()
                    assert row == (f"t{i}, public",), f"search_path round {r}: {row}"
                    row = conn.execute("SELECT current_setting('application_name')").fetchone()
                    assert row == (f"py{i}",), f"application_name round {r}: {row}"
    except Exception as err:
        errors.append(f"thread {i}: {err!r}")
threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print("errors:", errors)
print("psycopg threads done:", clients)
"#;
    let conninfo = format!(
        "{} password=wonder",
        pooled.proxy.conninfo("app", "postgres")
    );
    let out = run_driver(
        &pooled,
        "python3",
        vec!["-c".into(), script.into(), conninfo],
        vec![],
    )
    .await;
    assert!(out.contains("errors: []"), "psycopg:\n{out}");
    assert!(
        out.contains(&format!("psycopg threads done: {DRIVER_CLIENTS}")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_server_prepared_statements_from_concurrent_connections() {
    let pooled = pooled(DRIVER_POOL).await;
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        std::path::Path::new(jar).exists(),
        "pgjdbc is missing: apt-get install -y libpostgresql-jdbc-java"
    );
    let java_dir = tempfile::tempdir().unwrap();
    let source = java_dir.path().join("PooledPrepared.java");
    // pgjdbc names its server-side statements S_1, S_2, ... on every
    // connection; currentSchema is sent as the startup parameter
    // search_path, ApplicationName as application_name. Every fourth round
    // runs inside a transaction (pgjdbc sends BEGIN with the statement).
    std::fs::write(
        &source,
        r#"
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
import org.postgresql.PGStatement;

public class PooledPrepared {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int clients = Integer.parseInt(args[1]);
        int rounds = Integer.parseInt(args[2]);
        ExecutorService threads = Executors.newFixedThreadPool(clients);
        List<Future<String>> outcomes = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int id = i;
            outcomes.add(threads.submit(() -> run(url, id, rounds)));
        }
        for (Future<String> outcome : outcomes) {
            try {
                System.out.println(outcome.get());
            } catch (ExecutionException err) {
                System.out.println("client failed: " + err.getCause());
            }
        }
        threads.shutdown();
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new IllegalStateException(what);
    }

    static String run(String url, int id, int rounds) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", "app");
        props.setProperty("password", "wonder");
        props.setProperty("currentSchema", "t" + id);
        props.setProperty("ApplicationName", "jdbc" + id);
        try (Connection conn = DriverManager.getConnection(url, props)) {
            PreparedStatement marker = conn.prepareStatement(
                "SELECT v, ?::int * 3, current_setting('application_name') FROM marker");
            PreparedStatement own = conn.prepareStatement("SELECT ?::int + " + (id * 1000));
            for (int r = 0; r < rounds; r++) {
                boolean inTransaction = r % 4 == 3;
                conn.setAutoCommit(!inTransaction);
                marker.setInt(1, r);
                try (ResultSet rows = marker.executeQuery()) {
                    check(rows.next(), "no marker row");
                    String got = rows.getString(1) + "/" + rows.getInt(2) + "/" + rows.getString(3);
                    check(got.equals("t" + id + "/" + (r * 3) + "/jdbc" + id),
                          "client " + id + " round " + r + " marker: " + got);
                }
                own.setInt(1, r);
                try (ResultSet rows = own.executeQuery()) {
                    check(rows.next(), "no own row");
                    int got = rows.getInt(1);
                    check(got == r + id * 1000, "client " + id + " round " + r + " own: " + got);
                }
                if (inTransaction) conn.commit();
            }
            conn.setAutoCommit(true);
            boolean server = marker.unwrap(PGStatement.class).isUseServerPrepare()
                && own.unwrap(PGStatement.class).isUseServerPrepare();
            return "client " + id + " ok, server-prepared " + server;
        }
    }
}
"#,
    )
    .unwrap();
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/postgres?prepareThreshold=5",
        pooled.proxy.port
    );
    let source = source.to_str().unwrap().to_string();
    let out = run_driver(
        &pooled,
        "java",
        vec!["-cp".into(), jar.into(), source, url],
        vec![],
    )
    .await;
    for id in 0..DRIVER_CLIENTS {
        assert!(
            out.contains(&format!("client {id} ok, server-prepared true")),
            "pgjdbc client {id}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries_from_concurrent_clients() {
    let pooled = pooled(DRIVER_POOL).await;
    // Every client names its own text "s1": node-postgres parses a named
    // query once per connection, then sends only Bind and Execute.
    let script = r#"
const { Client } = require('pg');
const [port, clients, rounds] = process.argv.slice(1).map(Number);
async function work(id) {
    const client = new Client({ host: '127.0.0.1', port, user: 'app', password: 'wonder',
                                database: 'postgres', application_name: `node${id}` });
    await client.connect();
    try {
        for (let r = 0; r < rounds; r++) {
            const own = await client.query({ name: 's1', text: `SELECT $1::int + ${id * 1000} AS n`,
                                             values: [r] });
            if (own.rows[0].n !== r + id * 1000)
                throw new Error(`client ${id} round ${r} s1: ${JSON.stringify(own.rows)}`);
            const app = await client.query({ name: 'app',
                text: "SELECT current_setting('application_name') AS app, $1::text AS echo",
                values: [`${id}:${r}`] });
            const got = `${app.rows[0].app}/${app.rows[0].echo}`;
            if (got !== `node${id}/${id}:${r}`)
                throw new Error(`client ${id} round ${r} app: ${got}`);
        }
    } finally {
        await client.end();
    }
}
Promise.all([...Array(clients).keys()].map(work))
    .then(() => console.log(`node clients done: ${clients}`))
    .catch(err => { console.log(`node failed: ${err.stack}`); process.exit(1); });
"#;
    let out = run_driver(
        &pooled,
        "node",
        vec!["-e".into(), script.into(), pooled.proxy.port.to_string()],
        // Where .ci/run installs it from npm, then Debian's places (which
        // Debian's nodejs looks in by itself; other builds do not).
        vec![(
            "NODE_PATH",
            format!(
                "{}/.cache/pgmirror-node/node_modules:/usr/share/nodejs:/usr/lib/nodejs",
                std::env::var("HOME").unwrap_or_else(|_| "/root".into())
            ),
        )],
    )
    .await;
    assert!(
        out.contains(&format!("node clients done: {DRIVER_CLIENTS}")),
        "node-postgres:\n{out}"
    );
}

/// Runs pgbench through the proxy with `args` for three seconds while
/// sampling the server's backends and SHOW POOLS; returns pgbench's output,
/// the most backends `app` had, and the largest active + idle of its pool.
async fn pgbench_through(pooled: &Pooled, args: &[&str]) -> (String, i64, i64) {
    let console = pooled.proxy.console().await;
    // A thread per client: pgbench's PQprepare blocks its thread, which
    // could then wait for a connection its other clients hold (README).
    let mut argv: Vec<String> = ["-n", "-c", "8", "-j", "8", "-T", "3"]
        .into_iter()
        .chain(args.iter().copied())
        .map(String::from)
        .collect();
    argv.extend(
        [
            "-h",
            "127.0.0.1",
            "-p",
            &pooled.proxy.port.to_string(),
            "-U",
            "app",
            "postgres",
        ]
        .map(String::from),
    );
    let bench = tokio::spawn(run_script(
        "pgbench",
        argv,
        vec![("PGPASSWORD", "wonder".into())],
    ));
    let (mut backends, mut pool) = (0, 0);
    while !bench.is_finished() {
        backends = backends.max(pooled.backends_of("app").await);
        for row in pooled.pools(&console).await {
            let field = |name: &str| {
                row.iter()
                    .find(|(column, _)| column == name)
                    .map(|(_, value)| value.clone())
                    .unwrap_or_else(|| panic!("SHOW POOLS has no column {name}: {row:?}"))
            };
            if field("user") == "app" {
                let count = |name: &str| field(name).parse::<i64>().expect("a count");
                pool = pool.max(count("active") + count("idle"));
                assert_eq!(field("max"), "2", "SHOW POOLS: {row:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (bench.await.unwrap(), backends, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_and_simple_with_eight_clients_on_two_connections() {
    let pooled = pooled(2).await;
    let (ok, out) = run_client(
        "pgbench",
        &["-i", "-s", "1", &PgInstance::conninfo(pooled.pg.port())],
        &[],
    );
    assert!(ok, "pgbench -i: {out}");
    pooled
        .setup
        .batch_execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO app")
        .await
        .unwrap();

    let mut processed = 0;
    for mode in ["prepared", "simple"] {
        let (out, backends, pool) = pgbench_through(&pooled, &["-M", mode]).await;
        assert!(
            out.contains("number of failed transactions: 0 "),
            "pgbench -M {mode}:\n{out}"
        );
        let count: i64 = out
            .lines()
            .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
            .and_then(|rest| rest.split('/').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no transaction count:\n{out}"));
        assert!(count > 0, "pgbench -M {mode} did nothing:\n{out}");
        processed += count;
        assert!(
            (1..=2).contains(&backends),
            "{backends} backends for app with pool_size 2 (-M {mode})"
        );
        assert!(
            pool <= 2,
            "SHOW POOLS counted {pool} connections (-M {mode})"
        );
    }
    // Every transaction applied whole: the balances agree and the history
    // has a row for each.
    let totals = pooled
        .setup
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint, \
                    (SELECT sum(bbalance) FROM pgbench_branches)::bigint, \
                    (SELECT sum(tbalance) FROM pgbench_tellers)::bigint, \
                    (SELECT sum(delta) FROM pgbench_history)::bigint, \
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let sums: Vec<i64> = (0..4).map(|i| totals.get(i)).collect();
    assert!(sums.iter().all(|sum| *sum == sums[0]), "balances {sums:?}");
    assert_eq!(totals.get::<_, i64>(4), processed, "history rows");
}

/// A raw protocol-3 client: only what the tests need to name statements
/// themselves (tokio-postgres chooses its own names).
struct Raw {
    stream: TcpStream,
}

/// How long a raw client waits for any one message.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

impl Raw {
    /// Logs in as the md5 user `old` with its verifier.
    async fn login(port: u16, verifier: &Md5Verifier) -> Raw {
        Raw::login_greeted(port, verifier).await.0
    }

    /// [`Raw::login`], and the ParameterStatus messages it was greeted
    /// with, in order.
    async fn login_greeted(port: u16, verifier: &Md5Verifier) -> (Raw, Vec<Vec<u8>>) {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut raw = Raw { stream };
        let startup =
            pgmirror::wire::startup::startup_message(&[("user", "old"), ("database", "postgres")]);
        raw.stream.write_all(&startup).await.unwrap();
        let (tag, body) = raw.message().await;
        assert_eq!(tag, b'R', "expected an authentication request: {body:?}");
        assert_eq!(body.get(..4), Some(&5u32.to_be_bytes()[..]), "not md5");
        let salt: [u8; 4] = body[4..8].try_into().unwrap();
        let mut answer = verifier.answer(salt).into_bytes();
        answer.push(0);
        raw.send(&[frame(b'p', &answer)]).await;
        let mut statuses = Vec::new();
        let login = raw.until_ready_keeping(&mut statuses).await;
        assert!(login.contains(&"AuthenticationOk".to_string()), "{login:?}");
        (raw, statuses)
    }

    async fn send(&mut self, messages: &[Vec<u8>]) {
        self.stream
            .write_all(&messages.concat())
            .await
            .expect("send");
    }

    async fn message(&mut self) -> (u8, Vec<u8>) {
        let read = async {
            let tag = self.stream.read_u8().await?;
            let len = self.stream.read_u32().await? as usize;
            let mut body = vec![0; len.saturating_sub(4)];
            self.stream.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>((tag, body))
        };
        tokio::time::timeout(RAW_TIMEOUT, read)
            .await
            .expect("a message in time")
            .expect("read a message")
    }

    /// Messages up to and including ReadyForQuery, each as [`describe`]
    /// writes it (ParameterStatus and BackendKeyData left out).
    async fn until_ready(&mut self) -> Vec<String> {
        self.until_ready_keeping(&mut Vec::new()).await
    }

    /// [`Raw::until_ready`], keeping the ParameterStatus bodies in `statuses`.
    async fn until_ready_keeping(&mut self, statuses: &mut Vec<Vec<u8>>) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let (tag, body) = self.message().await;
            if tag == b'S' {
                statuses.push(body);
            } else if !matches!(tag, b'K' | b'N') {
                seen.push(describe(tag, &body));
            }
            if tag == b'Z' {
                return seen;
            }
        }
    }

    /// Sends a simple Query; the answer up to ReadyForQuery.
    async fn simple(&mut self, sql: &str) -> Vec<String> {
        self.send(&[frame(b'Q', &cstr(sql))]).await;
        self.until_ready().await
    }

    /// Sends `messages` and a Sync; the answer up to ReadyForQuery.
    async fn sync(&mut self, messages: &[Vec<u8>]) -> Vec<String> {
        self.send(messages).await;
        self.send(&[frame(b'S', &[])]).await;
        self.until_ready().await
    }
}

/// A frontend message: tag, length, body.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(text: &str) -> Vec<u8> {
    let mut out = text.as_bytes().to_vec();
    out.push(0);
    out
}

fn parse(statement: &str, query: &str) -> Vec<u8> {
    frame(b'P', &[cstr(statement), cstr(query), vec![0, 0]].concat())
}

/// Bind of `statement` to the unnamed portal, then Execute of it.
fn bind_execute(statement: &str) -> Vec<u8> {
    let bind = frame(b'B', &[cstr(""), cstr(statement), vec![0; 6]].concat());
    let execute = frame(b'E', &[cstr(""), vec![0; 4]].concat());
    [bind, execute].concat()
}

fn describe_statement(statement: &str) -> Vec<u8> {
    frame(b'D', &[vec![b'S'], cstr(statement)].concat())
}

fn close_statement(statement: &str) -> Vec<u8> {
    frame(b'C', &[vec![b'S'], cstr(statement)].concat())
}

/// A backend message in a few words: `DataRow(1)`, `RowDescription(23)`
/// (type oids), `Error(26000)`, `Ready(I)`, ...
fn describe(tag: u8, body: &[u8]) -> String {
    let int16 = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]) as usize;
    let int32 = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().unwrap());
    match tag {
        b'R' if int32(0) == 0 => "AuthenticationOk".into(),
        b'1' => "ParseComplete".into(),
        b'2' => "BindComplete".into(),
        b'3' => "CloseComplete".into(),
        b't' => format!("ParameterDescription({})", int16(0)),
        b'Z' => format!("Ready({})", body[0] as char),
        b'C' => format!(
            "Complete({})",
            String::from_utf8_lossy(&body[..body.len() - 1])
        ),
        b'D' => {
            let len = int32(2) as usize;
            format!("DataRow({})", String::from_utf8_lossy(&body[6..6 + len]))
        }
        b'T' => {
            let mut at = 2;
            let mut types = Vec::new();
            for _ in 0..int16(0) {
                at += body[at..].iter().position(|b| *b == 0).unwrap() + 1;
                types.push(int32(at + 6).to_string());
                at += 18;
            }
            format!("RowDescription({})", types.join(","))
        }
        b'E' => {
            let mut message = body.to_vec();
            message.insert(0, b'E');
            message.splice(1..1, (body.len() as u32 + 4).to_be_bytes());
            let code = pgmirror::wire::startup::error_code(&message).unwrap_or("?");
            format!("Error({code})")
        }
        other => format!("{}({} bytes)", other as char, body.len()),
    }
}

/// What Bind + Execute of a one-row, one-column statement answers.
fn one_row(value: &str) -> Vec<String> {
    [
        "BindComplete".to_string(),
        format!("DataRow({value})"),
        "Complete(SELECT 1)".into(),
        "Ready(I)".into(),
    ]
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_with_the_same_statement_name_get_their_own_results() {
    // One server connection: both clients' statements live on it.
    let pooled = pooled(1).await;
    let verifier: Md5Verifier = verifier_of(&pooled.setup, "old").await.parse().unwrap();
    let port = pooled.proxy.port;
    let mut one = Raw::login(port, &verifier).await;
    let mut two = Raw::login(port, &verifier).await;
    let prepared = |oid: &str| {
        vec![
            "ParseComplete".to_string(),
            "ParameterDescription(0)".into(),
            format!("RowDescription({oid})"),
            "Ready(I)".into(),
        ]
    };
    assert_eq!(
        one.sync(&[parse("s1", "SELECT 1"), describe_statement("s1")])
            .await,
        prepared("23")
    );
    assert_eq!(
        two.sync(&[parse("s1", "SELECT 'two'::text"), describe_statement("s1")])
            .await,
        prepared("25")
    );
    for round in 0..40u32 {
        // Both requests are sent before either answer is read, so the
        // second waits for the first's server connection.
        let (first, second) = if round.is_multiple_of(2) {
            (&mut one, &mut two)
        } else {
            (&mut two, &mut one)
        };
        first.send(&[bind_execute("s1"), frame(b'S', &[])]).await;
        second.send(&[bind_execute("s1"), frame(b'S', &[])]).await;
        assert_eq!(one.until_ready().await, one_row("1"), "round {round}");
        assert_eq!(two.until_ready().await, one_row("two"), "round {round}");
        if round % 10 == 9 {
            assert_eq!(
                two.sync(&[describe_statement("s1")]).await,
                ["ParameterDescription(0)", "RowDescription(25)", "Ready(I)"],
                "round {round}"
            );
        }
    }

    // Closing one client's s1 leaves the other's.
    assert_eq!(
        one.sync(&[close_statement("s1")]).await,
        ["CloseComplete", "Ready(I)"]
    );
    assert_eq!(
        one.sync(&[bind_execute("s1")]).await,
        ["Error(26000)", "Ready(I)"],
        "a closed statement still ran"
    );
    assert_eq!(two.sync(&[bind_execute("s1")]).await, one_row("two"));
    assert_eq!(
        one.sync(&[parse("s1", "SELECT 'again'::text"), bind_execute("s1")])
            .await,
        [&["ParseComplete".to_string()][..], &one_row("again")].concat()
    );
    assert_eq!(two.sync(&[bind_execute("s1")]).await, one_row("two"));
    // The unnamed statement within one batch.
    assert_eq!(
        one.sync(&[parse("", "SELECT 42"), bind_execute("")]).await,
        [&["ParseComplete".to_string()][..], &one_row("42")].concat()
    );
    assert_eq!(pooled.backends_of("old").await, 1);
}

/// Records a difference between `got` and `expected` for `step`.
fn compare<E: AsRef<str>>(
    differences: &mut Vec<String>,
    step: &str,
    got: Vec<String>,
    expected: &[E],
) {
    let expected: Vec<&str> = expected.iter().map(AsRef::as_ref).collect();
    if got != expected {
        differences.push(format!("{step}: got {got:?}, expected {expected:?}"));
    }
}

/// A conversation of two raw clients on `port` about named statements
/// whose every answer PostgreSQL defines; the steps whose answers differ.
/// `label` keeps the table it creates apart from another run's.
async fn statement_semantics(
    port: u16,
    verifier: &Md5Verifier,
    setup: &Client,
    label: &str,
) -> Vec<String> {
    let mut one = Raw::login(port, verifier).await;
    let mut two = Raw::login(port, verifier).await;
    let mut differences = Vec::new();
    let ready = ["Complete(SET)", "Ready(I)"];
    let got = one.simple("SET search_path = t0").await;
    compare(&mut differences, "SET search_path = t0", got, &ready);
    let got = two.simple("SET search_path = t1").await;
    compare(&mut differences, "SET search_path = t1", got, &ready);
    // One text, two result types: each client's statement is its own.
    let typed = |statement: &str| {
        [
            parse(statement, "SELECT v FROM typed"),
            describe_statement(statement),
            bind_execute(statement),
        ]
    };
    let got = one.sync(&typed("a")).await;
    let int_row = [
        "ParseComplete",
        "ParameterDescription(0)",
        "RowDescription(23)",
    ];
    let expected = then(&int_row, one_row("1"));
    compare(&mut differences, "typed in t0", got, &expected);
    let got = two.sync(&typed("b")).await;
    let text_row = [
        "ParseComplete",
        "ParameterDescription(0)",
        "RowDescription(25)",
    ];
    let expected = then(&text_row, one_row("one"));
    compare(&mut differences, "typed in t1 (same text)", got, &expected);
    let got = one.sync(&[bind_execute("a")]).await;
    compare(&mut differences, "typed in t0 again", got, &one_row("1"));

    let got = one.sync(&[parse("a", "SELECT 7")]).await;
    compare(
        &mut differences,
        "Parse of a name in use",
        got,
        &["Error(42P05)", "Ready(I)"],
    );

    let got = one.sync(&[parse("d", "SELECT 4")]).await;
    compare(
        &mut differences,
        "Parse d",
        got,
        &["ParseComplete", "Ready(I)"],
    );
    let got = one.simple("DEALLOCATE d").await;
    compare(
        &mut differences,
        "SQL DEALLOCATE d",
        got,
        &["Complete(DEALLOCATE)", "Ready(I)"],
    );
    let got = one.sync(&[bind_execute("d")]).await;
    compare(
        &mut differences,
        "Bind after DEALLOCATE",
        got,
        &["Error(26000)", "Ready(I)"],
    );

    // A Parse the server refused leaves no statement.
    let got = one.sync(&[parse("e", "SELEC 1")]).await;
    compare(
        &mut differences,
        "Parse of a syntax error",
        got,
        &["Error(42601)", "Ready(I)"],
    );
    let got = one.sync(&[parse("e", "SELECT 1"), bind_execute("e")]).await;
    let expected = then(&["ParseComplete"], one_row("1"));
    compare(
        &mut differences,
        "Parse of the name, corrected",
        got,
        &expected,
    );
    let table = format!("later_{label}");
    let select_later = format!("SELECT n FROM {table}");
    let got = one.sync(&[parse("f", &select_later)]).await;
    compare(
        &mut differences,
        "Parse of a missing table",
        got,
        &["Error(42P01)", "Ready(I)"],
    );
    let got = one.sync(&[bind_execute("f")]).await;
    compare(
        &mut differences,
        "Bind after a failed Parse",
        got,
        &["Error(26000)", "Ready(I)"],
    );
    setup
        .batch_execute(&format!(
            "CREATE TABLE t0.{table} AS SELECT 5 AS n; GRANT SELECT ON t0.{table} TO old"
        ))
        .await
        .unwrap();
    let got = one
        .sync(&[parse("f", &select_later), bind_execute("f")])
        .await;
    let expected = then(&["ParseComplete"], one_row("5"));
    compare(
        &mut differences,
        "Parse once the table exists",
        got,
        &expected,
    );

    // A Parse in a failed transaction is not run.
    let got = one.simple("BEGIN").await;
    compare(
        &mut differences,
        "BEGIN",
        got,
        &["Complete(BEGIN)", "Ready(T)"],
    );
    let got = one.simple("SELECT 1/0").await;
    compare(
        &mut differences,
        "SELECT 1/0",
        got,
        &["Error(22012)", "Ready(E)"],
    );
    let got = one.sync(&[parse("h", "SELECT 6")]).await;
    compare(
        &mut differences,
        "Parse in a failed transaction",
        got,
        &["Error(25P02)", "Ready(E)"],
    );
    let got = one.simple("ROLLBACK").await;
    compare(
        &mut differences,
        "ROLLBACK",
        got,
        &["Complete(ROLLBACK)", "Ready(I)"],
    );
    let got = one.sync(&[parse("h", "SELECT 6"), bind_execute("h")]).await;
    let expected = then(&["ParseComplete"], one_row("6"));
    compare(&mut differences, "Parse after the ROLLBACK", got, &expected);

    // DISCARD ALL drops this client's statements, not the other's.
    let got = one.simple("DISCARD ALL").await;
    compare(
        &mut differences,
        "DISCARD ALL",
        got,
        &["Complete(DISCARD ALL)", "Ready(I)"],
    );
    let got = one.sync(&[bind_execute("a")]).await;
    compare(
        &mut differences,
        "Bind after DISCARD ALL",
        got,
        &["Error(26000)", "Ready(I)"],
    );
    let got = two.sync(&[bind_execute("b")]).await;
    compare(
        &mut differences,
        "the other client's after DISCARD ALL",
        got,
        &one_row("one"),
    );
    differences
}

/// `first`, then `rest`.
fn then(first: &[&str], rest: Vec<String>) -> Vec<String> {
    first.iter().map(|s| s.to_string()).chain(rest).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_answer_as_postgresql_does() {
    let pooled = pooled(1).await;
    let verifier: Md5Verifier = verifier_of(&pooled.setup, "old").await.parse().unwrap();
    let direct = statement_semantics(pooled.pg.port(), &verifier, &pooled.setup, "direct").await;
    assert!(direct.is_empty(), "PostgreSQL itself differs: {direct:#?}");
    let through = statement_semantics(pooled.proxy.port, &verifier, &pooled.setup, "proxy").await;
    assert!(
        through.is_empty(),
        "through transaction pooling: {through:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_of_several_clients_share_two_connections() {
    const CLIENTS: usize = 4;
    const IN_FLIGHT: i32 = 10;
    let pooled = pooled(2).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(pooled.app(&format!("options='-c search_path=t{i}'")).await);
    }
    // tokio-postgres sends the messages of concurrent queries on one
    // client without waiting for the answers: several Syncs in flight.
    let work = clients.iter().enumerate().map(|(i, client)| async move {
        let statement = client
            .prepare("SELECT v, $1::int FROM marker")
            .await
            .expect("prepare");
        let prepared = futures::future::join_all((0..IN_FLIGHT).map(|k| {
            let statement = &statement;
            async move { client.query_one(statement, &[&k]).await }
        }));
        let unprepared = futures::future::join_all(
            (0..IN_FLIGHT)
                .map(|k| async move { client.query_one("SELECT $1::int + 100", &[&k]).await }),
        );
        let (prepared, unprepared) = futures::join!(prepared, unprepared);
        for (k, (row, sum)) in prepared.into_iter().zip(unprepared).enumerate() {
            let row = row.unwrap_or_else(|err| panic!("client {i} query {k}: {err:?}"));
            let sum = sum.unwrap_or_else(|err| panic!("client {i} sum {k}: {err:?}"));
            let got = (
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
                sum.get::<_, i32>(0),
            );
            assert_eq!(
                got,
                (format!("t{i}"), k as i32, k as i32 + 100),
                "client {i}"
            );
        }
    });
    futures::future::join_all(work).await;
    assert!(pooled.backends_of("app").await <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_that_dies_while_idle_goes_unnoticed_by_its_client() {
    let pooled = pooled(2).await;
    let client = pooled.app("application_name=survivor").await;
    client
        .batch_execute("SET search_path = t3, public")
        .await
        .unwrap();
    let statement = client
        .prepare("SELECT v, current_setting('application_name') FROM marker")
        .await
        .unwrap();
    let state = |row: tokio_postgres::Row| (row.get::<_, String>(0), row.get::<_, String>(1));
    let expected = ("t3".to_string(), "survivor".to_string());
    assert_eq!(
        state(client.query_one(&statement, &[]).await.unwrap()),
        expected
    );
    pooled.terminate_backends_of("app").await;
    let row = client
        .query_one(&statement, &[])
        .await
        .expect("the first statement after the pooled connection died");
    assert_eq!(state(row), expected);
    assert_eq!(value(&client, "SHOW search_path").await, "t3, public");
}

/// What a failover does to a driver between statements: it drops a
/// statement (tokio-postgres sends Close and Sync, and reads no answer)
/// and prepares the next, and the server connection dies before answering
/// either (its backend is stopped, then killed with kill -9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_and_a_prepare_in_flight_when_the_server_dies_leave_the_client_connected() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pooled = pooled(1).await;
    let client = pooled.app("").await;
    let dropped = client.prepare("SELECT v FROM t0.marker").await.unwrap();
    client.query_one(&dropped, &[]).await.unwrap();
    let backend = Pid::from_raw(backend_pid(&client).await);
    kill(backend, Signal::SIGSTOP).expect("SIGSTOP the pooled connection's backend");
    drop(dropped);
    let (outcome, ()) = tokio::join!(client.prepare("SELECT 2"), async {
        // Both in flight on the stopped backend's connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill(backend, Signal::SIGKILL).expect("kill -9 the backend");
    });
    nothing_ran_and_the_client_stays(outcome, &client);
    // The server restarts after the kill -9; the proxy holds the client's
    // next statement until it serves.
    assert_eq!(value(&client, "SELECT 'still here'").await, "still here");
    let statement = client.prepare("SELECT 3").await.unwrap();
    assert_eq!(
        client
            .query_one(&statement, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
}

/// The FATAL of a backend that ends (57P01, as a demoted principal's
/// backends end) while the client's prepare waits on it is the server
/// going away, not the prepare's answer: the client gets 40001 and stays.
/// The prepare waits for a lock, so that the backend has read it and
/// closes cleanly, and its FATAL arrives (a backend that dies with unread
/// input resets the connection, and the FATAL is lost with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_whose_backend_is_terminated_gets_40001_not_the_servers_fatal() {
    let pooled = pooled(1).await;
    let client = pooled.app("").await;
    let pid = backend_pid(&client).await;
    pooled
        .setup
        .batch_execute("BEGIN; LOCK TABLE t0.marker IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (outcome, ()) = tokio::join!(client.prepare("SELECT v FROM t0.marker"), async {
        let waiting = "SELECT count(*) FROM pg_stat_activity \
                       WHERE pid = $1 AND wait_event_type = 'Lock'";
        for _ in 0..250 {
            let row = pooled.setup.query_one(waiting, &[&pid]).await.unwrap();
            if row.get::<_, i64>(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let row = pooled.setup.query_one(waiting, &[&pid]).await.unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            1,
            "the prepare never waited for the lock"
        );
        pooled
            .setup
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    });
    pooled.setup.batch_execute("ROLLBACK").await.unwrap();
    nothing_ran_and_the_client_stays(outcome, &client);
    let statement = client.prepare("SELECT v FROM t0.marker").await.unwrap();
    let row = client.query_one(&statement, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "t0");
}

/// A prepare whose server connection went before answering got 40001
/// ("nothing ran, run it again"), and its client is still connected.
fn nothing_ran_and_the_client_stays<T: std::fmt::Debug>(
    prepared: Result<T, tokio_postgres::Error>,
    client: &Client,
) {
    let err = prepared.expect_err("a prepare the server never answered succeeded");
    assert_eq!(
        err.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE),
        "the prepare's error: {err:?}"
    );
    assert!(!client.is_closed(), "the client's connection was ended");
}

/// The pid of the backend that runs `client`'s next statement (the only
/// one of a pool of one).
async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A server that refuses a new connection (here the role's CONNECTION
/// LIMIT) fails the statement that needed it, not the client: its session
/// goes on once the server accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_a_new_connection_fails_the_statement_not_the_client() {
    let pooled = pooled(2).await;
    let client = pooled.app("application_name=patient").await;
    client
        .batch_execute("SET search_path = t5, public")
        .await
        .unwrap();
    let statement = client.prepare("SELECT v FROM marker").await.unwrap();
    pooled
        .setup
        .batch_execute("ALTER ROLE app CONNECTION LIMIT 0")
        .await
        .unwrap();
    pooled.terminate_backends_of("app").await;
    let err = client
        .query_one(&statement, &[])
        .await
        .expect_err("a statement ran on a connection the server refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert!(!client.is_closed(), "the client's connection was ended");
    pooled
        .setup
        .batch_execute("ALTER ROLE app CONNECTION LIMIT -1")
        .await
        .unwrap();
    let row = client.query_one(&statement, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "t5");
    assert_eq!(value(&client, "SHOW application_name").await, "patient");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_used_on_another_connection_is_prepared_there_even_if_its_bind_fails() {
    let pooled = pooled(2).await;
    let verifier: Md5Verifier = verifier_of(&pooled.setup, "old").await.parse().unwrap();
    let mut client = Raw::login(pooled.proxy.port, &verifier).await;
    let mut holder = Raw::login(pooled.proxy.port, &verifier).await;
    assert_eq!(
        client.sync(&[parse("s1", "SELECT 1")]).await,
        ["ParseComplete", "Ready(I)"]
    );
    // The only connection so far is held: the client's next batch runs on
    // a new one, where s1 is not prepared yet.
    assert_eq!(
        holder.simple("BEGIN").await,
        ["Complete(BEGIN)", "Ready(T)"]
    );
    let one_parameter = [
        cstr(""),
        cstr("s1"),
        vec![0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0],
    ]
    .concat();
    let execute = frame(b'E', &[cstr(""), vec![0; 4]].concat());
    assert_eq!(
        client.sync(&[frame(b'B', &one_parameter), execute]).await,
        ["Error(08P01)", "Ready(I)"],
        "a Bind with a parameter too many"
    );
    assert_eq!(
        client.sync(&[describe_statement("s1")]).await,
        ["ParameterDescription(0)", "RowDescription(23)", "Ready(I)"]
    );
    assert_eq!(client.sync(&[bind_execute("s1")]).await, one_row("1"));
    assert_eq!(
        holder.simple("COMMIT").await,
        ["Complete(COMMIT)", "Ready(I)"]
    );
    assert_eq!(client.sync(&[bind_execute("s1")]).await, one_row("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_its_own_clients_query_and_no_other() {
    let pooled = pooled(2).await;
    let sleeper = pooled.app("application_name=sleeper").await;
    let other = pooled.app("application_name=other").await;
    let idle = pooled.app("application_name=idle").await;
    // The idle client used a server connection a moment ago: a cancel of
    // it must not reach whatever that connection runs now.
    assert_eq!(value(&idle, "SELECT 1").await, "1");
    let sleeper_token = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move {
        let outcome = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (sleeper, outcome.map(|_| ()))
    });
    let other_sleep = tokio::spawn(async move { other.simple_query("SELECT pg_sleep(3)").await });
    common::pg::await_running(&pooled.setup, "SELECT pg_sleep(%", 2).await;

    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel of the idle client");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sleeping.is_finished() && !other_sleep.is_finished(),
        "the idle client's cancel stopped another client's query"
    );

    sleeper_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel of the sleeper");
    let (sleeper, outcome) = tokio::time::timeout(Duration::from_secs(2), sleeping)
        .await
        .expect("the cancel stopped pg_sleep(30) in time")
        .unwrap();
    let err = outcome.expect_err("pg_sleep(30) was not cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(
        !other_sleep.is_finished(),
        "the sleeper's cancel stopped the other client's query"
    );
    let other_outcome = tokio::time::timeout(Duration::from_secs(5), other_sleep)
        .await
        .expect("the other client's pg_sleep(3) ended")
        .unwrap();
    assert!(
        other_outcome.is_ok(),
        "the other client's query: {other_outcome:?}"
    );
    assert_eq!(value(&sleeper, "SELECT 2").await, "2", "after the cancel");
    assert_eq!(value(&idle, "SELECT 3").await, "3", "after its cancel");
}

/// A client's session state, as one row of the settings transaction mode
/// must carry, and the server backend that answered.
const STATE: &str = "SELECT v, current_setting('application_name'), \
                     current_setting('search_path'), current_setting('DateStyle'), \
                     current_setting('statement_timeout'), pg_backend_pid() FROM marker";

/// Client `i` of the session-state test: startup parameters
/// application_name=state{i} (and for even `i`, options -c
/// DateStyle=German), then SET search_path and statement_timeout; checks
/// them for `ROUNDS` transactions against the other clients, then what
/// does not stick (rollback, SET LOCAL) and RESET. Returns the server
/// backends it ran on.
async fn session_state_client(pooled: &Pooled, i: usize) -> std::collections::BTreeSet<String> {
    let german = i.is_multiple_of(2);
    let options = if german {
        " options='-c DateStyle=German'"
    } else {
        ""
    };
    let client = pooled
        .app(&format!("application_name=state{i}{options}"))
        .await;
    let datestyle = if german { "German, DMY" } else { "ISO, MDY" };
    let own_path = format!("t{i}, public");
    client
        .batch_execute(&format!(
            "SET search_path = t{i}, public; SET statement_timeout = '{}s'",
            i + 1
        ))
        .await
        .unwrap();
    let state = || async {
        let row = rows(client.simple_query(STATE).await.expect("state"))
            .into_iter()
            .next()
            .expect("a marker row");
        row.into_iter().map(|(_, value)| value).collect::<Vec<_>>()
    };
    let mut backends = std::collections::BTreeSet::new();
    let app_name = format!("state{i}");
    let timeout = format!("{}s", i + 1);
    for round in 0..ROUNDS {
        let mut got = state().await;
        backends.insert(got.pop().unwrap());
        let expected = [&format!("t{i}"), &app_name, &own_path, datestyle, &timeout];
        assert_eq!(got, expected, "client {i} round {round}");
        // Hold a server connection a little, so the others move around.
        client
            .batch_execute("BEGIN; SELECT pg_sleep(0.01); COMMIT")
            .await
            .unwrap();
        assert_eq!(
            value(&client, "SHOW search_path").await,
            own_path,
            "client {i}"
        );
    }

    // Neither a rolled-back SET, nor a failed transaction's, nor SET LOCAL
    // sticks.
    client
        .batch_execute("BEGIN; SET search_path = nowhere; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        value(&client, "SHOW search_path").await,
        own_path,
        "client {i} after ROLLBACK"
    );
    client
        .batch_execute("BEGIN; SET search_path = nowhere; SELECT 1/0")
        .await
        .expect_err("division by zero");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        value(&client, "SHOW search_path").await,
        own_path,
        "client {i} after a failed transaction"
    );
    let inside = rows(
        client
            .simple_query("BEGIN; SET LOCAL search_path = nowhere; SHOW search_path; COMMIT")
            .await
            .unwrap(),
    );
    assert_eq!(
        inside[0][0].1, "nowhere",
        "SET LOCAL inside its transaction"
    );
    assert_eq!(
        value(&client, "SHOW search_path").await,
        own_path,
        "client {i} after SET LOCAL"
    );
    // A SET in a committed transaction sticks.
    client
        .batch_execute(&format!("BEGIN; SET application_name = renamed{i}; COMMIT"))
        .await
        .unwrap();
    assert_eq!(
        value(&client, "SELECT current_setting('application_name')").await,
        format!("renamed{i}")
    );

    // RESET goes back to the session's default: the startup value, if any.
    client.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(
        value(&client, "SHOW search_path").await,
        "\"$user\", public",
        "client {i} RESET"
    );
    client
        .batch_execute("RESET application_name")
        .await
        .unwrap();
    assert_eq!(
        value(&client, "SHOW application_name").await,
        app_name,
        "client {i} RESET"
    );
    client
        .batch_execute("SET search_path = nowhere; RESET ALL")
        .await
        .unwrap();
    let after_reset_all = [
        value(&client, "SHOW search_path").await,
        value(&client, "SHOW statement_timeout").await,
        value(&client, "SHOW DateStyle").await,
    ];
    assert_eq!(
        after_reset_all,
        ["\"$user\", public", "0", datestyle],
        "client {i} after RESET ALL"
    );

    // A SET undone by ROLLBACK TO SAVEPOINT does not stick either.
    client
        .batch_execute(
            "BEGIN; SAVEPOINT a; SET search_path = nowhere; ROLLBACK TO SAVEPOINT a; COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(
        value(&client, "SHOW search_path").await,
        "\"$user\", public",
        "client {i} after ROLLBACK TO SAVEPOINT"
    );
    backends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_follows_each_client_across_server_connections() {
    const CLIENTS: usize = 5;
    let pooled = pooled(2).await;
    let everyone =
        futures::future::join_all((0..CLIENTS).map(|i| session_state_client(&pooled, i))).await;
    assert!(
        everyone.iter().any(|backends| backends.len() > 1),
        "no client ever changed server connection: {everyone:?}"
    );
    let all: std::collections::BTreeSet<_> = everyone.into_iter().flatten().collect();
    assert!(all.len() <= 2, "backends {all:?} with pool_size 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_session_features_name_pool_mode_and_leave_the_connection_usable() {
    let pooled = pooled(2).await;
    let client = pooled.app("").await;
    for sql in [
        "LISTEN news",
        "listen news",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "SELECT pg_advisory_lock_shared(1)",
        "CREATE TEMP TABLE scratch (n int)",
        "CREATE TEMPORARY TABLE scratch (n int)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE p AS SELECT 1",
    ] {
        let simple = client.simple_query(sql).await.map(|_| ());
        assert_refused(simple, sql);
        let extended = client.query(sql, &[]).await.map(|_| ());
        assert_refused(extended, &format!("{sql} (extended protocol)"));
        assert_eq!(value(&client, "SELECT 1").await, "1", "after {sql}");
    }
    // Nothing was taken or made on the server.
    let left: i64 = pooled
        .setup
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "an advisory lock was taken");
    assert_eq!(
        value(&client, "SELECT to_regclass('scratch') IS NULL").await,
        "t",
        "a temp table was made"
    );
    // The transaction-scoped forms are fine.
    let locked = client
        .simple_query("BEGIN; SELECT pg_advisory_xact_lock(1); COMMIT")
        .await;
    assert!(locked.is_ok(), "pg_advisory_xact_lock: {locked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_spellings_of_temporary_tables_are_refused_too() {
    let pooled = pooled(1).await;
    let client = pooled.app("").await;
    let next = pooled.app("").await;
    for (sql, table) in [
        ("SELECT 1 AS n INTO TEMP scratch", "scratch"),
        ("SELECT 1 AS n INTO TEMPORARY TABLE scratch", "scratch"),
        ("CREATE TABLE pg_temp.scratch (n int)", "pg_temp.scratch"),
    ] {
        let outcome = client.simple_query(sql).await.map(|_| ());
        let seen = value(&next, &format!("SELECT to_regclass('{table}') IS NOT NULL")).await;
        assert_eq!(seen, "f", "{sql}: another client sees its temporary table");
        assert_refused(outcome, sql);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_transaction_or_mid_query_leaves_nothing_behind() {
    let pooled = pooled(1).await;
    let next = pooled.app("").await;
    let leaver = pooled.app("").await;
    leaver
        .batch_execute("BEGIN; INSERT INTO items VALUES (1); SET LOCAL search_path = nowhere")
        .await
        .unwrap();
    drop(leaver);
    let state = value(
        &next,
        "SELECT format('%s %s %s', (SELECT count(*) FROM items), \
         txid_current_if_assigned() IS NULL, current_setting('search_path'))",
    )
    .await;
    assert_eq!(
        state, "0 t \"$user\", public",
        "after a client left mid-transaction"
    );

    let sleeper = pooled.app("").await;
    let sleeping = tokio::spawn(async move {
        let _ = sleeper.simple_query("SELECT 'sleeper', pg_sleep(1)").await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sleeping.abort();
    let _ = sleeping.await;
    assert_eq!(
        value(&next, "SELECT 'next'").await,
        "next",
        "after a client left while its query ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_for_a_busy_pool_up_to_hold_timeout_then_gets_53300() {
    let pooled = pooled(1).await;
    let holder = pooled.app("").await;
    let waiter = pooled.app("").await;
    holder.batch_execute("BEGIN").await.unwrap();
    // A transaction that ends while the other client waits hands it the
    // connection.
    let waiting = tokio::spawn(async move {
        let answer = value(&waiter, "SELECT 'waited'").await;
        (waiter, answer)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the second client did not wait");
    holder.batch_execute("COMMIT").await.unwrap();
    let (waiter, answer) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting client got the connection")
        .unwrap();
    assert_eq!(answer, "waited");

    // No connection comes free within hold_timeout (5 s): 53300, an ERROR
    // that leaves the client its connection and session.
    waiter
        .batch_execute("SET application_name = 'patient'")
        .await
        .unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let started = std::time::Instant::now();
    let err = waiter
        .simple_query("SELECT 'too late'")
        .await
        .expect_err("a client got a connection the pool did not have");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "it did not wait"
    );
    let db = err.as_db_error().expect("a server-style error");
    assert_eq!(db.severity(), "ERROR", "{db}");
    let statement = waiter.prepare("SELECT $1::int").await;
    assert!(
        statement.is_err(),
        "the extended protocol waits too, and is refused the same way"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        value(&waiter, "SHOW application_name").await,
        "patient",
        "the refused client lost its session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_is_greeted_while_every_connection_of_its_pool_is_busy() {
    let pooled = pooled(1).await;
    let port = pooled.proxy.port;
    let verifier: Md5Verifier = verifier_of(&pooled.setup, "old").await.parse().unwrap();
    // The first login takes the pool's one connection to see what the
    // server reports; then it holds it in a transaction.
    let (mut holder, first) = Raw::login_greeted(port, &verifier).await;
    assert!(
        first
            .iter()
            .any(|status| status.starts_with(b"server_version\0")),
        "no server_version in the greeting: {first:?}"
    );
    holder.simple("BEGIN").await;

    // A login with the same parameters is greeted at once, as the server
    // greeted the first, and does not wait (up to hold_timeout, 5 s) for
    // the connection.
    let greeted = Raw::login_greeted(port, &verifier);
    let (mut waiter, second) = tokio::time::timeout(Duration::from_secs(3), greeted)
        .await
        .expect("the login waited for the busy connection");
    assert_eq!(second, first, "greeted otherwise than the server greets");

    // Its first statement is what waits for the connection.
    let query = tokio::spawn(async move { waiter.simple("SELECT 'waited'").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!query.is_finished(), "the statement did not wait");
    holder.simple("COMMIT").await;
    let answer = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("the statement got the connection")
        .unwrap();
    assert!(
        answer.contains(&"DataRow(waited)".to_string()),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_through_the_pool() {
    use futures::{SinkExt, StreamExt};
    let pooled = pooled(2).await;
    let client = pooled.app("").await;
    let sink = client
        .copy_in::<_, bytes::Bytes>("COPY items FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    let mut sink = Box::pin(sink);
    for n in 0..1000 {
        sink.send(bytes::Bytes::from(format!("{n}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.expect("COPY finished"), 1000);
    assert_eq!(value(&client, "SELECT count(*) FROM items").await, "1000");
    let out = client
        .copy_out("COPY (SELECT n FROM items ORDER BY n LIMIT 3) TO STDOUT")
        .await
        .expect("COPY TO STDOUT");
    let chunks: Vec<_> = Box::pin(out).collect().await;
    let text: String = chunks
        .into_iter()
        .map(|chunk| String::from_utf8_lossy(&chunk.expect("COPY data")).into_owned())
        .collect();
    assert_eq!(text, "0\n1\n2\n");
    assert_eq!(
        value(&client, "SELECT 'still usable'").await,
        "still usable"
    );
}

/// Asserts that `outcome` is the refusal transaction mode gives a session
/// feature: ERROR (not FATAL) 0A000 naming pool_mode.
fn assert_refused(outcome: Result<(), tokio_postgres::Error>, what: &str) {
    let err = outcome.expect_err(&format!("{what} was not refused"));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: not a server error: {err}"));
    assert_eq!(db.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{what}: {db}");
    assert_eq!(db.severity(), "ERROR", "{what}: {db}");
    assert!(
        db.message().contains("pool_mode"),
        "{what}: {}",
        db.message()
    );
}

/// A proxy that stops tells its transaction-mode clients so (FATAL 57P01)
/// at once: the one idle between statements and the one whose query runs.
/// Each waits for the shutdown once for its whole life; a wait that missed
/// it would leave both until the proxy's grace period ran out and then
/// close them without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_proxy_tells_idle_and_busy_clients_57p01() {
    let pooled = pooled(2).await;
    let conninfo = format!(
        "{} password=wonder",
        pooled.proxy.conninfo("app", "postgres")
    );
    let (idle, idle_connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    let idle_connection = tokio::spawn(idle_connection);
    assert_eq!(value(&idle, "SELECT 'ran'").await, "ran");
    let busy = pooled.app("application_name=busy").await;
    let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(30)").await });
    common::pg::await_running(&pooled.setup, "SELECT pg_sleep(30)", 1).await;
    let Pooled { proxy, setup, pg } = pooled;
    let stopping = tokio::time::Instant::now();
    proxy.stop().await;
    // Told at once, both leave: the proxy ends well before its grace.
    let stopped = stopping.elapsed();
    assert!(
        stopped < pgmirror::proxy::SHUTDOWN_GRACE / 2,
        "the proxy took {stopped:?} to stop"
    );
    let told = |what: &str, err: tokio_postgres::Error| {
        assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{what}: {err}");
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), sleeping)
        .await
        .expect("the busy client's answer came once the proxy stopped")
        .unwrap();
    told("busy", answer.expect_err("pg_sleep ended by the shutdown"));
    let ended = tokio::time::timeout(Duration::from_secs(2), idle_connection)
        .await
        .expect("the idle client's connection ended once the proxy stopped")
        .unwrap();
    told(
        "idle",
        ended.expect_err("the idle connection ended by the shutdown"),
    );
    println!("both told; the proxy stopped in {stopped:?}");
    drop((setup, pg));
}

#[test]
fn transaction_mode_with_pass_through_authentication_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/proxy.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let last_section = text.rfind("\n[").map(|at| &text[at + 1..]);
    assert!(
        last_section.is_some_and(|section| section.starts_with("[sessions.shop]")),
        "the example no longer ends with [sessions.shop]"
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, format!("{text}pool_mode = \"transaction\"\n")).unwrap();
    let (code, output) = run(&["proxy", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{output}");
    let problem = format!("{}: sessions.shop.pool_mode: ", path.display());
    assert!(output.contains(&problem), "{output}");
    assert!(!output.contains("not implemented"), "{output}");
    assert!(
        output.contains("auth = \"userlist\" or \"query\""),
        "the message does not say how to fix it: {output}"
    );
}
