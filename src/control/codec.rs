//! Framing of the control protocol: each message is a 4-byte big-endian
//! length followed by that many bytes of JSON, at most
//! [`MAX_CONTROL_FRAME`]. tokio-util's `LengthDelimitedCodec` splits the
//! frames; [`ControlCodec`] bounds the length before anything is buffered
//! and [`ControlStream`] turns frames into typed messages with serde_json.
//!
//! The [`Hello`] that opens an endpoint connection is read by
//! [`read_hello`] with exact reads, never past its last byte: after a
//! `Hello::Stream` the raw connection goes to the log shipper's relay, and
//! a buffered reader would swallow the relayed bytes.
//!
//! Cancel safety: [`ControlStream::recv`] is cancel-safe (a partial frame
//! stays in the buffer); [`ControlStream::send`] and [`read_hello`] are not,
//! and callers drop the connection when they give up on them.

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

use crate::control::messages::Hello;
use crate::control::ControlError;

/// Largest control frame accepted; status and commands are far smaller.
pub const MAX_CONTROL_FRAME: u32 = 1 << 20;

/// The length prefix: a big-endian u32 counting the body only.
const HEADER_LEN: usize = 4;

/// The body length a frame header announces, refused above the limit.
fn frame_length(header: [u8; HEADER_LEN]) -> Result<usize, ControlError> {
    let len = u32::from_be_bytes(header);
    if len > MAX_CONTROL_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    // A u32 no larger than MAX_CONTROL_FRAME fits any usize we build for.
    usize::try_from(len).map_err(|_| ControlError::TooLarge(len))
}

/// Length-delimited frames of at most [`MAX_CONTROL_FRAME`] bytes.
///
/// Decoding checks the announced length first and hands the inner codec
/// only whole frames, so an oversized frame is refused with its length
/// before its body is buffered, and the inner codec never keeps a
/// half-read frame of its own.
#[derive(Debug)]
pub struct ControlCodec {
    inner: LengthDelimitedCodec,
}

impl Default for ControlCodec {
    fn default() -> Self {
        ControlCodec {
            inner: LengthDelimitedCodec::builder()
                .length_field_type::<u32>()
                .big_endian()
                .max_frame_length(MAX_CONTROL_FRAME as usize)
                .new_codec(),
        }
    }
}

impl Decoder for ControlCodec {
    type Item = BytesMut;
    type Error = ControlError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, ControlError> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes.copy_from_slice(header);
        let whole = HEADER_LEN + frame_length(header_bytes)?;
        if src.len() < whole {
            src.reserve(whole - src.len());
            return Ok(None);
        }
        Ok(self.inner.decode(src)?)
    }
}

impl Encoder<Bytes> for ControlCodec {
    type Error = ControlError;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), ControlError> {
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        if len > MAX_CONTROL_FRAME {
            return Err(ControlError::TooLarge(len));
        }
        Ok(self.inner.encode(body, dst)?)
    }
}

/// A connection carrying typed control messages, one frame each.
///
/// Created by the client after its hello and by the servers after they
/// read a `Hello::Control`; dropping it closes the connection.
#[derive(Debug)]
pub struct ControlStream<S> {
    framed: Framed<S, ControlCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ControlStream<S> {
    pub fn new(stream: S) -> Self {
        ControlStream {
            framed: Framed::new(stream, ControlCodec::default()),
        }
    }

    /// Writes one message and flushes it.
    pub async fn send<T: Serialize>(&mut self, value: &T) -> Result<(), ControlError> {
        let body = serde_json::to_vec(value)?;
        self.framed.send(Bytes::from(body)).await
    }

    /// Reads one message; None at a clean end of stream.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ControlError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(serde_json::from_slice(&frame?)?)),
        }
    }

    /// The raw connection. Only for a stream nothing has been read from:
    /// bytes already buffered would be lost.
    pub fn into_inner(self) -> S {
        self.framed.into_inner()
    }
}

/// Reads the [`Hello`] that opens an endpoint connection, and not a byte
/// more; None if the peer closed before sending one.
pub async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<Hello>, ControlError> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let mut body = vec![0u8; frame_length(header)?];
    stream.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::control::messages::{Command, Request, StreamPurpose};
    use crate::roles::Safety;

    fn pair() -> (ControlStream<DuplexStream>, ControlStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(4096);
        (ControlStream::new(a), ControlStream::new(b))
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_refused() {
        let (a, mut b) = pair();
        let mut a = a.into_inner();
        let request = Request::Command(Command::Safety(Safety::Off));
        let mut writer = ControlStream::new(&mut a);
        writer.send(&request).await.unwrap();
        drop(writer);
        assert_eq!(b.recv::<Request>().await.unwrap(), Some(request));
        a.write_all(&(MAX_CONTROL_FRAME + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            b.recv::<Request>().await,
            Err(ControlError::TooLarge(len)) if len == MAX_CONTROL_FRAME + 1
        ));
        drop(a);
        assert_eq!(b.recv::<Request>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_wire_format_is_a_big_endian_length_and_json() {
        let (mut a, b) = pair();
        let mut b = b.into_inner();
        a.send(&Hello::Control).await.unwrap();
        let body = br#"{"hello":"control"}"#;
        let mut wire = vec![0u8; HEADER_LEN + body.len()];
        b.read_exact(&mut wire).await.unwrap();
        assert_eq!(wire[..HEADER_LEN], (body.len() as u32).to_be_bytes());
        assert_eq!(&wire[HEADER_LEN..], body);
    }

    #[tokio::test]
    async fn a_frame_split_across_writes_is_reassembled() {
        let (a, mut b) = pair();
        let mut a = a.into_inner();
        let body = serde_json::to_vec(&Request::Status).unwrap();
        a.write_all(&(body.len() as u32).to_be_bytes()[..2])
            .await
            .unwrap();
        a.write_all(&(body.len() as u32).to_be_bytes()[2..])
            .await
            .unwrap();
        a.write_all(&body[..3]).await.unwrap();
        let rest = body[3..].to_vec();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            a.write_all(&rest).await.unwrap();
            a
        });
        assert_eq!(b.recv::<Request>().await.unwrap(), Some(Request::Status));
        drop(writer.await.unwrap());
        assert_eq!(b.recv::<Request>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_messages_are_not_sent() {
        let (mut a, _b) = pair();
        let huge = "x".repeat(MAX_CONTROL_FRAME as usize);
        assert!(matches!(
            a.send(&huge).await,
            Err(ControlError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn garbage_is_a_malformed_frame_not_a_panic() {
        let (a, mut b) = pair();
        let mut a = a.into_inner();
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{{{{{").await.unwrap();
        assert!(matches!(
            b.recv::<Request>().await,
            Err(ControlError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn the_hello_is_read_without_the_bytes_after_it() {
        let (a, b) = pair();
        let (mut a, mut b) = (a.into_inner(), b.into_inner());
        let hello = Hello::Stream {
            session: "shop".into(),
            purpose: StreamPurpose::Wal,
        };
        let mut writer = ControlStream::new(&mut a);
        writer.send(&hello).await.unwrap();
        drop(writer);
        a.write_all(b"relayed bytes").await.unwrap();
        drop(a);
        assert_eq!(read_hello(&mut b).await.unwrap(), Some(hello));
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"relayed bytes");
    }

    #[tokio::test]
    async fn a_hello_that_is_garbage_or_too_large_is_refused() {
        let (a, b) = pair();
        let (mut a, mut b) = (a.into_inner(), b.into_inner());
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"GET").await.unwrap();
        assert!(matches!(
            read_hello(&mut b).await,
            Err(ControlError::Malformed(_))
        ));
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_hello(&mut b).await,
            Err(ControlError::TooLarge(u32::MAX))
        ));
        drop(a);
        assert_eq!(read_hello(&mut b).await.unwrap(), None);
    }
}
