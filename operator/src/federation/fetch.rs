//! Fetching a foreign trust domain's bundle from its SPIFFE bundle endpoint
//! (SPIFFE_Federation.md), with no fallbacks:
//!
//! - `https_web`: the server's certificate must chain to the given roots (a CA bundle or
//!   the system's) and name the URL's host;
//! - `https_spiffe`: the server must present an X509-SVID for exactly the configured
//!   SPIFFE ID, verified against the bundle held for that ID's trust domain (the
//!   bootstrap bundle at first, then the latest fetched one);
//! - the trust domain comes from the FederatedBundle, never from the URL; a bundle whose CA
//!   certificates name another trust domain is refused; bundles are never merged;
//! - redirects are followed (at most [`MAX_REDIRECTS`]) under the same checks; responses are
//!   bounded ([`MAX_BODY`]) and the whole fetch has a deadline.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sigil_identity::tls::{Authorizer, SpiffeServerVerifier};
use sigil_identity::{BundleSet, SpiffeId, TrustBundle, TrustDomain};

/// Largest bundle document accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 3;

/// How the endpoint is authenticated.
#[derive(Debug, Clone)]
pub enum Profile {
    /// Web PKI: these roots, and the URL's host name.
    Web(Arc<rustls::RootCertStore>),
    /// SPIFFE: exactly this ID, verified with this bundle (of the ID's trust domain).
    Spiffe {
        /// The endpoint's SPIFFE ID.
        id: SpiffeId,
        /// The bundle that authenticates it.
        trust: TrustBundle,
    },
}

/// Why a fetch failed; [`FetchError::reason`] is the status reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Not an https URL we can use.
    #[error("bundle endpoint URL {0:?} is not usable: {1}")]
    Url(String, String),
    /// TCP connect failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The TLS handshake failed (wrong SPIFFE ID, untrusted or misnamed certificate...).
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    /// The endpoint answered with an error.
    #[error("bundle endpoint answered HTTP {0}")]
    Status(u16),
    /// Too many redirects, or a redirect to a non-https URL.
    #[error("redirect refused: {0}")]
    Redirect(String),
    /// The response exceeded [`MAX_BODY`].
    #[error("bundle document larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The deadline passed.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The document is not a valid SPIFFE bundle.
    #[error("invalid SPIFFE bundle: {0}")]
    Bundle(String),
    /// The bundle's CA certificates name another trust domain.
    #[error("the bundle's X.509 authorities belong to {found}, not {expected}")]
    TrustDomainMismatch {
        /// What the FederatedBundle says.
        expected: String,
        /// What the certificates say.
        found: String,
    },
    /// Any other HTTP failure.
    #[error("HTTP: {0}")]
    Http(String),
}

impl FetchError {
    /// Short reason for conditions and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Url(..) => "BadURL",
            FetchError::Connect(..) => "ConnectFailed",
            FetchError::Tls(..) => "TLSFailed",
            FetchError::Status(_) => "HTTPError",
            FetchError::Redirect(_) => "RedirectRefused",
            FetchError::TooLarge => "TooLarge",
            FetchError::Timeout(_) => "Timeout",
            FetchError::Bundle(_) => "InvalidBundle",
            FetchError::TrustDomainMismatch { .. } => "TrustDomainMismatch",
            FetchError::Http(_) => "HTTPError",
        }
    }
}

/// Fetches and validates `trust_domain`'s bundle from `url`, within `timeout`.
pub async fn fetch(
    url: &str,
    profile: &Profile,
    trust_domain: &TrustDomain,
    timeout: Duration,
) -> Result<TrustBundle, FetchError> {
    tokio::time::timeout(timeout, fetch_following(url, profile, trust_domain))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn fetch_following(
    url: &str,
    profile: &Profile,
    trust_domain: &TrustDomain,
) -> Result<TrustBundle, FetchError> {
    let mut url = url.to_owned();
    for _ in 0..=MAX_REDIRECTS {
        match get(&url, profile).await? {
            Answer::Body(body) => return parse(&body, trust_domain),
            Answer::Redirect(to) => {
                let next = resolve(&url, &to)?;
                tracing::info!(from = %url, to = %next, "bundle endpoint redirects");
                url = next;
            }
        }
    }
    Err(FetchError::Redirect(format!(
        "more than {MAX_REDIRECTS} redirects"
    )))
}

/// Whether a URL's authority carries userinfo (`user@` or `user:password@`), which
/// SPIFFE_Federation.md forbids in bundle endpoint URLs, redirect targets included.
pub fn has_userinfo(uri: &http::Uri) -> bool {
    uri.authority().is_some_and(|a| a.as_str().contains('@'))
}

fn resolve(base: &str, location: &str) -> Result<String, FetchError> {
    if location.starts_with("https://") {
        let uri: http::Uri = location
            .parse()
            .map_err(|e| FetchError::Redirect(format!("to {location:?}: {e}")))?;
        if has_userinfo(&uri) {
            return Err(FetchError::Redirect(format!(
                "to {location:?}: a bundle endpoint URL must not include userinfo"
            )));
        }
        return Ok(location.to_owned());
    }
    if location.starts_with("http://") || location.contains("://") {
        return Err(FetchError::Redirect(format!(
            "to {location:?}: only https is allowed"
        )));
    }
    let uri: http::Uri = base
        .parse()
        .map_err(|e| FetchError::Url(base.into(), format!("{e}")))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if location.starts_with('/') {
        Ok(format!("https://{authority}{location}"))
    } else {
        Err(FetchError::Redirect(format!(
            "relative location {location:?} is not supported"
        )))
    }
}

enum Answer {
    Body(Bytes),
    Redirect(String),
}

async fn get(url: &str, profile: &Profile) -> Result<Answer, FetchError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| FetchError::Url(url.into(), format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(FetchError::Url(
            url.into(),
            "the scheme must be https".into(),
        ));
    }
    if has_userinfo(&uri) {
        return Err(FetchError::Url(
            url.into(),
            "it must not include userinfo (user@ or user:password@)".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| FetchError::Url(url.into(), "no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let tls = client_config(profile).map_err(|e| FetchError::Tls(host.clone(), e))?;
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| FetchError::Url(url.into(), format!("host: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| FetchError::Connect(format!("{host}:{port}"), e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| FetchError::Tls(format!("{host}:{port}"), e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let host_header = if port == 443 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let req = http::Request::get(path)
        .header(http::header::HOST, host_header)
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("sigil-operator/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let status = response.status();
    if status.is_redirection() {
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| FetchError::Redirect("no Location header".into()))?;
        return Ok(Answer::Redirect(location.to_owned()));
    }
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    if response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY)
    {
        return Err(FetchError::TooLarge);
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                FetchError::TooLarge
            } else {
                FetchError::Http(e.to_string())
            }
        })?;
    Ok(Answer::Body(body.to_bytes()))
}

fn client_config(profile: &Profile) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = match profile {
        Profile::Web(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        Profile::Spiffe { id, trust } => {
            let mut set = BundleSet::new();
            set.upsert(trust.clone());
            let verifier = SpiffeServerVerifier::new(Arc::new(set), Authorizer::Exact(id.clone()));
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Parses a bundle document for `trust_domain` and checks it is one ([`check_bundle`]).
pub fn parse(body: &[u8], trust_domain: &TrustDomain) -> Result<TrustBundle, FetchError> {
    let bundle = TrustBundle::from_jwks_json(trust_domain.clone(), body)
        .map_err(|e| FetchError::Bundle(e.to_string()))?;
    check_bundle(&bundle)?;
    Ok(bundle)
}

/// What a foreign bundle must satisfy beyond its format: it holds keys, no X.509
/// authority appears twice, and no CA certificate names another trust domain in a
/// SPIFFE URI SAN.
pub fn check_bundle(bundle: &TrustBundle) -> Result<(), FetchError> {
    if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
        return Err(FetchError::Bundle("the bundle holds no keys".into()));
    }
    for (i, der) in bundle.x509_authorities.iter().enumerate() {
        if bundle.x509_authorities[..i].contains(der) {
            return Err(FetchError::Bundle(format!(
                "X.509 authority #{i} appears twice"
            )));
        }
        if let Some(found) = ca_trust_domain(der)
            && found != bundle.trust_domain
        {
            return Err(FetchError::TrustDomainMismatch {
                expected: bundle.trust_domain.to_string(),
                found: found.to_string(),
            });
        }
    }
    Ok(())
}

/// The trust domain a CA certificate names in its URI SAN (SPIFFE CAs carry
/// `spiffe://<td>`), if any.
fn ca_trust_domain(der: &[u8]) -> Option<TrustDomain> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u
                .strip_prefix("spiffe://")
                .map(|rest| rest.split('/').next().unwrap_or_default().to_owned()),
            _ => None,
        })
        .and_then(|td| TrustDomain::new(&td).ok())
}

/// The system's root CAs (for `https_web` without a CA bundle), read once per process.
pub fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            Arc::new(roots)
        })
        .clone()
}

/// Roots from PEM certificates.
pub fn roots_from_pem(pem: &str) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in sigil_identity::x509::certs_from_pem(pem).map_err(|e| e.to_string())? {
        roots.add(der.into()).map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(roots))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Deviation D2 of docs/conformance.md: a fetched document with no usable key is not
    /// taken (the held bundle stays), rather than revoking every key of the trust domain.
    #[test]
    fn a_bundle_with_no_usable_key_is_refused_and_the_held_one_kept() {
        let td = TrustDomain::new("partner.test").unwrap();
        for doc in [
            r#"{"keys": []}"#,
            r#"{"keys": [{"use": "wit-svid", "kty": "EC"}, {"use": "x509-svid", "kty": "EC", "x5c": []}]}"#,
        ] {
            let e = parse(doc.as_bytes(), &td).unwrap_err();
            assert_eq!(e.reason(), "InvalidBundle", "{doc}");
            assert!(e.to_string().contains("holds no keys"), "{e}");
        }
    }

    /// SPIFFE_Federation.md 5.2.1.4/5.2.2.4: a redirect is followed only to a valid bundle
    /// endpoint URL, which has no userinfo; a fetch of such a URL is refused before any
    /// connection.
    ///
    /// Before the fix: `https://user:pw@evil.test/` was followed (the test failed at
    /// "redirect with userinfo followed").
    #[tokio::test]
    async fn userinfo_is_refused_in_urls_and_redirects() {
        let e = resolve(
            "https://partner.test/bundle",
            "https://user:pw@evil.test/bundle",
        );
        assert!(
            matches!(&e, Err(FetchError::Redirect(m)) if m.contains("userinfo")),
            "redirect with userinfo followed: {e:?}"
        );
        assert_eq!(
            resolve("https://partner.test/a", "https://cdn.test/b").unwrap(),
            "https://cdn.test/b"
        );
        let td = TrustDomain::new("partner.test").unwrap();
        let e = fetch(
            "https://user@127.0.0.1:1/bundle",
            &Profile::Web(Arc::new(rustls::RootCertStore::empty())),
            &td,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, FetchError::Url(_, m) if m.contains("userinfo")),
            "{e:?}"
        );
    }
}
