//! What a key type costs the signer, with no network and no apiserver: X509-SVIDs signed
//! per second by Sigil's CA (the code the Node API's SignX509Svids runs) with an ECDSA
//! P-256 CA and with RSA CAs, for a P-256 and an RSA-2048 workload key; JWT-SVIDs minted
//! per second with ES256, RS256 and PS256 keys; and how long generating each key type
//! takes (the operator makes a CA key per rotation, the agent a workload key per SVID).
//! Each figure is one thread for `SIGIL_BENCH_SIGNING_SECS` (2) seconds.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use report::{Report, env};
use sigil_identity::TrustDomain;
use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority, SvidTemplate};
use sigil_identity::jwt::{JwtKey, SigningAlg};
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_testkit::report;

/// Calls `f` for `window` and returns calls per second.
fn rate(window: Duration, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < window {
        f();
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Generates `n` keys of `key_type`: (median, slowest).
fn keygen(key_type: KeyType, n: usize) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            PrivateKey::generate(key_type).unwrap();
            started.elapsed()
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}

fn main() {
    let window = Duration::from_secs(env("SIGIL_BENCH_SIGNING_SECS", 2) as u64);
    let mut report = Report::new(
        "signing",
        "Signing cost by key type (one thread; Sigil's CA and JWT signer, ring underneath)",
    );
    let td = TrustDomain::new("bench.example.org").unwrap();
    let id = td.id("/ns/bench/sa/app").unwrap();
    let template = SvidTemplate {
        spiffe_id: &id,
        ttl: Duration::from_secs(3600),
        dns_names: &[],
    };
    let workload_keys = [KeyType::EcP256, KeyType::Rsa2048]
        .map(|t| (t, PrivateKey::generate(t).unwrap().public_key_der()));
    for ca_type in [
        KeyType::EcP256,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ] {
        let ca = CertificateAuthority::new_self_signed(
            &CaParams {
                trust_domain: td.clone(),
                key_type: ca_type,
                ttl: Duration::from_secs(86400),
                subject: CaSubject::default(),
            },
            SystemTime::now(),
        )
        .unwrap();
        for (workload_type, spki) in &workload_keys {
            let per_s = rate(window, || {
                ca.sign_public_key(spki, &template, SystemTime::now())
                    .unwrap();
            });
            report.row(
                &format!("X509-SVIDs signed, {ca_type} CA, {workload_type} workload key"),
                format!("{per_s:>10.0} SVIDs/s"),
            );
        }
    }

    let audience = ["api://AzureADTokenExchange".to_owned()];
    for (key_type, alg) in [
        (KeyType::EcP256, SigningAlg::Es256),
        (KeyType::Rsa2048, SigningAlg::Rs256),
        (KeyType::Rsa2048, SigningAlg::Ps256),
        (KeyType::Rsa3072, SigningAlg::Rs256),
    ] {
        let key = JwtKey::generate_for(
            key_type,
            Some(alg),
            SystemTime::now() + Duration::from_secs(86400),
        )
        .unwrap();
        let per_s = rate(window, || {
            key.mint(
                &id,
                &audience,
                Duration::from_secs(300),
                SystemTime::now(),
                None,
            )
            .unwrap();
        });
        report.row(
            &format!("JWT-SVIDs minted, {alg} ({key_type} key)"),
            format!("{per_s:>10.0} JWTs/s"),
        );
    }

    for (key_type, n) in [
        (KeyType::EcP256, 200),
        (KeyType::Rsa2048, env("SIGIL_BENCH_SIGNING_RSA_KEYS", 20)),
        (KeyType::Rsa3072, env("SIGIL_BENCH_SIGNING_RSA_KEYS", 20)),
        (
            KeyType::Rsa4096,
            env("SIGIL_BENCH_SIGNING_RSA_KEYS", 20) / 2,
        ),
    ] {
        let (median, slowest) = keygen(key_type, n.max(1));
        report.row(
            &format!("{key_type} key generation ({n} keys)"),
            format!("median {median:>10.2?}, slowest {slowest:.2?}"),
        );
    }
    report.finish();
}
