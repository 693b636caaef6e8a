//! Fuzzes the parser of WAL positions in pg_lsn's `X/X` text form, read
//! from status output, control messages and configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::wire::lsn::Lsn;

fn hex_half(half: &str) -> u64 {
    assert!((1..=8).contains(&half.len()), "{half:?}");
    assert!(
        half.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "{half:?}"
    );
    u64::from_str_radix(half, 16).unwrap()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(lsn) = text.parse::<Lsn>() {
            let (high, low) = text.split_once('/').unwrap();
            assert_eq!(lsn, Lsn(hex_half(high) << 32 | hex_half(low)));
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
    }
    if let Ok(lsn) = serde_json::from_slice::<Lsn>(data) {
        let json = serde_json::to_string(&lsn).unwrap();
        assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), lsn);
    }
});
