//! The admin console server (`dbname=pgmirror` on the proxy port), built on
//! the pgwire crate: SCRAM-SHA-256 login with the `[admin]` user and
//! password, then simple-protocol statements parsed by `admin::statement`
//! and answered from the proxy's routes and client registry, or forwarded
//! to the right partner agent.
//!
//! pgwire reads the startup packet itself, but the proxy has already read
//! it to route by dbname; so the console listens on a Unix socket in a
//! private (0700) directory and the proxy splices admin connections there,
//! replaying the startup packet. The directory is removed when
//! [`ConsoleSocket`] drops. Each connection is one task; dropping it ends
//! the connection.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset, Utc};
use futures::{stream, Sink};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::{ClientInfo, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use rusqlite::types::Value;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::request::{self, Request};
use crate::admin::sql::{self, SqlError, TableDef};
use crate::admin::statement::{PartnerOption, Statement};
use crate::admin::view::{self, Cell, PartnerRow, RowSet, SessionRow, SqlType, WitnessRow};
use crate::admin::{functions, settings};
use crate::config::{AdminConfig, Endpoint, ProxySession};
use crate::control::{Command, ControlClient, HistoryRecord, REQUEST_TIMEOUT};
use crate::proxy::clients::Clients;
use crate::proxy::commands::{self, CommandError, Turns};
use crate::proxy::routing::Route;
use crate::roles::Role;
use crate::tls::EndpointTls;

/// SCRAM iteration count, PostgreSQL's default.
const SCRAM_ITERATIONS: usize = 4096;

/// What the console reads and whom it talks to; shared by its connections.
pub struct ConsoleState {
    pub sessions: BTreeMap<String, (ProxySession, watch::Receiver<Route>)>,
    pub clients: Clients,
    pub pools: crate::proxy::pool::Pools,
    pub endpoint_tls: EndpointTls,
    pub admin: AdminConfig,
    /// One ALTER DATABASE at a time per session.
    pub turns: Turns,
}

/// The private directory holding the console's socket; removed on drop.
pub struct ConsoleSocket {
    dir: PathBuf,
    pub path: PathBuf,
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Binds the console's socket and serves it until `shutdown`.
pub fn start(
    state: Arc<ConsoleState>,
    shutdown: CancellationToken,
) -> std::io::Result<ConsoleSocket> {
    let dir = std::env::temp_dir().join(format!(
        "pgmirror-proxy-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("console.sock");
    let listener = UnixListener::bind(&path)?;
    let socket = ConsoleSocket {
        dir,
        path: path.clone(),
    };
    let login = Arc::new(AdminLogin::new(&state.admin));
    let console = Arc::new(Console {
        state,
        catalog: view::catalog(),
    });
    let handlers = Arc::new(Handlers { console, login });
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let handlers = handlers.clone();
                    tokio::spawn(async move {
                        if let Err(err) = pgwire::tokio::process_socket_unix(stream, handlers).await
                        {
                            tracing::debug!("admin console connection: {err}");
                        }
                    });
                }
                Err(err) => tracing::warn!("admin console accept: {err}"),
            }
        }
    });
    Ok(socket)
}

struct Handlers {
    console: Arc<Console>,
    login: Arc<AdminLogin>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.console.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.console.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let mut scram = ScramAuth::new(self.login.clone());
        scram.set_iterations(SCRAM_ITERATIONS);
        Arc::new(
            SASLAuthStartupHandler::new(Arc::new(DefaultServerParameterProvider::default()))
                .with_scram(scram),
        )
    }
}

/// The `[admin]` login as a SCRAM verifier source. Both verifiers are
/// derived once (4,096 rounds of PBKDF2 per login would make every
/// attempt, failed ones too, cost the proxy CPU).
struct AdminLogin {
    user: String,
    verifier: Password,
    /// For any other user name, from a random password: the exchange then
    /// fails as a wrong password does, so user names cannot be probed.
    decoy: Password,
}

impl AdminLogin {
    fn new(admin: &AdminConfig) -> Self {
        let verifier = |password: &str| {
            let salt = rand::random::<[u8; 16]>().to_vec();
            let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
            Password::new(Some(salt), salted)
        };
        let unguessable = format!("{:032x}", rand::random::<u128>());
        AdminLogin {
            user: admin.user.clone(),
            verifier: verifier(&admin.password),
            decoy: verifier(&unguessable),
        }
    }
}

impl Debug for AdminLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminLogin")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl AuthSource for AdminLogin {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        Ok(if login.user() == Some(self.user.as_str()) {
            self.verifier.clone()
        } else {
            self.decoy.clone()
        })
    }
}

fn user_error(severity: &str, code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        severity.into(),
        code.into(),
        message.into(),
    )))
}

struct Console {
    state: Arc<ConsoleState>,
    catalog: Vec<TableDef>,
}

fn sql_error(err: SqlError) -> PgWireError {
    user_error("ERROR", err.code, err.message)
}

#[async_trait]
impl SimpleQueryHandler for Console {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + pgwire::api::ClientPortalStore + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore,
    {
        let requests = request::parse(query, &self.catalog, false).map_err(sql_error)?;
        let mut responses = Vec::with_capacity(requests.len());
        for request in requests {
            responses.push(
                self.answer(&request, Vec::new(), &Format::UnifiedText)
                    .await?,
            );
        }
        Ok(responses)
    }
}

/// Parses Parse messages into console requests, typed up front so that
/// Describe answers before Execute.
struct RequestParser {
    catalog: Vec<TableDef>,
}

#[async_trait]
impl QueryParser for RequestParser {
    type Statement = Request;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Request>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut requests = request::parse(sql, &self.catalog, true).map_err(sql_error)?;
        Ok(requests.pop())
    }

    fn get_parameter_types(&self, request: &Request) -> PgWireResult<Vec<Type>> {
        Ok(match request {
            Request::Query(prepared) => prepared.params.iter().map(|ty| pg_type(*ty)).collect(),
            _ => Vec::new(),
        })
    }

    fn get_result_schema(
        &self,
        request: &Request,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(fields(
            &request.columns(),
            format.unwrap_or(&Format::UnifiedText),
        ))
    }
}

#[async_trait]
impl ExtendedQueryHandler for Console {
    type Statement = Request;
    type QueryParser = RequestParser;

    fn query_parser(&self) -> Arc<RequestParser> {
        Arc::new(RequestParser {
            catalog: self.catalog.clone(),
        })
    }

    async fn do_query<C>(
        &self,
        _client: &mut C,
        portal: &Portal<Request>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo
            + pgwire::api::ClientPortalStore
            + Sink<PgWireBackendMessage>
            + Unpin
            + Send
            + Sync,
        C::PortalStore: pgwire::api::store::PortalStore<Statement = Request>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let request = &portal.statement.statement;
        let params = bound_parameters(portal)?;
        self.answer(request, params, &portal.result_column_format)
            .await
    }
}

/// The parameters of a portal as SQLite values: by the type the client
/// gave, else the one the query's text implies, else text.
fn bound_parameters(portal: &Portal<Request>) -> PgWireResult<Vec<Value>> {
    let implied = match &portal.statement.statement {
        Request::Query(prepared) => prepared.params.clone(),
        _ => Vec::new(),
    };
    (0..portal.parameter_len())
        .map(|at| {
            let ty = portal
                .statement
                .parameter_types
                .get(at)
                .cloned()
                .flatten()
                .or_else(|| implied.get(at).map(|ty| pg_type(*ty)))
                .unwrap_or(Type::TEXT);
            Ok(match ty {
                Type::INT2 => portal
                    .parameter::<i16>(at, &ty)?
                    .map(i64::from)
                    .map(Value::Integer),
                Type::INT4 => portal
                    .parameter::<i32>(at, &ty)?
                    .map(i64::from)
                    .map(Value::Integer),
                Type::INT8 => portal.parameter::<i64>(at, &ty)?.map(Value::Integer),
                Type::FLOAT4 => portal
                    .parameter::<f32>(at, &ty)?
                    .map(f64::from)
                    .map(Value::Real),
                Type::FLOAT8 => portal.parameter::<f64>(at, &ty)?.map(Value::Real),
                Type::BOOL => portal
                    .parameter::<bool>(at, &ty)?
                    .map(|b| Value::Integer(i64::from(b))),
                Type::TIMESTAMPTZ => portal
                    .parameter::<DateTime<FixedOffset>>(at, &ty)?
                    .map(|time| Value::Text(functions::timestamp_text(time.with_timezone(&Utc)))),
                Type::TIMESTAMP => portal
                    .parameter::<chrono::NaiveDateTime>(at, &ty)?
                    .map(|time| Value::Text(functions::timestamp_text(time.and_utc()))),
                _ => portal
                    .parameter::<String>(at, &Type::TEXT)?
                    .map(Value::Text),
            }
            .unwrap_or(Value::Null))
        })
        .collect()
}

impl Console {
    fn routes(&self) -> Vec<(String, Route)> {
        self.state
            .sessions
            .iter()
            .map(|(name, (_, route))| (name.clone(), route.borrow().clone()))
            .collect()
    }

    /// Answers one request; results in the formats asked for.
    async fn answer(
        &self,
        request: &Request,
        params: Vec<Value>,
        format: &Format,
    ) -> PgWireResult<Response> {
        let table = match request {
            Request::Command(command) => match self.command(command.clone()).await? {
                Some(table) => table,
                None => return Ok(Response::Execution(Tag::new("ALTER DATABASE"))),
            },
            Request::Query(prepared) => {
                let data = self.view_rows(&prepared.tables).await;
                sql::execute(
                    prepared,
                    &self.catalog,
                    &data,
                    params,
                    &self.state.admin.user,
                )
                .map_err(sql_error)?
            }
            Request::Show(name) => {
                let settings = settings::all().into_iter().filter(|(setting, _)| {
                    name.as_deref()
                        .is_none_or(|name| setting.eq_ignore_ascii_case(name))
                });
                RowSet {
                    columns: request.columns(),
                    rows: settings
                        .map(|(setting, value)| match name {
                            Some(_) => vec![Cell::Text(value)],
                            None => vec![Cell::Text(setting.to_string()), Cell::Text(value)],
                        })
                        .collect(),
                }
            }
            Request::Ignored(tag) => return Ok(Response::Execution(Tag::new(tag))),
            Request::TransactionStart => return Ok(Response::TransactionStart(Tag::new("BEGIN"))),
            Request::TransactionEnd(tag) => return Ok(Response::TransactionEnd(Tag::new(tag))),
        };
        encode(table, format)
    }

    /// The rows of the views a query reads, by qualified name.
    async fn view_rows(&self, tables: &[String]) -> BTreeMap<String, RowSet> {
        let routes = self.routes();
        let partners = PartnerRow::of_routes(&routes);
        let clients = self.state.clients.snapshot();
        let mut data = BTreeMap::new();
        for table in tables {
            let rows = match table.as_str() {
                "sys.database_mirroring" => view::DATABASE_MIRRORING.rows(&partners),
                "sys.database_mirroring_endpoints" => {
                    view::DATABASE_MIRRORING_ENDPOINTS.rows(&partners)
                }
                "sys.database_mirroring_witnesses" => {
                    view::DATABASE_MIRRORING_WITNESSES.rows(&self.witness_rows(&partners).await)
                }
                "sys.database_mirroring_history" => {
                    view::DATABASE_MIRRORING_HISTORY.rows(&self.history_rows(&partners).await)
                }
                "pgmirror.clients" => view::CLIENTS.rows(&clients),
                "pgmirror.servers" => view::SERVERS.rows(&clients),
                "pgmirror.sessions" => view::SESSIONS.rows(&self.session_rows(&routes, &clients)),
                "pgmirror.pools" => view::POOLS.rows(&self.state.pools.snapshot()),
                _ => continue,
            };
            data.insert(table.clone(), rows);
        }
        data
    }

    /// Asks `endpoint` (a witness or an agent) with `ask`; what does not
    /// answer within `limit` gives nothing (the view then lacks its rows,
    /// as a catalog view lacks an unreachable server's).
    async fn ask<T, F>(&self, endpoint: &Endpoint, limit: Duration, ask: F) -> Option<T>
    where
        F: for<'c> FnOnce(
            &'c mut ControlClient,
        ) -> futures::future::BoxFuture<
            'c,
            Result<T, crate::control::ControlError>,
        >,
    {
        let asked = async {
            let mut client = ControlClient::connect(endpoint, &self.state.endpoint_tls).await?;
            ask(&mut client).await
        };
        match tokio::time::timeout(limit, asked).await {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(err)) => {
                tracing::debug!(%endpoint, "console view: {err}");
                None
            }
            Err(_) => {
                tracing::debug!(%endpoint, "console view: no answer in time");
                None
            }
        }
    }

    /// Every witness the partners name, asked for its rows.
    async fn witness_rows(&self, partners: &[PartnerRow]) -> Vec<WitnessRow> {
        let mut rows = Vec::new();
        for (witness, endpoint) in witnesses(partners) {
            let sessions = self
                .ask(&endpoint, REQUEST_TIMEOUT, |client| {
                    Box::pin(client.sessions())
                })
                .await;
            rows.extend(sessions.into_iter().flatten().map(|row| WitnessRow {
                witness: witness.clone(),
                row,
            }));
        }
        rows
    }

    /// The history: from every witness the partners name, and from each
    /// agent of a session without a witness (which keeps its own).
    async fn history_rows(&self, partners: &[PartnerRow]) -> Vec<HistoryRecord> {
        let mut records = Vec::new();
        for (_, endpoint) in witnesses(partners) {
            let fetched = self
                .ask(&endpoint, HISTORY_TIMEOUT, |client| {
                    Box::pin(client.witness_history(None, None))
                })
                .await;
            records.extend(fetched.into_iter().flatten());
        }
        for partner in partners {
            if partner.reachable && partner.status.mirroring_witness_name.is_none() {
                let fetched = self
                    .ask(&partner.endpoint, HISTORY_TIMEOUT, |client| {
                        Box::pin(client.history(None))
                    })
                    .await;
                records.extend(fetched.into_iter().flatten());
            }
        }
        records.sort_by_key(|record| record.at_ms);
        records
    }

    fn session_rows(
        &self,
        routes: &[(String, Route)],
        clients: &[view::ClientRow],
    ) -> Vec<SessionRow> {
        routes
            .iter()
            .map(|(name, route)| SessionRow {
                name: name.clone(),
                route: route.clone(),
                databases: self
                    .state
                    .sessions
                    .get(name)
                    .map(|(config, _)| config.databases.clone())
                    .unwrap_or_default(),
                clients: clients.iter().filter(|(_, c)| &c.session == name).count(),
            })
            .collect()
    }

    /// Runs a command: the SHOW listings give a table, ALTER DATABASE none.
    async fn command(&self, statement: Statement) -> PgWireResult<Option<RowSet>> {
        let clients = self.state.clients.snapshot();
        let table = match statement {
            Statement::ShowClients => view::CLIENTS.rows(&clients),
            Statement::ShowServers => view::SERVERS.rows(&clients),
            Statement::ShowSessions => {
                view::SESSIONS.rows(&self.session_rows(&self.routes(), &clients))
            }
            Statement::ShowPools => view::POOLS.rows(&self.state.pools.snapshot()),
            Statement::SetPartner { session, option } => {
                self.set_partner(&session, option).await?;
                return Ok(None);
            }
            Statement::SetWitness { session, witness } => {
                self.forward(&session, &[Role::Principal], Command::Witness(witness))
                    .await?;
                return Ok(None);
            }
        };
        Ok(Some(table))
    }

    async fn set_partner(&self, session: &str, option: PartnerOption) -> PgWireResult<Response> {
        use PartnerOption as P;
        let (targets, command): (&[Role], Command) = match option {
            P::Failover => (&[Role::Principal], Command::Failover),
            P::Resume => (&[Role::Principal], Command::Resume),
            P::Safety(safety) => (&[Role::Principal], Command::Safety(safety)),
            P::Timeout(secs) => (&[Role::Principal], Command::Timeout(secs)),
            P::ForceServiceAllowDataLoss => (&[Role::Mirror], Command::ForceServiceAllowDataLoss),
            P::Suspend => (&[Role::Principal, Role::Mirror], Command::Suspend),
            P::Off => (&[Role::Principal, Role::Mirror], Command::Off),
        };
        self.forward(session, targets, command).await
    }

    /// Sends `command` to the partner holding the first of `roles` that
    /// answers (the principal, else the mirror where allowed) and returns
    /// once the views show its outcome (`proxy::commands`).
    async fn forward(
        &self,
        session: &str,
        roles: &[Role],
        command: Command,
    ) -> PgWireResult<Response> {
        let outcome = match self.state.sessions.get(session) {
            None => Err(CommandError::NoSession(session.to_string())),
            Some((_, route)) => {
                let ctx = commands::Context {
                    session,
                    route,
                    turns: &self.state.turns,
                    tls: &self.state.endpoint_tls,
                    limit: Duration::from_secs(self.state.admin.command_timeout),
                };
                commands::carry_out(&ctx, roles, command).await
            }
        };
        match outcome {
            Ok(_) => Ok(Response::Execution(Tag::new("ALTER DATABASE"))),
            Err(err) => Err(user_error("ERROR", err.sqlstate(), err.to_string())),
        }
    }
}

/// How long the console waits for a whole history (it comes in pages).
const HISTORY_TIMEOUT: Duration = Duration::from_secs(30);

/// The witnesses the partners name, by name and endpoint.
fn witnesses(partners: &[PartnerRow]) -> Vec<(String, Endpoint)> {
    let mut names: Vec<String> = partners
        .iter()
        .filter_map(|partner| partner.status.mirroring_witness_name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let endpoint = name.parse().ok()?;
            Some((name, endpoint))
        })
        .collect()
}

fn pg_type(ty: SqlType) -> Type {
    match ty {
        SqlType::Bool => Type::BOOL,
        SqlType::Int4 => Type::INT4,
        SqlType::Int8 => Type::INT8,
        SqlType::Float8 => Type::FLOAT8,
        SqlType::Text => Type::TEXT,
        SqlType::Timestamptz => Type::TIMESTAMPTZ,
    }
}

fn fields(columns: &[(String, SqlType)], format: &Format) -> Vec<FieldInfo> {
    columns
        .iter()
        .enumerate()
        .map(|(at, (name, ty))| {
            FieldInfo::new(
                name.clone(),
                None,
                None,
                pg_type(*ty),
                format.format_for(at),
            )
        })
        .collect()
}

fn encode(table: RowSet, format: &Format) -> PgWireResult<Response> {
    let schema = Arc::new(fields(&table.columns, format));
    let mut rows = Vec::with_capacity(table.rows.len());
    for row in table.rows {
        let mut encoder = DataRowEncoder::new(schema.clone());
        for (at, cell) in row.into_iter().enumerate() {
            match cell {
                Cell::Null => encoder.encode_field(&None::<String>)?,
                Cell::Bool(value) => encoder.encode_field(&value)?,
                Cell::Int4(value) => encoder.encode_field(&value)?,
                Cell::Int8(value) => encoder.encode_field(&value)?,
                Cell::Float8(value) => encoder.encode_field(&value)?,
                Cell::Text(value) => encoder.encode_field(&value)?,
                Cell::Timestamptz(text) => match format.format_for(at) {
                    // As PostgreSQL prints it (no trailing zeros), which
                    // pgwire's own formatting does not do.
                    FieldFormat::Text => encoder.encode_field(
                        &functions::parse_timestamp(&text).map(functions::postgres_text),
                    )?,
                    FieldFormat::Binary => {
                        encoder.encode_field(&functions::parse_timestamp(&text))?
                    }
                },
            }
        }
        rows.push(Ok(encoder.take_row()));
    }
    Ok(Response::Query(QueryResponse::new(
        schema,
        stream::iter(rows),
    )))
}
