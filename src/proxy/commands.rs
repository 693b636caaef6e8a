//! The admin console's `ALTER DATABASE` statements, carried out to the end
//! (issue 12, item 5): a statement returns only once the proxy's route,
//! which the console's views read, shows what the command did, so a view
//! read after it returns never shows the state from before it.
//!
//! Pure decisions, as in `witness/arbiter.rs`: [`ready`] says whether a
//! command may be sent now, [`settled`] whether a route reflects a command
//! that was carried out; [`carry_out`] does the IO (the per-session turn,
//! status requests, the command, watching the route) between them.
//!
//! - One command at a time per session ([`Turns`]): a statement waits for
//!   the one running. A FAILOVER or FORCE_SERVICE that waited while another
//!   statement switched the roles is refused (SQLSTATE 40001): its premise
//!   (who is principal) no longer holds, and running it would switch back.
//! - FAILOVER needs SYNCHRONIZED (spec 37): while the principal, asked
//!   directly (the route may be a poll old), is resynchronizing, as after
//!   the previous failover, the statement waits for it rather than failing.
//! - Everything, the turn included, runs within `[admin] command_timeout`
//!   (60 s by default); past it the statement fails with SQLSTATE 57014
//!   (query_canceled, as PostgreSQL's statement_timeout), saying whether
//!   the command was not sent, may still be running, or was done but not
//!   yet shown.
//!
//! Cancel safety: dropping [`carry_out`] (the client left) releases the
//! turn; a command already sent runs on at its agent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Endpoint;
use crate::control::{Command, ControlClient, ControlError, MirroringStatus};
use crate::proxy::routing::{send_command, AgentAnswer, PartnerView, Route};
use crate::roles::{Epoch, Role};
use crate::tls::EndpointTls;

/// How often the route and the principal's status are looked at while
/// waiting; the route itself is refreshed every `routing::POLL_INTERVAL`.
const RECHECK: Duration = Duration::from_millis(100);
/// How long one direct status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a statement did not finish; each has its SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no mirroring session named \"{0}\"")]
    NoSession(String),
    /// No partner in the allowed roles answered.
    #[error("{0}")]
    Unreachable(String),
    /// The agent refused: a precondition does not hold.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    /// Another statement switched the roles while this one waited.
    #[error(
        "another statement switched the roles of session \"{session}\" while this one waited for \
         its turn: {principal} is now the principal at role_sequence {epoch}; nothing was done \
         (issue the statement again if it is still wanted)"
    )]
    Superseded {
        session: String,
        principal: String,
        epoch: Epoch,
    },
    /// The timeout passed before the command was sent.
    #[error(
        "{what} of session \"{session}\" not started within {limit:?}: {reason}; nothing was done"
    )]
    NotStarted {
        what: &'static str,
        session: String,
        limit: Duration,
        reason: String,
    },
    /// The command was sent; its agent did not answer in time.
    #[error(
        "{what} of session \"{session}\": {endpoint} did not answer within {limit:?}; the command \
         may still complete: see sys.database_mirroring"
    )]
    NoAnswer {
        what: &'static str,
        session: String,
        endpoint: Endpoint,
        limit: Duration,
    },
    /// The command was carried out, the route did not show it in time.
    #[error(
        "{what} of session \"{session}\" was carried out ({message}) but the proxy did not see \
         its outcome within {limit:?} ({waiting_for}); see sys.database_mirroring"
    )]
    NotShown {
        what: &'static str,
        session: String,
        message: String,
        limit: Duration,
        waiting_for: &'static str,
    },
}

impl CommandError {
    /// The SQLSTATE the console reports it with.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            CommandError::NoSession(_) => "3D000",
            CommandError::Unreachable(_) => "08006",
            CommandError::Refused(_) => "55000",
            CommandError::Failed(_) => "XX000",
            CommandError::Superseded { .. } => "40001",
            CommandError::NotStarted { .. }
            | CommandError::NoAnswer { .. }
            | CommandError::NotShown { .. } => "57014",
        }
    }
}

/// One turn lock per session, made on first use; shared by every console
/// connection of the proxy (it lives in the console's state).
#[derive(Default)]
pub struct Turns {
    sessions: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Turns {
    fn of(&self, session: &str) -> Arc<tokio::sync::Mutex<()>> {
        crate::sync::lock(&self.sessions)
            .entry(session.to_string())
            .or_default()
            .clone()
    }
}

/// The statement's name in messages.
fn what(command: &Command) -> &'static str {
    match command {
        Command::Suspend => "SUSPEND",
        Command::Resume => "RESUME",
        Command::Safety(_) => "SAFETY",
        Command::Timeout(_) => "TIMEOUT",
        Command::Failover => "FAILOVER",
        Command::ForceServiceAllowDataLoss => "FORCE_SERVICE_ALLOW_DATA_LOSS",
        Command::Off => "PARTNER OFF",
        Command::Witness(_) => "SET WITNESS",
    }
}

/// Whether `command` makes another partner principal.
fn switches_roles(command: &Command) -> bool {
    matches!(
        command,
        Command::Failover | Command::ForceServiceAllowDataLoss
    )
}

/// Whether `command` may be sent to a partner whose fresh status is
/// `target` (pure). Err is what it waits for; only states that pass by
/// themselves are waited for: FAILOVER while the session resynchronizes
/// (spec 37), which after a failover begins DISCONNECTED while the old
/// principal restarts as mirror, then SYNCHRONIZING. A mirror that stays
/// away makes the wait end in the timeout. Any other unmet precondition
/// (SUSPENDED, SAFETY OFF) is the agent's to refuse at once.
pub fn ready(command: &Command, target: &MirroringStatus) -> Result<(), &'static str> {
    match (command, target.state()) {
        (Command::Failover, Some("SYNCHRONIZING")) => {
            Err("the session is still SYNCHRONIZING; FAILOVER needs SYNCHRONIZED (spec 37)")
        }
        (Command::Failover, Some("DISCONNECTED")) => Err(
            "the session is still DISCONNECTED (the mirror is not back); FAILOVER needs \
             SYNCHRONIZED (spec 37)",
        ),
        _ => Ok(()),
    }
}

/// The route as it was when a command was sent to `target`.
#[derive(Debug, Clone)]
pub struct Sent {
    pub epoch: Epoch,
    pub target: Endpoint,
    /// The target's server name, as its last status said.
    pub target_name: Option<String>,
}

/// Whether `route` shows the outcome of `command`, carried out as `sent`
/// (pure). Err names what is still missing.
///
/// A role switch is shown when the route's epoch rose, it routes to a
/// principal again (for FAILOVER, another partner than the one asked; for
/// forced service, the one asked) and every partner that answered reports
/// the new epoch: the old principal no longer shows itself principal. Any
/// other command is shown when the partner it was sent to reports it and
/// so does every other answering partner still connected to it (a
/// disconnected one cannot have heard; its row says DISCONNECTED).
pub fn settled(command: &Command, sent: &Sent, route: &Route) -> Result<(), &'static str> {
    let rows: Vec<&MirroringStatus> = route
        .partners
        .iter()
        .filter_map(|partner| partner.status.as_ref())
        .collect();
    let target = route
        .partners
        .iter()
        .find(|partner| partner.endpoint == sent.target)
        .and_then(|partner| partner.status.as_ref());
    if switches_roles(command) {
        let principal = route
            .principal
            .as_ref()
            .ok_or("the new principal serving through the proxy")?;
        let asked = sent.target_name.as_deref() == Some(principal.server_name.as_str());
        let expected = match command {
            Command::Failover => !asked,
            _ => asked,
        };
        if route.epoch <= sent.epoch || !expected {
            return Err("the new principal serving through the proxy");
        }
        let at_new_epoch = rows
            .iter()
            .all(|row| row.mirroring_role_sequence == Some(route.epoch.0));
        return at_new_epoch
            .then_some(())
            .ok_or("both partners reporting the new role_sequence");
    }
    let target = target.ok_or("a status from the partner the command was sent to")?;
    let shows: Box<dyn Fn(&MirroringStatus) -> bool> = match command {
        Command::Suspend => Box::new(|row| row.state() == Some("SUSPENDED")),
        Command::Resume => Box::new(|row| row.state() != Some("SUSPENDED")),
        Command::Safety(safety) => {
            let desc = safety.to_string();
            Box::new(move |row| row.mirroring_safety_level_desc.as_deref() == Some(&desc))
        }
        Command::Timeout(secs) => {
            let secs = *secs;
            Box::new(move |row| row.mirroring_connection_timeout == Some(secs))
        }
        // The mirror may reach the witness by another address (it follows
        // the principal's witness by identity), so only the row asked
        // shows the address given.
        Command::Witness(witness) => {
            let name = witness.as_ref().map(ToString::to_string);
            return (target.mirroring_witness_name == name)
                .then_some(())
                .ok_or("the principal reporting the new witness");
        }
        Command::Off => Box::new(|row| row.ended_as.is_some()),
        Command::Failover | Command::ForceServiceAllowDataLoss => return Ok(()),
    };
    let everywhere = shows(target)
        && rows
            .iter()
            .filter(|row| row.server_name != target.server_name && row.peer_connected)
            .all(|row| shows(row));
    everywhere
        .then_some(())
        .ok_or("every connected partner reporting the change")
}

/// The partner reporting `role` at the highest epoch; one that PARTNER OFF
/// ended counts with the role it ended with (routing rule 7), so that its
/// agent, not the console, says that mirroring is off.
fn best_with_role(route: &Route, role: Role) -> Option<&PartnerView> {
    route
        .partners
        .iter()
        .filter_map(|partner| {
            let answer = AgentAnswer::from(partner.status.as_ref()?);
            (answer.role == Some(role)).then_some((answer.epoch, partner))
        })
        .max_by_key(|(epoch, _)| *epoch)
        .map(|(_, partner)| partner)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Principal => "PRINCIPAL",
        Role::Mirror => "MIRROR",
    }
}

/// What [`carry_out`] needs of the console.
pub struct Context<'a> {
    pub session: &'a str,
    pub route: &'a watch::Receiver<Route>,
    pub turns: &'a Turns,
    pub tls: &'a EndpointTls,
    pub limit: Duration,
}

/// Sends `command` to the partner holding the first of `roles` that
/// answers, then waits until the route shows its outcome; Ok is the
/// agent's message. See the module comment for the waits and errors.
pub async fn carry_out(
    ctx: &Context<'_>,
    roles: &[Role],
    command: Command,
) -> Result<String, CommandError> {
    let deadline = Instant::now() + ctx.limit;
    let what = what(&command);
    let not_started = |reason: String| CommandError::NotStarted {
        what,
        session: ctx.session.to_string(),
        limit: ctx.limit,
        reason,
    };
    let arrived = ctx.route.borrow().epoch;
    let turn = ctx.turns.of(ctx.session);
    let _turn = tokio::time::timeout_at(deadline, turn.lock())
        .await
        .map_err(|_| not_started("another statement of this session was still running".into()))?;
    {
        let route = ctx.route.borrow();
        if switches_roles(&command) && route.epoch > arrived {
            return Err(CommandError::Superseded {
                session: ctx.session.to_string(),
                principal: route
                    .principal
                    .as_ref()
                    .map_or_else(|| "no partner".into(), |p| p.server_name.clone()),
                epoch: route.epoch,
            });
        }
    }
    let mut last_problem = None;
    for role in roles {
        let target = best_with_role(&ctx.route.borrow(), *role).map(|partner| {
            let name = partner.status.as_ref().map(|s| s.server_name.clone());
            (partner.endpoint.clone(), name)
        });
        let Some((endpoint, target_name)) = target else {
            last_problem = Some(format!(
                "no partner of session \"{}\" currently reports the {} role",
                ctx.session,
                role_name(*role)
            ));
            continue;
        };
        if let Err(reason) = wait_ready(&command, &endpoint, ctx.tls, deadline).await {
            return Err(not_started(reason));
        }
        let sent = Sent {
            epoch: ctx.route.borrow().epoch,
            target: endpoint.clone(),
            target_name,
        };
        let answer =
            tokio::time::timeout_at(deadline, send_command(&endpoint, ctx.tls, command.clone()))
                .await
                .map_err(|_| CommandError::NoAnswer {
                    what,
                    session: ctx.session.to_string(),
                    endpoint: endpoint.clone(),
                    limit: ctx.limit,
                })?;
        match answer {
            Ok(message) => {
                tracing::info!(session = %ctx.session, %endpoint, ?command, "admin command done: {message}");
                wait_shown(ctx, &command, &sent, deadline)
                    .await
                    .map_err(|waiting_for| CommandError::NotShown {
                        what,
                        session: ctx.session.to_string(),
                        message: message.clone(),
                        limit: ctx.limit,
                        waiting_for,
                    })?;
                return Ok(message);
            }
            Err(ControlError::Refused(reason)) => return Err(CommandError::Refused(reason)),
            Err(ControlError::Failed(reason)) => return Err(CommandError::Failed(reason)),
            Err(ControlError::Unexpected { answer, .. }) => {
                last_problem = Some(format!("unexpected answer: {answer}"))
            }
            Err(err) => last_problem = Some(format!("{endpoint} did not answer: {err}")),
        }
    }
    Err(CommandError::Unreachable(last_problem.unwrap_or_else(
        || "no partner to send the command to".into(),
    )))
}

/// Waits until [`ready`] holds for `endpoint`'s own status (not the
/// route's, which may be a poll old); Err is what it still waited for at
/// the deadline. An unreachable partner is left to the command to find.
async fn wait_ready(
    command: &Command,
    endpoint: &Endpoint,
    tls: &EndpointTls,
    deadline: Instant,
) -> Result<(), String> {
    let mut client: Option<ControlClient> = None;
    loop {
        let mut connected = match client.take() {
            Some(connected) => connected,
            None => {
                match tokio::time::timeout(STATUS_TIMEOUT, ControlClient::connect(endpoint, tls))
                    .await
                {
                    Ok(Ok(connected)) => connected,
                    _ => return Ok(()),
                }
            }
        };
        let Ok(status) = connected.status_within(STATUS_TIMEOUT).await else {
            return Ok(());
        };
        client = Some(connected);
        match ready(command, &status) {
            Ok(()) => return Ok(()),
            Err(waiting) if Instant::now() + RECHECK >= deadline => return Err(waiting.to_string()),
            Err(_) => tokio::time::sleep(RECHECK).await,
        }
    }
}

/// Waits until the route shows the command's outcome ([`settled`]); Err is
/// what was still missing at the deadline.
async fn wait_shown(
    ctx: &Context<'_>,
    command: &Command,
    sent: &Sent,
    deadline: Instant,
) -> Result<(), &'static str> {
    loop {
        let missing = match settled(command, sent, &ctx.route.borrow()) {
            Ok(()) => return Ok(()),
            Err(missing) => missing,
        };
        if Instant::now() + RECHECK >= deadline {
            return Err(missing);
        }
        tokio::time::sleep(RECHECK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::EndedAs;
    use crate::proxy::routing::{Discovery, PartnerView, Principal};
    use crate::roles::Safety;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn row(name: &str, role: Role, epoch: u64, state: &str) -> MirroringStatus {
        MirroringStatus {
            server_name: name.into(),
            mirroring_role: Some(match role {
                Role::Principal => 1,
                Role::Mirror => 2,
            }),
            mirroring_role_sequence: Some(epoch),
            mirroring_state_desc: Some(state.into()),
            mirroring_safety_level_desc: Some("FULL".into()),
            peer_connected: true,
            ..MirroringStatus::default()
        }
    }

    /// alpha at port 1, beta at port 2; `principal` routed at `epoch`.
    fn route(epoch: u64, principal: Option<&str>, rows: [Option<MirroringStatus>; 2]) -> Route {
        Route {
            epoch: Epoch(epoch),
            principal: principal.map(|name| Principal {
                address: format!("{name}:5432"),
                server_name: name.into(),
                discovery: Discovery::Agent,
            }),
            partners: rows
                .into_iter()
                .enumerate()
                .map(|(index, status)| PartnerView {
                    endpoint: endpoint(index as u16 + 1),
                    status,
                    error: None,
                })
                .collect(),
            tls_failure: None,
        }
    }

    fn sent_to_alpha(epoch: u64) -> Sent {
        Sent {
            epoch: Epoch(epoch),
            target: endpoint(1),
            target_name: Some("alpha".into()),
        }
    }

    #[test]
    fn failover_waits_only_while_resynchronizing() {
        let principal = |state| row("alpha", Role::Principal, 3, state);
        assert!(ready(&Command::Failover, &principal("SYNCHRONIZING")).is_err());
        assert!(ready(&Command::Failover, &principal("DISCONNECTED")).is_err());
        assert!(ready(&Command::Failover, &principal("SYNCHRONIZED")).is_ok());
        // Not passing by itself: the agent refuses it with its reason.
        assert!(ready(&Command::Failover, &principal("SUSPENDED")).is_ok());
        assert!(ready(&Command::Suspend, &principal("SYNCHRONIZING")).is_ok());
    }

    #[test]
    fn a_failover_is_shown_once_both_partners_report_the_new_epoch() {
        let sent = sent_to_alpha(3);
        let before = route(
            3,
            Some("alpha"),
            [
                Some(row("alpha", Role::Principal, 3, "PENDING_FAILOVER")),
                Some(row("beta", Role::Mirror, 3, "SYNCHRONIZED")),
            ],
        );
        assert!(settled(&Command::Failover, &sent, &before).is_err());
        // beta promoted, alpha's row still the old one: not yet.
        let half = route(
            4,
            Some("beta"),
            [
                Some(row("alpha", Role::Principal, 3, "PENDING_FAILOVER")),
                Some(row("beta", Role::Principal, 4, "SYNCHRONIZING")),
            ],
        );
        assert_eq!(
            settled(&Command::Failover, &sent, &half),
            Err("both partners reporting the new role_sequence")
        );
        let held = route(
            4,
            None,
            [
                Some(row("alpha", Role::Mirror, 4, "SYNCHRONIZING")),
                Some(row("beta", Role::Principal, 4, "PENDING_FAILOVER")),
            ],
        );
        assert!(settled(&Command::Failover, &sent, &held).is_err());
        let done = route(
            4,
            Some("beta"),
            [
                Some(row("alpha", Role::Mirror, 4, "SYNCHRONIZING")),
                Some(row("beta", Role::Principal, 4, "SYNCHRONIZING")),
            ],
        );
        assert_eq!(settled(&Command::Failover, &sent, &done), Ok(()));
        // Forced service is shown when the partner asked leads.
        let forced = Sent {
            epoch: Epoch(3),
            target: endpoint(2),
            target_name: Some("beta".into()),
        };
        assert_eq!(
            settled(&Command::ForceServiceAllowDataLoss, &forced, &done),
            Ok(())
        );
        assert!(settled(&Command::ForceServiceAllowDataLoss, &sent, &done).is_err());
    }

    #[test]
    fn other_commands_are_shown_by_every_connected_partner() {
        let sent = sent_to_alpha(3);
        let suspended = |name, role| row(name, role, 3, "SUSPENDED");
        let principal_only = route(
            3,
            Some("alpha"),
            [
                Some(suspended("alpha", Role::Principal)),
                Some(row("beta", Role::Mirror, 3, "SYNCHRONIZED")),
            ],
        );
        assert!(settled(&Command::Suspend, &sent, &principal_only).is_err());
        let both = route(
            3,
            Some("alpha"),
            [
                Some(suspended("alpha", Role::Principal)),
                Some(suspended("beta", Role::Mirror)),
            ],
        );
        assert_eq!(settled(&Command::Suspend, &sent, &both), Ok(()));
        // A mirror that cannot hear the principal is not waited for.
        let mut deaf = row("beta", Role::Mirror, 3, "DISCONNECTED");
        deaf.peer_connected = false;
        let cut = route(
            3,
            Some("alpha"),
            [Some(suspended("alpha", Role::Principal)), Some(deaf)],
        );
        assert_eq!(settled(&Command::Suspend, &sent, &cut), Ok(()));
        // No status from the partner asked: not shown.
        let silent = route(
            3,
            Some("alpha"),
            [None, Some(suspended("beta", Role::Mirror))],
        );
        assert!(settled(&Command::Suspend, &sent, &silent).is_err());
        assert!(settled(&Command::Safety(Safety::Off), &sent, &both).is_err());
    }

    #[test]
    fn partner_off_is_shown_once_the_partners_ended() {
        let sent = sent_to_alpha(3);
        let ended = |name: &str, role| MirroringStatus {
            server_name: name.into(),
            ended_as: Some(EndedAs {
                role,
                epoch: Epoch(3),
            }),
            peer_connected: true,
            ..MirroringStatus::default()
        };
        let half = route(
            3,
            Some("alpha"),
            [
                Some(ended("alpha", Role::Principal)),
                Some(row("beta", Role::Mirror, 3, "SYNCHRONIZED")),
            ],
        );
        assert!(settled(&Command::Off, &sent, &half).is_err());
        let off = route(
            3,
            Some("alpha"),
            [
                Some(ended("alpha", Role::Principal)),
                Some(ended("beta", Role::Mirror)),
            ],
        );
        assert_eq!(settled(&Command::Off, &sent, &off), Ok(()));
    }
}
