//! TCP options of the proxy's client and server sockets: no Nagle delay,
//! keepalives and TCP_USER_TIMEOUT, so that a vanished peer is noticed on an
//! idle or stuck connection (`[tcp]` of the proxy's configuration).

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

use crate::config::TcpConfig;

/// Sets the options on one connected socket.
pub fn tune(stream: &TcpStream, config: &TcpConfig) -> std::io::Result<()> {
    set_options(SockRef::from(stream), config)
}

/// Sets the options on the proxy's listening socket. Linux gives every
/// connection accepted from it the listener's options, which spares each
/// client login five system calls; elsewhere [`tune_accepted`] sets them.
pub fn tune_listener(listener: &TcpListener, config: &TcpConfig) -> std::io::Result<()> {
    set_options(SockRef::from(listener), config)
}

/// Sets the options on an accepted client socket, where it did not get
/// them from the listener.
pub fn tune_accepted(stream: &TcpStream, config: &TcpConfig) -> std::io::Result<()> {
    if cfg!(target_os = "linux") {
        Ok(())
    } else {
        tune(stream, config)
    }
}

fn set_options(socket: SockRef<'_>, config: &TcpConfig) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    if config.keepalive_idle > 0 {
        let keepalive = TcpKeepalive::new()
            .with_time(Duration::from_secs(config.keepalive_idle))
            .with_interval(Duration::from_secs(config.keepalive_interval))
            .with_retries(config.keepalive_count);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    if config.user_timeout > 0 {
        socket.set_tcp_user_timeout(Some(Duration::from_secs(config.user_timeout)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: TcpConfig = TcpConfig {
        keepalive_idle: 42,
        keepalive_interval: 7,
        keepalive_count: 5,
        user_timeout: 9,
    };

    fn assert_tuned(stream: &TcpStream) {
        let socket = SockRef::from(stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(socket.keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(socket.keepalive_retries().unwrap(), 5);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(9))
        );
        assert!(stream.nodelay().unwrap());
    }

    #[tokio::test]
    async fn the_configured_options_reach_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&stream, &CONFIG).unwrap();
        assert_tuned(&stream);
    }

    #[tokio::test]
    async fn an_accepted_client_socket_has_the_configured_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tune_listener(&listener, &CONFIG).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_accepted(&accepted, &CONFIG).unwrap();
        assert_tuned(&accepted);
    }
}
