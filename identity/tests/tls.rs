//! mTLS between SVIDs with the SPIFFE verifiers, over an in-memory pipe.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority, SvidTemplate};
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::tls::{
    self, Authorizer, SharedBundles, SpiffeClientVerifier, SpiffeServerVerifier, SwappableCert,
};
use sigil_identity::{BundleSet, SpiffeId, TrustBundle, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn ca(td: &str) -> CertificateAuthority {
    CertificateAuthority::new_self_signed(
        &CaParams {
            trust_domain: TrustDomain::new(td).unwrap(),
            key_type: KeyType::EcP256,
            ttl: Duration::from_secs(3600),
            subject: CaSubject::default(),
        },
        SystemTime::now(),
    )
    .unwrap()
}

fn svid(ca: &CertificateAuthority, id: &str) -> Arc<SwappableCert> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let csr = sigil_identity::x509::parse_csr(p.serialize_request(&key).unwrap().der()).unwrap();
    let sid = SpiffeId::parse(id).unwrap();
    let template = SvidTemplate {
        spiffe_id: &sid,
        ttl: Duration::from_secs(600),
        dns_names: &[],
    };
    // Sigil's own paths get component SVIDs, as the operator issues them.
    let issued = if sid.is_reserved() {
        ca.sign_component(&csr.public_key_der, &template, SystemTime::now())
    } else {
        ca.sign_csr(&csr, &template, SystemTime::now())
    }
    .unwrap();
    let cert = SwappableCert::new();
    cert.set(
        &issued.chain(),
        &PrivateKey::from_pem(&key.serialize_pem()).unwrap(),
    )
    .unwrap();
    cert
}

fn bundles(cas: &[&CertificateAuthority]) -> Arc<SharedBundles> {
    let mut set = BundleSet::new();
    for c in cas {
        let mut b = TrustBundle::new(c.trust_domain().clone());
        b.x509_authorities = c.trust_anchors().to_vec();
        set.insert(b).unwrap();
    }
    SharedBundles::new(set)
}

/// Runs one handshake + echo; returns the client-observed result and the server's view of
/// the client's ID.
async fn handshake(
    server_cert: Arc<SwappableCert>,
    server_bundles: Arc<SharedBundles>,
    client_authz: Authorizer,
    optional: bool,
    client_cert: Arc<SwappableCert>,
    client_bundles: Arc<SharedBundles>,
    server_authz: Authorizer,
) -> (Result<(), String>, Option<SpiffeId>) {
    let scfg = tls::server_config(
        server_cert,
        SpiffeClientVerifier::new(server_bundles, client_authz, optional),
    )
    .unwrap();
    let ccfg = tls::client_config(
        client_cert,
        SpiffeServerVerifier::new(client_bundles, server_authz),
    )
    .unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let mut s = TlsAcceptor::from(Arc::new(scfg)).accept(a).await.ok()?;
        let peer = s.get_ref().1.peer_certificates().and_then(tls::peer_id);
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.ok()?;
        s.write_all(&buf).await.ok()?;
        s.flush().await.ok()?;
        Some(peer)
    });
    let client = async move {
        let name = rustls::pki_types::ServerName::try_from("operator.sigil").unwrap();
        let mut c = TlsConnector::from(Arc::new(ccfg))
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok(())
    };
    let res = client.await;
    let peer = server.await.unwrap().flatten();
    (res, peer)
}

#[tokio::test]
async fn mutual_tls_authenticates_both_sides_by_spiffe_id() {
    let ca = ca("example.org");
    let server = svid(&ca, "spiffe://example.org/sigil/operator");
    let client = svid(&ca, "spiffe://example.org/sigil/agent/k8s_psat/c/n1");
    let b = bundles(&[&ca]);
    let (res, peer) = handshake(
        server,
        b.clone(),
        Authorizer::MemberOf(TrustDomain::new("example.org").unwrap()),
        false,
        client,
        b,
        Authorizer::Exact(SpiffeId::parse("spiffe://example.org/sigil/operator").unwrap()),
    )
    .await;
    res.unwrap();
    assert_eq!(
        peer.unwrap().as_str(),
        "spiffe://example.org/sigil/agent/k8s_psat/c/n1"
    );
}

#[tokio::test]
async fn client_refuses_a_server_with_the_wrong_id() {
    let ca = ca("example.org");
    let server = svid(&ca, "spiffe://example.org/not-the-operator");
    let client = svid(&ca, "spiffe://example.org/agent");
    let b = bundles(&[&ca]);
    let (res, _) = handshake(
        server,
        b.clone(),
        Authorizer::Any,
        true,
        client,
        b,
        Authorizer::Exact(SpiffeId::parse("spiffe://example.org/sigil/operator").unwrap()),
    )
    .await;
    let e = res.unwrap_err();
    assert!(e.contains("not authorised"), "{e}");
}

#[tokio::test]
async fn server_refuses_a_client_from_an_untrusted_ca() {
    let ca = ca("example.org");
    let rogue = ca_rogue();
    let server = svid(&ca, "spiffe://example.org/sigil/operator");
    let client = svid(&rogue, "spiffe://example.org/agent");
    let b = bundles(&[&ca]);
    let (res, peer) = handshake(
        server,
        b.clone(),
        Authorizer::Any,
        false,
        client,
        b,
        Authorizer::Any,
    )
    .await;
    assert!(
        res.is_err() || peer.is_none(),
        "untrusted client must not be accepted"
    );
}

fn ca_rogue() -> CertificateAuthority {
    ca("example.org")
}

#[tokio::test]
async fn optional_client_auth_lets_anonymous_clients_in() {
    let ca = ca("example.org");
    let server = svid(&ca, "spiffe://example.org/sigil/operator");
    let b = bundles(&[&ca]);
    let (res, peer) = handshake(
        server,
        b.clone(),
        Authorizer::Any,
        true,
        SwappableCert::new(),
        b,
        Authorizer::Any,
    )
    .await;
    res.unwrap();
    assert!(peer.is_none());
}

#[tokio::test]
async fn bundle_updates_apply_to_new_handshakes() {
    let old = ca("example.org");
    let new = ca("example.org");
    let server = svid(&new, "spiffe://example.org/sigil/operator");
    let client_bundles = bundles(&[&old]);
    let b = bundles(&[&new]);
    let (res, _) = handshake(
        server.clone(),
        b.clone(),
        Authorizer::Any,
        true,
        SwappableCert::new(),
        client_bundles.clone(),
        Authorizer::Any,
    )
    .await;
    assert!(
        res.is_err(),
        "server signed by a CA the client does not know yet"
    );
    let mut nb = TrustBundle::new(TrustDomain::new("example.org").unwrap());
    nb.x509_authorities = [old.trust_anchors(), new.trust_anchors()].concat();
    client_bundles.upsert(nb);
    let (res, _) = handshake(
        server,
        b,
        Authorizer::Any,
        true,
        SwappableCert::new(),
        client_bundles,
        Authorizer::Any,
    )
    .await;
    res.unwrap();
}

/// A leaf for `id` signed with the CA's own key but without the component policy: what a
/// workload SVID with a component's path would look like, had one ever been signed.
fn forged_without_policy(ca: &CertificateAuthority, id: &str) -> Arc<SwappableCert> {
    let ca_key = KeyPair::from_pem(&ca.key_pkcs8_pem().unwrap()).unwrap();
    let ca_der = rustls::pki_types::CertificateDer::from(ca.certificate().to_vec());
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = p.signed_by(&key, &issuer).unwrap();
    let cert = SwappableCert::new();
    cert.set(
        &[leaf.der().to_vec()],
        &PrivateKey::from_pem(&key.serialize_pem()).unwrap(),
    )
    .unwrap();
    cert
}

fn component(path: &str) -> Authorizer {
    Authorizer::Component {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        path: path.into(),
    }
}

#[tokio::test]
async fn component_authorizers_accept_component_svids_on_both_sides() {
    let ca = ca("example.org");
    let b = bundles(&[&ca]);
    let (res, peer) = handshake(
        svid(&ca, "spiffe://example.org/sigil/operator"),
        b.clone(),
        component("/sigil/agent/"),
        false,
        svid(&ca, "spiffe://example.org/sigil/agent/k8s_psat/c/n1"),
        b,
        component("/sigil/operator"),
    )
    .await;
    res.unwrap();
    assert_eq!(
        peer.unwrap().as_str(),
        "spiffe://example.org/sigil/agent/k8s_psat/c/n1"
    );
}

#[tokio::test]
async fn a_workload_svid_never_passes_for_an_agent_even_with_the_agents_id() {
    let ca = ca("example.org");
    let b = bundles(&[&ca]);
    let forged = forged_without_policy(&ca, "spiffe://example.org/sigil/agent/k8s_psat/c/n1");
    let (res, peer) = handshake(
        svid(&ca, "spiffe://example.org/sigil/operator"),
        b.clone(),
        component("/sigil/agent/"),
        true,
        forged,
        b,
        component("/sigil/operator"),
    )
    .await;
    assert!(
        res.is_err() && peer.is_none(),
        "a leaf without the component policy was accepted as an agent: {res:?} {peer:?}"
    );
}

#[tokio::test]
async fn a_workload_svid_never_passes_for_the_operator_even_with_its_id() {
    let ca = ca("example.org");
    let b = bundles(&[&ca]);
    let (res, _) = handshake(
        forged_without_policy(&ca, "spiffe://example.org/sigil/operator"),
        b.clone(),
        Authorizer::Any,
        true,
        SwappableCert::new(),
        b,
        component("/sigil/operator"),
    )
    .await;
    let e = res.unwrap_err();
    assert!(e.contains("not a Sigil component"), "{e}");
}

#[test]
fn the_ca_never_signs_a_workload_svid_for_a_reserved_path_nor_a_component_outside_it() {
    let ca = ca("example.org");
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    for id in [
        "spiffe://example.org/sigil",
        "spiffe://example.org/sigil/agent/k8s_psat/c/n1",
        "spiffe://example.org/sigil/operator",
        "spiffe://example.org/sigil/bundle-endpoint",
    ] {
        let sid = SpiffeId::parse(id).unwrap();
        let t = SvidTemplate {
            spiffe_id: &sid,
            ttl: Duration::from_secs(60),
            dns_names: &[],
        };
        let e = ca
            .sign_public_key(&key.public_key_der(), &t, SystemTime::now())
            .unwrap_err();
        assert!(e.to_string().contains("reserved"), "{id}: {e}");
        let c = ca
            .sign_component(&key.public_key_der(), &t, SystemTime::now())
            .unwrap();
        assert!(
            sigil_identity::x509::inspect_leaf(&c.leaf)
                .unwrap()
                .component
        );
    }
    for id in [
        "spiffe://example.org/sigilx",
        "spiffe://example.org/ns/sigil/sa/x",
    ] {
        let sid = SpiffeId::parse(id).unwrap();
        let t = SvidTemplate {
            spiffe_id: &sid,
            ttl: Duration::from_secs(60),
            dns_names: &[],
        };
        let w = ca
            .sign_public_key(&key.public_key_der(), &t, SystemTime::now())
            .unwrap();
        assert!(
            !sigil_identity::x509::inspect_leaf(&w.leaf)
                .unwrap()
                .component
        );
        assert!(
            ca.sign_component(&key.public_key_der(), &t, SystemTime::now())
                .is_err()
        );
    }
}
