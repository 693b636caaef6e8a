//! Fuzzes the control protocol's receiving side: the length-delimited
//! codec over a connection delivered in chunks, the JSON of every message
//! type in each frame, and the exact-read Hello that opens a connection.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgmirror::control::codec::ControlCodec;
use pgmirror::control::{
    read_hello, ControlError, Hello, MirroringStatus, Request, Response, WitnessRequest,
    MAX_CONTROL_FRAME,
};
use tokio_util::codec::Decoder;

fn check_message(frame: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<Request>(frame) {
        let json = serde_json::to_vec(&request).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&json).unwrap(), request);
    }
    let _ = serde_json::from_slice::<Response>(frame);
    let _ = serde_json::from_slice::<Hello>(frame);
    let _ = serde_json::from_slice::<WitnessRequest>(frame);
    let _ = serde_json::from_slice::<MirroringStatus>(frame);
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk_byte, stream)) = data.split_first() else {
        return;
    };
    let mut codec = ControlCodec::default();
    let mut buffer = BytesMut::new();
    'stream: for chunk in stream.chunks(usize::from(chunk_byte) + 1) {
        buffer.extend_from_slice(chunk);
        loop {
            let capacity = buffer.capacity();
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_CONTROL_FRAME as usize);
                    check_message(&frame);
                }
                Ok(None) => break,
                Err(error) => {
                    assert!(
                        matches!(error, ControlError::TooLarge(len) if len > MAX_CONTROL_FRAME)
                    );
                    // Refused before any room is made for the body.
                    assert_eq!(buffer.capacity(), capacity);
                    break 'stream;
                }
            }
        }
    }

    let mut reader = stream;
    if let Ok(Some(_)) = futures::executor::block_on(read_hello(&mut reader)) {
        let header = u32::from_be_bytes(stream[..4].try_into().unwrap());
        // Not one byte past the Hello: the relayed connection follows it.
        assert_eq!(reader.len(), stream.len() - 4 - header as usize);
    }
});
