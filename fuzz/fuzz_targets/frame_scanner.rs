//! Fuzzes the frame scanner that observes relayed protocol v3 bytes: the
//! first input byte picks the direction and a chunk size, and the rest is
//! fed whole and in chunks, which must report the same messages and error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmirror::wire::frame::{FrameError, FrameScanner, MAX_MESSAGE_LEN, PREFIX_LEN};

type Seen = (Option<u8>, u32, Vec<u8>, usize);

fn scan(
    mut scanner: FrameScanner,
    stream: &[u8],
    chunk_len: usize,
) -> (Vec<Seen>, Option<FrameError>) {
    let mut seen = Vec::new();
    let mut error = None;
    let mut start = 0;
    for chunk in stream.chunks(chunk_len) {
        let outcome = scanner.feed(chunk, |message| {
            assert_eq!(
                message.prefix.len(),
                (message.body_len as usize).min(PREFIX_LEN)
            );
            assert!(message.body_len <= MAX_MESSAGE_LEN);
            seen.push((
                message.tag,
                message.body_len,
                message.prefix.to_vec(),
                start + message.end,
            ));
        });
        if let Err(first) = outcome {
            assert!(error.is_none(), "an error is reported once");
            error = Some(first);
        }
        start += chunk.len();
    }
    (seen, error)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let frontend = control & 1 == 1;
    let chunk_len = usize::from(control >> 1) + 1;
    let scanner = || {
        if frontend {
            FrameScanner::frontend()
        } else {
            FrameScanner::backend()
        }
    };
    let whole = scan(scanner(), stream, stream.len().max(1));
    let pieces = scan(scanner(), stream, chunk_len);
    assert_eq!(whole, pieces);
});
