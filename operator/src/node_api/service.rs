//! The Node API gRPC service.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::Store;
use sigil_identity::ca::SvidTemplate;
use sigil_identity::clock::SharedClock;
use sigil_identity::proto::node as pb;
use sigil_identity::{SpiffeId, TrustDomain, x509};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert::{delta_to_pb, sel_to_pb, unix};
use super::limits::{NodeApiLimits, RateLimiter};
use super::metrics::NodeApiMetrics;
use super::psat::{self, PsatConfig};
use super::revocation::{self, Binding, Revoked};
use super::tpm::TpmConfig;
use crate::authority::Authorities;
use crate::federation::FederatedBundles;
use crate::index::{EntryIndex, NodeView};
use sigil_identity::entry::RegistrationEntry;

/// Most CSRs in one SignX509Svids call.
pub const MAX_CSRS_PER_CALL: usize = 1000;
/// Most audiences in one MintJwtSvid call.
pub const MAX_AUDIENCES: usize = 32;
pub use super::limits::MAX_TOKEN_LEN;
/// How long AttestNodeTpm waits for the agent's first message.
pub const TPM_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the Node API is configured.
#[derive(Debug, Clone)]
pub struct NodeApiConfig {
    /// The trust domain agents get their SVIDs in (the name of a TrustDomain's
    /// `spec.trustDomain`).
    pub agent_trust_domain: TrustDomain,
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Duration,
    /// PSAT attestation settings.
    pub psat: PsatConfig,
    /// Rate limits, connection caps and message bounds.
    pub limits: NodeApiLimits,
    /// TPM attestation settings; None answers AttestNodeTpm with Unimplemented.
    pub tpm: Option<TpmConfig>,
}

/// The Node API implementation, shared by all connections of one replica.
#[derive(Debug, Clone)]
pub struct NodeApi {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) cfg: NodeApiConfig,
    pub(super) client: kube::Client,
    pub(super) authorities: Arc<Authorities>,
    pub(super) entries: EntryIndex,
    pub(super) nodes: Store<Node>,
    pub(super) clock: SharedClock,
    pub(super) limiters: Limiters,
    pub(super) metrics: NodeApiMetrics,
    pub(super) federated: Arc<FederatedBundles>,
    pub(super) shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeApi")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The per-RPC budgets ([`super::limits`]).
#[derive(Debug)]
pub(super) struct Limiters {
    pub(super) agent: RateLimiter,
    pub(super) sign: RateLimiter,
    pub(super) mint: RateLimiter,
    pub(super) attest_per_address: RateLimiter,
    pub(super) attest_total: RateLimiter,
}

/// The key of the budget all callers share.
const EVERYONE: &str = "";

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl NodeApi {
    /// Builds the service. `nodes` is a reflector store of Nodes (to map the node UID in an
    /// agent's SPIFFE ID to its name); `shutdown` ends streams on drain.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: NodeApiConfig,
        client: kube::Client,
        authorities: Arc<Authorities>,
        entries: EntryIndex,
        nodes: Store<Node>,
        clock: SharedClock,
        metrics: NodeApiMetrics,
        federated: Arc<FederatedBundles>,
        shutdown: CancellationToken,
    ) -> Self {
        let l = &cfg.limits;
        let limiters = Limiters {
            agent: RateLimiter::new(l.agent),
            sign: RateLimiter::new(l.sign),
            mint: RateLimiter::new(l.mint),
            attest_per_address: RateLimiter::new(l.attest_per_address),
            attest_total: RateLimiter::new(l.attest_total),
        };
        Self {
            inner: Arc::new(Inner {
                cfg,
                client,
                authorities,
                entries,
                nodes,
                clock,
                limiters,
                metrics,
                federated,
                shutdown,
            }),
        }
    }

    /// The metric handles (the listener counts its refusals there too).
    pub fn metrics(&self) -> &NodeApiMetrics {
        &self.inner.metrics
    }

    /// The limits this service was built with.
    pub fn limits(&self) -> &NodeApiLimits {
        &self.inner.cfg.limits
    }

    /// The tonic service with message-size bounds (for authenticated agents; callers
    /// without a client certificate are held to far less, and every caller's bytes in
    /// transit are bounded, by [`super::request_bounds::RequestBoundsLayer`] before this
    /// decodes anything).
    pub fn into_server(self) -> pb::node_server::NodeServer<Self> {
        pb::node_server::NodeServer::new(self)
            .max_decoding_message_size(4 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub(super) fn deny(&self, rpc: &str, reason: &str, status: Status) -> Status {
        self.inner.metrics.deny(rpc, reason);
        tracing::warn!(
            rpc,
            reason,
            message = status.message(),
            "node API request denied"
        );
        status
    }

    pub(super) fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// Whether PSAT alone is refused (`--require-tpm`).
    pub(super) fn require_tpm(&self) -> bool {
        self.inner.cfg.tpm.as_ref().is_some_and(|t| t.required)
    }

    /// Entry `entry_id` of the caller's node (`view`), or PermissionDenied: a caller signs
    /// and mints only for entries authorised for its own node.
    fn authorized_entry(
        &self,
        rpc: &str,
        view: &NodeView,
        entry_id: &str,
    ) -> Result<Arc<RegistrationEntry>, Status> {
        view.entry(entry_id).ok_or_else(|| {
            self.deny(
                rpc,
                "entry_not_authorized",
                Status::permission_denied(format!(
                    "entry {entry_id:?} is not authorised for node {}",
                    view.name()
                )),
            )
        })
    }

    /// Counts, logs and returns a revocation's status.
    pub(super) fn revoked(&self, rpc: &str, r: &Revoked) -> Status {
        self.deny(rpc, r.metric_label(), r.to_status())
    }

    /// Charges one token of `node`'s `budget` (a validated request about to do its work).
    pub(super) fn charge(
        &self,
        rpc: &str,
        budget: &str,
        limiter: &RateLimiter,
        node: &str,
    ) -> Result<(), Status> {
        if limiter.try_take(node, 1.0) {
            return Ok(());
        }
        let b = limiter.budget();
        Err(self.deny(
            rpc,
            &format!("{budget}_rate_limited"),
            Status::resource_exhausted(format!(
                "node {node} is over its Node API {budget} budget ({} per second, bursts of {}); retry with backoff",
                b.rate, b.burst
            )),
        ))
    }

    /// Admits one attestation by a caller without a client certificate, before its token
    /// goes to TokenReview: its source address's budget, then everyone's.
    fn admit_attestation(&self, rpc: &str, peer: Option<SocketAddr>) -> Result<(), Status> {
        let l = &self.inner.limiters;
        let address = peer.map(|a| a.ip().to_string()).unwrap_or_default();
        if !l.attest_per_address.try_take(&address, 1.0) {
            let b = l.attest_per_address.budget();
            return Err(self.deny(
                rpc,
                "attest_rate_limited",
                Status::resource_exhausted(format!(
                    "too many attestations from {address} ({} per second, bursts of {}); retry with backoff",
                    b.rate, b.burst
                )),
            ));
        }
        if !l.attest_total.try_take(EVERYONE, 1.0) {
            return Err(self.deny(
                rpc,
                "attest_rate_limited_total",
                Status::resource_exhausted(
                    "this operator replica is attesting as many nodes as it may (its TokenReview budget); retry with backoff",
                ),
            ));
        }
        Ok(())
    }

    /// The agent trust domain's bundle, as the agent gets it with its SVID.
    pub(super) fn own_bundle(&self) -> Option<pb::Bundle> {
        self.inner
            .authorities
            .get(&self.inner.cfg.agent_trust_domain)
            .map(|a| pb::Bundle {
                trust_domain: a.trust_domain.name().to_owned(),
                jwks: a.bundle.to_jwks_json().into_bytes(),
                sequence: a.bundle.sequence.unwrap_or(0),
            })
    }

    /// Signs an agent SVID for `path` in the agent trust domain from `csr_der`.
    pub(super) fn sign_agent(
        &self,
        rpc: &str,
        path: &str,
        csr_der: &[u8],
    ) -> Result<(Vec<Vec<u8>>, SystemTime, SpiffeId), Status> {
        let public_key = x509::parse_csr_public_key(csr_der).map_err(|e| {
            self.deny(
                rpc,
                "bad_csr",
                Status::invalid_argument(format!("agent CSR: {e}")),
            )
        })?;
        let id = self
            .inner
            .cfg
            .agent_trust_domain
            .id(path)
            .map_err(|e| Status::internal(format!("agent ID: {e}")))?;
        let authority = self
            .inner
            .authorities
            .get(&self.inner.cfg.agent_trust_domain)
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "trust domain {} has no CA loaded yet (is its TrustDomain Ready?)",
                    self.inner.cfg.agent_trust_domain
                ))
            })?;
        let issued = authority
            .x509_ca
            .sign_component(
                &public_key,
                &SvidTemplate {
                    spiffe_id: &id,
                    ttl: self.inner.cfg.agent_svid_ttl,
                    dns_names: &[],
                },
                self.now(),
            )
            .map_err(|e| Status::internal(format!("signing agent SVID: {e}")))?;
        Ok((issued.chain(), issued.not_after, id))
    }

    /// Every bundle an agent holds: the local trust domains', then the federated ones
    /// (a federated bundle never stands in for a local trust domain).
    fn bundles(&self) -> Vec<pb::Bundle> {
        let local = self.inner.authorities.all();
        let federated = self
            .inner
            .federated
            .all()
            .into_iter()
            .filter(|b| !local.iter().any(|a| a.trust_domain == b.trust_domain));
        local
            .iter()
            .map(|a| a.bundle.clone())
            .chain(federated)
            .map(|b| pb::Bundle {
                trust_domain: b.trust_domain.name().to_owned(),
                jwks: b.to_jwks_json().into_bytes(),
                sequence: b.sequence.unwrap_or(0),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn attest_node(
        &self,
        req: Request<pb::AttestNodeRequest>,
    ) -> Result<Response<pb::AttestNodeResponse>, Status> {
        const RPC: &str = "AttestNode";
        self.inner.metrics.request(RPC);
        let peer = req.remote_addr();
        let req = req.into_inner();
        let Some(pb::attest_node_request::Attestation::Psat(p)) = req.attestation else {
            return Err(self.deny(
                RPC,
                "no_attestation",
                Status::invalid_argument("attestation is required (psat)"),
            ));
        };
        if p.token.is_empty() || p.token.len() > MAX_TOKEN_LEN {
            return Err(self.deny(
                RPC,
                "bad_token",
                Status::invalid_argument(format!("psat.token must be 1..={MAX_TOKEN_LEN} bytes")),
            ));
        }
        if self.require_tpm() {
            // Refused before the token is reviewed: no TokenReview for a call that can't
            // succeed.
            return Err(self.revoked(RPC, &Revoked::TokenAttestationRefused));
        }
        self.admit_attestation(RPC, peer)?;
        x509::parse_csr_public_key(&req.csr).map_err(|e| {
            self.deny(
                RPC,
                "bad_csr",
                Status::invalid_argument(format!("agent CSR: {e}")),
            )
        })?;
        let attested = psat::attest(
            &self.inner.client,
            &self.inner.cfg.psat,
            &p.cluster,
            &p.token,
        )
        .await
        .map_err(|e| self.deny(RPC, e.metric_label(), e.to_status()))?;
        revocation::check_ban_by_name(&self.inner.nodes, &attested.node_name)
            .map_err(|r| self.revoked(RPC, &r))?;
        self.charge(
            RPC,
            "agent",
            &self.inner.limiters.agent,
            &attested.node_name,
        )?;
        let (chain, not_after, id) = self.sign_agent(RPC, &attested.agent_path, &req.csr)?;
        let bundle = self.own_bundle();
        tracing::info!(agent = %id, node = %attested.node_name, "agent attested (psat)");
        Ok(Response::new(pb::AttestNodeResponse {
            svid_chain: chain,
            spiffe_id: id.to_string(),
            selectors: attested.selectors.iter().map(sel_to_pb).collect(),
            bundle,
            expires_at: unix(not_after),
        }))
    }

    async fn attest_node_tpm(
        &self,
        req: Request<tonic::Streaming<pb::TpmAttestRequest>>,
    ) -> Result<Response<ResponseStream<pb::TpmAttestResponse>>, Status> {
        const RPC: &str = "AttestNodeTpm";
        self.inner.metrics.request(RPC);
        let Some(cfg) = self.inner.cfg.tpm.clone() else {
            return Err(self.deny(
                RPC,
                "not_configured",
                Status::unimplemented(
                    "TPM node attestation is not enabled on this operator (set --tpm-ek-ca-bundle)",
                ),
            ));
        };
        self.admit_attestation(RPC, req.remote_addr())?;
        let mut inbound = req.into_inner();
        let this = self.clone();
        let stream = spawn_stream(move |tx| async move {
            let shutdown = this.inner.shutdown.clone();
            let result = tokio::select! {
                r = this.attest_tpm(&cfg, &mut inbound, &tx) => r,
                () = shutdown.cancelled() => Err(Status::unavailable("operator is shutting down; attest again with another replica")),
            };
            if let Err(status) = result {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(stream))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        const RPC: &str = "RenewAgent";
        let caller = self.caller(RPC, &req)?;
        let id = caller.spiffe_id.clone();
        x509::parse_csr_public_key(&req.get_ref().csr).map_err(|e| {
            self.deny(
                RPC,
                "bad_csr",
                Status::invalid_argument(format!("agent CSR: {e}")),
            )
        })?;
        // Renewal proves again what attestation proved, or a stolen agent key would renew
        // forever while its Node exists.
        match &caller.binding {
            Binding::Tpm { .. } => {
                return Err(self.deny(
                    RPC,
                    "tpm_renewal_requires_attestation",
                    Status::permission_denied(format!(
                        "{id} is a TPM agent: renew by attesting again with AttestNodeTpm, so a fresh credential activation proves the TPM is still there"
                    )),
                ));
            }
            Binding::Psat { node_uid } => {
                let token = &req.get_ref().psat_token;
                if token.is_empty() {
                    return Err(self.deny(
                        RPC,
                        "renewal_without_token",
                        Status::permission_denied(format!(
                            "renewing {id} needs psat_token, a fresh projected token of the agent pod (or attest again with AttestNode)"
                        )),
                    ));
                }
                if token.len() > MAX_TOKEN_LEN {
                    return Err(self.deny(
                        RPC,
                        "bad_token",
                        Status::invalid_argument(format!(
                            "psat_token is longer than {MAX_TOKEN_LEN} bytes"
                        )),
                    ));
                }
                // Charged once the request is valid, before the TokenReview it costs.
                self.charge(RPC, "agent", &self.inner.limiters.agent, &caller.node_name)?;
                let cluster = self.inner.cfg.psat.cluster.clone();
                let attested =
                    psat::attest(&self.inner.client, &self.inner.cfg.psat, &cluster, token)
                        .await
                        .map_err(|e| self.deny(RPC, e.metric_label(), e.to_status()))?;
                if &attested.node_uid != node_uid {
                    return Err(self.deny(
                        RPC,
                        "renewal_node_mismatch",
                        Status::permission_denied(format!(
                            "psat_token is for an agent pod on Node {} (UID {}), but {id} belongs to the Node with UID {node_uid}",
                            attested.node_name, attested.node_uid
                        )),
                    ));
                }
            }
        }
        let (chain, not_after, _) = self.sign_agent(RPC, id.path(), &req.get_ref().csr)?;
        tracing::debug!(agent = %id, node = %caller.node_name, "agent SVID renewed");
        Ok(Response::new(pb::RenewAgentResponse {
            svid_chain: chain,
            expires_at: unix(not_after),
        }))
    }

    async fn sync_entries(
        &self,
        req: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<ResponseStream<pb::SyncEntriesResponse>>, Status> {
        const RPC: &str = "SyncEntries";
        let caller = self.caller(RPC, &req)?;
        self.charge(RPC, "agent", &self.inner.limiters.agent, &caller.node_name)?;
        let known = req.get_ref().known_revision;
        let this = self.clone();
        let mut view = this.inner.entries.node(&caller.node_name);
        let mut authorities_rx = this.inner.authorities.subscribe();
        let mut federated_rx = this.inner.federated.subscribe();
        let shutdown = this.inner.shutdown.clone();
        let cert_deadline = caller.cert_not_after;
        let require_tpm = self.require_tpm();
        let stream = spawn_stream(move |tx| async move {
            let metrics = this.inner.metrics.clone();
            metrics.open_streams.inc();
            let _guard = OnDrop(Some(move || {
                metrics.open_streams.dec();
            }));
            // A replica that has not listed everything yet would tell the agent to drop
            // entries it merely has not read: wait for the index first.
            tokio::select! {
                () = this.inner.entries.synced() => {}
                () = shutdown.cancelled() => return,
            }
            authorities_rx.borrow_and_update();
            federated_rx.borrow_and_update();
            let first = view.changes_since(known);
            let mut revision = first.revision;
            if tx
                .send(Ok(delta_to_pb(first, Some(this.bundles()))))
                .await
                .is_err()
            {
                return;
            }
            let until_expiry = cert_deadline.duration_since(this.now()).unwrap_or_default();
            let expiry = tokio::time::sleep(until_expiry.max(Duration::from_secs(1)));
            tokio::pin!(expiry);
            // The Node can be deleted, un-enrolled or banned while the stream is open.
            let mut recheck = tokio::time::interval_at(
                tokio::time::Instant::now() + revocation::REAUTHORIZE_INTERVAL,
                revocation::REAUTHORIZE_INTERVAL,
            );
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut send_bundles = false;
                tokio::select! {
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("operator is shutting down; reconnect to another replica"))).await;
                        return;
                    }
                    () = &mut expiry => {
                        let _ = tx.send(Err(Status::unauthenticated("agent SVID expired; renew and reconnect"))).await;
                        return;
                    }
                    _ = recheck.tick() => {
                        let verdict = revocation::reauthorize(
                            &this.inner.nodes,
                            &caller.node_name,
                            &caller.binding,
                            require_tpm,
                        );
                        if let Err(r) = verdict {
                            tracing::warn!(agent = %caller.spiffe_id, node = %caller.node_name, "ending the entry stream of a revoked agent");
                            let _ = tx.send(Err(this.revoked(RPC, &r))).await;
                            return;
                        }
                        continue;
                    }
                    () = view.changed() => {}
                    r = authorities_rx.changed() => { if r.is_err() { return } send_bundles = true; }
                    r = federated_rx.changed() => { if r.is_err() { return } send_bundles = true; }
                }
                // Coalesce whatever else changed meanwhile.
                for rx in [&mut authorities_rx, &mut federated_rx] {
                    if rx.has_changed().unwrap_or(false) {
                        rx.borrow_and_update();
                        send_bundles = true;
                    }
                }
                let delta = view.changes_since(revision);
                if delta.is_empty() && !send_bundles {
                    continue;
                }
                revision = delta.revision;
                let bundles = (send_bundles || delta.full).then(|| this.bundles());
                if tx.send(Ok(delta_to_pb(delta, bundles))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        const RPC: &str = "SignX509Svids";
        let caller = self.caller(RPC, &req)?;
        let requests = req.into_inner().requests;
        if requests.len() > MAX_CSRS_PER_CALL {
            return Err(self.deny(
                RPC,
                "too_many_csrs",
                Status::invalid_argument(format!(
                    "{} CSRs in one call; at most {MAX_CSRS_PER_CALL}",
                    requests.len()
                )),
            ));
        }
        let mut seen = HashSet::with_capacity(requests.len());
        if let Some(dup) = requests.iter().find(|r| !seen.insert(r.entry_id.as_str())) {
            return Err(self.deny(
                RPC,
                "duplicate_entry",
                Status::invalid_argument(format!(
                    "duplicate entry {:?}: an entry may appear once in a call; send one CSR per entry",
                    dup.entry_id
                )),
            ));
        }
        // Validated before charging: entries not authorised for this node are refused
        // one by one and cost nothing; each authorised one costs a token of the node's
        // signing budget, and those past what the budget holds are refused.
        let view = self.inner.entries.node(&caller.node_name);
        let authorised = requests
            .iter()
            .filter(|r| view.entry(&r.entry_id).is_some())
            .count();
        let mut granted = self
            .inner
            .limiters
            .sign
            .take_up_to(&caller.node_name, authorised);
        let budget = self.inner.limiters.sign.budget();
        if authorised > 0 && granted == 0 {
            return Err(self.deny(
                RPC,
                "sign_rate_limited",
                Status::resource_exhausted(format!(
                    "node {} is over its X509 signing budget ({} CSRs per second, bursts of {}); retry with backoff",
                    caller.node_name, budget.rate, budget.burst
                )),
            ));
        }
        if granted < authorised {
            self.deny(
                RPC,
                "sign_rate_limited",
                Status::resource_exhausted(format!(
                    "{} of {authorised} CSRs of node {} are over its signing budget",
                    authorised - granted,
                    caller.node_name
                )),
            );
        }
        let now = self.now();
        let mut results = Vec::with_capacity(requests.len());
        let mut cas: BTreeMap<TrustDomain, Option<Arc<crate::authority::DomainAuthority>>> =
            BTreeMap::new();
        for r in requests {
            let result = (|| -> Result<pb::SvidResult, Status> {
                let entry = self.authorized_entry(RPC, &view, &r.entry_id)?;
                if granted == 0 {
                    return Err(Status::resource_exhausted(format!(
                        "node {} is over its X509 signing budget ({} CSRs per second, bursts of {}); retry this entry with backoff",
                        caller.node_name, budget.rate, budget.burst
                    )));
                }
                granted -= 1;
                let csr = x509::parse_csr(&r.csr).map_err(|e| {
                    let reason = match e {
                        x509::CsrError::MultipleUriSans(_) => "csr_multiple_uri_sans",
                        _ => "bad_csr",
                    };
                    self.deny(
                        RPC,
                        reason,
                        Status::invalid_argument(format!("CSR for entry {}: {e}", r.entry_id)),
                    )
                })?;
                if csr.spiffe_id != entry.spiffe_id {
                    return Err(self.deny(
                        RPC,
                        "spiffe_id_not_authorized",
                        Status::permission_denied(format!(
                            "CSR asks for {} but entry {} on node {} grants {}",
                            csr.spiffe_id, entry.id, caller.node_name, entry.spiffe_id
                        )),
                    ));
                }
                let td = entry.spiffe_id.trust_domain().clone();
                let authority = cas
                    .entry(td.clone())
                    .or_insert_with(|| self.inner.authorities.get(&td))
                    .clone()
                    .ok_or_else(|| {
                        Status::unavailable(format!(
                            "trust domain {td} has no CA loaded (is its TrustDomain Ready?)"
                        ))
                    })?;
                let started = Instant::now();
                let issued = authority
                    .x509_ca
                    .sign_csr(
                        &csr,
                        &SvidTemplate {
                            spiffe_id: &entry.spiffe_id,
                            ttl: entry.x509_ttl,
                            dns_names: &entry.dns_names,
                        },
                        now,
                    )
                    .map_err(|e| Status::internal(format!("signing entry {}: {e}", entry.id)))?;
                self.inner
                    .metrics
                    .sign_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.inner.metrics.svids_signed.inc();
                Ok(pb::SvidResult {
                    entry_id: r.entry_id.clone(),
                    svid_chain: issued.chain(),
                    expires_at: unix(issued.not_after),
                    error_code: 0,
                    error_message: String::new(),
                })
            })();
            results.push(result.unwrap_or_else(|s| pb::SvidResult {
                entry_id: r.entry_id,
                svid_chain: vec![],
                expires_at: 0,
                error_code: s.code() as i32,
                error_message: s.message().to_owned(),
            }));
        }
        Ok(Response::new(pb::SignX509SvidsResponse { results }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        const RPC: &str = "MintJwtSvid";
        let caller = self.caller(RPC, &req)?;
        let r = req.into_inner();
        if r.audience.is_empty()
            || r.audience.len() > MAX_AUDIENCES
            || r.audience.iter().any(|a| a.is_empty() || a.len() > 1024)
        {
            return Err(self.deny(
                RPC,
                "bad_audience",
                Status::invalid_argument(format!(
                    "audience must hold 1..={MAX_AUDIENCES} non-empty values"
                )),
            ));
        }
        let entry = self.authorized_entry(
            RPC,
            &self.inner.entries.node(&caller.node_name),
            &r.entry_id,
        )?;
        self.charge(RPC, "mint", &self.inner.limiters.mint, &caller.node_name)?;
        let td = entry.spiffe_id.trust_domain();
        let authority =
            self.inner.authorities.get(td).ok_or_else(|| {
                Status::unavailable(format!("trust domain {td} has no keys loaded"))
            })?;
        let now = self.now();
        let token = authority
            .jwt_key
            .mint(
                &entry.spiffe_id,
                &r.audience,
                entry.jwt_ttl,
                now,
                authority.jwt_issuer.as_deref(),
            )
            .map_err(|e| Status::internal(format!("minting JWT-SVID: {e}")))?;
        self.inner.metrics.jwts_minted.inc();
        Ok(Response::new(pb::MintJwtSvidResponse {
            token,
            expires_at: unix(now + entry.jwt_ttl),
        }))
    }
}

/// Runs `f` with a sender and returns the receiving side as a response stream; the stream
/// ends when `f` returns or the client goes away.
fn spawn_stream<T, F, Fut>(f: F) -> ResponseStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Runs a closure when dropped (keeps the open-streams gauge right however a stream ends).
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
