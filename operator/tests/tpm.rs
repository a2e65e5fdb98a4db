//! TPM node attestation end to end: software TPMs (swtpm) with EK certificates from a test
//! manufacturer CA, the agent's own TPM code (`sigil_agent::tpm`, tss-esapi) and Node API
//! client, against the operator's Node API on the real apiserver. The happy path and every
//! refusal, each with its precise status and nothing issued.
#![allow(clippy::unwrap_used)]

use sigil_testkit::tpm as tpm_common;
use sigil_testkit::trust_domain as trust_domain_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use sigil_agent::node_client::NodeClientError;
use sigil_tpm::{TpmIdentity, public_tpm2b};
use tonic::Code;
use tpm_common::{ManufacturerCa, TestTpm, swtpm, tpm_world};
use trust_domain_common::*;
use tss_esapi::abstraction::{KeyCustomization, ak};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};

/// Challenge timeout of the test operator: short, so the late-answer case is quick, and
/// still far above what swtpm needs to answer.
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(3);

/// The operator's refusal: its gRPC status.
fn refusal(e: NodeClientError) -> tonic::Status {
    match e {
        NodeClientError::Status { status, .. } => status,
        other => panic!("expected a refusal from the operator, got {other}"),
    }
}

fn assert_refused(
    result: Result<sigil_agent::node_client::AgentSvid, NodeClientError>,
    code: Code,
    says: &str,
) {
    let status = refusal(result.expect_err("attestation must be refused"));
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{:?} does not say {says:?}",
        status.message()
    );
}

#[tokio::test]
async fn a_tpm_attests_its_node_and_the_agent_serves_that_node() {
    let ca = ManufacturerCa::new("Acme");
    let swtpm = swtpm();
    let w = tpm_world("tpm-ok", &ca, CHALLENGE_TIMEOUT).await;
    let tpm = TestTpm::provision(&ca, swtpm).await;
    w.enroll_tpm(&w.node_a, &tpm.ek_hash).await;
    w.cluster_spiffe_id(&format!("{}-web", w.tag), "web").await;
    w.pod("web", &w.node_a, "web", json!({"app": "web"})).await;

    // The agent's own path: TPM identity, challenge answered by ActivateCredential.
    let agent = w.agent_client().await;
    let answered = Arc::new(Mutex::new(None));
    let svid = agent
        .attest_tpm_with(tpm.device.identity().clone(), None, {
            let answered = answered.clone();
            let device = &tpm.device;
            move |c| async move {
                let secret = device
                    .activate_credential(c.credential_blob, c.encrypted_secret)
                    .await
                    .unwrap();
                *answered.lock().unwrap() = Some(secret.clone());
                Ok(secret)
            }
        })
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id.to_string(),
        format!("spiffe://{}/sigil/agent/tpm/{}", w.td, tpm.ek_hash)
    );
    for s in [
        format!("tpm:ek_sha256:{}", tpm.ek_hash),
        "tpm:ek_issuer:CN=Acme EK Root CA".to_owned(),
        "tpm:ek_subject:O=Sigil Test TPM".to_owned(),
        format!("tpm:node_name:{}", w.node_a),
    ] {
        assert!(
            svid.selectors.contains(&s),
            "{s} not in {:?}",
            svid.selectors
        );
    }

    // The SVID is an agent of node A: it gets node A's entries.
    let mut stream = agent.sync_entries(0).await.unwrap();
    let web_id = format!("spiffe://{}/ns/{}/sa/web", w.td, w.ns);
    let found = tokio::time::timeout(SETTLE, async {
        while let Some(msg) = stream.next().await {
            if msg.unwrap().upserts.iter().any(|e| e.spiffe_id == web_id) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "node A's entry {web_id} on the TPM agent's stream"
    );
    // A TPM agent renews by attesting again (a fresh credential activation), not with
    // RenewAgent (operator/tests/attacks_tpm.rs plays the stolen key).
    let renewed = tpm.attest(&agent, None).await.unwrap();
    assert_eq!(renewed.spiffe_id, svid.spiffe_id);

    // Replaying the accepted answer on a new exchange: each challenge has a fresh secret.
    let old = answered.lock().unwrap().clone().unwrap();
    let replayer = w.agent_client().await;
    assert_refused(
        replayer
            .attest_tpm_with(tpm.device.identity().clone(), None, |_| async { Ok(old) })
            .await,
        Code::PermissionDenied,
        "does not match the challenge",
    );
    assert!(replayer.svid().is_none());

    // With the agent pod's token too: the pod must run on the TPM's Node.
    let pod_b = w
        .pod(
            "agent-b",
            &w.node_b,
            "sigil-agent",
            json!({"app": "sigil-agent"}),
        )
        .await;
    let token_b = w.token(&pod_b, &w.audience).await;
    let wrong_node = w.agent_client().await;
    assert_refused(
        tpm.attest(&wrong_node, Some(&token_b)).await,
        Code::PermissionDenied,
        &format!(
            "enrolled for Node {} but the agent pod runs on Node {}",
            w.node_a, w.node_b
        ),
    );
    assert!(wrong_node.svid().is_none());
    let pod_a = w
        .pod(
            "agent-a",
            &w.node_a,
            "sigil-agent",
            json!({"app": "sigil-agent"}),
        )
        .await;
    let token_a = w.token(&pod_a, &w.audience).await;
    let both = w.agent_client().await;
    let svid = tpm.attest(&both, Some(&token_a)).await.unwrap();
    assert!(
        svid.selectors
            .contains(&format!("k8s_psat:agent_node_name:{}", w.node_a))
    );

    let metrics = w.metrics_text();
    for reason in ["tpm_wrong_answer", "tpm_psat_node_mismatch"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason} not counted:\n{metrics}"
        );
    }
}

/// An unrestricted signing key under the EK: it could sign anything, so it proves nothing.
struct Unrestricted;
impl KeyCustomization for Unrestricted {
    fn attributes(&self, b: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        b.with_restricted(false)
    }
}

#[tokio::test]
async fn every_refusal_is_precise_and_issues_nothing() {
    let ca = ManufacturerCa::new("Acme");
    let rogue = ManufacturerCa::new("Rogue");
    let swtpms = [swtpm(), swtpm(), swtpm()];
    let w = tpm_world("tpm-deny", &ca, CHALLENGE_TIMEOUT).await;
    let [sa, sb, sc] = swtpms;
    let (a, b, forged) = tokio::join!(
        TestTpm::provision(&ca, sa),
        TestTpm::provision(&ca, sb),
        TestTpm::provision(&rogue, sc),
    );
    w.enroll_tpm(&w.node_a, &a.ek_hash).await;
    w.enroll_tpm(&w.node_b, &forged.ek_hash).await;
    let fresh = || w.agent_client();

    // An EK certificate from a CA the operator does not trust.
    let agent = fresh().await;
    assert_refused(
        forged.attest(&agent, None).await,
        Code::PermissionDenied,
        "\"CN=Rogue EK Root CA\" does not chain to a configured manufacturer CA",
    );
    assert!(agent.svid().is_none());

    // An AK that is not restricted.
    let unrestricted = a
        .device
        .run(|ctx, keys| {
            let created = ak::create_ak(
                ctx,
                keys.ek,
                HashingAlgorithm::Sha256,
                SignatureSchemeAlgorithm::RsaSsa,
                None,
                Unrestricted,
            )
            .unwrap();
            public_tpm2b(&created.out_public).unwrap()
        })
        .await
        .unwrap();
    let agent = fresh().await;
    assert_refused(
        agent
            .attest_tpm_with(
                TpmIdentity {
                    ak_public: unrestricted,
                    ..a.device.identity().clone()
                },
                None,
                |_| async {
                    Err(NodeClientError::Local(
                        "no challenge may be sent for an unrestricted AK".into(),
                    ))
                },
            )
            .await,
        Code::PermissionDenied,
        "not an attestation key: it is not restricted",
    );
    assert!(agent.svid().is_none());

    // A different TPM answering: TPM B claims TPM A's (public) EK certificate with its own
    // AK. The credential is sealed to A's EK, so B's ActivateCredential fails, and
    // whatever B sends instead is refused.
    let (a_dev, b_dev) = (&a.device, &b.device);
    let agent = fresh().await;
    assert_refused(
        agent
            .attest_tpm_with(
                TpmIdentity {
                    ak_public: b.device.identity().ak_public.clone(),
                    ..a.device.identity().clone()
                },
                None,
                move |c| async move {
                    let err = b_dev
                        .activate_credential(c.credential_blob, c.encrypted_secret)
                        .await
                        .expect_err("TPM B cannot activate a credential sealed to TPM A's EK");
                    assert!(err.to_string().contains("ActivateCredential"), "{err}");
                    Ok(vec![0x5a; 32])
                },
            )
            .await,
        Code::PermissionDenied,
        "does not match the challenge",
    );
    assert!(agent.svid().is_none());

    // The real TPM's right answer, after the deadline.
    let agent = fresh().await;
    assert_refused(
        agent
            .attest_tpm_with(a.device.identity().clone(), None, move |c| async move {
                let secret = a_dev
                    .activate_credential(c.credential_blob, c.encrypted_secret)
                    .await
                    .unwrap();
                tokio::time::sleep(CHALLENGE_TIMEOUT + Duration::from_millis(300)).await;
                Ok(secret)
            })
            .await,
        Code::DeadlineExceeded,
        "challenge deadline passed",
    );
    assert!(agent.svid().is_none());

    // A genuine TPM no Node is enrolled for.
    let agent = fresh().await;
    assert_refused(
        b.attest(&agent, None).await,
        Code::PermissionDenied,
        &format!("no Node is enrolled for the TPM with EK hash {}", b.ek_hash),
    );
    assert!(agent.svid().is_none());

    // The same TPM, answering in time, is accepted: the refusals above were about what
    // they tested, not the setup.
    let agent = fresh().await;
    a.attest(&agent, None).await.unwrap();

    let metrics = w.metrics_text();
    for reason in [
        "tpm_ek_untrusted",
        "tpm_ak_attributes",
        "tpm_wrong_answer",
        "tpm_challenge_expired",
        "tpm_not_enrolled",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason} not counted:\n{metrics}"
        );
    }
}
