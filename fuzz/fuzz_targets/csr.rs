//! CSR parser: never panics; an accepted CSR always names a valid SPIFFE ID.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_identity::x509;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = x509::parse_csr(data) {
        assert!(csr.spiffe_id.as_str().starts_with("spiffe://"));
        assert!(!csr.public_key_der.is_empty());
    }
});
