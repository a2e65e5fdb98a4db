//! JWT-SVID validation on arbitrary tokens: never panics, never accepts a token that was
//! not signed by the bundle's key.
#![no_main]
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use sigil_identity::jwt::{self, JwtKey};
use sigil_identity::keys::KeyType;
use sigil_identity::{BundleSet, TrustBundle, TrustDomain};

fn bundles() -> &'static BundleSet {
    static B: OnceLock<BundleSet> = OnceLock::new();
    B.get_or_init(|| {
        let key = JwtKey::generate(KeyType::EcP256, SystemTime::now() + Duration::from_secs(3600)).expect("key");
        let mut b = TrustBundle::new(TrustDomain::new("example.org").expect("td"));
        b.jwt_authorities.push(key.authority());
        let mut set = BundleSet::new();
        set.insert(b).expect("insert");
        set
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = jwt::peek(token);
    // The key is fresh and never signs anything here, so nothing may validate.
    assert!(jwt::validate_jwt_svid(token, bundles(), "aud", SystemTime::now()).is_err());
});
