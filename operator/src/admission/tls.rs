//! The webhook's certificate: a private CA and a serving certificate signed by it, kept in
//! a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`) that the first replica
//! creates and every replica reads, and the CA written into the
//! ValidatingWebhookConfiguration's `caBundle` by every replica (the same value, so they
//! never fight). The serving certificate lasts [`LEAF_LIFETIME`]; a replica that finds
//! less than [`RENEW_BEFORE`] left, or a Secret it cannot use, makes a new pair and
//! replaces the Secret (conditional on the version it read: one replica wins, the others
//! re-read). Every [`RECHECK`], each replica re-reads the Secret, reloads the certificate
//! when it changed, and puts the `caBundle` back if something removed it.

use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use sigil_identity::tls::SwappableCert;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a serving certificate lasts.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the CA lasts.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A serving certificate with less than this left is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often each replica re-reads the Secret and the webhook configuration.
pub const RECHECK: Duration = Duration::from_secs(600);

/// A CA and a serving certificate, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    /// The serving certificate (leaf only).
    pub cert_pem: String,
    /// Its key, PKCS#8.
    pub key_pem: String,
    /// The CA the API server trusts (`caBundle`).
    pub ca_pem: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

impl Pair {
    /// A new CA and a serving certificate for `names` (DNS names or IP addresses).
    pub fn generate(names: &[String], now: SystemTime) -> Result<Pair, rcgen::Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let now = time::OffsetDateTime::from(now);
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "sigil admission webhook CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = now - time::Duration::minutes(5);
        ca.not_after = now + CA_LIFETIME;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(names.to_vec())?;
        leaf.distinguished_name
            .push(DnType::CommonName, "sigil admission webhook");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.not_before = now - time::Duration::minutes(5);
        leaf.not_after = now + LEAF_LIFETIME;
        let cert = leaf.signed_by(&key, &issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: ca_cert.pem(),
        })
    }

    fn from_secret(s: &Secret) -> Option<Pair> {
        let get = |k: &str| {
            s.data
                .as_ref()?
                .get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        Some(Pair {
            cert_pem: get("tls.crt")?,
            key_pem: get("tls.key")?,
            ca_pem: get("ca.crt")?,
        })
    }

    fn data(&self) -> std::collections::BTreeMap<String, ByteString> {
        [
            ("tls.crt", &self.cert_pem),
            ("tls.key", &self.key_pem),
            ("ca.crt", &self.ca_pem),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }

    /// Why this pair cannot serve `names` until `now + RENEW_BEFORE`, if it cannot.
    pub fn unusable(&self, names: &[String], now: SystemTime) -> Option<String> {
        let certs = match sigil_identity::x509::certs_from_pem(&self.cert_pem) {
            Ok(c) if !c.is_empty() => c,
            _ => return Some("tls.crt holds no certificate".into()),
        };
        if SwappableCert::new()
            .set_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
            .is_err()
        {
            return Some("tls.key does not match tls.crt".into());
        }
        let Ok((_, leaf)) = x509_parser::parse_x509_certificate(&certs[0]) else {
            return Some("tls.crt is not a certificate".into());
        };
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64);
        if not_after < now + RENEW_BEFORE {
            return Some("the serving certificate expires within 30 days".into());
        }
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                        x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                            4 => <[u8; 4]>::try_from(*ip)
                                .ok()
                                .map(|b| std::net::IpAddr::from(b).to_string()),
                            16 => <[u8; 16]>::try_from(*ip)
                                .ok()
                                .map(|b| std::net::IpAddr::from(b).to_string()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(missing) = names.iter().find(|n| !sans.contains(n)) {
            return Some(format!("the serving certificate does not name {missing}"));
        }
        None
    }
}

/// Loads and keeps the webhook's certificate and the configuration's `caBundle`.
#[derive(Clone)]
pub struct Keeper {
    /// The API client.
    pub client: kube::Client,
    /// The operator's namespace (the Secret's).
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// Names in the serving certificate.
    pub names: Vec<String>,
    /// The ValidatingWebhookConfiguration's name.
    pub webhook_configuration: String,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("namespace", &self.namespace)
            .field("secret", &self.secret)
            .field("names", &self.names)
            .field("webhook_configuration", &self.webhook_configuration)
            .finish_non_exhaustive()
    }
}

impl Keeper {
    /// The Secret's pair, made (or replaced) when missing or unusable.
    pub async fn pair(&self) -> anyhow::Result<Pair> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let what = format!("Secret {}/{}", self.namespace, self.secret);
        for _ in 0..5 {
            let current = secrets
                .get_opt(&self.secret)
                .await
                .map_err(|e| anyhow::anyhow!("read the admission webhook's {what}: {e}"))?;
            let why = match &current {
                None => "it does not exist".to_owned(),
                Some(s) => match Pair::from_secret(s) {
                    None => "it lacks tls.crt, tls.key or ca.crt".to_owned(),
                    Some(p) => match p.unusable(&self.names, SystemTime::now()) {
                        None => return Ok(p),
                        Some(why) => why,
                    },
                },
            };
            let pair = Pair::generate(&self.names, SystemTime::now())
                .map_err(|e| anyhow::anyhow!("make the admission webhook's certificate: {e}"))?;
            let mut secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": self.secret, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "sigil-operator"}},
                "type": "kubernetes.io/tls",
            }))?;
            secret.data = Some(pair.data());
            let written = match current {
                None => secrets.create(&PostParams::default(), &secret).await,
                Some(old) => {
                    secret.metadata.resource_version = old.metadata.resource_version;
                    secrets
                        .replace(&self.secret, &PostParams::default(), &secret)
                        .await
                }
            };
            match written {
                Ok(_) => {
                    info!(secret = %what, reason = %why, "made a new admission webhook certificate");
                    return Ok(pair);
                }
                // Another replica wrote it first: read theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => {
                    anyhow::bail!(
                        "write the admission webhook's {what} ({why}): {e}; the operator needs create/update on Secrets in its namespace"
                    )
                }
            }
        }
        anyhow::bail!("the admission webhook's {what} kept changing under us; retry")
    }

    /// Sets `caBundle` on every webhook of the configuration to `ca_pem` where it
    /// differs. A missing configuration is a warning (the webhook is then simply not
    /// called); returns whether anything was written.
    pub async fn inject_ca(&self, ca_pem: &str) -> anyhow::Result<bool> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        let name = &self.webhook_configuration;
        for _ in 0..5 {
            let Some(mut vwc) = api
                .get_opt(name)
                .await
                .map_err(|e| anyhow::anyhow!("read ValidatingWebhookConfiguration {name}: {e}"))?
            else {
                warn!(configuration = %name, "ValidatingWebhookConfiguration not found: the API server will not call the admission webhook (--admission-webhook-configuration)");
                return Ok(false);
            };
            let want = ByteString(ca_pem.as_bytes().to_vec());
            let mut changed = false;
            for w in vwc.webhooks.iter_mut().flatten() {
                if w.client_config.ca_bundle.as_ref() != Some(&want) {
                    w.client_config.ca_bundle = Some(want.clone());
                    changed = true;
                }
            }
            if !changed {
                return Ok(false);
            }
            match api.replace(name, &PostParams::default(), &vwc).await {
                Ok(_) => {
                    info!(configuration = %name, "admission webhook caBundle set");
                    return Ok(true);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => anyhow::bail!(
                    "set caBundle on ValidatingWebhookConfiguration {name}: {e}; the operator needs get/update on it"
                ),
            }
        }
        anyhow::bail!("ValidatingWebhookConfiguration {name} kept changing under us")
    }

    /// Loads the certificate into `cert` and sets the `caBundle`.
    pub async fn load(&self, cert: &SwappableCert) -> anyhow::Result<Pair> {
        let pair = self.pair().await?;
        cert.set_pem(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("load the admission webhook's certificate: {e}"))?;
        self.inject_ca(&pair.ca_pem).await?;
        Ok(pair)
    }

    /// Every [`RECHECK`] until `cancel`: [`Keeper::load`] again (errors are logged, the
    /// current certificate keeps serving).
    pub async fn keep(self, cert: std::sync::Arc<SwappableCert>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(RECHECK) => {}
            }
            if let Err(e) = self.load(&cert).await {
                warn!(error = %format!("{e:#}"), "admission webhook certificate check failed; serving the current one");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_pair_serves_its_names_and_an_old_or_foreign_one_is_replaced() {
        let names = vec![
            "sigil-operator.sigil.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let now = SystemTime::now();
        let pair = Pair::generate(&names, now).unwrap();
        assert_eq!(pair.unusable(&names, now), None);
        assert!(
            pair.unusable(&names, now + LEAF_LIFETIME - RENEW_BEFORE / 2)
                .unwrap()
                .contains("expires")
        );
        let other = vec!["sigil-operator.other.svc".to_owned()];
        assert!(
            pair.unusable(&other, now)
                .unwrap()
                .contains("does not name")
        );
        let mut mixed = pair.clone();
        mixed.key_pem = Pair::generate(&names, now).unwrap().key_pem;
        assert!(
            mixed
                .unusable(&names, now)
                .unwrap()
                .contains("does not match")
        );
        assert!(!format!("{pair:?}").contains("PRIVATE"), "no key in Debug");
    }
}
