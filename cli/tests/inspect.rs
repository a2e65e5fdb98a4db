//! `sigil inspect` on files and tokens made by Sigil's own CA, and its exit codes: 0 when
//! the SVID verifies, 3 when it does not, 1 when the input cannot be read.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, SystemTime};

use sigil_identity::ca::{CaParams, CertificateAuthority, SvidTemplate};
use sigil_identity::jwt::JwtKey;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain, x509};

fn sigil(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ca(td: &str) -> CertificateAuthority {
    let params = CaParams {
        trust_domain: TrustDomain::new(td).unwrap(),
        key_type: KeyType::EcP256,
        ttl: Duration::from_secs(3600),
        subject: Default::default(),
    };
    CertificateAuthority::new_self_signed(&params, SystemTime::now()).unwrap()
}

#[test]
fn x509_svids_verify_against_their_bundle_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("example.org");
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
    let svid = ca
        .sign_public_key(
            &key.public_key_der(),
            &SvidTemplate {
                spiffe_id: &id,
                ttl: Duration::from_secs(600),
                dns_names: &["web.default.svc".into()],
            },
            SystemTime::now(),
        )
        .unwrap();
    let svid_pem = dir.path().join("svid.pem");
    std::fs::write(&svid_pem, x509::certs_to_pem(&svid.chain())).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, x509::certs_to_pem(ca.trust_anchors())).unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, x509::certs_to_pem(ca_other().trust_anchors())).unwrap();

    let (code, out) = sigil(&["inspect", svid_pem.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("spiffe://example.org/ns/default/sa/web") && out.contains("web.default.svc"),
        "{out}"
    );
    let (code, out) = sigil(&[
        "inspect",
        svid_pem.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Verified:    yes"), "{out}");
    let (code, out) = sigil(&[
        "inspect",
        svid_pem.to_str().unwrap(),
        "--bundle",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("Verified:    NO"), "{out}");
    let (code, out) = sigil(&["inspect", "/nonexistent/file.pem"]);
    assert_eq!(code, 1, "{out}");
}

fn ca_other() -> CertificateAuthority {
    ca("example.org")
}

#[test]
fn jwt_svids_verify_with_the_bundle_and_audience() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let key = JwtKey::generate(
        KeyType::EcP256,
        SystemTime::now() + Duration::from_secs(3600),
    )
    .unwrap();
    let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
    let token = key
        .mint(
            &id,
            &["db".into()],
            Duration::from_secs(300),
            SystemTime::now(),
            None,
        )
        .unwrap();
    let mut bundle = TrustBundle::new(td);
    bundle.jwt_authorities.push(key.authority());
    let jwks = dir.path().join("bundle.spiffe");
    std::fs::write(&jwks, bundle.to_jwks_json()).unwrap();

    let (code, out) = sigil(&["inspect", &token, "--bundle", jwks.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Verified:        yes, spiffe://example.org/ns/default/sa/web"),
        "{out}"
    );
    let (code, out) = sigil(&[
        "inspect",
        &token,
        "--bundle",
        jwks.to_str().unwrap(),
        "--audience",
        "not-db",
    ]);
    assert_eq!(code, 3, "{out}");
    // A tampered payload does not verify.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = parts[1].chars().rev().collect();
    let (code, _) = sigil(&[
        "inspect",
        &parts.join("."),
        "--bundle",
        jwks.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
}
