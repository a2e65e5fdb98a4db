//! The kubelet pod source against a fake kubelet: a real kubelet cannot run here (no
//! container runtime), so a small HTTPS server serves `/pods` the way the kubelet does,
//! with its own serving certificate and a bearer-token check. What is tested is our side:
//! TLS verification, the token, on-demand listing when attestation misses a pod, and
//! refusal of a server we do not trust.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use sigil_agent::attest::k8s::{K8sAttestError, PodSource, find_container};
use sigil_agent::attest::kubelet::{KubeletConfig, KubeletError, KubeletPodSource, list};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "agent-token";

struct FakeKubelet {
    address: String,
    ca_pem: String,
    pods: Arc<Mutex<Vec<serde_json::Value>>>,
    lists: Arc<Mutex<u32>>,
}

fn pod(uid: &str, container_id: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": "web", "namespace": "default", "uid": uid},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "main", "image": "img"}]},
        "status": {"containerStatuses": [{"name": "main", "image": "img", "imageID": "img@sha256:00", "ready": true,
            "restartCount": 0, "containerID": format!("containerd://{container_id}")}]},
    })
}

async fn fake_kubelet() -> FakeKubelet {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["node-a".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let pods: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let lists: Arc<Mutex<u32>> = Arc::default();
    let (p, l) = (pods.clone(), lists.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, pods, lists) = (acceptor.clone(), p.clone(), l.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (pods, lists) = (pods.clone(), lists.clone());
                    async move {
                        let authorized = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            == Some(&format!("Bearer {TOKEN}"));
                        let (status, body) = if !authorized {
                            (401, "Unauthorized".to_owned())
                        } else if req.uri().path() != "/pods" {
                            (404, "not found".to_owned())
                        } else {
                            *lists.lock().unwrap() += 1;
                            (200, json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": *pods.lock().unwrap()}).to_string())
                        };
                        let mut r = http::Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    FakeKubelet {
        address,
        ca_pem: ca_cert.pem(),
        pods,
        lists,
    }
}

fn config(k: &FakeKubelet, dir: &std::path::Path, ca_pem: &str, token: &str) -> KubeletConfig {
    std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    KubeletConfig {
        address: k.address.clone(),
        server_name: "node-a".into(),
        ca_file: dir.join("ca.crt"),
        token_file: dir.join("token"),
        resync: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_pod_that_appears_later_is_found_by_listing_on_demand() {
    let kubelet = fake_kubelet().await;
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let source = KubeletPodSource::start(
        config(&kubelet, dir.path(), &kubelet.ca_pem, TOKEN),
        cancel.clone(),
    );
    let started = Instant::now();
    while !source.is_synced() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "first list never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = {
        let source = source.clone();
        tokio::spawn(async move {
            find_container(&source, "uid-1", "abc123", Duration::from_secs(20)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    kubelet.pods.lock().unwrap().push(pod("uid-1", "abc123"));
    let found = waiter.await.unwrap().unwrap();
    // Found by an on-demand list long before the 60 s background resync.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(found.container.name, "main");
    assert!(*kubelet.lists.lock().unwrap() >= 2);

    // A container that never appears fails at the deadline, with what was missing.
    let err = find_container(&source, "uid-1", "other", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            K8sAttestError::NotFound {
                what: "pod found, container status missing",
                ..
            }
        ),
        "{err}"
    );
    cancel.cancel();
}

#[tokio::test]
async fn a_wrong_token_or_an_untrusted_kubelet_is_refused() {
    let kubelet = fake_kubelet().await;
    kubelet.pods.lock().unwrap().push(pod("uid-1", "abc123"));
    let dir = tempfile::tempdir().unwrap();
    // Good credentials list the pod.
    assert_eq!(
        list(&config(&kubelet, dir.path(), &kubelet.ca_pem, TOKEN))
            .await
            .unwrap()
            .len(),
        1
    );
    // A wrong token: the kubelet's 401 is reported.
    let err = list(&config(&kubelet, dir.path(), &kubelet.ca_pem, "stolen"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeletError::Status { status: 401, .. }),
        "{err}"
    );
    // A kubelet whose certificate our CA did not sign: TLS fails, no pods are read.
    let other_ca = {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    };
    let err = list(&config(&kubelet, dir.path(), &other_ca, TOKEN))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeletError::Http(ref m) if m.contains("TLS")),
        "{err}"
    );
}
