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
    let issued = ca
        .sign_csr(
            &csr,
            &SvidTemplate {
                spiffe_id: &sid,
                ttl: Duration::from_secs(600),
                dns_names: &[],
            },
            SystemTime::now(),
        )
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
