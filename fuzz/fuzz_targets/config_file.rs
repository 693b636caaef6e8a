//! Fuzzes the configuration file parser (TOML, serde and validation) as
//! each process reads its file: a mistake is an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::config::{self, PartnerConfig, ProxyConfig, WitnessConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let errors = [
        config::parse::<PartnerConfig>("x.toml", text).err(),
        config::parse::<WitnessConfig>("x.toml", text).err(),
        config::parse::<ProxyConfig>("x.toml", text).err(),
    ];
    for error in errors.into_iter().flatten() {
        assert!(error.to_string().starts_with("x.toml: "));
    }
});
