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
use futures::stream;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::query::SimpleQueryHandler;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::{ClientInfo, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::statement::{self, PartnerOption, Statement};
use crate::admin::view::{self, Cell, ColumnType, RowSet};
use crate::config::{AdminConfig, ProxySession};
use crate::control::Command;
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
    let handlers = Arc::new(Handlers { state, login });
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
    state: Arc<ConsoleState>,
    login: Arc<AdminLogin>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(Console {
            state: self.state.clone(),
        })
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
}

#[async_trait]
impl SimpleQueryHandler for Console {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + pgwire::api::ClientPortalStore + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore,
    {
        let statement =
            statement::parse(query).map_err(|err| user_error("ERROR", "42601", err.to_string()))?;
        Ok(vec![self.execute(statement).await?])
    }
}

impl Console {
    fn routes(&self) -> Vec<(String, Route)> {
        self.state
            .sessions
            .iter()
            .map(|(name, (_, route))| (name.clone(), route.borrow().clone()))
            .collect()
    }

    async fn execute(&self, statement: Statement) -> PgWireResult<Response> {
        let clients = self.state.clients.snapshot();
        let table = match statement {
            Statement::SelectMirroring { database_name } => {
                view::database_mirroring(&self.routes(), database_name.as_deref())
            }
            Statement::ShowClients => view::show_clients(&clients),
            Statement::ShowServers => view::show_servers(&clients),
            Statement::ShowSessions => view::show_sessions(
                &self.routes(),
                |name| {
                    self.state
                        .sessions
                        .get(name)
                        .map(|(config, _)| config.databases.clone())
                        .unwrap_or_default()
                },
                &clients,
            ),
            Statement::SetPartner { session, option } => {
                return self.set_partner(&session, option).await;
            }
            Statement::SetWitness { session, witness } => {
                return self
                    .forward(&session, &[Role::Principal], Command::Witness(witness))
                    .await;
            }
        };
        encode(table)
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

fn encode(table: RowSet) -> PgWireResult<Response> {
    let fields: Vec<FieldInfo> = table
        .columns
        .iter()
        .map(|(name, kind)| {
            let kind = match kind {
                ColumnType::Int4 => Type::INT4,
                ColumnType::Int8 => Type::INT8,
                ColumnType::Float8 => Type::FLOAT8,
                ColumnType::Text => Type::TEXT,
                ColumnType::Bool => Type::BOOL,
            };
            FieldInfo::new((*name).into(), None, None, kind, FieldFormat::Text)
        })
        .collect();
    let schema = Arc::new(fields);
    let mut rows = Vec::with_capacity(table.rows.len());
    for row in table.rows {
        let mut encoder = DataRowEncoder::new(schema.clone());
        for cell in row {
            match cell {
                Cell::Null => encoder.encode_field(&None::<String>)?,
                Cell::Int4(value) => encoder.encode_field(&value)?,
                Cell::Int8(value) => encoder.encode_field(&value)?,
                Cell::Float8(value) => encoder.encode_field(&value)?,
                Cell::Text(value) => encoder.encode_field(&value)?,
                Cell::Bool(value) => encoder.encode_field(&value)?,
            }
        }
        rows.push(Ok(encoder.take_row()));
    }
    Ok(Response::Query(QueryResponse::new(
        schema,
        stream::iter(rows),
    )))
}
