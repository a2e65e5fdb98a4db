//! The Workload API's HTTP/2 header-block rewriter: arbitrary client bytes never panic it,
//! and it never holds more than its bounds allow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_agent::h2_authority::{MAX_FRAME, MAX_HEADER_BLOCK, Rewriter};

fuzz_target!(|data: &[u8]| {
    let mut rw = Rewriter::default();
    let mut out = Vec::new();
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(data);
    // Feed in uneven chunks, as a socket would deliver them.
    for chunk in input.chunks(7) {
        if rw.feed(chunk, &mut out).is_err() {
            return;
        }
        assert!(rw.buffered() <= MAX_FRAME + 9 + 7 + MAX_HEADER_BLOCK);
    }
});
