//! The proxy's side of an admin console connection (`dbname=pgmirror`):
//! who may log in without TLS, the login under the startup timeout, failed
//! logins limited per source address, a bound on message size; then the
//! bytes are spliced to the console's socket (`console`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::AdminPlaintext;
use crate::proxy::connection::{ConnError, End};
use crate::wire::frame::FrameScanner;
use crate::wire::startup::{backend_message_len, READY_FOR_QUERY};

/// Largest message a console client may send: statements are short.
pub const MAX_CONSOLE_MESSAGE: u32 = 1024 * 1024;
/// Failed logins one address may make per [`FAILED_LOGIN_WINDOW`].
const FAILED_LOGINS_ALLOWED: u32 = 5;
const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);
const ERROR_RESPONSE: u8 = b'E';

/// Failed console logins per source address, in a sliding window.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    failures: DashMap<IpAddr, (u32, Instant)>,
}

impl LoginLimiter {
    /// None when `from` may try to log in now, else how long it must wait.
    pub fn wait_for(&self, from: IpAddr, now: Instant) -> Option<Duration> {
        let (count, since) = *self.failures.get(&from)?;
        let until = since + FAILED_LOGIN_WINDOW;
        (count >= FAILED_LOGINS_ALLOWED && now < until).then(|| until - now)
    }

    pub fn failed(&self, from: IpAddr, now: Instant) {
        let mut entry = self.failures.entry(from).or_insert((0, now));
        if now >= entry.1 + FAILED_LOGIN_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, from: IpAddr) {
        self.failures.remove(&from);
    }
}

/// Why an admin login is refused before it starts.
pub fn refusal(
    plaintext: AdminPlaintext,
    limiter: &LoginLimiter,
    peer: SocketAddr,
    tls: bool,
) -> Option<String> {
    if !tls && !plaintext.allows(peer.ip()) {
        return Some(format!(
            "admin console logins from {} need TLS (sslmode=require); [admin] plaintext = \
             \"anywhere\" allows them in the clear",
            peer.ip()
        ));
    }
    limiter.wait_for(peer.ip(), Instant::now()).map(|wait| {
        format!(
            "too many failed admin console logins from {}; try again in {} s",
            peer.ip(),
            wait.as_secs().max(1)
        )
    })
}

/// Relays one admin connection to the console's socket: the login within
/// `login_timeout` (its outcome counted for the client's address), then
/// the session, each client message at most [`MAX_CONSOLE_MESSAGE`].
pub async fn relay<S>(
    client: S,
    socket: &Path,
    startup: &[u8],
    peer: SocketAddr,
    limiter: &LoginLimiter,
    login_timeout: Duration,
) -> Result<End, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut console = tokio::net::UnixStream::connect(socket).await?;
    console.write_all(startup).await?;
    let (mut console_read, mut console_write) = console.into_split();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let to_console = async {
        let mut scanner = FrameScanner::backend().with_max_body_len(MAX_CONSOLE_MESSAGE);
        let mut buf = vec![0u8; 8192];
        loop {
            let n = client_read.read(&mut buf).await?;
            let Some(chunk) = buf.get(..n).filter(|chunk| !chunk.is_empty()) else {
                return Ok::<End, ConnError>(End::Admin);
            };
            scanner
                .feed(chunk, |_| {})
                .map_err(ConnError::ConsoleMessage)?;
            console_write.write_all(chunk).await?;
        }
    };
    let to_client = async {
        let deadline = Instant::now() + login_timeout;
        let login = tokio::time::timeout_at(deadline, login(&mut console_read, &mut client_write));
        let logged_in = login
            .await
            .map_err(|_| ConnError::StartupTimeout(login_timeout))??;
        match logged_in {
            Some(true) => limiter.succeeded(peer.ip()),
            Some(false) => limiter.failed(peer.ip(), Instant::now()),
            None => {}
        }
        if logged_in == Some(true) {
            tokio::io::copy(&mut console_read, &mut client_write).await?;
        }
        let _ = client_write.shutdown().await;
        Ok::<End, ConnError>(End::Admin)
    };
    tokio::select! {
        end = to_console => end,
        end = to_client => end,
    }
}

/// Relays the console's side of the login; Some(true) once it reached
/// ReadyForQuery, Some(false) at an ErrorResponse before that, None when
/// the console closed first.
async fn login<R, W>(console: &mut R, client: &mut W) -> Result<Option<bool>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending = Vec::with_capacity(1024);
    loop {
        if console.read_buf(&mut pending).await? == 0 {
            return Ok(None);
        }
        let mut complete = 0;
        let mut outcome = None;
        while let Some((tag, len)) = backend_message_len(pending.get(complete..).unwrap_or(&[]))? {
            if pending.len() - complete < len {
                break;
            }
            complete += len;
            outcome = match tag {
                READY_FOR_QUERY => Some(true),
                ERROR_RESPONSE => Some(false),
                _ => None,
            };
            if outcome.is_some() {
                break;
            }
        }
        if outcome.is_some() {
            // What followed the verdict goes too.
            client.write_all(&pending).await?;
            client.flush().await?;
            return Ok(outcome);
        }
        client
            .write_all(pending.get(..complete).unwrap_or(&[]))
            .await?;
        client.flush().await?;
        pending.drain(..complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_are_limited_per_address_for_a_window() {
        let limiter = LoginLimiter::default();
        let from: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let start = Instant::now();
        for _ in 0..FAILED_LOGINS_ALLOWED {
            assert_eq!(limiter.wait_for(from, start), None);
            limiter.failed(from, start);
        }
        let wait = limiter.wait_for(from, start + Duration::from_secs(10));
        assert_eq!(wait, Some(Duration::from_secs(50)));
        assert_eq!(limiter.wait_for(other, start), None);
        assert_eq!(limiter.wait_for(from, start + FAILED_LOGIN_WINDOW), None);
        limiter.succeeded(from);
        assert_eq!(limiter.wait_for(from, start), None);
    }

    #[test]
    fn plaintext_logins_only_where_the_config_allows_them() {
        let limiter = LoginLimiter::default();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert!(refusal(AdminPlaintext::Loopback, &limiter, local, false).is_none());
        let refused = refusal(AdminPlaintext::Loopback, &limiter, remote, false);
        assert!(refused.unwrap().contains("need TLS"));
        assert!(refusal(AdminPlaintext::Loopback, &limiter, remote, true).is_none());
        assert!(refusal(AdminPlaintext::Never, &limiter, local, false).is_some());
        assert!(refusal(AdminPlaintext::Anywhere, &limiter, remote, false).is_none());
    }
}
