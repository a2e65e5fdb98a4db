//! X509-SVID issuance and validation, CA construction, upstream authorities and CSRs.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sigil_identity::ca::{
    CaError, CaParams, CaSubject, CertificateAuthority, SvidTemplate, UpstreamAuthority,
    UpstreamError,
};
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::x509::{self, CsrError, SvidError};
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use x509_parser::prelude::*;

const HOUR: Duration = Duration::from_secs(3600);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn params(name: &str, key_type: KeyType, ttl: Duration) -> CaParams {
    CaParams {
        trust_domain: td(name),
        key_type,
        ttl,
        subject: CaSubject::default(),
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

/// A workload key and a CSR for `id`, as the agent makes them.
fn csr_for(id: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

fn bundle_of(ca: &CertificateAuthority) -> TrustBundle {
    let mut b = TrustBundle::new(ca.trust_domain().clone());
    b.x509_authorities = ca.trust_anchors().to_vec();
    b
}

fn issue(
    ca: &CertificateAuthority,
    id: &str,
    ttl: Duration,
    dns: &[String],
    at: SystemTime,
) -> Vec<Vec<u8>> {
    let (_, csr) = csr_for(id);
    let parsed = x509::parse_csr(&csr).unwrap();
    let sid = SpiffeId::parse(id).unwrap();
    ca.sign_csr(
        &parsed,
        &SvidTemplate {
            spiffe_id: &sid,
            ttl,
            dns_names: dns,
        },
        at,
    )
    .unwrap()
    .chain()
}

#[test]
fn issued_svid_has_the_spec_shape_and_validates() {
    let t = now();
    let ca = CertificateAuthority::new_self_signed(
        &params("example.org", KeyType::EcP256, 24 * HOUR),
        t,
    )
    .unwrap();
    let chain = issue(
        &ca,
        "spiffe://example.org/ns/default/sa/web",
        HOUR,
        &["web.default.svc".into()],
        t,
    );
    assert_eq!(chain.len(), 1, "a self-signed CA sends only the leaf");

    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter(|n| matches!(n, GeneralName::URI(_)))
        .collect();
    assert_eq!(uris.len(), 1);
    assert!(
        san.critical,
        "SAN must be critical when the subject is empty"
    );
    assert!(
        leaf.subject().iter().next().is_none(),
        "leaf subject is empty"
    );
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(
        ku.critical
            && ku.value.digital_signature()
            && !ku.value.key_cert_sign()
            && !ku.value.crl_sign()
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);

    let v = x509::validate_x509_svid(&chain, &bundle_of(&ca), t).unwrap();
    assert_eq!(
        v.spiffe_id.as_str(),
        "spiffe://example.org/ns/default/sa/web"
    );
    let info = x509::inspect_leaf(&chain[0]).unwrap();
    assert_eq!(info.dns_names, vec!["web.default.svc".to_string()]);

    // The CA certificate itself: cA=true, keyCertSign, URI SAN of the trust domain.
    let (_, cac) = X509Certificate::from_der(ca.certificate()).unwrap();
    assert!(cac.basic_constraints().unwrap().unwrap().value.ca);
    assert!(cac.key_usage().unwrap().unwrap().value.key_cert_sign());
}

#[test]
fn every_key_type_signs_and_validates() {
    let t = now();
    for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Ed25519] {
        let ca =
            CertificateAuthority::new_self_signed(&params("example.org", kt, HOUR), t).unwrap();
        let chain = issue(&ca, "spiffe://example.org/w", HOUR, &[], t);
        x509::validate_x509_svid(&chain, &bundle_of(&ca), t)
            .unwrap_or_else(|e| panic!("{kt}: {e}"));
    }
}

/// An RSA-3072 CA signs an RSA-2048 workload key's CSR, built the way the agent builds it;
/// the SVID validates, names the RSA signature algorithm and carries the RSA key, with
/// keyEncipherment as RSA TLS 1.2 key exchange needs.
#[test]
fn an_rsa_ca_signs_svids_of_rsa_and_ec_workload_keys() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::Rsa3072, HOUR), t)
            .unwrap();
    assert_eq!(ca.key_type(), KeyType::Rsa3072);
    let (_, cac) = X509Certificate::from_der(ca.certificate()).unwrap();
    match cac.public_key().parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(k) => assert_eq!(k.key_size(), 3072),
        other => panic!("CA key is {other:?}"),
    }
    let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/jvm").unwrap();
    for workload in [KeyType::Rsa2048, KeyType::EcP256] {
        let key = PrivateKey::generate(workload).unwrap();
        let csr = x509::build_csr(&key, &id).unwrap();
        let parsed = x509::parse_csr(&csr).unwrap();
        let svid = ca
            .sign_csr(
                &parsed,
                &SvidTemplate {
                    spiffe_id: &id,
                    ttl: HOUR,
                    dns_names: &[],
                },
                t,
            )
            .unwrap();
        let chain = svid.chain();
        let verified = x509::validate_x509_svid(&chain, &bundle_of(&ca), t).unwrap();
        assert_eq!(verified.spiffe_id, id);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        // sha256WithRSAEncryption
        assert_eq!(
            leaf.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.113549.1.1.11"
        );
        assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert_eq!(ku.key_encipherment(), workload.is_rsa(), "{workload}");
        // Another RSA CA's bundle does not validate it.
        if workload == KeyType::Rsa2048 {
            let other = CertificateAuthority::new_self_signed(
                &params("example.org", KeyType::Rsa2048, HOUR),
                t,
            )
            .unwrap();
            assert!(x509::validate_x509_svid(&chain, &bundle_of(&other), t).is_err());
        }
    }
    // The CA survives its PEM round trip (the CA Secret) as an RSA-3072 key.
    let back = PrivateKey::from_pem(&ca.key_pkcs8_pem().unwrap()).unwrap();
    assert_eq!(back.key_type(), KeyType::Rsa3072);
}

#[test]
fn leaf_ttl_is_clipped_to_the_ca_lifetime() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let chain = issue(&ca, "spiffe://example.org/w", 10 * HOUR, &[], t);
    let info = x509::inspect_leaf(&chain[0]).unwrap();
    assert!(info.not_after <= ca.not_after());
    assert!(info.not_after > t + HOUR - Duration::from_secs(60));
}

#[test]
fn expired_svid_is_rejected() {
    let t = now();
    let ca = CertificateAuthority::new_self_signed(
        &params("example.org", KeyType::EcP256, 24 * HOUR),
        t,
    )
    .unwrap();
    let chain = issue(&ca, "spiffe://example.org/w", HOUR, &[], t);
    let e = x509::validate_x509_svid(&chain, &bundle_of(&ca), t + 2 * HOUR).unwrap_err();
    assert!(matches!(e, SvidError::Expired { index: 0, .. }), "{e}");
    assert!(e.to_string().contains("expired"));
}

#[test]
fn wrong_trust_domain_is_rejected() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let other =
        CertificateAuthority::new_self_signed(&params("other.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let chain = issue(&ca, "spiffe://example.org/w", HOUR, &[], t);
    let e = x509::validate_x509_svid(&chain, &bundle_of(&other), t).unwrap_err();
    assert_eq!(
        e,
        SvidError::WrongTrustDomain {
            expected: "other.org".into(),
            found: "example.org".into()
        }
    );
}

#[test]
fn svid_from_another_ca_of_the_same_trust_domain_is_untrusted() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let rogue =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let chain = issue(&rogue, "spiffe://example.org/w", HOUR, &[], t);
    let e = x509::validate_x509_svid(&chain, &bundle_of(&ca), t).unwrap_err();
    assert!(matches!(e, SvidError::Untrusted { .. }), "{e}");
}

/// A CA built directly with rcgen, so tests can sign malformed leaves with its key.
struct RawCa {
    cert: Vec<u8>,
    key: KeyPair,
    params: CertificateParams,
}

fn raw_ca(name: &str) -> RawCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::hours(1);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(30);
    let cert = p.self_signed(&key).unwrap().der().to_vec();
    RawCa {
        cert,
        key,
        params: p,
    }
}

fn raw_leaf(ca: &RawCa, mutate: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org/w".try_into().unwrap())];
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::minutes(1);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::hours(1);
    mutate(&mut p);
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    p.signed_by(&key, &issuer).unwrap().der().to_vec()
}

fn raw_bundle(ca: &RawCa) -> TrustBundle {
    let mut b = TrustBundle::new(td("example.org"));
    b.x509_authorities = vec![ca.cert.clone()];
    b
}

#[test]
fn control_leaf_from_raw_ca_validates() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |_| {});
    x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap();
}

#[test]
fn ca_certificate_as_leaf_is_rejected() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    });
    assert_eq!(
        x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::LeafIsCa
    );
}

#[test]
fn leaf_with_key_cert_sign_is_rejected() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |p| {
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ]
    });
    assert_eq!(
        x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::LeafCanSign
    );
}

#[test]
fn leaf_without_digital_signature_is_rejected() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
    });
    assert_eq!(
        x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::MissingDigitalSignature
    );
}

#[test]
fn two_uri_sans_are_rejected() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/other".try_into().unwrap(),
        ));
    });
    assert_eq!(
        x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::MultipleUriSans(2)
    );
}

#[test]
fn no_uri_san_is_rejected() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |p| {
        p.subject_alt_names = vec![SanType::DnsName("x.example".try_into().unwrap())]
    });
    assert_eq!(
        x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::NoUriSan
    );
}

#[test]
fn non_spiffe_uri_san_is_rejected() {
    let ca = raw_ca("raw");
    let leaf = raw_leaf(&ca, |p| {
        p.subject_alt_names = vec![SanType::URI("https://example.org/w".try_into().unwrap())]
    });
    assert!(matches!(
        x509::validate_x509_svid(&[leaf], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::InvalidSpiffeId(_)
    ));
}

#[test]
fn garbage_chain_is_rejected() {
    let ca = raw_ca("raw");
    assert!(matches!(
        x509::validate_x509_svid(&[b"not a cert".to_vec()], &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::Malformed { index: 0, .. }
    ));
    let empty: [Vec<u8>; 0] = [];
    assert_eq!(
        x509::validate_x509_svid(&empty, &raw_bundle(&ca), now()).unwrap_err(),
        SvidError::EmptyChain
    );
}

/// An enterprise root and an intermediate under it, as PEM (what an upstream Secret holds).
fn enterprise_pki(intermediate_days: i64, intermediate_is_ca: bool) -> (String, String, String) {
    let root = raw_ca("Enterprise Root");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "Enterprise Issuing CA");
    p.is_ca = if intermediate_is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    p.key_usages = if intermediate_is_ca {
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::days(2);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(intermediate_days);
    let issuer = Issuer::from_params(&root.params, &root.key);
    let cert = p.signed_by(&key, &issuer).unwrap();
    (
        cert.pem(),
        key.serialize_pem(),
        x509::certs_to_pem(&[root.cert]),
    )
}

#[test]
fn intermediate_under_upstream_chains_to_the_enterprise_root() {
    let t = now();
    let (cert, key, root) = enterprise_pki(30, true);
    let upstream = UpstreamAuthority::from_pem(&cert, &key, Some(&root)).unwrap();
    let ca = CertificateAuthority::new_under_upstream(
        &params("example.org", KeyType::EcP256, 24 * HOUR),
        &upstream,
        t,
    )
    .unwrap();
    assert_eq!(
        ca.trust_anchors(),
        upstream.roots(),
        "the bundle publishes the enterprise root"
    );
    let chain = issue(&ca, "spiffe://example.org/w", HOUR, &[], t);
    assert_eq!(chain.len(), 3, "leaf, Sigil CA, enterprise intermediate");
    x509::validate_x509_svid(&chain, &bundle_of(&ca), t).unwrap();
    // Without the intermediates the path is broken.
    assert!(matches!(
        x509::validate_x509_svid(&chain[..1], &bundle_of(&ca), t).unwrap_err(),
        SvidError::Untrusted { .. }
    ));
}

#[test]
fn upstream_that_is_not_a_ca_is_refused() {
    let (cert, key, root) = enterprise_pki(30, false);
    assert!(matches!(
        UpstreamAuthority::from_pem(&cert, &key, Some(&root)).unwrap_err(),
        UpstreamError::NotACa { .. }
    ));
}

#[test]
fn upstream_key_mismatch_is_refused() {
    let (cert, _, root) = enterprise_pki(30, true);
    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    assert_eq!(
        UpstreamAuthority::from_pem(&cert, &other, Some(&root)).unwrap_err(),
        UpstreamError::KeyMismatch
    );
}

#[test]
fn upstream_expiring_before_the_ca_ttl_is_refused() {
    let (cert, key, root) = enterprise_pki(1, true);
    let upstream = UpstreamAuthority::from_pem(&cert, &key, Some(&root)).unwrap();
    let e = CertificateAuthority::new_under_upstream(
        &params("example.org", KeyType::EcP256, 48 * HOUR),
        &upstream,
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(e, CaError::Upstream(UpstreamError::ExpiresTooSoon { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("caTTL"), "{e}");
    let e = upstream
        .check_lifetime(now() + 72 * HOUR, HOUR)
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Expired { .. }), "{e}");
}

#[test]
fn upstream_without_root_is_refused() {
    let (cert, key, _) = enterprise_pki(30, true);
    assert_eq!(
        UpstreamAuthority::from_pem(&cert, &key, None).unwrap_err(),
        UpstreamError::NoRoot
    );
}

#[test]
fn persisted_ca_reloads_and_checks_its_key() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let key = PrivateKey::from_pem(&ca.key_pkcs8_pem().unwrap()).unwrap();
    let again = CertificateAuthority::load(
        td("example.org"),
        ca.certificate().to_vec(),
        vec![],
        ca.trust_anchors().to_vec(),
        key,
    )
    .unwrap();
    assert_eq!(again.serial(), ca.serial());
    let chain = issue(&again, "spiffe://example.org/w", HOUR, &[], t);
    x509::validate_x509_svid(&chain, &bundle_of(&ca), t).unwrap();

    let wrong = PrivateKey::generate(KeyType::EcP256).unwrap();
    assert!(matches!(
        CertificateAuthority::load(
            td("example.org"),
            ca.certificate().to_vec(),
            vec![],
            vec![],
            wrong
        )
        .unwrap_err(),
        CaError::KeyMismatch
    ));
}

#[test]
fn ca_refuses_to_sign_after_expiry() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let (_, csr) = csr_for("spiffe://example.org/w");
    let parsed = x509::parse_csr(&csr).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let e = ca
        .sign_csr(
            &parsed,
            &SvidTemplate {
                spiffe_id: &id,
                ttl: HOUR,
                dns_names: &[],
            },
            t + 2 * HOUR,
        )
        .unwrap_err();
    assert!(matches!(e, CaError::Expired(_)));
}

#[test]
fn bad_dns_names_are_refused() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let (_, csr) = csr_for("spiffe://example.org/w");
    let parsed = x509::parse_csr(&csr).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let dns = vec!["bad name!".to_string()];
    let e = ca
        .sign_csr(
            &parsed,
            &SvidTemplate {
                spiffe_id: &id,
                ttl: HOUR,
                dns_names: &dns,
            },
            t,
        )
        .unwrap_err();
    assert!(matches!(e, CaError::BadDnsName(_)), "{e}");
}

#[test]
fn csr_parsing_rules() {
    let (_, good) = csr_for("spiffe://example.org/w");
    assert_eq!(
        x509::parse_csr(&good).unwrap().spiffe_id.as_str(),
        "spiffe://example.org/w"
    );

    assert!(matches!(
        x509::parse_csr(b"garbage").unwrap_err(),
        CsrError::Malformed(_)
    ));
    assert!(matches!(
        x509::parse_csr(&vec![0u8; 9000]).unwrap_err(),
        CsrError::TooLarge(9000, _)
    ));

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![
        SanType::URI("spiffe://example.org/a".try_into().unwrap()),
        SanType::URI("spiffe://example.org/b".try_into().unwrap()),
    ];
    let two = p.serialize_request(&key).unwrap().der().to_vec();
    assert_eq!(
        x509::parse_csr(&two).unwrap_err(),
        CsrError::MultipleUriSans(2)
    );

    p.subject_alt_names = vec![];
    let none = p.serialize_request(&key).unwrap().der().to_vec();
    assert_eq!(x509::parse_csr(&none).unwrap_err(), CsrError::NoUriSan);

    p.subject_alt_names = vec![SanType::URI("spiffe://Example.org/a".try_into().unwrap())];
    let bad_id = p.serialize_request(&key).unwrap().der().to_vec();
    assert!(matches!(
        x509::parse_csr(&bad_id).unwrap_err(),
        CsrError::InvalidSpiffeId(_)
    ));

    // Flip a byte inside the signature: proof of possession fails.
    let mut tampered = good.clone();
    let n = tampered.len();
    tampered[n - 5] ^= 0x55;
    assert!(matches!(
        x509::parse_csr(&tampered).unwrap_err(),
        CsrError::BadSignature | CsrError::Malformed(_)
    ));
}

#[test]
fn pem_and_der_helpers_round_trip() {
    let t = now();
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), t)
            .unwrap();
    let chain = issue(&ca, "spiffe://example.org/w", HOUR, &[], t);
    let all = [chain[0].clone(), ca.certificate().to_vec()];
    let pem = x509::certs_to_pem(&all);
    assert_eq!(x509::certs_from_pem(&pem).unwrap(), all.to_vec());
    assert_eq!(x509::split_der_certs(&all.concat()).unwrap(), all.to_vec());
    assert!(x509::split_der_certs(b"\x30\x03abc").is_err());
    assert!(x509::certs_from_pem("nothing here").is_err());
}

#[test]
fn built_csrs_parse_back_and_agent_csrs_need_no_id() {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
    let der = x509::build_csr(&key, &id).unwrap();
    let parsed = x509::parse_csr(&der).unwrap();
    assert_eq!(parsed.spiffe_id, id);
    assert_eq!(parsed.public_key_der, key.public_key_der());
    assert_eq!(
        x509::parse_csr_public_key(&der).unwrap(),
        key.public_key_der()
    );
    // A CSR without any URI SAN still proves possession of its key.
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let no_id = p.serialize_request(key.key_pair()).unwrap().der().to_vec();
    assert_eq!(
        x509::parse_csr_public_key(&no_id).unwrap(),
        key.public_key_der()
    );
    assert!(x509::parse_csr_public_key(b"garbage").is_err());
}

// RFC 5280 path validation (rustls-webpki) with the SPIFFE rules on top. Each of these
// chains passed the hand-written path builder that checked signatures only.

/// An intermediate CA under `parent`, changed by `mutate` before it is signed.
fn raw_intermediate(parent: &RawCa, mutate: impl FnOnce(&mut CertificateParams)) -> RawCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "intermediate");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::hours(1);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(30);
    mutate(&mut p);
    let issuer = Issuer::from_params(&parent.params, &parent.key);
    let cert = p.signed_by(&key, &issuer).unwrap().der().to_vec();
    RawCa {
        cert,
        key,
        params: p,
    }
}

fn validate_under(root: &RawCa, chain: &[Vec<u8>]) -> Result<(), SvidError> {
    x509::validate_x509_svid(chain, &raw_bundle(root), now()).map(|_| ())
}

#[test]
fn a_control_chain_through_an_intermediate_validates() {
    let root = raw_ca("root");
    let mid = raw_intermediate(&root, |_| {});
    let leaf = raw_leaf(&mid, |_| {});
    validate_under(&root, &[leaf, mid.cert]).unwrap();
}

#[test]
fn a_root_with_path_len_zero_cannot_sign_an_intermediate() {
    let mut root = raw_ca("root");
    root.params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    root.cert = root.params.self_signed(&root.key).unwrap().der().to_vec();
    let mid = raw_intermediate(&root, |_| {});
    let leaf = raw_leaf(&mid, |_| {});
    assert_eq!(
        validate_under(&root, &[leaf, mid.cert]).unwrap_err(),
        SvidError::PathLenConstraint
    );
}

/// nameConstraints (critical) excluding the URI host `example.org`:
/// `SEQUENCE { [1] { SEQUENCE { [6] "example.org" } } }`.
fn excluding_example_org() -> rcgen::CustomExtension {
    let host = b"example.org";
    let mut uri = vec![0x86, host.len() as u8];
    uri.extend_from_slice(host);
    let mut subtree = vec![0x30, uri.len() as u8];
    subtree.extend_from_slice(&uri);
    let mut excluded = vec![0xa1, subtree.len() as u8];
    excluded.extend_from_slice(&subtree);
    let mut value = vec![0x30, excluded.len() as u8];
    value.extend_from_slice(&excluded);
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], value);
    ext.set_criticality(true);
    ext
}

#[test]
fn a_uri_name_constraint_excluding_the_trust_domain_refuses_the_svid() {
    let root = raw_ca("root");
    let mid = raw_intermediate(&root, |p| p.custom_extensions.push(excluding_example_org()));
    let leaf = raw_leaf(&mid, |_| {});
    assert_eq!(
        validate_under(&root, &[leaf, mid.cert]).unwrap_err(),
        SvidError::NameConstraint
    );
}

#[test]
fn an_unknown_critical_extension_refuses_the_svid() {
    let root = raw_ca("root");
    let mut ext =
        rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    ext.set_criticality(true);
    let leaf = raw_leaf(&root, |p| p.custom_extensions.push(ext));
    assert_eq!(
        validate_under(&root, &[leaf]).unwrap_err(),
        SvidError::UnknownCriticalExtension
    );
    // The same extension, not critical, is ignored.
    let ext =
        rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
    let leaf = raw_leaf(&root, |p| p.custom_extensions.push(ext));
    validate_under(&root, &[leaf]).unwrap();
}

#[test]
fn an_intermediate_ca_without_key_usage_is_not_a_signing_certificate() {
    let root = raw_ca("root");
    let mid = raw_intermediate(&root, |p| p.key_usages = vec![]);
    let leaf = raw_leaf(&mid, |_| {});
    assert_eq!(
        validate_under(&root, &[leaf, mid.cert]).unwrap_err(),
        SvidError::IssuerNotCa { index: 1 }
    );
}

#[test]
fn a_leaf_with_a_trust_domains_own_id_is_refused() {
    let root = raw_ca("root");
    let leaf = raw_leaf(&root, |p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())]
    });
    assert!(matches!(
        validate_under(&root, &[leaf]).unwrap_err(),
        SvidError::RootIdInLeaf(_)
    ));
    let ca =
        CertificateAuthority::new_self_signed(&params("example.org", KeyType::EcP256, HOUR), now())
            .unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId::parse("spiffe://example.org").unwrap();
    let e = ca
        .sign_public_key(
            &key.public_key_der(),
            &SvidTemplate {
                spiffe_id: &id,
                ttl: HOUR,
                dns_names: &[],
            },
            now(),
        )
        .unwrap_err();
    assert!(matches!(e, CaError::RootId(_)), "{e}");
}

#[test]
fn an_extended_key_usage_without_tls_purposes_is_refused() {
    let root = raw_ca("root");
    let leaf = raw_leaf(&root, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]
    });
    assert!(matches!(
        validate_under(&root, &[leaf]).unwrap_err(),
        SvidError::InvalidPath(_)
    ));
}

/// What an upstream that signs CSRs (cert-manager) does with Sigil's: the CSR carries the
/// trust domain's URI SAN, the upstream signs it as a CA, and the result becomes a CA
/// whose SVIDs chain to the upstream's root. A result that does not chain to the given
/// root, or names another trust domain, is refused.
#[test]
fn a_csr_signed_by_an_upstream_becomes_a_ca() {
    let t = now();
    let root = raw_ca("Enterprise Root");
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let csr_key: sigil_identity::key_manager::AuthorityKey =
        PrivateKey::from_pem(&key.to_pkcs8_pem()).unwrap().into();
    let pem =
        CertificateAuthority::csr_pem(&params("example.org", KeyType::EcP256, HOUR), &csr_key, t)
            .unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE REQUEST"));
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
    assert!(
        csr.params
            .subject_alt_names
            .iter()
            .any(|s| matches!(s, SanType::URI(u) if u.as_str() == "spiffe://example.org")),
        "{:?}",
        csr.params.subject_alt_names
    );
    // The upstream decides what it signs: a CA for an hour.
    csr.params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    csr.params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    csr.params.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::minutes(1);
    csr.params.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::hours(1);
    let issuer = Issuer::from_params(&root.params, &root.key);
    let signed = csr.signed_by(&issuer).unwrap().der().to_vec();

    let ca = CertificateAuthority::from_signed_chain(
        td("example.org"),
        PrivateKey::from_pem(&key.to_pkcs8_pem()).unwrap(),
        vec![signed.clone(), root.cert.clone()],
        vec![root.cert.clone()],
    )
    .unwrap();
    assert_eq!(ca.trust_anchors(), std::slice::from_ref(&root.cert));
    assert_eq!(
        ca.leaf_intermediates(),
        std::slice::from_ref(&signed),
        "a copy of the root in the chain is dropped"
    );
    let chain = issue(&ca, "spiffe://example.org/w", HOUR / 2, &[], t);
    x509::validate_x509_svid(&chain, &bundle_of(&ca), t).unwrap();

    let other_root = raw_ca("Another Root");
    let refused = CertificateAuthority::from_signed_chain(
        td("example.org"),
        PrivateKey::from_pem(&key.to_pkcs8_pem()).unwrap(),
        vec![signed.clone()],
        vec![other_root.cert],
    );
    assert!(
        matches!(
            refused,
            Err(CaError::Upstream(UpstreamError::ChainBroken(_)))
        ),
        "{refused:?}"
    );
    let refused = CertificateAuthority::from_signed_chain(
        td("other.org"),
        PrivateKey::from_pem(&key.to_pkcs8_pem()).unwrap(),
        vec![signed],
        vec![root.cert],
    );
    assert!(
        matches!(refused, Err(CaError::InvalidCertificate(ref m)) if m.contains("spiffe://other.org")),
        "{refused:?}"
    );
}
