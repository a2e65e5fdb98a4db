//! X509-SVID leaf inspection and DER splitting: never panic on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_identity::x509;

fuzz_target!(|data: &[u8]| {
    let _ = x509::inspect_leaf(data);
    if let Ok(certs) = x509::split_der_certs(data) {
        assert_eq!(certs.concat(), data);
    }
});
