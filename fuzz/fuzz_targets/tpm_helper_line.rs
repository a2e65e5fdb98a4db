//! The lines the agent and its TPM helper exchange (`sigil_identity::tpm_helper`): decoding
//! never panics, and whatever decodes as a reply or a request encodes to a line that
//! decodes back to it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_identity::tpm_helper::{Reply, Request, decode_line, encode_line};

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = decode_line::<Reply>(data) {
        let line = encode_line(&reply);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(decode_line::<Reply>(&line).expect("re-decodes"), reply);
    }
    if let Ok(request) = decode_line::<Request>(data) {
        let line = encode_line(&request);
        assert_eq!(decode_line::<Request>(&line).expect("re-decodes"), request);
    }
});
