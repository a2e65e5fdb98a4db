//! The agent's client of the operator's Node API.
//!
//! - The operator is authenticated by its X509-SVID (`spiffe://<td>/sigil/operator`)
//!   against the bundles the agent holds: at first the bootstrap bundle (the trust bundle
//!   ConfigMap mounted into the agent pod), then whatever the operator sends.
//! - [`NodeClient::attest_psat`] and [`NodeClient::attest_tpm`] connect *without* a client
//!   certificate, so an agent whose SVID has expired can always attest again.
//! - Every other call presents the agent SVID (mTLS). After attestation or renewal the
//!   mTLS channel is rebuilt, so the new certificate is the one presented.
//! - The agent's private key is generated here and never sent anywhere; only CSRs are.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::proto::node as pb;
use sigil_identity::proto::node::node_client::NodeClient as RawClient;
use sigil_identity::tls::{
    Authorizer, BundleSource, SharedBundles, SpiffeServerVerifier, SwappableCert,
};
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain, x509};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Path of the operator's SPIFFE ID in the agent trust domain.
pub const OPERATOR_PATH: &str = "/sigil/operator";
/// Deadline of one unary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// HTTP/2 PING interval to the operator, and how long a PING may go unanswered before the
/// connection is dropped.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Largest message accepted from the operator (a 10k-entry snapshot is a few MiB).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Why a Node API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeClientError {
    /// The operator answered with a gRPC error.
    #[error("operator refused {rpc}: {status}")]
    Status {
        /// The RPC.
        rpc: &'static str,
        /// What the operator said.
        status: tonic::Status,
    },
    /// No agent SVID yet: attest first.
    #[error("the agent has no SVID yet; attest first")]
    NotAttested,
    /// The operator's answer did not make sense.
    #[error("invalid answer to {rpc}: {reason}")]
    BadAnswer {
        /// The RPC.
        rpc: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Local key or TLS setup failed.
    #[error("{0}")]
    Local(String),
}

impl NodeClientError {
    /// The gRPC status, when the operator sent one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Status { status, .. } => Some(status),
            _ => None,
        }
    }
}

fn status(rpc: &'static str) -> impl FnOnce(tonic::Status) -> NodeClientError {
    move |status| NodeClientError::Status { rpc, status }
}

/// The agent's current SVID.
#[derive(Debug, Clone)]
pub struct AgentSvid {
    /// `spiffe://<td>/sigil/agent/...`.
    pub spiffe_id: SpiffeId,
    /// Leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// Expiry.
    pub not_after: SystemTime,
    /// Node selectors the attestation produced (`type:value`).
    pub selectors: Vec<String>,
}

/// Where and whom to call.
#[derive(Debug, Clone)]
pub struct NodeClientConfig {
    /// `host:port` of each Node API endpoint (operator replicas or a Service); the client
    /// moves to the next one after a failure.
    pub addresses: Vec<String>,
    /// The agent trust domain (the operator's ID lives in it).
    pub trust_domain: TrustDomain,
    /// The cluster name the operator is configured with.
    pub cluster: String,
}

/// A Node API client. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct NodeClient {
    config: NodeClientConfig,
    bundles: Arc<SharedBundles>,
    cert: Arc<SwappableCert>,
    svid: Mutex<Option<AgentSvid>>,
    mtls: Mutex<Option<Channel>>,
    current: std::sync::atomic::AtomicUsize,
}

impl NodeClient {
    /// A client trusting `bootstrap` (the agent trust domain's bundle) for the operator.
    pub fn new(config: NodeClientConfig, bootstrap: TrustBundle) -> Result<Self, NodeClientError> {
        if config.addresses.is_empty() {
            return Err(NodeClientError::Local(
                "no operator address configured".into(),
            ));
        }
        if bootstrap.trust_domain != config.trust_domain {
            return Err(NodeClientError::Local(format!(
                "bootstrap bundle is for {} but the agent trust domain is {}",
                bootstrap.trust_domain, config.trust_domain
            )));
        }
        let mut set = sigil_identity::BundleSet::new();
        set.upsert(bootstrap);
        Ok(Self {
            config,
            bundles: SharedBundles::new(set),
            cert: SwappableCert::new(),
            svid: Mutex::new(None),
            mtls: Mutex::new(None),
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// For unit tests of the APIs the agent serves: a client of trust domain `td` whose
    /// operator address (port 1 on loopback) answers nothing.
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub(crate) fn unreachable(td: &TrustDomain) -> Self {
        Self::new(
            NodeClientConfig {
                addresses: vec!["127.0.0.1:1".into()],
                trust_domain: td.clone(),
                cluster: "c".into(),
            },
            TrustBundle::new(td.clone()),
        )
        .unwrap()
    }

    /// The bundles the client trusts (updated from the operator's answers).
    pub fn bundles(&self) -> Arc<SharedBundles> {
        self.bundles.clone()
    }

    /// The operator endpoint in use.
    pub fn address(&self) -> String {
        let all = &self.config.addresses;
        if all.is_empty() {
            return String::new();
        }
        all[self.current.load(std::sync::atomic::Ordering::Relaxed) % all.len()].clone()
    }

    /// After a failure: use the next operator endpoint (when there are several).
    pub fn fail_over(&self) {
        if self.config.addresses.len() > 1 {
            self.current
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *self.mtls.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tracing::info!(address = %self.address(), "switching to the next operator endpoint");
        }
    }

    /// The current agent SVID, if attested.
    pub fn svid(&self) -> Option<AgentSvid> {
        self.svid.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn channel(&self, present_svid: bool) -> Result<Channel, NodeClientError> {
        if present_svid && let Some(c) = self.mtls.lock().unwrap_or_else(|p| p.into_inner()).clone()
        {
            return Ok(c);
        }
        // The operator's serving SVID: its path and the component policy, which no
        // workload SVID (even one whose ID were the operator's) carries.
        let verifier = SpiffeServerVerifier::new(
            self.bundles.clone() as Arc<dyn BundleSource>,
            Authorizer::Component {
                trust_domain: self.config.trust_domain.clone(),
                path: OPERATOR_PATH.into(),
            },
        );
        let cert = if present_svid {
            self.cert.clone()
        } else {
            SwappableCert::new()
        };
        let tls = sigil_identity::tls::client_config(cert, verifier)
            .map_err(|e| NodeClientError::Local(e.to_string()))?;
        let connector = TlsConnector::from(Arc::new(tls));
        let address = self.address();
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| NodeClientError::Local(format!("Node API address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT)
            // A connection the network stopped carrying (packets dropped, no reset) is
            // dropped within 10 s, and the next call opens a new one. Without this, the
            // calls queued on it waited for TCP's retransmission backoff after the
            // network was back: on the real node, an 18 s partition was followed by
            // 10.7 s more without signing, and SVIDs expired (docs/reliability.md).
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let channel =
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let (connector, address) = (connector.clone(), address.clone());
                async move {
                    let tcp = TcpStream::connect(&address).await?;
                    tcp.set_nodelay(true)?;
                    // The name is not checked (the operator is authenticated by SPIFFE ID).
                    let name = rustls::pki_types::ServerName::try_from("sigil-operator")
                        .map_err(std::io::Error::other)?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }));
        if present_svid {
            *self.mtls.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
        }
        Ok(channel)
    }

    fn raw(&self, present_svid: bool) -> Result<RawClient<Channel>, NodeClientError> {
        if present_svid && self.cert.current().is_none() {
            return Err(NodeClientError::NotAttested);
        }
        Ok(RawClient::new(self.channel(present_svid)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// Attests the node with a projected service-account token and installs the agent
    /// SVID it yields (a key made here, a CSR sent).
    pub async fn attest_psat(&self, token: &str) -> Result<AgentSvid, NodeClientError> {
        const RPC: &str = "AttestNode";
        let (key, csr) = self.attestation_key()?;
        let request = pb::AttestNodeRequest {
            attestation: Some(pb::attest_node_request::Attestation::Psat(
                pb::PsatAttestation {
                    cluster: self.config.cluster.clone(),
                    token: token.to_owned(),
                },
            )),
            csr,
        };
        let answer = self
            .raw(false)?
            .attest_node(request)
            .await
            .map_err(status(RPC))?
            .into_inner();
        self.accept_attestation(RPC, answer, &key)
    }

    /// Attests the node with its TPM ([`crate::tpm::TpmDevice`]): sends the EK
    /// certificate and the EK and AK public areas (and, when given, the agent pod's
    /// projected token), answers the operator's credential-activation challenge with the
    /// TPM, and installs the agent SVID it yields. The TPM helper exits after.
    pub async fn attest_tpm(
        &self,
        device: &crate::tpm::TpmDevice,
        psat_token: Option<&str>,
    ) -> Result<AgentSvid, NodeClientError> {
        let attested = async {
            let identity = device
                .identity()
                .await
                .map_err(|e| NodeClientError::Local(e.to_string()))?;
            self.attest_tpm_with(identity, psat_token, |challenge| async move {
                device
                    .activate_credential(challenge.credential_blob, challenge.encrypted_secret)
                    .await
                    .map_err(|e| NodeClientError::Local(e.to_string()))
            })
            .await
        }
        .await;
        // The helper runs only while the node attests; the next attestation starts another.
        device.release().await;
        attested
    }

    /// The AttestNodeTpm exchange with `answer` computing the activated secret from the
    /// challenge ([`Self::attest_tpm`] asks the TPM; tests may answer otherwise).
    pub async fn attest_tpm_with<F, Fut>(
        &self,
        identity: crate::tpm::TpmIdentity,
        psat_token: Option<&str>,
        answer: F,
    ) -> Result<AgentSvid, NodeClientError>
    where
        F: FnOnce(pb::TpmChallenge) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, NodeClientError>>,
    {
        const RPC: &str = "AttestNodeTpm";
        let (key, csr) = self.attestation_key()?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let first = pb::TpmAttestRequest {
            step: Some(pb::tpm_attest_request::Step::Identity(pb::TpmIdentity {
                ek_certificate: identity.ek_certificate,
                ek_public: identity.ek_public,
                ak_public: identity.ak_public,
                psat_token: psat_token.unwrap_or_default().to_owned(),
            })),
            csr,
        };
        // Capacity 2: these sends never wait.
        tx.send(first)
            .await
            .map_err(|_| NodeClientError::Local("request stream closed".into()))?;
        let mut inbound = self
            .raw(false)?
            .attest_node_tpm(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(status(RPC))?
            .into_inner();
        let challenge = match inbound.message().await.map_err(status(RPC))? {
            Some(pb::TpmAttestResponse {
                step: Some(pb::tpm_attest_response::Step::Challenge(c)),
            }) => c,
            other => return Err(bad(RPC, format!("expected a challenge, got {other:?}"))),
        };
        let secret = answer(challenge).await?;
        // If the operator already ended the exchange (deadline passed), the send fails and
        // the next read carries its status.
        let _ = tx
            .send(pb::TpmAttestRequest {
                step: Some(pb::tpm_attest_request::Step::ActivatedSecret(secret)),
                csr: vec![],
            })
            .await;
        let answer = match inbound.message().await.map_err(status(RPC))? {
            Some(pb::TpmAttestResponse {
                step: Some(pb::tpm_attest_response::Step::Result(r)),
            }) => r,
            other => return Err(bad(RPC, format!("expected the result, got {other:?}"))),
        };
        drop(tx);
        self.accept_attestation(RPC, answer, &key)
    }

    /// A new agent key and its CSR for attestation (the operator ignores the CSR's URI SAN,
    /// so it names a placeholder in our trust domain).
    fn attestation_key(&self) -> Result<(PrivateKey, Vec<u8>), NodeClientError> {
        let key = new_key()?;
        let placeholder = self
            .config
            .trust_domain
            .id("/sigil/agent/attesting")
            .map_err(|e| NodeClientError::Local(e.to_string()))?;
        let csr = x509::build_csr(&key, &placeholder)
            .map_err(|e| NodeClientError::Local(e.to_string()))?;
        Ok((key, csr))
    }

    /// Installs what a successful attestation (PSAT or TPM) returned: the bundle, then the
    /// agent SVID for `key`.
    fn accept_attestation(
        &self,
        rpc: &'static str,
        answer: pb::AttestNodeResponse,
        key: &PrivateKey,
    ) -> Result<AgentSvid, NodeClientError> {
        if let Some(b) = &answer.bundle {
            self.apply_bundle(rpc, b)?;
        }
        let svid = AgentSvid {
            spiffe_id: SpiffeId::parse(&answer.spiffe_id).map_err(|e| bad(rpc, e))?,
            chain: answer.svid_chain,
            not_after: from_unix(answer.expires_at),
            selectors: answer
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
        };
        self.install(rpc, svid.clone(), key)?;
        Ok(svid)
    }

    /// Renews a PSAT agent's SVID over mTLS with the current one, proving again with a
    /// fresh projected token of the agent pod (`psat_token`), as the operator requires. (A
    /// TPM agent renews by attesting again: [`Self::attest_tpm`].)
    pub async fn renew(&self, psat_token: &str) -> Result<AgentSvid, NodeClientError> {
        const RPC: &str = "RenewAgent";
        let current = self.svid().ok_or(NodeClientError::NotAttested)?;
        let key = new_key()?;
        let csr = x509::build_csr(&key, &current.spiffe_id)
            .map_err(|e| NodeClientError::Local(e.to_string()))?;
        let answer = self
            .raw(true)?
            .renew_agent(pb::RenewAgentRequest {
                csr,
                psat_token: psat_token.to_owned(),
            })
            .await
            .map_err(status(RPC))?
            .into_inner();
        let svid = AgentSvid {
            chain: answer.svid_chain,
            not_after: from_unix(answer.expires_at),
            ..current
        };
        self.install(RPC, svid.clone(), &key)?;
        Ok(svid)
    }

    /// Opens the entry stream for this node, from `known_revision` (0: full snapshot).
    pub async fn sync_entries(
        &self,
        known_revision: u64,
    ) -> Result<tonic::Streaming<pb::SyncEntriesResponse>, NodeClientError> {
        const RPC: &str = "SyncEntries";
        let mut client = self.raw(true)?;
        let request = tonic::Request::new(pb::SyncEntriesRequest { known_revision });
        Ok(client
            .sync_entries(request)
            .await
            .map_err(status(RPC))?
            .into_inner())
    }

    /// Signs a batch of workload CSRs; one result per request, in order.
    pub async fn sign(
        &self,
        requests: Vec<pb::SvidRequest>,
    ) -> Result<Vec<pb::SvidResult>, NodeClientError> {
        const RPC: &str = "SignX509Svids";
        let answer = self
            .raw(true)?
            .sign_x509_svids(pb::SignX509SvidsRequest { requests })
            .await
            .map_err(status(RPC))?;
        Ok(answer.into_inner().results)
    }

    /// Mints a JWT-SVID for one of this node's entries.
    pub async fn mint_jwt(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, SystemTime), NodeClientError> {
        const RPC: &str = "MintJwtSvid";
        let answer = self
            .raw(true)?
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                entry_id: entry_id.to_owned(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(status(RPC))?
            .into_inner();
        Ok((answer.token, from_unix(answer.expires_at)))
    }

    /// Trusts a bundle the operator sent (own or federated trust domain).
    pub fn apply_bundle(&self, rpc: &'static str, b: &pb::Bundle) -> Result<(), NodeClientError> {
        let td: TrustDomain = b.trust_domain.parse().map_err(|e| bad(rpc, e))?;
        let bundle = TrustBundle::from_jwks_json(td, &b.jwks).map_err(|e| bad(rpc, e))?;
        self.bundles.upsert(bundle);
        Ok(())
    }

    fn install(
        &self,
        rpc: &'static str,
        svid: AgentSvid,
        key: &PrivateKey,
    ) -> Result<(), NodeClientError> {
        // Only accept an SVID that verifies against what we trust.
        let bundle = self
            .bundles
            .bundle_for(svid.spiffe_id.trust_domain())
            .ok_or_else(|| bad(rpc, "no bundle for the agent trust domain"))?;
        x509::validate_x509_svid(&svid.chain, &bundle, SystemTime::now())
            .map_err(|e| bad(rpc, e))?;
        self.cert
            .set(&svid.chain, key)
            .map_err(|e| NodeClientError::Local(e.to_string()))?;
        *self.svid.lock().unwrap_or_else(|p| p.into_inner()) = Some(svid);
        // New certificate: the next mTLS call opens a new connection presenting it.
        *self.mtls.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}

fn new_key() -> Result<PrivateKey, NodeClientError> {
    PrivateKey::generate(KeyType::EcP256).map_err(|e| NodeClientError::Local(e.to_string()))
}

fn bad(rpc: &'static str, e: impl std::fmt::Display) -> NodeClientError {
    NodeClientError::BadAnswer {
        rpc,
        reason: e.to_string(),
    }
}

/// Unix seconds to `SystemTime` (negative values clamp to the epoch).
pub fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}
