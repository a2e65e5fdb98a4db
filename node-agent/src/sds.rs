//! Envoy's Secret Discovery Service (SDS v3, `envoy.service.secret.v3`) on the Workload
//! API socket, for Envoy, Istio sidecars and gateways.
//!
//! - Callers are attested exactly as Workload API callers are (the kernel's peer
//!   credentials pinned at accept, then [`crate::attest`]), and get only what the cache
//!   holds for their own entries. Envoy sends no `workload.spiffe.io` header, so SDS does
//!   not ask for one (as SPIRE's agent does not).
//! - Resources (type `envoy.extensions.transport_sockets.tls.v3.Secret`), by name:
//!   - [`SdsConfig::default_svid`] (`default`): the caller's default X509-SVID (the first,
//!     as on the Workload API) as a `tls_certificate` (PEM chain, PKCS#8 PEM key);
//!   - a SPIFFE ID of one of the caller's SVIDs: that SVID;
//!   - [`SdsConfig::default_bundle`] (`ROOTCA`): the bundle of the default SVID's trust
//!     domain, as a `validation_context` with `trusted_ca`;
//!   - `spiffe://<td>`: that trust domain's bundle, when the caller has it (its own, or
//!     one its entries federate with);
//!   - [`SdsConfig::all_bundles`] (`ALL`): every bundle the caller has, as one
//!     `validation_context` holding Envoy's SPIFFE certificate validator
//!     (`envoy.tls.cert_validator.spiffe`, a `SPIFFECertValidatorConfig`), which checks a
//!     peer against the bundle of the trust domain in its SPIFFE ID (SPIRE's
//!     `default_all_bundles_name`);
//!   - no names at all (a wildcard subscription): every SVID by SPIFFE ID and every bundle
//!     by trust domain ID.
//!
//!   A name the caller has nothing for is simply absent from the response: another
//!   workload's SPIFFE ID gets nothing, and its existence is not revealed.
//! - StreamSecrets follows the xDS state-of-the-world protocol as Envoy speaks it: a
//!   response to the first request and to every change of resource names; a request
//!   whose `response_nonce` is not the last response's is stale and ignored; an ACK
//!   (`response_nonce` of the last response, no `error_detail`) needs nothing; a NACK
//!   (`error_detail` set) is logged and counted, and the rejected content is never sent
//!   again (only different content is); every rotation or bundle change that changes the
//!   subscribed resources is pushed. `version_info` is a digest of the content, so equal
//!   content has equal versions across streams and reconnects. A response with no
//!   resource is never sent (Envoy rejects one), nor one while every SVID of the caller is
//!   being re-signed.
//! - Bounds, each refusal a precise status, logged and counted
//!   (`sigil_workload_api_denials_total{rpc="StreamSecrets"|"FetchSecrets"}`): the stream
//!   caps of the Workload API (one SDS stream is one stream), at most
//!   [`MAX_RESOURCE_NAMES`] names of at most [`MAX_RESOURCE_NAME_LEN`] bytes each, request
//!   messages of [`crate::transport::MAX_REQUEST`] at most, a first request within
//!   [`FIRST_REQUEST_WAIT`], and at most [`REQUEST_BURST`] requests at once on a stream,
//!   refilled at [`REQUEST_RATE`] per second.
//! - DeltaSecrets is not served (Unimplemented): Envoy uses it only when configured with
//!   `api_type: DELTA_GRPC`.
//!
//! Like the Workload API streams, an SDS stream holds no secret between responses: only
//! digests of what it sent.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use prost::Message;
use prost_types::Any;
use sigil_identity::TrustBundle;
use sigil_identity::entry::Selector;
use sigil_identity::proto::envoy::config::core::v3 as core;
use sigil_identity::proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use sigil_identity::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use sigil_identity::proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::attest::peer::PeerProcess;
use crate::cache::WorkloadView;
use crate::limits::Slot;
use crate::serving::{ResponseStream, Served};
use crate::transport::{MAX_REQUEST, MAX_RESPONSE};
use crate::workload_api::WorkloadApi;

/// The resource type SDS serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The type of the SPIFFE certificate validator's configuration.
pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// Envoy's name for its SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// Most resource names in one request (Envoy subscribes one or two per stream).
pub const MAX_RESOURCE_NAMES: usize = 64;
/// Longest resource name (a SPIFFE ID may be 2048 bytes).
pub const MAX_RESOURCE_NAME_LEN: usize = 2048;
/// How long a new stream may wait before its first request.
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(30);
/// Requests a stream may send at once (Envoy sends one per response it gets, and one per
/// subscription change).
pub const REQUEST_BURST: f64 = 32.0;
/// Requests per second a stream's budget refills at.
pub const REQUEST_RATE: f64 = 2.0;

/// The names of the well-known resources (the agent's `--sds-*` flags), and how long a
/// stream may wait for its first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// The caller's default X509-SVID (`default`, what Istio asks for).
    pub default_svid: String,
    /// The bundle of the default SVID's trust domain (`ROOTCA`, what Istio asks for).
    pub default_bundle: String,
    /// Every bundle of the caller, as one SPIFFE validator configuration (`ALL`).
    pub all_bundles: String,
    /// How long a new stream may wait before its first request ([`FIRST_REQUEST_WAIT`]).
    pub first_request_wait: Duration,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid: "default".into(),
            default_bundle: "ROOTCA".into(),
            all_bundles: "ALL".into(),
            first_request_wait: FIRST_REQUEST_WAIT,
        }
    }
}

/// The SDS server, with the Workload API's message bounds.
pub fn server(api: WorkloadApi) -> SecretDiscoveryServiceServer<WorkloadApi> {
    SecretDiscoveryServiceServer::new(api)
        .max_decoding_message_size(MAX_REQUEST)
        .max_encoding_message_size(MAX_RESPONSE)
}

/// What a request asks for: `None` is every resource (a wildcard subscription).
type Subscription = Option<BTreeSet<String>>;

/// Why a request is refused (the metric label and the status).
fn check_request(req: &DiscoveryRequest) -> Result<Subscription, (&'static str, Status)> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err((
            "bad_type_url",
            Status::invalid_argument(format!(
                "type_url {:?}: this server serves only {SECRET_TYPE_URL}",
                truncated(&req.type_url)
            )),
        ));
    }
    if req.resource_names.len() > MAX_RESOURCE_NAMES {
        return Err((
            "too_many_resource_names",
            Status::invalid_argument(format!(
                "{} resource_names; at most {MAX_RESOURCE_NAMES} in one request",
                req.resource_names.len()
            )),
        ));
    }
    if let Some(long) = req
        .resource_names
        .iter()
        .find(|n| n.len() > MAX_RESOURCE_NAME_LEN)
    {
        return Err((
            "resource_name_too_long",
            Status::invalid_argument(format!(
                "resource name {:?}… is {} bytes; at most {MAX_RESOURCE_NAME_LEN}",
                truncated(long),
                long.len()
            )),
        ));
    }
    let names: BTreeSet<String> = req
        .resource_names
        .iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect();
    Ok((!names.is_empty()).then_some(names))
}

/// The first 64 characters of attacker-chosen text, for messages and logs.
fn truncated(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn inline(bytes: impl Into<Vec<u8>>) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(bytes.into())),
    })
}

fn secret_any(secret: &tls::Secret) -> Any {
    Any {
        type_url: SECRET_TYPE_URL.into(),
        value: secret.encode_to_vec(),
    }
}

fn tls_certificate(name: &str, svid: &crate::cache::HeldSvid) -> Any {
    let key = svid.key.to_pkcs8_pem();
    secret_any(&tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(sigil_identity::x509::certs_to_pem(&svid.chain)),
            private_key: inline(key.as_bytes()),
        })),
    })
}

fn trusted_ca(name: &str, bundle: &TrustBundle) -> Any {
    secret_any(&tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: inline(bundle.x509_pem()),
                custom_validator_config: None,
            },
        )),
    })
}

fn spiffe_validator<'a>(name: &str, bundles: impl Iterator<Item = &'a TrustBundle>) -> Any {
    let mut trust_domains: Vec<_> = bundles
        .map(|b| tls::spiffe_cert_validator_config::TrustDomain {
            name: b.trust_domain.name().to_owned(),
            trust_bundle: inline(b.x509_pem()),
        })
        .collect();
    trust_domains.sort_by(|a, b| a.name.cmp(&b.name));
    trust_domains.dedup_by(|a, b| a.name == b.name);
    let config = tls::SpiffeCertValidatorConfig {
        trust_domains,
        trust_bundles: None,
    };
    secret_any(&tls::Secret {
        name: name.into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: None,
                custom_validator_config: Some(core::TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.into(),
                    typed_config: Some(Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.into(),
                        value: config.encode_to_vec(),
                    }),
                }),
            },
        )),
    })
}

/// The resources of `view` that `subscription` names, in name order (wildcard: every
/// SVID by SPIFFE ID, then every bundle by trust domain ID). Names the caller has nothing
/// for are left out.
pub fn resources(view: &WorkloadView, subscription: &Subscription, names: &SdsConfig) -> Vec<Any> {
    let bundles = || view.own_bundles.iter().chain(view.federated.iter());
    let bundle_of = |td_id: &str| bundles().find(|b| b.trust_domain.id_string() == td_id);
    let Some(wanted) = subscription else {
        let mut out: Vec<Any> = view
            .svids
            .iter()
            .map(|h| tls_certificate(h.entry.spiffe_id.as_str(), h))
            .collect();
        let mut seen = BTreeSet::new();
        for b in bundles() {
            if seen.insert(b.trust_domain.clone()) {
                out.push(trusted_ca(&b.trust_domain.id_string(), b));
            }
        }
        return out;
    };
    let default = view.svids.first();
    let mut out = Vec::with_capacity(wanted.len());
    for name in wanted {
        if *name == names.default_svid {
            if let Some(h) = default {
                out.push(tls_certificate(name, h));
            }
        } else if *name == names.default_bundle {
            // The bundle the default SVID is validated with: its trust domain's (the
            // agent's own trust domain while the caller has no SVID).
            let own = match default {
                Some(h) => view
                    .own_bundles
                    .iter()
                    .find(|b| &b.trust_domain == h.entry.spiffe_id.trust_domain()),
                None => view.own_bundles.first(),
            };
            if let Some(b) = own {
                out.push(trusted_ca(name, b));
            }
        } else if *name == names.all_bundles {
            if bundles().next().is_some() {
                out.push(spiffe_validator(name, bundles()));
            }
        } else if let Some(h) = view
            .svids
            .iter()
            .find(|h| h.entry.spiffe_id.as_str() == name)
        {
            out.push(tls_certificate(name, h));
        } else if let Some(b) = bundle_of(name) {
            out.push(trusted_ca(name, b));
        }
    }
    out
}

/// SHA-256 of the resources' encodings.
fn digest(resources: &[Any]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for r in resources {
        h.update((r.encoded_len() as u64).to_be_bytes());
        h.update(r.encode_to_vec());
    }
    h.finalize().into()
}

/// The version a response with this digest carries.
fn version(d: &[u8; 32]) -> String {
    hex::encode(&d[..8])
}

/// What the cache holds for a caller now: `Ok(None)` while every SVID is being re-signed,
/// an error once the caller's entries are gone.
fn current(
    served: &Served,
    selectors: &BTreeSet<Selector>,
    subscription: &Subscription,
    names: &SdsConfig,
) -> Result<Option<Vec<Any>>, Status> {
    let view = served.cache.view_for(selectors);
    if view.svids.is_empty() {
        if !view.has_identity() {
            return Err(Status::permission_denied(
                "no identity issued (the workload's entries were removed)",
            ));
        }
        return Ok(None);
    }
    Ok(Some(resources(&view, subscription, names)))
}

/// One StreamSecrets stream between messages.
struct SdsStream {
    api: WorkloadApi,
    requests: Streaming<DiscoveryRequest>,
    changes: watch::Receiver<u64>,
    selectors: BTreeSet<Selector>,
    peer: std::sync::Arc<PeerProcess>,
    /// What the proxy subscribed to; `None` until its first request.
    subscription: Option<Subscription>,
    /// Nonce of the last response (empty before the first).
    last_nonce: String,
    nonces: u64,
    /// Digest of the last response's resources.
    sent: Option<[u8; 32]>,
    /// Digest of the last content the proxy rejected.
    rejected: Option<[u8; 32]>,
    /// Request budget: tokens and when they were counted.
    budget: (f64, Instant),
    opened: tokio::time::Instant,
    done: bool,
    _slot: Slot,
}

const RPC: &str = "StreamSecrets";

impl SdsStream {
    fn refuse(&mut self, reason: &str, status: Status) -> Status {
        self.done = true;
        self.api.deny(RPC, reason, status, Some(&self.peer))
    }

    /// Takes one request from the stream's budget.
    fn charge(&mut self) -> bool {
        let now = Instant::now();
        let (tokens, at) = &mut self.budget;
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * REQUEST_RATE).min(REQUEST_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A response with the current content when the proxy should get one: `force` after a
    /// subscription (a first request, or new names), otherwise only when the content
    /// changed. Never the content the proxy last rejected, never an empty one.
    fn respond(&mut self, force: bool) -> Result<Option<DiscoveryResponse>, Status> {
        let Some(subscription) = &self.subscription else {
            return Ok(None);
        };
        let served = &self.api.inner().served;
        let resources = match current(served, &self.selectors, subscription, &self.api.sds) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        if resources.is_empty() {
            return Ok(None);
        }
        let d = digest(&resources);
        if self.rejected == Some(d) || (!force && self.sent == Some(d)) {
            return Ok(None);
        }
        self.nonces += 1;
        self.last_nonce = self.nonces.to_string();
        self.sent = Some(d);
        debug!(pid = self.peer.pid, version = %version(&d), resources = resources.len(), "sending secrets");
        Ok(Some(DiscoveryResponse {
            version_info: version(&d),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.into(),
            nonce: self.last_nonce.clone(),
        }))
    }

    /// Handles one request; a response when it calls for one.
    fn on_request(&mut self, req: DiscoveryRequest) -> Result<Option<DiscoveryResponse>, Status> {
        if !self.charge() {
            return Err(self.refuse(
                "too_many_requests",
                Status::resource_exhausted(format!(
                    "more than {REQUEST_BURST} requests at once on one SDS stream ({REQUEST_RATE} per second sustained); send a request only to subscribe, ACK or NACK"
                )),
            ));
        }
        let subscription = match check_request(&req) {
            Ok(s) => s,
            Err((reason, status)) => return Err(self.refuse(reason, status)),
        };
        let first = self.subscription.is_none();
        if !first && req.response_nonce != self.last_nonce {
            // A stale request (it answers an older response): the xDS protocol says to
            // ignore it; the proxy's answer to the last response follows.
            debug!(pid = self.peer.pid, nonce = %truncated(&req.response_nonce), "stale SDS request ignored");
            return Ok(None);
        }
        if let Some(e) = &req.error_detail {
            self.api.inner().metrics.sds_nack();
            warn!(
                pid = self.peer.pid,
                nonce = %truncated(&req.response_nonce),
                kept_version = %truncated(&req.version_info),
                code = e.code,
                error = %truncated(&e.message),
                "a proxy rejected the secrets it was sent (NACK); they are not sent again"
            );
            if !first {
                self.rejected = self.sent;
            }
        }
        let changed = self.subscription.as_ref() != Some(&subscription);
        self.subscription = Some(subscription);
        if changed {
            self.respond(true)
        } else {
            Ok(None)
        }
    }
}

impl WorkloadApi {
    fn sds_stream(
        &self,
        caller: crate::workload_api::Caller,
        requests: Streaming<DiscoveryRequest>,
        slot: Slot,
    ) -> ResponseStream<DiscoveryResponse> {
        let served = &self.inner().served;
        let mut changes = served.cache.subscribe();
        changes.borrow_and_update();
        let open = crate::serving::OpenStream::new(&served.open_streams);
        let state = SdsStream {
            api: self.clone(),
            requests,
            changes,
            selectors: caller.selectors,
            peer: caller.peer,
            subscription: None,
            last_nonce: String::new(),
            nonces: 0,
            sent: None,
            rejected: None,
            budget: (REQUEST_BURST, Instant::now()),
            opened: tokio::time::Instant::now(),
            done: false,
            _slot: slot,
        };
        Box::pin(futures::stream::unfold(
            (state, open),
            |(mut s, open)| async move {
                loop {
                    if s.done {
                        return None;
                    }
                    let shutdown = s.api.inner().served.shutdown.clone();
                    let wait = s.api.sds.first_request_wait;
                    let first_deadline = s.opened + wait;
                    let waiting_first = s.subscription.is_none();
                    let step = tokio::select! {
                        m = s.requests.message() => match m {
                            Ok(Some(req)) => s.on_request(req),
                            // The proxy closed its side, or went away.
                            Ok(None) => return None,
                            Err(e) if e.code() == tonic::Code::Cancelled => return None,
                            Err(e) => {
                                let reason = match e.code() {
                                    tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => "request_too_large",
                                    _ => "bad_request",
                                };
                                Err(s.refuse(reason, e))
                            }
                        },
                        r = s.changes.changed() => {
                            if r.is_err() {
                                return None;
                            }
                            s.respond(false)
                        }
                        () = tokio::time::sleep_until(first_deadline), if waiting_first => {
                            Err(s.refuse(
                                "no_subscription",
                                Status::deadline_exceeded(format!(
                                    "no DiscoveryRequest within {wait:?} of opening the stream"
                                )),
                            ))
                        }
                        () = shutdown.cancelled() => {
                            s.done = true;
                            Err(Status::unavailable("agent is shutting down; reconnect"))
                        }
                    };
                    match step {
                        Ok(Some(resp)) => return Some((Ok(resp), (s, open))),
                        Ok(None) => {}
                        Err(e) => {
                            s.done = true;
                            return Some((Err(e), (s, open)));
                        }
                    }
                }
            },
        ))
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for WorkloadApi {
    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DiscoveryResponse>>, Status> {
        self.inner().metrics.call(RPC);
        let caller = self.attest_peer(RPC, &req).await?;
        let view = self.inner().served.cache.view_for(&caller.selectors);
        if !view.has_identity() {
            return Err(self.no_identity(RPC, &caller));
        }
        let slot = self.stream_slot(RPC, &caller)?;
        debug!(pid = caller.peer.pid, "serving SDS");
        Ok(Response::new(self.sds_stream(
            caller,
            req.into_inner(),
            slot,
        )))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        const RPC: &str = "FetchSecrets";
        self.inner().metrics.call(RPC);
        let caller = self.attest_peer(RPC, &req).await?;
        let subscription = check_request(req.get_ref())
            .map_err(|(reason, status)| self.deny(RPC, reason, status, Some(&caller.peer)))?;
        let view = self.inner().served.ready_view(&caller.selectors).await;
        if view.svids.is_empty() {
            return Err(self.no_valid_svid(RPC, &caller, &view));
        }
        let resources = resources(&view, &subscription, &self.sds);
        Ok(Response::new(DiscoveryResponse {
            version_info: version(&digest(&resources)),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.into(),
            nonce: String::new(),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use sigil_identity::entry::RegistrationEntry;
    use sigil_identity::keys::{KeyType, PrivateKey};
    use sigil_identity::{SpiffeId, TrustDomain};

    use super::*;
    use crate::cache::HeldSvid;

    fn held(id: &str) -> Arc<HeldSvid> {
        let now = SystemTime::now();
        Arc::new(HeldSvid {
            entry: Arc::new(RegistrationEntry::new(
                id,
                SpiffeId::parse(id).unwrap(),
                vec![Selector::new("k8s", "pod-uid:u1")],
            )),
            chain: vec![vec![1, 2, 3]],
            key: PrivateKey::generate(KeyType::EcP256).unwrap(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            rotate_at: now + Duration::from_secs(1800),
        })
    }

    fn bundle(td: &str, der: u8) -> TrustBundle {
        let mut b = TrustBundle::new(td.parse::<TrustDomain>().unwrap());
        b.x509_authorities = vec![vec![der; 4]];
        b
    }

    fn decoded(r: &[Any]) -> Vec<tls::Secret> {
        r.iter()
            .map(|a| {
                assert_eq!(a.type_url, SECRET_TYPE_URL);
                tls::Secret::decode(a.value.as_slice()).unwrap()
            })
            .collect()
    }

    fn names_of(r: &[Any]) -> Vec<String> {
        decoded(r).into_iter().map(|s| s.name).collect()
    }

    /// What each name resolves to, with an own and a federated trust domain: `default`
    /// and the SPIFFE IDs are certificates, `ROOTCA` the own bundle, `spiffe://<td>` each
    /// bundle, `ALL` one SPIFFE validator with both; names the caller has nothing for (a
    /// trust domain it does not federate with, an ID that is not its own) are absent.
    #[test]
    fn names_resolve_to_the_callers_own_resources_only() {
        let view = WorkloadView {
            svids: vec![
                held("spiffe://a.test/web"),
                held("spiffe://a.test/web-admin"),
            ],
            pending: vec![],
            expired: vec![],
            own_bundles: vec![bundle("a.test", 1)],
            federated: vec![bundle("b.test", 2)],
        };
        let names = SdsConfig::default();
        let sub = |n: &[&str]| Some(n.iter().map(|s| (*s).to_owned()).collect());
        let r = resources(
            &view,
            &sub(&[
                "default",
                "ROOTCA",
                "ALL",
                "spiffe://b.test",
                "spiffe://c.test",
                "spiffe://a.test/web-admin",
                "spiffe://a.test/db",
            ]),
            &names,
        );
        assert_eq!(
            names_of(&r),
            [
                "ALL",
                "ROOTCA",
                "default",
                "spiffe://a.test/web-admin",
                "spiffe://b.test"
            ]
        );
        let secrets = decoded(&r);
        let Some(tls::secret::Type::ValidationContext(all)) = &secrets[0].r#type else {
            panic!("ALL is a validation context")
        };
        let validator = all.custom_validator_config.as_ref().unwrap();
        assert_eq!(validator.name, SPIFFE_VALIDATOR);
        let config = validator.typed_config.as_ref().unwrap();
        assert_eq!(config.type_url, SPIFFE_VALIDATOR_TYPE_URL);
        let config = tls::SpiffeCertValidatorConfig::decode(config.value.as_slice()).unwrap();
        let tds: Vec<_> = config
            .trust_domains
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(tds, ["a.test", "b.test"], "names without spiffe://, sorted");
        let Some(tls::secret::Type::TlsCertificate(default)) = &secrets[2].r#type else {
            panic!("default is a certificate")
        };
        let key = default.private_key.as_ref().unwrap();
        let Some(core::data_source::Specifier::InlineBytes(pem)) = &key.specifier else {
            panic!("inline key")
        };
        assert!(String::from_utf8_lossy(pem).starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(format!("{default:?}").contains("redacted"), "{default:?}");

        // A wildcard subscription: every SVID by ID, every bundle by trust domain ID.
        let all = resources(&view, &None, &names);
        assert_eq!(
            names_of(&all),
            [
                "spiffe://a.test/web",
                "spiffe://a.test/web-admin",
                "spiffe://a.test",
                "spiffe://b.test"
            ]
        );
        // Nothing the caller has: nothing at all (the stream then sends no response).
        assert!(resources(&view, &sub(&["spiffe://a.test/db"]), &names).is_empty());
        // Equal content, equal version; a rotated key, another version.
        let again = resources(&view, &sub(&["default"]), &names);
        let same = resources(&view, &sub(&["default"]), &names);
        assert_eq!(version(&digest(&again)), version(&digest(&same)));
        let mut rotated = view.clone();
        rotated.svids[0] = held("spiffe://a.test/web");
        let other = resources(&rotated, &sub(&["default"]), &names);
        assert_ne!(version(&digest(&again)), version(&digest(&other)));
    }

    fn request(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        }
    }

    /// A stream that never subscribes ends with DeadlineExceeded once its first-request
    /// wait has passed, counted; the caller is this test process, attested by its UID
    /// through the real socket, as a workload outside any pod.
    #[tokio::test]
    async fn a_stream_that_never_subscribes_ends_at_its_deadline() {
        use crate::attest::WorkloadAttestor;
        use crate::limits::{Caps, MintBudget};
        use crate::node_client::NodeClient;
        use crate::transport::{ApiMetrics, DenialLabels, bind_public};
        use sigil_identity::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
        use tokio_util::sync::CancellationToken;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = bind_public(&path).unwrap();
        let td: TrustDomain = "example.org".parse().unwrap();
        let cache = crate::cache::Cache::new();
        let uid = nix::unistd::getuid().as_raw();
        let entry = RegistrationEntry::new(
            "me",
            SpiffeId::parse("spiffe://example.org/me").unwrap(),
            vec![Selector::new("unix", format!("uid:{uid}"))],
        );
        cache.replace_entries(vec![entry], 1);
        let mut svid = Arc::try_unwrap(held("spiffe://example.org/me")).unwrap();
        svid.entry = cache.entry("me").unwrap();
        assert!(cache.put_svid(svid));
        let metrics = ApiMetrics::default();
        let cancel = CancellationToken::new();
        let node = NodeClient::unreachable(&td);
        let api = WorkloadApi::new(
            cache,
            Arc::new(WorkloadAttestor::new(
                "/proc".into(),
                "/etc".into(),
                None,
                Duration::from_secs(1),
            )),
            Arc::new(node),
            metrics.clone(),
            Arc::new(MintBudget::new(10.0, 10.0)),
            Caps::streams(100, 100, metrics.clone()),
            cancel.clone(),
        )
        .with_sds_config(SdsConfig {
            first_request_wait: Duration::from_millis(300),
            ..SdsConfig::default()
        });
        let caps = Caps::connections(100, 100, metrics.clone());
        let server = tokio::spawn(crate::workload_api::serve(
            listener,
            api,
            "/proc".into(),
            caps,
            cancel.clone(),
        ));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let t = Instant::now();
        let mut responses = client
            .stream_secrets(futures::stream::pending::<DiscoveryRequest>())
            .await
            .unwrap()
            .into_inner();
        let status = responses.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        let counted = metrics
            .denials
            .get_or_create(&DenialLabels {
                rpc: "StreamSecrets".into(),
                reason: "no_subscription".into(),
            })
            .get();
        assert_eq!(counted, 1);
        // A subscribing stream of the same caller is served.
        let mut responses = client
            .stream_secrets(futures::StreamExt::chain(
                futures::stream::iter(vec![request(&["default"])]),
                futures::stream::pending(),
            ))
            .await
            .unwrap()
            .into_inner();
        let first = responses.message().await.unwrap().unwrap();
        assert_eq!(names_of(&first.resources), ["default"]);
        cancel.cancel();
        let _ = server.await;
    }

    #[test]
    fn resource_names_are_bounded_and_the_type_is_checked() {
        assert_eq!(
            check_request(&request(&["default", "ROOTCA", ""])).unwrap(),
            Some(["ROOTCA".to_owned(), "default".to_owned()].into())
        );
        assert_eq!(check_request(&request(&[])).unwrap(), None);
        let many: Vec<String> = (0..=MAX_RESOURCE_NAMES).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            check_request(&request(&many)).unwrap_err().0,
            "too_many_resource_names"
        );
        let long = "a".repeat(MAX_RESOURCE_NAME_LEN + 1);
        let (reason, status) = check_request(&request(&[&long])).unwrap_err();
        assert_eq!(reason, "resource_name_too_long");
        assert!(status.message().len() < 300, "{status:?}");
        let mut r = request(&["default"]);
        r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(check_request(&r).unwrap_err().0, "bad_type_url");
    }
}
