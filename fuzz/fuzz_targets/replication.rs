//! Fuzzes the streaming-replication decoders the log shipper runs on
//! CopyData bodies: the first 4 input bytes are the body length the frame
//! scanner reports, the rest is the prefix it kept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::wire::replication::{
    decode_backend, decode_frontend, BeReplicationMessage, DecodeError, XLOG_DATA_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((length, prefix)) = data.split_first_chunk::<4>() else {
        return;
    };
    let body_len = u32::from_be_bytes(*length);
    let available = prefix.len().min(body_len as usize);
    let truthful = |error: &DecodeError| {
        let DecodeError::Truncated {
            available: reported,
            needed,
            ..
        } = error;
        assert_eq!(*reported, available);
        assert!(available < *needed);
    };
    match decode_backend(prefix, body_len) {
        Ok(Some(BeReplicationMessage::XLogData { data_len, .. })) => {
            assert!(available >= XLOG_DATA_HEADER_LEN);
            assert_eq!(data_len as usize, body_len as usize - XLOG_DATA_HEADER_LEN);
        }
        Ok(_) => {}
        Err(error) => truthful(&error),
    }
    if let Err(error) = decode_frontend(prefix, body_len) {
        truthful(&error);
    }
});
