//! SPIFFE bundle (JWK Set) and bundle-map decoders: never panic; accepted bundles
//! round-trip through our encoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_identity::{BundleSet, TrustBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").expect("valid");
    if let Ok(b) = TrustBundle::from_jwks_json(td.clone(), data) {
        let again = TrustBundle::from_jwks_json(td.clone(), b.to_jwks_json().as_bytes()).expect("our output decodes");
        assert!(again.same_keys(&b));
    }
    let _ = TrustBundle::from_jwks_or_pem(td, data);
    let _ = BundleSet::from_json_map(data);
});
