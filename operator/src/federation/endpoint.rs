//! Our side of federation: the SPIFFE bundle endpoint (SPIFFE_Federation.md section 4) and
//! OIDC discovery for JWT-SVIDs.
//!
//! - `GET /` answers the trust domain's current bundle: the SPIFFE bundle format (JWK
//!   Set) with `spiffe_sequence` and `spiffe_refresh_hint`, straight from this replica's
//!   loaded authority, so a CA or JWT key rotation is served the moment it is loaded.
//! - `GET <issuer path>/.well-known/openid-configuration` and `GET <issuer path>/keys`
//!   answer OIDC discovery for the issuer set in the TrustDomain's `spec.jwt.issuer`
//!   (the `iss` of its JWT-SVIDs), so cloud IAM (AWS, GCP, Azure) can trust JWT-SVIDs.
//!   `/keys` holds the JWT authorities only, each with `use: sig` and its `alg`.
//!
//! Served over TLS under one profile: `https_spiffe` (an X509-SVID
//! `spiffe://<td>/sigil/bundle-endpoint` this replica issues itself) or `https_web` (a
//! certificate and key from files, e.g. a mounted cert-manager Secret, reloaded when they
//! change). No client authentication. OIDC discovery can also be served over plain HTTP
//! on its own address, for an ingress that terminates TLS.
//!
//! Bounds: TLS handshakes and request headers have deadlines, headers are at most 16 KiB,
//! request bodies are never read, each connection lives at most a minute, and only GET and
//! HEAD are answered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use sigil_identity::TrustDomain;
use sigil_identity::clock::SharedClock;
use sigil_identity::tls::SwappableCert;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::authority::{Authorities, DomainAuthority};
use crate::telemetry::{EndpointLabels, FederationMetrics, ReadyHandle};

/// Longest a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one connection is kept.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How often `https_web` certificate files are checked for changes.
pub const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// How the bundle endpoint authenticates itself.
#[derive(Debug, Clone)]
pub enum EndpointTls {
    /// `https_spiffe`: an X509-SVID for `spiffe://<td>/sigil/bundle-endpoint`.
    Spiffe {
        /// Lifetime of that SVID (renewed at half-life).
        svid_ttl: Duration,
    },
    /// `https_web`: a certificate chain and key in PEM files.
    Web {
        /// Certificate chain (leaf first).
        cert_file: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key_file: PathBuf,
    },
}

/// What the endpoint serves.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The trust domain whose bundle is served.
    pub trust_domain: TrustDomain,
    /// The TLS profile.
    pub tls: EndpointTls,
}

#[derive(Debug)]
struct State {
    trust_domain: TrustDomain,
    authorities: Arc<Authorities>,
    metrics: FederationMetrics,
}

/// Which routes a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routes {
    /// Bundle and OIDC discovery (the TLS listener).
    All,
    /// OIDC discovery only (the plain HTTP listener).
    OidcOnly,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves the bundle endpoint on `listener` until `cancel`. `ready` turns ready once a
/// serving certificate is in place.
pub async fn serve(
    listener: TcpListener,
    config: EndpointConfig,
    authorities: Arc<Authorities>,
    clock: SharedClock,
    metrics: FederationMetrics,
    ready: Option<ReadyHandle>,
    cancel: CancellationToken,
) -> Result<(), BoxError> {
    let cert = SwappableCert::new();
    let keeper = match &config.tls {
        EndpointTls::Spiffe { svid_ttl } => tokio::spawn(crate::serving::keep_serving_svid(
            "bundle-endpoint",
            authorities.clone(),
            config.trust_domain.clone(),
            crate::serving::BUNDLE_ENDPOINT_PATH,
            *svid_ttl,
            cert.clone(),
            clock,
            ready,
            cancel.clone(),
        )),
        EndpointTls::Web {
            cert_file,
            key_file,
        } => {
            load_cert_files(&cert, cert_file, key_file).map_err(|e| {
                format!(
                    "bundle endpoint certificate {} / key {}: {e}",
                    cert_file.display(),
                    key_file.display()
                )
            })?;
            if let Some(r) = &ready {
                r.set_ready();
            }
            tokio::spawn(reload_cert_files(
                cert.clone(),
                cert_file.clone(),
                key_file.clone(),
                cancel.clone(),
            ))
        }
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    info!(
        addr = ?listener.local_addr().ok(),
        trust_domain = %config.trust_domain,
        profile = match config.tls { EndpointTls::Spiffe { .. } => "https_spiffe", EndpointTls::Web { .. } => "https_web" },
        "bundle endpoint listening"
    );
    let state = Arc::new(State {
        trust_domain: config.trust_domain,
        authorities,
        metrics,
    });
    let mut incoming =
        crate::tls_listener::incoming("bundle-endpoint", listener, Arc::new(tls), cancel.clone());
    while let Some(conn) = tokio::select! {
        () = cancel.cancelled() => None,
        c = incoming.next() => c,
    } {
        match conn {
            Ok(stream) => spawn_connection(stream, state.clone(), Routes::All),
            Err(e) => warn!(error = %e, "bundle endpoint connection failed"),
        }
    }
    keeper.abort();
    Ok(())
}

/// Serves OIDC discovery only, over plain HTTP (behind an ingress that terminates TLS).
pub async fn serve_oidc_http(
    listener: TcpListener,
    trust_domain: TrustDomain,
    authorities: Arc<Authorities>,
    metrics: FederationMetrics,
    cancel: CancellationToken,
) -> Result<(), BoxError> {
    info!(addr = ?listener.local_addr().ok(), trust_domain = %trust_domain, "OIDC discovery listening (plain HTTP)");
    let state = Arc::new(State {
        trust_domain,
        authorities,
        metrics,
    });
    loop {
        let (tcp, _) = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "OIDC discovery accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        spawn_connection(tcp, state.clone(), Routes::OidcOnly);
    }
}

fn spawn_connection<S>(stream: S, state: Arc<State>, routes: Routes)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(16);
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&state, routes, &req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
    });
}

fn handle(state: &State, routes: Routes, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let authority = state.authorities.get(&state.trust_domain);
    let (label, response) = route(state, authority.as_deref(), routes, req);
    state
        .metrics
        .endpoint_requests
        .get_or_create(&EndpointLabels {
            path: label.into(),
            code: response.status().as_u16(),
        })
        .inc();
    if response.status().is_client_error() || response.status().is_server_error() {
        info!(method = %req.method(), path = %req.uri().path(), status = response.status().as_u16(), "bundle endpoint refused a request");
    }
    if req.method() == Method::HEAD {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Full::new(Bytes::new()));
    }
    response
}

fn route(
    state: &State,
    authority: Option<&DomainAuthority>,
    routes: Routes,
    req: &Request<Incoming>,
) -> (&'static str, Response<Full<Bytes>>) {
    let path = req.uri().path();
    let issuer_path = authority
        .and_then(|a| a.jwt_issuer.as_deref())
        .and_then(|i| i.parse::<http::Uri>().ok())
        .map(|u| u.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let local = path.strip_prefix(issuer_path.as_str()).unwrap_or(path);
    let label = match (routes, path, local) {
        (Routes::All, "/", _) => "bundle",
        (_, _, "/.well-known/openid-configuration") => "openid-configuration",
        (_, _, "/keys") => "keys",
        _ => "other",
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return (label, r);
    }
    if label == "other" {
        return (
            label,
            text(
                StatusCode::NOT_FOUND,
                "not found: the bundle is served at /, OIDC discovery at /.well-known/openid-configuration and /keys\n",
            ),
        );
    }
    let Some(authority) = authority else {
        return (
            label,
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "trust domain {} has no CA loaded yet; retry shortly\n",
                    state.trust_domain
                ),
            ),
        );
    };
    let response = match label {
        "bundle" => json(authority.bundle.to_jwks_json()),
        _ => match authority.jwt_issuer.as_deref() {
            None => text(
                StatusCode::NOT_FOUND,
                &format!(
                    "OIDC discovery is off for trust domain {}: set spec.jwt.issuer on TrustDomain {} to the public https URL this endpoint is reachable at\n",
                    state.trust_domain, authority.object_name
                ),
            ),
            Some(_) if label == "keys" => json(oidc_keys(authority).to_string()),
            Some(issuer) => json(oidc_configuration(issuer, authority).to_string()),
        },
    };
    (label, response)
}

/// The OIDC discovery document for `issuer`.
pub fn oidc_configuration(issuer: &str, authority: &DomainAuthority) -> serde_json::Value {
    let issuer = issuer.trim_end_matches('/');
    let mut algs: Vec<&str> = authority
        .bundle
        .jwt_authorities
        .iter()
        .filter_map(|a| jwk_alg(&a.jwk))
        .collect();
    algs.sort_unstable();
    algs.dedup();
    serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/keys"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
    })
}

/// The JWT authorities as an OIDC JWK Set (`use: sig`, with `alg`).
pub fn oidc_keys(authority: &DomainAuthority) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = authority
        .bundle
        .jwt_authorities
        .iter()
        .filter_map(|a| {
            let mut v = serde_json::to_value(&a.jwk).ok()?;
            let o = v.as_object_mut()?;
            o.insert("use".into(), "sig".into());
            o.insert("kid".into(), a.kid.clone().into());
            if let Some(alg) = jwk_alg(&a.jwk) {
                o.insert("alg".into(), alg.into());
            }
            Some(v)
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

/// The algorithm a JWT key signs with: the `alg` its JWK carries (Sigil's own keys always
/// do: an RSA key may be RS256 or PS256), else what its curve implies.
fn jwk_alg(jwk: &sigil_identity::bundle::Jwk) -> Option<&str> {
    if let Some(alg) = jwk.alg.as_deref() {
        return Some(alg);
    }
    match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("EC", Some("P-256")) => Some("ES256"),
        ("EC", Some("P-384")) => Some("ES384"),
        ("RSA", _) => Some("RS256"),
        ("OKP", Some("Ed25519")) => Some("EdDSA"),
        _ => None,
    }
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn load_cert_files(
    cert: &SwappableCert,
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<(), String> {
    let chain =
        std::fs::read(cert_file).map_err(|e| format!("read {}: {e}", cert_file.display()))?;
    let key = std::fs::read(key_file).map_err(|e| format!("read {}: {e}", key_file.display()))?;
    cert.set_pem(&chain, &key).map_err(|e| e.to_string())
}

fn modified(paths: [&std::path::Path; 2]) -> Option<[SystemTime; 2]> {
    let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some([m(paths[0])?, m(paths[1])?])
}

/// Reloads the `https_web` certificate when its files change (a mounted Secret is
/// replaced through a symlink swap, so modification times move). A broken pair is
/// reported and the previous certificate kept.
async fn reload_cert_files(
    cert: Arc<SwappableCert>,
    cert_file: PathBuf,
    key_file: PathBuf,
    cancel: CancellationToken,
) {
    let mut seen = modified([&cert_file, &key_file]);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(CERT_RELOAD_INTERVAL) => {}
        }
        let now = modified([&cert_file, &key_file]);
        if now == seen {
            continue;
        }
        match load_cert_files(&cert, &cert_file, &key_file) {
            Ok(()) => {
                info!(cert = %cert_file.display(), "bundle endpoint certificate reloaded");
                seen = now;
            }
            Err(e) => {
                warn!(cert = %cert_file.display(), error = %e, "bundle endpoint certificate files changed but cannot be used; keeping the previous certificate")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sigil_identity::TrustBundle;
    use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority};
    use sigil_identity::jwt::{JwtKey, SigningAlg};
    use sigil_identity::keys::KeyType;

    use super::*;

    /// A trust domain whose active key signs `active` and whose prepared key `prepared`.
    fn authority(
        active: (KeyType, SigningAlg),
        prepared: (KeyType, SigningAlg),
    ) -> DomainAuthority {
        let td = TrustDomain::new("example.org").unwrap();
        let now = SystemTime::now();
        let ca = CertificateAuthority::new_self_signed(
            &CaParams {
                trust_domain: td.clone(),
                key_type: KeyType::EcP256,
                ttl: Duration::from_secs(3600),
                subject: CaSubject::default(),
            },
            now,
        )
        .unwrap();
        let key =
            |(t, a)| JwtKey::generate_for(t, Some(a), now + Duration::from_secs(3600)).unwrap();
        let (active, prepared) = (key(active), key(prepared));
        let mut bundle = TrustBundle::new(td.clone());
        bundle.x509_authorities = vec![ca.certificate().to_vec()];
        bundle.jwt_authorities = vec![active.authority(), prepared.authority()];
        DomainAuthority {
            trust_domain: td,
            object_name: "td".into(),
            x509_ca: Arc::new(ca),
            jwt_key: Arc::new(active),
            bundle,
            x509_svid_ttl: Duration::from_secs(3600),
            jwt_svid_ttl: Duration::from_secs(300),
            jwt_issuer: Some("https://oidc.example.org".into()),
        }
    }

    #[test]
    fn discovery_and_keys_name_each_rsa_keys_algorithm() {
        let a = authority(
            (KeyType::Rsa2048, SigningAlg::Rs256),
            (KeyType::Rsa2048, SigningAlg::Ps256),
        );
        let config = oidc_configuration("https://oidc.example.org/", &a);
        assert_eq!(
            config["id_token_signing_alg_values_supported"],
            serde_json::json!(["PS256", "RS256"])
        );
        let keys = oidc_keys(&a);
        let keys = keys["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        for (k, alg) in keys.iter().zip(["RS256", "PS256"]) {
            assert_eq!(k["kty"], "RSA");
            assert_eq!(k["alg"], alg);
            assert_eq!(k["use"], "sig");
            assert!(k["n"].as_str().is_some_and(|n| n.len() > 300), "{k}");
            assert_eq!(k["e"], "AQAB");
            assert!(k["kid"].is_string());
        }
        // Today's default, unchanged: one ES256 key.
        let a = authority(
            (KeyType::EcP256, SigningAlg::Es256),
            (KeyType::EcP256, SigningAlg::Es256),
        );
        assert_eq!(
            oidc_configuration("https://oidc.example.org", &a)["id_token_signing_alg_values_supported"],
            serde_json::json!(["ES256"])
        );
    }
}
