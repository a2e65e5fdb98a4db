//! Where the Node API authorizes a call: the caller's verified client certificate must be
//! a live Sigil component SVID of an agent of this cluster, bound to a Node that exists,
//! is enrolled and is not banned. Checked on every call, so a revocation takes effect at
//! the next one (module [`super::revocation`]).

use std::time::SystemTime;

use sigil_identity::{SpiffeId, x509};
use tonic::{Request, Status};

use super::revocation::{self, Binding};
use super::service::NodeApi;
use super::tpm;

/// An authenticated agent: its SPIFFE ID, what that ID is bound to, and the Node it runs
/// on.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub(super) node_name: String,
    pub(super) cert_not_after: SystemTime,
    pub(super) spiffe_id: SpiffeId,
    pub(super) binding: Binding,
}

impl NodeApi {
    /// Authenticates the caller from its verified client certificate and maps it to a Node.
    pub(super) fn caller<T>(&self, rpc: &str, req: &Request<T>) -> Result<Caller, Status> {
        self.inner.metrics.request(rpc);
        let certs = req.peer_certs().ok_or_else(|| {
            self.deny(rpc, "no_client_certificate", Status::unauthenticated("this RPC requires the agent's X509-SVID as TLS client certificate; call AttestNode first"))
        })?;
        let leaf = certs.first().ok_or_else(|| {
            self.deny(
                rpc,
                "no_client_certificate",
                Status::unauthenticated("empty client certificate chain"),
            )
        })?;
        let info = x509::inspect_leaf(leaf.as_ref()).map_err(|e| {
            self.deny(
                rpc,
                "bad_client_certificate",
                Status::unauthenticated(format!("client certificate is not an X509-SVID: {e}")),
            )
        })?;
        if info.not_after <= self.now() {
            return Err(self.deny(
                rpc,
                "agent_svid_expired",
                Status::unauthenticated(format!(
                    "agent SVID {} has expired; attest again with AttestNode",
                    info.spiffe_id
                )),
            ));
        }
        if !info.component {
            // The TLS layer already refuses these; checked again on every call so that no
            // path to a handler skips it.
            return Err(self.deny(
                rpc,
                "not_a_component_svid",
                Status::permission_denied(format!(
                    "{} is a workload SVID (it lacks the Sigil component policy); only an agent SVID issued by AttestNode may call the Node API",
                    info.spiffe_id
                )),
            ));
        }
        let prefix = format!("/sigil/agent/k8s_psat/{}/", self.inner.cfg.psat.cluster);
        let ours = info.spiffe_id.trust_domain() == &self.inner.cfg.agent_trust_domain;
        let path = info.spiffe_id.path();
        let binding = if let Some(node_uid) = path.strip_prefix(&prefix).filter(|_| ours) {
            Binding::Psat {
                node_uid: node_uid.to_owned(),
            }
        } else if let Some(ek_hash) = path
            .strip_prefix(tpm::AGENT_PATH_PREFIX)
            .filter(|_| ours && self.inner.cfg.tpm.is_some())
        {
            Binding::Tpm {
                ek_hash: ek_hash.to_owned(),
            }
        } else {
            return Err(self.deny(
                rpc,
                "not_an_agent",
                Status::permission_denied(format!(
                    "{} is not an agent identity of this cluster",
                    info.spiffe_id
                )),
            ));
        };
        // Looked up on every call: deleting the Node, removing the TPM enrolment or banning
        // the Node revokes the agent at once (module revocation).
        let node_name = revocation::authorize(&self.inner.nodes, &binding, self.require_tpm())
            .map(|n| n.metadata.name.clone().unwrap_or_default())
            .map_err(|r| self.revoked(rpc, &r))?;
        Ok(Caller {
            node_name,
            cert_not_after: info.not_after,
            spiffe_id: info.spiffe_id,
            binding,
        })
    }
}
