//! Fuzzes the decoder of a connection's first packet (StartupMessage,
//! SSLRequest, GSSENCRequest, CancelRequest) as the proxy calls it: first
//! on the 4-byte header alone, then on the whole buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::wire::frame::MAX_STARTUP_PACKET_LENGTH;
use pgmirror::wire::startup::{decode_startup, FeStartup};

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..4) else {
        assert_eq!(decode_startup(data), Ok(None));
        return;
    };
    let length = u32::from_be_bytes(header.try_into().unwrap());
    let in_range = (8..=MAX_STARTUP_PACKET_LENGTH + 4).contains(&length);
    // The proxy allocates the packet only if the header alone is accepted.
    assert_eq!(decode_startup(header).is_ok(), in_range);
    match decode_startup(data) {
        Ok(Some((packet, used))) => {
            assert_eq!(used, length as usize);
            if let FeStartup::Startup { raw, .. } = packet {
                assert_eq!(raw, &data[..used]);
            }
        }
        Ok(None) => assert!(in_range && data.len() < length as usize),
        Err(_) => {}
    }
});
