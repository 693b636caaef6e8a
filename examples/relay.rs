//! A bare TCP relay, the physical baseline of the benchmarks in `bench/`:
//! what one extra hop costs with no parsing, TLS or fence, so a figure of
//! pgmirror's can be read against it. It uses the proxy's default runtime
//! (tokio, one thread), sets TCP_NODELAY on both sides as the proxy does, and
//! copies with `tokio::io::copy_bidirectional`. Not part of pgmirror.
//!
//!   relay LISTEN_ADDR TARGET_ADDR
//!
//! It runs until killed; a connection that fails is dropped on its own.

use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(target)) = (args.next(), args.next()) else {
        eprintln!("usage: relay LISTEN_ADDR TARGET_ADDR");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (mut client, _) = listener.accept().await?;
        let target = target.clone();
        tokio::spawn(async move {
            let mut server = TcpStream::connect(&target).await?;
            client.set_nodelay(true)?;
            server.set_nodelay(true)?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await
        });
    }
}
