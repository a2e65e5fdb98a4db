//! Reading the upstream CA Secret (`spec.upstreamAuthority.secretRef`) into an
//! [`UpstreamAuthority`], with one precise error per way it can be wrong.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use sigil_identity::ca::UpstreamAuthority;

use super::error::Error;
use crate::crd::trust_domain::UpstreamSecretRef;

/// Turns the upstream Secret (`None` when it does not exist) into a usable upstream CA
/// that outlives a CA of `ca_ttl` issued at `now`.
pub fn load(
    object: &str,
    r: &UpstreamSecretRef,
    namespace: &str,
    secret: Option<&Secret>,
    now: SystemTime,
    ca_ttl: Duration,
) -> Result<UpstreamAuthority, Error> {
    let Some(secret) = secret else {
        return Err(Error::UpstreamSecretNotFound {
            object: object.into(),
            namespace: namespace.into(),
            name: r.name.clone(),
        });
    };
    let entry = |key: &str| -> Option<String> {
        let raw = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.clone().into_bytes())
            })?;
        let text = String::from_utf8(raw).ok()?;
        (!text.trim().is_empty()).then_some(text)
    };
    let missing =
        |key: &str, field: &'static str, what: &'static str| Error::UpstreamSecretMissingKey {
            object: object.into(),
            namespace: namespace.into(),
            name: r.name.clone(),
            key: key.into(),
            field,
            what,
        };
    let cert = entry(&r.certificate_key)
        .ok_or_else(|| missing(&r.certificate_key, "certificateKey", "CA certificate"))?;
    let key = zeroize::Zeroizing::new(
        entry(&r.private_key_key)
            .ok_or_else(|| missing(&r.private_key_key, "privateKeyKey", "CA private key"))?,
    );
    let chain = entry(&r.chain_key);
    let upstream_error = |source| Error::Upstream {
        object: object.into(),
        namespace: namespace.into(),
        name: r.name.clone(),
        source,
    };
    let upstream =
        UpstreamAuthority::from_pem(&cert, &key, chain.as_deref()).map_err(upstream_error)?;
    upstream
        .check_lifetime(now, ca_ttl)
        .map_err(upstream_error)?;
    Ok(upstream)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use sigil_e2e::pki::UpstreamPki;

    use super::*;

    /// A test PKI: root → intermediate, as PEM ([`sigil_e2e::pki::upstream_pki`]).
    pub(crate) fn pki(valid_for: time::Duration, intermediate_is_ca: bool) -> UpstreamPki {
        sigil_e2e::pki::upstream_pki(valid_for, intermediate_is_ca).unwrap()
    }

    fn secret(entries: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn reference() -> UpstreamSecretRef {
        serde_json::from_value(serde_json::json!({"name": "upstream"})).unwrap()
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn each_way_of_being_wrong_has_its_reason() {
        let now = SystemTime::now();
        let good = pki(time::Duration::days(30), true);
        let r = reference();
        let reason = |s: Option<&Secret>| {
            load("td", &r, "pki", s, now, DAY)
                .unwrap_err()
                .condition_reason()
                .unwrap()
        };
        assert_eq!(reason(None), "UpstreamSecretNotFound");
        assert_eq!(
            reason(Some(&secret(&[("tls.crt", &good.intermediate_pem)]))),
            "UpstreamSecretMissingKey"
        );
        let not_ca = pki(time::Duration::days(30), false);
        assert_eq!(
            reason(Some(&secret(&[
                ("tls.crt", &not_ca.intermediate_pem),
                ("tls.key", &not_ca.intermediate_key_pem),
                ("ca.crt", &not_ca.root_pem)
            ]))),
            "UpstreamNotCA"
        );
        let other = pki(time::Duration::days(30), true);
        assert_eq!(
            reason(Some(&secret(&[
                ("tls.crt", &good.intermediate_pem),
                ("tls.key", &other.intermediate_key_pem),
                ("ca.crt", &good.root_pem)
            ]))),
            "UpstreamKeyMismatch"
        );
        let expired = pki(time::Duration::hours(-1), true);
        assert_eq!(
            reason(Some(&secret(&[
                ("tls.crt", &expired.intermediate_pem),
                ("tls.key", &expired.intermediate_key_pem),
                ("ca.crt", &expired.root_pem)
            ]))),
            "UpstreamExpired"
        );
        let short = pki(time::Duration::hours(12), true);
        let e = load(
            "td",
            &r,
            "pki",
            Some(&secret(&[
                ("tls.crt", &short.intermediate_pem),
                ("tls.key", &short.intermediate_key_pem),
                ("ca.crt", &short.root_pem),
            ])),
            now,
            DAY,
        )
        .unwrap_err();
        assert_eq!(e.condition_reason(), Some("UpstreamExpiresTooSoon"), "{e}");
        assert_eq!(
            reason(Some(&secret(&[
                ("tls.crt", &good.intermediate_pem),
                ("tls.key", &good.intermediate_key_pem)
            ]))),
            "UpstreamChainInvalid"
        );
        let ok = load(
            "td",
            &r,
            "pki",
            Some(&secret(&[
                ("tls.crt", &good.intermediate_pem),
                ("tls.key", &good.intermediate_key_pem),
                ("ca.crt", &good.root_pem),
            ])),
            now,
            DAY,
        )
        .unwrap();
        assert_eq!(ok.roots().len(), 1);
    }
}
