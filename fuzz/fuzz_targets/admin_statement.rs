//! Fuzzes the admin console's statement parser, which reads whatever SQL
//! an authenticated admin types at the proxy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::admin::statement;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = statement::parse(text) {
        assert!(error.to_string().contains("supported statements"));
    }
});
