//! sigil-csi in this process against an [`AgentWorld`]: start and restart it, talk CSI to
//! it, build NodePublishVolume requests as the kubelet sends them, and check the files a
//! files-mode volume holds.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::json;
use sigil_csi::app::{Args, run};
use sigil_csi::mounter::LinuxMounter;
use sigil_identity::proto::csi as pb;
use sigil_identity::{TrustBundle, x509};
use sigil_telemetry::LogFormat;
use sigil_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentWorld;
use crate::trust_domain::{SETTLE, eventually};

/// sigil-csi running in this process, restartable.
pub struct Csi {
    pub args: Args,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Csi {
    pub async fn start(args: Args) -> Csi {
        let cancel = CancellationToken::new();
        let socket = PathBuf::from(args.endpoint.trim_start_matches("unix://"));
        let _ = std::fs::remove_file(&socket);
        let task = tokio::spawn(run(
            args.clone(),
            Arc::new(LinuxMounter),
            Readiness::new(),
            cancel.clone(),
        ));
        // Accepting, not merely present: the socket file appears at bind(), just before
        // listen(), and a connection in between is refused.
        eventually("the CSI socket", SETTLE, || async {
            tokio::net::UnixStream::connect(&socket)
                .await
                .ok()
                .map(drop)
        })
        .await;
        Csi { args, cancel, task }
    }

    pub async fn stop(self) -> Args {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
        self.args
    }

    pub async fn client(&self) -> pb::node_client::NodeClient<tonic::transport::Channel> {
        let path = PathBuf::from(self.args.endpoint.trim_start_matches("unix://"));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        pb::node_client::NodeClient::new(channel)
    }
}

pub fn csi_args(aw: &AgentWorld) -> Args {
    Args {
        endpoint: format!(
            "unix://{}",
            aw.dir.path().join("csi").join("csi.sock").display()
        ),
        node_name: aw.w.node_a.clone(),
        broker_socket_path: aw.broker_socket.clone(),
        agent_socket_dir: aw.socket.parent().unwrap().to_owned(),
        data_dir: aw.dir.path().join("csi-data"),
        token_audience: "sigil-csi".into(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        log_format: LogFormat::Json,
        socket_publish_wait: std::time::Duration::from_secs(10),
    }
}

/// A NodePublishVolume request as the kubelet sends it for an inline ephemeral volume.
pub fn publish_request(
    volume_id: &str,
    target: &Path,
    pod: &Pod,
    token: Option<&str>,
    readonly: bool,
    attrs: &[(&str, &str)],
) -> pb::NodePublishVolumeRequest {
    let mut ctx: BTreeMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ctx.insert("csi.storage.k8s.io/pod.name".into(), pod.name_any());
    ctx.insert(
        "csi.storage.k8s.io/pod.namespace".into(),
        pod.namespace().unwrap(),
    );
    ctx.insert("csi.storage.k8s.io/pod.uid".into(), pod.uid().unwrap());
    ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    if let Some(t) = token {
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            json!({"sigil-csi": {"token": t, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
                .to_string(),
        );
    }
    pb::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        readonly,
        volume_context: ctx,
        ..Default::default()
    }
}

/// The SPIFFE ID and leaf of the files in `dir`, checking that they verify against
/// `bundle.pem` and that the key matches the certificate.
pub fn check_files(dir: &Path, cert: &[u8], key: &[u8]) -> (String, Vec<u8>) {
    let chain = x509::certs_from_pem(std::str::from_utf8(cert).unwrap()).unwrap();
    let td_bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
    let leaf = x509::inspect_leaf(&chain[0]).unwrap();
    let bundle =
        TrustBundle::from_x509_pem(leaf.spiffe_id.trust_domain().clone(), &td_bundle).unwrap();
    let verified = x509::validate_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    let key =
        sigil_identity::keys::PrivateKey::from_pem(std::str::from_utf8(key).unwrap()).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        parsed.tbs_certificate.subject_pki.raw,
        key.public_key_der().as_slice(),
        "svid_key.pem does not match svid.pem"
    );
    (verified.spiffe_id.to_string(), chain[0].clone())
}

pub fn read_pair(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("svid.pem")).unwrap(),
        std::fs::read(dir.join("svid_key.pem")).unwrap(),
    )
}

pub fn generation(dir: &Path) -> PathBuf {
    std::fs::read_link(dir.join("..data")).unwrap()
}

/// `req` as a kubelet sends it for a CSIDriver with `serviceAccountTokenInSecrets: true`
/// (Kubernetes 1.35+): the tokens in `secrets`, not in the volume context.
#[allow(dead_code)]
pub fn tokens_in_secrets(mut req: pb::NodePublishVolumeRequest) -> pb::NodePublishVolumeRequest {
    let key = "csi.storage.k8s.io/serviceAccount.tokens";
    if let Some(tokens) = req.volume_context.remove(key) {
        req.secrets.insert(key.to_owned(), tokens);
    }
    req
}
