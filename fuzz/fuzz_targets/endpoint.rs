//! Fuzzes the parser of `host:port` / `TCP://host:port` endpoints read
//! from configuration files, admin statements and control messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::config::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(endpoint) = text.parse::<Endpoint>() {
        assert_ne!(endpoint.port, 0);
        assert!(!endpoint.host.is_empty());
        assert!(!endpoint.host.contains(['/', ' ']));
        // Configs and control messages carry the printed form.
        assert_eq!(endpoint.to_string().parse::<Endpoint>(), Ok(endpoint));
    }
});
