//! Sigil's CA signed through cert-manager (`spec.upstreamAuthority.certManager`).
//!
//! When the rotation needs a new CA, the operator generates its key, keeps it in the CA
//! Secret ([`PendingRequest`]) and sends a cert-manager.io/v1 CertificateRequest with the
//! CSR to the named Issuer or ClusterIssuer, in the operator's namespace. Once cert-manager
//! has approved and signed it, the signed chain becomes the next CA (prepared, or active
//! when none signs) and the issuer's CA (`status.ca`) its trust anchor, published in the
//! bundle. Until then the active CA keeps signing, and the `CertificateRequest` condition
//! says what the request waits for (approval, the issuer) or why it ended (denied,
//! failed).
//!
//! What it must not do: send the CA key anywhere (only the CSR leaves), watch
//! CertificateRequests (cert-manager need not be installed unless a TrustDomain uses it),
//! or touch requests it did not create (they carry [`OWNER_LABEL`] and
//! [`REQUEST_COMPONENT`]).

use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde::Deserialize;
use sigil_identity::ca::{CaParams, CertificateAuthority};
use sigil_identity::x509::{certs_from_pem, rfc3339};
use tracing::{info, warn};

use super::error::Error;
use super::policy::Policy;
use super::rotation::{AuthorityState, PendingRequest, requested_ca_must_be_replaced};
use super::store::{label_value, owner_reference};
use crate::conditions::unix;
use crate::crd::trust_domain::{
    COMPONENT_LABEL, CertManagerUpstream, OWNER_LABEL, TrustDomain as TrustDomainObject,
};

/// Condition type on the TrustDomain that reports the last CertificateRequest.
pub const CERTIFICATE_REQUEST: &str = "CertificateRequest";
/// [`COMPONENT_LABEL`] value of Sigil's CertificateRequests.
pub const REQUEST_COMPONENT: &str = "ca-request";
/// How often a young pending request is looked at (cert-manager's CA issuer signs within
/// a second once approved); an older one is looked at every retry interval.
const YOUNG_REQUEST_RECHECK: Duration = Duration::from_secs(2);
const YOUNG_REQUEST_AGE: Duration = Duration::from_secs(120);

/// cert-manager.io/v1 CertificateRequest, read and written as a [`DynamicObject`] so no
/// cert-manager crate (nor its CRD at start-up) is needed.
pub fn certificate_request_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "CertificateRequest"),
        "certificaterequests",
    )
}

/// The part of a CertificateRequest's status Sigil reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestStatus {
    /// Approved, Denied, Ready, InvalidRequest.
    #[serde(default)]
    pub conditions: Vec<RequestCondition>,
    /// PEM chain: the signed certificate first.
    #[serde(default)]
    pub certificate: Option<ByteString>,
    /// PEM of the issuing CA (the root Sigil publishes).
    #[serde(default)]
    pub ca: Option<ByteString>,
}

/// One condition of a CertificateRequest.
#[derive(Debug, Deserialize)]
pub struct RequestCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// Machine-readable reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default)]
    pub message: Option<String>,
}

/// Where a CertificateRequest stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestState {
    /// Signed: the PEM chain (signed certificate first) and the issuer's CA PEM.
    Issued {
        /// `status.certificate`.
        chain_pem: String,
        /// `status.ca`.
        ca_pem: String,
    },
    /// An approver denied it (terminal).
    Denied {
        /// The Denied condition's reason.
        reason: String,
        /// Its message.
        message: String,
    },
    /// The issuer failed it, or cert-manager found it invalid (terminal).
    Failed {
        /// Ready's reason (`Failed`) or `InvalidRequest`.
        reason: String,
        /// cert-manager's message.
        message: String,
    },
    /// Waiting for approval, or approved and waiting for the issuer.
    Pending {
        /// Whether it is approved.
        approved: bool,
        /// Ready's message, if any (e.g. the issuer is not ready).
        message: Option<String>,
    },
}

/// Reads a CertificateRequest's status.
pub fn classify(status: &RequestStatus) -> RequestState {
    let find = |t: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    let text = |c: &RequestCondition| c.message.clone().unwrap_or_default();
    if let Some(c) = find("Denied") {
        return RequestState::Denied {
            reason: c.reason.clone().unwrap_or_else(|| "Denied".into()),
            message: text(c),
        };
    }
    if let Some(c) = find("InvalidRequest") {
        return RequestState::Failed {
            reason: "InvalidRequest".into(),
            message: text(c),
        };
    }
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let pem = |b: &Option<ByteString>| {
        b.as_ref()
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let chain_pem = pem(&status.certificate);
    if ready.is_some_and(|c| c.status == "True") && !chain_pem.trim().is_empty() {
        return RequestState::Issued {
            chain_pem,
            ca_pem: pem(&status.ca),
        };
    }
    if let Some(c) = ready.filter(|c| c.status == "False" && c.reason.as_deref() == Some("Failed"))
    {
        return RequestState::Failed {
            reason: "Failed".into(),
            message: text(c),
        };
    }
    RequestState::Pending {
        approved: find("Approved").is_some(),
        message: ready.and_then(|c| c.message.clone()),
    }
}

/// What [`drive`] found, for the reconcile.
#[derive(Debug, Default)]
pub struct RequestReport {
    /// The CA just signed, to install as the next generation.
    pub ca: Option<Box<CertificateAuthority>>,
    /// The `CertificateRequest` condition (`None`: keep the current one).
    pub condition: Option<(bool, String, String)>,
    /// A problem for condition Ready.
    pub problem: Option<Error>,
    /// The pending request changed: the CA Secret must be written.
    pub changed: bool,
    /// Look again after this long (a request is pending).
    pub recheck: Option<Duration>,
    /// A request was sent in this reconcile: the note of its Event.
    pub sent: Option<String>,
}

fn issuer_words(cm: &CertManagerUpstream) -> String {
    format!(
        "{} {} ({})",
        cm.issuer_ref.kind.as_str(),
        cm.issuer_ref.name,
        cm.issuer_ref.group
    )
}

/// Moves the trust domain's CertificateRequest along (`spec.upstreamAuthority.certManager`
/// of `policy`; nothing without it): sends one when the rotation needs a
/// new CA and none is pending, reads the pending one, and hands over its CA once signed.
/// The caller installs [`RequestReport::ca`] through the rotation and persists `state`
/// when [`RequestReport::changed`].
pub async fn drive(
    client: &Client,
    namespace: &str,
    obj: &TrustDomainObject,
    policy: &Policy,
    state: &mut AuthorityState,
    now: SystemTime,
    retry: Duration,
) -> Result<RequestReport, Error> {
    let object = obj.name_any();
    let Some(cm) = policy.cert_manager.as_ref() else {
        return Ok(RequestReport::default());
    };
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &certificate_request_resource());
    let mut report = RequestReport::default();
    let needed = state.needs_new_ca(now, policy, &requested_ca_must_be_replaced);
    let named = |name: &str| format!("CertificateRequest {namespace}/{name}");
    if !needed {
        if state.pending_request.take().is_some() {
            // Nothing needs it any more (e.g. a prepared CA was installed meanwhile).
            report.changed = true;
        }
        // The newest CA says which request it came from (its name derives from the key),
        // so the condition is rebuilt from the state alone, never from a stale status.
        let newest = state.x509.prepared.as_ref().or(state.x509.active.as_ref());
        if let Some(slot) = newest.filter(|s| !requested_ca_must_be_replaced(&s.key))
            && let Some(name) = spki_of(slot.key.certificate()).map(|k| request_name(&object, &k))
        {
            report.condition = Some(issued_condition(&named(&name), cm, &slot.key));
        }
        return Ok(report);
    }
    let signing = state.signing_ca(now).is_some();

    if let Some(pending) = state.pending_request.clone() {
        match api.get_opt(&pending.name).await {
            Err(kube::Error::Api(s)) if s.code == 403 => {
                report.problem = Some(Error::CertificateRequestForbidden {
                    object,
                    namespace: namespace.into(),
                    verb: "get",
                });
                report.condition = Some(condition_of(report.problem.as_ref()));
                return Ok(report);
            }
            Err(e) => return Err(e.into()),
            Ok(None) => {
                if !crd_present(&api).await? {
                    report.problem = Some(Error::CertManagerNotInstalled { object });
                    report.condition = Some(condition_of(report.problem.as_ref()));
                    return Ok(report);
                }
                info!(trust_domain_object = %object, request = %pending.name, "pending CertificateRequest is gone; sending a new one");
                state.pending_request = None;
                report.changed = true;
            }
            Ok(Some(cr)) => {
                let status: RequestStatus = cr
                    .data
                    .get("status")
                    .cloned()
                    .and_then(|s| serde_json::from_value(s).ok())
                    .unwrap_or_default();
                let who = named(&pending.name);
                match classify(&status) {
                    RequestState::Issued { chain_pem, ca_pem } => {
                        match install(policy, &pending, &chain_pem, &ca_pem) {
                            Ok(ca) => {
                                report.condition = Some(issued_condition(&who, cm, &ca));
                                info!(trust_domain_object = %object, request = %pending.name, serial = %ca.serial(), "CertificateRequest signed; installing the CA");
                                report.ca = Some(Box::new(ca));
                                state.pending_request = None;
                                report.changed = true;
                            }
                            Err(reason) => {
                                report.problem = Some(Error::CertificateRequestUnusable {
                                    object,
                                    namespace: namespace.into(),
                                    name: pending.name.clone(),
                                    reason,
                                });
                            }
                        }
                    }
                    RequestState::Denied { reason, message } => {
                        report.problem = Some(Error::CertificateRequestDenied {
                            object,
                            namespace: namespace.into(),
                            name: pending.name.clone(),
                            reason,
                            message,
                        });
                    }
                    RequestState::Failed { reason, message } => {
                        report.problem = Some(Error::CertificateRequestFailed {
                            object,
                            namespace: namespace.into(),
                            name: pending.name.clone(),
                            issuer: issuer_words(cm),
                            reason,
                            message,
                        });
                    }
                    RequestState::Pending { approved, message } => {
                        let detail = if approved {
                            format!(
                                "it is approved and waits for {} to sign it{}; check that the issuer exists{} and is Ready",
                                issuer_words(cm),
                                message.map(|m| format!(" (cert-manager: {m})")).unwrap_or_default(),
                                match cm.issuer_ref.kind {
                                    crate::crd::trust_domain::CertManagerIssuerKind::Issuer =>
                                        format!(" in namespace {namespace}"),
                                    crate::crd::trust_domain::CertManagerIssuerKind::ClusterIssuer => String::new(),
                                }
                            )
                        } else {
                            format!(
                                "it is not approved yet; cert-manager's approver, or the approver your cluster uses (e.g. approver-policy), must approve it (`cmctl approve -n {namespace} {}`)",
                                pending.name
                            )
                        };
                        let problem = Error::CertificateRequestPending {
                            object,
                            namespace: namespace.into(),
                            name: pending.name.clone(),
                            detail,
                            signing,
                        };
                        report.condition = Some(condition_of(Some(&problem)));
                        // Pending is only a problem when no CA signs meanwhile.
                        if !signing {
                            report.problem = Some(problem);
                        }
                        let age = now.duration_since(pending.requested_at).unwrap_or_default();
                        report.recheck = Some(if age < YOUNG_REQUEST_AGE {
                            YOUNG_REQUEST_RECHECK
                        } else {
                            retry
                        });
                    }
                }
                if report.condition.is_none() {
                    report.condition = Some(condition_of(report.problem.as_ref()));
                }
                return Ok(report);
            }
        }
    }

    // Send a new request.
    let params = CaParams {
        trust_domain: policy.trust_domain.clone(),
        key_type: policy.ca_key_type,
        ttl: policy.ca_ttl,
        subject: policy.ca_subject.clone(),
    };
    // The key is made where the operator's other CA keys are (software, or an HSM),
    // off the async runtime: generation may take seconds or an HSM round trip.
    let keys = policy.keys.clone();
    let label = format!("sigil-ca:{}", policy.trust_domain.name());
    let made = tokio::task::spawn_blocking(move || {
        let key = keys
            .generate(params.key_type, &label)
            .map_err(sigil_identity::ca::CaError::from)?;
        match CertificateAuthority::csr_pem(&params, &key, now) {
            Ok(csr) => Ok((key, csr)),
            Err(e) => {
                forget(&keys, &key);
                Err(e)
            }
        }
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let (key, csr) = match made {
        Ok(made) => made,
        Err(source) => {
            report.problem = Some(Error::Ca { object, source });
            report.condition = Some(condition_of(report.problem.as_ref()));
            return Ok(report);
        }
    };
    let name = request_name(&object, &key.public_key_der());
    // Until the request and its key are in `state`, a failure must not leave the key
    // behind in a key manager. A failed call to the request API gives the key up either
    // way: a problem people can fix is reported, anything else is retried.
    let give_up = |e: kube::Error, verb: &'static str, mut report: RequestReport| {
        forget(&policy.keys, &key);
        match request_api_problem(e, &object, namespace, verb) {
            Ok(problem) => {
                report.condition = Some(condition_of(Some(&problem)));
                report.problem = Some(problem);
                Ok(report)
            }
            Err(e) => Err(Error::from(e)),
        }
    };
    // Earlier requests of this TrustDomain (consumed, denied, failed or orphaned) go first:
    // only the newest one is kept for people to look at.
    let selector = format!(
        "{OWNER_LABEL}={},{COMPONENT_LABEL}={REQUEST_COMPONENT}",
        label_value(&object)
    );
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(old) => {
            for cr in old.items {
                let n = cr.name_any();
                match api.delete(&n, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        warn!(trust_domain_object = %object, request = %n, error = %e, "cannot delete an old CertificateRequest")
                    }
                }
            }
        }
        Err(e) => return give_up(e, "list", report),
    }
    let mut cr = DynamicObject::new(&name, &certificate_request_resource()).within(namespace);
    cr.metadata.labels = Some(
        [
            (OWNER_LABEL.to_owned(), label_value(&object)),
            (COMPONENT_LABEL.to_owned(), REQUEST_COMPONENT.to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "sigil-operator".to_owned(),
            ),
        ]
        .into(),
    );
    cr.metadata.owner_references = owner_reference(obj).map(|o| vec![o]);
    cr.data = serde_json::json!({
        "spec": {
            "request": ByteString(csr.into_bytes()),
            "isCA": true,
            "usages": ["cert sign", "crl sign", "digital signature"],
            "duration": format!("{}s", policy.ca_ttl.as_secs()),
            "issuerRef": {
                "name": cm.issuer_ref.name,
                "kind": cm.issuer_ref.kind.as_str(),
                "group": cm.issuer_ref.group,
            },
        }
    });
    match api.create(&PostParams::default(), &cr).await {
        Ok(_) => {}
        Err(e) => return give_up(e, "create", report),
    }
    info!(trust_domain_object = %object, request = %name, issuer = %issuer_words(cm), "sent a CertificateRequest for the next CA");
    report.sent = Some(format!(
        "sent {} for the next CA to {}; the key stays in the CA Secret",
        named(&name),
        issuer_words(cm)
    ));
    state.pending_request = Some(PendingRequest {
        name: name.clone(),
        key,
        requested_at: now,
    });
    report.changed = true;
    let problem = Error::CertificateRequestPending {
        object,
        namespace: namespace.into(),
        name,
        detail: format!(
            "it was just sent and waits to be approved and signed by {}",
            issuer_words(cm)
        ),
        signing,
    };
    report.condition = Some(condition_of(Some(&problem)));
    if !signing {
        report.problem = Some(problem);
    }
    report.recheck = Some(YOUNG_REQUEST_RECHECK);
    Ok(report)
}

/// The name of the CertificateRequest for a CA key: the CA Secret's name and a hash of
/// the key's SubjectPublicKeyInfo, so an installed CA names the request it came from.
pub fn request_name(object: &str, spki_der: &[u8]) -> String {
    use sha2::Digest;
    let hash = hex::encode(&sha2::Sha256::digest(spki_der)[..5]);
    let base: String = crate::crd::prefixed_name("sigil-ca-", object)
        .chars()
        .take(240)
        .collect();
    format!("{}-{hash}", base.trim_end_matches(['-', '.']))
}

fn spki_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(cert_der)
        .ok()
        .map(|(_, c)| c.public_key().raw.to_vec())
}

fn issued_condition(
    who: &str,
    cm: &CertManagerUpstream,
    ca: &CertificateAuthority,
) -> (bool, String, String) {
    (
        true,
        "CertificateRequestIssued".into(),
        format!(
            "{who} was signed by {}; CA {} (valid until {}) is installed and its upstream root is in the trust bundle; the next request is sent at half of its lifetime",
            issuer_words(cm),
            ca.serial(),
            rfc3339(unix(ca.not_after()))
        ),
    )
}

/// The CA from a signed request and the key kept for it.
fn install(
    policy: &Policy,
    pending: &PendingRequest,
    chain_pem: &str,
    ca_pem: &str,
) -> Result<CertificateAuthority, String> {
    let key = pending.key.clone();
    let chain = certs_from_pem(chain_pem)
        .map_err(|e| format!("status.certificate is not PEM certificates: {e}"))?;
    let anchors = if ca_pem.trim().is_empty() {
        // No status.ca: the chain's last certificate, when it is a root.
        chain
            .last()
            .filter(|c| sigil_identity::x509::is_self_signed_der(c))
            .map(|c| vec![c.clone()])
            .unwrap_or_default()
    } else {
        certs_from_pem(ca_pem).map_err(|e| format!("status.ca is not PEM certificates: {e}"))?
    };
    if anchors.is_empty() {
        return Err(
            "the issuer returned no CA (status.ca is empty and the chain has no root), so Sigil has no root to publish; use an issuer that returns its CA"
                .into(),
        );
    }
    CertificateAuthority::from_signed_chain(policy.trust_domain.clone(), key, chain, anchors)
        .map_err(|e| e.to_string())
}

/// Destroys a CSR key that will never be used, when a key manager holds it (a software
/// key is simply dropped).
fn forget(keys: &crate::keys::Keys, key: &sigil_identity::key_manager::AuthorityKey) {
    if let Some(r) = key.reference()
        && let Err(e) = keys.destroy(r)
    {
        warn!(key = %r, error = %e, "cannot destroy an unused CSR key in the key manager");
    }
}

/// The `CertificateRequest` condition for a problem (or success without one).
fn condition_of(problem: Option<&Error>) -> (bool, String, String) {
    match problem {
        None => (true, "CertificateRequestIssued".into(), String::new()),
        Some(p) => (
            false,
            p.condition_reason()
                .unwrap_or("CertificateRequestError")
                .into(),
            p.to_string(),
        ),
    }
}

/// Whether the CertificateRequest resource exists on the API server.
async fn crd_present(api: &Api<DynamicObject>) -> Result<bool, Error> {
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What a refused call on CertificateRequests means for the TrustDomain: cert-manager is
/// not installed (404: no such resource), or the operator's RBAC lacks `verb` (403). Any
/// other error is the API server's own, returned as is.
fn request_api_problem(
    e: kube::Error,
    object: &str,
    namespace: &str,
    verb: &'static str,
) -> Result<Error, kube::Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(Error::CertManagerNotInstalled {
            object: object.to_owned(),
        }),
        kube::Error::Api(s) if s.code == 403 => Ok(Error::CertificateRequestForbidden {
            object: object.to_owned(),
            namespace: namespace.to_owned(),
            verb,
        }),
        e => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(v: serde_json::Value) -> RequestStatus {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn classify_reads_cert_managers_conditions() {
        assert_eq!(
            classify(&status(serde_json::json!({}))),
            RequestState::Pending {
                approved: false,
                message: None
            }
        );
        assert_eq!(
            classify(&status(serde_json::json!({"conditions": [
                {"type": "Approved", "status": "True", "reason": "cert-manager.io"},
                {"type": "Ready", "status": "False", "reason": "Pending", "message": "Referenced \"Issuer\" not found"}
            ]}))),
            RequestState::Pending {
                approved: true,
                message: Some("Referenced \"Issuer\" not found".into())
            }
        );
        assert_eq!(
            classify(&status(serde_json::json!({"conditions": [
                {"type": "Denied", "status": "True", "reason": "policy", "message": "no CAs here"},
                {"type": "Ready", "status": "False", "reason": "Denied"}
            ]}))),
            RequestState::Denied {
                reason: "policy".into(),
                message: "no CAs here".into()
            }
        );
        assert_eq!(
            classify(&status(serde_json::json!({"conditions": [
                {"type": "Approved", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "Failed", "message": "bad key"}
            ]}))),
            RequestState::Failed {
                reason: "Failed".into(),
                message: "bad key".into()
            }
        );
        // base64 of "PEM" and "CA"
        assert_eq!(
            classify(&status(serde_json::json!({
                "conditions": [
                    {"type": "Approved", "status": "True"},
                    {"type": "Ready", "status": "True", "reason": "Issued"}
                ],
                "certificate": "UEVN",
                "ca": "Q0E="
            }))),
            RequestState::Issued {
                chain_pem: "PEM".into(),
                ca_pem: "CA".into()
            }
        );
    }
}
