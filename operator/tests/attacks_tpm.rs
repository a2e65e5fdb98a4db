//! The TPM attacks of issue 21 (item 4's un-enrolment and renewal, item 5's TPM holes),
//! each played against the operator's Node API on the real apiserver with software TPMs
//! (swtpm) and the agent's own TPM code. Each doc comment says what the attack did to the
//! code before the fix. The other revocation attacks are in e2e/tests/attacks_revocation.rs.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::tpm as tpm_common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use node_api_common::{World, WorldOptions};
use serde_json::json;
use sigil_agent::node_client::NodeClientError;
use sigil_operator::node_api::tpm::{EK_ANNOTATION, ManufacturerCas, TpmConfig};
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

/// Attack: a machine's TPM is un-enrolled (its Node's `sigil.dev/tpm-ek-sha256`
/// annotation removed, because the machine was retired or is suspect), but its agent keeps
/// the `SyncEntries` stream it opened before and goes on receiving the node's entries.
/// docs/tpm.md promised "removing it revokes the TPM's access at once".
///
/// Before the fix: only new calls looked the annotation up; the open stream stayed open
/// until the agent SVID expired (the test failed with "still open 3s after un-enrolling").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolling_a_tpm_ends_its_agents_stream_at_once() {
    let ca = ManufacturerCa::new("Acme");
    let swtpm = swtpm();
    let w = tpm_world("atk-unenrol", &ca, CHALLENGE_TIMEOUT).await;
    let tpm = TestTpm::provision(&ca, swtpm).await;
    w.enroll_tpm(&w.node_a, &tpm.ek_hash).await;
    let agent = w.agent_client().await;
    tpm.attest(&agent, None).await.unwrap();
    let mut stream = agent.sync_entries(0).await.unwrap();
    stream.message().await.unwrap().expect("the first snapshot");

    Api::<Node>::all(w.client.clone())
        .patch(
            &w.node_a,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {EK_ANNOTATION: null}}})),
        )
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the entry stream is still open 3s after un-enrolling the TPM")
    .expect("ended with a status");
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(
        ended.message().contains(&format!(
            "no Node is enrolled for the TPM with EK hash {}",
            tpm.ek_hash
        )),
        "{ended:?}"
    );
    assert!(
        w.metrics_text()
            .contains(r#"rpc="SyncEntries",reason="tpm_not_enrolled""#)
    );
}

/// Attack: a thief copies a TPM agent's SVID and key (the agent key is a software key:
/// only attestation involved the TPM) and renews it with `RenewAgent` from anywhere,
/// forever, without the TPM.
///
/// Before the fix: `RenewAgent` renewed a TPM agent on its current SVID alone; the test
/// failed at "a TPM agent's key renewed without the TPM".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_tpm_agent_key_does_not_renew_without_the_tpm() {
    let ca = ManufacturerCa::new("Acme");
    let swtpm = swtpm();
    let w = tpm_world("atk-tpm-renew", &ca, CHALLENGE_TIMEOUT).await;
    let tpm = TestTpm::provision(&ca, swtpm).await;
    w.enroll_tpm(&w.node_a, &tpm.ek_hash).await;
    let agent = w.agent_client().await;
    let first = tpm.attest(&agent, None).await.unwrap();

    // The thief holds the SVID and key, and even a token; no TPM.
    let renewed = agent.renew("any token").await;
    let Err(e) = renewed else {
        panic!("a TPM agent's key renewed without the TPM");
    };
    assert_refused(
        e,
        Code::PermissionDenied,
        "renew by attesting again with AttestNodeTpm",
    );
    // The agent with its TPM renews by attesting again: a fresh credential activation.
    let again = tpm.attest(&agent, None).await.unwrap();
    assert_eq!(again.spiffe_id, first.spiffe_id);
    assert!(
        w.metrics_text()
            .contains(r#"rpc="RenewAgent",reason="tpm_renewal_requires_attestation""#)
    );
}

/// Attack: in a cluster whose owner wants every agent tied to a TPM, a compromised node
/// (or any pod that can run as the agent's service account there) attests with a
/// service-account token alone and gets an agent identity without any TPM.
///
/// Before the fix: there was no way to require TPM; PSAT attestation succeeded next to
/// TPM attestation (the test, without the new flag, failed at "PSAT alone attested").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psat_alone_is_refused_where_tpm_is_required() {
    let ca = ManufacturerCa::new("Acme");
    let w = World::start_with(
        "atk-require",
        WorldOptions {
            tpm: Some(TpmConfig {
                manufacturer_cas: ManufacturerCas::from_pem(&ca.pem).unwrap(),
                challenge_timeout: CHALLENGE_TIMEOUT,
                required: true,
            }),
            ..Default::default()
        },
    )
    .await;
    let pod = w
        .pod(
            "agent",
            &w.node_a,
            "sigil-agent",
            json!({"app": "sigil-agent"}),
        )
        .await;
    let token = w.token(&pod, &w.audience).await;
    let agent = w.agent_client().await;
    let Err(e) = agent.attest_psat(&token).await else {
        panic!("PSAT alone attested where TPM is required");
    };
    assert_refused(
        e,
        Code::PermissionDenied,
        "this cluster requires TPM node attestation (operator flag --require-tpm)",
    );
    assert!(agent.svid().is_none());
    assert!(
        w.metrics_text()
            .contains(r#"rpc="AttestNode",reason="tpm_required""#)
    );
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
                        required: false,
                    }),
                    ..Default::default()
                },
            )
            .await;
            let forged = TestTpm::provision(&leaf, swtpm).await;
            w.enroll_tpm(&w.node_a, &forged.ek_hash).await;
            let attested = forged.attest(&w.agent_client().await, None).await;
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
    let e = tpm
        .attest(&agent, None)
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
