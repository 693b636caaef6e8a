//! The IO of proxy-side authentication: the proxy as the server of a
//! client's SCRAM or md5 exchange ([`client_scram`], [`client_md5`]), and
//! as the client of a server's ([`server_login`]), message by message with
//! `wire::auth`'s encoders and `scram`/`md5`'s math.
//!
//! Every read runs until the caller's deadline and is bounded before it
//! allocates (PostgreSQL's own limit for frontend messages, [`LOGIN_BUFFER_MAX`]
//! for the server's). Dropping a future only drops its use of the stream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::md5::Md5Verifier;
use super::scram::{
    Binding, ScramClient, ScramClientFinal, ScramError, ScramServer, ScramVerifier, SCRAM_SHA_256,
};
use super::{AuthError, Login};
use crate::wire::auth::{
    authentication, decode_authentication, decode_password, decode_sasl_initial_response,
    password_message, password_message_body_len, sasl_initial_response, sasl_response, BeAuth,
};
use crate::wire::frame::TAGGED_HEADER_LEN;
use crate::wire::startup::{backend_message_len, AUTHENTICATION};

/// Most server bytes buffered during the login (its requests are short).
const LOGIN_BUFFER_MAX: usize = 64 * 1024;

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, message: &[u8]) -> Result<(), AuthError> {
    stream.write_all(message).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one frontend password message's body, bounded in size and time.
async fn read_password_message<S: AsyncRead + Unpin>(
    client: &mut S,
    deadline: Instant,
) -> Result<Vec<u8>, AuthError> {
    let read = async {
        let mut header = [0u8; TAGGED_HEADER_LEN];
        client.read_exact(&mut header).await?;
        let mut body = vec![0u8; password_message_body_len(header)?];
        client.read_exact(&mut body).await?;
        Ok(body)
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| AuthError::Timeout)?
}

/// The proxy's md5 challenge to a client whose verifier is md5.
pub async fn client_md5<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    user: &str,
    verifier: Md5Verifier,
    deadline: Instant,
) -> Result<Login, AuthError> {
    let salt: [u8; 4] = rand::random();
    send(client, &authentication(&BeAuth::Md5Password { salt })).await?;
    let body = read_password_message(client, deadline).await?;
    if verifier.check(salt, decode_password(&body)?) {
        Ok(Login::Md5(verifier))
    } else {
        Err(AuthError::WrongPassword(user.to_string()))
    }
}

/// The proxy's SCRAM exchange with a client: on success the ClientKey its
/// proof revealed. The client still waits for AuthenticationOk, which the
/// server's login provides.
pub async fn client_scram<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    user: &str,
    verifier: ScramVerifier,
    binding: &Binding,
    deadline: Instant,
) -> Result<Login, AuthError> {
    let mechanisms = binding.mechanisms();
    send(client, &authentication(&BeAuth::Sasl { mechanisms })).await?;
    let body = read_password_message(client, deadline).await?;
    let (mechanism, first) = decode_sasl_initial_response(&body)?;
    let (server, server_first) = ScramServer::start(verifier.clone(), mechanism, first, binding)?;
    let server_first = BeAuth::SaslContinue(server_first.into_bytes());
    send(client, &authentication(&server_first)).await?;
    let body = read_password_message(client, deadline).await?;
    let (client_key, server_final) = server.finish(&body).map_err(|err| match err {
        ScramError::WrongProof => AuthError::WrongPassword(user.to_string()),
        other => other.into(),
    })?;
    send(
        client,
        &authentication(&BeAuth::SaslFinal(server_final.into_bytes())),
    )
    .await?;
    Ok(Login::Scram {
        client_key,
        verifier,
    })
}

/// Where a server login stands between two server messages.
enum Step {
    Start,
    /// Client-first sent.
    ScramFirst(ScramClient),
    /// Client-final sent.
    ScramFinal(ScramClientFinal),
}

/// Answers the server's authentication requests as the client `login`
/// proved to be, until AuthenticationOk or an ErrorResponse (left at the
/// head of `pending`, for the client to see).
pub async fn server_login<S: AsyncRead + AsyncWrite + Unpin>(
    login: &Login,
    server: &mut S,
    pending: &mut Vec<u8>,
    user: &str,
    deadline: Instant,
) -> Result<(), AuthError> {
    let cannot = |asked: &str| AuthError::ServerMethod {
        user: user.to_string(),
        asked: asked.to_string(),
        held: match login {
            Login::Scram { .. } => "SCRAM-SHA-256",
            Login::Md5(_) => "md5",
        },
    };
    let mut step = Step::Start;
    loop {
        let whole = backend_message_len(pending)
            .map_err(|err| AuthError::Server(err.to_string()))?
            .filter(|(_, len)| pending.len() >= *len);
        let Some((tag, len)) = whole else {
            if pending.len() > LOGIN_BUFFER_MAX {
                return Err(AuthError::Server("too many bytes during the login".into()));
            }
            let read = tokio::time::timeout_at(deadline, server.read_buf(pending))
                .await
                .map_err(|_| AuthError::Server("no answer from the server in time".into()))??;
            if read == 0 {
                return Err(AuthError::Server("the server closed the connection".into()));
            }
            continue;
        };
        if tag != AUTHENTICATION {
            // ErrorResponse (or NoticeResponse and the like): the client's.
            return Ok(());
        }
        let request = decode_authentication(pending.get(..len).unwrap_or_default())?;
        let reply = match (request, login, step) {
            (BeAuth::Ok, _, _) => return Ok(()),
            (BeAuth::Md5Password { salt }, Login::Md5(verifier), Step::Start) => {
                step = Step::Start;
                password_message(&verifier.answer(salt))
            }
            (BeAuth::Sasl { mechanisms }, Login::Scram { .. }, Step::Start)
                if mechanisms.iter().any(|m| m == SCRAM_SHA_256) =>
            {
                let (client, first) = ScramClient::start();
                step = Step::ScramFirst(client);
                sasl_initial_response(SCRAM_SHA_256, first.as_bytes())
            }
            (
                BeAuth::SaslContinue(server_first),
                Login::Scram {
                    client_key,
                    verifier,
                },
                Step::ScramFirst(client),
            ) => {
                let (last, client_final, params) =
                    client.answer(&server_first, client_key, &verifier.server_key)?;
                if params.salt != verifier.salt || params.iterations != verifier.iterations {
                    tracing::warn!(%user, "the server's SCRAM verifier has another salt or iteration count than the proxy's, so the server will refuse the login; copy the verifier from pg_authid again");
                }
                step = Step::ScramFinal(last);
                sasl_response(client_final.as_bytes())
            }
            (BeAuth::SaslFinal(server_final), _, Step::ScramFinal(last)) => {
                last.verify(&server_final)?;
                step = Step::Start;
                Vec::new()
            }
            (BeAuth::Md5Password { .. }, ..) => return Err(cannot("md5")),
            (BeAuth::Sasl { mechanisms }, ..) => return Err(cannot(&mechanisms.join(" or "))),
            (BeAuth::Other(code), ..) => return Err(cannot(&format!("method {code}"))),
            (BeAuth::SaslContinue(_) | BeAuth::SaslFinal(_), ..) => {
                return Err(AuthError::Server("SASL message out of order".into()))
            }
        };
        pending.drain(..len);
        if !reply.is_empty() {
            send(server, &reply).await?;
        }
    }
}
