//! Fuzzes the proxy's handling of backend messages during authentication:
//! whole messages are taken off the buffer by their length field, and
//! BackendKeyData and ErrorResponse are decoded from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::wire::startup::{
    backend_key_data, backend_message_len, decode_backend_key_data, error_code,
};

fuzz_target!(|data: &[u8]| {
    let mut pending = data;
    while let Ok(Some((tag, len))) = backend_message_len(pending) {
        assert!(len >= 5);
        let Some(message) = pending.get(..len) else {
            break;
        };
        assert_eq!(message[0], tag);
        if let Some((pid, secret)) = decode_backend_key_data(message) {
            assert_eq!(backend_key_data(pid, &secret.to_be_bytes()), message);
        }
        if let Some(code) = error_code(message) {
            assert!(!code.contains('\0'));
        }
        pending = &pending[len..];
    }
    // A buffer that is not a run of whole messages still never panics.
    let _ = decode_backend_key_data(data);
    let _ = error_code(data);
});
