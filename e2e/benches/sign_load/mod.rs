//! The Sigil signing load of the benches: what an agent sends to SignX509Svids, called in a
//! loop from concurrent callers.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use sigil_agent::node_client::NodeClient;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::proto::node as pb;
use sigil_testkit::report::rate;

/// The entries of an attested agent's node: the first message of its entry stream.
pub async fn node_entries(agent: &NodeClient) -> Vec<pb::Entry> {
    use futures::StreamExt;
    let mut stream = agent.sync_entries(0).await.expect("sync");
    stream
        .next()
        .await
        .expect("first message")
        .expect("sync ok")
        .upserts
}

/// One CSR for a fresh P-256 key per entry, as an agent makes them.
pub fn svid_requests(entries: &[pb::Entry]) -> Vec<pb::SvidRequest> {
    entries
        .iter()
        .map(|e| {
            let key = PrivateKey::generate(KeyType::EcP256).expect("key");
            let id = sigil_identity::SpiffeId::parse(&e.spiffe_id).expect("id");
            pb::SvidRequest {
                entry_id: e.id.clone(),
                csr: sigil_identity::x509::build_csr(&key, &id).expect("csr"),
            }
        })
        .collect()
}

/// Calls SignX509Svids with `requests` from `callers` concurrent tasks until `window` has
/// passed: (SVIDs signed, seconds taken).
pub async fn sign_for(
    agent: &NodeClient,
    requests: &[pb::SvidRequest],
    callers: usize,
    window: Duration,
) -> (usize, f64) {
    let started = Instant::now();
    let signed = futures::future::join_all((0..callers).map(|_| async move {
        let mut n = 0;
        while started.elapsed() < window {
            let results = agent.sign(requests.to_vec()).await.expect("sign");
            n += results.iter().filter(|r| r.error_code == 0).count();
        }
        n
    }))
    .await
    .into_iter()
    .sum();
    (signed, started.elapsed().as_secs_f64())
}

/// The physical limit of one core for a node-facing SVID: ring's raw ECDSA P-256
/// signatures per second, and its P-256 verifications per second (every CSR's signature is
/// verified before signing: proof of possession), each on this thread for `window`.
/// An API SVID costs at least one of each: the bound is `1 / (1/sign + 1/verify)`.
pub struct SignVerifyLimit {
    pub sign: f64,
    pub verify: f64,
}

impl SignVerifyLimit {
    pub fn measure(window: Duration) -> Self {
        use ring::signature::{
            ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
            UnparsedPublicKey,
        };
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("pkcs8");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        // About the size of an X509-SVID's TBSCertificate.
        let message = [0x5au8; 400];
        let sign = rate(window, || {
            pair.sign(&rng, &message).expect("sign");
        });
        let signature = pair.sign(&rng, &message).expect("sign");
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref());
        let verify = rate(window, || {
            public.verify(&message, signature.as_ref()).expect("verify");
        });
        Self { sign, verify }
    }

    /// API SVIDs per CPU-second at the limit: one signature and one verification each.
    pub fn bound(&self) -> f64 {
        1.0 / (1.0 / self.sign + 1.0 / self.verify)
    }
}
