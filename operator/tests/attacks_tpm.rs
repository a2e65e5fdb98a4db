//! The TPM attacks of issue 21 (item 5's TPM holes), each played against the operator's
//! Node API on the real apiserver with software TPMs (swtpm) and the agent's own TPM code.
//! Each doc comment says what the attack did to the code before the fix.
#![allow(clippy::unwrap_used)]

mod node_api_common;
mod tpm_common;
mod trust_domain_common;

use std::time::Duration;

use node_api_common::{World, WorldOptions};
use sigil_agent::node_client::NodeClientError;
use sigil_operator::node_api::tpm::{ManufacturerCas, TpmConfig};
use tonic::Code;
use tpm_common::{ManufacturerCa, TestTpm, swtpm, tpm_world};

const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(5);

fn assert_refused(e: NodeClientError, code: Code, says: &str) -> tonic::Status {
    let NodeClientError::Status { status, .. } = e else {
        panic!("expected a refusal from the operator, got {e}");
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{:?} does not say {says:?}",
        status.message()
    );
    status
}
/// Attack: the operator's EK CA bundle holds a certificate that is not a CA — a vendor's
/// EK certificate, or a TLS certificate pasted in by mistake — whose private key the
/// attacker has. The attacker signs an "EK certificate" for a software TPM with it, enrols
/// that EK hash on a Node it controls (a kubelet may annotate its own Node), and attests
/// as a TPM agent with no real TPM.
///
/// Before the fix: the bundle loaded and the forged EK certificate was accepted: the test
/// failed at "a TPM whose EK certificate a non-CA certificate signed attested".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ek_ca_bundle_with_a_leaf_certificate_is_refused() {
    let vendor = ManufacturerCa::new("Acme");
    let leaf = ManufacturerCa::with("Leaked TLS", |p| {
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
    });
    let bundle = format!("{}{}", vendor.pem, leaf.pem);
    match ManufacturerCas::from_pem(&bundle) {
        Err(e) => {
            assert!(
                e.contains("certificate 1 (CN=Leaked TLS EK Root CA) is not a CA certificate"),
                "{e}"
            );
            assert!(e.contains("remove it"), "{e}");
        }
        Ok(cas) => {
            // The old behaviour: play the attack through to show what it gives.
            let swtpm = swtpm();
            let w = World::start_with(
                "atk-leaf-ca",
                WorldOptions {
                    tpm: Some(TpmConfig {
                        manufacturer_cas: cas,
                        challenge_timeout: CHALLENGE_TIMEOUT,
                    }),
                    ..Default::default()
                },
            )
            .await;
            let forged = TestTpm::provision(&leaf, swtpm).await;
            w.enroll_tpm(&w.node_a, &forged.ek_hash).await;
            let attested = w
                .agent_client()
                .await
                .attest_tpm(&forged.device, None)
                .await;
            panic!(
                "the bundle with a non-CA certificate loaded; a TPM whose EK certificate it signed attested: {:?}",
                attested.map(|s| s.spiffe_id)
            );
        }
    }
}

/// Attack: a manufacturer CA in the bundle has expired (the vendor retired it, and its
/// key may no longer be guarded). Whoever holds that key signs an EK certificate that is
/// itself "valid now", and attests a software TPM with it.
///
/// Before the fix: only the EK certificate's own validity was checked; the attestation
/// succeeded (the test failed at "attestation must be refused").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ek_certificate_from_an_expired_ca_is_refused() {
    let retired = ManufacturerCa::with("Retired", |p| {
        p.not_before = time::macros::datetime!(2000-01-01 0:00 UTC);
        p.not_after = time::macros::datetime!(2001-01-01 0:00 UTC);
    });
    let cas = ManufacturerCas::from_pem(&retired.pem).unwrap();
    let problems = cas.not_valid_at(std::time::SystemTime::now());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("CN=Retired EK Root CA"),
        "{problems:?}"
    );
    let swtpm = swtpm();
    let w = tpm_world("atk-old-ca", &retired, CHALLENGE_TIMEOUT).await;
    let tpm = TestTpm::provision(&retired, swtpm).await;
    w.enroll_tpm(&w.node_a, &tpm.ek_hash).await;
    let agent = w.agent_client().await;
    let e = agent
        .attest_tpm(&tpm.device, None)
        .await
        .expect_err("attestation must be refused");
    assert_refused(
        e,
        Code::PermissionDenied,
        "the manufacturer CA that issued the EK certificate, CN=Retired EK Root CA",
    );
    assert!(agent.svid().is_none());
    assert!(w.metrics_text().contains(r#"reason="tpm_ek_ca_not_valid""#));
}
