//! NodePublishVolume latency in files mode, with the pod's entry (and SVID) already on the
//! node: the kubelet's call until the identity files are in the pod's tmpfs. Real
//! apiserver (the pod token is TokenReviewed), agent, Broker API, tmpfs mounts.
//!
//! Run: `make bench` (or `hack/bench.sh csi`). SIGIL_BENCH_VOLUMES (default 200).

use sigil_testkit::agent as agent_common;
use sigil_testkit::report;
use sigil_testkit::trust_domain as trust_domain_common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::AgentWorld;
use hyper_util::rt::TokioIo;
use kube::ResourceExt;
use report::Report;
use serde_json::json;
use sigil_csi::app::{Args, run};
use sigil_csi::mounter::LinuxMounter;
use sigil_identity::proto::csi as pb;
use sigil_telemetry::LogFormat;
use sigil_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

fn main() {
    let n: usize = std::env::var("SIGIL_BENCH_VOLUMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rt = report::runtime();
    rt.block_on(async move {
        let mut report = Report::new("csi", &format!("sigil-csi NodePublishVolume, files mode, entry already on the node ({n} volumes, one at a time)"));
        let aw = AgentWorld::start("csibench").await;
        aw.w.cluster_spiffe_id(&format!("{}-bench", aw.w.tag), "bench").await;
        let mut pods = Vec::with_capacity(n);
        for i in 0..n {
            let pod = aw.w.pod(&format!("b-{i}"), &aw.w.node_a, "web", json!({"app": "bench"})).await;
            let token = aw.w.token(&pod, "sigil-csi").await;
            pods.push((pod, token));
        }
        // Every pod's SVID is on the node before the first publish.
        let id = aw.id_for_sa("web");
        trust_domain_common::eventually("every entry's SVID on the node", Duration::from_secs(120), || async {
            let held = aw.agent.cache.entries().iter().filter(|e| e.spiffe_id.to_string() == id && aw.agent.cache.svid(&e.id).is_some()).count();
            (held >= n).then_some(())
        })
        .await;

        let socket = aw.dir.path().join("csi").join("csi.sock");
        let cancel = CancellationToken::new();
        let args = Args {
            endpoint: format!("unix://{}", socket.display()),
            node_name: aw.w.node_a.clone(),
            broker_socket_path: aw.broker_socket.clone(),
            agent_socket_dir: aw.socket.parent().expect("dir").to_owned(),
            data_dir: aw.dir.path().join("csi-data"),
            token_audience: "sigil-csi".into(),
            health_addr: "127.0.0.1:0".parse().expect("addr"),
            log_format: LogFormat::Json,
            socket_publish_wait: std::time::Duration::from_secs(10),
        };
        let server = tokio::spawn(run(args, Arc::new(LinuxMounter), Readiness::new(), cancel.clone()));
        // Accepting, not merely present (the file appears at bind(), before listen()).
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let path = socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .expect("csi channel");
        let mut client = pb::node_client::NodeClient::new(channel);

        let mut latencies = Vec::with_capacity(n);
        let mut targets: Vec<(String, PathBuf)> = Vec::new();
        for (i, (pod, token)) in pods.iter().enumerate() {
            let target = aw.dir.path().join("pods").join(format!("b-{i}")).join("identity");
            let mut ctx: BTreeMap<String, String> = BTreeMap::new();
            ctx.insert("mode".into(), "files".into());
            ctx.insert("csi.storage.k8s.io/pod.name".into(), pod.name_any());
            ctx.insert("csi.storage.k8s.io/pod.namespace".into(), pod.namespace().unwrap_or_default());
            ctx.insert("csi.storage.k8s.io/pod.uid".into(), pod.uid().unwrap_or_default());
            ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
            ctx.insert("csi.storage.k8s.io/serviceAccount.tokens".into(), json!({"sigil-csi": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}}).to_string());
            let req = pb::NodePublishVolumeRequest {
                volume_id: format!("vol-{i}"),
                target_path: target.display().to_string(),
                volume_capability: Some(pb::VolumeCapability { access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())), access_mode: None }),
                readonly: true,
                volume_context: ctx,
                ..Default::default()
            };
            let t = Instant::now();
            client.node_publish_volume(req).await.expect("publish");
            latencies.push(t.elapsed());
            assert!(target.join("svid.pem").exists(), "files written before NodePublishVolume returned");
            targets.push((format!("vol-{i}"), target));
        }
        report.latencies("NodePublishVolume (files mode) until files are in place", latencies);
        let t = Instant::now();
        for (volume_id, target) in &targets {
            client
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest { volume_id: volume_id.clone(), target_path: target.display().to_string() })
                .await
                .expect("unpublish");
        }
        report.row("NodeUnpublishVolume, all volumes", format!("{:.2?} ({:.2?} each)", t.elapsed(), t.elapsed() / n.max(1) as u32));
        cancel.cancel();
        let _ = server.await;
        report.finish();
    });
}
