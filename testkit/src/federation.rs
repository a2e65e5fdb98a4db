//! A foreign trust domain for federation tests: its CA and JWT key, and a bundle endpoint
//! on loopback whose answers a test switches at will (good bundle, wrong SPIFFE ID, hang,
//! huge body, garbage...). It stands in for a peer's bundle endpoint; the SPIRE interop
//! test in e2e/ uses a real one.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sigil_identity::ca::{CaParams, CaSubject, CertificateAuthority, SvidTemplate};
use sigil_identity::jwt::JwtKey;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::tls::SwappableCert;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};

/// A foreign trust domain: CAs (newest last) and a JWT key.
pub struct Foreign {
    pub td: TrustDomain,
    pub cas: Vec<CertificateAuthority>,
    pub jwt: JwtKey,
    pub sequence: u64,
    pub refresh_hint: Duration,
}

impl Foreign {
    pub fn new(td: &str) -> Self {
        let td: TrustDomain = td.parse().unwrap();
        Self {
            cas: vec![ca(&td)],
            jwt: JwtKey::generate(
                KeyType::EcP256,
                SystemTime::now() + Duration::from_secs(86_400),
            )
            .unwrap(),
            td,
            sequence: 1,
            refresh_hint: Duration::from_secs(1),
        }
    }

    /// Adds a new CA (the old one stays in the bundle), as a rotation does.
    pub fn rotate(&mut self) {
        self.cas.push(ca(&self.td));
        self.sequence += 1;
    }

    pub fn bundle(&self) -> TrustBundle {
        let mut b = TrustBundle::new(self.td.clone());
        b.x509_authorities = self.cas.iter().map(|c| c.certificate().to_vec()).collect();
        b.jwt_authorities = vec![self.jwt.authority()];
        b.sequence = Some(self.sequence);
        b.refresh_hint = Some(self.refresh_hint);
        b
    }

    pub fn bundle_json(&self) -> String {
        self.bundle().to_jwks_json()
    }

    /// An X509-SVID for `path`, signed by the newest CA.
    pub fn svid(&self, path: &str) -> (Vec<Vec<u8>>, PrivateKey) {
        let id = self.td.id(path).unwrap();
        svid(self.cas.last().unwrap(), &id)
    }
}

pub fn ca(td: &TrustDomain) -> CertificateAuthority {
    CertificateAuthority::new_self_signed(
        &CaParams {
            trust_domain: td.clone(),
            key_type: KeyType::EcP256,
            ttl: Duration::from_secs(86_400),
            subject: CaSubject::default(),
        },
        SystemTime::now(),
    )
    .unwrap()
}

pub fn svid(ca: &CertificateAuthority, id: &SpiffeId) -> (Vec<Vec<u8>>, PrivateKey) {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let template = SvidTemplate {
        spiffe_id: id,
        ttl: Duration::from_secs(3600),
        dns_names: &[],
    };
    // A /sigil path is a Sigil component's (a partner Sigil's bundle endpoint).
    let issued = if id.is_reserved() {
        ca.sign_component(&key.public_key_der(), &template, SystemTime::now())
    } else {
        ca.sign_public_key(&key.public_key_der(), &template, SystemTime::now())
    }
    .unwrap();
    (issued.chain(), key)
}

/// What the fake endpoint answers.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with this body at every path.
    Serve(String),
    /// Accept the request and never answer.
    Hang,
    /// 200 with a chunked body of this many bytes (no Content-Length).
    Huge(usize),
    /// `/` redirects to `location`; every other path serves the body.
    Redirect { location: String, body: String },
    /// This status, empty body.
    Status(u16),
}

pub struct FakeEndpoint {
    /// `https://<host>:<port>`.
    pub url: String,
    pub port: u16,
    pub cert: Arc<SwappableCert>,
    behaviour: Arc<Mutex<Behaviour>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEndpoint {
    /// Listens on 127.0.0.1; `host` goes into the URL (`127.0.0.1` or `localhost`).
    pub async fn start(host: &str, behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cert = SwappableCert::new();
        let mut tls = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (behaviour.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, b, h) = (acceptor.clone(), b.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let behaviour = b.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                answer(behaviour, req.uri().path()).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://{host}:{port}"),
            port,
            cert,
            behaviour,
            hits,
            task,
        }
    }

    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn answer(b: Behaviour, path: &str) -> http::Response<Body> {
    let full = |s: String| Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed();
    match b {
        Behaviour::Serve(body) => http::Response::new(full(body)),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            http::Response::new(full(String::new()))
        }
        Behaviour::Huge(n) => {
            let chunk = Bytes::from(vec![b' '; 32 * 1024]);
            let chunks = n.div_ceil(chunk.len());
            let stream = futures::stream::iter(0..chunks)
                .map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone())));
            http::Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        Behaviour::Redirect { location, body } => {
            if path == "/" {
                http::Response::builder()
                    .status(302)
                    .header("location", location)
                    .body(full(String::new()))
                    .unwrap()
            } else {
                http::Response::new(full(body))
            }
        }
        Behaviour::Status(code) => http::Response::builder()
            .status(code)
            .body(full(String::new()))
            .unwrap(),
    }
}

/// A bundle document whose only X.509 authority appears twice.
pub fn duplicate_key_bundle(f: &Foreign) -> String {
    let cert = base64::engine::general_purpose::STANDARD.encode(f.cas[0].certificate());
    json!({"keys": [
        {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [cert]},
        {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [cert]},
    ], "spiffe_sequence": 99})
    .to_string()
}

/// A bundle document with an unparsable X.509 authority.
pub fn garbage_key_bundle() -> String {
    json!({"keys": [
        {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": ["bm90IGEgY2VydGlmaWNhdGU="]},
    ], "spiffe_sequence": 99})
    .to_string()
}
