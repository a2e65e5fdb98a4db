//! What a key type costs the signer, with no network and no apiserver: X509-SVIDs signed
//! per second by Sigil's CA (the code the Node API's SignX509Svids runs) with an ECDSA
//! P-256 CA and with RSA CAs, for a P-256 and an RSA-2048 workload key; JWT-SVIDs minted
//! per second with ES256, RS256 and PS256 keys; and how long generating each key type
//! takes (the operator makes a CA key per rotation, the agent a workload key per SVID).
//! The same with the CA and JWT keys in a PKCS#11 token (the `pkcs11` key manager against
//! SoftHSM2, a software HSM: a network HSM adds its round trip to every signature).
//! Each figure is one thread for `SIGIL_BENCH_SIGNING_SECS` (2) seconds.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use report::{Report, env};
use sigil_identity::TrustDomain;
use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority, SvidTemplate};
use sigil_identity::jwt::{JwtKey, SigningAlg};
use sigil_identity::key_manager::{AuthorityKey, KeyManager};
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_operator::keys::pkcs11::Pkcs11Keys;
use sigil_testkit::hsm::SoftHsm;
use sigil_testkit::report;
use sigil_testkit::report::rate;

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
    // SoftHSM reads SOFTHSM2_CONF when its module initialises: run again with it set.
    let Some(hsm) = SoftHsm::from_env("bench") else {
        let hsm = SoftHsm::init("bench");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("SOFTHSM2_CONF", hsm.conf())
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    };
    let hsm_keys = Pkcs11Keys::open(hsm.module(), hsm.label(), hsm.pin().to_owned()).unwrap();
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
    let software = |t: KeyType| AuthorityKey::from(PrivateKey::generate(t).unwrap());
    let in_token = |t: KeyType| hsm_keys.generate(t, "sigil-bench").unwrap();
    for (ca_type, pkcs11) in [
        (KeyType::EcP256, false),
        (KeyType::Rsa2048, false),
        (KeyType::Rsa3072, false),
        (KeyType::Rsa4096, false),
        (KeyType::EcP256, true),
        (KeyType::Rsa2048, true),
    ] {
        let params = CaParams {
            trust_domain: td.clone(),
            key_type: ca_type,
            ttl: Duration::from_secs(86400),
            subject: CaSubject::default(),
        };
        let key = if pkcs11 {
            in_token(ca_type)
        } else {
            software(ca_type)
        };
        let ca =
            CertificateAuthority::new_self_signed_with(&params, key, SystemTime::now()).unwrap();
        let where_ = if pkcs11 { " (PKCS#11, SoftHSM2)" } else { "" };
        for (workload_type, spki) in &workload_keys {
            if pkcs11 && *workload_type != KeyType::EcP256 {
                continue;
            }
            let per_s = rate(window, || {
                ca.sign_public_key(spki, &template, SystemTime::now())
                    .unwrap();
            });
            report.row(
                &format!("X509-SVIDs signed, {ca_type} CA{where_}, {workload_type} workload key"),
                format!("{per_s:>10.0} SVIDs/s"),
            );
        }
    }

    let audience = ["api://AzureADTokenExchange".to_owned()];
    for (key_type, alg, pkcs11) in [
        (KeyType::EcP256, SigningAlg::Es256, false),
        (KeyType::Rsa2048, SigningAlg::Rs256, false),
        (KeyType::Rsa2048, SigningAlg::Ps256, false),
        (KeyType::Rsa3072, SigningAlg::Rs256, false),
        (KeyType::EcP256, SigningAlg::Es256, true),
        (KeyType::Rsa2048, SigningAlg::Rs256, true),
        (KeyType::Rsa2048, SigningAlg::Ps256, true),
    ] {
        let signer = if pkcs11 {
            in_token(key_type)
        } else {
            software(key_type)
        };
        let key = JwtKey::with_new_kid(
            signer,
            Some(alg),
            SystemTime::now() + Duration::from_secs(86400),
        )
        .unwrap();
        let where_ = if pkcs11 { ", PKCS#11 SoftHSM2" } else { "" };
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
            &format!("JWT-SVIDs minted, {alg} ({key_type} key{where_})"),
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
    for (key_type, n) in [
        (KeyType::EcP256, 50),
        (KeyType::Rsa2048, env("SIGIL_BENCH_SIGNING_RSA_KEYS", 20)),
    ] {
        let mut times: Vec<Duration> = (0..n.max(1))
            .map(|_| {
                let started = Instant::now();
                let key = hsm_keys.generate(key_type, "sigil-bench").unwrap();
                let elapsed = started.elapsed();
                hsm_keys.destroy(key.reference().unwrap()).unwrap();
                elapsed
            })
            .collect();
        times.sort();
        let (median, slowest) = (times[times.len() / 2], times[times.len() - 1]);
        report.row(
            &format!("{key_type} key generation in the token ({n} keys, PKCS#11 SoftHSM2)"),
            format!("median {median:>10.2?}, slowest {slowest:.2?}"),
        );
    }
    report.finish();
}
