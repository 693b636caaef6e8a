//! Fuzzes the NoticeResponse decoder the proxy's commit fence runs on the
//! notices a server sends, and the recognition of a cut sync-rep wait.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::wire::notice::{decode_notice, SyncRepCut, MAX_NOTICE_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(fields) = decode_notice(data) {
        assert!(data.len() <= MAX_NOTICE_LEN);
        assert_eq!(data[1..5], (data.len() as u32 - 1).to_be_bytes());
        assert_eq!(data.last(), Some(&0));
        let _ = SyncRepCut::from_notice(&fields);
    }
});
