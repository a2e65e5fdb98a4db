//! JWT-SVID minting/validation and SPIFFE bundle encoding rules.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sigil_identity::bundle::{BundleError, BundleSet};
use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority};
use sigil_identity::jwt::{self, JwtError, JwtKey};
use sigil_identity::keys::KeyType;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};

const MIN5: Duration = Duration::from_secs(300);

fn td(n: &str) -> TrustDomain {
    TrustDomain::new(n).unwrap()
}

fn setup() -> (JwtKey, BundleSet, SpiffeId) {
    let key = JwtKey::generate(
        KeyType::EcP256,
        SystemTime::now() + Duration::from_secs(86400),
    )
    .unwrap();
    let mut b = TrustBundle::new(td("example.org"));
    b.jwt_authorities.push(key.authority());
    let mut set = BundleSet::new();
    set.insert(b).unwrap();
    (
        key,
        set,
        SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap(),
    )
}

/// Re-signs nothing: builds a token with a forged header and the original signature.
fn with_header(token: &str, header: serde_json::Value) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
    parts.join(".")
}

#[test]
fn minted_token_validates_and_carries_claims() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key.mint(&id, &["svc-b".into()], MIN5, now, None).unwrap();
    let v = jwt::validate_jwt_svid(&tok, &set, "svc-b", now).unwrap();
    assert_eq!(v.spiffe_id, id);
    assert_eq!(v.audience, vec!["svc-b".to_string()]);
    assert!(v.claims.contains_key("iat"));
    let (header, _) = jwt::peek(&tok).unwrap();
    assert_eq!(header["kid"], key.kid());
    assert_eq!(header["typ"], "JWT");
}

#[test]
fn audience_may_be_a_string_or_an_array() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key
        .mint(&id, &["a".into(), "b".into()], MIN5, now, None)
        .unwrap();
    let (_, claims) = jwt::peek(&tok).unwrap();
    assert!(claims["aud"].is_array());
    assert!(jwt::validate_jwt_svid(&tok, &set, "b", now).is_ok());
    let tok = key.mint(&id, &["a".into()], MIN5, now, None).unwrap();
    let (_, claims) = jwt::peek(&tok).unwrap();
    assert!(claims["aud"].is_string());
    assert!(jwt::validate_jwt_svid(&tok, &set, "a", now).is_ok());
}

#[test]
fn wrong_audience_is_rejected() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key.mint(&id, &["svc-b".into()], MIN5, now, None).unwrap();
    let e = jwt::validate_jwt_svid(&tok, &set, "svc-c", now).unwrap_err();
    assert!(matches!(e, JwtError::AudienceMismatch { .. }), "{e}");
}

#[test]
fn expired_token_is_rejected() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key.mint(&id, &["a".into()], MIN5, now, None).unwrap();
    let e =
        jwt::validate_jwt_svid(&tok, &set, "a", now + MIN5 + Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, JwtError::Expired(_)), "{e}");
}

#[test]
fn alg_allow_list_is_checked_first() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key.mint(&id, &["a".into()], MIN5, now, None).unwrap();
    for alg in ["none", "HS256", "EdDSA", ""] {
        let forged = with_header(
            &tok,
            serde_json::json!({"alg": alg, "kid": key.kid(), "typ": "JWT"}),
        );
        assert_eq!(
            jwt::validate_jwt_svid(&forged, &set, "a", now).unwrap_err(),
            JwtError::DisallowedAlg(alg.into())
        );
    }
    // Algorithm confusion: claim RS256 with an EC key: the signature cannot verify.
    let forged = with_header(&tok, serde_json::json!({"alg": "ES384", "kid": key.kid()}));
    assert!(jwt::validate_jwt_svid(&forged, &set, "a", now).is_err());
}

#[test]
fn kid_and_typ_rules() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key.mint(&id, &["a".into()], MIN5, now, None).unwrap();
    let no_kid = with_header(&tok, serde_json::json!({"alg": "ES256", "typ": "JWT"}));
    assert_eq!(
        jwt::validate_jwt_svid(&no_kid, &set, "a", now).unwrap_err(),
        JwtError::MissingKid
    );
    let bad_typ = with_header(
        &tok,
        serde_json::json!({"alg": "ES256", "kid": key.kid(), "typ": "at+jwt"}),
    );
    assert_eq!(
        jwt::validate_jwt_svid(&bad_typ, &set, "a", now).unwrap_err(),
        JwtError::BadTyp("at+jwt".into())
    );
    // typ JOSE and absent are both fine (header changed, so the signature now fails instead).
    let jose = with_header(
        &tok,
        serde_json::json!({"alg": "ES256", "kid": key.kid(), "typ": "JOSE"}),
    );
    assert!(matches!(
        jwt::validate_jwt_svid(&jose, &set, "a", now).unwrap_err(),
        JwtError::BadSignature(_)
    ));
    let unknown = with_header(&tok, serde_json::json!({"alg": "ES256", "kid": "nope"}));
    assert!(matches!(
        jwt::validate_jwt_svid(&unknown, &set, "a", now).unwrap_err(),
        JwtError::UnknownKid { .. }
    ));
}

#[test]
fn token_of_another_trust_domain_needs_that_bundle() {
    let (key, set, _) = setup();
    let now = SystemTime::now();
    let other = SpiffeId::parse("spiffe://other.org/x").unwrap();
    let tok = key.mint(&other, &["a".into()], MIN5, now, None).unwrap();
    assert_eq!(
        jwt::validate_jwt_svid(&tok, &set, "a", now).unwrap_err(),
        JwtError::NoBundle("other.org".into())
    );
}

#[test]
fn tampered_claims_fail_the_signature() {
    let (key, set, id) = setup();
    let now = SystemTime::now();
    let tok = key.mint(&id, &["a".into()], MIN5, now, None).unwrap();
    let mut parts: Vec<String> = tok.split('.').map(str::to_owned).collect();
    let claims =
        serde_json::json!({"sub": "spiffe://example.org/admin", "aud": "a", "exp": 9999999999i64});
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let forged = parts.join(".");
    assert!(matches!(
        jwt::validate_jwt_svid(&forged, &set, "a", now).unwrap_err(),
        JwtError::BadSignature(_)
    ));
}

#[test]
fn malformed_tokens_are_rejected() {
    let (_, set, _) = setup();
    let now = SystemTime::now();
    for t in ["", "a.b", "a.b.c.d", "!!!.###.$$$"] {
        assert!(
            matches!(
                jwt::validate_jwt_svid(t, &set, "a", now).unwrap_err(),
                JwtError::Malformed(_)
            ),
            "{t}"
        );
    }
    assert!(matches!(
        jwt::validate_jwt_svid(&"a".repeat(20000), &set, "a", now).unwrap_err(),
        JwtError::TooLong(_)
    ));
}

#[test]
fn minting_requires_an_audience_and_an_ec_key() {
    let (key, _, id) = setup();
    assert_eq!(
        key.mint(&id, &[], MIN5, SystemTime::now(), None)
            .unwrap_err(),
        JwtError::NoAudience
    );
    assert!(JwtKey::generate(KeyType::Ed25519, SystemTime::now()).is_err());
    let k384 = JwtKey::generate(KeyType::EcP384, SystemTime::now()).unwrap();
    let mut b = TrustBundle::new(td("example.org"));
    b.jwt_authorities.push(k384.authority());
    let mut set = BundleSet::new();
    set.insert(b).unwrap();
    let tok = k384
        .mint(
            &id,
            &["a".into()],
            MIN5,
            SystemTime::now(),
            Some("https://oidc.example.org"),
        )
        .unwrap();
    let v = jwt::validate_jwt_svid(&tok, &set, "a", SystemTime::now()).unwrap();
    assert_eq!(v.claims["iss"], "https://oidc.example.org");
}

/// RS256 and PS256 JWT-SVIDs from an RSA key validate against the bundle; the bundle's
/// JWK carries kty RSA with n, e, kid and alg; the signatures verify with an independent
/// RSA implementation (ring) under the padding the header names; and a token whose alg
/// differs from the key's published alg is refused.
#[test]
fn rsa_keys_sign_rs256_and_ps256_tokens_that_validate() {
    use jwt::SigningAlg;
    let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
    let now = SystemTime::now();
    for (alg, padding) in [
        (
            SigningAlg::Rs256,
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        ),
        (
            SigningAlg::Ps256,
            &ring::signature::RSA_PSS_2048_8192_SHA256,
        ),
    ] {
        let key = JwtKey::generate_for(KeyType::Rsa2048, Some(alg), now + MIN5).unwrap();
        assert_eq!(key.alg(), alg);
        let authority = key.authority();
        let jwk = serde_json::to_value(&authority.jwk).unwrap();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["alg"], alg.name());
        assert_eq!(jwk["kid"], key.kid());
        assert_eq!(jwk["use"], "jwt-svid");
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256, "a 2048-bit modulus without a leading zero");
        assert_eq!(e, [1, 0, 1]);

        let mut b = TrustBundle::new(td("example.org"));
        b.jwt_authorities.push(authority);
        // Through the SPIFFE bundle document and back, as agents and workloads read it.
        let b =
            TrustBundle::from_jwks_json(td("example.org"), b.to_jwks_json().as_bytes()).unwrap();
        assert_eq!(b.jwt_authorities[0].jwk.alg.as_deref(), Some(alg.name()));
        let mut set = BundleSet::new();
        set.insert(b).unwrap();

        let tok = key.mint(&id, &["azure".into()], MIN5, now, None).unwrap();
        let (header, _) = jwt::peek(&tok).unwrap();
        assert_eq!(header["alg"], alg.name());
        let v = jwt::validate_jwt_svid(&tok, &set, "azure", now).unwrap();
        assert_eq!(v.spiffe_id, id);
        let (input, sig) = tok.rsplit_once('.').unwrap();
        ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(
                padding,
                input.as_bytes(),
                &URL_SAFE_NO_PAD.decode(sig).unwrap(),
            )
            .unwrap_or_else(|_| panic!("{alg} signature does not verify with ring"));

        // The same signature under the other RSA alg: refused for the key's alg before
        // any signature check.
        let other = if alg == SigningAlg::Rs256 {
            "PS256"
        } else {
            "RS256"
        };
        let relabelled = with_header(
            &tok,
            serde_json::json!({"alg": other, "kid": key.kid(), "typ": "JWT"}),
        );
        let e = jwt::validate_jwt_svid(&relabelled, &set, "azure", now).unwrap_err();
        assert!(matches!(e, JwtError::KeyAlgMismatch { .. }), "{e}");
        // A tampered payload fails the signature.
        let mut parts: Vec<&str> = tok.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&serde_json::json!({"sub": "spiffe://example.org/admin", "aud": "azure", "exp": 4_000_000_000i64})).unwrap(),
        );
        parts[1] = &forged_claims;
        let e = jwt::validate_jwt_svid(&parts.join("."), &set, "azure", now).unwrap_err();
        assert!(matches!(e, JwtError::BadSignature(_)), "{e}");
    }
    // RSA keys default to RS256; mismatched pairs are refused with the rule.
    let k = JwtKey::generate(KeyType::Rsa2048, now).unwrap();
    assert_eq!(k.alg(), SigningAlg::Rs256);
    let e = JwtKey::generate_for(KeyType::EcP256, Some(SigningAlg::Rs256), now).unwrap_err();
    assert!(e.to_string().contains("RS256 and PS256 an RSA key"), "{e}");
    let e = JwtKey::generate_for(KeyType::Rsa2048, Some(SigningAlg::Es256), now).unwrap_err();
    assert!(e.to_string().contains("ES256 needs ECDSA-P256"), "{e}");
    assert_eq!("PS256".parse::<SigningAlg>().unwrap(), SigningAlg::Ps256);
    assert!("HS256".parse::<SigningAlg>().is_err());
}

fn sample_bundle() -> TrustBundle {
    let ca = CertificateAuthority::new_self_signed(
        &CaParams {
            trust_domain: td("example.org"),
            key_type: KeyType::EcP256,
            ttl: MIN5,
            subject: CaSubject::default(),
        },
        SystemTime::now(),
    )
    .unwrap();
    let key = JwtKey::generate(KeyType::EcP256, SystemTime::now()).unwrap();
    let mut b = TrustBundle::new(td("example.org"));
    b.x509_authorities = vec![ca.certificate().to_vec()];
    b.jwt_authorities = vec![key.authority()];
    b.sequence = Some(7);
    b.refresh_hint = Some(MIN5);
    b
}

#[test]
fn bundle_round_trips_through_jwks() {
    let b = sample_bundle();
    let doc = b.to_jwks_json();
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["spiffe_sequence"], 7);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    assert_eq!(v["keys"][0]["kty"], "EC");
    assert_eq!(v["keys"][1]["use"], "jwt-svid");
    let back = TrustBundle::from_jwks_json(td("example.org"), doc.as_bytes()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn unknown_uses_and_key_types_are_skipped() {
    let b = sample_bundle();
    let mut v: serde_json::Value = serde_json::from_str(&b.to_jwks_json()).unwrap();
    let keys = v["keys"].as_array_mut().unwrap();
    keys.push(serde_json::json!({"use": "wit-svid", "kty": "EC", "kid": "x"}));
    keys.push(serde_json::json!({"use": "jwt-svid", "kty": "oct", "kid": "y", "k": "AAAA"}));
    keys.push(serde_json::json!({"kty": "EC"}));
    let back = TrustBundle::from_jwks_json(td("example.org"), v.to_string().as_bytes()).unwrap();
    assert!(back.same_keys(&b));
}

#[test]
fn malformed_keys_reject_the_bundle() {
    // (An empty x5c is ignored, not malformed: X509-SVID.md 6.2, see conformance.rs.)
    let cases = [
        (
            serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["!!"]}]}),
            "base64",
        ),
        (
            serde_json::json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["AAAA"]}]}),
            "DER",
        ),
        (
            serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}),
            "kid",
        ),
        (
            serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-256"}]}),
            "lacks x",
        ),
        (serde_json::json!({"nokeys": []}), "keys"),
    ];
    for (doc, needle) in cases {
        let e =
            TrustBundle::from_jwks_json(td("example.org"), doc.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains(needle), "{doc}: {e}");
    }
    assert!(matches!(
        TrustBundle::from_jwks_json(td("x.org"), b"garbage").unwrap_err(),
        BundleError::Json(_)
    ));
    let huge = vec![b' '; 2 * 1024 * 1024];
    assert!(matches!(
        TrustBundle::from_jwks_json(td("x.org"), &huge).unwrap_err(),
        BundleError::TooLarge(_)
    ));
}

#[test]
fn duplicate_kids_are_rejected() {
    let b = sample_bundle();
    let mut v: serde_json::Value = serde_json::from_str(&b.to_jwks_json()).unwrap();
    let dup = v["keys"][1].clone();
    v["keys"].as_array_mut().unwrap().push(dup);
    let e = TrustBundle::from_jwks_json(td("example.org"), v.to_string().as_bytes()).unwrap_err();
    assert!(matches!(e, BundleError::DuplicateKeyId(_)), "{e}");
}

#[test]
fn bundle_sets_reject_duplicate_trust_domains() {
    let doc = sample_bundle().to_jwks_json();
    let map = format!("{{\"example.org\": {doc}, \"spiffe://other.org\": {doc}}}");
    let set = BundleSet::from_json_map(map.as_bytes()).unwrap();
    assert_eq!(set.len(), 2);
    let dup = format!("{{\"example.org\": {doc}, \"spiffe://example.org\": {doc}}}");
    assert_eq!(
        BundleSet::from_json_map(dup.as_bytes()).unwrap_err(),
        BundleError::DuplicateTrustDomain("example.org".into())
    );
    let dup = format!("{{\"example.org\": {doc}, \"example.org\": {doc}}}");
    assert_eq!(
        BundleSet::from_json_map(dup.as_bytes()).unwrap_err(),
        BundleError::DuplicateTrustDomain("example.org".into())
    );
    let bad = format!("{{\"Example.org\": {doc}}}");
    assert!(matches!(
        BundleSet::from_json_map(bad.as_bytes()).unwrap_err(),
        BundleError::BadTrustDomain { .. }
    ));
    let mut set = BundleSet::new();
    set.insert(TrustBundle::new(td("a.org"))).unwrap();
    assert!(set.insert(TrustBundle::new(td("a.org"))).is_err());
}

#[test]
fn pem_bootstrap_bundles_are_accepted() {
    let b = sample_bundle();
    let pem = b.x509_pem();
    let back = TrustBundle::from_jwks_or_pem(td("example.org"), pem.as_bytes()).unwrap();
    assert_eq!(back.x509_authorities, b.x509_authorities);
    let back =
        TrustBundle::from_jwks_or_pem(td("example.org"), b.to_jwks_json().as_bytes()).unwrap();
    assert!(back.same_keys(&b));
}
