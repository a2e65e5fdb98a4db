//! AttestNodeTpm's exchange on the Node API (docs/tpm.md): the identity message, the
//! credential-activation challenge, the answer, then the agent's SVID. The TPM checks
//! themselves are [`super::tpm`]'s and know nothing of Kubernetes; this is where they meet
//! the Node the TPM is enrolled for, the agent pod's token and the budgets.

use sigil_identity::entry::Selector;
use sigil_identity::proto::node as pb;
use sigil_identity::x509;
use tonic::Status;

use super::convert::{sel_to_pb, unix};
use super::psat;
use super::revocation;
use super::service::{MAX_TOKEN_LEN, NodeApi, TPM_FIRST_MESSAGE_TIMEOUT};
use super::tpm::{self, TpmConfig, TpmError};

impl NodeApi {
    /// The one Node enrolled for the TPM whose EK hashes to `ek_hash` (annotation
    /// [`tpm::EK_ANNOTATION`]), if its agent is not banned.
    pub(super) fn tpm_node(&self, rpc: &str, ek_hash: &str) -> Result<String, Status> {
        let node = revocation::tpm_node(&self.inner.nodes, ek_hash)
            .and_then(|n| revocation::check_ban(&n).map(|()| n))
            .map_err(|r| self.revoked(rpc, &r))?;
        Ok(node.metadata.name.clone().unwrap_or_default())
    }

    /// One AttestNodeTpm exchange (docs/tpm.md). Every failure is counted and logged here.
    pub(super) async fn attest_tpm(
        &self,
        cfg: &TpmConfig,
        inbound: &mut tonic::Streaming<pb::TpmAttestRequest>,
        tx: &tokio::sync::mpsc::Sender<Result<pb::TpmAttestResponse, Status>>,
    ) -> Result<(), Status> {
        const RPC: &str = "AttestNodeTpm";
        let tpm_deny = |e: TpmError| self.deny(RPC, e.metric_label(), e.to_status());
        let protocol = |m: &str| tpm_deny(TpmError::Protocol(m.into()));
        let first = match tokio::time::timeout(TPM_FIRST_MESSAGE_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(self.deny(
                    RPC,
                    "tpm_protocol",
                    Status::deadline_exceeded(format!(
                        "no identity message within {TPM_FIRST_MESSAGE_TIMEOUT:?}"
                    )),
                ));
            }
            Ok(Err(s)) => return Err(s),
            Ok(Ok(None)) => return Err(protocol("stream closed before the identity message")),
            Ok(Ok(Some(m))) => m,
        };
        let Some(pb::tpm_attest_request::Step::Identity(identity)) = first.step else {
            return Err(protocol("the first message must carry identity"));
        };
        if identity.psat_token.len() > MAX_TOKEN_LEN {
            return Err(self.deny(
                RPC,
                "bad_token",
                Status::invalid_argument(format!(
                    "identity.psat_token is longer than {MAX_TOKEN_LEN} bytes"
                )),
            ));
        }
        // Refuse a bad CSR before making the TPM work.
        let csr = first.csr;
        x509::parse_csr_public_key(&csr).map_err(|e| {
            self.deny(
                RPC,
                "bad_csr",
                Status::invalid_argument(format!("agent CSR (csr of the identity message): {e}")),
            )
        })?;
        let verified = tpm::verify_identity(
            cfg,
            &identity.ek_certificate,
            &identity.ek_public,
            &identity.ak_public,
            self.now(),
        )
        .map_err(tpm_deny)?;
        let node_name = self.tpm_node(RPC, &verified.ek_hash)?;
        let mut selectors = verified.selectors.clone();
        selectors.push(Selector::new(
            tpm::SELECTOR_TYPE,
            format!("node_name:{node_name}"),
        ));
        if !identity.psat_token.is_empty() {
            // The agent also proves which pod it runs in: that pod must be on the Node
            // the TPM is enrolled for.
            let cluster = self.inner.cfg.psat.cluster.clone();
            let attested = psat::attest(
                &self.inner.client,
                &self.inner.cfg.psat,
                &cluster,
                &identity.psat_token,
            )
            .await
            .map_err(|e| self.deny(RPC, e.metric_label(), e.to_status()))?;
            if attested.node_name != node_name {
                return Err(self.deny(
                    RPC,
                    "tpm_psat_node_mismatch",
                    Status::permission_denied(format!(
                        "the TPM is enrolled for Node {node_name} but the agent pod runs on Node {}",
                        attested.node_name
                    )),
                ));
            }
            selectors.extend(attested.selectors);
        }
        self.charge(RPC, "agent", &self.inner.limiters.agent, &node_name)?;

        let challenge =
            tpm::Challenge::new(&verified, self.now(), cfg.challenge_timeout).map_err(tpm_deny)?;
        let sent = tx
            .send(Ok(pb::TpmAttestResponse {
                step: Some(pb::tpm_attest_response::Step::Challenge(pb::TpmChallenge {
                    credential_blob: challenge.credential.credential_blob.clone(),
                    encrypted_secret: challenge.credential.encrypted_secret.clone(),
                    deadline: unix(challenge.deadline),
                })),
            }))
            .await;
        if sent.is_err() {
            return Ok(());
        }
        let answer = match tokio::time::timeout(cfg.challenge_timeout, inbound.message()).await {
            Err(_) => return Err(tpm_deny(TpmError::DeadlineExceeded(cfg.challenge_timeout))),
            Ok(Err(s)) => return Err(s),
            Ok(Ok(None)) => return Err(protocol("stream closed before the activated secret")),
            Ok(Ok(Some(m))) => m,
        };
        let Some(pb::tpm_attest_request::Step::ActivatedSecret(secret)) = answer.step else {
            return Err(protocol("the second message must carry activated_secret"));
        };
        challenge.check(&secret, self.now()).map_err(tpm_deny)?;

        let (chain, not_after, id) = self.sign_agent(RPC, &verified.agent_path, &csr)?;
        let bundle = self.own_bundle();
        tracing::info!(agent = %id, node = %node_name, "agent attested (tpm)");
        let _ = tx
            .send(Ok(pb::TpmAttestResponse {
                step: Some(pb::tpm_attest_response::Step::Result(
                    pb::AttestNodeResponse {
                        svid_chain: chain,
                        spiffe_id: id.to_string(),
                        selectors: selectors.iter().map(sel_to_pb).collect(),
                        bundle,
                        expires_at: unix(not_after),
                    },
                )),
            }))
            .await;
        Ok(())
    }
}
