//! SPIFFE ID parser: never panics; whatever it accepts re-parses to itself and satisfies
//! the spec's invariants.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_identity::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert!(s.len() <= 2048);
        assert!(!s.ends_with('/'));
        assert!(!id.path().contains("//") && !id.path().ends_with('/'));
        let again = SpiffeId::parse(&id.to_string()).expect("accepted IDs re-parse");
        assert_eq!(again, id);
        assert!(id.trust_domain().name().bytes().all(|b| !b.is_ascii_uppercase()));
    }
    let _ = TrustDomain::parse(s);
});
