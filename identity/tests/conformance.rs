//! Spec conformance of the identity core (issue 22): foreign bundle entries Sigil cannot
//! use are ignored rather than rejecting the bundle, ES512 JWT-SVIDs validate, the JWT-SVID
//! claims rules, keys that cannot be published, and SPIFFE ID length and case.
//! docs/conformance.md names these tests.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p521::ecdsa::signature::hazmat::PrehashSigner;
use sha2::Digest;
use sigil_identity::bundle::{BundleSet, Jwk};
use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority, UpstreamAuthority};
use sigil_identity::jwt::{self, JwtError, JwtKey};
use sigil_identity::keys::KeyType;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};

const MIN5: Duration = Duration::from_secs(300);

fn td(n: &str) -> TrustDomain {
    TrustDomain::new(n).unwrap()
}

fn ca_der() -> Vec<u8> {
    CertificateAuthority::new_self_signed(
        &CaParams {
            trust_domain: td("example.org"),
            key_type: KeyType::EcP256,
            ttl: MIN5,
            subject: CaSubject::default(),
        },
        SystemTime::now(),
    )
    .unwrap()
    .certificate()
    .to_vec()
}

fn x509_entry(x5c: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "x5c": x5c})
}

/// X509-SVID.md 6.2: an `x509-svid` entry whose `x5c` is absent or empty MUST be ignored;
/// of several certificates all but the first MUST be ignored.
///
/// Before the fix: the whole bundle was rejected ("x5c must hold exactly one certificate,
/// found 0" / "found 2"), so federation with such a partner broke.
#[test]
fn x509_entries_without_x5c_are_ignored_and_only_the_first_certificate_counts() {
    let good = ca_der();
    let other = ca_der();
    let doc = serde_json::json!({"keys": [
        x509_entry(serde_json::json!([])),
        {"use": "x509-svid", "kty": "EC"},
        x509_entry(serde_json::json!([STANDARD.encode(&good), STANDARD.encode(&other)])),
    ]});
    let b = TrustBundle::from_jwks_json(td("example.org"), doc.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("a bundle with unusable x509-svid entries was rejected: {e}"));
    assert_eq!(
        b.x509_authorities,
        vec![good],
        "only the first x5c certificate"
    );
}

/// An ES512 (P-521) JWT authority and a token signed with it.
fn p521_authority() -> (p521::ecdsa::SigningKey, Jwk) {
    let mut scalar = [0u8; 66];
    scalar[34..].copy_from_slice(&rand::random::<[u8; 32]>());
    scalar[34] |= 1;
    let sk = p521::ecdsa::SigningKey::from_slice(&scalar).unwrap();
    let point = p521::ecdsa::VerifyingKey::from(&sk).to_encoded_point(false);
    let jwk = Jwk {
        kty: "EC".into(),
        use_: Some("jwt-svid".into()),
        kid: Some("p521-key".into()),
        crv: Some("P-521".into()),
        x: Some(URL_SAFE_NO_PAD.encode(point.x().unwrap())),
        y: Some(URL_SAFE_NO_PAD.encode(point.y().unwrap())),
        ..Default::default()
    };
    (sk, jwk)
}

fn es512_token(sk: &p521::ecdsa::SigningKey, claims: serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "ES512", "kid": "p521-key", "typ": "JWT"});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: p521::ecdsa::Signature = sk
        .sign_prehash(&sha2::Sha512::digest(input.as_bytes()))
        .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// JWT-SVID.md 2.1 lists ES512; a partner's P-521 `jwt-svid` key is kept and its tokens
/// validate. A key on a curve no allowed algorithm uses is ignored, not fatal.
///
/// Before the fix: the bundle was rejected ("EC curve Some(\"P-521\") is not supported"),
/// and an ES512 token was refused as a disallowed alg.
#[test]
fn es512_keys_are_kept_and_es512_tokens_validate() {
    let (sk, jwk) = p521_authority();
    let p192 = serde_json::json!({"use": "jwt-svid", "kty": "EC", "kid": "old", "crv": "P-192", "x": "AA", "y": "AA"});
    let doc = serde_json::json!({"keys": [serde_json::to_value(&jwk).unwrap(), p192]});
    let b = TrustBundle::from_jwks_json(td("partner.org"), doc.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("a bundle with a P-521 jwt-svid key was rejected: {e}"));
    assert_eq!(b.jwt_authorities.len(), 1, "the P-192 key is ignored");
    assert_eq!(b.jwt_authorities[0].kid, "p521-key");
    let mut set = BundleSet::new();
    set.insert(b).unwrap();
    let now = SystemTime::now();
    let claims =
        serde_json::json!({"sub": "spiffe://partner.org/api", "aud": "db", "exp": unix(now) + 300});
    let token = es512_token(&sk, claims.clone());
    let v = jwt::validate_jwt_svid(&token, &set, "db", now).unwrap();
    assert_eq!(v.spiffe_id.to_string(), "spiffe://partner.org/api");
    // The signature really is checked: other claims under the same signature fail.
    let forged = {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"sub": "spiffe://partner.org/admin", "aud": "db", "exp": unix(now) + 300})
                .to_string(),
        );
        parts.join(".")
    };
    assert!(matches!(
        jwt::validate_jwt_svid(&forged, &set, "db", now),
        Err(JwtError::BadSignature(_))
    ));
}

/// A token minted by a Sigil JWT key with arbitrary claims and header.
fn token_with(key: &JwtKey, header_extra: serde_json::Value, claims: serde_json::Value) -> String {
    let mut header = serde_json::json!({"alg": "ES256", "kid": key.kid(), "typ": "JWT"});
    for (k, v) in header_extra.as_object().unwrap() {
        header[k] = v.clone();
    }
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.key().software().unwrap().to_pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let sig = pair
        .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
        .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn jwt_setup() -> (JwtKey, BundleSet) {
    let key = JwtKey::generate(KeyType::EcP256, SystemTime::now() + MIN5).unwrap();
    let mut b = TrustBundle::new(td("example.org"));
    b.jwt_authorities.push(key.authority());
    let mut set = BundleSet::new();
    set.insert(b).unwrap();
    (key, set)
}

/// JWT-SVID.md 3.2/3.3/4: validators MUST reject tokens without `aud` or without `exp`;
/// RFC 7519 4.1.5: a token MUST NOT be accepted before its `nbf`; RFC 7515 4.1.11: a
/// `crit` header naming something not understood MUST be rejected.
///
/// Before the fix: a token with `nbf` an hour ahead validated, and so did one with
/// `crit: ["exp-ext"]` (the aud/exp refusals already held; their tests are new).
#[test]
fn tokens_without_aud_or_exp_before_nbf_or_with_crit_are_refused() {
    let (key, set) = jwt_setup();
    let now = SystemTime::now();
    let sub = "spiffe://example.org/web";
    let exp = unix(now) + 300;
    let good = token_with(
        &key,
        serde_json::json!({}),
        serde_json::json!({"sub": sub, "aud": "db", "exp": exp}),
    );
    jwt::validate_jwt_svid(&good, &set, "db", now).unwrap();

    let no_aud = token_with(
        &key,
        serde_json::json!({}),
        serde_json::json!({"sub": sub, "exp": exp}),
    );
    assert_eq!(
        jwt::validate_jwt_svid(&no_aud, &set, "db", now).unwrap_err(),
        JwtError::MissingClaim("aud")
    );
    let empty_aud = token_with(
        &key,
        serde_json::json!({}),
        serde_json::json!({"sub": sub, "aud": [], "exp": exp}),
    );
    assert_eq!(
        jwt::validate_jwt_svid(&empty_aud, &set, "db", now).unwrap_err(),
        JwtError::MissingClaim("aud")
    );
    let no_exp = token_with(
        &key,
        serde_json::json!({}),
        serde_json::json!({"sub": sub, "aud": "db"}),
    );
    assert_eq!(
        jwt::validate_jwt_svid(&no_exp, &set, "db", now).unwrap_err(),
        JwtError::MissingClaim("exp")
    );
    let future = token_with(
        &key,
        serde_json::json!({}),
        serde_json::json!({"sub": sub, "aud": "db", "exp": exp, "nbf": unix(now) + 3600}),
    );
    let e = jwt::validate_jwt_svid(&future, &set, "db", now);
    assert!(
        e.as_ref()
            .is_err_and(|e| e.to_string().contains("not valid before")),
        "a token with nbf an hour ahead: {e:?}"
    );
    // Within the leeway, and in the past: fine.
    for nbf in [unix(now) + 30, unix(now) - 60] {
        let t = token_with(
            &key,
            serde_json::json!({}),
            serde_json::json!({"sub": sub, "aud": "db", "exp": exp, "nbf": nbf}),
        );
        jwt::validate_jwt_svid(&t, &set, "db", now).unwrap();
    }
    let crit = token_with(
        &key,
        serde_json::json!({"crit": ["exp-ext"], "exp-ext": true}),
        serde_json::json!({"sub": sub, "aud": "db", "exp": exp}),
    );
    let e = jwt::validate_jwt_svid(&crit, &set, "db", now);
    assert!(
        e.as_ref().is_err_and(|e| e.to_string().contains("crit")),
        "a token with an unknown crit header: {e:?}"
    );
}

/// SPIFFE_Trust_Domain_and_Bundle.md 4.2.1: `kty` MUST be set. An X.509 authority whose
/// key has no JWK form (Ed448 here) is never published with an empty `kty`.
///
/// Before the fix: the element was published as `"kty": ""` (the JWK defaulted).
#[test]
fn an_authority_without_a_jwk_form_is_never_published_with_an_empty_kty() {
    let ed448 = sigil_identity::x509::certs_from_pem(include_str!("data/ed448-root.pem")).unwrap();
    let mut b = TrustBundle::new(td("example.org"));
    b.x509_authorities = vec![ca_der(), ed448[0].clone()];
    let v: serde_json::Value = serde_json::from_str(&b.to_jwks_json()).unwrap();
    for k in v["keys"].as_array().unwrap() {
        assert!(
            k["kty"].as_str().is_some_and(|t| !t.is_empty()),
            "published a key without kty: {k}"
        );
        assert!(
            k.get("kid").is_none(),
            "x509-svid entries carry no kid: {k}"
        );
        assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
    }
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
}

/// The source of such a key is an upstream CA whose root has a key type Sigil cannot
/// verify or publish: it is refused with a reason naming the key type.
///
/// Before the fix: refused as "no root certificate (self-signed) found" (x509-parser could
/// not check the P-521 self-signature), which sends the operator hunting for a missing root.
#[test]
fn an_upstream_chain_with_an_unsupported_key_type_is_refused_with_the_reason() {
    let e = UpstreamAuthority::from_pem(
        include_str!("data/p521-upstream.pem"),
        include_str!("data/p521-upstream.key"),
        Some(include_str!("data/p521-root.pem")),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("EC P-521") && msg.contains("cannot verify or publish"),
        "{msg}"
    );
}

/// SPIFFE-ID.md 2.3: implementations MUST support SPIFFE IDs up to 2048 bytes; Sigil
/// refuses longer ones (SHOULD NOT generate them), so it never issues an ID a conforming
/// peer may reject.
#[test]
fn spiffe_ids_up_to_2048_bytes_parse_and_longer_ones_are_refused() {
    let prefix = "spiffe://example.org/";
    let id_of = |len: usize| {
        let mut path = String::new();
        while prefix.len() + path.len() < len {
            if !path.is_empty() {
                path.push('/');
            }
            let n = (len - prefix.len() - path.len()).min(200);
            path.push_str(&"a".repeat(n));
        }
        format!("{prefix}{path}")
    };
    let max = id_of(2048);
    assert_eq!(max.len(), 2048);
    let id = SpiffeId::parse(&max).unwrap_or_else(|e| panic!("a 2048-byte ID: {e}"));
    assert_eq!(id.to_string().len(), 2048);
    let over = id_of(2049);
    assert_eq!(over.len(), 2049);
    let e = SpiffeId::parse(&over).unwrap_err();
    assert!(e.to_string().contains("2048"), "{e}");
    // Issued and validated at that length too: the CA signs it, path validation and the
    // SPIFFE leaf rules accept it.
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
    let key = sigil_identity::keys::PrivateKey::generate(KeyType::EcP256).unwrap();
    let issued = ca
        .sign_public_key(
            &key.public_key_der(),
            &sigil_identity::ca::SvidTemplate {
                spiffe_id: &id,
                ttl: Duration::from_secs(60),
                dns_names: &[],
            },
            SystemTime::now(),
        )
        .unwrap();
    let mut chain = vec![issued.leaf];
    chain.extend(issued.intermediates);
    let mut bundle = TrustBundle::new(td("example.org"));
    bundle.x509_authorities = ca.trust_anchors().to_vec();
    let verified =
        sigil_identity::x509::validate_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id.to_string().len(), 2048);
    // The trust domain alone is bounded by the URI host limit, 255 bytes.
    let long_td = format!("spiffe://{}/a", "t".repeat(256));
    assert!(SpiffeId::parse(&long_td).is_err());
}

/// SPIFFE-ID.md 2.1 and 2.4: the trust domain MUST be lowercase; scheme and trust domain
/// are case-insensitive when parsing, the path case-sensitive. Sigil, like go-spiffe,
/// refuses uppercase in the scheme and trust domain instead of folding it, so one SPIFFE ID
/// never has two spellings that authorization policies compare differently.
#[test]
fn uppercase_scheme_or_trust_domain_is_refused_and_the_path_keeps_its_case() {
    for bad in [
        "SPIFFE://example.org/web",
        "Spiffe://example.org/web",
        "spiffe://Example.org/web",
        "spiffe://EXAMPLE.ORG/web",
    ] {
        let e = SpiffeId::parse(bad);
        assert!(e.is_err(), "{bad} was accepted: {e:?}");
    }
    assert!(TrustDomain::new("Example.org").is_err());
    let a = SpiffeId::parse("spiffe://example.org/Web").unwrap();
    let b = SpiffeId::parse("spiffe://example.org/web").unwrap();
    assert_ne!(a, b, "the path is case-sensitive");
    assert_eq!(a.to_string(), "spiffe://example.org/Web");
}
