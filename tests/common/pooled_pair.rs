//! `PooledPair`: a mirrored pair with a witness of its own behind an
//! in-process proxy whose session `shop` pools in transaction mode with
//! proxy-side authentication: the SCRAM user `app` is created on the
//! principal and its verifier copied from pg_authid into a userlist, as an
//! administrator would (no plaintext password in any config). Also the
//! failovers tests put such a pair through, and `TenantClient`, an idle
//! client with session state of its own (search_path, application_name)
//! that checks where and how its next statement ran.

use std::time::Duration;

use tempfile::TempDir;
use tokio_postgres::Client;

use super::cluster::{Pair, PairOptions, Partner, WitnessChoice, SLOW};
use super::proxy::{verifier_of, ProxyHandle, ADMIN};

/// `app`'s password, typed only by its clients.
pub const APP_PASSWORD: &str = "wonder";

/// The proxy's `max_clients`: room for a benchmark's 1,000 idle clients.
const MAX_CLIENTS: usize = 2000;

/// Logins under way at once in [`TenantClient::connect_many`].
const CONCURRENT_LOGINS: usize = 32;

/// How the principal changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// `ALTER DATABASE shop SET PARTNER FAILOVER` on the proxy's console.
    Manual,
    /// kill -9 of the principal's PostgreSQL and agent, once the session is
    /// synchronized at the witness, which then fails over on its own.
    Kill9,
}

/// Created by a test, dropped at its end: the proxy (first field) stops
/// before the pair's processes are killed; the userlist's directory goes
/// last.
pub struct PooledPair {
    pub proxy: ProxyHandle,
    pub pair: Pair,
    _userlist: TempDir,
}

impl PooledPair {
    /// Starts the pair (with a witness of its own, whatever `options`
    /// says), waits until the witness records it synchronized, creates
    /// `app` and starts the proxy with `pool_size` server connections per
    /// pool and the `session` keys given.
    pub async fn start(options: PairOptions, pool_size: usize, session: &str) -> PooledPair {
        let pair = Pair::start(PairOptions {
            witness: WitnessChoice::Own,
            ..options
        });
        pair.wait_state("SYNCHRONIZED").await;
        pair.wait_witness_synchronized().await;
        let setup = pair.a.sql().await;
        setup
            .batch_execute(&format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"
            ))
            .await
            .expect("create the SCRAM user app");
        let dir = tempfile::Builder::new()
            .prefix("pgmirror-userlist-")
            .tempdir()
            .expect("temp dir");
        let userlist = dir.path().join("userlist.txt");
        let verifier = verifier_of(&setup, "app").await;
        std::fs::write(&userlist, format!("\"app\" \"{verifier}\"\n")).expect("write userlist");
        let keys = format!(
            "auth = \"userlist\"\nauth_file = {userlist:?}\npool_mode = \"transaction\"\n\
             pool_size = {pool_size}\n{session}"
        );
        let top = format!("max_clients = {MAX_CLIENTS}\n{ADMIN}");
        let proxy = ProxyHandle::in_front_of_with(&pair, &top, &keys).await;
        PooledPair {
            proxy,
            pair,
            _userlist: dir,
        }
    }

    /// A client of `app` through the proxy; `extra` is more conninfo.
    pub async fn app(&self, extra: &str) -> Result<Client, tokio_postgres::Error> {
        self.proxy
            .connect_as("app", &format!("password={APP_PASSWORD} {extra}"))
            .await
    }

    /// Whether the role table names `partner` principal now.
    pub async fn is_principal(&self, partner: &Partner) -> bool {
        self.pair
            .status(partner)
            .await
            .mirroring_role_desc
            .as_deref()
            == Some("PRINCIPAL")
    }

    /// The partner the role table names principal (both must be up).
    pub async fn principal(&self) -> &Partner {
        if self.is_principal(&self.pair.a).await {
            &self.pair.a
        } else {
            &self.pair.b
        }
    }

    /// Changes the principal `how`; returns once the other partner is
    /// principal, with its PostgreSQL port.
    pub async fn fail_over(&mut self, how: Failover) -> u16 {
        let a_was_principal = self.is_principal(&self.pair.a).await;
        match how {
            Failover::Manual => {
                self.proxy
                    .console()
                    .await
                    .simple_query("ALTER DATABASE shop SET PARTNER FAILOVER")
                    .await
                    .expect("FAILOVER on the console");
            }
            Failover::Kill9 => {
                // Only a synchronized mirror is promoted automatically (I3).
                self.pair.wait_state("SYNCHRONIZED").await;
                self.pair.wait_witness_synchronized().await;
                if a_was_principal {
                    self.pair.a.kill9();
                } else {
                    self.pair.b.kill9();
                }
            }
        }
        let new = if a_was_principal {
            &self.pair.b
        } else {
            &self.pair.a
        };
        self.pair
            .wait_for(new, "principal", SLOW, |status| {
                status.mirroring_role_desc.as_deref() == Some("PRINCIPAL")
            })
            .await;
        new.pg_port()
    }
}

/// Schemas `c0` .. `c{count - 1}`, each with a table `hits` that inherits
/// `public.hits (round, client)` and that `app` may insert into.
pub async fn create_tenant_schemas(setup: &Client, count: usize) {
    setup
        .batch_execute(&format!(
            "CREATE TABLE public.hits (round int, client int);
             DO $$ BEGIN FOR i IN 0..{} LOOP
               EXECUTE format('CREATE SCHEMA c%s; CREATE TABLE c%s.hits () INHERITS (public.hits);
                               GRANT USAGE ON SCHEMA c%s TO app; GRANT INSERT ON c%s.hits TO app',
                              i, i, i, i);
             END LOOP; END $$",
            count - 1
        ))
        .await
        .expect("create tenant schemas");
}

/// How many clients' hits of `round` landed in their own schema.
pub async fn hits_in_own_schema(setup: &Client, round: i32) -> i64 {
    setup
        .query_one(
            "SELECT count(*) FROM public.hits \
             WHERE round = $1 AND tableoid = format('c%s.hits', client)::regclass",
            &[&round],
        )
        .await
        .expect("count hits")
        .get(0)
}

/// An idle client of `app`: application_name `client{index}` set at
/// connect, `SET search_path = c{index}` run once.
pub struct TenantClient {
    pub index: i32,
    pub client: Client,
}

/// What a [`TenantClient`]'s statement saw of its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub port: i32,
    pub in_recovery: bool,
}

impl TenantClient {
    pub async fn connect(pooled: &PooledPair, index: i32) -> Result<TenantClient, String> {
        let client = pooled
            .app(&format!("application_name=client{index}"))
            .await
            .map_err(|err| format!("client {index}: login: {}", describe(&err)))?;
        client
            .batch_execute(&format!("SET search_path = c{index}"))
            .await
            .map_err(|err| format!("client {index}: SET search_path: {}", describe(&err)))?;
        Ok(TenantClient { index, client })
    }

    /// `count` clients, [`CONCURRENT_LOGINS`] logging in at a time.
    pub async fn connect_many(pooled: &PooledPair, count: usize) -> Vec<TenantClient> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(0..count as i32)
            .map(|index| TenantClient::connect(pooled, index))
            .buffered(CONCURRENT_LOGINS)
            .try_collect()
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Reads its settings and the server it runs on, and inserts a hit of
    /// `round` into `hits` (its own schema's, by search_path). An error
    /// says what went wrong: a statement's error or a setting not its own.
    pub async fn check(&self, round: i32) -> Result<Served, String> {
        let index = self.index;
        let fail = |what: &str, err: tokio_postgres::Error| {
            format!("client {index}: {what}: {}", describe(&err))
        };
        let row = self
            .client
            .query_one(
                "SELECT current_setting('search_path'), current_setting('application_name'), \
                 inet_server_port(), pg_is_in_recovery()",
                &[],
            )
            .await
            .map_err(|err| fail("SELECT", err))?;
        let (search_path, application_name): (String, String) = (row.get(0), row.get(1));
        if search_path != format!("c{index}") || application_name != format!("client{index}") {
            return Err(format!(
                "client {index}: search_path {search_path:?}, application_name \
                 {application_name:?}: not its own"
            ));
        }
        let inserted = self
            .client
            .execute(
                "INSERT INTO hits (round, client) VALUES ($1, $2)",
                &[&round, &index],
            )
            .await
            .map_err(|err| fail("INSERT", err))?;
        if inserted != 1 {
            return Err(format!("client {index}: INSERT inserted {inserted} rows"));
        }
        Ok(Served {
            port: row.get(2),
            in_recovery: row.get(3),
        })
    }
}

/// Every client runs [`TenantClient::check`] at once, within `limit`;
/// returns the outcome of each, in order.
pub async fn check_all(
    clients: &[TenantClient],
    round: i32,
    limit: Duration,
) -> Vec<Result<Served, String>> {
    let checks = clients.iter().map(|client| async move {
        tokio::time::timeout(limit, client.check(round))
            .await
            .unwrap_or_else(|_| Err(format!("client {}: no answer in {limit:?}", client.index)))
    });
    futures::future::join_all(checks).await
}

/// What went wrong for each client that did not run on the writable
/// server on `port` with its own settings.
pub fn not_on_principal(outcomes: Vec<Result<Served, String>>, port: u16) -> Vec<String> {
    outcomes
        .into_iter()
        .filter_map(|outcome| match outcome {
            Ok(served) if served.port == i32::from(port) && !served.in_recovery => None,
            Ok(served) => Some(format!("ran on {served:?}, not the principal on {port}")),
            Err(err) => Some(err),
        })
        .collect()
}

/// An error as a reader needs it: SQLSTATE and message of a server's error,
/// else what ended the connection.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
    }
}
